// The router's softmax + top-K for one token in one warp (kernels/cuda/topk.cu softmax_topk, and the
// fused router GEMV of matmul.cu): the logits in registers (lane l holds experts l + 32j), the K
// rounds of argmax register scans and warp shuffles alone.
#pragma once
#include <cuda_runtime.h>

#include <climits>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda::detail {

constexpr int kRouterMaxExperts = 1024;
constexpr int kRouterMaxTopk = 32;

// (pa, ia) beats (pb, ib): a larger value, or the lower id on equal values (route()'s order of
// experts, argmax's of logits); a NaN never beats anything.
__device__ __forceinline__ bool beats(float pa, int ia, float pb, int ib) {
    return pa > pb || (pa == pb && ia < ib);
}

// The warp's best (v, i) by beats(), in every lane.
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (beats(ov, oi, v, i)) v = ov, i = oi;
    }
}

// lr[0, E) router logits (overwritten with the softmax) → ids[K], weights[K]; called by all 32
// lanes of one warp. E <= 32 · NP, K <= 32. kL2: lr was written by other blocks of this kernel
// (read through L2).
template <int NP, bool kL2 = false>
__device__ __forceinline__ void softmax_topk_warp(float* lr, int64_t E, int K, bool norm_topk, int32_t* ids,
                                                  float* weights) {
    const int lane = threadIdx.x % kWarp;
    float p[NP];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
        const int i = lane + kWarp * j;
        p[j] = i < E ? (kL2 ? __ldcg(lr + i) : lr[i]) : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < NP; ++j)
        if (lane + kWarp * j < E) mx = fmaxf(mx, p[j]);
    mx = warp_max(mx);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < NP; ++j)
        if (lane + kWarp * j < E) {
            p[j] = expf(p[j] - mx);
            s += p[j];
        }
    const float inv = 1.0f / warp_sum(s);
#pragma unroll
    for (int j = 0; j < NP; ++j) {
        const int i = lane + kWarp * j;
        if (i < E) {
            p[j] *= inv;
            lr[i] = p[j];
        }
    }
    // K rounds of a warp-wide argmax; the chosen expert's p becomes -inf in its lane's registers.
    // Every lane ends a round with the same winner (bp, bi); lane j keeps round j's.
    float sum = 0.0f, my_p = 0.0f;
    int my_id = 0;
    for (int r = 0; r < K; ++r) {
        float bp = -INFINITY;
        int bi = INT_MAX;
#pragma unroll
        for (int j = 0; j < NP; ++j) {
            const int i = lane + kWarp * j;
            if (i < E && beats(p[j], i, bp, bi)) bp = p[j], bi = i;
        }
        warp_best(bp, bi);
#pragma unroll
        for (int j = 0; j < NP; ++j)
            if (lane + kWarp * j == bi) p[j] = -INFINITY;
        sum += bp;
        if (lane == r) my_p = bp, my_id = bi;
    }
    if (lane < K) {
        const float d = norm_topk ? fmaxf(sum, 6.103515625e-5f) : 1.0f;
        ids[lane] = my_id;
        weights[lane] = norm_topk ? my_p / d : my_p;
    }
}

// softmax_topk_warp for E <= 1024 (NP by E).
template <bool kL2 = false>
__device__ __forceinline__ void softmax_topk_any(float* lr, int64_t E, int K, bool norm_topk, int32_t* ids,
                                                 float* weights) {
    if (E <= 4 * kWarp) softmax_topk_warp<4, kL2>(lr, E, K, norm_topk, ids, weights);
    else if (E <= 8 * kWarp) softmax_topk_warp<8, kL2>(lr, E, K, norm_topk, ids, weights);
    else if (E <= 16 * kWarp) softmax_topk_warp<16, kL2>(lr, E, K, norm_topk, ids, weights);
    else softmax_topk_warp<32, kL2>(lr, E, K, norm_topk, ids, weights);
}

}  // namespace moemesh::cuda::detail
