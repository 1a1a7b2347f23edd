// Byte-level BPE tokenizer (GGUF tokenizer.ggml.model = "gpt2", pre = "qwen2"/"qwen35"),
// bit-for-bit with llama.cpp's llama_tokenize / llama_token_to_piece. What that means in detail:
//  - No Unicode normalization: llama.cpp does not apply the NFC normalizer of tokenizer.json.
//  - Invalid UTF-8 is decoded byte by byte to U+FFFD before pre-tokenization, so such bytes come
//    back from decode() as U+FFFD, not as themselves.
//  - Control tokens are matched as whole strings only when parse_special is true; user-defined
//    tokens (e.g. Qwen's <think>, <tool_call>) are matched always. Longer tokens are tried first.
//  - Pre-tokenization is llama.cpp's hand-written Qwen2 splitter with llama.cpp's Unicode tables.
//  - BPE applies merges by rank (leftmost first on ties); a final symbol that is not a token is
//    replaced by the single-byte tokens of its bytes that exist.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/tokenizer_data.h"

namespace moemesh {

class GgufFile;

class Tokenizer {
public:
    static StatusOr<Tokenizer> from_gguf(const GgufFile& f);
    static StatusOr<Tokenizer> from_data(const TokenizerData& d);

    // Text to token ids; a BOS is prepended only if add_bos() (and an EOS appended only if the
    // GGUF sets tokenizer.ggml.add_eos_token), i.e. llama_tokenize with add_special = true.
    // Thread-safe; words are cached.
    std::vector<int32_t> encode(std::string_view text, bool parse_special) const;
    // The bytes a token stands for; control and user-defined tokens as their text, unused tokens
    // as "" (llama_token_to_piece with special = true). Out-of-range ids give "".
    std::string token_to_piece(int32_t id) const;
    // Concatenated pieces (llama_detokenize with unparse_special = true; no space clean-up).
    std::string decode(const std::vector<int32_t>& ids) const;

    int32_t vocab_size() const;
    // As llama.cpp: when the GGUF has no bos/eos key, gpt2 vocabularies default to id 11 (so a
    // Qwen tokenizer without config.json reports bos 11; add_bos is false there anyway).
    int32_t eos_id() const;
    int32_t bos_id() const;
    int32_t pad_id() const;  // -1 if none
    // End of generation, decided as llama.cpp does: eos/eot/eom, tokens whose text is one of
    // llama.cpp's end markers (<|im_end|>, <|endoftext|>, </s>, <|eot_id|>, ...), and the FIM
    // pad/repo/file-separator tokens (<|fim_pad|>, <|repo_name|>, <|file_sep|>).
    bool is_eog(int32_t id) const;
    bool is_control(int32_t id) const;  // after llama.cpp's own re-typing of end markers
    bool add_bos() const;
    const std::string& chat_template() const;
    int32_t token_id(std::string_view text) const;  // exact vocabulary entry, -1 if none

private:
    Tokenizer() = default;
    struct Impl;
    struct Builder;
    std::shared_ptr<const Impl> impl_;
};

}  // namespace moemesh
