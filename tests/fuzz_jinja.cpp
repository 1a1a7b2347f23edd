// libFuzzer target: the Jinja chat-template interpreter (common/jinja*.cpp) on arbitrary template
// text, rendered against a conversation with tools, as a GGUF's tokenizer.chat_template would be.
// Built with -DMOEMESH_FUZZ=ON (clang). Seeds: the real templates in tests/data/chat_templates.
// A template must parse or fail with a message, and render or fail with a message, within the
// limits: never crash, hang, or exceed the output limit.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/jinja.h"

namespace {

const nlohmann::ordered_json& context() {
    static const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
      "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris? café – 東京"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nLet me check.", "reasoning_content": "hm",
         "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21.5}"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}
      ],
      "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather\nforecast",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                 "days": {"type": "integer", "enum": [1, 3]}}, "required": ["city"]}}}],
      "add_generation_prompt": true, "enable_thinking": false, "bos_token": "<s>", "eos_token": "</s>"
    })");
    return ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string src(reinterpret_cast<const char*>(data), size);
    auto t = moemesh::jinja::Template::parse(src);
    if (!t.ok()) {
        if (t.status().message().empty()) std::abort();
        return 0;
    }
    moemesh::jinja::Limits lim;
    lim.max_output = 1u << 20;
    lim.max_steps = 200'000;
    auto out = t.value().render(context(), lim);
    if (out.ok() && out.value().size() > lim.max_output) std::abort();
    if (!out.ok() && out.status().message().empty()) std::abort();
    return 0;
}
