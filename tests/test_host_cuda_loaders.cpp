// The CUDA matmul's dequantizing loaders of Q4_1, Q5_1, IQ4_NL, IQ4_XS, MXFP4 and the i-quants
// (kernels/cuda/matmul_more.cuh, matmul_iq.cuh), compiled for the host with host definitions of the
// device helpers they use, and checked element for element against the CPU dequantizer on random
// blocks. This runs everywhere (no GPU, no CUDA toolkit needed) so the decoding logic of these
// device functions is tested before any GPU run; test_cuda_ops checks the same on a device.
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

// ---- host stand-ins for the CUDA qualifiers, types and intrinsics the loaders use ----
#define MM_CUDA_HOST_EMULATION 1
struct uint2 {
    uint32_t x, y;
};
#define __device__
#define __forceinline__ inline
// Each product and sum rounded on its own, as __fmul_rn / __fadd_rn (volatile: no contraction).
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
namespace moemesh::cuda::detail {
inline float h2f(uint16_t h) { return fp16_to_fp32(h); }
template <typename T>
inline T ld(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
inline uint32_t ld_u32_a2(const uint8_t* p) { return ld<uint32_t>(p); }
inline uint32_t byte_of(uint32_t w, int i) { return (w >> (8 * i)) & 0xffu; }
}  // namespace moemesh::cuda::detail

#include "kernels/cuda/matmul_iq.cuh"
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
            const uint16_t d = half();
            std::memcpy(&b[off], &d, 2);  // d first in every other block here
            if (t == GgmlType::Q4_1 || t == GgmlType::Q5_1) {
                const uint16_t m = half();
                std::memcpy(&b[off + 2], &m, 2);
            }
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
            } else {
                load8_more<T>(row.data(), e, v);
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
}

}  // namespace
}  // namespace moemesh
