// make-model: random-weight qwen3moe and qwen3next GGUF files that llama.cpp loads.
//
// Shape legend (ggml order, ne[0] innermost = input dimension of a matrix):
//   H hidden, V vocab, L layers, D head_dim, Q = heads*D, KV = kv_heads*D, E experts, I expert_ff
//   token_embd {H, V}      output {H, V} (absent when tied)      output_norm {H}
//   blk.N.attn_norm {H}    attn_q {H, Q}   attn_k {H, KV}   attn_v {H, KV}   attn_output {Q, H}
//   blk.N.attn_q_norm {D}  attn_k_norm {D}   ffn_norm {H}
//   blk.N.ffn_gate_inp {H, E}      ffn_gate_exps {H, I, E}  ffn_up_exps {H, I, E}  ffn_down_exps {I, H, E}
// qwen3next (Hk, Hv DeltaNet heads of dk = dv, r = Hv/Hk, K conv taps, S shared expert width):
//   blk.N.post_attention_norm {H} replaces ffn_norm
//   full-attention layers: attn_q {H, 2Q} (per head [query D | gate D]), attn_k, attn_v, attn_output,
//                          attn_q_norm, attn_k_norm as above
//   DeltaNet layers: attn_qkv {H, 2*Hk*dk + Hv*dv} ([all q | all k | all v]) + attn_gate {H, Hv*dv} (z),
//                    or (--qkvz-layout legacy) ssm_in {H, 2*Hk*dk + 2*Hv*dv} (per k-head g:
//                    [q_g dk | k_g dk | v_g r*dv | z_g r*dv], HF's in_proj_qkvz as it is)
//                    ssm_conv1d {K, 2*Hk*dk + Hv*dv}  ssm_dt.bias {Hv}  ssm_a {Hv}  ssm_ba {H, 2Hv}
//                    (per k-head g: [b_g r | a_g r])  ssm_norm {dv}  ssm_out {Hv*dv, H}
//   blk.N.ffn_gate_inp_shexp {H}  ffn_gate_shexp {H, S}  ffn_up_shexp {H, S}  ffn_down_shexp {S, H}
// qwen35moe (Qwen3.5 / 3.6 MoE): the qwen3next blocks with the split qkvz layout only, and
//   ssm_beta {H, Hv} + ssm_alpha {H, Hv} (v-head order) in place of ssm_ba; rope.dimension_sections
//   [s0, s1, s2, 0] covering the rotary pairs (Qwen3.5: [11, 11, 10, 0] for 32 pairs).
//
// Scaling (why the numbers below): every matrix is N(0, 1/fan_in) so each projection of a unit-RMS
// input has unit RMS; token_embd is N(0, 1) so the token identity is as loud as a block's output in
// the residual stream; the router is N(0, (2/sqrt(H))²) so router logits have std ~2 (experts are
// chosen with a spread, few near-ties); output is N(0, (2/sqrt(H))²) so the logits have std ~2
// (the top token then rarely has more than half the mass, and the runner-up is usually close).
// Norm weights are 1 ± 10% (qwen3next: what the converter's +1 makes of HF's zero-centred norms;
// ssm_norm is a plain weight, initialised to ones in HF, so also 1 ± 10%).
// Tied embeddings: a token's logit then includes its own embedding's share of the residual
// stream, h·e_x ≈ |e_x|², which with N(0, 1) embeddings makes "repeat the input token" win with
// probability ~1. So token_embd is N(0, (2/sqrt(H))²) (|e_x| ≈ 2, small beside the blocks' output)
// and output_norm stays 1 ± 10%, which again gives logits of std ~2.
// qwen3next's DeltaNet, as HF initialises it: A ~ U(0, 16) and ssm_a = -exp(A_log) = -A;
// dt_bias = softplus⁻¹(dt) with dt log-uniform in [1e-3, 0.1] (fla's init), so with a = x·W_a ~ N(0, 1)
// the per-token log-decay g = ssm_a·softplus(a + dt_bias) is mostly in (-1, 0): the state remembers
// several tokens, some heads many. conv1d is N(0, 1/K) (unit-RMS output per channel); ssm_ba is
// fan-in scaled so b and a are ~N(0, 1) (beta = sigmoid(b) spread around 0.5). The gated RMSNorm
// rescales the DeltaNet output to unit RMS per head whatever the state's magnitude, so the branch
// contributes as much as attention does. The shared-expert gate is N(0, 1/H): x·w ~ N(0, 1), so
// sigmoid(x·w) is spread over ~(0.2, 0.8), never saturated.
#include "tools/make_model.h"

#include "common/placement.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <thread>
#include <vector>

#include "common/arch.h"
#include "common/ggml_types.h"
#include "common/gguf.h"
#include "common/half.h"
#include "common/tokenizer_data.h"
#include "kernels/cpu/quants_iq.h"
#include "kernels/ops.h"
#include "tools/fast_weights.h"
#include "tools/gguf_stream_writer.h"

namespace moemesh {

namespace {

// ---- deterministic random numbers (same on every platform: no std::*_distribution) ----

uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t fnv1a(const std::string& s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

class Rng {  // xoshiro256**
public:
    explicit Rng(uint64_t seed) {
        for (auto& w : s_) w = seed = splitmix64(seed);
    }
    uint64_t next() {
        const uint64_t r = rotl(s_[1] * 5, 7) * 9;
        const uint64_t t = s_[1] << 17;
        s_[2] ^= s_[0];
        s_[3] ^= s_[1];
        s_[1] ^= s_[2];
        s_[0] ^= s_[3];
        s_[2] ^= t;
        s_[3] = rotl(s_[3], 45);
        return r;
    }
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
    // Box-Muller: both values of each pair are used (the cosine one first).
    float normal() {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        const double u1 = 1.0 - uniform();  // (0, 1]
        const double u2 = uniform();
        const double r = std::sqrt(-2.0 * std::log(u1));
        const double a = 6.283185307179586 * u2;
        spare_ = static_cast<float>(r * std::sin(a));
        has_spare_ = true;
        return static_cast<float>(r * std::cos(a));
    }

private:
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t s_[4];
    float spare_ = 0;
    bool has_spare_ = false;
};

// ---- what to write ----

enum class Init {
    kNormal,      // N(0, scale²)
    kNearOne,     // scale * (1 + 0.1·N(0,1))
    kNegUniform,  // -scale·U(0, 1): ssm_a = -exp(A_log) with A ~ U(0, scale)
    kDtBias,      // softplus⁻¹(dt), dt = exp(U(ln 1e-3, ln 0.1))
};

struct TensorPlan {
    std::string name;
    std::vector<int64_t> ne;  // ggml order
    GgmlType type;
    Init init;
    float scale;
    // Row r (of ne[0] values) is row row_map[r] of the random tensor named seed_name. Both empty: the
    // tensor's own rows. This lets attn_qkv + attn_gate be exactly the rows of the ssm_in the legacy
    // layout writes from the same seed (the converter's de-interleave is a permutation of rows).
    std::string seed_name;
    std::vector<int64_t> row_map;
    std::vector<float> row_scale;  // row r's values times row_scale[r] (empty: none; --router-skew)
};

bool writable_type(GgmlType t) {
    switch (t) {
        case GgmlType::F32:
        case GgmlType::F16:
        case GgmlType::BF16:
        case GgmlType::Q8_0:
        case GgmlType::Q4_0:
        case GgmlType::Q5_0:
        case GgmlType::Q2_K:
        case GgmlType::Q3_K:
        case GgmlType::Q4_K:
        case GgmlType::Q5_K:
        case GgmlType::Q6_K:
        case GgmlType::Q4_1:
        case GgmlType::Q5_1:
        case GgmlType::IQ4_NL:
        case GgmlType::IQ4_XS:
        case GgmlType::MXFP4:
            return true;
        default:
            return false;
    }
}

StatusOr<GgmlType> parse_type(const std::string& flag, const std::string& s) {
    GgmlType t;
    if (!ggml_type_from_name(s, &t) || !writable_type(t))
        return MM_ERROR("%s: unsupported weight type '%s' (expected f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1, "
                        "iq4_nl, iq4_xs, mxfp4, q2_k, q3_k, q4_k, q5_k or q6_k; with --fast-weights also iq3_s, "
                        "iq3_xxs, iq2_xxs, iq2_xs, iq2_s, iq1_s, iq1_m for --type and --embed-type)",
                        flag.c_str(), s.c_str());
    return t;
}

// The type of the N(0, σ²) matrices: parse_type's, or an i-quant, which has no quantizer in moemesh:
// its rows can only be written directly (fast_weights_row_direct).
StatusOr<GgmlType> parse_matrix_type(const std::string& flag, const std::string& s, bool fast_weights) {
    GgmlType t;
    if (ggml_type_from_name(s, &t) && quants::is_iq_lowbit(t)) {
        if (!fast_weights)
            return MM_ERROR("%s: %s has no quantizer in moemesh; use --fast-weights (random grid indices written "
                            "directly)",
                            flag.c_str(), ggml_type_name(t));
        return t;
    }
    return parse_type(flag, s);
}

FileType file_type_of(GgmlType t) {
    switch (t) {
        case GgmlType::F16:
            return FileType::kMostlyF16;
        case GgmlType::BF16:
            return FileType::kMostlyBF16;
        case GgmlType::Q8_0:
            return FileType::kMostlyQ8_0;
        case GgmlType::Q4_0:
            return FileType::kMostlyQ4_0;
        case GgmlType::Q4_K:
            return FileType::kMostlyQ4_K_M;
        case GgmlType::Q6_K:
            return FileType::kMostlyQ6_K;
        // llama.h's LLAMA_FTYPE_MOSTLY_Q4_1, _Q5_0, _Q5_1, _Q2_K, _Q3_K_M, _Q5_K_M, _IQ4_NL, _IQ4_XS, _MXFP4_MOE
        // (llama-quantize's names for them).
        case GgmlType::Q4_1:
            return static_cast<FileType>(3);
        case GgmlType::Q5_1:
            return static_cast<FileType>(9);
        case GgmlType::IQ4_NL:
            return static_cast<FileType>(25);
        case GgmlType::IQ4_XS:
            return static_cast<FileType>(30);
        case GgmlType::MXFP4:  // LLAMA_FTYPE_MOSTLY_MXFP4_MOE (there it is the experts only)
            return static_cast<FileType>(38);
        case GgmlType::Q5_0:
            return static_cast<FileType>(8);
        case GgmlType::Q2_K:
            return static_cast<FileType>(10);
        case GgmlType::Q3_K:
            return static_cast<FileType>(12);
        case GgmlType::Q5_K:
            return static_cast<FileType>(17);
        // llama.h's LLAMA_FTYPE_MOSTLY_IQ2_XXS, _IQ2_XS, _IQ3_XXS, _IQ1_S, _IQ3_S, _IQ2_S, _IQ1_M.
        case GgmlType::IQ2_XXS:
            return static_cast<FileType>(19);
        case GgmlType::IQ2_XS:
            return static_cast<FileType>(20);
        case GgmlType::IQ3_XXS:
            return static_cast<FileType>(23);
        case GgmlType::IQ1_S:
            return static_cast<FileType>(24);
        case GgmlType::IQ3_S:
            return static_cast<FileType>(26);
        case GgmlType::IQ2_S:
            return static_cast<FileType>(28);
        case GgmlType::IQ1_M:
            return static_cast<FileType>(31);
        default:
            return FileType::kAllF32;
    }
}

// llama-quant.cpp's tensor_type_fallback: a row length that is not a multiple of the block size
// gets a smaller-block type, as in llama.cpp: Q2_K, Q3_K, IQ4_XS and the i-quants → IQ4_NL, Q5_K → Q5_1,
// Q6_K → Q8_0. llama.cpp sends Q4_K to Q5_0; we keep Q4_0, what make-model always wrote. A
// 32-block type that still does not fit becomes F16, as in llama.cpp.
GgmlType fallback_type(GgmlType want, int64_t ncols, const std::string& name, std::ostream& log) {
    if (ncols % ggml_type_info(want).block_size == 0) return want;
    GgmlType t = want;
    if (want == GgmlType::Q4_K) t = GgmlType::Q4_0;
    if (want == GgmlType::Q6_K) t = GgmlType::Q8_0;
    if (want == GgmlType::Q5_K) t = GgmlType::Q5_1;
    if (want == GgmlType::Q2_K || want == GgmlType::Q3_K || want == GgmlType::IQ4_XS || quants::is_iq_lowbit(want))
        t = GgmlType::IQ4_NL;
    if (ncols % ggml_type_info(t).block_size != 0) t = GgmlType::F16;
    log << "make-model: " << name << ": row length " << ncols << " is not a multiple of " << ggml_type_name(want)
        << "'s block of " << ggml_type_info(want).block_size << "; writing " << ggml_type_name(t) << " instead\n";
    return t;
}

// Which layers are DeltaNet (true) and which are full attention, as llama.cpp decides it: the
// recurrent_layers array when given, else (i+1) % full_attention_interval != 0.
StatusOr<std::vector<bool>> recurrent_schedule(const MakeModelOptions& o) {
    std::vector<bool> rec(static_cast<size_t>(o.layers));
    if (o.recurrent_layers.empty()) {
        for (int i = 0; i < o.layers; ++i) rec[static_cast<size_t>(i)] = (i + 1) % o.full_attention_interval != 0;
        return rec;
    }
    std::vector<std::string> items(1);
    for (char c : o.recurrent_layers) {
        if (c == ',') {
            items.emplace_back();
        } else if (c != ' ') {
            items.back() += c;
        }
    }
    if (static_cast<int>(items.size()) != o.layers)
        return MM_ERROR("make-model: --recurrent-layers '%s' has %zu entries but there are %d layers (--layers)",
                        o.recurrent_layers.c_str(), items.size(), o.layers);
    for (size_t i = 0; i < items.size(); ++i) {
        if (items[i] != "0" && items[i] != "1")
            return MM_ERROR("make-model: --recurrent-layers entry %zu is '%s'; expected 1 (DeltaNet) or 0 (full "
                            "attention)",
                            i, items[i].c_str());
        rec[i] = items[i] == "1";
    }
    return rec;
}

int rope_dim_of(const MakeModelOptions& o) { return o.rope_dim > 0 ? o.rope_dim : o.head_dim / 4; }

Status validate_qwen3next(const MakeModelOptions& o) {
    auto positive = [](const char* flag, int v) -> Status {
        if (v <= 0) return MM_ERROR("make-model: %s must be positive, got %d", flag, v);
        return Status();
    };
    MM_RETURN_IF_ERROR(positive("--ssm-k-heads", o.ssm_k_heads));
    MM_RETURN_IF_ERROR(positive("--ssm-v-heads", o.ssm_v_heads));
    MM_RETURN_IF_ERROR(positive("--ssm-head-dim", o.ssm_head_dim));
    MM_RETURN_IF_ERROR(positive("--full-attention-interval", o.full_attention_interval));
    if (o.shared_ff < 0) return MM_ERROR("make-model: --shared-ff must be >= 0 (0: --expert-ff), got %d", o.shared_ff);
    if (o.ssm_v_heads % o.ssm_k_heads != 0)
        return MM_ERROR("make-model: --ssm-v-heads %d is not a multiple of --ssm-k-heads %d (each k-head serves "
                        "Hv/Hk v-heads)",
                        o.ssm_v_heads, o.ssm_k_heads);
    if (o.conv_kernel < 2)
        return MM_ERROR("make-model: --conv-kernel must be at least 2 (llama.cpp keeps K-1 past inputs), got %d",
                        o.conv_kernel);
    if (o.rope_dim < 0) return MM_ERROR("make-model: --rope-dim must be >= 0 (0: head_dim/4), got %d", o.rope_dim);
    const int rope = rope_dim_of(o);
    const char* how = o.rope_dim > 0 ? "" : " (the default, head_dim/4; give --rope-dim)";
    if (rope == 0 || rope > o.head_dim)
        return MM_ERROR("make-model: --rope-dim %d%s must be in [2, --head-dim %d]", rope, how, o.head_dim);
    if (rope % 2 != 0) return MM_ERROR("make-model: --rope-dim %d%s must be even (RoPE pairs)", rope, how);
    if (o.qkvz_layout != "split" && o.qkvz_layout != "legacy")
        return MM_ERROR("make-model: --qkvz-layout '%s': expected split or legacy", o.qkvz_layout.c_str());
    if (o.qkvz_layout == "legacy" && o.arch == arch_name(Arch::kQwen35Moe))
        return MM_ERROR("make-model: --qkvz-layout legacy is a qwen3next layout; qwen35moe files have attn_qkv + attn_gate");
    return recurrent_schedule(o).status();
}

Status validate(const MakeModelOptions& o) {
    if (o.out.empty()) return MM_ERROR("make-model: --out is required");
    const Arch a = arch_from_name(o.arch);
    if (a == Arch::kUnknown)
        return MM_ERROR("make-model: unknown architecture '%s' (expected qwen3moe, qwen3next or qwen35moe)", o.arch.c_str());
    auto positive = [](const char* flag, int v) -> Status {
        if (v <= 0) return MM_ERROR("make-model: %s must be positive, got %d", flag, v);
        return Status();
    };
    MM_RETURN_IF_ERROR(positive("--layers", o.layers));
    MM_RETURN_IF_ERROR(positive("--hidden", o.hidden));
    MM_RETURN_IF_ERROR(positive("--heads", o.heads));
    MM_RETURN_IF_ERROR(positive("--kv-heads", o.kv_heads));
    MM_RETURN_IF_ERROR(positive("--head-dim", o.head_dim));
    MM_RETURN_IF_ERROR(positive("--experts", o.experts));
    MM_RETURN_IF_ERROR(positive("--top-k", o.top_k));
    MM_RETURN_IF_ERROR(positive("--expert-ff", o.expert_ff));
    MM_RETURN_IF_ERROR(positive("--context", o.context));
    if (o.vocab < 0) return MM_ERROR("make-model: --vocab must be >= 0 (0: the tokenizer's size), got %d", o.vocab);
    if (o.threads < 0) return MM_ERROR("make-model: --threads must be >= 0 (0: min(hardware threads, 8)), got %d", o.threads);
    if (o.heads % o.kv_heads != 0)
        return MM_ERROR("make-model: --heads %d is not a multiple of --kv-heads %d", o.heads, o.kv_heads);
    if (o.head_dim % 2 != 0) return MM_ERROR("make-model: --head-dim %d must be even (RoPE pairs)", o.head_dim);
    if (o.top_k > o.experts) return MM_ERROR("make-model: --top-k %d exceeds --experts %d", o.top_k, o.experts);
    if (!(o.rope_theta > 0) || o.rope_theta == 1)
        return MM_ERROR("make-model: --rope-theta must be positive and not 1, got %g", o.rope_theta);
    if (!o.rope_scaling.empty() && o.rope_scaling != "none" && o.rope_scaling != "linear" && o.rope_scaling != "yarn")
        return MM_ERROR("make-model: --rope-scaling must be none, linear or yarn, got '%s'", o.rope_scaling.c_str());
    if (!(o.rope_factor >= 0) || !std::isfinite(o.rope_factor))
        return MM_ERROR("make-model: --rope-factor must be a finite number >= 0, got %g", o.rope_factor);
    if (o.rope_orig_ctx < 0) return MM_ERROR("make-model: --rope-orig-ctx must be >= 0, got %d", o.rope_orig_ctx);
    if (o.rope_scaling.empty() && (o.rope_factor != 0 || o.rope_orig_ctx != 0))
        return MM_ERROR("make-model: --rope-factor and --rope-orig-ctx need --rope-scaling");
    if (!(o.rms_eps > 0)) return MM_ERROR("make-model: --rms-eps must be positive");
    if (!(o.router_skew >= 0) || !std::isfinite(o.router_skew))
        return MM_ERROR("make-model: --router-skew must be a finite number >= 0 (0: no skew), got %g", o.router_skew);
    auto t = parse_matrix_type("--type", o.type, o.fast_weights);
    if (!t.ok()) return t.status();
    if (arch_is_hybrid(a)) MM_RETURN_IF_ERROR(validate_qwen3next(o));
    if (o.fuse_gate_up && !arch_is_hybrid(a))
        return MM_ERROR("make-model: --fuse-gate-up: llama.cpp reads ffn_gate_up_exps for qwen3next and qwen35moe "
                        "only, not %s", o.arch.c_str());
    return Status();
}

// Row `r` of t (n values) from the default generator: Rng seeded by key, Box-Muller normals.
void draw_row(const TensorPlan& t, uint64_t key, int64_t r, float* row, int64_t n) {
    Rng rng(key);
    for (int64_t i = 0; i < n; ++i) {
        switch (t.init) {
            case Init::kNormal:
                row[i] = t.scale * rng.normal();
                break;
            case Init::kNearOne:
                row[i] = t.scale * (1.0f + 0.1f * rng.normal());
                break;
            case Init::kNegUniform:
                row[i] = -t.scale * static_cast<float>(rng.uniform());
                break;
            case Init::kDtBias: {
                const double lo = std::log(1e-3), hi = std::log(0.1);
                const double dt = std::exp(lo + (hi - lo) * rng.uniform());
                row[i] = static_cast<float>(dt + std::log(-std::expm1(-dt)));
                break;
            }
        }
    }
    if (!t.row_scale.empty())
        for (int64_t i = 0; i < n; ++i) row[i] *= t.row_scale[static_cast<size_t>(r)];
}

// Generates rows [r0, r1) of one tensor (ne[0] values each) and encodes them into dst. Every row has
// its own random stream, so the result does not depend on how rows are split over threads.
// fast: the N(0, σ²) tensors from tools/fast_weights.h's generator instead of draw_row's.
void fill_rows(const TensorPlan& t, uint64_t tensor_seed, int64_t r0, int64_t r1, uint8_t* dst, bool fast) {
    const int64_t n = t.ne[0];
    const size_t row_bytes = ggml_row_bytes(t.type, n);
    const bool fast_rows = fast && t.init == Init::kNormal;
    std::vector<float> row(static_cast<size_t>(n));
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t src = t.row_map.empty() ? r : t.row_map[static_cast<size_t>(r)];
        const uint64_t key = tensor_seed + static_cast<uint64_t>(src) * 0xD1B54A32D192ED03ull;
        if (fast_rows) {
            const float sigma = t.scale * (t.row_scale.empty() ? 1.0f : t.row_scale[static_cast<size_t>(r)]);
            if (fast_weights_direct(t.type)) {
                fast_weights_row_direct(t.type, key, sigma, dst + static_cast<size_t>(r) * row_bytes, n);
                continue;
            }
            fast_weights_row_floats(key, sigma, row.data(), n);
        } else {
            draw_row(t, key, r, row.data(), n);
        }
        uint8_t* out = dst + static_cast<size_t>(r) * row_bytes;
        switch (t.type) {
            case GgmlType::F32:
                std::memcpy(out, row.data(), row_bytes);
                break;
            case GgmlType::F16:
                for (int64_t i = 0; i < n; ++i) {
                    const uint16_t h = fp32_to_fp16(row[i]);
                    std::memcpy(out + 2 * i, &h, 2);
                }
                break;
            case GgmlType::BF16:
                for (int64_t i = 0; i < n; ++i) {
                    const uint16_t h = fp32_to_bf16(row[i]);
                    std::memcpy(out + 2 * i, &h, 2);
                }
                break;
            default:
                MM_CHECK(quantize_row(t.type, row.data(), out, n) == row_bytes);
                break;
        }
    }
}

// One tensor's bytes, made in `data` (resized; its capacity reused).
void generate(const TensorPlan& t, uint64_t seed, int n_threads, bool fast, std::vector<uint8_t>& data) {
    int64_t rows = 1;
    for (size_t d = 1; d < t.ne.size(); ++d) rows *= t.ne[d];
    data.resize(ggml_row_bytes(t.type, t.ne[0]) * static_cast<size_t>(rows));
    const uint64_t tensor_seed = splitmix64(seed ^ fnv1a(t.seed_name.empty() ? t.name : t.seed_name));
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(n_threads, rows * t.ne[0] / (1 << 16)));
    if (nt == 1) {
        fill_rows(t, tensor_seed, 0, rows, data.data(), fast);
        return;
    }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) {
        const int64_t r0 = rows * i / nt, r1 = rows * (i + 1) / nt;
        pool.emplace_back([&, r0, r1] { fill_rows(t, tensor_seed, r0, r1, data.data(), fast); });
    }
    for (auto& th : pool) th.join();
}



float fan_in(int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); }

// --router-skew S: real MoE routers have stable popular experts, random ones do not. Row e of a
// layer's router (expert e's logit weights) is scaled by 1 + S / (rank(e) + 1), ranks a random
// permutation per layer: a Zipf-like law of logit spread, and a token's top-k favours the experts
// with the widest spread. S = 0 leaves the router as it was (byte for byte).
std::vector<float> router_skew_scales(const MakeModelOptions& o, int layer) {
    const int E = o.experts;
    std::vector<int> rank(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) rank[static_cast<size_t>(e)] = e;
    Rng rng(splitmix64(o.seed ^ fnv1a(tensor_name(Tensor::kFfnGateInp, layer) + "/router-skew")));
    for (int i = E - 1; i > 0; --i)  // Fisher-Yates
        std::swap(rank[static_cast<size_t>(i)], rank[static_cast<size_t>(rng.uniform() * (i + 1))]);
    std::vector<float> scale(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e)
        scale[static_cast<size_t>(e)] = static_cast<float>(1.0 + o.router_skew / (rank[static_cast<size_t>(e)] + 1));
    return scale;
}

// Makes the plan of one tensor with the converter's and llama-quantize's choice of type.
struct Planner {
    std::ostream& log;
    GgmlType wtype;
    GgmlType norm_type;

    TensorPlan matrix(Tensor t, int layer, std::vector<int64_t> ne, GgmlType type, float scale) const {
        const std::string n = tensor_name(t, layer);
        return TensorPlan{n, ne, fallback_type(type, ne[0], n, log), Init::kNormal, scale, {}, {}, {}};
    }
    TensorPlan norm(Tensor t, int layer, int64_t n) const {
        const std::string nm = tensor_name(t, layer);
        return TensorPlan{nm, {n}, fallback_type(norm_type, n, nm, log), Init::kNearOne, 1.0f, {}, {}, {}};
    }
    // A 1-D tensor that is no norm weight: always F32 (the converter writes every 1-D tensor as F32
    // and llama-quantize quantizes only tensors of 2 or more dimensions).
    TensorPlan vector(Tensor t, int layer, const char* suffix, int64_t n, Init init, float scale) const {
        return TensorPlan{tensor_name(t, layer, suffix), {n}, GgmlType::F32, init, scale, {}, {}, {}};
    }
};

// An attention layer's tensors: attn_q {H, Qr} (Qr = Q, or 2Q with qwen3next's per-head gate),
// attn_k, attn_v {H, KV} (or one attn_qkv {H, Qr + 2KV} with --fuse-qkv), attn_output {Q, H},
// attn_q_norm and attn_k_norm {D}.
void attention_tensors(const MakeModelOptions& o, const Planner& p, int l, bool gated, std::vector<TensorPlan>& g) {
    const int64_t H = o.hidden, D = o.head_dim;
    const int64_t Q = int64_t{o.heads} * D, KV = int64_t{o.kv_heads} * D, Qr = gated ? 2 * Q : Q;
    if (o.fuse_qkv) {
        g.push_back(p.matrix(Tensor::kAttnQkv, l, {H, Qr + 2 * KV}, p.wtype, fan_in(H)));
    } else {
        g.push_back(p.matrix(Tensor::kAttnQ, l, {H, Qr}, p.wtype, fan_in(H)));
        g.push_back(p.matrix(Tensor::kAttnK, l, {H, KV}, p.wtype, fan_in(H)));
        g.push_back(p.matrix(Tensor::kAttnV, l, {H, KV}, p.wtype, fan_in(H)));
    }
    g.push_back(p.matrix(Tensor::kAttnOutput, l, {Q, H}, p.wtype, fan_in(Q)));
    g.push_back(p.norm(Tensor::kAttnQNorm, l, D));
    g.push_back(p.norm(Tensor::kAttnKNorm, l, D));
}

// ffn_gate_exps + ffn_up_exps {H, I, E} (or one ffn_gate_up_exps {H, 2I, E}), ffn_down_exps {I, H, E}.
void expert_projections(const MakeModelOptions& o, const Planner& p, int l, std::vector<TensorPlan>& g) {
    const int64_t H = o.hidden, E = o.experts, I = o.expert_ff;
    if (o.fuse_gate_up) {
        g.push_back(p.matrix(Tensor::kFfnGateUpExps, l, {H, 2 * I, E}, p.wtype, fan_in(H)));
    } else {
        g.push_back(p.matrix(Tensor::kFfnGateExps, l, {H, I, E}, p.wtype, fan_in(H)));
        g.push_back(p.matrix(Tensor::kFfnUpExps, l, {H, I, E}, p.wtype, fan_in(H)));
    }
    g.push_back(p.matrix(Tensor::kFfnDownExps, l, {I, H, E}, p.wtype, fan_in(I)));
}

std::vector<TensorPlan> qwen3moe_layer(const MakeModelOptions& o, const Planner& p, int l) {
    const int64_t H = o.hidden, E = o.experts;
    std::vector<TensorPlan> g;
    g.push_back(p.norm(Tensor::kAttnNorm, l, H));
    attention_tensors(o, p, l, /*gated=*/false, g);
    g.push_back(p.norm(Tensor::kFfnNorm, l, H));
    // The router stays F32 whatever the type, as llama-quantize and the converter keep it.
    g.push_back(p.matrix(Tensor::kFfnGateInp, l, {H, E}, GgmlType::F32, 2.0f * fan_in(H)));
    expert_projections(o, p, l, g);
    return g;
}

// One qwen3next block. The DeltaNet input projection is always drawn as HF's in_proj_qkvz (rows in
// the grouped order, seeded by the ssm_in name); the split layout writes the same rows de-interleaved
// as convert_hf_to_gguf.py does, so both layouts of one seed are the same model.
std::vector<TensorPlan> qwen3next_layer(const MakeModelOptions& o, const Planner& p, int l, bool recurrent) {
    const bool qwen35 = o.arch == arch_name(Arch::kQwen35Moe);
    const int64_t H = o.hidden, E = o.experts;
    const int64_t S = o.shared_ff > 0 ? o.shared_ff : o.expert_ff;
    std::vector<TensorPlan> g;
    g.push_back(p.norm(Tensor::kAttnNorm, l, H));
    if (recurrent) {
        const int64_t Hk = o.ssm_k_heads, Hv = o.ssm_v_heads, dk = o.ssm_head_dim, dv = o.ssm_head_dim;
        const int64_t r = Hv / Hk, key_dim = Hk * dk, value_dim = Hv * dv, conv_dim = 2 * key_dim + value_dim;
        const int64_t group = 2 * dk + 2 * r * dv;  // rows of one k-head group in in_proj_qkvz
        TensorPlan qkvz = p.matrix(Tensor::kSsmIn, l, {H, 2 * key_dim + 2 * value_dim}, p.wtype, fan_in(H));
        if (o.qkvz_layout == "legacy") {
            g.push_back(std::move(qkvz));
        } else {
            TensorPlan qkv = p.matrix(Tensor::kAttnQkv, l, {H, conv_dim}, p.wtype, fan_in(H));
            TensorPlan z = p.matrix(Tensor::kAttnGate, l, {H, value_dim}, p.wtype, fan_in(H));
            qkv.seed_name = z.seed_name = qkvz.name;
            qkv.row_map.resize(static_cast<size_t>(conv_dim));
            z.row_map.resize(static_cast<size_t>(value_dim));
            for (int64_t k = 0; k < Hk; ++k) {
                const int64_t base = k * group;  // [q dk | k dk | v r*dv | z r*dv]
                for (int64_t i = 0; i < dk; ++i) {
                    qkv.row_map[static_cast<size_t>(k * dk + i)] = base + i;
                    qkv.row_map[static_cast<size_t>(key_dim + k * dk + i)] = base + dk + i;
                }
                for (int64_t i = 0; i < r * dv; ++i) {
                    qkv.row_map[static_cast<size_t>(2 * key_dim + k * r * dv + i)] = base + 2 * dk + i;
                    z.row_map[static_cast<size_t>(k * r * dv + i)] = base + 2 * dk + r * dv + i;
                }
            }
            g.push_back(std::move(qkv));
            g.push_back(std::move(z));
        }
        // ssm_conv1d stays F32: the converter and llama-quantize never quantize it.
        g.push_back(p.matrix(Tensor::kSsmConv1d, l, {o.conv_kernel, conv_dim}, GgmlType::F32, fan_in(o.conv_kernel)));
        g.push_back(p.vector(Tensor::kSsmDt, l, "bias", Hv, Init::kDtBias, 1.0f));
        g.push_back(p.vector(Tensor::kSsmA, l, "", Hv, Init::kNegUniform, 16.0f));
        if (qwen35) {
            g.push_back(p.matrix(Tensor::kSsmBeta, l, {H, Hv}, p.wtype, fan_in(H)));
            g.push_back(p.matrix(Tensor::kSsmAlpha, l, {H, Hv}, p.wtype, fan_in(H)));
        } else {
            g.push_back(p.matrix(Tensor::kSsmBa, l, {H, 2 * Hv}, p.wtype, fan_in(H)));
        }
        g.push_back(p.norm(Tensor::kSsmNorm, l, dv));
        g.push_back(p.matrix(Tensor::kSsmOut, l, {value_dim, H}, p.wtype, fan_in(value_dim)));
    } else {
        attention_tensors(o, p, l, /*gated=*/true, g);  // q: per head [query | gate]
    }
    g.push_back(p.norm(Tensor::kAttnPostNorm, l, H));
    g.push_back(p.matrix(Tensor::kFfnGateInp, l, {H, E}, GgmlType::F32, 2.0f * fan_in(H)));
    expert_projections(o, p, l, g);
    g.push_back(p.vector(Tensor::kFfnGateInpShexp, l, "weight", H, Init::kNormal, fan_in(H)));
    g.push_back(p.matrix(Tensor::kFfnGateShexp, l, {H, S}, p.wtype, fan_in(H)));
    g.push_back(p.matrix(Tensor::kFfnUpShexp, l, {H, S}, p.wtype, fan_in(H)));
    g.push_back(p.matrix(Tensor::kFfnDownShexp, l, {S, H}, p.wtype, fan_in(S)));
    return g;
}

// The keys Qwen3NextModel.set_gguf_parameters adds to Qwen2MoeModel's.
void write_qwen3next_metadata(GgufWriter& w, const MakeModelOptions& o, const std::vector<bool>& schedule) {
    const Arch a = arch_from_name(o.arch);
    w.set_u32(kv_name(Kv::kExpertSharedFeedForwardLength, a), o.shared_ff > 0 ? o.shared_ff : o.expert_ff);
    w.set_u32(kv_name(Kv::kSsmConvKernel, a), o.conv_kernel);
    w.set_u32(kv_name(Kv::kSsmStateSize, a), o.ssm_head_dim);
    w.set_u32(kv_name(Kv::kSsmGroupCount, a), o.ssm_k_heads);
    w.set_u32(kv_name(Kv::kSsmTimeStepRank, a), o.ssm_v_heads);
    w.set_u32(kv_name(Kv::kSsmInnerSize, a), o.ssm_head_dim * o.ssm_v_heads);
    if (o.recurrent_layers.empty()) {
        w.set_u32(kv_name(Kv::kFullAttentionInterval, a), o.full_attention_interval);
    } else {
        w.set_arr_bool(kv_name(Kv::kAttentionRecurrentLayers, a), schedule);
    }
    w.set_u32(kv_name(Kv::kRopeDimensionCount, a), rope_dim_of(o));
    if (a == Arch::kQwen35Moe) {
        // IMRoPE sections over the P rotary pairs, all on t/h/w as Qwen3.5's [11, 11, 10, 0] for P = 32.
        const int P = rope_dim_of(o) / 2;
        w.set_arr_i32(kv_name(Kv::kRopeDimensionSections, a), {(P + 2) / 3, (P + 1) / 3, P / 3, 0});
    }
}

}  // namespace

Status make_model(const MakeModelOptions& o, std::ostream& log) {
    MM_RETURN_IF_ERROR(validate(o));
    const Arch arch = arch_from_name(o.arch);
    MM_ASSIGN_OR_RETURN(const GgmlType wtype, parse_matrix_type("--type", o.type, o.fast_weights));
    GgmlType norm_type = GgmlType::F32;
    if (!o.norm_type.empty()) {
        MM_ASSIGN_OR_RETURN(norm_type, parse_type("--norm-type", o.norm_type));
    }
    GgmlType embed_type = wtype;
    if (!o.embed_type.empty()) {
        MM_ASSIGN_OR_RETURN(embed_type, parse_matrix_type("--embed-type", o.embed_type, o.fast_weights));
    }

    // Tokenizer first: it decides the vocabulary when --vocab is 0.
    TokenizerData tok;
    if (!o.tokenizer_dir.empty()) {
        MM_ASSIGN_OR_RETURN(tok, load_hf_tokenizer(o.tokenizer_dir, o.vocab));
    } else {
        tok = builtin_byte_bpe_tokenizer(o.vocab > 0 ? o.vocab : kDefaultBuiltinVocab);
    }
    const int64_t n_vocab = o.vocab > 0 ? o.vocab : static_cast<int64_t>(tok.tokens.size());
    if (static_cast<int64_t>(tok.tokens.size()) != n_vocab)
        return MM_ERROR("make-model: the tokenizer has %zu tokens but --vocab is %lld (llama.cpp needs one token per "
                        "embedding row)",
                        tok.tokens.size(), static_cast<long long>(n_vocab));

    const int64_t H = o.hidden, V = n_vocab;
    const float inv_sqrt_h = 1.0f / std::sqrt(static_cast<float>(H));
    const int n_threads =
        o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::min(8u, std::thread::hardware_concurrency())));

    // ---- metadata, in the order convert_hf_to_gguf.py writes it ----
    GgufWriter w;
    if (o.alignment < 8 || o.alignment > 4096 || (o.alignment & (o.alignment - 1)) != 0)
        return MM_ERROR("--alignment must be a power of two in [8, 4096], got %u", o.alignment);
    w.set_alignment(o.alignment);
    const std::string name = str_printf("moemesh-random-%s-L%d-H%d-E%d%s", o.arch.c_str(), o.layers, o.hidden,
                                        o.experts, o.fast_weights ? "-fast" : "");
    w.set_string(kv_name(Kv::kGeneralArchitecture, arch), arch_name(arch));
    w.set_string(kv_name(Kv::kGeneralType, arch), "model");
    w.set_string(kv_name(Kv::kGeneralName, arch), name);
    w.set_u32(kv_name(Kv::kBlockCount, arch), o.layers);
    w.set_u32(kv_name(Kv::kContextLength, arch), o.context);
    w.set_u32(kv_name(Kv::kEmbeddingLength, arch), o.hidden);
    // HF intermediate_size (unused by the MoE layers); Qwen3-30B-A3B has 6144 = 8 × 768.
    w.set_u32(kv_name(Kv::kFeedForwardLength, arch), o.expert_ff * o.top_k);
    w.set_u32(kv_name(Kv::kAttentionHeadCount, arch), o.heads);
    w.set_u32(kv_name(Kv::kAttentionHeadCountKv, arch), o.kv_heads);
    w.set_f32(kv_name(Kv::kRopeFreqBase, arch), static_cast<float>(o.rope_theta));
    if (!o.rope_scaling.empty()) {
        w.set_string(kv_name(Kv::kRopeScalingType, arch), o.rope_scaling);
        w.set_f32(kv_name(Kv::kRopeScalingFactor, arch), static_cast<float>(o.rope_factor));
        if (o.rope_orig_ctx > 0) w.set_u32(kv_name(Kv::kRopeScalingOrigCtxLen, arch), o.rope_orig_ctx);
    }
    w.set_f32(kv_name(Kv::kAttentionLayerNormRmsEps, arch), static_cast<float>(o.rms_eps));
    w.set_u32(kv_name(Kv::kExpertCount, arch), o.experts);
    w.set_u32(kv_name(Kv::kExpertUsedCount, arch), o.top_k);
    w.set_u32(kv_name(Kv::kAttentionKeyLength, arch), o.head_dim);
    w.set_u32(kv_name(Kv::kAttentionValueLength, arch), o.head_dim);
    w.set_u32(kv_name(Kv::kGeneralFileType, arch), static_cast<uint32_t>(file_type_of(wtype)));
    w.set_u32(kv_name(Kv::kExpertFeedForwardLength, arch), o.expert_ff);
    w.set_u32(kv_name(Kv::kGeneralQuantizationVersion, arch), kGgmlQuantizationVersion);
    std::vector<bool> schedule;
    if (arch_is_hybrid(arch)) {
        MM_ASSIGN_OR_RETURN(schedule, recurrent_schedule(o));
        write_qwen3next_metadata(w, o, schedule);
    }
    write_tokenizer_metadata(w, tok);


    // ---- tensor plan, in the order the converter emits them ----
    const Planner p{log, wtype, norm_type};
    std::vector<std::vector<TensorPlan>> groups;
    const float embd_scale = o.tied_embeddings ? 2.0f * inv_sqrt_h : 1.0f;
    groups.push_back({p.matrix(Tensor::kTokenEmbd, -1, {H, V}, embed_type, embd_scale)});
    for (int l = 0; l < o.layers; ++l)
        groups.push_back(arch_is_hybrid(arch) ? qwen3next_layer(o, p, l, schedule[static_cast<size_t>(l)])
                                                  : qwen3moe_layer(o, p, l));
    std::vector<TensorPlan> tail;
    tail.push_back(p.norm(Tensor::kOutputNorm, -1, H));
    if (!o.tied_embeddings) tail.push_back(p.matrix(Tensor::kOutput, -1, {H, V}, embed_type, 2.0f * inv_sqrt_h));
    groups.push_back(std::move(tail));
    if (o.router_skew > 0) {
        for (int l = 0; l < o.layers; ++l)
            for (TensorPlan& t : groups[static_cast<size_t>(l) + 1])
                if (t.name == tensor_name(Tensor::kFfnGateInp, l)) t.row_scale = router_skew_scales(o, l);
        log << "make-model: router rows scaled by 1 + " << o.router_skew << " / (rank + 1), ranks shuffled per layer\n";
    }
    if (arch_is_hybrid(arch)) {
        std::string full;
        for (int l = 0; l < o.layers; ++l)
            if (!schedule[static_cast<size_t>(l)]) full += (full.empty() ? "" : ",") + std::to_string(l);
        log << "make-model: full attention at layers [" << full << "], Gated DeltaNet elsewhere; qkvz layout "
            << o.qkvz_layout << "\n";
    }

    int64_t n_params = 0;
    double n_bytes = 0;
    for (const auto& g : groups)
        for (const auto& t : g) {
            int64_t n = 1;
            for (int64_t d : t.ne) n *= d;
            n_params += n;
            n_bytes += static_cast<double>(ggml_row_bytes(t.type, t.ne[0])) * static_cast<double>(n / t.ne[0]);
        }
    log << "make-model: " << name << ": " << o.arch << ", " << n_params << " parameters (" << str_printf("%.3f", n_params / 1e9)
        << " B), " << format_bytes(n_bytes) << " of tensors, type " << ggml_type_name(wtype) << ", vocab " << V
        << ", seed " << o.seed << "\n";

    // ---- generate, group by group; each tensor is written while the next one is made ----
    std::vector<GgufStreamWriter::TensorInfo> table;
    for (const auto& g : groups)
        for (const auto& t : g) table.push_back({t.name, t.type, t.ne});
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufStreamWriter> out, GgufStreamWriter::create(o.out, w, o.alignment, table));
    const auto t0 = std::chrono::steady_clock::now();
    double done = 0;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
        for (const auto& t : groups[gi]) {
            std::vector<uint8_t> data = out->take_spare();
            generate(t, o.seed, n_threads, o.fast_weights, data);
            done += static_cast<double>(data.size());
            MM_RETURN_IF_ERROR(out->write_next(std::move(data)));
        }
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const char* what = gi == 0 ? "token_embd" : gi + 1 == groups.size() ? "output" : nullptr;
        log << "make-model: "
            << (what ? std::string(what) : str_printf("layer %zu/%d", gi, o.layers)) << " done, "
            << format_bytes(done) << " / " << format_bytes(n_bytes) << ", " << str_printf("%.1f s", secs) << "\n";
    }
    MM_RETURN_IF_ERROR(out->finish());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log << str_printf("make-model: %.3f B parameters in %.2f s (%.1f M/s, %d threads%s), %s written\n",
                      n_params / 1e9, secs, n_params / 1e6 / std::max(secs, 1e-9), n_threads,
                      o.fast_weights ? ", fast weights" : "", format_bytes(out->bytes_written()).c_str());
    log << "make-model: wrote " << o.out << "\n";
    return Status();
}

void register_make_model_command(CLI::App& app) {
    auto opts = std::make_shared<MakeModelOptions>();
    CLI::App* cmd = app.add_subcommand("make-model", "Write a small random-weight model (GGUF) that llama.cpp loads");
    cmd->add_option("--arch", opts->arch, "Architecture: qwen3moe, qwen3next or qwen35moe")->capture_default_str();
    cmd->add_option("--out,-o", opts->out, "Output .gguf path")->required();
    cmd->add_option("--layers", opts->layers, "Transformer blocks (qwen3next, qwen35moe default: 4)")->capture_default_str();
    cmd->add_option("--hidden", opts->hidden, "Hidden size H")->capture_default_str();
    cmd->add_option("--heads", opts->heads, "Attention (query) heads")->capture_default_str();
    cmd->add_option("--kv-heads", opts->kv_heads, "Key/value heads (GQA)")->capture_default_str();
    cmd->add_option("--head-dim", opts->head_dim, "Dimension of one head")->capture_default_str();
    cmd->add_option("--experts", opts->experts, "Routed experts per layer E")->capture_default_str();
    cmd->add_option("--top-k", opts->top_k, "Experts used per token")->capture_default_str();
    cmd->add_option("--expert-ff", opts->expert_ff, "Expert intermediate size I")->capture_default_str();
    cmd->add_option("--vocab", opts->vocab, "Vocabulary size (0: the tokenizer's size)")->capture_default_str();
    cmd->add_option("--context", opts->context, "Training context length written to the file")->capture_default_str();
    cmd->add_option("--type", opts->type, "Weight type: f32 f16 bf16 q8_0 q5_0 q5_1 q4_0 q4_1 iq4_nl iq4_xs mxfp4 q2_k q3_k "
                    "q4_k q5_k q6_k; with --fast-weights also iq3_s iq3_xxs iq2_xxs iq2_xs iq2_s iq1_s iq1_m")
        ->capture_default_str();
    cmd->add_option("--norm-type", opts->norm_type, "Type of norm weights (default f32, as llama.cpp)");
    cmd->add_option("--embed-type", opts->embed_type, "Type of token_embd and output (default: --type)");
    cmd->add_option("--seed", opts->seed, "Random seed")->capture_default_str();
    cmd->add_option("--router-skew", opts->router_skew,
                    "Popular experts: scale router row e by 1 + S/(rank+1), ranks shuffled per layer (0: none)")
        ->capture_default_str();
    cmd->add_option("--tokenizer", opts->tokenizer_dir, "Hugging Face tokenizer directory (default: builtin byte BPE)");
    cmd->add_option("--rope-theta", opts->rope_theta, "RoPE base")->capture_default_str();
    cmd->add_option("--rope-scaling", opts->rope_scaling,
                    "Write rope.scaling.type: none, linear or yarn (default: no scaling keys)");
    cmd->add_option("--rope-factor", opts->rope_factor, "rope.scaling.factor (e.g. 4 for YaRN 32K -> 128K)");
    cmd->add_option("--rope-orig-ctx", opts->rope_orig_ctx,
                    "rope.scaling.original_context_length (0: leave out; readers use the context length)");
    cmd->add_option("--rms-eps", opts->rms_eps, "RMSNorm epsilon")->capture_default_str();
    cmd->add_flag("--tied", opts->tied_embeddings, "Tie output to token_embd (no output.weight)");
    cmd->add_flag("--fuse-qkv", opts->fuse_qkv,
                  "One attn_qkv per attention layer instead of attn_q/k/v (as convert_hf_to_gguf.py --fuse-qkv)");
    cmd->add_flag("--fuse-gate-up", opts->fuse_gate_up,
                  "qwen3next, qwen35moe: one ffn_gate_up_exps per layer instead of ffn_gate_exps + ffn_up_exps "
                  "(as convert_hf_to_gguf.py --fuse-gate-up-exps)");
    cmd->add_option("--alignment", opts->alignment, "Tensor data alignment (general.alignment)")->capture_default_str();
    cmd->add_option("--threads,-t", opts->threads,
                    "Generator threads (0: min(hardware threads, 8)); the bytes do not depend on it")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    cmd->add_flag("--fast-weights", opts->fast_weights,
                  "Draw the weight matrices from a cheap generator and write Q8_0/Q4_K blocks directly (no "
                  "quantizer): per thread ~200x faster for Q4_K, ~12x for Q8_0 (a 48-layer 30B-A3B shape is ~1 s of "
                  "CPU on 16 cores; writing the file then dominates), same scale, but "
                  "other bytes than without it for the same seed (deterministic in the seed); for benchmarks of "
                  "large shapes, and the only way to write the i-quants (iq*: random grid indices, no quantizer). Norms (and qwen3next's ssm_a, dt bias) are drawn as without it");
    // qwen3next
    auto* interval = cmd->add_option("--full-attention-interval", opts->full_attention_interval,
                                     "qwen3next, qwen35moe: layer i is full attention when (i+1) % N == 0, DeltaNet otherwise")
                         ->capture_default_str();
    cmd->add_option("--recurrent-layers", opts->recurrent_layers,
                    "qwen3next, qwen35moe: per-layer schedule, e.g. 1,1,1,0 (1 DeltaNet, 0 full attention), written as the "
                    "attention.recurrent_layers array instead of the interval")
        ->excludes(interval);
    cmd->add_option("--shared-ff", opts->shared_ff, "qwen3next, qwen35moe: shared expert width (0: --expert-ff)")
        ->capture_default_str();
    cmd->add_option("--ssm-k-heads", opts->ssm_k_heads, "qwen3next, qwen35moe: DeltaNet q/k heads Hk")->capture_default_str();
    cmd->add_option("--ssm-v-heads", opts->ssm_v_heads, "qwen3next, qwen35moe: DeltaNet v heads Hv (a multiple of Hk)")
        ->capture_default_str();
    cmd->add_option("--ssm-head-dim", opts->ssm_head_dim, "qwen3next, qwen35moe: DeltaNet head dimension dk = dv")
        ->capture_default_str();
    cmd->add_option("--conv-kernel", opts->conv_kernel, "qwen3next, qwen35moe: DeltaNet causal conv taps K")
        ->capture_default_str();
    cmd->add_option("--rope-dim", opts->rope_dim, "qwen3next, qwen35moe: rotary dims per head, partial RoPE (0: head_dim/4)")
        ->capture_default_str();
    cmd->add_option("--qkvz-layout", opts->qkvz_layout,
                    "qwen3next, qwen35moe: split (attn_qkv + attn_gate, current converter) or legacy (one raw ssm_in)")
        ->check(CLI::IsMember({"split", "legacy"}))
        ->capture_default_str();
    cmd->callback([opts, cmd] {
        if (arch_is_hybrid(arch_from_name(opts->arch)) && cmd->count("--layers") == 0)
            opts->layers = kDefaultQwen3NextLayers;
        Status st = make_model(*opts, std::cerr);
        if (!st.ok()) {
            std::cerr << st.message() << "\n";
            std::exit(1);
        }
    });
}

}  // namespace moemesh
