// Device discovery for callers that must run (and skip GPU work) on hosts without a GPU or driver.
#include "kernels/cuda/cuda_ops.h"

namespace moemesh::cuda {

int device_count(const char** why) {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        // Not a sticky error: clear it so that later runtime calls do not report it again.
        (void)cudaGetLastError();
        if (why) *why = cudaGetErrorString(err);
        return 0;
    }
    if (n == 0 && why) *why = "the CUDA runtime found no device";
    return n;
}

}  // namespace moemesh::cuda
