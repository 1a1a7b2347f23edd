// Weight types: quantize → dequantize error bounds, dequantization against independent per-element
// decoders written from the format description, activation quantizers (SIMD vs scalar).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

namespace moemesh {
namespace {

using quants::BlockQ4_0;
using quants::BlockQ4_K;
using quants::BlockQ6_K;
using quants::BlockQ8_0;
using quants::BlockQ8_K;

const GgmlType kTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,
                           GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K};

std::vector<float> random_normal(int64_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& f : v) f = dist(rng);
    return v;
}

// Rows that stress the quantizers: zeros, all-positive (Q4_K min clamps to 0), all-negative,
// a single outlier, tiny magnitudes.
std::vector<float> awkward_row(int64_t n, uint32_t seed) {
    std::vector<float> v = random_normal(n, seed);
    std::mt19937 rng(seed + 1);
    for (int64_t b = 0; b < n / 256; ++b) {
        float* p = v.data() + b * 256;
        switch (b % 5) {
            case 0:
                std::fill(p, p + 64, 0.0f);
                break;
            case 1:
                for (int i = 0; i < 256; ++i) p[i] = std::fabs(p[i]) + 0.5f;
                break;
            case 2:
                for (int i = 0; i < 256; ++i) p[i] = -std::fabs(p[i]) - 0.25f;
                break;
            case 3:
                p[rng() % 256] = 40.0f;
                break;
            case 4:
                for (int i = 0; i < 256; ++i) p[i] *= 1e-6f;
                break;
        }
    }
    return v;
}

double rel_rms_error(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(a[i]) * a[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> round_trip(GgmlType t, const std::vector<float>& x) {
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<uint8_t> q(ggml_row_bytes(t, n));
    EXPECT_EQ(quantize_row(t, x.data(), q.data(), n), q.size());
    std::vector<float> y(x.size());
    dequantize_row(t, q.data(), y.data(), n);
    return y;
}

TEST(Quants, RoundTripErrorWithinTypeBound) {
    // Relative RMS error for Gaussian data (ggml's test-quantize-fns uses similar magnitudes).
    struct Bound {
        GgmlType t;
        double max_rel_rms;
    };
    const Bound bounds[] = {{GgmlType::F32, 0.0},    {GgmlType::F16, 4e-4},  {GgmlType::BF16, 3e-3},
                            {GgmlType::Q8_0, 0.006}, {GgmlType::Q4_0, 0.12}, {GgmlType::Q4_K, 0.085},
                            {GgmlType::Q6_K, 0.025}};
    for (const Bound& b : bounds) {
        for (int64_t n : {256, 4096}) {
            const std::vector<float> x = random_normal(n, 1234 + static_cast<uint32_t>(n));
            const std::vector<float> y = round_trip(b.t, x);
            EXPECT_LE(rel_rms_error(x, y), b.max_rel_rms) << ggml_type_name(b.t) << " n=" << n;
        }
    }
}

TEST(Quants, ElementErrorBounds) {
    const std::vector<float> x = awkward_row(2560, 99);
    for (GgmlType t : kTypes) {
        const std::vector<float> y = round_trip(t, x);
        for (int64_t b = 0; b < 2560 / 32; ++b) {
            float amax = 0;
            for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[b * 32 + i]));
            for (int i = 0; i < 32; ++i) {
                const float xi = x[b * 32 + i], yi = y[b * 32 + i];
                float tol = 0;
                switch (t) {
                    case GgmlType::F32:
                        tol = 0;
                        break;
                    case GgmlType::F16:
                        tol = std::fabs(xi) * 0x1p-11f + 1e-7f;
                        break;  // incl. subnormals
                    case GgmlType::BF16:
                        tol = std::fabs(xi) * 0x1p-8f;
                        break;
                    // Plus the fp16 scale's absolute error in the subnormal range (2^-25) times |q|.
                    case GgmlType::Q8_0:
                        tol = amax / 127.f * 0.51f + amax * 1e-3f + 128 * 0x1p-25f;
                        break;
                    case GgmlType::Q4_0:
                        tol = amax / 8.f * 1.01f + 9 * 0x1p-25f;
                        break;
                    // K types: per-256 super-block scales, and d·scale·q with the fp16 d's subnormal error.
                    default:
                        tol = 0.35f * amax + 1024 * 0x1p-25f;
                        break;
                }
                ASSERT_LE(std::fabs(xi - yi), tol) << ggml_type_name(t) << " i=" << b * 32 + i << " x=" << xi;
            }
        }
    }
}

TEST(Quants, ZeroRowStaysZero) {
    const std::vector<float> x(512, 0.0f);
    for (GgmlType t : kTypes) {
        for (float v : round_trip(t, x)) ASSERT_EQ(v, 0.0f) << ggml_type_name(t);
    }
}

TEST(Quants, HalfConversionsRoundToNearestEven) {
    // 1 + 2^-11 is exactly half way between fp16 1.0 and 1 + 2^-10: ties to the even mantissa (1.0).
    EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3C00);
    EXPECT_EQ(fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3C02);
    EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f), 0x3F80);
    EXPECT_EQ(fp32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);
    const std::vector<float> x = {1.0f + 0x1p-11f, -2.5f, 65504.0f, 1e-8f};
    std::vector<uint16_t> h(4);
    quantize_row(GgmlType::F16, x.data(), h.data(), 4);
    EXPECT_EQ(h[0], 0x3C00);
    EXPECT_EQ(h[1], 0xC100);
    EXPECT_EQ(h[2], 0x7BFF);
}

// ---- independent decoders: element e of a row, straight from the block layout ----

float decode_q8_0(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 34;
    uint16_t d;
    std::memcpy(&d, blk, 2);
    return static_cast<int8_t>(blk[2 + e % 32]) * fp16_to_fp32(d);
}

float decode_q4_0(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 18;
    uint16_t d;
    std::memcpy(&d, blk, 2);
    const int j = static_cast<int>(e % 32);
    const int q = j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4);
    return (q - 8) * fp16_to_fp32(d);
}

// 6-bit scale / min of sub-block s from the 12 packed bytes: bytes 0-3 hold scales 0-3 (low 6 bits)
// and the top 2 bits of scales 4-7; bytes 4-7 the same for mins; bytes 8-11 the low nibbles of
// scales 4-7 (low half) and mins 4-7 (high half).
void q4k_scale(const uint8_t* s, int sb, int* sc, int* mn) {
    if (sb < 4) {
        *sc = s[sb] & 0x3F;
        *mn = s[sb + 4] & 0x3F;
    } else {
        *sc = (s[sb + 4] & 0x0F) | ((s[sb - 4] >> 6) << 4);
        *mn = (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4);
    }
}

float decode_q4_K(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 144;
    uint16_t d, dmin;
    std::memcpy(&d, blk, 2);
    std::memcpy(&dmin, blk + 2, 2);
    const int j = static_cast<int>(e % 256);
    const int group = j / 64, half = (j % 64) / 32, l = j % 32;
    const uint8_t byte = blk[16 + 32 * group + l];
    const int q = half ? byte >> 4 : byte & 15;
    int sc, mn;
    q4k_scale(blk + 4, j / 32, &sc, &mn);
    const float d1 = fp16_to_fp32(d) * sc;
    const float m1 = fp16_to_fp32(dmin) * mn;
    return d1 * q - m1;
}

float decode_q6_K(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
    uint16_t d;
    std::memcpy(&d, blk + 208, 2);
    const int j = static_cast<int>(e % 256);
    const int chunk = j / 128, quarter = (j % 128) / 32, l = j % 32;
    // quarter 0: low nibble of ql[l], 1: low nibble of ql[l+32], 2: high of ql[l], 3: high of ql[l+32];
    // high bits: bits 2*quarter of qh[l].
    const uint8_t lo_byte = ql[64 * chunk + l + (quarter & 1) * 32];
    const int lo = quarter < 2 ? lo_byte & 15 : lo_byte >> 4;
    const int hi = (qh[32 * chunk + l] >> (2 * quarter)) & 3;
    const int q = (lo | (hi << 4)) - 32;
    return fp16_to_fp32(d) * sc[j / 16] * q;
}

// Random block bytes with sane fp16 scales (no inf/NaN).
std::vector<uint8_t> random_blocks(GgmlType t, int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> q(ggml_row_bytes(t, n));
    for (auto& b : q) b = static_cast<uint8_t>(rng());
    auto set_half = [&](size_t off) {
        const uint16_t h = fp32_to_fp16(std::ldexp(1.0f + (rng() % 1000) / 1000.0f, static_cast<int>(rng() % 12) - 10) *
                                        ((rng() & 1) ? 1.0f : -1.0f));
        std::memcpy(&q[off], &h, 2);
    };
    const size_t bs = ggml_type_info(t).type_size;
    for (size_t off = 0; off < q.size(); off += bs) {
        switch (t) {
            case GgmlType::Q8_0:
            case GgmlType::Q4_0:
                set_half(off);
                break;
            case GgmlType::Q4_K:
                set_half(off);
                set_half(off + 2);
                break;
            case GgmlType::Q6_K:
                set_half(off + 208);
                break;
            default:
                break;
        }
    }
    return q;
}

TEST(Quants, DequantizeMatchesIndependentDecoder) {
    const int64_t n = 1024;
    struct Case {
        GgmlType t;
        float (*decode)(const uint8_t*, int64_t);
    };
    const Case cases[] = {{GgmlType::Q8_0, decode_q8_0},
                          {GgmlType::Q4_0, decode_q4_0},
                          {GgmlType::Q4_K, decode_q4_K},
                          {GgmlType::Q6_K, decode_q6_K}};
    for (const Case& c : cases) {
        for (uint32_t seed = 0; seed < 4; ++seed) {
            const std::vector<uint8_t> q = random_blocks(c.t, n, seed);
            std::vector<float> y(n);
            dequantize_row(c.t, q.data(), y.data(), n);
            for (int64_t e = 0; e < n; ++e) {
                const float want = c.decode(q.data(), e);
                ASSERT_EQ(fp32_to_bits(y[e]), fp32_to_bits(want)) << ggml_type_name(c.t) << " e=" << e;
            }
        }
    }
    // Float types: every fp16 / bf16 bit pattern.
    std::vector<uint16_t> all(65536);
    for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
    std::vector<float> y(65536);
    dequantize_row(GgmlType::F16, all.data(), y.data(), 65536);
    for (int i = 0; i < 65536; ++i) {
        if (std::isnan(y[i])) continue;
        // Exact: an fp16 value is a float with a shorter mantissa; rebuild it by hand.
        const int sign = i >> 15, exp = (i >> 10) & 31, man = i & 1023;
        float want = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
                              : (exp == 31 ? INFINITY : std::ldexp(static_cast<float>(man | 1024), exp - 25));
        if (sign) want = -want;
        ASSERT_EQ(y[i], want) << i;
    }
    dequantize_row(GgmlType::BF16, all.data(), y.data(), 65536);
    for (int i = 0; i < 65536; ++i) ASSERT_EQ(fp32_to_bits(y[i]), static_cast<uint32_t>(i) << 16);
}

TEST(Quants, Q4KScalePackingRoundTrips) {
    // Values that need all 6 bits of both scales and mins, in every sub-block position.
    std::vector<float> x(256);
    for (int sb = 0; sb < 8; ++sb) {
        for (int i = 0; i < 32; ++i) x[sb * 32 + i] = (sb + 1) * 0.37f * (i - 8) + (sb % 3) * 1.5f;
    }
    std::vector<float> y = round_trip(GgmlType::Q4_K, x);
    EXPECT_LE(rel_rms_error(x, y), 0.05);
}

TEST(Quants, ActivationQ8_0SimdMatchesScalar) {
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (int64_t n : {32, 256, 4096}) {
        std::vector<float> x = awkward_row(std::max<int64_t>(n, 256), static_cast<uint32_t>(n));
        x.resize(n);
        std::vector<BlockQ8_0> a(n / 32), b(n / 32);
        quants::quantize_act_q8_0_scalar(x.data(), a.data(), n);
        quants::avx2::quantize_act_q8_0(x.data(), b.data(), n);
        ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(BlockQ8_0)), 0) << n;
        std::vector<uint16_t> h1(n), h2(n);
        quants::quantize_act_f16_scalar(x.data(), h1.data(), n);
        quants::avx2::quantize_act_f16(x.data(), h2.data(), n);
        ASSERT_EQ(h1, h2);
    }
}

TEST(Quants, ActivationQ8_KSimdMatchesScalar) {
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    for (uint32_t seed = 0; seed < 8; ++seed) {
        const int64_t n = 2560;
        std::vector<float> x = seed % 2 ? awkward_row(n, seed) : random_normal(n, seed, 0.1f + seed);
        if (seed == 2) {
            // Equal magnitudes of both signs: the first one decides the sign of max.
            x[700] = 9.0f;
            x[600] = -9.0f;
            x[1100] = 5.0f;
            x[1030] = 5.0f;
            x[1031] = -5.0f;
        }
        if (seed == 4) {
            for (int i = 0; i < 256; ++i) x[512 + i] = (i % 7) * 0.5f - 1.5f;  // ties at iscale·x = k + 0.5
        }
        std::vector<BlockQ8_K> a(n / 256), b(n / 256);
        quants::quantize_act_q8_K_scalar(x.data(), a.data(), n);
        quants::avx2::quantize_act_q8_K(x.data(), b.data(), n);
        ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(BlockQ8_K)), 0) << seed;
    }
}

TEST(Quants, ActivationQ8_0RoundsHalfToEven) {
    // amax = 127 gives id = 1: x * id is x itself, so the ties are visible.
    std::vector<float> x(32, 0.0f);
    x[0] = 127.0f;
    x[1] = 2.5f;
    x[2] = -3.5f;
    x[3] = 0.5f;
    BlockQ8_0 b;
    quants::quantize_act_q8_0_scalar(x.data(), &b, 32);
    EXPECT_EQ(fp16_to_fp32(b.d), 1.0f);
    EXPECT_EQ(b.qs[0], 127);
    EXPECT_EQ(b.qs[1], 2);
    EXPECT_EQ(b.qs[2], -4);
    EXPECT_EQ(b.qs[3], 0);
}

TEST(Quants, ActivationQ8_KBlockSums) {
    const std::vector<float> x = awkward_row(1024, 5);
    std::vector<BlockQ8_K> a(4);
    quants::quantize_act_q8_K_scalar(x.data(), a.data(), 1024);
    for (int b = 0; b < 4; ++b) {
        for (int g = 0; g < 16; ++g) {
            int sum = 0;
            for (int i = 0; i < 16; ++i) sum += a[b].qs[g * 16 + i];
            ASSERT_EQ(sum, a[b].bsums[g]);
        }
        for (int i = 0; i < 256; ++i) {
            ASSERT_NEAR(a[b].qs[i] * a[b].d, x[b * 256 + i], std::fabs(a[b].d) * 0.5f + 1e-30f);
        }
    }
}

// ---- cross-check against llama.cpp's own ggml, where the node-llama-cpp reference install has it ----

struct GgmlLib {
    void* handle = nullptr;
    using QuantFn = void (*)(const float*, void*, int64_t);
    using DequantFn = void (*)(const void*, float*, int64_t);
    using DotFn = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
    template <class F>
    F sym(const char* name) {
        return reinterpret_cast<F>(dlsym(handle, name));
    }
};

GgmlLib* ggml_lib() {
    static GgmlLib lib = [] {
        GgmlLib l;
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("bmi2")) {
            return l;
        }
        const std::string path =
            std::string(MOEMESH_SOURCE_DIR) +
            "/tests/ref/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-cpu-haswell.so";
        l.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (l.handle) {
            if (auto init = l.sym<void (*)()>("ggml_cpu_init")) init();
        }
#endif
        return l;
    }();
    return lib.handle ? &lib : nullptr;
}

TEST(GgmlCrossCheck, ReferenceQuantizersAreBitExact) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml (tests/ref node-llama-cpp, haswell build) not available";
    struct Case {
        GgmlType t;
        const char* quant;
        const char* dequant;
    };
    const Case cases[] = {{GgmlType::Q8_0, "quantize_row_q8_0_ref", "dequantize_row_q8_0"},
                          {GgmlType::Q4_0, "quantize_row_q4_0_ref", "dequantize_row_q4_0"},
                          {GgmlType::Q4_K, "quantize_row_q4_K_ref", "dequantize_row_q4_K"},
                          {GgmlType::Q6_K, "quantize_row_q6_K_ref", "dequantize_row_q6_K"}};
    for (const Case& c : cases) {
        auto quant = lib->sym<GgmlLib::QuantFn>(c.quant);
        auto dequant = lib->sym<GgmlLib::DequantFn>(c.dequant);
        ASSERT_TRUE(quant && dequant) << c.quant;
        for (uint32_t seed = 0; seed < 6; ++seed) {
            const int64_t n = 2560;
            const std::vector<float> x = seed % 2 ? awkward_row(n, seed) : random_normal(n, seed, 0.02f + seed);
            std::vector<uint8_t> ours(ggml_row_bytes(c.t, n)), theirs(ours.size());
            quantize_row(c.t, x.data(), ours.data(), n);
            quant(x.data(), theirs.data(), n);
            ASSERT_EQ(ours, theirs) << ggml_type_name(c.t) << " seed=" << seed;

            const std::vector<uint8_t> q = random_blocks(c.t, n, seed);
            std::vector<float> y1(n), y2(n);
            dequantize_row(c.t, q.data(), y1.data(), n);
            dequant(q.data(), y2.data(), n);
            ASSERT_EQ(0, std::memcmp(y1.data(), y2.data(), n * sizeof(float))) << ggml_type_name(c.t);
        }
    }
}

TEST(GgmlCrossCheck, ActivationQuantizersAreBitExact) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml not available";
    auto q8_0 = lib->sym<GgmlLib::QuantFn>("quantize_row_q8_0");
    auto q8_K = lib->sym<GgmlLib::QuantFn>("quantize_row_q8_K");
    ASSERT_TRUE(q8_0 && q8_K);
    for (uint32_t seed = 0; seed < 6; ++seed) {
        const int64_t n = 2560;
        const std::vector<float> x = seed % 2 ? awkward_row(n, seed) : random_normal(n, seed, 0.5f + seed);
        std::vector<BlockQ8_0> a0(n / 32), b0(n / 32), c0(n / 32);
        quants::quantize_act_q8_0_scalar(x.data(), a0.data(), n);
        q8_0(x.data(), b0.data(), n);
        ASSERT_EQ(0, std::memcmp(a0.data(), b0.data(), a0.size() * sizeof(BlockQ8_0))) << seed;
        quants::avx2::quantize_act_q8_0(x.data(), c0.data(), n);
        ASSERT_EQ(0, std::memcmp(c0.data(), b0.data(), c0.size() * sizeof(BlockQ8_0))) << seed;
        std::vector<BlockQ8_K> aK(n / 256), bK(n / 256);
        quants::quantize_act_q8_K_scalar(x.data(), aK.data(), n);
        q8_K(x.data(), bK.data(), n);
        for (int64_t b = 0; b < n / 256; ++b) {
            ASSERT_EQ(aK[b].d, bK[b].d);
            ASSERT_EQ(0, std::memcmp(aK[b].qs, bK[b].qs, 256));
            if (aK[b].d != 0) {
                ASSERT_EQ(0, std::memcmp(aK[b].bsums, bK[b].bsums, sizeof(aK[b].bsums)));
            }
        }
    }
}

TEST(GgmlCrossCheck, DotProductsAgree) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml not available";
    struct Case {
        GgmlType t;
        const char* dot;
    };
    const Case cases[] = {{GgmlType::Q8_0, "ggml_vec_dot_q8_0_q8_0"}, {GgmlType::Q4_0, "ggml_vec_dot_q4_0_q8_0"},
                          {GgmlType::Q4_K, "ggml_vec_dot_q4_K_q8_K"}, {GgmlType::Q6_K, "ggml_vec_dot_q6_K_q8_K"},
                          {GgmlType::F16, "ggml_vec_dot_f16"},        {GgmlType::BF16, "ggml_vec_dot_bf16"}};
    for (const Case& c : cases) {
        auto dot = lib->sym<GgmlLib::DotFn>(c.dot);
        ASSERT_TRUE(dot) << c.dot;
        const quants::TypeKernels* kt = quants::type_kernels(c.t);
        for (int64_t k : {256, 2048, 4096}) {
            const std::vector<float> wf = random_normal(k, static_cast<uint32_t>(k), 0.05f);
            const std::vector<float> x = random_normal(k, static_cast<uint32_t>(k) + 1);
            std::vector<uint8_t> w(ggml_row_bytes(c.t, k)), a(ggml_row_bytes(kt->act_type, k));
            quantize_row(c.t, wf.data(), w.data(), k);
            kt->quantize_act(x.data(), a.data(), k);
            float theirs = 0;
            dot(static_cast<int>(k), &theirs, 0, w.data(), 0, a.data(), 0, 1);
            const float ours = kt->vec_dot(k, w.data(), a.data());
            double abs_sum = 0;
            std::vector<float> wd(k), xd(k);
            dequantize_row(c.t, w.data(), wd.data(), k);
            for (int64_t i = 0; i < k; ++i) abs_sum += std::fabs(wd[i] * x[i]);
            EXPECT_NEAR(ours, theirs, 2e-6 * abs_sum) << ggml_type_name(c.t) << " k=" << k;
        }
    }
}

}  // namespace
}  // namespace moemesh
