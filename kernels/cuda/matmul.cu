// out[t, n] = sum_k x[t, k] * w[n, k] (+ bias[n]), f32 accumulation; w row-major [N, K] in f32,
// bf16 or f16. The CUDA twin of `kernels::cpu::matmul`.
//
// One warp per weight row and block of MATMUL_TOKENS token rows: the lanes stride over k, so a
// warp reads its weight row once per token block, coalesced, and reduces with shuffles. This is
// the small-batch (decode) shape; large batches will go to cuBLAS.
//
// What makes it reach the copy bandwidth at batch 1 (measured on an H100 with
// `tests/examples/cuda_matmul_bench.rs`, docs/PERF.md): MATMUL_UNROLL 16-byte weight loads per
// lane issued before any is used (8 KB in flight per warp), the weights kept packed in registers
// until used (unpacked they would spill), and loads that bypass L1 (`ld.global.nc` without L1
// allocation), so that L1 keeps the activation row every warp of the SM re-reads.

#define MATMUL_WARPS 8
#define MATMUL_TOKENS 4
#define MATMUL_UNROLL 8

// 16 bytes of weights that are read once: through the read-only path, not allocated in L1.
__device__ __forceinline__ uint4 fd_load_stream(const void* p) {
#ifdef FD_HIP
    // A non-temporal load: the nearest gfx906 has to the read-once hint.
    typedef unsigned int u32x4 __attribute__((ext_vector_type(4)));
    const u32x4 v = __builtin_nontemporal_load(reinterpret_cast<const u32x4*>(p));
    return make_uint4(v.x, v.y, v.z, v.w);
#else
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
#endif
}

// The weights in 16 bytes, widened to f32.
template <typename W> struct Packed;
template <> struct Packed<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(uint4 v, float o[4]) {
        o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y);
        o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
    }
};
template <> struct Packed<fd_bf16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(uint4 v, float o[8]) { fd_unpack8(v, o, true); }
};
template <> struct Packed<fd_f16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(uint4 v, float o[8]) { fd_unpack8(v, o, false); }
};

// One warp's row for the block's tokens, at most TOKENS of them. The token bound and the
// activations' alignment are compile-time, so that a decode step's single token compiles to
// straight-line code with one accumulator and no branch in the loop (measured: 20% faster).
// With `!WRITE` (one token) nothing is written: the row's sum, without the bias, is returned
// to every lane for a decode fold's epilogue.
template <typename W, int TOKENS, bool X_ALIGNED, bool WRITE = true>
__device__ __forceinline__ float matmul_row(const float* x, int x_stride, const W* w, int k,
                                            int row, const float* bias, int t0, int tokens,
                                            float* out, int out_stride) {
    constexpr int E = Packed<W>::N;  // weights per 16-byte load
    const int lane = threadIdx.x & 31;
    const W* wr = w + (long long)row * k;
    float acc[TOKENS];
#pragma unroll
    for (int m = 0; m < TOKENS; m++) acc[m] = 0.0f;
    // Rows of whole 16-byte chunks are read E elements per lane per load, 512 bytes per warp;
    // other rows element by element.
    const int vector_k = (k % E == 0) ? k : 0;
    for (int base = lane * E; base < vector_k; base += 32 * E * MATMUL_UNROLL) {
        uint4 wv[MATMUL_UNROLL];
#pragma unroll
        for (int u = 0; u < MATMUL_UNROLL; u++) {
            const int i = base + u * 32 * E;
            wv[u] = i < vector_k ? fd_load_stream(wr + i) : make_uint4(0, 0, 0, 0);
        }
        // The first weights are on their way while the kernel before finishes.
        if (base == lane * E) fd_grid_wait();
#pragma unroll
        for (int u = 0; u < MATMUL_UNROLL; u++) {
            const int i = base + u * 32 * E;
            if (i >= vector_k) continue;
            float wf[E];
            Packed<W>::unpack(wv[u], wf);
#pragma unroll
            for (int m = 0; m < TOKENS; m++) {
                if (m < tokens) {
                    const float* xr = x + (long long)(t0 + m) * x_stride + i;
                    float xv[E];
                    if (X_ALIGNED) {
#pragma unroll
                        for (int j = 0; j < E; j += 4) {
                            const float4 a = *reinterpret_cast<const float4*>(xr + j);
                            xv[j] = a.x; xv[j + 1] = a.y; xv[j + 2] = a.z; xv[j + 3] = a.w;
                        }
                    } else {
#pragma unroll
                        for (int j = 0; j < E; j++) xv[j] = xr[j];
                    }
#pragma unroll
                    for (int j = 0; j < E; j++) acc[m] += wf[j] * xv[j];
                }
            }
        }
    }
    fd_grid_wait();  // returns at once when the loop above waited
    for (int i = vector_k + lane; i < k; i += 32) {
        const float wv = fd_load(wr + i);
#pragma unroll
        for (int m = 0; m < TOKENS; m++) {
            if (m < tokens) acc[m] += wv * x[(long long)(t0 + m) * x_stride + i];
        }
    }
    if constexpr (!WRITE) {
        static_assert(TOKENS == 1, "a decode fold serves one token");
        return fd_warp_sum(acc[0]);
    }
#pragma unroll
    for (int m = 0; m < TOKENS; m++) {
        const float sum = fd_warp_sum(acc[m]);
        if (lane == 0 && m < tokens) {
            out[(long long)(t0 + m) * out_stride + row] = sum + (bias ? bias[row] : 0.0f);
        }
    }
    return 0.0f;
}

template <typename W>
__device__ void matmul(const float* x, int x_stride, const W* w, int k, int n, const float* bias,
                       int t, float* out, int out_stride) {
    const int row = blockIdx.x * MATMUL_WARPS + (threadIdx.x >> 5);
    const int t0 = blockIdx.y * MATMUL_TOKENS;
    if (row >= n) return;
    const int tokens = min(MATMUL_TOKENS, t - t0);
    // Activation rows read as float4 when every row start is 16-byte aligned: scalar reads at a
    // lane stride of 16 or 32 bytes cost several L1 wavefronts each and bound the kernel.
    const bool aligned = ((unsigned long long)x % 16 == 0) && (x_stride % 4 == 0);
    const int many = MATMUL_TOKENS;
    if (tokens == 1 && aligned) {
        matmul_row<W, 1, true>(x, x_stride, w, k, row, bias, t0, 1, out, out_stride);
    } else if (tokens == 1) {
        matmul_row<W, 1, false>(x, x_stride, w, k, row, bias, t0, 1, out, out_stride);
    } else if (aligned) {
        matmul_row<W, many, true>(x, x_stride, w, k, row, bias, t0, tokens, out, out_stride);
    } else {
        matmul_row<W, many, false>(x, x_stride, w, k, row, bias, t0, tokens, out, out_stride);
    }
}

// A pass of one token (a decode step of one sequence): a kernel of its own, whose registers are
// its path's alone (measured: 5 to 6% faster on the narrow 8B shapes, docs/PERF.md).
template <typename W>
__device__ void matmul_one(const float* x, int x_stride, const W* w, int k, int n,
                           const float* bias, float* out, int out_stride) {
    const int row = blockIdx.x * MATMUL_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    if ((unsigned long long)x % 16 == 0) {
        matmul_row<W, 1, true>(x, x_stride, w, k, row, bias, 0, 1, out, out_stride);
    } else {
        matmul_row<W, 1, false>(x, x_stride, w, k, row, bias, 0, 1, out, out_stride);
    }
}

// Grid: (ceil(n / MATMUL_WARPS), ceil(t / MATMUL_TOKENS)); block: 32 * MATMUL_WARPS threads.
// The `_one` kernels take the same arguments for t = 1.
extern "C" __global__ void matmul_f32(const float* x, int x_stride, const float* w, int k, int n,
                                      const float* bias, int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_bf16(const float* x, int x_stride, const fd_bf16* w, int k, int n,
                                       const float* bias, int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_f16(const float* x, int x_stride, const fd_f16* w, int k, int n,
                                      const float* bias, int t, float* out, int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_f32_one(const float* x, int x_stride, const float* w, int k,
                                          int n, const float* bias, int t, float* out,
                                          int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul_one(x, x_stride, w, k, n, bias, out, out_stride);
}
extern "C" __global__ void matmul_bf16_one(const float* x, int x_stride, const fd_bf16* w, int k,
                                          int n, const float* bias, int t, float* out,
                                          int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul_one(x, x_stride, w, k, n, bias, out, out_stride);
}
extern "C" __global__ void matmul_f16_one(const float* x, int x_stride, const fd_f16* w, int k,
                                          int n, const float* bias, int t, float* out,
                                          int out_stride) {
    fd_grid_start();  // waits after its first weight loads
    matmul_one(x, x_stride, w, k, n, bias, out, out_stride);
}

// Decode folds (`FdFold` in common.cuh): the `_one` kernel's arguments, then the fold's. Every
// warp of a block takes part in the block's sums, so a warp past the last row recomputes that
// row and writes nothing.
template <typename W, int FOLD>
__device__ void matmul_one_fold(const float* x, int x_stride, const W* w, int k, int n,
                                const float* bias, float* out, const FdFold& fold) {
    const int row = blockIdx.x * MATMUL_WARPS + (threadIdx.x >> 5);
    const bool holds = (threadIdx.x & 31) == 0 && row < n;
    const int r = min(row, n - 1);  // only a row that exists is read
    const float v = (unsigned long long)x % 16 == 0
                        ? matmul_row<W, 1, true, false>(x, x_stride, w, k, r, bias, 0, 1, out, 0)
                        : matmul_row<W, 1, false, false>(x, x_stride, w, k, r, bias, 0, 1, out, 0);
    fd_fold_epilogue<FOLD>(holds, row, v, bias ? bias[r] : 0.0f, out, fold);
}

#define FD_MATMUL_FOLDS(NAME, W)                                                                  \
    extern "C" __global__ void NAME##_add_norm(                                                   \
        const float* x, int x_stride, const W* w, int k, int n, const float* bias, int t,         \
        float* out, int out_stride, const float* residual, const float* norm_w, float* sum_out,   \
        float* normed_out, float* partials) {                                                     \
        fd_grid_start();                                                                          \
        FdFold f{};                                                                               \
        f.residual = residual; f.norm_w = norm_w; f.sum_out = sum_out;                            \
        f.normed_out = normed_out; f.partials_out = partials;                                     \
        matmul_one_fold<W, FD_FOLD_ADD_NORM>(x, x_stride, w, k, n, bias, out, f);                 \
    }                                                                                             \
    extern "C" __global__ void NAME##_rms(                                                        \
        const float* x, int x_stride, const W* w, int k, int n, const float* bias, int t,         \
        float* out, int out_stride, const float* partials, int n_partials, int cols, float eps) { \
        fd_grid_start();                                                                          \
        FdFold f{};                                                                               \
        f.partials_in = partials; f.n_partials = n_partials; f.cols = cols; f.eps = eps;          \
        matmul_one_fold<W, FD_FOLD_RMS>(x, x_stride, w, k, n, bias, out, f);                      \
    }
FD_MATMUL_FOLDS(matmul_f32_one, float)
FD_MATMUL_FOLDS(matmul_bf16_one, fd_bf16)
FD_MATMUL_FOLDS(matmul_f16_one, fd_f16)

// The input of a tensor-core GEMM (cuBLAS, for prefill and large batches): x's rows (f32, at
// `x_stride`) rounded to nearest-even 16-bit floats, [t, k] contiguous. The GEMM then reads each
// weight once per tile of tokens where the warp-per-row kernel above reads it once per
// MATMUL_TOKENS tokens and multiplies on the FMA units.
// Grid: (ceil(k / 256), t); block: 256.
template <bool BF16>
__device__ __forceinline__ void gemm_input(const float* x, int x_stride, int k,
                                           unsigned short* out) {
    const int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) return;
    const float v = x[(long long)r * x_stride + c];
    out[(long long)r * k + c] = BF16 ? fd_f32_bf16(v) : fd_f32_f16(v);
}
extern "C" __global__ void gemm_input_bf16(const float* x, int x_stride, int k,
                                           unsigned short* out) {
    fd_grid_start();
    fd_grid_wait();
    gemm_input<true>(x, x_stride, k, out);
}
extern "C" __global__ void gemm_input_f16(const float* x, int x_stride, int k,
                                          unsigned short* out) {
    fd_grid_start();
    fd_grid_wait();
    gemm_input<false>(x, x_stride, k, out);
}
