// Weight types: quantize → dequantize error bounds, dequantization against independent per-element
// decoders written from the format description, activation quantizers (SIMD vs scalar).
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"
#include "tests/ggml_ref.h"

namespace moemesh {
namespace {

using quants::BlockQ2_K;
using quants::BlockQ3_K;
using quants::BlockQ4_0;
using quants::BlockQ4_K;
using quants::BlockQ5_0;
using quants::BlockQ5_K;
using quants::BlockQ6_K;
using quants::BlockQ8_0;
using quants::BlockQ8_K;

const GgmlType kTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,   GgmlType::Q5_0,
                           GgmlType::Q4_0, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,   GgmlType::Q5_K,
                           GgmlType::Q6_K, GgmlType::Q4_1, GgmlType::Q5_1, GgmlType::IQ4_NL, GgmlType::IQ4_XS,
                           GgmlType::MXFP4};

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
    const Bound bounds[] = {{GgmlType::F32, 0.0},    {GgmlType::F16, 4e-4},   {GgmlType::BF16, 3e-3},
                            {GgmlType::Q8_0, 0.006}, {GgmlType::Q5_0, 0.06},  {GgmlType::Q4_0, 0.12},
                            {GgmlType::Q2_K, 0.34}, {GgmlType::Q3_K, 0.18}, {GgmlType::Q4_K, 0.085},
                            {GgmlType::Q5_K, 0.045}, {GgmlType::Q6_K, 0.025}, {GgmlType::Q4_1, 0.1},
                            {GgmlType::Q5_1, 0.05},  {GgmlType::IQ4_NL, 0.1}, {GgmlType::IQ4_XS, 0.1},
                            {GgmlType::MXFP4, 0.2}};
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
            float amax256 = 0;  // of the 256-element super-block
            for (int i = 0; i < 256; ++i) amax256 = std::max(amax256, std::fabs(x[(b / 8) * 256 + i]));
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
                    // Half a step (amax/16) everywhere except the clamped end (a full step).
                    case GgmlType::Q5_0:
                        tol = amax / 16.f * 1.01f + 17 * 0x1p-25f;
                        break;
                    // 2 and 3 bits per weight, sub-block scales (and Q2_K's mins) quantized against the
                    // super-block's largest: the error scales with the super-block's magnitude.
                    case GgmlType::Q2_K:
                        tol = 0.35f * amax256 + 1024 * 0x1p-25f;
                        break;
                    case GgmlType::Q3_K:
                        tol = 0.2f * amax256 + 1024 * 0x1p-25f;
                        break;
                    // Scale and min: half a step of (max - min)/15 (/31), plus the fp16 rounding of
                    // d (times q) and of the min.
                    case GgmlType::Q4_1:
                        tol = 2 * amax / 15.f * 0.51f + amax * 2e-3f + 32 * 0x1p-25f;
                        break;
                    case GgmlType::Q5_1:
                        tol = 2 * amax / 31.f * 0.51f + amax * 2e-3f + 64 * 0x1p-25f;
                        break;
                    // 16 non-linear levels: at worst half the widest gap (24 of 240 levels' span) or
                    // the clip at the positive end (113 vs 127).
                    case GgmlType::IQ4_NL:
                        tol = 0.2f * amax + 128 * 0x1p-25f;
                        break;
                    // A power-of-two scale with amax in [8, 16) scale units and levels ..., 4, 6, 8, 12
                    // (doubled): half the widest gap, or the clip above 12 units, up to amax/4.
                    case GgmlType::MXFP4:
                        tol = 0.25f * amax * 1.01f;
                        break;
                    // Plus 6-bit sub-block scales against the super-block's largest.
                    case GgmlType::IQ4_XS:
                        tol = 0.2f * amax256 + 4096 * 0x1p-25f;
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

float half_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

// Q5_0: d (fp16), qh (uint32, bit j = 5th bit of element j), qs (element j low nibble of qs[j],
// element j+16 high nibble of qs[j]); x = d·(q - 16).
float decode_q5_0(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 22;
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const int j = static_cast<int>(e % 32);
    const int lo = j < 16 ? (blk[6 + j] & 15) : (blk[6 + j - 16] >> 4);
    const int q = lo | (((qh >> j) & 1) << 4);
    return (q - 16) * half_at(blk);
}

// Q5_K: d, dmin (fp16), scales[12] (as Q4_K), qh[32], qs[128] (as Q4_K); element 64g + 32h + l has
// its 5th bit at bit 2g + h of qh[l]; x = d·scale·q - dmin·min.
float decode_q5_K(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 176;
    const int j = static_cast<int>(e % 256);
    const int group = j / 64, half = (j % 64) / 32, l = j % 32;
    const uint8_t byte = blk[48 + 32 * group + l];
    const int lo = half ? byte >> 4 : byte & 15;
    const int q = lo + 16 * ((blk[16 + l] >> (2 * group + half)) & 1);
    int sc, mn;
    q4k_scale(blk + 4, j / 32, &sc, &mn);
    const float d1 = half_at(blk) * sc;
    const float m1 = half_at(blk + 2) * mn;
    return d1 * q - m1;
}

// Q3_K: hmask[32], qs[64], scales[12], d (fp16). Element 128c + 32s + l: low 2 bits at bits 2s of
// qs[32c + l], high bit at bit 4c + s of hmask[l] (clear: minus 4); 6-bit scale g = e/16 has its low
// nibble in scales[g % 8] (low half for g < 8, high half else) and its top 2 bits at bits 2·(g/4) of
// scales[8 + g % 4]; x = d·(scale - 32)·q.
float decode_q3_K(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 110;
    const uint8_t* hmask = blk;
    const uint8_t* qs = blk + 32;
    const uint8_t* scales = blk + 96;
    const int j = static_cast<int>(e % 256);
    const int c = j / 128, s = (j % 128) / 32, l = j % 32;
    const int low = (qs[32 * c + l] >> (2 * s)) & 3;
    const int q = low - (((hmask[l] >> (4 * c + s)) & 1) ? 0 : 4);
    const int g = j / 16;
    int sc = g < 8 ? scales[g] & 15 : scales[g - 8] >> 4;
    sc |= ((scales[8 + g % 4] >> (2 * (g / 4))) & 3) << 4;
    return (half_at(blk + 108) * (sc - 32)) * q;
}

// Q2_K: scales[16] (low nibble scale, high nibble min per 16 elements), qs[64] (as Q3_K's), d, dmin.
float decode_q2_K(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 84;
    const int j = static_cast<int>(e % 256);
    const int c = j / 128, s = (j % 128) / 32, l = j % 32;
    const int q = (blk[16 + 32 * c + l] >> (2 * s)) & 3;
    const uint8_t sc = blk[j / 16];
    const float dl = half_at(blk + 80) * (sc & 15);
    const float ml = half_at(blk + 82) * (sc >> 4);
    return dl * q - ml;
}

// Q4_1: d, m (fp16), qs (element j low nibble of qs[j], element j+16 high nibble); x = d·q + m.
float decode_q4_1(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 20;
    const int j = static_cast<int>(e % 32);
    const int q = j < 16 ? (blk[4 + j] & 15) : (blk[4 + j - 16] >> 4);
    return q * half_at(blk) + half_at(blk + 2);
}

// Q5_1: d, m (fp16), qh (uint32, bit j = 5th bit of element j), qs as Q4_1's; x = d·q + m.
float decode_q5_1(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 24;
    uint32_t qh;
    std::memcpy(&qh, blk + 4, 4);
    const int j = static_cast<int>(e % 32);
    const int lo = j < 16 ? (blk[8 + j] & 15) : (blk[8 + j - 16] >> 4);
    return (lo | (((qh >> j) & 1) << 4)) * half_at(blk) + half_at(blk + 2);
}

// The IQ4 levels, written out again from ggml's kvalues_iq4nl.
constexpr int kIQ4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_NL: d (fp16), qs as Q4_0's; x = d·level[q].
float decode_iq4_nl(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 18;
    const int j = static_cast<int>(e % 32);
    const int q = j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4);
    return half_at(blk) * kIQ4Levels[q];
}

// IQ4_XS: d (fp16), scales_h (uint16: bits 2s..2s+1 = top bits of sub-block s's 6-bit scale),
// scales_l[4] (nibble s%2 of byte s/2 = its low bits), qs[128] (16 bytes per 32-element sub-block, as
// IQ4_NL's); x = d·(scale - 32)·level[q].
float decode_iq4_xs(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 256) * 136;
    const int j = static_cast<int>(e % 256);
    const int s = j / 32, l = j % 32;
    uint16_t sh;
    std::memcpy(&sh, blk + 2, 2);
    const int scale = ((blk[4 + s / 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4);
    const uint8_t byte = blk[8 + 16 * s + l % 16];
    const int q = l < 16 ? byte & 15 : byte >> 4;
    return (half_at(blk) * static_cast<float>(scale - 32)) * kIQ4Levels[q];
}

// MXFP4: e (E8M0: 2^(e-127)), qs as Q4_0's holding OCP E2M1 codes (sign, 2 exponent bits, 1 mantissa
// bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6); x = 2^(e-127)·E2M1(q). Decoded from the format, not ggml's table.
float decode_mxfp4(const uint8_t* row, int64_t e) {
    const uint8_t* blk = row + (e / 32) * 17;
    const int j = static_cast<int>(e % 32);
    const int c = j < 16 ? (blk[1 + j] & 15) : (blk[1 + j - 16] >> 4);
    const int exp = (c >> 1) & 3, man = c & 1;
    const float mag = exp == 0 ? 0.5f * man : std::ldexp(1.0f + 0.5f * man, exp - 1);
    if (mag == 0.0f) return 0.0f;  // E2M1's -0 (code 8) decodes as +0, as ggml's table has it
    return std::ldexp(c & 8 ? -mag : mag, blk[0] - 127);
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
            case GgmlType::Q5_0:
            case GgmlType::IQ4_NL:
            case GgmlType::IQ4_XS:
                set_half(off);
                break;
            case GgmlType::Q4_1:
            case GgmlType::Q5_1:
            case GgmlType::Q4_K:
            case GgmlType::Q5_K:
                set_half(off);
                set_half(off + 2);
                break;
            case GgmlType::Q3_K:
                set_half(off + 108);
                break;
            case GgmlType::Q2_K:
                set_half(off + 80);
                set_half(off + 82);
                break;
            case GgmlType::Q6_K:
                set_half(off + 208);
                break;
            case GgmlType::MXFP4:  // scales 2^-9 .. 2^6, and now and then the subnormal ones
                q[off] = static_cast<uint8_t>(rng() % 8 == 0 ? rng() % 2 : 118 + rng() % 16);
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
                          {GgmlType::Q6_K, decode_q6_K},
                          {GgmlType::Q5_0, decode_q5_0},
                          {GgmlType::Q4_1, decode_q4_1},
                          {GgmlType::Q5_1, decode_q5_1},
                          {GgmlType::IQ4_NL, decode_iq4_nl},
                          {GgmlType::IQ4_XS, decode_iq4_xs},
                          {GgmlType::MXFP4, decode_mxfp4},
                          {GgmlType::Q5_K, decode_q5_K},
                          {GgmlType::Q3_K, decode_q3_K},
                          {GgmlType::Q2_K, decode_q2_K}};
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

TEST(Quants, LowBitBlockLayoutsAreGgmls) {
    // ggml-common.h: block_q5_0 {d, qh[4], qs[16]}, block_q5_K {d, dmin, scales[12], qh[32], qs[128]},
    // block_q3_K {hmask[32], qs[64], scales[12], d}, block_q2_K {scales[16], qs[64], d, dmin}.
    EXPECT_EQ(sizeof(BlockQ5_0), 22u);
    EXPECT_EQ(offsetof(BlockQ5_0, qh), 2u);
    EXPECT_EQ(offsetof(BlockQ5_0, qs), 6u);
    EXPECT_EQ(sizeof(BlockQ5_K), 176u);
    EXPECT_EQ(offsetof(BlockQ5_K, dmin), 2u);
    EXPECT_EQ(offsetof(BlockQ5_K, scales), 4u);
    EXPECT_EQ(offsetof(BlockQ5_K, qh), 16u);
    EXPECT_EQ(offsetof(BlockQ5_K, qs), 48u);
    EXPECT_EQ(sizeof(BlockQ3_K), 110u);
    EXPECT_EQ(offsetof(BlockQ3_K, qs), 32u);
    EXPECT_EQ(offsetof(BlockQ3_K, scales), 96u);
    EXPECT_EQ(offsetof(BlockQ3_K, d), 108u);
    EXPECT_EQ(sizeof(BlockQ2_K), 84u);
    EXPECT_EQ(offsetof(BlockQ2_K, qs), 16u);
    EXPECT_EQ(offsetof(BlockQ2_K, d), 80u);
    EXPECT_EQ(offsetof(BlockQ2_K, dmin), 82u);
    struct Geo {
        GgmlType t;
        int64_t block;
        size_t bytes;
    };
    for (const Geo& g : {Geo{GgmlType::Q5_0, 32, sizeof(BlockQ5_0)}, Geo{GgmlType::Q5_K, 256, sizeof(BlockQ5_K)},
                         Geo{GgmlType::Q3_K, 256, sizeof(BlockQ3_K)}, Geo{GgmlType::Q2_K, 256, sizeof(BlockQ2_K)}}) {
        const GgmlTypeInfo& info = ggml_type_info(g.t);
        EXPECT_EQ(info.block_size, g.block) << info.name;
        EXPECT_EQ(info.type_size, g.bytes) << info.name;
        EXPECT_TRUE(info.computable) << info.name;
        EXPECT_EQ(ggml_row_bytes(g.t, 2048), 2048 / g.block * g.bytes);
    }
    EXPECT_EQ(static_cast<int>(GgmlType::Q5_0), 6);
    EXPECT_EQ(static_cast<int>(GgmlType::Q2_K), 10);
    EXPECT_EQ(static_cast<int>(GgmlType::Q3_K), 11);
    EXPECT_EQ(static_cast<int>(GgmlType::Q5_K), 13);
}

TEST(Quants, Q5_0QuantizerHandCase) {
    // x_j = j - 16: amax 16 at x_0 = -16, so d = -16/-16 = 1 and q_j = trunc(x_j + 16.5) = j exactly.
    std::vector<float> x(32);
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);
    BlockQ5_0 b;
    quantize_row(GgmlType::Q5_0, x.data(), &b, 32);
    EXPECT_EQ(b.d, 0x3C00);  // fp16 1.0
    for (int j = 0; j < 16; ++j) EXPECT_EQ(b.qs[j], 0x11 * j) << j;  // q_j = j, q_{j+16} = j + 16 → nibble j
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    EXPECT_EQ(qh, 0xFFFF0000u);  // the 5th bit: set exactly for elements 16..31
    std::vector<float> y(32);
    dequantize_row(GgmlType::Q5_0, &b, y.data(), 32);
    EXPECT_EQ(y, x);
}

TEST(Quants, Q5_KQuantizerHandCase) {
    // Every 32-element sub-block is 0, 0.5, ..., 15.5: min 0, scale 0.5, L_l = l with zero error (no
    // refinement step can beat it). Then max_scale = 0.5 → every 6-bit scale is 63, every min 0,
    // d = fp16(0.5/63), dmin = 0, and the re-quantization against the fp16 d still gives L_l = l.
    std::vector<float> x(256);
    for (int i = 0; i < 256; ++i) x[i] = 0.5f * (i % 32);
    BlockQ5_K b;
    quantize_row(GgmlType::Q5_K, x.data(), &b, 256);
    EXPECT_EQ(b.d, fp32_to_fp16(0.5f / 63.f));
    EXPECT_EQ(b.dmin, 0);
    // Scales 0-3 in bytes 0-3 (63) plus the top bits of scales 4-7 (3 << 6); mins all 0; bytes 8-11
    // the low nibbles of scales 4-7 (15) and mins 4-7 (0).
    const uint8_t want_scales[12] = {0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0x0F, 0x0F, 0x0F, 0x0F};
    for (int i = 0; i < 12; ++i) EXPECT_EQ(b.scales[i], want_scales[i]) << i;
    for (int l = 0; l < 32; ++l) EXPECT_EQ(b.qh[l], l < 16 ? 0x00 : 0xFF) << l;  // 5th bit of l, all 8 halves
    for (int i = 0; i < 128; ++i) EXPECT_EQ(b.qs[i], 0x11 * (i % 16)) << i;      // low nibbles of l, both halves
    std::vector<float> y(256);
    dequantize_row(GgmlType::Q5_K, &b, y.data(), 256);
    const float step = fp16_to_fp32(b.d) * 63;
    for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], step * (i % 32)) << i;
}

TEST(Quants, Q3_KAndQ2_KQuantizerHandCase) {
    // Q3_K, first 16-element group 4, -3, 2, 0, ...: amax 4 at +4, so iscale = -4/4 and the levels are
    // l = -x exactly (no clamping); the weighted fit Σx³l / Σx²l² is exactly -1 (the refinement only
    // runs for a positive Σ w·x·l). Every other group is zero (scale 0). So max_scale = -1, iscale = 32,
    // the group's 6-bit scale is clamp(-32) + 32 = 0, i.e. -32 once unpacked, the others 32 (0), and
    // d = fp16(1/32) exactly: d·scale = -1 and the stored levels are -x + 4.
    std::vector<float> x(256, 0.0f);
    x[0] = 4.0f;
    x[1] = -3.0f;
    x[2] = 2.0f;
    BlockQ3_K b3;
    quantize_row(GgmlType::Q3_K, x.data(), &b3, 256);
    EXPECT_EQ(fp16_to_fp32(b3.d), 1.0f / 32);
    int8_t sc[16];
    quants::q3k_unpack_scales(b3.scales, sc);
    EXPECT_EQ(sc[0], -32);
    for (int g = 1; g < 16; ++g) EXPECT_EQ(sc[g], 0) << g;
    EXPECT_EQ(b3.qs[0] & 3, 0);                 // level 0 - 4 = -4 → x = 4
    EXPECT_EQ(b3.hmask[0] & 1, 0);
    EXPECT_EQ(b3.qs[1] & 3, 3);                 // level 7 - 4 = 3 → x = -3
    EXPECT_EQ(b3.hmask[1] & 1, 1);
    EXPECT_EQ(b3.qs[2] & 3, 2);                 // level 2 - 4 = -2 → x = 2
    EXPECT_EQ(b3.hmask[2] & 1, 0);
    std::vector<float> y(256);
    dequantize_row(GgmlType::Q3_K, &b3, y.data(), 256);
    EXPECT_EQ(y[0], 4.0f);
    EXPECT_EQ(y[1], -3.0f);
    EXPECT_EQ(y[2], 2.0f);
    for (int i = 3; i < 256; ++i) EXPECT_EQ(y[i], 0.0f) << i;

    // Q2_K, values 0, 1, 2, 3 repeated: min 0, scale 1 in every group, exact. Scales 15 (d = 1/15),
    // mins 0 (dmin 0); element 128c + 32s + l at bits 2s of qs[32c + l].
    for (int i = 0; i < 256; ++i) x[i] = static_cast<float>(i % 4);
    BlockQ2_K b2;
    quantize_row(GgmlType::Q2_K, x.data(), &b2, 256);
    EXPECT_EQ(b2.d, fp32_to_fp16(1.0f / 15));
    EXPECT_EQ(b2.dmin, 0);
    for (int g = 0; g < 16; ++g) EXPECT_EQ(b2.scales[g], 15) << g;
    for (int i = 0; i < 64; ++i) {
        const int l = i % 32;
        EXPECT_EQ(b2.qs[i], (l % 4) * 0x55) << i;  // the same level in all four 2-bit fields
    }
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

using testing::GgmlLib;
using testing::ggml_lib;

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
                          {GgmlType::Q6_K, "quantize_row_q6_K_ref", "dequantize_row_q6_K"},
                          {GgmlType::Q5_0, "quantize_row_q5_0_ref", "dequantize_row_q5_0"},
                          {GgmlType::Q5_K, "quantize_row_q5_K_ref", "dequantize_row_q5_K"},
                          {GgmlType::Q3_K, "quantize_row_q3_K_ref", "dequantize_row_q3_K"},
                          {GgmlType::Q2_K, "quantize_row_q2_K_ref", "dequantize_row_q2_K"},
                          {GgmlType::Q4_1, "quantize_row_q4_1_ref", "dequantize_row_q4_1"},
                          {GgmlType::Q5_1, "quantize_row_q5_1_ref", "dequantize_row_q5_1"},
                          {GgmlType::IQ4_XS, "quantize_row_iq4_xs_ref", "dequantize_row_iq4_xs"},
                          {GgmlType::MXFP4, "quantize_row_mxfp4_ref", "dequantize_row_mxfp4"}};
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
    auto q8_1 = lib->sym<GgmlLib::QuantFn>("quantize_row_q8_1");
    ASSERT_TRUE(q8_0 && q8_K && q8_1);
    for (uint32_t seed = 0; seed < 6; ++seed) {
        const int64_t n = 2560;
        const std::vector<float> x = seed % 2 ? awkward_row(n, seed) : random_normal(n, seed, 0.5f + seed);
        std::vector<BlockQ8_0> a0(n / 32), b0(n / 32), c0(n / 32);
        quants::quantize_act_q8_0_scalar(x.data(), a0.data(), n);
        q8_0(x.data(), b0.data(), n);
        ASSERT_EQ(0, std::memcmp(a0.data(), b0.data(), a0.size() * sizeof(BlockQ8_0))) << seed;
        quants::avx2::quantize_act_q8_0(x.data(), c0.data(), n);
        ASSERT_EQ(0, std::memcmp(c0.data(), b0.data(), c0.size() * sizeof(BlockQ8_0))) << seed;
        std::vector<quants::BlockQ8_1> a1(n / 32), b1(n / 32), c1(n / 32);
        quants::quantize_act_q8_1_scalar(x.data(), a1.data(), n);
        q8_1(x.data(), b1.data(), n);
        ASSERT_EQ(0, std::memcmp(a1.data(), b1.data(), a1.size() * sizeof(quants::BlockQ8_1))) << seed;
        quants::avx2::quantize_act_q8_1(x.data(), c1.data(), n);
        ASSERT_EQ(0, std::memcmp(c1.data(), b1.data(), c1.size() * sizeof(quants::BlockQ8_1))) << seed;
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
                          {GgmlType::F16, "ggml_vec_dot_f16"},        {GgmlType::BF16, "ggml_vec_dot_bf16"},
                          {GgmlType::Q5_0, "ggml_vec_dot_q5_0_q8_0"}, {GgmlType::Q5_K, "ggml_vec_dot_q5_K_q8_K"},
                          {GgmlType::Q3_K, "ggml_vec_dot_q3_K_q8_K"}, {GgmlType::Q2_K, "ggml_vec_dot_q2_K_q8_K"},
                          {GgmlType::Q4_1, "ggml_vec_dot_q4_1_q8_1"}, {GgmlType::Q5_1, "ggml_vec_dot_q5_1_q8_1"},
                          {GgmlType::IQ4_NL, "ggml_vec_dot_iq4_nl_q8_0"}, {GgmlType::IQ4_XS, "ggml_vec_dot_iq4_xs_q8_K"},
                          {GgmlType::MXFP4, "ggml_vec_dot_mxfp4_q8_0"}};
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

// Q4_0, IQ4_NL and MXFP4 are computed with the arithmetic of llama.cpp's repacked AVX2 kernels
// (quants_avx2_r8.cpp). Repack the same weights as llama.cpp's make_block_*x8 does, call its
// ggml_gemv_*_8x8_q8_0 (1 activation row) and ggml_gemm_*_8x8_q8_0 (4 rows, quantized by its
// ggml_quantize_mat_q8_0_4x8) and compare bits with our 8-row kernels and one-row dot.
TEST(GgmlCrossCheck, EightRowKernelsMatchLlamaCppRepackedBitForBit) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml not available";
    if (!quants::cpu_has_avx2()) GTEST_SKIP() << "no AVX2";
    using GemFn = void (*)(int, float*, size_t, const void*, const void*, int, int);
    using QuantMatFn = void (*)(const float*, void*, int64_t);
    auto quant4 = lib->sym<QuantMatFn>("ggml_quantize_mat_q8_0_4x8");
    ASSERT_TRUE(quant4);
    struct Case {
        GgmlType t;
        const char* name;
        size_t scale_bytes;  // per block: fp16 d (2) or E8M0 e (1)
        bool xor88;          // Q4_0's nibbles are stored offset by 8 in the repacked layout
    };
    for (const Case c : {Case{GgmlType::Q4_0, "q4_0", 2, true}, Case{GgmlType::IQ4_NL, "iq4_nl", 2, false},
                         Case{GgmlType::MXFP4, "mxfp4", 1, false}}) {
        auto gemv = lib->sym<GemFn>(std::string("ggml_gemv_") + c.name + "_8x8_q8_0");
        auto gemm = lib->sym<GemFn>(std::string("ggml_gemm_") + c.name + "_8x8_q8_0");
        ASSERT_TRUE(gemv && gemm) << c.name;
        const quants::TypeKernels* kt = quants::type_kernels(c.t);
        ASSERT_TRUE(kt->vec_dot_r8 && kt->vec_dot_r8x4) << c.name;
        const size_t block_bytes = c.scale_bytes + 16;  // one row's block: scale, then 16 bytes of nibbles
        for (int64_t k : {256, 2048}) {
            const int nc = 16, nb = static_cast<int>(k / 32);
            const size_t row_bytes = ggml_row_bytes(c.t, k);
            std::vector<uint8_t> w(row_bytes * nc);
            for (int r = 0; r < nc; ++r) {
                const std::vector<float> wf = random_normal(k, 900 + r + static_cast<uint32_t>(k), 0.05f * (1 + r % 3));
                quantize_row(c.t, wf.data(), w.data() + r * row_bytes, k);
            }
            // make_block_*x8: the 8 rows' scales, then 8 bytes of nibbles from each row in turn.
            const size_t x8_bytes = 8 * c.scale_bytes + 128;
            std::vector<uint8_t> packed(x8_bytes * nb * (nc / 8));
            for (int g = 0; g < nc / 8; ++g)
                for (int b = 0; b < nb; ++b) {
                    uint8_t* out = packed.data() + (static_cast<size_t>(g) * nb + b) * x8_bytes;
                    for (int r = 0; r < 8; ++r) {
                        const uint8_t* blk = w.data() + (8 * g + r) * row_bytes + b * block_bytes;
                        std::memcpy(out + r * c.scale_bytes, blk, c.scale_bytes);
                    }
                    for (int i = 0; i < 16; ++i) {
                        const uint8_t* blk = w.data() + (8 * g + i % 8) * row_bytes + b * block_bytes;
                        for (int j = 0; j < 8; ++j)
                            out[8 * c.scale_bytes + 8 * i + j] = blk[c.scale_bytes + (i / 8) * 8 + j] ^ (c.xor88 ? 0x88 : 0);
                    }
                }
            const std::vector<float> x = random_normal(4 * k, 77 + static_cast<uint32_t>(k));
            const size_t a_stride = ggml_row_bytes(GgmlType::Q8_0, k);
            std::vector<uint8_t> a(4 * a_stride);
            for (int t = 0; t < 4; ++t) kt->quantize_act(x.data() + t * k, a.data() + t * a_stride, k);
            // One activation row: gemv.
            std::vector<float> theirs(nc), ours(8 * 4);
            gemv(static_cast<int>(k), theirs.data(), nc, packed.data(), a.data(), 1, nc);
            for (int g = 0; g < nc / 8; ++g) {
                kt->vec_dot_r8(k, w.data() + 8 * g * row_bytes, row_bytes, a.data(), a_stride, ours.data());
                for (int r = 0; r < 8; ++r) {
                    ASSERT_EQ(fp32_to_bits(ours[r]), fp32_to_bits(theirs[8 * g + r])) << c.name << " k=" << k << " row " << 8 * g + r;
                    const float one = kt->vec_dot(k, w.data() + (8 * g + r) * row_bytes, a.data());
                    ASSERT_EQ(fp32_to_bits(one), fp32_to_bits(theirs[8 * g + r])) << c.name << " one-row k=" << k;
                }
            }
            // Four activation rows: gemm on llama.cpp's own 4-row quantization.
            std::vector<uint8_t> a4(4 * a_stride);
            quant4(x.data(), a4.data(), k);
            for (int b = 0; b < nb; ++b)  // block_q8_0x4: 4 fp16 d, then 8 bytes of each row in turn
                for (int t = 0; t < 4; ++t) {
                    const uint8_t* blk = a4.data() + b * 136;
                    const uint8_t* ours_blk = a.data() + t * a_stride + b * 34;
                    ASSERT_EQ(0, std::memcmp(blk + 2 * t, ours_blk, 2)) << c.name << " activation scale, block " << b;
                    for (int i = t; i < 16; i += 4) {
                        ASSERT_EQ(0, std::memcmp(blk + 8 + 8 * i, ours_blk + 2 + (i / 4) * 8, 8)) << c.name;
                    }
                }
            std::vector<float> theirs4(4 * nc);
            gemm(static_cast<int>(k), theirs4.data(), nc, packed.data(), a4.data(), 4, nc);
            for (int g = 0; g < nc / 8; ++g) {
                kt->vec_dot_r8x4(k, w.data() + 8 * g * row_bytes, row_bytes, a.data(), a_stride, ours.data());
                for (int t = 0; t < 4; ++t)
                    for (int r = 0; r < 8; ++r)
                        ASSERT_EQ(fp32_to_bits(ours[8 * t + r]), fp32_to_bits(theirs4[t * nc + 8 * g + r]))
                            << c.name << " k=" << k << " token " << t << " row " << 8 * g + r;
            }
        }
    }
}

// IQ4_NL has two quantizers in ggml: llama-quantize's (quantize_iq4_nl, a search over 15 scales per
// block), which make-model uses, and quantize_row_iq4_nl_ref's one-shot scale.
TEST(GgmlCrossCheck, IQ4NLQuantizersAreBitExact) {
    GgmlLib* lib = ggml_lib();
    if (!lib) GTEST_SKIP() << "llama.cpp's ggml not available";
    using NRowFn = size_t (*)(const float*, void*, int64_t, int64_t, const float*);
    auto search = lib->sym<NRowFn>("quantize_iq4_nl");
    auto one_shot = lib->sym<GgmlLib::QuantFn>("quantize_row_iq4_nl_ref");
    ASSERT_TRUE(search && one_shot);
    for (uint32_t seed = 0; seed < 6; ++seed) {
        const int64_t n = 2560;
        const std::vector<float> x = seed % 2 ? awkward_row(n, seed) : random_normal(n, seed, 0.02f + seed);
        std::vector<quants::BlockIQ4_NL> ours(n / 32), theirs(n / 32);
        quantize_row(GgmlType::IQ4_NL, x.data(), ours.data(), n);
        search(x.data(), theirs.data(), 1, n, nullptr);
        ASSERT_EQ(0, std::memcmp(ours.data(), theirs.data(), ours.size() * sizeof(ours[0]))) << seed;
        // The one-shot path leaves a block of zeros' indices as they were (in ggml: uninitialized), so
        // only rows without one compare bytes.
        if (seed % 2) continue;
        quants::quantize_iq4_nl(x.data(), ours.data(), n, /*search=*/false);
        one_shot(x.data(), theirs.data(), n);
        ASSERT_EQ(0, std::memcmp(ours.data(), theirs.data(), ours.size() * sizeof(ours[0]))) << seed;
    }
}

}  // namespace
}  // namespace moemesh
