#include "tools/http_request.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "common/reply_grammar.h"

namespace moemesh {

// ordered: a request's tools reach the chat template, whose tojson keeps their key order
using json = nlohmann::ordered_json;

namespace {

// The JSON type of v in words, for error messages.
std::string kind(const json& v) {
    switch (v.type()) {
        case json::value_t::null: return "null";
        case json::value_t::boolean: return "a boolean";
        case json::value_t::number_integer:
        case json::value_t::number_unsigned: return "an integer";
        case json::value_t::number_float: return "a number";
        case json::value_t::string: return "a string";
        case json::value_t::array: return "an array";
        case json::value_t::object: return "an object";
        default: return "a value";
    }
}

// v as it appeared, shortened for messages.
std::string shown(const json& v) {
    std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return s;
}

Status bad_field(const char* field, const char* want, const json& v) {
    return MM_ERROR("'%s' must be %s, got %s (%s)", field, want, shown(v).c_str(), kind(v).c_str());
}

// Optional number field in [lo, hi] (null or absent: keep *out).
Status number_field(const json& j, const char* field, double lo, double hi, float* out) {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) return Status();
    if (!it->is_number()) return bad_field(field, "a number", *it);
    const double v = it->get<double>();
    if (!(v >= lo && v <= hi)) {
        return MM_ERROR("'%s' must be between %g and %g, got %s", field, lo, hi, shown(*it).c_str());
    }
    *out = static_cast<float>(v);
    return Status();
}

// Optional integer field in [lo, hi].
Status int_field(const json& j, const char* field, int64_t lo, int64_t hi, int64_t* out) {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) return Status();
    if (!it->is_number_integer() && !(it->is_number_float() && std::floor(it->get<double>()) == it->get<double>() &&
                                      std::abs(it->get<double>()) < 9e15))
        return bad_field(field, "an integer", *it);
    const double d = it->get<double>();
    if (d < static_cast<double>(lo) || d > static_cast<double>(hi))
        return MM_ERROR("'%s' must be between %lld and %lld, got %s", field, static_cast<long long>(lo),
                        static_cast<long long>(hi), shown(*it).c_str());
    *out = it->is_number_unsigned() ? static_cast<int64_t>(it->get<uint64_t>()) : it->get<int64_t>();
    if (it->is_number_float()) *out = static_cast<int64_t>(d);
    return Status();
}

// Text of a chat message's content: a string, or an array of {"type": "text", "text": ...} parts.
StatusOr<std::string> message_content(const json& c, size_t i) {
    if (c.is_null()) return std::string();
    if (c.is_string()) return c.get<std::string>();
    if (!c.is_array())
        return MM_ERROR("'messages[%zu].content' must be a string or an array of text parts, got %s", i,
                        kind(c).c_str());
    std::string text;
    for (size_t k = 0; k < c.size(); ++k) {
        const json& part = c[k];
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
            return MM_ERROR("'messages[%zu].content[%zu]' must be an object with a string 'type'", i, k);
        const std::string type = part["type"].get<std::string>();
        if (type != "text")
            return MM_ERROR("'messages[%zu].content[%zu].type' is '%s': only text parts are supported", i, k,
                            type.c_str());
        if (!part.contains("text") || !part["text"].is_string())
            return MM_ERROR("'messages[%zu].content[%zu].text' must be a string", i, k);
        text += part["text"].get<std::string>();
    }
    return text;
}

}  // namespace


namespace {

const ChatFormatter& builtin_chat() {
    static const ChatFormatter kBuiltin = ChatFormatter::create("", "", "").value();
    return kBuiltin;
}

// An assistant message's tool_calls, as templates expect them: arguments an object (OpenAI sends a
// JSON string; Qwen3-Coder's template iterates arguments|items).
StatusOr<json> tool_calls_field(const json& calls, size_t i) {
    if (!calls.is_array()) return MM_ERROR("'messages[%zu].tool_calls' must be an array, got %s", i, kind(calls).c_str());
    json out = json::array();
    for (size_t k = 0; k < calls.size(); ++k) {
        const json& c = calls[k];
        if (!c.is_object() || !c.contains("function") || !c["function"].is_object())
            return MM_ERROR("'messages[%zu].tool_calls[%zu]' must be an object with a 'function' object", i, k);
        const json& f = c["function"];
        if (!f.contains("name") || !f["name"].is_string())
            return MM_ERROR("'messages[%zu].tool_calls[%zu].function.name' must be a string", i, k);
        json args = json::object();
        if (f.contains("arguments") && !f["arguments"].is_null()) {
            const json& a = f["arguments"];
            if (a.is_object()) {
                args = a;
            } else if (a.is_string()) {
                args = json::parse(a.get<std::string>(), nullptr, false);
                if (!args.is_object())
                    return MM_ERROR("'messages[%zu].tool_calls[%zu].function.arguments' must be a JSON object "
                                    "(or a string holding one), got %s", i, k, shown(a).c_str());
            } else {
                return MM_ERROR("'messages[%zu].tool_calls[%zu].function.arguments' must be a JSON object or a "
                                "string holding one, got %s", i, k, kind(a).c_str());
            }
        }
        json call = json::object();
        if (c.contains("id") && c["id"].is_string()) call["id"] = c["id"];
        call["type"] = "function";
        call["function"] = {{"name", f["name"]}, {"arguments", std::move(args)}};
        out.push_back(std::move(call));
    }
    return out;
}

// messages, tools, tool_choice, chat_template_kwargs, add_generation_prompt, reasoning_format.
Status parse_chat_fields(const json& j, ChatFormatter::Input* in, GenRequest* r) {
    auto it = j.find("messages");
    if (it == j.end()) return MM_ERROR("'messages' is required");
    if (!it->is_array() || it->empty()) return bad_field("messages", "a non-empty array of messages", *it);
    for (size_t i = 0; i < it->size(); ++i) {
        const json& m = (*it)[i];
        if (!m.is_object()) return MM_ERROR("'messages[%zu]' must be an object, got %s", i, kind(m).c_str());
        if (!m.contains("role") || !m["role"].is_string()) return MM_ERROR("'messages[%zu].role' must be a string", i);
        std::string role = m["role"].get<std::string>();
        if (role == "developer") role = "system";
        if (role != "system" && role != "user" && role != "assistant" && role != "tool")
            return MM_ERROR("'messages[%zu].role' is '%s': expected system, user, assistant or tool", i, role.c_str());
        json msg = {{"role", role}};
        const json content = m.contains("content") ? m["content"] : json();
        if (content.is_null()) {
            msg["content"] = nullptr;
        } else {
            MM_ASSIGN_OR_RETURN(std::string text, message_content(content, i));
            msg["content"] = std::move(text);
        }
        if (role == "assistant") {
            if (auto rc = m.find("reasoning_content"); rc != m.end() && !rc->is_null()) {
                if (!rc->is_string()) return MM_ERROR("'messages[%zu].reasoning_content' must be a string", i);
                msg["reasoning_content"] = *rc;
            }
            if (auto tc = m.find("tool_calls"); tc != m.end() && !tc->is_null()) {
                MM_ASSIGN_OR_RETURN(json calls, tool_calls_field(*tc, i));
                if (!calls.empty()) msg["tool_calls"] = std::move(calls);
            }
        }
        if (role == "tool") {
            for (const char* f : {"tool_call_id", "name"})
                if (auto x = m.find(f); x != m.end() && !x->is_null()) {
                    if (!x->is_string()) return MM_ERROR("'messages[%zu].%s' must be a string", i, f);
                    msg[f] = *x;
                }
        }
        in->messages.push_back(std::move(msg));
    }
    bool tools_on = true;
    if (auto tc = j.find("tool_choice"); tc != j.end() && !tc->is_null()) {
        if (tc->is_string() && (*tc == "auto" || *tc == "none" || *tc == "required")) {
            tools_on = *tc != "none";
            r->must_call = *tc == "required";
        } else if (tc->is_object() && tc->value("type", json()) == "function" && tc->contains("function") &&
                   (*tc)["function"].is_object() && (*tc)["function"].contains("name") &&
                   (*tc)["function"]["name"].is_string()) {
            r->must_call = true;
            r->must_call_name = (*tc)["function"]["name"].get<std::string>();
        } else {
            return MM_ERROR("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}, got %s",
                            shown(*tc).c_str());
        }
    }
    if (auto p = j.find("parallel_tool_calls"); p != j.end() && !p->is_null()) {
        if (!p->is_boolean()) return bad_field("parallel_tool_calls", "a boolean", *p);
        r->parallel_tool_calls = p->get<bool>();
    }
    if (auto t = j.find("tools"); t != j.end() && !t->is_null()) {
        if (!t->is_array()) return bad_field("tools", "an array of {\"type\": \"function\", \"function\": {...}}", *t);
        for (size_t k = 0; k < t->size(); ++k) {
            const json& tool = (*t)[k];
            if (!tool.is_object() || !tool.contains("function") || !tool["function"].is_object())
                return MM_ERROR("'tools[%zu]' must be an object with a 'function' object", k);
            if (tool.contains("type") && tool["type"] != "function")
                return MM_ERROR("'tools[%zu].type' must be \"function\", got %s", k, shown(tool["type"]).c_str());
            const json& f = tool["function"];
            if (!f.contains("name") || !f["name"].is_string() || f["name"].get<std::string>().empty())
                return MM_ERROR("'tools[%zu].function.name' must be a non-empty string", k);
            if (f.contains("parameters") && !f["parameters"].is_null() && !f["parameters"].is_object())
                return MM_ERROR("'tools[%zu].function.parameters' must be a JSON schema object", k);
        }
        if (tools_on && !t->empty()) {
            in->tools = *t;
            r->tools = *t;
            r->parse_tools = true;
        }
    }
    if (r->must_call && !r->parse_tools)
        return MM_ERROR("'tool_choice' %s needs a non-empty 'tools' array", shown(j["tool_choice"]).c_str());
    // chat_template_kwargs (llama.cpp server, vLLM): extra template variables, e.g. enable_thinking.
    if (auto kw = j.find("chat_template_kwargs"); kw != j.end() && !kw->is_null()) {
        if (!kw->is_object()) return bad_field("chat_template_kwargs", "an object", *kw);
        if (auto et = kw->find("enable_thinking"); et != kw->end() && !et->is_null() && !et->is_boolean())
            return bad_field("chat_template_kwargs.enable_thinking", "a boolean", *et);
        for (const char* reserved : {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
            if (kw->contains(reserved))
                return MM_ERROR("'chat_template_kwargs.%s' cannot be set: the server sets it", reserved);
        in->kwargs = *kw;
    }
    if (auto ag = j.find("add_generation_prompt"); ag != j.end() && !ag->is_null()) {
        if (!ag->is_boolean()) return bad_field("add_generation_prompt", "a boolean", *ag);
        in->add_generation_prompt = ag->get<bool>();
    }
    if (auto rf = j.find("reasoning_format"); rf != j.end() && !rf->is_null()) {
        if (!rf->is_string() || (*rf != "auto" && *rf != "none" && *rf != "deepseek"))
            return bad_field("reasoning_format", "\"auto\" (reasoning in reasoning_content) or \"none\"", *rf);
        r->parse_reasoning = *rf != "none";
    }
    return Status();
}

// "grammar" / "json_schema" / "response_format" / tool_choice "required": at most one, compiled
// into r->grammar. Chat replies of thinking templates may reason first (common/reply_grammar.h).
Status parse_output_constraint(const json& j, bool chat, const RequestLimits& lim, GenRequest* r) {
    const ReplyThinking thinking = !chat                            ? ReplyThinking::kNone
                                   : prompt_opens_think_block(r->prompt) ? ReplyThinking::kOpen
                                   : lim.chat && lim.chat->thinks()      ? ReplyThinking::kOptional
                                                                         : ReplyThinking::kNone;
    std::vector<std::string> given;
    std::string gbnf;
    if (auto g = j.find("grammar"); g != j.end() && !g->is_null()) {
        if (!g->is_string()) return bad_field("grammar", "a string (GBNF, llama.cpp's grammar format)", *g);
        gbnf = g->get<std::string>();
        given.push_back("'grammar'");
    }
    auto schema_reply = [&](const char* field, const json* schema) -> Status {
        StatusOr<std::string> text = json_reply_gbnf(schema, thinking);
        if (!text.ok()) return MM_ERROR("'%s': %s", field, text.status().message().c_str());
        gbnf = std::move(text).value();
        given.push_back(std::string("'") + field + "'");
        return Status();
    };
    if (auto s = j.find("json_schema"); s != j.end() && !s->is_null()) {
        if (!s->is_object() && !s->is_boolean()) return bad_field("json_schema", "a JSON schema object", *s);
        MM_RETURN_IF_ERROR(schema_reply("json_schema", &*s));
    }
    if (auto rf = j.find("response_format"); rf != j.end() && !rf->is_null()) {
        const json type = rf->is_object() ? rf->value("type", json()) : json();
        if (type == "json_object") {
            const json* schema = rf->contains("schema") && (*rf)["schema"].is_object() ? &(*rf)["schema"] : nullptr;
            MM_RETURN_IF_ERROR(schema_reply("response_format", schema));
        } else if (type == "json_schema") {
            const json* js = rf->contains("json_schema") ? &(*rf)["json_schema"] : nullptr;
            if (!js || !js->is_object() || !js->contains("schema") ||
                !((*js)["schema"].is_object() || (*js)["schema"].is_boolean()))
                return MM_ERROR("'response_format.json_schema.schema' must be a JSON schema object");
            MM_RETURN_IF_ERROR(schema_reply("response_format", &(*js)["schema"]));
        } else if (type != "text") {
            return bad_field("response_format",
                             "{\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                             "\"json_schema\": {\"schema\": {...}}}",
                             *rf);
        }
    }
    if (r->must_call) {
        const bool xml = lim.chat && lim.chat->xml_tool_calls();
        StatusOr<std::string> text =
            tool_calls_gbnf(r->tools, r->must_call_name, xml, r->parallel_tool_calls, thinking);
        if (!text.ok()) return text.status();
        gbnf = std::move(text).value();
        given.push_back("'tool_choice'");
    }
    if (given.empty()) return Status();
    if (given.size() > 1)
        return MM_ERROR("%s and %s cannot both constrain one reply", given[0].c_str(), given[1].c_str());
    StatusOr<std::shared_ptr<const Grammar>> g = Grammar::parse(gbnf);
    if (!g.ok()) return MM_ERROR("%s: %s", given[0].c_str(), g.status().message().c_str());
    r->grammar = std::move(g).value();
    return Status();
}

StatusOr<GenRequest> parse_gen_request_impl(const std::string& body, bool chat, const RequestLimits& lim);
}

StatusOr<GenRequest> parse_gen_request(const std::string& body, bool chat, const RequestLimits& lim) {
    try {
        return parse_gen_request_impl(body, chat, lim);
    } catch (const json::exception& e) {  // e.g. a number too large for any type (out_of_range 406)
        return MM_ERROR("the request body is not valid JSON: %s", e.what());
    }
}

namespace {

constexpr int64_t kMaxTopLogprobs = 20;  // OpenAI's limit for top_logprobs

StatusOr<GenRequest> parse_gen_request_impl(const std::string& body, bool chat, const RequestLimits& lim) {
    const json j = json::parse(body);
    if (!j.is_object()) return MM_ERROR("the request body must be a JSON object, got %s", kind(j).c_str());
    GenRequest r;
    r.chat = chat;
    r.sp = lim.defaults;
    r.ignore_eos = lim.ignore_eos;
    ChatFormatter::Input chat_in;
    if (chat) MM_RETURN_IF_ERROR(parse_chat_fields(j, &chat_in, &r));
    if (!chat) {
        auto it = j.find("prompt");
        if (it == j.end()) return MM_ERROR("'prompt' is required");
        const json& p = *it;
        if (p.is_string()) {
            r.prompt = p.get<std::string>();
        } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
            r.prompt = p[0].get<std::string>();
        } else if (p.is_array() && !p.empty() && p[0].is_number()) {
            for (size_t i = 0; i < p.size(); ++i) {
                if (!p[i].is_number_integer() || p[i].get<int64_t>() < 0 || p[i].get<int64_t>() >= lim.n_vocab)
                    return MM_ERROR("'prompt[%zu]' must be a token id in [0, %lld), got %s", i,
                                    static_cast<long long>(lim.n_vocab), shown(p[i]).c_str());
                r.tokens.push_back(static_cast<int32_t>(p[i].get<int64_t>()));
            }
        } else {
            return bad_field("prompt", "a string, an array of one string, or an array of token ids", p);
        }
        if (r.tokens.empty() && r.prompt.empty()) return MM_ERROR("'prompt' is empty");
    }
    // max_tokens (OpenAI), max_completion_tokens (newer OpenAI), n_predict (llama.cpp server).
    for (const char* f : {"max_tokens", "max_completion_tokens", "n_predict"}) {
        int64_t v = -2;
        MM_RETURN_IF_ERROR(int_field(j, f, -1, lim.n_ctx, &v));
        if (v != -2) r.max_tokens = v;
    }
    MM_RETURN_IF_ERROR(number_field(j, "temperature", 0.0, 100.0, &r.sp.temperature));
    MM_RETURN_IF_ERROR(number_field(j, "top_p", 0.0, 1.0, &r.sp.top_p));
    MM_RETURN_IF_ERROR(number_field(j, "min_p", 0.0, 1.0, &r.sp.min_p));
    int64_t top_k = r.sp.top_k, seed = static_cast<int64_t>(r.sp.seed & 0x7fffffffffffffffULL), n = 1;
    MM_RETURN_IF_ERROR(int_field(j, "top_k", 0, 1 << 30, &top_k));
    MM_RETURN_IF_ERROR(int_field(j, "seed", 0, INT64_MAX, &seed));
    MM_RETURN_IF_ERROR(int_field(j, "n", 1, 1 << 20, &n));
    if (n != 1) return MM_ERROR("'n' must be 1 (one choice per request), got %lld", static_cast<long long>(n));
    r.sp.top_k = static_cast<int>(top_k);
    r.sp.seed = static_cast<uint64_t>(seed);
    if (j.contains("temperature") && r.sp.temperature <= 0.0f) r.sp.greedy = true;
    if (j.contains("temperature") && r.sp.temperature > 0.0f) r.sp.greedy = false;
    if (auto it = j.find("stream"); it != j.end() && !it->is_null()) {
        if (!it->is_boolean()) return bad_field("stream", "a boolean", *it);
        r.stream = it->get<bool>();
    }
    if (auto it = j.find("ignore_eos"); it != j.end() && !it->is_null()) {
        if (!it->is_boolean()) return bad_field("ignore_eos", "a boolean", *it);
        r.ignore_eos = it->get<bool>();
    }
    if (auto it = j.find("cache_prompt"); it != j.end() && !it->is_null()) {  // llama.cpp server's field
        if (!it->is_boolean()) return bad_field("cache_prompt", "a boolean", *it);
        r.cache_prompt = it->get<bool>();
    }
    // logprobs: chat {"logprobs": true, "top_logprobs": 0-20}; completions {"logprobs": 0-20}.
    if (chat) {
        bool want = false;
        if (auto it = j.find("logprobs"); it != j.end() && !it->is_null()) {
            if (!it->is_boolean()) return bad_field("logprobs", "a boolean (chat completions)", *it);
            want = it->get<bool>();
        }
        int64_t top = -1;
        MM_RETURN_IF_ERROR(int_field(j, "top_logprobs", 0, kMaxTopLogprobs, &top));
        if (top > 0 && !want) return MM_ERROR("'top_logprobs' needs \"logprobs\": true");
        if (want) r.logprobs = static_cast<int>(std::max<int64_t>(top, 0));
    } else {
        int64_t n_top = -1;
        if (auto it = j.find("logprobs"); it != j.end() && it->is_boolean())
            return bad_field("logprobs", "an integer 0-20 (completions; the number of alternatives per token)", *it);
        MM_RETURN_IF_ERROR(int_field(j, "logprobs", 0, kMaxTopLogprobs, &n_top));
        r.logprobs = static_cast<int>(n_top);
    }
    if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
        if (it->is_string()) {
            r.stop.push_back(it->get<std::string>());
        } else if (it->is_array() && it->size() <= 16) {
            for (size_t i = 0; i < it->size(); ++i) {
                if (!(*it)[i].is_string()) return MM_ERROR("'stop[%zu]' must be a string, got %s", i, kind((*it)[i]).c_str());
                r.stop.push_back((*it)[i].get<std::string>());
            }
        } else {
            return bad_field("stop", "a string or an array of at most 16 strings", *it);
        }
        for (const std::string& s : r.stop)
            if (s.empty() || s.size() > 256) return MM_ERROR("'stop' strings must have 1 to 256 bytes");
    }
    if (chat) {
        StatusOr<std::string> prompt = lim.chat ? lim.chat->apply(chat_in) : builtin_chat().apply(chat_in);
        if (!prompt.ok()) return MM_ERROR("the conversation cannot be formatted: %s", prompt.status().message().c_str());
        r.prompt = std::move(prompt).value();
        if (r.prompt.empty()) return MM_ERROR("the chat template rendered an empty prompt for these messages");
        r.reply_in_think = r.parse_reasoning && prompt_opens_think_block(r.prompt);
    }
    MM_RETURN_IF_ERROR(parse_output_constraint(j, chat, lim, &r));
    return r;
}

}  // namespace

}  // namespace moemesh
