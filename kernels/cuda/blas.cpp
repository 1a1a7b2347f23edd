// cuBLAS loaded at run time (common/dynlib.h), not linked: libcublas + libcublasLt are ~700 MB that the
// binaries should not need to start, and without them prompts take matmul's own tiled kernel. On the
// CUDA emulator the emulated subset (kernels/cuda/emu/cublas_emu.cpp) stands in.
#include "kernels/cuda/blas.h"

#if defined(MM_CUDA_EMULATION) || __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#else
// A toolkit without cuBLAS's headers: the few declarations the calls below need, with the values of
// cublas_api.h (CUDA 13.0). The library itself is found at run time either way.
#include <library_types.h>
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
struct cublasContext;
using cublasHandle_t = cublasContext*;
#endif

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "common/dynlib.h"
#include "kernels/cuda/cuda_ops.h"

namespace moemesh::cuda {
namespace detail {
namespace {

// The C entry points (cublas_api.h also declares C++ overloads of cublasGemmEx, hence the types).
struct BlasApi {
    cublasStatus_t (*create)(cublasHandle_t*);
    cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t);
    const char* (*status_string)(cublasStatus_t);
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                              const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                              cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    cublasStatus_t (*gemm_strided)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                   const void*, cudaDataType, int, long long, const void*, cudaDataType, int,
                                   long long, const void*, void*, cudaDataType, int, long long, int,
                                   cublasComputeType_t, cublasGemmAlgo_t);
    // cuBLAS 12.5+; null where the library lacks it.
    cublasStatus_t (*gemm_grouped)(cublasHandle_t, const cublasOperation_t*, const cublasOperation_t*, const int*,
                                   const int*, const int*, const void*, const void* const*, cudaDataType, const int*,
                                   const void* const*, cudaDataType, const int*, const void*, void* const*,
                                   cudaDataType, const int*, int, const int*, cublasComputeType_t);
};
struct Loaded {
    BlasApi api{};
    std::string error;  // "" when api is complete
    std::string name;   // the library loaded
};

#ifdef MM_CUDA_EMULATION
Loaded load() {
    Loaded l;
    l.api = BlasApi{cublasCreate_v2, cublasSetStream_v2, cublasGetStatusString, cublasGemmEx,
                    cublasGemmStridedBatchedEx, cublasGemmGroupedBatchedEx};
    l.name = "the CUDA emulator's cuBLAS";
    return l;
}
#else
// The unversioned name is the development symlink, for installs without the soname link.
Loaded load() {
    Loaded l;
    DynLib lib;
    std::string tried;
    if (!dynlib_open({"libcublas.so.13", "libcublas.so"}, &lib, &tried)) {
        l.error = "cannot load cuBLAS (" + tried + "); put the directory of libcublas.so.13 on LD_LIBRARY_PATH";
        return l;
    }
    l.name = lib.name;
    auto sym = [&](auto* fn, const char* symbol) {
        std::string why;
        if (l.error.empty() && !dynlib_bind(lib, fn, symbol, &why))
            l.error = lib.name + " has no " + symbol + " (" + why + ")";
    };
    sym(&l.api.create, "cublasCreate_v2");
    sym(&l.api.set_stream, "cublasSetStream_v2");
    sym(&l.api.status_string, "cublasGetStatusString");
    sym(&l.api.gemm_ex, "cublasGemmEx");
    sym(&l.api.gemm_strided, "cublasGemmStridedBatchedEx");
    std::string why;
    if (!dynlib_bind(lib, &l.api.gemm_grouped, "cublasGemmGroupedBatchedEx", &why)) l.api.gemm_grouped = nullptr;
    return l;  // on failure the library stays open (common/dynlib.h)
}
#endif

const Loaded& loaded() {
    static const Loaded l = load();
    return l;
}

// A positive integer from the environment, or dflt (with a message once per variable) when the
// value is not one.
int64_t env_positive(const char* var, int64_t dflt) {
    const char* v = std::getenv(var);
    if (v == nullptr || *v == '\0') return dflt;
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (*end == '\0' && n >= 1 && n <= (int64_t{1} << 40)) return n;
    static std::mutex mu;
    static std::map<std::string, bool> told;
    const std::lock_guard<std::mutex> lock(mu);
    if (!told[var]) {
        told[var] = true;
        std::fprintf(stderr, "moemesh: %s=%s is not a positive integer; using %lld\n", var, v,
                     static_cast<long long>(dflt));
    }
    return dflt;
}

void tell_once(std::atomic<bool>& told, const std::string& what) {
    if (!told.exchange(true))
        std::fprintf(stderr, "moemesh: %s; prompt products use the built-in kernel\n", what.c_str());
}

}  // namespace

BlasSettings blas_settings() {
    BlasSettings s;
    const char* on = std::getenv("MOEMESH_CUDA_BLAS");
    s.on = !(on != nullptr && std::strcmp(on, "0") == 0);
    s.min_rows = env_positive("MOEMESH_CUDA_BLAS_MIN_ROWS", kBlasMinRows);
    s.chunk_bytes = static_cast<size_t>(env_positive("MOEMESH_CUDA_BLAS_CHUNK_MIB", 64)) << 20;
    const char* grouped = std::getenv("MOEMESH_CUDA_BLAS_GROUPED");
    s.grouped = !(grouped != nullptr && std::strcmp(grouped, "0") == 0);
    s.grouped_min_rows = env_positive("MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS", kBlasMinRows);
    const char* attn = std::getenv("MOEMESH_CUDA_ATTN_BLAS");
    s.attn_min_tokens = attn != nullptr && std::strcmp(attn, "0") == 0
                            ? INT64_MAX
                            : env_positive("MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS", s.attn_min_tokens);
    const char* type = std::getenv("MOEMESH_CUDA_BLAS_TYPE");
    if (type != nullptr && *type != '\0') {
        if (std::strcmp(type, "tf32") == 0) {
            s.half = false;
        } else if (std::strcmp(type, "f16") != 0) {
            static std::atomic<bool> told{false};
            if (!told.exchange(true))
                std::fprintf(stderr, "moemesh: MOEMESH_CUDA_BLAS_TYPE=%s is neither f16 nor tf32; using f16\n", type);
        }
    }
    return s;
}

struct BlasStream {
    cublasHandle_t handle = nullptr;
    void* w = nullptr;
    void* x = nullptr;
    void* ptrs = nullptr;
    size_t w_bytes = 0, x_bytes = 0, ptrs_bytes = 0;
};

namespace {

std::atomic<uint64_t> g_gemms{0}, g_grouped_calls{0}, g_half_gemms{0};

// Grows one scratch buffer (the stream's earlier work may still read it: wait for it first).
bool grow(cudaStream_t stream, void*& p, size_t& have, size_t want) {
    if (want <= have) return true;
    const size_t bytes = (want + (size_t{1} << 20) - 1) & ~((size_t{1} << 20) - 1);
    if (p != nullptr) {
        if (cudaStreamSynchronize(stream) != cudaSuccess || cudaFree(p) != cudaSuccess) {
            (void)cudaGetLastError();
            return false;
        }
        p = nullptr;
        have = 0;
    }
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        (void)cudaGetLastError();  // out of memory is not sticky: the caller's kernel goes on
        p = nullptr;
        return false;
    }
    have = bytes;
    return true;
}

}  // namespace

BlasStream* blas_stream(cudaStream_t stream, size_t w_bytes, size_t x_bytes) {
    static std::atomic<bool> told_load{false}, told_create{false}, told_memory{false};
    const Loaded& l = loaded();
    if (!l.error.empty()) {
        tell_once(told_load, l.error);
        return nullptr;
    }
    if (stream != nullptr) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(stream, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) {
            (void)cudaGetLastError();
            return nullptr;  // a capture records kernels only: cuBLAS could allocate or sync
        }
    }
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
    // Never freed: handles and scratch live until exit (destroying them then could outlive the context).
    static std::mutex mu;
    static auto* streams = new std::map<std::pair<int, cudaStream_t>, std::unique_ptr<BlasStream>>;
    BlasStream* b = nullptr;
    {
        const std::lock_guard<std::mutex> lock(mu);
        auto& slot = (*streams)[{dev, stream}];
        if (!slot) {
            auto fresh = std::make_unique<BlasStream>();
            if (const cublasStatus_t st = l.api.create(&fresh->handle); st != CUBLAS_STATUS_SUCCESS) {
                tell_once(told_create, "cublasCreate failed (" + std::string(l.api.status_string(st)) + ")");
                streams->erase({dev, stream});
                return nullptr;
            }
            slot = std::move(fresh);
        }
        b = slot.get();
    }
    // One stream is driven by one host thread at a time, so its scratch needs no lock.
    if (!grow(stream, b->w, b->w_bytes, w_bytes) || !grow(stream, b->x, b->x_bytes, x_bytes) ||
        !grow(stream, b->ptrs, b->ptrs_bytes, 3 * kBlasMaxGroup * sizeof(void*))) {
        tell_once(told_memory, "no device memory for cuBLAS's scratch (" + std::to_string((w_bytes + x_bytes) >> 20) +
                                   " MiB)");
        return nullptr;
    }
    if (l.api.set_stream(b->handle, stream) != CUBLAS_STATUS_SUCCESS) return nullptr;
    return b;
}

void* blas_w(BlasStream* b) { return b->w; }
void* blas_x(BlasStream* b) { return b->x; }
void* blas_ptrs(BlasStream* b) { return b->ptrs; }

// cuBLAS's operand type and compute type for e (TF32: f32 data, TF32 tensor-core products).
static cudaDataType data_type(BlasElem e) {
    return e == BlasElem::F16 ? CUDA_R_16F : e == BlasElem::BF16 ? CUDA_R_16BF : CUDA_R_32F;
}
static cublasComputeType_t compute_type(BlasElem e) {
    return e == BlasElem::TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

bool blas_gemm(BlasStream* b, int64_t n, int64_t m, int64_t k, const void* a, const void* bm, BlasElem e, float* c,
               int64_t ldc) {
    static std::atomic<bool> told{false};
    const cudaDataType t = data_type(e);
    const cublasComputeType_t compute = compute_type(e);
    const float one = 1.0f, zero = 0.0f;
    // Column-major: Cᵀ[n, m] = A[n, k] (stored k × n, so op T) · Bᵀ[k, m] (stored k × m, op N).
    const cublasStatus_t st = loaded().api.gemm_ex(
        b->handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &one, a, t,
        static_cast<int>(k), bm, t, static_cast<int>(k), &zero, c, CUDA_R_32F, static_cast<int>(ldc),
        compute, CUBLAS_GEMM_DEFAULT);
    if (st == CUBLAS_STATUS_SUCCESS) {
        g_gemms.fetch_add(1);
        if (e == BlasElem::F16) g_half_gemms.fetch_add(1);
        return true;
    }
    tell_once(told, "cublasGemmEx failed (" + std::string(loaded().api.status_string(st)) + ")");
    return false;
}

bool blas_gemm_strided(BlasStream* b, bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
                       int64_t lda, int64_t stride_a, const void* bm, int64_t ldb, int64_t stride_b, float* c,
                       int64_t ldc, int64_t stride_c, int batch, BlasElem e) {
    static std::atomic<bool> told{false};
    const cudaDataType t = data_type(e);
    const float zero = 0.0f;
    const cublasStatus_t st = loaded().api.gemm_strided(
        b->handle, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
        static_cast<int>(k), &alpha, a, t, static_cast<int>(lda), stride_a, bm, t, static_cast<int>(ldb), stride_b,
        &zero, c, CUDA_R_32F, static_cast<int>(ldc), stride_c, batch, compute_type(e), CUBLAS_GEMM_DEFAULT);
    if (st == CUBLAS_STATUS_SUCCESS) {
        g_gemms.fetch_add(static_cast<uint64_t>(batch));
        if (e == BlasElem::F16) g_half_gemms.fetch_add(static_cast<uint64_t>(batch));
        return true;
    }
    tell_once(told, "cublasGemmStridedBatchedEx failed (" + std::string(loaded().api.status_string(st)) + ")");
    return false;
}

bool blas_gemm_grouped(BlasStream* b, int count, int64_t n, const int* m, int64_t k, const void* const* ptrs,
                       BlasElem e, int64_t ldc) {
    static std::atomic<bool> told{false};  // also: refused once, not asked again in this process
    const BlasApi& api = loaded().api;
    if (api.gemm_grouped == nullptr || told.load() || count <= 0 || count > kBlasMaxGroup) return false;
    const cudaDataType t = data_type(e);
    const cublasComputeType_t compute = compute_type(e);
    // One group per product (their m differ): host arrays of count entries.
    cublasOperation_t ta[kBlasMaxGroup], tb[kBlasMaxGroup];
    int mm[kBlasMaxGroup], nn[kBlasMaxGroup], kk[kBlasMaxGroup], lda[kBlasMaxGroup], ldb[kBlasMaxGroup],
        ldcs[kBlasMaxGroup], size[kBlasMaxGroup];
    float alpha[kBlasMaxGroup], beta[kBlasMaxGroup];
    for (int j = 0; j < count; ++j) {
        ta[j] = CUBLAS_OP_T, tb[j] = CUBLAS_OP_N;
        mm[j] = static_cast<int>(n), nn[j] = m[j], kk[j] = static_cast<int>(k);
        lda[j] = ldb[j] = static_cast<int>(k), ldcs[j] = static_cast<int>(ldc), size[j] = 1;
        alpha[j] = 1.0f, beta[j] = 0.0f;
    }
    const cublasStatus_t st =
        api.gemm_grouped(b->handle, ta, tb, mm, nn, kk, alpha, ptrs, t, lda, ptrs + count, t, ldb, beta,
                         const_cast<void* const*>(ptrs + 2 * count), CUDA_R_32F, ldcs, count, size, compute);
    if (st == CUBLAS_STATUS_SUCCESS) {
        g_gemms.fetch_add(static_cast<uint64_t>(count));
        if (e == BlasElem::F16) g_half_gemms.fetch_add(static_cast<uint64_t>(count));
        g_grouped_calls.fetch_add(1);
        return true;
    }
    tell_once(told, "cublasGemmGroupedBatchedEx failed (" + std::string(api.status_string(st)) + ")");
    return false;
}

}  // namespace detail

bool blas_ready(std::string* why) {
    if (!detail::blas_settings().on) {  // not even loaded (its modules cost start-up time and VRAM)
        if (why) *why = "MOEMESH_CUDA_BLAS=0";
        return false;
    }
    const detail::Loaded& l = detail::loaded();
    if (!l.error.empty()) {
        if (why) *why = l.error;
        return false;
    }
    if (why) *why = l.name + (detail::blas_settings().half ? "; quantized W in f16" : "; quantized W in TF32");
    return true;
}

uint64_t blas_gemms() { return detail::g_gemms.load(); }
uint64_t blas_grouped_calls() { return detail::g_grouped_calls.load(); }
uint64_t blas_half_gemms() { return detail::g_half_gemms.load(); }

}  // namespace moemesh::cuda
