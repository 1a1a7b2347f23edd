// Hyper-parameters of a model, read once from GGUF metadata, validated, then trusted.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/status.h"
#include "kernels/rope_yarn.h"

namespace moemesh {

struct ModelConfig {
    Arch arch = Arch::kUnknown;
    std::string arch_name;
    std::string name;
    int64_t n_vocab = 0;      // rows of token_embd
    int64_t n_embd = 0;       // H
    int64_t n_layer = 0;      // L: blocks of the forward pass
    int64_t n_layer_all = 0;  // block_count: L plus multi-token-prediction blocks (ignored)
    int64_t n_nextn = 0;      // nextn_predict_layers (MTP blocks after the trunk)
    int64_t n_head = 0;       // q heads
    int64_t n_head_kv = 0;    // kv heads
    int64_t head_dim = 0;     // key_length (= value_length for our families)
    int64_t n_expert = 0;     // E
    int64_t n_expert_used = 0;  // K
    int64_t n_ff_exp = 0;     // I: expert width
    int64_t n_ff = 0;         // dense MLP width (unused by the MoE families)
    int64_t n_ctx_train = 0;
    int64_t rope_dim = 0;     // rotary dims per head (NEOX)
    float rope_theta = 10000.0f;
    // rope.scaling.* as the file gives them, with llama.cpp's defaults: type "linear" when absent,
    // factor 0 when absent (= no scaling; the older key rope.scale_linear is read too), original
    // context = the training context when absent. rope: what the kernels apply (kernels/rope_yarn.h).
    std::string rope_scaling = "linear";
    float rope_scaling_factor = 0.0f;
    int64_t rope_scaling_orig_ctx = 0;
    float rope_scaling_attn_factor = 1.0f;
    RopeParams rope;
    // Whether the file's keys change RoPE at all (for inspect and logs).
    bool rope_scaled() const {
        return rope.freq_scale != 1.0f || rope.ext_factor != 0.0f || rope.attn_factor != 1.0f;
    }
    float rms_eps = 1e-6f;
    bool norm_topk = true;    // renormalise the top-k router weights
    bool tied_embeddings = false;

    // qwen3next only (MODEL_SPEC §2): shared expert and the gated DeltaNet layers.
    int64_t n_ff_shexp = 0;       // shared expert width (0: no shared expert)
    int64_t ssm_conv_kernel = 0;  // K (conv taps)
    int64_t ssm_k_heads = 0;      // Hk (ssm.group_count)
    int64_t ssm_v_heads = 0;      // Hv (ssm.time_step_rank)
    int64_t ssm_head_dim = 0;     // dk = dv (ssm.state_size)
    std::vector<uint8_t> recurrent;  // per layer: 1 = gated DeltaNet, 0 = full attention (empty: none)

    bool is_recurrent(int layer) const {
        return !recurrent.empty() && recurrent[static_cast<size_t>(layer)] != 0;
    }
    int64_t ssm_key_dim() const { return ssm_k_heads * ssm_head_dim; }    // Hk*dk
    int64_t ssm_value_dim() const { return ssm_v_heads * ssm_head_dim; }  // Hv*dv
    int64_t ssm_conv_dim() const { return 2 * ssm_key_dim() + ssm_value_dim(); }
};

// Reads and validates the hyper-parameters. Errors name the file and key.
StatusOr<ModelConfig> load_model_config(const GgufFile& f);

}  // namespace moemesh
