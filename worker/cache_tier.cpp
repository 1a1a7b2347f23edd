// One budgeted tier of the expert cache (worker/expert_cache.h): CacheTier — accounting, the
// policies' victims, single-flight loads, pins and transient buffers, batched loads (static warm-up,
// prefetch) and a call's kept experts with their background loader thread — and HostTierMemory.
// The cache over its tiers (ExpertCache), profiles and prefetch are in expert_cache.cpp.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/placement.h"  // format_bytes
#include "worker/expert_cache.h"

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;

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
    // A prefetch leaves prefetch_reserve_ entries that a request can reclaim beyond what is pinned,
    // loading or in the hot set: its batch, pinned while it loads, must not make the next request
    // wait for room (or a CUDA call's pin window fall back on transient buffers).
    uint64_t fixed = 0;
    const uint64_t reserve = prefetch_reserve_ * max_charge_;
    const bool keep_reserve = !forever && budget_ && reserve;
    if (keep_reserve)
        for (auto& [k, e] : map_)
            if (e->pins > 0 || e->forever || e->state != State::kReady) fixed += e->charge;
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
        if (keep_reserve && fixed + need + reserve > budget_) break;
        fixed += need;
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
// call fits, it is all kept; otherwise `fixed` stays one largest entry (pins_at_once of them) below
// the budget, so the call's remaining misses (acquire, one at a time, its pin released before the
// next; or within a window of pins_at_once) always find room, whoever else holds kept pins: every
// kept set was checked against all pins held before it.
Status CacheTier::keep_for_call(int layer, const std::vector<int>& experts,
                                std::vector<std::pair<int, void*>>* kept, size_t* ready, uint64_t pins_at_once) {
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
    const uint64_t reclaimable = std::max<uint64_t>(pins_at_once, 1) * max_charge_;
    const uint64_t limit = !budget_ || fixed + want <= budget_ ? UINT64_MAX
                           : budget_ > reclaimable             ? budget_ - reclaimable
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
        e->demanded = true;
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

Status CacheTier::take_kept(void* token, uint8_t** data, bool read_by_keep) {
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
    if (!read_by_keep) st_.hits++;
    e->last_use = ++tick_;
    add_thread_pin(this, 1);
    *data = e->data;
    return Status();
}

void CacheTier::drop_kept(void* token) {
    Entry* e = static_cast<Entry*>(token);
    std::lock_guard<std::mutex> lk(mu_);
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
    const uint64_t used = st_.used, preloaded = st_.preloaded;  // state, not counts of events
    st_ = TierStats();
    st_.name = name_;
    st_.budget = budget_;
    st_.used = st_.peak_used = used;
    st_.preloaded = preloaded;
    evicted_.clear();
}

}  // namespace moemesh
