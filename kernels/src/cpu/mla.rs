//! Multi-head latent attention (DeepSeek-V2/V3) on a latent KV cache.
//!
//! Legend: `L` latent rank (`kv_lora`), `N` per-head no-rope query/key dim, `P` rope dim, `V`
//! per-head value dim, `W = L + P` the cached row.
//!
//! The model's keys and values are up-projections of one shared latent per token:
//! `k_h = [B_k(h) @ c | k_rope]`, `v_h = B_v(h) @ c`, with `B_k(h)` `[N, L]` and `B_v(h)` `[V, L]`
//! head h's rows of `kv_b` (`[H*(N+V), L]`, N key rows then V value rows per head). The cache
//! keeps only `[c | rope(k_rope)]`, `W` values per position per layer, and attention runs on it
//! with the projections absorbed (associativity of the products):
//! `q_h . k_h = (B_k(h)^T q_nope) . c + rope(q_rope) . rope(k_rope)` and
//! `sum_s p_s v_h(s) = B_v(h) @ (sum_s p_s c_s)`, so no per-position key or value is ever formed.
//!
//! Every (token, head) is computed by itself in one fixed order (scores over positions `0..=p`
//! in order, one running sum per dot product), so a token's result does not depend on the other
//! tokens of its pass, on the thread count, or on how the cache is paged.

use super::pool;
use super::{check_len, check_rows, KvLayerMut, Weight};
use crate::KernelError;

const NAME: &str = "mla_attention";

/// The attributes of one MLA layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlaParams {
    pub n_heads: usize,
    pub nope_dim: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    pub kv_lora: usize,
    /// Multiplies `q . k`.
    pub scale: f32,
    /// RoPE rotates pairs `(2i, 2i + 1)`; otherwise `(i, i + P/2)`.
    pub rope_interleaved: bool,
}

impl MlaParams {
    /// Values one cached position holds: the latent and the rotated rope key.
    pub fn cache_width(&self) -> usize {
        self.kv_lora + self.rope_dim
    }
}

/// The RoPE tables, `[positions, stride]` f32, column i the angle of frequency i.
#[derive(Clone, Copy, Debug)]
pub struct RopeTables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub stride: usize,
}

impl RopeTables<'_> {
    /// Rotates `x` (`P` values) in place by the angles of position `pos`.
    fn rotate(&self, x: &mut [f32], pos: usize, interleaved: bool) {
        let half = x.len() / 2;
        let (cos, sin) = (
            &self.cos[pos * self.stride..][..half],
            &self.sin[pos * self.stride..][..half],
        );
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * cos[i] - xb * sin[i];
            x[b] = xb * cos[i] + xa * sin[i];
        }
    }
}

/// Appends the new tokens' latents and rope keys to `cache`, then attends.
///
/// Shapes: `q` `[T, H*(N+P)]` (per head N no-rope then P rope values), `latent` `[T, L]`,
/// `k_rope` `[T, P]`, `out` `[T, H*V]`, f32 with their own row strides; `kv_b` `[H*(N+V), L]`
/// row-major; `positions` `[T]`, consecutive and below the cache capacity; `cache` one layer of
/// one kv head of `W` values (its `v` pool is not used). Token i at position p attends to cache
/// positions `0..=p`.
#[allow(clippy::too_many_arguments)]
pub fn mla_attention(
    q: &[f32],
    q_stride: usize,
    latent: &[f32],
    latent_stride: usize,
    k_rope: &[f32],
    k_rope_stride: usize,
    t: usize,
    positions: &[u32],
    kv_b: &Weight,
    params: &MlaParams,
    rope: &RopeTables,
    cache: &mut KvLayerMut,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    check(
        q.len(),
        q_stride,
        latent.len(),
        latent_stride,
        k_rope.len(),
        k_rope_stride,
        t,
        positions,
        kv_b,
        params,
        rope,
        cache,
        out.len(),
        out_stride,
    )?;
    if t == 0 {
        return Ok(());
    }
    let (l, p) = (params.kv_lora, params.rope_dim);
    for i in 0..t {
        let pos = positions[i] as usize;
        let at = cache.row_offset(pos);
        let row = &mut cache.k[at..at + l + p];
        row[..l].copy_from_slice(&latent[i * latent_stride..][..l]);
        row[l..].copy_from_slice(&k_rope[i * k_rope_stride..][..p]);
        rope.rotate(&mut row[l..], pos, params.rope_interleaved);
    }
    let cache = &*cache;
    let cols = params.n_heads * params.v_dim;
    let rows_len = out.len().min(t * out_stride.max(1));
    pool::for_each_chunk_mut(&mut out[..rows_len], out_stride.max(1), |i, out_row| {
        let mut work = Scratch::default();
        attend_token(
            &q[i * q_stride..][..params.n_heads * (params.nope_dim + p)],
            positions[i] as usize,
            kv_b,
            params,
            rope,
            cache,
            &mut work,
            &mut out_row[..cols],
        );
    });
    Ok(())
}

/// Per-task buffers, reused across heads.
#[derive(Default)]
struct Scratch {
    q_latent: Vec<f32>,
    q_rope: Vec<f32>,
    scores: Vec<f32>,
    o_latent: Vec<f32>,
}

/// One token, all heads: `out` `[H*V]`.
#[allow(clippy::too_many_arguments)]
fn attend_token(
    q: &[f32],
    pos: usize,
    kv_b: &Weight,
    params: &MlaParams,
    rope: &RopeTables,
    cache: &KvLayerMut,
    work: &mut Scratch,
    out: &mut [f32],
) {
    let (n, p, v, l) = (
        params.nope_dim,
        params.rope_dim,
        params.v_dim,
        params.kv_lora,
    );
    let kv_b_at = |row: usize, col: usize| kv_b.data.get_f32(row * l + col);
    for h in 0..params.n_heads {
        let q_head = &q[h * (n + p)..][..n + p];
        // q_latent = B_k(h)^T q_nope, rows of B_k(h) added in order.
        work.q_latent.clear();
        work.q_latent.resize(l, 0.0);
        let key_rows = h * (n + v);
        for (r, &qn) in q_head[..n].iter().enumerate() {
            for (j, acc) in work.q_latent.iter_mut().enumerate() {
                *acc += kv_b_at(key_rows + r, j) * qn;
            }
        }
        work.q_rope.clear();
        work.q_rope.extend_from_slice(&q_head[n..]);
        rope.rotate(&mut work.q_rope, pos, params.rope_interleaved);

        work.scores.clear();
        let mut max = f32::NEG_INFINITY;
        for s in 0..=pos {
            let row = &cache.k[cache.row_offset(s)..][..l + p];
            let mut dot = 0.0f32;
            for (a, b) in work.q_latent.iter().zip(&row[..l]) {
                dot += a * b;
            }
            for (a, b) in work.q_rope.iter().zip(&row[l..]) {
                dot += a * b;
            }
            let score = dot * params.scale;
            max = max.max(score);
            work.scores.push(score);
        }
        let mut sum = 0.0f32;
        for score in work.scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        work.o_latent.clear();
        work.o_latent.resize(l, 0.0);
        for (s, &weight) in work.scores.iter().enumerate() {
            let row = &cache.k[cache.row_offset(s)..][..l];
            for (acc, c) in work.o_latent.iter_mut().zip(row) {
                *acc += weight * c;
            }
        }
        // out_h = B_v(h) @ o_latent / sum.
        let value_rows = key_rows + n;
        for (m, o) in out[h * v..][..v].iter_mut().enumerate() {
            let mut dot = 0.0f32;
            for (j, c) in work.o_latent.iter().enumerate() {
                dot += kv_b_at(value_rows + m, j) * c;
            }
            *o = dot / sum;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    q_len: usize,
    q_stride: usize,
    latent_len: usize,
    latent_stride: usize,
    k_rope_len: usize,
    k_rope_stride: usize,
    t: usize,
    positions: &[u32],
    kv_b: &Weight,
    params: &MlaParams,
    rope: &RopeTables,
    cache: &KvLayerMut,
    out_len: usize,
    out_stride: usize,
) -> Result<(), KernelError> {
    let (h, n, p, v, l) = (
        params.n_heads,
        params.nope_dim,
        params.rope_dim,
        params.v_dim,
        params.kv_lora,
    );
    let bad = |what: String| Err(KernelError::shape(NAME, what));
    if h == 0 || l == 0 || v == 0 || !p.is_multiple_of(2) {
        return bad(format!(
            "{h} heads of {n}+{p} with values {v} and latent {l}"
        ));
    }
    if kv_b.rows != h * (n + v) || kv_b.cols != l || kv_b.layout != super::WeightLayout::RowMajor {
        return bad(format!(
            "kv_b is [{}, {}] {:?}, not row-major [{}, {l}]",
            kv_b.rows,
            kv_b.cols,
            kv_b.layout,
            h * (n + v)
        ));
    }
    kv_b.check(NAME)?;
    if cache.kv_heads != 1 || cache.head_dim != params.cache_width() || cache.block_size == 0 {
        return bad(format!(
            "cache is {} kv heads x {} in blocks of {}, MLA needs 1 x {}",
            cache.kv_heads,
            cache.head_dim,
            cache.block_size,
            params.cache_width()
        ));
    }
    check_rows(NAME, "q", q_len, t, h * (n + p), q_stride)?;
    check_rows(NAME, "latent", latent_len, t, l, latent_stride)?;
    check_rows(NAME, "k_rope", k_rope_len, t, p, k_rope_stride)?;
    check_rows(NAME, "out", out_len, t, h * v, out_stride)?;
    check_len(NAME, "positions", positions.len(), t)?;
    if t == 0 {
        return Ok(());
    }
    let first = positions[0] as usize;
    if positions[..t]
        .iter()
        .enumerate()
        .any(|(i, &pos)| pos as usize != first + i)
    {
        return bad("positions are not consecutive".into());
    }
    let last = first + t - 1;
    if last >= cache.capacity() {
        return bad(format!(
            "position {last} is past the cache's {} positions",
            cache.capacity()
        ));
    }
    let blocks_used = last / cache.block_size + 1;
    let pool_rows = cache.k.len() / params.cache_width();
    if cache.blocks[..blocks_used]
        .iter()
        .any(|&b| (b as usize + 1) * cache.block_size > pool_rows)
    {
        return bad("a block of the table is outside the pool".into());
    }
    if rope.stride < p / 2 {
        return bad(format!("rope tables of {} for rope dim {p}", rope.stride));
    }
    let need = last * rope.stride + p / 2;
    check_len(NAME, "cos", rope.cos.len(), need)?;
    check_len(NAME, "sin", rope.sin.len(), need)?;
    Ok(())
}

pub mod reference {
    use super::*;

    /// MLA the way the model defines it: every head's keys and values decompressed from the
    /// latents (in f64), then plain causal softmax attention. `cache` is contiguous
    /// `[positions, W]` and receives the new rows as in [`super::mla_attention`].
    #[allow(clippy::too_many_arguments)]
    pub fn mla_attention(
        q: &[f32],
        q_stride: usize,
        latent: &[f32],
        latent_stride: usize,
        k_rope: &[f32],
        k_rope_stride: usize,
        t: usize,
        positions: &[u32],
        kv_b: &Weight,
        params: &MlaParams,
        rope: &RopeTables,
        cache: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (h_count, n, p, v, l) = (
            params.n_heads,
            params.nope_dim,
            params.rope_dim,
            params.v_dim,
            params.kv_lora,
        );
        let w = params.cache_width();
        for i in 0..t {
            let pos = positions[i] as usize;
            let row = &mut cache[pos * w..][..w];
            row[..l].copy_from_slice(&latent[i * latent_stride..][..l]);
            row[l..].copy_from_slice(&k_rope[i * k_rope_stride..][..p]);
            rope.rotate(&mut row[l..], pos, params.rope_interleaved);
        }
        let up = |row: usize, c: &[f32]| -> f64 {
            (0..l)
                .map(|j| kv_b.data.get_f32(row * l + j) as f64 * c[j] as f64)
                .sum()
        };
        for i in 0..t {
            let pos = positions[i] as usize;
            for h in 0..h_count {
                let q_head = &q[i * q_stride + h * (n + p)..][..n + p];
                let mut q_rope = q_head[n..].to_vec();
                rope.rotate(&mut q_rope, pos, params.rope_interleaved);
                let scores: Vec<f64> = (0..=pos)
                    .map(|s| {
                        let row = &cache[s * w..][..w];
                        let nope: f64 = (0..n)
                            .map(|r| q_head[r] as f64 * up(h * (n + v) + r, &row[..l]))
                            .sum();
                        let rot: f64 = (0..p).map(|r| q_rope[r] as f64 * row[l + r] as f64).sum();
                        (nope + rot) * params.scale as f64
                    })
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for m in 0..v {
                    let value: f64 = (0..=pos)
                        .map(|s| exps[s] * up(h * (n + v) + n + m, &cache[s * w..][..l]))
                        .sum();
                    out[i * out_stride + h * v + m] = (value / sum) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_abs_diff, Rng};
    use super::super::WeightData;
    use super::*;

    struct Case {
        params: MlaParams,
        kv_b: Vec<f32>,
        cos: Vec<f32>,
        sin: Vec<f32>,
    }

    impl Case {
        fn new(rng: &mut Rng, params: MlaParams, max_pos: usize) -> Case {
            let (h, n, v, l, p) = (
                params.n_heads,
                params.nope_dim,
                params.v_dim,
                params.kv_lora,
                params.rope_dim,
            );
            let half = p / 2;
            let mut cos = vec![0.0; max_pos * half];
            let mut sin = vec![0.0; max_pos * half];
            for pos in 0..max_pos {
                for i in 0..half {
                    let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / p as f64);
                    cos[pos * half + i] = angle.cos() as f32;
                    sin[pos * half + i] = angle.sin() as f32;
                }
            }
            Case {
                params,
                kv_b: rng.vec(h * (n + v) * l, 0.5),
                cos,
                sin,
            }
        }

        fn rope(&self) -> RopeTables<'_> {
            RopeTables {
                cos: &self.cos,
                sin: &self.sin,
                stride: self.params.rope_dim / 2,
            }
        }

        fn kv_b(&self) -> Weight<'_> {
            let p = &self.params;
            Weight::row_major(
                WeightData::F32(&self.kv_b),
                p.n_heads * (p.nope_dim + p.v_dim),
                p.kv_lora,
            )
        }

        /// Random inputs for `t` tokens: (q, latent, k_rope), each with a row stride 3 wider.
        fn inputs(&self, rng: &mut Rng, t: usize) -> [Vec<f32>; 3] {
            let p = &self.params;
            [
                rng.vec(t * (p.n_heads * (p.nope_dim + p.rope_dim) + 3), 1.0),
                rng.vec(t * (p.kv_lora + 3), 1.0),
                rng.vec(t * (p.rope_dim + 3), 1.0),
            ]
        }

        fn strides(&self) -> [usize; 4] {
            let p = &self.params;
            [
                p.n_heads * (p.nope_dim + p.rope_dim) + 3,
                p.kv_lora + 3,
                p.rope_dim + 3,
                p.n_heads * p.v_dim + 3,
            ]
        }

        /// Runs the kernel for tokens at `start..start + t` on a paged cache, returning `out`.
        fn run(
            &self,
            input: &[Vec<f32>; 3],
            start: usize,
            t: usize,
            pool: &mut [f32],
            block_size: usize,
            blocks: &[u32],
        ) -> Vec<f32> {
            let [qs, ls, ks, os] = self.strides();
            let positions: Vec<u32> = (start as u32..(start + t) as u32).collect();
            let mut out = vec![7.0; t * os];
            let mut cache = KvLayerMut {
                k: pool,
                v: &mut [],
                block_size,
                blocks,
                kv_heads: 1,
                head_dim: self.params.cache_width(),
            };
            mla_attention(
                &input[0],
                qs,
                &input[1],
                ls,
                &input[2],
                ks,
                t,
                &positions,
                &self.kv_b(),
                &self.params,
                &self.rope(),
                &mut cache,
                &mut out,
                os,
            )
            .unwrap();
            out
        }

        fn reference(
            &self,
            input: &[Vec<f32>; 3],
            start: usize,
            t: usize,
            cache: &mut [f32],
        ) -> Vec<f32> {
            let [qs, ls, ks, os] = self.strides();
            let positions: Vec<u32> = (start as u32..(start + t) as u32).collect();
            let mut out = vec![7.0; t * os];
            reference::mla_attention(
                &input[0],
                qs,
                &input[1],
                ls,
                &input[2],
                ks,
                t,
                &positions,
                &self.kv_b(),
                &self.params,
                &self.rope(),
                cache,
                &mut out,
                os,
            );
            out
        }
    }

    fn params(rope_interleaved: bool) -> MlaParams {
        MlaParams {
            n_heads: 3,
            nope_dim: 5,
            rope_dim: 4,
            v_dim: 6,
            kv_lora: 7,
            scale: 0.3,
            rope_interleaved,
        }
    }

    #[test]
    fn absorbed_matches_decompressed_reference() {
        let mut rng = Rng::new(3);
        for interleaved in [false, true] {
            let case = Case::new(&mut rng, params(interleaved), 64);
            let w = case.params.cache_width();
            // A prompt of 9 tokens, then two decode steps, on a paged cache with shuffled blocks.
            let (block_size, blocks) = (4, [5u32, 1, 3, 0]);
            let mut pool = vec![0.0; 6 * block_size * w];
            let mut contiguous = vec![0.0; 16 * w];
            for (start, t) in [(0, 9), (9, 1), (10, 1)] {
                let input = case.inputs(&mut rng, t);
                let got = case.run(&input, start, t, &mut pool, block_size, &blocks);
                let want = case.reference(&input, start, t, &mut contiguous);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-2, "output is not trivially small");
                assert!(
                    max_abs_diff(&got, &want) <= 1e-5 * scale.max(1.0),
                    "interleaved {interleaved}, tokens {start}..{}: {}",
                    start + t,
                    max_abs_diff(&got, &want)
                );
                let os = case.strides()[3];
                assert!(got.chunks(os).all(|r| r[os - 3..] == [7.0; 3]), "padding");
            }
        }
    }

    #[test]
    fn prefill_and_decode_agree_bit_for_bit() {
        let mut rng = Rng::new(5);
        let case = Case::new(&mut rng, params(true), 64);
        let w = case.params.cache_width();
        let input = case.inputs(&mut rng, 7);
        let [qs, ls, ks, os] = case.strides();
        let mut pool = vec![0.0; 8 * w];
        let all = case.run(&input, 0, 7, &mut pool, 8, &[0]);
        // The same tokens one at a time on a cache of blocks of 2.
        let mut paged = vec![0.0; 4 * 2 * w];
        for i in 0..7 {
            let one = [
                input[0][i * qs..][..qs].to_vec(),
                input[1][i * ls..][..ls].to_vec(),
                input[2][i * ks..][..ks].to_vec(),
            ];
            let got = case.run(&one, i, 1, &mut paged, 2, &[2, 0, 3, 1]);
            assert_eq!(got[..os - 3], all[i * os..][..os - 3], "token {i}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut rng = Rng::new(9);
        let case = Case::new(&mut rng, params(false), 8);
        let input = case.inputs(&mut rng, 2);
        let [qs, ls, ks, os] = case.strides();
        let w = case.params.cache_width();
        let mut pool = vec![0.0; 4 * w];
        let mut out = vec![0.0; 2 * os];
        let mut cache = KvLayerMut {
            k: &mut pool,
            v: &mut [],
            block_size: 4,
            blocks: &[0],
            kv_heads: 1,
            head_dim: w,
        };
        let mut call = |positions: &[u32], cache: &mut KvLayerMut| {
            mla_attention(
                &input[0],
                qs,
                &input[1],
                ls,
                &input[2],
                ks,
                2,
                positions,
                &case.kv_b(),
                &case.params,
                &case.rope(),
                cache,
                &mut out,
                os,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(call(&[3, 4], &mut cache).contains("past the cache"));
        assert!(call(&[0, 2], &mut cache).contains("not consecutive"));
        cache.head_dim = w + 1;
        assert!(call(&[0, 1], &mut cache).contains("MLA needs 1 x"));
    }
}
