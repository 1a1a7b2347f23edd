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
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

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
        HttpServerOptions ho;
        ho.model_name = "tiny";
        ho.limits.n_ctx = 256;
        ho.limits.n_vocab = 512;
        ho.max_body_bytes = 64 << 10;
        ho.log_requests = false;
        server_ = new HttpServer(*model_, *tok_, ho);
        auto port = server_->bind("127.0.0.1", 0);
        ASSERT_TRUE(port.ok()) << port.status().message();
        port_ = port.value();
        thread_ = new std::thread([] { (void)server_->run(); });
        httplib::Client c("127.0.0.1", port_);
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
    }

    static httplib::Result post(const std::string& path, const std::string& body) {
        httplib::Client c("127.0.0.1", port_);
        c.set_read_timeout(60, 0);
        return c.Post(path.c_str(), body, "application/json");
    }

    // The model's own greedy continuation of `prompt` (bos as the server adds it), as text.
    static std::string greedy_text(const std::string& prompt, int n, std::vector<int32_t>* ids = nullptr) {
        std::vector<int32_t> in = tok_->encode(prompt, true);
        if (tok_->add_bos() && tok_->bos_id() >= 0) in.insert(in.begin(), tok_->bos_id());
        auto seq = model_->new_sequence(static_cast<int64_t>(in.size()) + n);
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

}  // namespace
}  // namespace moemesh
