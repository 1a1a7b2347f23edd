#include "coordinator/nccl_loader.h"

#ifdef MOEMESH_HAVE_NCCL
#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "common/status.h"
#ifdef MM_CUDA_EMULATION  // defined by the emulator's cuda_runtime.h, which nccl.h includes
#include "kernels/cuda/emu/nccl_emu.h"
#endif

namespace moemesh {
namespace {

struct Loaded {
    NcclApi api{};
    std::string error;  // "" when api is complete
};

#ifdef MM_CUDA_EMULATION
// On the CUDA emulator: its NCCL (kernels/cuda/emu/nccl_emu.h), not the library's, which would want
// a real GPU.
Loaded load() {
    namespace e = mm_emu::nccl;
    Loaded l;
    l.api = NcclApi{e::GetErrorString, e::GetUniqueId,     e::CommInitRank, e::CommInitRankConfig,
                    e::CommGetAsyncError, e::CommAbort, e::Send,         e::Recv};
    return l;
}
#else
// The unversioned name is the development symlink, there as a fallback for installs without the soname link.
constexpr const char* kNcclLibraries[] = {"libnccl.so.2", "libnccl.so"};

Loaded load() {
    Loaded l;
    void* h = nullptr;
    const char* name = nullptr;
    std::string tried;
    for (const char* lib : kNcclLibraries) {
        h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
        if (h) {
            name = lib;
            break;
        }
        // dlerror() names the library in its message ("libnccl.so.2: cannot open shared object file: ...").
        const char* e = dlerror();
        std::string reason = e ? e : "unknown error";
        if (reason.find(lib) == std::string::npos) reason = std::string(lib) + ": " + reason;
        tried += (tried.empty() ? "" : "; ") + reason;
    }
    if (!h) {
        l.error = "cannot load NCCL (" + tried + "); install NCCL or put the directory of libnccl.so.2 on LD_LIBRARY_PATH";
        return l;
    }
    auto sym = [&](auto* fn, const char* symbol) {
        if (!l.error.empty()) return;
        dlerror();
        void* p = dlsym(h, symbol);
        if (!p) {
            const char* e = dlerror();
            l.error = str_printf("%s has no %s (%s); the nccl transport needs NCCL 2.14 or newer", name, symbol,
                                 e ? e : "null symbol");
            return;
        }
        *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(p);
    };
    sym(&l.api.GetErrorString, "ncclGetErrorString");
    sym(&l.api.GetUniqueId, "ncclGetUniqueId");
    sym(&l.api.CommInitRank, "ncclCommInitRank");
    sym(&l.api.CommInitRankConfig, "ncclCommInitRankConfig");
    sym(&l.api.CommGetAsyncError, "ncclCommGetAsyncError");
    sym(&l.api.CommAbort, "ncclCommAbort");
    sym(&l.api.Send, "ncclSend");
    sym(&l.api.Recv, "ncclRecv");
    // On failure the handle stays open: a half-usable library is not retried, and dlclose of
    // NCCL (which may have started threads) is not worth the risk.
    return l;
}
#endif  // MM_CUDA_EMULATION

}  // namespace

const NcclApi* nccl_api(std::string* why) {
    static const Loaded loaded = load();
    if (!loaded.error.empty()) {
        if (why) *why = loaded.error;
        return nullptr;
    }
    return &loaded.api;
}

}  // namespace moemesh
#endif  // MOEMESH_HAVE_NCCL
