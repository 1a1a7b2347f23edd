// Every CUDA kernel (kernels/cuda/cuda_ops.h) against the CPU kernel of kernels/ops.h, or against a
// plain scalar reference where the CPU one rounds differently on purpose, on random inputs.
// Each test skips with "no CUDA device: <reason>" where there is no GPU or driver.
// Every comparison prints one "[cuda] ..." line with its errors, for the GPU notes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

namespace moemesh {
namespace {

#define REQUIRE_CUDA()                                                                     \
    do {                                                                                   \
        const char* why_ = "";                                                             \
        if (cuda::device_count(&why_) == 0) GTEST_SKIP() << "no CUDA device: " << why_;    \
    } while (0)

// A device buffer of n elements of T.
template <typename T>
class DeviceBuffer {
public:
    explicit DeviceBuffer(size_t n) : n_(n) { CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T))); }
    explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) { upload(v); }
    ~DeviceBuffer() { cudaFree(p_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    T* get() const { return p_; }
    void upload(const std::vector<T>& v) {
        CUDA_CHECK(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        std::vector<T> v(n_);
        CUDA_CHECK(cudaDeviceSynchronize());
        CUDA_CHECK(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
        return v;
    }

private:
    T* p_ = nullptr;
    size_t n_;
};

std::vector<float> random_vec(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

struct Err {
    double rel;      // ||got − want||₂ / ||want||₂
    double max_abs;  // max |got − want|
};
Err compare(const std::vector<float>& got, const std::vector<float>& want) {
    EXPECT_EQ(got.size(), want.size());
    double num = 0.0, den = 0.0, mx = 0.0;
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
        const double d = static_cast<double>(got[i]) - want[i];
        if (!std::isfinite(got[i])) return {INFINITY, INFINITY};
        num += d * d;
        den += static_cast<double>(want[i]) * want[i];
        mx = std::max(mx, std::fabs(d));
    }
    return {std::sqrt(num / std::max(den, 1e-30)), mx};
}
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                  double tol) {
    const Err e = compare(got, want);
    std::printf("[cuda] %-44s rel %.3e  max_abs %.3e  (tol %.0e)  %s\n", what.c_str(), e.rel, e.max_abs, tol,
                e.rel <= tol ? "ok" : "FAIL");
    EXPECT_LE(e.rel, tol) << what;
}

// ---- matmul ----

struct QuantMatrix {
    std::vector<uint8_t> bytes;  // [n_out] rows of ggml_row_bytes(t, k)
    std::vector<float> deq;      // [n_out, k] the same weights dequantized
};
// The i-quants have no quantizer: random block bytes (every grid index, sign and scale) under an fp16
// super-block scale of about 0.05 / the grid's magnitude.
QuantMatrix make_weights(GgmlType t, int64_t n_out, int64_t k, uint32_t seed) {
    const std::vector<float> w = random_vec(static_cast<size_t>(n_out * k), seed, 0.05f);
    const size_t rb = ggml_row_bytes(t, k);
    QuantMatrix q;
    q.bytes.resize(rb * n_out);
    q.deq.resize(w.size());
    if (quants::is_iq_lowbit(t)) {
        std::mt19937 rng(seed);
        for (auto& b : q.bytes) b = static_cast<uint8_t>(rng());
        const size_t bs = ggml_type_info(t).type_size;
        const auto d = fp32_to_fp16(0.05f / static_cast<float>(std::sqrt(quants::iq_unit_mean_square(t))));
        for (size_t off = 0; off < q.bytes.size(); off += bs) quants::iq_set_block_scale(t, &q.bytes[off], d);
    }
    for (int64_t r = 0; r < n_out; ++r) {
        if (!quants::is_iq_lowbit(t)) quantize_row(t, &w[r * k], &q.bytes[r * rb], k);
        dequantize_row(t, &q.bytes[r * rb], &q.deq[r * k], k);
    }
    return q;
}

// E expert matrices of make_weights one after the other (an [E, n_out, k] GGUF expert tensor), seeds
// seed0, seed0 + 1, ...
std::vector<uint8_t> stacked_weights(GgmlType t, int64_t E, int64_t n_out, int64_t k, uint32_t seed0) {
    std::vector<uint8_t> all;
    for (int64_t e = 0; e < E; ++e) {
        const QuantMatrix m = make_weights(t, n_out, k, seed0 + static_cast<uint32_t>(e));
        all.insert(all.end(), m.bytes.begin(), m.bytes.end());
    }
    return all;
}

// y = x · deqᵀ in double: what the GPU computes up to f32 summation order.
std::vector<float> ref_matmul(const std::vector<float>& deq, int64_t n_out, int64_t k, const std::vector<float>& x,
                              int64_t m) {
    std::vector<float> y(static_cast<size_t>(m * n_out));
    for (int64_t i = 0; i < m; ++i)
        for (int64_t o = 0; o < n_out; ++o) {
            double s = 0.0;
            for (int64_t j = 0; j < k; ++j) s += static_cast<double>(x[i * k + j]) * deq[o * k + j];
            y[i * n_out + o] = static_cast<float>(s);
        }
    return y;
}

// Against llama.cpp-style CPU matmul the GPU differs by the CPU's activation rounding
// (X → F16 / BF16 / Q8_0 / Q8_K); against the dequantized weights only by summation order.
double cpu_tolerance(GgmlType t) {
    switch (t) {
        case GgmlType::F32: return 1e-5;
        case GgmlType::F16: return 2e-3;
        case GgmlType::BF16: return 1e-2;
        default: return 2e-2;
    }
}

// The decode GEMV (m <= kMatmulGemvMaxM, and matmul_id) of the quantized types may quantize X to int8 per
// 32 elements (llama.cpp's Q8_1-style, dp4a; which kernel runs depends on type, m, rows and
// MOEMESH_CUDA_GEMV, see matmul.cu), so against the exact product of the dequantized weights it may
// carry an activation rounding error, as the CPU matmul does (~5.4e-3 relative on these random
// data, measured on an H200): tolerance 2e-2 there whichever kernel runs. MOEMESH_CUDA_GEMV=old
// selects the f32-activation kernel everywhere (2e-5).
bool int8_x_gemv(GgmlType t, int64_t m) {
    const char* e = std::getenv("MOEMESH_CUDA_GEMV");
    if (e != nullptr && std::string(e) == "old") return false;
    const bool q = t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16;
    return q && m <= cuda::kMatmulGemvMaxM;
}
// Prompt sizes (m >= MOEMESH_CUDA_BLAS_MIN_ROWS, default 33) go through cuBLAS where it loads (always
// on the emulator): quantized W dequantized to f32 and TF32 products (~3e-4 relative on these data;
// 2e-3 leaves room for a truncating conversion), F16 / BF16 W with X rounded to W's type, F32 exact.
// (blas_ready is false with MOEMESH_CUDA_BLAS=0.)
bool blas_path(int64_t m) {
    if (!cuda::blas_ready()) return false;
    const char* mr = std::getenv("MOEMESH_CUDA_BLAS_MIN_ROWS");
    return m >= (mr != nullptr && *mr != '\0' ? std::atoll(mr) : cuda::kMatmulGemvMaxM + 1);
}
double blas_tolerance(GgmlType t) {
    return t == GgmlType::F32 ? 2e-5 : t == GgmlType::BF16 ? 1e-2 : 2e-3;
}
double ref_tolerance(GgmlType t, int64_t m) {
    if (blas_path(m)) return blas_tolerance(t);
    return int8_x_gemv(t, m) ? 2e-2 : 2e-5;
}

class CudaMatmul : public ::testing::TestWithParam<GgmlType> {};

TEST_P(CudaMatmul, MatchesCpu) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    ThreadPool pool(2);
    const int64_t n_out = 203, k = 768;  // n_out: partial GEMV blocks and partial 64-row tiles
    const QuantMatrix w = make_weights(t, n_out, k, 11);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    for (const int64_t m : {1, 2, 3, 8, 13, 32, 33, 70}) {  // GEMV chunks up to 32 rows, then tiles
        const std::vector<float> x = random_vec(static_cast<size_t>(m * k), 100 + static_cast<uint32_t>(m));
        const DeviceBuffer<float> dx(x);
        DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
        cuda::matmul(t, dw.get(), n_out, k, dx.get(), m, dy.get());
        const std::vector<float> got = dy.download();
        const std::string name = std::string("matmul ") + ggml_type_name(t) + " m=" + std::to_string(m);
        expect_close(name + " vs dequant ref", got, ref_matmul(w.deq, n_out, k, x, m), ref_tolerance(t, m));
        std::vector<float> cpu(got.size());
        matmul(pool, t, w.bytes.data(), n_out, k, x.data(), m, cpu.data());
        expect_close(name + " vs cpu matmul", got, cpu, cpu_tolerance(t));
    }
}

// Prompt products through cuBLAS (kernels/cuda/blas.cpp): one GEMM per W chunk (quantized W is
// dequantized in chunks of MOEMESH_CUDA_BLAS_CHUNK_MIB: f16 by default, f32 with
// MOEMESH_CUDA_BLAS_TYPE=tf32; F32/F16/BF16 W is used as stored, one GEMM), results within
// ref_tolerance of the exact product and cpu_tolerance of the CPU; the GEMMs on f16 operands counted
// apart; MOEMESH_CUDA_BLAS=0 (the tiled kernel) gives no GEMM; MOEMESH_CUDA_BLAS_MIN_ROWS=2 sends a
// GEMV size to cuBLAS.
TEST_P(CudaMatmul, PromptProductsThroughCublas) {
    REQUIRE_CUDA();
    std::string why;
    if (!cuda::blas_ready(&why)) GTEST_SKIP() << "cuBLAS does not load: " << why;
    const GgmlType t = GetParam();
    ThreadPool pool(2);
    // f32 rows of 2 KiB: 1 MiB chunks of 512 rows → 3 chunks; f16 rows of 1 KiB: 1024 rows → 2.
    const int64_t n_out = 1100, k = 512;
    const bool stored = t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16;
    const QuantMatrix w = make_weights(t, n_out, k, 21);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    unsetenv("MOEMESH_CUDA_BLAS");
    unsetenv("MOEMESH_CUDA_BLAS_MIN_ROWS");
    ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_CHUNK_MIB", "1", 1), 0);
    struct Case {
        int64_t m;
        const char* blas;      // MOEMESH_CUDA_BLAS
        const char* min_rows;  // MOEMESH_CUDA_BLAS_MIN_ROWS
        bool gemms;            // cuBLAS GEMMs expected
    };
    for (const char* type : {static_cast<const char*>(nullptr), "tf32"}) {
        if (type) {
            ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_TYPE", type, 1), 0);
        }
        const bool half = t == GgmlType::F16 || (!stored && type == nullptr);
        const uint64_t chunks = stored ? 1 : half ? 2 : 3;
        for (const Case c : {Case{40, nullptr, nullptr, true}, Case{70, "1", nullptr, true},
                             Case{40, "0", nullptr, false}, Case{8, nullptr, "2", true},
                             Case{8, nullptr, nullptr, false}}) {
            if (c.blas) {
                ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS", c.blas, 1), 0);
            }
            if (c.min_rows) {
                ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_MIN_ROWS", c.min_rows, 1), 0);
            }
            const std::vector<float> x = random_vec(static_cast<size_t>(c.m * k), 300 + static_cast<uint32_t>(c.m));
            const DeviceBuffer<float> dx(x);
            DeviceBuffer<float> dy(static_cast<size_t>(c.m * n_out));
            const uint64_t before = cuda::blas_gemms(), half_before = cuda::blas_half_gemms();
            cuda::matmul(t, dw.get(), n_out, k, dx.get(), c.m, dy.get());
            const std::vector<float> got = dy.download();
            EXPECT_EQ(cuda::blas_gemms() - before, c.gemms ? chunks : 0) << "m=" << c.m << " " << (type ? type : "");
            EXPECT_EQ(cuda::blas_half_gemms() - half_before, c.gemms && half ? chunks : 0)
                << "m=" << c.m << " " << (type ? type : "");
            const std::string name = std::string("prompt matmul ") + ggml_type_name(t) + " m=" + std::to_string(c.m) +
                                     (c.gemms ? type ? " cublas tf32" : " cublas" : " own kernel");
            expect_close(name + " vs dequant ref", got, ref_matmul(w.deq, n_out, k, x, c.m), ref_tolerance(t, c.m));
            std::vector<float> cpu(got.size());
            matmul(pool, t, w.bytes.data(), n_out, k, x.data(), c.m, cpu.data());
            expect_close(name + " vs cpu matmul", got, cpu, cpu_tolerance(t));
            unsetenv("MOEMESH_CUDA_BLAS");
            unsetenv("MOEMESH_CUDA_BLAS_MIN_ROWS");
        }
        unsetenv("MOEMESH_CUDA_BLAS_TYPE");
    }
    unsetenv("MOEMESH_CUDA_BLAS_CHUNK_MIB");
}

// matmul_grouped (a prompt's MoE grouped by expert) gives each group the results of matmul on its
// rows: groups of 0, 1, 5 (GEMV) and 33, 40, 70 rows (cuBLAS); with 1 MiB chunks a 256 × 512 W
// (512 KiB in f32, MOEMESH_CUDA_BLAS_TYPE=tf32: two groups per dequantizing launch; 256 KiB in f16,
// the default: three) is dequantized for the batch, a 1100 × 512 one (2.1 MiB, 1.1 MiB) is over the
// cap and goes through matmul's row chunks. The cuBLAS GEMMs are those of the per-group matmuls, in one
// cublasGemmGroupedBatchedEx per batch (MOEMESH_CUDA_BLAS_GROUPED=0: one cublasGemmEx each).
TEST_P(CudaMatmul, GroupedIsMatmulPerGroup) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const std::vector<int64_t> count = {0, 40, 5, 0, 33, 1, 70};
    const int64_t G = static_cast<int64_t>(count.size());
    std::vector<int64_t> offset(count.size() + 1, 0);
    for (int64_t g = 0; g < G; ++g) offset[g + 1] = offset[g] + count[g];
    const int64_t rows = offset[G];
    ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_CHUNK_MIB", "1", 1), 0);
    for (const auto& [n_out, k] : {std::pair<int64_t, int64_t>{256, 512}, {1100, 512}}) {
        const std::vector<uint8_t> all = stacked_weights(t, G, n_out, k, 40);
        const size_t mb = all.size() / G;
        const DeviceBuffer<uint8_t> dw(all);
        std::vector<const void*> w(count.size());
        for (int64_t g = 0; g < G; ++g) w[g] = count[g] > 0 ? dw.get() + g * mb : nullptr;
        const DeviceBuffer<float> dx(random_vec(static_cast<size_t>(rows * k), 41));
        struct Run {
            const char *blas, *grouped, *type;  // MOEMESH_CUDA_BLAS, _BLAS_GROUPED, _BLAS_TYPE
        };
        for (const auto& [blas, grouped, type] :
             {Run{"1", "1", "f16"}, Run{"1", "0", "f16"}, Run{"0", "1", "f16"}, Run{"1", "1", "tf32"}}) {
            ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS", blas, 1), 0);
            ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_GROUPED", grouped, 1), 0);
            ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_TYPE", type, 1), 0);
            DeviceBuffer<float> dy(static_cast<size_t>(rows * n_out)), dref(static_cast<size_t>(rows * n_out));
            const uint64_t g0 = cuda::blas_gemms(), c0 = cuda::blas_grouped_calls();
            cuda::matmul_grouped(t, w.data(), count.data(), offset.data(), G, n_out, k, dx.get(), dy.get());
            const std::vector<float> got = dy.download();
            const uint64_t grouped_gemms = cuda::blas_gemms() - g0, grouped_calls = cuda::blas_grouped_calls() - c0;
            // One grouped call: for the batch of two then a GemmEx for the third (quantized in f32, 256 ×
            // 512) or for all three (quantized in f16; F32/F16/BF16 as stored); none over the cap, with
            // _GROUPED=0 or _BLAS=0.
            const bool over_cap = n_out == 1100 && t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16;
            EXPECT_EQ(grouped_calls, std::string(blas) == "1" && std::string(grouped) == "1" && !over_cap ? 1u : 0u)
                << n_out << " x " << k << " BLAS=" << blas << " GROUPED=" << grouped << " TYPE=" << type;
            for (int64_t g = 0; g < G; ++g)
                if (count[g] > 0)
                    cuda::matmul(t, w[g], n_out, k, dx.get() + offset[g] * k, count[g], dref.get() + offset[g] * n_out);
            const std::vector<float> want = dref.download();
            EXPECT_EQ(grouped_gemms, cuda::blas_gemms() - g0 - grouped_gemms)
                << n_out << " x " << k << " BLAS=" << blas;
            if (std::string(blas) == "1" && cuda::blas_ready()) {
                EXPECT_GE(grouped_gemms, 3u);
            }
            if (std::string(blas) == "0") {
                EXPECT_EQ(grouped_gemms, 0u);
            }
            expect_close(std::string("grouped ") + ggml_type_name(t) + " " + std::to_string(n_out) + "x" +
                             std::to_string(k) + " BLAS=" + blas + " GROUPED=" + grouped + " TYPE=" + type +
                             " vs matmul per group",
                         got, want, 1e-6);
        }
        unsetenv("MOEMESH_CUDA_BLAS_TYPE");
        // MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS=1 (the 256 × 512 matrices: within the cap for every type):
        // the 5- and 1-row groups through cuBLAS too — as matmul per group with MOEMESH_CUDA_BLAS_MIN_ROWS=1
        // (bitwise on the emulator; its 1-row group is matmul's f32-X GEMV there: within cuBLAS's
        // tolerance), while matmul's own minimum stays 33.
        if (n_out != 256) continue;
        ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS", "1", 1), 0);
        ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS", "1", 1), 0);
        ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_GROUPED", "1", 1), 0);
        DeviceBuffer<float> dy(static_cast<size_t>(rows * n_out)), dref(static_cast<size_t>(rows * n_out));
        const uint64_t g0 = cuda::blas_gemms();
        cuda::matmul_grouped(t, w.data(), count.data(), offset.data(), G, n_out, k, dx.get(), dy.get());
        const std::vector<float> got = dy.download();
        const uint64_t grouped_gemms = cuda::blas_gemms() - g0;
        if (cuda::blas_ready()) {
            EXPECT_EQ(grouped_gemms, 5u) << n_out << " x " << k << ": every non-empty group through cuBLAS";
        }
        ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_MIN_ROWS", "1", 1), 0);
        for (int64_t g = 0; g < G; ++g)
            if (count[g] > 0)
                cuda::matmul(t, w[g], n_out, k, dx.get() + offset[g] * k, count[g], dref.get() + offset[g] * n_out);
        const std::vector<float> want = dref.download();
        for (int64_t g = 0; g < G; ++g) {
            if (count[g] == 0) continue;
            const auto at = [&](const std::vector<float>& v) {
                return std::vector<float>(v.begin() + offset[g] * n_out, v.begin() + (offset[g] + count[g]) * n_out);
            };
            expect_close(std::string("grouped ") + ggml_type_name(t) + " " + std::to_string(n_out) + "x" +
                             std::to_string(k) + " group of " + std::to_string(count[g]) + " rows, all through cuBLAS",
                         at(got), at(want), count[g] == 1 ? blas_tolerance(t) : 1e-6);
        }
        unsetenv("MOEMESH_CUDA_BLAS_MIN_ROWS");
        unsetenv("MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS");
    }
    unsetenv("MOEMESH_CUDA_BLAS_TYPE");
    unsetenv("MOEMESH_CUDA_BLAS_GROUPED");
    unsetenv("MOEMESH_CUDA_BLAS");
    unsetenv("MOEMESH_CUDA_BLAS_CHUNK_MIB");
}

// The f16 form of quantized W in cuBLAS (MOEMESH_CUDA_BLAS_TYPE=f16, the default) keeps activations
// beyond f16's ±65504 (X and W scaled by a power of 2 against its range): rows of X of σ 1e5 (half
// their values beyond 65504, the largest ~5e5) and rows of ordinary size give each row within the
// usual tolerance of the exact product, as the TF32 form does; nothing infinite. (Unscaled f16 X
// would be inf there, or 65504 if saturated.)
TEST(CudaOps, HalfPromptProductsKeepLargeActivations) {
    REQUIRE_CUDA();
    std::string why;
    if (!cuda::blas_ready(&why)) GTEST_SKIP() << "cuBLAS does not load: " << why;
    const int64_t n_out = 256, k = 512, m = 40;
    for (const GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K}) {
        const QuantMatrix w = make_weights(t, n_out, k, 61);
        const DeviceBuffer<uint8_t> dw(w.bytes);
        std::vector<float> x = random_vec(static_cast<size_t>(m * k), 62);
        for (int64_t r = 0; r < m; r += 3)  // every third row: σ 1e5
            for (int64_t i = 0; i < k; ++i) x[r * k + i] *= 1e5f;
        const std::vector<float> want = ref_matmul(w.deq, n_out, k, x, m);
        const DeviceBuffer<float> dx(x);
        for (const char* type : {"f16", "tf32"}) {
            ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_TYPE", type, 1), 0);
            DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
            const uint64_t half0 = cuda::blas_half_gemms();
            cuda::matmul(t, dw.get(), n_out, k, dx.get(), m, dy.get());
            const std::vector<float> got = dy.download();
            EXPECT_EQ(cuda::blas_half_gemms() - half0, std::string(type) == "f16" ? 1u : 0u);
            double worst = 0;
            for (int64_t r = 0; r < m; ++r) {
                const std::vector<float> g(got.begin() + r * n_out, got.begin() + (r + 1) * n_out);
                const std::vector<float> e(want.begin() + r * n_out, want.begin() + (r + 1) * n_out);
                const Err err = compare(g, e);
                worst = std::max(worst, err.rel);
                EXPECT_LE(err.rel, 2e-3) << ggml_type_name(t) << " " << type << " row " << r;
                for (const float v : g)
                    ASSERT_TRUE(std::isfinite(v)) << ggml_type_name(t) << " " << type << " row " << r;
            }
            std::printf("[cuda] %s %s: x of σ 1e5 in every third row: worst row rel %.3e\n", ggml_type_name(t),
                        type, worst);
        }
    }
    unsetenv("MOEMESH_CUDA_BLAS_TYPE");
}

// load_own_kernels (cuda_ops.h): every function of our kernel files' modules is loaded on the device
// when it starts, not at its first launch. Under CUDA's lazy loading (the default, which our binaries
// no longer override with EAGER) some were not loaded before; after it, none is left. The emulator
// has no modules: nothing to load, no error.
TEST(CudaOps, OwnKernelsAreLoadedWhenTheDeviceStarts) {
    REQUIRE_CUDA();
    std::string why;
    const int before = cuda::own_kernels_not_loaded(&why);
#ifdef MM_CUDA_EMULATION
    EXPECT_EQ(before, -1);
    EXPECT_NE(why.find("emulator"), std::string::npos) << why;
    const cuda::KernelLoad k = cuda::load_own_kernels();
    EXPECT_TRUE(k.error.empty()) << k.error;
    EXPECT_EQ(k.modules, 0);
#else
    ASSERT_GE(before, 0) << why;
    const char* mode = std::getenv("CUDA_MODULE_LOADING");
    if (mode == nullptr || std::strcmp(mode, "EAGER") != 0) {
        EXPECT_GT(before, 0) << "lazy loading, yet every kernel was loaded before load_own_kernels";
    }
    const cuda::KernelLoad k = cuda::load_own_kernels();
    ASSERT_TRUE(k.error.empty()) << k.error;
    EXPECT_EQ(k.modules, cuda::kernel_switch_copies());  // one module per kernel file
    EXPECT_GE(k.functions, 100);
    EXPECT_EQ(k.loaded_now, before);
    EXPECT_EQ(cuda::own_kernels_not_loaded(&why), 0) << why;
    const cuda::KernelLoad again = cuda::load_own_kernels();  // once per device
    EXPECT_EQ(again.loaded_now, k.loaded_now);
    EXPECT_EQ(again.ms, k.ms);
    std::printf("[   NOTE   ] %d modules, %d functions, %d loaded now in %.1f ms\n", k.modules, k.functions,
                k.loaded_now, k.ms);
#endif
}

// A product recorded into a CUDA graph never reaches cuBLAS (whose scratch may need a synchronising
// allocation): the stream's capture takes the tiled kernel, and the replay computes the product.
TEST(CudaOps, CapturedPromptProductTakesTheOwnKernel) {
    REQUIRE_CUDA();
    const GgmlType t = GgmlType::Q4_K;
    const int64_t n_out = 96, k = 512, m = 40;
    const QuantMatrix w = make_weights(t, n_out, k, 23);
    const std::vector<float> x = random_vec(static_cast<size_t>(m * k), 24);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    const DeviceBuffer<float> dx(x);
    DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const uint64_t before = cuda::blas_gemms();
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cuda::matmul(t, dw.get(), n_out, k, dx.get(), m, dy.get(), s);
    cudaGraph_t g = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(s, &g));
    EXPECT_EQ(cuda::blas_gemms(), before);
    cudaGraphExec_t ge = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    CUDA_CHECK(cudaGraphLaunch(ge, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    expect_close("captured prompt matmul q4_K m=40", dy.download(), ref_matmul(w.deq, n_out, k, x, m), 2e-5);
    CUDA_CHECK(cudaGraphExecDestroy(ge));
    CUDA_CHECK(cudaGraphDestroy(g));
    CUDA_CHECK(cudaStreamDestroy(s));
}

// A tall matrix (int8-X GEMV by default for Q8_0 / Q4_0 / Q6_K: several rows per warp, two at a
// time; an odd row count).
TEST_P(CudaMatmul, TallGemv) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    ThreadPool pool(2);
    const int64_t n_out = 20011, k = 1024;
    const QuantMatrix w = make_weights(t, n_out, k, 13);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    for (const int64_t m : {1, 3}) {
        const std::vector<float> x = random_vec(static_cast<size_t>(m * k), 200 + static_cast<uint32_t>(m));
        const DeviceBuffer<float> dx(x);
        DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
        cuda::matmul(t, dw.get(), n_out, k, dx.get(), m, dy.get());
        const std::vector<float> got = dy.download();
        const std::string name = std::string("tall matmul ") + ggml_type_name(t) + " m=" + std::to_string(m);
        expect_close(name + " vs dequant ref", got, ref_matmul(w.deq, n_out, k, x, m), ref_tolerance(t, m));
        std::vector<float> cpu(got.size());
        matmul(pool, t, w.bytes.data(), n_out, k, x.data(), m, cpu.data());
        expect_close(name + " vs cpu matmul", got, cpu, cpu_tolerance(t));
    }
}

// The in-block int8-X GEMV (lm_head: many rows per warp) keeps the rows after each warp's first
// 16 KB in flight ahead of their turn (bulk L2 prefetches of R rows per step): on the emulator, which
// records them, every row of W but each warp's first ceil(16 KB / row) is prefetched, exactly once;
// the rows left out come in runs of exactly that many (a warp's first rows). The results are those of
// MOEMESH_CUDA_PREFETCH=0 (everywhere).
TEST(CudaOps, TallInt8GemvPrefetchesItsRowsAhead) {
    REQUIRE_CUDA();
    const GgmlType t = GgmlType::Q8_0;
    const int64_t n_out = 32768, k = 256;
    const size_t rb = ggml_row_bytes(t, k);
    [[maybe_unused]] const int64_t ahead = static_cast<int64_t>((16384 + rb - 1) / rb);
    const QuantMatrix w = make_weights(t, n_out, k, 17);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    const DeviceBuffer<float> dx(random_vec(static_cast<size_t>(k), 18));
    DeviceBuffer<float> dy(static_cast<size_t>(n_out));
#ifdef MM_CUDA_EMULATION
    (void)mm_emu::prefetch_log(true);
#endif
    cuda::matmul(t, dw.get(), n_out, k, dx.get(), 1, dy.get());  // tall: the in-block int8-X GEMV
    const std::vector<float> got = dy.download();
#ifdef MM_CUDA_EMULATION
    const std::vector<mm_emu::PrefetchRange> log = mm_emu::prefetch_log(false);
    const auto base = reinterpret_cast<uintptr_t>(dw.get());
    std::vector<int> rows(static_cast<size_t>(n_out), 0);  // prefetches touching each row's bytes
    for (const mm_emu::PrefetchRange& pr : log) {
        if (pr.end <= base || pr.begin >= base + w.bytes.size()) continue;
        // (the 16-byte widening can touch a neighbour row's edge: count the rows the range mostly covers)
        const int64_t r0 = static_cast<int64_t>((pr.begin - base + 15) / rb);
        const uintptr_t end = std::min<uintptr_t>(pr.end, base + w.bytes.size());
        const int64_t r1 = static_cast<int64_t>((end - base - 15 + rb - 1) / rb);
        for (int64_t r = r0; r < r1 && r < n_out; ++r) ++rows[static_cast<size_t>(r)];
    }
    int64_t covered = 0, twice = 0, bad_runs = 0, runs = 0;
    for (int64_t r = 0; r < n_out;) {
        if (rows[static_cast<size_t>(r)] > 0) {
            covered += 1, twice += rows[static_cast<size_t>(r)] > 1, ++r;
            continue;
        }
        int64_t e = r;
        while (e < n_out && rows[static_cast<size_t>(e)] == 0) ++e;
        ++runs;
        bad_runs += e - r != ahead && e != n_out;  // a warp's first rows (or the last warp's all)
        r = e;
    }
    std::printf("[   INFO   ] %lld of %lld rows prefetched ahead, %lld runs of %lld rows left to the first 16 KB\n",
                static_cast<long long>(covered), static_cast<long long>(n_out), static_cast<long long>(runs),
                static_cast<long long>(ahead));
    EXPECT_GE(covered, n_out / 2) << "the rows after each warp's first 16 KB were not prefetched";
    EXPECT_EQ(twice, 0) << "rows prefetched more than once";
    EXPECT_EQ(bad_runs, 0) << "rows left out that are not a warp's first " << ahead;
#endif
    ASSERT_EQ(cuda::set_kernel_switches(cuda::kSwitchNoPrefetch), cudaSuccess);
    cuda::matmul(t, dw.get(), n_out, k, dx.get(), 1, dy.get());
    ASSERT_EQ(cuda::set_kernel_switches(0), cudaSuccess);
    EXPECT_EQ(dy.download(), got);
}

TEST_P(CudaMatmul, ExpertIndexed) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t E = 4, n_out = 96, k = 512;
    std::vector<QuantMatrix> experts;
    std::vector<uint8_t> all;
    for (int64_t e = 0; e < E; ++e) {
        experts.push_back(make_weights(t, n_out, k, 50 + static_cast<uint32_t>(e)));
        all.insert(all.end(), experts.back().bytes.begin(), experts.back().bytes.end());
    }
    const size_t matrix_bytes = experts[0].bytes.size();
    const std::vector<int32_t> ids = {3, 0, 3, 1, 2};
    const int64_t n_sel = static_cast<int64_t>(ids.size());
    const std::vector<float> x = random_vec(static_cast<size_t>(n_sel * k), 7);
    const DeviceBuffer<uint8_t> dw(all);
    const DeviceBuffer<int32_t> dids(ids);
    const DeviceBuffer<float> dx(x);
    for (const bool broadcast : {false, true}) {
        DeviceBuffer<float> dy(static_cast<size_t>(n_sel * n_out));
        cuda::matmul_id(t, dw.get(), matrix_bytes, dids.get(), n_sel, n_out, k, dx.get(), broadcast ? 0 : k,
                        dy.get());
        const std::vector<float> got = dy.download();
        std::vector<float> want, cpu;
        ThreadPool pool(2);
        for (int64_t s = 0; s < n_sel; ++s) {
            const std::vector<float> xs(x.begin() + (broadcast ? 0 : s * k), x.begin() + (broadcast ? 0 : s * k) + k);
            const std::vector<float> ys = ref_matmul(experts[ids[s]].deq, n_out, k, xs, 1);
            want.insert(want.end(), ys.begin(), ys.end());
            std::vector<float> yc(static_cast<size_t>(n_out));
            matmul(pool, t, experts[ids[s]].bytes.data(), n_out, k, xs.data(), 1, yc.data());
            cpu.insert(cpu.end(), yc.begin(), yc.end());
        }
        const std::string name =
            std::string("matmul_id ") + ggml_type_name(t) + (broadcast ? " shared x" : " per-row x");
        expect_close(name + " vs dequant ref", got, want, ref_tolerance(t, 1));
        expect_close(name + " vs cpu matmul", got, cpu, cpu_tolerance(t));
    }
}

// The fused decode gate/up/SwiGLU (the resident MoE's first launch) gives the bits of matmul_id(gate),
// matmul_id(up) and swiglu, or declines (returns false) and writes nothing, for every type; the
// common quantized types must not decline at the decode size (n_out · n_sel below the int8 GEMV's).
// Products of matrices at arbitrary addresses (an expert cache's slices) in one launch: the bits
// of one matmul (m = 1) per selection, and with SwiGLU of the gate and up products and swiglu.
TEST_P(CudaMatmul, PointerGemvsAreThePerMatrixLaunches) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t n_out = 96, k = 512;
    std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> mats;  // gate 0..2, up 3..5, separately allocated
    for (uint32_t e = 0; e < 6; ++e)
        mats.push_back(std::make_unique<DeviceBuffer<uint8_t>>(make_weights(t, n_out, k, 100 + e).bytes));
    const int sel[4] = {2, 0, 1, 2};
    std::vector<const void*> gp, up;
    for (int j : sel) gp.push_back(mats[j]->get()), up.push_back(mats[j + 3]->get());
    const int64_t n_sel = 4;
    const std::vector<float> x = random_vec(static_cast<size_t>(n_sel * k), 13);
    const DeviceBuffer<float> dx(x);
    auto addresses = [](const std::vector<const void*>& v) {
        std::vector<uint64_t> a;
        for (const void* q : v) a.push_back(reinterpret_cast<uintptr_t>(q));
        return a;
    };
    const DeviceBuffer<uint64_t> dga(addresses(gp)), dua(addresses(up));
    const auto* dgp = reinterpret_cast<const void* const*>(dga.get());
    const auto* dup = reinterpret_cast<const void* const*>(dua.get());
    DeviceBuffer<float> g(static_cast<size_t>(n_sel * n_out)), u(static_cast<size_t>(n_sel * n_out));
    for (int64_t j = 0; j < n_sel; ++j) {
        cuda::matmul(t, gp[j], n_out, k, dx.get() + j * k, 1, g.get() + j * n_out);
        cuda::matmul(t, up[j], n_out, k, dx.get() + j * k, 1, u.get() + j * n_out);
    }
    const std::vector<float> want_g = g.download();
    cuda::swiglu(g.get(), u.get(), g.get(), n_sel * n_out);
    const std::vector<float> want_s = g.download();
    const std::vector<float> canary(static_cast<size_t>(n_sel * n_out), 12345.0f);
    DeviceBuffer<float> y1(canary), y2(canary);
    const bool plain = cuda::matmul_ptr(t, dgp, n_sel, n_out, k, dx.get(), k, y1.get());
    const bool swi = cuda::matmul_ptr_swiglu(t, dgp, dup, n_sel, n_out, k, dx.get(), k, y2.get());
    const std::string name = std::string("matmul_ptr ") + ggml_type_name(t);
    EXPECT_EQ(plain, swi) << name;
    const char* e = std::getenv("MOEMESH_CUDA_GEMV");
    const bool int8_everywhere = e != nullptr && std::string(e) == "new";
    if (!plain || !swi) {
        if (!plain) {
            EXPECT_EQ(y1.download(), canary) << name << ": declined but wrote";
        }
        if (!swi) {
            EXPECT_EQ(y2.download(), canary) << name << " swiglu: declined but wrote";
        }
        if (!int8_everywhere) {
            EXPECT_FALSE(t == GgmlType::Q8_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K || t == GgmlType::Q4_0 ||
                         t == GgmlType::F16 || t == GgmlType::BF16 || t == GgmlType::F32)
                << name << " declined";
        }
        return;
    }
    EXPECT_FALSE(int8_everywhere && t == GgmlType::Q4_K) << name << ": taken where matmul takes the int8-X GEMV";
    auto differing = [](const std::vector<float>& a, const std::vector<float>& b) {
        size_t d = a.size() == b.size() ? 0 : std::max(a.size(), b.size());
        for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
        return d;
    };
    EXPECT_EQ(differing(y1.download(), want_g), 0u) << name << ": values differ from one matmul per selection";
    EXPECT_EQ(differing(y2.download(), want_s), 0u) << name << " swiglu: values differ from the separate launches";
}

// A decode step's expert down products on the device: E stacked matrices (stacked_weights from
// seed), the selections' inputs g [n_sel, k] and router weights w, and the reference of the fused
// forms: matmul_id into y [n_sel, n_out], then moe_combine into want [n_out].
struct DownCase {
    int64_t n_sel;
    size_t matrix_bytes;
    DeviceBuffer<uint8_t> dd;
    DeviceBuffer<int32_t> dids;
    DeviceBuffer<float> dg, dw, y, want;
    DownCase(GgmlType t, int64_t E, int64_t n_out, int64_t k, const std::vector<int32_t>& ids, uint32_t seed)
        : n_sel(static_cast<int64_t>(ids.size())),
          matrix_bytes(static_cast<size_t>(n_out) * ggml_row_bytes(t, k)),
          dd(stacked_weights(t, E, n_out, k, seed)),
          dids(ids),
          dg(random_vec(static_cast<size_t>(n_sel * k), seed + 100)),
          dw(random_vec(ids.size(), seed + 101)),
          y(static_cast<size_t>(n_sel * n_out)),
          want(static_cast<size_t>(n_out)) {
        cuda::matmul_id(t, dd.get(), matrix_bytes, dids.get(), n_sel, n_out, k, dg.get(), k, y.get());
        cuda::moe_combine(y.get(), nullptr, dw.get(), want.get(), 1, n_sel, n_out);
    }
    // matmul_id_down_combine on this case into out (with y and ctr: the int8-X GEMV's form).
    bool down_combine(GgmlType t, int64_t n_out, int64_t k, float* out, float* y2 = nullptr, unsigned* ctr = nullptr,
                      const cuda::AddNorm* norm = nullptr) const {
        return cuda::matmul_id_down_combine(t, dd.get(), matrix_bytes, dids.get(), dw.get(), n_sel, n_out, k, dg.get(),
                                            out, nullptr, y2, ctr, norm);
    }
};

// The decode step's expert down products and weighted sum in one launch: the bits of matmul_id
// (the f32-X GEMV at this size) then moe_combine.
TEST_P(CudaMatmul, DownCombineIsMatmulIdThenCombine) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t E = 4, n_out = 96, k = 512;
    const DownCase dc(t, E, n_out, k, {2, 0, 3, 2, 1}, 80);
    const std::vector<float> canary(static_cast<size_t>(n_out), 12345.0f);
    DeviceBuffer<float> out(canary);
    const bool fused = dc.down_combine(t, n_out, k, out.get());
    const std::string name = std::string("matmul_id_down_combine ") + ggml_type_name(t);
    const std::vector<float> got = out.download();
    const char* e = std::getenv("MOEMESH_CUDA_GEMV");
    const bool int8_everywhere = e != nullptr && std::string(e) == "new";
    if (!fused) {
        EXPECT_EQ(got, canary) << name << ": declined but wrote";
        if (!int8_everywhere) {
            EXPECT_FALSE(t == GgmlType::Q8_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K || t == GgmlType::Q4_0 ||
                         t == GgmlType::F16 || t == GgmlType::BF16)
                << name << " declined";
        }
        return;
    }
    EXPECT_FALSE(int8_everywhere && t == GgmlType::Q4_K) << name << ": fused where matmul_id takes the int8-X GEMV";
    const std::vector<float> ref = dc.want.download();
    size_t diff = 0;
    for (size_t i = 0; i < got.size(); ++i) diff += std::memcmp(&got[i], &ref[i], sizeof(float)) != 0;
    EXPECT_EQ(diff, 0u) << name << ": " << diff << " of " << got.size() << " values differ from the two launches";
    if (t == GgmlType::Q4_K) {  // 8 selections of 2048 rows: matmul_id's int8-X GEMV, so declined
        const QuantMatrix big = make_weights(t, 2048, 768, 90);
        const DeviceBuffer<uint8_t> db(big.bytes);
        const DeviceBuffer<int32_t> zeros(std::vector<int32_t>(8, 0));
        const DeviceBuffer<float> g8(random_vec(8 * 768, 11)), w8(random_vec(8, 12));
        DeviceBuffer<float> o8(2048);
        EXPECT_FALSE(cuda::matmul_id_down_combine(t, db.get(), big.bytes.size(), zeros.get(), w8.get(), 8, 2048, 768,
                                                  g8.get(), o8.get()))
            << name << ": 16384 rows take the int8-X GEMV";
    }
}

// Where matmul_id takes the in-block int8-X GEMV (16384 rows and more), matmul_id_down_combine with
// a workspace and a counter runs it with the weighted sum in its last block: the bits of matmul_id
// then moe_combine (y too); the counter left at 0; without them, declined.
TEST_P(CudaMatmul, DownCombineInTheInt8GemvsLastBlock) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t E = 3, n_out = 2048, k = 256;
    const DownCase dc(t, E, n_out, k, {2, 0, 1, 2, 1, 0, 0, 2}, 180);
    const std::vector<float> want_y = dc.y.download(), want_out = dc.want.download();
    const std::string name = std::string("down + combine in the int8 GEMV ") + ggml_type_name(t);
    const std::vector<float> canary(static_cast<size_t>(n_out), 12345.0f);
    DeviceBuffer<float> out(canary);
    // Without a workspace: the int8-X GEMV's sizes are declined (the caller runs two launches).
    const bool plain = dc.down_combine(t, n_out, k, out.get());
    if (plain) {  // the f32-X kernel took it: not this test's path
        EXPECT_FALSE(t == GgmlType::Q8_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K || t == GgmlType::Q4_0) << name;
        return;
    }
    EXPECT_EQ(out.download(), canary) << name << ": declined but wrote";
    DeviceBuffer<unsigned> ctr(std::vector<unsigned>{0u});
    for (int rep = 0; rep < 2; ++rep) {
        DeviceBuffer<float> y2(std::vector<float>(static_cast<size_t>(dc.n_sel * n_out), std::nanf(""))), out2(canary);
        const bool fused = dc.down_combine(t, n_out, k, out2.get(), y2.get(), ctr.get());
        const bool int8_type = t == GgmlType::Q8_0 || t == GgmlType::Q4_0 || t == GgmlType::Q4_K ||
                               t == GgmlType::Q6_K || t == GgmlType::Q5_0 || t == GgmlType::Q5_K ||
                               t == GgmlType::Q3_K || t == GgmlType::Q2_K;
        EXPECT_EQ(fused, int8_type) << name;
        if (!fused) return;
        EXPECT_EQ(y2.download(), want_y) << name << " run " << rep << ": y";
        EXPECT_EQ(out2.download(), want_out) << name << " run " << rep << ": the weighted sum";
        EXPECT_EQ(ctr.download(), std::vector<unsigned>{0u}) << name << " run " << rep << ": counter not left at 0";
    }
}

// With an AddNorm the int8-X GEMV's last block also adds the sum to the residual and runs the next
// layer's input norm (+ its quantized twin): the bits of down + combine then add_rmsnorm; declined
// (nothing written) where the norm's register path cannot take the row.
TEST_P(CudaMatmul, DownCombineWithTheResidualAddAndNormInTheLastBlock) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const bool int8_type = t == GgmlType::Q8_0 || t == GgmlType::Q4_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K ||
                           t == GgmlType::Q5_0 || t == GgmlType::Q5_K || t == GgmlType::Q3_K || t == GgmlType::Q2_K;
    const std::string name = std::string("down + combine + add + norm ") + ggml_type_name(t);
    const int64_t E = 3, k = 256;
    const float eps = 1e-6f;
    for (const int64_t n_out : {int64_t{2048}, int64_t{2080}}) {  // 2080: not a multiple of 256
        const DownCase dc(t, E, n_out, k, {2, 0, 1, 2, 1, 0, 0, 2}, 190);
        const std::vector<float> x0 = random_vec(static_cast<size_t>(n_out), 191, 3.0f);
        const DeviceBuffer<float> nw(random_vec(static_cast<size_t>(n_out), 192));
        const size_t qb = n_out % 256 == 0 ? cuda::qx_bytes(n_out) : 1;
        DeviceBuffer<float> want_x(x0), want_y(static_cast<size_t>(n_out));
        DeviceBuffer<uint8_t> want_q(qb);
        cuda::add_rmsnorm(want_x.get(), dc.want.get(), nw.get(), want_y.get(), 1, n_out, eps, nullptr,
                          n_out % 256 == 0 ? want_q.get() : nullptr);
        const std::vector<float> nans(static_cast<size_t>(n_out), std::nanf(""));
        const std::vector<uint8_t> q_canary(qb, 0xAB);
        DeviceBuffer<unsigned> ctr(std::vector<unsigned>{0u});
        for (int run = 0; run < 4; ++run) {
            const bool twin = run % 2 == 0;
            DeviceBuffer<float> x(x0), y(nans), out(nans);
            DeviceBuffer<float> y2(std::vector<float>(static_cast<size_t>(dc.n_sel * n_out), std::nanf("")));
            DeviceBuffer<uint8_t> q(q_canary);
            const cuda::AddNorm norm{x.get(), nw.get(), y.get(), eps, twin ? q.get() : nullptr};
            const bool fused = dc.down_combine(t, n_out, k, out.get(), y2.get(), ctr.get(), &norm);
            const std::string what = name + " n_out " + std::to_string(n_out) + " run " + std::to_string(run);
            EXPECT_EQ(fused, int8_type && n_out % 256 == 0) << what;
            if (!fused) {
                EXPECT_EQ(x.download(), x0) << what << ": declined but wrote x";
                EXPECT_EQ(q.download(), q_canary) << what << ": declined but wrote the twin";
                const std::vector<float> o = out.download(), yy = y.download();
                EXPECT_TRUE(std::all_of(o.begin(), o.end(), [](float v) { return std::isnan(v); })) << what;
                EXPECT_TRUE(std::all_of(yy.begin(), yy.end(), [](float v) { return std::isnan(v); })) << what;
                break;
            }
            EXPECT_EQ(out.download(), dc.want.download()) << what << ": the weighted sum";
            EXPECT_EQ(x.download(), want_x.download()) << what << ": the residual";
            EXPECT_EQ(y.download(), want_y.download()) << what << ": the norm";
            if (twin) EXPECT_EQ(q.download(), want_q.download()) << what << ": the twin";
            else EXPECT_EQ(q.download(), q_canary) << what << ": a twin written without one asked for";
            EXPECT_EQ(ctr.download(), std::vector<unsigned>{0u}) << what << ": counter not left at 0";
        }
    }
}

TEST_P(CudaMatmul, ExpertIndexedSwigluIsTheThreeLaunches) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t E = 4, n_out = 96, k = 512;
    const std::vector<uint8_t> gate = stacked_weights(t, E, n_out, k, 60), up = stacked_weights(t, E, n_out, k, 70);
    const size_t matrix_bytes = gate.size() / E;
    const std::vector<int32_t> ids = {2, 0, 3, 2};
    const int64_t n_sel = static_cast<int64_t>(ids.size());
    const std::vector<float> x = random_vec(static_cast<size_t>(n_sel * k), 8);
    const DeviceBuffer<uint8_t> dg(gate), du(up);
    const DeviceBuffer<int32_t> dids(ids);
    const DeviceBuffer<float> dx(x);
    for (const bool broadcast : {false, true}) {
        const int64_t stride = broadcast ? 0 : k;
        DeviceBuffer<float> g(static_cast<size_t>(n_sel * n_out)), u(static_cast<size_t>(n_sel * n_out));
        cuda::matmul_id(t, dg.get(), matrix_bytes, dids.get(), n_sel, n_out, k, dx.get(), stride, g.get());
        cuda::matmul_id(t, du.get(), matrix_bytes, dids.get(), n_sel, n_out, k, dx.get(), stride, u.get());
        cuda::swiglu(g.get(), u.get(), g.get(), n_sel * n_out);
        const std::vector<float> want = g.download();
        const std::vector<float> canary(static_cast<size_t>(n_sel * n_out), 12345.0f);
        DeviceBuffer<float> y(canary);
        const bool fused = cuda::matmul_id_swiglu(t, dg.get(), du.get(), matrix_bytes, dids.get(), n_sel, n_out, k,
                                                  dx.get(), stride, y.get());
        const std::vector<float> got = y.download();
        const std::string name = std::string("matmul_id_swiglu ") + ggml_type_name(t) + (broadcast ? " shared x" : "");
        if (!fused) {
            EXPECT_EQ(got, canary) << name << ": declined but wrote";
            const bool common = t == GgmlType::Q8_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K ||
                                t == GgmlType::Q4_0 || t == GgmlType::F16 || t == GgmlType::BF16;
            const char* e = std::getenv("MOEMESH_CUDA_GEMV");
            if (e == nullptr || std::string(e) != "new") {
                EXPECT_FALSE(common) << name << " declined";
            }
            continue;
        }
        ASSERT_EQ(got.size(), want.size());
        size_t diff = 0;
        for (size_t i = 0; i < got.size(); ++i) diff += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
        EXPECT_EQ(diff, 0u) << name << ": " << diff << " of " << got.size() << " values differ from the three launches";
    }
}

// The gate/up GEMV of a decode step puts the matrices the next launch reads for the same
// selections (the experts' down projections) into L2: the same results whatever the switch; on the
// emulator, which records prefetches (and fails a launch whose prefetch leaves device memory), the
// bytes prefetched from the next tensor are the selected experts' matrices — every byte of them, and
// nothing else but the 16-byte widening at their ends — after the warps' reads (the default) or
// right after the wait (early); none with MOEMESH_CUDA_EXPERT_PREFETCH=0. Experts by ids (f32 X and
// the quantized X) and by a table of addresses (matmul_ptr_swiglu: a worker's expert cache).
TEST_P(CudaMatmul, ExpertIndexedSwigluPrefetchesTheNextMatrices) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t E = 5, n_out = 96, k = 512;
    const std::vector<uint8_t> gate = stacked_weights(t, E, n_out, k, 80), up = stacked_weights(t, E, n_out, k, 90);
    const size_t matrix_bytes = gate.size() / E;
    const size_t next_bytes = 9000;  // not a multiple of 16: shares and widening at odd ends
    const std::vector<int32_t> ids = {3, 1, 3, 4};
    const int64_t n_sel = static_cast<int64_t>(ids.size());
    const DeviceBuffer<uint8_t> dg(gate), du(up), dn(static_cast<size_t>(E) * next_bytes);
    const DeviceBuffer<int32_t> dids(ids);
    std::vector<const void*> table;  // [gate n_sel | up n_sel | next n_sel]
    for (const auto* m : {dg.get(), du.get()})
        for (const int32_t id : ids) table.push_back(m + static_cast<size_t>(id) * matrix_bytes);
    for (const int32_t id : ids) table.push_back(dn.get() + static_cast<size_t>(id) * next_bytes);
    DeviceBuffer<const void*> dtable(table);
    const auto* tp = dtable.get();
    const DeviceBuffer<float> dx(random_vec(static_cast<size_t>(k), 9)), dnw(random_vec(static_cast<size_t>(k), 10));
    DeviceBuffer<float> dxn(static_cast<size_t>(k));
    DeviceBuffer<uint8_t> dq(cuda::qx_bytes(k));
    cuda::rmsnorm(dx.get(), dnw.get(), dxn.get(), 1, k, 1e-6f, nullptr, dq.get());
    [[maybe_unused]] const auto base = reinterpret_cast<uintptr_t>(dn.get());
    struct Run {
        const char* name;
        unsigned sw;
        bool prefetches;
    };
    enum Form { kIdsF32, kIdsQx, kTable };
    for (const Form form : {kIdsF32, kIdsQx, kTable}) {
        if (form == kIdsQx && !cuda::qx_takes(t, k, n_out * n_sel)) continue;
        const uint8_t* q = form == kIdsQx ? dq.get() : nullptr;
        // with_next: the launch with the next matrices given
        const auto launch = [&](float* y, bool with_next) {
            if (form == kTable)
                return cuda::matmul_ptr_swiglu(t, tp, tp + n_sel, n_sel, n_out, k, dxn.get(), 0, y, nullptr,
                                               with_next ? tp + 2 * n_sel : nullptr, next_bytes);
            return cuda::matmul_id_swiglu(t, dg.get(), du.get(), matrix_bytes, dids.get(), n_sel, n_out, k, dxn.get(),
                                          0, y, nullptr, q, with_next ? dn.get() : nullptr, next_bytes);
        };
        DeviceBuffer<float> y0(static_cast<size_t>(n_sel * n_out));
        if (!launch(y0.get(), false)) continue;  // declined (tested above): the next launch's prefetch goes with it
        const std::vector<float> want = y0.download();
        for (const Run& r : {Run{"after the reads", 0u, true}, Run{"early", cuda::kSwitchExpertPrefetchEarly, true},
                             Run{"off", cuda::kSwitchNoExpertPrefetch, false}}) {
            const std::string name = std::string(ggml_type_name(t)) +
                                     (form == kIdsF32 ? " ids, f32 x, " : form == kIdsQx ? " ids, qx, " : " table, ") +
                                     r.name;
            ASSERT_EQ(cuda::set_kernel_switches(r.sw), cudaSuccess);
#ifdef MM_CUDA_EMULATION
            (void)mm_emu::prefetch_log(true);
#endif
            DeviceBuffer<float> y(static_cast<size_t>(n_sel * n_out));
            ASSERT_TRUE(launch(y.get(), true)) << name;
            EXPECT_EQ(y.download(), want) << name << ": the results changed";
#ifdef MM_CUDA_EMULATION
            const std::vector<mm_emu::PrefetchRange> log = mm_emu::prefetch_log(false);
            std::vector<int> covered(static_cast<size_t>(E) * next_bytes + 32, 0);  // bytes from base − 16
            size_t outside = 0;
            for (const mm_emu::PrefetchRange& pr : log) {
                if (pr.end <= base - 16 || pr.begin >= base + covered.size() - 16) continue;  // another tensor
                for (uintptr_t a = pr.begin; a < pr.end; ++a) {
                    if (a + 16 < base || a >= base + covered.size() - 16) {
                        ++outside;
                        continue;
                    }
                    ++covered[a + 16 - base];
                }
            }
            EXPECT_EQ(outside, 0u) << name;
            size_t missing = 0, extra = 0;
            for (size_t i = 0; i < covered.size(); ++i) {
                const int64_t off = static_cast<int64_t>(i) - 16;  // from base
                bool selected = false, near = false;
                for (const int32_t id : ids) {
                    const int64_t b = id * static_cast<int64_t>(next_bytes), e = b + static_cast<int64_t>(next_bytes);
                    selected = selected || (off >= b && off < e);
                    near = near || (off >= (b & ~int64_t{15}) && off < ((e + 15) & ~int64_t{15}));
                }
                if (r.prefetches && selected && covered[i] == 0) ++missing;
                if (covered[i] > 0 && (!r.prefetches || !near)) ++extra;
            }
            EXPECT_EQ(missing, 0u) << name << ": bytes of the selected experts' next matrices not prefetched";
            EXPECT_EQ(extra, 0u) << name << ": bytes prefetched that the next launch does not read";
#endif
        }
        ASSERT_EQ(cuda::set_kernel_switches(0), cudaSuccess);
    }
#ifndef MM_CUDA_EMULATION
    std::printf("[   NOTE   ] what was prefetched is checked on the emulator only (results checked here)\n");
#endif
}

// A decode step's q/k/v in one launch: the bits of matmul one by one, or a decline that writes
// nothing; the common types must not decline at these sizes; n outside 2..kMultiGemvMax declines.
TEST_P(CudaMatmul, MultiGemvIsTheSeparateProducts) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t k = 512;
    const int64_t n_out[3] = {96, 40, 17};  // rows that end inside a block and a matrix inside a block
    std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> dw;
    for (int j = 0; j < 3; ++j) dw.push_back(std::make_unique<DeviceBuffer<uint8_t>>(make_weights(t, n_out[j], k, 80 + static_cast<uint32_t>(j)).bytes));
    const std::vector<float> x = random_vec(static_cast<size_t>(k), 9);
    const DeviceBuffer<float> dx(x);
    std::vector<std::vector<float>> want;
    for (int j = 0; j < 3; ++j) {
        DeviceBuffer<float> y(static_cast<size_t>(n_out[j]));
        cuda::matmul(t, dw[j]->get(), n_out[j], k, dx.get(), 1, y.get());
        want.push_back(y.download());
    }
    std::vector<std::unique_ptr<DeviceBuffer<float>>> dy;
    for (int j = 0; j < 3; ++j) dy.push_back(std::make_unique<DeviceBuffer<float>>(std::vector<float>(static_cast<size_t>(n_out[j]), 12345.0f)));
    const void* w[3] = {dw[0]->get(), dw[1]->get(), dw[2]->get()};
    float* y[3] = {dy[0]->get(), dy[1]->get(), dy[2]->get()};
    const std::string name = std::string("matmul_multi_gemv ") + ggml_type_name(t);
    EXPECT_FALSE(cuda::matmul_multi_gemv(t, 1, w, n_out, k, dx.get(), y)) << name << ": one product";
    const bool fused = cuda::matmul_multi_gemv(t, 3, w, n_out, k, dx.get(), y);
    for (int j = 0; j < 3; ++j) {
        const std::vector<float> got = dy[j]->download();
        if (!fused) {
            EXPECT_EQ(got, std::vector<float>(static_cast<size_t>(n_out[j]), 12345.0f)) << name << ": declined but wrote";
            continue;
        }
        ASSERT_EQ(got.size(), want[j].size());
        EXPECT_EQ(std::memcmp(got.data(), want[j].data(), sizeof(float) * got.size()), 0)
            << name << ": product " << j << " differs from matmul";
    }
    const bool common = t == GgmlType::Q8_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K || t == GgmlType::Q4_0 ||
                        t == GgmlType::F16 || t == GgmlType::BF16 || t == GgmlType::F32;
    const char* e = std::getenv("MOEMESH_CUDA_GEMV");
    if (common && (e == nullptr || std::string(e) != "new")) {
        EXPECT_TRUE(fused) << name << " declined";
    }
}

// A decode token's q/k/v with each head finished in the GEMV's last block for its rows
// (cuda::QkvRope): the bits of matmul_multi_gemv then norm_rope_store_kv (q, k, v, both caches), from
// f32 X and from its quantized twin, p0 on the host and on the device, f16 and f32 caches, a partial
// rotation; the counters left at 0; declined with nothing written where it cannot be taken.
TEST_P(CudaMatmul, MultiGemvWithEachHeadsNormsRopeAndKvStores) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const std::string name = std::string("q/k/v + rope ") + ggml_type_name(t);
    const int64_t Nh = 4, Nkv = 2, D = 128, k = 256, ctx = 48;
    const int32_t p0 = 37;
    const int64_t n_out[3] = {Nh * D, Nkv * D, Nkv * D};
    std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> dw;
    for (int j = 0; j < 3; ++j)
        dw.push_back(
            std::make_unique<DeviceBuffer<uint8_t>>(make_weights(t, n_out[j], k, 300 + static_cast<uint32_t>(j)).bytes));
    const void* w[3] = {dw[0]->get(), dw[1]->get(), dw[2]->get()};
    const DeviceBuffer<float> x(random_vec(static_cast<size_t>(k), 310, 2.0f));
    const DeviceBuffer<float> nw(random_vec(static_cast<size_t>(k), 311));
    DeviceBuffer<float> xn(static_cast<size_t>(k));
    DeviceBuffer<uint8_t> qx(cuda::qx_bytes(k));
    cuda::rmsnorm(x.get(), nw.get(), xn.get(), 1, k, 1e-6f, nullptr, qx.get());
    const DeviceBuffer<float> qw(random_vec(static_cast<size_t>(D), 312)), kw(random_vec(static_cast<size_t>(D), 313));
    const DeviceBuffer<int32_t> dp0(std::vector<int32_t>{p0});
    const RopeParams rp = make_rope_params(64, 1e6f, "yarn", 4.0f, 1.0f, 256);
    DeviceBuffer<unsigned> ctr(std::vector<unsigned>(static_cast<size_t>(Nh + 2 * Nkv), 0u));
    struct Case {
        bool twin, f16, dev_p0;
        int64_t rot;
    };
    for (const Case c : {Case{false, true, false, D}, Case{true, true, true, D}, Case{true, false, false, 64},
                         Case{false, false, true, 64}}) {
        const std::string what = name + (c.twin ? " (quantized X)" : " (f32 X)") + (c.f16 ? " f16" : " f32") +
                                 (c.dev_p0 ? " p0 on the device" : "") + " rot " + std::to_string(c.rot);
        const size_t cache_bytes = static_cast<size_t>(ctx * Nkv * D) * (c.f16 ? 2 : 4);
        const std::vector<uint8_t> cache0(cache_bytes, 0x5a);
        const std::vector<float> canary(static_cast<size_t>(Nh * D), 12345.0f);
        const uint8_t* q8 = c.twin ? qx.get() : nullptr;
        std::vector<std::vector<float>> want(3);
        std::vector<uint8_t> want_kc, want_vc;
        {
            DeviceBuffer<float> y0(canary), y1(canary), y2(canary);
            DeviceBuffer<uint8_t> kc(cache0), vc(cache0);
            float* y[3] = {y0.get(), y1.get(), y2.get()};
            if (!cuda::matmul_multi_gemv(t, 3, w, n_out, k, xn.get(), y, nullptr, q8)) return;  // not this type's path
            ASSERT_TRUE(cuda::norm_rope_store_kv(y0.get(), y1.get(), y2.get(), qw.get(), kw.get(), 1e-6f, 1, Nh, Nkv, D,
                                                 c.rot, c.dev_p0 ? -1 : p0, c.dev_p0 ? dp0.get() : nullptr, rp,
                                                 kc.get(), vc.get(), c.f16));
            want = {y0.download(), y1.download(), y2.download()};
            want_kc = kc.download(), want_vc = vc.download();
        }
        for (int rep = 0; rep < 2; ++rep) {
            DeviceBuffer<float> y0(canary), y1(canary), y2(canary);
            DeviceBuffer<uint8_t> kc(cache0), vc(cache0);
            float* y[3] = {y0.get(), y1.get(), y2.get()};
            const cuda::QkvRope r{qw.get(), kw.get(), 1e-6f, Nh, Nkv, D, c.rot, c.dev_p0 ? -1 : p0,
                                  c.dev_p0 ? dp0.get() : nullptr, rp, kc.get(), vc.get(), c.f16, ctr.get()};
            ASSERT_TRUE(cuda::matmul_multi_gemv(t, 3, w, n_out, k, xn.get(), y, nullptr, q8, &r)) << what;
            EXPECT_EQ(y0.download(), want[0]) << what << " run " << rep << ": q";
            EXPECT_EQ(y1.download(), want[1]) << what << " run " << rep << ": k";
            EXPECT_EQ(y2.download(), want[2]) << what << " run " << rep << ": v";
            EXPECT_EQ(kc.download(), want_kc) << what << " run " << rep << ": k cache";
            EXPECT_EQ(vc.download(), want_vc) << what << " run " << rep << ": v cache";
            EXPECT_EQ(ctr.download(), std::vector<unsigned>(static_cast<size_t>(Nh + 2 * Nkv), 0u))
                << what << " run " << rep << ": counters not left at 0";
        }
    }
    // Declined, nothing written: no k norm; head_dim 64 (not one block's 128 threads); two products.
    const std::vector<float> canary(static_cast<size_t>(Nh * D), 12345.0f);
    DeviceBuffer<float> y0(canary), y1(canary), y2(canary);
    DeviceBuffer<uint8_t> kc(std::vector<uint8_t>(64, 0)), vc(std::vector<uint8_t>(64, 0));
    float* y[3] = {y0.get(), y1.get(), y2.get()};
    cuda::QkvRope r{qw.get(), nullptr, 1e-6f, Nh, Nkv, D, D, p0, nullptr, rp, kc.get(), vc.get(), true, ctr.get()};
    EXPECT_FALSE(cuda::matmul_multi_gemv(t, 3, w, n_out, k, xn.get(), y, nullptr, nullptr, &r))
        << name << ": no k norm";
    r.k_norm = kw.get();
    r.n_head = 2 * Nh, r.n_head_kv = 2 * Nkv, r.head_dim = D / 2, r.rot_dim = D / 2;
    EXPECT_FALSE(cuda::matmul_multi_gemv(t, 3, w, n_out, k, xn.get(), y, nullptr, nullptr, &r)) << name << ": D = 64";
    r.n_head = Nh, r.n_head_kv = Nkv, r.head_dim = D, r.rot_dim = D;
    EXPECT_FALSE(cuda::matmul_multi_gemv(t, 2, w, n_out, k, xn.get(), y, nullptr, nullptr, &r))
        << name << ": 2 products";
    EXPECT_EQ(y0.download(), canary) << name << ": declined but wrote";
    EXPECT_EQ(y1.download(), canary) << name << ": declined but wrote";
}

// Every type the CUDA matmul takes.
// Mismatches between a quantized row (cuda_ops.h qx_bytes layout) and the host's quantization of its
// k floats y: q and both scales bit for bit, the half sums to 1e-5. xhat / xhat16 (optional): the
// rounded row with the f32 / f16-rounded scales.
int qx_mismatches(const float* y, const uint8_t* b, int64_t k, float* xhat = nullptr, float* xhat16 = nullptr) {
    const auto* qv = reinterpret_cast<const int8_t*>(b);
    const auto* d = reinterpret_cast<const float*>(b + k);
    const float* d16 = d + k / 32;
    const float* s16 = d16 + k / 32;
    int bad = 0;
    for (int64_t g = 0; g < k / 32; ++g) {
        const float* yg = &y[g * 32];
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(yg[i]));
        const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
        bad += d[g] != dd;
        bad += d16[g] != fp16_to_fp32(fp32_to_fp16(dd));
        for (int h = 0; h < 2; ++h) {
            double sum = 0.0;
            for (int i = 16 * h; i < 16 * h + 16; ++i) {
                const float want = std::round(yg[i] * id);
                bad += qv[g * 32 + i] != static_cast<int8_t>(want);
                sum += static_cast<double>(dd) * want;
                if (xhat) xhat[g * 32 + i] = dd * want;
                if (xhat16) xhat16[g * 32 + i] = d16[g] * want;
            }
            bad += std::fabs(s16[2 * g + h] - sum) > 1e-5 * (1.0 + std::fabs(sum));
        }
    }
    return bad;
}

// X quantized once by the norm (cuda_ops.h qx_bytes): the norms write y and its quantized twin
// (rows of n elements: per 32 d = amax/127 and q = round(y/d) exactly as on the host, d rounded to
// f16 next to it, d·Σq per 16), and matmul_qx computes exactly the product of the dequantized W
// with that rounded X (up to f32 summation order); matmul_multi_gemv and matmul_id_swiglu given the
// twin are matmul_qx per product (then SwiGLU), bit for bit.
TEST_P(CudaMatmul, QuantizedXFromTheNorm) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t n_out = 96, k = 512, rows = 2;
    const std::vector<float> x = random_vec(static_cast<size_t>(rows * k), 41), r = random_vec(static_cast<size_t>(rows * k), 42),
                             nw = random_vec(static_cast<size_t>(k), 43);
    ASSERT_TRUE(cuda::qx_norm_ok(k));
    EXPECT_FALSE(cuda::qx_norm_ok(100));
    EXPECT_FALSE(cuda::qx_norm_ok(8192));
    const size_t qb = cuda::qx_bytes(k);
    DeviceBuffer<float> dx(x), dy(static_cast<size_t>(rows * k)), dy2(static_cast<size_t>(rows * k));
    const DeviceBuffer<float> dr(r), dnw(nw);
    DeviceBuffer<uint8_t> qx(rows * qb), qx2(rows * qb);
    cuda::rmsnorm(dx.get(), dnw.get(), dy2.get(), rows, k, 1e-6f, nullptr, qx2.get());
    const std::vector<float> y_plain = dy2.download();
    cuda::rmsnorm(dx.get(), dnw.get(), dy.get(), rows, k, 1e-6f);
    EXPECT_EQ(y_plain, dy.download()) << "rmsnorm's y changed by writing qx";
    const std::vector<uint8_t> q_plain = qx2.download();
    for (int64_t row = 0; row < rows; ++row)
        EXPECT_EQ(qx_mismatches(&y_plain[row * k], q_plain.data() + row * qb, k), 0) << "rmsnorm row " << row;
    cuda::add_rmsnorm(dx.get(), dr.get(), dnw.get(), dy.get(), rows, k, 1e-6f, nullptr, qx.get());
    const std::vector<float> y = dy.download();
    const std::vector<uint8_t> q = qx.download();
    // The twin of each row, as the host computes it.
    std::vector<float> xhat(static_cast<size_t>(rows * k)), xhat16(xhat.size());
    for (int64_t row = 0; row < rows; ++row)
        EXPECT_EQ(qx_mismatches(&y[row * k], q.data() + row * qb, k, &xhat[row * k], &xhat16[row * k]), 0)
            << "row " << row << ": quantized twin differs from the host's";
    const bool takes = cuda::qx_takes(t, k, n_out);
    const bool q8act = t == GgmlType::Q8_0 || t == GgmlType::Q4_0 || t == GgmlType::Q5_0;
    const std::string name = std::string("qx ") + ggml_type_name(t);
    const QuantMatrix a = make_weights(t, n_out, k, 44), b = make_weights(t, n_out, k, 45);
    const DeviceBuffer<uint8_t> da(a.bytes), db(b.bytes);
    const std::vector<float> canary(static_cast<size_t>(2 * n_out), 12345.0f);
    DeviceBuffer<float> ya(canary), yb(canary);
    const uint8_t* q1 = qx.get() + qb;  // the second row's twin
    const bool ran = cuda::matmul_qx(t, da.get(), n_out, k, q1, ya.get());
    EXPECT_EQ(ran, takes) << name;
    const bool int8_type = t == GgmlType::Q8_0 || t == GgmlType::Q4_0 || t == GgmlType::Q4_K || t == GgmlType::Q6_K ||
                           t == GgmlType::Q5_0 || t == GgmlType::Q5_K || t == GgmlType::Q3_K || t == GgmlType::Q2_K;
    const char* e = std::getenv("MOEMESH_CUDA_GEMV");
    const bool auto_mode = e == nullptr || (std::string(e) != "new" && std::string(e) != "old");
    if (auto_mode) {
        EXPECT_EQ(takes, int8_type) << name;
    }
    if (!ran) {
        EXPECT_EQ(ya.download(), canary) << name << ": declined but wrote";
        return;
    }
    cuda::matmul_qx(t, db.get(), n_out, k, q1, yb.get());
    const std::vector<float> x1(xhat.begin() + k, xhat.end()), x1h(xhat16.begin() + k, xhat16.end());
    std::vector<float> got_a = ya.download(), got_b = yb.download();
    got_a.resize(n_out), got_b.resize(n_out);
    expect_close(name + " vs x̂ · Wᵀ", got_a, ref_matmul(a.deq, n_out, k, q8act ? x1h : x1, 1), 2e-6);
    // ... and near the product with the unrounded row (the 8-bit rounding of X)
    const std::vector<float> y1(y.begin() + k, y.end());
    expect_close(name + " vs x · Wᵀ", got_a, ref_matmul(a.deq, n_out, k, y1, 1), 2e-2);
    // One launch for two products, and gate/up/SwiGLU over expert ids, from the same twin.
    DeviceBuffer<float> m0(canary), m1(canary);
    const void* ws[2] = {da.get(), db.get()};
    const int64_t outs[2] = {n_out, n_out};
    float* ys[2] = {m0.get(), m1.get()};
    ASSERT_TRUE(cuda::matmul_multi_gemv(t, 2, ws, outs, k, dy.get() + k, ys, nullptr, q1)) << name;
    std::vector<float> g0 = m0.download(), g1 = m1.download();
    g0.resize(n_out), g1.resize(n_out);
    EXPECT_EQ(g0, got_a) << name << " multi, product 0";
    EXPECT_EQ(g1, got_b) << name << " multi, product 1";
    std::vector<uint8_t> stacked = a.bytes;  // expert 0 = a, expert 1 = b
    stacked.insert(stacked.end(), b.bytes.begin(), b.bytes.end());
    const DeviceBuffer<uint8_t> dst(stacked);
    const DeviceBuffer<int32_t> ids(std::vector<int32_t>{1, 0});
    DeviceBuffer<float> sw(canary);
    ASSERT_TRUE(cuda::matmul_id_swiglu(t, dst.get(), dst.get(), a.bytes.size(), ids.get(), 2, n_out, k, dy.get() + k, 0,
                                       sw.get(), nullptr, q1))
        << name;
    DeviceBuffer<float> ga(got_a), gb(got_b), s0(static_cast<size_t>(n_out)), s1(static_cast<size_t>(n_out));
    cuda::swiglu(gb.get(), gb.get(), s0.get(), n_out);  // selection 0: expert 1 as gate and up
    cuda::swiglu(ga.get(), ga.get(), s1.get(), n_out);
    std::vector<float> want = s0.download();
    const std::vector<float> w1 = s1.download();
    want.insert(want.end(), w1.begin(), w1.end());
    EXPECT_EQ(sw.download(), want) << name << " swiglu";
}

const auto kCudaTypes = ::testing::Values(GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0,
                                          GgmlType::Q5_0, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,
                                          GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q4_1, GgmlType::Q5_1,
                                          GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4, GgmlType::IQ2_XXS,
                                          GgmlType::IQ2_XS, GgmlType::IQ2_S, GgmlType::IQ3_XXS, GgmlType::IQ3_S,
                                          GgmlType::IQ1_S, GgmlType::IQ1_M);
std::string type_param_name(const ::testing::TestParamInfo<GgmlType>& info) { return ggml_type_name(info.param); }

// The o projection with the residual add + norm in its last block (matmul_qx_add_rmsnorm): the bits
// of matmul_qx then add_rmsnorm (t, x, y and y's twin), with y's twin in its own buffer and over
// the input's twin (as the backend does); the counter left at 0; declined where matmul_qx declines.
TEST_P(CudaMatmul, QuantizedOProjectionWithAddRmsnormIsTheTwoCalls) {
    REQUIRE_CUDA();
    const GgmlType wt = GetParam();
    const int64_t k = 512;
    const std::vector<float> a = random_vec(static_cast<size_t>(k), 51), anw = random_vec(static_cast<size_t>(k), 52);
    DeviceBuffer<float> da(a), dan(static_cast<size_t>(k));
    const DeviceBuffer<float> danw(anw);
    DeviceBuffer<unsigned> ctr(std::vector<unsigned>{0u});
    for (const int64_t n : {int64_t{256}, int64_t{768}}) {
        const std::string name = std::string("o + add_rmsnorm ") + ggml_type_name(wt) + " n=" + std::to_string(n);
        const size_t cap = std::max(cuda::qx_bytes(k), cuda::qx_bytes(n));
        DeviceBuffer<uint8_t> qa(cap);  // a's twin, as attention leaves it
        cuda::rmsnorm(da.get(), danw.get(), dan.get(), 1, k, 1e-6f, nullptr, qa.get());
        const std::vector<uint8_t> qa_host = qa.download();
        const QuantMatrix w = make_weights(wt, n, k, 53);
        const DeviceBuffer<uint8_t> dw(w.bytes);
        const std::vector<float> x = random_vec(static_cast<size_t>(n), 54),
                                 nw = random_vec(static_cast<size_t>(n), 55);
        const DeviceBuffer<float> dnw(nw);
        // The two calls.
        DeviceBuffer<float> t1(static_cast<size_t>(n)), x1(x), y1(static_cast<size_t>(n));
        DeviceBuffer<uint8_t> qy1(cuda::qx_bytes(n));
        const bool takes = cuda::matmul_qx(wt, dw.get(), n, k, qa.get(), t1.get());
        const std::vector<float> canary(static_cast<size_t>(n), 12345.0f);
        if (!takes) {
            DeviceBuffer<float> t2(canary), x2(x), y2(canary);
            EXPECT_FALSE(cuda::matmul_qx_add_rmsnorm(wt, dw.get(), n, k, qa.get(), t2.get(), x2.get(), dnw.get(),
                                                     y2.get(), 1e-6f, nullptr, ctr.get()))
                << name;
            EXPECT_EQ(t2.download(), canary) << name << ": declined but wrote";
            EXPECT_EQ(x2.download(), x) << name << ": declined but wrote";
            continue;
        }
        cuda::add_rmsnorm(x1.get(), t1.get(), dnw.get(), y1.get(), 1, n, 1e-6f, nullptr, qy1.get());
        const std::vector<float> want_t = t1.download(), want_x = x1.download(), want_y = y1.download();
        const std::vector<uint8_t> want_q = qy1.download();
        for (const bool in_place : {false, true}) {
            DeviceBuffer<uint8_t> qin(qa_host), qy(cuda::qx_bytes(n));
            DeviceBuffer<float> t2(canary), x2(x), y2(canary);
            uint8_t* qout = in_place ? qin.get() : qy.get();
            ASSERT_TRUE(cuda::matmul_qx_add_rmsnorm(wt, dw.get(), n, k, qin.get(), t2.get(), x2.get(), dnw.get(),
                                                    y2.get(), 1e-6f, qout, ctr.get()))
                << name;
            const std::string what = name + (in_place ? ", twin over the input's" : "");
            EXPECT_EQ(t2.download(), want_t) << what << ": t";
            EXPECT_EQ(x2.download(), want_x) << what << ": x";
            EXPECT_EQ(y2.download(), want_y) << what << ": y";
            std::vector<uint8_t> got_q = (in_place ? qin : qy).download();
            got_q.resize(want_q.size());
            EXPECT_EQ(got_q, want_q) << what << ": y's twin";
            EXPECT_EQ(ctr.download(), std::vector<unsigned>{0u}) << what << ": counter not left at 0";
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Types, CudaMatmul, kCudaTypes, type_param_name);

// ---- dequantization: the tiled matmul's W loader, bit for bit against the CPU dequantizer ----

// Byte offsets of the f16 scale fields in one block of t (none for F32 / F16 / BF16).
std::vector<size_t> f16_fields(GgmlType t) {
    switch (t) {
        case GgmlType::Q8_0:
        case GgmlType::Q4_0:
        case GgmlType::Q5_0:
        case GgmlType::IQ4_NL:
        case GgmlType::IQ4_XS: return {0};
        case GgmlType::Q4_1:
        case GgmlType::Q5_1: return {0, 2};
        case GgmlType::Q4_K:
        case GgmlType::Q5_K: return {0, 2};
        case GgmlType::Q2_K: return {80, 82};
        case GgmlType::Q3_K: return {108};
        case GgmlType::Q6_K: return {208};
        default: return {};
    }
}

// Rows of uniformly random blocks (every bit pattern of quants, high bits, packed scales and mins),
// with each f16 scale replaced by a finite value of either sign. Float types: quantized normals.
std::vector<uint8_t> random_blocks(GgmlType t, int64_t rows, int64_t k, uint32_t seed) {
    if (t == GgmlType::MXFP4) {  // random codes; E8M0 scales 2^-10 .. 2^5 and the two subnormal ones
        std::mt19937 rng(seed);
        std::vector<uint8_t> b(ggml_row_bytes(t, k) * rows);
        for (auto& x : b) x = static_cast<uint8_t>(rng());
        for (size_t off = 0; off < b.size(); off += sizeof(quants::BlockMXFP4))
            b[off] = static_cast<uint8_t>(rng() % 8 == 0 ? rng() % 2 : 117 + rng() % 16);
        return b;
    }
    if (f16_fields(t).empty()) return make_weights(t, rows, k, seed).bytes;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(-0.1f, 0.1f);
    std::vector<uint8_t> b(ggml_row_bytes(t, k) * rows);
    for (auto& x : b) x = static_cast<uint8_t>(byte(rng));
    const size_t bs = ggml_type_info(t).type_size;
    for (size_t blk = 0; blk < b.size() / bs; ++blk)
        for (const size_t off : f16_fields(t)) {
            const uint16_t h = fp32_to_fp16(scale(rng));
            std::memcpy(&b[blk * bs + off], &h, sizeof(h));
        }
    return b;
}

class CudaDequant : public ::testing::TestWithParam<GgmlType> {};

TEST_P(CudaDequant, BitExactWithCpu) {
    REQUIRE_CUDA();
    const GgmlType t = GetParam();
    const int64_t rows = 37, k = 768;
    const size_t rb = ggml_row_bytes(t, k);
    for (const bool random_bits : {false, true}) {
        const std::vector<uint8_t> bytes = random_bits ? random_blocks(t, rows, k, 60) : make_weights(t, rows, k, 61).bytes;
        std::vector<float> want(static_cast<size_t>(rows * k));
        for (int64_t r = 0; r < rows; ++r) dequantize_row(t, &bytes[r * rb], &want[r * k], k);
        const DeviceBuffer<uint8_t> dw(bytes);
        DeviceBuffer<float> dy(want.size());
        cuda::dequantize_rows(t, dw.get(), rows, k, dy.get());
        const std::vector<float> got = dy.download();
        int64_t bad = 0, first = -1;
        for (size_t i = 0; i < want.size(); ++i)
            if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && bad++ == 0) first = static_cast<int64_t>(i);
        const std::string what = std::string("dequantize_rows ") + ggml_type_name(t) +
                                 (random_bits ? " random blocks" : " quantized normals");
        std::printf("[cuda] %-44s %lld of %zu elements differ from the CPU  %s\n", what.c_str(),
                    static_cast<long long>(bad), want.size(), bad == 0 ? "ok" : "FAIL");
        EXPECT_EQ(bad, 0) << what << ": first at row " << first / k << " element " << first % k << " (GPU "
                          << (first >= 0 ? got[first] : 0.0f) << ", CPU " << (first >= 0 ? want[first] : 0.0f) << ")";
    }
}

INSTANTIATE_TEST_SUITE_P(Types, CudaDequant, kCudaTypes, type_param_name);

// ---- elementwise / norms ----

// The residual add fused into the next norm: the bits of add_inplace then rmsnorm (x and y).
TEST(CudaOps, AddRmsnormIsAddThenRmsnorm) {
    REQUIRE_CUDA();
    for (const int64_t rows : {int64_t{1}, int64_t{3}})
        for (const int64_t n : {int64_t{2048}, int64_t{100}, int64_t{5000}}) {
            const std::vector<float> x = random_vec(static_cast<size_t>(rows * n), 31),
                                     t = random_vec(static_cast<size_t>(rows * n), 32),
                                     w = random_vec(static_cast<size_t>(n), 33);
            DeviceBuffer<float> x1(x), x2(x), y1(static_cast<size_t>(rows * n)), y2(static_cast<size_t>(rows * n));
            const DeviceBuffer<float> dt(t), dw(w);
            cuda::add_inplace(x1.get(), dt.get(), rows * n);
            cuda::rmsnorm(x1.get(), dw.get(), y1.get(), rows, n, 1e-6f);
            cuda::add_rmsnorm(x2.get(), dt.get(), dw.get(), y2.get(), rows, n, 1e-6f);
            const std::string what = "add_rmsnorm rows=" + std::to_string(rows) + " n=" + std::to_string(n);
            EXPECT_EQ(x2.download(), x1.download()) << what << ": x";
            EXPECT_EQ(y2.download(), y1.download()) << what << ": y";
        }
}

// Rows kept in registers (n <= 4096) and rows too wide for them (5000), in place too (y == x).
TEST(CudaOps, RmsNorm) {
    REQUIRE_CUDA();
    const int64_t rows = 5;
    for (const int64_t n : {int64_t{2048}, int64_t{100}, int64_t{4096}, int64_t{5000}}) {
        const std::vector<float> x = random_vec(rows * n, 1, 3.0f), w = random_vec(n, 2);
        const DeviceBuffer<float> dx(x), dw(w);
        DeviceBuffer<float> dy(rows * n), dxy(x);
        cuda::rmsnorm(dx.get(), dw.get(), dy.get(), rows, n, 1e-6f);
        cuda::rmsnorm(dxy.get(), dw.get(), dxy.get(), rows, n, 1e-6f);
        std::vector<float> want(rows * n);
        rmsnorm(x.data(), w.data(), want.data(), rows, n, 1e-6f);
        const std::string what = "rmsnorm n=" + std::to_string(n);
        expect_close(what, dy.download(), want, 1e-6);
        EXPECT_EQ(dxy.download(), dy.download()) << what << " in place";
    }
}

TEST(CudaOps, RmsNormGatedAndL2Norm) {
    REQUIRE_CUDA();
    const int64_t rows = 6, n = 128;
    const float eps = 1e-6f;
    const std::vector<float> x = random_vec(rows * n, 3), w = random_vec(n, 4), z = random_vec(rows * n, 5);
    const DeviceBuffer<float> dx(x), dw(w), dz(z);
    DeviceBuffer<float> dy(rows * n);
    cuda::rmsnorm_gated(dx.get(), dw.get(), dz.get(), dy.get(), rows, n, eps);
    std::vector<float> want(rows * n), want_l2(x);
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[r * n + i]) * x[r * n + i];
        const double inv = 1.0 / std::sqrt(ss / n + eps);
        for (int64_t i = 0; i < n; ++i) {
            const double zz = z[r * n + i];
            want[r * n + i] = static_cast<float>(x[r * n + i] * inv * w[i] * zz / (1.0 + std::exp(-zz)));
            want_l2[r * n + i] = static_cast<float>(x[r * n + i] / std::max(std::sqrt(ss), 1e-6));
        }
    }
    expect_close("rmsnorm_gated", dy.download(), want, 1e-6);
    DeviceBuffer<float> dl2(x);
    cuda::l2norm_rows(dl2.get(), rows, n, 1e-6f);
    expect_close("l2norm_rows", dl2.download(), want_l2, 1e-6);
}

TEST(CudaOps, SwigluAddSoftmax) {
    REQUIRE_CUDA();
    const int64_t n = 3000;
    const std::vector<float> g = random_vec(n, 6, 2.0f), u = random_vec(n, 7);
    const DeviceBuffer<float> dg(g), du(u);
    DeviceBuffer<float> dy(n);
    cuda::swiglu(dg.get(), du.get(), dy.get(), n);
    std::vector<float> want(n);
    swiglu(g.data(), u.data(), want.data(), n);
    expect_close("swiglu", dy.download(), want, 1e-6);

    cuda::add_inplace(dy.get(), du.get(), n);
    for (int64_t i = 0; i < n; ++i) want[i] += u[i];
    expect_close("add_inplace", dy.download(), want, 1e-7);

    const int64_t rows = 3, e = 1000;
    std::vector<float> s = random_vec(rows * e, 8, 4.0f);
    DeviceBuffer<float> ds(s);
    cuda::softmax_rows(ds.get(), rows, e);
    for (int64_t r = 0; r < rows; ++r) softmax_inplace(&s[r * e], e);
    expect_close("softmax_rows", ds.download(), s, 1e-6);
}

TEST(CudaOps, RopeNeox) {
    REQUIRE_CUDA();
    const int64_t tokens = 4, heads = 6, head_dim = 128;
    const std::vector<int32_t> pos = {0, 17, 1023, 5000};
    for (const int64_t rot_dim : {head_dim, int64_t{64}}) {
        // Plain, then YaRN x4 (ramp inside the rotary pairs) and linear x2.
        for (const RopeParams& p : {RopeParams{1e6f}, make_rope_params(rot_dim, 1e6f, "yarn", 4.0f, 1.0f, 256),
                                    make_rope_params(rot_dim, 1e6f, "linear", 2.0f, 1.0f, 4096)}) {
            std::vector<float> x = random_vec(tokens * heads * head_dim, 9);
            DeviceBuffer<float> dx(x);
            const DeviceBuffer<int32_t> dpos(pos);
            cuda::rope_neox(dx.get(), tokens, heads, head_dim, rot_dim, dpos.get(), p);
            rope_neox(x.data(), tokens, heads, head_dim, rot_dim, pos.data(), p);
            expect_close("rope_neox rot_dim=" + std::to_string(rot_dim) + " freq_scale=" + std::to_string(p.freq_scale) +
                             " ext=" + std::to_string(p.ext_factor),
                         dx.download(), x, 1e-6);
        }
    }
}

// The fused rope + KV store of a decode/prompt step: the bits of rope_neox on q and k and the two
// stores, with RoPE on part of each head (Qwen3-Next) and p0 from the host or the device.
TEST(CudaOps, RopeStoreKvIsRopeThenStores) {
    REQUIRE_CUDA();
    const int64_t Nh = 6, Nkv = 2, D = 128, ctx = 64;
    const RopeParams rp = make_rope_params(64, 1e6f, "yarn", 4.0f, 1.0f, 256);
    for (const int64_t T : {int64_t{1}, int64_t{3}})
        for (const int64_t rot : {D, int64_t{64}})
            for (const bool f16 : {true, false})
                for (const bool dev_p0 : {false, true}) {
                    const int32_t p0 = 37;
                    const size_t es = f16 ? 2 : 4, cache_bytes = static_cast<size_t>(ctx * Nkv * D) * es;
                    const std::vector<float> q = random_vec(static_cast<size_t>(T * Nh * D), 21),
                                             k = random_vec(static_cast<size_t>(T * Nkv * D), 22),
                                             v = random_vec(static_cast<size_t>(T * Nkv * D), 23);
                    // Reference: the separate kernels.
                    DeviceBuffer<float> q1(q), k1(k), v1(v);
                    DeviceBuffer<uint8_t> kc1(std::vector<uint8_t>(cache_bytes, 0x5a)),
                        vc1(std::vector<uint8_t>(cache_bytes, 0x5a));
                    std::vector<int32_t> pos(static_cast<size_t>(T));
                    for (int64_t t = 0; t < T; ++t) pos[static_cast<size_t>(t)] = p0 + static_cast<int32_t>(t);
                    const DeviceBuffer<int32_t> dpos(pos);
                    cuda::rope_neox(q1.get(), T, Nh, D, rot, dpos.get(), rp);
                    cuda::rope_neox(k1.get(), T, Nkv, D, rot, dpos.get(), rp);
                    const int64_t n = T * Nkv * D, off = static_cast<int64_t>(p0) * Nkv * D;
                    if (f16) {
                        cuda::f32_to_f16(k1.get(), reinterpret_cast<uint16_t*>(kc1.get()) + off, n);
                        cuda::f32_to_f16(v1.get(), reinterpret_cast<uint16_t*>(vc1.get()) + off, n);
                    } else {
                        CUDA_CHECK(cudaMemcpy(reinterpret_cast<float*>(kc1.get()) + off, k1.get(), 4 * n,
                                              cudaMemcpyDeviceToDevice));
                        CUDA_CHECK(cudaMemcpy(reinterpret_cast<float*>(vc1.get()) + off, v1.get(), 4 * n,
                                              cudaMemcpyDeviceToDevice));
                    }
                    // Fused.
                    DeviceBuffer<float> q2(q), k2(k), v2(v);
                    DeviceBuffer<uint8_t> kc2(std::vector<uint8_t>(cache_bytes, 0x5a)),
                        vc2(std::vector<uint8_t>(cache_bytes, 0x5a));
                    const DeviceBuffer<int32_t> dp0(std::vector<int32_t>{p0});
                    cuda::rope_store_kv(q2.get(), k2.get(), v2.get(), T, Nh, Nkv, D, rot, dev_p0 ? -1 : p0,
                                        dev_p0 ? dp0.get() : nullptr, rp, kc2.get(), vc2.get(), f16);
                    const std::string what = "rope_store_kv T=" + std::to_string(T) + " rot=" + std::to_string(rot) +
                                             (f16 ? " f16" : " f32") + (dev_p0 ? " p0 on the device" : "");
                    EXPECT_EQ(q2.download(), q1.download()) << what << ": q";
                    EXPECT_EQ(k2.download(), k1.download()) << what << ": k";
                    EXPECT_EQ(kc2.download(), kc1.download()) << what << ": k cache";
                    EXPECT_EQ(vc2.download(), vc1.download()) << what << ": v cache";
                }
}

// The per-head q/k norms folded into rope_store_kv: the bits of two rmsnorm launches and rope_store_kv.
TEST(CudaOps, NormRopeStoreKvIsNormsThenRopeStoreKv) {
    REQUIRE_CUDA();
    const int64_t Nh = 6, Nkv = 2, ctx = 64;
    const RopeParams rp = make_rope_params(64, 1e6f, "yarn", 4.0f, 1.0f, 256);
    for (const int64_t D : {int64_t{128}, int64_t{256}})
        for (const int64_t T : {int64_t{1}, int64_t{3}})
            for (const int64_t rot : {D, int64_t{64}})
                for (const bool f16 : {true, false})
                    for (const bool dev_p0 : {false, true}) {
                        const int32_t p0 = 41;
                        const size_t es = f16 ? 2 : 4, cache_bytes = static_cast<size_t>(ctx * Nkv * D) * es;
                        const std::vector<float> q = random_vec(static_cast<size_t>(T * Nh * D), 24, 3.0f),
                                                 k = random_vec(static_cast<size_t>(T * Nkv * D), 25, 3.0f),
                                                 v = random_vec(static_cast<size_t>(T * Nkv * D), 26),
                                                 qw = random_vec(static_cast<size_t>(D), 27),
                                                 kw = random_vec(static_cast<size_t>(D), 28);
                        const DeviceBuffer<float> dqw(qw), dkw(kw);
                        const DeviceBuffer<int32_t> dp0(std::vector<int32_t>{p0});
                        DeviceBuffer<float> q1(q), k1(k), v1(v), q2(q), k2(k), v2(v);
                        DeviceBuffer<uint8_t> kc1(std::vector<uint8_t>(cache_bytes, 0x5a)),
                            vc1(std::vector<uint8_t>(cache_bytes, 0x5a)),
                            kc2(std::vector<uint8_t>(cache_bytes, 0x5a)), vc2(std::vector<uint8_t>(cache_bytes, 0x5a));
                        cuda::rmsnorm(q1.get(), dqw.get(), q1.get(), T * Nh, D, 1e-6f);
                        cuda::rmsnorm(k1.get(), dkw.get(), k1.get(), T * Nkv, D, 1e-6f);
                        cuda::rope_store_kv(q1.get(), k1.get(), v1.get(), T, Nh, Nkv, D, rot, p0, nullptr, rp,
                                            kc1.get(), vc1.get(), f16);
                        ASSERT_TRUE(cuda::norm_rope_store_kv(q2.get(), k2.get(), v2.get(), dqw.get(), dkw.get(), 1e-6f,
                                                             T, Nh, Nkv, D, rot, dev_p0 ? -1 : p0,
                                                             dev_p0 ? dp0.get() : nullptr, rp, kc2.get(), vc2.get(),
                                                             f16));
                        const std::string what = "norm_rope_store_kv D=" + std::to_string(D) +
                                                 " T=" + std::to_string(T) + " rot=" + std::to_string(rot) +
                                                 (f16 ? " f16" : " f32") + (dev_p0 ? " p0 on the device" : "");
                        EXPECT_EQ(q2.download(), q1.download()) << what << ": q";
                        EXPECT_EQ(k2.download(), k1.download()) << what << ": k";
                        EXPECT_EQ(kc2.download(), kc1.download()) << what << ": k cache";
                        EXPECT_EQ(vc2.download(), vc1.download()) << what << ": v cache";
                    }
    const DeviceBuffer<float> x(std::vector<float>(96 * 4)), w(std::vector<float>(96));
    EXPECT_FALSE(cuda::norm_rope_store_kv(x.get(), x.get(), x.get(), w.get(), w.get(), 1e-6f, 1, 1, 1, 96 + 8, 64, 0,
                                          nullptr, rp, nullptr, nullptr, false))
        << "head_dim 104 is no multiple of 32: declined";
}

// ---- router ----

// coordinator/models/qwen3moe.cpp route(), for one token.
void route_ref(std::vector<float>& p, int64_t K, bool norm, std::vector<int32_t>* ids, std::vector<float>* w) {
    const int64_t E = static_cast<int64_t>(p.size());
    softmax_inplace(p.data(), E);
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    double sum = 0.0;
    for (int64_t j = 0; j < K; ++j) sum += p[order[j]];
    const float s = norm ? std::max(static_cast<float>(sum), 6.103515625e-5f) : 1.0f;
    for (int64_t j = 0; j < K; ++j) {
        ids->push_back(order[j]);
        w->push_back(norm ? p[order[j]] / s : p[order[j]]);
    }
}

// E = 128 (qwen3moe), 512 (qwen3next), a count that is no multiple of 32, and the largest taken.
TEST(CudaOps, SoftmaxTopk) {
    REQUIRE_CUDA();
    const int64_t T = 7;
    for (const auto& [E, K] : std::vector<std::pair<int64_t, int64_t>>{{128, 8}, {512, 10}, {60, 4}, {1024, 32}}) {
        for (const bool ties : {false, true}) {
            for (const bool norm : {true, false}) {
                std::vector<float> logits = random_vec(T * E, 10, 2.0f);
                if (ties)  // few distinct values: the order among equals must be by expert id
                    for (auto& v : logits) v = std::round(v);
                DeviceBuffer<float> dl(logits);
                DeviceBuffer<int32_t> dids(T * K);
                DeviceBuffer<float> dw(T * K);
                cuda::softmax_topk(dl.get(), T, E, K, norm, dids.get(), dw.get());
                std::vector<int32_t> want_ids;
                std::vector<float> want_w, probs;
                for (int64_t t = 0; t < T; ++t) {
                    std::vector<float> p(logits.begin() + t * E, logits.begin() + (t + 1) * E);
                    route_ref(p, K, norm, &want_ids, &want_w);
                    probs.insert(probs.end(), p.begin(), p.end());
                }
                const std::string name = "softmax_topk E=" + std::to_string(E) + " K=" + std::to_string(K) +
                                         (ties ? " ties" : "") + (norm ? " norm" : "");
                EXPECT_EQ(dids.download(), want_ids) << name;
                expect_close(name + " weights", dw.download(), want_w, 1e-6);
                expect_close(name + " probs", dl.download(), probs, 1e-6);
            }
        }
    }
}

// The scalar loop greedy sampling is defined by (sampler.h argmax()).
int32_t scalar_argmax(const float* x, int64_t n) {
    int32_t best = 0;
    for (int64_t i = 1; i < n; ++i)
        if (x[i] > x[best]) best = static_cast<int32_t>(i);
    return best;
}

TEST(CudaOps, ArgmaxRows) {
    REQUIRE_CUDA();
    const float nan = std::nanf(""), inf = INFINITY;
    DeviceBuffer<uint8_t> ws(cuda::argmax_workspace_bytes(6, 151936));  // one for every call
    int checked = 0;
    for (const int64_t n : {int64_t{1}, int64_t{5}, int64_t{4096}, int64_t{4097}, int64_t{8195}, int64_t{151936}}) {
        for (int variant = 0; variant < 4; ++variant) {
            const int64_t rows = variant == 3 ? 6 : 3;
            std::vector<float> x = random_vec(static_cast<size_t>(rows * n), static_cast<uint32_t>(n + variant), 3.0f);
            if (variant == 1)  // few distinct values: the lowest index among the equal maxima
                for (auto& v : x) v = std::round(v);
            if (variant == 2) {  // equal maxima in different blocks; NaN; -inf; a NaN at 0
                float* r0 = x.data();
                r0[n - 1] = 100.0f;
                if (n > 4200) r0[4200] = 100.0f;
                float* r1 = x.data() + n;
                for (int64_t i = 0; i < n; i += 7) r1[i] = nan;  // at 0 too: nothing beats it
                float* r2 = x.data() + 2 * n;
                for (int64_t i = 0; i < n; ++i) r2[i] = -inf;
                if (n > 3) r2[n / 2] = nan;
            }
            if (variant == 3) {  // NaN everywhere but 0 and one value; ±0 maxima
                float* r0 = x.data();
                for (int64_t i = 1; i < n; ++i) r0[i] = nan;
                r0[n - 1] = n > 1 ? -5.0f : r0[n - 1];
                float* r1 = x.data() + n;
                for (int64_t i = 0; i < n; ++i) r1[i] = i % 3 == 0 ? -1.0f : (i % 2 ? 0.0f : -0.0f);
            }
            DeviceBuffer<float> dx(x);
            DeviceBuffer<int32_t> ids(static_cast<size_t>(rows));
            cuda::argmax_rows(dx.get(), rows, n, ids.get(), ws.get());
            const std::vector<int32_t> got = ids.download();
            for (int64_t r = 0; r < rows; ++r) {
                EXPECT_EQ(got[r], scalar_argmax(x.data() + r * n, n))
                    << "n=" << n << " variant " << variant << " row " << r;
                ++checked;
            }
        }
    }
    std::printf("[cuda] argmax_rows: %d rows equal the scalar loop\n", checked);
}

// The k largest of each row (top_k_rows: sampling's candidates) against top_k_ids' order (larger
// first, the lower index on ties) from a partial sort here: values and ids, k 1–64, ties across
// blocks, -inf, rows past 4096 elements; NaN never taken (the rest -1 when fewer than k can be).
TEST(CudaOps, TopKRows) {
    REQUIRE_CUDA();
    auto want_top = [](const float* x, int64_t n, int64_t k) {
        std::vector<int32_t> ids(static_cast<size_t>(n));
        std::iota(ids.begin(), ids.end(), 0);
        std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                          [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
        ids.resize(static_cast<size_t>(k));
        return ids;
    };
    int checked = 0;
    for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{
             {151936, 40}, {151936, 64}, {5000, 1}, {4096, 10}, {37, 37}, {8195, 64}}) {
        for (int variant = 0; variant < 3; ++variant) {
            const int64_t rows = 2;
            std::vector<float> x = random_vec(static_cast<size_t>(rows * n), static_cast<uint32_t>(n + k + variant), 3.0f);
            if (variant == 1)  // many ties, across blocks
                for (auto& v : x) v = std::round(v);
            if (variant == 2)  // -inf entries, and equal maxima far apart
                for (int64_t i = 0; i < rows * n; i += 3) x[i] = -INFINITY;
            DeviceBuffer<float> dx(x), vals(static_cast<size_t>(rows * k));
            DeviceBuffer<int32_t> ids(static_cast<size_t>(rows * k));
            DeviceBuffer<uint8_t> ws(cuda::top_k_workspace_bytes(rows, n, k));
            cuda::top_k_rows(dx.get(), rows, n, k, ids.get(), vals.get(), ws.get());
            const std::vector<int32_t> got = ids.download();
            const std::vector<float> got_v = vals.download();
            for (int64_t r = 0; r < rows; ++r) {
                const std::vector<int32_t> want = want_top(x.data() + r * n, n, k);
                const std::vector<int32_t> row(got.begin() + r * k, got.begin() + (r + 1) * k);
                EXPECT_EQ(row, want) << "n=" << n << " k=" << k << " variant " << variant << " row " << r;
                for (int64_t j = 0; j < k; ++j) {
                    if (row[j] == want[j]) {
                        EXPECT_EQ(got_v[r * k + j], x[r * n + want[j]]);
                    }
                }
                ++checked;
            }
        }
    }
    // NaN: never taken; with 3 takeable values of 5, k = 4 gives them, then -1.
    const std::vector<float> x = {std::nanf(""), 2.0f, std::nanf(""), -1.0f, 2.0f};
    DeviceBuffer<float> dx(x), vals(4);
    DeviceBuffer<int32_t> ids(4);
    DeviceBuffer<uint8_t> ws(cuda::top_k_workspace_bytes(1, 5, 4));
    cuda::top_k_rows(dx.get(), 1, 5, 4, ids.get(), vals.get(), ws.get());
    EXPECT_EQ(ids.download(), (std::vector<int32_t>{1, 4, 3, -1}));
    std::printf("[cuda] top_k_rows: %d rows equal a partial sort\n", checked);
}

// The router in one launch (matmul_route): matmul then softmax_topk, bit for bit, for the router's
// weight types; the block counter left at 0 for the next launch; other types declined.
TEST(CudaOps, MatmulRouteIsMatmulThenSoftmaxTopk) {
    REQUIRE_CUDA();
    DeviceBuffer<unsigned> ctr(std::vector<unsigned>{0u});
    int checked = 0;
    for (const GgmlType wt : {GgmlType::F32, GgmlType::F16, GgmlType::BF16}) {
        for (const auto& [E, K, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
                 {128, 8, 2048}, {60, 4, 256}, {512, 10, 512}, {1024, 32, 64}, {3, 1, 8}}) {
            for (const bool norm : {true, false}) {
                const std::vector<float> wf =
                    random_vec(static_cast<size_t>(E * k), static_cast<uint32_t>(E + k), 0.05f);
                const std::vector<float> x = random_vec(static_cast<size_t>(k), 77);
                std::vector<uint8_t> wb(static_cast<size_t>(E * k) * (wt == GgmlType::F32 ? 4 : 2));
                for (size_t i = 0; i < wf.size(); ++i) {
                    if (wt == GgmlType::F32) {
                        std::memcpy(&wb[4 * i], &wf[i], 4);
                    } else {
                        const uint16_t h = wt == GgmlType::F16 ? fp32_to_fp16(wf[i]) : fp32_to_bf16(wf[i]);
                        std::memcpy(&wb[2 * i], &h, 2);
                    }
                }
                const DeviceBuffer<uint8_t> dw(wb);
                const DeviceBuffer<float> dx(x);
                DeviceBuffer<float> logits(E), probs(std::vector<float>(E, std::nanf("")));
                DeviceBuffer<int32_t> ids1(K), ids2(K);
                DeviceBuffer<float> w1(K), w2(K);
                cuda::matmul(wt, dw.get(), E, k, dx.get(), 1, logits.get());
                cuda::softmax_topk(logits.get(), 1, E, K, norm, ids1.get(), w1.get());
                for (int rep = 0; rep < 2; ++rep) {
                    ASSERT_TRUE(cuda::matmul_route(wt, dw.get(), E, k, dx.get(), K, norm, probs.get(), ids2.get(),
                                                   w2.get(), ctr.get()));
                    const std::string what = std::string(ggml_type_name(wt)) + " E=" + std::to_string(E) + " K=" +
                                             std::to_string(K) + " k=" + std::to_string(k) + (norm ? " norm" : "") +
                                             " run " + std::to_string(rep);
                    EXPECT_EQ(ids2.download(), ids1.download()) << what;
                    EXPECT_EQ(w2.download(), w1.download()) << what;
                    EXPECT_EQ(probs.download(), logits.download()) << what << ": probs";
                    EXPECT_EQ(ctr.download(), std::vector<unsigned>{0u}) << what << ": counter not left at 0";
                    ++checked;
                }
            }
        }
    }
    // Other types: declined, nothing launched.
    EXPECT_FALSE(cuda::matmul_route(GgmlType::Q8_0, nullptr, 128, 256, nullptr, 8, true, nullptr, nullptr, nullptr,
                                    ctr.get()));
    std::printf("[cuda] matmul_route: %d runs equal matmul + softmax_topk\n", checked);
}

// ---- attention ----

// Random attention inputs: q [T, n_head, head_dim] (σ 0.3) and a KV cache of n_ctx positions in f32
// and f16, on the host and the device; gpu() / cpu() give the GPU and CPU ops' arguments.
struct AttnInputs {
    int64_t T, n_head, n_head_kv, head_dim;
    std::vector<float> kf, vf, q;
    std::vector<uint16_t> k16, v16;
    std::unique_ptr<DeviceBuffer<float>> dq, dkf, dvf;
    std::unique_ptr<DeviceBuffer<uint16_t>> dk16, dv16;
    AttnInputs(int64_t n_ctx, int64_t t, int64_t h, int64_t h_kv, int64_t hd, uint32_t seed)
        : T(t), n_head(h), n_head_kv(h_kv), head_dim(hd) {
        const int64_t kv_n = n_ctx * n_head_kv * head_dim;
        kf = random_vec(kv_n, seed), vf = random_vec(kv_n, seed + 1);
        q = random_vec(T * n_head * head_dim, seed + 2, 0.3f);
        k16.resize(kv_n), v16.resize(kv_n);
        for (int64_t i = 0; i < kv_n; ++i) k16[i] = fp32_to_fp16(kf[i]), v16[i] = fp32_to_fp16(vf[i]);
        dq = std::make_unique<DeviceBuffer<float>>(q);
        dkf = std::make_unique<DeviceBuffer<float>>(kf), dvf = std::make_unique<DeviceBuffer<float>>(vf);
        dk16 = std::make_unique<DeviceBuffer<uint16_t>>(k16), dv16 = std::make_unique<DeviceBuffer<uint16_t>>(v16);
    }
    float scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }
    cuda::AttentionArgs gpu(bool f16, int64_t n_past, float* out) const {
        return {dq->get(), f16 ? static_cast<const void*>(dk16->get()) : dkf->get(),
                f16 ? static_cast<const void*>(dv16->get()) : dvf->get(), out, T, n_past, n_head, n_head_kv,
                head_dim, f16, scale()};
    }
    AttentionArgs cpu(bool f16, int64_t n_past, float* out) const {
        return {q.data(), f16 ? static_cast<const void*>(k16.data()) : kf.data(),
                f16 ? static_cast<const void*>(v16.data()) : vf.data(), out, T, n_past, n_head, n_head_kv,
                head_dim, f16, scale()};
    }
};

// Prompts of 64+ tokens through cuBLAS (attention.cu attention_blas: S = scale·QKᵀ per KV head,
// masked softmax, O = PV, in passes of query rows × heads within MOEMESH_CUDA_BLAS_CHUNK_MIB): the
// CPU's result (f16 cache: q and the weights rounded to f16 on both sides) with one pass, with a
// pass per head, with two row passes per head; 63 tokens and MOEMESH_CUDA_ATTN_BLAS=0 keep the
// split kernel (no cuBLAS call counted, the same result within its tolerance).
TEST(CudaOps, PromptAttentionThroughCublas) {
    REQUIRE_CUDA();
    std::string why;
    if (!cuda::blas_ready(&why)) GTEST_SKIP() << "cuBLAS does not load: " << why;
    ThreadPool pool(2);
    const int64_t n_head = 8, n_head_kv = 2, head_dim = 128, n_ctx = 1600;
    ASSERT_EQ(setenv("MOEMESH_CUDA_BLAS_CHUNK_MIB", "1", 1), 0);
    struct Case {
        int64_t n_tokens, n_past;
        const char* attn_blas;  // MOEMESH_CUDA_ATTN_BLAS
        bool blas;              // cuBLAS expected
    };
    for (const bool f16 : {true, false}) {
        // 1 MiB of f32 scores: 70 queries × 70 keys: one pass per KV head (its 4 heads); 1500 keys
        // (174 rows of 6000 B per MiB): 100 queries, a pass per head; 200, two row passes per head.
        for (const Case c : {Case{70, 0, nullptr, true}, Case{100, 1400, nullptr, true},
                             Case{200, 1300, nullptr, true}, Case{63, 100, nullptr, false},
                             Case{70, 30, "0", false}}) {
            const AttnInputs in(n_ctx, c.n_tokens, n_head, n_head_kv, head_dim, 70);
            DeviceBuffer<float> dout(in.q.size());
            const cuda::AttentionArgs ga = in.gpu(f16, c.n_past, dout.get());
            DeviceBuffer<uint8_t> ws(cuda::attention_workspace_bytes(ga));
            if (c.attn_blas) {
                ASSERT_EQ(setenv("MOEMESH_CUDA_ATTN_BLAS", c.attn_blas, 1), 0);
            }
            const uint64_t calls = cuda::attention_blas_calls();
            cuda::attention(ga, ws.get());
            const std::vector<float> got = dout.download();
            unsetenv("MOEMESH_CUDA_ATTN_BLAS");
            const std::string what = std::string("prompt attention ") + (f16 ? "f16" : "f32") + " T=" +
                                     std::to_string(c.n_tokens) + " n_past=" + std::to_string(c.n_past) +
                                     (c.blas ? " cublas" : " split kernel");
            EXPECT_EQ(cuda::attention_blas_calls() - calls, c.blas ? 1u : 0u) << what;
            std::vector<float> want(in.q.size());
            attention(pool, in.cpu(f16, c.n_past, want.data()));
            // cuBLAS rounds the softmax weights to f16 as the CPU does (7e-6 seen); the split kernel's
            // f32 weights are ~2e-4 away (CudaOps.Attention's 2e-3).
            expect_close(what + " vs cpu", got, want, c.blas ? (f16 ? 1e-4 : 1e-5) : (f16 ? 2e-3 : 1e-5));
        }
    }
    unsetenv("MOEMESH_CUDA_BLAS_CHUNK_MIB");
}

TEST(CudaOps, Attention) {
    REQUIRE_CUDA();
    ThreadPool pool(2);
    const int64_t n_head = 8, n_head_kv = 2, head_dim = 128, n_ctx = 1100;
    struct Case {
        int64_t n_tokens, n_past;
    };
    for (const bool f16 : {true, false}) {
        for (const Case c : {Case{1, 0}, Case{1, 700}, Case{5, 0}, Case{3, 300}, Case{1, 1023}}) {
            const AttnInputs in(n_ctx, c.n_tokens, n_head, n_head_kv, head_dim, 20);
            const std::vector<float>& q = in.q;
            DeviceBuffer<float> dout(q.size());
            cuda::AttentionArgs ga = in.gpu(f16, c.n_past, dout.get());
            DeviceBuffer<uint8_t> ws(cuda::attention_workspace_bytes(ga));
            cuda::attention(ga, ws.get());
            // The same with the output also quantized (the o projection's X): out unchanged, each
            // token's row quantized as the host does it.
            const int64_t row_n = n_head * head_dim;
            DeviceBuffer<float> dout2(q.size());
            DeviceBuffer<uint8_t> qx(c.n_tokens * cuda::qx_bytes(row_n));
            cuda::AttentionArgs gq = ga;
            gq.out = dout2.get(), gq.out_qx = qx.get();
            cuda::attention(gq, ws.get());
            const std::vector<float> out1 = dout.download(), out2 = dout2.download();
            EXPECT_EQ(out2, out1) << "attention with out_qx: out changed";
            const std::vector<uint8_t> qb = qx.download();
            for (int64_t t = 0; t < c.n_tokens; ++t)
                EXPECT_EQ(qx_mismatches(&out2[t * row_n], qb.data() + t * cuda::qx_bytes(row_n), row_n), 0)
                    << "attention T=" << c.n_tokens << " token " << t << ": quantized output";
            std::vector<float> want(q.size());
            attention(pool, in.cpu(f16, c.n_past, want.data()));
            // f16: the CPU rounds softmax weights to f16, a split softmax does not (see attention.cu).
            const std::string what = std::string("attention ") + (f16 ? "f16" : "f32") + " T=" +
                                     std::to_string(c.n_tokens) + " n_past=" + std::to_string(c.n_past);
            expect_close(what, out1, want, f16 ? 2e-3 : 1e-5);
            // ga's attention with the changes g holds, into a fresh output.
            auto run = [&](cuda::AttentionArgs g) {
                DeviceBuffer<float> o(q.size());
                g.out = o.get();
                cuda::attention(g, ws.get());
                return o.download();
            };
            // The V pass over the warps (MOEMESH_CUDA_ATTN_V=warps): another summation order only.
            ASSERT_EQ(setenv("MOEMESH_CUDA_ATTN_V", "warps", 1), 0);
            const std::vector<float> out3 = run(ga);
            unsetenv("MOEMESH_CUDA_ATTN_V");
            expect_close(what + " V by warps", out3, want, f16 ? 2e-3 : 1e-5);
            expect_close(what + " V by warps vs by threads", out3, out1, 1e-6);
            // (up to 4 keys per chunk every warp sums one key at most: the same sums)
            if (c.n_past >= 8) {
                EXPECT_NE(out3, out1) << what << ": MOEMESH_CUDA_ATTN_V=warps ran the same kernel";
            }
            // 256-key chunks (min_splits 1, as before session 17; the default cuts a short context
            // into 8 chunks): other sums, the same attention.
            cuda::AttentionArgs g1 = ga;
            g1.min_splits = 1;
            const std::vector<float> out5 = run(g1);
            expect_close(what + " 256-key chunks", out5, want, f16 ? 2e-3 : 1e-5);
            if (c.n_past >= 8) {
                EXPECT_NE(out5, out1) << what << ": min_splits 1 ran the same chunks";
            }
            // The merge by each head's last chunk block (merge_counters): the second launch's bits,
            // twice on the same counters (each launch must leave them at 0). (The emulator runs the
            // blocks one after another, in another order at each launch, so the merging block varies;
            // the fences only a GPU can check.)
            std::vector<unsigned> zeros(static_cast<size_t>(c.n_tokens * n_head), 0u);
            DeviceBuffer<unsigned> ctr(zeros);
            for (int rep = 0; rep < 2; ++rep) {
                DeviceBuffer<float> dout4(q.size());
                DeviceBuffer<uint8_t> qx4(c.n_tokens * cuda::qx_bytes(row_n));
                cuda::AttentionArgs gf = gq;
                gf.out = dout4.get(), gf.out_qx = qx4.get(), gf.merge_counters = ctr.get();
                // NaN in the workspace: a merge before every chunk is written cannot pass unseen.
                CUDA_CHECK(cudaMemset(ws.get(), 0xff, cuda::attention_workspace_bytes(ga)));
                cuda::attention(gf, ws.get());
                EXPECT_EQ(dout4.download(), out1) << what << ": merged by the last block, run " << rep;
                EXPECT_EQ(qx4.download(), qb) << what << ": quantized output merged by the last block, run " << rep;
                EXPECT_EQ(ctr.download(), zeros) << what << ": counters not left at 0, run " << rep;
            }
        }
    }
}

// The grouped-query split kernel (a block per chunk and KV head, every K/V row loaded once for the
// group's heads; attention.cu) gives the per-head kernel's bits (MOEMESH_CUDA_ATTN_GQA=0): groups of
// 2 to 16 heads (kernels for up to 4, 8 and 16), head_dim 64 to 256, one and several chunks, f16
// and f32 caches, merged by a second launch and by the group's last block (counters left at 0), with
// and without the quantized output; groups it cannot hold (1 head, 16 × 256 dims) take the per-head
// kernel.
TEST(CudaOps, GroupedQueryAttentionIsThePerHeadKernel) {
    REQUIRE_CUDA();
    struct Shape {
        int64_t n_head, n_head_kv, head_dim;
        bool grouped;
    };
    const int64_t n_ctx = 800;
    for (const Shape sh : {Shape{8, 2, 128, true}, Shape{32, 4, 128, true}, Shape{16, 1, 128, true},
                           Shape{6, 2, 64, true}, Shape{12, 2, 256, true}, Shape{24, 2, 64, true},
                           Shape{16, 1, 256, false}, Shape{4, 4, 128, false}}) {
        for (const bool f16 : {true, false}) {
            for (const auto& [T, n_past] : {std::pair<int64_t, int64_t>{1, 0}, {1, 37}, {1, 700}, {3, 300}}) {
                const AttnInputs in(n_ctx, T, sh.n_head, sh.n_head_kv, sh.head_dim, 90);
                const int64_t row_n = sh.n_head * sh.head_dim;
                const bool qx_ok = sh.head_dim % 32 == 0 && row_n % 256 == 0;
                const std::string what = "attention " + std::to_string(sh.n_head) + "/" +
                                         std::to_string(sh.n_head_kv) + " heads of " + std::to_string(sh.head_dim) +
                                         (f16 ? " f16" : " f32") + " T=" + std::to_string(T) +
                                         " n_past=" + std::to_string(n_past);
                const cuda::AttentionArgs ga = in.gpu(f16, n_past, nullptr);
                DeviceBuffer<uint8_t> ws(cuda::attention_workspace_bytes(ga));
                // out, its quantized twin (where the shape allows one) and the counters after the call.
                auto run = [&](bool counters, const char* gqa) {
                    DeviceBuffer<float> o(in.q.size());
                    DeviceBuffer<uint8_t> qx(qx_ok ? T * cuda::qx_bytes(row_n) : 1);
                    DeviceBuffer<unsigned> ctr(std::vector<unsigned>(static_cast<size_t>(T * sh.n_head), 0u));
                    cuda::AttentionArgs g = ga;
                    g.out = o.get();
                    if (qx_ok) g.out_qx = qx.get();
                    if (counters) g.merge_counters = ctr.get();
                    CUDA_CHECK(cudaMemset(ws.get(), 0xff, cuda::attention_workspace_bytes(ga)));
                    if (gqa) {
                        EXPECT_EQ(setenv("MOEMESH_CUDA_ATTN_GQA", gqa, 1), 0);
                    }
                    const uint64_t launches = cuda::attention_gqa_launches();
                    cuda::attention(g, ws.get());
                    const uint64_t grouped = cuda::attention_gqa_launches() - launches;
                    unsetenv("MOEMESH_CUDA_ATTN_GQA");
                    EXPECT_EQ(grouped, gqa == nullptr && sh.grouped ? 1u : 0u) << what << ": grouped launches";
                    const std::vector<unsigned> c = ctr.download();
                    EXPECT_TRUE(std::all_of(c.begin(), c.end(), [](unsigned v) { return v == 0; }))
                        << what << ": counters not left at 0";
                    return std::make_pair(o.download(), qx_ok ? qx.download() : std::vector<uint8_t>());
                };
                const auto per_head = run(false, "0");
                for (const bool counters : {false, true}) {
                    const auto got = run(counters, nullptr);
                    const std::string w = what + (counters ? ", merged by the last block" : ", merge launch");
                    EXPECT_EQ(got.first, per_head.first) << w << ": out";
                    EXPECT_EQ(got.second, per_head.second) << w << ": quantized out";
                }
            }
        }
    }
}

// ---- gated DeltaNet ----

// The ops.h contract, written out plainly.
void conv_ref(const std::vector<float>& x, const std::vector<float>& w, std::vector<float>& state,
              std::vector<float>& y, int64_t T, int64_t C, int64_t K) {
    std::vector<float> seq((K - 1 + T) * C);
    std::copy(state.begin(), state.end(), seq.begin());
    std::copy(x.begin(), x.end(), seq.begin() + (K - 1) * C);
    y.assign(T * C, 0.0f);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) {
            double s = 0.0;
            for (int64_t j = 0; j < K; ++j) s += static_cast<double>(w[c * K + j]) * seq[(t + j) * C + c];
            y[t * C + c] = static_cast<float>(s / (1.0 + std::exp(-s)));
        }
    std::copy(seq.begin() + T * C, seq.end(), state.begin());
}

TEST(CudaOps, Conv1dSilu) {
    REQUIRE_CUDA();
    const int64_t C = 96, K = 4;
    for (const int64_t T : {int64_t{1}, int64_t{2}, int64_t{9}}) {
        const std::vector<float> x = random_vec(T * C, 30), w = random_vec(C * K, 31, 0.5f);
        std::vector<float> state = random_vec((K - 1) * C, 32), y;
        const DeviceBuffer<float> dx(x), dw(w);
        DeviceBuffer<float> dstate(state), dy(T * C);
        cuda::conv1d_silu_causal(dx.get(), dw.get(), dstate.get(), dy.get(), T, C, K);
        conv_ref(x, w, state, y, T, C, K);
        expect_close("conv1d_silu T=" + std::to_string(T) + " y", dy.download(), y, 1e-6);
        expect_close("conv1d_silu T=" + std::to_string(T) + " state", dstate.download(), state, 0.0);
    }
}

void delta_rule_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& g, const std::vector<float>& beta, std::vector<float>& S,
                    std::vector<float>& out, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, float scale) {
    out.assign(T * Hv * Dv, 0.0f);
    std::vector<double> u(Dv);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < Hv; ++j) {
            const int64_t kh = j / (Hv / Hk);
            const float* kt = &k[(t * Hk + kh) * Dk];
            const float* qt = &q[(t * Hk + kh) * Dk];
            float* s = &S[j * Dk * Dv];
            const float decay = std::exp(g[t * Hv + j]), b = beta[t * Hv + j];
            for (int64_t i = 0; i < Dk * Dv; ++i) s[i] *= decay;
            std::fill(u.begin(), u.end(), 0.0);
            for (int64_t i = 0; i < Dk; ++i)
                for (int64_t c = 0; c < Dv; ++c) u[c] += static_cast<double>(s[i * Dv + c]) * kt[i];
            for (int64_t c = 0; c < Dv; ++c) {
                const float delta = b * (v[(t * Hv + j) * Dv + c] - static_cast<float>(u[c]));
                for (int64_t i = 0; i < Dk; ++i) s[i * Dv + c] += kt[i] * delta;
            }
            for (int64_t c = 0; c < Dv; ++c) {
                double o = 0.0;
                for (int64_t i = 0; i < Dk; ++i) o += static_cast<double>(s[i * Dv + c]) * qt[i] * scale;
                out[(t * Hv + j) * Dv + c] = static_cast<float>(o);
            }
        }
}

TEST(CudaOps, GatedDeltaRuleRecurrent) {
    REQUIRE_CUDA();
    struct Case {
        int64_t T, Hk, Hv, Dk, Dv;
    };
    for (const Case c : {Case{1, 2, 4, 128, 128}, Case{4, 2, 4, 128, 64}, Case{3, 1, 2, 64, 32},
                         Case{2, 2, 2, 256, 64}}) {
        std::vector<float> q = random_vec(c.T * c.Hk * c.Dk, 40), k = random_vec(c.T * c.Hk * c.Dk, 41);
        for (auto* m : {&q, &k})
            for (int64_t r = 0; r < c.T * c.Hk; ++r) {
                double ss = 0.0;
                for (int64_t i = 0; i < c.Dk; ++i) ss += (*m)[r * c.Dk + i] * (*m)[r * c.Dk + i];
                for (int64_t i = 0; i < c.Dk; ++i) (*m)[r * c.Dk + i] /= static_cast<float>(std::sqrt(ss));
            }
        const std::vector<float> v = random_vec(c.T * c.Hv * c.Dv, 42);
        std::vector<float> g = random_vec(c.T * c.Hv, 43), beta = random_vec(c.T * c.Hv, 44);
        for (auto& x : g) x = -std::log1p(std::exp(x));  // -softplus: ≤ 0
        for (auto& x : beta) x = 1.0f / (1.0f + std::exp(-x));
        std::vector<float> S = random_vec(c.Hv * c.Dk * c.Dv, 45, 0.1f), out;
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.Dk));
        const DeviceBuffer<float> dq(q), dk(k), dv(v), dg(g), db(beta);
        DeviceBuffer<float> dS(S), dout(c.T * c.Hv * c.Dv);
        cuda::DeltaNetArgs a;
        a.q = dq.get(), a.k = dk.get(), a.v = dv.get(), a.g = dg.get(), a.beta = db.get(), a.state = dS.get();
        a.out = dout.get(), a.n_tokens = c.T, a.n_k_heads = c.Hk, a.n_v_heads = c.Hv, a.k_dim = c.Dk;
        a.v_dim = c.Dv, a.scale = scale;
        cuda::gated_delta_rule_recurrent(a);
        delta_rule_ref(q, k, v, g, beta, S, out, c.T, c.Hk, c.Hv, c.Dk, c.Dv, scale);
        const std::string name = "delta_rule T=" + std::to_string(c.T) + " Dk=" + std::to_string(c.Dk) +
                                 " Dv=" + std::to_string(c.Dv);
        expect_close(name + " out", dout.download(), out, 1e-5);
        expect_close(name + " state", dS.download(), S, 1e-5);
    }
}

// ---- gated delta rule, chunked form (prompts) ----

// One problem shaped like the model's (as tests/test_delta_net.cpp make_problem): q, k l2-normalised
// per head, g = −exp(A_log)·softplus(a + dt_bias) (about [−7, 0]), β = sigmoid(b), a non-zero state.
struct DeltaProblem {
    int64_t T, Hk, Hv, Dk, Dv;
    std::vector<float> q, k, v, g, beta, state;
    float scale;
};
DeltaProblem make_delta_problem(int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, uint32_t seed) {
    DeltaProblem p{T, Hk, Hv, Dk, Dv, {}, {}, {}, {}, {}, {}, 1.0f / std::sqrt(static_cast<float>(Dk))};
    p.q = random_vec(T * Hk * Dk, seed);
    p.k = random_vec(T * Hk * Dk, seed + 1);
    l2norm_rows(p.q.data(), T * Hk, Dk, 1e-6f);
    l2norm_rows(p.k.data(), T * Hk, Dk, 1e-6f);
    p.v = random_vec(T * Hv * Dv, seed + 2);
    std::mt19937 rng(seed + 3);
    std::uniform_real_distribution<float> a_log(-2.0f, 0.5f);
    std::normal_distribution<float> nd(0.0f, 1.5f);
    std::vector<float> A(Hv), dt(Hv);
    for (int64_t j = 0; j < Hv; ++j) A[j] = -std::exp(a_log(rng)), dt[j] = nd(rng);
    p.g.resize(T * Hv);
    p.beta.resize(T * Hv);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < Hv; ++j) {
            const float x = nd(rng) + dt[j];
            p.g[t * Hv + j] = A[j] * (x > 20.0f ? x : std::log1p(std::exp(x)));
            p.beta[t * Hv + j] = 1.0f / (1.0f + std::exp(-nd(rng)));
        }
    p.state = random_vec(Hv * Dk * Dv, seed + 4, 0.5f);
    return p;
}

// The recurrence in double with a double state, token by token.
void delta_ref_double(const DeltaProblem& p, std::vector<float>& out, std::vector<float>& state) {
    const int64_t Hk = p.Hk, Hv = p.Hv, Dk = p.Dk, Dv = p.Dv;
    out.assign(p.T * Hv * Dv, 0.0f);
    std::vector<double> S(p.state.begin(), p.state.end()), u(Dv);
    for (int64_t j = 0; j < Hv; ++j) {
        double* s = S.data() + j * Dk * Dv;
        const int64_t kh = j / (Hv / Hk);
        for (int64_t t = 0; t < p.T; ++t) {
            const float* k = &p.k[(t * Hk + kh) * Dk];
            const float* q = &p.q[(t * Hk + kh) * Dk];
            const float* v = &p.v[(t * Hv + j) * Dv];
            const double e = std::exp(static_cast<double>(p.g[t * Hv + j])), b = p.beta[t * Hv + j];
            for (int64_t x = 0; x < Dk * Dv; ++x) s[x] *= e;
            std::fill(u.begin(), u.end(), 0.0);
            for (int64_t i = 0; i < Dk; ++i)
                for (int64_t c = 0; c < Dv; ++c) u[c] += s[i * Dv + c] * k[i];
            for (int64_t i = 0; i < Dk; ++i)
                for (int64_t c = 0; c < Dv; ++c) s[i * Dv + c] += static_cast<double>(k[i]) * b * (v[c] - u[c]);
            for (int64_t c = 0; c < Dv; ++c) {
                double o = 0.0;
                for (int64_t i = 0; i < Dk; ++i) o += s[i * Dv + c] * (static_cast<double>(p.scale) * q[i]);
                out[(t * Hv + j) * Dv + c] = static_cast<float>(o);
            }
        }
    }
    state.assign(S.begin(), S.end());
}

// max |got − want| / max |want|: the measure (and 1e-5 the bound) of tests/test_delta_net.cpp.
double max_rel(const std::vector<float>& got, const std::vector<float>& want) {
    EXPECT_EQ(got.size(), want.size());
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        num = std::max(num, std::fabs(static_cast<double>(got[i]) - want[i]));
        den = std::max(den, std::fabs(static_cast<double>(want[i])));
    }
    return den > 0.0 ? num / den : num;
}
constexpr double kDeltaTol = 1e-5;
void expect_delta_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    const double e = max_rel(got, want);
    std::printf("[cuda] %-52s max_rel %.3e  (tol %.0e)  %s\n", what.c_str(), e, kDeltaTol,
                e <= kDeltaTol ? "ok" : "FAIL");
    EXPECT_LE(e, kDeltaTol) << what;
}

struct DeltaResult {
    std::vector<float> out, state;
};
// Tokens [t0, t0 + n) of p on the GPU, state carried in `state` (device); chunk < 0: the recurrence.
void run_delta_gpu(const DeltaProblem& p, int64_t t0, int64_t n, int64_t chunk, DeviceBuffer<float>& state,
                   DeviceBuffer<float>& out) {
    const DeviceBuffer<float> dq(p.q), dk(p.k), dv(p.v), dg(p.g), db(p.beta);
    cuda::DeltaNetArgs a;
    a.q = dq.get() + t0 * p.Hk * p.Dk, a.k = dk.get() + t0 * p.Hk * p.Dk, a.v = dv.get() + t0 * p.Hv * p.Dv;
    a.g = dg.get() + t0 * p.Hv, a.beta = db.get() + t0 * p.Hv, a.state = state.get();
    a.out = out.get() + t0 * p.Hv * p.Dv, a.n_tokens = n, a.n_k_heads = p.Hk, a.n_v_heads = p.Hv;
    a.k_dim = p.Dk, a.v_dim = p.Dv, a.scale = p.scale;
    if (chunk < 0)
        cuda::gated_delta_rule_recurrent(a);
    else
        cuda::gated_delta_rule_chunked(a, chunk);
    CUDA_CHECK(cudaDeviceSynchronize());  // the inputs above are freed on return
}
DeltaResult delta_gpu(const DeltaProblem& p, int64_t chunk) {
    DeviceBuffer<float> state(p.state), out(p.T * p.Hv * p.Dv);
    run_delta_gpu(p, 0, p.T, chunk, state, out);
    return {out.download(), state.download()};
}
DeltaResult delta_cpu_chunked(const DeltaProblem& p) {
    static ThreadPool pool(2);
    DeltaResult r{std::vector<float>(p.T * p.Hv * p.Dv), p.state};
    DeltaNetArgs a;
    a.q = p.q.data(), a.k = p.k.data(), a.v = p.v.data(), a.g = p.g.data(), a.beta = p.beta.data();
    a.state = r.state.data(), a.out = r.out.data(), a.n_tokens = p.T, a.n_k_heads = p.Hk, a.n_v_heads = p.Hv;
    a.k_dim = p.Dk, a.v_dim = p.Dv, a.scale = p.scale;
    gated_delta_rule_chunked(pool, a);
    return r;
}

TEST(CudaOps, GatedDeltaRuleChunked) {
    REQUIRE_CUDA();
    for (const int64_t D : {128, 64}) {
        for (const int64_t T : {1, 2, 63, 64, 65, 130, 200}) {
            const DeltaProblem p = make_delta_problem(T, 2, 4, D, D, 20 + static_cast<uint32_t>(T));
            const DeltaResult chk = delta_gpu(p, 0), rec = delta_gpu(p, -1), cpu = delta_cpu_chunked(p);
            DeltaResult ref;
            delta_ref_double(p, ref.out, ref.state);
            const std::string name = "delta chunked D=" + std::to_string(D) + " T=" + std::to_string(T) + " ";
            expect_delta_close(name + "out vs gpu recurrence", chk.out, rec.out);
            expect_delta_close(name + "state vs gpu recurrence", chk.state, rec.state);
            expect_delta_close(name + "out vs cpu chunked", chk.out, cpu.out);
            expect_delta_close(name + "state vs cpu chunked", chk.state, cpu.state);
            expect_delta_close(name + "out vs double", chk.out, ref.out);
            expect_delta_close(name + "state vs double", chk.state, ref.state);
        }
    }
}

// Chunk lengths other than the default, a wide key (the largest shared-memory layout), an odd key
// size with three v-heads per k-head.
TEST(CudaOps, GatedDeltaRuleChunkedShapes) {
    REQUIRE_CUDA();
    struct Case {
        int64_t T, Hk, Hv, Dk, Dv, chunk;
    };
    for (const Case c : {Case{130, 2, 4, 64, 64, 32}, Case{130, 2, 4, 64, 64, 16}, Case{45, 2, 4, 64, 64, 7},
                         Case{9, 2, 4, 64, 64, 1}, Case{70, 1, 2, 256, 64, 0}, Case{45, 1, 3, 20, 32, 0}}) {
        if (c.chunk == 0 && cuda::delta_rule_chunk_len(c.Dk) == 0) {
            std::printf("[cuda] delta chunked Dk=%lld: no chunk fits this device's shared memory, skipped\n",
                        static_cast<long long>(c.Dk));
            continue;
        }
        const DeltaProblem p = make_delta_problem(c.T, c.Hk, c.Hv, c.Dk, c.Dv, 70 + static_cast<uint32_t>(c.chunk));
        const DeltaResult chk = delta_gpu(p, c.chunk);
        DeltaResult ref;
        delta_ref_double(p, ref.out, ref.state);
        const std::string name = "delta chunked T=" + std::to_string(c.T) + " Dk=" + std::to_string(c.Dk) +
                                 " Dv=" + std::to_string(c.Dv) + " chunk=" + std::to_string(c.chunk) + " ";
        expect_delta_close(name + "out", chk.out, ref.out);
        expect_delta_close(name + "state", chk.state, ref.state);
    }
}

// A prompt in pieces, the state carried on the device: chunked 37 + recurrent 1 + chunked 90 equals
// one chunked call over the 128 tokens.
TEST(CudaOps, GatedDeltaRuleSplitCalls) {
    REQUIRE_CUDA();
    const DeltaProblem p = make_delta_problem(128, 2, 4, 128, 128, 50);
    const DeltaResult whole = delta_gpu(p, 0);
    DeviceBuffer<float> state(p.state), out(p.T * p.Hv * p.Dv);
    run_delta_gpu(p, 0, 37, 0, state, out);
    run_delta_gpu(p, 37, 1, -1, state, out);
    run_delta_gpu(p, 38, 90, 0, state, out);
    expect_delta_close("delta split 37+1+90 out", out.download(), whole.out);
    expect_delta_close("delta split 37+1+90 state", state.download(), whole.state);
}

// The A/B switches of kernels/cuda/common.cuh: parsed from the environment, and set in every kernel
// file's copy (each .cu registers one) so that the kernels read them.
TEST(CudaOps, KernelSwitchesReachTheKernels) {
    REQUIRE_CUDA();
    unsetenv("MOEMESH_CUDA_PDL_TRIGGER");
    unsetenv("MOEMESH_CUDA_PREFETCH");
    unsetenv("MOEMESH_CUDA_EXPERT_PREFETCH");
    EXPECT_EQ(cuda::kernel_switches_from_env(), 0u);
    ASSERT_EQ(setenv("MOEMESH_CUDA_EXPERT_PREFETCH", "0", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), cuda::kSwitchNoExpertPrefetch);
    ASSERT_EQ(setenv("MOEMESH_CUDA_EXPERT_PREFETCH", "early", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), cuda::kSwitchExpertPrefetchEarly);
    ASSERT_EQ(setenv("MOEMESH_CUDA_EXPERT_PREFETCH", "1", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), 0u);
    unsetenv("MOEMESH_CUDA_EXPERT_PREFETCH");
    ASSERT_EQ(setenv("MOEMESH_CUDA_PDL_TRIGGER", "exit", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), cuda::kSwitchTriggerAtExit);
    ASSERT_EQ(setenv("MOEMESH_CUDA_PREFETCH", "0", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), cuda::kSwitchTriggerAtExit | cuda::kSwitchNoPrefetch);
    ASSERT_EQ(setenv("MOEMESH_CUDA_PDL_TRIGGER", "early", 1), 0);  // anything but "exit" / "0": the default
    ASSERT_EQ(setenv("MOEMESH_CUDA_PREFETCH", "1", 1), 0);
    EXPECT_EQ(cuda::kernel_switches_from_env(), 0u);
    unsetenv("MOEMESH_CUDA_PDL_TRIGGER");
    unsetenv("MOEMESH_CUDA_PREFETCH");

    EXPECT_GE(cuda::kernel_switch_copies(), 7);  // attention, delta_net, matmul, model_ops, norm, rope, topk
    EXPECT_EQ(cuda::kernel_switches_seen(), 0u);
    const unsigned both = cuda::kSwitchTriggerAtExit | cuda::kSwitchNoPrefetch;
    ASSERT_EQ(cuda::set_kernel_switches(both), cudaSuccess);
    EXPECT_EQ(cuda::kernel_switches_seen(), both);
    // The kernels' results do not depend on them: a GEMV (prefetch before its wait) either way.
    const int64_t n = 300, k = 512;
    const QuantMatrix w = make_weights(GgmlType::Q4_K, n, k, 7);
    const DeviceBuffer<uint8_t> dw(w.bytes);
    const DeviceBuffer<float> dx(random_vec(static_cast<size_t>(k), 8));
    DeviceBuffer<float> dy(static_cast<size_t>(n));
    cuda::matmul(GgmlType::Q4_K, dw.get(), n, k, dx.get(), 1, dy.get());
    const std::vector<float> off = dy.download();
    ASSERT_EQ(cuda::set_kernel_switches(0), cudaSuccess);
    EXPECT_EQ(cuda::kernel_switches_seen(), 0u);
    cuda::matmul(GgmlType::Q4_K, dw.get(), n, k, dx.get(), 1, dy.get());
    EXPECT_EQ(dy.download(), off);
}

}  // namespace
}  // namespace moemesh
