// Reply parsing (common/chat_reply.h): each Qwen format one-shot, the fallbacks that keep text as
// content, and the stream against the one-shot parse for every way of cutting the text.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "common/chat_reply.h"

namespace moemesh {
namespace {

using ordered_json = nlohmann::ordered_json;

ReplyFormat tools_format(const ordered_json* tools = nullptr) {
    ReplyFormat f;
    f.parse_tools = true;
    f.tools = tools;
    return f;
}

// Hermes-style call as the Qwen3 template writes it.
std::string hermes(const std::string& json_body) { return "<tool_call>\n" + json_body + "\n</tool_call>"; }

TEST(ChatReply, PlainContentIsVerbatim) {
    for (bool tools : {false, true}) {
        ReplyFormat f;
        f.parse_tools = tools;
        AssistantReply r = parse_assistant_reply("\n  Hello, world!\nWhat's up? <b>x</b> </think>\n", f);
        EXPECT_EQ(r.content, "\n  Hello, world!\nWhat's up? <b>x</b> </think>\n");
        EXPECT_EQ(r.reasoning, "");
        EXPECT_TRUE(r.tool_calls.empty());
    }
    EXPECT_EQ(parse_assistant_reply("", ReplyFormat{}).content, "");
}

TEST(ChatReply, ReasoningWithOpeningTag) {
    // Qwen3 (hybrid): the model writes the whole block; llama.cpp's expected split.
    AssistantReply r = parse_assistant_reply("<think>\nI'm\nthinking\n</think>\n\nHello, world!\nWhat's up?", {});
    EXPECT_EQ(r.reasoning, "I'm\nthinking");
    EXPECT_EQ(r.content, "Hello, world!\nWhat's up?");
    // Leading whitespace before the tag, and the empty block of enable_thinking=false.
    r = parse_assistant_reply("\n<think>\n\n</think>\n\nHi", {});
    EXPECT_EQ(r.reasoning, "");
    EXPECT_EQ(r.content, "Hi");
    // A think tag later in the reply is text.
    r = parse_assistant_reply("Hi <think>x</think> there", {});
    EXPECT_EQ(r.reasoning, "");
    EXPECT_EQ(r.content, "Hi <think>x</think> there");
}

TEST(ChatReply, ReasoningStartsInThink) {
    ReplyFormat f;
    f.starts_in_think = true;
    AssistantReply r = parse_assistant_reply("I'm\nthinking\n</think>\n\nHello, world!\nWhat's up?", f);
    EXPECT_EQ(r.reasoning, "I'm\nthinking");
    EXPECT_EQ(r.content, "Hello, world!\nWhat's up?");
    // Inner whitespace is kept, surrounding whitespace trimmed; content keeps its trailing newline.
    r = parse_assistant_reply("\n  a \n\n b\t\n</think>\n \nc\n", f);
    EXPECT_EQ(r.reasoning, "a \n\n b");
    EXPECT_EQ(r.content, "c\n");
    // A repeated opening tag is not reasoning.
    r = parse_assistant_reply("<think>\nx\n</think>\n\ny", f);
    EXPECT_EQ(r.reasoning, "x");
    EXPECT_EQ(r.content, "y");
    // Without </think> (cut by max_tokens) everything is reasoning.
    r = parse_assistant_reply("still thinking <b>\n</thin", f);
    EXPECT_EQ(r.reasoning, "still thinking <b>\n</thin");
    EXPECT_EQ(r.content, "");
    // Same for an opened block when the prompt did not open it.
    r = parse_assistant_reply("<think>\nstill thinking", {});
    EXPECT_EQ(r.reasoning, "still thinking");
    EXPECT_EQ(r.content, "");
    // Only "</think>" and nothing else.
    r = parse_assistant_reply("</think>\n\n", f);
    EXPECT_EQ(r.reasoning, "");
    EXPECT_EQ(r.content, "");
}

TEST(ChatReply, HermesCalls) {
    const std::string text = "Let me check.\n" +
                             hermes(R"({"name": "get_weather", "arguments": {"city": "Paris", "days": 3}})") + "\n" +
                             hermes(R"({"name": "search", "arguments": {"q": {"terms": ["a", "b"], "opts": {"n": 1,)"
                                    R"( "x": null}}, "flag": true}})");
    AssistantReply r = parse_assistant_reply(text, tools_format());
    EXPECT_EQ(r.content, "Let me check.\n");
    ASSERT_EQ(r.tool_calls.size(), 2u);
    EXPECT_EQ(r.tool_calls[0].id, "call_0");
    EXPECT_EQ(r.tool_calls[0].name, "get_weather");
    EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"city":"Paris","days":3})");
    EXPECT_EQ(r.tool_calls[1].id, "call_1");
    EXPECT_EQ(r.tool_calls[1].name, "search");
    EXPECT_EQ(r.tool_calls[1].arguments.dump(), R"({"q":{"terms":["a","b"],"opts":{"n":1,"x":null}},"flag":true})");

    // Arguments as an encoded string, under "parameters", or absent.
    r = parse_assistant_reply(hermes(R"({"name": "f", "arguments": "{\"a\": 1}"})") +
                                  hermes(R"({"name": "g", "parameters": {"b": 2}})") + hermes(R"({"name": "h"})"),
                              tools_format());
    ASSERT_EQ(r.tool_calls.size(), 3u);
    EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"a":1})");
    EXPECT_EQ(r.tool_calls[1].arguments.dump(), R"({"b":2})");
    EXPECT_EQ(r.tool_calls[2].arguments.dump(), "{}");
    EXPECT_EQ(r.content, "");
}

TEST(ChatReply, MalformedHermesStaysContent) {
    const std::string bad = hermes(R"({"name": "f", "arguments": {"a": 1})");  // one brace short
    AssistantReply r = parse_assistant_reply("Hi " + bad, tools_format());
    EXPECT_EQ(r.content, "Hi " + bad);
    EXPECT_TRUE(r.tool_calls.empty());
    for (const char* body : {R"({"arguments": {}})", R"({"name": "", "arguments": {}})",
                             R"({"name": "f", "arguments": 3})",
                             R"({"name": "f", "arguments": "not json"})", R"(["f"])", "plain words"}) {
        r = parse_assistant_reply(hermes(body), tools_format());
        EXPECT_EQ(r.content, hermes(body)) << body;
        EXPECT_TRUE(r.tool_calls.empty()) << body;
    }
    // A bad call between good ones stays in place; the good ones keep their order and ids.
    const std::string good = hermes(R"({"name": "f", "arguments": {}})");
    r = parse_assistant_reply(good + "\n" + bad + "\n" + good, tools_format());
    ASSERT_EQ(r.tool_calls.size(), 2u);
    EXPECT_EQ(r.tool_calls[1].id, "call_1");
    EXPECT_EQ(r.content, bad + "\n");
}

TEST(ChatReply, XmlCalls) {
    const std::string text =
        "<tool_call>\n<function=edit>\n"
        "<parameter=filename>\nfoo.c\n</parameter>\n"
        "<parameter=code>\n#include <stdio.h>\nint main() { return 1 < 2; }\n\n</parameter>\n"
        "<parameter=markup>\n<html>\n <head></head>\n</html>\n</parameter>\n"
        "<parameter=doc>\nwrite </parameter> to close\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=empty_args>\n</function>\n</tool_call>";
    AssistantReply r = parse_assistant_reply(text, tools_format());
    EXPECT_EQ(r.content, "");
    ASSERT_EQ(r.tool_calls.size(), 2u);
    const ToolCall& c = r.tool_calls[0];
    EXPECT_EQ(c.name, "edit");
    EXPECT_EQ(c.id, "call_0");
    // Exactly one newline comes off each side: a value's own trailing newline survives.
    EXPECT_EQ(c.arguments.dump(), ordered_json({{"filename", "foo.c"},
                                                {"code", "#include <stdio.h>\nint main() { return 1 < 2; }\n"},
                                                {"markup", "<html>\n <head></head>\n</html>"},
                                                {"doc", "write </parameter> to close"}})
                                      .dump());
    EXPECT_EQ(r.tool_calls[1].name, "empty_args");
    EXPECT_EQ(r.tool_calls[1].arguments, ordered_json::object());

    // Without a schema every value stays a string (vLLM's qwen3coder parser does the same).
    r = parse_assistant_reply(
        "<tool_call>\n<function=f>\n<parameter=n>\n42\n</parameter>\n<parameter=o>\n{\"a\": 1}\n</parameter>\n"
        "<parameter=b>\ntrue\n</parameter>\n</function>\n</tool_call>",
        tools_format());
    ASSERT_EQ(r.tool_calls.size(), 1u);
    EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"n":"42","o":"{\"a\": 1}","b":"true"})");
}

TEST(ChatReply, XmlValuesTypedBySchema) {
    const ordered_json tools = ordered_json::parse(R"([
      {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"}, "b2": {"type": "boolean"},
        "z": {"type": "null"}, "o": {"type": "object"}, "a": {"type": "array"}, "s": {"type": "string"},
        "bad_int": {"type": "integer"}, "bad_obj": {"type": "object"}, "float_for_int": {"type": "integer"},
        "opt": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "opt_str": {"type": ["string", "null"]},
        "multi": {"type": ["integer", "string"]}, "untyped": {"description": "anything"}}}}},
      {"name": "bare", "parameters": {"properties": {"k": {"type": "integer"}}}}
    ])");
    auto param = [](const std::string& name, const std::string& value) {
        return "<parameter=" + name + ">\n" + value + "\n</parameter>\n";
    };
    const std::string text = "<tool_call>\n<function=f>\n" + param("i", "42") + param("n", "-2.5") +
                             param("b", "True") + param("b2", "false") + param("z", "None") +
                             param("o", "{\"k\": [1, {\"x\": \"y\"}]}") + param("a", "[1, \"two\"]") +
                             param("s", "42") + param("bad_int", "forty") + param("bad_obj", "{oops") +
                             param("float_for_int", "1.5") + param("opt", "null") + param("opt_str", "text") +
                             param("multi", "7") + param("untyped", "[1]") + param("unknown", "3") +
                             "</function>\n</tool_call>\n<tool_call>\n<function=bare>\n" + param("k", "5") +
                             "</function>\n</tool_call>\n<tool_call>\n<function=other>\n" + param("i", "1") +
                             "</function>\n</tool_call>";
    AssistantReply r = parse_assistant_reply(text, tools_format(&tools));
    ASSERT_EQ(r.tool_calls.size(), 3u) << r.content;
    EXPECT_EQ(r.content, "");
    const ordered_json& a = r.tool_calls[0].arguments;
    EXPECT_EQ(a["i"], 42);
    EXPECT_EQ(a["n"], -2.5);
    EXPECT_EQ(a["b"], true);
    EXPECT_EQ(a["b2"], false);
    EXPECT_TRUE(a["z"].is_null());
    EXPECT_EQ(a["o"].dump(), R"({"k":[1,{"x":"y"}]})");
    EXPECT_EQ(a["a"].dump(), R"([1,"two"])");
    EXPECT_EQ(a["s"], "42");                 // string type keeps the text
    EXPECT_EQ(a["bad_int"], "forty");        // invalid: falls back to the string
    EXPECT_EQ(a["bad_obj"], "{oops");
    EXPECT_EQ(a["float_for_int"], "1.5");    // a JSON number, but not of the allowed type
    EXPECT_TRUE(a["opt"].is_null());         // nullable string
    EXPECT_EQ(a["opt_str"], "text");
    EXPECT_EQ(a["multi"], 7);                // JSON first when a non-string type is allowed
    EXPECT_EQ(a["untyped"], "[1]");          // no type: string
    EXPECT_EQ(a["unknown"], "3");            // not in the schema: string
    EXPECT_EQ(r.tool_calls[1].arguments["k"], 5);    // bare function objects work too
    EXPECT_EQ(r.tool_calls[2].arguments["i"], "1");  // function not among the tools: strings
}

TEST(ChatReply, MalformedXmlStaysContent) {
    for (const char* body : {"<function=f>\n<parameter=a>\n1\n</function>",     // no </parameter>
                             "<function=f\n<parameter=a>\n1\n</parameter>\n</function>",  // no '>' after name
                             "<function=>\n</function>", "<function=f>\nstray text\n</function>",
                             "<function=f>\n</function>\ntrailing", "<parameter=a>\n1\n</parameter>"}) {
        const std::string text = std::string("<tool_call>\n") + body + "\n</tool_call>";
        AssistantReply r = parse_assistant_reply(text, tools_format());
        EXPECT_EQ(r.content, text) << body;
        EXPECT_TRUE(r.tool_calls.empty()) << body;
    }
    // A missing </function> is tolerated.
    AssistantReply r = parse_assistant_reply("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>",
                                             tools_format());
    ASSERT_EQ(r.tool_calls.size(), 1u);
    EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"a":"1"})");
}

TEST(ChatReply, UnclosedCallStaysContent) {
    const std::string text = "Calling.\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n";
    AssistantReply r = parse_assistant_reply(text, tools_format());
    EXPECT_EQ(r.content, text);
    EXPECT_TRUE(r.tool_calls.empty());
    // A closed call followed by an unclosed one.
    const std::string good = hermes(R"({"name": "f", "arguments": {}})");
    r = parse_assistant_reply(good + "\n<tool_call>\n{\"name\": \"g\"", tools_format());
    ASSERT_EQ(r.tool_calls.size(), 1u);
    EXPECT_EQ(r.content, "<tool_call>\n{\"name\": \"g\"");  // the "\n" was the separator
}

TEST(ChatReply, TextAroundCalls) {
    const std::string call = hermes(R"({"name": "f", "arguments": {}})");
    // Whitespace between and after calls is the separator; other text is kept, nothing dropped.
    AssistantReply r = parse_assistant_reply("A\n" + call + "\n\n" + call + " \n", tools_format());
    EXPECT_EQ(r.content, "A\n");
    EXPECT_EQ(r.tool_calls.size(), 2u);
    r = parse_assistant_reply(call + "\nBetween.\n" + call + "\nDone.", tools_format());
    EXPECT_EQ(r.content, "\nBetween.\n\nDone.");
    EXPECT_EQ(r.tool_calls.size(), 2u);
    // Tools not requested: calls are text.
    r = parse_assistant_reply("A\n" + call, ReplyFormat{});
    EXPECT_EQ(r.content, "A\n" + call);
    EXPECT_TRUE(r.tool_calls.empty());
}

TEST(ChatReply, ReasoningThenCalls) {
    ReplyFormat f = tools_format();
    f.starts_in_think = true;
    const std::string call =
        "<tool_call>\n<function=run>\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>";
    AssistantReply r = parse_assistant_reply("Need the directory.\n</think>\n\n" + call, f);
    EXPECT_EQ(r.reasoning, "Need the directory.");
    EXPECT_EQ(r.content, "");
    ASSERT_EQ(r.tool_calls.size(), 1u);
    EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"command":"pwd"})");
    // A call inside the think block ends it (Qwen3.5 sometimes skips </think>), as in llama.cpp.
    r = parse_assistant_reply("Need the directory.\n" + call, f);
    EXPECT_EQ(r.reasoning, "Need the directory.");
    EXPECT_EQ(r.content, "");
    EXPECT_EQ(r.tool_calls.size(), 1u);
    // Without tools it is just reasoning.
    f.parse_tools = false;
    r = parse_assistant_reply("Need the directory.\n" + call, f);
    EXPECT_EQ(r.reasoning, "Need the directory.\n" + call);
    EXPECT_TRUE(r.tool_calls.empty());
}

TEST(ChatReply, IdPrefix) {
    ReplyFormat f = tools_format();
    f.id_prefix = "call_req7_";
    const std::string call = hermes(R"({"name": "f", "arguments": {}})");
    AssistantReply r = parse_assistant_reply(call + call, f);
    ASSERT_EQ(r.tool_calls.size(), 2u);
    EXPECT_EQ(r.tool_calls[0].id, "call_req7_0");
    EXPECT_EQ(r.tool_calls[1].id, "call_req7_1");
}

// ---- streaming --------------------------------------------------------------------------------

bool valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        const auto c = static_cast<unsigned char>(s[i]);
        const size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (n == 0 || i + n > s.size()) return false;
        for (size_t k = 1; k < n; ++k)
            if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
        i += n;
    }
    return true;
}

// Streams `text` cut at `cuts` (increasing offsets) and checks the deltas against the one-shot parse.
void check_stream(const std::string& text, const ReplyFormat& f, const std::vector<size_t>& cuts) {
    if (::testing::Test::HasFailure()) return;  // the first failing cut says enough; thousands follow
    const AssistantReply want = parse_assistant_reply(text, f);
    ReplyStream s(f);
    std::string content, reasoning;
    size_t prev = 0;
    std::string where = "cuts:";
    for (size_t c : cuts) where += " " + std::to_string(c);
    auto take = [&](const ReplyStream::Delta& d) {
        content += d.content;
        reasoning += d.reasoning;
        if (valid_utf8(text)) {
            EXPECT_TRUE(valid_utf8(d.content)) << where;
            EXPECT_TRUE(valid_utf8(d.reasoning)) << where;
        }
        // Emitted text is final: what has been sent is a prefix of the final answer.
        EXPECT_EQ(want.content.compare(0, content.size(), content), 0) << where;
        EXPECT_EQ(want.reasoning.compare(0, reasoning.size(), reasoning), 0) << where;
    };
    for (size_t c : cuts) {
        take(s.feed(std::string_view(text).substr(prev, c - prev)));
        prev = c;
    }
    take(s.feed(std::string_view(text).substr(prev)));
    std::vector<ToolCall> calls;
    take(s.finish(&calls));
    EXPECT_EQ(content, want.content) << where;
    EXPECT_EQ(reasoning, want.reasoning) << where;
    ASSERT_EQ(calls.size(), want.tool_calls.size()) << where;
    for (size_t i = 0; i < calls.size(); ++i) {
        EXPECT_EQ(calls[i].id, want.tool_calls[i].id);
        EXPECT_EQ(calls[i].name, want.tool_calls[i].name);
        EXPECT_EQ(calls[i].arguments, want.tool_calls[i].arguments);
    }
}

std::vector<std::string> stream_corpus() {
    return {
        "",
        "Hello, world! <b>",
        "\n\n  <thi",
        "<think>\nI'm\nthinking\n</think>\n\nHello, world!\nWhat's up?",
        "  \n<think>\n\n</think>\n\n",
        "I'm thinking 思考中 🙂\n</think>\n\nRéponse: ça va 👍",
        "<think>\nx</think>y<think>z</think>",
        "still <thinking> </thin",
        "Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": \"é\"}]}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
        "plan\n</think>\n\n<tool_call>\n<function=edit>\n<parameter=code>\nif (a < b) {}\n\n</parameter>\n"
        "<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>\nafter",
        "thinking then calling <tool_call>\n<function=f>\n</function>\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call> text <tool_call>\n<function=g>",
        "a <tool_ca b <tool_cal c </think\xE4\xB8",  // cut inside a character at the very end
        "\xF0\x9F\x99",                            // nothing but a truncated character
    };
}

std::vector<ReplyFormat> stream_formats(const ordered_json* tools) {
    std::vector<ReplyFormat> fs;
    for (int think = 0; think < 2; ++think) {
        for (int tl = 0; tl < 2; ++tl) {
            ReplyFormat f;
            f.starts_in_think = think;
            f.parse_tools = tl;
            f.tools = tools;
            fs.push_back(f);
        }
    }
    return fs;
}

TEST(ChatReplyStream, EverySplitPointMatchesOneShot) {
    const ordered_json tools = ordered_json::parse(
        R"([{"type": "function",
             "function": {"name": "edit", "parameters": {"properties": {"n": {"type": "integer"}}}}}])");
    for (const std::string& text : stream_corpus()) {
        for (const ReplyFormat& f : stream_formats(&tools)) {
            SCOPED_TRACE("text: " + text + " think=" + std::to_string(f.starts_in_think) +
                         " tools=" + std::to_string(f.parse_tools));
            check_stream(text, f, {});
            for (size_t c = 0; c <= text.size(); ++c) check_stream(text, f, {c});
            std::vector<size_t> every;  // byte by byte
            for (size_t c = 1; c < text.size(); ++c) every.push_back(c);
            check_stream(text, f, every);
        }
    }
}

TEST(ChatReplyStream, RandomMultiSplitsMatchOneShot) {
    std::mt19937 rng(1234);
    for (const std::string& text : stream_corpus()) {
        for (const ReplyFormat& f : stream_formats(nullptr)) {
            SCOPED_TRACE("text: " + text);
            for (int trial = 0; trial < 200; ++trial) {
                std::vector<size_t> cuts;
                size_t at = 0;
                while (at < text.size()) {
                    at += 1 + rng() % 6;
                    if (at < text.size()) cuts.push_back(at);
                }
                check_stream(text, f, cuts);
            }
        }
    }
}

TEST(ChatReplyStream, RandomTextsFromTagFragments) {
    // Texts built from the pieces that matter (tags, their prefixes, whitespace, multibyte
    // characters, call bodies), so that tags meet cuts and each other in many ways.
    const std::vector<std::string> parts = {
        "<think>", "</think>", "<tool_call>", "</tool_call>", "<", "</", "<th", "</thi", "<tool_", "\n", " ", "x",
        "é", "🙂", "{\"name\": \"f\", \"arguments\": {\"a\": 1}}", "<function=f>", "</function>",
        "<parameter=a>\n1\n</parameter>\n", "{", "}"};
    std::mt19937 rng(99);
    for (int trial = 0; trial < 3000; ++trial) {
        std::string text;
        const int n = 1 + rng() % 12;
        for (int i = 0; i < n; ++i) text += parts[rng() % parts.size()];
        ReplyFormat f;
        f.starts_in_think = rng() % 2;
        f.parse_tools = rng() % 3 != 0;
        std::vector<size_t> cuts;
        for (size_t c = 1; c < text.size(); ++c)
            if (rng() % 3 == 0) cuts.push_back(c);
        SCOPED_TRACE("text: " + text);
        check_stream(text, f, cuts);
    }
}

TEST(ChatReplyStream, EmitsEarlyAndHoldsOnlyWhatIsUndecided) {
    ReplyFormat f = tools_format();
    f.starts_in_think = true;
    ReplyStream s(f);
    EXPECT_TRUE(s.feed("\n").empty());  // could be "<think>", and leading whitespace is trimmed
    ReplyStream::Delta d = s.feed("Thinking about it");
    EXPECT_EQ(d.reasoning, "Thinking about it");
    d = s.feed("\n</thi");  // the newline may be trailing, "</thi" may be the close tag
    EXPECT_TRUE(d.empty());
    d = s.feed("nk>\n\nThe answer is <to");
    EXPECT_EQ(d.reasoning, "");
    EXPECT_EQ(d.content, "The answer is ");
    d = s.feed("o big");
    EXPECT_EQ(d.content, "<too big");
    d = s.feed(" \xE4\xB8");  // half of a CJK character
    EXPECT_EQ(d.content, " ");
    d = s.feed("\xAD.<tool_call>\n{\"name\": \"f\"");
    EXPECT_EQ(d.content, "\xE4\xB8\xAD.");
    EXPECT_TRUE(s.in_tool_calls());
    EXPECT_TRUE(s.feed(", \"arguments\": {}}\n</tool_call>").empty());  // calls wait for finish()
    std::vector<ToolCall> calls;
    d = s.finish(&calls);
    EXPECT_TRUE(d.empty());
    ASSERT_EQ(calls.size(), 1u);
    EXPECT_EQ(calls[0].name, "f");
    // Finished: nothing more comes out.
    EXPECT_TRUE(s.feed("more").empty());
    EXPECT_TRUE(s.finish(&calls).empty());
    EXPECT_TRUE(calls.empty());
}

}  // namespace
}  // namespace moemesh
