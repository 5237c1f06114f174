// Quantized weights (W8A16, W4A16, W2A16; W8A8 and W4A8; FP8): the CUDA twins of the matmul and
// embedding of `kernels::cpu::quant`, reading the same layout, which the compiler writes once for both
// (panels of QPANEL = 8 rows; see that module's doc): codes panel after panel, for each k the 8
// rows' codes in 8 * BITS / 8 bytes, where bits [s*BITS, (s+1)*BITS) of byte j hold row
// s * BPK + j (BPK bytes per k); then f16 scales, for each panel and group of G k the 8 rows';
// then f16 minimums likewise when asymmetric. The value of a weight is `code * scale + min`
// (asymmetric) or `(code - 2^(BITS-1)) * scale` (symmetric), or `e4m3(code) * scale` (FP8),
// formed exactly in f32 as on the CPU.
//
// The A8 and FP8 schemes quantize activations per token row first (`quantize_rows_*`: the row
// divided by `max|x| / 127` or `/ 448` and rounded to the int8 or e4m3 grid, as
// `quantize_activation_row` does on the CPU); the matmul then reads those grid values, whose
// products with the codes are exact in f32 as an integer or FP8 unit forms them, and multiplies
// each output row by its row's scale before the bias.
//
// The matmul never forms dequantized weights. A block takes one panel; its warps split K; each
// lane takes QPIECES consecutive 16-byte pieces of codes (QPIECES * KL k, inside one group), sums
// code * x per row in f32, then folds the group in: `scale * sum(code * x) + min * sum(x)`.
// Measured on an H100 (docs/PERF.md): splitting K over the block's warps matters most (a panel
// per warp left too few warps for the narrow projections), two pieces per lane beat more, and 4
// warps per block beat 2, 8 and 16; requesting the scales with the codes, and a decode step's
// next iteration too, before any arithmetic took it from 40-67% to 50-86% of the copy bandwidth
// on the 8B shapes at 4 bits (the narrow ones stay latency-bound), and 8-bit tables to 100%.

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

// Byte `sel` of `w` read as an e4m3 code, as f32: its magnitude bits shifted into an f32's
// exponent and mantissa give the value times 2^-120 (e4m3's exponent bias is 7, f32's 127; the
// subnormal codes land on f32 subnormals, which this module keeps), so one multiply by 2^120
// is exact. The two NaN codes give NaN, as `e4m3_to_f32` does.
__device__ __forceinline__ float fd_e4m3_f32(unsigned int w, int sel) {
    const unsigned int b = __byte_perm(w, 0u, 0x4440 | sel);
    const float v = __uint_as_float(((b & 0x7fu) << 20) | ((b & 0x80u) << 24)) * 0x1p120f;
    return (b & 0x7fu) == 0x7fu ? __int_as_float(0x7fffffff) : v;
}

// The four e4m3 codes of `w` (byte j into out[j]) as f32. On sm89 and later through the
// hardware conversion, two codes per instruction into f16 (which holds every e4m3 value and
// NaN exactly), then widened: the matmul is bound by instructions per weight, and the bit
// manipulation of `fd_e4m3_f32` costs about twice as many (measured: FP8 decode slower than
// bf16 with it, docs/PERF.md).
__device__ __forceinline__ void fd_e4m3x4_f32(unsigned int w, float out[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned int lo, hi;
    asm("{\n .reg .b16 a, b;\n mov.b32 {a, b}, %2;\n cvt.rn.f16x2.e4m3x2 %0, a;\n"
        " cvt.rn.f16x2.e4m3x2 %1, b;\n}"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
    const unsigned short h[4] = {(unsigned short)(lo & 0xffffu), (unsigned short)(lo >> 16),
                                 (unsigned short)(hi & 0xffffu), (unsigned short)(hi >> 16)};
#pragma unroll
    for (int j = 0; j < 4; j++) out[j] = fd_f16_f32(h[j]);
#else
#pragma unroll
    for (int j = 0; j < 4; j++) out[j] = fd_e4m3_f32(w, j);
#endif
}

#ifdef FD_HIP
// The DCU's W4A8 (I8DOT): for 4-bit codes against activations on the int8 grid, each row's
// codes of the piece's 4 k gathered into one word (a 4 x 4 byte transpose by byte permutes) and
// multiplied with the 4 activations by one int8 dot-product instruction (v_dot4_i32_i8; codes
// 0..15 are non-negative int8). The sums are the f32 path's exactly: integers far below 2^24.
template <int TOKENS>
__device__ __forceinline__ void fd_qpiece_i8dot(const unsigned int (*slots)[2],
                                                const float (*xv)[16], int base_k,
                                                float (*gs)[QPANEL]) {
    int xq[TOKENS];
#pragma unroll
    for (int m = 0; m < TOKENS; m++) {
        xq[m] = 0;
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            xq[m] |= ((int)xv[m][base_k + kk] & 0xff) << (8 * kk);
    }
#pragma unroll
    for (int s = 0; s < 2; s++) {
        // slots[k][s] holds rows 4s..4s+3 at k, a byte each: the transpose gives row 4s + j's
        // four k in word j.
        const unsigned int lo01 = __byte_perm(slots[0][s], slots[1][s], 0x5140);
        const unsigned int lo23 = __byte_perm(slots[2][s], slots[3][s], 0x5140);
        const unsigned int hi01 = __byte_perm(slots[0][s], slots[1][s], 0x7362);
        const unsigned int hi23 = __byte_perm(slots[2][s], slots[3][s], 0x7362);
        const unsigned int rows[4] = {__byte_perm(lo01, lo23, 0x5410),
                                      __byte_perm(lo01, lo23, 0x7632),
                                      __byte_perm(hi01, hi23, 0x5410),
                                      __byte_perm(hi01, hi23, 0x7632)};
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int m = 0; m < TOKENS; m++)
                gs[m][4 * s + j] += (float)__builtin_amdgcn_sdot4((int)rows[j], xq[m], 0, false);
        }
    }
}
#endif

// gs[m][r] += sum over the piece's KL k of code(k, r) * x[m][k]. I8DOT (HIP, 4-bit codes,
// activations on the int8 grid): by int8 dot products.
template <int BITS, bool E4M3, int TOKENS, bool I8DOT = false>
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
#ifdef FD_HIP
    if constexpr (I8DOT) {
        static_assert(BITS == 4 && !E4M3, "int8 dot products serve 4-bit codes");
        fd_qpiece_i8dot<TOKENS>(slots, xv, base_k, gs);
        return;
    }
#endif
    if constexpr (E4M3) {
        // 8-bit codes: for each k, its 8 rows' codes in two words, byte j of word q is row
        // 4q + j.
#pragma unroll
        for (int kk = 0; kk < L::KL; kk++) {
#pragma unroll
            for (int q = 0; q < QPANEL / 4; q++) {
                float v[4];
                fd_e4m3x4_f32(words[kk * (QPANEL / 4) + q], v);
#pragma unroll
                for (int j = 0; j < 4; j++) {
#pragma unroll
                    for (int m = 0; m < TOKENS; m++)
                        gs[m][q * 4 + j] += v[j] * xv[m][base_k + kk];
                }
            }
        }
        return;
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

// `row_scales` (null for A16): each output row's activation scale, multiplied in before the bias.
// `FOLD` (one token only): a decode fold's epilogue (`FdFold` in common.cuh).
template <int BITS, bool E4M3, int WARPS, int TOKENS, bool X_ALIGNED, int FOLD = FD_FOLD_NONE,
          bool I8DOT = false>
__device__ void qmatmul(const float* x, int x_stride, const unsigned char* codes, int k, int n,
                        int group, const fd_f16* scales, const fd_f16* mins, const float* bias,
                        const float* row_scales, int t0, int tokens, float* out, int out_stride,
                        const FdFold& fold = FdFold{}) {
    static_assert(FOLD == FD_FOLD_NONE || TOKENS == 1, "decode folds serve one token");
    using L = QLayout<BITS>;
    __shared__ float reduced[WARPS][QTOKENS][QPANEL];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int panel = blockIdx.x;
    const int groups = k / group;
    const unsigned char* pc = codes + (long long)panel * k * L::BPK;
    const fd_f16* ps = scales + (long long)panel * groups * QPANEL;
    const fd_f16* pm = mins ? mins + (long long)panel * groups * QPANEL : nullptr;
    const float offset = (mins || E4M3) ? 0.0f : (float)(1 << (BITS - 1));
    float acc[TOKENS][QPANEL];
#pragma unroll
    for (int m = 0; m < TOKENS; m++)
#pragma unroll
        for (int r = 0; r < QPANEL; r++) acc[m][r] = 0.0f;
    const int pieces = k / L::KL;
    constexpr int LANE_K = QPIECES * L::KL;
    constexpr int STEP = WARPS * 32 * QPIECES;  // pieces per iteration of the block
    // A decode step's single token leaves registers for a second iteration's loads in flight.
    constexpr int U = TOKENS == 1 ? 2 : 1;
    bool waited = false;
    for (int outer = warp * 32 * QPIECES; outer < pieces; outer += U * STEP) {
        // U iterations' codes, scales and minimums are all requested before any is used: the
        // scales are as cold as the codes, and loading them after the codes' arithmetic left
        // the kernel waiting on memory twice per iteration (measured: 20 to 28% faster on the
        // 8B shapes' large matmuls, docs/PERF.md).
        uint4 c[U][QPIECES], sv[U], mv[U];
#pragma unroll
        for (int v = 0; v < U; v++) {
            const int j0 = outer + v * STEP + lane * QPIECES;
#pragma unroll
            for (int u = 0; u < QPIECES; u++) {
                c[v][u] = j0 + u < pieces ? fd_load_stream(pc + (long long)(j0 + u) * 16)
                                          : make_uint4(0, 0, 0, 0);
            }
            // The lane's k lie in one group (the compiler checks that groups are whole lane
            // spans).
            const int g = j0 < pieces ? j0 * L::KL / group : 0;
            sv[v] = j0 < pieces ? *reinterpret_cast<const uint4*>(ps + g * QPANEL)
                                : make_uint4(0, 0, 0, 0);
            mv[v] = pm && j0 < pieces ? *reinterpret_cast<const uint4*>(pm + g * QPANEL)
                                      : make_uint4(0, 0, 0, 0);
        }
        // The first weights are on their way while the kernel before finishes.
        if (!waited) {
            fd_grid_wait();
            waited = true;
        }
#pragma unroll
        for (int v = 0; v < U; v++) {
            const int j0 = outer + v * STEP + lane * QPIECES;
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
            for (int u = 0; u < QPIECES; u++)
                fd_qpiece<BITS, E4M3, TOKENS, I8DOT>(c[v][u], xv, u * L::KL, gs);
            float s[QPANEL], mn[QPANEL];
            fd_unpack8(sv[v], s, false);
            if (pm) {
                fd_unpack8(mv[v], mn, false);
            } else {
#pragma unroll
                for (int r = 0; r < QPANEL; r++) mn[r] = -offset * s[r];
            }
#pragma unroll
            for (int m = 0; m < TOKENS; m++)
#pragma unroll
                for (int r = 0; r < QPANEL; r++) acc[m][r] += s[r] * gs[m][r] + mn[r] * xs[m];
        }
    }
    fd_grid_wait();  // returns at once when the loop above waited
#pragma unroll
    for (int m = 0; m < TOKENS; m++)
#pragma unroll
        for (int r = 0; r < QPANEL; r++) {
            const float sum = fd_warp_sum(acc[m][r]);
            if (lane == 0) reduced[warp][m][r] = sum;
        }
    __syncthreads();
    if constexpr (FOLD != FD_FOLD_NONE) {
        const int row = panel * QPANEL + threadIdx.x;
        const bool holds = threadIdx.x < QPANEL && row < n;
        float v = 0.0f;
        if (holds) {
            for (int w = 0; w < WARPS; w++) v += reduced[w][0][threadIdx.x];
        }
        fd_fold_epilogue<FOLD>(holds, row, v, holds && bias ? bias[row] : 0.0f, out, fold);
        return;
    }
    if (threadIdx.x < TOKENS * QPANEL) {
        const int m = threadIdx.x / QPANEL, r = threadIdx.x % QPANEL;
        const int row = panel * QPANEL + r;
        if (m < tokens && row < n) {
            float v = 0.0f;
            for (int w = 0; w < WARPS; w++) v += reduced[w][m][r];
            if (row_scales) v *= row_scales[t0 + m];
            out[(long long)(t0 + m) * out_stride + row] = v + (bias ? bias[row] : 0.0f);
        }
    }
}

// A pass of several tokens: blocks of QTOKENS token rows (the last one partial).
template <int BITS, bool E4M3, bool I8DOT = false>
__device__ void qmatmul_tokens(const float* x, int x_stride, const unsigned char* codes, int k,
                               int n, int group, const fd_f16* scales, const fd_f16* mins,
                               const float* bias, const float* row_scales, int t, float* out,
                               int out_stride) {
    const int t0 = blockIdx.y * QTOKENS;
    qmatmul<BITS, E4M3, QMATMUL_WARPS, QTOKENS, false, FD_FOLD_NONE, I8DOT>(
        x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, t0,
        min(QTOKENS, t - t0), out, out_stride);
}

// A pass of one token (a decode step of one sequence). A kernel of its own: a kernel's registers
// are those of its largest path, and the several-token path's would cut this one's occupancy
// (measured: 20% slower on the 8B shapes when both lived in one kernel, docs/PERF.md).
template <int BITS, bool E4M3, int FOLD = FD_FOLD_NONE, bool I8DOT = false>
__device__ void qmatmul_one(const float* x, int x_stride, const unsigned char* codes, int k,
                            int n, int group, const fd_f16* scales, const fd_f16* mins,
                            const float* bias, const float* row_scales, float* out,
                            const FdFold& fold = FdFold{}) {
    if ((unsigned long long)x % 16 == 0) {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, true, FOLD, I8DOT>(
            x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, 0, 1, out, 0, fold);
    } else {
        qmatmul<BITS, E4M3, QMATMUL_WARPS, 1, false, FOLD, I8DOT>(
            x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, 0, 1, out, 0, fold);
    }
}

// Grid: (ceil(n / QPANEL), ceil(t / QTOKENS)); block: 32 * QMATMUL_WARPS threads (the runtime's
// QUANT_MATMUL_THREADS). `mins` null for symmetric codes, `row_scales` null for A16 activations;
// `k` a multiple of 16 and `group` of QPIECES * KL (checked by fdc). The `_one` kernels take the
// same arguments for t = 1 (grid (ceil(n / QPANEL), 1)).
extern "C" __global__ void matmul_q8(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_tokens<8, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, t,
                             out, out_stride);
}
extern "C" __global__ void matmul_q8_one(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_one<8, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, out);
}
extern "C" __global__ void matmul_q4(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_tokens<4, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, t,
                             out, out_stride);
}
extern "C" __global__ void matmul_q4_one(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_one<4, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, out);
}
#ifdef FD_HIP
// W4A8 on the DCU: `matmul_q4`'s arguments, `x` the activations on the int8 grid
// (`quantize_rows_i8_f32`), the codes' products summed by int8 dot products.
extern "C" __global__ void matmul_q4_a8(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    qmatmul_tokens<4, false, true>(x, x_stride, codes, k, n, group, scales, mins, bias,
                                   row_scales, t, out, out_stride);
}
extern "C" __global__ void matmul_q4_a8_one(const float* x, int x_stride,
                                   const unsigned char* codes, int k, int n, int group,
                                   const fd_f16* scales, const fd_f16* mins,
                                   const float* row_scales, const float* bias, int t, float* out,
                                   int out_stride) {
    qmatmul_one<4, false, FD_FOLD_NONE, true>(x, x_stride, codes, k, n, group, scales, mins,
                                              bias, row_scales, out);
}
#endif
extern "C" __global__ void matmul_q2(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_tokens<2, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, t,
                             out, out_stride);
}
extern "C" __global__ void matmul_q2_one(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_one<2, false>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, out);
}
extern "C" __global__ void matmul_e4m3(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_tokens<8, true>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, t,
                             out, out_stride);
}
extern "C" __global__ void matmul_e4m3_one(const float* x, int x_stride, const unsigned char* codes,
                                   int k, int n, int group, const fd_f16* scales,
                                   const fd_f16* mins, const float* row_scales, const float* bias,
                                   int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_one<8, true>(x, x_stride, codes, k, n, group, scales, mins, bias, row_scales, out);
}

// Decode folds of the A16 schemes (`FdFold`): a one-token `_one` kernel's arguments, then the
// fold's. `_add_norm` writes no `out`: its value goes to s = residual + value and on.
#define FD_QMATMUL_FOLDS(NAME, BITS)                                                              \
    extern "C" __global__ void NAME##_add_norm(                                                   \
        const float* x, int x_stride, const unsigned char* codes, int k, int n, int group,        \
        const fd_f16* scales, const fd_f16* mins, const float* row_scales, const float* bias,     \
        int t, float* out, int out_stride, const float* residual, const float* norm_w,            \
        float* sum_out, float* normed_out, float* partials) {                                     \
        fd_grid_start();                                                                          \
        FdFold f{};                                                                               \
        f.residual = residual; f.norm_w = norm_w; f.sum_out = sum_out;                            \
        f.normed_out = normed_out; f.partials_out = partials;                                     \
        qmatmul_one<BITS, false, FD_FOLD_ADD_NORM>(x, x_stride, codes, k, n, group, scales, mins, \
                                                   bias, nullptr, out, f);                        \
    }                                                                                             \
    extern "C" __global__ void NAME##_rms(                                                        \
        const float* x, int x_stride, const unsigned char* codes, int k, int n, int group,        \
        const fd_f16* scales, const fd_f16* mins, const float* row_scales, const float* bias,     \
        int t, float* out, int out_stride, const float* partials, int n_partials, int cols,       \
        float eps) {                                                                              \
        fd_grid_start();                                                                          \
        FdFold f{};                                                                               \
        f.partials_in = partials; f.n_partials = n_partials; f.cols = cols; f.eps = eps;          \
        qmatmul_one<BITS, false, FD_FOLD_RMS>(x, x_stride, codes, k, n, group, scales, mins,      \
                                              bias, nullptr, out, f);                             \
    }
FD_QMATMUL_FOLDS(matmul_q8_one, 8)
FD_QMATMUL_FOLDS(matmul_q4_one, 4)
FD_QMATMUL_FOLDS(matmul_q2_one, 2)

// The A8 and FP8 activations: row t of x (k values) divided by its scale `max|x| / LIMIT` and
// rounded (half away from zero to the int8 grid, or to the nearest e4m3 value, ties to even),
// written to q (rows of k) with the scale to scales[t]; an all-zero row gets scale 0 and zeros.
// The same operations in the same order as `quantize_activation_row`, so the grid values match
// the CPU's bit for bit on the same input. Grid: (t); block: 256 threads.
__device__ __forceinline__ float fd_round_e4m3(float v) {
    const float a = fabsf(v);
    float r;
    if (a >= 448.0f) {
        r = 448.0f;
    } else if (a < 1.0f / 64.0f) {
        r = rintf(a * 512.0f) / 512.0f;  // subnormal: a fixed quantum of 2^-9
    } else {
        const unsigned int b = __float_as_uint(a);  // keep 3 mantissa bits, to nearest even
        r = __uint_as_float((b + 0x7ffffu + ((b >> 20) & 1u)) & ~0xfffffu);
    }
    return v != v ? v : copysignf(r, v);
}

template <bool E4M3>
__device__ void quantize_rows(const float* x, int x_stride, int k, float* q, float* scales) {
    __shared__ float scratch[32];
    const float limit = E4M3 ? 448.0f : 127.0f;
    const float* row = x + (long long)blockIdx.x * x_stride;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(row[i]));
    // The block's maximum (fmaxf ignores NaN as the CPU's `f32::max` does).
    for (int offset = 16; offset > 0; offset >>= 1)
        amax = fmaxf(amax, fd_shfl_xor(amax, offset));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) amax = fmaxf(amax, scratch[w]);
    const float scale = amax / limit;
    float* out = q + (long long)blockIdx.x * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        float v = 0.0f;
        if (scale != 0.0f) {
            const float d = row[i] / scale;
            v = E4M3 ? fd_round_e4m3(d) : roundf(d);
            // A clamp that keeps NaN, as Rust's `f32::clamp` does.
            v = v < -limit ? -limit : (v > limit ? limit : v);
        }
        out[i] = v;
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

extern "C" __global__ void quantize_rows_i8_f32(const float* x, int x_stride, int k, float* q,
                                                float* scales) {
    fd_grid_start();
    fd_grid_wait();
    quantize_rows<false>(x, x_stride, k, q, scales);
}
extern "C" __global__ void quantize_rows_e4m3_f32(const float* x, int x_stride, int k, float* q,
                                                  float* scales) {
    fd_grid_start();
    fd_grid_wait();
    quantize_rows<true>(x, x_stride, k, q, scales);
}

// out[t, c] = out[t, c] * scales[t] + bias[c] (bias null: none), in place: the epilogue of an A8
// or FP8 GEMM, which multiplies the rows' grid values. Grid: (ceil(n / 256), t); block: 256.
extern "C" __global__ void scale_rows_f32(float* out, int out_stride, int n, const float* scales,
                                          const float* bias) {
    fd_grid_start();
    fd_grid_wait();
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (c >= n) return;
    float* o = out + (long long)t * out_stride + c;
    *o = *o * scales[t] + (bias ? bias[c] : 0.0f);
}

// The weight at (row, c) of a quantized matrix of `cols` columns, as f32, exactly as the CPU
// forms it.
template <int BITS, bool E4M3 = false>
__device__ __forceinline__ float fd_qweight(const unsigned char* codes, int cols, int group,
                                            const fd_f16* scales, const fd_f16* mins, int row,
                                            int c) {
    using L = QLayout<BITS>;
    const int panel = row / QPANEL, j = row % QPANEL;
    const unsigned char byte = codes[((long long)panel * cols + c) * L::BPK + j % L::BPK];
    const unsigned int code = (byte >> ((j / L::BPK) * BITS)) & ((1u << BITS) - 1);
    const long long at = ((long long)panel * (cols / group) + c / group) * QPANEL + j;
    const float scale = fd_load(scales + at);
    if (E4M3) return fd_e4m3_f32(code, 0) * scale;
    return mins ? (float)code * scale + fd_load(mins + at)
                : ((float)code - (float)(1 << (BITS - 1))) * scale;
}

// out[t, c] = the weight [ids[t], c] of a quantized table, as f32. Grid: (column blocks, T).
template <int BITS, bool E4M3 = false>
__device__ void qembedding(const unsigned char* codes, int cols, int group, const fd_f16* scales,
                           const fd_f16* mins, const unsigned int* ids, float* out,
                           int out_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (c >= cols) return;
    out[(long long)t * out_stride + c] = fd_qweight<BITS, E4M3>(codes, cols, group, scales, mins, ids[t], c);
}

// out = the whole matrix [n, k] as f32, row-major: the weight of a GEMM for prefill and large
// batches, formed once per pass. f32, not f16: rounding weights and activations to f16 moved
// the tiny goldens' logits further than 1e-3 from the CPU's. Grid: (n, column blocks).
template <int BITS, bool E4M3 = false>
__device__ void qdequantize(const unsigned char* codes, int k, int group, const fd_f16* scales,
                            const fd_f16* mins, float* out) {
    const int row = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= k) return;
    out[(long long)row * k + c] = fd_qweight<BITS, E4M3>(codes, k, group, scales, mins, row, c);
}

extern "C" __global__ void dequantize_q8_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    fd_grid_start();
    fd_grid_wait();
    qdequantize<8>(codes, k, group, scales, mins, out);
}
extern "C" __global__ void dequantize_q4_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    fd_grid_start();
    fd_grid_wait();
    qdequantize<4>(codes, k, group, scales, mins, out);
}
extern "C" __global__ void dequantize_q2_f32(const unsigned char* codes, int k, int group,
                                             const fd_f16* scales, const fd_f16* mins,
                                             float* out) {
    fd_grid_start();
    fd_grid_wait();
    qdequantize<2>(codes, k, group, scales, mins, out);
}

extern "C" __global__ void dequantize_e4m3_f32(const unsigned char* codes, int k, int group,
                                               const fd_f16* scales, const fd_f16* mins,
                                               float* out) {
    fd_grid_start();
    fd_grid_wait();
    qdequantize<8, true>(codes, k, group, scales, mins, out);
}

extern "C" __global__ void embedding_q8(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    qembedding<8>(codes, cols, group, scales, mins, ids, out, out_stride);
}
extern "C" __global__ void embedding_q4(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    qembedding<4>(codes, cols, group, scales, mins, ids, out, out_stride);
}
extern "C" __global__ void embedding_q2(const unsigned char* codes, int cols, int group,
                                      const fd_f16* scales, const fd_f16* mins,
                                      const unsigned int* ids, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    qembedding<2>(codes, cols, group, scales, mins, ids, out, out_stride);
}
extern "C" __global__ void embedding_e4m3(const unsigned char* codes, int cols, int group,
                                          const fd_f16* scales, const fd_f16* mins,
                                          const unsigned int* ids, float* out, int out_stride) {
    fd_grid_start();
    fd_grid_wait();
    qembedding<8, true>(codes, cols, group, scales, mins, ids, out, out_stride);
}

// ---- W4A16 on tensor cores: the tile layout (CUDA only) ----------------------------------------
//
// fdc stores a CUDA plan's 4-bit symmetric A16 matrices whose only readers are matmuls, with N a
// multiple of QTILE_ROWS and K and the group multiples of 64, in a layout of their own
// (`WeightLayout::QuantTiles`): for each tile of 16 rows and each 64 k (a chunk), lane L's codes
// for the chunk's four `mma.m16n8k16` in one 16-byte piece, word w for k 16w to 16w + 15, nibble j
// of the word the element (row g + 8 (j & 1), k 2t + 8 ((j >> 1) & 1) + (j >> 2)) of the mma,
// g = L / 4, t = L % 4: the PTX fragment order of A, whose register r holds rows g, g + 8, g,
// g + 8 and k 2t, 2t, 2t + 8, 2t + 8, two consecutive k each. The scales stay in panels of
// QPANEL rows (tile T's rows are panels 2T and 2T + 1).
//
// The matmul (`qmatmul_tiles`): a block per tile, its warps splitting the chunks; codes unpacked
// exactly to bf16 `code - 8` (one lop3 with bf16's 128 and one fma per pair); the activations
// split as x = hi + mid + lo, three bf16 values that hold all of an f32's 24 bits and its whole
// exponent range, as three of the mma's eight columns (a second token in the other four), so
// products are exact and summed in f32 as the f32 loop sums them. Each chunk's sums are scaled
// by its group's scale in f32. Measured as variant M of
// `experiments/narrow_matmul_bench.cu` (RESULTS.md): at 16 warps with two units of two chunks
// requested at once, 2 to 11% faster than `matmul_q4_one` on every Llama-3-8B shape.
#ifndef FD_HIP
#define QTILE_ROWS 16
#define QTILE_WARPS_ONE 16  // warps per block of the single-token kernel
#define QTILE_WARPS 4       // warps per block of the several-token kernel (QTOKENS tokens)
#define QTILE_UNIT 2        // consecutive chunks a warp takes at once
#define QTILE_AHEAD 2       // units a warp requests before any arithmetic

// Nibbles 0 and 4 of `w` (bits 0-3 and 16-19) as bf16x2 of 128 + v, by one lop3 with the bf16
// exponent of 128 (whose unit in the last place is 1).
__device__ __forceinline__ unsigned fd_nibbles_bf16x2(unsigned w) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "n"(0x000f000fu), "n"(0x43004300u));
    return r;
}

// The eight codes of `w` as the four bf16x2 registers of an mma's A fragment, code - 8, exact.
__device__ __forceinline__ void fd_codes_bf16x2(unsigned w, unsigned a[4]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        unsigned p = fd_nibbles_bf16x2(w >> (4 * j));
        // (128 + v) * 1 - 136 = v - 8
        asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(p) : "r"(0x3f803f80u), "r"(0xc308c308u));
        a[j] = p;  // j = 0: row g, k 2t, 2t + 1; 1: row g + 8; 2: row g, k + 8; 3: row g + 8, k + 8
    }
}

__device__ __forceinline__ void fd_mma_bf16_16816(float d[4], const unsigned a[4], unsigned b0,
                                                  unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 as bf16x2 (nearest even): `a` in the low half.
__device__ __forceinline__ unsigned fd_bf16x2(float a, float b) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
__device__ __forceinline__ float fd_bf16_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float fd_bf16_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }

// Eight activations v as their three bf16 pieces (v = hi + mid + lo to within 2^-24 |v|), each
// as four bf16x2 words.
__device__ __forceinline__ void fd_split3(const float v[8], uint4& hi, uint4& mid, uint4& lo) {
    unsigned h[4], m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float a = v[2 * i], b = v[2 * i + 1];
        h[i] = fd_bf16x2(a, b);
        const float ra = a - fd_bf16_lo(h[i]), rb = b - fd_bf16_hi(h[i]);
        m[i] = fd_bf16x2(ra, rb);
        l[i] = fd_bf16x2(ra - fd_bf16_lo(m[i]), rb - fd_bf16_hi(m[i]));
    }
    hi = make_uint4(h[0], h[1], h[2], h[3]);
    mid = make_uint4(m[0], m[1], m[2], m[3]);
    lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// TOKENS tokens from t0 (`tokens` of them real), 1 or QTOKENS; FOLD for one token only.
template <int WARPS, int TOKENS, int FOLD = FD_FOLD_NONE>
__device__ void qmatmul_tiles(const float* x, int x_stride, const uint4* tiles, int k, int n,
                              int group, const fd_f16* scales, const float* bias, int t0,
                              int tokens, float* out, int out_stride,
                              const FdFold& fold = FdFold{}) {
    static_assert(FOLD == FD_FOLD_NONE || TOKENS == 1, "decode folds serve one token");
    constexpr int SLOTS = QTILE_AHEAD * QTILE_UNIT;  // chunks a warp holds per round
    constexpr int MMAS = (TOKENS + 1) / 2;            // two tokens per mma
    static_assert(SLOTS * 64 == 32 * 8, "a round's activations are 8 per lane");
    // The round's activations, split: [token][piece][k of the warp's chunks].
    __shared__ __align__(16) unsigned short xs[WARPS][TOKENS][3][SLOTS * 64];
    __shared__ float reduced[WARPS][TOKENS][QTILE_ROWS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x;
    const int chunks = k / 64, groups = k / group;
    const uint4* tc = tiles + (long long)tile * chunks * 32;
    const fd_f16* s0 = scales + (long long)(2 * tile) * groups * QPANEL;
    const fd_f16* s1 = s0 + (long long)groups * QPANEL;
    // This lane's B column: token 2 m + g / 4, piece g % 4 (3: a zero column).
    const int piece = g & 3;
    float acc[MMAS][2];  // rows g and g + 8 of token 2 m + t / 2 (columns 2t and 2t + 1)
#pragma unroll
    for (int m = 0; m < MMAS; m++) acc[m][0] = acc[m][1] = 0.0f;
    bool waited = false;
    for (int c0 = warp * QTILE_UNIT; c0 < chunks; c0 += WARPS * SLOTS) {
        // Slot s = a * UNIT + u holds chunk c0 + a * WARPS * UNIT + u.
        uint4 q[SLOTS];
        fd_f16 sc[SLOTS][2];
#pragma unroll
        for (int s = 0; s < SLOTS; s++) {
            const int chunk = c0 + (s / QTILE_UNIT) * WARPS * QTILE_UNIT + s % QTILE_UNIT;
            const bool in = chunk < chunks;
            q[s] = in ? fd_load_stream(tc + (long long)chunk * 32 + lane) : make_uint4(0, 0, 0, 0);
            const int grp = in ? chunk * 64 / group : 0;
            sc[s][0] = in ? s0[grp * QPANEL + g] : fd_f16{0};
            sc[s][1] = in ? s1[grp * QPANEL + g] : fd_f16{0};
        }
        // The first weights are on their way while the kernel before finishes.
        if (!waited) {
            fd_grid_wait();
            waited = true;
        }
        // The round's activations into shared memory, split: lane L takes 8 k of slot L / 8.
        {
            const int s = lane / 8, kk = (lane % 8) * 8;
            const int chunk = c0 + (s / QTILE_UNIT) * WARPS * QTILE_UNIT + s % QTILE_UNIT;
#pragma unroll
            for (int m = 0; m < TOKENS; m++) {
                float v[8];
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] = 0.0f;
                if (m < tokens && chunk < chunks) {
                    const float* xr = x + (long long)(t0 + m) * x_stride + chunk * 64 + kk;
                    if ((unsigned long long)xr % 16 == 0) {
                        const float4 a = *reinterpret_cast<const float4*>(xr);
                        const float4 b = *reinterpret_cast<const float4*>(xr + 4);
                        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
                        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
                    } else {
#pragma unroll
                        for (int i = 0; i < 8; i++) v[i] = xr[i];
                    }
                }
                uint4 hi, mid, lo;
                fd_split3(v, hi, mid, lo);
                const int at = s * 64 + kk;
                *reinterpret_cast<uint4*>(&xs[warp][m][0][at]) = hi;
                *reinterpret_cast<uint4*>(&xs[warp][m][1][at]) = mid;
                *reinterpret_cast<uint4*>(&xs[warp][m][2][at]) = lo;
            }
        }
        __syncwarp();
#pragma unroll
        for (int s = 0; s < SLOTS; s++) {
            const int chunk = c0 + (s / QTILE_UNIT) * WARPS * QTILE_UNIT + s % QTILE_UNIT;
            if (chunk >= chunks) break;
            float d[MMAS][4];
#pragma unroll
            for (int m = 0; m < MMAS; m++) d[m][0] = d[m][1] = d[m][2] = d[m][3] = 0.0f;
            const unsigned words[4] = {q[s].x, q[s].y, q[s].z, q[s].w};
#pragma unroll
            for (int w = 0; w < 4; w++) {
                unsigned a[4];
                fd_codes_bf16x2(words[w], a);
                const int kb = s * 64 + w * 16 + 2 * t;
#pragma unroll
                for (int m = 0; m < MMAS; m++) {
                    const int token = 2 * m + (g >> 2);
                    unsigned b0 = 0, b1 = 0;
                    if (piece < 3 && token < TOKENS) {
                        b0 = *reinterpret_cast<const unsigned*>(&xs[warp][token][piece][kb]);
                        b1 = *reinterpret_cast<const unsigned*>(&xs[warp][token][piece][kb + 8]);
                    }
                    fd_mma_bf16_16816(d[m], a, b0, b1);
                }
            }
            const float sa = fd_f16_f32(sc[s][0].bits), sb = fd_f16_f32(sc[s][1].bits);
#pragma unroll
            for (int m = 0; m < MMAS; m++) {
                acc[m][0] += sa * (d[m][0] + d[m][1]);
                acc[m][1] += sb * (d[m][2] + d[m][3]);
            }
        }
        __syncwarp();  // the next round's activations overwrite these
    }
    fd_grid_wait();  // returns at once when the loop above waited
    // Columns 2t, 2t + 1 and 2(t ^ 1), 2(t ^ 1) + 1 hold one token's three pieces.
#pragma unroll
    for (int m = 0; m < MMAS; m++) {
        acc[m][0] += fd_shfl_xor(acc[m][0], 1);
        acc[m][1] += fd_shfl_xor(acc[m][1], 1);
        const int token = 2 * m + (t >> 1);
        if ((t & 1) == 0 && token < TOKENS) {
            reduced[warp][token][g] = acc[m][0];
            reduced[warp][token][g + 8] = acc[m][1];
        }
    }
    __syncthreads();
    if constexpr (FOLD != FD_FOLD_NONE) {
        const int row = tile * QTILE_ROWS + threadIdx.x;
        const bool holds = threadIdx.x < QTILE_ROWS && row < n;
        float v = 0.0f;
        if (holds) {
            for (int w = 0; w < WARPS; w++) v += reduced[w][0][threadIdx.x];
        }
        fd_fold_epilogue<FOLD>(holds, row, v, holds && bias ? bias[row] : 0.0f, out, fold);
        return;
    }
    if (threadIdx.x < TOKENS * QTILE_ROWS) {
        const int m = threadIdx.x / QTILE_ROWS, r = threadIdx.x % QTILE_ROWS;
        const int row = tile * QTILE_ROWS + r;
        if (m < tokens && row < n) {
            float v = 0.0f;
            for (int w = 0; w < WARPS; w++) v += reduced[w][m][r];
            out[(long long)(t0 + m) * out_stride + row] = v + (bias ? bias[row] : 0.0f);
        }
    }
}

// `matmul_q4`'s arguments (`mins` and `row_scales` null: symmetric A16 codes only). Grid:
// (n / QTILE_ROWS, ceil(t / QTOKENS)), block 32 * QTILE_WARPS; the `_one` kernel grid
// (n / QTILE_ROWS, 1), block 32 * QTILE_WARPS_ONE.
extern "C" __global__ void __launch_bounds__(32 * QTILE_WARPS)
matmul_q4t(const float* x, int x_stride, const unsigned char* codes, int k, int n, int group,
           const fd_f16* scales, const fd_f16* mins, const float* row_scales, const float* bias,
           int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    const int t0 = blockIdx.y * QTOKENS;
    qmatmul_tiles<QTILE_WARPS, QTOKENS>(x, x_stride, reinterpret_cast<const uint4*>(codes), k, n,
                                        group, scales, bias, t0, min(QTOKENS, t - t0), out,
                                        out_stride);
}
extern "C" __global__ void __launch_bounds__(32 * QTILE_WARPS_ONE)
matmul_q4t_one(const float* x, int x_stride, const unsigned char* codes, int k, int n, int group,
               const fd_f16* scales, const fd_f16* mins, const float* row_scales,
               const float* bias, int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    qmatmul_tiles<QTILE_WARPS_ONE, 1>(x, x_stride, reinterpret_cast<const uint4*>(codes), k, n,
                                      group, scales, bias, 0, 1, out, 0);
}
extern "C" __global__ void __launch_bounds__(32 * QTILE_WARPS_ONE)
matmul_q4t_one_add_norm(const float* x, int x_stride, const unsigned char* codes, int k, int n,
                        int group, const fd_f16* scales, const fd_f16* mins,
                        const float* row_scales, const float* bias, int t, float* out,
                        int out_stride, const float* residual, const float* norm_w,
                        float* sum_out, float* normed_out, float* partials) {
    fd_grid_start();
    FdFold f{};
    f.residual = residual; f.norm_w = norm_w; f.sum_out = sum_out;
    f.normed_out = normed_out; f.partials_out = partials;
    qmatmul_tiles<QTILE_WARPS_ONE, 1, FD_FOLD_ADD_NORM>(
        x, x_stride, reinterpret_cast<const uint4*>(codes), k, n, group, scales, bias, 0, 1, out,
        0, f);
}
extern "C" __global__ void __launch_bounds__(32 * QTILE_WARPS_ONE)
matmul_q4t_one_rms(const float* x, int x_stride, const unsigned char* codes, int k, int n,
                   int group, const fd_f16* scales, const fd_f16* mins, const float* row_scales,
                   const float* bias, int t, float* out, int out_stride, const float* partials,
                   int n_partials, int cols, float eps) {
    fd_grid_start();
    FdFold f{};
    f.partials_in = partials; f.n_partials = n_partials; f.cols = cols; f.eps = eps;
    qmatmul_tiles<QTILE_WARPS_ONE, 1, FD_FOLD_RMS>(
        x, x_stride, reinterpret_cast<const uint4*>(codes), k, n, group, scales, bias, 0, 1, out,
        0, f);
}

// `dequantize_q4_f32` for the tile layout: out = the whole matrix [n, k] as f32, row-major.
// Grid: (n, column blocks).
extern "C" __global__ void dequantize_q4t_f32(const unsigned char* codes, int k, int group,
                                              const fd_f16* scales, const fd_f16* mins,
                                              float* out) {
    fd_grid_start();
    fd_grid_wait();
    const int row = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= k) return;
    const int tile = row / QTILE_ROWS, r16 = row % QTILE_ROWS, g = r16 % 8, half = r16 / 8;
    const int chunk = c / 64, w = (c % 64) / 16, kin = c % 16;
    const int high8 = kin / 8, t = (kin % 8) / 2, odd = kin % 2;
    const int j = half | (high8 << 1) | (odd << 2), lane = g * 4 + t;
    const long long word = (((long long)tile * (k / 64) + chunk) * 32 + lane) * 4 + w;
    const unsigned code = (reinterpret_cast<const unsigned*>(codes)[word] >> (4 * j)) & 15u;
    const long long at = ((long long)(row / QPANEL) * (k / group) + c / group) * QPANEL + row % QPANEL;
    out[(long long)row * k + c] = ((float)code - 8.0f) * fd_load(scales + at);
}
#endif  // FD_HIP
