//! Loading a plan: map the file, decode manifest and program, check that this machine can run
//! it, and check every reference in the program (weights, buffers, kernels, code) before the
//! first step, so a bad plan fails at load with a message and never inside a kernel. Where the
//! weights live (the plan file, its part files, a snapshot after a live update) is `weights`.

use crate::code::CodeImage;
use crate::error::RuntimeError;
use crate::weights::{kernel_layout, WeightStore};
use artifacts::parts::{PartsTable, PARTS_SECTION};
use artifacts::schema::{
    self, section, Act, Buffer, Launch, Manifest, MtpProgram, Program, Rows, WeightInfo, WeightRef,
};
use artifacts::{codec, PlanFile};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use ir_types::{ActQuant, DType, OpKind, Target};
use kernels::cpu::{Experts, QuantFormat, QuantWeight, Weight, WeightData, WeightLayout};
use kernels::registry::{self, KernelSource};
use std::path::Path;
use std::sync::Arc;

/// A loaded, checked plan. Weights stay in the mapped files; nothing is copied.
/// The format version from which a CUDA plan's quantized matmuls take the rows' activation
/// scales (`matmul_q*` / `matmul_e4m3` in `kernels/cuda/quant.cu`).
const CUDA_QUANT_ARGS_VERSION: u32 = 8;

pub struct LoadedPlan {
    file: Arc<PlanFile>,
    pub manifest: Manifest,
    pub program: Program,
    /// The multi-token-prediction module's program, when the model has one (section `mtp`).
    pub mtp: Option<MtpProgram>,
    pub code: CodeImage,
    weights: WeightStore,
}

impl LoadedPlan {
    /// Drops the plan's and its weight files' resident pages from this process (see
    /// [`WeightStore::release_resident`]).
    pub fn release_resident(&self) -> Result<(), RuntimeError> {
        self.file.release_resident()?;
        self.weights.release_resident()
    }

    /// The bytes of a code symbol of the plan's code section (a CUDA plan's module), if both
    /// exist and the symbol lies inside the section.
    pub fn code_symbol(&self, name: &str) -> Option<&[u8]> {
        let sym = self.manifest.code.iter().find(|s| s.name == name)?;
        let bytes = self.file.section(section::CODE)?;
        let start = usize::try_from(sym.offset).ok()?;
        let end = start.checked_add(usize::try_from(sym.len).ok()?)?;
        bytes.get(start..end)
    }

    /// A hash naming this plan's contents (the checksum of every section: program, code and
    /// weights), so that caches keyed by it are never shared between two plans.
    pub fn identity(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for section in self.file.sections() {
            hasher.update(section.name.as_bytes());
            hasher.update(&[0]);
            hasher.update(section.checksum.as_bytes());
            hasher.update(&[0]);
        }
        *hasher.finalize().as_bytes()
    }

    /// Loads a plan: its part files when it has a parts table (one part at a time, see
    /// `weights`), otherwise the weight sections of the plan file itself (format version 2
    /// plans, and plans compiled without `--part-size`).
    pub fn load(path: &Path) -> Result<LoadedPlan, RuntimeError> {
        let file = Arc::new(PlanFile::open(path)?);
        let manifest: Manifest = schema::decode_manifest(
            file.require_section(section::MANIFEST)?,
            file.format_version(),
        )?;
        let program: Program =
            codec::decode(section::PROGRAM, file.require_section(section::PROGRAM)?)?;
        let mtp: Option<MtpProgram> = file
            .section(section::MTP)
            .map(|bytes| codec::decode(section::MTP, bytes))
            .transpose()?;
        let code = match manifest.target {
            Target::Cpu(isa) => {
                let machine = kernels::cpu::detected_isa();
                if isa > machine {
                    return Err(RuntimeError::UnsupportedTarget {
                        plan_target: manifest.target.name(),
                        machine: machine.name().to_string(),
                    });
                }
                // `open` verified every section; the copy that becomes executable is checked
                // again.
                match (
                    file.section(section::CODE),
                    file.section_checksum(section::CODE),
                ) {
                    (Some(bytes), Some(checksum)) => CodeImage::load_checked(bytes, &checksum)?,
                    _ => CodeImage::load(&[])?,
                }
            }
            // A DCU plan's code section is its GPU code object, never mapped here; no engine
            // of this fdrt runs it yet (`RuntimeError::DcuPlan`), but the plan is checked.
            Target::Dcu(_) => CodeImage::load(&[])?,
            // A CUDA plan's code section is its GPU module ([`LoadedPlan::cuda_cubin`]), never
            // mapped executable here.
            Target::Cuda(_) => {
                // Format 8 gave the quantized CUDA matmuls another argument (the rows'
                // activation scales): an older module's matmuls would read the wrong ones.
                let quantized = manifest.weights.iter().any(|w| w.quant.is_some());
                if quantized && file.format_version() < CUDA_QUANT_ARGS_VERSION {
                    return Err(RuntimeError::InvalidPlan(format!(
                        "this CUDA plan with quantized weights was written in format {} by an \
                         older fdc, whose quantized kernels take other arguments: recompile it \
                         with this release's fdc",
                        file.format_version()
                    )));
                }
                CodeImage::load(&[])?
            }
        };
        let weights = match file.section(PARTS_SECTION) {
            Some(bytes) => {
                let table: PartsTable = codec::decode(PARTS_SECTION, bytes)?;
                WeightStore::load_parts(path, &table, &manifest)?
            }
            None => WeightStore::in_plan(file.clone(), &manifest)?,
        };
        let plan = LoadedPlan {
            file,
            manifest,
            program,
            mtp,
            code,
            weights,
        };
        plan.check()?;
        Ok(plan)
    }

    pub fn tokenizer_json(&self) -> Option<&str> {
        self.file
            .section(section::TOKENIZER)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Where the weights in service live.
    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    /// Puts `weights` in service and returns the previous ones. The caller checked them
    /// against this plan's manifest (`WeightStore::load_snapshot` does).
    pub fn replace_weights(&mut self, weights: WeightStore) -> WeightStore {
        std::mem::replace(&mut self.weights, weights)
    }

    /// The section bytes of weight `w`, as the plan stores them.
    pub fn weight_bytes(&self, w: WeightRef) -> &[u8] {
        // Present and sized: checked at load.
        self.weights.bytes(w.0 as usize)
    }
    /// A matrix weight `[N, K]` (or a vector `[N]` as `[N, 1]`), in its storage type.
    pub fn weight(&self, w: WeightRef) -> Weight<'_> {
        let info = &self.manifest.weights[w.0 as usize];
        let rows = info.shape.first().copied().unwrap_or(0) as usize;
        let cols = info.shape.get(1).copied().unwrap_or(1) as usize;
        let bytes = self.weight_bytes(w);
        // Alignment and length were checked at load; an empty slice here cannot happen.
        let data = match info.dtype {
            DType::BF16 => WeightData::BF16(
                artifacts::cast_u16(bytes)
                    .unwrap_or(&[])
                    .reinterpret_cast::<bf16>(),
            ),
            DType::F16 => WeightData::F16(
                artifacts::cast_u16(bytes)
                    .unwrap_or(&[])
                    .reinterpret_cast::<f16>(),
            ),
            _ => WeightData::F32(artifacts::cast_f32(bytes).unwrap_or(&[])),
        };
        // A panel width the kernels cannot read was refused at load.
        let layout = kernel_layout(info).unwrap_or(WeightLayout::RowMajor);
        Weight {
            data,
            rows,
            cols,
            layout,
        }
    }

    /// A quantized matrix weight, None for a plain one. Its format, size and alignment were
    /// checked at load.
    pub fn quant_weight(&self, w: WeightRef) -> Option<QuantWeight<'_>> {
        let info = &self.manifest.weights[w.0 as usize];
        quant_view(info, self.weight_bytes(w)).ok().flatten()
    }

    /// A stacked weight `[E, N, K]` (mixture-of-experts experts) seen as one `[E * N, K]`
    /// matrix, plain (row-major, in its storage type) or quantized (with its scheme's activation
    /// handling); expert `e` is rows `e * N..(e + 1) * N`.
    pub fn experts(&self, w: WeightRef) -> Experts<'_> {
        let info = &self.manifest.weights[w.0 as usize];
        if let Some(q) = self.quant_weight(w) {
            let act = info.quant.map_or(ActQuant::None, |q| q.scheme.act_quant());
            return Experts::Quant(q, act);
        }
        let cols = info.shape.last().copied().unwrap_or(1) as usize;
        let rows = info.shape.iter().rev().skip(1).product::<u64>() as usize;
        let mut weight = self.weight(w);
        weight.rows = rows;
        weight.cols = cols;
        Experts::Plain(weight)
    }

    /// An f32 vector weight (norm weight, bias).
    pub fn vector(&self, w: WeightRef) -> &[f32] {
        artifacts::cast_f32(self.weight_bytes(w)).unwrap_or(&[])
    }

    fn check(&self) -> Result<(), RuntimeError> {
        let bad = |msg: String| Err(RuntimeError::InvalidPlan(msg));
        let m = &self.manifest;
        // A GPU plan's module is not mapped as code; its symbols index the section itself.
        let code_len = match m.target {
            Target::Cpu(_) => self.code.len() as u64,
            Target::Cuda(_) | Target::Dcu(_) => self
                .file
                .section(section::CODE)
                .map_or(0, |b| b.len() as u64),
        };
        for sym in &m.code {
            if sym
                .offset
                .checked_add(sym.len)
                .is_none_or(|end| end > code_len)
            {
                return bad(format!(
                    "code symbol {} lies outside the code section",
                    sym.name
                ));
            }
        }
        let head = m.model.head_dim as usize;
        if m.rope_inv_freq.len() * 2 != head {
            return bad(format!(
                "rope table has {} frequencies for head_dim {head}",
                m.rope_inv_freq.len()
            ));
        }
        for (i, step) in self.program.steps.iter().enumerate() {
            self.check_step(i, &step.kernel, step.code, &step.launch)
                .or_else(|msg| bad(format!("step {i} ({}): {msg}", step.kernel)))?;
        }
        if let Some(mtp) = &self.mtp {
            for (i, step) in mtp.program.steps.iter().enumerate() {
                self.check_step(i, &step.kernel, step.code, &step.launch)
                    .or_else(|msg| bad(format!("mtp step {i} ({}): {msg}", step.kernel)))?;
            }
            if mtp.program.logits_cols != self.program.logits_cols {
                return bad("the mtp program's logits are not the model's vocabulary".into());
            }
            let hidden = m.model.hidden_size;
            for (name, a) in [
                ("main_hidden", &mtp.main_hidden),
                ("hidden_in", &mtp.hidden_in),
                ("hidden_out", &mtp.hidden_out),
            ] {
                let arena = matches!(a.buffer, Buffer::Arena { .. });
                if !arena || a.rows != Rows::Tokens || a.cols != hidden {
                    return bad(format!(
                        "mtp {name} is not [tokens, {hidden}] in the arena: {a:?}"
                    ));
                }
                self.check_act(a)
                    .or_else(|msg| bad(format!("mtp {name}: {msg}")))?;
            }
        }
        Ok(())
    }

    /// A view lies inside its buffer, and its buffer inside the arena or the logits.
    fn check_act(&self, a: &Act) -> Result<(), String> {
        let arena = self.manifest.memory.arena_cols;
        let logits = self.program.logits_cols;
        if a.col + a.cols > a.stride {
            return Err(format!(
                "view of {} columns at {} exceeds its {}-wide buffer",
                a.cols, a.col, a.stride
            ));
        }
        match a.buffer {
            Buffer::Arena { offset_cols } if offset_cols + a.stride <= arena => Ok(()),
            Buffer::Logits if a.stride == logits => Ok(()),
            _ => Err(format!(
                "buffer {:?} of width {} is outside the arena ({arena}) or logits ({logits})",
                a.buffer, a.stride
            )),
        }
    }

    fn check_step(
        &self,
        _index: usize,
        kernel: &str,
        code: Option<u32>,
        launch: &Launch,
    ) -> Result<(), String> {
        let entry = registry::by_name(kernel).ok_or_else(|| format!("unknown kernel {kernel}"))?;
        if entry.key.op != launch_kind(launch) {
            return Err(format!(
                "kernel {kernel} does not implement {}",
                launch_kind(launch)
            ));
        }
        match (entry.source, code) {
            (KernelSource::Generated, Some(c)) if (c as usize) < self.manifest.code.len() => {}
            (KernelSource::Generated, _) => return Err("generated kernel without code".into()),
            (KernelSource::Library, None) => {}
            (KernelSource::Library, Some(_)) => return Err("library kernel with code".into()),
            (KernelSource::Cuda, None) if matches!(self.manifest.target, Target::Cuda(_)) => {}
            (KernelSource::Cuda, _) => return Err("CUDA kernel outside a CUDA plan".into()),
            (KernelSource::Hip, None) if matches!(self.manifest.target, Target::Dcu(_)) => {}
            (KernelSource::Hip, _) => return Err("DCU kernel outside a DCU plan".into()),
        }
        let weights = self.manifest.weights.len();
        let weight_ok = |w: &WeightRef| -> Result<(), String> {
            if (w.0 as usize) < weights {
                Ok(())
            } else {
                Err(format!("weight index {} out of range", w.0))
            }
        };
        let (reads, writes, used) = launch.operands();
        for a in reads.iter().chain(writes.iter()) {
            self.check_act(a)?;
        }
        for w in &used {
            weight_ok(w)?;
        }
        // A matmul, embedding or experts kernel must be the one for its weights' scheme.
        let keyed: &[&WeightRef] = match launch {
            Launch::MatMul { w, .. } => &[w],
            Launch::Embedding { table, .. } => &[table],
            Launch::Moe { gate_up, down, .. } => &[gate_up, down],
            _ => &[],
        };
        for w in keyed {
            let scheme = self.manifest.weights[w.0 as usize]
                .quant
                .map_or(ir_types::QuantScheme::None, |q| q.scheme);
            if entry.key.quant != scheme {
                return Err(format!(
                    "kernel {kernel} is for {} weights, its weight is {scheme}",
                    entry.key.quant
                ));
            }
        }
        // The executor hands out an input and an output view of one arena at once: they must
        // not overlap, for any T. Per-token column ranges decide it.
        for o in &writes {
            for r in &reads {
                if o.overlaps(r) {
                    return Err("an output overlaps an input".into());
                }
            }
        }
        if writes.len() == 2 && writes[0].overlaps(&writes[1]) {
            return Err("the two outputs overlap".into());
        }
        Ok(())
    }
}

/// The kernels' view of a quantized weight (None for a plain one): u8 codes in panels of a
/// width the kernels read, a format they read, a section of the right size and alignment.
pub(crate) fn quant_view<'a>(
    info: &WeightInfo,
    bytes: &'a [u8],
) -> Result<Option<QuantWeight<'a>>, String> {
    let Some(q) = &info.quant else {
        return Ok(None);
    };
    let layout = match kernel_layout(info)? {
        WeightLayout::Panels(p) if info.dtype == DType::U8 => p,
        _ => return Err("quantized weights must be u8 codes in panels".into()),
    };
    let format = QuantFormat {
        codes: q.codes,
        group: q.group as usize,
        asymmetric: q.asymmetric,
    };
    // Stacked experts `[E, R, K]` are one `[E * R, K]` matrix.
    let (rows, cols) = match info.shape.split_last() {
        Some((&cols, rest)) if !rest.is_empty() => {
            let rows = rest
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or("its shape overflows")?;
            (rows as usize, cols as usize)
        }
        _ => return Err(format!("a quantized weight of shape {:?}", info.shape)),
    };
    let view =
        QuantWeight::from_bytes(format, layout, rows, cols, bytes).map_err(|e| e.to_string())?;
    let parts = kernels::cpu::quant::QuantBytes::of(&format, layout, rows, cols);
    if (parts.scales_offset as u64, parts.mins_offset as u64) != (q.scales_offset, q.mins_offset) {
        return Err("scale offsets disagree with the format".into());
    }
    Ok(Some(view))
}

pub fn launch_kind(launch: &Launch) -> OpKind {
    match launch {
        Launch::Embedding { .. } => OpKind::Embedding,
        Launch::RmsNorm { .. } => OpKind::RmsNorm,
        Launch::AddRmsNorm { .. } => OpKind::AddRmsNorm,
        Launch::MatMul { .. } => OpKind::MatMul,
        Launch::Add { .. } => OpKind::Add,
        Launch::Mul { .. } => OpKind::Mul,
        Launch::Silu { .. } => OpKind::Silu,
        Launch::SiluMul { .. } => OpKind::SiluMul,
        Launch::Rope { .. } => OpKind::Rope,
        Launch::Attention { .. } | Launch::AttentionRope { .. } => OpKind::Attention,
        Launch::GatherRows { .. } => OpKind::GatherRows,
        Launch::Moe { .. } => OpKind::Moe,
        Launch::MlaAttention { .. } => OpKind::MlaAttention,
    }
}
