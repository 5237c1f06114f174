// Multi-head latent attention (DeepSeek-V2/V3) on a paged latent cache: the CUDA twin of
// `kernels::cpu::mla_attention`. Legend as there: L latent rank (`kv_lora`), N per-head no-rope
// dim, P rope dim, V per-head value dim, W = L + P the cached row.
//
// A layer's cache is one pool `[blocks, block_size, W]` f32 (one "kv head" of W values): token
// r's sequence has its block table at `tables + table_offsets[r]`, and position p lives at slot
// `blocks[p / block_size] * block_size + p % block_size`. A row is [latent | rope(k_rope)].
// Attention runs with the projections absorbed, as on the CPU: per head,
// q_lat = B_k(h)^T q_nope, score_s = scale * (q_lat . c_s + rope(q_rope) . k_rope_s), and
// out_h = B_v(h) @ (sum_s p_s c_s) / sum_s p_s, with B_k(h), B_v(h) head h's rows of kv_b
// (`[H*(N+V), L]`: N key rows then V value rows per head).
//
// Limits of `mla_attention_*` (its shared arrays, and a lane's share of a row: 4 rope values and
// up to 8 x 4 latent values): L <= FD_MLA_MAX_LORA, P <= FD_MLA_MAX_ROPE, N <= FD_MLA_MAX_HEAD;
// V has no limit of its own here (the runtime's MLA_MAX_HEAD bounds it too); P is even (the CPU
// kernel's check). Nothing is checked on the device: the runtime refuses wider layers before
// launching (MLA_MAX_* in kernels/src/cuda.rs).
//
// Measured on an H100 at DeepSeek-V3's shapes (128 heads, N 128, P 64, V 128, L 512, bf16 kv_b),
// one token: 19 us at position 0, 132 us at 1,024, 481 us at 4,096. Every head's block reads the
// whole cache (from L2), which is what a grid of (heads, tokens) costs.
#define FD_MLA_MAX_LORA 1024
#define FD_MLA_MAX_ROPE 128
#define FD_MLA_MAX_HEAD 256
#define FD_MLA_WARPS 4

// Where the cache row of position p of a sequence with block table `blocks` starts, in floats
// (`fd_cache_row` of attention.cu with one head of `width` values).
__device__ __forceinline__ long long fd_mla_row(const unsigned int* blocks, int block_size, int p,
                                                int width) {
    const long long slot = (long long)blocks[p / block_size] * block_size + p % block_size;
    return slot * width;
}

// RoPE pair i of P values (`RopeTables::rotate`): (2i, 2i + 1) when interleaved, else
// (i, i + P/2).
__device__ __forceinline__ void fd_mla_pair(int i, int rope_dim, int interleaved, int& a, int& b) {
    a = interleaved ? 2 * i : i;
    b = interleaved ? 2 * i + 1 : i + rope_dim / 2;
}

// The rotated pair (xa, xb) by the angle (c, s), rounded as the CPU rounds it: the explicit
// roundings keep the compiler from fusing a product into the subtraction, so the cache rows and
// rotated queries are bit for bit the CPU kernel's.
__device__ __forceinline__ void fd_mla_rotate(float xa, float xb, float c, float s, float& ya,
                                              float& yb) {
    ya = __fsub_rn(__fmul_rn(xa, c), __fmul_rn(xb, s));
    yb = __fadd_rn(__fmul_rn(xb, c), __fmul_rn(xa, s));
}

// Writes token r's cache row at its position: [latent row | k_rope row rotated at the
// position]. Grid: (T); block: any multiple of 32 (256).
extern "C" __global__ void mla_append_f32(const float* latent, int latent_stride,
                                          const float* k_rope, int k_rope_stride,
                                          const unsigned int* positions,
                                          const unsigned int* tables,
                                          const unsigned int* table_offsets, int block_size,
                                          int kv_lora, int rope_dim, const float* cos_table,
                                          const float* sin_table, int table_stride,
                                          int interleaved, float* cache) {
    fd_grid_start();
    fd_grid_wait();
    const int r = blockIdx.x, pos = positions[r];
    float* row = cache + fd_mla_row(tables + table_offsets[r], block_size, pos, kv_lora + rope_dim);
    const float* lr = latent + (long long)r * latent_stride;
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) row[i] = lr[i];
    const float* kr = k_rope + (long long)r * k_rope_stride;
    const long long p = (long long)pos * table_stride;
    for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) {
        int a, b;
        fd_mla_pair(i, rope_dim, interleaved, a, b);
        fd_mla_rotate(kr[a], kr[b], cos_table[p + i], sin_table[p + i], row[kv_lora + a],
                      row[kv_lora + b]);
    }
}

// Loads the 4 values at `p + e` (those at or past `limit` are 0), as one 16-byte load when `vec`:
// p + e 16-byte aligned and `limit` a multiple of 4, so that e < limit covers all four.
__device__ __forceinline__ void fd_mla_load4(const float* p, int e, int limit, bool vec,
                                             float out[4]) {
    if (vec) {
        if (e < limit) {
            const float4 v = *reinterpret_cast<const float4*>(p + e);
            out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
        } else {
            out[0] = out[1] = out[2] = out[3] = 0.0f;
        }
    } else {
#pragma unroll
        for (int u = 0; u < 4; u++) out[u] = e + u < limit ? p[e + u] : 0.0f;
    }
}

// 4 consecutive weights widened to f32, in one 16-byte (f32) or 8-byte (bf16, f16) load: p
// aligned to 4 weights.
__device__ __forceinline__ void fd_mla_load_w4(const float* p, float out[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
__device__ __forceinline__ void fd_mla_load_w4(const fd_bf16* p, float out[4]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
}
__device__ __forceinline__ void fd_mla_load_w4(const fd_f16* p, float out[4]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const unsigned short h[4] = {(unsigned short)(v.x & 0xffffu), (unsigned short)(v.x >> 16),
                                 (unsigned short)(v.y & 0xffffu), (unsigned short)(v.y >> 16)};
#pragma unroll
    for (int u = 0; u < 4; u++) out[u] = fd_f16_f32(h[u]);
}

// One warp's share of the positions 0..len-1 (every FD_MLA_WARPS-th batch of BATCH) with an
// online softmax, its state left in `part_max`, `part_sum`, `part_acc` (L values). A lane holds
// the latent elements CHUNKS x (128 j + 4 lane + 0..3) and the rope elements 4 lane + 0..3, so
// that a warp reads a cache row 512 bytes at a time. CHUNKS >= L / 128 and BATCH, the
// positions whose rows a warp loads before using any (bytes in flight against the cache's
// latency), are compile-time, so the rows stay in registers.
template <int CHUNKS, int BATCH>
__device__ __forceinline__ void fd_mla_scan(const float* cache, const unsigned int* blocks,
                                            int block_size, int len, int kv_lora, int rope_dim,
                                            float scale, const float* q_lat, const float* q_rope,
                                            float* part_max, float* part_sum, float* part_acc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, width = kv_lora + rope_dim;
    const bool vec = ((unsigned long long)cache % 16 == 0) && kv_lora % 4 == 0 &&
                     rope_dim % 4 == 0;
    float ql[CHUNKS][4], qr[4], acc[CHUNKS][4];
#pragma unroll
    for (int j = 0; j < CHUNKS; j++) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int e = 128 * j + 4 * lane + u;
            ql[j][u] = e < kv_lora ? q_lat[e] : 0.0f;
            acc[j][u] = 0.0f;
        }
    }
#pragma unroll
    for (int u = 0; u < 4; u++) qr[u] = 4 * lane + u < rope_dim ? q_rope[4 * lane + u] : 0.0f;
    float m = FD_NEG_INF, l = 0.0f;
    for (int s0 = warp * BATCH; s0 < len; s0 += FD_MLA_WARPS * BATCH) {
        float row[BATCH][CHUNKS][4], rope[BATCH][4];
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            if (s0 + b < len) {
                const float* at = cache + fd_mla_row(blocks, block_size, s0 + b, width);
#pragma unroll
                for (int j = 0; j < CHUNKS; j++) {
                    fd_mla_load4(at, 128 * j + 4 * lane, kv_lora, vec, row[b][j]);
                }
                fd_mla_load4(at + kv_lora, 4 * lane, rope_dim, vec, rope[b]);
            } else {
#pragma unroll
                for (int j = 0; j < CHUNKS; j++) {
#pragma unroll
                    for (int u = 0; u < 4; u++) row[b][j][u] = 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 4; u++) rope[b][u] = 0.0f;
            }
        }
        float score[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < CHUNKS; j++) {
#pragma unroll
                for (int u = 0; u < 4; u++) dot += ql[j][u] * row[b][j][u];
            }
#pragma unroll
            for (int u = 0; u < 4; u++) dot += qr[u] * rope[b][u];
            score[b] = dot;
        }
        float m_new = m;
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            score[b] = s0 + b < len ? fd_warp_sum(score[b]) * scale : FD_NEG_INF;
            m_new = fmaxf(m_new, score[b]);
        }
        // A position past the end, or a score of -inf, weighs 0 (and -inf - -inf is no NaN).
        const float correction = m == FD_NEG_INF ? 0.0f : expf(m - m_new);
        float p[BATCH];
        l *= correction;
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            p[b] = score[b] == FD_NEG_INF ? 0.0f : expf(score[b] - m_new);
            l += p[b];
        }
#pragma unroll
        for (int j = 0; j < CHUNKS; j++) {
#pragma unroll
            for (int u = 0; u < 4; u++) {
                float a = acc[j][u] * correction;
#pragma unroll
                for (int b = 0; b < BATCH; b++) a += p[b] * row[b][j][u];
                acc[j][u] = a;
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        part_max[warp] = m;
        part_sum[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < CHUNKS; j++) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int e = 128 * j + 4 * lane + u;
            if (e < kv_lora) part_acc[warp * FD_MLA_MAX_LORA + e] = acc[j][u];
        }
    }
}

// Value rows a warp projects at once, so that their weight loads are in flight together: one row
// at a time left the projection latency-bound (measured on an H100 at DeepSeek-V3's shapes, 128
// heads, bf16, one token: the kernel's cost before any position from 40 to 19 us).
#define FD_MLA_V_ROWS 8

// out[r] = o . w[row0 + r, :] over k columns for r < FD_MLA_V_ROWS (rows at or past `rows` give
// 0), in every lane of the calling warp. o is 16-byte aligned (shared memory); the weights are
// read 16 bytes at a time (`fd_load_stream`, matmul.cu) when k is a multiple of the weights in 16
// bytes, else one by one.
template <typename W>
__device__ __forceinline__ void fd_mla_rows(const float* o, const W* w, int k, int row0, int rows,
                                            float out[FD_MLA_V_ROWS]) {
    constexpr int E = Packed<W>::N, R = FD_MLA_V_ROWS;
    const int lane = threadIdx.x & 31;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    const int vector_k = k % E == 0 ? k : 0;
    for (int base = lane * E; base < vector_k; base += 32 * E * 2) {
        uint4 wv[R][2];
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int i = base + u * 32 * E;
                wv[r][u] = i < vector_k && row0 + r < rows
                               ? fd_load_stream(w + (long long)(row0 + r) * k + i)
                               : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int i = base + u * 32 * E;
            if (i >= vector_k) continue;
            float ov[E];
#pragma unroll
            for (int j = 0; j < E; j += 4) {
                const float4 a = *reinterpret_cast<const float4*>(o + i + j);
                ov[j] = a.x; ov[j + 1] = a.y; ov[j + 2] = a.z; ov[j + 3] = a.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wf[E];
                Packed<W>::unpack(wv[r][u], wf);
#pragma unroll
                for (int j = 0; j < E; j++) acc[r] += wf[j] * ov[j];
            }
        }
    }
    for (int i = vector_k + lane; i < k; i += 32) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (row0 + r < rows) acc[r] += fd_load(w + (long long)(row0 + r) * k + i) * o[i];
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = fd_warp_sum(acc[r]);
}

// Token blockIdx.y, head blockIdx.x: `attend_token` of kernels/src/cpu/mla.rs for one head.
// q is [T, H*(N+P)] (per head N no-rope then P rope values, the rope part unrotated), out
// [T, H*V]. Grid: (H, T); block: 32 * FD_MLA_WARPS.
template <typename W>
__device__ void fd_mla_attention(const float* q, int q_stride, const unsigned int* positions,
                                 const unsigned int* tables, const unsigned int* table_offsets,
                                 int block_size, int n_heads, int nope_dim, int rope_dim,
                                 int v_dim, int kv_lora, float scale, int interleaved,
                                 const float* cos_table, const float* sin_table, int table_stride,
                                 const W* kv_b, const float* cache, float* out, int out_stride) {
    __shared__ float q_nope[FD_MLA_MAX_HEAD];
    __shared__ float q_rope[FD_MLA_MAX_ROPE];
    __shared__ float q_lat[FD_MLA_MAX_LORA];
    __shared__ float part_max[FD_MLA_WARPS], part_sum[FD_MLA_WARPS];
    __shared__ float part_acc[FD_MLA_WARPS * FD_MLA_MAX_LORA];
    // Read by `fd_mla_rows` 16 bytes at a time.
    __shared__ __align__(16) float o_lat[FD_MLA_MAX_LORA];
    const int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int pos = positions[r];
    const float* qh = q + (long long)r * q_stride + h * (nope_dim + rope_dim);
    for (int i = tid; i < nope_dim; i += blockDim.x) q_nope[i] = qh[i];
    const long long table_row = (long long)pos * table_stride;
    for (int i = tid; i < rope_dim / 2; i += blockDim.x) {
        int a, b;
        fd_mla_pair(i, rope_dim, interleaved, a, b);
        fd_mla_rotate(qh[nope_dim + a], qh[nope_dim + b], cos_table[table_row + i],
                      sin_table[table_row + i], q_rope[a], q_rope[b]);
    }
    __syncthreads();

    // q_lat[c] = sum over n in order of B_k(h)[n, c] * q_nope[n], rounded step by step as the
    // CPU's loop (so q_lat is bit for bit the CPU's). A thread takes 4 consecutive columns, read
    // in one load when the rows allow, and a warp 128 columns of a row, coalesced; the loads of
    // the next rows are independent of the sums, so many are in flight.
    const int key_rows = h * (nope_dim + v_dim);
    const W* bk = kv_b + (long long)key_rows * kv_lora;
    const bool w_vec = kv_lora % 4 == 0 && (unsigned long long)kv_b % (4 * sizeof(W)) == 0;
    for (int c0 = 4 * tid; c0 < kv_lora; c0 += 4 * blockDim.x) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 16
        for (int n = 0; n < nope_dim; n++) {
            const W* wr = bk + (long long)n * kv_lora + c0;
            float wv[4];
            if (w_vec) {
                fd_mla_load_w4(wr, wv);
            } else {
#pragma unroll
                for (int u = 0; u < 4; u++) wv[u] = c0 + u < kv_lora ? fd_load(wr + u) : 0.0f;
            }
            const float qn = q_nope[n];
#pragma unroll
            for (int u = 0; u < 4; u++) acc[u] = __fadd_rn(acc[u], __fmul_rn(wv[u], qn));
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (c0 + u < kv_lora) q_lat[c0 + u] = acc[u];
        }
    }
    __syncthreads();

    const unsigned int* blocks = tables + table_offsets[r];
    // 4 rows in flight per warp where a row fits 16 registers a lane (L <= 512, DeepSeek's), 2
    // for wider latents (the registers of 4 would cut the blocks an SM holds).
    if (kv_lora <= 512) {
        fd_mla_scan<4, 4>(cache, blocks, block_size, pos + 1, kv_lora, rope_dim, scale, q_lat,
                          q_rope, part_max, part_sum, part_acc);
    } else {
        fd_mla_scan<FD_MLA_MAX_LORA / 128, 2>(cache, blocks, block_size, pos + 1, kv_lora,
                                              rope_dim, scale, q_lat, q_rope, part_max, part_sum,
                                              part_acc);
    }
    __syncthreads();

    // The warps merged: each weighted by exp(its max - the overall max); a warp that saw no
    // position (m = -inf) adds nothing.
    float m_all = FD_NEG_INF;
    for (int w = 0; w < FD_MLA_WARPS; w++) m_all = fmaxf(m_all, part_max[w]);
    float factor[FD_MLA_WARPS], l_all = 0.0f;
#pragma unroll
    for (int w = 0; w < FD_MLA_WARPS; w++) {
        factor[w] = part_max[w] == FD_NEG_INF ? 0.0f : expf(part_max[w] - m_all);
        l_all += part_sum[w] * factor[w];
    }
    for (int c = tid; c < kv_lora; c += blockDim.x) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < FD_MLA_WARPS; w++) v += part_acc[w * FD_MLA_MAX_LORA + c] * factor[w];
        o_lat[c] = v;
    }
    __syncthreads();

    // out_h[v] = B_v(h)[v, :] . o_lat / sum: FD_MLA_V_ROWS value rows per warp at a time.
    const int value_rows = key_rows + nope_dim;
    float* oh = out + (long long)r * out_stride + h * v_dim;
    for (int v0 = warp * FD_MLA_V_ROWS; v0 < v_dim; v0 += FD_MLA_WARPS * FD_MLA_V_ROWS) {
        float dot[FD_MLA_V_ROWS];
        fd_mla_rows(o_lat, kv_b, kv_lora, value_rows + v0, value_rows + v_dim, dot);
#pragma unroll
        for (int i = 0; i < FD_MLA_V_ROWS; i++) {
            if (lane == 0 && v0 + i < v_dim) oh[v0 + i] = dot[i] / l_all;
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * FD_MLA_WARPS)
mla_attention_f32(const float* q, int q_stride, const unsigned int* positions,
                  const unsigned int* tables, const unsigned int* table_offsets, int block_size,
                  int n_heads, int nope_dim, int rope_dim, int v_dim, int kv_lora, float scale,
                  int interleaved, const float* cos_table, const float* sin_table,
                  int table_stride, const float* kv_b, const float* cache, float* out,
                  int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_mla_attention(q, q_stride, positions, tables, table_offsets, block_size, n_heads, nope_dim,
                     rope_dim, v_dim, kv_lora, scale, interleaved, cos_table, sin_table,
                     table_stride, kv_b, cache, out, out_stride);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MLA_WARPS)
mla_attention_bf16(const float* q, int q_stride, const unsigned int* positions,
                   const unsigned int* tables, const unsigned int* table_offsets, int block_size,
                   int n_heads, int nope_dim, int rope_dim, int v_dim, int kv_lora, float scale,
                   int interleaved, const float* cos_table, const float* sin_table,
                   int table_stride, const fd_bf16* kv_b, const float* cache, float* out,
                   int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_mla_attention(q, q_stride, positions, tables, table_offsets, block_size, n_heads, nope_dim,
                     rope_dim, v_dim, kv_lora, scale, interleaved, cos_table, sin_table,
                     table_stride, kv_b, cache, out, out_stride);
}
extern "C" __global__ void __launch_bounds__(32 * FD_MLA_WARPS)
mla_attention_f16(const float* q, int q_stride, const unsigned int* positions,
                  const unsigned int* tables, const unsigned int* table_offsets, int block_size,
                  int n_heads, int nope_dim, int rope_dim, int v_dim, int kv_lora, float scale,
                  int interleaved, const float* cos_table, const float* sin_table,
                  int table_stride, const fd_f16* kv_b, const float* cache, float* out,
                  int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    fd_mla_attention(q, q_stride, positions, tables, table_offsets, block_size, n_heads, nope_dim,
                     rope_dim, v_dim, kv_lora, scale, interleaved, cos_table, sin_table,
                     table_stride, kv_b, cache, out, out_stride);
}
