// Shared libraries loaded at run time (dlopen) instead of linked, so that the binaries start where
// they are not installed: NCCL (coordinator/nccl_loader.cpp) and cuBLAS (kernels/cuda/blas.cpp).
// Nothing is ever closed: a library missing a symbol stays open (it is not retried either), since
// dlclose of a library that may have started threads is not worth the risk.
#pragma once
#include <initializer_list>
#include <string>

namespace moemesh {

struct DynLib {
    void* handle = nullptr;
    std::string name;  // the name that loaded
};

// The first of `names` that loads (RTLD_NOW | RTLD_LOCAL, the loader's usual search path); on
// failure false, with *tried naming each library and dlerror()'s reason ("a: ...; b: ...").
bool dynlib_open(std::initializer_list<const char*> names, DynLib* lib, std::string* tried);

// The library's `symbol`; nullptr (with dlerror()'s reason in *why) where it has none.
void* dynlib_symbol(const DynLib& lib, const char* symbol, std::string* why);
// *fn = the library's `symbol` as a function pointer; false (*why as above) where it has none.
template <class Fn>
bool dynlib_bind(const DynLib& lib, Fn* fn, const char* symbol, std::string* why) {
    void* p = dynlib_symbol(lib, symbol, why);
    if (p != nullptr) *fn = reinterpret_cast<Fn>(p);
    return p != nullptr;
}

}  // namespace moemesh
