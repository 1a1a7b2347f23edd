// Tokenizer data: the built-in test tokenizer, the Hugging Face reader and the GGUF writer.
// The HF reader follows llama.cpp's convert_hf_to_gguf.py (TextModel.get_vocab_base,
// _set_vocab_gpt2) and gguf-py's SpecialVocab, so that a GGUF we write tokenizes in llama.cpp
// exactly as one made by the converter.
#include "common/tokenizer_data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "common/arch.h"
#include "common/chat_template.h"
#include "common/gguf.h"
#include "common/tokenizer_unicode.h"

namespace moemesh {


namespace {

// Training text for the built-in tokenizer: a little prose and a little code, so that merges
// cover common English words, indentation and operators.
constexpr const char* kTrainingText = R"TXT(
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token to a
small number of experts chosen by a router; only those experts run, so the model can be large
while each token costs little. The router is a linear layer followed by a softmax, and the top
experts are picked by their scores. Their outputs are weighted and summed. When the experts live
on different machines, the tokens have to be sent to the machine that owns each expert and the
results sent back. This is called dispatch and combine. It is the heart of expert parallelism.
We write the model in a file format that holds both the weights and the metadata: the number of
layers, the hidden size, the number of attention heads, the tokenizer and the chat template.
Tokenization turns text into numbers. Byte-level byte pair encoding starts from the bytes of
the text and repeatedly merges the most frequent pair of neighbouring symbols into a new symbol.
The merges are learned once, in order, and then applied in the same order to any new text.
There is nothing the tokenizer cannot encode, because every byte has a token of its own.
It's what we'd expect: they're fast, you'll see, and I've tested it. Don't worry, we're done.
Numbers such as 3.14159, 2048, 151936 and 1e-6 appear in configuration files all the time.
In the beginning there was a question, and the question was how to make it all fit in memory.
The answer was to split the experts across many workers, and to keep the rest in one place.

int main(int argc, char** argv) {
    std::vector<float> hidden(2048, 0.0f);
    for (int layer = 0; layer < num_layers; ++layer) {
        const float scale = 1.0f / std::sqrt(float(head_dim));
        if (layer % 4 == 3) {
            hidden = attention(hidden, layer, scale);
        } else {
            hidden = delta_net(hidden, layer);
        }
    }
    return 0;
}

def softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]

def top_k(scores, k):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:k]

class Router:
    def __init__(self, weight, num_experts, top_k):
        self.weight = weight
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x):
        logits = [sum(w * v for w, v in zip(row, x)) for row in self.weight]
        probs = softmax(logits)
        chosen = top_k(probs, self.top_k)
        total = sum(probs[i] for i in chosen)
        return [(i, probs[i] / total) for i in chosen]

function tokenize(text) {
  const words = text.split(/\s+/).filter((w) => w.length > 0);
  return words.map((w) => vocab[w] ?? unknown);
}

{"model": "qwen3moe", "layers": 48, "experts": 128, "top_k": 8, "hidden": 2048, "eps": 1e-06}
)TXT";

std::string join_merge(const std::string& a, const std::string& b) { return a + " " + b; }

}  // namespace

TokenizerData builtin_byte_bpe_tokenizer(int32_t vocab_size) {
    vocab_size = std::max(vocab_size, kMinBuiltinVocab);
    const int32_t num_normal_max = vocab_size - 3;

    TokenizerData d;
    d.model = "gpt2";
    d.pre = "qwen2";
    std::unordered_map<std::string, int32_t> ids;
    auto add_token = [&](const std::string& text, int32_t type) {
        ids.emplace(text, int32_t(d.tokens.size()));
        d.tokens.push_back(text);
        d.token_types.push_back(type);
    };
    // GPT-2 order: the printable bytes first, then the rest (ascending stand-in code points).
    for (int pass = 0; pass < 2; ++pass) {
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            if (printable == (pass == 0)) add_token(unicode::byte_to_unicode(uint8_t(b)), kTokenNormal);
        }
    }

    // Words of the training text, pre-tokenized as encode() will, as sequences of token ids.
    std::map<std::string, int64_t> word_counts;
    {
        const auto cpts = unicode::utf8_to_cpts(kTrainingText);
        size_t pos = 0;
        for (size_t len : unicode::split_words(cpts, unicode::PreTokenizer::kQwen2)) {
            std::string word;
            for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(word, cpts[i]);
            pos += len;
            word_counts[word]++;
        }
    }
    std::vector<std::vector<int32_t>> words;
    std::vector<int64_t> counts;
    for (const auto& [word, count] : word_counts) {
        std::vector<int32_t> syms;
        for (char c : word) syms.push_back(ids.at(unicode::byte_to_unicode(uint8_t(c))));
        words.push_back(std::move(syms));
        counts.push_back(count);
    }

    // Greedy BPE: merge the most frequent adjacent pair (ties: the smaller id pair) until the
    // vocabulary is full or no pair occurs twice.
    while (int32_t(d.tokens.size()) < num_normal_max) {
        std::map<std::pair<int32_t, int32_t>, int64_t> pair_counts;
        for (size_t w = 0; w < words.size(); ++w) {
            for (size_t i = 0; i + 1 < words[w].size(); ++i) pair_counts[{words[w][i], words[w][i + 1]}] += counts[w];
        }
        std::pair<int32_t, int32_t> best{-1, -1};
        int64_t best_count = 1;
        for (const auto& [pair, count] : pair_counts) {
            if (count > best_count) {
                best = pair;
                best_count = count;
            }
        }
        if (best.first < 0) break;
        const std::string merged = d.tokens[best.first] + d.tokens[best.second];
        auto it = ids.find(merged);
        int32_t merged_id;
        if (it != ids.end()) {
            merged_id = it->second;
        } else {
            merged_id = int32_t(d.tokens.size());
            add_token(merged, kTokenNormal);
        }
        d.merges.push_back(join_merge(d.tokens[best.first], d.tokens[best.second]));
        for (auto& syms : words) {
            std::vector<int32_t> out;
            out.reserve(syms.size());
            for (size_t i = 0; i < syms.size(); ++i) {
                if (i + 1 < syms.size() && syms[i] == best.first && syms[i + 1] == best.second) {
                    out.push_back(merged_id);
                    ++i;
                } else {
                    out.push_back(syms[i]);
                }
            }
            syms = std::move(out);
        }
    }
    // convert_hf_to_gguf.py names unused ids "[PAD{id}]" and types them UNUSED.
    while (int32_t(d.tokens.size()) < num_normal_max) add_token("[PAD" + std::to_string(d.tokens.size()) + "]", kTokenUnused);

    d.bos_id = d.pad_id = int32_t(d.tokens.size());
    add_token("<|endoftext|>", kTokenControl);
    add_token("<|im_start|>", kTokenControl);
    d.eos_id = int32_t(d.tokens.size());
    add_token("<|im_end|>", kTokenControl);
    d.add_bos = false;
    d.chat_template = kChatMlTemplate;
    return d;
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directory

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

StatusOr<json> read_json(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return MM_ERROR("%s: cannot open file", path.c_str());
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return MM_ERROR("%s: not valid JSON", path.c_str());
    if (!j.is_object()) return MM_ERROR("%s: expected a JSON object at the top level", path.c_str());
    return j;
}

StatusOr<std::string> read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return MM_ERROR("%s: cannot open file", path.c_str());
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// convert_hf_to_gguf.py's does_token_look_special.
bool looks_special(const std::string& t) {
    auto starts = [&](const char* p) { return t.rfind(p, 0) == 0; };
    auto ends = [&](const char* s) {
        const size_t n = std::char_traits<char>::length(s);
        return t.size() >= n && t.compare(t.size() - n, n, s) == 0;
    };
    if (t == "<pad>" || t == "<mask>" || t == "<2mass>" || t == "[@BOS@]") return true;
    if (starts("<|") && ends("|>")) return true;
    if (starts("<｜") && ends("｜>")) return true;  // deepseek-coder
    if (starts("<unused") && ends(">")) return true;
    return false;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
}

// The pre-tokenizer regexes llama.cpp maps to "qwen2" and "qwen35" (as they appear in
// tokenizer.json; convert_hf_to_gguf.py identifies them by hashing a tokenization instead).
constexpr const char* kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
constexpr const char* kQwen35Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

void collect_split_regexes(const json& node, std::vector<std::string>& out) {
    if (node.is_object()) {
        if (node.value("type", "") == "Split" && node.contains("pattern") && node["pattern"].is_object() &&
            node["pattern"].contains("Regex") && node["pattern"]["Regex"].is_string()) {
            out.push_back(node["pattern"]["Regex"].get<std::string>());
        }
        for (const auto& [k, v] : node.items()) collect_split_regexes(v, out);
    } else if (node.is_array()) {
        for (const auto& v : node) collect_split_regexes(v, out);
    }
}

// A special token named in tokenizer_config.json: a string or {"content": ...}.
std::string config_token_content(const json& cfg, const std::string& key) {
    if (!cfg.contains(key)) return "";
    const json& e = cfg[key];
    if (e.is_string()) return e.get<std::string>();
    if (e.is_object() && e.contains("content") && e["content"].is_string()) return e["content"].get<std::string>();
    return "";
}

}  // namespace

StatusOr<TokenizerData> load_hf_tokenizer(const std::string& dir, int32_t min_vocab) {
    const fs::path root(dir);
    const fs::path tok_path = root / "tokenizer.json";
    MM_ASSIGN_OR_RETURN(json tok, read_json(tok_path));
    const char* tp = tok_path.c_str();

    if (!tok.contains("model") || !tok["model"].is_object()) return MM_ERROR("%s: missing object \"model\"", tp);
    const json& model = tok["model"];
    if (model.contains("type") && model["type"] != "BPE") {
        return MM_ERROR("%s: model.type is %s; only \"BPE\" is supported", tp, model["type"].dump().c_str());
    }
    if (!model.contains("vocab") || !model["vocab"].is_object()) return MM_ERROR("%s: missing object model.vocab", tp);

    std::map<int64_t, std::string> by_id;
    for (const auto& [text, id] : model["vocab"].items()) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= INT32_MAX) {
            return MM_ERROR("%s: model.vocab[\"%s\"] is %s, expected a non-negative integer id", tp, text.c_str(),
                            id.dump().c_str());
        }
        by_id[id.get<int64_t>()] = text;
    }

    struct Added {
        std::string content;
        bool special = false;
    };
    std::map<int64_t, Added> added;
    std::vector<std::pair<std::string, int64_t>> added_in_order;  // SpecialVocab looks up by content, first match
    if (tok.contains("added_tokens") && !tok["added_tokens"].is_null()) {
        if (!tok["added_tokens"].is_array()) return MM_ERROR("%s: added_tokens is not an array", tp);
        size_t i = 0;
        for (const auto& a : tok["added_tokens"]) {
            if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
                a["id"].get<int64_t>() >= INT32_MAX || !a.contains("content") || !a["content"].is_string()) {
                return MM_ERROR("%s: added_tokens[%zu] needs an integer \"id\" >= 0 and a string \"content\"", tp, i);
            }
            Added ad{a["content"].get<std::string>(), a.value("special", false)};
            added_in_order.emplace_back(ad.content, a["id"].get<int64_t>());
            added[a["id"].get<int64_t>()] = ad;
            ++i;
        }
    }

    TokenizerData d;
    d.model = "gpt2";
    {
        std::vector<std::string> regexes;
        if (tok.contains("pre_tokenizer")) collect_split_regexes(tok["pre_tokenizer"], regexes);
        if (regexes.size() != 1 || (regexes[0] != kQwen2Regex && regexes[0] != kQwen35Regex)) {
            return MM_ERROR("%s: pre_tokenizer is not the Qwen2 or Qwen3.5 Split regex; no other pre-tokenizer is "
                            "supported",
                            tp);
        }
        d.pre = regexes[0] == kQwen2Regex ? "qwen2" : "qwen35";
    }

    int64_t n_vocab = min_vocab;
    if (!by_id.empty()) n_vocab = std::max(n_vocab, by_id.rbegin()->first + 1);
    if (!added.empty()) n_vocab = std::max(n_vocab, added.rbegin()->first + 1);
    d.tokens.reserve(size_t(n_vocab));
    d.token_types.reserve(size_t(n_vocab));
    for (int64_t i = 0; i < n_vocab; ++i) {
        auto a = added.find(i);
        if (a != added.end()) {
            std::string text = a->second.content;
            if (a->second.special || looks_special(text)) {
                d.token_types.push_back(kTokenControl);
            } else {
                replace_all(text, "\xE2\x96\x81", " ");  // pre-normalized user-defined spaces (U+2581)
                d.token_types.push_back(kTokenUserDefined);
            }
            d.tokens.push_back(std::move(text));
            continue;
        }
        auto v = by_id.find(i);
        if (v != by_id.end()) {
            d.tokens.push_back(v->second);
            d.token_types.push_back(kTokenNormal);
        } else {
            d.tokens.push_back("[PAD" + std::to_string(i) + "]");
            d.token_types.push_back(kTokenUnused);
        }
    }

    if (!model.contains("merges") || !model["merges"].is_array()) return MM_ERROR("%s: missing array model.merges", tp);
    size_t mi = 0;
    for (const auto& m : model["merges"]) {
        if (m.is_string()) {
            d.merges.push_back(m.get<std::string>());
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
            // transformers >= 4.45 pairs; a space inside a part is written as U+0120 like SpecialVocab does.
            std::string a = m[0].get<std::string>(), b = m[1].get<std::string>();
            replace_all(a, " ", "\xC4\xA0");
            replace_all(b, " ", "\xC4\xA0");
            d.merges.push_back(join_merge(a, b));
        } else {
            return MM_ERROR("%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", tp, mi);
        }
        ++mi;
    }

    // tokenizer_config.json (optional, as for the converter), then config.json for ids still unset.
    bool have_bos = false, have_eos = false, have_pad = false;
    const fs::path cfg_path = root / "tokenizer_config.json";
    if (fs::exists(cfg_path)) {
        MM_ASSIGN_OR_RETURN(json cfg, read_json(cfg_path));
        const char* cp = cfg_path.c_str();
        if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
            const json& ct = cfg["chat_template"];
            if (ct.is_string()) {
                d.chat_template = ct.get<std::string>();
            } else if (ct.is_array()) {
                for (const auto& e : ct) {
                    if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
                        e["template"].is_string()) {
                        d.chat_template = e["template"].get<std::string>();
                    }
                }
            } else {
                return MM_ERROR("%s: chat_template is neither a string nor a list of {name, template}", cp);
            }
        }
        if (cfg.contains("add_bos_token") && !cfg["add_bos_token"].is_null()) {
            if (!cfg["add_bos_token"].is_boolean()) return MM_ERROR("%s: add_bos_token is not a boolean", cp);
            d.add_bos = cfg["add_bos_token"].get<bool>();
        }
        auto lookup = [&](const char* key, int32_t& id, bool& have) {
            const std::string content = config_token_content(cfg, key);
            if (content.empty()) return;
            for (const auto& [text, tid] : added_in_order) {
                if (text == content) {
                    id = int32_t(tid);
                    have = true;
                    return;
                }
            }
        };
        lookup("bos_token", d.bos_id, have_bos);
        lookup("eos_token", d.eos_id, have_eos);
        lookup("pad_token", d.pad_id, have_pad);
    }
    if (d.chat_template.empty() && fs::exists(root / "chat_template.jinja")) {
        MM_ASSIGN_OR_RETURN(d.chat_template, read_text(root / "chat_template.jinja"));
    }
    const fs::path config_path = root / "config.json";
    if (fs::exists(config_path)) {
        MM_ASSIGN_OR_RETURN(json config, read_json(config_path));
        auto from_config = [&](const char* key, int32_t& id, bool have) {
            if (have) return;
            const json* node = config.contains(key) ? &config[key] : nullptr;
            if (!node && config.contains("text_config") && config["text_config"].is_object() &&
                config["text_config"].contains(key)) {
                node = &config["text_config"][key];
            }
            if (node && node->is_number_integer() && node->get<int64_t>() >= 0) id = int32_t(node->get<int64_t>());
        };
        from_config("bos_token_id", d.bos_id, have_bos);
        from_config("eos_token_id", d.eos_id, have_eos);
        from_config("pad_token_id", d.pad_id, have_pad);
    }
    for (auto [name, id] : {std::pair{"bos", d.bos_id}, {"eos", d.eos_id}, {"pad", d.pad_id}}) {
        if (id >= int32_t(d.tokens.size())) {
            return MM_ERROR("%s: %s token id %d is outside the vocabulary of %zu tokens", dir.c_str(), name, id,
                            d.tokens.size());
        }
    }
    return d;
}

// ---------------------------------------------------------------------------------------------
// GGUF

void write_tokenizer_metadata(GgufWriter& w, const TokenizerData& d) {
    w.set_string(kv_pattern(Kv::kTokenizerModel), d.model);
    w.set_string(kv_pattern(Kv::kTokenizerPre), d.pre);
    w.set_arr_string(kv_pattern(Kv::kTokenizerTokens), d.tokens);
    if (!d.token_types.empty()) w.set_arr_i32(kv_pattern(Kv::kTokenizerTokenType), d.token_types);
    w.set_arr_string(kv_pattern(Kv::kTokenizerMerges), d.merges);
    if (d.bos_id >= 0) w.set_u32(kv_pattern(Kv::kTokenizerBosId), uint32_t(d.bos_id));
    if (d.eos_id >= 0) w.set_u32(kv_pattern(Kv::kTokenizerEosId), uint32_t(d.eos_id));
    if (d.pad_id >= 0) w.set_u32(kv_pattern(Kv::kTokenizerPadId), uint32_t(d.pad_id));
    w.set_bool(kv_pattern(Kv::kTokenizerAddBos), d.add_bos);
    if (!d.chat_template.empty()) w.set_string(kv_pattern(Kv::kTokenizerChatTemplate), d.chat_template);
}

}  // namespace moemesh
