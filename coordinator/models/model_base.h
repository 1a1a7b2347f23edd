// What every architecture's forward pass shares: input checks and prompt chunking, the router,
// the KV cache and attention call, the final norm + lm_head, and named debug points.
#pragma once
#include <algorithm>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/weights.h"
#include "coordinator/backend.h"
#include "coordinator/model.h"
#include "kernels/ops.h"

namespace moemesh {

// Allocates (zeroed, in be's memory) the KV cache of every layer for which `has_kv(layer)`;
// [n_ctx, kv_heads, head_dim]. Fails (saying how large the cache is) when be has no room for it.
Status alloc_kv_cache(Backend& be, SequenceState& s, const ModelConfig& c, int64_t n_ctx, bool kv_f16,
                      const std::vector<uint8_t>& has_kv);

class ModelBase : public Model {
public:
    ModelBase(std::shared_ptr<GgufFile> f, const ModelConfig& c, const ModelOptions& o)
        : file_(std::move(f)), cfg_(c), opts_(o), pool_(o.n_threads) {}
    const ModelConfig& config() const override { return cfg_; }
    void set_debug_hook(DebugHook hook) override { debug_ = std::move(hook); }
    Status grow_sequence(SequenceState& seq, int64_t n_ctx) const override;
    void copy_recurrent(const SequenceState& from, SequenceState& to) const override;
    // Checks the tokens and the context, then runs forward_chunk over chunks of n_batch tokens.
    Status forward(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                   std::vector<float>* logits) final;
    Status forward_batch(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs, const int32_t* tokens,
                         std::vector<float>* logits) final;
    Status forward_argmax(SequenceState& seq, const int32_t* tokens, int64_t n, int32_t* next) final;
    Status forward_batch_argmax(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                const int32_t* tokens, int32_t* next) final;
    Status forward_top_k(SequenceState& seq, const int32_t* tokens, int64_t n, int64_t k, int32_t* ids,
                         float* vals) final;
    Status forward_batch_top_k(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                               const int32_t* tokens, int64_t k, int32_t* ids, float* vals) final;

protected:
    // Rows [row0, row0 + n) of a chunk belong to `seq`, at its positions seq->n_past ...
    struct Segment {
        SequenceState* seq;
        int64_t row0, n;
    };
    // Where a chunk's results go (host memory; none when all are null): the logits of its rows
    // ([rows, V]), or only each row's argmax ([rows]), or only each row's top_k largest logits and
    // their ids ([rows, top_k]).
    struct ChunkOut {
        float* logits = nullptr;
        int32_t* argmax = nullptr;
        int64_t top_k = 0;
        int32_t* top_ids = nullptr;
        float* top_vals = nullptr;
        explicit operator bool() const { return logits || argmax || top_ids; }
    };
    // One chunk of T tokens, segs[0..n_segs) covering rows 0..T in order; every op on the rows is
    // per row except attention and the recurrent state, which run per segment. Advances each
    // segment's n_past. If out is set, gives the results for all T rows (all_rows) or for each
    // segment's last row (n_segs rows).
    virtual Status forward_chunk(const Segment* segs, int64_t n_segs, const int32_t* tokens, int64_t T, bool all_rows,
                                 const ChunkOut& out) = 0;
    // forward_chunk, with the backend running out of memory for the chunk's scratch
    // (BackendOutOfMemory) returned as an error; the segments' sequences are then part-way through
    // the chunk (recurrent state, KV rows past n_past) and cannot go on.
    Status run_chunk(const Segment* segs, int64_t n_segs, const int32_t* tokens, int64_t T, bool all_rows,
                     const ChunkOut& out);

    // data: backend memory (copied to the host for the hook when the backend is a device).
    void cb(const char* name, int layer, const float* data, int64_t rows, int64_t cols);
    // A layer's first norm of the residual stream x [T, n_embd]: xn = rmsnorm(x) · w, after adding
    // `pending` (the previous layer's output that end_layer left) to x when it is not null.
    void layer_input_norm(float* x, const float* pending, const float* w, float* xn, int64_t T);
    // End of layer il whose output is `out`: x += out now (then the "l_out" hook) when a debug hook
    // reads x or il is the last layer, and returns null; otherwise returns `out` for the next
    // layer_input_norm to add (fused with its norm on CUDA).
    const float* end_layer(int il, float* x, const float* out, int64_t T);
    // Creates the backend of opts_.device; first thing every load() does.
    Status init_backend();
    // forward()'s checks of the tokens and the context.
    Status check_input(const SequenceState& seq, const int32_t* tokens, int64_t n) const;
    // forward() after its checks: the chunks of n_batch tokens, then the results in out.
    Status forward_rows(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits, const ChunkOut& out);
    // forward_top_k's k; then, after the forward, its ids (all in the vocabulary: NaN logits give
    // -1 on a device).
    Status check_top_k(int64_t k) const;
    Status check_top_ids(const int32_t* ids, int64_t n) const;
    // forward_batch() and its argmax / top-k forms: the checks, then the results in out (the
    // logits, sized here, when `logits` is given).
    Status forward_batch_rows(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                              const int32_t* tokens, ChunkOut out, std::vector<float>* logits);
    // forward_batch()'s checks; segs ← one segment per sequence, *T ← the batch's rows.
    Status batch_segments(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs, const int32_t* tokens,
                          std::vector<Segment>* segs, int64_t* T) const;
    // token_embd, output_norm, output (tied: token_embd) and the routed experts.
    Status load_common();
    // Loads + uploads weights / norm vectors to the backend.
    StatusOr<BackendWeight> weight(const std::string& name, std::initializer_list<int64_t> shape);
    StatusOr<BackendWeight> optional_weight(const std::string& name, std::initializer_list<int64_t> shape);
    StatusOr<const float*> vec(const std::string& name, int64_t n);
    // A scratch buffer of at least n elements of T (grown, never shrunk; contents not kept on growth).
    template <typename T = float>
    T* scratch(Buffer& b, int64_t n) {
        const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
        if (b.bytes() < bytes) b = be_->alloc(bytes, false);
        return b.as<T>();
    }
    // x [T, H] → token_embd rows (dequantized on the host, then copied to the backend).
    void embed(const int32_t* tokens, int64_t T, float* x);
    // Per segment (each sequence at its own positions): the per-head RMSNorm of q by q_norm and of k
    // by k_norm when given, RoPE on q [T, n_head, head_dim] and k [T, kv_heads, head_dim], k/v written
    // into layer il's cache, then causal attention of q over it into out [T, n_head*head_dim]. Debug
    // points Qcur / Kcur after RoPE.
    void rope_and_attend(const Segment* segs, int64_t n_segs, int il, int64_t T, float* q, float* k, const float* v,
                         float* out, const float* q_norm = nullptr, const float* k_norm = nullptr,
                         bool stored = false);
    // The q/k/v products of layer il (qkv: y = q, k, v); for a single sequence without debug hooks
    // also its norms + rope + KV stores, in one call (Backend::matmul_qkv_rope_store_kv): returns
    // whether those are done (then rope_and_attend(..., stored = true) only attends).
    bool qkv_and_rope(const Segment* segs, int64_t n_segs, int il, int64_t T, const MatmulCall* qkv,
                      const float* q_norm, const float* k_norm);
    // Routed MoE of layer il on xn [T, H] → out [T, H]: router logits, softmax top-K, then the
    // experts (route → experts → combine), as both families do it. With next: then next->x += out
    // and next->y = rmsnorm(next->x) · next->w (the next layer's input norm; Backend::moe_add_rmsnorm,
    // one launch's last block on CUDA for a decode row).
    struct NextNorm {
        float* x;
        const float* w;
        float* y;
    };
    Status routed_moe(int il, const BackendWeight& router, const float* xn, int64_t T, float* out,
                      const NextNorm* next = nullptr);
    // Final norm + lm_head of x [T, H] (backend memory) into out (host): all T rows (all_rows),
    // else each segment's last row; only each row's argmax when out.argmax is set.
    void output_logits(const float* x, int64_t T, bool all_rows, const Segment* segs, int64_t n_segs,
                       const ChunkOut& out);

    std::shared_ptr<GgufFile> file_;
    ModelConfig cfg_;
    ModelOptions opts_;
    ThreadPool pool_;
    DebugHook debug_;
    std::unique_ptr<Backend> be_;
    Weight tok_embd_;             // {H, V} in the mapped file (embedding rows are gathered on the host)
    BackendWeight output_;        // {H, V} (token_embd when tied)
    const float* output_norm_{};  // [H]
    Buffer final_norm_buf_, logits_buf_, argmax_buf_, top_buf_, probs_, sel_ids_, sel_w_, last_rows_;
    std::vector<float> embd_host_, debug_host_, host_logits_;
    std::vector<int32_t> top_host_;  // forward_top_k's download: ids, then the values' bits
};

}  // namespace moemesh

namespace moemesh {
// One per architecture file (models/<arch>.cpp); load_model picks by config().arch.
StatusOr<std::unique_ptr<Model>> load_qwen3moe(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                               const ModelOptions& o);
StatusOr<std::unique_ptr<Model>> load_qwen3next(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                                const ModelOptions& o);
}  // namespace moemesh
