// splitk_bench.cu: does splitting K make the narrow W4A16 single-token matmuls stream faster?
// (docs/PERF.md, "A persistent W4A16 decode chain", and RESULTS.md beside this file: the pipelined
// loop lost; the reading left was that the narrow shapes have too few panels of 8 rows to fill
// the machine: 512 to 768 blocks against 924 block slots, each block's work two iterations.)
//
// Standalone, like decode_chain_bench.cu: the module's quant.cu included unchanged. For each
// Llama-3-8B shape (QKV 4096 -> 6144, O 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096),
// 32 instances with their own random weights (so every launch streams from DRAM) in one CUDA
// graph, time per launch:
//   A   the module's matmul_q4_one, grid ceil(N / 8), as the runtime launches it;
//   S   split-K in S = 2, 4, 8 slices: the weight stored as S matrices of N x K/S in the module's
//       panel layout (a layout fdc could emit), one launch of grid (ceil(N / 8), S) in which
//       block (p, s) runs the module's own per-panel loop (`qmatmul`, unchanged) on panel p of
//       slice s into partial row s, then a second small kernel sums the S partial rows.
// Checked: each S's output against A's within 2e-6 of the largest value (the sums are formed in
// another order, so not bit for bit).
//
// Run on the GPU machine from the repository root:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/splitk kernels/cuda/experiments/splitk_bench.cu && /tmp/splitk

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

// The module's sources, CK and mix64.
#include "bench.cuh"

constexpr int INSTANCES = 32;
constexpr int GROUP = 128;

// Codes 1..15 (zero mean around 8), scales around s0: the values of the matrix as a whole,
// whichever layout stores them, come from the element's (row, k) so both layouts hold one matrix.
__global__ void fill(unsigned char* codes, fd_f16* scales, int n, int k, int slices,
                     unsigned long long seed, float s0) {
    const int ks = k / slices;
    const long long total = (long long)n * k;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int row = (int)(e / k), kk = (int)(e % k);
        const unsigned code = 1u + (unsigned)(mix64(seed ^ (unsigned long long)e) % 15u);
        // Slice s = kk / ks holds columns [s*ks, (s+1)*ks) as an N x ks matrix in panels of 8:
        // per panel, for each k the 8 rows' codes in 4 bytes, bits [j*4, j*4+4) of byte b are
        // row j*4 + b (QLayout<4>: BPK = 4 bytes per k, C = 2 codes per byte).
        const int s = kk / ks, kl = kk % ks, panel = row / QPANEL, r = row % QPANEL;
        unsigned char* base = codes + (long long)s * n * ks / 2;
        unsigned char* byte = base + ((long long)panel * ks + kl) * 4 + (r % 4);
        const int shift = (r / 4) * 4;
        atomicOr(reinterpret_cast<unsigned*>((unsigned long long)byte & ~3ull),
                 (code << shift) << (8 * ((unsigned long long)byte & 3ull)));
        if (kl % GROUP == 0) {
            const int groups = ks / GROUP, g = kl / GROUP;
            const float u = 0.5f + (float)(mix64(seed * 31 + (unsigned long long)(row * 977 + kk / GROUP)) >> 40) *
                                       (1.0f / 16777216.0f);
            fd_f16* sb = scales + (long long)s * n * groups;
            sb[((long long)panel * groups + g) * QPANEL + r].bits = __half_as_ushort(__float2half_rn(s0 * u));
        }
    }
}

// Block (p, s): the module's single-token loop on panel p of slice s, into partial row s.
extern "C" __global__ void matmul_q4_split(const float* x, const unsigned char* codes,
                                           const fd_f16* scales, int k_slice, int n, int group,
                                           float* part) {
    const int s = blockIdx.y;
    const long long slice_codes = (long long)n * k_slice / 2;
    const long long slice_scales = (long long)n * (k_slice / group);
    qmatmul<4, false, QMATMUL_WARPS, 1, true>(x + (long long)s * k_slice, 0,
                                              codes + s * slice_codes, k_slice, n, group,
                                              scales + s * slice_scales, nullptr, nullptr,
                                              nullptr, 0, 1, part + (long long)s * n, 0);
}

extern "C" __global__ void sum_slices(const float* part, int n, int slices, float* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = 0.0f;
    for (int s = 0; s < slices; s++) v += part[(long long)s * n + i];
    out[i] = v;
}

struct Shape {
    const char* name;
    int k, n;
};

int main() {
    CK(cudaSetDevice(0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    cudaStream_t stream;
    CK(cudaStreamCreate(&stream));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    // Copy bandwidth, for the % column.
    double copy_tbs;
    {
        const size_t bytes = 1ull << 30;
        void *a, *b;
        CK(cudaMalloc(&a, bytes));
        CK(cudaMalloc(&b, bytes));
        CK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e0, stream));
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
        CK(cudaEventRecord(e1, stream));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        copy_tbs = 2.0 * bytes / (ms * 1e-3) / 1e12;
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    printf("copy: %.3f TB/s (read + written)\n\n", copy_tbs);
    const Shape shapes[] = {{"qkv", 4096, 6144}, {"o", 4096, 4096}, {"gate_up", 4096, 28672},
                            {"down", 14336, 4096}};
    const int splits[] = {1, 2, 4, 8};
    printf("| shape | A us (%% copy) | S=2 us | S=4 us | S=8 us | check (S=2,4,8 vs A) |\n|---|---|---|---|---|---|\n");
    for (const Shape& sh : shapes) {
        const double bytes = (double)sh.n * sh.k / 2 + (double)sh.n * (sh.k / GROUP) * 2;
        float* x;
        CK(cudaMalloc(&x, sh.k * 4));
        {
            std::vector<float> hx(sh.k);
            for (int i = 0; i < sh.k; i++) hx[i] = std::sin(0.37f * i) * 0.8f;
            CK(cudaMemcpy(x, hx.data(), sh.k * 4, cudaMemcpyHostToDevice));
        }
        std::vector<float> ref;
        double us[4] = {0, 0, 0, 0};
        double err[4] = {0, 0, 0, 0};
        for (int si = 0; si < 4; si++) {
            const int S = splits[si];
            if (sh.k % (S * GROUP) != 0) {
                us[si] = -1;
                continue;
            }
            const int ks = sh.k / S;
            std::vector<unsigned char*> codes(INSTANCES);
            std::vector<fd_f16*> scales(INSTANCES);
            std::vector<float*> outs(INSTANCES), parts(INSTANCES);
            const float s0 = 1.0f / std::sqrt(18.7f * sh.k);
            for (int m = 0; m < INSTANCES; m++) {
                CK(cudaMalloc(&codes[m], (size_t)sh.n * sh.k / 2));
                CK(cudaMemset(codes[m], 0, (size_t)sh.n * sh.k / 2));
                CK(cudaMalloc(&scales[m], (size_t)sh.n * (sh.k / GROUP) * 2));
                CK(cudaMalloc(&outs[m], sh.n * 4));
                CK(cudaMalloc(&parts[m], (size_t)S * sh.n * 4));
                fill<<<4 * prop.multiProcessorCount, 256>>>(codes[m], scales[m], sh.n, sh.k, S,
                                                            1000 + m, s0);
            }
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            const int panels = sh.n / QPANEL;
            cudaGraph_t g;
            CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            for (int m = 0; m < INSTANCES; m++) {
                if (S == 1) {
                    matmul_q4_one<<<panels, 128, 0, stream>>>(x, 0, codes[m], sh.k, sh.n, GROUP,
                                                               scales[m], nullptr, nullptr, nullptr,
                                                               1, outs[m], 0);
                } else {
                    matmul_q4_split<<<dim3(panels, S), 128, 0, stream>>>(x, codes[m], scales[m],
                                                                          ks, sh.n, GROUP, parts[m]);
                    sum_slices<<<(sh.n + 255) / 256, 256, 0, stream>>>(parts[m], sh.n, S, outs[m]);
                }
            }
            CK(cudaStreamEndCapture(stream, &g));
            cudaGraphExec_t ge;
            CK(cudaGraphInstantiate(&ge, g, 0));
            std::vector<float> t;
            for (int rep = 0; rep < 11; rep++) {
                CK(cudaEventRecord(e0, stream));
                CK(cudaGraphLaunch(ge, stream));
                CK(cudaEventRecord(e1, stream));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                if (rep >= 2) t.push_back(ms);
            }
            std::sort(t.begin(), t.end());
            us[si] = 1e3 * t[t.size() / 2] / INSTANCES;
            std::vector<float> got(sh.n);
            CK(cudaMemcpy(got.data(), outs[0], sh.n * 4, cudaMemcpyDeviceToHost));
            if (S == 1) {
                ref = got;
            } else {
                double mx = 0, d = 0;
                for (int i = 0; i < sh.n; i++) {
                    mx = std::max(mx, (double)std::fabs(ref[i]));
                    d = std::max(d, (double)std::fabs(got[i] - ref[i]));
                }
                err[si] = d / mx;
            }
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
            for (int m = 0; m < INSTANCES; m++) {
                CK(cudaFree(codes[m]));
                CK(cudaFree(scales[m]));
                CK(cudaFree(outs[m]));
                CK(cudaFree(parts[m]));
            }
        }
        auto pct = [&](double u) { return 100.0 * bytes / (u * 1e-6) / 1e12 / copy_tbs; };
        printf("| %s | %.2f (%.0f%%) |", sh.name, us[0], pct(us[0]));
        for (int si = 1; si < 4; si++) {
            if (us[si] < 0) printf(" n/a |");
            else printf(" %.2f (%.0f%%) |", us[si], pct(us[si]));
        }
        bool ok = true;
        for (int si = 1; si < 4; si++) ok = ok && (us[si] < 0 || err[si] <= 2e-6);
        printf(" %s %.1e %.1e %.1e |\n", ok ? "ok" : "FAIL", err[1], err[2], err[3]);
        fflush(stdout);
        CK(cudaFree(x));
    }
    return 0;
}
