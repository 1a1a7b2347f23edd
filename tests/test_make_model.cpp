// make-model: the file has the keys, tensor names, shapes and types llama.cpp expects, and
// llama.cpp itself (node-llama-cpp, tests/ref/llama_ref.mjs) loads it and gives a sane distribution.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/arch.h"
#include "common/gguf.h"
#include "tests/test_util.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;

class MakeModelTest : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        char tmpl[] = "/tmp/test_make_model.XXXXXX";
        ASSERT_NE(mkdtemp(tmpl), nullptr);
        dir_ = tmpl;
    }
    static void TearDownTestSuite() {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }
    static std::string path(const std::string& name) { return dir_ + "/" + name; }

    static std::string dir_;
};
std::string MakeModelTest::dir_;

MakeModelOptions shape_a(const std::string& out, const std::string& type) {
    MakeModelOptions o;  // the defaults: 2 layers, H 256, 4/2 heads of 64, 8 experts top-2, I 256
    o.out = out;
    o.type = type;
    return o;
}

MakeModelOptions shape_b(const std::string& out, const std::string& type) {
    MakeModelOptions o;
    o.out = out;
    o.type = type;
    o.layers = 3;
    o.hidden = 128;
    o.heads = 2;
    o.kv_heads = 1;
    o.head_dim = 32;
    o.experts = 6;
    o.top_k = 3;
    o.expert_ff = 96;
    o.vocab = 300;
    o.context = 2048;
    o.seed = 7;
    o.rope_theta = 10000;
    o.tied_embeddings = true;
    return o;
}

Status make(const MakeModelOptions& o) {
    std::ostringstream log;
    return make_model(o, log);
}

// The type llama.cpp's quantizer would leave a matrix with row length ncols in (our fallback).
GgmlType expect_matrix_type(GgmlType want, int64_t ncols) {
    const int64_t bs = ggml_type_info(want).block_size;
    if (ncols % bs == 0) return want;
    GgmlType t = want == GgmlType::Q4_K ? GgmlType::Q4_0 : want == GgmlType::Q6_K ? GgmlType::Q8_0 : want;
    if (ncols % ggml_type_info(t).block_size != 0) t = GgmlType::F16;
    return t;
}

// Reads the file back and checks every key, tensor name, shape and type against the options.
void check_file(const MakeModelOptions& o, int64_t vocab) {
    auto r = GgufFile::open(o.out);
    ASSERT_TRUE(r.ok()) << r.status().message();
    const GgufFile& f = *r.value();
    const Arch a = Arch::kQwen3Moe;
    auto u = [&](Kv k) { return f.get_int_or(kv_name(k, a), -1); };
    EXPECT_EQ(f.get_string_or(kv_name(Kv::kGeneralArchitecture, a), ""), "qwen3moe");
    EXPECT_FALSE(f.get_string_or(kv_name(Kv::kGeneralName, a), "").empty());
    EXPECT_EQ(u(Kv::kBlockCount), o.layers);
    EXPECT_EQ(u(Kv::kContextLength), o.context);
    EXPECT_EQ(u(Kv::kEmbeddingLength), o.hidden);
    EXPECT_EQ(u(Kv::kFeedForwardLength), o.expert_ff * o.top_k);
    EXPECT_EQ(u(Kv::kAttentionHeadCount), o.heads);
    EXPECT_EQ(u(Kv::kAttentionHeadCountKv), o.kv_heads);
    EXPECT_EQ(u(Kv::kAttentionKeyLength), o.head_dim);
    EXPECT_EQ(u(Kv::kAttentionValueLength), o.head_dim);
    EXPECT_EQ(u(Kv::kExpertCount), o.experts);
    EXPECT_EQ(u(Kv::kExpertUsedCount), o.top_k);
    EXPECT_EQ(u(Kv::kExpertFeedForwardLength), o.expert_ff);
    EXPECT_EQ(u(Kv::kGeneralQuantizationVersion), 2);
    EXPECT_NEAR(f.get_float_or(kv_name(Kv::kRopeFreqBase, a), 0), o.rope_theta, o.rope_theta * 1e-6);
    EXPECT_NEAR(f.get_float_or(kv_name(Kv::kAttentionLayerNormRmsEps, a), 0), o.rms_eps, 1e-12);
    const std::map<std::string, int64_t> ftypes = {{"f32", 0}, {"f16", 1}, {"q4_0", 2}, {"q8_0", 7},
                                                   {"q4_k", 15}, {"q6_k", 18}, {"bf16", 32}};
    EXPECT_EQ(u(Kv::kGeneralFileType), ftypes.at(o.type));
    // Same physical types the reader and llama.cpp expect.
    for (Kv k : {Kv::kBlockCount, Kv::kExpertCount, Kv::kAttentionHeadCount})
        EXPECT_EQ(f.find(kv_name(k, a))->type, GgufType::UINT32);
    EXPECT_EQ(f.find(kv_name(Kv::kRopeFreqBase, a))->type, GgufType::FLOAT32);
    EXPECT_EQ(f.get_string_or(kv_name(Kv::kTokenizerModel, a), ""), "gpt2");
    const GgufValue* toks = f.find(kv_name(Kv::kTokenizerTokens, a));
    ASSERT_NE(toks, nullptr);
    EXPECT_EQ(static_cast<int64_t>(toks->arr_count), vocab);

    GgmlType wt;
    ASSERT_TRUE(ggml_type_from_name(o.type, &wt));
    const int64_t H = o.hidden, V = vocab, E = o.experts, I = o.expert_ff, D = o.head_dim;
    const int64_t Q = o.heads * D, KV = o.kv_heads * D;
    struct Want {
        std::string name;
        std::vector<int64_t> ne;
        GgmlType type;
    };
    std::vector<Want> want;
    auto mat = [&](Tensor t, int l, std::vector<int64_t> ne, GgmlType type) {
        want.push_back({tensor_name(t, l), ne, expect_matrix_type(type, ne[0])});
    };
    auto vec = [&](Tensor t, int l, int64_t n) { want.push_back({tensor_name(t, l), {n}, GgmlType::F32}); };
    mat(Tensor::kTokenEmbd, -1, {H, V}, wt);
    for (int l = 0; l < o.layers; ++l) {
        vec(Tensor::kAttnNorm, l, H);
        mat(Tensor::kAttnQ, l, {H, Q}, wt);
        mat(Tensor::kAttnK, l, {H, KV}, wt);
        mat(Tensor::kAttnV, l, {H, KV}, wt);
        mat(Tensor::kAttnOutput, l, {Q, H}, wt);
        vec(Tensor::kAttnQNorm, l, D);
        vec(Tensor::kAttnKNorm, l, D);
        vec(Tensor::kFfnNorm, l, H);
        mat(Tensor::kFfnGateInp, l, {H, E}, GgmlType::F32);
        mat(Tensor::kFfnGateExps, l, {H, I, E}, wt);
        mat(Tensor::kFfnUpExps, l, {H, I, E}, wt);
        mat(Tensor::kFfnDownExps, l, {I, H, E}, wt);
    }
    vec(Tensor::kOutputNorm, -1, H);
    if (!o.tied_embeddings) mat(Tensor::kOutput, -1, {H, V}, wt);

    ASSERT_EQ(f.tensors().size(), want.size());
    for (const Want& w : want) {
        const GgufTensor* t = f.tensor(w.name);
        ASSERT_NE(t, nullptr) << w.name;
        ASSERT_EQ(t->n_dims, static_cast<int>(w.ne.size())) << w.name;
        for (size_t d = 0; d < w.ne.size(); ++d) EXPECT_EQ(t->ne[d], w.ne[d]) << w.name << " dim " << d;
        EXPECT_EQ(t->type, w.type) << w.name << ": " << ggml_type_name(t->type) << " vs " << ggml_type_name(w.type);
        EXPECT_EQ(t->nbytes, ggml_row_bytes(w.type, w.ne[0]) * static_cast<size_t>(t->nelements() / w.ne[0]));
    }
    if (o.tied_embeddings) {
        EXPECT_EQ(f.tensor("output.weight"), nullptr);
    }

    // F32 weights are what we meant them to be: norms near 1, matrices centred with std ~1/sqrt(fan_in).
    if (wt == GgmlType::F32) {
        const GgufTensor* n = f.tensor(tensor_name(Tensor::kAttnNorm, 0));
        const float* p = reinterpret_cast<const float*>(n->data);
        double mean = 0;
        for (int64_t i = 0; i < H; ++i) mean += p[i];
        EXPECT_NEAR(mean / H, 1.0, 0.05);
        const GgufTensor* q = f.tensor(tensor_name(Tensor::kAttnQ, 0));
        const float* w = reinterpret_cast<const float*>(q->data);
        double s2 = 0;
        for (int64_t i = 0; i < q->nelements(); ++i) s2 += double(w[i]) * w[i];
        EXPECT_NEAR(std::sqrt(s2 / q->nelements()) * std::sqrt(double(H)), 1.0, 0.05);
    }
}

std::string read_file(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

TEST_F(MakeModelTest, ShapeAF32) {
    auto o = shape_a(path("a_f32.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    check_file(o, kDefaultBuiltinVocab);
}

TEST_F(MakeModelTest, ShapeBF32Tied) {
    auto o = shape_b(path("b_f32.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    check_file(o, 300);
}

TEST_F(MakeModelTest, QuantizedTypes) {
    for (const char* t : {"q8_0", "q4_k", "f16", "bf16", "q4_0", "q6_k"}) {
        SCOPED_TRACE(t);
        auto a = shape_a(path(std::string("a_") + t + ".gguf"), t);
        Status st = make(a);
        ASSERT_TRUE(st.ok()) << st.message();
        check_file(a, kDefaultBuiltinVocab);
    }
    // Shape B's rows (128, 96, 64) are not multiples of 256: K-quants fall back per tensor.
    for (const char* t : {"q4_k", "q8_0"}) {
        SCOPED_TRACE(t);
        auto b = shape_b(path(std::string("b_") + t + ".gguf"), t);
        std::ostringstream log;
        Status st = make_model(b, log);
        ASSERT_TRUE(st.ok()) << st.message();
        check_file(b, 300);
        if (std::string(t) == "q4_k") {
            EXPECT_NE(log.str().find("writing q4_0 instead"), std::string::npos);
        }
    }
}

TEST_F(MakeModelTest, DeterministicInSeed) {
    auto o = shape_b(path("det1.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    o.out = path("det2.gguf");
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(read_file(path("det1.gguf")), read_file(path("det2.gguf")));
    o.out = path("det3.gguf");
    o.seed = 8;
    ASSERT_TRUE(make(o).ok());
    EXPECT_NE(read_file(path("det1.gguf")), read_file(path("det3.gguf")));
}

// Share of top-k routing hits that go to the E/4 most hit experts, over random inputs, per layer
// summed; and the routers' rows.
double top_quarter_share(const GgufFile& f, int layers, int k) {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    uint64_t top = 0, all = 0;
    for (int l = 0; l < layers; ++l) {
        const GgufTensor* t = f.tensor("blk." + std::to_string(l) + ".ffn_gate_inp.weight");
        EXPECT_NE(t, nullptr);
        if (!t) return 0;
        const int64_t H = t->ne[0], E = t->ne[1];
        const float* w = reinterpret_cast<const float*>(t->data);
        std::vector<uint64_t> hits(static_cast<size_t>(E), 0);
        std::vector<float> x(static_cast<size_t>(H)), logit(static_cast<size_t>(E));
        std::vector<int> idx(static_cast<size_t>(E));
        for (int n = 0; n < 2000; ++n) {
            for (auto& v : x) v = nd(rng);
            for (int64_t e = 0; e < E; ++e) {
                float s = 0;
                for (int64_t h = 0; h < H; ++h) s += w[e * H + h] * x[static_cast<size_t>(h)];
                logit[static_cast<size_t>(e)] = s;
            }
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) { return logit[a] > logit[b]; });
            for (int j = 0; j < k; ++j) hits[static_cast<size_t>(idx[static_cast<size_t>(j)])]++;
        }
        std::sort(hits.rbegin(), hits.rend());
        for (int64_t e = 0; e < E; ++e) (e < E / 4 ? top : all) += hits[static_cast<size_t>(e)];
    }
    all += top;
    return all ? static_cast<double>(top) / static_cast<double>(all) : 0;
}

TEST_F(MakeModelTest, RouterSkewMakesStablePopularExpertsAndZeroChangesNothing) {
    auto o = shape_b(path("skew_none.gguf"), "q8_0");
    o.experts = 32;
    o.top_k = 4;
    ASSERT_TRUE(make(o).ok());
    o.out = path("skew_0.gguf");
    o.router_skew = 0;
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(read_file(path("skew_none.gguf")), read_file(path("skew_0.gguf")));  // S = 0: byte for byte
    o.out = path("skew_4.gguf");
    o.router_skew = 4;
    ASSERT_TRUE(make(o).ok());
    auto base = GgufFile::open(path("skew_none.gguf"));
    auto skew = GgufFile::open(path("skew_4.gguf"));
    ASSERT_TRUE(base.ok() && skew.ok());
    // Only the routers change, each row by one factor; the factors are 1 + 4/(rank+1), ranks shuffled.
    for (const GgufTensor& t : base.value()->tensors()) {
        const GgufTensor* u = skew.value()->tensor(t.name);
        ASSERT_NE(u, nullptr) << t.name;
        const size_t bytes = t.nbytes;
        if (t.name.find("ffn_gate_inp") == std::string::npos) {
            EXPECT_EQ(std::memcmp(t.data, u->data, bytes), 0) << t.name;
            continue;
        }
        const int64_t H = t.ne[0], E = t.ne[1];
        const float* a = reinterpret_cast<const float*>(t.data);
        const float* b = reinterpret_cast<const float*>(u->data);
        std::vector<double> factors;
        for (int64_t e = 0; e < E; ++e) {
            const double f = static_cast<double>(b[e * H]) / a[e * H];
            for (int64_t h = 1; h < H; ++h) EXPECT_NEAR(b[e * H + h], f * a[e * H + h], 1e-5 * std::fabs(b[e * H + h]) + 1e-12);
            factors.push_back(f);
        }
        std::vector<double> sorted = factors;
        std::sort(sorted.rbegin(), sorted.rend());
        for (int64_t r = 0; r < E; ++r) EXPECT_NEAR(sorted[static_cast<size_t>(r)], 1.0 + 4.0 / (r + 1), 1e-4) << t.name;
        EXPECT_NE(factors, sorted) << t.name << ": the ranks are shuffled";
    }
    // Popularity: the most hit quarter of the experts takes a clearly larger share of top-k hits.
    const double flat = top_quarter_share(*base.value(), o.layers, o.top_k);
    const double skewed = top_quarter_share(*skew.value(), o.layers, o.top_k);
    std::printf("top-quarter share of top-%d hits: %.3f without skew, %.3f with --router-skew 4\n", o.top_k, flat, skewed);
    EXPECT_LT(flat, 0.34);  // 0.25 for a uniform router, plus sampling spread (measured 0.29)
    EXPECT_GT(skewed, 0.40);  // measured 0.44
    EXPECT_GT(skewed, flat + 0.10);
}

TEST_F(MakeModelTest, RejectsBadOptions) {
    auto bad = [&](auto edit, const char* needle) {
        auto o = shape_a(path("bad.gguf"), "f32");
        edit(o);
        Status st = make(o);
        EXPECT_FALSE(st.ok()) << needle;
        EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
    };
    bad([](MakeModelOptions& o) { o.heads = 3; }, "--kv-heads");
    bad([](MakeModelOptions& o) { o.top_k = 9; }, "--top-k");
    bad([](MakeModelOptions& o) { o.type = "tq1_0"; }, "tq1_0");
    bad([](MakeModelOptions& o) { o.arch = "llama9"; }, "llama9");
    bad([](MakeModelOptions& o) { o.out = ""; }, "--out");
    bad([](MakeModelOptions& o) { o.head_dim = 33; }, "--head-dim");
    bad([](MakeModelOptions& o) { o.vocab = 100; }, "vocab");  // builtin tokenizer needs >= 259
    bad([](MakeModelOptions& o) { o.router_skew = -1; }, "--router-skew");
}

TEST_F(MakeModelTest, CommandLine) {
    CLI::App app;
    register_make_model_command(app);
    const std::string out = path("cli.gguf");
    std::vector<std::string> args = {"moemesh", "make-model", "--out", out,  "--layers", "1", "--hidden",
                                     "128",     "--heads",    "2",     "--kv-heads", "2", "--head-dim", "32",
                                     "--experts", "4",        "--top-k", "2", "--expert-ff", "64", "--vocab",
                                     "320",     "--type",     "q8_0",  "--seed", "3", "--tied"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    app.parse(static_cast<int>(argv.size()), argv.data());
    auto r = GgufFile::open(out);
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r.value()->get_int_or("qwen3moe.block_count", 0), 1);
    EXPECT_EQ(r.value()->get_int_or("general.file_type", 0), 7);
    EXPECT_EQ(r.value()->tensor("output.weight"), nullptr);
    EXPECT_EQ(r.value()->tensor("token_embd.weight")->ne[1], 320);
}

// ---- llama.cpp on the same file ----

std::string find_node() {
    const char* p = std::getenv("PATH");
    std::stringstream ss(p ? p : "");
    std::string d;
    while (std::getline(ss, d, ':')) {
        const std::string c = d + "/node";
        if (!d.empty() && access(c.c_str(), X_OK) == 0) return c;
    }
    return "";
}

struct RunResult {
    int rc = -1;
    std::string out, err;
};

RunResult run_ref(const std::string& args, const std::string& err_path) {
    const std::string cmd = find_node() + " " MOEMESH_SOURCE_DIR "/tests/ref/llama_ref.mjs " + args + " 2>" + err_path;
    RunResult r;
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return r;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
    const int st = pclose(p);
    r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    r.err = read_file(err_path);
    return r;
}

class LlamaCppLoads : public MakeModelTest {
protected:
    void SetUp() override {
        const std::string why = testing::reference_unavailable();
        if (!why.empty()) GTEST_SKIP() << why;
    }

    // llama.cpp loads the file, agrees on sizes, and its next-token distribution is a real one.
    // n_params < 0: skip `info` (each node start costs ~2 s).
    void check_llama(const MakeModelOptions& o, int64_t vocab, int64_t n_params) {
        const std::string err = o.out + ".stderr";
        if (n_params >= 0) check_info(o, vocab, n_params, err);
        check_probs(o, vocab, err);
    }

    void check_info(const MakeModelOptions& o, int64_t vocab, int64_t n_params, const std::string& err) {
        RunResult info = run_ref("info --model " + o.out, err);
        ASSERT_EQ(info.rc, 0) << info.err;
        auto j = nlohmann::json::parse(info.out);
        EXPECT_EQ(j["architecture"], o.arch);
        EXPECT_EQ(j["n_vocab"], vocab);
        EXPECT_EQ(j["train_ctx"], o.context);
        EXPECT_EQ(j["n_embd"], o.hidden);
        if (n_params > 0) {
            EXPECT_EQ(j["n_params"], n_params);
        }
    }

    void check_probs(const MakeModelOptions& o, int64_t vocab, const std::string& err) {

        const std::string ids = "1,17,250,3,99,42,7";
        RunResult probs = run_ref("probs --model " + o.out + " --tokens " + ids + " --top " + std::to_string(vocab) +
                                      " -n 4 --threads 1",
                                  err);
        ASSERT_EQ(probs.rc, 0) << probs.err;
        auto p = nlohmann::json::parse(probs.out);
        ASSERT_EQ(p["positions"].size(), 7u);
        double max_seen = 0;
        for (const auto& pos : p["positions"]) {
            ASSERT_EQ(pos["top"].size(), static_cast<size_t>(vocab));
            double sum = 0, mx = 0, prev = 2;
            for (const auto& e : pos["top"]) {
                const double pr = e[1].get<double>();
                EXPECT_LE(pr, prev);  // sorted
                prev = pr;
                sum += pr;
                mx = std::max(mx, pr);
            }
            EXPECT_NEAR(sum, 1.0, 1e-6) << "pos " << pos["pos"];
            EXPECT_LT(mx, 0.9) << "pos " << pos["pos"] << ": distribution is nearly one-hot";
            max_seen = std::max(max_seen, mx);
        }
        EXPECT_GT(max_seen, 5.0 / vocab) << "distributions are nearly uniform";
        ASSERT_EQ(p["greedy"].size(), 4u);
        EXPECT_EQ(p["greedy"][0], p["positions"][6]["top"][0][0]);  // greedy starts with the argmax
    }
};

int64_t count_params(const MakeModelOptions& o) {
    auto r = GgufFile::open(o.out);
    if (!r.ok()) return -1;
    int64_t n = 0;
    for (const auto& t : r.value()->tensors()) n += t.nelements();
    return n;
}

TEST_F(LlamaCppLoads, ShapeAF32) {
    auto o = shape_a(path("llama_a_f32.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, kDefaultBuiltinVocab, count_params(o));
}

TEST_F(LlamaCppLoads, ShapeBF32Tied) {
    auto o = shape_b(path("llama_b_f32.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, 300, 0);
}

TEST_F(LlamaCppLoads, ShapeAQ8_0) {
    auto o = shape_a(path("llama_a_q8_0.gguf"), "q8_0");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, kDefaultBuiltinVocab, -1);
}

TEST_F(LlamaCppLoads, ShapeAQ4_K) {
    auto o = shape_a(path("llama_a_q4_k.gguf"), "q4_k");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, kDefaultBuiltinVocab, count_params(o));
}

TEST_F(LlamaCppLoads, ShapeBQ4_KFallbacks) {
    auto o = shape_b(path("llama_b_q4_k.gguf"), "q4_k");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, 300, -1);
}


// ---- qwen3next ----

MakeModelOptions next_a(const std::string& out, const std::string& type) {
    MakeModelOptions o;  // H 256, 4/2 heads of 64, 8 experts top-2, I 256; Hk 2, Hv 4, dk 64, K 4
    o.arch = "qwen3next";
    o.out = out;
    o.type = type;
    o.layers = 8;  // full attention at 3 and 7
    return o;
}

MakeModelOptions next_b(const std::string& out, const std::string& type) {
    MakeModelOptions o = next_a(out, type);
    o.layers = 5;
    o.hidden = 128;
    o.heads = 2;
    o.kv_heads = 1;
    o.head_dim = 32;
    o.experts = 6;
    o.top_k = 3;
    o.expert_ff = 96;
    o.shared_ff = 160;
    o.vocab = 300;
    o.seed = 9;
    o.ssm_k_heads = 1;
    o.ssm_v_heads = 3;
    o.ssm_head_dim = 32;
    o.conv_kernel = 3;
    o.rope_dim = 12;
    o.recurrent_layers = "0,1,1,0,1";
    o.tied_embeddings = true;
    return o;
}

// The schedule as llama.cpp's qwen3next loader derives it, spelled out independently of make-model.
std::vector<bool> expected_recurrent(const MakeModelOptions& o) {
    std::vector<bool> rec;
    if (!o.recurrent_layers.empty()) {
        for (char c : o.recurrent_layers)
            if (c == '0' || c == '1') rec.push_back(c == '1');
        return rec;
    }
    for (int i = 0; i < o.layers; ++i) rec.push_back((i + 1) % o.full_attention_interval != 0);
    return rec;
}

// Every key, tensor name, shape and type of a qwen3next file against the options.
void check_next_file(const MakeModelOptions& o, int64_t vocab) {
    auto r = GgufFile::open(o.out);
    ASSERT_TRUE(r.ok()) << r.status().message();
    const GgufFile& f = *r.value();
    const Arch a = Arch::kQwen3Next;
    auto u = [&](Kv k) { return f.get_int_or(kv_name(k, a), -1); };
    const int64_t H = o.hidden, V = vocab, E = o.experts, I = o.expert_ff, D = o.head_dim;
    const int64_t Q = o.heads * D, KV = o.kv_heads * D, S = o.shared_ff > 0 ? o.shared_ff : o.expert_ff;
    const int64_t Hk = o.ssm_k_heads, Hv = o.ssm_v_heads, dk = o.ssm_head_dim, K = o.conv_kernel;
    const int64_t conv_dim = 2 * Hk * dk + Hv * dk;
    EXPECT_EQ(f.get_string_or(kv_name(Kv::kGeneralArchitecture, a), ""), "qwen3next");
    EXPECT_EQ(u(Kv::kBlockCount), o.layers);
    EXPECT_EQ(u(Kv::kEmbeddingLength), o.hidden);
    EXPECT_EQ(u(Kv::kAttentionHeadCount), o.heads);
    EXPECT_EQ(u(Kv::kAttentionHeadCountKv), o.kv_heads);
    EXPECT_EQ(u(Kv::kAttentionKeyLength), D);
    EXPECT_EQ(u(Kv::kAttentionValueLength), D);
    EXPECT_EQ(u(Kv::kExpertCount), E);
    EXPECT_EQ(u(Kv::kExpertUsedCount), o.top_k);
    EXPECT_EQ(u(Kv::kExpertFeedForwardLength), I);
    EXPECT_EQ(u(Kv::kExpertSharedFeedForwardLength), S);
    EXPECT_EQ(u(Kv::kSsmConvKernel), K);
    EXPECT_EQ(u(Kv::kSsmStateSize), dk);
    EXPECT_EQ(u(Kv::kSsmGroupCount), Hk);
    EXPECT_EQ(u(Kv::kSsmTimeStepRank), Hv);
    EXPECT_EQ(u(Kv::kSsmInnerSize), Hv * dk);
    EXPECT_EQ(u(Kv::kRopeDimensionCount), o.rope_dim > 0 ? o.rope_dim : D / 4);
    EXPECT_NEAR(f.get_float_or(kv_name(Kv::kAttentionLayerNormRmsEps, a), 0), o.rms_eps, 1e-12);
    for (Kv k : {Kv::kSsmConvKernel, Kv::kSsmStateSize, Kv::kSsmGroupCount, Kv::kSsmTimeStepRank, Kv::kSsmInnerSize,
                 Kv::kExpertSharedFeedForwardLength, Kv::kRopeDimensionCount})
        EXPECT_EQ(f.find(kv_name(k, a))->type, GgufType::UINT32) << kv_name(k, a);

    const std::vector<bool> rec = expected_recurrent(o);
    ASSERT_EQ(static_cast<int>(rec.size()), o.layers);
    const GgufValue* arr = f.find(kv_name(Kv::kAttentionRecurrentLayers, a));
    const GgufValue* interval = f.find(kv_name(Kv::kFullAttentionInterval, a));
    if (o.recurrent_layers.empty()) {
        EXPECT_EQ(arr, nullptr);
        ASSERT_NE(interval, nullptr);
        EXPECT_EQ(interval->type, GgufType::UINT32);
        EXPECT_EQ(interval->i, o.full_attention_interval);
    } else {
        EXPECT_EQ(interval, nullptr);  // the array replaces the interval
        ASSERT_NE(arr, nullptr);
        ASSERT_EQ(arr->type, GgufType::ARRAY);
        EXPECT_EQ(arr->arr_type, GgufType::BOOL);
        ASSERT_EQ(arr->arr_i.size(), rec.size());
        for (size_t i = 0; i < rec.size(); ++i) EXPECT_EQ(arr->arr_i[i] != 0, rec[i]) << "layer " << i;
    }

    GgmlType wt;
    ASSERT_TRUE(ggml_type_from_name(o.type, &wt));
    struct Want {
        std::string name;
        std::vector<int64_t> ne;
        GgmlType type;
    };
    std::vector<Want> want;
    auto mat = [&](Tensor t, int l, std::vector<int64_t> ne, GgmlType type) {
        want.push_back({tensor_name(t, l), ne, expect_matrix_type(type, ne[0])});
    };
    auto vec = [&](Tensor t, int l, int64_t n, const char* suffix = "weight") {
        want.push_back({tensor_name(t, l, suffix), {n}, GgmlType::F32});
    };
    mat(Tensor::kTokenEmbd, -1, {H, V}, wt);
    for (int l = 0; l < o.layers; ++l) {
        vec(Tensor::kAttnNorm, l, H);
        if (rec[static_cast<size_t>(l)]) {
            if (o.qkvz_layout == "legacy") {
                mat(Tensor::kSsmIn, l, {H, 2 * Hk * dk + 2 * Hv * dk}, wt);
            } else {
                mat(Tensor::kAttnQkv, l, {H, conv_dim}, wt);
                mat(Tensor::kAttnGate, l, {H, Hv * dk}, wt);
            }
            mat(Tensor::kSsmConv1d, l, {K, conv_dim}, GgmlType::F32);  // never quantized
            vec(Tensor::kSsmDt, l, Hv, "bias");
            vec(Tensor::kSsmA, l, Hv, "");
            mat(Tensor::kSsmBa, l, {H, 2 * Hv}, wt);
            vec(Tensor::kSsmNorm, l, dk);
            mat(Tensor::kSsmOut, l, {Hv * dk, H}, wt);
        } else {
            mat(Tensor::kAttnQ, l, {H, 2 * Q}, wt);
            mat(Tensor::kAttnK, l, {H, KV}, wt);
            mat(Tensor::kAttnV, l, {H, KV}, wt);
            mat(Tensor::kAttnOutput, l, {Q, H}, wt);
            vec(Tensor::kAttnQNorm, l, D);
            vec(Tensor::kAttnKNorm, l, D);
        }
        vec(Tensor::kAttnPostNorm, l, H);
        mat(Tensor::kFfnGateInp, l, {H, E}, GgmlType::F32);
        mat(Tensor::kFfnGateExps, l, {H, I, E}, wt);
        mat(Tensor::kFfnUpExps, l, {H, I, E}, wt);
        mat(Tensor::kFfnDownExps, l, {I, H, E}, wt);
        vec(Tensor::kFfnGateInpShexp, l, H);
        mat(Tensor::kFfnGateShexp, l, {H, S}, wt);
        mat(Tensor::kFfnUpShexp, l, {H, S}, wt);
        mat(Tensor::kFfnDownShexp, l, {S, H}, wt);
    }
    vec(Tensor::kOutputNorm, -1, H);
    if (!o.tied_embeddings) mat(Tensor::kOutput, -1, {H, V}, wt);

    ASSERT_EQ(f.tensors().size(), want.size());
    for (const Want& w : want) {
        const GgufTensor* t = f.tensor(w.name);
        ASSERT_NE(t, nullptr) << w.name;
        ASSERT_EQ(t->n_dims, static_cast<int>(w.ne.size())) << w.name;
        for (size_t d = 0; d < w.ne.size(); ++d) EXPECT_EQ(t->ne[d], w.ne[d]) << w.name << " dim " << d;
        EXPECT_EQ(t->type, w.type) << w.name << ": " << ggml_type_name(t->type) << " vs " << ggml_type_name(w.type);
    }

    // The DeltaNet parameters are in the ranges the scales promise (all F32 whatever the type).
    const int l = static_cast<int>(std::find(rec.begin(), rec.end(), true) - rec.begin());
    if (l < o.layers) {
        auto floats = [&](const std::string& name) {
            const GgufTensor* t = f.tensor(name);
            const float* p = reinterpret_cast<const float*>(t->data);
            return std::vector<float>(p, p + t->nelements());
        };
        for (float x : floats(tensor_name(Tensor::kSsmA, l, ""))) {
            EXPECT_LE(x, 0.0f);  // -exp(A_log), A ~ U(0, 16)
            EXPECT_GE(x, -16.0f);
        }
        for (float x : floats(tensor_name(Tensor::kSsmDt, l, "bias"))) {
            EXPECT_GE(x, std::log(std::expm1(1e-3)) - 1e-3);  // softplus⁻¹(dt), dt in [1e-3, 0.1]
            EXPECT_LE(x, std::log(std::expm1(0.1)) + 1e-3);
        }
        double mean = 0;
        const std::vector<float> norm = floats(tensor_name(Tensor::kSsmNorm, l));
        for (float x : norm) mean += x;
        EXPECT_NEAR(mean / static_cast<double>(norm.size()), 1.0, 0.1);
        double s2 = 0;
        const std::vector<float> conv = floats(tensor_name(Tensor::kSsmConv1d, l));
        for (float x : conv) s2 += double(x) * x;
        EXPECT_NEAR(std::sqrt(s2 / static_cast<double>(conv.size()) * K), 1.0, 0.15);  // N(0, 1/K)
    }
}

TEST_F(MakeModelTest, Qwen3NextShapes) {
    for (const char* t : {"f32", "f16", "q8_0", "q4_k"}) {
        for (const char* layout : {"split", "legacy"}) {
            SCOPED_TRACE(std::string(t) + " " + layout);
            auto o = next_a(path(std::string("next_a_") + t + "_" + layout + ".gguf"), t);
            o.layers = 4;  // 3 DeltaNet + 1 full attention
            o.qkvz_layout = layout;
            Status st = make(o);
            ASSERT_TRUE(st.ok()) << st.message();
            check_next_file(o, kDefaultBuiltinVocab);
        }
    }
    // Shape B: explicit schedule (array key), Hk 1 / Hv 3, tied, rows of 96/128/160 (K-quants fall back).
    for (const char* t : {"f32", "q4_k"}) {
        SCOPED_TRACE(t);
        auto o = next_b(path(std::string("next_b_") + t + ".gguf"), t);
        std::ostringstream log;
        Status st = make_model(o, log);
        ASSERT_TRUE(st.ok()) << st.message();
        check_next_file(o, 300);
        if (std::string(t) == "q4_k") {
            const char* want = "blk.1.ssm_out.weight: row length 96 is not a multiple of q4_k";
            EXPECT_NE(log.str().find(want), std::string::npos) << log.str();
        }
    }
}

TEST_F(MakeModelTest, Qwen3NextSchedule) {
    auto full_layers = [&](const MakeModelOptions& o) {
        auto r = GgufFile::open(o.out);
        std::vector<int> full;
        if (!r.ok()) return full;
        for (int l = 0; l < o.layers; ++l)
            if (r.value()->tensor(tensor_name(Tensor::kAttnQ, l))) full.push_back(l);
        return full;
    };
    auto o = next_a(path("sched.gguf"), "f32");
    o.experts = 2;
    o.top_k = 1;
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(full_layers(o), (std::vector<int>{3, 7}));
    check_next_file(o, kDefaultBuiltinVocab);
    o.full_attention_interval = 3;
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(full_layers(o), (std::vector<int>{2, 5}));
    check_next_file(o, kDefaultBuiltinVocab);
    o.recurrent_layers = "0, 1,1,1,0,0,1,1";
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(full_layers(o), (std::vector<int>{0, 4, 5}));
    check_next_file(o, kDefaultBuiltinVocab);
    o.recurrent_layers = "1,1,1,1,1,1,1,1";  // no full-attention layer at all
    ASSERT_TRUE(make(o).ok());
    EXPECT_TRUE(full_layers(o).empty());
}

// The split layout is the legacy ssm_in de-interleaved, row for row, as convert_hf_to_gguf.py does it:
// per k-head group g the legacy rows are [q_g dk | k_g dk | v_g r*dv | z_g r*dv]; attn_qkv is
// [all q | all k | all v] and attn_gate all z. Everything else is byte-identical.
TEST_F(MakeModelTest, Qwen3NextSplitIsDeinterleavedLegacy) {
    for (const char* t : {"f32", "q8_0"}) {
        SCOPED_TRACE(t);
        auto o = next_b(path(std::string("split_") + t + ".gguf"), t);
        ASSERT_TRUE(make(o).ok());
        auto legacy = o;
        legacy.out = path(std::string("legacy_") + t + ".gguf");
        legacy.qkvz_layout = "legacy";
        ASSERT_TRUE(make(legacy).ok());
        auto fs_ = GgufFile::open(o.out);
        auto fl = GgufFile::open(legacy.out);
        ASSERT_TRUE(fs_.ok() && fl.ok());
        const GgufFile& s = *fs_.value();
        const GgufFile& g = *fl.value();
        const int64_t Hk = o.ssm_k_heads, dk = o.ssm_head_dim, r = o.ssm_v_heads / o.ssm_k_heads, dv = dk;
        int checked = 0;
        for (int l = 0; l < o.layers; ++l) {
            const GgufTensor* in = g.tensor(tensor_name(Tensor::kSsmIn, l));
            const GgufTensor* qkv = s.tensor(tensor_name(Tensor::kAttnQkv, l));
            const GgufTensor* z = s.tensor(tensor_name(Tensor::kAttnGate, l));
            if (!in) {
                EXPECT_EQ(qkv, nullptr);
                continue;
            }
            ASSERT_NE(qkv, nullptr);
            ASSERT_NE(z, nullptr);
            const size_t rb = ggml_row_bytes(in->type, in->ne[0]);
            auto row = [&](const GgufTensor* t, int64_t i) {
                return std::string(reinterpret_cast<const char*>(t->data) + i * rb, rb);
            };
            const int64_t group = 2 * dk + 2 * r * dv;
            for (int64_t k = 0; k < Hk; ++k) {
                for (int64_t i = 0; i < dk; ++i) {
                    EXPECT_EQ(row(qkv, k * dk + i), row(in, k * group + i));
                    EXPECT_EQ(row(qkv, Hk * dk + k * dk + i), row(in, k * group + dk + i));
                }
                for (int64_t i = 0; i < r * dv; ++i) {
                    EXPECT_EQ(row(qkv, 2 * Hk * dk + k * r * dv + i), row(in, k * group + 2 * dk + i));
                    EXPECT_EQ(row(z, k * r * dv + i), row(in, k * group + 2 * dk + r * dv + i));
                }
            }
            ++checked;
        }
        EXPECT_EQ(checked, 3);
        for (const auto& t : g.tensors()) {
            if (t.name.find("ssm_in") != std::string::npos) continue;
            const GgufTensor* u = s.tensor(t.name);
            ASSERT_NE(u, nullptr) << t.name;
            ASSERT_EQ(u->nbytes, t.nbytes) << t.name;
            EXPECT_EQ(std::memcmp(u->data, t.data, t.nbytes), 0) << t.name;
        }
    }
}

TEST_F(MakeModelTest, Qwen3NextDeterministicInSeed) {
    auto o = next_b(path("ndet1.gguf"), "q8_0");
    ASSERT_TRUE(make(o).ok());
    o.out = path("ndet2.gguf");
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(read_file(path("ndet1.gguf")), read_file(path("ndet2.gguf")));
    o.out = path("ndet3.gguf");
    o.seed = 10;
    ASSERT_TRUE(make(o).ok());
    EXPECT_NE(read_file(path("ndet1.gguf")), read_file(path("ndet3.gguf")));
}

TEST_F(MakeModelTest, Qwen3NextRejectsBadOptions) {
    auto bad = [&](auto edit, const char* needle) {
        auto o = next_a(path("nbad.gguf"), "f32");
        edit(o);
        Status st = make(o);
        EXPECT_FALSE(st.ok()) << needle;
        EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
    };
    bad([](MakeModelOptions& o) { o.ssm_v_heads = 5; }, "--ssm-v-heads 5 is not a multiple of --ssm-k-heads 2");
    bad([](MakeModelOptions& o) { o.ssm_k_heads = 0; }, "--ssm-k-heads must be positive");
    bad([](MakeModelOptions& o) { o.rope_dim = 66; }, "--rope-dim 66 must be in [2, --head-dim 64]");
    bad([](MakeModelOptions& o) { o.rope_dim = 7; }, "--rope-dim 7 must be even");
    bad([](MakeModelOptions& o) { o.head_dim = 36; }, "--rope-dim 9 (the default, head_dim/4; give --rope-dim)");
    bad([](MakeModelOptions& o) { o.conv_kernel = 1; }, "--conv-kernel must be at least 2");
    bad([](MakeModelOptions& o) { o.full_attention_interval = 0; }, "--full-attention-interval must be positive");
    bad([](MakeModelOptions& o) { o.recurrent_layers = "1,1,0"; }, "has 3 entries but there are 8 layers");
    bad([](MakeModelOptions& o) { o.recurrent_layers = "1,1,1,2,1,1,1,0"; }, "entry 3 is '2'");
    bad([](MakeModelOptions& o) { o.qkvz_layout = "fused"; }, "--qkvz-layout 'fused'");
    bad([](MakeModelOptions& o) { o.shared_ff = -1; }, "--shared-ff");
    bad([](MakeModelOptions& o) { o.heads = 3; }, "--kv-heads");
}

TEST_F(MakeModelTest, Qwen3NextCommandLine) {
    auto parse = [](std::vector<std::string> args) {
        CLI::App app;
        register_make_model_command(app);
        args.insert(args.begin(), {"moemesh", "make-model"});
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        app.parse(static_cast<int>(argv.size()), argv.data());
    };
    const std::string out = path("ncli.gguf");
    parse({"--arch", "qwen3next", "--out", out, "--experts", "4", "--type", "q8_0", "--shared-ff", "64",
           "--ssm-k-heads", "1", "--ssm-v-heads", "2", "--ssm-head-dim", "32", "--conv-kernel", "3", "--rope-dim",
           "8", "--qkvz-layout", "legacy"});
    {
        auto r = GgufFile::open(out);
        ASSERT_TRUE(r.ok()) << r.status().message();
        const GgufFile& f = *r.value();
        EXPECT_EQ(f.get_int_or("qwen3next.block_count", 0), kDefaultQwen3NextLayers);  // default for qwen3next
        EXPECT_EQ(f.get_int_or("qwen3next.full_attention_interval", 0), 4);
        EXPECT_EQ(f.get_int_or("qwen3next.expert_shared_feed_forward_length", 0), 64);
        EXPECT_EQ(f.get_int_or("qwen3next.ssm.conv_kernel", 0), 3);
        EXPECT_EQ(f.get_int_or("qwen3next.ssm.inner_size", 0), 64);
        EXPECT_EQ(f.get_int_or("qwen3next.rope.dimension_count", 0), 8);
        EXPECT_NE(f.tensor("blk.0.ssm_in.weight"), nullptr);
        EXPECT_NE(f.tensor("blk.3.attn_q.weight"), nullptr);
    }
    parse({"--arch", "qwen3next", "--out", out, "--layers", "3", "--experts", "4", "--recurrent-layers", "1,0,1"});
    auto r = GgufFile::open(out);
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r.value()->get_int_or("qwen3next.block_count", 0), 3);
    EXPECT_FALSE(r.value()->has("qwen3next.full_attention_interval"));
    EXPECT_NE(r.value()->tensor("blk.1.attn_q.weight"), nullptr);
    EXPECT_NE(r.value()->tensor("blk.2.attn_qkv.weight"), nullptr);
    EXPECT_THROW(parse({"--arch", "qwen3next", "--out", out, "--full-attention-interval", "2", "--recurrent-layers",
                        "1,0,1,0"}),
                 CLI::ExcludesError);
    EXPECT_THROW(parse({"--arch", "qwen3next", "--out", out, "--qkvz-layout", "zz"}), CLI::ValidationError);
}

// llama.cpp loads every variant and gives a real distribution; the legacy and the split layout of one
// seed are one model, so llama.cpp's probabilities agree (this checks the de-interleave end to end).
TEST_F(LlamaCppLoads, Qwen3NextF32) {
    auto o = next_a(path("llama_next_f32.gguf"), "f32");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, kDefaultBuiltinVocab, count_params(o));
}

TEST_F(LlamaCppLoads, Qwen3NextQ4_KLegacy) {
    auto o = next_a(path("llama_next_q4_k.gguf"), "q4_k");
    o.qkvz_layout = "legacy";
    ASSERT_TRUE(make(o).ok());
    check_llama(o, kDefaultBuiltinVocab, -1);
}

TEST_F(LlamaCppLoads, Qwen3NextRecurrentLayersArrayTied) {
    auto o = next_b(path("llama_next_b_q8_0.gguf"), "q8_0");
    ASSERT_TRUE(make(o).ok());
    check_llama(o, 300, 0);
}

TEST_F(LlamaCppLoads, Qwen3NextLegacyAndSplitAgree) {
    for (const char* t : {"f32", "q8_0"}) {
        SCOPED_TRACE(t);
        auto split = next_a(path(std::string("agree_split_") + t + ".gguf"), t);
        split.experts = 16;
        split.top_k = 4;
        split.seed = 123;
        auto legacy = split;
        legacy.out = path(std::string("agree_legacy_") + t + ".gguf");
        legacy.qkvz_layout = "legacy";
        ASSERT_TRUE(make(split).ok());
        ASSERT_TRUE(make(legacy).ok());
        const std::string args = " --tokens 1,17,250,3,99,42,7,300,12,5 --top 512 -n 4 --threads 1";
        RunResult a = run_ref("probs --model " + split.out + args, split.out + ".stderr");
        RunResult b = run_ref("probs --model " + legacy.out + args, legacy.out + ".stderr");
        ASSERT_EQ(a.rc, 0) << a.err;
        ASSERT_EQ(b.rc, 0) << b.err;
        auto pa = nlohmann::json::parse(a.out), pb = nlohmann::json::parse(b.out);
        ASSERT_EQ(pa["positions"].size(), 10u);
        ASSERT_EQ(pb["positions"].size(), 10u);
        double max_diff = 0, top_max = 0;
        for (size_t i = 0; i < 10; ++i) {
            std::map<int, double> pbm;
            for (const auto& e : pb["positions"][i]["top"]) pbm[e[0].get<int>()] = e[1].get<double>();
            for (const auto& e : pa["positions"][i]["top"])
                max_diff = std::max(max_diff, std::abs(e[1].get<double>() - pbm.at(e[0].get<int>())));
            top_max = std::max(top_max, pa["positions"][i]["top"][0][1].get<double>());
        }
        EXPECT_LT(max_diff, 1e-5);
        EXPECT_LT(top_max, 0.9);
        EXPECT_EQ(pa["greedy"], pb["greedy"]);
    }
}

}  // namespace
}  // namespace moemesh
