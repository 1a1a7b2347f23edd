#include "worker/shard_store.h"

#include "worker/expert_executor.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/weights.h"

namespace moemesh {

namespace {
constexpr size_t kAlign = 64;
constexpr uint64_t kChunk = 8ull << 20;  // pread size: the progress counter moves at least this often

uint64_t align_up(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

StatusOr<ShardSpec> normalize_shard(const ShardSpec& shard, const ModelConfig& c) {
    if (static_cast<int64_t>(shard.size()) > c.n_layer)
        return MM_ERROR("shard names layer %zu, the model has %lld layers (0-%lld)", shard.size() - 1,
                        static_cast<long long>(c.n_layer), static_cast<long long>(c.n_layer - 1));
    ShardSpec out(static_cast<size_t>(c.n_layer));
    for (size_t l = 0; l < shard.size(); ++l) {
        for (int e : shard[l]) {
            if (e < 0 || e >= c.n_expert)
                return MM_ERROR("shard names expert %d in layer %zu, the model has %lld experts per layer (0-%lld)", e,
                                l, static_cast<long long>(c.n_expert), static_cast<long long>(c.n_expert - 1));
        }
        out[l] = shard[l];
        std::sort(out[l].begin(), out[l].end());
        out[l].erase(std::unique(out[l].begin(), out[l].end()), out[l].end());
    }
    return out;
}

std::string shard_summary(const ShardSpec& shard) {
    size_t n = 0, layers = 0;
    std::string detail;
    for (size_t l = 0; l < shard.size(); ++l) {
        const auto& ids = shard[l];
        if (ids.empty()) continue;
        n += ids.size();
        ++layers;
        if (detail.size() > 200) continue;  // keep log lines short on big models
        detail += (detail.empty() ? "" : ", ") + std::to_string(l) + ": ";
        for (size_t i = 0; i < ids.size();) {
            size_t j = i;
            while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
            if (i) detail += ",";
            detail += std::to_string(ids[i]);
            if (j > i) detail += "-" + std::to_string(ids[j]);
            i = j + 1;
        }
    }
    if (detail.size() > 200) detail += ", ...";
    return str_printf("%zu experts in %zu layers", n, layers) + (detail.empty() ? "" : " (" + detail + ")");
}

ShardStore::~ShardStore() {
    if (buffer_) munmap(buffer_, buffer_size_);
}

StatusOr<std::unique_ptr<ShardStore>> ShardStore::plan(const GgufFile& f, const ModelConfig& c,
                                                       const ShardSpec& shard) {
    MM_ASSIGN_OR_RETURN(ShardSpec spec, normalize_shard(shard, c));
    std::unique_ptr<ShardStore> s(new ShardStore());
    s->path_ = f.path();
    for (uint32_t i = 0; i < f.split_count(); ++i) s->paths_.push_back(f.split_path(i));
    s->shard_ = std::move(spec);
    const int64_t E = c.n_expert;
    // Offsets of each expert's matrices in the buffer, filled in once the buffer exists.
    struct Dst {
        int layer, expert;
        uint64_t gate, up, down;
    };
    std::vector<Dst> dsts;
    uint64_t pos = 0;
    for (int il = 0; il < c.n_layer; ++il) {
        MM_ASSIGN_OR_RETURN(LayerExpertWeights lw, layer_expert_weights(f, c, il));
        const Weight &gate = lw.gate, &up = lw.up, &down = lw.down;
        s->tables_.push_back(empty_expert_table(lw, E));
        for (int e : s->shard_[il]) {
            Dst d{il, e, 0, 0, 0};
            uint64_t* dst[3] = {&d.gate, &d.up, &d.down};
            const Weight* w[3] = {&gate, &up, &down};
            for (int m = 0; m < 3; ++m) {
                Range r;
                r.tensor = w[m]->tensor->name;
                r.file_offset = f.file_offset(*w[m]->tensor, w[m]->matrix(e));
                r.split = w[m]->tensor->split;
                r.size = w[m]->matrix_bytes;
                r.dst = pos;
                *dst[m] = pos;
                pos = align_up(pos + r.size);
                s->total_bytes_ += r.size;
                s->ranges_.push_back(std::move(r));
            }
            dsts.push_back(d);
        }
    }
    // Merge ranges adjacent in both the file and the buffer (consecutive experts whose sizes are
    // multiples of 64) so that big shards read in long sequential preads.
    std::vector<Range> merged;
    for (Range& r : s->ranges_) {
        if (!merged.empty() && merged.back().tensor == r.tensor && merged.back().split == r.split &&
            merged.back().file_offset + merged.back().size == r.file_offset &&
            merged.back().dst + merged.back().size == r.dst) {
            merged.back().size += r.size;
        } else {
            merged.push_back(std::move(r));
        }
    }
    s->ranges_ = std::move(merged);
    if (pos > 0) {
        // An anonymous mapping costs nothing resident until load() writes it.
        void* p = mmap(nullptr, pos, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return MM_ERROR("%s: cannot allocate %llu bytes for the shard (%s): %s", f.path().c_str(),
                            static_cast<unsigned long long>(pos), shard_summary(s->shard_).c_str(),
                            std::strerror(errno));
        s->buffer_ = static_cast<uint8_t*>(p);
        s->buffer_size_ = pos;
    }
    for (const Dst& d : dsts) {
        s->tables_[d.layer].experts[d.expert] =
            ExpertSlice{s->buffer_ + d.gate, s->buffer_ + d.up, s->buffer_ + d.down};
    }
    return s;
}

Status ShardStore::load() {
    if (loaded()) return Status();
    loaded_bytes_.store(0);
    std::vector<int> fds;
    for (const std::string& p : paths_) {
        const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            const int e = errno;
            for (int f : fds) ::close(f);
            return MM_ERROR("%s: cannot open for reading the shard: %s", p.c_str(), std::strerror(e));
        }
        fds.push_back(fd);
    }
    Status st;
    for (const Range& r : ranges_) {
        const int fd = fds[r.split];
        const std::string& path = paths_[r.split];
        uint64_t done = 0;
        while (done < r.size) {
            if (cancelled_.load()) {
                st = MM_ERROR("%s: shard load cancelled", path_.c_str());
                break;
            }
            const size_t want = static_cast<size_t>(std::min(kChunk, r.size - done));
            const ssize_t n = ::pread(fd, buffer_ + r.dst + done, want, static_cast<off_t>(r.file_offset + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                const unsigned long long b = r.file_offset, e = r.file_offset + r.size,
                                         at = r.file_offset + done;
                st = n == 0 ? MM_ERROR("%s: tensor '%s' bytes [%llu, %llu): file ends at byte %llu (truncated after "
                                       "it was opened?)",
                                       path.c_str(), r.tensor.c_str(), b, e, at)
                            : MM_ERROR("%s: tensor '%s' bytes [%llu, %llu): read error at byte %llu: %s", path.c_str(),
                                       r.tensor.c_str(), b, e, at, std::strerror(errno));
                break;
            }
            done += static_cast<uint64_t>(n);
            loaded_bytes_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
        }
        if (!st.ok()) break;
    }
    for (int fd : fds) ::close(fd);
    if (st.ok()) loaded_.store(true, std::memory_order_release);
    return st;
}

}  // namespace moemesh
