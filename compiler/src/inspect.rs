//! `fdc inspect PLAN`: a human-readable account of a plan: model, target, dtype, parameter
//! count, bytes per section kind, the kernels the program launches, the memory plan and
//! provenance. Reading a plan verifies its checksums, so inspecting also checks integrity.

use artifacts::schema::{section, Manifest, Program};
use artifacts::{codec, PlanError, PlanFile};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

pub fn inspect(path: &Path) -> Result<String, PlanError> {
    let plan = PlanFile::open(path)?;
    let manifest: Manifest =
        codec::decode(section::MANIFEST, plan.require_section(section::MANIFEST)?)?;
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
    let _ = writeln!(
        out,
        "kv cache    {} bytes per token ({} layers x {} kv heads x {} x 2, {})",
        manifest.kv.bytes_per_token,
        manifest.kv.num_layers,
        manifest.kv.num_kv_heads,
        manifest.kv.head_dim,
        manifest.kv.dtype
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

    // Every matrix weight's storage, grouped: one line per distinct storage with its count and
    // first names (a model has hundreds of weights).
    let _ = writeln!(out, "\nweight storage");
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
                } else {
                    ""
                }
            ),
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

    let _ = writeln!(out, "\nkernels ({} launches per step)", program.steps.len());
    let mut kernels: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &program.steps {
        *kernels.entry(step.kernel.as_str()).or_default() += 1;
    }
    for (kernel, count) in kernels {
        let _ = writeln!(out, "  {kernel:<36} x{count}");
    }
    if !manifest.code.is_empty() {
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
    let _ = writeln!(
        out,
        "  fdc {}, {}",
        manifest.provenance.compiler_version,
        manifest.provenance.options.join(", ")
    );
    for s in &manifest.provenance.sources {
        let _ = writeln!(out, "  {} ({} bytes) blake3 {}", s.name, s.bytes, s.blake3);
    }
    Ok(out)
}
