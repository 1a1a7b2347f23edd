// CudaBackend: the Backend of coordinator/backend.h on one GPU. Weights, norm vectors, the routed
// experts, activations and every sequence's KV / conv / recurrent state live in VRAM; the host
// sees only token ids in and logits out (plus the expert ids of a prompt chunk, for grouping).
// All work is queued on the legacy default stream; to_host() (a synchronous copy) waits for it.
//
// Compiled only when the CUDA block of CMakeLists.txt is active (MOEMESH_HAVE_CUDA).
#ifdef MOEMESH_HAVE_CUDA
#include "coordinator/cuda_backend.h"

#include <cstdio>
#include <deque>
#include <unordered_map>

#include "kernels/cuda/cuda_ops.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

void free_device(void* p) { (void)cudaFree(p); }  // may run after the context is gone at exit

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
    CudaBackend(int index, std::string name) : index_(index), name_(std::move(name)) {}
    std::string name() const override { return "cuda:" + std::to_string(index_); }
    bool host_memory() const override { return false; }

    Buffer alloc(size_t bytes, bool zero) override {
        void* p = nullptr;
        CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
        if (zero) CUDA_CHECK(cudaMemset(p, 0, std::max<size_t>(bytes, 1)));
        return Buffer(p, bytes, free_device);
    }
    void to_device(void* dst, const void* src, size_t bytes) override {
        CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    }
    void to_host(void* dst, const void* src, size_t bytes) override {
        CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
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

    Status load_experts(const GgufFile& f, const ModelConfig& c, const ExpertBackendFactory& factory,
                        ThreadPool& pool) override {
        H_ = c.n_embd;
        count_.assign(static_cast<size_t>(c.n_expert), 0);
        if (c.n_expert > 1024 || c.n_expert_used > 32)
            return MM_ERROR("%s: the CUDA router handles at most 1024 experts, top-32 (model: %lld, top-%lld)",
                            f.path().c_str(), static_cast<long long>(c.n_expert),
                            static_cast<long long>(c.n_expert_used));
        if (factory) {  // experts elsewhere (workers, a host cache): staged through host memory
            MM_ASSIGN_OR_RETURN(host_experts_, factory(f, c, pool));
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
            r.mb_g = w.gate.matrix_bytes, r.mb_u = w.up.matrix_bytes, r.mb_d = w.down.matrix_bytes;
            const auto E = static_cast<size_t>(c.n_expert);
            r.gate = static_cast<const uint8_t*>(keep(w.gate.data, r.mb_g * E));
            r.up = static_cast<const uint8_t*>(keep(w.up.data, r.mb_u * E));
            r.down = static_cast<const uint8_t*>(keep(w.down.data, r.mb_d * E));
            total += (r.mb_g + r.mb_u + r.mb_d) * E;
            experts_.push_back(r);
        }
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        std::fprintf(stderr, "%s: %s, %.2f GiB of weights resident (%.2f GiB routed experts), %.2f GiB free\n",
                     name().c_str(), name_.c_str(), resident_ / 1073741824.0, total / 1073741824.0,
                     free_b / 1073741824.0);
        return Status();
    }

    void matmul(const BackendWeight& w, const float* x, int64_t m, float* y) override {
        cuda::matmul(w.type, w.data, w.n_out, w.k, x, m, y);
    }
    void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) override {
        cuda::rmsnorm(x, w, y, rows, n, eps);
    }
    void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n,
                       float eps) override {
        cuda::rmsnorm_gated(x, w, z, y, rows, n, eps);
    }
    void l2norm_rows(float* x, int64_t rows, int64_t n, float eps) override { cuda::l2norm_rows(x, rows, n, eps); }
    void swiglu(const float* g, const float* u, float* y, int64_t n) override { cuda::swiglu(g, u, y, n); }
    void add(float* y, const float* x, int64_t n) override { cuda::add_inplace(y, x, n); }
    void mul_sigmoid(float* x, const float* gate, int64_t n) override { cuda::mul_sigmoid(x, gate, n); }
    void add_gated_rows(float* y, const float* x, const float* gate, int64_t rows, int64_t n) override {
        cuda::add_gated_rows(y, x, gate, rows, n);
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows,
                   int64_t cols) override {
        if (rows <= 0 || cols <= 0) return;
        CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(float) * dst_stride, src, sizeof(float) * src_stride,
                                     sizeof(float) * cols, rows, cudaMemcpyDeviceToDevice, nullptr));
    }
    void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t p0, float theta) override {
        int32_t* pos = grow<int32_t>(pos_, T);
        cuda::iota_i32(pos, T, static_cast<int32_t>(p0));
        cuda::rope_neox(x, T, heads, head_dim, rot_dim, pos, theta);
    }
    void store_kv(void* cache, int64_t offset, const float* src, int64_t n, bool f16) override {
        if (f16) {
            cuda::f32_to_f16(src, static_cast<uint16_t*>(cache) + offset, n);
        } else {
            CUDA_CHECK(cudaMemcpyAsync(static_cast<float*>(cache) + offset, src, sizeof(float) * n,
                                       cudaMemcpyDeviceToDevice, nullptr));
        }
    }
    void attention(const AttentionArgs& a) override {
        const cuda::AttentionArgs ga{a.q,      a.k,      a.v,         a.out,     a.n_tokens, a.n_past,
                                     a.n_head, a.n_head_kv, a.head_dim, a.kv_f16, a.scale};
        void* ws = grow<uint8_t>(attn_ws_, static_cast<int64_t>(cuda::attention_workspace_bytes(ga)));
        cuda::attention(ga, ws);
    }
    void route(float* probs, int64_t T, int64_t E, int64_t K, bool norm, int32_t* ids, float* w) override {
        cuda::softmax_topk(probs, T, E, K, norm, ids, w);
    }
    Status moe(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
               float* out) override {
        if (host_experts_) return moe_staged(layer, x, T, K, ids, w, out);
        const ResidentExperts& r = experts_[layer];
        return T == 1 ? moe_decode(r, x, K, ids, w, out) : moe_grouped(r, x, T, K, ids, w, out);
    }
    void delta_gates(const float* ba, const float* dt_bias, const float* a_neg, float* beta, float* g, int64_t T,
                     int64_t Hk, int64_t r) override {
        cuda::delta_gates(ba, dt_bias, a_neg, beta, g, T, Hk, r);
    }
    void conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                     int64_t K) override {
        cuda::conv1d_silu_causal(x, w, state, y, T, C, K);
    }
    void delta_rule(const DeltaNetArgs& a) override {
        cuda::DeltaNetArgs d;
        d.q = a.q, d.k = a.k, d.v = a.v, d.g = a.g, d.beta = a.beta, d.state = a.state, d.out = a.out;
        d.n_tokens = a.n_tokens, d.n_k_heads = a.n_k_heads, d.n_v_heads = a.n_v_heads;
        d.k_dim = a.k_dim, d.v_dim = a.v_dim, d.scale = a.scale;
        cuda::gated_delta_rule_recurrent(d);
    }

private:
    // A device copy of `bytes` host bytes, kept for the backend's lifetime.
    const void* keep(const void* src, size_t bytes) {
        Buffer b = alloc(bytes, false);
        to_device(b.data(), src, bytes);
        resident_ += bytes;
        return owned_.emplace_back(std::move(b)).data();
    }
    template <typename T>
    T* grow(Buffer& b, int64_t n) {
        const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
        if (b.bytes() < bytes) b = alloc(bytes, false);
        return b.as<T>();
    }

    // One token: the K selected experts in three expert-indexed GEMVs (weights read once each).
    Status moe_decode(const ResidentExperts& r, const float* x, int64_t K, const int32_t* ids, const float* w,
                      float* out) {
        const int64_t H = H_, I = I_;
        float* g = grow<float>(g_, K * I);
        float* u = grow<float>(u_, K * I);
        float* y = grow<float>(y_, K * H);
        cuda::matmul_id(r.tg, r.gate, r.mb_g, ids, K, I, H, x, 0, g);  // [K, I]
        cuda::matmul_id(r.tu, r.up, r.mb_u, ids, K, I, H, x, 0, u);    // [K, I]
        cuda::swiglu(g, u, g, K * I);
        cuda::matmul_id(r.td, r.down, r.mb_d, ids, K, H, I, g, I, y);  // [K, H]
        cuda::moe_combine(y, nullptr, w, out, 1, K, H);
        return Status();
    }

    // A prompt chunk: group the T·K (token, expert) pairs by expert on the host, gather each
    // expert's rows into one contiguous block, one matrix product per used expert, combine.
    Status moe_grouped(const ResidentExperts& r, const float* x, int64_t T, int64_t K, const int32_t* ids,
                       const float* w, float* out) {
        const int64_t H = H_, I = I_, n = T * K, E = static_cast<int64_t>(count_.size());
        ids_host_.resize(static_cast<size_t>(n));
        to_host(ids_host_.data(), ids, sizeof(int32_t) * n);
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
        to_device(maps, maps_host_.data(), sizeof(int32_t) * 2 * n);
        float* xs = grow<float>(xs_, n * H);
        float* g = grow<float>(g_, n * I);
        float* u = grow<float>(u_, n * I);
        float* y = grow<float>(y_, n * H);
        cuda::gather_rows(x, maps, xs, n, H);  // [n, H] grouped by expert
        for (int64_t e = 0; e < E; ++e) {
            const int64_t m = count_[e], o = offset_[e];
            if (m == 0) continue;
            cuda::matmul(r.tg, r.gate + e * r.mb_g, I, H, xs + o * H, m, g + o * I);
            cuda::matmul(r.tu, r.up + e * r.mb_u, I, H, xs + o * H, m, u + o * I);
        }
        cuda::swiglu(g, u, g, n * I);
        for (int64_t e = 0; e < E; ++e) {
            const int64_t m = count_[e], o = offset_[e];
            if (m == 0) continue;
            cuda::matmul(r.td, r.down + e * r.mb_d, H, I, g + o * I, m, y + o * H);
        }
        cuda::moe_combine(y, maps + n, w, out, T, K, H);
        return Status();
    }

    // Experts outside this GPU: x, ids, w to the host, the ExpertBackend, the result back.
    Status moe_staged(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                      float* out) {
        const int64_t H = H_;
        hx_.resize(static_cast<size_t>(T * H));
        hout_.resize(static_cast<size_t>(T * H));
        hw_.resize(static_cast<size_t>(T * K));
        ids_host_.resize(static_cast<size_t>(T * K));
        to_host(hx_.data(), x, sizeof(float) * T * H);
        to_host(ids_host_.data(), ids, sizeof(int32_t) * T * K);
        to_host(hw_.data(), w, sizeof(float) * T * K);
        MM_RETURN_IF_ERROR(host_experts_->moe_forward(layer, hx_.data(), T, K, ids_host_.data(), hw_.data(),
                                                      hout_.data()));
        to_device(out, hout_.data(), sizeof(float) * T * H);
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
    Buffer pos_, attn_ws_, g_, u_, y_, xs_, maps_;
    std::vector<int32_t> ids_host_, maps_host_;
    std::vector<int64_t> count_, offset_;  // [E], [E + 1]
    std::vector<float> hx_, hout_, hw_;
};

}  // namespace

StatusOr<std::unique_ptr<Backend>> make_cuda_backend(int index) {
    const char* why = "";
    const int n = cuda::device_count(&why);
    if (n == 0) return MM_ERROR("device cuda:%d: no CUDA device: %s", index, why);
    if (index >= n) return MM_ERROR("device cuda:%d: only %d CUDA device(s) present (cuda:0..cuda:%d)", index, n, n - 1);
    CUDA_CHECK(cudaSetDevice(index));
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(index, prop.name));
}

}  // namespace moemesh
#endif  // MOEMESH_HAVE_CUDA
