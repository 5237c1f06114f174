//! `fdrt calibrate`: runs an (unquantized) plan over a calibration text and records, for every
//! matmul weight, the statistics of its inputs that GPTQ needs (`artifacts::calibration`): the
//! Gram matrix `sum_t x_t x_t^T` (`[K, K]`) and the largest `|x|` per channel.
//!
//! The text is cut into windows of `window` tokens, each run from an empty cache, as `eval` does.
//! Each matmul call's rows are summed into a per-call f32 Gram matrix (at most `window` rows, so
//! f32 keeps about 6 digits), which is then added to an f64 total. Tables that an embedding also
//! reads (a tied `lm_head`) are not recorded: their rows are looked up as well as multiplied, so
//! the compiler quantizes them without calibration.

use crate::engine::Engine;
use crate::error::RuntimeError;
use artifacts::calibration::{Calibration, InputStats};
use artifacts::schema::{Launch, WeightRef};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Sums of one weight's inputs.
struct Accumulator {
    k: usize,
    rows: u64,
    /// Upper triangle, row by row, as in `InputStats::gram_upper`.
    gram: Vec<f64>,
    abs_max: Vec<f32>,
}

impl Accumulator {
    fn new(k: usize) -> Accumulator {
        Accumulator {
            k,
            rows: 0,
            gram: vec![0.0; k * (k + 1) / 2],
            abs_max: vec![0.0; k],
        }
    }

    /// Adds `rows` rows of `x` (`stride` apart) to the sums.
    fn add(&mut self, x: &[f32], stride: usize, rows: usize) {
        let k = self.k;
        let row = |t: usize| &x[t * stride..][..k];
        for t in 0..rows {
            for (m, &v) in self.abs_max.iter_mut().zip(row(t)) {
                *m = m.max(v.abs());
            }
        }
        // Row i of the upper triangle starts at i K - i (i - 1) / 2; rows are split into blocks
        // of 4 so that each loaded x[t][j] feeds four sums.
        const BLOCK: usize = 4;
        let starts: Vec<usize> = (0..k)
            .map(|i| i * k - i * i.saturating_sub(1) / 2)
            .collect();
        let mut rest: &mut [f64] = &mut self.gram;
        let mut slices: Vec<(usize, &mut [f64])> = Vec::with_capacity(k.div_ceil(BLOCK));
        let mut i0 = 0;
        while i0 < k {
            let i1 = (i0 + BLOCK).min(k);
            let len = starts.get(i1).copied().unwrap_or(rest.len() + starts[i0]) - starts[i0];
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(len);
            slices.push((i0, block));
            rest = tail;
            i0 = i1;
        }
        slices.into_par_iter().for_each(|(i0, block)| {
            let i1 = (i0 + BLOCK).min(k);
            let mut sums = vec![0f32; (i1 - i0) * (k - i0)];
            for t in 0..rows {
                let xt = row(t);
                for (b, i) in (i0..i1).enumerate() {
                    let a = xt[i];
                    if a == 0.0 {
                        continue;
                    }
                    // Row i's sums over j >= i0 (the part below the diagonal is dropped below).
                    let out = &mut sums[b * (k - i0)..][..k - i0];
                    for (s, &v) in out.iter_mut().zip(&xt[i0..]) {
                        *s += a * v;
                    }
                }
            }
            let mut at = 0;
            for (b, i) in (i0..i1).enumerate() {
                let from = &sums[b * (k - i0) + (i - i0)..][..k - i];
                for (g, &s) in block[at..at + k - i].iter_mut().zip(from) {
                    *g += s as f64;
                }
                at += k - i;
            }
        });
        self.rows += rows as u64;
    }
}

/// Runs `ids` through `engine` in windows of `window` tokens and returns the statistics of every
/// matmul weight's inputs. `text_blake3` names the text in the result.
pub fn calibrate(
    engine: &mut Engine,
    ids: &[u32],
    window: usize,
    text_blake3: &str,
) -> Result<Calibration, RuntimeError> {
    let program = &engine.plan().program;
    let tables: Vec<WeightRef> = program
        .steps
        .iter()
        .filter_map(|s| match s.launch {
            Launch::Embedding { table, .. } => Some(table),
            _ => None,
        })
        .collect();
    let sums: Arc<Mutex<BTreeMap<u32, Accumulator>>> = Arc::default();
    let observed = sums.clone();
    let previous = engine.set_matmul_observer(Some(Box::new(
        move |w: WeightRef, x: &[f32], stride: usize, rows: usize, cols: usize| {
            if tables.contains(&w) {
                return;
            }
            let mut sums = observed.lock().unwrap_or_else(|e| e.into_inner());
            sums.entry(w.0)
                .or_insert_with(|| Accumulator::new(cols))
                .add(x, stride, rows);
        },
    )));
    let mut tokens = 0u64;
    let mut result = Ok(());
    for chunk in ids.chunks(window.max(1)) {
        engine.reset();
        if let Err(e) = engine.prefill(chunk, false) {
            result = Err(e);
            break;
        }
        tokens += chunk.len() as u64;
    }
    engine.reset();
    engine.set_matmul_observer(previous);
    result?;
    let sums = std::mem::take(&mut *sums.lock().unwrap_or_else(|e| e.into_inner()));
    let manifest = &engine.plan().manifest;
    let inputs = sums
        .into_iter()
        .map(|(w, acc)| InputStats {
            weight: manifest.weights[w as usize].name.clone(),
            k: acc.k as u64,
            rows: acc.rows,
            gram_upper: acc.gram.iter().map(|&g| g as f32).collect(),
            abs_max: acc.abs_max,
        })
        .collect();
    Ok(Calibration {
        model: manifest.model.name.clone(),
        tokens,
        text_blake3: text_blake3.to_string(),
        inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_sums_match_a_direct_computation() {
        let (k, rows, stride) = (11, 7, 13);
        let x: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut acc = Accumulator::new(k);
        acc.add(&x, stride, rows);
        acc.add(&x, stride, 3);
        let mut at = 0;
        for i in 0..k {
            for j in i..k {
                let want: f64 = (0..rows)
                    .chain(0..3)
                    .map(|t| x[t * stride + i] as f64 * x[t * stride + j] as f64)
                    .sum();
                assert!(
                    (acc.gram[at] - want).abs() < 1e-4 * want.abs().max(1.0),
                    "[{i}, {j}]: {} vs {want}",
                    acc.gram[at]
                );
                at += 1;
            }
        }
        assert_eq!(at, acc.gram.len());
        assert_eq!(acc.rows, 10);
        let max0 = (0..rows).map(|t| x[t * stride].abs()).fold(0f32, f32::max);
        assert_eq!(acc.abs_max[0], max0);
    }
}
