// Causal GQA attention over a paged KV cache: the CUDA twin of `kernels::cpu::attention`, for
// any number of sequences per launch. A layer's cache is `[blocks, block_size, KV, FD_HEAD_DIM]`
// f32 for K and for V; token r's sequence has its block table at `tables + table_offsets[r]`,
// and position p of that sequence lives in block `blocks[p / block_size]` at row
// `p % block_size`. Each token carries its own position and table, so a pass mixes sequences
// freely (decode tokens and prompt chunks). FD_HEAD_DIM (at most 256) is the plan's, defined
// when the module is built; the block size is the runtime's choice.

#define ATTENTION_WARPS 4

__device__ __forceinline__ long long fd_cache_row(const unsigned int* blocks, int block_size,
                                                  int pos, int kv_heads, int g) {
    const long long slot = (long long)blocks[pos / block_size] * block_size + pos % block_size;
    return (slot * kv_heads + g) * FD_HEAD_DIM;
}

// Element d of a head row rotated by RoPE (rotate-half: pairs (d, d + D/2)) at table row `p` of
// `cos_table`/`sin_table` (`table_stride` values per position), as `rope_f32` computes it; the
// row unchanged when the tables are null (a plan whose graph rotates in its own rope ops).
__device__ __forceinline__ float fd_rope_at(const float* head, int d, const float* cos_table,
                                            const float* sin_table, long long p) {
    if (!cos_table) return head[d];
    const int half = FD_HEAD_DIM / 2;
    const int i = d < half ? d : d - half;
    const float c = cos_table[p + i], s = sin_table[p + i];
    return d < half ? head[d] * c - head[d + half] * s : head[d] * c + head[d - half] * s;
}

// Writes one token's K row (kv head g, rotated by RoPE when the tables are given) and V row at
// position `pos` of its sequence's cache, element d0, d0 + step, ...
__device__ __forceinline__ void fd_write_kv_row(const unsigned int* blocks, int block_size,
                                                int pos, int kv_heads, int g, const float* kh,
                                                const float* vh, const float* cos_table,
                                                const float* sin_table, int table_stride,
                                                float* k_cache, float* v_cache, int d0,
                                                int step) {
    const long long at = fd_cache_row(blocks, block_size, pos, kv_heads, g);
    const long long p = (long long)pos * table_stride;
    for (int d = d0; d < FD_HEAD_DIM; d += step) {
        k_cache[at + d] = fd_rope_at(kh, d, cos_table, sin_table, p);
        v_cache[at + d] = vh[d];
    }
}

// Writes the T new tokens' K and V rows at their positions, K rotated by RoPE first when the
// tables are given (RoPE fused with the cache write). Grid: (KV, T); block: FD_HEAD_DIM.
extern "C" __global__ void kv_append_f32(const float* k, int k_stride, const float* v,
                                         int v_stride, const unsigned int* positions,
                                         const unsigned int* tables,
                                         const unsigned int* table_offsets, int block_size,
                                         int kv_heads,
                                         const float* cos_table, const float* sin_table,
                                         int table_stride, float* k_cache, float* v_cache) {
    fd_grid_start();
    fd_grid_wait();
    const int g = blockIdx.x, r = blockIdx.y;
    fd_write_kv_row(tables + table_offsets[r], block_size, positions[r], kv_heads, g,
                    k + (long long)r * k_stride + g * FD_HEAD_DIM,
                    v + (long long)r * v_stride + g * FD_HEAD_DIM, cos_table, sin_table,
                    table_stride, k_cache, v_cache, threadIdx.x, blockDim.x);
}

// Attention is split over the sequence (the flash-decoding layout) so that a decode step, one
// query per head, still spreads over every SM: `attention_partial_f32` attends each query to one
// chunk of positions per block and writes the chunk's partial result, and `attention_merge_f32`
// merges a query's chunks. A partial is `[m, l, acc[FD_HEAD_DIM]]`: the chunk's largest score,
// its sum of exp(score - m), and its exp-weighted sum of values.
//
// The chunks are sized on the device from the query's position: `gridDim.z` chunks of
// max(min_chunk, ceil(len / gridDim.z)) positions, so a graph captured once keeps every block
// busy as the context grows.
#define PARTIAL_WIDTH (FD_HEAD_DIM + 2)
// Lanes that share one key: KEY_LANES lanes hold KEY_DIMS consecutive head elements each, so a
// warp has 32 / KEY_LANES keys in flight at once, their K and V rows loaded before either is used.
#define KEY_LANES 8
#define KEY_GROUPS (32 / KEY_LANES)
#define KEY_DIMS ((FD_HEAD_DIM + KEY_LANES - 1) / KEY_LANES)

// Loads a lane's KEY_DIMS elements of a cache row (zeros past the head), 16 bytes at a time when
// the split allows (cache rows start at multiples of FD_HEAD_DIM floats of their own allocation).
__device__ __forceinline__ void fd_load_key_dims(const float* row, int first, float out[KEY_DIMS]) {
    if (KEY_DIMS % 4 == 0 && FD_HEAD_DIM % KEY_LANES == 0) {
#pragma unroll
        for (int j = 0; j < KEY_DIMS; j += 4) {
            const float4 v = *reinterpret_cast<const float4*>(row + first + j);
            out[j] = v.x; out[j + 1] = v.y; out[j + 2] = v.z; out[j + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < KEY_DIMS; j++) out[j] = first + j < FD_HEAD_DIM ? row[first + j] : 0.0f;
    }
}

// Folds the online-softmax state (m2, l2, acc2) into (m, l, acc); a state that saw no key has
// m = -inf and adds nothing.
__device__ __forceinline__ void fd_softmax_merge(float& m, float& l, float acc[KEY_DIMS], float m2,
                                                 float l2, const float acc2[KEY_DIMS]) {
    const float m_new = fmaxf(m, m2);
    const float a = m == FD_NEG_INF ? 0.0f : expf(m - m_new);
    const float b = m2 == FD_NEG_INF ? 0.0f : expf(m2 - m_new);
    l = l * a + l2 * b;
#pragma unroll
    for (int j = 0; j < KEY_DIMS; j++) acc[j] = acc[j] * a + acc2[j] * b;
    m = m_new;
}

// Attends query r of head h to positions [begin, end) of its sequence and leaves the block's
// merged state `[m, l, acc[FD_HEAD_DIM]]` in `state` (global or shared memory). With the RoPE
// tables given, q arrives unrotated (as kv_append_f32's K does). With `new_k` given, the query's
// own position is read from the pass's K and V rows (`new_k`, `new_v`: that token's kv head g,
// K unrotated) instead of the cache, for the fused decode kernel below, whose append the cache
// may not hold yet. Every thread of the block calls it (it synchronizes the block).
//
// Each group of KEY_LANES lanes takes every (ATTENTION_WARPS * KEY_GROUPS)-th key of the range
// with an online softmax; the groups, then the warps, are merged into the state.
__device__ __forceinline__ void fd_attend_range(const float* q, int q_stride,
                                                const unsigned int* positions,
                                                const unsigned int* blocks, int block_size,
                                                int n_heads, int kv_heads, float scale,
                                                const float* k_cache, const float* v_cache,
                                                const float* cos_table, const float* sin_table,
                                                int table_stride, int h, int r, int begin,
                                                int end, const float* new_k, const float* new_v,
                                                float* state) {
    __shared__ float part_max[ATTENTION_WARPS], part_sum[ATTENTION_WARPS];
    __shared__ float part_acc[ATTENTION_WARPS][KEY_LANES * KEY_DIMS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = lane / KEY_LANES, first = (lane % KEY_LANES) * KEY_DIMS;
    const int g = h / (n_heads / kv_heads);
    const int own = positions[r];
    // The query row may sit anywhere in the activations: read element by element, once, and
    // rotated here when RoPE is fused into attention.
    const float* qh = q + (long long)r * q_stride + h * FD_HEAD_DIM;
    const long long table_row = (long long)own * table_stride;
    float qv[KEY_DIMS], acc[KEY_DIMS];
#pragma unroll
    for (int j = 0; j < KEY_DIMS; j++) {
        qv[j] = first + j < FD_HEAD_DIM
                    ? fd_rope_at(qh, first + j, cos_table, sin_table, table_row)
                    : 0.0f;
        acc[j] = 0.0f;
    }
    float m = FD_NEG_INF, l = 0.0f;
    const int stride = ATTENTION_WARPS * KEY_GROUPS;
    // Every lane of a group runs the same iterations (the shuffles below need the whole warp);
    // a group past the range's end computes nothing it keeps.
    for (int p0 = begin + warp * KEY_GROUPS; p0 < end; p0 += stride) {
        const int p = p0 + group;
        const bool live = p < end;
        float kv[KEY_DIMS], vv[KEY_DIMS];
        if (live && new_k && p == own) {
#pragma unroll
            for (int j = 0; j < KEY_DIMS; j++) {
                const bool in = first + j < FD_HEAD_DIM;
                kv[j] = in ? fd_rope_at(new_k, first + j, cos_table, sin_table, table_row) : 0.0f;
                vv[j] = in ? new_v[first + j] : 0.0f;
            }
        } else if (live) {
            const long long at = fd_cache_row(blocks, block_size, p, kv_heads, g);
            fd_load_key_dims(k_cache + at, first, kv);
            fd_load_key_dims(v_cache + at, first, vv);
        }
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < KEY_DIMS; j++) dot += live ? qv[j] * kv[j] : 0.0f;
#pragma unroll
        for (int offset = KEY_LANES / 2; offset > 0; offset >>= 1) {
            dot += fd_shfl_xor(dot, offset);
        }
        if (live) {
            const float s = dot * scale;
            const float m_new = fmaxf(m, s);
            const float correction = expf(m - m_new), e = expf(s - m_new);
            l = l * correction + e;
#pragma unroll
            for (int j = 0; j < KEY_DIMS; j++) acc[j] = acc[j] * correction + e * vv[j];
            m = m_new;
        }
    }
    // The groups of the warp merged: after the exchanges every group holds the warp's state.
#pragma unroll
    for (int offset = KEY_LANES; offset < 32; offset <<= 1) {
        const float m2 = fd_shfl_xor(m, offset);
        const float l2 = fd_shfl_xor(l, offset);
        float acc2[KEY_DIMS];
#pragma unroll
        for (int j = 0; j < KEY_DIMS; j++) acc2[j] = fd_shfl_xor(acc[j], offset);
        fd_softmax_merge(m, l, acc, m2, l2, acc2);
    }
    if (lane == 0) {
        part_max[warp] = m;
        part_sum[warp] = l;
    }
    if (group == 0) {
#pragma unroll
        for (int j = 0; j < KEY_DIMS; j++) part_acc[warp][first + j] = acc[j];
    }
    __syncthreads();
    float m_all = FD_NEG_INF;
    for (int w = 0; w < ATTENTION_WARPS; w++) m_all = fmaxf(m_all, part_max[w]);
    // A warp that saw no key (a range shorter than the warps) holds m = -inf and adds nothing.
    float l_all = 0.0f;
    for (int w = 0; w < ATTENTION_WARPS; w++) {
        if (part_max[w] != FD_NEG_INF) l_all += part_sum[w] * expf(part_max[w] - m_all);
    }
    for (int d = threadIdx.x; d < FD_HEAD_DIM; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTENTION_WARPS; w++) {
            if (part_max[w] != FD_NEG_INF) v += part_acc[w][d] * expf(part_max[w] - m_all);
        }
        state[2 + d] = v;
    }
    if (threadIdx.x == 0) {
        state[0] = m_all;
        state[1] = l_all;
    }
}

// Grid: (H, T, chunks); block: 32 * ATTENTION_WARPS. partial: [T, H, chunks, PARTIAL_WIDTH].
// Chunks past the query's position write an empty partial.
extern "C" __global__ void attention_partial_f32(const float* q, int q_stride,
                                                 const unsigned int* positions,
                                                 const unsigned int* tables,
                                                 const unsigned int* table_offsets, int block_size,
                                                 int n_heads, int kv_heads, float scale,
                                                 const float* k_cache, const float* v_cache,
                                                 const float* cos_table, const float* sin_table,
                                                 int table_stride, int min_chunk,
                                                 float* partial) {
    fd_grid_start();
    fd_grid_wait();
    const int h = blockIdx.x, r = blockIdx.y, c = blockIdx.z, chunks = gridDim.z;
    const int len = positions[r] + 1;
    const int chunk = max(min_chunk, (len + chunks - 1) / chunks);
    const int begin = c * chunk, end = min(begin + chunk, len);
    float* out = partial + (((long long)r * n_heads + h) * chunks + c) * PARTIAL_WIDTH;
    if (begin >= len) {
        if (threadIdx.x == 0) {
            out[0] = FD_NEG_INF;
            out[1] = 0.0f;
        }
        return;
    }
    fd_attend_range(q, q_stride, positions, tables + table_offsets[r], block_size, n_heads,
                    kv_heads, scale, k_cache, v_cache, cos_table, sin_table, table_stride, h, r,
                    begin, end, nullptr, nullptr, out);
}

// Query r's output for head h from `parts` states `[m, l, acc]` (`state(c)` reads value i of
// state c), each weighted by exp(m_c - max m); empty states (m = -inf) add nothing.
template <typename State>
__device__ __forceinline__ void fd_merge_states(int parts, State state, float* oh) {
    float m_all = FD_NEG_INF;
    for (int c = 0; c < parts; c++) m_all = fmaxf(m_all, state(c, 0));
    float l_all = 0.0f;
    for (int c = 0; c < parts; c++) {
        const float m = state(c, 0);
        if (m != FD_NEG_INF) l_all += state(c, 1) * expf(m - m_all);
    }
    for (int d = threadIdx.x; d < FD_HEAD_DIM; d += blockDim.x) {
        float v = 0.0f;
        for (int c = 0; c < parts; c++) {
            const float m = state(c, 0);
            if (m != FD_NEG_INF) v += state(c, 2 + d) * expf(m - m_all);
        }
        oh[d] = v / l_all;
    }
}

// out[r, h*D..] = the merge of query r's chunk partials for head h, each weighted by
// exp(m_c - max m); empty chunks (m = -inf) add nothing. Grid: (H, T); block: any multiple of 32.
extern "C" __global__ void attention_merge_f32(const float* partial, int n_heads, int chunks,
                                               float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    const int h = blockIdx.x, r = blockIdx.y;
    const float* base = partial + ((long long)r * n_heads + h) * chunks * PARTIAL_WIDTH;
    fd_merge_states(
        chunks, [&](int c, int i) { return base[c * PARTIAL_WIDTH + i]; },
        out + (long long)r * out_stride + h * FD_HEAD_DIM);
}

#ifndef FD_HIP
// Decode attention in one launch (sm90), for passes in which every token is its sequence's
// only one: the KV append, the split attention and the merge of its chunks, which otherwise
// take three dependent launches per layer. The grid is (H, T, chunks), launched in clusters of
// (1, 1, chunks): a query's chunks share a cluster, each block leaves its chunk's state in its
// shared memory, and the cluster's first block merges them through distributed shared memory
// after a cluster barrier, so no partials go through global memory and no merge is launched.
// The block whose chunk holds a token's position, for the first query head of each kv head,
// writes the token's K (rotated) and V into the cache; every block reads that position from
// the pass's K and V rows instead, so no block waits for the write. (A pass with two tokens of
// one sequence would need the other token's write: those take the three kernels.)
extern "C" __global__ void attention_decode_f32(const float* q, int q_stride,
                                                const unsigned int* positions,
                                                const unsigned int* tables,
                                                const unsigned int* table_offsets,
                                                int block_size, int n_heads, int kv_heads,
                                                float scale, float* k_cache, float* v_cache,
                                                const float* cos_table, const float* sin_table,
                                                int table_stride, int min_chunk, const float* k,
                                                int k_stride, const float* v, int v_stride,
                                                float* out, int out_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Launched without its cluster, each block would merge its own chunk alone: refuse loudly.
    if (fd_cluster_size() != gridDim.z) __trap();
    fd_grid_start();
    fd_grid_wait();
    __shared__ float state[PARTIAL_WIDTH];
    const int h = blockIdx.x, r = blockIdx.y, c = blockIdx.z, chunks = gridDim.z;
    const int group_heads = n_heads / kv_heads, g = h / group_heads;
    const int own = positions[r], len = own + 1;
    const int chunk = max(min_chunk, (len + chunks - 1) / chunks);
    const int begin = c * chunk, end = min(begin + chunk, len);
    const unsigned int* blocks = tables + table_offsets[r];
    const float* new_k = k + (long long)r * k_stride + g * FD_HEAD_DIM;
    const float* new_v = v + (long long)r * v_stride + g * FD_HEAD_DIM;
    if (h % group_heads == 0 && begin <= own && own < end) {
        fd_write_kv_row(blocks, block_size, own, kv_heads, g, new_k, new_v, cos_table, sin_table,
                        table_stride, k_cache, v_cache, threadIdx.x, blockDim.x);
    }
    if (begin < len) {
        fd_attend_range(q, q_stride, positions, blocks, block_size, n_heads, kv_heads, scale,
                        k_cache, v_cache, cos_table, sin_table, table_stride, h, r, begin, end,
                        new_k, new_v, state);
    } else if (threadIdx.x == 0) {
        state[0] = FD_NEG_INF;
        state[1] = 0.0f;
    }
    fd_cluster_sync();  // every chunk's state written and visible to the cluster
    if (fd_cluster_rank() == 0) {
        const unsigned int local = fd_shared_address(state);
        fd_merge_states(
            (int)fd_cluster_size(),
            [&](int part, int i) { return fd_cluster_load(local + 4 * i, part); },
            out + (long long)r * out_stride + h * FD_HEAD_DIM);
    }
    fd_cluster_sync();  // no block leaves (freeing its shared memory) before the merge read it
#endif
}
#endif  // FD_HIP

// Prefill attention: a block takes a tile of query rows (up to PREFILL_QUERY_ROWS: the query
// heads of one kv head for consecutive tokens of one sequence) and walks their keys in tiles of
// PREFILL_KEYS held in shared memory, so each key and value is read once per tile of queries,
// where the split kernel above reads them once per query (at 2,048 tokens that was 67 GB of
// cache traffic per layer, most of a prefill pass). Each query row is PREFILL_LANES threads:
// a thread scores PREFILL_KEYS / PREFILL_LANES keys of each tile and accumulates every
// PREFILL_LANES-th dimension of the row's output, with an online softmax per row.
//
// tiles: pairs (first row, rows) of the pass, each inside one sequence, at most
// PREFILL_QUERY_ROWS / (n_heads / kv_heads) rows (the host builds them). q arrives unrotated
// when the RoPE tables are given. Grid: (tiles, kv_heads); block: PREFILL_QUERY_ROWS *
// PREFILL_LANES threads.
#define PREFILL_QUERY_ROWS 16
#define PREFILL_LANES 8
#define PREFILL_KEYS (FD_HEAD_DIM <= 128 ? 32 : 8)
#define PREFILL_KEYS_PER_LANE (PREFILL_KEYS / PREFILL_LANES)
#define PREFILL_DIMS_PER_LANE ((FD_HEAD_DIM + PREFILL_LANES - 1) / PREFILL_LANES)

extern "C" __global__ void __launch_bounds__(PREFILL_QUERY_ROWS * PREFILL_LANES)
attention_prefill_f32(const float* q, int q_stride, const unsigned int* positions,
                      const unsigned int* tables, const unsigned int* table_offsets,
                      int block_size, int n_heads, int kv_heads, float scale,
                      const float* k_cache, const float* v_cache, const float* cos_table,
                      const float* sin_table, int table_stride, const unsigned int* tiles,
                      float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    // Rows padded by one float: the lanes of a row read consecutive keys at the same
    // dimension, which would otherwise all hit one bank.
    __shared__ float qs[PREFILL_QUERY_ROWS][FD_HEAD_DIM + 1];
    __shared__ float ks[PREFILL_KEYS][FD_HEAD_DIM + 1];
    __shared__ float vs[PREFILL_KEYS][FD_HEAD_DIM];
    const int g = blockIdx.y, group = n_heads / kv_heads;
    const int row0 = tiles[2 * blockIdx.x], rows = tiles[2 * blockIdx.x + 1];
    const int t = threadIdx.x, qr = t / PREFILL_LANES, lane = t % PREFILL_LANES;
    // Query row qr: token row0 + qr / group, head g * group + qr % group.
    const bool active = qr / group < rows;
    const int r = row0 + (active ? qr / group : 0);
    const int h = g * group + qr % group;
    const int pos = positions[r];
    const int last = positions[row0 + rows - 1];
    const unsigned int* blocks = tables + table_offsets[row0];
    for (int i = t; i < PREFILL_QUERY_ROWS * FD_HEAD_DIM; i += blockDim.x) {
        const int row = i / FD_HEAD_DIM, d = i % FD_HEAD_DIM;
        float v = 0.0f;
        if (row / group < rows) {
            const int tr = row0 + row / group, head = g * group + row % group;
            const float* qh = q + (long long)tr * q_stride + head * FD_HEAD_DIM;
            v = fd_rope_at(qh, d, cos_table, sin_table, (long long)positions[tr] * table_stride) *
                scale;
        }
        qs[row][d] = v;
    }
    float m = FD_NEG_INF, l = 0.0f, acc[PREFILL_DIMS_PER_LANE];
#pragma unroll
    for (int i = 0; i < PREFILL_DIMS_PER_LANE; i++) acc[i] = 0.0f;
    const int base_lane = (t & 31) & ~(PREFILL_LANES - 1);
    for (int k0 = 0; k0 <= last; k0 += PREFILL_KEYS) {
        __syncthreads();  // the previous tile is consumed (and the queries are in)
        for (int i = t; i < PREFILL_KEYS * FD_HEAD_DIM; i += blockDim.x) {
            const int kk = i / FD_HEAD_DIM, d = i % FD_HEAD_DIM, p = k0 + kk;
            float kv = 0.0f, vv = 0.0f;
            if (p <= last) {
                const long long at = fd_cache_row(blocks, block_size, p, kv_heads, g);
                kv = k_cache[at + d];
                vv = v_cache[at + d];
            }
            ks[kk][d] = kv;
            vs[kk][d] = vv;
        }
        __syncthreads();
        float s[PREFILL_KEYS_PER_LANE];
#pragma unroll
        for (int j = 0; j < PREFILL_KEYS_PER_LANE; j++) s[j] = 0.0f;
        for (int d = 0; d < FD_HEAD_DIM; d++) {
            const float qv = qs[qr][d];
#pragma unroll
            for (int j = 0; j < PREFILL_KEYS_PER_LANE; j++) s[j] += qv * ks[lane + PREFILL_LANES * j][d];
        }
        // Causal: a row sees the keys up to its own position; masked scores are -inf.
        float tile_max = FD_NEG_INF;
#pragma unroll
        for (int j = 0; j < PREFILL_KEYS_PER_LANE; j++) {
            if (!active || k0 + lane + PREFILL_LANES * j > pos) s[j] = FD_NEG_INF;
            tile_max = fmaxf(tile_max, s[j]);
        }
#pragma unroll
        for (int o = PREFILL_LANES / 2; o > 0; o >>= 1) {
            tile_max = fmaxf(tile_max, fd_shfl_xor(tile_max, o));
        }
        // Every lane of the warp takes part in the shuffles below, rows that see no key yet
        // included (their weights are all zero).
        const float m_new = fmaxf(m, tile_max);
        const float correction = m == FD_NEG_INF ? 0.0f : expf(m - m_new);
        float p[PREFILL_KEYS_PER_LANE], p_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < PREFILL_KEYS_PER_LANE; j++) {
            p[j] = s[j] == FD_NEG_INF ? 0.0f : expf(s[j] - m_new);
            p_sum += p[j];
        }
#pragma unroll
        for (int o = PREFILL_LANES / 2; o > 0; o >>= 1) {
            p_sum += fd_shfl_xor(p_sum, o);
        }
        l = l * correction + p_sum;
#pragma unroll
        for (int i = 0; i < PREFILL_DIMS_PER_LANE; i++) acc[i] *= correction;
#pragma unroll
        for (int kk = 0; kk < PREFILL_KEYS; kk++) {
            const float pk = fd_shfl(p[kk / PREFILL_LANES],
                                         base_lane + kk % PREFILL_LANES);
#pragma unroll
            for (int i = 0; i < PREFILL_DIMS_PER_LANE; i++) {
                const int d = lane + PREFILL_LANES * i;
                if (d < FD_HEAD_DIM) acc[i] += pk * vs[kk][d];
            }
        }
        m = m_new;
    }
    if (!active) return;
    float* oh = out + (long long)r * out_stride + h * FD_HEAD_DIM;
#pragma unroll
    for (int i = 0; i < PREFILL_DIMS_PER_LANE; i++) {
        const int d = lane + PREFILL_LANES * i;
        if (d < FD_HEAD_DIM) oh[d] = acc[i] / l;
    }
}
