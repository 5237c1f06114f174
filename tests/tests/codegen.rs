//! Ahead-of-time generated CPU kernels end to end: `compiler::codegen` generates machine code,
//! `runtime::code` maps it executable, and the functions are called through the
//! `artifacts::code_abi` types on real buffers. Results are checked against f64 references
//! written here and against the library kernels of `kernels::cpu`.
//!
//! Buffers carry padding between rows (strides wider than the rows) filled with a sentinel, so a
//! kernel that writes past its columns or ignores a stride fails. On a CPU without AVX2 the tests
//! that run code say so and return; generation itself is checked everywhere.

use artifacts::code_abi::{AddRmsNormFn, RmsNormFn, RopeFn, SiluMulFn, ENTRY_ALIGN};
use compiler::codegen::{generate, symbol_name, CodegenError, GeneratedCode, KernelSpec};
use ir::CpuIsa;
use runtime::code::CodeImage;

/// Generated code and the library both round in f32; the f64 reference does not.
const TOLERANCE: f64 = 1e-5;
/// What padding between rows holds; a kernel writing there shows up as a changed sentinel.
const SENTINEL: f32 = -12345.0;
const ROW_COUNTS: [usize; 3] = [1, 3, 17];

/// ISA levels this CPU can run generated code for, or `None` (after saying so) when it has none.
fn runnable_isas() -> Option<Vec<CpuIsa>> {
    let isas = match CpuIsa::detect() {
        CpuIsa::Portable => vec![],
        CpuIsa::Avx2 => vec![CpuIsa::Avx2],
        CpuIsa::Avx512 => vec![CpuIsa::Avx2, CpuIsa::Avx512],
    };
    if isas.is_empty() {
        println!("skipped: CPU lacks AVX2");
        return None;
    }
    Some(isas)
}

/// Small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `len` values uniform in `[-scale, scale)`.
    fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| (self.uniform() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// `rows` rows of `cols` random values, `stride` apart, padding set to the sentinel.
    fn rows(&mut self, rows: usize, cols: usize, stride: usize, scale: f32) -> Vec<f32> {
        let mut data = vec![SENTINEL; rows * stride];
        for row in data.chunks_mut(stride) {
            row[..cols].copy_from_slice(&self.values(cols, scale));
        }
        data
    }
}

/// A matrix of expected values: one f64 per element plus the magnitude its error is measured
/// against (the largest term that went into it, so cancellation in RoPE is judged fairly).
struct Expected {
    values: Vec<f64>,
    scales: Vec<f64>,
}

impl Expected {
    fn new(len: usize) -> Expected {
        Expected {
            values: vec![0.0; len],
            scales: vec![0.0; len],
        }
    }

    fn set(&mut self, index: usize, value: f64, scale: f64) {
        self.values[index] = value;
        self.scales[index] = scale.max(value.abs());
    }
}

/// Largest absolute and scaled errors of `got` (rows of `cols` at `stride`) against `want`
/// (dense rows of `cols`); panics naming `what` when an element is off by more than
/// [`TOLERANCE`] or padding was touched.
fn check(what: &str, got: &[f32], stride: usize, cols: usize, want: &Expected) -> (f64, f64) {
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    for (row, got_row) in got.chunks(stride).enumerate() {
        for (col, &value) in got_row.iter().enumerate() {
            if col >= cols {
                assert_eq!(
                    value, SENTINEL,
                    "{what}: row {row} padding {col} overwritten"
                );
                continue;
            }
            let index = row * cols + col;
            let (expected, scale) = (want.values[index], want.scales[index]);
            let abs = (value as f64 - expected).abs();
            let rel = abs / scale.max(f64::MIN_POSITIVE);
            assert!(
                rel <= TOLERANCE || abs <= TOLERANCE * 1e-6,
                "{what}: row {row} col {col}: got {value}, want {expected} (rel {rel:.2e})"
            );
            max_abs = max_abs.max(abs);
            max_rel = max_rel.max(rel);
        }
    }
    (max_abs, max_rel)
}

fn report(what: &str, (abs, rel): (f64, f64)) {
    println!("{what:<64} max abs {abs:.2e}  max rel {rel:.2e}");
}

/// Several generated functions mapped as one code section, as a plan lays them out.
struct Section {
    image: CodeImage,
    offsets: Vec<usize>,
}

impl Section {
    fn build(codes: &[GeneratedCode]) -> Section {
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for code in codes {
            offsets.push(bytes.len());
            bytes.extend_from_slice(&code.bytes);
            // int3 padding: a stray jump past a function traps instead of running its neighbour.
            bytes.resize(bytes.len().next_multiple_of(ENTRY_ALIGN), 0xCC);
        }
        let image = CodeImage::load(&bytes).expect("map code section");
        Section { image, offsets }
    }

    /// # Safety
    /// Function `index` must have been generated with the ABI of `F`.
    unsafe fn function<F: Copy>(&self, index: usize) -> F {
        unsafe { self.image.entry(self.offsets[index]) }.expect("entry")
    }
}

fn generate_one(spec: KernelSpec, isa: CpuIsa) -> Section {
    let code = generate(&spec, isa).unwrap_or_else(|e| panic!("{spec} on {isa:?}: {e}"));
    assert!(!code.bytes.is_empty(), "{spec}: empty code");
    Section::build(&[code])
}

// ---- references ---------------------------------------------------------------------------------

fn reference_rms_norm(
    x: &[f32],
    stride: usize,
    rows: usize,
    cols: usize,
    group: usize,
    w: &[f32],
    eps: f32,
) -> Expected {
    let mut want = Expected::new(rows * cols);
    for row in 0..rows {
        for start in (0..cols).step_by(group) {
            let values = &x[row * stride + start..][..group];
            let mean_square =
                values.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / group as f64;
            let inv_rms = 1.0 / (mean_square + eps as f64).sqrt();
            for (j, &v) in values.iter().enumerate() {
                let y = v as f64 * inv_rms * w[j] as f64;
                want.set(row * cols + start + j, y, 0.0);
            }
        }
    }
    want
}

fn reference_silu_mul(gu: &[f32], stride: usize, rows: usize, cols: usize) -> Expected {
    let mut want = Expected::new(rows * cols);
    for row in 0..rows {
        for j in 0..cols {
            let g = gu[row * stride + j] as f64;
            let u = gu[row * stride + cols + j] as f64;
            want.set(row * cols + j, g * u / (1.0 + (-g).exp()), 0.0);
        }
    }
    want
}

struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl RopeTables {
    /// Llama-style tables with base 10000 for `positions` positions.
    fn new(head_dim: usize, positions: usize) -> RopeTables {
        let half = head_dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..positions {
            for i in 0..half {
                let inv_freq = 10000f64.powf(-((2 * i) as f64) / head_dim as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTables {
            cos,
            sin,
            positions,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn reference_rope(
    x: &[f32],
    stride: usize,
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    tables: &RopeTables,
) -> Expected {
    let half = head_dim / 2;
    let cols = n_heads * head_dim;
    let mut want = Expected::new(rows * cols);
    for (row, &position) in positions.iter().enumerate().take(rows) {
        let table = position as usize * half;
        for head in 0..n_heads {
            let base = row * stride + head * head_dim;
            for i in 0..half {
                let (c, s) = (tables.cos[table + i] as f64, tables.sin[table + i] as f64);
                let (a, b) = (x[base + i] as f64, x[base + half + i] as f64);
                let out = row * cols + head * head_dim;
                want.set(out + i, a * c - b * s, (a * c).abs() + (b * s).abs());
                want.set(out + half + i, b * c + a * s, (b * c).abs() + (a * s).abs());
            }
        }
    }
    want
}

// ---- kernels ------------------------------------------------------------------------------------

/// (cols, group, eps): plain norms of SmolLM2's width, tiny and odd widths, and per-head norms.
const RMS_NORM_CASES: [(usize, usize, f32); 8] = [
    (576, 576, 1e-5),
    (64, 64, 1e-6),
    (7, 7, 1e-5),
    (1536, 1536, 1e-5),
    (576, 64, 1e-6),
    (64, 32, 1e-6),
    (1536, 64, 1e-5),
    (14, 7, 1e-5),
];

#[test]
fn rms_norm_matches_references() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for isa in isas {
        for (cols, group, eps) in RMS_NORM_CASES {
            let spec = KernelSpec::RmsNorm { cols, group, eps };
            let section = generate_one(spec, isa);
            // SAFETY: the section's only function was generated for `RmsNormFn`.
            let function: RmsNormFn = unsafe { section.function(0) };
            for rows in ROW_COUNTS {
                let (x_stride, out_stride) = (cols + 5, cols + 3);
                let x = rng.rows(rows, cols, x_stride, 3.0);
                let w = rng.values(group, 1.5);
                let mut out = vec![SENTINEL; rows * out_stride];
                // SAFETY: buffers hold `rows` rows at their strides; shapes match the spec.
                unsafe {
                    function(
                        x.as_ptr(),
                        x_stride as u64,
                        w.as_ptr(),
                        out.as_mut_ptr(),
                        out_stride as u64,
                        rows as u64,
                        cols as u64,
                        group as u64,
                        eps,
                    )
                };
                let want = reference_rms_norm(&x, x_stride, rows, cols, group, &w, eps);
                let what = format!("{spec} rows={rows} {isa:?}");
                report(&what, check(&what, &out, out_stride, cols, &want));

                let mut library = vec![SENTINEL; rows * out_stride];
                kernels::cpu::rms_norm(
                    isa,
                    &x,
                    x_stride,
                    rows,
                    cols,
                    group,
                    &w,
                    eps,
                    &mut library,
                    out_stride,
                )
                .expect("library rms_norm");
                let both = format!("{what} vs library");
                check(
                    &both,
                    &out,
                    out_stride,
                    cols,
                    &as_expected(&library, out_stride, cols, &want),
                );
            }
        }
    }
}

#[test]
fn rms_norm_in_place_matches_out_of_place() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(77);
    for isa in isas {
        let (rows, cols, group, eps) = (5, 576, 64, 1e-6);
        let spec = KernelSpec::RmsNorm { cols, group, eps };
        let section = generate_one(spec, isa);
        // SAFETY: generated for `RmsNormFn`.
        let function: RmsNormFn = unsafe { section.function(0) };
        let x = rng.rows(rows, cols, cols, 2.0);
        let w = rng.values(group, 1.0);
        let mut in_place = x.clone();
        let pointer = in_place.as_mut_ptr();
        // SAFETY: the ABI allows `out == x`; the buffer holds `rows` rows of `cols`.
        unsafe {
            function(
                pointer,
                cols as u64,
                w.as_ptr(),
                pointer,
                cols as u64,
                rows as u64,
                cols as u64,
                group as u64,
                eps,
            )
        };
        let want = reference_rms_norm(&x, cols, rows, cols, group, &w, eps);
        let what = format!("{spec} in place {isa:?}");
        report(&what, check(&what, &in_place, cols, cols, &want));
    }
}

#[test]
fn add_rms_norm_matches_references() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for isa in isas {
        for cols in [576, 64, 7, 1536] {
            let eps = 1e-5;
            let spec = KernelSpec::AddRmsNorm { cols, eps };
            let section = generate_one(spec, isa);
            // SAFETY: generated for `AddRmsNormFn`.
            let function: AddRmsNormFn = unsafe { section.function(0) };
            for rows in ROW_COUNTS {
                let strides = [cols + 1, cols + 2, cols + 3, cols + 4];
                let [x_stride, d_stride, sum_stride, normed_stride] = strides;
                let x = rng.rows(rows, cols, x_stride, 2.0);
                let d = rng.rows(rows, cols, d_stride, 2.0);
                let w = rng.values(cols, 1.5);
                let mut sum = vec![SENTINEL; rows * sum_stride];
                let mut normed = vec![SENTINEL; rows * normed_stride];
                // SAFETY: buffers hold `rows` rows at their strides; shapes match the spec.
                unsafe {
                    function(
                        x.as_ptr(),
                        x_stride as u64,
                        d.as_ptr(),
                        d_stride as u64,
                        w.as_ptr(),
                        sum.as_mut_ptr(),
                        sum_stride as u64,
                        normed.as_mut_ptr(),
                        normed_stride as u64,
                        rows as u64,
                        cols as u64,
                        eps,
                    )
                };
                // The reference sums in f32 exactly as the ABI says (`s = x + d` is an f32).
                let mut s = vec![0.0f32; rows * cols];
                let mut want_sum = Expected::new(rows * cols);
                for row in 0..rows {
                    for j in 0..cols {
                        let value = x[row * x_stride + j] + d[row * d_stride + j];
                        s[row * cols + j] = value;
                        want_sum.set(row * cols + j, value as f64, 0.0);
                    }
                }
                let want_normed = reference_rms_norm(&s, cols, rows, cols, cols, &w, eps);
                let what = format!("{spec} rows={rows} {isa:?}");
                check(&format!("{what} sum"), &sum, sum_stride, cols, &want_sum);
                let normed_what = format!("{what} normed");
                report(
                    &normed_what,
                    check(&normed_what, &normed, normed_stride, cols, &want_normed),
                );

                let mut library_sum = vec![SENTINEL; rows * sum_stride];
                let mut library_normed = vec![SENTINEL; rows * normed_stride];
                kernels::cpu::add_rms_norm(
                    isa,
                    &x,
                    x_stride,
                    &d,
                    d_stride,
                    rows,
                    cols,
                    &w,
                    eps,
                    &mut library_sum,
                    sum_stride,
                    &mut library_normed,
                    normed_stride,
                )
                .expect("library add_rms_norm");
                let library = as_expected(&library_normed, normed_stride, cols, &want_normed);
                check(
                    &format!("{what} vs library"),
                    &normed,
                    normed_stride,
                    cols,
                    &library,
                );
                assert_eq!(sum, library_sum, "{what}: sums differ from the library");
            }
        }
    }
}

#[test]
fn add_rms_norm_updates_the_residual_in_place() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(31337);
    for isa in isas {
        let (rows, cols, eps) = (3, 576, 1e-5);
        let spec = KernelSpec::AddRmsNorm { cols, eps };
        let section = generate_one(spec, isa);
        // SAFETY: generated for `AddRmsNormFn`.
        let function: AddRmsNormFn = unsafe { section.function(0) };
        let x = rng.rows(rows, cols, cols, 2.0);
        let d = rng.rows(rows, cols, cols, 2.0);
        let w = rng.values(cols, 1.0);
        let mut residual = x.clone();
        let mut normed = vec![0.0f32; rows * cols];
        let pointer = residual.as_mut_ptr();
        // SAFETY: the ABI allows `sum_out == x`; every buffer holds `rows` rows of `cols`.
        unsafe {
            function(
                pointer,
                cols as u64,
                d.as_ptr(),
                cols as u64,
                w.as_ptr(),
                pointer,
                cols as u64,
                normed.as_mut_ptr(),
                cols as u64,
                rows as u64,
                cols as u64,
                eps,
            )
        };
        let sums: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
        assert_eq!(residual, sums, "{spec} {isa:?}: residual");
        let want = reference_rms_norm(&sums, cols, rows, cols, cols, &w, eps);
        let what = format!("{spec} in place {isa:?}");
        report(&what, check(&what, &normed, cols, cols, &want));
    }
}

#[test]
fn silu_mul_matches_references() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for isa in isas {
        for cols in [576, 64, 7, 1536] {
            let spec = KernelSpec::SiluMul { cols };
            let section = generate_one(spec, isa);
            // SAFETY: generated for `SiluMulFn`.
            let function: SiluMulFn = unsafe { section.function(0) };
            for rows in ROW_COUNTS {
                let (gu_stride, out_stride) = (2 * cols + 3, cols + 2);
                // Gate values span the whole useful range of the sigmoid and beyond.
                let gu = rng.rows(rows, 2 * cols, gu_stride, 12.0);
                let mut out = vec![SENTINEL; rows * out_stride];
                // SAFETY: buffers hold `rows` rows at their strides; shapes match the spec.
                unsafe {
                    function(
                        gu.as_ptr(),
                        gu_stride as u64,
                        out.as_mut_ptr(),
                        out_stride as u64,
                        rows as u64,
                        cols as u64,
                    )
                };
                let want = reference_silu_mul(&gu, gu_stride, rows, cols);
                let what = format!("{spec} rows={rows} {isa:?}");
                report(&what, check(&what, &out, out_stride, cols, &want));

                let mut library = vec![SENTINEL; rows * out_stride];
                kernels::cpu::silu_mul(isa, &gu, gu_stride, rows, cols, &mut library, out_stride)
                    .expect("library silu_mul");
                let both = format!("{what} vs library");
                check(
                    &both,
                    &out,
                    out_stride,
                    cols,
                    &as_expected(&library, out_stride, cols, &want),
                );
            }
        }
    }
}

/// The built-in `exp` over its whole clamped range, seen through `silu(g) = g / (1 + e^-g)`
/// with `u = 1`: relative error below 1e-6 against f64, including where `sigmoid(g)` is tiny.
#[test]
fn silu_exp_is_accurate_across_its_range() {
    let Some(isas) = runnable_isas() else { return };
    let cols = 4099;
    let gates: Vec<f32> = (0..cols)
        .map(|i| -87.0 + 174.0 * i as f32 / (cols - 1) as f32)
        .collect();
    let mut gu = gates.clone();
    gu.extend(std::iter::repeat_n(1.0f32, cols));
    for isa in isas {
        let spec = KernelSpec::SiluMul { cols };
        let section = generate_one(spec, isa);
        // SAFETY: generated for `SiluMulFn`.
        let function: SiluMulFn = unsafe { section.function(0) };
        let mut out = vec![0.0f32; cols];
        // SAFETY: one row of `2 * cols` in, one row of `cols` out.
        unsafe {
            function(
                gu.as_ptr(),
                (2 * cols) as u64,
                out.as_mut_ptr(),
                cols as u64,
                1,
                cols as u64,
            )
        };
        let mut worst = (0.0f64, 0.0f32);
        for (&g, &got) in gates.iter().zip(&out) {
            let g64 = g as f64;
            let want = g64 / (1.0 + (-g64).exp());
            let rel = (got as f64 - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            if rel > worst.0 {
                worst = (rel, g);
            }
        }
        println!(
            "exp through silu {isa:?}: max rel {:.2e} at g = {}",
            worst.0, worst.1
        );
        assert!(
            worst.0 < 1e-6,
            "{isa:?}: relative error {:.2e} at g = {}",
            worst.0,
            worst.1
        );
    }
}

#[test]
fn rope_matches_references() {
    let Some(isas) = runnable_isas() else { return };
    let mut rng = Rng(0xA076_1D64_78BD_642F);
    // (n_heads, head_dim): SmolLM2's query heads, a small head, and a head with a scalar tail.
    for isa in isas {
        for (n_heads, head_dim) in [(9, 64), (4, 16), (3, 64), (2, 6)] {
            let spec = KernelSpec::Rope { n_heads, head_dim };
            let section = generate_one(spec, isa);
            // SAFETY: generated for `RopeFn`.
            let function: RopeFn = unsafe { section.function(0) };
            let tables = RopeTables::new(head_dim, 300);
            for rows in ROW_COUNTS {
                let cols = n_heads * head_dim;
                let (x_stride, out_stride) = (cols + 7, cols + 1);
                let x = rng.rows(rows, cols, x_stride, 4.0);
                let positions: Vec<u32> = (0..rows)
                    .map(|_| (rng.uniform() * tables.positions as f32) as u32)
                    .collect();
                let mut out = vec![SENTINEL; rows * out_stride];
                // SAFETY: buffers hold `rows` rows at their strides; every position is inside
                // the tables.
                unsafe {
                    function(
                        x.as_ptr(),
                        x_stride as u64,
                        out.as_mut_ptr(),
                        out_stride as u64,
                        rows as u64,
                        n_heads as u64,
                        head_dim as u64,
                        positions.as_ptr(),
                        tables.cos.as_ptr(),
                        tables.sin.as_ptr(),
                    )
                };
                let want =
                    reference_rope(&x, x_stride, rows, n_heads, head_dim, &positions, &tables);
                let what = format!("{spec} rows={rows} {isa:?}");
                report(&what, check(&what, &out, out_stride, cols, &want));

                let mut library = vec![SENTINEL; rows * out_stride];
                kernels::cpu::rope(
                    isa,
                    &x,
                    x_stride,
                    rows,
                    n_heads,
                    head_dim,
                    &positions,
                    &tables.cos,
                    &tables.sin,
                    head_dim / 2,
                    &mut library,
                    out_stride,
                )
                .expect("library rope");
                let both = format!("{what} vs library");
                check(
                    &both,
                    &out,
                    out_stride,
                    cols,
                    &as_expected(&library, out_stride, cols, &want),
                );
            }
        }
    }
}

/// Library output as the thing to match, keeping the reference's error scales.
fn as_expected(library: &[f32], stride: usize, cols: usize, reference: &Expected) -> Expected {
    let mut expected = Expected::new(reference.values.len());
    for (index, scale) in reference.scales.iter().enumerate() {
        let value = library[index / cols * stride + index % cols] as f64;
        expected.values[index] = value;
        expected.scales[index] = *scale;
    }
    expected
}

/// Zero rows is a valid call (an empty chunk) and must touch nothing.
#[test]
fn zero_rows_write_nothing() {
    let Some(isas) = runnable_isas() else { return };
    for isa in isas {
        let specs = [
            KernelSpec::RmsNorm {
                cols: 64,
                group: 64,
                eps: 1e-5,
            },
            KernelSpec::SiluMul { cols: 64 },
        ];
        let section = Section::build(&specs.map(|spec| generate(&spec, isa).expect("generate")));
        let input = vec![1.0f32; 128];
        let weights = vec![1.0f32; 64];
        let mut out = vec![SENTINEL; 64];
        // SAFETY: function 0 is `RmsNormFn`, function 1 `SiluMulFn`; with zero rows no buffer
        // is read or written.
        unsafe {
            let rms_norm: RmsNormFn = section.function(0);
            rms_norm(
                input.as_ptr(),
                64,
                weights.as_ptr(),
                out.as_mut_ptr(),
                64,
                0,
                64,
                64,
                1e-5,
            );
            let silu_mul: SiluMulFn = section.function(1);
            silu_mul(input.as_ptr(), 128, out.as_mut_ptr(), 64, 0, 64);
        }
        assert!(
            out.iter().all(|&v| v == SENTINEL),
            "{isa:?}: zero rows wrote output"
        );
    }
}

// ---- generation ---------------------------------------------------------------------------------

fn all_specs() -> Vec<KernelSpec> {
    let mut specs: Vec<KernelSpec> = RMS_NORM_CASES
        .iter()
        .map(|&(cols, group, eps)| KernelSpec::RmsNorm { cols, group, eps })
        .collect();
    for cols in [576, 64, 7, 1536] {
        specs.push(KernelSpec::AddRmsNorm { cols, eps: 1e-5 });
        specs.push(KernelSpec::SiluMul { cols });
    }
    specs.push(KernelSpec::Rope {
        n_heads: 9,
        head_dim: 64,
    });
    specs.push(KernelSpec::Rope {
        n_heads: 4,
        head_dim: 16,
    });
    specs
}

#[test]
fn generation_is_deterministic_and_specific() {
    for isa in [CpuIsa::Avx2, CpuIsa::Avx512] {
        let mut seen: Vec<(KernelSpec, Vec<u8>)> = Vec::new();
        for spec in all_specs() {
            let first = generate(&spec, isa).expect("generate");
            let second = generate(&spec, isa).expect("generate again");
            assert_eq!(
                first, second,
                "{spec} on {isa:?}: bytes differ between runs"
            );
            assert!(
                first.bytes.len() >= 16,
                "{spec} on {isa:?}: only {} bytes",
                first.bytes.len()
            );
            if let Some((other, _)) = seen.iter().find(|(_, bytes)| *bytes == first.bytes) {
                panic!("{spec} and {other} on {isa:?} generated identical code");
            }
            seen.push((spec, first.bytes));
        }
    }
}

#[test]
fn portable_is_unsupported() {
    for spec in all_specs() {
        let result = generate(&spec, CpuIsa::Portable);
        assert!(
            matches!(
                result,
                Err(CodegenError::Unsupported {
                    isa: CpuIsa::Portable
                })
            ),
            "{spec}: {result:?}"
        );
    }
}

#[test]
fn invalid_specs_are_refused() {
    let cases = [
        KernelSpec::RmsNorm {
            cols: 576,
            group: 100,
            eps: 1e-5,
        },
        KernelSpec::RmsNorm {
            cols: 64,
            group: 0,
            eps: 1e-5,
        },
        KernelSpec::RmsNorm {
            cols: 0,
            group: 0,
            eps: 1e-5,
        },
        KernelSpec::RmsNorm {
            cols: 64,
            group: 64,
            eps: f32::NAN,
        },
        KernelSpec::RmsNorm {
            cols: 64,
            group: 64,
            eps: -1.0,
        },
        KernelSpec::AddRmsNorm { cols: 0, eps: 1e-5 },
        KernelSpec::AddRmsNorm {
            cols: 64,
            eps: f32::INFINITY,
        },
        KernelSpec::AddRmsNorm {
            cols: usize::MAX,
            eps: 1e-5,
        },
        KernelSpec::SiluMul { cols: 0 },
        KernelSpec::SiluMul {
            cols: usize::MAX / 2 + 1,
        },
        KernelSpec::Rope {
            n_heads: 9,
            head_dim: 63,
        },
        KernelSpec::Rope {
            n_heads: 0,
            head_dim: 64,
        },
        KernelSpec::Rope {
            n_heads: 9,
            head_dim: 0,
        },
        KernelSpec::Rope {
            n_heads: usize::MAX,
            head_dim: 64,
        },
    ];
    for spec in cases {
        let result = generate(&spec, CpuIsa::Avx2);
        assert!(
            matches!(result, Err(CodegenError::InvalidSpec { .. })),
            "{spec:?}: {result:?}"
        );
    }
}

#[test]
fn symbol_names_carry_kind_shape_and_isa() {
    let cases = [
        (
            KernelSpec::AddRmsNorm {
                cols: 576,
                eps: 1e-5,
            },
            CpuIsa::Avx512,
            "add_rms_norm_576_gen_avx512",
        ),
        (
            KernelSpec::RmsNorm {
                cols: 576,
                group: 576,
                eps: 1e-5,
            },
            CpuIsa::Avx2,
            "rms_norm_576_gen_avx2",
        ),
        (
            KernelSpec::RmsNorm {
                cols: 576,
                group: 64,
                eps: 1e-5,
            },
            CpuIsa::Avx2,
            "rms_norm_576_g64_gen_avx2",
        ),
        (
            KernelSpec::SiluMul { cols: 1536 },
            CpuIsa::Avx2,
            "silu_mul_1536_gen_avx2",
        ),
        (
            KernelSpec::Rope {
                n_heads: 9,
                head_dim: 64,
            },
            CpuIsa::Avx512,
            "rope_9x64_gen_avx512",
        ),
    ];
    for (spec, isa, want) in cases {
        assert_eq!(symbol_name(&spec, isa), want);
    }
}
