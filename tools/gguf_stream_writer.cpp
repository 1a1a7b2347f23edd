#include "tools/gguf_stream_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace moemesh {

namespace {

template <class T>
void put(std::vector<uint8_t>& b, T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
}


}  // namespace

StatusOr<size_t> gguf_metadata_end(const std::vector<uint8_t>& h) {
    size_t pos = 0;
    auto take = [&](size_t n, const char* what) -> Status {
        if (n > h.size() - pos) return MM_ERROR("GGUF header: %s at byte %zu runs past its end (%zu)", what, pos, h.size());
        pos += n;
        return Status();
    };
    auto u32 = [&](uint32_t* v) { std::memcpy(v, h.data() + pos - 4, 4); };
    auto u64 = [&](uint64_t* v) { std::memcpy(v, h.data() + pos - 8, 8); };
    auto skip_string = [&](const char* what) -> Status {
        MM_RETURN_IF_ERROR(take(8, what));
        uint64_t n;
        u64(&n);
        return take(n, what);
    };
    uint32_t magic = 0, version = 0;
    uint64_t n_tensors = 0, n_kv = 0;
    MM_RETURN_IF_ERROR(take(4, "magic"));
    u32(&magic);
    MM_RETURN_IF_ERROR(take(4, "version"));
    u32(&version);
    MM_RETURN_IF_ERROR(take(8, "tensor count"));
    u64(&n_tensors);
    MM_RETURN_IF_ERROR(take(8, "key count"));
    u64(&n_kv);
    if (magic != 0x46554747 || version != 3 || n_tensors != 0)
        return MM_ERROR("GGUF header: expected a v3 header with no tensors (magic %08x, version %u, %llu tensors)", magic,
                        version, static_cast<unsigned long long>(n_tensors));
    for (uint64_t k = 0; k < n_kv; ++k) {
        MM_RETURN_IF_ERROR(skip_string("key"));
        MM_RETURN_IF_ERROR(take(4, "value type"));
        uint32_t type;
        u32(&type);
        uint64_t count = 1;
        if (static_cast<GgufType>(type) == GgufType::ARRAY) {
            MM_RETURN_IF_ERROR(take(12, "array header"));
            std::memcpy(&type, h.data() + pos - 12, 4);
            u64(&count);
        }
        const GgufType t = static_cast<GgufType>(type);
        if (t == GgufType::STRING) {
            for (uint64_t i = 0; i < count; ++i) MM_RETURN_IF_ERROR(skip_string("string value"));
        } else if (const size_t s = gguf_scalar_size(t); s > 0) {
            if (count > (h.size() - pos) / s) return MM_ERROR("GGUF header: array at byte %zu runs past its end", pos);
            pos += count * s;
        } else {
            return MM_ERROR("GGUF header: value type %u at byte %zu is not a scalar, string or array of them", type, pos);
        }
    }
    return pos;
}

size_t GgufStreamWriter::TensorInfo::nbytes() const {
    int64_t rows = 1;
    for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
    return ggml_row_bytes(type, ne[0]) * static_cast<size_t>(rows);
}

StatusOr<std::unique_ptr<GgufStreamWriter>> GgufStreamWriter::create(const std::string& path, const GgufWriter& meta,
                                                                     uint32_t alignment,
                                                                     std::vector<TensorInfo> tensors) {
    std::unique_ptr<GgufStreamWriter> w(new GgufStreamWriter());
    w->path_ = path;
    w->tmp_ = path + ".partial";
    w->alignment_ = alignment;
    w->tensors_ = std::move(tensors);
    // The header GgufWriter::header_bytes would make with these tensors: its key/value section, the
    // tensor count patched in, then the tensor table (offsets aligned), padded to the alignment.
    std::vector<uint8_t> head = meta.serialize();
    MM_ASSIGN_OR_RETURN(const size_t kv_end, gguf_metadata_end(head));
    head.resize(kv_end);
    const uint64_t n_tensors = w->tensors_.size();
    std::memcpy(head.data() + 8, &n_tensors, 8);
    uint64_t off = 0;
    for (const TensorInfo& t : w->tensors_) {
        if (t.ne.empty() || t.ne.size() > 4) return MM_ERROR("%s: tensor %s has %zu dimensions", path.c_str(), t.name.c_str(), t.ne.size());
        put<uint64_t>(head, t.name.size());
        head.insert(head.end(), t.name.begin(), t.name.end());
        put<uint32_t>(head, static_cast<uint32_t>(t.ne.size()));
        for (int64_t n : t.ne) put<uint64_t>(head, static_cast<uint64_t>(n));
        put<uint32_t>(head, static_cast<uint32_t>(t.type));
        put<uint64_t>(head, off);
        off += (t.nbytes() + alignment - 1) / alignment * alignment;
    }
    head.resize((head.size() + alignment - 1) / alignment * alignment, 0);

    w->fd_ = ::open(w->tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd_ < 0) return MM_ERROR("%s: cannot open for writing: %s", w->tmp_.c_str(), std::strerror(errno));
    MM_RETURN_IF_ERROR(w->write_all(head.data(), head.size()));
    return w;
}

GgufStreamWriter::~GgufStreamWriter() {
    if (pending_.valid()) pending_.wait();
    if (fd_ >= 0) {
        ::close(fd_);
        ::unlink(tmp_.c_str());
    }
}

Status GgufStreamWriter::write_all(const uint8_t* p, size_t n) {
    while (n > 0) {
        const ssize_t r = ::write(fd_, p, std::min<size_t>(n, size_t{1} << 30));
        if (r < 0) {
            if (errno == EINTR) continue;
            return MM_ERROR("%s: write failed after %llu bytes: %s", tmp_.c_str(), static_cast<unsigned long long>(written_),
                            std::strerror(errno));
        }
        p += r;
        n -= static_cast<size_t>(r);
        written_ += static_cast<uint64_t>(r);
    }
    return Status();
}

Status GgufStreamWriter::wait_pending() {
    if (!pending_.valid()) return Status();
    Written w = pending_.get();
    spare_ = std::move(w.buffer);
    spare_.clear();
    return w.status;
}

Status GgufStreamWriter::write_next(std::vector<uint8_t> data) {
    MM_RETURN_IF_ERROR(wait_pending());
    if (next_ >= tensors_.size())
        return MM_ERROR("%s: more tensors written than the %zu in the table", tmp_.c_str(), tensors_.size());
    const TensorInfo& t = tensors_[next_];
    if (data.size() != t.nbytes())
        return MM_ERROR("%s: tensor %s has %zu bytes of data, its type and shape need %zu", tmp_.c_str(), t.name.c_str(),
                        data.size(), t.nbytes());
    ++next_;
    const size_t pad = (alignment_ - data.size() % alignment_) % alignment_;
    pending_ = std::async(std::launch::async, [this, pad, d = std::move(data)]() mutable {
        static const uint8_t kZeros[4096] = {};
        Status st = write_all(d.data(), d.size());
        if (st.ok()) st = write_all(kZeros, pad);
        return Written{std::move(st), std::move(d)};
    });
    return Status();
}

Status GgufStreamWriter::finish() {
    MM_RETURN_IF_ERROR(wait_pending());
    if (next_ != tensors_.size())
        return MM_ERROR("%s: %zu of %zu tensors written", tmp_.c_str(), next_, tensors_.size());
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
        const int err = errno;
        ::unlink(tmp_.c_str());
        return MM_ERROR("%s: close failed: %s", tmp_.c_str(), std::strerror(err));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
        return MM_ERROR("%s: cannot rename to %s: %s", tmp_.c_str(), path_.c_str(), std::strerror(errno));
    return Status();
}

}  // namespace moemesh
