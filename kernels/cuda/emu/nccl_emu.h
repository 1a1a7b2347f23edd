// NCCL for the CUDA emulator (kernels/cuda/emu/cuda_emu.h): the point-to-point subset the nccl data
// plane uses (coordinator/nccl_loader.h's table), between processes of one machine over a Unix socket.
// - ncclGetUniqueId opens a listening socket (abstract namespace) and names it in the id, as NCCL's
//   bootstrap does; ncclCommInitRank(Config) connects rank 1 to rank 0 (2-rank communicators only),
//   blocking, or in the background with config.blocking = 0 (ncclCommGetAsyncError: ncclInProgress
//   until joined).
// - ncclSend / ncclRecv are stream operations. A send copies the buffer when it runs and hands it to
//   the communicator's sender thread, so it never blocks the stream; a receive reads exactly its bytes
//   (a peer that closes or stays silent for 60 s breaks the communicator: ncclRemoteError). Since the
//   emulator's streams run only when waited for, and a GPU's run by themselves, a send first runs its
//   stream up to and including itself (the receive, the compute and the send of the worker's in-place
//   path then run there, in order).
// - Connections are lazy, as NCCL's are: a direction (rank a → rank b) connects when a has called
//   ncclSend and b ncclRecv for the first time, each on its host thread (the ranks announce it on a
//   second, control socket). Until then a blocking communicator's call blocks, and a nonblocking
//   one's returns ncclInProgress (ncclCommGetAsyncError too) and reaches its stream once connected.
//   So a rank whose first send waits for a receive that its peer posts only after hearing back over
//   another channel deadlocks here as it does with NCCL (seen on an H200 with NCCL 2.28).
// Built when nccl.h is found (its types and prototypes are the real ones; MM_EMU_HAVE_NCCL).
#pragma once
#include <nccl.h>

namespace mm_emu::nccl {

const char* GetErrorString(ncclResult_t r);
ncclResult_t GetUniqueId(ncclUniqueId* id);
ncclResult_t CommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t CommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config);
ncclResult_t CommGetAsyncError(ncclComm_t comm, ncclResult_t* state);
ncclResult_t CommAbort(ncclComm_t comm);
ncclResult_t Send(const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t s);
ncclResult_t Recv(void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t s);

}  // namespace mm_emu::nccl
