// The one table of architecture names, GGUF metadata keys and tensor names, spelled as llama.cpp's
// llama-arch.cpp spells them (LLM_ARCH_NAMES, LLM_KV_NAMES, LLM_TENSOR_NAMES). The writer
// (tools/make_model) and the loaders use these, never string literals of their own.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moemesh {

enum class Arch {
    kUnknown,
    kQwen3Moe,   // "qwen3moe"
    kQwen3Next,  // "qwen3next"
    kQwen35Moe,  // "qwen35moe": Qwen3.5 / 3.6 MoE, the qwen3next layer stack with separate β/α
                 // projections, k heads tiled (not repeated) over v heads, and (text-only) IMRoPE
};
// The hybrid gated-DeltaNet / gated-attention families (qwen3next, qwen35moe).
inline bool arch_is_hybrid(Arch a) { return a == Arch::kQwen3Next || a == Arch::kQwen35Moe; }
const char* arch_name(Arch a);                 // "qwen3moe"; "(unknown)" for kUnknown
Arch arch_from_name(const std::string& name);  // kUnknown if not ours

// Metadata keys. Keys whose pattern starts with "%s." are prefixed with the architecture name.
enum class Kv {
    // general.*
    kGeneralArchitecture,
    kGeneralType,
    kGeneralName,
    kGeneralFileType,
    kGeneralQuantizationVersion,
    kGeneralAlignment,
    // {arch}.* hyper-parameters
    kVocabSize,
    kContextLength,
    kEmbeddingLength,
    kBlockCount,
    kFeedForwardLength,
    kExpertFeedForwardLength,
    kExpertSharedFeedForwardLength,
    kExpertCount,
    kExpertUsedCount,
    kExpertSharedCount,
    kExpertWeightsScale,
    kExpertWeightsNorm,
    kExpertGatingFunc,
    kFullAttentionInterval,
    kNextnPredictLayers,
    kAttentionHeadCount,
    kAttentionHeadCountKv,
    kAttentionKeyLength,
    kAttentionValueLength,
    kAttentionLayerNormEps,
    kAttentionLayerNormRmsEps,
    kAttentionRecurrentLayers,
    kAttentionSlidingWindow,
    kRopeDimensionCount,
    kRopeDimensionSections,  // qwen35moe: M-RoPE sections (t, h, w, e) in rotary pairs
    kRopeFreqBase,
    kRopeScalingType,
    kRopeScalingFactor,
    kRopeScalingOrigCtxLen,
    kRopeScalingAttnFactor,
    kRopeScaleLinear,  // the older name of rope.scaling.factor
    kSsmConvKernel,
    kSsmInnerSize,
    kSsmStateSize,
    kSsmTimeStepRank,
    kSsmGroupCount,
    // tokenizer.*
    kTokenizerModel,
    kTokenizerPre,
    kTokenizerTokens,
    kTokenizerTokenType,
    kTokenizerScores,
    kTokenizerMerges,
    kTokenizerBosId,
    kTokenizerEosId,
    kTokenizerEotId,
    kTokenizerEomId,
    kTokenizerUnkId,
    kTokenizerSepId,
    kTokenizerPadId,
    kTokenizerAddBos,
    kTokenizerAddEos,
    kTokenizerAddSep,
    kTokenizerChatTemplate,
    kTokenizerFimPreId,
    kTokenizerFimSufId,
    kTokenizerFimMidId,
    kTokenizerFimPadId,
    kTokenizerFimRepId,
    kTokenizerFimSepId,
    kCount,
};
const char* kv_pattern(Kv k);       // "%s.expert_count", "general.name"
std::string kv_name(Kv k, Arch a);  // "qwen3moe.expert_count"
std::string kv_name(Kv k, const std::string& arch);

// Tensors. Patterns with "blk.%d." are per layer; the name gets a ".weight"/".bias" suffix.
enum class Tensor {
    kTokenEmbd,
    kOutputNorm,
    kOutput,
    kAttnNorm,
    kAttnPostNorm,  // qwen3next: HF post_attention_layernorm (not ffn_norm)
    kAttnQ,
    kAttnK,
    kAttnV,
    kAttnOutput,
    kAttnQNorm,
    kAttnKNorm,
    kAttnQkv,   // qwen3next linear layers: [all q | all k | all v]
    kAttnGate,  // qwen3next linear layers: z
    kFfnNorm,
    kFfnGateInp,  // router
    kFfnGate,     // dense MLP
    kFfnUp,
    kFfnDown,
    kFfnGateExps,
    kFfnUpExps,
    kFfnDownExps,
    kFfnGateUpExps,  // fused gate|up experts (newer converters)
    kFfnGateInpShexp,
    kFfnGateShexp,
    kFfnUpShexp,
    kFfnDownShexp,
    kSsmA,  // "blk.%d.ssm_a", no suffix
    kSsmConv1d,
    kSsmDt,  // suffix "bias"
    kSsmBa,
    kSsmBeta,   // qwen35moe: β projection {H, Hv}
    kSsmAlpha,  // qwen35moe: α projection {H, Hv}
    kSsmIn,
    kSsmNorm,
    kSsmOut,
    kNextnEhProj,
    kNextnEmbedTokens,
    kNextnEnorm,
    kNextnHnorm,
    kNextnSharedHeadHead,
    kNextnSharedHeadNorm,
    kCount,
};
const char* tensor_pattern(Tensor t);  // "blk.%d.ffn_up_exps"
bool tensor_is_per_layer(Tensor t);
// A layer's routed experts: blk.N.ffn_{gate,up,down,gate_up}_exps.* (not the shared expert's).
bool is_routed_expert_tensor(const std::string& name);
// "blk.3.ffn_up_exps.weight". layer is ignored for global tensors; suffix "" gives no suffix.
std::string tensor_name(Tensor t, int layer = -1, const char* suffix = "weight");

// Tensors each architecture uses (qwen3next lists both layer kinds and both qkvz layouts; which
// appear in a file depends on the layer and the converter version).
const std::vector<Tensor>& arch_tensors(Arch a);

// general.file_type values (llama.h llama_ftype) for the types we write.
enum class FileType : uint32_t {
    kAllF32 = 0,
    kMostlyF16 = 1,
    kMostlyQ4_0 = 2,
    kMostlyQ8_0 = 7,
    kMostlyQ4_K_M = 15,
    kMostlyQ6_K = 18,
    kMostlyBF16 = 32,
};
constexpr uint32_t kGgmlQuantizationVersion = 2;  // general.quantization_version (GGML_QNT_VERSION)

}  // namespace moemesh
