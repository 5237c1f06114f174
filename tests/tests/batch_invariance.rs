//! Batch invariance end to end: a token's logits are the same bits however its sequence reached
//! the engine: all in one pass (prefill), one token per pass (decode), or sharing passes with
//! other sequences. Greedy output can then never depend on what else the server batched.
//!
//! The tiny llama has separate input and output embeddings; the tiny qwen2 ties them (one table
//! in the matmul's panel layout, gathered by the embedding) and has attention biases. 300 tokens
//! span two of attention's key chunks, so the chunk merge is covered, and both weight dtypes run.

mod common;

use common::*;
use ir::DType;
use runtime::{Engine, EngineOptions, Logits, SeqChunk};

const MODELS: [&str; 2] = ["tiny/llama", "tiny/qwen2"];

/// A fixed, varied token sequence inside the tiny vocabulary.
fn tokens(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + seed * 104_729 + 3) % 317 + 3)
        .collect()
}

fn engine_for(model: &str, dtype: DType, seqs: usize) -> Engine {
    engine_with(
        &compiled(&golden(model), dtype),
        EngineOptions {
            max_context: 512,
            max_batch_tokens: 512,
            max_num_seqs: seqs,
        },
    )
}

/// Sequence A's part of a pass: `tokens` into slot 0, the last one's logits wanted.
fn last(tokens: &[u32]) -> SeqChunk<'_> {
    SeqChunk {
        slot: 0,
        tokens,
        logits: Logits::Last,
    }
}

/// Rows that differ in any bit, as (row, first differing column).
fn differing_rows(a: &[f32], b: &[f32], cols: usize) -> Vec<(usize, usize)> {
    assert_eq!(a.len(), b.len());
    a.chunks(cols)
        .zip(b.chunks(cols))
        .enumerate()
        .filter_map(|(row, (x, y))| {
            x.iter()
                .zip(y)
                .position(|(p, q)| p.to_bits() != q.to_bits())
                .map(|col| (row, col))
        })
        .collect()
}

#[test]
fn prefill_in_one_pass_equals_decoding_one_token_at_a_time() {
    let ids = tokens(300, 1);
    for model in MODELS {
        for dtype in [DType::F32, DType::BF16] {
            let mut engine = engine_for(model, dtype, 1);
            let vocab = engine.vocab_size();
            let prefill = engine.prefill(&ids, true).expect("prefill");
            engine.reset();
            let mut decode = Vec::with_capacity(prefill.len());
            for &id in &ids {
                decode.extend_from_slice(engine.forward_last(&[id]).expect("decode"));
            }
            let bad = differing_rows(&prefill, &decode, vocab);
            assert!(
                bad.is_empty(),
                "{model} {dtype}: {} of {} positions differ between prefill and decode, first \
                 (position, column) {:?}",
                bad.len(),
                ids.len(),
                bad.first()
            );
        }
    }
}

#[test]
fn a_sequence_gets_the_same_logits_alone_or_batched_with_others() {
    let (a, b, c) = (tokens(40, 2), tokens(90, 3), tokens(7, 4));
    for model in MODELS {
        let mut alone = engine_for(model, DType::F32, 3);
        let mut shared = engine_for(model, DType::F32, 3);
        let vocab = alone.vocab_size();

        // Alone: A's prompt, then three decode steps.
        let mut want = alone.forward_batch(&[last(&a)]).expect("alone").to_vec();
        for id in [5u32, 6, 7] {
            let step = [id];
            want.extend_from_slice(alone.forward_batch(&[last(&step)]).expect("alone"));
        }

        // Shared: A's prompt after B's in one pass, then decode steps beside C's prompt and
        // B's decode tokens, with A in a different place in the batch each time.
        let mut got = vec![];
        let logits = shared
            .forward_batch(&[
                SeqChunk {
                    slot: 1,
                    tokens: &b,
                    logits: Logits::All,
                },
                last(&a),
            ])
            .expect("shared");
        got.extend_from_slice(&logits[b.len() * vocab..]);
        let steps: [Vec<SeqChunk>; 3] = [
            vec![
                SeqChunk {
                    slot: 2,
                    tokens: &c,
                    logits: Logits::Last,
                },
                last(&[5]),
            ],
            vec![
                last(&[6]),
                SeqChunk {
                    slot: 1,
                    tokens: &[9],
                    logits: Logits::Last,
                },
            ],
            vec![
                SeqChunk {
                    slot: 1,
                    tokens: &[10],
                    logits: Logits::Last,
                },
                last(&[7]),
                SeqChunk {
                    slot: 2,
                    tokens: &[11],
                    logits: Logits::Last,
                },
            ],
        ];
        for step in &steps {
            let at = step
                .iter()
                .position(|s| s.slot == 0)
                .expect("A is in every step");
            let logits = shared.forward_batch(step).expect("shared");
            got.extend_from_slice(&logits[at * vocab..][..vocab]);
        }
        let bad = differing_rows(&want, &got, vocab);
        assert!(
            bad.is_empty(),
            "{model}: steps (step, column) {bad:?} of A differ when batched with other sequences"
        );
    }
}
