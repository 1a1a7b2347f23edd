#include "worker/cuda_expert_compute.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>

#include "common/placement.h"

#ifdef MOEMESH_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_ops.h"
#include "worker/cuda_tier_memory.h"
#endif

namespace moemesh {

// ---- plain C++ -------------------------------------------------------------------------------------

StatusOr<ExpertCallPlan> plan_expert_call(int layer, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                                          const float* weights, int64_t n_pairs, int64_t n_expert) {
    if (n_rows < 0 || n_pairs < 0)
        return MM_ERROR("layer %d: negative sizes (%lld rows, %lld pairs)", layer, static_cast<long long>(n_rows),
                        static_cast<long long>(n_pairs));
    std::vector<int64_t> per_expert(static_cast<size_t>(n_expert), 0), per_row(static_cast<size_t>(n_rows), 0);
    for (int64_t p = 0; p < n_pairs; ++p) {
        if (rows[p] < 0 || rows[p] >= n_rows)
            return MM_ERROR("layer %d: pair %lld names row %d of %lld", layer, static_cast<long long>(p), rows[p],
                            static_cast<long long>(n_rows));
        if (experts[p] < 0 || experts[p] >= n_expert)
            return MM_ERROR("layer %d: expert id %d out of range [0, %lld)", layer, experts[p],
                            static_cast<long long>(n_expert));
        per_expert[experts[p]]++;
        per_row[rows[p]]++;
    }
    ExpertCallPlan pl;
    std::vector<int64_t> next(static_cast<size_t>(n_expert), 0);
    int64_t at = 0;
    for (int64_t e = 0; e < n_expert; ++e) {
        if (!per_expert[e]) continue;
        pl.groups.push_back({static_cast<int>(e), at, per_expert[e]});
        next[e] = at;
        at += per_expert[e];
    }
    pl.slots_per_row = n_rows ? *std::max_element(per_row.begin(), per_row.end()) : 0;
    const int64_t K = pl.slots_per_row;
    pl.gather.resize(static_cast<size_t>(n_pairs));
    pl.slot.assign(static_cast<size_t>(n_rows * K), static_cast<int32_t>(n_pairs));
    pl.weight.assign(static_cast<size_t>(n_rows * K), 0.0f);
    std::vector<int64_t> filled(static_cast<size_t>(n_rows), 0);
    for (int64_t p = 0; p < n_pairs; ++p) {
        const int64_t s = next[experts[p]]++;
        pl.gather[s] = rows[p];
        const int64_t j = filled[rows[p]]++;
        pl.slot[rows[p] * K + j] = static_cast<int32_t>(s);
        pl.weight[rows[p] * K + j] = weights[p];
    }
    return pl;
}

int64_t expert_pin_window(uint64_t budget, uint64_t max_charge, uint64_t hot_entries, uint64_t reserve,
                          int64_t wanted) {
    if (wanted <= 1) return 1;
    if (budget == 0 || max_charge == 0) return wanted;
    const uint64_t cap = budget / max_charge;
    const uint64_t taken = hot_entries + reserve;
    const int64_t room = cap > taken ? static_cast<int64_t>(cap - taken) : 1;
    return std::clamp<int64_t>(room, 1, wanted);
}

StatusOr<int> parse_compute_device(const std::string& text, const char* flag) {
    StatusOr<Device> d = parse_device(text);
    if (!d.ok()) return MM_ERROR("%s: %s", flag, d.status().message().c_str());
    return d.value().kind == Device::Kind::kCpu ? -1 : d.value().index;
}

Status CudaExpertBackend::moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                                      const float* weights, float* out) {
    rows_.resize(static_cast<size_t>(n_rows * k));
    for (int64_t p = 0; p < n_rows * k; ++p) rows_[p] = static_cast<int32_t>(p / k);
    return compute_->compute(layer, x, n_rows, rows_.data(), ids, weights, n_rows * k, out);
}

Status CudaExpertBackend::moe_forward_device(int layer, const float* d_x, int64_t n_rows, int64_t k,
                                             const int32_t* ids, const float* weights, float* d_out, void* stream) {
    rows_.resize(static_cast<size_t>(n_rows * k));
    for (int64_t p = 0; p < n_rows * k; ++p) rows_[p] = static_cast<int32_t>(p / k);
    return compute_->compute_device(layer, d_x, n_rows, rows_.data(), ids, weights, n_rows * k, d_out, stream);
}

#ifndef MOEMESH_HAVE_CUDA

// ---- builds without CUDA: every entry point says so ----------------------------------------------

Status check_cuda_device(int index) {
    return MM_ERROR("cuda:%d: this build has no CUDA (rebuild with -DMOEMESH_CUDA=ON and an nvcc), so it can only "
                    "use --device cpu",
                    index);
}

struct CudaExpertCompute::Impl {};
CudaExpertCompute::CudaExpertCompute(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaExpertCompute::~CudaExpertCompute() = default;
StatusOr<std::unique_ptr<CudaExpertCompute>> CudaExpertCompute::create(const GgufFile&, const ModelConfig&,
                                                                       const std::vector<std::vector<int>>&,
                                                                       int device, const CacheOptions*) {
    return check_cuda_device(device);
}
int CudaExpertCompute::device() const { return -1; }
uint64_t CudaExpertCompute::shard_bytes() const { return 0; }
uint64_t CudaExpertCompute::device_budget() const { return 0; }
ExpertCache* CudaExpertCompute::cache() { return nullptr; }
std::string CudaExpertCompute::stats_line() const { return ""; }
uint64_t CudaExpertCompute::vram_bytes() const { return 0; }
bool CudaExpertCompute::holds(int, int) const { return false; }
Status CudaExpertCompute::compute(int, const float*, int64_t, const int32_t*, const int32_t*, const float*, int64_t,
                                  float*) {
    return check_cuda_device(0);
}
Status CudaExpertCompute::compute_device(int, const float*, int64_t, const int32_t*, const int32_t*, const float*,
                                         int64_t, float*, void*) {
    return check_cuda_device(0);
}

#else  // MOEMESH_HAVE_CUDA

namespace {

std::string cuda_err(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

// A failed runtime call as a Status naming the device and what was being done.
#define MM_CUDA_RETURN(dev, expr, what)                                                                   \
    do {                                                                                                  \
        const cudaError_t mm_e_ = (expr);                                                                 \
        if (mm_e_ != cudaSuccess) {                                                                       \
            (void)cudaGetLastError();                                                                     \
            return MM_ERROR("cuda:%d: %s: %s", (dev), std::string(what).c_str(), cuda_err(mm_e_).c_str()); \
        }                                                                                                 \
    } while (0)

// Device memory that grows (contents are not kept).
struct DevBuf {
    void* p = nullptr;
    size_t bytes = 0;
    ~DevBuf() {
        if (p) (void)cudaFree(p);
    }
    Status reserve(int dev, size_t n, const char* what) {
        if (n <= bytes) return Status();
        if (p) (void)cudaFree(p);
        p = nullptr;
        bytes = 0;
        MM_CUDA_RETURN(dev, cudaMalloc(&p, std::max<size_t>(n, 256)),
                       str_printf("allocating %s of VRAM for %s", format_bytes(n).c_str(), what));
        bytes = std::max<size_t>(n, 256);
        return Status();
    }
    template <typename T>
    T* as() const {
        return static_cast<T*>(p);
    }
};

// Calls of up to this many (row, expert) pairs use the pointer-table GEMVs (Impl::run).
constexpr int64_t kPtrMaxPairs = 64;

struct PinnedBuf {
    void* p = nullptr;
    size_t bytes = 0;
    ~PinnedBuf() {
        if (p) (void)cudaFreeHost(p);
    }
    Status reserve(int dev, size_t n) {
        if (n <= bytes) return Status();
        if (p) (void)cudaFreeHost(p);
        p = nullptr;
        bytes = 0;
        MM_CUDA_RETURN(dev, cudaHostAlloc(&p, std::max<size_t>(n, 256), cudaHostAllocDefault),
                       str_printf("allocating %s of pinned staging memory", format_bytes(n).c_str()));
        bytes = std::max<size_t>(n, 256);
        return Status();
    }
};

}  // namespace

Status check_cuda_device(int index) {
    const char* why = "";
    const int n = cuda::device_count(&why);
    if (n == 0) return MM_ERROR("cuda:%d: no CUDA device: %s", index, why);
    if (index < 0 || index >= n)
        return MM_ERROR("cuda:%d: only %d CUDA device(s) present (cuda:0..cuda:%d)", index, n, n - 1);
    if (const std::string why = cuda::kernels_unavailable(index); !why.empty()) return MM_ERROR("%s", why.c_str());
    return Status();
}

struct CudaExpertCompute::Impl {
    int device = 0;
    int64_t H = 0, I = 0, E = 0;
    std::vector<ExpertLayout> layouts;
    std::vector<ExpertTypes> types;
    std::vector<std::vector<uint8_t>> held;  // [layer][expert]
    uint64_t shard_bytes = 0;
    uint64_t device_budget = 0;  // the VRAM tier's bytes (cache mode)
    std::shared_ptr<ExpertSource> src;       // the table over `resident`, or `cache`
    std::shared_ptr<ExpertCache> cache;
    VramTierMemory* vram = nullptr;          // the cache's device tier memory (owned by the cache)
    uint8_t* resident = nullptr;             // resident mode: every held expert, one allocation
    uint64_t resident_bytes = 0;
    // Entries of the static hot set in the device tier (pinned for good), counted once after
    // warm_up (the tier's `preloaded` survives reset_counters now, but the window must not depend
    // on a statistic).
    uint64_t hot_entries = 0;
    cudaStream_t own = nullptr;

    std::mutex mu;  // one call at a time (scratch buffers)
    DevBuf d_x, d_out, xs, g, u, y, tab, ptrs;
    PinnedBuf h_tab, h_x, h_ptrs;

    ~Impl() {
        (void)cudaSetDevice(device);
        if (own) (void)cudaStreamSynchronize(own);
        src.reset();
        cache.reset();  // frees the tiers' arenas
        if (resident) (void)cudaFree(resident);
        if (own) (void)cudaStreamDestroy(own);
    }

    Status load_resident(FileExpertReader& file);
    // A failed run may have left copies from h_tab / h_x and kernels on the scratch buffers in flight
    // on s; the next call (maybe on another stream) reuses them, so wait for them before returning.
    Status settle(Status st, cudaStream_t s) {
        if (!st.ok()) {
            (void)cudaStreamSynchronize(s);
            (void)cudaGetLastError();
        }
        return st;
    }
    Status run(int layer, const float* d_x_in, const float* h_x_in, int64_t n_rows, const int32_t* rows,
               const int32_t* experts, const float* weights, int64_t n_pairs, float* d_out_in, cudaStream_t s);
};

// Every held expert read from the file into pinned staging (two buffers, alternating) and copied to
// one VRAM allocation laid out as the cache's entries are.
Status CudaExpertCompute::Impl::load_resident(FileExpertReader& file) {
    const int L = static_cast<int>(layouts.size());
    uint64_t need = 0, max_size = 0;
    for (int l = 0; l < L; ++l) {
        const uint64_t n = static_cast<uint64_t>(std::count(held[l].begin(), held[l].end(), 1));
        need += n * layouts[l].size;
        if (n) max_size = std::max(max_size, layouts[l].size);
    }
    size_t fr = 0, total = 0;
    MM_CUDA_RETURN(device, cudaMemGetInfo(&fr, &total), "querying free VRAM");
    if (need > fr)
        return MM_ERROR("cuda:%d: the shard's experts need %s of VRAM, the device has %s free (of %s); give the worker "
                        "a cache budget (cache: {device: ...} in the YAML, or --device-budget) to stream them instead",
                        device, format_bytes(need).c_str(), format_bytes(fr).c_str(), format_bytes(total).c_str());
    void* p = nullptr;
    MM_CUDA_RETURN(device, cudaMalloc(&p, std::max<uint64_t>(need, 256)),
                   str_printf("allocating %s of VRAM for the shard (%s free)", format_bytes(need).c_str(),
                              format_bytes(fr).c_str()));
    resident = static_cast<uint8_t*>(p);
    resident_bytes = need;
    PinnedBuf stage[2];
    cudaEvent_t done[2] = {nullptr, nullptr};
    for (int i = 0; i < 2; ++i) {
        MM_RETURN_IF_ERROR(stage[i].reserve(device, max_size));
        MM_CUDA_RETURN(device, cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming), "creating an event");
    }
    std::vector<LayerExpertTable> tables(static_cast<size_t>(L));
    uint64_t off = 0;
    int k = 0;
    Status st;
    for (int l = 0; l < L && st.ok(); ++l) {
        const ExpertLayout& lay = layouts[l];
        tables[l].gate_type = types[l].gate, tables[l].up_type = types[l].up, tables[l].down_type = types[l].down;
        tables[l].experts.assign(static_cast<size_t>(E), ExpertSlice{});
        for (int e = 0; e < E && st.ok(); ++e) {
            if (!held[l][e]) continue;
            const int b = k++ & 1;
            cudaError_t ce = cudaEventSynchronize(done[b]);  // the copy that last used this buffer
            if (ce != cudaSuccess) {
                st = MM_ERROR("cuda:%d: copying the shard to VRAM: %s", device, cuda_err(ce).c_str());
                break;
            }
            st = file.read_expert(l, e, static_cast<uint8_t*>(stage[b].p));
            if (!st.ok()) break;
            uint8_t* dst = resident + off;
            ce = cudaMemcpyAsync(dst, stage[b].p, lay.size, cudaMemcpyHostToDevice, own);
            if (ce == cudaSuccess) ce = cudaEventRecord(done[b], own);
            if (ce != cudaSuccess) {
                st = MM_ERROR("cuda:%d: copying layer %d expert %d to VRAM: %s", device, l, e, cuda_err(ce).c_str());
                break;
            }
            tables[l].experts[e] = ExpertSlice{dst, dst + lay.up_off, dst + lay.down_off};
            off += lay.size;
        }
    }
    const cudaError_t ce = cudaStreamSynchronize(own);
    for (auto& ev : done) (void)cudaEventDestroy(ev);
    if (!st.ok() || ce != cudaSuccess) (void)cudaGetLastError();  // not left for a later launch check
    MM_RETURN_IF_ERROR(st);
    MM_CUDA_RETURN(device, ce, "copying the shard to VRAM");
    src = std::make_shared<TableExpertSource>(std::move(tables));
    return Status();
}

CudaExpertCompute::CudaExpertCompute(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaExpertCompute::~CudaExpertCompute() = default;

StatusOr<std::unique_ptr<CudaExpertCompute>> CudaExpertCompute::create(const GgufFile& f, const ModelConfig& c,
                                                                       const std::vector<std::vector<int>>& shard,
                                                                       int device, const CacheOptions* cache) {
    MM_RETURN_IF_ERROR(check_cuda_device(device));
    MM_CUDA_RETURN(device, cudaSetDevice(device), "selecting the device");
    MM_CUDA_RETURN(device, cuda::use_env_kernel_switches(), "setting the kernel switches");
    // Our kernels now, not in the first request (not fatal: else they load at their first launch).
    if (const cuda::KernelLoad kl = cuda::load_own_kernels(); !kl.error.empty()) {
        static std::atomic<bool> told{false};
        if (!told.exchange(true))
            std::fprintf(stderr, "cuda:%d: kernels load at first use (%s)\n", device, kl.error.c_str());
    }
    auto im = std::make_unique<Impl>();
    im->device = device;
    im->H = c.n_embd, im->I = c.n_ff_exp, im->E = c.n_expert;
    MM_ASSIGN_OR_RETURN(std::unique_ptr<FileExpertReader> file, FileExpertReader::open(f, c));
    im->layouts = file->layouts();
    im->types = file->types();
    const int L = static_cast<int>(im->layouts.size());
    if (static_cast<int>(shard.size()) > L)
        return MM_ERROR("%s: the shard names layer %zu, the model has %d layers", f.path().c_str(), shard.size() - 1, L);
    im->held.assign(static_cast<size_t>(L), std::vector<uint8_t>(static_cast<size_t>(im->E), shard.empty() ? 1 : 0));
    for (size_t l = 0; l < shard.size(); ++l)
        for (int e : shard[l]) {
            if (e < 0 || e >= im->E)
                return MM_ERROR("%s: the shard names expert %d of layer %zu, the model has %lld experts",
                                f.path().c_str(), e, l, static_cast<long long>(im->E));
            im->held[l][e] = 1;
        }
    uint64_t auto_budget = 0;
    for (int l = 0; l < L; ++l) {
        const uint64_t n = static_cast<uint64_t>(std::count(im->held[l].begin(), im->held[l].end(), 1));
        if (!n) continue;
        im->shard_bytes += n * im->layouts[l].data_bytes();
        auto_budget += n * (ArenaAllocator::round(im->layouts[l].size) + kCacheEntryOverhead);
        for (GgmlType t : {im->types[l].gate, im->types[l].up, im->types[l].down})
            if (!cuda::matmul_supported(t))
                return MM_ERROR("%s: the experts of layer %d have type %s, which the CUDA kernels cannot multiply "
                                "(they have F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, IQ4_NL, IQ4_XS, MXFP4 "
                                "and the IQ1/IQ2/IQ3 types); serve them from a cpu worker",
                                f.path().c_str(), l, ggml_type_name(t));
    }
    MM_CUDA_RETURN(device, cudaStreamCreateWithFlags(&im->own, cudaStreamNonBlocking), "creating a stream");
    if (!cache) {
        MM_RETURN_IF_ERROR(im->load_resident(*file));
        return std::unique_ptr<CudaExpertCompute>(new CudaExpertCompute(std::move(im)));
    }
    CacheOptions o = *cache;
    if (!o.device_bytes) {
        // No device budget: the shard's worth, within 90% of the free VRAM, or within what is free
        // beyond device_keep_free.
        size_t fr = 0, total = 0;
        MM_CUDA_RETURN(device, cudaMemGetInfo(&fr, &total), "querying free VRAM");
        const uint64_t keep = o.device_keep_free;
        const uint64_t room = keep ? (fr > keep ? fr - keep : 0) : fr / 10 * 9;
        if (room == 0)
            return MM_ERROR("cuda:%d: no room for an expert cache: %s free, and %s is to stay free for the KV "
                            "cache and scratch (a smaller --ctx or --parallel needs less); give --device-budget a "
                            "size, or run with --device cpu",
                            device, format_bytes(fr).c_str(), format_bytes(o.device_keep_free).c_str());
        o.device_bytes = std::min<uint64_t>(auto_budget, room);
    }
    im->device_budget = o.device_bytes;
    MM_ASSIGN_OR_RETURN(std::unique_ptr<VramTierMemory> vram, VramTierMemory::create(device, o.device_bytes));
    im->vram = vram.get();
    auto vram_box = std::make_shared<std::unique_ptr<TierMemory>>(std::move(vram));
    o.compute_memory = [vram_box]() { return std::move(*vram_box); };
    if (o.host_bytes) {
        MM_ASSIGN_OR_RETURN(std::unique_ptr<PinnedHostTierMemory> host, PinnedHostTierMemory::create(device, o.host_bytes));
        auto host_box = std::make_shared<std::unique_ptr<TierMemory>>(std::move(host));
        o.host_memory = [host_box]() { return std::move(*host_box); };
    }
    MM_ASSIGN_OR_RETURN(im->cache, ExpertCache::create(f, c, shard, o));
    if (*vram_box)
        return MM_ERROR("cuda:%d: internal: the cache did not take its VRAM tier", device);
    MM_RETURN_IF_ERROR(im->cache->warm_up());
    im->hot_entries = im->cache->device().stats().preloaded;
    if (o.prefetch == PrefetchMode::kNextLayer) {
        // The next layer's prefetch leaves a one-row decode call's pin window reclaimable.
        CacheTier& t = im->cache->device();
        t.set_prefetch_reserve(static_cast<uint64_t>(
            expert_pin_window(t.budget(), t.max_entry_charge(), im->hot_entries, 1, std::max<int64_t>(c.n_expert_used, 1))));
    }
    im->src = im->cache;
    return std::unique_ptr<CudaExpertCompute>(new CudaExpertCompute(std::move(im)));
}

int CudaExpertCompute::device() const { return impl_->device; }
uint64_t CudaExpertCompute::shard_bytes() const { return impl_->shard_bytes; }
uint64_t CudaExpertCompute::device_budget() const { return impl_->device_budget; }
ExpertCache* CudaExpertCompute::cache() { return impl_->cache.get(); }
uint64_t CudaExpertCompute::vram_bytes() const {
    return impl_->cache ? impl_->vram->stats().arena_bytes : impl_->resident_bytes;
}
bool CudaExpertCompute::holds(int layer, int expert) const {
    const Impl& im = *impl_;
    return layer >= 0 && layer < static_cast<int>(im.held.size()) && expert >= 0 && expert < im.E &&
           im.held[layer][expert];
}

std::string CudaExpertCompute::stats_line() const {
    const Impl& im = *impl_;
    if (!im.cache)
        return str_printf("resident %s of experts in VRAM (cuda:%d)", format_bytes(im.resident_bytes).c_str(), im.device);
    const TierMemoryStats v = im.vram->stats();
    return im.cache->stats_line() +
           str_printf(" | vram cuda:%d: arena %s, %s in use, %llu fills from pinned host, %llu staged from the file, "
                      "%llu outside the arena",
                      im.device, format_bytes(v.arena_bytes).c_str(), format_bytes(v.arena_used).c_str(),
                      static_cast<unsigned long long>(v.direct_fills), static_cast<unsigned long long>(v.staged_fills),
                      static_cast<unsigned long long>(v.overflow));
}

Status CudaExpertCompute::compute(int layer, const float* x, int64_t n_rows, const int32_t* rows,
                                  const int32_t* experts, const float* weights, int64_t n_pairs, float* out) {
    Impl& im = *impl_;
    std::lock_guard<std::mutex> lk(im.mu);
    MM_CUDA_RETURN(im.device, cudaSetDevice(im.device), "selecting the device");
    const size_t bytes = sizeof(float) * static_cast<size_t>(std::max<int64_t>(n_rows, 0) * im.H);
    MM_RETURN_IF_ERROR(im.d_x.reserve(im.device, bytes, "expert inputs"));
    MM_RETURN_IF_ERROR(im.d_out.reserve(im.device, bytes, "expert outputs"));
    if (bytes) MM_CUDA_RETURN(im.device, cudaMemcpyAsync(im.d_x.p, x, bytes, cudaMemcpyHostToDevice, im.own), "copying x");
    MM_RETURN_IF_ERROR(im.settle(im.run(layer, im.d_x.as<float>(), x, n_rows, rows, experts, weights, n_pairs,
                                        im.d_out.as<float>(), im.own),
                                 im.own));
    if (bytes) {
        MM_CUDA_RETURN(im.device, cudaMemcpyAsync(out, im.d_out.p, bytes, cudaMemcpyDeviceToHost, im.own), "copying out");
        MM_CUDA_RETURN(im.device, cudaStreamSynchronize(im.own), "copying out");
    }
    return Status();
}

Status CudaExpertCompute::compute_device(int layer, const float* d_x, int64_t n_rows, const int32_t* rows,
                                         const int32_t* experts, const float* weights, int64_t n_pairs, float* d_out,
                                         void* stream) {
    Impl& im = *impl_;
    std::lock_guard<std::mutex> lk(im.mu);
    MM_CUDA_RETURN(im.device, cudaSetDevice(im.device), "selecting the device");
    const cudaStream_t s = stream ? static_cast<cudaStream_t>(stream) : im.own;
    return im.settle(im.run(layer, d_x, nullptr, n_rows, rows, experts, weights, n_pairs, d_out, s), s);
}

// The steps of the header's comment. h_x: x in host memory too (compute()), for the prefetcher.
Status CudaExpertCompute::Impl::run(int layer, const float* dx, const float* hx, int64_t n_rows, const int32_t* rows,
                                    const int32_t* experts, const float* weights, int64_t n_pairs, float* dout,
                                    cudaStream_t s) {
    const int dev = device;
    if (layer < 0 || layer >= static_cast<int>(held.size()))
        return MM_ERROR("expert call for layer %d, model has %zu layers", layer, held.size());
    // plan
    MM_ASSIGN_OR_RETURN(ExpertCallPlan pl, plan_expert_call(layer, n_rows, rows, experts, weights, n_pairs, E));
    for (const auto& gr : pl.groups)
        if (!held[layer][gr.expert]) return MM_ERROR("layer %d: expert %d is not held by this process", layer, gr.expert);
    if (n_rows == 0) return Status();
    if (n_pairs == 0) {
        MM_CUDA_RETURN(dev, cudaMemsetAsync(dout, 0, sizeof(float) * n_rows * H, s), "clearing out");
        MM_CUDA_RETURN(dev, cudaStreamSynchronize(s), "clearing out");
        return Status();
    }
    // upload: tab = [gather n_pairs | slot n_rows·K' | weight n_rows·K'] (4-byte words)
    const int64_t K = pl.slots_per_row, nt = n_rows * K;
    const size_t tab_bytes = 4 * static_cast<size_t>(n_pairs + 2 * nt);
    MM_RETURN_IF_ERROR(h_tab.reserve(dev, tab_bytes));
    MM_RETURN_IF_ERROR(tab.reserve(dev, tab_bytes, "the call's tables"));
    auto* ht = static_cast<uint8_t*>(h_tab.p);
    std::memcpy(ht, pl.gather.data(), 4 * n_pairs);
    std::memcpy(ht + 4 * n_pairs, pl.slot.data(), 4 * nt);
    std::memcpy(ht + 4 * (n_pairs + nt), pl.weight.data(), 4 * nt);
    MM_CUDA_RETURN(dev, cudaMemcpyAsync(tab.p, h_tab.p, tab_bytes, cudaMemcpyHostToDevice, s), "uploading the tables");
    const int32_t* d_gather = tab.as<int32_t>();
    const int32_t* d_slot = d_gather + n_pairs;
    const float* d_weight = reinterpret_cast<const float*>(d_slot + nt);
    MM_RETURN_IF_ERROR(xs.reserve(dev, sizeof(float) * n_pairs * H, "gathered rows"));
    MM_RETURN_IF_ERROR(g.reserve(dev, sizeof(float) * n_pairs * I, "gate products"));
    MM_RETURN_IF_ERROR(u.reserve(dev, sizeof(float) * n_pairs * I, "up products"));
    MM_RETURN_IF_ERROR(y.reserve(dev, sizeof(float) * (n_pairs + 1) * H, "expert outputs"));
    float *dxs = xs.as<float>(), *dg = g.as<float>(), *du = u.as<float>(), *dy = y.as<float>();
    MM_CUDA_RETURN(dev, cudaMemsetAsync(dy + n_pairs * H, 0, sizeof(float) * H, s), "clearing the padding row");
    // gather
    cuda::gather_rows(dx, d_gather, dxs, n_pairs, H, s);  // [n_pairs, H]
    // experts, in windows of pins
    const ExpertTypes ty = types[layer];
    int64_t window = static_cast<int64_t>(pl.groups.size());
    if (cache) {
        CacheTier& t = cache->device();
        const uint64_t reserve = cache->options().prefetch == PrefetchMode::kNextLayer ? 1 : 0;
        window = expert_pin_window(t.budget(), t.max_entry_charge(), hot_entries, reserve, window);
    }
    // The call's missing experts are read together (the cache's loader, VramTierMemory::fill_batch:
    // several reads and copies at once) while the resident ones compute; will_need puts the
    // resident ones first.
    struct EndCall {
        ExpertSource& s;
        ~EndCall() { s.end_call(); }
    } end_call{*src};
    if (cache) {  // resident experts (no cache): nothing to announce
        std::vector<int32_t> order(pl.groups.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = pl.groups[i].expert;
        MM_RETURN_IF_ERROR(src->will_need(layer, order.data(), static_cast<int64_t>(order.size()), window));
        std::vector<ExpertCallPlan::Group> sorted;
        sorted.reserve(pl.groups.size());
        for (int32_t e : order)
            for (const auto& gr : pl.groups)
                if (gr.expert == e) sorted.push_back(gr);
        MM_CHECK(sorted.size() == pl.groups.size());
        pl.groups = std::move(sorted);
    }
    // After will_need: the next layer's prefetch cannot evict what this call has kept.
    if (cache && cache->options().prefetch == PrefetchMode::kNextLayer && n_rows <= 8) {
        if (!hx) {  // the prefetcher reads x on the host (a few rows at decode)
            const size_t b = sizeof(float) * n_rows * H;
            MM_RETURN_IF_ERROR(h_x.reserve(dev, b));
            MM_CUDA_RETURN(dev, cudaMemcpyAsync(h_x.p, dx, b, cudaMemcpyDeviceToHost, s), "copying x for prefetch");
            MM_CUDA_RETURN(dev, cudaStreamSynchronize(s), "copying x for prefetch");
            hx = static_cast<const float*>(h_x.p);
        }
        cache->will_compute(layer, hx, n_rows);
    }
    std::vector<ExpertHandle> pins;
    pins.reserve(static_cast<size_t>(window));
    auto drain = [&]() -> Status {  // the window's kernels done: its pins may go
        const cudaError_t e = cudaStreamSynchronize(s);
        pins.clear();
        MM_CUDA_RETURN(dev, e, str_printf("computing layer %d's experts", layer));
        return Status();
    };
    // Expert e of this layer acquired and held in `pins` until the next drain (its slice stays valid).
    auto pin = [&](int32_t e) -> StatusOr<ExpertSlice> {
        StatusOr<ExpertHandle> h = acquire_expert(*src, layer, e);
        if (!h.ok()) {
            (void)drain();
            return h.status();
        }
        const ExpertSlice ex = h.value().slice();
        pins.push_back(std::move(h).value());
        return ex;
    };
    // Few pairs, each expert used once (decode): every pair's gate/up/SwiGLU in one launch and its
    // down in another, over a table of the experts' addresses (cuda::matmul_ptr*: the bits of the
    // m = 1 products below), instead of 4 launches per expert. Needs every expert pinned at once.
    // An expert used by several rows keeps its product over them (other kernels, other bits).
    bool once_each = true;
    for (const auto& gr : pl.groups) once_each = once_each && gr.count == 1;
    if (once_each && n_pairs <= kPtrMaxPairs && window >= static_cast<int64_t>(pl.groups.size()) &&
        ty.gate == ty.up && cuda::matmul_ptr_takes(ty.gate, I, H) && cuda::matmul_ptr_takes(ty.down, H, I)) {
        const size_t ptr_bytes = sizeof(void*) * 3 * static_cast<size_t>(n_pairs);
        MM_RETURN_IF_ERROR(h_ptrs.reserve(dev, ptr_bytes));
        MM_RETURN_IF_ERROR(ptrs.reserve(dev, ptr_bytes, "the call's expert addresses"));
        auto** hp = static_cast<const void**>(h_ptrs.p);  // [gate n_pairs | up n_pairs | down n_pairs]
        for (const auto& gr : pl.groups) {
            MM_ASSIGN_OR_RETURN(const ExpertSlice ex, pin(gr.expert));
            hp[gr.first] = ex.gate;
            hp[n_pairs + gr.first] = ex.up;
            hp[2 * n_pairs + gr.first] = ex.down;
        }
        MM_CUDA_RETURN(dev, cudaMemcpyAsync(ptrs.p, h_ptrs.p, ptr_bytes, cudaMemcpyHostToDevice, s),
                       "uploading the expert addresses");
        const auto* dp = static_cast<const void* const*>(ptrs.p);
        // (its blocks also put the down matrices into L2 for the launch after: MOEMESH_CUDA_EXPERT_PREFETCH)
        MM_CHECK(cuda::matmul_ptr_swiglu(ty.gate, dp, dp + n_pairs, n_pairs, I, H, dxs, H, dg, s,  // [n_pairs, I]
                                         dp + 2 * n_pairs, static_cast<size_t>(H) * ggml_row_bytes(ty.down, I)));
        MM_CHECK(cuda::matmul_ptr(ty.down, dp + 2 * n_pairs, n_pairs, H, I, dg, I, dy, s));         // [n_pairs, H]
        cuda::moe_combine(dy, d_slot, d_weight, dout, n_rows, K, H, s);                             // [n_rows, H]
        return drain();
    }
    for (const auto& gr : pl.groups) {
        MM_ASSIGN_OR_RETURN(const ExpertSlice ex, pin(gr.expert));
        const int64_t m = gr.count, o = gr.first;
        cuda::matmul(ty.gate, ex.gate, I, H, dxs + o * H, m, dg + o * I, s);  // [m, I]
        cuda::matmul(ty.up, ex.up, I, H, dxs + o * H, m, du + o * I, s);      // [m, I]
        cuda::swiglu(dg + o * I, du + o * I, dg + o * I, m * I, s);           // [m, I]
        cuda::matmul(ty.down, ex.down, H, I, dg + o * I, m, dy + o * H, s);   // [m, H]
        if (static_cast<int64_t>(pins.size()) >= window) MM_RETURN_IF_ERROR(drain());
    }
    // combine
    cuda::moe_combine(dy, d_slot, d_weight, dout, n_rows, K, H, s);  // [n_rows, H]
    return drain();
}

#endif  // MOEMESH_HAVE_CUDA

}  // namespace moemesh
