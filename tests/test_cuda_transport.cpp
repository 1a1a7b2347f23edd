// GPU data planes end to end (issue 6 "Done means"): a coordinator on cuda:0 and two moemesh-worker
// processes, over cuda-ipc (same GPU) and over nccl (one GPU: each process gets its own
// NCCL_HOSTID, which makes NCCL take its network path, since one device cannot host two ranks
// otherwise). Output must equal the same cluster over `transport: unix` (activations in the gRPC
// messages, host staging: the same worker arithmetic), and its greedy tokens the single process's.
// Workers on the CPU stage the plane's rows through host memory; workers on cuda:0 (the plane's
// device) compute on the plane's device buffers in place (CudaExpertCompute::compute_device), which
// the workers' logs must say — and still match their own unix run, which computes through host memory.
// Each test skips with "no CUDA device: <reason>" where there is no GPU or driver.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <thread>

#include <nlohmann/json.hpp>

#include "coordinator/data_plane.h"
#include "coordinator/nccl_loader.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"
#include "worker/data_plane.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;
using nlohmann::json;

#define REQUIRE_CUDA()                                                                  \
    do {                                                                                \
        const char* why_ = "";                                                          \
        if (cuda::device_count(&why_) == 0) GTEST_SKIP() << "no CUDA device: " << why_; \
    } while (0)

constexpr const char* kTokens = "1,2,3";
constexpr int kN = 16;

// Beside the moemesh under test (MOEMESH_BIN): the build dir, or .cudarun/bin where scripts/gpu_pack.sh
// packs the binaries without the build tree.
std::string bin(const std::string& name) {
    const std::string m = moemesh_bin();
    const size_t slash = m.rfind('/');
    return (slash == std::string::npos ? std::string(".") : m.substr(0, slash)) + "/" + name;
}

// Same greedy tokens, same top ids, probabilities within tol. "" or what differs.
std::string compare(const json& ref, const json& got, double tol) {
    if (!got.contains("greedy")) return "no greedy tokens in " + got.dump().substr(0, 300);
    if (ref["greedy"] != got["greedy"]) return "greedy " + got["greedy"].dump() + " != " + ref["greedy"].dump();
    for (size_t p = 0; p < ref["positions"].size(); ++p) {
        const json& a = ref["positions"][p]["top"];
        const json& b = got["positions"][p]["top"];
        for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
            if (a[i][0] != b[i][0]) return "position " + std::to_string(p) + ": top ids differ";
            if (std::fabs(a[i][1].get<double>() - b[i][1].get<double>()) > tol)
                return "position " + std::to_string(p) + ": probabilities differ by more than " + std::to_string(tol);
        }
    }
    return "";
}

class CudaTransport : public ::testing::Test {
protected:
    void SetUp() override {
        REQUIRE_CUDA();
        dir_ = temp_dir("cuda_transport");
        model_ = dir_ + "/m.gguf";
        std::string out;
        ASSERT_EQ(run_capture(moemesh_bin() + " make-model --out " + model_ +
                                  " --layers 4 --hidden 128 --heads 4 --kv-heads 2 --head-dim 32 --experts 16"
                                  " --top-k 4 --vocab 800 --expert-ff 64 --seed 3",
                              &out, dir_ + "/make.err"),
                  0)
            << read_file(dir_ + "/make.err");
        sock_ = "/tmp/mmcut-" + std::to_string(getpid());
    }

    // Starts worker `name` with extra environment (NCCL_HOSTID), computing on `device` ("cpu",
    // "cuda:0"); returns false with the log.
    ::testing::AssertionResult start_worker(Child* c, const std::string& name, const std::vector<std::string>& env,
                                            const std::string& device, const std::vector<std::string>& flags = {}) {
        std::vector<std::string> argv = {"/usr/bin/env"};
        argv.insert(argv.end(), env.begin(), env.end());
        argv.insert(argv.end(), {bin("moemesh-worker"), "--model", model_, "--listen", "unix:" + sock_ + "-" + name,
                                 "--name", name, "--threads", "2", "--device", device});
        argv.insert(argv.end(), flags.begin(), flags.end());
        const std::string err = dir_ + "/" + name + ".err";
        if (!c->start(argv, err)) return ::testing::AssertionFailure() << "cannot start the worker";
        if (!wait_for_log(err, "listening on ", 30))
            return ::testing::AssertionFailure() << "worker " << name << " did not start: " << read_file(err);
        return ::testing::AssertionSuccess();
    }

    std::string yaml(const std::string& transport) {
        std::string y = "model: " + model_ + "\ncoordinator: {device: cuda:0, timeout_ms: 20000, data_plane_rows: 64}\n"
                        "workers:\n";
        const char* shards[2] = {"experts: \"0-9\"", "experts: \"10-15\""};
        for (int i = 0; i < 2; ++i) {
            const std::string n = i ? "b" : "a";
            y += "  - name: " + n + "\n    address: unix:" + sock_ + "-" + n + "\n    device: " + yaml_worker_device_ +
                 "\n    transport: " +
                 transport + "\n    " + shards[i] + "\n";
        }
        const std::string p = dir_ + "/" + transport + ".yaml";
        FILE* f = std::fopen(p.c_str(), "w");
        std::fputs(y.c_str(), f);
        std::fclose(f);
        return p;
    }

    // One `moemesh run` (a single process when cluster is empty); its JSON line and stderr.
    json run(const std::string& cluster, const std::vector<std::string>& env, std::string* err) {
        std::vector<std::string> argv = {"/usr/bin/env"};
        argv.insert(argv.end(), env.begin(), env.end());
        argv.insert(argv.end(), {moemesh_bin(), "run", "--device", "cuda:0", "--tokens", kTokens, "--top", "5",
                                 "--json", "-n", std::to_string(kN), "--kv-type", "f32", "--threads", "2"});
        if (cluster.empty()) argv.insert(argv.end(), {"--model", model_});
        else argv.insert(argv.end(), {"--cluster", cluster});
        Child c;
        const std::string err_path = dir_ + "/run-" + std::to_string(++runs_) + ".err";
        EXPECT_TRUE(c.start(argv, err_path, true));
        c.close_stdin();
        auto line = c.read_line(120);
        c.wait_exit(line ? 30 : 0.5);
        *err = read_file(err_path);
        if (!line) return json();
        try {
            return json::parse(*line);
        } catch (...) {
            return json();
        }
    }

    // worker_device: where both workers compute ("cpu": the plane's rows staged through host memory;
    // "cuda:0": in place on the plane's device buffers).
    void check_transport(const std::string& transport, const std::vector<std::string>& env_a,
                         const std::vector<std::string>& env_b, const std::vector<std::string>& env_coord,
                         const std::string& worker_device) {
        Child a, b;
        ASSERT_TRUE(start_worker(&a, "a", env_a, worker_device));
        ASSERT_TRUE(start_worker(&b, "b", env_b, worker_device));
        std::string err;
        const json single = run("", {}, &err);
        ASSERT_TRUE(single.contains("greedy")) << err;
        const json staged = run(yaml("unix"), {}, &err);
        ASSERT_TRUE(staged.contains("greedy")) << err;
        const json oob = run(yaml(transport), env_coord, &err);
        ASSERT_TRUE(oob.contains("greedy")) << err << "\nworker a:\n" << read_file(dir_ + "/a.err");
        EXPECT_NE(err.find("over " + transport), std::string::npos) << err;
        EXPECT_EQ(compare(staged, oob, 1e-6), "") << err;
        EXPECT_EQ(single["greedy"], oob["greedy"]) << err;
        // cuda-ipc with the workers on another GPU than the coordinator's region: staged (the reason
        // follows); nccl there: in place (NCCL moves the rows to the worker's device).
        const bool other_gpu = worker_device != "cpu" && worker_device != "cuda:0" && transport == "cuda-ipc";
        const std::string how = worker_device == "cpu"
                                    ? ", staged through host memory: this worker computes on the CPU\n"
                                : other_gpu ? ", staged through host memory: "
                                            : ", in place on " + worker_device + "\n";
        for (const char* w : {"a", "b"}) {
            const std::string log = read_file(dir_ + "/" + w + ".err");
            EXPECT_NE(log.find("data plane " + transport + " from "), std::string::npos) << log;
            EXPECT_NE(log.find(" rows x 128" + how), std::string::npos) << "worker " << w << ":\n" << log;
        }
    }

    // A worker SIGKILLed in the middle of a request over `transport` (coordinator and workers on
    // cuda:0): the request fails with an error naming the worker within the timeout, no hang; the
    // worker restarted on its address is reconnected to (a new data plane) and the next request
    // gives the first one's tokens again.
    void check_kill(const std::string& transport, const std::vector<std::string>& env_a,
                    const std::vector<std::string>& env_b, const std::vector<std::string>& env_coord) {
        Child a, b;
        ASSERT_TRUE(start_worker(&a, "a", env_a, "cuda:0"));
        ASSERT_TRUE(start_worker(&b, "b", env_b, "cuda:0"));
        const int timeout_ms = 5000, n_long = 120;
        std::vector<std::string> argv = {"/usr/bin/env"};
        argv.insert(argv.end(), env_coord.begin(), env_coord.end());
        argv.insert(argv.end(), {moemesh_bin(), "run", "--device", "cuda:0", "--cluster", yaml(transport), "--stdin",
                                 "--json", "-n", std::to_string(n_long), "--kv-type", "f32", "--threads", "2",
                                 "--timeout-ms", std::to_string(timeout_ms)});
        Child coord;
        const std::string log_path = dir_ + "/coord-kill.err";
        ASSERT_TRUE(coord.start(argv, log_path, true));
        const auto t0 = std::chrono::steady_clock::now();
        ASSERT_TRUE(coord.write_line(kTokens));
        auto first = coord.read_line(120);
        ASSERT_TRUE(first) << read_file(log_path);
        const double one_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        ASSERT_TRUE(json::parse(*first).contains("greedy")) << *first;

        ASSERT_TRUE(coord.write_line(kTokens));
        std::this_thread::sleep_for(std::chrono::duration<double>(one_s / 3));
        b.signal_it(SIGKILL);
        const auto killed = std::chrono::steady_clock::now();
        auto line = coord.read_line(timeout_ms / 1000.0 + 60);
        ASSERT_TRUE(line) << "no answer after the kill (hang?)\n" << read_file(log_path);
        json j = json::parse(*line);
        if (!j.contains("error")) {  // the request won the race with the kill: the next one fails
            ASSERT_TRUE(coord.write_line(kTokens));
            line = coord.read_line(timeout_ms / 1000.0 + 60);
            ASSERT_TRUE(line) << "no answer after the kill (hang?)\n" << read_file(log_path);
            j = json::parse(*line);
        }
        const double noticed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
        ASSERT_TRUE(j.contains("error")) << *line;
        const std::string msg = j["error"];
        EXPECT_NE(msg.find("'b'"), std::string::npos) << msg;
        EXPECT_LT(noticed_s, timeout_ms / 1000.0 + 5) << msg;
        std::printf("[cuda-transport] %s: worker b killed, noticed after %.2f s: %s\n", transport.c_str(), noticed_s,
                    msg.c_str());

        Child b2;
        ASSERT_TRUE(start_worker(&b2, "b", env_b, "cuda:0"));
        std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // one reconnect attempt a second
        ASSERT_TRUE(coord.write_line(kTokens));
        line = coord.read_line(120);
        ASSERT_TRUE(line) << read_file(log_path);
        const json again = json::parse(*line);
        ASSERT_TRUE(again.contains("greedy")) << *line << "\n" << read_file(log_path);
        EXPECT_EQ(again["greedy"], json::parse(*first)["greedy"]);
        EXPECT_NE(read_file(log_path).find("reconnected to worker 'b'"), std::string::npos) << read_file(log_path);
        EXPECT_NE(read_file(dir_ + "/b.err").find("data plane " + transport + " from "), std::string::npos);
        coord.close_stdin();
        coord.wait_exit(30);
    }

    static std::vector<std::string> nccl_env(const char* host_id) {
        return {"NCCL_SOCKET_IFNAME=lo", "NCCL_IB_DISABLE=1", std::string("NCCL_HOSTID=") + host_id};
    }

    std::string dir_, model_, sock_;
    std::string yaml_worker_device_ = "cuda:0";  // the workers' `device:` in the YAML
    int runs_ = 0;
};

// `moemesh-worker --device cuda:0 --device-budget auto` (no cache: entry in the YAML): the shard
// served from a VRAM cache as large as the GPU's free memory less 512 MiB allows (here the whole
// small shard), with the single process's tokens (prompt MoE grouped in both, as the cache computes it).
TEST_F(CudaTransport, WorkersWithDeviceBudgetAutoServeFromAVramCache) {
    Child a, b;
    ASSERT_TRUE(start_worker(&a, "a", {}, "cuda:0", {"--device-budget", "auto"}));
    ASSERT_TRUE(start_worker(&b, "b", {}, "cuda:0", {"--device-budget", "auto"}));
    std::string err;
    const json single = run("", {"MOEMESH_CUDA_PROMPT_PAIRS=0"}, &err);
    ASSERT_TRUE(single.contains("greedy")) << err;
    const json served = run(yaml("unix"), {}, &err);
    ASSERT_TRUE(served.contains("greedy")) << err << "\nworker a:\n" << read_file(dir_ + "/a.err");
    EXPECT_EQ(single["greedy"], served["greedy"]) << err;
    for (const char* w : {"a", "b"}) {
        const std::string log = read_file(dir_ + "/" + w + ".err");
        EXPECT_NE(log.find("from a VRAM cache (the worker's flags)"), std::string::npos) << log;
        EXPECT_NE(log.find("vram cuda:0: arena "), std::string::npos) << log;
    }
}

TEST_F(CudaTransport, CudaIpcTwoWorkersOneGpuMatchesStagedAndSingleProcess) {
    check_transport("cuda-ipc", {}, {}, {}, "cpu");
}

TEST_F(CudaTransport, NcclTwoWorkersOneGpuWithDistinctHostIdsMatches) {
#if defined(MM_CUDA_EMULATION) && !defined(MOEMESH_HAVE_NCCL)
    GTEST_SKIP() << "built without nccl.h: the CUDA emulator's NCCL is not built";
#endif
    check_transport("nccl", nccl_env("moemesh-a"), nccl_env("moemesh-b"), nccl_env("moemesh-coordinator"), "cpu");
}

// Workers computing on cuda:0, the device of the coordinator's region: in place, no host copies.
TEST_F(CudaTransport, CudaIpcWorkersOnTheGpuComputeInPlace) {
    check_transport("cuda-ipc", {}, {}, {}, "cuda:0");
}

// Workers computing on cuda:0, where their receive/send buffers are: recv → compute → send on one stream.
TEST_F(CudaTransport, NcclWorkersOnTheGpuComputeInPlace) {
#if defined(MM_CUDA_EMULATION) && !defined(MOEMESH_HAVE_NCCL)
    GTEST_SKIP() << "built without nccl.h: the CUDA emulator's NCCL is not built";
#endif
    check_transport("nccl", nccl_env("moemesh-a"), nccl_env("moemesh-b"), nccl_env("moemesh-coordinator"), "cuda:0");
}

// Two GPUs (the desktop with two cards): the coordinator on cuda:0, both workers on cuda:1.
TEST_F(CudaTransport, CudaIpcWorkersOnTheSecondGpu) {
    if (cuda::device_count() < 2) GTEST_SKIP() << "one CUDA device";
    yaml_worker_device_ = "cuda:1";
    check_transport("cuda-ipc", {}, {}, {}, "cuda:1");
}

TEST_F(CudaTransport, NcclWorkersOnTheSecondGpu) {
#if defined(MM_CUDA_EMULATION) && !defined(MOEMESH_HAVE_NCCL)
    GTEST_SKIP() << "built without nccl.h: the CUDA emulator's NCCL is not built";
#endif
    if (cuda::device_count() < 2) GTEST_SKIP() << "one CUDA device";
    yaml_worker_device_ = "cuda:1";
    check_transport("nccl", nccl_env("moemesh-a"), nccl_env("moemesh-b"), nccl_env("moemesh-coordinator"), "cuda:1");
}

TEST_F(CudaTransport, CudaIpcWorkerKilledMidRequestIsReportedAndReconnected) { check_kill("cuda-ipc", {}, {}, {}); }

TEST_F(CudaTransport, NcclWorkerKilledMidRequestIsReportedAndReconnected) {
#if defined(MM_CUDA_EMULATION) && !defined(MOEMESH_HAVE_NCCL)
    GTEST_SKIP() << "built without nccl.h: the CUDA emulator's NCCL is not built";
#endif
    check_kill("nccl", nccl_env("moemesh-a"), nccl_env("moemesh-b"), nccl_env("moemesh-coordinator"));
}

// NCCL is loaded at run time, not linked: nccl is available exactly where libnccl.so.2 loads, and
// where it does not (the packed GPU binaries on a machine without NCCL) both ends refuse it, naming
// the library and why. Needs no device: runs everywhere, on whichever side this machine is.
TEST(NcclLoader, TransportNcclIsAvailableExactlyWhenLibncclLoads) {
#ifndef MOEMESH_HAVE_NCCL
    GTEST_SKIP() << "built without nccl.h: transport nccl is not compiled in";
#else
    std::string why;
    const NcclApi* api = nccl_api(&why);
    const std::string unavailable = LinkDataPlane::unavailable(Transport::kNccl);
    if (api) {
        EXPECT_EQ(why, "");
        EXPECT_EQ(unavailable, "");
        for (const void* fn : {(const void*)api->GetErrorString, (const void*)api->GetUniqueId,
                               (const void*)api->CommInitRank, (const void*)api->CommInitRankConfig,
                               (const void*)api->CommGetAsyncError, (const void*)api->CommAbort,
                               (const void*)api->Send, (const void*)api->Recv})
            EXPECT_NE(fn, nullptr);
        EXPECT_STREQ(api->GetErrorString(ncclSuccess), "no error");
        EXPECT_EQ(nccl_api(), api);  // loaded once
        return;
    }
    EXPECT_NE(why.find("libnccl.so.2"), std::string::npos) << why;
    EXPECT_EQ(unavailable, "transport nccl: " + why);
    EXPECT_EQ(LinkDataPlane::create(Transport::kNccl, 4, 8, 0, 0, "t").status().message(), unavailable);
    // The worker's end refuses a well-formed offer with the same reason.
    v1::DataPlaneOffer o;
    o.set_kind(v1::DATA_PLANE_NCCL);
    o.set_max_rows(4);
    o.set_hidden(8);
    o.set_nccl_unique_id(std::string(128, '\0'));
    o.set_worker_device(0);
    v1::DataPlaneAnswer a;
    EXPECT_EQ(answer_data_plane_offer(o, 8, &a), nullptr);
    EXPECT_FALSE(a.accepted());
    EXPECT_EQ(a.reason(), "data plane nccl: " + why);
#endif
}

}  // namespace
}  // namespace moemesh
