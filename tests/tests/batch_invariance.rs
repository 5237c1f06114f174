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
            ..EngineOptions::default()
        },
    )
}

/// Sequences sharing one engine, each with blocks of its own, scattered through the pool
/// (sequence i holds every third block from i) so that nothing depends on blocks being in order.
struct Seqs {
    tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
}

impl Seqs {
    fn new(engine: &Engine, count: usize) -> Seqs {
        let pool = engine.kv_pool().num_blocks() as u32;
        let per_seq = pool / count as u32;
        Seqs {
            tables: (0..count as u32)
                .map(|i| (0..per_seq).map(|b| b * count as u32 + i).collect())
                .collect(),
            lens: vec![0; count],
        }
    }

    /// One pass over `(sequence, tokens, logits)` parts; returns the logits.
    fn pass(&mut self, engine: &mut Engine, parts: &[(usize, &[u32], Logits)]) -> Vec<f32> {
        let chunks: Vec<SeqChunk> = parts
            .iter()
            .map(|&(seq, tokens, logits)| SeqChunk {
                blocks: &self.tables[seq],
                start: self.lens[seq],
                tokens,
                logits,
            })
            .collect();
        let out = engine.forward_batch(&chunks).expect("pass").to_vec();
        for &(seq, tokens, _) in parts {
            self.lens[seq] += tokens.len();
        }
        out
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
        let mut solo = Seqs::new(&alone, 3);
        let mut want = solo.pass(&mut alone, &[(0, &a, Logits::Last)]);
        for id in [5u32, 6, 7] {
            want.extend(solo.pass(&mut alone, &[(0, &[id], Logits::Last)]));
        }

        // Shared: A's prompt after B's in one pass, then decode steps beside C's prompt and
        // B's decode tokens, with A in a different place in the batch each time.
        let mut seqs = Seqs::new(&shared, 3);
        let logits = seqs.pass(&mut shared, &[(1, &b, Logits::All), (0, &a, Logits::Last)]);
        let mut got = logits[b.len() * vocab..].to_vec();
        let steps: [Vec<(usize, &[u32], Logits)>; 3] = [
            vec![(2, &c, Logits::Last), (0, &[5], Logits::Last)],
            vec![(0, &[6], Logits::Last), (1, &[9], Logits::Last)],
            vec![
                (1, &[10], Logits::Last),
                (0, &[7], Logits::Last),
                (2, &[11], Logits::Last),
            ],
        ];
        for step in &steps {
            let at = step
                .iter()
                .position(|part| part.0 == 0)
                .expect("A is in every step");
            let logits = seqs.pass(&mut shared, step);
            got.extend_from_slice(&logits[at * vocab..][..vocab]);
        }
        let bad = differing_rows(&want, &got, vocab);
        assert!(
            bad.is_empty(),
            "{model}: steps (step, column) {bad:?} of A differ when batched with other sequences"
        );
    }
}

#[test]
fn greedy_chunks_give_the_argmax_of_the_rows_they_leave_out() {
    let (a, b, c) = (tokens(12, 5), tokens(30, 6), tokens(3, 7));
    let mut engine = engine_for("tiny/llama", DType::F32, 3);
    let vocab = engine.vocab_size();
    let mut seqs = Seqs::new(&engine, 3);
    // The same pass twice over (writing the same keys and values again): once with every
    // chunk's last row returned, once with A and C picked greedily.
    let parts = |greedy: Logits| -> [(usize, &[u32], Logits); 3] {
        [(0, &a, greedy), (1, &b, Logits::All), (2, &c, greedy)]
    };
    let rows = seqs.pass(&mut engine, &parts(Logits::Last));
    assert_eq!(rows.len(), (1 + b.len() + 1) * vocab);
    seqs.lens = vec![0; 3];
    let picked = seqs.pass(&mut engine, &parts(Logits::Greedy));
    // Only B's rows come back; A's and C's picks are the argmax of the rows left out.
    assert_eq!(picked, rows[vocab..(1 + b.len()) * vocab]);
    let want = [
        runtime::sampler::argmax(&rows[..vocab]),
        runtime::sampler::argmax(&rows[(1 + b.len()) * vocab..]),
    ];
    assert_eq!(engine.greedy_ids(), want);
}
