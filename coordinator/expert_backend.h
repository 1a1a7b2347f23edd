// The seam between the coordinator and whoever computes routed experts.
// Expert parallelism in named steps: route (coordinator) → group by owner → dispatch →
// expert compute (worker) → combine. This interface is "dispatch + expert compute + combine" for
// one MoE layer; its first implementation (worker/expert_executor.h) runs in-process.
#pragma once
#include <cstdint>

#include "common/status.h"

namespace moemesh {

class ExpertBackend {
public:
    virtual ~ExpertBackend() = default;
    // x:       [n_rows, H] f32 activations (post-norm) of the rows routed in this layer
    // ids:     [n_rows, K] selected expert ids
    // weights: [n_rows, K] gate weights (already renormalised)
    // out:     [n_rows, H] = Σ_j weights[r, j] · Expert_{ids[r, j]}(x[r])   (overwritten)
    virtual Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                               const float* weights, float* out) = 0;

    // Optional device-pointer entry, for a GPU coordinator whose workers are reached over cuda-ipc
    // or nccl: x and out in the coordinator's CUDA device memory (ids and weights on the host, as
    // above); stream is the caller's cudaStream_t, whose work on x is complete on entry and which
    // is synchronised on return. Called only while takes_device_pointers() is true.
    virtual bool takes_device_pointers() const { return false; }
    virtual Status moe_forward_device(int layer, const float* d_x, int64_t n_rows, int64_t k, const int32_t* ids,
                                      const float* weights, float* d_out, void* stream) {
        return Status::error("this expert backend takes host pointers only (moe_forward)");
    }
};

}  // namespace moemesh
