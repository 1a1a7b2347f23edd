#include "coordinator/remote_experts.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "common/half.h"
#include "coordinator/data_plane.h"
#include "proto/moemesh.grpc.pb.h"
#include "worker/expert_cache.h"
#include "worker/expert_compute.h"
#include "worker/expert_executor.h"

#ifdef MOEMESH_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_ops.h"
#endif

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;
namespace pb = moemesh::v1;

const char* grpc_code_name(grpc::StatusCode c) {
    switch (c) {
        case grpc::StatusCode::DEADLINE_EXCEEDED: return "deadline exceeded";
        case grpc::StatusCode::UNAVAILABLE: return "unavailable";
        case grpc::StatusCode::UNIMPLEMENTED: return "unimplemented";
        case grpc::StatusCode::UNAUTHENTICATED: return "unauthenticated";
        case grpc::StatusCode::RESOURCE_EXHAUSTED: return "message too large";
        default: return "error";
    }
}

// gRPC deadlines are system_clock time points.
std::chrono::system_clock::time_point wall(Clock::time_point t) {
    return std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(t - Clock::now());
}

std::vector<pb::LayerShard> shard_proto(const WorkerShard& s) {
    std::map<int, std::vector<int>> by_layer;
    for (auto [l, e] : s.primary) by_layer[l].push_back(e);
    for (auto [l, e] : s.replicas) by_layer[l].push_back(e);
    std::vector<pb::LayerShard> out;
    for (auto& [l, es] : by_layer) {
        std::sort(es.begin(), es.end());
        pb::LayerShard ls;
        ls.set_layer(static_cast<uint32_t>(l));
        for (int e : es) ls.add_experts(static_cast<uint32_t>(e));
        out.push_back(std::move(ls));
    }
    return out;
}

// ---- in-process: the worker's compute runs in this process, on its own expert tables ----
class InprocLink final : public WorkerLink {
public:
    InprocLink(std::string name, std::unique_ptr<ExpertCompute> c, std::shared_ptr<ExpertCache> cache = nullptr)
        : name_(std::move(name)), compute_(std::move(c)), cache_(std::move(cache)) {}
    std::string cache_stats() override { return cache_ ? cache_->stats_line() : ""; }
    std::string describe() const override { return "worker '" + name_ + "' (in-process)"; }
    Status connect(std::chrono::milliseconds, const LoadProgress&) override { return Status(); }
    bool connected() const override { return true; }
    void disconnect() override {}
    Status send(const ExpertBatch& b) override {
        pending_[b.request_id] = &b;
        return Status();
    }
    Status receive(uint64_t id, Clock::time_point, std::vector<float>* partial) override {
        auto it = pending_.find(id);
        if (it == pending_.end()) return MM_ERROR("%s: no call %llu in flight", describe().c_str(), (unsigned long long)id);
        const ExpertBatch& b = *it->second;
        pending_.erase(it);
        partial->resize(static_cast<size_t>(b.n_rows * b.hidden));
        return compute_->compute(b.layer, b.x.data(), b.n_rows, b.rows.data(), b.experts.data(), b.weights.data(),
                                 static_cast<int64_t>(b.rows.size()), partial->data());
    }

private:
    std::string name_;
    std::unique_ptr<ExpertCompute> compute_;
    std::shared_ptr<ExpertCache> cache_;
    std::map<uint64_t, const ExpertBatch*> pending_;
};

// ---- gRPC over a Unix socket or TCP: one long-lived Experts stream, results read by a thread ----
class GrpcLink final : public WorkerLink {
public:
    // plane: the out-of-band data plane to negotiate (kUnix/kTcp: none); required: the YAML named
    // it (a refusal fails connect()), else `auto` chose it (a refusal falls back to the messages).
    GrpcLink(const WorkerConfig& w, const WorkerShard& shard, std::string fingerprint, ActivationFormat act,
             std::optional<pb::CacheConfig> cache, Transport plane, bool required, int64_t plane_rows,
             int coordinator_device, int64_t hidden)
        : name_(w.name), address_(w.address ? w.address->str() : ""), tls_(w.tls), shard_(shard_proto(shard)),
          fingerprint_(std::move(fingerprint)), bf16_(act == ActivationFormat::kBf16), cache_(std::move(cache)),
          plane_kind_(plane), plane_required_(required), plane_rows_(plane_rows),
          coordinator_device_(coordinator_device),
          worker_device_(w.device.kind == Device::Kind::kCuda ? w.device.index : -1), hidden_(hidden) {}

    std::string data_plane() const override {
        std::lock_guard<std::mutex> lk(mu_);
        return plane_ ? plane_->kind() : "";
    }
    int64_t data_plane_rows() const override {
        std::lock_guard<std::mutex> lk(mu_);
        return plane_ ? plane_->max_rows() : 0;
    }
    bool takes_device_pointers() const override {
        std::lock_guard<std::mutex> lk(mu_);
        return plane_ && plane_->takes_device_pointers() && stream_ && !broken_;
    }

    std::string cache_stats() override {
        std::shared_ptr<grpc::Channel> ch;
        {
            std::lock_guard<std::mutex> lk(mu_);
            ch = channel_;
        }
        if (!cache_ || !ch) return "";
        pb::StatsRequest req;
        pb::StatsResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
        auto stub = pb::ExpertWorker::NewStub(ch);
        if (!stub->Stats(&ctx, req, &resp).ok()) return "(stats unavailable)";
        return resp.cache_summary();
    }
    ~GrpcLink() override { disconnect(); }

    std::string describe() const override {
        const bool oob = plane_kind_ == Transport::kShm || plane_kind_ == Transport::kCudaIpc ||
                         plane_kind_ == Transport::kNccl;
        return "worker '" + name_ + "' (" + address_ + (oob ? std::string(", ") + transport_name(plane_kind_) : "") + ")";
    }
    void set_connect_wait(std::chrono::milliseconds w) override { connect_wait_ = w; }
    bool connected() const override {
        std::lock_guard<std::mutex> lk(mu_);
        return stream_ != nullptr && !broken_;
    }

    Status connect(std::chrono::milliseconds timeout, const LoadProgress& progress) override {
        disconnect();
        const auto deadline = Clock::now() + timeout;
        MM_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, credentials());
        grpc::ChannelArguments args;
        args.SetMaxReceiveMessageSize(512 << 20);
        args.SetMaxSendMessageSize(512 << 20);
        auto channel = grpc::CreateCustomChannel(target(), creds, args);
        // Connect first, so an unreachable or non-gRPC peer or a TLS failure is reported as such.
        const auto t_connect = Clock::now();
        const auto connect_deadline = std::min(deadline, t_connect + connect_wait_);
        if (!channel->WaitForConnected(wall(connect_deadline))) {
            const char* why = tls_.enabled()
                                  ? "unreachable, not a moemesh worker, or the TLS handshake failed (check the CA, "
                                    "certificate names and whether the worker uses TLS)"
                                  : "unreachable or not a moemesh worker (if the worker uses TLS, add tls: to its entry)";
            return MM_ERROR("%s: cannot connect within %lld ms: %s", describe().c_str(),
                            (long long)std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t_connect)
                                .count(),
                            why);
        }
        auto stub = pb::ExpertWorker::NewStub(channel);
        // Handshake: protocol version, model fingerprint, our name for it, its shard.
        pb::HandshakeRequest req;
        req.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
        req.set_model_fingerprint(fingerprint_);
        req.set_worker_name(name_);
        for (const auto& ls : shard_) *req.add_shard() = ls;
        req.set_activation_dtype(bf16_ ? pb::DTYPE_BF16 : pb::DTYPE_F32);
        if (cache_) *req.mutable_cache() = *cache_;
        // The out-of-band data plane: buffers made now, offered in the handshake.
        std::unique_ptr<LinkDataPlane> plane;
        if (plane_kind_ == Transport::kShm || plane_kind_ == Transport::kCudaIpc || plane_kind_ == Transport::kNccl) {
            StatusOr<std::unique_ptr<LinkDataPlane>> made = LinkDataPlane::create(
                plane_kind_, plane_rows_, hidden_, coordinator_device_, worker_device_, name_);
            if (made.ok()) {
                plane = std::move(made).value();
                *req.mutable_data_plane() = plane->offer();
            } else if (plane_required_) {
                return MM_ERROR("%s: %s", describe().c_str(), made.status().message().c_str());
            } else {
                note_fallback(made.status().message());
            }
        }
        pb::HandshakeResponse resp;
        {
            grpc::ClientContext ctx;
            ctx.set_deadline(wall(std::min(deadline, Clock::now() + std::chrono::seconds(10))));
            grpc::Status st = stub->Handshake(&ctx, req, &resp);
            if (!st.ok())
                return MM_ERROR("%s: handshake failed (%s): %s — is it a moemesh-worker of the same version?",
                                describe().c_str(), grpc_code_name(st.error_code()), st.error_message().c_str());
        }
        if (!resp.accepted()) return MM_ERROR("%s refused the handshake: %s", describe().c_str(), resp.reason().c_str());
        if (plane) {
            std::string why;
            if (!resp.has_data_plane())
                why = "the worker did not answer the data-plane offer (a worker without out-of-band transports?)";
            else if (!resp.data_plane().accepted())
                why = "the worker refused the " + std::string(plane->kind()) + " data plane: " + resp.data_plane().reason();
            else if (Status st = plane->joined(std::min(deadline, Clock::now() + std::chrono::seconds(30))); !st.ok())
                why = st.message();
            if (!why.empty()) {
                if (plane_required_) return MM_ERROR("%s: %s", describe().c_str(), why.c_str());
                note_fallback(why);
                plane.reset();
            }
        }
        // Wait for the shard to load, reporting progress.
        for (;;) {
            pb::HealthResponse h;
            grpc::ClientContext ctx;
            ctx.set_deadline(wall(Clock::now() + std::chrono::seconds(5)));
            grpc::Status st = stub->Health(&ctx, pb::HealthRequest(), &h);
            if (!st.ok()) return MM_ERROR("%s: health check failed: %s", describe().c_str(), st.error_message().c_str());
            if (progress) progress(name_, h.loaded_bytes(), h.shard_bytes());
            if (h.ready()) break;
            if (!h.load_error().empty())
                return MM_ERROR("%s: the shard failed to load: %s", describe().c_str(), h.load_error().c_str());
            if (Clock::now() > deadline)
                return MM_ERROR("%s: shard not loaded after %lld ms (%llu of %llu bytes)", describe().c_str(),
                                (long long)timeout.count(), (unsigned long long)h.loaded_bytes(),
                                (unsigned long long)h.shard_bytes());
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        // Open the data stream.
        auto ctx = std::make_unique<grpc::ClientContext>();
        auto stream = stub->Experts(ctx.get());
        {
            std::lock_guard<std::mutex> lk(mu_);
            channel_ = channel;
            stub_ = std::move(stub);
            ctx_ = std::move(ctx);
            stream_ = std::move(stream);
            broken_ = false;
            broken_reason_.clear();
            results_.clear();
            plane_ = std::move(plane);
        }
        reader_ = std::thread([this] { read_loop(); });
        return Status();
    }

    void disconnect() override {
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (ctx_) ctx_->TryCancel();
            broken_ = true;
        }
        cv_.notify_all();
        if (reader_.joinable()) reader_.join();
        std::lock_guard<std::mutex> lk(mu_);
        stream_.reset();
        ctx_.reset();
        stub_.reset();
        channel_.reset();
        plane_.reset();  // nccl: aborts the pair's communicator; shm: unmaps
        pending_.clear();
        expected_rows_.clear();
    }

    Status send(const ExpertBatch& b) override {
        pb::ExpertCall call;
        call.set_request_id(b.request_id);
        call.set_step(b.step);
        call.set_layer(static_cast<uint32_t>(b.layer));
        call.set_n_rows(static_cast<uint32_t>(b.n_rows));
        call.set_hidden(static_cast<uint32_t>(b.hidden));
        LinkDataPlane* plane;
        {
            std::lock_guard<std::mutex> l2(mu_);
            plane = plane_.get();
        }
        const bool oob = plane && b.n_rows <= plane->max_rows() && (b.device_x == nullptr || plane->takes_device_pointers());
        if (b.device_x && !oob)
            return MM_ERROR("%s: device rows without a device data plane (%lld rows)", describe().c_str(),
                            static_cast<long long>(b.n_rows));
        if (oob) {
            // The rows go into the plane first: the call is the worker's signal that they are there.
            call.set_dtype(pb::DTYPE_F32);
            call.set_out_of_band(true);
        } else if (bf16_) {
            call.set_dtype(pb::DTYPE_BF16);
            std::string a(b.x.size() * 2, '\0');
            auto* p = reinterpret_cast<uint16_t*>(a.data());
            for (size_t i = 0; i < b.x.size(); ++i) p[i] = fp32_to_bf16(b.x[i]);
            call.set_activations(std::move(a));
        } else {
            call.set_dtype(pb::DTYPE_F32);
            call.set_activations(b.x.data(), b.x.size() * sizeof(float));
        }
        call.set_pair_rows(b.rows.data(), b.rows.size() * sizeof(int32_t));
        call.set_pair_experts(b.experts.data(), b.experts.size() * sizeof(int32_t));
        call.set_pair_weights(b.weights.data(), b.weights.size() * sizeof(float));
        std::lock_guard<std::mutex> lk(write_mu_);
        {
            std::lock_guard<std::mutex> l2(mu_);
            if (!stream_ || broken_) return MM_ERROR("%s is not connected: %s", describe().c_str(), broken_reason_.c_str());
        }
        if (oob) {
            Status st = plane->put(b.device_x ? b.device_x : b.x.data(), b.n_rows, b.device_x != nullptr);
            if (!st.ok()) {
                mark_broken(st.message());
                return MM_ERROR("%s: %s", describe().c_str(), st.message().c_str());
            }
        }
        if (!stream_->Write(call)) {
            mark_broken("the stream closed while sending");
            return MM_ERROR("%s: send failed (stream closed)", describe().c_str());
        }
        expected_rows_[b.request_id] = b.n_rows * b.hidden;
        pending_[b.request_id] = Pending{oob, b.n_rows, b.device_partial};
        return Status();
    }

    Status receive(uint64_t id, Clock::time_point deadline, std::vector<float>* partial) override {
        std::unique_lock<std::mutex> lk(mu_);
        const bool got = cv_.wait_until(lk, deadline, [&] { return results_.count(id) || broken_; });
        if (!results_.count(id)) {
            if (!got) {
                broken_reason_ = "no answer within the deadline";
                broken_ = true;
                if (ctx_) ctx_->TryCancel();
                return MM_ERROR("%s did not answer within the deadline (layer call %llu); marked down",
                                describe().c_str(), (unsigned long long)id);
            }
            return MM_ERROR("%s failed: %s", describe().c_str(), broken_reason_.c_str());
        }
        pb::ExpertResult r = std::move(results_[id]);
        results_.erase(id);
        lk.unlock();
        const Pending pend = pending_[id];
        pending_.erase(id);
        if (!r.error().empty()) return MM_ERROR("%s: %s", describe().c_str(), r.error().c_str());
        const int64_t n = expected_rows_[id];
        expected_rows_.erase(id);
        if (r.out_of_band() != pend.oob)
            return MM_ERROR("%s: the result is %s but the call was %s", describe().c_str(),
                            r.out_of_band() ? "out of band" : "in the message", pend.oob ? "out of band" : "in the message");
        if (pend.oob) {
            LinkDataPlane* plane;
            {
                std::lock_guard<std::mutex> l2(mu_);
                plane = plane_.get();
            }
            if (!plane) return MM_ERROR("%s: the data plane is gone", describe().c_str());
            if (!pend.device_partial) partial->resize(static_cast<size_t>(n));
            Status st = plane->get(pend.device_partial ? pend.device_partial : partial->data(), pend.n_rows,
                                   pend.device_partial != nullptr, deadline);
            if (!st.ok()) {
                mark_broken(st.message());
                return MM_ERROR("%s: %s", describe().c_str(), st.message().c_str());
            }
            return Status();
        }
        const size_t esize = r.dtype() == pb::DTYPE_BF16 ? 2 : 4;
        if (r.partial().size() != static_cast<size_t>(n) * esize)
            return MM_ERROR("%s: result has %zu bytes, expected %lld", describe().c_str(), r.partial().size(),
                            (long long)(n * esize));
        partial->resize(static_cast<size_t>(n));
        if (esize == 2) {
            const auto* p = reinterpret_cast<const uint16_t*>(r.partial().data());
            for (int64_t i = 0; i < n; ++i) (*partial)[i] = bf16_to_fp32(p[i]);
        } else {
            std::memcpy(partial->data(), r.partial().data(), r.partial().size());
        }
        return Status();
    }

private:
    std::string target() const {
        // gRPC's own syntax: unix:/path and host:port (IPv6 in brackets) both pass through.
        return address_;
    }

    StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials() const {
        if (!tls_.enabled()) return grpc::InsecureChannelCredentials();
        auto slurp = [](const std::string& path, std::string* out) -> Status {
            std::ifstream f(path, std::ios::binary);
            if (!f) return MM_ERROR("cannot read TLS file %s", path.c_str());
            std::stringstream ss;
            ss << f.rdbuf();
            *out = ss.str();
            return Status();
        };
        grpc::SslCredentialsOptions o;
        if (!tls_.ca.empty()) MM_RETURN_IF_ERROR(slurp(tls_.ca, &o.pem_root_certs));
        if (!tls_.cert.empty()) MM_RETURN_IF_ERROR(slurp(tls_.cert, &o.pem_cert_chain));
        if (!tls_.key.empty()) MM_RETURN_IF_ERROR(slurp(tls_.key, &o.pem_private_key));
        return grpc::SslCredentials(o);
    }

    void mark_broken(const std::string& why) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!broken_) broken_reason_ = why;
        broken_ = true;
        cv_.notify_all();
    }

    void read_loop() {
        grpc::ClientReaderWriter<pb::ExpertCall, pb::ExpertResult>* s;
        {
            std::lock_guard<std::mutex> lk(mu_);
            s = stream_.get();
        }
        pb::ExpertResult r;
        while (s->Read(&r)) {
            std::lock_guard<std::mutex> lk(mu_);
            results_[r.request_id()] = std::move(r);
            cv_.notify_all();
        }
        mark_broken("the worker closed the stream (it stopped or the connection broke)");
    }

    std::string name_, address_;
    TlsConfig tls_;
    std::vector<pb::LayerShard> shard_;
    std::string fingerprint_;
    bool bf16_;
    std::optional<pb::CacheConfig> cache_;
    std::chrono::milliseconds connect_wait_{10000};

    mutable std::mutex mu_;
    std::mutex write_mu_;
    std::condition_variable cv_;
    std::shared_ptr<grpc::Channel> channel_;
    std::unique_ptr<pb::ExpertWorker::Stub> stub_;
    std::unique_ptr<grpc::ClientContext> ctx_;
    std::unique_ptr<grpc::ClientReaderWriter<pb::ExpertCall, pb::ExpertResult>> stream_;
    std::thread reader_;
    bool broken_ = true;
    std::string broken_reason_ = "not connected yet";
    std::map<uint64_t, pb::ExpertResult> results_;
    std::map<uint64_t, int64_t> expected_rows_;

    void note_fallback(const std::string& why) {
        // Said once per link and reason, not on every reconnect.
        if (why == fallback_said_) return;
        fallback_said_ = why;
        std::fprintf(stderr, "coordinator: %s: transport auto: %s; activations go in the gRPC messages instead\n",
                     describe().c_str(), why.c_str());
    }
    struct Pending {
        bool oob = false;
        int64_t n_rows = 0;
        float* device_partial = nullptr;
    };
    Transport plane_kind_;
    bool plane_required_;
    int64_t plane_rows_;
    int coordinator_device_, worker_device_;
    int64_t hidden_;
    std::string fallback_said_;
    std::unique_ptr<LinkDataPlane> plane_;  // guarded by mu_; used by one caller at a time
    std::map<uint64_t, Pending> pending_;
};

}  // namespace

StatusOr<std::unique_ptr<DistributedExpertBackend>> DistributedExpertBackend::create(const ClusterConfig& cluster,
                                                                                     const OwnershipMap& map,
                                                                                     const GgufFile& file,
                                                                                     const ModelConfig& cfg,
                                                                                     ThreadPool& pool) {
    std::unique_ptr<DistributedExpertBackend> b(new DistributedExpertBackend(cluster, map, cfg));
    const std::string fp = file.fingerprint();
    for (size_t w = 0; w < cluster.workers.size(); ++w) {
        const WorkerConfig& wc = cluster.workers[w];
        // The worker's cache: entry, with the profile's text (the worker may run on another host).
        std::optional<pb::CacheConfig> cache;
        if (wc.cache_enabled) {
            pb::CacheConfig cc;
            cc.set_device_bytes(wc.cache_device_bytes);
            cc.set_host_bytes(wc.cache_host_bytes);
            cc.set_policy(wc.cache_policy);
            cc.set_prefetch(wc.cache_prefetch);
            cc.set_storage(wc.cache_storage);
            if (!wc.cache_profile.empty()) {
                std::ifstream in(wc.cache_profile, std::ios::binary);
                std::stringstream ss;
                ss << in.rdbuf();
                if (!in || ss.str().empty())
                    return MM_ERROR("%sworker '%s': cannot read cache.profile '%s'", cluster.where(wc.cache_loc).c_str(),
                                    wc.name.c_str(), wc.cache_profile.c_str());
                cc.set_profile_json(ss.str());
            }
            cache = std::move(cc);
        }
        if (wc.transport == Transport::kInproc && cache) {
            CacheOptions o;
            o.device_bytes = cache->device_bytes();
            o.host_bytes = cache->host_bytes();
            MM_ASSIGN_OR_RETURN(o.policy, parse_cache_policy(cache->policy()));
            MM_ASSIGN_OR_RETURN(o.prefetch, parse_prefetch_mode(cache->prefetch()));
            MM_ASSIGN_OR_RETURN(o.storage, parse_storage_mode(cache->storage().empty() ? "auto" : cache->storage()));
            if (!cache->profile_json().empty()) {
                MM_ASSIGN_OR_RETURN(o.profile, parse_expert_profile(cache->profile_json(), wc.cache_profile));
            }
            std::vector<std::vector<int>> shard(static_cast<size_t>(cfg.n_layer));
            for (int l = 0; l < cfg.n_layer; ++l)
                for (int e = 0; e < cfg.n_expert; ++e)
                    if (map.serves(static_cast<int>(w), l, e)) shard[l].push_back(e);
            StatusOr<std::shared_ptr<ExpertCache>> made = ExpertCache::create(file, cfg, shard, o);
            if (!made.ok())
                return MM_ERROR("%sworker '%s': %s", cluster.where(wc.cache_loc).c_str(), wc.name.c_str(),
                                made.status().message().c_str());
            MM_RETURN_IF_ERROR(made.value()->warm_up());
            b->links_.push_back(std::make_unique<InprocLink>(
                wc.name, std::make_unique<ExpertCompute>(cfg, pool, made.value()), made.value()));
        } else if (wc.transport == Transport::kInproc) {
            MM_ASSIGN_OR_RETURN(std::vector<LayerExpertTable> tables, map_expert_tables(file, cfg));
            for (int l = 0; l < cfg.n_layer; ++l) {
                for (int e = 0; e < cfg.n_expert; ++e) {
                    if (!map.serves(static_cast<int>(w), l, e)) tables[l].experts[e] = ExpertSlice{};
                }
            }
            b->links_.push_back(
                std::make_unique<InprocLink>(wc.name, std::make_unique<ExpertCompute>(cfg, pool, std::move(tables))));
        } else {
            // The data plane: as configured (refused here when this build lacks it), or what
            // `auto` picks by locality (falling back to the messages when it cannot be had).
            const Transport t = resolve_transport(cluster, wc);
            const bool required = wc.transport != Transport::kAuto;
            if (required && is_out_of_band(t)) {
                if (std::string why = LinkDataPlane::unavailable(t); !why.empty())
                    return MM_ERROR("%sworker '%s': %s", cluster.where(wc.transport_loc).c_str(), wc.name.c_str(),
                                    why.c_str());
            }
            const int cdev = cluster.coordinator.device.kind == Device::Kind::kCuda ? cluster.coordinator.device.index : -1;
            b->links_.push_back(std::make_unique<GrpcLink>(wc, map.workers[w], fp, cluster.activations, cache, t, required,
                                                           cluster.coordinator.data_plane_rows, cdev, cfg.n_embd));
        }
    }
    b->stats_.resize(b->links_.size());
    b->last_attempt_.assign(b->links_.size(), Clock::time_point{});
    for (size_t w = 0; w < b->links_.size(); ++w) b->connect_mu_.push_back(std::make_unique<std::mutex>());
    return b;
}

Status DistributedExpertBackend::connect_all(std::chrono::milliseconds timeout, const LoadProgress& progress) {
    std::vector<Status> results(links_.size());
    std::vector<std::thread> threads;
    std::mutex progress_mu;
    LoadProgress safe = [&](const std::string& n, uint64_t a, uint64_t t) {
        std::lock_guard<std::mutex> lk(progress_mu);
        if (progress) progress(n, a, t);
    };
    // Workers started by a launcher are already listening; remote ones get a few seconds.
    const auto wait = std::chrono::milliseconds(std::clamp(cluster_.coordinator.timeout_ms, 3000, 10000));
    for (size_t w = 0; w < links_.size(); ++w) {
        links_[w]->set_connect_wait(wait);
        threads.emplace_back([&, w] { results[w] = links_[w]->connect(timeout, safe); });
    }
    for (auto& t : threads) t.join();
    for (size_t w = 0; w < links_.size(); ++w) {
        last_attempt_[w] = Clock::now();
        if (!results[w].ok()) return results[w];
    }
    if (!reconnector_.joinable()) reconnector_ = std::thread([this] { reconnect_loop(); });
    return Status();
}

DistributedExpertBackend::~DistributedExpertBackend() {
    {
        std::lock_guard<std::mutex> lk(reconnect_mu_);
        stop_ = true;
    }
    reconnect_cv_.notify_all();
    if (reconnector_.joinable()) reconnector_.join();
#ifdef MOEMESH_HAVE_CUDA
    for (float* p : device_partials_)
        if (p) cudaFree(p);
#endif
}

bool DistributedExpertBackend::try_reconnect(int w, bool wait_for_lock) {
    std::unique_lock<std::mutex> lk(*connect_mu_[w], std::defer_lock);
    if (wait_for_lock) lk.lock(); else if (!lk.try_lock()) return false;
    if (links_[w]->connected()) return true;
    // A live local or LAN worker accepts within milliseconds; don't stall the caller on a dead one.
    links_[w]->set_connect_wait(std::chrono::milliseconds(std::min(cluster_.coordinator.timeout_ms, 300)));
    Status st = links_[w]->connect(std::chrono::milliseconds(cluster_.coordinator.timeout_ms), nullptr);
    if (st.ok()) {
        std::lock_guard<std::mutex> sl(stats_mu_);
        stats_[w].reconnects++;
        std::fprintf(stderr, "coordinator: reconnected to %s\n", links_[w]->describe().c_str());
        return true;
    }
    return false;
}

// Down workers are retried in the background, so one whose experts have live replicas comes
// back into use without stalling any layer call.
void DistributedExpertBackend::reconnect_loop() {
    std::unique_lock<std::mutex> lk(reconnect_mu_);
    while (!stop_) {
        reconnect_cv_.wait_for(lk, std::chrono::milliseconds(250));
        if (stop_) break;
        lk.unlock();
        for (size_t w = 0; w < links_.size(); ++w) {
            if (!links_[w]->connected()) try_reconnect(static_cast<int>(w), false);
        }
        lk.lock();
    }
}

bool DistributedExpertBackend::usable(int w) {
    if (links_[w]->connected()) return true;
    const auto now = Clock::now();
    // Nobody else serves this expert: retry now, at most every 250 ms.
    if (now - last_attempt_[w] < std::chrono::milliseconds(250)) return false;
    last_attempt_[w] = now;
    if (try_reconnect(w, true)) {
        stats_[w].reconnects++;
        std::fprintf(stderr, "coordinator: reconnected to %s\n", links_[w]->describe().c_str());
        return true;
    }
    return false;
}

int64_t DistributedExpertBackend::chunk_rows() const {
    for (const WorkerConfig& wc : cluster_.workers)
        if (is_out_of_band(resolve_transport(cluster_, wc))) return cluster_.coordinator.data_plane_rows;
    return 0;  // no limit
}

// Rows are independent, so a batch larger than the data planes' buffers goes in groups of rows.
Status DistributedExpertBackend::collect(int w, const Status& sent, uint64_t request_id,
                                         std::chrono::steady_clock::time_point deadline,
                                         std::chrono::steady_clock::time_point t0, std::vector<float>* partial) {
    Status st = sent;
    if (st.ok()) st = links_[w]->receive(request_id, deadline, partial);
    std::lock_guard<std::mutex> sl(stats_mu_);
    stats_[w].calls++;
    stats_[w].wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) stats_[w].failures++;
    return st;
}

Status DistributedExpertBackend::moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                                             const float* weights, float* out) {
    const int64_t H = cfg_.n_embd;
    const int64_t chunk = chunk_rows();
    if (chunk <= 0 || n_rows <= chunk) return forward_rows(layer, x, n_rows, k, ids, weights, out);
    for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
        const int64_t n = std::min(chunk, n_rows - r0);
        MM_RETURN_IF_ERROR(forward_rows(layer, x + r0 * H, n, k, ids + r0 * k, weights + r0 * k, out + r0 * H));
    }
    return Status();
}

bool DistributedExpertBackend::takes_device_pointers() const {
#ifdef MOEMESH_HAVE_CUDA
    if (links_.empty()) return false;
    for (const auto& l : links_)
        if (!l->takes_device_pointers()) return false;
    return true;
#else
    return false;
#endif
}

Status DistributedExpertBackend::moe_forward_device(int layer, const float* d_x, int64_t n_rows, int64_t k,
                                                    const int32_t* ids, const float* weights, float* d_out,
                                                    void* stream) {
#ifdef MOEMESH_HAVE_CUDA
    const int64_t H = cfg_.n_embd;
    const int64_t chunk = std::max<int64_t>(1, cluster_.coordinator.data_plane_rows);
    for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
        const int64_t n = std::min(chunk, n_rows - r0);
        MM_RETURN_IF_ERROR(
            forward_rows_device(layer, d_x + r0 * H, n, k, ids + r0 * k, weights + r0 * k, d_out + r0 * H, stream));
    }
    return Status();
#else
    return Status::error("moe_forward_device: this build has no CUDA");
#endif
}

// Device path: route → group by owner (rows sent whole: every batch is the group's n_rows rows
// and its pairs name them directly) → dispatch over cuda-ipc / nccl → combine on the device
// (out = Σ_workers partial_w). Anything unusual (a down worker, a failed call) recomputes the
// group through host staging, whose path reroutes to replicas and reconnects.
Status DistributedExpertBackend::forward_rows_device(int layer, const float* d_x, int64_t n_rows, int64_t k,
                                                     const int32_t* ids, const float* weights, float* d_out,
                                                     void* stream) {
#ifdef MOEMESH_HAVE_CUDA
    const int64_t H = cfg_.n_embd;
    const int W = static_cast<int>(links_.size());
    auto s = static_cast<cudaStream_t>(stream);
    auto staged = [&]() -> Status {
        staged_x_.resize(static_cast<size_t>(n_rows * H));
        staged_out_.resize(static_cast<size_t>(n_rows * H));
        CUDA_CHECK(cudaMemcpyAsync(staged_x_.data(), d_x, sizeof(float) * staged_x_.size(), cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        MM_RETURN_IF_ERROR(forward_rows(layer, staged_x_.data(), n_rows, k, ids, weights, staged_out_.data()));
        CUDA_CHECK(cudaMemcpyAsync(d_out, staged_out_.data(), sizeof(float) * staged_out_.size(), cudaMemcpyHostToDevice, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        return Status();
    };
    if (device_partials_.size() != static_cast<size_t>(W)) device_partials_.assign(static_cast<size_t>(W), nullptr);
    std::vector<ExpertBatch> batches(W);
    for (int64_t i = 0; i < n_rows * k; ++i) {
        const int e = ids[i];
        if (e < 0 || e >= cfg_.n_expert) return MM_ERROR("layer %d: router chose expert %d", layer, e);
        int best = -1;
        for (int w : map_.serving(layer, e)) {
            if (!links_[w]->takes_device_pointers()) continue;
            if (best < 0 || batches[w].rows.size() < batches[best].rows.size()) best = w;
        }
        if (best < 0) return staged();
        batches[best].rows.push_back(static_cast<int32_t>(i / k));
        batches[best].experts.push_back(e);
        batches[best].weights.push_back(weights[i]);
    }
    ++step_;
    const auto t0 = Clock::now();
    const auto deadline = t0 + std::chrono::milliseconds(cluster_.coordinator.timeout_ms);
    std::vector<Status> sent(W);
    for (int w = 0; w < W; ++w) {
        ExpertBatch& b = batches[w];
        if (b.rows.empty()) continue;
        if (!device_partials_[w])
            CUDA_CHECK(cudaMalloc(&device_partials_[w], sizeof(float) * static_cast<size_t>(
                                                            std::max<int64_t>(1, cluster_.coordinator.data_plane_rows) * H)));
        b.request_id = next_request_++;
        b.step = step_;
        b.layer = layer;
        b.hidden = H;
        b.n_rows = n_rows;
        b.device_x = d_x;
        b.device_partial = device_partials_[w];
        sent[w] = links_[w]->send(b);
    }
    CUDA_CHECK(cudaMemsetAsync(d_out, 0, sizeof(float) * static_cast<size_t>(n_rows * H), s));
    bool failed = false;
    std::vector<float> unused;
    for (int w = 0; w < W; ++w) {
        if (batches[w].rows.empty()) continue;
        Status st = collect(w, sent[w], batches[w].request_id, deadline, t0, &unused);
        if (!st.ok()) {
            std::fprintf(stderr, "coordinator: layer %d step %llu: %s\n", layer, (unsigned long long)step_,
                         st.message().c_str());
            {
                std::lock_guard<std::mutex> cl(*connect_mu_[w]);
                links_[w]->disconnect();
            }
            last_attempt_[w] = Clock::now();
            failed = true;
            continue;
        }
        cuda::add_inplace(d_out, device_partials_[w], n_rows * H, s);
    }
    if (failed) return staged();
    CUDA_CHECK(cudaStreamSynchronize(s));
    return Status();
#else
    return Status::error("moe_forward_device: this build has no CUDA");
#endif
}

Status DistributedExpertBackend::forward_rows(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                                              const float* weights, float* out) {
    const int64_t H = cfg_.n_embd;
    const int W = static_cast<int>(links_.size());
    ++step_;
    std::vector<int8_t> alive(W, -1);  // -1 unknown, 0 down, 1 up
    auto is_alive = [&](int w) {
        if (alive[w] < 0) alive[w] = links_[w]->connected() ? 1 : 0;
        return alive[w] == 1;
    };
    std::vector<std::string> down_reasons(W);
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(n_rows * H));

    // Pairs still to compute: (row, slot) indices into ids/weights.
    std::vector<int64_t> todo(static_cast<size_t>(n_rows * k));
    for (int64_t i = 0; i < n_rows * k; ++i) todo[i] = i;
    for (int round = 0; !todo.empty(); ++round) {
        // ---- group by owner: each pair to the least-loaded live server of its expert ----
        std::vector<ExpertBatch> batches(W);
        std::vector<std::vector<int64_t>> batch_pairs(W);
        std::vector<std::vector<int32_t>> local_row(W);
        for (int64_t i : todo) {
            const int e = ids[i];
            if (e < 0 || e >= cfg_.n_expert) return MM_ERROR("layer %d: router chose expert %d", layer, e);
            int best = -1;
            for (int w : map_.serving(layer, e)) {
                if (!is_alive(w)) continue;
                if (best < 0 || batch_pairs[w].size() < batch_pairs[best].size()) best = w;
            }
            if (best < 0) {
                // No connected server: try to bring one back now (bounded), else fail the call.
                for (int w : map_.serving(layer, e)) {
                    if (alive[w] == 0 && down_reasons[w].empty() && usable(w)) {
                        alive[w] = 1;
                        best = w;
                        break;
                    }
                }
            }
            if (best < 0) {
                std::string why;
                for (int w : map_.serving(layer, e))
                    why += (why.empty() ? "" : "; ") +
                           (down_reasons[w].empty() ? links_[w]->describe() + " is down" : down_reasons[w]);
                return MM_ERROR("layer %d step %llu: no live worker serves expert %d (%s)", layer,
                                (unsigned long long)step_, e, why.c_str());
            }
            ExpertBatch& b = batches[best];
            auto& lr = local_row[best];
            if (lr.empty()) lr.assign(static_cast<size_t>(n_rows), -1);
            const int64_t r = i / k;
            if (lr[r] < 0) {
                lr[r] = static_cast<int32_t>(b.n_rows++);
                b.global_row.push_back(r);
                b.x.insert(b.x.end(), x + r * H, x + (r + 1) * H);
            }
            b.rows.push_back(lr[r]);
            b.experts.push_back(e);
            b.weights.push_back(weights[i]);
            batch_pairs[best].push_back(i);
        }
        // ---- dispatch to every worker at once ----
        const auto t0 = Clock::now();
        const auto deadline = t0 + std::chrono::milliseconds(cluster_.coordinator.timeout_ms);
        std::vector<Status> sent(W);
        for (int w = 0; w < W; ++w) {
            if (batch_pairs[w].empty()) continue;
            ExpertBatch& b = batches[w];
            b.request_id = next_request_++;
            b.step = step_;
            b.layer = layer;
            b.hidden = H;
            sent[w] = links_[w]->send(b);
        }
        // ---- combine, in worker order; failed workers' pairs go round again ----
        todo.clear();
        std::vector<float> partial;
        for (int w = 0; w < W; ++w) {
            if (batch_pairs[w].empty()) continue;
            Status st = collect(w, sent[w], batches[w].request_id, deadline, t0, &partial);
            if (!st.ok()) {
                std::fprintf(stderr, "coordinator: layer %d step %llu: %s\n", layer, (unsigned long long)step_,
                             st.message().c_str());
                down_reasons[w] = st.message();
                alive[w] = 0;
                {
                    std::lock_guard<std::mutex> cl(*connect_mu_[w]);
                    links_[w]->disconnect();
                }
                last_attempt_[w] = Clock::now();
                todo.insert(todo.end(), batch_pairs[w].begin(), batch_pairs[w].end());
                continue;
            }
            const ExpertBatch& b = batches[w];
            for (int64_t lr = 0; lr < b.n_rows; ++lr) {
                float* o = out + b.global_row[lr] * H;
                const float* p = &partial[lr * H];
                for (int64_t h = 0; h < H; ++h) o[h] += p[h];
            }
        }
        if (round > W) return MM_ERROR("layer %d: gave up after %d rounds of worker failures", layer, round);
    }
    return Status();
}

std::string DistributedExpertBackend::transports_line() const {
    std::string s;
    for (size_t w = 0; w < links_.size(); ++w) {
        const WorkerConfig& wc = cluster_.workers[w];
        std::string plane = links_[w]->data_plane();
        if (plane.empty()) {
            const Transport t = resolve_transport(cluster_, wc);
            plane = is_out_of_band(t) ? "grpc" : transport_name(t);
        }
        s += (s.empty() ? "" : ", ") + wc.name + ": " + plane;
    }
    return s;
}

std::string DistributedExpertBackend::stats_line() const {
    std::vector<LinkStats> stats;
    {
        std::lock_guard<std::mutex> sl(stats_mu_);
        stats = stats_;
    }
    std::string s;
    for (size_t w = 0; w < links_.size(); ++w) {
        const LinkStats& st = stats[w];
        s += str_printf("%s%s: %llu calls, %.3f ms mean round trip, %llu failures, %llu reconnects", s.empty() ? "" : " | ",
                        cluster_.workers[w].name.c_str(), (unsigned long long)st.calls,
                        st.calls ? 1e3 * st.wait_seconds / st.calls : 0.0, (unsigned long long)st.failures,
                        (unsigned long long)st.reconnects);
        if (const std::string plane = links_[w]->data_plane(); !plane.empty()) s += ", over " + plane;
        if (cluster_.workers[w].cache_enabled) {
            const std::string c = links_[w]->cache_stats();
            if (!c.empty()) s += " (" + c + ")";
        }
    }
    return s;
}

}  // namespace moemesh
