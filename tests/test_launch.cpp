// `moemesh launch`: real worker and coordinator processes over real Unix sockets. The output of 1-,
// 2- and 3-worker clusters (uneven shards, per-layer ranges, replicas) matches `moemesh run` on the
// same model; the launcher leaves no process behind, stops on SIGINT (130), restarts a killed worker,
// and reports a worker that cannot start.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

extern char** environ;

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using moemesh::testing::read_file;
using moemesh::testing::run_capture;

std::string bin_dir() { return fs::path(moemesh::testing::moemesh_bin()).parent_path().string(); }
std::string worker_bin() { return bin_dir() + "/moemesh-worker"; }

// Short, unique per test process (ctest runs the cases in parallel): Unix socket paths stay far
// below the 108-byte limit, and every process of this run has the dir in its command line.
std::string test_dir() {
    static const std::string d = [] {
        std::string p = "/tmp/mmln-" + std::to_string(getpid());
        fs::create_directories(p);
        // The launchers' run dirs (worker logs, kept after a failure) land here too.
        setenv("TMPDIR", p.c_str(), 1);
        return p;
    }();
    return d;
}

class TempDirCleanup : public ::testing::Environment {
public:
    void TearDown() override {
        const auto* u = ::testing::UnitTest::GetInstance();
        std::error_code ec;
        if (u->Passed()) fs::remove_all(test_dir(), ec);
    }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new TempDirCleanup);

std::string model_path() {
    static const std::string path = [] {
        const std::string p = test_dir() + "/model.gguf";
        std::string out;
        const std::string cmd = moemesh::testing::moemesh_bin() +
                                " make-model --out " + p +
                                " --layers 4 --hidden 128 --heads 4 --kv-heads 2 --head-dim 32 --experts 16"
                                " --top-k 4 --expert-ff 64 --vocab 800 --seed 3 --type f32";
        EXPECT_EQ(run_capture(cmd, &out, test_dir() + "/make_model.log"), 0) << read_file(test_dir() + "/make_model.log");
        return p;
    }();
    return path;
}

std::string kTokens = [] {
    std::string s;
    for (int i = 0; i < 32; ++i) s += (i ? "," : "") + std::to_string((i * 37 + 11) % 800);
    return s;
}();
const std::string kGenOpts = " --tokens " + kTokens + " --top 800 -n 16 --json --kv-type f32 -t 1";

// Command lines of the live processes (other than this one) that mention `needle`.
std::vector<std::string> processes_mentioning(const std::string& needle) {
    std::vector<std::string> found;
    const std::string self = std::to_string(getpid());
    for (const auto& e : fs::directory_iterator("/proc")) {
        const std::string pid = e.path().filename().string();
        if (pid.empty() || !std::isdigit(static_cast<unsigned char>(pid[0])) || pid == self) continue;
        std::string cmd = read_file(e.path().string() + "/cmdline");
        std::replace(cmd.begin(), cmd.end(), '\0', ' ');
        if (cmd.find(needle) != std::string::npos) found.push_back(pid + ": " + cmd);
    }
    return found;
}

// Writes DIR/NAME.yaml; each worker entry is "name: <ownership yaml>" with its socket in DIR/NAME/.
std::string write_cluster(const std::string& name, const std::vector<std::pair<std::string, std::string>>& workers,
                          const std::string& model = "") {
    const std::string dir = test_dir() + "/" + name;
    fs::create_directories(dir);
    std::ofstream f(dir + ".yaml");
    f << "model: " << (model.empty() ? model_path() : model) << "\nworkers:\n";
    for (const auto& [w, own] : workers)
        f << "  - name: " << w << "\n    address: unix:" << dir << "/" << w << ".sock\n    threads: 1\n    " << own
          << "\n";
    return dir + ".yaml";
}

bool skip_reason(std::string* why) {
    if (!fs::exists(worker_bin())) {
        *why = worker_bin() + " does not exist yet (build the moemesh-worker target)";
        return true;
    }
    return false;
}

void expect_same_output(const std::string& ref_json, const std::string& got_json) {
    auto ref = nlohmann::json::parse(ref_json);
    nlohmann::json got;
    ASSERT_NO_THROW(got = nlohmann::json::parse(got_json)) << "stdout is not exactly one JSON object:\n" << got_json;
    ASSERT_EQ(ref["greedy"], got["greedy"]);
    ASSERT_EQ(ref["positions"].size(), got["positions"].size());
    double worst = 0;
    for (size_t p = 0; p < ref["positions"].size(); ++p) {
        const auto& rt = ref["positions"][p]["top"];
        const auto& gt = got["positions"][p]["top"];
        ASSERT_EQ(rt.size(), gt.size()) << "position " << p;
        std::map<int, double> gp;
        for (const auto& e : gt) gp[e[0].get<int>()] = e[1].get<double>();
        for (const auto& e : rt) {
            auto it = gp.find(e[0].get<int>());
            ASSERT_NE(it, gp.end()) << "position " << p << ": token " << e[0] << " missing";
            worst = std::max(worst, std::fabs(it->second - e[1].get<double>()));
        }
    }
    EXPECT_LE(worst, 1e-6);
}

const std::string& reference_output() {
    static const std::string out = [] {
        std::string o;
        const std::string log = test_dir() + "/run.log";
        EXPECT_EQ(run_capture(moemesh::testing::moemesh_bin() + " run --model " + model_path() + kGenOpts, &o, log), 0)
            << read_file(log);
        return o;
    }();
    return out;
}

void check_cluster_matches_run(const std::string& name, const std::vector<std::pair<std::string, std::string>>& ws) {
    std::string why;
    if (skip_reason(&why)) GTEST_SKIP() << why;
    const std::string& ref = reference_output();
    ASSERT_FALSE(ref.empty());
    const std::string yaml = write_cluster(name, ws);
    const std::string log = test_dir() + "/" + name + ".launch.log";
    std::string out;
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = run_capture(moemesh::testing::moemesh_bin() + " launch " + yaml + kGenOpts, &out, log);
    ASSERT_EQ(rc, 0) << read_file(log);
    expect_same_output(ref, out);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
    const std::string err = read_file(log);
    for (const auto& [w, own] : ws) EXPECT_NE(err.find("worker '" + w + "' up on"), std::string::npos) << err;
    EXPECT_EQ(processes_mentioning(test_dir() + "/" + name + "/"), std::vector<std::string>{});
}

TEST(Launch, OneWorkerMatchesRun) { check_cluster_matches_run("one", {{"w0", "experts: \"0-15\""}}); }

TEST(Launch, TwoUnevenWorkersMatchRun) {
    check_cluster_matches_run("two", {{"w0", "experts: \"0-2\""}, {"w1", "experts: \"3-15\""}});
}

TEST(Launch, ThreeWorkersPerLayerRangesMatchRun) {
    check_cluster_matches_run("three", {{"a", "layers: {\"0-1\": \"0-4\", \"2-3\": \"0-9\"}"},
                                        {"b", "layers: {\"0-1\": \"5-15\", \"2-3\": \"10-12\"}"},
                                        {"c", "layers: {\"2-3\": \"13-15\"}"}});
}

TEST(Launch, ReplicasMatchRun) {
    check_cluster_matches_run("repl", {{"w0", "experts: \"0-7\"\n    replicas: {\"0-3\": \"8-11\"}"},
                                       {"w1", "experts: \"8-15\"\n    replicas: {\"0-1\": \"0-3\"}"}});
}

// A launcher run as a child process whose stdout and stderr go to files.
struct LauncherProcess {
    pid_t pid = -1;
    std::string out, err;
    LauncherProcess(const std::vector<std::string>& args, const std::string& prefix)
        : out(prefix + ".out"), err(prefix + ".err") {
        std::vector<std::string> argv = {moemesh::testing::moemesh_bin(), "launch"};
        argv.insert(argv.end(), args.begin(), args.end());
        std::vector<char*> cargv;
        for (auto& a : argv) cargv.push_back(a.data());
        cargv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        EXPECT_EQ(posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), environ), 0);
        posix_spawn_file_actions_destroy(&fa);
    }
    // Polls `cond` every 20 ms; false if the launcher exited first or time ran out.
    bool wait_for(const std::function<bool()>& cond, int timeout_ms) {
        for (int t = 0; t < timeout_ms; t += 20) {
            if (cond()) return true;
            int st;
            if (pid > 0 && waitpid(pid, &st, WNOHANG) == pid) {
                pid = -1;
                exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                return cond();
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        return false;
    }
    int wait_exit(int timeout_ms) {
        if (pid < 0) return exit_code;
        wait_for([] { return false; }, timeout_ms);
        return pid < 0 ? exit_code : -1;
    }
    ~LauncherProcess() {
        if (pid > 0) {
            kill(pid, SIGKILL);
            waitpid(pid, nullptr, 0);
        }
    }
    int exit_code = -1;
};

bool socket_accepts(const std::string& path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
    close(fd);
    return ok;
}

pid_t worker_pid(const std::string& sock) {
    auto ps = processes_mentioning("unix:" + sock);
    for (const std::string& p : ps)
        if (p.find("moemesh-worker") != std::string::npos) return std::stoi(p.substr(0, p.find(':')));
    return -1;
}

TEST(Launch, ServesUntilSigintRestartsKilledWorkerLeavesNoOrphans) {
    std::string why;
    if (skip_reason(&why)) GTEST_SKIP() << why;
    const std::string yaml = write_cluster("serve", {{"w0", "experts: \"0-7\""}, {"w1", "experts: \"8-15\""}});
    const std::string dir = test_dir() + "/serve";
    // A stale socket file (as a SIGKILLed worker leaves) must not stop the launch.
    {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        std::strncpy(sa.sun_path, (dir + "/w0.sock").c_str(), sizeof(sa.sun_path) - 1);
        ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
        close(fd);
    }
    LauncherProcess l({yaml, "--stop-timeout-ms", "3000"}, dir);
    ASSERT_TRUE(l.wait_for([&] { return read_file(l.out).find("cluster ready: 2 workers") != std::string::npos; },
                           20000))
        << read_file(l.err);
    EXPECT_TRUE(socket_accepts(dir + "/w0.sock"));
    EXPECT_TRUE(socket_accepts(dir + "/w1.sock"));

    // A worker killed while the cluster runs is restarted on the same socket.
    const pid_t old = worker_pid(dir + "/w1.sock");
    ASSERT_GT(old, 0);
    ASSERT_EQ(kill(old, SIGKILL), 0);
    ASSERT_TRUE(l.wait_for(
        [&] {
            const pid_t now = worker_pid(dir + "/w1.sock");
            return now > 0 && now != old && socket_accepts(dir + "/w1.sock");
        },
        10000))
        << read_file(l.err);
    const std::string err = read_file(l.err);
    EXPECT_NE(err.find("worker 'w1' was killed by signal 9"), std::string::npos) << err;
    EXPECT_NE(err.find("restarted worker 'w1'"), std::string::npos) << err;

    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(kill(l.pid, SIGINT), 0);
    EXPECT_EQ(l.wait_exit(8000), 130) << read_file(l.err);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
    EXPECT_EQ(processes_mentioning(dir + "/"), std::vector<std::string>{});
}

TEST(Launch, NoRestartLeavesADeadWorkerDown) {
    std::string why;
    if (skip_reason(&why)) GTEST_SKIP() << why;
    const std::string yaml = write_cluster("norestart", {{"w0", "experts: \"0-15\""}});
    const std::string dir = test_dir() + "/norestart";
    LauncherProcess l({yaml, "--no-restart"}, dir);
    ASSERT_TRUE(l.wait_for([&] { return read_file(l.out).find("cluster ready: 1 workers") != std::string::npos; }, 20000))
        << read_file(l.err);
    ASSERT_EQ(kill(worker_pid(dir + "/w0.sock"), SIGKILL), 0);
    // Serving without any worker left is pointless: the launcher says so and exits 1.
    EXPECT_EQ(l.wait_exit(8000), 1) << read_file(l.err);
    const std::string err = read_file(l.err);
    EXPECT_NE(err.find("worker 'w0' was killed by signal 9"), std::string::npos) << err;
    EXPECT_NE(err.find("not restarting it (--no-restart)"), std::string::npos) << err;
    EXPECT_EQ(processes_mentioning(dir + "/"), std::vector<std::string>{});
}

TEST(Launch, SigtermDuringGenerationStopsEverything) {
    std::string why;
    if (skip_reason(&why)) GTEST_SKIP() << why;
    const std::string yaml = write_cluster("term", {{"w0", "experts: \"0-15\""}});
    const std::string dir = test_dir() + "/term";
    // Long enough to still be generating when the signal comes.
    LauncherProcess l({yaml, "--tokens", kTokens, "-n", "100000", "--ctx", "200000", "--ignore-eos", "-t", "1"}, dir);
    ASSERT_TRUE(l.wait_for([&] { return read_file(l.err).find("all 1 local workers listening") != std::string::npos; },
                           20000))
        << read_file(l.err);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_EQ(kill(l.pid, SIGTERM), 0);
    EXPECT_EQ(l.wait_exit(8000), 143) << read_file(l.err);
    EXPECT_EQ(processes_mentioning(dir), std::vector<std::string>{});
}

TEST(Launch, WorkerThatCannotStartIsReported) {
    std::string why;
    if (skip_reason(&why)) GTEST_SKIP() << why;
    // The socket's directory is a regular file: the launcher starts the worker, which cannot bind.
    const std::string dir = test_dir() + "/bad";
    fs::create_directories(dir);
    { std::ofstream(dir + "/notadir") << "x"; }
    const std::string yaml = dir + "/cluster.yaml";
    {
        std::ofstream f(yaml);
        f << "model: " << model_path() << "\nworkers:\n"
          << "  - {name: ok, address: unix:" << dir << "/ok.sock, threads: 1, experts: \"0-7\"}\n"
          << "  - {name: broken, address: unix:" << dir << "/notadir/b.sock, threads: 1, experts: \"8-15\"}\n";
    }
    std::string out;
    const std::string log = dir + "/launch.log";
    EXPECT_EQ(run_capture(moemesh::testing::moemesh_bin() + " launch " + yaml + kGenOpts, &out, log), 1);
    const std::string err = read_file(log);
    // (How it ends, exit status 1 or a crash, is the worker's business; the launcher names it.)
    EXPECT_NE(err.find("error: worker 'broken' "), std::string::npos) << err;
    EXPECT_NE(err.find(" before it was listening on unix:" + dir + "/notadir/b.sock"), std::string::npos) << err;
    EXPECT_NE(err.find("  | "), std::string::npos) << "the tail of the worker's output:\n" << err;
    EXPECT_EQ(out, "");
    EXPECT_EQ(processes_mentioning(dir + "/"), std::vector<std::string>{});
}

TEST(Launch, BadFilesExit1WithAMessage) {
    const std::string dir = test_dir() + "/files";
    fs::create_directories(dir);
    std::string out;
    const std::string log = dir + "/launch.log";
    auto launch = [&](const std::string& yaml_text) {
        std::ofstream(dir + "/c.yaml") << yaml_text;
        return run_capture(moemesh::testing::moemesh_bin() + " launch " + dir + "/c.yaml --prompt hi", &out, log);
    };
    EXPECT_EQ(launch("workers: [\n"), 1);
    EXPECT_NE(read_file(log).find("error: "), std::string::npos) << read_file(log);
    EXPECT_NE(read_file(log).find("c.yaml"), std::string::npos) << read_file(log);

    EXPECT_EQ(launch("model: " + dir + "/missing.gguf\nworkers:\n  - {name: w, address: unix:" + dir +
                     "/w.sock, experts: \"0-15\"}\n"),
              1);
    EXPECT_NE(read_file(log).find("missing.gguf"), std::string::npos) << read_file(log);

    // Placement that leaves experts without an owner: refused before anything starts.
    EXPECT_EQ(launch("model: " + model_path() + "\nworkers:\n  - {name: w, address: unix:" + dir +
                     "/w.sock, experts: \"0-7\"}\n"),
              1);
    EXPECT_NE(read_file(log).find("error: "), std::string::npos) << read_file(log);
    EXPECT_FALSE(fs::exists(dir + "/w.sock"));
    EXPECT_EQ(out, "");
}

TEST(Launch, HelpShowsAnExample) {
    std::string out;
    ASSERT_EQ(run_capture(moemesh::testing::moemesh_bin() + " launch --help", &out), 0);
    EXPECT_NE(out.find("moemesh launch"), std::string::npos) << out;
    EXPECT_NE(out.find("--no-restart"), std::string::npos) << out;
    EXPECT_NE(out.find("--json"), std::string::npos) << out;
}

}  // namespace
}  // namespace moemesh
