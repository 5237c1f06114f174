//! Continuous batching: requests join the running batch at step boundaries and leave when they
//! finish; every step is one batched forward pass over all running sequences.
//!
//! Contract of a step: one step = one forward pass. It holds, for each running sequence, either
//! its next decode token or the next chunk of its prompt (chunked prefill), within the token
//! budget (`max_batch_tokens`, `--max-num-batched-tokens`); decode tokens go first, so a long
//! prompt never stalls the others. Newly admitted sequences take what budget is left.
//!
//! KV memory is a pool of blocks ([`BlockManager`]). Admission first takes the cached blocks of
//! the longest known prefix (prefix caching), so only the rest is prefilled. When a running
//! sequence needs a block and none is left, the most recently admitted sequence is preempted:
//! its blocks are freed and it returns to the front of the queue with its output so far, to be
//! recomputed later (mostly from the prefix cache); nothing fails. A request whose prompt could
//! never fit the pool is refused at submission; one that outgrows the whole pool while
//! generating ends with `length`.
//!
//! The engine runs on one dedicated thread that owns it; callers talk to it through
//! [`Scheduler`] (a cheap handle) and receive each request's tokens on a [`RequestStream`].
//! Dropping a stream cancels its request; its blocks are freed at the next step.

use crate::batch_engine::BatchEngine;
use crate::block_manager::{BlockManager, SeqBlocks};
use crate::disagg::{BlockSlots, KvPrefix};
use crate::engine::{Logits, SeqChunk};
use crate::error::RuntimeError;
use crate::generate::FinishReason;
use crate::sampler::{log_softmax, Sampler, SamplingParams};
use crate::speculative::{SpeculativeConfig, SpeculativeMethod, SpeculativeStats};
use crate::weights::WeightStore;
use rayon::prelude::*;
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
    /// Whether this request may decode speculatively when the scheduler is configured to (a
    /// per-request opt-out; the output is the same either way, see `crate::speculative`).
    pub speculative: bool,
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
    /// Requests waiting to run at most; more are refused with `QueueFull`.
    pub max_waiting: usize,
    /// Reuse the KV blocks of earlier requests with the same prefix.
    pub prefix_caching: bool,
    /// Propose and verify several tokens per decode step (`--speculative-config`).
    pub speculative: Option<SpeculativeConfig>,
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
    #[error("the prompt has {prompt} tokens but the KV cache holds {pool} in all ({blocks} blocks of {block_size}); raise --kv-cache-memory")]
    ExceedsKvCache {
        prompt: usize,
        pool: usize,
        blocks: usize,
        block_size: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
}

/// What [`Scheduler::cached_blocks`] finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedPrefix {
    /// Leading full blocks held.
    pub blocks: usize,
    /// Live weight updates so far: blocks seated with [`Scheduler::write_cached_blocks`] must
    /// have been asked for under the same weights (see [`KvPrefix::weights_generation`]).
    pub weights_generation: u64,
    /// The weight snapshot in service (empty for the plan's own weights), read at the same
    /// moment: what a KV transfer names.
    pub weights: String,
}

/// A snapshot of the scheduler's state, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    /// KV positions computed for running sequences, and the total the pool can hold.
    pub kv_tokens_used: usize,
    pub kv_tokens_capacity: usize,
    /// KV blocks held by running sequences (cached prefixes nobody holds do not count), and
    /// blocks in the pool.
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub steps: u64,
    /// Running sequences sent back to waiting to free their blocks.
    pub preemptions: u64,
    /// Tokens of admitted sequences looked up in the prefix cache, and those found there.
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// Speculative decoding's proposals and acceptances (all zero when it is off).
    pub speculative: SpeculativeStats,
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

/// Where the engine thread says whether new weights serve (or why they do not).
type SwitchReply = tokio::sync::oneshot::Sender<Result<(), RuntimeError>>;

enum Command {
    Submit(Box<Request>),
    Wake,
    Drain,
    /// Fail whatever is left and stop the engine thread.
    Abort,
    /// Put these weights in service at the next step boundary (see `weights_update`).
    SwapWeights(Box<(WeightStore, String)>, SwitchReply),
    /// How many leading full blocks of these tokens the prefix cache holds, and the weights'
    /// generation.
    CachedBlocks(Vec<u32>, tokio::sync::oneshot::Sender<CachedPrefix>),
    /// The cached full blocks of these tokens' prefix, from the given block on, copied into
    /// the slots (as many as they take).
    ReadCached(Vec<u32>, usize, Box<BlockSlots>, BlocksReply),
    /// Seat a prefix's blocks computed elsewhere in the prefix cache.
    WriteCached(
        Box<KvPrefix>,
        tokio::sync::oneshot::Sender<Result<usize, String>>,
    ),
}

/// The slots back, how many blocks were copied into them, and the weights generation they were
/// read under.
type BlocksReply = tokio::sync::oneshot::Sender<Result<BlocksRead, String>>;

/// What [`Scheduler::read_cached_blocks`] gives back.
#[derive(Debug)]
pub struct BlocksRead {
    pub slots: BlockSlots,
    /// The slots filled, from the first.
    pub count: usize,
    pub weights_generation: u64,
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
    /// Submitted requests still in the command channel, which the worker has not seen yet;
    /// `stats.waiting` counts them too.
    in_transit: usize,
}

/// A handle to the engine thread. Clone it freely.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    config: SchedulerConfig,
    context: usize,
    vocab: usize,
    /// KV blocks in the pool and positions per block.
    pool: (usize, usize),
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Scheduler {
    /// Moves `engine` onto a thread of its own and starts stepping it.
    pub fn start(engine: Box<dyn BatchEngine>, config: SchedulerConfig) -> Scheduler {
        Scheduler::start_speculative(engine, None, config)
    }

    /// As [`Scheduler::start`], with the draft model of the `draft` speculative method (the
    /// caller checks that it shares the target's vocabulary; without one that method proposes
    /// nothing).
    pub fn start_speculative(
        engine: Box<dyn BatchEngine>,
        draft: Option<Box<dyn BatchEngine>>,
        config: SchedulerConfig,
    ) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs: config.max_num_seqs.max(1),
            ..config
        };
        let context = engine.options().max_context;
        let vocab = engine.vocab_size();
        let (num_blocks, block_size) = (engine.kv_blocks(), engine.options().block_size);
        let blocks = BlockManager::new(
            num_blocks,
            block_size,
            config.prefix_caching,
            engine.plan().identity(),
        );
        let shared = Arc::new(Mutex::new(Shared {
            stats: Stats {
                kv_tokens_capacity: num_blocks * block_size,
                kv_blocks_total: num_blocks,
                ..Stats::default()
            },
            draining: false,
            in_transit: 0,
        }));
        let (commands, inbox) = mpsc::channel();
        let mut engine = engine;
        let mtp = matches!(
            config.speculative.as_ref().map(|c| &c.method),
            Some(SpeculativeMethod::Mtp)
        );
        engine.keep_hidden(mtp);
        let worker = Worker {
            engine,
            blocks,
            inbox,
            config: config.clone(),
            shared: shared.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            steps: 0,
            preemptions: 0,
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
            weight_generation: 0,
            weights_name: String::new(),
            speculative: SpeculativeStats::default(),
            mtp_failed: false,
            draft: draft.map(|engine| {
                let (num_blocks, block_size) = (engine.kv_blocks(), engine.options().block_size);
                let blocks =
                    BlockManager::new(num_blocks, block_size, false, engine.plan().identity());
                DraftModel { engine, blocks }
            }),
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
            vocab,
            pool: (num_blocks, block_size),
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
        // Checked here so that one request's bad id can never fail a batched pass.
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(SubmitError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
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
        let (blocks, block_size) = self.pool;
        if needed > blocks * block_size {
            return Err(SubmitError::ExceedsKvCache {
                prompt: prompt.len(),
                pool: blocks * block_size,
                blocks,
                block_size,
            });
        }
        let mut sampler =
            Sampler::new(params.sampling).map_err(|e| SubmitError::Sampling(e.to_string()))?;
        sampler.observe_prompt(&prompt);
        let (tx, rx) = async_mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let request = Request {
            prompt,
            params,
            sampler,
            events: tx,
            cancelled: cancelled.clone(),
        };
        {
            // Checked and counted under one lock, so a burst of submissions sees the queue
            // fill up and none slips past the limit.
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if shared.draining {
                return Err(SubmitError::ShuttingDown);
            }
            // Free sequence slots let that many more requests wait briefly on their way in;
            // beyond them the queue holds `max_waiting`, whether sequences are short of slots
            // or of KV blocks (a pool that fits fewer than `max_num_seqs` must not make the
            // queue unbounded).
            let free_slots = self
                .config
                .max_num_seqs
                .saturating_sub(shared.stats.running);
            if shared.stats.waiting >= self.config.max_waiting.saturating_add(free_slots) {
                return Err(SubmitError::QueueFull {
                    waiting: shared.stats.waiting,
                });
            }
            self.commands
                .send(Command::Submit(Box::new(request)))
                .map_err(|_| SubmitError::ShuttingDown)?;
            shared.stats.waiting += 1;
            shared.in_transit += 1;
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

    /// Hands `weights` (weight snapshot `snapshot_id`) to the engine thread, which puts them in
    /// service at the next step boundary; the receiver completes once they serve. Errs when the
    /// engine thread is gone.
    pub fn swap_weights(
        &self,
        weights: WeightStore,
        snapshot_id: String,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), RuntimeError>>, SubmitError> {
        let (switched, on_switch) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::SwapWeights(
                Box::new((weights, snapshot_id)),
                switched,
            ))
            .map_err(|_| SubmitError::ShuttingDown)?;
        Ok(on_switch)
    }

    /// How many leading full blocks of `tokens` this instance's prefix cache holds.
    pub async fn cached_blocks(&self, tokens: Vec<u32>) -> Result<CachedPrefix, SubmitError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::CachedBlocks(tokens, reply))
            .map_err(|_| SubmitError::ShuttingDown)?;
        answer.await.map_err(|_| SubmitError::ShuttingDown)
    }

    /// Copies `tokens`' leading full blocks from block `skip` on, as far as this instance's
    /// prefix cache holds them and `slots` has room, into `slots` (a prefill instance sends
    /// these; run the tokens as a request first). The engine thread takes the command at once,
    /// before the returned future is polled, so the copy runs while the caller does other work
    /// (sends the blocks of the read before, say).
    pub fn read_cached_blocks(
        &self,
        tokens: Vec<u32>,
        skip: usize,
        slots: BlockSlots,
    ) -> impl std::future::Future<Output = Result<BlocksRead, String>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .commands
            .send(Command::ReadCached(tokens, skip, Box::new(slots), reply))
            .map_err(|_| SubmitError::ShuttingDown.to_string());
        async move {
            sent?;
            answer
                .await
                .map_err(|_| SubmitError::ShuttingDown.to_string())?
        }
    }

    /// Seats a prefix's KV blocks computed by another instance of the same plan in this
    /// instance's prefix cache; returns how many leading full blocks of it the cache holds
    /// after (a request with this prefix is then admitted with them as a cache hit).
    pub async fn write_cached_blocks(&self, prefix: KvPrefix) -> Result<usize, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::WriteCached(Box::new(prefix), reply))
            .map_err(|_| SubmitError::ShuttingDown.to_string())?;
        answer
            .await
            .map_err(|_| SubmitError::ShuttingDown.to_string())?
    }

    /// Positions per KV block.
    pub fn block_size(&self) -> usize {
        self.pool.1
    }

    /// Stops accepting requests; running and waiting ones are finished. Returns at once.
    pub fn drain(&self) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .draining = true;
        let _ = self.commands.send(Command::Drain);
    }

    /// Waits up to `deadline` for running and waiting requests to finish after `drain`, then
    /// stops the engine thread; requests still unfinished at the deadline are failed (their
    /// streams get [`Event::Failed`]) and their slots freed. Returns whether everything finished
    /// in time.
    pub fn join(&self, deadline: Duration) -> bool {
        let start = std::time::Instant::now();
        let finished = loop {
            let stats = self.stats();
            if stats.running == 0 && stats.waiting == 0 {
                break true;
            }
            if start.elapsed() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.commands.send(Command::Abort);
            let _ = handle.join();
        }
        finished
    }
}

/// A request on its way through the engine, waiting or running. Preempted sequences go back
/// to waiting with their output so far and recompute it (from the prefix cache where they can).
struct Sequence {
    request: Request,
    /// The prompt, then every generated token: what the KV blocks hold or will hold.
    tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    computed: usize,
    /// Its KV blocks; empty while waiting.
    blocks: SeqBlocks,
    /// Proposed tokens appended to `tokens` for this step's pass (speculative decoding), taken
    /// off again when the pass is verified or the sequence gives way.
    draft: usize,
    /// With a draft model: the distribution each proposed token was drawn from (empty when
    /// the request is greedy), its KV blocks in the draft's pool, the leading tokens whose keys
    /// and values are there, and the sampler it proposes with.
    draft_q: Vec<Vec<(u32, f32)>>,
    draft_blocks: SeqBlocks,
    draft_computed: usize,
    draft_sampler: Option<Sampler>,
    /// With the `mtp` method, `draft_computed` counts the positions the module has computed
    /// with the model's own hidden states (its rows of the KV blocks past them were written for
    /// proposals), and these are the model's final hidden states of the positions after them up
    /// to `computed`, `[computed - draft_computed, C]`: what the module's next catch-up reads.
    mtp_hidden: Vec<f32>,
    /// Back-off after proposals the model rejected whole: consecutive such proposals, and
    /// decode steps still to go without proposing (1, 3, 7, then 15 after 1 to 4 misses), so
    /// that a sequence nothing predicts stops paying for proposals, and tries again now and then.
    proposal_misses: u32,
    proposal_pause: u32,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    /// Tokens still to go through the model before the next one can be sampled.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether it proposes this step (counting down a pause after rejected proposals).
    fn proposes_now(&mut self) -> bool {
        if !self.request.params.speculative {
            return false;
        }
        if self.proposal_pause > 0 {
            self.proposal_pause -= 1;
            return false;
        }
        true
    }

    /// After a verified proposal of which `accepted` tokens stood.
    fn proposal_verified(&mut self, accepted: usize) {
        if accepted > 0 {
            self.proposal_misses = 0;
        } else {
            self.proposal_misses = (self.proposal_misses + 1).min(4);
            self.proposal_pause = (1 << self.proposal_misses) - 1;
        }
    }

    /// How many tokens may be proposed for it, at most `room`: every one may be emitted, and
    /// the model's own after them, within its token limit and the context.
    fn proposal_room(&self, room: usize, max_context: usize) -> usize {
        room.min(
            self.request
                .params
                .max_tokens
                .saturating_sub(self.generated() + 1),
        )
        .min(max_context.saturating_sub(self.tokens.len()))
    }

    /// A proposed token from a proposer's logits: its argmax for a greedy request; otherwise a
    /// draw from its distribution under the request's sampling settings, returned with that
    /// distribution for the verification.
    fn propose_from(&mut self, logits: &[f32]) -> (u32, Option<Vec<(u32, f32)>>) {
        if self.request.params.sampling.is_greedy() {
            return (crate::sampler::argmax(logits), None);
        }
        let (params, fallback) = (&self.request.params.sampling, &self.request.sampler);
        let sampler = self.draft_sampler.get_or_insert_with(|| {
            let params = SamplingParams {
                // The proposer draws from its own distribution; the penalties belong to the
                // model's, which the verification applies.
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                repetition_penalty: 1.0,
                seed: Some(fallback.seed() ^ 0x5eed_d4af),
                ..*params
            };
            Sampler::new(params).unwrap_or_else(|_| fallback.clone())
        });
        let (id, q) = sampler.sample_with_distribution(logits);
        (id, Some(q))
    }

    /// Takes the proposed tokens off again (a draft model's cache keeps what it computed for
    /// them; the caller decides what of it still stands).
    fn drop_draft(&mut self) -> Vec<u32> {
        let proposed = self.tokens.split_off(self.tokens.len() - self.draft);
        self.draft = 0;
        self.draft_q.clear();
        proposed
    }

    /// Takes the proposed tokens off without verifying them: the draft cache stands up to the
    /// sequence's real tokens.
    fn abandon_draft(&mut self) {
        self.drop_draft();
        self.draft_computed = self.draft_computed.min(self.tokens.len());
    }
}

struct Worker {
    engine: Box<dyn BatchEngine>,
    blocks: BlockManager,
    inbox: mpsc::Receiver<Command>,
    config: SchedulerConfig,
    shared: Arc<Mutex<Shared>>,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Sequence>,
    steps: u64,
    preemptions: u64,
    prefix_queried_tokens: u64,
    prefix_hit_tokens: u64,
    /// Live weight updates so far: part of the prefix cache's salt.
    weight_generation: u64,
    /// The snapshot id of the weights in service, empty for the plan's own.
    weights_name: String,
    speculative: SpeculativeStats,
    /// The draft model of the `draft` speculative method.
    draft: Option<DraftModel>,
    /// A pass of the `mtp` method's module failed: its rows are in doubt, so it proposes no
    /// more and the prefix cache stops waiting for them.
    mtp_failed: bool,
}

/// A smaller plan that proposes tokens, with its own KV pool.
struct DraftModel {
    engine: Box<dyn BatchEngine>,
    blocks: BlockManager,
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
            let mut received = 0;
            let mut swaps = vec![];
            // Prefix-cache reads and writes for another instance, between two steps.
            let mut cache_jobs = vec![];
            for command in
                std::iter::once(first).chain(std::iter::from_fn(|| self.inbox.try_recv().ok()))
            {
                match command {
                    Command::Submit(r) => {
                        let request = *r;
                        self.waiting.push_back(Sequence {
                            tokens: request.prompt.clone(),
                            request,
                            computed: 0,
                            blocks: SeqBlocks::default(),
                            draft: 0,
                            draft_q: vec![],
                            draft_blocks: SeqBlocks::default(),
                            draft_computed: 0,
                            draft_sampler: None,
                            mtp_hidden: vec![],
                            proposal_misses: 0,
                            proposal_pause: 0,
                        });
                        received += 1;
                    }
                    Command::Wake => {}
                    Command::Drain => draining = true,
                    Command::SwapWeights(weights, switched) => swaps.push((weights, switched)),
                    command @ (Command::CachedBlocks(..)
                    | Command::ReadCached(..)
                    | Command::WriteCached(..)) => cache_jobs.push(command),
                    Command::Abort => {
                        self.abort(received);
                        return;
                    }
                }
            }
            self.mark_received(received);
            for (weights, switched) in swaps {
                let (weights, snapshot_id) = *weights;
                self.swap_weights(weights, snapshot_id, switched);
            }
            for job in cache_jobs {
                match job {
                    Command::CachedBlocks(tokens, reply) => {
                        let _ = reply.send(CachedPrefix {
                            blocks: self.blocks.cached_blocks(&tokens),
                            weights_generation: self.weight_generation,
                            weights: self.weights_name.clone(),
                        });
                    }
                    Command::ReadCached(tokens, skip, mut slots, reply) => {
                        let read = self.read_cached(&tokens, skip, &mut slots);
                        let _ = reply.send(read.map(|count| BlocksRead {
                            slots: *slots,
                            count,
                            weights_generation: self.weight_generation,
                        }));
                    }
                    Command::WriteCached(prefix, reply) => {
                        let _ = reply.send(self.write_cached(*prefix));
                    }
                    _ => {}
                }
            }
            self.drop_cancelled();
            self.step();
            self.publish();
        }
    }

    /// The worker has taken `received` submissions off the channel: they now count through
    /// `self.waiting` instead.
    fn mark_received(&self, received: usize) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.in_transit = shared.in_transit.saturating_sub(received);
    }

    /// Fails every request still held and frees its blocks; the engine thread then ends.
    fn abort(&mut self, received: usize) {
        self.mark_received(received);
        let message = "the server shut down before this request finished";
        let all: Vec<Sequence> = self
            .waiting
            .drain(..)
            .chain(self.running.drain(..))
            .collect();
        for mut s in all {
            let _ = s.request.events.send(Event::Failed(message.into()));
            Self::free_blocks(&mut self.blocks, &mut self.draft, &mut s);
        }
        self.publish();
    }

    /// The bytes of `tokens`' leading cached full blocks, from block `skip` on; fewer than
    /// the tokens cover when the cache holds fewer.
    fn read_cached(
        &mut self,
        tokens: &[u32],
        skip: usize,
        slots: &mut BlockSlots,
    ) -> Result<usize, String> {
        let held = self.blocks.take_cached(tokens);
        let mut count = 0;
        let mut result = Ok(());
        for &block in held.blocks.iter().skip(skip).take(slots.capacity()) {
            result = slots.fill(count, self.engine.as_ref(), block);
            if result.is_err() {
                break;
            }
            count += 1;
        }
        self.release(held);
        result.map(|()| count).map_err(|e| e.to_string())
    }

    /// Puts the blocks of `prefix` that this pool lacks into the prefix cache, so a request
    /// with that prefix is admitted with them as a cache hit. Returns how many leading full
    /// blocks of the prefix the cache then holds. Seats nothing past a gap (a block this pool
    /// dropped since it asked for the rest) or when no block is free: the request computes
    /// what is missing itself, so the outcome is slower, never different.
    fn write_cached(&mut self, prefix: KvPrefix) -> Result<usize, String> {
        if prefix.weights_generation != self.weight_generation {
            // New weights since the blocks were asked for: they are of the old ones.
            return Ok(0);
        }
        let block_size = self.blocks.block_size();
        let mut seq = self.blocks.take_cached(&prefix.tokens);
        let have = seq.blocks.len();
        let end = (prefix.first_block + prefix.blocks.len()).min(prefix.tokens.len() / block_size);
        if have < prefix.first_block || end <= have || !self.blocks.grow(&mut seq, end * block_size)
        {
            self.release(seq);
            return Ok(have);
        }
        for b in have..end {
            let seated =
                prefix
                    .blocks
                    .seat(b - prefix.first_block, self.engine.as_mut(), seq.blocks[b]);
            if let Err(e) = seated {
                self.release(seq);
                return Err(e.to_string());
            }
        }
        self.blocks
            .commit(&mut seq, &prefix.tokens, end * block_size);
        self.release(seq);
        Ok(end)
    }

    fn release(&mut self, blocks: SeqBlocks) {
        if let Err(e) = self.blocks.free(blocks) {
            // A bookkeeping bug, never an input: report it, keep serving.
            tracing::error!(error = %e, "KV block bookkeeping");
        }
    }

    /// Frees a sequence's KV blocks, in the target's pool and the draft model's.
    fn free_blocks(blocks: &mut BlockManager, draft: &mut Option<DraftModel>, s: &mut Sequence) {
        let freed = blocks.free(std::mem::take(&mut s.blocks));
        let freed_draft = match draft {
            Some(d) => d.blocks.free(std::mem::take(&mut s.draft_blocks)),
            None => Ok(()),
        };
        s.draft_computed = 0;
        s.mtp_hidden.clear();
        if let Err(e) = freed.and(freed_draft) {
            tracing::error!(error = %e, "KV block bookkeeping");
        }
    }

    /// A live weight update, between two steps: no pass mixes old and new weights, and running
    /// sequences go on with the new ones. The old weights are unmapped here.
    fn swap_weights(&mut self, weights: WeightStore, snapshot_id: String, switched: SwitchReply) {
        match self.engine.replace_weights(weights) {
            Ok(old) => {
                drop(old);
                self.weights_name = snapshot_id;
                self.invalidate_prefix_cache();
                let _ = switched.send(Ok(()));
            }
            Err(e) => {
                let _ = switched.send(Err(e));
            }
        }
    }

    /// Called at every weight switch: cached KV blocks were computed with the old weights, so
    /// none may serve a prompt after the switch. The cache forgets every hash and takes a new
    /// salt; blocks still held by running sequences keep their old-chain hashes, which no new
    /// prompt can match.
    fn invalidate_prefix_cache(&mut self) {
        self.weight_generation += 1;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.engine.plan().identity());
        hasher.update(&self.weight_generation.to_le_bytes());
        self.blocks.clear_cache(*hasher.finalize().as_bytes());
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !is_cancelled(&s.request));
        let mut i = 0;
        while i < self.running.len() {
            if is_cancelled(&self.running[i].request) {
                let mut done = self.running.remove(i);
                Self::free_blocks(&mut self.blocks, &mut self.draft, &mut done);
            } else {
                i += 1;
            }
        }
    }

    /// Plans one forward pass: decode tokens first, then prompt chunks of running sequences,
    /// then newly admitted ones, within the token budget; gives each the blocks its tokens need,
    /// preempting the most recently admitted sequences when the pool runs out. Returns
    /// (index into `running`, tokens) pairs.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let budget = self.engine.options().max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = vec![];
        let mut used = 0;
        let mut preempted = vec![false; self.running.len()];
        let mut finished = vec![];
        self.draft_propose(budget);
        self.mtp_propose(budget);
        let decode_first = (0..self.running.len())
            .filter(|&i| self.running[i].pending() == 1)
            .chain((0..self.running.len()).filter(|&i| self.running[i].pending() > 1));
        for i in decode_first.collect::<Vec<_>>() {
            if preempted[i] || used == budget {
                continue;
            }
            if self.running[i].draft > 0 && self.running[i].pending() > budget - used {
                self.running[i].abandon_draft(); // the budget went to sequences before it
            }
            if self.running[i].pending() == 1 {
                self.propose(i, budget - used - 1);
            }
            if self.running[i].draft > 0 {
                let s = &self.running[i];
                if self.blocks.blocks_for(s.computed + s.pending()) > self.blocks.num_blocks() {
                    self.running[i].abandon_draft(); // the proposal alone would not fit the pool
                }
            }
            let mut count = self.running[i].pending().min(budget - used);
            let mut positions = self.running[i].computed + count;
            if self.blocks.blocks_for(positions) > self.blocks.num_blocks() {
                // Longer than the whole pool: it can never continue.
                finished.push(i);
                continue;
            }
            loop {
                if self.blocks.grow(&mut self.running[i].blocks, positions) {
                    plan.push((i, count));
                    used += count;
                    break;
                }
                if self.running[i].draft > 0 {
                    // Nobody gives way for a proposal: decode one token.
                    self.running[i].abandon_draft();
                    count = 1;
                    positions = self.running[i].computed + 1;
                    continue;
                }
                let Some(victim) = (0..self.running.len())
                    .rev()
                    .find(|&j| !preempted[j] && !finished.contains(&j))
                else {
                    break;
                };
                preempted[victim] = true;
                self.running[victim].drop_draft();
                Self::free_blocks(&mut self.blocks, &mut self.draft, &mut self.running[victim]);
                self.running[victim].computed = 0;
                if let Some(at) = plan.iter().position(|&(k, _)| k == victim) {
                    used -= plan.remove(at).1;
                }
                if victim == i {
                    break;
                }
            }
        }
        let any_preempted = preempted.iter().any(|&p| p);
        // Admit only when nobody had to give way this step.
        while !any_preempted && used < budget && self.running.len() < self.config.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            let (blocks, hit) = self.blocks.start(&s.tokens);
            s.blocks = blocks;
            s.computed = hit;
            if self.uses_mtp() {
                // A cached prefix brings the module's rows with it (blocks are shared only once
                // the module has written them, `committable`): it carries on from there.
                s.draft_computed = hit;
                s.mtp_hidden.clear();
            }
            let count = s.pending().min(budget - used);
            if !self.blocks.grow(&mut s.blocks, s.computed + count) {
                let blocks = std::mem::take(&mut s.blocks);
                self.release(blocks);
                s.computed = 0;
                self.waiting.push_front(s);
                break;
            }
            self.prefix_queried_tokens += s.tokens.len() as u64;
            self.prefix_hit_tokens += hit as u64;
            self.running.push(s);
            preempted.push(false);
            plan.push((self.running.len() - 1, count));
            used += count;
        }
        // Out of the running set, highest index first so the others keep theirs; the plan's
        // indices are remapped after.
        let mut out: Vec<usize> = (0..self.running.len())
            .filter(|&i| preempted[i] || finished.contains(&i))
            .collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        let mut back_to_waiting = vec![];
        for &i in &out {
            let mut s = self.running.remove(i);
            if preempted[i] {
                back_to_waiting.push(s);
            } else {
                let _ = s.request.events.send(Event::Done {
                    reason: FinishReason::Length,
                    prompt_tokens: s.request.prompt.len(),
                    completion_tokens: s.generated(),
                });
                Self::free_blocks(&mut self.blocks, &mut self.draft, &mut s);
            }
        }
        self.preemptions += back_to_waiting.len() as u64;
        // The earliest admitted goes back first.
        for s in back_to_waiting {
            self.waiting.push_front(s);
        }
        plan.iter()
            .map(|&(i, count)| (i - out.iter().filter(|&&o| o < i).count(), count))
            .collect()
    }

    /// The `draft` method: every sequence about to decode one token gets up to
    /// `num_speculative_tokens` proposals from the draft model, within what the token budget,
    /// its token limit, the context and the draft's KV pool allow. The draft's cache is first
    /// caught up with the sequence's tokens (its prompt on the first step, the tokens accepted
    /// since on later ones), then each proposal is one more draft pass over all the sequences:
    /// greedy requests propose the draft's argmax, sampled ones draw from the draft's own
    /// distribution under the request's sampling settings (kept for the verification).
    fn draft_propose(&mut self, budget: usize) {
        let (Some(config), Some(draft)) = (&self.config.speculative, self.draft.as_mut()) else {
            return;
        };
        let k = config.num_speculative_tokens;
        let max_context = self
            .engine
            .options()
            .max_context
            .min(draft.engine.options().max_context);
        let mut room = budget;
        // (index into running, proposals wanted)
        let mut wanted: Vec<(usize, usize)> = vec![];
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.pending() != 1 || room < 2 || !s.proposes_now() {
                continue;
            }
            let d = s.proposal_room(room - 1, max_context).min(k);
            // The draft's cache takes every proposal but the last.
            if d == 0
                || !draft
                    .blocks
                    .grow(&mut s.draft_blocks, s.tokens.len() + d - 1)
            {
                continue;
            }
            room -= 1 + d;
            wanted.push((i, d));
        }
        let draft_budget = draft.engine.options().max_batch_tokens;
        let vocab = draft.engine.vocab_size();
        let mut proposals: Vec<Vec<u32>> = vec![vec![]; wanted.len()];
        let mut dists: Vec<Vec<Vec<(u32, f32)>>> = vec![vec![]; wanted.len()];
        loop {
            // One draft pass: each sequence still proposing feeds what its cache lacks of its
            // tokens followed by its proposals so far, within the pass's budget.
            let mut feeds: Vec<(usize, Vec<u32>, bool)> = vec![];
            let mut left = draft_budget;
            for (w, &(i, d)) in wanted.iter().enumerate() {
                let s = &self.running[i];
                if proposals[w].len() == d || left == 0 {
                    continue;
                }
                let end = s.tokens.len() + proposals[w].len();
                let virtual_token = |p: usize| {
                    s.tokens
                        .get(p)
                        .copied()
                        .unwrap_or_else(|| proposals[w][p - s.tokens.len()])
                };
                let take = (end - s.draft_computed).min(left);
                let tokens: Vec<u32> = (s.draft_computed..s.draft_computed + take)
                    .map(virtual_token)
                    .collect();
                left -= take;
                feeds.push((w, tokens, s.draft_computed + take == end));
            }
            if feeds.is_empty() {
                break;
            }
            let chunks: Vec<SeqChunk> = feeds
                .iter()
                .map(|(w, tokens, last)| {
                    let s = &self.running[wanted[*w].0];
                    SeqChunk {
                        blocks: &s.draft_blocks.blocks,
                        start: s.draft_computed,
                        tokens,
                        logits: if *last { Logits::Last } else { Logits::None },
                    }
                })
                .collect();
            let logits = match draft.engine.pass(&chunks) {
                Ok(out) => out.logits,
                Err(e) => {
                    // The draft's cache is in doubt: recompute it next time; propose nothing.
                    tracing::warn!(error = %e, "draft model pass failed; decoding without proposals");
                    for &(i, _) in &wanted {
                        self.running[i].draft_computed = 0;
                    }
                    return;
                }
            };
            let mut row = 0;
            for (w, tokens, last) in feeds {
                let s = &mut self.running[wanted[w].0];
                s.draft_computed += tokens.len();
                if !last {
                    continue;
                }
                let Some(logits) = logits.get(row * vocab..(row + 1) * vocab) else {
                    break;
                };
                row += 1;
                let (id, q) = s.propose_from(logits);
                proposals[w].push(id);
                dists[w].extend(q);
            }
        }
        for (w, (i, _)) in wanted.into_iter().enumerate() {
            let s = &mut self.running[i];
            let proposed = std::mem::take(&mut proposals[w]);
            if proposed.is_empty() {
                continue;
            }
            // The last proposal was never fed: the cache stands up to the one before.
            s.draft_computed = s.draft_computed.min(s.tokens.len() + proposed.len() - 1);
            s.draft = proposed.len();
            s.draft_q = std::mem::take(&mut dists[w]);
            s.tokens.extend(proposed);
        }
    }

    fn uses_mtp(&self) -> bool {
        !self.mtp_failed
            && self.engine.runs_mtp()
            && matches!(
                self.config.speculative.as_ref().map(|c| &c.method),
                Some(SpeculativeMethod::Mtp)
            )
    }

    /// Positions of `s` whose KV rows are all written, the prefix cache may share: with the
    /// `mtp` method a block is shared once the module's rows in it are written too, so a later
    /// request that takes it from the cache gets them.
    fn committable(uses_mtp: bool, s: &Sequence) -> usize {
        if uses_mtp {
            s.computed.min(s.draft_computed)
        } else {
            s.computed
        }
    }

    /// The `mtp` method. The module's position `p` reads the model's final hidden state of `p`
    /// and the token at `p + 1`, so it runs one position behind the model: first a catch-up of
    /// every running sequence over the positions the model computed since (their hidden states
    /// kept from its passes, `Sequence::mtp_hidden`), which also keeps those rows few; its last
    /// row proposes the token after the sequence's pending one. Each further proposal is one
    /// more pass at the next position, on the module's own hidden state and its last proposal
    /// (those positions' rows of the module's KV slot are overwritten by the next catch-up).
    /// Proposals are drawn as the draft method draws them, within the same limits.
    fn mtp_propose(&mut self, budget: usize) {
        if !self.uses_mtp() {
            return;
        }
        let Some(config) = &self.config.speculative else {
            return;
        };
        let k = config.num_speculative_tokens;
        let hidden_size = self.engine.plan().manifest.model.hidden_size as usize;
        let max_context = self.engine.options().max_context;
        let pass_budget = self.engine.options().max_batch_tokens;
        let vocab = self.engine.vocab_size();
        let mut room = budget;
        // Per running sequence in the work: (index, proposals wanted, next position).
        let mut work: Vec<(usize, usize, usize)> = vec![];
        // Blocks the running sequences may take this step before any proposal does (a decode
        // token or a chunk starting a block each): proposals never preempt anyone.
        let mut spare = self
            .blocks
            .num_available()
            .saturating_sub(self.running.len());
        for (i, s) in self.running.iter_mut().enumerate() {
            // Every sequence's rows are written, opted out or not, so that the blocks the
            // prefix cache shares carry them.
            let mut wanted = 0;
            if s.request.params.speculative && s.pending() == 1 && room >= 2 && s.proposes_now() {
                let d = s.proposal_room(room - 1, max_context).min(k);
                let needed = self
                    .blocks
                    .blocks_for(s.tokens.len() + d - 1)
                    .saturating_sub(s.blocks.blocks.len());
                // The chained passes write the module's rows of positions past the pending one.
                if d > 0
                    && needed <= spare
                    && self.blocks.grow(&mut s.blocks, s.tokens.len() + d - 1)
                {
                    spare -= needed;
                    room -= 1 + d;
                    wanted = d;
                }
            }
            if wanted > 0 || s.draft_computed < s.computed {
                work.push((i, wanted, s.draft_computed));
            }
        }
        let mut proposals: Vec<Vec<u32>> = vec![vec![]; work.len()];
        let mut dists: Vec<Vec<Vec<(u32, f32)>>> = vec![vec![]; work.len()];
        // The module's own hidden state after each sequence's last proposal.
        let mut chained: Vec<Vec<f32>> = vec![vec![]; work.len()];
        loop {
            // (work index, tokens, hidden rows, whether its last row proposes)
            let mut feeds: Vec<(usize, Vec<u32>, Vec<f32>, bool)> = vec![];
            let mut left = pass_budget;
            for (w, &(i, wanted, next)) in work.iter().enumerate() {
                let s = &self.running[i];
                if left == 0 {
                    break;
                }
                if next < s.computed {
                    // Catch-up: positions `next..` with the model's hidden states.
                    let take = (s.computed - next).min(left);
                    let from = next - s.draft_computed;
                    let tokens = s.tokens[next + 1..next + 1 + take].to_vec();
                    let rows =
                        s.mtp_hidden[from * hidden_size..(from + take) * hidden_size].to_vec();
                    let last = next + take == s.computed && wanted > 0;
                    left -= take;
                    feeds.push((w, tokens, rows, last));
                } else if proposals[w].len() < wanted && !proposals[w].is_empty() {
                    let token = *proposals[w].last().unwrap_or(&0);
                    left -= 1;
                    feeds.push((w, vec![token], std::mem::take(&mut chained[w]), true));
                }
            }
            if feeds.is_empty() {
                break;
            }
            let hidden: Vec<f32> = feeds.iter().flat_map(|f| f.2.iter().copied()).collect();
            let chunks: Vec<SeqChunk> = feeds
                .iter()
                .map(|(w, tokens, _, last)| {
                    let (i, _, next) = work[*w];
                    SeqChunk {
                        blocks: &self.running[i].blocks.blocks,
                        start: next,
                        tokens,
                        logits: if *last { Logits::Last } else { Logits::None },
                    }
                })
                .collect();
            let out = match self.engine.mtp_pass(&chunks, &hidden) {
                Ok(out) => out,
                Err(e) => {
                    // The module's rows are in doubt: it proposes no more (outputs do not
                    // depend on it), and blocks are shared without waiting for its rows.
                    tracing::warn!(error = %e, "prediction module pass failed; decoding without proposals from now on");
                    self.mtp_failed = true;
                    for s in &mut self.running {
                        s.mtp_hidden.clear();
                        s.draft_computed = s.computed;
                    }
                    return;
                }
            };
            let (mut row, mut token_row) = (0, 0);
            for (w, tokens, _, last) in feeds {
                let (i, _, next) = work[w];
                let s = &mut self.running[i];
                work[w].2 = next + tokens.len();
                token_row += tokens.len();
                if !last {
                    continue;
                }
                let (Some(logits), Some(h)) = (
                    out.logits.get(row * vocab..(row + 1) * vocab),
                    out.hidden
                        .get((token_row - 1) * hidden_size..token_row * hidden_size),
                ) else {
                    break;
                };
                row += 1;
                let (id, q) = s.propose_from(logits);
                proposals[w].push(id);
                dists[w].extend(q);
                chained[w] = h.to_vec();
            }
        }
        for (w, &(i, _, _)) in work.iter().enumerate() {
            let s = &mut self.running[i];
            // Caught up to `computed`; what was written past it was for the proposals.
            s.draft_computed = s.computed;
            s.mtp_hidden.clear();
            self.blocks.commit(&mut s.blocks, &s.tokens, s.computed);
            let proposed = std::mem::take(&mut proposals[w]);
            if !proposed.is_empty() {
                s.draft = proposed.len();
                s.draft_q = std::mem::take(&mut dists[w]);
                s.tokens.extend(proposed);
            }
        }
    }

    /// Speculative decoding: appends to sequence `i`, about to decode one token, the tokens
    /// proposed for it (at most `room`, what the token budget leaves), when the scheduler and
    /// the request allow it and the blocks for them are free without preempting anyone.
    fn propose(&mut self, i: usize, room: usize) {
        let Some(config) = &self.config.speculative else {
            return;
        };
        if matches!(
            config.method,
            SpeculativeMethod::Draft { .. } | SpeculativeMethod::Mtp
        ) {
            return; // proposed by `draft_propose` or `mtp_propose`
        }
        let max_context = self.engine.options().max_context;
        let s = &mut self.running[i];
        if !s.proposes_now() {
            return;
        }
        let limit = s.proposal_room(room, max_context);
        let draft = config.propose(&s.tokens, limit);
        if draft.is_empty()
            || !self
                .blocks
                .grow(&mut s.blocks, s.computed + 1 + draft.len())
        {
            return;
        }
        s.draft = draft.len();
        s.tokens.extend_from_slice(&draft);
    }

    /// One forward pass over the scheduled tokens; samples for every sequence that reached the
    /// end of its tokens.
    fn step(&mut self) {
        let plan = self.schedule();
        if plan.is_empty() {
            return;
        }
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|&(i, count)| {
                let s = &self.running[i];
                let done = s.computed + count == s.tokens.len();
                SeqChunk {
                    blocks: &s.blocks.blocks,
                    start: s.computed,
                    tokens: &s.tokens[s.computed..s.computed + count],
                    logits: match done {
                        false => Logits::None,
                        // A proposal: the logits after each of its tokens, to verify them.
                        true if s.draft > 0 => Logits::All,
                        // Nothing but the argmax is read from the row: the engine picks it
                        // (on a GPU, without copying the row back).
                        true if s.request.sampler.picks_argmax()
                            && s.request.params.logprobs.is_none() =>
                        {
                            Logits::Greedy
                        }
                        true => Logits::Last,
                    },
                }
            })
            .collect();
        let chunk_logits: Vec<Logits> = chunks.iter().map(|c| c.logits).collect();
        let vocab = self.engine.vocab_size();
        let eos = self.engine.plan().manifest.model.eos_token_ids.clone();
        let max_context = self.engine.options().max_context;
        // The logits are read where the engine keeps them: a decode pass of many sequences
        // returns tens of megabytes, which a copy per step would cost milliseconds.
        let hidden_size = self.engine.plan().manifest.model.hidden_size as usize;
        let uses_mtp = self.uses_mtp();
        let result = self.engine.pass(&chunks);
        self.steps += 1;
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                // A failed pass fails every request in it; their blocks are freed.
                let message = e.to_string();
                let mut planned: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                planned.sort_unstable_by(|a, b| b.cmp(a));
                for i in planned {
                    let mut s = self.running.remove(i);
                    s.drop_draft();
                    let _ = s.request.events.send(Event::Failed(message.clone()));
                    Self::free_blocks(&mut self.blocks, &mut self.draft, &mut s);
                }
                return;
            }
        };
        // The `mtp` method's module reads the model's hidden state of every computed position:
        // each sequence keeps its rows (those of rejected proposals are dropped below).
        if uses_mtp && !output.hidden.is_empty() {
            let mut row0 = 0;
            for &(i, count) in &plan {
                let s = &mut self.running[i];
                if let Some(rows) = output
                    .hidden
                    .get(row0 * hidden_size..(row0 + count) * hidden_size)
                {
                    s.mtp_hidden.extend_from_slice(rows);
                }
                row0 += count;
            }
        }
        // What each running sequence that reached the end of its tokens samples from: a logits
        // row or the engine's greedy pick, each counted in plan order.
        let mut picks: Vec<Option<Pick>> = vec![None; self.running.len()];
        let (mut rows, mut greedy) = (0, 0);
        for (&(i, count), chunk) in plan.iter().zip(&chunk_logits) {
            let s = &mut self.running[i];
            if s.draft > 0 {
                // Verified below; its computed positions are known only then.
                picks[i] = Some(Pick::Verify(rows));
                rows += count;
                continue;
            }
            s.computed += count;
            let upto = Self::committable(uses_mtp, s);
            self.blocks.commit(&mut s.blocks, &s.tokens, upto);
            match chunk {
                Logits::Greedy => {
                    picks[i] = Some(Pick::Greedy(greedy));
                    greedy += 1;
                }
                Logits::Last => {
                    picks[i] = Some(Pick::Row(rows));
                    rows += 1;
                }
                Logits::None | Logits::All => {}
            }
        }
        let (logits, greedy_ids) = (output.logits, output.greedy_ids);
        // Each sequence samples with its own sampler, so the rows are sampled in parallel: a
        // decode pass of 64 sequences of a 128K vocabulary is 8M logits to scan.
        let row = |r: usize| logits.get(r * vocab..(r + 1) * vocab);
        let sampled: Vec<Option<Emitted>> = self
            .running
            .par_iter_mut()
            .zip(picks.par_iter())
            .map(|(s, pick)| match (*pick)? {
                Pick::Greedy(k) => {
                    let id = *greedy_ids.get(k)?;
                    Some(Emitted::one(id, token_event(id, &[], None)))
                }
                Pick::Row(r) => {
                    let row_logits = row(r)?;
                    let id = s.request.sampler.sample(row_logits);
                    Some(Emitted::one(
                        id,
                        token_event(id, row_logits, s.request.params.logprobs),
                    ))
                }
                Pick::Verify(row0) => {
                    // Row j holds the logits after the sequence's last token and the first j
                    // proposed ones: each proposed token stands while the sampler keeps it,
                    // and the first it replaces, or the token after them all, ends the step.
                    let q = std::mem::take(&mut s.draft_q);
                    let proposed = s.drop_draft();
                    let mut tokens = Vec::with_capacity(proposed.len() + 1);
                    for j in 0..=proposed.len() {
                        let row_logits = row(row0 + j)?;
                        let sampler = &mut s.request.sampler;
                        let id = match (proposed.get(j), q.get(j)) {
                            (Some(&draft), Some(q)) => {
                                sampler.verify_proposal(row_logits, draft, q)
                            }
                            (Some(&draft), None) => sampler.verify_draft(row_logits, draft),
                            (None, _) => sampler.sample(row_logits),
                        };
                        let event = token_event(id, row_logits, s.request.params.logprobs);
                        tokens.push((id, event));
                        if proposed.get(j) != Some(&id) {
                            break;
                        }
                    }
                    let accepted = tokens.len() - 1;
                    // The last token and the accepted ones are in the cache; the keys and
                    // values written for the rejected ones lie past `computed` and are
                    // overwritten as the sequence goes on.
                    s.computed += 1 + accepted;
                    // The draft model's cache holds the accepted proposals, not the rest.
                    s.draft_computed = s.draft_computed.min(s.computed);
                    Some(Emitted {
                        tokens,
                        proposed: proposed.len(),
                        accepted,
                    })
                }
            })
            .collect();
        let mut finished = vec![];
        for (i, emitted) in sampled.into_iter().enumerate() {
            let Some(emitted) = emitted else { continue };
            self.speculative.record(emitted.proposed, emitted.accepted);
            let s = &mut self.running[i];
            if emitted.proposed > 0 {
                s.proposal_verified(emitted.accepted);
            }
            for (id, event) in emitted.tokens {
                s.tokens.push(id);
                let _ = s.request.events.send(Event::Token(event));
                let params = &s.request.params;
                let stop = params.stop_token_ids.contains(&id)
                    || (!params.ignore_eos && eos.contains(&id));
                let reason = if stop {
                    Some(FinishReason::Stop)
                } else if s.generated() >= params.max_tokens || s.tokens.len() >= max_context {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let _ = s.request.events.send(Event::Done {
                        reason,
                        prompt_tokens: s.request.prompt.len(),
                        completion_tokens: s.generated(),
                    });
                    finished.push(i);
                    break;
                }
            }
            if emitted.proposed > 0 && !finished.contains(&i) {
                let upto = Self::committable(uses_mtp, s);
                self.blocks.commit(&mut s.blocks, &s.tokens, upto);
            }
            let kept = s.computed.saturating_sub(s.draft_computed) * hidden_size;
            s.mtp_hidden.truncate(kept);
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let mut done = self.running.remove(i);
            Self::free_blocks(&mut self.blocks, &mut self.draft, &mut done);
        }
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let in_transit = shared.in_transit;
        let stats = &mut shared.stats;
        stats.running = self.running.len();
        stats.kv_tokens_used = self.running.iter().map(|s| s.computed).sum();
        stats.kv_blocks_used = self.blocks.num_held();
        stats.steps = self.steps;
        stats.preemptions = self.preemptions;
        stats.prefix_cache_queried_tokens = self.prefix_queried_tokens;
        stats.prefix_cache_hit_tokens = self.prefix_hit_tokens;
        stats.speculative = self.speculative.clone();
        stats.speculative.draft_blocks_held =
            self.draft.as_ref().map_or(0, |d| d.blocks.num_held());
        stats.waiting = self.waiting.len() + in_transit;
    }
}

/// Where a sequence's next token comes from after a pass.
#[derive(Clone, Copy)]
enum Pick {
    /// Its sampler over this logits row.
    Row(usize),
    /// The engine's greedy pick of this index.
    Greedy(usize),
    /// Its proposed tokens, verified against the rows from this one on (one more row than
    /// tokens proposed).
    Verify(usize),
}

/// What one sequence emits after a pass: one token, or after a proposal the accepted proposed
/// tokens and the model's own.
struct Emitted {
    tokens: Vec<(u32, TokenEvent)>,
    proposed: usize,
    accepted: usize,
}

impl Emitted {
    fn one(id: u32, event: TokenEvent) -> Emitted {
        Emitted {
            tokens: vec![(id, event)],
            proposed: 0,
            accepted: 0,
        }
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
