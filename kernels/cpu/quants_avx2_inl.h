// AVX2 helpers shared by quants_avx2*.cpp. Include only after quants_avx2_target.h: everything
// here has internal linkage, so each SIMD translation unit gets its own copy and no baseline code
// can end up calling one.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"

namespace moemesh::quants::MM_SIMD_NS {
namespace {  // NOLINT(build/namespaces): internal linkage on purpose, see above

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

inline float load_f32(const uint8_t* p) {
    float f;
    std::memcpy(&f, p, sizeof(f));
    return f;
}

inline float hsum_ps(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

// The sum of 8 int32 lanes.
inline int hsum_epi32(__m256i p) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// The sum of 4 int32 lanes.
inline int hsum_epi32_128(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// acc + float(s) · d in one rounding (a scalar fma).
inline __m128 fma_int(__m128 acc, int s, float d) {
    return _mm_fmadd_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), s), _mm_set_ss(d), acc);
}

// s + madd_epi16(a, b): per int32 lane, s + a0·b0 + a1·b1 of its two int16 pairs. One vpdpwssd
// in the VNNI variants; the same int32 result either way.
inline __m256i madd_add(__m256i s, __m256i a, __m256i b) {
#if MM_SIMD_VNNI == 1
    return _mm256_dpwssd_avx_epi32(s, a, b);
#elif MM_SIMD_VNNI == 2
    return _mm256_dpwssd_epi32(s, a, b);
#else
    return _mm256_add_epi32(s, _mm256_madd_epi16(a, b));
#endif
}

// s + Σ of the 4 products u·v of each int32 lane's bytes (u unsigned, v signed). One vpdpbusd in
// the VNNI variants; in AVX2 maddubs then madd, which gives the same sums while no pair of
// products leaves int16 (callers keep |u·v| pairs below 2^15, as ggml's AVX2 kernels do).
inline __m256i dp4_add(__m256i s, __m256i u, __m256i v) {
#if MM_SIMD_VNNI == 1
    return _mm256_dpbusd_avx_epi32(s, u, v);
#elif MM_SIMD_VNNI == 2
    return _mm256_dpbusd_epi32(s, u, v);
#else
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1)));
#endif
}

// Σ of the 4 int8 products of each int32 lane (x signed, y signed), as 8 floats.
inline __m256 mul_sum_i8_pairs_float(__m256i x, __m256i y) {
    return _mm256_cvtepi32_ps(dp4_add(_mm256_setzero_si256(), _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)));
}

// 32 nibbles → 32 bytes: low nibbles of the 16 bytes first, then the high nibbles.
inline __m256i bytes_from_nibbles_32(const uint8_t* p) {
    const __m128i tmp = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    return _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
}

// 32 bits → 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32).
inline __m256i bytes_from_bits_32(const uint8_t* p) {
    uint32_t x32;
    std::memcpy(&x32, p, sizeof(x32));
    const __m256i shuf_mask =
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x32)), shuf_mask);
    const __m256i bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    bytes = _mm256_or_si256(bytes, bit_mask);
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

// One 32-element block as ggml-cpu's AVX quantize_row_q8_0 / _q8_1: d = amax/127 (returned, and as
// fp16 in *d16), q = round-half-even(x · 127/amax); *sum (if given) = Σ q.
inline float q8_block(const float* x, uint16_t* d16, int8_t* qs, int* sum) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(x);
    const __m256 v1 = _mm256_loadu_ps(x + 8);
    const __m256 v2 = _mm256_loadu_ps(x + 16);
    const __m256 v3 = _mm256_loadu_ps(x + 24);
    __m256 max_abs = _mm256_andnot_ps(sign_bit, v0);
    max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v1));
    max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v2));
    max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v3));
    __m128 max4 = _mm_max_ps(_mm256_extractf128_ps(max_abs, 1), _mm256_castps256_ps128(max_abs));
    max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
    max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
    const float amax = _mm_cvtss_f32(max4);
    const float d = amax / 127.f;
    *d16 = static_cast<uint16_t>(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
    const __m256 mul = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_FROUND_TO_NEAREST_INT));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_FROUND_TO_NEAREST_INT));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_FROUND_TO_NEAREST_INT));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_FROUND_TO_NEAREST_INT));
    if (sum) {
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
        *sum = _mm_cvtsi128_si32(s4);
    }
    const __m256i p01 = _mm256_packs_epi32(i0, i1);
    const __m256i p23 = _mm256_packs_epi32(i2, i3);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm));
    return d;
}

inline __m256 load_bf16(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

inline __m256 load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Byte shuffles broadcasting scale 2p to bytes 0..7 and scale 2p+1 to bytes 8..15.
alignas(16) constexpr uint8_t kScalePairShuffle[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

// Scales 2p and 2p+1 of a Q6_K block as 16 int16 lanes (8 each).
inline __m256i scale_pair(__m128i scales8, int p) {
    const __m128i shuf = _mm_load_si128(reinterpret_cast<const __m128i*>(kScalePairShuffle[p]));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales8, shuf));
}

// Byte shuffles broadcasting int16 lane i (bytes 2i, 2i+1) of a 16-lane vector to all lanes.
alignas(32) constexpr uint8_t kScaleShuffleK4[8][32] = {
#define MM_PAIR(i) 2 * i, 2 * i + 1
#define MM_ROW(i)                                                                                                   \
    {                                                                                                               \
        MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), \
            MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i), MM_PAIR(i)                      \
    }
    MM_ROW(0), MM_ROW(1), MM_ROW(2), MM_ROW(3), MM_ROW(4), MM_ROW(5), MM_ROW(6), MM_ROW(7),
#undef MM_ROW
#undef MM_PAIR
};

// One 64-element group j of a Q4_K block: scale(2j)·Σ lo-nibbles·q8[0..32) + scale(2j+1)·Σ hi·q8[32..64),
// as 8 int32 partial sums. scales holds the 8 sub-block scales as int16 in both 128-bit halves.
inline __m256i q4k_group(const uint8_t* q4, const int8_t* q8, __m256i scales, int j) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m256i scale_l =
        _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j])));
    const __m256i scale_h =
        _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j + 1])));
    const __m256i q4bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4));
    const __m256i q4l = _mm256_and_si256(q4bits, m4);
    const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
    const __m256i q8l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
    const __m256i q8h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32));
    const __m256i p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
    return madd_add(p16l, scale_h, _mm256_maddubs_epi16(q4h, q8h));
}

#if MM_SIMD_VNNI == 2
// Group j of a Q4_K block as 512-bit vectors: *q4 = its low nibbles (32 bytes) then its high ones,
// *sc = scale(2j) in the low 16 int16 lanes and scale(2j+1) in the high ones; `scales` as for
// q4k_group. With the group's 64 activation bytes as one vector, vpdpwssd(sc, maddubs(q4, q8))
// puts q4k_group's scale_l products in the low 256 bits and its scale_h products in the high
// ones: their sum is q4k_group's lanes.
inline void q4k_group512(const uint8_t* q4, __m256i scales, int j, __m512i* q4v, __m512i* sc) {
    const __m256i q4bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4));
    *q4v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q4bits), _mm256_srli_epi16(q4bits, 4), 1),
                            _mm512_set1_epi8(0xF));
    const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * j)),
                                           _mm256_set1_epi16(static_cast<int16_t>(2 * j + 1)), 1);
    *sc = _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(scales));
}

// The 8 int32 lanes of a 512-bit accumulator of such groups (low half + high half).
inline __m256i fold512(__m512i v) { return _mm512_castsi512_si256(_mm512_add_epi32(v, _mm512_shuffle_i64x2(v, v, 0xEE))); }

// 16 rows of 32 bytes, z[r] = row r (low 256 bits) and row r + 8 (high), transposed as dwords
// into out[0..8): vector j's lane r = row r's bytes 4j..4j+3 (the 8 × 8 dword transpose of AVX,
// unpack 32 / unpack 64 / 128-bit lane moves, on both halves at once).
inline void transpose16x8(const __m512i* z, __m512i* out) {
    __m512i t[8], u[8];
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
        t[2 * p] = _mm512_unpacklo_epi32(z[2 * p], z[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(z[2 * p], z[2 * p + 1]);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 of each half
        u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    // Last step: 128-bit lanes (a0, b0, a2, b2) and (a1, b1, a3, b3).
    const __m512i pick_even = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i pick_odd = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // u[c]: dwords c and c + 4 of rows 0-3; u[c + 4]: of rows 4-7
        out[c] = _mm512_permutex2var_epi64(u[c], pick_even, u[c + 4]);
        out[c + 4] = _mm512_permutex2var_epi64(u[c], pick_odd, u[c + 4]);
    }
}

// The same, stored to out (8 × 64 bytes); returns each row's Σ of its 32 signed bytes in its lane.
inline __m512i transpose16x8_store(const __m512i* z, uint8_t* out) {
    __m512i v[8];
    transpose16x8(z, v);
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
        _mm512_storeu_si512(out + 64 * j, v[j]);
        sum = _mm512_dpbusd_epi32(sum, ones, v[j]);
    }
    return sum;
}
#endif

// 8 rows of 8 dwords (in[r]) transposed: out[j], lane r = dword j of in[r].
inline void transpose8x8(const __m256i* in, __m256i* out) {
    __m256i t[8], u[8];
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {  // rows 2p, 2p + 1: (d0 d0 d1 d1 | d4 d4 d5 d5), (d2 d2 d3 d3 | d6 ...)
        t[2 * p] = _mm256_unpacklo_epi32(in[2 * p], in[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_epi32(in[2 * p], in[2 * p + 1]);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: u[4h + c] = dwords c (low half) and c + 4 (high)
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        out[c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
        out[c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
    }
}

// The 8-row tiles' shared part (quants_avx2_r8.cpp, quants_avx2_q1_iq4.cpp): 8 rows of 32 signed
// levels (z[r]: row r) transposed and stored at o (vector j, lane r: row r's levels 4j..4j+3),
// then at o + 256 either the 8 vectors of |levels| (sign_form: for levels up to ±128 with AVX2) or
// the int32 -128 · Σ levels of each row (for activations biased to a + 128).
inline void store_tile8_levels(const __m256i* z, uint8_t* o, bool sign_form) {
    __m256i v[8];
    transpose8x8(z, v);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * j), v[j]);
    if (sign_form) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 256 + 32 * j), _mm256_sign_epi8(v[j], v[j]));
        return;
    }
    __m256i s16 = _mm256_setzero_si256();  // the bytes summed in pairs (|level| <= 128), then the pairs
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_set1_epi8(1), v[j]));
    const __m256i sum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 256), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 7)));
}

// Each row's exact Σ level · a over an 8-row tile block stored by store_tile8_levels at p, for one
// activation row of 32 bytes y: in sign form ggml's sign trick per vector (vpmaddubsw(|w|, sign(a,
// w)), vpmaddwd); in offset form, with VNNI, vpdpbusd of the activation bytes made unsigned against
// the levels, started from -128 · Σ levels (two chains: vpdpbusd's latency would bound one).
inline __m256i dot_tile8_sign(const uint8_t* p, const int8_t* y) {
    alignas(32) int32_t ya[8];  // the activation bytes, 4 per dword
    _mm256_store_si256(reinterpret_cast<__m256i*>(ya), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y)));
    const auto vec = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off)); };
    __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
        const __m256i signed_a = _mm256_sign_epi8(_mm256_set1_epi32(ya[j]), vec(32 * j));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(vec(256 + 32 * j), signed_a), _mm256_set1_epi16(1)));
    }
    return s;
}
#if MM_SIMD_VNNI
inline __m256i dot_tile8_offset(const uint8_t* p, const int8_t* y) {
    alignas(32) int32_t yu[8];  // a + 128 as unsigned bytes, 4 per dword
    _mm256_store_si256(reinterpret_cast<__m256i*>(yu), _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y)),
                                                                       _mm256_set1_epi8(static_cast<char>(0x80))));
    const auto vec = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off)); };
    __m256i s = vec(256), s1 = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < 8; j += 2) {
        s = dp4_add(s, _mm256_set1_epi32(yu[j]), vec(32 * j));
        s1 = dp4_add(s1, _mm256_set1_epi32(yu[j + 1]), vec(32 * j + 32));
    }
    return _mm256_add_epi32(s, s1);
}
#endif

// One 128-element chunk j of a Q6_K block: Σ_g scale_g · Σ q·q8 (q the unsigned 6-bit value, 0..63)
// as 8 int32 partial sums. The -32 offset is taken out once per block with q6k_offset.
inline __m256i q6k_chunk(const uint8_t* q4, const uint8_t* qh, const int8_t* q8, __m128i scales8, int j) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m256i m2 = _mm256_set1_epi8(3);
    const __m256i q4bits1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4));
    const __m256i q4bits2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + 32));
    const __m256i q4bitsH = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    const __m256i q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bitsH, m2), 4);
    const __m256i q4h_1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 2), m2), 4);
    const __m256i q4h_2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 4), m2), 4);
    const __m256i q4h_3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 6), m2), 4);
    const __m256i q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0);
    const __m256i q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1);
    const __m256i q4_2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2);
    const __m256i q4_3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3);
    // q·q8 pairs stay within int16: 2 · 63 · 127 < 32768.
    const __m256i p16_0 = _mm256_maddubs_epi16(q4_0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8)));
    const __m256i p16_1 = _mm256_maddubs_epi16(q4_1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32)));
    const __m256i p16_2 = _mm256_maddubs_epi16(q4_2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 64)));
    const __m256i p16_3 = _mm256_maddubs_epi16(q4_3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 96)));
    const __m256i s01 = madd_add(_mm256_madd_epi16(scale_pair(scales8, 4 * j + 0), p16_0), scale_pair(scales8, 4 * j + 1), p16_1);
    const __m256i s23 = madd_add(_mm256_madd_epi16(scale_pair(scales8, 4 * j + 2), p16_2), scale_pair(scales8, 4 * j + 3), p16_3);
    return _mm256_add_epi32(s01, s23);
}

// 32 · Σ_g scale_g · bsum_g of a Q6_K block against a Q8_K block: the part of Σ (q - 32)·q8 the
// offset contributes, as 8 int32 partial sums to subtract.
inline __m256i q6k_offset(__m128i scales8, const int16_t* bsums) {
    const __m256i prod =
        _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales8), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums)));
    return _mm256_slli_epi32(prod, 5);
}

// Σ_s min_s · (activation sum of 32-element sub-block s) of a Q4_K block, as 4 int32 partial sums:
// mins as 8 int16, bsums the Q8_K block's 16 sums of 16.
inline __m128i q4k_min_products(__m128i mins, const int16_t* bsums) {
    const __m256i q8sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums));
    const __m128i q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
    return _mm_madd_epi16(mins, q8s);
}

// Q4_K's float step per super-block and row (every kernel and variant): the exact integer sums
// sumi = Σ scale·q·a (the lanes of sumi) and summ = Σ min·a (the lanes of mp), reduced together,
// then acc = fma(float(sumi), d_w·d_a, acc) and acc = fma(float(summ), -dmin_w·d_a, acc): one row per
// step, so that a 16-row kernel can keep a row per vector lane.
inline __m128 q4k_float_step(__m128 acc, __m256i sumi, __m128i mp, float d, float neg_dmin) {
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sumi), _mm256_extracti128_si256(sumi, 1));
    const __m128i t = _mm_hadd_epi32(s4, mp);                 // sumi in lanes 0, 1; summ in 2, 3
    const __m128 f = _mm_cvtepi32_ps(_mm_hadd_epi32(t, t));  // (sumi, summ, sumi, summ)
    acc = _mm_fmadd_ss(f, _mm_set_ss(d), acc);
    return _mm_fmadd_ss(_mm_movehdup_ps(f), _mm_set_ss(neg_dmin), acc);
}

// The 12 packed scale bytes of a Q4_K block as 16 int16 lanes: 8 scales, then 8 mins.
inline __m256i q4k_mins_and_scales(const uint8_t* packed) {
    constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    uint32_t utmp[4];
    std::memcpy(utmp, packed, 12);
    utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
    const uint32_t uaux = utmp[1] & kmask1;
    utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
    utmp[2] = uaux;
    utmp[0] &= kmask1;
    return _mm256_cvtepu8_epi16(_mm_set_epi32(static_cast<int>(utmp[3]), static_cast<int>(utmp[2]),
                                              static_cast<int>(utmp[1]), static_cast<int>(utmp[0])));
}

}  // namespace
}  // namespace moemesh::quants::MM_SIMD_NS
