// Device helpers shared by the kernels in kernels/cuda (not part of the public entry points).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/cuda_ops.h"

// Kernel launches and dynamic shared memory, written so that the CUDA emulator
// (kernels/cuda/emu/cuda_emu.h, which defines both itself) can run the same code on the host:
//   MM_LAUNCH(grid, block, smem, stream, kernel)(args...)  is  kernel<<<grid, block, smem, stream>>>(args...)
//   MM_EXTERN_SHARED(T, name);                            is  extern __shared__ T name[];
//   MM_LAUNCH_PDL(...)(args...)  as MM_LAUNCH, as a programmatic dependent launch (below)
#ifndef MM_CUDA_EMULATION
#define MM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define MM_EXTERN_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define MM_LAUNCH_PDL(grid, block, smem, stream, ...) \
    ::moemesh::cuda::detail::pdl_launch(__VA_ARGS__, (grid), (block), (smem), (stream))
#endif

namespace moemesh::cuda::detail {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `red` is 32 floats of
// shared memory; every thread gets the result. Ends with a barrier, so `red` can be reused.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    v = warp_sum(v);
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float s = lane < nw ? red[lane] : 0.0f;
    s = warp_sum(s);
    __syncthreads();
    return s;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    v = warp_max(v);
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float s = lane < nw ? red[lane] : -INFINITY;
    s = warp_max(s);
    __syncthreads();
    return s;
}

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf2f(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
// Round to f16 and back (round to nearest even, as fp32_to_fp16 in common/half.h).
__device__ __forceinline__ float round_f16(float f) { return __half2float(__float2half_rn(f)); }

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// The last-block-done pattern (a kernel's final step in the block that finishes last, instead of a
// second launch): every thread's writes fenced, then one count per block on `counter` (zero before
// the launch's first count); true, in every thread of the block whose count is the n-th (n: the
// blocks counting, default the grid's), after a fence so that its reads see the other blocks'
// writes (read those through L2: __ldcg). That block must put the counter back to 0 for the next
// launch. Called by every thread of every counting block (it has barriers).
__device__ __forceinline__ bool last_block_done(unsigned* counter, unsigned n = 0) {
    __shared__ bool last;
    if (n == 0) n = gridDim.x * gridDim.y * gridDim.z;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) last = atomicAdd(counter, 1u) == n - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Programmatic dependent launch (sm_90+): a kernel launched with MM_LAUNCH_PDL may be scheduled while
// the kernel before it on the stream is still running, so its launch and block start-up overlap that
// kernel's tail (a decode step is ~11 dependent kernels per layer, each a few µs). Such a kernel must
// call grid_dep_wait() before it touches memory another kernel writes or reads: it returns once the
// kernels before it have completed and their writes are visible (a no-op for a kernel launched
// without the attribute, on the emulator and before sm_90). MOEMESH_CUDA_PDL=0 turns the attribute
// off.
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

#ifndef MM_CUDA_EMULATION
bool pdl_enabled();  // kernels/cuda/device.cpp
template <class... P>
struct PdlLaunch {
    void (*fn)(P...);
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <class... A>
    void operator()(A&&... args) const {
        if (pdl_enabled()) {
            cudaLaunchAttribute attr[1] = {};
            attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[0].val.programmaticStreamSerializationAllowed = 1;
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = grid;
            cfg.blockDim = block;
            cfg.dynamicSmemBytes = smem;
            cfg.stream = stream;
            cfg.attrs = attr;
            cfg.numAttrs = 1;
            // A refused launch leaves its error for CUDA_CHECK_LAUNCH, as <<<>>> does.
            (void)cudaLaunchKernelEx(&cfg, fn, static_cast<P>(args)...);
            return;
        }
        fn<<<grid, block, smem, stream>>>(static_cast<P>(args)...);
    }
};
template <class... P>
PdlLaunch<P...> pdl_launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
    return {fn, grid, block, smem, stream};
}
#endif

// Kernel launch error check (configuration errors surface here, execution errors at the next sync).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

inline unsigned grid_1d(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace moemesh::cuda::detail
