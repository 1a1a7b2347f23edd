// Expert compute: Σ over (row, expert, weight) pairs of weight · SwiGLU-expert(row), for the
// experts this process serves. Used in-process (LocalExpertExecutor) and by workers.
//
// Where an expert's bytes come from is an ExpertSource: the whole mapped file or a loaded shard
// (TableExpertSource: plain pointers, acquire/release cost nothing), or a budgeted cache over the
// model file (worker/expert_cache.h: acquire may read the expert, and pins it until release).
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/ggml_types.h"
#include "common/model_config.h"
#include "common/status.h"
#include "kernels/ops.h"

namespace moemesh {

// Where one expert's matrices live: gate/up [I, H] rows and down [H, I] rows, in the layer's types.
struct ExpertSlice {
    const uint8_t* gate = nullptr;
    const uint8_t* up = nullptr;
    const uint8_t* down = nullptr;
};

struct ExpertTypes {
    GgmlType gate = GgmlType::F32, up = GgmlType::F32, down = GgmlType::F32;
};

struct LayerExpertTable {
    GgmlType gate_type = GgmlType::F32, up_type = GgmlType::F32, down_type = GgmlType::F32;
    std::vector<ExpertSlice> experts;  // [E]; gate == nullptr: not held here
};

// The experts a process serves, expert by expert. acquire() pins an expert's bytes (they stay valid
// and in place) until the token is released; every acquire is paired with one release. Thread-safe
// for concurrent acquire/release.
class ExpertSource {
public:
    virtual ~ExpertSource() = default;
    virtual int num_layers() const = 0;
    virtual ExpertTypes types(int layer) const = 0;
    virtual bool holds(int layer, int expert) const = 0;
    // Fails (with the file, tensor and byte range) when the bytes cannot be read.
    virtual Status acquire(int layer, int expert, ExpertSlice* slice, void** token) = 0;
    virtual void release(void* token) = 0;
    // True when every expert held is resident and pinning costs nothing (no budget): a call may then
    // pin all its experts at once and compute them in one parallel region. Default: false (one pin
    // at a time).
    virtual bool pins_are_free() const { return false; }
    // A call for `layer` is starting with these activations x [n_rows, H]; a source may use them to
    // fetch the next layer's likely experts in the background (prefetch). Default: nothing.
    virtual void will_compute(int layer, const float* x, int64_t n_rows) {}
    // This thread's call for `layer` is about to acquire each of experts[0..n) (distinct, held here)
    // once, one at a time, in the order the array has on return: a source may reorder it (what it
    // can serve at once first) and read the missing ones together (one batched read instead of n
    // reads in a row, maybe in the background while the call computes the others), keeping them
    // for the call until end_call(). An error is the one the acquire of that expert would have
    // returned. pins_at_once: how many of them the caller holds pinned at a time (1: each released
    // before the next is acquired; a CUDA call keeps a window of pins until its kernels are done);
    // the room a source leaves for the acquires it did not keep grows with it. Default: nothing.
    virtual Status will_need(int layer, int32_t* experts, int64_t n, int64_t pins_at_once = 1) { return Status(); }
    // The call announced by will_need on this thread is over (finished or failed). Always called
    // after will_need, whatever it returned.
    virtual void end_call() {}
};

// A pinned expert; releases on destruction.
class ExpertHandle {
public:
    ExpertHandle() = default;
    ExpertHandle(ExpertSource* s, ExpertSlice slice, void* token) : src_(s), slice_(slice), token_(token) {}
    ExpertHandle(ExpertHandle&& o) noexcept { *this = std::move(o); }
    ExpertHandle& operator=(ExpertHandle&& o) noexcept {
        reset();
        src_ = std::exchange(o.src_, nullptr);
        slice_ = o.slice_;
        token_ = o.token_;
        return *this;
    }
    ~ExpertHandle() { reset(); }
    void reset() {
        if (src_) src_->release(token_);
        src_ = nullptr;
    }
    const ExpertSlice& slice() const { return slice_; }

private:
    ExpertSource* src_ = nullptr;
    ExpertSlice slice_;
    void* token_ = nullptr;
};

inline StatusOr<ExpertHandle> acquire_expert(ExpertSource& s, int layer, int expert) {
    ExpertSlice slice;
    void* token = nullptr;
    MM_RETURN_IF_ERROR(s.acquire(layer, expert, &slice, &token));
    return ExpertHandle(&s, slice, token);
}

// Fixed tables of pointers (the mapped file, or a ShardStore's buffer the caller keeps alive).
class TableExpertSource final : public ExpertSource {
public:
    explicit TableExpertSource(std::vector<LayerExpertTable> layers) : layers_(std::move(layers)) {}
    int num_layers() const override { return static_cast<int>(layers_.size()); }
    ExpertTypes types(int layer) const override {
        const auto& t = layers_[layer];
        return {t.gate_type, t.up_type, t.down_type};
    }
    bool holds(int layer, int expert) const override;
    Status acquire(int layer, int expert, ExpertSlice* slice, void** token) override;
    void release(void*) override {}
    bool pins_are_free() const override { return true; }

private:
    std::vector<LayerExpertTable> layers_;
};

class ExpertCompute {
public:
    ExpertCompute(const ModelConfig& c, ThreadPool& pool, std::vector<LayerExpertTable> layers)
        : ExpertCompute(c, pool, std::make_shared<TableExpertSource>(std::move(layers))) {}
    ExpertCompute(const ModelConfig& c, ThreadPool& pool, std::shared_ptr<ExpertSource> source)
        : cfg_(c), pool_(pool), src_(std::move(source)) {}

    // x: [n_rows, H]. Pairs p: (rows[p], experts[p], weights[p]). out: [n_rows, H] (overwritten)
    // = for each row, Σ of its pairs in pair order. Every pair's expert must be held here.
    // The call's distinct experts are announced first (ExpertSource::will_need: a cache reads the
    // missing ones as one batch), then acquired one at a time (at most one pin in use per call), or
    // all at once where pins are free (resident experts: one parallel region for all their gate
    // and up products, one for the down products).
    Status compute(int layer, const float* x, int64_t n_rows, const int32_t* rows, const int32_t* experts,
                   const float* weights, int64_t n_pairs, float* out);

    const ModelConfig& config() const { return cfg_; }
    bool holds(int layer, int expert) const { return src_->holds(layer, expert); }
    ExpertSource& source() { return *src_; }

private:
    ModelConfig cfg_;
    ThreadPool& pool_;
    std::shared_ptr<ExpertSource> src_;
    std::vector<float> xg_, g_, u_, d_;
    std::vector<int32_t> distinct_;  // the call's experts, in the order will_need leaves them
    std::vector<std::vector<int64_t>> by_expert_;  // [E]: pairs of each expert, in order
    std::vector<int64_t> pos_;                     // [n_pairs]: the pair's row in xg_/d_ (grouped by expert)
    std::vector<int64_t> first_;                   // [distinct + 1]: distinct_[i]'s first row there
    std::vector<MatmulJob> jobs_;
    std::vector<ExpertHandle> handles_;
};

}  // namespace moemesh
