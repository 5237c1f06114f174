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

// IEEE half to f32, exact, through the hardware conversion.
__device__ __forceinline__ float fd_load(const fd_f16* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
}

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
            asm("cvt.f32.f16 %0, %1;" : "=f"(out[2 * j]) : "h"(lo));
            asm("cvt.f32.f16 %0, %1;" : "=f"(out[2 * j + 1]) : "h"(hi));
        }
    }
}

__device__ __forceinline__ float fd_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float fd_warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
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
