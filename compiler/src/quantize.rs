//! Quantizing a weight matrix: f32 values `[N, K]` in, codes with f16 scales (and minimums) per
//! group out, as `kernels::cpu::QuantMatrix`, which the kernels' packer lays out.
//!
//! Symmetric integer and FP8 groups round to nearest with the scale `max|w| / qmax`. Asymmetric
//! integer groups (the 4- and 2-bit defaults) are fitted, not just rounded: starting from several
//! clipped ranges `[min, max] * s` (s from 1 down to 0.5), codes and `(scale, min)` are
//! alternately re-fitted, codes by rounding and `(scale, min)` by least squares on the codes,
//! and the pair with the least squared error (after rounding both to f16, as stored) wins. That
//! is the half-quadratic idea (alternate a closed-form fit of the affine parameters with the
//! rounding step) without a calibration set; at 2 bits it cuts the RMS error of plain rounding
//! by about a quarter (`docs/QUANTIZATION.md`). Every group is computed independently, so the result does
//! not depend on the thread count.

use half::f16;
use ir::CodeFormat;
use kernels::cpu::quant::{e4m3_code, round_to_e4m3, E4M3_MAX};
use kernels::cpu::{QuantFormat, QuantMatrix};
use rayon::prelude::*;

/// How asymmetric integer groups are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `[min, max]` of the group, rounded (what GGUF Q4_1 does).
    RoundToNearest,
    /// Clipping search plus alternating least squares (see the module doc).
    Fitted,
}

/// Quantizes row-major `values` `[rows, cols]` in `format`. `format` must have been checked
/// against `cols`.
pub fn quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    format: QuantFormat,
    method: Method,
) -> QuantMatrix {
    let group = format.group.max(1);
    let groups = cols / group;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![f16::ZERO; rows * groups];
    let mut mins = vec![f16::ZERO; if format.asymmetric { rows * groups } else { 0 }];
    let mut mins_rows: Vec<&mut [f16]> = if format.asymmetric {
        mins.chunks_mut(groups.max(1)).collect()
    } else {
        (0..rows).map(|_| Default::default()).collect()
    };
    codes
        .par_chunks_mut(cols.max(1))
        .zip(scales.par_chunks_mut(groups.max(1)))
        .zip(mins_rows.par_iter_mut())
        .enumerate()
        .for_each(|(row, ((codes, scales), mins))| {
            let w = &values[row * cols..(row + 1) * cols];
            for g in 0..groups {
                let span = g * group..(g + 1) * group;
                let (scale, min) =
                    quantize_group(&w[span.clone()], &mut codes[span], format, method);
                scales[g] = scale;
                if format.asymmetric {
                    mins[g] = min;
                }
            }
        });
    QuantMatrix {
        format,
        rows,
        cols,
        codes,
        scales,
        mins,
    }
}

/// Quantizes one group into `codes`; returns its scale and minimum (zero when symmetric).
fn quantize_group(w: &[f32], codes: &mut [u8], format: QuantFormat, method: Method) -> (f16, f16) {
    let (scale, min) = group_params(w, codes, format, method);
    let (d, m) = (scale.to_f32(), min.to_f32());
    for (c, &v) in codes.iter_mut().zip(w) {
        *c = round_to_grid(v, format, d, m).0;
    }
    (scale, min)
}

/// The scale and minimum (zero when symmetric) of a group of values `w`; `scratch` (as long as
/// `w`) is overwritten. Symmetric and fp8 groups take `max|w| / qmax`; asymmetric ones are
/// rounded or fitted as `method` says.
pub(crate) fn group_params(
    w: &[f32],
    scratch: &mut [u8],
    format: QuantFormat,
    method: Method,
) -> (f16, f16) {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    match format.codes {
        CodeFormat::Fp8E4M3 => (f16::from_f32(amax / E4M3_MAX), f16::ZERO),
        CodeFormat::Int(bits) if !format.asymmetric => {
            let qmax = ((1i32 << (bits - 1)) - 1).max(1);
            (f16::from_f32(amax / qmax as f32), f16::ZERO)
        }
        CodeFormat::Int(bits) => {
            let levels = ((1u32 << bits) - 1) as f32;
            let lo = w.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut best = (f64::INFINITY, f16::ZERO, f16::ZERO);
            let shrinks: &[f32] = match method {
                Method::RoundToNearest => &[1.0],
                Method::Fitted => &[1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5],
            };
            for &shrink in shrinks {
                let (mut d, mut m) = ((hi - lo) * shrink / levels, lo * shrink);
                let rounds = if method == Method::Fitted { 6 } else { 1 };
                for round in 0..rounds {
                    let (scale, min) = (f16::from_f32(d), f16::from_f32(m));
                    let err = assign(w, scratch, format, scale.to_f32(), min.to_f32());
                    if err < best.0 {
                        best = (err, scale, min);
                    }
                    if round + 1 < rounds {
                        match least_squares(w, scratch) {
                            Some((nd, nm)) => (d, m) = (nd, nm),
                            None => break,
                        }
                    }
                }
            }
            (best.1, best.2)
        }
    }
}

/// The code of `format` nearest to `v` for the scale `d` and minimum `m` (ties away from zero
/// for integers, to even for e4m3, saturating), and the value it stands for, computed exactly as
/// the kernels dequantize: symmetric `(code - 2^(b-1)) d`, asymmetric `code d + m`, fp8
/// `e4m3(code) d`. A zero scale gives the zero code.
pub(crate) fn round_to_grid(v: f32, format: QuantFormat, d: f32, m: f32) -> (u8, f32) {
    match format.codes {
        CodeFormat::Fp8E4M3 => {
            if d == 0.0 {
                return (0, 0.0);
            }
            let r = round_to_e4m3(v / d);
            (e4m3_code(r), r * d)
        }
        CodeFormat::Int(bits) if !format.asymmetric => {
            let offset = 1i32 << (bits - 1);
            let q = if d == 0.0 {
                0
            } else {
                ((v / d).round() as i32).clamp(-offset, offset - 1)
            };
            ((q + offset) as u8, q as f32 * d)
        }
        CodeFormat::Int(bits) => {
            let levels = ((1u32 << bits) - 1) as f32;
            let q = if d > 0.0 {
                ((v - m) / d).round().clamp(0.0, levels)
            } else {
                0.0
            };
            (q as u8, q * d + m)
        }
    }
}

/// Codes of `w` on the asymmetric grid `(d, min)`; returns the squared error of the weights they
/// give.
fn assign(w: &[f32], codes: &mut [u8], format: QuantFormat, d: f32, min: f32) -> f64 {
    let mut err = 0f64;
    for (c, &v) in codes.iter_mut().zip(w) {
        let (code, back) = round_to_grid(v, format, d, min);
        *c = code;
        err += ((back - v) as f64).powi(2);
    }
    err
}

/// `(d, m)` minimizing `sum (q d + m - w)^2` for the current codes, or None when the codes are
/// all equal (the fit is then not unique).
fn least_squares(w: &[f32], codes: &[u8]) -> Option<(f32, f32)> {
    let n = w.len() as f64;
    let (mut sq, mut sqq, mut sw, mut sqw) = (0f64, 0f64, 0f64, 0f64);
    for (&c, &v) in codes.iter().zip(w) {
        let (q, v) = (c as f64, v as f64);
        sq += q;
        sqq += q * q;
        sw += v;
        sqw += q * v;
    }
    let det = n * sqq - sq * sq;
    if det.abs() < 1e-12 {
        return None;
    }
    let d = (n * sqw - sq * sw) / det;
    let m = (sw - d * sq) / n;
    (d > 0.0).then_some((d as f32, m as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rms_error(values: &[f32], m: &QuantMatrix) -> f64 {
        let mut err = 0f64;
        for r in 0..m.rows {
            for c in 0..m.cols {
                err += ((m.get_f32(r, c) - values[r * m.cols + c]) as f64).powi(2);
            }
        }
        (err / values.len() as f64).sqrt()
    }

    fn sample(n: usize) -> Vec<f32> {
        // A deterministic heavy-ish tailed sample, like trained weights.
        (0..n)
            .map(|i| {
                let u = ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32
                    / (1u64 << 24) as f32;
                let v = (u - 0.5) * 0.1;
                v * v * v * 400.0 + v
            })
            .collect()
    }

    #[test]
    fn rounding_errs_by_at_most_half_a_step() {
        let values = sample(8 * 128);
        for (codes, asymmetric) in [
            (CodeFormat::Int(8), false),
            (CodeFormat::Int(4), false),
            (CodeFormat::Int(4), true),
            (CodeFormat::Int(2), true),
            (CodeFormat::Fp8E4M3, false),
        ] {
            let format = QuantFormat {
                codes,
                group: 32,
                asymmetric,
            };
            let m = quantize(&values, 8, 128, format, Method::RoundToNearest);
            for r in 0..8 {
                for c in 0..128 {
                    let g = r * 4 + c / 32;
                    let d = m.scales[g].to_f32();
                    let v = values[r * 128 + c];
                    let err = (m.get_f32(r, c) - v).abs();
                    // Half a step of the grid (an e4m3 step is 1/8 of the value's power of two,
                    // at least 2^-9 of the scale), plus the f16 rounding of scale and minimum.
                    let half_step = match codes {
                        CodeFormat::Fp8E4M3 => (v.abs() / 16.0).max(d / 1024.0),
                        CodeFormat::Int(_) => d / 2.0,
                    };
                    assert!(
                        err <= half_step * 1.01 + 1e-3 * v.abs() + 1e-6,
                        "{codes:?} [{r}, {c}]: {v} -> {} (scale {d})",
                        m.get_f32(r, c)
                    );
                }
            }
        }
    }

    #[test]
    fn fitting_beats_rounding_at_low_bits() {
        let values = sample(16 * 256);
        for bits in [4, 2] {
            let format = QuantFormat {
                codes: CodeFormat::Int(bits),
                group: 64,
                asymmetric: true,
            };
            let rtn = rms_error(
                &values,
                &quantize(&values, 16, 256, format, Method::RoundToNearest),
            );
            let fit = rms_error(&values, &quantize(&values, 16, 256, format, Method::Fitted));
            println!("{bits} bits: rms error {rtn:.3e} rounded, {fit:.3e} fitted");
            // Plain rounding is the fit's first candidate, so the fit is never worse.
            assert!(fit <= rtn, "{bits} bits: {fit} vs {rtn}");
            if bits == 2 {
                assert!(fit < rtn * 0.8, "{bits} bits: {fit} vs {rtn}");
            }
        }
    }
}
