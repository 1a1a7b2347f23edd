// The request side of the OpenAI-compatible HTTP API (tools/http_server.h): parsing and
// validating /v1/completions and /v1/chat/completions bodies, and formatting chat conversations. Free of HTTP and
// of the model so the libFuzzer target tests/fuzz_http.cpp can build it alone.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/chat_template.h"
#include "common/grammar.h"
#include "common/status.h"
#include "coordinator/sampler.h"

namespace moemesh {

// What the server knows when it validates a request.
struct RequestLimits {
    int64_t n_ctx = 4096;     // prompt + max_tokens must fit
    int64_t n_vocab = 0;      // token ids in a prompt array must be below it
    SamplerParams defaults;   // sampling when the request gives no value
    bool ignore_eos = false;  // the server's --ignore-eos
    const ChatFormatter* chat = nullptr;  // formats chat requests; null: the built-in ChatML template
};

// One validated completion request.
struct GenRequest {
    bool chat = false;
    std::string prompt;            // text (chat: the conversation as the chat template renders it); parsed with specials
    std::vector<int32_t> tokens;   // or token ids (completions with an integer-array prompt)
    int64_t max_tokens = -1;       // -1: until the context is full
    SamplerParams sp;
    std::vector<std::string> stop; // stop strings: generation ends before the first one
    bool stream = false;
    bool ignore_eos = false;
    bool cache_prompt = true;      // reuse a finished request's sequence that shares the prompt's start
    // Log-probabilities of the generated tokens: -1 none; else with this many most likely
    // alternatives per token (chat: "logprobs": true + "top_logprobs"; completions: "logprobs": N).
    int logprobs = -1;
    // chat: how to read the reply (common/chat_reply.h)
    bool parse_reasoning = true;   // <think> text goes to reasoning_content ("reasoning_format": "none": off)
    bool reply_in_think = false;   // the prompt ends inside a think block (Qwen3.5's generation prompt)
    bool parse_tools = false;      // the request has tools and tool_choice is not "none"
    nlohmann::ordered_json tools;  // the request's tools (parameter types of XML-style calls)
    // Constrained output (common/grammar.h): every reply matches this grammar (null: none). From
    // "grammar" (GBNF text, as llama.cpp's server takes it), "json_schema", "response_format"
    // (json_object / json_schema), or chat "tool_choice" "required" / {"type": "function", ...}.
    std::shared_ptr<const Grammar> grammar;
    bool must_call = false;          // tool_choice "required" or a named function
    std::string must_call_name;      // the named function ("" any)
    bool parallel_tool_calls = true;
};

// Parses an OpenAI /v1/completions (chat = false) or /v1/chat/completions body. Errors name the
// field and what is wrong ("'max_tokens' must be a non-negative integer, got \"ten\"").
StatusOr<GenRequest> parse_gen_request(const std::string& body, bool chat, const RequestLimits& lim);


}  // namespace moemesh
