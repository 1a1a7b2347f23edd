// AVX2 + FMA + F16C row dot products and activation quantizers, selected at run time
// (quants_dot.cpp: type_kernels). The integer arithmetic is that of ggml's x86 vec_dot_*:
// maddubs (u8 × s8 → s16 pairs) then madd (s16 → s32), summed per block in int32 and scaled once.
//
// The whole file is compiled for AVX2 through the target pragma below. Only intrinsics and
// file-local helpers are used after it, so no inline function shared with baseline code (whose
// out-of-line copy the linker might pick) is ever compiled with AVX2 enabled.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/quants_internal.h"

#include "kernels/cpu/quants_avx2_target.h"

#include "kernels/cpu/quants_avx2_inl.h"

namespace moemesh::quants::MM_SIMD_NS {
namespace {
// Σ x·y over n elements loaded 8 at a time by load(p) as floats; four independent accumulators
// (written out: GCC -O2 keeps an accumulator array in memory).
template <class T, class Load, class Scalar>
float dot_float(int64_t n, const T* x, const T* y, Load load, Scalar scalar) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(load(x + i), load(y + i), acc0);
        acc1 = _mm256_fmadd_ps(load(x + i + 8), load(y + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(load(x + i + 16), load(y + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(load(x + i + 24), load(y + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load(x + i), load(y + i), acc0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; ++i) sum += scalar(x[i]) * scalar(y[i]);
    return sum;
}

struct F32Load {
    __m256 operator()(const float* p) const { return _mm256_loadu_ps(p); }
    float operator()(float f) const { return f; }
};
struct F16Load {
    __m256 operator()(const uint16_t* p) const { return load_f16(p); }
    float operator()(uint16_t h) const { return h2f(h); }
};
struct BF16Load {
    __m256 operator()(const uint16_t* p) const { return load_bf16(p); }
    float operator()(uint16_t h) const {
        const uint32_t u = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};

}  // namespace

float vec_dot_f32(int64_t n, const void* w, const void* a) {
    return dot_float(n, static_cast<const float*>(w), static_cast<const float*>(a), F32Load{}, F32Load{});
}

float vec_dot_f16(int64_t n, const void* w, const void* a) {
    return dot_float(n, static_cast<const uint16_t*>(w), static_cast<const uint16_t*>(a), F16Load{}, F16Load{});
}

float vec_dot_bf16(int64_t n, const void* w, const void* a) {
    return dot_float(n, static_cast<const uint16_t*>(w), static_cast<const uint16_t*>(a), BF16Load{}, BF16Load{});
}

float vec_dot_q4_K_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const int64_t nb = n / kQK_K;
    __m128 acc = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        // d and dmin are adjacent fp16s: convert both at once, then scale by the activation's d.
        uint32_t d_dmin;
        std::memcpy(&d_dmin, &x[i].d, 4);
        const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d_dmin))), _mm_set1_ps(y[i].d));
        const __m256i mins_and_scales = q4k_mins_and_scales(x[i].scales);  // 8 scales, then 8 mins
        const __m128i mp = q4k_min_products(_mm256_extracti128_si256(mins_and_scales, 1), y[i].bsums);

        const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        const uint8_t* q4 = x[i].qs;
        const int8_t* q8 = y[i].qs;
#if MM_SIMD_VNNI == 2
        __m512i s512 = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            __m512i q4v, sc;
            q4k_group512(q4 + 32 * j, scales, j, &q4v, &sc);
            s512 = _mm512_dpwssd_epi32(s512, sc, _mm512_maddubs_epi16(q4v, _mm512_loadu_si512(q8 + 64 * j)));
        }
        const __m256i sumi = fold512(s512);
#else
        // Four independent 64-element groups, summed as a tree (GCC -O2 would not unroll the loop).
        const __m256i s0 = q4k_group(q4, q8, scales, 0);
        const __m256i s1 = q4k_group(q4 + 32, q8 + 64, scales, 1);
        const __m256i s2 = q4k_group(q4 + 64, q8 + 128, scales, 2);
        const __m256i s3 = q4k_group(q4 + 96, q8 + 192, scales, 3);
        const __m256i sumi = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
#endif
        acc = q4k_float_step(acc, sumi, mp, _mm_cvtss_f32(dd), -_mm_cvtss_f32(_mm_shuffle_ps(dd, dd, 0x55)));
    }
    return _mm_cvtss_f32(acc);
}

float vec_dot_q6_K_q8_K(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const int64_t nb = n / kQK_K;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const float d = y[i].d * h2f(x[i].d);
        const uint8_t* q4 = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* q8 = y[i].qs;
        const __m128i scales8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
        const __m256i sumi = _mm256_sub_epi32(
            _mm256_add_epi32(q6k_chunk(q4, qh, q8, scales8, 0), q6k_chunk(q4 + 64, qh + 32, q8 + 128, scales8, 1)),
            q6k_offset(scales8, y[i].bsums));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

void quantize_act_q8_0(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<BlockQ8_0*>(vy);
    for (int64_t i = 0; i < n / 32; ++i, x += 32) q8_block(x, &y[i].d, y[i].qs, nullptr);
}

// Q8_K exactly as quantize_act_q8_K_scalar (ggml's quantize_row_q8_K_ref): max = the first element of
// largest magnitude (its sign kept), iscale = -127/max, q = min(127, round-half-even(iscale·x)),
// bsums per 16, d = 1/iscale.
void quantize_act_q8_K(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<BlockQ8_K*>(vy);
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i max127 = _mm256_set1_epi32(127);
    for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
        __m256 vmax = _mm256_setzero_ps();
        for (int j = 0; j < kQK_K; j += 8) vmax = _mm256_max_ps(_mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + j)), vmax);  // NaN: skipped
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(vmax, 1), _mm256_castps256_ps128(vmax));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        if (amax == 0.0f) {
            y[i].d = 0;
            std::memset(y[i].qs, 0, sizeof(y[i].qs));
            std::memset(y[i].bsums, 0, sizeof(y[i].bsums));
            continue;
        }
        // First element whose magnitude is amax.
        const __m256 vamax = _mm256_set1_ps(amax);
        float max = 0.0f;
        for (int j = 0; j < kQK_K; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + j);
            const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign_bit, v), vamax, _CMP_EQ_OQ));
            if (mask) {
                max = x[j + __builtin_ctz(static_cast<unsigned>(mask))];
                break;
            }
        }
        const float iscale = -127.f / max;
        const __m256 mul = _mm256_set1_ps(iscale);
        __m256i sums[8];  // per 32 elements: 4 int32 per 128-bit lane, each a sum of 4 quants
        for (int j = 0; j < kQK_K / 32; ++j) {
            const float* xj = x + 32 * j;
            __m256i q32[4];
            for (int v = 0; v < 4; ++v) {
                const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xj + 8 * v), mul);
                q32[v] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps(s, _MM_FROUND_TO_NEAREST_INT)), max127);
            }
            const __m256i q =
                _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(q32[0], q32[1]),
                                                               _mm256_packs_epi32(q32[2], q32[3])),
                                            perm);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs + 32 * j), q);
            sums[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
        }
        // Lane l of sums[j] holds group 2j+l: reduce 4 int32 per (vector, lane) to one.
        const __m256i h01 = _mm256_hadd_epi32(sums[0], sums[1]);
        const __m256i h23 = _mm256_hadd_epi32(sums[2], sums[3]);
        const __m256i h45 = _mm256_hadd_epi32(sums[4], sums[5]);
        const __m256i h67 = _mm256_hadd_epi32(sums[6], sums[7]);
        const __m256i g0 = _mm256_hadd_epi32(h01, h23);  // lane 0: groups 0,2,4,6; lane 1: 1,3,5,7
        const __m256i g1 = _mm256_hadd_epi32(h45, h67);  // lane 0: groups 8,10,12,14; lane 1: 9,11,13,15
        const __m256i p = _mm256_packs_epi32(g0, g1);    // lane 0: even groups; lane 1: odd groups
        const __m128i ev = _mm256_castsi256_si128(p), od = _mm256_extracti128_si256(p, 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y[i].bsums), _mm_unpacklo_epi16(ev, od));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y[i].bsums + 8), _mm_unpackhi_epi16(ev, od));
        y[i].d = 1 / iscale;
    }
}

void quantize_act_f16(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<uint16_t*>(vy);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; ++i) y[i] = static_cast<uint16_t>(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace moemesh::quants::MM_SIMD_NS

#pragma GCC pop_options

#endif  // x86
