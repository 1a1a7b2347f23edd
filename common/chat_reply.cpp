// Qwen-family reply parsing; the formats and the decisions are described in chat_reply.h.
// The one-shot parse and the stream are written separately on purpose: the tests (and
// tests/fuzz_chat_reply.cpp) check one against the other, which a shared scanner would not test.
// They share only the parse of the tool-call section, which the stream runs once at the end.
#include "common/chat_reply.h"

#include <algorithm>
#include <string>
#include <utility>

namespace moemesh {

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kCallOpen = "<tool_call>";
constexpr std::string_view kCallClose = "</tool_call>";
constexpr std::string_view kFunctionOpen = "<function=";
constexpr std::string_view kFunctionClose = "</function>";
constexpr std::string_view kParamOpen = "<parameter=";
constexpr std::string_view kParamClose = "</parameter>";

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

std::string_view ltrim_ws(std::string_view s) {
    size_t i = 0;
    while (i < s.size() && is_ws(s[i])) ++i;
    return s.substr(i);
}

std::string_view trim_ws(std::string_view s) {
    s = ltrim_ws(s);
    size_t n = s.size();
    while (n > 0 && is_ws(s[n - 1])) --n;
    return s.substr(0, n);
}

bool all_ws(std::string_view s) { return ltrim_ws(s).empty(); }

// Bytes at the end of `text` that could still grow into `tag` (its longest suffix that is a proper
// prefix of the tag): they cannot be emitted until the next piece decides.
size_t partial_tag_len(std::string_view text, std::string_view tag) {
    for (size_t n = std::min(text.size(), tag.size() - 1); n > 0; --n)
        if (text.substr(text.size() - n) == tag.substr(0, n)) return n;
    return 0;
}

// Bytes at the end of `text` that begin a UTF-8 sequence still missing bytes. Tokens of a
// byte-level BPE split characters, and a delta sent as JSON must not end inside one.
size_t partial_utf8_len(std::string_view text) {
    for (size_t k = 1; k <= 3 && k <= text.size(); ++k) {
        const auto c = static_cast<unsigned char>(text[text.size() - k]);
        if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead
        const size_t need = c >= 0xF0 && c <= 0xF7 ? 4 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xC0 && c <= 0xDF ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;  // not UTF-8 (or a complete 4-byte character): nothing to wait for
}

// ---- parameter types from the request's tools -------------------------------------------------

// The JSON schema of `function`'s parameter `param` in an OpenAI tools array (entries
// {"type": "function", "function": {...}}, or the bare function object), or null.
const ordered_json* find_param_schema(const ordered_json* tools, const std::string& function,
                                      const std::string& param) {
    if (tools == nullptr || !tools->is_array()) return nullptr;
    for (const ordered_json& tool : *tools) {
        if (!tool.is_object()) continue;
        const ordered_json* fn = &tool;
        if (auto it = tool.find("function"); it != tool.end() && it->is_object()) fn = &*it;
        auto name = fn->find("name");
        if (name == fn->end() || !name->is_string() || name->get_ref<const std::string&>() != function) continue;
        auto params = fn->find("parameters");
        if (params == fn->end() || !params->is_object()) return nullptr;
        auto props = params->find("properties");
        if (props == params->end() || !props->is_object()) return nullptr;
        auto schema = props->find(param);
        return schema != props->end() && schema->is_object() ? &*schema : nullptr;
    }
    return nullptr;
}

// The JSON types a schema allows: "type" (a name or a list of names) and those of anyOf / oneOf
// alternatives. Nesting is bounded because the schema comes from the request.
void collect_types(const ordered_json& schema, std::vector<std::string>& types, int depth) {
    if (depth > 8 || !schema.is_object()) return;
    if (auto t = schema.find("type"); t != schema.end()) {
        if (t->is_string()) types.push_back(t->get<std::string>());
        if (t->is_array())
            for (const ordered_json& e : *t)
                if (e.is_string()) types.push_back(e.get<std::string>());
    }
    for (const char* key : {"anyOf", "oneOf"}) {
        auto alts = schema.find(key);
        if (alts == schema.end() || !alts->is_array()) continue;
        for (const ordered_json& alt : *alts) collect_types(alt, types, depth + 1);
    }
}

bool type_allowed(const ordered_json& v, const std::vector<std::string>& types) {
    auto has = [&](std::string_view t) { return std::find(types.begin(), types.end(), t) != types.end(); };
    if (v.is_null()) return has("null");
    if (v.is_boolean()) return has("boolean");
    if (v.is_number_integer()) return has("integer") || has("number");  // covers unsigned too
    if (v.is_number()) return has("number");
    if (v.is_object()) return has("object");
    if (v.is_array()) return has("array");
    return false;  // a JSON string literal: the raw text is the string value
}

ordered_json convert_value(const std::string& raw, const ordered_json* schema) {
    if (schema == nullptr) return raw;
    std::vector<std::string> types;
    collect_types(*schema, types, 0);
    if (std::all_of(types.begin(), types.end(), [](const std::string& t) { return t == "string"; })) return raw;
    ordered_json v = ordered_json::parse(raw, nullptr, /*allow_exceptions=*/false);
    if (v.is_discarded()) {
        // Python's spellings, which the Qwen3.5 / Qwen3-Coder templates' |string writes into the
        // prompt for booleans and None, and which the models therefore also write.
        const std::string_view t = trim_ws(raw);
        if (t == "True") v = true;
        else if (t == "False") v = false;
        else if (t == "None") v = nullptr;
        else return raw;
    }
    return type_allowed(v, types) ? v : ordered_json(raw);
}

// ---- tool-call bodies -------------------------------------------------------------------------

bool parse_hermes_body(std::string_view body, ToolCall& call) {
    ordered_json v = ordered_json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (v.is_discarded() || !v.is_object()) return false;
    auto name = v.find("name");
    if (name == v.end() || !name->is_string() || name->get_ref<const std::string&>().empty()) return false;
    auto args = v.find("arguments");
    if (args == v.end()) args = v.find("parameters");
    ordered_json arguments = ordered_json::object();
    if (args != v.end() && !args->is_null()) {
        if (args->is_object()) {
            arguments = std::move(*args);
        } else if (args->is_string()) {  // arguments written as an encoded JSON string, as OpenAI sends them
            arguments = ordered_json::parse(args->get_ref<const std::string&>(), nullptr, false);
            if (arguments.is_discarded() || !arguments.is_object()) return false;
        } else {
            return false;
        }
    }
    call.name = name->get<std::string>();
    call.arguments = std::move(arguments);
    return true;
}

// Where a parameter value that starts `s` ends: the first "</parameter>" followed by another
// parameter, the function's end or nothing, so that a value may contain the closing tag itself.
size_t find_param_end(std::string_view s) {
    for (size_t k = s.find(kParamClose); k != std::string_view::npos; k = s.find(kParamClose, k + 1)) {
        const std::string_view after = ltrim_ws(s.substr(k + kParamClose.size()));
        if (after.empty() || after.starts_with(kParamOpen) || after.starts_with(kFunctionClose)) return k;
    }
    return std::string_view::npos;
}

bool valid_tag_name(std::string_view name) {
    return !name.empty() && name.find_first_of("\n<>") == std::string_view::npos;
}

bool parse_xml_body(std::string_view body, const ReplyFormat& format, ToolCall& call) {
    std::string_view rest = trim_ws(body);
    if (!rest.starts_with(kFunctionOpen)) return false;
    size_t gt = rest.find('>', kFunctionOpen.size());
    if (gt == std::string_view::npos) return false;
    const std::string_view name = trim_ws(rest.substr(kFunctionOpen.size(), gt - kFunctionOpen.size()));
    if (!valid_tag_name(name)) return false;
    call.name = std::string(name);
    call.arguments = ordered_json::object();
    rest = rest.substr(gt + 1);
    for (;;) {
        rest = ltrim_ws(rest);
        // A missing </function> is accepted (vLLM does too): every byte is still accounted for.
        if (rest.empty()) return true;
        if (rest.starts_with(kFunctionClose)) return all_ws(rest.substr(kFunctionClose.size()));
        if (!rest.starts_with(kParamOpen)) return false;
        gt = rest.find('>', kParamOpen.size());
        if (gt == std::string_view::npos) return false;
        const std::string_view param = trim_ws(rest.substr(kParamOpen.size(), gt - kParamOpen.size()));
        if (!valid_tag_name(param)) return false;
        std::string_view value = rest.substr(gt + 1);
        const size_t end = find_param_end(value);
        if (end == std::string_view::npos) return false;
        rest = value.substr(end + kParamClose.size());
        value = value.substr(0, end);
        if (value.starts_with('\n')) value.remove_prefix(1);
        if (value.ends_with('\n')) value.remove_suffix(1);
        const std::string key(param);
        call.arguments[key] = convert_value(std::string(value), find_param_schema(format.tools, call.name, key));
    }
}

bool parse_call_body(std::string_view body, const ReplyFormat& format, ToolCall& call) {
    const std::string_view b = trim_ws(body);
    if (b.starts_with('{')) return parse_hermes_body(b, call);
    if (b.starts_with(kFunctionOpen)) return parse_xml_body(b, format, call);
    return false;
}

// `text` starts with "<tool_call>". Appends the calls and the text that is not part of a valid call
// (malformed or unclosed blocks verbatim, other text unless it is whitespace after a call).
void parse_tool_section(std::string_view text, const ReplyFormat& format, std::string& content,
                        std::vector<ToolCall>& calls) {
    size_t pos = 0;
    while (pos < text.size()) {
        const size_t body = pos + kCallOpen.size();
        const size_t close = text.find(kCallClose, body);
        if (close == std::string_view::npos) {
            content += text.substr(pos);
            return;
        }
        ToolCall call;
        const bool ok = parse_call_body(text.substr(body, close - body), format, call);
        const size_t after = close + kCallClose.size();
        if (ok) {
            call.id = format.id_prefix + std::to_string(calls.size());
            calls.push_back(std::move(call));
        } else {
            content += text.substr(pos, after - pos);
        }
        size_t next = text.find(kCallOpen, after);
        if (next == std::string_view::npos) next = text.size();
        const std::string_view between = text.substr(after, next - after);
        if (!(ok && all_ws(between))) content += between;
        pos = next;
    }
}

}  // namespace

AssistantReply parse_assistant_reply(std::string_view text, const ReplyFormat& format) {
    AssistantReply r;
    std::string_view rest = text;
    const std::string_view lead = ltrim_ws(text);
    bool in_think = format.starts_in_think;
    std::string_view think = text;
    if (lead.starts_with(kThinkOpen)) {
        in_think = true;
        think = lead.substr(kThinkOpen.size());
    }
    if (in_think) {
        const size_t close = think.find(kThinkClose);
        const size_t call = format.parse_tools ? think.find(kCallOpen) : std::string_view::npos;
        if (call < close) {
            r.reasoning = trim_ws(think.substr(0, call));
            rest = think.substr(call);
        } else if (close != std::string_view::npos) {
            r.reasoning = trim_ws(think.substr(0, close));
            rest = ltrim_ws(think.substr(close + kThinkClose.size()));
        } else {
            r.reasoning = trim_ws(think);
            rest = {};
        }
    }
    const size_t first = format.parse_tools ? rest.find(kCallOpen) : std::string_view::npos;
    if (first == std::string_view::npos) {
        r.content = rest;
        return r;
    }
    r.content = rest.substr(0, first);
    parse_tool_section(rest.substr(first), format, r.content, r.tool_calls);
    return r;
}

ReplyStream::ReplyStream(ReplyFormat format) : format_(std::move(format)) {}

ReplyStream::Delta ReplyStream::feed(std::string_view piece) {
    Delta out;
    if (state_ == State::kDone) return out;
    buf_ += piece;
    advance(false, out);
    return out;
}

ReplyStream::Delta ReplyStream::finish(std::vector<ToolCall>* tool_calls) {
    Delta out;
    if (tool_calls != nullptr) tool_calls->clear();
    if (state_ == State::kDone) return out;
    advance(true, out);
    if (tool_calls != nullptr) *tool_calls = std::move(calls_);
    calls_.clear();
    return out;
}

void ReplyStream::emit_reasoning(std::string_view text, Delta& out) {
    for (char c : text) {
        if (is_ws(c)) {
            if (reasoning_started_) reasoning_ws_ += c;  // leading whitespace is dropped outright
            continue;
        }
        out.reasoning += reasoning_ws_;
        reasoning_ws_.clear();
        out.reasoning += c;
        reasoning_started_ = true;
    }
}

void ReplyStream::advance(bool final, Delta& out) {
    for (;;) {
        const std::string_view b = buf_;
        switch (state_) {
        case State::kStart: {
            const std::string_view lead = ltrim_ws(b);
            if (lead.starts_with(kThinkOpen)) {
                buf_.erase(0, b.size() - lead.size() + kThinkOpen.size());
                state_ = State::kThink;
                continue;
            }
            if (!final && kThinkOpen.starts_with(lead)) return;  // still may become "<think>"
            // Not a think block: the held bytes are reasoning (already inside one) or content.
            state_ = format_.starts_in_think ? State::kThink : State::kContent;
            continue;
        }
        case State::kThink: {
            const size_t close = b.find(kThinkClose);
            const size_t call = format_.parse_tools ? b.find(kCallOpen) : std::string_view::npos;
            if (call < close) {
                emit_reasoning(b.substr(0, call), out);
                reasoning_ws_.clear();
                buf_.erase(0, call);  // the section starts at the "<tool_call>"
                state_ = State::kTools;
                continue;
            }
            if (close != std::string_view::npos) {
                emit_reasoning(b.substr(0, close), out);
                reasoning_ws_.clear();
                buf_.erase(0, close + kThinkClose.size());
                state_ = State::kAfterThink;
                continue;
            }
            if (final) {
                emit_reasoning(b, out);
                reasoning_ws_.clear();
                buf_.clear();
                state_ = State::kDone;
                return;
            }
            size_t hold = partial_tag_len(b, kThinkClose);
            if (format_.parse_tools) hold = std::max(hold, partial_tag_len(b, kCallOpen));
            size_t n = b.size() - hold;
            n -= partial_utf8_len(b.substr(0, n));
            emit_reasoning(b.substr(0, n), out);
            buf_.erase(0, n);
            return;
        }
        case State::kAfterThink: {
            buf_.erase(0, b.size() - ltrim_ws(b).size());
            if (buf_.empty()) {
                if (final) state_ = State::kDone;
                return;
            }
            state_ = State::kContent;
            continue;
        }
        case State::kContent: {
            const size_t call = format_.parse_tools ? b.find(kCallOpen) : std::string_view::npos;
            if (call != std::string_view::npos) {
                out.content += b.substr(0, call);
                buf_.erase(0, call);
                state_ = State::kTools;
                continue;
            }
            if (final) {
                out.content += b;
                buf_.clear();
                state_ = State::kDone;
                return;
            }
            size_t n = b.size() - (format_.parse_tools ? partial_tag_len(b, kCallOpen) : 0);
            n -= partial_utf8_len(b.substr(0, n));
            out.content += b.substr(0, n);
            buf_.erase(0, n);
            return;
        }
        case State::kTools:
            if (!final) return;
            parse_tool_section(b, format_, out.content, calls_);
            buf_.clear();
            state_ = State::kDone;
            return;
        case State::kDone:
            return;
        }
    }
}

}  // namespace moemesh
