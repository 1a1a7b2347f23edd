// Qwen3-Next forward pass (MODEL_SPEC.md §2, GGUF layout §4.2): a hybrid of gated full attention
// and gated DeltaNet layers, each followed by a routed MoE plus a sigmoid-gated shared expert.
// Qwen3.5 / 3.6 MoE (arch qwen35moe, llama.cpp src/models/qwen35moe.cpp) is the same stack with
// three differences, all in the DeltaNet layers but the last: β and α come from two projections
// ssm_beta / ssm_alpha {H, Hv} in v-head order (not the per-k-head ssm_ba); v-head j reads k-head
// j mod Hk (ggml_repeat tiling, where qwen3next's repeat-interleave gives j / r); and the attention
// layers use IMRoPE, which for text equals NEOX RoPE (checked at load: common/model_config.cpp).
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

// All weights in the backend's memory.
struct AttnWeights {            // full-attention layers
    BackendWeight wqkv;         // {H, 2·Nh·D + 2·Nkv·D} fused (newer converters), or:
    BackendWeight wq;           // {H, 2·Nh·D}: per head [query D | gate D]
    BackendWeight wk, wv;       // {H, Nkv·D}
    BackendWeight wo;           // {Nh·D, H}
    const float* q_norm{};      // [D]
    const float* k_norm{};      // [D]
};

struct DeltaWeights {           // gated DeltaNet layers
    BackendWeight wqkv;         // {H, C}: [all q | all k | all v]   (with wgate), or legacy:
    BackendWeight wgate;        // {H, Hv·dv}: z
    BackendWeight ssm_in;       // {H, C + Hv·dv}: per k-head [q dk | k dk | v r·dv | z r·dv]
    BackendWeight ssm_ba;       // {H, 2·Hv}: per k-head [b r | a r]  (qwen3next)
    BackendWeight ssm_beta;     // {H, Hv}                            (qwen35moe)
    BackendWeight ssm_alpha;    // {H, Hv}
    const float* conv{};        // [C, K] taps (ssm_conv1d {K, C})
    const float* dt_bias{};     // [Hv]
    const float* a{};           // [Hv] = -exp(A_log)
    const float* norm{};        // [dv] plain RMSNorm weight
    BackendWeight ssm_out;      // {Hv·dv, H}
};

struct LayerWeights {
    bool recurrent = false;
    const float* attn_norm{};           // [H]
    const float* post_norm{};           // [H] (HF post_attention_layernorm)
    AttnWeights attn;
    DeltaWeights delta;
    BackendWeight router;               // {H, E}
    BackendWeight sh_gate_inp;          // {H}: one logit per token
    BackendWeight sh_gate, sh_up;       // {H, Is}
    BackendWeight sh_down;              // {Is, H}
};

class Qwen3NextModel final : public ModelBase {
public:
    using ModelBase::ModelBase;

    Status load() {
        MM_RETURN_IF_ERROR(init_backend());
        const int64_t H = cfg_.n_embd, E = cfg_.n_expert;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            LayerWeights lw;
            lw.recurrent = cfg_.is_recurrent(il);
            MM_ASSIGN_OR_RETURN(lw.attn_norm, vec(tensor_name(Tensor::kAttnNorm, il), H));
            MM_ASSIGN_OR_RETURN(lw.post_norm, vec(tensor_name(Tensor::kAttnPostNorm, il), H));
            if (lw.recurrent) {
                MM_RETURN_IF_ERROR(load_delta(il, lw.delta));
            } else {
                MM_RETURN_IF_ERROR(load_attn(il, lw.attn));
            }
            MM_ASSIGN_OR_RETURN(lw.router, weight(tensor_name(Tensor::kFfnGateInp, il), {H, E}));
            MM_RETURN_IF_ERROR(load_shared_expert(il, lw));
            layers_.push_back(lw);
        }
        return load_common();
    }

    StatusOr<std::unique_ptr<SequenceState>> new_sequence(int64_t n_ctx) const override {
        auto s = std::make_unique<SequenceState>();
        std::vector<uint8_t> has_kv(static_cast<size_t>(cfg_.n_layer));
        for (int il = 0; il < cfg_.n_layer; ++il) has_kv[il] = !cfg_.is_recurrent(il);
        MM_RETURN_IF_ERROR(alloc_kv_cache(*be_, *s, cfg_, n_ctx, opts_.kv_f16, has_kv));
        s->conv_state.resize(static_cast<size_t>(cfg_.n_layer));
        s->ssm_state.resize(static_cast<size_t>(cfg_.n_layer));
        const int64_t C = cfg_.ssm_conv_dim(), dk = cfg_.ssm_head_dim;
        for (int il = 0; il < cfg_.n_layer; ++il) {
            if (!cfg_.is_recurrent(il)) continue;
            MM_ASSIGN_OR_RETURN(s->conv_state[il],
                                be_->try_alloc(sizeof(float) * static_cast<size_t>((cfg_.ssm_conv_kernel - 1) * C),
                                               true, "the DeltaNet conv state"));
            MM_ASSIGN_OR_RETURN(s->ssm_state[il],
                                be_->try_alloc(sizeof(float) * static_cast<size_t>(cfg_.ssm_v_heads * dk * dk), true,
                                               "the DeltaNet recurrent state"));
        }
        return s;
    }

private:
    Status load_attn(int il, AttnWeights& w) {
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim;
        const int64_t q_dim = cfg_.n_head * D, kv_dim = cfg_.n_head_kv * D;
        MM_ASSIGN_OR_RETURN(w.wqkv, optional_weight(tensor_name(Tensor::kAttnQkv, il), {H, 2 * q_dim + 2 * kv_dim}));
        if (!w.wqkv) {
            MM_ASSIGN_OR_RETURN(w.wq, weight(tensor_name(Tensor::kAttnQ, il), {H, 2 * q_dim}));
            MM_ASSIGN_OR_RETURN(w.wk, weight(tensor_name(Tensor::kAttnK, il), {H, kv_dim}));
            MM_ASSIGN_OR_RETURN(w.wv, weight(tensor_name(Tensor::kAttnV, il), {H, kv_dim}));
        }
        MM_ASSIGN_OR_RETURN(w.wo, weight(tensor_name(Tensor::kAttnOutput, il), {q_dim, H}));
        MM_ASSIGN_OR_RETURN(w.q_norm, vec(tensor_name(Tensor::kAttnQNorm, il), D));
        MM_ASSIGN_OR_RETURN(w.k_norm, vec(tensor_name(Tensor::kAttnKNorm, il), D));
        return Status();
    }

    Status load_delta(int il, DeltaWeights& w) {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, C = cfg_.ssm_conv_dim(), VD = cfg_.ssm_value_dim();
        const int64_t Hv = cfg_.ssm_v_heads, K = cfg_.ssm_conv_kernel;
        MM_ASSIGN_OR_RETURN(w.wqkv, optional_weight(tensor_name(Tensor::kAttnQkv, il), {H, C}));
        if (qwen35_) {  // no legacy ssm_in layout in this family
            if (!w.wqkv)
                return MM_ERROR("%s: layer %d is a gated DeltaNet layer but has no '%s'", f.path().c_str(), il,
                                tensor_name(Tensor::kAttnQkv, il).c_str());
            MM_ASSIGN_OR_RETURN(w.wgate, weight(tensor_name(Tensor::kAttnGate, il), {H, VD}));
        } else if (w.wqkv) {
            MM_ASSIGN_OR_RETURN(w.wgate, weight(tensor_name(Tensor::kAttnGate, il), {H, VD}));
        } else {
            // Older converters wrote the raw grouped in_proj_qkvz as ssm_in.
            MM_ASSIGN_OR_RETURN(w.ssm_in, optional_weight(tensor_name(Tensor::kSsmIn, il), {H, C + VD}));
            if (!w.ssm_in)
                return MM_ERROR("%s: layer %d is a gated DeltaNet layer but has neither '%s' (+ '%s') nor '%s'",
                                f.path().c_str(), il, tensor_name(Tensor::kAttnQkv, il).c_str(),
                                tensor_name(Tensor::kAttnGate, il).c_str(), tensor_name(Tensor::kSsmIn, il).c_str());
        }
        if (qwen35_) {
            MM_ASSIGN_OR_RETURN(w.ssm_beta, weight(tensor_name(Tensor::kSsmBeta, il), {H, Hv}));
            MM_ASSIGN_OR_RETURN(w.ssm_alpha, weight(tensor_name(Tensor::kSsmAlpha, il), {H, Hv}));
        } else {
            MM_ASSIGN_OR_RETURN(w.ssm_ba, weight(tensor_name(Tensor::kSsmBa, il), {H, 2 * Hv}));
        }
        MM_ASSIGN_OR_RETURN(Weight conv, get_weight(f, tensor_name(Tensor::kSsmConv1d, il), {K, C}));
        std::vector<float> taps(static_cast<size_t>(C * K));
        for (int64_t c = 0; c < C; ++c) dequantize_row(conv.type, conv.row(c), &taps[c * K], K);
        w.conv = be_->upload(taps);
        MM_ASSIGN_OR_RETURN(w.dt_bias, vec(tensor_name(Tensor::kSsmDt, il, "bias"), Hv));
        MM_ASSIGN_OR_RETURN(w.a, vec(tensor_name(Tensor::kSsmA, il, ""), Hv));
        MM_ASSIGN_OR_RETURN(w.norm, vec(tensor_name(Tensor::kSsmNorm, il), cfg_.ssm_head_dim));
        MM_ASSIGN_OR_RETURN(w.ssm_out, weight(tensor_name(Tensor::kSsmOut, il), {VD, H}));
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
        MM_ASSIGN_OR_RETURN(lw.sh_gate_inp, weight(tensor_name(Tensor::kFfnGateInpShexp, il), {H}));
        MM_ASSIGN_OR_RETURN(lw.sh_gate, weight(tensor_name(Tensor::kFfnGateShexp, il), {H, Is}));
        MM_ASSIGN_OR_RETURN(lw.sh_up, weight(tensor_name(Tensor::kFfnUpShexp, il), {H, Is}));
        MM_ASSIGN_OR_RETURN(lw.sh_down, weight(tensor_name(Tensor::kFfnDownShexp, il), {Is, H}));
        return Status();
    }

    Status forward_chunk(const Segment* segs, int64_t n_segs, const int32_t* tokens, int64_t T, bool all_rows,
                         const ChunkOut& out) override {
        const int64_t H = cfg_.n_embd;
        Backend& be = *be_;
        float* x = scratch(x_, T * H);      // [T, H] residual stream
        float* xn = scratch(xn_, T * H);    // [T, H] normed
        float* tmp = scratch(tmp_, T * H);  // [T, H] block output

        embed(tokens, T, x);  // x[t] = token_embd[tokens[t]]

        const float* pending = nullptr;  // the last layer's output (tmp), not yet added to x
        for (int il = 0; il < cfg_.n_layer; ++il) {
            const LayerWeights& lw = layers_[il];
            // ---- token mixer: gated DeltaNet or gated attention ----
            layer_input_norm(x, pending, lw.attn_norm, xn, T);  // [T, H]
            cb("attn_norm", il, xn, T, H);
            if (lw.recurrent) {
                delta_net(segs, n_segs, il, lw.delta, T, xn, tmp);
                cb("linear_attn_out", il, tmp, T, H);
            } else {
                gated_attention(segs, n_segs, il, lw.attn, T, xn, tmp);
                cb("attn_output", il, tmp, T, H);
            }
            be.add_rmsnorm(x, tmp, lw.post_norm, xn, T, H, cfg_.rms_eps);  // x += tmp; xn = norm(x) [T, H]
            cb("attn_residual", il, x, T, H);

            // ---- MoE: route → experts → combine, plus the gated shared expert ----
            cb("attn_post_norm", il, xn, T, H);
            MM_RETURN_IF_ERROR(routed_moe(il, lw.router, xn, T, tmp));  // [T, H]
            if (lw.sh_up) shared_expert(lw, il, T, xn, tmp);  // tmp += sigmoid(x·g)·SwiGLU_shared(x)
            pending = end_layer(il, x, tmp, T);  // x += tmp, here or in the next layer's first norm
        }
        for (const Segment* sg = segs; sg != segs + n_segs; ++sg) sg->seq->n_past += sg->n;
        if (out) output_logits(x, T, all_rows, segs, n_segs, out);
        return Status();
    }

    // Gated full attention on xn [T, H] → out [T, H] (MODEL_SPEC §2.4).
    void gated_attention(const Segment* segs, int64_t n_segs, int il, const AttnWeights& w, int64_t T, const float* xn,
                         float* out) {
        const int64_t D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
        const int64_t q_dim = Nh * D, kv_dim = Nkv * D;
        Backend& be = *be_;
        float* qg = scratch(qg_, T * 2 * q_dim);  // [T, Nh, 2D]: per head [query | gate]
        float* q = scratch(q_, T * q_dim);        // [T, Nh, D]
        float* gate = scratch(gate_, T * q_dim);  // [T, Nh·D]
        float* k = scratch(k_, T * kv_dim);       // [T, Nkv, D]
        float* v = scratch(v_, T * kv_dim);       // [T, Nkv, D]
        float* attn = scratch(attn_, T * q_dim);  // [T, Nh·D]
        if (w.wqkv) {
            const int64_t n = 2 * q_dim + 2 * kv_dim;
            float* fused = scratch(fused_, T * n);  // [T, 2·Nh·D | Nkv·D | Nkv·D]
            be.matmul(w.wqkv, xn, T, fused);
            be.copy_rows(qg, 2 * q_dim, fused, n, T, 2 * q_dim);
            be.copy_rows(k, kv_dim, fused + 2 * q_dim, n, T, kv_dim);
            be.copy_rows(v, kv_dim, fused + 2 * q_dim + kv_dim, n, T, kv_dim);
        } else {
            const MatmulCall qkv[] = {{&w.wq, xn, T, qg},  // [T, Nh, 2D]
                                      {&w.wk, xn, T, k},   // [T, Nkv·D]
                                      {&w.wv, xn, T, v}};  // [T, Nkv·D]
            be.matmul_many(qkv, 3);
        }
        be.copy_rows(q, D, qg, 2 * D, T * Nh, D);         // per head: query half
        be.copy_rows(gate, D, qg + D, 2 * D, T * Nh, D);  // per head: gate half
        // per-head q/k norms, RoPE on the first R dims, KV stores, attention: [T, Nh·D]
        rope_and_attend(segs, n_segs, il, T, q, k, v, attn, w.q_norm, w.k_norm);
        cb("attn_pregate", il, attn, T, q_dim);
        be.mul_sigmoid(attn, gate, T * q_dim);
        be.matmul(w.wo, attn, T, out);  // [T, H]
    }

    // Gated DeltaNet on xn [T, H] → out [T, H] (MODEL_SPEC §2.5), carrying the sequence's conv
    // and recurrent state.
    void delta_net(const Segment* segs, int64_t n_segs, int il, const DeltaWeights& w, int64_t T, const float* xn,
                   float* out) {
        const int64_t Hk = cfg_.ssm_k_heads, Hv = cfg_.ssm_v_heads, d = cfg_.ssm_head_dim;
        const int64_t r = Hv / Hk, KD = cfg_.ssm_key_dim(), VD = cfg_.ssm_value_dim(), C = cfg_.ssm_conv_dim();
        Backend& be = *be_;
        float* mixed = scratch(mixed_, T * C);  // [T, C] = [q Hk·dk | k Hk·dk | v Hv·dv]
        float* z = scratch(z_, T * VD);         // [T, Hv, dv]
        if (w.wqkv) {
            const MatmulCall calls[] = {{&w.wqkv, xn, T, mixed}, {&w.wgate, xn, T, z}};
            be.matmul_many(calls, 2);
        } else {
            // Legacy ssm_in: per k-head g, [q_g dk | k_g dk | v_g r·dv | z_g r·dv] → de-interleave.
            const int64_t n = C + VD, group = 2 * d + 2 * r * d;
            float* fused = scratch(fused_, T * n);
            be.matmul(w.ssm_in, xn, T, fused);
            for (int64_t g = 0; g < Hk; ++g) {
                const float* src = fused + g * group;
                be.copy_rows(mixed + g * d, C, src, n, T, d);                      // q
                be.copy_rows(mixed + KD + g * d, C, src + d, n, T, d);             // k
                be.copy_rows(mixed + 2 * KD + g * r * d, C, src + 2 * d, n, T, r * d);  // v
                be.copy_rows(z + g * r * d, VD, src + 2 * d + r * d, n, T, r * d);      // z
            }
        }
        cb("linear_attn_qkv_mixed", il, mixed, T, C);
        cb("z", il, z, T, VD);

        // β and the log-decay from ssm_ba, grouped per k-head as [b r | a r]; v-head j = g·r + i.
        float* ba = scratch(ba_, T * 2 * Hv);  // [T, Hk, 2r]
        float* beta = scratch(beta_, T * Hv);
        float* gdecay = scratch(gdecay_, T * Hv);
        if (qwen35_) {
            // Separate projections in v-head order, laid out as Hv groups of one [b | a] pair.
            const MatmulCall calls[] = {{&w.ssm_beta, xn, T, beta},      // [T, Hv] (β logits; overwritten below)
                                        {&w.ssm_alpha, xn, T, gdecay}};  // [T, Hv] (α; overwritten below)
            be.matmul_many(calls, 2);
            be.copy_rows(ba, 2, beta, 1, T * Hv, 1);
            be.copy_rows(ba + 1, 2, gdecay, 1, T * Hv, 1);
            be.delta_gates(ba, w.dt_bias, w.a, beta, gdecay, T, Hv, 1);
        } else {
            be.matmul(w.ssm_ba, xn, T, ba);
            be.delta_gates(ba, w.dt_bias, w.a, beta, gdecay, T, Hk, r);
        }

        float* conv_out = scratch(conv_out_, T * C);
        for (const Segment* sg = segs; sg != segs + n_segs; ++sg)  // each sequence's conv state
            be.conv1d_silu(mixed + sg->row0 * C, w.conv, sg->seq->conv_state[il].as<float>(), conv_out + sg->row0 * C,
                           sg->n, C, cfg_.ssm_conv_kernel);
        cb("conv_output_silu", il, conv_out, T, C);

        float* dq = scratch(dq_, T * KD);  // [T, Hk, dk]
        float* dk = scratch(dk_, T * KD);  // [T, Hk, dk]
        float* dv = scratch(dv_, T * VD);  // [T, Hv, dv]
        be.copy_rows(dq, KD, conv_out, C, T, KD);
        be.copy_rows(dk, KD, conv_out + KD, C, T, KD);
        be.copy_rows(dv, VD, conv_out + 2 * KD, C, T, VD);
        be.l2norm_rows(dq, T * Hk, d, cfg_.rms_eps);
        be.l2norm_rows(dk, T * Hk, d, cfg_.rms_eps);
        int64_t n_kq_heads = Hk;
        if (qwen35_ && r > 1) {
            // v-head j reads k-head j mod Hk: tile q and k to Hv heads, [T, r copies of (Hk, dk)].
            float* tq = scratch(dq_tiled_, T * VD);
            float* tk = scratch(dk_tiled_, T * VD);
            for (int64_t c = 0; c < r; ++c) {
                be.copy_rows(tq + c * KD, VD, dq, KD, T, KD);
                be.copy_rows(tk + c * KD, VD, dk, KD, T, KD);
            }
            dq = tq;
            dk = tk;
            n_kq_heads = Hv;
        }

        float* core = scratch(core_, T * VD);  // [T, Hv, dv]
        const int64_t qk_row = n_kq_heads * d;  // dq / dk row width (tiled or not)
        for (const Segment* sg = segs; sg != segs + n_segs; ++sg) {  // each sequence's recurrent state
            const int64_t r0 = sg->row0;
            DeltaNetArgs da;
            da.q = dq + r0 * qk_row;
            da.k = dk + r0 * qk_row;
            da.v = dv + r0 * VD;
            da.g = gdecay + r0 * Hv;
            da.beta = beta + r0 * Hv;
            da.state = sg->seq->ssm_state[il].as<float>();
            da.out = core + r0 * VD;
            da.n_tokens = sg->n;
            da.n_k_heads = n_kq_heads;
            da.n_v_heads = Hv;
            da.k_dim = d;
            da.v_dim = d;
            da.scale = 1.0f / std::sqrt(static_cast<float>(d));
            be.delta_rule(da);
        }
        cb("attn_core", il, core, T, VD);

        be.rmsnorm_gated(core, w.norm, z, core, T * Hv, d, cfg_.rms_eps);
        be.matmul(w.ssm_out, core, T, out);  // [T, H]
    }

    // out [T, H] += sigmoid(xn·w_gate_inp) · down(silu(gate(xn)) · up(xn)).
    void shared_expert(const LayerWeights& lw, int il, int64_t T, const float* xn, float* out) {
        const int64_t H = cfg_.n_embd, Is = lw.sh_up.n_out;
        Backend& be = *be_;
        float* sh_g = scratch(sh_g_, T * Is);
        float* sh_u = scratch(sh_u_, T * Is);
        float* sh_out = scratch(sh_out_, T * H);
        float* sh_gate = scratch(sh_gate_, T);
        const MatmulCall calls[] = {{&lw.sh_gate, xn, T, sh_g},         // [T, Is]
                                    {&lw.sh_up, xn, T, sh_u},           // [T, Is]
                                    {&lw.sh_gate_inp, xn, T, sh_gate}};  // [T, 1]
        be.matmul_many(calls, 3);
        be.swiglu(sh_g, sh_u, sh_g, T * Is);
        be.matmul(lw.sh_down, sh_g, T, sh_out);  // [T, H]
        be.add_gated_rows(out, sh_out, sh_gate, T, H);
        cb("ffn_shexp", il, sh_out, T, H);
    }

    const bool qwen35_ = cfg_.arch == Arch::kQwen35Moe;
    std::vector<LayerWeights> layers_;
    // Scratch for one chunk, in the backend's memory.
    Buffer x_, xn_, tmp_;
    Buffer qg_, q_, gate_, k_, v_, attn_, fused_;
    Buffer mixed_, z_, ba_, beta_, gdecay_, conv_out_, dq_, dk_, dv_, core_, dq_tiled_, dk_tiled_;
    Buffer sh_g_, sh_u_, sh_out_, sh_gate_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> load_qwen3next(std::shared_ptr<GgufFile> f, const ModelConfig& c,
                                                const ModelOptions& o) {
    auto m = std::make_unique<Qwen3NextModel>(std::move(f), c, o);
    MM_RETURN_IF_ERROR(m->load());
    return std::unique_ptr<Model>(std::move(m));
}

}  // namespace moemesh
