//! `fdrt eval`: how well a plan predicts a text, and how far its next-token distributions are from
//! a reference plan's (the unquantized model, for judging a quantized one).
//!
//! The token ids are cut into windows of `window` tokens, each run from an empty cache; every
//! position but a window's last predicts the next token. Perplexity is `exp(mean NLL)` over all
//! those predictions. Against a reference: the mean KL divergence `KL(P_ref || P)` of the
//! next-token distributions and the fraction of positions whose most likely token is the same.
//! Softmax and sums are in f64.

use crate::engine::Engine;
use crate::error::RuntimeError;

/// What [`evaluate`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Predicted positions.
    pub predictions: usize,
    pub perplexity: f64,
    /// Against the reference, when one was given.
    pub reference: Option<Comparison>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub reference_perplexity: f64,
    /// Mean `KL(P_ref || P)` in nats.
    pub mean_kl: f64,
    /// Fraction of positions with the same most likely token.
    pub top1_agreement: f64,
}

/// Runs `ids` through `engine` (and `reference`) in windows of `window` tokens.
pub fn evaluate(
    engine: &mut Engine,
    mut reference: Option<&mut Engine>,
    ids: &[u32],
    window: usize,
) -> Result<EvalReport, RuntimeError> {
    let vocab = engine.vocab_size();
    if let Some(r) = &reference {
        if r.vocab_size() != vocab {
            return Err(RuntimeError::InvalidPlan(format!(
                "the reference plan has {} logits per token, this one {vocab}",
                r.vocab_size()
            )));
        }
    }
    let mut totals = Totals::default();
    for chunk in ids.chunks(window.max(2)).filter(|c| c.len() >= 2) {
        engine.reset();
        let logits = engine.prefill(chunk, true)?;
        let ref_logits = match reference.as_deref_mut() {
            Some(r) => {
                r.reset();
                Some(r.prefill(chunk, true)?)
            }
            None => None,
        };
        for pos in 0..chunk.len() - 1 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let ref_row = ref_logits
                .as_ref()
                .map(|l| &l[pos * vocab..(pos + 1) * vocab]);
            totals.add(row, ref_row, chunk[pos + 1] as usize);
        }
    }
    engine.reset();
    if let Some(r) = reference.as_deref_mut() {
        r.reset();
    }
    Ok(totals.report(reference.is_some()))
}

/// Per predicted position of [`evaluate`]'s windows, in order: the log-probability the plan gives
/// the next token, and its most likely token. Two plans' scores give the perplexity of each and
/// their top-1 agreement, and are small enough to keep (tests cache the reference plan's).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenScores {
    pub logprob: Vec<f64>,
    pub top1: Vec<u32>,
}

impl TokenScores {
    pub fn perplexity(&self) -> f64 {
        let n = self.logprob.len().max(1) as f64;
        (-self.logprob.iter().sum::<f64>() / n).exp()
    }

    /// Fraction of positions where `self` and `other` have the same most likely token.
    pub fn top1_agreement(&self, other: &TokenScores) -> f64 {
        let same = self
            .top1
            .iter()
            .zip(&other.top1)
            .filter(|(a, b)| a == b)
            .count();
        same as f64 / self.top1.len().max(1) as f64
    }
}

/// Scores `ids` in windows of `window` tokens, as [`evaluate`] does.
pub fn score(engine: &mut Engine, ids: &[u32], window: usize) -> Result<TokenScores, RuntimeError> {
    let vocab = engine.vocab_size();
    let mut scores = TokenScores {
        logprob: vec![],
        top1: vec![],
    };
    for chunk in ids.chunks(window.max(2)).filter(|c| c.len() >= 2) {
        engine.reset();
        let logits = engine.prefill(chunk, true)?;
        for pos in 0..chunk.len() - 1 {
            let logp = log_softmax(&logits[pos * vocab..(pos + 1) * vocab]);
            let next = chunk[pos + 1] as usize;
            scores
                .logprob
                .push(logp.get(next).copied().unwrap_or(f64::NEG_INFINITY));
            scores.top1.push(argmax(&logp) as u32);
        }
    }
    engine.reset();
    Ok(scores)
}

#[derive(Default)]
struct Totals {
    n: usize,
    nll: f64,
    ref_nll: f64,
    kl: f64,
    agree: usize,
}

impl Totals {
    fn add(&mut self, row: &[f32], ref_row: Option<&[f32]>, target: usize) {
        let logp = log_softmax(row);
        self.n += 1;
        self.nll -= logp.get(target).copied().unwrap_or(f64::NEG_INFINITY);
        if let Some(ref_row) = ref_row {
            let ref_logp = log_softmax(ref_row);
            self.ref_nll -= ref_logp.get(target).copied().unwrap_or(f64::NEG_INFINITY);
            self.kl += ref_logp
                .iter()
                .zip(&logp)
                .map(|(&r, &q)| r.exp() * (r - q))
                .sum::<f64>();
            self.agree += usize::from(argmax(&logp) == argmax(&ref_logp));
        }
    }

    fn report(&self, with_reference: bool) -> EvalReport {
        let n = self.n.max(1) as f64;
        EvalReport {
            predictions: self.n,
            perplexity: (self.nll / n).exp(),
            reference: with_reference.then(|| Comparison {
                reference_perplexity: (self.ref_nll / n).exp(),
                mean_kl: self.kl / n,
                top1_agreement: self.agree as f64 / n,
            }),
        }
    }
}

/// `log(softmax(row))` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    row.iter().map(|&v| v as f64 - log_sum).collect()
}

/// Index of the largest value, the first on ties.
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_have_zero_kl_and_full_agreement() {
        let mut t = Totals::default();
        let row = [1.0f32, 2.0, 0.5, -1.0];
        t.add(&row, Some(&row), 1);
        t.add(&row, Some(&row), 0);
        let r = t.report(true);
        let c = r.reference.unwrap();
        assert!(c.mean_kl.abs() < 1e-12);
        assert_eq!(c.top1_agreement, 1.0);
        assert_eq!(c.reference_perplexity, r.perplexity);
        // NLL of tokens 1 and 0 under softmax(row).
        let logp = log_softmax(&row);
        assert!((r.perplexity - (-(logp[1] + logp[0]) / 2.0).exp()).abs() < 1e-12);
    }

    #[test]
    fn kl_of_known_distributions() {
        // P_ref = (1/2, 1/2), P = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
        let mut t = Totals::default();
        let p = [(0.25f32).ln(), (0.75f32).ln()];
        let r = [0.0f32, 0.0];
        t.add(&p, Some(&r), 0);
        let c = t.report(true).reference.unwrap();
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((c.mean_kl - want).abs() < 1e-6, "{}", c.mean_kl);
        // P's top token is 1; the reference ties and takes the first, 0.
        assert_eq!(c.top1_agreement, 0.0);
    }
}
