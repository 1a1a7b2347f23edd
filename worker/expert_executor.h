// In-process expert compute: the routed experts of every MoE layer, read from the mapped GGUF.
#pragma once
#include <memory>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/weights.h"
#include "coordinator/expert_backend.h"
#include "kernels/ops.h"

namespace moemesh {

class LocalExpertExecutor final : public ExpertBackend {
public:
    static StatusOr<std::unique_ptr<LocalExpertExecutor>> create(const GgufFile& f, const ModelConfig& c,
                                                                  ThreadPool& pool);
    Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                       const float* weights, float* out) override;

private:
    struct LayerExperts {
        Weight gate;  // {H, I, E}
        Weight up;    // {H, I, E}
        Weight down;  // {I, H, E}
    };
    LocalExpertExecutor(const ModelConfig& c, ThreadPool& pool) : cfg_(c), pool_(pool) {}

    ModelConfig cfg_;
    ThreadPool& pool_;
    std::vector<LayerExperts> layers_;
    // Scratch, reused across calls.
    std::vector<float> xg_, g_, u_, d_, slots_;
};

}  // namespace moemesh
