// The CPU-testable half of workers on cuda:N (worker/cuda_expert_compute.h, worker/cuda_tier_memory.h,
// worker/worker_service.h):
//  - ArenaAllocator (the VRAM / pinned tiers' allocator): rounding, first fit, merging, exhaustion,
//    and a random trace checked against a byte map (no overlap, used == sum of live ranges);
//  - plan_expert_call: errors, groups, padding; executed on the CPU with the CPU kernels in the plan's
//    order it reproduces ExpertCompute bitwise (so the GPU steps compute the same sums);
//  - expert_pin_window, parse_compute_device;
//  - the worker's cache flags (worker_cache_from_flags) and their precedence over gRPC: the
//    handshake's CacheConfig wins, the flags apply to handshakes without one;
//  - `--device cuda:0` where this build or machine has no CUDA device: a clear error, exit 1.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "common/placement.h"
#include "proto/moemesh.grpc.pb.h"
#include "tests/test_util.h"
#include "tools/make_model.h"
#include "worker/cuda_expert_compute.h"
#include "worker/cuda_tier_memory.h"
#include "worker/expert_executor.h"
#include "worker/worker_service.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using moemesh::testing::run_capture;

std::string model_path(const std::string& type) {
    static std::map<std::string, std::string> made;
    auto it = made.find(type);
    if (it != made.end()) return it->second;
    MakeModelOptions o;
    o.arch = "qwen3moe";
    o.layers = 2;
    o.hidden = 64;
    o.heads = 4;
    o.kv_heads = 2;
    o.head_dim = 16;
    o.experts = 8;
    o.top_k = 2;
    o.expert_ff = 32;
    o.type = type;
    o.out = moemesh::testing::temp_dir("worker_device") + "/m_" + type + ".gguf";
    std::ostringstream log;
    Status st = make_model(o, log);
    EXPECT_TRUE(st.ok()) << st.message();
    return made[type] = o.out;
}

// ---- ArenaAllocator --------------------------------------------------------------------------------

TEST(ArenaAllocator, RoundsFitsMergesAndRunsOut) {
    ArenaAllocator a(10 * kTierGranule + 100);  // capacity rounds down to whole granules
    EXPECT_EQ(a.capacity(), 10 * kTierGranule);
    const int64_t x = a.allocate(1);                   // 1 granule
    const int64_t y = a.allocate(3 * kTierGranule);    // 3
    const int64_t z = a.allocate(2 * kTierGranule + 1);  // 3
    EXPECT_EQ(x, 0);
    EXPECT_EQ(y, static_cast<int64_t>(kTierGranule));
    EXPECT_EQ(z, static_cast<int64_t>(4 * kTierGranule));
    EXPECT_EQ(a.used(), 7 * kTierGranule);
    EXPECT_EQ(a.allocate(4 * kTierGranule), -1);  // 3 granules left
    EXPECT_EQ(a.largest_free(), 3 * kTierGranule);
    a.free(static_cast<uint64_t>(y), 3 * kTierGranule);
    EXPECT_EQ(a.free_ranges(), 2u);
    a.free(static_cast<uint64_t>(z), 2 * kTierGranule + 1);  // merges with y's range and the tail
    EXPECT_EQ(a.free_ranges(), 1u);
    EXPECT_EQ(a.largest_free(), 9 * kTierGranule);
    EXPECT_EQ(a.allocate(9 * kTierGranule), static_cast<int64_t>(kTierGranule));
    a.free(0, 1);
    a.free(kTierGranule, 9 * kTierGranule);
    EXPECT_EQ(a.used(), 0u);
    EXPECT_EQ(a.free_ranges(), 1u);
    EXPECT_EQ(ArenaAllocator(0).allocate(1), -1);
}

// The arena the VRAM and pinned tiers carve their block with: takes inside the block, overflows
// counted, foreign pointers not taken back, fills counted.
TEST(ArenaRegion, TakesGivesBackAndCounts) {
    std::vector<uint8_t> block(4 * kTierGranule);
    ArenaRegion r;
    r.attach(block.data(), block.size());
    uint8_t* a = r.take(kTierGranule + 1);  // two granules
    uint8_t* b = r.take(kTierGranule);
    ASSERT_EQ(a, block.data());
    ASSERT_EQ(b, block.data() + 2 * kTierGranule);
    EXPECT_EQ(r.take(2 * kTierGranule), nullptr);  // one granule left
    EXPECT_EQ(r.stats().overflow, 1u);
    EXPECT_EQ(r.stats().arena_used, 3 * kTierGranule);
    uint8_t outside = 0;
    EXPECT_FALSE(r.give_back(&outside, 1));
    EXPECT_TRUE(r.give_back(a, kTierGranule + 1));
    EXPECT_EQ(r.take(2 * kTierGranule), block.data());
    r.count(&TierMemoryStats::staged_fills);
    EXPECT_EQ(r.stats().staged_fills, 1u);
    EXPECT_EQ(r.stats().arena_bytes, 4 * kTierGranule);

    ArenaRegion none;  // no block: every take overflows, nothing is taken back
    none.attach(nullptr, 0);
    EXPECT_EQ(none.take(1), nullptr);
    EXPECT_EQ(none.stats().overflow, 1u);
    EXPECT_FALSE(none.give_back(block.data(), 1));
}

TEST(ArenaAllocator, RandomTraceNeverOverlaps) {
    const uint64_t granules = 512;
    ArenaAllocator a(granules * kTierGranule);
    std::vector<int> owner(granules, -1);
    struct Live {
        uint64_t off, bytes;
    };
    std::map<int, Live> live;
    std::mt19937 rng(5);
    int next_id = 0;
    for (int step = 0; step < 20000; ++step) {
        if (!live.empty() && rng() % 2) {
            auto it = live.begin();
            std::advance(it, rng() % live.size());
            for (uint64_t g = it->second.off / kTierGranule; g < (it->second.off + ArenaAllocator::round(it->second.bytes)) / kTierGranule; ++g)
                owner[g] = -1;
            a.free(it->second.off, it->second.bytes);
            live.erase(it);
        } else {
            const uint64_t bytes = 1 + rng() % (40 * kTierGranule);
            const int64_t off = a.allocate(bytes);
            if (off < 0) {
                EXPECT_LT(a.largest_free(), ArenaAllocator::round(bytes));
                continue;
            }
            ASSERT_EQ(off % static_cast<int64_t>(kTierGranule), 0);
            const uint64_t end = static_cast<uint64_t>(off) + ArenaAllocator::round(bytes);
            ASSERT_LE(end, a.capacity());
            for (uint64_t g = static_cast<uint64_t>(off) / kTierGranule; g < end / kTierGranule; ++g) {
                ASSERT_EQ(owner[g], -1) << "granule " << g << " given twice";
                owner[g] = next_id;
            }
            live[next_id++] = {static_cast<uint64_t>(off), bytes};
        }
        uint64_t used = 0;
        for (auto& [id, l] : live) used += ArenaAllocator::round(l.bytes);
        ASSERT_EQ(a.used(), used);
    }
}

// ---- the call plan ---------------------------------------------------------------------------------

TEST(ExpertCallPlan, GroupsPadsAndRejects) {
    // rows 0..2; row 1 has three pairs, row 2 none.
    const std::vector<int32_t> rows = {1, 0, 1, 1};
    const std::vector<int32_t> experts = {5, 2, 2, 0};
    const std::vector<float> w = {0.1f, 0.2f, 0.3f, 0.4f};
    auto p = plan_expert_call(3, 3, rows.data(), experts.data(), w.data(), 4, 8);
    ASSERT_TRUE(p.ok()) << p.status().message();
    const ExpertCallPlan& pl = p.value();
    ASSERT_EQ(pl.groups.size(), 3u);  // experts 0, 2, 5 ascending
    EXPECT_EQ(pl.groups[0].expert, 0);
    EXPECT_EQ(pl.groups[1].expert, 2);
    EXPECT_EQ(pl.groups[1].first, 1);
    EXPECT_EQ(pl.groups[1].count, 2);
    EXPECT_EQ(pl.groups[2].expert, 5);
    // block rows: 0: pair 3 (row 1), 1: pair 1 (row 0), 2: pair 2 (row 1), 3: pair 0 (row 1)
    EXPECT_EQ(pl.gather, (std::vector<int32_t>{1, 0, 1, 1}));
    EXPECT_EQ(pl.slots_per_row, 3);
    // row 1's pairs in pair order 0, 2, 3 → block rows 3, 2, 0; padding → n_pairs (4) with weight 0
    EXPECT_EQ(pl.slot, (std::vector<int32_t>{1, 4, 4, 3, 2, 0, 4, 4, 4}));
    EXPECT_EQ(pl.weight, (std::vector<float>{0.2f, 0, 0, 0.1f, 0.3f, 0.4f, 0, 0, 0}));

    const std::vector<int32_t> bad_row = {3};
    const std::vector<int32_t> bad_expert = {8};
    const std::vector<int32_t> zero = {0};
    auto r = plan_expert_call(7, 3, bad_row.data(), zero.data(), w.data(), 1, 8);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("layer 7: pair 0 names row 3 of 3"), std::string::npos) << r.status().message();
    r = plan_expert_call(7, 3, zero.data(), bad_expert.data(), w.data(), 1, 8);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("expert id 8 out of range [0, 8)"), std::string::npos) << r.status().message();
    auto empty = plan_expert_call(0, 2, nullptr, nullptr, nullptr, 0, 8);
    ASSERT_TRUE(empty.ok());
    EXPECT_EQ(empty.value().slots_per_row, 0);
    EXPECT_TRUE(empty.value().groups.empty());
}

// The GPU's steps (gather, per-expert products, combine over the padded table) done with the CPU
// kernels: bitwise the ExpertCompute result, for decode- and prompt-shaped calls.
void plan_matches_expert_compute(const std::string& type) {
    auto f = GgufFile::open(model_path(type));
    ASSERT_TRUE(f.ok()) << f.status().message();
    auto c = load_model_config(*f.value());
    ASSERT_TRUE(c.ok());
    const ModelConfig& cfg = c.value();
    auto tables = map_expert_tables(*f.value(), cfg);
    ASSERT_TRUE(tables.ok()) << tables.status().message();
    ThreadPool pool(2);
    ExpertCompute ref(cfg, pool, tables.value());
    const int64_t H = cfg.n_embd, I = cfg.n_ff_exp;
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0, 1);
    for (int64_t n_rows : {int64_t{1}, int64_t{9}}) {
        for (int layer = 0; layer < cfg.n_layer; ++layer) {
            std::vector<float> x(static_cast<size_t>(n_rows * H));
            for (auto& v : x) v = nd(rng);
            std::vector<int32_t> rows, experts;
            std::vector<float> w;
            for (int64_t r = 0; r < n_rows; ++r) {
                const int k = 1 + static_cast<int>(rng() % 3);  // uneven pairs per row
                for (int j = 0; j < k; ++j) {
                    rows.push_back(static_cast<int32_t>(r));
                    experts.push_back(static_cast<int32_t>(rng() % cfg.n_expert));
                    w.push_back(0.1f + static_cast<float>(rng() % 100) / 100.0f);
                }
            }
            const int64_t n = static_cast<int64_t>(rows.size());
            std::vector<float> want(x.size());
            ASSERT_TRUE(ref.compute(layer, x.data(), n_rows, rows.data(), experts.data(), w.data(), n, want.data()).ok());

            auto p = plan_expert_call(layer, n_rows, rows.data(), experts.data(), w.data(), n, cfg.n_expert);
            ASSERT_TRUE(p.ok());
            const ExpertCallPlan& pl = p.value();
            std::vector<float> xs(static_cast<size_t>(n * H)), g(static_cast<size_t>(n * I)),
                u(static_cast<size_t>(n * I)), y(static_cast<size_t>((n + 1) * H), 0.0f);
            for (int64_t s = 0; s < n; ++s)
                std::copy_n(&x[pl.gather[s] * H], H, &xs[s * H]);
            const LayerExpertTable& t = tables.value()[layer];
            for (const auto& gr : pl.groups) {
                const ExpertSlice& ex = t.experts[gr.expert];
                const int64_t m = gr.count, o = gr.first;
                matmul(pool, t.gate_type, ex.gate, I, H, &xs[o * H], m, &g[o * I]);
                matmul(pool, t.up_type, ex.up, I, H, &xs[o * H], m, &u[o * I]);
                swiglu(&g[o * I], &u[o * I], &g[o * I], m * I);
                matmul(pool, t.down_type, ex.down, H, I, &g[o * I], m, &y[o * H]);
            }
            std::vector<float> got(x.size());
            const int64_t K = pl.slots_per_row;
            for (int64_t r = 0; r < n_rows; ++r)
                for (int64_t h = 0; h < H; ++h) {
                    float acc = 0;
                    for (int64_t j = 0; j < K; ++j) {
                        volatile float term = pl.weight[r * K + j] * y[pl.slot[r * K + j] * H + h];  // no FMA
                        acc += term;
                    }
                    got[r * H + h] = acc;
                }
            for (size_t i = 0; i < got.size(); ++i)
                ASSERT_EQ(got[i], want[i]) << type << " layer " << layer << " rows " << n_rows << " at " << i;
        }
    }
}

TEST(ExpertCallPlan, ExecutedOnCpuEqualsExpertComputeF32) { plan_matches_expert_compute("f32"); }
TEST(ExpertCallPlan, ExecutedOnCpuEqualsExpertComputeQ8_0) { plan_matches_expert_compute("q8_0"); }

TEST(ExpertPinWindow, FitsBesideTheHotSet) {
    EXPECT_EQ(expert_pin_window(0, 100, 0, 0, 8), 8);        // unlimited
    EXPECT_EQ(expert_pin_window(1000, 100, 0, 0, 8), 8);     // 10 slots
    EXPECT_EQ(expert_pin_window(1000, 100, 4, 1, 8), 5);     // 10 - hot 4 - prefetch 1
    EXPECT_EQ(expert_pin_window(100, 100, 0, 0, 8), 1);      // one expert: one at a time
    EXPECT_EQ(expert_pin_window(300, 100, 3, 0, 8), 1);      // hot set fills it: still progress
    EXPECT_EQ(expert_pin_window(1000, 100, 0, 0, 0), 1);
}

TEST(ParseComputeDevice, CpuCudaAndErrors) {
    EXPECT_EQ(parse_compute_device("cpu", "--device").value(), -1);
    EXPECT_EQ(parse_compute_device("cuda:3", "--device").value(), 3);
    auto bad = parse_compute_device("gpu", "--device");
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("--device: invalid device \"gpu\""), std::string::npos)
        << bad.status().message();
    auto cuda = parse_compute_device("cuda", "--device");
    ASSERT_FALSE(cuda.ok());
    EXPECT_NE(cuda.status().message().find("did you mean 'cuda:0'"), std::string::npos);
}

// ---- the worker's cache flags ------------------------------------------------------------------------

TEST(WorkerCacheFlags, ParseAndReject) {
    auto none = worker_cache_from_flags("", "", "", "", "");
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none.value().has_value());
    auto ok = worker_cache_from_flags("6GiB", "1GB", "lfu", "next-layer", "");
    ASSERT_TRUE(ok.ok()) << ok.status().message();
    ASSERT_TRUE(ok.value().has_value());
    EXPECT_EQ(ok.value()->device_bytes, 6ull << 30);
    EXPECT_EQ(ok.value()->host_bytes, 1000000000ull);
    EXPECT_EQ(ok.value()->policy, CachePolicy::kLfu);
    EXPECT_EQ(ok.value()->prefetch, PrefetchMode::kNextLayer);
    EXPECT_EQ(ok.value()->storage, StorageMode::kAuto);
    auto pread = worker_cache_from_flags("6GiB", "", "", "", "", "pread");
    ASSERT_TRUE(pread.ok()) << pread.status().message();
    EXPECT_EQ(pread.value()->storage, StorageMode::kPread);
    auto host_only = worker_cache_from_flags("", "2GiB", "", "", "");
    ASSERT_TRUE(host_only.ok());
    EXPECT_EQ(host_only.value()->device_bytes, 0u);
    EXPECT_EQ(host_only.value()->policy, CachePolicy::kLru);

    // auto on a GPU: no fixed size; the VRAM tier is what is free less the scratch kept.
    auto gpu_auto = worker_cache_from_flags("auto", "", "", "", "", "", /*gpu=*/true);
    ASSERT_TRUE(gpu_auto.ok()) << gpu_auto.status().message();
    ASSERT_TRUE(gpu_auto.value().has_value());
    EXPECT_EQ(gpu_auto.value()->device_bytes, 0u);
    EXPECT_EQ(gpu_auto.value()->device_keep_free, kAutoDeviceScratch);
    EXPECT_EQ(gpu_auto.value()->host_bytes, 0u);

    auto expect_error = [](StatusOr<std::optional<CacheOptions>> r, const std::string& part) {
        ASSERT_FALSE(r.ok()) << "expected an error with: " << part;
        EXPECT_NE(r.status().message().find(part), std::string::npos) << r.status().message();
    };
    expect_error(worker_cache_from_flags("", "", "lfu", "", ""), "need --device-budget or --host-budget");
    expect_error(worker_cache_from_flags("6 apples", "", "", "", ""), "--device-budget");
    expect_error(worker_cache_from_flags("0", "", "", "", ""), "--device-budget must be more than 0");
    expect_error(worker_cache_from_flags("1GiB", "x", "", "", ""), "--host-budget");
    expect_error(worker_cache_from_flags("1GiB", "", "mru", "", ""), "unknown cache policy 'mru'");
    expect_error(worker_cache_from_flags("1GiB", "", "", "always", ""), "unknown prefetch mode 'always'");
    expect_error(worker_cache_from_flags("1GiB", "", "static", "", ""), "--cache-policy static needs --profile");
    expect_error(worker_cache_from_flags("1GiB", "", "static", "", "/nonexistent/p.json"), "/nonexistent/p.json");
    expect_error(worker_cache_from_flags("6GiB", "", "", "", "", "mmap"), "--storage");
    expect_error(worker_cache_from_flags("", "", "", "", "", "pread"), "need --device-budget or --host-budget");
    expect_error(worker_cache_from_flags("auto", "", "", "", ""), "--device-budget auto is for --device cuda:N");
}

// A worker in this process; handshakes with or without a cache config; the Stats' device tier budget.
struct Client {
    std::unique_ptr<v1::ExpertWorker::Stub> stub;
    explicit Client(const std::string& addr) {
        grpc::ChannelArguments args;
        stub = v1::ExpertWorker::NewStub(grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), args));
    }
    v1::HandshakeResponse handshake(const std::string& fp, const v1::CacheConfig* cache) {
        v1::HandshakeRequest r;
        r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
        r.set_model_fingerprint(fp);
        r.set_worker_name("w1");
        r.set_activation_dtype(v1::DTYPE_F32);
        for (uint32_t l = 0; l < 2; ++l) {
            v1::LayerShard* ls = r.add_shard();
            ls->set_layer(l);
            for (uint32_t e = 0; e < 8; ++e) ls->add_experts(e);
        }
        if (cache) *r.mutable_cache() = *cache;
        v1::HandshakeResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        EXPECT_TRUE(stub->Handshake(&ctx, r, &resp).ok());
        return resp;
    }
    v1::StatsResponse stats() {
        v1::StatsResponse s;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        EXPECT_TRUE(stub->Stats(&ctx, v1::StatsRequest(), &s).ok());
        return s;
    }
};

TEST(WorkerCacheFlags, HandshakeConfigWinsFlagsApplyOtherwise) {
    WorkerOptions o;
    o.model_path = model_path("q8_0");
    o.listen = "unix:" + moemesh::testing::temp_dir("worker_device") + "/prec.sock";
    o.name = "w1";
    o.threads = 2;
    auto flags = worker_cache_from_flags("1MiB", "", "lfu", "", "");
    ASSERT_TRUE(flags.ok()) << flags.status().message();
    o.cache = flags.value();
    auto s = WorkerServer::start(o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    Client c(s.value()->address());
    const std::string fp = s.value()->service().fingerprint();

    ASSERT_TRUE(c.handshake(fp, nullptr).accepted());  // no cache in the handshake: the flags' 1 MiB
    v1::StatsResponse st = c.stats();
    ASSERT_GE(st.cache_tiers_size(), 1);
    EXPECT_EQ(st.cache_tiers(0).budget_bytes(), 1ull << 20);
    EXPECT_NE(st.cache_summary().find("lfu"), std::string::npos) << st.cache_summary();

    v1::CacheConfig cc;  // the coordinator's cache: it wins
    cc.set_device_bytes(2ull << 20);
    cc.set_policy("lru");
    ASSERT_TRUE(c.handshake(fp, &cc).accepted());
    st = c.stats();
    ASSERT_GE(st.cache_tiers_size(), 1);
    EXPECT_EQ(st.cache_tiers(0).budget_bytes(), 2ull << 20);
    EXPECT_NE(st.cache_summary().find("lru"), std::string::npos) << st.cache_summary();
}

// ---- --device cuda:N without a device ----------------------------------------------------------------

TEST(WorkerDevice, CudaWithoutADeviceIsAClearError) {
    const Status have = check_cuda_device(0);
    WorkerOptions o;
    o.model_path = model_path("q8_0");
    o.listen = "unix:" + moemesh::testing::temp_dir("worker_device") + "/dev.sock";
    o.name = "w1";
    o.device = "cuda:0";
    auto s = WorkerServer::start(o);
    if (have.ok()) {
        EXPECT_TRUE(s.ok()) << s.status().message();  // a CUDA build on a GPU machine
    } else {
        ASSERT_FALSE(s.ok());
        const std::string m = s.status().message();
        EXPECT_NE(m.find("--device cuda:0"), std::string::npos) << m;
        EXPECT_TRUE(m.find("no CUDA") != std::string::npos || m.find("has no CUDA") != std::string::npos) << m;
    }
    if (s.ok()) s.value().reset();  // stop it before the next start on the same socket
    o.device = "cuda:999";
    auto far = WorkerServer::start(o);
    ASSERT_FALSE(far.ok());
    EXPECT_NE(far.status().message().find("cuda:999"), std::string::npos) << far.status().message();
    o.device = "tpu:0";
    auto bad = WorkerServer::start(o);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("--device: invalid device \"tpu:0\""), std::string::npos)
        << bad.status().message();
}

TEST(WorkerDevice, BinaryExitsOneWithTheReason) {
    const std::string bin = std::string(MOEMESH_BINARY_DIR) + "/moemesh-worker";
    if (!fs::exists(bin)) GTEST_SKIP() << "moemesh-worker not built";
    const std::string dir = moemesh::testing::temp_dir("worker_device");
    const std::string base = bin + " --model " + model_path("q8_0") + " --name w1 --listen unix:" + dir + "/bin.sock";
    std::string out;
    if (!check_cuda_device(0).ok()) {
        EXPECT_EQ(run_capture(base + " --device cuda:0", &out, dir + "/err1.txt"), 1);
        const std::string err = moemesh::testing::read_file(dir + "/err1.txt");
        EXPECT_NE(err.find("moemesh-worker: error: --device cuda:0: cuda:0:"), std::string::npos) << err;
    }
    EXPECT_EQ(run_capture(base + " --cache-policy lfu", &out, dir + "/err2.txt"), 1);
    EXPECT_NE(moemesh::testing::read_file(dir + "/err2.txt").find("need --device-budget or --host-budget"),
              std::string::npos);
    // --device-budget auto sizes VRAM: refused with the CPU device (the flag sees the --device given).
    EXPECT_EQ(run_capture(base + " --device cpu --device-budget auto", &out, dir + "/err3.txt"), 1);
    EXPECT_NE(moemesh::testing::read_file(dir + "/err3.txt").find("--device-budget auto is for --device cuda:N"),
              std::string::npos)
        << moemesh::testing::read_file(dir + "/err3.txt");
    EXPECT_EQ(run_capture(bin + " --help", &out), 0);
    EXPECT_NE(out.find("Cache precedence"), std::string::npos);
    EXPECT_NE(out.find("--device-budget"), std::string::npos);
}

}  // namespace
}  // namespace moemesh
