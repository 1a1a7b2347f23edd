// Shared by the parity tests: run `moemesh run --json` and llama.cpp (tests/ref/llama_ref.mjs) on
// the same file and token sequence, and compare the full next-token distributions position by
// position plus the greedy continuation.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace moemesh::testing {

struct Result {
    std::vector<std::map<int, double>> probs;  // per position: id → p (top-N)
    std::vector<int> greedy;
};

inline Result parse(const std::string& text, const std::string& who) {
    Result r;
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains("positions")) {
        ADD_FAILURE() << who << " printed no JSON: " << text.substr(0, 500);
        return r;
    }
    for (auto& p : j["positions"]) {
        std::map<int, double> m;
        for (auto& e : p["top"]) m[e[0].get<int>()] = e[1].get<double>();
        r.probs.push_back(std::move(m));
    }
    r.greedy = j["greedy"].get<std::vector<int>>();
    return r;
}

inline std::string token_list(int n, int vocab, unsigned seed) {
    std::mt19937 rng(seed);
    std::string s;
    for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(rng() % static_cast<unsigned>(vocab));
    return s;
}

struct Comparison {
    double max_dp = 0;        // over every position and token
    double median_dp = 0;     // median over positions of the per-position max
    int greedy_prefix = 0;    // length of the common prefix of the greedy continuations
    int positions = 0;
    double p90_dp = 0;        // 90th percentile of the per-position max
    int top1_agree = 0;       // positions whose most likely next token is the same
};

inline Comparison compare(const Result& a, const Result& b) {
    Comparison c;
    c.positions = static_cast<int>(std::min(a.probs.size(), b.probs.size()));
    std::vector<double> per_pos;
    for (int p = 0; p < c.positions; ++p) {
        double mx = 0;
        for (auto& [id, pa] : a.probs[p]) {
            auto it = b.probs[p].find(id);
            mx = std::max(mx, std::fabs(pa - (it == b.probs[p].end() ? 0.0 : it->second)));
        }
        for (auto& [id, pb] : b.probs[p]) {
            if (!a.probs[p].count(id)) mx = std::max(mx, pb);
        }
        per_pos.push_back(mx);
        c.max_dp = std::max(c.max_dp, mx);
    }
    std::sort(per_pos.begin(), per_pos.end());
    c.median_dp = per_pos.empty() ? 0 : per_pos[per_pos.size() / 2];
    c.p90_dp = per_pos.empty() ? 0 : per_pos[per_pos.size() * 9 / 10];
    for (int p = 0; p < c.positions; ++p) {
        auto best = [](const std::map<int, double>& m) {
            return std::max_element(m.begin(), m.end(), [](auto& x, auto& y) { return x.second < y.second; })->first;
        };
        if (!a.probs[p].empty() && !b.probs[p].empty() && best(a.probs[p]) == best(b.probs[p])) ++c.top1_agree;
    }
    while (c.greedy_prefix < static_cast<int>(std::min(a.greedy.size(), b.greedy.size())) &&
           a.greedy[c.greedy_prefix] == b.greedy[c.greedy_prefix])
        ++c.greedy_prefix;
    return c;
}

inline Result run_ours(const std::string& model, int vocab, const std::string& kv, const std::string& extra,
                const std::string& dir, int n_tokens) {
    std::string out;
    std::string cmd = moemesh_bin() + " run --model " + model + " --tokens " + token_list(n_tokens, vocab, 5) +
                      " --top " + std::to_string(vocab) + " -n 32 --json --threads 1 --kv-type " + kv + " " + extra;
    EXPECT_EQ(run_capture(cmd, &out, dir + "/ours.err"), 0) << read_file(dir + "/ours.err");
    return parse(out, "moemesh");
}

inline Result run_ref(const std::string& model, int vocab, const std::string& kv, const std::string& extra,
               const std::string& dir, int n_tokens) {
    std::string out;
    std::string cmd = "node " + ref_dir() + "/llama_ref.mjs probs --model " + model + " --tokens " +
                      token_list(n_tokens, vocab, 5) + " --top " + std::to_string(vocab) +
                      " -n 32 --threads 1 --kv-type " + kv + " " + extra;
    EXPECT_EQ(run_capture(cmd, &out, dir + "/ref.err"), 0) << read_file(dir + "/ref.err");
    return parse(out, "llama.cpp");
}

inline Comparison report(const std::string& what, const Result& a, const Result& b, int n_tokens) {
    Comparison c = compare(a, b);
    std::printf("[parity] %-44s max|dp| %.3g, median %.3g, p90 %.3g (per-position max), top-1 agree %d/%d, "
                "greedy common prefix %d/32\n",
                what.c_str(), c.max_dp, c.median_dp, c.p90_dp, c.top1_agree, c.positions, c.greedy_prefix);
    EXPECT_EQ(c.positions, n_tokens) << what;
    return c;
}

// (Probabilities of) the full distribution at every position, ours vs llama.cpp.
inline Comparison run_pair(const std::string& model, int vocab, const std::string& kv, const std::string& extra_ours,
                    const std::string& dir, int n_tokens = 64) {
    Result ours = run_ours(model, vocab, kv, extra_ours, dir, n_tokens);
    Result ref = run_ref(model, vocab, kv, "", dir, n_tokens);
    std::string name = model.substr(model.rfind('/') + 1) + " kv " + kv + " " + extra_ours;
    return report(name, ours, ref, n_tokens);
}

class Parity : public ::testing::Test {
protected:
    void SetUp() override {
        std::string why = reference_unavailable();
        if (!why.empty()) GTEST_SKIP() << "llama.cpp reference unavailable: " << why;
        dir_ = temp_dir("parity");
    }
    std::string dir_;
};

}  // namespace moemesh::testing
