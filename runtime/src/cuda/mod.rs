//! The CUDA device: opening it for a CUDA plan, refusing a plan compiled for another GPU, and
//! loading the plan's module (the cubin fdc compiled) through the driver API. The driver is
//! loaded at run time, so fdrt runs on machines without one until a CUDA plan is opened.
//!
//! [`GpuEngine`] runs a CUDA plan's program on the device, for one sequence or a batch of them;
//! [`GpuModule`] is what it launches from, and what the GPU tests launch kernels from.

mod folds;
mod gemm;
pub mod ipc;

pub use gemm::{Gemm, GemmArgs};

use crate::batch_engine::PassOutput;
use crate::engine::{writes_logit_rows, EngineOptions, Logits, PassLayout, SeqChunk};
use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use crate::weights::WeightStore;
use artifacts::code_abi;
use artifacts::schema::{Act, Buffer, Launch, Rows};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use ir_types::{ActQuant, CodeFormat, CudaArch, QuantScheme, Target};
use kernels::cuda::{QUANT_TILE_ROWS, QUANT_TILE_THREADS, QUANT_TILE_THREADS_ONE};
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
            for &name in step_function_names(plan, step, entry) {
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

/// A CUDA plan's program executed on the device: the device twin of [`crate::Engine`]. One
/// forward pass runs any number of sequences (`forward_batch`, what the scheduler steps), each
/// token attending through its own sequence's block table in a paged KV cache on the device;
/// `forward` is the single sequence of `fdrt generate` and `fdrt bench`. Weights, the
/// activation arena, the logits and the KV cache live on the device; each step is one to three
/// kernel launches on one stream, with the same views (`Act`) the CPU engine resolves.
///
/// Plain (f32, bf16, f16) and quantized (8, 4, 2-bit and e4m3 codes; A16, A8 and FP8
/// activations) weights; the RoPE of attention fused into its kernels when the plan says so
/// (`Launch::AttentionRope`). A pass of one token
/// per sequence (a decode step of `n` sequences) is captured into a CUDA graph the first time
/// its size is seen and replayed after. Passes of many tokens run their plain matmuls as
/// tensor-core GEMMs through cuBLAS (`gemm`).
pub struct GpuEngine {
    gpu: GpuModule,
    plan: LoadedPlan,
    options: EngineOptions,
    weights: Vec<CudaSlice<u8>>,
    arena: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// The last pass's logits, copied back: into page-locked memory (a direct DMA, about
    /// twice the speed of pageable memory) when they fit its `max_num_seqs` rows, the most a
    /// decode pass asks for, else into ordinary memory.
    pinned_logits: cudarc::driver::PinnedHostSlice<f32>,
    host_logits: Vec<f32>,
    /// `argmax_rows_f32` (None for a plan whose module predates it: the rows are then copied
    /// back and picked on the host) and where it writes: one id per logits row.
    argmax: Option<CudaFunction>,
    row_ids: CudaSlice<u32>,
    /// The last pass's picks for its `Greedy` chunks.
    greedy_ids: Vec<u32>,
    /// Per layer, `[blocks, block_size, KV, head_dim]` keys and values.
    k_cache: Vec<CudaSlice<f32>>,
    v_cache: Vec<CudaSlice<f32>>,
    /// `kv_block_copy` and the pools it reads and writes (each layer's keys then values, keys
    /// only for a latent cache), for moving a block to or from another instance's device memory
    /// in one launch; None for a plan whose module predates it (a copy per pool then).
    kv_copy: Option<(CudaFunction, CudaSlice<u64>)>,
    kv_blocks: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// The block tables of a pass's sequences, one after another; each token finds its own
    /// through its table offset.
    tables: CudaSlice<u32>,
    /// Attention's partial results per chunk of positions: `[T, H, chunks, head_dim + 2]`.
    partial: CudaSlice<f32>,
    /// `H * head_dim` of the model: the widest attention the partials have room for.
    partial_per_token: usize,
    /// How many chunks of positions attention splits a query into, by pass size.
    attention_split: AttentionSplit,
    /// A pass's token ids, positions, table offsets and logit rows, then its prefill tiles:
    /// `6 * max_batch_tokens` values.
    inputs: CudaSlice<u32>,
    /// The single sequence of `forward`: the pool's first blocks, and the positions it holds.
    solo_blocks: Vec<u32>,
    solo_len: usize,
    /// Captured decode passes, by sequence count, replayed for every later pass of that size.
    decode_graphs: HashMap<usize, DecodeGraph>,
    /// The tiled prefill attention and the query tokens of one tile (`PREFILL_QUERY_ROWS` over
    /// the query heads sharing a kv head); None for a plan whose module predates it or whose
    /// heads do not fit a tile, when the split kernel serves every pass.
    prefill_attention: Option<(CudaFunction, usize)>,
    /// Decode attention in one clustered launch (`attention_decode_f32`: append, split attention
    /// and merge) and the most blocks a cluster may have; None before sm90 or for a plan whose
    /// module predates it, when the three kernels run.
    decode_attention: Option<(CudaFunction, u32)>,
    /// Whether decode passes take `decode_attention`: `ONE_LAUNCH_DECODE_ATTENTION`, or what
    /// `FDRT_DECODE_ATTENTION` (`one-launch` or `split`) says.
    decode_attention_on: bool,
    /// Tensor-core GEMMs for the matmuls of passes from the plan's thresholds on; None without
    /// cuBLAS (or with `FDRT_GEMM=off`), when the row kernels take every pass.
    gemm: Option<Gemm>,
    /// Per step, the pass size from which it runs as a GEMM (the plan's `CudaDispatch`).
    gemm_from: Vec<Option<u32>>,
    /// The share of a pass's tokens (percent) in prompt chunks from which attention takes the
    /// tiled prefill kernel (the plan's `CudaDispatch`).
    prefill_attention_from: usize,
    /// Where the A8 and FP8 matmuls put their quantized activations (None: the plan has none).
    act_quant: Option<ActQuantBuffers>,
    /// The mixture-of-experts launches' routes and intermediate rows (None: the plan has none).
    moe: Option<MoeScratch>,
    /// Whether the plan's kernels are launched overlapped (programmatic dependent launch): on
    /// sm90, unless `FDRT_PDL=off`.
    overlap_launches: bool,
    /// With `FDRT_PROFILE` set: time per kernel (each step synchronized), printed on drop.
    profile: Option<HashMap<String, (std::time::Duration, usize)>>,
    /// With `FDRT_GRAPH_TIMES` set: the device time of each decode graph replay (two events
    /// around it), printed on drop, so that a step's wall time can be split into the device's
    /// part and the host's gap between steps.
    graph_times: Option<GraphTimes>,
    /// The norms passes of one token fold into their matmuls (None: the plan has none, or
    /// `FDRT_FOLDS=off`).
    folds: Option<folds::DecodeFolds>,
}

/// A pass's activations on the int8 or e4m3 grid (`max_batch_tokens` rows of the widest such
/// matmul's K) and each row's scale, and `scale_rows_f32`, the epilogue of their GEMMs.
struct ActQuantBuffers {
    q: CudaSlice<f32>,
    scales: CudaSlice<f32>,
    scale_rows: CudaFunction,
}

/// What a mixture-of-experts launch keeps between its kernels, for `max_batch_tokens` tokens
/// of the widest such layer: each token's picked experts and their weights, then per (token,
/// pick) the gate-up row and the activation row.
struct MoeScratch {
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    /// The rows grouped by expert (passes of several tokens): `order[pos]` is the (token, pick)
    /// row at `pos`, `slot[row]` its `pos`, the tiles `(pos, rows, expert, 0)` and their count.
    order: CudaSlice<u32>,
    slot: CudaSlice<u32>,
    tiles: CudaSlice<u32>,
    n_tiles: CudaSlice<u32>,
    /// The gathered input rows, and the down projections before their routing weights (per
    /// row, or per `pos` when grouped), `[picks, C]` each.
    sorted_in: CudaSlice<f32>,
    sorted_out: CudaSlice<f32>,
    /// Per-pick row widths the buffers hold: `2I` (gate-up) and `I`; the widest input `C`.
    inter: usize,
    top_k: usize,
    cols: usize,
    /// The A8 and FP8 experts' rows on their grid, when the plan has such experts.
    grid_rows: Option<GridRows>,
}

/// A8 and FP8 experts: their input rows (the tokens', or the gathered ones) and their act rows
/// on the int8 or e4m3 grid, with each row's scale.
struct GridRows {
    x: CudaSlice<f32>,
    x_scales: CudaSlice<f32>,
    act: CudaSlice<f32>,
    act_scales: CudaSlice<f32>,
}

impl MoeScratch {
    fn for_plan(
        plan: &LoadedPlan,
        max_batch_tokens: usize,
        alloc: &dyn Fn(usize) -> Result<CudaSlice<f32>, RuntimeError>,
        s: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Option<MoeScratch>, RuntimeError> {
        let (mut inter, mut top_k, mut cols, mut experts) = (0, 0, 0, 0);
        let mut grid_rows = false;
        for step in &plan.program.steps {
            if let Launch::Moe {
                x,
                gate_up,
                experts: e,
                top_k: k,
                ..
            } = &step.launch
            {
                let info = &plan.manifest.weights[gate_up.0 as usize];
                inter = inter.max(expert_inter(info, *e));
                top_k = top_k.max(*k as usize);
                cols = cols.max(x.cols as usize);
                experts = experts.max(*e as usize);
                grid_rows |= info
                    .quant
                    .is_some_and(|q| q.scheme.act_quant() != ActQuant::None);
            }
        }
        if top_k == 0 {
            return Ok(None);
        }
        // The gate-up and SiLU launches put the (token, pick) rows on the grid's y axis, the
        // tile launches their tiles.
        let grid_rows_of = |tokens: usize| {
            let picks = tokens * top_k;
            picks.max(picks.div_ceil(kernels::cuda::MOE_TILE_ROWS) + experts.min(picks))
        };
        let picks = max_batch_tokens * top_k;
        if grid_rows_of(max_batch_tokens) > MAX_GRID_Y {
            let fits = (1..max_batch_tokens)
                .rev()
                .find(|&t| grid_rows_of(t) <= MAX_GRID_Y)
                .unwrap_or(1);
            return Err(RuntimeError::Cuda(format!(
                "a pass of {max_batch_tokens} tokens routes {picks} (token, expert) rows, more than a CUDA launch holds ({MAX_GRID_Y}): lower --max-batch-tokens to {fits}"
            )));
        }
        let max_tiles = picks.div_ceil(kernels::cuda::MOE_TILE_ROWS) + experts.min(picks);
        let indices = |n: usize, what: &str| {
            s.alloc_zeros::<u32>(n.max(1))
                .map_err(|e| RuntimeError::Cuda(format!("uploading expert {what}: {e}")))
        };
        Ok(Some(MoeScratch {
            ids: indices(picks, "routes")?,
            weights: alloc(picks)?,
            gate_up: alloc(picks * 2 * inter)?,
            act: alloc(picks * inter)?,
            order: indices(picks, "order")?,
            slot: indices(picks, "slots")?,
            tiles: indices(4 * max_tiles, "tiles")?,
            n_tiles: indices(1, "tile count")?,
            sorted_in: alloc(picks * cols)?,
            sorted_out: alloc(picks * cols)?,
            inter,
            top_k,
            cols,
            grid_rows: match grid_rows {
                false => None,
                true => Some(GridRows {
                    x: alloc(picks * cols)?,
                    x_scales: alloc(picks)?,
                    act: alloc(picks * inter)?,
                    act_scales: alloc(picks)?,
                }),
            },
        }))
    }
}

/// The largest grid y dimension of a CUDA launch.
const MAX_GRID_Y: usize = 65535;

/// An expert's intermediate size `I` from the stacked gate-up weight (`[E, 2I, C]`).
fn expert_inter(gate_up: &artifacts::schema::WeightInfo, experts: u64) -> usize {
    let rows: u64 = gate_up.shape[..gate_up.shape.len().saturating_sub(1)]
        .iter()
        .product();
    (rows / (2 * experts.max(1))) as usize
}

/// Refuses, before any upload, a plan the CUDA kernels cannot run as written: latent attention
/// wider than `kernels/cuda/mla.cu` holds, a mixture of more experts than the routing ranks or
/// whose weights disagree with its launch, a weight in the tile layout read by anything but the
/// W4A16 matmul.
fn check_kernel_limits(plan: &LoadedPlan) -> Result<(), RuntimeError> {
    use kernels::cuda::{MLA_MAX_HEAD, MLA_MAX_LORA, MLA_MAX_ROPE};
    for step in &plan.program.steps {
        check_tile_readers(plan, step).map_err(RuntimeError::InvalidPlan)?;
        if let Launch::MlaAttention {
            nope_dim,
            rope_dim,
            v_dim,
            kv_lora,
            ..
        } = step.launch
        {
            if kv_lora > MLA_MAX_LORA
                || rope_dim > MLA_MAX_ROPE
                || nope_dim > MLA_MAX_HEAD
                || v_dim > MLA_MAX_HEAD
            {
                return Err(RuntimeError::Cuda(format!(
                    "latent attention of rank {kv_lora}, rope {rope_dim}, heads {nope_dim}/{v_dim} is wider than the CUDA kernel holds ({MLA_MAX_LORA}, {MLA_MAX_ROPE}, {MLA_MAX_HEAD})"
                )));
            }
        }
        if let Launch::Moe { experts, top_k, .. } = step.launch {
            if top_k == 0 || top_k > experts {
                return Err(RuntimeError::InvalidPlan(format!(
                    "a mixture of experts picks {top_k} of {experts} experts"
                )));
            }
            if experts > kernels::cuda::MOE_MAX_EXPERTS {
                return Err(RuntimeError::Cuda(format!(
                    "{experts} experts are more than the CUDA routing kernel ranks ({})",
                    kernels::cuda::MOE_MAX_EXPERTS
                )));
            }
            check_experts(plan, &step.launch).map_err(RuntimeError::InvalidPlan)?;
        }
    }
    Ok(())
}

/// Only the W4A16 matmul reads the tile layout, and only as its weight: any other reader would
/// take the permuted codes for panels.
fn check_tile_readers(plan: &LoadedPlan, step: &artifacts::schema::Step) -> Result<(), String> {
    let tiled = |w: &artifacts::schema::WeightRef| in_tiles(plan, w);
    let w4a16 = registry::by_name(&step.kernel).is_some_and(|e| e.key.quant == QuantScheme::W4A16);
    let elsewhere = match &step.launch {
        Launch::MatMul { w, bias, .. } => (tiled(w) && !w4a16) || bias.as_ref().is_some_and(tiled),
        launch => launch.operands().2.iter().any(tiled),
    };
    if elsewhere {
        return Err(format!(
            "{} reads a weight in the W4A16 tile layout, which only the W4A16 matmul reads as \
             its weight",
            step.kernel
        ));
    }
    Ok(())
}

/// A mixture's weights have the shapes and formats its launch reads them with: the CUDA kernels
/// index them by the launch's sizes (the CPU kernel checks them itself), so a plan whose
/// manifest disagrees must fail here, not read past a weight on the device.
fn check_experts(plan: &LoadedPlan, launch: &Launch) -> Result<(), String> {
    let Launch::Moe {
        x,
        router,
        bias,
        gate_up,
        down,
        experts,
        out,
        ..
    } = launch
    else {
        return Ok(());
    };
    let info = |w: &artifacts::schema::WeightRef| {
        plan.manifest.weights.get(w.0 as usize).ok_or_else(|| {
            format!(
                "a mixture of experts reads weight {}, which does not exist",
                w.0
            )
        })
    };
    let (c, e) = (x.cols, *experts);
    let want = |w: &artifacts::schema::WeightRef, shape: &[u64]| -> Result<(), String> {
        let info = info(w)?;
        if info.shape != shape {
            return Err(format!(
                "weight {} is {:?}, a mixture of {e} experts over {c} columns reads it as {shape:?}",
                info.name, info.shape
            ));
        }
        Ok(())
    };
    if out.cols != c {
        return Err(format!(
            "a mixture of experts maps {c} columns to {}",
            out.cols
        ));
    }
    want(router, &[e, c])?;
    if let Some(b) = bias {
        want(b, &[e])?;
    }
    let width = match info(gate_up)?.shape[..] {
        [_, width, _] if width > 0 && width % 2 == 0 => width,
        ref other => return Err(format!("stacked gate-up experts of shape {other:?}")),
    };
    want(gate_up, &[e, width, c])?;
    want(down, &[e, c, width / 2])?;
    // Quantized experts: codes in panels of 8 rows, each expert whole panels, K and the group
    // multiples of 16, the scheme's code format (`kernels/cuda/quant.cu`).
    for (w, k) in [(gate_up, c), (down, width / 2)] {
        let info = info(w)?;
        let Some(q) = info.quant else { continue };
        let multiple = kernels::cuda::QUANT_K_MULTIPLE as u64;
        let panels = artifacts::schema::WeightLayout::Panels { panel: 8 };
        let rows = info.shape[1];
        if info.layout != panels
            || rows % 8 != 0
            || k % multiple != 0
            || q.group % multiple != 0
            || q.group == 0
            || k % q.group != 0
            || q.scheme.code_format() != Some(q.codes)
        {
            return Err(format!(
                "quantized experts {} ({:?}, {:?}, {} codes in groups of {}) are not what the CUDA kernels read: panels of 8 rows, K and the group multiples of {multiple}, the scheme's codes",
                info.name, info.shape, info.layout, q.scheme, q.group
            ));
        }
    }
    Ok(())
}

/// Whether a step is a matmul whose weight is in the tile layout (`PlanLayout::QuantTiles`):
/// the tensor-core kernels serve it in place of its registry kernel's matmul.
pub(super) fn reads_tiles(plan: &LoadedPlan, step: &artifacts::schema::Step) -> bool {
    matches!(&step.launch, Launch::MatMul { w, .. } if in_tiles(plan, w))
}

/// Whether weight `w` is stored in the tile layout (`PlanLayout::QuantTiles`).
fn in_tiles(plan: &LoadedPlan, w: &artifacts::schema::WeightRef) -> bool {
    plan.manifest
        .weights
        .get(w.0 as usize)
        .is_some_and(|info| info.layout == artifacts::schema::WeightLayout::QuantTiles)
}

/// The functions a step launches, in launch order: its registry kernel's, but a W4A16 matmul
/// over tiles launches the tile kernels (`check_tile_readers` refused tiles anywhere else).
fn step_function_names(
    plan: &LoadedPlan,
    step: &artifacts::schema::Step,
    entry: &registry::KernelEntry,
) -> &'static [&'static str] {
    if reads_tiles(plan, step) && entry.key.quant == QuantScheme::W4A16 {
        &kernels::cuda::TILE_MATMUL_FUNCTIONS
    } else {
        kernels::cuda::functions(entry)
    }
}

/// A captured graph, owned by one engine.
struct DecodeGraph(cudarc::driver::CudaGraph);

/// Events around the decode graph's replays and what they measured. A replay's events are read
/// at the next replay (or on drop), after its pass has synchronized, so that timing adds no wait
/// of its own to the step.
struct GraphTimes {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    /// Whether the events hold a replay not yet counted.
    pending: bool,
    replays: usize,
    device_ms: f64,
}

impl GraphTimes {
    /// Counts the replay the events hold, if any.
    fn count_pending(&mut self) -> Result<(), cudarc::driver::DriverError> {
        if std::mem::take(&mut self.pending) {
            self.device_ms += f64::from(self.start.elapsed_ms(&self.end)?);
            self.replays += 1;
        }
        Ok(())
    }
}

// SAFETY: the graph is only touched through its engine's `&mut self` (launched or dropped), so
// never from two threads at once, which is all the driver asks of graph objects.
unsafe impl Send for DecodeGraph {}

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
        if let Some(times) = self.graph_times.as_mut() {
            if let Err(e) = times.count_pending() {
                eprintln!("decode graphs (FDRT_GRAPH_TIMES): the last replay's time is lost: {e}");
            }
        }
        if let Some(times) = self.graph_times.as_ref().filter(|t| t.replays > 0) {
            eprintln!(
                "decode graphs (FDRT_GRAPH_TIMES): {} replays, {:.4} ms of device time each",
                times.replays,
                times.device_ms / times.replays as f64
            );
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

/// The most blocks a cluster of the one-launch decode attention (`attention_decode_f32`) may
/// have on this device: 16 where clusters beyond the portable 8 are allowed and fit (H100s
/// allow them once a function opts in), else 8. Its cluster is a query's chunks, so this caps
/// the chunks of a decode pass.
fn largest_cluster(f: &CudaFunction) -> u32 {
    use cudarc::driver::sys;
    let opted_in = f
        .set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        )
        .is_ok();
    if !opted_in {
        return 8;
    }
    // SAFETY: an all-zero attribute is a valid one; the configuration lives across the query,
    // which only reads it.
    let fits = unsafe {
        let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attribute.value.clusterDim.x = 1;
        attribute.value.clusterDim.y = 1;
        attribute.value.clusterDim.z = 16;
        let config = sys::CUlaunchConfig {
            gridDimX: 1,
            gridDimY: 1,
            gridDimZ: 16,
            blockDimX: ATTENTION_THREADS,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: std::ptr::null_mut(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        let mut clusters = 0;
        sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config)
            .result()
            .is_ok()
            && clusters > 0
    };
    if fits {
        16
    } else {
        8
    }
}

/// Whether decode passes run attention in one launch where they can (sm90), unless
/// `FDRT_DECODE_ATTENTION` says otherwise. Off: on an H100 the 8B decode step was about
/// 0.02 ms slower with it than with the three kernels (docs/PERF.md).
const ONE_LAUNCH_DECODE_ATTENTION: bool = false;

/// Threads per block of the split attention kernels (`ATTENTION_WARPS` warps).
const ATTENTION_THREADS: u32 = 128;

/// Weight bytes uploaded between two releases of the plan's resident pages.
const UPLOAD_WINDOW: usize = 1 << 30;

/// Device memory a KV pool sized by what is free leaves free: for graphs, the driver's own
/// allocations and other kernels' scratch.
const KV_HEADROOM: usize = 1 << 30;

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

/// Threads per block of `kv_block_copy`.
const KV_COPY_THREADS: u32 = 256;

impl GpuEngine {
    /// Uploads `plan` to device `ordinal` with the context, token budget and KV cache of
    /// `options`. With `kv_blocks` unset the pool holds `max_num_seqs` full contexts, or as
    /// many blocks as the device's free memory allows (keeping `KV_HEADROOM` free).
    pub fn new(
        plan: LoadedPlan,
        ordinal: usize,
        options: EngineOptions,
    ) -> Result<GpuEngine, RuntimeError> {
        check_kernel_limits(&plan)?;
        let gpu = GpuModule::open(&plan, ordinal)?;
        let s = gpu.stream.clone();
        let m = &plan.manifest;
        let max_context = options
            .max_context
            .min(m.model.max_position_embeddings as usize)
            .max(1);
        let max_batch_tokens = options.max_batch_tokens.max(1);
        let max_num_seqs = options.max_num_seqs.max(1);
        let block_size = options.block_size.max(1);
        let upload = |what: &str, e| RuntimeError::Cuda(format!("uploading {what}: {e}"));
        let mut weights = Vec::with_capacity(m.weights.len());
        for i in 0..m.weights.len() {
            let len = plan
                .weight_bytes(artifacts::schema::WeightRef(i as u32))
                .len();
            // A zero-length allocation is refused by the driver; empty weights get a byte.
            let slice = s
                .alloc_zeros::<u8>(len.max(1))
                .map_err(|e| upload(&m.weights[i].name, e))?;
            weights.push(slice);
        }
        let alloc = |n: usize| {
            s.alloc_zeros::<f32>(n.max(1))
                .map_err(|e| upload("buffers", e))
        };
        let arena = alloc(m.memory.arena_cols as usize * max_batch_tokens)?;
        let logits = alloc(plan.program.logits_cols as usize * max_batch_tokens)?;
        let (cos, sin) = crate::engine::rope_tables(m, max_context);
        let table = |t: &[f32]| s.clone_htod(if t.is_empty() { &[0f32][..] } else { t });
        let (cos, sin) = (
            table(&cos).map_err(|e| upload("rope tables", e))?,
            table(&sin).map_err(|e| upload("rope tables", e))?,
        );
        let blocks_per_context = max_context.div_ceil(block_size);
        let tables = s
            .alloc_zeros::<u32>(max_num_seqs.min(max_batch_tokens) * blocks_per_context)
            .map_err(|e| upload("block tables", e))?;
        let inputs = s
            .alloc_zeros::<u32>(6 * max_batch_tokens)
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
        // The KV pool last, in what the device has left.
        let kv = &m.kv;
        let block_len = block_size * kv.num_kv_heads as usize * kv.head_dim as usize;
        let pools = if plan.program.has_latent_kv() { 1 } else { 2 };
        let block_bytes = pools * kv.num_layers as usize * block_len * std::mem::size_of::<f32>();
        let kv_blocks = match options.kv_blocks {
            Some(n) => n.max(1),
            None => {
                let (free, _) = gpu
                    .ctx
                    .mem_get_info()
                    .map_err(cuda("reading the free device memory"))?;
                let fits = free.saturating_sub(KV_HEADROOM) / block_bytes.max(1);
                if fits == 0 {
                    return Err(RuntimeError::Cuda(format!(
                        "no device memory left for the KV cache: {free} bytes free, one block of {block_size} positions takes {block_bytes}"
                    )));
                }
                (max_num_seqs * blocks_per_context).min(fits)
            }
        };
        let mut k_cache = vec![];
        let mut v_cache = vec![];
        // A latent cache (multi-head latent attention) keeps one row per position and no values.
        let latent = plan.program.has_latent_kv();
        for _ in 0..kv.num_layers {
            let kv_alloc = |what| {
                s.alloc_zeros::<f32>((kv_blocks * block_len).max(1))
                    .map_err(|e| {
                        RuntimeError::Cuda(format!(
                            "allocating the {what} cache ({kv_blocks} blocks of {block_bytes} bytes over all layers): {e}"
                        ))
                    })
            };
            k_cache.push(kv_alloc(if latent { "latent" } else { "key" })?);
            v_cache.push(if latent {
                alloc(1)?
            } else {
                kv_alloc("value")?
            });
        }
        let kv_copy = match gpu.module.load_function("kv_block_copy") {
            Ok(function) => {
                let pools: Vec<u64> = k_cache
                    .iter()
                    .zip(&v_cache)
                    .flat_map(|(k, v)| [ptr(k, &s), ptr(v, &s)].into_iter().take(pools))
                    .collect();
                let table = s.clone_htod(&pools).map_err(|e| {
                    RuntimeError::Cuda(format!("uploading the KV pools' table: {e}"))
                })?;
                Some((function, table))
            }
            Err(_) => None,
        };
        let code_abi::CudaDispatch {
            gemm_from_tokens: gemm_from,
            prefill_attention_from_percent,
        } = dispatch(&plan)?;
        // The matmuls a pass of up to `max_batch_tokens` tokens can run as GEMMs.
        let reachable = |index: usize| {
            gemm_from
                .get(index)
                .copied()
                .flatten()
                .is_some_and(|from| from as usize <= max_batch_tokens)
        };
        let gemm_matmuls: Vec<(u64, &artifacts::schema::WeightRef, u64)> = plan
            .program
            .steps
            .iter()
            .enumerate()
            .filter(|&(i, _)| reachable(i))
            .filter_map(|(_, step)| match &step.launch {
                Launch::MatMul { x, w, out, .. } => Some((x.cols, w, out.cols)),
                _ => None,
            })
            .collect();
        let gemm = if gemm_matmuls.is_empty()
            || std::env::var("FDRT_GEMM").is_ok_and(|v| v == "off")
        {
            None
        } else {
            let max_k = gemm_matmuls
                .iter()
                .map(|&(k, _, _)| k as usize)
                .max()
                .unwrap_or(0);
            // Room for the largest quantized weight formed whole (as f32) for the GEMM.
            let max_quant = gemm_matmuls
                .iter()
                .filter(|(_, w, _)| m.weights[w.0 as usize].quant.is_some())
                .map(|&(k, _, n)| (k * n) as usize)
                .max()
                .unwrap_or(0);
            match Gemm::new(&gpu, max_batch_tokens, max_k, max_quant) {
                Ok(gemm) => Some(gemm),
                Err(why) => {
                    tracing::warn!(
                        "the matmuls the plan runs as GEMMs for long passes run on their row kernels, not tensor cores: {why}"
                    );
                    None
                }
            }
        };
        let graph_times = match std::env::var_os("FDRT_GRAPH_TIMES") {
            Some(_) => {
                let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let event = |e| RuntimeError::Cuda(format!("creating timing events: {e}"));
                Some(GraphTimes {
                    start: gpu.ctx.new_event(timed).map_err(event)?,
                    end: gpu.ctx.new_event(timed).map_err(event)?,
                    pending: false,
                    replays: 0,
                    device_ms: 0.0,
                })
            }
            None => None,
        };
        let logit_cols = plan.program.logits_cols as usize;
        // SAFETY: page-locked, ordinary (not write-combined: the host reads it) memory; only
        // read after a copy into it has completed.
        let pinned_logits = unsafe {
            gpu.ctx
                .alloc_pinned_with_flags::<f32>((max_num_seqs * logit_cols).max(1), 0)
        }
        .map_err(|e| upload("page-locked logits", e))?;
        let group = (m.model.num_heads / m.kv.num_kv_heads.max(1)) as usize;
        let prefill_attention = match gpu.module.load_function("attention_prefill_f32") {
            Ok(f)
                if prefill_attention_from_percent.is_some()
                    && (1..=PREFILL_QUERY_ROWS).contains(&group)
                    && m.model.num_heads.is_multiple_of(m.kv.num_kv_heads.max(1)) =>
            {
                Some((f, PREFILL_QUERY_ROWS / group))
            }
            _ => None,
        };
        let decode_attention = match gpu.module.load_function("attention_decode_f32") {
            Ok(f) if matches!(plan.manifest.target, Target::Cuda(CudaArch::Sm90)) => {
                Some((f.clone(), largest_cluster(&f)))
            }
            _ => None,
        };
        let decode_attention_on = match std::env::var("FDRT_DECODE_ATTENTION").as_deref() {
            Ok("split") => false,
            Ok("one-launch") => true,
            _ => ONE_LAUNCH_DECODE_ATTENTION,
        };
        let act_quant_k = plan
            .program
            .steps
            .iter()
            .filter_map(|step| match &step.launch {
                Launch::MatMul { x, w, .. } => {
                    let q = m.weights.get(w.0 as usize)?.quant?;
                    (q.scheme.act_quant() != ir_types::ActQuant::None).then_some(x.cols as usize)
                }
                _ => None,
            })
            .max();
        let act_quant = match act_quant_k {
            None => None,
            Some(k) => Some(ActQuantBuffers {
                q: alloc(k * max_batch_tokens)?,
                scales: alloc(max_batch_tokens)?,
                scale_rows: gpu.module.load_function("scale_rows_f32").map_err(|e| {
                    RuntimeError::InvalidPlan(format!("the module has no scale_rows_f32: {e}"))
                })?,
            }),
        };
        let argmax = gpu.module.load_function("argmax_rows_f32").ok();
        let folds = if std::env::var("FDRT_FOLDS").is_ok_and(|v| v == "off") {
            None
        } else {
            folds::DecodeFolds::load(&plan, &gpu.module, &s, &gemm_from)?
        };
        let row_ids = s
            .alloc_zeros::<u32>(max_batch_tokens)
            .map_err(|e| upload("row ids", e))?;
        let moe = MoeScratch::for_plan(&plan, max_batch_tokens, &alloc, &s)?;
        let mut engine = GpuEngine {
            argmax,
            row_ids,
            greedy_ids: vec![],
            prefill_attention,
            decode_attention,
            decode_attention_on,
            gemm,
            gemm_from,
            prefill_attention_from: prefill_attention_from_percent.unwrap_or(100) as usize,
            act_quant,
            moe,
            overlap_launches: matches!(plan.manifest.target, Target::Cuda(CudaArch::Sm90))
                && !std::env::var("FDRT_PDL").is_ok_and(|v| v == "off"),
            pinned_logits,
            partial,
            partial_per_token,
            attention_split,
            profile: std::env::var_os("FDRT_PROFILE").map(|_| HashMap::new()),
            graph_times,
            folds,
            decode_graphs: HashMap::new(),
            inputs,
            gpu,
            weights,
            arena,
            logits,
            host_logits: vec![],
            k_cache,
            v_cache,
            kv_copy,
            kv_blocks,
            cos,
            sin,
            tables,
            solo_blocks: (0..blocks_per_context.min(kv_blocks) as u32).collect(),
            solo_len: 0,
            options: EngineOptions {
                max_context,
                max_batch_tokens,
                max_num_seqs,
                block_size,
                kv_blocks: Some(kv_blocks),
            },
            plan,
        };
        engine.upload_weights()?;
        Ok(engine)
    }

    /// Copies every weight of the plan's store into its device allocation. Host memory stays
    /// bounded: after about UPLOAD_WINDOW bytes the copies are waited for and the plan's pages
    /// dropped from this process (they stay in the page cache), so the mapped plan never counts
    /// whole against it.
    fn upload_weights(&mut self) -> Result<(), RuntimeError> {
        let s = self.gpu.stream.clone();
        let m = &self.plan.manifest;
        let mut since_release = 0usize;
        for (i, slice) in self.weights.iter_mut().enumerate() {
            let bytes = self
                .plan
                .weight_bytes(artifacts::schema::WeightRef(i as u32));
            if bytes.len() > slice.len() {
                return Err(RuntimeError::InvalidPlan(format!(
                    "weight {} has {} bytes, its device copy {}",
                    m.weights[i].name,
                    bytes.len(),
                    slice.len()
                )));
            }
            s.memcpy_htod(bytes, &mut slice.slice_mut(..bytes.len()))
                .map_err(|e| RuntimeError::Cuda(format!("uploading {}: {e}", m.weights[i].name)))?;
            since_release += bytes.len();
            if since_release >= UPLOAD_WINDOW || i + 1 == m.weights.len() {
                s.synchronize()
                    .map_err(|e| RuntimeError::Cuda(format!("uploading weights: {e}")))?;
                self.plan.release_resident()?;
                since_release = 0;
            }
        }
        Ok(())
    }

    /// Serves the next pass from `weights` (same structure, checked by the caller: see
    /// `weights_update`), copied into the device allocations in place, so captured graphs stay
    /// valid; returns the previous store. If the copy fails the previous weights are copied
    /// back and stay in service.
    pub fn replace_weights(&mut self, weights: WeightStore) -> Result<WeightStore, RuntimeError> {
        self.bind()?;
        let old = self.plan.replace_weights(weights);
        match self.upload_weights() {
            Ok(()) => Ok(old),
            Err(e) => {
                drop(self.plan.replace_weights(old));
                self.upload_weights().map_err(|again| {
                    RuntimeError::Cuda(format!(
                        "{e}; restoring the previous weights failed too: {again}"
                    ))
                })?;
                Err(e)
            }
        }
    }

    pub fn plan(&self) -> &LoadedPlan {
        &self.plan
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Blocks in the device's KV pool.
    pub fn kv_blocks(&self) -> usize {
        self.kv_blocks
    }

    /// Copies KV block `block` of every layer into `out` (exactly a block long) in the CPU
    /// pool's form (`KvPool::read_block`: layer after layer, keys then values, f32; the device
    /// and every host CUDA runs on are little-endian), so CPU and GPU instances of a plan
    /// exchange blocks alike.
    pub fn read_kv_block(&self, block: u32, out: &mut [u8]) -> Result<(), RuntimeError> {
        let (range, pools) = self.kv_block_range(block, out.len())?;
        self.bind()?;
        let s = &self.gpu.stream;
        let down = |e| RuntimeError::Cuda(format!("copying KV block {block} to the host: {e}"));
        let mut rest = out;
        for layer in 0..self.k_cache.len() {
            for pool in [&self.k_cache[layer], &self.v_cache[layer]]
                .into_iter()
                .take(pools)
            {
                let (these, after) = rest.split_at_mut(range.len() * 4);
                let src = pool.slice(range.clone());
                match bytemuck::try_cast_slice_mut::<u8, f32>(these) {
                    Ok(dst) => s.memcpy_dtoh(&src, dst).map_err(down)?,
                    // Not 4-aligned: through a buffer.
                    Err(_) => {
                        let mut values = vec![0f32; range.len()];
                        s.memcpy_dtoh(&src, &mut values).map_err(down)?;
                        these.copy_from_slice(bytemuck::cast_slice(&values));
                    }
                }
                rest = after;
            }
        }
        Ok(())
    }

    /// Writes KV block `block` from bytes in [`GpuEngine::read_kv_block`]'s form.
    pub fn write_kv_block(&mut self, block: u32, bytes: &[u8]) -> Result<(), RuntimeError> {
        let (range, pools) = self.kv_block_range(block, bytes.len())?;
        self.bind()?;
        let s = self.gpu.stream.clone();
        let up = |e| RuntimeError::Cuda(format!("copying KV block {block} to the device: {e}"));
        let mut rest = bytes;
        for layer in 0..self.k_cache.len() {
            for pool in [&mut self.k_cache[layer], &mut self.v_cache[layer]]
                .into_iter()
                .take(pools)
            {
                let (these, after) = rest.split_at(range.len() * 4);
                let mut dst = pool.slice_mut(range.clone());
                match bytemuck::try_cast_slice::<u8, f32>(these) {
                    Ok(src) => s.memcpy_htod(src, &mut dst).map_err(up)?,
                    Err(_) => {
                        let mut values = vec![0f32; range.len()];
                        bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(these);
                        s.memcpy_htod(&values, &mut dst).map_err(up)?;
                    }
                }
                rest = after;
            }
        }
        Ok(())
    }

    /// The engine's device, for KV transfers through device memory ([`ipc`]).
    pub fn device_link(&self) -> ipc::DeviceLink {
        ipc::DeviceLink::new(self.gpu.ctx.clone())
    }

    /// Copies KV block `block` of every layer into block `i` of a device region (another
    /// instance's, opened here) in [`GpuEngine::read_kv_block`]'s form, device to device.
    pub fn read_kv_block_to_device(
        &self,
        block: u32,
        region: &ipc::DeviceRegion,
        i: usize,
    ) -> Result<(), RuntimeError> {
        let dst = region.block_ptr(i, &self.gpu.ctx)?;
        self.copy_kv_block(block, region.block_bytes(), dst, false)
    }

    /// Writes KV block `block` from block `i` of a device region (made here, filled by another
    /// instance) in [`GpuEngine::read_kv_block`]'s form, device to device.
    pub fn write_kv_block_from_device(
        &mut self,
        block: u32,
        region: &ipc::DeviceRegion,
        i: usize,
    ) -> Result<(), RuntimeError> {
        let src = region.block_ptr(i, &self.gpu.ctx)?;
        self.copy_kv_block(block, region.block_bytes(), src, true)
    }

    /// Device-to-device copies of block `block` between the pools and `len` bytes of device
    /// memory at `other` (into the pools when `into_pools`). Waits for them, so the other
    /// memory is free to reuse (or to hand to the other instance) on return.
    fn copy_kv_block(
        &self,
        block: u32,
        len: usize,
        other: u64,
        into_pools: bool,
    ) -> Result<(), RuntimeError> {
        let (range, pools) = self.kv_block_range(block, len)?;
        self.bind()?;
        let s = &self.gpu.stream;
        let failed = |e| RuntimeError::Cuda(format!("copying KV block {block} on the device: {e}"));
        if let Some((function, table)) = &self.kv_copy {
            let segments = (pools * self.k_cache.len()) as u32;
            let seg = range.len() as u32;
            let config = LaunchConfig {
                grid_dim: (seg.div_ceil(4 * KV_COPY_THREADS).clamp(1, 64), segments, 1),
                block_dim: (KV_COPY_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [
                Arg::P(ptr(table, s)),
                Arg::P(range.start as u64),
                Arg::I(seg as i32),
                Arg::P(other),
                Arg::I(i32::from(into_pools)),
            ];
            // SAFETY: `kv_block_copy(pools, offset, seg, other, into_pools)`: the table holds
            // `segments` pool addresses of this engine, each with the block's `seg` floats at
            // `offset` (checked by `kv_block_range`), and `other` has `len` = segments x seg x 4
            // bytes (`DeviceRegion::block_ptr`); the stream is synchronized below, before
            // either is reused.
            unsafe { launch_kernel(s, function, config, &args, self.overlap_launches) }
                .map_err(failed)?;
            return s.synchronize().map_err(failed);
        }
        let bytes = range.len() * 4;
        let mut at = 0u64;
        for layer in 0..self.k_cache.len() {
            for pool in [&self.k_cache[layer], &self.v_cache[layer]]
                .into_iter()
                .take(pools)
            {
                let pooled = ptr(pool, s) + 4 * range.start as u64;
                let (dst, src) = if into_pools {
                    (pooled, other + at)
                } else {
                    (other + at, pooled)
                };
                // SAFETY: both ranges lie inside live allocations of this context: the pool's
                // block (checked by `kv_block_range`) and the `len` bytes at `other` (a device
                // region's block, `DeviceRegion::block_ptr`); the stream is synchronized below,
                // before either is reused.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, s.cu_stream())
                }
                .map_err(failed)?;
                at += bytes as u64;
            }
        }
        s.synchronize().map_err(failed)
    }

    /// The values of block `block` in each layer's pool, and how many pools a layer has (one
    /// for a latent cache); checks the block and a buffer of `len` bytes.
    fn kv_block_range(
        &self,
        block: u32,
        len: usize,
    ) -> Result<(std::ops::Range<usize>, usize), RuntimeError> {
        let m = &self.plan.manifest;
        let block_len =
            self.options.block_size * m.kv.num_kv_heads as usize * m.kv.head_dim as usize;
        let pools = if self.plan.program.has_latent_kv() {
            1
        } else {
            2
        };
        let want = pools * self.k_cache.len() * block_len * 4;
        if block as usize >= self.kv_blocks {
            return Err(RuntimeError::KvBlocks(format!(
                "block {block} of a pool of {}",
                self.kv_blocks
            )));
        }
        if len != want {
            return Err(RuntimeError::KvBlocks(format!(
                "a block of {len} bytes where this pool's blocks have {want}"
            )));
        }
        let start = block as usize * block_len;
        Ok((start..start + block_len, pools))
    }

    /// Makes the engine's device context current on this thread (the scheduler's engine
    /// thread; every call that touches the device starts with it).
    fn bind(&self) -> Result<(), RuntimeError> {
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(cuda("binding the device"))
    }

    /// How many add-and-RMS-norms passes of one token run inside the matmuls around them.
    pub fn decode_folds(&self) -> usize {
        self.folds.as_ref().map_or(0, |f| {
            f.roles
                .iter()
                .filter(|r| matches!(r, folds::FoldRole::Norm))
                .count()
        })
    }

    /// Runs every norm as its own step in passes of one token too (what `FDRT_FOLDS=off` does
    /// at start-up): for comparing the two.
    pub fn unfold_decode_norms(&mut self) {
        self.folds = None;
        self.decode_graphs.clear();
    }

    /// Whether decode passes run attention in one launch (`attention_decode_f32`).
    pub fn decode_attention_in_one_launch(&self) -> bool {
        self.decode_attention.is_some() && self.decode_attention_on
    }

    /// Runs decode passes' attention in one launch where the module has the kernel (sm90), or
    /// as the append, the split kernel and the merge (what `FDRT_DECODE_ATTENTION=one-launch`
    /// and `=split` choose at start-up): for comparing the two. Says whether one launch is used.
    pub fn set_one_launch_decode_attention(&mut self, on: bool) -> bool {
        self.decode_attention_on = on;
        self.decode_graphs.clear();
        self.decode_attention_in_one_launch()
    }

    /// Forgets the single sequence.
    pub fn reset(&mut self) {
        self.solo_len = 0;
    }

    /// Positions the single sequence holds.
    pub fn seq_len(&self) -> usize {
        self.solo_len
    }

    pub fn max_context(&self) -> usize {
        self.options.max_context
    }

    pub fn max_batch_tokens(&self) -> usize {
        self.options.max_batch_tokens
    }

    /// Runs `tokens` after the single sequence so far (in the pool's first blocks: do not mix
    /// with `forward_batch` calls for other sequences); returns the logits of every new token
    /// (`all`) or of the last only, `[rows, vocab]`.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>, RuntimeError> {
        self.solo_pass(tokens, if all { Logits::All } else { Logits::Last })
    }

    /// Runs `tokens` after the single sequence so far, like [`GpuEngine::forward`], and returns
    /// the most likely next token, picked on the device where the module can (one id copied
    /// back instead of a row of the vocabulary).
    pub fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        self.solo_pass(tokens, Logits::Greedy)?;
        self.greedy_ids
            .first()
            .copied()
            .ok_or_else(|| RuntimeError::Cuda("the pass returned no greedy pick".to_string()))
    }

    /// Runs `tokens` after the single sequence so far, asking for `logits`, and returns the
    /// logits rows that brings back (none for `Greedy` and `None`).
    pub(crate) fn solo_pass(
        &mut self,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>, RuntimeError> {
        let blocks = std::mem::take(&mut self.solo_blocks);
        let chunk = SeqChunk {
            blocks: &blocks,
            start: self.solo_len,
            tokens,
            logits,
        };
        let result = self.forward_batch(&[chunk]).map(<[f32]>::to_vec);
        self.solo_blocks = blocks;
        let rows = result?;
        self.solo_len += tokens.len();
        Ok(rows)
    }

    /// One forward pass over several sequences at once, each chunk's tokens written to its
    /// blocks at its positions (the contract of [`crate::Engine::forward_batch`], checked the
    /// same way). Returns the wanted logits, `[R, vocab]`, in chunk order; the `Greedy`
    /// chunks' picks are then in [`GpuEngine::greedy_ids`].
    pub fn forward_batch(&mut self, chunks: &[SeqChunk]) -> Result<&[f32], RuntimeError> {
        self.pass(chunks).map(|output| output.logits)
    }

    /// One forward pass: its logits and its greedy picks.
    pub(crate) fn pass(&mut self, chunks: &[SeqChunk]) -> Result<PassOutput<'_>, RuntimeError> {
        let returned = self.run_pass(chunks)?;
        let logits = match returned {
            Returned::Pinned(len) => {
                // The copy into it completed before `run_pass` returned.
                &self
                    .pinned_logits
                    .as_slice()
                    .map_err(|e| RuntimeError::Cuda(format!("reading the logits: {e}")))?[..len]
            }
            Returned::Host(len) => &self.host_logits[..len],
        };
        Ok(PassOutput {
            logits,
            greedy_ids: &self.greedy_ids,
            // The GPU engine does not run the multi-token-prediction module yet.
            hidden: &[],
        })
    }

    /// Runs a pass and brings back what it returns; says where the returned logits are.
    fn run_pass(&mut self, chunks: &[SeqChunk]) -> Result<Returned, RuntimeError> {
        let m = &self.plan.manifest.model;
        let layout = PassLayout::of(
            chunks,
            &self.options,
            self.kv_blocks,
            m.vocab_size as usize,
            m.max_position_embeddings as usize,
        )?;
        let (t, r) = (layout.tokens.len(), layout.logit_rows.len());
        // Each chunk's table, as far as its positions reach, and every token's offset into them.
        let block_size = self.options.block_size;
        let mut tables: Vec<u32> = Vec::new();
        let mut offsets: Vec<u32> = Vec::with_capacity(t);
        for (c, span) in chunks.iter().zip(&layout.spans) {
            let offset = tables.len() as u32;
            tables.extend_from_slice(&c.blocks[..(c.start + span.rows).div_ceil(block_size)]);
            offsets.extend(std::iter::repeat_n(offset, span.rows));
        }
        self.bind()?;
        let s = self.gpu.stream.clone();
        let up = |e| RuntimeError::Cuda(format!("uploading the pass's inputs: {e}"));
        if tables.len() > self.tables.len() {
            // More sequences or longer tables than planned for: a larger buffer, and the
            // graphs that captured the old one's address go.
            self.decode_graphs.clear();
            self.tables = s.alloc_zeros::<u32>(tables.len()).map_err(up)?;
        }
        s.memcpy_htod(&tables, &mut self.tables.slice_mut(..tables.len()))
            .map_err(up)?;
        // Enough of the pass in prompt chunks (the plan says how much): attention by tiles of
        // queries, each tile inside one chunk (the split kernel is for decode tokens, one query
        // each).
        let in_chunks: usize = layout
            .spans
            .iter()
            .filter(|s| s.rows > 1)
            .map(|s| s.rows)
            .sum();
        let tiles: Vec<u32> = match self.prefill_attention {
            Some((_, tile_tokens)) if 100 * in_chunks >= self.prefill_attention_from * t => layout
                .spans
                .iter()
                .flat_map(|span| {
                    (0..span.rows).step_by(tile_tokens).flat_map(move |first| {
                        [
                            (span.row0 + first) as u32,
                            tile_tokens.min(span.rows - first) as u32,
                        ]
                    })
                })
                .collect(),
            _ => vec![],
        };
        // One upload into the pass's input buffer:
        // [ids | positions | table offsets | logit rows | prefill tiles].
        let mut host = Vec::with_capacity(3 * t + r + tiles.len());
        host.extend_from_slice(&layout.tokens);
        host.extend_from_slice(&layout.positions);
        host.extend_from_slice(&offsets);
        host.extend_from_slice(&layout.logit_rows);
        host.extend_from_slice(&tiles);
        s.memcpy_htod(&host, &mut self.inputs.slice_mut(..host.len()))
            .map_err(up)?;
        let base = ptr(&self.inputs, &s);
        let inputs = PassInputs {
            t,
            r,
            full_rows: layout.full_rows,
            ids: base,
            positions: base + 4 * t as u64,
            table_offsets: base + 8 * t as u64,
            logit_rows: base + 12 * t as u64,
            tables: ptr(&self.tables, &s),
            prefill_tiles: (!tiles.is_empty())
                .then_some((base + 4 * (3 * t + r) as u64, tiles.len() / 2)),
            one_per_sequence: chunks.len() == t,
        };
        // A decode pass (one token per sequence, each with its logits) is the same launches
        // every time for a given sequence count, reading positions and tables from the input
        // buffers: captured once into a CUDA graph, then replayed, so the ~300 launches cost
        // one. Not while profiling, which times each step.
        if r == t && chunks.len() == t && self.profile.is_none() {
            if !self.decode_graphs.contains_key(&t) {
                let graph = self.capture(&inputs)?;
                self.decode_graphs.insert(t, graph);
            }
            if let Some(graph) = self.decode_graphs.get(&t) {
                let replay = |e| RuntimeError::Cuda(format!("replaying the decode graph: {e}"));
                if let Some(times) = &mut self.graph_times {
                    // The last replay's pass has synchronized: its events are done.
                    times.count_pending().map_err(replay)?;
                    times.start.record(&s).map_err(replay)?;
                }
                graph.0.launch().map_err(replay)?;
                if let Some(times) = &mut self.graph_times {
                    times.end.record(&s).map_err(replay)?;
                    times.pending = true;
                }
            }
        } else {
            self.run_steps(&inputs)?;
        }
        let cols = self.plan.program.logits_cols as usize;
        let read = |e| RuntimeError::Cuda(format!("reading the logits: {e}"));
        let full_rows = layout.full_rows;
        self.greedy_ids.clear();
        // Without the device's picks, the greedy rows come back with the others.
        let len = if self.argmax.is_some() {
            if r > full_rows {
                self.greedy_ids.resize(r - full_rows, 0);
                s.memcpy_dtoh(&self.row_ids.slice(full_rows..r), &mut self.greedy_ids)
                    .map_err(read)?;
            }
            full_rows * cols
        } else {
            r * cols
        };
        if len == 0 {
            s.synchronize()
                .map_err(|e| RuntimeError::Cuda(format!("finishing the pass: {e}")))?;
            return Ok(Returned::Host(0));
        }
        if len <= self.pinned_logits.len() {
            let dst = &mut self.pinned_logits.as_mut_slice().map_err(read)?[..len];
            // SAFETY: `dst` is page-locked host memory of `len` values and the logits buffer
            // holds at least `len` (R rows of the vocabulary); the stream is synchronized
            // below, before `dst` is read or written again.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(dst, ptr(&self.logits, &s), s.cu_stream())
            }
            .map_err(read)?;
            s.synchronize()
                .map_err(|e| RuntimeError::Cuda(format!("finishing the pass: {e}")))?;
            let logits = &self.pinned_logits.as_slice().map_err(read)?[..len];
            return Ok(Returned::Pinned(pick_on_host(
                logits,
                cols,
                full_rows,
                &mut self.greedy_ids,
            )));
        }
        self.host_logits.resize(len, 0.0);
        s.memcpy_dtoh(&self.logits.slice(..len), &mut self.host_logits)
            .map_err(read)?;
        s.synchronize()
            .map_err(|e| RuntimeError::Cuda(format!("finishing the pass: {e}")))?;
        Ok(Returned::Host(pick_on_host(
            &self.host_logits,
            cols,
            full_rows,
            &mut self.greedy_ids,
        )))
    }

    /// The tokens picked for the last pass's `Greedy` chunks, in chunk order.
    pub fn greedy_ids(&self) -> &[u32] {
        &self.greedy_ids
    }

    /// Picks every logits row's most likely token on the device (`row_ids`), when the pass has
    /// rows to pick from (`always`: in a captured graph, which later passes with greedy rows
    /// replay).
    fn pick_on_device(&self, p: &PassInputs, always: bool) -> Result<(), RuntimeError> {
        let Some(argmax) = &self.argmax else {
            return Ok(());
        };
        if p.r == 0 || (!always && p.r == p.full_rows) {
            return Ok(());
        }
        let s = &self.gpu.stream;
        let (logits, ids) = (ptr(&self.logits, s), ptr(&self.row_ids, s));
        let cols = self.plan.program.logits_cols as i32;
        let mut b = s.launch_builder(argmax);
        b.arg(&logits).arg(&cols).arg(&ids);
        let config = LaunchConfig {
            grid_dim: (p.r as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `argmax_rows_f32(logits, cols, ids)`: the logits buffer holds the pass's r
        // rows of `cols`, `row_ids` has room for `max_batch_tokens >= r` ids.
        unsafe { b.launch(config) }
            .map(drop)
            .map_err(|e| RuntimeError::Cuda(format!("picking greedy tokens: {e}")))
    }

    /// Captures every step of a pass into a graph.
    fn capture(&mut self, inputs: &PassInputs) -> Result<DecodeGraph, RuntimeError> {
        let s = self.gpu.stream.clone();
        let graph_error = |e| RuntimeError::Cuda(format!("capturing the decode graph: {e}"));
        s.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .map_err(graph_error)?;
        let captured = (0..self.plan.program.steps.len())
            .try_for_each(|index| self.run_step(index, inputs))
            .and_then(|()| self.pick_on_device(inputs, true));
        // End the capture whatever happened, so the stream is usable again.
        let graph = s
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(graph_error)?;
        captured?;
        graph
            .map(DecodeGraph)
            .ok_or_else(|| RuntimeError::Cuda("the decode graph captured nothing".into()))
    }

    /// Launches every step, one by one (timing each with `FDRT_PROFILE`).
    fn run_steps(&mut self, inputs: &PassInputs) -> Result<(), RuntimeError> {
        let s = self.gpu.stream.clone();
        for index in 0..self.plan.program.steps.len() {
            // With no logits wanted (a middle prefill chunk) the head is skipped; the layers
            // still run, since they fill the KV cache.
            if inputs.r == 0 && writes_logit_rows(&self.plan.program.steps[index].launch) {
                continue;
            }
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
        self.pick_on_device(inputs, false)
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
        let launch = |f: &CudaFunction, config: LaunchConfig, args: &[Arg]| {
            // SAFETY: the arguments match the kernel's signature in `kernels/cuda/` (checked by
            // the GPU tests), and every pointer is a device allocation of this engine sized by
            // the plan's memory plan, bounds-checked by `act`. Every kernel of the module waits
            // for the kernels before it before touching activations (`fd_grid_wait`), which an
            // overlapped launch relies on.
            unsafe { launch_kernel(s, f, config, args, self.overlap_launches) }
                .map_err(|e| RuntimeError::Cuda(format!("step {index} ({}): {e}", step.kernel)))
        };
        let go = |i: usize, config: LaunchConfig, args: &[Arg]| -> Result<(), RuntimeError> {
            let f = functions.get(i).ok_or_else(|| {
                RuntimeError::InvalidPlan(format!("{} has no function", step.kernel))
            })?;
            launch(f, config, args)
        };
        let int = |v: u64| I(v as i32);
        // A pass of one token folds the norms the plan says into their matmuls.
        let fold = match &self.folds {
            Some(folds) if p.t == 1 => folds.roles.get(index),
            _ => None,
        };
        if let Some(folds::FoldRole::Norm) = fold {
            return Ok(());
        }
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
                let ((mut xp, mut xs), (o, os)) = (act(x)?, act(out)?);
                let bias = bias.as_ref().map_or(0u64, weight);
                let (n, t) = (out.cols as u32, rows(x));
                let quant = self.quant(w);
                // A8 and FP8: the activations onto their grid first (the step's first function),
                // then the matmul reads those, and each output row takes its row's scale.
                let mut row_scales = 0u64;
                if let Some(QuantArgs {
                    act: ActQuant::Int8PerToken | ActQuant::Fp8PerToken,
                    ..
                }) = quant
                {
                    let buffers = self.act_quant.as_ref().ok_or_else(|| {
                        RuntimeError::InvalidPlan(format!("step {index}: no activation buffer"))
                    })?;
                    if (t as usize) * (x.cols as usize) > buffers.q.len() {
                        return Err(RuntimeError::InvalidPlan(format!(
                            "step {index}: {t} rows of {} activations exceed their buffer",
                            x.cols
                        )));
                    }
                    let (qp, sp) = (ptr(&buffers.q, s), ptr(&buffers.scales, s));
                    go(
                        0,
                        grid(t, 1, 256),
                        &[P(xp), I(xs), int(x.cols), P(qp), P(sp)],
                    )?;
                    (xp, xs, row_scales) = (qp, x.cols as i32, sp);
                }
                // The last function serves a single token, the one before it several.
                let one = functions.len().saturating_sub(1);
                let row_kernel = if t == 1 { one } else { one.saturating_sub(1) };
                // From the plan's threshold on, the GEMM (`CudaDispatch`).
                let gemm_from = self.gemm_from.get(index).copied().flatten();
                let gemm = self
                    .gemm
                    .as_ref()
                    .filter(|_| gemm_from.is_some_and(|f| t >= f));
                if let Some(gemm) = gemm {
                    let args = GemmArgs {
                        x: xp,
                        x_stride: xs,
                        w: weight(w),
                        dtype: self.plan.manifest.weights[w.0 as usize].dtype,
                        k: x.cols as i32,
                        n: n as i32,
                        t: t as i32,
                        out: o,
                        out_stride: os,
                        bias,
                    };
                    match quant {
                        None => return gemm.run(s, &args),
                        Some(q) if gemm.dequantizes(&q) => {
                            if row_scales == 0 {
                                return gemm.run_quantized(s, &args, &q);
                            }
                            // The GEMM multiplies the grid values; the epilogue scales each row
                            // and adds the bias.
                            gemm.run_quantized(s, &GemmArgs { bias: 0, ..args }, &q)?;
                            let scale_rows =
                                &self.act_quant.as_ref().expect("checked above").scale_rows;
                            let epilogue = [P(o), I(os), I(n as i32), P(row_scales), P(bias)];
                            return launch(scale_rows, grid(n.div_ceil(256), t, 256), &epilogue);
                        }
                        Some(_) => {}
                    }
                }
                // Both row kernels take (x, weight, k, n), then the quantized one its scales,
                // then both (bias, t, out); a decode fold's kernel then the fold's arguments.
                let head = [P(xp), I(xs), P(weight(w)), int(x.cols), int(out.cols)];
                let mut tail = vec![P(bias), I(t as i32), P(o), I(os)];
                let fold_function = match fold {
                    Some(folds::FoldRole::Producer {
                        function,
                        norm,
                        partials,
                    }) => {
                        let Launch::AddRmsNorm {
                            x: residual,
                            w: norm_w,
                            sum_out,
                            normed_out,
                            ..
                        } = &self.plan.program.steps[*norm].launch
                        else {
                            return Err(RuntimeError::InvalidPlan(format!(
                                "step {index}: its fold's norm is not an add_rms_norm"
                            )));
                        };
                        tail.extend([
                            P(act(residual)?.0),
                            P(weight(norm_w)),
                            P(act(sum_out)?.0),
                            P(act(normed_out)?.0),
                            P(*partials),
                        ]);
                        Some(function)
                    }
                    Some(folds::FoldRole::Consumer {
                        function,
                        partials,
                        n_partials,
                        cols,
                        eps,
                    }) => {
                        tail.extend([P(*partials), I(*n_partials as i32), int(*cols), F(*eps)]);
                        Some(function)
                    }
                    _ => None,
                };
                let row_launch = |config: LaunchConfig, args: &[Arg]| match fold_function {
                    Some(f) => launch(f, config, args),
                    None => go(row_kernel, config, args),
                };
                if let Some(q) = quant {
                    let scales = [I(q.group), P(q.scales), P(q.mins), P(row_scales)];
                    let (rows, threads) = match (q.tiles, t) {
                        (false, _) => (QUANT_MATMUL_ROWS, QUANT_MATMUL_THREADS),
                        (true, 1) => (QUANT_TILE_ROWS, QUANT_TILE_THREADS_ONE),
                        (true, _) => (QUANT_TILE_ROWS, QUANT_TILE_THREADS),
                    };
                    let config = grid(n.div_ceil(rows), t.div_ceil(4), threads);
                    return row_launch(config, &[&head[..], &scales, &tail].concat());
                }
                let config = grid(
                    n.div_ceil(PLAIN_MATMUL_ROWS),
                    t.div_ceil(4),
                    PLAIN_MATMUL_THREADS,
                );
                row_launch(config, &[&head[..], &tail].concat())
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
                let (tables, offsets) = (P(p.tables), P(p.table_offsets));
                let block_size = I(self.options.block_size as i32);
                let t = p.t as u32;
                if *n_heads as usize * *head_dim as usize > self.partial_per_token {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "step {index}: attention wider than the model's heads"
                    )));
                }
                // Every kernel of attention takes the queries and the cache this way; each adds
                // what else it reads and where its results go.
                let queries = [
                    P(qp),
                    I(qs),
                    P(p.positions),
                    tables,
                    offsets,
                    block_size,
                    int(*n_heads),
                    int(*n_kv_heads),
                    F(*scale),
                    P(kc),
                    P(vc),
                    P(cos),
                    P(sin),
                    table_stride,
                ];
                if let (Some((decode, cluster)), true, true, None) = (
                    &self.decode_attention,
                    self.decode_attention_on,
                    p.one_per_sequence,
                    p.prefill_tiles,
                ) {
                    // A decode pass: the append, the chunks and their merge in one launch, a
                    // query's chunks in one cluster.
                    let chunks = self.attention_split.chunks(p.t).min(*cluster as usize) as u32;
                    let mut args = queries.to_vec();
                    args.extend([I(ATTENTION_MIN_CHUNK as i32), P(kp), I(ks), P(vp), I(vs)]);
                    args.extend([P(o), I(os)]);
                    let config = LaunchConfig {
                        grid_dim: (*n_heads as u32, t, chunks),
                        block_dim: (ATTENTION_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: as `launch` above; the grid's z is the cluster's size.
                    return unsafe {
                        launch_in_clusters(
                            s,
                            decode,
                            config,
                            &args,
                            self.overlap_launches,
                            Some(chunks),
                        )
                    }
                    .map_err(|e| {
                        RuntimeError::Cuda(format!("step {index} (decode attention): {e}"))
                    });
                }
                let append = [
                    P(kp),
                    I(ks),
                    P(vp),
                    I(vs),
                    P(p.positions),
                    tables,
                    offsets,
                    block_size,
                    int(*n_kv_heads),
                    P(cos),
                    P(sin),
                    table_stride,
                    P(kc),
                    P(vc),
                ];
                go(0, grid(*n_kv_heads as u32, t, *head_dim as u32), &append)?;
                if let (Some((tiles_at, tiles)), Some((prefill, tile_tokens))) =
                    (p.prefill_tiles, &self.prefill_attention)
                {
                    // The tiles were cut for the model's heads; a layer with other heads (or
                    // another head size) takes the split kernel.
                    let fits = *head_dim == self.plan.manifest.model.head_dim
                        && n_heads.is_multiple_of((*n_kv_heads).max(1))
                        && PREFILL_QUERY_ROWS / (*n_heads / (*n_kv_heads).max(1)).max(1) as usize
                            == *tile_tokens;
                    if fits {
                        let mut args = queries.to_vec();
                        args.extend([P(tiles_at), P(o), I(os)]);
                        let config = LaunchConfig {
                            grid_dim: (tiles as u32, *n_kv_heads as u32, 1),
                            block_dim: (PREFILL_THREADS, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // The tiles lie inside the pass's rows, each inside one chunk.
                        return launch(prefill, config, &args);
                    }
                }
                let partial = P(ptr(&self.partial, s));
                let chunks = self.attention_split.chunks(p.t);
                let mut attend = queries.to_vec();
                attend.extend([I(ATTENTION_MIN_CHUNK as i32), partial]);
                let config = LaunchConfig {
                    grid_dim: (*n_heads as u32, t, chunks as u32),
                    block_dim: (ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                go(1, config, &attend)?;
                let merge = [partial, int(*n_heads), I(chunks as i32), P(o), I(os)];
                go(2, grid(*n_heads as u32, t, 128), &merge)
            }
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
            } => {
                use kernels::cuda::{dtype_variant, MOE_ROUTE};
                let scratch = self.moe.as_ref().ok_or_else(|| {
                    RuntimeError::InvalidPlan(format!("step {index}: no room for its experts"))
                })?;
                let variant = |w: &artifacts::schema::WeightRef| {
                    dtype_variant(self.plan.manifest.weights[w.0 as usize].dtype).ok_or_else(|| {
                        RuntimeError::InvalidPlan(format!(
                            "step {index}: the CUDA experts take f32, bf16 or f16 weights"
                        ))
                    })
                };
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let inter = expert_inter(&self.plan.manifest.weights[gate_up.0 as usize], *experts);
                let k = *top_k as usize;
                if inter > scratch.inter
                    || k > scratch.top_k
                    || x.cols as usize > scratch.cols
                    || out.cols != x.cols
                {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "step {index}: experts wider than the plan's"
                    )));
                }
                let (kind, groups, top_groups) = match routing {
                    ir_types::MoeRouting::Softmax => (0, 0, 0),
                    ir_types::MoeRouting::Sigmoid => (1, 0, 0),
                    ir_types::MoeRouting::SigmoidGrouped { groups, top_groups } => {
                        (2, *groups as i32, *top_groups as i32)
                    }
                };
                let (ids, wts) = (ptr(&scratch.ids, s), ptr(&scratch.weights, s));
                let (h, a) = (ptr(&scratch.gate_up, s), ptr(&scratch.act, s));
                let route = [
                    P(xp),
                    I(xs),
                    int(x.cols),
                    P(weight(router)),
                    P(bias.as_ref().map_or(0, weight)),
                    int(*experts),
                    int(*top_k),
                    I(kind),
                    I(groups),
                    I(top_groups),
                    I(*normalize as i32),
                    F(*scaling),
                    P(ids),
                    P(wts),
                ];
                go(
                    MOE_ROUTE + variant(router)?,
                    grid(p.t as u32, 1, 256),
                    &route,
                )?;
                let picks = (p.t * k) as u32;
                let (c, gu) = (x.cols as i32, 2 * inter as i32);
                let ys = ptr(&scratch.sorted_out, s);
                // Passes of several tokens group their rows by expert (`moe_group`), gather them
                // in that order, and run the tile kernels on them; a single token's top_k picks
                // are distinct experts and keep the per-row kernels, as do quantized experts
                // below `MOE_QUANT_GROUP_FROM` rows per expert.
                let quant = self.quant(gate_up);
                let grouped = p.t > 1
                    && (quant.is_none()
                        || picks as usize
                            >= kernels::cuda::MOE_QUANT_GROUP_FROM * *experts as usize);
                let (order, slot) = (ptr(&scratch.order, s), ptr(&scratch.slot, s));
                let (tiles, n_tiles) = (ptr(&scratch.tiles, s), ptr(&scratch.n_tiles, s));
                let max_tiles = (picks as usize).div_ceil(kernels::cuda::MOE_TILE_ROWS)
                    + (*experts as usize).min(picks as usize);
                let xsorted = ptr(&scratch.sorted_in, s);
                let group_and_gather = |group: usize, gather: usize| -> Result<(), RuntimeError> {
                    let sort = [
                        P(ids),
                        I(picks as i32),
                        int(*experts),
                        P(order),
                        P(slot),
                        P(tiles),
                        P(n_tiles),
                    ];
                    go(group, grid(1, 1, 1024), &sort)?;
                    let args = [P(xp), I(xs), I(c), P(order), int(*top_k), P(xsorted)];
                    go(gather, cols_grid(x.cols, picks), &args)
                };
                let combine = |f: usize| {
                    let slot = if grouped { slot } else { 0 };
                    let args = [P(ys), I(c), P(slot), P(wts), int(*top_k), P(o), I(os)];
                    go(f, cols_grid(out.cols, p.t as u32), &args)
                };
                if let Some(q) = quant {
                    use kernels::cuda::{
                        MOE_QUANT_ACTIVATIONS, MOE_QUANT_COMBINE, MOE_QUANT_DOWN,
                        MOE_QUANT_GATE_UP, MOE_QUANT_GATHER, MOE_QUANT_GROUP, MOE_QUANT_SILU_MUL,
                        MOE_QUANT_TILE,
                    };
                    let q_down = self.quant(down).ok_or_else(|| {
                        RuntimeError::InvalidPlan(format!(
                            "step {index}: quantized gate-up experts with plain down experts"
                        ))
                    })?;
                    // A8 and FP8: rows onto their grid before each matmul (as `MatMul` does).
                    let grid_rows = match q.act {
                        ActQuant::None => None,
                        _ => Some(scratch.grid_rows.as_ref().ok_or_else(|| {
                            RuntimeError::InvalidPlan(format!(
                                "step {index}: no room for its activations"
                            ))
                        })?),
                    };
                    let on_grid = |rows: u32, x: u64, stride: i32, cols: i32, q: u64, sc: u64| {
                        let args = [P(x), I(stride), I(cols), P(q), P(sc)];
                        go(MOE_QUANT_ACTIVATIONS, grid(rows, 1, 256), &args)
                    };
                    // The gate-up's input: the token rows (per-row kernels) or the gathered rows
                    // (tiles), then on their grid.
                    let (mut gx, mut gxs, mut gx_rows) = (xp, xs, p.t as u32);
                    if grouped {
                        group_and_gather(MOE_QUANT_GROUP, MOE_QUANT_GATHER)?;
                        (gx, gxs, gx_rows) = (xsorted, c, picks);
                    }
                    let mut x_scales = 0u64;
                    if let Some(g) = grid_rows {
                        let (qx, sx) = (ptr(&g.x, s), ptr(&g.x_scales, s));
                        on_grid(gx_rows, gx, gxs, c, qx, sx)?;
                        (gx, gxs, x_scales) = (qx, c, sx);
                    }
                    let quant_args = |q: &QuantArgs, scales: u64| {
                        [I(q.group), P(q.scales), P(q.mins), P(scales)]
                    };
                    let up_panels = (gu as u32).div_ceil(QUANT_MATMUL_ROWS);
                    if grouped {
                        let head = [P(gx), I(c), P(weight(gate_up)), I(gu)];
                        let tail = [P(tiles), P(n_tiles), P(h)];
                        let args = [&head[..], &quant_args(&q, x_scales), &tail].concat();
                        let config = grid(up_panels, max_tiles as u32, QUANT_MATMUL_THREADS);
                        go(MOE_QUANT_TILE, config, &args)?;
                    } else {
                        let head = [P(gx), I(gxs), I(c), P(weight(gate_up)), I(inter as i32)];
                        let tail = [P(ids), int(*top_k), P(h)];
                        let args = [&head[..], &quant_args(&q, x_scales), &tail].concat();
                        let config = grid(up_panels, picks, QUANT_MATMUL_THREADS);
                        go(MOE_QUANT_GATE_UP, config, &args)?;
                    }
                    let silu = [P(h), I(gu), I(inter as i32), P(a), I(inter as i32)];
                    go(MOE_QUANT_SILU_MUL, cols_grid(inter as u64, picks), &silu)?;
                    let (mut ga, mut act_scales) = (a, 0u64);
                    if let Some(g) = grid_rows {
                        let (qa, sa) = (ptr(&g.act, s), ptr(&g.act_scales, s));
                        on_grid(picks, a, inter as i32, inter as i32, qa, sa)?;
                        (ga, act_scales) = (qa, sa);
                    }
                    let down_panels = (out.cols as u32).div_ceil(QUANT_MATMUL_ROWS);
                    if grouped {
                        let head = [P(ga), I(inter as i32), P(weight(down)), I(c)];
                        let tail = [P(tiles), P(n_tiles), P(ys)];
                        let args = [&head[..], &quant_args(&q_down, act_scales), &tail].concat();
                        let config = grid(down_panels, max_tiles as u32, QUANT_MATMUL_THREADS);
                        go(MOE_QUANT_TILE, config, &args)?;
                    } else {
                        let i = inter as i32;
                        let head = [P(ga), I(i), I(i), P(weight(down)), I(c)];
                        let tail = [P(ids), P(ys)];
                        let args = [&head[..], &quant_args(&q_down, act_scales), &tail].concat();
                        let config = grid(down_panels, picks, QUANT_MATMUL_THREADS);
                        go(MOE_QUANT_DOWN, config, &args)?;
                    }
                    return combine(MOE_QUANT_COMBINE);
                }
                use kernels::cuda::{
                    MOE_COMBINE, MOE_DOWN, MOE_GATE_UP, MOE_GATHER, MOE_GROUP, MOE_SILU_MUL,
                    MOE_TILE,
                };
                let rows_block = 32 * kernels::cuda::MOE_ROWS_PER_BLOCK;
                let up_blocks = (gu as u32).div_ceil(kernels::cuda::MOE_ROWS_PER_BLOCK);
                let down_blocks = (out.cols as u32).div_ceil(kernels::cuda::MOE_ROWS_PER_BLOCK);
                // out[pos, :] = input[pos, :] @ w(e)^T over each tile of expert e's rows.
                let tile =
                    |input: u64, k: i32, w: &artifacts::schema::WeightRef, rows: i32, out: u64| {
                        let args = [
                            P(input),
                            I(k),
                            P(weight(w)),
                            I(rows),
                            P(tiles),
                            P(n_tiles),
                            P(out),
                        ];
                        let blocks = (rows as u32).div_ceil(kernels::cuda::MOE_ROWS_PER_BLOCK);
                        let config = grid(blocks, max_tiles as u32, rows_block);
                        go(MOE_TILE + variant(w)?, config, &args)
                    };
                if grouped {
                    group_and_gather(MOE_GROUP, MOE_GATHER)?;
                    tile(xsorted, c, gate_up, gu, h)?;
                } else {
                    let up = [
                        P(xp),
                        I(xs),
                        I(c),
                        P(weight(gate_up)),
                        I(inter as i32),
                        P(ids),
                        int(*top_k),
                        P(h),
                    ];
                    go(
                        MOE_GATE_UP + variant(gate_up)?,
                        grid(up_blocks, picks, rows_block),
                        &up,
                    )?;
                }
                let silu = [P(h), I(gu), I(inter as i32), P(a), I(inter as i32)];
                go(MOE_SILU_MUL, cols_grid(inter as u64, picks), &silu)?;
                if grouped {
                    tile(a, inter as i32, down, c, ys)?;
                    return combine(MOE_COMBINE);
                }
                let down_args = [
                    P(a),
                    I(inter as i32),
                    P(weight(down)),
                    I(c),
                    P(ids),
                    P(wts),
                    int(*top_k),
                    P(o),
                    I(os),
                ];
                go(
                    MOE_DOWN + variant(down)?,
                    grid(down_blocks, p.t as u32, rows_block),
                    &down_args,
                )
            }
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
            } => {
                use kernels::cuda::{dtype_variant, MLA_ATTENTION};
                let ((qp, qs), (lp, ls), (rp, rs)) = (act(q)?, act(latent)?, act(k_rope)?);
                let (o, os) = act(out)?;
                let cache = self.k_cache.get(*layer as usize).ok_or_else(|| {
                    RuntimeError::InvalidPlan(format!("step {index}: no KV layer {layer}"))
                })?;
                let cache = ptr(cache, s);
                let dtype = self.plan.manifest.weights[kv_b.0 as usize].dtype;
                let variant = dtype_variant(dtype).ok_or_else(|| {
                    RuntimeError::InvalidPlan(format!(
                        "step {index}: kv_b must be f32, bf16 or f16, not {dtype}"
                    ))
                })?;
                let (tables, offsets) = (P(p.tables), P(p.table_offsets));
                let block_size = I(self.options.block_size as i32);
                let (cos, sin) = (P(ptr(&self.cos, s)), P(ptr(&self.sin, s)));
                let table_stride = int(self.plan.manifest.model.head_dim / 2);
                let interleaved = I(*rope_interleaved as i32);
                let append = [
                    P(lp),
                    I(ls),
                    P(rp),
                    I(rs),
                    P(p.positions),
                    tables,
                    offsets,
                    block_size,
                    int(*kv_lora),
                    int(*rope_dim),
                    cos,
                    sin,
                    table_stride,
                    interleaved,
                    P(cache),
                ];
                go(0, grid(p.t as u32, 1, 256), &append)?;
                let attend = [
                    P(qp),
                    I(qs),
                    P(p.positions),
                    tables,
                    offsets,
                    block_size,
                    int(*n_heads),
                    int(*nope_dim),
                    int(*rope_dim),
                    int(*v_dim),
                    int(*kv_lora),
                    F(*scale),
                    interleaved,
                    cos,
                    sin,
                    table_stride,
                    P(weight(kv_b)),
                    P(cache),
                    P(o),
                    I(os),
                ];
                let config = grid(*n_heads as u32, p.t as u32, 128);
                go(MLA_ATTENTION + variant, config, &attend)
            }
            Launch::GatherRows { x, out } => {
                let ((xp, xs), (o, os)) = (act(x)?, act(out)?);
                let args = [P(xp), I(xs), P(p.logit_rows), int(x.cols), P(o), I(os)];
                go(0, grid(p.r as u32, 1, ROW_THREADS), &args)
            }
        }
    }

    /// Where a quantized weight's scales and minimums are on the device (None for a plain
    /// weight). The plan's check at load verified the offsets against the format.
    fn quant(&self, w: &artifacts::schema::WeightRef) -> Option<QuantArgs> {
        let q = self.plan.manifest.weights.get(w.0 as usize)?.quant?;
        let base = ptr(&self.weights[w.0 as usize], &self.gpu.stream);
        Some(QuantArgs {
            tiles: in_tiles(&self.plan, w),
            codes: q.codes,
            act: q.scheme.act_quant(),
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
#[derive(Clone, Copy, Debug)]
pub struct QuantArgs {
    pub codes: CodeFormat,
    /// How the matmul's activations are quantized first (A8, FP8), if at all.
    pub act: ActQuant,
    pub group: i32,
    pub scales: u64,
    /// 0 (a null pointer) for symmetric codes.
    pub mins: u64,
    /// Codes in the tile layout of the tensor-core matmul (`PlanLayout::QuantTiles`).
    pub tiles: bool,
}

/// Query rows (query heads x tokens) per block of the prefill attention (`PREFILL_QUERY_ROWS`
/// in `kernels/cuda/attention.cu`), and its threads (`PREFILL_LANES` per row).
pub const PREFILL_QUERY_ROWS: usize = 16;
pub const PREFILL_THREADS: u32 = 16 * 8;

/// Rows per block of the quantized matmul (`QPANEL` in `kernels/cuda/quant.cu`).
pub const QUANT_MATMUL_ROWS: u32 = 8;

/// Rows per block of the plain matmul (`MATMUL_WARPS` in `kernels/cuda/matmul.cu`, a warp per
/// row) and its threads.
const PLAIN_MATMUL_ROWS: u32 = 8;
const PLAIN_MATMUL_THREADS: u32 = 32 * PLAIN_MATMUL_ROWS;
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

/// The plan's `CudaDispatch`, or for a plan written before fdc recorded it, the rules fdc
/// applies (`kernels::cuda::gemm_from_tokens`, `PREFILL_ATTENTION_FROM_PERCENT`).
fn dispatch(plan: &LoadedPlan) -> Result<code_abi::CudaDispatch, RuntimeError> {
    let steps = &plan.program.steps;
    let Some(bytes) = plan.code_symbol(code_abi::CUDA_DISPATCH) else {
        return Ok(code_abi::CudaDispatch::for_program(
            &plan.program,
            &plan.manifest.weights,
            kernels::cuda::gemm_from_tokens,
            Some(kernels::cuda::PREFILL_ATTENTION_FROM_PERCENT),
        ));
    };
    let dispatch: code_abi::CudaDispatch =
        artifacts::codec::decode(code_abi::CUDA_DISPATCH, bytes)?;
    if dispatch.gemm_from_tokens.len() != steps.len() {
        return Err(RuntimeError::InvalidPlan(format!(
            "the CUDA dispatch table has {} entries for {} steps",
            dispatch.gemm_from_tokens.len(),
            steps.len()
        )));
    }
    Ok(dispatch)
}

/// Queues `f(args)` on `stream`. With `overlap`, as a programmatic dependent launch (sm90): the
/// kernel's blocks may be scheduled, and load their first weights, while the kernel before it
/// drains, then wait for it inside (`fd_grid_wait` in `kernels/cuda/common.cuh`). A decode step
/// is a few hundred short kernels, each of which otherwise starts only once the one before has
/// ended. cudarc's launch builder has no launch attributes, hence the driver call.
///
/// # Safety
/// `args` must match the kernel's parameters, with every address valid for what it reads and
/// writes; with `overlap`, the kernel must wait before touching anything an earlier kernel
/// writes or reads.
unsafe fn launch_kernel(
    stream: &CudaStream,
    f: &CudaFunction,
    config: LaunchConfig,
    args: &[Arg],
    overlap: bool,
) -> Result<(), cudarc::driver::DriverError> {
    launch_in_clusters(stream, f, config, args, overlap, None)
}

/// [`launch_kernel`], with the grid's blocks in clusters of `(1, 1, z)` when `cluster_z` is
/// given (sm90; the kernel's blocks of a cluster share their shared memory).
///
/// # Safety
/// As [`launch_kernel`]; with a cluster, the grid's z must be a multiple of it.
unsafe fn launch_in_clusters(
    stream: &CudaStream,
    f: &CudaFunction,
    config: LaunchConfig,
    args: &[Arg],
    overlap: bool,
    cluster_z: Option<u32>,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    stream.context().bind_to_thread()?;
    let mut params: Vec<*mut std::ffi::c_void> = args
        .iter()
        .map(|a| match a {
            Arg::P(v) => v as *const u64 as *mut std::ffi::c_void,
            Arg::I(v) => v as *const i32 as *mut std::ffi::c_void,
            Arg::F(v) => v as *const f32 as *mut std::ffi::c_void,
        })
        .collect();
    // SAFETY: an all-zero attribute is a valid (ignored) one; ids and values are set next.
    let mut attributes: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
    let mut count = 0;
    if overlap {
        let a = &mut attributes[count];
        a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        a.value.programmaticStreamSerializationAllowed = 1;
        count += 1;
    }
    if let Some(z) = cluster_z {
        let a = &mut attributes[count];
        a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        a.value.clusterDim.x = 1;
        a.value.clusterDim.y = 1;
        a.value.clusterDim.z = z;
        count += 1;
    }
    let launch = sys::CUlaunchConfig {
        gridDimX: config.grid_dim.0,
        gridDimY: config.grid_dim.1,
        gridDimZ: config.grid_dim.2,
        blockDimX: config.block_dim.0,
        blockDimY: config.block_dim.1,
        blockDimZ: config.block_dim.2,
        sharedMemBytes: config.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: attributes.as_mut_ptr(),
        numAttrs: count as u32,
    };
    // SAFETY: `params` points at the values of `args`, alive across the call (the driver
    // copies them before returning); the rest is the caller's contract.
    sys::cuLaunchKernelEx(
        &launch,
        f.cu_function(),
        params.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()
}

/// Where a pass's returned logits were copied back, and how many values.
enum Returned {
    Pinned(usize),
    Host(usize),
}

/// How many of a pass's copied-back logits are returned (`full_rows` rows of `cols`); when
/// `logits` also holds the greedy rows (no device picks), they are picked here into
/// `greedy_ids`.
fn pick_on_host(logits: &[f32], cols: usize, full_rows: usize, greedy_ids: &mut Vec<u32>) -> usize {
    let (full, greedy) = logits.split_at((full_rows * cols).min(logits.len()));
    greedy_ids.extend(greedy.chunks(cols).map(crate::sampler::argmax));
    full.len()
}

/// A pass's inputs on the device.
struct PassInputs {
    t: usize,
    r: usize,
    /// Logits rows returned; the rest of the `r` are greedy picks.
    full_rows: usize,
    ids: u64,
    positions: u64,
    /// Per token: where its sequence's block table starts in `tables`.
    table_offsets: u64,
    logit_rows: u64,
    tables: u64,
    /// Where the (first row, rows) tiles of prefill attention are, and how many; None: the
    /// split kernel takes the pass.
    prefill_tiles: Option<(u64, usize)>,
    /// Every token of the pass is its sequence's only one (a decode pass), so no token attends
    /// to another's new key: attention may append and attend in one launch.
    one_per_sequence: bool,
}

/// The device address of an allocation (the engine uses one stream, so no event is needed).
pub(crate) fn ptr<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
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
