// Test helper: llama.cpp's own ggml from the node-llama-cpp reference install (tests/ref), for
// bit-for-bit cross-checks of quantizers, dequantizers and dot products. The haswell CPU build is
// loaded (its dependency libggml-base.so exports the reference quantizers and dequantizers); nullptr
// where the install or the CPU features it needs (AVX2, FMA, BMI2) are missing.
#pragma once
#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moemesh::testing {

struct GgmlLib {
    void* handle = nullptr;
    using QuantFn = void (*)(const float*, void*, int64_t);
    using DequantFn = void (*)(const void*, float*, int64_t);
    using DotFn = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
    template <class F>
    F sym(const std::string& name) {
        return reinterpret_cast<F>(dlsym(handle, name.c_str()));
    }
};

inline GgmlLib* ggml_lib() {
    static GgmlLib lib = [] {
        GgmlLib l;
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("bmi2")) {
            return l;
        }
        const std::string path =
            std::string(MOEMESH_SOURCE_DIR) +
            "/tests/ref/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-cpu-haswell.so";
        l.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (l.handle) {
            if (auto init = l.sym<void (*)()>("ggml_cpu_init")) init();
        }
#endif
        return l;
    }();
    return lib.handle ? &lib : nullptr;
}

}  // namespace moemesh::testing
