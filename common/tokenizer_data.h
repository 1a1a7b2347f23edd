// The tokenizer as data: what a GGUF's tokenizer.* keys hold. Built from a Hugging Face
// tokenizer directory (the way llama.cpp's convert_hf_to_gguf.py does for Qwen2/Qwen3), or
// synthesised for test models, and written back as GGUF metadata.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace moemesh {

class GgufWriter;

// llama.cpp's token types (gguf.TokenType / llama_token_type).
enum TokenType : int32_t {
    kTokenUndefined = 0,
    kTokenNormal = 1,
    kTokenUnknown = 2,
    kTokenControl = 3,
    kTokenUserDefined = 4,
    kTokenUnused = 5,
    kTokenByte = 6,
};

struct TokenizerData {
    std::string model = "gpt2", pre = "qwen2";
    std::vector<std::string> tokens;   // GPT-2 byte-encoded text, or the literal text of added tokens
    std::vector<int32_t> token_types;  // TokenType per token; empty means all normal
    std::vector<std::string> merges;   // "left right", highest priority first
    int32_t bos_id = -1, eos_id = -1, pad_id = -1;  // -1: key not written
    bool add_bos = false;
    std::string chat_template;  // empty: key not written
};

// A working byte-level BPE tokenizer of exactly `vocab_size` tokens: the 256 byte tokens, merges
// learned by a small deterministic greedy BPE over a built-in English + code text, "[PAD{id}]"
// unused tokens once the merges run out, and the ChatML specials <|endoftext|>, <|im_start|>,
// <|im_end|> as the last three ids (bos = pad = <|endoftext|>, eos = <|im_end|>, as in Qwen).
// vocab_size is raised to kMinBuiltinVocab if smaller.
constexpr int32_t kMinBuiltinVocab = 256 + 3;
TokenizerData builtin_byte_bpe_tokenizer(int32_t vocab_size);

// Reads <dir>/tokenizer.json and, where present, <dir>/tokenizer_config.json, chat_template.jinja
// and config.json, producing what convert_hf_to_gguf.py writes for a gpt2-style BPE model: ids
// missing from the vocab up to max(min_vocab, largest id + 1) become "[PAD{id}]" unused tokens;
// added tokens are control when "special" (or when they look like <|...|>), else user-defined.
StatusOr<TokenizerData> load_hf_tokenizer(const std::string& dir, int32_t min_vocab);

// tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,eos_token_id,
// padding_token_id,add_bos_token} and tokenizer.chat_template.
void write_tokenizer_metadata(GgufWriter& w, const TokenizerData& d);

}  // namespace moemesh
