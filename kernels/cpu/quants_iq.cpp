// The i-quant low-bit weight types: every super-block is first decoded to integers (signed grid
// values, odd sub-block scales, IQ1 shifts), then dequantized or dotted with Q8_K activations with
// ggml's float arithmetic (dequantize_row_<t>, ggml_vec_dot_<t>_q8_K_generic), so the floats are
// bit-identical to ggml's dequantization and the dot products track llama.cpp's.
#include "kernels/cpu/quants_iq.h"

#include <cstring>

#include "common/half.h"
#include "common/status.h"
#include "kernels/cpu/quants_internal.h"

namespace moemesh::quants {
namespace {

// How a super-block's scales turn into floats; one per family of types.
enum class Kind {
    kIq2,     // x = d·(0.5 + s)·0.25·q, dot scaled by 1/8 at the end (IQ2_XXS, IQ2_XS, IQ2_S)
    kIq3xxs,  // x = d·(0.5 + s)·0.5·q, dot scaled by 1/4
    kIq3s,    // x = d·(2s + 1)·q
    kIq1,     // x = d·(2s + 1)·(q ± 1/8) (IQ1_S, IQ1_M)
};

// One super-block decoded to integers.
struct Unpacked {
    float d;          // the fp16 super-block scale
    int8_t q[256];    // signed grid value of each element
    int ls[16];       // odd scale 2s+1 of each 16 elements
    int delta[32];    // kIq1: sign of the shift of each 8 elements (±1)
};

// Grid entry i as bytes, one per element (the tables pack them little-endian, as ggml reads them).
const uint8_t* grid_u8(const uint64_t* grid, int i) { return reinterpret_cast<const uint8_t*>(grid + i); }
const uint8_t* grid_u8(const uint32_t* grid, int i) { return reinterpret_cast<const uint8_t*>(grid + i); }

// 8 magnitudes under 8 sign bits (bit j set: element j negative).
void put8(int8_t* q, const uint8_t* mag, uint8_t signs) {
    for (int j = 0; j < 8; ++j) q[j] = static_cast<int8_t>(signs & kIqMask[j] ? -mag[j] : mag[j]);
}

// The IQ3 grids hold 4 elements per entry: a group of 8 is two entries.
void put8_iq3(int8_t* q, const uint32_t* grid, int i0, int i1, uint8_t signs) {
    uint8_t mag[8];
    std::memcpy(mag, grid_u8(grid, i0), 4);
    std::memcpy(mag + 4, grid_u8(grid, i1), 4);
    put8(q, mag, signs);
}

int odd(int s) { return 2 * s + 1; }

void unpack_iq2_xxs(const BlockIQ2_XXS& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        uint32_t aux[2];  // [0]: four grid indices, [1]: four 7-bit sign indices and the scale
        std::memcpy(aux, b.qs + 4 * ib, sizeof(aux));
        for (int l = 0; l < 4; ++l)
            put8(u.q + 32 * ib + 8 * l, grid_u8(kIq2xxsGrid, (aux[0] >> (8 * l)) & 255),
                 kIqSigns[(aux[1] >> (7 * l)) & 127]);
        u.ls[2 * ib] = u.ls[2 * ib + 1] = odd(static_cast<int>(aux[1] >> 28));
    }
}

void unpack_iq2_xs(const BlockIQ2_XS& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        for (int l = 0; l < 4; ++l) {
            const uint16_t w = b.qs[4 * ib + l];
            put8(u.q + 32 * ib + 8 * l, grid_u8(kIq2xsGrid, w & 511), kIqSigns[w >> 9]);
        }
        u.ls[2 * ib] = odd(b.scales[ib] & 15);
        u.ls[2 * ib + 1] = odd(b.scales[ib] >> 4);
    }
}

void unpack_iq2_s(const BlockIQ2_S& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        for (int l = 0; l < 4; ++l) {
            const int idx = b.qs[4 * ib + l] | ((b.qh[ib] << (8 - 2 * l)) & 0x300);
            put8(u.q + 32 * ib + 8 * l, grid_u8(kIq2sGrid, idx), b.qs[32 + 4 * ib + l]);
        }
        u.ls[2 * ib] = odd(b.scales[ib] & 15);
        u.ls[2 * ib + 1] = odd(b.scales[ib] >> 4);
    }
}

void unpack_iq3_xxs(const BlockIQ3_XXS& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        uint32_t aux;  // four 7-bit sign indices and the scale
        std::memcpy(&aux, b.qs + 64 + 4 * ib, sizeof(aux));
        const uint8_t* idx = b.qs + 8 * ib;
        for (int l = 0; l < 4; ++l)
            put8_iq3(u.q + 32 * ib + 8 * l, kIq3xxsGrid, idx[2 * l], idx[2 * l + 1], kIqSigns[(aux >> (7 * l)) & 127]);
        u.ls[2 * ib] = u.ls[2 * ib + 1] = odd(static_cast<int>(aux >> 28));
    }
}

void unpack_iq3_s(const BlockIQ3_S& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        const uint8_t* idx = b.qs + 8 * ib;
        const int qh = b.qh[ib];  // bit 2l: 9th index bit of the group's first entry, 2l+1 of its second
        for (int l = 0; l < 4; ++l) {
            const int i0 = idx[2 * l] | ((qh << (8 - 2 * l)) & 256);
            const int i1 = idx[2 * l + 1] | ((qh << (7 - 2 * l)) & 256);
            put8_iq3(u.q + 32 * ib + 8 * l, kIq3sGrid, i0, i1, b.signs[4 * ib + l]);
        }
        const int s = ib % 2 ? b.scales[ib / 2] >> 4 : b.scales[ib / 2] & 15;
        u.ls[2 * ib] = u.ls[2 * ib + 1] = odd(s);
    }
}

void unpack_iq1_s(const BlockIQ1_S& b, Unpacked& u) {
    u.d = fp16_to_fp32(b.d);
    for (int ib = 0; ib < 8; ++ib) {
        const int h = b.qh[ib];
        for (int l = 0; l < 4; ++l) {
            const int idx = b.qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8);
            std::memcpy(u.q + 32 * ib + 8 * l, grid_u8(kIq1sGrid, idx), 8);
            u.delta[4 * ib + l] = h & 0x8000 ? -1 : 1;
        }
        u.ls[2 * ib] = u.ls[2 * ib + 1] = odd((h >> 12) & 7);
    }
}

void unpack_iq1_m(const BlockIQ1_M& b, Unpacked& u) {
    uint16_t sc[4];
    std::memcpy(sc, b.scales, sizeof(sc));
    // The fp16 scale's nibble k is the top nibble of word k.
    const auto d16 = static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) |
                                           (sc[3] & 0xf000));
    u.d = fp16_to_fp32(d16);
    for (int ib = 0; ib < 8; ++ib) {
        const uint8_t* qs = b.qs + 4 * ib;
        const uint8_t* qh = b.qh + 2 * ib;
        for (int l = 0; l < 4; ++l) {
            const int nib = qh[l / 2] >> (4 * (l % 2));  // bits 0-2: index bits 8-10, bit 3: shift sign
            const int idx = qs[l] | ((nib & 7) << 8);
            std::memcpy(u.q + 32 * ib + 8 * l, grid_u8(kIq1sGrid, idx), 8);
            u.delta[4 * ib + l] = nib & 8 ? -1 : 1;
        }
        const int word = sc[ib / 2] >> (6 * (ib % 2));
        u.ls[2 * ib] = odd(word & 7);
        u.ls[2 * ib + 1] = odd((word >> 3) & 7);
    }
}

// The float scale of 16 elements with odd scale ls, in ggml's operation order.
template <Kind K>
float sub_scale(float d, int ls) {
    const int s = ls >> 1;
    if constexpr (K == Kind::kIq2) return d * (0.5f + s) * 0.25f;
    if constexpr (K == Kind::kIq3xxs) return d * (0.5f + s) * 0.5f;
    return d * static_cast<float>(ls);
}

template <class Block, void (*Unpack)(const Block&, Unpacked&), Kind K>
void dequantize(const void* src, float* y, int64_t n) {
    const auto* x = static_cast<const Block*>(src);
    Unpacked u;
    for (int64_t i = 0; i < n / kQK_K; ++i, y += kQK_K) {
        Unpack(x[i], u);
        for (int e = 0; e < kQK_K; ++e) {
            const float dl = sub_scale<K>(u.d, u.ls[e / 16]);
            if constexpr (K == Kind::kIq1) {
                y[e] = dl * (u.q[e] + (u.delta[e / 8] < 0 ? -kIq1Delta : kIq1Delta));
            } else {
                y[e] = dl * u.q[e];  // = ggml's dl·grid·(±1): negation is exact
            }
        }
    }
}

template <class Block, void (*Unpack)(const Block&, Unpacked&), Kind K>
float vec_dot(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const Block*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    Unpacked u;
    float sumf = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        Unpack(x[i], u);
        const int8_t* q8 = y[i].qs;
        int sumi = 0;  // Σ_16 ls · Σ q·q8
        for (int g = 0; g < 16; ++g) {
            int dot = 0;
            for (int e = 16 * g; e < 16 * g + 16; ++e) dot += u.q[e] * q8[e];
            sumi += u.ls[g] * dot;
        }
        if constexpr (K == Kind::kIq1) {
            int sumd = 0;  // Σ_8 ls · (±1) · Σ q8: the shifts' part, times 1/8 below
            for (int k = 0; k < 32; ++k) {
                int s8 = 0;
                for (int e = 8 * k; e < 8 * k + 8; ++e) s8 += q8[e];
                sumd += u.ls[k / 2] * u.delta[k] * s8;
            }
            sumf += u.d * y[i].d * (sumi + kIq1Delta * sumd);
        } else {
            sumf += u.d * y[i].d * sumi;
        }
    }
    if constexpr (K == Kind::kIq2) return 0.125f * sumf;
    if constexpr (K == Kind::kIq3xxs) return 0.25f * sumf;
    return sumf;
}

// Mean over its entries and bytes of a grid's squared values.
template <class Word>
double grid_mean_square(const Word* grid, int entries, bool is_signed) {
    double sum = 0;
    for (int i = 0; i < entries; ++i) {
        const uint8_t* b = reinterpret_cast<const uint8_t*>(grid + i);
        for (size_t j = 0; j < sizeof(Word); ++j) {
            const double v = is_signed ? static_cast<int8_t>(b[j]) : b[j];
            sum += v * v;
        }
    }
    return sum / (static_cast<double>(entries) * sizeof(Word));
}

// Mean of the squared float sub-block scale (d = 1) over s uniform in [0, num_s).
template <Kind K>
double scale_mean_square(int num_s) {
    double sum = 0;
    for (int s = 0; s < num_s; ++s) sum += static_cast<double>(sub_scale<K>(1.0f, odd(s))) * sub_scale<K>(1.0f, odd(s));
    return sum / num_s;
}

}  // namespace

bool is_iq_lowbit(GgmlType t) {
    switch (t) {
        case GgmlType::IQ2_XXS:
        case GgmlType::IQ2_XS:
        case GgmlType::IQ2_S:
        case GgmlType::IQ3_XXS:
        case GgmlType::IQ3_S:
        case GgmlType::IQ1_S:
        case GgmlType::IQ1_M:
            return true;
        default:
            return false;
    }
}

void dequantize_row_iq(GgmlType t, const void* src, float* dst, int64_t n) {
    MM_CHECK(n % kQK_K == 0);
    switch (t) {
        case GgmlType::IQ2_XXS:
            return dequantize<BlockIQ2_XXS, unpack_iq2_xxs, Kind::kIq2>(src, dst, n);
        case GgmlType::IQ2_XS:
            return dequantize<BlockIQ2_XS, unpack_iq2_xs, Kind::kIq2>(src, dst, n);
        case GgmlType::IQ2_S:
            return dequantize<BlockIQ2_S, unpack_iq2_s, Kind::kIq2>(src, dst, n);
        case GgmlType::IQ3_XXS:
            return dequantize<BlockIQ3_XXS, unpack_iq3_xxs, Kind::kIq3xxs>(src, dst, n);
        case GgmlType::IQ3_S:
            return dequantize<BlockIQ3_S, unpack_iq3_s, Kind::kIq3s>(src, dst, n);
        case GgmlType::IQ1_S:
            return dequantize<BlockIQ1_S, unpack_iq1_s, Kind::kIq1>(src, dst, n);
        case GgmlType::IQ1_M:
            return dequantize<BlockIQ1_M, unpack_iq1_m, Kind::kIq1>(src, dst, n);
        default:
            MM_CHECK(false && "dequantize_row_iq: not an i-quant low-bit type");
    }
}

void iq_set_block_scale(GgmlType t, void* block, uint16_t d) {
    MM_CHECK(is_iq_lowbit(t));
    auto* p = static_cast<uint8_t*>(block);
    if (t != GgmlType::IQ1_M) {
        std::memcpy(p, &d, 2);
        return;
    }
    uint8_t* sc = p + offsetof(BlockIQ1_M, scales);
    for (int k = 0; k < 4; ++k) {
        uint16_t w;
        std::memcpy(&w, sc + 2 * k, 2);
        w = static_cast<uint16_t>((w & 0x0fff) | (((d >> (4 * k)) & 15) << 12));
        std::memcpy(sc + 2 * k, &w, 2);
    }
}

double iq_unit_mean_square(GgmlType t) {
    switch (t) {
        case GgmlType::IQ2_XXS:
            return scale_mean_square<Kind::kIq2>(16) * grid_mean_square(kIq2xxsGrid, 256, false);
        case GgmlType::IQ2_XS:
            return scale_mean_square<Kind::kIq2>(16) * grid_mean_square(kIq2xsGrid, 512, false);
        case GgmlType::IQ2_S:
            return scale_mean_square<Kind::kIq2>(16) * grid_mean_square(kIq2sGrid, 1024, false);
        case GgmlType::IQ3_XXS:
            return scale_mean_square<Kind::kIq3xxs>(16) * grid_mean_square(kIq3xxsGrid, 256, false);
        case GgmlType::IQ3_S:
            return scale_mean_square<Kind::kIq3s>(16) * grid_mean_square(kIq3sGrid, 512, false);
        case GgmlType::IQ1_S:
        case GgmlType::IQ1_M:
            // (g ± 1/8)² averages to g² + 1/64: the shift's sign is independent of g.
            return scale_mean_square<Kind::kIq1>(8) *
                   (grid_mean_square(kIq1sGrid, 2048, true) + static_cast<double>(kIq1Delta) * kIq1Delta);
        default:
            MM_CHECK(false && "iq_unit_mean_square: not an i-quant low-bit type");
    }
    return 0;
}

float vec_dot_iq2_xxs_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ2_XXS, unpack_iq2_xxs, Kind::kIq2>(n, w, a);
}
float vec_dot_iq2_xs_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ2_XS, unpack_iq2_xs, Kind::kIq2>(n, w, a);
}
float vec_dot_iq2_s_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ2_S, unpack_iq2_s, Kind::kIq2>(n, w, a);
}
float vec_dot_iq3_xxs_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ3_XXS, unpack_iq3_xxs, Kind::kIq3xxs>(n, w, a);
}
float vec_dot_iq3_s_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ3_S, unpack_iq3_s, Kind::kIq3s>(n, w, a);
}
float vec_dot_iq1_s_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ1_S, unpack_iq1_s, Kind::kIq1>(n, w, a);
}
float vec_dot_iq1_m_q8_K_scalar(int64_t n, const void* w, const void* a) {
    return vec_dot<BlockIQ1_M, unpack_iq1_m, Kind::kIq1>(n, w, a);
}

}  // namespace moemesh::quants
