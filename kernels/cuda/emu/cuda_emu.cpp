// The CUDA emulator's runtime: fibers for CUDA threads, launches, memory, streams, graphs
// (see cuda_emu.h for what is emulated and what is not).
#include "kernels/cuda/emu/cuda_emu.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/context/fiber.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

namespace mm_emu {

thread_local ThreadState* g_thread = nullptr;

namespace {

// ---- errors ----
thread_local cudaError_t g_last_error = cudaSuccess;
std::atomic<int> g_sticky{cudaSuccess};  // a failed launch poisons the context, as on a GPU

cudaError_t fail(cudaError_t e, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
cudaError_t fail(cudaError_t e, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "[cuda-emu] %s\n", buf);
    g_last_error = e;
    return e;
}
cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky.load()); }

// ---- settings ----
int env_int(const char* name, int dflt, int lo, int hi) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') return dflt;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*end != '\0' || n < lo || n > hi) {
        std::fprintf(stderr, "[cuda-emu] %s=%s is not an integer in [%d, %d]; using %d\n", name, v, lo, hi, dflt);
        return dflt;
    }
    return static_cast<int>(n);
}
int device_count() {
    static const int n = env_int("MOEMESH_CUDA_EMU_DEVICES", 1, 0, 16);
    return n;
}
size_t device_memory() {
    static const size_t b = static_cast<size_t>(env_int("MOEMESH_CUDA_EMU_MEM_MIB", 16384, 1, 1 << 20)) << 20;
    return b;
}
// MOEMESH_CUDA_EMU_CC=M.N: the compute capability the devices report (major * 10 + minor; default 90).
// Read at each use, so that a test can set it for a while.
int compute_capability() {
    const char* v = std::getenv("MOEMESH_CUDA_EMU_CC");
    int major = 0, minor = 0;
    char tail = 0;
    if (v == nullptr || *v == '\0') return 90;
    if (std::sscanf(v, "%d.%d%c", &major, &minor, &tail) != 2 || major < 1 || major > 99 || minor < 0 || minor > 9) {
        std::fprintf(stderr, "[cuda-emu] MOEMESH_CUDA_EMU_CC=%s is not a compute capability like 8.9; using 9.0\n", v);
        return 90;
    }
    return major * 10 + minor;
}
// The emulated build's code runs from compute 9.0 up (the default build's PTX for compute_90).
constexpr int kLowestCc = 90;
constexpr int kSms = 4;
constexpr size_t kDefaultSmem = 48 << 10, kOptinSmem = 227 << 10, kSmemPerSm = 228 << 10;
thread_local int g_device = 0;

// ---- memory registry ----
struct Alloc {
    size_t bytes;   // as requested: copies past it fail, as out-of-bounds accesses would on a GPU
    size_t mapped;  // what was mapped / budgeted (whole pages for device memory)
    uintptr_t map_base;  // device memory: start of the mapping; the allocation ends where it
                             // ends (256-byte granule), and a PROT_NONE guard page follows
    bool device;
    int dev;
    int fd = -1;              // shared (memfd) once cudaIpcGetMemHandle exported it
    bool ipc_opened = false;  // another process's allocation, mapped by cudaIpcOpenMemHandle
    bool peer_access = false; // opened with cudaIpcMemLazyEnablePeerAccess: other devices may use it
};
std::mutex g_mem_mu;
std::map<uintptr_t, Alloc> g_allocs;  // by start address
std::vector<size_t> g_used(16, 0);

// The allocation holding [p, p + n), or nullptr.
const Alloc* find_alloc(const void* p, size_t n, uintptr_t* base = nullptr) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (a + n > it->first + it->second.bytes || a < it->first) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}
bool is_device(const void* p, size_t n) {
    std::lock_guard<std::mutex> lk(g_mem_mu);
    const Alloc* a = find_alloc(p, n == 0 ? 1 : n);
    return a != nullptr && a->device;
}
bool touches_device(const void* p, size_t n) {
    std::lock_guard<std::mutex> lk(g_mem_mu);
    const Alloc* a = find_alloc(p, 1);
    if (a == nullptr && n > 0) a = find_alloc(static_cast<const char*>(p) + n - 1, 1);
    return a != nullptr && a->device;
}

const char* kind_name(cudaMemcpyKind k) {
    switch (k) {
        case cudaMemcpyHostToHost: return "HostToHost";
        case cudaMemcpyHostToDevice: return "HostToDevice";
        case cudaMemcpyDeviceToHost: return "DeviceToHost";
        case cudaMemcpyDeviceToDevice: return "DeviceToDevice";
        default: return "Default";
    }
}
// The checks a GPU makes (or whose violation is undefined there): each side of the copy (the bytes
// it spans) is device memory exactly when the kind says so.
cudaError_t check_copy(void* dst, size_t dst_bytes, const void* src, size_t src_bytes, cudaMemcpyKind kind,
                       const char* what) {
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
        return fail(cudaErrorInvalidMemcpyDirection, "%s: invalid copy kind %d", what, static_cast<int>(kind));
    if (dst_bytes == 0 || kind == cudaMemcpyDefault) return cudaSuccess;
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (dst_dev ? !is_device(dst, dst_bytes) : touches_device(dst, dst_bytes))
        return fail(cudaErrorInvalidValue, "%s %s: destination %p + %zu bytes is %s device memory", what,
                    kind_name(kind), dst, dst_bytes, dst_dev ? "not inside one allocation of" : "in");
    if (src_dev ? !is_device(src, src_bytes) : touches_device(src, src_bytes))
        return fail(cudaErrorInvalidValue, "%s %s: source %p + %zu bytes is %s device memory", what, kind_name(kind),
                    src, src_bytes, src_dev ? "not inside one allocation of" : "in");
    return cudaSuccess;
}

// ---- fibers: one per CUDA thread of the running block (Boost.Context) ----
namespace bctx = boost::context;
constexpr size_t kStackBytes = 256 << 10, kGuardBytes = 4096;

// Stacks for the fibers, reused across blocks and launches (one pool per OS thread), each with a
// guard page below it so that an overflow faults instead of corrupting a neighbour.
thread_local std::vector<void*> g_free_stacks;
struct PooledStack {
    bctx::stack_context allocate() {
        void* base = nullptr;
        if (!g_free_stacks.empty()) {
            base = g_free_stacks.back();
            g_free_stacks.pop_back();
        } else {
            void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                std::fprintf(stderr, "[cuda-emu] no memory for a thread stack\n");
                std::abort();
            }
            mprotect(m, kGuardBytes, PROT_NONE);
            base = static_cast<char*>(m) + kGuardBytes;
        }
        bctx::stack_context sc;
        sc.size = kStackBytes;
        sc.sp = static_cast<char*>(base) + kStackBytes;
        return sc;
    }
    void deallocate(bctx::stack_context& sc) noexcept {
        g_free_stacks.push_back(static_cast<char*>(sc.sp) - sc.size);
    }
};

struct Fiber {
    bctx::fiber self;   // resumes this CUDA thread
    bctx::fiber sched;  // while it runs: resumes the scheduler
    ThreadState ts;
    int lane = 0, warp = 0;
    enum State { kReady, kBlockWait, kWarpWait, kDone } state = kReady;
    uint64_t slot[2] = {0, 0};  // this lane's values in warp exchanges (alternating buffers)
};
struct WarpSync {
    unsigned exist = 0;    // lanes of this warp in the block
    unsigned live = 0;     // lanes that have not exited
    unsigned waiting = 0;  // lanes waiting at the current warp barrier
    unsigned mask = 0;     // the lanes that barrier waits for
    unsigned gen = 0;      // barriers completed: exchange k uses slot[k & 1]
};
struct BlockRun {
    const char* name = nullptr;
    const std::function<void()>* body = nullptr;
    std::vector<Fiber> fibers;
    std::vector<WarpSync> warps;
    int live = 0, block_waiting = 0;
    Fiber* cur = nullptr;
    void* dyn_smem = nullptr;
    std::string failure;
};
thread_local BlockRun* g_run = nullptr;
thread_local std::vector<unsigned char> g_dyn_smem;

// A fault (a guard page after device memory, or a thread's stack guard) while a kernel runs: name
// the kernel and the CUDA thread before dying, as compute-sanitizer would.
void on_fault(int sig, siginfo_t* info, void*) {
    char buf[512];
    int n = 0;
    if (g_run != nullptr && g_run->cur != nullptr) {
        const ThreadState& t = g_run->cur->ts;
        n = std::snprintf(buf, sizeof buf,
                          "[cuda-emu] kernel %s: invalid access at %p by thread (%u,%u,%u) of block (%u,%u,%u) "
                          "(past the end of a device allocation, or a thread stack overflow)\n",
                          g_run->name, info->si_addr, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z, t.block_idx.x,
                          t.block_idx.y, t.block_idx.z);
    } else {
        n = std::snprintf(buf, sizeof buf, "[cuda-emu] invalid access at %p outside a kernel\n", info->si_addr);
    }
    if (n > 0) (void)!write(2, buf, static_cast<size_t>(std::min<int>(n, sizeof buf - 1)));
    signal(sig, SIG_DFL);
    raise(sig);
}

}  // namespace

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        // The handler runs on its own stack (a fiber's stack may be the one that overflowed).
        static std::vector<char> alt(1 << 16);
        stack_t ss{};
        ss.ss_sp = alt.data();
        ss.ss_size = alt.size();
        sigaltstack(&ss, nullptr);
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
}

namespace {
void fail_block(const std::string& why) {
    if (g_run->failure.empty()) g_run->failure = why;
}
std::string where(const Fiber& f) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", f.ts.thread_idx.x, f.ts.thread_idx.y,
                  f.ts.thread_idx.z, f.ts.block_idx.x, f.ts.block_idx.y, f.ts.block_idx.z);
    return buf;
}

void yield_to_scheduler() {
    Fiber* f = g_run->cur;
    f->sched = std::move(f->sched).resume();
}

bctx::fiber fiber_main(bctx::fiber&& sched) {
    BlockRun& r = *g_run;
    Fiber& f = *r.cur;
    f.sched = std::move(sched);
    (*r.body)();
    f.state = Fiber::kDone;
    --r.live;
    WarpSync& w = r.warps[f.warp];
    w.live &= ~(1u << f.lane);
    if (w.waiting != 0 && (w.mask & (1u << f.lane)))
        fail_block(where(f) + " exited while lanes of its warp wait for it at a shuffle or __syncwarp");
    if (r.block_waiting > 0 && r.block_waiting == r.live) {
        for (Fiber& o : r.fibers)
            if (o.state == Fiber::kBlockWait) o.state = Fiber::kReady;
        r.block_waiting = 0;
    }
    return std::move(f.sched);
}

}  // namespace

void* dynamic_shared() { return g_run->dyn_smem; }

namespace {
std::mutex g_prefetch_mu;
bool g_prefetch_on = false;
std::vector<PrefetchRange> g_prefetches;
}  // namespace

void prefetch_l2(const void* p, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    bool inside = false;
    {
        std::lock_guard<std::mutex> lk(g_mem_mu);
        uintptr_t base = 0;
        const Alloc* al = find_alloc(p, 1, &base);
        inside = al != nullptr && al->device && bytes > 0 && a + bytes <= base + ((al->bytes + 255) & ~size_t{255});
    }
    if (!inside) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "an L2 prefetch of %zu bytes at %p is not inside one device allocation", bytes,
                      p);
        if (g_run != nullptr) fail_block(buf);
        return;
    }
    std::lock_guard<std::mutex> lk(g_prefetch_mu);
    if (g_prefetch_on) g_prefetches.push_back({a, a + bytes});
}

std::vector<PrefetchRange> prefetch_log(bool on) {
    std::lock_guard<std::mutex> lk(g_prefetch_mu);
    g_prefetch_on = on;
    return std::exchange(g_prefetches, {});
}

int lane_id() { return g_run->cur->lane; }

void sync_block() {
    BlockRun& r = *g_run;
    Fiber& f = *r.cur;
    if (++r.block_waiting == r.live) {
        for (Fiber& o : r.fibers)
            if (o.state == Fiber::kBlockWait) o.state = Fiber::kReady;
        r.block_waiting = 0;
        return;
    }
    f.state = Fiber::kBlockWait;
    yield_to_scheduler();
}

void sync_warp(unsigned mask) {
    BlockRun& r = *g_run;
    Fiber& f = *r.cur;
    WarpSync& w = r.warps[f.warp];
    const unsigned me = 1u << f.lane;
    mask &= w.exist;
    if (!(mask & me)) {
        fail_block(where(f) + " called a warp-synchronous function with a mask that leaves out its own lane");
        yield_to_scheduler();
        return;
    }
    if (w.waiting == 0) {
        w.mask = mask;
    } else if (w.mask != mask) {
        char buf[160];
        std::snprintf(buf, sizeof buf, " synchronizes its warp with mask 0x%08x while other lanes wait with 0x%08x",
                      mask, w.mask);
        fail_block(where(f) + buf);
        yield_to_scheduler();
        return;
    }
    if (w.mask & ~w.live) {
        fail_block(where(f) + " synchronizes its warp with lanes that have exited");
        yield_to_scheduler();
        return;
    }
    w.waiting |= me;
    if (w.waiting == w.mask) {
        const int base = f.warp * 32;
        for (int l = 0; l < 32; ++l)
            if ((w.mask >> l & 1) && r.fibers[base + l].state == Fiber::kWarpWait)
                r.fibers[base + l].state = Fiber::kReady;
        w.waiting = 0;
        ++w.gen;
        return;
    }
    f.state = Fiber::kWarpWait;
    yield_to_scheduler();
}

uint64_t exchange(unsigned mask, uint64_t bits, int src) {
    BlockRun& r = *g_run;
    Fiber& f = *r.cur;
    WarpSync& w = r.warps[f.warp];
    // One barrier per exchange: exchange k writes and reads buffer k & 1, and no lane can reach
    // exchange k + 2 (the same buffer) before every lane has passed exchange k + 1, i.e. has read k.
    const unsigned buf = w.gen & 1;
    f.slot[buf] = bits;
    sync_warp(mask);
    const int base = f.warp * 32;
    const bool ok = src >= 0 && src < 32 && (w.exist >> src & 1) && (mask >> src & 1);
    return ok ? r.fibers[base + src].slot[buf] : bits;
}

namespace {

std::mutex g_attr_mu;
std::unordered_map<const void*, size_t> g_max_dyn_smem;

size_t max_dynamic_shared(const void* fn) {
    std::lock_guard<std::mutex> lk(g_attr_mu);
    auto it = g_max_dyn_smem.find(fn);
    return it == g_max_dyn_smem.end() ? kDefaultSmem : it->second;
}

// The order in which a launch's blocks run: a GPU runs them at once and in no set order, so that a
// kernel whose last block to finish does a final step (last_block_done in common.cuh) or whose
// blocks read what an earlier block wrote must work whichever block comes last. By default each
// launch runs its blocks in a permutation of its own (seeded by the launch's number in the process,
// so a run is reproducible), which makes a block other than the highest-numbered one the last in
// almost every launch of more than two blocks; MOEMESH_CUDA_EMU_BLOCK_ORDER=index runs them in
// index order (x fastest), as the emulator did before.
bool shuffled_blocks() {
    static const bool s = [] {
        const char* v = std::getenv("MOEMESH_CUDA_EMU_BLOCK_ORDER");
        if (v == nullptr || *v == '\0' || std::strcmp(v, "shuffled") == 0) return true;
        if (std::strcmp(v, "index") == 0) return false;
        std::fprintf(stderr,
                     "[cuda-emu] MOEMESH_CUDA_EMU_BLOCK_ORDER=%s is not 'shuffled' or 'index'; using shuffled\n", v);
        return true;
    }();
    return s;
}
std::atomic<uint64_t> g_launches{0};

// The linear block indices (x fastest) of one launch, in the order they run.
std::vector<uint64_t> block_order(dim3 grid) {
    std::vector<uint64_t> order(uint64_t{grid.x} * grid.y * grid.z);
    std::iota(order.begin(), order.end(), uint64_t{0});
    if (shuffled_blocks()) {
        std::mt19937_64 rng(g_launches.fetch_add(1));
        std::shuffle(order.begin(), order.end(), rng);
    }
    return order;
}

// Runs every block of one launch on this thread. Returns false (with the sticky error set) when a
// block could not complete.
bool execute(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (g_dyn_smem.size() < smem + 16) g_dyn_smem.resize(smem + 16);
    BlockRun run;
    run.name = name;
    run.body = &body;
    run.fibers.resize(n);
    run.warps.resize((n + 31) / 32);
    run.dyn_smem = g_dyn_smem.data();
    BlockRun* const outer = g_run;
    ThreadState* const outer_thread = g_thread;
    g_run = &run;
    bool ok = true;
    const std::vector<uint64_t> order = block_order(grid);
    for (size_t o = 0; o < order.size() && ok; ++o) {
        const unsigned bx = static_cast<unsigned>(order[o] % grid.x),
                       by = static_cast<unsigned>(order[o] / grid.x % grid.y),
                       bz = static_cast<unsigned>(order[o] / (uint64_t{grid.x} * grid.y));
        // Uninitialised shared memory reads as NaN (0xff bytes), never as a lucky zero.
        std::memset(g_dyn_smem.data(), 0xff, smem);
        run.live = n;
        run.block_waiting = 0;
        run.failure.clear();
        for (auto& w : run.warps) w = WarpSync{};
        for (int i = 0; i < n; ++i) {
            Fiber& f = run.fibers[i];
            f.state = Fiber::kReady;
            f.lane = i % 32;
            f.warp = i / 32;
            run.warps[f.warp].exist |= 1u << f.lane;
            run.warps[f.warp].live |= 1u << f.lane;
            f.ts.thread_idx = {static_cast<unsigned>(i) % block.x, static_cast<unsigned>(i) / block.x % block.y,
                               static_cast<unsigned>(i) / (block.x * block.y)};
            f.ts.block_idx = {bx, by, bz};
            f.ts.block_dim = block;
            f.ts.grid_dim = grid;
            f.self = bctx::fiber(std::allocator_arg, PooledStack(), fiber_main);
        }
        const bool reverse = ((bx + by + bz) & 1) != 0;
        while (run.live > 0 && run.failure.empty()) {
            bool progressed = false;
            for (int j = 0; j < n && run.failure.empty(); ++j) {
                Fiber& f = run.fibers[reverse ? n - 1 - j : j];
                if (f.state != Fiber::kReady) continue;
                run.cur = &f;
                g_thread = &f.ts;
                f.self = std::move(f.self).resume();
                progressed = true;
            }
            if (!progressed && run.failure.empty()) {
                int at_block = 0, at_warp = 0;
                const Fiber* example = nullptr;
                for (const Fiber& f : run.fibers) {
                    if (f.state == Fiber::kBlockWait) ++at_block;
                    if (f.state == Fiber::kWarpWait) {
                        ++at_warp;
                        if (!example) example = &f;
                    }
                }
                run.failure = "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
                              std::to_string(at_warp) + " at a warp barrier (shuffle/__syncwarp)" +
                              (example ? ", e.g. " + where(*example) : std::string()) +
                              " (divergent barrier)";
            }
        }
        if (!run.failure.empty()) {
            std::fprintf(stderr, "[cuda-emu] kernel %s, block (%u,%u,%u) of grid (%u,%u,%u), %d threads: %s\n",
                         name, bx, by, bz, grid.x, grid.y, grid.z, n, run.failure.c_str());
            g_sticky.store(cudaErrorLaunchFailure);
            ok = false;
        }
    }
    run.fibers.clear();  // unwinds the threads of a failed block while g_run still points at it
    g_run = outer;
    g_thread = outer_thread;
    return ok;
}

}  // namespace

cudaError_t set_max_dynamic_shared(const void* fn, int bytes) {
    if (bytes < 0 || static_cast<size_t>(bytes) > kOptinSmem)
        return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: %d bytes of dynamic shared memory (the limit is %zu)",
                    bytes, kOptinSmem);
    std::lock_guard<std::mutex> lk(g_attr_mu);
    g_max_dyn_smem[fn] = static_cast<size_t>(bytes);
    return cudaSuccess;
}

// ---- streams, events, graphs ----
struct Graph {
    struct Node {
        std::string what;  // "kernel NAME" or "copy"/"memset": cudaGraphExecUpdate compares them
        std::function<void()> run;
    };
    std::vector<Node> nodes;
};
struct GraphExec {
    std::vector<Graph::Node> nodes;
};
struct Stream {
    Graph* capture = nullptr;  // recording, between BeginCapture and EndCapture
    bool invalidated = false;
    bool blocking = true;  // created without cudaStreamNonBlocking: ordered with the legacy stream
    // Deferred work: runs when something waits for it (see run_until), in submission order.
    std::recursive_mutex exec_mu;  // one runner at a time
    std::mutex q_mu;
    std::deque<std::pair<uint64_t, std::function<void()>>> queue;
    uint64_t next_seq = 1;
};
struct Event {
    std::chrono::steady_clock::time_point t{};
    bool recorded = false;  // its marker has run
    bool timing = true;
    Stream* stream = nullptr;  // where it was last recorded (nullptr: never, or on the legacy stream)
    uint64_t seq = 0;          // the marker's place in that stream
};

namespace {
// Streams run their work when the host waits for it (stream/event/device synchronization, a
// synchronous copy, cudaFree), not when it is submitted, so that a missing synchronization shows
// as wrong data or a stale buffer, as it can on a GPU. MOEMESH_CUDA_EMU_STREAMS=sync runs work at
// submission instead (a debugging aid).
bool deferred_streams() {
    static const bool d = [] {
        const char* v = std::getenv("MOEMESH_CUDA_EMU_STREAMS");
        return !(v != nullptr && std::strcmp(v, "sync") == 0);
    }();
    return d;
}
std::mutex g_streams_mu;
std::vector<Stream*> g_streams;  // live streams

// Runs s's queued work up to and including `upto`.
void run_until(Stream* s, uint64_t upto = UINT64_MAX) {
    std::lock_guard<std::recursive_mutex> ex(s->exec_mu);
    for (;;) {
        std::function<void()> op;
        {
            std::lock_guard<std::mutex> lk(s->q_mu);
            if (s->queue.empty() || s->queue.front().first > upto) return;
            op = std::move(s->queue.front().second);
            s->queue.pop_front();
        }
        op();
    }
}
// Runs every stream's queued work (blocking_only: those ordered with the legacy stream).
void run_streams(bool blocking_only) {
    std::vector<Stream*> all;
    {
        std::lock_guard<std::mutex> lk(g_streams_mu);
        all = g_streams;
    }
    for (Stream* s : all)
        if (!blocking_only || s->blocking) run_until(s);
}
// Submits work to a stream: records it while the stream is captured; on the legacy stream runs it
// now (after the blocking streams' work); otherwise queues it. Returns its sequence number (0: ran).
uint64_t capture_or_run(cudaStream_t s, const std::string& what, std::function<void()> op) {
    if (s != nullptr && s->capture != nullptr) {
        s->capture->nodes.push_back({what, std::move(op)});
        return 0;
    }
    if (s == nullptr || !deferred_streams()) {
        if (s == nullptr && deferred_streams()) run_streams(true);
        op();
        return 0;
    }
    std::lock_guard<std::mutex> lk(s->q_mu);
    const uint64_t seq = s->next_seq++;
    s->queue.emplace_back(seq, std::move(op));
    return seq;
}
bool is_pinned(const void* p) {
    std::lock_guard<std::mutex> lk(g_mem_mu);
    const Alloc* a = find_alloc(p, 1);
    return a != nullptr && !a->device;
}
bool is_pageable(const void* p) { return !is_device(p, 1) && !is_pinned(p); }
// Submits a copy: with a side in pageable host memory it is synchronous, as the CUDA runtime makes
// it (it waits for the stream, then copies); with pinned memory or device to device it is queued.
cudaError_t submit_copy(cudaStream_t s, void* dst, const void* src, bool empty, std::function<void()> op) {
    if (sticky() != cudaSuccess) return sticky();
    if (s != nullptr && s->capture == nullptr && !empty && (is_pageable(src) || is_pageable(dst))) {
        run_until(s);
        op();
    } else {
        capture_or_run(s, "copy", std::move(op));
    }
    return sticky();
}
}  // namespace

bool check_pointer_arg(const char* name, int index, const void* p) {
    if (p == nullptr) return true;
    std::string why;
    {
        std::lock_guard<std::mutex> lk(g_mem_mu);
        const Alloc* a = find_alloc(p, 1);
        // One past the end of an allocation (an "end" pointer) is fine too.
        if (a == nullptr) a = find_alloc(static_cast<const char*>(p) - 1, 1);
        if (a == nullptr)
            why = "is host memory that is not pinned (cudaHostAlloc) nor device memory";
        else if (a->device && a->dev != g_device && !a->peer_access)
            why = "is memory of cuda:" + std::to_string(a->dev) + ", launched on cuda:" + std::to_string(g_device) +
                  " (no peer access)";
    }
    if (why.empty()) return true;
    std::fprintf(stderr, "[cuda-emu] kernel %s: argument %d (%p) %s\n", name, index, p, why.c_str());
    g_sticky.store(cudaErrorIllegalAddress);
    return false;
}

void submit(cudaStream_t stream, const char* what, std::function<void()> op) {
    capture_or_run(stream, what, std::move(op));
}
bool device_range(const void* p, size_t bytes) { return is_device(p, bytes); }
void run_stream(cudaStream_t stream) {
    if (stream == nullptr)
        run_streams(true);
    else if (stream->capture == nullptr)
        run_until(stream);
}

void launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            std::function<void()> body) {
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64) {
        fail(cudaErrorInvalidConfiguration, "kernel %s: block (%u,%u,%u) is not 1-1024 threads", name, block.x, block.y,
             block.z);
        return;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        fail(cudaErrorInvalidConfiguration, "kernel %s: grid (%u,%u,%u) out of range", name, grid.x, grid.y, grid.z);
        return;
    }
    if (const int cc = compute_capability(); cc < kLowestCc) {
        fail(cudaErrorNoKernelImageForDevice, "kernel %s: no code for compute capability %d.%d (MOEMESH_CUDA_EMU_CC)",
             name, cc / 10, cc % 10);
        return;
    }
    const size_t max_smem = max_dynamic_shared(fn);
    if (smem > max_smem) {
        fail(cudaErrorInvalidValue,
             "kernel %s: %zu bytes of dynamic shared memory, more than its limit of %zu (cudaFuncSetAttribute)", name,
             smem, max_smem);
        return;
    }
    if (sticky() != cudaSuccess) return;
    std::string nm = name;
    capture_or_run(stream, "kernel " + nm, [nm, grid, block, smem, body = std::move(body)] {
        if (sticky() == cudaSuccess) execute(nm.c_str(), grid, block, smem, body);
    });
}

}  // namespace mm_emu

using mm_emu::fail;

// ---- the runtime API ----
const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInitializationError: return "cudaErrorInitializationError";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
        case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
        case cudaErrorNotSupported: return "cudaErrorNotSupported";
        case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
        case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
        case cudaErrorGraphExecUpdateFailure: return "cudaErrorGraphExecUpdateFailure";
        default: return "cudaErrorUnknown";
    }
}
const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected (CUDA emulator: MOEMESH_CUDA_EMU_DEVICES=0)";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidDeviceFunction: return "invalid device function";
        case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
        case cudaErrorLaunchFailure: return "unspecified launch failure (see the [cuda-emu] message above)";
        case cudaErrorIllegalAddress: return "an illegal memory access was encountered (see the [cuda-emu] message above)";
        case cudaErrorNotSupported: return "operation not supported (by the CUDA emulator)";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
        case cudaErrorGraphExecUpdateFailure: return "the graph update was not performed";
        default: return cudaGetErrorName(e);
    }
}
cudaError_t cudaGetLastError() {
    const cudaError_t s = mm_emu::sticky();
    if (s != cudaSuccess) return s;
    const cudaError_t e = mm_emu::g_last_error;
    mm_emu::g_last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() {
    const cudaError_t s = mm_emu::sticky();
    return s != cudaSuccess ? s : mm_emu::g_last_error;
}
cudaError_t cudaGetDeviceCount(int* n) {
    *n = mm_emu::device_count();
    if (*n == 0) return mm_emu::g_last_error = cudaErrorNoDevice;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    if (d < 0 || d >= mm_emu::device_count()) return fail(cudaErrorInvalidDevice, "cudaSetDevice(%d): no such device", d);
    mm_emu::g_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
    *d = mm_emu::g_device;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d < 0 || d >= mm_emu::device_count()) return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties(%d)", d);
    *p = cudaDeviceProp{};
    std::snprintf(p->name, sizeof p->name, "moemesh CUDA emulator (host)");
    p->totalGlobalMem = mm_emu::device_memory();
    p->sharedMemPerBlock = mm_emu::kDefaultSmem;
    p->sharedMemPerBlockOptin = mm_emu::kOptinSmem;
    p->sharedMemPerMultiprocessor = mm_emu::kSmemPerSm;
    p->multiProcessorCount = mm_emu::kSms;
    p->maxThreadsPerBlock = 1024;
    p->warpSize = 32;
    const int cc = mm_emu::compute_capability();
    p->major = cc / 10;
    p->minor = cc % 10;
    return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* fn) {
    if (fn == nullptr) return fail(cudaErrorInvalidDeviceFunction, "cudaFuncGetAttributes: a null function");
    const int cc = mm_emu::compute_capability();
    if (cc < mm_emu::kLowestCc)
        return fail(cudaErrorNoKernelImageForDevice, "cudaFuncGetAttributes: no code for compute capability %d.%d",
                    cc / 10, cc % 10);
    *a = cudaFuncAttributes{};
    a->maxThreadsPerBlock = 1024;
    a->ptxVersion = a->binaryVersion = mm_emu::kLowestCc;
    a->maxDynamicSharedSizeBytes = static_cast<int>(mm_emu::max_dynamic_shared(fn));
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
    if (d < 0 || d >= mm_emu::device_count()) return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute(%d)", d);
    switch (a) {
        case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
        case cudaDevAttrMultiProcessorCount: *v = mm_emu::kSms; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(mm_emu::kOptinSmem); break;
        case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = static_cast<int>(mm_emu::kSmemPerSm); break;
        default: return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute %d not emulated", a);
    }
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
    mm_emu::run_streams(false);
    return mm_emu::sticky();
}
cudaError_t cudaDeviceReset() {
    {
        std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
        for (auto it = mm_emu::g_allocs.begin(); it != mm_emu::g_allocs.end();) {
            if (it->second.device && !it->second.ipc_opened && it->second.dev == mm_emu::g_device) {
                mm_emu::g_used[it->second.dev] -= it->second.mapped;
                munmap(reinterpret_cast<void*>(it->second.map_base), it->second.mapped + mm_emu::kGuardBytes);
                if (it->second.fd >= 0) close(it->second.fd);
                it = mm_emu::g_allocs.erase(it);
            } else {
                ++it;
            }
        }
    }
    mm_emu::g_sticky.store(cudaSuccess);
    mm_emu::g_last_error = cudaSuccess;
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    *total_bytes = mm_emu::device_memory();
    *free_bytes = *total_bytes - mm_emu::g_used[mm_emu::g_device];
    return cudaSuccess;
}
namespace {
cudaError_t emu_alloc(void** p, size_t bytes, bool device) {
    *p = nullptr;
    // Device memory is mapped (whole pages), so that cudaIpcGetMemHandle can turn it into shared
    // memory in place; pinned host memory comes from the heap.
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t rounded = device ? (std::max<size_t>(bytes, 1) + page - 1) / page * page
                                  : (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
    const int dev = mm_emu::g_device;
    if (device) {
        std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
        if (mm_emu::g_used[dev] + rounded > mm_emu::device_memory())
            return fail(cudaErrorMemoryAllocation, "cudaMalloc(%zu): device %d has %zu of %zu bytes free", bytes, dev,
                        mm_emu::device_memory() - mm_emu::g_used[dev], mm_emu::device_memory());
        mm_emu::g_used[dev] += rounded;
    }
    void* q = nullptr;
    uintptr_t map_base = 0;
    if (device) {
        // Right-aligned on a guard page: a kernel or copy that runs past the end (by a 256-byte
        // granule or more) faults, and the SIGSEGV handler names the kernel.
        void* m = mmap(nullptr, rounded + mm_emu::kGuardBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m != MAP_FAILED) {
            map_base = reinterpret_cast<uintptr_t>(m);
            mprotect(reinterpret_cast<char*>(m) + rounded, mm_emu::kGuardBytes, PROT_NONE);
            q = reinterpret_cast<char*>(m) + rounded - (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
            mm_emu::install_fault_handler();
        }
    } else {
        q = std::aligned_alloc(256, rounded);
    }
    if (q == nullptr) {
        if (device) {
            std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
            mm_emu::g_used[dev] -= rounded;
        }
        return fail(cudaErrorMemoryAllocation, "%s(%zu): host allocation failed", device ? "cudaMalloc" : "cudaHostAlloc",
                    bytes);
    }
    // Fresh device memory reads as NaN (0xff bytes), so a missing initialisation shows.
    if (device) std::memset(q, 0xff, std::min<size_t>(bytes, size_t{256} << 20));
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    mm_emu::g_allocs[reinterpret_cast<uintptr_t>(q)] = {std::max<size_t>(bytes, 1), rounded, map_base, device, dev};
    *p = q;
    return cudaSuccess;
}
cudaError_t emu_free(void* p, bool device) {
    if (p == nullptr) return cudaSuccess;
    mm_emu::Alloc a;
    {
        std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
        auto it = mm_emu::g_allocs.find(reinterpret_cast<uintptr_t>(p));
        if (it == mm_emu::g_allocs.end() || it->second.device != device || it->second.ipc_opened)
            return fail(cudaErrorInvalidValue, "%s(%p): not a pointer from %s", device ? "cudaFree" : "cudaFreeHost", p,
                        device ? "cudaMalloc" : "cudaHostAlloc");
        a = it->second;
        if (device) mm_emu::g_used[a.dev] -= a.mapped;
        mm_emu::g_allocs.erase(it);
    }
    if (device) {
        munmap(reinterpret_cast<void*>(a.map_base), a.mapped + mm_emu::kGuardBytes);
        if (a.fd >= 0) close(a.fd);
    } else {
        std::free(p);
    }
    return cudaSuccess;
}
}  // namespace
cudaError_t cudaMalloc(void** p, size_t bytes) { return emu_alloc(p, bytes, true); }
cudaError_t cudaFree(void* p) {
    mm_emu::run_streams(false);  // cudaFree synchronizes the device
    return emu_free(p, true);
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned /*flags*/) { return emu_alloc(p, bytes, false); }
cudaError_t cudaMallocHost(void** p, size_t bytes) { return emu_alloc(p, bytes, false); }
cudaError_t cudaFreeHost(void* p) {
    mm_emu::run_streams(false);
    return emu_free(p, false);
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
    *a = cudaPointerAttributes{};
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    uintptr_t base = 0;
    if (const mm_emu::Alloc* al = mm_emu::find_alloc(p, 1, &base)) {
        a->type = al->device ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
        a->device = al->dev;
        a->devicePointer = al->device ? const_cast<void*>(p) : nullptr;
        a->hostPointer = al->device ? nullptr : const_cast<void*>(p);
    }
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);  // the legacy stream: runs now
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
    if (const cudaError_t e =
            mm_emu::check_copy(dst, bytes, src, bytes, kind, s ? "cudaMemcpyAsync" : "cudaMemcpy"))
        return e;
    return mm_emu::submit_copy(s, dst, src, bytes == 0, [dst, src, bytes] {
        if (bytes) std::memmove(dst, src, bytes);
    });
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s) {
    if (width > dpitch || width > spitch)
        return fail(cudaErrorInvalidValue, "cudaMemcpy2DAsync: width %zu exceeds a pitch (%zu, %zu)", width, dpitch,
                    spitch);
    const bool empty = height == 0 || width == 0;
    const size_t dspan = empty ? 0 : (height - 1) * dpitch + width, sspan = empty ? 0 : (height - 1) * spitch + width;
    if (const cudaError_t e = mm_emu::check_copy(dst, dspan, src, sspan, kind, "cudaMemcpy2DAsync")) return e;
    return mm_emu::submit_copy(s, dst, src, empty, [=] {
        for (size_t r = 0; r < height; ++r)
            std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
    });
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
    if (bytes > 0 && !mm_emu::is_device(p, bytes))
        return fail(cudaErrorInvalidValue, "cudaMemset: %p + %zu bytes is not inside one device allocation", p, bytes);
    if (mm_emu::sticky() != cudaSuccess) return mm_emu::sticky();
    mm_emu::capture_or_run(s, "memset", [=] { std::memset(p, value, bytes); });
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    *s = new mm_emu::Stream;
    (*s)->blocking = !(flags & cudaStreamNonBlocking);
    std::lock_guard<std::mutex> lk(mm_emu::g_streams_mu);
    mm_emu::g_streams.push_back(*s);
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (s == nullptr) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy(nullptr)");
    mm_emu::run_until(s);  // its work still completes
    {
        std::lock_guard<std::mutex> lk(mm_emu::g_streams_mu);
        mm_emu::g_streams.erase(std::remove(mm_emu::g_streams.begin(), mm_emu::g_streams.end(), s),
                                mm_emu::g_streams.end());
    }
    delete s->capture;
    delete s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s != nullptr && s->capture != nullptr) {
        s->invalidated = true;
        return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize on a stream that is being captured");
    }
    if (s == nullptr)
        mm_emu::run_streams(true);
    else
        mm_emu::run_until(s);
    return mm_emu::sticky();
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (s != nullptr && s->capture != nullptr) {
        s->invalidated = true;
        return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamQuery on a stream that is being captured");
    }
    // Pending work: report it once (callers that poll must handle cudaErrorNotReady), and run it.
    if (s != nullptr) {
        bool pending = false;
        {
            std::lock_guard<std::mutex> lk(s->q_mu);
            pending = !s->queue.empty();
        }
        mm_emu::run_until(s);
        if (pending) return cudaErrorNotReady;
    }
    return mm_emu::sticky();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned /*flags*/) {
    if (e == nullptr) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent(nullptr event)");
    mm_emu::Stream* from = e->stream;
    const uint64_t upto = e->seq;
    if (from != nullptr && from != s) mm_emu::capture_or_run(s, "wait", [from, upto] { mm_emu::run_until(from, upto); });
    return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode /*mode*/) {
    if (s == nullptr) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture on the legacy stream");
    if (s->capture != nullptr) return fail(cudaErrorInvalidValue, "cudaStreamBeginCapture: already capturing");
    s->capture = new mm_emu::Graph;
    s->invalidated = false;
    return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
    *status = s == nullptr || s->capture == nullptr ? cudaStreamCaptureStatusNone
              : s->invalidated                      ? cudaStreamCaptureStatusInvalidated
                                                    : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    *g = nullptr;
    if (s == nullptr || s->capture == nullptr) return fail(cudaErrorInvalidValue, "cudaStreamEndCapture: not capturing");
    mm_emu::Graph* graph = s->capture;
    s->capture = nullptr;
    if (s->invalidated) {
        delete graph;
        return mm_emu::g_last_error = cudaErrorStreamCaptureInvalidated;
    }
    *g = graph;
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
    *e = new mm_emu::Event;
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    *e = new mm_emu::Event;
    (*e)->timing = !(flags & cudaEventDisableTiming);
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (e == nullptr) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord(nullptr)");
    e->recorded = false;
    const uint64_t seq = mm_emu::capture_or_run(s, "event", [e] {
        e->t = std::chrono::steady_clock::now();
        e->recorded = true;
    });
    e->stream = seq ? s : nullptr;
    e->seq = seq;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (e != nullptr && e->stream != nullptr) mm_emu::run_until(e->stream, e->seq);
    return mm_emu::sticky();
}
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!start || !end || !start->recorded || !end->recorded || !start->timing || !end->timing)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was not recorded with timing");
    *ms = std::chrono::duration<float, std::milli>(end->t - start->t).count();
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long /*flags*/) {
    if (g == nullptr) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate(nullptr graph)");
    *exec = new mm_emu::GraphExec{g->nodes};
    return cudaSuccess;
}
cudaError_t cudaGraphExecUpdate(cudaGraphExec_t exec, cudaGraph_t g, cudaGraphExecUpdateResultInfo* info) {
    if (info) *info = cudaGraphExecUpdateResultInfo{};
    bool same = exec != nullptr && g != nullptr && exec->nodes.size() == g->nodes.size();
    for (size_t i = 0; same && i < g->nodes.size(); ++i) same = exec->nodes[i].what == g->nodes[i].what;
    if (!same) {
        if (info) info->result = cudaGraphExecUpdateError;
        return mm_emu::g_last_error = cudaErrorGraphExecUpdateFailure;
    }
    exec->nodes = g->nodes;
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    if (exec == nullptr) return fail(cudaErrorInvalidValue, "cudaGraphLaunch(nullptr)");
    if (mm_emu::sticky() != cudaSuccess) return mm_emu::sticky();
    for (const auto& n : exec->nodes) mm_emu::capture_or_run(s, n.what, n.run);
    return mm_emu::sticky();
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}
// CUDA IPC between processes of this machine: the exported allocation becomes a memfd mapped at the
// same address (its contents kept); the handle names the exporting process and descriptor, and the
// opener maps /proc/<pid>/fd/<fd>. Both sides then see the same memory, as two processes see one
// GPU allocation.
namespace {
struct IpcHandle {
    char magic[8];  // "mmemuipc"
    int32_t pid;
    int32_t fd;
    uint64_t bytes;   // mapped
    uint64_t offset;  // of the allocation in the mapping
    uint64_t size;    // the size the exporter asked for
    int32_t dev;      // the exporter's device (one numbering: the emulated devices are the machine's)
};
static_assert(sizeof(IpcHandle) <= sizeof(cudaIpcMemHandle_t));
}  // namespace
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* h, void* p) {
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    uintptr_t base = 0;
    mm_emu::Alloc* a = const_cast<mm_emu::Alloc*>(mm_emu::find_alloc(p, 1, &base));
    if (a == nullptr || !a->device || a->ipc_opened)
        return fail(cudaErrorInvalidValue, "cudaIpcGetMemHandle(%p): not memory from this process's cudaMalloc", p);
    if (a->fd < 0) {
        void* const mb = reinterpret_cast<void*>(a->map_base);
        const int fd = memfd_create("moemesh-cuda-emu-ipc", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, static_cast<off_t>(a->mapped)) != 0 ||
            pwrite(fd, mb, a->mapped, 0) != static_cast<ssize_t>(a->mapped)) {
            if (fd >= 0) close(fd);
            return fail(cudaErrorUnknown, "cudaIpcGetMemHandle: cannot create shared memory (%s)", std::strerror(errno));
        }
        if (mmap(mb, a->mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
            close(fd);
            return fail(cudaErrorUnknown, "cudaIpcGetMemHandle: cannot remap as shared (%s)", std::strerror(errno));
        }
        a->fd = fd;
    }
    IpcHandle ih{};
    std::memcpy(ih.magic, "mmemuipc", 8);
    ih.pid = static_cast<int32_t>(getpid());
    ih.fd = a->fd;
    ih.bytes = a->mapped;
    ih.offset = base - a->map_base;
    ih.size = a->bytes;
    ih.dev = a->dev;
    std::memset(h, 0, sizeof *h);
    std::memcpy(h, &ih, sizeof ih);
    return cudaSuccess;
}
cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t h, unsigned flags) {
    *p = nullptr;
    IpcHandle ih;
    std::memcpy(&ih, &h, sizeof ih);
    if (std::memcmp(ih.magic, "mmemuipc", 8) != 0)
        return fail(cudaErrorInvalidValue, "cudaIpcOpenMemHandle: not an IPC handle of the CUDA emulator");
    if (ih.bytes == 0 || ih.size == 0 || ih.offset > ih.bytes || ih.size > ih.bytes - ih.offset || ih.dev < 0 ||
        ih.dev >= mm_emu::device_count())
        return fail(cudaErrorInvalidValue, "cudaIpcOpenMemHandle: a corrupt handle");
    if (ih.pid == getpid())
        return fail(cudaErrorInvalidValue, "cudaIpcOpenMemHandle: the handle is this process's own allocation");
    const std::string path = "/proc/" + std::to_string(ih.pid) + "/fd/" + std::to_string(ih.fd);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail(cudaErrorInvalidValue, "cudaIpcOpenMemHandle: %s: %s", path.c_str(), std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != ih.bytes) {
        close(fd);
        return fail(cudaErrorInvalidValue, "cudaIpcOpenMemHandle: %s is not the exported allocation", path.c_str());
    }
    // The same layout as the exporter's: the mapping, then a guard page.
    void* m = mmap(nullptr, ih.bytes + mm_emu::kGuardBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED || mmap(m, ih.bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        close(fd);
        if (m != MAP_FAILED) munmap(m, ih.bytes + mm_emu::kGuardBytes);
        return fail(cudaErrorMemoryAllocation, "cudaIpcOpenMemHandle: mmap: %s", std::strerror(errno));
    }
    close(fd);
    void* q = static_cast<char*>(m) + ih.offset;
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    // Where the memory is (as cudaPointerGetAttributes reports it on a GPU): the exporter's device.
    mm_emu::Alloc a{ih.size, ih.bytes, reinterpret_cast<uintptr_t>(m), true, ih.dev};
    a.ipc_opened = true;
    a.peer_access = (flags & cudaIpcMemLazyEnablePeerAccess) != 0;
    mm_emu::g_allocs[reinterpret_cast<uintptr_t>(q)] = a;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaIpcCloseMemHandle(void* p) {
    std::lock_guard<std::mutex> lk(mm_emu::g_mem_mu);
    auto it = mm_emu::g_allocs.find(reinterpret_cast<uintptr_t>(p));
    if (it == mm_emu::g_allocs.end() || !it->second.ipc_opened)
        return fail(cudaErrorInvalidValue, "cudaIpcCloseMemHandle(%p): not opened by cudaIpcOpenMemHandle", p);
    munmap(reinterpret_cast<void*>(it->second.map_base), it->second.mapped + mm_emu::kGuardBytes);
    mm_emu::g_allocs.erase(it);
    return cudaSuccess;
}
cudaError_t mm_emu_occupancy(int* blocks, int block_size, size_t smem) {
    if (block_size <= 0 || block_size > 1024) return fail(cudaErrorInvalidValue, "occupancy: block size %d", block_size);
    int b = std::min(32, 2048 / block_size);
    if (smem > 0) b = std::min<int>(b, static_cast<int>(mm_emu::kSmemPerSm / (smem + 1024)));
    *blocks = std::max(b, 0);
    return cudaSuccess;
}
