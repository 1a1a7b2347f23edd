// Device discovery for callers that must run (and skip GPU work) on hosts without a GPU or driver.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

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

namespace detail {

namespace {
struct SwitchSetters {
    std::mutex mu;
    std::vector<cudaError_t (*)(unsigned)> set;
};
SwitchSetters& switch_setters() {
    static SwitchSetters s;  // (built on first use: registrations come from other files' static initializers)
    return s;
}
}  // namespace

bool register_switch_setter(cudaError_t (*set)(unsigned)) {
    SwitchSetters& s = switch_setters();
    const std::lock_guard<std::mutex> lock(s.mu);
    s.set.push_back(set);
    return true;
}

}  // namespace detail

unsigned kernel_switches_from_env() {
    unsigned v = 0;
    const char* t = std::getenv("MOEMESH_CUDA_PDL_TRIGGER");
    if (t != nullptr && std::strcmp(t, "exit") == 0) v |= kSwitchTriggerAtExit;
    const char* p = std::getenv("MOEMESH_CUDA_PREFETCH");
    if (p != nullptr && std::strcmp(p, "0") == 0) v |= kSwitchNoPrefetch;
    const char* e = std::getenv("MOEMESH_CUDA_EXPERT_PREFETCH");
    if (e != nullptr && std::strcmp(e, "0") == 0) v |= kSwitchNoExpertPrefetch;
    if (e != nullptr && std::strcmp(e, "early") == 0) v |= kSwitchExpertPrefetchEarly;
    return v;
}

cudaError_t set_kernel_switches(unsigned switches) {
    detail::SwitchSetters& s = detail::switch_setters();
    const std::lock_guard<std::mutex> lock(s.mu);
    for (auto* set : s.set)
        if (const cudaError_t err = set(switches); err != cudaSuccess) return err;
    return cudaSuccess;
}

cudaError_t use_env_kernel_switches() {
    static const unsigned wanted = kernel_switches_from_env();
    if (wanted == 0) return cudaSuccess;  // every copy starts at 0
    static std::mutex mu;
    static std::vector<int> done;  // devices set
    int dev = 0;
    if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
    const std::lock_guard<std::mutex> lock(mu);
    for (const int d : done)
        if (d == dev) return cudaSuccess;
    if (const cudaError_t err = set_kernel_switches(wanted); err != cudaSuccess) return err;
    done.push_back(dev);
    return cudaSuccess;
}

int kernel_switch_copies() {
    detail::SwitchSetters& s = detail::switch_setters();
    const std::lock_guard<std::mutex> lock(s.mu);
    return static_cast<int>(s.set.size());
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
