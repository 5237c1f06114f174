//! Matrix multiply against a stored weight: `out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`, weights
//! in f32, bf16 or f16, activations and accumulation in f32.
//!
//! Weights in the panel layout (what the compiler writes, see [`super::WeightLayout`]) take one
//! path for every T, and it is batch invariant: an output row depends only on its input row, not
//! on T, on the other rows, on where the row sits, or on the thread count. Each output sums its K
//! terms the same way every time: K is cut into blocks of `K_BLOCK` from 0; inside a block one FMA
//! chain runs over k in order from zero; the bias (or nothing) plus the block sums are then added
//! in block order. A register-blocked micro-kernel computes m token rows x c column vectors at a
//! time, with m and c picked from T and the register budget; since every output is its own chain,
//! the choice changes speed only. Work is split over panels and token rows, never over K.
//! - Few rows (decode): a panel GEMV, broadcasting `x[k]` against each panel's contiguous k-rows,
//!   several panels at once for independent chains; tasks are runs of panels.
//! - Many rows (prefill): K blocks outermost so a tile of panels stays in L2 while the token rows
//!   stream past; tasks are tiles of panels (and of T when N alone gives too few).
//!
//! Row-major weights (tests, tools, plans that do not pack) keep two paths chosen by T, whose
//! summation orders differ, so they are not batch invariant:
//! - Few rows: stream each weight row once and take dot products against every token row,
//!   several weight rows per step; tasks are runs of at least 16 weight rows. Memory bound.
//! - Many rows: blocks of weight rows are widened to f32 and packed into a small k-major panel
//!   buffer per call (one L2-sized block at a time), then the same micro-kernel runs on it.

use super::pool;
use super::simd::{load_n, run_simd, store_n, Simd, SimdTask, WeightElem};
use super::{
    check_len, check_rows, runnable_isa, PackedLayout, SharedMut, Weight, WeightData, WeightLayout,
};
use crate::KernelError;
use half::{bf16, f16};
use ir_types::CpuIsa;
use std::cell::RefCell;

/// From this many token rows on, row-major weights take the packed path: below it packing costs
/// more than it saves (measured with `examples/matmul_bench --only crossover`).
fn packed_min_rows(isa: CpuIsa) -> usize {
    match isa {
        CpuIsa::Avx512 => 16,
        _ => 24,
    }
}
/// K is summed in blocks of this many elements (from k = 0), so a panel block stays in L1/L2
/// while token rows stream past. Part of every output's summation order: changing it changes
/// results in the last bits.
const K_BLOCK: usize = 256;
/// Size the weight block of one compute-bound task aims for.
const PACKED_BLOCK_BYTES: usize = 128 << 10;
/// Token rows per task of the packed path, when N alone gives too few tasks.
const T_BLOCK: usize = 192;
/// Fewest weight rows a decode task streams.
const MIN_ROWS_PER_TASK: usize = 16;

/// `out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`.
///
/// Shapes: `x` `[T, K]` f32 with row stride `x_stride`; `w` `[N, K]` f32/bf16/f16, row-major or
/// in panels; `bias` `[N]` f32; `out` `[T, N]` f32 with row stride `out_stride`. Only the first K
/// elements of each `x` row and the first N of each `out` row are touched.
///
/// With a panel-layout weight an output row is bit-identical whatever T, the other rows and the
/// thread count are (see the module documentation).
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

/// Which algorithm runs for a row-major weight; [`matmul`] uses `Auto`. The others exist for
/// benchmarks and tests that need one path regardless of T. Panel-layout weights have one path
/// and ignore this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// `Streamed` below 16 (AVX-512) or 24 (otherwise) token rows, else `Packed`.
    Auto,
    /// Dot products while streaming each weight row once (decode).
    Streamed,
    /// Weight panels packed per tile and a register-blocked micro-kernel (prefill).
    Packed,
}

/// Whether a matmul's shapes leave work for a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `out` is already complete: no rows, no outputs, or K = 0 (the bias alone, written here).
    Done,
    Compute,
}

/// The checks every matmul kernel starts with, for `x` `[T, K]`, weights `[N, K]`, `bias` `[N]`
/// and `out` `[T, N]`; the degenerate shapes are finished here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_matmul(
    name: &'static str,
    x: &[f32],
    x_stride: usize,
    t: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    out_stride: usize,
) -> Result<Shape, KernelError> {
    check_rows(name, "x", x.len(), t, k, x_stride)?;
    check_rows(name, "out", out.len(), t, n, out_stride)?;
    if let Some(b) = bias {
        check_len(name, "bias", b.len(), n)?;
    }
    if t == 0 || n == 0 {
        return Ok(Shape::Done);
    }
    if k == 0 {
        // An empty sum: only the bias remains.
        for row in out.chunks_mut(out_stride.max(1)).take(t) {
            for (ni, o) in row[..n].iter_mut().enumerate() {
                *o = bias.map_or(0.0, |b| b[ni]);
            }
        }
        return Ok(Shape::Done);
    }
    Ok(Shape::Compute)
}

/// [`matmul`] with the algorithm for row-major weights chosen by the caller; all paths give
/// results within f32 rounding of each other.
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
    if check_matmul(NAME, x, x_stride, t, n, k, bias, out, out_stride)? == Shape::Done {
        return Ok(());
    }
    let isa = runnable_isa(isa);
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
    if let WeightLayout::Panels(layout) = w.layout {
        let p = layout.panel();
        match w.data {
            WeightData::F32(d) => panels(isa, p, &args, d),
            WeightData::BF16(d) => panels::<bf16>(isa, p, &args, d),
            WeightData::F16(d) => panels::<f16>(isa, p, &args, d),
        }
        return Ok(());
    }
    let packed = match path {
        MatmulPath::Auto => t >= packed_min_rows(isa),
        MatmulPath::Streamed => false,
        MatmulPath::Packed => true,
    };
    match w.data {
        WeightData::F32(d) => dispatch(isa, packed, &args, d),
        WeightData::BF16(d) => dispatch::<bf16>(isa, packed, &args, d),
        WeightData::F16(d) => dispatch::<f16>(isa, packed, &args, d),
    }
    Ok(())
}

/// Validated arguments shared by every task (of the dense and the quantized matmul).
pub(crate) struct Args<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) x_stride: usize,
    pub(crate) t: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) out: SharedMut,
    pub(crate) out_stride: usize,
}

fn dispatch<E: WeightElem>(isa: CpuIsa, use_packed: bool, args: &Args, w: &[E]) {
    if use_packed {
        packed(isa, args, w);
    } else {
        streamed(isa, args, w);
    }
}

// ---------------------------------------------------------------------------------------------
// Row-major weights, few rows: dot products while streaming weight rows.

fn streamed<E: WeightElem>(isa: CpuIsa, args: &Args, w: &[E]) {
    let threads = pool::threads();
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
        pool::for_each(tasks, run);
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
// Shared micro-kernel: m token rows x c column vectors of a k-major panel.

/// Most token rows one micro-kernel call handles on `isa`.
pub(super) fn max_rows(isa: CpuIsa) -> usize {
    match isa {
        CpuIsa::Avx512 => 8,
        CpuIsa::Avx2 => 6,
        // 8-lane arrays are two SSE registers each: fewer accumulators fit.
        CpuIsa::Portable => 4,
    }
}

/// Operands of the micro-kernel for one run of token rows over a range of K.
///
/// Column vector `v` (counted from the block's first) lies in panel `v / nvp` at lane offset
/// `(v % nvp) * LANES`; its weights for `k_begin` start at `w + (v / nvp) * panel_stride +
/// (v % nvp) * LANES`, and each next k is `step` elements further. It writes output columns
/// `col0 + (v / nvp) * step + (v % nvp) * LANES ..`, those below `n_end`.
pub(super) struct Block<E> {
    /// `x[t0, k_begin]`.
    pub(super) x: *const f32,
    pub(super) x_stride: usize,
    pub(super) k_begin: usize,
    pub(super) k_end: usize,
    pub(super) w: *const E,
    pub(super) panel_stride: usize,
    /// Panel width P: elements per k inside a panel, and output columns per panel.
    pub(super) step: usize,
    /// Vectors per panel, `P / LANES`.
    pub(super) nvp: usize,
    /// `out[t0, 0]`.
    pub(super) out: *mut f32,
    pub(super) out_stride: usize,
    pub(super) col0: usize,
    pub(super) n_end: usize,
    /// `bias[0]`.
    pub(super) bias: Option<*const f32>,
}

impl<E> Block<E> {
    /// The same block reading its weights from a copy at `w` whose panels are `panel_stride`
    /// elements apart.
    fn reading<F>(self, w: *const F, panel_stride: usize) -> Block<F> {
        Block {
            x: self.x,
            x_stride: self.x_stride,
            k_begin: self.k_begin,
            k_end: self.k_end,
            w,
            panel_stride,
            step: self.step,
            nvp: self.nvp,
            out: self.out,
            out_stride: self.out_stride,
            col0: self.col0,
            n_end: self.n_end,
            bias: self.bias,
        }
    }
}

/// Runs `m` token rows of `b` against column vectors `vectors`, as many per micro-kernel call as
/// the registers hold (accumulators m x c plus the weight vectors or broadcasts in flight).
/// Every output has its own chain, so how the vectors are grouped changes nothing but speed.
#[inline(always)]
pub(super) unsafe fn row_group<S: Simd, E: WeightElem>(
    m: usize,
    b: &Block<E>,
    vectors: std::ops::Range<usize>,
) {
    macro_rules! run {
        ($mr:literal, [$($nc:literal),+]) => {{
            let mut v = vectors.start;
            $(
                while vectors.end - v >= $nc {
                    micro::<S, E, $mr, $nc>(b, v);
                    v += $nc;
                }
            )+
        }};
    }
    match (S::ISA, m) {
        // 32 registers.
        (CpuIsa::Avx512, 1) => run!(1, [8, 4, 2, 1]),
        (CpuIsa::Avx512, 2) => run!(2, [8, 4, 2, 1]),
        (CpuIsa::Avx512, 3) => run!(3, [6, 2, 1]),
        (CpuIsa::Avx512, 4) => run!(4, [6, 2, 1]),
        (CpuIsa::Avx512, 5) => run!(5, [4, 2, 1]),
        (CpuIsa::Avx512, 6) => run!(6, [2, 1]),
        (CpuIsa::Avx512, 7) => run!(7, [2, 1]),
        (CpuIsa::Avx512, _) => run!(8, [2, 1]),
        // 16 registers.
        (CpuIsa::Avx2, 1) => run!(1, [8, 4, 2, 1]),
        (CpuIsa::Avx2, 2) => run!(2, [6, 2, 1]),
        (CpuIsa::Avx2, 3) => run!(3, [4, 2, 1]),
        (CpuIsa::Avx2, 4) => run!(4, [3, 2, 1]),
        (CpuIsa::Avx2, 5) => run!(5, [2, 1]),
        (CpuIsa::Avx2, _) => run!(6, [2, 1]),
        // 16 SSE registers, two per 8-lane array.
        (CpuIsa::Portable, 1) => run!(1, [4, 2, 1]),
        (CpuIsa::Portable, 2) => run!(2, [2, 1]),
        (CpuIsa::Portable, 3) => run!(3, [1]),
        (CpuIsa::Portable, _) => run!(4, [1]),
    }
}

/// `out[MR, NC vectors] (+)= x[MR, k_begin..k_end] @ w[k_begin..k_end, NC vectors]`.
///
/// K is walked in blocks ending at multiples of `K_BLOCK`. Within a block every output is one
/// FMA chain over k in order, starting from zero; at the block's end it is added to what `out`
/// holds, or, for the block starting at k = 0, to the bias (or stored alone without one). So each
/// output's value depends on K alone, not on MR, NC, the range this call covers or where the tile
/// sits.
#[inline(always)]
unsafe fn micro<S: Simd, E: WeightElem, const MR: usize, const NC: usize>(b: &Block<E>, v0: usize) {
    let mut w = [b.w; NC];
    let mut cols = [0usize; NC];
    for c in 0..NC {
        let (panel, lane) = ((v0 + c) / b.nvp, (v0 + c) % b.nvp * S::LANES);
        w[c] = b.w.add(panel * b.panel_stride + lane);
        cols[c] = b.col0 + panel * b.step + lane;
    }
    let mut x = [b.x; MR];
    for (i, row) in x.iter_mut().enumerate() {
        *row = b.x.add(i * b.x_stride);
    }
    let mut k = b.k_begin;
    // Offset of k from k_begin, in x elements and in weight elements.
    let (mut xo, mut wo) = (0, 0);
    while k < b.k_end {
        let kc = (K_BLOCK - k % K_BLOCK).min(b.k_end - k);
        let mut acc = [[S::zero(); NC]; MR];
        for _ in 0..kc {
            // Whichever operand is fewer stays in registers for the step: the MR broadcasts
            // (each weight vector is then used as soon as it is loaded and widened), or the NC
            // weight vectors. Either way each accumulator gets one FMA per k.
            if MR <= NC {
                let mut xv = [S::zero(); MR];
                for i in 0..MR {
                    xv[i] = S::splat(*x[i].add(xo));
                }
                for c in 0..NC {
                    let wv = E::load::<S>(w[c].add(wo));
                    for i in 0..MR {
                        acc[i][c] = S::mul_add(xv[i], wv, acc[i][c]);
                    }
                }
            } else {
                let mut wv = [S::zero(); NC];
                for c in 0..NC {
                    wv[c] = E::load::<S>(w[c].add(wo));
                }
                for i in 0..MR {
                    let xv = S::splat(*x[i].add(xo));
                    for c in 0..NC {
                        acc[i][c] = S::mul_add(xv, wv[c], acc[i][c]);
                    }
                }
            }
            xo += 1;
            wo += b.step;
        }
        for (i, acc_row) in acc.iter().enumerate() {
            let out_row = b.out.add(i * b.out_stride);
            for c in 0..NC {
                let n = b.n_end.saturating_sub(cols[c]).min(S::LANES);
                if n == 0 {
                    continue; // padding rows of the last panel
                }
                let p = out_row.add(cols[c]);
                let prior = match (k == 0, b.bias) {
                    (true, None) => None,
                    (true, Some(bias)) => Some(load_n::<S>(bias.add(cols[c]), n)),
                    (false, _) => Some(load_n::<S>(p, n)),
                };
                let v = match prior {
                    Some(prior) => S::add(prior, acc_row[c]),
                    None => acc_row[c],
                };
                store_n::<S>(p, v, n);
            }
        }
        k += kc;
    }
}

// ---------------------------------------------------------------------------------------------
// Panel-layout weights: one batch-invariant path for every T.

fn panels<E: WeightElem>(isa: CpuIsa, panel: usize, args: &Args, w: &[E]) {
    // AVX-512 vectors must tile the panel; an 8-wide panel runs on AVX2 (which any AVX-512
    // machine has). Every supported width is a multiple of 8, the other paths' lanes.
    let isa = if isa == CpuIsa::Avx512 && !panel.is_multiple_of(16) {
        CpuIsa::Avx2
    } else {
        isa
    };
    let n_panels = args.n.div_ceil(panel);
    let threads = pool::threads();
    let (tile, t_block) = if args.t <= max_rows(isa) {
        // Memory bound: about 8 runs of panels per thread balance uneven cores.
        (n_panels.div_ceil(threads * 8), args.t)
    } else {
        // Compute bound: a tile's K block of panels (tile x P x K_BLOCK, as f32: half types are
        // widened per block) is kept near 128 KB so it stays in L2 while x streams past; smaller
        // tiles only when there would be too few tasks, and then T is cut too.
        let block = panel * K_BLOCK * 4;
        let max_tile = (PACKED_BLOCK_BYTES / block).max(1);
        let tile = (n_panels / (threads * 4)).clamp(1, max_tile);
        let t_blocks = if n_panels.div_ceil(tile) >= threads * 4 {
            1
        } else {
            args.t.div_ceil(T_BLOCK)
        };
        (tile, args.t.div_ceil(t_blocks))
    };
    for_each_task(n_panels, tile, args.t, t_block, |panels, rows| {
        run_simd(
            isa,
            PanelTile {
                args,
                w,
                panel,
                panels,
                rows,
            },
        )
    });
}

/// Runs `task(panels, rows)` over the grid of `tile` panels x `t_block` token rows that covers
/// `n_panels` panels and `t` rows, in parallel unless the grid is a single task.
pub(crate) fn for_each_task(
    n_panels: usize,
    tile: usize,
    t: usize,
    t_block: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let (n_tiles, t_blocks) = (n_panels.div_ceil(tile), t.div_ceil(t_block));
    let run = |i: usize| {
        let (ti, tb) = (i / t_blocks, i % t_blocks);
        task(
            ti * tile..((ti + 1) * tile).min(n_panels),
            tb * t_block..((tb + 1) * t_block).min(t),
        );
    };
    if n_tiles * t_blocks == 1 {
        run(0);
    } else {
        pool::for_each(n_tiles * t_blocks, run);
    }
}

struct PanelTile<'a, E> {
    args: &'a Args<'a>,
    w: &'a [E],
    panel: usize,
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
}

impl<E: WeightElem> SimdTask for PanelTile<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let a = self.args;
        let p = self.panel;
        let nvp = p / S::LANES;
        let vectors = 0..self.panels.len() * nvp;
        // SAFETY: `matmul` checked x, out and bias against t, n, k and the strides, and the
        // weight's length against the layout; this task writes out[rows, its panels' columns].
        unsafe {
            let block = |t0: usize, k_begin: usize, k_end: usize| Block {
                x: a.x.as_ptr().add(t0 * a.x_stride + k_begin),
                x_stride: a.x_stride,
                k_begin,
                k_end,
                w: self
                    .w
                    .as_ptr()
                    .add(self.panels.start * p * a.k + k_begin * p),
                panel_stride: p * a.k,
                step: p,
                nvp,
                out: a.out.0.add(t0 * a.out_stride),
                out_stride: a.out_stride,
                col0: self.panels.start * p,
                n_end: a.n,
                bias: a.bias.map(|b| b.as_ptr()),
            };
            let mr = max_rows(S::ISA);
            if self.rows.len() <= mr {
                // Few rows: each group of vectors runs down all of K before the next, so the
                // panels are read front to back, once.
                let b = block(self.rows.start, 0, a.k);
                row_group::<S, E>(self.rows.len(), &b, vectors);
                return;
            }
            if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
                for k0 in (0..a.k).step_by(K_BLOCK) {
                    let k1 = (k0 + K_BLOCK).min(a.k);
                    let mut t0 = self.rows.start;
                    while t0 < self.rows.end {
                        let m = (self.rows.end - t0).min(mr);
                        row_group::<S, E>(m, &block(t0, k0, k1), vectors.clone());
                        t0 += m;
                    }
                }
                return;
            }
            // Half-precision weights are widened once per K block into an f32 copy of the tile's
            // panels (a straight copy: the layout is already the kernel's), which every row
            // group then reads: widening at each use would cost more than the FMAs on AVX2.
            // Widening is exact, so the sums are the same as reading the weights directly.
            let mut buf = PANEL.take();
            let need = self.panels.len() * p * K_BLOCK.min(a.k) + 16;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let skew = buf.as_ptr().align_offset(64).min(15);
            let wide = buf[skew..].as_mut_ptr();
            for k0 in (0..a.k).step_by(K_BLOCK) {
                let k1 = (k0 + K_BLOCK).min(a.k);
                let chunk = (k1 - k0) * p;
                for panel in 0..self.panels.len() {
                    let src = self
                        .w
                        .as_ptr()
                        .add((self.panels.start + panel) * p * a.k + k0 * p);
                    let dst = wide.add(panel * chunk);
                    // `chunk` is a whole number of vectors: P is a multiple of LANES.
                    for i in (0..chunk).step_by(S::LANES) {
                        S::store(dst.add(i), E::load::<S>(src.add(i)));
                    }
                }
                let mut t0 = self.rows.start;
                while t0 < self.rows.end {
                    let m = (self.rows.end - t0).min(mr);
                    let b = block(t0, k0, k1).reading(wide as *const f32, chunk);
                    row_group::<S, f32>(m, &b, vectors.clone());
                    t0 += m;
                }
            }
            PANEL.set(buf);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row-major weights, many rows: panels packed per call, one K block at a time.

fn packed<E: WeightElem>(isa: CpuIsa, args: &Args, w: &[E]) {
    let nr = PackedLayout::for_isa(isa).panel();
    let threads = pool::threads();
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
                nr,
                rows,
                cols,
            },
        );
    };
    if tasks == 1 {
        run(0);
    } else {
        pool::for_each(tasks, run);
    }
}

thread_local! {
    /// Per-thread panel buffer of the row-major packed path, reused across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

struct PackedTile<'a, E> {
    args: &'a Args<'a>,
    w: &'a [E],
    nr: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl<E: WeightElem> SimdTask for PackedTile<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let mr = max_rows(S::ISA);
        let nr = self.nr;
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
            for k0 in (0..a.k).step_by(K_BLOCK) {
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
                        let b = Block {
                            x: a.x.as_ptr().add(t0 * a.x_stride + k0),
                            x_stride: a.x_stride,
                            k_begin: k0,
                            k_end: k0 + kc,
                            w: panel.as_ptr(),
                            panel_stride: nr * kc,
                            step: nr,
                            nvp: nr / S::LANES,
                            out: a.out.0.add(t0 * a.out_stride),
                            out_stride: a.out_stride,
                            col0: self.cols.start,
                            n_end: self.cols.end,
                            bias: a.bias.map(|b| b.as_ptr()),
                        };
                        row_group::<S, f32>(m, &b, 0..panels * (nr / S::LANES));
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

/// Plain scalar matmul with f64 accumulation.
pub mod reference {
    use super::super::Weight;

    /// Same contract as [`super::matmul`], either layout; panics on short buffers.
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
                    sum += x[ti * x_stride + ki] as f64 * w.get_f32(ni, ki) as f64;
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

    /// One matrix in every dtype, packed in `layout` (or not).
    struct Stored {
        n: usize,
        k: usize,
        layout: WeightLayout,
        f: Vec<f32>,
        b: Vec<bf16>,
        h: Vec<f16>,
    }

    impl Stored {
        fn new(rng: &mut Rng, n: usize, k: usize, layout: WeightLayout) -> Stored {
            let (f, b, h) = weights(rng, n, k);
            let (f, b, h) = match layout {
                WeightLayout::RowMajor => (f, b, h),
                WeightLayout::Panels(p) => (
                    p.pack(&f, n, k).unwrap(),
                    p.pack(&b, n, k).unwrap(),
                    p.pack(&h, n, k).unwrap(),
                ),
            };
            Stored {
                n,
                k,
                layout,
                f,
                b,
                h,
            }
        }

        fn all(&self) -> [Weight<'_>; 3] {
            [
                WeightData::F32(&self.f),
                WeightData::BF16(&self.b),
                WeightData::F16(&self.h),
            ]
            .map(|data| Weight {
                data,
                rows: self.n,
                cols: self.k,
                layout: self.layout,
            })
        }
    }

    fn panels(width: usize) -> WeightLayout {
        WeightLayout::Panels(PackedLayout::new(width).unwrap())
    }

    /// Every dtype, ISA and layout against the reference, for shapes hitting every path, all
    /// tails, strided inputs and outputs, and bias on and off.
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
            let layouts = [
                WeightLayout::RowMajor,
                WeightLayout::Panels(PackedLayout::for_isa(isa)),
                // Widths of other ISAs still compute the right thing, just not at full speed.
                panels(8),
                panels(32),
                panels(24),
            ];
            for &(t, n, k) in &shapes {
                for layout in layouts {
                    let stored = Stored::new(&mut rng, n, k, layout);
                    let (x_stride, out_stride) = (k + 3, n + 5);
                    let x = rng.vec(t * x_stride, 1.0);
                    let bias = rng.vec(n, 1.0);
                    for w in stored.all() {
                        for (use_bias, path) in [
                            (false, MatmulPath::Auto),
                            (true, MatmulPath::Streamed),
                            (true, MatmulPath::Packed),
                        ] {
                            let b = use_bias.then_some(&bias[..]);
                            let sentinel = 1234.5;
                            let mut got = vec![sentinel; t * out_stride];
                            let mut want = vec![sentinel; t * out_stride];
                            matmul_with_path(
                                isa, path, &x, x_stride, t, &w, b, &mut got, out_stride,
                            )
                            .unwrap();
                            reference::matmul(&x, x_stride, t, &w, b, &mut want, out_stride);
                            let diff = max_abs_diff(&got, &want);
                            println!("matmul {isa:?} {layout:?} {path:?} {} t={t} n={n} k={k} bias={use_bias}: max abs diff {diff:.3e}", w.data.dtype());
                            // Terms are products of values in [-1, 1]: f32 rounding grows
                            // ~ sqrt(k) eps.
                            assert!(
                                diff <= 8e-6 * (k as f32).sqrt(),
                                "{isa:?} {layout:?} t={t} n={n} k={k}: {diff}"
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
    }

    /// Batch invariance: with panel weights, the output row of a given input row is the same
    /// bits whether the pass has 1 row or 512, wherever in the batch the row sits, whatever the
    /// other rows are, and on 1, 2 or 3 threads. N is not a multiple of any panel width and K
    /// spans a partial K block, with a bias, so every tail of the kernel is involved.
    #[test]
    fn panel_rows_do_not_depend_on_the_batch_or_the_threads() {
        let mut rng = Rng::new(31);
        for isa in isas_to_test() {
            for &(n, k) in &[(77, 600), (200, 257), (45, 31)] {
                let layout = WeightLayout::Panels(PackedLayout::for_isa(isa));
                let stored = Stored::new(&mut rng, n, k, layout);
                let bias = rng.vec(n, 1.0);
                let probe = rng.vec(k, 1.0);
                for w in stored.all() {
                    let label = format!("{isa:?} {} n={n} k={k}", w.data.dtype());
                    let mut want = vec![0f32; n];
                    reference::matmul(&probe, k, 1, &w, Some(&bias), &mut want, n);
                    let mut first: Option<Vec<f32>> = None;
                    for (i, &t) in [1usize, 3, 17, 64, 512].iter().enumerate() {
                        // The probe sits first, last or in the middle, among random rows.
                        let at = [0, t - 1, t / 2][i % 3];
                        let mut x = rng.vec(t * k, 1.0);
                        x[at * k..][..k].copy_from_slice(&probe);
                        for threads in [1, 2, 3] {
                            let mut out = vec![0f32; t * n];
                            on_threads(threads, || {
                                matmul(isa, &x, k, t, &w, Some(&bias), &mut out, n).unwrap()
                            });
                            let row = out[at * n..][..n].to_vec();
                            match &first {
                                None => {
                                    let diff = max_abs_diff(&row, &want);
                                    println!("{label}: max abs diff to reference {diff:.3e}");
                                    assert!(diff <= 8e-6 * (k as f32).sqrt(), "{label}: {diff}");
                                    first = Some(row);
                                }
                                Some(first) => {
                                    let same = first
                                        .iter()
                                        .zip(&row)
                                        .all(|(a, b)| a.to_bits() == b.to_bits());
                                    assert!(same, "{label}: t={t} row {at} threads={threads}");
                                }
                            }
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
                for layout in [
                    WeightLayout::RowMajor,
                    WeightLayout::Panels(PackedLayout::for_isa(isa)),
                ] {
                    let stored = Stored::new(&mut rng, n, k, layout);
                    let w = stored.all()[1];
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
                            "{isa:?} {layout:?} t={t} threads={threads}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn each_path_gives_a_row_the_same_value_wherever_it_sits() {
        // A row's result must not depend on which micro-tile (or remainder tile) computes it.
        let mut rng = Rng::new(5);
        let (n, k) = (77, 300);
        let row = rng.vec(k, 1.0);
        for isa in isas_to_test() {
            for layout in [
                WeightLayout::RowMajor,
                WeightLayout::Panels(PackedLayout::for_isa(isa)),
            ] {
                let stored = Stored::new(&mut rng, n, k, layout);
                let w = stored.all()[0];
                for path in [MatmulPath::Streamed, MatmulPath::Packed] {
                    let t = 23;
                    let x: Vec<f32> = (0..t).flat_map(|_| row.iter().copied()).collect();
                    let mut out = vec![0f32; t * n];
                    matmul_with_path(isa, path, &x, k, t, &w, None, &mut out, n).unwrap();
                    for ti in 1..t {
                        assert_eq!(
                            out[..n],
                            out[ti * n..(ti + 1) * n],
                            "{isa:?} {layout:?} {path:?} row {ti}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_short_buffers() {
        let w = vec![0f32; 12];
        let weight = Weight::row_major(WeightData::F32(&w), 3, 4);
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
        let bad = Weight::row_major(WeightData::F32(&w), 4, 4);
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &bad, None, &mut out, 3).is_err());
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &weight, None, &mut out, 3).is_ok());
        // A panel weight must hold whole panels: 3 rows of 4 in 8-row panels is 32 elements.
        let short = Weight {
            layout: panels(8),
            ..weight
        };
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &short, None, &mut out, 3).is_err());
        let whole = vec![0f32; 32];
        let packed = Weight {
            data: WeightData::F32(&whole),
            ..short
        };
        assert!(matmul(CpuIsa::Portable, &x, 4, 2, &packed, None, &mut out, 3).is_ok());
    }
}
