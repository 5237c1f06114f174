// bench.cuh: what the standalone CUDA benchmarks of this folder share: the module's sources,
// included as NVRTC gets them (they need no header beyond what nvcc includes), an error check,
// the hash their fill kernels draw random weights from, and the lane iteration and the panel's
// final sums their variants of the single-token 4-bit loop run.
#pragma once

#include "../common.cuh"
#include "../matmul.cu"
#include "../quant.cu"

#define CK(call)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__,   \
                    __LINE__, cudaGetErrorString(e_));                                        \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// splitmix64's finalizer.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// One iteration of a lane in the module's single-token 4-bit loop (`qmatmul<4, false, 4, 1, true>`
// on symmetric groups): its QPIECES 16-byte pieces of codes `c` for the k from `xr` on (16-byte
// aligned), its group's scales `sv`, into `acc`, with the module's arithmetic in the module's
// order, so a variant that only changes how the codes arrive matches it bit for bit.
__device__ __forceinline__ void bench_q4_iteration(const uint4* c, uint4 sv, const float* xr,
                                                   float acc[QPANEL]) {
    using L = QLayout<4>;
    constexpr int LANE_K = QPIECES * L::KL;
    const float offset = 8.0f;
    float xv[1][16];
    float xs = 0.0f;
#pragma unroll
    for (int j = 0; j < LANE_K; j += 4) {
        const float4 a = *reinterpret_cast<const float4*>(xr + j);
        xv[0][j] = a.x; xv[0][j + 1] = a.y; xv[0][j + 2] = a.z; xv[0][j + 3] = a.w;
    }
#pragma unroll
    for (int j = 0; j < LANE_K; j++) xs += xv[0][j];
    float gs[1][QPANEL];
#pragma unroll
    for (int r = 0; r < QPANEL; r++) gs[0][r] = 0.0f;
#pragma unroll
    for (int u = 0; u < QPIECES; u++) fd_qpiece<4, false, 1>(c[u], xv, u * L::KL, gs);
    float s[QPANEL], mn[QPANEL];
    fd_unpack8(sv, s, false);
#pragma unroll
    for (int r = 0; r < QPANEL; r++) mn[r] = -offset * s[r];
#pragma unroll
    for (int r = 0; r < QPANEL; r++) acc[r] += s[r] * gs[0][r] + mn[r] * xs;
}

// The end of a block's panel in those variants, as the module's loop ends: each warp's sums of
// its lanes' `acc`, then the first QPANEL threads add the warps' sums in warp order and write
// the panel's rows. `reduced` is the block's shared [QMATMUL_WARPS][QPANEL].
__device__ __forceinline__ void bench_panel_store(const float acc[QPANEL],
                                                  float (*reduced)[QPANEL], int panel, int n,
                                                  float* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
#pragma unroll
    for (int r = 0; r < QPANEL; r++) {
        const float sum = fd_warp_sum(acc[r]);
        if (lane == 0) reduced[warp][r] = sum;
    }
    __syncthreads();
    if (tid < QPANEL) {
        const int row = panel * QPANEL + tid;
        if (row < n) {
            float v = 0.0f;
            for (int w = 0; w < QMATMUL_WARPS; w++) v += reduced[w][tid];
            out[row] = v;
        }
    }
}
