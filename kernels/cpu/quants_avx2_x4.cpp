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
    __m128 acc[4];
#define MM_INIT(r) acc[r] = _mm_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < nb; ++i) {
        const typename Src::Block blk = src.at(i);
        const float xd = blk.d(), xdmin = blk.dmin();
        const __m128i mins = blk.mins();
        __m128i mp[4];  // Σ min · (sum of 32 activations) per row, in 4 parts
#define MM_MINS(r) mp[r] = q4k_min_products(mins, y[r][i].bsums);
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
#define MM_ACC(r) acc[r] = q4k_float_step(acc[r], sumi[r], mp[r], y[r][i].d * xd, -y[r][i].d * xdmin);
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r) out[r] = _mm_cvtss_f32(acc[r]);
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

// Where the parts of a Q4_K tile of R rows lie in a super-block's bytes (layout at the tiles below).
template <int R>
struct Q4KTile {
    static constexpr size_t kScales = 256 * R, kMins = kScales + 32 * R, kD = kMins + 16 * R, kDmin = kD + 4 * R,
                            kBytes = kDmin + 4 * R;
};

// A Q4_K tile's per-row part of super-block i of the R rows x[0..R): the sub-block scales, the
// mins as int16 pairs, d and dmin, each transposed to one lane per row.
template <int R>
void q4k_tile_scales(const BlockQ4_K* const* x, int64_t i, uint8_t* o) {
    int32_t sc[8][R];
    uint32_t mp[4][R];
    float d[R], dmin[R];
    for (int r = 0; r < R; ++r) {
        uint16_t ms[16];  // 8 scales, then 8 mins
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ms), q4k_mins_and_scales(x[r][i].scales));
        for (int sb = 0; sb < 8; ++sb) sc[sb][r] = ms[sb];
        for (int t = 0; t < 4; ++t) mp[t][r] = ms[8 + 2 * t] | (static_cast<uint32_t>(ms[9 + 2 * t]) << 16);
        d[r] = h2f(x[r][i].d);
        dmin[r] = h2f(x[r][i].dmin);
    }
    std::memcpy(o + Q4KTile<R>::kScales, sc, sizeof(sc));
    std::memcpy(o + Q4KTile<R>::kMins, mp, sizeof(mp));
    std::memcpy(o + Q4KTile<R>::kD, d, sizeof(d));
    std::memcpy(o + Q4KTile<R>::kDmin, dmin, sizeof(dmin));
}

// The activation sums of sub-blocks (2u, 2u + 1) of a Q8_K block as int16 pairs, u = 0..3: what a
// tile's mins (int16 pairs per lane) meet in vpmaddwd / vpdpwssd.
inline void q8k_bsum_pairs(const BlockQ8_K& y, int32_t pairs[4]) {
    const __m256i q8sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.bsums));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(pairs),
                     _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1)));
}

#if MM_SIMD_VNNI == 2
// 16 Q4_K rows transposed (see DecodeTileFn), one row per int32 lane. Per super-block
// (kQ4KTile16BytesPerBlock bytes): for each 32-element sub-block s, 8 vectors of its unsigned
// nibbles (vector j, lane r: row r's elements 4j..4j+3 of the sub-block) [0, 4096); the sub-block
// scales, 8 × 16 int32 [4096, 4608); the mins as int16 pairs (min 2t, min 2t+1) per lane, 4 × 16
// [4608, 4864); 16 floats d [4864, 4928) and 16 floats dmin [4928, 4992). The nibbles go straight
// into vpdpbusd against the activations' broadcast bytes; per sub-block the lane sums times the
// scale (vpmulld), the mins against the bsums' pair sums (vpdpwssd): the exact integer sums of
// the one-row kernel, then its float step (q4k_float_step) on 16 rows at once.
using Q4KTile16 = Q4KTile<16>;
static_assert(kQ4KTile16BytesPerBlock == Q4KTile16::kBytes, "tile layout");

void decode_tile16_q4k(int64_t n, const void* w, size_t w_stride, void* tile) {
    const BlockQ4_K* x[16];
    for (int r = 0; r < 16; ++r) x[r] = reinterpret_cast<const BlockQ4_K*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const __m512i m4 = _mm512_set1_epi8(0xF);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, o += kQ4KTile16BytesPerBlock) {
        for (int j = 0; j < 4; ++j) {  // group j: sub-block 2j in the low nibbles, 2j + 1 in the high ones
            __m512i z[8], q[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
                z[r] = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r][i].qs + 32 * j))),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r + 8][i].qs + 32 * j)), 1);
            }
            transpose16x8(z, q);
#pragma GCC unroll 8
            for (int v = 0; v < 8; ++v) {
                _mm512_storeu_si512(o + 512 * (2 * j) + 64 * v, _mm512_and_si512(q[v], m4));
                _mm512_storeu_si512(o + 512 * (2 * j + 1) + 64 * v, _mm512_and_si512(_mm512_srli_epi16(q[v], 4), m4));
            }
        }
        q4k_tile_scales<16>(x, i, o);
    }
}

template <int NA>
void dot_tile16_q4_K(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m512 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    const auto* p = static_cast<const uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, p += kQ4KTile16BytesPerBlock) {
        __m512i sumi[NA];
        for (int t = 0; t < NA; ++t) sumi[t] = _mm512_setzero_si512();
        for (int sb = 0; sb < 8; ++sb) {
            __m512i v[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_si512(p + 512 * sb + 64 * j);
            const __m512i sc = _mm512_loadu_si512(p + Q4KTile16::kScales + 64 * sb);
#pragma GCC unroll 4
            for (int t = 0; t < NA; ++t) {
                int32_t ya[8];
                std::memcpy(ya, y[t][i].qs + 32 * sb, sizeof(ya));
                __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) s = _mm512_dpbusd_epi32(s, v[j], _mm512_set1_epi32(ya[j]));
                sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(s, sc));
            }
        }
        __m512i mp[4];
        for (int u = 0; u < 4; ++u) mp[u] = _mm512_loadu_si512(p + Q4KTile16::kMins + 64 * u);
        const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(p + Q4KTile16::kD));
        const __m512 dmin = _mm512_loadu_ps(reinterpret_cast<const float*>(p + Q4KTile16::kDmin));
        for (int t = 0; t < NA; ++t) {
            int32_t pairs[4];
            q8k_bsum_pairs(y[t][i], pairs);
            __m512i summ = _mm512_setzero_si512();
            for (int u = 0; u < 4; ++u) summ = _mm512_dpwssd_epi32(summ, mp[u], _mm512_set1_epi32(pairs[u]));
            const __m512 dy = _mm512_set1_ps(y[t][i].d);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, dy), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, dy)), acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}
#endif

#if MM_SIMD_VNNI < 2
// 8 Q4_K rows transposed for 256-bit CPUs, the 16-row tile's layout at half width (one row per
// int32 lane): per super-block (kQ4KTile8Bytes bytes) for each 32-element sub-block s 8 vectors
// of its unsigned nibbles (vector j, lane r: row r's elements 4j..4j+3 of the sub-block) [0, 2048);
// the sub-block scales, 8 × 8 int32 [2048, 2304); the mins as int16 pairs, 4 × 8 [2304, 2432);
// 8 floats d [2432, 2464) and 8 floats dmin [2464, 2496). Per sub-block the nibbles meet the
// activations' broadcast bytes in vpdpbusd (AVX2: vpmaddubsw, whose int16 pair sums of all 8
// vectors stay below 2^15: 8 · 2 · 15 · 127, then vpmaddwd), times the scale (vpmulld); the mins
// against the bsums' pair sums (vpmaddwd): the one-row kernel's exact integer sums, then its
// float step (q4k_float_step) on 8 rows at once.
using Q4KTile8 = Q4KTile<8>;
constexpr size_t kQ4KTile8Bytes = Q4KTile8::kBytes;

void decode_tile8_q4k(int64_t n, const void* w, size_t w_stride, void* tile) {
    const BlockQ4_K* x[8];
    for (int r = 0; r < 8; ++r) x[r] = reinterpret_cast<const BlockQ4_K*>(static_cast<const uint8_t*>(w) + r * w_stride);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    auto* o = static_cast<uint8_t*>(tile);
    for (int64_t i = 0; i < n / kQK_K; ++i, o += kQ4KTile8Bytes) {
        for (int j = 0; j < 4; ++j) {  // group j: sub-block 2j in the low nibbles, 2j + 1 in the high ones
            __m256i z[8], q[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) z[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r][i].qs + 32 * j));
            transpose8x8(z, q);
#pragma GCC unroll 8
            for (int v = 0; v < 8; ++v) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 256 * (2 * j) + 32 * v), _mm256_and_si256(q[v], m4));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 256 * (2 * j + 1) + 32 * v),
                                    _mm256_and_si256(_mm256_srli_epi16(q[v], 4), m4));
            }
        }
        q4k_tile_scales<8>(x, i, o);
    }
}

template <int NA>
void dot_tile8_q4_K(int64_t n, const void* tile, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[NA];
    for (int t = 0; t < NA; ++t) y[t] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + t * a_stride);
    __m256 acc[NA];
    for (int t = 0; t < NA; ++t) acc[t] = _mm256_setzero_ps();
    const auto* p = static_cast<const uint8_t*>(tile);
    const auto vec = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off)); };
    for (int64_t i = 0; i < n / kQK_K; ++i, p += kQ4KTile8Bytes) {
        __m256i sumi[NA];
        for (int t = 0; t < NA; ++t) sumi[t] = _mm256_setzero_si256();
        for (int sb = 0; sb < 8; ++sb) {
            const __m256i sc = vec(Q4KTile8::kScales + 32 * sb);
#pragma GCC unroll 4
            for (int t = 0; t < NA; ++t) {
                int32_t ya[8];
                std::memcpy(ya, y[t][i].qs + 32 * sb, sizeof(ya));
#if MM_SIMD_VNNI
                __m256i s = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();  // two vpdpbusd chains
#pragma GCC unroll 4
                for (int j = 0; j < 8; j += 2) {
                    s = dp4_add(s, vec(256 * sb + 32 * j), _mm256_set1_epi32(ya[j]));
                    s1 = dp4_add(s1, vec(256 * sb + 32 * j + 32), _mm256_set1_epi32(ya[j + 1]));
                }
                s = _mm256_add_epi32(s, s1);
#else
                __m256i s16 = _mm256_maddubs_epi16(vec(256 * sb), _mm256_set1_epi32(ya[0]));
#pragma GCC unroll 8
                for (int j = 1; j < 8; ++j)
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(vec(256 * sb + 32 * j), _mm256_set1_epi32(ya[j])));
                const __m256i s = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(s, sc));
            }
        }
        const __m256 d = _mm256_loadu_ps(reinterpret_cast<const float*>(p + Q4KTile8::kD));
        const __m256 dmin = _mm256_loadu_ps(reinterpret_cast<const float*>(p + Q4KTile8::kDmin));
        for (int t = 0; t < NA; ++t) {
            int32_t pairs[4];
            q8k_bsum_pairs(y[t][i], pairs);
            __m256i summ = _mm256_setzero_si256();
            for (int u = 0; u < 4; ++u) summ = madd_add(summ, vec(Q4KTile8::kMins + 32 * u), _mm256_set1_epi32(pairs[u]));
            const __m256 dy = _mm256_set1_ps(y[t][i].d);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(d, dy), acc[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dmin, dy)), acc[t]);
        }
    }
    for (int t = 0; t < NA; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}
#endif

}  // namespace

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

#if MM_SIMD_VNNI == 2
const size_t kTileBytesQ4_K = kQ4KTile16BytesPerBlock;
void decode_tile_q4_K(int64_t n, const void* w, size_t ws, void* tile) { decode_tile16_q4k(n, w, ws, tile); }
void vec_dot_tile_q4_K(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile16_q4_K<1>(n, tile, a, as, out);
}
void vec_dot_tile_x4_q4_K(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile16_q4_K<4>(n, tile, a, as, out);
}
#else
const size_t kTileBytesQ4_K = kQ4KTile8Bytes;
void decode_tile_q4_K(int64_t n, const void* w, size_t ws, void* tile) { decode_tile8_q4k(n, w, ws, tile); }
void vec_dot_tile_q4_K(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile8_q4_K<1>(n, tile, a, as, out);
}
void vec_dot_tile_x4_q4_K(int64_t n, const void* tile, const void* a, size_t as, float* out) {
    dot_tile8_q4_K<4>(n, tile, a, as, out);
}
#endif

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
