#include "tools/http_request.h"

#include <cmath>
#include <cstdint>

#include <nlohmann/json.hpp>

namespace moemesh {

using json = nlohmann::json;

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

std::string chatml_prompt(const std::vector<std::pair<std::string, std::string>>& messages, bool thinking) {
    std::string s;
    for (const auto& [role, content] : messages) s += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
    return s + "<|im_start|>assistant\n" + (thinking ? "" : "<think>\n\n</think>\n\n");
}

namespace {
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

StatusOr<GenRequest> parse_gen_request_impl(const std::string& body, bool chat, const RequestLimits& lim) {
    const json j = json::parse(body);
    if (!j.is_object()) return MM_ERROR("the request body must be a JSON object, got %s", kind(j).c_str());
    GenRequest r;
    r.chat = chat;
    r.sp = lim.defaults;
    r.ignore_eos = lim.ignore_eos;
    if (chat) {
        auto it = j.find("messages");
        if (it == j.end()) return MM_ERROR("'messages' is required");
        if (!it->is_array() || it->empty()) return bad_field("messages", "a non-empty array of messages", *it);
        std::vector<std::pair<std::string, std::string>> msgs;
        for (size_t i = 0; i < it->size(); ++i) {
            const json& m = (*it)[i];
            if (!m.is_object()) return MM_ERROR("'messages[%zu]' must be an object, got %s", i, kind(m).c_str());
            if (!m.contains("role") || !m["role"].is_string())
                return MM_ERROR("'messages[%zu].role' must be a string", i);
            std::string role = m["role"].get<std::string>();
            if (role == "developer") role = "system";
            if (role != "system" && role != "user" && role != "assistant")
                return MM_ERROR("'messages[%zu].role' is '%s': expected system, user or assistant", i, role.c_str());
            MM_ASSIGN_OR_RETURN(std::string content,
                                message_content(m.contains("content") ? m["content"] : json(), i));
            msgs.emplace_back(role, std::move(content));
        }
        // chat_template_kwargs.enable_thinking (llama.cpp server, vLLM): false skips Qwen3's reasoning.
        bool thinking = true;
        if (auto kw = j.find("chat_template_kwargs"); kw != j.end() && !kw->is_null()) {
            if (!kw->is_object()) return bad_field("chat_template_kwargs", "an object", *kw);
            if (auto et = kw->find("enable_thinking"); et != kw->end() && !et->is_null()) {
                if (!et->is_boolean()) return bad_field("chat_template_kwargs.enable_thinking", "a boolean", *et);
                thinking = et->get<bool>();
            }
        }
        r.prompt = chatml_prompt(msgs, thinking);
    } else {
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
    return r;
}

}  // namespace

}  // namespace moemesh
