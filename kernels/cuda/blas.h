// cuBLAS for matmul's prompt path (kernels/cuda/matmul.cu): the library loaded at run time, one
// handle and one scratch per (device, stream). Internal to kernels/cuda; the public switches and
// counters are in cuda_ops.h (blas_ready, blas_gemms).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace moemesh::cuda::detail {

// From the environment at each call (prompt products are few and large): MOEMESH_CUDA_BLAS=0 turns
// the path off; MOEMESH_CUDA_BLAS_MIN_ROWS=N (default kBlasMinRows) is the least X rows that take it;
// MOEMESH_CUDA_BLAS_CHUNK_MIB=N (default 64) caps the scratch of one dequantized W chunk;
// MOEMESH_CUDA_BLAS_GROUPED=0: matmul_grouped makes one cublasGemmEx per group instead of one
// cublasGemmGroupedBatchedEx per batch; MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS=N (default kBlasMinRows,
// as matmul): the least rows of a matmul_grouped group that take cuBLAS (to try 1: a prompt's MoE
// gives most experts a few rows each, and one GEMV launch per 8 of them may cost more than their
// share of a batched dequantization and grouped GEMM — unmeasured; the worker's expert cache, whose
// arithmetic the resident MoE matches, computes per expert through matmul);
// MOEMESH_CUDA_BLAS_TYPE=f16|tf32 (default f16): quantized W dequantized to f16 (X in f16, both
// scaled against f16's range; matmul.cu kHalfScale) or to f32 with f32 X on the TF32 tensor cores.
inline constexpr int64_t kBlasMinRows = 33;  // where the GEMV (kMatmulGemvMaxM rows) stops
inline constexpr int kBlasMaxGroup = 32;     // products per grouped call (and matrices per dequantization)
struct BlasSettings {
    bool on = true;
    int64_t min_rows = kBlasMinRows;
    size_t chunk_bytes = size_t{64} << 20;
    bool grouped = true;
    int64_t grouped_min_rows = kBlasMinRows;
    bool half = true;  // quantized W in f16 (MOEMESH_CUDA_BLAS_TYPE=f16) rather than TF32
    // prompt attention through cuBLAS from this many tokens (MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS, default
    // 64; MOEMESH_CUDA_ATTN_BLAS=0: never, INT64_MAX)
    int64_t attn_min_tokens = 64;
};
BlasSettings blas_settings();

// The GEMM's operand type: F32 (f32 products), TF32 (f32 data on the TF32 tensor cores), F16, BF16.
enum class BlasElem { F32, TF32, F16, BF16 };

// The current device's cuBLAS state for `stream`, with its scratch grown to at least w_bytes and
// x_bytes; nullptr when cuBLAS cannot be loaded or created, the stream is being captured, or the
// scratch cannot be allocated (the caller takes its own kernel instead; nothing is left failed).
struct BlasStream;
BlasStream* blas_stream(cudaStream_t stream, size_t w_bytes, size_t x_bytes);
void* blas_w(BlasStream* b);
void* blas_x(BlasStream* b);
void* blas_ptrs(BlasStream* b);  // device room for 3 · kBlasMaxGroup pointers (blas_gemm_grouped's)

// C[m, ldc] (row-major, columns [0, n)) = B[m, k] · A[n, k]ᵀ, both row-major of element type e,
// C f32: cublasGemmEx(T, N) with f32 accumulation. False (with a message once) when cuBLAS refuses.
bool blas_gemm(BlasStream* b, int64_t n, int64_t m, int64_t k, const void* a, const void* bm, BlasElem e, float* c,
               int64_t ldc);

// Column-major C_i[m, n] (ldc) = alpha · op(A_i) · B_i for i < batch, X_i = X + i · stride_x elements
// (a stride of 0: one matrix for all), op(A) = Aᵀ with trans_a (A stored k × m, else m × k), B k × n;
// C f32, A and B of type e: cublasGemmStridedBatchedEx. False (message once) when cuBLAS refuses.
bool blas_gemm_strided(BlasStream* b, bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
                       int64_t lda, int64_t stride_a, const void* bm, int64_t ldb, int64_t stride_b, float* c,
                       int64_t ldc, int64_t stride_c, int batch, BlasElem e);

// blas_gemm's product for each j < count (≤ kBlasMaxGroup) in one cublasGemmGroupedBatchedEx call:
// C_j[m[j], ldc] = B_j[m[j], k] · A_j[n, k]ᵀ, the pointers in the device array ptrs = [A_j | B_j | C_j]
// (written by the caller's kernel on the same stream), m a host array. False, launching nothing,
// where the library lacks the call (before cuBLAS 12.5) or has refused it once in this process (a
// message then; the caller makes one blas_gemm per product instead).
bool blas_gemm_grouped(BlasStream* b, int count, int64_t n, const int* m, int64_t k, const void* const* ptrs,
                       BlasElem e, int64_t ldc);

}  // namespace moemesh::cuda::detail
