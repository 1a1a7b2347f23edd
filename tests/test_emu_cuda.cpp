// The CUDA emulator (kernels/cuda/emu) itself: that it runs kernels with CUDA's semantics (thread and
// block indices, shared memory, barriers, warp shuffles, stream capture and graph replay) and refuses
// what a GPU refuses or leaves undefined (divergent barriers, shuffles with exited lanes, copies whose
// device side is not device memory, launches beyond the limits). test_cuda_ops_emu relies on it.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"

namespace {

using moemesh::cuda::detail::block_sum;
using moemesh::cuda::detail::kWarp;
using moemesh::cuda::detail::warp_sum;

// ---- kernels ----
__global__ void block_sums_kernel(const float* x, int64_t n, float* out) {
    __shared__ float red[kWarp];
    float v = 0.0f;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        v += x[i];
    v = block_sum(v, red);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// out[t] = the values each shuffle variant gives lane t (4 per thread).
__global__ void shuffles_kernel(int* out) {
    const int t = static_cast<int>(threadIdx.x), lane = t % 32;
    const int v = 100 * (t / 32) + lane;
    out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 7, 8);
}

// out[i] = x[(i + 1) % blockDim.x] of the same block, through shared memory.
template <bool kBarrier>
__global__ void rotate_kernel(const float* x, float* out) {
    __shared__ float s[256];
    const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
    s[t] = x[blockIdx.x * n + t];
    if (kBarrier) __syncthreads();
    out[blockIdx.x * n + t] = s[(t + 1) % n];
}

__global__ void dynamic_smem_kernel(float* out, int n) {
    MM_EXTERN_SHARED(float, buf);
    for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) buf[i] = static_cast<float>(i);
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < n; ++i) s += buf[i];
        out[0] = s;
    }
}

// Lanes 0-15 shuffle with the whole warp while lanes 16-31 wait at __syncthreads: never completes.
__global__ void divergent_kernel(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// Lanes past n return before a full-warp reduction.
__global__ void early_exit_kernel(const float* x, int n, float* out) {
    if (static_cast<int>(threadIdx.x) >= n) return;
    const float s = warp_sum(x[threadIdx.x]);
    if (threadIdx.x == 0) out[0] = s;
}

__global__ void scale_kernel(float* x, float a, int n) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n) x[i] *= a;
}

__global__ void index_kernel(int* out) {
    const int b = static_cast<int>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    const int t = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    out[b * static_cast<int>(blockDim.x * blockDim.y * blockDim.z) + t] = 1000 * b + t;
}

// Each block records its place in the launch's run order (seen[place] = its linear index) and
// writes a partial; the block that finishes last (last_block_done, common.cuh) names itself and
// sums every block's partial, then resets the counter as a kernel must.
__global__ void finish_order_kernel(unsigned* counters, int* seen, int* partial, int* last_and_sum) {
    const int b = static_cast<int>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    const int n = static_cast<int>(gridDim.x * gridDim.y * gridDim.z);
    if (threadIdx.x == 0) {
        seen[atomicAdd(&counters[0], 1u)] = b;
        partial[b] = 10 * b + 1;
    }
    if (!moemesh::cuda::detail::last_block_done(&counters[1])) return;
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int i = 0; i < n; ++i) sum += partial[i];
        last_and_sum[0] = b;
        last_and_sum[1] = sum;
        counters[0] = counters[1] = 0;
    }
}

template <class T>
T* device_alloc(size_t n) {
    T* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
    return p;
}

class CudaEmu : public ::testing::Test {
protected:
    void TearDown() override {
        // Tests that make a launch fail leave the context poisoned, as on a GPU; reset it.
        cudaDeviceReset();
    }
};

TEST_F(CudaEmu, BlockReductionWithSharedMemoryAndShuffles) {
    const int64_t n = 100003;
    std::vector<float> x(n);
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& v : x) v = u(rng);
    float* dx = device_alloc<float>(n);
    const unsigned blocks = 7;
    float* dout = device_alloc<float>(blocks);
    ASSERT_EQ(cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    MM_LAUNCH(blocks, 256, 0, nullptr, block_sums_kernel)(dx, n, dout);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    std::vector<float> out(blocks);
    ASSERT_EQ(cudaMemcpy(out.data(), dout, blocks * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (unsigned b = 0; b < blocks; ++b) {
        double want = 0;
        for (int64_t i = b * 256; i < n; i += blocks * 256)
            for (int64_t j = i; j < std::min<int64_t>(i + 256, n); ++j) want += x[j];
        EXPECT_NEAR(out[b], want, 1e-3) << "block " << b;
    }
    cudaFree(dx);
    cudaFree(dout);
}

TEST_F(CudaEmu, ShufflesFollowCudaSemantics) {
    const int threads = 64;
    int* d = device_alloc<int>(4 * threads);
    MM_LAUNCH(1, threads, 0, nullptr, shuffles_kernel)(d);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    std::vector<int> out(4 * threads);
    ASSERT_EQ(cudaMemcpy(out.data(), d, out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int t = 0; t < threads; ++t) {
        const int w = 100 * (t / 32), lane = t % 32;
        EXPECT_EQ(out[4 * t + 0], w + (lane ^ 5)) << t;
        // down by 3 inside segments of 16: lanes whose source leaves the segment keep their value
        EXPECT_EQ(out[4 * t + 1], w + (lane % 16 + 3 < 16 ? lane + 3 : lane)) << t;
        EXPECT_EQ(out[4 * t + 2], w + (lane >= 2 ? lane - 2 : lane)) << t;
        EXPECT_EQ(out[4 * t + 3], w + lane / 8 * 8 + 7) << t;
    }
    cudaFree(d);
}

TEST_F(CudaEmu, IndicesCoverEveryThreadOfA3dLaunch) {
    const dim3 grid(3, 2, 2), block(4, 3, 2);
    const int total = 12 * 24;
    int* d = device_alloc<int>(total);
    MM_LAUNCH(grid, block, 0, nullptr, index_kernel)(d);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    std::vector<int> out(total);
    ASSERT_EQ(cudaMemcpy(out.data(), d, total * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int b = 0; b < 12; ++b)
        for (int t = 0; t < 24; ++t) EXPECT_EQ(out[b * 24 + t], 1000 * b + t);
    cudaFree(d);
}

// A shared-memory read that misses its barrier gives a wrong answer (threads of odd blocks run in
// reverse order), so the emulated tests catch it instead of passing by luck.
TEST_F(CudaEmu, AMissingBarrierShows) {
    const int n = 128, blocks = 2;
    std::vector<float> x(n * blocks);
    std::iota(x.begin(), x.end(), 1.0f);
    float* dx = device_alloc<float>(x.size());
    float* dy = device_alloc<float>(x.size());
    ASSERT_EQ(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    auto wrong_count = [&] {
        std::vector<float> y(x.size());
        EXPECT_EQ(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        int wrong = 0;
        for (int b = 0; b < blocks; ++b)
            for (int t = 0; t < n; ++t) wrong += y[b * n + t] != x[b * n + (t + 1) % n];
        return wrong;
    };
    MM_LAUNCH(blocks, n, 0, nullptr, rotate_kernel<true>)(dx, dy);
    EXPECT_EQ(wrong_count(), 0);
    MM_LAUNCH(blocks, n, 0, nullptr, rotate_kernel<false>)(dx, dy);
    EXPECT_GT(wrong_count(), 0);
    cudaFree(dx);
    cudaFree(dy);
}

// A GPU runs a launch's blocks in no set order, so the block that finishes last (and does a
// last-block step) can be any of them: the emulator runs each launch's blocks in a permutation of
// its own, so that a final step that only works in the highest-numbered block fails here too.
// (MOEMESH_CUDA_EMU_BLOCK_ORDER=index, the old order, fails this test.)
TEST_F(CudaEmu, EachLaunchRunsItsBlocksInAnOrderOfItsOwn) {
    const dim3 grid(3, 2, 2);
    const int n = 12, launches = 16;
    unsigned* counters = device_alloc<unsigned>(2);
    int* seen = device_alloc<int>(n);
    int* partial = device_alloc<int>(n);
    int* last_and_sum = device_alloc<int>(2);
    ASSERT_EQ(cudaMemset(counters, 0, 2 * sizeof(unsigned)), cudaSuccess);
    std::vector<std::vector<int>> orders;
    std::vector<int> lasts;
    for (int l = 0; l < launches; ++l) {
        MM_LAUNCH(grid, 64, 0, nullptr, finish_order_kernel)(counters, seen, partial, last_and_sum);
        ASSERT_EQ(cudaGetLastError(), cudaSuccess);
        std::vector<int> order(n), ls(2);
        ASSERT_EQ(cudaMemcpy(order.data(), seen, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(ls.data(), last_and_sum, 8, cudaMemcpyDeviceToHost), cudaSuccess);
        std::vector<int> sorted = order;
        std::sort(sorted.begin(), sorted.end());
        for (int b = 0; b < n; ++b) ASSERT_EQ(sorted[b], b) << "launch " << l << ": every block runs once";
        EXPECT_EQ(ls[0], order[n - 1]) << "the last block counted is the last one run";
        EXPECT_EQ(ls[1], 10 * n * (n - 1) / 2 + n) << "the last block sees every block's partial";
        orders.push_back(order);
        lasts.push_back(ls[0]);
    }
    std::sort(orders.begin(), orders.end());
    EXPECT_GE(std::unique(orders.begin(), orders.end()) - orders.begin(), launches - 1) << "an order per launch";
    std::sort(lasts.begin(), lasts.end());
    EXPECT_GE(std::unique(lasts.begin(), lasts.end()) - lasts.begin(), 5) << "the last block varies";
    cudaFree(counters);
    cudaFree(seen);
    cudaFree(partial);
    cudaFree(last_and_sum);
}

TEST_F(CudaEmu, DynamicSharedMemoryNeedsTheOptInAboveTheDefault) {
    float* d = device_alloc<float>(1);
    MM_LAUNCH(2, 128, 1000 * sizeof(float), nullptr, dynamic_smem_kernel)(d, 1000);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    float s = 0;
    ASSERT_EQ(cudaMemcpy(&s, d, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(s, 999.0f * 1000.0f / 2.0f);

    const int big = 20000;  // 80 KB: above the 48 KiB default
    MM_LAUNCH(1, 128, big * sizeof(float), nullptr, dynamic_smem_kernel)(d, big);
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
    ASSERT_EQ(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, big * 4),
              cudaSuccess);
    MM_LAUNCH(1, 128, big * sizeof(float), nullptr, dynamic_smem_kernel)(d, big);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(&s, d, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_NEAR(s, 19999.0 * 20000.0 / 2.0, 1e4);
    cudaFree(d);
}

TEST_F(CudaEmu, BadLaunchConfigurationsAreRefused) {
    float* d = device_alloc<float>(4096);
    MM_LAUNCH(1, 2048, 0, nullptr, scale_kernel)(d, 2.0f, 4096);
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
    MM_LAUNCH(0, 128, 0, nullptr, scale_kernel)(d, 2.0f, 4096);
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // not sticky
    cudaFree(d);
}

// MOEMESH_CUDA_EMU_CC below 9.0: the device reports it, and the emulated build (compute 9.0 and up)
// has no code for it — launches and cudaFuncGetAttributes fail as on an sm_89 GPU, not stickily.
TEST_F(CudaEmu, AnOlderComputeCapabilityHasNoKernelImage) {
    float* d = device_alloc<float>(128);
    cudaFuncAttributes attr{};
    const void* fn = reinterpret_cast<const void*>(&scale_kernel);
    ASSERT_EQ(setenv("MOEMESH_CUDA_EMU_CC", "8.6", 1), 0);
    cudaDeviceProp p{};
    ASSERT_EQ(cudaGetDeviceProperties(&p, 0), cudaSuccess);
    EXPECT_EQ(p.major * 10 + p.minor, 86);
    EXPECT_EQ(cudaFuncGetAttributes(&attr, fn), cudaErrorNoKernelImageForDevice);
    MM_LAUNCH(1, 128, 0, nullptr, scale_kernel)(d, 2.0f, 128);
    EXPECT_EQ(cudaGetLastError(), cudaErrorNoKernelImageForDevice);
    ASSERT_EQ(setenv("MOEMESH_CUDA_EMU_CC", "12.0", 1), 0);
    EXPECT_EQ(cudaFuncGetAttributes(&attr, fn), cudaSuccess);
    ASSERT_EQ(unsetenv("MOEMESH_CUDA_EMU_CC"), 0);
    ASSERT_EQ(cudaGetDeviceProperties(&p, 0), cudaSuccess);
    EXPECT_EQ(p.major * 10 + p.minor, 90);
    std::vector<float> y(128, 1.0f);
    ASSERT_EQ(cudaMemcpy(d, y.data(), sizeof(float) * 128, cudaMemcpyHostToDevice), cudaSuccess);
    MM_LAUNCH(1, 128, 0, nullptr, scale_kernel)(d, 2.0f, 128);
    ASSERT_EQ(cudaMemcpy(y.data(), d, sizeof(float) * 128, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(y[127], 2.0f);
    cudaFree(d);
}

TEST_F(CudaEmu, DivergentBarriersFailTheLaunch) {
    float* d = device_alloc<float>(64);
    MM_LAUNCH(1, 64, 0, nullptr, divergent_kernel)(d);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
    EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);  // sticky, as a GPU's launch failure
    std::vector<float> y(64);
    EXPECT_EQ(cudaMemcpy(y.data(), d, 256, cudaMemcpyDeviceToHost), cudaErrorLaunchFailure);
}

TEST_F(CudaEmu, AShuffleWithExitedLanesFailsTheLaunch) {
    std::vector<float> x(32, 1.0f);
    float* dx = device_alloc<float>(32);
    float* dy = device_alloc<float>(1);
    ASSERT_EQ(cudaMemcpy(dx, x.data(), 128, cudaMemcpyHostToDevice), cudaSuccess);
    MM_LAUNCH(1, 32, 0, nullptr, early_exit_kernel)(dx, 32, dy);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    float s = 0;
    ASSERT_EQ(cudaMemcpy(&s, dy, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(s, 32.0f);
    MM_LAUNCH(1, 32, 0, nullptr, early_exit_kernel)(dx, 20, dy);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
}

TEST_F(CudaEmu, CopiesCheckWhichSideIsDeviceMemory) {
    std::vector<float> host(16, 1.0f), host2(16);
    float* d = device_alloc<float>(16);
    EXPECT_EQ(cudaMemcpy(d, host.data(), 64, cudaMemcpyHostToDevice), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host2.data(), host.data(), 64, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
    EXPECT_EQ(cudaMemcpy(host2.data(), d, 64, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
    EXPECT_EQ(cudaMemcpy(host2.data(), d, 65 * 4, cudaMemcpyDeviceToHost), cudaErrorInvalidValue);  // past the end
    EXPECT_EQ(cudaMemcpy(host2.data(), d, 64, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(host2, host);
    EXPECT_EQ(cudaFree(host2.data()), cudaErrorInvalidValue);
    // Fresh device memory is not zero: it reads as NaN until written.
    float* fresh = device_alloc<float>(4);
    float f = 0;
    EXPECT_EQ(cudaMemcpy(&f, fresh, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_TRUE(std::isnan(f));
    cudaFree(fresh);
    cudaFree(d);
}

TEST_F(CudaEmu, GraphsReplayTheCapturedArgumentsAndReadHostBuffersAtReplay) {
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    float* d = device_alloc<float>(4);
    std::vector<float> in{1, 2, 3, 4}, out(4);
    float a = 2.0f;
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(d, in.data(), 16, cudaMemcpyHostToDevice, s), cudaSuccess);
    MM_LAUNCH(1, 32, 0, s, scale_kernel)(d, a, 4);
    ASSERT_EQ(cudaMemcpyAsync(out.data(), d, 16, cudaMemcpyDeviceToHost, s), cudaSuccess);
    cudaGraph_t g;
    ASSERT_EQ(cudaStreamEndCapture(s, &g), cudaSuccess);
    EXPECT_EQ(out, std::vector<float>(4, 0.0f));  // nothing ran while capturing
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
    a = 10.0f;          // the graph keeps the value it captured
    in = {5, 6, 7, 8};  // but copies read the host buffer when replayed
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_EQ(out, (std::vector<float>{10, 12, 14, 16}));

    // A graph of another shape does not update the executable one; a synchronize inside a capture
    // fails and invalidates it.
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    MM_LAUNCH(1, 32, 0, s, scale_kernel)(d, a, 4);
    EXPECT_EQ(cudaStreamSynchronize(s), cudaErrorStreamCaptureUnsupported);
    cudaGraph_t g2;
    EXPECT_EQ(cudaStreamEndCapture(s, &g2), cudaErrorStreamCaptureInvalidated);
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    MM_LAUNCH(1, 32, 0, s, scale_kernel)(d, a, 4);
    ASSERT_EQ(cudaStreamEndCapture(s, &g2), cudaSuccess);
    cudaGraphExecUpdateResultInfo info{};
    EXPECT_EQ(cudaGraphExecUpdate(exec, g2, &info), cudaErrorGraphExecUpdateFailure);
    (void)cudaGetLastError();
    cudaGraphDestroy(g2);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    cudaStreamDestroy(s);
    cudaFree(d);
}

// Another process opens the allocation through its IPC handle and sees (and writes) the same memory.
TEST_F(CudaEmu, IpcHandlesShareAnAllocationWithAnotherProcess) {
    const int n = 1000;
    std::vector<float> x(n);
    std::iota(x.begin(), x.end(), 0.0f);
    float* d = device_alloc<float>(n);
    ASSERT_EQ(cudaMemcpy(d, x.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    cudaIpcMemHandle_t h;
    ASSERT_EQ(cudaIpcGetMemHandle(&h, d), cudaSuccess);
    void* self = nullptr;
    EXPECT_EQ(cudaIpcOpenMemHandle(&self, h, cudaIpcMemLazyEnablePeerAccess), cudaErrorInvalidValue);
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
        // The child: open, check, scale in place with a kernel, close.
        void* p = nullptr;
        if (cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) _exit(2);
        std::vector<float> y(n);
        if (cudaMemcpy(y.data(), p, n * 4, cudaMemcpyDeviceToHost) != cudaSuccess || y != x) _exit(3);
        if (cudaMemcpy(y.data(), p, (n + 1) * 4, cudaMemcpyDeviceToHost) == cudaSuccess) _exit(4);  // past its size
        MM_LAUNCH(4, 256, 0, nullptr, scale_kernel)(static_cast<float*>(p), 3.0f, n);
        if (cudaDeviceSynchronize() != cudaSuccess || cudaIpcCloseMemHandle(p) != cudaSuccess) _exit(5);
        _exit(0);
    }
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0);
    std::vector<float> y(n);
    ASSERT_EQ(cudaMemcpy(y.data(), d, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int i = 0; i < n; ++i) EXPECT_EQ(y[i], 3.0f * x[i]) << i;
    cudaIpcMemHandle_t bad{};
    EXPECT_EQ(cudaIpcOpenMemHandle(&self, bad, 0), cudaErrorInvalidValue);
    EXPECT_EQ(cudaFree(d), cudaSuccess);
}

__global__ void write_kernel(float* x, int n) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n) x[i] = 1.0f;
}

// A kernel that writes past the end of its allocation dies naming the kernel and the thread (as
// compute-sanitizer reports it), instead of corrupting a neighbour.
TEST(CudaEmuDeathTest, AKernelWritingPastItsAllocationDiesNamingIt) {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_DEATH(
        {
            float* d = nullptr;
            if (cudaMalloc(&d, 1000 * sizeof(float)) != cudaSuccess) return;
            MM_LAUNCH(8, 256, 0, nullptr, write_kernel)(d, 2048);
        },
        "kernel write_kernel: invalid access at .* by thread \\([0-9]+,0,0\\) of block \\([0-9],0,0\\)");
}

// Work on a stream runs when the host waits for it, so a missing synchronization reads stale data
// (as it can on a GPU) instead of passing by luck.
TEST_F(CudaEmu, StreamWorkRunsWhenTheHostWaitsForIt) {
    cudaStream_t nb, bl, other;
    ASSERT_EQ(cudaStreamCreateWithFlags(&nb, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(cudaStreamCreate(&bl), cudaSuccess);  // blocking: ordered with the legacy stream
    ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
    float* d = device_alloc<float>(4);
    float* pinned = nullptr;
    ASSERT_EQ(cudaHostAlloc(&pinned, 16, cudaHostAllocDefault), cudaSuccess);
    std::vector<float> one(4, 1.0f), got(4);
    ASSERT_EQ(cudaMemcpy(d, one.data(), 16, cudaMemcpyHostToDevice), cudaSuccess);
    for (int i = 0; i < 4; ++i) pinned[i] = -1.0f;

    // A kernel and a copy into pinned memory on a non-blocking stream: nothing has run yet.
    MM_LAUNCH(1, 32, 0, nb, scale_kernel)(d, 2.0f, 4);
    ASSERT_EQ(cudaMemcpyAsync(pinned, d, 4, cudaMemcpyDeviceToHost, nb), cudaSuccess);
    EXPECT_EQ(pinned[0], -1.0f);
    // A synchronous copy waits for the blocking streams only: it still sees 1.
    ASSERT_EQ(cudaMemcpy(got.data(), d, 16, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got[0], 1.0f);
    // An event recorded after the kernel: waiting for it runs the kernel, not the copy after it...
    cudaEvent_t ev;
    ASSERT_EQ(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), cudaSuccess);
    MM_LAUNCH(1, 32, 0, nb, scale_kernel)(d, 3.0f, 4);
    ASSERT_EQ(cudaEventRecord(ev, nb), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(pinned + 1, d, 4, cudaMemcpyDeviceToHost, nb), cudaSuccess);
    ASSERT_EQ(cudaEventSynchronize(ev), cudaSuccess);
    EXPECT_EQ(pinned[0], 2.0f);   // the first copy ran (it came before the event)
    EXPECT_EQ(pinned[1], -1.0f);  // the second did not
    // ...a stream that waits for the event runs it first; then its own work.
    ASSERT_EQ(cudaStreamWaitEvent(other, ev, 0), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(pinned + 2, d, 4, cudaMemcpyDeviceToHost, other), cudaSuccess);
    EXPECT_EQ(cudaStreamQuery(other), cudaErrorNotReady);  // pending work is reported (and then run)
    ASSERT_EQ(cudaStreamSynchronize(other), cudaSuccess);
    EXPECT_EQ(pinned[2], 6.0f);
    EXPECT_EQ(pinned[1], -1.0f);
    ASSERT_EQ(cudaStreamSynchronize(nb), cudaSuccess);
    EXPECT_EQ(pinned[1], 6.0f);
    // A blocking stream's work is waited for by the legacy stream.
    MM_LAUNCH(1, 32, 0, bl, scale_kernel)(d, 0.5f, 4);
    ASSERT_EQ(cudaMemcpy(got.data(), d, 16, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got[0], 3.0f);
    // Pageable host memory makes an async copy synchronous.
    ASSERT_EQ(cudaMemcpyAsync(got.data(), d, 16, cudaMemcpyDeviceToHost, nb), cudaSuccess);
    EXPECT_EQ(got[3], 3.0f);
    cudaEventDestroy(ev);
    cudaStreamDestroy(nb);
    cudaStreamDestroy(bl);
    cudaStreamDestroy(other);
    cudaFreeHost(pinned);
    cudaFree(d);
}

// A kernel given memory its device cannot reach (pageable host memory, another GPU's memory without
// peer access) is refused with an illegal-address error, as the GPU would fault.
TEST_F(CudaEmu, KernelPointersMustBeReachableFromTheDevice) {
    std::vector<float> host(64, 1.0f);
    MM_LAUNCH(1, 64, 0, nullptr, scale_kernel)(host.data(), 2.0f, 64);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
    cudaDeviceReset();
    float* pinned = nullptr;
    ASSERT_EQ(cudaHostAlloc(&pinned, 64 * 4, cudaHostAllocDefault), cudaSuccess);
    for (int i = 0; i < 64; ++i) pinned[i] = 1.0f;
    MM_LAUNCH(1, 64, 0, nullptr, scale_kernel)(pinned, 2.0f, 64);  // pinned memory is mapped: fine
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(pinned[63], 2.0f);
    cudaFreeHost(pinned);
    int n = 0;
    ASSERT_EQ(cudaGetDeviceCount(&n), cudaSuccess);
    if (n < 2) GTEST_SKIP() << "one emulated device (MOEMESH_CUDA_EMU_DEVICES=2 runs the rest)";
    ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
    float* d1 = device_alloc<float>(64);
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    MM_LAUNCH(1, 64, 0, nullptr, scale_kernel)(d1, 2.0f, 64);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
    cudaDeviceReset();
    ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
    MM_LAUNCH(1, 64, 0, nullptr, scale_kernel)(d1, 2.0f, 64);  // on its own device: fine
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(d1);
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
}

TEST_F(CudaEmu, DeviceMemoryIsBudgeted) {
    size_t free0 = 0, total = 0;
    ASSERT_EQ(cudaMemGetInfo(&free0, &total), cudaSuccess);
    void* p = nullptr;
    ASSERT_EQ(cudaMalloc(&p, 1 << 20), cudaSuccess);
    size_t free1 = 0;
    ASSERT_EQ(cudaMemGetInfo(&free1, &total), cudaSuccess);
    EXPECT_EQ(free0 - free1, size_t{1} << 20);
    void* q = nullptr;
    EXPECT_EQ(cudaMalloc(&q, total), cudaErrorMemoryAllocation);
    (void)cudaGetLastError();
    cudaFree(p);
}

// The emulated cublasGemmEx and cublasGemmGroupedBatchedEx keep cuBLAS's column-major meaning (checked
// against products worked by hand, not against our own callers), its argument checks, and run as
// stream work.
TEST_F(CudaEmu, CublasGemmsAreColumnMajorAndCheckTheirOperands) {
    // A = [1 2 3; 4 5 6] (2 × 3) column-major: {1, 4, 2, 5, 3, 6}; B = [1 0; 0 1; 1 1] (3 × 2): {1, 0, 1, 0, 1, 1}.
    const std::vector<float> a = {1, 4, 2, 5, 3, 6}, b = {1, 0, 1, 0, 1, 1};
    float *da, *db, *dc;
    ASSERT_EQ(cudaMalloc(&da, a.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&db, b.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dc, 6 * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(da, a.data(), a.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(db, b.data(), b.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    cudaStream_t s = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    cublasHandle_t h = nullptr;
    ASSERT_EQ(cublasCreate_v2(&h), CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cublasSetStream_v2(h, s), CUBLAS_STATUS_SUCCESS);
    const float one = 1.0f, zero = 0.0f;
    // A · B = [1+3 2+3; 4+6 5+6] = [4 5; 10 11], column-major {4, 10, 5, 11}.
    ASSERT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 2, db, CUDA_R_32F, 3, &zero, dc,
                           CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_SUCCESS);
    std::vector<float> c(4, -1.0f);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(c.data(), dc, 16, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(c, (std::vector<float>{4, 10, 5, 11}));
    // Bᵀ · Aᵀ (op T on both, the stored B as 3 × 2 with ldb 3 and A as 2 × 3 with lda 2) = (A · B)ᵀ
    // = [4 10; 5 11], column-major {4, 5, 10, 11}; into C with ldc 3 (row 2 of each column untouched).
    ASSERT_EQ(cudaMemset(dc, 0, 6 * 4), cudaSuccess);
    ASSERT_EQ(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_T, 2, 2, 3, &one, db, CUDA_R_32F, 3, da, CUDA_R_32F, 2, &zero, dc,
                           CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_SUCCESS);
    c.assign(6, -1.0f);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(c.data(), dc, 24, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(c, (std::vector<float>{4, 5, 0, 10, 11, 0}));
    // Arguments cuBLAS refuses: lda below A's rows, a host operand (a GPU would fault), types it lacks.
    EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 1, db, CUDA_R_32F, 3, &zero, dc,
                           CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_INVALID_VALUE);
    EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, a.data(), CUDA_R_32F, 2, db, CUDA_R_32F, 3,
                           &zero, dc, CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_EXECUTION_FAILED);
    EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 2, db, CUDA_R_16F, 3, &zero, dc,
                           CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_NOT_SUPPORTED);
    // The same two products as one grouped call (two groups of one problem, each with its own
    // transposes and leading dimensions), the pointers in a device array.
    float* dc2;
    ASSERT_EQ(cudaMalloc(&dc2, 6 * 4), cudaSuccess);
    ASSERT_EQ(cudaMemset(dc2, 0, 6 * 4), cudaSuccess);
    const std::vector<const void*> ptrs = {da, db, db, da, dc, dc2};  // [A0 A1 | B0 B1 | C0 C1]
    const void** dptrs;
    ASSERT_EQ(cudaMalloc(&dptrs, ptrs.size() * sizeof(void*)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dptrs, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice), cudaSuccess);
    const cublasOperation_t ta[] = {CUBLAS_OP_N, CUBLAS_OP_T}, tb[] = {CUBLAS_OP_N, CUBLAS_OP_T};
    const int mm[] = {2, 2}, nn[] = {2, 2}, kk[] = {3, 3}, lda[] = {2, 3}, ldb[] = {3, 2}, ldc[] = {2, 3};
    const int size[] = {1, 1};
    const float alphas[] = {1, 1}, betas[] = {0, 0};
    ASSERT_EQ(cublasGemmGroupedBatchedEx(h, ta, tb, mm, nn, kk, alphas, dptrs, CUDA_R_32F, lda, dptrs + 2, CUDA_R_32F,
                                         ldb, betas, const_cast<void* const*>(dptrs + 4), CUDA_R_32F, ldc, 2, size,
                                         CUBLAS_COMPUTE_32F),
              CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    c.assign(4, -1.0f);
    ASSERT_EQ(cudaMemcpy(c.data(), dc, 16, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(c, (std::vector<float>{4, 10, 5, 11}));
    c.assign(6, -1.0f);
    ASSERT_EQ(cudaMemcpy(c.data(), dc2, 24, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(c, (std::vector<float>{4, 5, 0, 10, 11, 0}));
    // Pointer arrays in host memory are refused (cuBLAS reads them on the device).
    EXPECT_EQ(cublasGemmGroupedBatchedEx(h, ta, tb, mm, nn, kk, alphas, ptrs.data(), CUDA_R_32F, lda, ptrs.data() + 2,
                                         CUDA_R_32F, ldb, betas, const_cast<void* const*>(ptrs.data() + 4), CUDA_R_32F,
                                         ldc, 2, size, CUBLAS_COMPUTE_32F),
              CUBLAS_STATUS_EXECUTION_FAILED);
    cudaFree(dptrs);
    cudaFree(dc2);
    EXPECT_EQ(cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
    cudaFree(da);
    cudaFree(db);
    cudaFree(dc);
}

}  // namespace
