//! The executor: replays the plan's program for one forward pass over `T` new tokens of one
//! sequence, reading weights from the mapped plan and activations from one arena.
//!
//! Each step is a kernel launch: a library kernel from `kernels::cpu` (chosen by the plan's ISA)
//! or a function from the plan's generated code, called on row chunks in parallel. The engine
//! never decides anything the plan already decided.

use crate::error::RuntimeError;
use crate::kv_cache::{KvPool, KvRows};
use crate::plan::LoadedPlan;
use crate::weights::WeightStore;
use artifacts::code_abi::{AddRmsNormFn, RmsNormFn, RopeFn, SiluMulFn};
use artifacts::schema::{Act, Buffer, Launch, Manifest, Rows, Step, WeightRef};
use ir_types::{ActQuant, CpuIsa, Target};
use kernels::cpu;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Positions the KV cache holds (prompt plus generated tokens); at most the plan's
    /// `max_position_embeddings`, which for a sliding-window model is its window (the
    /// compiler caps it: up to the window, sliding-window attention is causal attention).
    pub max_context: usize,
    /// Tokens per forward pass; longer prompts are processed in chunks of this size.
    pub max_batch_tokens: usize,
    /// Sequences that can be in flight at once; with `kv_blocks` unset, the KV pool holds
    /// this many full contexts.
    pub max_num_seqs: usize,
    /// Positions per KV cache block.
    pub block_size: usize,
    /// Blocks in the KV pool; `None`: enough for `max_num_seqs` sequences of `max_context`.
    pub kv_blocks: Option<usize>,
}

/// Default positions per KV block (FastDeploy's default; a multiple of the attention kernel's
/// key block, so paging costs the kernel nothing).
pub const DEFAULT_BLOCK_SIZE: usize = 64;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_context: 4096,
            max_batch_tokens: 512,
            max_num_seqs: 1,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_blocks: None,
        }
    }
}

/// Which logits a sequence wants from a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    /// Of its last token in this pass (the end of a prompt, every decode step).
    Last,
    /// Of every token it has in this pass (`fdrt logits`).
    All,
    /// Only the most likely next token after its last token (greedy decoding with nothing
    /// else read from the row): the engine picks it ([`Engine::greedy_ids`]) and returns no
    /// logits row for it, so a GPU pass need not copy the row back.
    Greedy,
}

/// One sequence's part of a forward pass: `tokens` at positions `start..`, after the `start`
/// positions already in the sequence's KV blocks. `blocks` is its block table and must cover
/// every position up to `start + tokens.len()`; the caller (the scheduler's block manager)
/// guarantees that no other chunk of the pass writes those blocks.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    pub blocks: &'a [u32],
    pub start: usize,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// Where one sequence's tokens sit in a pass.
pub(crate) struct SeqSpan<'a> {
    pub blocks: &'a [u32],
    pub row0: usize,
    pub rows: usize,
}

/// A pass's tokens laid out in rows, checked: what either engine needs to run it.
pub(crate) struct PassLayout<'a> {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// The rows whose logits are computed: first those returned (`Last` and `All` chunks, in
    /// chunk order), then the `Greedy` chunks' (in chunk order), whose argmax alone is wanted.
    pub logit_rows: Vec<u32>,
    /// How many of `logit_rows` are returned as logits.
    pub full_rows: usize,
    pub spans: Vec<SeqSpan<'a>>,
}

impl<'a> PassLayout<'a> {
    /// Lays out `chunks` and refuses a pass no engine may run: empty, over the token budget or
    /// the context, block tables too short or outside the pool of `pool_blocks`, a block
    /// written by two chunks, a token id outside the model's `vocab`.
    pub fn of(
        chunks: &[SeqChunk<'a>],
        options: &EngineOptions,
        pool_blocks: usize,
        vocab: usize,
        model_max: usize,
    ) -> Result<PassLayout<'a>, RuntimeError> {
        let t: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if t == 0 || chunks.iter().any(|c| c.tokens.is_empty()) {
            return Err(RuntimeError::EmptyInput);
        }
        if t > options.max_batch_tokens {
            return Err(RuntimeError::InvalidPlan(format!(
                "{t} tokens in one pass exceed the token budget {}",
                options.max_batch_tokens
            )));
        }
        let block_size = options.block_size;
        let mut tokens = Vec::with_capacity(t);
        let mut positions = Vec::with_capacity(t);
        let mut logit_rows = vec![];
        let mut greedy_rows = vec![];
        let mut spans = Vec::with_capacity(chunks.len());
        // Blocks written in this pass, to refuse two chunks writing the same one.
        let mut written: Vec<u32> = vec![];
        for c in chunks {
            let start = c.start;
            let needed = start + c.tokens.len();
            if needed > options.max_context {
                return Err(RuntimeError::ContextFull {
                    needed,
                    capacity: options.max_context,
                    model_max,
                });
            }
            if needed > c.blocks.len() * block_size {
                return Err(RuntimeError::KvBlocks(format!(
                    "{needed} positions need {} blocks of {block_size}, the table has {}",
                    needed.div_ceil(block_size),
                    c.blocks.len()
                )));
            }
            if let Some(&b) = c.blocks.iter().find(|&&b| b as usize >= pool_blocks) {
                return Err(RuntimeError::KvBlocks(format!(
                    "block {b} is outside the pool of {pool_blocks}"
                )));
            }
            for &b in &c.blocks[start / block_size..needed.div_ceil(block_size)] {
                if written.contains(&b) {
                    return Err(RuntimeError::KvBlocks(format!(
                        "block {b} is written by two sequences in one pass"
                    )));
                }
                written.push(b);
            }
            if let Some(&id) = c.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(RuntimeError::BadTokenId { id, vocab });
            }
            let row0 = tokens.len() as u32;
            match c.logits {
                Logits::None => {}
                Logits::Last => logit_rows.push(row0 + c.tokens.len() as u32 - 1),
                Logits::All => logit_rows.extend(row0..row0 + c.tokens.len() as u32),
                Logits::Greedy => greedy_rows.push(row0 + c.tokens.len() as u32 - 1),
            }
            spans.push(SeqSpan {
                blocks: c.blocks,
                row0: row0 as usize,
                rows: c.tokens.len(),
            });
            tokens.extend_from_slice(c.tokens);
            positions.extend(start as u32..needed as u32);
        }
        let full_rows = logit_rows.len();
        logit_rows.extend(greedy_rows);
        Ok(PassLayout {
            tokens,
            positions,
            logit_rows,
            full_rows,
            spans,
        })
    }
}

/// A generated function, resolved once at load.
#[derive(Clone, Copy)]
enum Generated {
    RmsNorm(RmsNormFn),
    AddRmsNorm(AddRmsNormFn),
    SiluMul(SiluMulFn),
    Rope(RopeFn),
}

pub struct Engine {
    plan: LoadedPlan,
    isa: CpuIsa,
    generated: Vec<Option<Generated>>,
    /// The same for the multi-token-prediction module's steps.
    generated_mtp: Vec<Option<Generated>>,
    arena: Vec<f32>,
    logits: Vec<f32>,
    /// The paged KV pool; its memory is committed only as blocks are written.
    kv: KvPool,
    /// Block table of the single sequence of `prefill` / `forward_last`: the pool's first
    /// blocks, in order.
    solo_blocks: Vec<u32>,
    /// Positions that single sequence holds.
    solo_len: usize,
    /// RoPE tables `[max_context, D/2]`, computed in f64 from the plan's frequencies.
    cos: Vec<f32>,
    sin: Vec<f32>,
    options: EngineOptions,
    /// Time per kernel, when `FDRT_PROFILE` is set.
    profile: Option<Profile>,
    /// Sees every matmul's input (`fdrt calibrate`); None in service.
    matmul_observer: Option<Box<MatmulObserver>>,
    /// The last pass's picks for its `Greedy` chunks.
    greedy_ids: Vec<u32>,
    /// Whether a pass of the main program keeps every token's final hidden state (for the
    /// multi-token-prediction module), and those of the last such pass and of the last module
    /// pass, `[T, C]`.
    keep_hidden: bool,
    hidden: Vec<f32>,
    mtp_hidden: Vec<f32>,
}

/// Called with each matmul's weight and its input `x` (`rows` rows of `cols` values, `stride`
/// apart) before the matmul runs.
pub type MatmulObserver = dyn FnMut(WeightRef, &[f32], usize, usize, usize) + Send;

/// Wall time per kernel name, accumulated over steps; printed to stderr when the engine drops.
#[derive(Default)]
struct Profile {
    totals: Vec<(String, std::time::Duration, u64)>,
}

impl Profile {
    fn record(&mut self, kernel: &str, elapsed: std::time::Duration) {
        match self.totals.iter_mut().find(|(k, _, _)| k == kernel) {
            Some((_, total, calls)) => {
                *total += elapsed;
                *calls += 1;
            }
            None => self.totals.push((kernel.to_string(), elapsed, 1)),
        }
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        self.totals.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        eprintln!("kernel profile (FDRT_PROFILE):");
        for (kernel, total, calls) in &self.totals {
            eprintln!(
                "  {kernel:<36} {:>10.2} ms {calls:>8} calls",
                total.as_secs_f64() * 1e3
            );
        }
    }
}

/// The generated function of every step of `steps` that has one, resolved once at load.
fn resolve_generated(
    plan: &LoadedPlan,
    steps: &[Step],
) -> Result<Vec<Option<Generated>>, RuntimeError> {
    let mut generated = Vec::with_capacity(steps.len());
    for step in steps {
        let Some(c) = step.code else {
            generated.push(None);
            continue;
        };
        let offset = plan.manifest.code[c as usize].offset as usize;
        // SAFETY: the symbol was generated for the ABI type matching its launch kind, which
        // the load-time check tied to the step's kernel.
        let f = unsafe {
            match step.launch {
                Launch::RmsNorm { .. } => Generated::RmsNorm(plan.code.entry(offset)?),
                Launch::AddRmsNorm { .. } => Generated::AddRmsNorm(plan.code.entry(offset)?),
                Launch::SiluMul { .. } => Generated::SiluMul(plan.code.entry(offset)?),
                Launch::Rope { .. } => Generated::Rope(plan.code.entry(offset)?),
                _ => {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "no generated form for {}",
                        step.kernel
                    )))
                }
            }
        };
        generated.push(Some(f));
    }
    Ok(generated)
}

/// Which of a plan's programs a pass runs: the model's, or its multi-token-prediction module's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Main,
    Mtp,
}

/// Rows below which a generated kernel runs on one thread: splitting costs more than it saves.
const ROWS_PER_TASK: usize = 16;

impl Engine {
    pub fn new(plan: LoadedPlan, options: EngineOptions) -> Result<Engine, RuntimeError> {
        let isa = match plan.manifest.target {
            Target::Cpu(isa) => isa,
            Target::Cuda(_) => {
                return Err(RuntimeError::CudaPlan {
                    plan_target: plan.manifest.target.name(),
                })
            }
            Target::Dcu(_) => {
                return Err(RuntimeError::DcuPlan {
                    plan_target: plan.manifest.target.name(),
                })
            }
        };
        let m = &plan.manifest.model;
        let max_context = options
            .max_context
            .min(m.max_position_embeddings as usize)
            .max(1);
        let max_batch_tokens = options.max_batch_tokens.max(1);
        let generated = resolve_generated(&plan, &plan.program.steps)?;
        let generated_mtp = match &plan.mtp {
            Some(mtp) => resolve_generated(&plan, &mtp.program.steps)?,
            None => vec![],
        };
        let (cos, sin) = rope_tables(&plan.manifest, max_context);
        let max_num_seqs = options.max_num_seqs.max(1);
        let kv_info = &plan.manifest.kv;
        let (layers, kv_heads, head_dim) = (
            kv_info.num_layers as usize,
            kv_info.num_kv_heads as usize,
            kv_info.head_dim as usize,
        );
        let rows = if plan.program.has_latent_kv() {
            KvRows::Latent {
                width: kv_heads * head_dim,
            }
        } else {
            KvRows::KeysAndValues { kv_heads, head_dim }
        };
        let block_size = options.block_size.max(1);
        let blocks_per_context = max_context.div_ceil(block_size);
        let kv_blocks = options
            .kv_blocks
            .unwrap_or(max_num_seqs * blocks_per_context)
            .max(1);
        let kv = KvPool::new(layers, kv_blocks, block_size, rows);
        let solo_blocks = (0..blocks_per_context.min(kv_blocks) as u32).collect();
        let arena = vec![0.0; plan.manifest.memory.arena_cols as usize * max_batch_tokens];
        Ok(Engine {
            isa,
            generated,
            arena,
            logits: vec![],
            kv,
            solo_blocks,
            solo_len: 0,
            cos,
            sin,
            options: EngineOptions {
                max_context,
                max_batch_tokens,
                max_num_seqs,
                block_size,
                kv_blocks: Some(kv_blocks),
            },
            profile: std::env::var_os("FDRT_PROFILE").map(|_| Profile::default()),
            matmul_observer: None,
            greedy_ids: vec![],
            keep_hidden: false,
            hidden: vec![],
            mtp_hidden: vec![],
            generated_mtp,
            plan,
        })
    }

    pub fn plan(&self) -> &LoadedPlan {
        &self.plan
    }

    /// Installs (or with None removes) an observer of every matmul's input; returns the
    /// previous one.
    pub fn set_matmul_observer(
        &mut self,
        observer: Option<Box<MatmulObserver>>,
    ) -> Option<Box<MatmulObserver>> {
        std::mem::replace(&mut self.matmul_observer, observer)
    }

    /// Serves the next pass from `weights` (same structure, checked by the caller) and returns
    /// the previous weights; see `weights_update`.
    pub fn replace_weights(&mut self, weights: WeightStore) -> WeightStore {
        self.plan.replace_weights(weights)
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub fn vocab_size(&self) -> usize {
        self.plan.program.logits_cols as usize
    }

    /// The KV pool: its block count and positions per block.
    pub fn kv_pool(&self) -> &KvPool {
        &self.kv
    }

    /// The KV pool, to write blocks that another instance computed.
    pub fn kv_pool_mut(&mut self) -> &mut KvPool {
        &mut self.kv
    }

    /// Tokens in the single sequence of `prefill` / `forward_last`.
    pub fn seq_len(&self) -> usize {
        self.solo_len
    }

    /// Forgets the single sequence.
    pub fn reset(&mut self) {
        self.solo_len = 0;
    }

    /// Appends `tokens` to the single sequence, chunked by the token budget, and returns the
    /// logits of every token (`all_rows`) or of the last one: `[rows, vocab]` row-major.
    /// The single sequence uses the pool's first blocks: do not mix these calls with
    /// [`Engine::forward_batch`] calls for other sequences on the same engine.
    pub fn prefill(&mut self, tokens: &[u32], all_rows: bool) -> Result<Vec<f32>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let mut out = vec![];
        let chunks: Vec<&[u32]> = tokens.chunks(self.options.max_batch_tokens).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let logits = match (all_rows, i + 1 == chunks.len()) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            out.extend_from_slice(self.forward_solo(chunk, logits)?);
        }
        Ok(out)
    }

    /// One pass over `tokens` appended to the single sequence, returning the logits of its
    /// last token.
    pub fn forward_last(&mut self, tokens: &[u32]) -> Result<&[f32], RuntimeError> {
        self.forward_solo(tokens, Logits::Last)
    }

    fn forward_solo(&mut self, tokens: &[u32], logits: Logits) -> Result<&[f32], RuntimeError> {
        let blocks = std::mem::take(&mut self.solo_blocks);
        let start = self.solo_len;
        let result = self
            .forward_batch(&[SeqChunk {
                blocks: &blocks,
                start,
                tokens,
                logits,
            }])
            .map(|l| l.len());
        self.solo_blocks = blocks;
        let rows = result?;
        self.solo_len += tokens.len();
        Ok(&self.logits[..rows])
    }

    /// One forward pass over several sequences at once: each chunk's tokens are written to its
    /// blocks at its positions. Returns the wanted logits, `[R, vocab]`, of the `Last` and `All`
    /// chunks in chunk order (rows within a chunk in order); the `Greedy` chunks' tokens are
    /// then in [`Engine::greedy_ids`]. Every matmul sees all the tokens together; attention runs
    /// per sequence.
    pub fn forward_batch(&mut self, chunks: &[SeqChunk]) -> Result<&[f32], RuntimeError> {
        self.run_pass(Which::Main, chunks, &[])
    }

    /// Makes passes of the main program keep every token's final hidden state, for
    /// [`Engine::hidden_rows`] (the multi-token-prediction module reads them). Off by default:
    /// it costs a copy per pass.
    pub fn keep_hidden(&mut self, on: bool) {
        self.keep_hidden = on && self.plan.mtp.is_some();
        if !self.keep_hidden {
            self.hidden = vec![];
        }
    }

    /// Every token's final hidden state from the last pass of the main program, `[T, C]` in
    /// the pass's token order; empty unless [`Engine::keep_hidden`] is on.
    pub fn hidden_rows(&self) -> &[f32] {
        &self.hidden
    }

    /// One pass of the plan's multi-token-prediction module over `chunks` (each token the
    /// successor of the token at its position), with `hidden` (`[T, C]`, in the pass's token
    /// order) the main model's final hidden states of those positions, or the module's own when
    /// proposals are chained. Writes the module's keys and values (its own KV slot) at the
    /// chunks' positions and returns its logits as [`Engine::forward_batch`] does; its own
    /// hidden states are then in [`Engine::mtp_hidden_rows`].
    pub fn forward_mtp(
        &mut self,
        chunks: &[SeqChunk],
        hidden: &[f32],
    ) -> Result<&[f32], RuntimeError> {
        self.run_pass(Which::Mtp, chunks, hidden)
    }

    /// The module's own final hidden states from the last [`Engine::forward_mtp`], `[T, C]`.
    pub fn mtp_hidden_rows(&self) -> &[f32] {
        &self.mtp_hidden
    }

    fn steps(&self, which: Which) -> &[Step] {
        match (which, &self.plan.mtp) {
            (Which::Main, _) => &self.plan.program.steps,
            (Which::Mtp, Some(mtp)) => &mtp.program.steps,
            (Which::Mtp, None) => &[],
        }
    }

    fn run_pass(
        &mut self,
        which: Which,
        chunks: &[SeqChunk],
        hidden_in: &[f32],
    ) -> Result<&[f32], RuntimeError> {
        // (where the module reads its hidden states, where it leaves its own)
        let mtp = match (which, &self.plan.mtp) {
            (Which::Main, _) => None,
            (Which::Mtp, Some(mtp)) => Some((mtp.hidden_in, mtp.hidden_out)),
            (Which::Mtp, None) => return Err(RuntimeError::NoMtpModule),
        };
        let vocab = self.vocab_size();
        let PassLayout {
            tokens,
            positions,
            logit_rows,
            full_rows,
            spans,
        } = PassLayout::of(
            chunks,
            &self.options,
            self.kv.num_blocks(),
            self.plan.manifest.model.vocab_size as usize,
            self.plan.manifest.model.max_position_embeddings as usize,
        )?;
        let r = logit_rows.len();
        self.logits.resize(r * vocab, 0.0);
        let hidden_size = self.plan.manifest.model.hidden_size as usize;
        if let Some((hidden_at, _)) = &mtp {
            if hidden_in.len() != tokens.len() * hidden_size {
                return Err(RuntimeError::InvalidPlan(format!(
                    "the prediction module's pass has {} tokens and {} hidden values (width {hidden_size})",
                    tokens.len(),
                    hidden_in.len()
                )));
            }
            let mem = self.memory(tokens.len(), r);
            // SAFETY: no other view of the arena is live.
            let (dst, stride) = unsafe { mem.write(hidden_at)? };
            for (row, src) in hidden_in.chunks_exact(hidden_size).enumerate() {
                dst[row * stride..][..hidden_size].copy_from_slice(src);
            }
        }
        for i in 0..self.steps(which).len() {
            // With no logits wanted (a middle prefill chunk) the head is skipped; the layers
            // still run, since they fill the KV cache.
            if r == 0 && writes_logit_rows(&self.steps(which)[i].launch) {
                continue;
            }
            let start = self.profile.as_ref().map(|_| std::time::Instant::now());
            self.run_step(which, i, &tokens, &positions, &logit_rows, &spans)?;
            if let Some(start) = start {
                let kernel = self.steps(which)[i].kernel.clone();
                if let Some(profile) = self.profile.as_mut() {
                    profile.record(&kernel, start.elapsed());
                }
            }
        }
        let kept = match (which, &self.plan.mtp) {
            (Which::Main, Some(m)) if self.keep_hidden => Some(m.main_hidden),
            (Which::Mtp, Some(m)) => Some(m.hidden_out),
            _ => None,
        };
        if let Some(view) = kept {
            let mem = self.memory(tokens.len(), r);
            // SAFETY: no other view of the arena is live.
            let (src, stride) = unsafe { mem.read(&view)? };
            let out = match which {
                Which::Main => &mut self.hidden,
                Which::Mtp => &mut self.mtp_hidden,
            };
            out.clear();
            for row in 0..tokens.len() {
                out.extend_from_slice(&src[row * stride..][..hidden_size]);
            }
        }
        self.greedy_ids.clear();
        self.greedy_ids.extend(
            self.logits[full_rows * vocab..r * vocab]
                .chunks(vocab)
                .map(crate::sampler::argmax),
        );
        Ok(&self.logits[..full_rows * vocab])
    }

    /// The arena and logits as a pass of `t` tokens and `r` logit rows sees them.
    fn memory(&mut self, t: usize, r: usize) -> Memory {
        Memory {
            arena: self.arena.as_mut_ptr(),
            arena_len: self.arena.len(),
            logits: self.logits.as_mut_ptr(),
            logits_len: self.logits.len(),
            t,
            r,
        }
    }

    /// The tokens picked for the last pass's `Greedy` chunks, in chunk order.
    pub fn greedy_ids(&self) -> &[u32] {
        &self.greedy_ids
    }

    /// The logits buffer of the last pass; its first rows are what `forward_batch` returned.
    pub(crate) fn last_logits(&self) -> &[f32] {
        &self.logits
    }

    fn run_step(
        &mut self,
        which: Which,
        index: usize,
        tokens: &[u32],
        positions: &[u32],
        logit_rows: &[u32],
        spans: &[SeqSpan],
    ) -> Result<(), RuntimeError> {
        let (t, r) = (tokens.len(), logit_rows.len());
        let isa = self.isa;
        let (step, generated) = match (which, &self.plan.mtp) {
            (Which::Mtp, Some(mtp)) => (&mtp.program.steps[index], self.generated_mtp[index]),
            _ => (&self.plan.program.steps[index], self.generated[index]),
        };
        let kernel_error = |source| RuntimeError::Kernel {
            step: index,
            kernel: step.kernel.clone(),
            source,
        };
        let mem = Memory {
            arena: self.arena.as_mut_ptr(),
            arena_len: self.arena.len(),
            logits: self.logits.as_mut_ptr(),
            logits_len: self.logits.len(),
            t,
            r,
        };
        let plan = &self.plan;
        // SAFETY (every `mem.read`/`mem.write` below): the load-time check proved that a step's
        // outputs overlap neither each other nor its inputs, for every T; `Memory` checks bounds.
        unsafe {
            match (&step.launch, generated) {
                (Launch::Embedding { table, out }, _) => {
                    let (o, os) = mem.write(out)?;
                    match plan.quant_weight(*table) {
                        Some(q) => cpu::embedding_quant(tokens, &q, o, os),
                        None => cpu::embedding(isa, &plan.weight(*table), tokens, o, os),
                    }
                    .map_err(kernel_error)?;
                }
                (
                    Launch::RmsNorm {
                        x,
                        w,
                        eps,
                        group,
                        out,
                    },
                    None,
                ) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    let rows = mem.rows(x);
                    cpu::rms_norm(
                        isa,
                        xs,
                        xst,
                        rows,
                        x.cols as usize,
                        *group as usize,
                        plan.vector(*w),
                        *eps,
                        o,
                        os,
                    )
                    .map_err(kernel_error)?;
                }
                (
                    Launch::RmsNorm {
                        x,
                        w,
                        eps,
                        group,
                        out,
                    },
                    Some(Generated::RmsNorm(f)),
                ) => {
                    let (xs, xst) = mem.read(x)?;
                    let (o, os) = mem.write(out)?;
                    let wv = plan.vector(*w);
                    if wv.len() != *group as usize {
                        return Err(RuntimeError::InvalidPlan(format!(
                            "step {index}: norm weight has {} values, group {group}",
                            wv.len()
                        )));
                    }
                    let (xp, op, wp, cols) = (
                        xs.as_ptr() as usize,
                        o.as_mut_ptr() as usize,
                        wv.as_ptr() as usize,
                        x.cols,
                    );
                    let (group, eps) = (*group, *eps);
                    row_chunks(mem.rows(x), |r0, n| {
                        f(
                            (xp as *const f32).add(r0 * xst),
                            xst as u64,
                            wp as *const f32,
                            (op as *mut f32).add(r0 * os),
                            os as u64,
                            n as u64,
                            cols,
                            group,
                            eps,
                        )
                    });
                }
                (
                    Launch::AddRmsNorm {
                        x,
                        d,
                        w,
                        eps,
                        sum_out,
                        normed_out,
                    },
                    gen,
                ) => {
                    let ((xs, xst), (ds, dst)) = (mem.read(x)?, mem.read(d)?);
                    let ((so, sst), (no, nst)) = (mem.write(sum_out)?, mem.write(normed_out)?);
                    let wv = plan.vector(*w);
                    let (rows, cols) = (mem.rows(x), x.cols as usize);
                    match gen {
                        Some(Generated::AddRmsNorm(f)) => {
                            if wv.len() != cols {
                                return Err(RuntimeError::InvalidPlan(format!(
                                    "step {index}: norm weight has {} values for {cols} columns",
                                    wv.len()
                                )));
                            }
                            let p = [
                                xs.as_ptr() as usize,
                                ds.as_ptr() as usize,
                                wv.as_ptr() as usize,
                                so.as_mut_ptr() as usize,
                                no.as_mut_ptr() as usize,
                            ];
                            let eps = *eps;
                            row_chunks(rows, |r0, n| {
                                f(
                                    (p[0] as *const f32).add(r0 * xst),
                                    xst as u64,
                                    (p[1] as *const f32).add(r0 * dst),
                                    dst as u64,
                                    p[2] as *const f32,
                                    (p[3] as *mut f32).add(r0 * sst),
                                    sst as u64,
                                    (p[4] as *mut f32).add(r0 * nst),
                                    nst as u64,
                                    n as u64,
                                    cols as u64,
                                    eps,
                                )
                            });
                        }
                        _ => cpu::add_rms_norm(
                            isa, xs, xst, ds, dst, rows, cols, wv, *eps, so, sst, no, nst,
                        )
                        .map_err(kernel_error)?,
                    }
                }
                (Launch::MatMul { x, w, bias, out }, _) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    if let Some(observe) = self.matmul_observer.as_mut() {
                        observe(*w, xs, xst, mem.rows(x), x.cols as usize);
                    }
                    let b = bias.map(|b| plan.vector(b));
                    match plan.quant_weight(*w) {
                        Some(q) => {
                            let act = plan.manifest.weights[w.0 as usize]
                                .quant
                                .map_or(ActQuant::None, |q| q.scheme.act_quant());
                            cpu::matmul_quant(isa, act, xs, xst, mem.rows(x), &q, b, o, os)
                        }
                        None => cpu::matmul(isa, xs, xst, mem.rows(x), &plan.weight(*w), b, o, os),
                    }
                    .map_err(kernel_error)?;
                }
                (Launch::Add { a, b, out }, _) => {
                    let ((as_, ast), (bs, bst), (o, os)) =
                        (mem.read(a)?, mem.read(b)?, mem.write(out)?);
                    cpu::add(isa, as_, ast, bs, bst, mem.rows(a), a.cols as usize, o, os)
                        .map_err(kernel_error)?;
                }
                (Launch::Mul { a, b, out }, _) => {
                    let ((as_, ast), (bs, bst), (o, os)) =
                        (mem.read(a)?, mem.read(b)?, mem.write(out)?);
                    cpu::mul(isa, as_, ast, bs, bst, mem.rows(a), a.cols as usize, o, os)
                        .map_err(kernel_error)?;
                }
                (Launch::Silu { x, out }, _) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    cpu::silu(isa, xs, xst, mem.rows(x), x.cols as usize, o, os)
                        .map_err(kernel_error)?;
                }
                (Launch::SiluMul { gu, out }, gen) => {
                    let ((gs, gst), (o, os)) = (mem.read(gu)?, mem.write(out)?);
                    let (rows, cols) = (mem.rows(gu), out.cols as usize);
                    match gen {
                        Some(Generated::SiluMul(f)) => {
                            let (gp, op) = (gs.as_ptr() as usize, o.as_mut_ptr() as usize);
                            row_chunks(rows, |r0, n| {
                                f(
                                    (gp as *const f32).add(r0 * gst),
                                    gst as u64,
                                    (op as *mut f32).add(r0 * os),
                                    os as u64,
                                    n as u64,
                                    cols as u64,
                                )
                            });
                        }
                        _ => {
                            cpu::silu_mul(isa, gs, gst, rows, cols, o, os).map_err(kernel_error)?
                        }
                    }
                }
                (
                    Launch::Rope {
                        x,
                        n_heads,
                        head_dim,
                        out,
                    },
                    gen,
                ) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    let (h, d) = (*n_heads as usize, *head_dim as usize);
                    match gen {
                        Some(Generated::Rope(f)) => {
                            // Generated rope reads the tables at each row's position: in range,
                            // since positions < seq_len + t <= capacity = table rows.
                            let (xp, op, pp) = (
                                xs.as_ptr() as usize,
                                o.as_mut_ptr() as usize,
                                positions.as_ptr() as usize,
                            );
                            let (cp, sp) = (self.cos.as_ptr() as usize, self.sin.as_ptr() as usize);
                            row_chunks(mem.rows(x), |r0, n| {
                                f(
                                    (xp as *const f32).add(r0 * xst),
                                    xst as u64,
                                    (op as *mut f32).add(r0 * os),
                                    os as u64,
                                    n as u64,
                                    h as u64,
                                    d as u64,
                                    (pp as *const u32).add(r0),
                                    cp as *const f32,
                                    sp as *const f32,
                                )
                            });
                        }
                        _ => cpu::rope(
                            isa,
                            xs,
                            xst,
                            mem.rows(x),
                            h,
                            d,
                            positions,
                            &self.cos,
                            &self.sin,
                            d / 2,
                            o,
                            os,
                        )
                        .map_err(kernel_error)?,
                    }
                }
                (
                    Launch::Attention {
                        q,
                        k,
                        v,
                        layer,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                        scale,
                        out,
                    },
                    _,
                ) => {
                    let ((qs, qst), (ks, kst), (vs, vst)) =
                        (mem.read(q)?, mem.read(k)?, mem.read(v)?);
                    let (o, os) = mem.write(out)?;
                    let (h, kvh, d) = (*n_heads as usize, *n_kv_heads as usize, *head_dim as usize);
                    // Each sequence attends to its own cache: one call per sequence, on its rows.
                    for span in spans {
                        let rows =
                            |all, stride, cols| sub_rows(all, span.row0, span.rows, stride, cols);
                        let mut cache =
                            self.kv.layer(*layer as usize, span.blocks).ok_or_else(|| {
                                RuntimeError::InvalidPlan(format!(
                                    "step {index}: no KV layer {layer}"
                                ))
                            })?;
                        let o_rows = &mut o[span.row0 * os..][..(span.rows - 1) * os + h * d];
                        cpu::attention(
                            isa,
                            rows(qs, qst, h * d),
                            qst,
                            rows(ks, kst, kvh * d),
                            kst,
                            rows(vs, vst, kvh * d),
                            vst,
                            span.rows,
                            &positions[span.row0..span.row0 + span.rows],
                            h,
                            kvh,
                            d,
                            *scale,
                            &mut cache,
                            o_rows,
                            os,
                        )
                        .map_err(kernel_error)?;
                    }
                }
                (
                    Launch::MlaAttention {
                        q,
                        latent,
                        k_rope,
                        kv_b,
                        layer,
                        n_heads,
                        nope_dim,
                        rope_dim,
                        v_dim,
                        kv_lora,
                        scale,
                        rope_interleaved,
                        out,
                    },
                    _,
                ) => {
                    let ((qs, qst), (ls, lst), (ks, kst)) =
                        (mem.read(q)?, mem.read(latent)?, mem.read(k_rope)?);
                    let (o, os) = mem.write(out)?;
                    let params = cpu::MlaParams {
                        n_heads: *n_heads as usize,
                        nope_dim: *nope_dim as usize,
                        rope_dim: *rope_dim as usize,
                        v_dim: *v_dim as usize,
                        kv_lora: *kv_lora as usize,
                        scale: *scale,
                        rope_interleaved: *rope_interleaved,
                    };
                    let rope = cpu::RopeTables {
                        cos: &self.cos,
                        sin: &self.sin,
                        stride: plan.manifest.model.head_dim as usize / 2,
                    };
                    let kv_b = plan.weight(*kv_b);
                    for span in spans {
                        let rows =
                            |all, stride, cols| sub_rows(all, span.row0, span.rows, stride, cols);
                        let mut cache =
                            self.kv.layer(*layer as usize, span.blocks).ok_or_else(|| {
                                RuntimeError::InvalidPlan(format!(
                                    "step {index}: no KV layer {layer}"
                                ))
                            })?;
                        let o_rows =
                            &mut o[span.row0 * os..][..(span.rows - 1) * os + out.cols as usize];
                        cpu::mla_attention(
                            rows(qs, qst, q.cols as usize),
                            qst,
                            rows(ls, lst, latent.cols as usize),
                            lst,
                            rows(ks, kst, k_rope.cols as usize),
                            kst,
                            span.rows,
                            &positions[span.row0..span.row0 + span.rows],
                            &kv_b,
                            &params,
                            &rope,
                            &mut cache,
                            o_rows,
                            os,
                        )
                        .map_err(kernel_error)?;
                    }
                }
                (Launch::GatherRows { x, out }, _) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    cpu::gather_rows(xs, xst, logit_rows, x.cols as usize, o, os)
                        .map_err(kernel_error)?;
                }
                (
                    Launch::Moe {
                        x,
                        router,
                        bias,
                        gate_up,
                        down,
                        experts,
                        top_k,
                        routing,
                        normalize,
                        scaling,
                        out,
                    },
                    None,
                ) => {
                    let ((xs, xst), (o, os)) = (mem.read(x)?, mem.write(out)?);
                    let params = cpu::MoeParams {
                        experts: *experts as usize,
                        top_k: *top_k as usize,
                        routing: *routing,
                        normalize: *normalize,
                        scaling: *scaling,
                    };
                    cpu::moe(
                        isa,
                        xs,
                        xst,
                        mem.rows(x),
                        &plan.weight(*router),
                        bias.map(|b| plan.vector(b)),
                        &plan.experts(*gate_up),
                        &plan.experts(*down),
                        &params,
                        o,
                        os,
                    )
                    .map_err(kernel_error)?;
                }
                (Launch::AttentionRope { .. }, None) => {
                    // Only CUDA plans fuse RoPE into attention, and this engine refuses them.
                    return Err(RuntimeError::InvalidPlan(format!(
                        "step {index}: attention with fused RoPE runs on the CUDA engine only"
                    )));
                }
                (launch, Some(_)) => {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "step {index}: generated code attached to {launch:?}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Rows `row0..row0 + rows` of a `[T, cols]` view with row stride `stride`.
fn sub_rows(all: &[f32], row0: usize, rows: usize, stride: usize, cols: usize) -> &[f32] {
    &all[row0 * stride..][..(rows - 1) * stride + cols]
}

pub(crate) fn writes_logit_rows(launch: &Launch) -> bool {
    launch
        .operands()
        .1
        .iter()
        .any(|a| a.rows == Rows::LogitRows)
}

/// RoPE's cos and sin tables, `[max_context, head_dim / 2]`, from the plan's inverse
/// frequencies (angles in f64).
pub(crate) fn rope_tables(manifest: &Manifest, max_context: usize) -> (Vec<f32>, Vec<f32>) {
    let half = manifest.model.head_dim as usize / 2;
    let mut cos = vec![0.0f32; max_context * half];
    let mut sin = vec![0.0f32; max_context * half];
    for p in 0..max_context {
        for (i, &f) in manifest.rope_inv_freq.iter().enumerate().take(half) {
            let angle = p as f64 * f;
            cos[p * half + i] = angle.cos() as f32;
            sin[p * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Calls `f(first_row, rows)` over `rows` split into parallel chunks.
fn row_chunks(rows: usize, f: impl Fn(usize, usize) + Sync) {
    if rows < 2 * ROWS_PER_TASK {
        f(0, rows);
        return;
    }
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    kernels::cpu::pool::for_each(tasks, |i| {
        let r0 = i * ROWS_PER_TASK;
        f(r0, ROWS_PER_TASK.min(rows - r0));
    });
}

/// The step's view of the arena and the logits, resolving `Act`s into slices for this `T`/`R`.
struct Memory {
    arena: *mut f32,
    arena_len: usize,
    logits: *mut f32,
    logits_len: usize,
    t: usize,
    r: usize,
}

impl Memory {
    fn rows(&self, a: &Act) -> usize {
        match a.rows {
            Rows::Tokens => self.t,
            Rows::LogitRows => self.r,
        }
    }

    /// (pointer to the first element, elements spanned, stride), bounds-checked.
    fn span(&self, a: &Act) -> Result<(*mut f32, usize, usize), RuntimeError> {
        let rows = self.rows(a);
        let (base, start, len) = match a.buffer {
            Buffer::Arena { offset_cols } => {
                (self.arena, offset_cols as usize * self.t, self.arena_len)
            }
            Buffer::Logits => (self.logits, 0, self.logits_len),
        };
        let start = start + a.col as usize;
        let span = if rows == 0 {
            0
        } else {
            (rows - 1) * a.stride as usize + a.cols as usize
        };
        if start + span > len {
            return Err(RuntimeError::InvalidPlan(format!(
                "activation view {a:?} runs past its buffer"
            )));
        }
        // SAFETY: start + span <= len, inside the allocation.
        Ok((unsafe { base.add(start) }, span, a.stride as usize))
    }

    /// # Safety: no live `write` view may overlap this one.
    unsafe fn read<'a>(&self, a: &Act) -> Result<(&'a [f32], usize), RuntimeError> {
        let (p, len, stride) = self.span(a)?;
        Ok((std::slice::from_raw_parts(p, len), stride))
    }

    /// # Safety: no other live view may overlap this one.
    unsafe fn write<'a>(&self, a: &Act) -> Result<(&'a mut [f32], usize), RuntimeError> {
        let (p, len, stride) = self.span(a)?;
        Ok((std::slice::from_raw_parts_mut(p, len), stride))
    }
}
