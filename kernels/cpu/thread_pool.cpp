// ThreadPool: workers spin briefly on a generation counter between jobs (decode issues many small
// parallel_for calls per layer, too short for a mutex + condvar hand-off each), then sleep on a
// condition variable. Chunks are handed out dynamically from an atomic counter; the calling thread
// takes chunks too.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "kernels/ops.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace moemesh {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// How long an idle worker spins before sleeping. Long enough to bridge the serial gaps between the
// kernels of one decode step, short enough not to hog a core when the process is idle.
int64_t spin_budget_us() {
    static const int64_t us = [] {
        const char* env = std::getenv("MOEMESH_SPIN_US");
        return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t{1000};
    }();
    return us;
}

}  // namespace

// Job state in one word, so that taking a chunk is a single CAS that fails for a worker still
// looking at a finished job: [63:40] job id (low 24 bits of generation), [39:20] number of chunks,
// [19:0] next chunk to take.
constexpr int kChunkBits = 20;
constexpr uint64_t kChunkMask = (uint64_t{1} << kChunkBits) - 1;
constexpr uint32_t kJobMask = (1u << 24) - 1;

uint64_t pack_state(uint32_t job, int64_t num_chunks, int64_t next) {
    return (uint64_t{job & kJobMask} << (2 * kChunkBits)) | (static_cast<uint64_t>(num_chunks) << kChunkBits) |
           static_cast<uint64_t>(next);
}

struct ThreadPool::Impl {
    int n_threads = 1;
    std::vector<std::thread> workers;

    // Current job; written by the caller before state and generation are published. A worker reads
    // them only after winning a chunk of that job, and the caller does not move on before every
    // chunk is completed, so they are stable while read.
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0;
    int64_t chunk = 1;

    alignas(64) std::atomic<uint64_t> state{0};
    alignas(64) std::atomic<int64_t> completed{0};    // chunks finished in the current job
    alignas(64) std::atomic<uint32_t> generation{0};  // bumped once per job (and at shutdown)
    alignas(64) std::atomic<int> sleepers{0};         // workers blocked on cv
    std::atomic<bool> stop{false};
    std::mutex mu;
    std::condition_variable cv;
    bool in_job = false;  // parallel_for is not reentrant

    void run_chunks(uint32_t job) {
        uint64_t s = state.load(std::memory_order_acquire);
        for (;;) {
            if ((s >> (2 * kChunkBits)) != (job & kJobMask)) return;
            const int64_t num_chunks = static_cast<int64_t>((s >> kChunkBits) & kChunkMask);
            const int64_t c = static_cast<int64_t>(s & kChunkMask);
            if (c >= num_chunks) return;
            if (!state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                continue;
            }
            const int64_t begin = c * chunk;
            (*fn)(begin, std::min(n, begin + chunk));
            completed.fetch_add(1, std::memory_order_release);
            s = state.load(std::memory_order_acquire);
        }
    }

    void worker_loop() {
        uint32_t seen = 0;
        for (;;) {
            uint32_t g = generation.load(std::memory_order_acquire);
            if (g == seen) {
                const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_budget_us());
                for (int spins = 1;; ++spins) {
                    cpu_relax();
                    g = generation.load(std::memory_order_acquire);
                    if (g != seen) break;
                    if ((spins & 255) != 0) continue;
                    // Let other runnable threads (an oversubscribed machine) have the core now and then.
                    std::this_thread::yield();
                    if (std::chrono::steady_clock::now() < deadline) continue;
                    std::unique_lock<std::mutex> lock(mu);
                    sleepers.fetch_add(1, std::memory_order_seq_cst);
                    while ((g = generation.load(std::memory_order_seq_cst)) == seen) cv.wait(lock);
                    sleepers.fetch_sub(1, std::memory_order_relaxed);
                    break;
                }
            }
            seen = g;
            if (stop.load(std::memory_order_acquire)) return;
            run_chunks(g);
        }
    }

    void publish(uint32_t job) {
        generation.store(job, std::memory_order_seq_cst);
        // A worker registers as sleeper (seq_cst) before re-checking generation under mu, so either it
        // sees the new generation or we see it registered and wake it.
        if (sleepers.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(mu);
            cv.notify_all();
        }
    }
};

ThreadPool::ThreadPool(int n_threads) : impl_(std::make_unique<Impl>()) {
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    impl_->n_threads = n_threads;
    impl_->workers.reserve(static_cast<size_t>(n_threads - 1));
    for (int i = 1; i < n_threads; ++i) impl_->workers.emplace_back([this] { impl_->worker_loop(); });
}

ThreadPool::~ThreadPool() {
    impl_->stop.store(true, std::memory_order_release);
    {
        // Under mu so a worker between its generation check and cv.wait cannot miss the wake-up.
        std::lock_guard<std::mutex> lock(impl_->mu);
        impl_->generation.fetch_add(1, std::memory_order_seq_cst);  // no job matches: workers just exit
        impl_->cv.notify_all();
    }
    for (auto& t : impl_->workers) t.join();
}

int ThreadPool::size() const { return impl_->n_threads; }

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn) {
    if (n <= 0) return;
    Impl& p = *impl_;
    if (p.n_threads == 1 || n == 1) {
        fn(0, n);
        return;
    }
    MM_CHECK(!p.in_job);
    p.in_job = true;
    // About four chunks per thread: balances uneven progress without much counter traffic.
    const int64_t target = std::min<int64_t>(n, 4 * static_cast<int64_t>(p.n_threads));
    p.fn = &fn;
    p.n = n;
    p.chunk = (n + target - 1) / target;
    const int64_t num_chunks = (n + p.chunk - 1) / p.chunk;
    MM_CHECK(num_chunks <= static_cast<int64_t>(kChunkMask));
    const uint32_t job = p.generation.load(std::memory_order_relaxed) + 1;
    p.completed.store(0, std::memory_order_relaxed);
    p.state.store(pack_state(job, num_chunks, 0), std::memory_order_release);
    p.publish(job);
    p.run_chunks(job);
    // Workers that have not woken up yet are not waited for: only chunks already taken are.
    for (int spins = 1; p.completed.load(std::memory_order_acquire) < num_chunks; ++spins) {
        cpu_relax();
        if ((spins & 1023) == 0) std::this_thread::yield();
    }
    p.fn = nullptr;
    p.in_job = false;
}

}  // namespace moemesh
