// out[t, n] = sum_k x[t, k] * w[n, k] (+ bias[n]), f32 accumulation; w row-major [N, K] in f32,
// bf16 or f16. The CUDA twin of `kernels::cpu::matmul`.
//
// One warp per weight row and block of MATMUL_TOKENS token rows: the lanes stride over k, so a
// warp reads its weight row once per token block, coalesced, and reduces with shuffles. This is
// the small-batch (decode) shape; large batches will go to cuBLAS.

#define MATMUL_WARPS 8
#define MATMUL_TOKENS 4
#define MATMUL_UNROLL 4

template <typename W>
__device__ void matmul(const float* x, int x_stride, const W* w, int k, int n, const float* bias,
                       int t, float* out, int out_stride) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * MATMUL_WARPS + (threadIdx.x >> 5);
    const int t0 = blockIdx.y * MATMUL_TOKENS;
    if (row >= n) return;
    const int tokens = min(MATMUL_TOKENS, t - t0);
    const W* wr = w + (long long)row * k;
    float acc[MATMUL_TOKENS];
#pragma unroll
    for (int m = 0; m < MATMUL_TOKENS; m++) acc[m] = 0.0f;
    // Rows of whole 16-byte chunks (k a multiple of 8) are read 8 elements per lane at a time,
    // 512 bytes per warp for 16-bit weights; other rows element by element.
    // MATMUL_UNROLL loads per lane are issued before their first use, so that enough bytes are
    // in flight to cover memory latency even when few warps share an SM (narrow matrices).
    const int vector_k = (k % 8 == 0) ? k : 0;
    // Activation rows read as float4 pairs when every row start is 16-byte aligned: scalar reads
    // at a lane stride of 32 bytes cost eight L1 wavefronts each and bound the kernel.
    const bool x_aligned = ((unsigned long long)x % 16 == 0) && (x_stride % 4 == 0);
    for (int base = lane * 8; base < vector_k; base += 32 * 8 * MATMUL_UNROLL) {
        float wv[MATMUL_UNROLL][8];
#pragma unroll
        for (int u = 0; u < MATMUL_UNROLL; u++) {
            const int i = base + u * 32 * 8;
            if (i < vector_k) {
                fd_load8(wr + i, wv[u]);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) wv[u][j] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < MATMUL_UNROLL; u++) {
            const int i = base + u * 32 * 8;
            if (i >= vector_k) break;
#pragma unroll
            for (int m = 0; m < MATMUL_TOKENS; m++) {
                if (m < tokens) {
                    const float* xr = x + (long long)(t0 + m) * x_stride + i;
                    float xv[8];
                    if (x_aligned) {
                        fd_load8(xr, xv);
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; j++) xv[j] = xr[j];
                    }
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[m] += wv[u][j] * xv[j];
                }
            }
        }
    }
    for (int i = vector_k + lane; i < k; i += 32) {
        const float wv = fd_load(wr + i);
#pragma unroll
        for (int m = 0; m < MATMUL_TOKENS; m++) {
            if (m < tokens) acc[m] += wv * x[(long long)(t0 + m) * x_stride + i];
        }
    }
#pragma unroll
    for (int m = 0; m < MATMUL_TOKENS; m++) {
        const float sum = fd_warp_sum(acc[m]);
        if (lane == 0 && m < tokens) {
            out[(long long)(t0 + m) * out_stride + row] = sum + (bias ? bias[row] : 0.0f);
        }
    }
}

// Grid: (ceil(n / MATMUL_WARPS), ceil(t / MATMUL_TOKENS)); block: 32 * MATMUL_WARPS threads.
extern "C" __global__ void matmul_f32(const float* x, int x_stride, const float* w, int k, int n,
                                      const float* bias, int t, float* out, int out_stride) {
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_bf16(const float* x, int x_stride, const fd_bf16* w, int k, int n,
                                       const float* bias, int t, float* out, int out_stride) {
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
extern "C" __global__ void matmul_f16(const float* x, int x_stride, const fd_f16* w, int k, int n,
                                      const float* bias, int t, float* out, int out_stride) {
    matmul(x, x_stride, w, k, n, bias, t, out, out_stride);
}
