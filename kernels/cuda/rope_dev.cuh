// Device helpers of the rotary embedding shared by rope.cu and the q/k/v GEMV's per-head last block
// (matmul.cu): one NEOX pair's rotation, a cache element's store, and one head's RMSNorm + rope.
#pragma once
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/rope_yarn.h"

namespace moemesh::cuda::detail {

// theta_scale of rot_dim, computed on the host with the same std::pow call as the CPU kernel.
inline float rope_theta_scale(const RopeParams& p, int64_t rot_dim) {
    return std::pow(p.theta, -2.0f / static_cast<float>(rot_dim));
}

// The angle of pair i is pos · theta_scale^i built by i repeated float multiplications, exactly as
// kernels/cpu/rope.cpp (and ggml) builds it: powf would round differently, and at positions in the
// thousands the difference is visible in the output. cosf/sinf are the accurate (not fast-math) ones;
// the scaling (kernels/rope_yarn.h) is the CPU kernel's own function.
// Rotates pair i of one head at position `pos` in place: (v[i], v[i + half]); returns the new
// values in *o0 / *o1 too.
__device__ __forceinline__ void rope_pair(float* v, int64_t i, int64_t half, int32_t pos, float theta_scale,
                                          const RopeParams& p, float* o0, float* o1) {
    float a = static_cast<float>(pos);
    for (int64_t j = 0; j < i; ++j) a *= theta_scale;
    float c, s;
    rope_yarn_cos_sin(a, i, p, &c, &s);
    const float x0 = v[i], x1 = v[i + half];
    *o0 = x0 * c - x1 * s;
    *o1 = x0 * s + x1 * c;
    v[i] = *o0;
    v[i + half] = *o1;
}

__device__ __forceinline__ void store_elem(void* cache, int64_t o, float v, bool f16) {
    if (f16) static_cast<uint16_t*>(cache)[o] = __half_as_ushort(__float2half_rn(v));
    else static_cast<float*>(cache)[o] = v;
}

constexpr int64_t kNormRopeMaxHeadDim = 256;

// One head x[0..D) by D threads (blockDim.x == D, D % 32 == 0, <= kNormRopeMaxHeadDim): RMSNorm with
// w (rmsnorm_kernel's arithmetic: element e is thread e's, warp sums of 32 consecutive squares, then
// the warp sums' butterfly; the idle warps of rmsnorm's 256-thread block only add zeros), then the
// NEOX rotation of pairs e < half at `pos`; written back to x. Returns thread e's final value.
// red: 32 floats, hv: D floats of shared memory. kL2: x was written by other blocks of this kernel
// (read through L2).
template <bool kL2>
__device__ __forceinline__ float norm_rope_head(float* x, const float* w, int64_t D, int64_t half, float eps,
                                                int32_t pos, float theta_scale, const RopeParams& p, float* red,
                                                float* hv) {
    const int e = threadIdx.x, lane = e % kWarp, wid = e / kWarp, nw = static_cast<int>(D / kWarp);
    const float xe = kL2 ? __ldcg(x + e) : x[e], we = w[e];
    const float ss = warp_sum(xe * xe);
    if (lane == 0) red[wid] = ss;
    __syncthreads();
    const float sum = warp_sum(lane < nw ? red[lane] : 0.0f);
    const float scale = 1.0f / sqrtf(sum / static_cast<float>(D) + eps);
    hv[e] = xe * scale * we;
    __syncthreads();
    float o0, o1;
    if (e < half) rope_pair(hv, e, half, pos, theta_scale, p, &o0, &o1);
    __syncthreads();
    x[e] = hv[e];
    return hv[e];
}

}  // namespace moemesh::cuda::detail
