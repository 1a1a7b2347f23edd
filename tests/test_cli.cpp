// The `moemesh` CLI as a user runs it: real processes, exit codes, messages.
#include <gtest/gtest.h>

#include <regex>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;

class Cli : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        dir_ = temp_dir("cli");
        model_ = dir_ + "/tiny.gguf";
        std::string out;
        ASSERT_EQ(run_capture(moemesh_bin() + " make-model --out " + model_ +
                                  " --layers 2 --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --experts 4 --top-k 2"
                                  " --expert-ff 32 --vocab 600 --seed 3",
                              &out, dir_ + "/make.err"),
                  0)
            << read_file(dir_ + "/make.err");
    }
    // Runs the CLI; returns the exit code, stdout in *out and stderr in *err.
    int cli(const std::string& args, std::string* out, std::string* err) {
        int rc = run_capture(moemesh_bin() + " " + args, out, dir_ + "/err.txt");
        *err = read_file(dir_ + "/err.txt");
        return rc;
    }
    static std::string dir_, model_;
};
std::string Cli::dir_, Cli::model_;

TEST_F(Cli, RunGeneratesAndReportsSpeed) {
    std::string out, err;
    ASSERT_EQ(cli("run --model " + model_ + " --prompt 'Hello there' -n 12 --seed 5 --threads 1 --ignore-eos", &out, &err), 0)
        << err;
    EXPECT_NE(err.find("prompt: "), std::string::npos) << err;
    EXPECT_NE(err.find("tokens/s) | decode: 12 tokens"), std::string::npos) << err;
    // Same seed, same text.
    std::string out2;
    ASSERT_EQ(cli("run --model " + model_ + " --prompt 'Hello there' -n 12 --seed 5 --threads 2 --ignore-eos", &out2, &err), 0);
    EXPECT_EQ(out, out2);
}

TEST_F(Cli, JsonParityInterface) {
    std::string out, err;
    ASSERT_EQ(cli("run --model " + model_ + " --tokens 1,2,3 --top 5 --json -n 4", &out, &err), 0) << err;
    auto j = nlohmann::json::parse(out);  // exactly one JSON object on stdout
    ASSERT_EQ(j["positions"].size(), 3u);
    EXPECT_EQ(j["positions"][2]["pos"], 2);
    ASSERT_EQ(j["positions"][0]["top"].size(), 5u);
    double prev = 1.0;
    for (auto& e : j["positions"][0]["top"]) {
        EXPECT_LE(e[1].get<double>(), prev);
        prev = e[1].get<double>();
    }
    ASSERT_EQ(j["greedy"].size(), 4u);
    // The first greedy token is the most likely token after the last position.
    EXPECT_EQ(j["greedy"][0], j["positions"][2]["top"][0][0]);
}

TEST_F(Cli, CpuKernelVariantsGiveTheSameProbabilities) {
    // The SIMD variants this CPU has (MOEMESH_CPU_ISA) must give the same bits end to end: every
    // position's top-10 probabilities and the greedy tokens, on q4_0 (8-row and 16-row tile
    // kernels; 600 output rows leave 8 for the one-row kernel), q8_0, q4_k and iq4_xs (decoded
    // rows) models, with a 40-token prompt (matmul tiles of more than 8 rows). Scalar code sums in
    // another order.
    const std::string q40 = dir_ + "/isa-q4_0.gguf", q80 = dir_ + "/isa-q8_0.gguf", q4k = dir_ + "/isa-q4_k.gguf",
                      iq4xs = dir_ + "/isa-iq4_xs.gguf";
    std::string out, err;
    for (const auto& [path, type] : {std::pair{q40, "q4_0"}, std::pair{q80, "q8_0"}}) {
        ASSERT_EQ(cli("make-model --out " + path + " --layers 2 --hidden 160 --heads 4 --kv-heads 2 --head-dim 32"
                      " --experts 4 --top-k 2 --expert-ff 96 --vocab 600 --seed 4 --type " + type, &out, &err), 0)
            << err;
    }
    for (const auto& [path, type] : {std::pair{q4k, "q4_k"}, std::pair{iq4xs, "iq4_xs"}}) {
        ASSERT_EQ(cli("make-model --out " + path + " --layers 2 --hidden 256 --heads 4 --kv-heads 2 --head-dim 64"
                      " --experts 4 --top-k 2 --expert-ff 256 --vocab 600 --seed 4 --type " + type, &out, &err), 0)
            << err;
    }
    std::string ids;
    for (int i = 0; i < 40; ++i) ids += (i ? "," : "") + std::to_string((i * 37 + 11) % 600);
    const auto run_with = [&](const std::string& isa, const std::string& model, std::string* o, std::string* e) {
        const int rc = run_capture("MOEMESH_CPU_ISA=" + isa + " " + moemesh_bin() + " run --model " + model +
                                       " --tokens " + ids + " --json --top 10 -n 6 --threads 2",
                                   o, dir_ + "/isa.err");
        *e = read_file(dir_ + "/isa.err");
        return rc;
    };
    int levels = 0;
    for (const std::string& model : {q40, q80, q4k, iq4xs}) {
        std::string want;
        for (const char* isa : {"avx2", "avxvnni", "avx512vnni"}) {
            ASSERT_EQ(run_with(isa, model, &out, &err), 0) << err;
            if (err.find("does not support it") != std::string::npos) continue;  // this CPU lacks it
            EXPECT_NE(err.find(std::string("threads (") + isa + ")"), std::string::npos) << err;
            ++levels;
            if (want.empty()) want = out;
            EXPECT_EQ(out, want) << isa << " on " << model;
        }
    }
    std::printf("[  NOTE    ] %d model x variant runs compared\n", levels);
    ASSERT_EQ(run_with("avx9000", q40, &out, &err), 0) << err;
    EXPECT_NE(err.find("MOEMESH_CPU_ISA='avx9000' is not one of scalar, avx2, avxvnni, avx512vnni; using "),
              std::string::npos)
        << err;
    ASSERT_EQ(run_with("scalar", q40, &out, &err), 0) << err;
    EXPECT_NE(err.find("threads (scalar)"), std::string::npos) << err;
}

TEST_F(Cli, BadInputGivesClearErrors) {
    std::string out, err;
    EXPECT_EQ(cli("run --model " + model_ + " --tokens 1,600", &out, &err), 1);
    EXPECT_NE(err.find("token id 600 at input position 1 is out of range [0, 600)"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --tokens 1,x", &out, &err), 1);
    EXPECT_NE(err.find("'x' is not a non-negative token id"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --tokens 1 --prompt hi", &out, &err), 1);
    EXPECT_NE(err.find("exactly one of --prompt, --tokens, --stdin, --serve or --chat --interactive"),
              std::string::npos)
        << err;
    EXPECT_EQ(cli("run --model " + model_ + " --serve 127.0.0.1:0 --prompt hi", &out, &err), 1);
    EXPECT_NE(err.find("--serve takes requests over HTTP"), std::string::npos) << err;
    EXPECT_EQ(cli("serve --model " + model_ + " --serve 127.0.0.1:99999", &out, &err), 1);
    EXPECT_NE(err.find("the port must be a number in 0-65535"), std::string::npos) << err;
    EXPECT_EQ(cli("serve --model " + model_ + " --serve nohostport", &out, &err), 1);
    EXPECT_NE(err.find("expected HOST:PORT"), std::string::npos) << err;
    EXPECT_EQ(cli("serve --model " + model_ + " --parallel 8 --batch 4", &out, &err), 1);
    EXPECT_NE(err.find("--parallel 8 exceeds --batch 4"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --chat --interactive --prompt hi", &out, &err), 1);
    EXPECT_NE(err.find("--interactive reads the conversation from stdin"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --interactive", &out, &err), 1);
    EXPECT_NE(err.find("--interactive and --verbose-prompt need --chat"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --prompt hi -n 100 --ctx 50", &out, &err), 1);
    EXPECT_NE(err.find("exceeds the context size 50"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --prompt hi --kv-type q8", &out, &err), 1);
    EXPECT_NE(err.find("--kv-type"), std::string::npos) << err;
    std::string bogus = dir_ + "/bogus.gguf";
    ASSERT_EQ(run_capture("printf 'not a model at all' > " + bogus, &out), 0);
    EXPECT_EQ(cli("run --model " + bogus + " --prompt hi", &out, &err), 1);
    EXPECT_NE(err.find(bogus + ": byte offset 0: bad magic"), std::string::npos) << err;
    EXPECT_NE(cli("run --model " + dir_ + "/does-not-exist.gguf --prompt hi", &out, &err), 0);
    EXPECT_NE(err.find("does-not-exist.gguf"), std::string::npos) << err;
    EXPECT_NE(cli("make-model --out " + dir_ + "/x.gguf --type q9_9", &out, &err), 0);
    EXPECT_NE(err.find("q9_9"), std::string::npos) << err;
}

TEST_F(Cli, TokenizeAndInspect) {
    std::string out, err;
    ASSERT_EQ(cli("tokenize --model " + model_ + " --text 'Hello world 123' --json", &out, &err), 0) << err;
    auto j = nlohmann::json::parse(out);
    ASSERT_EQ(j["ids"].size(), j["pieces"].size());
    std::string joined;
    for (auto& p : j["pieces"]) joined += p.get<std::string>();
    EXPECT_EQ(joined, "Hello world 123");
    ASSERT_EQ(cli("inspect " + model_, &out, &err), 0) << err;
    EXPECT_NE(out.find("architecture: qwen3moe"), std::string::npos);
    EXPECT_NE(out.find("blk.1.ffn_down_exps.weight"), std::string::npos);
    EXPECT_NE(out.find("routed-expert weights:"), std::string::npos);
    EXPECT_NE(out.find("experts 4 top-2"), std::string::npos);
    EXPECT_NE(out.find("weight types: f32 ×"), std::string::npos) << out.substr(0, 2000);
}

TEST_F(Cli, HelpExplains) {
    std::string out, err;
    EXPECT_EQ(cli("run --help", &out, &err), 0);
    EXPECT_NE(out.find("--json"), std::string::npos);
    EXPECT_NE(out.find("--threads"), std::string::npos);
}

// `run --chat`: the prompt goes through a chat template (the model's own, ChatML here, or
// --chat-template-file) before generation, so the output is exactly the greedy output of the
// rendered text given as a plain --prompt.
TEST_F(Cli, ChatFormatsThePromptWithTheTemplate) {
    const std::string run = "run --model " + model_ + " --threads 1 --greedy -n 8 ";
    std::string out, err, want;
    // The model's own template (make-model writes the built-in ChatML one): --system and --prompt
    // become a system and a user message.
    ASSERT_EQ(cli(run + "--prompt hi --chat --system 'Be brief.'", &out, &err), 0) << err;
    // (sh: a single-quoted argument keeps its newlines)
    ASSERT_EQ(cli(run + "--prompt '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\n'",
                  &want, &err),
              0)
        << err;
    EXPECT_EQ(out, want);
    std::string plain;
    ASSERT_EQ(cli(run + "--prompt hi", &plain, &err), 0) << err;
    EXPECT_NE(out, plain) << "--chat made no difference to the output";
    ASSERT_EQ(cli(run + "--prompt hi --chat --no-think", &out, &err), 0) << err;
    ASSERT_EQ(cli(run + "--prompt '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'",
                  &want, &err),
              0)
        << err;
    EXPECT_EQ(out, want);
    ASSERT_EQ(cli("run --model " + model_ + " --prompt hi --chat --system S -n 4", &out, &err), 0) << err;

    // A template of our own: every message, enable_thinking and the generation prompt are visible.
    const std::string tmpl = dir_ + "/mine.jinja";
    {
        FILE* f = std::fopen(tmpl.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("{%- for m in messages %}[{{ m.role }}={{ m.content }}]{% endfor %}"
                   "{%- if enable_thinking is defined and enable_thinking is false %} no-think{% endif %}"
                   "{%- if add_generation_prompt %} >>{% endif %}\n",
                   f);
        std::fclose(f);
    }
    ASSERT_EQ(cli(run + "--prompt hi --chat --system S --chat-template-file " + tmpl, &out, &err), 0) << err;
    ASSERT_EQ(cli(run + "--prompt '[system=S][user=hi] >>'", &want, &err), 0) << err;
    EXPECT_EQ(out, want);
    ASSERT_EQ(cli(run + "--prompt hi --chat --no-think --chat-template-file " + tmpl, &out, &err), 0) << err;
    ASSERT_EQ(cli(run + "--prompt '[user=hi] no-think >>'", &want, &err), 0) << err;
    EXPECT_EQ(out, want);
}

// `moemesh chat`: each turn renders the whole conversation (the earlier replies included) and
// continues the sequence from the prefix it holds; the reply is what `run --prompt` gives for that
// very prompt, and /reset starts over.
TEST_F(Cli, InteractiveChatContinuesTheConversation) {
    const std::string input = dir_ + "/turns.txt";
    std::string out, err;
    ASSERT_EQ(run_capture("printf 'Hello there\\nTell me \\\\\\nmore\\n/reset\\nHello there\\n' > " + input, &out), 0);
    ASSERT_EQ(cli("chat --model " + model_ + " --threads 1 --greedy -n 6 --verbose-prompt < " + input, &out, &err), 0)
        << err;
    // The rendered prompts, from --verbose-prompt.
    std::vector<std::string> prompts;
    const std::string open = "--- prompt ---\n", close = "\n--- end of prompt ---\n";
    for (size_t at = err.find(open); at != std::string::npos; at = err.find(open, at + 1)) {
        const size_t end = err.find(close, at);
        ASSERT_NE(end, std::string::npos);
        prompts.push_back(err.substr(at + open.size(), end - at - open.size()));
    }
    ASSERT_EQ(prompts.size(), 3u) << err;
    EXPECT_EQ(prompts[0], "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_EQ(prompts[2], prompts[0]);
    // Turn 2 holds turn 1 and its reply, and the continued line.
    EXPECT_EQ(prompts[1].rfind(prompts[0], 0), 0u);
    EXPECT_NE(prompts[1].find("<|im_start|>user\nTell me \nmore<|im_end|>\n<|im_start|>assistant\n"),
              std::string::npos);
    EXPECT_NE(err.find("(new conversation)"), std::string::npos);
    // Each reply equals a one-shot run of its prompt (sh keeps the prompt's bytes via a file).
    std::string want;
    for (size_t i = 0; i < prompts.size(); ++i) {
        const std::string file = dir_ + "/prompt" + std::to_string(i) + ".txt";
        FILE* f = std::fopen(file.c_str(), "wb");
        ASSERT_TRUE(f);
        std::fwrite(prompts[i].data(), 1, prompts[i].size(), f);
        std::fclose(f);
        std::string one;
        ASSERT_EQ(run_capture("p=\"$(cat " + file + "; printf x)\"; " + moemesh_bin() + " run --model " + model_ +
                                  " --threads 1 --greedy -n 6 --prompt \"${p%x}\"",
                              &one, dir_ + "/one.err"),
                  0)
            << read_file(dir_ + "/one.err");
        want += one;
    }
    EXPECT_EQ(out, want);
    EXPECT_NE(err.find("new of"), std::string::npos);
}

TEST_F(Cli, ChatOptionErrors) {
    std::string out, err;
    // A template that does not parse: an error naming the file and the line, before any generation.
    const std::string bad = dir_ + "/broken.jinja";
    {
        FILE* f = std::fopen(bad.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("{%- for m in messages %}\n{{ m.content }}\n{% if m.role == %}x{% endif %}\n{% endfor %}\n", f);
        std::fclose(f);
    }
    EXPECT_NE(cli("run --model " + model_ + " --prompt hi --chat --chat-template-file " + bad + " -n 2", &out, &err), 0);
    EXPECT_NE(err.find(bad + " line 3"), std::string::npos) << err;
    EXPECT_EQ(out, "") << "generated despite the broken template";
    // An unclosed block: reported too.
    const std::string unclosed = dir_ + "/unclosed.jinja";
    {
        FILE* f = std::fopen(unclosed.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("{% for m in messages %}\n{{ m.content }}\n", f);
        std::fclose(f);
    }
    EXPECT_NE(cli("run --model " + model_ + " --prompt hi --chat --chat-template-file " + unclosed + " -n 2", &out, &err), 0);
    EXPECT_NE(err.find(unclosed + " line"), std::string::npos) << err;
    // A template that raises for this conversation: the template's own message.
    const std::string raises = dir_ + "/raises.jinja";
    {
        FILE* f = std::fopen(raises.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("{%- if messages[0].role == 'system' %}{{ raise_exception('No system prompts here.') }}{% endif %}"
                   "{{ messages[0].content }}",
                   f);
        std::fclose(f);
    }
    EXPECT_EQ(cli("run --model " + model_ + " --prompt hi --chat --system S --chat-template-file " + raises + " -n 2",
                  &out, &err),
              1);
    EXPECT_NE(err.find("No system prompts here."), std::string::npos) << err;
    // A template file that does not exist.
    EXPECT_NE(cli("run --model " + model_ + " --prompt hi --chat --chat-template-file " + dir_ + "/none.jinja", &out, &err),
              0);
    EXPECT_NE(err.find("none.jinja"), std::string::npos) << err;
    // Chat-only options without --chat.
    for (const std::string& opt : std::vector<std::string>{"--system S", "--no-think", "--chat-template-file " + bad}) {
        EXPECT_EQ(cli("run --model " + model_ + " --prompt hi -n 2 " + opt, &out, &err), 1) << opt;
        EXPECT_NE(err.find("apply to --chat"), std::string::npos) << opt << ": " << err;
        EXPECT_NE(err.find(opt.substr(0, opt.find(' '))), std::string::npos) << opt << ": " << err;
    }
}

// --grammar-file / --json-schema: the random model's text follows them; bad grammars and schemas are
// named errors before the model loads.
TEST_F(Cli, GrammarAndJsonSchemaConstrainTheText) {
    std::string out, err;
    const std::string grammar = dir_ + "/answer.gbnf";
    {
        FILE* f = std::fopen(grammar.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("# yes or no, then a number\nroot ::= (\"yes\" | \"no\") \" \" [0-9]{1,4} \".\"\n", f);
        std::fclose(f);
    }
    for (int seed = 1; seed <= 3; ++seed) {
        ASSERT_EQ(cli("run --model " + model_ + " --prompt 'Q:' -n 40 --seed " + std::to_string(seed) +
                          " --threads 1 --grammar-file " + grammar,
                      &out, &err),
                  0)
            << err;
        EXPECT_TRUE(std::regex_match(out, std::regex("(yes|no) [0-9]{1,4}\\.\n"))) << out;
    }
    const std::string schema = R"({"type":"object","properties":{"ok":{"type":"boolean"},"n":{"enum":[1,2,3]}},"required":["ok","n"],"additionalProperties":false})";
    ASSERT_EQ(cli("run --model " + model_ + " --prompt 'J:' -n 200 --seed 4 --threads 1 --json-schema '" + schema + "'",
                  &out, &err),
              0)
        << err;
    const nlohmann::json v = nlohmann::json::parse(out, nullptr, false);
    ASSERT_TRUE(v.is_object()) << out;
    EXPECT_TRUE(v["ok"].is_boolean()) << out;
    EXPECT_TRUE(v["n"] == 1 || v["n"] == 2 || v["n"] == 3) << out;
    EXPECT_EQ(v.size(), 2u) << out;
    // Errors.
    const std::string bad = dir_ + "/bad.gbnf";
    {
        FILE* f = std::fopen(bad.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("root ::= item\n", f);
        std::fclose(f);
    }
    EXPECT_EQ(cli("run --model " + model_ + " --prompt x --grammar-file " + bad, &out, &err), 1);
    EXPECT_NE(err.find("bad.gbnf: rule 'item' is used but not defined"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --prompt x --json-schema '{\"type\": \"txt\"}'", &out, &err), 1);
    EXPECT_NE(err.find("--json-schema: schema.type: unknown type 'txt'"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --prompt x --json-schema 'not json'", &out, &err), 1);
    EXPECT_NE(err.find("--json-schema: not a JSON schema"), std::string::npos) << err;
    EXPECT_EQ(cli("run --model " + model_ + " --tokens 1,2 --json --grammar-file " + grammar, &out, &err), 1);
    EXPECT_NE(err.find("apply to --prompt"), std::string::npos) << err;
}

// A recurrent model (qwen3next) in `moemesh chat` with a template that does not render replies
// back: the sequence (prompt + reply) is no prefix of the next prompt, but the previous prompt is,
// and the DeltaNet state kept when it ended carries the conversation on: turn 2 reads only its
// new tokens, and each reply still equals a one-shot run of its prompt.
TEST_F(Cli, InteractiveChatOnARecurrentModelContinuesFromThePreviousPrompt) {
    std::string out, err;
    const std::string next = dir_ + "/next.gguf";
    ASSERT_EQ(cli("make-model --arch qwen3next --out " + next +
                      " --layers 4 --hidden 64 --heads 2 --kv-heads 1 --head-dim 32 --experts 4 --top-k 2"
                      " --expert-ff 32 --vocab 600 --ssm-head-dim 32 --full-attention-interval 2 --seed 5",
                  &out, &err),
              0)
        << err;
    const std::string tmpl = dir_ + "/users_only.jinja";
    {
        FILE* f = std::fopen(tmpl.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("{%- for m in messages %}{%- if m.role == 'user' %}U: {{ m.content }}\n{% endif %}{%- endfor %}", f);
        std::fclose(f);
    }
    const std::string input = dir_ + "/next_turns.txt";
    ASSERT_EQ(run_capture("printf 'Hello there\\nTell me more\\n' > " + input, &out), 0);
    ASSERT_EQ(cli("chat --model " + next + " --chat-template-file " + tmpl + " --threads 1 --greedy -n 5 < " + input,
                  &out, &err),
              0)
        << err;
    std::vector<std::pair<long, long>> stats;  // (new, of) per turn
    for (size_t at = err.find("[prompt: "); at != std::string::npos; at = err.find("[prompt: ", at + 1)) {
        long n_new = 0, n_all = 0;
        ASSERT_EQ(std::sscanf(err.c_str() + at, "[prompt: %ld new of %ld", &n_new, &n_all), 2) << err;
        stats.push_back({n_new, n_all});
    }
    ASSERT_EQ(stats.size(), 2u) << err;
    EXPECT_EQ(stats[0].first, stats[0].second);
    EXPECT_EQ(stats[1].first, stats[1].second - stats[0].second) << err;  // only what follows turn 1's prompt
    std::string want;
    int k = 0;
    for (const std::string prompt : {"U: Hello there\n", "U: Hello there\nU: Tell me more\n"}) {
        const std::string file = dir_ + "/next_prompt" + std::to_string(k++) + ".txt";
        FILE* f = std::fopen(file.c_str(), "wb");
        ASSERT_TRUE(f);
        std::fwrite(prompt.data(), 1, prompt.size(), f);
        std::fclose(f);
        std::string one;
        ASSERT_EQ(run_capture("p=\"$(cat " + file + "; printf x)\"; " + moemesh_bin() + " run --model " + next +
                                  " --threads 1 --greedy -n 5 --prompt \"${p%x}\"",
                              &one, dir_ + "/one.err"),
                  0)
            << read_file(dir_ + "/one.err");
        want += one;
    }
    EXPECT_EQ(out, want);
}

}  // namespace
}  // namespace moemesh
