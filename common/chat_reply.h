// Turning a Qwen-family model's generated assistant text into OpenAI chat fields: content,
// reasoning_content and tool_calls. The formats come from the models' chat templates:
//  - Reasoning: "<think>\n...\n</think>\n\n" at the start of the reply. Qwen3.5 (and Qwen3 thinking
//    models) put "<think>\n" into the generation prompt, so their replies start inside the block and
//    have no opening tag: ReplyFormat::starts_in_think. A leading "<think>" is accepted in that
//    mode too (some models repeat it) and is not part of the reasoning.
//  - Tool calls, one or more <tool_call>...</tool_call> blocks whose body is either
//      hermes / Qwen3:          {"name": "f", "arguments": {...}}
//      Qwen3-Coder / Qwen3.5:   <function=f>\n<parameter=p>\nVALUE\n</parameter>\n...</function>
//    (told apart by the body's first character, so one parser serves every Qwen model).
//
// Decisions, each matching llama.cpp's or vLLM's parsers where those agree:
//  - reasoning_content is the think block's text trimmed of surrounding whitespace (the Qwen3.5
//    template re-renders it with |trim, llama.cpp expects "I'm\nthinking" from
//    "I'm\nthinking\n</think>"); content after "</think>" loses its leading whitespace. A reply
//    without "</think>" is reasoning to its end. With parse_tools, a "<tool_call>" inside the think
//    block also ends it (llama.cpp does this for Qwen3.5, which sometimes calls a tool without
//    closing its thoughts). Without any think block, content is the text verbatim.
//  - Content before the first <tool_call> is kept verbatim (llama.cpp keeps "Let me call it.\n").
//    Text between or after tool calls is appended to content unless it is only whitespace (the
//    "\n" separators): the templates forbid it, but text is never dropped.
//  - A <tool_call> with no </tool_call> (generation stopped by max_tokens), or whose body is not
//    one of the two forms, stays in content as raw text, tags included. Parsing never fails.
//  - XML parameter values: exactly one leading and one trailing "\n" are removed (the template
//    writes "<parameter=p>\n" + value + "\n</parameter>\n"). A value ends at the first
//    "</parameter>" followed by another <parameter=, </function> or the body's end, so a value may
//    contain "<", "</html>" and even "</parameter>" elsewhere. Without a schema for the parameter
//    (no tools, unknown function or parameter, no "type") the value stays a string, as vLLM's
//    qwen3coder parser does: a model writing `42` for an untyped parameter may mean the text.
//    With a schema type (a string, an array of them, or anyOf/oneOf alternatives): a string-only
//    type keeps the text; otherwise the value is JSON-parsed (Python's True/False/None, which the
//    template's |string writes for booleans and null, count as true/false/null) and kept if its
//    JSON type is allowed, else it falls back to the string.
//  - Hermes bodies: "arguments" (or "parameters") an object, a string holding a JSON object, or
//    absent (= {}); anything else is malformed. Their values are kept as the model wrote them.
//  - Tool names are not checked against `tools`: a call to an unknown function reaches the client
//    rather than being hidden in content.
//  - Ids are id_prefix + the call's index in the reply ("call_0", "call_1"): deterministic, so the
//    server chooses uniqueness across requests by the prefix it passes.
//
// Strings are returned as generated. A reply cut inside a multibyte character can hold invalid
// UTF-8; dump JSON built from it with nlohmann::json::error_handler_t::replace.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moemesh {

struct ToolCall {
    std::string id;
    std::string name;
    nlohmann::ordered_json arguments = nlohmann::ordered_json::object();  // always an object
};

struct AssistantReply {
    std::string content;
    std::string reasoning;  // OpenAI-compatible servers' "reasoning_content"
    std::vector<ToolCall> tool_calls;
};

struct ReplyFormat {
    bool starts_in_think = false;  // the generation prompt ended with "<think>\n"
    bool parse_tools = false;      // the request has tools (and tool_choice is not "none")
    // The request's OpenAI "tools" array, for parameter types of XML-style calls; may be null. Must
    // outlive the parse / the ReplyStream.
    const nlohmann::ordered_json* tools = nullptr;
    std::string id_prefix = "call_";
};

AssistantReply parse_assistant_reply(std::string_view text, const ReplyFormat& format);

// Incremental form of parse_assistant_reply for streaming responses. feed() returns the content and
// reasoning that can be sent now and will never need taking back; concatenating every delta of
// feed() and finish() gives exactly parse_assistant_reply's content and reasoning, however the text
// was split. Held back until decided: text that may begin "<think>" (at the start), "</think>"
// (inside the think block) or "<tool_call>" (with parse_tools), whitespace that trimming may drop,
// and an incomplete UTF-8 sequence at the end (so deltas of valid UTF-8 text are valid UTF-8).
// From the first <tool_call> on, everything is buffered: finish() parses it.
class ReplyStream {
public:
    struct Delta {
        std::string content;
        std::string reasoning;
        bool empty() const { return content.empty() && reasoning.empty(); }
    };

    explicit ReplyStream(ReplyFormat format);

    Delta feed(std::string_view piece);
    // Ends the reply: returns the held text and, in *tool_calls (may be null), the parsed calls.
    // Further feed() / finish() calls return nothing.
    Delta finish(std::vector<ToolCall>* tool_calls);

    // A <tool_call> has started: the rest of the reply is buffered until finish().
    bool in_tool_calls() const { return state_ == State::kTools; }

private:
    enum class State { kStart, kThink, kAfterThink, kContent, kTools, kDone };

    // Moves through the buffer as far as the text seen so far decides; `final` decides the rest.
    void advance(bool final, Delta& out);
    void emit_reasoning(std::string_view text, Delta& out);

    ReplyFormat format_;
    State state_ = State::kStart;
    std::string buf_;                 // received, not yet emitted or consumed
    bool reasoning_started_ = false;  // a non-whitespace reasoning byte was emitted
    std::string reasoning_ws_;        // whitespace inside the reasoning, emitted if more text follows
    std::vector<ToolCall> calls_;     // parsed by finish()
};

}  // namespace moemesh
