// make-model: the file has the keys, tensor names, shapes and types llama.cpp expects, and
// llama.cpp itself (node-llama-cpp, tests/ref/llama_ref.mjs) loads it and gives a sane distribution.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/arch.h"
#include "common/gguf.h"
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
    bad([](MakeModelOptions& o) { o.type = "q5_k"; }, "q5_k");
    bad([](MakeModelOptions& o) { o.arch = "qwen3next"; }, "qwen3next");
    bad([](MakeModelOptions& o) { o.arch = "llama9"; }, "llama9");
    bad([](MakeModelOptions& o) { o.out = ""; }, "--out");
    bad([](MakeModelOptions& o) { o.head_dim = 33; }, "--head-dim");
    bad([](MakeModelOptions& o) { o.vocab = 100; }, "vocab");  // builtin tokenizer needs >= 259
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
        if (find_node().empty()) GTEST_SKIP() << "node is not on PATH: cannot run the llama.cpp reference";
        if (!fs::exists(MOEMESH_SOURCE_DIR "/tests/ref/node_modules/node-llama-cpp"))
            GTEST_SKIP() << "tests/ref/node_modules/node-llama-cpp is missing (cd tests/ref && npm ci)";
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
        EXPECT_EQ(j["architecture"], "qwen3moe");
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

}  // namespace
}  // namespace moemesh
