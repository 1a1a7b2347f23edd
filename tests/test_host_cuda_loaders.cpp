// Device code of the CUDA matmul that no GPU has run yet, compiled for the host with host stand-ins for
// the CUDA intrinsics it uses (quant_dev.cuh's helpers are the real ones) and checked on random blocks:
// - the dequantizing loaders of Q4_1, Q5_1, IQ4_NL, IQ4_XS, MXFP4, the i-quants (matmul_more.cuh,
//   matmul_iq.cuh) and Q5_0, Q5_K, Q3_K, Q2_K (matmul_lowbit.cuh), bit for bit against the CPU
//   dequantizer;
// - the f32-X GEMV row dots (dot_*) and the int8-X row dots (dotq_*) of Q5_0, Q5_K, Q3_K, Q2_K, a warp
//   emulated lane by lane, against the double product of the dequantized row.
// This runs in every build (no GPU, no CUDA toolkit needed); test_cuda_ops checks the same on a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/ggml_types.h"
#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"

// ---- host stand-ins for the CUDA types, qualifiers and intrinsics the device code uses: the CUDA
// emulator's (kernels/cuda/emu/cuda_emu.h; only its header, none of its runtime is used here) ----
#define MM_CUDA_HOST_EMULATION 1
#include "kernels/cuda/emu/cuda_emu.h"
namespace moemesh::cuda::detail {
constexpr int kWarp = 32;
inline float h2f(uint16_t h) { return fp16_to_fp32(h); }
}  // namespace moemesh::cuda::detail

#include "kernels/cuda/matmul_iq.cuh"
#include "kernels/cuda/matmul_lowbit.cuh"
#include "kernels/cuda/matmul_more.cuh"

namespace moemesh {
namespace {

using namespace moemesh::cuda::detail;

// Random block bytes (every index, sign, scale and high-bit pattern) with the types' scale fields
// set to finite values of either sign.
std::vector<uint8_t> random_row(GgmlType t, int64_t k, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> b(ggml_row_bytes(t, k));
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    const size_t bs = ggml_type_info(t).type_size;
    auto half = [&]() {
        return fp32_to_fp16(std::ldexp(1.0f + (rng() % 1000) / 1000.0f, static_cast<int>(rng() % 12) - 10) *
                            ((rng() & 1) ? 1.0f : -1.0f));
    };
    for (size_t off = 0; off < b.size(); off += bs) {
        if (quants::is_iq_lowbit(t)) {
            quants::iq_set_block_scale(t, &b[off], half());
        } else if (t == GgmlType::MXFP4) {
            b[off] = static_cast<uint8_t>(rng() % 8 == 0 ? rng() % 2 : 117 + rng() % 16);
        } else {
            // Where the fp16 scales are: d first (and the min or dmin after it) but in Q3_K and Q2_K.
            size_t d_at = 0;
            bool second = t == GgmlType::Q4_1 || t == GgmlType::Q5_1 || t == GgmlType::Q5_K;
            if (t == GgmlType::Q3_K) d_at = 108;
            if (t == GgmlType::Q2_K) d_at = 80, second = true;
            const uint16_t d = half(), m = half();
            std::memcpy(&b[off + d_at], &d, 2);
            if (second) std::memcpy(&b[off + d_at + 2], &m, 2);
        }
    }
    return b;
}

template <GgmlType T>
void check_type(int64_t k) {
    for (uint32_t seed = 0; seed < 4; ++seed) {
        const std::vector<uint8_t> row = random_row(T, k, 100 * seed + static_cast<uint32_t>(T));
        std::vector<float> want(static_cast<size_t>(k));
        dequantize_row(T, row.data(), want.data(), k);
        for (int64_t e = 0; e < k; e += 8) {
            float v[8];
            if constexpr (kLoad8Iq<T>) {
                load8_iq<T>(row.data(), e, v);
            } else if constexpr (kLoad8More<T>) {
                load8_more<T>(row.data(), e, v);
            } else if constexpr (T == GgmlType::Q5_0) {
                load8_q5_0(row.data(), e, v);
            } else if constexpr (T == GgmlType::Q5_K) {
                load8_q5_K(row.data(), e, v);
            } else if constexpr (T == GgmlType::Q3_K) {
                load8_q3_K(row.data(), e, v);
            } else {
                static_assert(T == GgmlType::Q2_K);
                load8_q2_K(row.data(), e, v);
            }
            for (int i = 0; i < 8; ++i) {
                uint32_t a, b;
                std::memcpy(&a, &v[i], 4);
                std::memcpy(&b, &want[e + i], 4);
                ASSERT_EQ(a, b) << ggml_type_name(T) << " seed " << seed << " element " << e + i << ": loader "
                                << v[i] << ", CPU " << want[e + i];
            }
        }
    }
}

TEST(CudaLoadersOnHost, BitIdenticalToTheCpuDequantizer) {
    check_type<GgmlType::Q4_1>(768);
    check_type<GgmlType::Q5_1>(768);
    check_type<GgmlType::IQ4_NL>(768);
    check_type<GgmlType::IQ4_XS>(768);
    check_type<GgmlType::MXFP4>(768);
    check_type<GgmlType::IQ2_XXS>(768);
    check_type<GgmlType::IQ2_XS>(768);
    check_type<GgmlType::IQ2_S>(768);
    check_type<GgmlType::IQ3_XXS>(768);
    check_type<GgmlType::IQ3_S>(768);
    check_type<GgmlType::IQ1_S>(768);
    check_type<GgmlType::IQ1_M>(768);
    check_type<GgmlType::Q5_0>(768);
    check_type<GgmlType::Q5_K>(768);
    check_type<GgmlType::Q3_K>(768);
    check_type<GgmlType::Q2_K>(768);
}

// One warp of the GEMV row dots, lane by lane: Σ over lanes of each lane's partial sums.
template <GgmlType T, int M>
void warp_dot(const uint8_t* row, int64_t k, const float* x, float (&out)[M]) {
    for (int r = 0; r < M; ++r) out[r] = 0;
    for (int lane = 0; lane < kWarp; ++lane) {
        float acc[M] = {};
        if constexpr (T == GgmlType::Q5_0) dot_q5_0<M>(row, k, x, lane, acc);
        if constexpr (T == GgmlType::Q5_K) dot_q5_K<M>(row, k, x, lane, acc);
        if constexpr (T == GgmlType::Q3_K) dot_q3_K<M>(row, k, x, lane, acc);
        if constexpr (T == GgmlType::Q2_K) dot_q2_K<M>(row, k, x, lane, acc);
        for (int r = 0; r < M; ++r) out[r] += acc[r];
    }
}

template <GgmlType T, int R, int M>
void warp_dotq(const uint8_t* const (&rows)[R], int64_t k, const QX& x, float (&out)[R][M]) {
    for (int ri = 0; ri < R; ++ri)
        for (int r = 0; r < M; ++r) out[ri][r] = 0;
    for (int lane = 0; lane < kWarp; ++lane) {
        float acc[R][M] = {};
        if constexpr (T == GgmlType::Q5_0) dotq_q5_0<R, M>(rows, k, x, lane, acc);
        if constexpr (T == GgmlType::Q5_K) dotq_q5_K<R, M>(rows, k, x, lane, acc);
        if constexpr (T == GgmlType::Q3_K) dotq_q3_K<R, M>(rows, k, x, lane, acc);
        if constexpr (T == GgmlType::Q2_K) dotq_q2_K<R, M>(rows, k, x, lane, acc);
        for (int ri = 0; ri < R; ++ri)
            for (int r = 0; r < M; ++r) out[ri][r] += acc[ri][r];
    }
}

template <GgmlType T>
void check_dots() {
    constexpr int M = 3, R = 2;
    const int64_t k = 1024;
    std::mt19937 rng(static_cast<uint32_t>(T));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    // The rows 16-byte aligned (as device rows of these types are at least 2-byte aligned; Q5_K's 16).
    const size_t rb = ggml_row_bytes(T, k);
    std::vector<uint8_t> storage(R * rb + 16);
    uint8_t* base = storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) % 16) % 16;
    std::vector<std::vector<float>> deq(R, std::vector<float>(k));
    for (int ri = 0; ri < R; ++ri) {
        const std::vector<uint8_t> row = random_row(T, k, 7 + ri);
        std::memcpy(base + ri * rb, row.data(), rb);
        dequantize_row(T, row.data(), deq[ri].data(), k);
    }
    // f32 X.
    std::vector<float> x(M * k);
    for (auto& v : x) v = nd(rng);
    for (int ri = 0; ri < R; ++ri) {
        float got[M];
        warp_dot<T, M>(base + ri * rb, k, x.data(), got);
        for (int r = 0; r < M; ++r) {
            double want = 0, mag = 0;
            for (int64_t i = 0; i < k; ++i) {
                want += double(deq[ri][i]) * x[r * k + i];
                mag += std::fabs(double(deq[ri][i]) * x[r * k + i]);
            }
            EXPECT_NEAR(got[r], want, 1e-5 * mag) << ggml_type_name(T) << " f32 GEMV row " << ri << " x " << r;
        }
    }
    // int8 X as the int8 GEMV's shared memory holds it: q, d per 32, d·Σq per 16.
    std::vector<int8_t> q(M * k);
    std::vector<float> d(M * k / 32), s16(M * k / 16);
    for (auto& v : q) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    for (auto& v : d) v = 0.01f + 0.001f * static_cast<float>(rng() % 100);
    for (int64_t g = 0; g < M * k / 16; ++g) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) sum += q[g * 16 + i];
        s16[g] = d[g / 2] * static_cast<float>(sum);
    }
    const QX qx{q.data(), d.data(), s16.data()};
    const uint8_t* const rows[R] = {base, base + rb};
    float got[R][M];
    warp_dotq<T, R, M>(rows, k, qx, got);
    for (int ri = 0; ri < R; ++ri)
        for (int r = 0; r < M; ++r) {
            double want = 0, mag = 0;
            for (int64_t i = 0; i < k; ++i) {
                const double xi = double(d[(r * k + i) / 32]) * q[r * k + i];
                want += double(deq[ri][i]) * xi;
                mag += std::fabs(double(deq[ri][i]) * xi);
            }
            EXPECT_NEAR(got[ri][r], want, 1e-5 * mag) << ggml_type_name(T) << " int8 GEMV row " << ri << " x " << r;
        }
}

TEST(CudaLoadersOnHost, LowBitGemvRowDotsMatchTheDequantizedProduct) {
    check_dots<GgmlType::Q5_0>();
    check_dots<GgmlType::Q5_K>();
    check_dots<GgmlType::Q3_K>();
    check_dots<GgmlType::Q2_K>();
}

}  // namespace
}  // namespace moemesh
