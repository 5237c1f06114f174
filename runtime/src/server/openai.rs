//! The request side of the OpenAI API: the JSON bodies of `/v1/chat/completions` and
//! `/v1/completions`, and their validation into what the scheduler takes.
//!
//! Fields are read leniently (unknown fields are ignored, `null` means absent, integers are read
//! as `i64`) so that a bad value is reported by the check that knows its meaning and its limits
//! ("max_tokens must be at least 1, got -3", with `param` set) rather than by a generic
//! deserialization error.

use crate::chat::ChatMessage;
use crate::sampler::SamplingParams;
use crate::server::errors::ApiError;
use serde::Deserialize;
use serde_json::Value;

/// Choices one request may ask for (`n` times the number of prompts): each is a sequence in the
/// scheduler, and a request should not be able to fill the queue alone.
pub const MAX_CHOICES: usize = 64;
/// Stop strings per request at most; each is searched in every new piece of text.
pub const MAX_STOP_STRINGS: usize = 16;
/// Alternatives per token at most, as in the OpenAI API.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// An extension (as in vLLM): also return the generated token ids of each choice.
    pub return_token_ids: Option<bool>,
    /// An extension: `false` opts this request out of speculative decoding when the server
    /// has it on (`--speculative-config`); the output is the same either way.
    pub speculative: Option<bool>,
}

/// A content part of a chat message; only `text` parts are understood.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: CommonFields,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list of strings, a list of token ids, or a list of such lists.
    pub prompt: Value,
    #[serde(flatten)]
    pub common: CommonFields,
    /// Alternatives per token, 0 to 20 (the sampled token's log-probability is always given).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// One prompt of a completions request, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// What every choice of a request asks for, checked.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub n: usize,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token; `Some` also asks for each token's own log-probability.
    pub logprobs: Option<usize>,
    pub return_token_ids: bool,
    pub speculative: bool,
}

fn check_unit(param: &str, value: Option<f64>, allow_zero: bool) -> Result<Option<f32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_finite() && v <= 1.0 && (v > 0.0 || (allow_zero && v == 0.0)) => {
            Ok(Some(v as f32))
        }
        Some(v) => {
            let range = if allow_zero { "[0, 1]" } else { "(0, 1]" };
            Err(ApiError::invalid(
                param,
                format!("{param} must be in {range}, got {v}"),
            ))
        }
    }
}

fn check_penalty(param: &str, value: Option<f64>, neutral: f32) -> Result<f32, ApiError> {
    match value {
        None => Ok(neutral),
        Some(v) if (-2.0..=2.0).contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid(
            param,
            format!("{param} must be in [-2, 2], got {v}"),
        )),
    }
}

fn positive(param: &str, value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
        Some(v) => Err(ApiError::invalid(
            param,
            format!("{param} must be at least 1, got {v}"),
        )),
    }
}

impl CommonFields {
    /// Checks every field. `vocab` bounds token ids; `max_tokens`, when given, is the
    /// endpoint's own limit field (`max_completion_tokens`), named `max_tokens_param` in errors,
    /// and takes precedence over `max_tokens`.
    pub fn validate(
        &self,
        vocab: usize,
        max_tokens: Option<i64>,
        max_tokens_param: &str,
    ) -> Result<Spec, ApiError> {
        let max_tokens = positive(max_tokens_param, max_tokens.or(self.max_tokens))?;
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be a number >= 0 (0 is greedy), got {temperature}"),
            ));
        }
        let top_p = check_unit("top_p", self.top_p, false)?;
        let min_p = check_unit("min_p", self.min_p, true)?;
        // -1 and 0 switch top-k off, as in vLLM.
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1 (off) or at least 1, got {k}"),
                ))
            }
        };
        let n = positive("n", self.n)?.unwrap_or(1);
        if n > MAX_CHOICES {
            return Err(ApiError::invalid(
                "n",
                format!("n must be at most {MAX_CHOICES}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        let mut stop_token_ids = vec![];
        for &id in self.stop_token_ids.iter().flatten() {
            match u32::try_from(id) {
                Ok(id) if (id as usize) < vocab => stop_token_ids.push(id),
                _ => {
                    return Err(ApiError::invalid(
                        "stop_token_ids",
                        format!(
                            "stop token id {id} is out of range: the vocabulary has {vocab} tokens"
                        ),
                    ))
                }
            }
        }
        // Ranges as OpenAI documents them (and vLLM checks them).
        let presence_penalty = check_penalty("presence_penalty", self.presence_penalty, 0.0)?;
        let frequency_penalty = check_penalty("frequency_penalty", self.frequency_penalty, 0.0)?;
        let repetition_penalty = match self.repetition_penalty {
            None => 1.0,
            Some(v) if v.is_finite() && v > 0.0 => v as f32,
            Some(v) => {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("repetition_penalty must be a number > 0 (1 is off), got {v}"),
                ))
            }
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        Ok(Spec {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p,
                min_p,
                // Any integer is a seed: negative ones keep their bits.
                seed: self.seed.map(|s| s as u64),
                presence_penalty,
                frequency_penalty,
                repetition_penalty,
            },
            stop,
            stop_token_ids,
            n,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stream,
            include_usage,
            logprobs: None,
            return_token_ids: self.return_token_ids.unwrap_or(false),
            speculative: self.speculative.unwrap_or(true),
        })
    }
}

impl ChatCompletionRequest {
    pub fn spec(&self, vocab: usize) -> Result<Spec, ApiError> {
        let (limit, param) = match self.max_completion_tokens {
            Some(v) => (Some(v), "max_completion_tokens"),
            None => (self.common.max_tokens, "max_tokens"),
        };
        let mut spec = self.common.validate(vocab, limit, param)?;
        let top = match self.top_logprobs {
            None => 0,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                ))
            }
        };
        match self.logprobs {
            Some(true) => spec.logprobs = Some(top),
            _ if self.top_logprobs.is_some_and(|k| k > 0) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                ))
            }
            _ => {}
        }
        Ok(spec)
    }

    /// The conversation as the chat template takes it. System, developer (a newer name for
    /// system), user and assistant turns are accepted; content parts other than text are not.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!("role `{other}` is not supported: use system, user or assistant"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut texts = vec![];
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => texts.push(t.as_str()),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    "a text content part needs a `text` field",
                                ))
                            }
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content parts of type `{kind}` are not supported: this model reads text only"),
                                ))
                            }
                        }
                    }
                    // Parts are separate paragraphs of one message.
                    texts.join("\n")
                }
            };
            out.push(ChatMessage::new(role, content));
        }
        Ok(out)
    }
}

impl CompletionRequest {
    pub fn spec(&self, vocab: usize) -> Result<Spec, ApiError> {
        let mut spec = self.common.validate(vocab, None, "max_tokens")?;
        // The legacy API's default, as OpenAI and vLLM have it.
        spec.max_tokens = Some(spec.max_tokens.unwrap_or(16));
        spec.logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                ))
            }
        };
        if self.echo == Some(true) {
            return Err(ApiError::unsupported("echo", "echo is not supported yet"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        if let Some(best_of) = self.best_of {
            if best_of != spec.n as i64 {
                return Err(ApiError::unsupported(
                    "best_of",
                    "best_of is not supported (only best_of = n)",
                ));
            }
        }
        Ok(spec)
    }

    /// The prompts, one per group of `n` choices.
    pub fn prompts(&self) -> Result<Vec<Prompt>, ApiError> {
        let bad = || {
            ApiError::invalid(
                "prompt",
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            )
        };
        let ids = |v: &[Value]| -> Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(bad)
                })
                .collect()
        };
        let prompts = match &self.prompt {
            Value::String(s) => vec![Prompt::Text(s.clone())],
            Value::Array(items) if items.is_empty() => {
                return Err(ApiError::invalid("prompt", "prompt is empty"))
            }
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
                .collect(),
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![Prompt::Ids(ids(items)?)]
            }
            Value::Array(items) if items.iter().all(Value::is_array) => items
                .iter()
                .map(|v| ids(v.as_array().map(Vec::as_slice).unwrap_or_default()).map(Prompt::Ids))
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        };
        Ok(prompts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(body: Value) -> CompletionRequest {
        serde_json::from_value(body).expect("parses")
    }

    #[test]
    fn prompts_of_every_shape() {
        let cases = [
            (json!("hi"), vec![Prompt::Text("hi".into())]),
            (
                json!(["a", "b"]),
                vec![Prompt::Text("a".into()), Prompt::Text("b".into())],
            ),
            (json!([1, 2, 3]), vec![Prompt::Ids(vec![1, 2, 3])]),
            (
                json!([[1], [2, 3]]),
                vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])],
            ),
        ];
        for (prompt, want) in cases {
            assert_eq!(
                completion(json!({"prompt": prompt})).prompts().unwrap(),
                want,
                "{prompt}"
            );
        }
        for prompt in [
            json!([]),
            json!([1, "a"]),
            json!([-1]),
            json!(3),
            json!({"a": 1}),
            json!([1.5]),
        ] {
            let e = completion(json!({"prompt": prompt})).prompts().unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{prompt}");
        }
    }

    #[test]
    fn invalid_values_name_their_param() {
        let cases = [
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -3}), "max_tokens"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"min_p": -0.1}), "min_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 0}), "n"),
            (json!({"n": 1000}), "n"),
            (json!({"stop": ["a", ""]}), "stop"),
            (json!({"stop_token_ids": [100]}), "stop_token_ids"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -2.01}), "frequency_penalty"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"repetition_penalty": -1.0}), "repetition_penalty"),
            (json!({"logprobs": 21}), "logprobs"),
            (json!({"echo": true}), "echo"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ];
        for (fields, param) in cases {
            let mut body = fields.clone();
            body["prompt"] = json!([1]);
            let e = completion(body).spec(100).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{fields}: {e:?}");
            assert_eq!(e.status.as_u16(), 400);
        }
    }

    #[test]
    fn defaults_and_neutral_values_are_accepted() {
        let spec = completion(
            json!({"prompt": "x", "presence_penalty": 0, "repetition_penalty": 1,
                                     "top_k": -1, "stop": "END", "seed": -1, "n": 2}),
        )
        .spec(100)
        .unwrap();
        assert_eq!(spec.max_tokens, Some(16));
        assert_eq!(spec.sampling.temperature, 1.0);
        assert_eq!(spec.sampling.top_k, None);
        assert_eq!(spec.sampling.seed, Some(u64::MAX));
        assert_eq!(spec.stop, vec!["END".to_string()]);
        assert_eq!(spec.n, 2);
        assert_eq!(spec.logprobs, None);
    }

    #[test]
    fn penalties_reach_the_sampler() {
        let spec = completion(json!({"prompt": "x", "presence_penalty": 0.5,
                                     "frequency_penalty": -1.0, "repetition_penalty": 1.3}))
        .spec(100)
        .unwrap();
        assert_eq!(spec.sampling.presence_penalty, 0.5);
        assert_eq!(spec.sampling.frequency_penalty, -1.0);
        assert_eq!(spec.sampling.repetition_penalty, 1.3);
        let neutral = completion(json!({"prompt": "x"})).spec(100).unwrap();
        assert!(!neutral.sampling.has_penalties());
    }

    #[test]
    fn chat_limits_logprobs_and_content_parts() {
        let chat = |body: Value| -> ChatCompletionRequest { serde_json::from_value(body).unwrap() };
        let req = chat(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null}],
            "max_completion_tokens": 5, "max_tokens": 9, "logprobs": true, "top_logprobs": 3}));
        let spec = req.spec(100).unwrap();
        assert_eq!(spec.max_tokens, Some(5));
        assert_eq!(spec.logprobs, Some(3));
        assert_eq!(
            req.chat_messages().unwrap(),
            vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "a\nb"),
                ChatMessage::new("assistant", "")
            ]
        );
        let e = chat(json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}))
            .spec(100)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}))
            .chat_messages()
            .unwrap_err();
        assert!(e.message.contains("image_url"), "{e:?}");
        let e = chat(json!({"messages": [{"role": "tool", "content": "x"}]}))
            .chat_messages()
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert!(chat(json!({"messages": []})).chat_messages().is_err());
    }
}
