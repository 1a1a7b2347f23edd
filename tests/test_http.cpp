// The OpenAI-compatible HTTP server (tools/http_server.h): request validation (every bad field is
// named), a deterministic mutation fuzz of the parser, and a live server on a free loopback port
// with a small model: greedy completions equal the model's own greedy tokens, streaming equals the
// whole response, stop strings, chat, errors (400/404/413) as JSON, a client that hangs up
// mid-stream, and the server still serving after all of it.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/chat_reply.h"
#include "common/chat_template.h"
#include "common/tokenizer_unicode.h"
#include "coordinator/model.h"
#include "tests/test_util.h"
#include "tools/http_server.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

using json = nlohmann::json;
using namespace moemesh::testing;

RequestLimits limits() {
    RequestLimits l;
    l.n_ctx = 128;
    l.n_vocab = 512;
    return l;
}

TEST(HttpRequest, ParsesCompletionsAndChat) {
    auto c = parse_gen_request(
        R"({"prompt":"Hi","max_tokens":7,"temperature":0,"top_k":3,"top_p":0.5,"min_p":0.2,"seed":9,
            "stop":["a","bc"],"stream":true,"n":1,"presence_penalty":0,"user":"x"})",
        false, limits());
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(c.value().prompt, "Hi");
    EXPECT_EQ(c.value().max_tokens, 7);
    EXPECT_TRUE(c.value().sp.greedy);
    EXPECT_EQ(c.value().sp.top_k, 3);
    EXPECT_FLOAT_EQ(c.value().sp.top_p, 0.5f);
    EXPECT_EQ(c.value().sp.seed, 9u);
    EXPECT_EQ(c.value().stop, (std::vector<std::string>{"a", "bc"}));
    EXPECT_TRUE(c.value().stream);

    auto t = parse_gen_request(R"({"prompt":[1,2,511]})", false, limits());
    ASSERT_TRUE(t.ok()) << t.status().message();
    EXPECT_EQ(t.value().tokens, (std::vector<int32_t>{1, 2, 511}));
    EXPECT_EQ(t.value().max_tokens, -1);  // until the context is full

    auto ch = parse_gen_request(
        R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"A"},
            {"type":"text","text":"B"}]},{"role":"assistant","content":null},{"role":"developer","content":"D"}],
            "max_completion_tokens":5})",
        true, limits());
    ASSERT_TRUE(ch.ok()) << ch.status().message();
    EXPECT_EQ(ch.value().prompt,
              "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nAB<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
              "<|im_start|>system\nD<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_EQ(ch.value().max_tokens, 5);

    auto nothink = parse_gen_request(
        R"({"messages":[{"role":"user","content":"Q"}],"chat_template_kwargs":{"enable_thinking":false}})", true,
        limits());
    ASSERT_TRUE(nothink.ok()) << nothink.status().message();
    EXPECT_EQ(nothink.value().prompt, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");

    // logprobs: off unless asked; chat takes a boolean + top_logprobs, completions a count.
    EXPECT_EQ(c.value().logprobs, -1);
    EXPECT_EQ(ch.value().logprobs, -1);
    auto lc = parse_gen_request(R"({"prompt":"x","logprobs":3})", false, limits());
    ASSERT_TRUE(lc.ok()) << lc.status().message();
    EXPECT_EQ(lc.value().logprobs, 3);
    const char* msgs = R"("messages":[{"role":"user","content":"Q"}])";
    auto l0 = parse_gen_request(std::string("{") + msgs + R"(,"logprobs":true})", true, limits());
    ASSERT_TRUE(l0.ok()) << l0.status().message();
    EXPECT_EQ(l0.value().logprobs, 0);
    auto l5 = parse_gen_request(std::string("{") + msgs + R"(,"logprobs":true,"top_logprobs":5})", true, limits());
    ASSERT_TRUE(l5.ok()) << l5.status().message();
    EXPECT_EQ(l5.value().logprobs, 5);
    auto off = parse_gen_request(std::string("{") + msgs + R"(,"logprobs":false,"top_logprobs":0})", true, limits());
    ASSERT_TRUE(off.ok()) << off.status().message();
    EXPECT_EQ(off.value().logprobs, -1);
}

TEST(HttpRequest, BadFieldsAreNamed) {
    struct Bad {
        bool chat;
        const char* body;
        const char* needle;
    };
    const Bad bad[] = {
        {false, "", "not valid JSON"},
        {false, "{", "not valid JSON"},
        {false, "[1,2]", "must be a JSON object"},
        {false, "88888888.888888E88888838888888888838{", "not valid JSON"},  // fuzz_http: overflow threw
        {false, R"({"prompt":"x","max_tokens":1e999})", "not valid JSON"},
        {false, "{}", "'prompt' is required"},
        {false, R"({"prompt":""})", "'prompt' is empty"},
        {false, R"({"prompt":5})", "'prompt' must be"},
        {false, R"({"prompt":[1,-2]})", "'prompt[1]'"},
        {false, R"({"prompt":[1,512]})", "'prompt[1]' must be a token id in [0, 512)"},
        {false, R"({"prompt":[1,2.5]})", "'prompt[1]'"},
        {false, R"({"prompt":"x","max_tokens":"ten"})", "'max_tokens' must be an integer"},
        {false, R"({"prompt":"x","max_tokens":-5})", "'max_tokens' must be between -1 and 128"},
        {false, R"({"prompt":"x","max_tokens":129})", "'max_tokens' must be between -1 and 128"},
        {false, R"({"prompt":"x","max_tokens":1.5})", "'max_tokens' must be an integer"},
        {false, R"({"prompt":"x","temperature":"hot"})", "'temperature' must be a number"},
        {false, R"({"prompt":"x","temperature":-1})", "'temperature' must be between"},
        {false, R"({"prompt":"x","top_p":1.5})", "'top_p' must be between"},
        {false, R"({"prompt":"x","top_k":-1})", "'top_k' must be between"},
        {false, R"({"prompt":"x","seed":-1})", "'seed' must be between"},
        {false, R"({"prompt":"x","n":2})", "'n' must be 1"},
        {false, R"({"prompt":"x","stream":"yes"})", "'stream' must be a boolean"},
        {false, R"({"prompt":"x","stop":5})", "'stop' must be"},
        {false, R"({"prompt":"x","stop":[""]})", "'stop' strings"},
        {false, R"({"prompt":"x","stop":["a",1]})", "'stop[1]'"},
        {false, R"({"prompt":"x","logprobs":true})", "'logprobs' must be an integer 0-20"},
        {false, R"({"prompt":"x","logprobs":21})", "'logprobs' must be between 0 and 20"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"logprobs":3})", "'logprobs' must be a boolean"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21})",
         "'top_logprobs' must be between 0 and 20"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", "'top_logprobs' needs"},
        {true, R"({"prompt":"x"})", "'messages' is required"},
        {true, R"({"messages":[]})", "'messages' must be a non-empty array"},
        {true, R"({"messages":[5]})", "'messages[0]' must be an object"},
        {true, R"({"messages":[{"content":"x"}]})", "'messages[0].role' must be a string"},
        {true, R"({"messages":[{"role":"function","content":"x"}]})", "'messages[0].role' is 'function'"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"tool_choice":"required"})", "'tool_choice'"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]})", "'tools[0]'"},
        {true, R"({"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"[1]"}}]}]})", "arguments"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"messages":[]}})", "cannot be set"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"reasoning_format":"xml"})", "'reasoning_format'"},
        {true, R"({"messages":[{"role":"user","content":5}]})", "'messages[0].content' must be"},
        {true, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})", "only text parts"},
        {true, R"({"messages":[{"role":"user","content":[{"type":"text"}]}]})", "'messages[0].content[0].text'"},
        {true, R"({"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"enable_thinking":"no"}})",
         "'chat_template_kwargs.enable_thinking' must be a boolean"},
    };
    for (const Bad& b : bad) {
        auto r = parse_gen_request(b.body, b.chat, limits());
        ASSERT_FALSE(r.ok()) << b.body;
        EXPECT_NE(r.status().message().find(b.needle), std::string::npos) << b.body << " -> " << r.status().message();
    }
}

// Random byte edits, truncations and splices of valid bodies: the parser answers every one (an
// error or a request within the limits) and never throws.
TEST(HttpRequest, MutatedBodiesNeverCrash) {
    const std::vector<std::string> seeds = {
        R"({"prompt":"Hello","max_tokens":8,"temperature":0,"stop":["\n","END"],"stream":true})",
        R"({"prompt":[1,2,3],"n":1,"seed":7,"top_k":5,"top_p":0.9,"min_p":0.1})",
        R"({"messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_completion_tokens":16})",
    };
    const std::string alphabet = "{}[]\":,.-+eE0123456789 \\ntrufalsn\x01\xff\xc3";
    std::mt19937 rng(5);
    int ok = 0;
    for (int it = 0; it < 20000; ++it) {
        std::string s = seeds[rng() % seeds.size()];
        const int edits = 1 + static_cast<int>(rng() % 4);
        for (int e = 0; e < edits && !s.empty(); ++e) {
            const size_t at = rng() % s.size();
            switch (rng() % 4) {
                case 0: s[at] = alphabet[rng() % alphabet.size()]; break;
                case 1: s.erase(at, 1 + rng() % 3); break;
                case 2: s.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
                default: s = s.substr(0, at) + seeds[rng() % seeds.size()].substr(at % 20); break;
            }
        }
        for (bool chat : {false, true}) {
            ASSERT_NO_THROW({
                auto r = parse_gen_request(s, chat, limits());
                if (r.ok()) {
                    ++ok;
                    EXPECT_LE(r.value().max_tokens, 128) << s;
                    for (int32_t t : r.value().tokens) EXPECT_LT(t, 512) << s;
                }
            }) << s;
        }
    }
    EXPECT_GT(ok, 0);  // some mutations stay valid
}

// A live server on a small random qwen3moe model.
class HttpServerTest : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        dir_ = new std::string(temp_dir("http"));
        MakeModelOptions o;
        o.arch = "qwen3moe";
        o.out = *dir_ + "/m.gguf";
        o.layers = 2;
        o.hidden = 64;
        o.heads = 2;
        o.kv_heads = 1;
        o.head_dim = 32;
        o.experts = 4;
        o.top_k = 2;
        o.expert_ff = 64;
        o.vocab = 512;
        o.seed = 3;
        std::ostringstream log;
        ASSERT_TRUE(make_model(o, log).ok());
        auto f = GgufFile::open(o.out);
        ASSERT_TRUE(f.ok()) << f.status().message();
        file_ = new std::shared_ptr<GgufFile>(std::move(f).value());
        auto t = Tokenizer::from_gguf(**file_);
        ASSERT_TRUE(t.ok()) << t.status().message();
        tok_ = new Tokenizer(std::move(t).value());
        ModelOptions mo;
        mo.n_threads = 1;
        auto m = load_model(*file_, mo);
        ASSERT_TRUE(m.ok()) << m.status().message();
        model_ = std::move(m).value().release();
        start_server(nullptr, &server_, &thread_, &port_);
    }
    // A server on the shared model; `chat` null: the model's own template (ChatML here).
    static void start_server(std::shared_ptr<const ChatFormatter> chat, HttpServer** server, std::thread** thread,
                             int* port_out, int64_t n_ctx = 256, int socket_send_buffer = 0) {
        HttpServerOptions ho;
        ho.model_name = "tiny";
        ho.limits.n_ctx = n_ctx;
        ho.limits.n_vocab = 512;
        ho.max_body_bytes = 64 << 10;
        ho.log_requests = false;
        ho.chat = std::move(chat);
        // Prompts run 3 tokens at a time between decode steps: every test's text (compared with the
        // model's greedy text from one forward() of the whole prompt) also checks that chunking.
        ho.prompt_chunk = 3;
        ho.socket_send_buffer = socket_send_buffer;
        HttpServer* s = new HttpServer(*model_, *tok_, ho);
        *server = s;
        auto port = s->bind("127.0.0.1", 0);
        ASSERT_TRUE(port.ok()) << port.status().message();
        *port_out = port.value();
        *thread = new std::thread([s] { (void)s->run(); });
        httplib::Client c("127.0.0.1", *port_out);
        for (int i = 0; i < 100 && !c.Get("/health"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    static void TearDownTestSuite() {
        if (server_) server_->stop();
        if (thread_) thread_->join();
        delete thread_;
        delete server_;
        delete model_;
        delete tok_;
        delete file_;
        delete dir_;
        thread_ = nullptr;
        server_ = nullptr;
        model_ = nullptr;
        tok_ = nullptr;
        file_ = nullptr;
        dir_ = nullptr;
    }

    static httplib::Result post(const std::string& path, const std::string& body) { return post_to(port_, path, body); }
    static httplib::Result post_to(int port, const std::string& path, const std::string& body) {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(60, 0);
        return c.Post(path.c_str(), body, "application/json");
    }

    // The model's own greedy continuation of `prompt` (bos as the server adds it), as text.
    static std::string greedy_text(const std::string& prompt, int n, std::vector<int32_t>* ids = nullptr) {
        std::vector<int32_t> in = tok_->encode(prompt, true);
        if (tok_->add_bos() && tok_->bos_id() >= 0) in.insert(in.begin(), tok_->bos_id());
        auto seq = model_->new_sequence(static_cast<int64_t>(in.size()) + n).value();
        std::vector<float> logits;
        EXPECT_TRUE(model_->forward(*seq, in.data(), static_cast<int64_t>(in.size()), false, &logits).ok());
        std::string text;
        for (int i = 0; i < n; ++i) {
            int32_t next = argmax(logits.data(), model_->config().n_vocab);
            if (tok_->is_eog(next)) break;
            if (ids) ids->push_back(next);
            text += tok_->token_to_piece(next);
            if (i + 1 < n) {
                EXPECT_TRUE(model_->forward(*seq, &next, 1, false, &logits).ok());
            }
        }
        return text;
    }

    // Concatenated text of an SSE stream's chunks; *finish gets the last finish_reason.
    static std::string stream_text(const std::string& body, bool chat, std::string* finish, bool* done) {
        std::string text;
        std::istringstream in(body);
        std::string line;
        *done = false;
        while (std::getline(in, line)) {
            if (line.rfind("data: ", 0) != 0) continue;
            const std::string data = line.substr(6);
            if (data == "[DONE]") {
                *done = true;
                continue;
            }
            json j = json::parse(data);
            EXPECT_FALSE(j.contains("error")) << data;
            const json& ch = j["choices"][0];
            if (!ch["finish_reason"].is_null()) *finish = ch["finish_reason"].get<std::string>();
            if (chat && ch["delta"].contains("content")) text += ch["delta"]["content"].get<std::string>();
            if (!chat) text += ch["text"].get<std::string>();
        }
        return text;
    }

    static std::string* dir_;
    static std::shared_ptr<GgufFile>* file_;
    static Tokenizer* tok_;
    static Model* model_;
    static HttpServer* server_;
    static std::thread* thread_;
    static int port_;
};
std::string* HttpServerTest::dir_ = nullptr;
std::shared_ptr<GgufFile>* HttpServerTest::file_ = nullptr;
Tokenizer* HttpServerTest::tok_ = nullptr;
Model* HttpServerTest::model_ = nullptr;
HttpServer* HttpServerTest::server_ = nullptr;
std::thread* HttpServerTest::thread_ = nullptr;
int HttpServerTest::port_ = 0;

// JSON text with invalid UTF-8 replaced, as the server sends it (random models emit odd bytes).
std::string as_sent(const std::string& s) { return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>(); }

TEST_F(HttpServerTest, HealthAndModels) {
    httplib::Client c("127.0.0.1", port_);
    auto h = c.Get("/health");
    ASSERT_TRUE(h);
    EXPECT_EQ(h->status, 200);
    EXPECT_EQ(json::parse(h->body)["status"], "ok");
    auto m = c.Get("/v1/models");
    ASSERT_TRUE(m);
    EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "tiny");
}

TEST_F(HttpServerTest, GreedyCompletionIsTheModelsGreedyText) {
    const std::string want = greedy_text("Hello world", 12);
    auto r = post("/v1/completions", R"({"prompt":"Hello world","max_tokens":12,"temperature":0})");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    json j = json::parse(r->body);
    EXPECT_EQ(j["object"], "text_completion");
    EXPECT_EQ(j["model"], "tiny");
    EXPECT_EQ(j["choices"][0]["text"], as_sent(want));
    EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(j["usage"]["completion_tokens"], 12);
    EXPECT_EQ(j["usage"]["total_tokens"], j["usage"]["prompt_tokens"].get<int>() + 12);
    // Token-id prompts: the same continuation.
    std::vector<int32_t> in = tok_->encode("Hello world", true);
    if (tok_->add_bos() && tok_->bos_id() >= 0) in.insert(in.begin(), tok_->bos_id());
    auto r2 = post("/v1/completions", json{{"prompt", in}, {"max_tokens", 12}, {"temperature", 0}}.dump());
    ASSERT_TRUE(r2);
    EXPECT_EQ(json::parse(r2->body)["choices"][0]["text"], as_sent(want));
}

TEST_F(HttpServerTest, StreamingEqualsTheWholeResponse) {
    for (bool chat : {false, true}) {
        const std::string path = chat ? "/v1/chat/completions" : "/v1/completions";
        json req = {{"max_tokens", 16}, {"temperature", 0}};
        if (chat)
            req["messages"] = {{{"role", "user"}, {"content", "Tell me"}}};
        else
            req["prompt"] = "Tell me";
        auto whole = post(path, req.dump());
        ASSERT_TRUE(whole);
        ASSERT_EQ(whole->status, 200) << whole->body;
        json w = json::parse(whole->body);
        const std::string want = chat ? w["choices"][0]["message"]["content"].get<std::string>()
                                      : w["choices"][0]["text"].get<std::string>();
        req["stream"] = true;
        auto s = post(path, req.dump());
        ASSERT_TRUE(s);
        ASSERT_EQ(s->status, 200);
        EXPECT_NE(s->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
        std::string finish;
        bool done = false;
        EXPECT_EQ(stream_text(s->body, chat, &finish, &done), want) << path;
        EXPECT_EQ(finish, "length");
        EXPECT_TRUE(done);
    }
    // The chat prompt is the model's template (ChatML here): the same text as a completion of it.
    auto chat = post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Tell me"}],"max_tokens":6,"temperature":0})");
    ASSERT_TRUE(chat);
    EXPECT_EQ(json::parse(chat->body)["choices"][0]["message"]["content"],
              as_sent(greedy_text("<|im_start|>user\nTell me<|im_end|>\n<|im_start|>assistant\n", 6)));
}

// Log-probabilities (OpenAI "logprobs"): every generated token's log-softmax value and the most
// likely alternatives, equal to the model's own distribution at that step (recomputed here from
// forward()), in the completions form (tokens / token_logprobs / top_logprobs / text_offset) and the
// chat form (content: token, logprob, bytes, top_logprobs); streams carry the same entries spread
// over their chunks; tokens cut off by a stop string are not reported.
TEST_F(HttpServerTest, LogprobsAreTheModelsLogSoftmax) {
    // The distributions each greedy token of `prompt` was drawn from.
    auto reference = [](const std::string& prompt, int n, std::vector<int32_t>* ids) {
        greedy_text(prompt, n, ids);
        std::vector<int32_t> in = tok_->encode(prompt, true);
        if (tok_->add_bos() && tok_->bos_id() >= 0) in.insert(in.begin(), tok_->bos_id());
        auto seq = model_->new_sequence(static_cast<int64_t>(in.size() + ids->size()) + 1).value();
        std::vector<float> logits;
        std::vector<std::vector<double>> out;
        EXPECT_TRUE(model_->forward(*seq, in.data(), static_cast<int64_t>(in.size()), false, &logits).ok());
        for (int32_t id : *ids) {
            double z = 0;
            for (float l : logits) z += std::exp(static_cast<double>(l));
            std::vector<double> lsm;
            for (float l : logits) lsm.push_back(static_cast<double>(l) - std::log(z));
            out.push_back(std::move(lsm));
            EXPECT_TRUE(model_->forward(*seq, &id, 1, false, &logits).ok());
        }
        return out;
    };
    auto piece = [](int32_t id) { return tok_->token_to_piece(id); };
    // The ids of the n highest values, highest first (lower id on ties).
    auto best = [](const std::vector<double>& v, size_t n) {
        std::vector<int32_t> ids(v.size());
        for (size_t i = 0; i < v.size(); ++i) ids[i] = static_cast<int32_t>(i);
        std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
        ids.resize(n);
        return ids;
    };
    // Every "data:" chunk's choices[0].logprobs, in order.
    auto stream_logprobs = [](const std::string& body) {
        std::vector<json> out;
        std::istringstream in(body);
        for (std::string line; std::getline(in, line);) {
            if (line.rfind("data: {", 0) != 0) continue;
            const json j = json::parse(line.substr(6));
            const json& ch = j["choices"][0];
            if (ch.contains("logprobs") && !ch["logprobs"].is_null()) out.push_back(ch["logprobs"]);
        }
        return out;
    };

    // Completions, 3 alternatives per token.
    std::vector<int32_t> ids;
    const std::vector<std::vector<double>> ref = reference("Hello world", 10, &ids);
    ASSERT_FALSE(ids.empty());
    json req = {{"prompt", "Hello world"}, {"max_tokens", 10}, {"temperature", 0}, {"logprobs", 3}};
    auto r = post("/v1/completions", req.dump());
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    const json lp = json::parse(r->body)["choices"][0]["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), ids.size()) << lp.dump();
    size_t offset = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
        EXPECT_EQ(lp["tokens"][i], as_sent(piece(ids[i])));
        EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), ref[i][ids[i]], 1e-9) << "token " << i;
        EXPECT_EQ(lp["text_offset"][i], offset);
        offset += piece(ids[i]).size();
        const std::vector<int32_t> top = best(ref[i], 3);
        EXPECT_EQ(top[0], ids[i]);  // greedy
        const json& alts = lp["top_logprobs"][i];
        ASSERT_TRUE(alts.is_object());
        std::set<std::string> keys;
        for (int32_t id : top) keys.insert(as_sent(piece(id)));
        if (keys.size() < 3) continue;  // two alternatives print alike: one key
        ASSERT_EQ(alts.size(), 3u) << alts.dump();
        for (int32_t id : top) EXPECT_NEAR(alts[as_sent(piece(id))].get<double>(), ref[i][id], 1e-9);
    }
    // The same, streamed: the chunks' entries add up to the whole response's.
    req["stream"] = true;
    auto s = post("/v1/completions", req.dump());
    ASSERT_TRUE(s);
    json joined = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
                   {"text_offset", json::array()}};
    for (const json& part : stream_logprobs(s->body))
        for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
            for (const json& e : part[k]) joined[k].push_back(e);
    EXPECT_EQ(joined, lp);

    // Chat, 2 alternatives per token, with the bytes of each token.
    const std::string rendered = "<|im_start|>user\nTell me<|im_end|>\n<|im_start|>assistant\n";
    std::vector<int32_t> chat_ids;
    const std::vector<std::vector<double>> chat_ref = reference(rendered, 8, &chat_ids);
    json creq = {{"messages", {{{"role", "user"}, {"content", "Tell me"}}}},
                 {"max_tokens", 8}, {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}};
    auto c = post("/v1/chat/completions", creq.dump());
    ASSERT_TRUE(c);
    ASSERT_EQ(c->status, 200) << c->body;
    const json content = json::parse(c->body)["choices"][0]["logprobs"]["content"];
    ASSERT_EQ(content.size(), chat_ids.size()) << content.dump();
    for (size_t i = 0; i < chat_ids.size(); ++i) {
        const json& e = content[i];
        const std::string p = piece(chat_ids[i]);
        EXPECT_EQ(e["token"], as_sent(p));
        json bytes = json::array();
        for (unsigned char ch : p) bytes.push_back(static_cast<int>(ch));
        EXPECT_EQ(e["bytes"], bytes);
        EXPECT_NEAR(e["logprob"].get<double>(), chat_ref[i][chat_ids[i]], 1e-9);
        const std::vector<int32_t> top = best(chat_ref[i], 2);
        ASSERT_EQ(e["top_logprobs"].size(), 2u);
        for (size_t k = 0; k < 2; ++k) {
            EXPECT_EQ(e["top_logprobs"][k]["token"], as_sent(piece(top[k])));
            EXPECT_NEAR(e["top_logprobs"][k]["logprob"].get<double>(), chat_ref[i][top[k]], 1e-9);
        }
    }
    creq["stream"] = true;
    auto cs = post("/v1/chat/completions", creq.dump());
    ASSERT_TRUE(cs);
    json chat_joined = json::array();
    for (const json& part : stream_logprobs(cs->body))
        for (const json& e : part["content"]) chat_joined.push_back(e);
    EXPECT_EQ(chat_joined, content);

    // Not asked: null (or absent in stream chunks).
    auto none = post("/v1/completions", R"({"prompt":"Hello world","max_tokens":3,"temperature":0})");
    ASSERT_TRUE(none);
    EXPECT_TRUE(json::parse(none->body)["choices"][0]["logprobs"].is_null());
    auto none_s = post("/v1/completions", R"({"prompt":"Hello world","max_tokens":3,"temperature":0,"stream":true})");
    ASSERT_TRUE(none_s);
    EXPECT_TRUE(stream_logprobs(none_s->body).empty());

    // A stop string: only the tokens whose text (partly) precedes it.
    const std::string full = greedy_text("Hello world", 10);
    size_t at = full.size() / 2;
    auto ascii = [&](size_t i) { return i < full.size() && full[i] >= 0x20 && full[i] < 0x7f; };
    while (at < full.size() && !ascii(at)) ++at;
    ASSERT_LT(at, full.size()) << "no ASCII byte in the greedy text";
    const std::string stop = full.substr(at, 1);
    const size_t cut = full.find(stop);
    size_t n_before = 0;
    for (size_t o = 0; n_before < ids.size() && o < cut; o += piece(ids[n_before++]).size()) {
    }
    for (bool stream : {false, true}) {
        json sreq = {{"prompt", "Hello world"}, {"max_tokens", 10}, {"temperature", 0}, {"logprobs", 0},
                     {"stop", {stop}}, {"stream", stream}};
        auto sr = post("/v1/completions", sreq.dump());
        ASSERT_TRUE(sr);
        json offsets = json::array();
        if (stream) {
            for (const json& part : stream_logprobs(sr->body))
                for (const json& o : part["text_offset"]) offsets.push_back(o);
        } else {
            offsets = json::parse(sr->body)["choices"][0]["logprobs"]["text_offset"];
        }
        EXPECT_EQ(offsets.size(), n_before) << "stream " << stream << ", stop '" << stop << "' at " << cut;
    }
}

// Constrained output on a random-weight model, which on its own never writes JSON: with a grammar
// every reply matches it. json_schema / response_format replies parse as JSON and satisfy the
// schema; tool_choice "required" and a named function give tool_calls with schema-valid
// arguments; streams equal whole responses; bad constraints are 400s naming the field.
TEST_F(HttpServerTest, ConstrainedOutputFollowsTheGrammar) {
    HttpServer* server = nullptr;
    std::thread* thread = nullptr;
    int port = 0;
    start_server(nullptr, &server, &thread, &port, /*n_ctx=*/2048);
    auto call = [&](const std::string& path, const json& body) {
        auto r = post_to(port, path, body.dump());
        EXPECT_TRUE(r);
        return r ? json::parse(r->body) : json();
    };
    // A GBNF grammar (llama.cpp's "grammar" field).
    for (int seed = 1; seed <= 4; ++seed) {
        const json j = call("/v1/completions", {{"prompt", "Answer:"}, {"max_tokens", 40}, {"temperature", 1.0},
                                                {"seed", seed}, {"grammar", "root ::= (\"yes\" | \"no\") \", \" [0-9]{1,3}"}});
        const std::string text = j["choices"][0]["text"].get<std::string>();
        EXPECT_TRUE(std::regex_match(text, std::regex("(yes|no), [0-9]{1,3}"))) << text;
        EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
    }
    // A JSON schema; its sentences are bounded, so every reply ends by itself.
    const json schema = {
        {"type", "object"},
        {"properties",
         {{"name", {{"type", "string"}, {"maxLength", 6}}},
          {"age", {{"type", "integer"}, {"minimum", 0}}},
          {"tags", {{"type", "array"}, {"items", {{"enum", {"red", "green"}}}}, {"maxItems", 2}}}}},
        {"required", {"name", "age"}},
        {"additionalProperties", false}};
    for (int seed = 1; seed <= 6; ++seed) {
        json body = {{"max_tokens", 600}, {"temperature", 1.0}, {"seed", seed}};
        std::string path, text;
        if (seed % 2) {
            path = "/v1/completions";
            body["prompt"] = "JSON:";
            body["json_schema"] = schema;
        } else {
            path = "/v1/chat/completions";
            body["messages"] = {{{"role", "user"}, {"content", "Describe a person"}}};
            body["response_format"] = {{"type", "json_schema"}, {"json_schema", {{"name", "person"}, {"schema", schema}}}};
        }
        const json j = call(path, body);
        ASSERT_TRUE(j.contains("choices")) << j.dump();
        text = seed % 2 ? j["choices"][0]["text"].get<std::string>() : j["choices"][0]["message"]["content"].get<std::string>();
        EXPECT_EQ(j["choices"][0]["finish_reason"], "stop") << text;
        const json v = json::parse(text, nullptr, false);
        ASSERT_FALSE(v.is_discarded()) << "not JSON: " << text;
        ASSERT_TRUE(v.is_object()) << text;
        ASSERT_TRUE(v.contains("name") && v["name"].is_string()) << text;
        EXPECT_LE(unicode::utf8_to_cpts(v["name"].get<std::string>()).size(), 6u) << text;
        ASSERT_TRUE(v.contains("age") && v["age"].is_number_integer()) << text;
        EXPECT_GE(v["age"].get<int64_t>(), 0) << text;
        for (auto it = v.begin(); it != v.end(); ++it) EXPECT_TRUE(it.key() == "name" || it.key() == "age" || it.key() == "tags") << text;
        if (v.contains("tags")) {
            ASSERT_TRUE(v["tags"].is_array()) << text;
            EXPECT_LE(v["tags"].size(), 2u);
            for (const json& t : v["tags"]) EXPECT_TRUE(t == "red" || t == "green") << text;
        }
    }
    // Tool calls: "required" (any tool) and a named function, one call each.
    const json tools = json::parse(R"([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
          "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
          "properties": {"zone": {"type": "string", "maxLength": 5}}, "required": ["zone"], "additionalProperties": false}}}])");
    for (int seed = 1; seed <= 4; ++seed) {
        json body = {{"messages", {{{"role", "user"}, {"content", "Weather?"}}}}, {"tools", tools}, {"max_tokens", 600},
                     {"temperature", 1.0}, {"seed", seed}, {"parallel_tool_calls", false}};
        body["tool_choice"] = seed <= 2 ? json("required") : json{{"type", "function"}, {"function", {{"name", "get_time"}}}};
        const json j = call("/v1/chat/completions", body);
        ASSERT_TRUE(j.contains("choices")) << j.dump();
        const json& msg = j["choices"][0]["message"];
        EXPECT_EQ(j["choices"][0]["finish_reason"], "tool_calls") << j.dump();
        ASSERT_TRUE(msg.contains("tool_calls")) << j.dump();
        ASSERT_EQ(msg["tool_calls"].size(), 1u) << j.dump();
        const json& fn = msg["tool_calls"][0]["function"];
        const json args = json::parse(fn["arguments"].get<std::string>());
        if (seed > 2) {
            EXPECT_EQ(fn["name"], "get_time");
        }
        if (fn["name"] == "get_time") {
            ASSERT_TRUE(args.contains("zone") && args["zone"].is_string()) << args.dump();
            EXPECT_EQ(args.size(), 1u);
        } else {
            ASSERT_EQ(fn["name"], "get_weather");
            ASSERT_TRUE(args.contains("city") && args["city"].is_string()) << args.dump();
            if (args.contains("unit")) {
                EXPECT_TRUE(args["unit"] == "c" || args["unit"] == "f") << args.dump();
            }
        }
    }
    // Streamed = whole (greedy).
    json sbody = {{"prompt", "JSON:"}, {"max_tokens", 600}, {"temperature", 0}, {"json_schema", schema}};
    const std::string whole = call("/v1/completions", sbody)["choices"][0]["text"].get<std::string>();
    sbody["stream"] = true;
    auto s = post_to(port, "/v1/completions", sbody.dump());
    ASSERT_TRUE(s);
    std::string finish;
    bool done = false;
    EXPECT_EQ(stream_text(s->body, false, &finish, &done), whole);
    EXPECT_EQ(finish, "stop");
    // Errors name the field.
    struct Bad {
        const char* path;
        json body;
        const char* needle;
    };
    const json msgs = {{{"role", "user"}, {"content", "x"}}};
    const std::vector<Bad> bad = {
        {"/v1/completions", {{"prompt", "x"}, {"grammar", "root ::= [a-"}}, "'grammar': grammar line 1"},
        {"/v1/completions", {{"prompt", "x"}, {"grammar", "root ::= nope"}}, "rule 'nope' is used but not defined"},
        {"/v1/completions", {{"prompt", "x"}, {"grammar", 5}}, "'grammar' must be a string"},
        {"/v1/completions", {{"prompt", "x"}, {"json_schema", {{"type", "text"}}}}, "'json_schema': "},
        {"/v1/completions", {{"prompt", "x"}, {"grammar", "root ::= \"a\""}, {"json_schema", {{"type", "integer"}}}},
         "cannot both constrain"},
        {"/v1/chat/completions", {{"messages", msgs}, {"response_format", {{"type", "xml"}}}}, "'response_format'"},
        {"/v1/chat/completions", {{"messages", msgs}, {"response_format", {{"type", "json_schema"}}}},
         "'response_format.json_schema.schema'"},
        {"/v1/chat/completions", {{"messages", msgs}, {"tool_choice", "required"}}, "needs a non-empty 'tools'"},
        {"/v1/chat/completions", {{"messages", msgs}, {"tools", tools}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "nope"}}}}}},
         "names function 'nope'"},
        {"/v1/chat/completions", {{"messages", msgs}, {"tool_choice", "sometimes"}}, "'tool_choice' must be"},
    };
    for (const Bad& b : bad) {
        auto r = post_to(port, b.path, b.body.dump());
        ASSERT_TRUE(r);
        EXPECT_EQ(r->status, 400) << b.body.dump();
        EXPECT_NE(r->body.find(b.needle), std::string::npos) << b.body.dump() << " -> " << r->body;
    }
    server->stop();
    thread->join();
    delete thread;
    delete server;
}

TEST_F(HttpServerTest, StopStringsEndTheText) {
    const std::string full = greedy_text("Once", 24);
    // A stop string of two ASCII characters from the middle of the greedy text (the random model's
    // text has other bytes too): the answer is what precedes its first occurrence.
    size_t at = full.size() / 2;
    auto ascii = [&](size_t i) { return i < full.size() && full[i] >= 0x20 && full[i] < 0x7f; };
    while (at + 1 < full.size() && !(ascii(at) && ascii(at + 1))) ++at;
    ASSERT_TRUE(ascii(at) && ascii(at + 1)) << "no ASCII pair in the greedy text";
    const std::string stop = full.substr(at, 2);
    const std::string want = full.substr(0, full.find(stop));
    for (bool stream : {false, true}) {
        json req = {{"prompt", "Once"}, {"max_tokens", 24}, {"temperature", 0}, {"stop", {stop}}, {"stream", stream}};
        auto r = post("/v1/completions", req.dump());
        ASSERT_TRUE(r);
        ASSERT_EQ(r->status, 200) << r->body;
        if (stream) {
            std::string finish;
            bool done = false;
            EXPECT_EQ(stream_text(r->body, false, &finish, &done), as_sent(want));
            EXPECT_EQ(finish, "stop");
        } else {
            json j = json::parse(r->body);
            EXPECT_EQ(j["choices"][0]["text"], as_sent(want));
            EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
        }
    }
}

TEST_F(HttpServerTest, ErrorsAreJsonAndTheServerKeepsServing) {
    struct Case {
        std::string path, body;
        int status;
        const char* needle;
    };
    const std::vector<Case> cases = {
        {"/v1/completions", "{not json", 400, "not valid JSON"},
        {"/v1/completions", R"({"prompt":"x","max_tokens":"many"})", 400, "'max_tokens'"},
        {"/v1/chat/completions", R"({"messages":[{"role":"robot","content":"x"}]})", 400, "'messages[0].role'"},
        {"/v1/completions", R"({"prompt":"x","max_tokens":256})", 400, "exceeds the context size"},
        // Found before a stream starts: a 400, not a 200 stream with an error event.
        {"/v1/completions", R"({"prompt":"x","max_tokens":256,"stream":true})", 400, "exceeds the context size"},
        {"/v1/nothing", "{}", 404, "no route"},
        {"/v1/completions", std::string(70 << 10, ' '), 413, "larger than"},
    };
    for (const Case& k : cases) {
        auto r = post(k.path, k.body);
        ASSERT_TRUE(r) << k.path;
        EXPECT_EQ(r->status, k.status) << k.path << " " << k.body.substr(0, 40);
        json j = json::parse(r->body, nullptr, false);
        ASSERT_FALSE(j.is_discarded()) << r->body;
        EXPECT_NE(j["error"]["message"].get<std::string>().find(k.needle), std::string::npos) << r->body;
    }
    httplib::Client c("127.0.0.1", port_);
    auto get = c.Get("/v1/chat/completions");
    ASSERT_TRUE(get);
    EXPECT_EQ(get->status, 405);
    EXPECT_EQ(get->get_header_value("Allow"), "POST");
    EXPECT_NE(json::parse(get->body)["error"]["message"].get<std::string>().find("use POST"), std::string::npos);
    auto post_health = c.Post("/health", "{}", "application/json");
    ASSERT_TRUE(post_health);
    EXPECT_EQ(post_health->status, 405);
    EXPECT_EQ(post_health->get_header_value("Access-Control-Allow-Origin"), "*");
    auto pre = c.Options("/v1/chat/completions");
    ASSERT_TRUE(pre);
    EXPECT_EQ(pre->status, 204);
    EXPECT_NE(pre->get_header_value("Access-Control-Allow-Methods").find("POST"), std::string::npos);
    auto ok = post("/v1/completions", R"({"prompt":"still","max_tokens":2})");
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200);
}

// A client that hangs up in the middle of a stream: generation stops, the model is free again.
TEST_F(HttpServerTest, ClientHangingUpMidStream) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port_));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    const std::string body = R"({"prompt":"Long","max_tokens":200,"stream":true,"ignore_eos":true})";
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    char buf[256];
    ASSERT_GT(::read(fd, buf, sizeof(buf)), 0);  // the stream has started
    ::close(fd);
    auto r = post("/v1/completions", R"({"prompt":"after","max_tokens":3,"temperature":0})");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 200) << r->body;
}

// Two clients at once: both answered, each with its own greedy text (requests take turns).
TEST_F(HttpServerTest, ConcurrentRequestsTakeTurns) {
    const std::string a = greedy_text("Alpha", 10), b = greedy_text("Beta", 10);
    std::string ra, rb;
    std::thread t1([&] {
        auto r = post("/v1/completions", R"({"prompt":"Alpha","max_tokens":10,"temperature":0})");
        if (r) ra = json::parse(r->body)["choices"][0]["text"].get<std::string>();
    });
    std::thread t2([&] {
        auto r = post("/v1/completions", R"({"prompt":"Beta","max_tokens":10,"temperature":0})");
        if (r) rb = json::parse(r->body)["choices"][0]["text"].get<std::string>();
    });
    t1.join();
    t2.join();
    EXPECT_EQ(ra, as_sent(a));
    EXPECT_EQ(rb, as_sent(b));
}

// Continuous batching: requests running together each get exactly the text they get alone (greedy
// and seeded sampling, streamed or not, different lengths and stop strings), and the server did
// run them in shared decode steps.
TEST_F(HttpServerTest, ConcurrentRequestsAreBatchedAndEachGetsItsOwnText) {
    struct Req {
        std::string body;
        bool stream;
    };
    const std::vector<Req> reqs = {
        {R"({"prompt":"Alpha","max_tokens":24,"temperature":0})", false},
        {R"({"prompt":"Beta gamma","max_tokens":16,"temperature":0})", true},
        {R"({"prompt":"Once upon a time","max_tokens":30,"temperature":0.9,"seed":5})", false},
        {R"({"prompt":"Delta","max_tokens":20,"temperature":0.7,"top_k":5,"seed":9})", true},
        {R"({"prompt":"Epsilon","max_tokens":12,"temperature":0})", false},
        {R"({"prompt":"Zeta eta","max_tokens":28,"temperature":0,"stop":["e"]})", true},
    };
    auto text_of = [](const httplib::Result& r, bool stream) {
        if (!r || r->status != 200) return std::string("<failed>");
        if (!stream) return json::parse(r->body)["choices"][0]["text"].get<std::string>();
        std::string finish;
        bool done = false;
        return stream_text(r->body, false, &finish, &done);
    };
    auto body_for = [](const Req& q) {
        json b = json::parse(q.body);
        b["stream"] = q.stream;
        return b.dump();
    };
    // Alone, one after the other.
    std::vector<std::string> alone;
    for (const Req& q : reqs) alone.push_back(text_of(post("/v1/completions", body_for(q)), q.stream));
    httplib::Client c("127.0.0.1", port_);
    const json before = json::parse(c.Get("/health")->body)["decode"];
    // Together.
    std::vector<std::string> together(reqs.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i)
        threads.emplace_back([&, i] { together[i] = text_of(post("/v1/completions", body_for(reqs[i])), reqs[i].stream); });
    for (std::thread& t : threads) t.join();
    for (size_t i = 0; i < reqs.size(); ++i) {
        EXPECT_NE(alone[i], "<failed>");
        EXPECT_EQ(together[i], alone[i]) << reqs[i].body;
    }
    const json after = json::parse(c.Get("/health")->body);
    EXPECT_EQ(after["slots"]["total"], 4);
    EXPECT_EQ(after["slots"]["busy"], 0);
    const int64_t steps = after["decode"]["steps"].get<int64_t>() - before["steps"].get<int64_t>();
    const int64_t tokens = after["decode"]["tokens"].get<int64_t>() - before["tokens"].get<int64_t>();
    EXPECT_GT(tokens, steps) << "no decode step ran two requests together";
    EXPECT_GE(after["decode"]["max_batch"].get<int64_t>(), 2);
    EXPECT_GT(after["decode"]["prompt_tokens"].get<int64_t>(), before["prompt_tokens"].get<int64_t>())
        << "no prompt ran inside a decode step";
    EXPECT_LE(after["decode"]["max_batch"].get<int64_t>(), 4);
}

// A client that stops reading its stream does not hold up the others: streamed text is written by
// the request's own handler thread, not by the model thread that runs every request's decode steps.
// The server's send buffer is 8 KiB and the client's receive buffer 1 KiB, so a stream of 2000
// tokens (~300 KB of events) fills them early. Before this was so, the model thread blocked in the
// write until httplib's 5 s write timeout, which then cut the stalled stream off.
TEST_F(HttpServerTest, AStalledStreamDoesNotHoldUpOtherRequests) {
    // Expected texts first: the model is not thread-safe, so nothing else may run it while a server does.
    const std::string short_want = as_sent(greedy_text("after", 3));
    HttpServer* server = nullptr;
    std::thread* thread = nullptr;
    int port = 0;
    start_server(nullptr, &server, &thread, &port, /*n_ctx=*/4096, /*socket_send_buffer=*/8192);
    const std::string body = R"({"prompt":"Long","max_tokens":2000,"ignore_eos":true,"temperature":0)";
    auto whole = post_to(port, "/v1/completions", body + "}");
    ASSERT_TRUE(whole);
    ASSERT_EQ(whole->status, 200) << whole->body;
    const std::string long_want = json::parse(whole->body)["choices"][0]["text"].get<std::string>();

    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    const int small = 1024;
    ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)), 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    const std::string stream_body = body + R"(,"stream":true,"cache_prompt":false})";
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Connection: close\r\nContent-Length: " + std::to_string(stream_body.size()) + "\r\n\r\n" +
                            stream_body;
    ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    // Once the stalled request has made more tokens than the buffers hold, ask for something short.
    httplib::Client c("127.0.0.1", port);
    const int64_t tokens0 = json::parse(c.Get("/health")->body)["decode"]["tokens"].get<int64_t>();
    for (int i = 0; i < 200; ++i) {
        auto h = c.Get("/health");
        if (h && json::parse(h->body)["decode"]["tokens"].get<int64_t>() - tokens0 > 500) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto r = post_to(port, "/v1/completions", R"({"prompt":"after","max_tokens":3,"temperature":0})");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(json::parse(r->body)["choices"][0]["text"].get<std::string>(), short_want);
    // Now read the stalled stream: all of it, ended by [DONE].
    std::string got;
    char buf[65536];
    for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) got.append(buf, static_cast<size_t>(n));
    ::close(fd);
    const size_t head = got.find("\r\n\r\n");
    ASSERT_NE(head, std::string::npos) << got.substr(0, 200);
    std::string finish;
    bool done = false;
    // Chunked transfer: each event is one chunk, so its "data: " line survives the framing.
    const std::string text = stream_text(got.substr(head + 4), false, &finish, &done);
    EXPECT_TRUE(done) << "the stalled stream was cut off";
    EXPECT_EQ(finish, "length");
    EXPECT_TRUE(text == long_want) << "the stalled stream's text is not the request's text";
    server->stop();
    thread->join();
    delete thread;
    delete server;
}

// The prompt cache: a request whose prompt starts like a finished one's sequence continues from it
// (usage.prompt_tokens_details.cached_tokens says how much), with the same text as without.
TEST_F(HttpServerTest, PromptCacheReusesAFinishedSequence) {
    auto completion = [&](const std::vector<int32_t>& ids, int max_tokens, bool cache, int64_t* cached) {
        json body = {{"prompt", ids}, {"max_tokens", max_tokens}, {"temperature", 0}, {"ignore_eos", true},
                     {"cache_prompt", cache}};
        auto r = post("/v1/completions", body.dump());
        if (!r || r->status != 200) return std::string("<failed>");
        const json j = json::parse(r->body);
        *cached = j["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
        return j["choices"][0]["text"].get<std::string>();
    };
    std::vector<int32_t> p;
    for (int i = 0; i < 40; ++i) p.push_back(30 + (i * 37) % 400);
    int64_t cached = -1;
    // A fresh prompt (no earlier sequence starts like it); its sequence (p + 29 generated tokens,
    // room for 70) stays in the cache.
    const std::string a = completion(p, 30, true, &cached);
    EXPECT_EQ(cached, 0);
    // A continuation: the prompt, its first 7 generated tokens, two more (the cached sequence is
    // rewound to p + 7).
    std::vector<int32_t> gen;
    std::vector<int32_t> q = p;
    {
        auto seq = model_->new_sequence(64).value();
        std::vector<float> logits;
        ASSERT_TRUE(model_->forward(*seq, p.data(), static_cast<int64_t>(p.size()), false, &logits).ok());
        for (int i = 0; i < 8; ++i) {
            const int32_t next = argmax(logits.data(), model_->config().n_vocab);
            gen.push_back(next);
            if (i < 7) {
                ASSERT_TRUE(model_->forward(*seq, &next, 1, false, &logits).ok());
            }
        }
    }
    q.insert(q.end(), gen.begin(), gen.begin() + 7);
    q.push_back(77);
    q.push_back(78);
    int64_t cached_off = -1;
    const std::string want_q = completion(q, 6, false, &cached_off);
    EXPECT_EQ(cached_off, 0);
    const std::string got_q = completion(q, 6, true, &cached);
    EXPECT_EQ(cached, static_cast<int64_t>(p.size()) + 7);
    EXPECT_EQ(got_q, want_q);
    // A prompt that leaves the cached one after 30 tokens: rewound to 30 (attention-only model).
    std::vector<int32_t> r(p.begin(), p.begin() + 30);
    r.push_back(5);
    r.push_back(6);
    const std::string want_r = completion(r, 6, false, &cached_off);
    const std::string got_r = completion(r, 6, true, &cached);
    EXPECT_GE(cached, 30);
    EXPECT_EQ(got_r, want_r);
    // The same prompt again: all but its last token come from the cache.
    const std::string again = completion(r, 6, true, &cached);
    EXPECT_EQ(cached, static_cast<int64_t>(r.size()) - 1);
    EXPECT_EQ(again, want_r);
    EXPECT_NE(a, "<failed>");
}

// The prompt cache on a model with recurrent state (qwen3next: DeltaNet layers cannot be rewound):
// a cached sequence is reused when all of it is a prefix of the new prompt, or, through the copy of
// its recurrent state taken when its prompt ended, when its prompt is. 64 cached tokens keep the
// chunked delta rule's 64-token chunks where a fresh run has them, so the texts match bit for bit.
TEST(HttpPromptCache, RecurrentModelsReuseWholeSequencesOrTheirPrompts) {
    const std::string dir = temp_dir("http_cache_next");
    MakeModelOptions o;
    o.arch = "qwen3next";
    o.out = dir + "/next.gguf";
    o.layers = 4;
    o.hidden = 64;
    o.heads = 2;
    o.kv_heads = 1;
    o.head_dim = 32;
    o.experts = 4;
    o.top_k = 2;
    o.expert_ff = 64;
    o.vocab = 512;
    o.full_attention_interval = 2;
    o.ssm_head_dim = 32;
    std::ostringstream log;
    ASSERT_TRUE(make_model(o, log).ok());
    auto f = GgufFile::open(o.out);
    ASSERT_TRUE(f.ok()) << f.status().message();
    auto file = std::shared_ptr<GgufFile>(std::move(f).value());
    auto tok = Tokenizer::from_gguf(*file);
    ASSERT_TRUE(tok.ok());
    ModelOptions mo;
    mo.n_threads = 1;
    auto m = load_model(file, mo);
    ASSERT_TRUE(m.ok()) << m.status().message();
    HttpServerOptions ho;
    ho.model_name = "next";
    ho.limits.n_ctx = 256;
    ho.limits.n_vocab = 512;
    ho.log_requests = false;
    HttpServer server(*m.value(), tok.value(), ho);
    auto port = server.bind("127.0.0.1", 0);
    ASSERT_TRUE(port.ok());
    std::thread t([&] { (void)server.run(); });
    httplib::Client c("127.0.0.1", port.value());
    for (int i = 0; i < 100 && !c.Get("/health"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto completion = [&](const std::vector<int32_t>& ids, int max_tokens, bool cache, int64_t* cached) {
        json body = {{"prompt", ids}, {"max_tokens", max_tokens}, {"temperature", 0}, {"ignore_eos", true},
                     {"cache_prompt", cache}};
        auto r = c.Post("/v1/completions", body.dump(), "application/json");
        if (!r || r->status != 200) return std::string("<failed>");
        const json j = json::parse(r->body);
        *cached = j["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
        return j["choices"][0]["text"].get<std::string>();
    };
    std::vector<int32_t> p;
    for (int i = 0; i < 64; ++i) p.push_back(20 + (i * 53) % 480);
    int64_t cached = -1, off = -1;
    EXPECT_NE(completion(p, 1, true, &cached), "<failed>");  // one token: the sequence holds exactly p
    EXPECT_EQ(cached, 0);
    std::vector<int32_t> q = p;
    q.insert(q.end(), {7, 8, 9});
    const std::string want_q = completion(q, 6, false, &off);
    EXPECT_EQ(off, 0);
    EXPECT_EQ(completion(q, 6, true, &cached), want_q);
    EXPECT_EQ(cached, 64);
    // Leaves q's cached sequence (q + 5 generated tokens) after 50 tokens: no rewinding a DeltaNet.
    std::vector<int32_t> r(p.begin(), p.begin() + 50);
    r.push_back(3);
    const std::string want_r = completion(r, 4, false, &off);
    EXPECT_EQ(completion(r, 4, true, &cached), want_r);
    EXPECT_EQ(cached, 0);
    // A prompt that shares q (67 tokens) but not what q's request generated: the recurrent state
    // kept when q's prompt ended is continued from (an agent's next step after a re-rendered reply).
    std::vector<int32_t> s2 = q;
    s2.insert(s2.end(), {500, 501, 502});
    const std::string want_s2 = completion(s2, 5, false, &off);
    EXPECT_EQ(completion(s2, 5, true, &cached), want_s2);
    EXPECT_GE(cached, 67);
    server.stop();
    t.join();
}

// Servers whose chat formatter is a real model template from tests/data/chat_templates, on the same
// model: Qwen3-Coder (renders tools and tool calls as XML) and Qwen3.5-4B (the generation prompt
// opens a think block, so the reply is reasoning until "</think>").
class HttpChatTemplateTest : public HttpServerTest {
protected:
    static void SetUpTestSuite() {
        HttpServerTest::SetUpTestSuite();
        if (::testing::Test::HasFatalFailure()) return;
        coder_ = load_template("Qwen3-Coder.jinja");
        qwen35_ = load_template("Qwen3.5-4B.jinja");
        ASSERT_TRUE(coder_ && qwen35_);
        start_server(coder_, &coder_server_, &coder_thread_, &coder_port_, 4096);
        start_server(qwen35_, &qwen35_server_, &qwen35_thread_, &qwen35_port_, 4096);
    }
    static void TearDownTestSuite() {
        for (auto [s, t] : {std::pair{coder_server_, coder_thread_}, std::pair{qwen35_server_, qwen35_thread_}}) {
            if (s) s->stop();
            if (t) t->join();
            delete t;
            delete s;
        }
        coder_server_ = qwen35_server_ = nullptr;
        coder_thread_ = qwen35_thread_ = nullptr;
        coder_.reset();
        qwen35_.reset();
        HttpServerTest::TearDownTestSuite();
    }
    static std::shared_ptr<const ChatFormatter> load_template(const std::string& file) {
        const std::string path = source_dir() + "/tests/data/chat_templates/" + file;
        const std::string src = read_file(path);
        EXPECT_FALSE(src.empty()) << path;
        auto f = ChatFormatter::create(src, "", "<|im_end|>", file);
        EXPECT_TRUE(f.ok()) << f.status().message();
        if (!f.ok()) return nullptr;
        return std::make_shared<const ChatFormatter>(std::move(f).value());
    }
    static std::string render(const ChatFormatter& f, const ChatFormatter::Input& in) {
        auto p = f.apply(in);
        EXPECT_TRUE(p.ok()) << p.status().message();
        return p.ok() ? p.value() : std::string();
    }
    // Prompt tokens as the server counts them (bos added when the tokenizer wants it).
    static int64_t prompt_tokens(const std::string& prompt) {
        std::vector<int32_t> in = tok_->encode(prompt, true);
        if (tok_->add_bos() && tok_->bos_id() >= 0) in.insert(in.begin(), tok_->bos_id());
        return static_cast<int64_t>(in.size());
    }

    // A chat SSE stream's concatenated content and reasoning_content deltas.
    struct ChatStream {
        std::string content, reasoning, finish;
        bool done = false, role = false;
        int tool_call_deltas = 0;
    };
    static ChatStream chat_stream(const std::string& body) {
        ChatStream out;
        std::istringstream in(body);
        std::string line;
        while (std::getline(in, line)) {
            if (line.rfind("data: ", 0) != 0) continue;
            const std::string data = line.substr(6);
            if (data == "[DONE]") {
                out.done = true;
                continue;
            }
            json j = json::parse(data);
            EXPECT_FALSE(j.contains("error")) << data;
            const json& ch = j["choices"][0];
            if (!ch["finish_reason"].is_null()) out.finish = ch["finish_reason"].get<std::string>();
            const json& d = ch["delta"];
            if (d.contains("role")) out.role = true;
            if (d.contains("content") && !d["content"].is_null()) out.content += d["content"].get<std::string>();
            if (d.contains("reasoning_content")) out.reasoning += d["reasoning_content"].get<std::string>();
            if (d.contains("tool_calls")) ++out.tool_call_deltas;
        }
        return out;
    }

    static std::shared_ptr<const ChatFormatter> coder_, qwen35_;
    static HttpServer *coder_server_, *qwen35_server_;
    static std::thread *coder_thread_, *qwen35_thread_;
    static int coder_port_, qwen35_port_;
};
std::shared_ptr<const ChatFormatter> HttpChatTemplateTest::coder_, HttpChatTemplateTest::qwen35_;
HttpServer *HttpChatTemplateTest::coder_server_ = nullptr, *HttpChatTemplateTest::qwen35_server_ = nullptr;
std::thread *HttpChatTemplateTest::coder_thread_ = nullptr, *HttpChatTemplateTest::qwen35_thread_ = nullptr;
int HttpChatTemplateTest::coder_port_ = 0, HttpChatTemplateTest::qwen35_port_ = 0;

using ojson = nlohmann::ordered_json;

ojson weather_tools() {
    return ojson::parse(R"([{"type":"function","function":{"name":"get_weather",
        "description":"Current weather of a city",
        "parameters":{"type":"object","properties":{"city":{"type":"string","description":"City name"},
                                                     "days":{"type":"integer"}},"required":["city"]}}}])");
}

// A conversation with tools, an assistant tool call whose arguments are a JSON string (as OpenAI
// clients send them) and the tool's answer: the server renders it with its template exactly as
// ChatFormatter does with the arguments as an object, and answers with the greedy text of that prompt.
TEST_F(HttpChatTemplateTest, ToolsAndToolCallsReachTheTemplate) {
    const ojson tools = weather_tools();
    ojson req_messages = ojson::parse(R"([
        {"role":"system","content":"You are terse."},
        {"role":"user","content":"Weather in Paris?"},
        {"role":"assistant","content":"","tool_calls":[{"id":"call_1","type":"function",
            "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\",\"days\":3}"}}]},
        {"role":"tool","tool_call_id":"call_1","content":"sunny, 21 C"}])");
    ChatFormatter::Input in;
    in.messages = req_messages;
    in.messages[2]["tool_calls"][0]["function"]["arguments"] = ojson::parse(R"({"city":"Paris","days":3})");
    in.tools = tools;
    const std::string prompt = render(*coder_, in);
    // The template rendered the tool's declaration and the call's arguments as XML.
    EXPECT_NE(prompt.find("<name>get_weather</name>"), std::string::npos) << prompt;
    EXPECT_NE(prompt.find("<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
                          "</parameter>\n</function>"),
              std::string::npos)
        << prompt;
    EXPECT_NE(prompt.find("<tool_response>\nsunny, 21 C\n</tool_response>"), std::string::npos) << prompt;
    ChatFormatter::Input no_tools = in;
    no_tools.tools = ojson();
    const std::string prompt_no_tools = render(*coder_, no_tools);
    ASSERT_NE(prompt_tokens(prompt), prompt_tokens(prompt_no_tools));

    const int n = 10;
    const std::string want = greedy_text(prompt, n);
    const ojson req = {{"messages", req_messages}, {"tools", tools}, {"max_tokens", n}, {"temperature", 0}};
    auto r = post_to(coder_port_, "/v1/chat/completions", req.dump());
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    json j = json::parse(r->body);
    EXPECT_EQ(j["usage"]["prompt_tokens"], prompt_tokens(prompt)) << "the server's prompt is not the template's";
    const json& msg = j["choices"][0]["message"];
    ASSERT_EQ(want.find("<tool_call>"), std::string::npos) << "the random model wrote a tool call: pick other text";
    ASSERT_EQ(want.find("<think>"), std::string::npos);
    EXPECT_EQ(msg["content"], as_sent(want));
    EXPECT_FALSE(msg.contains("tool_calls")) << msg.dump();
    EXPECT_FALSE(msg.contains("reasoning_content")) << msg.dump();

    // The same conversation streamed: the same content.
    ojson sreq = req;
    sreq["stream"] = true;
    auto s = post_to(coder_port_, "/v1/chat/completions", sreq.dump());
    ASSERT_TRUE(s);
    ASSERT_EQ(s->status, 200) << s->body;
    const ChatStream cs = chat_stream(s->body);
    EXPECT_EQ(cs.content, msg["content"].get<std::string>());
    EXPECT_TRUE(cs.reasoning.empty());
    EXPECT_TRUE(cs.done);

    // Arguments given as an object: the same prompt.
    ojson oreq = req;
    oreq["messages"][2]["tool_calls"][0]["function"]["arguments"] = ojson::parse(R"({"city":"Paris","days":3})");
    auto o = post_to(coder_port_, "/v1/chat/completions", oreq.dump());
    ASSERT_TRUE(o);
    ASSERT_EQ(o->status, 200) << o->body;
    EXPECT_EQ(json::parse(o->body)["usage"]["prompt_tokens"], prompt_tokens(prompt));
    EXPECT_EQ(json::parse(o->body)["choices"][0]["message"]["content"], as_sent(want));

    // tool_choice "none": the tools are not given to the template.
    ojson nreq = req;
    nreq["tool_choice"] = "none";
    auto nr = post_to(coder_port_, "/v1/chat/completions", nreq.dump());
    ASSERT_TRUE(nr);
    ASSERT_EQ(nr->status, 200) << nr->body;
    json nj = json::parse(nr->body);
    EXPECT_EQ(nj["usage"]["prompt_tokens"], prompt_tokens(prompt_no_tools));
    EXPECT_EQ(nj["choices"][0]["message"]["content"], as_sent(greedy_text(prompt_no_tools, n)));
}

// Qwen3.5's generation prompt ends inside "<think>\n": the random model never closes the block, so
// its whole reply is reasoning_content (trimmed), streamed as reasoning deltas; "reasoning_format":
// "none" gives it back as content; enable_thinking=false closes the block in the prompt.
TEST_F(HttpChatTemplateTest, ThinkingTemplateRepliesAreReasoning) {
    ChatFormatter::Input in;
    in.messages = ojson::parse(R"([{"role":"user","content":"Think about it"}])");
    const std::string prompt = render(*qwen35_, in);
    ASSERT_EQ(prompt, "<|im_start|>user\nThink about it<|im_end|>\n<|im_start|>assistant\n<think>\n");
    const int n = 16;
    const std::string text = greedy_text(prompt, n);
    ASSERT_EQ(text.find("</think>"), std::string::npos) << "the random model closed the think block";
    ReplyFormat rf;
    rf.starts_in_think = true;
    const AssistantReply parsed = parse_assistant_reply(text, rf);
    // The parser's reasoning is the text trimmed of surrounding whitespace.
    const size_t b = text.find_first_not_of(" \t\r\n"), e = text.find_last_not_of(" \t\r\n");
    const std::string trimmed = b == std::string::npos ? "" : text.substr(b, e - b + 1);
    ASSERT_EQ(parsed.reasoning, trimmed);
    ASSERT_FALSE(trimmed.empty());

    const ojson req = {{"messages", in.messages}, {"max_tokens", n}, {"temperature", 0}};
    auto r = post_to(qwen35_port_, "/v1/chat/completions", req.dump());
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    json j = json::parse(r->body);
    EXPECT_EQ(j["usage"]["prompt_tokens"], prompt_tokens(prompt));
    const json& msg = j["choices"][0]["message"];
    EXPECT_EQ(msg["reasoning_content"], as_sent(trimmed)) << msg.dump();
    EXPECT_TRUE(msg["content"].is_null() || msg["content"] == "") << msg.dump();

    ojson sreq = req;
    sreq["stream"] = true;
    auto s = post_to(qwen35_port_, "/v1/chat/completions", sreq.dump());
    ASSERT_TRUE(s);
    ASSERT_EQ(s->status, 200) << s->body;
    const ChatStream cs = chat_stream(s->body);
    EXPECT_EQ(cs.reasoning, msg["reasoning_content"].get<std::string>());
    EXPECT_EQ(cs.content, "");
    EXPECT_TRUE(cs.role);
    EXPECT_TRUE(cs.done);
    EXPECT_EQ(cs.finish, j["choices"][0]["finish_reason"]);

    // reasoning_format "none": no reply parsing, the whole text is content (stream too).
    for (bool stream : {false, true}) {
        ojson nreq = req;
        nreq["reasoning_format"] = "none";
        nreq["stream"] = stream;
        auto nr = post_to(qwen35_port_, "/v1/chat/completions", nreq.dump());
        ASSERT_TRUE(nr);
        ASSERT_EQ(nr->status, 200) << nr->body;
        if (stream) {
            const ChatStream ns = chat_stream(nr->body);
            EXPECT_EQ(ns.content, as_sent(text));
            EXPECT_EQ(ns.reasoning, "");
        } else {
            const json m = json::parse(nr->body)["choices"][0]["message"];
            EXPECT_EQ(m["content"], as_sent(text)) << m.dump();
            EXPECT_FALSE(m.contains("reasoning_content")) << m.dump();
        }
    }

    // enable_thinking=false: the prompt ends with the empty think block, the reply is content.
    ChatFormatter::Input nothink = in;
    nothink.kwargs = {{"enable_thinking", false}};
    const std::string prompt2 = render(*qwen35_, nothink);
    ASSERT_EQ(prompt2, prompt + "\n</think>\n\n");
    const std::string text2 = greedy_text(prompt2, n);
    ASSERT_EQ(text2.find("<think>"), std::string::npos);
    for (bool stream : {false, true}) {
        ojson kreq = req;
        kreq["chat_template_kwargs"] = {{"enable_thinking", false}};
        kreq["stream"] = stream;
        auto kr = post_to(qwen35_port_, "/v1/chat/completions", kreq.dump());
        ASSERT_TRUE(kr);
        ASSERT_EQ(kr->status, 200) << kr->body;
        if (stream) {
            const ChatStream ks = chat_stream(kr->body);
            EXPECT_EQ(ks.content, as_sent(text2));
            EXPECT_EQ(ks.reasoning, "");
        } else {
            json kj = json::parse(kr->body);
            EXPECT_EQ(kj["usage"]["prompt_tokens"], prompt_tokens(prompt2));
            const json& m = kj["choices"][0]["message"];
            EXPECT_EQ(m["content"], as_sent(text2)) << m.dump();
            EXPECT_FALSE(m.contains("reasoning_content")) << m.dump();
        }
    }
}

// tool_choice "required" on Qwen3-Coder's template: the random model is held to its XML call
// format (<function=NAME><parameter=P>...), which the reply parser turns into tool_calls with the
// schema's parameter names.
TEST_F(HttpChatTemplateTest, RequiredToolCallsFollowTheTemplatesXmlFormat) {
    const json tools = json::parse(R"([{"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string", "maxLength": 12}, "limit": {"type": "integer"}},
        "required": ["path"]}}}])");
    for (int seed = 1; seed <= 3; ++seed) {
        json body = {{"messages", {{{"role", "user"}, {"content", "Open it"}}}}, {"tools", tools},
                     {"tool_choice", "required"}, {"parallel_tool_calls", false}, {"max_tokens", 400},
                     {"temperature", 1.0}, {"seed", seed}};
        auto r = post_to(coder_port_, "/v1/chat/completions", body.dump());
        ASSERT_TRUE(r);
        ASSERT_EQ(r->status, 200) << r->body;
        const json j = json::parse(r->body);
        const json& msg = j["choices"][0]["message"];
        EXPECT_EQ(j["choices"][0]["finish_reason"], "tool_calls") << r->body;
        ASSERT_TRUE(msg.contains("tool_calls")) << r->body;
        ASSERT_EQ(msg["tool_calls"].size(), 1u) << r->body;
        EXPECT_EQ(msg["tool_calls"][0]["function"]["name"], "read_file");
        const json args = json::parse(msg["tool_calls"][0]["function"]["arguments"].get<std::string>());
        ASSERT_TRUE(args.contains("path") && args["path"].is_string()) << args.dump();
        EXPECT_LE(unicode::utf8_to_cpts(args["path"].get<std::string>()).size(), 12u) << args.dump();
        if (args.contains("limit")) {
            EXPECT_TRUE(args["limit"].is_number_integer()) << args.dump();
        }
        EXPECT_LE(args.size(), 2u) << args.dump();
    }
}

// The template's own raise_exception (Qwen3.5 needs a user message) and a tool_choice naming an
// unknown function: 400 with a JSON error naming the cause, before any stream starts; the server keeps serving.
TEST_F(HttpChatTemplateTest, TemplateErrorsAndToolChoiceAre400) {
    struct Case {
        int port;
        std::string body;
        std::vector<std::string> needles;
    };
    const std::vector<Case> cases = {
        {qwen35_port_, R"({"messages":[{"role":"system","content":"Only a system prompt"}],"max_tokens":2})",
         {"No user query found in messages."}},
        {qwen35_port_, R"({"messages":[{"role":"system","content":"S"}],"max_tokens":2,"stream":true})",
         {"No user query found in messages."}},
        {qwen35_port_,
         R"({"messages":[{"role":"user","content":"a"},{"role":"developer","content":"late"}],"max_tokens":2})",
         {"System message must be at the beginning."}},
        {coder_port_,
         R"({"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],
             "tool_choice":{"type":"function","function":{"name":"g"}}})",
         {"tool_choice", "'g'"}},
    };
    for (const Case& k : cases) {
        auto r = post_to(k.port, "/v1/chat/completions", k.body);
        ASSERT_TRUE(r) << k.body;
        EXPECT_EQ(r->status, 400) << k.body << " -> " << r->body;
        json j = json::parse(r->body, nullptr, false);
        ASSERT_FALSE(j.is_discarded()) << r->body;
        ASSERT_TRUE(j.contains("error")) << r->body;
        EXPECT_EQ(j["error"]["type"], "invalid_request_error") << r->body;
        for (const std::string& needle : k.needles)
            EXPECT_NE(j["error"]["message"].get<std::string>().find(needle), std::string::npos)
                << needle << " not in " << r->body;
    }
    for (int port : {coder_port_, qwen35_port_}) {
        auto ok = post_to(port, "/v1/chat/completions", R"({"messages":[{"role":"user","content":"hi"}],"max_tokens":2})");
        ASSERT_TRUE(ok);
        EXPECT_EQ(ok->status, 200) << ok->body;
    }
}

}  // namespace
}  // namespace moemesh
