// Qwen3-MoE forward pass (MODEL_SPEC.md §1, GGUF layout §4.1).
//
// Shapes: T tokens in this chunk, H hidden, L layers, Nh q heads, Nkv kv heads, D head dim,
// E experts, K experts per token, I expert width, V vocab. Activations are row-major [T, ...].
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/weights.h"
#include "coordinator/models/model_base.h"
#include "kernels/ops.h"

namespace moemesh {

namespace {

struct LayerWeights {                // all in the backend's memory
    const float* attn_norm{};        // [H]
    BackendWeight wqkv;              // {H, Nh*D + 2*Nkv*D} fused (convert --fuse-qkv), or:
    BackendWeight wq;                // {H, Nh*D}
    BackendWeight wk;                // {H, Nkv*D}
    BackendWeight wv;                // {H, Nkv*D}
    BackendWeight wo;                // {Nh*D, H}
    const float* q_norm{};           // [D]
    const float* k_norm{};           // [D]
    const float* ffn_norm{};         // [H]  (HF post_attention_layernorm)
    BackendWeight router;            // {H, E}
};

class Qwen3MoeModel final : public ModelBase {
public:
    using ModelBase::ModelBase;

    Status load() {
        MM_RETURN_IF_ERROR(init_backend());
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, E = cfg_.n_expert;
        const int64_t q_dim = cfg_.n_head * D, kv_dim = cfg_.n_head_kv * D;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            LayerWeights lw;
            MM_ASSIGN_OR_RETURN(lw.attn_norm, vec(tensor_name(Tensor::kAttnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.wqkv, optional_weight(tensor_name(Tensor::kAttnQkv, il), {H, q_dim + 2 * kv_dim}));
            if (!lw.wqkv) {
                MM_ASSIGN_OR_RETURN(lw.wq, weight(tensor_name(Tensor::kAttnQ, il), {H, q_dim}));
                MM_ASSIGN_OR_RETURN(lw.wk, weight(tensor_name(Tensor::kAttnK, il), {H, kv_dim}));
                MM_ASSIGN_OR_RETURN(lw.wv, weight(tensor_name(Tensor::kAttnV, il), {H, kv_dim}));
            }
            MM_ASSIGN_OR_RETURN(lw.wo, weight(tensor_name(Tensor::kAttnOutput, il), {q_dim, H}));
            MM_ASSIGN_OR_RETURN(lw.q_norm, vec(tensor_name(Tensor::kAttnQNorm, il), D));
            MM_ASSIGN_OR_RETURN(lw.k_norm, vec(tensor_name(Tensor::kAttnKNorm, il), D));
            MM_ASSIGN_OR_RETURN(lw.ffn_norm, vec(tensor_name(Tensor::kFfnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.router, weight(tensor_name(Tensor::kFfnGateInp, il), {H, E}));
            layers_.push_back(lw);
        }
        return load_common();
    }

    StatusOr<std::unique_ptr<SequenceState>> new_sequence(int64_t n_ctx) const override {
        auto s = std::make_unique<SequenceState>();
        MM_RETURN_IF_ERROR(alloc_kv_cache(*be_, *s, cfg_, n_ctx, opts_.kv_f16,
                                          std::vector<uint8_t>(static_cast<size_t>(cfg_.n_layer), 1)));
        return s;
    }

private:
    Status forward_chunk(const Segment* segs, int64_t n_segs, const int32_t* tokens, int64_t T, bool all_rows,
                         const ChunkOut& out) override {
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
        const int64_t q_dim = Nh * D, kv_dim = Nkv * D;
        Backend& be = *be_;

        float* x = scratch(x_, T * H);            // [T, H] residual stream
        float* xn = scratch(xn_, T * H);          // [T, H] normed
        float* q = scratch(q_, T * q_dim);        // [T, Nh, D]
        float* k = scratch(k_, T * kv_dim);       // [T, Nkv, D]
        float* v = scratch(v_, T * kv_dim);       // [T, Nkv, D]
        float* attn = scratch(attn_, T * q_dim);  // [T, Nh*D]
        float* tmp = scratch(tmp_, T * H);        // [T, H]

        embed(tokens, T, x);  // x[t] = token_embd[tokens[t]]

        const float* pending = nullptr;  // the last layer's output (tmp), not yet added to x
        bool normed = false;             // xn holds this layer's input norm (the last layer's MoE did it)
        for (int il = 0; il < cfg_.n_layer; ++il) {
            const LayerWeights& lw = layers_[il];
            // ---- attention ----
            if (!normed) layer_input_norm(x, pending, lw.attn_norm, xn, T);  // [T, H]
            cb("attn_norm", il, xn, T, H);
            bool stored = false;  // q/k norms, rope and KV stores done with the products
            if (lw.wqkv) {
                const int64_t n = q_dim + 2 * kv_dim;
                float* fused = scratch(fused_, T * n);  // [T, Nh*D | Nkv*D | Nkv*D]
                be.matmul(lw.wqkv, xn, T, fused);
                be.copy_rows(q, q_dim, fused, n, T, q_dim);
                be.copy_rows(k, kv_dim, fused + q_dim, n, T, kv_dim);
                be.copy_rows(v, kv_dim, fused + q_dim + kv_dim, n, T, kv_dim);
            } else {
                const MatmulCall qkv[] = {{&lw.wq, xn, T, q},   // [T, Nh*D]
                                          {&lw.wk, xn, T, k},   // [T, Nkv*D]
                                          {&lw.wv, xn, T, v}};  // [T, Nkv*D]
                stored = qkv_and_rope(segs, n_segs, il, T, qkv, lw.q_norm, lw.k_norm);
            }
            // per-head q/k norms, rope, KV stores (unless stored), attention: [T, Nh*D]; per sequence
            rope_and_attend(segs, n_segs, il, T, q, k, v, attn, lw.q_norm, lw.k_norm, stored);
            // tmp = attn · woᵀ [T, H]; x += tmp; xn = norm(x) [T, H] (one launch on CUDA for a decode row)
            be.matmul_add_rmsnorm(lw.wo, attn, T, tmp, x, lw.ffn_norm, xn, cfg_.rms_eps);
            cb("attn_out", il, tmp, T, H);

            // ---- MoE: route → experts → combine ----
            cb("ffn_norm", il, xn, T, H);
            // tmp [T, H]; x += tmp with the next layer's input norm after the experts (in the down
            // GEMV's last block on CUDA for a decode row) unless a debug hook reads x in between
            normed = !debug_ && il + 1 < cfg_.n_layer;
            if (normed) {
                const NextNorm next{x, layers_[il + 1].attn_norm, xn};
                MM_RETURN_IF_ERROR(routed_moe(il, lw.router, xn, T, tmp, &next));
                pending = nullptr;
            } else {
                MM_RETURN_IF_ERROR(routed_moe(il, lw.router, xn, T, tmp));
                pending = end_layer(il, x, tmp, T);  // x += tmp (debug hooks, the last layer)
            }
        }
        for (const Segment* sg = segs; sg != segs + n_segs; ++sg) sg->seq->n_past += sg->n;
        if (out) output_logits(x, T, all_rows, segs, n_segs, out);
        return Status();
    }

    std::vector<LayerWeights> layers_;
    // Scratch for one chunk, in the backend's memory.
    Buffer x_, xn_, q_, k_, v_, attn_, tmp_, fused_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> load_qwen3moe(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                               const ModelOptions& o) {
    auto m = std::make_unique<Qwen3MoeModel>(std::move(f), c, o);
    MM_RETURN_IF_ERROR(m->load());
    return std::unique_ptr<Model>(std::move(m));
}

}  // namespace moemesh
