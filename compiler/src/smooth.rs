//! Activation smoothing (SmoothQuant, Xiao et al. 2022) for the schemes that quantize activations
//! per token (w8a8, w4a8, fp8), from the calibration statistics.
//!
//! A token's activations are rounded with one scale, `max|x| / 127`, so a few input channels
//! that are always large (LLM activations have them) make the steps coarse for every other
//! channel. With `s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)` (`w_j` column `j` of the weight,
//! `max|x_j|` over the calibration text), `x W^T = (x / s) (W s)^T`: the matmul reads `x / s`,
//! whose channels are evener, and stores `W s`, which absorbs the range. Dividing by `s` costs
//! nothing at run time because it is folded into the op that produces `x`: the RMSNorm weight
//! before the QKV and gate/up projections, the `up` rows of the gate/up weight before the down
//! projection (`silu(g) * (u / s) = (silu(g) * u) / s`). The attention output (before `o_proj`)
//! is not smoothed: its producer has no per-channel weight (`v_proj` rows would do, but with
//! grouped heads one factor must serve several heads; not done).
//!
//! A weight is smoothed only when the compiler quantizes it (not copied from the checkpoint),
//! every reader of its input is that one matmul, and the producer's weight can be rescaled
//! (a norm vector, or a matmul weight also quantized by the compiler or unquantized). GPTQ then
//! sees the smoothed inputs: its Gram matrix becomes `G / (s s^T)`.

use crate::passes::quantize_weights::QuantPlan;
use artifacts::calibration::Calibration;
use ir::{ActQuant, Graph, Op, ValueDef, ValueId};
use std::collections::HashMap;

/// How the writer rescales a weight's data before storing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rescale {
    /// Multiply column `j` of a matrix by `cols[j]`.
    pub cols: Option<Vec<f32>>,
    /// Divide rows `first..first + len` of a matrix by the factors.
    pub rows: Option<(usize, Vec<f32>)>,
    /// Divide element `j` of a vector by `elems[j]`.
    pub elems: Option<Vec<f32>>,
}

impl Rescale {
    /// Applies the rescaling to row-major `values` `[rows, cols]` (a vector is one row).
    pub fn apply(&self, values: &mut [f32], cols: usize) {
        if let Some(factors) = &self.cols {
            for row in values.chunks_mut(cols.max(1)) {
                for (v, &f) in row.iter_mut().zip(factors) {
                    *v *= f;
                }
            }
        }
        if let Some((first, factors)) = &self.rows {
            for (r, &f) in factors.iter().enumerate() {
                if let Some(row) = values.get_mut((first + r) * cols..(first + r + 1) * cols) {
                    row.iter_mut().for_each(|v| *v /= f);
                }
            }
        }
        if let Some(factors) = &self.elems {
            for (v, &f) in values.iter_mut().zip(factors) {
                *v /= f;
            }
        }
    }

    /// The Gram matrix `[K, K]` of the inputs after smoothing: `G[i][j] / (s_i s_j)`.
    pub fn smooth_gram(&self, gram: &mut [f64]) {
        let Some(s) = &self.cols else { return };
        let k = s.len();
        for i in 0..k {
            for j in 0..k {
                gram[i * k + j] /= s[i] as f64 * s[j] as f64;
            }
        }
    }
}

/// The weights to rescale. `weight_abs_max(v)` gives `max |W[:, j]|` per column of matrix `v`.
pub fn plan(
    graph: &Graph,
    quant: &QuantPlan,
    calibration: &Calibration,
    alpha: f32,
    weight_abs_max: &dyn Fn(ValueId) -> Option<Vec<f32>>,
) -> HashMap<ValueId, Rescale> {
    let mut rescale: HashMap<ValueId, Rescale> = HashMap::new();
    let compiler_quantized =
        |w: ValueId| quant.get(&w).is_some_and(|q| !q.from_checkpoint) || !quant.contains_key(&w);
    for node in graph.topo_order() {
        let data = graph.node(node);
        if !matches!(data.op, Op::MatMul) || data.inputs.len() != 2 {
            continue;
        }
        let (x, w) = (data.inputs[0], data.inputs[1]);
        let Some(q) = quant.get(&w) else { continue };
        if q.from_checkpoint || q.scheme.act_quant() == ActQuant::None {
            continue;
        }
        let ValueDef::Weight { name, .. } = &graph.value(w).def else {
            continue;
        };
        let Some(stats) = calibration.input(name) else {
            continue;
        };
        if graph.users(x) != [node] || graph.users(w) != [node] {
            continue;
        }
        let Some(producer) = graph.producer(x) else {
            continue;
        };
        let pdata = graph.node(producer);
        let k = stats.k as usize;
        // Where 1 / s goes.
        let target = match pdata.op {
            Op::RmsNorm { group, .. } if group == k => Some((pdata.inputs[1], None)),
            Op::AddRmsNorm { .. } if pdata.outputs.get(1) == Some(&x) => {
                Some((pdata.inputs[2], None))
            }
            Op::SiluMul => {
                let gu = pdata.inputs[0];
                graph
                    .producer(gu)
                    .map(|n| graph.node(n))
                    .filter(|m| matches!(m.op, Op::MatMul) && m.inputs.len() == 2)
                    .filter(|_| graph.users(gu).len() == 1)
                    .map(|m| (m.inputs[1], Some(k)))
            }
            _ => None,
        };
        let Some((target, first_row)) = target else {
            continue;
        };
        let folded = |r: &Rescale| r.rows.is_some() || r.elems.is_some();
        if rescale.get(&target).is_some_and(folded)
            || !compiler_quantized(target)
            || graph.users(target).len() != 1
        {
            continue;
        }
        let Some(w_max) = weight_abs_max(w) else {
            continue;
        };
        let factors: Vec<f32> = stats
            .abs_max
            .iter()
            .zip(&w_max)
            .map(|(&a, &m)| {
                let s = a.max(1e-5).powf(alpha) / m.max(1e-5).powf(1.0 - alpha);
                if s.is_finite() && s > 0.0 {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        let fold = rescale.entry(target).or_default();
        match first_row {
            None => fold.elems = Some(factors.clone()),
            Some(first) => fold.rows = Some((first, factors.clone())),
        }
        rescale.entry(w).or_default().cols = Some(factors);
    }
    rescale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_keeps_the_product() {
        // x [1, 3] through a vector fold, W [2, 3] column-scaled: x W^T is unchanged.
        let x = [4.0f32, -0.5, 0.25];
        let w = [1.0f32, 2.0, -3.0, 0.5, 0.25, 8.0];
        let s = vec![8.0f32, 0.5, 0.25];
        let mut xs = x.to_vec();
        Rescale {
            elems: Some(s.clone()),
            ..Default::default()
        }
        .apply(&mut xs, 3);
        let mut ws = w.to_vec();
        let cols = Rescale {
            cols: Some(s.clone()),
            ..Default::default()
        };
        cols.apply(&mut ws, 3);
        for r in 0..2 {
            let before: f32 = (0..3).map(|j| x[j] * w[r * 3 + j]).sum();
            let after: f32 = (0..3).map(|j| xs[j] * ws[r * 3 + j]).sum();
            assert!((before - after).abs() < 1e-6, "{before} vs {after}");
        }
        let mut gram = vec![1.0f64; 9];
        cols.smooth_gram(&mut gram);
        assert_eq!(gram[0], 1.0 / 64.0);
        assert_eq!(gram[5], 1.0 / (0.5 * 0.25)); // [1, 2]
                                                 // Rows 1.. of a [3, 2] matrix divided.
        let mut m = vec![1.0f32; 6];
        Rescale {
            rows: Some((1, vec![2.0, 4.0])),
            ..Default::default()
        }
        .apply(&mut m, 2);
        assert_eq!(m, vec![1.0, 1.0, 0.5, 0.5, 0.25, 0.25]);
    }
}
