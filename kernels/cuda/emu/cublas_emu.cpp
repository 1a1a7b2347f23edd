// The emulated cuBLAS subset (kernels/cuda/emu/include/cublas_v2.h): handles, streams and GemmEx.
// Arguments are checked as cuBLAS checks them (CUBLAS_STATUS_INVALID_VALUE); every matrix a GEMM
// reads or writes must lie inside one device allocation (else the call fails, naming the operand,
// where a GPU would fault); the product runs as stream work, in order with the kernels.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

struct cublasContext {
    cudaStream_t stream = nullptr;
};

namespace mm_emu {
namespace {
// Element i of a matrix of type t.
float element(const void* p, cudaDataType t, size_t i) {
    switch (t) {
        case CUDA_R_32F: return static_cast<const float*>(p)[i];
        case CUDA_R_16F: return __half2float(static_cast<const __half*>(p)[i]);
        default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    }
}
size_t element_bytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

float to_tf32(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;  // finite: keep 10 mantissa bits
    std::memcpy(&v, &u, 4);
    return v;
}

// A column-major rows × cols matrix with leading dimension ld spans (cols - 1) · ld + rows elements.
bool in_device(const char* what, const void* p, cudaDataType t, int rows, int cols, int ld) {
    const size_t n = (static_cast<size_t>(cols) - 1) * static_cast<size_t>(ld) + static_cast<size_t>(rows);
    if (device_range(p, n * element_bytes(t))) return true;
    std::fprintf(stderr, "[cuda-emu] cublasGemmEx: %s (%p, %d x %d, ld %d) is not inside one device allocation\n", what,
                 p, rows, cols, ld);
    return false;
}
}  // namespace

}  // namespace mm_emu

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        default: return "unknown error";
    }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t /*algo*/) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    // op(A) is m × k, op(B) k × n, C m × n; A is stored ta ? k × m : m × k (column-major).
    const int a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m) ||
        alpha == nullptr || beta == nullptr)
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool tf32 = computeType == CUBLAS_COMPUTE_32F_FAST_TF32;
    if (Atype != Btype || Ctype != CUDA_R_32F || (computeType != CUBLAS_COMPUTE_32F && !(tf32 && Atype == CUDA_R_32F)))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    // alpha and beta in host memory (the default pointer mode).
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    if (!mm_emu::in_device("C", C, CUDA_R_32F, m, n, ldc)) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (k > 0 && (!mm_emu::in_device("A", A, Atype, a_rows, a_cols, lda) ||
                  !mm_emu::in_device("B", B, Btype, b_rows, b_cols, ldb)))
        return CUBLAS_STATUS_EXECUTION_FAILED;
    mm_emu::submit(handle->stream, "cublasGemmEx", [=] {
        // op(A) row i and op(B) column j as contiguous f32 vectors of k, then dot products in f32.
        std::vector<float> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(n) * k);
        for (int i = 0; i < m; ++i)
            for (int p = 0; p < k; ++p)
                a[static_cast<size_t>(i) * k + p] =
                    mm_emu::element(A, Atype, ta ? static_cast<size_t>(i) * lda + p : static_cast<size_t>(p) * lda + i);
        for (int j = 0; j < n; ++j)
            for (int p = 0; p < k; ++p)
                b[static_cast<size_t>(j) * k + p] =
                    mm_emu::element(B, Btype, tb ? static_cast<size_t>(p) * ldb + j : static_cast<size_t>(j) * ldb + p);
        if (tf32) {  // the tensor cores' operands: 10-bit mantissas (round to nearest, ties away)
            for (float& v : a) v = mm_emu::to_tf32(v);
            for (float& v : b) v = mm_emu::to_tf32(v);
        }
        auto* c = static_cast<float*>(C);
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                const float* ar = &a[static_cast<size_t>(i) * k];
                const float* bc = &b[static_cast<size_t>(j) * k];
                float s = 0.0f;
                for (int p = 0; p < k; ++p) s += ar[p] * bc[p];
                float& out = c[static_cast<size_t>(j) * ldc + i];
                out = be == 0.0f ? al * s : al * s + be * out;  // beta 0: C is not read (may be NaN)
            }
    });
    return CUBLAS_STATUS_SUCCESS;
}
