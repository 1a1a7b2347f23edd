// Cache-tier memory on a CUDA device (worker/expert_cache.h TierMemory): the device tier in VRAM and
// the host tier in pinned RAM, each one arena carved by an ArenaAllocator.
//
//   VramTierMemory        one cudaMalloc of the tier's budget on device N, made once: no cudaMalloc /
//                         cudaFree per miss (cudaFree synchronizes the whole device). An entry is
//                         charged its size rounded up to kTierGranule (256 bytes, cudaMalloc's own
//                         alignment); the CacheTier adds kCacheEntryOverhead for its bookkeeping, which
//                         is host memory, so the arena never holds more than the budget. When the arena
//                         has no free range of the size asked for (fragmentation across layers of
//                         different sizes, or the tier's transient buffers beyond the budget) the entry
//                         gets its own cudaMalloc, counted in `overflow` (`stats()`).
//                         fill(): from a CacheTier below (the host tier) it pins the host entry and copies
//                         it with cudaMemcpyAsync on the tier's copy stream (DMA when the host tier is
//                         pinned), then releases it; from the file it reads into a pinned staging buffer
//                         and copies. Fills from several threads (compute, prefetch) are serialized: the
//                         copy engine is the bottleneck anyway.
//   PinnedHostTierMemory  one cudaHostAlloc of the host tier's budget (page-locked: the budget is
//                         resident from the start), same allocator and charge.
//
// The allocator is plain C++ (tested on CPU); the CUDA classes exist only in CUDA builds
// (MOEMESH_HAVE_CUDA). Errors name the device, the bytes and the CUDA error string.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "worker/expert_cache.h"

namespace moemesh {

inline constexpr uint64_t kTierGranule = 256;

// First-fit allocator of byte ranges [0, capacity) in kTierGranule units; adjacent free ranges are
// merged on free. Not thread-safe (its owner locks).
class ArenaAllocator {
public:
    explicit ArenaAllocator(uint64_t capacity = 0);
    static uint64_t round(uint64_t bytes) { return (bytes + kTierGranule - 1) / kTierGranule * kTierGranule; }
    // Offset of a free range of round(bytes), or -1 when no free range is large enough.
    int64_t allocate(uint64_t bytes);
    // Returns the range allocate(bytes) gave at `offset` (same bytes).
    void free(uint64_t offset, uint64_t bytes);
    uint64_t capacity() const { return capacity_; }
    uint64_t used() const { return used_; }
    uint64_t largest_free() const;
    size_t free_ranges() const { return free_.size(); }

private:
    uint64_t capacity_ = 0, used_ = 0;
    std::map<uint64_t, uint64_t> free_;  // offset → length, disjoint, never adjacent
};

struct TierMemoryStats {
    uint64_t arena_bytes = 0, arena_used = 0;
    uint64_t overflow = 0;          // allocations that did not fit the arena (own cudaMalloc / cudaHostAlloc)
    uint64_t direct_fills = 0;      // fills copied straight from a CacheTier below
    uint64_t staged_fills = 0;      // fills read into the staging buffer, then copied
};

// An arena over one block its owner allocated (VRAM, pinned RAM; not owned here): thread-safe carving
// of the block, and the owner's counters. Plain C++ (tested on CPU).
class ArenaRegion {
public:
    // base may be null (capacity 0): nothing fits, every take() is an overflow.
    void attach(uint8_t* base, uint64_t capacity);
    uint8_t* base() const { return base_; }
    // A range of round(bytes) of the block, or null (counted as an overflow) when none is free.
    uint8_t* take(uint64_t bytes);
    // Gives back what take(bytes) returned; false when p is not in the block (the owner frees it).
    bool give_back(uint8_t* p, uint64_t bytes);
    void count(uint64_t TierMemoryStats::*counter);  // e.g. &TierMemoryStats::direct_fills
    TierMemoryStats stats() const;

private:
    uint8_t* base_ = nullptr;
    mutable std::mutex mu_;  // arena_ and st_
    ArenaAllocator arena_;
    TierMemoryStats st_;
};

#ifdef MOEMESH_HAVE_CUDA
// VRAM of device `device` for the tier compute reads.
class VramTierMemory final : public TierMemory {
public:
    // arena_bytes: the tier's budget (one cudaMalloc now). Errors: the device, the bytes, the
    // CUDA error (e.g. out of memory) and how much VRAM was free.
    static StatusOr<std::unique_ptr<VramTierMemory>> create(int device, uint64_t arena_bytes);
    ~VramTierMemory() override;
    uint64_t charge(uint64_t bytes) const override { return ArenaAllocator::round(bytes); }
    StatusOr<uint8_t*> allocate(uint64_t bytes) override;
    void free(uint8_t* p, uint64_t bytes) override;
    Status fill(ExpertReader& below, int layer, int expert, uint8_t* dst, uint64_t bytes) override;
    // A batch read from the file (not from a host tier): up to kFillLanes experts at once, each lane
    // with its own pinned staging buffer and copy stream (the caller's thread is lane 0, the others
    // are threads started on first use), so that the file reads run side by side and each copy to
    // the device overlaps the next read. done(i) as each expert lands, from the lane that read it.
    // One read at a time goes through the file's page cache at memcpy speed, a few GB/s; several
    // come closer to the host-to-device bandwidth (what the offload bench's bound assumes).
    void fill_batch(ExpertReader& below, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                    const ReadDone& done = nullptr) override;
    TierMemoryStats stats() const { return region_.stats(); }
    int device() const { return device_; }
    static constexpr int kFillLanes = 4;

private:
    struct Lane {
        void* stream = nullptr;  // cudaStream_t
        uint8_t* staging = nullptr;
        uint64_t staging_bytes = 0;
    };
    struct Batch;
    VramTierMemory() = default;
    // Reads one expert into the lane's staging buffer and copies it to dst (synchronous).
    Status fill_lane(Lane& lane, ExpertReader& below, const ExpertRead& r);
    void lane_loop(int index);
    void run_batch(int lane);  // takes items of batch_ until none is left
    int device_ = 0;
    ArenaRegion region_;
    std::mutex fill_mu_;  // lanes_[0] (fill(), and fill_batch's own thread)
    std::mutex batch_mu_;  // one fill_batch at a time
    std::vector<Lane> lanes_;  // kFillLanes; [0]: fill() and the calling thread of fill_batch
    std::vector<std::thread> threads_;  // lanes 1..: started by the first fill_batch
    std::mutex lane_mu_;
    std::condition_variable lane_cv_, batch_done_cv_;
    Batch* batch_ = nullptr;  // under lane_mu_
    uint64_t batch_seq_ = 0;
    bool stop_ = false;
};

// Page-locked host memory for the host tier below a VramTierMemory.
class PinnedHostTierMemory final : public TierMemory {
public:
    static StatusOr<std::unique_ptr<PinnedHostTierMemory>> create(int device, uint64_t arena_bytes);
    ~PinnedHostTierMemory() override;
    uint64_t charge(uint64_t bytes) const override { return ArenaAllocator::round(bytes); }
    StatusOr<uint8_t*> allocate(uint64_t bytes) override;
    void free(uint8_t* p, uint64_t bytes) override;
    // Host memory: the whole batch goes to the reader below (io_uring submits it together).
    void fill_batch(ExpertReader& below, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                    const ReadDone& done = nullptr) override {
        below.read_experts(reads, out, done);
    }
    TierMemoryStats stats() const { return region_.stats(); }

private:
    PinnedHostTierMemory() = default;
    int device_ = 0;
    ArenaRegion region_;
};
#endif

}  // namespace moemesh
