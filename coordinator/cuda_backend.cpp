// CudaBackend: the Backend of coordinator/backend.h on one GPU. Weights, norm vectors, the routed
// experts, activations and every sequence's KV / conv / recurrent state live in VRAM; the host
// sees only token ids in and logits out (plus the expert ids of a prompt chunk, for grouping).
// All work is queued on one stream of the backend (a blocking stream: the legacy stream's copies
// and memsets stay ordered with it).
//
// Decode steps in a CUDA graph (MOEMESH_CUDA_GRAPHS=0 turns this off: every op then launches at
// once). With graphs on, ops are recorded (a closure + a key of their arguments) instead of launched
// and run at the next sync point (to_host, alloc, a free, a host-synchronising op). A recorded step
// is replayed from a graph when it is a decode step (T == 1, experts resident: the MoE is matmul_id
// on the router's device ids) and its key sequence equals the last captured one; when it equals the
// previous step's keys (shapes stable) it is captured (cudaStreamBeginCapture ... EndCapture, then
// cudaGraphExecUpdate of the old graph or a fresh cudaGraphInstantiate); otherwise the closures run
// one by one. The graph is cut into segments of MOEMESH_CUDA_GRAPH_SEGMENT ops (default 128; 0 = one
// graph): while a step is being recorded, each segment whose keys match is launched as soon as its
// last op is recorded, so the GPU is not idle while the host records the step. What changes per
// step is not in the keys: the position p0 (rope positions, the KV-cache row, attention's n_past) is
// read by the kernels from device memory, copied there from a pinned word before the first launch;
// attention is launched for the splits of the whole cache and its extra blocks exit
// (kernels/cuda/attention.cu attention_dev); the token embedding is copied into the graph from a
// pinned staging slot. Results are bitwise those of the eager path. Logits come back
// through a pinned buffer (cudaMemcpyAsync in the same graph) in both modes.
//
// MOEMESH_CUDA_PROFILE=1: every op is timed between two CUDA events on the stream and the sums per
// op (matrix products per type and shape) are printed when the backend goes away: where a decode
// step's time goes. Graphs are off then (ops launch one by one; a graph saves ~0.5 us per kernel).
//
// Compiled only when the CUDA block of CMakeLists.txt is active (MOEMESH_HAVE_CUDA).
#ifdef MOEMESH_HAVE_CUDA
#include "coordinator/cuda_backend.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>

#include "common/placement.h"
#include "kernels/cuda/cuda_ops.h"
#include "worker/cuda_expert_compute.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

class CudaBackend;
// The backend of this thread with recorded, not yet launched ops: flushed before any device free,
// so no recorded op outlives the memory it names.
thread_local CudaBackend* t_pending = nullptr;
void flush_pending();

void free_device(void* p) {  // may run after the context is gone at exit
    flush_pending();
    (void)cudaFree(p);
}

std::atomic<int64_t> g_captures{0}, g_replays{0}, g_eager_steps{0};

int64_t P(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }
int64_t F(float f) {
    int32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

bool graphs_enabled() {
    const char* e = std::getenv("MOEMESH_CUDA_GRAPHS");
    return !(e && std::strcmp(e, "0") == 0);
}

// Ops per decode-graph segment: MOEMESH_CUDA_GRAPH_SEGMENT=N (0: the whole step in one graph).
int64_t graph_segment_ops() {
    const char* e = std::getenv("MOEMESH_CUDA_GRAPH_SEGMENT");
    if (e == nullptr || *e == '\0') return 128;
    return std::clamp<int64_t>(std::atoll(e), 0, int64_t{1} << 30);
}

// Which decode outputs also get a quantized twin for the GEMVs that read them (MOEMESH_CUDA_QX):
// 0 none (f32 X), 1 (default) the norms and attention, "norms" the norms only.
enum class QxMode { kOff, kNorms, kAll };
QxMode qx_mode() {
    const char* e = std::getenv("MOEMESH_CUDA_QX");
    if (e && std::strcmp(e, "0") == 0) return QxMode::kOff;
    if (e && std::strcmp(e, "norms") == 0) return QxMode::kNorms;
    return QxMode::kAll;
}

// Whether environment variable `var` is set to `value` (session 16's A/B switches, read once per
// backend: their defaults and values are documented at the members that hold them).
bool env_is(const char* var, const char* value) {
    const char* e = std::getenv(var);
    return e != nullptr && std::strcmp(e, value) == 0;
}

bool profile_enabled() {
    const char* e = std::getenv("MOEMESH_CUDA_PROFILE");
    return e && std::strcmp(e, "0") != 0 && *e;
}

// Op times for MOEMESH_CUDA_PROFILE: each op between two events recorded on the stream; events are
// read back (and reused) every kBatch ops and at the end.
class OpProfile {
public:
    explicit OpProfile(cudaStream_t s) : s_(s) {}
    ~OpProfile() {
        for (cudaEvent_t e : spare_) (void)cudaEventDestroy(e);
        for (auto& o : open_) (void)cudaEventDestroy(o.a), (void)cudaEventDestroy(o.b);
    }
    template <typename Fn>
    void time(std::string label, Fn&& f) {
        cudaEvent_t a = take(), b = take();
        CUDA_CHECK(cudaEventRecord(a, s_));
        f();
        CUDA_CHECK(cudaEventRecord(b, s_));
        open_.push_back({std::move(label), a, b});
        if (open_.size() >= kBatch) collect();
    }
    // A host-synchronous op (experts through an ExpertBackend): its wall time.
    void add_wall(const std::string& label, double ms) {
        Sum& t = sums_[label];
        t.calls++, t.ms += ms;
    }
    void collect() {
        if (open_.empty()) return;
        CUDA_CHECK(cudaStreamSynchronize(s_));
        for (auto& o : open_) {
            float ms = 0;
            CUDA_CHECK(cudaEventElapsedTime(&ms, o.a, o.b));
            Sum& t = sums_[o.label];
            t.calls++, t.ms += ms;
            spare_.push_back(o.a), spare_.push_back(o.b);
        }
        open_.clear();
    }
    // "| op | calls | total ms | mean us | share |" rows, largest total first.
    std::string report() {
        collect();
        double all = 0;
        for (auto& [k, t] : sums_) all += t.ms;
        std::vector<std::pair<std::string, Sum>> rows(sums_.begin(), sums_.end());
        std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.second.ms > y.second.ms; });
        std::string out = "| op | calls | total ms | mean us | share |\n|---|---|---|---|---|\n";
        for (auto& [k, t] : rows)
            out += str_printf("| %s | %lld | %.3f | %.2f | %.1f%% |\n", k.c_str(), static_cast<long long>(t.calls), t.ms,
                              1e3 * t.ms / static_cast<double>(std::max<int64_t>(t.calls, 1)),
                              all > 0 ? 100.0 * t.ms / all : 0.0);
        out += str_printf("| all | | %.3f | | |\n", all);
        return out;
    }

private:
    static constexpr size_t kBatch = 2048;
    struct Open {
        std::string label;
        cudaEvent_t a, b;
    };
    struct Sum {
        int64_t calls = 0;
        double ms = 0;
    };
    cudaEvent_t take() {
        if (!spare_.empty()) {
            cudaEvent_t e = spare_.back();
            spare_.pop_back();
            return e;
        }
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreate(&e));
        return e;
    }
    cudaStream_t s_;
    std::vector<Open> open_;
    std::vector<cudaEvent_t> spare_;
    std::map<std::string, Sum> sums_;
};

// The profile label of an op from its recording key (op id first; see the enqueue calls).
std::string op_label(const int64_t* k, size_t n_key) {
    static const char* const kNames[] = {"?",           "upload",        "download",   "matmul",      "rmsnorm",
                                         "rmsnorm_gated", "l2norm_rows", "swiglu",     "add",         "mul_sigmoid",
                                         "add_gated_rows", "copy_rows",  "rope",       "store_kv",    "attention",
                                         "route (softmax + top-k)", "moe (resident: 3 matmul_id + swiglu + combine)",
                                         "delta_gates", "conv1d_silu",   "delta_rule", "matmul_many",
                                         "rope + store_kv (q, k, v)", "add + rmsnorm",
                                         "q/k rmsnorm + rope + store_kv",
                                         "moe prompt, per (token, expert) pair", "argmax",
                                         "router (GEMV + softmax + top-k)",
                                         "o projection + add + rmsnorm", "top-k",
                                         "moe (resident) + add + rmsnorm",
                                         "q/k/v + q/k rmsnorm + rope + store_kv"};
    const int64_t id = n_key ? k[0] : 0;
    std::string name = id >= 0 && id < static_cast<int64_t>(sizeof(kNames) / sizeof(kNames[0])) ? kNames[id] : "?";
    if (id == 3 && n_key >= 7)  // {3, type, W, n_out, k, x, m, y}
        name += str_printf(" %s %lldx%lld m=%lld", ggml_type_name(static_cast<GgmlType>(k[1])),
                           static_cast<long long>(k[3]), static_cast<long long>(k[4]), static_cast<long long>(k[6]));
    if (id == 14 && n_key >= 6) name += k[5] == 1 ? " (decode)" : " (prompt)";   // n_tokens
    if (id == 19 && n_key >= 9) name += k[8] == 1 ? " (decode)" : " (prompt)";   // n_tokens
    if (id == 20 && n_key >= 5) {  // {20, type, k, x, n, then (W, n_out, y) per product}
        int64_t rows = 0;
        for (size_t i = 6; i < n_key; i += 3) rows += k[i];
        name += str_printf(" %s %lld products, %lld rows x %lld, m=1 (one launch)",
                           ggml_type_name(static_cast<GgmlType>(k[1])), static_cast<long long>(k[4]),
                           static_cast<long long>(rows), static_cast<long long>(k[2]));
    }
    return name;
}

// One layer's stacked routed experts in VRAM: gate/up [E, I, H], down [E, H, I] (GGUF layout).
struct ResidentExperts {
    GgmlType tg{}, tu{}, td{};
    const uint8_t* gate = nullptr;
    const uint8_t* up = nullptr;
    const uint8_t* down = nullptr;
    size_t mb_g = 0, mb_u = 0, mb_d = 0;  // bytes of one expert's matrix
};

class CudaBackend final : public Backend {
public:
    CudaBackend(int index, std::string name) : index_(index), name_(std::move(name)), defer_(graphs_enabled()) {
        CUDA_CHECK(cudaStreamCreate(&stream_));  // blocking: ordered with the legacy stream
        if (profile_enabled()) {
            profile_ = std::make_unique<OpProfile>(stream_);
            defer_ = false;  // every op launched (and timed) on its own
        }
        CUDA_CHECK(cudaMalloc(&d_p0_, sizeof(int32_t)));
        CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&h_p0_), sizeof(int32_t), cudaHostAllocDefault));
        CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&h_up_), kUploadCap, cudaHostAllocDefault));
    }
    ~CudaBackend() override {
        flush();
        if (profile_) {
            std::fprintf(stderr, "%s: op profile (MOEMESH_CUDA_PROFILE; graphs off, times between events on the stream):\n%s",
                         name().c_str(), profile_->report().c_str());
            profile_.reset();
        }
        const size_t n_segs = segs_.size();
        drop_segments(0);
        (void)cudaFreeHost(h_dl_);
        (void)cudaFreeHost(h_up_);
        (void)cudaFreeHost(h_p0_);
        (void)cudaFree(d_p0_);
        (void)cudaStreamDestroy(stream_);
        if (replays_ > 0 || captures_ > 0) {
            const double n = static_cast<double>(std::max<int64_t>(replays_, 1));
            std::fprintf(stderr,
                         "%s: decode graph: %lld capture(s), %lld replay(s) in %zu segment(s), %lld recorded step(s) "
                         "run op by op; a replayed step %.0f us from its first op recorded to done (recording %.0f us, "
                         "then %.0f us waiting for the GPU)\n",
                         name().c_str(), static_cast<long long>(captures_), static_cast<long long>(replays_),
                         n_segs, static_cast<long long>(eager_), step_us_ / n, record_us_ / n, wait_us_ / n);
        }
    }
    std::string name() const override { return "cuda:" + std::to_string(index_); }
    bool host_memory() const override { return false; }

    Buffer alloc(size_t bytes, bool zero) override {
        StatusOr<Buffer> b = try_alloc(bytes, zero, "a buffer");
        if (!b.ok()) {
            // try_alloc ran what was recorded: the step so far is done, and no op is left recorded
            // to name a twin that the failed op may have been about to write.
            qx_src_ = nullptr;
            throw BackendOutOfMemory{b.status()};
        }
        return std::move(b).value();
    }
    StatusOr<Buffer> try_alloc(size_t bytes, bool zero, const char* what) override {
        flush();  // a recorded op may name a buffer this allocation replaces
        void* p = nullptr;
        const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
        if (e == cudaErrorMemoryAllocation) {
            (void)cudaGetLastError();  // (not sticky: the context stays usable)
            size_t free_b = 0, total_b = 0;
            CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
            return MM_ERROR("%s: out of memory for %s: %s asked, %s free of %s", name().c_str(), what,
                            format_bytes(bytes).c_str(), format_bytes(free_b).c_str(), format_bytes(total_b).c_str());
        }
        CUDA_CHECK(e);
        if (zero) CUDA_CHECK(cudaMemset(p, 0, std::max<size_t>(bytes, 1)));
        sizes_[p] = bytes;
        return Buffer(p, bytes, free_device);
    }
    // Tensors never uploaded: token_embd when an output matrix exists (its rows are dequantized on
    // the host) and the multi-token-prediction blocks past the trunk.
    static bool not_uploaded(const GgufFile& f, const ModelConfig& c, const GgufTensor& t) {
        if (t.name == tensor_name(Tensor::kTokenEmbd) && f.tensor(tensor_name(Tensor::kOutput)) != nullptr) return true;
        int layer = -1;
        return std::sscanf(t.name.c_str(), "blk.%d.", &layer) == 1 && layer >= c.n_layer;
    }
    // The weights this backend will be given (every uploaded tensor, less the routed experts when
    // they live elsewhere) against the device's free memory.
    Status check_fits(const GgufFile& f, const ModelConfig& c, bool experts_elsewhere) override {
        size_t need = 0, experts = 0;
        for (const GgufTensor& t : f.tensors()) {
            if (not_uploaded(f, c, t)) continue;
            const bool routed = is_routed_expert_tensor(t.name);
            if (routed) experts += t.nbytes;
            if (routed && experts_elsewhere) continue;
            need += t.nbytes;
        }
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        if (need <= free_b) return Status();
        if (experts_elsewhere)
            return MM_ERROR("%s: the weights that stay on %s take %s and it has %s free (of %s), even with the routed "
                            "experts elsewhere; run it with --device cpu",
                            f.path().c_str(), name().c_str(), format_bytes(need).c_str(), format_bytes(free_b).c_str(),
                            format_bytes(total_b).c_str());
        return MM_ERROR("%s: its weights take %s on %s, which has %s free (of %s); --device-budget auto (or a SIZE) "
                        "keeps the routed experts (%s) in a VRAM cache of what is left (or SIZE) backed by host "
                        "memory, or run it with --device cpu",
                        f.path().c_str(), format_bytes(need).c_str(), name().c_str(), format_bytes(free_b).c_str(),
                        format_bytes(total_b).c_str(), format_bytes(experts).c_str());
    }
    void to_device(void* dst, const void* src, size_t bytes) override {
        if (!defer_ || bytes > kUploadCap - up_used_) {
            flush();
            CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
            qx_src_ = nullptr;  // (not through enqueue_key)
            return;
        }
        // Staged in pinned memory now, copied in stream order (a memcpy node of the graph).
        const size_t off = up_used_;
        std::memcpy(h_up_ + off, src, bytes);
        up_used_ += (bytes + 255) / 256 * 256;
        uint8_t* from = h_up_ + off;
        enqueue({1, P(dst), static_cast<int64_t>(bytes), static_cast<int64_t>(off)}, [=, this](bool) {
            CUDA_CHECK(cudaMemcpyAsync(dst, from, bytes, cudaMemcpyHostToDevice, stream_));
        });
    }
    void to_host(void* dst, const void* src, size_t bytes) override {
        if (dl_cap_ < bytes) {
            flush();
            (void)cudaFreeHost(h_dl_);
            CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&h_dl_), bytes, cudaHostAllocDefault));
            dl_cap_ = bytes;
        }
        uint8_t* to = h_dl_;
        enqueue({2, P(src), static_cast<int64_t>(bytes), P(to)}, [=, this](bool) {
            CUDA_CHECK(cudaMemcpyAsync(to, src, bytes, cudaMemcpyDeviceToHost, stream_));
        });
        flush();
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::memcpy(dst, to, bytes);
    }
    BackendWeight upload(const Weight& w) override {
        if (!w) return {};
        auto it = uploaded_.find(w.data);  // tied embeddings: token_embd once
        if (it != uploaded_.end()) return it->second;
        const size_t bytes = w.row_bytes * static_cast<size_t>(w.ne[1]);
        BackendWeight bw{w.type, keep(w.data, bytes), w.ne[1], w.ne[0]};
        uploaded_.emplace(w.data, bw);
        return bw;
    }
    const float* upload(const std::vector<float>& v) override {
        return static_cast<const float*>(keep(v.data(), sizeof(float) * v.size()));
    }

    // Every matrix the forward pass multiplies on the GPU must have a CUDA kernel; say which one does
    // not before anything runs (the CPU backend takes more types). Not multiplied here: token_embd
    // when an output matrix exists (rows are dequantized on the host), ssm_conv1d (taps are uploaded
    // as f32), 1-D tensors, and multi-token-prediction blocks past the trunk.
    static Status check_matrix_types(const GgufFile& f, const ModelConfig& c) {
        for (const GgufTensor& t : f.tensors()) {
            if (t.n_dims < 2 || cuda::matmul_supported(t.type)) continue;
            if (not_uploaded(f, c, t)) continue;
            if (t.name.find(".ssm_conv1d.") != std::string::npos) continue;
            return MM_ERROR("%s: tensor '%s' has type %s, which the CUDA backend cannot multiply yet (it has F32, "
                            "F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, IQ4_NL, IQ4_XS, MXFP4 and the IQ1/IQ2/IQ3 "
                            "types); run it with --device cpu",
                            f.path().c_str(), t.name.c_str(), ggml_type_name(t.type));
        }
        return Status();
    }

    Status load_experts(const GgufFile& f, const ModelConfig& c, const ExpertBackendFactory& factory,
                        ThreadPool& pool) override {
        H_ = c.n_embd;
        count_.assign(static_cast<size_t>(c.n_expert), 0);
        MM_RETURN_IF_ERROR(check_matrix_types(f, c));
        if (c.n_expert > 1024 || c.n_expert_used > 32)
            return MM_ERROR("%s: the CUDA router handles at most 1024 experts, top-32 (model: %lld, top-%lld)",
                            f.path().c_str(), static_cast<long long>(c.n_expert),
                            static_cast<long long>(c.n_expert_used));
        if (factory) {  // experts elsewhere (workers, a host cache): staged through host memory
            MM_ASSIGN_OR_RETURN(host_experts_, factory(f, c, pool));
            // A VRAM expert cache on this device (`--device-budget`): device pointers, no host round trip.
            dev_experts_ = dynamic_cast<CudaExpertBackend*>(host_experts_.get());
            if (dev_experts_ && dev_experts_->compute().device() != index_)
                return MM_ERROR("%s: the expert cache is on cuda:%d, not on this backend's device",
                                name().c_str(), dev_experts_->compute().device());
            return Status();
        }
        size_t total = 0;
        for (int il = 0; il < c.n_layer; ++il) {
            MM_ASSIGN_OR_RETURN(LayerExpertWeights w, layer_expert_weights(f, c, il));
            for (const Weight* t : {&w.gate, &w.up, &w.down}) {
                if (!cuda::matmul_supported(t->type))
                    return MM_ERROR("%s: expert tensor of layer %d has type %s, which the CUDA backend lacks",
                                    f.path().c_str(), il, ggml_type_name(t->type));
            }
            I_ = w.gate.ne[1];
            ResidentExperts r;
            r.tg = w.gate.type, r.tu = w.up.type, r.td = w.down.type;
            // mb_*: the stride from one expert's matrix to the next (matmul_id's matrix_bytes).
            r.mb_g = w.gate.expert_stride, r.mb_u = w.up.expert_stride, r.mb_d = w.down.expert_stride;
            const auto E = static_cast<size_t>(c.n_expert);
            if (w.fused_gate_up()) {  // one upload of ffn_gate_up_exps; up starts I rows into each expert
                r.gate = static_cast<const uint8_t*>(keep(w.gate.data, r.mb_g * E));
                r.up = r.gate + (w.up.data - w.gate.data);
                total += r.mb_g * E;
            } else {
                r.gate = static_cast<const uint8_t*>(keep(w.gate.data, r.mb_g * E));
                r.up = static_cast<const uint8_t*>(keep(w.up.data, r.mb_u * E));
                total += (r.mb_g + r.mb_u) * E;
            }
            r.down = static_cast<const uint8_t*>(keep(w.down.data, r.mb_d * E));
            total += r.mb_d * E;
            experts_.push_back(r);
        }
        // cuBLAS's library is opened here (its kernels load lazily, at their first use in a prompt);
        // ours were loaded when the device started (make_cuda_backend: load_own_kernels).
        std::string blas;
        const bool blas_ok = cuda::blas_ready(&blas);
        const cuda::KernelLoad kl = cuda::load_own_kernels();
        char kernels[160];
        if (kl.error.empty())
            std::snprintf(kernels, sizeof kernels, "%d kernels loaded (%.0f ms)", kl.functions, kl.ms);
        else
            std::snprintf(kernels, sizeof kernels, "kernels load at first use (%s)", kl.error.c_str());
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        std::fprintf(stderr,
                     "%s: %s, %.2f GiB of weights resident (%.2f GiB routed experts), %.2f GiB free; prompt "
                     "products: %s; %s\n",
                     name().c_str(), name_.c_str(), resident_ / 1073741824.0, total / 1073741824.0,
                     free_b / 1073741824.0,
                     blas_ok ? ("cuBLAS (" + blas + ")").c_str() : ("built-in kernel: " + blas).c_str(), kernels);
        return Status();
    }

    void matmul(const BackendWeight& w, const float* x, int64_t m, float* y) override {
        const uint8_t* qx = m == 1 && cuda::qx_takes(w.type, w.k, w.n_out) ? quantized(x, w.k) : nullptr;
        enqueue({3, static_cast<int64_t>(w.type), P(w.data), w.n_out, w.k, P(x), m, P(y), P(qx)}, [=, this](bool) {
            if (!qx || !cuda::matmul_qx(w.type, w.data, w.n_out, w.k, qx, y, stream_))
                cuda::matmul(w.type, w.data, w.n_out, w.k, x, m, y, stream_);
        });
        forget_qx_if(y);
    }
    // Single-row products of one x and weight type (a decode step's q/k/v) in one launch, the same
    // bits as one by one; anything else one by one.
    void matmul_many(const MatmulCall* calls, int n) override {
        if (!one_launch(calls, n)) return Backend::matmul_many(calls, n);
        record_many(calls, n, nullptr);
    }
    // A decode token's q/k/v with each head's norms + rope + KV stores in the GEMV's last block for
    // its rows (cuda::QkvRope; MOEMESH_CUDA_QKV_ROPE=split: the two ops), where it can be.
    void matmul_qkv_rope_store_kv(const MatmulCall* qkv, const float* q_norm, const float* k_norm, float eps, int64_t n,
                                  int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim, int64_t p0,
                                  const RopeParams& rp, void* k_cache, void* v_cache, bool f16) override {
        if (!qkv_rope_fused_ || n != 1 || p0 > INT32_MAX - n || !q_norm || !k_norm || !one_launch(qkv, 3))
            return Backend::matmul_qkv_rope_store_kv(qkv, q_norm, k_norm, eps, n, n_head, n_head_kv, head_dim, rot_dim,
                                                     p0, rp, k_cache, v_cache, f16);
        note_step(p0, n);
        const RopeCall rc{qkv[0].y, qkv[1].y, qkv[2].y, q_norm,    k_norm,  eps,     n,  n_head,
                          n_head_kv, head_dim, rot_dim,  p0,        rp,      k_cache, v_cache, f16};
        record_many(qkv, 3, &rc);
    }
    bool one_launch(const MatmulCall* calls, int n) const {
        bool one = n >= 2 && n <= cuda::kMultiGemvMax;
        for (int i = 0; one && i < n; ++i)
            one = calls[i].m == 1 && calls[i].x == calls[0].x && calls[i].w->type == calls[0].w->type &&
                  calls[i].w->k == calls[0].w->k;
        return one;
    }
    // rope_store_kv's arguments.
    struct RopeCall {
        float* q;
        float* k;
        const float* v;
        const float* q_norm;
        const float* k_norm;
        float eps;
        int64_t n, n_head, n_head_kv, head_dim, rot_dim, p0;
        RopeParams rp;
        void* k_cache;
        void* v_cache;
        bool f16;
    };
    // r's fields appended to an op's recording key.
    void append_rope_key(std::vector<int64_t>& key, const RopeCall& r) const {
        key.insert(key.end(), {P(r.q), P(r.k), P(r.v), P(r.q_norm), P(r.k_norm), F(r.eps), r.n, r.n_head, r.n_head_kv,
                               r.head_dim, r.rot_dim, F(r.rp.theta), F(r.rp.freq_scale), F(r.rp.ext_factor),
                               F(r.rp.attn_factor), F(r.rp.corr_low), F(r.rp.corr_high), P(r.k_cache), P(r.v_cache),
                               r.f16});
    }
    // rope_store_kv's launches (dev: p0 from d_p0_, a graph's replay).
    void launch_rope(const RopeCall& r, bool dev) {
        const int32_t* p0_dev = dev ? d_p0_ : nullptr;
        const auto pos = static_cast<int32_t>(r.p0);
        if (cuda::norm_rope_store_kv(r.q, r.k, r.v, r.q_norm, r.k_norm, r.eps, r.n, r.n_head, r.n_head_kv, r.head_dim,
                                     r.rot_dim, pos, p0_dev, r.rp, r.k_cache, r.v_cache, r.f16, stream_))
            return;  // both norms in the one launch
        if (r.q_norm) cuda::rmsnorm(r.q, r.q_norm, r.q, r.n * r.n_head, r.head_dim, r.eps, stream_);
        if (r.k_norm) cuda::rmsnorm(r.k, r.k_norm, r.k, r.n * r.n_head_kv, r.head_dim, r.eps, stream_);
        cuda::rope_store_kv(r.q, r.k, r.v, r.n, r.n_head, r.n_head_kv, r.head_dim, r.rot_dim, pos, p0_dev, r.rp,
                            r.k_cache, r.v_cache, r.f16, stream_);
    }
    // matmul_many's one launch (one_launch(calls, n)), recorded; with rope (n == 3: q, k, v) also
    // rope_store_kv of them, in the GEMV's per-head last blocks where cuda::QkvRope can.
    void record_many(const MatmulCall* calls, int n, const RopeCall* rope) {
        std::array<const void*, cuda::kMultiGemvMax> w{};
        std::array<int64_t, cuda::kMultiGemvMax> n_out{};
        std::array<float*, cuda::kMultiGemvMax> y{};
        for (int i = 0; i < n; ++i) w[i] = calls[i].w->data, n_out[i] = calls[i].w->n_out, y[i] = calls[i].y;
        const GgmlType t = calls[0].w->type;
        const int64_t k = calls[0].w->k;
        const float* x = calls[0].x;
        const uint8_t* qx = quantized(x, k);
        std::vector<int64_t> key = {rope ? 30 : 20, static_cast<int64_t>(t), k, P(x), n, P(qx)};
        for (int i = 0; i < n; ++i) key.insert(key.end(), {P(w[i]), n_out[i], P(y[i])});
        std::optional<RopeCall> rc;
        unsigned* ctr = nullptr;
        if (rope) {
            rc = *rope;
            ctr = counters(qkv_rope_ctr_, rope->n_head + 2 * rope->n_head_kv);
            append_rope_key(key, *rope);
            key.push_back(P(ctr));
        }
        enqueue(key, [=, this](bool dev) {
            if (rc) {
                const cuda::QkvRope qr{rc->q_norm,   rc->k_norm,  rc->eps,     rc->n_head, rc->n_head_kv,
                                       rc->head_dim, rc->rot_dim, static_cast<int32_t>(rc->p0),
                                       dev ? d_p0_ : nullptr,     rc->rp,      rc->k_cache, rc->v_cache,
                                       rc->f16,      ctr};
                if (cuda::matmul_multi_gemv(t, n, w.data(), n_out.data(), k, x, y.data(), stream_, qx, &qr)) return;
            }
            if (!cuda::matmul_multi_gemv(t, n, w.data(), n_out.data(), k, x, y.data(), stream_, qx))
                for (int i = 0; i < n; ++i) cuda::matmul(t, w[i], n_out[i], k, x, 1, y[i], stream_);
            if (rc) launch_rope(*rc, dev);
        });
        for (int i = 0; i < n; ++i) forget_qx_if(y[i]);
    }
    // The quantized twin of x as a row of k (cuda_ops.h qx_bytes) when the last norm or attention
    // wrote x and it, of that width, and no op that could write x has been recorded since
    // (enqueue_key drops it); else null.
    const uint8_t* quantized(const float* x, int64_t k) const {
        return x != nullptr && x == qx_src_ && k == qx_n_ ? qx_buf_.as<uint8_t>() : nullptr;
    }
    // An op that writes `out`: the twin no longer mirrors it.
    void forget_qx_if(const void* out) {
        if (out == qx_src_) qx_src_ = nullptr;
    }
    // Where a norm (or attention) writing rows × n also writes its quantized twin (a decode row,
    // MOEMESH_CUDA_QX on; the norms keep n <= 4096 in registers, attention any n % 256 == 0). The
    // buffer only grows (a reallocation flushes what was recorded, which used the old one).
    uint8_t* qx_target(int64_t rows, int64_t n, bool norm = true) {
        if (qx_mode_ == QxMode::kOff || (!norm && qx_mode_ != QxMode::kAll) || rows != 1 ||
            (norm ? !cuda::qx_norm_ok(n) : n % 256 != 0))
            return nullptr;
        qx_n_ = n;  // the width of the twin that qx_src_ will name
        return grow<uint8_t>(qx_buf_, static_cast<int64_t>(cuda::qx_bytes(n)));
    }
    void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) override {
        uint8_t* qx = qx_target(rows, n);
        enqueue({4, P(x), P(w), P(y), rows, n, F(eps), P(qx)},
                [=, this](bool) { cuda::rmsnorm(x, w, y, rows, n, eps, stream_, qx); });
        qx_src_ = qx ? y : nullptr;
    }
    void add_rmsnorm(float* x, const float* t, const float* w, float* y, int64_t rows, int64_t n,
                     float eps) override {
        uint8_t* qx = qx_target(rows, n);
        enqueue({22, P(x), P(t), P(w), P(y), rows, n, F(eps), P(qx)},
                [=, this](bool) { cuda::add_rmsnorm(x, t, w, y, rows, n, eps, stream_, qx); });
        qx_src_ = qx ? y : nullptr;
    }
    void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n,
                       float eps) override {
        enqueue({5, P(x), P(w), P(z), P(y), rows, n, F(eps)},
                [=, this](bool) { cuda::rmsnorm_gated(x, w, z, y, rows, n, eps, stream_); });
    }
    void l2norm_rows(float* x, int64_t rows, int64_t n, float eps) override {
        enqueue({6, P(x), rows, n, F(eps)}, [=, this](bool) { cuda::l2norm_rows(x, rows, n, eps, stream_); });
    }
    void swiglu(const float* g, const float* u, float* y, int64_t n) override {
        enqueue({7, P(g), P(u), P(y), n}, [=, this](bool) { cuda::swiglu(g, u, y, n, stream_); });
    }
    void add(float* y, const float* x, int64_t n) override {
        enqueue({8, P(y), P(x), n}, [=, this](bool) { cuda::add_inplace(y, x, n, stream_); });
    }
    void mul_sigmoid(float* x, const float* gate, int64_t n) override {
        enqueue({9, P(x), P(gate), n}, [=, this](bool) { cuda::mul_sigmoid(x, gate, n, stream_); });
    }
    void add_gated_rows(float* y, const float* x, const float* gate, int64_t rows, int64_t n) override {
        enqueue({10, P(y), P(x), P(gate), rows, n},
                [=, this](bool) { cuda::add_gated_rows(y, x, gate, rows, n, stream_); });
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows,
                   int64_t cols) override {
        if (rows <= 0 || cols <= 0) return;
        enqueue({11, P(dst), dst_stride, P(src), src_stride, rows, cols}, [=, this](bool) {
            CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(float) * dst_stride, src, sizeof(float) * src_stride,
                                         sizeof(float) * cols, rows, cudaMemcpyDeviceToDevice, stream_));
        });
    }
    void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t p0,
              const RopeParams& rp) override {
        int32_t* pos = grow<int32_t>(pos_, T);
        note_step(p0, T);
        enqueue({12, P(x), T, heads, head_dim, rot_dim, F(rp.theta), F(rp.freq_scale), F(rp.ext_factor),
                 F(rp.attn_factor), F(rp.corr_low), F(rp.corr_high), P(pos)},
                [=, this](bool dev) {
            if (dev) cuda::iota_i32_dev(pos, T, d_p0_, stream_);
            else cuda::iota_i32(pos, T, static_cast<int32_t>(p0), stream_);
            cuda::rope_neox(x, T, heads, head_dim, rot_dim, pos, rp, stream_);
        });
    }
    void store_kv(void* cache, int64_t offset, const float* src, int64_t n, bool f16) override {
        // One row (decode) at row offset / n: that position must be the step's p0.
        if (offset % std::max<int64_t>(n, 1) == 0) note_step(offset / std::max<int64_t>(n, 1), 1);
        else graphable_ = false;
        enqueue({13, P(cache), P(src), n, f16}, [=, this](bool dev) {
            if (dev) {
                cuda::store_row_dev(src, cache, n, d_p0_, f16, stream_);
            } else if (f16) {
                cuda::f32_to_f16(src, static_cast<uint16_t*>(cache) + offset, n, stream_);
            } else {
                CUDA_CHECK(cudaMemcpyAsync(static_cast<float*>(cache) + offset, src, sizeof(float) * n,
                                           cudaMemcpyDeviceToDevice, stream_));
            }
        });
    }
    void rope_store_kv(float* q, float* k, const float* v, const float* q_norm, const float* k_norm, float eps,
                       int64_t n, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim, int64_t p0,
                       const RopeParams& rp, void* k_cache, void* v_cache, bool f16) override {
        if (p0 > INT32_MAX - n)
            return Backend::rope_store_kv(q, k, v, q_norm, k_norm, eps, n, n_head, n_head_kv, head_dim, rot_dim, p0, rp,
                                          k_cache, v_cache, f16);
        note_step(p0, n);
        const RopeCall r{q,         k,        v,       q_norm, k_norm, eps,     n,       n_head,
                         n_head_kv, head_dim, rot_dim, p0,     rp,     k_cache, v_cache, f16};
        std::vector<int64_t> key = {q_norm || k_norm ? 23 : 21};
        append_rope_key(key, r);
        enqueue(key, [=, this](bool dev) { launch_rope(r, dev); });
    }
    void attention(const AttentionArgs& a) override {
        cuda::AttentionArgs ga{a.q,      a.k,      a.v,         a.out,     a.n_tokens, a.n_past,
                               a.n_head, a.n_head_kv, a.head_dim, a.kv_f16, a.scale};
        // A decode row's output quantized for the o projection, as the norms do.
        if (a.head_dim % 32 == 0) ga.out_qx = qx_target(a.n_tokens, a.n_head * a.head_dim, false);
        if (attn_merge_fused_) ga.merge_counters = counters(merge_ctr_, a.n_tokens * a.n_head);
        ga.min_splits = attn_min_splits_;
        if (!defer_) {
            void* ws = grow<uint8_t>(attn_ws_, static_cast<int64_t>(cuda::attention_workspace_bytes(ga)));
            if (profile_)
                profile_->time(a.n_tokens == 1 ? "attention (decode)" : "attention (prompt)",
                               [&] { cuda::attention(ga, ws, stream_); });
            else
                cuda::attention(ga, ws, stream_);
            qx_src_ = ga.out_qx ? a.out : nullptr;  // (not through enqueue_key)
            return;
        }
        // The cache's context from its allocation: the workspace and a graph's grid cover all of it.
        int64_t n_ctx = a.n_past + a.n_tokens;
        const auto it = sizes_.find(a.k);
        if (it != sizes_.end()) n_ctx = std::max<int64_t>(n_ctx, static_cast<int64_t>(it->second) /
                                               (a.n_head_kv * a.head_dim * (a.kv_f16 ? 2 : 4)));
        else graphable_ = false;
        void* ws = grow<uint8_t>(attn_ws_, static_cast<int64_t>(cuda::attention_workspace_bytes(ga, n_ctx)));
        note_step(a.n_past, a.n_tokens);
        enqueue({14, P(a.q), P(a.k), P(a.v), P(a.out), a.n_tokens, a.n_head, a.n_head_kv, a.head_dim, a.kv_f16,
                 F(a.scale), P(ws), n_ctx, P(ga.out_qx), P(ga.merge_counters)},
                [=, this](bool dev) {
                    if (dev) cuda::attention_dev(ga, d_p0_, n_ctx, ws, stream_);
                    else cuda::attention(ga, ws, stream_);
                });
        qx_src_ = ga.out_qx ? a.out : nullptr;
    }
    void matmul_add_rmsnorm(const BackendWeight& w, const float* a, int64_t m, float* t, float* x, const float* nw,
                            float* y, float eps) override {
        const int64_t n = w.n_out;
        const uint8_t* qa = o_norm_fused_ && m == 1 ? quantized(a, w.k) : nullptr;
        // y's twin goes where the norm's would, over a's twin (the launch reads it first): only
        // when the buffer needs no growing (a reallocation would free a's twin before the launch).
        const bool fits = qx_mode_ != QxMode::kOff && cuda::qx_norm_ok(n) && qx_buf_.bytes() >= cuda::qx_bytes(n);
        if (!qa || !fits || !cuda::qx_takes(w.type, w.k, n))
            return Backend::matmul_add_rmsnorm(w, a, m, t, x, nw, y, eps);
        unsigned* ctr = counters(o_norm_ctr_);
        uint8_t* qy = qx_buf_.as<uint8_t>();
        enqueue({27, static_cast<int64_t>(w.type), P(w.data), n, w.k, P(a), P(t), P(x), P(nw), P(y), F(eps), P(qa),
                 P(ctr)},
                [=, this](bool) {
                    if (cuda::matmul_qx_add_rmsnorm(w.type, w.data, n, w.k, qa, t, x, nw, y, eps, qy, ctr, stream_))
                        return;
                    if (!cuda::matmul_qx(w.type, w.data, n, w.k, qa, t, stream_))  // (qx_takes said it would)
                        cuda::matmul(w.type, w.data, n, w.k, a, 1, t, stream_);
                    cuda::add_rmsnorm(x, t, nw, y, 1, n, eps, stream_, qy);
                });
        qx_n_ = n, qx_src_ = y;
    }
    void matmul_route(const BackendWeight& w, const float* x, int64_t T, int64_t K, bool norm, float* probs,
                      int32_t* ids, float* wts) override {
        if (!router_fused_ || T != 1 || !cuda::matmul_route_takes(w.type, w.n_out, w.k, K))
            return Backend::matmul_route(w, x, T, K, norm, probs, ids, wts);
        unsigned* ctr = counters(route_ctr_);
        enqueue({26, static_cast<int64_t>(w.type), P(w.data), w.n_out, w.k, P(x), K, norm, P(probs), P(ids), P(wts),
                 P(ctr)},
                [=, this](bool) {
                    (void)cuda::matmul_route(w.type, w.data, w.n_out, w.k, x, K, norm, probs, ids, wts, ctr, stream_);
                });
        forget_qx_if(probs), forget_qx_if(wts);
    }
    void route(float* probs, int64_t T, int64_t E, int64_t K, bool norm, int32_t* ids, float* w) override {
        enqueue({15, P(probs), T, E, K, norm, P(ids), P(w)},
                [=, this](bool) { cuda::softmax_topk(probs, T, E, K, norm, ids, w, stream_); });
        forget_qx_if(probs), forget_qx_if(w);
    }
    void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids) override {
        void* ws = grow<uint8_t>(argmax_ws_, static_cast<int64_t>(cuda::argmax_workspace_bytes(rows, n)));
        enqueue({25, P(x), rows, n, P(ids), P(ws)},
                [=, this](bool) { cuda::argmax_rows(x, rows, n, ids, ws, stream_); });
    }
    void top_k_rows(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals) override {
        void* ws = grow<uint8_t>(top_k_ws_, static_cast<int64_t>(cuda::top_k_workspace_bytes(rows, n, k)));
        enqueue({28, P(x), rows, n, k, P(ids), P(vals), P(ws)},
                [=, this](bool) { cuda::top_k_rows(x, rows, n, k, ids, vals, ws, stream_); });
    }
    Status moe(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
               float* out) override {
        forget_qx_if(out);  // (the host-synchronising paths write out directly)
        if (!host_experts_ && !dev_experts_ && T > 1 && T * K <= prompt_pairs_max()) {
            const ResidentExperts& r = experts_[layer];
            const MoeRows rows = moe_rows(T * K);  // (not in the recorded op: an allocation there could not fail)
            enqueue({24, layer, P(x), T, K, P(ids), P(w), P(out), P(rows.xs), P(rows.g), P(rows.u), P(rows.y)},
                    [=, this, &r](bool) { moe_pairs(r, x, T, K, ids, w, out, rows); });
            return Status();
        }
        if (host_experts_ || T != 1) {  // host-synchronising: whatever was recorded runs first
            flush();
            if (profile_) {
                profile_->collect();  // what ran before, so the wall time below is this op's
                const auto t0 = std::chrono::steady_clock::now();
                Status st = moe_host_sync(layer, x, T, K, ids, w, out);
                CUDA_CHECK(cudaStreamSynchronize(stream_));
                profile_->add_wall(str_printf("moe %s, %s (host wall)", T == 1 ? "decode" : "prompt",
                                              dev_experts_ ? "VRAM expert cache" : host_experts_ ? "expert backend" : "grouped"),
                                   std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
                return st;
            }
            return moe_host_sync(layer, x, T, K, ids, w, out);
        }
        moe_resident_decode(layer, x, K, ids, w, out, nullptr);
        return Status();
    }
    Status moe_add_rmsnorm(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                           float* out, float* r, const float* nw, float* y, int64_t H, float eps) override {
        if (!down_norm_fused_ || host_experts_ || T != 1 || H != H_)
            return Backend::moe_add_rmsnorm(layer, x, T, K, ids, w, out, r, nw, y, H, eps);
        // y's twin goes where the norms' would, over x's twin (gate/up read it in an earlier launch):
        // only when the buffer needs no growing (as matmul_add_rmsnorm).
        const bool fits = qx_mode_ != QxMode::kOff && cuda::qx_norm_ok(H) && qx_buf_.bytes() >= cuda::qx_bytes(H);
        const cuda::AddNorm norm{r, nw, y, eps, fits ? qx_buf_.as<uint8_t>() : nullptr};
        forget_qx_if(out);
        moe_resident_decode(layer, x, K, ids, w, out, &norm);
        if (fits) qx_n_ = H, qx_src_ = y;
        else forget_qx_if(y);
        return Status();
    }
    void delta_gates(const float* ba, const float* dt_bias, const float* a_neg, float* beta, float* g, int64_t T,
                     int64_t Hk, int64_t r) override {
        enqueue({17, P(ba), P(dt_bias), P(a_neg), P(beta), P(g), T, Hk, r},
                [=, this](bool) { cuda::delta_gates(ba, dt_bias, a_neg, beta, g, T, Hk, r, stream_); });
    }
    void conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                     int64_t K) override {
        enqueue({18, P(x), P(w), P(state), P(y), T, C, K},
                [=, this](bool) { cuda::conv1d_silu_causal(x, w, state, y, T, C, K, stream_); });
    }
    // Prompts of at least this many tokens take the chunked form (a few launches' worth of work per
    // 64 tokens instead of one sequential step per token); decode and short prompts the recurrence.
    // Not yet measured on a device: the crossover may be lower.
    static constexpr int64_t kDeltaChunkedMinTokens = 16;
    void delta_rule(const DeltaNetArgs& a) override {
        cuda::DeltaNetArgs d;
        d.q = a.q, d.k = a.k, d.v = a.v, d.g = a.g, d.beta = a.beta, d.state = a.state, d.out = a.out;
        d.n_tokens = a.n_tokens, d.n_k_heads = a.n_k_heads, d.n_v_heads = a.n_v_heads;
        d.k_dim = a.k_dim, d.v_dim = a.v_dim, d.scale = a.scale;
        enqueue({19, P(d.q), P(d.k), P(d.v), P(d.g), P(d.beta), P(d.state), P(d.out), d.n_tokens, d.n_k_heads,
                 d.n_v_heads, d.k_dim, d.v_dim, F(d.scale)},
                [=, this](bool) {
                    if (d.n_tokens >= kDeltaChunkedMinTokens)
                        cuda::gated_delta_rule_chunked(d, 0, stream_);
                    else
                        cuda::gated_delta_rule_recurrent(d, stream_);
                });
    }

    // A MoE that synchronises with the host: experts outside the resident tables, or a prompt chunk.
    Status moe_host_sync(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                         float* out) {
        // Workers over cuda-ipc / nccl (DistributedExpertBackend) also take device pointers.
        if (dev_experts_ || (host_experts_ && host_experts_->takes_device_pointers()))
            return moe_device_cache(layer, x, T, K, ids, w, out);
        if (host_experts_) return moe_staged(layer, x, T, K, ids, w, out);
        return moe_grouped(experts_[layer], x, T, K, ids, w, out);
    }

    // Runs what was recorded: graph segments (those not yet replayed while recording), a capture +
    // replay, or op by op; then waits for the stream. No-op when nothing is recorded.
    void flush() {
        if (pending_.empty()) return;
        if (t_pending == this) t_pending = nullptr;
        const auto t_flush = std::chrono::steady_clock::now();
        const bool graph = graphable_ && decode_step_ && pending_.size() >= 8;
        // The last segment: replayed only when it ends the graphed step (then the whole step was).
        const bool replayed = graph && seg_ok_ && !segs_.empty() && seg_next_ + 1 == segs_.size() && replay_next();
        std::vector<std::function<void(bool)>> ops;
        ops.swap(pending_);
        const size_t ran = launched();
        graphable_ = true, decode_step_ = false, up_used_ = 0;
        seg_next_ = 0, seg_ok_ = true;
        if (replayed) {
            ++replays_, ++g_replays;
        } else if (graph && ran == 0 && sig_ != exec_sig_ && sig_ == prev_sig_ && capture(ops)) {
            // Captured (nothing of the step ran yet): run the new segments.
            for (size_t i = 0; i < segs_.size(); ++i) {
                send_p0();
                CUDA_CHECK(cudaGraphLaunch(segs_[i].exec, stream_));
            }
            ++replays_, ++g_replays;
        } else {
            // Op by op from the first op no segment ran (a step that left the graphed one part-way).
            if (graph && ran > 0 && sig_ != exec_sig_ && sig_ == prev_sig_) {
                CUDA_CHECK(cudaStreamSynchronize(stream_));  // capture records only; ops[0, ran) ran
                (void)capture(ops);
            }
            for (size_t i = ran; i < ops.size(); ++i) ops[i](false);
            if (graph) ++eager_, ++g_eager_steps;
        }
        step_p0_ = -1, p0_sent_ = false;
        prev_sig_.swap(sig_);
        sig_.clear();
        const auto t_wait = std::chrono::steady_clock::now();
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        if (replayed) {  // where a replayed step's time goes (printed when the backend goes away)
            const auto t_end = std::chrono::steady_clock::now();
            using us = std::chrono::duration<double, std::micro>;
            step_us_ += us(t_end - t_step_).count();
            record_us_ += us(t_flush - t_step_).count();
            wait_us_ += us(t_end - t_wait).count();
        }
    }

private:
    static constexpr size_t kUploadCap = size_t{1} << 20;  // pinned staging for to_device within a step

    // Launches f now (graphs off) or records it with its key for the next flush().
    template <typename Fn>
    void enqueue(std::initializer_list<int64_t> key, Fn&& f) {
        enqueue_key(key.begin(), key.size(), std::forward<Fn>(f));
    }
    template <typename Fn>
    void enqueue(const std::vector<int64_t>& key, Fn&& f) {
        enqueue_key(key.data(), key.size(), std::forward<Fn>(f));
    }
    template <typename Fn>
    void enqueue_key(const int64_t* key, size_t n_key, Fn&& f) {
        // The quantized twin stays valid only across ops that do not write the norm's output
        // (matmul, matmul_many, route, resident decode MoE, matmul_route: their outputs are checked
        // by them).
        const int64_t op = n_key ? key[0] : 0;
        if (op != 3 && op != 20 && op != 15 && op != 16 && op != 26) qx_src_ = nullptr;
        if (profile_) return profile_->time(op_label(key, n_key), [&] { f(false); });
        if (!defer_) return f(false);
        if (t_pending && t_pending != this) t_pending->flush();
        t_pending = this;
        if (pending_.empty()) t_step_ = std::chrono::steady_clock::now();
        sig_.push_back(static_cast<int64_t>(n_key));
        sig_.insert(sig_.end(), key, key + n_key);
        pending_.emplace_back(std::forward<Fn>(f));
        // A full segment that matches the graphed step's runs now, while the rest is being recorded.
        if (seg_ok_ && seg_next_ + 1 < segs_.size() && pending_.size() == segs_[seg_next_].op_end)
            seg_ok_ = replay_next();
    }
    // Ops of the step already run by replayed segments (the first ones).
    size_t launched() const { return seg_next_ ? segs_[seg_next_ - 1].op_end : 0; }
    // Replays segment seg_next_ if the ops recorded since the last replayed one are its ops (same
    // keys) and every op of the step so far is graphable (T == 1, one p0).
    bool replay_next() {
        const Segment& sg = segs_[seg_next_];
        const size_t sig_begin = seg_next_ ? segs_[seg_next_ - 1].sig_end : 0;
        if (!graphable_ || pending_.size() != sg.op_end || sig_.size() != sg.sig_end ||
            !std::equal(sig_.begin() + static_cast<std::ptrdiff_t>(sig_begin), sig_.end(),
                        exec_sig_.begin() + static_cast<std::ptrdiff_t>(sig_begin)))
            return false;
        send_p0();
        CUDA_CHECK(cudaGraphLaunch(sg.exec, stream_));
        ++seg_next_;
        return true;
    }
    // The step's p0 to d_p0_ (in stream order, before the first graph kernel that reads it), once it
    // is known: every op that reads d_p0_ notes its p0 before it is recorded.
    void send_p0() {
        if (p0_sent_ || step_p0_ < 0) return;
        *h_p0_ = static_cast<int32_t>(step_p0_);
        CUDA_CHECK(cudaMemcpyAsync(d_p0_, h_p0_, sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
        p0_sent_ = true;
    }
    // An op at positions p0 .. p0 + T - 1: a step is graphed only when all of them agree and T == 1.
    void note_step(int64_t p0, int64_t T) {
        if (T != 1 || (step_p0_ >= 0 && step_p0_ != p0) || p0 > INT32_MAX) graphable_ = false;
        if (step_p0_ < 0) step_p0_ = p0;
    }
    // Records the ops into graphs of seg_ops_ ops each (device-side p0; one graph when seg_ops_ is 0)
    // and makes segs_ run them: each segment's executable graph updated in place where the runtime
    // allows, else instantiated afresh. A capture the runtime refuses turns graphs off for this
    // backend (with a message) instead of aborting.
    bool capture(std::vector<std::function<void(bool)>>& ops) {
        auto give_up = [&](const char* what, cudaError_t e) {
            std::fprintf(stderr, "%s: CUDA graph %s failed (%s); decode steps run op by op from now on\n",
                         name().c_str(), what, cudaGetErrorString(e));
            (void)cudaGetLastError();
            drop_segments(0);
            exec_sig_.clear();
            defer_ = false;
            return false;
        };
        const size_t per = seg_ops_ > 0 ? static_cast<size_t>(seg_ops_) : ops.size();
        const size_t n_segs = (ops.size() + per - 1) / per;
        drop_segments(n_segs);
        segs_.resize(n_segs);
        size_t sig_pos = 0;
        for (size_t si = 0; si < n_segs; ++si) {
            Segment& sg = segs_[si];
            const size_t a = si * per, b = std::min(ops.size(), a + per);
            cudaGraph_t g = nullptr;
            cudaError_t e = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
            if (e != cudaSuccess) return give_up("capture", e);
            for (size_t i = a; i < b; ++i) {
                ops[i](true);
                sig_pos += static_cast<size_t>(sig_[sig_pos]) + 1;  // each op's key: its length, then the key
            }
            e = cudaStreamEndCapture(stream_, &g);
            if (e != cudaSuccess) return give_up("capture", e);
            if (sg.exec) {
                cudaGraphExecUpdateResultInfo info{};
                if (cudaGraphExecUpdate(sg.exec, g, &info) != cudaSuccess) {
                    (void)cudaGetLastError();
                    (void)cudaGraphExecDestroy(sg.exec);
                    sg.exec = nullptr;
                }
            }
            e = cudaSuccess;
            if (!sg.exec) e = cudaGraphInstantiate(&sg.exec, g, 0);
            (void)cudaGraphDestroy(g);
            if (e != cudaSuccess) {
                sg.exec = nullptr;
                return give_up("instantiation", e);
            }
            sg.op_end = b, sg.sig_end = sig_pos;
        }
        exec_sig_ = sig_;
        ++captures_, ++g_captures;
        return true;
    }
    // Destroys the executable graphs of segments keep and later.
    void drop_segments(size_t keep) {
        for (size_t i = keep; i < segs_.size(); ++i)
            if (segs_[i].exec) (void)cudaGraphExecDestroy(segs_[i].exec);
        if (keep < segs_.size()) segs_.resize(keep);
    }

    // A device copy of `bytes` host bytes, kept for the backend's lifetime.
    const void* keep(const void* src, size_t bytes) {
        Buffer b = alloc(bytes, false);
        CUDA_CHECK(cudaMemcpy(b.data(), src, bytes, cudaMemcpyHostToDevice));
        resident_ += bytes;
        return owned_.emplace_back(std::move(b)).data();
    }
    // n block counters of a last-block-done kernel (kernels/cuda/common.cuh): zero when allocated,
    // left zero by every launch. Called while recording (an allocation flushes).
    unsigned* counters(Buffer& b, int64_t n = 1) {
        const size_t bytes = sizeof(unsigned) * static_cast<size_t>(std::max<int64_t>(n, 1));
        if (b.bytes() < bytes) b = alloc(bytes, /*zero=*/true);
        return b.as<unsigned>();
    }
    template <typename T>
    T* grow(Buffer& b, int64_t n) {
        const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
        if (b.bytes() < bytes) b = alloc(bytes, false);
        return b.as<T>();
    }

    // moe()'s decode step with the experts resident, recorded; with norm also its residual add and
    // norm (moe_add_rmsnorm).
    void moe_resident_decode(int layer, const float* x, int64_t K, const int32_t* ids, const float* w, float* out,
                             const cuda::AddNorm* norm) {
        const ResidentExperts& r = experts_[layer];
        float* g = grow<float>(g_, K * I_);
        float* u = grow<float>(u_, K * I_);
        float* y = grow<float>(y_, K * H_);
        decode_step_ = true;
        const uint8_t* qx = quantized(x, H_);
        unsigned* down_ctr = down_combine_fused_ ? counters(down_ctr_) : nullptr;
        std::vector<int64_t> key = {norm ? 29 : 16, layer, P(x), K, P(ids), P(w), P(out), P(g), P(u), P(y), P(qx),
                                    P(down_ctr)};
        std::optional<cuda::AddNorm> nm;
        if (norm) {
            nm = *norm;
            key.insert(key.end(), {P(norm->x), P(norm->w), P(norm->y), F(norm->eps), P(norm->qy)});
        }
        enqueue(key, [=, this, &r](bool) {
            moe_decode(r, x, qx, K, ids, w, out, g, u, y, down_ctr, nm ? &*nm : nullptr);
        });
    }

    // One token: the K selected experts in three expert-indexed GEMVs (weights read once each); the
    // router's ids stay on the device. g, u: [K, I]; y: [K, H].
    // qx: x quantized (or null), read by gate/up where the type takes it.
    // down_ctr: counters() for the down GEMV's weighted sum in its last block (null: a second launch).
    // norm: then norm->x += out and the norm (in that last block too where it can be).
    void moe_decode(const ResidentExperts& r, const float* x, const uint8_t* qx, int64_t K, const int32_t* ids,
                    const float* w, float* out, float* g, float* u, float* y, unsigned* down_ctr,
                    const cuda::AddNorm* norm) {
        const int64_t H = H_, I = I_;
        // gate, up and SwiGLU in one launch where the types allow (same bits as the three below
        // without qx); its blocks also put the selected experts' down matrices into L2 for the
        // down GEMV (MOEMESH_CUDA_EXPERT_PREFETCH)
        if (r.tg != r.tu || r.mb_g != r.mb_u ||
            !cuda::matmul_id_swiglu(r.tg, r.gate, r.up, r.mb_g, ids, K, I, H, x, 0, g, stream_, qx, r.down,
                                    r.mb_d)) {
            cuda::matmul_id(r.tg, r.gate, r.mb_g, ids, K, I, H, x, 0, g, stream_);  // [K, I]
            cuda::matmul_id(r.tu, r.up, r.mb_u, ids, K, I, H, x, 0, u, stream_);    // [K, I]
            cuda::swiglu(g, u, g, K * I, stream_);
        }
        // down and the weighted sum in one launch where the size and type allow (same bits as below;
        // the int8-X GEMV sums in its last block, MOEMESH_CUDA_DOWN_COMBINE), the norm too where given
        // and it can (MOEMESH_CUDA_DOWN_NORM)
        if (norm && cuda::matmul_id_down_combine(r.td, r.down, r.mb_d, ids, w, K, H, I, g, out, stream_, y, down_ctr,
                                                 norm))
            return;
        if (!cuda::matmul_id_down_combine(r.td, r.down, r.mb_d, ids, w, K, H, I, g, out, stream_, y, down_ctr)) {
            cuda::matmul_id(r.td, r.down, r.mb_d, ids, K, H, I, g, I, y, stream_);  // [K, H]
            cuda::moe_combine(y, nullptr, w, out, 1, K, H, stream_);
        }
        if (norm) cuda::add_rmsnorm(norm->x, out, norm->w, norm->y, 1, H, norm->eps, stream_, norm->qy);
    }

    // Prompts of up to this many (token, expert) pairs take moe_pairs, longer ones moe_grouped.
    // MOEMESH_CUDA_PROMPT_PAIRS=N sets it (0: always grouped; read at each prompt chunk; at most
    // 65535, matmul_id's limit on selections).
    static int64_t prompt_pairs_max() {
        const char* e = std::getenv("MOEMESH_CUDA_PROMPT_PAIRS");
        if (e == nullptr || *e == '\0') return 512;
        return std::clamp<int64_t>(std::atoll(e), 0, 65535);
    }

    // The scratch of n (token, expert) rows of a prompt MoE: xs / y [n, H], g / u [n, I].
    struct MoeRows {
        float *xs, *g, *u, *y;
    };
    MoeRows moe_rows(int64_t n) {
        return {grow<float>(xs_, n * H_), grow<float>(g_, n * I_), grow<float>(u_, n * I_), grow<float>(y_, n * H_)};
    }
    // A short prompt chunk as one decode step of T·K selections: each token's row repeated K times,
    // the expert-indexed GEMVs (gate/up/SwiGLU, down) over all pairs, combine. Stays on the device
    // (moe_grouped copies the ids to the host and makes one product per used expert: 1.35 ms per
    // layer of a 16-token prompt on an H200, the whole prompt's time). An expert that several tokens
    // use is read once per token.
    void moe_pairs(const ResidentExperts& r, const float* x, int64_t T, int64_t K, const int32_t* ids,
                   const float* w, float* out, const MoeRows& rows) {
        const int64_t H = H_, I = I_, n = T * K;
        float *xr = rows.xs, *g = rows.g, *u = rows.u, *y = rows.y;
        cuda::repeat_rows(x, xr, T, K, H, stream_);  // [n, H]: pair p = t·K + j has token t's row
        if (r.tg != r.tu || r.mb_g != r.mb_u ||
            !cuda::matmul_id_swiglu(r.tg, r.gate, r.up, r.mb_g, ids, n, I, H, xr, H, g, stream_)) {
            cuda::matmul_id(r.tg, r.gate, r.mb_g, ids, n, I, H, xr, H, g, stream_);  // [n, I]
            cuda::matmul_id(r.tu, r.up, r.mb_u, ids, n, I, H, xr, H, u, stream_);    // [n, I]
            cuda::swiglu(g, u, g, n * I, stream_);
        }
        cuda::matmul_id(r.td, r.down, r.mb_d, ids, n, H, I, g, I, y, stream_);  // [n, H]
        cuda::moe_combine(y, nullptr, w, out, T, K, H, stream_);
    }

    // A prompt chunk: group the T·K (token, expert) pairs by expert on the host, gather each
    // expert's rows into one contiguous block, one matrix product per used expert, combine.
    Status moe_grouped(const ResidentExperts& r, const float* x, int64_t T, int64_t K, const int32_t* ids,
                       const float* w, float* out) {
        const int64_t H = H_, I = I_, n = T * K, E = static_cast<int64_t>(count_.size());
        ids_host_.resize(static_cast<size_t>(n));
        CUDA_CHECK(cudaMemcpy(ids_host_.data(), ids, sizeof(int32_t) * n, cudaMemcpyDeviceToHost));
        std::fill(count_.begin(), count_.end(), 0);
        for (int64_t p = 0; p < n; ++p) ++count_[ids_host_[p]];
        offset_.assign(static_cast<size_t>(E) + 1, 0);
        for (int64_t e = 0; e < E; ++e) offset_[e + 1] = offset_[e] + count_[e];
        // maps_ = [tok: n | slot: n]: block row s holds token tok[s]; pair p = t·K + j sits in row slot[p].
        maps_host_.resize(static_cast<size_t>(2 * n));
        std::vector<int64_t> fill(offset_.begin(), offset_.end() - 1);
        for (int64_t p = 0; p < n; ++p) {
            const int64_t s = fill[ids_host_[p]]++;
            maps_host_[s] = static_cast<int32_t>(p / K);
            maps_host_[n + p] = static_cast<int32_t>(s);
        }
        int32_t* maps = grow<int32_t>(maps_, 2 * n);
        CUDA_CHECK(cudaMemcpy(maps, maps_host_.data(), sizeof(int32_t) * 2 * n, cudaMemcpyHostToDevice));
        const MoeRows rows = moe_rows(n);
        float *xs = rows.xs, *g = rows.g, *u = rows.u, *y = rows.y;
        cuda::gather_rows(x, maps, xs, n, H, stream_);  // [n, H] grouped by expert
        // One product per used expert (cuda::matmul_grouped: the cuBLAS experts' W dequantized many
        // at a time and their GEMMs in grouped calls).
        mats_host_.resize(static_cast<size_t>(3 * E));
        for (int64_t e = 0; e < E; ++e) {
            mats_host_[e] = r.gate + e * r.mb_g;
            mats_host_[E + e] = r.up + e * r.mb_u;
            mats_host_[2 * E + e] = r.down + e * r.mb_d;
        }
        cuda::matmul_grouped(r.tg, mats_host_.data(), count_.data(), offset_.data(), E, I, H, xs, g, stream_);
        cuda::matmul_grouped(r.tu, mats_host_.data() + E, count_.data(), offset_.data(), E, I, H, xs, u, stream_);
        cuda::swiglu(g, u, g, n * I, stream_);
        cuda::matmul_grouped(r.td, mats_host_.data() + 2 * E, count_.data(), offset_.data(), E, H, I, g, y, stream_);
        cuda::moe_combine(y, maps + n, w, out, T, K, H, stream_);
        return Status();
    }

    // Experts in a VRAM cache on this GPU (CudaExpertCompute): only ids and w [T, K] come to the host
    // (the cache plans and pins per expert there); x and out stay in device memory, on this stream.
    Status moe_device_cache(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                            float* out) {
        hw_.resize(static_cast<size_t>(T * K));
        ids_host_.resize(static_cast<size_t>(T * K));
        CUDA_CHECK(cudaMemcpyAsync(ids_host_.data(), ids, sizeof(int32_t) * T * K, cudaMemcpyDeviceToHost, stream_));
        CUDA_CHECK(cudaMemcpyAsync(hw_.data(), w, sizeof(float) * T * K, cudaMemcpyDeviceToHost, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        return host_experts_->moe_forward_device(layer, x, T, K, ids_host_.data(), hw_.data(), out, stream_);
    }

    // Experts outside this GPU: x, ids, w to the host, the ExpertBackend, the result back.
    Status moe_staged(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                      float* out) {
        const int64_t H = H_;
        hx_.resize(static_cast<size_t>(T * H));
        hout_.resize(static_cast<size_t>(T * H));
        hw_.resize(static_cast<size_t>(T * K));
        ids_host_.resize(static_cast<size_t>(T * K));
        CUDA_CHECK(cudaMemcpy(hx_.data(), x, sizeof(float) * T * H, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(ids_host_.data(), ids, sizeof(int32_t) * T * K, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(hw_.data(), w, sizeof(float) * T * K, cudaMemcpyDeviceToHost));
        MM_RETURN_IF_ERROR(host_experts_->moe_forward(layer, hx_.data(), T, K, ids_host_.data(), hw_.data(),
                                                      hout_.data()));
        CUDA_CHECK(cudaMemcpy(out, hout_.data(), sizeof(float) * T * H, cudaMemcpyHostToDevice));
        return Status();
    }

    int index_;
    std::string name_;
    int64_t H_ = 0, I_ = 0;
    size_t resident_ = 0;
    std::deque<Buffer> owned_;
    std::unordered_map<const void*, BackendWeight> uploaded_;
    std::vector<ResidentExperts> experts_;
    std::unique_ptr<ExpertBackend> host_experts_;
    CudaExpertBackend* dev_experts_ = nullptr;  // = host_experts_ when it is a VRAM cache on this device
    Buffer pos_, attn_ws_, g_, u_, y_, xs_, maps_, argmax_ws_, top_k_ws_;
    std::vector<int32_t> ids_host_, maps_host_;
    std::vector<int64_t> count_, offset_;  // [E], [E + 1]
    std::vector<const void*> mats_host_;    // moe_grouped: [gate E | up E | down E] matrix addresses
    std::vector<float> hx_, hout_, hw_;
    std::unordered_map<const void*, size_t> sizes_;  // bytes of each allocation (a KV cache's n_ctx)

    // ---- recording and the decode graph ----
    cudaStream_t stream_ = nullptr;
    bool defer_ = true;                                  // MOEMESH_CUDA_GRAPHS != 0
    std::vector<std::function<void(bool)>> pending_;     // recorded ops; the argument: p0 from d_p0_
    std::vector<int64_t> sig_, prev_sig_, exec_sig_;     // keys of the recorded / previous / graphed step
    bool graphable_ = true, decode_step_ = false;
    int64_t step_p0_ = -1;
    int32_t* d_p0_ = nullptr;                            // device p0 the graph's kernels read
    int32_t* h_p0_ = nullptr;                            // pinned source of d_p0_
    uint8_t* h_up_ = nullptr;                            // pinned to_device staging [kUploadCap]
    size_t up_used_ = 0;
    uint8_t* h_dl_ = nullptr;                            // pinned to_host staging [dl_cap_]
    size_t dl_cap_ = 0;
    // The graphed step in segments: each replays as soon as its ops are recorded (and match), so the
    // GPU runs the first layers while the host records the rest (one whole-step graph left the GPU
    // idle for the recording).
    struct Segment {
        size_t op_end = 0, sig_end = 0;  // end of its ops in the step; end of its keys in exec_sig_
        cudaGraphExec_t exec = nullptr;
    };
    std::vector<Segment> segs_;
    int64_t seg_ops_ = graph_segment_ops();  // MOEMESH_CUDA_GRAPH_SEGMENT
    size_t seg_next_ = 0;   // the next segment to replay (those before it ran: launched())
    bool seg_ok_ = true;    // the step so far is the graphed one
    bool p0_sent_ = false;  // d_p0_ holds this step's p0
    std::chrono::steady_clock::time_point t_step_;  // first op of the step recorded
    double step_us_ = 0, record_us_ = 0, wait_us_ = 0;  // sums over replayed steps
    int64_t captures_ = 0, replays_ = 0, eager_ = 0;
    // ---- decode launches finished in their kernel's last block (common.cuh last_block_done) ----
    // Each with its counters (zero between launches) and a switch that turns it off:
    // attention's merge of its key chunks (MOEMESH_CUDA_ATTN_MERGE=kernel: a second launch);
    const bool attn_merge_fused_ = !env_is("MOEMESH_CUDA_ATTN_MERGE", "kernel");
    Buffer merge_ctr_;  // per (token, head)
    // attention's least chunks per (token, head) (MOEMESH_CUDA_ATTN_MIN_SPLITS=N, 1..64; 1: 256-key
    // chunks, before session 17).
    const int64_t attn_min_splits_ = [] {
        const char* e = std::getenv("MOEMESH_CUDA_ATTN_MIN_SPLITS");
        if (e == nullptr || *e == '\0') return cuda::kAttnMinSplits;
        return std::clamp<int64_t>(std::atoll(e), 1, 64);
    }();
    // the router's softmax + top-k after its GEMV (MOEMESH_CUDA_ROUTER=split: two launches);
    const bool router_fused_ = !env_is("MOEMESH_CUDA_ROUTER", "split");
    Buffer route_ctr_;
    // the residual add + norm after the o projection (MOEMESH_CUDA_O_NORM=split: two launches);
    const bool o_norm_fused_ = !env_is("MOEMESH_CUDA_O_NORM", "split");
    Buffer o_norm_ctr_;
    // the experts' weighted sum after the int8-X down GEMV (MOEMESH_CUDA_DOWN_COMBINE=split: two).
    const bool down_combine_fused_ = !env_is("MOEMESH_CUDA_DOWN_COMBINE", "split");
    // MOEMESH_CUDA_DOWN_NORM=split: a decode layer's residual add + the next layer's input norm as
    // their own launch instead of in the down GEMV's last block (moe_add_rmsnorm; where that block
    // sums the experts, i.e. with the fused down + combine).
    const bool down_norm_fused_ = !env_is("MOEMESH_CUDA_DOWN_NORM", "split");
    Buffer down_ctr_;
    // each head's q/k norms + rope + KV stores after the q/k/v GEMV (MOEMESH_CUDA_QKV_ROPE=split: two).
    const bool qkv_rope_fused_ = !env_is("MOEMESH_CUDA_QKV_ROPE", "split");
    Buffer qkv_rope_ctr_;  // per head of q, k, v
    // ---- the decode norms' quantized X (MOEMESH_CUDA_QX) ----
    QxMode qx_mode_ = qx_mode();
    Buffer qx_buf_;                     // the last norm's row, quantized (cuda::qx_bytes)
    const float* qx_src_ = nullptr;     // the f32 row qx_buf_ holds, while valid
    int64_t qx_n_ = 0;                  // its width
    std::unique_ptr<OpProfile> profile_;  // MOEMESH_CUDA_PROFILE
};

void flush_pending() {
    if (t_pending) t_pending->flush();
}

}  // namespace

CudaGraphStats cuda_graph_stats() { return {g_captures.load(), g_replays.load(), g_eager_steps.load()}; }

StatusOr<std::unique_ptr<Backend>> make_cuda_backend(int index) {
    const char* why = "";
    const int n = cuda::device_count(&why);
    if (n == 0) return MM_ERROR("device cuda:%d: no CUDA device: %s", index, why);
    if (index >= n) return MM_ERROR("device cuda:%d: only %d CUDA device(s) present (cuda:0..cuda:%d)", index, n, n - 1);
    if (const std::string why = cuda::kernels_unavailable(index); !why.empty())
        return MM_ERROR("device %s", why.c_str());
    CUDA_CHECK(cudaSetDevice(index));
    CUDA_CHECK(cuda::use_env_kernel_switches());
    (void)cuda::load_own_kernels();  // not fatal: the load line says why not
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(index, prop.name));
}

}  // namespace moemesh
#endif  // MOEMESH_HAVE_CUDA
