// AVX2 row dot products of the i-quant low-bit weight types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
// IQ1_S, IQ1_M) against Q8_K activations, one-row and four-row (prompt) versions, selected at run time
// by quants_dot.cpp's type_kernels. The arithmetic is that of ggml's x86 AVX2 ggml_vec_dot_<t>_q8_K:
// per 32 elements the grid magnitudes (looked up 8 or 4 bytes at a time) times the activations with
// the weights' signs applied (maddubs), times the odd sub-block scale (madd), summed per int32 lane
// over the super-block; then one fma per super-block with d = fp16(x.d) · y.d into 8 float lanes and
// one horizontal sum. Integer sums are exact, so how they are grouped does not matter: each float lane
// sees the same integer as in ggml and results match llama.cpp's CPU backend where the compiler keeps
// the float operation order.
//
// Compiled for AVX2 through the target pragma, like quants_avx2.cpp (see the note there).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

#define MM_ROWS4(X) X(0) X(1) X(2) X(3)

namespace moemesh::quants::MM_SIMD_NS {
namespace {

// kIqSigns[i] spread to 8 bytes: 0xFF (−1) where the element is negative, else 0x01 (ggml's
// keven_signs_q2xs): a sign index turns into a _mm256_sign_epi8 operand with one load.
constexpr std::array<uint64_t, 128> make_even_signs() {
    std::array<uint64_t, 128> t{};
    for (int i = 0; i < 128; ++i) {
        int parity = 0;
        for (int b = 0; b < 7; ++b) parity ^= (i >> b) & 1;
        const int bits = i | (parity << 7);
        uint64_t v = 0;
        for (int j = 0; j < 8; ++j) v |= static_cast<uint64_t>((bits >> j) & 1 ? 0xFF : 0x01) << (8 * j);
        t[i] = v;
    }
    return t;
}
constexpr std::array<uint64_t, 128> kEvenSigns = make_even_signs();

inline __m256i signs4(uint32_t packed) {  // four 7-bit sign indices (bits 0-27) → 32 sign bytes
    return _mm256_set_epi64x(static_cast<int64_t>(kEvenSigns[(packed >> 21) & 127]),
                             static_cast<int64_t>(kEvenSigns[(packed >> 14) & 127]),
                             static_cast<int64_t>(kEvenSigns[(packed >> 7) & 127]),
                             static_cast<int64_t>(kEvenSigns[packed & 127]));
}

// 32 sign bits (bit j: element j negative) → 32 bytes of ±1.
inline __m256i signs_from_bits(uint32_t bits) {
    const __m256i byte_of = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bit_of = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
    const __m256i sel = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), byte_of), bit_of);
    return _mm256_or_si256(_mm256_cmpeq_epi8(sel, bit_of), _mm256_set1_epi8(1));
}

inline __m256i grid64(const uint64_t* grid, int i3, int i2, int i1, int i0) {
    return _mm256_set_epi64x(static_cast<int64_t>(grid[i3]), static_cast<int64_t>(grid[i2]),
                             static_cast<int64_t>(grid[i1]), static_cast<int64_t>(grid[i0]));
}

inline __m256i grid32(const uint32_t* grid, const int* idx) {
    return _mm256_set_epi32(static_cast<int>(grid[idx[7]]), static_cast<int>(grid[idx[6]]),
                            static_cast<int>(grid[idx[5]]), static_cast<int>(grid[idx[4]]),
                            static_cast<int>(grid[idx[3]]), static_cast<int>(grid[idx[2]]),
                            static_cast<int>(grid[idx[1]]), static_cast<int>(grid[idx[0]]));
}

// The 8 per-32 scale bytes of IQ2_XS / IQ2_S (low nibble: first 16 elements, high: next 16) as odd
// int16 scales: lanes 0-7 the low nibbles of bytes 0-7, lanes 8-15 the high ones. Chunk ib's scales
// are then _mm256_shuffle_epi8(scales16, kScaleShuffleK4[ib]) (lane ib in the low 128 bits, lane
// 8 + ib in the high ones).
inline __m256i odd_scales16(const uint8_t* scales) {
    uint64_t aux;
    std::memcpy(&aux, scales, 8);
    const __m128i m4 = _mm_set1_epi8(0xF);
    const __m128i s = _mm_and_si128(_mm_set_epi64x(static_cast<int64_t>(aux >> 4), static_cast<int64_t>(aux)), m4);
    return _mm256_cvtepi8_epi16(_mm_add_epi8(_mm_slli_epi16(s, 1), _mm_set1_epi8(1)));
}

inline __m256i chunk_scale(__m256i scales16, int ib) {
    return _mm256_shuffle_epi8(scales16, _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleShuffleK4[ib])));
}

// One 32-element chunk of a super-block, decoded: q the grid magnitudes (unsigned bytes), s the signs
// (±1 bytes) and sc the odd scales as 16 int16 (one per element pair; the low 128 bits for
// elements 0-15, the high for 16-31). Its dot with 32 activations is Σ madd(maddubs(q, sign(q8, s)), sc).
struct Chunk {
    __m256i q, s, sc;
};

// Per type: the super-block decoder (a constructor doing per-block work, chunk(ib) for ib in 0..8)
// and kScale, the factor ggml applies to the final sum.
struct Iq2xxs {
    using Block = BlockIQ2_XXS;
    static constexpr float kScale = 0.125f;
    const Block& b;
    explicit Iq2xxs(const Block& blk) : b(blk) {}
    Chunk chunk(int ib) const {
        uint32_t aux[2];  // grid indices, sign indices + scale
        std::memcpy(aux, b.qs + 4 * ib, 8);
        return {grid64(kIq2xxsGrid, aux[0] >> 24, (aux[0] >> 16) & 255, (aux[0] >> 8) & 255, aux[0] & 255),
                signs4(aux[1]), _mm256_set1_epi16(static_cast<int16_t>(2 * (aux[1] >> 28) + 1))};
    }
};

struct Iq2xs {
    using Block = BlockIQ2_XS;
    static constexpr float kScale = 0.125f;
    const Block& b;
    const __m256i scales16;
    explicit Iq2xs(const Block& blk) : b(blk), scales16(odd_scales16(blk.scales)) {}
    Chunk chunk(int ib) const {
        const uint16_t* w = b.qs + 4 * ib;  // 9-bit grid index | 7-bit sign index << 9
        return {grid64(kIq2xsGrid, w[3] & 511, w[2] & 511, w[1] & 511, w[0] & 511),
                _mm256_set_epi64x(static_cast<int64_t>(kEvenSigns[w[3] >> 9]), static_cast<int64_t>(kEvenSigns[w[2] >> 9]),
                                  static_cast<int64_t>(kEvenSigns[w[1] >> 9]), static_cast<int64_t>(kEvenSigns[w[0] >> 9])),
                chunk_scale(scales16, ib)};
    }
};

struct Iq2s {
    using Block = BlockIQ2_S;
    static constexpr float kScale = 0.125f;
    const Block& b;
    const __m256i scales16;
    explicit Iq2s(const Block& blk) : b(blk), scales16(odd_scales16(blk.scales)) {}
    Chunk chunk(int ib) const {
        const uint8_t* qs = b.qs + 4 * ib;
        const int qh = b.qh[ib];
        uint32_t bits;
        std::memcpy(&bits, b.qs + 32 + 4 * ib, 4);
        return {grid64(kIq2sGrid, qs[3] | ((qh << 2) & 0x300), qs[2] | ((qh << 4) & 0x300), qs[1] | ((qh << 6) & 0x300),
                       qs[0] | ((qh << 8) & 0x300)),
                signs_from_bits(bits), chunk_scale(scales16, ib)};
    }
};

struct Iq3xxs {
    using Block = BlockIQ3_XXS;
    static constexpr float kScale = 0.25f;
    const Block& b;
    explicit Iq3xxs(const Block& blk) : b(blk) {}
    Chunk chunk(int ib) const {
        const uint8_t* q = b.qs + 8 * ib;
        const int idx[8] = {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
        uint32_t aux;  // four sign indices + scale
        std::memcpy(&aux, b.qs + 64 + 4 * ib, 4);
        return {grid32(kIq3xxsGrid, idx), signs4(aux), _mm256_set1_epi16(static_cast<int16_t>(2 * (aux >> 28) + 1))};
    }
};

struct Iq3s {
    using Block = BlockIQ3_S;
    static constexpr float kScale = 1.0f;
    const Block& b;
    explicit Iq3s(const Block& blk) : b(blk) {}
    Chunk chunk(int ib) const {
        // Entry k's index: qs[8·ib + k] | bit k of qh[ib] moved to bit 8 (as ggml, in one vector).
        alignas(32) int idx[8];
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b.qs + 8 * ib)));
        const __m256i hi = _mm256_and_si256(
            _mm256_sllv_epi32(_mm256_set1_epi32(b.qh[ib]), _mm256_set_epi32(1, 2, 3, 4, 5, 6, 7, 8)),
            _mm256_set1_epi32(256));
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_or_si256(lo, hi));
        uint32_t bits;
        std::memcpy(&bits, b.signs + 4 * ib, 4);
        const int s = (b.scales[ib / 2] >> (4 * (ib % 2))) & 15;
        return {grid32(kIq3sGrid, idx), signs_from_bits(bits), _mm256_set1_epi16(static_cast<int16_t>(2 * s + 1))};
    }
};

inline __m256i chunk_dot(const Chunk& c, const int8_t* q8) {
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(c.q, _mm256_sign_epi8(y, c.s)), c.sc);
}

template <class D>
float dot_iq(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const typename D::Block*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const D dec(x[i]);
        const int8_t* q8 = y[i].qs;
        __m256i sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256();
        for (int ib = 0; ib < kQK_K / 32; ib += 2) {
            sumi1 = _mm256_add_epi32(sumi1, chunk_dot(dec.chunk(ib), q8 + 32 * ib));
            sumi2 = _mm256_add_epi32(sumi2, chunk_dot(dec.chunk(ib + 1), q8 + 32 * ib + 32));
        }
        const float d = h2f(x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(sumi1, sumi2)), acc);
    }
    return D::kScale * hsum_ps(acc);
}

// Four activation rows against one weight row read through Src: src.at(i) gives super-block i's
// chunk(ib) (a Chunk) and d() (fp16(d) as float), src.scale() the type's factor on the final sum.
// IqEncoded decodes the block (as the one-row kernel does); IqDecoded reads decode_iq_row's bytes.
template <class Src>
void iq_x4(int64_t n, const Src& src, const void* a, size_t a_stride, float* out) {
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    __m256 acc[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const auto blk = src.at(i);
        __m256i sumi[4];
#define MM_ZERO(r) sumi[r] = _mm256_setzero_si256();
        MM_ROWS4(MM_ZERO)
#undef MM_ZERO
        for (int ib = 0; ib < kQK_K / 32; ++ib) {
            const Chunk c = blk.chunk(ib);
#define MM_ROW(r) sumi[r] = _mm256_add_epi32(sumi[r], chunk_dot(c, y[r][i].qs + 32 * ib));
            MM_ROWS4(MM_ROW)
#undef MM_ROW
        }
        const float xd = blk.d();
#define MM_ACC(r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd * y[r][i].d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
    const float scale = src.scale();
#define MM_OUT(r) out[r] = scale * hsum_ps(acc[r]);
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

template <class D>
struct IqEncoded {
    const typename D::Block* x;
    struct Blk {
        D dec;
        float dd;
        Chunk chunk(int ib) const { return dec.chunk(ib); }
        float d() const { return dd; }
    };
    Blk at(int64_t i) const { return Blk{D(x[i]), h2f(x[i].d)}; }
    float scale() const { return D::kScale; }
};

template <class D>
void dot_iq_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    iq_x4(n, IqEncoded<D>{static_cast<const typename D::Block*>(w)}, a, a_stride, out);
}

// ---- decoded rows (prompt path): each 32-element chunk decoded once per matmul tile ----
// g = q · s (the grid magnitude with its sign; q >= 1, so |g| = q and sign(y, g) = sign(y, s)):
// maddubs(|g|, sign(y, g)) is then the same integer as maddubs(q, sign(y, s)) in chunk_dot.

template <class D>
void decode_iq_row(int64_t n, const void* w, void* dec) {
    const auto* x = static_cast<const typename D::Block*>(w);
    auto* out = static_cast<uint8_t*>(dec);
    for (int64_t i = 0; i < n / kQK_K; ++i, out += kIqDecBytesPerBlock) {
        const D d(x[i]);
        const float hdr[8] = {h2f(x[i].d), D::kScale, 0, 0, 0, 0, 0, 0};
        std::memcpy(out, hdr, sizeof(hdr));
        for (int ib = 0; ib < kQK_K / 32; ++ib) {
            const Chunk c = d.chunk(ib);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 + 64 * ib), _mm256_sign_epi8(c.q, c.s));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 + 64 * ib), c.sc);
        }
    }
}

// iq_x4 on a decoded row: chunk q = |g|, s = g (sign(y, g) = sign(y, s), g != 0), so chunk_dot
// gives the encoded row's integers and the float operations are the same.
struct IqDecoded {
    const uint8_t* dec;
    struct Blk {
        const uint8_t* p;
        Chunk chunk(int ib) const {
            const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + 64 * ib));
            return {_mm256_sign_epi8(g, g), g, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + 64 * ib))};
        }
        float d() const { return load_f32(p); }
    };
    Blk at(int64_t i) const { return Blk{dec + i * kIqDecBytesPerBlock}; }
    float scale() const { return load_f32(dec + 4); }
};

// ---- IQ1_S / IQ1_M: signed grid values in {-1, 0, 1} plus a ±1/8 shift per 8 elements ----

// Grid entries of the 4 groups of a 32-element chunk (11-bit indices).
inline __m256i grid_iq1(int i3, int i2, int i1, int i0) { return grid64(kIq1sGrid, i3, i2, i1, i0); }

// Σ pairs of grid · q8 (grid signed, |grid| <= 1) as 16 int16 (ggml's mul_add_epi8).
inline __m256i iq1_pairs(__m256i g, __m256i q8) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(g, g), _mm256_sign_epi8(q8, g));
}

struct Iq1sChunk {
    __m256i g;   // grid values
    int16_t ls;  // odd scale
    int delta;   // ±1: sign of the shift
};

inline Iq1sChunk iq1s_chunk(const BlockIQ1_S& b, int ib) {
    const uint8_t* qs = b.qs + 4 * ib;
    const int qh = b.qh[ib];
    return {grid_iq1(qs[3] | ((qh >> 1) & 0x700), qs[2] | ((qh << 2) & 0x700), qs[1] | ((qh << 5) & 0x700),
                     qs[0] | ((qh << 8) & 0x700)),
            static_cast<int16_t>(2 * ((qh >> 12) & 7) + 1), qh & 0x8000 ? -1 : 1};
}

inline __m256i iq1s_dot(const Iq1sChunk& c, const int8_t* q8) {
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
    return _mm256_madd_epi16(iq1_pairs(c.g, y), _mm256_set1_epi16(c.ls));
}

// The shift's integer part of chunk ib: (Σ q8 over the chunk) · (±1) · ls, from the bsums.
inline int iq1s_shift(const Iq1sChunk& c, const int16_t* bsums, int ib) {
    return (bsums[2 * ib] + bsums[2 * ib + 1]) * c.delta * c.ls;
}

// IQ1_M: the 16 3-bit scales of a block as odd int16: lanes 0-3 (k = 0..3) the first 16 elements of
// chunk 2k, 4-7 of chunk 2k+1, lanes 8-11 the second 16 of chunk 2k, 12-15 of chunk 2k+1; chunk ib's
// are then picked by one shuffle (iq1m_chunk_scale).
inline __m256i iq1m_scales16(const uint8_t* scales) {
    uint64_t sc;
    std::memcpy(&sc, scales, 8);
    __m256i s = _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<int64_t>(sc)), _mm256_set_epi64x(9, 3, 6, 0));
    s = _mm256_and_si256(s, _mm256_set1_epi16(7));
    return _mm256_add_epi16(_mm256_slli_epi16(s, 1), _mm256_set1_epi16(1));
}

inline __m256i iq1m_chunk_scale(__m256i scales16, int ib) {
    // int16 lane (ib / 2) + 4 · (ib % 2) of each 128-bit half, broadcast to the half.
    const int lane = ib / 2 + 4 * (ib % 2);
    const __m256i idx = _mm256_set1_epi16(static_cast<int16_t>((2 * lane) | ((2 * lane + 1) << 8)));
    return _mm256_shuffle_epi8(scales16, idx);
}

inline float iq1m_d(const BlockIQ1_M& b) {
    uint16_t sc[4];
    std::memcpy(sc, b.scales, 8);
    return h2f(static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000)));
}

struct Iq1mChunk {
    __m256i g;      // grid values
    __m256i delta;  // ±1 bytes: the shift's sign per group of 8
    __m256i sc;     // odd scales as int16 (low 128 bits: elements 0-15)
};

inline Iq1mChunk iq1m_chunk(const BlockIQ1_M& b, __m256i scales16, int ib) {
    const uint8_t* qs = b.qs + 4 * ib;
    const uint8_t* qh = b.qh + 2 * ib;  // per group of 8 a nibble: index bits 8-10, shift sign
    uint16_t qh16;
    std::memcpy(&qh16, qh, 2);
    // Group g's shift sign is bit 4g + 3 of qh16: 64-bit lane g of the mask tests it in every int16.
    const __m256i sign_bit = _mm256_set_epi64x(static_cast<int64_t>(0x8000800080008000), 0x0800080008000800,
                                               0x0080008000800080, 0x0008000800080008);
    const __m256i neg = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(qh16)), sign_bit), sign_bit);
    return {grid_iq1(qs[3] | ((qh[1] << 4) & 0x700), qs[2] | ((qh[1] << 8) & 0x700), qs[1] | ((qh[0] << 4) & 0x700),
                     qs[0] | ((qh[0] << 8) & 0x700)),
            _mm256_or_si256(neg, _mm256_set1_epi8(1)), iq1m_chunk_scale(scales16, ib)};
}

}  // namespace

float vec_dot_iq2_xxs_q8_K(int64_t n, const void* w, const void* a) { return dot_iq<Iq2xxs>(n, w, a); }
float vec_dot_iq2_xs_q8_K(int64_t n, const void* w, const void* a) { return dot_iq<Iq2xs>(n, w, a); }
float vec_dot_iq2_s_q8_K(int64_t n, const void* w, const void* a) { return dot_iq<Iq2s>(n, w, a); }
float vec_dot_iq3_xxs_q8_K(int64_t n, const void* w, const void* a) { return dot_iq<Iq3xxs>(n, w, a); }
float vec_dot_iq3_s_q8_K(int64_t n, const void* w, const void* a) { return dot_iq<Iq3s>(n, w, a); }

void vec_dot_iq2_xxs_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_iq_x4<Iq2xxs>(n, w, a, a_stride, out);
}
void vec_dot_iq2_xs_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_iq_x4<Iq2xs>(n, w, a, a_stride, out);
}
void vec_dot_iq2_s_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_iq_x4<Iq2s>(n, w, a, a_stride, out);
}
void vec_dot_iq3_xxs_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_iq_x4<Iq3xxs>(n, w, a, a_stride, out);
}
void vec_dot_iq3_s_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    dot_iq_x4<Iq3s>(n, w, a, a_stride, out);
}

void decode_row_iq2_xxs(int64_t n, const void* w, void* dec) { decode_iq_row<Iq2xxs>(n, w, dec); }
void decode_row_iq2_xs(int64_t n, const void* w, void* dec) { decode_iq_row<Iq2xs>(n, w, dec); }
void decode_row_iq2_s(int64_t n, const void* w, void* dec) { decode_iq_row<Iq2s>(n, w, dec); }
void decode_row_iq3_xxs(int64_t n, const void* w, void* dec) { decode_iq_row<Iq3xxs>(n, w, dec); }
void decode_row_iq3_s(int64_t n, const void* w, void* dec) { decode_iq_row<Iq3s>(n, w, dec); }

// iq_x4 on a decoded row (IqDecoded).
void vec_dot_iq_dec_q8_K_x4(int64_t n, const void* dec, const void* a, size_t a_stride, float* out) {
    iq_x4(n, IqDecoded{static_cast<const uint8_t*>(dec)}, a, a_stride, out);
}

float vec_dot_iq1_s_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockIQ1_S*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    __m256 acc = _mm256_setzero_ps();
    float acc_shift = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        __m256i sumi1 = _mm256_setzero_si256(), sumi2 = _mm256_setzero_si256();
        int sumi_shift = 0;
        for (int ib = 0; ib < kQK_K / 32; ib += 2) {  // two chains for the out-of-order core
            const Iq1sChunk c1 = iq1s_chunk(x[i], ib), c2 = iq1s_chunk(x[i], ib + 1);
            sumi1 = _mm256_add_epi32(sumi1, iq1s_dot(c1, y[i].qs + 32 * ib));
            sumi2 = _mm256_add_epi32(sumi2, iq1s_dot(c2, y[i].qs + 32 * ib + 32));
            sumi_shift += iq1s_shift(c1, y[i].bsums, ib) + iq1s_shift(c2, y[i].bsums, ib + 1);
        }
        const float d = y[i].d * h2f(x[i].d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(sumi1, sumi2)), acc);
        acc_shift += d * static_cast<float>(sumi_shift);
    }
    return hsum_ps(acc) + kIq1Delta * acc_shift;
}

void vec_dot_iq1_s_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockIQ1_S*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    __m256 acc[4];
    float acc_shift[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps(), acc_shift[r] = 0;
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        __m256i sumi[4];
        int sumi_shift[4];
#define MM_ZERO(r) sumi[r] = _mm256_setzero_si256(), sumi_shift[r] = 0;
        MM_ROWS4(MM_ZERO)
#undef MM_ZERO
        for (int ib = 0; ib < kQK_K / 32; ++ib) {
            const Iq1sChunk c = iq1s_chunk(x[i], ib);
#define MM_ROW(r)                                                                \
    sumi[r] = _mm256_add_epi32(sumi[r], iq1s_dot(c, y[r][i].qs + 32 * ib)); \
    sumi_shift[r] += iq1s_shift(c, y[r][i].bsums, ib);
            MM_ROWS4(MM_ROW)
#undef MM_ROW
        }
        const float xd = h2f(x[i].d);
#define MM_ACC(r)                                                                            \
    {                                                                                        \
        const float d = y[r][i].d * xd;                                                      \
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]); \
        acc_shift[r] += d * static_cast<float>(sumi_shift[r]);                               \
    }
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r) out[r] = hsum_ps(acc[r]) + kIq1Delta * acc_shift[r];
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

float vec_dot_iq1_m_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockIQ1_M*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const __m256i ones8 = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), acc_shift = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const __m256i scales16 = iq1m_scales16(x[i].scales);
        __m256i sumi = _mm256_setzero_si256(), sumi_shift = _mm256_setzero_si256();
        for (int ib = 0; ib < kQK_K / 32; ib += 2) {
            const Iq1mChunk c1 = iq1m_chunk(x[i], scales16, ib), c2 = iq1m_chunk(x[i], scales16, ib + 1);
            const __m256i q8a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs + 32 * ib));
            const __m256i q8b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs + 32 * ib + 32));
            const __m256i p1 = _mm256_madd_epi16(iq1_pairs(c1.g, q8a), c1.sc);
            const __m256i p2 = _mm256_madd_epi16(iq1_pairs(c2.g, q8b), c2.sc);
            const __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_sign_epi8(q8a, c1.delta)), c1.sc);
            const __m256i s2 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_sign_epi8(q8b, c2.delta)), c2.sc);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p1, p2));
            sumi_shift = _mm256_add_epi32(sumi_shift, _mm256_add_epi32(s1, s2));
        }
        const __m256 d = _mm256_set1_ps(y[i].d * iq1m_d(x[i]));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        acc_shift = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi_shift), acc_shift);
    }
    return hsum_ps(acc) + kIq1Delta * hsum_ps(acc_shift);
}

void vec_dot_iq1_m_q8_K_x4(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
    const auto* x = static_cast<const BlockIQ1_M*>(w);
    const BlockQ8_K* y[4];
    for (int r = 0; r < 4; ++r) y[r] = reinterpret_cast<const BlockQ8_K*>(static_cast<const uint8_t*>(a) + r * a_stride);
    const __m256i ones8 = _mm256_set1_epi8(1);
    __m256 acc[4], acc_shift[4];
#define MM_INIT(r) acc[r] = _mm256_setzero_ps(), acc_shift[r] = _mm256_setzero_ps();
    MM_ROWS4(MM_INIT)
#undef MM_INIT
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const __m256i scales16 = iq1m_scales16(x[i].scales);
        __m256i sumi[4], sumi_shift[4];
#define MM_ZERO(r) sumi[r] = _mm256_setzero_si256(), sumi_shift[r] = _mm256_setzero_si256();
        MM_ROWS4(MM_ZERO)
#undef MM_ZERO
        for (int ib = 0; ib < kQK_K / 32; ++ib) {
            const Iq1mChunk c = iq1m_chunk(x[i], scales16, ib);
            const __m256i ag = _mm256_sign_epi8(c.g, c.g);
#define MM_ROW(r)                                                                                              \
    {                                                                                                          \
        const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[r][i].qs + 32 * ib));         \
        sumi[r] = _mm256_add_epi32(sumi[r],                                                                    \
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(ag, _mm256_sign_epi8(q8, c.g)), c.sc)); \
        const __m256i shift = _mm256_maddubs_epi16(ones8, _mm256_sign_epi8(q8, c.delta));                      \
        sumi_shift[r] = _mm256_add_epi32(sumi_shift[r], _mm256_madd_epi16(shift, c.sc));                       \
    }
            MM_ROWS4(MM_ROW)
#undef MM_ROW
        }
        const float xd = iq1m_d(x[i]);
#define MM_ACC(r)                                                                                  \
    {                                                                                              \
        const __m256 d = _mm256_set1_ps(y[r][i].d * xd);                                           \
        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r]), acc[r]);                          \
        acc_shift[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi_shift[r]), acc_shift[r]);       \
    }
        MM_ROWS4(MM_ACC)
#undef MM_ACC
    }
#define MM_OUT(r) out[r] = hsum_ps(acc[r]) + kIq1Delta * hsum_ps(acc_shift[r]);
    MM_ROWS4(MM_OUT)
#undef MM_OUT
}

}  // namespace moemesh::quants::MM_SIMD_NS

#undef MM_ROWS4

#pragma GCC pop_options

#endif  // x86
