#include "worker/expert_executor.h"

#include <algorithm>
#include <cstring>

namespace moemesh {

StatusOr<std::unique_ptr<LocalExpertExecutor>> LocalExpertExecutor::create(const GgufFile& f, const ModelConfig& c,
                                                                           ThreadPool& pool) {
    std::unique_ptr<LocalExpertExecutor> ex(new LocalExpertExecutor(c, pool));
    const int64_t H = c.n_embd, I = c.n_ff_exp, E = c.n_expert;
    for (int il = 0; il < c.n_layer; ++il) {
        LayerExperts le;
        MM_ASSIGN_OR_RETURN(le.gate, get_weight(f, tensor_name(Tensor::kFfnGateExps, il), {H, I, E}));
        MM_ASSIGN_OR_RETURN(le.up, get_weight(f, tensor_name(Tensor::kFfnUpExps, il), {H, I, E}));
        MM_ASSIGN_OR_RETURN(le.down, get_weight(f, tensor_name(Tensor::kFfnDownExps, il), {I, H, E}));
        ex->layers_.push_back(le);
    }
    return ex;
}

Status LocalExpertExecutor::moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                                        const float* weights, float* out) {
    if (layer < 0 || layer >= static_cast<int>(layers_.size()))
        return MM_ERROR("expert call for layer %d, model has %zu", layer, layers_.size());
    const LayerExperts& le = layers_[layer];
    const int64_t H = cfg_.n_embd, I = cfg_.n_ff_exp, E = cfg_.n_expert;
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(n_rows * H));
    for (int64_t i = 0; i < n_rows * k; ++i) {
        if (ids[i] < 0 || ids[i] >= E) return MM_ERROR("layer %d: expert id %d out of range [0, %lld)", layer, ids[i],
                                                       static_cast<long long>(E));
    }
    // Group: for each expert in use, the (row, slot) pairs that selected it, in row order.
    slots_.resize(static_cast<size_t>(n_rows * k * H));
    std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(E));
    for (int64_t i = 0; i < n_rows * k; ++i) by_expert[ids[i]].push_back(i);
    for (int64_t e = 0; e < E; ++e) {
        const auto& sel = by_expert[e];
        if (sel.empty()) continue;
        const int64_t m = static_cast<int64_t>(sel.size());
        // Gather the rows: xg [m, H].
        xg_.resize(static_cast<size_t>(m * H));
        for (int64_t r = 0; r < m; ++r) std::memcpy(&xg_[r * H], x + (sel[r] / k) * H, sizeof(float) * H);
        g_.resize(static_cast<size_t>(m * I));
        u_.resize(static_cast<size_t>(m * I));
        d_.resize(static_cast<size_t>(m * H));
        matmul(pool_, le.gate.type, le.gate.matrix(e), I, H, xg_.data(), m, g_.data());  // [m, I]
        matmul(pool_, le.up.type, le.up.matrix(e), I, H, xg_.data(), m, u_.data());      // [m, I]
        swiglu(g_.data(), u_.data(), g_.data(), m * I);                                   // [m, I]
        matmul(pool_, le.down.type, le.down.matrix(e), H, I, g_.data(), m, d_.data());   // [m, H]
        // Scatter w · d into the slot buffer [n_rows, K, H].
        for (int64_t r = 0; r < m; ++r) {
            const float w = weights[sel[r]];
            float* o = &slots_[sel[r] * H];
            const float* dr = &d_[r * H];
            for (int64_t h = 0; h < H; ++h) o[h] = w * dr[h];
        }
    }
    // Combine in slot order (as llama.cpp adds the K weighted expert outputs), so sums round alike.
    for (int64_t r = 0; r < n_rows; ++r) {
        float* o = out + r * H;
        for (int64_t j = 0; j < k; ++j) {
            const float* s = &slots_[(r * k + j) * H];
            for (int64_t h = 0; h < H; ++h) o[h] += s[h];
        }
    }
    return Status();
}

}  // namespace moemesh
