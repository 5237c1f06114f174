// bench.cuh: what the standalone CUDA benchmarks of this folder share: the module's sources,
// included as NVRTC gets them (they need no header beyond what nvcc includes), an error check,
// and the hash their fill kernels draw random weights from.
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
