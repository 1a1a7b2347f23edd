// GGUF reader/writer: round trips of every metadata type, and bad files that must give clear
// errors (never a crash or an out-of-bounds read).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <random>

#include <unistd.h>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "coordinator/model.h"
#include "tests/gguf_split_util.h"

namespace moemesh {
namespace {

std::string tmp_path(const std::string& name) {
    return ::testing::TempDir() + "/" + std::to_string(getpid()) + "_" + name;
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<uint8_t> f32_bytes(size_t n, float v) {
    std::vector<float> x(n, v);
    std::vector<uint8_t> b(n * 4);
    std::memcpy(b.data(), x.data(), b.size());
    return b;
}

// A tiny but complete qwen3moe file built by hand; `skip_key` and `bad_shape_tensor` let tests break it.
struct TinyModel {
    int64_t H = 32, L = 2, Nh = 4, Nkv = 2, D = 8, E = 4, K = 2, I = 16, V = 64;
    std::string skip_key;
    std::string bad_shape_tensor;
};

GgufWriter tiny_writer(const TinyModel& m) {
    GgufWriter w;
    const std::string a = "qwen3moe";
    auto u32 = [&](Kv k, uint32_t v) {
        std::string key = kv_name(k, a);
        if (key != m.skip_key) w.set_u32(key, v);
    };
    w.set_string(kv_name(Kv::kGeneralArchitecture, a), a);
    u32(Kv::kContextLength, 256);
    u32(Kv::kEmbeddingLength, m.H);
    u32(Kv::kBlockCount, m.L);
    u32(Kv::kAttentionHeadCount, m.Nh);
    u32(Kv::kAttentionHeadCountKv, m.Nkv);
    u32(Kv::kAttentionKeyLength, m.D);
    u32(Kv::kAttentionValueLength, m.D);
    u32(Kv::kExpertCount, m.E);
    u32(Kv::kExpertUsedCount, m.K);
    u32(Kv::kExpertFeedForwardLength, m.I);
    if (kv_name(Kv::kAttentionLayerNormRmsEps, a) != m.skip_key)
        w.set_f32(kv_name(Kv::kAttentionLayerNormRmsEps, a), 1e-6f);
    w.set_f32(kv_name(Kv::kRopeFreqBase, a), 1e6f);
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 0.2f);
    auto add = [&](const std::string& name, std::vector<int64_t> ne) {
        if (name == m.bad_shape_tensor) ne[0] *= 2;
        size_t n = 1;
        for (int64_t x : ne) n *= static_cast<size_t>(x);
        std::vector<float> v(n);
        for (auto& x : v) x = nd(rng);
        std::vector<uint8_t> b(n * 4);
        std::memcpy(b.data(), v.data(), b.size());
        w.add_tensor(name, GgmlType::F32, ne, std::move(b));
    };
    add(tensor_name(Tensor::kTokenEmbd), {m.H, m.V});
    w.add_tensor(tensor_name(Tensor::kOutputNorm), GgmlType::F32, {m.H}, f32_bytes(m.H, 1.0f));
    add(tensor_name(Tensor::kOutput), {m.H, m.V});
    for (int il = 0; il < m.L; ++il) {
        w.add_tensor(tensor_name(Tensor::kAttnNorm, il), GgmlType::F32, {m.H}, f32_bytes(m.H, 1.0f));
        add(tensor_name(Tensor::kAttnQ, il), {m.H, m.Nh * m.D});
        add(tensor_name(Tensor::kAttnK, il), {m.H, m.Nkv * m.D});
        add(tensor_name(Tensor::kAttnV, il), {m.H, m.Nkv * m.D});
        add(tensor_name(Tensor::kAttnOutput, il), {m.Nh * m.D, m.H});
        w.add_tensor(tensor_name(Tensor::kAttnQNorm, il), GgmlType::F32, {m.D}, f32_bytes(m.D, 1.0f));
        w.add_tensor(tensor_name(Tensor::kAttnKNorm, il), GgmlType::F32, {m.D}, f32_bytes(m.D, 1.0f));
        w.add_tensor(tensor_name(Tensor::kFfnNorm, il), GgmlType::F32, {m.H}, f32_bytes(m.H, 1.0f));
        add(tensor_name(Tensor::kFfnGateInp, il), {m.H, m.E});
        add(tensor_name(Tensor::kFfnGateExps, il), {m.H, m.I, m.E});
        add(tensor_name(Tensor::kFfnUpExps, il), {m.H, m.I, m.E});
        add(tensor_name(Tensor::kFfnDownExps, il), {m.I, m.H, m.E});
    }
    return w;
}

std::string load_error(const std::vector<uint8_t>& bytes, const std::string& name) {
    std::string path = tmp_path(name);
    write_bytes(path, bytes);
    auto f = GgufFile::open(path);
    if (!f.ok()) return f.status().message();
    std::shared_ptr<GgufFile> sf(std::move(f).value());
    auto m = load_model(sf, ModelOptions{1, 512, true, {}});
    return m.ok() ? std::string() : m.status().message();
}

TEST(Gguf, RoundTripsEveryMetadataType) {
    GgufWriter w;
    w.set_u32("a.u32", 4000000000u);
    w.set_i32("a.i32", -7);
    w.set_u64("a.u64", 1ull << 40);
    w.set_f32("a.f32", 0.25f);
    w.set_bool("a.bool", true);
    w.set_string("a.str", std::string("h\0llo", 5));
    w.set_arr_string("a.astr", {"x", "", "zzz"});
    w.set_arr_i32("a.ai32", {1, -2, 3});
    w.set_arr_f32("a.af32", {0.5f, -1.5f});
    w.set_arr_bool("a.abool", {true, false});
    w.add_tensor("t", GgmlType::F32, {4, 2}, f32_bytes(8, 3.0f));
    w.set_alignment(64);
    std::vector<uint8_t> bytes = w.serialize();
    auto f = GgufFile::from_memory(bytes.data(), bytes.size(), "mem");
    ASSERT_TRUE(f.ok()) << f.status().message();
    const GgufFile& g = *f.value();
    EXPECT_EQ(g.version(), 3u);
    EXPECT_EQ(g.alignment(), 64u);
    EXPECT_EQ(g.get_int("a.u32").value(), 4000000000ll);
    EXPECT_EQ(g.get_int("a.i32").value(), -7);
    EXPECT_EQ(g.get_int("a.u64").value(), 1ll << 40);
    EXPECT_EQ(g.get_float("a.f32").value(), 0.25);
    EXPECT_TRUE(g.get_bool("a.bool").value());
    EXPECT_EQ(g.get_string("a.str").value(), std::string("h\0llo", 5));
    EXPECT_EQ(g.find("a.astr")->arr_str, (std::vector<std::string>{"x", "", "zzz"}));
    EXPECT_EQ(g.find("a.ai32")->arr_i, (std::vector<int64_t>{1, -2, 3}));
    EXPECT_EQ(g.find("a.af32")->arr_f, (std::vector<double>{0.5, -1.5}));
    EXPECT_EQ(g.find("a.abool")->arr_i, (std::vector<int64_t>{1, 0}));
    const GgufTensor* t = g.tensor("t");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->ne[0], 4);
    EXPECT_EQ(t->ne[1], 2);
    EXPECT_EQ(g.data_offset() % 64, 0u);
    float v;
    std::memcpy(&v, t->data + 7 * 4, 4);
    EXPECT_EQ(v, 3.0f);
    // Typed getters name the key and the type found.
    auto bad = g.get_string("a.u32");
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("'a.u32' should be a string, found uint32"), std::string::npos);
    EXPECT_NE(g.get_int("nope").status().message().find("missing required metadata key 'nope'"), std::string::npos);
}

TEST(Gguf, ReadsVersion2) {
    GgufWriter w;
    w.set_u32("k", 1);
    std::vector<uint8_t> b = w.serialize();
    b[4] = 2;  // same layout as v3 for little-endian files
    auto f = GgufFile::from_memory(b.data(), b.size(), "v2");
    ASSERT_TRUE(f.ok()) << f.status().message();
    EXPECT_EQ(f.value()->version(), 2u);
}

TEST(Gguf, TinyModelLoads) {
    EXPECT_EQ(load_error(tiny_writer(TinyModel{}).serialize(), "ok.gguf"), "");
}

// A model split as llama.cpp's gguf-split writes it opens from its first file with every tensor and the
// same bytes as the whole file, and loads. (Its fingerprint differs from the whole file's: it covers
// the split keys and where each tensor is, so a coordinator and workers must open the same files.)
TEST(GgufSplit, OpensFromTheFirstFileWithEveryTensor) {
    const std::string whole = tmp_path("whole.gguf");
    ASSERT_TRUE(tiny_writer(TinyModel{}).write(whole).ok());
    const std::string first = testing::write_gguf_split(whole, tmp_path("split"), 7);
    auto a = GgufFile::open(whole);
    auto b = GgufFile::open(first);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status().message();
    const GgufFile &fa = *a.value(), &fb = *b.value();
    EXPECT_EQ(fb.split_count(), 4u);  // 27 tensors, 7 per file
    EXPECT_EQ(fb.split_path(3), tmp_path("split") + "-00004-of-00004.gguf");
    EXPECT_GT(fb.total_size(), fb.file_size());
    ASSERT_EQ(fa.tensors().size(), fb.tensors().size());
    for (const GgufTensor& t : fa.tensors()) {
        const GgufTensor* u = fb.tensor(t.name);
        ASSERT_NE(u, nullptr) << t.name;
        EXPECT_EQ(u->nbytes, t.nbytes);
        EXPECT_EQ(0, std::memcmp(u->data, t.data, t.nbytes)) << t.name;
        // file_offset points at the same bytes in the split's own file.
        std::ifstream in(fb.split_path(u->split), std::ios::binary);
        in.seekg(static_cast<std::streamoff>(fb.file_offset(*u, u->data)));
        std::vector<char> head(std::min<size_t>(t.nbytes, 64));
        in.read(head.data(), static_cast<std::streamsize>(head.size()));
        EXPECT_EQ(0, std::memcmp(head.data(), t.data, head.size())) << t.name;
    }
    EXPECT_EQ(fb.get_string("general.architecture").value(), "qwen3moe");
    std::shared_ptr<GgufFile> sf(std::move(b).value());
    auto m = load_model(sf, ModelOptions{1, 512, true, {}});
    EXPECT_TRUE(m.ok()) << m.status().message();
}

// populate() maps every page of every split file (progress reaches the total), and a file cut short
// after it was opened gives an error naming it, not SIGBUS.
TEST(Gguf, PopulateMapsEveryFileAndReportsATruncatedOne) {
    const std::string whole = tmp_path("populate.gguf");
    ASSERT_TRUE(tiny_writer(TinyModel{}).write(whole).ok());
    const std::string first = testing::write_gguf_split(whole, tmp_path("populate-split"), 7);
    auto f = GgufFile::open(first);
    ASSERT_TRUE(f.ok()) << f.status().message();
    uint64_t last = 0, total = 0;
    Status st = f.value()->populate([&](uint64_t done, uint64_t all) {
        EXPECT_GT(done, last);
        last = done;
        total = all;
    });
    ASSERT_TRUE(st.ok()) << st.message();
    if (last == 0) GTEST_SKIP() << "this kernel has no MADV_POPULATE_READ (Linux 5.14+): nothing to check";
    EXPECT_EQ(last, f.value()->total_size());
    EXPECT_EQ(total, f.value()->total_size());

    const std::string cut = tmp_path("populate-cut.gguf");
    ASSERT_TRUE(tiny_writer(TinyModel{}).write(cut).ok());
    auto g = GgufFile::open(cut);
    ASSERT_TRUE(g.ok()) << g.status().message();
    ASSERT_GT(g.value()->file_size(), 8192u);
    ASSERT_EQ(0, truncate(cut.c_str(), 4096));  // the mapping now reaches past the end of the file
    st = g.value()->populate();
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find(cut + ": cannot read bytes"), std::string::npos) << st.message();
}

TEST(GgufSplit, BadSplitsNameTheFileAndWhatIsWrong) {
    const std::string whole = tmp_path("whole2.gguf");
    ASSERT_TRUE(tiny_writer(TinyModel{}).write(whole).ok());
    const std::string prefix = tmp_path("bad");
    const std::string first = testing::write_gguf_split(whole, prefix, 10);  // 27 tensors: 3 files
    auto err = [](const std::string& path) {
        auto f = GgufFile::open(path);
        return f.ok() ? std::string() : f.status().message();
    };
    EXPECT_EQ(err(first), "");
    // Opening another file than the first.
    EXPECT_NE(err(prefix + "-00002-of-00003.gguf").find("file 2 of a model split in 3; open the first one"),
              std::string::npos);
    // A missing part.
    const std::string third = prefix + "-00003-of-00003.gguf";
    ASSERT_EQ(std::rename(third.c_str(), (third + ".away").c_str()), 0);
    const std::string missing = err(first);
    EXPECT_NE(missing.find("split file 3 of 3"), std::string::npos) << missing;
    EXPECT_NE(missing.find("cannot open"), std::string::npos) << missing;
    ASSERT_EQ(std::rename((third + ".away").c_str(), third.c_str()), 0);
    // A part of another split in its place (split.no says 0 of 3).
    ASSERT_EQ(std::rename(first.c_str(), (first + ".keep").c_str()), 0);
    {
        std::ifstream src(first + ".keep", std::ios::binary);
        std::ofstream dst(prefix + "-00002-of-00003.gguf.x", std::ios::binary);
        dst << src.rdbuf();
    }
    ASSERT_EQ(std::rename((prefix + "-00002-of-00003.gguf").c_str(), (prefix + "-00002-of-00003.gguf.keep").c_str()), 0);
    ASSERT_EQ(std::rename((prefix + "-00002-of-00003.gguf.x").c_str(), (prefix + "-00002-of-00003.gguf").c_str()), 0);
    ASSERT_EQ(std::rename((first + ".keep").c_str(), first.c_str()), 0);
    const std::string wrong = err(first);
    EXPECT_NE(wrong.find("split.no 0 of split.count 3, expected 1 of 3"), std::string::npos) << wrong;
    ASSERT_EQ(std::rename((prefix + "-00002-of-00003.gguf.keep").c_str(), (prefix + "-00002-of-00003.gguf").c_str()), 0);
    // A first file not named as gguf-split names it.
    const std::string renamed = tmp_path("renamed.gguf");
    ASSERT_EQ(std::rename(first.c_str(), renamed.c_str()), 0);
    EXPECT_NE(err(renamed).find("must be named PREFIX-00001-of-00003.gguf"), std::string::npos) << err(renamed);
}

TEST(GgufBadInput, TruncatedFile) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    // Every truncation point gives an error, never a crash.
    for (size_t cut : {size_t(0), size_t(3), size_t(10), size_t(30), b.size() / 3, b.size() / 2, b.size() - 1}) {
        std::vector<uint8_t> c(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(cut));
        std::string err = load_error(c, "trunc.gguf");
        EXPECT_NE(err, "") << "cut at " << cut;
        EXPECT_NE(err.find("trunc.gguf"), std::string::npos) << err;
    }
    std::vector<uint8_t> c(b.begin(), b.end() - 100);
    std::string err = load_error(c, "trunc.gguf");
    EXPECT_NE(err.find("extends past the end of the file"), std::string::npos) << err;
    EXPECT_NE(err.find("truncated"), std::string::npos) << err;
}

TEST(GgufBadInput, BadMagic) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    b[0] = 'X';
    std::string err = load_error(b, "magic.gguf");
    EXPECT_NE(err.find("bad magic"), std::string::npos) << err;
    EXPECT_NE(err.find("byte offset 0"), std::string::npos) << err;
}

TEST(GgufBadInput, UnsupportedVersion) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    b[4] = 9;
    EXPECT_NE(load_error(b, "ver.gguf").find("unsupported GGUF version 9"), std::string::npos);
}

// Finds the byte offset of tensor `name`'s info record (its name string) in a serialized file.
size_t find_name(const std::vector<uint8_t>& b, const std::string& name) {
    std::vector<uint8_t> pat(8 + name.size());
    uint64_t len = name.size();
    std::memcpy(pat.data(), &len, 8);
    std::memcpy(pat.data() + 8, name.data(), name.size());
    auto it = std::search(b.begin(), b.end(), pat.begin(), pat.end());
    return it == b.end() ? std::string::npos : static_cast<size_t>(it - b.begin());
}

TEST(GgufBadInput, TensorOffsetPastEnd) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    const std::string name = tensor_name(Tensor::kOutput);
    size_t at = find_name(b, name);
    ASSERT_NE(at, std::string::npos);
    size_t off_at = at + 8 + name.size() + 4 + 2 * 8 + 4;  // n_dims, 2 dims, type
    uint64_t off = 1ull << 32;
    std::memcpy(&b[off_at], &off, 8);
    std::string err = load_error(b, "offset.gguf");
    EXPECT_NE(err.find("'" + name + "'"), std::string::npos) << err;
    EXPECT_NE(err.find("extends past the end of the file"), std::string::npos) << err;
}

TEST(GgufBadInput, UnknownTensorType) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    const std::string name = tensor_name(Tensor::kOutput);
    size_t at = find_name(b, name);
    size_t type_at = at + 8 + name.size() + 4 + 2 * 8;
    uint32_t t = 77;
    std::memcpy(&b[type_at], &t, 4);
    std::string err = load_error(b, "type.gguf");
    EXPECT_NE(err.find("unknown tensor type 77"), std::string::npos) << err;
    EXPECT_NE(err.find("byte offset " + std::to_string(type_at)), std::string::npos) << err;
}

TEST(GgufBadInput, HugeCountsAreRejectedBeforeAllocating) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    uint64_t huge = 1ull << 60;
    std::memcpy(&b[8], &huge, 8);  // tensor count
    EXPECT_NE(load_error(b, "count.gguf").find("tensor count"), std::string::npos);
}

TEST(GgufBadInput, MissingRequiredKey) {
    TinyModel m;
    m.skip_key = "qwen3moe.expert_count";
    std::string err = load_error(tiny_writer(m).serialize(), "nokey.gguf");
    EXPECT_NE(err.find("missing required metadata key 'qwen3moe.expert_count'"), std::string::npos) << err;
    m.skip_key = "qwen3moe.attention.layer_norm_rms_epsilon";
    err = load_error(tiny_writer(m).serialize(), "nokey.gguf");
    EXPECT_NE(err.find("'qwen3moe.attention.layer_norm_rms_epsilon'"), std::string::npos) << err;
}

TEST(GgufBadInput, WrongExpertTensorShape) {
    TinyModel m;
    m.bad_shape_tensor = tensor_name(Tensor::kFfnUpExps, 1);
    std::string err = load_error(tiny_writer(m).serialize(), "shape.gguf");
    EXPECT_NE(err.find("tensor 'blk.1.ffn_up_exps.weight' has shape {64, 16, 4}, expected {32, 16, 4}"),
              std::string::npos)
        << err;
}

TEST(GgufBadInput, MissingTensor) {
    GgufWriter w = tiny_writer(TinyModel{});
    std::vector<uint8_t> b = w.serialize();
    // Rename a tensor so the loader cannot find it.
    size_t at = find_name(b, "blk.0.attn_k.weight");
    b[at + 8 + 6] = 'X';
    std::string err = load_error(b, "missing.gguf");
    EXPECT_NE(err.find("missing required tensor 'blk.0.attn_k.weight'"), std::string::npos) << err;
}

TEST(GgufBadInput, RandomCorruptionNeverCrashes) {
    std::vector<uint8_t> b = tiny_writer(TinyModel{}).serialize();
    std::mt19937 rng(123);
    size_t header = 4096;  // flip bytes in the header region, where the parser reads
    int rejected = 0;
    for (int iter = 0; iter < 2000; ++iter) {
        std::vector<uint8_t> c = b;
        int flips = 1 + static_cast<int>(rng() % 4);
        for (int i = 0; i < flips; ++i) c[rng() % std::min(header, c.size())] = static_cast<uint8_t>(rng());
        auto f = GgufFile::from_memory(c.data(), c.size(), "fuzz");
        if (!f.ok()) {
            ++rejected;
            EXPECT_EQ(f.status().message().rfind("fuzz: ", 0), 0u) << f.status().message();  // names the file
        } else {
            (void)load_model_config(*f.value());
        }
    }
    EXPECT_GT(rejected, 100);  // the corruption is seen, not silently accepted
}

TEST(GgufSeeds, SeedCorpusParses) {
    // The fuzzer starts from tests/data/gguf_seeds; MOEMESH_WRITE_SEEDS=1 regenerates them.
    std::string dir = std::string(MOEMESH_SOURCE_DIR) + "/tests/data/gguf_seeds";
    std::vector<uint8_t> tiny = tiny_writer(TinyModel{}).serialize();
    if (std::getenv("MOEMESH_WRITE_SEEDS")) write_bytes(dir + "/tiny_qwen3moe.gguf", tiny);
    auto f = GgufFile::open(dir + "/tiny_qwen3moe.gguf");
    ASSERT_TRUE(f.ok()) << f.status().message();
    EXPECT_TRUE(load_model_config(*f.value()).ok());
}

}  // namespace
}  // namespace moemesh
