//! DeepSeek-V3's multi-token-prediction (MTP) module, judged by a float64 reference written
//! from its definition (`common::deepseek_f64`): the reference's main model against HF's golden
//! logits and its module's causality (on a copy of the tiny checkpoint given random MTP weights,
//! since the golden has none), then the module compiled by fdc and run by the engine as the
//! scheduler runs it (catch-up passes, a chained pass) against the reference, on a checkpoint
//! from `fdc synth` with MTP weights. Greedy outputs with MTP proposals are checked in
//! `speculative.rs`.

mod common;

use common::deepseek_f64::DeepseekF64;
use common::*;
use std::path::Path;

fn flat_f32(rows: &[Vec<f64>]) -> Vec<f32> {
    rows.iter().flatten().map(|&v| v as f32).collect()
}

#[test]
fn the_float64_reference_matches_the_hf_golden() {
    let dir = golden("tiny/deepseek_v3");
    let model = DeepseekF64::load(&dir);
    let json = read_json(&dir.join("golden.json"));
    let input_ids = ids(&json["input_ids"]);
    let want = read_tensor(&dir.join("golden.safetensors"), "logits");
    let vocab = want.shape[1];
    assert_eq!(vocab, model.vocab_size);
    let (hidden, logits) = model.forward(&input_ids);
    assert_eq!(hidden.len(), input_ids.len());
    assert!(hidden.iter().all(|h| h.len() == model.hidden_size));
    check_logits(
        "deepseek_v3 f64 reference",
        &flat_f32(&logits),
        &want.data,
        vocab,
        // The golden is float64 apart from HF's float32 casts (norms, router, rope angles,
        // softmax): about 6e-7 here. 1e-5 still catches a wrong latent-norm epsilon (3e-5).
        1e-5,
    );
}

/// A copy of the tiny DeepSeek-V3 in `to` with an MTP module (layer `num_hidden_layers`) of
/// random weights: the last layer's tensors renamed (a MoE layer, as the MTP layer is), plus
/// the module's own norms and `eh_proj`.
fn with_mtp_tensors(from: &Path, to: &Path) {
    let config = read_json(&from.join("config.json"));
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    let c = config["hidden_size"].as_u64().unwrap() as usize;
    assert!(
        layers > config["first_k_dense_replace"].as_u64().unwrap() as usize,
        "the last layer must be a MoE layer, as the MTP layer is"
    );
    let bytes = std::fs::read(from.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    tensors.sort();
    let last = format!("model.layers.{}.", layers - 1);
    let mtp = format!("model.layers.{layers}.");
    let renamed: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with(&last))
        .map(|(n, s)| (n.replacen(&last, &mtp, 1), s.clone()))
        .collect();
    tensors.extend(renamed);
    for norm in ["enorm", "hnorm", "shared_head.norm"] {
        tensors.push((format!("{mtp}{norm}.weight"), vec![c]));
    }
    tensors.push((format!("{mtp}eh_proj.weight"), vec![c, 2 * c]));

    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    synthetic::write_safetensors(
        &to.join("model.safetensors"),
        &tensors,
        |index, name, out| {
            if let Ok(view) = st.tensor(name) {
                assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
                for (v, b) in out.iter_mut().zip(view.data().chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                return;
            }
            // Magnitudes like the golden's: norms near 1, matrices of spread about 0.17.
            let r = random::uniform(out.len(), 1000 + index as u64);
            let (base, spread) = if name.ends_with("norm.weight") {
                (1.0, 0.5)
            } else if name.ends_with("e_score_correction_bias") {
                (0.0, 0.05)
            } else {
                (0.0, 0.3)
            };
            for (v, r) in out.iter_mut().zip(r) {
                *v = base + spread * r;
            }
        },
    );
}

#[test]
fn the_mtp_module_is_causal() {
    let golden_dir = golden("tiny/deepseek_v3");
    let tmp = tempfile::tempdir().unwrap();
    with_mtp_tensors(&golden_dir, tmp.path());
    let model = DeepseekF64::load(tmp.path());
    let json = read_json(&golden_dir.join("golden.json"));
    let seq = ids(&json["input_ids"]);

    // The added tensors leave the main model alone.
    let n = 16;
    let (hidden, logits) = model.forward(&seq[..=n]);
    let (_, plain) = DeepseekF64::load(&golden_dir).forward(&seq[..=n]);
    assert_eq!(logits, plain, "the MTP tensors changed the main model");

    // Position i: the token at i+1 and the main model's hidden state at i.
    let tokens = &seq[1..=n];
    let hidden = &hidden[..n];
    let (full_h, full_l) = model.mtp(tokens, hidden);
    assert_eq!((full_h.len(), full_l.len()), (n, n));
    assert!(full_h.iter().all(|h| h.len() == model.hidden_size));
    assert!(full_l.iter().all(|l| l.len() == model.vocab_size));
    for k in [1, 2, 7, n - 1] {
        let (h, l) = model.mtp(&tokens[..k], &hidden[..k]);
        assert_eq!(
            h,
            full_h[..k],
            "hidden at positions 0..{k} changed with more positions"
        );
        assert_eq!(
            l,
            full_l[..k],
            "logits at positions 0..{k} changed with more positions"
        );
    }

    // Another token or hidden state at position k changes the outputs from k on, not before.
    let k = 7;
    let mut other_tokens = tokens.to_vec();
    other_tokens[k] = (other_tokens[k] + 1) % model.vocab_size as u32;
    let mut other_hidden = hidden.to_vec();
    other_hidden[k].iter_mut().for_each(|v| *v = -*v);
    for (what, t, h) in [
        ("token", &other_tokens[..], hidden),
        ("hidden", tokens, &other_hidden[..]),
    ] {
        let (_, l) = model.mtp(t, h);
        assert_eq!(
            l[..k],
            full_l[..k],
            "another {what} at {k} changed earlier positions"
        );
        for (i, (a, b)) in l.iter().zip(&full_l).enumerate().skip(k) {
            assert!(a != b, "another {what} at {k} left position {i} unchanged");
        }
    }
}

/// The compiled module, run by the engine the way the scheduler runs it (a catch-up over the
/// positions the model computed, in two passes so the second attends to keys the first wrote,
/// then a chained pass on its own hidden state and proposal), against the float64 reference fed
/// the reference's own hidden states: the model's hidden states and logits, then the module's,
/// within 1e-3 of their largest value (f32 weights and arithmetic against f64).
#[test]
fn the_compiled_mtp_module_matches_its_float64_reference() {
    let checkpoint = deepseek_mtp_checkpoint();
    let reference = DeepseekF64::load(&checkpoint);
    let (c, vocab) = (reference.hidden_size, reference.vocab_size);
    let plan = compiled(&checkpoint, ir::DType::F32);
    let mut engine = engine_with(
        &plan,
        runtime::EngineOptions {
            max_context: 64,
            block_size: 16,
            kv_blocks: Some(4),
            ..runtime::EngineOptions::default()
        },
    );
    engine.keep_hidden(true);
    let seq: Vec<u32> = vec![5, 77, 140, 9, 300, 42, 42, 18, 250, 3, 61, 199, 7];
    let n = seq.len();
    let blocks: Vec<u32> = (0..4).collect();
    let logits = engine
        .forward_batch(&[runtime::SeqChunk {
            blocks: &blocks,
            start: 0,
            tokens: &seq,
            logits: runtime::Logits::All,
        }])
        .expect("the model's pass")
        .to_vec();
    let hidden = engine.hidden_rows().to_vec();
    let (want_hidden, want_logits) = reference.forward(&seq);
    check_logits(
        "model hidden states",
        &hidden,
        &flat_f32(&want_hidden),
        c,
        1e-3,
    );
    check_logits(
        "model logits",
        &logits,
        &flat_f32(&want_logits),
        vocab,
        1e-3,
    );

    // The module's positions 0..n-1 read the tokens 1..n and the model's hidden states 0..n-1.
    let next = &seq[1..];
    let (want_mtp_hidden, want_mtp_logits) = reference.mtp(next, &want_hidden[..n - 1]);
    let split = 5;
    let mut got_logits = vec![];
    let mut got_hidden = vec![];
    for (from, to) in [(0, split), (split, n - 1)] {
        let out = engine
            .forward_mtp(
                &[runtime::SeqChunk {
                    blocks: &blocks,
                    start: from,
                    tokens: &next[from..to],
                    logits: runtime::Logits::All,
                }],
                &hidden[from * c..to * c],
            )
            .expect("the module's pass");
        got_logits.extend_from_slice(out);
        got_hidden.extend_from_slice(engine.mtp_hidden_rows());
    }
    check_logits(
        "module hidden states",
        &got_hidden,
        &flat_f32(&want_mtp_hidden),
        c,
        1e-3,
    );
    check_logits(
        "module logits",
        &got_logits,
        &flat_f32(&want_mtp_logits),
        vocab,
        1e-3,
    );

    // Chained: position n-1 reads the module's proposal and its own last hidden state.
    let proposal = argmax(&got_logits[(n - 2) * vocab..]);
    let chained = engine
        .forward_mtp(
            &[runtime::SeqChunk {
                blocks: &blocks,
                start: n - 1,
                tokens: &[proposal],
                logits: runtime::Logits::All,
            }],
            &got_hidden[(n - 2) * c..],
        )
        .expect("the chained pass")
        .to_vec();
    let mut tokens = next.to_vec();
    tokens.push(proposal);
    let mut hiddens = want_hidden[..n - 1].to_vec();
    hiddens.push(want_mtp_hidden[n - 2].clone());
    let (_, want_chained) = reference.mtp(&tokens, &hiddens);
    check_logits(
        "chained module logits",
        &chained,
        &flat_f32(&want_chained[n - 1..]),
        vocab,
        1e-3,
    );
}
