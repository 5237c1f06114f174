//! Speculative decoding: a sequence's next few tokens are proposed cheaply, then checked in one
//! forward pass of the model over all of them, so that a decode step can emit several tokens
//! for about the cost of one. The scheduler owns the verification (`scheduler.rs`: the pass,
//! the acceptance, the KV positions of rejected tokens dropped); this module owns what is
//! proposed and the configuration.
//!
//! Methods (`--speculative-config` JSON, as FastDeploy and vLLM take it):
//! - `ngram` (alias `ngram_match`): prompt lookup. The sequence's last n tokens (n from
//!   `prompt_lookup_max` down to `prompt_lookup_min`) are looked for earlier in its prompt and
//!   output; the tokens that followed the latest earlier occurrence are the proposal. No extra
//!   weights; it pays off when outputs copy from their context (editing, summarizing, code).
//! - `draft` (alias `draft_model`): a second, smaller plan with the same vocabulary (`"model":
//!   "draft.fdp"`; for example the same model quantized much harder) proposes the tokens, one
//!   draft pass per proposed token over every sequence, with a KV cache of its own.
//! - `mtp` (alias `deepseek_mtp`): the plan's own multi-token-prediction module (DeepSeek-V3's
//!   MTP layer, which fdc compiles into the plan when the checkpoint has its weights). It reads
//!   the model's final hidden state of a position and the token after it, and predicts the token
//!   after that; the scheduler feeds it every position the model computes (its catch-up pass,
//!   which writes its own slot of the sequence's KV blocks), then chains it on its own hidden
//!   state and proposal for further tokens.
//!
//! Exactness does not depend on the proposal: greedy requests keep the longest proposed prefix
//! equal to the model's own argmax at each position, then take the model's token; sampled
//! requests accept each proposed token with the probability the model's (processed) distribution
//! gives it and otherwise sample from that distribution without it ([`crate::sampler::Sampler::verify_draft`]),
//! which leaves every emitted token distributed exactly as without speculation.

use serde::Deserialize;

/// At most this many tokens proposed per step (FastDeploy's limit is 5).
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// What `--speculative-config` sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Tokens proposed per step at most.
    pub num_speculative_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// Prompt lookup over the sequence's own tokens, with n-grams of `min..=max` tokens.
    Ngram { min: usize, max: usize },
    /// A draft plan (loaded by the caller and given to the scheduler).
    Draft { model: std::path::PathBuf },
    /// The served plan's own multi-token-prediction module (DeepSeek-V3's MTP layers, compiled
    /// into the plan by fdc), chained for more than one token.
    Mtp,
}

/// The JSON as written by users; unknown fields are refused so that a typo is not silently
/// ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    method: String,
    num_speculative_tokens: Option<usize>,
    prompt_lookup_max: Option<usize>,
    prompt_lookup_min: Option<usize>,
    /// The draft plan of the `draft` method.
    model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpeculativeConfigError {
    #[error("--speculative-config is not valid JSON of the expected fields: {0}")]
    Json(String),
    #[error("speculative method \"{0}\" is not known; the methods are ngram (alias ngram_match), draft (alias draft_model) and mtp (alias deepseek_mtp)")]
    UnknownMethod(String),
    #[error("speculative method \"{0}\" is not supported yet; use ngram")]
    NotYet(String),
    #[error("num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {0}")]
    Tokens(usize),
    #[error("prompt_lookup_min ({min}) and prompt_lookup_max ({max}) must satisfy 1 <= min <= max <= 64")]
    Lookup { min: usize, max: usize },
    #[error("the draft method needs \"model\": the path of the draft plan")]
    NoDraftModel,
    #[error("the mtp method runs the module compiled into the served plan and takes no \"model\"")]
    MtpModel,
}

impl SpeculativeConfig {
    /// Defaults: 4 tokens, n-grams of 2 to 4 tokens (a single-token match proposes often and
    /// is rarely right, and every proposed token costs a position of the pass).
    pub fn parse(json: &str) -> Result<SpeculativeConfig, SpeculativeConfigError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| SpeculativeConfigError::Json(e.to_string()))?;
        let tokens = raw.num_speculative_tokens.unwrap_or(4);
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&tokens) {
            return Err(SpeculativeConfigError::Tokens(tokens));
        }
        let method = match raw.method.as_str() {
            "ngram" | "ngram_match" => {
                let max = raw.prompt_lookup_max.unwrap_or(4);
                let min = raw.prompt_lookup_min.unwrap_or(max.min(2));
                if !(1 <= min && min <= max && max <= 64) {
                    return Err(SpeculativeConfigError::Lookup { min, max });
                }
                SpeculativeMethod::Ngram { min, max }
            }
            "draft" | "draft_model" => SpeculativeMethod::Draft {
                model: raw
                    .model
                    .ok_or(SpeculativeConfigError::NoDraftModel)?
                    .into(),
            },
            "mtp" | "deepseek_mtp" if raw.model.is_some() => {
                return Err(SpeculativeConfigError::MtpModel)
            }
            "mtp" | "deepseek_mtp" => SpeculativeMethod::Mtp,
            "eagle" | "suffix" => return Err(SpeculativeConfigError::NotYet(raw.method)),
            _ => return Err(SpeculativeConfigError::UnknownMethod(raw.method)),
        };
        Ok(SpeculativeConfig {
            method,
            num_speculative_tokens: tokens,
        })
    }

    /// Up to `limit` tokens to propose after `tokens` (the sequence so far).
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.num_speculative_tokens);
        if limit == 0 {
            return vec![];
        }
        match self.method {
            SpeculativeMethod::Ngram { min, max } => ngram_proposal(tokens, min, max, limit),
            // Proposed by the scheduler's draft or module passes.
            SpeculativeMethod::Draft { .. } | SpeculativeMethod::Mtp => vec![],
        }
    }
}

/// Prompt lookup: for n from `max` down to `min`, the tokens after the latest earlier
/// occurrence of the last n tokens, up to `limit` of them; the first n that matches wins.
/// A plain scan: a sequence is at most a context long, and one scan costs microseconds
/// against a forward pass of milliseconds.
pub fn ngram_proposal(tokens: &[u32], min: usize, max: usize, limit: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (min..=max.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Latest start first; the occurrence must end before the suffix starts to propose
        // anything.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + limit).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    vec![]
}

/// Counters of proposals and acceptances, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculativeStats {
    /// Decode steps of a sequence that carried at least one proposed token.
    pub drafts: u64,
    /// Tokens proposed in all.
    pub draft_tokens: u64,
    /// Proposed tokens accepted in all.
    pub accepted_tokens: u64,
    /// Accepted tokens by position in the proposal (0 is the first proposed token).
    pub accepted_per_position: Vec<u64>,
    /// Proposed tokens by position, the denominators of the per-position acceptance rate.
    pub proposed_per_position: Vec<u64>,
    /// KV blocks the draft model's running sequences hold (the `draft` method).
    pub draft_blocks_held: usize,
}

impl SpeculativeStats {
    /// One verified proposal of `proposed` tokens of which the first `accepted` were kept.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.drafts += 1;
        self.draft_tokens += proposed as u64;
        self.accepted_tokens += accepted as u64;
        if self.proposed_per_position.len() < proposed {
            self.proposed_per_position.resize(proposed, 0);
            self.accepted_per_position.resize(proposed, 0);
        }
        for p in 0..proposed {
            self.proposed_per_position[p] += 1;
            if p < accepted {
                self.accepted_per_position[p] += 1;
            }
        }
    }

    /// Tokens emitted per verified proposal: accepted ones plus the model's own.
    pub fn mean_accepted_length(&self) -> f64 {
        if self.drafts == 0 {
            return 0.0;
        }
        1.0 + self.accepted_tokens as f64 / self.drafts as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_proposes_what_followed_the_latest_earlier_occurrence() {
        // ... 7 8 9 | 1 2 3 | 4 5 ... 1 2 3 | 6 ... 1 2 3  -> after the latest "1 2 3": 6
        let tokens = [7, 8, 9, 1, 2, 3, 4, 5, 1, 2, 3, 6, 1, 2, 3];
        assert_eq!(ngram_proposal(&tokens, 2, 3, 4), vec![6, 1, 2, 3]);
        assert_eq!(ngram_proposal(&tokens, 2, 3, 2), vec![6, 1]);
    }

    #[test]
    fn ngram_prefers_the_longest_match_and_respects_the_minimum() {
        // "5 1" occurs earlier only as a 2-gram ... "x 5 1" never: the 2-gram wins.
        let tokens = [5, 1, 9, 9, 4, 5, 1];
        assert_eq!(ngram_proposal(&tokens, 2, 3, 3), vec![9, 9, 4]);
        // A lone repeated token: only a 1-gram matches, which min 2 refuses.
        let tokens = [3, 8, 4, 6, 3];
        assert_eq!(ngram_proposal(&tokens, 2, 4, 3), Vec::<u32>::new());
        assert_eq!(ngram_proposal(&tokens, 1, 4, 3), vec![8, 4, 6]);
    }

    #[test]
    fn ngram_on_short_or_unrepeated_sequences_proposes_nothing() {
        assert!(ngram_proposal(&[], 1, 4, 4).is_empty());
        assert!(ngram_proposal(&[1], 1, 4, 4).is_empty());
        assert!(ngram_proposal(&[1, 2, 3, 4, 5], 1, 4, 4).is_empty());
        // The proposal stops at the end of the sequence.
        assert_eq!(ngram_proposal(&[1, 2, 1], 1, 1, 4), vec![2, 1]);
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_what_it_cannot_do() {
        let c = SpeculativeConfig::parse(r#"{"method": "ngram"}"#).unwrap();
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!(c.method, SpeculativeMethod::Ngram { min: 2, max: 4 });
        let c = SpeculativeConfig::parse(
            r#"{"method": "ngram_match", "num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 1}"#,
        )
        .unwrap();
        assert_eq!(c.num_speculative_tokens, 3);
        assert_eq!(c.method, SpeculativeMethod::Ngram { min: 1, max: 5 });
        let err = |json: &str| SpeculativeConfig::parse(json).unwrap_err().to_string();
        assert!(err(r#"{"method": "medusa"}"#).contains("not known"));
        assert!(err(r#"{"method": "eagle"}"#).contains("not supported yet"));
        let c =
            SpeculativeConfig::parse(r#"{"method": "mtp", "num_speculative_tokens": 2}"#).unwrap();
        assert_eq!(
            (c.method, c.num_speculative_tokens),
            (SpeculativeMethod::Mtp, 2)
        );
        assert_eq!(
            SpeculativeConfig::parse(r#"{"method": "deepseek_mtp"}"#)
                .unwrap()
                .method,
            SpeculativeMethod::Mtp
        );
        assert!(err(r#"{"method": "mtp", "model": "m.fdp"}"#).contains("takes no"));
        assert!(err(r#"{"method": "draft"}"#).contains("needs \"model\""));
        let c = SpeculativeConfig::parse(
            r#"{"method": "draft_model", "model": "d.fdp", "num_speculative_tokens": 3}"#,
        )
        .unwrap();
        assert_eq!(
            c.method,
            SpeculativeMethod::Draft {
                model: "d.fdp".into()
            }
        );
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 0}"#).contains("between 1"));
        assert!(
            err(r#"{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}"#)
                .contains("prompt_lookup_min")
        );
        assert!(err(r#"{"method": "ngram", "num_speculative_token": 2}"#).contains("not valid"));
        assert!(err("ngram").contains("not valid JSON"));
    }

    #[test]
    fn stats_count_per_position() {
        let mut s = SpeculativeStats::default();
        s.record(3, 1);
        s.record(2, 2);
        s.record(0, 0);
        assert_eq!(s.drafts, 2);
        assert_eq!(s.draft_tokens, 5);
        assert_eq!(s.accepted_tokens, 3);
        assert_eq!(s.proposed_per_position, vec![2, 2, 1]);
        assert_eq!(s.accepted_per_position, vec![2, 1, 0]);
        assert!((s.mean_accepted_length() - 2.5).abs() < 1e-12);
    }
}
