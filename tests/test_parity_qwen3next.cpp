// Qwen3-Next parity with llama.cpp on the very same GGUF files (written by `moemesh make-model
// --arch qwen3next`): the full next-token distribution at every position and the greedy
// continuation, for hybrid stacks of gated DeltaNet and gated attention layers with a shared expert.
#include "tests/parity_util.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;

struct NextShape {
    const char* name;
    int layers, hidden, heads, kv_heads, head_dim, experts, top_k, expert_ff, shared_ff;
    int k_heads, v_heads, ssm_dim, vocab;
};
// The shape: 8 layers (interval 4 → layers 3 and 7 full attention), 64 experts top-8,
// a shared expert; DeltaNet with 2 k heads and 4 v heads (r = 2) as in the real model (16/32).
constexpr NextShape kNext = {"next8", 8, 256, 4, 2, 64, 64, 8, 128, 128, 2, 4, 32, 1024};
// Small and odd: 3 v heads per k head, one attention layer in four.
constexpr NextShape kNextSmall = {"next4", 4, 128, 2, 1, 32, 16, 4, 64, 96, 1, 3, 32, 512};

std::string make_next(const NextShape& s, const std::string& type, const std::string& dir,
                      const std::string& extra = "", const std::string& tag = "",
                      const std::string& arch = "qwen3next") {
    std::string path = dir + "/" + arch + "_" + s.name + "_" + type + tag + ".gguf";
    std::string out;
    std::string cmd = moemesh_bin() + " make-model --arch " + arch + " --out " + path + " --layers " +
                      std::to_string(s.layers) + " --hidden " + std::to_string(s.hidden) + " --heads " +
                      std::to_string(s.heads) + " --kv-heads " + std::to_string(s.kv_heads) + " --head-dim " +
                      std::to_string(s.head_dim) + " --experts " + std::to_string(s.experts) + " --top-k " +
                      std::to_string(s.top_k) + " --expert-ff " + std::to_string(s.expert_ff) + " --shared-ff " +
                      std::to_string(s.shared_ff) + " --ssm-k-heads " + std::to_string(s.k_heads) +
                      " --ssm-v-heads " + std::to_string(s.v_heads) + " --ssm-head-dim " +
                      std::to_string(s.ssm_dim) + " --vocab " + std::to_string(s.vocab) + " --type " + type +
                      " --seed 7 " + extra;
    EXPECT_EQ(run_capture(cmd, &out, dir + "/make.err"), 0) << cmd << "\n" << read_file(dir + "/make.err");
    return path;
}

class Qwen3NextParity : public Parity {};

// F32 weights and KV cache on both sides: the math must agree to float rounding.
TEST_F(Qwen3NextParity, F32MatchesLlamaCpp) {
    for (const NextShape& s : {kNext, kNextSmall}) {
        std::string m = make_next(s, "f32", dir_);
        Comparison c = run_pair(m, s.vocab, "f32", "", dir_);
        EXPECT_LE(c.max_dp, 1e-3) << s.name;
        EXPECT_EQ(c.greedy_prefix, 32) << s.name;
    }
}

// Qwen3.5 / 3.6 MoE (arch qwen35moe): separate β/α projections, k heads tiled over v heads (next8
// has 2 k heads for 4 v heads: qwen3next's repeat-interleave mapping there gives max |dp| 0.52),
// IMRoPE sections. Chunked prompts too.
TEST_F(Qwen3NextParity, Qwen35MoeF32MatchesLlamaCpp) {
    for (const NextShape& s : {kNext, kNextSmall}) {
        std::string m = make_next(s, "f32", dir_, "", "", "qwen35moe");
        Comparison c = run_pair(m, s.vocab, "f32", "", dir_);
        EXPECT_LE(c.max_dp, 1e-3) << s.name;
        EXPECT_EQ(c.greedy_prefix, 32) << s.name;
    }
    std::string m = make_next(kNext, "f32", dir_, "", "", "qwen35moe");
    Comparison c = run_pair(m, kNext.vocab, "f32", "--batch 7", dir_);
    EXPECT_LE(c.max_dp, 1e-3);
    EXPECT_EQ(c.greedy_prefix, 32);
}

// convert_hf_to_gguf.py --fuse-qkv --fuse-gate-up-exps: attn_qkv in the attention layers and one
// ffn_gate_up_exps {H, 2I, E} per layer (gate rows, then up rows, per expert), in both hybrid
// families; also with the routed experts read from the file by the offload cache (strided reads).
TEST_F(Qwen3NextParity, FusedTensorsMatchLlamaCpp) {
    for (const char* arch : {"qwen3next", "qwen35moe"}) {
        std::string m = make_next(kNextSmall, "f32", dir_, "--fuse-qkv --fuse-gate-up", "_fused", arch);
        const Result ours = run_ours(m, kNextSmall.vocab, "f32", "", dir_, 64);
        const Result ref = run_ref(m, kNextSmall.vocab, "f32", "", dir_, 64);
        const Comparison c = report(std::string(arch) + " fused: moemesh vs llama.cpp", ours, ref, 64);
        EXPECT_LE(c.max_dp, 1e-3) << arch;
        EXPECT_EQ(c.greedy_prefix, 32) << arch;
        const Result cached = run_ours(m, kNextSmall.vocab, "f32", "--device-budget 1MiB", dir_, 64);
        EXPECT_EQ(report(std::string(arch) + " fused, experts through the cache", cached, ours, 64).max_dp, 0.0) << arch;
    }
}

// A quantized qwen35moe file with llama.cpp's default f16 KV cache.
TEST_F(Qwen3NextParity, Qwen35MoeQ8MatchesLlamaCpp) {
    std::string m = make_next(kNextSmall, "q8_0", dir_, "", "", "qwen35moe");
    Comparison c = run_pair(m, kNextSmall.vocab, "f16", "", dir_);
    EXPECT_LE(c.median_dp, 1.5e-2);
    EXPECT_GE(c.top1_agree, 58);
}

// YaRN on the partial RoPE of the gated attention layers (rope dims head_dim/4).
TEST_F(Qwen3NextParity, YarnRopeScalingMatchesLlamaCpp) {
    std::string m = make_next(kNextSmall, "f32", dir_, "--rope-scaling yarn --rope-factor 4 --rope-orig-ctx 2048",
                              "_yarn");
    Comparison c = run_pair(m, kNextSmall.vocab, "f32", "", dir_);
    EXPECT_LE(c.max_dp, 1e-3);
    EXPECT_EQ(c.greedy_prefix, 32);
}

// The prompt in several chunks (7 tokens, and one at a time: the decode recurrence throughout)
// carries the conv and delta-rule state across calls exactly.
TEST_F(Qwen3NextParity, F32ChunkedPromptMatchesLlamaCpp) {
    std::string m = make_next(kNext, "f32", dir_);
    for (const char* batch : {"--batch 7", "--batch 1"}) {
        Comparison c = run_pair(m, kNext.vocab, "f32", batch, dir_);
        EXPECT_LE(c.max_dp, 1e-3) << batch;
        EXPECT_EQ(c.greedy_prefix, 32) << batch;
    }
}

// A prompt longer than two of llama.cpp's 64-token delta-rule chunks, and both the whole prompt
// in one call and in chunks of 50 on our side (chunk boundaries that do not line up with 64).
TEST_F(Qwen3NextParity, LongPromptAcrossDeltaChunks) {
    std::string m = make_next(kNextSmall, "f32", dir_);
    for (const char* batch : {"", "--batch 50"}) {
        Comparison c = run_pair(m, kNextSmall.vocab, "f32", batch, dir_, 150);
        EXPECT_LE(c.max_dp, 1e-3) << batch;
        EXPECT_EQ(c.greedy_prefix, 32) << batch;
    }
}

// Files as other converter versions write them: the legacy grouped ssm_in instead of
// attn_qkv + attn_gate, an explicit per-layer recurrent array, tied embeddings.
TEST_F(Qwen3NextParity, OtherLayoutsMatchLlamaCpp) {
    struct Case {
        const char* extra;
        const char* tag;
    };
    for (const Case& k : {Case{"--qkvz-layout legacy", "_legacy"},
                          Case{"--recurrent-layers 1,0,1,1 --tied", "_array"}}) {
        std::string m = make_next(kNextSmall, "f32", dir_, k.extra, k.tag);
        Comparison c = run_pair(m, kNextSmall.vocab, "f32", "", dir_);
        EXPECT_LE(c.max_dp, 1e-3) << k.extra;
        EXPECT_EQ(c.greedy_prefix, 32) << k.extra;
    }
}

// llama.cpp's default f16 KV cache on both sides.
TEST_F(Qwen3NextParity, F32WithF16KvCache) {
    std::string m = make_next(kNext, "f32", dir_);
    Comparison c = run_pair(m, kNext.vocab, "f16", "", dir_);
    EXPECT_LE(c.max_dp, 2e-3);
    EXPECT_EQ(c.greedy_prefix, 32);
}

// Quantized weights: activations are quantized too (Q8_0 / Q8_K), so a 1-ulp difference can flip
// one rounding and occasionally a routing choice (see test_parity.cpp QuantizedDeepModels); we
// bound the typical deviation and compare with llama.cpp's own batch-size sensitivity.
TEST_F(Qwen3NextParity, Q8_0DeepModel) {
    std::string m = make_next(kNext, "q8_0", dir_);
    Result ours = run_ours(m, kNext.vocab, "f32", "", dir_, 64);
    Result ref = run_ref(m, kNext.vocab, "f32", "", dir_, 64);
    Result ref_b1 = run_ref(m, kNext.vocab, "f32", "--batch 1", dir_, 64);
    Comparison c = report("qwen3next q8_0: moemesh vs llama.cpp", ours, ref, 64);
    report("qwen3next q8_0: llama.cpp batch 1 vs batch 64", ref_b1, ref, 64);
    EXPECT_LE(c.median_dp, 1.5e-2);
    EXPECT_LE(c.p90_dp, 4e-2);
    EXPECT_GE(c.top1_agree, 58) << "most likely token differs at " << 64 - c.top1_agree << "/64 positions";
}

// Two layers (one of each kind), q8_0: no deep chain to amplify a flipped activation rounding, so
// the quantized kernels of both layer kinds and the shared expert must agree to float rounding at
// most positions. Our Q8_0 dot scales each block's exact integer sum and adds it to one float per
// row (quants_avx2_r8.cpp), llama.cpp's x86 Q8_0 dot keeps 8 float partial sums per row: the
// results differ in the last bits, and where such a difference moves the next layer's input across
// an int8 rounding boundary that position differs by up to a few 1e-3 (4 of 32 here).
TEST_F(Qwen3NextParity, Q8_0TwoLayersToFloatRounding) {
    const NextShape two = {"next2", 2, 256, 4, 2, 64, 16, 4, 256, 256, 2, 4, 64, 1024};
    std::string m = make_next(two, "q8_0", dir_, "--recurrent-layers 1,0");
    Comparison c = run_pair(m, two.vocab, "f32", "", dir_, 32);
    // Typically 1e-8; a flipped activation rounding reaches a few 1e-3 at its position.
    EXPECT_LE(c.median_dp, 1e-6);
    EXPECT_LE(c.p90_dp, 5e-3);
    EXPECT_LE(c.max_dp, 1e-2);
    EXPECT_EQ(c.greedy_prefix, 32);
}

}  // namespace
}  // namespace moemesh
