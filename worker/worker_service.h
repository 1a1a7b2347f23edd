// The worker process's gRPC service (moemesh.v1.ExpertWorker) and server.
//
// A coordinator talks to a worker in this order:
//   1. Handshake: protocol version, model fingerprint, the worker's name and its shard. Refused
//      (accepted = false, reason) on any mismatch; accepted otherwise, and the shard starts loading
//      in the background (the same shard again — a reconnecting coordinator — is kept, not reloaded;
//      a different shard replaces it).
//   2. Health until ready (loaded_bytes / shard_bytes show progress).
//   3. Experts: one long-lived stream; one ExpertResult per ExpertCall, in order, same request_id.
//      A bad call gets a result with `error` set; the stream stays up.
// Drain stops new work (calls are answered with an error); Shutdown drains and stops the server.
//
// Where the experts live (WorkerOptions::device, `moemesh-worker --device`): cpu (ExpertCompute over
// a ShardStore or an ExpertCache in RAM) or cuda:N (CudaExpertCompute: the shard resident in VRAM,
// or an ExpertCache with a VRAM tier over pinned RAM). The cache comes from the handshake's
// CacheConfig (the placement YAML's `cache:`) when the coordinator sends one, else from the worker's
// own flags (WorkerOptions::cache: --device-budget, --host-budget, ...), else there is none and the
// whole shard is loaded.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "kernels/ops.h"
#include "proto/moemesh.grpc.pb.h"
#include "worker/expert_cache.h"
#include "worker/cuda_expert_compute.h"
#include "worker/data_plane.h"
#include "worker/expert_compute.h"
#include "worker/shard_store.h"

namespace moemesh {

constexpr uint32_t kWorkerProtocolVersion = v1::PROTOCOL_VERSION_CURRENT;
constexpr int kWorkerMaxMessageBytes = 512 << 20;

struct WorkerOptions {
    std::string model_path;
    std::string listen;  // "unix:/path/sock" or "host:port" (empty host: 127.0.0.1; port 0: any free port)
    std::string name;
    int threads = 0;     // compute threads; <= 0: all hardware threads
    std::string tls_cert, tls_key;  // PEM files; both or neither
    std::string tls_ca;             // PEM file: require client certificates signed by this CA
    std::string device = "cpu";     // cpu | cuda:N: where the experts are computed (checked at start)
    std::optional<CacheOptions> cache;  // used when the handshake carries no cache config
};

// The worker's own cache flags → CacheOptions (nullopt: no flag given). Sizes as in the YAML
// ("6GiB"); policy/prefetch/profile without --device-budget or --host-budget are an error.
// --device-budget auto (gpu: the worker's --device is cuda:N): the VRAM free when the cache is made,
// less kAutoDeviceScratch, at most the shard; on the CPU an error.
StatusOr<std::optional<CacheOptions>> worker_cache_from_flags(const std::string& device_budget,
                                                              const std::string& host_budget,
                                                              const std::string& policy, const std::string& prefetch,
                                                              const std::string& profile,
                                                              const std::string& storage = "", bool gpu = false);

class WorkerService final : public v1::ExpertWorker::Service {
public:
    // device: -1 cpu, else the CUDA device index. default_cache: the cache when a handshake has none.
    WorkerService(std::string name, std::unique_ptr<GgufFile> file, ModelConfig cfg, int threads, int device = -1,
                  std::optional<CacheOptions> default_cache = std::nullopt);
    ~WorkerService() override;

    grpc::Status Handshake(grpc::ServerContext* ctx, const v1::HandshakeRequest* req,
                           v1::HandshakeResponse* resp) override;
    grpc::Status Health(grpc::ServerContext* ctx, const v1::HealthRequest* req, v1::HealthResponse* resp) override;
    grpc::Status Stats(grpc::ServerContext* ctx, const v1::StatsRequest* req, v1::StatsResponse* resp) override;
    grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req, v1::DrainResponse* resp) override;
    grpc::Status Shutdown(grpc::ServerContext* ctx, const v1::ShutdownRequest* req,
                          v1::ShutdownResponse* resp) override;
    grpc::Status Experts(grpc::ServerContext* ctx,
                         grpc::ServerReaderWriter<v1::ExpertResult, v1::ExpertCall>* stream) override;

    const std::string& name() const { return name_; }
    const std::string& fingerprint() const { return fingerprint_; }
    const ModelConfig& config() const { return cfg_; }
    int device() const { return device_; }  // -1: cpu

    // Drains and wakes wait_for_shutdown_request(). Thread-safe (signal thread, Shutdown RPC, tests).
    void request_shutdown(const std::string& why);
    void wait_for_shutdown_request();
    void log(const char* fmt, ...) const __attribute__((format(printf, 2, 3)));  // "moemesh-worker NAME: ..."

private:
    enum class LoadState { kNone, kLoading, kReady, kFailed };

    // Refusal reason, or "" when the request is acceptable. Fills *spec with the normalized shard.
    std::string check_handshake(const v1::HandshakeRequest& req, ShardSpec* spec) const;
    // Serves one call; returns the error to send back, or "" with res->partial filled.
    std::string serve_call(grpc::ServerContext* ctx, const v1::ExpertCall& call, v1::ExpertResult* res,
                           std::vector<float>* x, std::vector<float>* y);
    // Waits while the shard loads; "" when ready to compute.
    std::string wait_ready(grpc::ServerContext* ctx);
    void load_shard(std::shared_ptr<ShardStore> store);
    void warm_cache(std::shared_ptr<ExpertCache> cache);
    // The shard cannot be served: records the load failure (caller holds mu_), logs it, and answers
    // the handshake with accepted = false and the reason.
    grpc::Status refuse_handshake(grpc::ServerContext* ctx, const std::string& why, v1::HandshakeResponse* resp);
    StatusOr<CacheOptions> cache_options(const v1::CacheConfig& c) const;
    // cuda:N: builds the CudaExpertCompute (copies the shard to VRAM, or warms the cache) in the loader.
    void load_cuda(uint64_t generation, ShardSpec spec, std::optional<CacheOptions> cache);

    const std::string name_;
    const std::unique_ptr<GgufFile> file_;
    const ModelConfig cfg_;
    const std::string fingerprint_;
    const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
    const int device_;                            // -1: cpu
    const std::optional<CacheOptions> default_cache_;
    ThreadPool pool_;

    std::mutex handshake_mu_;  // one handshake at a time (shard replacement joins the loader)

    // Shard state. Lock order: compute_mu_ before mu_.
    std::mutex mu_;
    std::condition_variable cv_;
    bool handshaken_ = false;
    bool draining_ = false;
    bool shutdown_requested_ = false;
    ShardSpec shard_;
    std::shared_ptr<ShardStore> store_;  // loading or loaded (no cache: the whole shard in memory)
    std::shared_ptr<ExpertCache> cache_; // or: the shard served from a budgeted cache (handshake's cache)
    std::string cache_config_;           // the handshake's CacheConfig, serialized (same config: kept)
    uint64_t cuda_generation_ = 0;       // cuda:N: which handshake the loader builds for (0: none)
    uint64_t cuda_shard_bytes_ = 0;
    LoadState load_state_ = LoadState::kNone;
    std::string load_error_;
    // The out-of-band data plane (shm, cuda-ipc, nccl) the last handshake negotiated; null: none.
    std::shared_ptr<WorkerDataPlane> data_plane_;
    std::thread loader_;

    // ExpertCompute has scratch buffers: one call computes at a time, across all streams.
    std::mutex compute_mu_;
    std::shared_ptr<ShardStore> compute_store_;  // keeps the tables' bytes alive
    std::unique_ptr<ExpertCompute> compute_;
    std::unique_ptr<CudaExpertCompute> cuda_;  // cuda:N instead of compute_

    std::atomic<uint64_t> calls_{0}, rows_{0}, pairs_{0}, errors_{0}, bytes_in_{0}, bytes_out_{0};
    std::atomic<uint64_t> busy_ns_{0};
};

// A running worker: the service behind a gRPC server listening on one address.
class WorkerServer {
public:
    // Opens and validates the model, binds the address and starts serving. Prints
    // "moemesh-worker NAME listening on ADDR (model FINGERPRINT)" to stderr when ready.
    static StatusOr<std::unique_ptr<WorkerServer>> start(const WorkerOptions& opts);
    ~WorkerServer();

    const std::string& address() const { return address_; }  // as bound (port 0 resolved)
    WorkerService& service() { return *service_; }
    void request_shutdown(const std::string& why) { service_->request_shutdown(why); }
    // Blocks until shutdown is requested (Shutdown RPC, request_shutdown), then stops the server:
    // in-flight calls get a short grace period, then are cancelled.
    void wait();

private:
    WorkerServer() = default;
    std::unique_ptr<WorkerService> service_;
    std::unique_ptr<grpc::Server> server_;
    std::string address_;
    bool stopped_ = false;
};

// main(): start the server, stop it cleanly on SIGINT/SIGTERM or the Shutdown RPC.
Status run_worker_server(const WorkerOptions& opts);

// Resident set size of this process in bytes (/proc/self/statm).
uint64_t current_rss_bytes();

}  // namespace moemesh
