//! Test helpers: a small deterministic RNG, random buffers, the ISAs this CPU can exercise, and
//! error measures.

use super::quant::{QuantFormat, QuantMatrix};
use half::f16;
use ir_types::{CodeFormat, CpuIsa};

/// SplitMix64: tiny, deterministic, good enough to fill test tensors.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

/// Every ISA level this CPU runs natively; the others would only repeat a lower level's code.
pub(crate) fn isas_to_test() -> Vec<CpuIsa> {
    let isas: Vec<CpuIsa> = [CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512]
        .into_iter()
        .filter(|&isa| super::runnable_isa(isa) == isa)
        .collect();
    println!(
        "testing ISA levels {isas:?} (this CPU: {:?})",
        super::detected_isa()
    );
    isas
}

pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `f` on a rayon pool of `threads` threads.
pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// A random quantized matrix of `format`.
pub(crate) fn random_quant_matrix(
    rng: &mut Rng,
    format: QuantFormat,
    n: usize,
    k: usize,
) -> QuantMatrix {
    let bits = format.codes.bits();
    let groups = n * format.groups(k);
    let codes = (0..n * k)
        .map(|_| match format.codes {
            // Finite e4m3 codes only (0x7f and 0xff are NaN).
            CodeFormat::Fp8E4M3 => {
                let c = rng.below(254) as u8;
                c + u8::from(c >= 0x7f)
            }
            _ => rng.below(1 << bits) as u8,
        })
        .collect();
    let scales = (0..groups)
        .map(|_| f16::from_f32(0.01 + rng.unit().abs() * 0.05))
        .collect();
    let mins = if format.asymmetric {
        (0..groups)
            .map(|_| f16::from_f32(rng.unit() * 0.1))
            .collect()
    } else {
        vec![]
    };
    QuantMatrix {
        format,
        rows: n,
        cols: k,
        codes,
        scales,
        mins,
    }
}
