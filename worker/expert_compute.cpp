#include "worker/expert_compute.h"

#include <algorithm>
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
    // Rows grouped by expert, in distinct_'s order: expert distinct_[i] owns rows first_[i] .. first_[i+1]
    // of xg_ [n_pairs, H], g_/u_ [n_pairs, I] and d_ [n_pairs, H].
    const int64_t n_distinct = static_cast<int64_t>(distinct_.size());
    first_.assign(static_cast<size_t>(n_distinct + 1), 0);
    pos_.resize(static_cast<size_t>(n_pairs));
    for (int64_t i = 0; i < n_distinct; ++i) {
        const auto& sel = by_expert[distinct_[i]];
        for (size_t r = 0; r < sel.size(); ++r) pos_[sel[r]] = first_[i] + static_cast<int64_t>(r);
        first_[i + 1] = first_[i] + static_cast<int64_t>(sel.size());
    }
    xg_.resize(static_cast<size_t>(n_pairs * H));
    g_.resize(static_cast<size_t>(n_pairs * I));
    u_.resize(static_cast<size_t>(n_pairs * I));
    d_.resize(static_cast<size_t>(n_pairs * H));
    for (int64_t p = 0; p < n_pairs; ++p) std::memcpy(&xg_[pos_[p] * H], x + rows[p] * H, sizeof(float) * H);
    // Batches of experts pinned together: all of them where pins are free, else one (a budget of one
    // expert still makes progress).
    const int64_t batch = src_->pins_are_free() ? n_distinct : 1;
    struct ReleasePins {  // also when an acquire fails part way through a batch
        std::vector<ExpertHandle>& h;
        ~ReleasePins() { h.clear(); }
    } release_pins{handles_};
    for (int64_t b0 = 0; b0 < n_distinct; b0 += batch) {
        const int64_t b1 = std::min(n_distinct, b0 + batch);
        handles_.clear();
        for (int64_t i = b0; i < b1; ++i) {
            MM_ASSIGN_OR_RETURN(ExpertHandle h, acquire_expert(*src_, layer, distinct_[i]));
            handles_.push_back(std::move(h));
        }
        jobs_.clear();
        for (int64_t i = b0; i < b1; ++i) {  // gate and up: adjacent jobs on the same rows share their conversion
            const ExpertSlice& ex = handles_[i - b0].slice();
            const int64_t o = first_[i], m = first_[i + 1] - first_[i];
            jobs_.push_back({ty.gate, ex.gate, I, H, &xg_[o * H], m, &g_[o * I]});  // [m, I]
            jobs_.push_back({ty.up, ex.up, I, H, &xg_[o * H], m, &u_[o * I]});      // [m, I]
        }
        matmul_many(pool_, jobs_.data(), static_cast<int64_t>(jobs_.size()));
        const int64_t o0 = first_[b0], rows_b = first_[b1] - o0;
        swiglu(&g_[o0 * I], &u_[o0 * I], &g_[o0 * I], rows_b * I);
        jobs_.clear();
        for (int64_t i = b0; i < b1; ++i) {
            const ExpertSlice& ex = handles_[i - b0].slice();
            const int64_t o = first_[i], m = first_[i + 1] - first_[i];
            jobs_.push_back({ty.down, ex.down, H, I, &g_[o * I], m, &d_[o * H]});  // [m, H]
        }
        matmul_many(pool_, jobs_.data(), static_cast<int64_t>(jobs_.size()));
        handles_.clear();
    }
    // Each pair's weight · its expert's output, in place (one rounding, as llama.cpp's ggml_mul).
    for (int64_t p = 0; p < n_pairs; ++p) {
        const float w = weights[p];
        float* dr = &d_[pos_[p] * H];
        for (int64_t h = 0; h < H; ++h) dr[h] *= w;
    }
    // Combine in pair order (as llama.cpp adds the K weighted expert outputs), so sums round alike.
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(n_rows * H));
    for (int64_t p = 0; p < n_pairs; ++p) {
        float* o = out + rows[p] * H;
        const float* s = &d_[pos_[p] * H];
        for (int64_t h = 0; h < H; ++h) o[h] += s[h];
    }
    return Status();
}

}  // namespace moemesh
