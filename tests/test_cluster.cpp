// End-to-end cluster tests: real `moemesh-worker` and `moemesh run --cluster` processes talking gRPC
// over real Unix and TCP sockets (and, as root, across network namespaces). Every child runs in its
// own process group, dies with the test (PR_SET_PDEATHSIG) and is SIGKILLed in teardown; every read
// from a child has a poll() timeout, so a hang fails a test instead of hanging it.
//
// Covers issue 4, "Faults, security, bad input" and "Done means":
//   Equality/*            1-, 2-, 3-worker clusters (uneven shards, replicas) == single process, over
//                         unix, tcp, shm (2-row buffers: rows in groups) and auto (→ shm)
//   KillWorker*           SIGKILL mid-generation: clear error naming the worker, bounded time;
//                         restart the worker, the same coordinator serves the next request
//   ReplicasCover*        SIGKILL with replicas of everything: generation completes, same tokens
//   StoppedWorker*        SIGSTOP: the deadline fires, reported; SIGCONT, the next request works
//   WrongModel*, WrongName*  handshake refused, saying which
//   NotAWorkerPeer        a TCP peer that writes garbage / closes: clear error, bounded  [SLOW ~10 s]
//   WorkerSurvivesBadClients  raw garbage, wrong protocol version, malformed and oversized calls
//   DataPlaneOffer*       bad shm offers refused in the handshake's answer, saying why; an
//                         out-of-band call without a plane refused; the stream stays up
//   (KillWorker*, StoppedWorker*, ReplicasCover* run over shm: `auto` for local CPU workers)
//   Tls, TlsMismatch      server TLS and mutual TLS == insecure; plaintext vs TLS fails [SLOW ~10 s]
//   NetnsMultiHost        tests/netns_cluster.sh: 3 namespaces joined by veths (root only, else skip)
//
// Whole file: ~35-45 s of wall time on 2 cores (the two SLOW cases are ~10 s each, bounded by the
// coordinator's fixed 10 s handshake deadline).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "proto/moemesh.grpc.pb.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;
using nlohmann::json;

constexpr const char* kTokens = "1,2,3";
constexpr int kShortN = 16;  // equality runs
constexpr int kLongN = 200;  // fault runs: long enough to be killed in the middle
constexpr int kTop = 5;

std::string bin(const std::string& name) { return std::string(MOEMESH_BINARY_DIR) + "/" + name; }

// Same greedy tokens, same top ids, probabilities within 1e-6. Returns "" or what differs.
std::string compare_outputs(const json& ref, const json& got) {
    if (!got.contains("greedy")) return "no greedy tokens in " + got.dump().substr(0, 300);
    if (ref["greedy"] != got["greedy"]) return "greedy " + got["greedy"].dump() + " != " + ref["greedy"].dump();
    if (ref["positions"].size() != got["positions"].size()) return "positions differ in count";
    for (size_t p = 0; p < ref["positions"].size(); ++p) {
        const json& a = ref["positions"][p]["top"];
        const json& b = got["positions"][p]["top"];
        if (a.size() != b.size()) return "top size differs at position " + std::to_string(p);
        for (size_t i = 0; i < a.size(); ++i) {
            if (a[i][0] != b[i][0])
                return "position " + std::to_string(p) + " top " + std::to_string(i) + ": token " + b[i][0].dump() +
                       " != " + a[i][0].dump();
            const double d = std::fabs(a[i][1].get<double>() - b[i][1].get<double>());
            if (d > 1e-6)
                return "position " + std::to_string(p) + " token " + a[i][0].dump() + ": |dp| = " + std::to_string(d);
        }
    }
    return "";
}

// One worker process, restartable on the same address.
struct Worker {
    std::string name, listen, address, model, err_path;
    std::vector<std::string> extra;
    Child proc;

    // Starts it and waits for "listening on"; the actual address (port 0 resolved) lands in `address`.
    ::testing::AssertionResult start() {
        std::vector<std::string> argv = {bin("moemesh-worker"), "--model", model, "--listen", listen,
                                         "--name", name, "--threads", "1"};
        argv.insert(argv.end(), extra.begin(), extra.end());
        if (!proc.start(argv, err_path)) return ::testing::AssertionFailure() << "cannot fork " << argv[0];
        auto log = wait_for_log(err_path, "listening on ", 15);
        if (!log) return ::testing::AssertionFailure() << "worker " << name << " did not start: " << read_file(err_path);
        const size_t a = log->find("listening on ") + 13;
        address = log->substr(a, log->find(" (model", a) - a);
        if (listen.rfind("unix:", 0) != 0) listen = address;  // a restart reuses the same port
        return ::testing::AssertionSuccess();
    }
    std::string log() const { return read_file(err_path); }
    int port() const { return std::stoi(address.substr(address.rfind(':') + 1)); }
};

struct WorkerEntry {
    std::string name, address, shard, replicas, tls;  // shard: `experts: "..."` or `layers: {...}`
};

class Cluster : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        // ctest runs each case in its own process, in parallel: one directory per process.
        suite_dir_ = temp_dir("cluster_" + std::to_string(getpid()));
        model_ = suite_dir_ + "/m.gguf";
        model2_ = suite_dir_ + "/other.gguf";
        const std::string dims =
            " --layers 4 --hidden 128 --heads 4 --kv-heads 2 --head-dim 32 --experts 16 --top-k 4 --vocab 800";
        std::string out;
        ASSERT_EQ(run_capture(moemesh_bin() + " make-model --out " + model_ + dims + " --expert-ff 64 --seed 3", &out,
                              suite_dir_ + "/make.err"),
                  0)
            << read_file(suite_dir_ + "/make.err");
        // Another model: other expert tensors' shapes, so another fingerprint (metadata + tensor table).
        ASSERT_EQ(run_capture(moemesh_bin() + " make-model --out " + model2_ + dims + " --seed 4 --expert-ff 96", &out,
                              suite_dir_ + "/make.err"),
                  0)
            << read_file(suite_dir_ + "/make.err");
        // A qwen3next model: hybrid DeltaNet/attention stack with a shared expert on the coordinator.
        model_next_ = suite_dir_ + "/next.gguf";
        ASSERT_EQ(run_capture(moemesh_bin() + " make-model --arch qwen3next --out " + model_next_ + dims +
                                  " --expert-ff 64 --shared-ff 64 --ssm-k-heads 2 --ssm-v-heads 4 --ssm-head-dim 32"
                                  " --seed 5",
                              &out, suite_dir_ + "/make.err"),
                  0)
            << read_file(suite_dir_ + "/make.err");
        ASSERT_EQ(run_capture(moemesh_bin() + " run --model " + model_next_ + " --tokens " + kTokens + " --top " +
                                  std::to_string(kTop) + " --json -n " + std::to_string(kShortN) +
                                  " --kv-type f32 --threads 1",
                              &out, suite_dir_ + "/ref.err"),
                  0)
            << read_file(suite_dir_ + "/ref.err");
        ref_next_ = json::parse(out);
        for (int n : {kShortN, kLongN}) {
            ASSERT_EQ(run_capture(moemesh_bin() + " run --model " + model_ + " --tokens " + kTokens + " --top " +
                                      std::to_string(kTop) + " --json -n " + std::to_string(n) +
                                      " --kv-type f32 --threads 1",
                                  &out, suite_dir_ + "/ref.err"),
                      0)
                << read_file(suite_dir_ + "/ref.err");
            ref_[n] = json::parse(out);
        }
    }

    void SetUp() override {
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        std::string n = std::string(info->name());
        for (char& c : n)
            if (c == '/') c = '_';
        // Unix socket paths are limited to 107 bytes: keep them short, under /tmp.
        dir_ = suite_dir_ + "/" + n;
        std::filesystem::remove_all(dir_);
        std::filesystem::create_directories(dir_);
        sock_dir_ = "/tmp/mmct-" + std::to_string(getpid()) + "-" + std::to_string(++counter_);
        std::filesystem::create_directories(sock_dir_);
    }
    void TearDown() override {
        workers_.clear();  // SIGKILLs them
        std::error_code ec;
        std::filesystem::remove_all(sock_dir_, ec);
    }

    Worker& add_worker(const std::string& name, bool tcp, std::vector<std::string> extra = {},
                       const std::string& model = "") {
        auto w = std::make_unique<Worker>();
        w->name = name;
        w->listen = tcp ? "127.0.0.1:0" : "unix:" + sock_dir_ + "/" + name + ".sock";
        w->model = model.empty() ? model_ : model;
        w->err_path = dir_ + "/" + name + ".err";
        w->extra = std::move(extra);
        workers_.push_back(std::move(w));
        return *workers_.back();
    }

    std::string write_yaml(const std::string& file, const std::vector<WorkerEntry>& ws, int timeout_ms = 5000,
                           const std::string& model = "", int data_plane_rows = 0,
                           const std::string& transport = "") {  // transport "": the default (auto)
        std::string y = "model: " + (model.empty() ? model_ : model) + "\ncoordinator: {timeout_ms: " + std::to_string(timeout_ms) +
                        (data_plane_rows ? ", data_plane_rows: " + std::to_string(data_plane_rows) : "") + "}\nworkers:\n";
        for (const auto& w : ws) {
            y += "  - name: " + w.name + "\n    address: \"" + w.address + "\"\n    " + w.shard + "\n";
            if (!transport.empty()) y += "    transport: " + transport + "\n";
            if (!w.replicas.empty()) y += "    replicas: " + w.replicas + "\n";
            if (!w.tls.empty()) y += "    tls: " + w.tls + "\n";
        }
        const std::string path = dir_ + "/" + file;
        FILE* f = std::fopen(path.c_str(), "w");
        std::fputs(y.c_str(), f);
        std::fclose(f);
        return path;
    }

    // `moemesh run --cluster yaml` once, with a wall-clock limit. Returns the exit code (nullopt:
    // it did not finish in time), stdout's first line and stderr.
    std::optional<int> run_cluster(const std::string& yaml, int n, double limit_s, std::string* out, std::string* err,
                                   const std::string& tag = "coord") {
        Child c;
        const std::string err_path = dir_ + "/" + tag + ".err";
        EXPECT_TRUE(c.start({moemesh_bin(), "run", "--cluster", yaml, "--tokens", kTokens, "--top",
                             std::to_string(kTop), "--json", "-n", std::to_string(n), "--kv-type", "f32",
                             "--threads", "1"},
                            err_path, true));
        c.close_stdin();
        auto line = c.read_line(limit_s);
        *out = line.value_or("");
        auto rc = c.wait_exit(line ? limit_s : 0.5);
        *err = read_file(err_path);
        return rc;
    }

    // A coordinator serving one request per stdin line.
    void start_stdin_coordinator(Child* c, const std::string& yaml, int timeout_ms) {
        ASSERT_TRUE(c->start({moemesh_bin(), "run", "--cluster", yaml, "--stdin", "--top", std::to_string(kTop),
                              "--json", "-n", std::to_string(kLongN), "--kv-type", "f32", "--threads", "1",
                              "--timeout-ms", std::to_string(timeout_ms)},
                             dir_ + "/coord.err", true));
    }
    std::string coord_log() const { return read_file(dir_ + "/coord.err"); }

    void expect_same_as_reference(const std::string& out, int n, const std::string& what) {
        json j;
        try {
            j = json::parse(out);
        } catch (const std::exception& e) {
            ADD_FAILURE() << what << ": not JSON: '" << out.substr(0, 500) << "'";
            return;
        }
        EXPECT_EQ(compare_outputs(ref_[n], j), "") << what;
    }

    static inline std::string suite_dir_, model_, model2_, model_next_;
    static inline std::map<int, json> ref_;
    static inline json ref_next_;
    static inline int counter_ = 0;
    std::string dir_, sock_dir_;
    std::vector<std::unique_ptr<Worker>> workers_;
};

// ---- 1. equality: 1, 2, 3 workers, uneven shards, replicas; unix sockets and TCP ----

// unix, tcp: activations in the gRPC messages; shm: in shared memory, with 2-row buffers so that
// the 3-token prompt goes in groups of rows; auto: what it picks for local CPU workers (shm).
class Equality : public Cluster, public ::testing::WithParamInterface<std::string> {};

TEST_P(Equality, OneTwoThreeWorkersMatchSingleProcess) {
    const std::string transport = GetParam();
    const bool tcp = transport == "tcp" || transport == "auto";
    const bool oob = transport == "shm" || transport == "auto";
    Worker& a = add_worker("a", tcp);
    Worker& b = add_worker("b", tcp);
    Worker& c = add_worker("c", tcp);
    ASSERT_TRUE(a.start());
    ASSERT_TRUE(b.start());
    ASSERT_TRUE(c.start());
    // The worker gets its shard at handshake: the same three processes serve all three layouts.
    const std::vector<std::pair<std::string, std::vector<WorkerEntry>>> layouts = {
        {"one", {{"a", a.address, "experts: \"0-15\"", "", ""}}},
        {"two-uneven-replicas",
         {{"a", a.address, "layers: {\"0-1\": \"0-11\", \"2-3\": \"0-2\"}", "", ""},
          {"b", b.address, "layers: {\"0-1\": \"12-15\", \"2-3\": \"3-15\"}", "{\"0-1\": \"0-5\"}", ""}}},
        {"three-uneven-replicas",
         {{"a", a.address, "experts: \"0-1\"", "{\"0-3\": \"10-15\"}", ""},
          {"b", b.address, "experts: \"2-9\"", "", ""},
          {"c", c.address, "experts: \"10-15\"", "{\"2-3\": \"0-5\"}", ""}}},
    };
    for (const auto& [name, entries] : layouts) {
        SCOPED_TRACE(name);
        const std::string yaml = write_yaml(name + ".yaml", entries, 5000, "", transport == "shm" ? 2 : 0,
                                            transport == "auto" ? "" : transport);
        std::string out, err;
        auto rc = run_cluster(yaml, kShortN, 30, &out, &err, name);
        ASSERT_EQ(rc, std::optional<int>(0)) << err;
        expect_same_as_reference(out, kShortN, name);
        // Every worker of the layout did serve calls, over the transport asked for.
        for (const auto& e : entries) EXPECT_NE(err.find(e.name + ": "), std::string::npos) << err;
        EXPECT_EQ(err.find(" 0 calls"), std::string::npos) << err;
        EXPECT_EQ(err.find("over shm") != std::string::npos, oob) << err;
        EXPECT_EQ(err.find("transport auto:"), std::string::npos) << err;  // no fallback
    }
    if (oob) {
        EXPECT_NE(a.log().find("data plane shm from "), std::string::npos) << a.log();
    }
}
INSTANTIATE_TEST_SUITE_P(Transport, Equality, ::testing::Values("unix", "tcp", "shm", "auto"),
                         [](const auto& info) {
                             std::string n = info.param;
                             n[0] = static_cast<char>(std::toupper(n[0]));
                             return n;
                         });

// qwen3next: the coordinator keeps the DeltaNet/attention state and the shared expert, the workers
// serve the routed experts; output equals the single process (which matches llama.cpp:
// test_parity_qwen3next).
TEST_F(Cluster, Qwen3NextTwoWorkersMatchSingleProcess) {
    Worker& a = add_worker("a", false, {}, model_next_);
    Worker& b = add_worker("b", true, {}, model_next_);
    ASSERT_TRUE(a.start());
    ASSERT_TRUE(b.start());
    const std::string yaml =
        write_yaml("next.yaml",
                   {{"a", a.address, "layers: {\"0-1\": \"0-9\", \"2-3\": \"0-4\"}", "", ""},
                    {"b", b.address, "layers: {\"0-1\": \"10-15\", \"2-3\": \"5-15\"}", "", ""}},
                   5000, model_next_);
    std::string out, err;
    auto rc = run_cluster(yaml, kShortN, 30, &out, &err, "next");
    ASSERT_EQ(rc, std::optional<int>(0)) << err;
    json j;
    ASSERT_NO_THROW(j = json::parse(out)) << out;
    EXPECT_EQ(compare_outputs(ref_next_, j), "");
    EXPECT_EQ(err.find(" 0 calls"), std::string::npos) << err;
}

// ---- 2. SIGKILL mid-generation, then restart: the same coordinator serves again ----

TEST_F(Cluster, KillWorkerMidGenerationThenRestartReconnects) {
    Worker& w1 = add_worker("w1", true);
    Worker& w2 = add_worker("w2", true);
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    const std::string yaml = write_yaml("c.yaml", {{"w1", w1.address, "experts: \"0-7\"", "", ""},
                                                   {"w2", w2.address, "experts: \"8-15\"", "", ""}});
    const int timeout_ms = 2000;
    Child coord;
    start_stdin_coordinator(&coord, yaml, timeout_ms);

    // A first request, before any fault: the result everything below is compared with.
    auto t0 = SteadyClock::now();
    ASSERT_TRUE(coord.write_line(kTokens));
    auto first = coord.read_line(30);
    ASSERT_TRUE(first) << coord_log();
    const double one_request_s = seconds_since(t0);
    expect_same_as_reference(*first, kLongN, "before the kill");

    // Kill w2 about a third into the next request.
    ASSERT_TRUE(coord.write_line(kTokens));
    std::this_thread::sleep_for(std::chrono::duration<double>(one_request_s / 3));
    w2.proc.signal_it(SIGKILL);
    const auto killed = SteadyClock::now();
    auto line = coord.read_line(timeout_ms / 1000.0 + 10);
    ASSERT_TRUE(line) << "no answer after the kill (hang?)\n" << coord_log();
    json j = json::parse(*line);
    if (!j.contains("error")) {
        // The request won the race with the kill: the next one must fail instead.
        ASSERT_TRUE(coord.write_line(kTokens));
        line = coord.read_line(timeout_ms / 1000.0 + 10);
        ASSERT_TRUE(line) << "no answer after the kill (hang?)\n" << coord_log();
        j = json::parse(*line);
    }
    const double noticed_s = seconds_since(killed);
    ASSERT_TRUE(j.contains("error")) << *line;
    const std::string msg = j["error"];
    EXPECT_NE(msg.find("'w2'"), std::string::npos) << msg;
    // Local CPU workers under `transport: auto` use the shm data plane: this is its fault test too.
    EXPECT_NE(w2.log().find("data plane shm from "), std::string::npos) << w2.log();
    EXPECT_LT(noticed_s, timeout_ms / 1000.0 + 2) << msg;
    EXPECT_NE(coord_log().find("error: request failed: "), std::string::npos) << coord_log();

    // Restart w2 on the same address; the coordinator reconnects by itself (at most one attempt a
    // second per down worker, so wait that second out).
    ASSERT_TRUE(w2.start());
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    ASSERT_TRUE(coord.write_line(kTokens));
    line = coord.read_line(30);
    ASSERT_TRUE(line) << coord_log();
    EXPECT_EQ(compare_outputs(json::parse(*first), json::parse(*line)), "") << *line << "\n" << coord_log();
    EXPECT_NE(coord_log().find("reconnected to worker 'w2'"), std::string::npos) << coord_log();
    // At EOF the coordinator exits 1 because one request failed ("error: 1 request(s) failed").
    coord.close_stdin();
    EXPECT_EQ(coord.wait_exit(10), std::optional<int>(1)) << coord_log();
    EXPECT_NE(coord_log().find("error: 1 request(s) failed"), std::string::npos) << coord_log();
}

// The HTTP front end over a cluster: a worker killed between requests gives a 500 JSON error that
// names it (a stream: an error event), the server stays up, and serves again once the worker is back.
TEST_F(Cluster, HttpServerReportsAKilledWorkerAndRecovers) {
    Worker& w1 = add_worker("w1", true);
    Worker& w2 = add_worker("w2", true);
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    const std::string yaml = write_yaml("c.yaml", {{"w1", w1.address, "experts: \"0-7\"", "", ""},
                                                   {"w2", w2.address, "experts: \"8-15\"", "", ""}});
    Child coord;
    ASSERT_TRUE(coord.start({moemesh_bin(), "serve", "--cluster", yaml, "--serve", "127.0.0.1:0", "--threads", "1",
                             "--timeout-ms", "2000", "--ctx", "512"},
                            dir_ + "/coord.err"));
    // The chosen port, from "http: listening on http://127.0.0.1:PORT".
    const std::string listening = "listening on http://127.0.0.1:";
    const std::optional<std::string> log = wait_for_log(dir_ + "/coord.err", listening, 30);
    ASSERT_TRUE(log) << coord_log();
    const int port = std::atoi(log->c_str() + log->find(listening) + listening.size());
    ASSERT_GT(port, 0) << coord_log();
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    const std::string body = R"({"prompt":[1,2,3,4],"max_tokens":8,"temperature":0,"ignore_eos":true})";
    auto first = c.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(first) << coord_log();
    ASSERT_EQ(first->status, 200) << first->body;

    w2.proc.signal_it(SIGKILL);
    (void)w2.proc.wait_exit(10);
    auto failed = c.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(failed) << "no answer after the kill (hang?)\n" << coord_log();
    EXPECT_EQ(failed->status, 500) << failed->body;
    EXPECT_NE(failed->body.find("'w2'"), std::string::npos) << failed->body;
    auto stream = c.Post("/v1/completions", R"({"prompt":[1,2,3,4],"max_tokens":8,"stream":true})", "application/json");
    ASSERT_TRUE(stream) << coord_log();
    EXPECT_NE(stream->body.find("data: {\"error\""), std::string::npos) << stream->body;
    EXPECT_NE(stream->body.find("data: [DONE]"), std::string::npos) << stream->body;

    ASSERT_TRUE(w2.start());
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // one reconnect attempt a second
    auto again = c.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(again) << coord_log();
    ASSERT_EQ(again->status, 200) << again->body << "\n" << coord_log();
    EXPECT_EQ(json::parse(again->body)["choices"][0]["text"], json::parse(first->body)["choices"][0]["text"]);
    coord.signal_it(SIGTERM);
    EXPECT_EQ(coord.wait_exit(10), std::optional<int>(0)) << coord_log();
}

// ---- 3. replicas cover the killed worker: the generation completes ----

TEST_F(Cluster, ReplicasCoverKilledWorkerGenerationCompletes) {
    Worker& w1 = add_worker("w1", false);
    Worker& w2 = add_worker("w2", false);
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    // w1 holds a replica of every expert of w2.
    const std::string yaml = write_yaml("c.yaml", {{"w1", w1.address, "experts: \"0-9\"", "{\"0-3\": \"10-15\"}", ""},
                                                   {"w2", w2.address, "experts: \"10-15\"", "{\"0-3\": \"0-3\"}", ""}});
    Child coord;
    start_stdin_coordinator(&coord, yaml, 2000);
    auto t0 = SteadyClock::now();
    ASSERT_TRUE(coord.write_line(kTokens));
    auto first = coord.read_line(30);
    ASSERT_TRUE(first) << coord_log();
    const double one_request_s = seconds_since(t0);
    expect_same_as_reference(*first, kLongN, "before the kill");

    ASSERT_TRUE(coord.write_line(kTokens));
    std::this_thread::sleep_for(std::chrono::duration<double>(one_request_s / 3));
    w2.proc.signal_it(SIGKILL);
    auto line = coord.read_line(30);
    ASSERT_TRUE(line) << coord_log();
    expect_same_as_reference(*line, kLongN, "w2 killed in the middle, replicas on w1");
    // And with w2 gone for good, the next request too.
    ASSERT_TRUE(coord.write_line(kTokens));
    line = coord.read_line(30);
    ASSERT_TRUE(line) << coord_log();
    expect_same_as_reference(*line, kLongN, "w2 down");
    coord.close_stdin();
    EXPECT_EQ(coord.wait_exit(10), std::optional<int>(0)) << coord_log();
}

// ---- 4. SIGSTOP: the deadline fires ----

TEST_F(Cluster, StoppedWorkerHitsDeadlineAndIsReported) {
    Worker& w1 = add_worker("w1", false);
    Worker& w2 = add_worker("w2", false);
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    const std::string yaml = write_yaml("c.yaml", {{"w1", w1.address, "experts: \"0-7\"", "", ""},
                                                   {"w2", w2.address, "experts: \"8-15\"", "", ""}});
    const int timeout_ms = 1000;
    Child coord;
    start_stdin_coordinator(&coord, yaml, timeout_ms);
    auto t0 = SteadyClock::now();
    ASSERT_TRUE(coord.write_line(kTokens));
    auto first = coord.read_line(30);
    ASSERT_TRUE(first) << coord_log();
    const double one_request_s = seconds_since(t0);

    ASSERT_TRUE(coord.write_line(kTokens));
    std::this_thread::sleep_for(std::chrono::duration<double>(one_request_s / 3));
    w2.proc.signal_it(SIGSTOP);
    const auto stopped = SteadyClock::now();
    auto line = coord.read_line(timeout_ms / 1000.0 + 10);
    if (line && !json::parse(*line).contains("error")) {  // finished before the stop
        ASSERT_TRUE(coord.write_line(kTokens));
        line = coord.read_line(timeout_ms / 1000.0 + 10);
    }
    const double noticed_s = seconds_since(stopped);
    w2.proc.signal_it(SIGCONT);
    ASSERT_TRUE(line) << "no answer with w2 stopped (hang?)\n" << coord_log();
    json j = json::parse(*line);
    ASSERT_TRUE(j.contains("error")) << *line;
    const std::string msg = j["error"];
    EXPECT_NE(msg.find("'w2'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("deadline"), std::string::npos) << msg;
    EXPECT_LT(noticed_s, timeout_ms / 1000.0 + 2) << msg;

    // Resumed, the worker is used again without restarting anything.
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    ASSERT_TRUE(coord.write_line(kTokens));
    line = coord.read_line(30);
    ASSERT_TRUE(line) << coord_log();
    EXPECT_EQ(compare_outputs(json::parse(*first), json::parse(*line)), "") << *line << "\n" << coord_log();
    coord.close_stdin();
    EXPECT_EQ(coord.wait_exit(10), std::optional<int>(1)) << coord_log();  // one request failed
}

// ---- 5. wrong model, wrong name: refused at handshake, saying which ----

TEST_F(Cluster, WrongModelIsRefusedAtHandshake) {
    Worker& w = add_worker("w1", false, {}, model2_);
    ASSERT_TRUE(w.start());
    const std::string yaml = write_yaml("c.yaml", {{"w1", w.address, "experts: \"0-15\"", "", ""}});
    std::string out, err;
    const auto t0 = SteadyClock::now();
    auto rc = run_cluster(yaml, kShortN, 20, &out, &err);
    EXPECT_LT(seconds_since(t0), 5.0);
    ASSERT_TRUE(rc) << "coordinator hung\n" << err;
    EXPECT_EQ(*rc, 1) << err;
    EXPECT_NE(err.find("worker 'w1'"), std::string::npos) << err;
    EXPECT_NE(err.find("refused the handshake"), std::string::npos) << err;
    EXPECT_NE(err.find("fingerprint mismatch"), std::string::npos) << err;
    EXPECT_NE(w.log().find("refused handshake"), std::string::npos) << w.log();
}

TEST_F(Cluster, WrongNameIsRefusedAtHandshake) {
    Worker& w = add_worker("impostor", true);
    ASSERT_TRUE(w.start());
    const std::string yaml = write_yaml("c.yaml", {{"w1", w.address, "experts: \"0-15\"", "", ""}});
    std::string out, err;
    const auto t0 = SteadyClock::now();
    auto rc = run_cluster(yaml, kShortN, 20, &out, &err);
    EXPECT_LT(seconds_since(t0), 5.0);
    ASSERT_TRUE(rc) << "coordinator hung\n" << err;
    EXPECT_EQ(*rc, 1) << err;
    EXPECT_NE(err.find("refused the handshake"), std::string::npos) << err;
    EXPECT_NE(err.find("'w1'"), std::string::npos) << err;
    EXPECT_NE(err.find("'impostor'"), std::string::npos) << err;
}

// A worker whose shard cannot be read (its model file truncated after it started) fails the
// coordinator at once with the reason, instead of leaving it waiting for the load to finish.
TEST_F(Cluster, ShardLoadFailureFailsTheCoordinatorAtOnce) {
    const std::string copy = dir_ + "/truncated.gguf";
    std::filesystem::copy_file(model_, copy, std::filesystem::copy_options::overwrite_existing);
    Worker& w = add_worker("w1", false, {}, copy);
    ASSERT_TRUE(w.start());
    ASSERT_EQ(truncate(copy.c_str(), static_cast<off_t>(std::filesystem::file_size(copy) * 2 / 5)), 0);
    const std::string yaml = write_yaml("c.yaml", {{"w1", w.address, "experts: \"0-15\"", "", ""}}, 30000);
    std::string out, err;
    const auto t0 = SteadyClock::now();
    auto rc = run_cluster(yaml, kShortN, 60, &out, &err);
    EXPECT_LT(seconds_since(t0), 10.0);
    ASSERT_TRUE(rc) << "coordinator hung\n" << err;
    EXPECT_EQ(*rc, 1) << err;
    EXPECT_NE(err.find("worker 'w1'"), std::string::npos) << err;
    EXPECT_NE(err.find("the shard failed to load"), std::string::npos) << err;
    EXPECT_NE(err.find(copy), std::string::npos) << err;
    EXPECT_NE(w.log().find("shard load failed"), std::string::npos) << w.log();
}

// ---- 6. peers that are not moemesh workers; clients that are not coordinators ----

// SLOW (~10 s): the coordinator's handshake waits for a gRPC connection until its 10 s deadline.
TEST_F(Cluster, NotAWorkerPeerFailsClearlyWithoutHang) {
    FakePeer garbage(std::string("HTTP/1.1 200 OK\r\n\r\n") + std::string(4096, '\x7f'));
    FakePeer closer("");
    const std::string y1 = write_yaml("garbage.yaml", {{"g1", "127.0.0.1:" + std::to_string(garbage.port()),
                                                        "experts: \"0-15\"", "", ""}});
    const std::string y2 = write_yaml("closer.yaml", {{"c1", "127.0.0.1:" + std::to_string(closer.port()),
                                                       "experts: \"0-15\"", "", ""}});
    // Both at once: each is bounded by the same handshake deadline.
    std::string out1, err1, out2, err2;
    std::optional<int> rc1, rc2;
    const auto t0 = SteadyClock::now();
    std::thread t([&] { rc2 = run_cluster(y2, kShortN, 30, &out2, &err2, "closer"); });
    rc1 = run_cluster(y1, kShortN, 30, &out1, &err1, "garbage");
    t.join();
    const double took = seconds_since(t0);
    ASSERT_TRUE(rc1) << "hang against a garbage peer\n" << err1;
    ASSERT_TRUE(rc2) << "hang against a closing peer\n" << err2;
    EXPECT_EQ(*rc1, 1) << err1;
    EXPECT_EQ(*rc2, 1) << err2;
    EXPECT_NE(err1.find("worker 'g1' (127.0.0.1:"), std::string::npos) << err1;
    EXPECT_NE(err2.find("worker 'c1' (127.0.0.1:"), std::string::npos) << err2;
    EXPECT_NE(err1.find("not a moemesh worker"), std::string::npos) << err1;
    EXPECT_NE(err2.find("not a moemesh worker"), std::string::npos) << err2;
    EXPECT_GT(garbage.accepted(), 0);
    EXPECT_GT(closer.accepted(), 0);
    EXPECT_LT(took, 15.0);
    // The coordinator waits for the transport first (WaitForConnected) and says what the peer is
    // not, instead of a bare "Deadline Exceeded" from the handshake.
    EXPECT_EQ(err1.find("handshake failed: Deadline Exceeded"), std::string::npos)
        << "unclear error against a non-moemesh peer (see BUG above):\n" << err1;
}

// ---- raw gRPC against one worker (the wire-level tests below) ----

std::chrono::system_clock::time_point rpc_deadline() {
    return std::chrono::system_clock::now() + std::chrono::seconds(5);
}

// The model fingerprint a worker logged at start ("... (model <fingerprint>) ...").
std::string logged_fingerprint(const std::string& log) {
    const size_t at = log.find("(model ") + 7;
    return log.substr(at, log.find(')', at) - at);
}

// A current-protocol handshake for worker "w1" serving layer 0's experts 0..15.
v1::HandshakeRequest shard_handshake(const std::string& fingerprint) {
    v1::HandshakeRequest req;
    req.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    req.set_model_fingerprint(fingerprint);
    req.set_worker_name("w1");
    auto* ls = req.add_shard();
    ls->set_layer(0);
    for (int e = 0; e < 16; ++e) ls->add_experts(e);
    return req;
}

// Polls Health until the worker's shard has loaded (up to 2 s).
void wait_until_ready(v1::ExpertWorker::Stub& stub) {
    for (int i = 0; i < 100; ++i) {
        v1::HealthResponse h;
        grpc::ClientContext hc;
        hc.set_deadline(rpc_deadline());
        ASSERT_TRUE(stub.Health(&hc, v1::HealthRequest(), &h).ok());
        if (h.ready()) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

TEST_F(Cluster, DataPlaneOfferRefusedClearlyOverTheWire) {
    Worker& w = add_worker("w1", false);
    ASSERT_TRUE(w.start());
    auto stub = v1::ExpertWorker::NewStub(grpc::CreateChannel(w.address, grpc::InsecureChannelCredentials()));
    const std::string fingerprint = logged_fingerprint(w.log());
    auto handshake = [&](const v1::DataPlaneOffer* offer, v1::HandshakeResponse* resp) {
        v1::HandshakeRequest req = shard_handshake(fingerprint);
        if (offer) *req.mutable_data_plane() = *offer;
        grpc::ClientContext ctx;
        ctx.set_deadline(rpc_deadline());
        return stub->Handshake(&ctx, req, resp).ok();
    };
    // The wrong hidden size (the model's is 128), then an object that does not exist.
    v1::DataPlaneOffer o;
    o.set_kind(v1::DATA_PLANE_SHM);
    o.set_max_rows(65536);
    o.set_hidden(4096);
    o.set_shm_name("/moemesh-nope");
    o.set_region_bytes(2ull * 65536 * 4096 * 4);
    v1::HandshakeResponse resp;
    ASSERT_TRUE(handshake(&o, &resp));
    EXPECT_TRUE(resp.accepted()) << resp.reason();  // the handshake stands; the coordinator decides
    ASSERT_TRUE(resp.has_data_plane());
    EXPECT_FALSE(resp.data_plane().accepted());
    EXPECT_EQ(resp.data_plane().reason(), "data plane shm: hidden 4096 != the model's 128");
    o.set_hidden(128);
    o.set_region_bytes(2ull * 65536 * 128 * 4);
    resp.Clear();
    ASSERT_TRUE(handshake(&o, &resp));
    EXPECT_EQ(resp.data_plane().reason(),
              "data plane shm: cannot open shared memory /moemesh-nope: No such file or directory (is the coordinator "
              "on this host, and /dev/shm shared between the two?)");
    EXPECT_TRUE(wait_for_log(w.err_path, "refused the data plane of ", 5)) << w.log();
    // An out-of-band call with no plane: an error result, and the stream stays up for a good call.
    resp.Clear();
    ASSERT_TRUE(handshake(nullptr, &resp));
    ASSERT_TRUE(resp.accepted());
    EXPECT_FALSE(resp.has_data_plane());
    wait_until_ready(*stub);
    grpc::ClientContext sc;
    sc.set_deadline(rpc_deadline());
    auto stream = stub->Experts(&sc);
    v1::ExpertCall c;
    c.set_request_id(1);
    c.set_n_rows(1);
    c.set_hidden(128);
    c.set_out_of_band(true);
    int32_t row = 0, ex = 3;
    float wt = 1.0f;
    c.set_pair_rows(&row, 4);
    c.set_pair_experts(&ex, 4);
    c.set_pair_weights(&wt, 4);
    ASSERT_TRUE(stream->Write(c));
    v1::ExpertResult r;
    ASSERT_TRUE(stream->Read(&r));
    EXPECT_EQ(r.error(), "an out-of-band call, but no data plane was accepted at the handshake");
    EXPECT_FALSE(r.out_of_band());
    c.set_request_id(2);
    c.set_out_of_band(false);
    c.set_activations(std::string(128 * 4, '\0'));
    ASSERT_TRUE(stream->Write(c));
    ASSERT_TRUE(stream->Read(&r));
    EXPECT_EQ(r.error(), "");
    EXPECT_EQ(r.partial().size(), 128u * 4);
    stream->WritesDone();
}

TEST_F(Cluster, WorkerSurvivesGarbageWrongProtocolAndMalformedCalls) {
    Worker& w = add_worker("w1", true);
    ASSERT_TRUE(w.start());
    // Raw garbage, and 1 MiB of it, to the worker's port.
    EXPECT_TRUE(send_raw_tcp(w.port(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    EXPECT_TRUE(send_raw_tcp(w.port(), std::string(1 << 20, '\xff')));
    EXPECT_TRUE(send_raw_tcp(w.port(), std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + std::string(64, '\0')));

    auto channel = grpc::CreateChannel(w.address, grpc::InsecureChannelCredentials());
    auto stub = v1::ExpertWorker::NewStub(channel);
    const std::string fingerprint = logged_fingerprint(w.log());
    {
        // A wrong protocol version: refused, saying why, logged.
        v1::HandshakeRequest req;
        req.set_protocol_version(99);
        req.set_model_fingerprint(fingerprint);
        req.set_worker_name("w1");
        v1::HandshakeResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(rpc_deadline());
        ASSERT_TRUE(stub->Handshake(&ctx, req, &resp).ok());
        EXPECT_FALSE(resp.accepted());
        EXPECT_NE(resp.reason().find("protocol version 99"), std::string::npos) << resp.reason();
        EXPECT_TRUE(wait_for_log(w.err_path, "refused handshake", 5)) << w.log();
    }
    {
        // A real handshake, then malformed and oversized calls on the data stream: each one gets an
        // error result, the stream stays up, and a good call after them is answered.
        const v1::HandshakeRequest req = shard_handshake(fingerprint);
        v1::HandshakeResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(rpc_deadline());
        ASSERT_TRUE(stub->Handshake(&ctx, req, &resp).ok());
        ASSERT_TRUE(resp.accepted()) << resp.reason();
        wait_until_ready(*stub);
        grpc::ClientContext sc;
        sc.set_deadline(rpc_deadline());
        auto stream = stub->Experts(&sc);
        auto call = [](uint64_t id, uint32_t layer, uint32_t n_rows, uint32_t hidden, size_t act_bytes, int expert) {
            v1::ExpertCall c;
            c.set_request_id(id);
            c.set_layer(layer);
            c.set_n_rows(n_rows);
            c.set_hidden(hidden);
            c.set_dtype(v1::DTYPE_F32);
            c.set_activations(std::string(act_bytes, '\0'));
            int32_t row = 0, ex = expert;
            float wt = 1.0f;
            c.set_pair_rows(&row, 4);
            c.set_pair_experts(&ex, 4);
            c.set_pair_weights(&wt, 4);
            return c;
        };
        const std::vector<v1::ExpertCall> bad = {
            call(1, 0, 1, 128, 3, 0),                 // activations too short
            call(2, 0, 1u << 30, 128, 512, 0),        // absurd row count (oversized claim)
            call(3, 0, 1, 64, 256, 0),                // wrong hidden size
            call(4, 7, 1, 128, 512, 0),               // layer out of range
            call(5, 0, 1, 128, 512, 99),              // expert out of range
            call(6, 1, 1, 128, 512, 0),               // a layer outside the shard
        };
        for (const auto& c : bad) {
            ASSERT_TRUE(stream->Write(c));
            v1::ExpertResult r;
            ASSERT_TRUE(stream->Read(&r)) << "stream closed after bad call " << c.request_id();
            EXPECT_EQ(r.request_id(), c.request_id());
            EXPECT_FALSE(r.error().empty()) << "bad call " << c.request_id() << " accepted";
        }
        ASSERT_TRUE(stream->Write(call(7, 0, 1, 128, 512, 3)));
        v1::ExpertResult r;
        ASSERT_TRUE(stream->Read(&r));
        EXPECT_TRUE(r.error().empty()) << r.error();
        EXPECT_EQ(r.partial().size(), 512u);
        stream->WritesDone();
        stream->Finish();
        EXPECT_NE(w.log().find("refused: "), std::string::npos) << w.log();
    }
    // A real coordinator after all that: served, same result.
    const std::string yaml = write_yaml("c.yaml", {{"w1", w.address, "experts: \"0-15\"", "", ""}});
    std::string out, err;
    auto rc = run_cluster(yaml, kShortN, 30, &out, &err);
    ASSERT_EQ(rc, std::optional<int>(0)) << err << "\nworker:\n" << w.log();
    expect_same_as_reference(out, kShortN, "after bad clients");
}

// ---- 7. TLS ----

// Makes a CA, a server certificate for localhost/127.0.0.1 and a client certificate in `dir`
// (deploy/tls/README.md documents the same commands).
::testing::AssertionResult make_certs(const std::string& dir) {
    const std::string script =
        "set -e; cd '" + dir + "'\n"
        "K='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'\n"
        "openssl req -x509 $K -keyout ca.key -out ca.pem -days 2 -subj /CN=moemesh-test-ca\n"
        "openssl req $K -keyout server.key -out server.csr -subj /CN=localhost\n"
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext\n"
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext"
        " -out server.pem\n"
        "openssl req $K -keyout client.key -out client.csr -subj /CN=coordinator\n"
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n"
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext"
        " -out client.pem\n";
    std::string out;
    if (run_capture("command -v openssl", &out) != 0) return ::testing::AssertionFailure() << "openssl not found";
    if (run_capture("bash -c \"$(cat <<'EOS'\n" + script + "EOS\n)\"", &out, dir + "/openssl.err") != 0)
        return ::testing::AssertionFailure() << "openssl failed: " << read_file(dir + "/openssl.err");
    return ::testing::AssertionSuccess();
}

TEST_F(Cluster, TlsAndMutualTlsMatchInsecure) {
    ASSERT_TRUE(make_certs(dir_));
    const std::string d = dir_ + "/";
    // w1: server TLS over TCP 127.0.0.1; w2: mutual TLS over a unix socket (target name "localhost").
    Worker& w1 = add_worker("w1", true, {"--tls-cert", d + "server.pem", "--tls-key", d + "server.key"});
    Worker& w2 = add_worker("w2", false,
                            {"--tls-cert", d + "server.pem", "--tls-key", d + "server.key", "--tls-ca", d + "ca.pem"});
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    const std::string tls = "{ca: " + d + "ca.pem}";
    const std::string mtls = "{ca: " + d + "ca.pem, cert: " + d + "client.pem, key: " + d + "client.key}";
    const std::string yaml = write_yaml("c.yaml", {{"w1", w1.address, "experts: \"0-5\"", "", tls},
                                                   {"w2", w2.address, "experts: \"6-15\"", "", mtls}});
    std::string out, err;
    auto rc = run_cluster(yaml, kShortN, 30, &out, &err);
    ASSERT_EQ(rc, std::optional<int>(0)) << err << "\nw1:\n" << w1.log() << "\nw2:\n" << w2.log();
    expect_same_as_reference(out, kShortN, "TLS");
}

// SLOW (~10 s, bounded by the coordinator's handshake deadline).
TEST_F(Cluster, TlsMismatchFailsClearlyWithoutHang) {
    ASSERT_TRUE(make_certs(dir_));
    const std::string d = dir_ + "/";
    Worker& w1 = add_worker("w1", true, {"--tls-cert", d + "server.pem", "--tls-key", d + "server.key"});
    Worker& w2 = add_worker("w2", true,
                            {"--tls-cert", d + "server.pem", "--tls-key", d + "server.key", "--tls-ca", d + "ca.pem"});
    ASSERT_TRUE(w1.start());
    ASSERT_TRUE(w2.start());
    // A coordinator without tls against a TLS worker; a coordinator without a client certificate
    // against a worker that requires one. Both at once.
    const std::string plain = write_yaml("plain.yaml", {{"w1", w1.address, "experts: \"0-15\"", "", ""}});
    const std::string nocert =
        write_yaml("nocert.yaml", {{"w2", w2.address, "experts: \"0-15\"", "", "{ca: " + d + "ca.pem}"}});
    std::string out1, err1, out2, err2;
    std::optional<int> rc1, rc2;
    const auto t0 = SteadyClock::now();
    std::thread t([&] { rc2 = run_cluster(nocert, kShortN, 30, &out2, &err2, "nocert"); });
    rc1 = run_cluster(plain, kShortN, 30, &out1, &err1, "plain");
    t.join();
    const double took = seconds_since(t0);
    ASSERT_TRUE(rc1) << "hang: plaintext coordinator vs TLS worker\n" << err1;
    ASSERT_TRUE(rc2) << "hang: no client certificate vs mutual-TLS worker\n" << err2;
    EXPECT_EQ(*rc1, 1) << err1;
    EXPECT_EQ(*rc2, 1) << err2;
    EXPECT_NE(err1.find("worker 'w1'"), std::string::npos) << err1;
    EXPECT_NE(err2.find("worker 'w2'"), std::string::npos) << err2;
    EXPECT_NE(err1.find("cannot connect"), std::string::npos) << err1;
    EXPECT_NE(err2.find("TLS handshake failed"), std::string::npos) << err2;
    EXPECT_LT(took, 15.0);
    // The workers keep serving: a correct coordinator right after.
    const std::string good = write_yaml("good.yaml", {{"w1", w1.address, "experts: \"0-15\"", "", "{ca: " + d + "ca.pem}"}});
    std::string out, err;
    auto rc = run_cluster(good, kShortN, 30, &out, &err, "good");
    ASSERT_EQ(rc, std::optional<int>(0)) << err;
    expect_same_as_reference(out, kShortN, "TLS after a plaintext peer");
}

// ---- 8. multi-host on one machine: network namespaces ----

TEST_F(Cluster, NetnsMultiHost) {
    std::string out;
    const std::string cmd = "bash " + source_dir() + "/tests/netns_cluster.sh " + std::string(MOEMESH_BINARY_DIR) +
                            " " + model_ + " " + dir_ + " " + kTokens + " " + std::to_string(kShortN) + " " +
                            std::to_string(kTop);
    const int rc = run_capture("timeout 90 " + cmd, &out, dir_ + "/netns.err");
    const std::string err = read_file(dir_ + "/netns.err");
    if (rc == 77) GTEST_SKIP() << "network namespaces not available: " << err;
    ASSERT_EQ(rc, 0) << err << "\ncoordinator:\n" << read_file(dir_ + "/coordinator.err");
    expect_same_as_reference(out, kShortN, "coordinator and workers in 3 network namespaces");
}

}  // namespace
}  // namespace moemesh
