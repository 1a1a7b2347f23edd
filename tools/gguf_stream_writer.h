// Writes a GGUF file tensor by tensor, so make-model never holds a whole model (a 48-layer
// Qwen3-30B-A3B-shaped file is 17 GB in Q4_K, 32 GB in Q8_0). The metadata comes from a GgufWriter
// that has no tensors; the tensor table (names, types, shapes) is given up front and the data then
// follows in that order, each tensor written on a background thread while the caller makes the next.
// The bytes are those GgufWriter::write would write for the same keys and tensors.
#pragma once
#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "common/ggml_types.h"
#include "common/gguf.h"
#include "common/status.h"

namespace moemesh {

class GgufStreamWriter {
public:
    struct TensorInfo {
        std::string name;
        GgmlType type;
        std::vector<int64_t> ne;  // ggml order
        size_t nbytes() const;
    };

    // `meta` must hold no tensors; `alignment` is the one set on it (general.alignment). Opens
    // path + ".partial" and writes the header.
    static StatusOr<std::unique_ptr<GgufStreamWriter>> create(const std::string& path, const GgufWriter& meta,
                                                              uint32_t alignment, std::vector<TensorInfo> tensors);
    ~GgufStreamWriter();  // unfinished: closes and removes the .partial file
    GgufStreamWriter(const GgufStreamWriter&) = delete;
    GgufStreamWriter& operator=(const GgufStreamWriter&) = delete;

    // The next tensor's data (exactly its nbytes()). Returns once the previous tensor's write is done
    // (it failed: that error), so at most two tensors are held at a time.
    Status write_next(std::vector<uint8_t> data);
    // The buffer of the last finished write, emptied but with its capacity (none yet: an empty
    // vector): the caller makes the next tensor in it instead of in fresh memory, which the kernel
    // would have to fault in and zero page by page.
    std::vector<uint8_t> take_spare() { return std::move(spare_); }
    // Waits for the last write, checks that every tensor came, closes and renames to the path.
    Status finish();

    uint64_t bytes_written() const { return written_; }

private:
    GgufStreamWriter() = default;
    Status write_all(const uint8_t* p, size_t n);
    Status wait_pending();

    std::string path_, tmp_;
    int fd_ = -1;
    uint32_t alignment_ = 32;
    std::vector<TensorInfo> tensors_;
    size_t next_ = 0;
    uint64_t written_ = 0;
    struct Written {
        Status status;
        std::vector<uint8_t> buffer;
    };
    std::future<Written> pending_;
    std::vector<uint8_t> spare_;
};

// Where the key/value section of a tensor-less GGUF header (GgufWriter::serialize()) ends, i.e.
// its length without the padding. Error: the bytes are not such a header.
StatusOr<size_t> gguf_metadata_end(const std::vector<uint8_t>& header);

}  // namespace moemesh
