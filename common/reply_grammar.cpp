#include "common/reply_grammar.h"

#include <cstdio>
#include <set>

#include "common/json_schema_grammar.h"

namespace moemesh {

namespace {

using ojson = nlohmann::ordered_json;

std::string hex_escape(unsigned char c) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "\\x%02X", c);
    return buf;
}

// Whitespace between the parts of a reply (bounded: a model cannot loop on it).
constexpr const char* kReplyWs = "reply-ws ::= [ \\t\\r\\n]{0,40}\n";

// The rule `root` starts with: the reasoning part, then "reply-ws".
std::string thinking_rules(ReplyThinking thinking, std::string* prefix) {
    switch (thinking) {
        case ReplyThinking::kNone: *prefix = "reply-ws"; return "";
        case ReplyThinking::kOptional:
            *prefix = "think? reply-ws";
            return "think ::= \"<think>\" think-body\n" + gbnf_until("think-body", "</think>");
        case ReplyThinking::kOpen: *prefix = "think-body reply-ws"; return gbnf_until("think-body", "</think>");
    }
    return "";
}

// A function's parameter schema as the arguments object's schema.
ojson arguments_schema(const ojson& function) {
    ojson params = function.contains("parameters") && function["parameters"].is_object() ? function["parameters"]
                                                                                          : ojson::object();
    if (!params.contains("type")) params["type"] = "object";
    return params;
}

}  // namespace

std::string gbnf_literal(std::string_view bytes) {
    std::string out = "\"";
    for (char ch : bytes) {
        const auto c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c == '\n') {
            out += "\\n";
        } else if (c < 0x20 || c == 0x7F) {
            out += hex_escape(c);
        } else {
            out += ch;  // printable ASCII, or UTF-8 (the GBNF parser reads it as code points)
        }
    }
    return out + "\"";
}

std::string gbnf_until(const std::string& name, std::string_view t) {
    // State k: the last k characters read are t's first k. A terminator character moves to the
    // longest prefix of t that ends the text; any other character back to state 0; state |t| is
    // the end (the alternative stops there).
    const size_t n = t.size();
    std::set<unsigned char> alphabet(t.begin(), t.end());
    auto state = [&](size_t k) { return k == 0 ? name : name + "-" + std::to_string(k); };
    auto next = [&](size_t k, char c) {
        const std::string seen = std::string(t.substr(0, k)) + c;
        for (size_t l = std::min(seen.size(), n); l > 0; --l)
            if (seen.compare(seen.size() - l, l, t.substr(0, l)) == 0) return l;
        return size_t{0};
    };
    std::string others = "[^";
    for (unsigned char c : alphabet) others += hex_escape(c);
    others += "]";
    std::string out;
    for (size_t k = 0; k < n; ++k) {
        out += state(k) + " ::= ";
        bool first = true;
        for (unsigned char c : alphabet) {
            const size_t to = next(k, static_cast<char>(c));
            out += (first ? "" : " | ") + gbnf_literal(std::string(1, static_cast<char>(c)));
            if (to < n) out += " " + state(to);
            first = false;
        }
        out += " | " + others + " " + state(0) + "\n";
    }
    return out;
}

StatusOr<std::string> json_reply_gbnf(const nlohmann::ordered_json* schema, ReplyThinking thinking) {
    std::string value;
    if (schema) {
        MM_ASSIGN_OR_RETURN(value, json_schema_to_gbnf(*schema, "value"));
    } else {
        value = json_any_gbnf("value", /*object_only=*/true);
    }
    std::string prefix;
    const std::string think = thinking_rules(thinking, &prefix);
    return "root ::= " + prefix + " value reply-ws\n" + kReplyWs + think + value;
}

StatusOr<std::string> tool_calls_gbnf(const nlohmann::ordered_json& tools, const std::string& only, bool xml,
                                      bool parallel, ReplyThinking thinking) {
    if (!tools.is_array() || tools.empty()) return MM_ERROR("'tool_choice' needs 'tools'");
    std::string rules, alternatives;
    size_t used = 0;
    for (size_t i = 0; i < tools.size(); ++i) {
        const ojson& tool = tools[i];
        if (!tool.is_object() || !tool.contains("function") || !tool["function"].is_object() ||
            !tool["function"].contains("name") || !tool["function"]["name"].is_string())
            return MM_ERROR("tools[%zu] must be {\"type\": \"function\", \"function\": {\"name\": ...}}", i);
        const ojson& f = tool["function"];
        const std::string name = f["name"].get<std::string>();
        if (!only.empty() && name != only) continue;
        const std::string fn = "fn-" + std::to_string(i);
        alternatives += (used++ ? " | " : "") + fn;
        if (!xml) {
            // {"name": "NAME", "arguments": {...}}
            const std::string args = fn + "-args";
            StatusOr<std::string> schema = json_schema_to_gbnf(arguments_schema(f), args);
            if (!schema.ok())
                return MM_ERROR("tools[%zu].function.parameters: %s", i, schema.status().message().c_str());
            rules += fn + " ::= \"{\" call-ws \"\\\"name\\\"\" call-ws \":\" call-ws " +
                     gbnf_literal(ojson(name).dump()) + " call-ws \",\" call-ws \"\\\"arguments\\\"\" call-ws \":\" call-ws " +
                     args + " call-ws \"}\"\n" + schema.value();
            continue;
        }
        // <function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n...</function>: the declared
        // parameters in order, the required ones present. A string value is text (up to maxLength
        // characters when given); other types are JSON for their schema, as the reply parser reads
        // them back.
        const ojson params = arguments_schema(f);
        std::string body;
        if (params.contains("properties") && params["properties"].is_object() && !params["properties"].empty()) {
            std::set<std::string> required;
            if (params.contains("required") && params["required"].is_array())
                for (const ojson& r : params["required"])
                    if (r.is_string()) required.insert(r.get<std::string>());
            size_t k = 0;
            for (auto it = params["properties"].begin(); it != params["properties"].end(); ++it, ++k) {
                const std::string p = fn + "-p" + std::to_string(k);
                const ojson& ps = it.value();
                std::string value;
                if (ps.is_object() && ps.value("type", ojson()) == "string" && !ps.contains("enum") && !ps.contains("const")) {
                    const ojson max_len = ps.value("maxLength", ojson());
                    value = max_len.is_number_unsigned() && max_len.get<uint64_t>() <= 4096
                                ? "\"\\n\" .{0," + std::to_string(max_len.get<uint64_t>()) + "} \"\\n</parameter>\""
                                : "param-text";
                } else {
                    StatusOr<std::string> schema = json_schema_to_gbnf(ps, p + "-json");
                    if (!schema.ok())
                        return MM_ERROR("tools[%zu].function.parameters.properties.%s: %s", i, it.key().c_str(),
                                        schema.status().message().c_str());
                    rules += schema.value();
                    value = "\"\\n\" " + p + "-json \"\\n</parameter>\"";
                }
                rules += p + " ::= " + gbnf_literal("<parameter=" + it.key() + ">") + " " + value + " reply-ws\n";
                body += " " + p + (required.count(it.key()) ? "" : "?");
            }
        } else {
            rules += fn + "-any ::= \"<parameter=\" [^>\\n]+ \">\" param-text reply-ws\n";
            body = " " + fn + "-any*";
        }
        rules += fn + " ::= " + gbnf_literal("<function=" + name + ">") + " reply-ws" + body + " \"</function>\"\n";
    }
    if (used == 0) return MM_ERROR("'tool_choice' names function '%s', which is not in 'tools'", only.c_str());
    std::string prefix;
    const std::string think = thinking_rules(thinking, &prefix);
    std::string out = "root ::= " + prefix + " call " + (parallel ? "( reply-ws call )* " : "") + "reply-ws\n";
    out += "call ::= \"<tool_call>\" reply-ws ( " + alternatives + " ) reply-ws \"</tool_call>\"\n";
    out += std::string(kReplyWs) + "call-ws ::= [ \\t\\n]{0,20}\n" + think + rules;
    if (xml) out += gbnf_until("param-text", "</parameter>");
    return out;
}

}  // namespace moemesh
