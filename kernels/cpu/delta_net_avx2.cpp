// AVX2 + FMA primitives of the gated delta rule (kernels/cpu/delta_net.cpp picks them at run time
// when quants::cpu_has_avx2()): the small GEMM both delta-rule forms are built on, and the fused
// per-token state update of the recurrence. Same products as the scalar versions; only the order
// of the float additions differs (FMA, lane-parallel sums).
//
// Compiled for AVX2 through the target pragma, with intrinsics only (see quants_avx2.cpp for why).
// Accumulators are named variables, not arrays: GCC -O2 keeps small arrays of vectors in memory.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace moemesh::delta_net_avx2 {
namespace {

inline __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 bc(float x) { return _mm256_set1_ps(x); }
// How a block of sums reaches C: C = alpha·acc + beta·C, and C is not read when beta == 0.
struct Scale {
    float alpha, beta;
    __m256 va, vb;
    Scale(float a, float b) : alpha(a), beta(b), va(_mm256_set1_ps(a)), vb(_mm256_set1_ps(b)) {}
};
inline void acc_store(float* p, const Scale& sc, __m256 acc) {
    const __m256 prev = sc.beta == 0.0f ? _mm256_setzero_ps() : _mm256_mul_ps(sc.vb, ld(p));
    _mm256_storeu_ps(p, _mm256_fmadd_ps(sc.va, acc, prev));
}

// C[6, 16] = alpha·A[6, k]·B[k, 16] + beta·C: twelve sums, two B vectors and one broadcast fill the
// sixteen registers (the usual AVX2 tile). Not inlined, so that nothing else competes for them.
__attribute__((noinline)) void kernel_6x16(int64_t k, const Scale& sc, const float* a, int64_t lda, const float* b,
                                           int64_t ldb, float* c, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    for (int64_t p = 0; p < k; ++p) {
        const __m256 b0 = ld(b + p * ldb), b1 = ld(b + p * ldb + 8);
        __m256 x = bc(a0[p]);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        x = bc(a1[p]);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        x = bc(a2[p]);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        x = bc(a3[p]);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        x = bc(a4[p]);
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        x = bc(a5[p]);
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    acc_store(c, sc, c00);
    acc_store(c + 8, sc, c01);
    acc_store(c + ldc, sc, c10);
    acc_store(c + ldc + 8, sc, c11);
    acc_store(c + 2 * ldc, sc, c20);
    acc_store(c + 2 * ldc + 8, sc, c21);
    acc_store(c + 3 * ldc, sc, c30);
    acc_store(c + 3 * ldc + 8, sc, c31);
    acc_store(c + 4 * ldc, sc, c40);
    acc_store(c + 4 * ldc + 8, sc, c41);
    acc_store(c + 5 * ldc, sc, c50);
    acc_store(c + 5 * ldc + 8, sc, c51);
}

// C[1, 64] = alpha·a[k]·B[k, 64] + beta·C: eight independent sums, so the FMA latency is hidden for the
// one-row products of the recurrence (u = Sᵀk).
__attribute__((noinline)) void kernel_1x64(int64_t k, const Scale& sc, const float* a, const float* b, int64_t ldb,
                                           float* c) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    __m256 c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps(), c6 = _mm256_setzero_ps(), c7 = _mm256_setzero_ps();
    for (int64_t p = 0; p < k; ++p) {
        const float* bp = b + p * ldb;
        const __m256 x = bc(a[p]);
        c0 = _mm256_fmadd_ps(x, ld(bp), c0);
        c1 = _mm256_fmadd_ps(x, ld(bp + 8), c1);
        c2 = _mm256_fmadd_ps(x, ld(bp + 16), c2);
        c3 = _mm256_fmadd_ps(x, ld(bp + 24), c3);
        c4 = _mm256_fmadd_ps(x, ld(bp + 32), c4);
        c5 = _mm256_fmadd_ps(x, ld(bp + 40), c5);
        c6 = _mm256_fmadd_ps(x, ld(bp + 48), c6);
        c7 = _mm256_fmadd_ps(x, ld(bp + 56), c7);
    }
    acc_store(c, sc, c0);
    acc_store(c + 8, sc, c1);
    acc_store(c + 16, sc, c2);
    acc_store(c + 24, sc, c3);
    acc_store(c + 32, sc, c4);
    acc_store(c + 40, sc, c5);
    acc_store(c + 48, sc, c6);
    acc_store(c + 56, sc, c7);
}

// C[1, 8] = alpha·a[k]·B[k, 8] + beta·C.
inline void kernel_1x8(int64_t k, const Scale& sc, const float* a, const float* b, int64_t ldb, float* c) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 2 <= k; p += 2) {
        c0 = _mm256_fmadd_ps(bc(a[p]), ld(b + p * ldb), c0);
        c1 = _mm256_fmadd_ps(bc(a[p + 1]), ld(b + (p + 1) * ldb), c1);
    }
    if (p < k) c0 = _mm256_fmadd_ps(bc(a[p]), ld(b + p * ldb), c0);
    acc_store(c, sc, _mm256_add_ps(c0, c1));
}

// C[1, n] = alpha·a[k]·B[k, n] + beta·C[1, n] for the last n < 8 columns.
inline void kernel_1xn(int64_t n, int64_t k, const Scale& sc, const float* a, const float* b, int64_t ldb, float* c) {
    for (int64_t col = 0; col < n; ++col) {
        float s = 0.0f;
        for (int64_t p = 0; p < k; ++p) s += a[p] * b[p * ldb + col];
        c[col] = sc.alpha * s + (sc.beta == 0.0f ? 0.0f : sc.beta * c[col]);
    }
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc) {
    const Scale va(alpha, beta);
    int64_t r = 0;
    for (; r + 6 <= m; r += 6) {
        const float* ar = a + r * lda;
        float* cr = c + r * ldc;
        int64_t col = 0;
        for (; col + 16 <= n; col += 16) kernel_6x16(k, va, ar, lda, b + col, ldb, cr + col, ldc);
        for (int64_t rr = 0; rr < 6; ++rr) {
            int64_t cc = col;
            for (; cc + 8 <= n; cc += 8) kernel_1x8(k, va, ar + rr * lda, b + cc, ldb, cr + rr * ldc + cc);
            kernel_1xn(n - cc, k, va, ar + rr * lda, b + cc, ldb, cr + rr * ldc + cc);
        }
    }
    for (; r < m; ++r) {
        const float* ar = a + r * lda;
        float* cr = c + r * ldc;
        int64_t col = 0;
        for (; col + 64 <= n; col += 64) kernel_1x64(k, va, ar, b + col, ldb, cr + col);
        for (; col + 8 <= n; col += 8) kernel_1x8(k, va, ar, b + col, ldb, cr + col);
        kernel_1xn(n - col, k, va, ar, b + col, ldb, cr + col);
    }
}

void decay_update_read(int64_t dk, int64_t dv, float* s, float decay, const float* k, const float* delta,
                       const float* q, float* o) {
    const __m256 vd = bc(decay);
    int64_t c = 0;
    // 32 columns at a time: delta and the four output sums stay in registers while S streams past.
    for (; c + 32 <= dv; c += 32) {
        const __m256 d0 = ld(delta + c), d1 = ld(delta + c + 8), d2 = ld(delta + c + 16), d3 = ld(delta + c + 24);
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps(), o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < dk; ++i) {
            float* si = s + i * dv + c;
            const __m256 ki = bc(k[i]), qi = bc(q[i]);
            const __m256 s0 = _mm256_fmadd_ps(ki, d0, _mm256_mul_ps(vd, ld(si)));
            const __m256 s1 = _mm256_fmadd_ps(ki, d1, _mm256_mul_ps(vd, ld(si + 8)));
            const __m256 s2 = _mm256_fmadd_ps(ki, d2, _mm256_mul_ps(vd, ld(si + 16)));
            const __m256 s3 = _mm256_fmadd_ps(ki, d3, _mm256_mul_ps(vd, ld(si + 24)));
            _mm256_storeu_ps(si, s0);
            _mm256_storeu_ps(si + 8, s1);
            _mm256_storeu_ps(si + 16, s2);
            _mm256_storeu_ps(si + 24, s3);
            o0 = _mm256_fmadd_ps(qi, s0, o0);
            o1 = _mm256_fmadd_ps(qi, s1, o1);
            o2 = _mm256_fmadd_ps(qi, s2, o2);
            o3 = _mm256_fmadd_ps(qi, s3, o3);
        }
        _mm256_storeu_ps(o + c, o0);
        _mm256_storeu_ps(o + c + 8, o1);
        _mm256_storeu_ps(o + c + 16, o2);
        _mm256_storeu_ps(o + c + 24, o3);
    }
    for (; c + 8 <= dv; c += 8) {
        const __m256 d0 = ld(delta + c);
        __m256 o0 = _mm256_setzero_ps();
        for (int64_t i = 0; i < dk; ++i) {
            float* si = s + i * dv + c;
            const __m256 s0 = _mm256_fmadd_ps(bc(k[i]), d0, _mm256_mul_ps(vd, ld(si)));
            _mm256_storeu_ps(si, s0);
            o0 = _mm256_fmadd_ps(bc(q[i]), s0, o0);
        }
        _mm256_storeu_ps(o + c, o0);
    }
    for (; c < dv; ++c) {
        float oc = 0.0f;
        for (int64_t i = 0; i < dk; ++i) {
            float& sic = s[i * dv + c];
            sic = decay * sic + k[i] * delta[c];
            oc += q[i] * sic;
        }
        o[c] = oc;
    }
}

}  // namespace moemesh::delta_net_avx2

#pragma GCC pop_options

#endif  // x86
