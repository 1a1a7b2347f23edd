// Expert parallelism across worker processes: route → group by owner → dispatch → (workers
// compute) → combine. Each worker is reached through a WorkerLink: in-process, or gRPC over a Unix
// socket or TCP (optionally TLS), with the activations either in the messages or in an out-of-band
// data plane negotiated at the handshake (shm, cuda-ipc, nccl: coordinator/data_plane.h).
#pragma once
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "coordinator/expert_backend.h"
#include "kernels/ops.h"

namespace moemesh {

// One layer's work for one worker (buffer layouts as in proto/moemesh.proto ExpertCall).
struct ExpertBatch {
    uint64_t request_id = 0;
    uint64_t step = 0;
    int layer = 0;
    int64_t n_rows = 0;
    int64_t hidden = 0;
    std::vector<float> x;          // [n_rows, hidden]
    std::vector<int32_t> rows;     // [n_pairs] local row of each pair
    std::vector<int32_t> experts;  // [n_pairs]
    std::vector<float> weights;    // [n_pairs]
    std::vector<int64_t> global_row;  // [n_rows] row of the coordinator's batch
    // Device path (links whose data plane takes device pointers): x is empty and the rows are
    // device_x [n_rows, hidden] in the coordinator's GPU memory; the partial sums go to
    // device_partial [n_rows, hidden] there instead of receive()'s vector.
    const float* device_x = nullptr;
    float* device_partial = nullptr;
};

using LoadProgress = std::function<void(const std::string& worker, uint64_t loaded, uint64_t total)>;

class WorkerLink {
public:
    virtual ~WorkerLink() = default;
    virtual std::string describe() const = 0;  // "worker 'gpu0' (unix:/tmp/gpu0.sock)"
    // Handshake (version, model fingerprint, shard) and wait until the shard is loaded.
    virtual Status connect(std::chrono::milliseconds timeout, const LoadProgress& progress) = 0;
    virtual bool connected() const = 0;
    // How long connect() waits for the transport itself (not the shard load). Default 10 s.
    virtual void set_connect_wait(std::chrono::milliseconds) {}
    virtual void disconnect() = 0;
    virtual Status send(const ExpertBatch& b) = 0;
    // The partial sums [n_rows, hidden] of the batch sent with request_id, by the deadline.
    virtual Status receive(uint64_t request_id, std::chrono::steady_clock::time_point deadline,
                           std::vector<float>* partial) = 0;
    // The worker's expert-cache stats line ("" without a cache, or when it cannot be asked).
    virtual std::string cache_stats() { return ""; }
    // The out-of-band data plane in use ("shm", "cuda-ipc", "nccl"), or "" (activations in the
    // messages); its rows per call; whether send() takes ExpertBatch::device_x.
    virtual std::string data_plane() const { return ""; }
    virtual int64_t data_plane_rows() const { return 0; }
    virtual bool takes_device_pointers() const { return false; }
};

struct LinkStats {
    uint64_t calls = 0, failures = 0, reconnects = 0;
    double wait_seconds = 0;  // summed time from dispatch to result
};

class DistributedExpertBackend final : public ExpertBackend {
public:
    // Builds one link per worker of the cluster (inproc workers compute in this process).
    static StatusOr<std::unique_ptr<DistributedExpertBackend>> create(const ClusterConfig& cluster,
                                                                      const OwnershipMap& map, const GgufFile& file,
                                                                      const ModelConfig& cfg, ThreadPool& pool);
    // Connects every worker (in parallel), reporting shard-loading progress.
    Status connect_all(std::chrono::milliseconds timeout, const LoadProgress& progress);
    Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                       const float* weights, float* out) override;
    // True when every link is connected over cuda-ipc or nccl (the CUDA build).
    bool takes_device_pointers() const override;
    Status moe_forward_device(int layer, const float* d_x, int64_t n_rows, int64_t k, const int32_t* ids,
                              const float* weights, float* d_out, void* stream) override;
    // "w0: shm, w1: tcp" — what each link carries its activations over.
    std::string transports_line() const;
    std::string stats_line() const;
    ~DistributedExpertBackend() override;

private:
    DistributedExpertBackend(const ClusterConfig& c, const OwnershipMap& m, const ModelConfig& cfg)
        : cluster_(c), map_(m), cfg_(cfg) {}
    // One group of at most chunk_rows() rows (every out-of-band batch fits its plane).
    Status forward_rows(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                        const float* weights, float* out);
    int64_t chunk_rows() const;
    Status forward_rows_device(int layer, const float* d_x, int64_t n_rows, int64_t k, const int32_t* ids,
                               const float* weights, float* d_out, void* stream);
    // Worker w's result of request_id (when `sent` is ok), counted in its stats (a failure too).
    Status collect(int w, const Status& sent, uint64_t request_id, std::chrono::steady_clock::time_point deadline,
                   std::chrono::steady_clock::time_point t0, std::vector<float>* partial);
    bool usable(int w);  // connected, or reconnected now (at most every 250 ms)
    bool try_reconnect(int w, bool wait_for_lock);
    void reconnect_loop();

    ClusterConfig cluster_;
    OwnershipMap map_;
    ModelConfig cfg_;
    std::vector<std::unique_ptr<WorkerLink>> links_;
    std::vector<LinkStats> stats_;
    std::vector<std::chrono::steady_clock::time_point> last_attempt_;
    std::vector<std::unique_ptr<std::mutex>> connect_mu_;  // one connect() at a time per link
    mutable std::mutex stats_mu_;
    std::mutex reconnect_mu_;
    std::condition_variable reconnect_cv_;
    bool stop_ = false;
    std::thread reconnector_;
    std::vector<float*> device_partials_;  // [worker] device [data_plane_rows, H], device path only
    std::vector<float> staged_x_, staged_out_;  // device path falling back to host staging
    uint64_t next_request_ = 1;
    uint64_t step_ = 0;
};

}  // namespace moemesh
