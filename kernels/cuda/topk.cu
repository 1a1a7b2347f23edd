// Router: softmax over E expert logits, top-K, optional renormalisation. One warp per token
// (topk_dev.cuh): no shared memory, barrier or serial pass of one thread (the shared-memory version
// took 9.4 µs per decode step on an H200 under ncu; with 8 warps 8.7 µs). Also: argmax of rows.
#include <cuda_runtime.h>

#include "common/status.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/topk_dev.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

// grid: tokens, block: one warp; E <= 32 · NP, K <= 32.
template <int NP>
__global__ void __launch_bounds__(kWarp) softmax_topk_kernel(float* logits, int64_t E, int K, bool norm_topk,
                                                              int32_t* ids, float* weights) {
    grid_dep_wait();
    const int64_t t = blockIdx.x;
    softmax_topk_warp<NP>(logits + t * E, E, K, norm_topk, ids + t * K, weights + t * K);
}

// ---- argmax of logits rows (greedy decoding on the device) ----
// Two launches: grid (blocks per row, rows) of kArgThreads, block b of row r the best (value, index)
// of the kArgPerBlock elements from b · kArgPerBlock into part[r, b]; then one block per row reduces
// its parts.
constexpr int kArgThreads = 256;
constexpr int64_t kArgPerBlock = 4096;
constexpr int64_t kArgMaxBlocks = 1024;  // n <= 4M

// Blocks of kArgPerBlock per row of n.
inline int64_t arg_blocks(int64_t n) { return (n + kArgPerBlock - 1) / kArgPerBlock; }

// The block's best (v, i) over every thread's, in thread 0 (others: unspecified).
__device__ __forceinline__ void block_arg_best(float& v, int& i) {
    __shared__ float sv[kArgThreads / kWarp];
    __shared__ int si[kArgThreads / kWarp];
    warp_best(v, i);
    const int w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) sv[w] = v, si[w] = i;
    __syncthreads();
    if (w == 0) {
        v = lane < kArgThreads / kWarp ? sv[lane] : -INFINITY;
        i = lane < kArgThreads / kWarp ? si[lane] : INT_MAX;
        warp_best(v, i);
    }
}

__global__ void __launch_bounds__(kArgThreads) argmax_part_kernel(const float* __restrict__ x, int64_t n,
                                                                   float* part_v, int* part_i) {
    grid_dep_wait();
    const int64_t r = blockIdx.y;
    const float* xr = x + r * n;
    const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kArgPerBlock;
    const int64_t b1 = b0 + kArgPerBlock < n ? b0 + kArgPerBlock : n;
    // -inf / INT_MAX loses to every value but NaN (an all-NaN part stays out of the row's result).
    float v = -INFINITY;
    int i = INT_MAX;
    constexpr int kUnroll = 4;  // independent loads in flight per thread
    int64_t j = b0 + threadIdx.x;
    for (; j + (kUnroll - 1) * kArgThreads < b1; j += kUnroll * kArgThreads) {
        float e[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) e[u] = xr[j + u * kArgThreads];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int at = static_cast<int>(j + u * kArgThreads);
            if (beats(e[u], at, v, i)) v = e[u], i = at;
        }
    }
    for (; j < b1; j += kArgThreads)
        if (beats(xr[j], static_cast<int>(j), v, i)) v = xr[j], i = static_cast<int>(j);
    block_arg_best(v, i);
    if (threadIdx.x == 0) part_v[r * gridDim.x + blockIdx.x] = v, part_i[r * gridDim.x + blockIdx.x] = i;
}

__global__ void __launch_bounds__(kArgThreads) argmax_final_kernel(const float* __restrict__ x, int64_t n, int nb,
                                                                    const float* part_v, const int* part_i,
                                                                    int32_t* ids) {
    grid_dep_wait();
    const int64_t r = blockIdx.x;
    float v = -INFINITY;
    int i = INT_MAX;
    for (int b = threadIdx.x; b < nb; b += kArgThreads)
        if (beats(part_v[r * nb + b], part_i[r * nb + b], v, i)) v = part_v[r * nb + b], i = part_i[r * nb + b];
    block_arg_best(v, i);
    // The scalar loop `if (x[j] > x[best]) best = j` from best = 0: a NaN at 0 is never beaten.
    if (threadIdx.x == 0) ids[r] = x[r * n] != x[r * n] ? 0 : i;
}

// ---- top-k of logits rows (sampling on the device: the candidates instead of the logits) ----
// The same two launches as the argmax: block b of row r the k best (value, index) of its
// kArgPerBlock elements into part[r, b, 0..k) in order, then one block per row the k best of the
// row's nb · k parts. Each pass: the elements in registers (kTopRegs per thread, each with its id
// and a taken bit), k rounds of a block-wide best over the untaken ones.
constexpr int kTopRegs = static_cast<int>(kArgPerBlock / kArgThreads);  // 16

// k rounds over v/id (kTopRegs per thread; id INT_MAX: no element): out_v/out_i[0..k) the best in
// order (an element that never beats anything, a NaN or a missing one, is never taken: rounds past
// the last takeable element give (-inf, INT_MAX)).
__device__ __forceinline__ void block_top_k(const float (&v)[kTopRegs], const int (&id)[kTopRegs], int k,
                                            float* out_v, int* out_i) {
    __shared__ int wi;
    unsigned taken = 0;
    for (int r = 0; r < k; ++r) {
        float bv = -INFINITY;
        int bi = INT_MAX;
#pragma unroll
        for (int j = 0; j < kTopRegs; ++j)
            if (!(taken >> j & 1u) && beats(v[j], id[j], bv, bi)) bv = v[j], bi = id[j];
        block_arg_best(bv, bi);
        if (threadIdx.x == 0) {
            wi = bi;
            out_v[r] = bv, out_i[r] = bi;
        }
        __syncthreads();
        const int won = wi;
#pragma unroll
        for (int j = 0; j < kTopRegs; ++j)
            if (id[j] == won && won != INT_MAX) taken |= 1u << j;
        __syncthreads();  // wi and block_arg_best's shared arrays are rewritten next round
    }
}

__global__ void __launch_bounds__(kArgThreads) topk_part_kernel(const float* __restrict__ x, int64_t n, int k,
                                                                 float* part_v, int* part_i) {
    grid_dep_wait();
    const int64_t r = blockIdx.y;
    const float* xr = x + r * n;
    const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kArgPerBlock;
    float v[kTopRegs];
    int id[kTopRegs];
#pragma unroll
    for (int j = 0; j < kTopRegs; ++j) {
        const int64_t e = b0 + threadIdx.x + static_cast<int64_t>(j) * kArgThreads;
        v[j] = e < n ? xr[e] : -INFINITY;
        id[j] = e < n ? static_cast<int>(e) : INT_MAX;
    }
    const int64_t at = (r * gridDim.x + blockIdx.x) * k;
    block_top_k(v, id, k, part_v + at, part_i + at);
}

__global__ void __launch_bounds__(kArgThreads) topk_final_kernel(int nb, int k, const float* part_v,
                                                                  const int* part_i, int32_t* ids, float* vals) {
    grid_dep_wait();
    const int64_t r = blockIdx.x;
    const int64_t m = static_cast<int64_t>(nb) * k;
    float v[kTopRegs];
    int id[kTopRegs];
#pragma unroll
    for (int j = 0; j < kTopRegs; ++j) {
        const int64_t e = threadIdx.x + static_cast<int64_t>(j) * kArgThreads;
        v[j] = e < m ? part_v[r * m + e] : -INFINITY;
        id[j] = e < m ? part_i[r * m + e] : INT_MAX;
    }
    __shared__ float best_v[kTopKMax];
    __shared__ int best_i[kTopKMax];
    block_top_k(v, id, k, best_v, best_i);
    for (int j = threadIdx.x; j < k; j += kArgThreads) {
        ids[r * k + j] = best_i[j] == INT_MAX ? -1 : best_i[j];
        vals[r * k + j] = best_v[j];
    }
}

}  // namespace

size_t top_k_workspace_bytes(int64_t rows, int64_t n, int64_t k) {
    const int64_t nb = arg_blocks(n);
    return static_cast<size_t>(rows * nb * k) * (sizeof(float) + sizeof(int));
}

void top_k_rows(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals, void* workspace,
                cudaStream_t stream) {
    const int64_t nb = arg_blocks(n);
    MM_CHECK(k > 0 && k <= kTopKMax && k <= n && n <= INT_MAX && nb * k <= kArgPerBlock && rows <= 65535);
    if (rows <= 0) return;
    float* part_v = static_cast<float*>(workspace);
    int* part_i = reinterpret_cast<int*>(part_v + rows * nb * k);
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(rows));
    MM_LAUNCH_PDL(grid, kArgThreads, 0, stream, topk_part_kernel)(x, n, static_cast<int>(k), part_v, part_i);
    CUDA_CHECK_LAUNCH();
    MM_LAUNCH_PDL(static_cast<unsigned>(rows), kArgThreads, 0, stream, topk_final_kernel)(
        static_cast<int>(nb), static_cast<int>(k), part_v, part_i, ids, vals);
    CUDA_CHECK_LAUNCH();
}

size_t argmax_workspace_bytes(int64_t rows, int64_t n) {
    const int64_t nb = arg_blocks(n);
    return static_cast<size_t>(rows * nb) * (sizeof(float) + sizeof(int));
}

void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids, void* workspace, cudaStream_t stream) {
    const int64_t nb = arg_blocks(n);
    MM_CHECK(n > 0 && n <= INT_MAX && nb <= kArgMaxBlocks && rows <= 65535);
    if (rows <= 0) return;
    float* part_v = static_cast<float*>(workspace);
    int* part_i = reinterpret_cast<int*>(part_v + rows * nb);
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(rows));
    MM_LAUNCH_PDL(grid, kArgThreads, 0, stream, argmax_part_kernel)(x, n, part_v, part_i);
    CUDA_CHECK_LAUNCH();
    MM_LAUNCH_PDL(static_cast<unsigned>(rows), kArgThreads, 0, stream, argmax_final_kernel)(x, n, static_cast<int>(nb),
                                                                                             part_v, part_i, ids);
    CUDA_CHECK_LAUNCH();
}

void softmax_topk(float* logits, int64_t tokens, int64_t E, int64_t K, bool norm_topk, int32_t* ids, float* weights,
                  cudaStream_t stream) {
    MM_CHECK(E > 0 && E <= kRouterMaxExperts && K > 0 && K <= kRouterMaxTopk && K <= E);
    if (tokens <= 0) return;
    const unsigned grid = static_cast<unsigned>(tokens);
    const int k = static_cast<int>(K);
    if (E <= 4 * kWarp) MM_LAUNCH_PDL(grid, kWarp, 0, stream, softmax_topk_kernel<4>)(logits, E, k, norm_topk, ids, weights);
    else if (E <= 8 * kWarp) MM_LAUNCH_PDL(grid, kWarp, 0, stream, softmax_topk_kernel<8>)(logits, E, k, norm_topk, ids, weights);
    else if (E <= 16 * kWarp) MM_LAUNCH_PDL(grid, kWarp, 0, stream, softmax_topk_kernel<16>)(logits, E, k, norm_topk, ids, weights);
    else MM_LAUNCH_PDL(grid, kWarp, 0, stream, softmax_topk_kernel<32>)(logits, E, k, norm_topk, ids, weights);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
