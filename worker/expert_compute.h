// Expert compute: Σ over (row, expert, weight) pairs of weight · SwiGLU-expert(row), for the
// experts whose bytes this process holds. Used in-process (LocalExpertExecutor) and by workers.
#pragma once
#include <cstdint>
#include <vector>

#include "common/ggml_types.h"
#include "common/model_config.h"
#include "common/status.h"
#include "kernels/ops.h"

namespace moemesh {

// Where one expert's matrices live: gate/up [I, H] rows and down [H, I] rows, in the layer's types.
struct ExpertSlice {
    const uint8_t* gate = nullptr;
    const uint8_t* up = nullptr;
    const uint8_t* down = nullptr;
};

struct LayerExpertTable {
    GgmlType gate_type = GgmlType::F32, up_type = GgmlType::F32, down_type = GgmlType::F32;
    std::vector<ExpertSlice> experts;  // [E]; gate == nullptr: not held here
};

class ExpertCompute {
public:
    ExpertCompute(const ModelConfig& c, ThreadPool& pool, std::vector<LayerExpertTable> layers)
        : cfg_(c), pool_(pool), layers_(std::move(layers)) {}

    // x: [n_rows, H]. Pairs p: (rows[p], experts[p], weights[p]). out: [n_rows, H] (overwritten)
    // = for each row, Σ of its pairs in pair order. Every pair's expert must be held here.
    Status compute(int layer, const float* x, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                   const float* weights, int64_t n_pairs, float* out);

    const ModelConfig& config() const { return cfg_; }
    bool holds(int layer, int expert) const;

private:
    ModelConfig cfg_;
    ThreadPool& pool_;
    std::vector<LayerExpertTable> layers_;
    std::vector<float> xg_, g_, u_, d_, slots_;
    std::vector<std::vector<int64_t>> by_expert_;  // [E]: pairs of each expert, in order
};

}  // namespace moemesh
