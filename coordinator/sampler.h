// Next-token sampling: greedy, or top-k → top-p → min-p → temperature → random draw.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace moemesh {

struct SamplerParams {
    float temperature = 0.8f;  // <= 0 means greedy
    int top_k = 40;            // <= 0: off
    float top_p = 0.95f;       // >= 1: off
    float min_p = 0.05f;       // <= 0: off
    uint64_t seed = 0;
    bool greedy = false;
};

class TokenConstraint;

class Sampler {
public:
    explicit Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) {}
    int32_t sample(const float* logits, int64_t n_vocab);
    // Under a grammar: the unconstrained choice when the constraint allows it (one check, the
    // usual case), else the same sampling over the allowed tokens only, as llama.cpp does. For
    // plain temperature sampling that is exactly the distribution renormalized over the allowed
    // tokens. -1 when the constraint allows no token.
    int32_t sample(const float* logits, int64_t n_vocab, const TokenConstraint& constraint);
    // Always the argmax of the logits (sample() never draws): a caller may ask the model for the
    // argmax alone (Model::forward_argmax) instead of the logits.
    bool greedy() const { return p_.greedy || p_.temperature <= 0.0f; }
    // k > 0 when sample() (without a grammar) depends only on the k largest logits (top-k sampling
    // with k < n_vocab): then sample_candidates() over them is sample() — the same token and the
    // same random draw — and a caller may ask the model for those alone (Model::forward_top_k).
    // 0: sample() needs all the logits (greedy: see greedy()).
    int64_t candidates(int64_t n_vocab) const;
    // sample() from its candidates: ids[0..k) by decreasing logit, the lower id first on equal
    // logits (top_k_ids' order), vals their logits; k == candidates(n_vocab).
    int32_t sample_candidates(const int32_t* ids, const float* vals, int64_t k);

private:
    template <typename Logit>
    int32_t draw(const int32_t* ids, int64_t n, Logit&& logit);

    SamplerParams p_;
    std::mt19937_64 rng_;
    std::vector<int32_t> ids_;
    std::vector<float> probs_;
    std::vector<float> masked_;
};

// Index of the largest logit (lowest index on ties).
int32_t argmax(const float* logits, int64_t n);
// ids = the k ids of the largest logits, by decreasing logit (lower id first on ties), as a
// partial_sort of all ids gives; one pass with a heap of k when k is small next to n_vocab.
void top_k_ids(const float* logits, int64_t n_vocab, int64_t k, std::vector<int32_t>& ids);

// Full softmax at temperature 1 in double precision; returns the top-n (id, prob) pairs, by
// decreasing probability.
std::vector<std::pair<int32_t, double>> top_probs(const float* logits, int64_t n_vocab, int64_t top_n);

// A generated token's log-probability and the top_n most likely tokens' (by decreasing
// probability), from the full log-softmax at temperature 1 in double precision: the model's own
// distribution, before any sampling cut (what the OpenAI API's `logprobs` report).
struct TokenLogprobs {
    int32_t id = -1;
    double logprob = 0.0;
    std::vector<std::pair<int32_t, double>> top;
};
TokenLogprobs token_logprobs(const float* logits, int64_t n_vocab, int32_t chosen, int64_t top_n);

}  // namespace moemesh
