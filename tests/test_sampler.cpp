// Sampler: greedy, determinism by seed, cuts, and that draws follow the softmax.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "coordinator/sampler.h"

namespace moemesh {
namespace {

TEST(Sampler, GreedyAndTopProbs) {
    std::vector<float> l = {0.1f, 3.0f, -1.0f, 3.0f, 2.0f};
    EXPECT_EQ(argmax(l.data(), 5), 1);  // lowest index on ties
    SamplerParams p;
    p.greedy = true;
    Sampler s(p);
    EXPECT_EQ(s.sample(l.data(), 5), 1);
    auto top = top_probs(l.data(), 5, 3);
    ASSERT_EQ(top.size(), 3u);
    EXPECT_EQ(top[0].first, 1);
    EXPECT_EQ(top[1].first, 3);
    EXPECT_EQ(top[2].first, 4);
    double z = 0;
    for (float x : l) z += std::exp(double(x));
    EXPECT_NEAR(top[2].second, std::exp(2.0) / z, 1e-12);
}

TEST(Sampler, SeedDeterminismAndCuts) {
    std::vector<float> l(100);
    for (int i = 0; i < 100; ++i) l[i] = std::sin(i * 0.37f) * 3;
    SamplerParams p;
    p.temperature = 1.0f;
    p.seed = 9;
    Sampler a(p), b(p);
    for (int i = 0; i < 50; ++i) EXPECT_EQ(a.sample(l.data(), 100), b.sample(l.data(), 100));
    p.top_k = 1;
    Sampler k1(p);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(k1.sample(l.data(), 100), argmax(l.data(), 100));
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.95f;  // only tokens with p >= 0.95 p_max survive: here just the best
    std::vector<float> ramp(100);
    for (int i = 0; i < 100; ++i) ramp[i] = (i * 37 % 100) * 0.1f;
    Sampler mp(p);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(mp.sample(ramp.data(), 100), argmax(ramp.data(), 100));
    p.min_p = 0.85f;  // the best two survive (ratio e^-0.1 = 0.905)
    Sampler mp2(p);
    std::set<int32_t> seen;
    for (int i = 0; i < 200; ++i) seen.insert(mp2.sample(ramp.data(), 100));
    EXPECT_EQ(seen.size(), 2u);
}

TEST(Sampler, DrawsFollowSoftmax) {
    std::vector<float> l = {1.0f, 0.0f, -1.0f, 0.5f};
    SamplerParams p;
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = 1;
    Sampler s(p);
    std::vector<int> counts(4);
    const int n = 200000;
    for (int i = 0; i < n; ++i) counts[s.sample(l.data(), 4)]++;
    double z = 0;
    for (float x : l) z += std::exp(x);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(counts[i] / double(n), std::exp(l[i]) / z, 0.005) << i;
    // Temperature 0.5 sharpens.
    p.temperature = 0.5f;
    Sampler t(p);
    std::vector<int> c2(4);
    for (int i = 0; i < n; ++i) c2[t.sample(l.data(), 4)]++;
    double z2 = 0;
    for (float x : l) z2 += std::exp(2 * x);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(c2[i] / double(n), std::exp(2 * l[i]) / z2, 0.005) << i;
}

}  // namespace
}  // namespace moemesh

// top_k_ids (the heap pass for small k, partial_sort for large k) gives what partial_sort of all
// ids gives: the same ids in the same order, ties by lower id, on a vocabulary-sized row with many
// equal logits (rounded to a coarse grid) and with -inf entries.
TEST(Sampler, TopKIdsIsPartialSortOfAllIds) {  // (after the file's namespaces)
    std::mt19937 rng(5);
    std::normal_distribution<float> dist(0.0f, 3.0f);
    for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{151936}}) {
        std::vector<float> l(static_cast<size_t>(n));
        for (auto& x : l) x = std::round(dist(rng) * 4.0f) / 4.0f;  // many ties
        if (n > 10) l[3] = -INFINITY, l[static_cast<size_t>(n - 1)] = l[0];
        for (const int64_t k : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{40}, n / 9, n / 7, n - 1, n, n + 5}) {
            std::vector<int32_t> want(static_cast<size_t>(n));
            std::iota(want.begin(), want.end(), 0);
            const int64_t kk = std::clamp<int64_t>(k, 0, n);
            std::partial_sort(want.begin(), want.begin() + kk, want.end(), [&](int32_t a, int32_t b) {
                return l[a] > l[b] || (l[a] == l[b] && a < b);
            });
            want.resize(static_cast<size_t>(kk));
            std::vector<int32_t> got = {99, 98};  // overwritten
            moemesh::top_k_ids(l.data(), n, k, got);
            EXPECT_EQ(got, want) << "n=" << n << " k=" << k;
        }
    }
}

// argmax (two passes) is the first index of the maximum, as the plain loop: ties, -inf, ±0 and NaNs
// (never chosen, except at index 0) at every position modulo the 8 chains.
// sample_candidates over the k largest logits (what Model::forward_top_k gives) is sample() over
// all of them: the same tokens and the same random stream, for top-k with and without the other
// cuts, ties included; candidates() says when that holds.
TEST(Sampler, CandidatesGiveTheSameDraws) {  // (after the file's namespaces)
    using moemesh::Sampler;
    using moemesh::SamplerParams;
    const int64_t V = 5000;
    for (const auto& [top_k, top_p, min_p, temp] : std::vector<std::tuple<int, float, float, float>>{
             {40, 0.95f, 0.05f, 0.8f}, {1, 1.0f, 0.0f, 1.0f}, {64, 1.0f, 0.0f, 1.5f}, {7, 0.5f, 0.2f, 0.3f}}) {
        SamplerParams p;
        p.top_k = top_k, p.top_p = top_p, p.min_p = min_p, p.temperature = temp, p.seed = 99;
        Sampler all(p), cand(p);
        ASSERT_EQ(all.candidates(V), top_k);
        std::mt19937 rng(5);
        std::normal_distribution<float> dist(0.0f, 2.0f);
        std::vector<float> l(V);
        std::vector<int32_t> ids;
        std::vector<float> vals;
        for (int step = 0; step < 200; ++step) {
            for (float& x : l) x = dist(rng);
            if (step % 3 == 0)  // ties: the lower id first, in both
                for (float& x : l) x = std::round(x * 2.0f) / 2.0f;
            moemesh::top_k_ids(l.data(), V, top_k, ids);
            vals.clear();
            for (int32_t id : ids) vals.push_back(l[id]);
            ASSERT_EQ(all.sample(l.data(), V), cand.sample_candidates(ids.data(), vals.data(), top_k))
                << "top_k " << top_k << " step " << step;
        }
    }
    SamplerParams g;
    g.greedy = true;
    EXPECT_EQ(Sampler(g).candidates(V), 0);
    SamplerParams off;
    off.top_k = 0;
    EXPECT_EQ(Sampler(off).candidates(V), 0);
    off.top_k = static_cast<int>(V);
    EXPECT_EQ(Sampler(off).candidates(V), 0);
}

TEST(Sampler, ArgmaxIsThePlainLoop) {
    auto plain = [](const std::vector<float>& l) {
        int64_t best = 0;
        for (size_t i = 1; i < l.size(); ++i)
            if (l[i] > l[best]) best = static_cast<int64_t>(i);
        return static_cast<int32_t>(best);
    };
    std::mt19937 rng(9);
    std::uniform_int_distribution<int> small(-3, 3);
    for (int trial = 0; trial < 3000; ++trial) {
        const size_t n = 1 + rng() % 40;
        std::vector<float> l(n);
        for (auto& x : l) {
            const int r = small(rng);
            x = r == -3 ? -INFINITY : r == 3 && rng() % 4 == 0 ? NAN : static_cast<float>(r);
            if (x == 0.0f && rng() % 2) x = -0.0f;
        }
        ASSERT_EQ(moemesh::argmax(l.data(), static_cast<int64_t>(n)), plain(l)) << "trial " << trial;
    }
    std::vector<float> big(151936);
    std::normal_distribution<float> d(0.0f, 3.0f);
    for (auto& x : big) x = d(rng);
    big[151935] = 100.0f;
    EXPECT_EQ(moemesh::argmax(big.data(), 151936), 151935);
    big[77] = 100.0f;
    EXPECT_EQ(moemesh::argmax(big.data(), 151936), 77);
}
