// AVX2 + FMA + F16C inner loops of attention (kernels/cpu/attention.cpp): one (token, head) pair's
// scores against the cached keys and the softmax-weighted sum of the cached values. The rounding is
// that of the scalar path (q and the softmax weights rounded to f16 with an f16 cache, as llama.cpp
// does); only the order of the float additions differs (8-lane partial sums).
//
// Compiled for AVX2 through the target pragma, with intrinsics only (see quants_avx2.cpp for why).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace moemesh::quants::avx2 {
namespace {

inline float hsum8(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

inline __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float ld1(const float* p) { return *p; }
inline float ld1(const uint16_t* p) { return _cvtsh_ss(*p); }

// Σ q[i]·k[i], i < d.
template <class T>
inline float dot_row(const float* q, const T* k, int64_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        a0 = _mm256_fmadd_ps(ld(q + i), ld(k + i), a0);
        a1 = _mm256_fmadd_ps(ld(q + i + 8), ld(k + i + 8), a1);
        a2 = _mm256_fmadd_ps(ld(q + i + 16), ld(k + i + 16), a2);
        a3 = _mm256_fmadd_ps(ld(q + i + 24), ld(k + i + 24), a3);
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(ld(q + i), ld(k + i), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < d; ++i) s += q[i] * ld1(k + i);
    return s;
}

// out[0..d) = Σ_j p[j]·v[j·stride + i].
template <class T>
inline void weighted_sum(const float* p, const T* v, int64_t n_kv, int64_t stride, int64_t d, float* out) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) {
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps(), o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
        __m256 o4 = _mm256_setzero_ps(), o5 = _mm256_setzero_ps(), o6 = _mm256_setzero_ps(), o7 = _mm256_setzero_ps();
        const T* vj = v + c;
        for (int64_t j = 0; j < n_kv; ++j, vj += stride) {
            const __m256 pj = _mm256_broadcast_ss(p + j);
            o0 = _mm256_fmadd_ps(pj, ld(vj), o0);
            o1 = _mm256_fmadd_ps(pj, ld(vj + 8), o1);
            o2 = _mm256_fmadd_ps(pj, ld(vj + 16), o2);
            o3 = _mm256_fmadd_ps(pj, ld(vj + 24), o3);
            o4 = _mm256_fmadd_ps(pj, ld(vj + 32), o4);
            o5 = _mm256_fmadd_ps(pj, ld(vj + 40), o5);
            o6 = _mm256_fmadd_ps(pj, ld(vj + 48), o6);
            o7 = _mm256_fmadd_ps(pj, ld(vj + 56), o7);
        }
        _mm256_storeu_ps(out + c, o0);
        _mm256_storeu_ps(out + c + 8, o1);
        _mm256_storeu_ps(out + c + 16, o2);
        _mm256_storeu_ps(out + c + 24, o3);
        _mm256_storeu_ps(out + c + 32, o4);
        _mm256_storeu_ps(out + c + 40, o5);
        _mm256_storeu_ps(out + c + 48, o6);
        _mm256_storeu_ps(out + c + 56, o7);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 o = _mm256_setzero_ps();
        const T* vj = v + c;
        for (int64_t j = 0; j < n_kv; ++j, vj += stride) o = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), ld(vj), o);
        _mm256_storeu_ps(out + c, o);
    }
    for (; c < d; ++c) {
        float o = 0.0f;
        for (int64_t j = 0; j < n_kv; ++j) o += p[j] * ld1(v + j * stride + c);
        out[c] = o;
    }
}

// x[i] = f32(f16(x[i])), round to nearest even.
inline void round_f16(const float* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    }
    for (; i < n; ++i) y[i] = _cvtsh_ss(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace

void attend_one(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_kv, int64_t kv_stride,
                int64_t d, float scale, float* scores, float* qbuf, float* out) {
    if (kv_f16) {
        const auto* k16 = static_cast<const uint16_t*>(k);
        round_f16(q, qbuf, d);
        for (int64_t j = 0; j < n_kv; ++j) scores[j] = dot_row(qbuf, k16 + j * kv_stride, d) * scale;
        softmax_inplace(scores, n_kv);
        round_f16(scores, scores, n_kv);
        weighted_sum(scores, static_cast<const uint16_t*>(v), n_kv, kv_stride, d, out);
    } else {
        const auto* k32 = static_cast<const float*>(k);
        for (int64_t j = 0; j < n_kv; ++j) scores[j] = dot_row(q, k32 + j * kv_stride, d) * scale;
        softmax_inplace(scores, n_kv);
        weighted_sum(scores, static_cast<const float*>(v), n_kv, kv_stride, d, out);
    }
}

}  // namespace moemesh::quants::avx2

#pragma GCC pop_options

#endif  // x86
