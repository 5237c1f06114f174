// Row-wise kernels: embedding, row gathers, elementwise ops, RMS norms and RoPE. Each is the CUDA
// twin of a CPU kernel in `kernels/src/cpu` with the same contract (see that kernel's doc); the
// CPU kernel's scalar `reference` is what the GPU tests compare against.

// out[t, :] = table[ids[t], :] widened to f32. Grid: one block per token row.
template <typename W>
__device__ void embedding(const W* table, const unsigned int* ids, int cols, float* out,
                          int out_stride) {
    const W* row = table + (long long)ids[blockIdx.x] * cols;
    float* o = out + (long long)blockIdx.x * out_stride;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = fd_load(row + i);
}

extern "C" __global__ void embedding_f32(const float* table, const unsigned int* ids, int cols,
                                         float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    embedding(table, ids, cols, out, out_stride);
}
extern "C" __global__ void embedding_bf16(const fd_bf16* table, const unsigned int* ids, int cols,
                                          float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    embedding(table, ids, cols, out, out_stride);
}
extern "C" __global__ void embedding_f16(const fd_f16* table, const unsigned int* ids, int cols,
                                         float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    embedding(table, ids, cols, out, out_stride);
}

// out[r, :] = x[rows[r], :]. Grid: one block per output row.
extern "C" __global__ void gather_rows_f32(const float* x, int x_stride, const unsigned int* rows,
                                           int cols, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const float* src = x + (long long)rows[blockIdx.x] * x_stride;
    float* o = out + (long long)blockIdx.x * out_stride;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = src[i];
}

// Elementwise ops over [T, cols]. Grid: (column blocks, T).
extern "C" __global__ void add_f32(const float* a, int a_stride, const float* b, int b_stride,
                                   int cols, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < cols) out[r * out_stride + i] = a[r * a_stride + i] + b[r * b_stride + i];
}

extern "C" __global__ void mul_f32(const float* a, int a_stride, const float* b, int b_stride,
                                   int cols, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < cols) out[r * out_stride + i] = a[r * a_stride + i] * b[r * b_stride + i];
}

__device__ __forceinline__ float fd_silu(float x) { return x / (1.0f + expf(-x)); }

extern "C" __global__ void silu_f32(const float* x, int x_stride, int cols, float* out,
                                    int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < cols) out[r * out_stride + i] = fd_silu(x[r * x_stride + i]);
}

// out[r, i] = silu(gu[r, i]) * gu[r, cols + i].
extern "C" __global__ void silu_mul_f32(const float* gu, int gu_stride, int cols, float* out,
                                        int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < cols) {
        const float* row = gu + (long long)r * gu_stride;
        out[r * out_stride + i] = fd_silu(row[i]) * row[cols + i];
    }
}

// Columns a thread of a row-wise kernel holds in registers at once. Outputs may alias inputs, so
// the compiler keeps every load after the previous store: loading a batch before storing any of
// it makes a 4096-wide row one memory round trip per pass, not one per column (15 us to ~3 us
// per norm on an H100).
#define ROW_BATCH 16

// The sum over i < cols of value(i)^2, read ROW_BATCH columns per thread at a time.
template <typename F>
__device__ __forceinline__ float fd_sum_squares(int cols, F value) {
    float ss = 0.0f;
    for (int b = threadIdx.x; b < cols; b += ROW_BATCH * blockDim.x) {
        float v[ROW_BATCH];
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) {
            const int i = b + j * blockDim.x;
            v[j] = i < cols ? value(i) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) ss += v[j] * v[j];
    }
    return ss;
}

// Per row, per group of `group` columns: out = x * rsqrt(mean(x^2) + eps) * w[i % group].
// Grid: (groups per row, T); the block sums its group's squares.
extern "C" __global__ void rms_norm_f32(const float* x, int x_stride, int group, const float* w,
                                        float eps, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    __shared__ float scratch[32];
    const float* row = x + (long long)blockIdx.y * x_stride + blockIdx.x * group;
    float* o = out + (long long)blockIdx.y * out_stride + blockIdx.x * group;
    const float ss = fd_sum_squares(group, [&](int i) { return row[i]; });
    const float inv = rsqrtf(fd_block_sum(ss, scratch) / group + eps);
    for (int b = threadIdx.x; b < group; b += ROW_BATCH * blockDim.x) {
        float v[ROW_BATCH], g[ROW_BATCH];
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) {
            const int i = b + j * blockDim.x;
            v[j] = i < group ? row[i] : 0.0f;
            g[j] = i < group ? w[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) {
            const int i = b + j * blockDim.x;
            if (i < group) o[i] = v[j] * inv * g[j];
        }
    }
}

// s = x + d; sum_out = s; normed_out = rms_norm(s) over the whole row. Grid: one block per row.
extern "C" __global__ void add_rms_norm_f32(const float* x, int x_stride, const float* d,
                                            int d_stride, int cols, const float* w, float eps,
                                            float* sum_out, int sum_stride, float* normed_out,
                                            int normed_stride) {
    fd_grid_start();
    fd_grid_wait();
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const float* xr = x + r * x_stride;
    const float* dr = d + r * d_stride;
    float* s = sum_out + r * sum_stride;
    float* n = normed_out + r * normed_stride;
    const float ss = fd_sum_squares(cols, [&](int i) { return xr[i] + dr[i]; });
    const float inv = rsqrtf(fd_block_sum(ss, scratch) / cols + eps);
    for (int b = threadIdx.x; b < cols; b += ROW_BATCH * blockDim.x) {
        float v[ROW_BATCH], g[ROW_BATCH];
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) {
            const int i = b + j * blockDim.x;
            v[j] = i < cols ? xr[i] + dr[i] : 0.0f;
            g[j] = i < cols ? w[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < ROW_BATCH; j++) {
            const int i = b + j * blockDim.x;
            if (i < cols) {
                s[i] = v[j];
                n[i] = v[j] * inv * g[j];
            }
        }
    }
}

// Rotate-half RoPE: per head, pairs (x[i], x[i + D/2]) rotated by the angle of table column i at
// the token's position. Grid: (heads, T); threads over i < D/2.
extern "C" __global__ void rope_f32(const float* x, int x_stride, int head_dim,
                                    const unsigned int* positions, const float* cos_table,
                                    const float* sin_table, int table_stride, float* out,
                                    int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int half = head_dim / 2, h = blockIdx.x, r = blockIdx.y;
    const long long p = (long long)positions[r] * table_stride;
    const float* xh = x + (long long)r * x_stride + h * head_dim;
    float* oh = out + (long long)r * out_stride + h * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_table[p + i], s = sin_table[p + i];
        const float lo = xh[i], hi = xh[half + i];
        oh[i] = lo * c - hi * s;
        oh[half + i] = hi * c + lo * s;
    }
}

// Takes (v, i) over (best, at) when it is larger, or equal at an earlier position; a NaN
// compares false both ways and is never taken.
__device__ __forceinline__ void fd_argmax_take(float& best, int& at, float v, int i) {
    if (v > best || (v == best && i < at)) {
        best = v;
        at = i;
    }
}

// The warp's (best, at), in every lane.
__device__ __forceinline__ void fd_argmax_warp(float& best, int& at) {
    for (int o = 16; o > 0; o >>= 1) {
        const float v = fd_shfl_xor(best, o);
        const int i = fd_shfl_xor(at, o);
        fd_argmax_take(best, at, v, i);
    }
}

// ids[r] = the first position of the largest non-NaN value of logits row r (0 for a row of
// NaNs): `sampler::argmax` on the device, so that a greedy decode step copies back one id per
// sequence rather than its row of the vocabulary. Grid: (rows); block: 1024 threads.
extern "C" __global__ void argmax_rows_f32(const float* logits, int cols, unsigned int* ids) {
    fd_grid_start();
    fd_grid_wait();
    __shared__ float warp_value[32];
    __shared__ int warp_index[32];
    const float* row = logits + (long long)blockIdx.x * cols;
    float best = FD_NEG_INF;
    int at = 0x7fffffff;  // -inf is taken at its first position
    for (int i = threadIdx.x; i < cols; i += blockDim.x) fd_argmax_take(best, at, row[i], i);
    fd_argmax_warp(best, at);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_value[warp] = best;
        warp_index[warp] = at;
    }
    __syncthreads();
    if (warp != 0) return;
    const int warps = blockDim.x >> 5;
    best = lane < warps ? warp_value[lane] : FD_NEG_INF;
    at = lane < warps ? warp_index[lane] : 0x7fffffff;
    fd_argmax_warp(best, at);
    if (lane == 0) ids[blockIdx.x] = at == 0x7fffffff ? 0 : at;
}

// One KV block moved between the cache's pools and a contiguous buffer in one launch, where a copy
// per layer and pool cost a driver call each (64 for an 8B-shaped block: about 2 us apiece, most of
// a block's time between two instances on one GPU, docs/PERF.md). Segment s (a layer's keys, then
// its values; keys only for a latent cache) is `seg` floats at `pools[s] + offset` and at
// `other + s * seg`; `into_pools` picks the direction. Grid: (chunks, segments); block: 256.
extern "C" __global__ void kv_block_copy(const unsigned long long* pools, long long offset, int seg,
                                         float* other, int into_pools) {
    fd_grid_start();
    fd_grid_wait();
    float* pooled = reinterpret_cast<float*>(pools[blockIdx.y]) + offset;
    float* buf = other + (long long)blockIdx.y * seg;
    const float* src = into_pools ? buf : pooled;
    float* dst = into_pools ? pooled : buf;
    const int first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
    const bool vectors = seg % 4 == 0 && (((unsigned long long)src | (unsigned long long)dst) & 15) == 0;
    if (vectors) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int i = first; i < seg / 4; i += stride) d4[i] = s4[i];
    } else {
        for (int i = first; i < seg; i += stride) dst[i] = src[i];
    }
}
