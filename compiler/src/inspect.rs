//! `fdc inspect PLAN`: a human-readable account of a plan: model, target, dtype, parameter
//! count, bytes per section kind, the kernels the program launches, the memory plan and
//! provenance, and the part files of a plan in parts; given a weight part file (`.fdw`), which plan
//! or snapshot it belongs to and its weights. Reading a plan verifies its checksums, so
//! inspecting also checks integrity; part files are checked against the plan's parts table by
//! length and table checksum (their sections are verified when the runtime loads them).

use artifacts::parts::{weight_section_len, PartHeader, PartsTable, PARTS_SECTION, PART_SECTION};
use artifacts::schema::{section, Launch, Manifest, Program};
use artifacts::{codec, PlanError, PlanFile};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// Provenance option prefix naming a weight quantized by GPTQ (`gptq=NAME`): the plan format
/// has no per-weight field for it.
pub const CALIBRATED_OPTION: &str = "gptq=";

/// KV pool sizes `inspect` always reports how many tokens fit in: a small edge device, a
/// mid-size card, an 80 GB accelerator.
const KV_SIZES: [u64; 3] = [1 << 30, 16 << 30, 80 << 30];

/// A code symbol of a GPU plan decoded (the dispatch table, the decode folds), if it has one.
fn code_record<T: serde::de::DeserializeOwned>(
    plan: &PlanFile,
    manifest: &Manifest,
    name: &str,
) -> Result<Option<T>, PlanError> {
    match code_bytes(plan, manifest, name)? {
        Some(bytes) => codec::decode(name, bytes).map(Some),
        None => Ok(None),
    }
}

/// The bytes of the code symbol `name`, if the plan has one.
fn code_bytes<'p>(
    plan: &'p PlanFile,
    manifest: &Manifest,
    name: &str,
) -> Result<Option<&'p [u8]>, PlanError> {
    let Some(sym) = manifest.code.iter().find(|s| s.name == name) else {
        return Ok(None);
    };
    plan.section(section::CODE)
        .and_then(|code| code.get(sym.offset as usize..(sym.offset + sym.len) as usize))
        .map(Some)
        .ok_or_else(|| PlanError::Decode {
            section: name.to_string(),
            message: "the symbol lies outside the code section".into(),
        })
}

/// The account of the plan at `path`; `kv_memory` adds sizes to the KV-fit line.
pub fn inspect(path: &Path, kv_memory: &[u64]) -> Result<String, PlanError> {
    let plan = PlanFile::open(path)?;
    if let Some(bytes) = plan.section(PART_SECTION) {
        return Ok(describe_part_file(
            &plan,
            &codec::decode(PART_SECTION, bytes)?,
        ));
    }
    let manifest: Manifest = artifacts::schema::decode_manifest(
        plan.require_section(section::MANIFEST)?,
        plan.format_version(),
    )?;
    let program: Program =
        codec::decode(section::PROGRAM, plan.require_section(section::PROGRAM)?)?;
    let m = &manifest.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan        {} ({} bytes, checksums ok)",
        path.display(),
        plan.file_len()
    );
    let _ = writeln!(
        out,
        "model       {} ({}, from {})",
        m.name, m.architecture, m.source_architecture
    );
    let _ = writeln!(
        out,
        "shape       {} layers, hidden {}, heads {}/{} kv, head_dim {}, vocab {}, max positions {}",
        m.num_layers,
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.vocab_size,
        m.max_position_embeddings
    );
    let _ = writeln!(
        out,
        "parameters  {} ({:.1} M)",
        m.parameter_count,
        m.parameter_count as f64 / 1e6
    );
    let _ = writeln!(out, "target      {}", manifest.target);
    let _ = writeln!(
        out,
        "dtype       {} (matmul and embedding weights; norms and biases f32)",
        manifest.weight_dtype
    );
    let kv = &manifest.kv;
    let kv_shape = if program.has_latent_kv() {
        format!(
            "{} layers x latent {} (MLA: no per-head K or V), {}",
            kv.num_layers, kv.head_dim, kv.dtype
        )
    } else {
        format!(
            "{} layers x {} kv heads x {} x 2, {}",
            kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.dtype
        )
    };
    let _ = writeln!(
        out,
        "kv cache    {} bytes per token ({kv_shape})",
        kv.bytes_per_token
    );
    let _ = writeln!(
        out,
        "kv fits     {}",
        kv_fit_line(
            manifest.kv.bytes_per_token,
            m.max_position_embeddings as u64,
            kv_memory
        )
    );
    let tok = match &manifest.tokenizer {
        Some(t) => format!(
            "yes (chat template: {}, bos {:?}, eos {:?})",
            if t.chat_template.is_some() {
                "yes"
            } else {
                "no"
            },
            t.bos_token.as_deref().unwrap_or("-"),
            t.eos_token.as_deref().unwrap_or("-")
        ),
        None => "none (token ids only)".to_string(),
    };
    let _ = writeln!(out, "tokenizer   {tok}");

    let _ = writeln!(out, "\nsections");
    let mut by_kind: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for s in plan.sections() {
        let e = by_kind.entry(s.kind.name().to_string()).or_default();
        e.0 += 1;
        e.1 += s.len;
    }
    for (kind, (count, bytes)) in by_kind {
        let _ = writeln!(out, "  {kind:<10} {count:>5} section(s) {bytes:>14} bytes");
    }
    // Every section but the weights by name, and the largest weights: the full list is long.
    let mut weights: Vec<_> = plan
        .sections()
        .filter(|s| s.name.starts_with("weight:"))
        .collect();
    for s in plan.sections().filter(|s| !s.name.starts_with("weight:")) {
        let _ = writeln!(out, "    {:<48} {:>14} bytes", s.name, s.len);
    }
    weights.sort_by(|a, b| b.len.cmp(&a.len).then(a.name.cmp(&b.name)));
    for s in weights.iter().take(5) {
        let _ = writeln!(out, "    {:<48} {:>14} bytes", s.name, s.len);
    }
    if weights.len() > 5 {
        let _ = writeln!(out, "    ... {} more weight sections", weights.len() - 5);
    }

    if let Some(bytes) = plan.section(PARTS_SECTION) {
        describe_parts(&mut out, path, &codec::decode(PARTS_SECTION, bytes)?);
    }
    // Every matrix weight's storage, grouped: one line per distinct storage with its count and
    // first names (a model has hundreds of weights).
    let _ = writeln!(out, "\nweight storage");
    let calibrated: Vec<&str> = manifest
        .provenance
        .options
        .iter()
        .filter_map(|o| o.strip_prefix(CALIBRATED_OPTION))
        .collect();
    let mut storage: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for w in manifest.weights.iter().filter(|w| w.shape.len() == 2) {
        let key = match &w.quant {
            None => format!("{} (unquantized)", w.dtype),
            Some(q) => format!(
                "{} ({}-bit {}, {}, {}{})",
                q.scheme,
                q.codes.bits(),
                match q.codes {
                    ir::CodeFormat::Int(_) => "int",
                    ir::CodeFormat::Fp8E4M3 => "e4m3",
                },
                if Some(&q.group) == w.shape.get(1) {
                    "per channel".to_string()
                } else {
                    format!("group {}", q.group)
                },
                if q.asymmetric {
                    "asymmetric"
                } else {
                    "symmetric"
                },
                if q.from_checkpoint {
                    ", checkpoint blocks kept"
                } else if calibrated.contains(&w.name.as_str()) {
                    ", GPTQ-calibrated"
                } else {
                    ""
                }
            ),
        };
        let key = if w.layout == artifacts::schema::WeightLayout::QuantTiles {
            format!("{key} in tensor-core tiles")
        } else {
            key
        };
        storage.entry(key).or_default().push(&w.name);
    }
    for (key, names) in &storage {
        let shown: Vec<&str> = names.iter().take(3).copied().collect();
        let more = if names.len() > 3 { ", ..." } else { "" };
        let _ = writeln!(
            out,
            "  {key}: {} weight(s): {}{more}",
            names.len(),
            shown.join(", ")
        );
    }

    if let Some(moe) = describe_moe(&manifest, &program) {
        out.push_str(&moe);
    }
    if let Some(bytes) = plan.section(section::MTP) {
        let mtp: artifacts::schema::MtpProgram = codec::decode(section::MTP, bytes)?;
        out.push_str(&describe_mtp(&manifest, &program, &mtp));
    }

    let _ = writeln!(out, "\nkernels ({} launches per step)", program.steps.len());
    let mut kernels: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &program.steps {
        *kernels.entry(step.kernel.as_str()).or_default() += 1;
    }
    for (kernel, count) in kernels {
        let _ = writeln!(out, "  {kernel:<36} x{count}");
    }
    // Which kernel serves which matmul shape: the weight's [N, K] per launch, and on CUDA the
    // pass size from which the plan runs it as a tensor-core GEMM instead.
    let dispatch: Option<artifacts::code_abi::CudaDispatch> =
        code_record(&plan, &manifest, artifacts::code_abi::CUDA_DISPATCH)?;
    // A DCU plan carries the same GEMM thresholds for its BLAS (hipBLAS), which no engine runs
    // yet; its module is the DCU's.
    let codegen = crate::targets::info(manifest.target).codegen;
    let (blas, module) = match codegen {
        crate::targets::CodeGen::Hipcc(_) => ("hipBLAS", "DCU module"),
        _ => ("cuBLAS", "CUDA module"),
    };
    // A weight in tiles runs on the tensor-core kernels instead of its registry kernel's.
    let mut shapes: BTreeMap<(&str, bool, u64, u64, Option<u32>), usize> = BTreeMap::new();
    for (i, step) in program.steps.iter().enumerate() {
        if let artifacts::schema::Launch::MatMul { w, .. } = &step.launch {
            if let Some(info) = manifest.weights.get(w.0 as usize) {
                if let [n, k] = info.shape[..] {
                    let gemm = dispatch
                        .as_ref()
                        .and_then(|d| d.gemm_from_tokens.get(i).copied().flatten());
                    let tiles = info.layout == artifacts::schema::WeightLayout::QuantTiles;
                    *shapes
                        .entry((step.kernel.as_str(), tiles, n, k, gemm))
                        .or_default() += 1;
                }
            }
        }
    }
    if !shapes.is_empty() {
        let _ = writeln!(
            out,
            "
matmuls by shape (N x K of the weight)"
        );
        for ((kernel, tiles, n, k, gemm), count) in shapes {
            let gemm = gemm.map_or(String::new(), |t| format!("  {blas} GEMM from {t} tokens"));
            let gemm = if tiles {
                let [several, one] = kernels::cuda::TILE_MATMUL_FUNCTIONS;
                format!("  in tiles: tensor-core row kernels ({one}, {several}){gemm}")
            } else {
                gemm
            };
            let _ = writeln!(
                out,
                "  {kernel:<36} {:>16} x{count}{gemm}",
                format!("{n} x {k}")
            );
        }
    }
    if let Some(percent) = dispatch
        .as_ref()
        .and_then(|d| d.prefill_attention_from_percent)
    {
        let _ = writeln!(
            out,
            "\nattention: the split decode kernel, or the tiled prefill kernel for passes with \
             {percent}% or more of their tokens in prompt chunks"
        );
    }
    let folds: Option<artifacts::code_abi::CudaDecodeFolds> =
        code_record(&plan, &manifest, artifacts::code_abi::CUDA_DECODE_FOLDS)?;
    if let Some(folds) = folds.filter(|f| !f.norms.is_empty()) {
        let consumers: usize = folds.norms.iter().map(|f| f.consumers.len()).sum();
        let _ = writeln!(
            out,
            "\ndecode folds: {} of the add_rms_norm steps run inside the matmuls around them in \
             passes of one token (the matmul before adds and writes the sums; the {consumers} \
             matmuls after scale by 1 / rms)",
            folds.norms.len()
        );
    }
    if codegen.gpu_module() {
        let _ = writeln!(out, "\n{module} (one for every kernel above)");
        for sym in &manifest.code {
            let _ = writeln!(out, "  {:<36} {:>6} bytes", sym.name, sym.len);
        }
        if let crate::targets::CodeGen::Hipcc(arch) = codegen {
            let object = code_bytes(&plan, &manifest, artifacts::code_abi::DCU_CODE_OBJECT)?
                .unwrap_or_default();
            let kernels = crate::codegen::hip::kernels_of(object, arch).map_err(|message| {
                PlanError::Decode {
                    section: artifacts::code_abi::DCU_CODE_OBJECT.into(),
                    message,
                }
            })?;
            let _ = writeln!(
                out,
                "  {} kernels compiled for {}: {}",
                kernels.len(),
                arch.name(),
                kernels.join(" ")
            );
        }
    } else if !manifest.code.is_empty() {
        let _ = writeln!(out, "\ngenerated code ({} functions)", manifest.code.len());
        for sym in &manifest.code {
            let _ = writeln!(
                out,
                "  {:<36} {:>6} bytes at {:#x}",
                sym.name, sym.len, sym.offset
            );
        }
    }
    let mem = &manifest.memory;
    let _ = writeln!(out, "\nmemory plan");
    let _ = writeln!(
        out,
        "  activation arena {} f32 per token ({} bytes/token); without reuse {} ({} buffers)",
        mem.arena_cols,
        mem.arena_cols * 4,
        mem.unplanned_cols,
        mem.buffers.len()
    );
    let _ = writeln!(
        out,
        "  logits {} f32 per requested row",
        program.logits_cols
    );
    let _ = writeln!(out, "\nprovenance");
    let options: Vec<&str> = manifest
        .provenance
        .options
        .iter()
        .map(String::as_str)
        .filter(|o| !o.starts_with(CALIBRATED_OPTION))
        .collect();
    let _ = writeln!(
        out,
        "  fdc {}, {}",
        manifest.provenance.compiler_version,
        options.join(", ")
    );
    if !calibrated.is_empty() {
        let _ = writeln!(out, "  {} weights quantized by GPTQ", calibrated.len());
    }
    for s in &manifest.provenance.sources {
        let _ = writeln!(out, "  {} ({} bytes) blake3 {}", s.name, s.bytes, s.blake3);
    }
    Ok(out)
}

/// The multi-token-prediction module: its launches, its KV slot and the weights only it reads.
fn describe_mtp(
    manifest: &Manifest,
    program: &Program,
    mtp: &artifacts::schema::MtpProgram,
) -> String {
    let weights_of = |p: &Program| -> BTreeSet<u32> {
        p.steps
            .iter()
            .flat_map(|s| s.launch.operands().2)
            .map(|w| w.0)
            .collect()
    };
    let shared = weights_of(program);
    let own = weights_of(&mtp.program);
    let parameters: u64 = own
        .iter()
        .filter(|w| !shared.contains(w))
        .filter_map(|&w| manifest.weights.get(w as usize))
        .map(|w| w.shape.iter().product::<u64>())
        .sum();
    let layers = mtp.program.steps.iter().filter_map(|s| match s.launch {
        artifacts::schema::Launch::Attention { layer, .. }
        | artifacts::schema::Launch::AttentionRope { layer, .. }
        | artifacts::schema::Launch::MlaAttention { layer, .. } => Some(layer),
        _ => None,
    });
    let slots: Vec<String> = layers.map(|l| l.to_string()).collect();
    format!(
        "\nmulti-token prediction (speculative method \"mtp\")\n  1 module: {} launches per pass, \
         KV slot {} of the cache, {parameters} parameters of its own ({} shared with the model)\n",
        mtp.program.steps.len(),
        slots.join(", "),
        own.intersection(&shared).count()
    )
}

/// The mixture-of-experts layers of a plan: how many, their experts and routing, shared
/// experts, and the bytes of expert weights in all and read per token (a token reads its top-k
/// routed experts of every sparse layer, the shared experts, and every dense weight); `None`
/// for a dense model.
fn describe_moe(manifest: &Manifest, program: &Program) -> Option<String> {
    let bytes_of = |index: usize| {
        manifest
            .weights
            .get(index)
            .and_then(weight_section_len)
            .unwrap_or(0)
    };
    let mut layers = 0usize;
    let mut routed_total = 0u64;
    let mut routed_active = 0u64;
    let mut routed_weights = vec![];
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut expert_cols = 0u64;
    for step in &program.steps {
        let Launch::Moe {
            bias,
            gate_up,
            down,
            experts,
            top_k,
            routing,
            normalize,
            scaling,
            ..
        } = &step.launch
        else {
            continue;
        };
        layers += 1;
        let stacked = bytes_of(gate_up.0 as usize) + bytes_of(down.0 as usize);
        routed_total += stacked;
        routed_active += stacked / (*experts).max(1) * top_k;
        routed_weights.extend([gate_up.0 as usize, down.0 as usize]);
        if let Some(w) = manifest.weights.get(down.0 as usize) {
            expert_cols = w.shape.last().copied().unwrap_or(0);
        }
        let mut kind = format!("{experts} experts, top-{top_k}, {} routing", routing.name());
        if let ir::MoeRouting::SigmoidGrouped { groups, top_groups } = routing {
            let _ = write!(kind, " (best {top_groups} of {groups} groups)");
        }
        if bias.is_some() {
            kind.push_str(", selection bias");
        }
        if *normalize {
            kind.push_str(", weights renormalized");
        }
        if *scaling != 1.0 {
            let _ = write!(kind, ", scaled x{scaling}");
        }
        *kinds.entry(kind).or_default() += 1;
    }
    if layers == 0 {
        return None;
    }
    // Shared experts are ordinary MLP weights; the families that have them name them so.
    let shared: Vec<usize> = (0..manifest.weights.len())
        .filter(|&i| manifest.weights[i].name.contains(".shared_experts."))
        .collect();
    let shared_bytes: u64 = shared.iter().map(|&i| bytes_of(i)).sum();
    let shared_cols: u64 = manifest
        .weights
        .iter()
        .filter(|w| w.name.contains(".shared_experts.") && w.name.contains("down_proj"))
        .map(|w| w.shape.last().copied().unwrap_or(0))
        .sum();
    let all: u64 = (0..manifest.weights.len()).map(bytes_of).sum();
    let routed_set: std::collections::BTreeSet<usize> = routed_weights.into_iter().collect();
    let dense: u64 = (0..manifest.weights.len())
        .filter(|i| !routed_set.contains(i))
        .map(bytes_of)
        .sum();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmixture of experts ({layers} of {} layers sparse)",
        manifest.model.num_layers
    );
    for (kind, count) in &kinds {
        let _ = writeln!(out, "  {count} layer(s): {kind}");
    }
    if shared_cols > 0 && expert_cols > 0 {
        let _ = writeln!(
            out,
            "  shared experts: {} per sparse layer ({} weights, {shared_bytes} bytes), run on every token",
            shared_cols / layers as u64 / expert_cols,
            shared.len()
        );
    } else {
        let _ = writeln!(out, "  shared experts: none");
    }
    let _ = writeln!(
        out,
        "  routed expert weights: {routed_total} bytes in all, {routed_active} bytes active per token"
    );
    let _ = writeln!(
        out,
        "  weights read per token: {} of {all} bytes ({:.1}%; dense weights counted whole)",
        dense + routed_active,
        100.0 * (dense + routed_active) as f64 / all.max(1) as f64
    );
    Some(out)
}

/// The part files a plan ships with, each checked for presence, length and table checksum.
fn describe_parts(out: &mut String, plan: &Path, table: &PartsTable) {
    let total: u64 = table.parts.iter().map(|p| p.bytes).sum();
    let _ = writeln!(
        out,
        "\nweights in {} part files ({total} bytes), beside the plan",
        table.parts.len()
    );
    let dir = plan.parent().unwrap_or(Path::new("."));
    for part in &table.parts {
        let state = match PlanFile::open_unverified(dir.join(&part.file)) {
            Err(e) => format!("NOT OK: {e}"),
            Ok(f) if f.file_len() != part.bytes || f.checksum() != part.checksum => {
                format!(
                    "NOT OK: {} bytes, table checksum {}",
                    f.file_len(),
                    f.checksum()
                )
            }
            Ok(_) => "ok".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<40} {:>14} bytes  blake3 {}  {state}",
            part.file, part.bytes, part.checksum
        );
    }
}

/// A weight part file on its own: which plan or snapshot it belongs to, and its weights.
fn describe_part_file(file: &PlanFile, header: &PartHeader) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "part        {} ({} bytes, checksums ok, table checksum {})",
        file.path().display(),
        file.file_len(),
        file.checksum()
    );
    let owner = match &header.snapshot {
        Some(tag) => format!("snapshot {:?} rank {}", tag.id, tag.rank),
        None => "a plan in parts".to_string(),
    };
    let _ = writeln!(
        out,
        "of          {owner} of model {}: part {} of {}",
        header.model, header.index, header.count
    );
    let _ = writeln!(out, "weights     {}", header.weights.len());
    for w in &header.weights {
        let _ = writeln!(
            out,
            "  {:<48} {:?} {} {:?}",
            w.name, w.shape, w.dtype, w.layout
        );
    }
    out
}

/// How many tokens (and full contexts) a KV pool of each size holds, e.g.
/// `1.0 GiB: 23301 tokens (2.8 x 8192)`. The runtime rounds down to whole blocks.
fn kv_fit_line(bytes_per_token: u64, context: u64, extra: &[u64]) -> String {
    KV_SIZES
        .iter()
        .chain(extra)
        .map(|&size| {
            let tokens = size / bytes_per_token.max(1);
            format!(
                "{}: {tokens} tokens ({:.1} x {context})",
                artifacts::units::format_bytes(size),
                tokens as f64 / context.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod kv_fit_tests {
    #[test]
    fn kv_fit_counts_tokens_and_contexts() {
        let line = super::kv_fit_line(1 << 20, 512, &[3 << 20]);
        assert!(
            line.starts_with("1.0 GiB: 1024 tokens (2.0 x 512); "),
            "{line}"
        );
        assert!(line.ends_with("3.0 MiB: 3 tokens (0.0 x 512)"), "{line}");
    }
}
