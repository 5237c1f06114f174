//! Running the choices of one HTTP request: checking prompts against the context, submitting
//! one scheduler request per choice, and one task per choice that turns its token events into
//! text (incremental decoding, stop strings) and forwards them on a channel the response reads.
//!
//! Cancellation is by dropping: a task ends when its channel's receiver is gone (the client
//! disconnected, or the handler's future was dropped), when a stop string matched, or at the
//! drain deadline; ending drops the task's `RequestStream`, which cancels the scheduler request
//! and frees its slot at the next step.

use crate::generate::FinishReason;
use crate::scheduler::{Event, RequestParams, RequestStream, TokenEvent};
use crate::server::errors::ApiError;
use crate::server::metrics::{Outcome, RequestTimings};
use crate::server::openai::Spec;
use crate::server::AppState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// One generated token as responses report it.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What a choice task reports.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// New text (possibly empty when token ids are reported) and the tokens that produced it.
    Delta {
        index: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        completion_tokens: usize,
    },
    Failed {
        error: ApiError,
    },
}

/// Counts a generation request as in flight until dropped, so that a drain knows when every
/// response has been written.
pub struct InFlight(Arc<AppState>);

impl InFlight {
    pub fn new(state: &Arc<AppState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The choices of one request, running.
pub struct Running {
    pub events: mpsc::UnboundedReceiver<ChoiceEvent>,
    pub choices: usize,
    /// Prompt tokens, each prompt counted once however many choices it has.
    pub prompt_tokens: usize,
    pub _in_flight: InFlight,
}

/// What every choice task of a request needs besides its stream.
struct ChoiceConfig {
    stop: Vec<String>,
    /// Tokens that end a choice: they are counted but are not part of its text.
    stop_token_ids: Vec<u32>,
    /// Report every token, even one that adds no text (token ids were asked for, or there is no
    /// tokenizer to make text).
    every_token: bool,
}

/// A request checked and counted as in flight, not submitted yet ([`prepare`], then
/// [`start`]; a decode instance takes the prompts' KV blocks in between).
pub struct Prepared {
    in_flight: InFlight,
    prompts: Vec<Vec<u32>>,
    submissions: Vec<(Vec<u32>, RequestParams)>,
}

impl Prepared {
    pub fn prompts(&self) -> &[Vec<u32>] {
        &self.prompts
    }
}

/// Checks `prompts` against the vocabulary and the context, and counts the request as in
/// flight (a drain waits for it from here on).
pub fn prepare(
    state: &Arc<AppState>,
    prompts: Vec<Vec<u32>>,
    spec: &Spec,
) -> Result<Prepared, ApiError> {
    let in_flight = InFlight::new(state);
    let mut submissions = vec![];
    for (p, prompt) in prompts.iter().enumerate() {
        let param = if prompts.len() > 1 {
            format!("prompt[{p}]")
        } else {
            "prompt".to_string()
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                &param,
                "the prompt is empty (it has no tokens)",
            ));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= state.vocab) {
            return Err(ApiError::invalid(
                &param,
                format!(
                    "token id {bad} is out of range: the vocabulary has {} tokens",
                    state.vocab
                ),
            ));
        }
        let context = state.context;
        if prompt.len() >= context {
            return Err(ApiError::invalid(
                &param,
                format!(
                    "the prompt has {} tokens but the model's context holds {context}, leaving no room for a completion",
                    prompt.len()
                ),
            ));
        }
        let max_tokens = match spec.max_tokens {
            Some(m) if prompt.len().saturating_add(m) > context => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "the model's context holds {context} tokens, but the prompt has {} and max_tokens asks for {m} more ({} in all)",
                        prompt.len(),
                        prompt.len().saturating_add(m)
                    ),
                ))
            }
            Some(m) => m,
            None => context - prompt.len(),
        };
        for j in 0..spec.n {
            let mut sampling = spec.sampling;
            // Choices of one prompt draw different samples from one seed, reproducibly.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
            let params = RequestParams {
                max_tokens,
                sampling,
                stop_token_ids: spec.stop_token_ids.clone(),
                ignore_eos: spec.ignore_eos,
                logprobs: spec.logprobs,
                speculative: spec.speculative,
            };
            submissions.push((prompt.clone(), params));
        }
    }
    Ok(Prepared {
        in_flight,
        prompts,
        submissions,
    })
}

/// Submits `spec.n` choices per prompt (choice `p * n + j` is the `j`-th of prompt `p`). On any
/// refusal, the choices already submitted are cancelled and the error is returned.
pub fn start(state: &Arc<AppState>, prepared: Prepared, spec: &Spec) -> Result<Running, ApiError> {
    let Prepared {
        in_flight,
        prompts,
        submissions,
    } = prepared;
    let mut stop_token_ids = spec.stop_token_ids.clone();
    if !spec.ignore_eos {
        stop_token_ids.extend(&state.eos_token_ids);
    }
    let config = Arc::new(ChoiceConfig {
        stop: spec.stop.clone(),
        stop_token_ids,
        every_token: spec.return_token_ids || state.tokenizer.is_none(),
    });
    let mut streams = Vec::with_capacity(submissions.len());
    for (prompt, params) in submissions {
        let tokens = prompt.len();
        // A refusal drops `streams`, cancelling what was already submitted.
        streams.push((
            state.scheduler.submit(prompt, params)?,
            tokens,
            Instant::now(),
        ));
    }
    let (tx, events) = mpsc::unbounded_channel();
    let choices = streams.len();
    for (index, (stream, tokens, submitted)) in streams.into_iter().enumerate() {
        state.metrics.prompt(tokens);
        tokio::spawn(drive_choice(
            state.clone(),
            config.clone(),
            index,
            stream,
            tx.clone(),
            submitted,
        ));
    }
    Ok(Running {
        events,
        choices,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        _in_flight: in_flight,
    })
}

/// Holds back text that may be the start of a stop string until it is known not to be.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
}

enum Fed {
    /// Text that can no longer be part of a stop string.
    Emit(String),
    /// A stop string matched: the text before it; the choice is over.
    Stopped(String),
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    fn feed(&mut self, piece: &str) -> Fed {
        self.pending.push_str(piece);
        if self.stops.is_empty() {
            return Fed::Emit(std::mem::take(&mut self.pending));
        }
        // Everything before `pending` was checked already, and no stop string can begin there.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(at);
            return Fed::Stopped(text);
        }
        // The longest tail of `pending` that begins some stop string stays behind.
        let keep_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let kept = self.pending.split_off(keep_from);
        Fed::Emit(std::mem::replace(&mut self.pending, kept))
    }

    /// The text held back when generation ends: an unfinished stop string is just text.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Forwards one choice's events as text until it finishes, fails, or nobody listens.
async fn drive_choice(
    state: Arc<AppState>,
    config: Arc<ChoiceConfig>,
    index: usize,
    mut stream: RequestStream,
    tx: mpsc::UnboundedSender<ChoiceEvent>,
    submitted: Instant,
) {
    let mut decoder = state.tokenizer.as_ref().map(|t| t.stream_decoder());
    let mut stop = StopMatcher::new(&config.stop);
    let mut abort = state.abort.subscribe();
    let mut pending_tokens: Vec<TokenOut> = vec![];
    let mut generated = 0usize;
    let mut first_token: Option<Instant> = None;
    let mut last_token: Option<Instant> = None;
    let timings =
        |first: Option<Instant>, last: Option<Instant>, generated: usize| RequestTimings {
            time_to_first_token: first.map(|f| f - submitted),
            time_per_output_token: match (first, last) {
                (Some(f), Some(l)) if generated > 1 => Some((l - f) / (generated as u32 - 1)),
                _ => None,
            },
            end_to_end: submitted.elapsed(),
        };
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = tx.closed() => {
                state.metrics.finished(Outcome::Abort, &timings(first_token, last_token, generated));
                return;
            }
            _ = abort.wait_for(|aborted| *aborted) => {
                let error = ApiError {
                    message: "the server shut down before the request finished".into(),
                    ..ApiError::shutting_down()
                };
                let _ = tx.send(ChoiceEvent::Failed { error });
                state.metrics.finished(Outcome::Abort, &timings(first_token, last_token, generated));
                return;
            }
        };
        match event {
            Some(Event::Token(TokenEvent {
                id,
                logprob,
                top_logprobs,
            })) => {
                let now = Instant::now();
                state.metrics.token(last_token.map(|l| now - l));
                first_token.get_or_insert(now);
                last_token = Some(now);
                generated += 1;
                if config.stop_token_ids.contains(&id) {
                    // The scheduler ends the request right after this token.
                    continue;
                }
                let piece = match decoder.as_mut().map(|d| d.push(id)) {
                    Some(Ok(piece)) => piece,
                    Some(Err(e)) => {
                        let _ = tx.send(ChoiceEvent::Failed {
                            error: ApiError::internal(e.to_string()),
                        });
                        state
                            .metrics
                            .finished(Outcome::Error, &timings(first_token, last_token, generated));
                        return;
                    }
                    None => String::new(),
                };
                pending_tokens.push(TokenOut {
                    id,
                    logprob,
                    top_logprobs,
                });
                match stop.feed(&piece) {
                    Fed::Stopped(text) => {
                        let tokens = std::mem::take(&mut pending_tokens);
                        let _ = tx.send(ChoiceEvent::Delta {
                            index,
                            text,
                            tokens,
                        });
                        let _ = tx.send(ChoiceEvent::Finished {
                            index,
                            reason: FinishReason::Stop,
                            completion_tokens: generated,
                        });
                        state
                            .metrics
                            .finished(Outcome::Stop, &timings(first_token, last_token, generated));
                        return; // dropping `stream` cancels the rest of the generation
                    }
                    Fed::Emit(text) => {
                        if !text.is_empty() || config.every_token {
                            let tokens = std::mem::take(&mut pending_tokens);
                            let _ = tx.send(ChoiceEvent::Delta {
                                index,
                                text,
                                tokens,
                            });
                        }
                    }
                }
            }
            Some(Event::Done {
                reason,
                completion_tokens,
                ..
            }) => {
                let tail = match decoder.take().map(|d| d.finish()) {
                    Some(Ok(tail)) => tail,
                    Some(Err(e)) => {
                        let _ = tx.send(ChoiceEvent::Failed {
                            error: ApiError::internal(e.to_string()),
                        });
                        state
                            .metrics
                            .finished(Outcome::Error, &timings(first_token, last_token, generated));
                        return;
                    }
                    None => String::new(),
                };
                let (text, reason) = match stop.feed(&tail) {
                    Fed::Stopped(text) => (text, FinishReason::Stop),
                    Fed::Emit(mut text) => {
                        text.push_str(&stop.finish());
                        (text, reason)
                    }
                };
                if !text.is_empty() || !pending_tokens.is_empty() {
                    let _ = tx.send(ChoiceEvent::Delta {
                        index,
                        text,
                        tokens: std::mem::take(&mut pending_tokens),
                    });
                }
                let _ = tx.send(ChoiceEvent::Finished {
                    index,
                    reason,
                    completion_tokens,
                });
                let outcome = match reason {
                    FinishReason::Stop => Outcome::Stop,
                    FinishReason::Length => Outcome::Length,
                };
                state
                    .metrics
                    .finished(outcome, &timings(first_token, last_token, generated));
                return;
            }
            Some(Event::Failed(message)) => {
                let _ = tx.send(ChoiceEvent::Failed {
                    error: ApiError::internal(message),
                });
                state
                    .metrics
                    .finished(Outcome::Error, &timings(first_token, last_token, generated));
                return;
            }
            None => {
                let error = ApiError::internal("the engine stopped before the request finished");
                let _ = tx.send(ChoiceEvent::Failed { error });
                state
                    .metrics
                    .finished(Outcome::Error, &timings(first_token, last_token, generated));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`, then finishes; returns what was emitted and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = vec![];
        for p in pieces {
            match m.feed(p) {
                Fed::Emit(t) => out.push(t),
                Fed::Stopped(t) => {
                    out.push(t);
                    return (out, true);
                }
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_pieces_are_found_and_cut() {
        let (out, stopped) = run(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert!(stopped);
        assert_eq!(out.concat(), "abc");
        // "E" and "N" were held back, not emitted before the match.
        assert_eq!(out, vec!["ab", "c", "", ""]);
    }

    #[test]
    fn held_text_is_released_when_it_cannot_start_a_stop() {
        let (out, stopped) = run(&["END", "\n\n"], &["E", "x", "\n", "y", "EN"]);
        assert!(!stopped);
        // "EN" may still become "END": only the end of generation releases it.
        assert_eq!(out, vec!["", "Ex", "", "\ny", "", "EN"]);
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_kept_whole() {
        let (out, stopped) = run(&["b", "é!"], &["aé!b"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
        let (out, stopped) = run(&["ü"], &["é", "ü"]);
        assert!(stopped);
        assert_eq!(out.concat(), "é");
    }

    #[test]
    fn without_stops_everything_passes_at_once() {
        let (out, stopped) = run(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
