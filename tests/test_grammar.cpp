// The grammar engine (common/grammar.h, common/gbnf.cpp): GBNF parsing and its errors, matching
// against an independent judge (nlohmann::json's parser for a JSON grammar), UTF-8 split anywhere,
// constant stack depth on right recursion, and the token constraint's mask equal to checking every
// token one by one.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/grammar.h"
#include "common/reply_grammar.h"
#include "common/tokenizer.h"
#include "common/tokenizer_data.h"
#include "coordinator/sampler.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

std::shared_ptr<const Grammar> must_parse(const std::string& text, const std::string& root = "root") {
    auto g = Grammar::parse(text, root);
    EXPECT_TRUE(g.ok()) << g.status().message() << "\n" << text;
    return g.ok() ? g.value() : nullptr;
}

// RFC 8259 JSON with bounded whitespace runs (the kind of grammar a schema becomes).
const char* kJsonGrammar = R"(
root   ::= ws value ws
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( ws "," ws member )* ws )? "}"
member ::= string ws ":" ws value
array  ::= "[" ws ( value ( ws "," ws value )* ws )? "]"
string ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws     ::= [ \t\n\r]{0,20}   # bounded: a model cannot loop on whitespace
)";

TEST(Grammar, ParsesAndMatchesSmallGrammars) {
    struct Case {
        const char* gbnf;
        std::vector<const char*> yes, no;
    };
    const Case cases[] = {
        {R"(root ::= "a" | "bc")", {"a", "bc"}, {"", "b", "abc", "bcc"}},
        {R"(root ::= [a-c]+ "!")", {"a!", "cab!"}, {"!", "ad!", "a"}},
        {R"(root ::= [^a-c]*)", {"", "xyz", "é中"}, {"a", "xa"}},
        {R"(root ::= "x"{2,4})", {"xx", "xxx", "xxxx"}, {"x", "xxxxx"}},
        {R"(root ::= "x"{3})", {"xxx"}, {"xx", "xxxx"}},
        {R"(root ::= "x"{2,} "y"?)", {"xx", "xxxxxy"}, {"x", "xy", "xxyy"}},
        {R"(root ::= ("ab" | "c")* "d")", {"d", "abcd", "cccd", "ababd"}, {"ad", "abc"}},
        {"root ::= item+\nitem ::= [0-9] \",\"", {"1,", "1,2,3,"}, {"", "1", "1,2"}},
        {"root ::= \"a\"\n     | \"b\"   # continued on the next line", {"a", "b"}, {"ab"}},
        {"root ::= (\n  \"a\" |\n  \"b\"\n) \"c\"", {"ac", "bc"}, {"c"}},
        {R"(root ::= . . .)", {"abc", "a\nb", "中文字"}, {"ab", "abcd"}},
        {R"(root ::= "\x41\u00e9\n\t\"\\")", {"Aé\n\t\"\\"}, {"Ae"}},
        {R"(root ::= [\]\-\^]+)", {"]-^"}, {"a"}},
        {R"(root ::= "" "a" "")", {"a"}, {""}},
        {R"(root ::= "é" | "中文")", {"é", "中文"}, {"中", "e"}},
        {"root ::= a\na ::= \"x\" a | ", {"", "x", "xxxx"}, {"y"}},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.gbnf);
        auto g = must_parse(c.gbnf);
        ASSERT_TRUE(g);
        for (const char* t : c.yes) EXPECT_TRUE(grammar_matches(g, t)) << "should match: " << t;
        for (const char* t : c.no) EXPECT_FALSE(grammar_matches(g, t)) << "should not match: " << t;
    }
}

TEST(Grammar, BadGrammarsAreNamedErrors) {
    struct Bad {
        const char* gbnf;
        const char* needle;
    };
    const Bad bad[] = {
        {"", "no rule 'root'"},
        {"start ::= \"a\"", "no rule 'root'"},
        {"root ::= thing", "rule 'thing' is used but not defined"},
        {"root ::= root \"a\" | \"b\"", "'root' is left-recursive"},
        {"root ::= a\na ::= b \"x\"\nb ::= \"\" | a", "left-recursive"},
        {"root ::= (\"a\"?)* \"b\"", "left-recursive"},
        {"root ::= \"a\"\nroot ::= \"b\"", "line 2: rule 'root' is defined twice"},
        {"root = \"a\"", "line 1: expected '::='"},
        {"root ::= \"abc", "unterminated string literal"},
        {"root ::= \"a\nb\"", "not closed on its line"},
        {"root ::= [abc", "unterminated character class"},
        {"root ::= []", "empty character class"},
        {"root ::= [z-a]", "end (U+0061) before its start (U+007A)"},
        {"root ::= \"\\q\"", "unknown escape"},
        {"root ::= \"\\x4\"", "hex digits"},
        {"root ::= \"a\"{3,2}", "maximum is below the minimum"},
        {"root ::= \"a\"{99999}", "above 4096"},
        {"root ::= \"a\" )", "unexpected ')'"},
        {"root ::= (\"a\"", "expected ')'"},
        {"root ::= * \"a\"", "unexpected '*'"},
        {"root ::= \"\"*", "repetition of the empty string"},
        {"root ::= \"a\"\n\n\nx ::= [", "line 4"},
    };
    for (const Bad& b : bad) {
        auto g = Grammar::parse(b.gbnf);
        ASSERT_FALSE(g.ok()) << b.gbnf;
        EXPECT_NE(g.status().message().find(b.needle), std::string::npos) << b.gbnf << " -> " << g.status().message();
    }
}

// Random JSON values, dumped compact or indented.
json random_json(std::mt19937& rng, int depth) {
    const int kind = static_cast<int>(rng() % (depth > 3 ? 5u : 7u));
    switch (kind) {
        case 0: return nullptr;
        case 1: return rng() % 2 == 0;
        case 2: return static_cast<int64_t>(rng() % 2000) - 1000;
        case 3: return (static_cast<double>(rng() % 100000) - 50000) / 7.0;
        case 4: {
            std::string s;
            const char* alphabet[] = {"a", "Z", " ", "\"", "\\", "\n", "é", "中", "\x01", "/", "😀"};
            for (unsigned n = rng() % 6; n > 0; --n) s += alphabet[rng() % 11];
            return s;
        }
        case 5: {
            json a = json::array();
            for (unsigned n = rng() % 4; n > 0; --n) a.push_back(random_json(rng, depth + 1));
            return a;
        }
        default: {
            json o = json::object();
            for (unsigned n = rng() % 4; n > 0; --n) o["k" + std::to_string(rng() % 10)] = random_json(rng, depth + 1);
            return o;
        }
    }
}

TEST(Grammar, JsonGrammarAgreesWithAJsonParser) {
    auto g = must_parse(kJsonGrammar);
    ASSERT_TRUE(g);
    std::mt19937 rng(7);
    int matched = 0, mutated_valid = 0;
    for (int i = 0; i < 400; ++i) {
        const json v = random_json(rng, 0);
        const std::string text = v.dump(i % 3 == 0 ? -1 : 2);
        ASSERT_TRUE(grammar_matches(g, text)) << text;
        ++matched;
        // One byte dropped, doubled or replaced: whatever the grammar still accepts must be JSON.
        for (int k = 0; k < 8; ++k) {
            std::string m = text;
            const size_t at = rng() % m.size();
            const char pool[] = "{}[]\",:0-.eE \\anu\x01";
            switch (rng() % 3) {
                case 0: m.erase(at, 1); break;
                case 1: m.insert(at, 1, m[at]); break;
                default: m[at] = pool[rng() % (sizeof(pool) - 1)]; break;
            }
            const bool ok = grammar_matches(g, m);
            if (ok) {
                ++mutated_valid;
                // (nlohmann refuses numbers beyond double's range, which JSON's grammar allows)
                const bool huge_exponent = std::regex_search(m, std::regex("[eE][-+]?[0-9]{3,}"));
                EXPECT_TRUE(json::accept(m) || huge_exponent) << "the grammar accepted invalid JSON: " << json(m).dump();
            } else if (json::accept(m) && m.find_first_of("\r") == std::string::npos) {
                // Valid JSON the grammar refuses: only a whitespace run longer than it allows.
                EXPECT_NE(m.find("                     "), std::string::npos) << "refused valid JSON: " << m;
            }
        }
    }
    EXPECT_EQ(matched, 400);
    EXPECT_GT(mutated_valid, 0);
}

TEST(Grammar, BytesMaySplitCharactersAnywhere) {
    auto g = must_parse(R"(root ::= "[" [à-ÿ]+ "]" [^a]*)");
    ASSERT_TRUE(g);
    const std::string text = "[éàÿ]中😀b";
    ASSERT_TRUE(grammar_matches(g, text));
    for (size_t cut = 0; cut <= text.size(); ++cut) {
        GrammarMatcher m(g);
        ASSERT_TRUE(m.accept(text.substr(0, cut))) << cut;
        ASSERT_TRUE(m.accept(text.substr(cut))) << cut;
        EXPECT_TRUE(m.can_end()) << cut;
    }
    // A partial character no class could complete is refused at its first byte; one that might
    // be completed is held, and the sentence cannot end inside it.
    GrammarMatcher m(g);
    ASSERT_TRUE(m.accept("["));
    EXPECT_FALSE(m.accept("\xE4"));   // U+4000..4FFF: not in [à-ÿ]
    EXPECT_TRUE(m.accept("\xC3"));    // U+00C0..00FF: may be
    EXPECT_FALSE(m.accept("a"));      // not a continuation byte
    EXPECT_FALSE(m.accept("\xA9\xA9"));  // é then a stray continuation byte
    EXPECT_TRUE(m.accept("\xA9]"));
    EXPECT_TRUE(m.can_end());
    EXPECT_TRUE(m.accept("\xF0\x9F"));
    EXPECT_FALSE(m.can_end());
    EXPECT_FALSE(m.accept("\xFF"));  // never UTF-8
    // Overlong forms and surrogates are not characters: a 2-byte "a" must not pass [a-e].
    auto letters = must_parse(R"(root ::= [a-e]+ | [\u0080-\U0010FFFF]+)");
    ASSERT_TRUE(letters);
    GrammarMatcher o(letters);
    EXPECT_FALSE(o.accept("\xC1"));
    EXPECT_FALSE(o.accept("\xC1\xA1"));
    EXPECT_FALSE(o.accept("\xE0\x81\xA1"));
    EXPECT_FALSE(o.accept("\xED\xA0\x80"));  // U+D800
    EXPECT_FALSE(o.accept("\xF4\x90\x80\x80"));  // beyond U+10FFFF
    EXPECT_TRUE(o.accept("\xC2\x80\xF4\x8F\xBF\xBF"));
}

TEST(Grammar, RightRecursionKeepsStacksFlat) {
    auto g = must_parse("root ::= item* \"end\"\nitem ::= \"a\" | \"b\" item2\nitem2 ::= \"c\"?");
    ASSERT_TRUE(g);
    GrammarMatcher m(g);
    for (int i = 0; i < 20000; ++i) ASSERT_TRUE(m.accept(i % 3 == 0 ? "bc" : "a"));
    size_t deepest = 0;
    for (const auto& s : m.state().stacks) deepest = std::max(deepest, s.size());
    EXPECT_LE(deepest, 4u);
    EXPECT_TRUE(m.accept("end"));
    EXPECT_TRUE(m.can_end());
}

// Hostile grammars end in an answer, not a crash or a stall: a 20000-rule chain of left-most
// references (deeper than any thread stack would take recursively), and an exponentially ambiguous
// grammar (2^40 ways to expand) whose expansion is cut off and refused.
TEST(Grammar, DeepAndAmbiguousGrammarsAreBounded) {
    std::string chain = "root ::= r0\n";
    const int kDepth = 20000;
    for (int i = 0; i < kDepth; ++i) chain += "r" + std::to_string(i) + " ::= r" + std::to_string(i + 1) + " \"y\"\n";
    chain += "r" + std::to_string(kDepth) + " ::= \"x\"\n";
    auto deep = must_parse(chain);
    ASSERT_TRUE(deep);
    EXPECT_TRUE(grammar_matches(deep, "x" + std::string(kDepth, 'y')));
    EXPECT_FALSE(grammar_matches(deep, "x" + std::string(kDepth - 1, 'y')));
    std::string ambiguous = "root ::= ";
    for (int i = 0; i < 40; ++i) ambiguous += "e ";
    ambiguous += "\"x\"\ne ::= \"\" | \"\"\n";
    auto amb = must_parse(ambiguous);
    ASSERT_TRUE(amb);
    EXPECT_FALSE(grammar_matches(amb, "x"));
}

// mask() (the sorted-prefix walk) allows exactly the tokens allows() accepts one by one, in states
// reached by real token sequences, and end-of-generation only where the sentence may end.
TEST(TokenConstraint, MaskEqualsCheckingEveryToken) {
    auto tok = Tokenizer::from_data(builtin_byte_bpe_tokenizer(2000));
    ASSERT_TRUE(tok.ok()) << tok.status().message();
    auto vocab = std::make_shared<const GrammarVocab>(tok.value());
    auto g = must_parse(kJsonGrammar);
    ASSERT_TRUE(g);
    const int64_t V = tok.value().vocab_size();
    std::mt19937 rng(3);
    int ends_checked = 0;
    for (int trial = 0; trial < 6; ++trial) {
        TokenConstraint c(g, vocab);
        const std::string text = random_json(rng, 0).dump(trial % 2 ? 2 : -1);
        const std::vector<int32_t> ids = tok.value().encode(text, false);
        std::vector<int32_t> prefix;
        for (size_t i = 0; i <= ids.size(); ++i) {
            std::vector<float> logits(static_cast<size_t>(V), 0.0f);
            const int64_t kept = c.mask(logits.data(), V);
            int64_t want = 0;
            for (int32_t id = 0; id < V; ++id) {
                const bool allowed = c.allows(id);
                want += allowed;
                ASSERT_EQ(allowed, logits[id] == 0.0f) << "token " << id << " '" << vocab->pieces[id] << "' after "
                                                        << i << " tokens of " << text;
                if (vocab->kinds[id] == GrammarVocab::kEnd) {  // where the text so far is a whole sentence
                    EXPECT_EQ(allowed, grammar_matches(g, tok.value().decode(prefix)));
                    ++ends_checked;
                }
            }
            EXPECT_EQ(kept, want);
            if (i == ids.size()) break;
            ASSERT_TRUE(c.accept(ids[i])) << "token " << i << " of " << text;
            prefix.push_back(ids[i]);
        }
        EXPECT_TRUE(c.can_end());
    }
    EXPECT_GT(ends_checked, 0);
}


// "Any text up to the first terminator": every split of a text and terminator is judged as a
// plain string search would.
TEST(ReplyGrammar, UntilStopsAtTheFirstTerminator) {
    for (const char* t : {"</think>", "</parameter>", "aab", "abab"}) {
        SCOPED_TRACE(t);
        auto g = must_parse("root ::= body\n" + gbnf_until("body", t));
        ASSERT_TRUE(g);
        std::mt19937 rng(5);
        const std::string term = t;
        const std::string alphabet = term + "xz\n";
        for (int i = 0; i < 3000; ++i) {
            std::string s;
            for (unsigned n = rng() % 24; n > 0; --n) s += alphabet[rng() % alphabet.size()];
            if (rng() % 2) s += term;
            const size_t at = s.find(term);
            const bool want = at != std::string::npos && at + term.size() == s.size();
            ASSERT_EQ(grammar_matches(g, s), want) << json(s).dump();
        }
    }
}

TEST(ReplyGrammar, JsonRepliesMayReasonFirst) {
    const nlohmann::ordered_json schema = nlohmann::ordered_json::parse(R"({"type": "object",
        "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false})");
    auto none = Grammar::parse(json_reply_gbnf(&schema, ReplyThinking::kNone).value());
    auto optional = Grammar::parse(json_reply_gbnf(&schema, ReplyThinking::kOptional).value());
    auto open = Grammar::parse(json_reply_gbnf(&schema, ReplyThinking::kOpen).value());
    ASSERT_TRUE(none.ok() && optional.ok() && open.ok()) << optional.status().message();
    const std::string v = "{\"a\": 1}";
    EXPECT_TRUE(grammar_matches(none.value(), v));
    EXPECT_TRUE(grammar_matches(none.value(), "\n" + v + "\n"));
    EXPECT_FALSE(grammar_matches(none.value(), "<think>x</think>" + v));
    EXPECT_FALSE(grammar_matches(none.value(), "{\"a\": 1, \"b\": 2}"));
    EXPECT_TRUE(grammar_matches(optional.value(), v));
    EXPECT_TRUE(grammar_matches(optional.value(), "<think>\nLet me see: {\"a\"} </thin\n</think>\n\n" + v));
    EXPECT_FALSE(grammar_matches(optional.value(), "<think>never closed " + v));
    EXPECT_FALSE(grammar_matches(optional.value(), "text " + v));
    EXPECT_TRUE(grammar_matches(open.value(), "reasoning</think>\n\n" + v));
    EXPECT_FALSE(grammar_matches(open.value(), v));  // the block is open: it must close first
    auto any = Grammar::parse(json_reply_gbnf(nullptr, ReplyThinking::kNone).value());
    ASSERT_TRUE(any.ok()) << any.status().message();
    EXPECT_TRUE(grammar_matches(any.value(), "{\"x\": [1, {\"y\": null}]}"));
    EXPECT_FALSE(grammar_matches(any.value(), "[1]"));  // json_object: an object
}

TEST(ReplyGrammar, ToolCallsInBothTemplateFormats) {
    const nlohmann::ordered_json tools = nlohmann::ordered_json::parse(R"([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "now"}}])");
    auto json_form = Grammar::parse(tool_calls_gbnf(tools, "", false, true, ReplyThinking::kOptional).value());
    ASSERT_TRUE(json_form.ok()) << json_form.status().message();
    const std::string call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    const std::string call2 = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
    EXPECT_TRUE(grammar_matches(json_form.value(), call));
    EXPECT_TRUE(grammar_matches(json_form.value(), "<think>\nhmm\n</think>\n\n" + call + "\n" + call2));
    EXPECT_FALSE(grammar_matches(json_form.value(), "Sure! " + call));
    EXPECT_FALSE(grammar_matches(json_form.value(), "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(json_form.value(), "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>"));
    auto single = Grammar::parse(tool_calls_gbnf(tools, "now", false, false, ReplyThinking::kNone).value());
    ASSERT_TRUE(single.ok()) << single.status().message();
    EXPECT_TRUE(grammar_matches(single.value(), call2));
    EXPECT_FALSE(grammar_matches(single.value(), call));
    EXPECT_FALSE(grammar_matches(single.value(), call2 + "\n" + call2));
    EXPECT_FALSE(tool_calls_gbnf(tools, "missing", false, true, ReplyThinking::kNone).ok());

    auto xml = Grammar::parse(tool_calls_gbnf(tools, "", true, true, ReplyThinking::kNone).value());
    ASSERT_TRUE(xml.ok()) << xml.status().message();
    EXPECT_TRUE(grammar_matches(xml.value(), "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, <CA>\n"
                                             "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"));
    EXPECT_TRUE(grammar_matches(xml.value(), "<tool_call>\n<function=now>\n</function>\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(xml.value(), "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n"
                                              "</function>\n</tool_call>"));  // city is required
    EXPECT_FALSE(grammar_matches(xml.value(), "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n"
                                              "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>"));
}

// Sampling under a constraint is the distribution renormalized over the allowed tokens: checked
// by frequency on a small vocabulary (temperature 1, no cuts).
TEST(ConstrainedSampling, DrawsFromTheRenormalizedDistribution) {
    auto tok = Tokenizer::from_data(builtin_byte_bpe_tokenizer(300));
    ASSERT_TRUE(tok.ok());
    auto vocab = std::make_shared<const GrammarVocab>(tok.value());
    auto g = must_parse(R"(root ::= [a-e] "!")");
    ASSERT_TRUE(g);
    const int64_t V = tok.value().vocab_size();
    std::vector<float> logits(static_cast<size_t>(V));
    std::mt19937 rng(11);
    for (float& l : logits) l = static_cast<float>(rng() % 1000) / 250.0f;
    const std::string letters = "abcde";
    std::vector<double> p(5);
    double z = 0;
    for (int k = 0; k < 5; ++k) z += p[k] = std::exp(logits[tok.value().token_id(std::string(1, letters[k]))]);
    SamplerParams sp;
    sp.temperature = 1.0f;
    sp.top_k = 0;
    sp.top_p = 1.0f;
    sp.min_p = 0.0f;
    sp.seed = 3;
    Sampler s(sp);
    std::vector<int> count(5, 0);
    const int kDraws = 20000;
    for (int i = 0; i < kDraws; ++i) {
        TokenConstraint c(g, vocab);
        const int32_t id = s.sample(logits.data(), V, c);
        ASSERT_TRUE(c.allows(id)) << id;
        const size_t k = letters.find(vocab->pieces[id]);
        ASSERT_NE(k, std::string::npos) << vocab->pieces[id];
        ++count[k];
    }
    for (int k = 0; k < 5; ++k) {
        const double want = p[k] / z, got = static_cast<double>(count[k]) / kDraws;
        EXPECT_NEAR(got, want, 4 * std::sqrt(want * (1 - want) / kDraws) + 1e-3) << letters[k];
    }
}

}  // namespace
}  // namespace moemesh
