#include "worker/cuda_tier_memory.h"

#include <algorithm>
#include <iterator>

#include "common/placement.h"

#ifdef MOEMESH_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace moemesh {

// ---- ArenaAllocator (plain C++) ----------------------------------------------------------------

ArenaAllocator::ArenaAllocator(uint64_t capacity) : capacity_(capacity / kTierGranule * kTierGranule) {
    if (capacity_) free_[0] = capacity_;
}

int64_t ArenaAllocator::allocate(uint64_t bytes) {
    const uint64_t n = round(std::max<uint64_t>(bytes, 1));
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second < n) continue;
        const uint64_t off = it->first, len = it->second;
        free_.erase(it);
        if (len > n) free_[off + n] = len - n;
        used_ += n;
        return static_cast<int64_t>(off);
    }
    return -1;
}

void ArenaAllocator::free(uint64_t offset, uint64_t bytes) {
    const uint64_t n = round(std::max<uint64_t>(bytes, 1));
    MM_CHECK(offset + n <= capacity_ && used_ >= n);
    used_ -= n;
    auto next = free_.lower_bound(offset);
    MM_CHECK(next == free_.end() || next->first >= offset + n);  // not already free
    uint64_t off = offset, len = n;
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        MM_CHECK(prev->first + prev->second <= offset);
        if (prev->first + prev->second == offset) {
            off = prev->first;
            len += prev->second;
            free_.erase(prev);
        }
    }
    if (next != free_.end() && next->first == offset + n) {
        len += next->second;
        free_.erase(next);
    }
    free_[off] = len;
}

uint64_t ArenaAllocator::largest_free() const {
    uint64_t m = 0;
    for (auto& [o, l] : free_) m = std::max(m, l);
    return m;
}

void ArenaRegion::attach(uint8_t* base, uint64_t capacity) {
    std::lock_guard<std::mutex> lk(mu_);
    base_ = base;
    arena_ = ArenaAllocator(base ? capacity : 0);
    st_.arena_bytes = arena_.capacity();
    st_.arena_used = 0;
}

uint8_t* ArenaRegion::take(uint64_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    const int64_t off = base_ ? arena_.allocate(bytes) : -1;
    if (off < 0) {
        st_.overflow++;
        return nullptr;
    }
    st_.arena_used = arena_.used();
    return base_ + off;
}

bool ArenaRegion::give_back(uint8_t* p, uint64_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!base_ || p < base_ || p >= base_ + arena_.capacity()) return false;
    arena_.free(static_cast<uint64_t>(p - base_), bytes);
    st_.arena_used = arena_.used();
    return true;
}

void ArenaRegion::count(uint64_t TierMemoryStats::*counter) {
    std::lock_guard<std::mutex> lk(mu_);
    ++(st_.*counter);
}

TierMemoryStats ArenaRegion::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    return st_;
}

#ifdef MOEMESH_HAVE_CUDA

namespace {

std::string cuda_err(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

std::string free_vram(int device) {
    size_t fr = 0, total = 0;
    if (cudaMemGetInfo(&fr, &total) != cudaSuccess) {
        (void)cudaGetLastError();
        return "unknown";
    }
    return format_bytes(fr) + " of " + format_bytes(total);
}

}  // namespace

// ---- VRAM ---------------------------------------------------------------------------------------

StatusOr<std::unique_ptr<VramTierMemory>> VramTierMemory::create(int device, uint64_t arena_bytes) {
    std::unique_ptr<VramTierMemory> m(new VramTierMemory());
    m->device_ = device;
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return MM_ERROR("cuda:%d: cannot use the device: %s", device, cuda_err(e).c_str());
    }
    const uint64_t capacity = ArenaAllocator(arena_bytes).capacity();
    void* p = nullptr;
    if (capacity) {
        e = cudaMalloc(&p, capacity);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return MM_ERROR("cuda:%d: cannot allocate the device cache tier (%s of VRAM; %s free): %s", device,
                            format_bytes(capacity).c_str(), free_vram(device).c_str(), cuda_err(e).c_str());
        }
    }
    m->region_.attach(static_cast<uint8_t*>(p), capacity);
    m->lanes_.resize(kFillLanes);
    for (Lane& lane : m->lanes_) {
        cudaStream_t s = nullptr;
        e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return MM_ERROR("cuda:%d: cannot create the cache's copy streams: %s", device, cuda_err(e).c_str());
        }
        lane.stream = s;
    }
    return m;
}

struct VramTierMemory::Batch {
    ExpertReader* below;
    const std::vector<ExpertRead>* reads;
    std::vector<Status>* out;
    const ReadDone* done;
    size_t next = 0, finished = 0;
};

VramTierMemory::~VramTierMemory() {
    {
        std::lock_guard<std::mutex> lk(lane_mu_);
        stop_ = true;
    }
    lane_cv_.notify_all();
    for (auto& t : threads_) t.join();
    (void)cudaSetDevice(device_);
    for (Lane& lane : lanes_) {
        if (lane.stream) (void)cudaStreamSynchronize(static_cast<cudaStream_t>(lane.stream));
        if (lane.stream) (void)cudaStreamDestroy(static_cast<cudaStream_t>(lane.stream));
        if (lane.staging) (void)cudaFreeHost(lane.staging);
    }
    if (region_.base()) (void)cudaFree(region_.base());
}

StatusOr<uint8_t*> VramTierMemory::allocate(uint64_t bytes) {
    if (uint8_t* r = region_.take(bytes)) return r;
    (void)cudaSetDevice(device_);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<uint64_t>(bytes, 1));
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return MM_ERROR("cuda:%d: cannot allocate %s of VRAM for a cached expert outside the tier's arena (%s free): %s",
                        device_, format_bytes(bytes).c_str(), free_vram(device_).c_str(), cuda_err(e).c_str());
    }
    return static_cast<uint8_t*>(p);
}

void VramTierMemory::free(uint8_t* p, uint64_t bytes) {
    if (!p || region_.give_back(p, bytes)) return;
    (void)cudaSetDevice(device_);
    (void)cudaFree(p);
}

Status VramTierMemory::fill(ExpertReader& below, int layer, int expert, uint8_t* dst, uint64_t bytes) {
    std::lock_guard<std::mutex> lk(fill_mu_);
    // Fills run on the compute thread, the prefetch thread and the loader: each selects the device.
    cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return MM_ERROR("cuda:%d: selecting the device to copy layer %d expert %d: %s", device_, layer, expert,
                        cuda_err(e).c_str());
    }
    const auto s = static_cast<cudaStream_t>(lanes_[0].stream);
    if (auto* tier = dynamic_cast<CacheTier*>(&below)) {
        // Straight from the host tier's entry, pinned while the copy runs.
        uint8_t* src = nullptr;
        void* token = nullptr;
        MM_RETURN_IF_ERROR(tier->acquire(layer, expert, &src, &token));
        if (e == cudaSuccess) e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s);
        if (e == cudaSuccess) e = cudaStreamSynchronize(s);
        tier->release(token);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return MM_ERROR("cuda:%d: copying layer %d expert %d (%s) from the host tier: %s", device_, layer, expert,
                            format_bytes(bytes).c_str(), cuda_err(e).c_str());
        }
        region_.count(&TierMemoryStats::direct_fills);
        return Status();
    }
    return fill_lane(lanes_[0], below, ExpertRead{layer, expert, dst, bytes});
}

Status VramTierMemory::fill_lane(Lane& lane, ExpertReader& below, const ExpertRead& r) {
    const auto s = static_cast<cudaStream_t>(lane.stream);
    cudaError_t e = cudaSuccess;
    if (lane.staging_bytes < r.bytes) {
        if (lane.staging) (void)cudaFreeHost(lane.staging);
        lane.staging = nullptr;
        lane.staging_bytes = 0;
        void* p = nullptr;
        e = cudaHostAlloc(&p, r.bytes, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return MM_ERROR("cuda:%d: cannot allocate %s of pinned staging memory for cache fills: %s", device_,
                            format_bytes(r.bytes).c_str(), cuda_err(e).c_str());
        }
        lane.staging = static_cast<uint8_t*>(p);
        lane.staging_bytes = r.bytes;
    }
    MM_RETURN_IF_ERROR(below.read_expert(r.layer, r.expert, lane.staging));
    e = cudaMemcpyAsync(r.dst, lane.staging, r.bytes, cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return MM_ERROR("cuda:%d: copying layer %d expert %d (%s) to VRAM: %s", device_, r.layer, r.expert,
                        format_bytes(r.bytes).c_str(), cuda_err(e).c_str());
    }
    region_.count(&TierMemoryStats::staged_fills);
    return Status();
}

void VramTierMemory::run_batch(int index) {
    Lane& lane = lanes_[static_cast<size_t>(index)];
    std::unique_lock<std::mutex> lk(lane_mu_);
    while (batch_ && batch_->next < batch_->reads->size()) {
        Batch* b = batch_;
        const size_t i = b->next++;
        lk.unlock();
        Status st;
        const cudaError_t e = cudaSetDevice(device_);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            st = MM_ERROR("cuda:%d: selecting the device to copy layer %d expert %d: %s", device_, (*b->reads)[i].layer,
                          (*b->reads)[i].expert, cuda_err(e).c_str());
        } else {
            st = fill_lane(lane, *b->below, (*b->reads)[i]);
        }
        (*b->out)[i] = std::move(st);
        if (*b->done) (*b->done)(i);
        lk.lock();
        if (++b->finished == b->reads->size()) batch_done_cv_.notify_all();
    }
}

void VramTierMemory::lane_loop(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(lane_mu_);
    for (;;) {
        lane_cv_.wait(lk, [&] { return stop_ || (batch_ && batch_seq_ != seen); });
        if (stop_) return;
        seen = batch_seq_;
        lk.unlock();
        run_batch(index);
        lk.lock();
    }
}

void VramTierMemory::fill_batch(ExpertReader& below, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                                const ReadDone& done) {
    if (reads.size() < 2 || dynamic_cast<CacheTier*>(&below)) {  // a host tier: copies straight from its entries
        TierMemory::fill_batch(below, reads, out, done);
        return;
    }
    std::lock_guard<std::mutex> one(batch_mu_);
    std::lock_guard<std::mutex> lane0(fill_mu_);
    out->assign(reads.size(), Status());
    Batch b{&below, &reads, out, &done};
    {
        std::lock_guard<std::mutex> lk(lane_mu_);
        while (static_cast<int>(threads_.size()) < kFillLanes - 1)
            threads_.emplace_back(&VramTierMemory::lane_loop, this, static_cast<int>(threads_.size()) + 1);
        batch_ = &b;
        ++batch_seq_;
    }
    lane_cv_.notify_all();
    run_batch(0);
    std::unique_lock<std::mutex> lk(lane_mu_);
    batch_done_cv_.wait(lk, [&] { return b.finished == reads.size(); });
    batch_ = nullptr;
}

// ---- pinned host ---------------------------------------------------------------------------------

StatusOr<std::unique_ptr<PinnedHostTierMemory>> PinnedHostTierMemory::create(int device, uint64_t arena_bytes) {
    std::unique_ptr<PinnedHostTierMemory> m(new PinnedHostTierMemory());
    m->device_ = device;
    const uint64_t capacity = ArenaAllocator(arena_bytes).capacity();
    void* p = nullptr;
    if (capacity) {
        cudaError_t e = cudaSetDevice(device);
        if (e == cudaSuccess) e = cudaHostAlloc(&p, capacity, cudaHostAllocPortable);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return MM_ERROR("cuda:%d: cannot allocate the pinned host cache tier (%s of page-locked RAM): %s", device,
                            format_bytes(capacity).c_str(), cuda_err(e).c_str());
        }
    }
    m->region_.attach(static_cast<uint8_t*>(p), capacity);
    return m;
}

PinnedHostTierMemory::~PinnedHostTierMemory() {
    if (region_.base()) (void)cudaFreeHost(region_.base());
}

StatusOr<uint8_t*> PinnedHostTierMemory::allocate(uint64_t bytes) {
    if (uint8_t* r = region_.take(bytes)) return r;
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, std::max<uint64_t>(bytes, 1), cudaHostAllocPortable);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return MM_ERROR("cuda:%d: cannot allocate %s of pinned host memory for a cached expert: %s", device_,
                        format_bytes(bytes).c_str(), cuda_err(e).c_str());
    }
    return static_cast<uint8_t*>(p);
}

void PinnedHostTierMemory::free(uint8_t* p, uint64_t bytes) {
    if (!p || region_.give_back(p, bytes)) return;
    (void)cudaFreeHost(p);
}

#endif  // MOEMESH_HAVE_CUDA

}  // namespace moemesh
