// narrow_matmul_bench.cu: can the narrow W4A16 single-token matmuls of a decode step stream
// faster than the module's `matmul_q4_one`? (docs/PERF.md, "A persistent W4A16 decode chain",
// and RESULTS.md beside this file: the pipelined loop lost; the narrow shapes' kernels spend about
// 4 us of QKV's 8.2 in ramp and drain against 4.3 us of streaming at copy speed.)
//
// Standalone, like decode_chain_bench.cu: the module's quant.cu included unchanged. For each
// Llama-3-8B shape (QKV 4096 -> 6144, O 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096),
// 32 instances with their own random weights (so every launch streams from DRAM) in one CUDA
// graph, time per launch:
//   A   the module's matmul_q4_one, grid ceil(N / 8), as the runtime launches it;
//   S   split-K in S = 2, 4, 8 slices: the weight stored as S matrices of N x K/S in the module's
//       panel layout (a layout fdc could emit), one launch of grid (ceil(N / 8), S) in which
//       block (p, s) runs the module's own per-panel loop (`qmatmul`, unchanged) on panel p of
//       slice s into partial row s, then a second small kernel sums the S partial rows;
//   R   a ring of D = 2, 3, 4, 6 stages in shared memory per lane: the module's loop and
//       arithmetic, but each lane requests its codes and scales with `cp.async` D iterations
//       ahead into its own slots (no register held by a load in flight, so loads in flight
//       cost no occupancy; for K = 4096 a lane's whole share of the panel is requested at once),
//       refilling a slot once its values are used.
//   T   the panel's codes brought into shared memory by the copy engine (Hopper's bulk copy,
//       `cp.async.bulk` completing on an mbarrier): one thread requests the block's next DEPTH
//       steps of 4 KB (a step is what the block's 128 lanes read in one iteration of the
//       module's loop) and the panel's scales whole; every lane then runs the module's
//       arithmetic on the step from shared memory, in the module's order. One request per
//       4 KB instead of one per 16 bytes, and no register or lane holds a load in flight.
//   V   A's loop with U = 2, 4, 8 iterations of a lane's codes requested at once (U = 4: for
//       K = 4096 the lane's whole share of the panel, one round trip where A makes two), the
//       panel's scales staged in shared memory by the block first, so that only codes wait in
//       registers (80 registers at U = 4: 6 blocks per SM, room for QKV's 768 panels at once).
//   M   tensor cores (`mma.m16n8k16`, f16 inputs, f32 accumulators): a 16-row tile per block,
//       the codes in a layout of their own (`fill_tiles`) unpacked exactly to f16 by `lop3`,
//       the token split into two f16 halves (RESULTS.md: `split_x_precision.py`) as the mma's
//       first two columns; 4 or 8 warps per block splitting the groups of K.
//   Q   the module's tensor-core kernel as the plan runs it (`matmul_q4t_one`, 16 warps per tile,
//       or `qmatmul_tiles` at 8 warps): M's tiles and arithmetic, but with bf16 products and the
//       activations split into three bf16 pieces by each warp itself, through shared memory,
//       from the f32 token (M reads two f16 halves split beforehand by a kernel of its own).
//       Q against M in one run says what the in-kernel split costs.
//   P   no matmul, the floor: one launch that only reads the same bytes. P1: block p reads panel
//       p's codes and scales (grid and block as A), every thread's 8 loads issued before any is
//       used; P2: the classic bandwidth kernel, 4 blocks of 512 threads per SM striding over
//       the codes and scales, 4 loads in flight per thread. Each folds what it read into one
//       word per block (an xor), so nothing is computed but nothing is skipped either.
// Checked: each S's output against A's within 2e-6 of the largest value (the sums are formed in
// another order, so not bit for bit); each R's, T's and V's bit for bit (the same sums in the same order);
// M's within 2e-6 (its own order and arithmetic).
//
// Run on the GPU machine from the repository root:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/narrow kernels/cuda/experiments/narrow_matmul_bench.cu && /tmp/narrow

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


__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool through_l1) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    if (through_l1) {
        // The scales: the 16 lanes of a group of 128 read the same 16 bytes.
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
    } else {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
    }
}

// R: `qmatmul<4, false, 4, 1, true>` (symmetric groups, one token) with each lane's loads
// requested D iterations ahead by cp.async into its own ring slots.
template <int D>
__global__ void __launch_bounds__(128) matmul_q4_ring(const float* x, const unsigned char* codes,
                                                      int k, int n, int group,
                                                      const fd_f16* scales, float* out) {
    using L = QLayout<4>;
    // [stage][two code pieces, the scales][thread]: a thread's 16 bytes beside its neighbours'.
    __shared__ uint4 ring[D][3][128];
    __shared__ float reduced[QMATMUL_WARPS][QPANEL];
    fd_grid_start();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int panel = blockIdx.x;
    const int groups = k / group;
    const unsigned char* pc = codes + (long long)panel * k * L::BPK;
    const fd_f16* ps = scales + (long long)panel * groups * QPANEL;
    const int pieces = k / L::KL;
    constexpr int STEP = QMATMUL_WARPS * 32 * QPIECES;
    const int first = warp * 32 * QPIECES + lane * QPIECES;
    const int iters = first < pieces ? (pieces - first + STEP - 1) / STEP : 0;
    auto issue = [&](int i) {
        const int j0 = first + i * STEP;
        cp_async16(&ring[i % D][0][tid], pc + (long long)j0 * 16, false);
        cp_async16(&ring[i % D][1][tid], pc + (long long)(j0 + 1) * 16, false);
        cp_async16(&ring[i % D][2][tid], ps + (j0 * L::KL / group) * QPANEL, true);
    };
#pragma unroll
    for (int s = 0; s < D; s++) {
        if (s < iters) issue(s);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    fd_grid_wait();
    float acc[QPANEL];
#pragma unroll
    for (int r = 0; r < QPANEL; r++) acc[r] = 0.0f;
    for (int i = 0; i < iters; i++) {
        // Groups committed: D + i; stage i is the (i+1)th.
        asm volatile("cp.async.wait_group %0;" ::"n"(D - 1) : "memory");
        const uint4 c0 = ring[i % D][0][tid], c1 = ring[i % D][1][tid], sv = ring[i % D][2][tid];
        const uint4 c[QPIECES] = {c0, c1};
        bench_q4_iteration(c, sv, x + (first + i * STEP) * L::KL, acc);
        // The slot's values are used (read into registers above and consumed): refill it.
        if (i + D < iters) issue(i + D);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    bench_panel_store(acc, reduced, panel, n, out);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` to shared `dst`
// by the copy engine; `bar` completes its phase when they have landed.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes,
                                          unsigned long long* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
}

constexpr int T_STEP_BYTES = QMATMUL_WARPS * 32 * QPIECES * 16;  // 4 KB
constexpr int T_MAX_SCALE_BYTES = 2048;                          // K / 128 groups x 16 bytes

// T: `qmatmul<4, false, 4, 1, true>` (symmetric groups, one token) with the panel brought into
// shared memory DEPTH steps ahead by bulk copies.
template <int DEPTH>
__global__ void __launch_bounds__(128) matmul_q4_bulk(const float* x, const unsigned char* codes,
                                                      int k, int n, int group,
                                                      const fd_f16* scales, float* out) {
    using L = QLayout<4>;
    __shared__ __align__(128) uint4 stage[DEPTH][T_STEP_BYTES / 16];
    __shared__ __align__(128) uint4 sc[T_MAX_SCALE_BYTES / 16];
    __shared__ __align__(8) unsigned long long full[DEPTH];
    __shared__ __align__(8) unsigned long long sc_full;
    __shared__ float reduced[QMATMUL_WARPS][QPANEL];
    fd_grid_start();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int panel = blockIdx.x;
    const int groups = k / group;
    const unsigned char* pc = codes + (long long)panel * k * L::BPK;
    const fd_f16* ps = scales + (long long)panel * groups * QPANEL;
    const int pieces = k / L::KL;
    constexpr int STEP = QMATMUL_WARPS * 32 * QPIECES;
    const int steps = (pieces + STEP - 1) / STEP;
    const long long panel_bytes = (long long)pieces * 16;
    auto issue = [&](int s) {
        const long long at = (long long)s * T_STEP_BYTES;
        const long long left = panel_bytes - at;
        const unsigned bytes = (unsigned)(left < T_STEP_BYTES ? left : T_STEP_BYTES);
        bulk_load(&stage[s % DEPTH][0], pc + at, bytes, &full[s % DEPTH]);
    };
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < DEPTH; s++) mbar_init(&full[s]);
        mbar_init(&sc_full);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        bulk_load(sc, ps, (unsigned)(groups * QPANEL * 2), &sc_full);
        for (int s = 0; s < DEPTH && s < steps; s++) issue(s);
    }
    __syncthreads();
    fd_grid_wait();
    float acc[QPANEL];
#pragma unroll
    for (int r = 0; r < QPANEL; r++) acc[r] = 0.0f;
    mbar_wait(&sc_full, 0);
    // The lane's pieces inside a step, as the module's loop assigns them.
    const int jl = warp * 32 * QPIECES + lane * QPIECES;
    for (int s = 0; s < steps; s++) {
        mbar_wait(&full[s % DEPTH], (unsigned)((s / DEPTH) & 1));
        const int j0 = s * STEP + jl;
        if (j0 < pieces) {
            const uint4 c0 = stage[s % DEPTH][jl], c1 = stage[s % DEPTH][jl + 1];
            const uint4 sv = sc[j0 * L::KL / group];
            const uint4 c[QPIECES] = {c0, c1};
            bench_q4_iteration(c, sv, x + j0 * L::KL, acc);
        }
        // Every lane has its values of the step in registers: its slot may be refilled.
        __syncthreads();
        if (tid == 0 && s + DEPTH < steps) issue(s + DEPTH);
    }
    bench_panel_store(acc, reduced, panel, n, out);
}

__device__ __forceinline__ unsigned fd_xor4(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__device__ __forceinline__ void fd_store_block_xor(unsigned acc, unsigned* out) {
    __shared__ unsigned warps[32];
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned v = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) v ^= warps[w];
        out[blockIdx.x] = v;
    }
}

// P1: block p reads panel p (4-bit codes: k * 4 bytes, then its k / group x 16 bytes of scales).
__global__ void __launch_bounds__(128) read_panels(const unsigned char* codes, int k,
                                                   const fd_f16* scales, int group,
                                                   unsigned* out) {
    const uint4* pc = reinterpret_cast<const uint4*>(codes + (long long)blockIdx.x * k * 4);
    const uint4* ps = reinterpret_cast<const uint4*>(scales + (long long)blockIdx.x * (k / group) * QPANEL);
    const int pieces = k / 4, spieces = k / group;
    unsigned acc = 0;
    for (int base = threadIdx.x; base < pieces; base += 128 * 8) {
        uint4 v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int j = base + i * 128;
            v[i] = j < pieces ? fd_load_stream(pc + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) acc ^= fd_xor4(v[i]);
    }
    for (int j = threadIdx.x; j < spieces; j += 128) acc ^= fd_xor4(ps[j]);
    fd_store_block_xor(acc, out);
}

// P2: the whole codes array, then the scales, striding over the grid.
__global__ void __launch_bounds__(512) read_stride(const uint4* codes, long long pieces,
                                                   const uint4* scales, long long spieces,
                                                   unsigned* out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    unsigned acc = 0;
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; j + 3 * stride < pieces; j += 4 * stride) {
        uint4 v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = fd_load_stream(codes + j + i * stride);
#pragma unroll
        for (int i = 0; i < 4; i++) acc ^= fd_xor4(v[i]);
    }
    for (; j < pieces; j += stride) acc ^= fd_xor4(fd_load_stream(codes + j));
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < spieces; i += stride)
        acc ^= fd_xor4(scales[i]);
    fd_store_block_xor(acc, out);
}

// V: A's loop with U iterations of a lane's codes requested at once (U = 4: for K = 4096 the
// lane's whole share of the panel), and the panel's scales staged in shared memory by the block
// first, so that only codes are held in registers while they are in flight.
template <int U>
__global__ void __launch_bounds__(128) matmul_q4_wide(const float* x, const unsigned char* codes,
                                                      int k, int n, int group,
                                                      const fd_f16* scales, float* out) {
    using L = QLayout<4>;
    constexpr int MAX_GROUPS = 512;  // K / group of the benchmark's shapes: at most 112
    __shared__ uint4 sc[MAX_GROUPS];
    __shared__ float reduced[QMATMUL_WARPS][QPANEL];
    fd_grid_start();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int panel = blockIdx.x;
    const int groups = k / group;
    const unsigned char* pc = codes + (long long)panel * k * L::BPK;
    const uint4* ps = reinterpret_cast<const uint4*>(scales + (long long)panel * groups * QPANEL);
    const int pieces = k / L::KL;
    constexpr int STEP = QMATMUL_WARPS * 32 * QPIECES;
    float acc[QPANEL];
#pragma unroll
    for (int r = 0; r < QPANEL; r++) acc[r] = 0.0f;
    uint4 c[U][QPIECES];
    auto load_round = [&](int outer) {
#pragma unroll
        for (int v = 0; v < U; v++) {
            const int j0 = outer + v * STEP + lane * QPIECES;
#pragma unroll
            for (int u = 0; u < QPIECES; u++)
                c[v][u] = j0 + u < pieces ? fd_load_stream(pc + (long long)(j0 + u) * 16)
                                          : make_uint4(0, 0, 0, 0);
        }
    };
    int outer = warp * 32 * QPIECES;
    load_round(outer);
    for (int g = tid; g < groups; g += blockDim.x) sc[g] = ps[g];
    __syncthreads();
    fd_grid_wait();
    while (true) {
#pragma unroll
        for (int v = 0; v < U; v++) {
            const int j0 = outer + v * STEP + lane * QPIECES;
            if (j0 >= pieces) continue;
            const int k0 = j0 * L::KL;
            bench_q4_iteration(c[v], sc[k0 / group], x + k0, acc);
        }
        outer += U * STEP;
        if (outer >= pieces) break;
        load_round(outer);
    }
    bench_panel_store(acc, reduced, panel, n, out);
}

// M: tensor cores. A 16-row tile (panels 2T and 2T + 1) per block, groups of K split over the
// block's warps; per 16 k one `mma.m16n8k16` with the weights as A (codes unpacked exactly to
// f16 code - 8) and the token as B: column 0 its high f16 half, column 1 its low half (x scaled by
// a power of two first, so the low half stays normal), the other six zero. The codes are in a
// layout of their own (`fill_tiles`): for each tile and each 64 k, lane L's four mmas' fragments
// in one 16-byte piece, word w for k 16w to 16w + 15 of the 64, nibble j of the word the element
// (row g + 8 (j & 1), k 2t + 8 ((j >> 1) & 1) + (j >> 2)) of the mma, g = L / 4, t = L % 4 (the
// PTX fragment order: register r of A holds rows g, g + 8, g, g + 8 and k 2t, 2t, 2t + 8, 2t + 8,
// each two consecutive k).

// Nibbles 0 and 4 of `w` (mask 0x000f000f) or 1 and 5 (0x00f000f0) as f16x2 of 1024 + v or
// 1024 + 16 v, by one lop3 with the f16 exponent of 1024.
template <unsigned MASK>
__device__ __forceinline__ unsigned fd_nibbles_f16x2(unsigned w) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "n"(MASK), "n"(0x64006400u));
    return r;
}

// The eight codes of `w` as four f16x2 registers of code - 8, exact (in the fragment order).
__device__ __forceinline__ void fd_codes_f16x2(unsigned w, unsigned a[4]) {
    const unsigned lo = 0x64086408u;             // 1032, 1032: 1024 + v - 1032 = v - 8
    const unsigned sixteenth = 0x2c002c00u;      // 1/16
    const unsigned minus72 = 0xd480d480u;        // (1024 + 16 v) / 16 - 72 = v - 8
    const unsigned w2 = w >> 8;
    unsigned p0 = fd_nibbles_f16x2<0x000f000fu>(w), p1 = fd_nibbles_f16x2<0x00f000f0u>(w);
    unsigned p2 = fd_nibbles_f16x2<0x000f000fu>(w2), p3 = fd_nibbles_f16x2<0x00f000f0u>(w2);
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(p0) : "r"(lo));
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(p2) : "r"(lo));
    asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(p1) : "r"(sixteenth), "r"(minus72));
    asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(p3) : "r"(sixteenth), "r"(minus72));
    a[0] = p0;  // nibbles 0, 4: row g, k 2t and 2t + 1
    a[1] = p1;  // nibbles 1, 5: row g + 8
    a[2] = p2;  // nibbles 2, 6: row g, k 2t + 8 and 2t + 9
    a[3] = p3;  // nibbles 3, 7: row g + 8, k 2t + 8 and 2t + 9
}

__device__ __forceinline__ void fd_mma_16816(float d[4], const unsigned a[4], unsigned b0,
                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Writes the codes of the same matrix as `fill` (element e = row * k + kk gets the same code) in
// M's tile layout; `fill` writes the scales, which M reads in the panel layout.
__global__ void fill_tiles(unsigned char* tiles, int n, int k, unsigned long long seed) {
    const long long total = (long long)n * k;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int row = (int)(e / k), kk = (int)(e % k);
        const unsigned code = 1u + (unsigned)(mix64(seed ^ (unsigned long long)e) % 15u);
        const int tile = row / 16, r16 = row % 16, g = r16 % 8, half = r16 / 8;
        const int chunk = kk / 64, w = (kk % 64) / 16, kin = kk % 16;
        const int high8 = kin / 8, t = (kin % 8) / 2, odd = kin % 2;
        const int j = half | (high8 << 1) | (odd << 2), lane = g * 4 + t;
        const long long word = (((long long)tile * (k / 64) + chunk) * 32 + lane) * 4 + w;
        atomicOr(reinterpret_cast<unsigned*>(tiles) + word, code << (4 * j));
    }
}

// x as the two f16 halves the mma takes: hi = f16(x * 2^shift), lo = f16(x * 2^shift - hi).
__global__ void split_x(const float* x, int k, float scale, unsigned short* hi, unsigned short* lo) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= k) return;
    const float v = x[i] * scale;
    const __half h = __float2half_rn(v);
    hi[i] = __half_as_ushort(h);
    lo[i] = __half_as_ushort(__float2half_rn(v - __half2float(h)));
}

// Groups of 128 k: two 64-k pieces of a lane's codes per group (the benchmark's GROUP).
#define MMA_PER_GROUP 2

template <int WARPS, int MMA_AHEAD = 4>
__global__ void __launch_bounds__(WARPS * 32) matmul_q4_mma(const unsigned short* xh,
                                                            const unsigned short* xl,
                                                            float unscale, const uint4* tiles,
                                                            int k, int n, int group,
                                                            const fd_f16* scales, float* out) {
    __shared__ float reduced[WARPS][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x;
    const int chunks = k / 64, groups = k / group;
    const uint4* tc = tiles + (long long)tile * chunks * 32;
    const fd_f16* s0 = scales + (long long)(2 * tile) * groups * QPANEL;
    const fd_f16* s1 = scales + (long long)(2 * tile + 1) * groups * QPANEL;
    // Lanes 0 to 3 give the mma the high halves, 4 to 7 the low ones, the rest zeros.
    const unsigned short* xs = g == 0 ? xh : xl;
    float acc0 = 0.0f, acc1 = 0.0f;  // rows g and g + 8, in lanes with t = 0
    // MMA_AHEAD groups' codes (and scales) requested before any is used: a warp's whole share of
    // a K = 4096 matrix at 8 warps, half of it at 4.
    for (int grp0 = warp; grp0 < groups; grp0 += WARPS * MMA_AHEAD) {
        uint4 q[MMA_AHEAD][MMA_PER_GROUP];
        fd_f16 sc[MMA_AHEAD][2];
#pragma unroll
        for (int a = 0; a < MMA_AHEAD; a++) {
            const int grp = grp0 + a * WARPS;
#pragma unroll
            for (int c = 0; c < MMA_PER_GROUP; c++)
                q[a][c] = grp < groups
                              ? fd_load_stream(tc + (long long)(grp * MMA_PER_GROUP + c) * 32 + lane)
                              : make_uint4(0, 0, 0, 0);
            sc[a][0] = grp < groups && t == 0 ? s0[grp * QPANEL + g] : fd_f16{0};
            sc[a][1] = grp < groups && t == 0 ? s1[grp * QPANEL + g] : fd_f16{0};
        }
#pragma unroll
        for (int a = 0; a < MMA_AHEAD; a++) {
            const int grp = grp0 + a * WARPS;
            if (grp >= groups) break;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int c = 0; c < MMA_PER_GROUP; c++) {
                const unsigned words[4] = {q[a][c].x, q[a][c].y, q[a][c].z, q[a][c].w};
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    const int k0 = (grp * MMA_PER_GROUP + c) * 64 + w * 16;
                    unsigned b0 = 0, b1 = 0;
                    if (g < 2) {
                        b0 = *reinterpret_cast<const unsigned*>(xs + k0 + 2 * t);
                        b1 = *reinterpret_cast<const unsigned*>(xs + k0 + 2 * t + 8);
                    }
                    unsigned am[4];
                    fd_codes_f16x2(words[w], am);
                    fd_mma_16816(d, am, b0, b1);
                }
            }
            if (t == 0) {
                float sc0, sc1;
                asm("cvt.f32.f16 %0, %1;" : "=f"(sc0) : "h"(sc[a][0].bits));
                asm("cvt.f32.f16 %0, %1;" : "=f"(sc1) : "h"(sc[a][1].bits));
                acc0 += sc0 * (d[0] + d[1]);
                acc1 += sc1 * (d[2] + d[3]);
            }
        }
    }
    if (t == 0) {
        reduced[warp][g] = acc0;
        reduced[warp][g + 8] = acc1;
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        const int row = tile * 16 + threadIdx.x;
        if (row < n) {
            float v = 0.0f;
            for (int w = 0; w < WARPS; w++) v += reduced[w][threadIdx.x];
            out[row] = v * unscale;
        }
    }
}

// Q at 8 warps: the module's loop (`qmatmul_tiles`) in a block of 256 threads.
__global__ void __launch_bounds__(256) matmul_q4t_one_w8(const float* x, const unsigned char* codes,
                                                         int k, int n, int group,
                                                         const fd_f16* scales, float* out) {
    qmatmul_tiles<8, 1>(x, 0, reinterpret_cast<const uint4*>(codes), k, n, group, scales,
                        nullptr, 0, 1, out, 0);
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
    // {split S, ring depth D, bulk depth B}: A first, then split-K, a ring, the bulk copies.
    // (S = 4, 8 and rings of 3 to 6 lost on every shape: RESULTS.md.)
    // {split S, ring depth D, bulk depth B, plain read P}. (S = 2 to 8, rings of 2 to 6 and bulk
    // depths 4 and 8 lost on every shape: RESULTS.md.)
    // {split S, ring depth D, bulk depth B, plain read P, wide rounds U, mma warps W}. (V at
    // U = 2, 4, 8 lost on every shape: RESULTS.md.)
    // {..., mma warps W, groups a warp requests at once (M's AHEAD)}. (M at W = 4 lost on every
    // shape but gate_up: RESULTS.md.)
    // {..., mma warps W, M's AHEAD, the module's tile kernel at Q warps}. (M at W = 8, and at
    // W = 16 with AHEAD 4, lost to W = 16 AHEAD 2 on most shapes: RESULTS.md.)
    constexpr int VARIANTS = 5;
    const int variants[VARIANTS][8] = {{1, 0, 0, 0, 0, 0, 0, 0},  {1, 0, 0, 0, 0, 16, 2, 0},
                                       {1, 0, 0, 0, 0, 0, 0, 16}, {1, 0, 0, 0, 0, 0, 0, 8},
                                       {1, 0, 0, 1, 0, 0, 0, 0}};
    printf("| shape | A us (%% copy) | M W=16 a2 us | Q W=16 us | Q W=8 us | P1 us | check (max relative difference from A) |\n"
           "|---|---|---|---|---|---|---|\n");
    for (const Shape& sh : shapes) {
        const double bytes = (double)sh.n * sh.k / 2 + (double)sh.n * (sh.k / GROUP) * 2;
        float* x;
        CK(cudaMalloc(&x, sh.k * 4));
        {
            std::vector<float> hx(sh.k);
            for (int i = 0; i < sh.k; i++) hx[i] = std::sin(0.37f * i) * 0.8f;
            CK(cudaMemcpy(x, hx.data(), sh.k * 4, cudaMemcpyHostToDevice));
        }
        // The token as M takes it: two f16 halves of x scaled by a power of two that puts
        // max |x| near 2^14 (exact), undone on the output.
        unsigned short *xh, *xl;
        CK(cudaMalloc(&xh, sh.k * 2));
        CK(cudaMalloc(&xl, sh.k * 2));
        float unscale;
        {
            std::vector<float> hx(sh.k);
            CK(cudaMemcpy(hx.data(), x, sh.k * 4, cudaMemcpyDeviceToHost));
            float top = 0.0f;
            for (float v : hx) top = std::max(top, std::fabs(v));
            int e;
            std::frexp(top, &e);
            const float scale = std::ldexp(1.0f, 14 - e);
            unscale = 1.0f / scale;
            split_x<<<(sh.k + 255) / 256, 256>>>(x, sh.k, scale, xh, xl);
            CK(cudaGetLastError());
        }
        std::vector<float> ref;
        double us[VARIANTS] = {};
        double err[VARIANTS] = {};
        for (int si = 0; si < VARIANTS; si++) {
            const int S = variants[si][0], D = variants[si][1], B = variants[si][2],
                      P = variants[si][3], U = variants[si][4], W = variants[si][5],
                      AH = variants[si][6], Q = variants[si][7];
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
                // Room for the plain reads' word per block too.
                CK(cudaMalloc(&outs[m], std::max(sh.n, 4 * prop.multiProcessorCount) * 4));
                CK(cudaMalloc(&parts[m], (size_t)S * sh.n * 4));
                fill<<<4 * prop.multiProcessorCount, 256>>>(codes[m], scales[m], sh.n, sh.k, S,
                                                            1000 + m, s0);
                if (W || Q) {  // the same matrix's codes in the tile layout (the scales stay)
                    CK(cudaMemset(codes[m], 0, (size_t)sh.n * sh.k / 2));
                    fill_tiles<<<4 * prop.multiProcessorCount, 256>>>(codes[m], sh.n, sh.k, 1000 + m);
                }
            }
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            const int panels = sh.n / QPANEL;
            cudaGraph_t g;
            CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            for (int m = 0; m < INSTANCES; m++) {
                const uint4* tiles = reinterpret_cast<const uint4*>(codes[m]);
                if (Q == 16) {
                    matmul_q4t_one<<<sh.n / 16, 512, 0, stream>>>(x, 0, codes[m], sh.k, sh.n, GROUP,
                                                                 scales[m], nullptr, nullptr,
                                                                 nullptr, 1, outs[m], 0);
                } else if (Q == 8) {
                    matmul_q4t_one_w8<<<sh.n / 16, 256, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP,
                                                                    scales[m], outs[m]);
                } else if (W == 8 && AH == 4) {
                    matmul_q4_mma<8, 4><<<sh.n / 16, 256, 0, stream>>>(xh, xl, unscale, tiles, sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (W == 8 && AH == 2) {
                    matmul_q4_mma<8, 2><<<sh.n / 16, 256, 0, stream>>>(xh, xl, unscale, tiles, sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (W == 16 && AH == 4) {
                    matmul_q4_mma<16, 4><<<sh.n / 16, 512, 0, stream>>>(xh, xl, unscale, tiles, sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (W == 16 && AH == 2) {
                    matmul_q4_mma<16, 2><<<sh.n / 16, 512, 0, stream>>>(xh, xl, unscale, tiles, sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (U == 2) {
                    matmul_q4_wide<2><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (U == 4) {
                    matmul_q4_wide<4><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (U == 8) {
                    matmul_q4_wide<8><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (P == 1) {
                    read_panels<<<panels, 128, 0, stream>>>(codes[m], sh.k, scales[m], GROUP,
                                                            reinterpret_cast<unsigned*>(outs[m]));
                } else if (P == 2) {
                    read_stride<<<4 * prop.multiProcessorCount, 512, 0, stream>>>(
                        reinterpret_cast<const uint4*>(codes[m]), (long long)sh.n * sh.k / 32,
                        reinterpret_cast<const uint4*>(scales[m]), (long long)sh.n * (sh.k / GROUP) / 8,
                        reinterpret_cast<unsigned*>(outs[m]));
                } else if (B == 2) {
                    matmul_q4_bulk<2><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (B == 4) {
                    matmul_q4_bulk<4><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (B == 8) {
                    matmul_q4_bulk<8><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (D == 2) {
                    matmul_q4_ring<2><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (D == 3) {
                    matmul_q4_ring<3><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (D == 4) {
                    matmul_q4_ring<4><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (D == 6) {
                    matmul_q4_ring<6><<<panels, 128, 0, stream>>>(x, codes[m], sh.k, sh.n, GROUP, scales[m], outs[m]);
                } else if (S == 1) {
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
            if (si == 0) {
                ref = got;
            } else if (P != 0) {
                err[si] = -1;  // nothing to compare: the plain reads compute no product
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
        for (int si = 1; si < VARIANTS; si++) {
            if (us[si] < 0) printf(" n/a |");
            else printf(" %.2f (%.0f%%) |", us[si], pct(us[si]));
        }
        bool ok = true;
        for (int si = 1; si < VARIANTS; si++) {
            // The rings and the bulk copies form A's sums in A's order: bit for bit.
            const double bound = variants[si][1] || variants[si][2] || variants[si][4] ? 0.0 : 2e-6;
            ok = ok && (us[si] < 0 || err[si] < 0 || err[si] <= bound);
        }
        printf(" %s", ok ? "ok" : "FAIL");
        for (int si = 1; si < VARIANTS; si++) printf(" %.1e", err[si]);
        printf(" |\n");
        fflush(stdout);
        CK(cudaFree(x));
        CK(cudaFree(xh));
        CK(cudaFree(xl));
    }
    return 0;
}
