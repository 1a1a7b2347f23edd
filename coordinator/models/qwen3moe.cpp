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

struct LayerWeights {
    std::vector<float> attn_norm;    // [H]
    Weight wq;                       // {H, Nh*D}
    Weight wk;                       // {H, Nkv*D}
    Weight wv;                       // {H, Nkv*D}
    Weight wo;                       // {Nh*D, H}
    std::vector<float> q_norm;       // [D]
    std::vector<float> k_norm;       // [D]
    std::vector<float> ffn_norm;     // [H]  (HF post_attention_layernorm)
    Weight router;                   // {H, E}
};

class Qwen3MoeModel final : public ModelBase {
public:
    using ModelBase::ModelBase;

    Status load() {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, E = cfg_.n_expert;
        const int64_t q_dim = cfg_.n_head * D, kv_dim = cfg_.n_head_kv * D;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            LayerWeights lw;
            MM_ASSIGN_OR_RETURN(lw.attn_norm, load_vector(f, tensor_name(Tensor::kAttnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.wq, get_weight(f, tensor_name(Tensor::kAttnQ, il), {H, q_dim}));
            MM_ASSIGN_OR_RETURN(lw.wk, get_weight(f, tensor_name(Tensor::kAttnK, il), {H, kv_dim}));
            MM_ASSIGN_OR_RETURN(lw.wv, get_weight(f, tensor_name(Tensor::kAttnV, il), {H, kv_dim}));
            MM_ASSIGN_OR_RETURN(lw.wo, get_weight(f, tensor_name(Tensor::kAttnOutput, il), {q_dim, H}));
            MM_ASSIGN_OR_RETURN(lw.q_norm, load_vector(f, tensor_name(Tensor::kAttnQNorm, il), D));
            MM_ASSIGN_OR_RETURN(lw.k_norm, load_vector(f, tensor_name(Tensor::kAttnKNorm, il), D));
            MM_ASSIGN_OR_RETURN(lw.ffn_norm, load_vector(f, tensor_name(Tensor::kFfnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.router, get_weight(f, tensor_name(Tensor::kFfnGateInp, il), {H, E}));
            layers_.push_back(std::move(lw));
        }
        return load_common();
    }

    std::unique_ptr<SequenceState> new_sequence(int64_t n_ctx) const override {
        auto s = std::make_unique<SequenceState>();
        alloc_kv_cache(*s, cfg_, n_ctx, opts_.kv_f16, std::vector<uint8_t>(static_cast<size_t>(cfg_.n_layer), 1));
        return s;
    }

private:
    Status forward_chunk(SequenceState& seq, const int32_t* tokens, int64_t T, bool all_rows, float* out) override {
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
        const int64_t E = cfg_.n_expert, K = cfg_.n_expert_used;
        const int64_t q_dim = Nh * D, kv_dim = Nkv * D;
        const int64_t p0 = seq.n_past;

        x_.resize(T * H);       // [T, H] residual stream
        xn_.resize(T * H);      // [T, H] normed
        q_.resize(T * q_dim);   // [T, Nh, D]
        k_.resize(T * kv_dim);  // [T, Nkv, D]
        v_.resize(T * kv_dim);  // [T, Nkv, D]
        attn_.resize(T * q_dim);
        tmp_.resize(T * H);
        probs_.resize(T * E);
        sel_ids_.resize(T * K);
        sel_w_.resize(T * K);
        pos_.resize(T);
        for (int64_t t = 0; t < T; ++t) pos_[t] = static_cast<int32_t>(p0 + t);

        embed(tokens, T, x_.data());  // x[t] = token_embd[tokens[t]]

        for (int il = 0; il < cfg_.n_layer; ++il) {
            const LayerWeights& lw = layers_[il];
            // ---- attention ----
            rmsnorm(x_.data(), lw.attn_norm.data(), xn_.data(), T, H, cfg_.rms_eps);        // [T, H]
            cb("attn_norm", il, xn_.data(), T, H);
            matmul(pool_, lw.wq.type, lw.wq.data, q_dim, H, xn_.data(), T, q_.data());      // [T, Nh*D]
            matmul(pool_, lw.wk.type, lw.wk.data, kv_dim, H, xn_.data(), T, k_.data());     // [T, Nkv*D]
            matmul(pool_, lw.wv.type, lw.wv.data, kv_dim, H, xn_.data(), T, v_.data());     // [T, Nkv*D]
            rmsnorm(q_.data(), lw.q_norm.data(), q_.data(), T * Nh, D, cfg_.rms_eps);       // per head
            rmsnorm(k_.data(), lw.k_norm.data(), k_.data(), T * Nkv, D, cfg_.rms_eps);
            rope_neox(q_.data(), T, Nh, D, cfg_.rope_dim, pos_.data(), cfg_.rope_theta);
            rope_neox(k_.data(), T, Nkv, D, cfg_.rope_dim, pos_.data(), cfg_.rope_theta);
            cb("Qcur", il, q_.data(), T, q_dim);
            cb("Kcur", il, k_.data(), T, kv_dim);
            attend(seq, il, p0, T, q_.data(), k_.data(), v_.data(), attn_.data());          // [T, Nh*D]
            matmul(pool_, lw.wo.type, lw.wo.data, H, q_dim, attn_.data(), T, tmp_.data());  // [T, H]
            cb("attn_out", il, tmp_.data(), T, H);
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];

            // ---- MoE: route → experts → combine ----
            rmsnorm(x_.data(), lw.ffn_norm.data(), xn_.data(), T, H, cfg_.rms_eps);         // [T, H]
            cb("ffn_norm", il, xn_.data(), T, H);
            matmul(pool_, lw.router.type, lw.router.data, E, H, xn_.data(), T, probs_.data());  // [T, E]
            route_topk(probs_.data(), T, E, K, cfg_.norm_topk, sel_ids_.data(), sel_w_.data(), order_);  // [T, K]
            MM_RETURN_IF_ERROR(
                experts_->moe_forward(il, xn_.data(), T, K, sel_ids_.data(), sel_w_.data(), tmp_.data()));
            cb("ffn_moe_out", il, tmp_.data(), T, H);
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];
            cb("l_out", il, x_.data(), T, H);
        }
        seq.n_past += T;
        if (out) output_logits(x_.data(), T, all_rows, out);
        return Status();
    }

    std::vector<LayerWeights> layers_;
    // Scratch for one chunk.
    std::vector<float> x_, xn_, q_, k_, v_, attn_, tmp_, probs_, sel_w_;
    std::vector<int32_t> sel_ids_, pos_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> load_qwen3moe(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                               const ModelOptions& o) {
    auto m = std::make_unique<Qwen3MoeModel>(std::move(f), c, o);
    MM_RETURN_IF_ERROR(m->load());
    return std::unique_ptr<Model>(std::move(m));
}

}  // namespace moemesh
