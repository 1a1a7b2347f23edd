// AVX2 dot products of Q4_0, IQ4_NL and MXFP4 weights (32-element blocks of 4-bit indices into 16
// levels, one scale per block) and of Q8_0 weights (32 signed bytes, one scale) against Q8_0
// activations, 8 weight rows at a time (16 with AVX-512), and their transposed prompt tiles.
//
// The arithmetic is that of llama.cpp's CPU backend for the 4-bit types on AVX2, which repacks
// their weights 8 rows at a time ("CPU_REPACK": ggml_gemv/gemm_{q4_0,iq4_nl,mxfp4}_8x8_q8_0, for
// both dense and expert (MUL_MAT_ID) matrices with a multiple of 8 rows): per (weight row,
// activation row) one float accumulator, and per block b, in order,
//     acc = fma(float(Σ_i w_i · a_i), scale_w(b) · d_a(b), acc)
// with the integer sum exact. Eight rows sit in the 8 lanes of one vector, so the float work per
// block is one convert, one multiply and one fma for all eight, instead of per row (ggml's
// one-row vec_dot keeps 8 partial sums per row and scales each block per row). Q8_0 uses the same
// float step (llama.cpp's x86 build keeps ggml's one-row Q8_0 dot, whose per-lane float sums a
// row-per-lane layout cannot reproduce; the results agree within the dot tolerance).
//
// We read the rows where they are (no repacked copy: the experts are served from the mapped file
// and the caches as stored). The one-row function gives the same bits for one row, so leftover
// rows (n_out % 8) and every path of matmul agree.
//
// Compiled for AVX2 through the target pragma, like quants_avx2.cpp (see the note there).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

namespace moemesh::quants::MM_SIMD_NS {
namespace {

constexpr int8_t kQ4_0Levels[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

// scale(b): one block's scale; scales8(x, b): block b of the 8 rows x[0..8) as one vector (the same
// floats, converted together).
inline __m256 fp16_scales8(const uint16_t* d0, const uint16_t* d1, const uint16_t* d2, const uint16_t* d3,
                           const uint16_t* d4, const uint16_t* d5, const uint16_t* d6, const uint16_t* d7) {
    return _mm256_cvtph_ps(_mm_set_epi16(static_cast<short>(*d7), static_cast<short>(*d6), static_cast<short>(*d5),
                                         static_cast<short>(*d4), static_cast<short>(*d3), static_cast<short>(*d2),
                                         static_cast<short>(*d1), static_cast<short>(*d0)));
}

template <class Block>
struct Fp16Scaled {
    static float scale(const Block& b) { return h2f(b.d); }
#if MM_SIMD_VNNI == 2
    // The scales of 16 blocks at byte offsets off from w (a block starts with its fp16 d).
    static __m512 scales16(const uint8_t* w, __m512i off) {
        return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(off, w, 1)));
    }
#endif
    static __m256 scales8(const Block* const* x, int64_t b) {
        return fp16_scales8(&x[0][b].d, &x[1][b].d, &x[2][b].d, &x[3][b].d, &x[4][b].d, &x[5][b].d, &x[6][b].d,
                            &x[7][b].d);
    }
};

// kOffset (VNNI variants): level + kOffset is the unsigned byte vpdpbusd multiplies; for Q4_0 that
// is the stored nibble itself (kNibbleIsUnsigned: no table lookup).
struct Q4_0Type : Fp16Scaled<BlockQ4_0> {
    using Block = BlockQ4_0;
    static constexpr bool kBytes = false;
    static constexpr int kOffset = 8;
    static constexpr bool kNibbleIsUnsigned = true;
    // AVX2 without VNNI: levels within ±kSmallLevel (0: up to ±128) are multiplied as unsigned
    // bytes (level + kSmallLevel, or a + 128 in the tiles) by signed ones in vpmaddubsw, whose int16
    // pair sums of kGroup16 vectors are added before vpmaddwd: 8 · 2 · 255 · 8 < 2^15 for Q4_0,
    // 4 · 2 · 255 · 12 for MXFP4. Larger levels take ggml's sign trick (see dot32).
    static constexpr int kSmallLevel = 8;
    static constexpr int kGroup16 = 8;
    static const int8_t* levels() { return kQ4_0Levels; }
};
struct IQ4NLType : Fp16Scaled<BlockIQ4_NL> {
    using Block = BlockIQ4_NL;
    static constexpr bool kBytes = false;
    static constexpr int kOffset = 128;
    static constexpr bool kNibbleIsUnsigned = false;
    static constexpr int kSmallLevel = 0;
    static constexpr int kGroup16 = 0;
    static const int8_t* levels() { return kIQ4NLValues; }
};
struct MXFP4Type {
    using Block = BlockMXFP4;
    static constexpr bool kBytes = false;
    static constexpr int kOffset = 128;
    static constexpr bool kNibbleIsUnsigned = false;
    static constexpr int kSmallLevel = 12;
    static constexpr int kGroup16 = 4;
    static const int8_t* levels() { return kMXFP4Values; }
    static float scale(const Block& b) { return e8m0_to_fp32_half(b.e); }
    // e8m0_to_fp32_half on 8 lanes: e < 2 gives the subnormal 0x00200000 << e, else (e - 1) << 23.
    static __m256 scales8(const Block* const* x, int64_t b) {
        const __m256i e = _mm256_set_epi32(x[7][b].e, x[6][b].e, x[5][b].e, x[4][b].e, x[3][b].e, x[2][b].e,
                                           x[1][b].e, x[0][b].e);
        const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
        const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
        const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
        return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, sub, is_sub));
    }
#if MM_SIMD_VNNI == 2
    // The same on 16 lanes, for the blocks at byte offsets off from w (a block starts with e).
    static __m512 scales16(const uint8_t* w, __m512i off) {
        const __m512i e = _mm512_and_si512(_mm512_i32gather_epi32(off, w, 1), _mm512_set1_epi32(0xFF));
        const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
        const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
        return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), normal, sub));
    }
#endif
};

// Q8_0 weights: the levels are the block's 32 signed bytes themselves (kBytes), made unsigned for
// vpdpbusd by adding 128 (an xor).
struct Q8_0Type : Fp16Scaled<BlockQ8_0> {
    using Block = BlockQ8_0;
    static constexpr bool kBytes = true;
    static constexpr int kOffset = 128;
    static constexpr bool kNibbleIsUnsigned = false;
    static constexpr int kSmallLevel = 0;
    static constexpr int kGroup16 = 0;
    static const int8_t* levels() { return kQ4_0Levels; }  // unused
};

// A block's 32 nibbles as bytes: the low nibbles (elements 0..15), then the high ones.
inline __m256i block_nibbles(const uint8_t* qs, __m256i m4) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    return _mm256_and_si256(_mm256_blend_epi32(x, _mm256_srli_epi16(x, 4), 0xF0), m4);
}

// The same as levels (signed bytes, or level + kOffset with the VNNI table of dot_r8).
inline __m256i block_levels(const uint8_t* qs, __m256i levels, __m256i m4) {
    return _mm256_shuffle_epi8(levels, block_nibbles(qs, m4));
}

// Block b's 32 levels as signed bytes (levels: the 16 levels in both 128-bit lanes).
template <class T>
inline __m256i levels32(const typename T::Block& b, __m256i levels, __m256i m4) {
    if constexpr (T::kBytes) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
    } else {
        return block_levels(b.qs, levels, m4);
    }
}

// The same plus kOffset as unsigned bytes (levels_u: the levels plus kOffset).
template <class T>
inline __m256i unsigned32(const typename T::Block& b, __m256i levels_u, __m256i m4) {
    if constexpr (T::kBytes) {
        return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs)), _mm256_set1_epi8(static_cast<char>(0x80)));
    } else if constexpr (T::kNibbleIsUnsigned) {
        return block_nibbles(b.qs, m4);
    } else {
        return block_levels(b.qs, levels_u, m4);
    }
}

// Σ of w · y over 32 bytes as 8 int32 partial sums. w_abs = |w| read unsigned (128 for a Q8_0
// byte of -128); pairs stay within int16: 2 · 128 · 127 < 32768 with |y| <= 127.
inline __m256i dot32(__m256i w, __m256i w_abs, __m256i y) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(y, w)), _mm256_set1_epi16(1));
}

// Lane r = the sum of p[r]'s 8 lanes.
inline __m256i hsum8_epi32(const __m256i* p) {
    const __m256i t0 = _mm256_hadd_epi32(p[0], p[1]);
    const __m256i t1 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i t2 = _mm256_hadd_epi32(p[4], p[5]);
    const __m256i t3 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1);  // per 128-bit half: rows 0..3
    const __m256i u1 = _mm256_hadd_epi32(t2, t3);  // rows 4..7
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}


// 8 rows (w, w + w_stride, ...) × NA activation rows (a, a + a_stride, ...): out[t · 8 + r].
template <class T, int NA>
void dot_r8(int64_t n, const void* w, size_t w_stride, const void* a, size_t a_stride, float* out) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels())));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#if MM_SIMD_VNNI
    // vpdpbusd multiplies unsigned by signed bytes: the weights go in as u = level + kOffset, and
    // each (activation row, block) starts its sums from -kOffset · Σ a, spread over the same lanes,
    // so the 8 lanes still add up to the exact Σ level · a.
    const __m256i levels_u = _mm256_add_epi8(levels, _mm256_set1_epi8(static_cast<char>(T::kOffset)));
    const __m256i offset_u8 = _mm256_set1_epi8(static_cast<char>(T::kOffset));
#endif
    const Block* x[8];
    for (int r = 0; r < 8; ++r) x[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const BlockQ8_0* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m256 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm256_setzero_ps();
    const char* next = static_cast<const char*>(w) + 8 * w_stride;
    const int64_t next_lines = static_cast<int64_t>((8 * w_stride + 63) / 64);
    for (int64_t b = 0; b < nb; ++b) {
        // Eight rows read side by side are eight interleaved streams, which the hardware prefetchers
        // follow badly; the next 8 rows (the bytes right after these) are one stream: prefetch them,
        // spread over this group's blocks, so the next call finds them in cache.
        if constexpr (NA == 1) {  // prompts (NA = 4) reuse the rows from cache for every group of X rows
            for (int64_t l = b * next_lines / nb; l < (b + 1) * next_lines / nb; ++l)
                _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
#if MM_SIMD_VNNI
        __m256i u[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
            u[r] = unsigned32<T>(x[r][b], levels_u, m4);
        }
#else
        __m256i q[8], q_abs[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
            q[r] = levels32<T>(x[r][b], levels, m4);
            q_abs[r] = _mm256_sign_epi8(q[r], q[r]);
        }
#endif
        const __m256 dx = T::scales8(x, b);
#pragma GCC unroll 4
        for (int t = 0; t < NA; ++t) {
            const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][b].qs));
            __m256i p[8];
#if MM_SIMD_VNNI
            const __m256i start = _mm256_sub_epi32(_mm256_setzero_si256(), dp4_add(_mm256_setzero_si256(), offset_u8, yv));
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) p[r] = dp4_add(start, u[r], yv);
#else
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) p[r] = dot32(q[r], q_abs[r], yv);
#endif
            const __m256 d = _mm256_mul_ps(dx, _mm256_set1_ps(h2f(y[t][b].d)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8_epi32(p)), d, acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

// One row, the same operations per block as one lane of dot_r8.
template <class T>
float dot_r1(int64_t n, const void* w, const void* a) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels())));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const auto* x = static_cast<const Block*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m256i q = levels32<T>(x[b], levels, m4);
        const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
        const int s = hsum_epi32(dot32(q, _mm256_sign_epi8(q, q), yv));
        const __m128 d = _mm_mul_ss(_mm_set_ss(T::scale(x[b])), _mm_set_ss(h2f(y[b].d)));
        acc = _mm_fmadd_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), s), d, acc);
    }
    return _mm_cvtss_f32(acc);
}

#if MM_SIMD_VNNI < 2
// 8 rows of a 4-bit type with one row per int32 lane, transposed in registers: decode, and prompt
// tiles of fewer than kDecodeMinM rows, on 256-bit CPUs. Per block the 8 rows' 16 quant bytes
// (rows k and k + 4 in one vector) are transposed as dwords, so that lane r of q[j] holds row r's
// bytes 4j..4j+3: their low nibbles are elements 4j..4j+3, the high ones 16 + 4j..16 + 4j + 3. Small
// levels (Q4_0, MXFP4), made unsigned (level + kSmallLevel), meet the broadcast activation dwords
// in vpmaddubsw (kGroup16 vectors summed in int16, then vpmaddwd), each lane starting from
// -kSmallLevel · Σ a; larger ones (IQ4_NL) in vpdpbusd with AVX-VNNI (level + kOffset), else in
// ggml's sign trick. No horizontal sums: lane r ends with row r's exact integer sum, and the float
// step per row and block is dot_r1's.
template <class T, int NA>
void dot_r8t(int64_t n, const void* w, size_t w_stride, const void* a, size_t a_stride, float* out) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    // Small levels: vpmaddubsw with int16 sums (no dependency chain) in every variant; larger ones
    // vpdpbusd with AVX-VNNI, else the sign trick.
    constexpr bool kSmall = T::kSmallLevel != 0;
    constexpr int kOff = kSmall ? T::kSmallLevel : MM_SIMD_VNNI ? T::kOffset : 0;
    constexpr bool kSign = !kSmall && !MM_SIMD_VNNI;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i levels_u = _mm256_add_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels()))),
        _mm256_set1_epi8(static_cast<char>(kOff)));
    const Block* x[8];
    for (int r = 0; r < 8; ++r) x[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const BlockQ8_0* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m256 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm256_setzero_ps();
    const auto load128 = [&](int r, int64_t b) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[r][b].qs)); };
    const char* next = static_cast<const char*>(w) + 8 * w_stride;
    const int64_t next_lines = static_cast<int64_t>((8 * w_stride + 63) / 64);
    for (int64_t b = 0; b < nb; ++b) {
        if constexpr (NA == 1) {  // the next 8 rows, as dot_r8 does
            for (int64_t l = b * next_lines / nb; l < (b + 1) * next_lines / nb; ++l)
                _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        int32_t yd[NA][8];  // the activation bytes, 4 per dword
        __m256i start[NA];  // -kOff · Σ a
        for (int t = 0; t < NA; ++t) {
            std::memcpy(yd[t], y[t][b].qs, sizeof(yd[t]));
            if constexpr (!kSign) {
                const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][b].qs));
                start[t] = _mm256_set1_epi32(-kOff * hsum_epi32(dp4_add(_mm256_setzero_si256(), _mm256_set1_epi8(1), yv)));
            }
        }
        __m256i z[4];  // z[k]: rows k and k + 4
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k)
            z[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(load128(k, b)), load128(k + 4, b), 1);
        const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
        const __m256i q[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                              _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        __m256i u[8];  // levels + kOff (signed levels for the sign trick)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            u[j] = _mm256_and_si256(q[j], m4);
            u[j + 4] = _mm256_and_si256(_mm256_srli_epi16(q[j], 4), m4);
            if constexpr (!T::kNibbleIsUnsigned) {
                u[j] = _mm256_shuffle_epi8(levels_u, u[j]);
                u[j + 4] = _mm256_shuffle_epi8(levels_u, u[j + 4]);
            }
        }
        const __m256 dx = T::scales8(x, b);
#pragma GCC unroll 4
        for (int t = 0; t < NA; ++t) {
            __m256i s;
            if constexpr (kSign) {
                s = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) {
                    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(u[j], u[j]),
                                                           _mm256_sign_epi8(_mm256_set1_epi32(yd[t][j]), u[j]));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones16));
                }
            } else if constexpr (kSmall) {
                s = start[t];
                constexpr int G = T::kGroup16;
#pragma GCC unroll 8
                for (int h = 0; h < 8; h += G) {
                    __m256i s16 = _mm256_maddubs_epi16(u[h], _mm256_set1_epi32(yd[t][h]));
#pragma GCC unroll 8
                    for (int j = h + 1; j < h + G; ++j)
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(u[j], _mm256_set1_epi32(yd[t][j])));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(s16, ones16));
                }
            } else {  // AVX-VNNI, levels up to ±127
                // Four chains of vpdpbusd (its latency, not its throughput, would bound one chain).
                s = start[t];
                __m256i s1 = _mm256_setzero_si256(), s2 = _mm256_setzero_si256(), s3 = _mm256_setzero_si256();
#pragma GCC unroll 2
                for (int j = 0; j < 8; j += 4) {
                    s = dp4_add(s, u[j], _mm256_set1_epi32(yd[t][j]));
                    s1 = dp4_add(s1, u[j + 1], _mm256_set1_epi32(yd[t][j + 1]));
                    s2 = dp4_add(s2, u[j + 2], _mm256_set1_epi32(yd[t][j + 2]));
                    s3 = dp4_add(s3, u[j + 3], _mm256_set1_epi32(yd[t][j + 3]));
                }
                s = _mm256_add_epi32(_mm256_add_epi32(s, s1), _mm256_add_epi32(s2, s3));
            }
            const __m256 d = _mm256_mul_ps(dx, _mm256_set1_ps(h2f(y[t][b].d)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

// 8 rows transposed (see DecodeTileFn), one row per int32 lane, for 256-bit CPUs. Per block:
// [0, 256) 8 vectors of signed levels (vector j, lane r: row r's elements 4j..4j+3), then
//   - with AVX-VNNI, and for small levels (kSmallLevel: Q4_0, MXFP4) with AVX2: [256, 288) the
//     int32 -128 · Σ levels of row r; the activation bytes, made unsigned (a + 128) and broadcast
//     4 at a time, meet the levels in vpdpbusd (AVX2: vpmaddubsw, kGroup16 vectors, vpmaddwd);
//   - for IQ4_NL and Q8_0 with AVX2 (levels up to ±128) [256, 512) the |levels|, for ggml's sign
//     trick: vpmaddubsw(|w|, sign(a, w)), then vpmaddwd, per vector;
// and [bytes - 32, bytes) the 8 rows' float scales. The integer sums are exact, the float step per
// row and block dot_r1's.
template <class T>
constexpr bool kTile8SignTrick = MM_SIMD_VNNI == 0 && T::kSmallLevel == 0;
template <class T>
constexpr size_t kTile8Bytes = kTile8SignTrick<T> ? 544 : 320;

template <class T>
void decode_tile8(int64_t n, const void* w, size_t w_stride, void* tile) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels())));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const Block* x[8];
    for (int r = 0; r < 8; ++r) x[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * w_stride);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t b = 0; b < nb; ++b, o += kTile8Bytes<T>) {
        __m256i z[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) z[r] = levels32<T>(x[r][b], levels, m4);
        store_tile8_levels(z, o, kTile8SignTrick<T>);
        float scales[8];
        for (int r = 0; r < 8; ++r) scales[r] = T::scale(x[r][b]);
        std::memcpy(o + kTile8Bytes<T> - 32, scales, sizeof(scales));
    }
}

template <class T, int NA>
void dot_tile8(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const int64_t nb = n / 32;
    const BlockQ8_0* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m256 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm256_setzero_ps();
    const auto* p = static_cast<const uint8_t*>(tile);
    for (int64_t b = 0; b < nb; ++b, p += kTile8Bytes<T>) {
        const __m256 dx = _mm256_loadu_ps(reinterpret_cast<const float*>(p + kTile8Bytes<T> - 32));
#pragma GCC unroll 4
        for (int t = 0; t < NA; ++t) {
            __m256i s;
            if constexpr (kTile8SignTrick<T>) {
                s = dot_tile8_sign(p, y[t][b].qs);
            } else {
#if MM_SIMD_VNNI
                s = dot_tile8_offset(p, y[t][b].qs);
#else
                // Small levels with AVX2: vpmaddubsw of the biased activations, kGroup16 vectors
                // summed in int16, then vpmaddwd, started from -128 · Σ levels.
                const auto vec = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off)); };
                alignas(32) int32_t yu[8];
                _mm256_store_si256(reinterpret_cast<__m256i*>(yu),
                                   _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][b].qs)),
                                                    _mm256_set1_epi8(static_cast<char>(0x80))));
                s = vec(256);
                constexpr int G = T::kGroup16;
#pragma GCC unroll 8
                for (int g = 0; g < 8; g += G) {
                    __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi32(yu[g]), vec(32 * g));
#pragma GCC unroll 8
                    for (int j = g + 1; j < g + G; ++j)
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_set1_epi32(yu[j]), vec(32 * j)));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
                }
#endif
            }
            const __m256 d = _mm256_mul_ps(dx, _mm256_set1_ps(h2f(y[t][b].d)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}
#endif

#if MM_SIMD_VNNI == 2
// 16 W rows against NA activation rows, no tile in memory (decode, and prompt tiles of fewer than
// kDecodeMinM rows). Per block the 16 rows' 16 quant bytes are transposed as dwords in registers
// (128-bit loads into the four lanes, unpack 32 / 64), so that lane r of q[j] holds row r's bytes
// 4j..4j+3: their low nibbles are elements 4j..4j+3, the high ones 16+4j..16+4j+3. The unsigned
// weight bytes (the nibble itself for Q4_0, level + 128 from a table otherwise) meet the
// broadcast signed activation bytes in vpdpbusd, each lane starting from -kOffset · Σ a, so that
// lane r ends with row r's exact integer sum. The float step per row and block is dot_r1's.
template <class T, int NA>
void dot_r16(int64_t n, const void* w, size_t w_stride, const void* a, size_t a_stride, float* out) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    const auto* w8 = static_cast<const uint8_t*>(w);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i levels_u = _mm512_add_epi8(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels()))),
        _mm512_set1_epi8(static_cast<char>(T::kOffset)));
    const __m512i row_off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int>(w_stride)));
    const __m256i ones = _mm256_set1_epi8(1);
    const BlockQ8_0* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m512 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    const auto qs_at = [&](int r, int64_t b) {
        return w8 + r * w_stride + b * sizeof(Block) + offsetof(Block, qs);
    };
    const auto load128 = [&](int r, int64_t b) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs_at(r, b))); };
    const auto load256 = [&](int r, int64_t b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs_at(r, b))); };
    const char* next = static_cast<const char*>(w) + 16 * w_stride;
    const int64_t next_lines = static_cast<int64_t>((16 * w_stride + 63) / 64);
    for (int64_t b = 0; b < nb; ++b) {
        if constexpr (NA == 1) {  // the next 16 rows, as dot_r8 does for its next 8
            for (int64_t l = b * next_lines / nb; l < (b + 1) * next_lines / nb; ++l)
                _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        __m512i u[8];
        if constexpr (T::kBytes) {
            // 32 bytes per row: rows r and r + 8 in one vector, transposed to 8 × 16 dwords.
            __m512i z[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
                z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(load256(r, b)), load256(r + 8, b), 1);
            }
            transpose16x8(z, u);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) u[j] = _mm512_xor_si512(u[j], _mm512_set1_epi8(static_cast<char>(0x80)));
        } else {
            __m512i z[4];  // z[k]: rows k, k + 4, k + 8, k + 12 in its four 128-bit lanes
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) {
                __m512i v = _mm512_castsi128_si512(load128(k, b));
                v = _mm512_inserti32x4(v, load128(k + 4, b), 1);
                v = _mm512_inserti32x4(v, load128(k + 8, b), 2);
                z[k] = _mm512_inserti32x4(v, load128(k + 12, b), 3);
            }
            const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
            const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
            const __m512i q[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                  _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                u[j] = _mm512_and_si512(q[j], m4);
                u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(q[j], 4), m4);
                if constexpr (!T::kNibbleIsUnsigned) {
                    u[j] = _mm512_shuffle_epi8(levels_u, u[j]);
                    u[j + 4] = _mm512_shuffle_epi8(levels_u, u[j + 4]);
                }
            }
        }
        const __m512 dx = T::scales16(w8, _mm512_add_epi32(row_off, _mm512_set1_epi32(static_cast<int>(b * sizeof(Block)))));
#pragma GCC unroll 4
        for (int t = 0; t < NA; ++t) {
            const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][b].qs));
            const __m256i ys8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, yv);  // Σ a, in 8 parts
            __m128i ys = _mm_add_epi32(_mm256_castsi256_si128(ys8), _mm256_extracti128_si256(ys8, 1));
            ys = _mm_add_epi32(ys, _mm_shuffle_epi32(ys, 0x4E));
            ys = _mm_add_epi32(ys, _mm_shuffle_epi32(ys, 0xB1));
            __m512i s = _mm512_set1_epi32(-T::kOffset * _mm_cvtsi128_si32(ys));
            int32_t yd[8];
            std::memcpy(yd, y[t][b].qs, sizeof(yd));
            __m512i s1 = _mm512_setzero_si512();  // two chains of vpdpbusd, as in dot_r8t
#pragma GCC unroll 4
            for (int j = 0; j < 8; j += 2) {
                s = _mm512_dpbusd_epi32(s, u[j], _mm512_set1_epi32(yd[j]));
                s1 = _mm512_dpbusd_epi32(s1, u[j + 1], _mm512_set1_epi32(yd[j + 1]));
            }
            s = _mm512_add_epi32(s, s1);
            const __m512 d = _mm512_mul_ps(dx, _mm512_set1_ps(h2f(y[t][b].d)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

// 16 rows transposed (see DecodeTileFn). Lanes are rows, so a block's integer sum needs no
// horizontal adds: vector j holds every row's elements 4j..4j+3 as signed levels, and vpdpbusd
// multiplies them by the activation's 4 bytes, broadcast and made unsigned (a + 128); the lane
// starts from -128 · Σ levels of its row, which takes the 128 out again exactly. Per row and block
// the float step is dot_r1's: acc = fma(float(sum), scale_w · d_a, acc).
template <class T>
void decode_tile16(int64_t n, const void* w, size_t w_stride, void* tile) {
    using Block = typename T::Block;
    const int64_t nb = n / 32;
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T::levels())));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const Block* x[16];
    for (int r = 0; r < 16; ++r) x[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * w_stride);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t b = 0; b < nb; ++b, o += kTile16BytesPerBlock) {
        __m512i z[8];  // rows r and r + 8
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
            z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(levels32<T>(x[r][b], levels, m4)),
                                      levels32<T>(x[r + 8][b], levels, m4), 1);
        }
        const __m512i sum = transpose16x8_store(z, o);
        _mm512_storeu_si512(o + 512, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
        float scales[16];
        for (int r = 0; r < 16; ++r) scales[r] = T::scale(x[r][b]);
        std::memcpy(o + 576, scales, sizeof(scales));
    }
}

template <int NA>
void dot_tile16(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const int64_t nb = n / 32;
    const BlockQ8_0* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m512 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
    const auto* p = static_cast<const uint8_t*>(tile);
    for (int64_t b = 0; b < nb; ++b, p += kTile16BytesPerBlock) {
        __m512i v[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_si512(p + 64 * j);
        const __m512i start = _mm512_loadu_si512(p + 512);
        const __m512 dx = _mm512_loadu_ps(reinterpret_cast<const float*>(p + 576));
#pragma GCC unroll 4
        for (int t = 0; t < NA; ++t) {
            alignas(32) int32_t yu[8];  // a + 128 as unsigned bytes, 4 per dword
            _mm256_store_si256(reinterpret_cast<__m256i*>(yu),
                               _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[t][b].qs)), bias));
            __m512i s = start;
            __m512i s1 = _mm512_setzero_si512();  // two chains, as in dot_r8t
#pragma GCC unroll 4
            for (int j = 0; j < 8; j += 2) {
                s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(yu[j]), v[j]);
                s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(yu[j + 1]), v[j + 1]);
            }
            s = _mm512_add_epi32(s, s1);
            const __m512 d = _mm512_mul_ps(dx, _mm512_set1_ps(h2f(y[t][b].d)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}
#endif

}  // namespace

#if MM_SIMD_VNNI == 2
const int64_t kTileRows = 16;
const size_t kTileBytesQ4_0 = kTile16BytesPerBlock, kTileBytesIQ4_NL = kTile16BytesPerBlock,
             kTileBytesMXFP4 = kTile16BytesPerBlock, kTileBytesQ8_0 = kTile16BytesPerBlock;
#define MM_TILE(T, name)                                                                                       \
    void decode_tile_##name(int64_t n, const void* w, size_t ws, void* tile) { decode_tile16<T>(n, w, ws, tile); } \
    void vec_dot_tile_##name(int64_t n, const void* tile, const void* a, size_t as, float* out) {                 \
        dot_tile16<1>(n, tile, a, as, out);                                                                    \
    }                                                                                                          \
    void vec_dot_tile_x4_##name(int64_t n, const void* tile, const void* a, size_t as, float* out) {              \
        dot_tile16<4>(n, tile, a, as, out);                                                                    \
    }
#else
const int64_t kTileRows = 8;
const size_t kTileBytesQ4_0 = kTile8Bytes<Q4_0Type>, kTileBytesIQ4_NL = kTile8Bytes<IQ4NLType>,
             kTileBytesMXFP4 = kTile8Bytes<MXFP4Type>, kTileBytesQ8_0 = kTile8Bytes<Q8_0Type>;
#define MM_TILE(T, name)                                                                                      \
    void decode_tile_##name(int64_t n, const void* w, size_t ws, void* tile) { decode_tile8<T>(n, w, ws, tile); } \
    void vec_dot_tile_##name(int64_t n, const void* tile, const void* a, size_t as, float* out) {                \
        dot_tile8<T, 1>(n, tile, a, as, out);                                                                 \
    }                                                                                                         \
    void vec_dot_tile_x4_##name(int64_t n, const void* tile, const void* a, size_t as, float* out) {             \
        dot_tile8<T, 4>(n, tile, a, as, out);                                                                 \
    }
#endif
MM_TILE(Q4_0Type, q4_0)
MM_TILE(IQ4NLType, iq4_nl)
MM_TILE(MXFP4Type, mxfp4)
MM_TILE(Q8_0Type, q8_0)
#undef MM_TILE

#if MM_SIMD_VNNI == 2
void vec_dot_q8_0_q8_0_r16(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<Q8_0Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_q8_0_q8_0_r16x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<Q8_0Type, 4>(n, w, ws, a, as, out);
}
void vec_dot_q4_0_q8_0_r16(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<Q4_0Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_q4_0_q8_0_r16x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<Q4_0Type, 4>(n, w, ws, a, as, out);
}
void vec_dot_iq4_nl_q8_0_r16(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<IQ4NLType, 1>(n, w, ws, a, as, out);
}
void vec_dot_iq4_nl_q8_0_r16x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<IQ4NLType, 4>(n, w, ws, a, as, out);
}
void vec_dot_mxfp4_q8_0_r16(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<MXFP4Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_mxfp4_q8_0_r16x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r16<MXFP4Type, 4>(n, w, ws, a, as, out);
}
#endif

float vec_dot_q4_0_q8_0_r(int64_t n, const void* w, const void* a) { return dot_r1<Q4_0Type>(n, w, a); }
float vec_dot_iq4_nl_q8_0_r(int64_t n, const void* w, const void* a) { return dot_r1<IQ4NLType>(n, w, a); }
float vec_dot_mxfp4_q8_0_r(int64_t n, const void* w, const void* a) { return dot_r1<MXFP4Type>(n, w, a); }
float vec_dot_q8_0_q8_0_r(int64_t n, const void* w, const void* a) { return dot_r1<Q8_0Type>(n, w, a); }

void vec_dot_q8_0_q8_0_r8(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r8<Q8_0Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_q8_0_q8_0_r8x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    dot_r8<Q8_0Type, 4>(n, w, ws, a, as, out);
}

// The 4-bit types' 8 rows: transposed in registers on 256-bit CPUs (dot_r8t); the AVX-512 variant
// uses these only for the rows after its 16-row groups.
#if MM_SIMD_VNNI == 2
#define MM_R8 dot_r8
#else
#define MM_R8 dot_r8t
#endif
void vec_dot_q4_0_q8_0_r8(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<Q4_0Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_q4_0_q8_0_r8x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<Q4_0Type, 4>(n, w, ws, a, as, out);
}
void vec_dot_iq4_nl_q8_0_r8(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<IQ4NLType, 1>(n, w, ws, a, as, out);
}
void vec_dot_iq4_nl_q8_0_r8x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<IQ4NLType, 4>(n, w, ws, a, as, out);
}
void vec_dot_mxfp4_q8_0_r8(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<MXFP4Type, 1>(n, w, ws, a, as, out);
}
void vec_dot_mxfp4_q8_0_r8x4(int64_t n, const void* w, size_t ws, const void* a, size_t as, float* out) {
    MM_R8<MXFP4Type, 4>(n, w, ws, a, as, out);
}
#undef MM_R8


}  // namespace moemesh::quants::MM_SIMD_NS

#pragma GCC pop_options

#endif  // x86
