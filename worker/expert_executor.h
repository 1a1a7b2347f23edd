// In-process expert backend: every routed expert, read straight from the mapped GGUF.
#pragma once
#include <memory>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/weights.h"
#include "coordinator/expert_backend.h"
#include "worker/expert_compute.h"

namespace moemesh {

// One layer's stacked expert tensors, shape- and type-checked: gate/up {H, I, E}, down {I, H, E}.
struct LayerExpertWeights {
    Weight gate, up, down;  // gate and up may be the two halves of one fused tensor (same ->tensor)
    bool fused_gate_up() const { return gate.tensor != nullptr && gate.tensor == up.tensor; }
};
StatusOr<LayerExpertWeights> layer_expert_weights(const GgufFile& f, const ModelConfig& c, int layer);
// A table with the layer's types and no expert held yet (E null slices).
LayerExpertTable empty_expert_table(const LayerExpertWeights& w, int64_t n_expert);

// Expert tables of every layer for all experts, pointing into the mapped file. Checks the expert
// tensors' shapes and types.
StatusOr<std::vector<LayerExpertTable>> map_expert_tables(const GgufFile& f, const ModelConfig& c);

class LocalExpertExecutor final : public ExpertBackend {
public:
    static StatusOr<std::unique_ptr<LocalExpertExecutor>> create(const GgufFile& f, const ModelConfig& c,
                                                                  ThreadPool& pool);
    // Every expert through a source (e.g. an ExpertCache: `moemesh run --device-budget`).
    static std::unique_ptr<LocalExpertExecutor> create(const ModelConfig& c, ThreadPool& pool,
                                                       std::shared_ptr<ExpertSource> source);
    Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                       const float* weights, float* out) override;

private:
    explicit LocalExpertExecutor(std::unique_ptr<ExpertCompute> c) : compute_(std::move(c)) {}
    std::unique_ptr<ExpertCompute> compute_;
    std::vector<int32_t> rows_;
};

}  // namespace moemesh
