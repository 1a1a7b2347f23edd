// The GPU-resident model (ModelOptions::device = "cuda:0", coordinator/cuda_backend.cpp) against the
// CPU model on the same small generated files: the same forward code on two backends.
//  - f32 weights: next-token distributions within 1e-4 (f32 KV) at every prompt position and the
//    same greedy tokens;
//  - q8_0 / q4_k weights: the CPU quantizes activations (Q8_0 / Q8_K) before each product and the
//    GPU does not, so only the most likely token is compared (agreement at ≥ 90% / 80% of positions;
//    H100: q8_0 qwen3moe 40/40, qwen3next 93/100, q4_k qwen3next 26/30), and the greedy
//    continuations must agree up to the first step where the CPU's top-2 margin is below 2e-2;
//  - decode steps replayed from a CUDA graph (default) vs launched op by op (MOEMESH_CUDA_GRAPHS=0):
//    the same tokens and bitwise the same logits over 600 steps (152 on the emulator), across
//    attention's chunking (16-key chunks up to 128 keys, then 8 that grow), for qwen3moe (q8_0,
//    f16 KV) and qwen3next (f32);
//  - the prompt in one piece and in chunks (-b 16, 7: the grouped-expert MoE and tiled matmul paths
//    with the KV / DeltaNet state carried across chunks); qwen3next prompts of 100 tokens cross the
//    CPU's 64-token chunked delta rule (the GPU runs the recurrence).
// Skips with "no CUDA device: <reason>" where there is no GPU. Prints "[cuda-model] ..." lines.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "coordinator/cuda_backend.h"
#include "coordinator/model.h"
#include "coordinator/sampler.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/test_util.h"
#include "tools/http_server.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

#define REQUIRE_CUDA()                                                                  \
    do {                                                                                \
        const char* why_ = "";                                                          \
        if (cuda::device_count(&why_) == 0) GTEST_SKIP() << "no CUDA device: " << why_; \
    } while (0)

struct Outcome {
    std::vector<std::vector<double>> probs;  // [positions][V], softmax in double
    std::vector<int32_t> greedy;
    std::vector<double> greedy_margin;  // top-1 minus top-2 probability at each greedy step
};

std::vector<double> softmax(const float* l, int64_t V) {
    std::vector<double> p(static_cast<size_t>(V));
    double mx = -INFINITY, s = 0;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, static_cast<double>(l[i]));
    for (int64_t i = 0; i < V; ++i) s += p[i] = std::exp(static_cast<double>(l[i]) - mx);
    for (auto& x : p) x /= s;
    return p;
}

int argmax(const std::vector<double>& p) { return static_cast<int>(std::max_element(p.begin(), p.end()) - p.begin()); }
double margin(std::vector<double> p) {
    std::partial_sort(p.begin(), p.begin() + 2, p.end(), std::greater<>());
    return p[0] - p[1];
}

Outcome run_model(const std::string& path, const std::string& device, int64_t batch, bool kv_f16,
              const std::vector<int32_t>& prompt, int n_gen) {
    Outcome r;
    auto gf = GgufFile::open(path);
    EXPECT_TRUE(gf.ok()) << gf.status().message();
    if (!gf.ok()) return r;
    std::shared_ptr<GgufFile> file(std::move(*gf));
    ModelOptions mo;
    mo.n_threads = 2;
    mo.n_batch = batch;
    mo.kv_f16 = kv_f16;
    mo.device = device;
    auto m = load_model(file, mo);
    EXPECT_TRUE(m.ok()) << m.status().message();
    if (!m.ok()) return r;
    Model& model = **m;
    const int64_t V = model.config().n_vocab;
    auto seq = model.new_sequence(static_cast<int64_t>(prompt.size()) + n_gen + 1).value();
    std::vector<float> logits;
    Status st = model.forward(*seq, prompt.data(), static_cast<int64_t>(prompt.size()), true, &logits);
    EXPECT_TRUE(st.ok()) << st.message();
    for (size_t p = 0; p < prompt.size(); ++p) r.probs.push_back(softmax(&logits[p * V], V));
    std::vector<double> last = r.probs.back();
    for (int i = 0; i < n_gen; ++i) {
        int32_t next = argmax(last);
        r.greedy.push_back(next);
        r.greedy_margin.push_back(margin(last));
        st = model.forward(*seq, &next, 1, false, &logits);
        EXPECT_TRUE(st.ok()) << st.message();
        last = softmax(logits.data(), V);
    }
    return r;
}

struct Diff {
    double max_dp = 0;
    int top1_agree = 0, positions = 0;
    int greedy_same = 0;        // common prefix of the greedy continuations
    double margin_at_split = 0; // the reference's top-2 margin where they part (if they do)
};

Diff diff(const Outcome& ref, const Outcome& got) {
    Diff d;
    d.positions = static_cast<int>(std::min(ref.probs.size(), got.probs.size()));
    for (int p = 0; p < d.positions; ++p) {
        for (size_t i = 0; i < ref.probs[p].size(); ++i)
            d.max_dp = std::max(d.max_dp, std::fabs(ref.probs[p][i] - got.probs[p][i]));
        d.top1_agree += argmax(ref.probs[p]) == argmax(got.probs[p]);
    }
    while (d.greedy_same < static_cast<int>(std::min(ref.greedy.size(), got.greedy.size())) &&
           ref.greedy[d.greedy_same] == got.greedy[d.greedy_same])
        ++d.greedy_same;
    if (d.greedy_same < static_cast<int>(ref.greedy.size())) d.margin_at_split = ref.greedy_margin[d.greedy_same];
    return d;
}

std::vector<int32_t> random_tokens(int n, int vocab, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<unsigned>(vocab));
    return t;
}

class CudaModel : public ::testing::Test {
protected:
    std::string make(MakeModelOptions o, const std::string& name) {
        o.out = testing::temp_dir("cuda_model") + "/" + name + ".gguf";
        std::ostringstream log;
        Status st = make_model(o, log);
        EXPECT_TRUE(st.ok()) << st.message();
        return o.out;
    }

    // CPU (one piece) vs GPU (one piece and chunked) on `path`.
    void check(const std::string& what, const std::string& path, bool quantized, bool kv_f16, int n_prompt,
               double min_top1 = 0.9, int n_gen = 16) {
        const auto prompt = random_tokens(n_prompt, kDefaultBuiltinVocab, 7);
        const Outcome cpu = run_model(path, "cpu", 512, kv_f16, prompt, n_gen);
        for (int64_t batch : {int64_t{512}, int64_t{16}, int64_t{7}}) {
            const Outcome gpu = run_model(path, "cuda:0", batch, kv_f16, prompt, n_gen);
            const Diff d = diff(cpu, gpu);
            std::printf("[cuda-model] %-34s -b %-3lld prompt %3d: max|dp| %.2e  top-1 %d/%d  greedy %d/%zu%s\n",
                        what.c_str(), static_cast<long long>(batch), n_prompt, d.max_dp, d.top1_agree, d.positions,
                        d.greedy_same, cpu.greedy.size(),
                        d.greedy_same < static_cast<int>(cpu.greedy.size())
                            ? (" (CPU top-2 margin there " + std::to_string(d.margin_at_split) + ")").c_str()
                            : "");
            ASSERT_EQ(d.positions, n_prompt);
            if (!quantized) {
                EXPECT_LT(d.max_dp, kv_f16 ? 1e-3 : 1e-4) << what << " -b " << batch;
                EXPECT_EQ(d.greedy_same, static_cast<int>(cpu.greedy.size())) << what << " -b " << batch;
            } else {
                EXPECT_GE(d.top1_agree, static_cast<int>(d.positions * min_top1)) << what << " -b " << batch;
                if (d.greedy_same < static_cast<int>(cpu.greedy.size())) {
                    EXPECT_LT(d.margin_at_split, 2e-2) << what << " -b " << batch << ": greedy parted at a clear choice";
                }
            }
        }
    }
};

// An environment variable set for a scope (unset at its end).
struct ScopedEnv {
    const char* name;
    ScopedEnv(const char* n, const char* value) : name(n) { EXPECT_EQ(setenv(n, value, 1), 0) << n; }
    ~ScopedEnv() { unsetenv(name); }
};

MakeModelOptions moe_opts(const std::string& type) {
    MakeModelOptions o;
    o.arch = "qwen3moe";
    o.layers = 3;
    o.hidden = 256;
    o.experts = 8;
    o.top_k = 2;
    o.expert_ff = 128;
    o.type = type;
    o.seed = 11;
    return o;
}

MakeModelOptions next_opts(const std::string& type) {
    MakeModelOptions o;
    o.arch = "qwen3next";
    o.layers = 4;  // 3 DeltaNet + 1 gated attention
    o.hidden = 256;
    o.experts = 8;
    o.top_k = 2;
    o.expert_ff = 128;
    o.type = type;
    o.seed = 12;
    return o;
}

TEST_F(CudaModel, Qwen3MoeF32) {
    REQUIRE_CUDA();
    check("qwen3moe f32, f32 KV", make(moe_opts("f32"), "moe_f32"), false, false, 40);
}

// 80 prompt tokens: in one chunk (-b 512) the prompt attention goes through cuBLAS (64+ tokens, where
// it loads; attention.cu attention_blas), in chunks of 16 and 7 through the split kernel.
TEST_F(CudaModel, Qwen3MoeF32F16Kv) {
    REQUIRE_CUDA();
    const uint64_t before = cuda::attention_blas_calls();
    check("qwen3moe f32, f16 KV", make(moe_opts("f32"), "moe_f32"), false, true, 80);
    if (cuda::blas_ready()) {
        EXPECT_GT(cuda::attention_blas_calls(), before) << "the 80-token prompt's attention did not take cuBLAS";
    }
}

// Prompt chunks of up to MOEMESH_CUDA_PROMPT_PAIRS (token, expert) pairs (512 by default: every
// prompt above) run as expert-indexed GEMVs over the pairs; longer ones group the pairs by expert on
// the host. This runs the grouped form at every prompt size.
TEST_F(CudaModel, Qwen3MoeF32GroupedPromptMoe) {
    REQUIRE_CUDA();
    const ScopedEnv pairs("MOEMESH_CUDA_PROMPT_PAIRS", "0");
    check("qwen3moe f32, grouped prompt MoE", make(moe_opts("f32"), "moe_f32"), false, false, 40);
}

TEST_F(CudaModel, Qwen3MoeQ8_0) {
    REQUIRE_CUDA();
    check("qwen3moe q8_0", make(moe_opts("q8_0"), "moe_q8"), true, true, 40);
}

// The grouped prompt MoE with its experts' products through cuBLAS (cuda::matmul_grouped; 80 pairs
// over 8 experts: ~10 rows each, so the cuBLAS minimum is lowered to 6) and the dense prompt
// products too (40 rows), against the CPU; cuBLAS must have run (where it loads).
TEST_F(CudaModel, Qwen3MoeQ8_0GroupedPromptMoeThroughCublas) {
    REQUIRE_CUDA();
    if (!cuda::blas_ready()) GTEST_SKIP() << "cuBLAS does not load";
    const ScopedEnv pairs("MOEMESH_CUDA_PROMPT_PAIRS", "0");
    const ScopedEnv rows("MOEMESH_CUDA_BLAS_MIN_ROWS", "6");
    const ScopedEnv grouped_rows("MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS", "6");
    const uint64_t before = cuda::blas_gemms();
    check("qwen3moe q8_0, grouped MoE, cuBLAS", make(moe_opts("q8_0"), "moe_q8"), true, true, 40);
    EXPECT_GT(cuda::blas_gemms(), before);
}

// (At -b 512 the 100-token prompt's attention layers go through cuBLAS, f32 products.)
TEST_F(CudaModel, Qwen3NextF32LongPrompt) {
    REQUIRE_CUDA();
    const uint64_t before = cuda::attention_blas_calls();
    check("qwen3next f32, f32 KV", make(next_opts("f32"), "next_f32"), false, false, 100);
    if (cuda::blas_ready()) {
        EXPECT_GT(cuda::attention_blas_calls(), before) << "the 100-token prompt's attention did not take cuBLAS";
    }
}

TEST_F(CudaModel, Qwen3NextLegacyLayoutF32) {
    REQUIRE_CUDA();
    MakeModelOptions o = next_opts("f32");
    o.qkvz_layout = "legacy";
    check("qwen3next f32 legacy ssm_in", make(o, "next_legacy"), false, false, 20);
}

TEST_F(CudaModel, Qwen3NextQ8_0LongPrompt) {
    REQUIRE_CUDA();
    check("qwen3next q8_0", make(next_opts("q8_0"), "next_q8"), true, true, 100);
}

TEST_F(CudaModel, Qwen3NextQ4_K) {
    REQUIRE_CUDA();
    MakeModelOptions o = next_opts("q4_k");
    o.expert_ff = 256;  // Q4_K rows are multiples of 256
    check("qwen3next q4_k", make(o, "next_q4k"), true, true, 30, 0.8);
}

// Qwen3.5 MoE (separate β/α, k heads tiled over v heads: 2 k / 4 v here) with the fused tensors of
// convert --fuse-qkv --fuse-gate-up-exps (strided gate/up halves in VRAM), and qwen3moe with YaRN.
TEST_F(CudaModel, Qwen35MoeFusedF32) {
    REQUIRE_CUDA();
    MakeModelOptions o = next_opts("f32");
    o.arch = "qwen35moe";
    o.fuse_qkv = o.fuse_gate_up = true;
    check("qwen35moe f32 fused", make(o, "q35_fused"), false, false, 70);
}

TEST_F(CudaModel, Qwen3MoeYarnF32) {
    REQUIRE_CUDA();
    MakeModelOptions o = moe_opts("f32");
    o.rope_scaling = "yarn";
    o.rope_factor = 4;
    o.rope_orig_ctx = 2048;
    check("qwen3moe f32 yarn x4", make(o, "moe_yarn"), false, false, 40);
}

// Greedy decode of n_gen tokens after `prompt` on cuda:0 with MOEMESH_CUDA_GRAPHS=graphs: the tokens
// and every step's logits.
struct Decode {
    std::vector<int32_t> tokens;
    std::vector<float> logits;  // [n_gen, V]
};

Decode decode_with_graphs(const std::string& path, const char* graphs, bool kv_f16, const std::vector<int32_t>& prompt,
                          int n_gen, const char* segment = nullptr, const char* device = "cuda:0") {
    Decode d;
    setenv("MOEMESH_CUDA_GRAPHS", graphs, 1);
    if (segment) setenv("MOEMESH_CUDA_GRAPH_SEGMENT", segment, 1);
    auto gf = GgufFile::open(path);
    EXPECT_TRUE(gf.ok()) << gf.status().message();
    if (!gf.ok()) return d;
    std::shared_ptr<GgufFile> file(std::move(*gf));
    ModelOptions mo;
    mo.n_threads = 2;
    mo.n_batch = 512;
    mo.kv_f16 = kv_f16;
    mo.device = device;
    auto m = load_model(file, mo);
    unsetenv("MOEMESH_CUDA_GRAPHS");
    unsetenv("MOEMESH_CUDA_GRAPH_SEGMENT");
    EXPECT_TRUE(m.ok()) << m.status().message();
    if (!m.ok()) return d;
    Model& model = **m;
    const int64_t V = model.config().n_vocab;
    auto seq = model.new_sequence(static_cast<int64_t>(prompt.size()) + n_gen + 1).value();
    std::vector<float> logits;
    Status st = model.forward(*seq, prompt.data(), static_cast<int64_t>(prompt.size()), false, &logits);
    EXPECT_TRUE(st.ok()) << st.message();
    for (int i = 0; i < n_gen && st.ok(); ++i) {
        const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        d.tokens.push_back(next);
        st = model.forward(*seq, &next, 1, false, &logits);
        EXPECT_TRUE(st.ok()) << st.message();
        d.logits.insert(d.logits.end(), logits.begin(), logits.begin() + V);
    }
    return d;
}

// Attention's decode chunks have 16 keys up to this context, then grow (cuda_ops.h attn_chunk with
// the default AttentionArgs::min_splits); the tests that replay graphs or compare launch forms
// decode across it.
constexpr int64_t kShortAttnKeys = 16 * cuda::kAttnMinSplits;

// Graph replay vs op by op: the same tokens, the same logits (bitwise expected; 1e-6 required),
// and the graph really replayed (at least all but the first few steps). segment: the graph's
// MOEMESH_CUDA_GRAPH_SEGMENT (ops per segment; null: the default).
void check_graphs(const std::string& what, const std::string& path, bool kv_f16, int n_gen,
                  const char* segment = nullptr) {
#ifdef MM_CUDA_EMULATION
    // On the host emulator (test_cuda_model_emu) a decode step costs milliseconds: kShortAttnKeys + 24
    // steps still take attention's chunks past 16 keys (cuda_ops.h: at most 16·kAttnMinSplits keys
    // in chunks of 16, then kAttnMinSplits chunks that grow) and replay the graph over a hundred times.
    n_gen = std::min<int>(n_gen, kShortAttnKeys + 24);
#endif
    const auto prompt = random_tokens(9, kDefaultBuiltinVocab, 3);
    const Decode off = decode_with_graphs(path, "0", kv_f16, prompt, n_gen);
    const CudaGraphStats s0 = cuda_graph_stats();
    const Decode on = decode_with_graphs(path, "1", kv_f16, prompt, n_gen, segment);
    const CudaGraphStats s1 = cuda_graph_stats();
    ASSERT_EQ(off.tokens.size(), static_cast<size_t>(n_gen));
    ASSERT_EQ(on.logits.size(), off.logits.size());
    double max_d = 0;
    size_t n_diff = 0;
    for (size_t i = 0; i < on.logits.size(); ++i) {
        max_d = std::max(max_d, static_cast<double>(std::fabs(on.logits[i] - off.logits[i])));
        n_diff += on.logits[i] != off.logits[i];
    }
    int same = 0;
    while (same < n_gen && on.tokens[same] == off.tokens[same]) ++same;
    std::printf("[cuda-model] graphs on/off %-26s %d steps (context %zu): tokens %d/%d, logits max|d| %.3g, "
                "%zu of %zu differ; %lld capture(s), %lld replay(s), %lld step(s) op by op\n",
                what.c_str(), n_gen, prompt.size() + n_gen, same, n_gen, max_d, n_diff, on.logits.size(),
                static_cast<long long>(s1.captures - s0.captures), static_cast<long long>(s1.replays - s0.replays),
                static_cast<long long>(s1.eager_steps - s0.eager_steps));
    EXPECT_EQ(same, n_gen) << what;
    EXPECT_LE(max_d, 1e-6) << what;
    EXPECT_GE(s1.replays - s0.replays, n_gen - 4) << what << ": the decode graph was not replayed";
    EXPECT_LE(s1.captures - s0.captures, 2) << what << ": recaptured while shapes were stable";
}

TEST_F(CudaModel, GraphsOnOffQwen3MoeQ8_0) {
    REQUIRE_CUDA();
    check_graphs("qwen3moe q8_0, f16 KV", make(moe_opts("q8_0"), "moe_q8"), true, 600);
}

TEST_F(CudaModel, GraphsOnOffQwen3MoeF32) {
    REQUIRE_CUDA();
    check_graphs("qwen3moe f32, f32 KV", make(moe_opts("f32"), "moe_f32"), false, 300);
}

TEST_F(CudaModel, GraphsOnOffQwen3NextF32) {
    REQUIRE_CUDA();
    check_graphs("qwen3next f32, f32 KV", make(next_opts("f32"), "next_f32"), false, 600);
}

// The model at `path` on cuda:0 with decode graphs on (null after a failed expectation).
std::unique_ptr<Model> load_graphed(const std::string& path) {
    auto gf = GgufFile::open(path);
    EXPECT_TRUE(gf.ok()) << gf.status().message();
    if (!gf.ok()) return nullptr;
    ModelOptions mo;
    mo.n_threads = 2;
    mo.device = "cuda:0";
    const ScopedEnv graphs("MOEMESH_CUDA_GRAPHS", "1");
    auto m = load_model(std::shared_ptr<GgufFile>(std::move(*gf)), mo);
    EXPECT_TRUE(m.ok()) << m.status().message();
    return m.ok() ? std::move(m).value() : nullptr;
}

// Greedy decoding with the argmax taken on the device (Model::forward_argmax: what `moemesh run
// --greedy` does): the tokens of the host's argmax over downloaded logits, with the argmax
// recorded into the decode graph and replayed; then two sequences at different positions through
// forward_batch_argmax against forward_batch's logits.
TEST_F(CudaModel, ArgmaxOnTheDeviceIsTheHostArgmax) {
    REQUIRE_CUDA();
    for (const auto& [what, path] :
         {std::pair<std::string, std::string>{"qwen3moe q8_0", make(moe_opts("q8_0"), "moe_q8")},
          {"qwen3next f32", make(next_opts("f32"), "next_f32")}}) {
        const int n_gen = 24;
        const auto prompt = random_tokens(9, kDefaultBuiltinVocab, 5);
        const Decode host = decode_with_graphs(path, "1", true, prompt, n_gen);
        ASSERT_EQ(host.tokens.size(), static_cast<size_t>(n_gen)) << what;
        const std::unique_ptr<Model> m = load_graphed(path);
        ASSERT_TRUE(m);
        Model& model = *m;
        const CudaGraphStats s0 = cuda_graph_stats();
        auto seq = model.new_sequence(static_cast<int64_t>(prompt.size()) + n_gen + 1).value();
        std::vector<int32_t> got(1, -1);
        ASSERT_TRUE(model.forward_argmax(*seq, prompt.data(), static_cast<int64_t>(prompt.size()), &got[0]).ok());
        while (static_cast<int>(got.size()) < n_gen) {
            int32_t next = -1;
            ASSERT_TRUE(model.forward_argmax(*seq, &got.back(), 1, &next).ok());
            got.push_back(next);
        }
        const CudaGraphStats s1 = cuda_graph_stats();
        EXPECT_EQ(got, host.tokens) << what;
        EXPECT_GE(s1.replays - s0.replays, n_gen - 6)
            << what << ": the decode graph (with its argmax) was not replayed";
        std::printf("[cuda-model] argmax on the device %-14s %d tokens equal the host argmax's; %lld replay(s)\n",
                    what.c_str(), n_gen, static_cast<long long>(s1.replays - s0.replays));

        // Batched: two sequences at different positions, ids vs the argmax of forward_batch's rows.
        const int64_t V = model.config().n_vocab;
        auto a1 = model.new_sequence(64).value(), b1 = model.new_sequence(64).value(),
             a2 = model.new_sequence(64).value(), b2 = model.new_sequence(64).value();
        std::vector<float> logits;
        int32_t ta = -1, tb = -1;
        ASSERT_TRUE(model.forward_argmax(*a1, prompt.data(), 9, &ta).ok());
        ASSERT_TRUE(model.forward_argmax(*b1, prompt.data(), 4, &tb).ok());
        ASSERT_TRUE(model.forward(*a2, prompt.data(), 9, false, &logits).ok());
        ASSERT_TRUE(model.forward(*b2, prompt.data(), 4, false, &logits).ok());
        std::vector<int32_t> toks_ids = {ta, tb}, toks_logits = {ta, tb};
        for (int k = 0; k < 8; ++k) {
            SequenceState* ids_seqs[] = {a1.get(), b1.get()};
            SequenceState* logit_seqs[] = {a2.get(), b2.get()};
            const int64_t counts[] = {1, 1};
            int32_t ids[2] = {-1, -1};
            ASSERT_TRUE(model.forward_batch_argmax(ids_seqs, counts, 2, toks_ids.data(), ids).ok());
            ASSERT_TRUE(model.forward_batch(logit_seqs, counts, 2, toks_logits.data(), &logits).ok());
            for (int r = 0; r < 2; ++r) {
                const int32_t want =
                    static_cast<int32_t>(std::max_element(logits.begin() + r * V, logits.begin() + (r + 1) * V) -
                                         (logits.begin() + r * V));
                EXPECT_EQ(ids[r], want) << what << ": batched step " << k << ", row " << r;
                toks_ids[r] = ids[r], toks_logits[r] = want;
            }
        }
    }
}

// The decode graph in segments of 3 ops (each replayed while the rest of the step is recorded;
// segments end inside layers, attention and MoE alike) and in one piece (segment 0).
TEST_F(CudaModel, GraphsInSegmentsAndInOnePiece) {
    REQUIRE_CUDA();
    check_graphs("qwen3next f32, segments of 3", make(next_opts("f32"), "next_f32"), false, 60, "3");
    check_graphs("qwen3moe q8_0, segments of 3", make(moe_opts("q8_0"), "moe_q8"), true, 60, "3");
    check_graphs("qwen3moe q8_0, one graph", make(moe_opts("q8_0"), "moe_q8"), true, 60, "0");
}

// Attention's V pass over the warps (MOEMESH_CUDA_ATTN_V=warps) replayed from the graph is the eager
// run, bit for bit, past attention's 16-key chunks (context > kShortAttnKeys).
TEST_F(CudaModel, GraphsWithAttentionVByWarps) {
    REQUIRE_CUDA();
    const ScopedEnv v_by_warps("MOEMESH_CUDA_ATTN_V", "warps");
    check_graphs("qwen3moe f32, V by warps", make(moe_opts("f32"), "moe_f32"), false, 270);
}

// Top-k sampling's candidates on the device (Model::forward_top_k, k = 40: what `moemesh run` with
// the default sampling does): each step's ids and logits are the host's top_k_ids of the downloaded
// logits, with the top-k kernels recorded into the decode graph and replayed; then batched.
TEST_F(CudaModel, TopKOnTheDeviceIsTheHostTopK) {
    REQUIRE_CUDA();
    const std::string path = make(moe_opts("q8_0"), "moe_q8");
    const int n_gen = 16;
    const int64_t k = 40;
    const auto prompt = random_tokens(9, kDefaultBuiltinVocab, 6);
    const Decode host = decode_with_graphs(path, "1", true, prompt, n_gen);
    ASSERT_EQ(host.tokens.size(), static_cast<size_t>(n_gen));
    const std::unique_ptr<Model> m = load_graphed(path);
    ASSERT_TRUE(m);
    Model& model = *m;
    const int64_t V = model.config().n_vocab;
    const CudaGraphStats s0 = cuda_graph_stats();
    auto seq = model.new_sequence(static_cast<int64_t>(prompt.size()) + n_gen + 1).value();
    std::vector<int32_t> ids(k);
    std::vector<float> vals(k);
    ASSERT_TRUE(model.forward_top_k(*seq, prompt.data(), static_cast<int64_t>(prompt.size()), k, ids.data(),
                                    vals.data()).ok());
    // Step i feeds host.tokens[i] (the argmax before it), then compares with host.logits[i].
    for (int i = 0; i < n_gen; ++i) {
        ASSERT_EQ(ids[0], host.tokens[i]) << "step " << i << ": top-1 is not the argmax";
        ASSERT_TRUE(model.forward_top_k(*seq, &host.tokens[i], 1, k, ids.data(), vals.data()).ok());
        const float* l = host.logits.data() + static_cast<size_t>(i) * V;
        std::vector<int32_t> want;
        top_k_ids(l, V, k, want);
        EXPECT_EQ(ids, want) << "step " << i;
        for (int64_t j = 0; j < k; ++j) EXPECT_EQ(vals[j], l[want[j]]) << "step " << i << ", rank " << j;
    }
    const CudaGraphStats s1 = cuda_graph_stats();
    EXPECT_GE(s1.replays - s0.replays, n_gen - 6) << "the decode graph (with its top-k) was not replayed";
    // Batched: two sequences at different positions against forward_batch's logits.
    auto a1 = model.new_sequence(64).value(), b1 = model.new_sequence(64).value(),
         a2 = model.new_sequence(64).value(), b2 = model.new_sequence(64).value();
    std::vector<float> logits;
    ASSERT_TRUE(model.forward(*a1, prompt.data(), 9, false, &logits).ok());
    ASSERT_TRUE(model.forward(*b1, prompt.data(), 4, false, &logits).ok());
    ASSERT_TRUE(model.forward(*a2, prompt.data(), 9, false, &logits).ok());
    ASSERT_TRUE(model.forward(*b2, prompt.data(), 4, false, &logits).ok());
    SequenceState* top_seqs[] = {a1.get(), b1.get()};
    SequenceState* logit_seqs[] = {a2.get(), b2.get()};
    const int64_t counts[] = {1, 1};
    const int32_t toks[] = {17, 23};
    std::vector<int32_t> bids(2 * k);
    std::vector<float> bvals(2 * k);
    ASSERT_TRUE(model.forward_batch_top_k(top_seqs, counts, 2, toks, k, bids.data(), bvals.data()).ok());
    ASSERT_TRUE(model.forward_batch(logit_seqs, counts, 2, toks, &logits).ok());
    for (int r = 0; r < 2; ++r) {
        std::vector<int32_t> want;
        top_k_ids(logits.data() + r * V, V, k, want);
        EXPECT_EQ(std::vector<int32_t>(bids.begin() + r * k, bids.begin() + (r + 1) * k), want) << "batched row " << r;
    }
}

// The launches that finish in their last block (session 16's defaults) against the separate launches
// they replace, one switch at a time: the same logits bit for bit, graphs on, across attention's
// short-context chunking (context kShortAttnKeys - 8 → + 8: chunks to merge, of 16 keys then more,
// in the graph's fixed grid).
//   MOEMESH_CUDA_ATTN_MERGE=kernel: attention's merge as a second launch;
//   MOEMESH_CUDA_ROUTER=split: the router GEMV, then softmax + top-k;
//   MOEMESH_CUDA_O_NORM=split: the o projection, then the residual add + norm;
//   MOEMESH_CUDA_DOWN_COMBINE=split: the int8-X down GEMV, then the weighted sum (that GEMV runs
//   for these small experts only with MOEMESH_CUDA_GEMV=new: ctest's gemv_new.* entry);
//   MOEMESH_CUDA_DOWN_NORM=split: the residual add + the next layer's input norm after the MoE as
//   their own launch instead of in that GEMV's last block (session 17);
//   MOEMESH_CUDA_QKV_ROPE=split: the q/k/v GEMV, then the heads' norms + rope + KV stores (session
//   17; the fused form needs head_dim 128, hence this model's).
TEST_F(CudaModel, LastBlockEpiloguesAreTheSeparateLaunches) {
    REQUIRE_CUDA();
    MakeModelOptions o = moe_opts("q8_0");
    o.head_dim = 128;
    const std::string path = make(o, "moe_q8_d128");
    const auto prompt = random_tokens(kShortAttnKeys - 8, kDefaultBuiltinVocab, 4);
    const Decode fused = decode_with_graphs(path, "1", true, prompt, 16);
    ASSERT_EQ(fused.tokens.size(), 16u);
    for (const auto& [var, value] : {std::pair<const char*, const char*>{"MOEMESH_CUDA_ATTN_MERGE", "kernel"},
                                     {"MOEMESH_CUDA_ROUTER", "split"},
                                     {"MOEMESH_CUDA_O_NORM", "split"},
                                     {"MOEMESH_CUDA_DOWN_COMBINE", "split"},
                                     {"MOEMESH_CUDA_DOWN_NORM", "split"},
                                     {"MOEMESH_CUDA_QKV_ROPE", "split"}}) {
        Decode split;
        {
            const ScopedEnv env(var, value);
            split = decode_with_graphs(path, "1", true, prompt, 16);
        }
        EXPECT_EQ(fused.tokens, split.tokens) << var << "=" << value;
        EXPECT_TRUE(fused.logits == split.logits) << var << "=" << value << ": other logits than the fused launches";
    }
}

// The gate/up GEMV of every decode step puts the selected experts' down matrices into L2 for the
// down GEMV (MOEMESH_CUDA_EXPERT_PREFETCH, cuda::matmul_id_swiglu's next): the same logits without it;
// on the emulator (which records prefetches) each decode step of each layer prefetches its K down
// matrices' bytes more than without (a prompt's MoE prefetches none: hundreds of pairs).
TEST_F(CudaModel, DecodePrefetchesTheSelectedExpertsDownMatrices) {
    REQUIRE_CUDA();
    const MakeModelOptions o = moe_opts("q8_0");
    const std::string path = make(o, "moe_q8");
    const auto prompt = random_tokens(5, kDefaultBuiltinVocab, 6);
    const int n_gen = 4;
    [[maybe_unused]] size_t bytes[2] = {0, 0};
    Decode runs[2];
    for (int off = 0; off < 2; ++off) {
        ASSERT_EQ(cuda::set_kernel_switches(off ? cuda::kSwitchNoExpertPrefetch : 0u), cudaSuccess);
#ifdef MM_CUDA_EMULATION
        (void)mm_emu::prefetch_log(true);
#endif
        runs[off] = decode_with_graphs(path, "1", true, prompt, n_gen);
#ifdef MM_CUDA_EMULATION
        for (const mm_emu::PrefetchRange& r : mm_emu::prefetch_log(false)) bytes[off] += r.end - r.begin;
#endif
    }
    ASSERT_EQ(cuda::set_kernel_switches(0), cudaSuccess);
    ASSERT_EQ(runs[0].tokens.size(), static_cast<size_t>(n_gen));
    EXPECT_EQ(runs[0].tokens, runs[1].tokens);
    EXPECT_TRUE(runs[0].logits == runs[1].logits) << "the down matrices' prefetch changed the logits";
#ifdef MM_CUDA_EMULATION
    const size_t down = static_cast<size_t>(o.hidden) * ggml_row_bytes(GgmlType::Q8_0, o.expert_ff);
    const size_t want = static_cast<size_t>(n_gen) * o.layers * o.top_k * down;
    const size_t parts = static_cast<size_t>((o.expert_ff + 7) / 8 * 8);  // gate/up warps per selection
    ASSERT_GE(bytes[0], bytes[1]);
    EXPECT_GE(bytes[0] - bytes[1], want);
    EXPECT_LE(bytes[0] - bytes[1], want + static_cast<size_t>(n_gen) * o.layers * o.top_k * parts * 32);
#else
    std::printf("[   NOTE   ] what was prefetched is checked on the emulator only (logits checked here)\n");
#endif
}

// MOEMESH_CUDA_QX (on by default): decode GEMVs read X quantized by the norms and attention, as the
// CPU quantizes its activations. Against MOEMESH_CUDA_QX=0 the logits must differ (the path ran),
// and every step must stay close to the CPU run (a stale or misplaced quantized X gives other
// logits at once). On this random model one step (9) is ill-conditioned: there the f32-X GPU is
// 0.12 (relative) from the CPU and the quantized-X GPU 0.013. Graphs off and on: the recorded and the
// direct paths keep the twin valid alike; and MOEMESH_CUDA_QX=norms (attention's output stays f32).
// Steps compared: while the three runs chose the same tokens.
TEST_F(CudaModel, QuantizedXIsCloseToTheCpu) {
    REQUIRE_CUDA();
    const std::string path = make(moe_opts("q8_0"), "moe_q8");
    const auto prompt = random_tokens(9, kDefaultBuiltinVocab, 3);
    const int n_gen = 24;
    const Decode cpu = decode_with_graphs(path, "0", true, prompt, n_gen, nullptr, "cpu");
    ASSERT_EQ(cpu.tokens.size(), static_cast<size_t>(n_gen));
    const size_t V = cpu.logits.size() / n_gen;
    struct Run {
        const char* graphs;
        const char* qx;  // MOEMESH_CUDA_QX (null: the default, norms and attention)
    };
    for (const Run run : {Run{"0", nullptr}, Run{"1", nullptr}, Run{"1", "norms"}}) {
        const char* graphs = run.graphs;
        auto decode_qx = [&](const char* qx) {
            std::optional<ScopedEnv> env;
            if (qx) env.emplace("MOEMESH_CUDA_QX", qx);
            return decode_with_graphs(path, graphs, true, prompt, n_gen);
        };
        const Decode f32 = decode_qx("0");
        const Decode q = decode_qx(run.qx);
        ASSERT_EQ(q.logits.size(), cpu.logits.size());
        ASSERT_EQ(f32.logits.size(), cpu.logits.size());
        int same = 0;
        while (same < n_gen && q.tokens[same] == cpu.tokens[same] && f32.tokens[same] == cpu.tokens[same]) ++same;
        double worst_q = 0, worst_f = 0;
        size_t n_diff = 0;
        for (int st = 0; st < same; ++st) {
            double dq = 0, df = 0, den = 0;
            for (size_t i = st * V; i < (st + 1) * V; ++i) {
                const double c = cpu.logits[i];
                dq += (q.logits[i] - c) * (q.logits[i] - c), df += (f32.logits[i] - c) * (f32.logits[i] - c);
                den += c * c;
                n_diff += q.logits[i] != f32.logits[i];
            }
            worst_q = std::max(worst_q, std::sqrt(dq / std::max(den, 1e-30)));
            worst_f = std::max(worst_f, std::sqrt(df / std::max(den, 1e-30)));
        }
        std::printf("[cuda-model] graphs %s, qx %s: tokens of CPU, f32-X and quantized-X GPU equal for %d of %d steps; "
                    "worst step vs CPU: quantized X %.3g, f32 X %.3g; %zu of %zu logits differ between them\n",
                    graphs, run.qx ? run.qx : "1", same, n_gen, worst_q, worst_f, n_diff, static_cast<size_t>(same) * V);
        EXPECT_GE(same, 12) << "graphs " << graphs;
        EXPECT_GT(n_diff, static_cast<size_t>(same) * V / 2) << "graphs " << graphs << ": the quantized-X path did not run";
        // norms only: the o projection reads f32 X, as the f32-X run (0.12 at step 9), not as the CPU
        EXPECT_LT(worst_q, run.qx ? std::max(3e-2, 1.05 * worst_f) : 3e-2) << "graphs " << graphs;
    }
}

// MOEMESH_CUDA_PROFILE=1: the same tokens and logits as the op-by-op run (the same kernels in the
// same order, with events between them), and a table of the ops when the backend goes away.
TEST_F(CudaModel, OpProfileGivesTheSameResultsAndReportsTheOps) {
    REQUIRE_CUDA();
    const std::string path = make(moe_opts("q8_0"), "moe_q8");
    const auto prompt = random_tokens(9, kDefaultBuiltinVocab, 3);
    const Decode off = decode_with_graphs(path, "0", true, prompt, 20);
    setenv("MOEMESH_CUDA_PROFILE", "1", 1);
    ::testing::internal::CaptureStderr();
    const Decode prof = decode_with_graphs(path, "1", true, prompt, 20);  // profiling turns graphs off
    const std::string err = ::testing::internal::GetCapturedStderr();
    unsetenv("MOEMESH_CUDA_PROFILE");
    EXPECT_EQ(prof.tokens, off.tokens);
    EXPECT_EQ(prof.logits, off.logits);
    for (const char* want : {"op profile", "| matmul q8_0 ", "| moe (resident", "| attention (decode) |", "| all |",
                             "| router (GEMV + softmax + top-k) |", "| o projection + add + rmsnorm |",
                             "| moe (resident) + add + rmsnorm |", "| q/k/v + q/k rmsnorm + rope + store_kv |"})
        EXPECT_NE(err.find(want), std::string::npos) << want << " not in:\n" << err;
    std::printf("[cuda-model] op profile of 20 decode steps:\n%s", err.c_str());
}

// What the HTTP server does on a GPU-resident model: continuous batching (forward_batch: sequences at
// different positions, one joining with its whole prompt beside the others' single tokens) and the
// recurrent prompt cache (copy_recurrent: a copy of the DeltaNet state continues as the original).
// On the GPU the batched products are other kernels (tiled vs GEMV), so the logits agree within
// float tolerance (not bitwise, as on the CPU) and the greedy tokens are the same.
void check_serving(const std::string& what, const std::string& path, bool recurrent) {
    auto gf = GgufFile::open(path);
    ASSERT_TRUE(gf.ok()) << gf.status().message();
    std::shared_ptr<GgufFile> file(std::move(*gf));
    ModelOptions mo;
    mo.n_threads = 2;
    mo.n_batch = 64;
    mo.device = "cuda:0";
    auto m = load_model(file, mo);
    ASSERT_TRUE(m.ok()) << m.status().message();
    Model& model = **m;
    const int64_t V = model.config().n_vocab;
    const std::vector<std::vector<int32_t>> prompts = {random_tokens(5, static_cast<int>(V), 1),
                                                       random_tokens(9, static_cast<int>(V), 2)};
    const int kSteps = 5;
    // Alone.
    std::vector<std::vector<std::vector<double>>> want(2);
    for (size_t s = 0; s < 2; ++s) {
        auto seq = model.new_sequence(64).value();
        std::vector<float> logits;
        ASSERT_TRUE(model.forward(*seq, prompts[s].data(), static_cast<int64_t>(prompts[s].size()), false, &logits).ok());
        want[s].push_back(softmax(logits.data(), V));
        for (int k = 0; k < kSteps; ++k) {
            const int32_t next = argmax(want[s].back());
            ASSERT_TRUE(model.forward(*seq, &next, 1, false, &logits).ok());
            want[s].push_back(softmax(logits.data(), V));
        }
    }
    // Batched: sequence 0's prompt alone, then sequence 1 joins with its prompt beside 0's token.
    auto s0 = model.new_sequence(64).value(), s1 = model.new_sequence(64).value();
    std::vector<std::vector<std::vector<double>>> got(2);
    std::vector<float> logits;
    ASSERT_TRUE(model.forward(*s0, prompts[0].data(), static_cast<int64_t>(prompts[0].size()), false, &logits).ok());
    got[0].push_back(softmax(logits.data(), V));
    while (got[0].size() < want[0].size() || got[1].size() < want[1].size()) {
        std::vector<SequenceState*> ptrs;
        std::vector<int64_t> counts;
        std::vector<int32_t> tokens;
        std::vector<int> which;
        if (got[0].size() < want[0].size()) {
            ptrs.push_back(s0.get()), counts.push_back(1), tokens.push_back(argmax(got[0].back())), which.push_back(0);
        }
        if (got[1].empty()) {
            ptrs.push_back(s1.get()), counts.push_back(static_cast<int64_t>(prompts[1].size()));
            tokens.insert(tokens.end(), prompts[1].begin(), prompts[1].end());
            which.push_back(1);
        } else if (got[1].size() < want[1].size()) {
            ptrs.push_back(s1.get()), counts.push_back(1), tokens.push_back(argmax(got[1].back())), which.push_back(1);
        }
        Status st = model.forward_batch(ptrs.data(), counts.data(), static_cast<int64_t>(ptrs.size()), tokens.data(),
                                        &logits);
        ASSERT_TRUE(st.ok()) << st.message();
        for (size_t i = 0; i < which.size(); ++i) got[which[i]].push_back(softmax(&logits[i * V], V));
    }
    double max_dp = 0;
    for (size_t s = 0; s < 2; ++s)
        for (size_t k = 0; k < want[s].size(); ++k) {
            EXPECT_EQ(argmax(got[s][k]), argmax(want[s][k])) << what << ": sequence " << s << ", step " << k;
            for (int64_t i = 0; i < V; ++i) max_dp = std::max(max_dp, std::fabs(got[s][k][i] - want[s][k][i]));
        }
    // copy_recurrent: sequences c1, c2 read sequence a's prompt (the same KV cache); c1 then gets
    // b's recurrent state and continues differently from a (qwen3next; qwen3moe has none), c2 gets
    // b's and then a's back and continues exactly as a.
    auto a = model.new_sequence(64).value(), b = model.new_sequence(64).value(), c1 = model.new_sequence(64).value(),
         c2 = model.new_sequence(64).value();
    std::vector<float> la, lb, l1, l2;
    ASSERT_TRUE(model.forward(*a, prompts[1].data(), static_cast<int64_t>(prompts[1].size()), false, &la).ok());
    ASSERT_TRUE(model.forward(*b, prompts[0].data(), static_cast<int64_t>(prompts[0].size()), false, &lb).ok());
    ASSERT_TRUE(model.forward(*c1, prompts[1].data(), static_cast<int64_t>(prompts[1].size()), false, &l1).ok());
    ASSERT_TRUE(model.forward(*c2, prompts[1].data(), static_cast<int64_t>(prompts[1].size()), false, &l2).ok());
    model.copy_recurrent(*b, *c1);
    model.copy_recurrent(*b, *c2);
    model.copy_recurrent(*a, *c2);
    const int32_t next = argmax(softmax(la.data(), V));
    ASSERT_TRUE(model.forward(*a, &next, 1, false, &la).ok());
    ASSERT_TRUE(model.forward(*c1, &next, 1, false, &l1).ok());
    ASSERT_TRUE(model.forward(*c2, &next, 1, false, &l2).ok());
    EXPECT_EQ(la, l2) << what << ": a copied recurrent state continues differently";
    if (recurrent) {
        EXPECT_NE(la, l1) << what << ": copy_recurrent changed nothing";
    }
    std::printf("[cuda-model] serving %-26s forward_batch vs alone: max|dp| %.2e, top-1 equal%s\n", what.c_str(),
                max_dp, recurrent ? "; copy_recurrent checked" : " (no recurrent state)");
    EXPECT_LT(max_dp, 1e-4) << what;
}

TEST_F(CudaModel, ServingBatchesAndRecurrentCopiesQwen3Next) {
    REQUIRE_CUDA();
    check_serving("qwen3next f32", make(next_opts("f32"), "serve_next_f32"), true);
}

TEST_F(CudaModel, ServingBatchesQwen3Moe) {
    REQUIRE_CUDA();
    check_serving("qwen3moe f32", make(moe_opts("f32"), "serve_moe_f32"), false);
}

// The model on the second GPU (users with two cards put the coordinator on either): everything
// allocated, copied and launched on cuda:1 (the emulator refuses a launch that touches another
// device's memory), with cuda:0's results.
TEST_F(CudaModel, SecondDeviceGivesTheSameResults) {
    REQUIRE_CUDA();
    if (cuda::device_count() < 2) GTEST_SKIP() << "one CUDA device";
    for (const char* arch : {"qwen3moe", "qwen3next"}) {
        const std::string path =
            std::string(arch) == "qwen3moe" ? make(moe_opts("f32"), "dev1_moe") : make(next_opts("f32"), "dev1_next");
        const auto prompt = random_tokens(20, kDefaultBuiltinVocab, 5);
        const Outcome d0 = run_model(path, "cuda:0", 512, false, prompt, 8);
        const Outcome d1 = run_model(path, "cuda:1", 512, false, prompt, 8);
        const Diff d = diff(d0, d1);
        std::printf("[cuda-model] %s f32 cuda:1 vs cuda:0: max|dp| %.2e, greedy %d/%zu\n", arch, d.max_dp,
                    d.greedy_same, d0.greedy.size());
        ASSERT_EQ(d.positions, 20);
        EXPECT_LT(d.max_dp, 1e-4) << arch;
        EXPECT_EQ(d.greedy_same, static_cast<int>(d0.greedy.size())) << arch;
    }
}

TEST(CudaModelErrors, BadDeviceNames) {
    auto path = testing::temp_dir("cuda_model_err") + "/m.gguf";
    MakeModelOptions o = moe_opts("f32");
    o.out = path;
    std::ostringstream log;
    ASSERT_TRUE(make_model(o, log).ok());
    std::shared_ptr<GgufFile> file(std::move(*GgufFile::open(path)));
    for (const char* dev : {"cuda:99", "gpu", "cuda:x"}) {
        ModelOptions mo;
        mo.device = dev;
        auto m = load_model(file, mo);
        ASSERT_FALSE(m.ok()) << dev;
        std::printf("[cuda-model] --device %s: %s\n", dev, m.status().message().c_str());
    }
}

// Device memory running out is an error that says what did not fit and what would help, never an
// abort, and the device stays usable: a model whose weights exceed the free memory (allocations
// hold the rest) is refused before any upload; a sequence whose KV cache exceeds it, and growing a
// sequence past it, fail with nothing leaked, after which sequences that fit still run. (On the
// emulator ctest runs it as emu_small_vram.* with a 256 MiB device: the blocking allocation of a
// 16 GiB emulated device would be 16 GiB of host memory.)
// Takes device memory until at most `leave` bytes of cuda:0 are free (allocations of at most 1 GiB,
// halved when refused, down to 4 KiB); gives it back when it goes away.
class DeviceMemoryBlock {
public:
    explicit DeviceMemoryBlock(size_t leave) {
        size_t fr = 0, total = 0;
        if (cudaMemGetInfo(&fr, &total) != cudaSuccess) return;
        for (size_t ask = size_t{1} << 30; fr > leave && ask >= (size_t{4} << 10);) {
            void* p = nullptr;
            if (cudaMalloc(&p, std::min(fr - leave, ask)) != cudaSuccess) {
                (void)cudaGetLastError();
                ask /= 2;
                continue;
            }
            held_.push_back(p);
            if (cudaMemGetInfo(&fr, &total) != cudaSuccess) break;
        }
        free_ = fr;
    }
    ~DeviceMemoryBlock() {
        for (void* p : held_) (void)cudaFree(p);
    }
    DeviceMemoryBlock(const DeviceMemoryBlock&) = delete;
    DeviceMemoryBlock& operator=(const DeviceMemoryBlock&) = delete;
    size_t free_bytes() const { return free_; }  // what was left free

private:
    std::vector<void*> held_;
    size_t free_ = 0;
};

// An OpenAI completion request of `prompt` to a server on 127.0.0.1:port, greedy.
httplib::Result complete(httplib::Client& client, const std::vector<int32_t>& prompt, int64_t max_tokens) {
    const nlohmann::json body = {
        {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}, {"ignore_eos", true}};
    return client.Post("/v1/completions", body.dump(), "application/json");
}

// `model` served on 127.0.0.1 (an ephemeral port, the tokenizer of `file`, contexts up to n_ctx)
// from a thread of its own until the object goes away; `client` talks to it.
struct ServedModel {
    ServedModel(Model& model, const GgufFile& file, int64_t n_ctx) {
        auto tok = Tokenizer::from_gguf(file);
        EXPECT_TRUE(tok.ok()) << tok.status().message();
        tokenizer = std::make_unique<Tokenizer>(std::move(tok).value());
        HttpServerOptions ho;
        ho.model_name = "m";
        ho.limits.n_ctx = n_ctx;
        ho.limits.n_vocab = model.config().n_vocab;
        ho.log_requests = false;
        server = std::make_unique<HttpServer>(model, *tokenizer, ho);
        auto port = server->bind("127.0.0.1", 0);
        EXPECT_TRUE(port.ok()) << port.status().message();
        serving = std::thread([this] { (void)server->run(); });
        client = std::make_unique<httplib::Client>("127.0.0.1", port.value());
        client->set_read_timeout(120);
        for (int i = 0; i < 100 && !client->Get("/health"); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ~ServedModel() {
        server->stop();
        serving.join();
    }
    std::unique_ptr<Tokenizer> tokenizer;
    std::unique_ptr<HttpServer> server;
    std::thread serving;
    std::unique_ptr<httplib::Client> client;
};

// The device-memory tests' model file (moe_opts("q8_0") with `o`'s changes) in a temp dir of its own.
std::shared_ptr<GgufFile> oom_test_file(const std::string& dir, MakeModelOptions o) {
    o.out = testing::temp_dir(dir) + "/m.gguf";
    std::ostringstream log;
    EXPECT_TRUE(make_model(o, log).ok()) << log.str();
    return std::shared_ptr<GgufFile>(std::move(*GgufFile::open(o.out)));
}

// The emulator's device is too large to fill (host memory) unless ctest's emu_small_vram.* runs it
// with MOEMESH_CUDA_EMU_MEM_MIB=256.
bool large_emulated_device() {
#ifdef MM_CUDA_EMULATION
    size_t free_b = 0, total_b = 0;
    return cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && free_b > (size_t{1} << 30);
#else
    return false;
#endif
}

TEST(CudaModelErrors, DeviceMemoryRunningOutIsAClearError) {
    REQUIRE_CUDA();
    if (large_emulated_device()) GTEST_SKIP() << "runs on an emulated device of at most 1 GiB (emu_small_vram.*)";
    MakeModelOptions o = moe_opts("q8_0");
    // ~80 MB of weights: with half of that free, the backend's own start (a stream, its kernels, a
    // few small buffers) still has room on a GPU, whose allocations come in pages of MiBs.
    o.experts = 64;
    o.expert_ff = 512;
    std::shared_ptr<GgufFile> file = oom_test_file("cuda_model_oom", o);
    const std::string& path = file->path();
    size_t weights = 0;
    for (const GgufTensor& t : file->tensors()) weights += t.nbytes;
    size_t free_b = 0, total_b = 0;
    ASSERT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
    ModelOptions mo;
    mo.device = "cuda:0";
    {
        // About half the weights' bytes left free.
        std::optional<DeviceMemoryBlock> block(std::in_place, weights / 2);
        const size_t fr = block->free_bytes();
        ASSERT_LT(fr, weights) << "could not leave less free memory than the weights take";
        auto m = load_model(file, mo);
        block.reset();
        ASSERT_FALSE(m.ok()) << "weights of " << weights << " bytes loaded with " << fr << " bytes free";
        const std::string& msg = m.status().message();
        std::printf("[cuda-model] weights that do not fit: %s\n", msg.c_str());
        EXPECT_NE(msg.find(path + ": its weights take"), std::string::npos) << msg;
        EXPECT_NE(msg.find("--device-budget"), std::string::npos) << msg;
    }
    auto m = load_model(file, mo);
    ASSERT_TRUE(m.ok()) << m.status().message();
    Model& model = **m;
    const ModelConfig& c = model.config();
    ASSERT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
    // At least twice the free memory in f16 K and V.
    const auto per_token = static_cast<size_t>(c.n_layer * 2 * c.n_head_kv * c.head_dim * 2);
    const int64_t huge = static_cast<int64_t>(free_b / per_token) * 2 + 1024;
    auto big = model.new_sequence(huge);
    ASSERT_FALSE(big.ok()) << huge << " positions";
    std::printf("[cuda-model] a KV cache that does not fit: %s\n", big.status().message().c_str());
    EXPECT_NE(big.status().message().find("cuda:0: out of memory for the KV cache"), std::string::npos);
    EXPECT_NE(big.status().message().find("KV cache for " + std::to_string(huge) + " positions"), std::string::npos);
    EXPECT_NE(big.status().message().find("--ctx"), std::string::npos);
    size_t free_after = 0;
    ASSERT_EQ(cudaMemGetInfo(&free_after, &total_b), cudaSuccess);
    EXPECT_GE(free_after + (size_t{2} << 20), free_b) << "the layers allocated before the failure were not given back";
    auto seq = model.new_sequence(64).value();
    const std::vector<int32_t> prompt = random_tokens(8, kDefaultBuiltinVocab, 3);
    std::vector<float> logits;
    ASSERT_TRUE(model.forward(*seq, prompt.data(), 8, false, &logits).ok());
    const Status grown = model.grow_sequence(*seq, huge);
    ASSERT_FALSE(grown.ok());
    EXPECT_NE(grown.message().find("out of memory for the KV cache"), std::string::npos) << grown.message();
    EXPECT_EQ(seq->n_ctx, 64);
    const int32_t next = 7;
    EXPECT_TRUE(model.forward(*seq, &next, 1, false, &logits).ok()) << "the sequence after a failed grow";
    // The server answers a request whose KV cache does not fit with that error, and goes on.
    ServedModel served(model, *file, huge);
    httplib::Client& client = *served.client;
    auto too_long = complete(client, {5, 6, 7}, huge - 10);
    ASSERT_TRUE(too_long);
    std::printf("[cuda-model] serving it: HTTP %d %s\n", too_long->status, too_long->body.c_str());
    EXPECT_NE(too_long->status, 200);
    EXPECT_NE(too_long->body.find("out of memory for the KV cache"), std::string::npos) << too_long->body;
    auto fits = complete(client, {5, 6, 7}, 4);
    ASSERT_TRUE(fits);
    EXPECT_EQ(fits->status, 200) << fits->body;
}

// The forward pass's own scratch (activations, workspaces, the backend's grown buffers) not fitting:
// an error from forward*, not an abort; with the memory back a new sequence runs as on a fresh
// model, and the server answers the request with the error and goes on.
TEST(CudaModelErrors, ScratchRunningOutIsAClearError) {
    REQUIRE_CUDA();
    if (large_emulated_device()) GTEST_SKIP() << "runs on an emulated device of at most 1 GiB (emu_small_vram.*)";
    std::shared_ptr<GgufFile> file = oom_test_file("cuda_model_scratch_oom", moe_opts("q8_0"));
    ModelOptions mo;
    mo.device = "cuda:0";
    auto m = load_model(file, mo);
    ASSERT_TRUE(m.ok()) << m.status().message();
    Model& model = **m;
    const int64_t n = 300;
    const std::vector<int32_t> prompt = random_tokens(n, kDefaultBuiltinVocab, 5);
    auto seq = model.new_sequence(512).value();
    auto seq1 = model.new_sequence(512).value();
    std::vector<float> logits;
    {
        DeviceMemoryBlock block(0);
        const Status st = model.forward(*seq, prompt.data(), n, false, &logits);
        ASSERT_FALSE(st.ok()) << "a prompt ran with " << block.free_bytes() << " bytes free";
        std::printf("[cuda-model] scratch that does not fit: %s\n", st.message().c_str());
        EXPECT_NE(st.message().find("cuda:0: out of memory for a buffer"), std::string::npos) << st.message();
        EXPECT_NE(st.message().find("in the forward pass of 300 token(s)"), std::string::npos) << st.message();
        EXPECT_NE(st.message().find("--batch 512"), std::string::npos) << st.message();
        int32_t next = -1;
        const Status st1 = model.forward_argmax(*seq1, prompt.data(), 1, &next);
#ifdef MM_CUDA_EMULATION
        ASSERT_FALSE(st1.ok()) << "a decode step ran with " << block.free_bytes() << " bytes free";
#endif
        // (A GPU's driver may still place a decode step's few KiB of buffers in pages it has begun.)
        if (!st1.ok()) {
            EXPECT_NE(st1.message().find("in the forward pass of 1 token(s)"), std::string::npos) << st1.message();
        }
    }
    // With the memory back: a new sequence, prompt then greedy steps, as on a model that never failed.
    auto greedy_run = [&](Model& mdl, std::vector<float>* first) {
        auto s = mdl.new_sequence(512).value();
        std::vector<int32_t> out;
        EXPECT_TRUE(mdl.forward(*s, prompt.data(), n, false, first).ok());
        int32_t next = ::moemesh::argmax(first->data(), mdl.config().n_vocab);
        for (int i = 0; i < 8; ++i) {
            out.push_back(next);
            const int32_t fed = next;
            EXPECT_TRUE(mdl.forward_argmax(*s, &fed, 1, &next).ok());
        }
        return out;
    };
    std::vector<float> after, ref;
    const std::vector<int32_t> tokens_after = greedy_run(model, &after);
    {
        auto fresh = load_model(file, mo);
        ASSERT_TRUE(fresh.ok()) << fresh.status().message();
        EXPECT_EQ(tokens_after, greedy_run(**fresh, &ref));
    }
    ASSERT_EQ(after.size(), ref.size());
    double diff = 0, scale = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        diff = std::max(diff, std::fabs(static_cast<double>(after[i]) - ref[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
    }
    EXPECT_LE(diff, 1e-5 * scale) << "the prompt's logits after the failure";
    // The server: a request whose prompt's scratch does not fit (room for its KV cache, measured as a
    // sequence of its size takes it, but not for the larger buffers of a longer prompt than the
    // last) is answered with the error; the prompt cache gives its sequences back (the next request
    // with the first one's prompt reuses none of it) and the server goes on.
    auto served = load_model(file, mo);
    ASSERT_TRUE(served.ok()) << served.status().message();
    const int64_t max_tokens = 4, n_long = 450;
    const std::vector<int32_t> longer = random_tokens(n_long, kDefaultBuiltinVocab, 6);
    size_t kv = 0;
    {
        size_t before = 0, after_b = 0, total_b = 0;
        ASSERT_EQ(cudaMemGetInfo(&before, &total_b), cudaSuccess);
        auto probe = (*served)->new_sequence(n_long + max_tokens).value();
        ASSERT_EQ(cudaMemGetInfo(&after_b, &total_b), cudaSuccess);
        kv = before - after_b;
    }
    ServedModel serving(**served, *file, 512);
    httplib::Client& client = *serving.client;
    auto cached_tokens = [](const httplib::Result& r) {
        return nlohmann::json::parse(r->body)["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
    };
    auto first = complete(client, prompt, max_tokens);
    ASSERT_TRUE(first);
    ASSERT_EQ(first->status, 200) << first->body;
    {
        DeviceMemoryBlock block(kv);
        auto failed = complete(client, longer, max_tokens);
        ASSERT_TRUE(failed);
        std::printf("[cuda-model] serving it (%zu bytes free, %zu for the KV cache): HTTP %d %s\n",
                    block.free_bytes(), kv, failed->status, failed->body.c_str());
#ifdef MM_CUDA_EMULATION
        EXPECT_EQ(failed->status, 500);
        EXPECT_NE(failed->body.find("in the forward pass of 450 token(s)"), std::string::npos) << failed->body;
#endif
        // (A GPU allocates in pages: the block may leave less than the KV cache's room; the request
        // then fails for its KV cache, the prompt cache is given back and the retry may fit it all.)
        if (failed->status != 200) {
            EXPECT_NE(failed->body.find("out of memory"), std::string::npos) << failed->body;
        }
    }
    auto again = complete(client, prompt, max_tokens);
    ASSERT_TRUE(again);
    ASSERT_EQ(again->status, 200) << again->body;
#ifdef MM_CUDA_EMULATION
    EXPECT_EQ(cached_tokens(again), 0) << "the prompt cache kept its sequences after the failure";
#endif
    auto longer_ok = complete(client, longer, max_tokens);
    ASSERT_TRUE(longer_ok);
    EXPECT_EQ(longer_ok->status, 200) << longer_ok->body;
    auto cached = complete(client, longer, max_tokens);
    ASSERT_TRUE(cached);
    EXPECT_EQ(cached_tokens(cached), n_long - 1) << "(the prompt cache works here)";
}

}  // namespace
}  // namespace moemesh
