// make-model: writes a small random-weight model as GGUF, with the keys, tensor names, shapes and
// types llama.cpp's convert_hf_to_gguf.py (+ llama-quantize) would write, so that llama.cpp loads
// the very same file we test on. Weights are deterministic in the seed and scaled so that the
// next-token distribution is neither one-hot nor uniform and the router spreads tokens over experts.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>

#include "common/status.h"

namespace CLI {
class App;
}

namespace moemesh {

struct MakeModelOptions {
    std::string arch = "qwen3moe";
    std::string out;
    int layers = 2;
    int hidden = 256;
    int heads = 4;
    int kv_heads = 2;
    int head_dim = 64;
    int experts = 8;
    int top_k = 2;
    int expert_ff = 256;
    int vocab = 0;  // 0: the tokenizer's size (builtin tokenizer: kDefaultBuiltinVocab)
    int context = 4096;
    std::string type = "f32";  // f32 f16 bf16 q8_0 q4_0 q4_k q6_k
    uint64_t seed = 42;
    double router_skew = 0;  // --router-skew S: Zipf-like expert popularity (see make_model.cpp); 0: none
    std::string tokenizer_dir;  // Hugging Face directory with tokenizer.json; empty: builtin byte-level BPE
    double rope_theta = 1e6;
    // rope.scaling.*: written when rope_scaling is not empty (none | linear | yarn), as Hugging Face
    // configs with rope_scaling convert; rope_orig_ctx 0 leaves original_context_length out.
    std::string rope_scaling;
    double rope_factor = 0;
    int rope_orig_ctx = 0;
    double rms_eps = 1e-6;
    bool tied_embeddings = false;
    uint32_t alignment = 32;  // general.alignment (written only when not the default 32)
    int threads = 0;          // generator threads; 0: min(hardware threads, 8)
    // --fast-weights: the N(0, σ²) tensors from a cheap generator, Q8_0 and Q4_K rows written as blocks
    // directly (tools/fast_weights.h): other bytes than the default for the same seed, far faster.
    bool fast_weights = false;
    // Optional per-group overrides. Empty: norms and other 1-D tensors f32, token_embd / output in `type`.
    std::string norm_type;
    std::string embed_type;

    // qwen3next only (ignored for qwen3moe). Gated DeltaNet ("linear attention") sizes: Hk k-heads and
    // Hv v-heads (Hv a multiple of Hk) of dimension dk = dv = ssm_head_dim, depthwise conv of conv_kernel taps.
    int full_attention_interval = 4;  // layer i is full attention when (i+1) % interval == 0
    std::string recurrent_layers;     // "1,1,1,0,...": one 0/1 per layer (1 = DeltaNet); overrides the interval
                                      // and is written as the attention.recurrent_layers array instead
    int shared_ff = 0;                // shared expert width; 0: expert_ff
    int ssm_k_heads = 2;
    int ssm_v_heads = 4;
    int ssm_head_dim = 64;
    int conv_kernel = 4;
    int rope_dim = 0;                   // rotary dims of each head (partial RoPE); 0: head_dim / 4
    std::string qkvz_layout = "split";  // split: attn_qkv + attn_gate (current converter); legacy: one ssm_in
    // As convert_hf_to_gguf.py --fuse-qkv / --fuse-gate-up-exps: attention layers get one attn_qkv
    // (q rows, then k, then v), and the experts one ffn_gate_up_exps {H, 2I, E} (per expert the gate
    // rows, then the up rows; llama.cpp reads that for qwen3next and qwen35moe only).
    bool fuse_qkv = false;
    bool fuse_gate_up = false;
};

constexpr int kDefaultQwen3NextLayers = 4;  // --layers when not given with --arch qwen3next: 3 DeltaNet + 1 full

constexpr int kDefaultBuiltinVocab = 512;

Status make_model(const MakeModelOptions& o, std::ostream& log);

// Adds subcommand "make-model" with every option as a flag, and a callback that runs make_model
// (progress to stderr); on error it prints the message to stderr and exits with status 1.
void register_make_model_command(CLI::App& app);

}  // namespace moemesh
