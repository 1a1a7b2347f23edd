// Expert compute on a GPU: ExpertCompute's contract (worker/expert_compute.h) with the experts in the
// VRAM of one device — either the whole shard resident, or served from an ExpertCache whose device
// tier is VRAM (VramTierMemory) over a pinned host tier (PinnedHostTierMemory) over the model file.
//
// One call (a layer's pairs) runs as named steps on one stream:
//   plan     (host)  group the pairs by expert (ascending id, pairs in order) into one block of rows;
//                    the combine table of every row: its pairs' block rows in pair order, padded;
//   upload           the plan's tables, through one pinned staging buffer;
//   gather           xs[n_pairs, H] = x[block row's row]                     (cuda::gather_rows)
//   experts          per used expert e, its m rows of xs: g = xs·gateᵀ, u = xs·upᵀ [m, I];
//                    g = silu(g)·u; y = g·downᵀ [m, H]                        (cuda::matmul, swiglu)
//   combine          out[r] = Σ over r's pairs, in pair order, of weight · y[block row]
//                    (cuda::moe_combine; padding points at a zero row of y with weight 0)
// Cache mode acquires experts in windows: the host thread pins (and on a miss copies in, on the
// cache's copy stream) expert j+1 while the GPU computes expert j; at the end of a window the stream
// is synchronized and the window's pins are released. A window holds as many pins as the device
// tier has room for beside its static hot set (one, for a budget of one expert), so a call never
// needs the cache's transient buffers. Resident mode is one window.
//
// Numerics: the CUDA kernels do not quantize activations (kernels/cuda/cuda_ops.h), so results
// match ExpertCompute on f32 weights up to summation order and quantized ones to ~1e-2; resident and
// cache modes, compute and compute_device are bitwise identical (same kernels, same order).
//
// The header compiles without CUDA; without MOEMESH_HAVE_CUDA, create() fails with a clear error.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "coordinator/expert_backend.h"
#include "worker/expert_cache.h"

namespace moemesh {

// ---- plain C++ pieces (tested on CPU) ----------------------------------------------------------

// One call's layout on the device. Block row s (0 <= s < n_pairs) holds pair order[s]: the pairs of
// the used experts, grouped by expert in ascending id, pairs in call order within each expert.
struct ExpertCallPlan {
    struct Group {
        int expert = 0;
        int64_t first = 0, count = 0;  // block rows [first, first + count)
    };
    std::vector<Group> groups;       // used experts, ascending
    std::vector<int32_t> gather;     // [n_pairs]: the activation row of block row s
    int64_t slots_per_row = 0;       // K' = most pairs any row has
    std::vector<int32_t> slot;       // [n_rows, K']: block rows of the row's pairs, in pair order; padding: n_pairs
    std::vector<float> weight;       // [n_rows, K']: their weights; padding: 0
};
// Validates rows/experts (rows in [0, n_rows), experts in [0, n_expert)) and builds the plan.
StatusOr<ExpertCallPlan> plan_expert_call(int layer, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                                          const float* weights, int64_t n_pairs, int64_t n_expert);

// Pins one call may hold at once in a device tier of `budget` bytes (0: unlimited → `wanted`) whose
// entries are charged at most `max_charge`, with `hot_entries` pinned for good (static hot set) and
// `reserve` more kept free (a prefetch in flight): at least 1, at most `wanted`.
int64_t expert_pin_window(uint64_t budget, uint64_t max_charge, uint64_t hot_entries, uint64_t reserve,
                          int64_t wanted);

// "cpu" or "cuda:N" (common/placement.h parse_device) → a device index, -1 for cpu. `flag` names the
// option in errors ("--device").
StatusOr<int> parse_compute_device(const std::string& text, const char* flag);

// OK when this build has CUDA and device `index` exists; else why not ("this moemesh-worker was
// built without CUDA ...", "no CUDA device: ...", "only 1 CUDA device(s) present (cuda:0..cuda:0)").
Status check_cuda_device(int index);

// ---- the GPU expert compute --------------------------------------------------------------------

class CudaExpertCompute {
public:
    // shard: [layer] sorted expert ids; empty: every expert. cache: null → the whole shard resident in
    // VRAM (a clear error, bytes needed vs free, when it does not fit); else an ExpertCache with its
    // device tier in VRAM (device_bytes 0: the shard's size, capped to 90% of free VRAM) and a pinned
    // host tier (host_bytes). A static policy's hot set is loaded here.
    static StatusOr<std::unique_ptr<CudaExpertCompute>> create(const GgufFile& f, const ModelConfig& c,
                                                               const std::vector<std::vector<int>>& shard, int device,
                                                               const CacheOptions* cache);
    ~CudaExpertCompute();

    int device() const;
    uint64_t shard_bytes() const;  // data bytes of the shard's experts
    uint64_t device_budget() const;  // the cache's VRAM tier in bytes (0: resident, no cache)
    ExpertCache* cache();          // null when resident
    std::string stats_line() const;  // the cache's stats line, or "resident N GiB in VRAM (cuda:D)"
    uint64_t vram_bytes() const;   // VRAM held for experts (resident copy, or the device tier's arena)
    bool holds(int layer, int expert) const;

    // x, out: host memory [n_rows, H]; pairs (rows, experts, weights) in host memory; out overwritten
    // with Σ per row of weight · expert(x_row), pairs summed in pair order like ExpertCompute.
    Status compute(int layer, const float* x, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                   const float* weights, int64_t n_pairs, float* out);
    // Same with x/out in device memory of device(); `stream` is a cudaStream_t (nullptr: own stream);
    // returns when out is complete.
    Status compute_device(int layer, const float* d_x, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                          const float* weights, int64_t n_pairs, float* d_out, void* stream);

    struct Impl;

private:
    explicit CudaExpertCompute(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

// The routed experts of one process on a GPU (`moemesh run --device cuda:N --device-budget B`): an
// ExpertBackend whose CudaBackend caller passes device pointers (moe_forward_device: no host round
// trip of the activations); moe_forward is the same through host memory.
class CudaExpertBackend final : public ExpertBackend {
public:
    explicit CudaExpertBackend(std::unique_ptr<CudaExpertCompute> c) : compute_(std::move(c)) {}
    Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                       const float* weights, float* out) override;
    // d_x, d_out: [n_rows, H] in device memory of compute().device(); ids, weights: [n_rows, k] in host
    // memory; stream: a cudaStream_t the call is ordered on (it returns when d_out is complete).
    Status moe_forward_device(int layer, const float* d_x, int64_t n_rows, int64_t k, const int32_t* ids,
                              const float* weights, float* d_out, void* stream);
    CudaExpertCompute& compute() { return *compute_; }

private:
    std::unique_ptr<CudaExpertCompute> compute_;
    std::vector<int32_t> rows_;
};

}  // namespace moemesh
