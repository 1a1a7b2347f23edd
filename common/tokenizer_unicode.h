// Unicode helpers for the byte-level BPE tokenizer, written to match llama.cpp's src/unicode.cpp
// rather than any particular Unicode library: llama.cpp is the reference, so its code point
// classes, its UTF-8 decoder (invalid bytes become U+FFFD) and its hand-written Qwen2
// pre-tokenizer are reproduced here, quirks included.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh::unicode {

// llama.cpp's code point categories, reduced to what the Qwen pre-tokenizers look at.
enum class CptClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kMark = 3 };

CptClass cpt_class(uint32_t cpt);  // \p{L}, \p{N}, \p{M}; anything above U+10FFFF is kOther
bool cpt_is_whitespace(uint32_t cpt);  // llama.cpp's \s: Unicode White_Space

// Decodes like llama.cpp's unicode_cpts_from_utf8: each byte that does not start a
// well-formed sequence (by llama.cpp's loose rules: overlong forms and surrogates pass) gives
// one U+FFFD and decoding resumes at the next byte.
std::vector<uint32_t> utf8_to_cpts(std::string_view s);
// Appends the UTF-8 form of cpt; values above U+10FFFF (only reachable from F5..F7 lead bytes,
// on which llama.cpp throws) are written as U+FFFD.
void append_utf8(std::string& out, uint32_t cpt);
// Length of the longest prefix of s that does not end inside a UTF-8 sequence (streamed text is
// written up to there, so no write splits a character). Bytes that cannot start a sequence count
// as complete.
size_t utf8_complete_prefix(std::string_view s);

// GPT-2 bytes_to_unicode: the printable stand-in for each byte, as UTF-8 text.
const std::string& byte_to_unicode(uint8_t b);
// The inverse: the byte a stand-in code point represents, or -1.
int unicode_to_byte(uint32_t cpt);
// Every byte of `bytes` through byte_to_unicode.
std::string bytes_to_unicode_text(std::string_view bytes);

// Which hand-written splitter of llama.cpp to mirror.
enum class PreTokenizer {
    kQwen2,   // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    kQwen35,  // the same with [\p{L}\p{M}]+ for letter runs
};

// Splits a run of code points into pre-tokens; returns their lengths in code points.
std::vector<size_t> split_words(const std::vector<uint32_t>& cpts, PreTokenizer pre);

}  // namespace moemesh::unicode
