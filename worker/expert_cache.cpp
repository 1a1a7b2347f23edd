// The expert cache a worker computes from (worker/expert_cache.h): ExpertCache over its tiers
// (CacheTier: cache_tier.cpp), policies and profiles, warm-up of the static hot set, next-layer
// prefetch, the storage bandwidth probe and the stats line.
#include "worker/expert_cache.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/arch.h"
#include "common/placement.h"
#include "common/weights.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

StatusOr<uint64_t> parse_cache_budget(const std::string& s, const char* flag) {
    if (s.empty()) return uint64_t{0};
    StatusOr<uint64_t> r = parse_size(s);
    if (!r.ok()) return MM_ERROR("%s: %s", flag, r.status().message().c_str());
    if (r.value() == 0) return MM_ERROR("%s must be more than 0", flag);
    return r.value();
}

StatusOr<CachePolicy> parse_cache_policy(const std::string& s) {
    if (s == "lru") return CachePolicy::kLru;
    if (s == "lfu") return CachePolicy::kLfu;
    if (s == "static") return CachePolicy::kStatic;
    return MM_ERROR("unknown cache policy '%s' (expected lru, lfu or static)", s.c_str());
}
StatusOr<PrefetchMode> parse_prefetch_mode(const std::string& s) {
    if (s == "none") return PrefetchMode::kNone;
    if (s == "next-layer") return PrefetchMode::kNextLayer;
    return MM_ERROR("unknown prefetch mode '%s' (expected none or next-layer)", s.c_str());
}
const char* cache_policy_name(CachePolicy p) {
    return p == CachePolicy::kLru ? "lru" : p == CachePolicy::kLfu ? "lfu" : "static";
}
const char* prefetch_mode_name(PrefetchMode p) { return p == PrefetchMode::kNone ? "none" : "next-layer"; }

// ---- profiles --------------------------------------------------------------------------------

StatusOr<ExpertProfile> parse_expert_profile(const std::string& text, const std::string& name) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const std::exception& e) {
        return MM_ERROR("%s: not JSON: %s", name.c_str(), e.what());
    }
    ExpertProfile p;
    try {
        if (!j.is_object() || j.value("format", "") != "moemesh-expert-profile")
            return MM_ERROR("%s: not an expert profile (expected \"format\": \"moemesh-expert-profile\"; write one with "
                            "moemesh profile)",
                            name.c_str());
        p.n_layer = j.at("n_layer").get<int>();
        p.n_expert = j.at("n_expert").get<int>();
        p.tokens = j.value("tokens", uint64_t{0});
        p.model = j.value("model", "");
        const auto& c = j.at("counts");
        if (!c.is_array() || static_cast<int>(c.size()) != p.n_layer || p.n_layer <= 0 || p.n_expert <= 0)
            return MM_ERROR("%s: 'counts' must be %d lists (one per layer)", name.c_str(), p.n_layer);
        for (size_t l = 0; l < c.size(); ++l) {
            if (!c[l].is_array() || static_cast<int>(c[l].size()) != p.n_expert)
                return MM_ERROR("%s: counts[%zu] must list %d experts", name.c_str(), l, p.n_expert);
            p.counts.push_back(c[l].get<std::vector<uint64_t>>());
        }
    } catch (const std::exception& e) {
        return MM_ERROR("%s: bad expert profile: %s", name.c_str(), e.what());
    }
    return p;
}

StatusOr<ExpertProfile> load_expert_profile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return MM_ERROR("%s: cannot open the expert profile: %s", path.c_str(), std::strerror(errno));
    std::stringstream ss;
    ss << in.rdbuf();
    return parse_expert_profile(ss.str(), path);
}

std::string expert_profile_json(const ExpertProfile& p) {
    nlohmann::json j;
    j["format"] = "moemesh-expert-profile";
    j["version"] = 1;
    j["model"] = p.model;
    j["n_layer"] = p.n_layer;
    j["n_expert"] = p.n_expert;
    j["tokens"] = p.tokens;
    j["counts"] = p.counts;
    return j.dump() + "\n";
}

// ---- the cache -------------------------------------------------------------------------------

StatusOr<std::shared_ptr<ExpertCache>> ExpertCache::create(const GgufFile& f, const ModelConfig& c,
                                                           const std::vector<std::vector<int>>& shard,
                                                           const CacheOptions& o) {
    MM_ASSIGN_OR_RETURN(std::unique_ptr<FileExpertReader> r, FileExpertReader::open(f, c, o.storage));
    std::vector<ExpertLayout> layouts = r->layouts();
    std::vector<ExpertTypes> types = r->types();
    FileExpertReader* file = r.get();
    MM_ASSIGN_OR_RETURN(std::shared_ptr<ExpertCache> cache,
                        create_with_reader(std::move(r), std::move(layouts), std::move(types),
                                           static_cast<int>(c.n_expert), static_cast<int>(c.n_expert_used), shard, o));
    cache->file_ = file;
    if (cache->bandwidth_ <= 0 && o.bandwidth_probe_bytes)
        cache->bandwidth_ = cache->probe_storage_bandwidth(o.bandwidth_probe_bytes);
    if (o.prefetch == PrefetchMode::kNextLayer) {
        MM_ASSIGN_OR_RETURN(std::vector<std::vector<float>> routers, load_router_weights(f, c));
        cache->set_routers(std::move(routers), c.n_embd);
    }
    return cache;
}

StatusOr<std::shared_ptr<ExpertCache>> ExpertCache::create_with_reader(
    std::unique_ptr<ExpertReader> storage, std::vector<ExpertLayout> layouts, std::vector<ExpertTypes> types,
    int n_expert, int n_expert_used, const std::vector<std::vector<int>>& shard, const CacheOptions& o) {
    std::shared_ptr<ExpertCache> c(new ExpertCache());
    c->opts_ = o;
    c->layouts_ = std::move(layouts);
    c->types_ = std::move(types);
    c->n_expert_ = n_expert;
    c->n_expert_used_ = n_expert_used;
    c->storage_ = std::move(storage);
    c->bandwidth_ = o.storage_bandwidth;
    const int L = static_cast<int>(c->layouts_.size());
    if (static_cast<int>(shard.size()) > L)
        return MM_ERROR("cache: the shard names layer %zu, the model has %d layers", shard.size() - 1, L);
    c->held_.assign(static_cast<size_t>(L), std::vector<uint8_t>(static_cast<size_t>(n_expert), shard.empty() ? 1 : 0));
    for (size_t l = 0; l < shard.size(); ++l)
        for (int e : shard[l]) {
            if (e < 0 || e >= n_expert)
                return MM_ERROR("cache: the shard names expert %d of layer %zu, the model has %d experts", e, l, n_expert);
            c->held_[l][e] = 1;
        }
    uint64_t max_charge = 0;
    int max_layer = -1;
    HostTierMemory probe;
    for (int l = 0; l < L; ++l) {
        const uint64_t n = static_cast<uint64_t>(std::count(c->held_[l].begin(), c->held_[l].end(), 1));
        c->shard_bytes_ += n * c->layouts_[l].data_bytes();
        const uint64_t ch = probe.charge(c->layouts_[l].size) + kCacheEntryOverhead;
        if (n && ch > max_charge) {
            max_charge = ch;
            max_layer = l;
        }
    }
    for (auto [budget, what] : {std::pair<uint64_t, const char*>{o.device_bytes, "device"}, {o.host_bytes, "host"}}) {
        if (budget && budget < max_charge)
            return MM_ERROR("cache: the %s budget (%s) cannot hold one expert (layer %d: %s with the page rounding and "
                            "%llu bytes of bookkeeping per entry)",
                            what, format_bytes(budget).c_str(), max_layer, format_bytes(max_charge).c_str(),
                            static_cast<unsigned long long>(kCacheEntryOverhead));
    }
    ExpertReader* below = c->storage_.get();
    auto compute_mem = [&o]() -> std::unique_ptr<TierMemory> {
        return o.compute_memory ? o.compute_memory() : std::make_unique<HostTierMemory>();
    };
    if (o.host_bytes && !o.device_bytes) {
        // No device budget: compute reads the host tier directly (a CPU worker's RAM cache).
        c->device_ = std::make_unique<CacheTier>("host", o.host_bytes, o.policy, c->layouts_, n_expert, below,
                                                 compute_mem());
    } else if (o.host_bytes) {
        c->host_ = std::make_unique<CacheTier>("host", o.host_bytes,
                                               o.policy == CachePolicy::kLfu ? CachePolicy::kLfu : CachePolicy::kLru,
                                               c->layouts_, n_expert, below,
                                               o.host_memory ? o.host_memory() : std::make_unique<HostTierMemory>());
        below = c->host_.get();
    }
    if (!c->device_)
        c->device_ = std::make_unique<CacheTier>("device", o.device_bytes, o.policy, c->layouts_, n_expert, below,
                                                 compute_mem());
    c->device_->set_background_loads(o.background_call_loads);
    if (o.policy == CachePolicy::kStatic) {
        if (o.profile.counts.empty() && !o.profile_path.empty()) {
            MM_ASSIGN_OR_RETURN(c->opts_.profile, load_expert_profile(o.profile_path));
        }
        const ExpertProfile& p = c->opts_.profile;
        if (p.counts.empty())
            return MM_ERROR("cache policy 'static' needs an expert profile (cache.profile / --profile FILE; write one "
                            "with `moemesh profile`)");
        if (p.n_layer != L || p.n_expert != n_expert)
            return MM_ERROR("cache: the profile%s%s is for %d layers x %d experts, the model has %d x %d",
                            o.profile_path.empty() ? "" : " ", o.profile_path.c_str(), p.n_layer, p.n_expert, L,
                            n_expert);
    }
    if (o.prefetch == PrefetchMode::kNextLayer) c->pf_thread_ = std::thread(&ExpertCache::prefetch_loop, c.get());
    return c;
}

ExpertCache::~ExpertCache() {
    {
        std::lock_guard<std::mutex> lk(pf_mu_);
        pf_stop_ = true;
    }
    pf_cv_.notify_all();
    if (pf_thread_.joinable()) pf_thread_.join();
    device_.reset();  // before the host tier it reads from
    host_.reset();
}

// The reference for the stall bound: the storage→memory bandwidth, measured on the path a miss uses
// (the same reader and read mode, one expert at a time) with nothing else running: distinct experts
// of the shard spread over the file (re-reading one would measure a cache), into one buffer that
// is faulted in beforehand (page faults of new buffers are the cache's overhead, not the storage
// path's; the cache avoids them by reusing evicted buffers). An error here is left to the requests
// that meet it: no bound then.
double ExpertCache::probe_storage_bandwidth(uint64_t max_bytes) {
    std::vector<std::pair<int, int>> all;
    uint64_t total = 0;
    for (int l = 0; l < num_layers(); ++l)
        for (int e = 0; e < n_expert_; ++e)
            if (held_[l][e]) {
                all.push_back({l, e});
                total += layouts_[l].data_bytes();
            }
    if (all.empty()) return 0;
    const size_t step = std::max<uint64_t>(1, total / max_bytes);
    uint64_t size = 0;
    for (const ExpertLayout& lay : layouts_) size = std::max(size, lay.size);
    std::vector<uint8_t> buf(size, 0);  // zero-filled: every page is in place before the clock starts
    // Four segments, the best one counts: the bound is what the path can do, and on a shared machine
    // a segment can lose its core for a while.
    constexpr int kSegments = 4;
    uint64_t bytes = 0, seg_bytes = 0;
    double best = 0;
    int seg = 1;
    auto t0 = Clock::now();
    for (size_t i = 0; i < all.size() && bytes < max_bytes; i += step) {
        auto [l, e] = all[i];
        if (!file_->read_expert(l, e, buf.data()).ok()) return 0;
        bytes += layouts_[l].data_bytes();
        seg_bytes += layouts_[l].data_bytes();
        const bool last = i + step >= all.size() || bytes >= max_bytes;
        if (bytes * kSegments >= max_bytes * seg || last) {
            const double secs = since(t0);
            if (secs > 0) best = std::max(best, static_cast<double>(seg_bytes) / secs);
            seg_bytes = 0;
            ++seg;
            t0 = Clock::now();
        }
    }
    file_->reset_counters();  // the probe's reads are not the cache's
    return best;
}

Status ExpertCache::warm_up() {
    if (opts_.policy != CachePolicy::kStatic) return Status();
    const ExpertProfile& p = opts_.profile;
    struct Cand {
        uint64_t count;
        int layer, expert;
    };
    std::vector<Cand> cands;
    for (int l = 0; l < num_layers(); ++l)
        for (int e = 0; e < n_expert_; ++e)
            if (held_[l][e] && p.counts[l][e] > 0) cands.push_back({p.counts[l][e], l, e});
    std::stable_sort(cands.begin(), cands.end(), [](const Cand& a, const Cand& b) { return a.count > b.count; });
    // Leave room for the experts a token needs beyond the hot set.
    uint64_t room = UINT64_MAX;
    if (device_->budget()) {
        const uint64_t cap = device_->budget() / device_->max_entry_charge();
        const double share = std::clamp(opts_.hot_share, 0.0, 1.0);
        const uint64_t hot_cap = static_cast<uint64_t>(static_cast<double>(cap) * share);
        const uint64_t reserve = std::max<uint64_t>(static_cast<uint64_t>(n_expert_used_), cap - hot_cap);
        room = cap > reserve ? (cap - reserve) * device_->max_entry_charge() : 0;
    }
    HostTierMemory probe;
    uint64_t used = 0;
    std::vector<std::pair<int, int>> hot;
    for (const Cand& c : cands) {
        const uint64_t ch = probe.charge(layouts_[c.layer].size) + kCacheEntryOverhead;
        if (used + ch > room) break;
        hot.push_back({c.layer, c.expert});
        used += ch;
        hot_bytes_ += layouts_[c.layer].data_bytes();
    }
    // In batches (io_uring reads a batch's matrices concurrently); bounded so that a huge hot set
    // does not hold every buffer's reservation before the first one is read.
    constexpr size_t kBatch = 32;
    for (size_t i = 0; i < hot.size(); i += kBatch) {
        const std::vector<std::pair<int, int>> part(hot.begin() + static_cast<std::ptrdiff_t>(i),
                                                    hot.begin() + static_cast<std::ptrdiff_t>(std::min(hot.size(), i + kBatch)));
        size_t loaded = 0;
        MM_RETURN_IF_ERROR(device_->load_batch(part, true, &loaded));
    }
    return Status();
}

bool ExpertCache::holds(int layer, int expert) const {
    return layer >= 0 && layer < num_layers() && expert >= 0 && expert < n_expert_ && held_[layer][expert];
}

namespace {
// Entries kept for the running call of each thread (ExpertCache::will_need).
struct KeptEntry {
    const ExpertCache* cache;
    int layer, expert;
    void* token;
    bool read_by_keep;  // read by the call's keep_for_call, which counted the miss
};
thread_local std::vector<KeptEntry> t_kept;
}  // namespace

Status ExpertCache::acquire(int layer, int expert, ExpertSlice* slice, void** token) {
    if (!holds(layer, expert)) return MM_ERROR("layer %d: expert %d is not held by this process", layer, expert);
    uint8_t* d = nullptr;
    auto kept = std::find_if(t_kept.begin(), t_kept.end(), [&](const KeptEntry& k) {
        return k.cache == this && k.layer == layer && k.expert == expert;
    });
    if (kept != t_kept.end()) {  // read (or found, or being read) by this call's will_need
        void* t = kept->token;
        const bool read_by_keep = kept->read_by_keep;
        t_kept.erase(kept);
        MM_RETURN_IF_ERROR(device_->take_kept(t, &d, read_by_keep));
        *token = t;
    } else {
        MM_RETURN_IF_ERROR(device_->acquire(layer, expert, &d, token));
    }
    const ExpertLayout& lay = layouts_[layer];
    *slice = ExpertSlice{d, d + lay.up_off, d + lay.down_off};
    return Status();
}

void ExpertCache::release(void* token) { device_->release(token); }


Status ExpertCache::will_need(int layer, int32_t* experts, int64_t n, int64_t pins_at_once) {
    end_call();  // defensive: compute always ends its calls
    if (n < 2) return Status();  // one expert: acquire reads it the same way
    std::vector<int> want;
    for (int64_t i = 0; i < n; ++i)
        if (holds(layer, experts[i])) want.push_back(experts[i]);
    std::vector<std::pair<int, void*>> kept;
    size_t ready = 0;
    Status st = device_->keep_for_call(layer, want, &kept, &ready, static_cast<uint64_t>(std::max<int64_t>(pins_at_once, 1)));
    for (size_t i = 0; i < kept.size(); ++i) t_kept.push_back({this, layer, kept[i].first, kept[i].second, i >= ready});
    // The order to acquire in: what is resident now, then what acquire reads itself (in parallel
    // with the background reads), then the background reads in their order.
    std::vector<int32_t> order;
    order.reserve(static_cast<size_t>(n));
    for (size_t i = 0; i < ready; ++i) order.push_back(kept[i].first);
    for (int64_t i = 0; i < n; ++i)
        if (std::none_of(kept.begin(), kept.end(), [&](const auto& k) { return k.first == experts[i]; }))
            order.push_back(experts[i]);
    for (size_t i = ready; i < kept.size(); ++i) order.push_back(kept[i].first);
    MM_CHECK(order.size() == static_cast<size_t>(n));
    std::copy(order.begin(), order.end(), experts);
    return st;
}

void ExpertCache::end_call() {
    for (size_t i = 0; i < t_kept.size();) {
        if (t_kept[i].cache != this) {
            ++i;
            continue;
        }
        device_->drop_kept(t_kept[i].token);
        t_kept.erase(t_kept.begin() + static_cast<std::ptrdiff_t>(i));
    }
}

// Next-layer prefetch: layer l+1's router applied to layer l's activations predicts l+1's experts
// (the residual stream changes little from one layer to the next). Only for small batches (decode):
// a prompt chunk touches most experts anyway.
void ExpertCache::will_compute(int layer, const float* x, int64_t n_rows) {
    if (opts_.prefetch != PrefetchMode::kNextLayer || routers_.empty()) return;
    const int next = layer + 1;
    if (next >= num_layers() || n_rows > 8 || routers_[next].empty()) return;
    const int64_t H = hidden_, E = n_expert_;
    const int K = std::max(1, n_expert_used_);
    std::vector<std::pair<int, int>> want;
    pf_scores_.resize(static_cast<size_t>(E));
    std::vector<int> idx(static_cast<size_t>(E));
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = x + r * H;
        for (int64_t e = 0; e < E; ++e) {
            const float* w = &routers_[next][static_cast<size_t>(e * H)];
            float s = 0;
            for (int64_t h = 0; h < H; ++h) s += w[h] * xr[h];
            pf_scores_[e] = s;
        }
        std::iota(idx.begin(), idx.end(), 0);
        std::partial_sort(idx.begin(), idx.begin() + std::min<int64_t>(K, E), idx.end(),
                          [&](int a, int b) { return pf_scores_[a] > pf_scores_[b]; });
        for (int j = 0; j < K && j < E; ++j)
            if (held_[next][idx[j]]) want.push_back({next, idx[j]});
    }
    {
        std::lock_guard<std::mutex> lk(pf_mu_);
        pf_queue_.clear();  // older predictions are stale
        for (auto& w : want) pf_queue_.push_back(w);
        pf_issued_ += want.size();
    }
    pf_cv_.notify_one();
}

void ExpertCache::prefetch_loop() {
    std::unique_lock<std::mutex> lk(pf_mu_);
    for (;;) {
        pf_cv_.wait(lk, [&] { return pf_stop_ || !pf_queue_.empty(); });
        if (pf_stop_) return;
        // The whole prediction in one batch (io_uring: read together).
        std::vector<std::pair<int, int>> batch(pf_queue_.begin(), pf_queue_.end());
        pf_queue_.clear();
        lk.unlock();
        size_t loaded = 0;
        (void)device_->load_batch(batch, false, &loaded);  // a failed prefetch is retried by the request
        pf_loaded_ += loaded;
        lk.lock();
    }
}

std::vector<TierStats> ExpertCache::tier_stats() const {
    std::vector<TierStats> out;
    out.push_back(device_->stats());
    if (host_) out.push_back(host_->stats());
    TierStats s;
    s.name = "storage";
    if (file_) {
        s.fills = file_->reads();
        s.bytes_in = file_->bytes_read();
        s.errors = file_->errors();
        s.fill_seconds = file_->read_seconds();
    }
    s.bandwidth = bandwidth_;
    out.push_back(s);
    // Bytes that came from the file on demand: the misses of the tier right above the storage.
    const TierStats& lowest = out[out.size() - 2];
    if (bandwidth_ > 0) out.front().bound_seconds = static_cast<double>(lowest.miss_bytes) / bandwidth_;
    return out;
}

std::string ExpertCache::stats_line() const {
    std::string out;
    const std::vector<TierStats> all = tier_stats();
    for (const TierStats& t : all) {
        if (!out.empty()) out += " | ";
        if (t.name == "storage") {
            out += str_printf("storage%s: %llu reads, %s",
                              file_ ? (std::string(" (") + storage_mode_name(file_->mode()) + ")").c_str() : "",
                              static_cast<unsigned long long>(t.fills), format_bytes(t.bytes_in).c_str());
            if (t.fill_seconds > 0)
                out += str_printf(" at %.2f GB/s", static_cast<double>(t.bytes_in) / t.fill_seconds * 1e-9);
            if (t.bandwidth > 0) out += str_printf(" (reference %.2f GB/s)", t.bandwidth * 1e-9);
            if (t.errors) out += str_printf(", %llu errors", static_cast<unsigned long long>(t.errors));
            continue;
        }
        out += str_printf("%s %s%s: %.1f%% hits (%llu/%llu), %s in", t.name.c_str(),
                          t.budget ? format_bytes(t.budget).c_str() : "unlimited",
                          &t == &all.front() ? (std::string(" ") + cache_policy_name(opts_.policy)).c_str() : "",
                          100.0 * t.hit_rate(), static_cast<unsigned long long>(t.hits),
                          static_cast<unsigned long long>(t.hits + t.misses), format_bytes(t.bytes_in).c_str());
        if (t.fill_seconds > 0) out += str_printf(" at %.2f GB/s", static_cast<double>(t.bytes_in) / t.fill_seconds * 1e-9);
        out += str_printf(", stall %.3f s", t.stall_seconds);
        if (&t == &all.front() && bandwidth_ > 0) {
            out += str_printf(" (bound %.3f s at %.2f GB/s", t.bound_seconds, bandwidth_ * 1e-9);
            out += t.bound_seconds > 0 ? str_printf(": %.2f×)", t.stall_seconds / t.bound_seconds) : std::string(")");
        }
        out += str_printf(", %llu evictions, used %s (peak %s)", static_cast<unsigned long long>(t.evictions),
                          format_bytes(t.used).c_str(), format_bytes(t.peak_used).c_str());
        if (&t == &all.front() && opts_.policy == CachePolicy::kStatic)
            out += str_printf(", hot set %llu experts", static_cast<unsigned long long>(t.preloaded));
        if (&t == &all.front() && opts_.prefetch == PrefetchMode::kNextLayer)
            out += str_printf(", prefetched %llu of %llu predicted", static_cast<unsigned long long>(pf_loaded_.load()),
                              static_cast<unsigned long long>(pf_issued_.load()));
        if (t.transient) out += str_printf(", %llu transient", static_cast<unsigned long long>(t.transient));
        if (t.errors) out += str_printf(", %llu errors", static_cast<unsigned long long>(t.errors));
    }
    return "cache: " + out;
}

void ExpertCache::reset_counters() {
    device_->reset_counters();
    if (host_) host_->reset_counters();
    if (file_) file_->reset_counters();
}

StatusOr<std::vector<std::vector<float>>> load_router_weights(const GgufFile& f, const ModelConfig& c) {
    const int64_t H = c.n_embd, E = c.n_expert;
    std::vector<std::vector<float>> out;
    for (int il = 0; il < c.n_layer; ++il) {
        MM_ASSIGN_OR_RETURN(Weight w, get_optional_weight(f, tensor_name(Tensor::kFfnGateInp, il), {H, E}));
        std::vector<float> r;
        if (w) {
            r.resize(static_cast<size_t>(E * H));
            for (int64_t e = 0; e < E; ++e) dequantize_row(w.type, w.row(e), &r[static_cast<size_t>(e * H)], H);
        }
        out.push_back(std::move(r));
    }
    return out;
}

}  // namespace moemesh
