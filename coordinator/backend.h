// The seam between the forward passes (coordinator/models/*.cpp) and the device they run on.
// One forward pass, written once against this interface, runs on the CPU (CpuBackend: thin wrappers
// over kernels/ops.h and an ExpertBackend, so numbers are exactly those of the CPU kernels) or on a
// GPU (CudaBackend, coordinator/cuda_backend.cpp: kernels/cuda, experts resident in VRAM).
//
// Every pointer an op takes lives in the backend's memory: host memory for the CPU, device memory
// for CUDA. Ops on CUDA are asynchronous (one stream); to_host() waits for them. Shapes as in
// kernels/ops.h: row-major, W[n_out, k] as stored in GGUF, y = x · Wᵀ.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "common/weights.h"
#include "coordinator/expert_backend.h"
#include "kernels/ops.h"

namespace moemesh {

// Thrown by Backend::alloc when the backend has no memory left for scratch that the forward pass
// sizes itself (activations, workspaces, the backend's own grown buffers): the model catches it at
// its entry points (load_model, forward*) and returns `status` from there, so it
// never leaves the Model interface. An exception here, against STYLE.md's Status everywhere,
// because ~40 sites grow a buffer in the middle of a pass and none of them could do anything with
// the error but hand it up; the state they leave is the one a failed pass leaves anyway.
struct BackendOutOfMemory {
    Status status;
};

// Memory owned by a backend (host or device), freed with the function it was allocated with; it
// does not need the backend alive. Move-only.
class Buffer {
public:
    using FreeFn = void (*)(void*);
    Buffer() = default;
    Buffer(void* p, size_t bytes, FreeFn free_fn) : p_(p), bytes_(bytes), free_(free_fn) {}
    ~Buffer() { reset(); }
    Buffer(Buffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_), free_(o.free_) { o.p_ = nullptr, o.bytes_ = 0; }
    Buffer& operator=(Buffer&& o) noexcept {
        if (this != &o) {
            reset();
            p_ = o.p_, bytes_ = o.bytes_, free_ = o.free_;
            o.p_ = nullptr, o.bytes_ = 0;
        }
        return *this;
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    void* data() const { return p_; }
    template <typename T>
    T* as() const { return static_cast<T*>(p_); }
    size_t bytes() const { return bytes_; }
    explicit operator bool() const { return p_ != nullptr; }
    void reset() {
        if (p_ && free_) free_(p_);
        p_ = nullptr, bytes_ = 0;
    }

private:
    void* p_ = nullptr;
    size_t bytes_ = 0;
    FreeFn free_ = nullptr;
};

// A weight matrix W[n_out, k] of `type` in the backend's memory (CPU: the mapped file itself).
struct BackendWeight {
    GgmlType type = GgmlType::F32;
    const void* data = nullptr;
    int64_t n_out = 0, k = 0;
    explicit operator bool() const { return data != nullptr; }
};

// One product of Backend::matmul_many: y[m, w.n_out] = x[m, w.k] · wᵀ.
struct MatmulCall {
    const BackendWeight* w;
    const float* x;
    int64_t m;
    float* y;
};

// Builds the routed-expert backend of a CPU model (see ModelOptions::experts).
using ExpertBackendFactory =
    std::function<StatusOr<std::unique_ptr<ExpertBackend>>(const GgufFile&, const ModelConfig&, ThreadPool&)>;

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;  // "cpu", "cuda:0"
    virtual bool host_memory() const = 0;  // op pointers are host pointers

    // ---- memory ----
    // Throws BackendOutOfMemory (naming the bytes asked and free) when the backend has no room.
    virtual Buffer alloc(size_t bytes, bool zero) = 0;
    // alloc() for memory a user's settings size (a sequence's KV cache and state): an error naming
    // `what`, the bytes asked and the bytes free when the backend has no room, instead of alloc()'s
    // exception. The CPU backend's allocations do not fail this way (the default is alloc()).
    virtual StatusOr<Buffer> try_alloc(size_t bytes, bool zero, const char* what) {
        (void)what;
        return alloc(bytes, zero);
    }
    // Before any weight is uploaded: an error when the backend cannot hold the weights it will be
    // given (`experts_elsewhere`: the routed experts stay on workers or in an expert cache), saying
    // what would help. Nothing to check on the CPU (the weights stay in the mapped file).
    virtual Status check_fits(const GgufFile& f, const ModelConfig& c, bool experts_elsewhere) {
        (void)f, (void)c, (void)experts_elsewhere;
        return Status();
    }
    virtual void to_device(void* dst, const void* src, size_t bytes) = 0;  // host → backend memory
    virtual void to_host(void* dst, const void* src, size_t bytes) = 0;    // backend memory → host; waits
    // Weight {k, n_out} (or 1-D {k}: n_out = 1) / vector copied into backend memory for the backend's
    // lifetime (CPU: the weight stays in the mapped file).
    virtual BackendWeight upload(const Weight& w) = 0;
    virtual const float* upload(const std::vector<float>& v) = 0;
    // Routed experts of every layer: `factory` (when set) builds an ExpertBackend (workers, caches)
    // that moe() calls through host memory; otherwise the experts are loaded by the backend itself.
    virtual Status load_experts(const GgufFile& f, const ModelConfig& c, const ExpertBackendFactory& factory,
                                ThreadPool& pool) = 0;

    // ---- ops (all pointers in backend memory) ----
    virtual void matmul(const BackendWeight& w, const float* x, int64_t m, float* y) = 0;  // y[m, n_out]
    // Several products with the same results as matmul one by one. The CPU backend runs them in one
    // parallel region and converts an x shared by adjacent calls once (q/k/v, gate/up); the default
    // just calls matmul.
    virtual void matmul_many(const MatmulCall* calls, int n) {
        for (int i = 0; i < n; ++i) matmul(*calls[i].w, calls[i].x, calls[i].m, calls[i].y);
    }
    virtual void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) = 0;
    // x[rows, n] += t, then y = rmsnorm(x) · w (y not aliasing x or t). Default: add, then rmsnorm;
    // CUDA does it in one launch with the same bits.
    virtual void add_rmsnorm(float* x, const float* t, const float* w, float* y, int64_t rows, int64_t n, float eps) {
        add(x, t, rows * n);
        rmsnorm(x, w, y, rows, n, eps);
    }
    virtual void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n,
                               float eps) = 0;
    virtual void l2norm_rows(float* x, int64_t rows, int64_t n, float eps) = 0;
    virtual void swiglu(const float* g, const float* u, float* y, int64_t n) = 0;
    virtual void add(float* y, const float* x, int64_t n) = 0;                 // y += x
    virtual void mul_sigmoid(float* x, const float* gate, int64_t n) = 0;      // x *= sigmoid(gate)
    // y[r, :] += x[r, :] · sigmoid(gate[r]) for r < rows of width n (the shared expert's gate).
    virtual void add_gated_rows(float* y, const float* x, const float* gate, int64_t rows, int64_t n) = 0;
    // dst[r, 0..cols) = src[r, 0..cols) with row strides in floats (splits of fused projections).
    virtual void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows,
                           int64_t cols) = 0;
    // In place NEOX RoPE of x[T, heads, head_dim] at positions p0..p0+T-1 (base and scaling in rp).
    virtual void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t p0,
                      const RopeParams& rp) = 0;
    // Writes T·n_kv values of src into a KV cache (f16 bits or f32) starting at element offset.
    virtual void store_kv(void* cache, int64_t offset, const float* src, int64_t n, bool f16) = 0;
    // One sequence's n new tokens at positions p0..: the per-head RMSNorm of q [n, n_head, D] by q_norm
    // and of k [n, n_head_kv, D] by k_norm [D] where given (in place), rope of both in place, then k
    // and v stored at row p0 of the caches (rows of n_head_kv · D). The default is those calls; CUDA
    // does it in one launch with the same bits.
    virtual void rope_store_kv(float* q, float* k, const float* v, const float* q_norm, const float* k_norm, float eps,
                               int64_t n, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim,
                               int64_t p0, const RopeParams& rp, void* k_cache, void* v_cache, bool f16) {
        if (q_norm) rmsnorm(q, q_norm, q, n * n_head, head_dim, eps);
        if (k_norm) rmsnorm(k, k_norm, k, n * n_head_kv, head_dim, eps);
        rope(q, n, n_head, head_dim, rot_dim, p0, rp);
        rope(k, n, n_head_kv, head_dim, rot_dim, p0, rp);
        const int64_t kv_dim = n_head_kv * head_dim;
        store_kv(k_cache, p0 * kv_dim, k, n * kv_dim, f16);
        store_kv(v_cache, p0 * kv_dim, v, n * kv_dim, f16);
    }
    // A layer's q, k, v products (qkv[0..2], y: q, k, v) and then rope_store_kv of them, for one
    // sequence. The default is those calls; CUDA finishes each head of a decode token in the GEMV's
    // last block for its rows, with the same bits.
    virtual void matmul_qkv_rope_store_kv(const MatmulCall* qkv, const float* q_norm, const float* k_norm, float eps,
                                          int64_t n, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                                          int64_t rot_dim, int64_t p0, const RopeParams& rp, void* k_cache,
                                          void* v_cache, bool f16) {
        matmul_many(qkv, 3);
        rope_store_kv(qkv[0].y, qkv[1].y, qkv[2].y, q_norm, k_norm, eps, n, n_head, n_head_kv, head_dim, rot_dim, p0,
                      rp, k_cache, v_cache, f16);
    }
    virtual void attention(const AttentionArgs& a) = 0;  // kernels/ops.h contract; k/v are caches
    // probs [T, E] router logits (overwritten) → ids/w [T, K] (route_topk's contract).
    virtual void route(float* probs, int64_t T, int64_t E, int64_t K, bool norm, int32_t* ids, float* w) = 0;
    // ids[r] ← the index of the largest of x[r, 0..n) for each of the rows (sampler.h argmax(): the
    // lowest index on ties, a NaN never wins): greedy decoding without downloading the logits.
    virtual void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids) = 0;
    // ids/vals [rows, k] ← the k largest of x[r, 0..n) by decreasing value, the lower index first on
    // equal values (sampler.h top_k_ids' order), and their values; k <= 64. Where fewer than k
    // can be taken (NaN logits) the rest may be -1 (callers check).
    virtual void top_k_rows(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals) = 0;
    // An attention block's output projection and the norm after the residual add: t [m, n] ← a · wᵀ
    // (n = w.n_out), x += t, y = rmsnorm(x) · nw.
    virtual void matmul_add_rmsnorm(const BackendWeight& w, const float* a, int64_t m, float* t, float* x,
                                    const float* nw, float* y, float eps) {
        matmul(w, a, m, t);
        add_rmsnorm(x, t, nw, y, m, w.n_out, eps);
    }
    // The router of routed MoE: probs [T, E] ← x · wᵀ (E = w.n_out), then route() of them.
    virtual void matmul_route(const BackendWeight& w, const float* x, int64_t T, int64_t K, bool norm, float* probs,
                              int32_t* ids, float* wts) {
        matmul(w, x, T, probs);
        route(probs, T, w.n_out, K, norm, ids, wts);
    }
    // out[T, H] = Σ_j w[t, j] · Expert_{ids[t, j]}(x[t]) for layer `layer`.
    virtual Status moe(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids, const float* w,
                       float* out) = 0;
    // moe(), then the residual add and the next layer's input norm: r += out, y = rmsnorm(r) · nw
    // ([T, H]; y may be x: it is written after the experts read x).
    virtual Status moe_add_rmsnorm(int layer, const float* x, int64_t T, int64_t K, const int32_t* ids,
                                   const float* w, float* out, float* r, const float* nw, float* y, int64_t H,
                                   float eps) {
        MM_RETURN_IF_ERROR(moe(layer, x, T, K, ids, w, out));
        add_rmsnorm(r, out, nw, y, T, H, eps);
        return Status();
    }
    // Gated DeltaNet: β = sigmoid(b), g = softplus(a + dt_bias)·A from ba [T, Hk, 2r] grouped per
    // k-head as [b r | a r]; beta, g: [T, Hv] with v-head j = group·r + i.
    virtual void delta_gates(const float* ba, const float* dt_bias, const float* a_log_neg, float* beta, float* g,
                             int64_t T, int64_t Hk, int64_t r) = 0;
    virtual void conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                             int64_t K) = 0;
    virtual void delta_rule(const DeltaNetArgs& a) = 0;
};

// Backend::argmax_rows / top_k_rows on host memory (the CPU backend's; also what a model picks from
// logits it downloaded).
void argmax_rows_host(const float* x, int64_t rows, int64_t n, int32_t* ids);
void top_k_rows_host(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals);

// "cpu" | "cuda" | "cuda:N". Errors say why a device cannot be used (no CUDA in this build, no
// device, index out of range).
StatusOr<std::unique_ptr<Backend>> make_backend(const std::string& device, ThreadPool& pool);

// The CPU backend alone (tests, tools).
std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool);

}  // namespace moemesh
