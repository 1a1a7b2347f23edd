// Out-of-band data planes between a coordinator and one worker of the same host (docs/cuda.md,
// "Transports"): shm (POSIX shared memory), cuda-ipc (the coordinator's device buffer opened by
// the worker) and nccl (a 2-rank communicator per pair). The activations and the partial sums
// travel through the plane; the gRPC ExpertCall / ExpertResult carry only the metadata (layer,
// n_rows, pairs) and are the synchronisation:
//
//   coordinator                                  worker
//   put(x rows) ─ shm/ipc: copy into region      
//               ─ nccl: ncclSend(x)              
//   Write(ExpertCall{out_of_band})  ───────────▶ Read(call)
//                                                activations(n_rows)  ─ nccl: ncclRecv(x)
//                                                compute → partial
//                                                publish(n_rows)      ─ shm/ipc: into region; nccl: ncclSend
//   Read(ExpertResult{out_of_band}) ◀─────────── Write(result)
//   get(partial rows) ─ nccl: ncclRecv           (a failed call publishes nothing; the coordinator
//                                                 then reads nothing)
//
// In place: a worker computing with CudaExpertCompute on the device that holds the plane's buffers
// (in_place_on(): nccl, its own buffers on the offer's worker device; cuda-ipc, the coordinator's
// region when the driver puts it on that same device) skips the host: device_activations() →
// compute_device(x, partial = device_partial(), stream()) → publish_device(). nccl orders all three
// on the plane's stream (recv → compute → send); cuda-ipc synchronizes it before the result is written.
// Anything else (a CPU worker, another device, shm) uses activations() / partial_buffer() / publish().
//
// Buffer layout of the shm and cuda-ipc region, f32, row-major:
//   [0, max_rows × hidden)                 x        rows 0..n_rows-1 of the call
//   [max_rows × hidden, 2 × max_rows × hidden)   partial  rows 0..n_rows-1 of the result
// The coordinator creates the region (sizes from the handshake's max_rows × hidden) and sends
// calls of at most max_rows rows; the worker refuses offers larger than kMaxDataPlaneBytes.
// This file is the worker's end; coordinator/data_plane.h is the coordinator's.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/moemesh.pb.h"

namespace moemesh {

constexpr int64_t kMaxDataPlaneRows = 65536;           // as placement's data_plane_rows limit
constexpr uint64_t kMaxDataPlaneBytes = 4ull << 30;    // one region (x + partial)

// 2 × max_rows × hidden × sizeof(float).
inline uint64_t data_plane_region_bytes(int64_t max_rows, int64_t hidden) {
    return 2ull * static_cast<uint64_t>(max_rows) * static_cast<uint64_t>(hidden) * sizeof(float);
}
const char* data_plane_kind_name(int kind);  // "shm", "cuda-ipc", "nccl", "none"

// Sizes and fields of an offer against the model's hidden size: "" or why it is refused.
std::string check_data_plane_offer(const v1::DataPlaneOffer& o, int64_t hidden);

class WorkerDataPlane {
public:
    // Opens the worker's end (cuda-ipc, nccl: on the offer's worker_device, from the YAML).
    // nccl: returns at once; the communicator joins in the background (the coordinator joins
    // after reading the handshake's answer) and the first activations() waits for it.
    static StatusOr<std::unique_ptr<WorkerDataPlane>> open(const v1::DataPlaneOffer& offer, int64_t hidden);
    virtual ~WorkerDataPlane() = default;
    virtual const char* kind() const = 0;
    int64_t max_rows() const { return max_rows_; }
    int64_t hidden() const { return hidden_; }
    virtual int device() const { return -1; }  // CUDA device of the plane's buffers; -1: host memory

    // The call's activations [n_rows, hidden] f32 in host memory: the region itself (shm) or
    // *scratch filled from the device (cuda-ipc, nccl). Called once for every out-of-band call,
    // before anything else is checked, so that nccl's send/recv pairs stay matched.
    virtual StatusOr<const float*> activations(int64_t n_rows, std::vector<float>* scratch) = 0;
    // Where the partial sums [n_rows, hidden] are to be written in host memory (the region for
    // shm, *scratch otherwise), and publish() hands them to the coordinator.
    virtual float* partial_buffer(int64_t n_rows, std::vector<float>* scratch) = 0;
    virtual Status publish(int64_t n_rows, const float* partial) = 0;

    // The CUDA device whose memory holds the buffers (nccl: device(); cuda-ipc: the coordinator's
    // region, as the driver reports it); -1: host memory, or not known.
    virtual int buffer_device() const { return -1; }
    // "" when a worker computing on CUDA device compute_device (-1: the CPU) can use the buffers in
    // place, else why the rows go through host memory.
    std::string in_place_on(int compute_device) const;
    // In place only (in_place_on() == ""). The call's activations [n_rows, hidden] f32 in device
    // memory, ready on stream() (nccl: the receive is queued there; called once per call, like
    // activations()); where the partial sums go; the stream (a cudaStream_t) to compute on; and the
    // hand-over once they are computed on it (nccl: the send queued behind them; cuda-ipc: the stream
    // synchronized, since the gRPC result is the coordinator's signal).
    virtual StatusOr<const float*> device_activations(int64_t n_rows);
    virtual float* device_partial() { return nullptr; }
    virtual void* stream() const { return nullptr; }
    virtual Status publish_device(int64_t n_rows);
    // Which of the two paths serve_call takes for this plane: set once at the handshake, before
    // the plane is shared.
    void use_in_place(bool on) { in_place_ = on; }
    bool in_place() const { return in_place_; }
    // After an error that may have broken the pairing (nccl): the plane refuses further calls.
    bool broken() const { return !broken_.empty(); }
    const std::string& broken_reason() const { return broken_; }

protected:
    WorkerDataPlane(int64_t max_rows, int64_t hidden) : max_rows_(max_rows), hidden_(hidden) {}
    Status check_rows(int64_t n_rows) const;
    int64_t max_rows_, hidden_;
    std::string broken_;
    bool in_place_ = false;
};

// The worker's side of a handshake that offers a data plane: opens it and fills *answer
// (accepted, or refused with the reason). Null when refused; the handshake itself goes on.
std::shared_ptr<WorkerDataPlane> answer_data_plane_offer(const v1::DataPlaneOffer& offer, int64_t hidden,
                                                         v1::DataPlaneAnswer* answer);

}  // namespace moemesh
