#include "coordinator/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/grammar.h"

namespace moemesh {

// The first index of the largest logit (NaNs never win, except a NaN at 0, which nothing beats): the
// scalar loop `if (logits[i] > logits[best]) best = i`, as two passes: the maximum with 8
// independent chains, then the first index holding it (151936 logits on the dev VM: 30 µs vs 39–41
// for the one dependent chain).
int32_t argmax(const float* logits, int64_t n) {
    if (n <= 0 || std::isnan(logits[0])) return 0;
    constexpr int kChains = 8;
    float m[kChains];
    for (float& v : m) v = logits[0];
    int64_t i = 0;
    for (; i + kChains <= n; i += kChains)
        for (int j = 0; j < kChains; ++j) m[j] = logits[i + j] > m[j] ? logits[i + j] : m[j];
    for (; i < n; ++i) m[0] = logits[i] > m[0] ? logits[i] : m[0];
    float mx = m[0];
    for (int j = 1; j < kChains; ++j) mx = m[j] > mx ? m[j] : mx;
    for (i = 0; i < n; ++i)
        if (logits[i] == mx) return static_cast<int32_t>(i);
    return 0;  // unreachable: mx is one of the logits
}

// ids[0, k) = the k ids of the largest logits by decreasing logit (lower id first on ties): what
// partial_sort of all ids gives. For k much smaller than the vocabulary in one pass over the
// logits: an id enters a heap of the best k so far only when it beats the heap's worst, so most of
// a 150k vocabulary costs one comparison (partial_sort over an iota of the ids took ~120 µs per
// token on the dev VM for top-k 40, a few % of a GPU decode step).
void top_k_ids(const float* logits, int64_t n_vocab, int64_t k, std::vector<int32_t>& ids) {
    k = std::clamp<int64_t>(k, 0, n_vocab);
    if (k == 0) {
        ids.clear();
        return;
    }
    auto better = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    if (k * 8 > n_vocab) {
        ids.resize(static_cast<size_t>(n_vocab));
        std::iota(ids.begin(), ids.end(), 0);
        std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), better);
        ids.resize(static_cast<size_t>(k));
        return;
    }
    ids.resize(static_cast<size_t>(k));
    std::iota(ids.begin(), ids.end(), 0);
    std::make_heap(ids.begin(), ids.end(), better);  // the worst kept id on top
    for (int64_t i = k; i < n_vocab; ++i) {
        const auto id = static_cast<int32_t>(i);
        if (!better(id, ids.front())) continue;
        std::pop_heap(ids.begin(), ids.end(), better);
        ids.back() = id;
        std::push_heap(ids.begin(), ids.end(), better);
    }
    std::sort_heap(ids.begin(), ids.end(), better);
}

namespace {

// log Σ exp(logits) in double precision (the softmax's normalizer at temperature 1).
double log_normalizer(const float* logits, int64_t n_vocab) {
    double mx = -INFINITY;
    for (int64_t i = 0; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    double sum = 0.0;
    for (int64_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
    return mx + std::log(sum);
}

// The top_n ids by decreasing logit (lower id first on ties).
std::vector<int32_t> top_ids(const float* logits, int64_t n_vocab, int64_t top_n) {
    std::vector<int32_t> ids;
    top_k_ids(logits, n_vocab, top_n, ids);
    return ids;
}

}  // namespace

std::vector<std::pair<int32_t, double>> top_probs(const float* logits, int64_t n_vocab, int64_t top_n) {
    const double lz = log_normalizer(logits, n_vocab);
    std::vector<std::pair<int32_t, double>> out;
    for (int32_t id : top_ids(logits, n_vocab, top_n)) out.emplace_back(id, std::exp(static_cast<double>(logits[id]) - lz));
    return out;
}

TokenLogprobs token_logprobs(const float* logits, int64_t n_vocab, int32_t chosen, int64_t top_n) {
    const double lz = log_normalizer(logits, n_vocab);
    TokenLogprobs out;
    out.id = chosen;
    out.logprob = static_cast<double>(logits[chosen]) - lz;
    for (int32_t id : top_ids(logits, n_vocab, top_n)) out.top.emplace_back(id, static_cast<double>(logits[id]) - lz);
    return out;
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab) {
    if (greedy()) return argmax(logits, n_vocab);
    int64_t n = n_vocab;
    if (p_.top_k > 0 && p_.top_k < n) {
        top_k_ids(logits, n_vocab, p_.top_k, ids_);
        n = p_.top_k;
    } else {
        ids_.resize(static_cast<size_t>(n_vocab));
        std::iota(ids_.begin(), ids_.end(), 0);
        std::sort(ids_.begin(), ids_.end(),
                  [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    }
    return draw(ids_.data(), n, [&](int64_t i) { return logits[ids_[i]]; });
}

int64_t Sampler::candidates(int64_t n_vocab) const {
    if (greedy() || p_.top_k <= 0 || p_.top_k >= n_vocab) return 0;
    return p_.top_k;
}

int32_t Sampler::sample_candidates(const int32_t* ids, const float* vals, int64_t k) {
    return draw(ids, k, [vals](int64_t i) { return vals[i]; });
}

// The cuts after top-k and the draw, over n candidates ids[i] by decreasing logit (logit(i)).
template <typename Logit>
int32_t Sampler::draw(const int32_t* ids, int64_t n, Logit&& logit) {
    // Softmax over the survivors (at temperature 1) for the top-p / min-p cuts.
    probs_.resize(static_cast<size_t>(n));
    const float mx = logit(0);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += probs_[i] = std::exp(logit(i) - mx);
    for (int64_t i = 0; i < n; ++i) probs_[i] = static_cast<float>(probs_[i] / sum);
    if (p_.top_p < 1.0f) {
        double cum = 0.0;
        int64_t keep = n;
        for (int64_t i = 0; i < n; ++i) {
            cum += probs_[i];
            if (cum >= p_.top_p) {
                keep = i + 1;
                break;
            }
        }
        n = std::max<int64_t>(1, keep);
    }
    if (p_.min_p > 0.0f) {
        const float cut = probs_[0] * p_.min_p;
        int64_t keep = 1;
        while (keep < n && probs_[keep] >= cut) ++keep;
        n = keep;
    }
    // Temperature, then draw.
    sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += probs_[i] = std::exp((logit(i) - mx) / p_.temperature);
    std::uniform_real_distribution<double> u(0.0, sum);
    double r = u(rng_), acc = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        acc += probs_[i];
        if (r < acc) return ids[i];
    }
    return ids[n - 1];
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab, const TokenConstraint& constraint) {
    const int32_t first = sample(logits, n_vocab);
    if (constraint.allows(first)) return first;
    masked_.assign(logits, logits + n_vocab);
    if (constraint.mask(masked_.data(), n_vocab) == 0) return -1;
    const int32_t id = sample(masked_.data(), n_vocab);
    // A draw can land on a masked token only through rounding at the end of the cumulative sum.
    return constraint.allows(id) ? id : argmax(masked_.data(), n_vocab);
}

}  // namespace moemesh
