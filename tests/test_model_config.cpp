// qwen3next hyper-parameters as llama.cpp reads them: the hybrid layer schedule (interval or
// per-block array), multi-token-prediction blocks left out of the trunk, the DeltaNet sizes, and
// clear errors that name the key.
#include <gtest/gtest.h>

#include <functional>
#include <map>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/model_config.h"

namespace moemesh {
namespace {

const std::string kArch = "qwen3next";

// Metadata of a small qwen3next file plus token_embd: `over` replaces base values, `edit` adds keys.
StatusOr<ModelConfig> config_of(const std::function<void(GgufWriter&)>& edit, int blocks = 4,
                                const std::map<Kv, uint32_t>& over = {}, const std::string& kArch = moemesh::kArch) {
    GgufWriter w;
    auto u32 = [&](Kv k, uint32_t v) {
        auto it = over.find(k);
        w.set_u32(kv_name(k, kArch), it == over.end() ? v : it->second);
    };
    w.set_string(kv_name(Kv::kGeneralArchitecture, kArch), kArch);
    u32(Kv::kEmbeddingLength, 32);
    u32(Kv::kBlockCount, static_cast<uint32_t>(blocks));
    u32(Kv::kAttentionHeadCount, 4);
    u32(Kv::kAttentionHeadCountKv, 2);
    u32(Kv::kAttentionKeyLength, 16);
    u32(Kv::kAttentionValueLength, 16);
    u32(Kv::kRopeDimensionCount, 4);
    u32(Kv::kExpertCount, 8);
    u32(Kv::kExpertUsedCount, 2);
    u32(Kv::kExpertFeedForwardLength, 32);
    u32(Kv::kExpertSharedFeedForwardLength, 48);
    u32(Kv::kSsmConvKernel, 4);
    u32(Kv::kSsmStateSize, 16);
    u32(Kv::kSsmGroupCount, 2);
    u32(Kv::kSsmTimeStepRank, 4);
    u32(Kv::kSsmInnerSize, 64);
    w.set_f32(kv_name(Kv::kAttentionLayerNormRmsEps, kArch), 1e-6f);
    edit(w);
    w.add_tensor(tensor_name(Tensor::kTokenEmbd), GgmlType::F32, {32, 10}, std::vector<uint8_t>(32 * 10 * 4));
    static std::vector<uint8_t> bytes;  // kept alive while the file is parsed
    bytes = w.serialize();
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::from_memory(bytes.data(), bytes.size(), "next.gguf"));
    return load_model_config(*f);
}

std::string schedule(const ModelConfig& c) {
    std::string s;
    for (int il = 0; il < c.n_layer; ++il) s += c.is_recurrent(il) ? 'D' : 'A';
    return s;
}

// The routed experts' tensors by name (the device-memory check and --host-budget auto count them).
TEST(Arch, RoutedExpertTensorsByName) {
    for (const char* n : {"blk.0.ffn_gate_exps.weight", "blk.12.ffn_up_exps.weight", "blk.3.ffn_down_exps.weight",
                          "blk.47.ffn_gate_up_exps.weight", "blk.2.ffn_down_exps.bias"})
        EXPECT_TRUE(is_routed_expert_tensor(n)) << n;
    for (const char* n : {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_gate_inp.weight", "token_embd.weight",
                          "blk.0.ffn_down_exps", "blk.x.ffn_up_exps.weight", "blk.0.ffn_up_exps_x.weight",
                          "blk.0.attn_q.weight"})
        EXPECT_FALSE(is_routed_expert_tensor(n)) << n;
}

// rope.scaling.* become the kernels' RopeParams as llama.cpp derives them (llama-context.cpp,
// ggml_rope_yarn_corr_dims), with llama.cpp's defaults for absent keys.
TEST(Qwen3NextConfig, RopeScalingKeysBecomeRopeParams) {
    auto plain = config_of([](GgufWriter&) {});
    ASSERT_TRUE(plain.ok()) << plain.status().message();
    EXPECT_EQ(plain.value().rope_scaling, "linear");  // llama.cpp's default type; factor absent = none
    EXPECT_FALSE(plain.value().rope_scaled());
    EXPECT_EQ(plain.value().rope.freq_scale, 1.0f);
    EXPECT_EQ(plain.value().rope.ext_factor, 0.0f);
    EXPECT_EQ(plain.value().rope.attn_factor, 1.0f);
    auto yarn = config_of([](GgufWriter& w) {
        w.set_string(kv_name(Kv::kRopeScalingType, kArch), "yarn");
        w.set_f32(kv_name(Kv::kRopeScalingFactor, kArch), 4.0f);
        w.set_u32(kv_name(Kv::kRopeScalingOrigCtxLen, kArch), 32768);
    });
    ASSERT_TRUE(yarn.ok()) << yarn.status().message();
    const ModelConfig& y = yarn.value();
    EXPECT_EQ(y.rope_scaling, "yarn");
    EXPECT_EQ(y.rope_scaling_orig_ctx, 32768);
    EXPECT_TRUE(y.rope_scaled());
    EXPECT_EQ(y.rope.freq_scale, 0.25f);
    EXPECT_EQ(y.rope.ext_factor, 1.0f);
    EXPECT_NEAR(y.rope.attn_factor, 1.0f, 1e-6);  // get_mscale(4) / (1 + 0.1 ln 4): ggml multiplies it back
    // By hand: d·ln(32768 / (β·2π)) / (2·ln θ) for the file's rope dims d and θ, β = 32 (floor) and 1 (ceil).
    const double d = static_cast<double>(y.rope_dim), lt = 2 * std::log(static_cast<double>(y.rope_theta));
    EXPECT_EQ(y.rope.corr_low, std::max(0.0, std::floor(d * std::log(32768 / (32 * 2 * M_PI)) / lt)));
    EXPECT_EQ(y.rope.corr_high, std::min(d - 1, std::ceil(d * std::log(32768 / (2 * M_PI)) / lt)));

    // The older key name, with the default type (linear).
    auto linear = config_of([](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeScaleLinear, kArch), 2.0f); });
    ASSERT_TRUE(linear.ok()) << linear.status().message();
    EXPECT_EQ(linear.value().rope.freq_scale, 0.5f);
    EXPECT_EQ(linear.value().rope.ext_factor, 0.0f);
    // Type none ignores a factor; no original context: the training context.
    auto none = config_of([](GgufWriter& w) {
        w.set_string(kv_name(Kv::kRopeScalingType, kArch), "none");
        w.set_f32(kv_name(Kv::kRopeScalingFactor, kArch), 4.0f);
    });
    ASSERT_TRUE(none.ok()) << none.status().message();
    EXPECT_FALSE(none.value().rope_scaled());
    EXPECT_EQ(none.value().rope_scaling_orig_ctx, none.value().n_ctx_train);
    // attn_factor multiplies in.
    auto af = config_of([](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeScalingAttnFactor, kArch), 0.5f); });
    ASSERT_TRUE(af.ok()) << af.status().message();
    EXPECT_EQ(af.value().rope.attn_factor, 0.5f);
}

// qwen35moe: the same keys under its own prefix; IMRoPE sections must keep every rotary pair on the
// text positions (t, h, w), as Qwen3.5's [11, 11, 10, 0] does.
TEST(Qwen3NextConfig, Qwen35MoeSections) {
    const std::string a = "qwen35moe";
    auto ok = config_of([&](GgufWriter& w) { w.set_arr_i32(kv_name(Kv::kRopeDimensionSections, a), {1, 1, 0, 0}); },
                        4, {}, a);
    ASSERT_TRUE(ok.ok()) << ok.status().message();  // rope dims 4: pairs 0 (t) and 1 (h)
    EXPECT_EQ(ok.value().arch, Arch::kQwen35Moe);
    EXPECT_EQ(schedule(ok.value()), "DDDA");
    auto none = config_of([](GgufWriter&) {}, 4, {}, a);
    ASSERT_TRUE(none.ok()) << none.status().message();
    for (const std::vector<int32_t>& bad : std::vector<std::vector<int32_t>>{{1, 0, 0, 1}, {0, 0, 0, 0}, {2, -1, 0, 0}}) {
        auto c = config_of([&](GgufWriter& w) { w.set_arr_i32(kv_name(Kv::kRopeDimensionSections, a), bad); }, 4, {}, a);
        ASSERT_FALSE(c.ok()) << bad[0] << bad[1] << bad[2] << bad[3];
        EXPECT_NE(c.status().message().find("qwen35moe.rope.dimension_sections"), std::string::npos)
            << c.status().message();
    }
}

TEST(Qwen3NextConfig, BadRopeScalingIsRefusedByName) {
    struct Bad { std::function<void(GgufWriter&)> edit; const char* key; const char* what; };
    const std::vector<Bad> bad = {
        {[](GgufWriter& w) { w.set_string(kv_name(Kv::kRopeScalingType, kArch), "ntk"); }, "rope.scaling.type", "ntk"},
        {[](GgufWriter& w) { w.set_string(kv_name(Kv::kRopeScalingType, kArch), "longrope"); }, "rope.scaling.type",
         "not supported"},
        {[](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeScalingFactor, kArch), -2.0f); }, "rope.scaling.factor", "-2"},
        {[](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeScalingFactor, kArch), NAN); }, "rope.scaling.factor", "nan"},
        {[](GgufWriter& w) { w.set_u32(kv_name(Kv::kRopeScalingOrigCtxLen, kArch), 0); },
         "rope.scaling.original_context_length", "0"},
        {[](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeFreqBase, kArch), 1.0f); }, "rope.freq_base", "1"},
        {[](GgufWriter& w) { w.set_f32(kv_name(Kv::kRopeScalingAttnFactor, kArch), 0.0f); },
         "rope.scaling.attn_factor", "0"},
    };
    for (const Bad& b : bad) {
        auto c = config_of(b.edit);
        ASSERT_FALSE(c.ok()) << b.key;
        EXPECT_NE(c.status().message().find(b.key), std::string::npos) << c.status().message();
        EXPECT_NE(c.status().message().find(b.what), std::string::npos) << c.status().message();
    }
}

TEST(Qwen3NextConfig, DefaultIntervalIsFour) {
    auto c = config_of([](GgufWriter&) {}, 8);
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(schedule(c.value()), "DDDADDDA");
    EXPECT_EQ(c.value().ssm_k_heads, 2);
    EXPECT_EQ(c.value().ssm_v_heads, 4);
    EXPECT_EQ(c.value().ssm_head_dim, 16);
    EXPECT_EQ(c.value().ssm_conv_dim(), 2 * 2 * 16 + 4 * 16);
    EXPECT_EQ(c.value().n_ff_shexp, 48);
}

TEST(Qwen3NextConfig, IntervalKey) {
    auto c = config_of([](GgufWriter& w) { w.set_u32(kv_name(Kv::kFullAttentionInterval, kArch), 2); }, 6);
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(schedule(c.value()), "DADADA");
}

TEST(Qwen3NextConfig, RecurrentLayersArrayWinsOverInterval) {
    auto c = config_of([](GgufWriter& w) {
        w.set_u32(kv_name(Kv::kFullAttentionInterval, kArch), 2);
        w.set_arr_bool(kv_name(Kv::kAttentionRecurrentLayers, kArch), {false, true, true, false});
    });
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(schedule(c.value()), "ADDA");
}

// A file that keeps the MTP block: block_count counts it, the trunk does not run it, and the
// per-block array has an entry for it too (llama.cpp reads n_layer_all entries).
TEST(Qwen3NextConfig, NextnBlocksAreNotPartOfTheTrunk) {
    auto c = config_of(
        [](GgufWriter& w) {
            w.set_u32(kv_name(Kv::kNextnPredictLayers, kArch), 1);
            w.set_arr_bool(kv_name(Kv::kAttentionRecurrentLayers, kArch), {true, true, true, false, false});
        },
        5);
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(c.value().n_layer, 4);
    EXPECT_EQ(c.value().n_layer_all, 5);
    EXPECT_EQ(schedule(c.value()), "DDDA");
    // Interval schedule with an MTP block: only the trunk's layers are scheduled.
    auto d = config_of([](GgufWriter& w) { w.set_u32(kv_name(Kv::kNextnPredictLayers, kArch), 1); }, 9);
    ASSERT_TRUE(d.ok()) << d.status().message();
    EXPECT_EQ(schedule(d.value()), "DDDADDDA");
}

TEST(Qwen3NextConfig, BadValuesNameTheKey) {
    struct Case {
        std::function<void(GgufWriter&)> edit;
        const char* needle;
        std::map<Kv, uint32_t> over = {};
    };
    auto none = [](GgufWriter&) {};
    const Case cases[] = {
        {none, "qwen3next.ssm.time_step_rank", {{Kv::kSsmTimeStepRank, 3}}},
        {none, "qwen3next.ssm.inner_size", {{Kv::kSsmInnerSize, 60}}},
        {none, "qwen3next.ssm.conv_kernel", {{Kv::kSsmConvKernel, 0}}},
        {[](GgufWriter& w) { w.set_u32(kv_name(Kv::kFullAttentionInterval, kArch), 0); },
         "qwen3next.full_attention_interval"},
        {[](GgufWriter& w) { w.set_arr_bool(kv_name(Kv::kAttentionRecurrentLayers, kArch), {true, false}); },
         "qwen3next.attention.recurrent_layers"},
        {[](GgufWriter& w) { w.set_string(kv_name(Kv::kAttentionRecurrentLayers, kArch), "all"); },
         "qwen3next.attention.recurrent_layers"},
        {[](GgufWriter& w) { w.set_u32(kv_name(Kv::kNextnPredictLayers, kArch), 4); },
         "qwen3next.nextn_predict_layers"},
    };
    for (const Case& k : cases) {
        auto c = config_of(k.edit, 4, k.over);
        ASSERT_FALSE(c.ok()) << k.needle;
        EXPECT_NE(c.status().message().find(k.needle), std::string::npos) << c.status().message();
        EXPECT_NE(c.status().message().find("next.gguf"), std::string::npos) << c.status().message();
    }
}

}  // namespace
}  // namespace moemesh
