//! Matrix multiply against a stored weight: `out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`, weights
//! in f32, bf16 or f16, activations and accumulation in f32.
//!
//! Two code paths, chosen by the number of token rows:
//! - Few rows (decode): stream each weight row once and take dot products against every token
//!   row, several weight rows per step; tasks are runs of at least 16 weight rows. Memory bound.
//! - Many rows (prefill): compute bound. Blocks of weight rows are widened to f32 and packed into a
//!   small k-major panel buffer (one L2-sized block at a time, never the whole matrix), then a
//!   register-blocked micro-kernel computes MR token rows x NR output columns with broadcast token
//!   values and vector FMAs. K is cut into fixed blocks, so the order in which each output sums its
//!   terms is fixed by K alone; tasks are tiles of N (and of T when N alone gives too few).

use super::simd::{load_n, run_simd, store_n, Simd, SimdTask, WeightElem};
use super::{check_len, check_rows, runnable_isa, SharedMut, Weight, WeightData};
use crate::KernelError;
use half::{bf16, f16};
use ir_types::CpuIsa;
use rayon::prelude::*;
use std::cell::RefCell;

/// From this many token rows on, the packed (prefill) path is used: below it packing costs more
/// than it saves (measured with `examples/matmul_bench --only crossover`).
fn packed_min_rows(isa: CpuIsa) -> usize {
    match isa {
        CpuIsa::Avx512 => 16,
        _ => 24,
    }
}
/// K is processed in blocks of at most this many elements so a packed panel stays in L1/L2.
const K_BLOCK: usize = 256;
/// Size the packed weight block of one task aims for.
const PACKED_BLOCK_BYTES: usize = 128 << 10;
/// Token rows per task of the packed path, when N alone gives too few tasks.
const T_BLOCK: usize = 192;
/// Fewest weight rows a decode task streams.
const MIN_ROWS_PER_TASK: usize = 16;

/// `out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`.
///
/// Shapes: `x` `[T, K]` f32 with row stride `x_stride`; `w` `[N, K]` f32/bf16/f16 (contiguous);
/// `bias` `[N]` f32; `out` `[T, N]` f32 with row stride `out_stride`. Only the first K elements of
/// each `x` row and the first N of each `out` row are touched.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    t: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    matmul_with_path(
        isa,
        MatmulPath::Auto,
        x,
        x_stride,
        t,
        w,
        bias,
        out,
        out_stride,
    )
}

/// Which matmul algorithm runs; [`matmul`] uses `Auto`. The others exist for benchmarks and
/// tests that need one path regardless of T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// `Streamed` below 16 (AVX-512) or 24 (otherwise) token rows, else `Packed`.
    Auto,
    /// Dot products while streaming each weight row once (decode).
    Streamed,
    /// Weight panels packed per tile and a register-blocked micro-kernel (prefill).
    Packed,
}

/// [`matmul`] with the algorithm chosen by the caller; both paths give results within f32
/// rounding of each other.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with_path(
    isa: CpuIsa,
    path: MatmulPath,
    x: &[f32],
    x_stride: usize,
    t: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "matmul";
    w.check(NAME)?;
    let (n, k) = (w.rows, w.cols);
    check_rows(NAME, "x", x.len(), t, k, x_stride)?;
    check_rows(NAME, "out", out.len(), t, n, out_stride)?;
    if let Some(b) = bias {
        check_len(NAME, "bias", b.len(), n)?;
    }
    if t == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: only the bias remains.
        for row in out.chunks_mut(out_stride.max(1)).take(t) {
            for (ni, o) in row[..n].iter_mut().enumerate() {
                *o = bias.map_or(0.0, |b| b[ni]);
            }
        }
        return Ok(());
    }
    let isa = runnable_isa(isa);
    let packed = match path {
        MatmulPath::Auto => t >= packed_min_rows(isa),
        MatmulPath::Streamed => false,
        MatmulPath::Packed => true,
    };
    let args = Args {
        x,
        x_stride,
        t,
        n,
        k,
        bias,
        out: SharedMut(out.as_mut_ptr()),
        out_stride,
    };
    match w.data {
        WeightData::F32(d) => dispatch(isa, packed, &args, d),
        WeightData::BF16(d) => dispatch::<bf16>(isa, packed, &args, d),
        WeightData::F16(d) => dispatch::<f16>(isa, packed, &args, d),
    }
    Ok(())
}

/// Validated arguments shared by every task.
struct Args<'a> {
    x: &'a [f32],
    x_stride: usize,
    t: usize,
    n: usize,
    k: usize,
    bias: Option<&'a [f32]>,
    out: SharedMut,
    out_stride: usize,
}

fn dispatch<E: WeightElem>(isa: CpuIsa, use_packed: bool, args: &Args, w: &[E]) {
    if use_packed {
        packed(isa, args, w);
    } else {
        streamed(isa, args, w);
    }
}

// ---------------------------------------------------------------------------------------------
// Decode path: dot products while streaming weight rows.

fn streamed<E: WeightElem>(isa: CpuIsa, args: &Args, w: &[E]) {
    let threads = rayon::current_num_threads();
    // About 8 tasks per thread balances uneven cores; never fewer than 16 rows per task.
    let rows_per_task = args
        .n
        .div_ceil(threads * 8)
        .next_multiple_of(8)
        .max(MIN_ROWS_PER_TASK);
    let tasks = args.n.div_ceil(rows_per_task);
    let run = |task: usize| {
        let rows = task * rows_per_task..((task + 1) * rows_per_task).min(args.n);
        run_simd(isa, StreamedRows { args, w, rows });
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

struct StreamedRows<'a, E> {
    args: &'a Args<'a>,
    w: &'a [E],
    rows: std::ops::Range<usize>,
}

impl<E: WeightElem> SimdTask for StreamedRows<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let a = self.args;
        let mut t0 = 0;
        // SAFETY: `matmul` checked every buffer against t, n, k and the strides; the rows of
        // `out` written here belong to this task's weight rows only.
        unsafe {
            while t0 < a.t {
                let tb = (a.t - t0).min(4);
                match tb {
                    1 => streamed_tokens::<S, E, 1, 8>(a, self.w, t0, self.rows.clone()),
                    2 => streamed_tokens::<S, E, 2, 4>(a, self.w, t0, self.rows.clone()),
                    3 => streamed_tokens::<S, E, 3, 2>(a, self.w, t0, self.rows.clone()),
                    _ => streamed_tokens::<S, E, 4, 2>(a, self.w, t0, self.rows.clone()),
                }
                t0 += tb;
            }
        }
    }
}

/// Tokens `t0..t0+TB` against weight `rows`, RB rows per step (then single rows).
#[inline(always)]
unsafe fn streamed_tokens<S: Simd, E: WeightElem, const TB: usize, const RB: usize>(
    a: &Args,
    w: &[E],
    t0: usize,
    rows: std::ops::Range<usize>,
) {
    let mut n = rows.start;
    while n + RB <= rows.end {
        dot_block::<S, E, TB, RB>(a, w, t0, n);
        n += RB;
    }
    while n < rows.end {
        dot_block::<S, E, TB, 1>(a, w, t0, n);
        n += 1;
    }
}

/// Dot products of TB token rows with RB weight rows, one vector accumulator per output, so each
/// output's summation order is the same whatever TB and RB are.
#[inline(always)]
unsafe fn dot_block<S: Simd, E: WeightElem, const TB: usize, const RB: usize>(
    a: &Args,
    w: &[E],
    t0: usize,
    n0: usize,
) {
    let k = a.k;
    // Plain loops rather than closures: a closure body would be compiled without the ISA's
    // target features and its intrinsics would become calls.
    let mut xs = [a.x.as_ptr(); TB];
    for (i, p) in xs.iter_mut().enumerate() {
        *p = a.x.as_ptr().add((t0 + i) * a.x_stride);
    }
    let mut ws = [w.as_ptr(); RB];
    for (r, p) in ws.iter_mut().enumerate() {
        *p = w.as_ptr().add((n0 + r) * k);
    }
    let mut acc = [[S::zero(); RB]; TB];
    let mut wv = [S::zero(); RB];
    // The RB rows are short interleaved streams that the hardware prefetcher is slow to pick
    // up; fetch the next group's rows (the following RB * k elements) a cache line at a time.
    let line = 64 / std::mem::size_of::<E>();
    let mut kk = 0;
    while kk + S::LANES <= k {
        if kk % line == 0 {
            for p in ws {
                S::prefetch(p.wrapping_add(RB * k + kk));
            }
        }
        for r in 0..RB {
            wv[r] = E::load::<S>(ws[r].add(kk));
        }
        for i in 0..TB {
            let xv = S::load(xs[i].add(kk));
            for r in 0..RB {
                acc[i][r] = S::mul_add(xv, wv[r], acc[i][r]);
            }
        }
        kk += S::LANES;
    }
    if kk < k {
        let rest = k - kk;
        for r in 0..RB {
            wv[r] = E::load_part::<S>(ws[r].add(kk), rest);
        }
        for i in 0..TB {
            let xv = S::load_part(xs[i].add(kk), rest);
            for r in 0..RB {
                acc[i][r] = S::mul_add(xv, wv[r], acc[i][r]);
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        let out_row = a.out.0.add((t0 + i) * a.out_stride + n0);
        for (r, &sum) in acc_row.iter().enumerate() {
            let bias = a.bias.map_or(0.0, |b| b[n0 + r]);
            *out_row.add(r) = S::hsum(sum) + bias;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill path: packed weight panels and a register-blocked micro-kernel.

/// Micro-tile of the packed path for an ISA: MR token rows x NR output columns.
fn tile_shape(isa: CpuIsa) -> (usize, usize) {
    match isa {
        CpuIsa::Avx512 => (8, 32),  // 16 accumulators of 32 registers.
        CpuIsa::Avx2 => (6, 16),    // 12 accumulators + 2 panel vectors + 1 broadcast of 16.
        CpuIsa::Portable => (4, 8), // 8-lane arrays are two SSE registers each.
    }
}

fn packed<E: WeightElem>(isa: CpuIsa, args: &Args, w: &[E]) {
    let (_, nr) = tile_shape(isa);
    let threads = rayon::current_num_threads();
    // A tile's packed block (tile columns x K_BLOCK f32) is kept near 128 KB so it stays in L2
    // while x streams past; smaller tiles only when there would be too few tasks.
    let panels = args.n.div_ceil(nr);
    let max_panels = (PACKED_BLOCK_BYTES / (nr * K_BLOCK * 4)).max(1);
    let panels_per_tile = (panels / (threads * 4)).clamp(1, max_panels);
    let n_tile = panels_per_tile * nr;
    let n_tiles = args.n.div_ceil(n_tile);
    let t_blocks = if n_tiles >= threads * 4 {
        1
    } else {
        args.t.div_ceil(T_BLOCK)
    };
    let t_block = args.t.div_ceil(t_blocks);
    let tasks = n_tiles * t_blocks;
    let run = |task: usize| {
        let (tile, tb) = (task / t_blocks, task % t_blocks);
        let cols = tile * n_tile..((tile + 1) * n_tile).min(args.n);
        let rows = tb * t_block..((tb + 1) * t_block).min(args.t);
        run_simd(
            isa,
            PackedTile {
                args,
                w,
                rows,
                cols,
            },
        );
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

thread_local! {
    /// Per-thread panel buffer of the packed path, reused across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

struct PackedTile<'a, E> {
    args: &'a Args<'a>,
    w: &'a [E],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl<E: WeightElem> SimdTask for PackedTile<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let (mr, nr) = tile_shape(S::ISA);
        let nv = nr / S::LANES;
        let a = self.args;
        let width = self.cols.len();
        let panels = width.div_ceil(nr);
        // The buffer is taken out of the thread-local rather than used inside `with`'s closure,
        // which would be compiled without the ISA's target features.
        let mut buf = PANEL.take();
        {
            // 64 spare elements let the panel start on a cache line.
            let need = panels * nr * K_BLOCK.min(a.k) + 64;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let skew = buf.as_ptr().align_offset(64).min(63);
            let panel = &mut buf[skew..];
            let k_blocks = a.k.div_ceil(K_BLOCK);
            for kb in 0..k_blocks {
                let k0 = kb * K_BLOCK;
                let kc = (a.k - k0).min(K_BLOCK);
                // SAFETY: rows/cols lie inside the checked shapes; the panel holds
                // `panels * nr * kc` elements; this task owns out[rows, cols].
                unsafe {
                    pack_panels::<S, E>(
                        self.w,
                        a.k,
                        self.cols.clone(),
                        k0,
                        kc,
                        nr,
                        panel.as_mut_ptr(),
                    );
                    let mut t0 = self.rows.start;
                    while t0 < self.rows.end {
                        let m = (self.rows.end - t0).min(mr);
                        for p in 0..panels {
                            let n0 = self.cols.start + p * nr;
                            let tile = Tile {
                                kc,
                                x: a.x.as_ptr().add(t0 * a.x_stride + k0),
                                x_stride: a.x_stride,
                                panel: panel.as_ptr().add(p * nr * kc),
                                out: a.out.0.add(t0 * a.out_stride + n0),
                                out_stride: a.out_stride,
                                cols: (self.cols.end - n0).min(nr),
                                first: kb == 0,
                                bias: a.bias.map(|b| b.as_ptr().add(n0)),
                            };
                            if nv == 2 {
                                micro_rows::<S, 2>(m, &tile);
                            } else {
                                micro_rows::<S, 1>(m, &tile);
                            }
                        }
                        t0 += m;
                    }
                }
            }
        }
        PANEL.set(buf);
    }
}

/// Widens weight rows `cols` x `[k0, k0 + kc)` into panels of `nr` rows laid out k-major:
/// `panel[p][kk][j] = w[cols.start + p*nr + j][k0 + kk]`, zero past the last row. Each
/// `LANES x LANES` block is read as row vectors and transposed in registers.
#[inline(always)]
unsafe fn pack_panels<S: Simd, E: WeightElem>(
    w: &[E],
    k: usize,
    cols: std::ops::Range<usize>,
    k0: usize,
    kc: usize,
    nr: usize,
    dst: *mut f32,
) {
    let width = cols.len();
    let mut block = [S::zero(); 16];
    for row0 in (0..width.div_ceil(nr) * nr).step_by(S::LANES) {
        let (p, lane0) = (row0 / nr, row0 % nr);
        let base = dst.add(p * nr * kc + lane0);
        let rows = width.saturating_sub(row0).min(S::LANES);
        let mut kk = 0;
        while kk < kc {
            let n = (kc - kk).min(S::LANES);
            for (r, v) in block.iter_mut().enumerate().take(S::LANES) {
                let src = w.as_ptr().add((cols.start + row0 + r) * k + k0 + kk);
                *v = if r >= rows {
                    S::zero()
                } else if n == S::LANES {
                    E::load::<S>(src)
                } else {
                    E::load_part::<S>(src, n)
                };
            }
            S::transpose(&mut block[..S::LANES]);
            for (i, v) in block.iter().enumerate().take(n) {
                S::store(base.add((kk + i) * nr), *v);
            }
            kk += n;
        }
    }
}

/// One micro-tile's operands: `m` token rows from `x` against one packed panel.
struct Tile {
    kc: usize,
    x: *const f32,
    x_stride: usize,
    panel: *const f32,
    out: *mut f32,
    out_stride: usize,
    /// Valid output columns of this panel (the rest are padding).
    cols: usize,
    /// First K block: store (plus bias) instead of accumulating into `out`.
    first: bool,
    bias: Option<*const f32>,
}

#[inline(always)]
unsafe fn micro_rows<S: Simd, const NV: usize>(m: usize, tile: &Tile) {
    match m {
        1 => micro::<S, 1, NV>(tile),
        2 => micro::<S, 2, NV>(tile),
        3 => micro::<S, 3, NV>(tile),
        4 => micro::<S, 4, NV>(tile),
        5 => micro::<S, 5, NV>(tile),
        6 => micro::<S, 6, NV>(tile),
        7 => micro::<S, 7, NV>(tile),
        _ => micro::<S, 8, NV>(tile),
    }
}

/// `out[MR, NV*LANES] (+)= x[MR, kc] @ panel[kc, NV*LANES]`: every output is one FMA chain over
/// k in order, so its value does not depend on MR or on where the tile sits.
#[inline(always)]
unsafe fn micro<S: Simd, const MR: usize, const NV: usize>(tile: &Tile) {
    let nr = NV * S::LANES;
    let mut rows = [tile.x; MR];
    for (i, row) in rows.iter_mut().enumerate() {
        *row = tile.x.add(i * tile.x_stride);
    }
    let mut acc = [[S::zero(); NV]; MR];
    let mut bv = [S::zero(); NV];
    let mut b = tile.panel;
    for kk in 0..tile.kc {
        for (j, v) in bv.iter_mut().enumerate() {
            *v = S::load(b.add(j * S::LANES));
        }
        for i in 0..MR {
            let xv = S::splat(*rows[i].add(kk));
            for j in 0..NV {
                acc[i][j] = S::mul_add(xv, bv[j], acc[i][j]);
            }
        }
        b = b.add(nr);
    }
    for (i, acc_row) in acc.iter().enumerate() {
        let out_row = tile.out.add(i * tile.out_stride);
        for (j, &v) in acc_row.iter().enumerate() {
            let c0 = j * S::LANES;
            if c0 >= tile.cols {
                break;
            }
            let p = out_row.add(c0);
            let n = (tile.cols - c0).min(S::LANES);
            let prior = match (tile.first, tile.bias) {
                (true, None) => None,
                (true, Some(bias)) => Some(load_n::<S>(bias.add(c0), n)),
                (false, _) => Some(load_n::<S>(p, n)),
            };
            let v = match prior {
                Some(prior) => S::add(prior, v),
                None => v,
            };
            store_n::<S>(p, v, n);
        }
    }
}

/// Plain scalar matmul with f64 accumulation.
pub mod reference {
    use super::super::Weight;

    /// Same contract as [`super::matmul`]; panics on short buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        x: &[f32],
        x_stride: usize,
        t: usize,
        w: &Weight,
        bias: Option<&[f32]>,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (n, k) = (w.rows, w.cols);
        for ti in 0..t {
            for ni in 0..n {
                let mut sum = bias.map_or(0.0, |b| b[ni] as f64);
                for ki in 0..k {
                    sum += x[ti * x_stride + ki] as f64 * w.data.get_f32(ni * k + ki) as f64;
                }
                out[ti * out_stride + ni] = sum as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, on_threads, Rng};
    use super::*;

    fn weights(rng: &mut Rng, n: usize, k: usize) -> (Vec<f32>, Vec<bf16>, Vec<f16>) {
        let f = rng.vec(n * k, 1.0);
        let b = f.iter().map(|&v| bf16::from_f32(v)).collect();
        let h = f.iter().map(|&v| f16::from_f32(v)).collect();
        (f, b, h)
    }

    /// Every dtype and ISA against the reference, for shapes hitting both paths, all tails,
    /// strided inputs and outputs, and bias on and off.
    #[test]
    fn matches_reference_on_odd_shapes() {
        let mut rng = Rng::new(7);
        let shapes = [
            (3, 4, 0),
            (1, 1, 1),
            (1, 37, 19),
            (3, 5, 300),
            (5, 33, 65),
            (7, 70, 17),
            (8, 17, 31),
            (13, 47, 263),
            (29, 100, 577),
            (70, 130, 40),
        ];
        for isa in isas_to_test() {
            for &(t, n, k) in &shapes {
                let (wf, wb, wh) = weights(&mut rng, n, k);
                let (x_stride, out_stride) = (k + 3, n + 5);
                let x = rng.vec(t * x_stride, 1.0);
                let bias = rng.vec(n, 1.0);
                for data in [
                    WeightData::F32(&wf),
                    WeightData::BF16(&wb),
                    WeightData::F16(&wh),
                ] {
                    let w = Weight {
                        data,
                        rows: n,
                        cols: k,
                    };
                    for (use_bias, path) in [
                        (false, MatmulPath::Auto),
                        (true, MatmulPath::Streamed),
                        (true, MatmulPath::Packed),
                    ] {
                        let b = use_bias.then_some(&bias[..]);
                        let sentinel = 1234.5;
                        let mut got = vec![sentinel; t * out_stride];
                        let mut want = vec![sentinel; t * out_stride];
                        matmul_with_path(isa, path, &x, x_stride, t, &w, b, &mut got, out_stride)
                            .unwrap();
                        reference::matmul(&x, x_stride, t, &w, b, &mut want, out_stride);
                        let diff = max_abs_diff(&got, &want);
                        println!("matmul {isa:?} {path:?} {} t={t} n={n} k={k} bias={use_bias}: max abs diff {diff:.3e}", data.dtype());
                        // Terms are products of values in [-1, 1]: f32 rounding grows ~ sqrt(k) eps.
                        assert!(
                            diff <= 8e-6 * (k as f32).sqrt(),
                            "{isa:?} t={t} n={n} k={k}: {diff}"
                        );
                        // Padding columns past N keep the sentinel.
                        for ti in 0..t {
                            assert!(got[ti * out_stride + n..ti * out_stride + out_stride]
                                .iter()
                                .all(|&v| v == sentinel));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng::new(11);
        for isa in isas_to_test() {
            for &(t, n, k) in &[(1, 999, 577), (5, 300, 64), (61, 1000, 600)] {
                let (_, wb, _) = weights(&mut rng, n, k);
                let w = Weight {
                    data: WeightData::BF16(&wb),
                    rows: n,
                    cols: k,
                };
                let x = rng.vec(t * k, 1.0);
                let run = |threads| {
                    let mut out = vec![0f32; t * n];
                    on_threads(threads, || {
                        matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap()
                    });
                    out
                };
                let one = run(1);
                for threads in [2, 3, 5] {
                    assert!(
                        one.iter()
                            .zip(&run(threads))
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} t={t} threads={threads}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_path_gives_a_row_the_same_value_wherever_it_sits() {
        // A row's result must not depend on which micro-tile (or remainder tile) computes it.
        let mut rng = Rng::new(5);
        let (n, k) = (77, 300);
        let (wf, _, _) = weights(&mut rng, n, k);
        let w = Weight {
            data: WeightData::F32(&wf),
            rows: n,
            cols: k,
        };
        let row = rng.vec(k, 1.0);
        for isa in isas_to_test() {
            for path in [MatmulPath::Streamed, MatmulPath::Packed] {
                let t = 23;
                let x: Vec<f32> = (0..t).flat_map(|_| row.iter().copied()).collect();
                let mut out = vec![0f32; t * n];
                matmul_with_path(isa, path, &x, k, t, &w, None, &mut out, n).unwrap();
                for ti in 1..t {
                    assert_eq!(
                        out[..n],
                        out[ti * n..(ti + 1) * n],
                        "{isa:?} {path:?} row {ti}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_short_buffers() {
        let w = vec![0f32; 12];
        let weight = Weight {
            data: WeightData::F32(&w),
            rows: 3,
            cols: 4,
        };
        let x = vec![0f32; 7];
        let mut out = vec![0f32; 6];
        let err = matmul(CpuIsa::Portable, &x, 4, 2, &weight, None, &mut out, 3).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Shape {
                    kernel: "matmul",
                    ..
                }
            ),
            "{err}"
        );
        let x = vec![0f32; 8];
        assert!(matmul(
            CpuIsa::Portable,
            &x,
            4,
            2,
            &weight,
            Some(&[0.0; 2]),
            &mut out,
            3
        )
        .is_err());
        let bad = Weight {
            data: WeightData::F32(&w),
            rows: 4,
            cols: 4,
        };
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &bad, None, &mut out, 3).is_err());
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &weight, None, &mut out, 3).is_ok());
    }
}
