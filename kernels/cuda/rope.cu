// NEOX rotary embedding: dimension i pairs with i + rot_dim/2. One thread per (token, head, i).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rope_dev.cuh"
#include "kernels/rope_yarn.h"

namespace moemesh::cuda {

namespace {

using namespace detail;

__global__ void rope_neox_kernel(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t half,
                                 const int32_t* pos, float theta_scale, RopeParams p) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= tokens * heads * half) return;
    const int64_t i = idx % half, th = idx / half, t = th / heads;
    float o0, o1;
    rope_pair(x + th * head_dim, i, half, pos[t], theta_scale, p, &o0, &o1);
}

// rope(q), rope(k) and both cache stores in one launch. Items, in order: q pairs (T·Nh·half), k
// pairs (T·Nkv·half: rotated in place and stored), k's dimensions past rot_dim (stored as they are),
// v elements (stored). Token t is at position p0 + t (p0 from the device when p0_dev is set).
__global__ void rope_store_kv_kernel(float* q, float* k, const float* v, int64_t T, int64_t Nh, int64_t Nkv,
                                     int64_t D, int64_t half, float theta_scale, RopeParams p, int32_t p0_val,
                                     const int32_t* p0_dev, void* kc, void* vc, bool f16) {
    grid_dep_wait();
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t nq = T * Nh * half, nk = T * Nkv * half, rest = D - 2 * half, nkr = T * Nkv * rest,
                  kv_dim = Nkv * D, nv = T * kv_dim;
    const int32_t p0 = p0_dev ? *p0_dev : p0_val;
    if (idx < nq) {
        const int64_t i = idx % half, th = idx / half, t = th / Nh;
        float o0, o1;
        rope_pair(q + th * D, i, half, p0 + static_cast<int32_t>(t), theta_scale, p, &o0, &o1);
    } else if (idx < nq + nk) {
        const int64_t r = idx - nq, i = r % half, th = r / half, t = th / Nkv;
        float o0, o1;
        rope_pair(k + th * D, i, half, p0 + static_cast<int32_t>(t), theta_scale, p, &o0, &o1);
        const int64_t o = (static_cast<int64_t>(p0) + t) * kv_dim + (th % Nkv) * D;
        store_elem(kc, o + i, o0, f16);
        store_elem(kc, o + i + half, o1, f16);
    } else if (idx < nq + nk + nkr) {
        const int64_t r = idx - nq - nk, e = 2 * half + r % rest, th = r / rest, t = th / Nkv;
        store_elem(kc, (static_cast<int64_t>(p0) + t) * kv_dim + (th % Nkv) * D + e, k[th * D + e], f16);
    } else if (idx < nq + nk + nkr + nv) {
        const int64_t r = idx - nq - nk - nkr, t = r / kv_dim;
        store_elem(vc, (static_cast<int64_t>(p0) + t) * kv_dim + r % kv_dim, v[r], f16);
    }
}

// Per-head RMSNorm of q and k, then rope_store_kv_kernel's rotation and stores (norm_rope_head).
// Blocks: T·Nh q heads, then T·Nkv k heads (each also stores its v row); D threads each (D % 32 ==
// 0, D <= kNormRopeMaxHeadDim).
__global__ void norm_rope_store_kv_kernel(float* q, float* k, const float* v, int64_t Nh, int64_t Nkv, int64_t D,
                                          int64_t half, const float* qw, const float* kw, float eps,
                                          float theta_scale, RopeParams p, int32_t p0_val, const int32_t* p0_dev,
                                          int64_t T, void* kc, void* vc, bool f16) {
    grid_dep_wait();
    __shared__ float red[kWarp];
    __shared__ float hv[kNormRopeMaxHeadDim];
    const int64_t b = blockIdx.x;
    const bool is_q = b < T * Nh;
    const int64_t th = is_q ? b : b - T * Nh, t = th / (is_q ? Nh : Nkv);
    const int32_t p0 = p0_dev ? *p0_dev : p0_val;
    const float o = norm_rope_head<false>((is_q ? q : k) + th * D, is_q ? qw : kw, D, half, eps,
                                          p0 + static_cast<int32_t>(t), theta_scale, p, red, hv);
    if (!is_q) {
        const int e = threadIdx.x;
        const int64_t kv_dim = Nkv * D, off = (static_cast<int64_t>(p0) + t) * kv_dim + (th % Nkv) * D + e;
        store_elem(kc, off, o, f16);
        store_elem(vc, off, v[th * D + e], f16);
    }
}

}  // namespace

void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               const RopeParams& p, cudaStream_t stream) {
    const int64_t half = rot_dim / 2, n = tokens * heads * half;
    if (n <= 0) return;
    // Computed on the host with the same std::pow call as the CPU kernel.
    const float theta_scale = rope_theta_scale(p, rot_dim);
    MM_LAUNCH(grid_1d(n, 256), 256, 0, stream, rope_neox_kernel)(x, tokens, heads, head_dim, half, pos, theta_scale, p);
    CUDA_CHECK_LAUNCH();
}

void rope_store_kv(float* q, float* k, const float* v, int64_t T, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                   int64_t rot_dim, int32_t p0, const int32_t* p0_dev, const RopeParams& p, void* k_cache,
                   void* v_cache, bool f16, cudaStream_t stream) {
    const int64_t half = rot_dim / 2;
    const int64_t n = T * n_head * half + T * n_head_kv * half + T * n_head_kv * (head_dim - 2 * half) +
                      T * n_head_kv * head_dim;
    if (T <= 0 || n <= 0) return;
    const float theta_scale = rope_theta_scale(p, rot_dim);
    MM_LAUNCH_PDL(grid_1d(n, 256), 256, 0, stream, rope_store_kv_kernel)(q, k, v, T, n_head, n_head_kv, head_dim, half,
                                                                   theta_scale, p, p0, p0_dev, k_cache, v_cache, f16);
    CUDA_CHECK_LAUNCH();
}

bool norm_rope_store_kv(float* q, float* k, const float* v, const float* q_norm, const float* k_norm, float eps,
                        int64_t T, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim, int32_t p0,
                        const int32_t* p0_dev, const RopeParams& p, void* k_cache, void* v_cache, bool f16,
                        cudaStream_t stream) {
    if (head_dim % kWarp != 0 || head_dim > kNormRopeMaxHeadDim || rot_dim > head_dim || q_norm == nullptr ||
        k_norm == nullptr)
        return false;
    if (T <= 0) return true;
    const float theta_scale = rope_theta_scale(p, rot_dim);
    const auto blocks = static_cast<unsigned>(T * (n_head + n_head_kv));
    MM_LAUNCH_PDL(blocks, static_cast<unsigned>(head_dim), 0, stream, norm_rope_store_kv_kernel)(
        q, k, v, n_head, n_head_kv, head_dim, rot_dim / 2, q_norm, k_norm, eps, theta_scale, p, p0, p0_dev, T, k_cache,
        v_cache, f16);
    CUDA_CHECK_LAUNCH();
    return true;
}

}  // namespace moemesh::cuda
