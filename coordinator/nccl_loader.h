// NCCL loaded at run time (dlopen), not linked: the binaries start where libnccl is not installed
// (it is 218 MB and only the nccl transport needs it), and `transport: nccl` says why it cannot be
// had instead. The types and the ncclConfig_t initializer come from nccl.h at build time; the
// functions from the library the process finds at run time (libnccl.so.2, else libnccl.so, on the
// loader's usual search path: LD_LIBRARY_PATH, ld.so.cache, ...).
// Both ends of the nccl data plane (coordinator/data_plane.cpp, worker/data_plane.cpp) use this one table.
#pragma once
#ifdef MOEMESH_HAVE_NCCL
#include <nccl.h>

#include <string>

namespace moemesh {

// Exactly the NCCL functions the data planes call.
struct NcclApi {
    decltype(&::ncclGetErrorString) GetErrorString;
    decltype(&::ncclGetUniqueId) GetUniqueId;
    decltype(&::ncclCommInitRank) CommInitRank;
    decltype(&::ncclCommInitRankConfig) CommInitRankConfig;  // NCCL 2.14+
    decltype(&::ncclCommGetAsyncError) CommGetAsyncError;
    decltype(&::ncclCommAbort) CommAbort;
    decltype(&::ncclSend) Send;
    decltype(&::ncclRecv) Recv;
};

// The process's NCCL, loaded on the first call (thread-safe; kept loaded until exit). Null when it
// cannot be loaded, with *why (if given) naming the library and dlerror()'s reason.
const NcclApi* nccl_api(std::string* why = nullptr);

}  // namespace moemesh
#endif  // MOEMESH_HAVE_NCCL
