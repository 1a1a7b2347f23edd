// Grammars (GBNF text, common/grammar.h) for what a reply must look like when a request constrains
// it: a JSON value (OpenAI response_format json_object / json_schema), or tool calls (tool_choice
// "required" or a named function) in the chat template's own call format — Qwen3's
// <tool_call>{"name": ..., "arguments": {...}}</tool_call> or Qwen3-Coder / Qwen3.5's
// <tool_call><function=NAME><parameter=P>VALUE</parameter></function></tool_call>.
//
// Thinking models write reasoning first. The grammar leaves it free: an optional
// "<think>...</think>" block (any text up to the first "</think>"), or, when the generation prompt
// already opened the block, any text up to "</think>"; the constrained part follows it.
#pragma once
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace moemesh {

enum class ReplyThinking {
    kNone,      // no think block
    kOptional,  // the reply may open with <think>...</think>
    kOpen,      // the prompt opened the block: the reply starts inside it
};

// A JSON value after the reasoning: one matching `schema`, or any JSON object when schema is null.
StatusOr<std::string> json_reply_gbnf(const nlohmann::ordered_json* schema, ReplyThinking thinking);

// One or more (`parallel`) tool calls after the reasoning, and nothing else; `only` names the one
// function allowed ("" any of `tools`, the request's OpenAI tools array). Arguments follow each
// function's parameter schema. In the XML form the declared parameters come in order (the
// required ones present); a string value is text (up to maxLength characters when given, else up to
// "</parameter>"), any other value JSON for its schema.
StatusOr<std::string> tool_calls_gbnf(const nlohmann::ordered_json& tools, const std::string& only, bool xml,
                                      bool parallel, ReplyThinking thinking);

// Helpers, exposed for tests.
std::string gbnf_literal(std::string_view bytes);  // "..." matching exactly these bytes
// Rules `name` (+ `name-N` helpers) matching any text up to and including the first occurrence
// of `terminator` (a KMP automaton as right-recursive rules).
std::string gbnf_until(const std::string& name, std::string_view terminator);

}  // namespace moemesh
