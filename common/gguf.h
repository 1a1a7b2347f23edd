// GGUF v2/v3 reader over mmap, and a writer (used by make-model and tests).
// Every offset and size read from a file is checked against the file size; a bad file gives a
// Status naming the file, the byte offset and what was wrong.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/ggml_types.h"
#include "common/status.h"

namespace moemesh {

enum class GgufType : uint32_t {
    UINT8 = 0,
    INT8 = 1,
    UINT16 = 2,
    INT16 = 3,
    UINT32 = 4,
    INT32 = 5,
    FLOAT32 = 6,
    BOOL = 7,
    STRING = 8,
    ARRAY = 9,
    UINT64 = 10,
    INT64 = 11,
    FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);
// Bytes of one value of a scalar type; 0 for STRING and ARRAY (variable length).
size_t gguf_scalar_size(GgufType t);

// One metadata value. Scalars of every integer type land in `i` (and `u` for the unsigned
// view), floats in `f`. Arrays keep their element type; numeric elements go to arr_i / arr_f.
struct GgufValue {
    GgufType type = GgufType::UINT8;
    GgufType arr_type = GgufType::UINT8;  // element type when type == ARRAY
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0;
    bool b = false;
    std::string str;
    std::vector<std::string> arr_str;
    std::vector<int64_t> arr_i;  // integer and bool arrays
    std::vector<double> arr_f;   // float arrays
    uint64_t arr_count = 0;
    bool is_int() const;  // any integer type (or bool)
    bool is_float() const { return type == GgufType::FLOAT32 || type == GgufType::FLOAT64; }
};

struct GgufTensor {
    std::string name;
    GgmlType type = GgmlType::F32;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the contiguous (innermost) dimension
    uint64_t offset = 0;           // relative to the data section (of its split)
    size_t nbytes = 0;
    const uint8_t* data = nullptr;  // into the mapping
    uint32_t split = 0;             // which file of a split model holds it (GgufFile::split_path)
    int64_t nelements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    std::string shape_str() const;  // "{2048, 768, 128}"
};

class GgufFile {
public:
    ~GgufFile();
    GgufFile(const GgufFile&) = delete;
    GgufFile& operator=(const GgufFile&) = delete;

    // A model split by llama.cpp's gguf-split (NAME-00001-of-0000N.gguf …, keys split.no /
    // split.count / split.tensors.count) is opened from its first file: the others are found by
    // name, checked and mapped, and their tensors join the table (GgufTensor::split says where).
    static StatusOr<std::unique_ptr<GgufFile>> open(const std::string& path);
    // Parses a buffer the caller keeps alive (fuzzing, tests). `name` is used in messages.
    static StatusOr<std::unique_ptr<GgufFile>> from_memory(const uint8_t* data, size_t size, const std::string& name);

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    size_t file_size() const { return size_; }
    size_t alignment() const { return alignment_; }
    size_t data_offset() const { return data_offset_; }
    const uint8_t* base() const { return base_; }

    const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
    const GgufValue* find(const std::string& key) const;
    bool has(const std::string& key) const { return find(key) != nullptr; }

    // Typed getters; the error names the file and key and says what was found instead.
    StatusOr<int64_t> get_int(const std::string& key) const;
    StatusOr<double> get_float(const std::string& key) const;  // accepts integers too
    StatusOr<std::string> get_string(const std::string& key) const;
    StatusOr<bool> get_bool(const std::string& key) const;
    int64_t get_int_or(const std::string& key, int64_t def) const;
    double get_float_or(const std::string& key, double def) const;
    std::string get_string_or(const std::string& key, const std::string& def) const;
    bool get_bool_or(const std::string& key, bool def) const;

    const std::vector<GgufTensor>& tensors() const { return tensors_; }
    const GgufTensor* tensor(const std::string& name) const;

    // Files of a split model (1 for a single file); split 0 is this file.
    uint32_t split_count() const { return static_cast<uint32_t>(1 + splits_.size()); }
    const std::string& split_path(uint32_t i) const { return i == 0 ? path_ : splits_[i - 1]->path_; }
    // Where `p`, a pointer into tensor t's data, lies in the file split_path(t.split).
    uint64_t file_offset(const GgufTensor& t, const uint8_t* p) const {
        return static_cast<uint64_t>(p - (t.split == 0 ? base_ : splits_[t.split - 1]->base_));
    }
    // Bytes of all files.
    size_t total_size() const;
    // Reads every mapped file's pages in and maps them (madvise MADV_POPULATE_READ, in chunks;
    // progress(done, total) after each), so that the first request does not take the page faults.
    // A kernel without it (before Linux 5.14), memory running short, or a file from memory: it
    // stops there, no error. An unreadable range (file truncated after open, I/O error): an error
    // naming the file, never SIGBUS.
    Status populate(const std::function<void(uint64_t done, uint64_t total)>& progress = {}) const;

    // 16 hex digits identifying the model: a hash of every metadata key and value, of the tensor
    // table (names, types, shapes, offsets) and of the first and last 4 KiB of every tensor's data.
    // Processes compare it at handshake.
    std::string fingerprint() const;

private:
    GgufFile() = default;
    Status parse();
    static StatusOr<std::unique_ptr<GgufFile>> open_one(const std::string& path);
    Status open_splits();

    std::string path_;
    const uint8_t* base_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
    uint32_t version_ = 0;
    size_t alignment_ = 32;
    size_t data_offset_ = 0;
    std::vector<std::pair<std::string, GgufValue>> kv_;
    std::map<std::string, size_t> kv_index_;
    std::vector<GgufTensor> tensors_;
    std::map<std::string, size_t> tensor_index_;
    std::vector<std::unique_ptr<GgufFile>> splits_;  // files 2..N of a split model (their mappings)
};

// Builds a GGUF v3 file in memory and writes it. Keys and tensors are written in insertion order.
class GgufWriter {
public:
    void set_u16(const std::string& key, uint16_t v);
    void set_u32(const std::string& key, uint32_t v);
    void set_i32(const std::string& key, int32_t v);
    void set_u64(const std::string& key, uint64_t v);
    void set_f32(const std::string& key, float v);
    void set_bool(const std::string& key, bool v);
    void set_string(const std::string& key, const std::string& v);
    void set_arr_string(const std::string& key, const std::vector<std::string>& v);
    void set_arr_i32(const std::string& key, const std::vector<int32_t>& v);
    void set_arr_f32(const std::string& key, const std::vector<float>& v);
    void set_arr_bool(const std::string& key, const std::vector<bool>& v);
    // Any value as GgufFile parsed it, in its own type (copying metadata from one file to another).
    void set_value(const std::string& key, const GgufValue& v);
    // ne in ggml order (ne[0] innermost). data.size() must equal ggml_row_bytes(type, ne[0]) * rows.
    void add_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& ne, std::vector<uint8_t> data);
    void set_alignment(uint32_t a) { alignment_ = a; }  // also written as general.alignment if != 32
    Status write(const std::string& path) const;
    std::vector<uint8_t> serialize() const;

private:
    std::vector<uint8_t> header_bytes() const;
    struct Tensor {
        std::string name;
        GgmlType type;
        std::vector<int64_t> ne;
        std::vector<uint8_t> data;
    };
    std::vector<uint8_t> kv_bytes_;
    uint64_t n_kv_ = 0;
    std::vector<Tensor> tensors_;
    uint32_t alignment_ = 32;
};

}  // namespace moemesh
