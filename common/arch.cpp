#include "common/arch.h"

#include <cstdio>
#include <cstring>

#include "common/status.h"

namespace moemesh {

namespace {

struct ArchEntry {
    Arch arch;
    const char* name;
};
constexpr ArchEntry kArchNames[] = {
    {Arch::kQwen3Moe, "qwen3moe"},
    {Arch::kQwen3Next, "qwen3next"},
    {Arch::kQwen35Moe, "qwen35moe"},
};

struct KvEntry {
    Kv kv;
    const char* pattern;
};
// Same spelling as llama.cpp's LLM_KV_NAMES.
constexpr KvEntry kKvNames[] = {
    {Kv::kGeneralArchitecture, "general.architecture"},
    {Kv::kGeneralType, "general.type"},
    {Kv::kGeneralName, "general.name"},
    {Kv::kGeneralFileType, "general.file_type"},
    {Kv::kGeneralQuantizationVersion, "general.quantization_version"},
    {Kv::kGeneralAlignment, "general.alignment"},

    {Kv::kVocabSize, "%s.vocab_size"},
    {Kv::kContextLength, "%s.context_length"},
    {Kv::kEmbeddingLength, "%s.embedding_length"},
    {Kv::kBlockCount, "%s.block_count"},
    {Kv::kFeedForwardLength, "%s.feed_forward_length"},
    {Kv::kExpertFeedForwardLength, "%s.expert_feed_forward_length"},
    {Kv::kExpertSharedFeedForwardLength, "%s.expert_shared_feed_forward_length"},
    {Kv::kExpertCount, "%s.expert_count"},
    {Kv::kExpertUsedCount, "%s.expert_used_count"},
    {Kv::kExpertSharedCount, "%s.expert_shared_count"},
    {Kv::kExpertWeightsScale, "%s.expert_weights_scale"},
    {Kv::kExpertWeightsNorm, "%s.expert_weights_norm"},
    {Kv::kExpertGatingFunc, "%s.expert_gating_func"},
    {Kv::kFullAttentionInterval, "%s.full_attention_interval"},
    {Kv::kNextnPredictLayers, "%s.nextn_predict_layers"},
    {Kv::kAttentionHeadCount, "%s.attention.head_count"},
    {Kv::kAttentionHeadCountKv, "%s.attention.head_count_kv"},
    {Kv::kAttentionKeyLength, "%s.attention.key_length"},
    {Kv::kAttentionValueLength, "%s.attention.value_length"},
    {Kv::kAttentionLayerNormEps, "%s.attention.layer_norm_epsilon"},
    {Kv::kAttentionLayerNormRmsEps, "%s.attention.layer_norm_rms_epsilon"},
    {Kv::kAttentionRecurrentLayers, "%s.attention.recurrent_layers"},
    {Kv::kAttentionSlidingWindow, "%s.attention.sliding_window"},
    {Kv::kRopeDimensionCount, "%s.rope.dimension_count"},
    {Kv::kRopeDimensionSections, "%s.rope.dimension_sections"},
    {Kv::kRopeFreqBase, "%s.rope.freq_base"},
    {Kv::kRopeScalingType, "%s.rope.scaling.type"},
    {Kv::kRopeScalingFactor, "%s.rope.scaling.factor"},
    {Kv::kRopeScalingOrigCtxLen, "%s.rope.scaling.original_context_length"},
    {Kv::kRopeScalingAttnFactor, "%s.rope.scaling.attn_factor"},
    {Kv::kRopeScaleLinear, "%s.rope.scale_linear"},
    {Kv::kSsmConvKernel, "%s.ssm.conv_kernel"},
    {Kv::kSsmInnerSize, "%s.ssm.inner_size"},
    {Kv::kSsmStateSize, "%s.ssm.state_size"},
    {Kv::kSsmTimeStepRank, "%s.ssm.time_step_rank"},
    {Kv::kSsmGroupCount, "%s.ssm.group_count"},

    {Kv::kTokenizerModel, "tokenizer.ggml.model"},
    {Kv::kTokenizerPre, "tokenizer.ggml.pre"},
    {Kv::kTokenizerTokens, "tokenizer.ggml.tokens"},
    {Kv::kTokenizerTokenType, "tokenizer.ggml.token_type"},
    {Kv::kTokenizerScores, "tokenizer.ggml.scores"},
    {Kv::kTokenizerMerges, "tokenizer.ggml.merges"},
    {Kv::kTokenizerBosId, "tokenizer.ggml.bos_token_id"},
    {Kv::kTokenizerEosId, "tokenizer.ggml.eos_token_id"},
    {Kv::kTokenizerEotId, "tokenizer.ggml.eot_token_id"},
    {Kv::kTokenizerEomId, "tokenizer.ggml.eom_token_id"},
    {Kv::kTokenizerUnkId, "tokenizer.ggml.unknown_token_id"},
    {Kv::kTokenizerSepId, "tokenizer.ggml.seperator_token_id"},  // sic, as llama.cpp
    {Kv::kTokenizerPadId, "tokenizer.ggml.padding_token_id"},
    {Kv::kTokenizerAddBos, "tokenizer.ggml.add_bos_token"},
    {Kv::kTokenizerAddEos, "tokenizer.ggml.add_eos_token"},
    {Kv::kTokenizerAddSep, "tokenizer.ggml.add_sep_token"},
    {Kv::kTokenizerChatTemplate, "tokenizer.chat_template"},
    {Kv::kTokenizerFimPreId, "tokenizer.ggml.fim_pre_token_id"},
    {Kv::kTokenizerFimSufId, "tokenizer.ggml.fim_suf_token_id"},
    {Kv::kTokenizerFimMidId, "tokenizer.ggml.fim_mid_token_id"},
    {Kv::kTokenizerFimPadId, "tokenizer.ggml.fim_pad_token_id"},
    {Kv::kTokenizerFimRepId, "tokenizer.ggml.fim_rep_token_id"},
    {Kv::kTokenizerFimSepId, "tokenizer.ggml.fim_sep_token_id"},
};
static_assert(sizeof(kKvNames) / sizeof(kKvNames[0]) == static_cast<size_t>(Kv::kCount));

struct TensorEntry {
    Tensor tensor;
    const char* pattern;
};
// Same spelling as llama.cpp's LLM_TENSOR_NAMES.
constexpr TensorEntry kTensorNames[] = {
    {Tensor::kTokenEmbd, "token_embd"},
    {Tensor::kOutputNorm, "output_norm"},
    {Tensor::kOutput, "output"},
    {Tensor::kAttnNorm, "blk.%d.attn_norm"},
    {Tensor::kAttnPostNorm, "blk.%d.post_attention_norm"},
    {Tensor::kAttnQ, "blk.%d.attn_q"},
    {Tensor::kAttnK, "blk.%d.attn_k"},
    {Tensor::kAttnV, "blk.%d.attn_v"},
    {Tensor::kAttnOutput, "blk.%d.attn_output"},
    {Tensor::kAttnQNorm, "blk.%d.attn_q_norm"},
    {Tensor::kAttnKNorm, "blk.%d.attn_k_norm"},
    {Tensor::kAttnQkv, "blk.%d.attn_qkv"},
    {Tensor::kAttnGate, "blk.%d.attn_gate"},
    {Tensor::kFfnNorm, "blk.%d.ffn_norm"},
    {Tensor::kFfnGateInp, "blk.%d.ffn_gate_inp"},
    {Tensor::kFfnGate, "blk.%d.ffn_gate"},
    {Tensor::kFfnUp, "blk.%d.ffn_up"},
    {Tensor::kFfnDown, "blk.%d.ffn_down"},
    {Tensor::kFfnGateExps, "blk.%d.ffn_gate_exps"},
    {Tensor::kFfnUpExps, "blk.%d.ffn_up_exps"},
    {Tensor::kFfnDownExps, "blk.%d.ffn_down_exps"},
    {Tensor::kFfnGateUpExps, "blk.%d.ffn_gate_up_exps"},
    {Tensor::kFfnGateInpShexp, "blk.%d.ffn_gate_inp_shexp"},
    {Tensor::kFfnGateShexp, "blk.%d.ffn_gate_shexp"},
    {Tensor::kFfnUpShexp, "blk.%d.ffn_up_shexp"},
    {Tensor::kFfnDownShexp, "blk.%d.ffn_down_shexp"},
    {Tensor::kSsmA, "blk.%d.ssm_a"},
    {Tensor::kSsmConv1d, "blk.%d.ssm_conv1d"},
    {Tensor::kSsmDt, "blk.%d.ssm_dt"},
    {Tensor::kSsmBa, "blk.%d.ssm_ba"},
    {Tensor::kSsmBeta, "blk.%d.ssm_beta"},
    {Tensor::kSsmAlpha, "blk.%d.ssm_alpha"},
    {Tensor::kSsmIn, "blk.%d.ssm_in"},
    {Tensor::kSsmNorm, "blk.%d.ssm_norm"},
    {Tensor::kSsmOut, "blk.%d.ssm_out"},
    {Tensor::kNextnEhProj, "blk.%d.nextn.eh_proj"},
    {Tensor::kNextnEmbedTokens, "blk.%d.nextn.embed_tokens"},
    {Tensor::kNextnEnorm, "blk.%d.nextn.enorm"},
    {Tensor::kNextnHnorm, "blk.%d.nextn.hnorm"},
    {Tensor::kNextnSharedHeadHead, "blk.%d.nextn.shared_head_head"},
    {Tensor::kNextnSharedHeadNorm, "blk.%d.nextn.shared_head_norm"},
};
static_assert(sizeof(kTensorNames) / sizeof(kTensorNames[0]) == static_cast<size_t>(Tensor::kCount));

}  // namespace

const char* arch_name(Arch a) {
    for (const auto& e : kArchNames)
        if (e.arch == a) return e.name;
    return "(unknown)";
}

Arch arch_from_name(const std::string& name) {
    for (const auto& e : kArchNames)
        if (name == e.name) return e.arch;
    return Arch::kUnknown;
}

const char* kv_pattern(Kv k) {
    const auto i = static_cast<size_t>(k);
    MM_CHECK(i < static_cast<size_t>(Kv::kCount) && kKvNames[i].kv == k);
    return kKvNames[i].pattern;
}

std::string kv_name(Kv k, const std::string& arch) {
    const char* p = kv_pattern(k);
    if (std::strncmp(p, "%s.", 3) != 0) return p;
    return arch + (p + 2);
}

std::string kv_name(Kv k, Arch a) { return kv_name(k, std::string(arch_name(a))); }

const char* tensor_pattern(Tensor t) {
    const auto i = static_cast<size_t>(t);
    MM_CHECK(i < static_cast<size_t>(Tensor::kCount) && kTensorNames[i].tensor == t);
    return kTensorNames[i].pattern;
}

bool tensor_is_per_layer(Tensor t) { return std::strncmp(tensor_pattern(t), "blk.%d.", 7) == 0; }

bool is_routed_expert_tensor(const std::string& name) {
    int layer = -1;
    if (std::sscanf(name.c_str(), "blk.%d.", &layer) != 1 || layer < 0) return false;
    for (const Tensor t : {Tensor::kFfnGateExps, Tensor::kFfnUpExps, Tensor::kFfnDownExps, Tensor::kFfnGateUpExps}) {
        const std::string stem = tensor_name(t, layer, "");
        if (name.compare(0, stem.size(), stem) == 0 && name.size() > stem.size() && name[stem.size()] == '.')
            return true;
    }
    return false;
}

std::string tensor_name(Tensor t, int layer, const char* suffix) {
    const char* p = tensor_pattern(t);
    std::string name;
    if (tensor_is_per_layer(t)) {
        MM_CHECK(layer >= 0);
        name = "blk." + std::to_string(layer) + (p + 6);
    } else {
        name = p;
    }
    if (suffix && *suffix) {
        name += '.';
        name += suffix;
    }
    return name;
}

const std::vector<Tensor>& arch_tensors(Arch a) {
    static const std::vector<Tensor> kQwen3Moe = {
        Tensor::kTokenEmbd,   Tensor::kOutputNorm, Tensor::kOutput,      Tensor::kAttnNorm,
        Tensor::kAttnQ,       Tensor::kAttnK,      Tensor::kAttnV,       Tensor::kAttnOutput,
        Tensor::kAttnQNorm,   Tensor::kAttnKNorm,  Tensor::kFfnNorm,     Tensor::kFfnGateInp,
        Tensor::kFfnGateExps, Tensor::kFfnUpExps,  Tensor::kFfnDownExps,
    };
    static const std::vector<Tensor> kQwen3Next = {
        Tensor::kTokenEmbd,        Tensor::kOutputNorm,     Tensor::kOutput,           Tensor::kAttnNorm,
        Tensor::kAttnPostNorm,     Tensor::kAttnQ,          Tensor::kAttnK,            Tensor::kAttnV,
        Tensor::kAttnOutput,       Tensor::kAttnQNorm,      Tensor::kAttnKNorm,        Tensor::kAttnQkv,
        Tensor::kAttnGate,         Tensor::kSsmIn,          Tensor::kSsmConv1d,        Tensor::kSsmDt,
        Tensor::kSsmA,             Tensor::kSsmBa,          Tensor::kSsmNorm,          Tensor::kSsmOut,
        Tensor::kFfnGateInp,       Tensor::kFfnGateExps,    Tensor::kFfnUpExps,        Tensor::kFfnDownExps,
        Tensor::kFfnGateUpExps,    Tensor::kFfnGateInpShexp, Tensor::kFfnGateShexp,    Tensor::kFfnUpShexp,
        Tensor::kFfnDownShexp,     Tensor::kNextnEhProj,    Tensor::kNextnEmbedTokens, Tensor::kNextnEnorm,
        Tensor::kNextnHnorm,       Tensor::kNextnSharedHeadHead, Tensor::kNextnSharedHeadNorm,
    };
    // Qwen3.5 MoE: the qwen3next tensors with ssm_beta / ssm_alpha in place of ssm_ba (and no ssm_in).
    static const std::vector<Tensor> kQwen35Moe = [] {
        std::vector<Tensor> v;
        for (Tensor t : kQwen3Next)
            if (t != Tensor::kSsmBa && t != Tensor::kSsmIn) v.push_back(t);
        v.push_back(Tensor::kSsmBeta);
        v.push_back(Tensor::kSsmAlpha);
        return v;
    }();
    static const std::vector<Tensor> kNone;
    switch (a) {
        case Arch::kQwen3Moe:
            return kQwen3Moe;
        case Arch::kQwen3Next:
            return kQwen3Next;
        case Arch::kQwen35Moe:
            return kQwen35Moe;
        default:
            return kNone;
    }
}

}  // namespace moemesh
