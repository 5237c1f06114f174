//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", 2022): quantizes a weight `W` `[N, K]` column by column, spreading each
//! column's rounding error over the columns not yet quantized so that the layer's output on the
//! calibration inputs changes least.
//!
//! With `H = 2 X^T X` the Hessian of the layer's squared output error over the calibration inputs
//! `X` (`[tokens, K]`; the factor 2 cancels, so the Gram matrix is used as it is), dampened by 1%
//! of its mean diagonal, and `U` the upper Cholesky factor of `H^-1`: column `i` is rounded to
//! the grid, its error `e = (w_i - q_i) / U[i][i]` is subtracted from the later columns as
//! `w_j -= e U[i][j]` (within a block of columns at once, from the later blocks after each block:
//! the paper's lazy batch updates). Columns go in their natural order and a group takes its
//! scale and minimum from its weights as they stand, error updates included, when its first
//! column comes up (the paper's "static groups" with act-order off), so the packed layout is the
//! same as round-to-nearest's. Per-channel groups (fp8's default) take theirs from the original
//! row. The grid is any of the formats (`quantize::round_to_grid`), so the same loop serves
//! int8/int4/int2 groups, symmetric or not, and e4m3.
//!
//! `U` is found without forming `H^-1`: with `J` the reversal permutation, the Cholesky factor
//! `L` of `J H J` gives `H = R R^T` with `R = J L J` upper triangular, so `H^-1 = R^-T R^-1` and
//! `U = R^-1`. Hand-written (a Cholesky factorization and a triangular inverse, about sixty
//! lines) rather than a linear-algebra crate: these two loops are all GPTQ needs, and the crates
//! that do them fast are large to build on the suite's two cores.
//!
//! Rows are independent given `U`; they are processed in chunks of `ROW_CHUNK` in parallel, so
//! the result does not depend on the thread count.

use crate::quantize::{group_params, round_to_grid, Method};
use half::f16;
use kernels::cpu::{QuantFormat, QuantMatrix};
use rayon::prelude::*;

/// Dampening added to the Hessian's diagonal, as a fraction of its mean (the paper's 1%).
pub const DAMPENING: f64 = 0.01;
/// Columns per lazy batch update.
const BLOCK: usize = 128;
/// Rows quantized together (they share each loaded row of `U`).
const ROW_CHUNK: usize = 16;

/// Quantizes row-major `values` `[rows, cols]` in `format` by GPTQ with the Gram matrix `gram`
/// (`[cols, cols]`, row-major, `sum_t x_t x_t^T` over the calibration inputs). Asymmetric
/// groups take their range by `method`. Fails when the Hessian is not positive definite even
/// after more dampening (it is a Gram matrix, so only with non-finite statistics).
pub fn quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    format: QuantFormat,
    method: Method,
    gram: &[f64],
) -> Result<QuantMatrix, String> {
    if gram.len() != cols * cols || values.len() != rows * cols {
        return Err(format!(
            "GPTQ: {} Gram values for K = {cols}, {} weights for [{rows}, {cols}]",
            gram.len(),
            values.len()
        ));
    }
    let u = inverse_hessian_factor(gram, cols)?;
    let group = format.group.clamp(1, cols.max(1));
    let groups = cols / group;
    // Blocks hold whole groups, so a group's weights are all current when it starts.
    let block = if group >= cols {
        BLOCK
    } else {
        group * (BLOCK / group).max(1)
    };
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![f16::ZERO; rows * groups];
    let mut mins = vec![f16::ZERO; if format.asymmetric { rows * groups } else { 0 }];
    let mut mins_chunks: Vec<&mut [f16]> = if format.asymmetric {
        mins.chunks_mut(ROW_CHUNK * groups).collect()
    } else {
        (0..rows.div_ceil(ROW_CHUNK))
            .map(|_| Default::default())
            .collect()
    };
    codes
        .par_chunks_mut(ROW_CHUNK * cols)
        .zip(scales.par_chunks_mut(ROW_CHUNK * groups))
        .zip(mins_chunks.par_iter_mut())
        .enumerate()
        .for_each(|(chunk, ((codes, scales), mins))| {
            let r0 = chunk * ROW_CHUNK;
            let n = codes.len() / cols;
            let mut w = values[r0 * cols..(r0 + n) * cols].to_vec();
            let mut params = vec![(0f32, 0f32); n];
            let mut scratch = vec![0u8; group];
            let mut err = vec![0f32; n * block];
            for i1 in (0..cols).step_by(block) {
                let i2 = (i1 + block).min(cols);
                for i in i1..i2 {
                    if i % group == 0 {
                        for (r, p) in params.iter_mut().enumerate() {
                            let span = &w[r * cols + i..][..group];
                            let (d, m) = group_params(span, &mut scratch, format, method);
                            let g = i / group;
                            scales[r * groups + g] = d;
                            if format.asymmetric {
                                mins[r * groups + g] = m;
                            }
                            *p = (d.to_f32(), m.to_f32());
                        }
                    }
                    let urow = &u[i * cols..(i + 1) * cols];
                    for r in 0..n {
                        let row = &mut w[r * cols..(r + 1) * cols];
                        let (code, q) = round_to_grid(row[i], format, params[r].0, params[r].1);
                        codes[r * cols + i] = code;
                        let e = (row[i] - q) / urow[i];
                        err[r * block + (i - i1)] = e;
                        for (x, &h) in row[i + 1..i2].iter_mut().zip(&urow[i + 1..i2]) {
                            *x -= e * h;
                        }
                    }
                }
                // The block's errors reach the later blocks.
                for j in i1..i2 {
                    let urow = &u[j * cols + i2..(j + 1) * cols];
                    for r in 0..n {
                        let e = err[r * block + (j - i1)];
                        if e != 0.0 {
                            let row = &mut w[r * cols + i2..(r + 1) * cols];
                            for (x, &h) in row.iter_mut().zip(urow) {
                                *x -= e * h;
                            }
                        }
                    }
                }
            }
        });
    Ok(QuantMatrix {
        format,
        rows,
        cols,
        codes,
        scales,
        mins,
    })
}

/// The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), in f32, for `H` the dampened
/// `gram` (see the module doc). Input channels that never fired (zero diagonal) get a unit
/// diagonal: their columns are then rounded and pass no error on.
fn inverse_hessian_factor(gram: &[f64], k: usize) -> Result<Vec<f32>, String> {
    let mut h = gram.to_vec();
    for i in 0..k {
        if h[i * k + i] <= 0.0 {
            h[i * k + i] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let mut damp = DAMPENING * mean_diag;
    for _attempt in 0..6 {
        // L = chol(J H J): reversed rows and columns.
        let mut l: Vec<f64> = (0..k * k)
            .map(|at| {
                let (i, j) = (at / k, at % k);
                let v = h[(k - 1 - i) * k + (k - 1 - j)];
                if i == j {
                    v + damp
                } else {
                    v
                }
            })
            .collect();
        if cholesky_lower(&mut l, k) {
            // R = J L J is upper triangular; U = R^-1.
            let r: Vec<f64> = (0..k * k)
                .map(|at| l[(k - 1 - at / k) * k + (k - 1 - at % k)])
                .collect();
            return Ok(invert_upper(&r, k).iter().map(|&v| v as f32).collect());
        }
        damp *= 10.0;
    }
    Err("GPTQ: the calibration Hessian is not positive definite (non-finite statistics?)".into())
}

/// Rows handled together by the factorization and the inverse: each row of the matrix loaded
/// from memory then serves this many rows (both loops are otherwise bound by memory: a `[1536,
/// 1536]` f64 matrix is 19 MB).
const ROW_BLOCK: usize = 4;

/// In-place Cholesky factorization of the symmetric positive definite `a` (`[n, n]`, row-major):
/// `a = L L^T` with `L` lower triangular left in `a` (zeros above). False when a pivot is not
/// positive. Left-looking, `ROW_BLOCK` rows at a time.
fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for i0 in (0..n).step_by(ROW_BLOCK) {
        let i1 = (i0 + ROW_BLOCK).min(n);
        let (done, block) = a.split_at_mut(i0 * n);
        // Columns left of the block: each finished row j serves every row of the block.
        for j in 0..i0 {
            let lj = &done[j * n..j * n + j];
            let pivot = done[j * n + j];
            for row in block[..(i1 - i0) * n].chunks_exact_mut(n) {
                let s = dot(&row[..j], lj);
                row[j] = (row[j] - s) / pivot;
            }
        }
        // Inside the block, row by row.
        for i in i0..i1 {
            for j in i0..=i {
                let (upper, lower) = block.split_at_mut((i - i0) * n);
                let row_i = &mut lower[..n];
                let s = if j == i {
                    dot(&row_i[..j], &row_i[..j])
                } else {
                    dot(&row_i[..j], &upper[(j - i0) * n..(j - i0) * n + j])
                };
                let v = row_i[j] - s;
                if i == j {
                    if !(v > 0.0 && v.is_finite()) {
                        return false;
                    }
                    row_i[j] = v.sqrt();
                } else {
                    row_i[j] = v / upper[(j - i0) * n + j];
                }
            }
            block[(i - i0) * n + i + 1..(i - i0 + 1) * n].fill(0.0);
        }
    }
    true
}

/// The inverse of the upper triangular `r` (`[n, n]`, row-major), rows from the last:
/// `U[i][i+1..] = -(sum_k r[i][k] U[k][..]) / r[i][i]`, `ROW_BLOCK` rows at a time (each
/// finished row `U[k]` serves every row of the block).
fn invert_upper(r: &[f64], n: usize) -> Vec<f64> {
    let mut u = vec![0f64; n * n];
    let mut i1 = n;
    while i1 > 0 {
        let i0 = i1.saturating_sub(ROW_BLOCK);
        let (head, done) = u.split_at_mut(i1 * n);
        let block = &mut head[i0 * n..];
        // Sums over the finished rows k >= i1, kept in the block's own rows for now.
        for k in i1..n {
            let uk = &done[(k - i1) * n + k..(k - i1 + 1) * n];
            for (b, row) in block.chunks_exact_mut(n).enumerate() {
                let c = r[(i0 + b) * n + k];
                if c != 0.0 {
                    for (a, &v) in row[k..].iter_mut().zip(uk) {
                        *a += c * v;
                    }
                }
            }
        }
        // Inside the block, from its last row.
        for i in (i0..i1).rev() {
            let (mine, later) = block.split_at_mut((i - i0 + 1) * n);
            let row = &mut mine[(i - i0) * n..];
            for k in i + 1..i1 {
                let c = r[i * n + k];
                let uk = &later[(k - i - 1) * n + k..(k - i) * n];
                for (a, &v) in row[k..].iter_mut().zip(uk) {
                    *a += c * v;
                }
            }
            let d = 1.0 / r[i * n + i];
            for x in &mut row[i + 1..] {
                *x = -*x * d;
            }
            row[i] = d;
        }
        i1 = i0;
    }
    u
}

/// `sum a_i b_i` with eight independent sums, which the compiler keeps in vector registers.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, a), b) in sums.iter_mut().zip(x).zip(y) {
            *s += a * b;
        }
    }
    sums.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::CodeFormat;

    /// A deterministic pseudo-random value in [-1, 1).
    fn noise(i: usize) -> f32 {
        ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Inputs `[t, k]` whose channels are correlated (each a mix of a few shared factors) and of
    /// unequal size, as a model's activations are.
    fn inputs(t: usize, k: usize) -> Vec<f32> {
        (0..t * k)
            .map(|at| {
                let (s, c) = (at / k, at % k);
                let shared = noise(s * 7 + c % 5) * 2.0;
                (shared + 0.3 * noise(1_000_003 + at)) * (1.0 + (c % 7) as f32 * 0.5)
            })
            .collect()
    }

    fn gram(x: &[f32], t: usize, k: usize) -> Vec<f64> {
        let mut g = vec![0f64; k * k];
        for s in 0..t {
            for i in 0..k {
                for j in 0..k {
                    g[i * k + j] += x[s * k + i] as f64 * x[s * k + j] as f64;
                }
            }
        }
        g
    }

    /// `sum_t |x_t (W - Q)^T|^2`: the layer's squared output error on the inputs.
    fn output_error(x: &[f32], t: usize, w: &[f32], m: &QuantMatrix) -> f64 {
        let (n, k) = (m.rows, m.cols);
        let mut err = 0f64;
        for s in 0..t {
            for r in 0..n {
                let mut e = 0f64;
                for c in 0..k {
                    e += x[s * k + c] as f64 * (w[r * k + c] - m.get_f32(r, c)) as f64;
                }
                err += e * e;
            }
        }
        err
    }

    #[test]
    fn the_factor_inverts_the_dampened_hessian() {
        let (t, k) = (40, 24);
        let g = gram(&inputs(t, k), t, k);
        let u = inverse_hessian_factor(&g, k).unwrap();
        let damp = DAMPENING * (0..k).map(|i| g[i * k + i]).sum::<f64>() / k as f64;
        // (U^T U) H = I.
        for i in 0..k {
            for j in 0..k {
                let mut v = 0f64;
                for m in 0..k {
                    let hinv: f64 = (0..k)
                        .map(|p| u[p * k + i] as f64 * u[p * k + m] as f64)
                        .sum();
                    v += hinv * (g[m * k + j] + if m == j { damp } else { 0.0 });
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-3, "[{i}, {j}] = {v}");
            }
        }
    }

    #[test]
    fn gptq_beats_rounding_on_the_calibration_inputs() {
        let (t, n, k) = (96, 24, 64);
        let x = inputs(t, k);
        let g = gram(&x, t, k);
        let w: Vec<f32> = (0..n * k).map(|i| noise(77 + i) * 0.1).collect();
        for (codes, group, asymmetric) in [
            (CodeFormat::Int(4), 16, true),
            (CodeFormat::Int(2), 32, true),
            (CodeFormat::Int(8), 32, false),
            (CodeFormat::Fp8E4M3, k, false),
        ] {
            let format = QuantFormat {
                codes,
                group,
                asymmetric,
            };
            let rtn = crate::quantize::quantize(&w, n, k, format, Method::RoundToNearest);
            let gptq = quantize(&w, n, k, format, Method::RoundToNearest, &g).unwrap();
            let (e_rtn, e_gptq) = (
                output_error(&x, t, &w, &rtn),
                output_error(&x, t, &w, &gptq),
            );
            println!(
                "{codes:?} group {group}: output error {e_rtn:.3e} rounded, {e_gptq:.3e} GPTQ"
            );
            assert!(e_gptq < 0.8 * e_rtn, "{codes:?}: {e_gptq} vs {e_rtn}");
        }
    }

    #[test]
    fn an_identity_hessian_gives_round_to_nearest() {
        // With uncorrelated inputs no other column can absorb an error: GPTQ rounds.
        let (n, k) = (5, 32);
        let mut g = vec![0f64; k * k];
        for i in 0..k {
            g[i * k + i] = 1.0;
        }
        let w: Vec<f32> = (0..n * k).map(|i| noise(5 + i)).collect();
        let format = QuantFormat {
            codes: CodeFormat::Int(4),
            group: 16,
            asymmetric: true,
        };
        let rtn = crate::quantize::quantize(&w, n, k, format, Method::Fitted);
        let gptq = quantize(&w, n, k, format, Method::Fitted, &g).unwrap();
        assert_eq!(rtn.codes, gptq.codes);
        assert_eq!(rtn.scales, gptq.scales);
    }
}
