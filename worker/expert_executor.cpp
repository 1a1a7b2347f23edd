#include "worker/expert_executor.h"

#include "common/weights.h"

namespace moemesh {

StatusOr<LayerExpertWeights> layer_expert_weights(const GgufFile& f, const ModelConfig& c, int il) {
    const int64_t H = c.n_embd, I = c.n_ff_exp, E = c.n_expert;
    LayerExpertWeights w;
    // Files converted with --fuse-gate-up-exps hold ffn_gate_up_exps {H, 2I, E} instead: per expert
    // the I gate rows, then the I up rows (llama.cpp splits the product the same way).
    MM_ASSIGN_OR_RETURN(Weight fused, get_optional_weight(f, tensor_name(Tensor::kFfnGateUpExps, il), {H, 2 * I, E}));
    if (fused && !f.tensor(tensor_name(Tensor::kFfnGateExps, il))) {
        w.gate = fused;
        w.gate.ne[1] = I;
        w.gate.matrix_bytes = fused.row_bytes * static_cast<size_t>(I);
        w.up = w.gate;
        w.up.data = fused.data + w.gate.matrix_bytes;
    } else {
        MM_ASSIGN_OR_RETURN(w.gate, get_weight(f, tensor_name(Tensor::kFfnGateExps, il), {H, I, E}));
        MM_ASSIGN_OR_RETURN(w.up, get_weight(f, tensor_name(Tensor::kFfnUpExps, il), {H, I, E}));
    }
    MM_ASSIGN_OR_RETURN(w.down, get_weight(f, tensor_name(Tensor::kFfnDownExps, il), {I, H, E}));
    return w;
}

LayerExpertTable empty_expert_table(const LayerExpertWeights& w, int64_t n_expert) {
    LayerExpertTable t;
    t.gate_type = w.gate.type;
    t.up_type = w.up.type;
    t.down_type = w.down.type;
    t.experts.resize(static_cast<size_t>(n_expert));
    return t;
}

StatusOr<std::vector<LayerExpertTable>> map_expert_tables(const GgufFile& f, const ModelConfig& c) {
    const int64_t E = c.n_expert;
    std::vector<LayerExpertTable> layers;
    for (int il = 0; il < c.n_layer; ++il) {
        MM_ASSIGN_OR_RETURN(LayerExpertWeights lw, layer_expert_weights(f, c, il));
        LayerExpertTable t = empty_expert_table(lw, E);
        for (int64_t e = 0; e < E; ++e) t.experts[e] = ExpertSlice{lw.gate.matrix(e), lw.up.matrix(e), lw.down.matrix(e)};
        layers.push_back(std::move(t));
    }
    return layers;
}

StatusOr<std::unique_ptr<LocalExpertExecutor>> LocalExpertExecutor::create(const GgufFile& f, const ModelConfig& c,
                                                                           ThreadPool& pool) {
    MM_ASSIGN_OR_RETURN(std::vector<LayerExpertTable> tables, map_expert_tables(f, c));
    return std::unique_ptr<LocalExpertExecutor>(
        new LocalExpertExecutor(std::make_unique<ExpertCompute>(c, pool, std::move(tables))));
}

std::unique_ptr<LocalExpertExecutor> LocalExpertExecutor::create(const ModelConfig& c, ThreadPool& pool,
                                                                std::shared_ptr<ExpertSource> source) {
    return std::unique_ptr<LocalExpertExecutor>(
        new LocalExpertExecutor(std::make_unique<ExpertCompute>(c, pool, std::move(source))));
}

Status LocalExpertExecutor::moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                                        const float* weights, float* out) {
    // Pairs in slot order: pair r*k + j is row r's j-th choice.
    rows_.resize(static_cast<size_t>(n_rows * k));
    for (int64_t i = 0; i < n_rows * k; ++i) rows_[i] = static_cast<int32_t>(i / k);
    return compute_->compute(layer, x, n_rows, rows_.data(), ids, weights, n_rows * k, out);
}

}  // namespace moemesh
