//! Causal self-attention for one sequence against a contiguous per-layer KV cache, with grouped
//! query heads (query head h reads kv head `h / (H / KV)`).
//!
//! The queries that share a kv head are packed, token-major, into pieces of up to three vectors
//! of lanes. For a piece, blocks of keys are processed flash-attention style: scores for the whole
//! block come from a small register-blocked product (a key element broadcast against a vector of
//! pre-scaled, transposed queries), then an online softmax (running max and sum per query, stable
//! with the max subtracted) and the probability-weighted sum of value rows into f32 accumulators.
//!
//! Every query's result is computed the same way whether it arrives alone (decode) or among
//! hundreds (prefill), so a token's output does not depend on how its sequence was split into
//! passes, nor on the thread count:
//! - its keys are cut into chunks of `KEY_CHUNK` positions from 0, and each chunk into blocks of
//!   `KEY_BLOCK` from the chunk's start; each chunk's online softmax starts afresh;
//! - a score is one FMA chain over the head dimension in order, in every path;
//! - keys past the query's position are masked out of the max and the sum and skipped in the
//!   value sums, so keys that later tokens of the same pass add change nothing;
//! - the chunks are merged in order up to the query's own chunk, by one scalar function.
//!
//! What varies with the shapes is only scheduling: with few pieces (decode) each chunk is a task
//! of its own, with many (prefill) a task runs all chunks of a piece. Lanes never mix: every
//! vector operation is lane-wise, so where a query sits in a piece does not matter either.

use super::pool;
use super::simd::{self, load_n, run_simd, store_n, Simd, SimdTask};
use super::{check_rows, runnable_isa, SharedMut};
use crate::KernelError;
use ir_types::CpuIsa;
use std::cell::RefCell;

/// One layer's paged KV cache as one sequence sees it: `k`, `v` are the whole pool of the layer,
/// `[blocks, block_size, KV, D]` f32, and the sequence's position `p` lives in block
/// `blocks[p / block_size]` at row `p % block_size`. A contiguous cache is the case of one block
/// as large as the context ([`KvLayerMut::contiguous`]).
pub struct KvLayerMut<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    /// Positions per block.
    pub block_size: usize,
    /// The sequence's block table.
    pub blocks: &'a [u32],
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> KvLayerMut<'a> {
    /// A contiguous cache of `capacity` positions: `k`, `v` are `[capacity, KV, D]`.
    pub fn contiguous(
        k: &'a mut [f32],
        v: &'a mut [f32],
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        KvLayerMut {
            k,
            v,
            block_size: capacity.max(1),
            blocks: &[0],
            kv_heads,
            head_dim,
        }
    }

    /// Positions the sequence's blocks hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// Offset (in elements) of position `p`'s row in `k` and `v`; `p < capacity()`.
    pub(crate) fn row_offset(&self, p: usize) -> usize {
        row_offset(
            self.blocks,
            self.block_size,
            self.kv_heads * self.head_dim,
            p,
        )
    }
}

fn row_offset(blocks: &[u32], block_size: usize, kv_row: usize, p: usize) -> usize {
    (blocks[p / block_size] as usize * block_size + p % block_size) * kv_row
}

/// Keys per block of the online softmax.
const KEY_BLOCK: usize = 64;
/// Positions per key chunk when the key range is split across tasks.
const KEY_CHUNK: usize = 256;
/// Split key ranges into chunks only when there are fewer query pieces than this.
const SPLIT_BELOW_PIECES: usize = 32;
/// Query vectors per piece.
const MAX_QUERY_VECTORS: usize = 3;
/// Pieces of at most this many queries compute scores with keys in the lanes (see
/// `block_scores_few`).
const FEW_QUERIES: usize = 4;

/// Appends the new tokens' keys and values to `cache`, then attends.
///
/// Shapes: `q` `[T, H*D]`, `k` and `v` `[T, KV*D]`, `out` `[T, H*D]`, all f32 with their own row
/// strides; `positions` `[T]`, consecutive (`positions[i] = positions[0] + i`) and below the
/// cache capacity. Token i (at position p) attends to cache positions `0..=p`, which must hold
/// keys and values from this or earlier calls. `scale` multiplies `q . k` (usually `1/sqrt(D)`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    isa: CpuIsa,
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    k_stride: usize,
    v: &[f32],
    v_stride: usize,
    t: usize,
    positions: &[u32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    cache: &mut KvLayerMut,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "attention";
    if n_kv_heads == 0 || head_dim == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(KernelError::shape(
            NAME,
            format!("{n_heads} heads cannot share {n_kv_heads} kv heads (head_dim {head_dim})"),
        ));
    }
    if cache.kv_heads != n_kv_heads || cache.head_dim != head_dim {
        return Err(KernelError::shape(
            NAME,
            format!(
                "cache is {} kv heads x {}, kernel asked for {n_kv_heads} x {head_dim}",
                cache.kv_heads, cache.head_dim
            ),
        ));
    }
    let kv_row = n_kv_heads * head_dim;
    if cache.block_size == 0 {
        return Err(KernelError::shape(NAME, "block size 0"));
    }
    let pool_blocks = cache.k.len().min(cache.v.len()) / (cache.block_size * kv_row);
    if let Some(&b) = cache.blocks.iter().find(|&&b| b as usize >= pool_blocks) {
        return Err(KernelError::shape(
            NAME,
            format!("block {b} is outside the pool of {pool_blocks} blocks"),
        ));
    }
    check_rows(NAME, "q", q.len(), t, n_heads * head_dim, q_stride)?;
    check_rows(NAME, "k", k.len(), t, kv_row, k_stride)?;
    check_rows(NAME, "v", v.len(), t, kv_row, v_stride)?;
    check_rows(NAME, "out", out.len(), t, n_heads * head_dim, out_stride)?;
    if positions.len() != t {
        return Err(KernelError::Positions {
            what: format!("{} positions for {t} tokens", positions.len()),
        });
    }
    if t == 0 {
        return Ok(());
    }
    let first = positions[0] as usize;
    if let Some(i) = (1..t).find(|&i| positions[i] as usize != first + i) {
        return Err(KernelError::Positions {
            what: format!(
                "position {} follows {} at token {i}",
                positions[i],
                positions[i - 1]
            ),
        });
    }
    if first + t > cache.capacity() {
        return Err(KernelError::Positions {
            what: format!(
                "positions up to {} exceed capacity {}",
                first + t - 1,
                cache.capacity()
            ),
        });
    }

    for i in 0..t {
        let dst = cache.row_offset(first + i);
        cache.k[dst..dst + kv_row].copy_from_slice(&k[i * k_stride..][..kv_row]);
        cache.v[dst..dst + kv_row].copy_from_slice(&v[i * v_stride..][..kv_row]);
    }

    let isa = runnable_isa(isa);
    let lanes = if isa == CpuIsa::Avx512 { 16 } else { 8 };
    let shape = Shape {
        q,
        q_stride,
        first,
        group: n_heads / n_kv_heads,
        n_kv_heads,
        d: head_dim,
        scale,
        keys: &cache.k[..],
        values: &cache.v[..],
        blocks: cache.blocks,
        block_size: cache.block_size,
        out: SharedMut(out.as_mut_ptr()),
        out_stride,
        piece_len: MAX_QUERY_VECTORS * lanes,
    };
    let queries_per_kv_head = t * shape.group;
    let pieces_per_kv_head = queries_per_kv_head.div_ceil(shape.piece_len);
    let pieces: Vec<Piece> = (0..n_kv_heads)
        .flat_map(|kv| {
            (0..pieces_per_kv_head).map(move |p| {
                let begin = p * shape.piece_len;
                Piece {
                    kv,
                    queries: begin..(begin + shape.piece_len).min(queries_per_kv_head),
                }
            })
        })
        .collect();

    let slot = partial_len(shape.piece_len, head_dim);
    let chunks_of = |piece: &Piece| shape.position(piece.queries.end - 1) / KEY_CHUNK + 1;
    let chunk_keys = |c: usize, piece: &Piece| {
        c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(shape.position(piece.queries.end - 1) + 1)
    };
    if pieces.len() >= SPLIT_BELOW_PIECES {
        // Prefill-like: enough pieces to share out; each task runs its piece's chunks in turn.
        pool::for_each(pieces.len(), |i| {
            let piece = &pieces[i];
            let chunks = chunks_of(piece);
            let mut local = PARTIALS.take();
            if local.len() < chunks * slot {
                local.resize(chunks * slot, 0.0);
            }
            for (c, partial) in local.chunks_mut(slot).take(chunks).enumerate() {
                run_simd(
                    isa,
                    AttendPiece {
                        shape: &shape,
                        piece,
                        keys: chunk_keys(c, piece),
                        partial,
                    },
                );
            }
            merge_chunks(&shape, piece, &local[..chunks * slot], slot);
            PARTIALS.set(local);
        });
        return Ok(());
    }

    // Decode-like: few pieces, so each chunk of each piece is a task of its own.
    let mut tasks = Vec::new();
    for (pi, piece) in pieces.iter().enumerate() {
        for c in 0..chunks_of(piece) {
            tasks.push((pi, chunk_keys(c, piece)));
        }
    }
    let mut partials = vec![0f32; tasks.len() * slot];
    pool::for_each_chunk_mut(&mut partials, slot, |i, partial| {
        let (pi, keys) = &tasks[i];
        run_simd(
            isa,
            AttendPiece {
                shape: &shape,
                piece: &pieces[*pi],
                keys: keys.clone(),
                partial,
            },
        );
    });
    let mut offset = 0;
    for piece in &pieces {
        let chunks = chunks_of(piece);
        merge_chunks(
            &shape,
            piece,
            &partials[offset * slot..(offset + chunks) * slot],
            slot,
        );
        offset += chunks;
    }
    Ok(())
}

/// What every task of one call shares.
struct Shape<'a> {
    q: &'a [f32],
    q_stride: usize,
    /// Position of token 0.
    first: usize,
    /// Query heads per kv head.
    group: usize,
    n_kv_heads: usize,
    d: usize,
    scale: f32,
    /// The layer's pool and the sequence's block table (see [`KvLayerMut`]).
    keys: &'a [f32],
    values: &'a [f32],
    blocks: &'a [u32],
    block_size: usize,
    out: SharedMut,
    out_stride: usize,
    /// Queries per piece: `MAX_QUERY_VECTORS` vectors of lanes.
    piece_len: usize,
}

impl Shape<'_> {
    /// Token and query head of the `index`-th query of a kv head `kv` (token-major).
    fn token_head(&self, kv: usize, index: usize) -> (usize, usize) {
        (index / self.group, kv * self.group + index % self.group)
    }

    fn position(&self, index: usize) -> usize {
        self.first + index / self.group
    }
}

/// Queries `queries` (indices into the token-major list) of kv head `kv`.
struct Piece {
    kv: usize,
    queries: std::ops::Range<usize>,
}

/// A partial holds the running max and sum of each of `piece_len` queries, then their
/// unnormalized `D`-element sums.
fn partial_len(piece_len: usize, d: usize) -> usize {
    piece_len * (2 + d)
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One piece's chunk partials, in the tasks that run all of a piece's chunks.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attends a piece's queries to one chunk of keys, leaving `(max, sum, acc)` per query in
/// `partial` (see [`partial_len`]).
struct AttendPiece<'a> {
    shape: &'a Shape<'a>,
    piece: &'a Piece,
    keys: std::ops::Range<usize>,
    partial: &'a mut [f32],
}

impl SimdTask for AttendPiece<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let vectors = self.piece.queries.len().div_ceil(S::LANES);
        // SAFETY: `attention` checked q, out and the cache for every token and position; pieces
        // cover disjoint (token, head) outputs.
        unsafe {
            match vectors {
                1 => attend::<S, 1>(self),
                2 => attend::<S, 2>(self),
                _ => attend::<S, 3>(self),
            }
        }
    }
}

/// Attends the piece's queries (QV vectors of them) to keys `task.keys`, one chunk.
#[inline(always)]
unsafe fn attend<S: Simd, const QV: usize>(task: AttendPiece) {
    let sh = task.shape;
    let d = sh.d;
    let width = QV * S::LANES;
    let nq = task.piece.queries.len();
    let key_stride = sh.n_kv_heads * d;
    let kv_offset = task.piece.kv * d;
    // Taken out of the thread-local rather than used in `with`'s closure, which would be compiled
    // without the ISA's target features.
    let mut buf = SCRATCH.take();
    {
        let (qt_len, s_len, acc_len) = (d * width, KEY_BLOCK * width, nq * d);
        let need = qt_len + s_len + acc_len + 4 * width;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (qt, rest) = buf.split_at_mut(qt_len);
        let (scores, rest) = rest.split_at_mut(s_len);
        let (acc, rest) = rest.split_at_mut(acc_len);
        let (limit, rest) = rest.split_at_mut(width);
        let (run_max, rest) = rest.split_at_mut(width);
        let (run_sum, rest) = rest.split_at_mut(width);
        let corr = &mut rest[..width];

        // Transposed, pre-scaled queries: qt[dd][lane]; padding lanes stay zero and see every key.
        qt.fill(0.0);
        limit.fill(f32::MAX);
        for (lane, index) in task.piece.queries.clone().enumerate() {
            let (token, head) = sh.token_head(task.piece.kv, index);
            let row = &sh.q[token * sh.q_stride + head * d..][..d];
            for (dd, &x) in row.iter().enumerate() {
                qt[dd * width + lane] = x * sh.scale;
            }
            limit[lane] = sh.position(index) as f32;
        }
        let min_position = sh.position(task.piece.queries.start);
        run_max.fill(f32::NEG_INFINITY);
        run_sum.fill(0.0);
        acc.fill(0.0);

        let mut j0 = task.keys.start;
        while j0 < task.keys.end {
            // A block of keys never crosses a page: its rows are contiguous.
            let bk = (task.keys.end - j0)
                .min(KEY_BLOCK)
                .min(sh.block_size - j0 % sh.block_size);
            let row0 = row_offset(sh.blocks, sh.block_size, key_stride, j0);
            let key0 = sh.keys.as_ptr().add(row0 + kv_offset);
            let s = scores.as_mut_ptr();
            match nq {
                1 => block_scores_few::<S, 1>(key0, key_stride, d, bk, qt.as_ptr(), width, s),
                2 => block_scores_few::<S, 2>(key0, key_stride, d, bk, qt.as_ptr(), width, s),
                3 => block_scores_few::<S, 3>(key0, key_stride, d, bk, qt.as_ptr(), width, s),
                FEW_QUERIES => block_scores_few::<S, FEW_QUERIES>(
                    key0,
                    key_stride,
                    d,
                    bk,
                    qt.as_ptr(),
                    width,
                    s,
                ),
                _ => block_scores::<S, QV>(key0, key_stride, d, bk, qt.as_ptr(), s),
            }
            let masked = j0 + bk - 1 > min_position;
            block_softmax::<S, QV>(scores, bk, j0, masked, limit, run_max, run_sum, corr);
            let value0 = sh.values.as_ptr().add(row0 + kv_offset);
            for lane in 0..nq {
                // Only keys up to the query's position: a masked key's weight is zero, but adding
                // its zero product could still turn a -0 sum into +0.
                let valid = (sh.position(task.piece.queries.start + lane) + 1).saturating_sub(j0);
                accumulate_values::<S>(
                    &mut acc[lane * d..][..d],
                    corr[lane],
                    scores,
                    width,
                    lane,
                    bk.min(valid),
                    value0,
                    key_stride,
                );
            }
            j0 += bk;
        }

        let partial = task.partial;
        partial[..nq].copy_from_slice(&run_max[..nq]);
        partial[sh.piece_len..][..nq].copy_from_slice(&run_sum[..nq]);
        partial[2 * sh.piece_len..][..nq * d].copy_from_slice(acc);
    }
    SCRATCH.set(buf);
}

/// `scores[j][lane] = keys[j] . qt[.][lane]` for `bk` keys and the first NQ lanes, for pieces
/// so small (decode) that most lanes of [`block_scores`] would be idle: here the lanes hold keys
/// instead. Blocks of LANES keys x LANES dimensions are transposed in registers, then each
/// query's element is broadcast against them. Every score is still one FMA chain over the head
/// dimension in order, with the same operands as in `block_scores`, so both give the same bits.
/// Two key blocks are in flight at once for 2 NQ independent chains.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_scores_few<S: Simd, const NQ: usize>(
    key0: *const f32,
    key_stride: usize,
    d: usize,
    bk: usize,
    qt: *const f32,
    width: usize,
    scores: *mut f32,
) {
    let mut j = 0;
    while j < bk {
        let counts = [
            (bk - j).min(S::LANES),
            (bk - j).saturating_sub(S::LANES).min(S::LANES),
        ];
        let mut acc = [[S::zero(); NQ]; 2];
        let mut dd = 0;
        while dd < d {
            let n = (d - dd).min(S::LANES);
            for (half, &keys) in counts.iter().enumerate() {
                if keys == 0 {
                    continue;
                }
                let mut block = [S::zero(); 16];
                let first = j + half * S::LANES;
                for (r, row) in block.iter_mut().enumerate().take(keys) {
                    *row = load_n::<S>(key0.add((first + r) * key_stride + dd), n);
                }
                S::transpose(&mut block[..S::LANES]);
                for (i, dim) in block.iter().enumerate().take(n) {
                    for (q, sum) in acc[half].iter_mut().enumerate() {
                        let qv = S::splat(*qt.add((dd + i) * width + q));
                        *sum = S::mul_add(qv, *dim, *sum);
                    }
                }
            }
            dd += n;
        }
        let mut lanes = [0f32; 16];
        for (half, &keys) in counts.iter().enumerate() {
            for (q, &a) in acc[half].iter().enumerate() {
                S::store(lanes.as_mut_ptr(), a);
                for (r, &score) in lanes.iter().enumerate().take(keys) {
                    *scores.add((j + half * S::LANES + r) * width + q) = score;
                }
            }
        }
        j += counts[0] + counts[1];
    }
}

/// `scores[j][lane] = keys[j] . qt[.][lane]` for `bk` keys, several keys per step.
#[inline(always)]
unsafe fn block_scores<S: Simd, const QV: usize>(
    key0: *const f32,
    key_stride: usize,
    d: usize,
    bk: usize,
    qt: *const f32,
    scores: *mut f32,
) {
    // Keys per step: as many accumulators (keys x QV) as fit beside QV query vectors and one
    // broadcast, 16 vector registers on AVX2 and the portable path, 32 on AVX-512.
    let wide = S::ISA == CpuIsa::Avx512;
    let mut j = 0;
    macro_rules! steps {
        ($keys:literal) => {
            while j + $keys <= bk {
                score_keys::<S, QV, $keys>(
                    key0.add(j * key_stride),
                    key_stride,
                    d,
                    qt,
                    scores.add(j * QV * S::LANES),
                );
                j += $keys;
            }
        };
    }
    match (QV, wide) {
        (1, false) => steps!(8),
        (2, false) => steps!(5),
        (_, false) => steps!(3),
        (1, true) => steps!(16),
        (2, true) => steps!(12),
        (_, true) => steps!(8),
    }
    while j < bk {
        score_keys::<S, QV, 1>(
            key0.add(j * key_stride),
            key_stride,
            d,
            qt,
            scores.add(j * QV * S::LANES),
        );
        j += 1;
    }
}

#[inline(always)]
unsafe fn score_keys<S: Simd, const QV: usize, const KEYS: usize>(
    key0: *const f32,
    key_stride: usize,
    d: usize,
    qt: *const f32,
    scores: *mut f32,
) {
    let width = QV * S::LANES;
    let mut keys = [key0; KEYS];
    for (r, k) in keys.iter_mut().enumerate() {
        *k = key0.add(r * key_stride);
    }
    let mut acc = [[S::zero(); QV]; KEYS];
    let mut qv = [S::zero(); QV];
    for dd in 0..d {
        for (v, q) in qv.iter_mut().enumerate() {
            *q = S::load(qt.add(dd * width + v * S::LANES));
        }
        for r in 0..KEYS {
            let kb = S::splat(*keys[r].add(dd));
            for v in 0..QV {
                acc[r][v] = S::mul_add(kb, qv[v], acc[r][v]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &a) in row.iter().enumerate() {
            S::store(scores.add(r * width + v * S::LANES), a);
        }
    }
}

/// Masks keys past each query's position, turns scores into `exp(score - max)`, and updates the
/// running max and sum; `corr` receives the factor that rescales each query's earlier sums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_softmax<S: Simd, const QV: usize>(
    scores: &mut [f32],
    bk: usize,
    j0: usize,
    masked: bool,
    limit: &[f32],
    run_max: &mut [f32],
    run_sum: &mut [f32],
    corr: &mut [f32],
) {
    let width = QV * S::LANES;
    let s = scores.as_mut_ptr();
    let neg_inf = S::splat(f32::NEG_INFINITY);
    for v in 0..QV {
        let lane0 = v * S::LANES;
        let lim = S::load(limit.as_ptr().add(lane0));
        let mut block_max = neg_inf;
        for j in 0..bk {
            let p = s.add(j * width + lane0);
            let mut x = S::load(p);
            if masked {
                x = S::select_gt(S::splat((j0 + j) as f32), lim, neg_inf, x);
                S::store(p, x);
            }
            block_max = S::max(block_max, x);
        }
        let old_max = S::load(run_max.as_ptr().add(lane0));
        let new_max = S::max(old_max, block_max);
        // A lane with no valid key yet keeps max -inf; subtracting -f32::MAX instead keeps
        // every exp argument -inf (weight 0) rather than NaN.
        let shift = S::max(new_max, S::splat(-f32::MAX));
        let c = simd::exp::<S>(S::sub(old_max, shift));
        let mut sum = S::zero();
        for j in 0..bk {
            let p = s.add(j * width + lane0);
            let e = simd::exp::<S>(S::sub(S::load(p), shift));
            S::store(p, e);
            sum = S::add(sum, e);
        }
        let old_sum = S::load(run_sum.as_ptr().add(lane0));
        S::store(run_sum.as_mut_ptr().add(lane0), S::mul_add(old_sum, c, sum));
        S::store(run_max.as_mut_ptr().add(lane0), new_max);
        S::store(corr.as_mut_ptr().add(lane0), c);
    }
}

/// `acc = acc * corr + sum_j p[j][lane] * value[j]` over one query's D elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate_values<S: Simd>(
    acc: &mut [f32],
    corr: f32,
    probs: &[f32],
    width: usize,
    lane: usize,
    bk: usize,
    value0: *const f32,
    value_stride: usize,
) {
    let d = acc.len();
    let full = d / S::LANES;
    let mut v = 0;
    // Up to 8 vectors (D = 64 on AVX2, 128 on AVX-512) stay in registers across all keys.
    while v < full {
        let n = (full - v).min(8);
        let at = v * S::LANES;
        let a = acc.as_mut_ptr().add(at);
        let val = value0.add(at);
        match n {
            1 => values_in_registers::<S, 1>(a, corr, probs, width, lane, bk, val, value_stride),
            2 => values_in_registers::<S, 2>(a, corr, probs, width, lane, bk, val, value_stride),
            3 => values_in_registers::<S, 3>(a, corr, probs, width, lane, bk, val, value_stride),
            4 => values_in_registers::<S, 4>(a, corr, probs, width, lane, bk, val, value_stride),
            5 => values_in_registers::<S, 5>(a, corr, probs, width, lane, bk, val, value_stride),
            6 => values_in_registers::<S, 6>(a, corr, probs, width, lane, bk, val, value_stride),
            7 => values_in_registers::<S, 7>(a, corr, probs, width, lane, bk, val, value_stride),
            _ => values_in_registers::<S, 8>(a, corr, probs, width, lane, bk, val, value_stride),
        }
        v += n;
    }
    let rest = d - full * S::LANES;
    if rest > 0 {
        let at = full * S::LANES;
        let a = acc.as_mut_ptr().add(at);
        let mut sum = S::mul(load_n::<S>(a, rest), S::splat(corr));
        for j in 0..bk {
            let p = S::splat(probs[j * width + lane]);
            sum = S::mul_add(p, load_n::<S>(value0.add(j * value_stride + at), rest), sum);
        }
        store_n::<S>(a, sum, rest);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn values_in_registers<S: Simd, const NV: usize>(
    acc: *mut f32,
    corr: f32,
    probs: &[f32],
    width: usize,
    lane: usize,
    bk: usize,
    value0: *const f32,
    value_stride: usize,
) {
    let c = S::splat(corr);
    let mut sum = [S::zero(); NV];
    for (v, s) in sum.iter_mut().enumerate() {
        *s = S::mul(S::load(acc.add(v * S::LANES)), c);
    }
    for j in 0..bk {
        let p = S::splat(*probs.get_unchecked(j * width + lane));
        let row = value0.add(j * value_stride);
        for (v, s) in sum.iter_mut().enumerate() {
            *s = S::mul_add(p, S::load(row.add(v * S::LANES)), *s);
        }
    }
    for (v, s) in sum.iter().enumerate() {
        S::store(acc.add(v * S::LANES), *s);
    }
}

/// Combines a piece's chunk partials in chunk order and writes the normalized outputs. Each
/// query merges the chunks up to its own position's only, so how many more its piece had (later
/// tokens of the same pass) does not matter.
fn merge_chunks(sh: &Shape, piece: &Piece, partials: &[f32], slot: usize) {
    let d = sh.d;
    let mut sum = vec![0f32; d];
    for (lane, index) in piece.queries.clone().enumerate() {
        let chunks = (partials.len() / slot).min(sh.position(index) / KEY_CHUNK + 1);
        let max = (0..chunks)
            .map(|c| partials[c * slot + lane])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        sum.fill(0.0);
        for c in 0..chunks {
            let part = &partials[c * slot..][..slot];
            let weight = (part[lane] - max).exp();
            total += part[sh.piece_len + lane] * weight;
            for (s, &a) in sum
                .iter_mut()
                .zip(&part[2 * sh.piece_len + lane * d..][..d])
            {
                *s += a * weight;
            }
        }
        let (token, head) = sh.token_head(piece.kv, index);
        // SAFETY: `attention` checked `out` for every token; each (token, head) is written once.
        let out = unsafe {
            std::slice::from_raw_parts_mut(sh.out.0.add(token * sh.out_stride + head * d), d)
        };
        for (o, s) in out.iter_mut().zip(&sum) {
            *o = s / total;
        }
    }
}

/// Scalar attention in f64 with a two-pass softmax.
pub mod reference {
    use super::KvLayerMut;

    /// Same contract as [`super::attention`]; panics on bad shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &[f32],
        q_stride: usize,
        k: &[f32],
        k_stride: usize,
        v: &[f32],
        v_stride: usize,
        t: usize,
        positions: &[u32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: f32,
        cache: &mut KvLayerMut,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let d = head_dim;
        let row = n_kv_heads * d;
        for i in 0..t {
            let at = cache.row_offset(positions[i] as usize);
            cache.k[at..][..row].copy_from_slice(&k[i * k_stride..][..row]);
            cache.v[at..][..row].copy_from_slice(&v[i * v_stride..][..row]);
        }
        let group = n_heads / n_kv_heads;
        for i in 0..t {
            let p = positions[i] as usize;
            for h in 0..n_heads {
                let kv = h / group;
                let qv = &q[i * q_stride + h * d..][..d];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let kj = &cache.k[cache.row_offset(j) + kv * d..][..d];
                        qv.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for dd in 0..d {
                    let acc: f64 = (0..=p)
                        .map(|j| weights[j] * cache.v[cache.row_offset(j) + kv * d + dd] as f64)
                        .sum();
                    out[i * out_stride + h * d + dd] = (acc / total) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, on_threads, Rng};
    use super::*;

    struct Case {
        heads: usize,
        kv_heads: usize,
        d: usize,
        /// Tokens per call, in order; positions continue from one call to the next.
        calls: Vec<usize>,
    }

    /// Runs the calls through the kernel and the reference with the same inputs and returns
    /// the largest difference of any output.
    fn run_case(isa: CpuIsa, case: &Case, rng: &mut Rng, threads: usize) -> (f32, Vec<f32>) {
        let (h, kvh, d) = (case.heads, case.kv_heads, case.d);
        let capacity = case.calls.iter().sum::<usize>() + 3;
        let row = kvh * d;
        let mut cache_k = vec![f32::NAN; capacity * row];
        let mut cache_v = vec![f32::NAN; capacity * row];
        let mut ref_k = cache_k.clone();
        let mut ref_v = cache_v.clone();
        let scale = 1.0 / (d as f32).sqrt();
        let mut worst = 0f32;
        let mut last = Vec::new();
        let mut pos = 0;
        for &t in &case.calls {
            let q_stride = h * d + 5;
            let q = rng.vec(t * q_stride, 2.0);
            let k = rng.vec(t * row, 2.0);
            let v = rng.vec(t * (row + 1), 1.0);
            let positions: Vec<u32> = (pos..pos + t).map(|p| p as u32).collect();
            let mut got = vec![0f32; t * h * d];
            let mut want = vec![0f32; t * h * d];
            let mut cache = KvLayerMut::contiguous(&mut cache_k, &mut cache_v, capacity, kvh, d);
            on_threads(threads, || {
                attention(
                    isa,
                    &q,
                    q_stride,
                    &k,
                    row,
                    &v,
                    row + 1,
                    t,
                    &positions,
                    h,
                    kvh,
                    d,
                    scale,
                    &mut cache,
                    &mut got,
                    h * d,
                )
                .unwrap()
            });
            let mut cache = KvLayerMut::contiguous(&mut ref_k, &mut ref_v, capacity, kvh, d);
            reference::attention(
                &q,
                q_stride,
                &k,
                row,
                &v,
                row + 1,
                t,
                &positions,
                h,
                kvh,
                d,
                scale,
                &mut cache,
                &mut want,
                h * d,
            );
            worst = worst.max(max_abs_diff(&got, &want));
            last = got;
            pos += t;
        }
        (worst, last)
    }

    #[test]
    fn matches_reference_for_prefill_then_decode() {
        let cases = [
            Case {
                heads: 1,
                kv_heads: 1,
                d: 1,
                calls: vec![1, 1, 2],
            },
            Case {
                heads: 9,
                kv_heads: 3,
                d: 64,
                calls: vec![70, 1, 1, 5],
            },
            Case {
                heads: 4,
                kv_heads: 1,
                d: 18,
                calls: vec![3, 40, 1],
            },
            Case {
                heads: 6,
                kv_heads: 6,
                d: 20,
                calls: vec![33, 2],
            },
            Case {
                heads: 32,
                kv_heads: 2,
                d: 8,
                calls: vec![9, 1],
            },
            // Long enough for several key chunks in decode and several key blocks in prefill.
            Case {
                heads: 3,
                kv_heads: 1,
                d: 16,
                calls: vec![600, 1, 1],
            },
            // Many pieces: the unsplit path.
            Case {
                heads: 9,
                kv_heads: 3,
                d: 64,
                calls: vec![300, 1],
            },
        ];
        let mut rng = Rng::new(21);
        for isa in isas_to_test() {
            for case in &cases {
                let (diff, _) = run_case(isa, case, &mut rng, 2);
                println!(
                    "attention {isa:?} H={} KV={} D={} calls={:?}: max abs diff {diff:.3e}",
                    case.heads, case.kv_heads, case.d, case.calls
                );
                assert!(diff < 2e-5, "{isa:?}: {diff}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        for isa in isas_to_test() {
            for calls in [vec![700, 1], vec![40]] {
                let case = Case {
                    heads: 9,
                    kv_heads: 3,
                    d: 64,
                    calls,
                };
                let (_, one) = run_case(isa, &case, &mut Rng::new(3), 1);
                for threads in [2, 3] {
                    let (_, many) = run_case(isa, &case, &mut Rng::new(3), threads);
                    assert!(
                        one.iter()
                            .zip(&many)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} threads={threads}"
                    );
                }
            }
        }
    }

    /// Attends one fixed sequence of `q`, `k`, `v` rows with `(H, KV, D)` heads, passed to the
    /// kernel in calls of `split` tokens, on `threads` threads; returns every token's output.
    fn run_split(
        isa: CpuIsa,
        (h, kvh, d): (usize, usize, usize),
        split: &[usize],
        threads: usize,
    ) -> Vec<f32> {
        let total: usize = split.iter().sum();
        let mut rng = Rng::new(77);
        let q = rng.vec(total * h * d, 2.0);
        let k = rng.vec(total * kvh * d, 2.0);
        let v = rng.vec(total * kvh * d, 1.0);
        let (mut ck, mut cv) = (vec![0f32; total * kvh * d], vec![0f32; total * kvh * d]);
        let mut out = vec![0f32; total * h * d];
        let mut pos = 0;
        for &t in split {
            let mut cache = KvLayerMut::contiguous(&mut ck, &mut cv, total, kvh, d);
            let positions: Vec<u32> = (pos..pos + t).map(|p| p as u32).collect();
            let (qr, kr, o) = (h * d, kvh * d, h * d);
            on_threads(threads, || {
                attention(
                    isa,
                    &q[pos * qr..],
                    qr,
                    &k[pos * kr..],
                    kr,
                    &v[pos * kr..],
                    kr,
                    t,
                    &positions,
                    h,
                    kvh,
                    d,
                    0.125,
                    &mut cache,
                    &mut out[pos * o..],
                    o,
                )
                .unwrap()
            });
            pos += t;
        }
        out
    }

    /// A token's output must be the same bits whether its sequence came in one prefill call,
    /// one token at a time, or in uneven pieces: 600 tokens span three key chunks, and the
    /// splits exercise both the split-key (few pieces) and whole-piece (many pieces) schedules,
    /// and both score forms (keys in lanes for decode, queries in lanes for prefill), with a
    /// head dimension that is and one that is not a whole number of vectors.
    #[test]
    fn outputs_do_not_depend_on_how_the_sequence_is_split_into_calls() {
        for (isa, heads) in isas_to_test()
            .into_iter()
            .flat_map(|isa| [(isa, (9, 3, 64)), (isa, (4, 1, 20))])
        {
            let whole = run_split(isa, heads, &[600], 2);
            let mut splits = vec![vec![1; 600], vec![37, 1, 250, 2, 300, 10]];
            splits.push(vec![300, 300]);
            for (split, threads) in splits.iter().zip([1, 3, 2]) {
                let got = run_split(isa, heads, split, threads);
                let first_bad = whole
                    .iter()
                    .zip(&got)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    first_bad,
                    None,
                    "{isa:?} {heads:?}: split {:?}... differs from one call",
                    &split[..split.len().min(6)]
                );
            }
        }
    }

    #[test]
    fn a_single_key_returns_its_value_and_the_cache_gets_the_rows() {
        let (h, d) = (2, 4);
        let q = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 9.0];
        let k = [0.3, 0.1, -0.2, 0.7];
        let v = [5.0, 6.0, 7.0, 8.0];
        for isa in isas_to_test() {
            let (mut ck, mut cv) = (vec![0.0; 8], vec![0.0; 8]);
            let mut cache = KvLayerMut::contiguous(&mut ck, &mut cv, 2, 1, d);
            let mut out = vec![0.0; h * d];
            attention(
                isa,
                &q,
                8,
                &k,
                4,
                &v,
                4,
                1,
                &[0],
                h,
                1,
                d,
                0.5,
                &mut cache,
                &mut out,
                8,
            )
            .unwrap();
            assert_eq!(out, [5.0, 6.0, 7.0, 8.0, 5.0, 6.0, 7.0, 8.0], "{isa:?}");
            assert_eq!(&ck[..4], &k);
            assert_eq!(&cv[..4], &v);
        }
    }

    #[test]
    fn rejects_bad_positions_and_a_full_cache() {
        let (mut ck, mut cv) = (vec![0.0; 8], vec![0.0; 8]);
        let mut cache = KvLayerMut::contiguous(&mut ck, &mut cv, 2, 1, 4);
        let x = [0.0; 8];
        let mut out = [0.0; 8];
        let mut call = |t, pos: &[u32], cache: &mut KvLayerMut| {
            attention(
                CpuIsa::Portable,
                &x,
                4,
                &x,
                4,
                &x,
                4,
                t,
                pos,
                1,
                1,
                4,
                1.0,
                cache,
                &mut out,
                4,
            )
        };
        assert!(matches!(
            call(2, &[0, 2], &mut cache),
            Err(KernelError::Positions { .. })
        ));
        assert!(matches!(
            call(1, &[2], &mut cache),
            Err(KernelError::Positions { .. })
        ));
        assert!(matches!(
            call(1, &[0, 1], &mut cache),
            Err(KernelError::Positions { .. })
        ));
        assert!(call(2, &[0, 1], &mut cache).is_ok());
        let (mut wrong_k, mut wrong_v) = ([0.0; 8], [0.0; 8]);
        let mut wrong = KvLayerMut::contiguous(&mut wrong_k, &mut wrong_v, 2, 2, 4);
        assert!(matches!(
            call(1, &[0], &mut wrong),
            Err(KernelError::Shape { .. })
        ));
    }

    /// The same calls against a contiguous cache and against scattered blocks of several sizes:
    /// the paged reads and writes must land on the same keys. With blocks of `KEY_BLOCK` or more
    /// positions the blocking of keys is the same, so the outputs are the same bits.
    #[test]
    fn paged_cache_matches_the_contiguous_one() {
        let (h, kvh, d) = (6, 2, 16);
        let row = kvh * d;
        let calls = [5usize, 1, 70, 1, 300, 1, 2];
        let total: usize = calls.iter().sum();
        let mut rng = Rng::new(41);
        let inputs: Vec<_> = calls
            .iter()
            .map(|&t| {
                (
                    rng.vec(t * h * d, 2.0),
                    rng.vec(t * row, 2.0),
                    rng.vec(t * row, 1.0),
                )
            })
            .collect();
        let run = |cache: &mut KvLayerMut| {
            let mut outs = vec![];
            let mut pos = 0;
            for (&t, (q, k, v)) in calls.iter().zip(&inputs) {
                let positions: Vec<u32> = (pos..pos + t).map(|p| p as u32).collect();
                let mut out = vec![0f32; t * h * d];
                attention(
                    CpuIsa::Avx2,
                    q,
                    h * d,
                    k,
                    row,
                    v,
                    row,
                    t,
                    &positions,
                    h,
                    kvh,
                    d,
                    0.25,
                    cache,
                    &mut out,
                    h * d,
                )
                .expect("attention");
                outs.extend(out);
                pos += t;
            }
            outs
        };
        let (mut ck, mut cv) = (vec![f32::NAN; total * row], vec![f32::NAN; total * row]);
        let want = run(&mut KvLayerMut::contiguous(&mut ck, &mut cv, total, kvh, d));
        for block_size in [1usize, 16, 64, 128] {
            let needed = total.div_ceil(block_size);
            // Twice the blocks the sequence needs, handed out in a scrambled order.
            let pool = 2 * needed;
            let blocks: Vec<u32> = (0..needed).map(|i| ((i * 7 + 3) % pool) as u32).collect();
            let (mut pk, mut pv) = (
                vec![f32::NAN; pool * block_size * row],
                vec![f32::NAN; pool * block_size * row],
            );
            let got = run(&mut KvLayerMut {
                k: &mut pk,
                v: &mut pv,
                block_size,
                blocks: &blocks,
                kv_heads: kvh,
                head_dim: d,
            });
            let worst = max_abs_diff(&got, &want);
            if block_size % KEY_BLOCK == 0 {
                assert_eq!(worst, 0.0, "block size {block_size}");
            } else {
                assert!(worst < 1e-5, "block size {block_size}: {worst}");
            }
        }
    }

    #[test]
    fn blocks_outside_the_pool_are_refused() {
        // Two blocks of two positions of one head of 4.
        let (mut k, mut v) = (vec![0f32; 2 * 2 * 4], vec![0f32; 2 * 2 * 4]);
        let mut cache = KvLayerMut {
            k: &mut k,
            v: &mut v,
            block_size: 2,
            blocks: &[0, 2],
            kv_heads: 1,
            head_dim: 4,
        };
        let one = [0f32; 4];
        let mut out = [0f32; 4];
        let err = attention(
            CpuIsa::Portable,
            &one,
            4,
            &one,
            4,
            &one,
            4,
            1,
            &[0],
            1,
            1,
            4,
            1.0,
            &mut cache,
            &mut out,
            4,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("block 2 is outside the pool of 2 blocks"),
            "{err}"
        );
    }
}
