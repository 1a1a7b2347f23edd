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

namespace mm_emu {
namespace {

// One product's arguments, checked as cuBLAS checks them.
struct Gemm {
    cublasOperation_t transa, transb;
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    cudaDataType at, bt;
    bool tf32;
    // op(A) is m × k, op(B) k × n, C m × n; A is stored ta ? k × m : m × k (column-major).
    int a_rows() const { return transa != CUBLAS_OP_N ? k : m; }
    int a_cols() const { return transa != CUBLAS_OP_N ? m : k; }
    int b_rows() const { return transb != CUBLAS_OP_N ? n : k; }
    int b_cols() const { return transb != CUBLAS_OP_N ? k : n; }
    cublasStatus_t check(cudaDataType ct, cublasComputeType_t compute) const {
        if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows()) || ldb < std::max(1, b_rows()) ||
            ldc < std::max(1, m))
            return CUBLAS_STATUS_INVALID_VALUE;
        if (at != bt || ct != CUDA_R_32F ||
            (compute != CUBLAS_COMPUTE_32F && !(compute == CUBLAS_COMPUTE_32F_FAST_TF32 && at == CUDA_R_32F)))
            return CUBLAS_STATUS_NOT_SUPPORTED;
        return CUBLAS_STATUS_SUCCESS;
    }
    // Whether the operands lie in device memory (each failure printed).
    bool in_device(const void* A, const void* B, const void* C) const {
        if (m == 0 || n == 0) return true;
        bool ok = mm_emu::in_device("C", C, CUDA_R_32F, m, n, ldc);
        if (k > 0) ok = mm_emu::in_device("A", A, at, a_rows(), a_cols(), lda) && ok;
        if (k > 0) ok = mm_emu::in_device("B", B, bt, b_rows(), b_cols(), ldb) && ok;
        return ok;
    }
    // C = alpha · op(A) · op(B) + beta · C on the host: op(A) row i and op(B) column j as contiguous f32
    // vectors of k (TF32: rounded to 10-bit mantissas, ties away), dot products in f32.
    void run(const void* A, const void* B, void* C) const {
        const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
        std::vector<float> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(n) * k);
        for (int i = 0; i < m; ++i)
            for (int p = 0; p < k; ++p)
                a[static_cast<size_t>(i) * k + p] =
                    element(A, at, ta ? static_cast<size_t>(i) * lda + p : static_cast<size_t>(p) * lda + i);
        for (int j = 0; j < n; ++j)
            for (int p = 0; p < k; ++p)
                b[static_cast<size_t>(j) * k + p] =
                    element(B, bt, tb ? static_cast<size_t>(p) * ldb + j : static_cast<size_t>(j) * ldb + p);
        if (tf32) {
            for (float& v : a) v = to_tf32(v);
            for (float& v : b) v = to_tf32(v);
        }
        auto* c = static_cast<float*>(C);
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                const float* ar = &a[static_cast<size_t>(i) * k];
                const float* bc = &b[static_cast<size_t>(j) * k];
                float s = 0.0f;
                for (int p = 0; p < k; ++p) s += ar[p] * bc[p];
                float& out = c[static_cast<size_t>(j) * ldc + i];
                out = beta == 0.0f ? alpha * s : alpha * s + beta * out;  // beta 0: C is not read (may be NaN)
            }
    }
};

}  // namespace
}  // namespace mm_emu

// alpha and beta in host memory (the default pointer mode).
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t /*algo*/) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    const mm_emu::Gemm g{transa, transb, m, n, k, lda, ldb, ldc, *static_cast<const float*>(alpha),
                         *static_cast<const float*>(beta), Atype, Btype, computeType == CUBLAS_COMPUTE_32F_FAST_TF32};
    if (const cublasStatus_t st = g.check(Ctype, computeType); st != CUBLAS_STATUS_SUCCESS) return st;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (!g.in_device(A, B, C)) return CUBLAS_STATUS_EXECUTION_FAILED;
    mm_emu::submit(handle->stream, "cublasGemmEx", [=] { g.run(A, B, C); });
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t /*algo*/) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr || batchCount < 0 || strideA < 0 || strideB < 0 || strideC < 0)
        return CUBLAS_STATUS_INVALID_VALUE;
    const mm_emu::Gemm g{transa, transb, m, n, k, lda, ldb, ldc, *static_cast<const float*>(alpha),
                         *static_cast<const float*>(beta), Atype, Btype, computeType == CUBLAS_COMPUTE_32F_FAST_TF32};
    if (const cublasStatus_t st = g.check(Ctype, computeType); st != CUBLAS_STATUS_SUCCESS) return st;
    if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
    const auto at = [](const void* p, long long i, long long stride, cudaDataType t) {
        return static_cast<const char*>(p) + static_cast<size_t>(i * stride) * mm_emu::element_bytes(t);
    };
    for (int i = 0; i < batchCount; ++i)
        if (!g.in_device(at(A, i, strideA, Atype), at(B, i, strideB, Btype), at(C, i, strideC, CUDA_R_32F))) {
            std::fprintf(stderr, "[cuda-emu] cublasGemmStridedBatchedEx: problem %d of %d\n", i, batchCount);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    mm_emu::submit(handle->stream, "cublasGemmStridedBatchedEx", [=] {
        for (int i = 0; i < batchCount; ++i)
            g.run(at(A, i, strideA, Atype), at(B, i, strideB, Btype),
                  const_cast<char*>(at(C, i, strideC, CUDA_R_32F)));
    });
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                          const cublasOperation_t transb_array[], const int m_array[],
                                          const int n_array[], const int k_array[], const void* alpha_array,
                                          const void* const Aarray[], cudaDataType_t Atype, const int lda_array[],
                                          const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                                          const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
                                          const int ldc_array[], int group_count, const int group_size[],
                                          cublasComputeType_t computeType) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (group_count == 0) return CUBLAS_STATUS_SUCCESS;
    // The host arrays are read now (the caller may reuse them once the call returns).
    std::vector<mm_emu::Gemm> problems;
    const auto* al = static_cast<const float*>(alpha_array);
    const auto* be = static_cast<const float*>(beta_array);
    for (int g = 0; g < group_count; ++g) {
        if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        const mm_emu::Gemm p{transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g], lda_array[g],
                             ldb_array[g], ldc_array[g], al[g], be[g], Atype, Btype,
                             computeType == CUBLAS_COMPUTE_32F_FAST_TF32};
        if (const cublasStatus_t st = p.check(Ctype, computeType); st != CUBLAS_STATUS_SUCCESS) return st;
        problems.insert(problems.end(), static_cast<size_t>(group_size[g]), p);
    }
    const size_t n = problems.size();
    // The pointer arrays are device memory, read when the work runs (after the kernels before it).
    const bool arrays_ok = mm_emu::device_range(Aarray, n * sizeof(void*)) &&
                           mm_emu::device_range(Barray, n * sizeof(void*)) &&
                           mm_emu::device_range(Carray, n * sizeof(void*));
    if (!arrays_ok) {
        std::fprintf(stderr, "[cuda-emu] cublasGemmGroupedBatchedEx: Aarray, Barray and Carray must be device arrays "
                             "of %zu pointers\n", n);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    mm_emu::submit(handle->stream, "cublasGemmGroupedBatchedEx", [=] {
        for (size_t i = 0; i < n; ++i) {
            const mm_emu::Gemm& p = problems[i];
            if (p.m == 0 || p.n == 0) continue;
            if (!p.in_device(Aarray[i], Barray[i], Carray[i])) {
                std::fprintf(stderr, "[cuda-emu] cublasGemmGroupedBatchedEx: problem %zu skipped\n", i);
                continue;
            }
            p.run(Aarray[i], Barray[i], Carray[i]);
        }
    });
    return CUBLAS_STATUS_SUCCESS;
}
