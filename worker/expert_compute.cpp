#include "worker/expert_compute.h"

#include <cstring>

namespace moemesh {

bool TableExpertSource::holds(int layer, int expert) const {
    return layer >= 0 && layer < static_cast<int>(layers_.size()) && expert >= 0 &&
           expert < static_cast<int>(layers_[layer].experts.size()) && layers_[layer].experts[expert].gate != nullptr;
}

Status TableExpertSource::acquire(int layer, int expert, ExpertSlice* slice, void** token) {
    if (!holds(layer, expert)) return MM_ERROR("layer %d: expert %d is not held by this process", layer, expert);
    *slice = layers_[layer].experts[expert];
    *token = nullptr;
    return Status();
}

Status ExpertCompute::compute(int layer, const float* x, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                              const float* weights, int64_t n_pairs, float* out) {
    const int64_t H = cfg_.n_embd, I = cfg_.n_ff_exp, E = cfg_.n_expert;
    if (layer < 0 || layer >= src_->num_layers())
        return MM_ERROR("expert call for layer %d, model has %d layers", layer, src_->num_layers());
    for (int64_t p = 0; p < n_pairs; ++p) {
        if (rows[p] < 0 || rows[p] >= n_rows)
            return MM_ERROR("layer %d: pair %lld names row %d of %lld", layer, static_cast<long long>(p), rows[p],
                            static_cast<long long>(n_rows));
        if (experts[p] < 0 || experts[p] >= E)
            return MM_ERROR("layer %d: expert id %d out of range [0, %lld)", layer, experts[p], static_cast<long long>(E));
        if (!src_->holds(layer, experts[p]))
            return MM_ERROR("layer %d: expert %d is not held by this process", layer, experts[p]);
    }
    const ExpertTypes ty = src_->types(layer);
    // Group: for each expert in use, its pairs in order.
    // Reused across calls: decode runs this once per layer per token.
    auto& by_expert = by_expert_;
    by_expert.resize(static_cast<size_t>(E));
    for (auto& v : by_expert) v.clear();
    for (int64_t p = 0; p < n_pairs; ++p) by_expert[experts[p]].push_back(p);
    distinct_.clear();
    for (int64_t e = 0; e < E; ++e)
        if (!by_expert[e].empty()) distinct_.push_back(static_cast<int32_t>(e));
    // The call's missing experts are read together, not one by one as the loop below meets them.
    struct EndCall {
        ExpertSource& s;
        ~EndCall() { s.end_call(); }
    } end_call{*src_};
    MM_RETURN_IF_ERROR(src_->will_need(layer, distinct_.data(), static_cast<int64_t>(distinct_.size())));
    // After will_need: the next layer's prefetch cannot evict what this call has kept.
    src_->will_compute(layer, x, n_rows);
    slots_.resize(static_cast<size_t>(n_pairs * H));  // [n_pairs, H]: weight · expert(row) per pair
    for (const int32_t e : distinct_) {  // any order: each pair has its own slot
        const auto& sel = by_expert[e];
        MM_ASSIGN_OR_RETURN(ExpertHandle h, acquire_expert(*src_, layer, e));
        const ExpertSlice& ex = h.slice();
        const int64_t m = static_cast<int64_t>(sel.size());
        xg_.resize(static_cast<size_t>(m * H));  // [m, H] gathered rows
        for (int64_t r = 0; r < m; ++r) std::memcpy(&xg_[r * H], x + rows[sel[r]] * H, sizeof(float) * H);
        g_.resize(static_cast<size_t>(m * I));
        u_.resize(static_cast<size_t>(m * I));
        d_.resize(static_cast<size_t>(m * H));
        matmul(pool_, ty.gate, ex.gate, I, H, xg_.data(), m, g_.data());  // [m, I]
        matmul(pool_, ty.up, ex.up, I, H, xg_.data(), m, u_.data());      // [m, I]
        swiglu(g_.data(), u_.data(), g_.data(), m * I);                    // [m, I]
        matmul(pool_, ty.down, ex.down, H, I, g_.data(), m, d_.data());   // [m, H]
        h.reset();  // one pin at a time: a budget of one expert still makes progress
        for (int64_t r = 0; r < m; ++r) {
            const float w = weights[sel[r]];
            float* o = &slots_[sel[r] * H];
            const float* dr = &d_[r * H];
            for (int64_t h2 = 0; h2 < H; ++h2) o[h2] = w * dr[h2];
        }
    }
    // Combine in pair order (as llama.cpp adds the K weighted expert outputs), so sums round alike.
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(n_rows * H));
    for (int64_t p = 0; p < n_pairs; ++p) {
        float* o = out + rows[p] * H;
        const float* s = &slots_[p * H];
        for (int64_t h = 0; h < H; ++h) o[h] += s[h];
    }
    return Status();
}

}  // namespace moemesh
