// Gated DeltaNet kernels (kernels/cpu/delta_net.cpp) against plain double-precision references
// written from MODEL_SPEC §2.5, the chunked form against the recurrence, and state carried across
// calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/ops.h"

namespace moemesh {
namespace {

std::vector<float> randn(size_t n, unsigned seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// max |a − b| / max |b|
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < b.size(); ++i) {
        num = std::max(num, std::fabs(double(a[i]) - b[i]));
        den = std::max(den, std::fabs(double(b[i])));
    }
    return den > 0 ? num / den : num;
}

ThreadPool& pool() {
    static ThreadPool p(2);
    return p;
}

// ---- causal conv + SiLU ----

// y[t, c] = silu(Σ_j w[c, j]·X[t + j, c]) with X = [state; x]; returns the new state as well.
void conv_ref(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& state, int64_t T,
              int64_t C, int64_t K, std::vector<float>& y, std::vector<float>& new_state) {
    std::vector<float> cat = state;
    cat.insert(cat.end(), x.begin(), x.end());
    y.assign(T * C, 0.0f);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) {
            double s = 0;
            for (int64_t j = 0; j < K; ++j) s += double(w[c * K + j]) * cat[(t + j) * C + c];
            y[t * C + c] = float(silu(s));
        }
    new_state.assign(cat.end() - (K - 1) * C, cat.end());
}

TEST(DeltaNet, ConvMatchesReference) {
    const int64_t C = 37, K = 4;
    for (int64_t T : {1, 2, 3, 9}) {  // T < K−1 shifts part of the old state
        auto x = randn(T * C, 1), w = randn(C * K, 2, 0.5f), state = randn((K - 1) * C, 3);
        std::vector<float> y_ref, state_ref;
        conv_ref(x, w, state, T, C, K, y_ref, state_ref);
        std::vector<float> y(T * C);
        conv1d_silu_causal(pool(), x.data(), w.data(), state.data(), y.data(), T, C, K);
        for (int64_t i = 0; i < T * C; ++i) EXPECT_NEAR(y[i], y_ref[i], 1e-5) << "T=" << T << " i=" << i;
        EXPECT_EQ(state, state_ref) << "T=" << T;
    }
}

TEST(DeltaNet, ConvInPiecesEqualsWhole) {
    const int64_t C = 64, K = 4, T = 20;
    auto x = randn(T * C, 4), w = randn(C * K, 5, 0.5f);
    std::vector<float> state_whole((K - 1) * C, 0.0f), y_whole(T * C);
    conv1d_silu_causal(pool(), x.data(), w.data(), state_whole.data(), y_whole.data(), T, C, K);
    std::vector<float> state((K - 1) * C, 0.0f), y(T * C);
    int64_t t0 = 0;
    for (int64_t n : {5, 1, 2, 1, 11}) {
        conv1d_silu_causal(pool(), x.data() + t0 * C, w.data(), state.data(), y.data() + t0 * C, n, C, K);
        t0 += n;
    }
    ASSERT_EQ(t0, T);
    EXPECT_EQ(y, y_whole);
    EXPECT_EQ(state, state_whole);
}

// ---- norms ----

TEST(DeltaNet, L2NormRows) {
    const int64_t rows = 6, n = 40;
    auto x = randn(rows * n, 6, 3.0f);
    std::fill(x.begin() + 5 * n, x.end(), 1e-9f);  // a row whose norm is below eps: divided by eps
    auto y = x;
    const float eps = 1e-6f;
    l2norm_rows(y.data(), rows, n, eps);
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
        const double s = 1.0 / std::max(std::sqrt(ss), double(eps));
        for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[r * n + i], x[r * n + i] * s, 1e-6) << r;
    }
}

TEST(DeltaNet, RmsNormGated) {
    const int64_t rows = 4, n = 48;
    auto x = randn(rows * n, 7, 2.0f), w = randn(n, 8), z = randn(rows * n, 9, 2.0f);
    std::vector<float> y(rows * n);
    rmsnorm_gated(x.data(), w.data(), z.data(), y.data(), rows, n, 1e-6f);
    auto y_inplace = x;
    rmsnorm_gated(y_inplace.data(), w.data(), z.data(), y_inplace.data(), rows, n, 1e-6f);
    EXPECT_EQ(y, y_inplace);
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
        const double s = 1.0 / std::sqrt(ss / n + 1e-6);
        for (int64_t i = 0; i < n; ++i)
            EXPECT_NEAR(y[r * n + i], x[r * n + i] * s * w[i] * silu(z[r * n + i]), 1e-5) << r;
    }
}

// ---- gated delta rule ----

struct Problem {
    int64_t T, Hk, Hv, Dk, Dv;
    std::vector<float> q, k, v, g, beta, state, out;
    float scale;

    DeltaNetArgs args() {
        out.assign(T * Hv * Dv, 0.0f);
        DeltaNetArgs a;
        a.q = q.data();
        a.k = k.data();
        a.v = v.data();
        a.g = g.data();
        a.beta = beta.data();
        a.state = state.data();
        a.out = out.data();
        a.n_tokens = T;
        a.n_k_heads = Hk;
        a.n_v_heads = Hv;
        a.k_dim = Dk;
        a.v_dim = Dv;
        a.scale = scale;
        return a;
    }
};

// Random inputs shaped like the model's: q, k l2-normalised per head, g = −exp(A_log)·softplus(a +
// dt_bias) (about [−7, 0]), β = sigmoid(b), and a non-zero initial state.
Problem make_problem(int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, unsigned seed) {
    Problem p{T, Hk, Hv, Dk, Dv, {}, {}, {}, {}, {}, {}, {}, 1.0f / std::sqrt(float(Dk))};
    p.q = randn(T * Hk * Dk, seed);
    p.k = randn(T * Hk * Dk, seed + 1);
    l2norm_rows(p.q.data(), T * Hk, Dk, 1e-6f);
    l2norm_rows(p.k.data(), T * Hk, Dk, 1e-6f);
    p.v = randn(T * Hv * Dv, seed + 2);
    std::mt19937 rng(seed + 3);
    std::uniform_real_distribution<float> a_log(-2.0f, 0.5f);
    std::normal_distribution<float> nd(0.0f, 1.5f);
    std::vector<float> A(Hv), dt(Hv);
    for (int64_t j = 0; j < Hv; ++j) A[j] = -std::exp(a_log(rng)), dt[j] = nd(rng);
    p.g.resize(T * Hv);
    p.beta.resize(T * Hv);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < Hv; ++j) {
            const float x = nd(rng) + dt[j];
            const float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
            p.g[t * Hv + j] = A[j] * softplus;
            p.beta[t * Hv + j] = 1.0f / (1.0f + std::exp(-nd(rng)));
        }
    p.state = randn(Hv * Dk * Dv, seed + 4, 0.5f);
    return p;
}

// The recurrence of MODEL_SPEC §2.5 step 5 in double, token by token, exactly as written.
// kmap(j) gives the k-head of v-head j.
template <class KMap>
void delta_ref(const Problem& p, std::vector<float>& out, std::vector<float>& state, KMap kmap) {
    const int64_t Hk = p.Hk, Hv = p.Hv, Dk = p.Dk, Dv = p.Dv;
    out.assign(p.T * Hv * Dv, 0.0f);
    std::vector<double> S(p.state.begin(), p.state.end()), u(Dv), d(Dv);
    for (int64_t j = 0; j < Hv; ++j) {
        double* s = S.data() + j * Dk * Dv;
        const int64_t kh = kmap(j);
        for (int64_t t = 0; t < p.T; ++t) {
            const float* k = p.k.data() + (t * Hk + kh) * Dk;
            const float* q = p.q.data() + (t * Hk + kh) * Dk;
            const float* v = p.v.data() + (t * Hv + j) * Dv;
            const double e = std::exp(double(p.g[t * Hv + j])), beta = p.beta[t * Hv + j];
            for (int64_t x = 0; x < Dk * Dv; ++x) s[x] *= e;
            std::fill(u.begin(), u.end(), 0.0);
            for (int64_t i = 0; i < Dk; ++i)
                for (int64_t c = 0; c < Dv; ++c) u[c] += s[i * Dv + c] * k[i];
            for (int64_t c = 0; c < Dv; ++c) d[c] = beta * (v[c] - u[c]);
            for (int64_t i = 0; i < Dk; ++i)
                for (int64_t c = 0; c < Dv; ++c) s[i * Dv + c] += double(k[i]) * d[c];
            for (int64_t c = 0; c < Dv; ++c) {
                double o = 0;
                for (int64_t i = 0; i < Dk; ++i) o += s[i * Dv + c] * (double(p.scale) * q[i]);
                out[(t * Hv + j) * Dv + c] = float(o);
            }
        }
    }
    state.assign(S.begin(), S.end());
}

void delta_ref(const Problem& p, std::vector<float>& out, std::vector<float>& state) {
    const int64_t r = p.Hv / p.Hk;
    delta_ref(p, out, state, [r](int64_t j) { return j / r; });
}

TEST(DeltaNet, RecurrentMatchesReference) {
    // Dv = 48 and 20 take the 8-wide and scalar column tails of the SIMD primitives.
    const int64_t dims[][2] = {{16, 16}, {32, 48}, {24, 20}, {64, 128}};
    for (const auto& d : dims) {
        Problem p = make_problem(10, 2, 4, d[0], d[1], 11);
        std::vector<float> out_ref, state_ref;
        delta_ref(p, out_ref, state_ref);
        gated_delta_rule_recurrent(pool(), p.args());
        EXPECT_LT(rel_err(p.out, out_ref), 2e-6) << d[0] << "x" << d[1];
        EXPECT_LT(rel_err(p.state, state_ref), 2e-6) << d[0] << "x" << d[1];
    }
}

TEST(DeltaNet, ChunkedMatchesRecurrence) {
    for (int64_t T : {1, 2, 63, 64, 65, 130, 200}) {
        const Problem orig = make_problem(T, 2, 4, 64, 64, 20 + unsigned(T));
        Problem rec = orig, chk = orig;
        gated_delta_rule_recurrent(pool(), rec.args());
        gated_delta_rule_chunked(pool(), chk.args());
        const double eo = rel_err(chk.out, rec.out), es = rel_err(chk.state, rec.state);
        EXPECT_LT(eo, 1e-5) << "T=" << T;
        EXPECT_LT(es, 1e-5) << "T=" << T;
        // And both against the double-precision recurrence.
        std::vector<float> out_ref, state_ref;
        delta_ref(orig, out_ref, state_ref);
        EXPECT_LT(rel_err(chk.out, out_ref), 1e-5) << "T=" << T;
        EXPECT_LT(rel_err(chk.state, state_ref), 1e-5) << "T=" << T;
    }
}

TEST(DeltaNet, ChunkedOddSizesAndChunkLengths) {
    // Odd head sizes (SIMD tails) and chunk lengths other than 64.
    for (int64_t chunk : {1, 7, 16, 64}) {
        Problem p = make_problem(45, 3, 6, 20, 36, 40 + unsigned(chunk));
        std::vector<float> out_ref, state_ref;
        delta_ref(p, out_ref, state_ref);
        gated_delta_rule_chunked(pool(), p.args(), chunk);
        EXPECT_LT(rel_err(p.out, out_ref), 1e-5) << "chunk=" << chunk;
        EXPECT_LT(rel_err(p.state, state_ref), 1e-5) << "chunk=" << chunk;
    }
}

TEST(DeltaNet, SplitCallsEqualOneCall) {
    const int64_t T = 128, Hk = 2, Hv = 4, D = 32;
    Problem whole = make_problem(T, Hk, Hv, D, D, 50);
    Problem parts = whole;
    gated_delta_rule(pool(), whole.args());  // chunked
    // 37 (chunked) + 1 (recurrent) + 90 (chunked), the state carried in place.
    const DeltaNetArgs all = parts.args();
    int64_t t0 = 0;
    for (int64_t n : {37, 1, 90}) {
        DeltaNetArgs a = all;
        a.n_tokens = n;
        a.q += t0 * Hk * D;
        a.k += t0 * Hk * D;
        a.v += t0 * Hv * D;
        a.g += t0 * Hv;
        a.beta += t0 * Hv;
        a.out += t0 * Hv * D;
        gated_delta_rule(pool(), a);
        t0 += n;
    }
    ASSERT_EQ(t0, T);
    EXPECT_LT(rel_err(parts.out, whole.out), 1e-5);
    EXPECT_LT(rel_err(parts.state, whole.state), 1e-5);
}

TEST(DeltaNet, VHeadReadsKHeadByDivision) {
    // Hk = 2, Hv = 4: v-heads 0, 1 read k-head 0 and v-heads 2, 3 read k-head 1. A tiled mapping
    // (j % Hk) would give v-heads 0, 2 k-head 0 instead, which this reference tells apart.
    Problem base = make_problem(70, 2, 4, 16, 16, 60);
    std::vector<float> out_div, state_div, out_mod, state_mod;
    delta_ref(base, out_div, state_div);
    delta_ref(base, out_mod, state_mod, [&](int64_t j) { return j % base.Hk; });
    ASSERT_GT(rel_err(out_mod, out_div), 0.1);  // the two mappings really differ on this data
    for (int64_t T : {1, 70}) {
        Problem p = base;
        p.T = T;
        gated_delta_rule(pool(), p.args());
        std::vector<float> ref(out_div.begin(), out_div.begin() + T * p.Hv * p.Dv);
        EXPECT_LT(rel_err(p.out, ref), 1e-5) << "T=" << T;
    }
}

}  // namespace
}  // namespace moemesh
