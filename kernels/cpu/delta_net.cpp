// Gated DeltaNet kernels for Qwen3-Next's linear-attention layers (MODEL_SPEC §2.5): causal conv +
// SiLU with carried state, L2 norm, gated RMSNorm, and the gated delta rule in its exact recurrent
// form (decode) and its chunked WY form (prefill).
//
// Both delta-rule forms are written once here on top of two primitives, a small GEMM
// (C = alpha·A·B + beta·C with B's rows contiguous) and the fused per-token state update; those come
// in a scalar version (below) and an AVX2+FMA one (delta_net_avx2.cpp), picked once at run time.
// Threads split the v-heads (each owns its state slice); the conv splits the channels.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

namespace moemesh {

// AVX2 + FMA versions of the primitives (delta_net_avx2.cpp); call only when cpu_has_avx2().
namespace delta_net_avx2 {
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc);
void decay_update_read(int64_t dk, int64_t dv, float* s, float decay, const float* k, const float* delta,
                       const float* q, float* o);
}  // namespace delta_net_avx2

namespace {

// C[m, n] = alpha · A[m, k] · B[k, n] + beta · C; rows lda / ldb / ldc floats apart. With beta == 0,
// C is only written (it may hold anything before).
using GemmFn = void (*)(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                        int64_t ldb, float beta, float* c, int64_t ldc);
// One token's state update and read-out for one head, in one pass over S[dk, dv]:
//   S[i, :] = decay · S[i, :] + k[i] · delta[:];  o[:] = Σ_i q[i] · S[i, :] (o overwritten).
using DecayUpdateReadFn = void (*)(int64_t dk, int64_t dv, float* s, float decay, const float* k, const float* delta,
                                   const float* q, float* o);

void gemm_scalar(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
    for (int64_t r = 0; r < m; ++r) {
        float* cr = c + r * ldc;
        for (int64_t col = 0; col < n; ++col) cr[col] = beta == 0.0f ? 0.0f : beta * cr[col];
        for (int64_t p = 0; p < k; ++p) {
            const float ap = alpha * a[r * lda + p];
            const float* bp = b + p * ldb;
            for (int64_t col = 0; col < n; ++col) cr[col] += ap * bp[col];
        }
    }
}

void decay_update_read_scalar(int64_t dk, int64_t dv, float* s, float decay, const float* k, const float* delta,
                              const float* q, float* o) {
    std::fill(o, o + dv, 0.0f);
    for (int64_t i = 0; i < dk; ++i) {
        float* si = s + i * dv;
        for (int64_t c = 0; c < dv; ++c) {
            si[c] = decay * si[c] + k[i] * delta[c];
            o[c] += q[i] * si[c];
        }
    }
}

struct Primitives {
    GemmFn gemm;
    DecayUpdateReadFn decay_update_read;
};

const Primitives& primitives() {
    static const Primitives p = [] {
#if defined(__x86_64__) || defined(__i386__)
        if (quants::cpu_has_avx2()) return Primitives{delta_net_avx2::gemm, delta_net_avx2::decay_update_read};
#endif
        return Primitives{gemm_scalar, decay_update_read_scalar};
    }();
    return p;
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

// Head geometry shared by both delta-rule forms; pointers to one token's rows of v-head j.
struct HeadView {
    const DeltaNetArgs& a;
    int64_t j, kh;  // v-head and the k-head it reads
    const float* q(int64_t t) const { return a.q + (t * a.n_k_heads + kh) * a.k_dim; }
    const float* k(int64_t t) const { return a.k + (t * a.n_k_heads + kh) * a.k_dim; }
    const float* v(int64_t t) const { return a.v + (t * a.n_v_heads + j) * a.v_dim; }
    float* out(int64_t t) const { return a.out + (t * a.n_v_heads + j) * a.v_dim; }
    float g(int64_t t) const { return a.g[t * a.n_v_heads + j]; }
    float beta(int64_t t) const { return a.beta[t * a.n_v_heads + j]; }
    float* state() const { return a.state + j * a.k_dim * a.v_dim; }
};

HeadView head_view(const DeltaNetArgs& a, int64_t j) {
    // Contiguous repeat per k-head (MODEL_SPEC §2.5 step 4): v-heads g·r .. g·r+r-1 share k-head g.
    return HeadView{a, j, j / (a.n_v_heads / a.n_k_heads)};
}

// Scratch for one head's recurrence: u = Sᵀk, delta and the scaled q.
struct RecurrentScratch {
    std::vector<float> u, delta, qs;
    explicit RecurrentScratch(const DeltaNetArgs& a)
        : u(static_cast<size_t>(a.v_dim)), delta(static_cast<size_t>(a.v_dim)), qs(static_cast<size_t>(a.k_dim)) {}
};

void recurrent_head(const DeltaNetArgs& a, int64_t j, RecurrentScratch& sc) {
    const Primitives& pr = primitives();
    const HeadView h = head_view(a, j);
    const int64_t dk = a.k_dim, dv = a.v_dim;
    float* s = h.state();
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        const float decay = std::exp(h.g(t)), beta = h.beta(t);
        const float* k = h.k(t);
        const float* v = h.v(t);
        const float* q = h.q(t);
        // u = (decay·S)ᵀk, computed as decay·(Sᵀk) so S is read once before the fused update.
        pr.gemm(1, dv, dk, 1.0f, k, dk, s, dv, 0.0f, sc.u.data(), dv);
        for (int64_t c = 0; c < dv; ++c) sc.delta[c] = beta * (v[c] - decay * sc.u[c]);
        for (int64_t i = 0; i < dk; ++i) sc.qs[i] = q[i] * a.scale;
        pr.decay_update_read(dk, dv, s, decay, k, sc.delta.data(), sc.qs.data(), h.out(t));
    }
}

// Scratch for one head's chunked form, sized for chunks of up to `chunk` tokens. Per chunk of L
// tokens (rows are the chunk's tokens; K, Q and V are read in place from the inputs):
//   kt [dk, L]  Kᵀ, later (K⊙e^{G_last−G})ᵀ       qc [L, dk] scale·Q⊙e^G
//   tm [L, L]   A, then T = (I − A)⁻¹             tv, tk [L, L] T·diag(β), T·diag(β⊙e^G)
//   p  [L, L]   scale·tril_incl(Q·Kᵀ ⊙ D)
//   u  [L, dv]  T·(β⊙V), then V_new = U − W·S    w  [L, dk] W = T·(β⊙K⊙e^G)
//   gc [L]      cumulative log-decay G            row [L] a row of A in the substitution; per-token factors
struct ChunkScratch {
    std::vector<float> kt, qc, w, u, tm, tv, tk, p, gc, row;
    ChunkScratch(const DeltaNetArgs& a, int64_t chunk) {
        const auto n = [](int64_t x) { return static_cast<size_t>(x); };
        for (auto* b : {&kt, &qc, &w}) b->resize(n(chunk * a.k_dim));
        u.resize(n(chunk * a.v_dim));
        for (auto* b : {&tm, &tv, &tk, &p}) b->resize(n(chunk * chunk));
        for (auto* b : {&gc, &row}) b->resize(n(chunk));
    }
};

// Tokens t0 .. t0+L-1 of v-head j (MODEL_SPEC §2.5 step 5, chunked form; HF
// torch_chunk_gated_delta_rule). A short last chunk is processed as is, which equals HF's zero
// padding: padded rows (g = 0, β = 0, k = 0) come after every real token and leave S unchanged.
void chunk_head(const DeltaNetArgs& a, const HeadView& h, int64_t t0, int64_t L, ChunkScratch& sc) {
    const Primitives& pr = primitives();
    const int64_t dk = a.k_dim, dv = a.v_dim;
    const int64_t ldk = a.n_k_heads * dk, ldv = a.n_v_heads * dv;  // token stride of K, Q and of V, out
    const float* K = h.k(t0);
    const float* Q = h.q(t0);
    const float* V = h.v(t0);
    float* out = h.out(t0);
    float* s = h.state();
    float *kt = sc.kt.data(), *qc = sc.qc.data(), *w = sc.w.data(), *u = sc.u.data();
    float *tm = sc.tm.data(), *tv = sc.tv.data(), *tk = sc.tk.data(), *p = sc.p.data(), *gc = sc.gc.data();

    float gsum = 0.0f;
    for (int64_t i = 0; i < L; ++i) {
        gsum += h.g(t0 + i);
        gc[i] = gsum;
        const float qs = a.scale * std::exp(gc[i]);
        for (int64_t d = 0; d < dk; ++d) {
            kt[d * L + i] = K[i * ldk + d];
            qc[i * dk + d] = qs * Q[i * ldk + d];
        }
    }

    // A[i, j] = −β_i (k_i·k_j) e^{G_i − G_j} for j < i; P[i, j] = scale (q_i·k_j) e^{G_i − G_j} for j ≤ i.
    pr.gemm(L, L, dk, 1.0f, K, ldk, kt, L, 0.0f, tm, L);
    pr.gemm(L, L, dk, 1.0f, Q, ldk, kt, L, 0.0f, p, L);
    for (int64_t i = 0; i < L; ++i) {
        const float nbeta = -h.beta(t0 + i);
        float* ti = tm + i * L;
        float* pi = p + i * L;
        for (int64_t jj = 0; jj < i; ++jj) {
            const float dec = std::exp(gc[i] - gc[jj]);
            ti[jj] *= nbeta * dec;
            pi[jj] *= a.scale * dec;
        }
        pi[i] *= a.scale;
        std::fill(ti + i, ti + L, 0.0f);
        std::fill(pi + i + 1, pi + L, 0.0f);
    }
    // T = (I − A)⁻¹ by forward substitution, row by row: T[i, :i] = A[i, :i] + A[i, :i]·T[:i, :i]
    // (rows above i are final and zero on and above the diagonal until it is set below).
    for (int64_t i = 2; i < L; ++i) {
        float* ti = tm + i * L;
        std::copy(ti, ti + i, sc.row.data());
        pr.gemm(1, i, i, 1.0f, sc.row.data(), L, tm, L, 1.0f, ti, L);
    }
    for (int64_t i = 0; i < L; ++i) tm[i * L + i] = 1.0f;
    // β and β⊙e^G scale the rows of V and K; fold them into T's columns instead.
    for (int64_t m = 0; m < L; ++m) sc.row[m] = h.beta(t0 + m) * std::exp(gc[m]);
    for (int64_t i = 0; i < L; ++i)
        for (int64_t m = 0; m <= i; ++m) {
            tv[i * L + m] = tm[i * L + m] * h.beta(t0 + m);
            tk[i * L + m] = tm[i * L + m] * sc.row[m];
        }
    for (int64_t i = 0; i < L; ++i) {
        std::fill(tv + i * L + i + 1, tv + (i + 1) * L, 0.0f);
        std::fill(tk + i * L + i + 1, tk + (i + 1) * L, 0.0f);
    }

    // U = T·(β⊙V), W = T·(β⊙K⊙e^G); V_new = U − W·S.
    pr.gemm(L, dv, L, 1.0f, tv, L, V, ldv, 0.0f, u, dv);
    pr.gemm(L, dk, L, 1.0f, tk, L, K, ldk, 0.0f, w, dk);
    pr.gemm(L, dv, dk, -1.0f, w, dk, s, dv, 1.0f, u, dv);

    // O = (scale·Q⊙e^G)·S + P·V_new, written straight into out.
    pr.gemm(L, dv, dk, 1.0f, qc, dk, s, dv, 0.0f, out, ldv);
    pr.gemm(L, dv, L, 1.0f, p, L, u, dv, 1.0f, out, ldv);

    // S ← e^{G_last}·S + (K⊙e^{G_last − G})ᵀ·V_new.
    const float glast = gc[L - 1];
    for (int64_t i = 0; i < L; ++i) sc.row[i] = std::exp(glast - gc[i]);
    for (int64_t d = 0; d < dk; ++d)
        for (int64_t i = 0; i < L; ++i) kt[d * L + i] *= sc.row[i];
    pr.gemm(dk, dv, L, 1.0f, kt, L, u, dv, std::exp(glast), s, dv);
}

}  // namespace

void conv1d_silu_causal(ThreadPool& pool, const float* x, const float* w, float* state, float* y, int64_t T,
                        int64_t C, int64_t K) {
    const int64_t hist = K - 1;
    const auto channels = [&](int64_t c0, int64_t c1) {
        const int64_t nc = c1 - c0;
        // Row r of [state; x], restricted to this thread's channels.
        const auto in = [&](int64_t r) { return r < hist ? state + r * C + c0 : x + (r - hist) * C + c0; };
        for (int64_t t = 0; t < T; ++t) {
            float* yt = y + t * C + c0;
            for (int64_t c = 0; c < nc; ++c) {
                const float* wc = w + (c0 + c) * K;
                float sum = 0.0f;
                for (int64_t j = 0; j < K; ++j) sum += wc[j] * in(t + j)[c];  // input at time t − (K−1) + j
                yt[c] = silu(sum);
            }
        }
        // New state = the last K−1 rows of [state; x]; rows move only towards lower indices.
        for (int64_t r = 0; r < hist; ++r) std::copy(in(T + r), in(T + r) + nc, state + r * C + c0);
    };
    pool.parallel_for(C, channels);
}

void l2norm_rows(float* x, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        float* xr = x + r * n;
        double sum = 0.0;  // ggml_float, as ggml_l2_norm
        for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(xr[i] * xr[i]);
        const float scale = 1.0f / std::max(std::sqrt(static_cast<float>(sum)), eps);
        for (int64_t i = 0; i < n; ++i) xr[i] *= scale;
    }
}

void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n, float eps) {
    // llama.cpp's build_norm_gated: rms_norm(x)·w, then times silu(z).
    rmsnorm(x, w, y, rows, n, eps);
    for (int64_t i = 0; i < rows * n; ++i) y[i] *= silu(z[i]);
}

void gated_delta_rule_recurrent(ThreadPool& pool, const DeltaNetArgs& a) {
    pool.parallel_for(a.n_v_heads, [&](int64_t j0, int64_t j1) {
        RecurrentScratch sc(a);
        for (int64_t j = j0; j < j1; ++j) recurrent_head(a, j, sc);
    });
}

void gated_delta_rule_chunked(ThreadPool& pool, const DeltaNetArgs& a, int64_t chunk) {
    pool.parallel_for(a.n_v_heads, [&](int64_t j0, int64_t j1) {
        ChunkScratch sc(a, chunk);
        for (int64_t j = j0; j < j1; ++j) {
            const HeadView h = head_view(a, j);
            for (int64_t t0 = 0; t0 < a.n_tokens; t0 += chunk)
                chunk_head(a, h, t0, std::min(chunk, a.n_tokens - t0), sc);
        }
    });
}

void gated_delta_rule(ThreadPool& pool, const DeltaNetArgs& a) {
    if (a.n_tokens == 1) {
        gated_delta_rule_recurrent(pool, a);
    } else {
        gated_delta_rule_chunked(pool, a);
    }
}

}  // namespace moemesh
