// ChatFormatter (common/chat_template.h) and the Jinja interpreter's guards against hostile
// templates (a GGUF's tokenizer.chat_template is untrusted input): limits on work, output size and
// nesting, and errors that name the template line.
#include <gtest/gtest.h>

#include <string>

#include "common/chat_template.h"
#include "common/jinja.h"

namespace moemesh {
namespace {

using nlohmann::ordered_json;

std::string render_error(const std::string& src, const jinja::Limits& lim = {}) {
    auto t = jinja::Template::parse(src, "t");
    if (!t.ok()) return t.status().message();
    auto r = t.value().render(ordered_json::object(), lim);
    return r.ok() ? "rendered: " + r.value().substr(0, 40) : r.status().message();
}

TEST(JinjaLimits, LoopsThatDoNotEndAreStopped) {
    jinja::Limits lim;
    lim.max_steps = 100000;
    EXPECT_NE(render_error("{% for i in range(100000000) %}x{% endfor %}", lim).find("too long"), std::string::npos);
    EXPECT_NE(render_error("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", lim)
                  .find("too long"),
              std::string::npos);
}

TEST(JinjaLimits, OutputAndValuesAreBounded) {
    jinja::Limits lim;
    lim.max_output = 1 << 16;
    EXPECT_NE(render_error("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                           "{% endfor %}{{ ns.s }}",
                           lim)
                  .find("grows past"),
              std::string::npos);
    EXPECT_NE(render_error("{{ 'x' * 100000000000 }}", lim).find("grows past"), std::string::npos);
    EXPECT_NE(render_error("{% for i in range(100000) %}abcdefgh{% endfor %}", lim).find("grows past"),
              std::string::npos);
}

TEST(JinjaLimits, RecursionAndNestingAreBounded) {
    EXPECT_NE(render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("nested too deeply"),
              std::string::npos);
    EXPECT_NE(render_error("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("too deeply"),
              std::string::npos);
    std::string blocks;
    for (int i = 0; i < 5000; ++i) blocks += "{% if true %}";
    EXPECT_NE(render_error(blocks).find("too deeply"), std::string::npos);
    EXPECT_NE(render_error("{{ x }}").find("rendered"), std::string::npos);  // undefined prints as ""
}

// Found by fuzz_jinja in CI: `{% endmacro name %}` read the macro after it had been moved.
TEST(JinjaSyntax, EndmacroMayNameTheMacro) {
    auto t = jinja::Template::parse("{% macro m(x) %}<{{ x }}>{% endmacro m %}{{ m(1) }}{{ m('a') }}", "t");
    ASSERT_TRUE(t.ok()) << t.status().message();
    auto r = t.value().render(ordered_json::object());
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r.value(), "<1><a>");
    EXPECT_FALSE(jinja::Template::parse("{% macro m() %}x{% endmacro other %}", "t").ok());
}

TEST(JinjaErrors, NameTheLineAndTheProblem) {
    EXPECT_EQ(render_error("a\nb\n{% for x in y %}\n"),
              "t line 3: the block opened on line 3 is never closed (missing '{% endfor %}')");
    EXPECT_NE(render_error("a\n{{ 'unterminated }}").find("t line 2: unterminated string literal"), std::string::npos);
    EXPECT_NE(render_error("{% endif %}").find("without its opening statement"), std::string::npos);
    EXPECT_NE(render_error("{% include 'x' %}").find("not supported"), std::string::npos);
    EXPECT_NE(render_error("\n\n{{ 1 + 'a' }}").find("t line 3: unsupported operand types for +: int and str"),
              std::string::npos);
    EXPECT_NE(render_error("{{ raise_exception('Bad roles') }}").find("the template raised an error: Bad roles"),
              std::string::npos);
    EXPECT_NE(render_error("{{ x | nosuchfilter }}").find("unknown filter 'nosuchfilter'"), std::string::npos);
}

TEST(ChatFormatter, BuiltinTemplateIsChatMl) {
    auto f = ChatFormatter::create("", "", "");
    ASSERT_TRUE(f.ok()) << f.status().message();
    EXPECT_TRUE(f.value().is_builtin());
    ChatFormatter::Input in;
    in.messages = ordered_json::parse(R"([{"role":"system","content":"S"},{"role":"user","content":"Hi"},
        {"role":"assistant","content":null},{"role":"tool","content":"42"}])");
    auto p = f.value().apply(in);
    ASSERT_TRUE(p.ok()) << p.status().message();
    EXPECT_EQ(p.value(),
              "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
              "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n");
    in.kwargs = {{"enable_thinking", false}};
    in.add_generation_prompt = true;
    EXPECT_EQ(f.value().apply(in).value().substr(p.value().size()), "<think>\n\n</think>\n\n");
    in.add_generation_prompt = false;
    EXPECT_EQ(f.value().apply(in).value().size(), p.value().size() - std::string("<|im_start|>assistant\n").size());
}

TEST(ChatFormatter, VariablesAsTransformersSetsThem) {
    // tools: None without tools (an empty list too); bos/eos tokens; kwargs as variables.
    const std::string src =
        "{{ tools is none }}|{{ tools | length if tools else 0 }}|{{ bos_token }}|{{ eos_token }}|"
        "{{ add_generation_prompt }}|{{ custom }}|{{ messages | length }}";
    auto f = ChatFormatter::create(src, "<s>", "</s>", "custom");
    ASSERT_TRUE(f.ok());
    ChatFormatter::Input in;
    in.messages = ordered_json::parse(R"([{"role":"user","content":"x"}])");
    in.kwargs = {{"custom", "yes"}};
    EXPECT_EQ(f.value().apply(in).value(), "True|0|<s>|</s>|True|yes|1");
    in.tools = ordered_json::array();
    EXPECT_EQ(f.value().apply(in).value(), "True|0|<s>|</s>|True|yes|1");
    in.tools = ordered_json::parse(R"([{"type":"function","function":{"name":"f"}}])");
    EXPECT_EQ(f.value().apply(in).value(), "False|1|<s>|</s>|True|yes|1");
}

TEST(ChatFormatter, BrokenTemplatesFailAtCreation) {
    auto f = ChatFormatter::create("{% for m in messages %}", "", "", "the model's chat template");
    ASSERT_FALSE(f.ok());
    EXPECT_NE(f.status().message().find("the model's chat template line 1"), std::string::npos);
}

TEST(ChatFormatter, ThinkBlockOpenedByThePrompt) {
    EXPECT_TRUE(prompt_opens_think_block("<|im_start|>assistant\n<think>\n"));
    EXPECT_TRUE(prompt_opens_think_block("<|im_start|>assistant\n<think>"));
    EXPECT_FALSE(prompt_opens_think_block("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    EXPECT_FALSE(prompt_opens_think_block("<|im_start|>assistant\n"));
    EXPECT_FALSE(prompt_opens_think_block(""));
}

}  // namespace
}  // namespace moemesh
