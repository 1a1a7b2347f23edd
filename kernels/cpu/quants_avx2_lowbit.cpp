// AVX2 row dot products of the Q5_0, Q5_K, Q3_K and Q2_K weight types (selected at run time by
// quants_dot.cpp: type_kernels). The integer and float arithmetic is that of ggml's x86 AVX2
// ggml_vec_dot_{q5_0_q8_0, q5_K_q8_K, q3_K_q8_K, q2_K_q8_K}: the same maddubs/madd integer sums per
// block, the same accumulators and the same final reductions, so results match llama.cpp's CPU
// backend to the last bit where the compiler keeps the operation order.
//
// Compiled for AVX2 through the target pragma, like quants_avx2.cpp (see the note there).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

namespace moemesh::quants::MM_SIMD_NS {
namespace {

// Bit b of every byte of hbits as that byte's bit 4 (Q5_K's fifth bit of group b's quants): one
// 16-bit shift and a mask, immediate shifts once the caller's loop is unrolled.
inline __m256i q5k_fifth_bit(__m256i hbits, int b) {
    const __m256i moved = b <= 4 ? _mm256_slli_epi16(hbits, 4 - b) : _mm256_srli_epi16(hbits, b - 4);
    return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

// Shuffle i broadcasts int16 lane 2i to the low 128-bit half and lane 2i+1 to the high half: the
// scales of elements [32i, 32i+16) and [32i+16, 32i+32) of a 128-element chunk (16-element groups).
alignas(32) constexpr uint8_t kScaleShuffleQ3K[4][32] = {
    {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3},
    {4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7},
    {8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11},
    {12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13,
     14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15},
};

inline __m256i shuffle_q3k(__m256i scales, int i) {
    return _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleQ3K[i])));
}

// Σ scale_g · p16 over the four 32-element quarters of a 128-element chunk, as 8 int32 partial sums.
inline __m256i scaled_quarters(__m256i scales, __m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i s01 = madd_add(_mm256_madd_epi16(shuffle_q3k(scales, 0), p0), shuffle_q3k(scales, 1), p1);
    const __m256i s23 = madd_add(_mm256_madd_epi16(shuffle_q3k(scales, 2), p2), shuffle_q3k(scales, 3), p3);
    return _mm256_add_epi32(s01, s23);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 4 in the bytes whose hmask bit b is clear, else 0 (Q3_K's offset, subtracted; ggml computes it as
// slli(srli(andnot(hbits, slli(1, b)), b), 2)): bit b moved to bit 2 with one 16-bit shift (no
// bit of the neighbouring byte reaches bit 2), then andnot with 4. Immediate shifts once the
// caller's loop is unrolled.
inline __m256i q3k_offset4(__m256i hbits, int b) {
    const __m256i moved = b >= 2 ? _mm256_srli_epi16(hbits, b - 2) : _mm256_slli_epi16(hbits, 2 - b);
    return _mm256_andnot_si256(moved, _mm256_set1_epi8(4));
}

}  // namespace

float vec_dot_q5_0_q8_0(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    const int64_t nb = n / 32;
    const __m256i hi_off = _mm256_set1_epi8(static_cast<char>(0xF0));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const __m256 d = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));
        // q - 16 as a signed byte: the nibble, or'ed with 0xF0 (i.e. minus 16) where the 5th bit is clear.
        const __m256i bxhi = _mm256_andnot_si256(bytes_from_bits_32(x[i].qh), hi_off);
        const __m256i qx = _mm256_or_si256(bytes_from_nibbles_32(x[i].qs), bxhi);
        const __m256i qy = load256(y[i].qs);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
    }
    return hsum_ps(acc);
}

float vec_dot_q5_K_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const int64_t nb = n / kQK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m128i mzero = _mm_setzero_si128();
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.f;
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* q5 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        const float d = y[i].d * h2f(x[i].d);
        const float dmin = -y[i].d * h2f(x[i].dmin);
        const __m256i mins_and_scales = q4k_mins_and_scales(x[i].scales);
        // mins · (sums of q8 per 32 elements), reduced to one int and scaled into a float sum.
        const __m256i q8sums = load256(y[i].bsums);
        const __m128i q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
        const __m128i prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
        const __m128i hsum = _mm_hadd_epi32(_mm_hadd_epi32(prod, mzero), mzero);
        summs += dmin * static_cast<float>(_mm_extract_epi32(hsum, 0));

        const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        const __m256i hbits = load256(x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < kQK_K / 64; ++j) {
            const __m256i scale_0 =
                _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j])));
            const __m256i scale_1 = _mm256_shuffle_epi8(
                scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j + 1])));
            const __m256i q5bits = load256(q5);
            q5 += 32;
            const __m256i q5_0 = _mm256_or_si256(_mm256_and_si256(q5bits, m4), q5k_fifth_bit(hbits, 2 * j));
            const __m256i q5_1 =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q5bits, 4), m4), q5k_fifth_bit(hbits, 2 * j + 1));
            const __m256i q8_0 = load256(q8);
            const __m256i q8_1 = load256(q8 + 32);
            q8 += 64;
            // q5·q8 pairs stay within int16: 2 · 31 · 127 < 32768.
            sumi = madd_add(sumi, scale_0, _mm256_maddubs_epi16(q5_0, q8_0));
            sumi = madd_add(sumi, scale_1, _mm256_maddubs_epi16(q5_1, q8_1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) + summs;
}

float vec_dot_q3_K_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ3_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const int64_t nb = n / kQK_K;
    constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m32 = _mm_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float d = y[i].d * h2f(x[i].d);
        const uint8_t* q3 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        uint32_t aux[3];
        std::memcpy(aux, x[i].scales, 12);
        __m128i scales128 = _mm_set_epi32(static_cast<int>(((aux[1] >> 4) & kmask2) | (((aux[2] >> 6) & kmask1) << 4)),
                                          static_cast<int>(((aux[0] >> 4) & kmask2) | (((aux[2] >> 4) & kmask1) << 4)),
                                          static_cast<int>((aux[1] & kmask2) | (((aux[2] >> 2) & kmask1) << 4)),
                                          static_cast<int>((aux[0] & kmask2) | (((aux[2] >> 0) & kmask1) << 4)));
        scales128 = _mm_sub_epi8(scales128, m32);
        const __m256i all_scales = _mm256_cvtepi8_epi16(scales128);
        const __m128i l_scales = _mm256_castsi256_si128(all_scales);
        const __m128i h_scales = _mm256_extracti128_si256(all_scales, 1);
        const __m256i scales[2] = {_mm256_inserti128_si256(_mm256_castsi128_si256(l_scales), l_scales, 1),
                                   _mm256_inserti128_si256(_mm256_castsi128_si256(h_scales), h_scales, 1)};
        const __m256i hbits = load256(x[i].hmask);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int j = 0; j < kQK_K / 128; ++j) {
            const __m256i q3bits = load256(q3);
            q3 += 32;
            // Low 2 bits, and 4 where the high bit is clear (subtracted below). Written out: GCC -O2
            // keeps small vector arrays in memory.
            const __m256i q3l_0 = _mm256_and_si256(q3bits, m3);
            const __m256i q3h_0 = q3k_offset4(hbits, 4 * j + 0);
            const __m256i q3l_1 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 2), m3);
            const __m256i q3h_1 = q3k_offset4(hbits, 4 * j + 1);
            const __m256i q3l_2 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 4), m3);
            const __m256i q3h_2 = q3k_offset4(hbits, 4 * j + 2);
            const __m256i q3l_3 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 6), m3);
            const __m256i q3h_3 = q3k_offset4(hbits, 4 * j + 3);
            const __m256i q8_0 = load256(q8);
            const __m256i q8_1 = load256(q8 + 32);
            const __m256i q8_2 = load256(q8 + 64);
            const __m256i q8_3 = load256(q8 + 96);
            q8 += 128;
            const __m256i p16_0 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_0, q8_0), _mm256_maddubs_epi16(q3h_0, q8_0));
            const __m256i p16_1 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_1, q8_1), _mm256_maddubs_epi16(q3h_1, q8_1));
            const __m256i p16_2 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_2, q8_2), _mm256_maddubs_epi16(q3h_2, q8_2));
            const __m256i p16_3 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_3, q8_3), _mm256_maddubs_epi16(q3h_3, q8_3));
            sumi = _mm256_add_epi32(sumi, scaled_quarters(scales[j], p16_0, p16_1, p16_2, p16_3));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

float vec_dot_q2_K_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ2_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const int64_t nb = n / kQK_K;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0xF);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float d = y[i].d * h2f(x[i].d);
        const float dmin = -y[i].d * h2f(x[i].dmin);
        const uint8_t* q2 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        const __m128i mins_and_scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
        const __m128i scales8 = _mm_and_si128(mins_and_scales, m4);
        const __m128i mins8 = _mm_and_si128(_mm_srli_epi16(mins_and_scales, 4), m4);
        const __m256i mins = _mm256_cvtepi8_epi16(mins8);
        const __m256i prod = _mm256_madd_epi16(mins, load256(y[i].bsums));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(prod), acc);

        const __m256i all_scales = _mm256_cvtepi8_epi16(scales8);
        const __m128i l_scales = _mm256_castsi256_si128(all_scales);
        const __m128i h_scales = _mm256_extracti128_si256(all_scales, 1);
        const __m256i scales[2] = {_mm256_inserti128_si256(_mm256_castsi128_si256(l_scales), l_scales, 1),
                                   _mm256_inserti128_si256(_mm256_castsi128_si256(h_scales), h_scales, 1)};
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < kQK_K / 128; ++j) {
            const __m256i q2bits = load256(q2);
            q2 += 32;
            const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(q2bits, m3), load256(q8));
            const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q2bits, 2), m3), load256(q8 + 32));
            const __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q2bits, 4), m3), load256(q8 + 64));
            const __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q2bits, 6), m3), load256(q8 + 96));
            q8 += 128;
            sumi = _mm256_add_epi32(sumi, scaled_quarters(scales[j], p0, p1, p2, p3));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

// ---- 4-row variants: one W row against 4 activation rows, the W decoding shared; each row's
// arithmetic is the one-row kernel's, so each result is bit-identical to it ----

void vec_dot_q5_0_q8_0_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockQ5_0*>(w);
    const BlockQ8_0* y[4];
    for (int r = 0; r < 4; ++r)
        y[r] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + r * a_stride);
    const int64_t nb = n / 32;
    const __m256i hi_off = _mm256_set1_epi8(static_cast<char>(0xF0));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float dx = h2f(x[i].d);
        const __m256i bxhi = _mm256_andnot_si256(bytes_from_bits_32(x[i].qh), hi_off);
        const __m256i qx = _mm256_or_si256(bytes_from_nibbles_32(x[i].qs), bxhi);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y[0][i].d)), mul_sum_i8_pairs_float(qx, load256(y[0][i].qs)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y[1][i].d)), mul_sum_i8_pairs_float(qx, load256(y[1][i].qs)), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y[2][i].d)), mul_sum_i8_pairs_float(qx, load256(y[2][i].qs)), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y[3][i].d)), mul_sum_i8_pairs_float(qx, load256(y[3][i].qs)), acc3);
    }
    out[0] = hsum_ps(acc0);
    out[1] = hsum_ps(acc1);
    out[2] = hsum_ps(acc2);
    out[3] = hsum_ps(acc3);
}

void vec_dot_q5_K_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockQ5_K*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r)
        y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    const int64_t nb = n / kQK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m128i mzero = _mm_setzero_si128();
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float summs[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = 0; i < nb; ++i) {
        const float dx = h2f(x[i].d), dminx = h2f(x[i].dmin);
        const __m256i mins_and_scales = q4k_mins_and_scales(x[i].scales);
        const __m128i mins = _mm256_extracti128_si256(mins_and_scales, 1);
        for (int r = 0; r < 4; ++r) {
            const float dmin = -y[r][i].d * dminx;
            const __m256i q8sums = load256(y[r][i].bsums);
            const __m128i q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
            const __m128i prod = _mm_madd_epi16(mins, q8s);
            const __m128i hsum = _mm_hadd_epi32(_mm_hadd_epi32(prod, mzero), mzero);
            summs[r] += dmin * static_cast<float>(_mm_extract_epi32(hsum, 0));
        }
        const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        const __m256i hbits = load256(x[i].qh);
        const uint8_t* q5 = x[i].qs;
        __m256i sumi0 = _mm256_setzero_si256(), sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256(),
                sumi3 = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < kQK_K / 64; ++j) {
            const __m256i scale_0 =
                _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j])));
            const __m256i scale_1 = _mm256_shuffle_epi8(
                scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j + 1])));
            const __m256i q5bits = load256(q5);
            q5 += 32;
            const __m256i q5_0 = _mm256_or_si256(_mm256_and_si256(q5bits, m4), q5k_fifth_bit(hbits, 2 * j));
            const __m256i q5_1 =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q5bits, 4), m4), q5k_fifth_bit(hbits, 2 * j + 1));
            auto part = [&](const BlockQ8_K& b) {
                const __m256i p16_0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q5_0, load256(b.qs + 64 * j)));
                return madd_add(p16_0, scale_1, _mm256_maddubs_epi16(q5_1, load256(b.qs + 64 * j + 32)));
            };
            sumi0 = _mm256_add_epi32(sumi0, part(y[0][i]));
            sumi1 = _mm256_add_epi32(sumi1, part(y[1][i]));
            sumi2 = _mm256_add_epi32(sumi2, part(y[2][i]));
            sumi3 = _mm256_add_epi32(sumi3, part(y[3][i]));
        }
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(y[0][i].d * dx), _mm256_cvtepi32_ps(sumi0), acc[0]);
        acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(y[1][i].d * dx), _mm256_cvtepi32_ps(sumi1), acc[1]);
        acc[2] = _mm256_fmadd_ps(_mm256_set1_ps(y[2][i].d * dx), _mm256_cvtepi32_ps(sumi2), acc[2]);
        acc[3] = _mm256_fmadd_ps(_mm256_set1_ps(y[3][i].d * dx), _mm256_cvtepi32_ps(sumi3), acc[3]);
    }
    for (int r = 0; r < 4; ++r) out[r] = hsum_ps(acc[r]) + summs[r];
}


void vec_dot_q3_K_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockQ3_K*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r)
        y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    const int64_t nb = n / kQK_K;
    constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m32 = _mm_set1_epi8(32);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float dx = h2f(x[i].d);
        const uint8_t* q3 = x[i].qs;
        uint32_t aux[3];
        std::memcpy(aux, x[i].scales, 12);
        __m128i scales128 = _mm_set_epi32(static_cast<int>(((aux[1] >> 4) & kmask2) | (((aux[2] >> 6) & kmask1) << 4)),
                                          static_cast<int>(((aux[0] >> 4) & kmask2) | (((aux[2] >> 4) & kmask1) << 4)),
                                          static_cast<int>((aux[1] & kmask2) | (((aux[2] >> 2) & kmask1) << 4)),
                                          static_cast<int>((aux[0] & kmask2) | (((aux[2] >> 0) & kmask1) << 4)));
        scales128 = _mm_sub_epi8(scales128, m32);
        const __m256i all_scales = _mm256_cvtepi8_epi16(scales128);
        const __m128i l_scales = _mm256_castsi256_si128(all_scales);
        const __m128i h_scales = _mm256_extracti128_si256(all_scales, 1);
        const __m256i scales[2] = {_mm256_inserti128_si256(_mm256_castsi128_si256(l_scales), l_scales, 1),
                                   _mm256_inserti128_si256(_mm256_castsi128_si256(h_scales), h_scales, 1)};
        const __m256i hbits = load256(x[i].hmask);
        __m256i sumi0 = _mm256_setzero_si256(), sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256(),
                sumi3 = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int j = 0; j < kQK_K / 128; ++j) {
            const __m256i q3bits = load256(q3);
            q3 += 32;
            const __m256i q3l_0 = _mm256_and_si256(q3bits, m3);
            const __m256i q3h_0 = q3k_offset4(hbits, 4 * j + 0);
            const __m256i q3l_1 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 2), m3);
            const __m256i q3h_1 = q3k_offset4(hbits, 4 * j + 1);
            const __m256i q3l_2 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 4), m3);
            const __m256i q3h_2 = q3k_offset4(hbits, 4 * j + 2);
            const __m256i q3l_3 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 6), m3);
            const __m256i q3h_3 = q3k_offset4(hbits, 4 * j + 3);
            auto part = [&](const BlockQ8_K& b) {
                const int8_t* q8 = b.qs + 128 * j;
                const __m256i q8_0 = load256(q8), q8_1 = load256(q8 + 32), q8_2 = load256(q8 + 64),
                              q8_3 = load256(q8 + 96);
                const __m256i p16_0 =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_0, q8_0), _mm256_maddubs_epi16(q3h_0, q8_0));
                const __m256i p16_1 =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_1, q8_1), _mm256_maddubs_epi16(q3h_1, q8_1));
                const __m256i p16_2 =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_2, q8_2), _mm256_maddubs_epi16(q3h_2, q8_2));
                const __m256i p16_3 =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q3l_3, q8_3), _mm256_maddubs_epi16(q3h_3, q8_3));
                return scaled_quarters(scales[j], p16_0, p16_1, p16_2, p16_3);
            };
            sumi0 = _mm256_add_epi32(sumi0, part(y[0][i]));
            sumi1 = _mm256_add_epi32(sumi1, part(y[1][i]));
            sumi2 = _mm256_add_epi32(sumi2, part(y[2][i]));
            sumi3 = _mm256_add_epi32(sumi3, part(y[3][i]));
        }
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(y[0][i].d * dx), _mm256_cvtepi32_ps(sumi0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(y[1][i].d * dx), _mm256_cvtepi32_ps(sumi1), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(y[2][i].d * dx), _mm256_cvtepi32_ps(sumi2), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_set1_ps(y[3][i].d * dx), _mm256_cvtepi32_ps(sumi3), acc3);
    }
    out[0] = hsum_ps(acc0);
    out[1] = hsum_ps(acc1);
    out[2] = hsum_ps(acc2);
    out[3] = hsum_ps(acc3);
}

void vec_dot_q2_K_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockQ2_K*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r)
        y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    const int64_t nb = n / kQK_K;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0xF);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float dx = h2f(x[i].d), dminx = h2f(x[i].dmin);
        const uint8_t* q2 = x[i].qs;
        const __m128i mins_and_scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
        const __m128i scales8 = _mm_and_si128(mins_and_scales, m4);
        const __m128i mins8 = _mm_and_si128(_mm_srli_epi16(mins_and_scales, 4), m4);
        const __m256i mins = _mm256_cvtepi8_epi16(mins8);
        // The min terms first, as the one-row kernel adds them.
        auto min_term = [&](const BlockQ8_K& b, __m256 acc) {
            const __m256i prod = _mm256_madd_epi16(mins, load256(b.bsums));
            return _mm256_fmadd_ps(_mm256_set1_ps(-b.d * dminx), _mm256_cvtepi32_ps(prod), acc);
        };
        acc0 = min_term(y[0][i], acc0);
        acc1 = min_term(y[1][i], acc1);
        acc2 = min_term(y[2][i], acc2);
        acc3 = min_term(y[3][i], acc3);
        const __m256i all_scales = _mm256_cvtepi8_epi16(scales8);
        const __m128i l_scales = _mm256_castsi256_si128(all_scales);
        const __m128i h_scales = _mm256_extracti128_si256(all_scales, 1);
        const __m256i scales[2] = {_mm256_inserti128_si256(_mm256_castsi128_si256(l_scales), l_scales, 1),
                                   _mm256_inserti128_si256(_mm256_castsi128_si256(h_scales), h_scales, 1)};
        __m256i sumi0 = _mm256_setzero_si256(), sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256(),
                sumi3 = _mm256_setzero_si256();
        for (int j = 0; j < kQK_K / 128; ++j) {
            const __m256i q2bits = load256(q2);
            q2 += 32;
            const __m256i w0 = _mm256_and_si256(q2bits, m3);
            const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 2), m3);
            const __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 4), m3);
            const __m256i w3 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 6), m3);
            auto part = [&](const BlockQ8_K& b) {
                const int8_t* q8 = b.qs + 128 * j;
                return scaled_quarters(scales[j], _mm256_maddubs_epi16(w0, load256(q8)),
                                       _mm256_maddubs_epi16(w1, load256(q8 + 32)),
                                       _mm256_maddubs_epi16(w2, load256(q8 + 64)),
                                       _mm256_maddubs_epi16(w3, load256(q8 + 96)));
            };
            sumi0 = _mm256_add_epi32(sumi0, part(y[0][i]));
            sumi1 = _mm256_add_epi32(sumi1, part(y[1][i]));
            sumi2 = _mm256_add_epi32(sumi2, part(y[2][i]));
            sumi3 = _mm256_add_epi32(sumi3, part(y[3][i]));
        }
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(y[0][i].d * dx), _mm256_cvtepi32_ps(sumi0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(y[1][i].d * dx), _mm256_cvtepi32_ps(sumi1), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(y[2][i].d * dx), _mm256_cvtepi32_ps(sumi2), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_set1_ps(y[3][i].d * dx), _mm256_cvtepi32_ps(sumi3), acc3);
    }
    out[0] = hsum_ps(acc0);
    out[1] = hsum_ps(acc1);
    out[2] = hsum_ps(acc2);
    out[3] = hsum_ps(acc3);
}

}  // namespace moemesh::quants::MM_SIMD_NS

#pragma GCC pop_options

#endif  // x86
