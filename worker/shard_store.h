// Shard store: the bytes of the experts this worker owns, read from the model file with pread()
// into memory the store owns. The rest of the file is never touched, so a worker's resident memory
// grows with its shard, not with the model.
//
// Layout of the owned buffer: for each layer, for each owned expert (ascending id), its gate, up
// and down matrices, each starting on a 64-byte boundary. The LayerExpertTable handed to
// ExpertCompute points into this buffer (null for experts not owned).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "worker/expert_compute.h"

namespace moemesh {

// For each layer (index = layer id), the expert ids owned there. Shorter than n_layer: the
// missing layers own nothing.
using ShardSpec = std::vector<std::vector<int>>;

// Sorts and de-duplicates each layer's ids and pads to n_layer layers. Errors name the bad layer or
// expert id and the model's range.
StatusOr<ShardSpec> normalize_shard(const ShardSpec& shard, const ModelConfig& c);

// "48 experts in 2 layers (0: 0-7,12, 1: 0-31)" — for logs.
std::string shard_summary(const ShardSpec& shard);

class ShardStore {
public:
    ~ShardStore();
    ShardStore(const ShardStore&) = delete;
    ShardStore& operator=(const ShardStore&) = delete;

    // Checks the shard against the model (ids in range, expert tensors present with the expected
    // shapes and computable types) and plans the byte ranges to read. Reads nothing yet.
    static StatusOr<std::unique_ptr<ShardStore>> plan(const GgufFile& f, const ModelConfig& c, const ShardSpec& shard);

    // Reads every owned byte range with pread(). May run on another thread than the readers of the
    // progress counters. A short read (file truncated) or an I/O error gives a Status naming the
    // file, tensor and byte range. After cancel(), returns an error saying so at the next chunk.
    Status load();
    void cancel() { cancelled_.store(true); }

    const ShardSpec& shard() const { return shard_; }
    uint64_t total_bytes() const { return total_bytes_; }
    uint64_t loaded_bytes() const { return loaded_bytes_.load(std::memory_order_relaxed); }
    bool loaded() const { return loaded_.load(std::memory_order_acquire); }

    // One table per layer for ExpertCompute; valid (and its pointers stable) once load() succeeded,
    // for the lifetime of the store.
    const std::vector<LayerExpertTable>& tables() const { return tables_; }

private:
    ShardStore() = default;

    // One contiguous range of the file, copied to buffer_ + dst.
    struct Range {
        std::string tensor;
        uint64_t file_offset = 0;  // in paths_[split]
        uint64_t size = 0;
        uint64_t dst = 0;
        uint32_t split = 0;
    };

    std::string path_;                // the model (its first file when split)
    std::vector<std::string> paths_;  // every file of the model
    ShardSpec shard_;
    std::vector<Range> ranges_;
    std::vector<LayerExpertTable> tables_;
    uint8_t* buffer_ = nullptr;  // anonymous mapping of buffer_size_ bytes
    size_t buffer_size_ = 0;
    uint64_t total_bytes_ = 0;   // Σ of range sizes (= owned bytes, without alignment padding)
    std::atomic<uint64_t> loaded_bytes_{0};
    std::atomic<bool> loaded_{false};
    std::atomic<bool> cancelled_{false};
};

}  // namespace moemesh
