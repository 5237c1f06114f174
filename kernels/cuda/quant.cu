// Quantized weights (W8A16, W4A16, W2A16): the CUDA twins of the matmul and embedding of
// `kernels::cpu::quant`, reading the same layout, which the compiler writes once for both
// (panels of QPANEL = 8 rows; see that module's doc): codes panel after panel, for each k the 8
// rows' codes in 8 * BITS / 8 bytes, where bits [s*BITS, (s+1)*BITS) of byte j hold row
// s * BPK + j (BPK bytes per k); then f16 scales, for each panel and group of G k the 8 rows';
// then f16 minimums likewise when asymmetric. The value of a weight is `code * scale + min`
// (asymmetric) or `(code - 2^(BITS-1)) * scale` (symmetric), formed exactly in f32 as on the CPU.
//
// The matmul never forms dequantized weights. A block takes one panel; its warps split K; each
// lane takes QPIECES consecutive 16-byte pieces of codes (QPIECES * KL k, inside one group), sums
// code * x per row in f32, then folds the group in: `scale * sum(code * x) + min * sum(x)`.
// Measured on an H100 (docs/PERF.md): splitting K over the block's warps matters most (a panel
// per warp left too few warps for the narrow projections), two pieces per lane beat more, and 4
// warps per block beat 2, 8 and 16. It reaches 40 to 70% of the copy bandwidth, latency-bound.

#define QPANEL 8
#define QMATMUL_WARPS 4
#define QPIECES 2
#define QTOKENS 4

// A 16-byte piece of codes holds KL = 16 / BPK values of k.
template <int BITS> struct QLayout {
    static constexpr int C = 8 / BITS;          // codes per byte
    static constexpr int BPK = QPANEL / C;      // bytes per k
    static constexpr int KL = 16 / BPK;         // k per 16-byte piece
    static constexpr unsigned MASK = ((1u << BITS) - 1) * 0x01010101u;
};

// Byte `sel` of `w` placed in the mantissa of 2^23, minus 2^23: the byte's value as f32, in two
// instructions (a byte permute and an add) where an integer conversion would take a slow one.
__device__ __forceinline__ float fd_byte_f32(unsigned int w, int sel) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650 | sel)) - 8388608.0f;
}

// gs[m][r] += sum over the piece's KL k of code(k, r) * x[m][k].
template <int BITS, int TOKENS>
__device__ __forceinline__ void fd_qpiece(uint4 piece, const float (*xv)[16], int base_k,
                                          float (*gs)[QPANEL]) {
    using L = QLayout<BITS>;
    const unsigned int words[4] = {piece.x, piece.y, piece.z, piece.w};
    // The codes of slot s of every byte, each in its own byte.
    unsigned int slots[4][L::C];
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
#pragma unroll
        for (int s = 0; s < L::C; s++) slots[wi][s] = (words[wi] >> (s * BITS)) & L::MASK;
    }
#pragma unroll
    for (int kk = 0; kk < L::KL; kk++) {
#pragma unroll
        for (int r = 0; r < QPANEL; r++) {
            const int byte = kk * L::BPK + r % L::BPK, slot = r / L::BPK;
            const float code = fd_byte_f32(slots[byte / 4][slot], byte % 4);
#pragma unroll
            for (int m = 0; m < TOKENS; m++) gs[m][r] += code * xv[m][base_k + kk];
        }
    }
}

template <int BITS, int WARPS, int TOKENS, bool X_ALIGNED>
__device__ void qmatmul(const float* x, int x_stride, const unsigned char* codes, int k, int n,
                        int group, const fd_f16* scales, const fd_f16* mins, const float* bias,
                        int t0, int tokens, float* out, int out_stride) {
    using L = QLayout<BITS>;
    __shared__ float reduced[WARPS][QTOKENS][QPANEL];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int panel = blockIdx.x;
    const int groups = k / group;
    const unsigned char* pc = codes + (long long)panel * k * L::BPK;
    const fd_f16* ps = scales + (long long)panel * groups * QPANEL;
    const fd_f16* pm = mins ? mins + (long long)panel * groups * QPANEL : nullptr;
    const float offset = mins ? 0.0f : (float)(1 << (BITS - 1));
    float acc[TOKENS][QPANEL];
#pragma unroll
    for (int m = 0; m < TOKENS; m++)
#pragma unroll
        for (int r = 0; r < QPANEL; r++) acc[m][r] = 0.0f;
    const int pieces = k / L::KL;
    constexpr int LANE_K = QPIECES * L::KL;
    for (int base = warp * 32 * QPIECES; base < pieces; base += WARPS * 32 * QPIECES) {
        const int j0 = base + lane * QPIECES;
        uint4 c[QPIECES];
#pragma unroll
        for (int u = 0; u < QPIECES; u++) {
            c[u] = j0 + u < pieces ? fd_load_stream(pc + (long long)(j0 + u) * 16)
                                   : make_uint4(0, 0, 0, 0);
        }
        if (j0 >= pieces) continue;
        const int k0 = j0 * L::KL;
        float xv[TOKENS][16];
        float xs[TOKENS];
#pragma unroll
        for (int m = 0; m < TOKENS; m++) {
            xs[m] = 0.0f;
            if (m < tokens) {
                const float* xr = x + (long long)(t0 + m) * x_stride + k0;
#pragma unroll
                for (int i = 0; i < LANE_K; i += 4) {
                    if (X_ALIGNED && LANE_K % 4 == 0) {
                        const float4 a = *reinterpret_cast<const float4*>(xr + i);
                        xv[m][i] = a.x; xv[m][i + 1] = a.y; xv[m][i + 2] = a.z; xv[m][i + 3] = a.w;
                    } else {
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            if (i + j < LANE_K) xv[m][i + j] = xr[i + j];
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < LANE_K; i++) xs[m] += xv[m][i];
            } else {
#pragma unroll
                for (int i = 0; i < LANE_K; i++) xv[m][i] = 0.0f;
            }
        }
        float gs[TOKENS][QPANEL];
#pragma unroll
        for (int m = 0; m < TOKENS; m++)
#pragma unroll
            for (int r = 0; r < QPANEL; r++) gs[m][r] = 0.0f;
#pragma unroll
        for (int u = 0; u < QPIECES; u++) fd_qpiece<BITS, TOKENS>(c[u], xv, u * L::KL, gs);
        // The lane's k lie in one group (the compiler checks that groups are whole lane spans).
        const int g = k0 / group;
        float s[QPANEL], mn[QPANEL];
        fd_unpack8(*reinterpret_cast<const uint4*>(ps + g * QPANEL), s, false);
        if (pm) {
            fd_unpack8(*reinterpret_cast<const uint4*>(pm + g * QPANEL), mn, false);
        } else {
#pragma unroll
            for (int r = 0; r < QPANEL; r++) mn[r] = -offset * s[r];
        }
#pragma unroll
        for (int m = 0; m < TOKENS; m++)
#pragma unroll
            for (int r = 0; r < QPANEL; r++) acc[m][r] += s[r] * gs[m][r] + mn[r] * xs[m];
    }
#pragma unroll
    for (int m = 0; m < TOKENS; m++)
#pragma unroll
        for (int r = 0; r < QPANEL; r++) {
            const float sum = fd_warp_sum(acc[m][r]);
            if (lane == 0) reduced[warp][m][r] = sum;
        }
    __syncthreads();
    if (threadIdx.x < TOKENS * QPANEL) {
        const int m = threadIdx.x / QPANEL, r = threadIdx.x % QPANEL;
        const int row = panel * QPANEL + r;
        if (m < tokens && row < n) {
            float v = 0.0f;
            for (int w = 0; w < WARPS; w++) v += reduced[w][m][r];
            out[(long long)(t0 + m) * out_stride + row] = v + (bias ? bias[row] : 0.0f);
        }
    }
}

template <int BITS, int WARPS>
__device__ void qmatmul_launch(const float* x, int x_stride, const unsigned char* codes, int k,
                               int n, int group, const fd_f16* scales, const fd_f16* mins,
                               const float* bias, int t, float* out, int out_stride) {
    const int t0 = blockIdx.y * QTOKENS;
    const int tokens = min(QTOKENS, t - t0);
    const bool aligned = ((unsigned long long)x % 16 == 0) && (x_stride % 4 == 0);
    if (tokens == 1 && aligned) {
        qmatmul<BITS, WARPS, 1, true>(x, x_stride, codes, k, n, group, scales, mins, bias, t0, 1, out,
                               out_stride);
    } else if (tokens == 1) {
        qmatmul<BITS, WARPS, 1, false>(x, x_stride, codes, k, n, group, scales, mins, bias, t0, 1, out,
                                out_stride);
    } else {
        qmatmul<BITS, WARPS, QTOKENS, false>(x, x_stride, codes, k, n, group, scales, mins, bias, t0,
                                      tokens, out, out_stride);
    }
}

// Grid: (ceil(n / QPANEL), ceil(t / QTOKENS)); block: 32 * QMATMUL_WARPS threads (the runtime's
// QUANT_MATMUL_THREADS). `mins` null for symmetric codes; `k` a multiple of 16 and `group` of
// QPIECES * KL (checked by fdc).
extern "C" __global__ void matmul_q8(const float* x, int x_stride, const unsigned char* codes, int k,
                                   int n, int group, const fd_f16* scales, const fd_f16* mins,
                                   const float* bias, int t, float* out, int out_stride) {
    qmatmul_launch<8, QMATMUL_WARPS>(x, x_stride, codes, k, n, group, scales, mins, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_q4(const float* x, int x_stride, const unsigned char* codes, int k,
                                   int n, int group, const fd_f16* scales, const fd_f16* mins,
                                   const float* bias, int t, float* out, int out_stride) {
    qmatmul_launch<4, QMATMUL_WARPS>(x, x_stride, codes, k, n, group, scales, mins, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_q2(const float* x, int x_stride, const unsigned char* codes, int k,
                                   int n, int group, const fd_f16* scales, const fd_f16* mins,
                                   const float* bias, int t, float* out, int out_stride) {
    qmatmul_launch<2, QMATMUL_WARPS>(x, x_stride, codes, k, n, group, scales, mins, bias, t, out, out_stride);
}

// The weight at (row, c) of a quantized matrix of `cols` columns, as f32, exactly as the CPU
// forms it.
template <int BITS>
__device__ __forceinline__ float fd_qweight(const unsigned char* codes, int cols, int group,
                                            const fd_f16* scales, const fd_f16* mins, int row,
                                            int c) {
    using L = QLayout<BITS>;
    const int panel = row / QPANEL, j = row % QPANEL;
    const unsigned char byte = codes[((long long)panel * cols + c) * L::BPK + j % L::BPK];
    const unsigned int code = (byte >> ((j / L::BPK) * BITS)) & ((1u << BITS) - 1);
    const long long at = ((long long)panel * (cols / group) + c / group) * QPANEL + j;
    const float scale = fd_load(scales + at);
    return mins ? (float)code * scale + fd_load(mins + at)
                : ((float)code - (float)(1 << (BITS - 1))) * scale;
}

// out[t, c] = the weight [ids[t], c] of a quantized table, as f32. Grid: (column blocks, T).
template <int BITS>
__device__ void qembedding(const unsigned char* codes, int cols, int group, const fd_f16* scales,
                           const fd_f16* mins, const unsigned int* ids, float* out,
                           int out_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (c >= cols) return;
    out[(long long)t * out_stride + c] = fd_qweight<BITS>(codes, cols, group, scales, mins, ids[t], c);
}

// out = the whole matrix [n, k] as f32, row-major: the weight of a GEMM for prefill and large
// batches, formed once per pass. f32, not f16: rounding weights and activations to f16 moved
// the tiny goldens' logits further than 1e-3 from the CPU's. Grid: (n, column blocks).
template <int BITS>
__device__ void qdequantize(const unsigned char* codes, int k, int group, const fd_f16* scales,
                            const fd_f16* mins, float* out) {
    const int row = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= k) return;
    out[(long long)row * k + c] = fd_qweight<BITS>(codes, k, group, scales, mins, row, c);
}

extern "C" __global__ void dequantize_q8_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    qdequantize<8>(codes, k, group, scales, mins, out);
}
extern "C" __global__ void dequantize_q4_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    qdequantize<4>(codes, k, group, scales, mins, out);
}
extern "C" __global__ void dequantize_q2_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    qdequantize<2>(codes, k, group, scales, mins, out);
}

extern "C" __global__ void embedding_q8(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    qembedding<8>(codes, cols, group, scales, mins, ids, out, out_stride);
}
extern "C" __global__ void embedding_q4(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    qembedding<4>(codes, cols, group, scales, mins, ids, out, out_stride);
}
extern "C" __global__ void embedding_q2(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    qembedding<2>(codes, cols, group, scales, mins, ids, out, out_stride);
}
