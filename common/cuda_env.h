// Process-wide CUDA settings that must be in place before the first CUDA call (each binary's main).
#pragma once
#include <cstdlib>

namespace moemesh {

// CUDA loads kernels lazily by default (CUDA_MODULE_LOADING=LAZY since CUDA 12.2): a process then
// pays for loading the prompt kernels inside its first prompt (~50 ms on an H200: the first q4_k
// prompt product took 13 ms per call in a 4-layer model's first prompt instead of 0.1 ms). Loading
// them with the context moves that to start-up, where the model load is anyway. A user's own
// CUDA_MODULE_LOADING wins. No effect without CUDA.
inline void load_cuda_kernels_eagerly() { setenv("CUDA_MODULE_LOADING", "EAGER", 0); }

}  // namespace moemesh
