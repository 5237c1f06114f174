// What every CUDA kernel of the plan's module shares. NVRTC compiles the module with no CUDA
// headers at all (fdc runs where only the NVRTC library is installed), so the few half-precision
// conversions needed are written here.
//
// Conventions of every kernel (the same as the CPU kernels, `kernels/src/cpu`): activations are
// f32 matrices `[rows, cols]` with a row stride in elements; weights are row-major `[N, K]`;
// indices are 32-bit (a plan's buffers stay far below 2^31 elements per row and per launch).

#define FD_NEG_INF __int_as_float(0xff800000)

// Programmatic dependent launch (sm90; no-ops before it, and when the kernel was launched
// without the attribute): the runtime launches every step so that the next kernel's blocks may
// start while this one drains. Each kernel lets its dependents start at once
// (`fd_grid_start`), and waits for the kernels before it to finish, and their writes to be
// seen, before it reads or writes any activation (`fd_grid_wait`); only weights, which no kernel
// writes, may be read before. Every kernel waits on every path, so a kernel's end implies the
// end of all before it.
__device__ __forceinline__ void fd_grid_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void fd_grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

#if !defined(FD_HIP)
// Thread block clusters (sm90; only kernels launched in clusters call these): the block's rank
// in its cluster, the cluster's size, a barrier over the cluster's threads (writes to shared
// memory before it are seen by every block of the cluster after it), and a load from another
// block's shared memory at the offset of a local shared address.
__device__ __forceinline__ unsigned int fd_cluster_rank() {
    unsigned int rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}
__device__ __forceinline__ unsigned int fd_cluster_size() {
    unsigned int size;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
    return size;
}
__device__ __forceinline__ void fd_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
}
__device__ __forceinline__ unsigned int fd_shared_address(const void* p) {
    unsigned int address;
    asm("{\n\t.reg .u64 a;\n\tcvta.to.shared.u64 a, %1;\n\tcvt.u32.u64 %0, a;\n\t}"
        : "=r"(address)
        : "l"(p));
    return address;
}
__device__ __forceinline__ float fd_cluster_load(unsigned int local, unsigned int rank) {
    unsigned int remote;
    float value;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(value) : "r"(remote) : "memory");
    return value;
}
#endif

// Half-precision weights as 16-bit patterns; distinct types so that `fd_load` picks the widening.
struct fd_bf16 {
    unsigned short bits;
};
struct fd_f16 {
    unsigned short bits;
};

__device__ __forceinline__ float fd_load(const float* p) { return *p; }

// bf16 is the top half of an f32: widening is a shift.
__device__ __forceinline__ float fd_load(const fd_bf16* p) {
    return __uint_as_float(((unsigned int)p->bits) << 16);
}

// The few places where the CUDA and HIP builds of these sources differ (the DCU target: fdc
// compiles the same files with a HIP compiler, `FD_HIP` defined and the HIP runtime header
// included first). A HIP wavefront is 64 lanes; every kernel here is written for warps of 32,
// so shuffles stay inside 32-lane halves (width 32) and a wavefront runs two of the kernels'
// warps side by side, in lockstep, which is all the warp-synchronous code assumes.
#ifdef FD_HIP
template <typename T> __device__ __forceinline__ T fd_shfl_xor(T v, int lane_mask) {
    return __shfl_xor(v, lane_mask, 32);
}
template <typename T> __device__ __forceinline__ T fd_shfl(T v, int lane) {
    return __shfl(v, lane, 32);
}
// IEEE half to f32 (exact) and f32 to half, nearest even: the compiler's _Float16.
__device__ __forceinline__ float fd_f16_f32(unsigned short h) {
    return (float)__builtin_bit_cast(_Float16, h);
}
__device__ __forceinline__ unsigned short fd_f32_f16(float v) {
    return __builtin_bit_cast(unsigned short, (_Float16)v);
}
// f32 to bf16, nearest even (NaN stays a quiet NaN): gfx906 has no bf16 instructions.
__device__ __forceinline__ unsigned short fd_f32_bf16(float v) {
    const unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#else
template <typename T> __device__ __forceinline__ T fd_shfl_xor(T v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <typename T> __device__ __forceinline__ T fd_shfl(T v, int lane) {
    return __shfl_sync(0xffffffffu, v, lane);
}
// Through the hardware conversions.
__device__ __forceinline__ float fd_f16_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short fd_f32_f16(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
__device__ __forceinline__ unsigned short fd_f32_bf16(float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif

// IEEE half to f32, exact.
__device__ __forceinline__ float fd_load(const fd_f16* p) { return fd_f16_f32(p->bits); }

// Eight 16-bit weights packed in 16 bytes, widened to f32.
__device__ __forceinline__ void fd_unpack8(uint4 v, float out[8], bool bf16) {
    const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const unsigned short lo = words[j] & 0xffffu, hi = words[j] >> 16;
        if (bf16) {
            out[2 * j] = __uint_as_float((unsigned int)lo << 16);
            out[2 * j + 1] = __uint_as_float((unsigned int)hi << 16);
        } else {
            out[2 * j] = fd_f16_f32(lo);
            out[2 * j + 1] = fd_f16_f32(hi);
        }
    }
}

__device__ __forceinline__ float fd_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += fd_shfl_xor(v, offset);
    }
    return v;
}

__device__ __forceinline__ float fd_warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, fd_shfl_xor(v, offset));
    }
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets
// the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float fd_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = fd_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return fd_warp_sum(v);
}

// Decode folds: in a pass of one token, the add-and-RMS-norm between two matmuls is done by the
// matmuls themselves (fdc records which, `code_abi::CudaDecodeFolds`), which saves the norm's
// launch, a single block whose load-reduce-store chain costs more in a decode step than its
// bytes (measured: 3.6 us of the step per norm on an H100, docs/PERF.md). The norm of a row
// needs the sum of all its squares, which no block of the producing matmul has; so the
// producer writes the sum s = residual + its output and s * w (the norm's weight) and, per
// block, the sum of its rows' s^2, and each block of a consuming matmul adds those partial sums
// up itself and scales its outputs by 1 / rms: W (s * w / rms) = (W (s * w)) / rms.
#define FD_FOLD_NONE 0
#define FD_FOLD_ADD_NORM 1  // the producer: writes s, s * w and the block's sum of s^2
#define FD_FOLD_RMS 2       // a consumer: outputs times rsqrt(sum(partials) / cols + eps)

struct FdFold {
    // FD_FOLD_ADD_NORM (row 0 of each, a one-token pass)
    const float* residual;  // may be sum_out itself
    const float* norm_w;
    float* sum_out;
    float* normed_out;
    float* partials_out;  // [gridDim.x]
    // FD_FOLD_RMS
    const float* partials_in;
    int n_partials;
    int cols;
    float eps;
};

// The producer's epilogue: the thread holding row `row` (`holds`) with the matmul's value v
// (bias included). Every thread of the block calls it.
__device__ __forceinline__ void fd_fold_add_norm(bool holds, int row, float v, const FdFold& f,
                                                 float* scratch) {
    float sq = 0.0f;
    if (holds) {
        const float s = f.residual[row] + v;
        f.sum_out[row] = s;
        f.normed_out[row] = s * f.norm_w[row];
        sq = s * s;
    }
    const float total = fd_block_sum(sq, scratch);
    if (threadIdx.x == 0) f.partials_out[blockIdx.x] = total;
}

// A consumer's 1 / rms, in every thread of the block (every thread calls it, after waiting for
// the kernels before).
__device__ __forceinline__ float fd_fold_inv_rms(const FdFold& f, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < f.n_partials; i += blockDim.x) s += f.partials_in[i];
    return rsqrtf(fd_block_sum(s, scratch) / f.cols + f.eps);
}

// A folded single-token matmul's epilogue, in every thread of the block: the thread holding row
// `row` (`holds`) has its value v and bias b; a consumer writes (v / rms + b), the producer
// passes v + b on (`fd_fold_add_norm`).
template <int FOLD>
__device__ __forceinline__ void fd_fold_epilogue(bool holds, int row, float v, float b,
                                                 float* out, const FdFold& f) {
    __shared__ float scratch[32];
    if constexpr (FOLD == FD_FOLD_RMS) {
        const float inv = fd_fold_inv_rms(f, scratch);
        if (holds) out[row] = v * inv + b;
    } else {
        fd_fold_add_norm(holds, row, v + b, f, scratch);
    }
}
