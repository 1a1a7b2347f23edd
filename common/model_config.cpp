#include "common/model_config.h"

#include <cmath>

namespace moemesh {

namespace {

// The qwen3next and qwen35moe keys (llama.cpp's llama_model_qwen3next / _qwen35moe ::load_arch_hparams): the DeltaNet sizes,
// the layer schedule (attention.recurrent_layers, else full_attention_interval, default 4), and
// the shared expert width.
Status load_qwen3next_config(const GgufFile& f, ModelConfig& c) {
    const std::string& path = f.path();
    const Arch a = c.arch;
    MM_ASSIGN_OR_RETURN(c.ssm_conv_kernel, f.get_int(kv_name(Kv::kSsmConvKernel, a)));
    MM_ASSIGN_OR_RETURN(int64_t inner, f.get_int(kv_name(Kv::kSsmInnerSize, a)));
    MM_ASSIGN_OR_RETURN(c.ssm_head_dim, f.get_int(kv_name(Kv::kSsmStateSize, a)));
    MM_ASSIGN_OR_RETURN(c.ssm_v_heads, f.get_int(kv_name(Kv::kSsmTimeStepRank, a)));
    MM_ASSIGN_OR_RETURN(c.ssm_k_heads, f.get_int(kv_name(Kv::kSsmGroupCount, a)));
    c.n_ff_shexp = f.get_int_or(kv_name(Kv::kExpertSharedFeedForwardLength, a), 0);
    auto bad = [&](Kv k, int64_t v, const char* why) {
        return MM_ERROR("%s: metadata key '%s' = %lld %s", path.c_str(), kv_name(k, a).c_str(),
                        static_cast<long long>(v), why);
    };
    for (auto [k, v] : {std::pair{Kv::kSsmConvKernel, c.ssm_conv_kernel}, {Kv::kSsmStateSize, c.ssm_head_dim},
                        {Kv::kSsmTimeStepRank, c.ssm_v_heads}, {Kv::kSsmGroupCount, c.ssm_k_heads},
                        {Kv::kSsmInnerSize, inner}}) {
        if (v <= 0 || v > (int64_t(1) << 20)) return bad(k, v, "is out of range");
    }
    if (c.ssm_conv_kernel > 64) return bad(Kv::kSsmConvKernel, c.ssm_conv_kernel, "is too large (at most 64)");
    if (c.ssm_v_heads % c.ssm_k_heads != 0)
        return bad(Kv::kSsmTimeStepRank, c.ssm_v_heads, "(v heads) is not a multiple of ssm.group_count (k heads)");
    if (inner != c.ssm_v_heads * c.ssm_head_dim)
        return bad(Kv::kSsmInnerSize, inner, "differs from ssm.time_step_rank × ssm.state_size (value head dim "
                                             "must equal key head dim)");
    if (c.n_ff_shexp < 0) return bad(Kv::kExpertSharedFeedForwardLength, c.n_ff_shexp, "is negative");

    c.recurrent.assign(static_cast<size_t>(c.n_layer), 0);
    const std::string rkey = kv_name(Kv::kAttentionRecurrentLayers, a);
    if (const GgufValue* v = f.find(rkey)) {
        if (v->type == GgufType::ARRAY) {
            // One entry per block, MTP blocks included (llama.cpp reads n_layer_all entries).
            if (v->arr_i.size() != static_cast<size_t>(c.n_layer_all))
                return MM_ERROR("%s: metadata key '%s' has %zu entries, expected one per block (%lld) of an "
                                "integer or bool type",
                                path.c_str(), rkey.c_str(), v->arr_i.size(), static_cast<long long>(c.n_layer_all));
            for (size_t i = 0; i < c.recurrent.size(); ++i) c.recurrent[i] = v->arr_i[i] != 0;
        } else if (v->is_int()) {
            for (auto& r : c.recurrent) r = v->i != 0;
        } else {
            return MM_ERROR("%s: metadata key '%s' has type %s, expected an array of bools", path.c_str(),
                            rkey.c_str(), gguf_type_name(v->type));
        }
    } else {
        const int64_t interval = f.get_int_or(kv_name(Kv::kFullAttentionInterval, a), 4);
        if (interval <= 0) return bad(Kv::kFullAttentionInterval, interval, "must be positive");
        for (int64_t i = 0; i < c.n_layer; ++i) c.recurrent[static_cast<size_t>(i)] = (i + 1) % interval != 0;
    }
    return Status();
}

// qwen35moe rotates with IMRoPE (ggml_rope_multi, GGML_ROPE_TYPE_IMROPE, NEOX pairing). For text
// tokens llama.cpp gives the t, h and w positions the token's position and the e position 0
// (llm_graph_input_pos::set_input), so a pair whose sector is t, h or w turns exactly as plain NEOX
// RoPE does (the three angle chains are the same products), and a pair whose sector is e does not
// turn. Qwen3.5's sections [11, 11, 10, 0] over 32 pairs leave none on e; a file whose sections do is
// refused rather than rotated wrongly.
Status check_imrope_sections(const GgufFile& f, const ModelConfig& c) {
    const std::string key = kv_name(Kv::kRopeDimensionSections, c.arch);
    const GgufValue* v = f.find(key);
    if (!v) return Status();  // no sections: every pair on t (llama.cpp requires the key; we need not)
    if (v->type != GgufType::ARRAY || v->arr_i.empty() || v->arr_i.size() > 4)
        return MM_ERROR("%s: metadata key '%s' must be an array of at most 4 integers", f.path().c_str(), key.c_str());
    int64_t s[4] = {0, 0, 0, 0}, sum = 0;
    for (size_t i = 0; i < v->arr_i.size(); ++i) {
        s[i] = v->arr_i[i];
        if (s[i] < 0 || s[i] > 4096)
            return MM_ERROR("%s: metadata key '%s' entry %zu = %lld is out of range", f.path().c_str(), key.c_str(), i,
                            static_cast<long long>(s[i]));
        sum += s[i];
    }
    if (sum <= 0) return MM_ERROR("%s: metadata key '%s' has no sections", f.path().c_str(), key.c_str());
    for (int64_t i = 0; i < c.rope_dim / 2; ++i) {
        const int64_t sector = i % sum;
        const bool on_thw = (sector % 3 == 0 && sector < 3 * s[0]) || (sector % 3 == 1 && sector < 3 * s[1]) ||
                            (sector % 3 == 2 && sector < 3 * s[2]);
        if (!on_thw)
            return MM_ERROR("%s: metadata key '%s' = [%lld, %lld, %lld, %lld] puts rotary pair %lld on the vision-only "
                            "4th section, which moemesh does not implement",
                            f.path().c_str(), key.c_str(), static_cast<long long>(s[0]), static_cast<long long>(s[1]),
                            static_cast<long long>(s[2]), static_cast<long long>(s[3]), static_cast<long long>(i));
    }
    return Status();
}

}  // namespace

StatusOr<ModelConfig> load_model_config(const GgufFile& f) {
    ModelConfig c;
    const std::string& path = f.path();
    MM_ASSIGN_OR_RETURN(c.arch_name, f.get_string(kv_name(Kv::kGeneralArchitecture, Arch::kUnknown)));
    c.arch = arch_from_name(c.arch_name);
    if (c.arch != Arch::kQwen3Moe && !arch_is_hybrid(c.arch))
        return MM_ERROR("%s: architecture '%s' is not supported (supported: qwen3moe, qwen3next, qwen35moe)", path.c_str(),
                        c.arch_name.c_str());
    const Arch a = c.arch;
    c.name = f.get_string_or(kv_name(Kv::kGeneralName, a), "");
    MM_ASSIGN_OR_RETURN(c.n_embd, f.get_int(kv_name(Kv::kEmbeddingLength, a)));
    MM_ASSIGN_OR_RETURN(c.n_layer, f.get_int(kv_name(Kv::kBlockCount, a)));
    // Files that keep the multi-token-prediction block(s) count them in block_count; they sit after
    // the trunk and are not part of the forward pass (llama.cpp: n_layer = n_layer_all - nextn).
    c.n_layer_all = c.n_layer;
    c.n_nextn = f.get_int_or(kv_name(Kv::kNextnPredictLayers, a), 0);
    if (c.n_nextn < 0 || c.n_nextn >= c.n_layer)
        return MM_ERROR("%s: metadata key '%s' = %lld is out of range for %s = %lld", path.c_str(),
                        kv_name(Kv::kNextnPredictLayers, a).c_str(), static_cast<long long>(c.n_nextn),
                        kv_name(Kv::kBlockCount, a).c_str(), static_cast<long long>(c.n_layer));
    c.n_layer -= c.n_nextn;
    MM_ASSIGN_OR_RETURN(c.n_head, f.get_int(kv_name(Kv::kAttentionHeadCount, a)));
    c.n_head_kv = f.get_int_or(kv_name(Kv::kAttentionHeadCountKv, a), c.n_head);
    c.n_ctx_train = f.get_int_or(kv_name(Kv::kContextLength, a), 4096);
    c.n_ff = f.get_int_or(kv_name(Kv::kFeedForwardLength, a), 0);
    MM_ASSIGN_OR_RETURN(c.n_expert, f.get_int(kv_name(Kv::kExpertCount, a)));
    MM_ASSIGN_OR_RETURN(c.n_expert_used, f.get_int(kv_name(Kv::kExpertUsedCount, a)));
    c.n_ff_exp = f.get_int_or(kv_name(Kv::kExpertFeedForwardLength, a), 0);
    const int64_t default_head_dim = c.n_head > 0 ? c.n_embd / c.n_head : 0;
    c.head_dim = f.get_int_or(kv_name(Kv::kAttentionKeyLength, a), default_head_dim);
    const int64_t v_len = f.get_int_or(kv_name(Kv::kAttentionValueLength, a), c.head_dim);
    c.rope_dim = f.get_int_or(kv_name(Kv::kRopeDimensionCount, a), c.head_dim);
    c.rope_theta = static_cast<float>(f.get_float_or(kv_name(Kv::kRopeFreqBase, a), 10000.0));
    c.rope_scaling = f.get_string_or(kv_name(Kv::kRopeScalingType, a), "linear");
    c.rope_scaling_factor = static_cast<float>(f.get_float_or(
        kv_name(Kv::kRopeScalingFactor, a), f.get_float_or(kv_name(Kv::kRopeScaleLinear, a), 0.0)));
    c.rope_scaling_orig_ctx = f.get_int_or(kv_name(Kv::kRopeScalingOrigCtxLen, a), c.n_ctx_train);
    c.rope_scaling_attn_factor = static_cast<float>(f.get_float_or(kv_name(Kv::kRopeScalingAttnFactor, a), 1.0));
    MM_ASSIGN_OR_RETURN(double eps, f.get_float(kv_name(Kv::kAttentionLayerNormRmsEps, a)));
    c.rms_eps = static_cast<float>(eps);
    c.norm_topk = f.get_bool_or(kv_name(Kv::kExpertWeightsNorm, a), true);

    auto positive = [&](int64_t v, Kv k) -> Status {
        if (v <= 0 || v > (int64_t(1) << 24))
            return MM_ERROR("%s: metadata key '%s' has invalid value %lld", path.c_str(), kv_name(k, a).c_str(),
                            static_cast<long long>(v));
        return Status();
    };
    MM_RETURN_IF_ERROR(positive(c.n_embd, Kv::kEmbeddingLength));
    MM_RETURN_IF_ERROR(positive(c.n_layer, Kv::kBlockCount));
    MM_RETURN_IF_ERROR(positive(c.n_head, Kv::kAttentionHeadCount));
    MM_RETURN_IF_ERROR(positive(c.n_head_kv, Kv::kAttentionHeadCountKv));
    MM_RETURN_IF_ERROR(positive(c.head_dim, Kv::kAttentionKeyLength));
    MM_RETURN_IF_ERROR(positive(c.n_expert, Kv::kExpertCount));
    MM_RETURN_IF_ERROR(positive(c.n_expert_used, Kv::kExpertUsedCount));
    if (c.n_head % c.n_head_kv != 0)
        return MM_ERROR("%s: %s = %lld is not a multiple of %s = %lld", path.c_str(),
                        kv_name(Kv::kAttentionHeadCount, a).c_str(), static_cast<long long>(c.n_head),
                        kv_name(Kv::kAttentionHeadCountKv, a).c_str(), static_cast<long long>(c.n_head_kv));
    if (v_len != c.head_dim)
        return MM_ERROR("%s: %s = %lld differs from %s = %lld (not supported)", path.c_str(),
                        kv_name(Kv::kAttentionValueLength, a).c_str(), static_cast<long long>(v_len),
                        kv_name(Kv::kAttentionKeyLength, a).c_str(), static_cast<long long>(c.head_dim));
    if (c.n_expert_used > c.n_expert)
        return MM_ERROR("%s: %s = %lld exceeds %s = %lld", path.c_str(), kv_name(Kv::kExpertUsedCount, a).c_str(),
                        static_cast<long long>(c.n_expert_used), kv_name(Kv::kExpertCount, a).c_str(),
                        static_cast<long long>(c.n_expert));
    if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2 != 0)
        return MM_ERROR("%s: %s = %lld is invalid for head dim %lld", path.c_str(),
                        kv_name(Kv::kRopeDimensionCount, a).c_str(), static_cast<long long>(c.rope_dim),
                        static_cast<long long>(c.head_dim));
    if (!(std::isfinite(c.rope_theta) && c.rope_theta > 0 && c.rope_theta != 1.0f))
        return MM_ERROR("%s: %s = %g is invalid (must be a finite base above 0, not 1)", path.c_str(),
                        kv_name(Kv::kRopeFreqBase, a).c_str(), static_cast<double>(c.rope_theta));
    if (c.rope_scaling == "longrope")
        return MM_ERROR("%s: %s = 'longrope' is not supported (it needs per-dimension factor tensors; the Qwen3 "
                        "families use none, linear or yarn)",
                        path.c_str(), kv_name(Kv::kRopeScalingType, a).c_str());
    if (c.rope_scaling != "none" && c.rope_scaling != "linear" && c.rope_scaling != "yarn")
        return MM_ERROR("%s: %s = '%s' is not a RoPE scaling type (expected none, linear or yarn)", path.c_str(),
                        kv_name(Kv::kRopeScalingType, a).c_str(), c.rope_scaling.c_str());
    if (!(std::isfinite(c.rope_scaling_factor) && c.rope_scaling_factor >= 0 && c.rope_scaling_factor <= 1e6))
        return MM_ERROR("%s: %s = %g is invalid (expected a factor above 0, or 0 for none)", path.c_str(),
                        kv_name(Kv::kRopeScalingFactor, a).c_str(), static_cast<double>(c.rope_scaling_factor));
    if (!(std::isfinite(c.rope_scaling_attn_factor) && c.rope_scaling_attn_factor > 0))
        return MM_ERROR("%s: %s = %g is invalid", path.c_str(), kv_name(Kv::kRopeScalingAttnFactor, a).c_str(),
                        static_cast<double>(c.rope_scaling_attn_factor));
    MM_RETURN_IF_ERROR(positive(c.rope_scaling_orig_ctx, Kv::kRopeScalingOrigCtxLen));
    c.rope = make_rope_params(c.rope_dim, c.rope_theta, c.rope_scaling.c_str(), c.rope_scaling_factor,
                              c.rope_scaling_attn_factor, c.rope_scaling_orig_ctx);
    if (!(eps > 0 && eps < 1))
        return MM_ERROR("%s: %s = %g is out of range", path.c_str(), kv_name(Kv::kAttentionLayerNormRmsEps, a).c_str(),
                        eps);

    const GgufTensor* embd = f.tensor(tensor_name(Tensor::kTokenEmbd));
    if (!embd) return MM_ERROR("%s: missing tensor '%s'", path.c_str(), tensor_name(Tensor::kTokenEmbd).c_str());
    if (embd->n_dims != 2 || embd->ne[0] != c.n_embd)
        return MM_ERROR("%s: tensor '%s' has shape %s, expected {%lld, n_vocab}", path.c_str(), embd->name.c_str(),
                        embd->shape_str().c_str(), static_cast<long long>(c.n_embd));
    c.n_vocab = embd->ne[1];
    c.tied_embeddings = f.tensor(tensor_name(Tensor::kOutput)) == nullptr;
    if (c.n_ff_exp <= 0) {
        // Older files omit expert_feed_forward_length; the expert tensors carry it.
        const GgufTensor* up = f.tensor(tensor_name(Tensor::kFfnUpExps, 0));
        const GgufTensor* gate_up = f.tensor(tensor_name(Tensor::kFfnGateUpExps, 0));
        if (!up && !gate_up)
            return MM_ERROR("%s: missing key '%s' and tensor '%s'", path.c_str(),
                            kv_name(Kv::kExpertFeedForwardLength, a).c_str(), tensor_name(Tensor::kFfnUpExps, 0).c_str());
        c.n_ff_exp = up ? up->ne[1] : gate_up->ne[1] / 2;
    }
    if (arch_is_hybrid(c.arch)) MM_RETURN_IF_ERROR(load_qwen3next_config(f, c));
    if (c.arch == Arch::kQwen35Moe) MM_RETURN_IF_ERROR(check_imrope_sections(f, c));
    return c;
}

}  // namespace moemesh
