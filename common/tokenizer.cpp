// Byte-level BPE, mirroring llama.cpp's llama-vocab.cpp (load, tokenizer_st_partition,
// llm_tokenizer_bpe_session, token_to_piece). See tokenizer.h for the behaviours this keeps.
#include "common/tokenizer.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "common/arch.h"
#include "common/gguf.h"
#include "common/tokenizer_unicode.h"

namespace moemesh {
namespace {

// llama_token_attr bits.
enum Attr : uint32_t {
    kAttrUndefined = 0,
    kAttrUnknown = 1u << 0,
    kAttrUnused = 1u << 1,
    kAttrNormal = 1u << 2,
    kAttrControl = 1u << 3,
    kAttrUserDefined = 1u << 4,
    kAttrByte = 1u << 5,
};

uint32_t attr_from_type(int32_t type) {
    switch (type) {
        case kTokenUnknown: return kAttrUnknown;
        case kTokenUnused: return kAttrUnused;
        case kTokenNormal: return kAttrNormal;
        case kTokenControl: return kAttrControl;
        case kTokenUserDefined: return kAttrUserDefined;
        case kTokenByte: return kAttrByte;
        default: return kAttrUndefined;
    }
}

// Everything the GGUF says about the vocabulary; ids are -1 where the key is absent.
struct VocabSpec {
    TokenizerData d;
    bool has_add_bos = false;
    bool add_eos = false;
    int32_t eot_id = -1, eom_id = -1;
    int32_t fim_pre_id = -1, fim_suf_id = -1, fim_mid_id = -1, fim_pad_id = -1, fim_rep_id = -1, fim_sep_id = -1;
};

constexpr size_t kWordCacheMax = 1 << 18;
constexpr size_t kWordCacheMaxLen = 128;

}  // namespace

struct Tokenizer::Impl {
    std::vector<std::string> tokens;
    std::vector<uint32_t> attrs;
    std::unordered_map<std::string, int32_t> token_to_id;
    unicode::PreTokenizer pre = unicode::PreTokenizer::kQwen2;

    // BPE: token ids stand for symbols (every merge part and result is a token, checked at load).
    struct Merge {
        int32_t rank;
        int32_t result;
    };
    std::unordered_map<uint64_t, Merge> merges;
    int32_t byte_token[256];  // token of each byte's stand-in character, -1 if missing

    std::vector<int32_t> special_cache;  // control/user-defined/unknown ids, longest text first
    std::vector<std::string> pieces;
    std::vector<bool> eog;
    int32_t bos = -1, eos = -1, pad = -1;
    bool add_bos = false, add_eos = false;
    std::string chat_template;

    mutable std::mutex cache_mu;
    mutable std::unordered_map<std::string, std::vector<int32_t>> word_cache;

    int32_t find(const std::string& s) const {
        auto it = token_to_id.find(s);
        return it == token_to_id.end() ? -1 : it->second;
    }
    static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

    void bpe_word(const std::string& word, std::vector<int32_t>& out) const;
    void tokenize_fragment(std::string_view text, std::vector<int32_t>& out) const;
};

namespace {

struct Symbol {
    int32_t token;  // -1: a byte whose stand-in is not in the vocabulary
    int32_t prev, next;
    uint32_t start, len;
};

struct Bigram {
    int32_t rank;
    int32_t left, right;
    uint32_t len;  // left.len + right.len when queued; a different sum means the entry is stale
};

struct BigramOrder {  // llm_bigram_bpe::comparator: lowest rank first, then leftmost
    bool operator()(const Bigram& l, const Bigram& r) const {
        return l.rank > r.rank || (l.rank == r.rank && l.left > r.left);
    }
};

}  // namespace

void Tokenizer::Impl::bpe_word(const std::string& word, std::vector<int32_t>& out) const {
    std::vector<Symbol> syms(word.size());
    for (size_t i = 0; i < word.size(); ++i) {
        syms[i] = Symbol{byte_token[uint8_t(word[i])], int32_t(i) - 1, i + 1 < word.size() ? int32_t(i) + 1 : -1,
                         uint32_t(i), 1};
    }
    std::priority_queue<Bigram, std::vector<Bigram>, BigramOrder> queue;
    auto add_bigram = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        const Symbol& l = syms[left];
        const Symbol& r = syms[right];
        if (l.token < 0 || r.token < 0) return;
        auto it = merges.find(pair_key(l.token, r.token));
        if (it == merges.end()) return;
        queue.push(Bigram{it->second.rank, left, right, l.len + r.len});
    };
    for (size_t i = 1; i < syms.size(); ++i) add_bigram(int32_t(i) - 1, int32_t(i));

    while (!queue.empty()) {
        const Bigram b = queue.top();
        queue.pop();
        Symbol& l = syms[b.left];
        Symbol& r = syms[b.right];
        if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;
        l.token = merges.at(pair_key(l.token, r.token)).result;
        l.len += r.len;
        r.len = 0;
        l.next = r.next;
        if (r.next >= 0) syms[r.next].prev = b.left;
        add_bigram(l.prev, b.left);
        add_bigram(b.left, l.next);
    }

    for (int32_t i = 0; i != -1 && !syms.empty(); i = syms[i].next) {
        const Symbol& s = syms[i];
        if (s.token >= 0) {
            out.push_back(s.token);
            continue;
        }
        // llama.cpp: a symbol that is not a token falls back to the single-char tokens of the
        // bytes of its (stand-in) text, dropping bytes that have none.
        const std::string text = unicode::byte_to_unicode(uint8_t(word[s.start]));
        for (char c : text) {
            const int32_t t = find(std::string(1, c));
            if (t >= 0) out.push_back(t);
        }
    }
}

void Tokenizer::Impl::tokenize_fragment(std::string_view text, std::vector<int32_t>& out) const {
    const std::vector<uint32_t> cpts = unicode::utf8_to_cpts(text);
    size_t pos = 0;
    std::string word;
    for (size_t len : unicode::split_words(cpts, pre)) {
        word.clear();
        for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(word, cpts[i]);
        pos += len;
        if (word.size() <= kWordCacheMaxLen) {
            std::lock_guard<std::mutex> lock(cache_mu);
            auto it = word_cache.find(word);
            if (it != word_cache.end()) {
                out.insert(out.end(), it->second.begin(), it->second.end());
                continue;
            }
        }
        const size_t first = out.size();
        bpe_word(word, out);
        if (word.size() <= kWordCacheMaxLen) {
            std::lock_guard<std::mutex> lock(cache_mu);
            if (word_cache.size() >= kWordCacheMax) word_cache.clear();
            word_cache.emplace(word, std::vector<int32_t>(out.begin() + first, out.end()));
        }
    }
}

namespace {

// llama.cpp's llama_decode_text: stand-in characters back to bytes.
std::string decode_byte_text(const std::string& text) {
    std::string out;
    for (uint32_t cpt : unicode::utf8_to_cpts(text)) {
        const int b = unicode::unicode_to_byte(cpt);
        if (b >= 0) {
            out.push_back(char(b));
            continue;
        }
        std::string utf8;
        unicode::append_utf8(utf8, cpt);
        out += "[UNK_BYTE_0x";
        for (char c : utf8) out += str_printf("%02x", unsigned(uint8_t(c)));
        out += text + "]";
    }
    return out;
}

bool text_in(const std::string& t, std::initializer_list<const char*> list) {
    for (const char* s : list) {
        if (t == s) return true;
    }
    return false;
}

}  // namespace

struct Tokenizer::Builder {
    static StatusOr<Tokenizer> build(VocabSpec spec, const std::string& where);
};

StatusOr<Tokenizer> Tokenizer::from_data(const TokenizerData& d) {
    VocabSpec spec;
    spec.d = d;
    spec.has_add_bos = true;
    return Builder::build(std::move(spec), "tokenizer data");
}

StatusOr<Tokenizer> Tokenizer::from_gguf(const GgufFile& f) {
    const std::string& path = f.path();
    VocabSpec spec;
    TokenizerData& d = spec.d;
    auto key = [](Kv k) { return std::string(kv_pattern(k)); };

    MM_ASSIGN_OR_RETURN(d.model, f.get_string(key(Kv::kTokenizerModel)));
    if (const GgufValue* v = f.find(key(Kv::kTokenizerPre))) {
        if (v->type != GgufType::STRING) {
            return MM_ERROR("%s: metadata key '%s' should be a string, found %s", path.c_str(),
                            key(Kv::kTokenizerPre).c_str(), gguf_type_name(v->type));
        }
        d.pre = v->str;
    } else {
        d.pre.clear();
    }

    auto string_array = [&](Kv k, std::vector<std::string>& out) -> Status {
        const GgufValue* v = f.find(key(k));
        if (!v) return MM_ERROR("%s: missing required metadata key '%s'", path.c_str(), key(k).c_str());
        if (v->type != GgufType::ARRAY || v->arr_type != GgufType::STRING) {
            return MM_ERROR("%s: metadata key '%s' should be an array of strings", path.c_str(), key(k).c_str());
        }
        out = v->arr_str;
        return Status();
    };
    MM_RETURN_IF_ERROR(string_array(Kv::kTokenizerTokens, d.tokens));
    MM_RETURN_IF_ERROR(string_array(Kv::kTokenizerMerges, d.merges));
    if (const GgufValue* v = f.find(key(Kv::kTokenizerTokenType))) {
        if (v->type != GgufType::ARRAY || v->arr_type != GgufType::INT32) {
            return MM_ERROR("%s: metadata key '%s' should be an array of int32", path.c_str(),
                            key(Kv::kTokenizerTokenType).c_str());
        }
        d.token_types.assign(v->arr_i.begin(), v->arr_i.end());
    }

    // Special ids: llama.cpp ignores (keeps its default for) values outside the vocabulary.
    auto id_key = [&](Kv k, int32_t& id) -> Status {
        const GgufValue* v = f.find(key(k));
        if (!v) return Status();
        if (!v->is_int() || v->type == GgufType::BOOL) {
            return MM_ERROR("%s: metadata key '%s' should be an integer token id, found %s", path.c_str(),
                            key(k).c_str(), gguf_type_name(v->type));
        }
        if (v->i >= 0 && v->i < int64_t(d.tokens.size())) id = int32_t(v->i);
        return Status();
    };
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerBosId, d.bos_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerEosId, d.eos_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerPadId, d.pad_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerEotId, spec.eot_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerEomId, spec.eom_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimPreId, spec.fim_pre_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimSufId, spec.fim_suf_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimMidId, spec.fim_mid_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimPadId, spec.fim_pad_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimRepId, spec.fim_rep_id));
    MM_RETURN_IF_ERROR(id_key(Kv::kTokenizerFimSepId, spec.fim_sep_id));

    auto bool_key = [&](Kv k, bool& out, bool* present) -> Status {
        const GgufValue* v = f.find(key(k));
        if (!v) return Status();
        if (v->type != GgufType::BOOL) {
            return MM_ERROR("%s: metadata key '%s' should be a bool, found %s", path.c_str(), key(k).c_str(),
                            gguf_type_name(v->type));
        }
        out = v->b;
        if (present) *present = true;
        return Status();
    };
    MM_RETURN_IF_ERROR(bool_key(Kv::kTokenizerAddBos, d.add_bos, &spec.has_add_bos));
    MM_RETURN_IF_ERROR(bool_key(Kv::kTokenizerAddEos, spec.add_eos, nullptr));
    if (const GgufValue* v = f.find(key(Kv::kTokenizerChatTemplate))) {
        if (v->type != GgufType::STRING) {
            return MM_ERROR("%s: metadata key '%s' should be a string", path.c_str(),
                            key(Kv::kTokenizerChatTemplate).c_str());
        }
        d.chat_template = v->str;
    }
    return Builder::build(std::move(spec), path);
}

StatusOr<Tokenizer> Tokenizer::Builder::build(VocabSpec spec, const std::string& where) {
    TokenizerData& d = spec.d;
    const char* w = where.c_str();
    const std::string k_tokens = kv_pattern(Kv::kTokenizerTokens);
    const std::string k_types = kv_pattern(Kv::kTokenizerTokenType);
    const std::string k_merges = kv_pattern(Kv::kTokenizerMerges);

    if (d.model != "gpt2") {
        return MM_ERROR("%s: %s is '%s'; only byte-level BPE ('gpt2') is supported", w,
                        kv_pattern(Kv::kTokenizerModel), d.model.c_str());
    }
    auto impl = std::make_shared<Tokenizer::Impl>();
    if (d.pre == "qwen2" || d.pre == "deepseek-r1-qwen" || d.pre == "kormo" || d.pre == "f2llmv2") {
        impl->pre = unicode::PreTokenizer::kQwen2;
    } else if (d.pre == "qwen35") {
        impl->pre = unicode::PreTokenizer::kQwen35;
    } else {
        return MM_ERROR("%s: %s is '%s'; supported: qwen2, qwen35 (and llama.cpp's aliases of qwen2)", w,
                        kv_pattern(Kv::kTokenizerPre), d.pre.c_str());
    }
    const size_t n = d.tokens.size();
    if (n == 0) return MM_ERROR("%s: %s is empty", w, k_tokens.c_str());
    if (n >= size_t(INT32_MAX)) return MM_ERROR("%s: %s has too many tokens", w, k_tokens.c_str());
    if (!d.token_types.empty() && d.token_types.size() != n) {
        return MM_ERROR("%s: %s has %zu entries but %s has %zu", w, k_types.c_str(), d.token_types.size(),
                        k_tokens.c_str(), n);
    }

    impl->tokens = std::move(d.tokens);
    impl->attrs.assign(n, kAttrNormal);
    impl->token_to_id.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        std::string& t = impl->tokens[i];
        if (t.empty()) t = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp does
        if (!impl->token_to_id.emplace(t, int32_t(i)).second) {
            return MM_ERROR("%s: %s has the token \"%s\" twice (ids %d and %zu)", w, k_tokens.c_str(), t.c_str(),
                            impl->token_to_id[t], i);
        }
        if (!d.token_types.empty()) impl->attrs[i] = attr_from_type(d.token_types[i]);
    }

    // Merges: "left right", split at the first space after the first character as llama.cpp does.
    for (size_t i = 0; i < d.merges.size(); ++i) {
        const std::string& m = d.merges[i];
        const size_t sp = m.find(' ', 1);
        if (sp == std::string::npos) {
            return MM_ERROR("%s: %s[%zu] = \"%s\" has no space between its two parts", w, k_merges.c_str(), i,
                            m.c_str());
        }
        const std::string left = m.substr(0, sp), right = m.substr(sp + 1);
        const int32_t l = impl->find(left), r = impl->find(right), res = impl->find(left + right);
        if (l < 0 || r < 0 || res < 0) {
            return MM_ERROR("%s: %s[%zu] = \"%s\" refers to \"%s\", which is not in %s", w, k_merges.c_str(), i,
                            m.c_str(), (l < 0 ? left : r < 0 ? right : left + right).c_str(), k_tokens.c_str());
        }
        impl->merges.emplace(Tokenizer::Impl::pair_key(l, r), Tokenizer::Impl::Merge{int32_t(i), res});
    }
    for (int b = 0; b < 256; ++b) impl->byte_token[b] = impl->find(unicode::byte_to_unicode(uint8_t(b)));

    // Special ids. llama.cpp's gpt2 defaults are bos = eos = 11 when the keys are absent.
    auto in_vocab = [&](int32_t id) { return id >= 0 && size_t(id) < n; };
    impl->bos = in_vocab(d.bos_id) ? d.bos_id : (n > 11 ? 11 : -1);
    impl->eos = in_vocab(d.eos_id) ? d.eos_id : (n > 11 ? 11 : -1);
    impl->pad = in_vocab(d.pad_id) ? d.pad_id : -1;
    impl->add_bos = spec.has_add_bos ? d.add_bos : false;
    impl->add_eos = spec.add_eos;
    impl->chat_template = std::move(d.chat_template);

    // llama.cpp re-types tokens by their text (llama_vocab::impl::load): the first token found
    // for each unset eot/eom/fim role becomes control, and so does every end-of-generation marker.
    // (llama.cpp scans a hash map, so with several candidates for one role its pick is arbitrary;
    // we take the lowest id.)
    auto& attrs = impl->attrs;
    auto detect = [&](int32_t& id, std::initializer_list<const char*> names) {
        if (id >= 0) return;
        for (size_t i = 0; i < n; ++i) {
            if (text_in(impl->tokens[i], names)) {
                id = int32_t(i);
                attrs[i] |= kAttrControl;
                return;
            }
        }
    };
    detect(spec.eot_id, {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                         "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
                         "<end_of_utterance>"});
    detect(spec.eom_id, {"<|eom_id|>"});
    detect(spec.fim_pre_id, {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                             "<｜fim▁begin｜>", "<PRE>",
                             "▁<PRE>", "<|code_prefix|>", "<|prefix|>"});
    detect(spec.fim_suf_id, {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                             "<｜fim▁hole｜>", "<SUF>",
                             "▁<SUF>", "<|code_suffix|>", "<|suffix|>"});
    detect(spec.fim_mid_id, {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                             "<｜fim▁end｜>", "<MID>",
                             "▁<MID>", "<|code_middle|>", "<|middle|>"});
    detect(spec.fim_pad_id, {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"});
    detect(spec.fim_rep_id, {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"});
    detect(spec.fim_sep_id, {"<|file_sep|>"});

    impl->eog.assign(n, false);
    for (int32_t id : {spec.fim_pad_id, spec.fim_rep_id, spec.fim_sep_id}) {
        if (in_vocab(id)) impl->eog[id] = true;
    }
    for (size_t i = 0; i < n; ++i) {
        if (text_in(impl->tokens[i],
                    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                     "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                     "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                     "<｜end▁of▁sentence｜>", "[e~["})) {
            impl->eog[i] = true;
            attrs[i] |= kAttrControl;
        }
    }
    for (size_t i = 0; i < n; ++i) {  // gpt-oss: always rendered
        if (text_in(impl->tokens[i], {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})) {
            attrs[i] = kAttrUserDefined;
        }
    }
    for (int32_t id : {impl->eos, spec.eot_id, spec.eom_id}) {
        if (in_vocab(id)) impl->eog[id] = true;
    }
    {
        auto eog_with = [&](const char* text) {
            const int32_t id = impl->find(text);
            return id >= 0 && impl->eog[id] ? id : -1;
        };
        const int32_t end_id = eog_with("<|end|>");
        const bool has_call = eog_with("<|call|>") >= 0 || eog_with("<|calls|>") >= 0;
        if (end_id >= 0 && has_call && (eog_with("<|return|>") >= 0 || eog_with("<|flush|>") >= 0)) {
            impl->eog[end_id] = false;
            attrs[end_id] = kAttrUserDefined;
        }
        const int32_t s_id = eog_with("</s>");
        if (s_id >= 0 && eog_with("<|tool_response>") >= 0) {
            impl->eog[s_id] = false;
            attrs[s_id] = kAttrNormal;
        }
    }

    // Tokens matched as whole strings before BPE, longest first (same std::sort as llama.cpp,
    // so that equal lengths keep its order too).
    for (size_t i = 0; i < n; ++i) {
        if (attrs[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) impl->special_cache.push_back(int32_t(i));
    }
    std::sort(impl->special_cache.begin(), impl->special_cache.end(), [&](int32_t a, int32_t b) {
        return impl->tokens[a].size() > impl->tokens[b].size();
    });

    impl->pieces.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const uint32_t a = attrs[i];
        const std::string& t = impl->tokens[i];
        if (a & (kAttrUnknown | kAttrControl | kAttrUserDefined)) {
            impl->pieces[i] = t;
        } else if (a & kAttrNormal) {
            impl->pieces[i] = decode_byte_text(t);
        } else if (a & kAttrByte) {
            if (t.size() >= 5) impl->pieces[i] = std::string(1, char(std::strtol(t.substr(3, 2).c_str(), nullptr, 16)));
        }  // unused and undefined tokens render as nothing
    }

    Tokenizer tok;
    tok.impl_ = std::move(impl);
    return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
    const Impl& im = *impl_;
    std::vector<int32_t> out;
    if (im.add_bos && im.bos >= 0) out.push_back(im.bos);

    // tokenizer_st_partition: split the text around every occurrence of each special token.
    struct Fragment {
        int32_t token;  // >= 0: a special token; -1: text [off, off + len)
        size_t off, len;
    };
    std::vector<Fragment> frags;
    if (!text.empty()) frags.push_back({-1, 0, text.size()});
    std::vector<Fragment> next;
    for (int32_t id : im.special_cache) {
        if (!parse_special && (im.attrs[id] & (kAttrControl | kAttrUnknown))) continue;
        const std::string& st = im.tokens[id];
        bool found = false;
        for (const Fragment& f : frags) {
            if (f.token < 0 && text.substr(f.off, f.len).find(st) != std::string_view::npos) {
                found = true;
                break;
            }
        }
        if (!found) continue;
        next.clear();
        for (const Fragment& f : frags) {
            if (f.token >= 0) {
                next.push_back(f);
                continue;
            }
            const std::string_view window = text.substr(0, f.off + f.len);
            size_t base = f.off;
            for (size_t m = window.find(st, base); m != std::string_view::npos; m = window.find(st, base)) {
                if (m > base) next.push_back({-1, base, m - base});
                next.push_back({id, 0, 0});
                base = m + st.size();
            }
            if (base < f.off + f.len) next.push_back({-1, base, f.off + f.len - base});
        }
        frags.swap(next);
    }

    for (const Fragment& f : frags) {
        if (f.token >= 0) {
            out.push_back(f.token);
        } else {
            im.tokenize_fragment(text.substr(f.off, f.len), out);
        }
    }
    if (im.add_eos && im.eos >= 0) out.push_back(im.eos);
    return out;
}

std::string Tokenizer::token_to_piece(int32_t id) const {
    if (id < 0 || id >= vocab_size()) return "";
    return impl_->pieces[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
    std::string out;
    for (int32_t id : ids) {
        if (id >= 0 && id < vocab_size()) out += impl_->pieces[id];
    }
    return out;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->tokens.size()); }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }
bool Tokenizer::is_eog(int32_t id) const { return id >= 0 && id < vocab_size() && impl_->eog[id]; }
bool Tokenizer::is_control(int32_t id) const {
    return id >= 0 && id < vocab_size() && (impl_->attrs[id] & kAttrControl);
}
bool Tokenizer::add_bos() const { return impl_->add_bos; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }
int32_t Tokenizer::token_id(std::string_view text) const { return impl_->find(std::string(text)); }

}  // namespace moemesh
