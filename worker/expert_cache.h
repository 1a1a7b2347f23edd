// Expert cache hierarchy of a worker (or of `moemesh run --device-budget`):
//
//   device tier (bounded pool: a hot RAM pool on CPU; VRAM later) ◀ host tier (bounded RAM pool,
//   optional) ◀ storage tier (the model file, read with pread or io_uring: worker/expert_storage.h)
//
// Compute reads experts from the device tier. A device miss fills from the host tier when there is
// one (a host miss reads the file into the host tier first), else straight from the file. With a
// host budget and no device budget (a CPU worker's `cache: {host: 96GB}`) there is one tier, named
// host, that compute reads directly; with neither, one unlimited device tier.
//
// Budgets are hard limits: a tier's accounted bytes (`used`) never exceed its budget. An entry is
// charged its page-rounded buffer (gate, up and down matrices, each on a 64-byte boundary) plus
// kCacheEntryOverhead bytes for its bookkeeping; a tier whose budget cannot hold one expert of the
// shard is refused at creation. Space is reserved before the bytes are read, so entries being loaded
// count too.
//
// Policies pick the victim among resident, unpinned entries:
//   lru     least recently used;
//   lfu     fewest uses since the cache started (counts survive eviction, ties: least recent);
//   static  a hot set (the most used experts of a profile, see `moemesh profile`) loaded at start
//           and never evicted, LRU for the rest. The hot set fills the device budget except room for
//           max(top-k, (1 - hot_share) * capacity) entries (hot_share 0.95 by default).
// The host tier uses LFU under `lfu` and LRU otherwise.
//
// Concurrency: one mutex per tier, never held while reading. Concurrent misses on one expert load it
// once (single-flight: later requesters wait for the first one's read). An acquired expert is pinned
// (refcount) and never evicted under its reader. When a miss needs room and every resident entry is
// pinned, the requester waits for a release — unless the requesting thread itself holds a pin in
// that tier (waiting could deadlock): then it reads the expert into a transient buffer outside the
// budget, freed at release, and counted in `transient` (ExpertCompute holds one pin in use at a time,
// so it never needs one).
//
// A call's misses are read together: ExpertCompute announces the call's experts (will_need) and the
// cache reads the absent ones with one batched read (io_uring: all at once) and keeps them, and the
// call's resident ones, pinned for the call; kept pins are not "held" for the transient rule, since
// a kept set always leaves one entry of room (CacheTier::keep_for_call).
//
// A VRAM tier slots in as another TierMemory (cudaMalloc'd buffers, copies from the pinned host tier
// with cudaMemcpyAsync) under the same CacheTier; see docs/cache.md.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <deque>
#include <functional>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "worker/expert_compute.h"
#include "worker/expert_storage.h"

namespace moemesh {

inline constexpr uint64_t kCacheEntryOverhead = 256;  // bytes charged per entry for its bookkeeping

enum class CachePolicy { kLru, kLfu, kStatic };
enum class PrefetchMode { kNone, kNextLayer };
StatusOr<CachePolicy> parse_cache_policy(const std::string& s);  // "lru" | "lfu" | "static"
// A cache budget flag's size ("6GiB"; `flag` names it in errors): more than 0; "" gives 0 (not set).
StatusOr<uint64_t> parse_cache_budget(const std::string& s, const char* flag);
StatusOr<PrefetchMode> parse_prefetch_mode(const std::string& s);  // "none" | "next-layer"
const char* cache_policy_name(CachePolicy p);
const char* prefetch_mode_name(PrefetchMode p);

// Per-layer expert activation counts, as `moemesh profile` writes them:
//   {"format": "moemesh-expert-profile", "version": 1, "model": "...", "n_layer": L, "n_expert": E,
//    "tokens": N, "counts": [[c_0_0, ..., c_0_{E-1}], ...]}   counts[layer][expert]: (token, expert) pairs routed
struct ExpertProfile {
    int n_layer = 0, n_expert = 0;
    uint64_t tokens = 0;
    std::string model;
    std::vector<std::vector<uint64_t>> counts;  // [layer][expert]
};
StatusOr<ExpertProfile> parse_expert_profile(const std::string& json_text, const std::string& name_for_errors);
StatusOr<ExpertProfile> load_expert_profile(const std::string& path);
std::string expert_profile_json(const ExpertProfile& p);

class TierMemory;

// `--device-budget auto` on a GPU: VRAM the cache leaves free for the forward pass's scratch
// (activations, attention and cuBLAS workspaces, logits; a worker's calls), beside any KV caches.
inline constexpr uint64_t kAutoDeviceScratch = uint64_t{512} << 20;

// How a worker caches its shard (the `cache:` entry of its placement, or `moemesh run --device-budget`).
struct CacheOptions {
    uint64_t device_bytes = 0;  // device tier budget; 0: unlimited
    // With device_bytes 0 on a GPU (CudaExpertCompute): VRAM to leave free beside the cache (the
    // KV caches and scratch of `--device-budget auto`); 0: the cache takes up to 90% of what is free.
    uint64_t device_keep_free = 0;
    uint64_t host_bytes = 0;    // host tier budget; 0: no host tier
    CachePolicy policy = CachePolicy::kLru;
    PrefetchMode prefetch = PrefetchMode::kNone;
    std::string profile_path;   // for `static`: the profile file
    ExpertProfile profile;      // for `static` (loaded from profile_path when counts are empty)
    // `static`: the share of the device budget's entries the hot set may take; the rest (at least
    // top-k entries) is LRU. 0.95: tuned on bench_cache.sh's skewed model (docs/cache.md).
    double hot_share = 0.95;
    StorageMode storage = StorageMode::kAuto;  // how the file is read (parse_storage_mode)
    // Reference storage→memory bandwidth for the stall bound (bytes/s). 0: measured at creation by
    // reading up to bandwidth_probe_bytes of distinct experts as misses read them (0 bytes: no
    // probe, no bound). See docs/cache.md.
    double storage_bandwidth = 0;
    uint64_t bandwidth_probe_bytes = 64ull << 20;
    // A call's misses are read by a background thread of the compute tier while the call computes
    // the experts it already has (each expert usable as soon as its own read is done); false: the
    // call's will_need reads them itself before the call computes anything (docs/cache.md).
    bool background_call_loads = true;
    // Where the tiers' bytes live (null: HostTierMemory). `compute_memory` is the memory of the tier
    // compute reads (the device tier, or the lone host tier); `host_memory` that of a host tier below
    // it. A CUDA worker passes VRAM and pinned host memory here.
    std::function<std::unique_ptr<TierMemory>()> compute_memory, host_memory;
};

// Where a tier's bytes live. HostTierMemory: anonymous mmap (freed pages go back to the system at
// once). A CUDA device tier would allocate VRAM and copy from (pinned) host memory.
class TierMemory {
public:
    virtual ~TierMemory() = default;
    virtual uint64_t charge(uint64_t bytes) const = 0;  // bytes accounted for an allocation of `bytes`
    virtual StatusOr<uint8_t*> allocate(uint64_t bytes) = 0;
    virtual void free(uint8_t* p, uint64_t bytes) = 0;
    // Fills dst (allocated here, `bytes` long) with the expert's bytes from the tier or file below.
    // Host memory reads straight into dst; a device memory stages through (pinned) host memory and
    // copies, or copies directly from the entry of a CacheTier below (dynamic_cast + acquire).
    virtual Status fill(ExpertReader& below, int layer, int expert, uint8_t* dst, uint64_t bytes) {
        (void)bytes;
        return below.read_expert(layer, expert, dst);
    }
    // Several fills at once ((*out)[i]: the outcome of reads[i]; dst and bytes as for fill; `done`
    // as ExpertReader::read_experts'). The default calls fill() for each, so a memory that only
    // overrides fill() stays correct; host memory hands the whole batch to the reader below
    // (io_uring submits it together).
    virtual void fill_batch(ExpertReader& below, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                            const ReadDone& done = nullptr) {
        out->assign(reads.size(), Status());
        for (size_t i = 0; i < reads.size(); ++i) {
            (*out)[i] = fill(below, reads[i].layer, reads[i].expert, reads[i].dst, reads[i].bytes);
            if (done) done(i);
        }
    }
};
class HostTierMemory final : public TierMemory {
public:
    uint64_t charge(uint64_t bytes) const override;
    StatusOr<uint8_t*> allocate(uint64_t bytes) override;
    void free(uint8_t* p, uint64_t bytes) override;
    void fill_batch(ExpertReader& below, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                    const ReadDone& done = nullptr) override {
        below.read_experts(reads, out, done);
    }
};

struct TierStats {
    std::string name;
    uint64_t budget = 0;           // 0: unlimited
    uint64_t used = 0, peak_used = 0, entries = 0, pinned_entries = 0;
    uint64_t hits = 0, misses = 0; // requests (acquire, or reads by the tier above)
    uint64_t coalesced = 0;        // misses that waited for another requester's load (single-flight)
    uint64_t fills = 0, bytes_in = 0;  // loads from below, and their bytes
    uint64_t miss_bytes = 0;       // bytes of the loads requests waited for (each load once; not prefetch/preload)
    uint64_t evictions = 0, transient = 0, errors = 0, preloaded = 0;
    double fill_seconds = 0;       // time spent reading from below (bytes/s = bytes_in / fill_seconds)
    double stall_seconds = 0;      // time requesters waited on misses (loads, room)
    // The tier compute reads: the stall the storage reads requests waited for would take at the
    // storage bandwidth (bytes that came from the file on demand / bandwidth); 0: no bandwidth known.
    // The storage row: bandwidth = the reference read bandwidth (bytes/s; see CacheOptions).
    double bound_seconds = 0, bandwidth = 0;
    double hit_rate() const { return hits + misses ? static_cast<double>(hits) / static_cast<double>(hits + misses) : 0; }
};

// One budgeted tier of whole experts over a reader below it.
class CacheTier final : public ExpertReader {
public:
    CacheTier(std::string name, uint64_t budget, CachePolicy policy, std::vector<ExpertLayout> layouts, int n_expert,
              ExpertReader* below, std::unique_ptr<TierMemory> memory);
    ~CacheTier() override;

    // Pins the expert (loading it on a miss); *data = its buffer, laid out as layouts()[layer].
    Status acquire(int layer, int expert, uint8_t** data, void** token);
    void release(void* token);
    // The tier above reads through this tier (a hit here, or a fill from below, then a copy).
    Status read_expert(int layer, int expert, uint8_t* dst) override;
    // Loads the expert if absent and keeps it resident for good (static hot set). Fails when the
    // budget has no unpinned room left.
    Status pin_forever(int layer, int expert);
    // Loads the expert in the caller's thread if absent and there is room without waiting; no pin is
    // kept. Returns false when it was resident, loading, or there was no room (prefetch).
    bool prefetch(int layer, int expert);
    // Many experts with one batched read from below: forever, as pin_forever (entries being loaded
    // by another requester are waited for; the first error is returned after the whole batch has
    // settled); else as prefetch (absent experts only, into room available without waiting that
    // leaves set_prefetch_reserve entries reclaimable; the rest are skipped). *loaded: how many were
    // read.
    Status load_batch(const std::vector<std::pair<int, int>>& experts, bool forever, size_t* loaded);
    // For a call about to acquire `experts` of `layer` (distinct) one at a time: keeps the call's
    // resident experts (pinned, so the call's own misses cannot evict them) and reads its absent
    // ones with one batched read from below, into room that is free or evictable without touching
    // the call's experts. Budget permitting, everything is kept; when the call's set does not fit,
    // as much as fits while one entry of room stays reclaimable (the rest of the call goes through
    // acquire, one by one, and needs it). Entries another requester is loading are left to acquire
    // (single-flight). The batch is a request: each load counts as a miss (and in miss_bytes), the
    // wait as stall. *kept: (expert, token) per kept entry, for take_kept or drop_kept; the first
    // *ready of them are resident now, the rest are being read, in reading order.
    // With background loads (set_background_loads) the absent ones are queued for the tier's loader
    // thread and this returns once their room is reserved: take_kept waits for each (stall) and
    // returns a failed load's error. Without, this reads them itself and returns the first failed
    // load's error, worded as acquire's; failed loads are not cached (their tokens are not in *kept).
    // pins_at_once: the call's acquires hold up to this many pins at a time (a CUDA call's window):
    // when the call's set does not fit, that many entries of room stay reclaimable instead of one.
    Status keep_for_call(int layer, const std::vector<int>& experts, std::vector<std::pair<int, void*>>* kept,
                         size_t* ready = nullptr, uint64_t pins_at_once = 1);
    // A kept entry, acquired: *data as acquire gives it; the pin moves to the caller (release()).
    // Waits while it is still being read; a failed read returns its error (and drops the kept pin).
    // read_by_keep: the token is one this call's keep_for_call read (after *ready), whose miss it
    // counted: no hit now (another call keeping the same entry takes it as a hit).
    Status take_kept(void* token, uint8_t** data, bool read_by_keep);
    void drop_kept(void* token);  // a kept entry the call did not acquire
    bool resident(int layer, int expert) const;
    // Reads keep_for_call's misses on a loader thread of this tier (started on first use).
    void set_background_loads(bool on) { background_ = on; }
    // Entries of room a prefetch (load_batch, not forever) leaves reclaimable beyond what is pinned,
    // loading or in the hot set. 0 by default: on the CPU a call's miss that finds every entry pinned
    // by a prefetch read waits for it (a wait, within the budget), and a reserve cost static +
    // prefetch 4 points of hit rate on bench_cache.sh for no speed; a CUDA worker sets its pin window
    // (its call holds several pins, and would read into transient VRAM outside the budget instead).
    void set_prefetch_reserve(uint64_t entries) {
        std::lock_guard<std::mutex> lk(mu_);
        prefetch_reserve_ = entries;
    }

    TierStats stats() const;
    // (layer, expert) of every eviction so far, in order (tests; capped at 4096).
    std::vector<std::pair<int, int>> eviction_log() const;
    uint64_t max_entry_charge() const { return max_charge_; }
    uint64_t budget() const { return budget_; }
    void reset_counters();

private:
    struct Entry;
    enum class State { kLoading, kReady, kFailed };
    uint64_t charge_of(int layer) const;
    Entry* pick_victim();
    bool settle(Entry* e, const Status& st);  // a finished load, under the lock; false: it failed
    // keep: receives the victim's buffer instead of freeing it when it is keep_size bytes (reused by
    // the entry that needed the room; the victim's charge is released all the same).
    void evict(Entry* e, uint8_t** keep = nullptr, uint64_t keep_size = 0);
    void destroy(Entry* e);
    int held_by_this_thread() const;
    Status acquire_impl(int layer, int expert, bool forever, bool prefetch_only, uint8_t** data, void** token,
                        bool* skipped);
    // Reads the buffers of `batch` (entries being loaded, pinned by the caller) with one fill_batch,
    // without the lock; (*out)[i]: batch[i]'s outcome, worded as acquire's. `each(i)`, when given,
    // is called as soon as (*out)[i] is final. Returns the seconds taken.
    double read_batch(const std::vector<Entry*>& batch, std::vector<Status>* out,
                      const std::function<void(size_t)>& each = nullptr);
    void loader_loop();  // the background loads of keep_for_call, batch after batch

    const std::string name_;
    const uint64_t budget_;
    const CachePolicy policy_;
    const std::vector<ExpertLayout> layouts_;
    const int n_expert_;
    ExpertReader* const below_;
    const std::unique_ptr<TierMemory> mem_;
    uint64_t max_charge_ = 0;

    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::map<int64_t, Entry*> map_;         // key layer * n_expert + expert
    std::vector<uint64_t> uses_;            // [layer * n_expert + expert]: LFU counts
    uint64_t tick_ = 0;
    TierStats st_;
    std::vector<std::pair<int, int>> evicted_;
    // Background loads: batches of entries (each pinned once for the loader) under mu_.
    bool background_ = false;
    bool loader_stop_ = false;
    uint64_t prefetch_reserve_ = 0;
    std::deque<std::vector<Entry*>> load_queue_;
    std::condition_variable loader_cv_;
    std::thread loader_;
};

// The cache a worker computes from: an ExpertSource over device ◀ host ◀ file, restricted to a
// shard (null: every expert), with stats and optional next-layer prefetch.
class ExpertCache final : public ExpertSource {
public:
    // `shard`: [layer] sorted expert ids served here (empty vector: every expert of the model).
    // Errors: a budget that cannot hold one expert, a static policy without a usable profile, a
    // profile for another model shape, an unreadable file.
    static StatusOr<std::shared_ptr<ExpertCache>> create(const GgufFile& f, const ModelConfig& c,
                                                          const std::vector<std::vector<int>>& shard,
                                                          const CacheOptions& o);
    // Another reader than the file below everything (tests: a scripted storage tier).
    static StatusOr<std::shared_ptr<ExpertCache>> create_with_reader(std::unique_ptr<ExpertReader> storage,
                                                                      std::vector<ExpertLayout> layouts,
                                                                      std::vector<ExpertTypes> types, int n_expert,
                                                                      int n_expert_used,
                                                                      const std::vector<std::vector<int>>& shard,
                                                                      const CacheOptions& o);
    ~ExpertCache() override;

    // Loads the static hot set (no-op for lru/lfu). Separate from create() so a worker can report
    // progress and the coordinator sees it as shard loading.
    Status warm_up();
    uint64_t hot_set_bytes() const { return hot_bytes_; }
    double storage_bandwidth() const { return bandwidth_; }  // bytes/s; 0: unknown

    int num_layers() const override { return static_cast<int>(layouts_.size()); }
    ExpertTypes types(int layer) const override { return types_[layer]; }
    bool holds(int layer, int expert) const override;
    Status acquire(int layer, int expert, ExpertSlice* slice, void** token) override;
    void release(void* token) override;
    void will_compute(int layer, const float* x, int64_t n_rows) override;
    // The call's experts in one batched read (CacheTier::keep_for_call on the compute tier), kept
    // for this thread's acquires until end_call; experts reordered: resident ones first, then those
    // acquire reads itself, then those being read in the background, in reading order.
    Status will_need(int layer, int32_t* experts, int64_t n, int64_t pins_at_once = 1) override;
    void end_call() override;

    // Next-layer prediction: router weights [E, H] of each layer (f32, dequantized at creation).
    void set_routers(std::vector<std::vector<float>> routers, int64_t hidden) {
        routers_ = std::move(routers);
        hidden_ = hidden;
    }

    const CacheOptions& options() const { return opts_; }
    uint64_t shard_bytes() const { return shard_bytes_; }
    CacheTier& device() { return *device_; }  // the tier compute reads (named "host" when it is the only one)
    CacheTier* host() { return host_.get(); }
    std::vector<TierStats> tier_stats() const;  // device, [host], storage
    // "cache: device 6.00 GiB lru: 84.1% hits (1234/1467), 1.2 GiB in at 2.1 GB/s, stall 0.812 s (bound 0.620 s at
    //  2.10 GB/s: 1.31×), ... | host ... | storage (io_uring): 233 reads, 1.2 GiB at 2.0 GB/s (reference 2.10 GB/s)"
    std::string stats_line() const;
    void reset_counters();

private:
    ExpertCache() = default;
    void prefetch_loop();
    double probe_storage_bandwidth(uint64_t max_bytes);

    CacheOptions opts_;
    std::vector<ExpertLayout> layouts_;
    std::vector<ExpertTypes> types_;
    int n_expert_ = 0, n_expert_used_ = 0;
    std::vector<std::vector<uint8_t>> held_;  // [layer][expert]: in the shard
    uint64_t shard_bytes_ = 0, hot_bytes_ = 0;
    double bandwidth_ = 0;
    std::unique_ptr<ExpertReader> storage_;
    FileExpertReader* file_ = nullptr;  // = storage_ when it is the file
    std::unique_ptr<CacheTier> host_, device_;
    std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();

    // Prefetch: a queue of (layer, expert) served by one background thread.
    std::vector<std::vector<float>> routers_;
    int64_t hidden_ = 0;
    std::mutex pf_mu_;
    std::condition_variable pf_cv_;
    std::deque<std::pair<int, int>> pf_queue_;
    bool pf_stop_ = false;
    std::thread pf_thread_;
    std::atomic<uint64_t> pf_issued_{0}, pf_loaded_{0};
    std::vector<float> pf_scores_;
};

// Router weights of every layer as f32 [E, H] (for next-layer prefetch).
StatusOr<std::vector<std::vector<float>>> load_router_weights(const GgufFile& f, const ModelConfig& c);

}  // namespace moemesh
