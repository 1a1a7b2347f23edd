#include "coordinator/models/model_base.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/half.h"
#include "worker/expert_executor.h"

namespace moemesh {

StatusOr<std::vector<float>> load_vector(const GgufFile& f, const std::string& name, int64_t n) {
    MM_ASSIGN_OR_RETURN(Weight w, get_weight(f, name, {n}));
    std::vector<float> out(static_cast<size_t>(n));
    dequantize_row(w.type, w.data, out.data(), n);
    return out;
}

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

void alloc_kv_cache(SequenceState& s, const ModelConfig& c, int64_t n_ctx, bool kv_f16,
                    const std::vector<uint8_t>& has_kv) {
    s.n_ctx = n_ctx;
    s.kv_f16 = kv_f16;
    const size_t per_layer = static_cast<size_t>(n_ctx * c.n_head_kv * c.head_dim);
    const auto L = static_cast<size_t>(c.n_layer);
    if (kv_f16) {
        s.k16.assign(L, {});
        s.v16.assign(L, {});
    } else {
        s.k32.assign(L, {});
        s.v32.assign(L, {});
    }
    for (size_t il = 0; il < L; ++il) {
        if (!has_kv[il]) continue;
        if (kv_f16) {
            s.k16[il].resize(per_layer);
            s.v16[il].resize(per_layer);
        } else {
            s.k32[il].resize(per_layer);
            s.v32[il].resize(per_layer);
        }
    }
}

Status ModelBase::forward(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                          std::vector<float>* logits) {
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

Status ModelBase::load_common() {
    const GgufFile& f = *file_;
    const int64_t H = cfg_.n_embd, V = cfg_.n_vocab;
    MM_ASSIGN_OR_RETURN(tok_embd_, get_weight(f, tensor_name(Tensor::kTokenEmbd), {H, V}));
    MM_ASSIGN_OR_RETURN(output_norm_, load_vector(f, tensor_name(Tensor::kOutputNorm), H));
    MM_ASSIGN_OR_RETURN(output_, get_optional_weight(f, tensor_name(Tensor::kOutput), {H, V}));
    if (!output_) output_ = tok_embd_;  // tied embeddings
    if (opts_.experts) {
        MM_ASSIGN_OR_RETURN(experts_, opts_.experts(f, cfg_, pool_));
    } else {
        MM_ASSIGN_OR_RETURN(experts_, LocalExpertExecutor::create(f, cfg_, pool_));
    }
    return Status();
}

void ModelBase::embed(const int32_t* tokens, int64_t T, float* x) {
    const int64_t H = cfg_.n_embd;
    for (int64_t t = 0; t < T; ++t) dequantize_row(tok_embd_.type, tok_embd_.row(tokens[t]), &x[t * H], H);
    cb("inp_embd", -1, x, T, H);
}

void ModelBase::attend(SequenceState& seq, int il, int64_t p0, int64_t T, const float* q, const float* k,
                       const float* v, float* out) {
    const int64_t kv_dim = cfg_.n_head_kv * cfg_.head_dim;
    if (seq.kv_f16) {
        uint16_t* kc = seq.k16[il].data() + p0 * kv_dim;
        uint16_t* vc = seq.v16[il].data() + p0 * kv_dim;
        for (int64_t i = 0; i < T * kv_dim; ++i) {
            kc[i] = fp32_to_fp16(k[i]);
            vc[i] = fp32_to_fp16(v[i]);
        }
    } else {
        std::memcpy(seq.k32[il].data() + p0 * kv_dim, k, sizeof(float) * T * kv_dim);
        std::memcpy(seq.v32[il].data() + p0 * kv_dim, v, sizeof(float) * T * kv_dim);
    }
    AttentionArgs aa{};
    aa.q = q;
    aa.k = seq.kv_f16 ? static_cast<const void*>(seq.k16[il].data()) : seq.k32[il].data();
    aa.v = seq.kv_f16 ? static_cast<const void*>(seq.v16[il].data()) : seq.v32[il].data();
    aa.out = out;
    aa.n_tokens = T;
    aa.n_past = p0;
    aa.n_head = cfg_.n_head;
    aa.n_head_kv = cfg_.n_head_kv;
    aa.head_dim = cfg_.head_dim;
    aa.kv_f16 = seq.kv_f16;
    aa.scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
    attention(pool_, aa);
}

void ModelBase::output_logits(const float* x, int64_t T, bool all_rows, float* out) {
    const int64_t H = cfg_.n_embd, V = cfg_.n_vocab;
    const int64_t first = all_rows ? 0 : T - 1;
    const int64_t rows = T - first;
    final_norm_buf_.resize(static_cast<size_t>(rows * H));
    rmsnorm(&x[first * H], output_norm_.data(), final_norm_buf_.data(), rows, H, cfg_.rms_eps);
    cb("result_norm", -1, final_norm_buf_.data(), rows, H);
    matmul(pool_, output_.type, output_.data, V, H, final_norm_buf_.data(), rows, out);  // [rows, V]
    cb("result_output", -1, out, rows, V);
}

StatusOr<std::unique_ptr<Model>> load_model(std::shared_ptr<GgufFile> file, const ModelOptions& opts) {
    MM_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(*file));
    switch (cfg.arch) {
        case Arch::kQwen3Moe: return load_qwen3moe(std::move(file), cfg, opts);
        case Arch::kQwen3Next: return load_qwen3next(std::move(file), cfg, opts);
        default: break;
    }
    return MM_ERROR("%s: no forward pass for architecture '%s'", file->path().c_str(), cfg.arch_name.c_str());
}

}  // namespace moemesh
