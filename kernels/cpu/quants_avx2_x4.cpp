// AVX2 dot products of one weight row with four activation rows (prompt processing): the weight
// block is loaded and decoded once for the four rows. Per row the arithmetic is exactly that of the
// single-row kernel in quants_avx2.cpp (same integer sums, same float operations in the same
// order), so a row's result does not depend on how many rows were batched with it.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

// Straight-line repetition over the 4 rows: GCC -O2 keeps per-row vector arrays in registers only
// when every index is a constant.
#define MM_ROWS4(X) X(0) X(1) X(2) X(3)

namespace moemesh::quants::MM_SIMD_NS {
namespace {

// ax = |w|, sy = a·sign(w): maddubs(ax, sy) = w·a pairs (as mul_sum_i8_pairs_float).
inline __m256 dot_signed(__m256i ax, __m256i qx, __m256i qy) {
    return _mm256_cvtepi32_ps(dp4_add(_mm256_setzero_si256(), ax, _mm256_sign_epi8(qy, qx)));
}

#if MM_SIMD_VNNI == 2
// 32 bytes at p0, then 32 at p1, as one 512-bit vector.
inline __m512i load_pair(const int8_t* p0, const int8_t* p1) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1)), 1);
}
#endif

void dot_q8_0_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const int64_t nb = n / 32;
    const auto* y0 = static_cast<const BlockQ8_0*>(a);
    const BlockQ8_0* y[4];
    for (int r = 0; r < 4; ++r) {
        y[r] = reinterpret_cast<const BlockQ8_0*>(reinterpret_cast<const uint8_t*>(y0) + r * a_stride);
    }
    const auto load_w = [&](int64_t i) -> __m256i {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const BlockQ8_0*>(w)[i].qs));
    };
    const auto w_d = [&](int64_t i) -> float { return h2f(static_cast<const BlockQ8_0*>(w)[i].d); };
    __m256 acc0[4], acc1[4];
#define MM_INIT(r) acc0[r] = _mm256_setzero_ps(), acc1[r] = _mm256_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    int64_t i = 0;
#if MM_SIMD_VNNI == 2
    {
        // Blocks i and i + 1 side by side in one 512-bit vector, so accz[r] is [acc0[r] | acc1[r]].
        // The sign trick as a masked subtract: where w < 0 the activation is negated; where w = 0
        // |w| is 0 and the product with it too, as with vpsignb.
        __m512 accz[4];
#define MM_INIT(r) accz[r] = _mm512_setzero_ps();
        MM_ROWS4(MM_INIT)
#undef MM_INIT
        const auto* xb = static_cast<const BlockQ8_0*>(w);
        for (; i + 2 <= nb; i += 2) {
            const __m512i qx = load_pair(xb[i].qs, xb[i + 1].qs);
            const __m512i ax = _mm512_abs_epi8(qx);
            const __mmask64 neg = _mm512_movepi8_mask(qx);
            const float dx0 = w_d(i), dx1 = w_d(i + 1);
#define MM_ROW(r)                                                                                                  \
    {                                                                                                              \
        const __m512i qy = load_pair(y[r][i].qs, y[r][i + 1].qs);                                                       \
        const __m512i sy = _mm512_mask_sub_epi8(qy, neg, _mm512_setzero_si512(), qy);                             \
        const __m512 d = _mm512_mask_broadcastss_ps(_mm512_set1_ps(dx0 * h2f(y[r][i].d)), 0xFF00,                 \
                                                    _mm_set_ss(dx1 * h2f(y[r][i + 1].d)));                        \
        accz[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy)), accz[r]); \
    }
            MM_ROWS4(MM_ROW)
#undef MM_ROW
        }
#define MM_SPLIT(r)                              \
    acc0[r] = _mm512_castps512_ps256(accz[r]); \
    acc1[r] = _mm512_castps512_ps256(_mm512_shuffle_f32x4(accz[r], accz[r], 0xEE));
        MM_ROWS4(MM_SPLIT)
#undef MM_SPLIT
    }
#endif
    for (; i + 2 <= nb; i += 2) {
        const __m256i qx0 = load_w(i), qx1 = load_w(i + 1);
        const __m256i ax0 = _mm256_sign_epi8(qx0, qx0), ax1 = _mm256_sign_epi8(qx1, qx1);
        const float dx0 = w_d(i), dx1 = w_d(i + 1);
#define MM_ROW(r)                                                                                                     \
    acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx0 * h2f(y[r][i].d)),                                                   \
                              dot_signed(ax0, qx0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].qs))), \
                              acc0[r]);                                                                               \
    acc1[r] = _mm256_fmadd_ps(                                                                                        \
        _mm256_set1_ps(dx1 * h2f(y[r][i + 1].d)),                                                                     \
        dot_signed(ax1, qx1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i + 1].qs))), acc1[r]);
        MM_ROWS4(MM_ROW)
#undef MM_ROW
    }
    for (; i < nb; ++i) {
        const __m256i qx = load_w(i);
        const __m256i ax = _mm256_sign_epi8(qx, qx);
        const float dx = w_d(i);
#define MM_ROW(r)                                                                                                   \
    acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y[r][i].d)),                                                  \
                              dot_signed(ax, qx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].qs))), \
                              acc0[r]);
        MM_ROWS4(MM_ROW)
#undef MM_ROW
    }
#define MM_OUT(r) out[r] = hsum_ps(_mm256_add_ps(acc0[r], acc1[r]));
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

// Q4_K against 4 Q8_K rows, the weights read through Src: per super-block i, Src::Block b = src.at(i)
// gives d(), dmin(), mins() (8 int16) and group(j, q4l, q4h, scale_l, scale_h) for the four
// 64-element groups. Q4KEncoded computes them from the block (as the one-row kernel does), and
// Q4KDecoded loads what decode_row_q4_K stored; the arithmetic is the same either way.
struct Q4KEncoded {
    const BlockQ4_K* x;
    struct Block {
        const BlockQ4_K& b;
        __m256i mins_and_scales, scales;
        explicit Block(const BlockQ4_K& blk) : b(blk), mins_and_scales(q4k_mins_and_scales(blk.scales)) {
            const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
            scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        }
        float d() const { return h2f(b.d); }
        float dmin() const { return h2f(b.dmin); }
        __m128i mins() const { return _mm256_extracti128_si256(mins_and_scales, 1); }
        void group(int j, __m256i& q4l, __m256i& q4h, __m256i& scale_l, __m256i& scale_h) const {
            const __m256i m4 = _mm256_set1_epi8(0xF);
            scale_l = _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j])));
            scale_h = _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j + 1])));
            const __m256i q4bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * j));
            q4l = _mm256_and_si256(q4bits, m4);
            q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
        }
#if MM_SIMD_VNNI == 2
        // The same group as 512-bit vectors: the low nibbles then the high ones, scale_l then scale_h.
        void group512(int j, __m512i& q4, __m512i& sc) const { q4k_group512(b.qs + 32 * j, scales, j, &q4, &sc); }
#endif
    };
    Block at(int64_t i) const { return Block(x[i]); }
};

struct Q4KDecoded {
    const uint8_t* dec;  // decode_row_q4_K's layout
    struct Block {
        const uint8_t* p;
        float d() const { return load_f32(p); }
        float dmin() const { return load_f32(p + 4); }
        __m128i mins() const { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)); }
        void group(int j, __m256i& q4l, __m256i& q4h, __m256i& scale_l, __m256i& scale_h) const {
            q4l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + 64 * j));
            q4h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + 64 * j));
            scale_l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 288 + 64 * j));
            scale_h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 320 + 64 * j));
        }
#if MM_SIMD_VNNI == 2
        // 512-bit groups: a group's low and high nibbles are 64 adjacent bytes of the decoded row,
        // and so are its two scale vectors.
        void group512(int j, __m512i& q4, __m512i& sc) const {
            q4 = _mm512_loadu_si512(p + 32 + 64 * j);
            sc = _mm512_loadu_si512(p + 288 + 64 * j);
        }
#endif
    };
    Block at(int64_t i) const { return Block{dec + i * kQ4KDecBytesPerBlock}; }
};

template <class Src>
void q4k_x4(int64_t n, const Src& src, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) {
        y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    }
    const int64_t nb = n / kQK_K;
    __m256 acc[4];
    __m128 acc_m[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps(), acc_m[r] = _mm_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < nb; ++i) {
        const typename Src::Block blk = src.at(i);
        const float xd = blk.d(), xdmin = blk.dmin();
        const __m128i mins = blk.mins();
#define MM_MINS(r)                                                                                               \
    {                                                                                                            \
        const __m256i q8sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].bsums));              \
        const __m128i q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1)); \
        const __m128i prod = _mm_madd_epi16(mins, q8s);                                                          \
        acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-y[r][i].d * xdmin), _mm_cvtepi32_ps(prod), acc_m[r]);               \
    }
        MM_ROWS4(MM_MINS)
#undef MM_MINS
        __m256i sumi[4];
#if MM_SIMD_VNNI == 2
        {
            // 512-bit groups (the activation's 64 bytes are one vector too): the low 256-bit half
            // of w[r] adds up what the AVX2 loop below adds with scale_l, the high half the scale_h
            // part; their sum is the same int32 lanes.
            __m512i w[4];
#define MM_ZERO(r) w[r] = _mm512_setzero_si512();
            MM_ROWS4(MM_ZERO)
#undef MM_ZERO
#pragma GCC unroll 4
            for (int j = 0; j < kQK_K / 64; ++j) {
                __m512i q4, sc;
                blk.group512(j, q4, sc);
#define MM_ROW(r) w[r] = _mm512_dpwssd_epi32(w[r], sc, _mm512_maddubs_epi16(q4, _mm512_loadu_si512(y[r][i].qs + 64 * j)));
                MM_ROWS4(MM_ROW)
#undef MM_ROW
            }
#define MM_FOLD(r) sumi[r] = fold512(w[r]);
            MM_ROWS4(MM_FOLD)
#undef MM_FOLD
        }
#else
        {
#define MM_ZERO(r) sumi[r] = _mm256_setzero_si256();
            MM_ROWS4(MM_ZERO)
#undef MM_ZERO
            for (int j = 0; j < kQK_K / 64; ++j) {
                __m256i q4l, q4h, scale_l, scale_h;
                blk.group(j, q4l, q4h, scale_l, scale_h);
#define MM_ROW(r)                                                                          \
    {                                                                                      \
        const int8_t* q8 = y[r][i].qs + 64 * j;                                            \
        const __m256i q8l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));      \
        const __m256i q8h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32)); \
        sumi[r] = madd_add(sumi[r], scale_l, _mm256_maddubs_epi16(q4l, q8l));              \
        sumi[r] = madd_add(sumi[r], scale_h, _mm256_maddubs_epi16(q4h, q8h));              \
    }
                MM_ROWS4(MM_ROW)
#undef MM_ROW
            }
        }
#endif
#define MM_ACC(r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y[r][i].d * xd), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r)                                                           \
    {                                                                       \
        __m128 m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r])); \
        m = _mm_add_ss(m, _mm_movehdup_ps(m));                              \
        out[r] = hsum_ps(acc[r]) + _mm_cvtss_f32(m);                        \
    }
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

}  // namespace

void vec_dot_q8_0_q8_0_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_q8_0_x4(n, w, a, a_stride, out);
}

void vec_dot_q4_K_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    q4k_x4(n, Q4KEncoded{static_cast<const BlockQ4_K*>(w)}, a, a_stride, out);
}

// Q4_K's decoded row (prompt path, see DecodeRowFn): per super-block kQ4KDecBytesPerBlock bytes:
// [0, 32) fp16(d), fp16(dmin) as floats and, from byte 16, the 8 mins as int16; [32, 288) per
// 64-element group j the low and the high nibbles as bytes (64 bytes); [288, 544) per group j its
// two scale vectors as vec_dot_q4_K_q8_K_x4 shuffles them. What is left per activation row is the
// x4 kernel's arithmetic, unchanged.
void decode_row_q4_K(int64_t n, const void* w, void* dec) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    auto* o = static_cast<uint8_t*>(dec);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int64_t i = 0; i < n / kQK_K; ++i, o += kQ4KDecBytesPerBlock) {
        const float dd[2] = {h2f(x[i].d), h2f(x[i].dmin)};
        std::memcpy(o, dd, sizeof(dd));
        const __m256i mins_and_scales = q4k_mins_and_scales(x[i].scales);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm256_extracti128_si256(mins_and_scales, 1));
        const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        for (int j = 0; j < kQK_K / 64; ++j) {
            const __m256i q4bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qs + 32 * j));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 + 64 * j), _mm256_and_si256(q4bits, m4));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64 + 64 * j),
                                _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 288 + 64 * j),
                                _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j]))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 320 + 64 * j),
                                _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[2 * j + 1]))));
        }
    }
}

void vec_dot_q4_K_dec_x4(int64_t n, const void* dec, const void* a, size_t a_stride, float* out) {
    q4k_x4(n, Q4KDecoded{static_cast<const uint8_t*>(dec)}, a, a_stride, out);
}

void vec_dot_q6_K_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) {
        y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    }
    const int64_t nb = n / kQK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256 acc[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < nb; ++i) {
        const float xd = h2f(x[i].d);
        const __m128i scales8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
        __m256i sumi[4];  // start from -32 · Σ scale·bsum: the offset of the 6-bit values
#define MM_ZERO(r) sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(), q6k_offset(scales8, y[r][i].bsums));
        MM_ROWS4(MM_ZERO)
#undef MM_ZERO
        for (int j = 0; j < kQK_K / 128; ++j) {
            const uint8_t* q4 = x[i].ql + 64 * j;
            const __m256i q4bits1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4));
            const __m256i q4bits2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + 32));
            const __m256i q4bitsH = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qh + 32 * j));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(q4bits1, m4), _mm256_slli_epi16(_mm256_and_si256(q4bitsH, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(q4bits2, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bitsH, 6), m2), 4));
            __m256i sc[4];
#define MM_SC(s) sc[s] = scale_pair(scales8, 4 * j + s);
            MM_ROWS4(MM_SC)
#undef MM_SC
#define MM_PART(r, s)                                                                                            \
    {                                                                                                            \
        const __m256i q8v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].qs + 128 * j + 32 * s)); \
        sumi[r] = madd_add(sumi[r], sc[s], _mm256_maddubs_epi16(q[s], q8v));                                     \
    }
#define MM_ROW(r) MM_PART(r, 0) MM_PART(r, 1) MM_PART(r, 2) MM_PART(r, 3)
            MM_ROWS4(MM_ROW)
#undef MM_ROW
#undef MM_PART
        }
#define MM_ACC(r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y[r][i].d * xd), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r) out[r] = hsum_ps(acc[r]);
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

}  // namespace moemesh::quants::MM_SIMD_NS

#undef MM_ROWS4

#pragma GCC pop_options

#endif  // x86
