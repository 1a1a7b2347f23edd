// Workers on cuda:N (worker/cuda_expert_compute.h, worker/cuda_tier_memory.h) on a GPU:
//  - CudaExpertCompute against the CPU ExpertCompute on generated qwen3moe files (f32: within 1e-4 of
//    the largest output; q8_0 / q4_k: relative L2 error within 3e-2, the CPU quantizing activations
//    and the GPU not), for decode (1 row) and prompt (37 rows, uneven pairs per row) calls;
//  - resident vs cache with device budgets of 100%, 10% and one expert, every policy (static with a
//    profile), a pinned host tier below, next-layer prefetch: outputs bitwise equal to resident; the
//    tier's accounting never above its budget; no transient buffers (pins go in windows);
//  - compute (host pointers) vs compute_device (device pointers, own stream and a caller's stream):
//    bitwise equal;
//  - errors: expert not in the shard, bad row, a budget larger than the device (names the device,
//    the bytes and the CUDA error);
//  - `moemesh run --device cuda:0 --device-budget B` (coordinator on the GPU, experts from the VRAM
//    cache, device pointers): greedy tokens identical to the resident GPU run for budgets of 50% and
//    10%, and top-1 equal to the CPU run on f32 weights.
// Skips with "no CUDA device: <reason>" where there is no GPU. Prints "[cuda-experts] ..." lines.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/placement.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/test_util.h"
#include "tools/make_model.h"
#include "worker/cuda_expert_compute.h"
#include "worker/cuda_tier_memory.h"
#include "worker/expert_executor.h"

namespace moemesh {
namespace {

#define REQUIRE_CUDA()                                                                  \
    do {                                                                                \
        const char* why_ = "";                                                          \
        if (cuda::device_count(&why_) == 0) GTEST_SKIP() << "no CUDA device: " << why_; \
    } while (0)

constexpr int kLayers = 2, kExperts = 8, kTopK = 2;

std::string model(const std::string& type) {
    static std::map<std::string, std::string> made;
    if (made.count(type)) return made[type];
    MakeModelOptions o;
    o.arch = "qwen3moe";
    o.layers = kLayers;
    o.hidden = 256;
    o.experts = kExperts;
    o.top_k = kTopK;
    o.expert_ff = 256;  // Q4_K rows need k % 256 == 0 (down: k = expert_ff)
    o.type = type;
    o.seed = 21;
    o.out = testing::temp_dir("cuda_experts") + "/moe_" + type + ".gguf";
    std::ostringstream log;
    Status st = make_model(o, log);
    EXPECT_TRUE(st.ok()) << st.message();
    return made[type] = o.out;
}

struct Opened {
    std::unique_ptr<GgufFile> file;
    ModelConfig cfg;
};
Opened open(const std::string& path) {
    Opened m;
    auto f = GgufFile::open(path);
    EXPECT_TRUE(f.ok()) << f.status().message();
    m.file = std::move(f).value();
    auto c = load_model_config(*m.file);
    EXPECT_TRUE(c.ok()) << c.status().message();
    m.cfg = c.value();
    return m;
}

struct Call {
    int layer = 0;
    int64_t n_rows = 0;
    std::vector<float> x;
    std::vector<int32_t> rows, experts;
    std::vector<float> weights;
    int64_t n_pairs() const { return static_cast<int64_t>(rows.size()); }
};

// Decode: one row, K distinct experts. Prompt: n rows with 1..K+1 pairs each (uneven), repeats allowed.
std::vector<Call> calls(const ModelConfig& c, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0, 1);
    std::vector<Call> out;
    for (int layer = 0; layer < c.n_layer; ++layer) {
        for (int64_t n_rows : {int64_t{1}, int64_t{37}}) {
            Call k;
            k.layer = layer;
            k.n_rows = n_rows;
            k.x.resize(static_cast<size_t>(n_rows * c.n_embd));
            for (auto& v : k.x) v = nd(rng);
            for (int64_t r = 0; r < n_rows; ++r) {
                const int np = n_rows == 1 ? kTopK : 1 + static_cast<int>(rng() % (kTopK + 1));
                std::vector<int> used;
                for (int j = 0; j < np; ++j) {
                    int e = static_cast<int>(rng() % kExperts);
                    if (n_rows == 1)
                        while (std::count(used.begin(), used.end(), e)) e = (e + 1) % kExperts;
                    used.push_back(e);
                    k.rows.push_back(static_cast<int32_t>(r));
                    k.experts.push_back(e);
                    k.weights.push_back(0.05f + static_cast<float>(rng() % 100) / 100.0f);
                }
            }
            out.push_back(std::move(k));
        }
    }
    return out;
}

std::vector<std::vector<float>> cpu_reference(const Opened& m, const std::vector<Call>& cs) {
    auto tables = map_expert_tables(*m.file, m.cfg);
    EXPECT_TRUE(tables.ok()) << tables.status().message();
    ThreadPool pool(2);
    ExpertCompute ec(m.cfg, pool, tables.value());
    std::vector<std::vector<float>> out;
    for (const Call& k : cs) {
        std::vector<float> y(k.x.size());
        Status st = ec.compute(k.layer, k.x.data(), k.n_rows, k.rows.data(), k.experts.data(), k.weights.data(),
                               k.n_pairs(), y.data());
        EXPECT_TRUE(st.ok()) << st.message();
        out.push_back(std::move(y));
    }
    return out;
}

std::vector<std::vector<float>> gpu_run(CudaExpertCompute& g, const std::vector<Call>& cs) {
    std::vector<std::vector<float>> out;
    for (const Call& k : cs) {
        std::vector<float> y(k.x.size(), NAN);
        Status st = g.compute(k.layer, k.x.data(), k.n_rows, k.rows.data(), k.experts.data(), k.weights.data(),
                              k.n_pairs(), y.data());
        EXPECT_TRUE(st.ok()) << st.message();
        out.push_back(std::move(y));
    }
    return out;
}

void expect_close(const std::vector<std::vector<float>>& ref, const std::vector<std::vector<float>>& got,
                  bool quantized, const std::string& what) {
    ASSERT_EQ(ref.size(), got.size());
    double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        double mx = 0, d = 0, num = 0, den = 0;
        for (size_t j = 0; j < ref[i].size(); ++j) {
            mx = std::max(mx, std::fabs(static_cast<double>(ref[i][j])));
            const double e = static_cast<double>(got[i][j]) - ref[i][j];
            d = std::max(d, std::fabs(e));
            num += e * e;
            den += static_cast<double>(ref[i][j]) * ref[i][j];
            ASSERT_TRUE(std::isfinite(got[i][j])) << what << " call " << i << " at " << j;
        }
        const double err = quantized ? std::sqrt(num / std::max(den, 1e-30)) : d / std::max(mx, 1.0);
        worst = std::max(worst, err);
        EXPECT_LT(err, quantized ? 3e-2 : 1e-4) << what << " call " << i;
    }
    std::printf("[cuda-experts] %-40s vs CPU: worst %s %.2e\n", what.c_str(), quantized ? "rel L2" : "max|d|/max", worst);
}

void expect_bitwise(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
                    const std::string& what) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
        ASSERT_EQ(a[i].size(), b[i].size());
        EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), sizeof(float) * a[i].size()), 0) << what << " call " << i;
    }
}

uint64_t one_expert_budget(const Opened& m) {
    auto r = FileExpertReader::open(*m.file, m.cfg);
    EXPECT_TRUE(r.ok());
    uint64_t mx = 0;
    for (auto& l : r.value()->layouts()) mx = std::max(mx, l.size);
    // The cache refuses a budget below one page-rounded entry (its creation check).
    return std::max<uint64_t>(ArenaAllocator::round(mx), (mx + 4095) / 4096 * 4096) + kCacheEntryOverhead;
}
uint64_t all_experts_budget(const Opened& m) {
    auto r = FileExpertReader::open(*m.file, m.cfg);
    EXPECT_TRUE(r.ok());
    uint64_t t = 0;
    for (auto& l : r.value()->layouts()) t += kExperts * (ArenaAllocator::round(l.size) + kCacheEntryOverhead);
    return t;
}

ExpertProfile profile_for(const ModelConfig& c) {
    ExpertProfile p;
    p.n_layer = static_cast<int>(c.n_layer);
    p.n_expert = static_cast<int>(c.n_expert);
    p.tokens = 100;
    for (int l = 0; l < p.n_layer; ++l) {
        std::vector<uint64_t> v(static_cast<size_t>(p.n_expert));
        for (int e = 0; e < p.n_expert; ++e) v[e] = static_cast<uint64_t>((e * 7 + l * 3) % 11 + 1);
        p.counts.push_back(v);
    }
    return p;
}

void check_type(const std::string& type) {
    const Opened m = open(model(type));
    const bool quantized = type != "f32";
    const std::vector<Call> cs = calls(m.cfg, 17);
    const auto ref = cpu_reference(m, cs);

    auto res = CudaExpertCompute::create(*m.file, m.cfg, {}, 0, nullptr);
    ASSERT_TRUE(res.ok()) << res.status().message();
    CudaExpertCompute& resident = *res.value();
    EXPECT_EQ(resident.cache(), nullptr);
    EXPECT_NE(resident.stats_line().find("resident"), std::string::npos) << resident.stats_line();
    const auto base = gpu_run(resident, cs);
    expect_close(ref, base, quantized, type + " resident");

    // compute_device on the own stream and on a caller's stream: bitwise as compute.
    {
        cudaStream_t s = nullptr;
        ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
        for (void* stream : {static_cast<void*>(nullptr), static_cast<void*>(s)}) {
            std::vector<std::vector<float>> dev;
            for (const Call& k : cs) {
                float *dx = nullptr, *dy = nullptr;
                const size_t b = sizeof(float) * k.x.size();
                ASSERT_EQ(cudaMalloc(&dx, b), cudaSuccess);
                ASSERT_EQ(cudaMalloc(&dy, b), cudaSuccess);
                ASSERT_EQ(cudaMemcpy(dx, k.x.data(), b, cudaMemcpyHostToDevice), cudaSuccess);
                Status st = resident.compute_device(k.layer, dx, k.n_rows, k.rows.data(), k.experts.data(),
                                                    k.weights.data(), k.n_pairs(), dy, stream);
                EXPECT_TRUE(st.ok()) << st.message();
                std::vector<float> y(k.x.size());
                ASSERT_EQ(cudaMemcpy(y.data(), dy, b, cudaMemcpyDeviceToHost), cudaSuccess);
                cudaFree(dx);
                cudaFree(dy);
                dev.push_back(std::move(y));
            }
            expect_bitwise(base, dev, type + (stream ? " compute_device (caller's stream)" : " compute_device"));
        }
        cudaStreamDestroy(s);
    }

    const uint64_t one = one_expert_budget(m), all = all_experts_budget(m);
    struct Case {
        const char* name;
        uint64_t device, host;
        CachePolicy policy;
        PrefetchMode prefetch;
    };
    std::vector<Case> cases;
    for (CachePolicy p : {CachePolicy::kLru, CachePolicy::kLfu, CachePolicy::kStatic}) {
        cases.push_back({"100%", all, 0, p, PrefetchMode::kNone});
        cases.push_back({"10%", std::max(one, all / 10), 0, p, PrefetchMode::kNone});
        cases.push_back({"one expert", one, 0, p, PrefetchMode::kNone});
    }
    // A hot set of 6 with room for 2: a 37-row call touches all 8 experts of a layer, so a pin window
    // wider than the room (hot set read as 0 after reset_counters) needs transient buffers.
    cases.push_back({"50%", all / 2, 0, CachePolicy::kStatic, PrefetchMode::kNone});
    cases.push_back({"10% + pinned host 50%", std::max(one, all / 10), all / 2, CachePolicy::kLru, PrefetchMode::kNone});
    cases.push_back({"one expert + pinned host", one, all, CachePolicy::kLfu, PrefetchMode::kNone});
    cases.push_back({"10% next-layer prefetch", std::max(one, all / 10), 0, CachePolicy::kLru, PrefetchMode::kNextLayer});
    cases.push_back({"auto device budget, host 50%", 0, all / 2, CachePolicy::kLru, PrefetchMode::kNone});
    for (const Case& k : cases) {
        if (k.policy == CachePolicy::kStatic && k.device == one) continue;  // no room for a hot set
        CacheOptions co;
        co.device_bytes = k.device;
        co.host_bytes = k.host;
        co.policy = k.policy;
        co.prefetch = k.prefetch;
        if (k.policy == CachePolicy::kStatic) co.profile = profile_for(m.cfg);
        const std::string what = type + " cache " + k.name + " " + cache_policy_name(k.policy);
        auto g = CudaExpertCompute::create(*m.file, m.cfg, {}, 0, &co);
        ASSERT_TRUE(g.ok()) << what << ": " << g.status().message();
        ASSERT_NE(g.value()->cache(), nullptr);
        if (k.policy == CachePolicy::kStatic && k.device >= all / 2) {
            EXPECT_GT(g.value()->cache()->hot_set_bytes(), 0u) << what << ": no hot set loaded";
        }
        // As `moemesh run` does after warm-up: the pin window must not depend on the tier's counters.
        g.value()->cache()->reset_counters();
        for (int rep = 0; rep < 2; ++rep) {  // the second pass hits what the first one loaded
            const auto got = gpu_run(*g.value(), cs);
            expect_bitwise(base, got, what);
        }
        const TierStats dt = g.value()->cache()->device().stats();
        if (dt.budget) {
            EXPECT_LE(dt.peak_used, dt.budget) << what;
        }
        EXPECT_EQ(dt.transient, 0u) << what;
        EXPECT_EQ(dt.errors, 0u) << what;
        if (k.prefetch == PrefetchMode::kNextLayer) {  // decode calls of layer 0 predict layer 1
            EXPECT_EQ(g.value()->stats_line().find(" of 0 predicted"), std::string::npos)
                << what << ": no prefetch was predicted: " << g.value()->stats_line();
        }
        std::printf("[cuda-experts] %-40s %s\n", what.c_str(), g.value()->stats_line().c_str());
    }
}

TEST(CudaExperts, F32) {
    REQUIRE_CUDA();
    check_type("f32");
}
TEST(CudaExperts, Q8_0) {
    REQUIRE_CUDA();
    check_type("q8_0");
}
TEST(CudaExperts, Q4_K) {
    REQUIRE_CUDA();
    check_type("q4_k");
}

TEST(CudaExperts, ShardAndErrors) {
    REQUIRE_CUDA();
    const Opened m = open(model("q8_0"));
    const std::vector<std::vector<int>> shard = {{1, 3}, {0, 5, 7}};
    for (bool cached : {false, true}) {
        CacheOptions co;
        co.device_bytes = one_expert_budget(m) * 2;
        auto g = CudaExpertCompute::create(*m.file, m.cfg, shard, 0, cached ? &co : nullptr);
        ASSERT_TRUE(g.ok()) << g.status().message();
        EXPECT_TRUE(g.value()->holds(0, 3));
        EXPECT_FALSE(g.value()->holds(0, 2));
        EXPECT_FALSE(g.value()->holds(2, 0));
        std::vector<float> x(256, 0.5f), y(256);
        const int32_t row0 = 0, row_bad = 1, e3 = 3, e2 = 2;
        const float w = 1.0f;
        EXPECT_TRUE(g.value()->compute(0, x.data(), 1, &row0, &e3, &w, 1, y.data()).ok());
        Status st = g.value()->compute(0, x.data(), 1, &row0, &e2, &w, 1, y.data());
        ASSERT_FALSE(st.ok());
        EXPECT_NE(st.message().find("layer 0: expert 2 is not held"), std::string::npos) << st.message();
        st = g.value()->compute(0, x.data(), 1, &row_bad, &e3, &w, 1, y.data());
        ASSERT_FALSE(st.ok());
        EXPECT_NE(st.message().find("pair 0 names row 1 of 1"), std::string::npos) << st.message();
        st = g.value()->compute(5, x.data(), 1, &row0, &e3, &w, 1, y.data());
        ASSERT_FALSE(st.ok());
        // zero pairs: out cleared
        std::fill(y.begin(), y.end(), 9.0f);
        ASSERT_TRUE(g.value()->compute(1, x.data(), 1, nullptr, nullptr, nullptr, 0, y.data()).ok());
        EXPECT_EQ(*std::max_element(y.begin(), y.end()), 0.0f);
    }
    CacheOptions huge;
    huge.device_bytes = uint64_t{1} << 50;  // 1 PiB
    auto g = CudaExpertCompute::create(*m.file, m.cfg, {}, 0, &huge);
    ASSERT_FALSE(g.ok());
    EXPECT_NE(g.status().message().find("cuda:0: cannot allocate the device cache tier"), std::string::npos)
        << g.status().message();
    auto bad = CudaExpertCompute::create(*m.file, m.cfg, {}, 999, nullptr);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("cuda:999"), std::string::npos) << bad.status().message();
}

// ---- one process: coordinator on the GPU, experts from the VRAM cache ----------------------------------

struct RunOut {
    std::vector<int> top1;   // most likely next token per prompt position
    std::vector<int> greedy;
    std::string err;
};

RunOut moemesh_run(const std::string& path, const std::string& device, const std::string& budget,
                   const std::string& tokens) {
    RunOut r;
    const std::string dir = testing::temp_dir("cuda_experts");
    // The prompt's MoE in the grouped form (one product per expert) on a resident GPU too, as the expert
    // cache computes it: short prompts would otherwise take moe_pairs' int8-X GEMVs there, other
    // arithmetic, and a near-tie among the 24 positions could go either way (one did on an H200).
    std::string cmd = "MOEMESH_CUDA_PROMPT_PAIRS=0 " + testing::moemesh_bin() + " run -m " + path + " --device " +
                      device + " --tokens " + tokens + " -n 24 --json --top 1 --kv-type f32 -t 2";
    if (!budget.empty()) cmd += " --device-budget " + budget;
    std::string out;
    const int rc = testing::run_capture(cmd, &out, dir + "/run_err.txt");
    r.err = testing::read_file(dir + "/run_err.txt");
    EXPECT_EQ(rc, 0) << cmd << "\n" << r.err;
    auto j = nlohmann::json::parse(out, nullptr, false);
    if (j.is_discarded() || !j.contains("positions")) {
        ADD_FAILURE() << cmd << " printed no JSON: " << out.substr(0, 300) << "\n" << r.err;
        return r;
    }
    for (auto& p : j["positions"]) r.top1.push_back(p["top"][0][0].get<int>());
    r.greedy = j["greedy"].get<std::vector<int>>();
    return r;
}

// The runs' 24-token prompt ("1,2,…" for --tokens).
std::string prompt_tokens() {
    std::mt19937 rng(9);
    std::string tokens;
    for (int i = 0; i < 24; ++i) tokens += (i ? "," : "") + std::to_string(rng() % kDefaultBuiltinVocab);
    return tokens;
}

TEST(CudaExperts, OffloadRunMatchesResidentGpuAndCpu) {
    REQUIRE_CUDA();
    for (const std::string type : {"f32", "q8_0"}) {
        const std::string path = model(type);
        const Opened m = open(path);
        const std::string tokens = prompt_tokens();
        const RunOut resident = moemesh_run(path, "cuda:0", "", tokens);
        const RunOut cpu = moemesh_run(path, "cpu", "", tokens);
        const uint64_t all = all_experts_budget(m);
        for (double frac : {0.5, 0.1}) {
            const uint64_t b = std::max(one_expert_budget(m), static_cast<uint64_t>(static_cast<double>(all) * frac));
            const RunOut off = moemesh_run(path, "cuda:0", std::to_string(b), tokens);
            std::printf("[cuda-experts] run %s --device-budget %.0f%%: greedy %s resident GPU; %s\n", type.c_str(),
                        frac * 100, off.greedy == resident.greedy ? "==" : "!=",
                        off.err.substr(off.err.find("cache:") == std::string::npos ? 0 : off.err.find("cache:")).c_str());
            EXPECT_EQ(off.greedy, resident.greedy) << type << " budget " << frac;
            EXPECT_EQ(off.top1, resident.top1) << type << " budget " << frac;
            EXPECT_NE(off.err.find("in VRAM"), std::string::npos) << off.err;
            if (type == "f32") {
                EXPECT_EQ(off.top1, cpu.top1) << type << " budget " << frac;
            }
        }
    }
}

// `--device-budget auto`: the cache takes the VRAM that the dense weights, the KV cache at --ctx and
// 512 MiB of scratch leave (here all the tiny model's experts: the resident GPU's tokens); a --ctx
// whose KV cache alone exceeds the device is refused naming it; on the CPU, auto is refused.
TEST(CudaExperts, DeviceBudgetAutoLeavesRoomForTheKvCache) {
    REQUIRE_CUDA();
    const std::string path = model("q8_0");
    const Opened m = open(path);
    const std::string tokens = prompt_tokens();
    const RunOut resident = moemesh_run(path, "cuda:0", "", tokens);
    const RunOut autob = moemesh_run(path, "cuda:0", "auto", tokens);
    EXPECT_EQ(autob.greedy, resident.greedy);
    EXPECT_EQ(autob.top1, resident.top1);
    // moemesh_run's --kv-type f32 at the default --ctx 4096, every layer with attention
    const uint64_t kv = static_cast<uint64_t>(m.cfg.n_layer * 2 * 4096 * m.cfg.n_head_kv * m.cfg.head_dim) * 4;
    const std::string want = "--device-budget auto: the free VRAM less " + format_bytes(kv) +
                             " (1 KV cache(s) of 4096 positions) and 512.00 MiB of scratch";
    EXPECT_NE(autob.err.find(want), std::string::npos) << "wanted: " << want << "\n" << autob.err;
    EXPECT_NE(autob.err.find("in VRAM"), std::string::npos) << autob.err;
    size_t free_b = 0, total_b = 0;
    ASSERT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
    std::string env;
#ifdef MM_CUDA_EMULATION
    env = "MOEMESH_CUDA_EMU_MEM_MIB=1024 ", total_b = size_t{1} << 30;  // (--ctx stops at 2^24 positions)
#endif
    const int64_t huge_ctx =
        static_cast<int64_t>(total_b / static_cast<size_t>(m.cfg.n_layer * 2 * m.cfg.n_head_kv * m.cfg.head_dim * 2)) +
        4096;
    const std::string dir = testing::temp_dir("cuda_experts");
    std::string out;
    for (const auto& [device, ctx, expect] :
         {std::tuple<std::string, int64_t, std::string>{"cuda:0", huge_ctx, "no room for an expert cache"},
          {"cpu", 4096, "--device-budget auto is for --device cuda:N"}}) {
        if (ctx > (int64_t{1} << 24)) {  // a device too large for --ctx to exceed with this model
            std::printf("[cuda-experts] (a KV cache larger than %s needs --ctx %lld: not run)\n",
                        format_bytes(total_b).c_str(), static_cast<long long>(ctx));
            continue;
        }
        const std::string cmd = env + testing::moemesh_bin() + " run -m " + path + " --device " + device +
                                " --tokens 1,2,3 -n 2 --device-budget auto --ctx " + std::to_string(ctx);
        EXPECT_EQ(testing::run_capture(cmd, &out, dir + "/auto_err.txt"), 1) << cmd;
        const std::string err = testing::read_file(dir + "/auto_err.txt");
        std::printf("[cuda-experts] %s: %s", cmd.c_str(), err.c_str());
        EXPECT_NE(err.find(expect), std::string::npos) << err;
    }
}

// A GPU that the build has no code for (the default 90;120 build on an sm_89 or sm_86 card) is
// refused where a device is chosen, naming the GPU, its capability and the CMake flag that adds it,
// instead of failing at the first kernel launch: the coordinator's backend (`moemesh run`), a worker
// (`moemesh-worker --device`). Older GPUs are emulated (MOEMESH_CUDA_EMU_CC); on a real GPU the test
// checks that a device the build does run is not refused.
TEST(CudaExperts, GpuWithoutCodeForItsArchitectureIsRefused) {
    REQUIRE_CUDA();
    EXPECT_EQ(cuda::kernels_unavailable(0), "") << "a device that runs the build's kernels";
#ifndef MM_CUDA_EMULATION
    GTEST_SKIP() << "an older GPU is only emulated (MOEMESH_CUDA_EMU_CC)";
#else
    const std::string path = model("q8_0");
    const std::string dir = testing::temp_dir("cuda_experts");
    const std::string want = "cuda:0 (moemesh CUDA emulator (host), compute capability 8.9) cannot run this build's "
                             "kernels (built for CUDA architectures 90 (the emulator's build): no kernel image is "
                             "available for execution on the device); rebuild with -DCMAKE_CUDA_ARCHITECTURES=89 (or "
                             "native), or run on the CPU (--device cpu)";
    ASSERT_EQ(setenv("MOEMESH_CUDA_EMU_CC", "8.9", 1), 0);
    EXPECT_EQ(cuda::kernels_unavailable(0), want);
    const Status worker = check_cuda_device(0);
    EXPECT_EQ(worker.message(), want);
    ASSERT_EQ(unsetenv("MOEMESH_CUDA_EMU_CC"), 0);
    EXPECT_TRUE(check_cuda_device(0).ok());
    const std::string bin = testing::moemesh_bin();
    const std::string worker_bin = bin.substr(0, bin.rfind('/') + 1) + "moemesh-worker";
    for (const std::string& cmd :
         {bin + " run -m " + path + " --device cuda:0 --tokens 1,2,3 -n 2",
          worker_bin + " --model " + path + " --listen unix:" + dir + "/old_gpu.sock --name w --device cuda:0"}) {
        std::string out;
        EXPECT_EQ(testing::run_capture("MOEMESH_CUDA_EMU_CC=8.9 " + cmd, &out, dir + "/old_gpu_err.txt"), 1) << cmd;
        const std::string err = testing::read_file(dir + "/old_gpu_err.txt");
        std::printf("[cuda-experts] %s: %s", cmd.c_str(), err.c_str());
        EXPECT_NE(err.find(want), std::string::npos) << err;
    }
#endif
}

}  // namespace
}  // namespace moemesh
