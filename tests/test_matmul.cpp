// Row dot products (SIMD vs scalar reference vs double-precision product of the decoded rows),
// matmul against a naive double-precision product, and ThreadPool coverage.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"

namespace moemesh {
namespace {

const GgmlType kTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,   GgmlType::Q5_0,
                           GgmlType::Q4_0, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,   GgmlType::Q5_K,
                           GgmlType::Q6_K, GgmlType::Q4_1, GgmlType::Q5_1, GgmlType::IQ4_NL, GgmlType::IQ4_XS,
                           GgmlType::MXFP4,   GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S,
                           GgmlType::IQ3_XXS, GgmlType::IQ3_S,   GgmlType::IQ1_S,  GgmlType::IQ1_M};

std::vector<float> random_normal(int64_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& f : v) f = dist(rng);
    return v;
}

// Weight matrix [rows, k] in type t, from Gaussian data (the i-quants, which have no quantizer: random
// block bytes under a fixed scale).
std::vector<uint8_t> make_weights(GgmlType t, int64_t rows, int64_t k, uint32_t seed) {
    if (quants::is_iq_lowbit(t)) {
        std::mt19937 rng(seed);
        std::vector<uint8_t> w(ggml_row_bytes(t, k) * static_cast<size_t>(rows));
        for (auto& b : w) b = static_cast<uint8_t>(rng());
        for (size_t off = 0; off < w.size(); off += ggml_type_info(t).type_size)
            quants::iq_set_block_scale(t, &w[off], fp32_to_fp16(1.0f / 256));
        return w;
    }
    const std::vector<float> f = random_normal(rows * k, seed, 0.05f);
    const size_t stride = ggml_row_bytes(t, k);
    std::vector<uint8_t> w(stride * static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) quantize_row(t, f.data() + r * k, w.data() + r * stride, k);
    return w;
}

// X converted to the activation type and decoded back to floats: the values the kernel multiplies.
std::vector<float> act_values(GgmlType wt, const float* x, int64_t k) {
    const quants::TypeKernels* kt = quants::type_kernels(wt, /*simd=*/false);
    std::vector<float> out(static_cast<size_t>(k));
    if (!kt->quantize_act) {
        std::memcpy(out.data(), x, static_cast<size_t>(k) * 4);
        return out;
    }
    std::vector<uint8_t> a(ggml_row_bytes(kt->act_type, k));
    kt->quantize_act(x, a.data(), k);
    if (kt->act_type == GgmlType::Q8_K) {
        const auto* b = reinterpret_cast<const quants::BlockQ8_K*>(a.data());
        for (int64_t i = 0; i < k; ++i) out[i] = b[i / 256].d * b[i / 256].qs[i % 256];
    } else if (kt->act_type == GgmlType::Q8_1) {
        const auto* b = reinterpret_cast<const quants::BlockQ8_1*>(a.data());
        for (int64_t i = 0; i < k; ++i) out[i] = fp16_to_fp32(b[i / 32].d) * b[i / 32].qs[i % 32];
    } else {
        dequantize_row(kt->act_type, a.data(), out.data(), k);
    }
    return out;
}

struct DotCase {
    double value;    // Σ w·a in double over the decoded values
    double abs_sum;  // Σ |w·a|, the scale for the tolerance
};

DotCase naive_dot(const float* w, const float* a, int64_t k) {
    DotCase c{0, 0};
    for (int64_t i = 0; i < k; ++i) {
        c.value += double(w[i]) * a[i];
        c.abs_sum += std::fabs(double(w[i]) * a[i]);
    }
    return c;
}

// Q4_1 / Q5_1 pair with Q8_1 activations, whose s = fp16(d·Σq) stands in for the decoded Σ d·q in
// the min's term, as in ggml: the kernel's product differs from the decoded values' product by
// Σ_b m_b · (s_b − d_b·Σ_j q_bj). 0 for the other types.
double q8_1_sum_rounding(GgmlType wt, const uint8_t* wrow, const float* x, int64_t k) {
    const quants::TypeKernels* kt = quants::type_kernels(wt, /*simd=*/false);
    if (kt->act_type != GgmlType::Q8_1) return 0;
    std::vector<quants::BlockQ8_1> a(static_cast<size_t>(k / 32));
    quants::quantize_act_q8_1_scalar(x, a.data(), k);
    const size_t wblock = ggml_type_info(wt).type_size;
    double diff = 0;
    for (int64_t b = 0; b < k / 32; ++b) {
        uint16_t m;  // Q4_1 and Q5_1 keep the min right after d
        std::memcpy(&m, wrow + b * wblock + 2, 2);
        int sum = 0;
        for (int i = 0; i < 32; ++i) sum += a[b].qs[i];
        diff += double(fp16_to_fp32(m)) * (double(fp16_to_fp32(a[b].s)) - double(fp16_to_fp32(a[b].d)) * sum);
    }
    return diff;
}

std::vector<int64_t> sizes_for(GgmlType t) {
    if (ggml_type_info(t).block_size == 256) return {256, 512, 768, 2048, 4096, 5120};
    if (ggml_type_info(t).block_size == 32) return {32, 64, 96, 256, 512, 800, 2048, 4096};
    return {1, 7, 8, 31, 33, 100, 256, 512, 1000, 2048, 4096};
}

// Relative tolerance on Σ|w·a| for float accumulation order differences.
constexpr double kRelTol = 2e-6;

TEST(VecDot, ScalarReferenceMatchesDoubleProduct) {
    for (GgmlType t : kTypes) {
        const quants::TypeKernels* kt = quants::type_kernels(t, /*simd=*/false);
        ASSERT_NE(kt, nullptr);
        for (int64_t k : sizes_for(t)) {
            const std::vector<uint8_t> w = make_weights(t, 1, k, 7 + static_cast<uint32_t>(k));
            const std::vector<float> x = random_normal(k, 11 + static_cast<uint32_t>(k));
            std::vector<float> wd(static_cast<size_t>(k));
            dequantize_row(t, w.data(), wd.data(), k);
            const std::vector<float> xa = act_values(t, x.data(), k);
            std::vector<uint8_t> a(kt->quantize_act ? ggml_row_bytes(kt->act_type, k) : 0);
            const void* ap = x.data();
            if (kt->quantize_act) {
                kt->quantize_act(x.data(), a.data(), k);
                ap = a.data();
            }
            DotCase want = naive_dot(wd.data(), xa.data(), k);
            want.value += q8_1_sum_rounding(t, w.data(), x.data(), k);
            const float got = kt->vec_dot(k, w.data(), ap);
            EXPECT_NEAR(got, want.value, kRelTol * want.abs_sum + 1e-30) << ggml_type_name(t) << " k=" << k;
        }
    }
}

TEST(VecDot, SimdMatchesScalar) {
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (GgmlType t : kTypes) {
        const quants::TypeKernels* ks = quants::type_kernels(t, false);
        const quants::TypeKernels* kv = quants::type_kernels(t, true);
        ASSERT_NE(ks->vec_dot, kv->vec_dot);
        for (int64_t k : sizes_for(t)) {
            for (uint32_t seed = 0; seed < 3; ++seed) {
                const std::vector<uint8_t> w = make_weights(t, 1, k, 100 * seed + static_cast<uint32_t>(k));
                std::vector<float> x = random_normal(k, 200 * seed + static_cast<uint32_t>(k));
                if (seed == 2) {
                    for (int64_t i = 0; i < k; i += 3) x[i] = 0;  // zero runs and sign mixes
                    x[0] = 30.0f;                                 // a large outlier
                }
                std::vector<uint8_t> a(ks->quantize_act ? ggml_row_bytes(ks->act_type, k) : 0);
                const void* ap = x.data();
                if (ks->quantize_act) {
                    ks->quantize_act(x.data(), a.data(), k);
                    ap = a.data();
                }
                std::vector<float> wd(static_cast<size_t>(k));
                dequantize_row(t, w.data(), wd.data(), k);
                const DotCase scale = naive_dot(wd.data(), act_values(t, x.data(), k).data(), k);
                const float ref = ks->vec_dot(k, w.data(), ap);
                const float simd = kv->vec_dot(k, w.data(), ap);
                EXPECT_NEAR(simd, ref, kRelTol * scale.abs_sum + 1e-30)
                    << ggml_type_name(t) << " k=" << k << " seed=" << seed;
            }
        }
    }
}

// Four activation rows of k elements in kt's activation type, a_stride bytes apart: normal values,
// the same scaled by 1e-3, normal, and every other element zero (magnitudes and zero runs differ).
std::vector<uint8_t> four_act_rows(const quants::TypeKernels* kt, int64_t k, uint32_t seed, size_t* a_stride) {
    std::vector<float> x = random_normal(4 * k, seed);
    for (int64_t i = 0; i < k; ++i) x[k + i] *= 1e-3f;
    for (int64_t i = 0; i < k; i += 2) x[3 * k + i] = 0;
    *a_stride = ggml_row_bytes(kt->act_type, k);
    std::vector<uint8_t> a(4 * *a_stride);
    for (int r = 0; r < 4; ++r) kt->quantize_act(x.data() + r * k, a.data() + r * *a_stride, k);
    return a;
}

TEST(VecDot, FourRowKernelsMatchSingleRowBitForBit) {
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (GgmlType t : {GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_0, GgmlType::Q5_K,
                       GgmlType::Q3_K, GgmlType::Q2_K, GgmlType::Q4_1, GgmlType::Q5_1,
                       GgmlType::IQ4_XS, GgmlType::IQ2_XXS, GgmlType::IQ2_XS,
                       GgmlType::IQ2_S, GgmlType::IQ3_XXS, GgmlType::IQ3_S, GgmlType::IQ1_S, GgmlType::IQ1_M}) {
        const quants::TypeKernels* kt = quants::type_kernels(t);
        ASSERT_NE(kt->vec_dot_x4, nullptr) << ggml_type_name(t);
        for (int64_t k : sizes_for(t)) {
            const std::vector<uint8_t> w = make_weights(t, 1, k, 40 + static_cast<uint32_t>(k));
            size_t a_stride;
            const std::vector<uint8_t> a = four_act_rows(kt, k, 50 + static_cast<uint32_t>(k), &a_stride);
            float out[4];
            kt->vec_dot_x4(k, w.data(), a.data(), a_stride, out);
            for (int r = 0; r < 4; ++r) {
                const float single = kt->vec_dot(k, w.data(), a.data() + r * a_stride);
                ASSERT_EQ(fp32_to_bits(out[r]), fp32_to_bits(single)) << ggml_type_name(t) << " k=" << k << " r=" << r;
            }
        }
    }
}

TEST(VecDot, EightRowKernelsMatchSingleRowBitForBit) {
    // Q4_0, IQ4_NL, MXFP4, Q8_0: 8 W rows against 1 and 4 activation rows, each output vec_dot's
    // bits (tests/test_quants.cpp checks the first three against llama.cpp's repacked kernels).
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (GgmlType t : {GgmlType::Q4_0, GgmlType::IQ4_NL, GgmlType::MXFP4, GgmlType::Q8_0}) {
        const quants::TypeKernels* kt = quants::type_kernels(t);
        ASSERT_NE(kt->vec_dot_r8, nullptr) << ggml_type_name(t);
        ASSERT_NE(kt->vec_dot_r8x4, nullptr) << ggml_type_name(t);
        for (int64_t k : sizes_for(t)) {
            const std::vector<uint8_t> w = make_weights(t, 8, k, 80 + static_cast<uint32_t>(k));
            const size_t w_stride = ggml_row_bytes(t, k);
            size_t a_stride;
            const std::vector<uint8_t> a = four_act_rows(kt, k, 90 + static_cast<uint32_t>(k), &a_stride);
            float out4[32], out1[8];
            kt->vec_dot_r8x4(k, w.data(), w_stride, a.data(), a_stride, out4);
            for (int q = 0; q < 4; ++q) {
                kt->vec_dot_r8(k, w.data(), w_stride, a.data() + q * a_stride, a_stride, out1);
                for (int r = 0; r < 8; ++r) {
                    const float single = kt->vec_dot(k, w.data() + r * w_stride, a.data() + q * a_stride);
                    ASSERT_EQ(fp32_to_bits(out4[8 * q + r]), fp32_to_bits(single)) << ggml_type_name(t) << " k=" << k;
                    ASSERT_EQ(fp32_to_bits(out1[r]), fp32_to_bits(single)) << ggml_type_name(t) << " k=" << k;
                }
            }
        }
    }
}

TEST(CpuIsa, NamesRoundTripAndTheLevelInUseIsSupported) {
    for (quants::SimdLevel l : {quants::SimdLevel::kScalar, quants::SimdLevel::kAvx2, quants::SimdLevel::kAvxVnni,
                                quants::SimdLevel::kAvx512Vnni}) {
        quants::SimdLevel back;
        ASSERT_TRUE(quants::parse_simd_level(quants::simd_level_name(l), &back));
        EXPECT_EQ(back, l);
    }
    quants::SimdLevel unused;
    EXPECT_FALSE(quants::parse_simd_level("avx512", &unused));
    EXPECT_FALSE(quants::parse_simd_level("", &unused));
    EXPECT_TRUE(quants::cpu_supports(quants::SimdLevel::kScalar));
    EXPECT_TRUE(quants::cpu_supports(quants::simd_level()));
    EXPECT_STREQ(cpu_kernel_isa(), quants::simd_level_name(quants::simd_level()));
}

// Every kernel of a VNNI variant against the AVX2 one, bit for bit: activation conversion, the
// one-row, 4-row, 8-row, 16-row, decoded-row and transposed-tile dots, on quantized Gaussian
// weights and on weights and activations at the extremes of their ranges (the VNNI kernels regroup
// the integer sums). The AVX2 variant's own tiles (8 rows) are checked the same way.
TEST(CpuIsa, VnniVariantsGiveTheAvx2Bits) {
    if (!quants::cpu_supports(quants::SimdLevel::kAvx2)) GTEST_SKIP() << "no AVX2";
    std::vector<quants::SimdLevel> levels = {quants::SimdLevel::kAvx2};
    for (quants::SimdLevel l : {quants::SimdLevel::kAvxVnni, quants::SimdLevel::kAvx512Vnni})
        if (quants::cpu_supports(l)) levels.push_back(l);
    if (!quants::cpu_supports(quants::SimdLevel::kAvxVnni)) std::printf("[  NOTE    ] no AVX-VNNI: that variant is not checked\n");
    if (!quants::cpu_supports(quants::SimdLevel::kAvx512Vnni))
        std::printf("[  NOTE    ] no AVX512-VNNI: that variant is not checked\n");
    for (quants::SimdLevel level : levels) {
        for (GgmlType t : kTypes) {
            const quants::TypeKernels* ka = quants::type_kernels(t, quants::SimdLevel::kAvx2);
            const quants::TypeKernels* kv = quants::type_kernels(t, level);
            const std::string what = std::string(quants::simd_level_name(level)) + " " + ggml_type_name(t);
            if (level != quants::SimdLevel::kAvx2) {
                ASSERT_NE(ka->vec_dot, kv->vec_dot) << what;  // the variant's own code
            }
            for (int64_t k : sizes_for(t)) {
                for (int extremes = 0; extremes < 2; ++extremes) {
                    const uint32_t seed = 300 + static_cast<uint32_t>(k) + 7 * static_cast<uint32_t>(extremes);
                    std::vector<uint8_t> w = make_weights(t, 16, k, seed);
                    std::vector<float> x = random_normal(4 * k, seed + 1);
                    if (extremes) {
                        // Activations at ±amax (int8 ±127) and, for 32-element types, weight bytes
                        // of every value (all levels, both nibbles; Q8_0 -128..127) under a small scale.
                        for (int64_t i = 0; i < 4 * k; ++i) x[i] = (i * 7919 % 3 == 0) ? -1.0f : 1.0f;
                        if (ggml_type_info(t).block_size == 32) {
                            std::mt19937 rng(seed);
                            const size_t bs = ggml_type_info(t).type_size;
                            for (size_t off = 0; off < w.size(); off += bs) {
                                const uint16_t d = fp32_to_fp16(1.0f / 64);
                                const size_t scale_bytes = t == GgmlType::MXFP4 ? 1 : 2;
                                for (size_t b = scale_bytes; b < bs; ++b) w[off + b] = static_cast<uint8_t>(rng());
                                if (t == GgmlType::MXFP4) w[off] = 120; else std::memcpy(&w[off], &d, 2);
                            }
                        }
                    }
                    const size_t w_stride = ggml_row_bytes(t, k);
                    const size_t a_stride = ka->quantize_act ? ggml_row_bytes(ka->act_type, k) : k * sizeof(float);
                    std::vector<uint8_t> aa(4 * a_stride + 64), av(4 * a_stride + 64);
                    for (int q = 0; q < 4; ++q) {
                        if (ka->quantize_act) {
                            ka->quantize_act(x.data() + q * k, aa.data() + q * a_stride, k);
                            kv->quantize_act(x.data() + q * k, av.data() + q * a_stride, k);
                        } else {
                            std::memcpy(aa.data() + q * a_stride, x.data() + q * k, a_stride);
                            std::memcpy(av.data() + q * a_stride, x.data() + q * k, a_stride);
                        }
                    }
                    ASSERT_EQ(aa, av) << what << " activations, k=" << k;
                    const auto same = [&](float got, float want, const char* kernel) {
                        return fp32_to_bits(got) == fp32_to_bits(want)
                                   ? ::testing::AssertionSuccess()
                                   : ::testing::AssertionFailure() << what << " " << kernel << " k=" << k << " extremes="
                                                                   << extremes << ": " << got << " vs " << want;
                    };
                    for (int r = 0; r < 8; ++r) {
                        for (int q = 0; q < 4; ++q) {
                            const uint8_t* wr = w.data() + r * w_stride;
                            const uint8_t* ar = aa.data() + q * a_stride;
                            ASSERT_TRUE(same(kv->vec_dot(k, wr, ar), ka->vec_dot(k, wr, ar), "vec_dot"));
                        }
                        if (ka->vec_dot_x4) {
                            float oa[4], ov[4];
                            ka->vec_dot_x4(k, w.data() + r * w_stride, aa.data(), a_stride, oa);
                            kv->vec_dot_x4(k, w.data() + r * w_stride, aa.data(), a_stride, ov);
                            for (int q = 0; q < 4; ++q) ASSERT_TRUE(same(ov[q], oa[q], "vec_dot_x4"));
                        }
                        if (kv->decode_row) {  // the variant's decoded row (its own layout) against AVX2's one-row dot
                            std::vector<uint8_t> dv(static_cast<size_t>(k / kv->block) * kv->dec_bytes_per_block);
                            kv->decode_row(k, w.data() + r * w_stride, dv.data());
                            float ov[4];
                            kv->vec_dot_dec_x4(k, dv.data(), aa.data(), a_stride, ov);
                            for (int q = 0; q < 4; ++q) {
                                const float want = ka->vec_dot(k, w.data() + r * w_stride, aa.data() + q * a_stride);
                                ASSERT_TRUE(same(ov[q], want, "vec_dot_dec_x4"));
                            }
                        }
                    }
                    if (kv->vec_dot_r16) {  // 16 rows from the encoded rows
                        float o4[64], o1[16];
                        kv->vec_dot_r16x4(k, w.data(), w_stride, aa.data(), a_stride, o4);
                        for (int q = 0; q < 4; ++q) {
                            kv->vec_dot_r16(k, w.data(), w_stride, aa.data() + q * a_stride, a_stride, o1);
                            for (int r = 0; r < 16; ++r) {
                                const float want = ka->vec_dot(k, w.data() + r * w_stride, aa.data() + q * a_stride);
                                ASSERT_TRUE(same(o4[16 * q + r], want, "vec_dot_r16x4"));
                                ASSERT_TRUE(same(o1[r], want, "vec_dot_r16"));
                            }
                        }
                    }
                    if (kv->decode_tile) {
                        // tile_rows rows transposed: every output the AVX2 one-row dot's bits.
                        ASSERT_TRUE(kv->tile_rows == 8 || kv->tile_rows == 16) << what;
                        const int64_t tr = kv->tile_rows;
                        std::vector<uint8_t> tile(static_cast<size_t>(k / kv->block) * kv->tile_bytes_per_block);
                        kv->decode_tile(k, w.data(), w_stride, tile.data());
                        float o4[64], o1[16];
                        kv->vec_dot_tile_x4(k, tile.data(), aa.data(), a_stride, o4);
                        for (int q = 0; q < 4; ++q) {
                            kv->vec_dot_tile(k, tile.data(), aa.data() + q * a_stride, a_stride, o1);
                            for (int r = 0; r < tr; ++r) {
                                const float want = ka->vec_dot(k, w.data() + r * w_stride, aa.data() + q * a_stride);
                                ASSERT_TRUE(same(o4[tr * q + r], want, "vec_dot_tile_x4"));
                                ASSERT_TRUE(same(o1[r], want, "vec_dot_tile"));
                            }
                        }
                    }
                    if (kv->vec_dot_r8) {  // 8 rows, against the AVX2 one-row dot
                        float o4[32], o1[8];
                        kv->vec_dot_r8x4(k, w.data(), w_stride, aa.data(), a_stride, o4);
                        for (int q = 0; q < 4; ++q) {
                            kv->vec_dot_r8(k, w.data(), w_stride, aa.data() + q * a_stride, a_stride, o1);
                            for (int r = 0; r < 8; ++r) {
                                const float want = ka->vec_dot(k, w.data() + r * w_stride, aa.data() + q * a_stride);
                                ASSERT_TRUE(same(o4[8 * q + r], want, "vec_dot_r8x4"));
                                ASSERT_TRUE(same(o1[r], want, "vec_dot_r8"));
                            }
                        }
                    }
                }
            }
        }
    }
}

TEST(VecDot, EightRowMxfp4ScalesCoverEveryExponent) {
    // The 8-row kernel converts 8 E8M0 exponents at once; every exponent (0 and 1 give subnormal
    // scales) must give the one-row kernel's bits. One block per row, so each output is that
    // block's scale times an integer: any wrong scale shows.
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    const quants::TypeKernels* kt = quants::type_kernels(GgmlType::MXFP4);
    const int64_t k = 32;
    const size_t w_stride = ggml_row_bytes(GgmlType::MXFP4, k);
    std::vector<uint8_t> w = make_weights(GgmlType::MXFP4, 8, k, 5);
    const std::vector<float> x = random_normal(k, 6);
    std::vector<uint8_t> a(ggml_row_bytes(kt->act_type, k));
    kt->quantize_act(x.data(), a.data(), k);
    for (int e0 = 0; e0 < 256; e0 += 8) {
        for (int r = 0; r < 8; ++r) reinterpret_cast<quants::BlockMXFP4*>(w.data() + r * w_stride)->e = static_cast<uint8_t>(e0 + r);
        float out[8];
        kt->vec_dot_r8(k, w.data(), w_stride, a.data(), a.size(), out);
        for (int r = 0; r < 8; ++r) {
            const float one = kt->vec_dot(k, w.data() + r * w_stride, a.data());
            ASSERT_NE(one, 0.0f) << "e " << e0 + r;  // the block must contribute
            ASSERT_EQ(fp32_to_bits(out[r]), fp32_to_bits(one)) << "e " << e0 + r;
        }
    }
}

TEST(VecDot, DecodedRowKernelsMatchSingleRowBitForBit) {
    // The prompt path of types with decode_row: W decoded once, then the 4-row dot on the decoded
    // row must give vec_dot's bits on the encoded row. Every type with that path is listed, so a
    // type losing it fails here rather than silently getting slower.
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (GgmlType t : {GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S, GgmlType::IQ3_XXS, GgmlType::IQ3_S,
                       GgmlType::Q4_K}) {
        const quants::TypeKernels* kt = quants::type_kernels(t);
        ASSERT_NE(kt->decode_row, nullptr) << ggml_type_name(t);
        ASSERT_NE(kt->vec_dot_dec_x4, nullptr) << ggml_type_name(t);
        for (int64_t k : sizes_for(t)) {
            const std::vector<uint8_t> w = make_weights(t, 1, k, 60 + static_cast<uint32_t>(k));
            size_t a_stride;
            const std::vector<uint8_t> a = four_act_rows(kt, k, 70 + static_cast<uint32_t>(k), &a_stride);
            std::vector<uint8_t> dec(static_cast<size_t>(k / kt->block) * kt->dec_bytes_per_block, 0xCD);
            kt->decode_row(k, w.data(), dec.data());
            float out[4];
            kt->vec_dot_dec_x4(k, dec.data(), a.data(), a_stride, out);
            for (int r = 0; r < 4; ++r) {
                const float single = kt->vec_dot(k, w.data(), a.data() + r * a_stride);
                ASSERT_EQ(fp32_to_bits(out[r]), fp32_to_bits(single)) << ggml_type_name(t) << " k=" << k << " r=" << r;
            }
        }
    }
}

TEST(Matmul, ManyJobsGiveEachProductsBits) {
    // matmul_many (a MoE layer's experts in one parallel region): jobs of mixed types and shapes,
    // adjacent jobs on the same X sharing its conversion (gate/up) and adjacent jobs on the same X
    // with different activation types (Q8_K then Q8_0) not sharing it, empty jobs, m from 1 to 70.
    ThreadPool pool(2);
    struct Spec {
        GgmlType t;
        int64_t n_out, k, m;
        int x;  // which X
    };
    const std::vector<Spec> specs = {
        {GgmlType::Q4_K, 40, 512, 9, 0},  {GgmlType::Q4_K, 24, 512, 9, 0},   {GgmlType::Q8_0, 24, 512, 9, 0},
        {GgmlType::IQ3_S, 33, 256, 70, 1}, {GgmlType::IQ3_S, 17, 256, 70, 1}, {GgmlType::F32, 5, 256, 3, 2},
        {GgmlType::Q6_K, 0, 256, 4, 2},   {GgmlType::Q5_K, 7, 256, 0, 2},    {GgmlType::MXFP4, 19, 256, 1, 3},
        {GgmlType::IQ4_XS, 21, 256, 6, 3},
    };
    const std::vector<std::vector<float>> xs = {random_normal(9 * 512, 1), random_normal(70 * 256, 2),
                                                random_normal(4 * 256, 3), random_normal(6 * 256, 4)};
    std::vector<std::vector<uint8_t>> ws;
    std::vector<std::vector<float>> ys, want;
    std::vector<MatmulJob> jobs;
    for (size_t j = 0; j < specs.size(); ++j) {
        const Spec& s = specs[j];
        ws.push_back(make_weights(s.t, std::max<int64_t>(s.n_out, 1), s.k, 300 + static_cast<uint32_t>(j)));
        ys.emplace_back(static_cast<size_t>(s.m * s.n_out) + 1, -7.0f);  // +1: a guard after y
        want.emplace_back(static_cast<size_t>(s.m * s.n_out) + 1, -7.0f);
        matmul(pool, s.t, ws[j].data(), s.n_out, s.k, xs[s.x].data(), s.m, want[j].data());
    }
    for (size_t j = 0; j < specs.size(); ++j) {
        const Spec& s = specs[j];
        jobs.push_back({s.t, ws[j].data(), s.n_out, s.k, xs[s.x].data(), s.m, ys[j].data()});
    }
    matmul_many(pool, jobs.data(), static_cast<int64_t>(jobs.size()));
    for (size_t j = 0; j < specs.size(); ++j)
        ASSERT_EQ(0, std::memcmp(ys[j].data(), want[j].data(), ys[j].size() * sizeof(float)))
            << "job " << j << " " << ggml_type_name(specs[j].t);
}

// Every row of a prompt-sized product must be the bits of the same row computed alone (decode).
void check_rows_independent_of_batch(int64_t n_out, int64_t k, int64_t m, uint32_t seed) {
    ThreadPool pool(2);
    for (GgmlType t : kTypes) {
        const std::vector<uint8_t> w = make_weights(t, n_out, k, seed);
        const std::vector<float> x = random_normal(m * k, seed + 1);
        std::vector<float> y(m * n_out), y1(n_out);
        matmul(pool, t, w.data(), n_out, k, x.data(), m, y.data());
        for (int64_t i = 0; i < m; ++i) {
            matmul(pool, t, w.data(), n_out, k, x.data() + i * k, 1, y1.data());
            ASSERT_EQ(0, std::memcmp(y1.data(), y.data() + i * n_out, n_out * sizeof(float)))
                << ggml_type_name(t) << " m=" << m << " row " << i;
        }
    }
}

TEST(Matmul, RowResultsDoNotDependOnBatch) {
    // Decode (m = 1) and prompt (m > 1: 4-row, 8-row and decoded-row kernels) give the same bits.
    check_rows_independent_of_batch(37, 512, 9, 77);
}

TEST(Matmul, RowResultsDoNotDependOnBatchAcrossTiles) {
    // Several 64-row X tiles, the decoded-row path in full tiles and the 4-row and one-row kernels
    // for the remainder (m = 70 = 64 + 4 + 2), 8-row kernels with leftover W rows (21 = 16 + 5).
    check_rows_independent_of_batch(21, 256, 70, 91);
}

TEST(VecDot, QuantizedIntegerSumsAreExact) {
    // Scales of 1 (Q8_0 d = 1.0, activations with amax 127) make every product an exact integer, so
    // scalar and SIMD must agree bit for bit with the integer dot product.
    const int64_t k = 4096;
    std::mt19937 rng(3);
    std::vector<quants::BlockQ8_0> w(k / 32), a(k / 32);
    int64_t want = 0;
    for (int64_t b = 0; b < k / 32; ++b) {
        w[b].d = a[b].d = fp32_to_fp16(1.0f);
        for (int i = 0; i < 32; ++i) {
            w[b].qs[i] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            a[b].qs[i] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            want += w[b].qs[i] * a[b].qs[i];
        }
    }
    EXPECT_EQ(quants::vec_dot_q8_0_q8_0_scalar(k, w.data(), a.data()), static_cast<float>(want));
    if (quants::cpu_has_avx2()) {
        EXPECT_EQ(quants::avx2::vec_dot_q8_0_q8_0_r(k, w.data(), a.data()), static_cast<float>(want));
    }
}

// matmul vs naive Y = X·Wᵀ in double from decoded W and decoded activations.
void check_matmul(ThreadPool& pool, GgmlType t, int64_t n_out, int64_t k, int64_t m, uint32_t seed,
                  std::vector<float>* out = nullptr) {
    const std::vector<uint8_t> w = make_weights(t, n_out, k, seed);
    const std::vector<float> x = random_normal(m * k, seed + 1);
    std::vector<float> y(static_cast<size_t>(m * n_out), NAN);
    matmul(pool, t, w.data(), n_out, k, x.data(), m, y.data());

    const size_t stride = ggml_row_bytes(t, k);
    std::vector<float> wd(static_cast<size_t>(n_out * k));
    for (int64_t r = 0; r < n_out; ++r) dequantize_row(t, w.data() + r * stride, wd.data() + r * k, k);
    for (int64_t i = 0; i < m; ++i) {
        const std::vector<float> xa = act_values(t, x.data() + i * k, k);
        for (int64_t r = 0; r < n_out; ++r) {
            DotCase want = naive_dot(wd.data() + r * k, xa.data(), k);
            want.value += q8_1_sum_rounding(t, w.data() + r * stride, x.data() + i * k, k);
            ASSERT_NEAR(y[i * n_out + r], want.value, kRelTol * want.abs_sum + 1e-30)
                << ggml_type_name(t) << " n_out=" << n_out << " k=" << k << " m=" << m << " at " << i << "," << r;
        }
    }
    if (out) *out = std::move(y);
}

TEST(Matmul, MatchesNaiveProduct) {
    ThreadPool pool(2);
    for (GgmlType t : kTypes) {
        for (int64_t m : {1, 3, 17, 64}) {
            for (int64_t n_out : {1, 7, 33, 100}) {
                check_matmul(pool, t, n_out, 512, m, 31 * static_cast<uint32_t>(m) + static_cast<uint32_t>(n_out));
            }
        }
    }
}

TEST(Matmul, LargeShapesAndThreadCountsAgree) {
    // Several row and m tiles, n_out not a multiple of any tile; results must not depend on threads.
    for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16}) {
        std::vector<float> y1;
        {
            ThreadPool pool(1);
            check_matmul(pool, t, 203, 1024, 130, 5, &y1);
        }
        for (int threads : {2, 3, 4}) {
            ThreadPool pool(threads);
            std::vector<float> y;
            check_matmul(pool, t, 203, 1024, 130, 5, &y);
            ASSERT_EQ(0, std::memcmp(y.data(), y1.data(), y.size() * sizeof(float))) << threads;
        }
    }
    ThreadPool pool(4);
    check_matmul(pool, GgmlType::Q6_K, 2049, 256, 1, 9);
    check_matmul(pool, GgmlType::Q4_0, 1000, 2048, 2, 10);
    // The other types (some without a 4-row kernel), over several tiles and threads.
    check_matmul(pool, GgmlType::Q5_K, 203, 1024, 130, 11);
    check_matmul(pool, GgmlType::Q5_0, 300, 800, 67, 12);
    check_matmul(pool, GgmlType::Q3_K, 129, 768, 5, 13);
    check_matmul(pool, GgmlType::Q2_K, 129, 768, 5, 14);
    check_matmul(pool, GgmlType::Q4_1, 300, 800, 67, 15);
    check_matmul(pool, GgmlType::Q5_1, 129, 96, 5, 16);
    check_matmul(pool, GgmlType::IQ4_NL, 300, 800, 3, 17);
    check_matmul(pool, GgmlType::IQ4_XS, 203, 1024, 130, 18);
    check_matmul(pool, GgmlType::MXFP4, 129, 800, 9, 19);
}

TEST(Matmul, IqTypesMatchNaiveProduct) {
    for (GgmlType t : {GgmlType::IQ3_S, GgmlType::IQ3_XXS, GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S,
                       GgmlType::IQ1_S, GgmlType::IQ1_M}) {
        std::vector<float> y1;
        {
            ThreadPool pool(1);
            check_matmul(pool, t, 1, 256, 1, 20);
            check_matmul(pool, t, 67, 768, 17, 21, &y1);
        }
        ThreadPool pool(3);
        std::vector<float> y;
        check_matmul(pool, t, 67, 768, 17, 21, &y);
        ASSERT_EQ(0, std::memcmp(y.data(), y1.data(), y.size() * sizeof(float))) << ggml_type_name(t);
    }
}

TEST(ThreadPool, CoversEveryIndexOnce) {
    for (int threads = 1; threads <= 4; ++threads) {
        ThreadPool pool(threads);
        EXPECT_EQ(pool.size(), threads);
        for (int64_t n : {0, 1, 2, 3, 5, 7, 16, 100, 1001, 12345}) {
            std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
            std::atomic<bool> bad_range{false};
            pool.parallel_for(n, [&](int64_t b, int64_t e) {
                if (b < 0 || e > n || b >= e) bad_range = true;
                for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
            });
            EXPECT_FALSE(bad_range.load());
            for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads=" << threads << " n=" << n;
        }
    }
}

TEST(ThreadPool, ManySmallJobsAndSleepingWorkers) {
    ThreadPool pool(3);
    std::atomic<int64_t> total{0};
    for (int rep = 0; rep < 20000; ++rep) {
        pool.parallel_for(8, [&](int64_t b, int64_t e) { total.fetch_add(e - b, std::memory_order_relaxed); });
    }
    EXPECT_EQ(total.load(), 8 * 20000);
    // Idle long enough for workers to go to sleep, then wake them.
    for (int rep = 0; rep < 5; ++rep) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        std::atomic<int64_t> sum{0};
        pool.parallel_for(1000, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) sum.fetch_add(i, std::memory_order_relaxed);
        });
        EXPECT_EQ(sum.load(), 999 * 1000 / 2);
    }
}

TEST(ThreadPool, DefaultSizeUsesHardwareThreads) {
    ThreadPool pool(0);
    EXPECT_GE(pool.size(), 1);
}

}  // namespace
}  // namespace moemesh
