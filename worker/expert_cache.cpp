#include "worker/expert_cache.h"

#include <sys/mman.h>
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

constexpr uint64_t kAlign = 64;
uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Pins each thread holds, per tier: a thread that holds a pin must not wait for room in that tier.
thread_local std::vector<std::pair<const void*, int>> t_pins;
void add_thread_pin(const void* tier, int d) {
    for (auto& p : t_pins)
        if (p.first == tier) {
            p.second += d;
            return;
        }
    t_pins.push_back({tier, d});
}

}  // namespace

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

// ---- memory ----------------------------------------------------------------------------------

uint64_t HostTierMemory::charge(uint64_t bytes) const {
    return align_up(bytes, static_cast<uint64_t>(sysconf(_SC_PAGESIZE)));
}
StatusOr<uint8_t*> HostTierMemory::allocate(uint64_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return MM_ERROR("cannot allocate %llu bytes for a cached expert: %s", static_cast<unsigned long long>(bytes),
                        std::strerror(errno));
    return static_cast<uint8_t*>(p);
}
void HostTierMemory::free(uint8_t* p, uint64_t bytes) {
    if (p) munmap(p, bytes);
}

// ---- one tier --------------------------------------------------------------------------------

struct CacheTier::Entry {
    int layer = 0, expert = 0;
    uint8_t* data = nullptr;
    uint64_t charge = 0;      // accounted bytes (0 for transient entries)
    State state = State::kLoading;
    int pins = 0;
    bool forever = false;     // static hot set
    bool in_map = false;      // false: transient, or failed and removed
    bool demanded = false;    // a request waited for this load (its bytes are in miss_bytes)
    bool batched = false;     // loaded by a call's keep_for_call, which counted its miss: no hit at take
    uint64_t last_use = 0;
    std::string error;
};

CacheTier::CacheTier(std::string name, uint64_t budget, CachePolicy policy, std::vector<ExpertLayout> layouts,
                     int n_expert, ExpertReader* below, std::unique_ptr<TierMemory> memory)
    : name_(std::move(name)),
      budget_(budget),
      policy_(policy),
      layouts_(std::move(layouts)),
      n_expert_(n_expert),
      below_(below),
      mem_(std::move(memory)) {
    for (size_t l = 0; l < layouts_.size(); ++l) max_charge_ = std::max(max_charge_, charge_of(static_cast<int>(l)));
    uses_.assign(layouts_.size() * static_cast<size_t>(n_expert_), 0);
    st_.name = name_;
    st_.budget = budget_;
}

CacheTier::~CacheTier() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        loader_stop_ = true;  // the loader finishes what is queued first: those entries are in the map
    }
    loader_cv_.notify_all();
    if (loader_.joinable()) loader_.join();
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [k, e] : map_) destroy(e);
    map_.clear();
}

uint64_t CacheTier::charge_of(int layer) const { return mem_->charge(layouts_[layer].size) + kCacheEntryOverhead; }

void CacheTier::destroy(Entry* e) {
    if (e->data) mem_->free(e->data, layouts_[e->layer].size);
    delete e;
}

int CacheTier::held_by_this_thread() const {
    for (auto& p : t_pins)
        if (p.first == this) return p.second;
    return 0;
}

CacheTier::Entry* CacheTier::pick_victim() {
    Entry* best = nullptr;
    for (auto& [k, e] : map_) {
        if (e->state != State::kReady || e->pins > 0 || e->forever) continue;
        if (!best) {
            best = e;
            continue;
        }
        if (policy_ == CachePolicy::kLfu) {
            const uint64_t ue = uses_[static_cast<size_t>(k)];
            const uint64_t ub = uses_[static_cast<size_t>(best->layer) * n_expert_ + best->expert];
            if (ue < ub || (ue == ub && e->last_use < best->last_use)) best = e;
        } else if (e->last_use < best->last_use) {
            best = e;
        }
    }
    return best;
}

void CacheTier::evict(Entry* e, uint8_t** keep, uint64_t keep_size) {
    map_.erase(static_cast<int64_t>(e->layer) * n_expert_ + e->expert);
    st_.used -= e->charge;
    st_.evictions++;
    if (evicted_.size() < 4096) evicted_.push_back({e->layer, e->expert});
    if (keep && !*keep && e->data && layouts_[e->layer].size == keep_size) {
        *keep = e->data;  // the new entry reuses it: no unmap, map and page faults per miss
        e->data = nullptr;
    }
    destroy(e);
}

Status CacheTier::acquire(int layer, int expert, uint8_t** data, void** token) {
    bool skipped = false;
    return acquire_impl(layer, expert, false, false, data, token, &skipped);
}

Status CacheTier::pin_forever(int layer, int expert) {
    bool skipped = false;
    uint8_t* d = nullptr;
    void* t = nullptr;
    return acquire_impl(layer, expert, true, false, &d, &t, &skipped);
}

bool CacheTier::prefetch(int layer, int expert) {
    bool skipped = false;
    uint8_t* d = nullptr;
    void* t = nullptr;
    Status st = acquire_impl(layer, expert, false, true, &d, &t, &skipped);
    return st.ok() && !skipped;
}

bool CacheTier::resident(int layer, int expert) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = map_.find(static_cast<int64_t>(layer) * n_expert_ + expert);
    return it != map_.end() && it->second->state == State::kReady;
}

// A request (neither forever nor prefetch_only) counts one hit or one miss; a miss's whole wait is
// stall time, and the bytes of each load a request waited for count once in miss_bytes. forever
// (static preload) and prefetch_only (background) count neither.
Status CacheTier::acquire_impl(int layer, int expert, bool forever, bool prefetch_only, uint8_t** data, void** token,
                               bool* skipped) {
    const bool request = !forever && !prefetch_only;
    const auto t0 = Clock::now();
    const int64_t key = static_cast<int64_t>(layer) * n_expert_ + expert;
    bool counted = false;
    std::unique_lock<std::mutex> lk(mu_);
    if (request) uses_[static_cast<size_t>(key)]++;
    auto finish_stall = [&] {
        if (request && counted) st_.stall_seconds += since(t0);
    };
    for (;;) {
        auto it = map_.find(key);
        if (it != map_.end()) {
            Entry* e = it->second;
            if (prefetch_only) {
                *skipped = true;
                return Status();
            }
            if (e->state == State::kReady) {
                if (request && !counted) st_.hits++;
                e->last_use = ++tick_;
                if (forever) {
                    if (!e->forever) st_.preloaded++;
                    e->forever = true;
                    return Status();
                }
                e->pins++;
                add_thread_pin(this, 1);
                *data = e->data;
                *token = e;
                finish_stall();
                return Status();
            }
            // Loading by another requester: wait for it (single-flight).
            if (request && !counted) {
                st_.misses++;
                st_.coalesced++;
                counted = true;
            }
            if (request && !e->demanded) {  // e.g. a prefetch in flight: now a demand load
                e->demanded = true;
                st_.miss_bytes += layouts_[layer].data_bytes();
            }
            e->pins++;  // keeps a failed entry alive until we have read its error
            cv_.wait(lk, [&] { return e->state != State::kLoading; });
            e->pins--;
            if (e->state == State::kFailed) {
                std::string why = e->error;
                if (e->pins == 0 && !e->in_map) destroy(e);
                finish_stall();
                return Status::error(why);
            }
            continue;  // ready now (and unpinned entries are only evicted under the lock, by misses)
        }
        // Miss: reserve room, then read without the lock.
        if (request && !counted) {
            st_.misses++;
            counted = true;
        }
        const uint64_t need = charge_of(layer);
        bool transient = false, retry = false;
        uint8_t* spare = nullptr;  // an evicted victim's buffer of the same size, for this entry
        auto drop_spare = [&] {
            if (spare) mem_->free(spare, layouts_[layer].size);
            spare = nullptr;
        };
        while (budget_ && st_.used + need > budget_) {
            if (Entry* v = pick_victim()) {
                evict(v, &spare, layouts_[layer].size);
                continue;
            }
            drop_spare();
            if (prefetch_only) {
                *skipped = true;
                return Status();
            }
            if (forever)
                return MM_ERROR("%s tier: no room to pin layer %d expert %d (budget %s, %s used by pinned entries)",
                                name_.c_str(), layer, expert, format_bytes(budget_).c_str(),
                                format_bytes(st_.used).c_str());
            if (held_by_this_thread() > 0) {
                transient = true;
                break;
            }
            cv_.wait(lk);  // every pinned entry is in use: wait for a release, then look again
            retry = true;
            break;
        }
        if (retry) continue;
        Entry* e = new Entry();
        e->layer = layer;
        e->expert = expert;
        e->pins = 1;
        e->data = spare;
        if (request) {
            e->demanded = true;
            st_.miss_bytes += layouts_[layer].data_bytes();
        }
        if (!transient) {
            e->charge = need;
            e->in_map = true;
            map_[key] = e;
            st_.used += need;
            st_.peak_used = std::max(st_.peak_used, st_.used);
        }
        lk.unlock();
        const auto tf = Clock::now();
        Status st;
        StatusOr<uint8_t*> mem = e->data ? StatusOr<uint8_t*>(e->data) : mem_->allocate(layouts_[layer].size);
        if (!mem.ok()) {
            st = mem.status();
        } else {
            e->data = mem.value();
            st = mem_->fill(*below_, layer, expert, e->data, layouts_[layer].size);
            if (!st.ok())
                st = Status::error(str_printf("%s tier: loading layer %d expert %d: ", name_.c_str(), layer, expert) +
                                   st.message());
        }
        const double fill_s = since(tf);
        lk.lock();
        if (!settle(e, st)) {
            e->pins--;
            if (e->pins == 0) destroy(e);
            finish_stall();
            return st;
        }
        st_.fill_seconds += fill_s;
        if (transient) st_.transient++;
        if (forever || prefetch_only) {
            if (forever) {
                e->forever = true;
                st_.preloaded++;
            }
            e->pins--;
            return Status();
        }
        add_thread_pin(this, 1);
        *data = e->data;
        *token = e;
        finish_stall();
        return Status();
    }
}

bool CacheTier::settle(Entry* e, const Status& st) {
    if (!st.ok()) {
        st_.errors++;
        e->state = State::kFailed;
        e->error = st.message();
        if (e->in_map) {
            map_.erase(static_cast<int64_t>(e->layer) * n_expert_ + e->expert);
            st_.used -= e->charge;
            e->in_map = false;
        }
        cv_.notify_all();
        return false;
    }
    st_.fills++;
    st_.bytes_in += layouts_[e->layer].data_bytes();
    e->state = State::kReady;
    e->last_use = ++tick_;
    cv_.notify_all();
    return true;
}

Status CacheTier::load_batch(const std::vector<std::pair<int, int>>& experts, bool forever, size_t* loaded) {
    *loaded = 0;
    Status first_error;
    std::vector<std::pair<int, int>> wait_for;  // loading by another requester (forever only)
    std::vector<Entry*> batch;
    std::vector<std::pair<uint64_t, uint8_t*>> spares;  // evicted buffers (size, data) for the batch's entries
    std::unique_lock<std::mutex> lk(mu_);
    for (auto [layer, expert] : experts) {
        const int64_t key = static_cast<int64_t>(layer) * n_expert_ + expert;
        auto it = map_.find(key);
        if (it != map_.end()) {
            Entry* e = it->second;
            if (forever && e->state == State::kReady && !e->forever) {
                e->forever = true;
                st_.preloaded++;
            } else if (forever && e->state == State::kLoading) {
                wait_for.push_back({layer, expert});
            }
            continue;
        }
        const uint64_t need = charge_of(layer);
        bool room = true;
        while (budget_ && st_.used + need > budget_) {
            if (Entry* v = pick_victim()) {
                uint8_t* kept = nullptr;
                const uint64_t size = layouts_[v->layer].size;
                evict(v, &kept, size);  // destroys v
                if (kept) spares.push_back({size, kept});
                continue;
            }
            room = false;
            break;
        }
        if (!room) {
            if (forever)
                first_error = MM_ERROR("%s tier: no room to pin layer %d expert %d (budget %s, %s used by pinned entries)",
                                       name_.c_str(), layer, expert, format_bytes(budget_).c_str(),
                                       format_bytes(st_.used).c_str());
            break;
        }
        Entry* e = new Entry();
        e->layer = layer;
        e->expert = expert;
        e->pins = 1;
        e->charge = need;
        e->in_map = true;
        for (auto& sp : spares)
            if (sp.second && sp.first == layouts_[layer].size) {
                e->data = sp.second;
                sp.second = nullptr;
                break;
            }
        map_[key] = e;
        st_.used += need;
        st_.peak_used = std::max(st_.peak_used, st_.used);
        batch.push_back(e);
    }
    for (auto& sp : spares)
        if (sp.second) mem_->free(sp.second, sp.first);
    lk.unlock();
    std::vector<Status> result;
    const double fill_s = read_batch(batch, &result);
    lk.lock();
    st_.fill_seconds += fill_s;
    for (size_t i = 0; i < batch.size(); ++i) {
        Entry* e = batch[i];
        const Status& st = result[i];
        const bool ok = settle(e, st);
        e->pins--;
        if (!ok) {
            if (first_error.ok()) first_error = st;
            if (e->pins == 0) destroy(e);
            continue;
        }
        ++*loaded;
        if (forever) {
            e->forever = true;
            st_.preloaded++;
        }
    }
    lk.unlock();
    for (auto [layer, expert] : wait_for) {
        Status st = pin_forever(layer, expert);
        if (!st.ok() && first_error.ok()) first_error = st;
    }
    return first_error;
}

double CacheTier::read_batch(const std::vector<Entry*>& batch, std::vector<Status>* out,
                             const std::function<void(size_t)>& each) {
    const auto tf = Clock::now();
    out->assign(batch.size(), Status());
    auto finish = [&](size_t i, const Status& st) {  // worded as acquire's
        (*out)[i] = st.ok() ? st
                            : Status::error(str_printf("%s tier: loading layer %d expert %d: ", name_.c_str(),
                                                       batch[i]->layer, batch[i]->expert) +
                                            st.message());
        if (each) each(i);
    };
    std::vector<ExpertRead> reads;
    std::vector<size_t> read_of;  // reads[j] fills batch[read_of[j]]
    for (size_t i = 0; i < batch.size(); ++i) {
        Entry* e = batch[i];
        StatusOr<uint8_t*> mem = e->data ? StatusOr<uint8_t*>(e->data) : mem_->allocate(layouts_[e->layer].size);
        if (!mem.ok()) {
            finish(i, mem.status());
            continue;
        }
        e->data = mem.value();
        reads.push_back({e->layer, e->expert, e->data, layouts_[e->layer].size});
        read_of.push_back(i);
    }
    if (reads.empty()) return since(tf);
    std::vector<Status> filled;
    std::vector<uint8_t> told(reads.size(), 0);
    mem_->fill_batch(*below_, reads, &filled, [&](size_t j) {
        told[j] = 1;
        finish(read_of[j], filled[j]);
    });
    for (size_t j = 0; j < reads.size(); ++j)  // a memory that does not report each read
        if (!told[j]) finish(read_of[j], filled[j]);
    return since(tf);
}

void CacheTier::loader_loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
        loader_cv_.wait(lk, [&] { return loader_stop_ || !load_queue_.empty(); });
        if (load_queue_.empty()) return;  // stopping, and nothing left to read
        const std::vector<Entry*> batch = std::move(load_queue_.front());
        load_queue_.pop_front();
        lk.unlock();
        std::vector<Status> result;
        // Each expert is settled (usable, or failed) as soon as its own read is over.
        const double fill_s = read_batch(batch, &result, [&](size_t i) {
            std::lock_guard<std::mutex> g(mu_);
            Entry* e = batch[i];
            settle(e, result[i]);
            if (--e->pins == 0 && !e->in_map) destroy(e);  // failed, and the call has dropped it
        });
        lk.lock();
        st_.fill_seconds += fill_s;
    }
}

// Room: `fixed` is what no miss can reclaim (pinned, hot-set and loading entries); everything else
// is free or an eviction candidate. Keeping an entry moves its charge into `fixed`. When the whole
// call fits, it is all kept; otherwise `fixed` stays one largest entry below the budget, so the
// call's remaining misses (acquire, one at a time, its pin released before the next) always find
// room, whoever else holds kept pins: every kept set was checked against all pins held before it.
Status CacheTier::keep_for_call(int layer, const std::vector<int>& experts,
                                std::vector<std::pair<int, void*>>* kept, size_t* ready) {
    const auto t0 = Clock::now();
    std::unique_lock<std::mutex> lk(mu_);
    uint64_t fixed = 0, want = 0;  // want: what keeping the whole call would add to fixed
    std::vector<Entry*> resident;
    std::vector<int> absent;
    for (int expert : experts) {
        auto it = map_.find(static_cast<int64_t>(layer) * n_expert_ + expert);
        if (it == map_.end()) {
            absent.push_back(expert);
            want += charge_of(layer);
            continue;
        }
        Entry* e = it->second;
        if (e->state != State::kReady || e->forever) continue;  // loading: acquire waits; hot set: stays anyway
        resident.push_back(e);
        if (e->pins == 0) want += e->charge;
    }
    if (budget_)
        for (auto& [k, e] : map_)
            if (e->pins > 0 || e->forever || e->state != State::kReady) fixed += e->charge;
    const uint64_t limit = !budget_ || fixed + want <= budget_ ? UINT64_MAX
                           : budget_ > max_charge_             ? budget_ - max_charge_
                                                               : 0;
    // The call's resident experts first: keeping them costs no read, and a miss that evicted one
    // would read it again later in the call.
    for (Entry* e : resident) {
        if (e->pins == 0) {
            if (limit != UINT64_MAX && fixed + e->charge > limit) continue;
            fixed += e->charge;
        }
        e->pins++;
        kept->push_back({e->expert, e});
    }
    if (ready) *ready = kept->size();
    std::vector<Entry*> batch;
    std::vector<std::pair<uint64_t, uint8_t*>> spares;  // evicted buffers (size, data) for the batch's entries
    for (int expert : absent) {
        const uint64_t need = charge_of(layer);
        if (limit != UINT64_MAX && fixed + need > limit) break;
        while (budget_ && st_.used + need > budget_) {
            Entry* v = pick_victim();  // never the call's: they are pinned
            MM_CHECK(v != nullptr);    // fixed + need <= budget: the rest of the budget is free or evictable
            uint8_t* spare = nullptr;
            const uint64_t size = layouts_[v->layer].size;
            evict(v, &spare, size);
            if (spare) spares.push_back({size, spare});
        }
        Entry* e = new Entry();
        e->layer = layer;
        e->expert = expert;
        e->pins = background_ ? 2 : 1;  // the call's keep pin (and the loader's)
        e->charge = need;
        e->in_map = true;
        e->demanded = e->batched = true;
        for (auto& sp : spares)
            if (sp.second && sp.first == layouts_[layer].size) {
                e->data = std::exchange(sp.second, nullptr);
                break;
            }
        map_[static_cast<int64_t>(layer) * n_expert_ + expert] = e;
        fixed += need;
        st_.used += need;
        st_.peak_used = std::max(st_.peak_used, st_.used);
        st_.misses++;
        st_.miss_bytes += layouts_[layer].data_bytes();
        batch.push_back(e);
    }
    for (auto& sp : spares)
        if (sp.second) mem_->free(sp.second, sp.first);
    if (batch.empty()) return Status();
    if (background_) {
        for (Entry* e : batch) kept->push_back({e->expert, e});
        load_queue_.push_back(std::move(batch));
        if (!loader_.joinable()) loader_ = std::thread(&CacheTier::loader_loop, this);
        loader_cv_.notify_one();
        st_.stall_seconds += since(t0);  // the reservation; take_kept adds the waits for the reads
        return Status();
    }
    lk.unlock();
    std::vector<Status> result;
    const double fill_s = read_batch(batch, &result);
    lk.lock();
    st_.fill_seconds += fill_s;
    Status first_error;
    for (size_t i = 0; i < batch.size(); ++i) {
        Entry* e = batch[i];
        if (settle(e, result[i])) {
            kept->push_back({e->expert, e});
            continue;
        }
        if (first_error.ok()) first_error = result[i];
        if (--e->pins == 0) destroy(e);  // a requester that waited on it holds a pin and destroys it
    }
    st_.stall_seconds += since(t0);
    return first_error;
}

Status CacheTier::take_kept(void* token, uint8_t** data) {
    Entry* e = static_cast<Entry*>(token);
    std::unique_lock<std::mutex> lk(mu_);
    if (e->state == State::kLoading) {  // still being read by the loader thread
        const auto t0 = Clock::now();
        cv_.wait(lk, [&] { return e->state != State::kLoading; });
        st_.stall_seconds += since(t0);
    }
    if (e->state == State::kFailed) {
        std::string why = e->error;
        if (--e->pins == 0 && !e->in_map) destroy(e);
        return Status::error(why);
    }
    uses_[static_cast<size_t>(e->layer) * n_expert_ + e->expert]++;
    if (!std::exchange(e->batched, false)) st_.hits++;
    e->last_use = ++tick_;
    add_thread_pin(this, 1);
    *data = e->data;
    return Status();
}

void CacheTier::drop_kept(void* token) {
    Entry* e = static_cast<Entry*>(token);
    std::lock_guard<std::mutex> lk(mu_);
    e->batched = false;  // a later request that finds it is a hit
    if (--e->pins > 0) return;
    if (!e->in_map) {
        destroy(e);
        return;
    }
    cv_.notify_all();  // room may be available for a waiting miss
}

void CacheTier::release(void* token) {
    Entry* e = static_cast<Entry*>(token);
    std::lock_guard<std::mutex> lk(mu_);
    add_thread_pin(this, -1);
    if (--e->pins > 0) return;
    if (!e->in_map) {
        destroy(e);  // transient
        return;
    }
    cv_.notify_all();  // room may be available for a waiting miss
}

Status CacheTier::read_expert(int layer, int expert, uint8_t* dst) {
    uint8_t* src = nullptr;
    void* token = nullptr;
    MM_RETURN_IF_ERROR(acquire(layer, expert, &src, &token));
    std::memcpy(dst, src, layouts_[layer].size);
    release(token);
    return Status();
}

TierStats CacheTier::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    TierStats s = st_;
    s.entries = map_.size();
    for (auto& [k, e] : map_)
        if (e->pins > 0 || e->forever) s.pinned_entries++;
    return s;
}

std::vector<std::pair<int, int>> CacheTier::eviction_log() const {
    std::lock_guard<std::mutex> lk(mu_);
    return evicted_;
}

void CacheTier::reset_counters() {
    std::lock_guard<std::mutex> lk(mu_);
    const uint64_t used = st_.used;
    st_ = TierStats();
    st_.name = name_;
    st_.budget = budget_;
    st_.used = st_.peak_used = used;
    evicted_.clear();
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
        t_kept.erase(kept);
        MM_RETURN_IF_ERROR(device_->take_kept(t, &d));
        *token = t;
    } else {
        MM_RETURN_IF_ERROR(device_->acquire(layer, expert, &d, token));
    }
    const ExpertLayout& lay = layouts_[layer];
    *slice = ExpertSlice{d, d + lay.up_off, d + lay.down_off};
    return Status();
}

void ExpertCache::release(void* token) { device_->release(token); }


Status ExpertCache::will_need(int layer, int32_t* experts, int64_t n) {
    end_call();  // defensive: compute always ends its calls
    if (n < 2) return Status();  // one expert: acquire reads it the same way
    std::vector<int> want;
    for (int64_t i = 0; i < n; ++i)
        if (holds(layer, experts[i])) want.push_back(experts[i]);
    std::vector<std::pair<int, void*>> kept;
    size_t ready = 0;
    Status st = device_->keep_for_call(layer, want, &kept, &ready);
    for (auto [expert, token] : kept) t_kept.push_back({this, layer, expert, token});
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
