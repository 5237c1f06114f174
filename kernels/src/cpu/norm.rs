//! RMS normalization, plain and fused with the residual add that precedes it.
//!
//! Each group of `group` consecutive elements of a row is normalized on its own:
//! `y = x * (1 / sqrt(mean(x^2) + eps)) * w`, with `group == cols` for a plain norm and
//! `group == D` for per-head q/k norms. Sums of squares use one f32 vector accumulator per group.

use super::simd::{load_n, run_simd, store_n, Simd, SimdTask};
use super::{check_len, check_rows, for_row_chunks, runnable_isa, SharedMut};
use crate::KernelError;
use ir_types::CpuIsa;

/// Per-group RMS norm.
///
/// Shapes: `x` `[T, cols]` f32 (row stride `x_stride`), `w` `[group]` f32, `out` `[T, cols]` f32
/// (row stride `out_stride`); `cols` must be a multiple of `group`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    t: usize,
    cols: usize,
    group: usize,
    w: &[f32],
    eps: f32,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "rms_norm";
    if group == 0 || !cols.is_multiple_of(group) {
        return Err(KernelError::shape(
            NAME,
            format!("{cols} columns do not split into groups of {group}"),
        ));
    }
    check_len(NAME, "w", w.len(), group)?;
    check_rows(NAME, "x", x.len(), t, cols, x_stride)?;
    check_rows(NAME, "out", out.len(), t, cols, out_stride)?;
    let isa = runnable_isa(isa);
    let out = SharedMut(out.as_mut_ptr());
    for_row_chunks(t, cols, |begin, end| {
        let task = NormRows {
            x,
            x_stride,
            d: None,
            cols,
            group,
            w,
            eps,
            sum: None,
            out,
            out_stride,
            rows: begin..end,
        };
        run_simd(isa, task);
    });
    Ok(())
}

/// Residual add then RMS norm over whole rows: `s = x + d`, `sum_out = s`, `normed_out = rms_norm(s)`.
///
/// Shapes: `x`, `d`, `sum_out`, `normed_out` `[T, cols]` f32, each with its own row stride;
/// `w` `[cols]` f32.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    d: &[f32],
    d_stride: usize,
    t: usize,
    cols: usize,
    w: &[f32],
    eps: f32,
    sum_out: &mut [f32],
    sum_stride: usize,
    normed_out: &mut [f32],
    normed_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "add_rms_norm";
    check_len(NAME, "w", w.len(), cols)?;
    check_rows(NAME, "x", x.len(), t, cols, x_stride)?;
    check_rows(NAME, "d", d.len(), t, cols, d_stride)?;
    check_rows(NAME, "sum_out", sum_out.len(), t, cols, sum_stride)?;
    check_rows(NAME, "normed_out", normed_out.len(), t, cols, normed_stride)?;
    if cols == 0 {
        return Ok(());
    }
    let isa = runnable_isa(isa);
    let sum = SharedMut(sum_out.as_mut_ptr());
    let out = SharedMut(normed_out.as_mut_ptr());
    for_row_chunks(t, cols, |begin, end| {
        let task = NormRows {
            x,
            x_stride,
            d: Some((d, d_stride)),
            cols,
            group: cols,
            w,
            eps,
            sum: Some((sum, sum_stride)),
            out,
            out_stride: normed_stride,
            rows: begin..end,
        };
        run_simd(isa, task);
    });
    Ok(())
}

/// Rows `rows` of either kernel; with `d` set, `x + d` is normalized and also stored to `sum`.
struct NormRows<'a> {
    x: &'a [f32],
    x_stride: usize,
    d: Option<(&'a [f32], usize)>,
    cols: usize,
    group: usize,
    w: &'a [f32],
    eps: f32,
    sum: Option<(SharedMut, usize)>,
    out: SharedMut,
    out_stride: usize,
    rows: std::ops::Range<usize>,
}

impl SimdTask for NormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the entry points checked every buffer for these rows and columns; this task
        // writes only its own rows.
        unsafe {
            for row in self.rows.clone() {
                let mut src = self.x.as_ptr().add(row * self.x_stride);
                if let (Some((d, d_stride)), Some((sum, sum_stride))) = (self.d, self.sum) {
                    // Store s = x + d first; the norm then reads it back from L1.
                    let dst = sum.0.add(row * sum_stride);
                    let d_row = d.as_ptr().add(row * d_stride);
                    let mut i = 0;
                    while i < self.cols {
                        let n = (self.cols - i).min(S::LANES);
                        let s = S::add(load_n::<S>(src.add(i), n), load_n::<S>(d_row.add(i), n));
                        store_n::<S>(dst.add(i), s, n);
                        i += n;
                    }
                    src = dst;
                }
                let dst = self.out.0.add(row * self.out_stride);
                for g in (0..self.cols).step_by(self.group) {
                    norm_group::<S>(
                        src.add(g),
                        self.group,
                        self.w.as_ptr(),
                        self.eps,
                        dst.add(g),
                    );
                }
            }
        }
    }
}

#[inline(always)]
unsafe fn norm_group<S: Simd>(x: *const f32, len: usize, w: *const f32, eps: f32, out: *mut f32) {
    let mut acc = S::zero();
    let mut i = 0;
    while i < len {
        let n = (len - i).min(S::LANES);
        let v = load_n::<S>(x.add(i), n);
        acc = S::mul_add(v, v, acc);
        i += n;
    }
    let inv = 1.0 / (S::hsum(acc) / len as f32 + eps).sqrt();
    let inv = S::splat(inv);
    let mut i = 0;
    while i < len {
        let n = (len - i).min(S::LANES);
        let y = S::mul(
            S::mul(load_n::<S>(x.add(i), n), inv),
            load_n::<S>(w.add(i), n),
        );
        store_n::<S>(out.add(i), y, n);
        i += n;
    }
}

/// Scalar norms with f64 sums of squares.
pub mod reference {
    /// Same contract as [`super::rms_norm`]; panics on short buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        x: &[f32],
        x_stride: usize,
        t: usize,
        cols: usize,
        group: usize,
        w: &[f32],
        eps: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for row in 0..t {
            for g in (0..cols).step_by(group) {
                let xs = &x[row * x_stride + g..][..group];
                let ss: f64 = xs.iter().map(|&v| v as f64 * v as f64).sum();
                let inv = 1.0 / (ss / group as f64 + eps as f64).sqrt();
                for i in 0..group {
                    out[row * out_stride + g + i] = (xs[i] as f64 * inv * w[i] as f64) as f32;
                }
            }
        }
    }

    /// Same contract as [`super::add_rms_norm`]; panics on short buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        x: &[f32],
        x_stride: usize,
        d: &[f32],
        d_stride: usize,
        t: usize,
        cols: usize,
        w: &[f32],
        eps: f32,
        sum_out: &mut [f32],
        sum_stride: usize,
        normed_out: &mut [f32],
        normed_stride: usize,
    ) {
        for row in 0..t {
            for i in 0..cols {
                sum_out[row * sum_stride + i] = x[row * x_stride + i] + d[row * d_stride + i];
            }
        }
        rms_norm(
            sum_out,
            sum_stride,
            t,
            cols,
            cols,
            w,
            eps,
            normed_out,
            normed_stride,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, Rng};
    use super::*;

    #[test]
    fn rms_norm_matches_reference() {
        let mut rng = Rng::new(3);
        for isa in isas_to_test() {
            for &(t, cols, group) in &[
                (1, 1, 1),
                (3, 7, 7),
                (5, 576, 576),
                (4, 54, 18),
                (70, 640, 64),
                (2, 33, 11),
            ] {
                let stride = cols + 3;
                let x = rng.vec(t * stride, 3.0);
                let w = rng.vec(group, 1.0);
                let mut got = vec![9.0; t * stride];
                let mut want = vec![9.0; t * stride];
                rms_norm(isa, &x, stride, t, cols, group, &w, 1e-6, &mut got, stride).unwrap();
                reference::rms_norm(&x, stride, t, cols, group, &w, 1e-6, &mut want, stride);
                let diff = max_abs_diff(&got, &want);
                println!(
                    "rms_norm {isa:?} t={t} cols={cols} group={group}: max abs diff {diff:.3e}"
                );
                assert!(diff < 5e-6, "{isa:?} {cols}/{group}: {diff}");
                assert!((0..t).all(|r| got[r * stride + cols..(r + 1) * stride]
                    .iter()
                    .all(|&v| v == 9.0)));
            }
        }
    }

    #[test]
    fn rms_norm_output_has_unit_rms_per_group() {
        // With w = 1 and eps = 0 each group's mean square must be 1, whatever the input scale.
        let mut rng = Rng::new(4);
        let (cols, group) = (96, 32);
        let x = rng.vec(cols, 50.0);
        let mut y = vec![0.0; cols];
        for isa in isas_to_test() {
            rms_norm(isa, &x, cols, 1, cols, group, &[1.0; 32], 0.0, &mut y, cols).unwrap();
            for g in y.chunks(group) {
                let ms: f32 = g.iter().map(|v| v * v).sum::<f32>() / group as f32;
                assert!((ms - 1.0).abs() < 1e-5, "{isa:?}: {ms}");
            }
        }
    }

    #[test]
    fn add_rms_norm_matches_reference() {
        let mut rng = Rng::new(5);
        for isa in isas_to_test() {
            for &(t, cols) in &[(1, 1), (2, 15), (9, 576), (100, 333)] {
                let x = rng.vec(t * cols, 2.0);
                let d = rng.vec(t * (cols + 1), 2.0);
                let w = rng.vec(cols, 1.0);
                let (mut s, mut y, mut ws, mut wy) = (
                    vec![0.0; t * cols],
                    vec![0.0; t * cols],
                    vec![0.0; t * cols],
                    vec![0.0; t * cols],
                );
                add_rms_norm(
                    isa,
                    &x,
                    cols,
                    &d,
                    cols + 1,
                    t,
                    cols,
                    &w,
                    1e-5,
                    &mut s,
                    cols,
                    &mut y,
                    cols,
                )
                .unwrap();
                reference::add_rms_norm(
                    &x,
                    cols,
                    &d,
                    cols + 1,
                    t,
                    cols,
                    &w,
                    1e-5,
                    &mut ws,
                    cols,
                    &mut wy,
                    cols,
                );
                let diff = max_abs_diff(&y, &wy);
                println!("add_rms_norm {isa:?} t={t} cols={cols}: sum diff {:.3e}, normed max abs diff {diff:.3e}", max_abs_diff(&s, &ws));
                assert_eq!(s, ws, "{isa:?}: the sum is one exact f32 add");
                assert!(diff < 5e-6, "{isa:?}: {diff}");
            }
        }
    }

    #[test]
    fn rejects_groups_that_do_not_divide_the_row() {
        let x = [1.0; 10];
        let mut y = [0.0; 10];
        assert!(rms_norm(
            CpuIsa::Portable,
            &x,
            10,
            1,
            10,
            4,
            &[1.0; 4],
            1e-6,
            &mut y,
            10
        )
        .is_err());
        assert!(rms_norm(
            CpuIsa::Portable,
            &x,
            10,
            1,
            10,
            5,
            &[1.0; 4],
            1e-6,
            &mut y,
            10
        )
        .is_err());
        assert!(rms_norm(
            CpuIsa::Portable,
            &x,
            10,
            1,
            10,
            5,
            &[1.0; 5],
            1e-6,
            &mut y,
            10
        )
        .is_ok());
    }
}
