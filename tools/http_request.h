// The request side of the OpenAI-compatible HTTP API (tools/http_server.h): parsing and
// validating /v1/completions and /v1/chat/completions bodies, and Qwen's ChatML. Free of HTTP and
// of the model so the libFuzzer target tests/fuzz_http.cpp can build it alone.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "coordinator/sampler.h"

namespace moemesh {

// What the server knows when it validates a request.
struct RequestLimits {
    int64_t n_ctx = 4096;     // prompt + max_tokens must fit
    int64_t n_vocab = 0;      // token ids in a prompt array must be below it
    SamplerParams defaults;   // sampling when the request gives no value
    bool ignore_eos = false;  // the server's --ignore-eos
};

// One validated completion request.
struct GenRequest {
    bool chat = false;
    std::string prompt;            // text (chat: the ChatML-formatted conversation); parsed with specials
    std::vector<int32_t> tokens;   // or token ids (completions with an integer-array prompt)
    int64_t max_tokens = -1;       // -1: until the context is full
    SamplerParams sp;
    std::vector<std::string> stop; // stop strings: generation ends before the first one
    bool stream = false;
    bool ignore_eos = false;
};

// Parses an OpenAI /v1/completions (chat = false) or /v1/chat/completions body. Errors name the
// field and what is wrong ("'max_tokens' must be a non-negative integer, got \"ten\"").
StatusOr<GenRequest> parse_gen_request(const std::string& body, bool chat, const RequestLimits& lim);

// Qwen's ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, then <|im_start|>assistant\n.
// thinking = false appends Qwen3's empty think block (its template's enable_thinking = false).
std::string chatml_prompt(const std::vector<std::pair<std::string, std::string>>& messages, bool thinking = true);

}  // namespace moemesh
