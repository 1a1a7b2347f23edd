// Device discovery for callers that must run (and skip GPU work) on hosts without a GPU or driver.
#include <atomic>
#include <cstdlib>
#include <cstring>

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

#ifndef MM_CUDA_EMULATION  // the emulator has no programmatic launches
namespace detail {

// Whether decode kernels launch as programmatic dependent launches (kernels/cuda/common.cuh): on
// devices of compute capability 9.0 and up, unless MOEMESH_CUDA_PDL=0.
bool pdl_enabled() {
    static const bool wanted = [] {
        const char* e = std::getenv("MOEMESH_CUDA_PDL");
        return e == nullptr || std::strcmp(e, "0") != 0;
    }();
    if (!wanted) return false;
    static std::atomic<int> known[64];  // per device: 0 not asked yet, 1 yes, 2 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
        (void)cudaGetLastError();
        return false;
    }
    int k = known[dev].load(std::memory_order_relaxed);
    if (k == 0) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
            (void)cudaGetLastError();
            major = 0;
        }
        k = major >= 9 ? 1 : 2;
        known[dev].store(k, std::memory_order_relaxed);
    }
    return k == 1;
}

}  // namespace detail
#endif

}  // namespace moemesh::cuda
