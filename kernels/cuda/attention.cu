// Causal GQA attention over a paged KV cache: the CUDA twin of `kernels::cpu::attention`, for one
// sequence per launch pair. A layer's cache is `[blocks, block_size, KV, FD_HEAD_DIM]` f32 for
// K and for V; position p of the sequence lives in block `blocks[p / block_size]` at row
// `p % block_size`. FD_HEAD_DIM (at most 256) is the plan's, defined when the
// module is built; the block size is the runtime's choice.

#define ATTENTION_WARPS 4
// Head elements per lane: lane l holds elements l, l + 32, ... below FD_HEAD_DIM.
#define HEAD_LANES ((FD_HEAD_DIM + 31) / 32)

__device__ __forceinline__ long long fd_cache_row(const unsigned int* blocks, int block_size,
                                                  int pos, int kv_heads, int g) {
    const long long slot = (long long)blocks[pos / block_size] * block_size + pos % block_size;
    return (slot * kv_heads + g) * FD_HEAD_DIM;
}

// Writes the T new tokens' K and V rows at their positions. Grid: (KV, T); block: FD_HEAD_DIM.
extern "C" __global__ void kv_append_f32(const float* k, int k_stride, const float* v,
                                         int v_stride, const unsigned int* positions,
                                         const unsigned int* blocks, int block_size, int kv_heads,
                                         float* k_cache, float* v_cache) {
    const int g = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
    const long long at = fd_cache_row(blocks, block_size, positions[r], kv_heads, g);
    k_cache[at + d] = k[(long long)r * k_stride + g * FD_HEAD_DIM + d];
    v_cache[at + d] = v[(long long)r * v_stride + g * FD_HEAD_DIM + d];
}

// Attention is split over the sequence (the flash-decoding layout) so that a decode step, one
// query per head, still spreads over every SM: `attention_partial_f32` attends each query to one
// chunk of `chunk` positions per block and writes the chunk's partial result, and
// `attention_merge_f32` merges a query's chunks. A partial is `[m, l, acc[FD_HEAD_DIM]]`: the
// chunk's largest score, its sum of exp(score - m), and its exp-weighted sum of values.
#define PARTIAL_WIDTH (FD_HEAD_DIM + 2)

// Grid: (H, T, max_chunks); block: 32 * ATTENTION_WARPS. partial: [T, H, max_chunks, PARTIAL_WIDTH].
// Each warp takes every ATTENTION_WARPS-th key of the chunk with an online softmax; the warps are
// merged into the chunk's partial. Chunks past the query's position write an empty partial.
extern "C" __global__ void attention_partial_f32(const float* q, int q_stride,
                                                 const unsigned int* positions,
                                                 const unsigned int* blocks, int block_size,
                                                 int n_heads, int kv_heads, float scale,
                                                 const float* k_cache, const float* v_cache,
                                                 int chunk, float* partial) {
    __shared__ float part_max[ATTENTION_WARPS], part_sum[ATTENTION_WARPS];
    __shared__ float part_acc[ATTENTION_WARPS][FD_HEAD_DIM];
    const int h = blockIdx.x, r = blockIdx.y, c = blockIdx.z, max_chunks = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = h / (n_heads / kv_heads);
    const int last = positions[r];
    const int begin = c * chunk, end = min(begin + chunk, last + 1);
    float* out = partial + (((long long)r * n_heads + h) * max_chunks + c) * PARTIAL_WIDTH;
    if (begin > last) {
        if (threadIdx.x == 0) {
            out[0] = FD_NEG_INF;
            out[1] = 0.0f;
        }
        return;
    }
    const float* qh = q + (long long)r * q_stride + h * FD_HEAD_DIM;
    float qv[HEAD_LANES], acc[HEAD_LANES];
#pragma unroll
    for (int j = 0; j < HEAD_LANES; j++) {
        const int d = lane + 32 * j;
        qv[j] = d < FD_HEAD_DIM ? qh[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = FD_NEG_INF, l = 0.0f;
    for (int p = begin + warp; p < end; p += ATTENTION_WARPS) {
        const long long at = fd_cache_row(blocks, block_size, p, kv_heads, g);
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < HEAD_LANES; j++) {
            const int d = lane + 32 * j;
            if (d < FD_HEAD_DIM) dot += qv[j] * k_cache[at + d];
        }
        const float s = fd_warp_sum(dot) * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new), e = expf(s - m_new);
        l = l * correction + e;
#pragma unroll
        for (int j = 0; j < HEAD_LANES; j++) {
            const int d = lane + 32 * j;
            if (d < FD_HEAD_DIM) acc[j] = acc[j] * correction + e * v_cache[at + d];
        }
        m = m_new;
    }
    if (lane == 0) {
        part_max[warp] = m;
        part_sum[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < HEAD_LANES; j++) {
        const int d = lane + 32 * j;
        if (d < FD_HEAD_DIM) part_acc[warp][d] = acc[j];
    }
    __syncthreads();
    float m_all = FD_NEG_INF;
    for (int w = 0; w < ATTENTION_WARPS; w++) m_all = fmaxf(m_all, part_max[w]);
    // A warp that saw no key (a chunk shorter than the warps) holds m = -inf and adds nothing.
    float l_all = 0.0f;
    for (int w = 0; w < ATTENTION_WARPS; w++) {
        if (part_max[w] != FD_NEG_INF) l_all += part_sum[w] * expf(part_max[w] - m_all);
    }
    for (int d = threadIdx.x; d < FD_HEAD_DIM; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTENTION_WARPS; w++) {
            if (part_max[w] != FD_NEG_INF) v += part_acc[w][d] * expf(part_max[w] - m_all);
        }
        out[2 + d] = v;
    }
    if (threadIdx.x == 0) {
        out[0] = m_all;
        out[1] = l_all;
    }
}

// out[r, h*D..] = the merge of query r's chunk partials for head h: chunks 0..=positions[r] /
// chunk, each weighted by exp(m_c - max m). Grid: (H, T); block: any multiple of 32.
extern "C" __global__ void attention_merge_f32(const float* partial,
                                               const unsigned int* positions, int n_heads,
                                               int chunk, int max_chunks, float* out,
                                               int out_stride) {
    const int h = blockIdx.x, r = blockIdx.y;
    const int chunks = min((int)(positions[r] / chunk) + 1, max_chunks);
    const float* base = partial + ((long long)r * n_heads + h) * max_chunks * PARTIAL_WIDTH;
    float m_all = FD_NEG_INF;
    for (int c = 0; c < chunks; c++) m_all = fmaxf(m_all, base[c * PARTIAL_WIDTH]);
    float l_all = 0.0f;
    for (int c = 0; c < chunks; c++) {
        const float* part = base + c * PARTIAL_WIDTH;
        if (part[0] != FD_NEG_INF) l_all += part[1] * expf(part[0] - m_all);
    }
    float* oh = out + (long long)r * out_stride + h * FD_HEAD_DIM;
    for (int d = threadIdx.x; d < FD_HEAD_DIM; d += blockDim.x) {
        float v = 0.0f;
        for (int c = 0; c < chunks; c++) {
            const float* part = base + c * PARTIAL_WIDTH;
            if (part[0] != FD_NEG_INF) v += part[2 + d] * expf(part[0] - m_all);
        }
        oh[d] = v / l_all;
    }
}
