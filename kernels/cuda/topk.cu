// Router: softmax over E expert logits, top-K, optional renormalisation. One warp per token: its K
// rounds of argmax are warp shuffles alone (with 8 warps each round also went through shared memory,
// two barriers and a serial pass of thread 0: 8.7 µs per decode step on an H200 under ncu).
#include <cuda_runtime.h>

#include "common/status.h"
#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

constexpr int kTopkThreads = 32;  // one warp (the kernel takes any multiple of 32)
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopk = 32;

// a beats b: larger probability, and on equal probabilities the lower expert id (as route()).
__device__ __forceinline__ bool beats(float pa, int ia, float pb, int ib) {
    return pa > pb || (pa == pb && ia < ib);
}

__global__ void softmax_topk_kernel(float* logits, int64_t E, int K, bool norm_topk, int32_t* ids, float* weights) {
    __shared__ float p[kMaxExperts];
    __shared__ float red[kWarp];
    __shared__ float best_p[kWarp];
    __shared__ int best_i[kWarp];
    __shared__ int sel[kMaxTopk];
    const int64_t t = blockIdx.x;
    float* lr = logits + t * E;
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;

    float mx = -INFINITY;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        p[i] = lr[i];
        mx = fmaxf(mx, p[i]);
    }
    mx = block_max(mx, red);
    float s = 0.0f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        p[i] = expf(p[i] - mx);
        s += p[i];
    }
    const float inv = 1.0f / block_sum(s, red);
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        p[i] *= inv;
        lr[i] = p[i];
    }
    __syncthreads();

    // K rounds of a block-wide argmax; a chosen expert's p is set to -inf so it is not chosen again
    // (lr keeps the probabilities).
    for (int j = 0; j < K; ++j) {
        float bp = -INFINITY;
        int bi = INT_MAX;
        for (int i = threadIdx.x; i < E; i += blockDim.x)
            if (beats(p[i], i, bp, bi)) bp = p[i], bi = i;
#pragma unroll
        for (int o = kWarp / 2; o > 0; o >>= 1) {
            const float op = __shfl_xor_sync(0xffffffffu, bp, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (beats(op, oi, bp, bi)) bp = op, bi = oi;
        }
        if (lane == 0) best_p[wid] = bp, best_i[wid] = bi;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < nw; ++w)
                if (beats(best_p[w], best_i[w], bp, bi)) bp = best_p[w], bi = best_i[w];
            sel[j] = bi;
            p[bi] = -INFINITY;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int j = 0; j < K; ++j) sum += lr[sel[j]];
        const float d = norm_topk ? fmaxf(sum, 6.103515625e-5f) : 1.0f;
        for (int j = 0; j < K; ++j) {
            ids[t * K + j] = sel[j];
            weights[t * K + j] = norm_topk ? lr[sel[j]] / d : lr[sel[j]];
        }
    }
}

}  // namespace

void softmax_topk(float* logits, int64_t tokens, int64_t E, int64_t K, bool norm_topk, int32_t* ids, float* weights,
                  cudaStream_t stream) {
    MM_CHECK(E > 0 && E <= kMaxExperts && K > 0 && K <= kMaxTopk && K <= E);
    if (tokens <= 0) return;
    MM_LAUNCH(static_cast<unsigned>(tokens), kTopkThreads, 0, stream, softmax_topk_kernel)(logits, E, static_cast<int>(K),
                                                                                   norm_topk, ids, weights);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
