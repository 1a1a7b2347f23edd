// Row norms with the row in registers (kernels/cuda/norm.cu, and the o projection's GEMV that adds
// and norms in its last block, matmul.cu): one block of kRowThreads per row.
#pragma once
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda::detail {

constexpr int kRowThreads = 256;

// Rows of up to kRowRegs · blockDim.x elements stay in registers: thread t holds the elements
// t + j · blockDim.x (the loops' elements, in the loops' order, so the sums have the same bits),
// and every load is issued before the first use. norm.cu's plain loops wait for one load (or a
// store-then-load) per element in turn: ~10 µs for a 2048-wide add + norm on an H200 under ncu.
constexpr int kRowRegs = 16;

template <typename F>
__device__ __forceinline__ void for_row_regs(int64_t n, F&& f) {
#pragma unroll
    for (int j = 0; j < kRowRegs; ++j) {
        const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
        if (i < n) f(j, i);
    }
}

__device__ __forceinline__ float sumsq_regs(const float (&v)[kRowRegs], int64_t n, float* red) {
    float s = 0.0f;
    for_row_regs(n, [&](int j, int64_t) { s += v[j] * v[j]; });
    return block_sum(s, red);
}

// The row in registers (o: for_row_regs' elements) quantized for the int8-X GEMVs at qx (cuda_ops.h
// qx_bytes layout; n % 256 == 0 and blockDim.x == kRowThreads, so the elements t + j · blockDim.x of
// a warp's lanes are one group of 32 for every j, and j < n / blockDim.x holds for all threads).
__device__ __forceinline__ void quantize_regs(const float (&o)[kRowRegs], int64_t n, uint8_t* qx) {
    const QxRow row(qx, n);
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, per_j = blockDim.x / kWarp;
    const int nj = static_cast<int>(n / blockDim.x);
    float v[kRowRegs], d[kRowRegs], h[kRowRegs];
#pragma unroll
    for (int j = 0; j < kRowRegs; ++j) v[j] = j < nj ? o[j] : 0.0f;
    quant_groups32<kRowRegs>(v, nj, lane, row.q + warp * kWarp, blockDim.x, d, h);
#pragma unroll
    for (int j = 0; j < kRowRegs; ++j) {
        if (j >= nj) break;
        row.store(warp + static_cast<int64_t>(j) * per_j, lane, d[j], h[j]);
    }
}

// x += t, then y = rmsnorm(x) · w (w null: no weight) and, with qx, y quantized: the register path
// of add_rmsnorm_kernel for a row of n <= kRowRegs · blockDim.x. kL2: t was written by other blocks
// of this kernel (read through L2).
template <bool kL2>
__device__ __forceinline__ void add_rmsnorm_regs(float* xr, const float* tr, const float* w, float* yr, int64_t n,
                                                 float eps, uint8_t* qx, float* red) {
    float v[kRowRegs], tv[kRowRegs], wv[kRowRegs];
    for_row_regs(n, [&](int j, int64_t i) {
        v[j] = xr[i];
        tv[j] = kL2 ? __ldcg(tr + i) : tr[i];
        wv[j] = w ? w[i] : 1.0f;
    });
    for_row_regs(n, [&](int j, int64_t i) {
        v[j] = v[j] + tv[j];
        xr[i] = v[j];
    });
    const float scale = 1.0f / sqrtf(sumsq_regs(v, n, red) / static_cast<float>(n) + eps);
    for_row_regs(n, [&](int j, int64_t i) {
        float o = v[j] * scale;
        if (w) o *= wv[j];
        yr[i] = o;
        v[j] = o;
    });
    if (qx) quantize_regs(v, n, qx);
}

}  // namespace moemesh::cuda::detail
