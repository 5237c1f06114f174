//! The vector vocabulary the generic kernels are written in: one [`Simd`] implementation per
//! [`CpuIsa`] (`Portable` on plain 8-lane arrays, `Avx2` on 8-lane AVX2+FMA registers, `Avx512` on
//! 16-lane AVX-512 registers), the weight element loaders ([`WeightElem`]), the vector `exp`, and
//! [`run_simd`], which runs a [`SimdTask`] with the vector type of a `CpuIsa`.
//!
//! Kernels are written once as `#[inline(always)]` code generic over `S: Simd`. [`run_simd`] calls
//! them from a `#[target_feature]` fn per ISA, so every intrinsic is inlined into code compiled for
//! exactly that ISA, and the `Portable` instantiation uses baseline instructions only.

use half::{bf16, f16};
use ir_types::CpuIsa;

/// A unit of kernel work that can be compiled for any vector ISA.
///
/// `run::<S>` may only be called when the CPU supports `S`; [`run_simd`] guarantees that.
pub(crate) trait SimdTask {
    type Output;
    fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `task` with the vector type of `isa`. `isa` must already be runnable on this CPU (see
/// [`super::runnable_isa`]); an ISA the build target lacks runs the portable code.
#[inline]
pub(crate) fn run_simd<T: SimdTask>(isa: CpuIsa, task: T) -> T::Output {
    debug_assert!(isa <= super::detected_isa());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller resolved `isa` against the running CPU.
        CpuIsa::Avx512 => unsafe { x86::run_avx512(task) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        CpuIsa::Avx2 => unsafe { x86::run_avx2(task) },
        _ => task.run::<Portable>(),
    }
}

/// Lane-wise f32 vector operations. All methods are `unsafe`: the implementing ISA must be present
/// and pointer arguments must be valid for the lanes they touch.
///
/// `max(a, b)` / `min(a, b)` follow x86 semantics: when either lane is NaN the lane of `b` is
/// returned, so `max(limit, x)` lets a NaN in `x` through.
pub(crate) trait Simd: Copy + 'static {
    /// The ISA level whose instructions this implementation uses.
    const ISA: CpuIsa;
    const LANES: usize;
    type V: Copy;

    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// Loads `n < LANES` elements; the other lanes are zero and their memory is not touched.
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the first `n < LANES` lanes and leaves the rest of memory untouched.
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize);
    /// Widens `LANES` bf16 values (their raw bits).
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    /// Widens `LANES` IEEE half values (their raw bits).
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the ISA has FMA.
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise `if a > b { x } else { y }`.
    unsafe fn select_gt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// `2^n` for lanes holding integral values in [-126, 127].
    unsafe fn exp2i(n: Self::V) -> Self::V;
    /// Sum of the lanes in a fixed order.
    unsafe fn hsum(v: Self::V) -> f32;
    /// Transposes the `LANES x LANES` block held in `rows[..LANES]` (row i becomes column i).
    unsafe fn transpose(rows: &mut [Self::V]);
    /// Per-lane right shifts for [`Simd::load_codes`].
    type Shifts: Copy;
    /// The shifts `shift(i)` for lanes `i in 0..LANES`.
    unsafe fn code_shifts(shift: impl Fn(usize) -> u32) -> Self::Shifts;
    /// Unpacks integer codes to f32: lane `i` is `(p[i % run] >> shifts[i]) & mask`, where `run`
    /// is `LANES` or a smaller power of two (narrow codes of a few bytes fill a vector from
    /// several bit slots of the same bytes).
    unsafe fn load_codes(p: *const u8, run: usize, shifts: Self::Shifts, mask: u32) -> Self::V;
    /// `LANES` FP8 e4m3 codes as f32. The code 0x7f (e4m3's NaN) reads as 480; quantizers never
    /// write it.
    unsafe fn load_e4m3(p: *const u8) -> Self::V;
    /// The codes of one k of a quantized panel of `2 * LANES` rows (the layout of `cpu::quant`),
    /// as f32: rows `[0, LANES)` and `[LANES, 2 * LANES)`. `CODE` is the integer code width (8,
    /// 4 or 2 bits) or [`CODE_E4M3`]. The hot path of the quantized matmul: one load per k, no
    /// run-time choices.
    unsafe fn load_code_pair<const CODE: u32>(p: *const u8) -> [Self::V; 2];
    /// `LANES` i32 lanes, each holding two i16 halves (the integer path of the quantized
    /// matmul: codes against activations rounded to int16, see `cpu::quant`).
    type I: Copy;
    unsafe fn zero_i() -> Self::I;
    /// The integer codes of k and k + 1 of a quantized panel of `2 * LANES` rows (`p` points at
    /// k's bytes, k + 1's follow) as i16 pairs: lane `i` of vector `h` holds the codes of row
    /// `h * LANES + i` at k (low half) and k + 1 (high half). `CODE` is 8, 4 or 2 bits.
    unsafe fn load_code_pairs_i16<const CODE: u32>(p: *const u8) -> [Self::I; 2];
    /// The i16 pair at `x` (x[0] low, x[1] high) in every lane.
    unsafe fn splat_pair(x: *const i16) -> Self::I;
    /// `acc + a.low * x.low + a.high * x.high`, lane by lane, in i32.
    unsafe fn dot_pairs(acc: Self::I, a: Self::I, x: Self::I) -> Self::I;
    unsafe fn i32_to_f32(v: Self::I) -> Self::V;
    /// Hints that the cache line at `p` will be read soon. `p` may point anywhere: a prefetch
    /// never faults.
    #[inline(always)]
    unsafe fn prefetch<T>(p: *const T) {
        // Prefetch is baseline SSE on x86-64, so every level (portable included) may use it.
        #[cfg(target_arch = "x86_64")]
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

/// A weight element type the kernels read, widened to f32 on load.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Loads `S::LANES` elements as f32.
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
    /// Loads `n < S::LANES` elements as f32; the other lanes are zero.
    #[inline(always)]
    unsafe fn load_part<S: Simd>(p: *const Self, n: usize) -> S::V {
        // Tails are rare, so a stack copy keeps every ISA's path simple.
        let mut buf = [0f32; 16];
        for (i, slot) in buf.iter_mut().enumerate().take(n) {
            *slot = (*p.add(i)).to_f32();
        }
        S::load(buf.as_ptr())
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f32) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    unsafe fn load_part<S: Simd>(p: *const f32, n: usize) -> S::V {
        S::load_part(p, n)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const bf16) -> S::V {
        S::load_bf16(p as *const u16)
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f16) -> S::V {
        S::load_f16(p as *const u16)
    }
}

/// `CODE` of [`Simd::load_code_pair`] for FP8 e4m3 codes.
pub(crate) const CODE_E4M3: u32 = 0;

/// 2^8: rebiases an e4m3 value read as an IEEE half (exponent bias 15) to e4m3's bias 7.
const E4M3_FROM_HALF: f32 = 256.0;

/// An FP8 e4m3 code as f32: its exponent and mantissa bits placed at the top of an IEEE half's
/// exponent and mantissa fields, widened, then scaled by 2^8. Exact for normal and subnormal
/// codes alike (a subnormal e4m3 is a subnormal half, whose widening is exact and which no f32
/// arithmetic sees as subnormal, so no slow denormal path is taken), the same bits as the
/// vector paths below.
#[inline(always)]
pub(crate) fn e4m3_bits_to_f32(code: u8) -> f32 {
    let code = code as u16;
    f16_bits_to_f32(((code & 0x80) << 8) | ((code & 0x7f) << 7)) * E4M3_FROM_HALF
}

/// IEEE half to f32 by bit manipulation, valid for every input (subnormals, inf, NaN).
/// The exponent/mantissa bits are moved into f32 position and the exponent bias difference
/// (127 - 15 = 112) is applied by multiplying with 2^112, which also normalizes subnormals.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp_mant = h & 0x7fff;
    let shifted = exp_mant << 13;
    let magnitude = if exp_mant >= 0x7c00 {
        shifted | 0x7f80_0000
    } else {
        (f32::from_bits(shifted) * f32::from_bits(0x7780_0000)).to_bits()
    };
    f32::from_bits(magnitude | sign)
}

/// Loads `n <= LANES` elements: a full vector, or a part with zeros above.
#[inline(always)]
pub(crate) unsafe fn load_n<S: Simd>(p: *const f32, n: usize) -> S::V {
    if n == S::LANES {
        S::load(p)
    } else {
        S::load_part(p, n)
    }
}

/// Stores the first `n <= LANES` lanes.
#[inline(always)]
pub(crate) unsafe fn store_n<S: Simd>(p: *mut f32, v: S::V, n: usize) {
    if n == S::LANES {
        S::store(p, v)
    } else {
        S::store_part(p, v, n)
    }
}

// ---------------------------------------------------------------------------------------------
// exp

/// Inputs are clamped to this range: above it f32 overflows; below it the result rounds to 0.
const EXP_HI: f32 = 88.72283;
const EXP_LO: f32 = -110.0;
/// Adding then subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even) for |v| < 2^22.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^12.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// Lane-wise `e^x`, relative error below 2e-7 over the normal f32 range; results in the subnormal
/// range are rounded once. NaN stays NaN.
///
/// Range reduction `x = n ln2 + r` with |r| <= ln2/2, a degree-7 Taylor polynomial for `e^r`
/// (truncation error 5e-9), then scaling by `2^n` as two factors so that subnormal results are
/// rounded only once.
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    let x = S::min(S::splat(EXP_HI), S::max(S::splat(EXP_LO), x));
    let magic = S::splat(ROUND_MAGIC);
    let n = S::sub(S::mul_add(x, S::splat(LOG2E), magic), magic);
    let r = S::mul_add(n, S::splat(-LN2_HI), x);
    let r = S::mul_add(n, S::splat(-LN2_LO), r);
    let mut p = S::splat(1.0 / 5040.0);
    p = S::mul_add(p, r, S::splat(1.0 / 720.0));
    p = S::mul_add(p, r, S::splat(1.0 / 120.0));
    p = S::mul_add(p, r, S::splat(1.0 / 24.0));
    p = S::mul_add(p, r, S::splat(1.0 / 6.0));
    p = S::mul_add(p, r, S::splat(0.5));
    p = S::mul_add(p, r, S::splat(1.0));
    p = S::mul_add(p, r, S::splat(1.0));
    // floor(n / 2) for integral n, again by the rounding trick.
    let n_lo = S::sub(
        S::add(S::mul_add(n, S::splat(0.5), S::splat(-0.25)), magic),
        magic,
    );
    let n_hi = S::sub(n, n_lo);
    S::mul(S::mul(p, S::exp2i(n_hi)), S::exp2i(n_lo))
}

/// `x * sigmoid(x)` as `x / (1 + e^-x)`.
#[inline(always)]
pub(crate) unsafe fn silu<S: Simd>(x: S::V) -> S::V {
    let one = S::splat(1.0);
    S::div(x, S::add(one, exp::<S>(S::sub(S::zero(), x))))
}

// ---------------------------------------------------------------------------------------------
// Portable: 8 lanes of plain Rust, which the compiler maps onto baseline SSE2.

#[derive(Clone, Copy)]
pub(crate) struct Portable;

const PORTABLE_LANES: usize = 8;
type Lanes = [f32; PORTABLE_LANES];

#[inline(always)]
fn lanewise(a: Lanes, b: Lanes, f: impl Fn(f32, f32) -> f32) -> Lanes {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl Simd for Portable {
    const ISA: CpuIsa = CpuIsa::Portable;
    const LANES: usize = PORTABLE_LANES;
    type V = Lanes;

    #[inline(always)]
    unsafe fn zero() -> Lanes {
        [0.0; PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Lanes {
        [x; PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Lanes {
        (p as *const Lanes).read_unaligned()
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Lanes {
        let mut v = [0.0; PORTABLE_LANES];
        for (i, lane) in v.iter_mut().enumerate().take(n) {
            *lane = *p.add(i);
        }
        v
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Lanes) {
        (p as *mut Lanes).write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: Lanes, n: usize) {
        for (i, lane) in v.iter().enumerate().take(n) {
            *p.add(i) = *lane;
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Lanes {
        std::array::from_fn(|i| f32::from_bits((*p.add(i) as u32) << 16))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Lanes {
        std::array::from_fn(|i| f16_bits_to_f32(*p.add(i)))
    }
    #[inline(always)]
    unsafe fn add(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn div(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn max(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn min(a: Lanes, b: Lanes) -> Lanes {
        lanewise(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    unsafe fn mul_add(a: Lanes, b: Lanes, c: Lanes) -> Lanes {
        // Unfused: a software fma would be far slower than the two roundings cost.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn select_gt(a: Lanes, b: Lanes, x: Lanes, y: Lanes) -> Lanes {
        std::array::from_fn(|i| if a[i] > b[i] { x[i] } else { y[i] })
    }
    #[inline(always)]
    unsafe fn exp2i(n: Lanes) -> Lanes {
        std::array::from_fn(|i| f32::from_bits(((n[i] as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn hsum(v: Lanes) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    type Shifts = [u32; PORTABLE_LANES];
    #[inline(always)]
    unsafe fn code_shifts(shift: impl Fn(usize) -> u32) -> Self::Shifts {
        std::array::from_fn(shift)
    }
    #[inline(always)]
    unsafe fn load_codes(p: *const u8, run: usize, shifts: Self::Shifts, mask: u32) -> Lanes {
        std::array::from_fn(|i| ((*p.add(i % run) as u32 >> shifts[i]) & mask) as f32)
    }
    #[inline(always)]
    unsafe fn load_e4m3(p: *const u8) -> Lanes {
        std::array::from_fn(|i| e4m3_bits_to_f32(*p.add(i)))
    }
    #[inline(always)]
    unsafe fn load_code_pair<const CODE: u32>(p: *const u8) -> [Lanes; 2] {
        std::array::from_fn(|half| {
            std::array::from_fn(|i| {
                let row = half * PORTABLE_LANES + i;
                if CODE == CODE_E4M3 {
                    return e4m3_bits_to_f32(*p.add(row));
                }
                // Row r: byte r % bytes_per_k, bit slot r / bytes_per_k (see `cpu::quant`).
                let bytes_per_k = 2 * PORTABLE_LANES * CODE as usize / 8;
                let byte = *p.add(row % bytes_per_k) as u32;
                ((byte >> ((row / bytes_per_k) as u32 * CODE)) & ((1 << CODE) - 1)) as f32
            })
        })
    }
    type I = [i32; PORTABLE_LANES];
    #[inline(always)]
    unsafe fn zero_i() -> Self::I {
        [0; PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn load_code_pairs_i16<const CODE: u32>(p: *const u8) -> [Self::I; 2] {
        let bytes_per_k = 2 * PORTABLE_LANES * CODE as usize / 8;
        // Row r: byte r % bytes_per_k, bit slot r / bytes_per_k (see `cpu::quant`).
        let code = |k: usize, row: usize| {
            let byte = *p.add(k * bytes_per_k + row % bytes_per_k) as i32;
            (byte >> ((row / bytes_per_k) as u32 * CODE)) & ((1 << CODE) - 1)
        };
        std::array::from_fn(|half| {
            std::array::from_fn(|i| {
                let row = half * PORTABLE_LANES + i;
                code(0, row) | (code(1, row) << 16)
            })
        })
    }
    #[inline(always)]
    unsafe fn splat_pair(x: *const i16) -> Self::I {
        [(x as *const i32).read_unaligned(); PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn dot_pairs(acc: Self::I, a: Self::I, x: Self::I) -> Self::I {
        let (low, high) = (|v: i32| v as i16 as i32, |v: i32| v >> 16);
        std::array::from_fn(|i| acc[i] + low(a[i]) * low(x[i]) + high(a[i]) * high(x[i]))
    }
    #[inline(always)]
    unsafe fn i32_to_f32(v: Self::I) -> Lanes {
        v.map(|v| v as f32)
    }
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // The symmetric indices are the point.
    unsafe fn transpose(rows: &mut [Lanes]) {
        for i in 0..PORTABLE_LANES {
            for j in i + 1..PORTABLE_LANES {
                let upper = rows[i][j];
                rows[i][j] = rows[j][i];
                rows[j][i] = upper;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// x86-64: AVX2+FMA (8 lanes) and AVX-512 (16 lanes).

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CpuIsa, Simd, SimdTask};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2<T: SimdTask>(task: T) -> T::Output {
        task.run::<Avx2>()
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn run_avx512<T: SimdTask>(task: T) -> T::Output {
        task.run::<Avx512>()
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    /// Sliding window of lane masks for partial AVX2 loads: `[8 - n..16 - n]` enables n lanes.
    static AVX2_PART_MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    #[inline(always)]
    unsafe fn avx2_mask(n: usize) -> __m256i {
        _mm256_loadu_si256(AVX2_PART_MASK.as_ptr().add(8 - n) as *const __m256i)
    }

    /// e4m3 codes in 16-bit lanes as IEEE half bits (see `e4m3_bits_to_f32`): shifting the
    /// byte to the top and arithmetically back by 1 puts exponent and mantissa at bits 7 to 13
    /// and copies the sign to bit 14; the mask keeps those bits and the sign at bit 15.
    #[inline(always)]
    unsafe fn e4m3_halves(b: __m256i) -> __m256i {
        let spread = _mm256_srai_epi16::<1>(_mm256_slli_epi16::<8>(b));
        _mm256_and_si256(spread, _mm256_set1_epi16(0xbf80u16 as i16))
    }

    /// Eight half values (bits) to f32 times 2^8: e4m3 values.
    #[inline(always)]
    unsafe fn e4m3_from_halves(h: __m128i) -> __m256 {
        _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(super::E4M3_FROM_HALF))
    }

    impl Simd for Avx2 {
        const ISA: CpuIsa = CpuIsa::Avx2;
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m256 {
            _mm256_maskload_ps(p, avx2_mask(n))
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m256, n: usize) {
            _mm256_maskstore_ps(p, avx2_mask(n), v)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn select_gt(a: __m256, b: __m256, x: __m256, y: __m256) -> __m256 {
            _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_GT_OQ>(a, b))
        }
        #[inline(always)]
        unsafe fn exp2i(n: __m256) -> __m256 {
            let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
        }
        type Shifts = __m256i;
        #[inline(always)]
        unsafe fn code_shifts(shift: impl Fn(usize) -> u32) -> __m256i {
            let lanes: [u32; 8] = std::array::from_fn(shift);
            _mm256_loadu_si256(lanes.as_ptr() as *const __m256i)
        }
        #[inline(always)]
        unsafe fn load_codes(p: *const u8, run: usize, shifts: __m256i, mask: u32) -> __m256 {
            let bytes = match run {
                8.. => _mm_loadl_epi64(p as *const __m128i),
                4 => _mm_set1_epi32((p as *const i32).read_unaligned()),
                2 => _mm_set1_epi16((p as *const i16).read_unaligned()),
                _ => _mm_set1_epi8(*p as i8),
            };
            let wide = _mm256_cvtepu8_epi32(bytes);
            if mask == 0xff {
                return _mm256_cvtepi32_ps(wide);
            }
            let codes = _mm256_and_si256(
                _mm256_srlv_epi32(wide, shifts),
                _mm256_set1_epi32(mask as i32),
            );
            _mm256_cvtepi32_ps(codes)
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8) -> __m256 {
            let b = _mm256_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
            e4m3_from_halves(_mm256_castsi256_si128(e4m3_halves(b)))
        }
        #[inline(always)]
        unsafe fn load_code_pair<const CODE: u32>(p: *const u8) -> [__m256; 2] {
            let widen = |p: *const u8| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
            match CODE {
                8 => [
                    _mm256_cvtepi32_ps(widen(p)),
                    _mm256_cvtepi32_ps(widen(p.add(8))),
                ],
                4 => {
                    let w = widen(p);
                    let low = _mm256_and_si256(w, _mm256_set1_epi32(0xf));
                    [
                        _mm256_cvtepi32_ps(low),
                        _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(w)),
                    ]
                }
                2 => {
                    // Four bytes hold the 16 rows in four 2-bit slots: lanes 0-3 and 4-7 of
                    // the first vector are slots 0 and 1, of the second slots 2 and 3.
                    let bytes = _mm_set1_epi32((p as *const i32).read_unaligned());
                    let w = _mm256_cvtepu8_epi32(bytes);
                    let mask = _mm256_set1_epi32(3);
                    let low = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
                    let high = _mm256_srlv_epi32(w, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6));
                    [
                        _mm256_cvtepi32_ps(_mm256_and_si256(low, mask)),
                        _mm256_cvtepi32_ps(_mm256_and_si256(high, mask)),
                    ]
                }
                _ => {
                    let h = e4m3_halves(_mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i)));
                    [
                        e4m3_from_halves(_mm256_castsi256_si128(h)),
                        e4m3_from_halves(_mm256_extracti128_si256::<1>(h)),
                    ]
                }
            }
        }
        type I = __m256i;
        #[inline(always)]
        unsafe fn zero_i() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn load_code_pairs_i16<const CODE: u32>(p: *const u8) -> [__m256i; 2] {
            match CODE {
                8 => {
                    // 16 bytes per k: interleaving k's and k + 1's bytes pairs them per row.
                    let a = _mm_loadu_si128(p as *const __m128i);
                    let b = _mm_loadu_si128(p.add(16) as *const __m128i);
                    [
                        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)),
                        _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)),
                    ]
                }
                4 => {
                    // 8 bytes per k: byte j holds rows j (low nibble) and j + 8 (high).
                    let both = _mm_loadu_si128(p as *const __m128i);
                    let pairs = _mm_shuffle_epi8(
                        both,
                        _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15),
                    );
                    let w = _mm256_cvtepu8_epi16(pairs);
                    [
                        _mm256_and_si256(w, _mm256_set1_epi16(0xf)),
                        _mm256_srli_epi16::<4>(w),
                    ]
                }
                _ => {
                    // 4 bytes per k: byte j holds rows j, j + 4, j + 8, j + 12 in its four
                    // slots; lanes 0-3 of each vector take one slot, lanes 4-7 the next. The
                    // 32-bit shifts move bits of the high half into the top of the low one,
                    // which the mask clears.
                    let both = _mm_loadl_epi64(p as *const __m128i);
                    let pairs = _mm_shuffle_epi8(
                        both,
                        _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 0, 4, 1, 5, 2, 6, 3, 7),
                    );
                    let w = _mm256_cvtepu8_epi16(pairs);
                    let mask = _mm256_set1_epi16(3);
                    let low = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
                    let high = _mm256_srlv_epi32(w, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6));
                    [_mm256_and_si256(low, mask), _mm256_and_si256(high, mask)]
                }
            }
        }
        #[inline(always)]
        unsafe fn splat_pair(x: *const i16) -> __m256i {
            _mm256_set1_epi32((x as *const i32).read_unaligned())
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: __m256i, a: __m256i, x: __m256i) -> __m256i {
            _mm256_add_epi32(acc, _mm256_madd_epi16(a, x))
        }
        #[inline(always)]
        unsafe fn i32_to_f32(v: __m256i) -> __m256 {
            _mm256_cvtepi32_ps(v)
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [__m256]) {
            // Interleave pairs, then quads within 128-bit halves, then swap halves.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
            r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
            r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
            r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
            r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
            r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
            r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
            r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
            r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    #[inline(always)]
    fn lane_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    impl Simd for Avx512 {
        const ISA: CpuIsa = CpuIsa::Avx512;
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
            _mm512_maskz_loadu_ps(lane_mask(n), p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m512, n: usize) {
            _mm512_mask_storeu_ps(p, lane_mask(n), v)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m512 {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn select_gt(a: __m512, b: __m512, x: __m512, y: __m512) -> __m512 {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b), y, x)
        }
        #[inline(always)]
        unsafe fn exp2i(n: __m512) -> __m512 {
            let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            let oct = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            Avx2::hsum(oct)
        }
        type Shifts = __m512i;
        #[inline(always)]
        unsafe fn code_shifts(shift: impl Fn(usize) -> u32) -> __m512i {
            let lanes: [u32; 16] = std::array::from_fn(shift);
            _mm512_loadu_si512(lanes.as_ptr() as *const _)
        }
        #[inline(always)]
        unsafe fn load_codes(p: *const u8, run: usize, shifts: __m512i, mask: u32) -> __m512 {
            let bytes = match run {
                16.. => _mm_loadu_si128(p as *const __m128i),
                8 => _mm_set1_epi64x((p as *const i64).read_unaligned()),
                4 => _mm_set1_epi32((p as *const i32).read_unaligned()),
                2 => _mm_set1_epi16((p as *const i16).read_unaligned()),
                _ => _mm_set1_epi8(*p as i8),
            };
            let wide = _mm512_cvtepu8_epi32(bytes);
            if mask == 0xff {
                return _mm512_cvtepi32_ps(wide);
            }
            let codes = _mm512_and_si512(
                _mm512_srlv_epi32(wide, shifts),
                _mm512_set1_epi32(mask as i32),
            );
            _mm512_cvtepi32_ps(codes)
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8) -> __m512 {
            // As the AVX2 version, on 16 lanes.
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
            _mm512_mul_ps(
                _mm512_cvtph_ps(e4m3_halves(b)),
                _mm512_set1_ps(super::E4M3_FROM_HALF),
            )
        }
        #[inline(always)]
        unsafe fn load_code_pair<const CODE: u32>(p: *const u8) -> [__m512; 2] {
            let widen = |p: *const u8| _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
            match CODE {
                8 => [
                    _mm512_cvtepi32_ps(widen(p)),
                    _mm512_cvtepi32_ps(widen(p.add(16))),
                ],
                4 => {
                    let w = widen(p);
                    let low = _mm512_and_si512(w, _mm512_set1_epi32(0xf));
                    [
                        _mm512_cvtepi32_ps(low),
                        _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(w)),
                    ]
                }
                2 => {
                    // Eight bytes hold the 32 rows in four 2-bit slots (see the AVX2 version).
                    let bytes = _mm_set1_epi64x((p as *const i64).read_unaligned());
                    let w = _mm512_cvtepu8_epi32(bytes);
                    let mask = _mm512_set1_epi32(3);
                    let low = _mm512_srlv_epi32(
                        w,
                        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                    );
                    let high = _mm512_srlv_epi32(
                        w,
                        _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
                    );
                    [
                        _mm512_cvtepi32_ps(_mm512_and_si512(low, mask)),
                        _mm512_cvtepi32_ps(_mm512_and_si512(high, mask)),
                    ]
                }
                _ => [Self::load_e4m3(p), Self::load_e4m3(p.add(16))],
            }
        }
        type I = __m512i;
        #[inline(always)]
        unsafe fn zero_i() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn load_code_pairs_i16<const CODE: u32>(p: *const u8) -> [__m512i; 2] {
            // Pairs the 16 bytes of k at `a` with those of k + 1 at `b`, byte by byte.
            let pair16 = |a: *const u8, b: *const u8| {
                let (a, b) = (
                    _mm_loadu_si128(a as *const __m128i),
                    _mm_loadu_si128(b as *const __m128i),
                );
                _mm512_cvtepu8_epi16(_mm256_set_m128i(
                    _mm_unpackhi_epi8(a, b),
                    _mm_unpacklo_epi8(a, b),
                ))
            };
            match CODE {
                // 32 bytes per k: rows 0-15 in bytes 0-15, rows 16-31 in bytes 16-31.
                8 => [pair16(p, p.add(32)), pair16(p.add(16), p.add(48))],
                4 => {
                    // 16 bytes per k: byte j holds rows j (low nibble) and j + 16 (high).
                    let w = pair16(p, p.add(16));
                    [
                        _mm512_and_si512(w, _mm512_set1_epi16(0xf)),
                        _mm512_srli_epi16::<4>(w),
                    ]
                }
                _ => {
                    // 8 bytes per k: byte j holds rows j, j + 8, j + 16, j + 24; lanes 0-7 of
                    // each vector take one slot, lanes 8-15 the next.
                    let both = _mm_loadu_si128(p as *const __m128i);
                    let pairs = _mm_shuffle_epi8(
                        both,
                        _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15),
                    );
                    let w = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(pairs));
                    let mask = _mm512_set1_epi16(3);
                    // Word shifts: the first 16 words (lanes 0-7) by 0 or 4, the rest by 2 or
                    // 6. Written out, not in a closure: a closure is a function of its own,
                    // without its caller's target features, so intrinsics in it may not inline.
                    let low = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_set1_epi16(0)),
                        _mm256_set1_epi16(2),
                    );
                    let high = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_set1_epi16(4)),
                        _mm256_set1_epi16(6),
                    );
                    [
                        _mm512_and_si512(_mm512_srlv_epi16(w, low), mask),
                        _mm512_and_si512(_mm512_srlv_epi16(w, high), mask),
                    ]
                }
            }
        }
        #[inline(always)]
        unsafe fn splat_pair(x: *const i16) -> __m512i {
            _mm512_set1_epi32((x as *const i32).read_unaligned())
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: __m512i, a: __m512i, x: __m512i) -> __m512i {
            _mm512_add_epi32(acc, _mm512_madd_epi16(a, x))
        }
        #[inline(always)]
        unsafe fn i32_to_f32(v: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(v)
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [__m512]) {
            // Within each 128-bit lane L, `quads[4g + c]` ends up holding rows 4g..4g+4 at
            // column 4L + c; two rounds of 128-bit lane shuffles then gather each column.
            let mut pairs = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                pairs[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                pairs[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            let mut quads = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let p = &pairs[4 * g..4 * g + 4];
                quads[4 * g] = _mm512_shuffle_ps::<0x44>(p[0], p[2]);
                quads[4 * g + 1] = _mm512_shuffle_ps::<0xee>(p[0], p[2]);
                quads[4 * g + 2] = _mm512_shuffle_ps::<0x44>(p[1], p[3]);
                quads[4 * g + 3] = _mm512_shuffle_ps::<0xee>(p[1], p[3]);
            }
            for c in 0..4 {
                let x0 = _mm512_shuffle_f32x4::<0x88>(quads[c], quads[4 + c]);
                let x1 = _mm512_shuffle_f32x4::<0xdd>(quads[c], quads[4 + c]);
                let y0 = _mm512_shuffle_f32x4::<0x88>(quads[8 + c], quads[12 + c]);
                let y1 = _mm512_shuffle_f32x4::<0xdd>(quads[8 + c], quads[12 + c]);
                r[c] = _mm512_shuffle_f32x4::<0x88>(x0, y0);
                r[8 + c] = _mm512_shuffle_f32x4::<0xdd>(x0, y0);
                r[4 + c] = _mm512_shuffle_f32x4::<0x88>(x1, y1);
                r[12 + c] = _mm512_shuffle_f32x4::<0xdd>(x1, y1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::isas_to_test;

    struct ExpOf<'a>(&'a [f32], &'a mut [f32]);
    impl SimdTask for ExpOf<'_> {
        type Output = ();
        fn run<S: Simd>(self) {
            let mut i = 0;
            unsafe {
                while i + S::LANES <= self.0.len() {
                    S::store(
                        self.1.as_mut_ptr().add(i),
                        exp::<S>(S::load(self.0.as_ptr().add(i))),
                    );
                    i += S::LANES;
                }
                let rest = self.0.len() - i;
                if rest > 0 {
                    let v = exp::<S>(S::load_part(self.0.as_ptr().add(i), rest));
                    S::store_part(self.1.as_mut_ptr().add(i), v, rest);
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_normal_range() {
        let inputs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        for isa in isas_to_test() {
            let mut got = vec![0f32; inputs.len()];
            run_simd(isa, ExpOf(&inputs, &mut got));
            let mut worst = 0f64;
            for (&x, &y) in inputs.iter().zip(&got) {
                let want = (x as f64).exp();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
            println!("exp {isa:?}: max relative error {worst:.3e}");
            assert!(worst < 2e-7, "{isa:?}: {worst}");
        }
    }

    #[test]
    fn exp_edges_are_finite_zero_or_nan() {
        let inputs = [
            -1e30f32,
            f32::NEG_INFINITY,
            -110.0,
            -104.5,
            -95.0,
            88.7,
            0.0,
            f32::NAN,
        ];
        for isa in isas_to_test() {
            let mut got = [1f32; 8];
            run_simd(isa, ExpOf(&inputs, &mut got));
            assert_eq!(&got[..3], &[0.0, 0.0, 0.0], "{isa:?}");
            assert!(got[3] == 0.0 || got[3] < 1e-44, "{isa:?}: {}", got[3]);
            let want = (-95f64).exp();
            assert!(
                ((got[4] as f64 - want) / want).abs() < 1e-3,
                "{isa:?} subnormal {}",
                got[4]
            );
            assert!(got[5].is_finite() && got[5] > 3.3e38, "{isa:?}: {}", got[5]);
            assert_eq!(got[6], 1.0);
            assert!(got[7].is_nan(), "{isa:?}");
        }
    }

    struct Transpose<'a>(&'a mut [f32]);
    impl SimdTask for Transpose<'_> {
        type Output = usize;
        fn run<S: Simd>(self) -> usize {
            let n = S::LANES;
            unsafe {
                let mut rows = [S::zero(); 16];
                for (i, row) in rows.iter_mut().enumerate().take(n) {
                    *row = S::load(self.0.as_ptr().add(i * n));
                }
                S::transpose(&mut rows[..n]);
                for (i, row) in rows.iter().enumerate().take(n) {
                    S::store(self.0.as_mut_ptr().add(i * n), *row);
                }
            }
            n
        }
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        for isa in isas_to_test() {
            let mut block: Vec<f32> = (0..256).map(|i| i as f32).collect();
            let n = run_simd(isa, Transpose(&mut block));
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(block[i * n + j], (j * n + i) as f32, "{isa:?} [{i}][{j}]");
                }
            }
        }
    }

    struct Widen<'a, E>(&'a [E], &'a mut [f32]);
    impl<E: WeightElem> SimdTask for Widen<'_, E> {
        type Output = ();
        fn run<S: Simd>(self) {
            let mut i = 0;
            unsafe {
                while i + S::LANES <= self.0.len() {
                    S::store(
                        self.1.as_mut_ptr().add(i),
                        E::load::<S>(self.0.as_ptr().add(i)),
                    );
                    i += S::LANES;
                }
                let rest = self.0.len() - i;
                if rest > 0 {
                    let v = E::load_part::<S>(self.0.as_ptr().add(i), rest);
                    S::store_part(self.1.as_mut_ptr().add(i), v, rest);
                }
            }
        }
    }

    #[test]
    fn half_widening_matches_the_half_crate_for_every_bit_pattern() {
        let f16s: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let bf16s: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        for isa in isas_to_test() {
            let mut got = vec![0f32; f16s.len()];
            run_simd(isa, Widen(&f16s, &mut got));
            for (h, g) in f16s.iter().zip(&got) {
                let want = h.to_f32();
                assert!(
                    want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                    "{isa:?} f16 {:#06x}",
                    h.to_bits()
                );
            }
            run_simd(isa, Widen(&bf16s, &mut got));
            for (h, g) in bf16s.iter().zip(&got) {
                let want = h.to_f32();
                assert!(
                    want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                    "{isa:?} bf16 {:#06x}",
                    h.to_bits()
                );
            }
            // Odd lengths go through the partial loads.
            let mut odd = vec![0f32; 13];
            run_simd(isa, Widen(&f16s[0x3c00..0x3c0d], &mut odd));
            assert_eq!(odd[0], 1.0);
            assert_eq!(odd[12], f16::from_bits(0x3c0c).to_f32());
        }
    }

    /// Unpacks every byte value at each code width, run length and slot through `load_codes`,
    /// and every e4m3 code through `load_e4m3`, against plain shifts and the e4m3 table.
    struct Unpack<'a>(&'a [u8], &'a mut Vec<(String, f32, f32)>);
    impl SimdTask for Unpack<'_> {
        type Output = ();
        fn run<S: Simd>(self) {
            let bytes = self.0;
            let mut lanes = [0f32; 16];
            for bits in [2u32, 4, 8] {
                let mut run = S::LANES;
                while run >= 1 {
                    for first_slot in 0..8 / bits {
                        let slots = 8 / bits;
                        let shift = |i: usize| ((first_slot + (i / run) as u32) % slots) * bits;
                        for start in (0..bytes.len() - S::LANES).step_by(7) {
                            unsafe {
                                let v = S::load_codes(
                                    bytes.as_ptr().add(start),
                                    run,
                                    S::code_shifts(shift),
                                    (1 << bits) - 1,
                                );
                                S::store(lanes.as_mut_ptr(), v);
                            }
                            for (i, &got) in lanes.iter().enumerate().take(S::LANES) {
                                let byte = bytes[start + i % run] as u32;
                                let want = ((byte >> shift(i)) & ((1 << bits) - 1)) as f32;
                                if got != want {
                                    self.1.push((format!("{bits}-bit run {run}"), got, want));
                                }
                            }
                        }
                    }
                    run /= 2;
                }
            }
            // Pairs: rows [0, 2 LANES) of a panel, row r at byte r % bytes_per_k, slot
            // r / bytes_per_k.
            let mut pair = [0f32; 32];
            for code in [8u32, 4, 2, CODE_E4M3] {
                for start in (0..bytes.len() - 2 * S::LANES).step_by(5) {
                    let p = unsafe { bytes.as_ptr().add(start) };
                    let [a, b] = unsafe {
                        match code {
                            8 => S::load_code_pair::<8>(p),
                            4 => S::load_code_pair::<4>(p),
                            2 => S::load_code_pair::<2>(p),
                            _ => S::load_code_pair::<CODE_E4M3>(p),
                        }
                    };
                    unsafe {
                        S::store(pair.as_mut_ptr(), a);
                        S::store(pair.as_mut_ptr().add(S::LANES), b);
                    }
                    for (row, &got) in pair.iter().enumerate().take(2 * S::LANES) {
                        let want = if code == CODE_E4M3 {
                            crate::cpu::quant::e4m3_to_f32(bytes[start + row])
                        } else {
                            let bytes_per_k = 2 * S::LANES * code as usize / 8;
                            let byte = bytes[start + row % bytes_per_k] as u32;
                            ((byte >> ((row / bytes_per_k) as u32 * code)) & ((1 << code) - 1))
                                as f32
                        };
                        if got.to_bits() != want.to_bits() && !want.is_nan() {
                            self.1.push((format!("pair {code} row {row}"), got, want));
                        }
                    }
                }
            }
            for start in (0..bytes.len() - S::LANES).step_by(S::LANES) {
                unsafe { S::store(lanes.as_mut_ptr(), S::load_e4m3(bytes.as_ptr().add(start))) };
                for (i, &got) in lanes.iter().enumerate().take(S::LANES) {
                    let code = bytes[start + i];
                    let want = crate::cpu::quant::e4m3_to_f32(code);
                    if code & 0x7f != 0x7f && got.to_bits() != want.to_bits() {
                        self.1.push((format!("e4m3 {code:#04x}"), got, want));
                    }
                }
            }
        }
    }

    #[test]
    fn code_unpacking_matches_plain_shifts_and_the_e4m3_table() {
        // Every byte value, then a scramble of them, so neighbouring lanes differ.
        let mut bytes: Vec<u8> = (0..=255).collect();
        bytes.extend((0..=255u32).map(|i| (i * 73 + 19) as u8));
        bytes.extend([0; 32]);
        for isa in isas_to_test() {
            let mut wrong = Vec::new();
            run_simd(isa, Unpack(&bytes, &mut wrong));
            assert!(
                wrong.is_empty(),
                "{isa:?}: {:?}",
                &wrong[..wrong.len().min(5)]
            );
        }
    }
}
