//! Rotary position embedding in the rotate-half layout (the Hugging Face one): in each head the
//! first and second halves of the D elements form the pairs `(x[i], x[i + D/2])`, rotated by the
//! angle of table column `i` at the token's position.

use super::simd::{load_n, run_simd, store_n, Simd, SimdTask};
use super::{check_len, check_rows, for_row_chunks, runnable_isa, SharedMut};
use crate::KernelError;
use ir_types::CpuIsa;

/// `out[i] = x[i] c - x[i + D/2] s`, `out[i + D/2] = x[i + D/2] c + x[i] s` per head, with
/// `c = cos[pos * table_stride + i]`, `s = sin[...]` for `i < D/2`.
///
/// Shapes: `x`, `out` `[T, H*D]` f32 with row strides; `positions` `[T]`; `cos`, `sin`
/// `[max position + 1, table_stride]` f32 with `table_stride >= D/2` (normally equal).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    t: usize,
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    table_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "rope";
    if !head_dim.is_multiple_of(2) {
        return Err(KernelError::shape(
            NAME,
            format!("head_dim {head_dim} is odd"),
        ));
    }
    let half = head_dim / 2;
    if table_stride < half {
        return Err(KernelError::shape(
            NAME,
            format!("table_stride {table_stride} < head_dim / 2 = {half}"),
        ));
    }
    let cols = n_heads * head_dim;
    check_rows(NAME, "x", x.len(), t, cols, x_stride)?;
    check_rows(NAME, "out", out.len(), t, cols, out_stride)?;
    check_len(NAME, "positions", positions.len(), t)?;
    if let Some(&max_pos) = positions[..t].iter().max() {
        let need = max_pos as usize * table_stride + half;
        check_len(NAME, "cos", cos.len(), need)?;
        check_len(NAME, "sin", sin.len(), need)?;
    }
    let isa = runnable_isa(isa);
    let out = SharedMut(out.as_mut_ptr());
    for_row_chunks(t, cols, |begin, end| {
        let task = RopeRows {
            x,
            x_stride,
            n_heads,
            half,
            positions,
            cos,
            sin,
            table_stride,
            out,
            out_stride,
            rows: begin..end,
        };
        run_simd(isa, task);
    });
    Ok(())
}

struct RopeRows<'a> {
    x: &'a [f32],
    x_stride: usize,
    n_heads: usize,
    half: usize,
    positions: &'a [u32],
    cos: &'a [f32],
    sin: &'a [f32],
    table_stride: usize,
    out: SharedMut,
    out_stride: usize,
    rows: std::ops::Range<usize>,
}

impl SimdTask for RopeRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let half = self.half;
        // SAFETY: `rope` checked x, out and both tables for these rows and positions.
        unsafe {
            for row in self.rows.clone() {
                let pos = self.positions[row] as usize;
                let cos = self.cos.as_ptr().add(pos * self.table_stride);
                let sin = self.sin.as_ptr().add(pos * self.table_stride);
                for h in 0..self.n_heads {
                    let x = self.x.as_ptr().add(row * self.x_stride + h * 2 * half);
                    let out = self.out.0.add(row * self.out_stride + h * 2 * half);
                    let mut i = 0;
                    while i < half {
                        let n = (half - i).min(S::LANES);
                        let (c, s) = (load_n::<S>(cos.add(i), n), load_n::<S>(sin.add(i), n));
                        let (lo, hi) = (load_n::<S>(x.add(i), n), load_n::<S>(x.add(half + i), n));
                        store_n::<S>(out.add(i), S::sub(S::mul(lo, c), S::mul(hi, s)), n);
                        store_n::<S>(out.add(half + i), S::add(S::mul(hi, c), S::mul(lo, s)), n);
                        i += n;
                    }
                }
            }
        }
    }
}

/// Scalar rope in f64.
pub mod reference {
    /// Same contract as [`super::rope`]; panics on short buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        x: &[f32],
        x_stride: usize,
        t: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        cos: &[f32],
        sin: &[f32],
        table_stride: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let half = head_dim / 2;
        for row in 0..t {
            let p = positions[row] as usize * table_stride;
            for h in 0..n_heads {
                let base = h * head_dim;
                for i in 0..half {
                    let (c, s) = (cos[p + i] as f64, sin[p + i] as f64);
                    let lo = x[row * x_stride + base + i] as f64;
                    let hi = x[row * x_stride + base + half + i] as f64;
                    out[row * out_stride + base + i] = (lo * c - hi * s) as f32;
                    out[row * out_stride + base + half + i] = (hi * c + lo * s) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, Rng};
    use super::*;

    fn tables(max_pos: usize, half: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..=max_pos {
            for i in 0..half {
                let angle = p as f64 / theta.powf(2.0 * i as f64 / (2 * half) as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    #[test]
    fn matches_reference() {
        let mut rng = Rng::new(8);
        for isa in isas_to_test() {
            for &(t, heads, d) in &[(1, 1, 2), (3, 9, 64), (5, 3, 18), (40, 2, 34), (600, 9, 64)] {
                let positions: Vec<u32> = (0..t).map(|_| rng.below(300) as u32).collect();
                let (cos, sin) = tables(300, d / 2, 10000.0);
                let stride = heads * d + 7;
                let x = rng.vec(t * stride, 2.0);
                let mut got = vec![0.0; t * stride];
                let mut want = vec![0.0; t * stride];
                rope(
                    isa,
                    &x,
                    stride,
                    t,
                    heads,
                    d,
                    &positions,
                    &cos,
                    &sin,
                    d / 2,
                    &mut got,
                    stride,
                )
                .unwrap();
                reference::rope(
                    &x,
                    stride,
                    t,
                    heads,
                    d,
                    &positions,
                    &cos,
                    &sin,
                    d / 2,
                    &mut want,
                    stride,
                );
                let diff = max_abs_diff(&got, &want);
                println!("rope {isa:?} t={t} heads={heads} d={d}: max abs diff {diff:.3e}");
                assert!(diff < 1e-6, "{isa:?}: {diff}");
            }
        }
    }

    #[test]
    fn position_zero_is_identity_and_rotation_keeps_pair_norms() {
        let mut rng = Rng::new(9);
        let (heads, d) = (2, 10);
        let (cos, sin) = tables(50, d / 2, 10000.0);
        let x = rng.vec(2 * heads * d, 1.0);
        for isa in isas_to_test() {
            let mut y = vec![0.0; x.len()];
            rope(
                isa,
                &x,
                heads * d,
                2,
                heads,
                d,
                &[0, 37],
                &cos,
                &sin,
                d / 2,
                &mut y,
                heads * d,
            )
            .unwrap();
            assert_eq!(y[..heads * d], x[..heads * d], "{isa:?}");
            let (xr, yr) = (&x[heads * d..], &y[heads * d..]);
            for h in 0..heads {
                for i in 0..d / 2 {
                    let (a, b) = (h * d + i, h * d + d / 2 + i);
                    let before = xr[a].hypot(xr[b]);
                    let after = yr[a].hypot(yr[b]);
                    assert!((before - after).abs() < 1e-6, "{isa:?}");
                }
            }
            assert_ne!(yr, xr);
        }
    }

    #[test]
    fn rejects_positions_past_the_table() {
        let (cos, sin) = tables(3, 2, 10000.0);
        let x = [0.0; 4];
        let mut y = [0.0; 4];
        assert!(rope(
            CpuIsa::Portable,
            &x,
            4,
            1,
            1,
            4,
            &[4],
            &cos,
            &sin,
            2,
            &mut y,
            4
        )
        .is_err());
        assert!(rope(
            CpuIsa::Portable,
            &x,
            4,
            1,
            1,
            4,
            &[3],
            &cos,
            &sin,
            2,
            &mut y,
            4
        )
        .is_ok());
    }
}
