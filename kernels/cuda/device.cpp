// Device discovery for callers that must run (and skip GPU work) on hosts without a GPU or driver;
// the kernel switches and the loading of our own kernels when a device starts.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#if defined(MM_CUDA_EMULATION)
#define MOEMESH_CUDA_ARCHS "90 (the emulator's build)"
#elif !defined(MOEMESH_CUDA_ARCHS)  // CMake's CMAKE_CUDA_ARCHITECTURES of the build
#define MOEMESH_CUDA_ARCHS "unknown"
#endif
#ifndef MM_CUDA_EMULATION
#include <cuda.h>  // the driver's types; its entry points come through the runtime
#endif

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
struct Anchors {
    std::mutex mu;
    std::vector<const void*> kernels;  // one per module (common.cuh)
};
Anchors& anchors() {
    static Anchors a;  // (built on first use: registrations come from other files' static initializers)
    return a;
}
}  // namespace
}  // namespace detail

std::string kernels_unavailable(int index) {
    const void* kernel = nullptr;
    {
        detail::Anchors& a = detail::anchors();
        const std::lock_guard<std::mutex> lock(a.mu);
        if (!a.kernels.empty()) kernel = a.kernels.front();
    }
#ifdef MM_CUDA_EMULATION
    static const char emulated = 0;  // (no modules: any function stands for the emulated build's code)
    kernel = &emulated;
#endif
    if (kernel == nullptr) return "";
    int prev = 0;
    if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(index) != cudaSuccess) {
        (void)cudaGetLastError();
        return "";  // (the caller's own calls report it)
    }
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
    (void)cudaGetLastError();  // (not a sticky error)
    (void)cudaSetDevice(prev);
    // Only this error refuses the device: anything else (unexpected here) is left to the calls that
    // follow, so that a device the build does run is never refused on a misreading.
    if (e != cudaErrorNoKernelImageForDevice) return "";
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, index) != cudaSuccess) {
        (void)cudaGetLastError();
        return "cuda:" + std::to_string(index) + ": " + cudaGetErrorString(e);
    }
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "cuda:%d (%s, compute capability %d.%d) cannot run this build's kernels (built for CUDA "
                  "architectures %s: %s); rebuild with -DCMAKE_CUDA_ARCHITECTURES=%d%d (or native), or run on the "
                  "CPU (--device cpu)",
                  index, p.name, p.major, p.minor, MOEMESH_CUDA_ARCHS, cudaGetErrorString(e), p.major, p.minor);
    return msg;
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

namespace detail {

bool register_module_anchor(const void* kernel) {
    Anchors& a = anchors();
    const std::lock_guard<std::mutex> lock(a.mu);
    a.kernels.push_back(kernel);
    return true;
}

}  // namespace detail

namespace {

#ifdef MM_CUDA_EMULATION
// The emulator runs kernels as host code: no module, nothing to load (and no error).
KernelLoad load_modules(bool /*load*/, int* not_loaded) {
    *not_loaded = -1;
    return KernelLoad{};
}
#else
struct DriverApi {
    CUresult (*func_get_module)(CUmodule*, CUfunction) = nullptr;
    CUresult (*function_count)(unsigned*, CUmodule) = nullptr;
    CUresult (*enumerate)(CUfunction*, unsigned, CUmodule) = nullptr;
    CUresult (*is_loaded)(CUfunctionLoadingState*, CUfunction) = nullptr;
    CUresult (*load)(CUfunction) = nullptr;
    std::string error;
};

const DriverApi& driver_api() {
    static const DriverApi api = [] {
        DriverApi a;
        auto entry = [&a](const char* name, auto* fn) {
            if (!a.error.empty()) return;
            void* p = nullptr;
            cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
            if (cudaGetDriverEntryPointByVersion(name, &p, 12040, cudaEnableDefault, &q) != cudaSuccess ||
                q != cudaDriverEntryPointSuccess || p == nullptr) {
                (void)cudaGetLastError();
                a.error = std::string("the driver has no ") + name + " (CUDA 12.4+ drivers have it)";
                return;
            }
            *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(p);
        };
        entry("cuFuncGetModule", &a.func_get_module);
        entry("cuModuleGetFunctionCount", &a.function_count);
        entry("cuModuleEnumerateFunctions", &a.enumerate);
        entry("cuFuncIsLoaded", &a.is_loaded);
        entry("cuFuncLoad", &a.load);
        return a;
    }();
    return api;
}

// Every function of our modules on the current device: loaded (load) and/or counted; *not_loaded:
// how many were not loaded when looked at.
KernelLoad load_modules(bool load, int* not_loaded) {
    KernelLoad r;
    *not_loaded = -1;
    const DriverApi& api = driver_api();
    if (!api.error.empty()) {
        r.error = api.error;
        return r;
    }
    std::vector<const void*> kernels;
    {
        detail::Anchors& a = detail::anchors();
        const std::lock_guard<std::mutex> lock(a.mu);
        kernels = a.kernels;
    }
    const auto t0 = std::chrono::steady_clock::now();
    int missing = 0;
    auto fail = [&r](const std::string& what) {
        if (r.error.empty()) r.error = what;
    };
    for (const void* k : kernels) {
        cudaFunction_t f = nullptr;
        if (const cudaError_t err = cudaGetFuncBySymbol(&f, k); err != cudaSuccess) {
            (void)cudaGetLastError();
            fail(std::string("cudaGetFuncBySymbol: ") + cudaGetErrorString(err));
            continue;
        }
        CUmodule mod = nullptr;
        unsigned n = 0;
        if (api.func_get_module(&mod, f) != CUDA_SUCCESS || api.function_count(&n, mod) != CUDA_SUCCESS) {
            fail("cuFuncGetModule / cuModuleGetFunctionCount failed");
            continue;
        }
        std::vector<CUfunction> fns(n);
        if (n > 0 && api.enumerate(fns.data(), n, mod) != CUDA_SUCCESS) {
            fail("cuModuleEnumerateFunctions failed");
            continue;
        }
        ++r.modules;
        r.functions += static_cast<int>(n);
        for (CUfunction fn : fns) {
            CUfunctionLoadingState st = CU_FUNCTION_LOADING_STATE_UNLOADED;
            if (api.is_loaded(&st, fn) != CUDA_SUCCESS) {
                fail("cuFuncIsLoaded failed");
                continue;
            }
            if (st == CU_FUNCTION_LOADING_STATE_LOADED) continue;
            ++missing;
            if (!load) continue;
            if (api.load(fn) != CUDA_SUCCESS) {
                fail("cuFuncLoad failed");
                continue;
            }
            ++r.loaded_now;
        }
    }
    r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    *not_loaded = r.error.empty() ? missing : -1;
    return r;
}
#endif

}  // namespace

KernelLoad load_own_kernels() {
    static std::mutex mu;
    static std::map<int, KernelLoad> done;  // per device
    int dev = 0;
    if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) {
        (void)cudaGetLastError();
        KernelLoad r;
        r.error = std::string("cudaGetDevice: ") + cudaGetErrorString(err);
        return r;
    }
    const std::lock_guard<std::mutex> lock(mu);
    if (auto it = done.find(dev); it != done.end()) return it->second;
    KernelLoad r;
    const char* e = std::getenv("MOEMESH_CUDA_LOAD_KERNELS");
    if (e != nullptr && std::strcmp(e, "0") == 0) {
        r.error = "MOEMESH_CUDA_LOAD_KERNELS=0";
    } else {
        int not_loaded = 0;
        r = load_modules(true, &not_loaded);
    }
    done[dev] = r;
    return r;
}

int own_kernels_not_loaded(std::string* why) {
    int not_loaded = -1;
    const KernelLoad r = load_modules(false, &not_loaded);
    if (why) *why = not_loaded < 0 && r.error.empty() ? "the CUDA emulator has no modules" : r.error;
    return not_loaded;
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
