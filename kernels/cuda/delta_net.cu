// Gated DeltaNet decode ops (Qwen3-Next linear attention), the contract of kernels/ops.h.
#include <cuda_runtime.h>

#include "common/status.h"
#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

constexpr int kConvMaxK = 8;

// Input i of the sequence [state; x]: i < 0 reads the carried state row K-1+i.
__device__ __forceinline__ float conv_in(const float* x, const float* state, int64_t i, int64_t c, int64_t C,
                                         int64_t K) {
    return i < 0 ? state[(K - 1 + i) * C + c] : x[i * C + c];
}

// One thread per (t, c).
__global__ void conv1d_silu_kernel(const float* x, const float* w, const float* state, float* y, int64_t T, int64_t C,
                                   int64_t K) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= T * C) return;
    const int64_t t = idx / C, c = idx % C;
    float s = 0.0f;
    for (int64_t j = 0; j < K; ++j) s += w[c * K + j] * conv_in(x, state, t - (K - 1) + j, c, C, K);
    y[idx] = silu(s);
}

// One thread per channel: the new state is the last K-1 inputs of [state; x]. Each thread reads
// its whole column before writing it, and no other thread touches that column.
__global__ void conv_state_kernel(const float* x, float* state, int64_t T, int64_t C, int64_t K) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float keep[kConvMaxK - 1];
#pragma unroll
    for (int r = 0; r < kConvMaxK - 1; ++r)
        if (r < K - 1) keep[r] = conv_in(x, state, T - (K - 1) + r, c, C, K);
#pragma unroll
    for (int r = 0; r < kConvMaxK - 1; ++r)
        if (r < K - 1) state[r * C + c] = keep[r];
}

// The recurrence. Block (column tile ct, v-head j) of 8 warps: lane l owns column c = 32·ct + l of
// S_j, warp w its rows i = w + 8r (r < kRows), so each state load/store is 32 consecutive floats.
// Sums over i (u = Sᵀk and o = Sᵀq) go through shared memory across the 8 warps.
constexpr int kDnWarps = 8;

template <int kRows>
__global__ void __launch_bounds__(kDnWarps* kWarp)
    delta_rule_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                      const float* __restrict__ g, const float* __restrict__ beta, float* __restrict__ state,
                      float* __restrict__ out, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                      float scale) {
    __shared__ float red_u[kDnWarps][kWarp];
    __shared__ float red_o[kDnWarps][kWarp];
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
    const int64_t j = blockIdx.y, c = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
    const int64_t kh = j / (Hv / Hk);
    float* sj = state + j * Dk * Dv;
    float S[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int64_t i = wid + kDnWarps * r;
        S[r] = i < Dk ? sj[i * Dv + c] : 0.0f;
    }
    for (int64_t t = 0; t < T; ++t) {
        const float* kt = k + (t * Hk + kh) * Dk;
        const float* qt = q + (t * Hk + kh) * Dk;
        const float decay = expf(g[t * Hv + j]), b = beta[t * Hv + j];
        float kr[kRows];
        float pu = 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int64_t i = wid + kDnWarps * r;
            kr[r] = i < Dk ? kt[i] : 0.0f;
            S[r] *= decay;
            pu += S[r] * kr[r];
        }
        red_u[wid][lane] = pu;
        __syncthreads();
        float u = 0.0f;
#pragma unroll
        for (int w = 0; w < kDnWarps; ++w) u += red_u[w][lane];
        const float delta = b * (v[(t * Hv + j) * Dv + c] - u);
        float po = 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int64_t i = wid + kDnWarps * r;
            S[r] += kr[r] * delta;
            po += S[r] * (i < Dk ? qt[i] * scale : 0.0f);
        }
        red_o[wid][lane] = po;
        __syncthreads();
        if (wid == 0) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < kDnWarps; ++w) o += red_o[w][lane];
            out[(t * Hv + j) * Dv + c] = o;
        }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int64_t i = wid + kDnWarps * r;
        if (i < Dk) sj[i * Dv + c] = S[r];
    }
}

}  // namespace

void conv1d_silu_causal(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C, int64_t K,
                        cudaStream_t stream) {
    MM_CHECK(K >= 1 && K <= kConvMaxK);
    if (T <= 0 || C <= 0) return;
    conv1d_silu_kernel<<<grid_1d(T * C, 256), 256, 0, stream>>>(x, w, state, y, T, C, K);
    CUDA_CHECK_LAUNCH();
    if (K > 1) {
        conv_state_kernel<<<grid_1d(C, 256), 256, 0, stream>>>(x, state, T, C, K);
        CUDA_CHECK_LAUNCH();
    }
}

void gated_delta_rule_recurrent(const DeltaNetArgs& a, cudaStream_t stream) {
    MM_CHECK(a.k_dim > 0 && a.k_dim <= 256 && a.v_dim > 0 && a.v_dim % kWarp == 0);
    MM_CHECK(a.n_k_heads > 0 && a.n_v_heads % a.n_k_heads == 0 && a.n_v_heads < 65536);
    if (a.n_tokens <= 0) return;
    const dim3 grid(static_cast<unsigned>(a.v_dim / kWarp), static_cast<unsigned>(a.n_v_heads));
    if (a.k_dim <= 8 * kDnWarps)
        delta_rule_kernel<8><<<grid, kDnWarps * kWarp, 0, stream>>>(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                    a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                    a.v_dim, a.scale);
    else if (a.k_dim <= 16 * kDnWarps)
        delta_rule_kernel<16><<<grid, kDnWarps * kWarp, 0, stream>>>(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                     a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                     a.v_dim, a.scale);
    else
        delta_rule_kernel<32><<<grid, kDnWarps * kWarp, 0, stream>>>(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                     a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                     a.v_dim, a.scale);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
