// Qwen3-MoE forward pass (MODEL_SPEC.md §1, GGUF layout §4.1).
//
// Shapes: T tokens in this chunk, H hidden, L layers, Nh q heads, Nkv kv heads, D head dim,
// E experts, K experts per token, I expert width, V vocab. Activations are row-major [T, ...].
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/half.h"
#include "common/weights.h"
#include "coordinator/model.h"
#include "kernels/ops.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

StatusOr<std::vector<float>> load_vector(const GgufFile& f, const std::string& name, int64_t n) {
    MM_ASSIGN_OR_RETURN(Weight w, get_weight(f, name, {n}));
    std::vector<float> out(static_cast<size_t>(n));
    dequantize_row(w.type, w.data, out.data(), n);
    return out;
}

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

class Qwen3MoeModel final : public Model {
public:
    Qwen3MoeModel(std::shared_ptr<GgufFile> f, const ModelConfig& c, const ModelOptions& o)
        : file_(std::move(f)), cfg_(c), opts_(o), pool_(o.n_threads) {}

    Status load() {
        const GgufFile& f = *file_;
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, E = cfg_.n_expert, V = cfg_.n_vocab;
        const int64_t q_dim = cfg_.n_head * D, kv_dim = cfg_.n_head_kv * D;
        MM_ASSIGN_OR_RETURN(tok_embd_, get_weight(f, tensor_name(Tensor::kTokenEmbd), {H, V}));
        MM_ASSIGN_OR_RETURN(output_norm_, load_vector(f, tensor_name(Tensor::kOutputNorm), H));
        MM_ASSIGN_OR_RETURN(output_, get_optional_weight(f, tensor_name(Tensor::kOutput), {H, V}));
        if (!output_) output_ = tok_embd_;  // tied embeddings
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
        if (opts_.experts) {
            MM_ASSIGN_OR_RETURN(experts_, opts_.experts(f, cfg_, pool_));
        } else {
            MM_ASSIGN_OR_RETURN(experts_, LocalExpertExecutor::create(f, cfg_, pool_));
        }
        return Status();
    }

    const ModelConfig& config() const override { return cfg_; }
    void set_debug_hook(DebugHook hook) override { debug_ = std::move(hook); }

    std::unique_ptr<SequenceState> new_sequence(int64_t n_ctx) const override {
        auto s = std::make_unique<SequenceState>();
        s->n_ctx = n_ctx;
        s->kv_f16 = opts_.kv_f16;
        const size_t per_layer = static_cast<size_t>(n_ctx * cfg_.n_head_kv * cfg_.head_dim);
        const auto L = static_cast<size_t>(cfg_.n_layer);
        if (s->kv_f16) {
            s->k16.assign(L, std::vector<uint16_t>(per_layer));
            s->v16.assign(L, std::vector<uint16_t>(per_layer));
        } else {
            s->k32.assign(L, std::vector<float>(per_layer));
            s->v32.assign(L, std::vector<float>(per_layer));
        }
        return s;
    }

    Status forward(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                   std::vector<float>* logits) override {
        if (n <= 0) return MM_ERROR("forward: no tokens to process");
        if (seq.n_past + n > seq.n_ctx)
            return MM_ERROR("context full: %lld tokens already in the sequence + %lld new > context size %lld",
                            static_cast<long long>(seq.n_past), static_cast<long long>(n),
                            static_cast<long long>(seq.n_ctx));
        for (int64_t i = 0; i < n; ++i) {
            if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
                return MM_ERROR("token id %d at input position %lld is out of range [0, %lld)", tokens[i],
                                static_cast<long long>(i), static_cast<long long>(cfg_.n_vocab));
        }
        const int64_t V = cfg_.n_vocab;
        logits->assign(static_cast<size_t>((all_logits ? n : 1) * V), 0.0f);
        for (int64_t done = 0; done < n;) {
            const int64_t T = std::min<int64_t>(opts_.n_batch, n - done);
            const bool last_chunk = done + T == n;
            float* out = all_logits ? logits->data() + done * V : (last_chunk ? logits->data() : nullptr);
            MM_RETURN_IF_ERROR(forward_chunk(seq, tokens + done, T, all_logits, out));
            done += T;
        }
        return Status();
    }

private:
    void cb(const char* name, int layer, const float* data, int64_t rows, int64_t cols) {
        if (debug_) debug_(name, layer, data, rows, cols);
    }

    // One chunk of T tokens at positions seq.n_past ... If out != nullptr, writes logits for all
    // T rows (all_rows) or for the last row only.
    Status forward_chunk(SequenceState& seq, const int32_t* tokens, int64_t T, bool all_rows, float* out) {
        const int64_t H = cfg_.n_embd, D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
        const int64_t E = cfg_.n_expert, K = cfg_.n_expert_used, V = cfg_.n_vocab;
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

        // Embedding lookup: x[t] = token_embd[tokens[t]].
        for (int64_t t = 0; t < T; ++t) dequantize_row(tok_embd_.type, tok_embd_.row(tokens[t]), &x_[t * H], H);
        cb("inp_embd", -1, x_.data(), T, H);

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
            store_kv(seq, il, p0, T);
            AttentionArgs aa{};
            aa.q = q_.data();
            aa.k = seq.kv_f16 ? static_cast<const void*>(seq.k16[il].data()) : seq.k32[il].data();
            aa.v = seq.kv_f16 ? static_cast<const void*>(seq.v16[il].data()) : seq.v32[il].data();
            aa.out = attn_.data();
            aa.n_tokens = T;
            aa.n_past = p0;
            aa.n_head = Nh;
            aa.n_head_kv = Nkv;
            aa.head_dim = D;
            aa.kv_f16 = seq.kv_f16;
            aa.scale = 1.0f / std::sqrt(static_cast<float>(D));
            attention(pool_, aa);                                                           // [T, Nh*D]
            matmul(pool_, lw.wo.type, lw.wo.data, H, q_dim, attn_.data(), T, tmp_.data());  // [T, H]
            cb("attn_out", il, tmp_.data(), T, H);
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];

            // ---- MoE: route → experts → combine ----
            rmsnorm(x_.data(), lw.ffn_norm.data(), xn_.data(), T, H, cfg_.rms_eps);         // [T, H]
            cb("ffn_norm", il, xn_.data(), T, H);
            matmul(pool_, lw.router.type, lw.router.data, E, H, xn_.data(), T, probs_.data());  // [T, E]
            route(T);                                                                        // [T, K]
            MM_RETURN_IF_ERROR(
                experts_->moe_forward(il, xn_.data(), T, K, sel_ids_.data(), sel_w_.data(), tmp_.data()));
            cb("ffn_moe_out", il, tmp_.data(), T, H);
            for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];
            cb("l_out", il, x_.data(), T, H);
        }
        seq.n_past += T;
        if (!out) return Status();
        const int64_t first = all_rows ? 0 : T - 1;
        const int64_t rows = T - first;
        rmsnorm(&x_[first * H], output_norm_.data(), xn_.data(), rows, H, cfg_.rms_eps);
        cb("result_norm", -1, xn_.data(), rows, H);
        matmul(pool_, output_.type, output_.data, V, H, xn_.data(), rows, out);            // [rows, V]
        cb("result_output", -1, out, rows, V);
        return Status();
    }

    void store_kv(SequenceState& seq, int il, int64_t p0, int64_t T) {
        const int64_t kv_dim = cfg_.n_head_kv * cfg_.head_dim;
        if (seq.kv_f16) {
            uint16_t* kc = seq.k16[il].data() + p0 * kv_dim;
            uint16_t* vc = seq.v16[il].data() + p0 * kv_dim;
            for (int64_t i = 0; i < T * kv_dim; ++i) {
                kc[i] = fp32_to_fp16(k_[i]);
                vc[i] = fp32_to_fp16(v_[i]);
            }
        } else {
            std::memcpy(seq.k32[il].data() + p0 * kv_dim, k_.data(), sizeof(float) * T * kv_dim);
            std::memcpy(seq.v32[il].data() + p0 * kv_dim, v_.data(), sizeof(float) * T * kv_dim);
        }
    }

    // probs_ [T, E] router logits → sel_ids_/sel_w_ [T, K]: softmax over all E, top-K, renormalise.
    void route(int64_t T) {
        const int64_t E = cfg_.n_expert, K = cfg_.n_expert_used;
        order_.resize(E);
        for (int64_t t = 0; t < T; ++t) {
            float* p = &probs_[t * E];
            softmax_inplace(p, E);
            std::iota(order_.begin(), order_.end(), 0);
            std::partial_sort(order_.begin(), order_.begin() + K, order_.end(),
                              [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
            double sum = 0.0;
            for (int64_t j = 0; j < K; ++j) {
                sel_ids_[t * K + j] = order_[j];
                sel_w_[t * K + j] = p[order_[j]];
                sum += p[order_[j]];
            }
            if (cfg_.norm_topk) {
                const float s = std::max(static_cast<float>(sum), 6.103515625e-5f);
                for (int64_t j = 0; j < K; ++j) sel_w_[t * K + j] /= s;
            }
        }
    }

    std::shared_ptr<GgufFile> file_;
    ModelConfig cfg_;
    ModelOptions opts_;
    ThreadPool pool_;
    DebugHook debug_;
    Weight tok_embd_;                 // {H, V}
    Weight output_;                   // {H, V} (token_embd when tied)
    std::vector<float> output_norm_;  // [H]
    std::vector<LayerWeights> layers_;
    std::unique_ptr<ExpertBackend> experts_;
    // Scratch for one chunk.
    std::vector<float> x_, xn_, q_, k_, v_, attn_, tmp_, probs_, sel_w_;
    std::vector<int32_t> sel_ids_, pos_, order_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> load_model(std::shared_ptr<GgufFile> file, const ModelOptions& opts) {
    MM_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(*file));
    auto m = std::make_unique<Qwen3MoeModel>(std::move(file), cfg, opts);
    MM_RETURN_IF_ERROR(m->load());
    return std::unique_ptr<Model>(std::move(m));
}

}  // namespace moemesh
