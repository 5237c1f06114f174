//! Picking the next token from a row of logits: greedy argmax, or a seeded draw after
//! temperature, top-k, top-p and min-p, applied in that order as Hugging Face's logits
//! processors apply them. Repetition, presence and frequency penalties come first, on the raw
//! logits, and apply to greedy choices too (as in vLLM); they need the sequence's history, which
//! the sampler keeps itself: the prompt it is told about and every token it picked.
//!
//! The random stream is ChaCha8 seeded from one `u64`, so a seed reproduces a generation on
//! every platform; without a seed one is taken from the OS and can be read back to reproduce it.

use rand::{Rng, SeedableRng, TryRngCore};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use thiserror::Error;

/// Sampling settings that cannot be used.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplerError {
    #[error("temperature must be a finite number >= 0 (0 means greedy), got {0}")]
    Temperature(f32),
    #[error("top_k must be at least 1, got 0")]
    TopK,
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("repetition_penalty must be a finite number > 0 (1 is off), got {0}")]
    RepetitionPenalty(f32),
}

/// How to choose each token. `temperature == 0` is greedy and ignores the rest but the
/// penalties.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the most likely tokens whose probabilities add up to at least p.
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// Seed of the random stream; `None` takes one from the OS.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token generated so far (OpenAI semantics; 0 is
    /// off, prompt tokens do not count).
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was generated (0 is off).
    pub frequency_penalty: f32,
    /// Divides the positive logits and multiplies the negative ones of every token in the prompt
    /// or the output so far (the CTRL / Hugging Face rule; 1 is off, above 1 discourages).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    /// Greedy: the same output on every run, the usual default for comparisons.
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }

    pub fn validate(&self) -> Result<(), SamplerError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplerError::Temperature(self.temperature));
        }
        if self.top_k == Some(0) {
            return Err(SamplerError::TopK);
        }
        if let Some(top_p) = self.top_p {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(SamplerError::TopP(top_p));
            }
        }
        if let Some(min_p) = self.min_p {
            if !(0.0..=1.0).contains(&min_p) {
                return Err(SamplerError::MinP(min_p));
            }
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplerError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplerError::FrequencyPenalty(self.frequency_penalty));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplerError::RepetitionPenalty(self.repetition_penalty));
        }
        Ok(())
    }

    /// Whether any penalty is on, so that the sampler must keep the sequence's history.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Whether every pick is the argmax (of the penalized row, when a penalty is on).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// Chooses tokens under one set of [`SamplingParams`], drawing from its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    /// Reused between calls: (token id, weight relative to the most likely token).
    candidates: Vec<(u32, f32)>,
    /// The sequence so far, kept only when a penalty is on.
    history: Option<History>,
    /// Reused between calls: the penalized copy of a row of logits.
    penalized: Vec<f32>,
}

/// What the penalties look at: how often each generated token occurred, and which tokens the
/// prompt holds. Maps rather than vocabulary-sized arrays, because a sequence touches a few
/// hundred ids of a vocabulary of tens of thousands.
#[derive(Debug, Clone, Default)]
struct History {
    generated: HashMap<u32, u32>,
    prompt: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplerError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(seed_from_os);
        Ok(Self {
            params,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            candidates: Vec::new(),
            history: params.has_penalties().then(History::default),
            penalized: Vec::new(),
        })
    }

    /// Tells the sampler the prompt, which the repetition penalty counts as seen. Without
    /// penalties it is ignored.
    pub fn observe_prompt(&mut self, prompt: &[u32]) {
        if let Some(history) = &mut self.history {
            history.prompt.extend(prompt.iter().copied());
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use, whether given or taken from the OS: passing it back reproduces the run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next token for one row of logits, which then counts as generated. NaN logits are
    /// never chosen; a row with no finite logit falls back to [`argmax`].
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.pick(logits, None)
    }

    /// The token at a position where `draft` was proposed (speculative decoding): `draft`
    /// itself with the probability this sampler's distribution (penalties, temperature, top-k,
    /// top-p, min-p applied) gives it, otherwise a token drawn from that distribution with
    /// `draft` taken out. The proposal is deterministic, so this is rejection sampling, and the
    /// token is distributed exactly as [`Sampler::sample`]'s over the same row; it counts as
    /// generated. A greedy sampler returns the argmax, as `sample` does. It draws one more
    /// random number than `sample`, so a seeded run differs from one without speculation
    /// (in the tokens drawn, not in their distribution).
    pub fn verify_draft(&mut self, logits: &[f32], draft: u32) -> u32 {
        self.pick(logits, Some((draft, &[(draft, 1.0)])))
    }

    /// The token at a position where `draft` was proposed by drawing from the distribution
    /// `q` (token, probability) of a draft model: `draft` with probability
    /// `min(1, p(draft) / q(draft))` under this sampler's distribution p, otherwise a token
    /// drawn from `max(p - q, 0)` renormalized. The standard rejection step of speculative
    /// sampling: the token is distributed as p whatever q is. `verify_draft` is the case of a
    /// deterministic proposal (q all on `draft`).
    pub fn verify_proposal(&mut self, logits: &[f32], draft: u32, q: &[(u32, f32)]) -> u32 {
        self.pick(logits, Some((draft, q)))
    }

    /// The distribution a draw from this row would follow (penalties, temperature and filters
    /// applied), as (token, probability); a greedy sampler's puts everything on its pick. Nothing
    /// counts as generated.
    pub fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f32)> {
        let row = self.penalized_row(logits);
        let greedy = self.fill_candidates(row.as_deref().unwrap_or(logits));
        if let Some(row) = row {
            self.penalized = row;
        }
        if let Some(id) = greedy {
            return vec![(id, 1.0)];
        }
        let total: f64 = self.candidates.iter().map(|&(_, w)| f64::from(w)).sum();
        self.candidates
            .iter()
            .map(|&(id, w)| (id, (f64::from(w) / total) as f32))
            .collect()
    }

    /// A token drawn from [`Sampler::distribution`], with that distribution (what a draft model
    /// proposes with). It counts as generated.
    pub fn sample_with_distribution(&mut self, logits: &[f32]) -> (u32, Vec<(u32, f32)>) {
        let q = self.distribution(logits);
        self.candidates.clear();
        self.candidates.extend_from_slice(&q);
        let id = self.draw();
        self.count_generated(id);
        (id, q)
    }

    /// `id` counts as generated for the penalties (kept only when one is on).
    fn count_generated(&mut self, id: u32) {
        if let Some(history) = &mut self.history {
            *history.generated.entry(id).or_insert(0) += 1;
        }
    }

    /// The row with the penalties applied, when any is on (in the reused buffer).
    fn penalized_row(&mut self, logits: &[f32]) -> Option<Vec<f32>> {
        let history = self.history.as_ref()?;
        let mut penalized = std::mem::take(&mut self.penalized);
        penalized.clear();
        penalized.extend_from_slice(logits);
        history.penalize(&self.params, &mut penalized);
        Some(penalized)
    }

    fn pick(&mut self, logits: &[f32], proposal: Option<(u32, &[(u32, f32)])>) -> u32 {
        let Some(penalized) = self.penalized_row(logits) else {
            return self.choose(logits, proposal);
        };
        let id = self.choose(&penalized, proposal);
        self.penalized = penalized;
        self.count_generated(id);
        id
    }

    /// Whether every pick is the raw row's argmax (greedy, with no penalty to apply), so an
    /// engine may pick it without handing the row over.
    pub fn picks_argmax(&self) -> bool {
        self.params.is_greedy() && self.history.is_none()
    }

    fn choose(&mut self, logits: &[f32], proposal: Option<(u32, &[(u32, f32)])>) -> u32 {
        if let Some(id) = self.fill_candidates(logits) {
            return id;
        }
        if let Some((draft, q)) = proposal {
            let total: f64 = self.candidates.iter().map(|&(_, w)| f64::from(w)).sum();
            let p_draft = self
                .candidates
                .iter()
                .find(|&&(id, _)| id == draft)
                .map_or(0.0, |&(_, w)| f64::from(w) / total);
            let q_draft = q
                .iter()
                .find(|&&(id, _)| id == draft)
                .map_or(1.0, |&(_, p)| f64::from(p));
            if self.rng.random::<f64>() * q_draft < p_draft {
                return draft;
            }
            // Rejected: the residual max(p - q, 0). A dense copy of q: the candidates may be a
            // whole vocabulary.
            let mut q_dense = vec![0f64; logits.len()];
            for &(id, p) in q {
                if let Some(slot) = q_dense.get_mut(id as usize) {
                    *slot = f64::from(p);
                }
            }
            for c in self.candidates.iter_mut() {
                let p = f64::from(c.1) / total;
                c.1 = (p - q_dense.get(c.0 as usize).copied().unwrap_or(0.0)).max(0.0) as f32;
            }
            self.candidates.retain(|&(_, w)| w > 0.0);
            if self.candidates.is_empty() {
                return draft; // p <= q everywhere: p = q, and the draft stood; only rounding gets here
            }
        }
        self.draw()
    }

    /// Fills `candidates` with the row's tokens and weights after temperature and the filters;
    /// returns the pick itself instead when there is nothing to draw (greedy, or no finite
    /// logit).
    fn fill_candidates(&mut self, logits: &[f32]) -> Option<u32> {
        if self.params.is_greedy() {
            return Some(argmax(logits));
        }
        let Some(max_logit) = logits
            .iter()
            .copied()
            .filter(|logit| logit.is_finite())
            .max_by(f32::total_cmp)
        else {
            return Some(argmax(logits));
        };

        // Weights relative to the most likely token: exp((l - max) / T) is in [0, 1] and
        // cannot overflow, however small T is.
        let inverse_temperature = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, logit)| logit.is_finite())
                .map(|(id, &logit)| (id as u32, ((logit - max_logit) * inverse_temperature).exp()))
                .filter(|&(_, weight)| weight > 0.0),
        );

        if let Some(k) = self.params.top_k {
            if k < self.candidates.len() {
                self.candidates.select_nth_unstable_by(k, by_weight_then_id);
                self.candidates.truncate(k);
            }
        }
        if let Some(top_p) = self.params.top_p {
            keep_nucleus(&mut self.candidates, top_p);
        }
        if let Some(min_p) = self.params.min_p {
            // The most likely candidate has weight 1, so it always stays.
            self.candidates.retain(|&(_, weight)| weight >= min_p);
        }
        None
    }

    fn draw(&mut self) -> u32 {
        let total: f64 = self.candidates.iter().map(|&(_, w)| f64::from(w)).sum();
        let mut target = self.rng.random::<f64>() * total;
        for &(id, weight) in &self.candidates {
            target -= f64::from(weight);
            if target < 0.0 {
                return id;
            }
        }
        // Rounding can leave a sliver past the last candidate; it belongs to the last one.
        self.candidates.last().map_or(0, |&(id, _)| id)
    }
}

impl History {
    fn penalize(&self, params: &SamplingParams, logits: &mut [f32]) {
        let repetition = params.repetition_penalty;
        if repetition != 1.0 {
            let seen = self
                .prompt
                .iter()
                .chain(self.generated.keys().filter(|id| !self.prompt.contains(id)));
            for &id in seen {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / repetition
                    } else {
                        *logit * repetition
                    };
                }
            }
        }
        for (&id, &count) in &self.generated {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit -= params.frequency_penalty * count as f32 + params.presence_penalty;
            }
        }
    }
}

/// Most likely first; equal weights in id order, as [`argmax`] breaks ties.
fn by_weight_then_id(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the shortest most-likely-first prefix whose probability reaches `top_p`, at least one
/// token, in that order. Only the prefix gets sorted, in chunks of 64, 128, ... taken from the
/// unsorted rest until the running sum gets there: for the peaked distributions of language
/// models that is far cheaper than sorting a whole vocabulary.
fn keep_nucleus(candidates: &mut Vec<(u32, f32)>, top_p: f32) {
    let total: f64 = candidates.iter().map(|&(_, w)| f64::from(w)).sum();
    let target = f64::from(top_p) * total;
    let mut cumulative = 0.0;
    // Invariant: candidates[..sorted] are the best `sorted` candidates, in order.
    let mut sorted = 0;
    let mut chunk = 64;
    while sorted < candidates.len() {
        let end = (sorted + chunk).min(candidates.len());
        let rest = &mut candidates[sorted..];
        if end - sorted < rest.len() {
            rest.select_nth_unstable_by(end - sorted, by_weight_then_id);
        }
        candidates[sorted..end].sort_unstable_by(by_weight_then_id);
        for index in sorted..end {
            cumulative += f64::from(candidates[index].1);
            if cumulative >= target {
                candidates.truncate(index + 1);
                return;
            }
        }
        sorted = end;
        chunk *= 2;
    }
    // Rounding kept the sum just under the target: everything stays.
}

fn seed_from_os() -> u64 {
    rand::rngs::OsRng.try_next_u64().unwrap_or_else(|_| {
        // No OS randomness: the clock still differs from run to run.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
    })
}

/// Id of the largest logit; ties go to the lowest id, NaN is never the largest. An empty row
/// gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    // Two branch-free passes the compiler vectorizes (the largest value, then its first
    // position) rather than one branchy pass: a batch of 64 rows of a 128K vocabulary is 8M
    // values per step, which the one-pass loop took 10 ms over. `f32::max` skips NaN.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut rows = logits.chunks_exact(LANES);
    for row in &mut rows {
        for (m, &v) in lanes.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let best = rows
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    logits.iter().position(|&v| v == best).unwrap_or(0) as u32
}

/// Log-probabilities of a row of logits: `l - log(sum(exp(l)))`, computed from the maximum so it
/// neither overflows nor underflows. `-inf` logits stay `-inf`; a row with no finite logit has
/// no distribution and comes back as NaN.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|logit| !logit.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NAN; logits.len()];
    }
    let sum: f64 = logits
        .iter()
        .map(|&logit| f64::from(logit - max).exp())
        .sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&logit| logit - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::greedy()
        }
    }

    /// Logits whose softmax at temperature 1 is `probabilities`.
    fn logits_of(probabilities: &[f32]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln()).collect()
    }

    fn rows() -> Vec<Vec<f32>> {
        vec![
            vec![0.1, 2.0, -1.0, 1.9],
            vec![5.0, 5.0, 1.0],
            vec![-3.0, f32::NAN, -2.5, f32::NEG_INFINITY],
            (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect(),
        ]
    }

    #[test]
    fn argmax_picks_the_largest_and_the_lowest_id_on_ties() {
        let cases: [(&[f32], u32); 7] = [
            (&[0.1, 2.0, -1.0, 1.9], 1),
            (&[5.0, 5.0, 1.0], 0),
            (&[1.0, 3.0, 3.0], 1),
            (&[f32::NAN, -1.0, -2.0], 1),
            (&[f32::NEG_INFINITY, f32::NEG_INFINITY, -50.0], 2),
            (&[-1.0, f32::INFINITY, f32::INFINITY], 1),
            (&[], 0),
        ];
        for (logits, expected) in cases {
            assert_eq!(argmax(logits), expected, "{logits:?}");
        }
        // Rows longer than the vectorized lanes, with NaNs, ties and the maximum in the lanes,
        // in the remainder, or first: the first position of the largest non-NaN value.
        let mut row: Vec<f32> = (0..45).map(|i| ((i * 37) % 11) as f32 - 20.0).collect();
        row[3] = f32::NAN;
        assert_eq!(argmax(&row), 8);
        row[21] = 7.0;
        row[37] = 7.0;
        assert_eq!(argmax(&row), 21);
        row[44] = 8.0;
        assert_eq!(argmax(&row), 44);
        row[0] = f32::INFINITY;
        assert_eq!(argmax(&row), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
    }

    #[test]
    fn greedy_and_top_k_1_and_tiny_top_p_pick_the_argmax() {
        let mut settings = vec![params(0.0)];
        for temperature in [0.1, 1.0, 5.0, 100.0] {
            settings.push(SamplingParams {
                top_k: Some(1),
                ..params(temperature)
            });
            settings.push(SamplingParams {
                top_p: Some(1e-6),
                ..params(temperature)
            });
        }
        for setting in settings {
            let mut sampler = Sampler::new(setting).unwrap();
            for row in rows() {
                for _ in 0..50 {
                    assert_eq!(sampler.sample(&row), argmax(&row), "{setting:?} {row:?}");
                }
            }
        }
    }

    #[test]
    fn same_seed_gives_the_same_tokens() {
        let row: Vec<f32> = (0..500).map(|i| (i % 17) as f32 * 0.3).collect();
        let draws = |seed: u64| {
            let mut sampler = Sampler::new(SamplingParams {
                seed: Some(seed),
                top_p: Some(0.9),
                ..params(1.3)
            })
            .unwrap();
            (0..200).map(|_| sampler.sample(&row)).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
    }

    #[test]
    fn unseeded_sampler_reports_a_seed_that_reproduces_it() {
        let row = logits_of(&[0.25, 0.25, 0.25, 0.25]);
        let mut unseeded = Sampler::new(SamplingParams {
            seed: None,
            ..params(1.0)
        })
        .unwrap();
        let mut reseeded = Sampler::new(SamplingParams {
            seed: Some(unseeded.seed()),
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(unseeded.sample(&row), reseeded.sample(&row));
        }
    }

    fn frequencies(setting: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(setting).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// Pearson's chi-square statistic of `counts` against probabilities `want` (cells with
    /// probability 0 must be empty).
    fn chi_square(counts: &[usize], want: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(want)
            .map(|(&c, &p)| {
                if p == 0.0 {
                    assert_eq!(c, 0, "a token of probability 0 was drawn");
                    0.0
                } else {
                    let e = p * n as f64;
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    /// Speculative decoding's acceptance: whatever token is proposed, `verify_draft` emits
    /// tokens with the sampler's own distribution. 60,000 draws per case over 5 tokens; the
    /// 99.9% quantile of chi-square with 4 degrees of freedom is 18.47, so a correct sampler
    /// fails a case about once in a thousand runs (and the seeds are fixed), while one that
    /// favoured the proposal by even 2% of the mass lands far above it (checked below).
    #[test]
    fn verifying_a_proposal_leaves_the_distribution_unchanged() {
        let probabilities = [0.4f32, 0.25, 0.2, 0.1, 0.05];
        let logits = logits_of(&probabilities);
        let draws = 60_000;
        let filtered = SamplingParams {
            top_k: Some(4),
            ..params(0.7)
        };
        // T = 0.7 then top-4: p_i^(1/0.7) over the first four, renormalized.
        let tempered: Vec<f64> = probabilities[..4]
            .iter()
            .map(|&p| f64::from(p).powf(1.0 / 0.7))
            .collect();
        let sum: f64 = tempered.iter().sum();
        let mut want_filtered: Vec<f64> = tempered.iter().map(|p| p / sum).collect();
        want_filtered.push(0.0);
        let cases = [
            (
                params(1.0),
                probabilities.iter().map(|&p| f64::from(p)).collect(),
            ),
            (filtered, want_filtered),
        ];
        for (case, (setting, want)) in cases.iter().enumerate() {
            // Each proposal: the likeliest token, a middling one, one filtered out (4), one
            // outside the vocabulary.
            for draft in [0u32, 2, 4, 99] {
                let mut sampler = Sampler::new(SamplingParams {
                    seed: Some(1000 + draft as u64 + 10 * case as u64),
                    ..*setting
                })
                .unwrap();
                let mut counts = vec![0usize; probabilities.len()];
                for _ in 0..draws {
                    counts[sampler.verify_draft(&logits, draft) as usize] += 1;
                }
                let stat = chi_square(&counts, want);
                assert!(
                    stat < 18.47,
                    "case {case}, proposal {draft}: chi-square {stat}, counts {counts:?}"
                );
            }
        }
        // The test's power: a distribution moved by 2% of the mass toward token 2 fails it.
        let mut skewed = probabilities.to_vec();
        skewed[2] += 0.02;
        skewed[0] -= 0.02;
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(7),
            ..params(1.0)
        })
        .unwrap();
        let mut counts = vec![0usize; probabilities.len()];
        for _ in 0..draws {
            counts[sampler.sample(&logits_of(&skewed)) as usize] += 1;
        }
        let want: Vec<f64> = probabilities.iter().map(|&p| f64::from(p)).collect();
        assert!(chi_square(&counts, &want) > 18.47);
    }

    /// The draft-model case: proposals drawn from another distribution q (with its own random
    /// stream), each verified against p; the emitted tokens follow p (chi-square as above),
    /// for a q close to p, one far from it, and one that puts no mass where p has much.
    #[test]
    fn verifying_draws_from_a_draft_distribution_leaves_p_unchanged() {
        let p = [0.4f32, 0.25, 0.2, 0.1, 0.05];
        let want: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        let qs: [[f32; 5]; 3] = [
            [0.35, 0.3, 0.2, 0.1, 0.05],
            [0.05, 0.1, 0.2, 0.25, 0.4],
            [0.0, 0.0, 0.5, 0.5, 0.0],
        ];
        for (case, q) in qs.iter().enumerate() {
            let mut target = Sampler::new(SamplingParams {
                seed: Some(50 + case as u64),
                ..params(1.0)
            })
            .unwrap();
            let mut draft = Sampler::new(SamplingParams {
                seed: Some(90 + case as u64),
                ..params(1.0)
            })
            .unwrap();
            let q_logits: Vec<f32> = q
                .iter()
                .map(|&v| if v > 0.0 { v.ln() } else { f32::NEG_INFINITY })
                .collect();
            let mut counts = vec![0usize; p.len()];
            for _ in 0..60_000 {
                let (proposed, q_dist) = draft.sample_with_distribution(&q_logits);
                counts[target.verify_proposal(&logits_of(&p), proposed, &q_dist) as usize] += 1;
            }
            let stat = chi_square(&counts, &want);
            assert!(
                stat < 18.47,
                "q {case}: chi-square {stat}, counts {counts:?}"
            );
        }
    }

    #[test]
    fn verifying_with_a_greedy_sampler_is_the_argmax_and_penalties_count_each_token() {
        let logits = logits_of(&[0.1, 0.6, 0.3]);
        let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(greedy.verify_draft(&logits, 2), 1);
        assert_eq!(greedy.verify_draft(&logits, 1), 1);
        // A verified token counts as generated for the penalties, as a sampled one does.
        let penalized = SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut a = Sampler::new(penalized).unwrap();
        let mut b = Sampler::new(penalized).unwrap();
        let row = [0.0, 3.0, 2.5];
        let by_verify: Vec<u32> = (0..3).map(|_| a.verify_draft(&row, 1)).collect();
        let by_sample: Vec<u32> = (0..3).map(|_| b.sample(&row)).collect();
        assert_eq!(by_verify, by_sample);
        assert_eq!(by_sample, vec![1, 2, 1]);
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        let base = logits_of(&[0.5, 0.3, 0.2]);
        // (settings, logits, expected probabilities)
        let cases = [
            (params(1.0), base.clone(), vec![0.5, 0.3, 0.2]),
            // T = 0.5 squares the probabilities: 25:9:4.
            (
                params(0.5),
                base.clone(),
                vec![25.0 / 38.0, 9.0 / 38.0, 4.0 / 38.0],
            ),
            (
                SamplingParams {
                    top_k: Some(2),
                    ..params(1.0)
                },
                base.clone(),
                vec![0.625, 0.375, 0.0],
            ),
            // 0.5 < 0.7 <= 0.5 + 0.3: the first two stay.
            (
                SamplingParams {
                    top_p: Some(0.7),
                    ..params(1.0)
                },
                base.clone(),
                vec![0.625, 0.375, 0.0],
            ),
            // 0.2 < 0.5 * 0.5 <= 0.3: the last goes.
            (
                SamplingParams {
                    min_p: Some(0.5),
                    ..params(1.0)
                },
                base.clone(),
                vec![0.625, 0.375, 0.0],
            ),
            // After top_k = 2 the second token has 0.375 of the mass, so top_p = 0.6 leaves one.
            (
                SamplingParams {
                    top_k: Some(2),
                    top_p: Some(0.6),
                    ..params(1.0)
                },
                base.clone(),
                vec![1.0, 0.0, 0.0],
            ),
            (
                params(1.0),
                logits_of(&[0.2, 0.5, 0.3])
                    .into_iter()
                    .chain([f32::NAN])
                    .collect(),
                vec![0.2, 0.5, 0.3, 0.0],
            ),
        ];
        for (setting, logits, expected) in cases {
            let seen = frequencies(setting, &logits, 20_000);
            for (token, (&got, &want)) in seen.iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() < 0.02,
                    "{setting:?}: token {token} drawn {got}, expected {want}"
                );
            }
        }
    }

    #[test]
    fn top_k_2_never_draws_the_third_token() {
        let logits = logits_of(&[0.4, 0.35, 0.25]);
        for temperature in [0.5, 1.0, 10.0] {
            let mut sampler = Sampler::new(SamplingParams {
                top_k: Some(2),
                ..params(temperature)
            })
            .unwrap();
            let mut seen = [false; 3];
            for _ in 0..5000 {
                seen[sampler.sample(&logits) as usize] = true;
            }
            assert_eq!(seen, [true, true, false], "temperature {temperature}");
        }
    }

    /// Weights where `heavy` tokens, spread over the vocabulary, hold 0.9 of the mass.
    fn heavy_and_light(heavy: usize, light: usize) -> Vec<(u32, f32)> {
        let stride = (heavy + light) / heavy;
        (0..heavy + light)
            .map(|i| {
                let is_heavy = i % stride == 0 && i / stride < heavy;
                let p = if is_heavy {
                    0.9 / heavy as f32
                } else {
                    0.1 / light as f32
                };
                (i as u32, p / (0.9 / heavy as f32).max(0.1 / light as f32))
            })
            .collect()
    }

    #[test]
    fn nucleus_equals_the_prefix_of_a_full_sort() {
        let ramp: Vec<(u32, f32)> = (0..5000u32)
            .map(|i| (i, ((i * 7919) % 5000) as f32 + 1.0))
            .collect();
        let ties: Vec<(u32, f32)> = (0..300u32)
            .map(|i| (i, if i % 3 == 0 { 1.0 } else { 0.5 }))
            .collect();
        // (candidates, top_p, nucleus size)
        let cases = [
            (heavy_and_light(300, 9700), 0.85, 284),
            (heavy_and_light(10, 9990), 0.5, 6),
            (heavy_and_light(3000, 7000), 0.9, 3000),
            (ramp.clone(), 1.0, 5000),
            (ramp.clone(), 0.5, 1465),
            (ramp, 1e-9, 1),
            (ties, 0.5, 100),
            (vec![(4, 0.5)], 0.1, 1),
        ];
        for (candidates, top_p, size) in cases {
            let mut expected = candidates.clone();
            expected.sort_by(by_weight_then_id);
            let total: f64 = expected.iter().map(|&(_, w)| f64::from(w)).sum();
            let mut cumulative = 0.0;
            let cut = expected
                .iter()
                .position(|&(_, w)| {
                    cumulative += f64::from(w);
                    cumulative >= f64::from(top_p) * total
                })
                .map_or(expected.len(), |index| index + 1);
            expected.truncate(cut);

            let mut got = candidates;
            keep_nucleus(&mut got, top_p);
            assert_eq!(got.len(), size, "top_p {top_p}");
            assert_eq!(got, expected, "top_p {top_p}");
        }
    }

    #[test]
    fn top_p_draws_stay_in_the_nucleus() {
        let weights = heavy_and_light(300, 9700);
        let logits: Vec<f32> = weights.iter().map(|&(_, w)| w.ln()).collect();
        let mut nucleus = weights.clone();
        keep_nucleus(&mut nucleus, 0.85);
        let mut inside = vec![false; logits.len()];
        for &(id, _) in &nucleus {
            inside[id as usize] = true;
        }
        let mut sampler = Sampler::new(SamplingParams {
            top_p: Some(0.85),
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..500 {
            let id = sampler.sample(&logits) as usize;
            assert!(inside[id], "drew token {id} outside the nucleus");
        }
    }

    #[test]
    fn validate_rejects_unusable_settings() {
        let ok = SamplingParams {
            top_k: Some(40),
            top_p: Some(1.0),
            min_p: Some(0.0),
            ..params(0.8)
        };
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..ok
                },
                SamplerError::Temperature(-0.1),
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..ok
                },
                SamplerError::Temperature(f32::INFINITY),
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..ok
                },
                SamplerError::TopK,
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..ok
                },
                SamplerError::TopP(0.0),
            ),
            (
                SamplingParams {
                    top_p: Some(1.01),
                    ..ok
                },
                SamplerError::TopP(1.01),
            ),
            (
                SamplingParams {
                    min_p: Some(-0.01),
                    ..ok
                },
                SamplerError::MinP(-0.01),
            ),
            (
                SamplingParams {
                    min_p: Some(1.5),
                    ..ok
                },
                SamplerError::MinP(1.5),
            ),
        ];
        for (setting, expected) in cases {
            assert_eq!(setting.validate(), Err(expected.clone()), "{setting:?}");
            assert_eq!(Sampler::new(setting).unwrap_err(), expected);
        }
        for nan in [
            SamplingParams {
                temperature: f32::NAN,
                ..ok
            },
            SamplingParams {
                top_p: Some(f32::NAN),
                ..ok
            },
            SamplingParams {
                min_p: Some(f32::NAN),
                ..ok
            },
        ] {
            assert!(nan.validate().is_err(), "{nan:?}");
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        // Token 0 is in the prompt; the sampler then picks 1, 1, 2 (forced by huge logits).
        let run = |params: SamplingParams| {
            let mut sampler = Sampler::new(params).unwrap();
            sampler.observe_prompt(&[0, 0]);
            for forced in [1usize, 1, 2] {
                let mut logits = vec![0.0; 5];
                logits[forced] = 1e6;
                assert_eq!(sampler.sample(&logits), forced as u32);
            }
            let mut penalized = vec![2.0, 2.0, -2.0, 2.0, -2.0];
            sampler
                .history
                .as_ref()
                .expect("penalties keep a history")
                .penalize(sampler.params(), &mut penalized);
            penalized
        };
        let greedy = SamplingParams::greedy();
        let presence = run(SamplingParams {
            presence_penalty: 0.5,
            ..greedy
        });
        assert_eq!(presence, vec![2.0, 1.5, -2.5, 2.0, -2.0]);
        let frequency = run(SamplingParams {
            frequency_penalty: 0.25,
            ..greedy
        });
        assert_eq!(frequency, vec![2.0, 1.5, -2.25, 2.0, -2.0]);
        let repetition = run(SamplingParams {
            repetition_penalty: 2.0,
            ..greedy
        });
        assert_eq!(repetition, vec![1.0, 1.0, -4.0, 2.0, -2.0]);
        let all = run(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..greedy
        });
        assert_eq!(all, vec![1.0, 0.0, -4.75, 2.0, -2.0]);
    }

    #[test]
    fn penalties_change_greedy_choices_and_nothing_when_off() {
        let logits = [1.0, 0.9, 0.1];
        let mut plain = Sampler::new(SamplingParams::greedy()).unwrap();
        assert!(plain.history.is_none(), "no penalty, no history");
        assert_eq!([0; 3].map(|_| plain.sample(&logits)), [0, 0, 0]);
        // Repeating token 0 costs 0.3 after the first pick, so greedy alternates.
        let mut penalized = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!([0; 4].map(|_| penalized.sample(&logits)), [0, 1, 0, 1]);
        // A repetition penalty on the prompt's token moves greedy off it from the start.
        let mut repetition = Sampler::new(SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::greedy()
        })
        .unwrap();
        repetition.observe_prompt(&[0, 7]);
        assert_eq!(repetition.sample(&logits), 1);
    }

    #[test]
    fn penalty_ranges_are_checked() {
        let greedy = SamplingParams::greedy();
        for (params, expected) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..greedy
                },
                SamplerError::PresencePenalty(2.5),
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.5,
                    ..greedy
                },
                SamplerError::FrequencyPenalty(-2.5),
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..greedy
                },
                SamplerError::RepetitionPenalty(0.0),
            ),
        ] {
            assert_eq!(params.validate(), Err(expected));
        }
        for nan in [
            SamplingParams {
                presence_penalty: f32::NAN,
                ..greedy
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..greedy
            },
        ] {
            assert!(nan.validate().is_err());
        }
    }

    #[test]
    fn log_softmax_matches_the_definition() {
        let cases: [&[f32]; 4] = [
            &[1.0, 2.0, 3.0],
            &[1000.0, 1001.0, 999.0],
            &[-1000.0, -1001.0],
            &[0.5, f32::NEG_INFINITY, 0.5],
        ];
        for logits in cases {
            let got = log_softmax(logits);
            let shift = logits[0];
            let sum: f64 = logits.iter().map(|&l| f64::from(l - shift).exp()).sum();
            for (&l, &g) in logits.iter().zip(&got) {
                let want = (f64::from(l - shift) - sum.ln()) as f32;
                if want.is_infinite() {
                    assert_eq!(g, want, "{logits:?}");
                } else {
                    assert!((g - want).abs() < 1e-5, "{logits:?}: {g} vs {want}");
                }
            }
            let total: f64 = got.iter().map(|&g| f64::from(g).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{logits:?} sums to {total}");
        }
        assert!(log_softmax(&[f32::NEG_INFINITY, f32::NAN])
            .iter()
            .all(|g| g.is_nan()));
        assert!(log_softmax(&[]).is_empty());
    }
}
