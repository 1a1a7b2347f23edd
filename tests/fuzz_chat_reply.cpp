// libFuzzer target: the assistant-reply parser (common/chat_reply.cpp) on arbitrary generated text.
// Built with -DMOEMESH_FUZZ=ON (clang). Input: byte 0 picks the format (starts_in_think,
// parse_tools, whether a tools schema is given), byte 1 seeds where the text is cut into stream
// pieces, the rest is the text. The stream's concatenated deltas must equal the one-shot parse,
// with the same tool calls, every call's arguments must be an object, and nothing may crash.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "common/chat_reply.h"

namespace {

const nlohmann::ordered_json& fuzz_tools() {
    static const nlohmann::ordered_json tools = nlohmann::ordered_json::parse(R"([
      {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"}, "o": {"type": "object"},
        "a": {"type": "array"}, "s": {"type": "string"}, "u": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "m": {"type": ["integer", "string"]}}}}}
    ])");
    return tools;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 2) return 0;
    moemesh::ReplyFormat f;
    f.starts_in_think = data[0] & 1;
    f.parse_tools = data[0] & 2;
    f.tools = (data[0] & 4) ? &fuzz_tools() : nullptr;
    uint32_t rng = data[1] * 2654435761u + 1;
    const std::string_view text(reinterpret_cast<const char*>(data + 2), size - 2);

    const moemesh::AssistantReply want = moemesh::parse_assistant_reply(text, f);
    moemesh::ReplyStream s(f);
    std::string content, reasoning;
    size_t at = 0;
    while (at < text.size()) {
        rng = rng * 1664525u + 1013904223u;
        const size_t n = 1 + (rng >> 16) % 8;  // pieces of 1..8 bytes, as tokens are
        const moemesh::ReplyStream::Delta d = s.feed(text.substr(at, n));
        content += d.content;
        reasoning += d.reasoning;
        at += n;
    }
    std::vector<moemesh::ToolCall> calls;
    const moemesh::ReplyStream::Delta d = s.finish(&calls);
    content += d.content;
    reasoning += d.reasoning;

    if (content != want.content || reasoning != want.reasoning) std::abort();
    if (calls.size() != want.tool_calls.size()) std::abort();
    for (size_t i = 0; i < calls.size(); ++i) {
        if (calls[i].id != want.tool_calls[i].id || calls[i].name != want.tool_calls[i].name) std::abort();
        if (calls[i].arguments != want.tool_calls[i].arguments || !calls[i].arguments.is_object()) std::abort();
        if (calls[i].name.empty()) std::abort();
    }
    if (!f.parse_tools && !want.tool_calls.empty()) std::abort();
    // Nothing is lost but tags and whitespace: the parts cannot outgrow the text.
    if (want.content.size() + want.reasoning.size() > text.size()) std::abort();
    return 0;
}
