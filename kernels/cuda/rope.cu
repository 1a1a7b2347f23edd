// NEOX rotary embedding: dimension i pairs with i + rot_dim/2. One thread per (token, head, i).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/rope_yarn.h"

namespace moemesh::cuda {

namespace {

using namespace detail;

// The angle of pair i is pos · theta_scale^i built by i repeated float multiplications, exactly as
// kernels/cpu/rope.cpp (and ggml) builds it: powf would round differently, and at positions in the
// thousands the difference is visible in the output. cosf/sinf are the accurate (not fast-math) ones;
// the scaling (kernels/rope_yarn.h) is the CPU kernel's own function.
__global__ void rope_neox_kernel(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t half,
                                 const int32_t* pos, float theta_scale, RopeParams p) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= tokens * heads * half) return;
    const int64_t i = idx % half, th = idx / half, t = th / heads;
    float a = static_cast<float>(pos[t]);
    for (int64_t j = 0; j < i; ++j) a *= theta_scale;
    float c, s;
    rope_yarn_cos_sin(a, i, p, &c, &s);
    float* v = x + th * head_dim;
    const float x0 = v[i], x1 = v[i + half];
    v[i] = x0 * c - x1 * s;
    v[i + half] = x0 * s + x1 * c;
}

}  // namespace

void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               const RopeParams& p, cudaStream_t stream) {
    const int64_t half = rot_dim / 2, n = tokens * heads * half;
    if (n <= 0) return;
    // Computed on the host with the same std::pow call as the CPU kernel.
    const float theta_scale = std::pow(p.theta, -2.0f / static_cast<float>(rot_dim));
    MM_LAUNCH(grid_1d(n, 256), 256, 0, stream, rope_neox_kernel)(x, tokens, heads, head_dim, half, pos, theta_scale, p);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
