// CpuBackend: the Backend of coordinator/backend.h over kernels/ops.h (host memory), and the
// --device parser.
#include "coordinator/backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <numeric>

#include "common/half.h"
#include "common/placement.h"
#include "coordinator/models/model_base.h"
#include "coordinator/sampler.h"
#include "worker/expert_executor.h"
#ifdef MOEMESH_HAVE_CUDA
#include "coordinator/cuda_backend.h"
#endif

namespace moemesh {

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // ggml_softplus

void free_host(void* p) { std::free(p); }

// probs [T, E] router logits → ids/w [T, K]: softmax over all E, top-K (ties: lower id first),
// renormalised when `norm` (llama.cpp's build_moe_ffn with softmax gating). order: scratch.
void route_topk(float* probs, int64_t T, int64_t E, int64_t K, bool norm, int32_t* ids, float* w,
                std::vector<int32_t>& order) {
    order.resize(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
        float* p = &probs[t * E];
        softmax_inplace(p, E);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + K, order.end(),
                          [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
        double sum = 0.0;
        for (int64_t j = 0; j < K; ++j) {
            ids[t * K + j] = order[j];
            w[t * K + j] = p[order[j]];
            sum += p[order[j]];
        }
        if (norm) {
            // llama.cpp clamps the sum at 2^-14 before dividing.
            const float s = std::max(static_cast<float>(sum), 6.103515625e-5f);
            for (int64_t j = 0; j < K; ++j) w[t * K + j] /= s;
        }
    }
}

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(ThreadPool& pool) : pool_(pool) {}
    std::string name() const override { return "cpu"; }
    bool host_memory() const override { return true; }

    Buffer alloc(size_t bytes, bool zero) override {
        const size_t n = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, n);
        if (!p) throw BackendOutOfMemory{
            MM_ERROR("cpu: out of memory for a buffer of %s", format_bytes(n).c_str())};
        if (zero) std::memset(p, 0, n);
        return Buffer(p, bytes, free_host);
    }
    void to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    BackendWeight upload(const Weight& w) override { return {w.type, w.data, w.ne[1], w.ne[0]}; }
    const float* upload(const std::vector<float>& v) override { return vectors_.emplace_back(v).data(); }
    Status load_experts(const GgufFile& f, const ModelConfig& c, const ExpertBackendFactory& factory,
                        ThreadPool& pool) override {
        if (factory) {
            MM_ASSIGN_OR_RETURN(experts_, factory(f, c, pool));
        } else {
            MM_ASSIGN_OR_RETURN(experts_, LocalExpertExecutor::create(f, c, pool));
        }
        return Status();
    }

    void matmul(const BackendWeight& w, const float* x, int64_t m, float* y) override {
        moemesh::matmul(pool_, w.type, w.data, w.n_out, w.k, x, m, y);
    }
    void matmul_many(const MatmulCall* calls, int n) override {
        jobs_.clear();
        for (int i = 0; i < n; ++i) {
            const BackendWeight& w = *calls[i].w;
            jobs_.push_back({w.type, w.data, w.n_out, w.k, calls[i].x, calls[i].m, calls[i].y});
        }
        moemesh::matmul_many(pool_, jobs_.data(), static_cast<int64_t>(jobs_.size()));
    }
    void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) override {
        moemesh::rmsnorm(x, w, y, rows, n, eps);
    }
    void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n,
                       float eps) override {
        moemesh::rmsnorm_gated(x, w, z, y, rows, n, eps);
    }
    void l2norm_rows(float* x, int64_t rows, int64_t n, float eps) override { moemesh::l2norm_rows(x, rows, n, eps); }
    void swiglu(const float* g, const float* u, float* y, int64_t n) override { moemesh::swiglu(g, u, y, n); }
    void add(float* y, const float* x, int64_t n) override {
        for (int64_t i = 0; i < n; ++i) y[i] += x[i];
    }
    void mul_sigmoid(float* x, const float* gate, int64_t n) override {
        for (int64_t i = 0; i < n; ++i) x[i] *= sigmoid(gate[i]);
    }
    void add_gated_rows(float* y, const float* x, const float* gate, int64_t rows, int64_t n) override {
        for (int64_t t = 0; t < rows; ++t) {
            const float gt = sigmoid(gate[t]);
            for (int64_t i = 0; i < n; ++i) y[t * n + i] += x[t * n + i] * gt;
        }
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows,
                   int64_t cols) override {
        for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, sizeof(float) * cols);
    }
    void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t p0,
              const RopeParams& rp) override {
        pos_.resize(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) pos_[t] = static_cast<int32_t>(p0 + t);
        rope_neox(x, T, heads, head_dim, rot_dim, pos_.data(), rp);
    }
    void store_kv(void* cache, int64_t offset, const float* src, int64_t n, bool f16) override {
        if (f16) {
            uint16_t* c = static_cast<uint16_t*>(cache) + offset;
            for (int64_t i = 0; i < n; ++i) c[i] = fp32_to_fp16(src[i]);
        } else {
            std::memcpy(static_cast<float*>(cache) + offset, src, sizeof(float) * n);
        }
    }
    void attention(const AttentionArgs& a) override { moemesh::attention(pool_, a); }
    void route(float* probs, int64_t T, int64_t E, int64_t K, bool norm, int32_t* ids, float* w) override {
        route_topk(probs, T, E, K, norm, ids, w, order_);
    }
    void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids) override {
        argmax_rows_host(x, rows, n, ids);
    }
    void top_k_rows(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals) override {
        top_k_rows_host(x, rows, n, k, ids, vals);
    }
    Status moe(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
               float* out) override {
        return experts_->moe_forward(layer, x, T, K, ids, w, out);
    }
    void delta_gates(const float* ba, const float* dt_bias, const float* a_neg, float* beta, float* g, int64_t T,
                     int64_t Hk, int64_t r) override {
        const int64_t Hv = Hk * r;
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t grp = 0; grp < Hk; ++grp) {
                for (int64_t i = 0; i < r; ++i) {
                    const int64_t j = grp * r + i;
                    const float b = ba[t * 2 * Hv + grp * 2 * r + i];
                    const float a = ba[t * 2 * Hv + grp * 2 * r + r + i];
                    beta[t * Hv + j] = sigmoid(b);
                    g[t * Hv + j] = softplus(a + dt_bias[j]) * a_neg[j];  // ≤ 0
                }
            }
        }
    }
    void conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                     int64_t K) override {
        conv1d_silu_causal(pool_, x, w, state, y, T, C, K);
    }
    void delta_rule(const DeltaNetArgs& a) override { gated_delta_rule(pool_, a); }

private:
    ThreadPool& pool_;
    std::vector<MatmulJob> jobs_;  // matmul_many's, reused
    std::deque<std::vector<float>> vectors_;
    std::unique_ptr<ExpertBackend> experts_;
    std::vector<int32_t> order_, pos_;
};

}  // namespace

void argmax_rows_host(const float* x, int64_t rows, int64_t n, int32_t* ids) {
    for (int64_t r = 0; r < rows; ++r) ids[r] = argmax(x + r * n, n);
}

void top_k_rows_host(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals) {
    std::vector<int32_t> top;
    for (int64_t r = 0; r < rows; ++r) {
        top_k_ids(x + r * n, n, k, top);
        for (int64_t j = 0; j < k; ++j) ids[r * k + j] = top[j], vals[r * k + j] = x[r * n + top[j]];
    }
}

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool) { return std::make_unique<CpuBackend>(pool); }

StatusOr<std::unique_ptr<Backend>> make_backend(const std::string& device, ThreadPool& pool) {
    if (device.empty() || device == "cpu") return make_cpu_backend(pool);
    int index = 0;
    if (device.rfind("cuda", 0) == 0) {
        const std::string rest = device.substr(4);
        if (!rest.empty()) {
            char* end = nullptr;
            const long v = rest[0] == ':' ? std::strtol(rest.c_str() + 1, &end, 10) : -1;
            if (rest.size() < 2 || v < 0 || v > 1024 || *end != '\0')
                return MM_ERROR("device '%s': expected cpu, cuda or cuda:N", device.c_str());
            index = static_cast<int>(v);
        }
#ifdef MOEMESH_HAVE_CUDA
        return make_cuda_backend(index);
#else
        (void)index;
        return MM_ERROR("device '%s': this moemesh was built without CUDA (configure with -DMOEMESH_CUDA=ON and an nvcc)",
                        device.c_str());
#endif
    }
    return MM_ERROR("device '%s': expected cpu, cuda or cuda:N", device.c_str());
}

}  // namespace moemesh
