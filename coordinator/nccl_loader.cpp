#include "coordinator/nccl_loader.h"

#ifdef MOEMESH_HAVE_NCCL
#include <string>
#include <type_traits>

#include "common/dynlib.h"
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
Loaded load() {
    Loaded l;
    DynLib lib;
    std::string tried;
    if (!dynlib_open({"libnccl.so.2", "libnccl.so"}, &lib, &tried)) {
        l.error = "cannot load NCCL (" + tried + "); install NCCL or put the directory of libnccl.so.2 on LD_LIBRARY_PATH";
        return l;
    }
    auto sym = [&](auto* fn, const char* symbol) {
        std::string why;
        if (l.error.empty() && !dynlib_bind(lib, fn, symbol, &why))
            l.error = str_printf("%s has no %s (%s); the nccl transport needs NCCL 2.14 or newer", lib.name.c_str(),
                                 symbol, why.c_str());
    };
    sym(&l.api.GetErrorString, "ncclGetErrorString");
    sym(&l.api.GetUniqueId, "ncclGetUniqueId");
    sym(&l.api.CommInitRank, "ncclCommInitRank");
    sym(&l.api.CommInitRankConfig, "ncclCommInitRankConfig");
    sym(&l.api.CommGetAsyncError, "ncclCommGetAsyncError");
    sym(&l.api.CommAbort, "ncclCommAbort");
    sym(&l.api.Send, "ncclSend");
    sym(&l.api.Recv, "ncclRecv");
    return l;  // on failure the library stays open (common/dynlib.h)
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
