// The coordinator's end of an out-of-band data plane (shm, cuda-ipc, nccl) to one worker; the
// protocol, the buffer layout and the worker's end are in worker/data_plane.h. A GrpcLink owns one
// and uses it for every call of at most max_rows rows:
//   create() → offer in the HandshakeRequest → the worker's answer → joined() →
//   per call: put(x) → Write(ExpertCall{out_of_band}) → Read(ExpertResult) → get(partial) when ok.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "common/placement.h"
#include "common/status.h"
#include "proto/moemesh.pb.h"

namespace moemesh {

class LinkDataPlane {
public:
    // Allocates the plane's buffers for calls of at most max_rows × hidden f32 and fills the
    // offer. coordinator_device / worker_device: CUDA device indices (cuda-ipc, nccl), else -1.
    static StatusOr<std::unique_ptr<LinkDataPlane>> create(Transport t, int64_t max_rows, int64_t hidden,
                                                           int coordinator_device, int worker_device,
                                                           const std::string& worker_name);
    // Whether this build can make a plane of this kind at all ("" if it can, else why not); nccl:
    // also whether libnccl.so.2 loads (coordinator/nccl_loader.h).
    static std::string unavailable(Transport t);
    virtual ~LinkDataPlane() = default;
    virtual const char* kind() const = 0;
    const v1::DataPlaneOffer& offer() const { return offer_; }
    int64_t max_rows() const { return max_rows_; }
    // cuda-ipc, nccl: put()/get() take pointers into the coordinator's device memory.
    virtual bool takes_device_pointers() const { return false; }

    // After the worker accepted the offer: shm unlinks the object's name (both ends have it
    // mapped, so nothing is left behind when either dies); nccl joins as rank 0, by the deadline.
    virtual Status joined(std::chrono::steady_clock::time_point deadline) { return Status(); }
    // The call's rows [n_rows, hidden] into the plane; before the call is written.
    virtual Status put(const float* x, int64_t n_rows, bool on_device) = 0;
    // The result's partial sums [n_rows, hidden] out of the plane; after an accepted result.
    virtual Status get(float* out, int64_t n_rows, bool on_device, std::chrono::steady_clock::time_point deadline) = 0;

protected:
    LinkDataPlane(int64_t max_rows, int64_t hidden) : max_rows_(max_rows), hidden_(hidden) {}
    Status check_rows(int64_t n_rows) const;
    v1::DataPlaneOffer offer_;
    int64_t max_rows_, hidden_;
};

}  // namespace moemesh
