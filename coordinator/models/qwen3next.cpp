// Qwen3-Next forward pass (MODEL_SPEC.md §2, GGUF layout §4.2): a hybrid of gated full attention
// and gated DeltaNet layers, each followed by a routed MoE plus a sigmoid-gated shared expert.
//
// Shapes: T tokens in this chunk, H hidden, Nh q heads, Nkv kv heads, D head dim, R rotary dims,
// Hk/Hv DeltaNet k/v heads (r = Hv/Hk), dk = dv DeltaNet head dim, C = 2·Hk·dk + Hv·dv conv
// channels, K conv taps, E experts, Kx experts per token, Is shared-expert width, V vocab.
// Activations are row-major [T, ...]. The norms in the file already carry the converter's +1, so
// every RMSNorm here is the plain one.
#include <cmath>
#include <cstring>

#include "coordinator/models/model_base.h"
#include "kernels/ops.h"

namespace moemesh {

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // ggml_softplus

struct AttnWeights {     // full-attention layers
    Weight wqkv;         // {H, 2·Nh·D + 2·Nkv·D} fused (newer converters), or:
    Weight wq;           // {H, 2·Nh·D}: per head [query D | gate D]
    Weight wk, wv;       // {H, Nkv·D}
    Weight wo;           // {Nh·D, H}
    std::vector<float> q_norm, k_norm;  // [D]
};

struct DeltaWeights {    // gated DeltaNet layers
    Weight wqkv;         // {H, C}: [all q | all k | all v]   (with wgate), or legacy:
    Weight wgate;        // {H, Hv·dv}: z
    Weight ssm_in;       // {H, C + Hv·dv}: per k-head [q dk | k dk | v r·dv | z r·dv]
    Weight ssm_ba;       // {H, 2·Hv}: per k-head [b r | a r]
    std::vector<float> conv;     // [C, K] taps (ssm_conv1d {K, C})
    std::vector<float> dt_bias;  // [Hv]
    std::vector<float> a;        // [Hv] = -exp(A_log)
    std::vector<float> norm;     // [dv] plain RMSNorm weight
    Weight ssm_out;              // {Hv·dv, H}
};

struct LayerWeights {
    bool recurrent = false;
    std::vector<float> attn_norm;       // [H]
    std::vector<float> post_norm;       // [H] (HF post_attention_layernorm)
    AttnWeights attn;
    DeltaWeights delta;
    Weight router;                      // {H, E}
    Weight sh_gate_inp;                 // {H}: one logit per token
    Weight sh_gate, sh_up;              // {H, Is}
    Weight sh_down;                     // {Is, H}
};

class Qwen3NextModel final : public ModelBase {
public:
    using ModelBase::ModelBase;

    Status load() {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, E = cfg_.n_expert;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            LayerWeights lw;
            lw.recurrent = cfg_.is_recurrent(il);
            MM_ASSIGN_OR_RETURN(lw.attn_norm, load_vector(f, tensor_name(Tensor::kAttnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.post_norm, load_vector(f, tensor_name(Tensor::kAttnPostNorm, il), H));
            if (lw.recurrent) {
                MM_RETURN_IF_ERROR(load_delta(il, lw.delta));
            } else {
                MM_RETURN_IF_ERROR(load_attn(il, lw.attn));
            }
            MM_ASSIGN_OR_RETURN(lw.router, get_weight(f, tensor_name(Tensor::kFfnGateInp, il), {H, E}));
            MM_RETURN_IF_ERROR(load_shared_expert(il, lw));
            layers_.push_back(std::move(lw));
        }
        return load_common();
    }

    std::unique_ptr<SequenceState> new_sequence(int64_t n_ctx) const override {
        auto s = std::make_unique<SequenceState>();
        std::vector<uint8_t> has_kv(static_cast<size_t>(cfg_.n_layer));
        for (int il = 0; il < cfg_.n_layer; ++il) has_kv[il] = !cfg_.is_recurrent(il);
        alloc_kv_cache(*s, cfg_, n_ctx, opts_.kv_f16, has_kv);
        s->conv_state.assign(static_cast<size_t>(cfg_.n_layer), {});
        s->ssm_state.assign(static_cast<size_t>(cfg_.n_layer), {});
        const int64_t C = cfg_.ssm_conv_dim(), dk = cfg_.ssm_head_dim;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            if (!cfg_.is_recurrent(il)) continue;
            s->conv_state[il].assign(static_cast<size_t>((cfg_.ssm_conv_kernel - 1) * C), 0.0f);
            s->ssm_state[il].assign(static_cast<size_t>(cfg_.ssm_v_heads * dk * dk), 0.0f);
        }
        return s;
    }

private:
    Status load_attn(int il, AttnWeights& w) {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim;
        const int64_t q_dim = cfg_.n_head * D, kv_dim = cfg_.n_head_kv * D;
        MM_ASSIGN_OR_RETURN(w.wqkv, get_optional_weight(f, tensor_name(Tensor::kAttnQkv, il),
                                                        {H, 2 * q_dim + 2 * kv_dim}));
        if (!w.wqkv) {
            MM_ASSIGN_OR_RETURN(w.wq, get_weight(f, tensor_name(Tensor::kAttnQ, il), {H, 2 * q_dim}));
            MM_ASSIGN_OR_RETURN(w.wk, get_weight(f, tensor_name(Tensor::kAttnK, il), {H, kv_dim}));
            MM_ASSIGN_OR_RETURN(w.wv, get_weight(f, tensor_name(Tensor::kAttnV, il), {H, kv_dim}));
        }
        MM_ASSIGN_OR_RETURN(w.wo, get_weight(f, tensor_name(Tensor::kAttnOutput, il), {q_dim, H}));
        MM_ASSIGN_OR_RETURN(w.q_norm, load_vector(f, tensor_name(Tensor::kAttnQNorm, il), D));
        MM_ASSIGN_OR_RETURN(w.k_norm, load_vector(f, tensor_name(Tensor::kAttnKNorm, il), D));
        return Status();
    }

    Status load_delta(int il, DeltaWeights& w) {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, C = cfg_.ssm_conv_dim(), VD = cfg_.ssm_value_dim();
        const int64_t Hv = cfg_.ssm_v_heads, K = cfg_.ssm_conv_kernel;
        MM_ASSIGN_OR_RETURN(w.wqkv, get_optional_weight(f, tensor_name(Tensor::kAttnQkv, il), {H, C}));
        if (w.wqkv) {
            MM_ASSIGN_OR_RETURN(w.wgate, get_weight(f, tensor_name(Tensor::kAttnGate, il), {H, VD}));
        } else {
            // Older converters wrote the raw grouped in_proj_qkvz as ssm_in.
            MM_ASSIGN_OR_RETURN(w.ssm_in, get_optional_weight(f, tensor_name(Tensor::kSsmIn, il), {H, C + VD}));
            if (!w.ssm_in)
                return MM_ERROR("%s: layer %d is a gated DeltaNet layer but has neither '%s' (+ '%s') nor '%s'",
                                f.path().c_str(), il, tensor_name(Tensor::kAttnQkv, il).c_str(),
                                tensor_name(Tensor::kAttnGate, il).c_str(), tensor_name(Tensor::kSsmIn, il).c_str());
        }
        MM_ASSIGN_OR_RETURN(w.ssm_ba, get_weight(f, tensor_name(Tensor::kSsmBa, il), {H, 2 * Hv}));
        MM_ASSIGN_OR_RETURN(Weight conv, get_weight(f, tensor_name(Tensor::kSsmConv1d, il), {K, C}));
        w.conv.resize(static_cast<size_t>(C * K));
        for (int64_t c = 0; c < C; ++c) dequantize_row(conv.type, conv.row(c), &w.conv[c * K], K);
        MM_ASSIGN_OR_RETURN(w.dt_bias, load_vector(f, tensor_name(Tensor::kSsmDt, il, "bias"), Hv));
        MM_ASSIGN_OR_RETURN(w.a, load_vector(f, tensor_name(Tensor::kSsmA, il, ""), Hv));
        MM_ASSIGN_OR_RETURN(w.norm, load_vector(f, tensor_name(Tensor::kSsmNorm, il), cfg_.ssm_head_dim));
        MM_ASSIGN_OR_RETURN(w.ssm_out, get_weight(f, tensor_name(Tensor::kSsmOut, il), {VD, H}));
        return Status();
    }

    Status load_shared_expert(int il, LayerWeights& lw) {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd;
        // Width from the key, else from the tensor (llama.cpp falls back to feed_forward_length).
        int64_t Is = cfg_.n_ff_shexp;
        const GgufTensor* up = f.tensor(tensor_name(Tensor::kFfnUpShexp, il));
        if (!up) return Status();  // no shared expert in this layer
        if (Is <= 0) Is = up->ne[1];
        MM_ASSIGN_OR_RETURN(lw.sh_gate_inp, get_weight(f, tensor_name(Tensor::kFfnGateInpShexp, il), {H}));
        MM_ASSIGN_OR_RETURN(lw.sh_gate, get_weight(f, tensor_name(Tensor::kFfnGateShexp, il), {H, Is}));
        MM_ASSIGN_OR_RETURN(lw.sh_up, get_weight(f, tensor_name(Tensor::kFfnUpShexp, il), {H, Is}));
        MM_ASSIGN_OR_RETURN(lw.sh_down, get_weight(f, tensor_name(Tensor::kFfnDownShexp, il), {Is, H}));
        return Status();
    }

    Status forward_chunk(SequenceState& seq, const int32_t* tokens, int64_t T, bool all_rows, float* out) override {
        const int64_t H = cfg_.n_embd, E = cfg_.n_expert, Kx = cfg_.n_expert_used;
        x_.resize(T * H);    // [T, H] residual stream
        xn_.resize(T * H);   // [T, H] normed
        tmp_.resize(T * H);  // [T, H] block output
        probs_.resize(T * E);
        sel_ids_.resize(T * Kx);
        sel_w_.resize(T * Kx);

        embed(tokens, T, x_.data());  // x[t] = token_embd[tokens[t]]

        for (int il = 0; il < cfg_.n_layer; ++il) {
            const LayerWeights& lw = layers_[il];
            // ---- token mixer: gated DeltaNet or gated attention ----
            rmsnorm(x_.data(), lw.attn_norm.data(), xn_.data(), T, H, cfg_.rms_eps);  // [T, H]
            cb("attn_norm", il, xn_.data(), T, H);
            if (lw.recurrent) {
                delta_net(seq, il, lw.delta, T);  // xn_ → tmp_
                cb("linear_attn_out", il, tmp_.data(), T, H);
            } else {
                gated_attention(seq, il, lw.attn, T);  // xn_ → tmp_
                cb("attn_output", il, tmp_.data(), T, H);
            }
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];
            cb("attn_residual", il, x_.data(), T, H);

            // ---- MoE: route → experts → combine, plus the gated shared expert ----
            rmsnorm(x_.data(), lw.post_norm.data(), xn_.data(), T, H, cfg_.rms_eps);  // [T, H]
            cb("attn_post_norm", il, xn_.data(), T, H);
            matmul(pool_, lw.router.type, lw.router.data, E, H, xn_.data(), T, probs_.data());  // [T, E]
            route_topk(probs_.data(), T, E, Kx, cfg_.norm_topk, sel_ids_.data(), sel_w_.data(), order_);
            MM_RETURN_IF_ERROR(
                experts_->moe_forward(il, xn_.data(), T, Kx, sel_ids_.data(), sel_w_.data(), tmp_.data()));
            cb("ffn_moe_out", il, tmp_.data(), T, H);
            if (lw.sh_up) shared_expert(lw, il, T);  // tmp_ += sigmoid(x·g)·SwiGLU_shared(x)
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];
            cb("l_out", il, x_.data(), T, H);
        }
        seq.n_past += T;
        if (out) output_logits(x_.data(), T, all_rows, out);
        return Status();
    }

    // Gated full attention on xn_ [T, H] → tmp_ [T, H] (MODEL_SPEC §2.4).
    void gated_attention(SequenceState& seq, int il, const AttnWeights& w, int64_t T) {
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
        const int64_t q_dim = Nh * D, kv_dim = Nkv * D;
        const int64_t p0 = seq.n_past;
        qg_.resize(T * 2 * q_dim);  // [T, Nh, 2D]: per head [query | gate]
        q_.resize(T * q_dim);       // [T, Nh, D]
        gate_.resize(T * q_dim);    // [T, Nh·D]
        k_.resize(T * kv_dim);      // [T, Nkv, D]
        v_.resize(T * kv_dim);      // [T, Nkv, D]
        attn_.resize(T * q_dim);    // [T, Nh·D]
        pos_.resize(T);
        for (int64_t t = 0; t < T; ++t) pos_[t] = static_cast<int32_t>(p0 + t);
        if (w.wqkv) {
            const int64_t n = 2 * q_dim + 2 * kv_dim;
            fused_.resize(T * n);  // [T, 2·Nh·D | Nkv·D | Nkv·D]
            matmul(pool_, w.wqkv.type, w.wqkv.data, n, H, xn_.data(), T, fused_.data());
            for (int64_t t = 0; t < T; ++t) {
                const float* row = &fused_[t * n];
                std::memcpy(&qg_[t * 2 * q_dim], row, sizeof(float) * 2 * q_dim);
                std::memcpy(&k_[t * kv_dim], row + 2 * q_dim, sizeof(float) * kv_dim);
                std::memcpy(&v_[t * kv_dim], row + 2 * q_dim + kv_dim, sizeof(float) * kv_dim);
            }
        } else {
            matmul(pool_, w.wq.type, w.wq.data, 2 * q_dim, H, xn_.data(), T, qg_.data());  // [T, Nh, 2D]
            matmul(pool_, w.wk.type, w.wk.data, kv_dim, H, xn_.data(), T, k_.data());      // [T, Nkv·D]
            matmul(pool_, w.wv.type, w.wv.data, kv_dim, H, xn_.data(), T, v_.data());      // [T, Nkv·D]
        }
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < Nh; ++h) {
                const float* src = &qg_[(t * Nh + h) * 2 * D];
                std::memcpy(&q_[(t * Nh + h) * D], src, sizeof(float) * D);
                std::memcpy(&gate_[(t * Nh + h) * D], src + D, sizeof(float) * D);
            }
        }
        rmsnorm(q_.data(), w.q_norm.data(), q_.data(), T * Nh, D, cfg_.rms_eps);  // per head
        rmsnorm(k_.data(), w.k_norm.data(), k_.data(), T * Nkv, D, cfg_.rms_eps);
        rope_neox(q_.data(), T, Nh, D, cfg_.rope_dim, pos_.data(), cfg_.rope_theta);  // first R dims
        rope_neox(k_.data(), T, Nkv, D, cfg_.rope_dim, pos_.data(), cfg_.rope_theta);
        cb("Qcur", il, q_.data(), T, q_dim);
        cb("Kcur", il, k_.data(), T, kv_dim);
        attend(seq, il, p0, T, q_.data(), k_.data(), v_.data(), attn_.data());  // [T, Nh·D]
        cb("attn_pregate", il, attn_.data(), T, q_dim);
        for (int64_t i = 0; i < T * q_dim; ++i) attn_[i] *= sigmoid(gate_[i]);
        matmul(pool_, w.wo.type, w.wo.data, H, q_dim, attn_.data(), T, tmp_.data());  // [T, H]
    }

    // Gated DeltaNet on xn_ [T, H] → tmp_ [T, H] (MODEL_SPEC §2.5), carrying the sequence's conv
    // and recurrent state.
    void delta_net(SequenceState& seq, int il, const DeltaWeights& w, int64_t T) {
        const int64_t H = cfg_.n_embd, Hk = cfg_.ssm_k_heads, Hv = cfg_.ssm_v_heads, d = cfg_.ssm_head_dim;
        const int64_t r = Hv / Hk, KD = cfg_.ssm_key_dim(), VD = cfg_.ssm_value_dim(), C = cfg_.ssm_conv_dim();
        mixed_.resize(T * C);  // [T, C] = [q Hk·dk | k Hk·dk | v Hv·dv]
        z_.resize(T * VD);     // [T, Hv, dv]
        if (w.wqkv) {
            matmul(pool_, w.wqkv.type, w.wqkv.data, C, H, xn_.data(), T, mixed_.data());
            matmul(pool_, w.wgate.type, w.wgate.data, VD, H, xn_.data(), T, z_.data());
        } else {
            // Legacy ssm_in: per k-head g, [q_g dk | k_g dk | v_g r·dv | z_g r·dv] → de-interleave.
            const int64_t n = C + VD, group = 2 * d + 2 * r * d;
            fused_.resize(T * n);
            matmul(pool_, w.ssm_in.type, w.ssm_in.data, n, H, xn_.data(), T, fused_.data());
            for (int64_t t = 0; t < T; ++t) {
                for (int64_t g = 0; g < Hk; ++g) {
                    const float* src = &fused_[t * n + g * group];
                    float* dst = &mixed_[t * C];
                    std::memcpy(dst + g * d, src, sizeof(float) * d);                        // q
                    std::memcpy(dst + KD + g * d, src + d, sizeof(float) * d);               // k
                    std::memcpy(dst + 2 * KD + g * r * d, src + 2 * d, sizeof(float) * r * d);  // v
                    std::memcpy(&z_[t * VD + g * r * d], src + 2 * d + r * d, sizeof(float) * r * d);
                }
            }
        }
        cb("linear_attn_qkv_mixed", il, mixed_.data(), T, C);
        cb("z", il, z_.data(), T, VD);

        // β and the log-decay from ssm_ba, grouped per k-head as [b r | a r]; v-head j = g·r + i.
        ba_.resize(T * 2 * Hv);
        beta_.resize(T * Hv);
        gdecay_.resize(T * Hv);
        matmul(pool_, w.ssm_ba.type, w.ssm_ba.data, 2 * Hv, H, xn_.data(), T, ba_.data());  // [T, Hk, 2r]
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t g = 0; g < Hk; ++g) {
                for (int64_t i = 0; i < r; ++i) {
                    const int64_t j = g * r + i;
                    const float b = ba_[t * 2 * Hv + g * 2 * r + i];
                    const float a = ba_[t * 2 * Hv + g * 2 * r + r + i];
                    beta_[t * Hv + j] = sigmoid(b);
                    gdecay_[t * Hv + j] = softplus(a + w.dt_bias[j]) * w.a[j];  // ≤ 0
                }
            }
        }

        conv_out_.resize(T * C);
        conv1d_silu_causal(pool_, mixed_.data(), w.conv.data(), seq.conv_state[il].data(), conv_out_.data(), T, C,
                           cfg_.ssm_conv_kernel);
        cb("conv_output_silu", il, conv_out_.data(), T, C);

        dq_.resize(T * KD);  // [T, Hk, dk]
        dk_.resize(T * KD);  // [T, Hk, dk]
        dv_.resize(T * VD);  // [T, Hv, dv]
        for (int64_t t = 0; t < T; ++t) {
            const float* row = &conv_out_[t * C];
            std::memcpy(&dq_[t * KD], row, sizeof(float) * KD);
            std::memcpy(&dk_[t * KD], row + KD, sizeof(float) * KD);
            std::memcpy(&dv_[t * VD], row + 2 * KD, sizeof(float) * VD);
        }
        l2norm_rows(dq_.data(), T * Hk, d, cfg_.rms_eps);
        l2norm_rows(dk_.data(), T * Hk, d, cfg_.rms_eps);

        core_.resize(T * VD);  // [T, Hv, dv]
        DeltaNetArgs da;
        da.q = dq_.data();
        da.k = dk_.data();
        da.v = dv_.data();
        da.g = gdecay_.data();
        da.beta = beta_.data();
        da.state = seq.ssm_state[il].data();
        da.out = core_.data();
        da.n_tokens = T;
        da.n_k_heads = Hk;
        da.n_v_heads = Hv;
        da.k_dim = d;
        da.v_dim = d;
        da.scale = 1.0f / std::sqrt(static_cast<float>(d));
        gated_delta_rule(pool_, da);
        cb("attn_core", il, core_.data(), T, VD);

        rmsnorm_gated(core_.data(), w.norm.data(), z_.data(), core_.data(), T * Hv, d, cfg_.rms_eps);
        matmul(pool_, w.ssm_out.type, w.ssm_out.data, H, VD, core_.data(), T, tmp_.data());  // [T, H]
    }

    // tmp_ [T, H] += sigmoid(xn_·w_gate_inp) · down(silu(gate(xn_)) · up(xn_)).
    void shared_expert(const LayerWeights& lw, int il, int64_t T) {
        const int64_t H = cfg_.n_embd, Is = lw.sh_up.ne[1];
        sh_g_.resize(T * Is);
        sh_u_.resize(T * Is);
        sh_out_.resize(T * H);
        sh_gate_.resize(T);
        matmul(pool_, lw.sh_gate.type, lw.sh_gate.data, Is, H, xn_.data(), T, sh_g_.data());  // [T, Is]
        matmul(pool_, lw.sh_up.type, lw.sh_up.data, Is, H, xn_.data(), T, sh_u_.data());      // [T, Is]
        swiglu(sh_g_.data(), sh_u_.data(), sh_g_.data(), T * Is);
        matmul(pool_, lw.sh_down.type, lw.sh_down.data, H, Is, sh_g_.data(), T, sh_out_.data());  // [T, H]
        matmul(pool_, lw.sh_gate_inp.type, lw.sh_gate_inp.data, 1, H, xn_.data(), T, sh_gate_.data());  // [T, 1]
        for (int64_t t = 0; t < T; ++t) {
            const float gt = sigmoid(sh_gate_[t]);
            for (int64_t i = 0; i < H; ++i) tmp_[t * H + i] += sh_out_[t * H + i] * gt;
        }
        cb("ffn_shexp", il, sh_out_.data(), T, H);
    }

    std::vector<LayerWeights> layers_;
    // Scratch for one chunk.
    std::vector<float> x_, xn_, tmp_, probs_, sel_w_;
    std::vector<int32_t> sel_ids_, pos_;
    std::vector<float> qg_, q_, gate_, k_, v_, attn_, fused_;
    std::vector<float> mixed_, z_, ba_, beta_, gdecay_, conv_out_, dq_, dk_, dv_, core_;
    std::vector<float> sh_g_, sh_u_, sh_out_, sh_gate_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> load_qwen3next(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                                const ModelOptions& o) {
    auto m = std::make_unique<Qwen3NextModel>(std::move(f), c, o);
    MM_RETURN_IF_ERROR(m->load());
    return std::unique_ptr<Model>(std::move(m));
}

}  // namespace moemesh
