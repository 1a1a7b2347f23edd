// The CUDA implementation of Backend (coordinator/backend.h): every op on kernels/cuda, the model's
// weights and the routed experts resident in VRAM. Built only with CUDA (MOEMESH_HAVE_CUDA).
#pragma once
#include <cstdint>
#include <memory>

#include "coordinator/backend.h"

namespace moemesh {

// Device `index` (cudaSetDevice); errors when there is no driver/device or index is out of range.
StatusOr<std::unique_ptr<Backend>> make_cuda_backend(int index);

// Process-wide counts of decode steps graphed (MOEMESH_CUDA_GRAPHS != 0): graphs captured (or
// updated), graph replays, and decode steps run op by op (the first ones, before shapes settle).
struct CudaGraphStats {
    int64_t captures = 0, replays = 0, eager_steps = 0;
};
CudaGraphStats cuda_graph_stats();

}  // namespace moemesh
