//! The CUDA device: opening it for a CUDA plan, refusing a plan compiled for another GPU, and
//! loading the plan's module (the cubin fdc compiled) through the driver API. The driver is
//! loaded at run time, so fdrt runs on machines without one until a CUDA plan is opened.
//!
//! Executing a CUDA plan's program (the device-side engine) is not here yet; [`GpuModule`] is
//! what it will launch from, and what the GPU tests launch kernels from today.

use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use artifacts::code_abi;
use artifacts::schema::{Act, Buffer, Launch, Rows};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use ir_types::{CudaArch, Target};
use kernels::registry::{self, KernelSource};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether a CUDA driver and at least one device are present.
pub fn device_present() -> bool {
    // SAFETY: only tries to open the driver library by its known names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// The architecture of device `ordinal`, with its name: `None` for a GPU no target is built for.
pub fn device_arch(ordinal: usize) -> Result<(String, Option<CudaArch>), RuntimeError> {
    let ctx = open_context(ordinal)?;
    describe(&ctx)
}

fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, RuntimeError> {
    if !device_present() {
        return Err(RuntimeError::Cuda(
            "no CUDA device (or no driver) on this machine".into(),
        ));
    }
    CudaContext::new(ordinal)
        .map_err(|e| RuntimeError::Cuda(format!("opening device {ordinal}: {e}")))
}

fn describe(ctx: &CudaContext) -> Result<(String, Option<CudaArch>), RuntimeError> {
    let name = ctx.name().map_err(cuda("reading the device name"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(cuda("reading the compute capability"))?;
    Ok((
        format!("{name} (sm_{major}{minor})"),
        CudaArch::of_device(major as u32, minor as u32),
    ))
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> RuntimeError {
    move |e| RuntimeError::Cuda(format!("{what}: {e}"))
}

/// A CUDA plan's module loaded on a device, with every function its steps launch.
pub struct GpuModule {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
    /// By step: the functions its kernel launches.
    step_functions: Vec<Vec<CudaFunction>>,
}

impl GpuModule {
    /// Opens device `ordinal` for `plan`: refuses a CPU plan and a plan for another GPU (naming
    /// both), loads the cubin and resolves every function the plan's kernels launch.
    pub fn open(plan: &LoadedPlan, ordinal: usize) -> Result<GpuModule, RuntimeError> {
        let Target::Cuda(arch) = plan.manifest.target else {
            return Err(RuntimeError::Cuda(format!(
                "plan is for {}, not a GPU",
                plan.manifest.target
            )));
        };
        let ctx = open_context(ordinal)?;
        let (device, device_arch) = describe(&ctx)?;
        if device_arch != Some(arch) {
            return Err(RuntimeError::WrongGpu {
                plan_target: plan.manifest.target.name(),
                device_target: device_arch
                    .map(|a| Target::Cuda(a).name())
                    .unwrap_or_else(|| "(none: this GPU has no CUDA target)".into()),
                device,
            });
        }
        // One stream per module: the engine orders its work itself, and cudarc's per-use event
        // records (one driver call per pointer taken, several per launch) only cost time.
        // SAFETY: every allocation of this context is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let cubin = plan.code_symbol(code_abi::CUDA_CUBIN).ok_or_else(|| {
            RuntimeError::InvalidPlan(format!("CUDA plan without a {}", code_abi::CUDA_CUBIN))
        })?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
            .map_err(cuda("loading the plan's module"))?;
        let mut functions: HashMap<&'static str, CudaFunction> = HashMap::new();
        let mut step_functions = Vec::with_capacity(plan.program.steps.len());
        for step in &plan.program.steps {
            let entry = registry::by_name(&step.kernel)
                .filter(|e| e.source == KernelSource::Cuda)
                .ok_or_else(|| {
                    RuntimeError::InvalidPlan(format!("{} is not a CUDA kernel", step.kernel))
                })?;
            let mut launched = vec![];
            for &name in kernels::cuda::functions(entry) {
                let f = match functions.get(name) {
                    Some(f) => f.clone(),
                    None => {
                        let f = module.load_function(name).map_err(|e| {
                            RuntimeError::Cuda(format!("module has no {name}: {e}"))
                        })?;
                        functions.insert(name, f.clone());
                        f
                    }
                };
                launched.push(f);
            }
            step_functions.push(launched);
        }
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
        Ok(GpuModule {
            stream,
            ctx,
            module,
            functions,
            step_functions,
        })
    }

    /// A function of the module that one of the plan's kernels launches.
    pub fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.functions.get(name)
    }

    /// The functions step `index` of the plan launches, in launch order (resolved at open, so
    /// a launch looks nothing up).
    pub fn step_functions(&self, index: usize) -> &[CudaFunction] {
        self.step_functions.get(index).map_or(&[], Vec::as_slice)
    }
}

/// A CUDA plan's program executed on the device, for one sequence: the device twin of
/// [`crate::Engine`]'s single-sequence path (`prefill`, `forward_last`). Weights, the activation
/// arena, the logits and the paged KV cache live on the device; each step is one or two kernel
/// launches on one stream, with the same views (`Act`) the CPU engine resolves.
///
/// Plain (f32, bf16, f16) and quantized (8, 4, 2-bit codes) weights; the RoPE of attention
/// fused into its kernels when the plan says so (`Launch::AttentionRope`). One-token decode
/// steps are captured once into a CUDA graph and replayed. Still to come: several sequences per
/// pass (the scheduler's batches) and cuBLAS for large batches.
pub struct GpuEngine {
    gpu: GpuModule,
    plan: LoadedPlan,
    weights: Vec<CudaSlice<u8>>,
    arena: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    k_cache: Vec<CudaSlice<f32>>,
    v_cache: Vec<CudaSlice<f32>>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    blocks: CudaSlice<u32>,
    /// Attention's partial results per chunk of positions: `[T, H, chunks, head_dim + 2]`.
    partial: CudaSlice<f32>,
    /// `H * head_dim` of the model: the widest attention the partials have room for.
    partial_per_token: usize,
    /// How many chunks of positions attention splits a query into, by pass size.
    attention_split: AttentionSplit,
    /// A pass's token ids, positions and logit rows, `3 * max_batch_tokens` values.
    inputs: CudaSlice<u32>,
    block_size: usize,
    max_context: usize,
    max_batch_tokens: usize,
    seq_len: usize,
    /// The captured decode step (one token), replayed for every later one.
    decode_graph: Option<cudarc::driver::CudaGraph>,
    /// With `FDRT_PROFILE` set: time per kernel (each step synchronized), printed on drop.
    profile: Option<HashMap<String, (std::time::Duration, usize)>>,
}

impl Drop for GpuEngine {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let mut rows: Vec<_> = profile.iter().collect();
            rows.sort_by_key(|row| std::cmp::Reverse(row.1 .0));
            eprintln!("kernel profile (FDRT_PROFILE, each step synchronized):");
            for (kernel, (time, calls)) in rows {
                eprintln!(
                    "  {kernel:<36} {:>10.2} ms {calls:>9} calls",
                    time.as_secs_f64() * 1e3
                );
            }
        }
    }
}

/// The fewest positions a chunk of attention takes: the keys one block of
/// `attention_partial_f32` holds in flight at once (4 warps of 4 lane groups).
const ATTENTION_MIN_CHUNK: usize = 16;

/// How attention splits each query's positions into chunks (one block each, merged after): enough
/// chunks that a pass fills the GPU (`target_blocks`), since a decode step has one query per head,
/// and no more than a full context of minimal chunks. The chunk length is chosen on the device from
/// the query's position, so a captured decode step stays balanced as the context grows.
#[derive(Clone, Copy, Debug)]
struct AttentionSplit {
    heads: usize,
    target_blocks: usize,
    max_chunks: usize,
}

impl AttentionSplit {
    /// Chunks per query for a pass of `t` tokens.
    fn chunks(&self, t: usize) -> usize {
        self.target_blocks
            .div_ceil(self.heads.max(1) * t.max(1))
            .clamp(1, self.max_chunks.max(1))
    }

    /// The most partials (tokens x chunks) of any pass up to `max_t` tokens.
    fn max_partials(&self, max_t: usize) -> usize {
        (1..=max_t.max(1))
            .map(|t| t * self.chunks(t))
            .max()
            .unwrap_or(1)
    }
}

/// Weight bytes uploaded between two releases of the plan's resident pages.
const UPLOAD_WINDOW: usize = 1 << 30;

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

impl GpuEngine {
    /// Uploads `plan` to device `ordinal` with room for `max_context` positions and passes of
    /// up to `max_batch_tokens` tokens.
    pub fn new(
        plan: LoadedPlan,
        ordinal: usize,
        max_context: usize,
        max_batch_tokens: usize,
    ) -> Result<GpuEngine, RuntimeError> {
        if plan.program.has_latent_kv() {
            return Err(RuntimeError::Cuda(
                "multi-head latent attention has no CUDA kernel yet".into(),
            ));
        }
        let gpu = GpuModule::open(&plan, ordinal)?;
        let s = gpu.stream.clone();
        let m = &plan.manifest;
        let max_context = max_context
            .min(m.model.max_position_embeddings as usize)
            .max(1);
        let max_batch_tokens = max_batch_tokens.max(1);
        let upload = |what: &str, e| RuntimeError::Cuda(format!("uploading {what}: {e}"));
        // Host memory stays bounded while uploading: after about UPLOAD_WINDOW bytes the copies
        // are waited for and the plan's pages dropped from this process (they stay in the page
        // cache), so the mapped plan never counts whole against it.
        let mut weights = Vec::with_capacity(m.weights.len());
        let mut since_release = 0usize;
        for i in 0..m.weights.len() {
            let bytes = plan.weight_bytes(artifacts::schema::WeightRef(i as u32));
            // A zero-length allocation is refused by the driver; empty weights get a byte.
            let slice = s
                .clone_htod(if bytes.is_empty() { &[0u8][..] } else { bytes })
                .map_err(|e| upload(&m.weights[i].name, e))?;
            weights.push(slice);
            since_release += bytes.len();
            if since_release >= UPLOAD_WINDOW || i + 1 == m.weights.len() {
                s.synchronize().map_err(|e| upload("weights", e))?;
                plan.release_resident()?;
                since_release = 0;
            }
        }
        let alloc = |n: usize| {
            s.alloc_zeros::<f32>(n.max(1))
                .map_err(|e| upload("buffers", e))
        };
        let arena = alloc(m.memory.arena_cols as usize * max_batch_tokens)?;
        let logits = alloc(plan.program.logits_cols as usize * max_batch_tokens)?;
        let block_size = 16;
        let blocks_per_context = max_context.div_ceil(block_size);
        let kv = &m.kv;
        let layer_len =
            blocks_per_context * block_size * kv.num_kv_heads as usize * kv.head_dim as usize;
        let mut k_cache = vec![];
        let mut v_cache = vec![];
        for _ in 0..kv.num_layers {
            k_cache.push(alloc(layer_len)?);
            v_cache.push(alloc(layer_len)?);
        }
        let (cos, sin) = crate::engine::rope_tables(m, max_context);
        let table = |t: &[f32]| s.clone_htod(if t.is_empty() { &[0f32][..] } else { t });
        let (cos, sin) = (
            table(&cos).map_err(|e| upload("rope tables", e))?,
            table(&sin).map_err(|e| upload("rope tables", e))?,
        );
        let table: Vec<u32> = (0..blocks_per_context as u32).collect();
        let blocks = s
            .clone_htod(&table)
            .map_err(|e| upload("the block table", e))?;
        let inputs = s
            .alloc_zeros::<u32>(3 * max_batch_tokens)
            .map_err(|e| upload("input buffers", e))?;
        let sm_count = gpu
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda("reading the SM count"))?;
        let attention_split = AttentionSplit {
            heads: m.model.num_heads as usize,
            target_blocks: 4 * sm_count.max(1) as usize,
            max_chunks: max_context.div_ceil(ATTENTION_MIN_CHUNK),
        };
        let partial_per_token = m.model.num_heads as usize * m.model.head_dim as usize;
        let partial = alloc(
            attention_split.max_partials(max_batch_tokens)
                * m.model.num_heads as usize
                * (m.model.head_dim as usize + 2),
        )?;
        Ok(GpuEngine {
            partial,
            partial_per_token,
            attention_split,
            profile: std::env::var_os("FDRT_PROFILE").map(|_| HashMap::new()),
            decode_graph: None,
            inputs,
            gpu,
            plan,
            weights,
            arena,
            logits,
            k_cache,
            v_cache,
            cos,
            sin,
            blocks,
            block_size,
            max_context,
            max_batch_tokens,
            seq_len: 0,
        })
    }

    pub fn plan(&self) -> &LoadedPlan {
        &self.plan
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.seq_len = 0;
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }

    /// Runs `tokens` after the sequence so far; returns the logits of every new token (`all`) or
    /// of the last only, `[rows, vocab]`.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>, RuntimeError> {
        let t = tokens.len();
        if t == 0 {
            return Err(RuntimeError::EmptyInput);
        }
        if t > self.max_batch_tokens {
            return Err(RuntimeError::InvalidPlan(format!(
                "{t} tokens in one pass exceed the token budget {}",
                self.max_batch_tokens
            )));
        }
        let needed = self.seq_len + t;
        if needed > self.max_context {
            return Err(RuntimeError::ContextFull {
                needed,
                capacity: self.max_context,
                model_max: self.plan.manifest.model.max_position_embeddings as usize,
            });
        }
        let vocab = self.plan.manifest.model.vocab_size as usize;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::BadTokenId { id, vocab });
        }
        let positions: Vec<u32> = (self.seq_len as u32..needed as u32).collect();
        let logit_rows: Vec<u32> = if all {
            (0..t as u32).collect()
        } else {
            vec![t as u32 - 1]
        };
        let s = self.gpu.stream.clone();
        let up = |e| RuntimeError::Cuda(format!("uploading the pass's inputs: {e}"));
        // One upload into the pass's input buffer: [ids | positions | logit rows].
        let mut host = Vec::with_capacity(3 * t);
        host.extend_from_slice(tokens);
        host.extend_from_slice(&positions);
        host.extend_from_slice(&logit_rows);
        s.memcpy_htod(&host, &mut self.inputs.slice_mut(..host.len()))
            .map_err(up)?;
        let base = ptr(&self.inputs, &s);
        let inputs = PassInputs {
            t,
            r: logit_rows.len(),
            ids: base,
            positions: base + 4 * t as u64,
            logit_rows: base + 8 * t as u64,
        };
        // A decode step (one token, its logits) is the same launches every time, reading the
        // position from the input buffer: captured once into a CUDA graph, then replayed, so
        // the ~300 launches cost one. Not while profiling, which times each step.
        if t == 1 && !all && self.profile.is_none() {
            if self.decode_graph.is_none() {
                let graph_error =
                    |e| RuntimeError::Cuda(format!("capturing the decode graph: {e}"));
                s.begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .map_err(graph_error)?;
                let captured = (0..self.plan.program.steps.len())
                    .try_for_each(|index| self.run_step(index, &inputs));
                // End the capture whatever happened, so the stream is usable again.
                let graph = s
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(graph_error)?;
                captured?;
                self.decode_graph = graph;
            }
            match &self.decode_graph {
                Some(graph) => graph
                    .launch()
                    .map_err(|e| RuntimeError::Cuda(format!("replaying the decode graph: {e}")))?,
                None => {
                    return Err(RuntimeError::Cuda(
                        "the decode graph captured nothing".into(),
                    ))
                }
            }
        } else {
            self.run_steps(&inputs)?;
        }
        let cols = self.plan.program.logits_cols as usize;
        let out = s
            .clone_dtoh(&self.logits.slice(..inputs.r * cols))
            .map_err(|e| RuntimeError::Cuda(format!("reading the logits: {e}")))?;
        self.seq_len = needed;
        Ok(out)
    }

    /// Launches every step, one by one (timing each with `FDRT_PROFILE`).
    fn run_steps(&mut self, inputs: &PassInputs) -> Result<(), RuntimeError> {
        let s = self.gpu.stream.clone();
        for index in 0..self.plan.program.steps.len() {
            let start = self.profile.as_ref().map(|_| std::time::Instant::now());
            self.run_step(index, inputs)?;
            if let (Some(profile), Some(start)) = (self.profile.as_mut(), start) {
                s.synchronize()
                    .map_err(|e| RuntimeError::Cuda(format!("profiling: {e}")))?;
                let kernel = &self.plan.program.steps[index].kernel;
                let entry = profile.entry(kernel.clone()).or_default();
                entry.0 += start.elapsed();
                entry.1 += 1;
            }
        }
        Ok(())
    }

    fn run_step(&self, index: usize, p: &PassInputs) -> Result<(), RuntimeError> {
        use Arg::{F, I, P};
        let step = &self.plan.program.steps[index];
        let s = &self.gpu.stream;
        let act = |a: &Act| self.act(a, p);
        let weight = |w: &artifacts::schema::WeightRef| ptr(&self.weights[w.0 as usize], s);
        let rows = |a: &Act| match a.rows {
            Rows::Tokens => p.t as u32,
            Rows::LogitRows => p.r as u32,
        };
        let grid = |x: u32, y: u32, threads: u32| LaunchConfig {
            grid_dim: (x.max(1), y.max(1), 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols_grid =
            |cols: u64, r: u32| grid((cols as u32).div_ceil(ROW_THREADS), r, ROW_THREADS);
        let functions = self.gpu.step_functions(index);
        let go = |i: usize, config: LaunchConfig, args: &[Arg]| -> Result<(), RuntimeError> {
            let f = functions.get(i).ok_or_else(|| {
                RuntimeError::InvalidPlan(format!("{} has no function", step.kernel))
            })?;
            let mut b = s.launch_builder(f);
            for a in args {
                match a {
                    P(v) => b.arg(v),
                    I(v) => b.arg(v),
                    F(v) => b.arg(v),
                };
            }
            // SAFETY: the arguments match the kernel's signature in `kernels/cuda/` (checked by
            // the GPU tests), and every pointer is a device allocation of this engine sized by
            // the plan's memory plan, bounds-checked by `act`.
            unsafe { b.launch(config) }
                .map(drop)
                .map_err(|e| RuntimeError::Cuda(format!("step {index} ({}): {e}", step.kernel)))
        };
        let int = |v: u64| I(v as i32);
        match &step.launch {
            Launch::Embedding { table, out } => {
                let (o, os) = act(out)?;
                if let Some(q) = self.quant(table) {
                    let args = [
                        P(weight(table)),
                        int(out.cols),
                        I(q.group),
                        P(q.scales),
                        P(q.mins),
                        P(p.ids),
                        P(o),
                        I(os),
                    ];
                    return go(0, cols_grid(out.cols, p.t as u32), &args);
                }
                let args = [P(weight(table)), P(p.ids), int(out.cols), P(o), I(os)];
                go(0, grid(p.t as u32, 1, ROW_THREADS), &args)
            }
            Launch::RmsNorm {
                x,
                w,
                eps,
                group,
                out,
            } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let groups = (x.cols / (*group).max(1)) as u32;
                let args = [
                    P(xp),
                    I(xs),
                    int(*group),
                    P(weight(w)),
                    F(*eps),
                    P(o),
                    I(os),
                ];
                go(0, grid(groups, rows(x), ROW_THREADS), &args)
            }
            Launch::AddRmsNorm {
                x,
                d,
                w,
                eps,
                sum_out,
                normed_out,
            } => {
                let ((xp, xs), (dp, ds)) = (act(x)?, act(d)?);
                let ((sp, ss), (np, ns)) = (act(sum_out)?, act(normed_out)?);
                let args = [
                    P(xp),
                    I(xs),
                    P(dp),
                    I(ds),
                    int(x.cols),
                    P(weight(w)),
                    F(*eps),
                    P(sp),
                    I(ss),
                    P(np),
                    I(ns),
                ];
                go(0, grid(rows(x), 1, ROW_THREADS), &args)
            }
            Launch::MatMul { x, w, bias, out } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let bias = bias.as_ref().map_or(0u64, weight);
                let (n, t) = (out.cols as u32, rows(x));
                if let Some(q) = self.quant(w) {
                    let args = [
                        P(xp),
                        I(xs),
                        P(weight(w)),
                        int(x.cols),
                        int(out.cols),
                        I(q.group),
                        P(q.scales),
                        P(q.mins),
                        P(bias),
                        I(t as i32),
                        P(o),
                        I(os),
                    ];
                    let config = grid(
                        n.div_ceil(QUANT_MATMUL_ROWS),
                        t.div_ceil(4),
                        QUANT_MATMUL_THREADS,
                    );
                    return go(0, config, &args);
                }
                let args = [
                    P(xp),
                    I(xs),
                    P(weight(w)),
                    int(x.cols),
                    int(out.cols),
                    P(bias),
                    I(t as i32),
                    P(o),
                    I(os),
                ];
                go(0, grid(n.div_ceil(8), t.div_ceil(4), 256), &args)
            }
            Launch::Add { a, b, out } | Launch::Mul { a, b, out } => {
                let ((ap, as_), (bp, bs), (o, os)) = (act(a)?, act(b)?, act(out)?);
                let args = [P(ap), I(as_), P(bp), I(bs), int(a.cols), P(o), I(os)];
                go(0, cols_grid(a.cols, rows(a)), &args)
            }
            Launch::Silu { x, out } | Launch::SiluMul { gu: x, out } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let args = [P(xp), I(xs), int(out.cols), P(o), I(os)];
                go(0, cols_grid(out.cols, rows(x)), &args)
            }
            Launch::Rope {
                x,
                n_heads,
                head_dim,
                out,
            } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let args = [
                    P(xp),
                    I(xs),
                    int(*head_dim),
                    P(p.positions),
                    P(ptr(&self.cos, s)),
                    P(ptr(&self.sin, s)),
                    int(*head_dim / 2),
                    P(o),
                    I(os),
                ];
                go(0, grid(*n_heads as u32, rows(x), 64), &args)
            }
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
            }
            | Launch::AttentionRope {
                q,
                k,
                v,
                layer,
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
                out,
            } => {
                // RoPE fused: the kernels rotate k and q with the engine's tables; null tables
                // leave them as they are.
                let (cos, sin) = match step.launch {
                    Launch::AttentionRope { .. } => (ptr(&self.cos, s), ptr(&self.sin, s)),
                    _ => (0, 0),
                };
                let table_stride = int(*head_dim / 2);
                let ((qp, qs), (kp, ks), (vp, vs)) = (act(q)?, act(k)?, act(v)?);
                let (o, os) = act(out)?;
                let layer = *layer as usize;
                let (kc, vc) = match (self.k_cache.get(layer), self.v_cache.get(layer)) {
                    (Some(kc), Some(vc)) => (ptr(kc, s), ptr(vc, s)),
                    _ => {
                        return Err(RuntimeError::InvalidPlan(format!(
                            "step {index}: no KV layer {layer}"
                        )))
                    }
                };
                let blocks = P(ptr(&self.blocks, s));
                let block_size = I(self.block_size as i32);
                let t = p.t as u32;
                let append = [
                    P(kp),
                    I(ks),
                    P(vp),
                    I(vs),
                    P(p.positions),
                    blocks,
                    block_size,
                    int(*n_kv_heads),
                    P(cos),
                    P(sin),
                    table_stride,
                    P(kc),
                    P(vc),
                ];
                go(0, grid(*n_kv_heads as u32, t, *head_dim as u32), &append)?;
                if *n_heads as usize * *head_dim as usize > self.partial_per_token {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "step {index}: attention wider than the model's heads"
                    )));
                }
                let partial = P(ptr(&self.partial, s));
                let chunks = self.attention_split.chunks(p.t);
                let attend = [
                    P(qp),
                    I(qs),
                    P(p.positions),
                    blocks,
                    block_size,
                    int(*n_heads),
                    int(*n_kv_heads),
                    F(*scale),
                    P(kc),
                    P(vc),
                    P(cos),
                    P(sin),
                    table_stride,
                    I(ATTENTION_MIN_CHUNK as i32),
                    partial,
                ];
                let config = LaunchConfig {
                    grid_dim: (*n_heads as u32, t, chunks as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                go(1, config, &attend)?;
                let merge = [partial, int(*n_heads), I(chunks as i32), P(o), I(os)];
                go(2, grid(*n_heads as u32, t, 128), &merge)
            }
            Launch::GatherRows { x, out } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let args = [P(xp), I(xs), P(p.logit_rows), int(x.cols), P(o), I(os)];
                go(0, grid(p.r as u32, 1, ROW_THREADS), &args)
            }
            other => Err(RuntimeError::Cuda(format!(
                "step {index}: {} has no CUDA kernel yet",
                crate::plan::launch_kind(other)
            ))),
        }
    }

    /// Where a quantized weight's scales and minimums are on the device (None for a plain
    /// weight). The plan's check at load verified the offsets against the format.
    fn quant(&self, w: &artifacts::schema::WeightRef) -> Option<QuantArgs> {
        let q = self.plan.manifest.weights.get(w.0 as usize)?.quant?;
        let base = ptr(&self.weights[w.0 as usize], &self.gpu.stream);
        Some(QuantArgs {
            group: q.group as i32,
            scales: base + q.scales_offset,
            mins: if q.asymmetric {
                base + q.mins_offset
            } else {
                0
            },
        })
    }

    /// The device address of a view's first element and its row stride, bounds-checked as the
    /// CPU engine's views are.
    fn act(&self, a: &Act, p: &PassInputs) -> Result<(u64, i32), RuntimeError> {
        let rows = match a.rows {
            Rows::Tokens => p.t,
            Rows::LogitRows => p.r,
        };
        let (buffer, start) = match a.buffer {
            Buffer::Arena { offset_cols } => (&self.arena, offset_cols as usize * p.t),
            Buffer::Logits => (&self.logits, 0),
        };
        let start = start + a.col as usize;
        let span = if rows == 0 {
            0
        } else {
            (rows - 1) * a.stride as usize + a.cols as usize
        };
        if start + span > buffer.len() {
            return Err(RuntimeError::InvalidPlan(format!(
                "activation view {a:?} runs past its buffer"
            )));
        }
        let base = ptr(buffer, &self.gpu.stream);
        Ok((base + 4 * start as u64, a.stride as i32))
    }
}

/// The extra arguments of a quantized weight's kernels.
struct QuantArgs {
    group: i32,
    scales: u64,
    /// 0 (a null pointer) for symmetric codes.
    mins: u64,
}

/// Rows per block of the quantized matmul (`QPANEL` in `kernels/cuda/quant.cu`).
pub const QUANT_MATMUL_ROWS: u32 = 8;
/// Threads per block of the quantized matmul: `QMATMUL_WARPS` warps, which the kernel's K split
/// and reduction assume.
pub const QUANT_MATMUL_THREADS: u32 = 128;

/// A kernel argument: a device address, an int or a float.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    F(f32),
}

/// A pass's inputs on the device.
struct PassInputs {
    t: usize,
    r: usize,
    ids: u64,
    positions: u64,
    logit_rows: u64,
}

/// The device address of an allocation (the engine uses one stream, so no event is needed).
fn ptr<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _record) = slice.device_ptr(stream);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantized_matmul_launch_matches_the_kernels_block_shape() {
        // The kernel sizes its shared reduction and its K split by these; a launch with more
        // threads would index past them.
        let source = kernels::cuda::module_source(&kernels::cuda::ModuleSpec { head_dim: 64 });
        let warps = format!("#define QMATMUL_WARPS {}\n", QUANT_MATMUL_THREADS / 32);
        let rows = format!("#define QPANEL {}\n", QUANT_MATMUL_ROWS);
        assert!(
            source.contains(&warps),
            "the module does not define {warps}"
        );
        assert!(source.contains(&rows), "the module does not define {rows}");
        assert_eq!(
            QUANT_MATMUL_ROWS as usize,
            kernels::cpu::PackedLayout::CUDA_QUANT.panel()
        );
    }

    #[test]
    fn attention_splits_a_decode_step_to_fill_the_gpu_and_a_prefill_not_at_all() {
        // Llama-3-8B's 32 heads on an H100's 132 SMs, a 1024-position context.
        let split = AttentionSplit {
            heads: 32,
            target_blocks: 4 * 132,
            max_chunks: 1024 / ATTENTION_MIN_CHUNK,
        };
        assert_eq!(split.chunks(1), 17);
        assert_eq!(split.chunks(4), 5);
        assert_eq!(split.chunks(128), 1);
        // Never more chunks than a context has minimal chunks.
        let short = AttentionSplit {
            max_chunks: 2,
            ..split
        };
        assert_eq!(short.chunks(1), 2);
        // The partial buffer covers every pass size.
        let most = split.max_partials(256);
        assert!((1..=256).all(|t| t * split.chunks(t) <= most));
        assert_eq!(most, 256);
    }
}
