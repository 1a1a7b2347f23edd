// Expert cache (worker/expert_cache.h): budget accounting, eviction order per policy on scripted
// traces with hand-computed hit rates, single-flight loads, pins, transient buffers, storage
// errors on a truncated file, and identical greedy tokens through `moemesh run --device-budget`
// for every policy and budgets of 100%, 50%, 10% and one expert of the model's experts.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/arch.h"
#include "common/weights.h"
#include "tests/test_util.h"
#include "tools/run_command.h"
#include "worker/expert_cache.h"
#include "worker/expert_executor.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using namespace moemesh::testing;

// ---- a scripted storage tier: every expert is 1000 bytes of (layer * 16 + expert) ----------------

constexpr uint64_t kData = 1000;

class FakeReader final : public ExpertReader {
public:
    Status read_expert(int layer, int expert, uint8_t* dst) override {
        {
            std::lock_guard<std::mutex> lk(mu);
            reads[{layer, expert}]++;
            if (fail_from_layer >= 0 && layer >= fail_from_layer)
                return MM_ERROR("fake.gguf: tensor 'blk.%d.ffn_gate_exps.weight' bytes [0, 1000): file ends", layer);
        }
        if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        while (hold.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::memset(dst, layer * 16 + expert, kData);
        return Status();
    }
    void read_experts(const std::vector<ExpertRead>& rs, std::vector<Status>* out, const ReadDone& done) override {
        {
            std::lock_guard<std::mutex> lk(mu);
            batches.push_back(rs.size());
        }
        ExpertReader::read_experts(rs, out, done);
    }
    int total() {
        std::lock_guard<std::mutex> lk(mu);
        int n = 0;
        for (auto& [k, v] : reads) n += v;
        return n;
    }
    std::mutex mu;
    std::map<std::pair<int, int>, int> reads;
    std::vector<size_t> batches;  // sizes of read_experts calls
    int delay_ms = 0;
    std::atomic<bool> hold{false};  // reads wait while set (background loads in flight)
    int fail_from_layer = -1;
};

std::vector<ExpertLayout> fake_layouts(int layers) {
    ExpertLayout l;
    l.gate_bytes = l.up_bytes = l.down_bytes = kData / 4;  // data_bytes() = 750; the reader fills 1000
    l.up_off = 256;
    l.down_off = 512;
    l.size = 1024;
    return std::vector<ExpertLayout>(static_cast<size_t>(layers), l);
}

// One entry's charge: the 1024-byte buffer rounds up to a page, plus the bookkeeping.
uint64_t entry_charge() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)) + kCacheEntryOverhead; }

struct Fake {
    FakeReader* reader = nullptr;
    std::shared_ptr<ExpertCache> cache;
};

Fake make_cache(int layers, int experts, int top_k, CacheOptions o, std::vector<std::vector<int>> shard = {}) {
    auto r = std::make_unique<FakeReader>();
    Fake f;
    f.reader = r.get();
    auto c = ExpertCache::create_with_reader(std::move(r), fake_layouts(layers),
                                             std::vector<ExpertTypes>(static_cast<size_t>(layers)), experts, top_k,
                                             shard, o);
    EXPECT_TRUE(c.ok()) << c.status().message();
    if (c.ok()) f.cache = c.value();
    return f;
}

// Acquires and releases each expert of layer 0 in order, checking the bytes.
void run_trace(ExpertCache& c, const std::vector<int>& trace) {
    for (int e : trace) {
        ExpertSlice s;
        void* t = nullptr;
        ASSERT_TRUE(c.acquire(0, e, &s, &t).ok());
        EXPECT_EQ(s.gate[0], e);
        c.release(t);
    }
}

const std::vector<int> kTrace = {0, 1, 2, 0, 3, 0, 4, 1, 2, 0};
using Evictions = std::vector<std::pair<int, int>>;

TEST(ExpertCache, LruEvictionOrderAndHitRate) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    Fake f = make_cache(1, 8, 1, o);
    run_trace(*f.cache, kTrace);
    // Capacity 3, least recently used goes first:
    //   0 m [0] | 1 m [0 1] | 2 m [0 1 2] | 0 h (recency 1 2 0) | 3 m -1 [2 0 3] | 0 h (2 3 0)
    //   4 m -2 [3 0 4] | 1 m -3 [0 4 1] | 2 m -0 [4 1 2] | 0 m -4 [1 2 0]
    // hits 2, misses 8: 20%; evictions 1 2 3 0 4.
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.hits, 2u);
    EXPECT_EQ(s.misses, 8u);
    EXPECT_DOUBLE_EQ(s.hit_rate(), 0.2);
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 1}, {0, 2}, {0, 3}, {0, 0}, {0, 4}}));
    EXPECT_EQ(s.fills, 8u);
    EXPECT_EQ(s.bytes_in, 8 * 750u);
    EXPECT_EQ(f.reader->total(), 8);
    EXPECT_LE(s.peak_used, o.device_bytes);
    EXPECT_EQ(s.used, 3 * entry_charge());
}

TEST(ExpertCache, LfuEvictionOrderAndHitRate) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    o.policy = CachePolicy::kLfu;
    Fake f = make_cache(1, 8, 1, o);
    run_trace(*f.cache, kTrace);
    // Capacity 3, fewest uses goes first (counts kept across evictions; ties: least recent):
    //   0 m c0=1 | 1 m c1=1 | 2 m c2=1 | 0 h c0=2 | 3 m: {0:2, 1:1, 2:1} -1 (older) [0 2 3]
    //   0 h c0=3 | 4 m: {0:3, 2:1, 3:1} -2 [0 3 4] | 1 m c1=2: {0:3, 3:1, 4:1} -3 [0 4 1]
    //   2 m c2=2: {0:3, 4:1, 1:2} -4 [0 1 2] | 0 h c0=4
    // hits 3, misses 7: 30%; evictions 1 2 3 4.
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.hits, 3u);
    EXPECT_EQ(s.misses, 7u);
    EXPECT_DOUBLE_EQ(s.hit_rate(), 0.3);
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 1}, {0, 2}, {0, 3}, {0, 4}}));
}

TEST(ExpertCache, StaticHotSetAndHitRate) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    o.policy = CachePolicy::kStatic;
    o.profile.n_layer = 1;
    o.profile.n_expert = 8;
    o.profile.counts = {{100, 0, 50, 0, 0, 0, 0, 0}};
    Fake f = make_cache(1, 8, 1, o);
    ASSERT_TRUE(f.cache->warm_up().ok());
    // Capacity 3, room kept for max(top-k 1, 3 - floor(0.95 * 3) = 1) = 1 entry: hot set {0, 2} (the two most used),
    // the last slot is LRU:
    //   0 h | 1 m [1] | 2 h | 0 h | 3 m -1 | 0 h | 4 m -3 | 1 m -4 | 2 h | 0 h
    // hits 6, misses 4: 60%; evictions 1 3 4; reads: 2 preloaded + 4.
    run_trace(*f.cache, kTrace);
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.preloaded, 2u);
    EXPECT_EQ(s.hits, 6u);
    EXPECT_EQ(s.misses, 4u);
    EXPECT_DOUBLE_EQ(s.hit_rate(), 0.6);
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 1}, {0, 3}, {0, 4}}));
    EXPECT_EQ(f.reader->total(), 6);
    EXPECT_EQ(f.cache->hot_set_bytes(), 2 * 750u);
    // Counters restart (moemesh run does it after warm-up), the hot set stays and is still reported.
    f.cache->reset_counters();
    EXPECT_EQ(f.cache->device().stats().preloaded, 2u);
    EXPECT_EQ(f.cache->device().stats().hits, 0u);
    EXPECT_NE(f.cache->stats_line().find("hot set 2 experts"), std::string::npos) << f.cache->stats_line();
}

TEST(ExpertCache, HostTierBelowTheDevice) {
    CacheOptions o;
    o.device_bytes = entry_charge();
    o.host_bytes = 3 * entry_charge();
    Fake f = make_cache(1, 8, 1, o);
    // Device holds 1: 0 m, 1 m, 0 m, 1 m (0 hits). Host holds 3: 0 m, 1 m, 0 h, 1 h (50%).
    // The file is read twice.
    run_trace(*f.cache, {0, 1, 0, 1});
    auto st = f.cache->tier_stats();
    ASSERT_EQ(st.size(), 3u);
    EXPECT_EQ(st[0].name, "device");
    EXPECT_EQ(st[0].hits, 0u);
    EXPECT_EQ(st[0].misses, 4u);
    EXPECT_EQ(st[1].name, "host");
    EXPECT_EQ(st[1].hits, 2u);
    EXPECT_EQ(st[1].misses, 2u);
    EXPECT_DOUBLE_EQ(st[1].hit_rate(), 0.5);
    EXPECT_EQ(f.reader->total(), 2);
    EXPECT_NE(f.cache->stats_line().find("host"), std::string::npos) << f.cache->stats_line();
}

TEST(ExpertCache, BatchLoadsFillFreeRoomOrPinAndReachTheReaderAsOneBatch) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    Fake f = make_cache(1, 8, 1, o);
    run_trace(*f.cache, {0});
    // Prefetch-style batch of 0..4 into capacity 3 holding [0]: 0 is resident (skipped); 1 and 2
    // take the free room; 3 evicts 0 (the only ready, unpinned entry); 4 finds only entries being
    // loaded and is skipped. One batch of 3 reaches the reader.
    size_t loaded = 0;
    ASSERT_TRUE(f.cache->device().load_batch({{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}}, false, &loaded).ok());
    EXPECT_EQ(loaded, 3u);
    EXPECT_EQ(f.reader->batches, (std::vector<size_t>{3}));
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 0}}));
    for (int e : {1, 2, 3}) EXPECT_TRUE(f.cache->device().resident(0, e)) << e;
    EXPECT_FALSE(f.cache->device().resident(0, 4));
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.hits + s.misses, 1u);  // batches are not requests
    EXPECT_EQ(s.fills, 4u);
    EXPECT_LE(s.peak_used, o.device_bytes);
    run_trace(*f.cache, {1, 2, 3});
    EXPECT_EQ(f.cache->device().stats().hits, 3u);
    // Pinning batch into capacity 2: 5 and 6 fill it and stay for good; 7 finds no room.
    o.device_bytes = 2 * entry_charge();
    Fake g = make_cache(1, 8, 1, o);
    Status st = g.cache->device().load_batch({{0, 5}, {0, 6}, {0, 7}}, true, &loaded);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("no room to pin layer 0 expert 7"), std::string::npos) << st.message();
    EXPECT_EQ(loaded, 2u);
    EXPECT_EQ(g.cache->device().stats().preloaded, 2u);
    EXPECT_EQ(g.cache->device().stats().pinned_entries, 2u);
    // Failed reads in a batch: reported, nothing cached, the others kept.
    Fake h = make_cache(2, 8, 1, CacheOptions());
    h.reader->fail_from_layer = 1;
    st = h.cache->device().load_batch({{0, 1}, {1, 1}, {0, 2}}, true, &loaded);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("loading layer 1 expert 1"), std::string::npos) << st.message();
    EXPECT_EQ(loaded, 2u);
    EXPECT_FALSE(h.cache->device().resident(1, 1));
    EXPECT_TRUE(h.cache->device().resident(0, 2));
    EXPECT_EQ(h.cache->device().stats().errors, 1u);
}

TEST(ExpertCache, StallBoundCountsTheBytesRequestsWaitedFor) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    o.storage_bandwidth = 6000;  // bytes/s
    Fake f = make_cache(1, 8, 1, o);
    run_trace(*f.cache, kTrace);  // 8 misses of 750 bytes (LruEvictionOrderAndHitRate): 6000 bytes, 1 s
    auto st = f.cache->tier_stats();
    EXPECT_EQ(st[0].miss_bytes, 6000u);
    EXPECT_DOUBLE_EQ(st[0].bound_seconds, 1.0);
    EXPECT_DOUBLE_EQ(st.back().bandwidth, 6000.0);
    EXPECT_NE(f.cache->stats_line().find("(bound 1.000 s at 0.00 GB/s: "), std::string::npos) << f.cache->stats_line();
    // Prefetched (or preloaded) loads are not waited for: no miss bytes, no bound, and a request
    // that then hits them adds none.
    Fake g = make_cache(1, 8, 1, o);
    size_t loaded = 0;
    ASSERT_TRUE(g.cache->device().load_batch({{0, 1}, {0, 2}}, false, &loaded).ok());
    run_trace(*g.cache, {1, 2, 1});
    EXPECT_EQ(g.cache->tier_stats()[0].miss_bytes, 0u);
    EXPECT_EQ(g.cache->tier_stats()[0].bound_seconds, 0.0);
    run_trace(*g.cache, {3});
    EXPECT_DOUBLE_EQ(g.cache->tier_stats()[0].bound_seconds, 750.0 / 6000.0);
    // With a host tier, the file is read on the host tier's misses: 2 of the 4 device misses
    // (HostTierBelowTheDevice), so the bound counts 1500 bytes.
    o.device_bytes = entry_charge();
    o.host_bytes = 3 * entry_charge();
    Fake h = make_cache(1, 8, 1, o);
    run_trace(*h.cache, {0, 1, 0, 1});
    st = h.cache->tier_stats();
    EXPECT_EQ(st[0].miss_bytes, 3000u);
    EXPECT_EQ(st[1].miss_bytes, 1500u);
    EXPECT_DOUBLE_EQ(st[0].bound_seconds, 0.25);
    // Without a reference bandwidth there is no bound in the line.
    Fake n = make_cache(1, 8, 1, CacheOptions());
    run_trace(*n.cache, {0});
    EXPECT_EQ(n.cache->stats_line().find("bound"), std::string::npos) << n.cache->stats_line();
}

TEST(ExpertCache, BudgetSmallerThanOneExpertIsRefused) {
    CacheOptions o;
    o.device_bytes = entry_charge() - 1;
    auto c = ExpertCache::create_with_reader(std::make_unique<FakeReader>(), fake_layouts(1), {ExpertTypes{}}, 8, 1, {},
                                             o);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("device budget"), std::string::npos) << c.status().message();
    EXPECT_NE(c.status().message().find("cannot hold one expert"), std::string::npos) << c.status().message();
    o.device_bytes = 0;
    o.host_bytes = 100;
    c = ExpertCache::create_with_reader(std::make_unique<FakeReader>(), fake_layouts(1), {ExpertTypes{}}, 8, 1, {}, o);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("host budget"), std::string::npos) << c.status().message();
    o = CacheOptions();
    o.policy = CachePolicy::kStatic;
    c = ExpertCache::create_with_reader(std::make_unique<FakeReader>(), fake_layouts(1), {ExpertTypes{}}, 8, 1, {}, o);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("profile"), std::string::npos) << c.status().message();
}

TEST(ExpertCache, ConcurrentMissesLoadOnce) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    Fake f = make_cache(2, 8, 2, o);
    f.reader->delay_ms = 100;
    constexpr int kThreads = 8;
    std::vector<std::thread> ts;
    std::vector<const uint8_t*> got(kThreads);
    std::atomic<int> ok{0};
    for (int i = 0; i < kThreads; ++i)
        ts.emplace_back([&, i] {
            ExpertSlice s;
            void* t = nullptr;
            if (!f.cache->acquire(1, 5, &s, &t).ok()) return;
            got[i] = s.gate;
            if (s.gate[0] == 16 + 5) ok++;
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            f.cache->release(t);
        });
    for (auto& t : ts) t.join();
    EXPECT_EQ(ok.load(), kThreads);
    EXPECT_EQ((f.reader->reads[{1, 5}]), 1);
    for (int i = 1; i < kThreads; ++i) EXPECT_EQ(got[i], got[0]);
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.fills, 1u);
    EXPECT_EQ(s.hits + s.misses, static_cast<uint64_t>(kThreads));
    EXPECT_GE(s.coalesced, 1u);
    EXPECT_GT(s.stall_seconds, 0.05);
}

TEST(ExpertCache, PinnedEntriesAreNeverEvictedAndFullPinsStillComplete) {
    CacheOptions o;
    o.device_bytes = entry_charge();  // one expert
    Fake f = make_cache(1, 8, 1, o);
    ExpertSlice a, b;
    void *ta = nullptr, *tb = nullptr;
    ASSERT_TRUE(f.cache->acquire(0, 1, &a, &ta).ok());
    // Same thread, budget full of its own pin: a transient buffer (waiting would deadlock).
    ASSERT_TRUE(f.cache->acquire(0, 2, &b, &tb).ok());
    EXPECT_EQ(a.gate[0], 1);
    EXPECT_EQ(b.gate[0], 2);
    EXPECT_EQ(f.cache->device().stats().transient, 1u);
    EXPECT_LE(f.cache->device().stats().peak_used, o.device_bytes);
    f.cache->release(tb);
    // Another thread waits for the pin to go, then evicts it.
    std::atomic<bool> done{false};
    std::thread other([&] {
        ExpertSlice c;
        void* tc = nullptr;
        ASSERT_TRUE(f.cache->acquire(0, 3, &c, &tc).ok());
        EXPECT_EQ(c.gate[0], 3);
        f.cache->release(tc);
        done = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(done.load());
    EXPECT_EQ(a.gate[0], 1);  // still there under its reader
    f.cache->release(ta);
    other.join();
    EXPECT_TRUE(done.load());
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 1}}));
    EXPECT_LE(f.cache->device().stats().peak_used, o.device_bytes);
}

TEST(ExpertCache, RandomConcurrentTraceStaysWithinBudget) {
    for (CachePolicy p : {CachePolicy::kLru, CachePolicy::kLfu}) {
        CacheOptions o;
        o.device_bytes = 5 * entry_charge() + 100;
        o.host_bytes = 9 * entry_charge();
        o.policy = p;
        Fake f = make_cache(3, 8, 2, o);
        std::atomic<int> bad{0};
        std::vector<std::thread> ts;
        for (int t = 0; t < 4; ++t)
            ts.emplace_back([&, t] {
                std::mt19937 rng(t);
                for (int i = 0; i < 400; ++i) {
                    const int l = static_cast<int>(rng() % 3), e = static_cast<int>(rng() % 8);
                    ExpertSlice s;
                    void* tok = nullptr;
                    if (!f.cache->acquire(l, e, &s, &tok).ok()) {
                        bad++;
                        continue;
                    }
                    if (s.gate[0] != l * 16 + e || s.gate[kData - 1] != l * 16 + e) bad++;
                    f.cache->release(tok);
                }
            });
        for (auto& t : ts) t.join();
        EXPECT_EQ(bad.load(), 0);
        for (const TierStats& s : f.cache->tier_stats()) {
            if (s.name == "storage") continue;
            EXPECT_LE(s.peak_used, s.budget) << s.name;
            EXPECT_LE(s.used, s.budget) << s.name;
        }
        EXPECT_EQ(f.cache->device().stats().hits + f.cache->device().stats().misses, 1600u);
    }
}

TEST(ExpertCache, ReadErrorsReachTheRequesterAndNothingIsCached) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    Fake f = make_cache(2, 8, 1, o);
    f.reader->fail_from_layer = 1;
    ExpertSlice s;
    void* t = nullptr;
    Status st = f.cache->acquire(1, 3, &s, &t);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("blk.1.ffn_gate_exps.weight"), std::string::npos) << st.message();
    EXPECT_EQ(f.cache->device().stats().used, 0u);
    EXPECT_EQ(f.cache->device().stats().errors, 1u);
    ASSERT_TRUE(f.cache->acquire(0, 3, &s, &t).ok());
    f.cache->release(t);
    // Once readable again, the expert loads (the failure was not cached).
    f.reader->fail_from_layer = -1;
    ASSERT_TRUE(f.cache->acquire(1, 3, &s, &t).ok());
    EXPECT_EQ(s.gate[0], 16 + 3);
    f.cache->release(t);
}

// A call's experts announced with will_need: the absent ones reach the reader as one batch, the
// call's resident ones are kept (its own misses do not evict them), and acquire takes what was kept.
TEST(ExpertCache, CallMissesAreReadAsOneBatch) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    o.background_call_loads = false;  // will_need reads them itself (background: the tests below)
    Fake f = make_cache(1, 8, 4, o);
    run_trace(*f.cache, {0});
    int32_t call[] = {0, 1, 2, 3};
    ASSERT_TRUE(f.cache->will_need(0, call, 4).ok());
    EXPECT_EQ(f.reader->batches, (std::vector<size_t>{3}));  // 1, 2, 3 together; 0 was resident
    EXPECT_EQ(f.reader->total(), 4);
    run_trace(*f.cache, {0, 1, 2, 3});  // bytes checked; nothing read again
    f.cache->end_call();
    EXPECT_EQ(f.reader->total(), 4);
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.misses, 4u);  // the batch's loads are the call's misses...
    EXPECT_EQ(s.hits, 1u);    // ...and its acquires of them not hits again
    EXPECT_EQ(s.miss_bytes, 4 * 750u);
    EXPECT_EQ(s.pinned_entries, 0u);  // every kept pin went back
    EXPECT_TRUE(f.cache->device().eviction_log().empty());
    // Announced but never acquired (a call that failed half-way): end_call drops the pins, and a
    // later request for it is a hit.
    int32_t call2[] = {4, 5};
    ASSERT_TRUE(f.cache->will_need(0, call2, 2).ok());
    EXPECT_EQ(f.cache->device().stats().pinned_entries, 2u);
    f.cache->end_call();
    EXPECT_EQ(f.cache->device().stats().pinned_entries, 0u);
    run_trace(*f.cache, {4});
    EXPECT_EQ(f.cache->device().stats().hits, 2u);
    EXPECT_LE(f.cache->device().stats().peak_used, o.device_bytes);
}

TEST(ExpertCache, CallLargerThanTheBudgetBatchesWhatFitsAndKeepsItsResidentExperts) {
    CacheOptions o;
    o.device_bytes = 3 * entry_charge();
    o.background_call_loads = false;
    Fake f = make_cache(1, 8, 5, o);
    run_trace(*f.cache, {4, 5});
    // Call {0..4} into capacity 3 holding [4, 5]: it does not fit, so one entry of room stays
    // reclaimable: 4 is kept, 0 is read (one batch of one, into the free entry), 1..3 go one by
    // one. Their misses evict 5, then what the call is done with (0, 1), never 4: without keeping,
    // LRU would have evicted 4 first and read it again at the end of the call.
    int32_t call[] = {0, 1, 2, 3, 4};
    ASSERT_TRUE(f.cache->will_need(0, call, 5).ok());
    EXPECT_EQ(f.reader->batches, (std::vector<size_t>{1}));
    run_trace(*f.cache, {0, 1, 2, 3, 4});
    f.cache->end_call();
    EXPECT_EQ(f.cache->device().eviction_log(), (Evictions{{0, 5}, {0, 0}, {0, 1}}));
    EXPECT_EQ(f.reader->total(), 2 + 4);
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.misses, 2u + 4u);
    EXPECT_EQ(s.hits, 1u);
    EXPECT_LE(s.peak_used, o.device_bytes);
    EXPECT_EQ(s.transient, 0u);
    // A budget of one expert: nothing can be kept; every expert goes through acquire.
    o.device_bytes = entry_charge();
    Fake g = make_cache(1, 8, 5, o);
    ASSERT_TRUE(g.cache->will_need(0, call, 5).ok());
    EXPECT_TRUE(g.reader->batches.empty());
    run_trace(*g.cache, {0, 1, 2, 3, 4});
    g.cache->end_call();
    EXPECT_EQ(g.reader->total(), 5);
    EXPECT_LE(g.cache->device().stats().peak_used, o.device_bytes);
    EXPECT_EQ(g.cache->device().stats().transient, 0u);
}

TEST(ExpertCache, ReadErrorInACallBatchIsTheAcquiresErrorAndNothingIsCached) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    o.background_call_loads = false;
    Fake f = make_cache(2, 8, 2, o);
    f.reader->fail_from_layer = 1;
    int32_t call[] = {2, 3};
    Status batch = f.cache->will_need(1, call, 2);
    f.cache->end_call();
    ASSERT_FALSE(batch.ok());
    EXPECT_NE(batch.message().find("loading layer 1 expert 2"), std::string::npos) << batch.message();
    EXPECT_NE(batch.message().find("blk.1.ffn_gate_exps.weight"), std::string::npos) << batch.message();
    EXPECT_EQ(f.reader->batches, (std::vector<size_t>{2}));
    EXPECT_EQ(f.cache->device().stats().used, 0u);
    EXPECT_EQ(f.cache->device().stats().errors, 2u);
    EXPECT_EQ(f.cache->device().stats().pinned_entries, 0u);
    ExpertSlice s;
    void* t = nullptr;
    Status one = f.cache->acquire(1, 2, &s, &t);  // the same expert the usual way: the same words
    ASSERT_FALSE(one.ok());
    EXPECT_EQ(one.message(), batch.message());
    // Single-flight with the batch: a request for an expert the batch is reading waits for it.
    f.reader->fail_from_layer = -1;
    f.reader->delay_ms = 100;
    int32_t call0[] = {5, 6};
    std::thread other([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        ExpertSlice s2;
        void* t2 = nullptr;
        ASSERT_TRUE(f.cache->acquire(0, 6, &s2, &t2).ok());
        EXPECT_EQ(s2.gate[0], 6);
        f.cache->release(t2);
    });
    ASSERT_TRUE(f.cache->will_need(0, call0, 2).ok());
    other.join();
    run_trace(*f.cache, {5, 6});
    f.cache->end_call();
    EXPECT_EQ((f.reader->reads[{0, 6}]), 1);
}

// Lets held reads go after 10 s if nobody else did (fired): a caller that wrongly waited for a
// background read then fails the test instead of hanging it. (will_need must run on the test's
// thread: what it keeps is per thread.)
struct Watchdog {
    explicit Watchdog(FakeReader* r)
        : t([this, r] {
              for (int i = 0; i < 10000 && !stop.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
              if (!stop.load() && r->hold.exchange(false)) fired = true;
          }) {}
    ~Watchdog() {
        stop = true;
        t.join();
    }
    std::atomic<bool> stop{false}, fired{false};
    std::thread t;
};

// Background call loads (the default): will_need returns once the call's room is reserved, the call
// gets its resident experts first and computes them while the loader thread reads the rest; each
// expert is usable as soon as its own read is done; counts are those of the synchronous form.
TEST(ExpertCache, BackgroundCallLoadsServeResidentExpertsFirst) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    Fake f = make_cache(1, 8, 4, o);
    run_trace(*f.cache, {2});
    f.reader->hold = true;  // no read can finish until released
    int32_t call[] = {0, 1, 2, 3};
    {
        Watchdog w(f.reader);
        ASSERT_TRUE(f.cache->will_need(0, call, 4).ok());
        EXPECT_FALSE(w.fired.load()) << "will_need waited for the reads";
        run_trace(*f.cache, {2});
        EXPECT_FALSE(w.fired.load()) << "a resident expert waited for the reads";
    }
    EXPECT_EQ(std::vector<int32_t>(call, call + 4), (std::vector<int32_t>{2, 0, 1, 3}));  // resident first
    std::thread release([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        f.reader->hold = false;
    });
    run_trace(*f.cache, {0, 1, 3});  // waits for each read, then the right bytes
    release.join();
    f.cache->end_call();
    EXPECT_EQ(f.reader->batches, (std::vector<size_t>{3}));
    EXPECT_EQ(f.reader->total(), 4);
    TierStats s = f.cache->device().stats();
    EXPECT_EQ(s.misses, 4u);
    EXPECT_EQ(s.hits, 1u);
    EXPECT_EQ(s.fills, 4u);
    EXPECT_EQ(s.miss_bytes, 4 * 750u);
    EXPECT_GT(s.stall_seconds, 0.0);  // the waits in acquire count
    EXPECT_EQ(s.pinned_entries, 0u);
    EXPECT_LE(s.peak_used, o.device_bytes);
}

TEST(ExpertCache, BackgroundCallLoadErrorsReachTheAcquireAndNothingIsCached) {
    CacheOptions o;
    o.device_bytes = 4 * entry_charge();
    Fake f = make_cache(2, 8, 2, o);
    f.reader->fail_from_layer = 1;
    int32_t call[] = {2, 3};
    ASSERT_TRUE(f.cache->will_need(1, call, 2).ok());  // the reads fail later, on the loader thread
    ExpertSlice s;
    void* t = nullptr;
    Status first = f.cache->acquire(1, call[0], &s, &t);
    ASSERT_FALSE(first.ok());
    EXPECT_NE(first.message().find("loading layer 1 expert " + std::to_string(call[0])), std::string::npos)
        << first.message();
    EXPECT_NE(first.message().find("blk.1.ffn_gate_exps.weight"), std::string::npos) << first.message();
    f.cache->end_call();  // the call failed half-way: the other kept entry is dropped
    for (int i = 0; i < 5000 && f.cache->device().stats().errors < 2; ++i)  // its read may still be going on
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    TierStats st = f.cache->device().stats();
    EXPECT_EQ(st.used, 0u);
    EXPECT_EQ(st.errors, 2u);
    EXPECT_EQ(st.pinned_entries, 0u);
    EXPECT_EQ(st.entries, 0u);
    Status one = f.cache->acquire(1, call[0], &s, &t);  // the usual way: the same words
    ASSERT_FALSE(one.ok());
    EXPECT_EQ(one.message(), first.message());
    // A call that ends before its reads do: they finish into the cache, unpinned, and are hits later.
    f.reader->fail_from_layer = -1;
    f.reader->hold = true;
    int32_t call2[] = {4, 5};
    ASSERT_TRUE(f.cache->will_need(0, call2, 2).ok());
    f.cache->end_call();
    f.reader->hold = false;
    for (int i = 0; i < 5000 && f.cache->device().stats().fills < 2; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(f.cache->device().stats().fills, 2u);
    EXPECT_EQ(f.cache->device().stats().pinned_entries, 0u);
    run_trace(*f.cache, {4, 5});
    EXPECT_EQ(f.cache->device().stats().hits, 2u);
    // Destroyed with reads queued: the loader finishes them first (no use after free, no leak).
    f.reader->hold = true;
    int32_t call3[] = {6, 7};
    ASSERT_TRUE(f.cache->will_need(0, call3, 2).ok());
    f.cache->end_call();
    std::thread release([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        f.reader->hold = false;
    });
    f.cache.reset();
    release.join();
}

// Threads announcing random calls (some abandoned half-way, as a failed call is), acquiring in the
// order will_need leaves, alongside plain acquires: right bytes, budgets never exceeded, no pin left.
TEST(ExpertCache, BackgroundCallLoadsUnderConcurrentCalls) {
    for (uint64_t entries : {uint64_t{3}, uint64_t{6}}) {
        CacheOptions o;
        o.device_bytes = entries * entry_charge() + 100;
        o.host_bytes = 9 * entry_charge();
        Fake f = make_cache(3, 8, 4, o);
        std::atomic<int> bad{0};
        std::vector<std::thread> ts;
        for (int t = 0; t < 4; ++t)
            ts.emplace_back([&, t] {
                std::mt19937 rng(100 + t);
                for (int i = 0; i < 300; ++i) {
                    const int l = static_cast<int>(rng() % 3);
                    std::vector<int32_t> call;
                    for (int e = 0; e < 8; ++e)
                        if (rng() % 3 == 0) call.push_back(e);
                    if (call.empty()) call.push_back(static_cast<int32_t>(rng() % 8));
                    if (!f.cache->will_need(l, call.data(), static_cast<int64_t>(call.size())).ok()) bad++;
                    std::vector<int32_t> sorted = call;
                    std::sort(sorted.begin(), sorted.end());
                    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) bad++;
                    const size_t upto = rng() % 5 == 0 ? call.size() / 2 : call.size();  // abandoned half-way
                    for (size_t j = 0; j < upto; ++j) {
                        ExpertSlice s;
                        void* tok = nullptr;
                        if (!f.cache->acquire(l, call[j], &s, &tok).ok()) {
                            bad++;
                            continue;
                        }
                        if (s.gate[0] != l * 16 + call[j] || s.gate[kData - 1] != l * 16 + call[j]) bad++;
                        f.cache->release(tok);
                    }
                    f.cache->end_call();
                }
            });
        for (auto& t : ts) t.join();
        EXPECT_EQ(bad.load(), 0) << entries << " entries";
        // Reads of abandoned calls may still be going on (pinned by the loader until they settle).
        for (int i = 0; i < 5000 && f.cache->device().stats().pinned_entries > 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        for (const TierStats& s : f.cache->tier_stats()) {
            if (s.name == "storage") continue;
            EXPECT_LE(s.peak_used, s.budget) << s.name;
            EXPECT_EQ(s.pinned_entries, 0u) << s.name;
        }
    }
}

// With a prefetch reserve (a CUDA worker sets its pin window), a prefetch batch leaves that many
// entries a request can reclaim beyond what is pinned (here: a call's kept experts), so the call's
// next misses never wait for the prefetch's reads nor need transient buffers.
TEST(ExpertCache, PrefetchLeavesRoomForTheCallsNextMiss) {
    CacheOptions o;
    o.device_bytes = 5 * entry_charge();
    o.background_call_loads = false;
    Fake f = make_cache(1, 8, 2, o);
    f.cache->device().set_prefetch_reserve(1);
    int32_t call[] = {0, 1};
    ASSERT_TRUE(f.cache->will_need(0, call, 2).ok());  // 0 and 1 kept (pinned) for the call
    size_t loaded = 0;
    ASSERT_TRUE(f.cache->device().load_batch({{0, 4}, {0, 5}, {0, 6}, {0, 7}}, false, &loaded).ok());
    EXPECT_EQ(loaded, 2u);  // 5 entries - 2 kept - 1 left reclaimable
    run_trace(*f.cache, {0, 1, 3});  // 3: the call's miss finds its entry (evicting a prefetched one)
    f.cache->end_call();
    EXPECT_EQ(f.cache->device().stats().transient, 0u);
    EXPECT_LE(f.cache->device().stats().peak_used, o.device_bytes);
    // Reserve 2: with nothing pinned, a batch of 5 loads only 3 of the 5 entries' room.
    Fake g = make_cache(1, 8, 2, o);
    g.cache->device().set_prefetch_reserve(2);
    ASSERT_TRUE(g.cache->device().load_batch({{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}}, false, &loaded).ok());
    EXPECT_EQ(loaded, 3u);
    // The hot set (forever) is not a prefetch: it may take the budget up to the last entry.
    ASSERT_TRUE(g.cache->device().load_batch({{0, 5}, {0, 6}}, true, &loaded).ok());
    EXPECT_EQ(loaded, 2u);
}

TEST(ExpertCache, ShardRestrictsWhatIsHeld) {
    CacheOptions o;
    Fake f = make_cache(2, 8, 1, o, {{1, 2}, {7}});
    EXPECT_TRUE(f.cache->holds(0, 1));
    EXPECT_FALSE(f.cache->holds(0, 3));
    EXPECT_TRUE(f.cache->holds(1, 7));
    EXPECT_EQ(f.cache->shard_bytes(), 3 * 750u);
    ExpertSlice s;
    void* t = nullptr;
    EXPECT_FALSE(f.cache->acquire(0, 3, &s, &t).ok());
}

// Two calls keep the same entry: the one whose batch read it counted its miss; the other call's
// acquire is a hit, and its end_call (an abandoned call) must not turn the first call's acquire
// into a second count of the same request.
TEST(ExpertCache, AnEntryKeptByTwoCallsCountsEachRequestOnce) {
    for (bool background : {false, true}) {
        CacheOptions o;
        o.device_bytes = 4 * entry_charge();
        o.background_call_loads = background;
        Fake f = make_cache(1, 8, 2, o);
        int32_t call[] = {1, 2};
        ASSERT_TRUE(f.cache->will_need(0, call, 2).ok());  // reads 1 and 2: two misses
        for (int i = 0; i < 5000 && f.cache->device().stats().fills < 2; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::thread other([&] {  // another call finds them resident, keeps them, then fails before acquiring
            int32_t c[] = {1, 2};
            EXPECT_TRUE(f.cache->will_need(0, c, 2).ok());
            f.cache->end_call();
        });
        other.join();
        run_trace(*f.cache, {1, 2});
        f.cache->end_call();
        TierStats s = f.cache->device().stats();
        EXPECT_EQ(s.misses, 2u) << "background " << background;
        EXPECT_EQ(s.hits, 0u) << "background " << background;  // 2 requests, both misses
        // The other call acquires them before the first one does: its requests are hits.
        int32_t call2[] = {3, 4};
        ASSERT_TRUE(f.cache->will_need(0, call2, 2).ok());
        for (int i = 0; i < 5000 && f.cache->device().stats().fills < 4; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        const uint64_t hits_before = f.cache->device().stats().hits;
        std::thread other2([&] {
            int32_t c[] = {3, 4};
            EXPECT_TRUE(f.cache->will_need(0, c, 2).ok());
            run_trace(*f.cache, {3, 4});
            f.cache->end_call();
            TierStats t = f.cache->device().stats();
            EXPECT_EQ(t.hits, hits_before + 2) << "background " << background;  // counted now, not later
        });
        other2.join();
        run_trace(*f.cache, {3, 4});
        f.cache->end_call();
        s = f.cache->device().stats();
        EXPECT_EQ(s.misses, 4u) << "background " << background;
        EXPECT_EQ(s.hits, hits_before + 2) << "background " << background;
        EXPECT_EQ(s.pinned_entries, 0u);
    }
}

// ---- the real model file -----------------------------------------------------------------------

std::string dir() {
    static const std::string d = temp_dir("expert_cache");
    return d;
}

// 3 layers, 16 experts top-4 of width 64, q8_0.
std::string model_path() {
    static const std::string p = [] {
        const std::string path = dir() + "/m.gguf";
        std::string out;
        const std::string cmd = moemesh_bin() + " make-model --out " + path +
                                " --layers 3 --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --experts 16 --top-k 4"
                                " --expert-ff 64 --vocab 600 --type q8_0 --seed 11";
        EXPECT_EQ(run_capture(cmd, &out, dir() + "/make.err"), 0) << read_file(dir() + "/make.err");
        return path;
    }();
    return p;
}

// An expert call of 5 random rows, row r routed to the experts (5r + 3j) mod E, j < 4, with random
// weights.
struct RandomCall {
    int64_t n_rows = 5;
    std::vector<float> x, weights;  // x: [n_rows, H]
    std::vector<int32_t> rows, experts;
    Status run(ExpertCompute& ec, int layer, std::vector<float>* out) const {
        out->assign(x.size(), 0.0f);
        return ec.compute(layer, x.data(), n_rows, rows.data(), experts.data(), weights.data(),
                          static_cast<int64_t>(rows.size()), out->data());
    }
};
RandomCall random_call(const ModelConfig& c, uint32_t seed) {
    RandomCall k;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    k.x.resize(static_cast<size_t>(k.n_rows * c.n_embd));
    for (auto& v : k.x) v = u(rng);
    for (int r = 0; r < k.n_rows; ++r)
        for (int j = 0; j < 4; ++j) {
            k.rows.push_back(r);
            k.experts.push_back(static_cast<int32_t>((r * 5 + j * 3) % c.n_expert));
            k.weights.push_back(u(rng));
        }
    return k;
}

TEST(ExpertCacheFile, TruncatedFileGivesAClearErrorNotAWrongAnswer) {
    const std::string copy = dir() + "/truncated.gguf";
    fs::copy_file(model_path(), copy, fs::copy_options::overwrite_existing);
    auto f = GgufFile::open(copy);
    ASSERT_TRUE(f.ok()) << f.status().message();
    auto cfg = load_model_config(*f.value());
    ASSERT_TRUE(cfg.ok());
    const ModelConfig& c = cfg.value();
    CacheOptions o;
    o.device_bytes = 1 << 20;
    auto cache = ExpertCache::create(*f.value(), c, {}, o);
    ASSERT_TRUE(cache.ok()) << cache.status().message();
    // The expert whose matrix lies furthest into the file: cut the file just before it ends.
    uint64_t last_end = 0;
    int last_layer = 0, last_expert = 0;
    for (int l = 0; l < c.n_layer; ++l) {
        auto w = layer_expert_weights(*f.value(), c, l);
        ASSERT_TRUE(w.ok());
        for (int e = 0; e < c.n_expert; ++e)
            for (const Weight* m : {&w.value().gate, &w.value().up, &w.value().down}) {
                const uint64_t end = static_cast<uint64_t>(m->matrix(e) - f.value()->base()) + m->matrix_bytes;
                if (end > last_end) {
                    last_end = end;
                    last_layer = l;
                    last_expert = e;
                }
            }
    }
    const int other = last_expert == 0 ? 1 : 0;
    ExpertSlice s;
    void* t = nullptr;
    ASSERT_TRUE(cache.value()->acquire(last_layer, other, &s, &t).ok());  // cached before the cut
    cache.value()->release(t);
    ASSERT_EQ(truncate(copy.c_str(), static_cast<off_t>(last_end - 10)), 0);
    Status st = cache.value()->acquire(last_layer, last_expert, &s, &t);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find(copy), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("ffn_"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("bytes ["), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("truncated"), std::string::npos) << st.message();
    // Through ExpertCompute: an error for the call, no output.
    ThreadPool pool(1);
    ExpertCompute compute(c, pool, cache.value());
    std::vector<float> x(static_cast<size_t>(c.n_embd), 0.5f), y(x.size(), 7.0f);
    const int32_t row = 0, e1 = last_expert, e0 = other;
    const float w = 1.0f;
    EXPECT_FALSE(compute.compute(last_layer, x.data(), 1, &row, &e1, &w, 1, y.data()).ok());
    EXPECT_TRUE(compute.compute(last_layer, x.data(), 1, &row, &e0, &w, 1, y.data()).ok());  // still cached
    const std::string line = cache.value()->stats_line();
    EXPECT_NE(line.find("2 errors"), std::string::npos) << line;  // both failed reads are counted
    // A call of two uncached experts reads them as one batch: the cut one's error is the call's,
    // worded as the acquire's above.
    int third = 0;
    while (third == other || third == last_expert) ++third;
    const int32_t rows2[] = {0, 0}, pair[] = {third, last_expert};
    const float w2[] = {0.5f, 0.5f};
    Status call = compute.compute(last_layer, x.data(), 1, rows2, pair, w2, 2, y.data());
    ASSERT_FALSE(call.ok());
    EXPECT_EQ(call.message(), st.message());
}

TEST(ExpertCacheFile, ComputeThroughTheCacheEqualsTheMappedFile) {
    auto f = GgufFile::open(model_path());
    ASSERT_TRUE(f.ok());
    auto cfg = load_model_config(*f.value());
    ASSERT_TRUE(cfg.ok());
    const ModelConfig& c = cfg.value();
    auto tables = map_expert_tables(*f.value(), c);
    ASSERT_TRUE(tables.ok());
    ThreadPool pool(2);
    ExpertCompute ref(c, pool, tables.value());
    CacheOptions o;
    o.device_bytes = 1;  // replaced below by one expert's charge
    auto probe = FileExpertReader::open(*f.value(), c);
    ASSERT_TRUE(probe.ok());
    o.device_bytes = HostTierMemory().charge(probe.value()->layouts()[0].size) + kCacheEntryOverhead;
    auto cache = ExpertCache::create(*f.value(), c, {}, o);
    ASSERT_TRUE(cache.ok()) << cache.status().message();
    ExpertCompute got(c, pool, cache.value());
    const RandomCall call = random_call(c, 5);
    for (int l = 0; l < c.n_layer; ++l) {
        std::vector<float> a, b;
        ASSERT_TRUE(call.run(ref, l, &a).ok());
        ASSERT_TRUE(call.run(got, l, &b).ok());
        EXPECT_EQ(a, b) << "layer " << l;
    }
    EXPECT_LE(cache.value()->device().stats().peak_used, o.device_bytes);
}

// Counts how the cache reads the file: batches (read_experts) and single reads.
class CountingReader final : public ExpertReader {
public:
    explicit CountingReader(std::unique_ptr<FileExpertReader> r) : r_(std::move(r)) {}
    Status read_expert(int layer, int expert, uint8_t* dst) override {
        singles++;
        return r_->read_expert(layer, expert, dst);
    }
    void read_experts(const std::vector<ExpertRead>& rs, std::vector<Status>* out, const ReadDone& done) override {
        {
            std::lock_guard<std::mutex> lk(mu);
            batches.push_back(rs.size());
        }
        r_->read_experts(rs, out, done);
    }
    std::unique_ptr<FileExpertReader> r_;
    std::mutex mu;
    std::vector<size_t> batches;
    std::atomic<int> singles{0};
};

// ExpertCompute announces each call's experts: with room for them, a call's misses are one batch
// of the file; with less, what fits is batched and the rest read one by one; outputs are
// bit-identical to the mapped file's in every case.
TEST(ExpertCacheFile, ComputeReadsACallsMissesAsOneBatchWithTheSameOutput) {
    auto f = GgufFile::open(model_path());
    ASSERT_TRUE(f.ok());
    auto cfg = load_model_config(*f.value());
    ASSERT_TRUE(cfg.ok());
    const ModelConfig& c = cfg.value();
    auto tables = map_expert_tables(*f.value(), c);
    ASSERT_TRUE(tables.ok());
    ThreadPool pool(2);
    ExpertCompute ref(c, pool, tables.value());
    const RandomCall call = random_call(c, 9);
    const size_t distinct = std::set<int32_t>(call.experts.begin(), call.experts.end()).size();
    ASSERT_GE(distinct, 4u);
    auto probe = FileExpertReader::open(*f.value(), c);
    ASSERT_TRUE(probe.ok());
    const uint64_t entry = HostTierMemory().charge(probe.value()->layouts()[0].size) + kCacheEntryOverhead;
    for (int combo = 0; combo < 6; ++combo) {
        const uint64_t entries = std::vector<uint64_t>{0, 3, 1}[combo % 3];  // 0: unlimited
        const bool background = combo >= 3;
        SCOPED_TRACE("budget of " + std::to_string(entries) + " entries, background loads " +
                     std::to_string(background));
        auto file = FileExpertReader::open(*f.value(), c);
        ASSERT_TRUE(file.ok());
        std::vector<ExpertLayout> layouts = file.value()->layouts();
        std::vector<ExpertTypes> types = file.value()->types();
        auto counting = std::make_unique<CountingReader>(std::move(file).value());
        CountingReader* reads = counting.get();
        CacheOptions o;
        o.device_bytes = entries * entry;
        o.background_call_loads = background;
        auto cache = ExpertCache::create_with_reader(std::move(counting), layouts, types, static_cast<int>(c.n_expert),
                                                     static_cast<int>(c.n_expert_used), {}, o);
        ASSERT_TRUE(cache.ok()) << cache.status().message();
        ExpertCompute got(c, pool, cache.value());
        for (int l = 0; l < c.n_layer; ++l)
            for (int rep = 0; rep < 2; ++rep) {
                std::vector<float> a, b;
                ASSERT_TRUE(call.run(ref, l, &a).ok());
                ASSERT_TRUE(call.run(got, l, &b).ok());
                EXPECT_EQ(a, b) << "layer " << l << " rep " << rep;
                if (l == 0 && rep == 0) {  // a fresh cache: every expert of the call is a miss
                    std::vector<size_t> want_batches;
                    if (entries == 0) want_batches = {distinct};
                    if (entries == 3) want_batches = {2};  // 3 entries less one kept free
                    EXPECT_EQ(reads->batches, want_batches);
                    EXPECT_EQ(reads->singles.load(), static_cast<int>(distinct - (entries == 0 ? distinct : entries == 3 ? 2 : 0)));
                }
            }
        const TierStats s = cache.value()->device().stats();
        if (entries == 0) {  // one batch per layer, the second call of each all hits
            EXPECT_EQ(reads->batches, std::vector<size_t>(static_cast<size_t>(c.n_layer), distinct));
            EXPECT_EQ(reads->singles.load(), 0);
            EXPECT_EQ(s.hits, s.misses);
        }
        if (entries == 1) {
            EXPECT_TRUE(reads->batches.empty());
        }
        EXPECT_EQ(s.misses, s.fills);  // every read was a request's miss, each counted once
        EXPECT_EQ(s.pinned_entries, 0u);
        EXPECT_EQ(s.transient, 0u);
        if (entries) {
            EXPECT_LE(s.peak_used, o.device_bytes);
        }
    }
}

// ---- offload mode: `moemesh run --device-budget` -----------------------------------------------

struct RunResult {
    int rc = -1;
    std::vector<int> greedy;
    std::string err;
};

RunResult run_json(const std::string& extra) {
    RunResult r;
    std::string out;
    const std::string err_file = dir() + "/run.err";
    r.rc = run_capture(moemesh_bin() + " run --model " + model_path() +
                           " --tokens 5,17,99,3,250,41,7,7,300,12,64,1,9,500 --json --greedy -n 16 --threads 2 " + extra,
                       &out, err_file);
    r.err = read_file(err_file);
    if (r.rc == 0) {
        try {
            r.greedy = nlohmann::json::parse(out)["greedy"].get<std::vector<int>>();
        } catch (const std::exception& e) {
            r.err += std::string("\nbad JSON: ") + e.what();
        }
    }
    return r;
}

// Bytes one expert is charged in the device tier of the test model.
uint64_t model_entry_charge(int* n_entries) {
    auto f = GgufFile::open(model_path());
    EXPECT_TRUE(f.ok());
    auto c = load_model_config(*f.value());
    auto r = FileExpertReader::open(*f.value(), c.value());
    EXPECT_TRUE(r.ok());
    *n_entries = static_cast<int>(c.value().n_layer * c.value().n_expert);
    return HostTierMemory().charge(r.value()->layouts()[0].size) + kCacheEntryOverhead;
}

// A profile favouring low expert ids in every layer (any counts will do: outputs must not change).
std::string write_profile() {
    ExpertProfile p;
    p.n_layer = 3;
    p.n_expert = 16;
    p.tokens = 100;
    for (int l = 0; l < 3; ++l) {
        p.counts.emplace_back();
        for (int e = 0; e < 16; ++e) p.counts.back().push_back(static_cast<uint64_t>((16 - e) * (l + 1)));
    }
    const std::string path = dir() + "/profile.json";
    FILE* fp = std::fopen(path.c_str(), "w");
    const std::string js = expert_profile_json(p);
    std::fwrite(js.data(), 1, js.size(), fp);
    std::fclose(fp);
    return path;
}

TEST(OffloadRun, GreedyTokensMatchForEveryPolicyAndBudget) {
    RunResult ref = run_json("");
    ASSERT_EQ(ref.rc, 0) << ref.err;
    ASSERT_EQ(ref.greedy.size(), 16u);
    int n = 0;
    const uint64_t charge = model_entry_charge(&n);
    const std::string profile = write_profile();
    const std::vector<std::string> policies = {"--cache-policy lru", "--cache-policy lfu",
                                               "--cache-policy static --profile " + profile,
                                               "--cache-policy static --profile " + profile + " --prefetch next-layer",
                                               "--cache-policy lru --host-budget " + std::to_string(n / 4 * charge)};
    // All experts, half, a tenth, one.
    for (int entries : {n, n / 2, n / 10, 1}) {
        for (const std::string& p : policies) {
            const std::string flags = "--device-budget " + std::to_string(entries * charge) + " " + p;
            RunResult r = run_json(flags);
            ASSERT_EQ(r.rc, 0) << flags << "\n" << r.err;
            EXPECT_EQ(r.greedy, ref.greedy) << flags;
            EXPECT_NE(r.err.find("cache: device"), std::string::npos) << r.err;
            if (entries < n && p.find("static") == std::string::npos) {
                EXPECT_EQ(r.err.find(" 0 evictions"), std::string::npos) << r.err;  // the cache was exercised
            }
        }
    }
}

TEST(OffloadRun, ClearErrorsForBadBudgetsAndFlags) {
    RunResult r = run_json("--device-budget 1KiB");
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("cannot hold one expert"), std::string::npos) << r.err;
    r = run_json("--device-budget 10MiB --cache-policy static");
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("needs an expert profile"), std::string::npos) << r.err;
    r = run_json("--device-budget 10MiB --cache-policy mru");
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("unknown cache policy 'mru'"), std::string::npos) << r.err;
    r = run_json("--device-budget lots");
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("--device-budget"), std::string::npos) << r.err;
    r = run_json("--cache-policy lfu");
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("need --device-budget"), std::string::npos) << r.err;
    r = run_json("--device-budget 10MiB --host-budget auto");  // the CPU: no pinned tier to size
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("--host-budget auto is for --device cuda:N"), std::string::npos) << r.err;
}

// `--host-budget auto`: every routed expert (the *_exps.* tensors, nothing else), or half of
// MemAvailable when that is less; no tier below 256 MiB either way or when MemAvailable is unknown.
TEST(OffloadRun, AutoHostBudgetIsTheRoutedExpertsOrHalfTheFreeMemory) {
    GgufWriter w;
    w.set_string("general.architecture", "qwen3moe");
    const int64_t n = int64_t{130} << 18;  // 130 MiB of f32 each
    w.add_tensor("blk.0.ffn_gate_exps.weight", GgmlType::F32, {n}, std::vector<uint8_t>(static_cast<size_t>(4 * n)));
    w.add_tensor("blk.0.ffn_up_exps.weight", GgmlType::F32, {n}, std::vector<uint8_t>(static_cast<size_t>(4 * n)));
    w.add_tensor("blk.0.attn_q.weight", GgmlType::F32, {1024}, std::vector<uint8_t>(4096));
    const std::vector<uint8_t> bytes = w.serialize();
    auto f = GgufFile::from_memory(bytes.data(), bytes.size(), "mem");
    ASSERT_TRUE(f.ok()) << f.status().message();
    const uint64_t MiB = uint64_t{1} << 20, routed = 260 * MiB;
    std::string note;
    EXPECT_EQ(auto_host_budget(*f.value(), 1024 * MiB, &note), routed) << note;
    EXPECT_NE(note.find("every routed expert"), std::string::npos) << note;
    EXPECT_EQ(auto_host_budget(*f.value(), 520 * MiB, &note), routed) << note;
    EXPECT_EQ(auto_host_budget(*f.value(), 516 * MiB, &note), 258 * MiB) << note;
    EXPECT_NE(note.find("half of MemAvailable"), std::string::npos) << note;
    EXPECT_EQ(auto_host_budget(*f.value(), 400 * MiB, &note), 0u) << note;
    EXPECT_NE(note.find("to spare"), std::string::npos) << note;
    EXPECT_EQ(auto_host_budget(*f.value(), 0, &note), 0u) << note;
    EXPECT_NE(note.find("unknown"), std::string::npos) << note;
    GgufWriter small;
    small.set_string("general.architecture", "qwen3moe");
    small.add_tensor("blk.0.ffn_down_exps.weight", GgmlType::F32, {1024}, std::vector<uint8_t>(4096));
    const std::vector<uint8_t> sb = small.serialize();
    auto sf = GgufFile::from_memory(sb.data(), sb.size(), "small");
    ASSERT_TRUE(sf.ok()) << sf.status().message();
    EXPECT_EQ(auto_host_budget(*sf.value(), 1024 * MiB, &note), 0u) << note;
    EXPECT_NE(note.find("only 4.00 KiB"), std::string::npos) << note;
}

TEST(Profile, CountsEveryRoutedPairAndFeedsTheStaticPolicy) {
    const std::string prompts = dir() + "/prompts.txt";
    {
        FILE* f = std::fopen(prompts.c_str(), "w");
        std::fputs("hello world\nthe quick brown fox\n\nanother prompt\n", f);
        std::fclose(f);
    }
    const std::string out_path = dir() + "/made_profile.json";
    std::string out;
    const std::string log = dir() + "/profile.err";
    ASSERT_EQ(run_capture(moemesh_bin() + " profile --model " + model_path() + " --prompts " + prompts + " --out " +
                              out_path + " -n 4 --threads 1",
                          &out, log),
              0)
        << read_file(log);
    auto p = load_expert_profile(out_path);
    ASSERT_TRUE(p.ok()) << p.status().message();
    EXPECT_EQ(p.value().n_layer, 3);
    EXPECT_EQ(p.value().n_expert, 16);
    // Every token routes top-4 in every layer.
    for (const auto& layer : p.value().counts) {
        uint64_t sum = 0;
        for (uint64_t c : layer) sum += c;
        EXPECT_EQ(sum, 4 * p.value().tokens);
    }
    RunResult ref = run_json("");
    int n = 0;
    const uint64_t charge = model_entry_charge(&n);
    RunResult r = run_json("--device-budget " + std::to_string(n / 4 * charge) + " --cache-policy static --profile " +
                           out_path);
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(r.greedy, ref.greedy);
    EXPECT_NE(r.err.find("hot set"), std::string::npos) << r.err;
    // A profile of another shape is refused.
    ExpertProfile wrong = p.value();
    wrong.n_layer = 2;
    wrong.counts.pop_back();
    const std::string wrong_path = dir() + "/wrong_profile.json";
    FILE* f = std::fopen(wrong_path.c_str(), "w");
    const std::string js = expert_profile_json(wrong);
    std::fwrite(js.data(), 1, js.size(), f);
    std::fclose(f);
    r = run_json("--device-budget 1MiB --cache-policy static --profile " + wrong_path);
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.err.find("is for 2 layers x 16 experts, the model has 3 x 16"), std::string::npos) << r.err;
}

// ---- workers with a cache: entry (moemesh launch) ------------------------------------------------

TEST(ClusterCache, WorkerCachesFromTheYamlGiveTheSameTokens) {
    const std::string worker = fs::path(moemesh_bin()).parent_path().string() + "/moemesh-worker";
    if (!fs::exists(worker)) GTEST_SKIP() << worker << " is not built";
    RunResult ref = run_json("");
    ASSERT_EQ(ref.rc, 0) << ref.err;
    int n = 0;
    const uint64_t charge = model_entry_charge(&n);
    const std::string profile = write_profile();
    const std::string d = dir() + "/cl";
    fs::create_directories(d);
    const std::string yaml = d + "/cluster.yaml";
    {
        FILE* f = std::fopen(yaml.c_str(), "w");
        const std::string text = str_printf(
            "model: %s\nworkers:\n"
            "  - {name: w0, address: unix:%s/w0.sock, threads: 1, experts: \"0-5\", cache: {device: %llu, policy: lfu}}\n"
            "  - {name: w1, address: unix:%s/w1.sock, threads: 1, experts: \"6-11\",\n"
            "     cache: {device: %llu, host: %llu, policy: static, prefetch: next-layer, profile: profile.json}}\n"
            "  - {name: w2, transport: inproc, experts: \"12-15\", cache: {host: %llu}}\n",
            model_path().c_str(), d.c_str(), static_cast<unsigned long long>(charge), d.c_str(),
            static_cast<unsigned long long>(4 * charge), static_cast<unsigned long long>(8 * charge),
            static_cast<unsigned long long>(2 * charge));
        std::fwrite(text.data(), 1, text.size(), f);
        std::fclose(f);
        fs::copy_file(profile, d + "/profile.json", fs::copy_options::overwrite_existing);
    }
    std::string out;
    const std::string log = d + "/launch.log";
    ASSERT_EQ(run_capture(moemesh_bin() + " launch " + yaml +
                              " --tokens 5,17,99,3,250,41,7,7,300,12,64,1,9,500 --json --greedy -n 16 --threads 1",
                          &out, log),
              0)
        << read_file(log);
    const std::string err = read_file(log);
    EXPECT_EQ(nlohmann::json::parse(out)["greedy"].get<std::vector<int>>(), ref.greedy);
    // The coordinator's stats line carries each worker's cache line (from its gRPC stats).
    EXPECT_NE(err.find("w0: "), std::string::npos) << err;
    EXPECT_NE(err.find("(cache: device 16.25 KiB lfu:"), std::string::npos) << err;
    EXPECT_NE(err.find("static: "), std::string::npos) << err;
    EXPECT_NE(err.find("| host 130.00 KiB:"), std::string::npos) << err;  // w1's host tier
    EXPECT_NE(err.find("(cache: host 32.50 KiB lru:"), std::string::npos) << err;  // w2: one tier, in-process
    // A budget below one expert is refused at placement time, naming the worker and the field.
    const std::string bad = d + "/bad.yaml";
    {
        FILE* f = std::fopen(bad.c_str(), "w");
        const std::string text = str_printf("model: %s\nworkers:\n  - {name: w0, address: unix:%s/b.sock, experts: "
                                            "\"0-15\", cache: {device: 1KiB}}\n",
                                            model_path().c_str(), d.c_str());
        std::fwrite(text.data(), 1, text.size(), f);
        std::fclose(f);
    }
    EXPECT_EQ(run_capture(moemesh_bin() + " placement check " + bad + " --model " + model_path(), &out, log), 1);
    EXPECT_NE(read_file(log).find("worker 'w0': cache.device = 1.00 KiB cannot hold one expert"), std::string::npos)
        << read_file(log);
}

}  // namespace
}  // namespace moemesh
