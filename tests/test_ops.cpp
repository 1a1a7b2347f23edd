// Norm, RoPE, softmax, SwiGLU and attention kernels against plain double-precision references.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"
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

TEST(Ops, RmsNorm) {
    const int64_t rows = 5, n = 96;
    auto x = randn(rows * n, 1, 3.0f), w = randn(n, 2);
    std::vector<float> y(rows * n);
    rmsnorm(x.data(), w.data(), y.data(), rows, n, 1e-6f);
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
        double s = 1.0 / std::sqrt(ss / n + 1e-6);
        for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[r * n + i], x[r * n + i] * s * w[i], 1e-5);
    }
    // In place, no weight.
    std::vector<float> z = x;
    rmsnorm(z.data(), nullptr, z.data(), rows, n, 1e-6f);
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(z[i]) * z[i];
    EXPECT_NEAR(ss / n, 1.0, 1e-5);
}

TEST(Ops, SoftmaxAndSwiglu) {
    auto x = randn(1000, 3, 10.0f);
    std::vector<float> p = x;
    softmax_inplace(p.data(), 1000);
    double mx = *std::max_element(x.begin(), x.end()), sum = 0;
    for (float v : x) sum += std::exp(double(v) - mx);
    for (int i = 0; i < 1000; ++i) EXPECT_NEAR(p[i], std::exp(double(x[i]) - mx) / sum, 1e-7);
    auto g = randn(64, 4, 4.0f), u = randn(64, 5);
    std::vector<float> y(64);
    swiglu(g.data(), u.data(), y.data(), 64);
    for (int i = 0; i < 64; ++i) EXPECT_NEAR(y[i], g[i] / (1.0 + std::exp(-double(g[i]))) * u[i], 1e-5);
}

// HF rotate_half convention: pairs (i, i + d/2), inv_freq[i] = theta^(-2i/d); dims >= d untouched.
TEST(Ops, RopeNeox) {
    const int64_t T = 3, heads = 2, D = 16;
    for (int64_t rot : {int64_t(16), int64_t(8)}) {
        auto x = randn(T * heads * D, 6);
        std::vector<float> y = x;
        std::vector<int32_t> pos = {0, 7, 1000};
        rope_neox(y.data(), T, heads, D, rot, pos.data(), RopeParams{1e6f});
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < heads; ++h) {
                const float* a = &x[(t * heads + h) * D];
                const float* b = &y[(t * heads + h) * D];
                for (int64_t i = 0; i < rot / 2; ++i) {
                    double ang = pos[t] * std::pow(1e6, -2.0 * i / rot);
                    double e0 = a[i] * std::cos(ang) - a[i + rot / 2] * std::sin(ang);
                    double e1 = a[i] * std::sin(ang) + a[i + rot / 2] * std::cos(ang);
                    // Float angle accumulation as ggml: tolerance grows with the position.
                    double tol = 1e-5 + 2e-6 * pos[t];
                    EXPECT_NEAR(b[i], e0, tol) << "t" << t << " i" << i;
                    EXPECT_NEAR(b[i + rot / 2], e1, tol);
                }
                for (int64_t i = rot; i < D; ++i) EXPECT_EQ(b[i], a[i]);
            }
        }
    }
}

// YaRN and linear scaling against Hugging Face's formulation (modeling_rope_utils.py
// _compute_yarn_parameters / _compute_linear_scaling_rope_parameters), written here in double:
//   inv_freq = interp·(1 − m) + extrap·m, interp = extrap / factor, m = 1 − clamp((i − low)/(high − low)),
//   low/high = floor/ceil of find_correction_dim(beta 32 / 1), cos and sin times 0.1·ln(factor) + 1.
// ggml's formulation (kernels/rope_yarn.h) mixes angles rather than frequencies and cancels one
// magnitude factor against another; the two must agree.
TEST(Ops, RopeYarnMatchesHuggingFaceFormula) {
    const int64_t T = 4, heads = 2, D = 64;
    const double base = 1e6;
    struct Case { const char* type; double factor; int orig; int64_t rot; };
    for (const Case& c : {Case{"yarn", 4.0, 4096, 64}, Case{"yarn", 8.0, 256, 32}, Case{"linear", 2.0, 4096, 64},
                          Case{"yarn", 1.0, 4096, 64}}) {
        const RopeParams p = make_rope_params(c.rot, static_cast<float>(base), c.type, static_cast<float>(c.factor),
                                              1.0f, c.orig);
        const bool yarn = std::string(c.type) == "yarn";
        auto corr = [&](double beta) {
            return (c.rot * std::log(c.orig / (beta * 2 * M_PI))) / (2 * std::log(base));
        };
        const double low = std::max(0.0, std::floor(corr(32))), high = std::min<double>(c.rot - 1, std::ceil(corr(1)));
        const double mag = yarn ? 0.1 * std::log(c.factor) + 1.0 : 1.0;
        auto x = randn(T * heads * D, 8);
        std::vector<float> y = x;
        std::vector<int32_t> pos = {0, 3, 41, 200};
        rope_neox(y.data(), T, heads, D, c.rot, pos.data(), p);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < heads; ++h) {
                const float* a = &x[(t * heads + h) * D];
                const float* b = &y[(t * heads + h) * D];
                const int64_t half = c.rot / 2;
                for (int64_t i = 0; i < half; ++i) {
                    const double extrap = std::pow(base, -2.0 * i / c.rot), interp = extrap / c.factor;
                    double m = 0;
                    if (yarn) {
                        const double hi = high == low ? high + 0.001 : high;
                        m = 1.0 - std::clamp((i - low) / (hi - low), 0.0, 1.0);
                    }
                    const double ang = pos[t] * (interp * (1 - m) + extrap * m);
                    const double e0 = (a[i] * std::cos(ang) - a[i + half] * std::sin(ang)) * mag;
                    const double e1 = (a[i] * std::sin(ang) + a[i + half] * std::cos(ang)) * mag;
                    const double tol = 2e-5 + 2e-6 * pos[t];
                    EXPECT_NEAR(b[i], e0, tol) << c.type << " x" << c.factor << " t" << t << " i" << i;
                    EXPECT_NEAR(b[i + half], e1, tol) << c.type << " x" << c.factor << " t" << t << " i" << i;
                }
                for (int64_t i = c.rot; i < D; ++i) EXPECT_EQ(b[i], a[i]);
            }
    }
    // No scaling is exactly the plain rotation: RopeParams{} and "none"/"linear" with factor 0 agree bit for bit.
    auto x = randn(2 * D, 9);
    std::vector<int32_t> pos = {5, 1234};
    std::vector<float> a = x, b = x, c = x;
    rope_neox(a.data(), 2, 1, D, D, pos.data(), RopeParams{1e6f});
    rope_neox(b.data(), 2, 1, D, D, pos.data(), make_rope_params(D, 1e6f, "linear", 0.0f, 1.0f, 4096));
    rope_neox(c.data(), 2, 1, D, D, pos.data(), make_rope_params(D, 1e6f, "none", 4.0f, 1.0f, 4096));
    EXPECT_EQ(a, b);
    EXPECT_EQ(a, c);
}

void naive_attention(const AttentionArgs& a, const std::vector<float>& k, const std::vector<float>& v,
                     std::vector<double>& out) {
    const int64_t group = a.n_head / a.n_head_kv, D = a.head_dim, stride = a.n_head_kv * D;
    out.assign(a.n_tokens * a.n_head * D, 0.0);
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        for (int64_t h = 0; h < a.n_head; ++h) {
            const int64_t kvh = h / group, n_kv = a.n_past + t + 1;
            std::vector<double> s(n_kv);
            double mx = -1e300;
            for (int64_t j = 0; j < n_kv; ++j) {
                double d = 0;
                for (int64_t i = 0; i < D; ++i) d += double(a.q[(t * a.n_head + h) * D + i]) * k[j * stride + kvh * D + i];
                s[j] = d * a.scale;
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (auto& x : s) sum += x = std::exp(x - mx);
            for (int64_t j = 0; j < n_kv; ++j) {
                for (int64_t i = 0; i < D; ++i) out[(t * a.n_head + h) * D + i] += s[j] / sum * v[j * stride + kvh * D + i];
            }
        }
    }
}

TEST(Ops, AttentionGqaCausalWithPast) {
    ThreadPool pool(2);
    const int64_t n_past = 5, T = 4, Nh = 8, Nkv = 2, D = 32, n_ctx = n_past + T;
    auto q = randn(T * Nh * D, 7), k = randn(n_ctx * Nkv * D, 8), v = randn(n_ctx * Nkv * D, 9);
    for (bool f16 : {false, true}) {
        std::vector<uint16_t> k16(k.size()), v16(v.size());
        std::vector<float> kq = k, vq = v;  // what the cache holds
        if (f16) {
            for (size_t i = 0; i < k.size(); ++i) {
                k16[i] = fp32_to_fp16(k[i]);
                v16[i] = fp32_to_fp16(v[i]);
                kq[i] = fp16_to_fp32(k16[i]);
                vq[i] = fp16_to_fp32(v16[i]);
            }
        }
        std::vector<float> out(T * Nh * D);
        AttentionArgs a{q.data(), f16 ? static_cast<const void*>(k16.data()) : k.data(),
                        f16 ? static_cast<const void*>(v16.data()) : v.data(), out.data(), T, n_past, Nh, Nkv, D, f16,
                        1.0f / std::sqrt(float(D))};
        attention(pool, a);
        std::vector<double> ref;
        naive_attention(a, kq, vq, ref);
        const double tol = f16 ? 3e-3 : 1e-5;  // f16 rounds q and the softmax weights, as llama.cpp
        for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], tol) << "f16=" << f16 << " i=" << i;
    }
}

}  // namespace
}  // namespace moemesh
