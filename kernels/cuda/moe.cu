// Mixture of experts: the CUDA twin of `kernels::cpu::moe`, as three launches and a
// `silu_mul_f32` between the second and the third:
//
//   moe_route_*    token t's router logits, scores and top-k experts with their weights
//   moe_gate_up_*  h[r, :] = x[t, :] @ gate_up(e)^T for each of the T * top_k (token, expert)
//                  rows r = t * top_k + j, e = ids[r]: the expert's I gate rows then its I up rows
//   silu_mul_f32   act[r, i] = silu(h[r, i]) * h[r, I + i]   (rowwise.cu, over the T * top_k rows)
//   moe_down_*     out[t, c] = sum over j in pick order of weights[r] * act[r, :] . down(e)[c, :]
//
// The stacked weights are as the CPU kernel's: `gate_up` `[E * 2I, C]` (expert e's rows at
// e * 2I) and `down` `[E * C, I]` (expert e's rows at e * C), row-major, f32 / bf16 / f16. The
// expert dot products stream their weight rows through `matmul_row` (matmul.cu), the row reader
// tuned to the copy bandwidth (measured on an H100 at DeepSeek-V3's shapes, one token: the 8
// experts' 704 MB in 242 us, 2.9 TB/s), with f32 accumulation. Nothing is accumulated across
// blocks, so the results are deterministic; an output sums its experts best first, as the CPU
// reference does.

// Routing: block size of `moe_route_*` and the experts it ranks at most (the runtime checks
// `experts <= FD_MOE_MAX_EXPERTS`, `MOE_MAX_EXPERTS` in kernels/src/cuda.rs). Each thread holds
// the experts tid and tid + FD_MOE_THREADS.
#define FD_MOE_THREADS 256
#define FD_MOE_WARPS (FD_MOE_THREADS / 32)
#define FD_MOE_MAX_EXPERTS 512
#define FD_MOE_PER_THREAD (FD_MOE_MAX_EXPERTS / FD_MOE_THREADS)

// `routing`, as `ir_types::MoeRouting`.
#define FD_MOE_SOFTMAX 0
#define FD_MOE_SIGMOID 1
#define FD_MOE_SIGMOID_GROUPED 2

// Output rows per block of the expert matmuls: one warp each.
#define FD_MOE_ROWS 8

// Whether `matmul_row` may read the activation rows 16 bytes at a time.
__device__ __forceinline__ bool fd_moe_aligned(const float* x, int stride) {
    return ((unsigned long long)x % 16 == 0) && (stride % 4 == 0);
}

// x[t, :] . w[row, :] over k columns, to every lane of the calling warp (all its lanes call).
template <typename W>
__device__ __forceinline__ float fd_moe_dot(const float* x, int x_stride, bool aligned, int t,
                                            const W* w, int k, int row) {
    return aligned ? matmul_row<W, 1, true, false>(x, x_stride, w, k, row, nullptr, t, 1,
                                                   nullptr, 0)
                   : matmul_row<W, 1, false, false>(x, x_stride, w, k, row, nullptr, t, 1,
                                                    nullptr, 0);
}

// Router rows a warp reads at once in `moe_route_*`, and 16-byte loads per lane per row in
// flight. The route of a token is one block (the launch's contract), so the whole router
// ([E, C], 3.7 MB in bf16 for DeepSeek-V3) streams through a single SM: with one row per warp
// (`matmul_row`) too few bytes were in flight for its latency. Measured on an H100 at E 256,
// C 7168, bf16, one token: 150 us (24 GB/s) one row per warp, 60 us (61 GB/s) with 4 rows of 8
// loads each (128 KB in flight per block). The router of a one-token step would only reach the
// copy bandwidth spread over the SMs, as a matmul of its own before a routing-only kernel.
#define FD_MOE_ROUTER_ROWS 4
#define FD_MOE_ROUTER_UNROLL 8

// logits[e] = x . w[e, :] for the FD_MOE_ROUTER_ROWS rows from `row0` (rows past `rows` read as
// nothing), in every lane of the calling warp. Requires x 16-byte aligned and k a multiple of
// the weights per 16 bytes (`fd_moe_dot` serves the other shapes).
template <typename W>
__device__ __forceinline__ void fd_moe_router_rows(const float* x, const W* w, int k, int row0,
                                                   int rows, float out[FD_MOE_ROUTER_ROWS]) {
    constexpr int E = Packed<W>::N;  // weights per 16-byte load
    constexpr int R = FD_MOE_ROUTER_ROWS, U = FD_MOE_ROUTER_UNROLL;
    const int lane = threadIdx.x & 31;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int base = lane * E; base < k; base += 32 * E * U) {
        uint4 wv[R][U];
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = base + u * 32 * E;
                wv[r][u] = i < k && row0 + r < rows
                               ? fd_load_stream(w + (long long)(row0 + r) * k + i)
                               : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = base + u * 32 * E;
            if (i >= k) continue;
            float xv[E];
#pragma unroll
            for (int j = 0; j < E; j += 4) {
                const float4 a = *reinterpret_cast<const float4*>(x + i + j);
                xv[j] = a.x; xv[j + 1] = a.y; xv[j + 2] = a.z; xv[j + 3] = a.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wf[E];
                Packed<W>::unpack(wv[r][u], wf);
#pragma unroll
                for (int j = 0; j < E; j++) acc[r] += wf[j] * xv[j];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = fd_warp_sum(acc[r]);
}

// Whether expert a with key ka comes before expert b with key kb in the CPU's stable descending
// sort: the larger key first, equal keys (0.0 == -0.0 included) in ascending expert order, NaN
// after every number (NaNs among themselves by index). (NaN, 0x7fffffff) is "no candidate": it
// comes after every expert.
__device__ __forceinline__ bool fd_moe_before(double ka, int a, double kb, int b) {
    const bool na = ka != ka, nb = kb != kb;
    if (na || nb) return na != nb ? nb : a < b;
    if (ka != kb) return ka > kb;
    return a < b;
}

// Block-wide max (NaN ignored, as f64::max) and sum of doubles; every thread gets the result.
// The fixed shuffle tree makes both deterministic (the CPU sums in order: the difference is in
// the last bits of a double). `scratch` holds FD_MOE_WARPS doubles of shared memory.
__device__ __forceinline__ double fd_moe_block_max(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, fd_shfl_xor(v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < FD_MOE_WARPS; w++) v = fmax(v, scratch[w]);
    return v;
}
__device__ __forceinline__ double fd_moe_block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += fd_shfl_xor(v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < FD_MOE_WARPS; w++) v += scratch[w];
    return v;
}

// Token blockIdx.x's route: `route` and `mask_groups` of kernels/src/cpu/moe.rs. Logits in f32
// (a warp per FD_MOE_ROUTER_ROWS experts), everything after in f64 as on the CPU; top_k <=
// experts (the CPU kernel's check). ids and weights are
// [T, top_k], best first. Grid: (T); block: FD_MOE_THREADS.
template <typename W>
__device__ void fd_moe_route(const float* x, int x_stride, int cols, const W* router,
                             const float* bias, int experts, int top_k, int routing, int groups,
                             int top_groups, int normalize, float scaling, int* ids,
                             float* weights) {
    __shared__ float logits[FD_MOE_MAX_EXPERTS];
    __shared__ double score[FD_MOE_MAX_EXPERTS];
    __shared__ double key[FD_MOE_MAX_EXPERTS];
    __shared__ double group_rank[FD_MOE_MAX_EXPERTS];
    __shared__ int group_kept[FD_MOE_MAX_EXPERTS];
    __shared__ int picked[FD_MOE_MAX_EXPERTS];
    // Per-warp winners of a selection round, double-buffered by round so that one barrier a
    // round is enough (a round's writes go to the other buffer than the reads of the one before).
    __shared__ double win_key[2][FD_MOE_WARPS];
    __shared__ int win_id[2][FD_MOE_WARPS];
    __shared__ double scratch[FD_MOE_WARPS];
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    const float* xr = x + (long long)t * x_stride;
    if ((unsigned long long)xr % 16 == 0 && cols % Packed<W>::N == 0) {
        for (int e0 = warp * FD_MOE_ROUTER_ROWS; e0 < experts;
             e0 += FD_MOE_WARPS * FD_MOE_ROUTER_ROWS) {
            float l[FD_MOE_ROUTER_ROWS];
            fd_moe_router_rows(xr, router, cols, e0, experts, l);
#pragma unroll
            for (int r = 0; r < FD_MOE_ROUTER_ROWS; r++) {
                if (lane == 0 && e0 + r < experts) logits[e0 + r] = l[r];
            }
        }
    } else {
        const bool aligned = fd_moe_aligned(x, x_stride);
        for (int e = warp; e < experts; e += FD_MOE_WARPS) {
            const float l = fd_moe_dot(x, x_stride, aligned, t, router, cols, e);
            if (lane == 0) logits[e] = l;
        }
    }
    __syncthreads();

    // Scores.
    double s[FD_MOE_PER_THREAD];
    if (routing == FD_MOE_SOFTMAX) {
        double m = -__longlong_as_double(0x7ff0000000000000ll);  // -inf
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
            const int e = tid + i * FD_MOE_THREADS;
            if (e < experts) m = fmax(m, (double)logits[e]);
        }
        m = fd_moe_block_max(m, scratch);
        double sum = 0.0;
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
            const int e = tid + i * FD_MOE_THREADS;
            s[i] = e < experts ? exp((double)logits[e] - m) : 0.0;
            sum += s[i];
        }
        sum = fd_moe_block_sum(sum, scratch);
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) s[i] /= sum;
    } else {
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
            const int e = tid + i * FD_MOE_THREADS;
            s[i] = e < experts ? 1.0 / (1.0 + exp(-(double)logits[e])) : 0.0;
        }
    }
#pragma unroll
    for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
        const int e = tid + i * FD_MOE_THREADS;
        if (e < experts) {
            score[e] = s[i];
            key[e] = s[i] + (bias ? (double)bias[e] : 0.0);
        }
    }
    __syncthreads();

    // Group-limited routing: rank the groups by the sum of their two best keys (NaN keys skipped,
    // a repeated best counting twice, as the CPU's scan), keep the best top_groups (ties to the
    // lower group) and zero the keys of the others. The CPU skips the step when the groups do not
    // divide the experts. A group whose rank is NaN (only from infinite keys) is kept here and
    // pushes no other group out; the CPU's sort has no defined order for it.
    if (routing == FD_MOE_SIGMOID_GROUPED && groups > 0 && experts % groups == 0) {
        const int size = experts / groups;
        const double neg_inf = -__longlong_as_double(0x7ff0000000000000ll);
        for (int g = warp; g < groups; g += FD_MOE_WARPS) {
            double best = neg_inf, second = neg_inf;
            for (int i = lane; i < size; i += 32) {
                const double k = key[g * size + i];
                if (k > best) {
                    second = best;
                    best = k;
                } else if (k > second) {
                    second = k;
                }
            }
            // The two largest of the union of two lanes' pairs.
            for (int o = 16; o > 0; o >>= 1) {
                const double b2 = fd_shfl_xor(best, o);
                const double s2 = fd_shfl_xor(second, o);
                second = fmax(fmin(best, b2), fmax(second, s2));
                best = fmax(best, b2);
            }
            if (lane == 0) group_rank[g] = best + second;
        }
        __syncthreads();
        for (int g = tid; g < groups; g += FD_MOE_THREADS) {
            const double rg = group_rank[g];
            int ahead = 0;
            for (int h = 0; h < groups; h++) {
                const double rh = group_rank[h];
                ahead += rh > rg || (rh == rg && h < g);
            }
            group_kept[g] = ahead < top_groups;
        }
        __syncthreads();
        for (int e = tid; e < experts; e += FD_MOE_THREADS) {
            if (!group_kept[e / size]) key[e] = 0.0;
        }
        __syncthreads();
    }

    // Top-k: top_k rounds of a block-wide "first in sort order" among the experts not yet picked.
    // Every thread merges the warps' winners in the same order, so all agree on the round's pick.
    double k_own[FD_MOE_PER_THREAD];
    int id_own[FD_MOE_PER_THREAD];
    const double none_key = __longlong_as_double(0x7ff8000000000000ll);  // NaN
    const int none_id = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
        const int e = tid + i * FD_MOE_THREADS;
        k_own[i] = e < experts ? key[e] : none_key;
        id_own[i] = e < experts ? e : none_id;
    }
    for (int j = 0; j < top_k; j++) {
        double bk = none_key;
        int bi = none_id;
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
            if (fd_moe_before(k_own[i], id_own[i], bk, bi)) {
                bk = k_own[i];
                bi = id_own[i];
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const double k2 = fd_shfl_xor(bk, o);
            const int i2 = fd_shfl_xor(bi, o);
            if (fd_moe_before(k2, i2, bk, bi)) {
                bk = k2;
                bi = i2;
            }
        }
        const int buf = j & 1;
        if (lane == 0) {
            win_key[buf][warp] = bk;
            win_id[buf][warp] = bi;
        }
        __syncthreads();
        bk = win_key[buf][0];
        bi = win_id[buf][0];
        for (int w = 1; w < FD_MOE_WARPS; w++) {
            if (fd_moe_before(win_key[buf][w], win_id[buf][w], bk, bi)) {
                bk = win_key[buf][w];
                bi = win_id[buf][w];
            }
        }
#pragma unroll
        for (int i = 0; i < FD_MOE_PER_THREAD; i++) {
            if (id_own[i] == bi) {
                k_own[i] = none_key;
                id_own[i] = none_id;
            }
        }
        if (tid == 0) picked[j] = bi;
    }

    // Weights: the picked scores (not keys), summed in pick order as the CPU does.
    if (tid == 0) {
        double sum = 0.0;
        for (int j = 0; j < top_k; j++) sum += score[picked[j]];
        const double div = normalize ? fmax(sum, 1e-12) : 1.0;
        for (int j = 0; j < top_k; j++) {
            const int e = picked[j];
            ids[t * top_k + j] = e;
            weights[t * top_k + j] = (float)(score[e] / div * (double)scaling);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FD_MOE_THREADS)
moe_route_f32(const float* x, int x_stride, int cols, const float* router, const float* bias,
              int experts, int top_k, int routing, int groups, int top_groups, int normalize,
              float scaling, int* ids, float* weights) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_route(x, x_stride, cols, router, bias, experts, top_k, routing, groups, top_groups,
                 normalize, scaling, ids, weights);
}
extern "C" __global__ void __launch_bounds__(FD_MOE_THREADS)
moe_route_bf16(const float* x, int x_stride, int cols, const fd_bf16* router, const float* bias,
               int experts, int top_k, int routing, int groups, int top_groups, int normalize,
               float scaling, int* ids, float* weights) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_route(x, x_stride, cols, router, bias, experts, top_k, routing, groups, top_groups,
                 normalize, scaling, ids, weights);
}
extern "C" __global__ void __launch_bounds__(FD_MOE_THREADS)
moe_route_f16(const float* x, int x_stride, int cols, const fd_f16* router, const float* bias,
              int experts, int top_k, int routing, int groups, int top_groups, int normalize,
              float scaling, int* ids, float* weights) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_route(x, x_stride, cols, router, bias, experts, top_k, routing, groups, top_groups,
                 normalize, scaling, ids, weights);
}

// h[r, n] = x[r / top_k, :] . gate_up[ids[r] * 2I + n, :] for n < 2I (I = inter): the gate
// then the up projections of row r's expert, laid out for `silu_mul_f32` (gu_stride 2I,
// cols I). Grid: (ceil(2I / FD_MOE_ROWS), T * top_k); block: 32 * FD_MOE_ROWS, a warp per n.
template <typename W>
__device__ void fd_moe_gate_up(const float* x, int x_stride, int cols, const W* gate_up,
                               int inter, const int* ids, int top_k, float* h) {
    const int r = blockIdx.y, n = blockIdx.x * FD_MOE_ROWS + (threadIdx.x >> 5);
    const int width = 2 * inter;
    if (n >= width) return;  // whole warps
    const int e = ids[r];
    const float v = fd_moe_dot(x, x_stride, fd_moe_aligned(x, x_stride), r / top_k, gate_up,
                               cols, e * width + n);
    if ((threadIdx.x & 31) == 0) h[(long long)r * width + n] = v;
}

extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_gate_up_f32(const float* x, int x_stride, int cols, const float* gate_up, int inter,
                const int* ids, int top_k, float* h) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_gate_up(x, x_stride, cols, gate_up, inter, ids, top_k, h);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_gate_up_bf16(const float* x, int x_stride, int cols, const fd_bf16* gate_up, int inter,
                 const int* ids, int top_k, float* h) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_gate_up(x, x_stride, cols, gate_up, inter, ids, top_k, h);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_gate_up_f16(const float* x, int x_stride, int cols, const fd_f16* gate_up, int inter,
                const int* ids, int top_k, float* h) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_gate_up(x, x_stride, cols, gate_up, inter, ids, top_k, h);
}

// out[t, c] = sum over j = 0..top_k in order (best expert first) of
// weights[r] * (act[r, :] . down[ids[r] * C + c, :]), r = t * top_k + j, in f32: the token's
// whole sum in one warp, so no atomics and a fixed order. act is [T * top_k, I] (row stride I).
// Grid: (ceil(C / FD_MOE_ROWS), T); block: 32 * FD_MOE_ROWS, a warp per column c.
template <typename W>
__device__ void fd_moe_down(const float* act, int inter, const W* down, int cols, const int* ids,
                            const float* weights, int top_k, float* out, int out_stride) {
    const int t = blockIdx.y, c = blockIdx.x * FD_MOE_ROWS + (threadIdx.x >> 5);
    if (c >= cols) return;  // whole warps
    const bool aligned = fd_moe_aligned(act, inter);
    float acc = 0.0f;
    for (int j = 0; j < top_k; j++) {
        const int r = t * top_k + j;
        const float v = fd_moe_dot(act, inter, aligned, r, down, inter, ids[r] * cols + c);
        acc += weights[r] * v;
    }
    if ((threadIdx.x & 31) == 0) out[(long long)t * out_stride + c] = acc;
}

extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_down_f32(const float* act, int inter, const float* down, int cols, const int* ids,
             const float* weights, int top_k, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_down(act, inter, down, cols, ids, weights, top_k, out, out_stride);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_down_bf16(const float* act, int inter, const fd_bf16* down, int cols, const int* ids,
              const float* weights, int top_k, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_down(act, inter, down, cols, ids, weights, top_k, out, out_stride);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_down_f16(const float* act, int inter, const fd_f16* down, int cols, const int* ids,
             const float* weights, int top_k, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_moe_down(act, inter, down, cols, ids, weights, top_k, out, out_stride);
}

// Quantized experts (every scheme: W8A16, W4A16, W2A16, W8A8, W4A8, FP8). fdc quantizes the
// stacked weights as one [E * R, K] matrix in quant.cu's panels of QPANEL rows, each expert's R
// rows whole panels (it refuses others), so expert e is the matrix starting at panel
// e * R / QPANEL, which `qmatmul` reads as it is. The launches after the route (the router stays
// plain):
//
//   quantize_rows_*     A8 and FP8 only: the T token rows onto their grid (quant.cu)
//   moe_gate_up_q*      h[r, :] = x[r / top_k, :] @ gate_up(ids[r])^T, a block per panel and row
//   silu_mul_f32        act = silu(gate) * up, over the T * top_k rows
//   quantize_rows_*     A8 and FP8 only: the T * top_k act rows onto their grid
//   moe_down_q*         y[r, :] = act[r, :] @ down(ids[r])^T, unweighted
//   moe_combine_f32     out[t, :] = sum over j in pick order of weights[r] * y[r, :]
//
// The combine sums a token's picks best first as `fd_moe_down` does; nothing is accumulated
// across blocks, so the results are deterministic.

// The parts of expert e of a stacked quantized weight with `rows` rows per expert and K = k.
template <int BITS>
struct FdExpertPanels {
    const unsigned char* codes;
    const fd_f16* scales;
    const fd_f16* mins;
    __device__ FdExpertPanels(const unsigned char* c, const fd_f16* s, const fd_f16* m, int e,
                              int rows, int k, int group) {
        const long long panels = (long long)e * (rows / QPANEL);
        codes = c + panels * k * QLayout<BITS>::BPK;
        scales = s + panels * (k / group) * QPANEL;
        mins = m ? m + panels * (k / group) * QPANEL : nullptr;
    }
};

// out[r, n] = x[r / x_div, :] . expert(ids[r])[n, :] for the block's panel of n (blockIdx.x)
// and (token, pick) row r = blockIdx.y; `row_scales` (A8, FP8) is indexed like x's rows.
// Grid: (rows / QPANEL, T * top_k); block: 32 * QMATMUL_WARPS.
template <int BITS, bool E4M3>
__device__ void fd_moe_qrows(const float* x, int x_stride, int x_div, const unsigned char* codes,
                             int k, int rows, int group, const fd_f16* scales,
                             const fd_f16* mins, const float* row_scales, const int* ids,
                             float* out) {
    fd_grid_wait();  // the expert ids come from the route
    const int r = blockIdx.y, t = r / x_div;
    const FdExpertPanels<BITS> w(codes, scales, mins, ids[r], rows, k, group);
    const float* xr = x + (long long)t * x_stride;
    const float* rs = row_scales ? row_scales + t : nullptr;
    float* o = out + (long long)r * rows;
    if ((unsigned long long)xr % 16 == 0) {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, true>(xr, 0, w.codes, k, rows, group, w.scales,
                                                    w.mins, nullptr, rs, 0, 1, o, 0);
    } else {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, false>(xr, 0, w.codes, k, rows, group, w.scales,
                                                     w.mins, nullptr, rs, 0, 1, o, 0);
    }
}

// Gate-up: x [T, cols], h [T * top_k, 2 * inter].
template <int BITS, bool E4M3>
__device__ void fd_moe_qgate_up(const float* x, int x_stride, int cols, const unsigned char* codes,
                                int inter, int group, const fd_f16* scales, const fd_f16* mins,
                                const float* row_scales, const int* ids, int top_k, float* h) {
    fd_moe_qrows<BITS, E4M3>(x, x_stride, top_k, codes, cols, 2 * inter, group, scales, mins,
                             row_scales, ids, h);
}

// Down: act [T * top_k, inter] (row stride act_stride), y [T * top_k, cols].
template <int BITS, bool E4M3>
__device__ void fd_moe_qdown(const float* act, int act_stride, int inter,
                             const unsigned char* codes, int cols, int group,
                             const fd_f16* scales, const fd_f16* mins, const float* row_scales,
                             const int* ids, float* y) {
    fd_moe_qrows<BITS, E4M3>(act, act_stride, 1, codes, inter, cols, group, scales, mins,
                             row_scales, ids, y);
}

extern "C" __global__ void moe_gate_up_q8(const float* x, int x_stride, int cols,
                                          const unsigned char* codes, int inter, int group,
                                          const fd_f16* scales, const fd_f16* mins,
                                          const float* row_scales, const int* ids, int top_k,
                                          float* h) {
    fd_grid_start();
    fd_moe_qgate_up<8, false>(x, x_stride, cols, codes, inter, group, scales, mins, row_scales,
                              ids, top_k, h);
}
extern "C" __global__ void moe_gate_up_q4(const float* x, int x_stride, int cols,
                                          const unsigned char* codes, int inter, int group,
                                          const fd_f16* scales, const fd_f16* mins,
                                          const float* row_scales, const int* ids, int top_k,
                                          float* h) {
    fd_grid_start();
    fd_moe_qgate_up<4, false>(x, x_stride, cols, codes, inter, group, scales, mins, row_scales,
                              ids, top_k, h);
}
extern "C" __global__ void moe_gate_up_q2(const float* x, int x_stride, int cols,
                                          const unsigned char* codes, int inter, int group,
                                          const fd_f16* scales, const fd_f16* mins,
                                          const float* row_scales, const int* ids, int top_k,
                                          float* h) {
    fd_grid_start();
    fd_moe_qgate_up<2, false>(x, x_stride, cols, codes, inter, group, scales, mins, row_scales,
                              ids, top_k, h);
}
extern "C" __global__ void moe_gate_up_e4m3(const float* x, int x_stride, int cols,
                                            const unsigned char* codes, int inter, int group,
                                            const fd_f16* scales, const fd_f16* mins,
                                            const float* row_scales, const int* ids, int top_k,
                                            float* h) {
    fd_grid_start();
    fd_moe_qgate_up<8, true>(x, x_stride, cols, codes, inter, group, scales, mins, row_scales,
                             ids, top_k, h);
}
extern "C" __global__ void moe_down_q8(const float* act, int act_stride, int inter,
                                       const unsigned char* codes, int cols, int group,
                                       const fd_f16* scales, const fd_f16* mins,
                                       const float* row_scales, const int* ids, float* y) {
    fd_grid_start();
    fd_moe_qdown<8, false>(act, act_stride, inter, codes, cols, group, scales, mins, row_scales,
                           ids, y);
}
extern "C" __global__ void moe_down_q4(const float* act, int act_stride, int inter,
                                       const unsigned char* codes, int cols, int group,
                                       const fd_f16* scales, const fd_f16* mins,
                                       const float* row_scales, const int* ids, float* y) {
    fd_grid_start();
    fd_moe_qdown<4, false>(act, act_stride, inter, codes, cols, group, scales, mins, row_scales,
                           ids, y);
}
extern "C" __global__ void moe_down_q2(const float* act, int act_stride, int inter,
                                       const unsigned char* codes, int cols, int group,
                                       const fd_f16* scales, const fd_f16* mins,
                                       const float* row_scales, const int* ids, float* y) {
    fd_grid_start();
    fd_moe_qdown<2, false>(act, act_stride, inter, codes, cols, group, scales, mins, row_scales,
                           ids, y);
}
extern "C" __global__ void moe_down_e4m3(const float* act, int act_stride, int inter,
                                         const unsigned char* codes, int cols, int group,
                                         const fd_f16* scales, const fd_f16* mins,
                                         const float* row_scales, const int* ids, float* y) {
    fd_grid_start();
    fd_moe_qdown<8, true>(act, act_stride, inter, codes, cols, group, scales, mins, row_scales,
                          ids, y);
}

// out[t, c] = sum over j = 0..top_k in order (best expert first) of weights[r] * y[s, c],
// r = t * top_k + j, s = slot[r] (the row's place when grouped by expert) or r when slot is null.
// Grid: (ceil(cols / 256), T); block: 256.
extern "C" __global__ void moe_combine_f32(const float* y, int cols, const int* slot,
                                           const float* weights, int top_k, float* out,
                                           int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (c >= cols) return;
    float acc = 0.0f;
    for (int j = 0; j < top_k; j++) {
        const int r = t * top_k + j;
        const int s = slot ? slot[r] : r;
        acc += weights[r] * y[(long long)s * cols + c];
    }
    out[(long long)t * out_stride + c] = acc;
}

// Passes of several tokens group their (token, pick) rows by expert, as the CPU kernel does, so
// that an expert's weights are read once per tile of up to FD_MOE_TILE of its rows rather than
// once per row (a decode step of one sequence picks top_k distinct experts and keeps the
// per-pick kernels above):
//
//   moe_group         sorts the rows by expert and cuts each expert's run into tiles
//   moe_gather_f32    xs[pos, :] = x[order[pos] / top_k, :], the rows in that order
//   quantize_rows_*   A8 and FP8 only, over xs
//   moe_tile_*        h[pos, :] = xs[pos, :] @ gate_up(e)^T for a tile of expert e's rows
//   silu_mul_f32      over all rows
//   quantize_rows_*   A8 and FP8 only
//   moe_tile_*        y[pos, :] = act[pos, :] @ down(e)^T
//   moe_combine_f32   with slot[r] = pos
//
// The tile kernels are the dense matmuls' row readers (`matmul_row`, `qmatmul`) on a tile's
// consecutive rows; each row's sums do not depend on the rows beside it, so the order the
// grouping gives rows of one expert (atomics) does not change any result.
#define FD_MOE_TILE 4  // at most the row readers' token blocks
static_assert(FD_MOE_TILE <= QTOKENS, "a tile's rows fit qmatmul's token block");
#define FD_MOE_GROUP_THREADS 1024

// One block. order[pos] = r and slot[r] = pos for the picks' rows r sorted by expert; tile i
// is (first pos, rows, expert) = tiles[i].x, .y, .z, i < n_tiles[0]. The tile kernels' grids
// have room for every possible tile (ceil(picks / FD_MOE_TILE) + min(experts, picks)); the
// blocks past n_tiles[0] return at once.
extern "C" __global__ void __launch_bounds__(FD_MOE_GROUP_THREADS)
moe_group(const int* ids, int picks, int experts, int* order, int* slot, int4* tiles,
          int* n_tiles) {
    __shared__ int count[FD_MOE_MAX_EXPERTS];
    __shared__ int cursor[FD_MOE_MAX_EXPERTS];
    fd_grid_start();
    fd_grid_wait();
    const int tid = threadIdx.x;
    for (int e = tid; e < experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int r = tid; r < picks; r += blockDim.x) atomicAdd(&count[ids[r]], 1);
    __syncthreads();
    if (tid == 0) {
        int pos = 0, n = 0;
        for (int e = 0; e < experts; e++) {
            cursor[e] = pos;
            for (int s = 0; s < count[e]; s += FD_MOE_TILE)
                tiles[n++] = make_int4(pos + s, min(FD_MOE_TILE, count[e] - s), e, 0);
            pos += count[e];
        }
        n_tiles[0] = n;
    }
    __syncthreads();
    for (int r = tid; r < picks; r += blockDim.x) {
        const int pos = atomicAdd(&cursor[ids[r]], 1);
        order[pos] = r;
        slot[r] = pos;
    }
}

// xs[pos, c] = x[order[pos] / top_k, c]. Grid: (ceil(cols / 256), picks); block: 256.
extern "C" __global__ void moe_gather_f32(const float* x, int x_stride, int cols,
                                          const int* order, int top_k, float* xs) {
    fd_grid_start();
    fd_grid_wait();
    const int c = blockIdx.x * blockDim.x + threadIdx.x, pos = blockIdx.y;
    if (c >= cols) return;
    xs[(long long)pos * cols + c] = x[(long long)(order[pos] / top_k) * x_stride + c];
}

// out[pos, n] = xs[pos, :] . w(e)[n, :] for tile blockIdx.y's rows pos and expert e, where w(e)
// is rows e * rows .. of a stacked plain weight of K = k; a warp per n (FD_MOE_ROWS per block).
// xs and out are dense ([picks, k] and [picks, rows]). Grid: (ceil(rows / FD_MOE_ROWS),
// max tiles); block: 32 * FD_MOE_ROWS.
template <typename W>
__device__ void fd_moe_tile(const float* xs, int k, const W* w, int rows, const int4* tiles,
                            const int* n_tiles, float* out) {
    fd_grid_wait();  // the tiles come from moe_group
    if ((int)blockIdx.y >= n_tiles[0]) return;
    const int4 tile = tiles[blockIdx.y];
    const int n = blockIdx.x * FD_MOE_ROWS + (threadIdx.x >> 5);
    if (n >= rows) return;  // whole warps
    const W* we = w + (long long)tile.z * rows * k;
    // A tile of one row (an expert only one token picked: most of them in a decode step of a
    // batch) takes the single-token reader, straight-line code with one accumulator.
    const bool aligned = (unsigned long long)xs % 16 == 0 && k % 4 == 0;
    if (tile.y == 1 && aligned) {
        matmul_row<W, 1, true>(xs, k, we, k, n, nullptr, tile.x, 1, out, rows);
    } else if (tile.y == 1) {
        matmul_row<W, 1, false>(xs, k, we, k, n, nullptr, tile.x, 1, out, rows);
    } else if (aligned) {
        matmul_row<W, FD_MOE_TILE, true>(xs, k, we, k, n, nullptr, tile.x, tile.y, out, rows);
    } else {
        matmul_row<W, FD_MOE_TILE, false>(xs, k, we, k, n, nullptr, tile.x, tile.y, out, rows);
    }
}

// The quantized twin: a block per panel (blockIdx.x) of expert e's rows, `row_scales` (A8, FP8)
// per row of xs. Grid: (rows / QPANEL, max tiles); block: 32 * QMATMUL_WARPS.
template <int BITS, bool E4M3>
__device__ void fd_moe_qtile(const float* xs, int k, const unsigned char* codes, int rows,
                             int group, const fd_f16* scales, const fd_f16* mins,
                             const float* row_scales, const int4* tiles, const int* n_tiles,
                             float* out) {
    fd_grid_wait();
    if ((int)blockIdx.y >= n_tiles[0]) return;
    const int4 tile = tiles[blockIdx.y];
    const FdExpertPanels<BITS> w(codes, scales, mins, tile.z, rows, k, group);
    // One row: the single-token path (its FMAs are a quarter of the token block's, which
    // runs all QTOKENS slots).
    if (tile.y == 1) {
        if ((unsigned long long)(xs + (long long)tile.x * k) % 16 == 0) {
            qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, true>(xs, k, w.codes, k, rows, group, w.scales,
                                                        w.mins, nullptr, row_scales, tile.x, 1,
                                                        out, rows);
        } else {
            qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, false>(xs, k, w.codes, k, rows, group,
                                                         w.scales, w.mins, nullptr, row_scales,
                                                         tile.x, 1, out, rows);
        }
    } else if ((unsigned long long)xs % 16 == 0 && k % 4 == 0) {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, QTOKENS, true>(xs, k, w.codes, k, rows, group,
                                                          w.scales, w.mins, nullptr, row_scales,
                                                          tile.x, tile.y, out, rows);
    } else {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, QTOKENS, false>(xs, k, w.codes, k, rows, group,
                                                           w.scales, w.mins, nullptr, row_scales,
                                                           tile.x, tile.y, out, rows);
    }
}

extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_tile_f32(const float* xs, int k, const float* w, int rows, const int4* tiles,
             const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_tile(xs, k, w, rows, tiles, n_tiles, out);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_tile_bf16(const float* xs, int k, const fd_bf16* w, int rows, const int4* tiles,
              const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_tile(xs, k, w, rows, tiles, n_tiles, out);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MOE_ROWS)
moe_tile_f16(const float* xs, int k, const fd_f16* w, int rows, const int4* tiles,
             const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_tile(xs, k, w, rows, tiles, n_tiles, out);
}
extern "C" __global__ void moe_tile_q8(const float* xs, int k, const unsigned char* codes,
                                       int rows, int group, const fd_f16* scales,
                                       const fd_f16* mins, const float* row_scales,
                                       const int4* tiles, const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_qtile<8, false>(xs, k, codes, rows, group, scales, mins, row_scales, tiles, n_tiles,
                           out);
}
extern "C" __global__ void moe_tile_q4(const float* xs, int k, const unsigned char* codes,
                                       int rows, int group, const fd_f16* scales,
                                       const fd_f16* mins, const float* row_scales,
                                       const int4* tiles, const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_qtile<4, false>(xs, k, codes, rows, group, scales, mins, row_scales, tiles, n_tiles,
                           out);
}
extern "C" __global__ void moe_tile_q2(const float* xs, int k, const unsigned char* codes,
                                       int rows, int group, const fd_f16* scales,
                                       const fd_f16* mins, const float* row_scales,
                                       const int4* tiles, const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_qtile<2, false>(xs, k, codes, rows, group, scales, mins, row_scales, tiles, n_tiles,
                           out);
}
extern "C" __global__ void moe_tile_e4m3(const float* xs, int k, const unsigned char* codes,
                                         int rows, int group, const fd_f16* scales,
                                         const fd_f16* mins, const float* row_scales,
                                         const int4* tiles, const int* n_tiles, float* out) {
    fd_grid_start();
    fd_moe_qtile<8, true>(xs, k, codes, rows, group, scales, mins, row_scales, tiles, n_tiles,
                          out);
}
