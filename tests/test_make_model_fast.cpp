// make-model --fast-weights (tools/fast_weights.h) and the streaming GGUF writer behind every
// make-model file (tools/gguf_stream_writer.h): the fast file loads, every tensor decodes to finite
// values of the scale the default path gives, Q4_K/Q8_0 blocks written directly decode as intended,
// moemesh and llama.cpp run it to the same sane distributions, the bytes depend on the seed only;
// the streaming writer writes exactly what GgufWriter does and reports bad use.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/half.h"
#include "kernels/ops.h"
#include "tests/parity_util.h"
#include "tests/test_util.h"
#include "tools/fast_weights.h"
#include "tools/gguf_stream_writer.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;
namespace fs = std::filesystem;

MakeModelOptions fast_opts(const std::string& out, const std::string& type) {
    MakeModelOptions o;  // 2 layers, H 256, 4/2 heads of 64, 8 experts top-2, I 256, vocab 512: rows of 256
    o.out = out;
    o.type = type;
    o.fast_weights = true;
    return o;
}

Status make(const MakeModelOptions& o) {
    std::ostringstream log;
    return make_model(o, log);
}

std::vector<float> decode(const GgufTensor& t) {
    std::vector<float> v(static_cast<size_t>(t.nelements()));
    const int64_t rows = t.nelements() / t.ne[0];
    const size_t row_bytes = ggml_row_bytes(t.type, t.ne[0]);
    for (int64_t r = 0; r < rows; ++r)
        dequantize_row(t.type, t.data + static_cast<size_t>(r) * row_bytes, v.data() + r * t.ne[0], t.ne[0]);
    return v;
}

// The std make-model draws a qwen3moe tensor with (make_model.cpp's scaling), 0 for the norms.
double expected_sigma(const std::string& name, const MakeModelOptions& o) {
    const double H = o.hidden, Q = o.heads * o.head_dim, I = o.expert_ff;
    auto ends = [&](const char* s) { return name.size() >= std::strlen(s) && name.rfind(s) == name.size() - std::strlen(s); };
    if (name == "token_embd.weight") return 1.0;
    if (name == "output.weight" || ends("ffn_gate_inp.weight")) return 2.0 / std::sqrt(H);
    if (ends("attn_output.weight")) return 1.0 / std::sqrt(Q);
    if (ends("ffn_down_exps.weight")) return 1.0 / std::sqrt(I);
    if (ends("attn_q.weight") || ends("attn_k.weight") || ends("attn_v.weight") || ends("ffn_gate_exps.weight") ||
        ends("ffn_up_exps.weight"))
        return 1.0 / std::sqrt(H);
    return 0;
}

class MakeModelFast : public ::testing::Test {
protected:
    void SetUp() override { dir_ = temp_dir("make_model_fast"); }
    std::string path(const std::string& n) const { return dir_ + "/" + n; }
    std::string dir_;
};

// Every tensor decodes to finite values; every matrix has mean ~0 and the std of the default path,
// with a bell's share within one std; norms stay 1 ± 10%.
TEST_F(MakeModelFast, TensorsAreFiniteAndOfTheDefaultScale) {
    for (const char* type : {"q4_k", "q8_0", "f32", "f16", "q4_0", "q6_k"}) {
        SCOPED_TRACE(type);
        const MakeModelOptions o = fast_opts(path(std::string("scale_") + type + ".gguf"), type);
        ASSERT_TRUE(make(o).ok());
        auto f = GgufFile::open(o.out);
        ASSERT_TRUE(f.ok()) << f.status().message();
        EXPECT_NE(f.value()->get_string_or("general.name", "").find("-fast"), std::string::npos);
        int matrices = 0;
        for (const GgufTensor& t : f.value()->tensors()) {
            SCOPED_TRACE(t.name);
            const std::vector<float> v = decode(t);
            double sum = 0, sum2 = 0;
            for (float x : v) {
                ASSERT_TRUE(std::isfinite(x));
                sum += x;
                sum2 += static_cast<double>(x) * x;
            }
            const double n = static_cast<double>(v.size()), mean = sum / n, rms = std::sqrt(sum2 / n);
            const double sigma = expected_sigma(t.name, o);
            if (sigma == 0) {  // norms: 1 ± 10%
                EXPECT_NEAR(mean, 1.0, 0.05);
                continue;
            }
            ++matrices;
            // q4_0 rounds to 16 levels of the row's max: its std is a few % off; the others ~1%.
            EXPECT_NEAR(rms / sigma, 1.0, std::string(type) == "q4_0" ? 0.12 : 0.04);
            EXPECT_LT(std::fabs(mean), 5 * sigma / std::sqrt(n));  // 5 standard errors
            // A bell's share within two std: a normal 0.954, fast Q4_K's 16 levels 0.959, uniform 1.
            size_t within = 0;
            for (float x : v) within += std::fabs(x - mean) <= 2 * rms;
            EXPECT_GT(within / n, 0.93);
            EXPECT_LT(within / n, 0.985);
        }
        EXPECT_EQ(matrices, 1 + 2 * 8 + 1);  // token_embd, 8 per layer, output
    }
}

// A directly written Q4_K block decodes (kernels' dequantize_row, ggml's layout) to 8d·(q - 7.5)
// with q in 0..15 in every one of the 8 sub-blocks, and all 16 levels occur; Q8_0 to d·q, |q| ≤ 127.
TEST_F(MakeModelFast, DirectBlocksDecodeAsDesigned) {
    const int64_t n = 32768;  // level 0 has p = 1/1024: seen ~32 times
    const float sigma = 0.25f;
    std::vector<uint8_t> q4(ggml_row_bytes(GgmlType::Q4_K, n)), q8(ggml_row_bytes(GgmlType::Q8_0, n));
    std::vector<float> x(static_cast<size_t>(n));
    fast_weights_row_direct(GgmlType::Q4_K, 77, sigma, q4.data(), n);
    dequantize_row(GgmlType::Q4_K, q4.data(), x.data(), n);
    uint16_t dh;
    std::memcpy(&dh, q4.data(), 2);
    const float step = 8.0f * fp16_to_fp32(dh);
    std::vector<int> seen(16, 0);
    for (int64_t i = 0; i < n; ++i) {
        const float q = x[static_cast<size_t>(i)] / step + 7.5f;
        const int qi = static_cast<int>(std::lround(q));
        ASSERT_NEAR(q, qi, 1e-3) << "element " << i << " (sub-block " << (i % 256) / 32 << ")";
        ASSERT_GE(qi, 0);
        ASSERT_LE(qi, 15);
        ++seen[static_cast<size_t>(qi)];
    }
    for (int l = 0; l < 16; ++l) EXPECT_GT(seen[static_cast<size_t>(l)], 0) << "level " << l;
    // q is a sum of five 2-bit values: a bell, 7 and 8 the commonest, 0 and 15 the rarest.
    EXPECT_GT(seen[7], 10 * seen[0]);
    EXPECT_GT(seen[8], 10 * seen[15]);

    fast_weights_row_direct(GgmlType::Q8_0, 78, sigma, q8.data(), n);
    dequantize_row(GgmlType::Q8_0, q8.data(), x.data(), n);
    double sum2 = 0;
    for (int64_t b = 0; b < n / 32; ++b) {
        std::memcpy(&dh, q8.data() + 34 * b, 2);
        const float d = fp16_to_fp32(dh);
        for (int j = 0; j < 32; ++j) {
            const float v = x[static_cast<size_t>(32 * b + j)];
            ASSERT_NEAR(v / d, std::lround(v / d), 1e-3);
            ASSERT_LE(std::fabs(v / d), 127.5f);
            sum2 += static_cast<double>(v) * v;
        }
    }
    EXPECT_NEAR(std::sqrt(sum2 / n) / sigma, 1.0, 0.05);
}

// Same seed → same bytes, whatever the thread count; another seed → other bytes; the default
// path's bytes differ (other generator) but its norms are the same draw.
TEST_F(MakeModelFast, DeterministicInSeedNotThreads) {
    MakeModelOptions o = fast_opts(path("det1.gguf"), "q4_k");
    o.threads = 1;
    ASSERT_TRUE(make(o).ok());
    o.out = path("det3.gguf");
    o.threads = 3;
    ASSERT_TRUE(make(o).ok());
    EXPECT_EQ(read_file(path("det1.gguf")), read_file(path("det3.gguf")));
    o.out = path("seed2.gguf");
    o.seed = 43;
    ASSERT_TRUE(make(o).ok());
    EXPECT_NE(read_file(path("det1.gguf")), read_file(path("seed2.gguf")));
    o = fast_opts(path("default.gguf"), "q4_k");
    o.fast_weights = false;
    ASSERT_TRUE(make(o).ok());
    auto a = GgufFile::open(path("det1.gguf"));
    auto b = GgufFile::open(path("default.gguf"));
    ASSERT_TRUE(a.ok() && b.ok());
    auto bytes = [](const GgufTensor* t) { return std::string(reinterpret_cast<const char*>(t->data), t->nbytes); };
    EXPECT_NE(bytes(a.value()->tensor("blk.0.ffn_up_exps.weight")), bytes(b.value()->tensor("blk.0.ffn_up_exps.weight")));
    EXPECT_EQ(bytes(a.value()->tensor("blk.0.attn_norm.weight")), bytes(b.value()->tensor("blk.0.attn_norm.weight")));
}

// --router-skew scales the fast router's rows too (row e's std by 1 + S/(rank+1)).
TEST_F(MakeModelFast, RouterSkewScalesFastRows) {
    MakeModelOptions o = fast_opts(path("skew.gguf"), "q8_0");
    o.router_skew = 8;
    ASSERT_TRUE(make(o).ok());
    auto f = GgufFile::open(o.out);
    ASSERT_TRUE(f.ok());
    const GgufTensor* t = f.value()->tensor("blk.0.ffn_gate_inp.weight");
    ASSERT_NE(t, nullptr);
    const std::vector<float> v = decode(*t);
    std::vector<double> rms;
    for (int64_t e = 0; e < t->ne[1]; ++e) {
        double s2 = 0;
        for (int64_t h = 0; h < t->ne[0]; ++h) s2 += std::pow(v[static_cast<size_t>(e * t->ne[0] + h)], 2);
        rms.push_back(std::sqrt(s2 / static_cast<double>(t->ne[0])) / (2.0 / std::sqrt(o.hidden)));
    }
    std::sort(rms.begin(), rms.end());
    EXPECT_NEAR(rms.back(), 9.0, 0.5);   // rank 0: 1 + 8
    EXPECT_NEAR(rms.front(), 2.0, 0.2);  // rank 7: 1 + 8/8
}

// qwen3next: every tensor of a fast file decodes to finite values, and the split layout is still the
// legacy ssm_in's rows de-interleaved (rows keep their seeds).
TEST_F(MakeModelFast, Qwen3NextFastFileIsFiniteAndSplitMatchesLegacy) {
    MakeModelOptions o = fast_opts(path("next_split.gguf"), "q8_0");
    o.arch = "qwen3next";
    o.layers = kDefaultQwen3NextLayers;
    ASSERT_TRUE(make(o).ok());
    MakeModelOptions l = o;
    l.out = path("next_legacy.gguf");
    l.qkvz_layout = "legacy";
    ASSERT_TRUE(make(l).ok());
    auto fs_ = GgufFile::open(o.out);
    auto fl = GgufFile::open(l.out);
    ASSERT_TRUE(fs_.ok() && fl.ok());
    for (const GgufTensor& t : fs_.value()->tensors()) {
        SCOPED_TRACE(t.name);
        for (float x : decode(t)) ASSERT_TRUE(std::isfinite(x));
    }
    // Layer 0 is DeltaNet: attn_qkv's first row (q of k-head 0) is ssm_in's row 0.
    const GgufTensor* qkv = fs_.value()->tensor("blk.0.attn_qkv.weight");
    const GgufTensor* in = fl.value()->tensor("blk.0.ssm_in.weight");
    ASSERT_TRUE(qkv && in);
    const size_t row = ggml_row_bytes(qkv->type, qkv->ne[0]);
    EXPECT_EQ(std::memcmp(qkv->data, in->data, row), 0);
}

// `moemesh run` on a fast file: finite, proper next-token distributions, neither one-hot nor flat.
TEST_F(MakeModelFast, RunGivesSaneDistributions) {
    for (const char* type : {"q4_k", "q8_0"}) {
        SCOPED_TRACE(type);
        const MakeModelOptions o = fast_opts(path(std::string("run_") + type + ".gguf"), type);
        ASSERT_TRUE(make(o).ok());
        std::string out;
        const std::string cmd = moemesh_bin() + " run --model " + o.out +
                                " --tokens 1,17,250,3,99,42,7 --top 512 -n 8 --json --threads 2";
        ASSERT_EQ(run_capture(cmd, &out, dir_ + "/run.err"), 0) << read_file(dir_ + "/run.err");
        const Result r = parse(out, "moemesh");
        ASSERT_EQ(r.probs.size(), 7u);
        double top_sum = 0;
        for (const auto& pos : r.probs) {
            double sum = 0, mx = 0;
            for (const auto& [id, p] : pos) {
                ASSERT_TRUE(std::isfinite(p));
                sum += p;
                mx = std::max(mx, p);
            }
            EXPECT_NEAR(sum, 1.0, 1e-4);
            top_sum += mx;
        }
        const double top_mean = top_sum / 7;
        EXPECT_LT(top_mean, 0.9) << "nearly one-hot: weights too loud";
        EXPECT_GT(top_mean, 5.0 / 512) << "nearly uniform: weights too quiet";
        ASSERT_EQ(r.greedy.size(), 8u);
        for (int id : r.greedy) EXPECT_TRUE(id >= 0 && id < 512);
    }
}

// llama.cpp reads the directly written blocks as we do: a one-layer fast file gives the same
// distributions on both sides (the bar of test_parity's EveryWeightTypeOneLayer).
TEST_F(MakeModelFast, LlamaCppAgreesOnFastFile) {
    const std::string why = reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "llama.cpp reference unavailable: " << why;
    for (const char* type : {"q4_k", "q8_0"}) {
        SCOPED_TRACE(type);
        MakeModelOptions o = fast_opts(path(std::string("llama_") + type + ".gguf"), type);
        o.layers = 1;
        o.experts = 16;
        o.top_k = 4;
        o.vocab = 1024;
        ASSERT_TRUE(make(o).ok());
        const Comparison c = run_pair(o.out, o.vocab, "f32", "", dir_, 16);
        EXPECT_LE(c.median_dp, 1e-5);
        EXPECT_LE(c.max_dp, 3e-3);
        EXPECT_EQ(c.greedy_prefix, 32);
    }
}

// ---- the streaming writer ----

GgufWriter sample_metadata(uint32_t alignment) {
    GgufWriter w;
    w.set_alignment(alignment);
    w.set_u32("a.u32", 7);
    w.set_i32("a.i32", -3);
    w.set_u64("a.u64", 1ull << 40);
    w.set_f32("a.f32", 0.5f);
    w.set_bool("a.bool", false);  // a trailing zero byte must not be taken for padding
    w.set_string("a.str", "hello");
    w.set_arr_string("a.strs", {"x", "", "yz"});
    w.set_arr_i32("a.i32s", {1, -2, 3});
    w.set_arr_f32("a.f32s", {1.5f});
    w.set_arr_bool("a.bools", {true, false, false});
    return w;
}

TEST_F(MakeModelFast, StreamWriterWritesWhatGgufWriterDoes) {
    for (uint32_t align : {32u, 64u, 8u}) {
        SCOPED_TRACE(align);
        GgufWriter whole = sample_metadata(align);
        GgufWriter meta = sample_metadata(align);
        std::vector<GgufStreamWriter::TensorInfo> table = {
            {"t.f32", GgmlType::F32, {5, 3}}, {"t.q8", GgmlType::Q8_0, {64, 2}}, {"t.one", GgmlType::F16, {3}}};
        std::vector<std::vector<uint8_t>> data;
        for (const auto& t : table) {
            std::vector<uint8_t> d(t.nbytes());
            for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(i * 31 + t.name.size());
            whole.add_tensor(t.name, t.type, t.ne, d);
            data.push_back(std::move(d));
        }
        const std::string p = path("stream_" + std::to_string(align) + ".gguf");
        auto w = GgufStreamWriter::create(p, meta, align, table);
        ASSERT_TRUE(w.ok()) << w.status().message();
        for (auto& d : data) ASSERT_TRUE(w.value()->write_next(std::move(d)).ok());
        ASSERT_TRUE(w.value()->finish().ok());
        const std::vector<uint8_t> want = whole.serialize();
        EXPECT_EQ(read_file(p), std::string(want.begin(), want.end()));
        EXPECT_FALSE(fs::exists(p + ".partial"));
        auto f = GgufFile::open(p);
        ASSERT_TRUE(f.ok()) << f.status().message();
        EXPECT_EQ(f.value()->tensors().size(), 3u);
    }
}

TEST_F(MakeModelFast, StreamWriterReportsBadUse) {
    const GgufWriter meta = sample_metadata(32);
    std::vector<GgufStreamWriter::TensorInfo> table = {{"t", GgmlType::F32, {4}}, {"u", GgmlType::F32, {2}}};
    const std::string p = path("bad.gguf");
    {
        auto w = GgufStreamWriter::create(p, meta, 32, table);
        ASSERT_TRUE(w.ok());
        Status st = w.value()->write_next(std::vector<uint8_t>(15));
        ASSERT_FALSE(st.ok());
        EXPECT_NE(st.message().find("tensor t has 15 bytes of data, its type and shape need 16"), std::string::npos)
            << st.message();
        ASSERT_TRUE(w.value()->write_next(std::vector<uint8_t>(16)).ok());
        st = w.value()->finish();
        ASSERT_FALSE(st.ok());
        EXPECT_NE(st.message().find("1 of 2 tensors written"), std::string::npos) << st.message();
    }
    EXPECT_FALSE(fs::exists(p));
    EXPECT_FALSE(fs::exists(p + ".partial"));  // an unfinished file is removed
    auto nodir = GgufStreamWriter::create(path("no/such/dir.gguf"), meta, 32, table);
    ASSERT_FALSE(nodir.ok());
    EXPECT_NE(nodir.status().message().find("cannot open for writing"), std::string::npos);
    // A header that has tensors, or is cut short, is no metadata header.
    GgufWriter with_tensor = sample_metadata(32);
    with_tensor.add_tensor("t", GgmlType::F32, {1}, std::vector<uint8_t>(4));
    EXPECT_FALSE(gguf_metadata_end(with_tensor.serialize()).ok());
    std::vector<uint8_t> cut = meta.serialize();
    auto full = gguf_metadata_end(cut);
    ASSERT_TRUE(full.ok());
    cut.resize(full.value() - 1);
    EXPECT_FALSE(gguf_metadata_end(cut).ok());
}

TEST_F(MakeModelFast, CommandLineFlags) {
    std::string out;
    const std::string p = path("cli.gguf");
    ASSERT_EQ(run_capture(moemesh_bin() + " make-model --out " + p + " --type q4_k --fast-weights --threads 3",
                          &out, dir_ + "/cli.err"),
              0)
        << read_file(dir_ + "/cli.err");
    const std::string err = read_file(dir_ + "/cli.err");
    EXPECT_NE(err.find("3 threads, fast weights"), std::string::npos) << err;
    EXPECT_NE(run_capture(moemesh_bin() + " make-model --out " + p + " --threads -1", &out, dir_ + "/cli.err"), 0);
    ASSERT_EQ(run_capture(moemesh_bin() + " make-model --help", &out), 0);
    EXPECT_NE(out.find("--fast-weights"), std::string::npos);
    EXPECT_NE(out.find("--threads"), std::string::npos);
}

// The i-quants (no quantizer in moemesh) are written with --fast-weights only: random grid indices
// and signs under d = σ / rms, so every matrix decodes to finite values of mean ~0 and std σ; the file
// names its type as llama-quantize would (general.file_type), a row that is no multiple of 256 falls
// back to IQ4_NL (as llama.cpp). Without --fast-weights, or as a norm type, they are refused with a clear message.
TEST_F(MakeModelFast, IqTypesNeedFastWeightsAndHaveTheDefaultScale) {
    const struct {
        const char* name;
        uint32_t file_type;
    } types[] = {{"iq3_s", 26}, {"iq3_xxs", 23}, {"iq2_xxs", 19}, {"iq2_xs", 20},
                 {"iq2_s", 28}, {"iq1_s", 24},   {"iq1_m", 31}};
    for (const auto& ty : types) {
        SCOPED_TRACE(ty.name);
        MakeModelOptions o = fast_opts(path(std::string("iq_") + ty.name + ".gguf"), ty.name);
        ASSERT_TRUE(make(o).ok());
        auto f = GgufFile::open(o.out);
        ASSERT_TRUE(f.ok()) << f.status().message();
        EXPECT_EQ(f.value()->get_int("general.file_type").value(), static_cast<int64_t>(ty.file_type));
        GgmlType want;
        ASSERT_TRUE(ggml_type_from_name(ty.name, &want));
        for (const GgufTensor& t : f.value()->tensors()) {
            SCOPED_TRACE(t.name);
            const double sigma = expected_sigma(t.name, o);
            if (sigma == 0 || t.name.find("ffn_gate_inp") != std::string::npos) continue;  // norms, F32 router
            EXPECT_EQ(t.type, want);
            const std::vector<float> v = decode(t);
            double sum = 0, sum2 = 0;
            for (float x : v) {
                ASSERT_TRUE(std::isfinite(x));
                sum += x;
                sum2 += static_cast<double>(x) * x;
            }
            const double n = static_cast<double>(v.size());
            EXPECT_NEAR(std::sqrt(sum2 / n) / sigma, 1.0, 0.04);
            EXPECT_LT(std::fabs(sum / n), 0.02 * sigma);
        }

        o.fast_weights = false;
        const Status st = make(o);
        ASSERT_FALSE(st.ok());
        EXPECT_NE(st.message().find(std::string(ty.name) + " has no quantizer in moemesh; use --fast-weights"),
                  std::string::npos)
            << st.message();
    }
    // Rows of 128 (expert_ff) are no multiple of the 256-element block: IQ4_NL there, as llama.cpp's
    // fallback for the i-quants.
    MakeModelOptions o = fast_opts(path("iq_fallback.gguf"), "iq2_xxs");
    o.expert_ff = 128;
    ASSERT_TRUE(make(o).ok());
    auto f = GgufFile::open(o.out);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f.value()->tensor("blk.0.ffn_down_exps.weight")->type, GgmlType::IQ4_NL);
    EXPECT_EQ(f.value()->tensor("blk.0.ffn_up_exps.weight")->type, GgmlType::IQ2_XXS);

    o.norm_type = "iq3_s";  // norms are 1-D and near one: no direct rows for them
    const Status st = make(o);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("--norm-type: unsupported weight type 'iq3_s'"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace moemesh
