//! Elementwise kernels over `[T, cols]` f32 rows: `add`, `mul`, `silu`, and the fused MLP gate
//! `silu_mul`, which reads `[g | u]` rows (`[T, 2I]`) and writes `silu(g) * u` (`[T, I]`).
//! SiLU uses the vector `exp` of `simd` (relative error < 2e-7).

use super::simd::{self, load_n, run_simd, store_n, Simd, SimdTask};
use super::{check_rows, for_row_chunks, runnable_isa, SharedMut};
use crate::KernelError;
use ir_types::CpuIsa;

#[derive(Clone, Copy)]
enum Op {
    Add,
    Mul,
    Silu,
    /// Second operand is the same row, `cols` further on.
    SiluMul,
}

/// `out = a + b`. Shapes: `a`, `b`, `out` `[T, cols]` f32, each with its own row stride.
#[allow(clippy::too_many_arguments)]
pub fn add(
    isa: CpuIsa,
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    binary(
        "add",
        Op::Add,
        isa,
        a,
        a_stride,
        b,
        b_stride,
        t,
        cols,
        out,
        out_stride,
    )
}

/// `out = a * b`. Shapes: `a`, `b`, `out` `[T, cols]` f32, each with its own row stride.
#[allow(clippy::too_many_arguments)]
pub fn mul(
    isa: CpuIsa,
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    binary(
        "mul",
        Op::Mul,
        isa,
        a,
        a_stride,
        b,
        b_stride,
        t,
        cols,
        out,
        out_stride,
    )
}

/// `out = x * sigmoid(x)`. Shapes: `x`, `out` `[T, cols]` f32.
pub fn silu(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "silu";
    check_rows(NAME, "x", x.len(), t, cols, x_stride)?;
    check_rows(NAME, "out", out.len(), t, cols, out_stride)?;
    run(
        Op::Silu,
        isa,
        (x, x_stride),
        (x, x_stride),
        t,
        cols,
        out,
        out_stride,
    );
    Ok(())
}

/// `out = silu(g) * u` for rows `[g(0..I) | u(0..I)]`.
/// Shapes: `gu` `[T, 2I]` f32 (row stride `gu_stride`), `out` `[T, I]` f32; `cols` is I.
pub fn silu_mul(
    isa: CpuIsa,
    gu: &[f32],
    gu_stride: usize,
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "silu_mul";
    check_rows(NAME, "gu", gu.len(), t, 2 * cols, gu_stride)?;
    check_rows(NAME, "out", out.len(), t, cols, out_stride)?;
    run(
        Op::SiluMul,
        isa,
        (gu, gu_stride),
        (gu, gu_stride),
        t,
        cols,
        out,
        out_stride,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn binary(
    name: &'static str,
    op: Op,
    isa: CpuIsa,
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    check_rows(name, "a", a.len(), t, cols, a_stride)?;
    check_rows(name, "b", b.len(), t, cols, b_stride)?;
    check_rows(name, "out", out.len(), t, cols, out_stride)?;
    run(
        op,
        isa,
        (a, a_stride),
        (b, b_stride),
        t,
        cols,
        out,
        out_stride,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    op: Op,
    isa: CpuIsa,
    a: (&[f32], usize),
    b: (&[f32], usize),
    t: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let isa = runnable_isa(isa);
    let out = SharedMut(out.as_mut_ptr());
    for_row_chunks(t, cols, |begin, end| {
        run_simd(
            isa,
            Rows {
                op,
                a,
                b,
                cols,
                out,
                out_stride,
                rows: begin..end,
            },
        );
    });
}

struct Rows<'a> {
    op: Op,
    a: (&'a [f32], usize),
    b: (&'a [f32], usize),
    cols: usize,
    out: SharedMut,
    out_stride: usize,
    rows: std::ops::Range<usize>,
}

impl SimdTask for Rows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // One loop per op keeps the per-vector work free of the op match.
        // SAFETY: the entry points checked all buffers for these rows; this task owns its rows.
        unsafe {
            match self.op {
                Op::Add => self.each::<S, AddOp>(),
                Op::Mul => self.each::<S, MulOp>(),
                Op::Silu => self.each::<S, SiluOp>(),
                Op::SiluMul => self.each::<S, SiluMulOp>(),
            }
        }
    }
}

/// The per-vector function of an op. A trait rather than a closure: closure bodies are compiled
/// without the ISA's target features, which would turn every intrinsic into a call.
trait VectorOp {
    unsafe fn apply<S: Simd>(a: S::V, b: S::V) -> S::V;
}

struct AddOp;
struct MulOp;
struct SiluOp;
struct SiluMulOp;

impl VectorOp for AddOp {
    #[inline(always)]
    unsafe fn apply<S: Simd>(a: S::V, b: S::V) -> S::V {
        S::add(a, b)
    }
}

impl VectorOp for MulOp {
    #[inline(always)]
    unsafe fn apply<S: Simd>(a: S::V, b: S::V) -> S::V {
        S::mul(a, b)
    }
}

impl VectorOp for SiluOp {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V) -> S::V {
        simd::silu::<S>(x)
    }
}

impl VectorOp for SiluMulOp {
    #[inline(always)]
    unsafe fn apply<S: Simd>(g: S::V, u: S::V) -> S::V {
        S::mul(simd::silu::<S>(g), u)
    }
}

impl Rows<'_> {
    #[inline(always)]
    unsafe fn each<S: Simd, O: VectorOp>(&self) {
        let b_offset = if matches!(self.op, Op::SiluMul) {
            self.cols
        } else {
            0
        };
        for row in self.rows.clone() {
            let a = self.a.0.as_ptr().add(row * self.a.1);
            let b = self.b.0.as_ptr().add(row * self.b.1 + b_offset);
            let out = self.out.0.add(row * self.out_stride);
            let mut i = 0;
            while i < self.cols {
                let n = (self.cols - i).min(S::LANES);
                store_n::<S>(
                    out.add(i),
                    O::apply::<S>(load_n::<S>(a.add(i), n), load_n::<S>(b.add(i), n)),
                    n,
                );
                i += n;
            }
        }
    }
}

/// Scalar elementwise ops; SiLU in f64.
pub mod reference {
    fn silu64(x: f32) -> f64 {
        let x = x as f64;
        x / (1.0 + (-x).exp())
    }

    fn map2(
        a: (&[f32], usize),
        b: (&[f32], usize),
        t: usize,
        cols: usize,
        out: (&mut [f32], usize),
        f: impl Fn(f32, f32) -> f32,
    ) {
        for r in 0..t {
            for i in 0..cols {
                out.0[r * out.1 + i] = f(a.0[r * a.1 + i], b.0[r * b.1 + i]);
            }
        }
    }

    /// Same contract as [`super::add`].
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        a: &[f32],
        a_stride: usize,
        b: &[f32],
        b_stride: usize,
        t: usize,
        cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        map2(
            (a, a_stride),
            (b, b_stride),
            t,
            cols,
            (out, out_stride),
            |x, y| x + y,
        );
    }

    /// Same contract as [`super::mul`].
    #[allow(clippy::too_many_arguments)]
    pub fn mul(
        a: &[f32],
        a_stride: usize,
        b: &[f32],
        b_stride: usize,
        t: usize,
        cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        map2(
            (a, a_stride),
            (b, b_stride),
            t,
            cols,
            (out, out_stride),
            |x, y| x * y,
        );
    }

    /// Same contract as [`super::silu`].
    pub fn silu(
        x: &[f32],
        x_stride: usize,
        t: usize,
        cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        map2(
            (x, x_stride),
            (x, x_stride),
            t,
            cols,
            (out, out_stride),
            |v, _| silu64(v) as f32,
        );
    }

    /// Same contract as [`super::silu_mul`].
    pub fn silu_mul(
        gu: &[f32],
        gu_stride: usize,
        t: usize,
        cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for r in 0..t {
            for i in 0..cols {
                let (g, u) = (gu[r * gu_stride + i], gu[r * gu_stride + cols + i]);
                out[r * out_stride + i] = (silu64(g) * u as f64) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, Rng};
    use super::*;

    #[test]
    fn binary_ops_are_exact() {
        let mut rng = Rng::new(1);
        for isa in isas_to_test() {
            for &(t, cols) in &[(1, 1), (3, 13), (40, 1000)] {
                let a = rng.vec(t * (cols + 2), 10.0);
                let b = rng.vec(t * cols, 10.0);
                let mut got = vec![0.0; t * cols];
                let mut want = vec![0.0; t * cols];
                add(isa, &a, cols + 2, &b, cols, t, cols, &mut got, cols).unwrap();
                reference::add(&a, cols + 2, &b, cols, t, cols, &mut want, cols);
                assert_eq!(got, want, "{isa:?} add");
                mul(isa, &a, cols + 2, &b, cols, t, cols, &mut got, cols).unwrap();
                reference::mul(&a, cols + 2, &b, cols, t, cols, &mut want, cols);
                assert_eq!(got, want, "{isa:?} mul");
            }
        }
    }

    /// Relative error against f64, over the whole range where the result is a normal f32.
    #[test]
    fn silu_and_silu_mul_match_f64() {
        let mut rng = Rng::new(2);
        for isa in isas_to_test() {
            for &(t, cols) in &[(1, 1), (3, 19), (37, 1536)] {
                let gu = rng.vec(t * 2 * cols, 20.0);
                let mut got = vec![0.0; t * cols];
                let mut want = vec![0.0; t * cols];
                silu_mul(isa, &gu, 2 * cols, t, cols, &mut got, cols).unwrap();
                reference::silu_mul(&gu, 2 * cols, t, cols, &mut want, cols);
                let rel = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| ((g - w) / w.abs().max(1e-30)).abs())
                    .fold(0.0, f32::max);
                println!(
                    "silu_mul {isa:?} t={t} cols={cols}: max abs diff {:.3e}, max rel {rel:.3e}",
                    max_abs_diff(&got, &want)
                );
                assert!(rel < 1e-6, "{isa:?}: {rel}");
            }
            let x: Vec<f32> = (0..2001).map(|i| -80.0 + 0.08 * i as f32).collect();
            let mut got = vec![0.0; x.len()];
            let mut want = vec![0.0; x.len()];
            silu(isa, &x, x.len(), 1, x.len(), &mut got, x.len()).unwrap();
            reference::silu(&x, x.len(), 1, x.len(), &mut want, x.len());
            let rel = got
                .iter()
                .zip(&want)
                .map(|(g, w)| ((g - w) / w.abs().max(1e-30)).abs())
                .fold(0.0, f32::max);
            println!(
                "silu {isa:?} over [-80, 80]: max abs diff {:.3e}, max rel {rel:.3e}",
                max_abs_diff(&got, &want)
            );
            assert!(rel < 1e-6, "{isa:?}: {rel}");
        }
    }

    #[test]
    fn rejects_a_gate_row_too_short_for_its_up_half() {
        let gu = [0.0; 10];
        let mut out = [0.0; 6];
        assert!(silu_mul(CpuIsa::Portable, &gu, 10, 1, 6, &mut out, 6).is_err());
        assert!(silu_mul(CpuIsa::Portable, &gu, 10, 1, 5, &mut out, 5).is_ok());
    }
}
