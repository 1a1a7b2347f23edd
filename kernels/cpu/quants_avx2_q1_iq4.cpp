// AVX2 row dot products of Q4_1, Q5_1 (against Q8_1 activations) and IQ4_XS (against Q8_K), and
// the Q8_1 activation quantizer, selected at run time by quants_dot.cpp's type_kernels. The
// arithmetic is that of ggml's x86 AVX2 kernels for these types (ggml-cpu arch/x86/quants.c): the
// same integer sums per block, accumulators and final reductions, except IQ4_XS's float step:
// one exact integer sum per 256-element super-block and row, then acc = fma(float(sum), d · d_a,
// acc) (as llama.cpp's repacked kernels do for Q4_0), so that the avx512vnni variant can keep one
// row per vector lane (decode_tile_iq4_xs: 16 rows, 8 on 256-bit CPUs) and give the same bits. IQ4_XS looks its 4-bit
// indices up in the 16 levels with one byte shuffle. (IQ4_NL and MXFP4: quants_avx2_r8.cpp.)
//
// Compiled for AVX2 through the target pragma, like quants_avx2.cpp (see the note there).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/quants_internal.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

namespace moemesh::quants::MM_SIMD_NS {
namespace {

// Σ pairs of u8 · s8 products as 8 floats (x unsigned, y signed).
inline __m256 mul_sum_us8_pairs_float(__m256i x, __m256i y) {
    const __m256i dot = _mm256_maddubs_epi16(x, y);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot));
}

// Pairs of s8 · s8 products as 16 int16 lanes (ggml's mul_add_epi8).
inline __m256i mul_add_i8(__m256i x, __m256i y) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

// 16 bytes of 4-bit indices → 32 signed levels (IQ4's or MXFP4's): low nibbles (elements 0..15), then high nibbles.
inline __m256i iq4_levels(const uint8_t* qs, __m128i values, __m128i m4) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i lo = _mm_shuffle_epi8(values, _mm_and_si128(bits, m4));
    const __m128i hi = _mm_shuffle_epi8(values, _mm_and_si128(_mm_srli_epi16(bits, 4), m4));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

// An IQ4_XS block's 8 sub-block scales minus 32 as int16: scale j = (nibble j of scales_l) | (bits
// 2j, 2j + 1 of scales_h) << 4. The high bits by a multiply that puts bits 2j, 2j + 1 of scales_h at
// the top of lane j (× 2^(14 - 2j)), then a shift.
inline __m128i iq4xs_scales(const BlockIQ4_XS& b) {
    uint32_t sl;
    std::memcpy(&sl, b.scales_l, 4);
    const __m128i v = _mm_cvtsi32_si128(static_cast<int>(sl));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i lo4 = _mm_unpacklo_epi8(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
    const __m128i top = _mm_mullo_epi16(_mm_set1_epi16(static_cast<short>(b.scales_h)),
                                        _mm_setr_epi16(1 << 14, 1 << 12, 1 << 10, 1 << 8, 1 << 6, 1 << 4, 1 << 2, 1));
    const __m128i hi2 = _mm_and_si128(_mm_srli_epi16(top, 10), _mm_set1_epi16(0x30));
    return _mm_sub_epi16(_mm_or_si128(_mm_cvtepu8_epi16(lo4), hi2), _mm_set1_epi16(32));
}


}  // namespace

float vec_dot_q4_1_q8_1(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        summs += h2f(x[i].m) * h2f(y[i].s);
        const __m256 d0d1 = _mm256_mul_ps(_mm256_set1_ps(h2f(x[i].d)), _mm256_set1_ps(h2f(y[i].d)));
        const __m256i qx = bytes_from_nibbles_32(x[i].qs);
        const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs));
        acc = _mm256_fmadd_ps(d0d1, mul_sum_us8_pairs_float(qx, qy), acc);
    }
    return hsum_ps(acc) + summs;
}

float vec_dot_q5_1_q8_1(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        const __m256 dx = _mm256_set1_ps(h2f(x[i].d));
        summs += h2f(x[i].m) * h2f(y[i].s);
        const __m256i qx = _mm256_or_si256(bytes_from_nibbles_32(x[i].qs),
                                           _mm256_and_si256(bytes_from_bits_32(x[i].qh), bit4));
        const __m256 dy = _mm256_set1_ps(h2f(y[i].d));
        const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs));
        acc = _mm256_fmadd_ps(mul_sum_us8_pairs_float(qx, qy), _mm256_mul_ps(dx, dy), acc);
    }
    return hsum_ps(acc) + summs;
}

float vec_dot_iq4_xs_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockIQ4_XS*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NLValues)));
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m128 acc = _mm_setzero_ps();
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* qs = x[i].qs;
        const int8_t* q8 = y[i].qs;
        const __m256i ls = _mm256_broadcastsi128_si256(iq4xs_scales(x[i]));
        __m256i sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int ib = 0; ib < kQK_K / 32; ib += 2, qs += 32, q8 += 64) {
            // Two sub-blocks' 32 bytes of indices: low nibbles (elements 0..15 of each), high ones.
            const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
            const __m256i lo = _mm256_shuffle_epi8(values, _mm256_and_si256(bits, m4));
            const __m256i hi = _mm256_shuffle_epi8(values, _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4));
            const __m256i q4b1 = _mm256_permute2x128_si256(lo, hi, 0x20);
            const __m256i q4b2 = _mm256_permute2x128_si256(lo, hi, 0x31);
            const __m256i q8b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
            const __m256i q8b2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32));
            sumi1 = madd_add(sumi1, mul_add_i8(q4b1, q8b1), _mm256_shuffle_epi8(ls, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * ib))));
            sumi2 = madd_add(sumi2, mul_add_i8(q4b2, q8b2),
                             _mm256_shuffle_epi8(ls, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * (ib + 1)))));
        }
        acc = fma_int(acc, hsum_epi32(_mm256_add_epi32(sumi1, sumi2)), h2f(x[i].d) * y[i].d);
    }
    return _mm_cvtss_f32(acc);
}

// ---- four activation rows per weight row (prompt processing): each row's arithmetic is exactly that
// of the one-row kernel above, the weight block is decoded once ----

#define MM_ROWS4(X) X(0) X(1) X(2) X(3)

namespace {

template <class Block>
const Block* row_ptr(const void* a, size_t a_stride, int r) {
    return reinterpret_cast<const Block*>(static_cast<const uint8_t*>(a) + r * a_stride);
}

// kQ5: Q5_1 (5th bit from qh), else Q4_1.
template <bool kQ5>
void dot_q_1_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    using Block = std::conditional_t<kQ5, BlockQ5_1, BlockQ4_1>;
    const auto* x = static_cast<const Block*>(w);
    const BlockQ8_1* y[4];
    for (int r = 0; r < 4; ++r) y[r] = row_ptr<BlockQ8_1>(a, a_stride, r);
    __m256 acc[4];
    float summs[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps(), summs[r] = 0;
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < n / 32; ++i) {
        const float xd = h2f(x[i].d), xm = h2f(x[i].m);
        __m256i qx = bytes_from_nibbles_32(x[i].qs);
        if constexpr (kQ5) qx = _mm256_or_si256(qx, _mm256_and_si256(bytes_from_bits_32(x[i].qh), _mm256_set1_epi8(0x10)));
#define MM_ROW(r)                                                                                          \
    {                                                                                                      \
        summs[r] += xm * h2f(y[r][i].s);                                                                   \
        const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].qs));               \
        const __m256 dxdy = _mm256_mul_ps(_mm256_set1_ps(xd), _mm256_set1_ps(h2f(y[r][i].d)));             \
        if constexpr (kQ5) {                                                                               \
            acc[r] = _mm256_fmadd_ps(mul_sum_us8_pairs_float(qx, qy), dxdy, acc[r]);                       \
        } else {                                                                                           \
            acc[r] = _mm256_fmadd_ps(dxdy, mul_sum_us8_pairs_float(qx, qy), acc[r]);                       \
        }                                                                                                  \
    }
        MM_ROWS4(MM_ROW)
#undef MM_ROW
    }
#define MM_OUT(r) out[r] = hsum_ps(acc[r]) + summs[r];
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

}  // namespace

void vec_dot_q4_1_q8_1_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_q_1_x4<false>(n, w, a, a_stride, out);
}

void vec_dot_q5_1_q8_1_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_q_1_x4<true>(n, w, a, a_stride, out);
}

void vec_dot_iq4_xs_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockIQ4_XS*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) y[r] = row_ptr<BlockQ8_K>(a, a_stride, r);
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NLValues)));
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m128 acc[4];
#define MM_INIT(r) acc[r] = _mm_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* qs = x[i].qs;
        const __m256i ls = _mm256_broadcastsi128_si256(iq4xs_scales(x[i]));
        __m256i sumi[4];  // integer sums per lane (the one-row kernel's, regrouped: the same exact sums)
#define MM_ZERO(r) sumi[r] = _mm256_setzero_si256();
        MM_ROWS4(MM_ZERO)
#undef MM_ZERO
        for (int ib = 0; ib < kQK_K / 32; ib += 2, qs += 32) {
            const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));  // as the one-row kernel
            const __m256i lo = _mm256_shuffle_epi8(values, _mm256_and_si256(bits, m4));
            const __m256i hi = _mm256_shuffle_epi8(values, _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4));
            const __m256i q4b1 = _mm256_permute2x128_si256(lo, hi, 0x20);
            const __m256i q4b2 = _mm256_permute2x128_si256(lo, hi, 0x31);
            const __m256i a1 = _mm256_sign_epi8(q4b1, q4b1), a2 = _mm256_sign_epi8(q4b2, q4b2);
            const __m256i ls1 = _mm256_shuffle_epi8(ls, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * ib)));
            const __m256i ls2 = _mm256_shuffle_epi8(ls, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * (ib + 1))));
#define MM_ROW(r)                                                                                                  \
    {                                                                                                              \
        const int8_t* q8 = y[r][i].qs + 32 * ib;                                                                   \
        const __m256i q8b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));                             \
        const __m256i q8b2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32));                        \
        sumi[r] = madd_add(sumi[r], _mm256_maddubs_epi16(a1, _mm256_sign_epi8(q8b1, q4b1)), ls1);                 \
        sumi[r] = madd_add(sumi[r], _mm256_maddubs_epi16(a2, _mm256_sign_epi8(q8b2, q4b2)), ls2);                 \
    }
            MM_ROWS4(MM_ROW)
#undef MM_ROW
        }
        const float xd = h2f(x[i].d);
#define MM_ACC(r) acc[r] = fma_int(acc[r], hsum_epi32(sumi[r]), xd * y[r][i].d);
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r) out[r] = _mm_cvtss_f32(acc[r]);
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

namespace {
#if MM_SIMD_VNNI == 2
// 16 IQ4_XS rows transposed (see DecodeTileFn), one row per int32 lane: per super-block and
// 32-element sub-block s, 8 vectors of levels (vector j, lane r: row r's elements 4j..4j+3 of the
// sub-block, signed), then 16 int32 -128 · Σ levels, then 16 int32 sub-block scales; after the 8
// sub-blocks, 16 float d. The activation bytes go in biased to unsigned (a + 128) and broadcast 4
// at a time, so each lane's vpdpbusd sums, started from -128 · Σ levels, are the exact
// Σ level · a; times the row's scale (vpmulld) and added over the sub-blocks, they are the
// one-row kernel's integer sum, and the float step is its.
constexpr size_t kIq4XsSub = 8 * 64 + 64 + 64;  // bytes per sub-block in the tile
static_assert(kIq4XsTile16BytesPerBlock == 8 * kIq4XsSub + 64, "tile layout");

void decode_tile16_iq4_xs(int64_t n, const void* w, size_t w_stride, void* tile) {
    const BlockIQ4_XS* x[16];
    for (int r = 0; r < 16; ++r) x[r] = reinterpret_cast<const BlockIQ4_XS*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const __m128i values = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NLValues));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, o += kIq4XsTile16BytesPerBlock) {
        for (int sb = 0; sb < 8; ++sb) {
            uint8_t* os = o + sb * kIq4XsSub;
            __m512i z[8];  // rows r and r + 8
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
                z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(iq4_levels(x[r][i].qs + 16 * sb, values, m4)),
                                          iq4_levels(x[r + 8][i].qs + 16 * sb, values, m4), 1);
            }
            const __m512i sum = transpose16x8_store(z, os);
            _mm512_storeu_si512(os + 512, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
            int32_t ls[16];
            for (int r = 0; r < 16; ++r) {
                const int lo4 = (x[r][i].scales_l[sb / 2] >> (4 * (sb % 2))) & 0xf;
                const int hi2 = (x[r][i].scales_h >> (2 * sb)) & 3;
                ls[r] = (lo4 | (hi2 << 4)) - 32;
            }
            std::memcpy(os + 576, ls, sizeof(ls));
        }
        float d[16];
        for (int r = 0; r < 16; ++r) d[r] = h2f(x[r][i].d);
        std::memcpy(o + 8 * kIq4XsSub, d, sizeof(d));
    }
}

template <int NA>
void dot_tile16_iq4_xs(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = row_ptr<BlockQ8_K>(a, a_stride, t);
    __m512 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
    const auto* p = static_cast<const uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, p += kIq4XsTile16BytesPerBlock) {
        __m512i total[NA];
        for (int t = 0; t < NA; ++t) total[t] = _mm512_setzero_si512();
        for (int sb = 0; sb < 8; ++sb) {
            const uint8_t* ps = p + sb * kIq4XsSub;
            __m512i v[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_si512(ps + 64 * j);
            const __m512i start = _mm512_loadu_si512(ps + 512);
            const __m512i ls = _mm512_loadu_si512(ps + 576);
#pragma GCC unroll 4
            for (int t = 0; t < NA; ++t) {
                alignas(32) int32_t yu[8];  // a + 128 as unsigned bytes, 4 per dword
                _mm256_store_si256(reinterpret_cast<__m256i*>(yu),
                                   _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][i].qs + 32 * sb)), bias));
                __m512i s = start;
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(yu[j]), v[j]);
                total[t] = _mm512_add_epi32(total[t], _mm512_mullo_epi32(s, ls));
            }
        }
        const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(p + 8 * kIq4XsSub));
        for (int t = 0; t < NA; ++t)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[t]), _mm512_mul_ps(d, _mm512_set1_ps(y[t][i].d)), acc[t]);
    }
    for (int t = 0; t < NA; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

#endif

#if MM_SIMD_VNNI < 2
// 8 IQ4_XS rows transposed for 256-bit CPUs, one row per int32 lane: per super-block and
// 32-element sub-block, 8 vectors of signed levels (vector j, lane r: row r's elements 4j..4j+3 of
// the sub-block); then with AVX-VNNI 8 int32 -128 · Σ levels (the activations go in as a + 128, as
// in the 16-row tile), with AVX2 the 8 vectors of |levels| (ggml's sign trick: levels reach ±127);
// then 8 int32 sub-block scales; after the 8 sub-blocks, 8 float d. The same exact integer sums
// and float step as the one-row kernel.
constexpr size_t kIq4XsSub8 = MM_SIMD_VNNI ? 256 + 32 + 32 : 256 + 256 + 32;
constexpr size_t kIq4XsTile8Bytes = 8 * kIq4XsSub8 + 32;

void decode_tile8_iq4_xs(int64_t n, const void* w, size_t w_stride, void* tile) {
    const BlockIQ4_XS* x[8];
    for (int r = 0; r < 8; ++r) x[r] = reinterpret_cast<const BlockIQ4_XS*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const __m128i values = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NLValues));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, o += kIq4XsTile8Bytes) {
        for (int sb = 0; sb < 8; ++sb) {
            uint8_t* os = o + sb * kIq4XsSub8;
            __m256i z[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) z[r] = iq4_levels(x[r][i].qs + 16 * sb, values, m4);
            store_tile8_levels(z, os, !MM_SIMD_VNNI);
            int32_t ls[8];
            for (int r = 0; r < 8; ++r) {
                const int lo4 = (x[r][i].scales_l[sb / 2] >> (4 * (sb % 2))) & 0xf;
                const int hi2 = (x[r][i].scales_h >> (2 * sb)) & 3;
                ls[r] = (lo4 | (hi2 << 4)) - 32;
            }
            std::memcpy(os + kIq4XsSub8 - 32, ls, sizeof(ls));
        }
        float d[8];
        for (int r = 0; r < 8; ++r) d[r] = h2f(x[r][i].d);
        std::memcpy(o + 8 * kIq4XsSub8, d, sizeof(d));
    }
}

template <int NA>
void dot_tile8_iq4_xs(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = row_ptr<BlockQ8_K>(a, a_stride, t);
    __m256 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm256_setzero_ps();
    const auto* p = static_cast<const uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, p += kIq4XsTile8Bytes) {
        __m256i total[NA];
        for (int t = 0; t < NA; ++t) total[t] = _mm256_setzero_si256();
        for (int sb = 0; sb < 8; ++sb) {
            const uint8_t* ps = p + sb * kIq4XsSub8;
            const auto vec = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ps + off)); };
            const __m256i ls = vec(kIq4XsSub8 - 32);
#pragma GCC unroll 4
            for (int t = 0; t < NA; ++t) {
#if MM_SIMD_VNNI
                const __m256i s = dot_tile8_offset(ps, y[t][i].qs + 32 * sb);
#else
                const __m256i s = dot_tile8_sign(ps, y[t][i].qs + 32 * sb);
#endif
                total[t] = _mm256_add_epi32(total[t], _mm256_mullo_epi32(s, ls));
            }
        }
        const __m256 d = _mm256_loadu_ps(reinterpret_cast<const float*>(p + 8 * kIq4XsSub8));
        for (int t = 0; t < NA; ++t)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[t]), _mm256_mul_ps(d, _mm256_set1_ps(y[t][i].d)), acc[t]);
    }
    for (int t = 0; t < NA; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

#endif
}  // namespace

#if MM_SIMD_VNNI < 2
const size_t kTileBytesIQ4_XS = kIq4XsTile8Bytes;
void decode_tile_iq4_xs(int64_t n, const void* w, size_t ws, void* tile) { decode_tile8_iq4_xs(n, w, ws, tile); }
void vec_dot_tile_iq4_xs(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile8_iq4_xs<1>(n, tile, a, as, out);
}
void vec_dot_tile_x4_iq4_xs(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile8_iq4_xs<4>(n, tile, a, as, out);
}
#else
const size_t kTileBytesIQ4_XS = kIq4XsTile16BytesPerBlock;
void decode_tile_iq4_xs(int64_t n, const void* w, size_t ws, void* tile) { decode_tile16_iq4_xs(n, w, ws, tile); }
void vec_dot_tile_iq4_xs(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile16_iq4_xs<1>(n, tile, a, as, out);
}
void vec_dot_tile_x4_iq4_xs(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile16_iq4_xs<4>(n, tile, a, as, out);
}
#endif

#undef MM_ROWS4

// Q8_1 as ggml-cpu's AVX2 quantize_row_q8_1: Q8_0's quants (quantize_act_q8_0) and
// s = fp16(d · Σ q) with d = amax / 127 before its fp16 rounding.
void quantize_act_q8_1(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<BlockQ8_1*>(vy);
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        int sum;
        const float d = q8_block(x, &y[i].d, y[i].qs, &sum);
        y[i].s = static_cast<uint16_t>(_cvtss_sh(d * static_cast<float>(sum), _MM_FROUND_TO_NEAREST_INT));
    }
}

}  // namespace moemesh::quants::MM_SIMD_NS

#pragma GCC pop_options

#endif  // x86
