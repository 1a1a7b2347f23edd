// The i-quant low-bit weight types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M): block
// layouts, dequantization against independent per-element decoders written from the format
// description, the fast-weights scale formula, and bit-exactness / agreement with llama.cpp's own
// ggml (dequantize_row_<t>, ggml_vec_dot_<t>_q8_K) on random blocks: moemesh has no quantizer for
// these types, and random index bits reach every grid entry, which checks the tables too.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"
#include "tests/ggml_ref.h"

namespace moemesh {
namespace {

using namespace quants;

const GgmlType kIqTypes[] = {GgmlType::IQ3_S, GgmlType::IQ3_XXS, GgmlType::IQ2_XXS, GgmlType::IQ2_XS,
                             GgmlType::IQ2_S, GgmlType::IQ1_S,   GgmlType::IQ1_M};

// Random block bytes with finite fp16 scales of either sign over 12 binades (d_fixed > 0: that d).
std::vector<uint8_t> random_iq_blocks(GgmlType t, int64_t n, uint32_t seed, float d_fixed = 0) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> q(ggml_row_bytes(t, n));
    for (auto& b : q) b = static_cast<uint8_t>(rng());
    const size_t bs = ggml_type_info(t).type_size;
    for (size_t off = 0; off < q.size(); off += bs) {
        const float d = d_fixed > 0 ? d_fixed
                                    : std::ldexp(1.0f + (rng() % 1000) / 1000.0f, static_cast<int>(rng() % 12) - 10) *
                                          ((rng() & 1) ? 1.0f : -1.0f);
        iq_set_block_scale(t, &q[off], fp32_to_fp16(d));
    }
    return q;
}

uint16_t u16_at(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
uint32_t u32_at(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
uint8_t grid_byte(const void* entry, int k) { return static_cast<const uint8_t*>(entry)[k]; }

// A 7-bit sign index names 8 signs: bits 0-6 for elements 0-6, element 7 negative when that makes
// the number of minus signs even (what ksigns_iq2xs tabulates).
bool sign7(uint32_t s7, int k) { return k < 7 ? (s7 >> k) & 1 : std::popcount(s7 & 127u) % 2 == 1; }

// ---- independent decoders: element e of a row, straight from the format description ----

// IQ2_XXS (66 B): d; per 32 elements 8 bytes: 4 grid indices (one per 8 elements), then a uint32 with
// four 7-bit sign indices and the scale s in bits 28-31; x = d·(0.5 + s)/4 · ±grid.
float decode_iq2_xxs(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 66;
    const int j = static_cast<int>(e % 256), ib = j / 32, l = (j % 32) / 8, k = j % 8;
    const uint8_t* w = blk + 2 + 8 * ib;
    const uint32_t hi = u32_at(w + 4);
    const int mag = grid_byte(&kIq2xxsGrid[w[l]], k);
    const float db = fp16_to_fp32(u16_at(blk)) * (0.5f + static_cast<int>(hi >> 28)) * 0.25f;
    return db * (sign7(hi >> (7 * l), k) ? -mag : mag);
}

// IQ3_S (110 B): d, qs[64], qh[8], signs[32], scales[4]. Element 32ib + 8l + k: grid entry
// qs[8ib + 2l + k/4] with 9th bit (2l + k/4) of qh[ib], its byte k%4; sign bit k of signs[4ib + l];
// scale s the nibble ib%2 of scales[ib/2]; x = d·(2s + 1) · ±grid.
float decode_iq3_s(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 110;
    const uint8_t *qs = blk + 2, *qh = blk + 66, *signs = blk + 74, *scales = blk + 106;
    const int j = static_cast<int>(e % 256), ib = j / 32, l = (j % 32) / 8, k = j % 8;
    const int idx = qs[8 * ib + 2 * l + k / 4] | (((qh[ib] >> (2 * l + k / 4)) & 1) << 8);
    const int mag = grid_byte(&kIq3sGrid[idx], k % 4);
    const int s = (scales[ib / 2] >> (4 * (ib % 2))) & 15;
    const bool neg = (signs[4 * ib + l] >> k) & 1;
    return fp16_to_fp32(u16_at(blk)) * static_cast<float>(2 * s + 1) * (neg ? -mag : mag);
}

// IQ1_M (56 B): qs[32], qh[16], scales[8]. Element 32ib + 8l + k: grid entry qs[4ib + l] | (bits 0-2
// of nibble l%2 of qh[2ib + l/2]) << 8, shift -1/8 if that nibble's bit 3 is set else +1/8; 3-bit
// scale s at bit 6(ib%2) + 3(l/2) of uint16 word ib/2 of scales; fp16 d from the words' top nibbles;
// x = d·(2s + 1)·(grid ± 1/8).
float decode_iq1_m(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 56;
    const int j = static_cast<int>(e % 256), ib = j / 32, l = (j % 32) / 8, k = j % 8;
    const int nib = (blk[32 + 2 * ib + l / 2] >> (4 * (l % 2))) & 15;
    const int idx = blk[4 * ib + l] | ((nib & 7) << 8);
    const auto g = static_cast<int8_t>(grid_byte(&kIq1sGrid[idx], k));
    uint16_t d16 = 0;
    for (int w = 0; w < 4; ++w) d16 = static_cast<uint16_t>(d16 | ((u16_at(blk + 48 + 2 * w) >> 12) << (4 * w)));
    const int s = (u16_at(blk + 48 + 2 * (ib / 2)) >> (6 * (ib % 2) + 3 * (l / 2))) & 7;
    const float dl = fp16_to_fp32(d16) * static_cast<float>(2 * s + 1);
    return dl * (g + (nib & 8 ? -0.125f : 0.125f));
}

TEST(QuantsIq, BlockLayoutsAreGgmls) {
    // ggml-common.h: block_iq2_xxs {d, qs[32] u16}, block_iq2_xs {d, qs[32] u16, scales[8]},
    // block_iq2_s {d, qs[64], qh[8], scales[8]}, block_iq3_xxs {d, qs[96]},
    // block_iq3_s {d, qs[64], qh[8], signs[32], scales[4]}, block_iq1_s {d, qs[32], qh[8] u16},
    // block_iq1_m {qs[32], qh[16], scales[8]}.
    EXPECT_EQ(offsetof(BlockIQ2_XXS, qs), 2u);
    EXPECT_EQ(offsetof(BlockIQ2_XS, scales), 66u);
    EXPECT_EQ(offsetof(BlockIQ2_S, qh), 66u);
    EXPECT_EQ(offsetof(BlockIQ2_S, scales), 74u);
    EXPECT_EQ(offsetof(BlockIQ3_XXS, qs), 2u);
    EXPECT_EQ(offsetof(BlockIQ3_S, qh), 66u);
    EXPECT_EQ(offsetof(BlockIQ3_S, signs), 74u);
    EXPECT_EQ(offsetof(BlockIQ3_S, scales), 106u);
    EXPECT_EQ(offsetof(BlockIQ1_S, qh), 34u);
    EXPECT_EQ(offsetof(BlockIQ1_M, qh), 32u);
    EXPECT_EQ(offsetof(BlockIQ1_M, scales), 48u);
    struct Geo {
        GgmlType t;
        uint32_t id;
        size_t bytes;
    };
    for (const Geo& g : {Geo{GgmlType::IQ2_XXS, 16, sizeof(BlockIQ2_XXS)}, Geo{GgmlType::IQ2_XS, 17, sizeof(BlockIQ2_XS)},
                         Geo{GgmlType::IQ3_XXS, 18, sizeof(BlockIQ3_XXS)}, Geo{GgmlType::IQ1_S, 19, sizeof(BlockIQ1_S)},
                         Geo{GgmlType::IQ3_S, 21, sizeof(BlockIQ3_S)}, Geo{GgmlType::IQ2_S, 22, sizeof(BlockIQ2_S)},
                         Geo{GgmlType::IQ1_M, 29, sizeof(BlockIQ1_M)}}) {
        const GgmlTypeInfo& info = ggml_type_info(g.t);
        EXPECT_EQ(static_cast<uint32_t>(g.t), g.id) << info.name;
        EXPECT_EQ(info.block_size, 256) << info.name;
        EXPECT_EQ(info.type_size, g.bytes) << info.name;
        EXPECT_TRUE(info.computable) << info.name;
        EXPECT_TRUE(is_iq_lowbit(g.t)) << info.name;
        const TypeKernels* kt = type_kernels(g.t);
        ASSERT_NE(kt, nullptr) << info.name;
        EXPECT_EQ(kt->act_type, GgmlType::Q8_K) << info.name;
        EXPECT_EQ(kt->block, 256) << info.name;
        ASSERT_NE(type_kernels(g.t, false), nullptr) << info.name;
    }
    EXPECT_FALSE(is_iq_lowbit(GgmlType::Q2_K));
}

// The sign table is what its description says: 7 bits as given, the 8th for even parity.
TEST(QuantsIq, SignTableHasEvenParity) {
    for (uint32_t s = 0; s < 128; ++s) {
        for (int k = 0; k < 8; ++k) ASSERT_EQ((kIqSigns[s] >> k) & 1, sign7(s, k) ? 1 : 0) << s << " bit " << k;
        ASSERT_EQ(std::popcount(static_cast<unsigned>(kIqSigns[s])) % 2, 0) << s;
    }
    for (int k = 0; k < 8; ++k) EXPECT_EQ(kIqMask[k], 1 << k);
}

TEST(QuantsIq, DequantizeMatchesIndependentDecoder) {
    const int64_t n = 2048;
    struct Case {
        GgmlType t;
        float (*decode)(const uint8_t*, int64_t);
    };
    for (const Case& c : {Case{GgmlType::IQ2_XXS, decode_iq2_xxs}, Case{GgmlType::IQ3_S, decode_iq3_s},
                          Case{GgmlType::IQ1_M, decode_iq1_m}}) {
        for (uint32_t seed = 0; seed < 4; ++seed) {
            const std::vector<uint8_t> q = random_iq_blocks(c.t, n, seed);
            std::vector<float> y(n);
            dequantize_row(c.t, q.data(), y.data(), n);
            for (int64_t e = 0; e < n; ++e)
                ASSERT_EQ(fp32_to_bits(y[e]), fp32_to_bits(c.decode(q.data(), e))) << ggml_type_name(c.t) << " e=" << e;
        }
    }
}

// The scalar dot product is Σ dequantized(w)·dequantized(a) up to float rounding.
TEST(QuantsIq, DotProductMatchesDequantizedSum) {
    const int64_t k = 2048;
    std::mt19937 rng(3);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (GgmlType t : kIqTypes) {
        const std::vector<uint8_t> w = random_iq_blocks(t, k, 40 + static_cast<uint32_t>(t));
        std::vector<float> x(k), wd(k), ad(k);
        for (auto& v : x) v = dist(rng);
        std::vector<BlockQ8_K> a(k / 256);
        quantize_act_q8_K_scalar(x.data(), a.data(), k);
        dequantize_row(t, w.data(), wd.data(), k);
        for (int64_t i = 0; i < k; ++i) ad[i] = a[i / 256].d * a[i / 256].qs[i % 256];
        double want = 0, abs_sum = 0;
        for (int64_t i = 0; i < k; ++i) {
            want += static_cast<double>(wd[i]) * ad[i];
            abs_sum += std::fabs(static_cast<double>(wd[i]) * ad[i]);
        }
        const TypeKernels* scalar = type_kernels(t, false);
        const TypeKernels* simd = type_kernels(t, true);
        const float got = scalar->vec_dot(k, w.data(), a.data());
        EXPECT_NEAR(got, want, 1e-5 * abs_sum) << ggml_type_name(t);
        // The SIMD table's activations are bit-identical to the scalar ones; its dot (AVX2 where the CPU
        // has it) sums in another float order.
        std::vector<BlockQ8_K> a2(k / 256);
        simd->quantize_act(x.data(), a2.data(), k);
        EXPECT_EQ(0, std::memcmp(a.data(), a2.data(), a.size() * sizeof(BlockQ8_K))) << ggml_type_name(t);
        EXPECT_NEAR(simd->vec_dot(k, w.data(), a2.data()), want, 1e-5 * abs_sum) << ggml_type_name(t);
    }
}

// make-model --fast-weights draws random block bytes with d = σ / sqrt(iq_unit_mean_square): the
// formula (from the grid tables) is the mean square of what such blocks decode to.
TEST(QuantsIq, UnitMeanSquareIsTheDecodedOne) {
    const int64_t n = 256 * 4096;
    for (GgmlType t : kIqTypes) {
        const std::vector<uint8_t> q = random_iq_blocks(t, n, 5, 1.0f);
        std::vector<float> y(n);
        dequantize_row(t, q.data(), y.data(), n);
        double sum2 = 0;
        for (float v : y) sum2 += static_cast<double>(v) * v;
        EXPECT_NEAR(sum2 / n / iq_unit_mean_square(t), 1.0, 0.02) << ggml_type_name(t);
    }
}

TEST(QuantsIq, QuantizeRowRefusesIqTypes) {
    // No quantizer: a broken invariant (callers check first), not a silent garbage row.
    std::vector<float> x(256, 1.0f);
    std::vector<uint8_t> out(ggml_row_bytes(GgmlType::IQ3_S, 256));
    EXPECT_DEATH(quantize_row(GgmlType::IQ3_S, x.data(), out.data(), 256), "no quantizer");
}

// ---- llama.cpp's own ggml, where the node-llama-cpp reference install has it ----

using testing::GgmlLib;
using testing::ggml_lib;

TEST(GgmlCrossCheck, IqDequantizeIsBitExact) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml (tests/ref node-llama-cpp, haswell build) not available";
    for (GgmlType t : kIqTypes) {
        const std::string name = std::string("dequantize_row_") + ggml_type_name(t);
        auto dequant = lib->sym<GgmlLib::DequantFn>(name);
        ASSERT_TRUE(dequant) << name;
        for (uint32_t seed = 0; seed < 6; ++seed) {
            const int64_t n = 256 * 64;  // 64 blocks: every grid index (≤ 2048 entries) many times over
            const std::vector<uint8_t> q = random_iq_blocks(t, n, 100 + seed);
            std::vector<float> ours(n), theirs(n);
            dequantize_row(t, q.data(), ours.data(), n);
            dequant(q.data(), theirs.data(), n);
            ASSERT_EQ(0, std::memcmp(ours.data(), theirs.data(), n * sizeof(float))) << name << " seed=" << seed;
        }
    }
}

TEST(GgmlCrossCheck, IqDotProductsAgree) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml not available";
    for (GgmlType t : kIqTypes) {
        const std::string name = std::string("ggml_vec_dot_") + ggml_type_name(t) + "_q8_K";
        auto dot = lib->sym<GgmlLib::DotFn>(name);
        ASSERT_TRUE(dot) << name;
        // Both our scalar reference and, where the CPU has AVX2 (ggml_lib() requires it), our AVX2 kernel.
        const TypeKernels* scalar = type_kernels(t, false);
        const TypeKernels* simd = type_kernels(t, true);
        if (cpu_has_avx2()) {
            ASSERT_NE(simd->vec_dot, scalar->vec_dot) << name << ": no AVX2 kernel";
        }
        for (int64_t k : {256, 2048, 4096}) {
            const std::vector<uint8_t> w = random_iq_blocks(t, k, static_cast<uint32_t>(k) + 7);
            std::mt19937 rng(static_cast<uint32_t>(k));
            std::normal_distribution<float> dist(0.0f, 1.0f);
            std::vector<float> x(k), wd(k);
            for (auto& v : x) v = dist(rng);
            std::vector<uint8_t> a(ggml_row_bytes(simd->act_type, k));
            simd->quantize_act(x.data(), a.data(), k);
            float theirs = 0;
            dot(static_cast<int>(k), &theirs, 0, w.data(), 0, a.data(), 0, 1);
            dequantize_row(t, w.data(), wd.data(), k);
            double abs_sum = 0;
            for (int64_t i = 0; i < k; ++i) abs_sum += std::fabs(wd[i] * x[i]);
            EXPECT_NEAR(scalar->vec_dot(k, w.data(), a.data()), theirs, 2e-6 * abs_sum) << name << " scalar k=" << k;
            const float ours = simd->vec_dot(k, w.data(), a.data());
            EXPECT_NEAR(ours, theirs, 2e-6 * abs_sum) << name << " k=" << k;
            // Our AVX2 kernels keep ggml's integer lanes and float operation order: the same bits.
            if (simd != scalar) {
                EXPECT_EQ(ours, theirs) << name << " k=" << k << ": not bit-identical to ggml's AVX2";
            }
        }
    }
}

}  // namespace
}  // namespace moemesh
