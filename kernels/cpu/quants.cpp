// Weight types: reference quantizers and dequantizers, bit-compatible with ggml's
// quantize_row_*_ref / dequantize_row_* (ggml-quants.c). The float arithmetic below keeps ggml's
// operation order on purpose: reordering it changes the bytes written.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "common/status.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"

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
using quants::get_scale_min_k4;
using quants::nearest_int;

constexpr float kGroupMaxEps = 1e-15f;

void quantize_q8_0_ref(const float* x, BlockQ8_0* y, int64_t n) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < 32; ++j) y[i].qs[j] = static_cast<int8_t>(std::round(x[j] * id));
    }
}

void quantize_q4_0_ref(const float* x, BlockQ4_0* y, int64_t n) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float amax;
        const float max = quants::signed_absmax(x, 32, &amax);
        const float d = max / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < 16; ++j) {
            const float x0 = x[j] * id;
            const float x1 = x[16 + j] * id;
            const auto q0 = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f))));
            const auto q1 = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f))));
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

void quantize_q5_0_ref(const float* x, BlockQ5_0* y, int64_t n) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float amax;
        const float max = quants::signed_absmax(x, 32, &amax);
        const float d = max / -16;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            const float x0 = x[j] * id;
            const float x1 = x[16 + j] * id;
            const auto q0 = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x0 + 16.5f))));
            const auto q1 = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x1 + 16.5f))));
            y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << j;
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        std::memcpy(y[i].qh, &qh, sizeof(qh));
    }
}

// Fits x ≈ scale * L - min (L in 0..nmax) minimising the weighted squared (use_mad: absolute) error;
// ggml's make_qkx2_quants. Returns scale, stores the (non-negative) min in *the_min.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min, uint8_t* Laux,
                       float rmin, float rdelta, int nstep, bool use_mad = false) {
    float min = x[0];
    float max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = std::max(0, std::min(nmax, l));
            Laux[i] = static_cast<uint8_t>(l);
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? std::fabs(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// Symmetric fit x ≈ scale * (L - nmax), weights x² (ggml's make_qx_quants, rmse_type 1, no qw).
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
    float amax;
    const float max = quants::signed_absmax(x, n, &amax);
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = std::max(-nmax, std::min(nmax - 1, l));
        L[i] = static_cast<int8_t>(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = std::max(-nmax, std::min(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// Symmetric 3-bit fit with iterative refinement (ggml's make_q3_quants with do_rmse = true):
// L[i] in 0..2·nmax-1 stands for L[i] - nmax. Returns the scale.
float make_q3_quants(int n, int nmax, const float* x, int8_t* L) {
    float amax;
    const float max = quants::signed_absmax(x, n, &amax);
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = std::max(-nmax, std::min(nmax - 1, l));
        L[i] = static_cast<int8_t>(l);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = std::max(-nmax, std::min(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = static_cast<int8_t>(new_l);
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// 2-bit values of four 32-element runs of a 128-element chunk into 32 bytes (Q2_K / Q3_K qs).
void pack_2bit(const uint8_t* L, uint8_t* qs) {
    for (int j = 0; j < kQK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] =
                static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

void quantize_q2_K_ref(const float* x, BlockQ2_K* y, int64_t n) {
    const int64_t nb = n / kQK_K;
    uint8_t L[kQK_K];
    uint8_t Laux[16];
    float weights[16];
    float mins[kQK_K / 16];
    float scales[kQK_K / 16];
    const float q4scale = 15.f;
    for (int64_t i = 0; i < nb; ++i, x += kQK_K) {
        float max_scale = 0;  // scales are positive: the min is taken out
        float max_min = 0;
        for (int j = 0; j < kQK_K / 16; ++j) {
            for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15,
                                         /*use_mad=*/true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = q4scale / max_scale;
            for (int j = 0; j < kQK_K / 16; ++j) y[i].scales[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
            y[i].d = fp32_to_fp16(max_scale / q4scale);
        } else {
            for (int j = 0; j < kQK_K / 16; ++j) y[i].scales[j] = 0;
            y[i].d = fp32_to_fp16(0.f);
        }
        if (max_min > 0) {
            const float iscale = q4scale / max_min;
            for (int j = 0; j < kQK_K / 16; ++j) {
                y[i].scales[j] |= static_cast<uint8_t>(nearest_int(iscale * mins[j]) << 4);
            }
            y[i].dmin = fp32_to_fp16(max_min / q4scale);
        } else {
            y[i].dmin = fp32_to_fp16(0.f);
        }
        for (int j = 0; j < kQK_K / 16; ++j) {
            const float d = fp16_to_fp32(y[i].d) * (y[i].scales[j] & 0xF);
            if (d == 0.0f) continue;
            const float dm = fp16_to_fp32(y[i].dmin) * (y[i].scales[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int((x[16 * j + ii] + dm) / d);
                L[16 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
            }
        }
        pack_2bit(L, y[i].qs);
    }
}

void quantize_q3_K_ref(const float* x, BlockQ3_K* y, int64_t n) {
    const int64_t nb = n / kQK_K;
    int8_t L[kQK_K];
    float scales[kQK_K / 16];
    for (int64_t i = 0; i < nb; ++i, x += kQK_K) {
        float max_scale = 0;
        float amax = 0;
        for (int j = 0; j < kQK_K / 16; ++j) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            const float scale = std::fabs(scales[j]);
            if (scale > amax) {
                amax = scale;
                max_scale = scales[j];
            }
        }
        std::memset(y[i].scales, 0, 12);
        if (max_scale != 0.0f) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < kQK_K / 16; ++j) {
                auto l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
                l = static_cast<int8_t>(std::max<int>(-32, std::min<int>(31, l)) + 32);
                if (j < 8) {
                    y[i].scales[j] = static_cast<uint8_t>(l & 0xF);
                } else {
                    y[i].scales[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
                }
                l = static_cast<int8_t>(l >> 4);
                y[i].scales[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
            }
            y[i].d = fp32_to_fp16(1 / iscale);
        } else {
            y[i].d = fp32_to_fp16(0.f);
        }
        for (int j = 0; j < kQK_K / 16; ++j) {
            int sc = j < 8 ? y[i].scales[j] & 0xF : y[i].scales[j - 8] >> 4;
            sc = (sc | (((y[i].scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            const float d = fp16_to_fp32(y[i].d) * sc;
            if (d == 0.0f) continue;
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
            }
        }
        // High bit of the first 32 quants into bit 0 of hmask[0..32), the next 32 into bit 1, ...
        std::memset(y[i].hmask, 0, kQK_K / 8);
        uint8_t L2[kQK_K];
        for (int j = 0; j < kQK_K; ++j) {
            int l = L[j];
            if (l > 3) {
                y[i].hmask[j % 32] |= static_cast<uint8_t>(1 << (j / 32));
                l -= 4;
            }
            L2[j] = static_cast<uint8_t>(l);
        }
        pack_2bit(L2, y[i].qs);
    }
}

// The part Q4_K and Q5_K share (ggml's quantize_row_q{4,5}_K_ref): per 32-element sub-block a
// scale and a min from make_qkx2_quants, both stored as 6-bit numbers packed into scales[12] under
// the super-block's d / dmin, then the levels L[256] in 0..nmax against the rounded scales.
template <typename Block>
void k_quant_scales_mins(const float* x, Block& y, uint8_t* L, int nmax, float rmin, int nstep) {
    uint8_t Laux[32];
    float weights[32];
    float mins[kQK_K / 32];
    float scales[kQK_K / 32];
    float max_scale = 0;  // scales are positive: the min is taken out
    float max_min = 0;
    for (int j = 0; j < kQK_K / 32; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < kQK_K / 32; ++j) {
        uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
        uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
        ls = std::min<uint8_t>(63, ls);
        lm = std::min<uint8_t>(63, lm);
        if (j < 4) {
            y.scales[j] = ls;
            y.scales[j + 4] = lm;
        } else {
            y.scales[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
            y.scales[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
            y.scales[j - 0] |= static_cast<uint8_t>((lm >> 4) << 6);
        }
    }
    y.d = fp32_to_fp16(max_scale / 63.f);
    y.dmin = fp32_to_fp16(max_min / 63.f);
    for (int j = 0; j < kQK_K / 32; ++j) {
        uint8_t sc, m;
        get_scale_min_k4(j, y.scales, &sc, &m);
        const float d = fp16_to_fp32(y.d) * sc;
        if (d == 0.0f) continue;
        const float dm = fp16_to_fp32(y.dmin) * m;
        for (int ii = 0; ii < 32; ++ii) {
            const int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
        }
    }
}

void quantize_q4_K_ref(const float* x, BlockQ4_K* y, int64_t n) {
    const int64_t nb = n / kQK_K;
    uint8_t L[kQK_K];
    for (int64_t i = 0; i < nb; ++i, x += kQK_K) {
        k_quant_scales_mins(x, y[i], L, 15, -1.f, 20);
        uint8_t* q = y[i].qs;
        for (int j = 0; j < kQK_K; j += 64, q += 32) {
            for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
        }
    }
}

void quantize_q5_K_ref(const float* x, BlockQ5_K* y, int64_t n) {
    const int64_t nb = n / kQK_K;
    uint8_t L[kQK_K];
    for (int64_t i = 0; i < nb; ++i, x += kQK_K) {
        k_quant_scales_mins(x, y[i], L, 31, -0.5f, 15);
        uint8_t* qh = y[i].qh;
        uint8_t* ql = y[i].qs;
        std::memset(qh, 0, kQK_K / 8);
        uint8_t m1 = 1, m2 = 2;
        for (int g = 0; g < kQK_K; g += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[g + j];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                int l2 = L[g + j + 32];
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
            }
            m1 = static_cast<uint8_t>(m1 << 2);
            m2 = static_cast<uint8_t>(m2 << 2);
        }
    }
}

void quantize_q6_K_ref(const float* x, BlockQ6_K* y, int64_t n) {
    const int64_t nb = n / kQK_K;
    int8_t L[kQK_K];
    float scales[kQK_K / 16];
    for (int64_t i = 0; i < nb; ++i, x += kQK_K) {
        float max_scale = 0;
        float max_abs_scale = 0;
        for (int ib = 0; ib < kQK_K / 16; ++ib) {
            const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            if (std::fabs(scale) > max_abs_scale) {
                max_abs_scale = std::fabs(scale);
                max_scale = scale;
            }
        }
        if (max_abs_scale < kGroupMaxEps) {
            std::memset(&y[i], 0, sizeof(BlockQ6_K));
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = fp32_to_fp16(1 / iscale);
        for (int ib = 0; ib < kQK_K / 16; ++ib) {
            y[i].scales[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
        }
        for (int j = 0; j < kQK_K / 16; ++j) {
            const float d = fp16_to_fp32(y[i].d) * y[i].scales[j];
            if (d == 0.0f) continue;
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
            }
        }
        uint8_t* ql = y[i].ql;
        uint8_t* qh = y[i].qh;
        for (int j = 0; j < kQK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t q1 = L[j + l + 0] & 0xF;
                const uint8_t q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF;
                const uint8_t q4 = L[j + l + 96] & 0xF;
                ql[l + 0] = static_cast<uint8_t>(q1 | (q3 << 4));
                ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
                qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                             ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

void dequantize_q8_0(const BlockQ8_0* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < 32; ++j) y[j] = x[i].qs[j] * d;
    }
}

void dequantize_q4_0(const BlockQ4_0* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < 16; ++j) {
            y[j] = ((x[i].qs[j] & 0x0F) - 8) * d;
            y[j + 16] = ((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

void dequantize_q5_0(const BlockQ5_0* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, y += 32) {
        const float d = fp16_to_fp32(x[i].d);
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, sizeof(qh));
        for (int j = 0; j < 16; ++j) {
            const uint8_t xh_0 = static_cast<uint8_t>(((qh >> j) << 4) & 0x10);
            const uint8_t xh_1 = static_cast<uint8_t>((qh >> (j + 12)) & 0x10);
            y[j] = (((x[i].qs[j] & 0x0F) | xh_0) - 16) * d;
            y[j + 16] = (((x[i].qs[j] >> 4) | xh_1) - 16) * d;
        }
    }
}

void dequantize_q2_K(const BlockQ2_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        const float min = fp16_to_fp32(x[i].dmin);
        const uint8_t* q = x[i].qs;
        int is = 0;
        for (int c = 0; c < kQK_K; c += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; ++half) {
                    const uint8_t sc = x[i].scales[is++];
                    const float dl = d * (sc & 0xF);
                    const float ml = min * (sc >> 4);
                    for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l + 16 * half] >> shift) & 3) - ml;
                }
            }
        }
    }
}

void dequantize_q3_K(const BlockQ3_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const float d_all = fp16_to_fp32(x[i].d);
        int8_t scales[16];
        quants::q3k_unpack_scales(x[i].scales, scales);
        const uint8_t* q = x[i].qs;
        const uint8_t* hm = x[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int c = 0; c < kQK_K; c += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m = static_cast<uint8_t>(m << 1)) {
                for (int half = 0; half < 2; ++half) {
                    const float dl = d_all * scales[is++];
                    for (int l = 16 * half; l < 16 * half + 16; ++l) {
                        *y++ = dl * (((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                    }
                }
            }
        }
    }
}

void dequantize_q5_K(const BlockQ5_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* ql = x[i].qs;
        const uint8_t* qh = x[i].qh;
        const float d = fp16_to_fp32(x[i].d);
        const float min = fp16_to_fp32(x[i].dmin);
        uint8_t u1 = 1, u2 = 2;
        for (int is = 0; is < 8; is += 2, ql += 32) {
            uint8_t sc, m;
            get_scale_min_k4(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc;
            const float m1 = min * m;
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc;
            const float m2 = min * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            u1 = static_cast<uint8_t>(u1 << 2);
            u2 = static_cast<uint8_t>(u2 << 2);
        }
    }
}

void dequantize_q4_K(const BlockQ4_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* q = x[i].qs;
        const float d = fp16_to_fp32(x[i].d);
        const float min = fp16_to_fp32(x[i].dmin);
        for (int is = 0; is < 8; is += 2, q += 32) {
            uint8_t sc, m;
            get_scale_min_k4(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc;
            const float m1 = min * m;
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc;
            const float m2 = min * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

void dequantize_q6_K(const BlockQ6_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        for (int c = 0; c < kQK_K; c += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

void check_row(GgmlType t, int64_t n) {
    const GgmlTypeInfo& info = ggml_type_info(t);
    MM_CHECK(info.computable);
    MM_CHECK(n >= 0 && n % info.block_size == 0);
}

}  // namespace

size_t quantize_row(GgmlType t, const float* src, void* dst, int64_t n) {
    check_row(t, n);
    switch (t) {
        case GgmlType::F32:
            std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
            break;
        case GgmlType::F16: {
            auto* d = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_fp16(src[i]);
            break;
        }
        case GgmlType::BF16: {
            auto* d = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_bf16(src[i]);
            break;
        }
        case GgmlType::Q8_0:
            quantize_q8_0_ref(src, static_cast<BlockQ8_0*>(dst), n);
            break;
        case GgmlType::Q4_0:
            quantize_q4_0_ref(src, static_cast<BlockQ4_0*>(dst), n);
            break;
        case GgmlType::Q5_0:
            quantize_q5_0_ref(src, static_cast<BlockQ5_0*>(dst), n);
            break;
        case GgmlType::Q2_K:
            quantize_q2_K_ref(src, static_cast<BlockQ2_K*>(dst), n);
            break;
        case GgmlType::Q3_K:
            quantize_q3_K_ref(src, static_cast<BlockQ3_K*>(dst), n);
            break;
        case GgmlType::Q4_K:
            quantize_q4_K_ref(src, static_cast<BlockQ4_K*>(dst), n);
            break;
        case GgmlType::Q5_K:
            quantize_q5_K_ref(src, static_cast<BlockQ5_K*>(dst), n);
            break;
        case GgmlType::Q6_K:
            quantize_q6_K_ref(src, static_cast<BlockQ6_K*>(dst), n);
            break;
        case GgmlType::Q4_1:
            quants::quantize_q4_1_ref(src, static_cast<quants::BlockQ4_1*>(dst), n);
            break;
        case GgmlType::Q5_1:
            quants::quantize_q5_1_ref(src, static_cast<quants::BlockQ5_1*>(dst), n);
            break;
        case GgmlType::IQ4_NL:
            quants::quantize_iq4_nl(src, static_cast<quants::BlockIQ4_NL*>(dst), n);
            break;
        case GgmlType::IQ4_XS:
            quants::quantize_iq4_xs(src, static_cast<quants::BlockIQ4_XS*>(dst), n);
            break;
        case GgmlType::MXFP4:
            quants::quantize_mxfp4_ref(src, static_cast<quants::BlockMXFP4*>(dst), n);
            break;
        default:  // computable types without a quantizer (the i-quants) included
            MM_CHECK(false && "quantize_row: no quantizer for this type");
    }
    return ggml_row_bytes(t, n);
}

void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n) {
    check_row(t, n);
    switch (t) {
        case GgmlType::F32:
            std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
            break;
        case GgmlType::F16: {
            const auto* s = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
            break;
        }
        case GgmlType::BF16: {
            const auto* s = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(s[i]);
            break;
        }
        case GgmlType::Q8_0:
            dequantize_q8_0(static_cast<const BlockQ8_0*>(src), dst, n);
            break;
        case GgmlType::Q4_0:
            dequantize_q4_0(static_cast<const BlockQ4_0*>(src), dst, n);
            break;
        case GgmlType::Q5_0:
            dequantize_q5_0(static_cast<const BlockQ5_0*>(src), dst, n);
            break;
        case GgmlType::Q2_K:
            dequantize_q2_K(static_cast<const BlockQ2_K*>(src), dst, n);
            break;
        case GgmlType::Q3_K:
            dequantize_q3_K(static_cast<const BlockQ3_K*>(src), dst, n);
            break;
        case GgmlType::Q4_K:
            dequantize_q4_K(static_cast<const BlockQ4_K*>(src), dst, n);
            break;
        case GgmlType::Q5_K:
            dequantize_q5_K(static_cast<const BlockQ5_K*>(src), dst, n);
            break;
        case GgmlType::Q6_K:
            dequantize_q6_K(static_cast<const BlockQ6_K*>(src), dst, n);
            break;
        case GgmlType::Q4_1:
            quants::dequantize_q4_1(static_cast<const quants::BlockQ4_1*>(src), dst, n);
            break;
        case GgmlType::Q5_1:
            quants::dequantize_q5_1(static_cast<const quants::BlockQ5_1*>(src), dst, n);
            break;
        case GgmlType::IQ4_NL:
            quants::dequantize_iq4_nl(static_cast<const quants::BlockIQ4_NL*>(src), dst, n);
            break;
        case GgmlType::IQ4_XS:
            quants::dequantize_iq4_xs(static_cast<const quants::BlockIQ4_XS*>(src), dst, n);
            break;
        case GgmlType::MXFP4:
            quants::dequantize_mxfp4(static_cast<const quants::BlockMXFP4*>(src), dst, n);
            break;
        default:
            MM_CHECK(quants::is_iq_lowbit(t) && "dequantize_row: type not computable");
            quants::dequantize_row_iq(t, src, dst, n);
    }
}

}  // namespace moemesh
