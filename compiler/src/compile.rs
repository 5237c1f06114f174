//! `compile`: the whole of `fdc compile`, from a checkpoint path to a plan file.
//!
//! open checkpoint -> build graph -> rewrite passes -> select kernels -> plan memory ->
//! generate code -> schedule -> write manifest, program, tokenizer, code and weights (in the plan,
//! in part files beside it, or only the weights, as a snapshot for a live update).
//! Weights are read and converted a window at a time (in parallel within the window), so the
//! compiler never holds the whole model in memory.

use crate::codegen::{self, KernelSpec};
use crate::passes::quantize_weights::{self, GroupSize, QuantOptions, QuantPlan};
use crate::passes::{self, plan_memory, schedule, select_kernels, PassCtx, PassError};
use crate::quantize;
use crate::smooth::{self, Rescale};
use crate::targets::{self, CodeGen};
use crate::timing;
use artifacts::calibration::{Calibration, InputStats};
use artifacts::parts::{self, PartEntry, PartsWriter, SnapshotTag};
use artifacts::schema::WeightLayout as PlanLayout;
use artifacts::schema::{
    section, CodeSymbol, KvInfo, Manifest, MemoryPlan, ModelInfo, MtpProgram, Program, Provenance,
    QuantInfo, SourceInfo, TokenizerInfo, WeightInfo,
};
use artifacts::{codec, PlanError, PlanWriter, SectionKind};
use half::{bf16, f16};
use ir::{CodeFormat, DType, Graph, NodeId, Op, Target, ValueDef, ValueId, WeightExpr};
use kernels::cpu::quant::QuantBytes;
use kernels::cpu::{PackedLayout, QuantMatrix, WeightLayout};
use kernels::registry::KernelSource;
use models::{Checkpoint, ModelError, QuantBlocks, StoredType, TensorSource};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub target: Target,
    pub weight_dtype: DType,
    /// Quantization of matmul weights.
    pub quant: QuantOptions,
    /// Show a progress bar while weights are written.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("code generation: {0}")]
    Codegen(#[from] codegen::CodegenError),
    /// The GPU module (CUDA or DCU) could not be built.
    #[error("GPU module: {0}")]
    Cuda(String),
    #[error("weight {name}: {message}")]
    Weight { name: String, message: String },
    #[error("--dtype {0} is not a weight storage type; use f32, bf16 or f16")]
    BadDtype(DType),
    #[error("calibration statistics do not match the model: {0}")]
    Calibration(String),
}

/// Where the weights go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightOutput {
    /// Weight sections inside the plan file: one file to ship.
    InPlan,
    /// Part files `NAME.part{N}.fdw` beside `NAME.fdp`, each holding at most `part_size` bytes
    /// of weights (or one larger weight), listed with their checksums in the plan.
    Parts { part_size: u64 },
    /// Only the weights, as snapshot `tag` of the plan `NAME.fdp` would be:
    /// `NAME.tp{rank}.{id}.part{N}.fdw`, for a live update of a server running that plan.
    Snapshot { part_size: u64, tag: SnapshotTag },
}

/// What a compile produced, for the command line to report.
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub output: PathBuf,
    /// Bytes of the plan file (0 when only a snapshot was written).
    pub plan_bytes: u64,
    /// The weight part files written, if any.
    pub parts: Vec<PartEntry>,
    pub steps: usize,
    pub parameter_count: u64,
    pub generated_kernels: usize,
}

/// The graph after every rewrite, plus the checkpoint it came from.
pub struct Lowered {
    pub checkpoint: Checkpoint,
    pub graph: Graph,
}

/// Opens the checkpoint, builds its graph and runs the rewrite passes.
pub fn lower(input: &Path, ctx: &PassCtx) -> Result<Lowered, CompileError> {
    let checkpoint = {
        let _t = timing::scope("open_checkpoint");
        models::open(input)?
    };
    let name = model_name(input);
    let mut graph = {
        let _t = timing::scope("build_graph");
        models::arch::build_graph(&name, &checkpoint.config, &*checkpoint.tensors)?
    };
    passes::run_pipeline(&mut graph, ctx)?;
    Ok(Lowered { checkpoint, graph })
}

fn model_name(input: &Path) -> String {
    let stem = input
        .file_stem()
        .or_else(|| input.file_name())
        .map(|s| s.to_string_lossy().to_string());
    stem.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".to_string())
}

/// Compiles `input` into the single-file plan `output`.
pub fn compile(
    input: &Path,
    output: &Path,
    options: &CompileOptions,
) -> Result<CompileReport, CompileError> {
    compile_to(input, output, options, &WeightOutput::InPlan)
}

/// Compiles `input` into the plan `output`, writing the weights as `weights` says.
pub fn compile_to(
    input: &Path,
    output: &Path,
    options: &CompileOptions,
    weights_to: &WeightOutput,
) -> Result<CompileReport, CompileError> {
    if !matches!(options.weight_dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(CompileError::BadDtype(options.weight_dtype));
    }
    let ctx = PassCtx {
        target: options.target,
        weight_dtype: options.weight_dtype,
        quant: options.quant.clone(),
    };
    let Lowered { checkpoint, graph } = lower(input, &ctx)?;
    let quant_plan = {
        let _t = timing::scope("quantize_weights");
        let mut plan = quantize_weights::run(&graph, &ctx)?;
        adopt_checkpoint_blocks(&mut plan, &graph, &*checkpoint.tensors);
        plan
    };
    let calibrated = match &options.quant.calibration {
        Some(c) => calibrated_weights(&graph, &quant_plan, &c.0)?,
        None => vec![],
    };
    let rescale = match &options.quant.calibration {
        Some(c) if options.quant.smooth_alpha > 0.0 => {
            let _t = timing::scope("smooth");
            smooth::plan(
                &graph,
                &quant_plan,
                &c.0,
                options.quant.smooth_alpha,
                &|v| column_abs_max(&graph, v, &*checkpoint.tensors),
            )
        }
        _ => HashMap::new(),
    };
    let (launches, main_steps) = program_order(&graph)?;
    let selection = {
        let _t = timing::scope("select_kernels");
        select_kernels::run_quantized(&graph, &ctx, &quant_plan)?
    };
    let memory = {
        let _t = timing::scope("plan_memory");
        let constraints = plan_memory::Constraints {
            fold_norms_into_matmuls: targets::info(options.target).codegen.gpu_module(),
            hidden_input_from: main_steps,
        };
        plan_memory::run(&graph, &launches, constraints)?
    };
    let (mut code_bytes, mut code_symbols, code_index) = {
        let _t = timing::scope("codegen");
        generate_code(&graph, &launches, &selection, options.target)?
    };
    let weights = graph.weights();
    let weight_index: HashMap<ValueId, u32> = weights
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, i as u32))
        .collect();
    let program = {
        let _t = timing::scope("schedule");
        schedule::run(&schedule::ScheduleInput {
            graph: &graph,
            launches: &launches,
            selection: &selection,
            memory: &memory,
            weight_index: &weight_index,
            code_index: &code_index,
        })?
    };
    let (program, mtp) = split_mtp(program, main_steps, &graph, &memory)?;
    let layouts = weight_layouts(&graph, &weights, options.target, &quant_plan);
    let tiles = quant_tiles(&graph, &weights, options, &quant_plan);
    let weight_infos: Vec<WeightInfo> = weights
        .iter()
        .zip(&layouts)
        .zip(&tiles)
        .map(|((&v, &layout), &tiled)| WeightInfo {
            name: weight_name(&graph, v).to_string(),
            dtype: match quant_plan.get(&v) {
                Some(_) => DType::U8,
                None => graph.ty(v).dtype,
            },
            shape: graph
                .ty(v)
                .shape
                .0
                .iter()
                .map(|d| d.as_const().unwrap_or(0) as u64)
                .collect(),
            layout: match layout {
                _ if tiled => PlanLayout::QuantTiles,
                WeightLayout::RowMajor => PlanLayout::RowMajor,
                WeightLayout::Panels(p) => PlanLayout::Panels {
                    panel: p.panel() as u32,
                },
            },
            quant: match (quant_plan.get(&v), layout) {
                (Some(q), WeightLayout::Panels(p)) => {
                    let (rows, cols) = matrix_dims(graph.ty(v));
                    let parts = QuantBytes::of(&q.format, p, rows, cols);
                    Some(QuantInfo {
                        scheme: q.scheme,
                        codes: q.format.codes,
                        group: q.format.group as u64,
                        asymmetric: q.format.asymmetric,
                        scales_offset: parts.scales_offset as u64,
                        mins_offset: parts.mins_offset as u64,
                        from_checkpoint: q.from_checkpoint,
                    })
                }
                _ => None,
            },
        })
        .collect();
    if targets::info(options.target).codegen.gpu_module() {
        // Which kernel serves each step at which pass size, and which norms one-token passes
        // fold into their matmuls, after the module in the code section.
        let records = [
            (
                artifacts::code_abi::CUDA_DISPATCH,
                codec::encode(&cuda_dispatch(&program, &weight_infos))?,
            ),
            (
                artifacts::code_abi::CUDA_DECODE_FOLDS,
                codec::encode(&cuda_decode_folds(&program))?,
            ),
        ];
        for (name, bytes) in records {
            code_symbols.push(CodeSymbol {
                name: name.to_string(),
                offset: code_bytes.len() as u64,
                len: bytes.len() as u64,
            });
            code_bytes.extend_from_slice(&bytes);
        }
    }
    let parameter_count = weight_infos
        .iter()
        .map(|w| w.shape.iter().product::<u64>())
        .sum();
    let mut manifest = build_manifest(
        &checkpoint,
        &graph,
        options,
        weight_infos,
        &memory,
        code_symbols,
        parameter_count,
    );
    if let Some(c) = &options.quant.calibration {
        // Which weights GPTQ quantized, by name: the plan format has no field for it, and the
        // provenance is where `fdc inspect` looks (`inspect::CALIBRATED_OPTION`).
        let o = &mut manifest.provenance.options;
        o.push(format!(
            "calibration={} tokens, text blake3 {}",
            c.0.tokens, c.0.text_blake3
        ));
        if !rescale.is_empty() {
            o.push(format!(
                "smooth_alpha={} ({} weights smoothed)",
                options.quant.smooth_alpha,
                rescale.values().filter(|r| r.cols.is_some()).count()
            ));
        }
        o.extend(calibrated.iter().map(|&v| {
            format!(
                "{}{}",
                crate::inspect::CALIBRATED_OPTION,
                weight_name(&graph, v)
            )
        }));
    }

    let _t = timing::scope("write_plan");
    let plan_name = model_name(output);
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let part_plan = |part_size: u64, tag: Option<SnapshotTag>| {
        PartsWriter::plan(
            &manifest.model.name,
            tag.clone(),
            &manifest.weights,
            part_size,
            dir,
            |index| match &tag {
                Some(tag) => parts::snapshot_part_file(&plan_name, tag, index),
                None => parts::plan_part_file(&plan_name, index),
            },
        )
    };
    let weight_source = WeightSource {
        graph: &graph,
        weights: &weights,
        layouts: &layouts,
        tiles: &tiles,
        quant: &quant_plan,
        quant_options: &options.quant,
        calibrated: &calibrated,
        rescale: &rescale,
        tensors: &*checkpoint.tensors,
        progress: options.progress,
    };
    let mut report = CompileReport {
        output: output.to_path_buf(),
        plan_bytes: 0,
        parts: vec![],
        steps: program.steps.len(),
        parameter_count,
        generated_kernels: match targets::info(manifest.target).codegen {
            CodeGen::Cranelift(_) => manifest.code.len(),
            CodeGen::Nvrtc(_) | CodeGen::Hipcc(_) => 0,
        },
    };
    if let WeightOutput::Snapshot { part_size, tag } = weights_to {
        let mut parts = PartsWriter::new(part_plan(*part_size, Some(tag.clone()))?);
        weight_source.write(&mut |name, bytes| Ok(parts.add_weight(name, bytes)?))?;
        report.parts = parts.finish()?.parts;
        return Ok(report);
    }
    let mut writer = PlanWriter::create(output)?;
    writer.add_section(
        section::MANIFEST,
        SectionKind::Manifest,
        &codec::encode(&manifest)?,
    )?;
    writer.add_section(
        section::PROGRAM,
        SectionKind::Program,
        &codec::encode(&program)?,
    )?;
    if let Some(tok) = &checkpoint.tokenizer {
        writer.add_section(
            section::TOKENIZER,
            SectionKind::Tokenizer,
            tok.tokenizer_json.as_bytes(),
        )?;
    }
    writer.add_section(section::CODE, SectionKind::Code, &code_bytes)?;
    if let Some(mtp) = &mtp {
        writer.add_section(section::MTP, SectionKind::Program, &codec::encode(mtp)?)?;
    }
    match weights_to {
        WeightOutput::Parts { part_size } => {
            let mut parts = PartsWriter::new(part_plan(*part_size, None)?);
            weight_source.write(&mut |name, bytes| Ok(parts.add_weight(name, bytes)?))?;
            let table = parts.finish()?;
            writer.add_section(
                parts::PARTS_SECTION,
                SectionKind::Other,
                &codec::encode(&table)?,
            )?;
            report.parts = table.parts;
        }
        _ => weight_source.write(&mut |name, bytes| {
            Ok(writer.add_section(&section::weight(name), SectionKind::Weights, bytes)?)
        })?,
    }
    report.plan_bytes = writer.finish()?.file_len;
    Ok(report)
}

/// The launch order: the main model's nodes, then those of its multi-token-prediction module
/// (the nodes only the module's outputs need), each in topological order without the views; and
/// how many launches are the main model's.
fn program_order(graph: &Graph) -> Result<(Vec<NodeId>, usize), CompileError> {
    let topo = graph.topo_order();
    let mut main = vec![false; topo.iter().map(|n| n.0 as usize + 1).max().unwrap_or(0)];
    let order: Vec<NodeId> = topo
        .into_iter()
        .filter(|&n| !matches!(graph.node(n).op, Op::Split { .. }))
        .collect();
    let mut stack: Vec<ValueId> = graph
        .outputs()
        .iter()
        .filter(|(name, _)| name != ir::OUTPUT_MTP_HIDDEN && name != ir::OUTPUT_MTP_LOGITS)
        .map(|(_, v)| *v)
        .collect();
    while let Some(v) = stack.pop() {
        if let ValueDef::Node { node, .. } = graph.value(v).def {
            if !std::mem::replace(&mut main[node.0 as usize], true) {
                stack.extend(graph.node(node).inputs.iter().copied());
            }
        }
    }
    let (mut launches, module): (Vec<NodeId>, Vec<NodeId>) =
        order.into_iter().partition(|n| main[n.0 as usize]);
    // A pass of the module runs only its own steps: a value of the model's would be stale.
    let reads_the_model = module.iter().any(|&n| {
        graph.node(n).inputs.iter().any(
            |&v| matches!(graph.value(v).def, ValueDef::Node { node, .. } if main[node.0 as usize]),
        )
    });
    if reads_the_model {
        return Err(CompileError::Pass(PassError::Failed {
            pass: "schedule",
            message: "the multi-token-prediction module reads a value of the model's program"
                .into(),
        }));
    }
    let main_steps = launches.len();
    launches.extend(module);
    Ok((launches, main_steps))
}

/// Splits the steps of the multi-token-prediction module (from `main_steps` on) off the
/// program, with where its hidden states are; `None` for a model without one.
fn split_mtp(
    mut program: Program,
    main_steps: usize,
    graph: &Graph,
    memory: &plan_memory::MemoryPlan,
) -> Result<(Program, Option<MtpProgram>), CompileError> {
    if main_steps == program.steps.len() {
        return Ok((program, None));
    }
    let missing = |what: &str| {
        CompileError::Pass(passes::PassError::Failed {
            pass: "schedule",
            message: format!("the multi-token-prediction module has no {what}"),
        })
    };
    let output = |name: &str| {
        graph
            .outputs()
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| memory.locations.get(v).copied())
            .ok_or_else(|| missing(name))
    };
    let hidden_in = graph
        .input(ir::InputKind::Hidden)
        .and_then(|v| memory.locations.get(&v).copied())
        .ok_or_else(|| missing("hidden input"))?;
    let steps = program.steps.split_off(main_steps);
    let mtp = MtpProgram {
        program: Program {
            steps,
            logits_cols: program.logits_cols,
        },
        main_hidden: output(ir::OUTPUT_HIDDEN)?,
        hidden_in,
        hidden_out: output(ir::OUTPUT_MTP_HIDDEN)?,
    };
    Ok((program, Some(mtp)))
}

fn weight_name(graph: &Graph, v: ValueId) -> &str {
    match &graph.value(v).def {
        ValueDef::Weight { name, .. } => name,
        _ => "",
    }
}

fn build_manifest(
    checkpoint: &Checkpoint,
    graph: &Graph,
    options: &CompileOptions,
    weights: Vec<WeightInfo>,
    memory: &plan_memory::MemoryPlan,
    code: Vec<CodeSymbol>,
    parameter_count: u64,
) -> Manifest {
    let cfg = &checkpoint.config;
    // Per token and layer: keys and values of every kv head, or one latent row (MLA).
    let (kv_heads, kv_width, kv_pools) = match &cfg.mla {
        Some(mla) => (1, mla.kv_lora_rank + mla.qk_rope_head_dim, 1),
        None => (cfg.num_key_value_heads, cfg.head_dim, 2),
    };
    // Every attention op has a slot: the model's layers and its prediction module's.
    let kv_layers = graph
        .topo_order()
        .into_iter()
        .filter_map(|n| match graph.node(n).op {
            Op::Attention { layer, .. } | Op::MlaAttention { layer, .. } => Some(layer + 1),
            _ => None,
        })
        .max()
        .unwrap_or(cfg.num_hidden_layers);
    let kv_bytes = kv_pools * kv_layers * kv_heads * kv_width * DType::F32.size_bytes();
    Manifest {
        model: ModelInfo {
            name: graph.name.clone(),
            architecture: cfg.architecture.name().to_string(),
            source_architecture: cfg.source_architecture.clone(),
            vocab_size: cfg.vocab_size as u64,
            hidden_size: cfg.hidden_size as u64,
            num_layers: cfg.num_hidden_layers as u64,
            num_heads: cfg.num_attention_heads as u64,
            num_kv_heads: cfg.num_key_value_heads as u64,
            head_dim: cfg.head_dim as u64,
            max_position_embeddings: cfg.max_position_embeddings as u64,
            parameter_count,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
        },
        target: options.target,
        weight_dtype: options.weight_dtype,
        weights,
        tokenizer: checkpoint.tokenizer.as_ref().map(|t| TokenizerInfo {
            chat_template: t.chat_template.clone(),
            bos_token: t.bos_token.clone(),
            eos_token: t.eos_token.clone(),
        }),
        kv: KvInfo {
            num_layers: kv_layers as u64,
            num_kv_heads: kv_heads as u64,
            head_dim: kv_width as u64,
            dtype: DType::F32,
            bytes_per_token: kv_bytes as u64,
        },
        rope_inv_freq: graph
            .constant("rope_inv_freq")
            .map(|c| c.values.clone())
            .unwrap_or_default(),
        memory: MemoryPlan {
            arena_cols: memory.arena_cols,
            unplanned_cols: memory.unplanned_cols,
            buffers: memory.buffers.clone(),
        },
        code,
        provenance: Provenance {
            compiler_version: env!("CARGO_PKG_VERSION").to_string(),
            sources: checkpoint
                .sources
                .iter()
                .map(|s| SourceInfo {
                    name: s.name.clone(),
                    bytes: s.bytes,
                    blake3: s.blake3.clone(),
                })
                .collect(),
            options: {
                let q = &options.quant;
                let mut o = vec![
                    format!("target={}", options.target),
                    format!("dtype={}", options.weight_dtype),
                    format!("quant={}", q.scheme),
                ];
                if let Some(g) = q.group {
                    o.push(match g {
                        GroupSize::Channel => "group_size=channel".to_string(),
                        GroupSize::Elements(n) => format!("group_size={n}"),
                    });
                }
                if let Some(a) = q.asymmetric {
                    o.push(format!("asymmetric={a}"));
                }
                if q.round_to_nearest {
                    o.push("quant_method=rtn".to_string());
                }
                if q.tiles {
                    o.push("quant_tiles=true".to_string());
                }
                for (pattern, scheme) in &q.overrides {
                    o.push(format!("quant_override={pattern}={scheme}"));
                }
                o
            },
        },
    }
}

/// The generator's spec for a node, from its op and operand shapes.
fn kernel_spec(graph: &Graph, node: NodeId) -> Option<KernelSpec> {
    let data = graph.node(node);
    let cols = |v: ValueId| graph.ty(v).shape.last_const().unwrap_or(0);
    Some(match data.op {
        Op::RmsNorm { eps, group } => KernelSpec::RmsNorm {
            cols: cols(data.inputs[0]),
            group,
            eps,
        },
        Op::AddRmsNorm { eps } => KernelSpec::AddRmsNorm {
            cols: cols(data.inputs[0]),
            eps,
        },
        Op::SiluMul => KernelSpec::SiluMul {
            cols: cols(data.outputs[0]),
        },
        Op::Rope { n_heads, head_dim } => KernelSpec::Rope { n_heads, head_dim },
        _ => return None,
    })
}

type CodeLayout = (Vec<u8>, Vec<CodeSymbol>, HashMap<NodeId, u32>);

/// Generates one function per distinct spec among the nodes that selected a generated kernel,
/// laid out back to back at `ENTRY_ALIGN` boundaries.
fn generate_code(
    graph: &Graph,
    launches: &[NodeId],
    selection: &select_kernels::Selection,
    target: Target,
) -> Result<CodeLayout, CompileError> {
    let isa = match targets::info(target).codegen {
        CodeGen::Cranelift(isa) => isa,
        CodeGen::Nvrtc(arch) => return gpu_module(graph, GpuArch::Cuda(arch)),
        CodeGen::Hipcc(arch) => return gpu_module(graph, GpuArch::Dcu(arch)),
    };
    let mut bytes = vec![];
    let mut symbols: Vec<CodeSymbol> = vec![];
    let mut specs: Vec<KernelSpec> = vec![];
    let mut index = HashMap::new();
    for &node in launches {
        if selection.get(&node).map(|e| e.source) != Some(KernelSource::Generated) {
            continue;
        }
        let spec = kernel_spec(graph, node).ok_or_else(|| PassError::Failed {
            pass: "codegen",
            message: format!("{node} selected a generated kernel the generator cannot build"),
        })?;
        let at = match specs.iter().position(|s| *s == spec) {
            Some(i) => i,
            None => {
                let code = codegen::generate(&spec, isa)?;
                while bytes.len() % artifacts::code_abi::ENTRY_ALIGN != 0 {
                    bytes.push(0xcc); // int3: padding that traps if ever executed
                }
                symbols.push(CodeSymbol {
                    name: codegen::symbol_name(&spec, isa),
                    offset: bytes.len() as u64,
                    len: code.bytes.len() as u64,
                });
                bytes.extend_from_slice(&code.bytes);
                specs.push(spec);
                specs.len() - 1
            }
        };
        index.insert(node, at as u32);
    }
    Ok((bytes, symbols, index))
}

/// The GPU module of a plan: `kernels::cuda`'s sources specialized to the model's head
/// dimension, compiled by NVRTC (CUDA) or a HIP compiler (DCU). A CUDA plan's code section
/// holds the cubin, then the PTX, named by [`artifacts::code_abi::CUDA_CUBIN`] and
/// [`artifacts::code_abi::CUDA_PTX`]; a DCU plan's holds the code object
/// ([`artifacts::code_abi::DCU_CODE_OBJECT`]). No step refers to them by index, since every
/// kernel lives in the one module.
fn gpu_module(graph: &Graph, arch: GpuArch) -> Result<CodeLayout, CompileError> {
    let mut head_dims = graph
        .topo_order()
        .into_iter()
        .filter_map(|n| match graph.node(n).op {
            Op::Attention { head_dim, .. } => Some(head_dim),
            _ => None,
        });
    // A model without attention still gets a module; its attention kernel is never launched.
    let head_dim = head_dims.next().unwrap_or(32);
    if let Some(other) = head_dims.find(|&d| d != head_dim) {
        return Err(CompileError::Cuda(format!(
            "attention layers with head dimensions {head_dim} and {other}: one module is built \
             per head dimension"
        )));
    }
    let spec = kernels::cuda::ModuleSpec {
        head_dim: head_dim as u32,
    };
    spec.check().map_err(CompileError::Cuda)?;
    let (bytes, symbols) = match arch {
        GpuArch::Cuda(arch) => {
            let module = codegen::cuda::compile(&kernels::cuda::module_source(&spec), arch)
                .map_err(|e| CompileError::Cuda(e.to_string()))?;
            let symbols = vec![
                CodeSymbol {
                    name: artifacts::code_abi::CUDA_CUBIN.to_string(),
                    offset: 0,
                    len: module.cubin.len() as u64,
                },
                CodeSymbol {
                    name: artifacts::code_abi::CUDA_PTX.to_string(),
                    offset: module.cubin.len() as u64,
                    len: module.ptx.len() as u64,
                },
            ];
            let mut bytes = module.cubin.clone();
            bytes.extend_from_slice(&module.ptx);
            (bytes, symbols)
        }
        GpuArch::Dcu(arch) => {
            let module = codegen::hip::compile(&kernels::cuda::hip_module_source(&spec), arch)
                .map_err(|e| CompileError::Cuda(e.to_string()))?;
            let symbols = vec![CodeSymbol {
                name: artifacts::code_abi::DCU_CODE_OBJECT.to_string(),
                offset: 0,
                len: module.code_object.len() as u64,
            }];
            (module.code_object.clone(), symbols)
        }
    };
    Ok((bytes, symbols, HashMap::new()))
}

/// The GPU architecture a plan's one module is compiled for.
#[derive(Clone, Copy)]
enum GpuArch {
    Cuda(ir::CudaArch),
    Dcu(ir::HipArch),
}

/// The pass sizes from which a CUDA plan's matmuls run as tensor-core GEMMs (by the weight's
/// stored type: `kernels::cuda::gemm_from_tokens`), and the share of prompt tokens from which
/// attention takes its tiled prefill kernel; every other step keeps its kernel.
fn cuda_dispatch(
    program: &artifacts::schema::Program,
    weights: &[WeightInfo],
) -> artifacts::code_abi::CudaDispatch {
    artifacts::code_abi::CudaDispatch::for_program(
        program,
        weights,
        kernels::cuda::gemm_from_tokens,
        Some(kernels::cuda::PREFILL_ATTENTION_FROM_PERCENT),
    )
}

/// The add-and-RMS-norms a CUDA plan's one-token passes do inside the matmuls around them:
/// wherever the program allows it and the matmuls' kernels have fold variants.
fn cuda_decode_folds(program: &artifacts::schema::Program) -> artifacts::code_abi::CudaDecodeFolds {
    artifacts::code_abi::CudaDecodeFolds::for_program(program, |step| {
        kernels::registry::by_name(&step.kernel)
            .and_then(kernels::cuda::fold_functions)
            .is_some()
    })
}

/// Reads a weight expression as f32, in the order its parts are concatenated.
fn materialize(expr: &WeightExpr, tensors: &dyn TensorSource) -> Result<Vec<f32>, ModelError> {
    match expr {
        WeightExpr::Tensor(name) => tensors.load_f32(name),
        WeightExpr::ConcatRows(parts) | WeightExpr::Stack(parts) => {
            let mut out = vec![];
            for p in parts {
                out.extend(materialize(p, tensors)?);
            }
            Ok(out)
        }
        WeightExpr::Deinterleave {
            part,
            head_dim,
            cols,
        } => {
            let data = materialize(part, tensors)?;
            Ok(deinterleave_rows(&data, *head_dim, *cols))
        }
        WeightExpr::ScaleRows {
            part,
            period,
            start,
            len,
            cols,
            factor,
        } => {
            let mut data = materialize(part, tensors)?;
            // Rows past the block (a malformed expression) are left alone rather than indexed.
            let rows = (*start..(start + len).min(*period)).map(|r| r * cols);
            if *period > 0 && *cols > 0 {
                for block in data.chunks_exact_mut(period * cols) {
                    for r in rows.clone() {
                        for x in &mut block[r..r + cols] {
                            *x = (f64::from(*x) * factor) as f32;
                        }
                    }
                }
            }
            Ok(data)
        }
        WeightExpr::Columns {
            part,
            start,
            len,
            cols,
        } => {
            let data = materialize(part, tensors)?;
            if *cols == 0 || start + len > *cols {
                return Err(ModelError::GraphBuild {
                    message: format!("columns {start}..{} of rows of {cols}", start + len),
                });
            }
            Ok(data
                .chunks_exact(*cols)
                .flat_map(|row| &row[*start..start + len])
                .copied()
                .collect())
        }
    }
}

/// Within each head of `head_dim` rows of `cols` values: rows `0, 2, 4, ...`, then `1, 3, 5, ...`
/// (see `WeightExpr::Deinterleave`). The builder checked the shape against whole heads; data
/// that is not whole heads of an even `head_dim` is returned unchanged.
fn deinterleave_rows(data: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let head = head_dim * cols;
    if !head_dim.is_multiple_of(2) || head == 0 || !data.len().is_multiple_of(head) {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    for h in data.chunks_exact(head) {
        for parity in [0, 1] {
            for pair in 0..head_dim / 2 {
                out.extend_from_slice(&h[(2 * pair + parity) * cols..][..cols]);
            }
        }
    }
    out
}

/// The layout each weight is written in, by position in `weights`.
///
/// A matrix read by matmuls is stored in the panels of the target's matmul micro-kernel, so the
/// runtime never repacks and every pass sums in the same order (see `kernels::cpu::matmul`).
/// A table also read by an embedding (tied input and output embeddings) is packed too: the
/// embedding gathers its rows from the panels, at a stride, which costs microseconds per token,
/// where a second, row-major copy would cost the whole table again (SmolLM2-135M: 49152 x 576,
/// 113 MB in f32, 57 MB in bf16, a fifth of the plan). Quantized weights are always in panels
/// (stacked experts too: each expert's rows are whole panels, see `quantize_weights`). Weights
/// with any other reader (plain experts of a mixture, vectors) stay row-major.
fn weight_layouts(
    graph: &Graph,
    weights: &[ValueId],
    target: Target,
    quant_plan: &QuantPlan,
) -> Vec<WeightLayout> {
    let CodeGen::Cranelift(isa) = targets::info(target).codegen else {
        // The GPU kernels (CUDA and DCU) read plain weights row-major, coalesced along K, and
        // quantized ones in the CPU's panels of 8 rows: a warp's 16-byte load then holds codes
        // of 8 rows that share the activations it loads (kernels/cuda/quant.cu).
        let quantized = WeightLayout::Panels(PackedLayout::CUDA_QUANT);
        return weights
            .iter()
            .map(|v| {
                if quant_plan.contains_key(v) {
                    quantized
                } else {
                    WeightLayout::RowMajor
                }
            })
            .collect();
    };
    let panels = WeightLayout::Panels(PackedLayout::for_isa(isa));
    weights
        .iter()
        .map(|&v| {
            // Quantized weights are always packed (stacked experts included).
            if quant_plan.contains_key(&v) {
                return panels;
            }
            let users = graph.users(v);
            let by_matmul = |n: NodeId| reads_as_matmul_weight(graph, n, v);
            let by_embedding = |n: NodeId| {
                let node = graph.node(n);
                matches!(node.op, Op::Embedding) && node.inputs.first() == Some(&v)
            };
            let matrix = graph.ty(v).shape.0.len() == 2;
            if matrix
                && users.iter().any(|&n| by_matmul(n))
                && users.iter().all(|&n| by_matmul(n) || by_embedding(n))
            {
                panels
            } else {
                WeightLayout::RowMajor
            }
        })
        .collect()
}

/// Whether node `n` is a matmul reading `v` as its weight, and in no other role.
fn reads_as_matmul_weight(graph: &Graph, n: NodeId, v: ValueId) -> bool {
    let node = graph.node(n);
    matches!(node.op, Op::MatMul)
        && node.inputs.get(1) == Some(&v)
        && node.inputs.iter().filter(|&&i| i == v).count() == 1
}

/// Per weight, whether a plan stores it in the tile layout of the CUDA tensor-core matmul
/// (`PlanLayout::QuantTiles`): with `--quant-tiles` on a target whose table has the layout, for
/// quantized matrices that only matmuls read (as their weight) and that fit the tiles
/// (`kernels::cuda::tiles_fit`).
fn quant_tiles(
    graph: &Graph,
    weights: &[ValueId],
    options: &CompileOptions,
    quant_plan: &QuantPlan,
) -> Vec<bool> {
    let enabled = options.quant.tiles && targets::info(options.target).quant_tiles;
    weights
        .iter()
        .map(|&v| {
            let Some(q) = quant_plan.get(&v).filter(|_| enabled) else {
                return false;
            };
            let users = graph.users(v);
            let only_matmuls =
                !users.is_empty() && users.iter().all(|&n| reads_as_matmul_weight(graph, n, v));
            let ty = graph.ty(v);
            let (rows, cols) = matrix_dims(ty);
            only_matmuls
                && ty.shape.0.len() == 2
                && kernels::cuda::tiles_fit(q.scheme, &q.format, rows, cols)
        })
        .collect()
}

/// The section bytes of a weight: `values` (row-major `[rows, cols]`) converted to `dtype`, then
/// laid out in `layout`.
fn encode_weight(
    values: &[f32],
    dtype: DType,
    layout: WeightLayout,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, kernels::KernelError> {
    fn arrange<T: Copy + Default>(
        v: Vec<T>,
        layout: WeightLayout,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<T>, kernels::KernelError> {
        match layout {
            WeightLayout::RowMajor => Ok(v),
            WeightLayout::Panels(p) => p.pack(&v, rows, cols),
        }
    }
    Ok(match dtype {
        DType::BF16 => {
            let v = values.iter().map(|&x| bf16::from_f32(x)).collect();
            let v = arrange(v, layout, rows, cols)?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::F16 => {
            let v = values.iter().map(|&x| f16::from_f32(x)).collect();
            let v = arrange(v, layout, rows, cols)?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => {
            let v = arrange(values.to_vec(), layout, rows, cols)?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    })
}

/// Everything needed to produce the weights' section bytes.
struct WeightSource<'a> {
    graph: &'a Graph,
    weights: &'a [ValueId],
    layouts: &'a [WeightLayout],
    /// Per weight, whether its codes go into the tile layout (`quant_tiles`).
    tiles: &'a [bool],
    /// Weights stored quantized, and how.
    quant: &'a QuantPlan,
    quant_options: &'a QuantOptions,
    /// Weights quantized by GPTQ with the statistics in `quant_options.calibration`.
    calibrated: &'a [ValueId],
    /// Weights rescaled by activation smoothing.
    rescale: &'a HashMap<ValueId, Rescale>,
    tensors: &'a dyn TensorSource,
    progress: bool,
}

/// Receives each weight's section bytes, in plan order.
type WeightSink<'s> = dyn FnMut(&str, &[u8]) -> Result<(), CompileError> + 's;

impl WeightSource<'_> {
    /// Weights converted per window in parallel, handed to `sink` in order (the plan stays
    /// deterministic).
    fn write(&self, sink: &mut WeightSink<'_>) -> Result<(), CompileError> {
        const WINDOW: usize = 16;
        let (graph, tensors) = (self.graph, self.tensors);
        let bar = if self.progress {
            let bar = indicatif::ProgressBar::new(self.weights.len() as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} weights ({elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message("writing weights");
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let windows = self.weights.chunks(WINDOW).zip(self.layouts.chunks(WINDOW));
        for ((window, layouts), tiles) in windows.zip(self.tiles.chunks(WINDOW)) {
            let encoded: Vec<Result<(String, Vec<u8>), CompileError>> =
                window
                    .par_iter()
                    .zip(layouts)
                    .zip(tiles)
                    .map(|((&v, &layout), &tiled)| {
                        let ValueDef::Weight { name, expr } = &graph.value(v).def else {
                            unreachable!("graph.weights() returns weights only")
                        };
                        let ty = graph.ty(v);
                        if let (Some(q), WeightLayout::Panels(p)) = (self.quant.get(&v), layout) {
                            let stats = match &self.quant_options.calibration {
                                Some(c) if self.calibrated.contains(&v) => c.0.input(name),
                                _ => None,
                            };
                            let mut bytes = encode_quantized(
                                name,
                                expr,
                                ty,
                                q,
                                p,
                                tensors,
                                self.quant_options,
                                stats,
                                self.rescale.get(&v),
                            )?;
                            if tiled {
                                // The codes (4 bits, before the scales) move into tiles.
                                let (rows, cols) = matrix_dims(ty);
                                let codes = &mut bytes[..rows * cols / 2];
                                let moved = kernels::cuda::tiles_from_panels(codes, rows, cols);
                                codes.copy_from_slice(&moved);
                            }
                            return Ok((name.clone(), bytes));
                        }
                        let mut values = materialize(expr, tensors)?;
                        if let Some(r) = self.rescale.get(&v) {
                            let cols = ty.shape.last_const().unwrap_or(values.len());
                            r.apply(&mut values, cols);
                        }
                        let expected = ty.shape.const_elements().unwrap_or(0);
                        if values.len() != expected {
                            return Err(CompileError::Weight {
                                name: name.clone(),
                                message: format!(
                                    "has {} values, its type {ty} needs {expected}",
                                    values.len()
                                ),
                            });
                        }
                        let dims = &ty.shape.0;
                        let dim = |i: usize| dims.get(i).and_then(|d| d.as_const()).unwrap_or(1);
                        let bytes = encode_weight(&values, ty.dtype, layout, dim(0), dim(1))
                            .map_err(|e| CompileError::Weight {
                                name: name.clone(),
                                message: e.to_string(),
                            })?;
                        Ok((name.clone(), bytes))
                    })
                    .collect();
            for item in encoded {
                let (name, bytes) = item?;
                sink(&name, &bytes)?;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// The blocks of the checkpoint that a scheme of `bits`-bit integer codes can take over as they
/// are: GGUF Q8_0 for 8 bits, Q4_0 and Q4_1 for 4 bits.
fn passes_through(stored: StoredType, codes: CodeFormat) -> bool {
    matches!(
        (stored, codes),
        (StoredType::Q8_0, CodeFormat::Int(8))
            | (StoredType::Q4_0 | StoredType::Q4_1, CodeFormat::Int(4))
    )
}

/// The tensors a weight expression reads, if it is one tensor or rows of tensors concatenated.
fn row_parts(expr: &WeightExpr) -> Option<Vec<&str>> {
    match expr {
        WeightExpr::Tensor(name) => Some(vec![name.as_str()]),
        WeightExpr::ConcatRows(parts) => parts
            .iter()
            .map(|p| match p {
                WeightExpr::Tensor(name) => Some(name.as_str()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Switches every quantized weight whose checkpoint tensors are all GGUF blocks of its code width
/// (and one symmetry) to those blocks' own format: group 32, symmetric for Q8_0 and Q4_0,
/// asymmetric for Q4_1. Their codes and scales are then copied, not re-quantized. A weight planned
/// in groups other than 32 (`--group-size`; tables keep their scheme's default, see
/// `quantize_weights`) keeps the compiler's own quantization.
fn adopt_checkpoint_blocks(plan: &mut QuantPlan, graph: &Graph, tensors: &dyn TensorSource) {
    for (v, q) in plan.iter_mut() {
        if q.format.group != 32 {
            continue;
        }
        let ValueDef::Weight { expr, .. } = &graph.value(*v).def else {
            continue;
        };
        let Some(parts) = row_parts(expr) else {
            continue;
        };
        let stored: Option<Vec<StoredType>> = parts
            .iter()
            .map(|name| tensors.info(name).map(|i| i.stored))
            .collect();
        let Some(stored) = stored else { continue };
        if stored
            .iter()
            .all(|&s| s == stored[0] && passes_through(s, q.format.codes))
        {
            q.format.group = 32;
            q.format.asymmetric = stored[0] == StoredType::Q4_1;
            q.from_checkpoint = true;
        }
    }
}

/// `max |W[:, j]|` per column of the matrix weight `v` (None if it cannot be read).
fn column_abs_max(graph: &Graph, v: ValueId, tensors: &dyn TensorSource) -> Option<Vec<f32>> {
    let ValueDef::Weight { expr, .. } = &graph.value(v).def else {
        return None;
    };
    let cols = graph.ty(v).shape.last_const()?;
    let values = materialize(expr, tensors).ok()?;
    let mut max = vec![0f32; cols];
    for row in values.chunks_exact(cols) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x.abs());
        }
    }
    Some(max)
}

/// The weights quantized by GPTQ: those the compiler quantizes itself (not copied from the
/// checkpoint) that `calibration` has statistics for, in graph order. Every entry of the file
/// must name a matrix of this model with its K: statistics of another model (or of a graph
/// fused differently) are refused rather than half used.
fn calibrated_weights(
    graph: &Graph,
    plan: &QuantPlan,
    calibration: &Calibration,
) -> Result<Vec<ValueId>, CompileError> {
    let weights = graph.weights();
    for input in &calibration.inputs {
        let Some(&v) = weights
            .iter()
            .find(|&&v| weight_name(graph, v) == input.weight)
        else {
            return Err(CompileError::Calibration(format!(
                "the file (from model {}) has statistics for weight {}, which {} does not have; run fdrt calibrate on the unquantized plan of this model",
                calibration.model, input.weight, graph.name
            )));
        };
        let dims = &graph.ty(v).shape.0;
        let k = dims.get(1).and_then(|d| d.as_const());
        if dims.len() != 2 || k != Some(input.k as usize) {
            return Err(CompileError::Calibration(format!(
                "weight {} has shape {}, the statistics are for K = {}",
                input.weight,
                graph.ty(v),
                input.k
            )));
        }
    }
    Ok(weights
        .into_iter()
        .filter(|v| plan.get(v).is_some_and(|q| !q.from_checkpoint))
        .filter(|&v| calibration.input(weight_name(graph, v)).is_some())
        .collect())
}

/// A quantized weight's `[rows, cols]` as the kernels see it: stacked experts `[E, R, K]` are
/// one `[E * R, K]` matrix.
fn matrix_dims(ty: &ir::TensorType) -> (usize, usize) {
    let dims: Vec<usize> = ty
        .shape
        .0
        .iter()
        .map(|d| d.as_const().unwrap_or(0))
        .collect();
    match dims.split_last() {
        Some((&cols, rest)) if !rest.is_empty() => (rest.iter().product(), cols),
        _ => (0, 0),
    }
}

/// The section bytes of a quantized weight: packed codes, f16 scales, f16 minimums. With
/// `stats`, the weight is quantized by GPTQ.
#[allow(clippy::too_many_arguments)]
fn encode_quantized(
    name: &str,
    expr: &WeightExpr,
    ty: &ir::TensorType,
    q: &quantize_weights::WeightQuant,
    layout: PackedLayout,
    tensors: &dyn TensorSource,
    options: &QuantOptions,
    stats: Option<&InputStats>,
    rescale: Option<&Rescale>,
) -> Result<Vec<u8>, CompileError> {
    let (rows, cols) = matrix_dims(ty);
    let bad = |message: String| CompileError::Weight {
        name: name.to_string(),
        message,
    };
    let matrix = if q.from_checkpoint {
        let mut blocks: Vec<QuantBlocks> = vec![];
        for part in row_parts(expr).unwrap_or_default() {
            blocks.push(
                tensors
                    .load_blocks(part)?
                    .ok_or_else(|| bad(format!("tensor {part} has no quantized blocks")))?,
            );
        }
        let mut m = QuantMatrix {
            format: q.format,
            rows: 0,
            cols,
            codes: vec![],
            scales: vec![],
            mins: vec![],
        };
        for b in blocks {
            // Q8_0 codes are stored offset by 128, as the symmetric 8-bit format reads them.
            m.rows += b.rows;
            m.codes.extend(b.codes);
            m.scales.extend(b.scales);
            m.mins.extend(b.mins);
        }
        if m.rows != rows {
            return Err(bad(format!(
                "blocks hold {} rows, the weight has {rows}",
                m.rows
            )));
        }
        m
    } else {
        let mut values = materialize(expr, tensors)?;
        if let Some(r) = rescale {
            r.apply(&mut values, cols);
        }
        if values.len() != rows * cols {
            return Err(bad(format!(
                "has {} values, [{rows}, {cols}] needs {}",
                values.len(),
                rows * cols
            )));
        }
        let method = if options.round_to_nearest {
            quantize::Method::RoundToNearest
        } else {
            quantize::Method::Fitted
        };
        match stats {
            Some(stats) => {
                let mut gram = stats.gram();
                if let Some(r) = rescale {
                    r.smooth_gram(&mut gram);
                }
                crate::gptq::quantize(&values, rows, cols, q.format, method, &gram).map_err(bad)?
            }
            None => quantize::quantize(&values, rows, cols, q.format, method),
        }
    };
    let packed = matrix.pack(layout).map_err(|e| bad(e.to_string()))?;
    Ok(QuantBytes::of(&q.format, layout, rows, cols).write(&packed))
}
