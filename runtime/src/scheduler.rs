//! Continuous batching: requests join the running batch at step boundaries and leave when they
//! finish; every step is one batched forward pass over all running sequences.
//!
//! Contract of a step: one step = one forward pass. It holds, for each running sequence, either
//! its next decode token or the next chunk of its prompt, within the token budget
//! (`max_batch_tokens`); decode tokens go first, so a long prompt never stalls the others.
//! The engine runs on one dedicated thread that owns it; callers talk to it through
//! [`Scheduler`] (a cheap handle) and receive each request's tokens on a [`RequestStream`].
//! Dropping a stream cancels its request; its sequence slot is freed at the next step.

use crate::engine::{Engine, Logits, SeqChunk};
use crate::generate::FinishReason;
use crate::sampler::{log_softmax, Sampler, SamplingParams};
use crate::weights::WeightStore;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc as async_mpsc;

/// What a request asks for, beyond its prompt.
#[derive(Clone, Debug)]
pub struct RequestParams {
    /// New tokens at most (>= 1).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Extra token ids that end the request (the plan's end-of-sequence ids always do, unless
    /// `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Report each sampled token's log-probability and this many top alternatives (0 to 20).
    pub logprobs: Option<usize>,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Log-probability of `id` under the model's distribution (before temperature), when asked.
    pub logprob: Option<f32>,
    /// The most likely tokens and their log-probabilities, best first, when asked.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(TokenEvent),
    /// The last event of a request.
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed; the last event.
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Requests waiting for a slot at most; more are refused with `QueueFull`.
    pub max_waiting: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull { waiting: usize },
    #[error("the prompt has {prompt} tokens; with max_tokens {max_tokens} this needs {needed} positions but the context holds {context}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        needed: usize,
        context: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
}

/// A snapshot of the scheduler's state, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    /// KV positions held by running sequences, and the total the slots can hold.
    pub kv_tokens_used: usize,
    pub kv_tokens_capacity: usize,
    pub steps: u64,
}

/// The receiving end of one request. Dropping it cancels the request.
pub struct RequestStream {
    events: async_mpsc::UnboundedReceiver<Event>,
    cancelled: Arc<AtomicBool>,
    wake: mpsc::Sender<Command>,
}

impl RequestStream {
    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (for callers outside an async runtime).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        let _ = self.wake.send(Command::Wake);
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

enum Command {
    Submit(Box<Request>),
    Wake,
    Drain,
    /// Put these weights in service at the next step boundary (see `weights_update`).
    SwapWeights(Box<WeightStore>, tokio::sync::oneshot::Sender<()>),
}

struct Request {
    prompt: Vec<u32>,
    params: RequestParams,
    sampler: Sampler,
    events: async_mpsc::UnboundedSender<Event>,
    cancelled: Arc<AtomicBool>,
}

struct Shared {
    stats: Stats,
    draining: bool,
}

/// A handle to the engine thread. Clone it freely.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    config: SchedulerConfig,
    context: usize,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Scheduler {
    /// Moves `engine` onto a thread of its own and starts stepping it.
    pub fn start(engine: Engine, config: SchedulerConfig) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs: config.max_num_seqs.clamp(1, engine.num_slots()),
            ..config
        };
        let context = engine.options().max_context;
        let shared = Arc::new(Mutex::new(Shared {
            stats: Stats {
                kv_tokens_capacity: context * config.max_num_seqs,
                ..Stats::default()
            },
            draining: false,
        }));
        let (commands, inbox) = mpsc::channel();
        let worker = Worker {
            engine,
            inbox,
            config: config.clone(),
            shared: shared.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            steps: 0,
        };
        let thread = std::thread::Builder::new()
            .name("fdrt-engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        Scheduler {
            commands,
            shared,
            config,
            context,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Positions one sequence may hold (prompt plus generated tokens).
    pub fn max_context(&self) -> usize {
        self.context
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request. Errors are the caller's to report (as 400, 429 or 503).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: RequestParams,
    ) -> Result<RequestStream, SubmitError> {
        if prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if params.max_tokens == 0 {
            return Err(SubmitError::NoTokens);
        }
        // The whole request must fit one sequence's context; generation may then stop early
        // at the context only if max_tokens was clipped by the caller.
        let needed = prompt.len() + 1;
        if needed > self.context {
            return Err(SubmitError::TooLong {
                prompt: prompt.len(),
                max_tokens: params.max_tokens,
                needed,
                context: self.context,
            });
        }
        let sampler = Sampler::new(params.sampling.clone())
            .map_err(|e| SubmitError::Sampling(e.to_string()))?;
        {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if shared.draining {
                return Err(SubmitError::ShuttingDown);
            }
            if shared.stats.waiting >= self.config.max_waiting
                && shared.stats.running >= self.config.max_num_seqs
            {
                return Err(SubmitError::QueueFull {
                    waiting: shared.stats.waiting,
                });
            }
        }
        let (tx, rx) = async_mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let request = Request {
            prompt,
            params,
            sampler,
            events: tx,
            cancelled: cancelled.clone(),
        };
        self.commands
            .send(Command::Submit(Box::new(request)))
            .map_err(|_| SubmitError::ShuttingDown)?;
        {
            // Count it as waiting now, so a burst of submissions sees the queue fill up.
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.stats.waiting += 1;
        }
        Ok(RequestStream {
            events: rx,
            cancelled,
            wake: self.commands.clone(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
            .clone()
    }

    /// Hands `weights` to the engine thread, which puts them in service at the next step
    /// boundary; the receiver completes once they serve. Errs when the engine thread is gone.
    pub fn swap_weights(
        &self,
        weights: WeightStore,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, SubmitError> {
        let (switched, on_switch) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::SwapWeights(Box::new(weights), switched))
            .map_err(|_| SubmitError::ShuttingDown)?;
        Ok(on_switch)
    }

    /// Stops accepting requests; running and waiting ones are finished. Returns at once.
    pub fn drain(&self) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .draining = true;
        let _ = self.commands.send(Command::Drain);
    }

    /// Waits up to `deadline` for the engine thread to finish after `drain`; requests still
    /// running then are cancelled. Returns whether everything finished in time.
    pub fn join(&self, deadline: Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            let stats = self.stats();
            if stats.running == 0 && stats.waiting == 0 {
                break;
            }
            if start.elapsed() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.commands.send(Command::Drain);
            let _ = handle.join();
        }
        true
    }
}

/// A request that holds a sequence slot.
struct Running {
    request: Request,
    slot: usize,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    generated: Vec<u32>,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
}

struct Worker {
    engine: Engine,
    inbox: mpsc::Receiver<Command>,
    config: SchedulerConfig,
    shared: Arc<Mutex<Shared>>,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    steps: u64,
}

impl Worker {
    fn run(mut self) {
        let mut draining = false;
        loop {
            // Block only when idle; otherwise take what has arrived and step.
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle && draining {
                self.publish();
                return;
            }
            let first = if idle {
                self.inbox.recv().ok()
            } else {
                self.inbox.try_recv().ok()
            };
            let Some(first) = first.or_else(|| if idle { None } else { Some(Command::Wake) })
            else {
                return; // every handle is gone
            };
            let mut swaps = vec![];
            for command in
                std::iter::once(first).chain(std::iter::from_fn(|| self.inbox.try_recv().ok()))
            {
                match command {
                    Command::Submit(r) => self.waiting.push_back(*r),
                    Command::Wake => {}
                    Command::Drain => draining = true,
                    Command::SwapWeights(weights, switched) => swaps.push((weights, switched)),
                }
            }
            for (weights, switched) in swaps {
                self.swap_weights(*weights, switched);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    /// A live weight update, between two steps: no pass mixes old and new weights, and running
    /// sequences go on with the new ones. The old weights are unmapped here.
    fn swap_weights(&mut self, weights: WeightStore, switched: tokio::sync::oneshot::Sender<()>) {
        drop(self.engine.replace_weights(weights));
        self.invalidate_prefix_cache();
        let _ = switched.send(());
    }

    /// Hook for the prefix cache, called at every weight switch: cached KV blocks were computed
    /// with the old weights, so none may be reused for a prompt after the switch. There is no
    /// prefix cache yet; when it lands, it must drop every cached (unreferenced) block here and
    /// stop matching blocks still held by running sequences.
    fn invalidate_prefix_cache(&mut self) {}

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|r| !is_cancelled(r));
        let mut i = 0;
        while i < self.running.len() {
            if is_cancelled(&self.running[i].request) {
                let done = self.running.swap_remove(i);
                self.engine.release(done.slot);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_num_seqs {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            let used: Vec<usize> = self.running.iter().map(|r| r.slot).collect();
            let Some(slot) = (0..self.config.max_num_seqs).find(|s| !used.contains(s)) else {
                self.waiting.push_front(request);
                break;
            };
            self.engine.release(slot);
            self.running.push(Running {
                request,
                slot,
                prefilled: 0,
                generated: vec![],
                next: None,
            });
        }
    }

    /// One forward pass over decode tokens first, then prompt chunks, within the token budget.
    fn step(&mut self) {
        let budget = self.engine.options().max_batch_tokens;
        let mut plan: Vec<(usize, usize, usize)> = vec![]; // (running index, first prompt token, count)
        let mut used = 0;
        for (i, r) in self.running.iter().enumerate() {
            if r.next.is_some() && used < budget {
                plan.push((i, 0, 1));
                used += 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.next.is_none() && used < budget {
                let take = (r.request.prompt.len() - r.prefilled).min(budget - used);
                plan.push((i, r.prefilled, take));
                used += take;
            }
        }
        let decode_tokens: Vec<[u32; 1]> = plan
            .iter()
            .map(|&(i, _, _)| [self.running[i].next.unwrap_or(0)])
            .collect();
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .zip(&decode_tokens)
            .map(|(&(i, first, count), one)| {
                let r = &self.running[i];
                let (tokens, want) = match r.next {
                    Some(_) => (&one[..], Logits::Last),
                    None => {
                        let done = first + count == r.request.prompt.len();
                        (
                            &r.request.prompt[first..first + count],
                            if done { Logits::Last } else { Logits::None },
                        )
                    }
                };
                SeqChunk {
                    slot: r.slot,
                    tokens,
                    logits: want,
                }
            })
            .collect();
        let result = self.engine.forward_batch(&chunks).map(|l| l.to_vec());
        self.steps += 1;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed pass fails every request in it; the slots are freed.
                let message = e.to_string();
                for r in self.running.drain(..) {
                    let _ = r.request.events.send(Event::Failed(message.clone()));
                    self.engine.release(r.slot);
                }
                return;
            }
        };
        let vocab = self.engine.vocab_size();
        let mut row = 0;
        let mut finished = vec![];
        for &(i, _, count) in &plan {
            let r = &mut self.running[i];
            let produced_logits = match r.next {
                Some(_) => true,
                None => {
                    r.prefilled += count;
                    r.prefilled == r.request.prompt.len()
                }
            };
            if !produced_logits {
                continue;
            }
            let row_logits = &logits[row * vocab..][..vocab];
            row += 1;
            let id = r.request.sampler.sample(row_logits);
            let event = token_event(id, row_logits, r.request.params.logprobs);
            r.generated.push(id);
            r.next = Some(id);
            let _ = r.request.events.send(Event::Token(event));
            let stop = r.request.params.stop_token_ids.contains(&id)
                || (!r.request.params.ignore_eos
                    && self
                        .engine
                        .plan()
                        .manifest
                        .model
                        .eos_token_ids
                        .contains(&id));
            let total = r.request.prompt.len() + r.generated.len();
            let reason = if stop {
                Some(FinishReason::Stop)
            } else if r.generated.len() >= r.request.params.max_tokens
                || total >= self.engine.options().max_context
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let _ = r.request.events.send(Event::Done {
                    reason,
                    prompt_tokens: r.request.prompt.len(),
                    completion_tokens: r.generated.len(),
                });
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let done = self.running.swap_remove(i);
            self.engine.release(done.slot);
        }
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.stats.running = self.running.len();
        // A submission still in the channel was counted by `submit` and is counted again
        // once received; the gap closes at the next step.
        shared.stats.waiting = self.waiting.len();
        shared.stats.kv_tokens_used = self
            .running
            .iter()
            .map(|r| self.engine.slot_len(r.slot))
            .sum();
        shared.stats.steps = self.steps;
    }
}

fn is_cancelled(r: &Request) -> bool {
    r.cancelled.load(Ordering::Relaxed) || r.events.is_closed()
}

fn token_event(id: u32, logits: &[f32], logprobs: Option<usize>) -> TokenEvent {
    let Some(top) = logprobs else {
        return TokenEvent {
            id,
            logprob: None,
            top_logprobs: vec![],
        };
    };
    let lp = log_softmax(logits);
    let mut best: Vec<(u32, f32)> = vec![];
    if top > 0 {
        let mut order: Vec<u32> = (0..lp.len() as u32).collect();
        let k = top.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        best = order.into_iter().map(|t| (t, lp[t as usize])).collect();
    }
    TokenEvent {
        id,
        logprob: Some(lp[id as usize]),
        top_logprobs: best,
    }
}
