//! The paged KV cache computes what a contiguous one does: logits through scattered blocks of
//! several sizes equal those of one contiguous block (1e-5 relative, f32 weights) for every tiny
//! golden and for SmolLM2, and a prompt prefilled in chunks of 1, 7 or 64 tokens gives the logits
//! of one pass.

mod common;

use common::*;
use ir::DType;
use runtime::{Engine, EngineOptions, Logits, SeqChunk};
use std::path::PathBuf;

const CONTEXT: usize = 256;

fn models() -> Vec<(String, PathBuf)> {
    let mut models: Vec<(String, PathBuf)> = TINY_GOLDENS
        .iter()
        .map(|m| (m.to_string(), golden(m)))
        .collect();
    models.push(("smollm2".into(), smollm2_gguf()));
    models
}

/// A varied token sequence inside every model's vocabulary.
fn tokens(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7919 + 11) % 250 + 3).collect()
}

fn engine_with_pool(
    plan: &std::path::Path,
    block_size: usize,
    blocks: usize,
    budget: usize,
) -> Engine {
    engine_with(
        plan,
        EngineOptions {
            max_context: CONTEXT,
            max_batch_tokens: budget,
            max_num_seqs: 1,
            block_size,
            kv_blocks: Some(blocks),
        },
    )
}

/// Every token's logits, the sequence fed through `table` in passes of `passes` tokens.
fn logits_through(engine: &mut Engine, table: &[u32], ids: &[u32], passes: &[usize]) -> Vec<f32> {
    let mut out = vec![];
    let mut start = 0;
    for &count in passes.iter().cycle() {
        if start == ids.len() {
            break;
        }
        let count = count.min(ids.len() - start);
        let chunk = SeqChunk {
            blocks: table,
            start,
            tokens: &ids[start..start + count],
            logits: Logits::All,
        };
        out.extend_from_slice(engine.forward_batch(&[chunk]).expect("pass"));
        start += count;
    }
    out
}

#[test]
fn paged_logits_equal_contiguous_logits() {
    let ids = tokens(150);
    // Prefill-like and decode-like passes mixed.
    let passes = [37, 1, 1, 50, 1, 9];
    for (name, model) in models() {
        let plan = compiled(&model, DType::F32);
        let mut contiguous = engine_with_pool(&plan, CONTEXT, 1, 64);
        let vocab = contiguous.vocab_size();
        let want = logits_through(&mut contiguous, &[0], &ids, &passes);
        for block_size in [16, 64] {
            let needed = CONTEXT / block_size;
            let pool = 2 * needed;
            let mut paged = engine_with_pool(&plan, block_size, pool, 64);
            // Scattered, out of order, skipping half the pool.
            let table: Vec<u32> = (0..needed).map(|i| ((i * 7 + 3) % pool) as u32).collect();
            let got = logits_through(&mut paged, &table, &ids, &passes);
            check_logits(
                &format!("{name} block {block_size}"),
                &got,
                &want,
                vocab,
                1e-5,
            );
        }
    }
}

#[test]
fn chunked_prefill_gives_the_logits_of_one_pass() {
    let ids = tokens(100);
    for (name, model) in models() {
        let plan = compiled(&model, DType::F32);
        let mut whole = engine_with_pool(&plan, 64, 4, 128);
        let vocab = whole.vocab_size();
        let want = whole.prefill(&ids, true).expect("one pass");
        for chunk in [1, 7, 64] {
            let mut chunked = engine_with_pool(&plan, 64, 4, chunk);
            let got = chunked.prefill(&ids, true).expect("chunked");
            check_logits(
                &format!("{name} chunks of {chunk}"),
                &got,
                &want,
                vocab,
                1e-5,
            );
        }
    }
}

#[test]
fn bad_block_tables_are_errors() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let mut engine = engine_with_pool(&plan, 16, 4, 64);
    let ids = tokens(20);
    let cases: [(&[u32], usize, &str); 3] = [
        (&[0], 0, "20 positions need 2 blocks of 16, the table has 1"),
        (&[0, 9], 0, "block 9 is outside the pool of 4"),
        (
            &[0, 1],
            30,
            "50 positions need 4 blocks of 16, the table has 2",
        ),
    ];
    for (table, start, message) in cases {
        let chunk = SeqChunk {
            blocks: table,
            start,
            tokens: &ids,
            logits: Logits::Last,
        };
        let err = engine.forward_batch(&[chunk]).unwrap_err().to_string();
        assert!(err.contains(message), "{table:?} at {start}: {err}");
    }
    // Two sequences writing one block in the same pass.
    let (a, b) = ([0u32, 1], [2u32, 1]);
    let err = engine
        .forward_batch(&[
            SeqChunk {
                blocks: &a,
                start: 16,
                tokens: &ids[..4],
                logits: Logits::Last,
            },
            SeqChunk {
                blocks: &b,
                start: 16,
                tokens: &ids[..4],
                logits: Logits::Last,
            },
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("block 1 is written by two sequences"), "{err}");
}
