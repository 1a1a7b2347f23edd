// CUDA emulator: runs moemesh's CUDA code (kernels/cuda, the CUDA backend, the CUDA worker) on the
// host, so that CI, which has no GPU, executes it instead of only compiling it.
//
// The targets built with it (MOEMESH_CUDA_EMU, see CMakeLists.txt) compile the .cu files as C++ with
// kernels/cuda/emu/include first on the include path: its <cuda_runtime.h>, <cuda_fp16.h> and
// <cuda_bf16.h> are this header. What it provides:
// - Device code: the qualifiers, threadIdx/blockIdx/blockDim/gridDim, vector types, half/bfloat16,
//   the intrinsics our kernels use (__shfl_*_sync, __syncthreads, __syncwarp, __dp4a, __byte_perm,
//   __vsub4, __ldg, __f*_rn, ...). `__shared__` variables are per-OS-thread statics: a launch runs
//   its blocks one after another on the calling thread, in a permutation of its own (so that the
//   block that finishes last is seldom the highest-numbered one; MOEMESH_CUDA_EMU_BLOCK_ORDER=index
//   runs them in index order), every CUDA thread of a block as a fiber
//   (ucontext) that runs until it finishes or waits at a barrier (__syncthreads, a warp shuffle,
//   __syncwarp). Threads run in index order in even blocks and in reverse order in odd ones, so a
//   read of shared memory that misses a barrier usually gives a wrong answer instead of a lucky one.
//   A barrier that cannot complete (a divergent __syncthreads, a shuffle whose lanes have exited)
//   fails the launch with a message naming the kernel.
// - Launches: MM_LAUNCH(grid, block, smem, stream, kernel)(args...) (kernels/cuda/common.cuh; it is
//   kernel<<<grid, block, smem, stream>>>(args...) under nvcc). Checked as the hardware checks them:
//   block size, grid size, dynamic shared memory against 48 KiB or the cudaFuncSetAttribute opt-in.
// - The runtime API our code calls: device memory is host memory (cudaMalloc is an aligned malloc,
//   tracked so copies whose device side is not device memory fail as on a GPU, and budgeted by
//   MOEMESH_CUDA_EMU_MEM_MIB, default 16384). Work on a stream is queued and runs, in order, only
//   when the host waits for it (stream, event or device synchronization, cudaStreamWaitEvent, a
//   synchronous copy, cudaFree; the legacy stream waits for the blocking streams, not for
//   cudaStreamNonBlocking ones), so a missing synchronization reads stale data here as it can on a
//   GPU (MOEMESH_CUDA_EMU_STREAMS=sync runs work at submission instead). Copies from or to pageable
//   host memory are synchronous, as in CUDA. Stream capture records launches and copies with their
//   arguments and a graph replays them; cudaStreamSynchronize inside a capture fails as on a GPU.
//   MOEMESH_CUDA_EMU_DEVICES sets the device count (default 1). MOEMESH_CUDA_EMU_CC=M.N sets the
//   compute capability the devices report (default 9.0); the emulated build stands for the default
//   one (PTX for compute 9.0, which runs on 9.0 and up), so below 9.0 launches and
//   cudaFuncGetAttributes fail with cudaErrorNoKernelImageForDevice, as an sm_89 GPU does.
//   CUDA IPC works between processes of one machine (the exported allocation becomes shared memory,
//   which the other process maps), so the cuda-ipc data plane runs as on one GPU.
// NCCL's point-to-point subset is in nccl_emu.h. What it cannot show: speed, races between threads
// of a block or between work running at the same time, the GPU's float rounding of expf/rsqrtf
// (close, not bit-equal), real NCCL's transports.
#pragma once
#define MM_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/half.h"

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
// `extern __shared__ T name[]` (the launch's dynamic shared memory).
#define MM_EXTERN_SHARED(type, name) type* name = static_cast<type*>(::mm_emu::dynamic_shared())

// ---- vector types -------------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) float2 {
    float x, y;
};
struct __align__(16) float4 {
    float x, y, z, w;
};
struct __align__(8) int2 {
    int x, y;
};
struct __align__(16) int4 {
    int x, y, z, w;
};
struct __align__(8) uint2 {
    unsigned x, y;
};
struct __align__(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- half and bfloat16 --------------------------------------------------------------------------
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
using half = __half;
inline float __half2float(__half h) { return moemesh::fp16_to_fp32(h.bits); }
inline __half __float2half_rn(float f) { return {moemesh::fp32_to_fp16(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(uint16_t u) { return {u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return moemesh::fp32_from_bits(static_cast<uint32_t>(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {moemesh::fp32_to_bf16(f)}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// ---- math and bit intrinsics --------------------------------------------------------------------
// Each operation rounded on its own (volatile: the compiler may not contract them into an FMA).
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
inline float __fsub_rn(float a, float b) {
    volatile float r = a - b;
    return r;
}
inline float __fdiv_rn(float a, float b) {
    volatile float r = a / b;
    return r;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(uint32_t u) { return moemesh::fp32_from_bits(u); }
inline float __int_as_float(int i) { return moemesh::fp32_from_bits(static_cast<uint32_t>(i)); }
inline uint32_t __float_as_uint(float f) { return moemesh::fp32_to_bits(f); }
inline int __float_as_int(float f) { return static_cast<int>(moemesh::fp32_to_bits(f)); }
// CUDA's global min/max overloads for device code (host C++ has only std::min/std::max).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class T>
inline T __ldg(const T* p) {
    T v;
    std::memcpy(static_cast<void*>(&v), p, sizeof(T));
    return v;
}
template <class T>
inline T __ldcg(const T* p) {  // (L2 only on a GPU: another block's fresh write, not a stale L1 line)
    return __ldg(p);
}
// Byte i of the result: byte (s >> 4i) & 7 of the 8 bytes {x (0-3), y (4-7)} (no sign-replicate mode).
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t xy = static_cast<uint64_t>(y) << 32 | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((xy >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
// c + Σ of the four signed byte products. (The unsigned overload is not emulated: a call that would
// pick it does not compile here.)
unsigned __dp4a(unsigned a, unsigned b, unsigned c) = delete;
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += static_cast<int8_t>(a >> (8 * i)) * static_cast<int8_t>(b >> (8 * i));
    return c;
}
// Per-byte a - b, modulo 256.
inline uint32_t __vsub4(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= ((((a >> (8 * i)) & 0xff) - ((b >> (8 * i)) & 0xff)) & 0xff) << (8 * i);
    return r;
}
inline int __vsub4(int a, int b) {
    return static_cast<int>(__vsub4(static_cast<uint32_t>(a), static_cast<uint32_t>(b)));
}

// ---- the runtime API (cuda_emu.cpp) -------------------------------------------------------------
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorGraphExecUpdateFailure = 910,
    cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2 };
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void* devicePointer;
    void* hostPointer;
};
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaGraphExecUpdateResult { cudaGraphExecUpdateSuccess = 0, cudaGraphExecUpdateError = 1 };
struct cudaGraphExecUpdateResultInfo {
    cudaGraphExecUpdateResult result;
    void* errorNode;
    void* errorFromNode;
};
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    size_t sharedMemPerMultiprocessor;
    int multiProcessorCount;
    int maxThreadsPerBlock;
    int warpSize;
    int major;
    int minor;
};
struct cudaIpcMemHandle_t {
    char reserved[64];
};
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocDefault = 0, cudaHostAllocPortable = 1, cudaHostAllocMapped = 2;
constexpr unsigned cudaIpcMemLazyEnablePeerAccess = 1;

namespace mm_emu {
struct Stream;
struct Event;
struct Graph;
struct GraphExec;
}  // namespace mm_emu
using cudaStream_t = mm_emu::Stream*;
using cudaEvent_t = mm_emu::Event*;
using cudaGraph_t = mm_emu::Graph*;
using cudaGraphExec_t = mm_emu::GraphExec*;

const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
struct cudaFuncAttributes {
    size_t sharedSizeBytes;
    int maxThreadsPerBlock;
    int numRegs;
    int ptxVersion;
    int binaryVersion;
    int maxDynamicSharedSizeBytes;
};
// A kernel's attributes on the current device: cudaErrorNoKernelImageForDevice below compute 9.0
// (MOEMESH_CUDA_EMU_CC), as the default build on an older GPU; otherwise nominal values.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* fn);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d);
cudaError_t cudaDeviceSynchronize();
// Clears a failed launch's sticky error and frees the current device's memory (as on a GPU).
cudaError_t cudaDeviceReset();
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMalloc(void** p, size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned flags);
template <class T>
cudaError_t cudaHostAlloc(T** p, size_t bytes, unsigned flags) {
    return cudaHostAlloc(reinterpret_cast<void**>(p), bytes, flags);
}
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphExecUpdate(cudaGraphExec_t exec, cudaGraph_t g, cudaGraphExecUpdateResultInfo* info);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* h, void* p);
cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t h, unsigned flags);
cudaError_t cudaIpcCloseMemHandle(void* p);

namespace mm_emu {

// ---- the fiber scheduler's view of the running CUDA thread (cuda_emu.cpp) ----
struct ThreadState {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
extern thread_local ThreadState* g_thread;  // the CUDA thread running on this OS thread
void* dynamic_shared();
void sync_block();
void sync_warp(unsigned mask);
// Warp exchange: publishes `bits` for this lane, waits for the lanes in `mask`, reads lane `src`'s.
uint64_t exchange(unsigned mask, uint64_t bits, int src);
int lane_id();
// cp.async.bulk.prefetch.L2 (a hint: no data moves): fails the launch unless [p, p + bytes) lies in one
// device allocation (its 256-byte granule; a GPU may fault on an unmapped address), and is recorded
// while prefetch_log(true) is on, for tests that check what a kernel prefetches.
void prefetch_l2(const void* p, size_t bytes);
struct PrefetchRange {
    uintptr_t begin, end;
};
// Starts (on) or stops recording; either way returns and clears what was recorded so far.
std::vector<PrefetchRange> prefetch_log(bool on);

// Settings of the kernel function (the cudaFuncSetAttribute opt-in), keyed by its address.
cudaError_t set_max_dynamic_shared(const void* fn, int bytes);
// Runs (or, while its stream is captured, records) one launch. The closure runs one CUDA thread.
void launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            std::function<void()> thread_body);

// Stream work for emulated libraries (nccl_emu.cpp): queue an operation on a stream (recorded while
// it is captured, run at once on the legacy stream), and run a stream's queued work.
void submit(cudaStream_t stream, const char* what, std::function<void()> op);
void run_stream(cudaStream_t stream);
// Whether [p, p + bytes) lies inside one device allocation (emulated libraries check their operands).
bool device_range(const void* p, size_t bytes);

// False (and the launch refused, with a message) when argument `index` of kernel `name` points at
// memory the current device cannot access.
bool check_pointer_arg(const char* name, int index, const void* p);
template <class T>
const void* to_address(const T& v) {
    if constexpr (std::is_pointer_v<T>)
        return static_cast<const void*>(v);
    else
        return nullptr;
}

template <class... P>
struct Launch {
    void (*fn)(P...);
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    const char* name;
    template <class... A>
    void operator()(A&&... a) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        // Arguments are taken by value when launched (as the CUDA driver copies them), so a graph
        // replays the values its capture saw.
        auto args = std::make_shared<std::tuple<std::decay_t<P>...>>(static_cast<std::decay_t<P>>(std::forward<A>(a))...);
        // A pointer argument must be memory this device can reach: its own device memory (or an IPC
        // mapping), pinned host memory, or null; not pageable host memory, not another GPU's.
        bool ok = true;
        int i = 0;
        std::apply(
            [&](const auto&... v) {
                ((ok = ok && (!std::is_pointer_v<std::decay_t<decltype(v)>> || check_pointer_arg(name, i, to_address(v))),
                  ++i),
                 ...);
            },
            *args);
        if (!ok) return;
        auto f = fn;
        launch(name, reinterpret_cast<const void*>(fn), grid, block, smem, stream, [f, args] { std::apply(f, *args); });
    }
};
template <class... P>
Launch<P...> make_launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* name) {
    return {fn, grid, block, smem, stream, name};
}

}  // namespace mm_emu

#define MM_LAUNCH(grid, block, smem, stream, ...) \
    ::mm_emu::make_launch(__VA_ARGS__, (grid), (block), (smem), (stream), #__VA_ARGS__)
// Programmatic dependent launch (kernels/cuda/common.cuh) only overlaps launches on a GPU: the
// emulator runs kernels one after the other anyway.
#define MM_LAUNCH_PDL(grid, block, smem, stream, ...) MM_LAUNCH(grid, block, smem, stream, __VA_ARGS__)

#define threadIdx (::mm_emu::g_thread->thread_idx)
#define blockIdx (::mm_emu::g_thread->block_idx)
#define blockDim (::mm_emu::g_thread->block_dim)
#define gridDim (::mm_emu::g_thread->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::mm_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::mm_emu::sync_warp(mask); }
// A fence and atomics: a launch's blocks run one after another on one OS thread, so the fence has
// nothing to order here; the atomic is real (std::atomic_ref: two host threads may run work at
// once). A kernel that counts its finished blocks (the last one does a final step) sees them finish
// in a different order at each launch here (block_order in cuda_emu.cpp), in any order on a GPU.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }

namespace mm_emu {
template <class T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
T from_bits(uint64_t b) {
    T v;
    std::memcpy(static_cast<void*>(&v), &b, sizeof(T));
    return v;
}
}  // namespace mm_emu

// Shuffles: a lane whose source lies outside its `width` segment gets its own value (as on a GPU).
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = ::mm_emu::lane_id(), src = lane ^ lane_mask;
    const bool inside = src / width == lane / width;
    return ::mm_emu::from_bits<T>(::mm_emu::exchange(mask, ::mm_emu::to_bits(v), inside ? src : lane));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = ::mm_emu::lane_id(), src = lane + static_cast<int>(delta);
    const bool inside = src / width == lane / width;
    return ::mm_emu::from_bits<T>(::mm_emu::exchange(mask, ::mm_emu::to_bits(v), inside ? src : lane));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = ::mm_emu::lane_id(), src = lane - static_cast<int>(delta);
    const bool inside = src >= 0 && src / width == lane / width;
    return ::mm_emu::from_bits<T>(::mm_emu::exchange(mask, ::mm_emu::to_bits(v), inside ? src : lane));
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const int lane = ::mm_emu::lane_id();
    const int src = lane / width * width + ((src_lane % width) + width) % width;
    return ::mm_emu::from_bits<T>(::mm_emu::exchange(mask, ::mm_emu::to_bits(v), src));
}

template <class F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    return ::mm_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(fn), value);
}
cudaError_t mm_emu_occupancy(int* blocks, int block_size, size_t smem);
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* /*fn*/, int block_size, size_t smem) {
    return mm_emu_occupancy(blocks, block_size, smem);
}
