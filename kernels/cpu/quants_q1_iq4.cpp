// Q4_1 and Q5_1 (32-element blocks with a scale and a min), IQ4_NL / IQ4_XS (4-bit indices into
// ggml's 16 non-linear levels) and MXFP4 (E2M1 codes with a power-of-two scale; llama-quantize's
// MXFP4_MOE puts the experts in it): reference quantizers, dequantizers, the Q8_1 activation
// quantizer and scalar row dot products. Layouts and arithmetic are ggml's (ggml-common.h,
// ggml-quants.c, ggml-cpu/quants.c); the float operations keep ggml's order, because reordering
// them changes the bytes written. llama-quantize falls back to Q5_1 (Q5_K) and IQ4_NL (IQ4_XS,
// Q3_K, Q2_K…) for tensors whose rows are not a multiple of 256, so small models written by other
// tools carry these types even when their name says otherwise.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"

namespace moemesh::quants {

namespace {
constexpr float kGroupMaxEps = 1e-15f;

// Index of the level of kIQ4NLValues nearest to x (the lower one on ties), as ggml's best_index_int8.
int nearest_iq4_level(float x) {
    const int8_t* val = kIQ4NLValues;
    if (x <= val[0]) return 0;
    if (x >= val[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (x < val[mid]) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    return x - val[hi - 1] < val[hi] - x ? hi - 1 : hi;
}

// min and max of 32 values, as ggml's Q4_1/Q5_1 quantizers find them.
void min_max32(const float* x, float* mn, float* mx) {
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < 32; ++j) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    *mn = lo;
    *mx = hi;
}

// The shared IQ4 quantizer (ggml's quantize_row_iq4_nl_impl without importance weights) for one
// super-block of `super` elements in 32-element sub-blocks. ntry > 0: try 2·ntry+1 further scales
// per sub-block and re-pick the levels with the final scale; ntry <= 0: one scale, max/levels[0].
// super == 32 writes IQ4_NL's d; super == 256 writes IQ4_XS's d and packed sub-block scales.
// L keeps its contents between calls for a sub-block of zeros under ntry <= 0 (ggml leaves its
// indices as they were; their value is 0 · level either way).
void quantize_iq4_superblock(int super, const float* x, uint16_t* dh, uint8_t* q4, uint16_t* scales_h,
                             uint8_t* scales_l, float* scales, uint8_t* L, int ntry) {
    const int8_t* values = kIQ4NLValues;
    float weight[32];
    std::memset(q4, 0, static_cast<size_t>(super / 2));
    *dh = fp32_to_fp16(0.f);
    float max_scale = 0, amax_scale = 0;
    const int nsub = super / 32;
    for (int ib = 0; ib < nsub; ++ib) {
        const float* xb = x + ib * 32;
        uint8_t* Lb = L + ib * 32;
        for (int j = 0; j < 32; ++j) weight[j] = xb[j] * xb[j];
        float amax = 0, max = 0;
        for (int j = 0; j < 32; ++j) {
            const float ax = std::fabs(xb[j]);
            if (ax > amax) {
                amax = ax;
                max = xb[j];
            }
        }
        if (amax < kGroupMaxEps) {
            scales[ib] = 0;
            continue;
        }
        float d = ntry > 0 ? -max / values[0] : max / values[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const int l = nearest_iq4_level(id * xb[j]);
            Lb[j] = static_cast<uint8_t>(l);
            const float q = values[l];
            const float w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = sumqx / sumq2;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (itry + values[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < 32; ++j) {
                const float q = values[nearest_iq4_level(id * xb[j])];
                const float w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        const float abs_d = std::fabs(d);
        if (abs_d > amax_scale) {
            amax_scale = abs_d;
            max_scale = d;
        }
    }
    if (nsub > 1) {
        *scales_h = 0;
        const float d = -max_scale / 32;
        *dh = fp32_to_fp16(d);
        const float id = d != 0.0f ? 1 / d : 0.f;
        for (int ib = 0; ib < nsub; ++ib) {
            int l = nearest_int(id * scales[ib]);
            l = std::max(-32, std::min(31, l));
            const float dl = d * l;
            const float idl = dl != 0.0f ? 1 / dl : 0.f;
            for (int j = 0; j < 32; ++j) L[ib * 32 + j] = static_cast<uint8_t>(nearest_iq4_level(idl * x[ib * 32 + j]));
            l += 32;
            const auto l_l = static_cast<uint8_t>(l & 0xf);
            const auto l_h = static_cast<uint16_t>(l >> 4);
            if (ib % 2 == 0) {
                scales_l[ib / 2] = l_l;
            } else {
                scales_l[ib / 2] |= static_cast<uint8_t>(l_l << 4);
            }
            *scales_h |= static_cast<uint16_t>(l_h << (2 * (ib % 8)));
        }
    } else {
        *dh = fp32_to_fp16(scales[0]);
        if (ntry > 0) {
            const float id = scales[0] != 0.0f ? 1 / scales[0] : 0;
            for (int j = 0; j < super; ++j) L[j] = static_cast<uint8_t>(nearest_iq4_level(id * x[j]));
        }
    }
    for (int i = 0; i < super / 32; ++i) {
        for (int j = 0; j < 16; ++j) q4[16 * i + j] = static_cast<uint8_t>(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
    }
}

// The 6-bit scale of IQ4_XS sub-block ib, minus 32.
inline int iq4xs_scale(const BlockIQ4_XS& b, int ib) {
    const int ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) | (((b.scales_h >> (2 * ib)) & 3) << 4);
    return ls - 32;
}
}  // namespace

void quantize_q4_1_ref(const float* x, BlockQ4_1* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        float mn, mx;
        min_max32(x, &mn, &mx);
        const float d = (mx - mn) / ((1 << 4) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(mn);
        for (int j = 0; j < 16; ++j) {
            const float x0 = (x[j] - mn) * id;
            const float x1 = (x[16 + j] - mn) * id;
            const auto q0 = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 0.5f))));
            const auto q1 = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 0.5f))));
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

void quantize_q5_1_ref(const float* x, BlockQ5_1* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        float mn, mx;
        min_max32(x, &mn, &mx);
        const float d = (mx - mn) / ((1 << 5) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(mn);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            const float x0 = (x[j] - mn) * id;
            const float x1 = (x[16 + j] - mn) * id;
            const auto q0 = static_cast<uint8_t>(x0 + 0.5f);
            const auto q1 = static_cast<uint8_t>(x1 + 0.5f);
            y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << j;
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        std::memcpy(y[i].qh, &qh, 4);
    }
}

void quantize_iq4_nl(const float* x, BlockIQ4_NL* y, int64_t n, bool search) {
    uint8_t L[32] = {};
    float scale;
    for (int64_t i = 0; i < n / 32; ++i) {
        quantize_iq4_superblock(32, x + 32 * i, &y[i].d, y[i].qs, nullptr, nullptr, &scale, L, search ? 7 : -1);
    }
}

void quantize_iq4_xs(const float* x, BlockIQ4_XS* y, int64_t n) {
    uint8_t L[kQK_K] = {};
    float scales[kQK_K / 32];
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        quantize_iq4_superblock(kQK_K, x + kQK_K * i, &y[i].d, y[i].qs, &y[i].scales_h, y[i].scales_l, scales, L, 7);
    }
}

void quantize_mxfp4_ref(const float* x, BlockMXFP4* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const uint8_t e = amax > 0.0f ? static_cast<uint8_t>(std::floor(std::log2(amax)) - 2 + 127) : 0;
        const float d = e8m0_to_fp32_half(e);
        y[i].e = e;
        // The code whose value is nearest (the first on ties), as ggml's best_index_mxfp4.
        auto nearest = [d](float v) {
            int best = 0;
            float best_err = std::fabs(kMXFP4Values[0] * d - v);
            for (int l = 1; l < 16; ++l) {
                const float err = std::fabs(kMXFP4Values[l] * d - v);
                if (err < best_err) {
                    best = l;
                    best_err = err;
                }
            }
            return best;
        };
        for (int j = 0; j < 16; ++j) y[i].qs[j] = static_cast<uint8_t>(nearest(x[j]) | (nearest(x[16 + j]) << 4));
    }
}

void dequantize_mxfp4(const BlockMXFP4* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = e8m0_to_fp32_half(x[i].e);
        for (int j = 0; j < 16; ++j) {
            y[j] = kMXFP4Values[x[i].qs[j] & 0xf] * d;
            y[j + 16] = kMXFP4Values[x[i].qs[j] >> 4] * d;
        }
    }
}

void dequantize_q4_1(const BlockQ4_1* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d), m = fp16_to_fp32(x[i].m);
        for (int j = 0; j < 16; ++j) {
            y[j] = (x[i].qs[j] & 0x0F) * d + m;
            y[j + 16] = (x[i].qs[j] >> 4) * d + m;
        }
    }
}

void dequantize_q5_1(const BlockQ5_1* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d), m = fp16_to_fp32(x[i].m);
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        for (int j = 0; j < 16; ++j) {
            const int x0 = (x[i].qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
            const int x1 = (x[i].qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = x0 * d + m;
            y[j + 16] = x1 * d + m;
        }
    }
}

void dequantize_iq4_nl(const BlockIQ4_NL* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * kIQ4NLValues[x[i].qs[j] & 0xf];
            y[j + 16] = d * kIQ4NLValues[x[i].qs[j] >> 4];
        }
    }
}

void dequantize_iq4_xs(const BlockIQ4_XS* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t* qs = x[i].qs;
        for (int ib = 0; ib < kQK_K / 32; ++ib, qs += 16, y += 32) {
            const float dl = d * static_cast<float>(iq4xs_scale(x[i], ib));
            for (int j = 0; j < 16; ++j) {
                y[j] = dl * kIQ4NLValues[qs[j] & 0xf];
                y[j + 16] = dl * kIQ4NLValues[qs[j] >> 4];
            }
        }
    }
}

void quantize_act_q8_1_scalar(const float* x, BlockQ8_1* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        y[i].d = fp32_to_fp16(d);
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            y[i].qs[j] = static_cast<int8_t>(nearest_int(x[j] * id));
            sum += y[i].qs[j];
        }
        y[i].s = fp32_to_fp16(d * static_cast<float>(sum));
    }
}

float vec_dot_q4_1_q8_1_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < 16; ++j) {
            sumi0 += (x[i].qs[j] & 0x0F) * y[i].qs[j];
            sumi1 += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        sumf += (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d)) * static_cast<float>(sumi0 + sumi1) +
                fp16_to_fp32(x[i].m) * fp16_to_fp32(y[i].s);
    }
    return sumf;
}

float vec_dot_q5_1_q8_1_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < 16; ++j) {
            const int x0 = (x[i].qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
            const int x1 = (x[i].qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            sumi0 += x0 * y[i].qs[j];
            sumi1 += x1 * y[i].qs[j + 16];
        }
        sumf += (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d)) * static_cast<float>(sumi0 + sumi1) +
                fp16_to_fp32(x[i].m) * fp16_to_fp32(y[i].s);
    }
    return sumf;
}

float vec_dot_iq4_nl_q8_0_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockIQ4_NL*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        const float d = fp16_to_fp32(y[i].d) * fp16_to_fp32(x[i].d);
        int sumi1 = 0, sumi2 = 0;
        for (int j = 0; j < 16; ++j) {
            sumi1 += y[i].qs[j] * kIQ4NLValues[x[i].qs[j] & 0xf];
            sumi2 += y[i].qs[j + 16] * kIQ4NLValues[x[i].qs[j] >> 4];
        }
        sumf += d * static_cast<float>(sumi1 + sumi2);
    }
    return sumf;
}

float vec_dot_mxfp4_q8_0_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockMXFP4*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        const float d = fp16_to_fp32(y[i].d) * e8m0_to_fp32_half(x[i].e);
        int sumi1 = 0, sumi2 = 0;
        for (int j = 0; j < 16; ++j) {
            sumi1 += y[i].qs[j] * kMXFP4Values[x[i].qs[j] & 0xf];
            sumi2 += y[i].qs[j + 16] * kMXFP4Values[x[i].qs[j] >> 4];
        }
        sumf += d * static_cast<float>(sumi1 + sumi2);
    }
    return sumf;
}

float vec_dot_iq4_xs_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockIQ4_XS*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sumf = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const float d4d8 = fp16_to_fp32(x[i].d) * y[i].d;
        const uint8_t* qs = x[i].qs;
        const int8_t* q8 = y[i].qs;
        for (int ib = 0; ib < kQK_K / 32; ++ib, qs += 16, q8 += 32) {
            int sumi1 = 0, sumi2 = 0;
            for (int j = 0; j < 16; ++j) {
                sumi1 += q8[j] * kIQ4NLValues[qs[j] & 0xf];
                sumi2 += q8[j + 16] * kIQ4NLValues[qs[j] >> 4];
            }
            sumf += d4d8 * static_cast<float>(iq4xs_scale(x[i], ib)) * static_cast<float>(sumi1 + sumi2);
        }
    }
    return sumf;
}

}  // namespace moemesh::quants
