// Activation quantizers, scalar row dot products (the references the SIMD ones are tested against)
// and the per-type kernel table with runtime CPU dispatch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"

namespace moemesh::quants {

void quantize_act_q8_0_scalar(const float* x, BlockQ8_0* y, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        y[i].d = fp32_to_fp16(d);
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int j = 0; j < 32; ++j) y[i].qs[j] = static_cast<int8_t>(nearest_int(x[j] * id));
    }
}

void quantize_act_q8_K_scalar(const float* x, BlockQ8_K* y, int64_t n) {
    for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
        float amax;
        const float max = signed_absmax(x, kQK_K, &amax);
        if (amax == 0.0f) {
            y[i].d = 0;
            std::memset(y[i].qs, 0, sizeof(y[i].qs));
            std::memset(y[i].bsums, 0, sizeof(y[i].bsums));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < kQK_K; ++j) y[i].qs[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * x[j])));
        for (int j = 0; j < kQK_K / 16; ++j) {
            int sum = 0;
            for (int ii = 0; ii < 16; ++ii) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = static_cast<int16_t>(sum);
        }
        y[i].d = 1 / iscale;
    }
}

void quantize_act_f16_scalar(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

void quantize_act_bf16_scalar(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_bf16(x[i]);
}

float vec_dot_f32_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const float*>(w);
    const auto* y = static_cast<const float*>(a);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * y[i]);
    return static_cast<float>(sum);
}

float vec_dot_f16_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const uint16_t*>(w);
    const auto* y = static_cast<const uint16_t*>(a);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(fp16_to_fp32(x[i]) * fp16_to_fp32(y[i]));
    return static_cast<float>(sum);
}

float vec_dot_bf16_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const uint16_t*>(w);
    const auto* y = static_cast<const uint16_t*>(a);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(bf16_to_fp32(x[i]) * bf16_to_fp32(y[i]));
    return static_cast<float>(sum);
}

float vec_dot_q8_0_q8_0_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ8_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        int sumi = 0;
        for (int j = 0; j < 32; ++j) sumi += x[i].qs[j] * y[i].qs[j];
        sum += sumi * (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
    }
    return sum;
}

float vec_dot_q4_0_q8_0_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        int sumi = 0;
        for (int j = 0; j < 16; ++j) {
            sumi += ((x[i].qs[j] & 0x0F) - 8) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        }
        sum += sumi * (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
    }
    return sum;
}

float vec_dot_q4_K_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* q4 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        int sumi = 0;      // Σ_sub scale_sub * Σ q4·q8
        int sum_mins = 0;  // Σ_sub min_sub * Σ q8
        for (int j = 0; j < 8; j += 2, q4 += 32, q8 += 64) {
            uint8_t sc0, m0, sc1, m1;
            get_scale_min_k4(j, x[i].scales, &sc0, &m0);
            get_scale_min_k4(j + 1, x[i].scales, &sc1, &m1);
            int dot0 = 0, dot1 = 0;
            for (int l = 0; l < 32; ++l) {
                dot0 += (q4[l] & 0xF) * q8[l];
                dot1 += (q4[l] >> 4) * q8[l + 32];
            }
            sumi += sc0 * dot0 + sc1 * dot1;
            sum_mins +=
                m0 * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]) + m1 * (y[i].bsums[2 * j + 2] + y[i].bsums[2 * j + 3]);
        }
        const float d = fp16_to_fp32(x[i].d) * y[i].d;
        const float dmin = fp16_to_fp32(x[i].dmin) * y[i].d;
        sum += d * sumi - dmin * sum_mins;
    }
    return sum;
}

float vec_dot_q6_K_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        const int8_t* q8 = y[i].qs;
        int sumi = 0;
        for (int c = 0; c < kQK_K; c += 128, ql += 64, qh += 32, sc += 8, q8 += 128) {
            int dots[8] = {};  // one per 16-element scale group of this 128-chunk
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                dots[is + 0] += q1 * q8[l + 0];
                dots[is + 2] += q2 * q8[l + 32];
                dots[is + 4] += q3 * q8[l + 64];
                dots[is + 6] += q4 * q8[l + 96];
            }
            for (int g = 0; g < 8; ++g) sumi += sc[g] * dots[g];
        }
        sum += fp16_to_fp32(x[i].d) * y[i].d * sumi;
    }
    return sum;
}

float vec_dot_q5_0_q8_0_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, sizeof(qh));
        int sumi = 0;
        for (int j = 0; j < 16; ++j) {
            const int q0 = ((x[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
            const int q1 = ((x[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + 16];
        }
        sum += sumi * (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
    }
    return sum;
}

float vec_dot_q5_K_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const uint8_t* ql = x[i].qs;
        const uint8_t* qh = x[i].qh;
        const int8_t* q8 = y[i].qs;
        int sumi = 0;      // Σ_sub scale_sub * Σ q5·q8
        int sum_mins = 0;  // Σ_sub min_sub * Σ q8
        for (int j = 0; j < 8; j += 2, ql += 32, q8 += 64) {
            uint8_t sc0, m0, sc1, m1;
            get_scale_min_k4(j, x[i].scales, &sc0, &m0);
            get_scale_min_k4(j + 1, x[i].scales, &sc1, &m1);
            int dot0 = 0, dot1 = 0;
            for (int l = 0; l < 32; ++l) {
                dot0 += ((ql[l] & 0xF) | (((qh[l] >> j) & 1) << 4)) * q8[l];
                dot1 += ((ql[l] >> 4) | (((qh[l] >> (j + 1)) & 1) << 4)) * q8[l + 32];
            }
            sumi += sc0 * dot0 + sc1 * dot1;
            sum_mins +=
                m0 * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]) + m1 * (y[i].bsums[2 * j + 2] + y[i].bsums[2 * j + 3]);
        }
        const float d = fp16_to_fp32(x[i].d) * y[i].d;
        const float dmin = fp16_to_fp32(x[i].dmin) * y[i].d;
        sum += d * sumi - dmin * sum_mins;
    }
    return sum;
}

float vec_dot_q3_K_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ3_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        int8_t scales[16];
        q3k_unpack_scales(x[i].scales, scales);
        const int8_t* q8 = y[i].qs;
        int sumi = 0;
        // Element e = 128c + 32s + l: 2 low bits at bits 2s of qs[32c + l], high bit at bit 4c + s of
        // hmask[l], scale e / 16.
        for (int e = 0; e < kQK_K; e += 16) {
            const int c = e / 128, s = (e % 128) / 32;
            int dot = 0;
            for (int l = e % 32; l < e % 32 + 16; ++l) {
                const int q = ((x[i].qs[32 * c + l] >> (2 * s)) & 3) - ((x[i].hmask[l] >> (4 * c + s)) & 1 ? 0 : 4);
                dot += q * q8[128 * c + 32 * s + l];
            }
            sumi += scales[e / 16] * dot;
        }
        sum += fp16_to_fp32(x[i].d) * y[i].d * sumi;
    }
    return sum;
}

float vec_dot_q2_K_q8_K_scalar(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ2_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float sum = 0;
    for (int64_t i = 0; i < n / kQK_K; ++i) {
        const int8_t* q8 = y[i].qs;
        int sumi = 0;
        int sum_mins = 0;
        for (int e = 0; e < kQK_K; e += 16) {
            const int c = e / 128, s = (e % 128) / 32;
            int dot = 0;
            for (int l = e % 32; l < e % 32 + 16; ++l) dot += ((x[i].qs[32 * c + l] >> (2 * s)) & 3) * q8[128 * c + 32 * s + l];
            sumi += (x[i].scales[e / 16] & 0xF) * dot;
            sum_mins += (x[i].scales[e / 16] >> 4) * y[i].bsums[e / 16];
        }
        const float dall = y[i].d * fp16_to_fp32(x[i].d);
        const float dmin = y[i].d * fp16_to_fp32(x[i].dmin);
        sum += dall * sumi - dmin * sum_mins;
    }
    return sum;
}

const char* simd_level_name(SimdLevel level) {
    switch (level) {
        case SimdLevel::kScalar: return "scalar";
        case SimdLevel::kAvx2: return "avx2";
        case SimdLevel::kAvxVnni: return "avxvnni";
        case SimdLevel::kAvx512Vnni: return "avx512vnni";
    }
    return "?";
}

bool parse_simd_level(std::string_view name, SimdLevel* level) {
    for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvxVnni, SimdLevel::kAvx512Vnni}) {
        if (name == simd_level_name(l)) {
            *level = l;
            return true;
        }
    }
    return false;
}

bool cpu_supports(SimdLevel level) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const bool avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    switch (level) {
        case SimdLevel::kScalar: return true;
        case SimdLevel::kAvx2: return avx2;
        case SimdLevel::kAvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
        case SimdLevel::kAvx512Vnni:
            return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    return false;
#else
    return level == SimdLevel::kScalar;
#endif
}

SimdLevel best_simd_level() {
    // Both VNNI encodings run the same 256-bit arithmetic; the EVEX one where AVX-512 is there
    // (Zen 4 has no AVX-VNNI), the VEX one on the cores without AVX-512.
    for (SimdLevel l : {SimdLevel::kAvx512Vnni, SimdLevel::kAvxVnni, SimdLevel::kAvx2}) {
        if (cpu_supports(l)) return l;
    }
    return SimdLevel::kScalar;
}

SimdLevel simd_level() {
    static const SimdLevel level = [] {
        const char* no_simd = std::getenv("MOEMESH_NO_SIMD");
        if (no_simd && *no_simd && *no_simd != '0') return SimdLevel::kScalar;
        const SimdLevel best = best_simd_level();
        const char* want = std::getenv("MOEMESH_CPU_ISA");
        if (want == nullptr || *want == '\0') return best;
        SimdLevel l;
        if (!parse_simd_level(want, &l)) {
            std::fprintf(stderr,
                         "moemesh: MOEMESH_CPU_ISA='%s' is not one of scalar, avx2, avxvnni, avx512vnni; using %s\n",
                         want, simd_level_name(best));
            return best;
        }
        if (!cpu_supports(l)) {
            std::fprintf(stderr, "moemesh: MOEMESH_CPU_ISA=%s: this CPU does not support it; using %s\n", want,
                         simd_level_name(best));
            return best;
        }
        return l;
    }();
    return level;
}

bool cpu_has_avx2() { return simd_level() != SimdLevel::kScalar; }

namespace {

template <class Block, void (*F)(const float*, Block*, int64_t)>
void erase_act(const float* x, void* a, int64_t n) {
    F(x, static_cast<Block*>(a), n);
}

const TypeKernels kScalar[] = {
    {GgmlType::F32, GgmlType::F32, 1, nullptr, vec_dot_f32_scalar},
    {GgmlType::F16, GgmlType::F16, 1, erase_act<uint16_t, quantize_act_f16_scalar>, vec_dot_f16_scalar},
    {GgmlType::BF16, GgmlType::BF16, 1, erase_act<uint16_t, quantize_act_bf16_scalar>, vec_dot_bf16_scalar},
    {GgmlType::Q8_0, GgmlType::Q8_0, 32, erase_act<BlockQ8_0, quantize_act_q8_0_scalar>, vec_dot_q8_0_q8_0_scalar},
    {GgmlType::Q4_0, GgmlType::Q8_0, 32, erase_act<BlockQ8_0, quantize_act_q8_0_scalar>, vec_dot_q4_0_q8_0_scalar},
    {GgmlType::Q4_K, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_q4_K_q8_K_scalar},
    {GgmlType::Q6_K, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_q6_K_q8_K_scalar},
    {GgmlType::Q5_0, GgmlType::Q8_0, 32, erase_act<BlockQ8_0, quantize_act_q8_0_scalar>, vec_dot_q5_0_q8_0_scalar},
    {GgmlType::Q5_K, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_q5_K_q8_K_scalar},
    {GgmlType::Q3_K, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_q3_K_q8_K_scalar},
    {GgmlType::Q2_K, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_q2_K_q8_K_scalar},
    {GgmlType::Q4_1, GgmlType::Q8_1, 32, erase_act<BlockQ8_1, quantize_act_q8_1_scalar>, vec_dot_q4_1_q8_1_scalar},
    {GgmlType::Q5_1, GgmlType::Q8_1, 32, erase_act<BlockQ8_1, quantize_act_q8_1_scalar>, vec_dot_q5_1_q8_1_scalar},
    {GgmlType::IQ4_NL, GgmlType::Q8_0, 32, erase_act<BlockQ8_0, quantize_act_q8_0_scalar>, vec_dot_iq4_nl_q8_0_scalar},
    {GgmlType::IQ4_XS, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>,
     vec_dot_iq4_xs_q8_K_scalar},
    {GgmlType::MXFP4, GgmlType::Q8_0, 32, erase_act<BlockQ8_0, quantize_act_q8_0_scalar>, vec_dot_mxfp4_q8_0_scalar},
    {GgmlType::IQ2_XXS, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq2_xxs_q8_K_scalar},
    {GgmlType::IQ2_XS, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq2_xs_q8_K_scalar},
    {GgmlType::IQ2_S, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq2_s_q8_K_scalar},
    {GgmlType::IQ3_XXS, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq3_xxs_q8_K_scalar},
    {GgmlType::IQ3_S, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq3_s_q8_K_scalar},
    {GgmlType::IQ1_S, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq1_s_q8_K_scalar},
    {GgmlType::IQ1_M, GgmlType::Q8_K, 256, erase_act<BlockQ8_K, quantize_act_q8_K_scalar>, vec_dot_iq1_m_q8_K_scalar},
};

#if defined(__x86_64__) || defined(__i386__)
#define MM_ZMM(x) {}
#define MM_SIMD_NS avx2
const TypeKernels kAvx2[] = {
#include "kernels/cpu/quants_avx2_table.inc"
};
#undef MM_SIMD_NS
#define MM_SIMD_NS avxvnni
const TypeKernels kAvxVnni[] = {
#include "kernels/cpu/quants_avx2_table.inc"
};
#undef MM_SIMD_NS
#undef MM_ZMM
#define MM_ZMM(x) avx512vnni::x
#define MM_SIMD_NS avx512vnni
const TypeKernels kAvx512Vnni[] = {
#include "kernels/cpu/quants_avx2_table.inc"
};
#undef MM_SIMD_NS
#undef MM_ZMM
static_assert(std::size(kAvx2) == std::size(kScalar) && std::size(kAvxVnni) == std::size(kScalar) &&
              std::size(kAvx512Vnni) == std::size(kScalar), "type_kernels indexes the tables with kScalar's size");
#endif

}  // namespace

const TypeKernels* type_kernels(GgmlType t, SimdLevel level) {
    const TypeKernels* table = kScalar;
#if defined(__x86_64__) || defined(__i386__)
    switch (level) {
        case SimdLevel::kScalar: break;
        case SimdLevel::kAvx2: table = kAvx2; break;
        case SimdLevel::kAvxVnni: table = kAvxVnni; break;
        case SimdLevel::kAvx512Vnni: table = kAvx512Vnni; break;
    }
#endif
    for (size_t i = 0; i < std::size(kScalar); ++i) {
        if (table[i].weight_type == t) return &table[i];
    }
    return nullptr;
}

const TypeKernels* type_kernels(GgmlType t, bool simd) {
    return type_kernels(t, simd ? simd_level() : SimdLevel::kScalar);
}

}  // namespace moemesh::quants

namespace moemesh {
const char* cpu_kernel_isa() { return quants::simd_level_name(quants::simd_level()); }
}  // namespace moemesh
