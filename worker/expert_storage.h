// Storage tier of the expert cache: an expert's bytes read from the GGUF file.
//
// An expert is three byte ranges of the file (its gate, up and down matrices, one row of each
// `blk.%d.ffn_*_exps` tensor); a read fills one cache entry laid out as ExpertLayout. Two ways to
// read them:
//   pread     one pread loop per matrix, one matrix after another;
//   io_uring  every matrix of every expert of a call submitted at once (three concurrent SQEs for one
//             expert, 3·N for a batch of N), short reads resubmitted for the remainder.
// `auto` takes io_uring when the build has liburing and a ring can be set up at run time (seccomp
// profiles of container runtimes often forbid io_uring_setup), else pread, with one log line.
// Both report a failure the same way: the file, tensor, expert and byte range, and what went wrong.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "worker/expert_compute.h"

namespace moemesh {

enum class StorageMode { kAuto, kPread, kIoUring };
StatusOr<StorageMode> parse_storage_mode(const std::string& s);  // "auto" | "pread" | "io_uring"
const char* storage_mode_name(StorageMode m);
// Whether io_uring can be used here: built with liburing and a ring can be created now. *why: the
// reason when not.
bool io_uring_usable(std::string* why);

// Byte layout of one expert of a layer inside a cache entry.
struct ExpertLayout {
    uint64_t gate_bytes = 0, up_bytes = 0, down_bytes = 0;
    uint64_t up_off = 0, down_off = 0;  // gate at 0; each matrix 64-byte aligned
    uint64_t size = 0;                  // bytes to allocate
    uint64_t data_bytes() const { return gate_bytes + up_bytes + down_bytes; }
};

// One expert to read, into dst (bytes = layout(layer).size).
struct ExpertRead {
    int layer = 0, expert = 0;
    uint8_t* dst = nullptr;
    uint64_t bytes = 0;
};

// Called once per read of a batch as soon as its outcome ((*out)[i]) is final, from the reading
// thread, before read_experts returns: a cache makes each expert available while the rest of the
// batch is still being read.
using ReadDone = std::function<void(size_t i)>;

// Something an expert's bytes can be read from: the file, or a tier (for the tier above it).
class ExpertReader {
public:
    virtual ~ExpertReader() = default;
    // dst: layout(layer).size bytes. Thread-safe.
    virtual Status read_expert(int layer, int expert, uint8_t* dst) = 0;
    // Several experts at once; (*out)[i] is the outcome of reads[i] (one failure does not fail the
    // others). `done` (may be empty): see ReadDone. Default: read_expert one after another.
    // Thread-safe.
    virtual void read_experts(const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                              const ReadDone& done = nullptr);
};

// The storage tier: an expert's three matrices read from the GGUF file with pread or io_uring.
// Errors name the file, tensor and byte range (short read: the file was truncated after it was
// opened).
class FileExpertReader final : public ExpertReader {
public:
    // mode kAuto resolves here (io_uring when usable, else pread with one log line); kIoUring fails
    // when io_uring is not usable, saying why.
    static StatusOr<std::unique_ptr<FileExpertReader>> open(const GgufFile& f, const ModelConfig& c,
                                                            StorageMode mode = StorageMode::kAuto);
    ~FileExpertReader() override;
    Status read_expert(int layer, int expert, uint8_t* dst) override;
    void read_experts(const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                      const ReadDone& done = nullptr) override;
    StorageMode mode() const { return mode_; }  // kPread or kIoUring
    const std::string& path() const { return path_; }
    const std::vector<ExpertLayout>& layouts() const { return layouts_; }
    const std::vector<ExpertTypes>& types() const { return types_; }
    uint64_t reads() const { return reads_.load(); }
    uint64_t bytes_read() const { return bytes_.load(); }
    uint64_t errors() const { return errors_.load(); }
    double read_seconds() const { return static_cast<double>(ns_.load()) * 1e-9; }
    void reset_counters();

private:
    FileExpertReader() = default;
    struct Matrix {
        std::string tensor;
        uint64_t offset = 0;        // of expert 0 in its file
        uint64_t stride = 0;        // bytes from one expert's matrix to the next
        uint64_t size = 0;          // bytes of one expert's matrix (< stride in a fused gate|up tensor)
        uint32_t split = 0;         // its file (fds_, paths_): a split model's tensors are in several
    };
    struct Ring;
    Status read_error(int layer, int m, int expert, uint64_t done, int err) const;
    Status pread_expert(int layer, int expert, uint8_t* dst);
    // false: the ring broke (the reads finished with pread) and must not be reused.
    bool uring_read(Ring& ring, const std::vector<ExpertRead>& reads, std::vector<Status>* out, const ReadDone& done);
    std::unique_ptr<Ring> take_ring();
    void give_ring(std::unique_ptr<Ring> r);

    std::string path_;               // the model (its first file when split)
    std::vector<std::string> paths_;  // every file of the model
    std::vector<int> fds_;
    StorageMode mode_ = StorageMode::kPread;
    std::vector<ExpertLayout> layouts_;
    std::vector<ExpertTypes> types_;
    std::vector<Matrix> matrices_;  // [layer * 3 + {gate, up, down}]
    std::atomic<uint64_t> reads_{0}, bytes_{0}, errors_{0}, ns_{0};
    // io_uring: rings are not thread-safe, so each call takes one from this pool (made on demand:
    // as many as threads read at once, typically the compute thread and the prefetch thread).
    std::mutex rings_mu_;
    std::vector<std::unique_ptr<Ring>> rings_;
};

}  // namespace moemesh
