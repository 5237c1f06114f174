//! The load generator behind `fdrt bench-serve`: N concurrent clients stream completions from an
//! OpenAI-compatible server and report throughput and latency percentiles (time to first token,
//! time per output token, inter-token latency, end to end).
//!
//! Prompts are random token ids, and every request sets `ignore_eos`, so each request costs
//! exactly the prompt and output lengths drawn for it (uniform within `range_ratio` of the
//! means): the numbers measure the server, not what the model happens to say. Each request opens
//! its own HTTP/1.1 connection, as independent clients would.
//!
//! Two options shape the workload for the KV-cache figures: `shared_prefix_len` starts every
//! prompt with the same tokens (a system prompt, for prefix caching), and `long_prompt` sends
//! one extra request with a very long prompt once the others are decoding, and reports the
//! inter-token latency the other streams saw while it was being admitted (chunked prefill).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// `host:port` of the server.
    pub address: String,
    /// The model name to send; `None` asks the server's `/v1/models`.
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// Clients sending requests at once.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    /// Mean prompt and output lengths in tokens.
    pub input_len: usize,
    pub output_len: usize,
    /// Lengths are uniform in `[mean * (1 - r), mean * (1 + r)]`.
    pub range_ratio: f64,
    /// Prompt token ids are drawn from `[low, high)`.
    pub token_range: (u32, u32),
    pub seed: u64,
    /// Tokens every prompt starts with (the same for all), before its own `input_len`.
    pub shared_prefix_len: usize,
    /// One extra request with a prompt of this many tokens (and one output token), sent this
    /// many seconds after the start.
    pub long_prompt: Option<(usize, f64)>,
}

/// What the other streams saw while the long prompt was admitted.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LongPromptReport {
    pub prompt_tokens: usize,
    /// From sending it to its first token.
    pub ttft_ms: f64,
    /// Gaps between tokens of the other streams that ended inside that window.
    pub itl_during: Percentiles,
    pub max_itl_during_ms: f64,
    pub gaps_during: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("invalid options: {0}")]
    Options(String),
}

/// p50, p90 and p99 of one measure, in milliseconds, plus the mean.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Percentiles {
    /// Linear interpolation between closest ranks; all zeros for no samples.
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (ms.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            ms[lo] + (ms[hi] - ms[lo]) * (pos - lo as f64)
        };
        Percentiles {
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub concurrency: usize,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub request_throughput: f64,
    /// Output tokens per second over the whole run.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    pub ttft: Percentiles,
    pub tpot: Percentiles,
    pub itl: Percentiles,
    pub e2e: Percentiles,
    pub long_prompt: Option<LongPromptReport>,
    /// The first few failures' messages.
    pub errors: Vec<String>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model {}, concurrency {}: {} requests ok, {} failed in {:.2} s",
            self.model, self.concurrency, self.completed, self.failed, self.duration_s
        )?;
        writeln!(
            f,
            "tokens: {} in, {} out",
            self.input_tokens, self.output_tokens
        )?;
        writeln!(
            f,
            "throughput: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
            self.request_throughput, self.output_throughput, self.total_token_throughput
        )?;
        writeln!(
            f,
            "{:<6} {:>10} {:>10} {:>10} {:>10}",
            "ms", "mean", "p50", "p90", "p99"
        )?;
        for (name, p) in [
            ("TTFT", &self.ttft),
            ("TPOT", &self.tpot),
            ("ITL", &self.itl),
            ("E2E", &self.e2e),
        ] {
            writeln!(
                f,
                "{name:<6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms
            )?;
        }
        if let Some(long) = &self.long_prompt {
            writeln!(
                f,
                "long prompt of {} tokens: TTFT {:.1} ms; meanwhile {} gaps of the other streams: ITL p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms",
                long.prompt_tokens,
                long.ttft_ms,
                long.gaps_during,
                long.itl_during.p50_ms,
                long.itl_during.p90_ms,
                long.itl_during.p99_ms,
                long.max_itl_during_ms
            )?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// What one request measured.
struct Sample {
    input_tokens: usize,
    output_tokens: usize,
    ttft: Duration,
    e2e: Duration,
    /// When each token arrived.
    token_times: Vec<Instant>,
}

impl Sample {
    fn gaps(&self) -> impl Iterator<Item = Duration> + '_ {
        self.token_times.windows(2).map(|w| w[1] - w[0])
    }
}

/// A response read as it arrives: status, then body bytes with the time each frame came.
/// Also the client of `fdrt update-weights` (`admin::request_update`).
pub(crate) async fn send(
    address: &str,
    api_key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, ResponseBody), BenchError> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|source| BenchError::Connect {
            address: address.to_string(),
            source,
        })?;
    stream.set_nodelay(true).ok();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", address);
    if let Some(key) = api_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if !bytes.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(bytes)))?)
        .await?;
    Ok((
        response.status().as_u16(),
        ResponseBody(response.into_body()),
    ))
}

pub(crate) struct ResponseBody(hyper::body::Incoming);

impl ResponseBody {
    /// The next piece of the body, or `None` at its end.
    async fn next(&mut self) -> Result<Option<Bytes>, BenchError> {
        while let Some(frame) = self.0.frame().await {
            if let Ok(data) = frame?.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    pub(crate) async fn text(mut self) -> Result<String, BenchError> {
        let mut out = vec![];
        while let Some(b) = self.next().await? {
            out.extend_from_slice(&b);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The served model's name, from `/v1/models`.
async fn served_model(options: &BenchOptions) -> Result<String, BenchError> {
    let (status, body) = send(
        &options.address,
        options.api_key.as_deref(),
        "GET",
        "/v1/models",
        None,
    )
    .await?;
    let text = body.text().await?;
    if status != 200 {
        return Err(BenchError::Status { status, body: text });
    }
    let value: Value =
        serde_json::from_str(&text).map_err(|e| BenchError::Protocol(e.to_string()))?;
    value["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| BenchError::Protocol(format!("no model in {text}")))
}

/// One streamed completion with `prompt` and exactly `max_tokens` new tokens.
async fn one_request(
    options: &BenchOptions,
    model: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<Sample, BenchError> {
    let input_tokens = prompt.len();
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        "return_token_ids": true,
    });
    let start = Instant::now();
    let (status, mut body) = send(
        &options.address,
        options.api_key.as_deref(),
        "POST",
        "/v1/completions",
        Some(body),
    )
    .await?;
    if status != 200 {
        return Err(BenchError::Status {
            status,
            body: body.text().await?,
        });
    }
    let mut buffer = String::new();
    let mut token_times = vec![];
    let mut done = false;
    while let Some(bytes) = body.next().await? {
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let value: Value = serde_json::from_str(data)
                    .map_err(|e| BenchError::Protocol(format!("{e}: {data}")))?;
                if value.get("error").is_some() {
                    return Err(BenchError::Protocol(data.to_string()));
                }
                let tokens = value["choices"][0]["token_ids"]
                    .as_array()
                    .map_or(0, Vec::len);
                token_times.extend(std::iter::repeat_n(now, tokens));
            }
        }
    }
    if !done {
        return Err(BenchError::Protocol(
            "the stream ended without [DONE]".into(),
        ));
    }
    let Some(&first) = token_times.first() else {
        return Err(BenchError::Protocol("no tokens came back".into()));
    };
    Ok(Sample {
        input_tokens,
        output_tokens: token_times.len(),
        ttft: first - start,
        e2e: start.elapsed(),
        token_times,
    })
}

/// Runs the benchmark to completion and summarizes it.
pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    if options.concurrency == 0
        || options.requests == 0
        || options.input_len == 0
        || options.output_len == 0
    {
        return Err(BenchError::Options(
            "concurrency, requests and lengths must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&options.range_ratio) || options.token_range.0 >= options.token_range.1
    {
        return Err(BenchError::Options(
            "range ratio must be in [0, 1) and the token range non-empty".into(),
        ));
    }
    let model = match &options.model {
        Some(m) => m.clone(),
        None => served_model(&options).await?,
    };
    // Draw every request up front so that the workload does not depend on concurrency.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut draw = |mean: usize| {
        let spread = (mean as f64 * options.range_ratio).floor() as usize;
        rng.random_range(mean.saturating_sub(spread).max(1)..=mean + spread)
    };
    let mut work = vec![];
    for _ in 0..options.requests {
        let (input, output) = (draw(options.input_len), draw(options.output_len));
        work.push((input, output));
    }
    let (low, high) = options.token_range;
    let prefix: Vec<u32> = (0..options.shared_prefix_len)
        .map(|_| rng.random_range(low..high))
        .collect();
    let work: Vec<(Vec<u32>, usize)> = work
        .into_iter()
        .map(|(input, output)| {
            let mut prompt = prefix.clone();
            prompt.extend((0..input).map(|_| rng.random_range(low..high)));
            (prompt, output)
        })
        .collect();
    let long_prompt: Option<Vec<u32>> = options
        .long_prompt
        .map(|(len, _)| (0..len).map(|_| rng.random_range(low..high)).collect());
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Result<Sample, String>>>> = Arc::new(Mutex::new(vec![]));
    let start = Instant::now();
    let mut clients = vec![];
    for _ in 0..options.concurrency.min(options.requests) {
        let (options, model, work, next, results) = (
            options.clone(),
            model.clone(),
            work.clone(),
            next.clone(),
            results.clone(),
        );
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((prompt, output)) = work.get(i) else {
                    break;
                };
                let result = one_request(&options, &model, prompt.clone(), *output)
                    .await
                    .map_err(|e| e.to_string());
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(result);
            }
        }));
    }
    let long_task = match (long_prompt, options.long_prompt) {
        (Some(prompt), Some((_, after_s))) => {
            let (options, model) = (options.clone(), model.clone());
            Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs_f64(after_s.max(0.0))).await;
                let sent = Instant::now();
                one_request(&options, &model, prompt, 1)
                    .await
                    .map(|sample| (sent, sample))
            }))
        }
        _ => None,
    };
    for c in clients {
        c.await
            .map_err(|e| BenchError::Protocol(format!("a client task failed: {e}")))?;
    }
    let long = match long_task {
        Some(task) => Some(
            task.await
                .map_err(|e| BenchError::Protocol(format!("the long request failed: {e}")))??,
        ),
        None => None,
    };
    let duration = start.elapsed().as_secs_f64();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let samples: Vec<Sample> = ok.into_iter().filter_map(Result::ok).collect();
    let errors: Vec<String> = failed.into_iter().filter_map(Result::err).take(5).collect();
    let input_tokens = samples.iter().map(|s| s.input_tokens).sum();
    let output_tokens: usize = samples.iter().map(|s| s.output_tokens).sum();
    let long_prompt = long.map(|(sent, sample)| {
        let first = sent + sample.ttft;
        let during: Vec<Duration> = samples
            .iter()
            .flat_map(|s| s.token_times.windows(2))
            .filter(|w| w[1] > sent && w[0] < first)
            .map(|w| w[1] - w[0])
            .collect();
        LongPromptReport {
            prompt_tokens: sample.input_tokens,
            ttft_ms: sample.ttft.as_secs_f64() * 1e3,
            max_itl_during_ms: during.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            gaps_during: during.len(),
            itl_during: Percentiles::of(&during),
        }
    });
    let tpot: Vec<Duration> = samples
        .iter()
        .filter(|s| s.output_tokens > 1)
        .map(|s| (s.e2e - s.ttft) / (s.output_tokens as u32 - 1))
        .collect();
    Ok(BenchReport {
        model,
        concurrency: options.concurrency,
        completed: samples.len(),
        failed: options.requests - samples.len(),
        duration_s: duration,
        input_tokens,
        output_tokens,
        request_throughput: samples.len() as f64 / duration,
        output_throughput: output_tokens as f64 / duration,
        total_token_throughput: (input_tokens + output_tokens) as f64 / duration,
        ttft: Percentiles::of(&samples.iter().map(|s| s.ttft).collect::<Vec<_>>()),
        tpot: Percentiles::of(&tpot),
        itl: Percentiles::of(&samples.iter().flat_map(Sample::gaps).collect::<Vec<_>>()),
        e2e: Percentiles::of(&samples.iter().map(|s| s.e2e).collect::<Vec<_>>()),
        long_prompt,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let samples: Vec<Duration> = (1..=101).map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples);
        assert!((p.p50_ms - 51.0).abs() < 1e-9, "{p:?}");
        assert!((p.p90_ms - 91.0).abs() < 1e-9, "{p:?}");
        assert!((p.p99_ms - 100.0).abs() < 1e-9, "{p:?}");
        assert!((p.mean_ms - 51.0).abs() < 1e-9, "{p:?}");
        let two = Percentiles::of(&[Duration::from_millis(10), Duration::from_millis(20)]);
        assert!((two.p50_ms - 15.0).abs() < 1e-9, "{two:?}");
        assert_eq!(Percentiles::of(&[]).p99_ms, 0.0);
    }
}
