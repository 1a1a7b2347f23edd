// The CUDA implementation of Backend (coordinator/backend.h): every op on kernels/cuda, the model's
// weights and the routed experts resident in VRAM. Built only with CUDA (MOEMESH_HAVE_CUDA).
#pragma once
#include <memory>

#include "coordinator/backend.h"

namespace moemesh {

// Device `index` (cudaSetDevice); errors when there is no driver/device or index is out of range.
StatusOr<std::unique_ptr<Backend>> make_cuda_backend(int index);

}  // namespace moemesh
