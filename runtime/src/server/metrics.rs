//! Server metrics in the Prometheus text format, for `GET /metrics`.
//!
//! Names follow vLLM's where vLLM has one (`vllm:num_requests_running` becomes
//! `fdrt:num_requests_running`), so dashboards built for vLLM need only a prefix change. Gauges
//! of the scheduler (running, waiting, KV use) are read from its [`Stats`] at scrape time rather
//! than tracked here, so they cannot drift from the truth. Counters and histograms are kept
//! under one mutex: a scrape or an update is a handful of additions, far below the cost of one
//! decode step.

use crate::disagg::InstanceState;
use crate::scheduler::Stats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms, chosen to resolve CPU decode speeds
/// (tens of milliseconds per token) as well as long generations.
const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 6.0, 12.0, 30.0, 60.0, 120.0,
];
const TOKEN_BOUNDS: &[f64] = &[
    0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
];
const E2E_BOUNDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Why a scheduler request (one choice) ended, as counted by `fdrt:request_success_total` and
/// `fdrt:request_failure_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Stop,
    Length,
    /// The client went away or the server's drain deadline passed.
    Abort,
    /// The engine failed the request.
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Abort => "abort",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Clone, Debug)]
struct Inner {
    /// HTTP responses by (route, status code).
    http: BTreeMap<(String, u16), u64>,
    outcomes: BTreeMap<Outcome, u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    ttft: Histogram,
    tpot: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

/// Counters and histograms of one server.
#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    inner: Mutex<Inner>,
}

/// The timings of one finished scheduler request.
#[derive(Clone, Debug, Default)]
pub struct RequestTimings {
    pub time_to_first_token: Option<Duration>,
    /// Mean time between output tokens after the first, when there were two or more.
    pub time_per_output_token: Option<Duration>,
    pub end_to_end: Duration,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        Metrics {
            model_name: model_name.to_string(),
            inner: Mutex::new(Inner {
                http: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                ttft: Histogram::new(TTFT_BOUNDS),
                tpot: Histogram::new(TOKEN_BOUNDS),
                itl: Histogram::new(TOKEN_BOUNDS),
                e2e: Histogram::new(E2E_BOUNDS),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn http_response(&self, route: &str, status: u16) {
        self.with(|m| *m.http.entry((route.to_string(), status)).or_default() += 1);
    }

    /// A request entered the scheduler with `tokens` prompt tokens.
    pub fn prompt(&self, tokens: usize) {
        self.with(|m| m.prompt_tokens += tokens as u64);
    }

    /// One token was generated, `gap` after the previous one of its request (none for the first).
    pub fn token(&self, gap: Option<Duration>) {
        self.with(|m| {
            m.generation_tokens += 1;
            if let Some(gap) = gap {
                m.itl.observe(gap.as_secs_f64());
            }
        });
    }

    pub fn finished(&self, outcome: Outcome, timings: &RequestTimings) {
        self.with(|m| {
            *m.outcomes.entry(outcome).or_default() += 1;
            if let Some(t) = timings.time_to_first_token {
                m.ttft.observe(t.as_secs_f64());
            }
            if let Some(t) = timings.time_per_output_token {
                m.tpot.observe(t.as_secs_f64());
            }
            m.e2e.observe(timings.end_to_end.as_secs_f64());
        });
    }

    /// The exposition text: these metrics plus the scheduler's gauges from `stats` and the
    /// instance's disaggregation counters from `instance`.
    pub fn render(&self, stats: &Stats, instance: &InstanceState) -> String {
        let m = self.with(|m| m.clone());
        let model = format!("model_name=\"{}\"", escape(&self.model_name));
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{model}}} {value}"
            );
        };
        gauge(
            "fdrt:num_requests_running",
            "Sequences in the running batch.",
            "gauge",
            stats.running.to_string(),
        );
        gauge(
            "fdrt:num_requests_waiting",
            "Requests waiting to run.",
            "gauge",
            stats.waiting.to_string(),
        );
        let usage = if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        };
        gauge(
            "fdrt:kv_cache_usage_perc",
            "Fraction of KV cache blocks held by running sequences (1 = full).",
            "gauge",
            usage.to_string(),
        );
        gauge(
            "fdrt:kv_cache_used_tokens",
            "KV cache positions held by running sequences.",
            "gauge",
            stats.kv_tokens_used.to_string(),
        );
        gauge(
            "fdrt:kv_cache_capacity_tokens",
            "KV cache positions of the whole block pool.",
            "gauge",
            stats.kv_tokens_capacity.to_string(),
        );
        gauge(
            "fdrt:kv_cache_used_blocks",
            "KV cache blocks held by running sequences.",
            "gauge",
            stats.kv_blocks_used.to_string(),
        );
        gauge(
            "fdrt:kv_cache_total_blocks",
            "KV cache blocks in the pool.",
            "gauge",
            stats.kv_blocks_total.to_string(),
        );
        gauge(
            "fdrt:prefix_cache_queries_total",
            "Prompt tokens of admitted sequences looked up in the prefix cache.",
            "counter",
            stats.prefix_cache_queried_tokens.to_string(),
        );
        gauge(
            "fdrt:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (their prefill skipped).",
            "counter",
            stats.prefix_cache_hit_tokens.to_string(),
        );
        gauge(
            "fdrt:num_preemptions_total",
            "Running sequences preempted to free KV blocks (recomputed later).",
            "counter",
            stats.preemptions.to_string(),
        );
        let kv = &instance.counters;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, value) in [
            ("fdrt:kv_transfer_sent_blocks_total", "KV blocks a prefill instance sent to decode instances.", load(&kv.sent_blocks).to_string()),
            ("fdrt:kv_transfer_sent_bytes_total", "Bytes of those KV blocks.", load(&kv.sent_bytes).to_string()),
            ("fdrt:kv_transfer_send_seconds_total", "Time of those transfers, from connection to end (the prefill they wait for included).", kv.sent_seconds().to_string()),
            ("fdrt:kv_transfer_send_failures_total", "KV transfers a prefill instance refused or broke off.", load(&kv.send_failures).to_string()),
            ("fdrt:kv_transfer_received_blocks_total", "KV blocks a decode instance took from prefill instances.", load(&kv.received_blocks).to_string()),
            ("fdrt:kv_transfer_received_bytes_total", "Bytes of those KV blocks.", load(&kv.received_bytes).to_string()),
            ("fdrt:kv_transfer_received_shared_memory_blocks_total", "Of those KV blocks, the ones that came through shared memory (prefill instance on the same host).", load(&kv.received_shared_blocks).to_string()),
            ("fdrt:kv_transfer_received_device_blocks_total", "Of those KV blocks, the ones that came through device memory (GPU prefill instance on the same host).", load(&kv.received_device_blocks).to_string()),
            ("fdrt:kv_transfer_seconds_total", "Time from asking a prefill instance for a prompt's blocks to seating them.", kv.received_seconds().to_string()),
            ("fdrt:kv_transfer_failures_total", "KV transfers that failed on a decode instance (the request computed its prompt itself).", load(&kv.receive_failures).to_string()),
            ("fdrt:role_switches_total", "Times this instance moved between prefill and decode.", instance.role_switches().to_string()),
        ] {
            gauge(name, help, "counter", value);
        }
        gauge(
            "fdrt:kv_transfers_active",
            "KV transfers this prefill instance is serving now.",
            "gauge",
            instance.active_transfers().to_string(),
        );
        let spec = &stats.speculative;
        gauge(
            "fdrt:spec_decode_num_drafts_total",
            "Decode steps of a sequence that verified proposed tokens (speculative decoding).",
            "counter",
            spec.drafts.to_string(),
        );
        gauge(
            "fdrt:spec_decode_num_draft_tokens_total",
            "Tokens proposed by speculative decoding.",
            "counter",
            spec.draft_tokens.to_string(),
        );
        gauge(
            "fdrt:spec_decode_num_accepted_tokens_total",
            "Proposed tokens the model accepted.",
            "counter",
            spec.accepted_tokens.to_string(),
        );
        gauge(
            "fdrt:spec_decode_mean_accepted_length",
            "Tokens emitted per verified proposal (accepted plus the model's own).",
            "gauge",
            spec.mean_accepted_length().to_string(),
        );
        gauge(
            "fdrt:num_scheduler_steps_total",
            "Forward passes run by the scheduler.",
            "counter",
            stats.steps.to_string(),
        );
        gauge(
            "fdrt:prompt_tokens_total",
            "Prompt tokens submitted to the scheduler.",
            "counter",
            m.prompt_tokens.to_string(),
        );
        gauge(
            "fdrt:generation_tokens_total",
            "Tokens generated.",
            "counter",
            m.generation_tokens.to_string(),
        );

        let _ = writeln!(
            out,
            "# HELP fdrt:request_success_total Requests (choices) that finished, by finish reason.\n# TYPE fdrt:request_success_total counter"
        );
        for outcome in [Outcome::Stop, Outcome::Length, Outcome::Abort] {
            let n = m.outcomes.get(&outcome).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "fdrt:request_success_total{{{model},finished_reason=\"{}\"}} {n}",
                outcome.name()
            );
        }
        let failed = m.outcomes.get(&Outcome::Error).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "# HELP fdrt:request_failure_total Requests (choices) the engine failed.\n# TYPE fdrt:request_failure_total counter\nfdrt:request_failure_total{{{model}}} {failed}"
        );

        let _ = writeln!(
            out,
            "# HELP fdrt:http_requests_total HTTP responses by route and status code.\n# TYPE fdrt:http_requests_total counter"
        );
        for ((route, status), n) in &m.http {
            let _ = writeln!(
                out,
                "fdrt:http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }

        m.ttft.render(
            &mut out,
            "fdrt:time_to_first_token_seconds",
            "Time from submission to the first token.",
            &model,
        );
        m.tpot.render(
            &mut out,
            "fdrt:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            &model,
        );
        m.itl.render(
            &mut out,
            "fdrt:inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &model,
        );
        m.e2e.render(
            &mut out,
            "fdrt:e2e_request_latency_seconds",
            "Time from submission to the last event.",
            &model,
        );
        {
            // One series per position of the proposal: its acceptance rate.
            let name = "fdrt:spec_decode_acceptance_rate_per_position";
            let _ = writeln!(
                out,
                "# HELP {name} Share of the tokens proposed at this position that were accepted.\n# TYPE {name} gauge"
            );
            for (p, (&acc, &prop)) in spec
                .accepted_per_position
                .iter()
                .zip(&spec.proposed_per_position)
                .enumerate()
            {
                let rate = if prop == 0 {
                    0.0
                } else {
                    acc as f64 / prop as f64
                };
                let _ = writeln!(out, "{name}{{{model},position=\"{p}\"}} {rate}");
            }
        }
        out
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two proposals: 3 tokens of which 1 accepted, 2 of which 2.
    fn runtime_speculative_stats() -> crate::speculative::SpeculativeStats {
        let mut s = crate::speculative::SpeculativeStats::default();
        s.record(3, 1);
        s.record(2, 2);
        s
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn histograms_are_cumulative_and_gauges_come_from_stats() {
        let metrics = Metrics::new("m\"1");
        metrics.finished(
            Outcome::Stop,
            &RequestTimings {
                time_to_first_token: Some(Duration::from_millis(7)),
                time_per_output_token: Some(Duration::from_millis(30)),
                end_to_end: Duration::from_millis(300),
            },
        );
        metrics.finished(
            Outcome::Length,
            &RequestTimings {
                time_to_first_token: Some(Duration::from_millis(70)),
                ..RequestTimings::default()
            },
        );
        metrics.prompt(12);
        metrics.token(None);
        metrics.token(Some(Duration::from_millis(3)));
        metrics.http_response("/v1/completions", 400);
        let stats = Stats {
            running: 2,
            waiting: 1,
            kv_tokens_used: 25,
            kv_tokens_capacity: 128,
            kv_blocks_used: 1,
            kv_blocks_total: 4,
            steps: 9,
            preemptions: 3,
            prefix_cache_queried_tokens: 40,
            prefix_cache_hit_tokens: 32,
            speculative: runtime_speculative_stats(),
        };
        let instance = InstanceState::new(
            crate::disagg::transfer::Identity {
                plan: [0; 32],
                block_size: 16,
                block_bytes: 64,
            },
            crate::disagg::Role::Decode,
        );
        instance
            .counters
            .received(3, 192, Duration::from_millis(500));
        instance.counters.receive_failed();
        let text = metrics.render(&stats, &instance);
        let model = "model_name=\"m\\\"1\"";
        assert_eq!(
            line(&text, &format!("fdrt:num_requests_running{{{model}}}")),
            format!("fdrt:num_requests_running{{{model}}} 2")
        );
        for expected in [
            "fdrt:kv_cache_usage_perc{M} 0.25\n",
            "fdrt:num_preemptions_total{M} 3\n",
            "fdrt:prefix_cache_queries_total{M} 40\n",
            "fdrt:prefix_cache_hits_total{M} 32\n",
            "fdrt:kv_transfer_received_blocks_total{M} 3\n",
            "fdrt:kv_transfer_received_bytes_total{M} 192\n",
            "fdrt:kv_transfer_received_shared_memory_blocks_total{M} 0\n",
            "fdrt:kv_transfer_received_device_blocks_total{M} 0\n",
            "fdrt:kv_transfer_seconds_total{M} 0.5\n",
            "fdrt:kv_transfer_failures_total{M} 1\n",
            "fdrt:kv_transfer_sent_blocks_total{M} 0\n",
            "fdrt:spec_decode_num_drafts_total{M} 2\n",
            "fdrt:spec_decode_num_draft_tokens_total{M} 5\n",
            "fdrt:spec_decode_num_accepted_tokens_total{M} 3\n",
            "fdrt:spec_decode_mean_accepted_length{M} 2.5\n",
            "fdrt:spec_decode_acceptance_rate_per_position{M,position=\"0\"} 1\n",
            "fdrt:spec_decode_acceptance_rate_per_position{M,position=\"1\"} 0.5\n",
            "fdrt:spec_decode_acceptance_rate_per_position{M,position=\"2\"} 0\n",
        ] {
            let expected = expected.replace('M', model);
            assert!(text.contains(&expected), "no {expected} in {text}");
        }
        assert!(text.contains(&format!(
            "fdrt:time_to_first_token_seconds_bucket{{{model},le=\"0.005\"}} 0\n"
        )));
        assert!(text.contains(&format!(
            "fdrt:time_to_first_token_seconds_bucket{{{model},le=\"0.01\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "fdrt:time_to_first_token_seconds_bucket{{{model},le=\"0.1\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "fdrt:time_to_first_token_seconds_count{{{model}}} 2\n"
        )));
        assert!(text.contains(&format!(
            "fdrt:time_per_output_token_seconds_count{{{model}}} 1\n"
        )));
        assert!(text.contains(&format!(
            "fdrt:request_success_total{{{model},finished_reason=\"length\"}} 1\n"
        )));
        assert!(text.contains(&format!("fdrt:generation_tokens_total{{{model}}} 2\n")));
        assert!(
            text.contains("fdrt:http_requests_total{route=\"/v1/completions\",status=\"400\"} 1\n")
        );
    }
}
