// RMSNorm (plain and gated), L2 norm, SwiGLU, residual add and row softmax. One block per row for
// the row reductions; sums in f32 (the CPU sums in double; the difference is far below f32 noise
// of the products that follow).
#include <cuda_runtime.h>

#include "common/status.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/norm_dev.cuh"
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

__device__ __forceinline__ float row_sumsq(const float* xr, int64_t n, float* red) {
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
    return block_sum(s, red);
}

// z == nullptr: plain RMSNorm; otherwise gated by silu(z). w == nullptr: no weight. qx: also the
// row quantized (register path only; the host checks qx_norm_ok).
// y may alias x (no __restrict__; the register path's loads need none to be issued together).
__global__ void rmsnorm_kernel(const float* x, const float* w, const float* z, float* y, int64_t n, float eps,
                               uint8_t* qx) {
    grid_dep_wait();
    __shared__ float red[kWarp];
    const int64_t r = blockIdx.x;
    const float* xr = x + r * n;
    float* yr = y + r * n;
    if (n <= kRowRegs * static_cast<int64_t>(blockDim.x)) {
        float v[kRowRegs], wv[kRowRegs], zv[kRowRegs];
        for_row_regs(n, [&](int j, int64_t i) {
            v[j] = xr[i];
            wv[j] = w ? w[i] : 1.0f;
            zv[j] = z ? z[r * n + i] : 0.0f;
        });
        const float scale = 1.0f / sqrtf(sumsq_regs(v, n, red) / static_cast<float>(n) + eps);
        for_row_regs(n, [&](int j, int64_t i) {
            float o = v[j] * scale;
            if (w) o *= wv[j];
            if (z) o *= silu(zv[j]);
            yr[i] = o;
            v[j] = o;
        });
        if (qx) quantize_regs(v, n, qx + r * qx_bytes(n));
        return;
    }
    const float scale = 1.0f / sqrtf(row_sumsq(xr, n, red) / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] * scale;
        if (w) v *= w[i];
        if (z) v *= silu(z[r * n + i]);
        yr[i] = v;
    }
}

// x[r] += t[r], then y[r] = rmsnorm(x[r]) · w: each thread re-reads only the elements it wrote, so
// the sums see exactly add_kernel's results (the bits of add_inplace then rmsnorm).
__global__ void add_rmsnorm_kernel(float* x, const float* t, const float* w, float* y, int64_t n, float eps,
                                   uint8_t* qx) {
    grid_dep_wait();
    __shared__ float red[kWarp];
    const int64_t r = blockIdx.x;
    float* xr = x + r * n;
    const float* tr = t + r * n;
    float* yr = y + r * n;
    if (n <= kRowRegs * static_cast<int64_t>(blockDim.x)) {
        add_rmsnorm_regs<false>(xr, tr, w, yr, n, eps, qx ? qx + r * qx_bytes(n) : nullptr, red);
        return;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) xr[i] = xr[i] + tr[i];
    const float scale = 1.0f / sqrtf(row_sumsq(xr, n, red) / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] * scale;
        if (w) v *= w[i];
        yr[i] = v;
    }
}

__global__ void l2norm_kernel(float* x, int64_t n, float eps) {
    __shared__ float red[kWarp];
    float* xr = x + static_cast<int64_t>(blockIdx.x) * n;
    const float scale = 1.0f / fmaxf(sqrtf(row_sumsq(xr, n, red)), eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= scale;
}

__global__ void softmax_kernel(float* x, int64_t n) {
    __shared__ float red[kWarp];
    float* xr = x + static_cast<int64_t>(blockIdx.x) * n;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, xr[i]);
    mx = block_max(mx, red);
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = expf(xr[i] - mx);
        xr[i] = e;
        s += e;
    }
    const float inv = 1.0f / block_sum(s, red);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= inv;
}

__global__ void swiglu_kernel(const float* g, const float* u, float* y, int64_t n) {
    grid_dep_wait();
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] = silu(g[i]) * u[i];
}

__global__ void add_kernel(float* y, const float* x, int64_t n) {
    grid_dep_wait();
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

}  // namespace

bool qx_norm_ok(int64_t n) { return n > 0 && n % 256 == 0 && n <= kRowRegs * kRowThreads; }

void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps, cudaStream_t stream,
             uint8_t* qx) {
    if (rows <= 0) return;
    MM_CHECK(qx == nullptr || qx_norm_ok(n));
    MM_LAUNCH_PDL(static_cast<unsigned>(rows), kRowThreads, 0, stream, rmsnorm_kernel)(x, w, nullptr, y, n, eps, qx);
    CUDA_CHECK_LAUNCH();
}

void add_rmsnorm(float* x, const float* t, const float* w, float* y, int64_t rows, int64_t n, float eps,
                 cudaStream_t stream, uint8_t* qx) {
    if (rows <= 0) return;
    MM_CHECK(qx == nullptr || qx_norm_ok(n));
    MM_LAUNCH_PDL(static_cast<unsigned>(rows), kRowThreads, 0, stream, add_rmsnorm_kernel)(x, t, w, y, n, eps, qx);
    CUDA_CHECK_LAUNCH();
}

void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n, float eps,
                   cudaStream_t stream) {
    if (rows <= 0) return;
    MM_LAUNCH_PDL(static_cast<unsigned>(rows), kRowThreads, 0, stream, rmsnorm_kernel)(x, w, z, y, n, eps, nullptr);
    CUDA_CHECK_LAUNCH();
}

void l2norm_rows(float* x, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
    if (rows <= 0) return;
    MM_LAUNCH(static_cast<unsigned>(rows), kRowThreads, 0, stream, l2norm_kernel)(x, n, eps);
    CUDA_CHECK_LAUNCH();
}

void softmax_rows(float* x, int64_t rows, int64_t n, cudaStream_t stream) {
    if (rows <= 0) return;
    MM_LAUNCH(static_cast<unsigned>(rows), kRowThreads, 0, stream, softmax_kernel)(x, n);
    CUDA_CHECK_LAUNCH();
}

void swiglu(const float* g, const float* u, float* y, int64_t n, cudaStream_t stream) {
    if (n <= 0) return;
    MM_LAUNCH_PDL(grid_1d(n, 256), 256, 0, stream, swiglu_kernel)(g, u, y, n);
    CUDA_CHECK_LAUNCH();
}

void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
    if (n <= 0) return;
    MM_LAUNCH_PDL(grid_1d(n, 256), 256, 0, stream, add_kernel)(y, x, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
