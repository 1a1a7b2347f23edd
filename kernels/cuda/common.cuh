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

// Kernel switches for A/B runs, as bits (0, the default, everywhere they are not set): read by the
// kernels from constant memory. A module's constant memory is its own, so every .cu that includes
// this header has its own copy; each copy registers a setter at static initialization and
// set_kernel_switches (device.cpp) sets them all on the current device. The bits: cuda_ops.h.
#if defined(MM_CUDA_EMULATION) || defined(__CUDACC__)
bool register_switch_setter(cudaError_t (*set)(unsigned));  // device.cpp
namespace {
#ifdef MM_CUDA_EMULATION
unsigned g_switches = 0u;
cudaError_t set_switches_here(unsigned v) {
    g_switches = v;
    return cudaSuccess;
}
inline unsigned switches() { return g_switches; }
#else
__constant__ unsigned g_switches = 0u;
cudaError_t set_switches_here(unsigned v) { return cudaMemcpyToSymbol(g_switches, &v, sizeof v); }
__device__ __forceinline__ unsigned switches() { return g_switches; }
#endif
[[maybe_unused]] const bool g_switches_registered = register_switch_setter(&set_switches_here);
}  // namespace
#endif

// Each module's kernels loaded when a device starts (load_own_kernels, cuda_ops.h), not at their
// first launch: an empty kernel per .cu through which device.cpp finds the module.
#if defined(__CUDACC__) && !defined(MM_CUDA_EMULATION)
bool register_module_anchor(const void* kernel);  // device.cpp
namespace {
__global__ void module_anchor_kernel() {}
[[maybe_unused]] const bool g_anchor_registered =
    register_module_anchor(reinterpret_cast<const void*>(&module_anchor_kernel));
}  // namespace
#endif

// Programmatic dependent launch (sm_90+): a kernel launched with MM_LAUNCH_PDL may be scheduled while
// the kernel before it on the stream is still running, so its launch and block start-up overlap that
// kernel's tail (a decode step is ~11 dependent kernels per layer, each a few µs). Such a kernel must
// call grid_dep_wait() before it touches memory another kernel writes or reads: it returns once the
// kernels before it have completed and their writes are visible (a no-op for a kernel launched
// without the attribute, on the emulator and before sm_90). MOEMESH_CUDA_PDL=0 turns the attribute
// off. Right after the wait every block also signals that the next kernel may be scheduled
// (griddepcontrol.launch_dependents, by every thread; without it the next kernel is launched only as
// this one's blocks exit): so the next kernel's blocks become resident while this one runs and do
// what needs no other kernel's results (prefetch_l2_bulk of their weights) before their own wait.
// The next kernel's wait still returns only once this one has completed, so the signal never changes
// results; and as the kernel after the next one waits for the next one, which waits here, no kernel
// runs more than one ahead. MOEMESH_CUDA_PDL_TRIGGER=exit leaves the signal out.
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!(switches() & kSwitchTriggerAtExit)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A hint: bytes from p into L2 as one bulk request (sm_90+: cp.async.bulk.prefetch; nothing waits for
// it), widened to 16-byte boundaries (within the allocation: allocations are 256-byte aligned and
// rounded up). For a GEMV's weight rows, issued before grid_dep_wait where the rows' address depends
// on no other kernel's output, so that the DRAM reads overlap the kernel before (above); after it
// they still put the warp's whole rows in flight at once. MOEMESH_CUDA_PREFETCH=0 leaves it out.
// The emulator checks that the widened range lies in one device allocation and can record it
// (mm_emu::prefetch_l2).
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, size_t bytes) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(MM_CUDA_EMULATION)
    if (bytes == 0 || (switches() & kSwitchNoPrefetch)) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{15};
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes + 15) & ~uintptr_t{15};
#ifdef MM_CUDA_EMULATION
    ::mm_emu::prefetch_l2(reinterpret_cast<const void*>(a), e - a);
#else
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"(static_cast<unsigned>(e - a)) : "memory");
#endif
#else
    (void)p, (void)bytes;
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
