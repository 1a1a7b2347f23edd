#include "common/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

namespace moemesh {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxStringLen = 1ull << 30;
constexpr int kMaxDims = 4;


// Bounds-checked cursor over the file bytes. Every read names the offset on failure.
class Reader {
public:
    Reader(const uint8_t* data, size_t size, const std::string& name) : data_(data), size_(size), name_(name) {}
    size_t pos() const { return pos_; }
    size_t remaining() const { return size_ - pos_; }

    Status fail(size_t at, const std::string& what) const {
        return MM_ERROR("%s: byte offset %zu: %s", name_.c_str(), at, what.c_str());
    }
    Status need(size_t n, const char* what) const {
        if (n > remaining())
            return MM_ERROR("%s: byte offset %zu: file truncated while reading %s (need %zu bytes, %zu left)",
                            name_.c_str(), pos_, what, n, remaining());
        return Status();
    }
    template <class T>
    Status read(T* out, const char* what) {
        MM_RETURN_IF_ERROR(need(sizeof(T), what));
        std::memcpy(out, data_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return Status();
    }
    Status read_string(std::string* out, const char* what) {
        size_t at = pos_;
        uint64_t len = 0;
        MM_RETURN_IF_ERROR(read(&len, what));
        if (len > kMaxStringLen || len > remaining())
            return fail(at, str_printf("%s: string length %llu exceeds the %zu bytes left in the file", what,
                                       static_cast<unsigned long long>(len), remaining()));
        out->assign(reinterpret_cast<const char*>(data_ + pos_), len);
        pos_ += len;
        return Status();
    }

private:
    const uint8_t* data_;
    size_t size_;
    size_t pos_ = 0;
    const std::string& name_;
};

Status read_scalar(Reader& r, GgufType t, GgufValue* v, const char* what) {
    switch (t) {
        case GgufType::UINT8: { uint8_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->u = x; v->i = x; break; }
        case GgufType::INT8: { int8_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->i = x; v->u = static_cast<uint64_t>(x); break; }
        case GgufType::UINT16: { uint16_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->u = x; v->i = x; break; }
        case GgufType::INT16: { int16_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->i = x; v->u = static_cast<uint64_t>(x); break; }
        case GgufType::UINT32: { uint32_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->u = x; v->i = x; break; }
        case GgufType::INT32: { int32_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->i = x; v->u = static_cast<uint64_t>(x); break; }
        case GgufType::UINT64: { uint64_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->u = x; v->i = static_cast<int64_t>(x); break; }
        case GgufType::INT64: { int64_t x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->i = x; v->u = static_cast<uint64_t>(x); break; }
        case GgufType::FLOAT32: { float x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->f = x; break; }
        case GgufType::FLOAT64: { double x; MM_RETURN_IF_ERROR(r.read(&x, what)); v->f = x; break; }
        case GgufType::BOOL: {
            uint8_t x;
            size_t at = r.pos();
            MM_RETURN_IF_ERROR(r.read(&x, what));
            if (x > 1) return r.fail(at, str_printf("%s: bool value %u is not 0 or 1", what, x));
            v->b = x != 0; v->i = x; v->u = x;
            break;
        }
        case GgufType::STRING: MM_RETURN_IF_ERROR(r.read_string(&v->str, what)); break;
        default: return r.fail(r.pos(), str_printf("%s: bad scalar type %u", what, static_cast<unsigned>(t)));
    }
    v->type = t;
    return Status();
}

Status read_value(Reader& r, GgufType t, GgufValue* v, const std::string& key) {
    const char* what = key.c_str();
    if (t != GgufType::ARRAY) return read_scalar(r, t, v, what);
    v->type = GgufType::ARRAY;
    size_t at = r.pos();
    uint32_t et = 0;
    uint64_t n = 0;
    MM_RETURN_IF_ERROR(r.read(&et, what));
    MM_RETURN_IF_ERROR(r.read(&n, what));
    if (et > static_cast<uint32_t>(GgufType::FLOAT64) || et == static_cast<uint32_t>(GgufType::ARRAY))
        return r.fail(at, str_printf("key '%s': unsupported array element type %u", what, et));
    v->arr_type = static_cast<GgufType>(et);
    v->arr_count = n;
    if (v->arr_type == GgufType::STRING) {
        // Each string takes at least 8 bytes: reject absurd counts before allocating.
        if (n > r.remaining() / 8)
            return r.fail(at, str_printf("key '%s': array of %llu strings cannot fit in the %zu bytes left", what,
                                         static_cast<unsigned long long>(n), r.remaining()));
        v->arr_str.resize(n);
        for (uint64_t i = 0; i < n; ++i) MM_RETURN_IF_ERROR(r.read_string(&v->arr_str[i], what));
        return Status();
    }
    size_t es = gguf_scalar_size(v->arr_type);
    if (n > r.remaining() / es)
        return r.fail(at, str_printf("key '%s': array of %llu elements of %zu bytes exceeds the %zu bytes left", what,
                                     static_cast<unsigned long long>(n), es, r.remaining()));
    bool is_float = v->arr_type == GgufType::FLOAT32 || v->arr_type == GgufType::FLOAT64;
    if (is_float) v->arr_f.resize(n); else v->arr_i.resize(n);
    for (uint64_t i = 0; i < n; ++i) {
        GgufValue e;
        MM_RETURN_IF_ERROR(read_scalar(r, v->arr_type, &e, what));
        if (is_float) v->arr_f[i] = e.f; else v->arr_i[i] = e.i;
    }
    return Status();
}

}  // namespace

size_t gguf_scalar_size(GgufType t) {
    switch (t) {
        case GgufType::UINT8:
        case GgufType::INT8:
        case GgufType::BOOL:
            return 1;
        case GgufType::UINT16:
        case GgufType::INT16:
            return 2;
        case GgufType::UINT32:
        case GgufType::INT32:
        case GgufType::FLOAT32:
            return 4;
        case GgufType::UINT64:
        case GgufType::INT64:
        case GgufType::FLOAT64:
            return 8;
        default:
            return 0;
    }
}

const char* gguf_type_name(GgufType t) {
    static const char* kNames[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                   "bool", "string", "array", "uint64", "int64", "float64"};
    auto i = static_cast<uint32_t>(t);
    return i < 13 ? kNames[i] : "unknown";
}

bool GgufValue::is_int() const {
    switch (type) {
        case GgufType::UINT8: case GgufType::INT8: case GgufType::UINT16: case GgufType::INT16:
        case GgufType::UINT32: case GgufType::INT32: case GgufType::UINT64: case GgufType::INT64:
        case GgufType::BOOL:
            return true;
        default:
            return false;
    }
}

std::string GgufTensor::shape_str() const {
    std::string s = "{";
    for (int d = 0; d < n_dims; ++d) {
        if (d) s += ", ";
        s += std::to_string(ne[d]);
    }
    return s + "}";
}

GgufFile::~GgufFile() {
    if (mapped_ && base_) munmap(const_cast<uint8_t*>(base_), size_);
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::open(const std::string& path) {
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, open_one(path));
    MM_RETURN_IF_ERROR(f->open_splits());
    return f;
}

namespace {
// "split.no" / "split.count" of f as 0 / 1 when absent; an error when present but not a small integer.
Status split_keys(const GgufFile& f, int64_t* no, int64_t* count) {
    *no = 0;
    *count = 1;
    if (f.has("split.count")) {
        MM_ASSIGN_OR_RETURN(*count, f.get_int("split.count"));
    }
    if (f.has("split.no")) {
        MM_ASSIGN_OR_RETURN(*no, f.get_int("split.no"));
    }
    if (*count < 1 || *count > 9999 || *no < 0 || *no >= *count)
        return MM_ERROR("%s: split.no %lld / split.count %lld: expected 0 <= split.no < split.count <= 9999",
                        f.path().c_str(), static_cast<long long>(*no), static_cast<long long>(*count));
    return Status();
}
}  // namespace

size_t GgufFile::total_size() const {
    size_t n = size_;
    for (const auto& s : splits_) n += s->size_;
    return n;
}

Status GgufFile::populate(const std::function<void(uint64_t, uint64_t)>& progress) const {
#ifdef MADV_POPULATE_READ
    std::vector<const GgufFile*> files = {this};
    for (const auto& f : splits_) files.push_back(f.get());
    const uint64_t total = total_size();
    uint64_t done = 0;
    constexpr size_t kChunk = size_t{64} << 20;  // a multiple of every page size
    for (const GgufFile* f : files) {
        if (!f->mapped_) continue;
        for (size_t off = 0; off < f->size_; off += kChunk) {
            const size_t n = std::min(kChunk, f->size_ - off);
            int rc, tries = 0;
            while ((rc = madvise(const_cast<uint8_t*>(f->base_) + off, n, MADV_POPULATE_READ)) != 0 &&
                   (errno == EINTR || errno == EAGAIN) && ++tries < 100) {
            }
            if (rc != 0) {
                // A kernel without it, or no memory to spare: the pages come in on first use instead.
                if (errno == EINVAL || errno == ENOSYS || errno == ENOMEM || errno == EINTR || errno == EAGAIN)
                    return Status();
                // EFAULT (past the end of a file cut short), EIO, EHWPOISON: the data is not there.
                return MM_ERROR("%s: cannot read bytes %zu..%zu of the model file: %s", f->path_.c_str(), off, off + n,
                                std::strerror(errno));
            }
            done += n;
            if (progress) progress(done, total);
        }
    }
#else
    (void)progress;
#endif
    return Status();
}

// llama.cpp's naming (llama_split_path): PREFIX-%05d-of-%05d.gguf, numbered from 1.
Status GgufFile::open_splits() {
    int64_t no, count;
    MM_RETURN_IF_ERROR(split_keys(*this, &no, &count));
    if (count == 1) return Status();
    if (no != 0)
        return MM_ERROR("%s: this is file %lld of a model split in %lld; open the first one (…-00001-of-%05lld.gguf)",
                        path_.c_str(), static_cast<long long>(no + 1), static_cast<long long>(count),
                        static_cast<long long>(count));
    const std::string tail = str_printf("-%05d-of-%05d.gguf", 1, static_cast<int>(count));
    if (path_.size() <= tail.size() || path_.compare(path_.size() - tail.size(), tail.size(), tail) != 0)
        return MM_ERROR("%s: the first of %lld split files must be named PREFIX%s (as llama.cpp's gguf-split "
                        "names them), so that the others can be found",
                        path_.c_str(), static_cast<long long>(count), tail.c_str());
    const std::string prefix = path_.substr(0, path_.size() - tail.size());
    for (int64_t i = 1; i < count; ++i) {
        const std::string p = prefix + str_printf("-%05d-of-%05d.gguf", static_cast<int>(i + 1), static_cast<int>(count));
        auto part = open_one(p);
        if (!part.ok())
            return MM_ERROR("%s: split file %lld of %lld: %s", path_.c_str(), static_cast<long long>(i + 1),
                            static_cast<long long>(count), part.status().message().c_str());
        std::unique_ptr<GgufFile> f = std::move(part).value();
        int64_t f_no, f_count;
        MM_RETURN_IF_ERROR(split_keys(*f, &f_no, &f_count));
        if (f_no != i || f_count != count)
            return MM_ERROR("%s: split.no %lld of split.count %lld, expected %lld of %lld (a file of another split?)",
                            p.c_str(), static_cast<long long>(f_no), static_cast<long long>(f_count),
                            static_cast<long long>(i), static_cast<long long>(count));
        for (GgufTensor t : f->tensors_) {
            if (tensor_index_.count(t.name))
                return MM_ERROR("%s: tensor '%s' is also in an earlier split file", p.c_str(), t.name.c_str());
            t.split = static_cast<uint32_t>(i);
            tensor_index_[t.name] = tensors_.size();
            tensors_.push_back(std::move(t));
        }
        splits_.push_back(std::move(f));
    }
    if (has("split.tensors.count")) {
        MM_ASSIGN_OR_RETURN(int64_t want, get_int("split.tensors.count"));
        if (want != static_cast<int64_t>(tensors_.size()))
            return MM_ERROR("%s: split.tensors.count says %lld tensors, the %lld files hold %zu", path_.c_str(),
                            static_cast<long long>(want), static_cast<long long>(count), tensors_.size());
    }
    return Status();
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::open_one(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return MM_ERROR("%s: cannot open: %s", path.c_str(), std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        return MM_ERROR("%s: cannot stat: %s", path.c_str(), std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        return MM_ERROR("%s: not a regular file", path.c_str());
    }
    std::unique_ptr<GgufFile> f(new GgufFile());
    f->path_ = path;
    f->size_ = static_cast<size_t>(st.st_size);
    if (f->size_ > 0) {
        void* p = mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            ::close(fd);
            return MM_ERROR("%s: mmap failed: %s", path.c_str(), std::strerror(e));
        }
        f->base_ = static_cast<const uint8_t*>(p);
        f->mapped_ = true;
    }
    ::close(fd);
    MM_RETURN_IF_ERROR(f->parse());
    return f;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::from_memory(const uint8_t* data, size_t size, const std::string& name) {
    std::unique_ptr<GgufFile> f(new GgufFile());
    f->path_ = name;
    f->base_ = data;
    f->size_ = size;
    MM_RETURN_IF_ERROR(f->parse());
    return f;
}

Status GgufFile::parse() {
    static const uint8_t kEmpty[1] = {0};
    Reader r(base_ ? base_ : kEmpty, base_ ? size_ : 0, path_);
    uint32_t magic = 0;
    if (size_ < 4) return r.fail(0, str_printf("file is %zu bytes, too small to be GGUF", size_));
    MM_RETURN_IF_ERROR(r.read(&magic, "magic"));
    if (magic != kMagic) {
        return r.fail(0, str_printf("bad magic %02x %02x %02x %02x (expected 'GGUF'); not a GGUF file", base_[0],
                                    base_[1], base_[2], base_[3]));
    }
    MM_RETURN_IF_ERROR(r.read(&version_, "version"));
    if (version_ == 1) return r.fail(4, "GGUF version 1 is not supported (re-convert the model; v2 and v3 are)");
    if (version_ != 2 && version_ != 3)
        return r.fail(4, str_printf("unsupported GGUF version %u (supported: 2, 3)", version_));
    uint64_t n_tensors = 0, n_kv = 0;
    MM_RETURN_IF_ERROR(r.read(&n_tensors, "tensor count"));
    MM_RETURN_IF_ERROR(r.read(&n_kv, "metadata count"));
    // A key-value pair takes at least 8+0+4+1 bytes; a tensor info at least 8+4+8+4+8.
    if (n_kv > r.remaining() / 13)
        return r.fail(16, str_printf("metadata count %llu cannot fit in a file of %zu bytes",
                                     static_cast<unsigned long long>(n_kv), size_));
    if (n_tensors > r.remaining() / 32)
        return r.fail(8, str_printf("tensor count %llu cannot fit in a file of %zu bytes",
                                    static_cast<unsigned long long>(n_tensors), size_));

    kv_.reserve(n_kv);
    for (uint64_t i = 0; i < n_kv; ++i) {
        size_t at = r.pos();
        std::string key;
        MM_RETURN_IF_ERROR(r.read_string(&key, "metadata key"));
        if (kv_index_.count(key)) return r.fail(at, "duplicate metadata key '" + key + "'");
        uint32_t t = 0;
        size_t tat = r.pos();
        MM_RETURN_IF_ERROR(r.read(&t, key.c_str()));
        if (t > static_cast<uint32_t>(GgufType::FLOAT64))
            return r.fail(tat, str_printf("key '%s': unknown value type %u", key.c_str(), t));
        GgufValue v;
        MM_RETURN_IF_ERROR(read_value(r, static_cast<GgufType>(t), &v, key));
        kv_index_[key] = kv_.size();
        kv_.emplace_back(std::move(key), std::move(v));
    }

    if (const GgufValue* a = find("general.alignment")) {
        if (!a->is_int() || a->type == GgufType::BOOL || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > (1u << 20))
            return MM_ERROR("%s: general.alignment must be a power-of-two integer, got %s %llu", path_.c_str(),
                            gguf_type_name(a->type), static_cast<unsigned long long>(a->u));
        alignment_ = a->u;
    }

    tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
        size_t at = r.pos();
        GgufTensor t;
        MM_RETURN_IF_ERROR(r.read_string(&t.name, "tensor name"));
        if (tensor_index_.count(t.name)) return r.fail(at, "duplicate tensor name '" + t.name + "'");
        uint32_t n_dims = 0;
        size_t dat = r.pos();
        MM_RETURN_IF_ERROR(r.read(&n_dims, "tensor dimension count"));
        if (n_dims == 0 || n_dims > kMaxDims)
            return r.fail(dat, str_printf("tensor '%s': %u dimensions (must be 1..%d)", t.name.c_str(), n_dims, kMaxDims));
        t.n_dims = static_cast<int>(n_dims);
        int64_t total = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            uint64_t ne = 0;
            size_t nat = r.pos();
            MM_RETURN_IF_ERROR(r.read(&ne, "tensor shape"));
            if (ne == 0 || ne > (1ull << 40))
                return r.fail(nat, str_printf("tensor '%s': dimension %u has size %llu", t.name.c_str(), d,
                                              static_cast<unsigned long long>(ne)));
            t.ne[d] = static_cast<int64_t>(ne);
            if (total > (int64_t(1) << 50) / t.ne[d])
                return r.fail(nat, str_printf("tensor '%s': element count overflows", t.name.c_str()));
            total *= t.ne[d];
        }
        uint32_t type = 0;
        size_t tat = r.pos();
        MM_RETURN_IF_ERROR(r.read(&type, "tensor type"));
        if (!ggml_type_known(type))
            return r.fail(tat, str_printf("tensor '%s': unknown tensor type %u", t.name.c_str(), type));
        t.type = static_cast<GgmlType>(type);
        const GgmlTypeInfo& info = ggml_type_info(t.type);
        if (t.ne[0] % info.block_size != 0)
            return r.fail(tat, str_printf("tensor '%s': row length %lld is not a multiple of the %s block size %lld",
                                          t.name.c_str(), static_cast<long long>(t.ne[0]), info.name,
                                          static_cast<long long>(info.block_size)));
        size_t oat = r.pos();
        MM_RETURN_IF_ERROR(r.read(&t.offset, "tensor offset"));
        if (t.offset % alignment_ != 0)
            return r.fail(oat, str_printf("tensor '%s': data offset %llu is not a multiple of the alignment %zu",
                                          t.name.c_str(), static_cast<unsigned long long>(t.offset), alignment_));
        t.nbytes = ggml_row_bytes(t.type, t.ne[0]) * static_cast<size_t>(total / t.ne[0]);
        tensor_index_[t.name] = tensors_.size();
        tensors_.push_back(std::move(t));
    }

    size_t header_end = r.pos();
    data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
    if (!tensors_.empty() && data_offset_ > size_)
        return MM_ERROR("%s: byte offset %zu: data section starts past the end of the file (%zu bytes)", path_.c_str(),
                        data_offset_, size_);
    for (auto& t : tensors_) {
        if (t.offset > size_ - std::min(size_, data_offset_) || t.nbytes > size_ - data_offset_ - t.offset) {
            return MM_ERROR("%s: tensor '%s' (%s %s, %zu bytes at data offset %llu, file offset %llu) extends past the "
                            "end of the file (%zu bytes): the file is truncated or corrupt",
                            path_.c_str(), t.name.c_str(), ggml_type_name(t.type), t.shape_str().c_str(), t.nbytes,
                            static_cast<unsigned long long>(t.offset),
                            static_cast<unsigned long long>(data_offset_ + t.offset), size_);
        }
        t.data = base_ + data_offset_ + t.offset;
    }
    return Status();
}

const GgufValue* GgufFile::find(const std::string& key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensor* GgufFile::tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<int64_t> GgufFile::get_int(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v) return MM_ERROR("%s: missing required metadata key '%s'", path_.c_str(), key.c_str());
    if (!v->is_int() || v->type == GgufType::BOOL)
        return MM_ERROR("%s: metadata key '%s' should be an integer, found %s", path_.c_str(), key.c_str(),
                        gguf_type_name(v->type));
    return v->i;
}

StatusOr<double> GgufFile::get_float(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v) return MM_ERROR("%s: missing required metadata key '%s'", path_.c_str(), key.c_str());
    if (v->is_float()) return v->f;
    if (v->is_int() && v->type != GgufType::BOOL) return static_cast<double>(v->i);
    return MM_ERROR("%s: metadata key '%s' should be a number, found %s", path_.c_str(), key.c_str(),
                    gguf_type_name(v->type));
}

StatusOr<std::string> GgufFile::get_string(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v) return MM_ERROR("%s: missing required metadata key '%s'", path_.c_str(), key.c_str());
    if (v->type != GgufType::STRING)
        return MM_ERROR("%s: metadata key '%s' should be a string, found %s", path_.c_str(), key.c_str(),
                        gguf_type_name(v->type));
    return v->str;
}

StatusOr<bool> GgufFile::get_bool(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v) return MM_ERROR("%s: missing required metadata key '%s'", path_.c_str(), key.c_str());
    if (v->type != GgufType::BOOL)
        return MM_ERROR("%s: metadata key '%s' should be a bool, found %s", path_.c_str(), key.c_str(),
                        gguf_type_name(v->type));
    return v->b;
}

int64_t GgufFile::get_int_or(const std::string& key, int64_t def) const {
    const GgufValue* v = find(key);
    return v && v->is_int() ? v->i : def;
}
double GgufFile::get_float_or(const std::string& key, double def) const {
    const GgufValue* v = find(key);
    if (!v) return def;
    if (v->is_float()) return v->f;
    if (v->is_int()) return static_cast<double>(v->i);
    return def;
}
std::string GgufFile::get_string_or(const std::string& key, const std::string& def) const {
    const GgufValue* v = find(key);
    return v && v->type == GgufType::STRING ? v->str : def;
}
bool GgufFile::get_bool_or(const std::string& key, bool def) const {
    const GgufValue* v = find(key);
    return v && v->type == GgufType::BOOL ? v->b : def;
}

namespace {
struct Fnv64 {
    uint64_t h = 0xcbf29ce484222325ull;
    void bytes(const void* p, size_t n) {
        const auto* b = static_cast<const uint8_t*>(p);
        for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
    }
    template <class T>
    void pod(const T& v) { bytes(&v, sizeof(T)); }
    void str(const std::string& s) {
        pod<uint64_t>(s.size());
        bytes(s.data(), s.size());
    }
};
}  // namespace

std::string GgufFile::fingerprint() const {
    Fnv64 f;
    f.pod(version_);
    for (const auto& [k, v] : kv_) {
        f.str(k);
        f.pod(static_cast<uint32_t>(v.type));
        f.pod(v.i);
        f.pod(v.f);
        f.str(v.str);
        f.pod(static_cast<uint32_t>(v.arr_type));
        f.pod(v.arr_count);
        for (const auto& s : v.arr_str) f.str(s);
        for (int64_t x : v.arr_i) f.pod(x);
        for (double x : v.arr_f) f.pod(x);
    }
    for (const auto& t : tensors_) {
        f.str(t.name);
        f.pod(t.split);
        f.pod(static_cast<uint32_t>(t.type));
        for (int64_t n : t.ne) f.pod(n);
        f.pod(t.offset);
        // A sample of the weights too, so files of the same shapes but other weights differ.
        const size_t n = std::min<size_t>(t.nbytes, 4096);
        if (t.data && n) {
            f.bytes(t.data, n);
            f.bytes(t.data + t.nbytes - n, n);
        }
    }
    return str_printf("%016llx", static_cast<unsigned long long>(f.h));
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {
template <class T>
void put(std::vector<uint8_t>& b, T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
}
void put_str(std::vector<uint8_t>& b, const std::string& s) {
    put<uint64_t>(b, s.size());
    b.insert(b.end(), s.begin(), s.end());
}
void put_key(std::vector<uint8_t>& b, const std::string& key, GgufType t) {
    put_str(b, key);
    put<uint32_t>(b, static_cast<uint32_t>(t));
}
}  // namespace

void GgufWriter::set_u16(const std::string& k, uint16_t v) { put_key(kv_bytes_, k, GgufType::UINT16); put(kv_bytes_, v); ++n_kv_; }
void GgufWriter::set_u32(const std::string& k, uint32_t v) { put_key(kv_bytes_, k, GgufType::UINT32); put(kv_bytes_, v); ++n_kv_; }
void GgufWriter::set_i32(const std::string& k, int32_t v) { put_key(kv_bytes_, k, GgufType::INT32); put(kv_bytes_, v); ++n_kv_; }
void GgufWriter::set_u64(const std::string& k, uint64_t v) { put_key(kv_bytes_, k, GgufType::UINT64); put(kv_bytes_, v); ++n_kv_; }
void GgufWriter::set_f32(const std::string& k, float v) { put_key(kv_bytes_, k, GgufType::FLOAT32); put(kv_bytes_, v); ++n_kv_; }
void GgufWriter::set_bool(const std::string& k, bool v) { put_key(kv_bytes_, k, GgufType::BOOL); put<uint8_t>(kv_bytes_, v ? 1 : 0); ++n_kv_; }
void GgufWriter::set_string(const std::string& k, const std::string& v) { put_key(kv_bytes_, k, GgufType::STRING); put_str(kv_bytes_, v); ++n_kv_; }

namespace {
// One scalar of type t from GgufValue's integer (i; bools and unsigned types included) or float field.
void put_scalar(std::vector<uint8_t>& b, GgufType t, int64_t i, double f) {
    switch (t) {
        case GgufType::UINT8: put(b, static_cast<uint8_t>(i)); break;
        case GgufType::INT8: put(b, static_cast<int8_t>(i)); break;
        case GgufType::UINT16: put(b, static_cast<uint16_t>(i)); break;
        case GgufType::INT16: put(b, static_cast<int16_t>(i)); break;
        case GgufType::UINT32: put(b, static_cast<uint32_t>(i)); break;
        case GgufType::INT32: put(b, static_cast<int32_t>(i)); break;
        case GgufType::UINT64: put(b, static_cast<uint64_t>(i)); break;
        case GgufType::INT64: put(b, i); break;
        case GgufType::FLOAT32: put(b, static_cast<float>(f)); break;
        case GgufType::FLOAT64: put(b, f); break;
        case GgufType::BOOL: put<uint8_t>(b, i != 0 ? 1 : 0); break;
        default: MM_CHECK(false && "put_scalar: not a scalar type");
    }
}
}  // namespace

void GgufWriter::set_value(const std::string& k, const GgufValue& v) {
    put_key(kv_bytes_, k, v.type);
    if (v.type == GgufType::STRING) {
        put_str(kv_bytes_, v.str);
    } else if (v.type == GgufType::ARRAY) {
        put<uint32_t>(kv_bytes_, static_cast<uint32_t>(v.arr_type));
        put<uint64_t>(kv_bytes_, v.arr_count);
        for (uint64_t j = 0; j < v.arr_count; ++j) {
            if (v.arr_type == GgufType::STRING) put_str(kv_bytes_, v.arr_str[j]);
            else if (v.arr_type == GgufType::FLOAT32 || v.arr_type == GgufType::FLOAT64) put_scalar(kv_bytes_, v.arr_type, 0, v.arr_f[j]);
            else put_scalar(kv_bytes_, v.arr_type, v.arr_i[j], 0);
        }
    } else {
        put_scalar(kv_bytes_, v.type, v.i, v.f);
    }
    ++n_kv_;
}

void GgufWriter::set_arr_string(const std::string& k, const std::vector<std::string>& v) {
    put_key(kv_bytes_, k, GgufType::ARRAY);
    put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::STRING));
    put<uint64_t>(kv_bytes_, v.size());
    for (const auto& s : v) put_str(kv_bytes_, s);
    ++n_kv_;
}
void GgufWriter::set_arr_i32(const std::string& k, const std::vector<int32_t>& v) {
    put_key(kv_bytes_, k, GgufType::ARRAY);
    put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::INT32));
    put<uint64_t>(kv_bytes_, v.size());
    for (int32_t x : v) put(kv_bytes_, x);
    ++n_kv_;
}
void GgufWriter::set_arr_f32(const std::string& k, const std::vector<float>& v) {
    put_key(kv_bytes_, k, GgufType::ARRAY);
    put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::FLOAT32));
    put<uint64_t>(kv_bytes_, v.size());
    for (float x : v) put(kv_bytes_, x);
    ++n_kv_;
}
void GgufWriter::set_arr_bool(const std::string& k, const std::vector<bool>& v) {
    put_key(kv_bytes_, k, GgufType::ARRAY);
    put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::BOOL));
    put<uint64_t>(kv_bytes_, v.size());
    for (bool x : v) put<uint8_t>(kv_bytes_, x ? 1 : 0);
    ++n_kv_;
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& ne,
                            std::vector<uint8_t> data) {
    MM_CHECK(!ne.empty() && ne.size() <= 4);
    int64_t rows = 1;
    for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
    MM_CHECK(data.size() == ggml_row_bytes(type, ne[0]) * static_cast<size_t>(rows));
    tensors_.push_back(Tensor{name, type, ne, std::move(data)});
}

std::vector<uint8_t> GgufWriter::header_bytes() const {
    std::vector<uint8_t> head;
    put<uint32_t>(head, kMagic);
    put<uint32_t>(head, 3);
    put<uint64_t>(head, tensors_.size());
    put<uint64_t>(head, n_kv_ + (alignment_ != 32 ? 1 : 0));
    head.insert(head.end(), kv_bytes_.begin(), kv_bytes_.end());
    if (alignment_ != 32) {
        put_key(head, "general.alignment", GgufType::UINT32);
        put<uint32_t>(head, alignment_);
    }
    uint64_t off = 0;
    for (const auto& t : tensors_) {
        put_str(head, t.name);
        put<uint32_t>(head, static_cast<uint32_t>(t.ne.size()));
        for (int64_t n : t.ne) put<uint64_t>(head, static_cast<uint64_t>(n));
        put<uint32_t>(head, static_cast<uint32_t>(t.type));
        put<uint64_t>(head, off);
        off += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
    }
    head.resize((head.size() + alignment_ - 1) / alignment_ * alignment_, 0);
    return head;
}

std::vector<uint8_t> GgufWriter::serialize() const {
    std::vector<uint8_t> b = header_bytes();
    for (const auto& t : tensors_) {
        b.insert(b.end(), t.data.begin(), t.data.end());
        b.resize((b.size() + alignment_ - 1) / alignment_ * alignment_, 0);
    }
    return b;
}

Status GgufWriter::write(const std::string& path) const {
    // Streams tensor data instead of calling serialize(), so a multi-GB model is not held twice.
    std::string tmp = path + ".partial";
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return MM_ERROR("%s: cannot open for writing: %s", tmp.c_str(), std::strerror(errno));
    std::vector<uint8_t> head = header_bytes();
    f.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    static const char kZeros[4096] = {0};
    for (const auto& t : tensors_) {
        f.write(reinterpret_cast<const char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
        size_t pad = (alignment_ - t.data.size() % alignment_) % alignment_;
        f.write(kZeros, static_cast<std::streamsize>(pad));
    }
    f.close();
    if (!f) return MM_ERROR("%s: write failed: %s", tmp.c_str(), std::strerror(errno));
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
        return MM_ERROR("%s: cannot rename to %s: %s", tmp.c_str(), path.c_str(), std::strerror(errno));
    return Status();
}

}  // namespace moemesh
