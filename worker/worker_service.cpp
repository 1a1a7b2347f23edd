#include "worker/worker_service.h"

#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/half.h"
#include "common/placement.h"

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;

size_t dtype_size(v1::DType t) { return t == v1::DTYPE_BF16 ? 2 : 4; }
bool dtype_known(int t) { return t == v1::DTYPE_F32 || t == v1::DTYPE_BF16; }

StatusOr<std::string> read_pem(const std::string& path, const char* what) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return MM_ERROR("cannot read %s file '%s': %s", what, path.c_str(), std::strerror(errno));
    std::stringstream ss;
    ss << in.rdbuf();
    if (ss.str().empty()) return MM_ERROR("%s file '%s' is empty", what, path.c_str());
    return ss.str();
}

struct ListenAddress {
    std::string grpc;        // what grpc::ServerBuilder gets
    std::string unix_path;   // for unix: addresses
    std::string host;        // for TCP
    bool loopback = true;
};

StatusOr<ListenAddress> parse_listen(const std::string& s) {
    ListenAddress a;
    if (s.rfind("unix:", 0) == 0) {
        a.unix_path = s.substr(5);
        if (a.unix_path.rfind("//", 0) == 0) a.unix_path = a.unix_path.substr(2);
        if (a.unix_path.empty()) return MM_ERROR("--listen '%s': empty unix socket path", s.c_str());
        if (a.unix_path.size() >= sizeof(sockaddr_un::sun_path))
            return MM_ERROR("--listen '%s': unix socket path longer than %zu bytes", s.c_str(),
                            sizeof(sockaddr_un::sun_path) - 1);
        a.grpc = "unix:" + a.unix_path;
        return a;
    }
    const size_t colon = s.rfind(':');
    if (colon == std::string::npos)
        return MM_ERROR("--listen '%s': expected unix:/path/to/socket or host:port", s.c_str());
    std::string host = s.substr(0, colon);
    const std::string port = s.substr(colon + 1);
    char* end = nullptr;
    const long p = std::strtol(port.c_str(), &end, 10);
    if (port.empty() || *end != '\0' || p < 0 || p > 65535)
        return MM_ERROR("--listen '%s': port '%s' is not a number in 0-65535", s.c_str(), port.c_str());
    if (host.empty()) host = "127.0.0.1";
    const bool v6 = host.find(':') != std::string::npos;
    if (v6 && host.front() != '[') host = "[" + host + "]";
    a.host = host;
    a.loopback = host == "localhost" || host.rfind("127.", 0) == 0 || host == "[::1]";
    a.grpc = host + ":" + port;
    return a;
}

// A socket file left by a worker that died (SIGKILL) blocks the bind: remove it, but only when
// nobody accepts connections on it.
Status clear_stale_socket(const std::string& path) {
    struct stat st;
    if (lstat(path.c_str(), &st) != 0) return Status();
    if (!S_ISSOCK(st.st_mode)) return MM_ERROR("--listen unix:%s: the path exists and is not a socket", path.c_str());
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return MM_ERROR("socket(): %s", std::strerror(errno));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    const int rc = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
    const int err = errno;
    close(fd);
    if (rc == 0) return MM_ERROR("--listen unix:%s: another process is already listening there", path.c_str());
    if (err == ECONNREFUSED && unlink(path.c_str()) != 0)
        return MM_ERROR("--listen unix:%s: cannot remove the stale socket: %s", path.c_str(), std::strerror(errno));
    return Status();
}

// gRPC names a Unix-socket client "unix:" (the client end has no path).
std::string peer_of(grpc::ServerContext* ctx) {
    std::string p = ctx->peer();
    return p == "unix:" ? "a unix-socket client" : p;
}

}  // namespace

uint64_t current_rss_bytes() {
    std::ifstream in("/proc/self/statm");
    uint64_t size = 0, resident = 0;
    in >> size >> resident;
    return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// ---------------------------------------------------------------------------------------------
// WorkerService

StatusOr<std::optional<CacheOptions>> worker_cache_from_flags(const std::string& device_budget,
                                                              const std::string& host_budget,
                                                              const std::string& policy, const std::string& prefetch,
                                                              const std::string& profile,
                                                              const std::string& storage, bool gpu) {
    if (device_budget.empty() && host_budget.empty()) {
        if (!policy.empty() || !prefetch.empty() || !profile.empty() || !storage.empty())
            return MM_ERROR("--cache-policy, --prefetch, --profile and --storage need --device-budget or --host-budget");
        return std::optional<CacheOptions>();
    }
    CacheOptions o;
    if (device_budget == "auto") {
        if (!gpu)
            return MM_ERROR("--device-budget auto is for --device cuda:N (the VRAM free when the coordinator "
                            "connects, less %s of scratch); on the CPU give a size",
                            format_bytes(kAutoDeviceScratch).c_str());
        o.device_keep_free = kAutoDeviceScratch;  // device_bytes 0: CudaExpertCompute sizes the tier
    } else {
        MM_ASSIGN_OR_RETURN(o.device_bytes, parse_cache_budget(device_budget, "--device-budget"));
    }
    MM_ASSIGN_OR_RETURN(o.host_bytes, parse_cache_budget(host_budget, "--host-budget"));
    MM_ASSIGN_OR_RETURN(o.policy, parse_cache_policy(policy.empty() ? "lru" : policy));
    MM_ASSIGN_OR_RETURN(o.prefetch, parse_prefetch_mode(prefetch.empty() ? "none" : prefetch));
    {
        StatusOr<StorageMode> sm = parse_storage_mode(storage.empty() ? "auto" : storage);
        if (!sm.ok()) return MM_ERROR("--storage: %s", sm.status().message().c_str());
        o.storage = sm.value();
    }
    o.profile_path = profile;
    if (o.policy == CachePolicy::kStatic && profile.empty())
        return MM_ERROR("--cache-policy static needs --profile FILE (write one with `moemesh profile`)");
    if (!profile.empty()) {
        MM_ASSIGN_OR_RETURN(o.profile, load_expert_profile(profile));
    }
    return std::optional<CacheOptions>(std::move(o));
}

WorkerService::WorkerService(std::string name, std::unique_ptr<GgufFile> file, ModelConfig cfg, int threads,
                             int device, std::optional<CacheOptions> default_cache)
    : name_(std::move(name)),
      file_(std::move(file)),
      cfg_(std::move(cfg)),
      fingerprint_(file_->fingerprint()),
      device_(device),
      default_cache_(std::move(default_cache)),
      pool_(threads) {}

WorkerService::~WorkerService() {
    std::thread t;
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (store_) store_->cancel();
        t = std::move(loader_);
    }
    if (t.joinable()) t.join();
}

void WorkerService::log(const char* fmt, ...) const {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "moemesh-worker %s: %s\n", name_.c_str(), buf);
}

std::string WorkerService::check_handshake(const v1::HandshakeRequest& req, ShardSpec* spec) const {
    if (req.protocol_version() != kWorkerProtocolVersion)
        return str_printf("protocol version %u != worker's %u", req.protocol_version(), kWorkerProtocolVersion);
    if (req.model_fingerprint() != fingerprint_)
        return str_printf("model fingerprint mismatch: coordinator has %s, worker has %s (file %s)",
                          req.model_fingerprint().empty() ? "(none)" : req.model_fingerprint().c_str(),
                          fingerprint_.c_str(), file_->path().c_str());
    if (req.worker_name() != name_)
        return str_printf("worker name mismatch: coordinator expects '%s', this worker is '%s'",
                          req.worker_name().c_str(), name_.c_str());
    if (!dtype_known(req.activation_dtype()))
        return str_printf("unknown activation dtype %d (this worker knows f32 = 0, bf16 = 1)",
                          static_cast<int>(req.activation_dtype()));
    ShardSpec raw;
    for (const v1::LayerShard& ls : req.shard()) {
        if (ls.layer() >= cfg_.n_layer)
            return str_printf("shard names layer %u, the model has %lld layers (0-%lld)", ls.layer(),
                              static_cast<long long>(cfg_.n_layer), static_cast<long long>(cfg_.n_layer - 1));
        if (raw.size() <= ls.layer()) raw.resize(ls.layer() + 1);
        for (uint32_t e : ls.experts()) {
            if (e >= cfg_.n_expert)
                return str_printf("shard names expert %u in layer %u, the model has %lld experts per layer (0-%lld)",
                                  e, ls.layer(), static_cast<long long>(cfg_.n_expert),
                                  static_cast<long long>(cfg_.n_expert - 1));
            raw[ls.layer()].push_back(static_cast<int>(e));
        }
    }
    StatusOr<ShardSpec> norm = normalize_shard(raw, cfg_);
    if (!norm.ok()) return norm.status().message();
    *spec = std::move(norm).value();
    return "";
}

grpc::Status WorkerService::Handshake(grpc::ServerContext* ctx, const v1::HandshakeRequest* req,
                                      v1::HandshakeResponse* resp) {
    std::lock_guard<std::mutex> hs(handshake_mu_);
    resp->set_protocol_version(kWorkerProtocolVersion);
    resp->set_model_fingerprint(fingerprint_);
    resp->set_worker_name(name_);
    ShardSpec spec;
    std::string why = check_handshake(*req, &spec);
    if (why.empty()) {
        std::lock_guard<std::mutex> lk(mu_);
        if (draining_) why = "worker is draining (shutting down): not accepting coordinators";
    }
    if (!why.empty()) {
        log("refused handshake from %s: %s", peer_of(ctx).c_str(), why.c_str());
        resp->set_accepted(false);
        resp->set_reason(why);
        return grpc::Status::OK;
    }
    {
        // The data plane belongs to this coordinator: opened now; a refusal is answered in
        // resp.data_plane and leaves the handshake itself accepted (the coordinator decides).
        std::shared_ptr<WorkerDataPlane> plane;
        if (req->has_data_plane()) {
            plane = answer_data_plane_offer(req->data_plane(), cfg_.n_embd, resp->mutable_data_plane());
            if (plane) {
                // A GPU plane on this worker's compute device is used in place (no host copies).
                const std::string staged = plane->in_place_on(device_);
                plane->use_in_place(plane->device() >= 0 && staged.empty());
                const std::string how = plane->device() < 0 ? ""
                                        : staged.empty()    ? str_printf(", in place on cuda:%d", device_)
                                                            : ", staged through host memory: " + staged;
                log("data plane %s from %s: %u rows x %lld%s", plane->kind(), peer_of(ctx).c_str(),
                    req->data_plane().max_rows(), static_cast<long long>(cfg_.n_embd), how.c_str());
            } else
                log("refused the data plane of %s: %s", peer_of(ctx).c_str(), resp->data_plane().reason().c_str());
        }
        std::lock_guard<std::mutex> lk(mu_);
        data_plane_ = std::move(plane);
    }
    std::thread old_loader;
    {
        std::lock_guard<std::mutex> ck(compute_mu_);
        std::lock_guard<std::mutex> lk(mu_);
        handshaken_ = true;
        const std::string cache_config = req->has_cache() ? req->cache().SerializeAsString() : "";
        if ((store_ || cache_ || cuda_generation_) && shard_ == spec && cache_config_ == cache_config &&
            (load_state_ == LoadState::kLoading || load_state_ == LoadState::kReady)) {
            log("handshake from %s accepted: same shard (%s), %s", peer_of(ctx).c_str(), shard_summary(spec).c_str(),
                load_state_ == LoadState::kReady ? "already loaded" : "still loading");
            resp->set_accepted(true);
            resp->set_shard_bytes(store_ ? store_->total_bytes() : cache_ ? cache_->shard_bytes() : cuda_shard_bytes_);
            return grpc::Status::OK;
        }
        cache_config_ = cache_config;
        // A different shard (or a failed load): drop the old one before allocating the new one.
        if (store_) store_->cancel();
        old_loader = std::move(loader_);
        compute_.reset();
        cuda_.reset();
        compute_store_.reset();
        store_.reset();
        cache_.reset();
        cuda_generation_ = 0;
        shard_ = spec;
        load_state_ = LoadState::kLoading;  // callers wait across the swap
        load_error_.clear();
    }
    if (old_loader.joinable()) old_loader.join();
    // The cache: the coordinator's (placement YAML) first, else the worker's own flags.
    std::optional<CacheOptions> cache_opts;
    std::string cache_from = "the handshake";
    if (req->has_cache()) {
        StatusOr<CacheOptions> co = cache_options(req->cache());
        if (co.ok()) {
            cache_opts = std::move(co).value();
        } else {
            std::lock_guard<std::mutex> lk(mu_);
            load_state_ = LoadState::kFailed;
            load_error_ = co.status().message();
            cache_config_.clear();
            cv_.notify_all();
            log("refused handshake from %s: %s", peer_of(ctx).c_str(), load_error_.c_str());
            resp->set_accepted(false);
            resp->set_reason(load_error_);
            return grpc::Status::OK;
        }
    } else if (default_cache_) {
        cache_opts = default_cache_;
        cache_from = "the worker's flags";
    }
    if (device_ >= 0) {
        // cuda:N: the shard to VRAM (or the cache built and warmed) in the background.
        StatusOr<std::unique_ptr<ShardStore>> planned = ShardStore::plan(*file_, cfg_, spec);
        std::lock_guard<std::mutex> lk(mu_);
        if (!planned.ok()) return refuse_handshake(ctx, planned.status().message(), resp);
        static std::atomic<uint64_t> generations{0};
        cuda_generation_ = ++generations;
        cuda_shard_bytes_ = planned.value()->total_bytes();
        log("handshake from %s accepted: cuda:%d, %s, %.1f MiB, %s", peer_of(ctx).c_str(), device_,
            shard_summary(spec).c_str(), static_cast<double>(cuda_shard_bytes_) / (1 << 20),
            cache_opts ? ("from a VRAM cache (" + cache_from + ")").c_str() : "resident in VRAM");
        loader_ = std::thread(&WorkerService::load_cuda, this, cuda_generation_, spec, cache_opts);
        resp->set_accepted(true);
        resp->set_shard_bytes(cuda_shard_bytes_);
        return grpc::Status::OK;
    }
    if (cache_opts) {
        // Budgets, policy and profile from the coordinator's placement or the worker's flags; nothing
        // is read until used (or, for static, the hot set in the background).
        StatusOr<std::shared_ptr<ExpertCache>> made = ExpertCache::create(*file_, cfg_, spec, *cache_opts);
        std::lock_guard<std::mutex> lk(mu_);
        if (!made.ok()) {
            cache_config_.clear();
            return refuse_handshake(ctx, made.status().message(), resp);
        }
        cache_ = made.value();
        const CacheOptions& co = cache_->options();
        log("handshake from %s accepted: serving %s, %.1f MiB, from a cache (device %s, host %s, policy %s, prefetch "
            "%s; from %s)",
            peer_of(ctx).c_str(), shard_summary(spec).c_str(), static_cast<double>(cache_->shard_bytes()) / (1 << 20),
            co.device_bytes ? format_bytes(co.device_bytes).c_str() : "unlimited",
            co.host_bytes ? format_bytes(co.host_bytes).c_str() : "none", cache_policy_name(co.policy),
            prefetch_mode_name(co.prefetch), cache_from.c_str());
        loader_ = std::thread(&WorkerService::warm_cache, this, cache_);
        resp->set_accepted(true);
        resp->set_shard_bytes(cache_->shard_bytes());
        return grpc::Status::OK;
    }
    StatusOr<std::unique_ptr<ShardStore>> planned = ShardStore::plan(*file_, cfg_, spec);
    std::lock_guard<std::mutex> lk(mu_);
    if (!planned.ok()) return refuse_handshake(ctx, planned.status().message(), resp);
    store_ = std::shared_ptr<ShardStore>(std::move(planned).value());
    log("handshake from %s accepted: loading %s, %.1f MiB", peer_of(ctx).c_str(), shard_summary(spec).c_str(),
        static_cast<double>(store_->total_bytes()) / (1 << 20));
    loader_ = std::thread(&WorkerService::load_shard, this, store_);
    resp->set_accepted(true);
    resp->set_shard_bytes(store_->total_bytes());
    return grpc::Status::OK;
}

void WorkerService::load_shard(std::shared_ptr<ShardStore> store) {
    const auto t0 = Clock::now();
    Status st = store->load();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::lock_guard<std::mutex> ck(compute_mu_);
    std::lock_guard<std::mutex> lk(mu_);
    if (store_ != store) return;  // replaced by a newer handshake meanwhile
    if (st.ok()) {
        compute_ = std::make_unique<ExpertCompute>(cfg_, pool_, store->tables());
        compute_store_ = store;
        load_state_ = LoadState::kReady;
        log("shard loaded: %.1f MiB in %.2f s, RSS %.1f MiB", static_cast<double>(store->total_bytes()) / (1 << 20),
            secs, static_cast<double>(current_rss_bytes()) / (1 << 20));
    } else {
        load_state_ = LoadState::kFailed;
        load_error_ = st.message();
        log("shard load failed: %s", st.message().c_str());
    }
    cv_.notify_all();
}

grpc::Status WorkerService::refuse_handshake(grpc::ServerContext* ctx, const std::string& why,
                                             v1::HandshakeResponse* resp) {
    load_state_ = LoadState::kFailed;
    load_error_ = why;
    cv_.notify_all();
    log("refused handshake from %s: %s", peer_of(ctx).c_str(), load_error_.c_str());
    resp->set_accepted(false);
    resp->set_reason(load_error_);
    return grpc::Status::OK;
}

StatusOr<CacheOptions> WorkerService::cache_options(const v1::CacheConfig& c) const {
    CacheOptions o;
    o.device_bytes = c.device_bytes();
    o.host_bytes = c.host_bytes();
    MM_ASSIGN_OR_RETURN(o.policy, parse_cache_policy(c.policy().empty() ? "lru" : c.policy()));
    MM_ASSIGN_OR_RETURN(o.prefetch, parse_prefetch_mode(c.prefetch().empty() ? "none" : c.prefetch()));
    MM_ASSIGN_OR_RETURN(o.storage, parse_storage_mode(c.storage().empty() ? "auto" : c.storage()));
    if (!c.profile_json().empty()) {
        MM_ASSIGN_OR_RETURN(o.profile, parse_expert_profile(c.profile_json(), "the handshake's expert profile"));
    }
    return o;
}

void WorkerService::load_cuda(uint64_t generation, ShardSpec spec, std::optional<CacheOptions> cache) {
    const auto t0 = Clock::now();
    StatusOr<std::unique_ptr<CudaExpertCompute>> made =
        CudaExpertCompute::create(*file_, cfg_, spec, device_, cache ? &*cache : nullptr);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::lock_guard<std::mutex> ck(compute_mu_);
    std::lock_guard<std::mutex> lk(mu_);
    if (cuda_generation_ != generation) return;  // replaced by a newer handshake meanwhile
    if (made.ok()) {
        cuda_ = std::move(made).value();
        load_state_ = LoadState::kReady;
        log("cuda:%d ready in %.2f s: %s, VRAM %.1f MiB, RSS %.1f MiB", device_, secs, cuda_->stats_line().c_str(),
            static_cast<double>(cuda_->vram_bytes()) / (1 << 20), static_cast<double>(current_rss_bytes()) / (1 << 20));
    } else {
        load_state_ = LoadState::kFailed;
        load_error_ = made.status().message();
        log("cuda:%d: shard load failed: %s", device_, load_error_.c_str());
    }
    cv_.notify_all();
}

void WorkerService::warm_cache(std::shared_ptr<ExpertCache> cache) {
    const auto t0 = Clock::now();
    Status st = cache->warm_up();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::lock_guard<std::mutex> ck(compute_mu_);
    std::lock_guard<std::mutex> lk(mu_);
    if (cache_ != cache) return;  // replaced by a newer handshake meanwhile
    if (st.ok()) {
        compute_ = std::make_unique<ExpertCompute>(cfg_, pool_, cache);
        load_state_ = LoadState::kReady;
        log("cache ready: hot set %.1f MiB in %.2f s, RSS %.1f MiB", static_cast<double>(cache->hot_set_bytes()) / (1 << 20),
            secs, static_cast<double>(current_rss_bytes()) / (1 << 20));
    } else {
        load_state_ = LoadState::kFailed;
        load_error_ = st.message();
        log("cache warm-up failed: %s", st.message().c_str());
    }
    cv_.notify_all();
}

grpc::Status WorkerService::Health(grpc::ServerContext*, const v1::HealthRequest*, v1::HealthResponse* resp) {
    std::lock_guard<std::mutex> lk(mu_);
    resp->set_worker_name(name_);
    resp->set_ready(handshaken_ && load_state_ == LoadState::kReady && !draining_);
    resp->set_draining(draining_);
    if (load_state_ == LoadState::kFailed) resp->set_load_error(load_error_);
    if (store_) {
        resp->set_loaded_bytes(store_->loaded_bytes());
        resp->set_shard_bytes(store_->total_bytes());
    } else if (cache_) {
        resp->set_loaded_bytes(load_state_ == LoadState::kReady ? cache_->shard_bytes() : 0);
        resp->set_shard_bytes(cache_->shard_bytes());
    } else if (cuda_generation_) {
        resp->set_loaded_bytes(load_state_ == LoadState::kReady ? cuda_shard_bytes_ : 0);
        resp->set_shard_bytes(cuda_shard_bytes_);
    }
    resp->set_uptime_ms(static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_).count()));
    return grpc::Status::OK;
}

grpc::Status WorkerService::Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse* resp) {
    resp->set_worker_name(name_);
    resp->set_calls(calls_.load());
    resp->set_rows(rows_.load());
    resp->set_pairs(pairs_.load());
    resp->set_errors(errors_.load());
    resp->set_busy_seconds(static_cast<double>(busy_ns_.load()) * 1e-9);
    resp->set_rss_bytes(current_rss_bytes());
    resp->set_bytes_in(bytes_in_.load());
    resp->set_bytes_out(bytes_out_.load());
    std::lock_guard<std::mutex> lk(mu_);
    if (store_) resp->set_shard_bytes(store_->total_bytes());
    if (cuda_generation_) resp->set_shard_bytes(cuda_shard_bytes_);
    ExpertCache* cache = cache_ ? cache_.get() : cuda_ ? cuda_->cache() : nullptr;
    if (cuda_) resp->set_cache_summary(cuda_->stats_line());  // VRAM use, resident or cached
    if (cache) {
        if (cache_) resp->set_shard_bytes(cache_->shard_bytes());
        for (const TierStats& t : cache->tier_stats()) {
            v1::CacheTierStats* p = resp->add_cache_tiers();
            p->set_name(t.name);
            p->set_budget_bytes(t.budget);
            p->set_used_bytes(t.used);
            p->set_peak_used_bytes(t.peak_used);
            p->set_hits(t.hits);
            p->set_misses(t.misses);
            p->set_coalesced(t.coalesced);
            p->set_fills(t.fills);
            p->set_bytes_in(t.bytes_in);
            p->set_evictions(t.evictions);
            p->set_errors(t.errors);
            p->set_fill_seconds(t.fill_seconds);
            p->set_stall_seconds(t.stall_seconds);
        }
        if (!cuda_) resp->set_cache_summary(cache->stats_line());
    }
    return grpc::Status::OK;
}

grpc::Status WorkerService::Drain(grpc::ServerContext* ctx, const v1::DrainRequest*, v1::DrainResponse*) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!draining_) log("draining (requested by %s): new calls are refused", peer_of(ctx).c_str());
    draining_ = true;
    cv_.notify_all();
    return grpc::Status::OK;
}

grpc::Status WorkerService::Shutdown(grpc::ServerContext* ctx, const v1::ShutdownRequest*, v1::ShutdownResponse*) {
    request_shutdown("Shutdown requested by " + peer_of(ctx));
    return grpc::Status::OK;
}

void WorkerService::request_shutdown(const std::string& why) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!shutdown_requested_) log("%s: draining and stopping", why.c_str());
    draining_ = true;
    shutdown_requested_ = true;
    cv_.notify_all();
}

void WorkerService::wait_for_shutdown_request() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return shutdown_requested_; });
}

std::string WorkerService::wait_ready(grpc::ServerContext* ctx) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
        if (draining_) return "worker '" + name_ + "' is draining: call refused";
        if (!handshaken_) return "no accepted handshake: call Handshake before sending expert calls";
        if (load_state_ == LoadState::kReady) return "";
        if (load_state_ == LoadState::kFailed) return "the shard failed to load: " + load_error_;
        if (ctx->IsCancelled()) return "stream cancelled while the shard was loading";
        cv_.wait_for(lk, std::chrono::milliseconds(100));
    }
}

std::string WorkerService::serve_call(grpc::ServerContext* ctx, const v1::ExpertCall& call, v1::ExpertResult* res,
                                      std::vector<float>* x, std::vector<float>* y) {
    // Out of band: the rows come out of the data plane before anything else (nccl pairs each of
    // the coordinator's sends with a receive here, whatever becomes of the call). In place, xin and
    // yout are the plane's device buffers and the compute runs on the plane's stream.
    const float* xin = nullptr;
    std::shared_ptr<WorkerDataPlane> plane;
    bool in_place = false;
    if (call.out_of_band()) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            plane = data_plane_;
        }
        if (!plane) return "an out-of-band call, but no data plane was accepted at the handshake";
        if (call.hidden() != cfg_.n_embd)
            return str_printf("hidden %u != the model's %lld", call.hidden(), static_cast<long long>(cfg_.n_embd));
        in_place = plane->in_place();
        StatusOr<const float*> got =
            in_place ? plane->device_activations(call.n_rows()) : plane->activations(call.n_rows(), x);
        if (!got.ok()) return got.status().message();
        xin = got.value();
    }
    std::string why = wait_ready(ctx);
    if (!why.empty()) return why;
    const int64_t H = cfg_.n_embd;
    if (call.layer() >= cfg_.n_layer)
        return str_printf("layer %u out of range: the model has %lld layers", call.layer(),
                          static_cast<long long>(cfg_.n_layer));
    if (call.hidden() != H)
        return str_printf("hidden %u != the model's %lld", call.hidden(), static_cast<long long>(H));
    if (!dtype_known(call.dtype())) return str_printf("unknown dtype %d", static_cast<int>(call.dtype()));
    const int64_t n_rows = call.n_rows();
    const size_t esize = dtype_size(call.dtype());
    const uint64_t want = static_cast<uint64_t>(n_rows) * static_cast<uint64_t>(H) * esize;
    if (plane && call.dtype() != v1::DTYPE_F32) return "out-of-band calls carry f32 activations";
    if (!plane && call.activations().size() != want)
        return str_printf("activations are %zu bytes, expected n_rows %lld × hidden %lld × %zu = %llu",
                          call.activations().size(), static_cast<long long>(n_rows), static_cast<long long>(H), esize,
                          static_cast<unsigned long long>(want));
    const size_t nb = call.pair_rows().size();
    if (call.pair_experts().size() != nb || call.pair_weights().size() != nb || nb % 4 != 0)
        return str_printf("pair arrays are %zu/%zu/%zu bytes (rows/experts/weights): they must be equal and a "
                          "multiple of 4",
                          nb, call.pair_experts().size(), call.pair_weights().size());
    const int64_t n_pairs = static_cast<int64_t>(nb / 4);
    std::vector<int32_t> rows(static_cast<size_t>(n_pairs)), experts(static_cast<size_t>(n_pairs));
    std::vector<float> weights(static_cast<size_t>(n_pairs));
    std::memcpy(rows.data(), call.pair_rows().data(), nb);
    std::memcpy(experts.data(), call.pair_experts().data(), nb);
    std::memcpy(weights.data(), call.pair_weights().data(), nb);
    for (int64_t p = 0; p < n_pairs; ++p) {
        if (rows[p] < 0 || rows[p] >= n_rows)
            return str_printf("pair %lld: row %d out of range [0, %lld)", static_cast<long long>(p), rows[p],
                              static_cast<long long>(n_rows));
        if (experts[p] < 0 || experts[p] >= cfg_.n_expert)
            return str_printf("pair %lld: expert %d out of range [0, %lld)", static_cast<long long>(p), experts[p],
                              static_cast<long long>(cfg_.n_expert));
    }
    // Activations in the message → f32 (bf16 is widened exactly); out of band they are in xin.
    if (!plane) {
        x->resize(static_cast<size_t>(n_rows * H));
        if (call.dtype() == v1::DTYPE_BF16) {
            const auto* src = reinterpret_cast<const uint8_t*>(call.activations().data());
            for (size_t i = 0; i < x->size(); ++i) {
                uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                (*x)[i] = bf16_to_fp32(h);
            }
        } else if (!x->empty()) {
            std::memcpy(x->data(), call.activations().data(), want);
        }
        xin = x->data();
    }
    // shm: straight into the shared region (read by the coordinator only after our result).
    float* yout = nullptr;
    if (in_place) {
        yout = plane->device_partial();
    } else if (plane) {
        yout = plane->partial_buffer(n_rows, y);
    } else {
        y->resize(static_cast<size_t>(n_rows * H));
        yout = y->data();
    }
    for (;;) {
        std::unique_lock<std::mutex> ck(compute_mu_);
        if (!compute_ && !cuda_) {
            // A new handshake replaced the shard after wait_ready(): wait for the new one.
            ck.unlock();
            why = wait_ready(ctx);
            if (!why.empty()) return why;
            continue;
        }
        for (int64_t p = 0; p < n_pairs; ++p) {
            if (!(cuda_ ? cuda_->holds(static_cast<int>(call.layer()), experts[p])
                        : compute_->holds(static_cast<int>(call.layer()), experts[p])))
                return str_printf("pair %lld: expert %d of layer %u is not in this worker's shard",
                                  static_cast<long long>(p), experts[p], call.layer());
        }
        const auto t0 = Clock::now();
        const int layer = static_cast<int>(call.layer());
        Status st;
        if (in_place) {
            // in_place_on(device_) held: device_ >= 0, and a cuda:N worker computes only with cuda_.
            st = cuda_ ? cuda_->compute_device(layer, xin, n_rows, rows.data(), experts.data(), weights.data(),
                                               n_pairs, yout, plane->stream())
                       : Status::error("an in-place data plane, but this worker has no GPU compute");
        } else if (cuda_) {
            st = cuda_->compute(layer, xin, n_rows, rows.data(), experts.data(), weights.data(), n_pairs, yout);
        } else {
            st = compute_->compute(layer, xin, n_rows, rows.data(), experts.data(), weights.data(), n_pairs, yout);
        }
        busy_ns_ += static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
        if (!st.ok()) return st.message();
        break;
    }
    // Partial sums → the data plane, or the call's dtype in the message.
    std::string* out = res->mutable_partial();
    if (plane) {
        Status st = in_place ? plane->publish_device(n_rows) : plane->publish(n_rows, yout);
        if (!st.ok()) return st.message();
        res->set_out_of_band(true);
    } else if (call.dtype() == v1::DTYPE_BF16) {
        out->resize(y->size() * 2);
        auto* dst = reinterpret_cast<uint8_t*>(out->data());
        for (size_t i = 0; i < y->size(); ++i) {
            const uint16_t h = fp32_to_bf16((*y)[i]);
            std::memcpy(dst + 2 * i, &h, 2);
        }
    } else {
        out->assign(reinterpret_cast<const char*>(y->data()), y->size() * sizeof(float));
    }
    calls_++;
    rows_ += static_cast<uint64_t>(n_rows);
    pairs_ += static_cast<uint64_t>(n_pairs);
    return "";
}

grpc::Status WorkerService::Experts(grpc::ServerContext* ctx,
                                    grpc::ServerReaderWriter<v1::ExpertResult, v1::ExpertCall>* stream) {
    log("expert stream opened by %s", peer_of(ctx).c_str());
    v1::ExpertCall call;
    std::vector<float> x, y;  // per-stream buffers, reused across calls
    uint64_t n = 0;
    while (stream->Read(&call)) {
        bytes_in_ += call.ByteSizeLong();
        v1::ExpertResult res;
        res.set_request_id(call.request_id());
        res.set_step(call.step());
        res.set_layer(call.layer());
        res.set_n_rows(call.n_rows());
        res.set_dtype(call.dtype());
        const std::string why = serve_call(ctx, call, &res, &x, &y);
        if (!why.empty()) {
            errors_++;
            res.clear_partial();
            res.set_error(why);
            log("expert call request_id=%llu step=%llu layer=%u from %s refused: %s",
                static_cast<unsigned long long>(call.request_id()), static_cast<unsigned long long>(call.step()),
                call.layer(), peer_of(ctx).c_str(), why.c_str());
        }
        bytes_out_ += res.ByteSizeLong();
        if (!stream->Write(res)) break;
        ++n;
    }
    log("expert stream from %s closed after %llu calls", peer_of(ctx).c_str(), static_cast<unsigned long long>(n));
    return grpc::Status::OK;
}

// ---------------------------------------------------------------------------------------------
// WorkerServer

StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::start(const WorkerOptions& o) {
    if (o.name.empty()) return MM_ERROR("--name is required (the worker's name in the placement file)");
    if (o.model_path.empty()) return MM_ERROR("--model is required");
    if (o.tls_cert.empty() != o.tls_key.empty()) return MM_ERROR("--tls-cert and --tls-key go together");
    if (!o.tls_ca.empty() && o.tls_cert.empty())
        return MM_ERROR("--tls-ca (verify client certificates) needs --tls-cert and --tls-key");
    MM_ASSIGN_OR_RETURN(ListenAddress addr, parse_listen(o.listen));
    MM_ASSIGN_OR_RETURN(int device, parse_compute_device(o.device, "--device"));
    if (device >= 0) {
        Status st = check_cuda_device(device);
        if (!st.ok()) return MM_ERROR("--device %s: %s", o.device.c_str(), st.message().c_str());
    }

    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::open(o.model_path));
    MM_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(*file));
    {
        // Checks every layer's expert tensors (names, shapes, types) without reading them.
        MM_ASSIGN_OR_RETURN(std::unique_ptr<ShardStore> probe, ShardStore::plan(*file, cfg, {}));
        (void)probe;
    }

    std::shared_ptr<grpc::ServerCredentials> creds;
    if (!o.tls_cert.empty()) {
        grpc::SslServerCredentialsOptions ssl;
        MM_ASSIGN_OR_RETURN(std::string cert, read_pem(o.tls_cert, "--tls-cert"));
        MM_ASSIGN_OR_RETURN(std::string key, read_pem(o.tls_key, "--tls-key"));
        ssl.pem_key_cert_pairs.push_back({key, cert});
        if (!o.tls_ca.empty()) {
            MM_ASSIGN_OR_RETURN(ssl.pem_root_certs, read_pem(o.tls_ca, "--tls-ca"));
            ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
        }
        creds = grpc::SslServerCredentials(ssl);
    } else {
        creds = grpc::InsecureServerCredentials();
    }
    if (!addr.unix_path.empty()) MM_RETURN_IF_ERROR(clear_stale_socket(addr.unix_path));

    std::unique_ptr<WorkerServer> s(new WorkerServer());
    s->service_ = std::make_unique<WorkerService>(o.name, std::move(file), cfg, o.threads, device, o.cache);
    if (!addr.loopback)
        s->service_->log("binding non-loopback address %s: reachable from other hosts%s", addr.grpc.c_str(),
                         o.tls_cert.empty() ? " (no TLS: use --tls-cert/--tls-key across untrusted networks)" : "");
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort(addr.grpc, creds, addr.unix_path.empty() ? &port : nullptr);
    b.RegisterService(s->service_.get());
    b.SetMaxReceiveMessageSize(kWorkerMaxMessageBytes);
    b.SetMaxSendMessageSize(kWorkerMaxMessageBytes);
    s->server_ = b.BuildAndStart();
    if (!s->server_ || (addr.unix_path.empty() && port == 0))
        return MM_ERROR("cannot listen on %s (address in use, or not an address of this host?)", o.listen.c_str());
    s->address_ = addr.unix_path.empty() ? addr.host + ":" + std::to_string(port) : addr.grpc;
    std::fprintf(stderr, "moemesh-worker %s listening on %s (model %s), CPU kernels %s\n", o.name.c_str(),
                 s->address_.c_str(), s->service_->fingerprint().c_str(), cpu_kernel_isa());
    return s;
}

void WorkerServer::wait() {
    if (stopped_) return;
    service_->wait_for_shutdown_request();
    stopped_ = true;
    if (!server_) return;  // never started (bind failed)
    // Streams blocked in Read() end when the deadline passes.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    server_->Wait();
    std::fprintf(stderr, "moemesh-worker %s stopped\n", service_->name().c_str());
}

WorkerServer::~WorkerServer() {
    if (service_) {
        service_->request_shutdown("server destroyed");
        wait();
    }
}

Status run_worker_server(const WorkerOptions& opts) {
    // Block SIGINT/SIGTERM here, before any thread starts, so that every thread inherits the mask
    // and only the signal thread below receives them.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    StatusOr<std::unique_ptr<WorkerServer>> started = WorkerServer::start(opts);
    if (!started.ok()) return started.status();
    std::unique_ptr<WorkerServer> server = std::move(started).value();
    std::atomic<bool> done{false};
    std::thread sig_thread([&] {
        int sig = 0;
        sigwait(&set, &sig);
        if (!done.load()) server->request_shutdown(sig == SIGINT ? "SIGINT" : "SIGTERM");
    });
    server->wait();
    done.store(true);
    pthread_kill(sig_thread.native_handle(), SIGTERM);  // wakes sigwait
    sig_thread.join();
    return Status();
}

}  // namespace moemesh
