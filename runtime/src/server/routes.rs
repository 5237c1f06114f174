//! The endpoints: request parsing, the chat template and tokenizer, and response bodies, both
//! whole (JSON) and streamed (server-sent events ending with `data: [DONE]`).
//!
//! Every error, including a malformed body, an oversized one and an unknown path, is an OpenAI
//! error body (see `errors`), never the framework's plain-text default.

use crate::generate::FinishReason;
use crate::server::errors::ApiError;
use crate::server::generation::{self, ChoiceEvent, Running, TokenOut};
use crate::server::openai::{ChatCompletionRequest, CompletionRequest, Prompt, Spec};
use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/kv_transfer", get(super::disagg::describe))
        // Metrics name the model and reveal load and traffic: behind the key when there is one.
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .merge(super::admin::routes(state.clone()))
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// Reads the whole request body, within the size limit, before any handler runs, and answers
/// 408 when it does not arrive within `body_read_timeout` of the head (413 past the size limit,
/// 400 when the client breaks off): hyper bounds the wait for a head, nothing bounds a body.
async fn read_body_in_time(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = state.config.max_body_bytes;
    let timeout = state.config.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Err(_elapsed) => return ApiError::body_timeout(timeout).into_response(),
        Ok(Err(e)) => {
            let e = e.into_inner();
            return if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(limit).into_response()
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}")).into_response()
            };
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Counts every response by route and status, for `fdrt:http_requests_total`.
async fn count_responses(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".to_string());
    let response = next.run(request).await;
    state
        .metrics
        .http_response(&route, response.status().as_u16());
    response
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config.api_key {
        if !has_bearer_key(&request, key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Whether `request` carries `Authorization: Bearer <key>`.
pub(super) fn has_bearer_key(request: &Request, key: &str) -> bool {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|given| keys_match(given.trim(), key))
}

/// Compares a given key with the server's in time independent of where they differ and of the
/// given key's length: both are hashed and the digests compared with `blake3::Hash`'s
/// constant-time equality (the crate is already a dependency; hashing first also hides the
/// length, which a plain constant-time slice comparison would not).
pub(crate) fn keys_match(given: &str, key: &str) -> bool {
    blake3::hash(given.as_bytes()) == blake3::hash(key.as_bytes())
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return ApiError::shutting_down().into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state
        .metrics
        .render(&state.scheduler.stats(), &state.disagg);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "fdrt",
        "max_model_len": state.context,
    })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&state)]}))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != state.model_name {
        return Err(ApiError::model_not_found(&id, &state.model_name));
    }
    Ok(Json(model_card(&state)))
}

/// The body as `T`, with a message that says what is wrong with it.
pub(super) fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::too_large(state.config.max_body_bytes))
        }
        Err(rejection) => {
            return Err(ApiError::bad_request(format!(
                "cannot read the request body: {}",
                rejection.body_text()
            )))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_data() {
            "the request body does not match the API"
        } else {
            "the request body is not valid JSON"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Refuses requests for another model, and all of them while draining.
fn check_admission(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    if let Some(model) = model {
        if model != state.model_name {
            return Err(ApiError::model_not_found(model, &state.model_name));
        }
    }
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::shutting_down());
    }
    Ok(())
}

fn need_tokenizer(state: &AppState, param: &str) -> Result<(), ApiError> {
    if state.tokenizer.is_none() {
        return Err(ApiError::invalid(
            param,
            "this plan has no tokenizer (it was compiled from a checkpoint without one): send the prompt to /v1/completions as token ids",
        ));
    }
    Ok(())
}

/// Which endpoint a response is for: the two differ in object names and field layout.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

/// What every response of a request repeats.
struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
    spec: Spec,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatCompletionRequest = parse_body(&state, body)?;
    check_admission(&state, request.common.model.as_deref())?;
    let spec = request.spec(state.vocab)?;
    let messages = request.chat_messages()?;
    need_tokenizer(&state, "messages")?;
    let (Some(tokenizer), Some(template)) = (&state.tokenizer, &state.chat_template) else {
        return Err(ApiError::invalid(
            "messages",
            "this plan has no chat template: use /v1/completions, or compile from a checkpoint that has one",
        ));
    };
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The rendered template already holds the special tokens it wants.
    let ids = tokenizer
        .encode_raw(&text)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prepared = generation::prepare(&state, vec![ids], &spec)?;
    super::disagg::pull_prompt_blocks(&state, &headers, prepared.prompts()).await?;
    let running = generation::start(&state, prepared, &spec)?;
    respond(&state, running, Api::Chat, spec).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(&state, body)?;
    check_admission(&state, request.common.model.as_deref())?;
    let spec = request.spec(state.vocab)?;
    if !spec.stop.is_empty() {
        need_tokenizer(&state, "stop")?;
    }
    let prompts = request.prompts()?;
    if prompts.len() * spec.n > crate::server::openai::MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts x n = {} choices; at most {} are allowed per request",
                prompts.len(),
                prompts.len() * spec.n,
                crate::server::openai::MAX_CHOICES
            ),
        ));
    }
    let mut ids = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        ids.push(match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(text) => {
                need_tokenizer(&state, "prompt")?;
                let tokenizer = state
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| ApiError::invalid("prompt", "no tokenizer"))?;
                tokenizer
                    .encode(&text)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
            }
        });
    }
    let prepared = generation::prepare(&state, ids, &spec)?;
    super::disagg::pull_prompt_blocks(&state, &headers, prepared.prompts()).await?;
    let running = generation::start(&state, prepared, &spec)?;
    respond(&state, running, Api::Completion, spec).await
}

async fn respond(
    state: &Arc<AppState>,
    running: Running,
    api: Api,
    spec: Spec,
) -> Result<Response, ApiError> {
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let meta = Meta {
        api,
        id: state.response_id(prefix),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        model: state.model_name.clone(),
        spec,
    };
    if meta.spec.stream {
        Ok(stream_response(state.clone(), running, meta))
    } else {
        Ok(Json(whole_response(state, running, &meta).await?).into_response())
    }
}

/// Text of one token for logprobs: its decoded text, or `token_id:N` without a tokenizer.
fn token_text(state: &AppState, id: u32) -> String {
    match &state.tokenizer {
        Some(t) => t.decode(&[id]).unwrap_or_else(|_| format!("token_id:{id}")),
        None => format!("token_id:{id}"),
    }
}

/// The `logprobs` object of one choice (or one chunk of it), in the endpoint's layout.
/// `offset` is the text offset of the first token, for the completions layout.
fn logprobs_json(state: &AppState, api: Api, tokens: &[TokenOut], offset: &mut usize) -> Value {
    match api {
        Api::Chat => {
            let entry = |id: u32, logprob: f32| {
                let token = token_text(state, id);
                json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob.unwrap_or(0.0));
                    e["top_logprobs"] = t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| entry(id, lp))
                        .collect();
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Api::Completion => {
            let mut texts = vec![];
            let mut offsets = vec![];
            for t in tokens {
                let text = token_text(state, t.id);
                offsets.push(*offset);
                *offset += text.len();
                texts.push(text);
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let map: serde_json::Map<String, Value> = t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| (token_text(state, id), json!(lp)))
                        .collect();
                    Value::Object(map)
                })
                .collect();
            json!({
                "tokens": texts,
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<TokenOut>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
}

/// Waits for every choice and builds the non-streaming body.
async fn whole_response(
    state: &AppState,
    mut running: Running,
    meta: &Meta,
) -> Result<Value, ApiError> {
    let mut choices: Vec<Collected> = (0..running.choices).map(|_| Collected::default()).collect();
    let mut finished = 0;
    while finished < running.choices {
        let Some(event) = running.events.recv().await else {
            return Err(ApiError::internal(
                "the request's choices ended without finishing",
            ));
        };
        match event {
            ChoiceEvent::Delta {
                index,
                text,
                tokens,
            } => {
                choices[index].text.push_str(&text);
                choices[index].tokens.extend(tokens);
            }
            ChoiceEvent::Finished {
                index,
                reason,
                completion_tokens,
            } => {
                choices[index].finish = Some(reason);
                choices[index].completion_tokens = completion_tokens;
                finished += 1;
            }
            // Dropping `running` on return cancels the other choices.
            ChoiceEvent::Failed { error, .. } => return Err(error),
        }
    }
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let with_ids = meta.spec.return_token_ids || state.tokenizer.is_none();
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = match meta.spec.logprobs {
                Some(_) => logprobs_json(state, meta.api, &c.tokens, &mut 0),
                None => Value::Null,
            };
            let finish = c.finish.map(FinishReason::name);
            let mut choice = match meta.api {
                Api::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
                Api::Completion => json!({
                    "index": index,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            };
            if with_ids {
                choice["token_ids"] = c.tokens.iter().map(|t| t.id).collect();
            }
            choice
        })
        .collect();
    let object = if meta.api == Api::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(running.prompt_tokens, completion_tokens),
    }))
}

/// The state of one SSE response between events.
struct Streamer {
    state: Arc<AppState>,
    running: Running,
    meta: Meta,
    queued: VecDeque<SseEvent>,
    finished: usize,
    completion_tokens: usize,
    /// Text offset of the next token per choice (completions logprobs).
    offsets: Vec<usize>,
    done: bool,
}

impl Streamer {
    fn chunk(&self, choices: Vec<Value>) -> SseEvent {
        let object = if self.meta.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut body = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        });
        if self.meta.spec.include_usage {
            body["usage"] = Value::Null;
        }
        SseEvent::default().data(body.to_string())
    }

    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Option<FinishReason>,
        logprobs: Value,
        ids: Option<Vec<u32>>,
    ) -> Value {
        let mut choice = match self.meta.api {
            Api::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::name)})
            }
            Api::Completion => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish.map(FinishReason::name),
            }),
        };
        if let Some(ids) = ids {
            choice["token_ids"] = ids.into();
        }
        choice
    }

    fn on_event(&mut self, event: ChoiceEvent) {
        match event {
            ChoiceEvent::Delta {
                index,
                text,
                tokens,
            } => {
                let logprobs = match self.meta.spec.logprobs {
                    Some(_) => logprobs_json(
                        &self.state,
                        self.meta.api,
                        &tokens,
                        &mut self.offsets[index],
                    ),
                    None => Value::Null,
                };
                let ids = (self.meta.spec.return_token_ids || self.state.tokenizer.is_none())
                    .then(|| tokens.iter().map(|t| t.id).collect());
                let choice = self.choice(index, Some(&text), None, logprobs, ids);
                let event = self.chunk(vec![choice]);
                self.queued.push_back(event);
            }
            ChoiceEvent::Finished {
                index,
                reason,
                completion_tokens,
            } => {
                self.finished += 1;
                self.completion_tokens += completion_tokens;
                let ids = (self.meta.spec.return_token_ids || self.state.tokenizer.is_none())
                    .then(Vec::new);
                let choice = self.choice(index, None, Some(reason), Value::Null, ids);
                let event = self.chunk(vec![choice]);
                self.queued.push_back(event);
            }
            ChoiceEvent::Failed { error, .. } => {
                // The status line is long gone: report the error in the stream, then end it.
                let body = json!({"error": error.detail()});
                self.queued
                    .push_back(SseEvent::default().data(body.to_string()));
                self.finish_stream(false);
            }
        }
        if self.finished == self.running.choices && !self.done {
            self.finish_stream(true);
        }
    }

    fn finish_stream(&mut self, complete: bool) {
        if complete && self.meta.spec.include_usage {
            let body = json!({
                "id": self.meta.id,
                "object": if self.meta.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [],
                "usage": usage(self.running.prompt_tokens, self.completion_tokens),
            });
            self.queued
                .push_back(SseEvent::default().data(body.to_string()));
        }
        self.queued.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

fn stream_response(state: Arc<AppState>, running: Running, meta: Meta) -> Response {
    let choices = running.choices;
    let mut streamer = Streamer {
        state,
        running,
        meta,
        queued: VecDeque::new(),
        finished: 0,
        completion_tokens: 0,
        offsets: vec![0; choices],
        done: false,
    };
    if streamer.meta.api == Api::Chat {
        // The first chunk of each choice names the role, as OpenAI's does.
        for index in 0..choices {
            let mut choice = streamer.choice(index, Some(""), None, Value::Null, None);
            choice["delta"]["role"] = "assistant".into();
            let event = streamer.chunk(vec![choice]);
            streamer.queued.push_back(event);
        }
    }
    // Dropping the stream (the client went away) drops `running`, which ends the choice tasks
    // and so cancels their requests.
    let events = futures_util::stream::unfold(streamer, |mut s| async move {
        loop {
            if let Some(event) = s.queued.pop_front() {
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            match s.running.events.recv().await {
                Some(event) => s.on_event(event),
                None => {
                    let error = ApiError::internal("the request's choices ended without finishing");
                    s.on_event(ChoiceEvent::Failed { error });
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::keys_match;

    #[test]
    fn keys_match_only_when_equal() {
        let key = "sekret-key";
        assert!(keys_match("sekret-key", key));
        for given in [
            "",
            "sekret",
            "sekret-key2",
            "sekret-kez",
            "SEKRET-KEY",
            " sekret-key",
        ] {
            assert!(!keys_match(given, key), "{given:?}");
        }
    }
}
