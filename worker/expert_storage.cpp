#include "worker/expert_storage.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>

#ifdef MOEMESH_HAVE_IO_URING
#include <liburing.h>
#endif

#include "common/weights.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kAlign = 64;
uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }
uint64_t ns_since(Clock::time_point t) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
}

#ifdef MOEMESH_HAVE_IO_URING
// SQEs per ring: a batch's matrices beyond this wait for completions (CQ ring: twice as many).
constexpr unsigned kRingDepth = 64;
#endif

}  // namespace

StatusOr<StorageMode> parse_storage_mode(const std::string& s) {
    if (s == "auto") return StorageMode::kAuto;
    if (s == "pread") return StorageMode::kPread;
    if (s == "io_uring") return StorageMode::kIoUring;
    return MM_ERROR("unknown storage read mode '%s' (expected auto, pread or io_uring)", s.c_str());
}

const char* storage_mode_name(StorageMode m) {
    return m == StorageMode::kAuto ? "auto" : m == StorageMode::kPread ? "pread" : "io_uring";
}

bool io_uring_usable(std::string* why) {
#ifdef MOEMESH_HAVE_IO_URING
    io_uring ring;
    const int r = io_uring_queue_init(4, &ring, 0);
    if (r < 0) {
        if (why) *why = str_printf("io_uring_queue_init failed: %s (blocked by a seccomp profile or by "
                                   "/proc/sys/kernel/io_uring_disabled?)", std::strerror(-r));
        return false;
    }
    io_uring_queue_exit(&ring);
    return true;
#else
    if (why) *why = "this build has no io_uring (liburing-dev was not found at configure time)";
    return false;
#endif
}

void ExpertReader::read_experts(const std::vector<ExpertRead>& reads, std::vector<Status>* out, const ReadDone& done) {
    out->assign(reads.size(), Status());
    for (size_t i = 0; i < reads.size(); ++i) {
        (*out)[i] = read_expert(reads[i].layer, reads[i].expert, reads[i].dst);
        if (done) done(i);
    }
}

// ---- the file --------------------------------------------------------------------------------

struct FileExpertReader::Ring {
#ifdef MOEMESH_HAVE_IO_URING
    io_uring ring;
    bool live = false;  // initialised
    ~Ring() {
        if (live) io_uring_queue_exit(&ring);
    }
#endif
};

StatusOr<std::unique_ptr<FileExpertReader>> FileExpertReader::open(const GgufFile& f, const ModelConfig& c,
                                                                   StorageMode mode) {
    std::unique_ptr<FileExpertReader> r(new FileExpertReader());
    r->path_ = f.path();
    for (int il = 0; il < c.n_layer; ++il) {
        MM_ASSIGN_OR_RETURN(LayerExpertWeights w, layer_expert_weights(f, c, il));
        ExpertLayout lay;
        lay.gate_bytes = w.gate.matrix_bytes;
        lay.up_bytes = w.up.matrix_bytes;
        lay.down_bytes = w.down.matrix_bytes;
        lay.up_off = align_up(lay.gate_bytes, kAlign);
        lay.down_off = align_up(lay.up_off + lay.up_bytes, kAlign);
        lay.size = align_up(lay.down_off + lay.down_bytes, kAlign);
        r->layouts_.push_back(lay);
        r->types_.push_back({w.gate.type, w.up.type, w.down.type});
        for (const Weight* m : {&w.gate, &w.up, &w.down})
            r->matrices_.push_back(
                {m->tensor->name, f.file_offset(*m->tensor, m->data), m->expert_stride, m->matrix_bytes,
                 m->tensor->split});
    }
    for (uint32_t i = 0; i < f.split_count(); ++i) {
        r->paths_.push_back(f.split_path(i));
        const int fd = ::open(r->paths_.back().c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return MM_ERROR("%s: cannot open for reading experts: %s", r->paths_.back().c_str(), std::strerror(errno));
        r->fds_.push_back(fd);
    }
    if (mode != StorageMode::kPread) {
        std::string why;
        if (io_uring_usable(&why)) {
            r->mode_ = StorageMode::kIoUring;
            std::unique_ptr<Ring> ring = r->take_ring();  // the first ring, made now so a failure shows at start
            if (!ring) {
                why = "cannot create a ring";
                r->mode_ = StorageMode::kPread;
            } else {
                r->give_ring(std::move(ring));
            }
        }
        if (r->mode_ != StorageMode::kIoUring) {
            if (mode == StorageMode::kIoUring)
                return MM_ERROR("%s: storage read mode io_uring: %s", r->path_.c_str(), why.c_str());
            static std::atomic<bool> logged{false};
            if (!logged.exchange(true))
                std::fprintf(stderr, "cache: io_uring not usable (%s); reading experts with pread\n", why.c_str());
        }
    }
    return r;
}

FileExpertReader::~FileExpertReader() {
    rings_.clear();
    for (int fd : fds_) ::close(fd);
}

void FileExpertReader::reset_counters() {
    reads_ = 0;
    bytes_ = 0;
    errors_ = 0;
    ns_ = 0;
}

// err: 0 for end of file, else an errno.
Status FileExpertReader::read_error(int layer, int m, int expert, uint64_t done, int err) const {
    const Matrix& mx = matrices_[static_cast<size_t>(layer) * 3 + m];
    const uint64_t begin = mx.offset + static_cast<uint64_t>(expert) * mx.stride;
    const unsigned long long b = begin, e = begin + mx.size, at = begin + done;
    return err == 0 ? MM_ERROR("%s: tensor '%s' (expert %d) bytes [%llu, %llu): file ends at byte %llu "
                               "(truncated after it was opened?)",
                               paths_[mx.split].c_str(), mx.tensor.c_str(), expert, b, e, at)
                    : MM_ERROR("%s: tensor '%s' (expert %d) bytes [%llu, %llu): read error at byte %llu: %s",
                               paths_[mx.split].c_str(), mx.tensor.c_str(), expert, b, e, at, std::strerror(err));
}

Status FileExpertReader::pread_expert(int layer, int expert, uint8_t* dst) {
    const ExpertLayout& lay = layouts_[layer];
    const uint64_t dst_off[3] = {0, lay.up_off, lay.down_off};
    for (int m = 0; m < 3; ++m) {
        const Matrix& mx = matrices_[static_cast<size_t>(layer) * 3 + m];
        const uint64_t begin = mx.offset + static_cast<uint64_t>(expert) * mx.stride;
        uint64_t done = 0;
        while (done < mx.size) {
            const ssize_t n =
                ::pread(fds_[mx.split], dst + dst_off[m] + done, mx.size - done, static_cast<off_t>(begin + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                errors_++;
                return read_error(layer, m, expert, done, n == 0 ? 0 : errno);
            }
            done += static_cast<uint64_t>(n);
        }
    }
    reads_++;
    bytes_ += lay.data_bytes();
    return Status();
}

Status FileExpertReader::read_expert(int layer, int expert, uint8_t* dst) {
    if (mode_ == StorageMode::kIoUring) {
        std::vector<Status> out;
        read_experts({ExpertRead{layer, expert, dst, layouts_[layer].size}}, &out);
        return out[0];
    }
    const auto t0 = Clock::now();
    Status st = pread_expert(layer, expert, dst);
    if (st.ok()) ns_ += ns_since(t0);
    return st;
}

void FileExpertReader::read_experts(const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                                    const ReadDone& done) {
    out->assign(reads.size(), Status());
    if (reads.empty()) return;
    const auto t0 = Clock::now();
    std::unique_ptr<Ring> ring = mode_ == StorageMode::kIoUring ? take_ring() : nullptr;
    if (ring) {
        if (uring_read(*ring, reads, out, done)) give_ring(std::move(ring));  // else dropped: the next call makes one
    } else {
        for (size_t i = 0; i < reads.size(); ++i) {
            (*out)[i] = pread_expert(reads[i].layer, reads[i].expert, reads[i].dst);
            if (done) done(i);
        }
    }
    ns_ += ns_since(t0);
}

std::unique_ptr<FileExpertReader::Ring> FileExpertReader::take_ring() {
#ifdef MOEMESH_HAVE_IO_URING
    {
        std::lock_guard<std::mutex> lk(rings_mu_);
        if (!rings_.empty()) {
            std::unique_ptr<Ring> r = std::move(rings_.back());
            rings_.pop_back();
            return r;
        }
    }
    auto r = std::make_unique<Ring>();
    if (io_uring_queue_init(kRingDepth, &r->ring, 0) < 0) {
        // Worked at open(), fails now (e.g. out of locked memory): this call reads with pread.
        static std::atomic<bool> logged{false};
        if (!logged.exchange(true))
            std::fprintf(stderr, "cache: cannot create another io_uring ring; some expert reads use pread\n");
        return nullptr;
    }
    r->live = true;
    return r;
#else
    return nullptr;
#endif
}

void FileExpertReader::give_ring(std::unique_ptr<Ring> r) {
    std::lock_guard<std::mutex> lk(rings_mu_);
    rings_.push_back(std::move(r));
}

// Every matrix of every read is one piece; pieces are submitted up to the ring's depth, and a piece
// that completes short goes back in the queue for its remainder. A failed read stops resubmitting
// its pieces but every submitted SQE is reaped before returning (the kernel writes into dst).
bool FileExpertReader::uring_read(Ring& ring, const std::vector<ExpertRead>& reads, std::vector<Status>* out,
                                  const ReadDone& done) {
#ifdef MOEMESH_HAVE_IO_URING
    struct Piece {
        size_t read;
        int m;
        uint64_t begin, len, done;
        uint8_t* dst;
        int fd;
    };
    std::vector<Piece> pieces;
    pieces.reserve(reads.size() * 3);
    for (size_t i = 0; i < reads.size(); ++i) {
        const ExpertRead& r = reads[i];
        const ExpertLayout& lay = layouts_[r.layer];
        const uint64_t dst_off[3] = {0, lay.up_off, lay.down_off};
        for (int m = 0; m < 3; ++m) {
            const Matrix& mx = matrices_[static_cast<size_t>(r.layer) * 3 + m];
            pieces.push_back({i, m, mx.offset + static_cast<uint64_t>(r.expert) * mx.stride, mx.size, 0,
                              r.dst + dst_off[m], fds_[mx.split]});
        }
    }
    std::deque<size_t> pending;
    for (size_t p = 0; p < pieces.size(); ++p) pending.push_back(p);
    std::vector<uint8_t> failed(reads.size(), 0);
    auto fail = [&](const Piece& p, int err) {
        if (failed[p.read]) return;
        failed[p.read] = 1;
        (*out)[p.read] = read_error(reads[p.read].layer, p.m, reads[p.read].expert, p.done, err);
    };
    // A read is over when none of its three pieces can still change: each read, complete, failed
    // or skipped (its read failed) piece counts once; then `done` hears of it.
    std::vector<int> open(reads.size(), 3);
    std::vector<uint8_t> told(reads.size(), 0);
    auto piece_over = [&](size_t read) {
        if (--open[read] == 0 && done) {
            told[read] = 1;
            done(read);
        }
    };
    unsigned inflight = 0;
    bool broken = false;  // submit failed hard: the rest is read with pread
    while (!pending.empty() || inflight > 0) {
        unsigned prepared = 0;
        while (!broken && !pending.empty() && inflight + prepared < kRingDepth) {
            const size_t idx = pending.front();
            Piece& p = pieces[idx];
            if (failed[p.read]) {
                pending.pop_front();
                piece_over(p.read);
                continue;
            }
            io_uring_sqe* sqe = io_uring_get_sqe(&ring.ring);
            if (!sqe) break;
            pending.pop_front();
            const uint64_t n = std::min<uint64_t>(p.len - p.done, 1u << 30);  // one SQE reads < 2 GiB
            io_uring_prep_read(sqe, p.fd, p.dst + p.done, static_cast<unsigned>(n), p.begin + p.done);
            io_uring_sqe_set_data64(sqe, idx);
            ++prepared;
        }
        if (prepared) {
            int r;
            do r = io_uring_submit(&ring.ring);
            while (r == -EINTR);
            if (r < 0) {
                broken = true;  // nothing was consumed; the prepared SQEs die with the ring
                std::fprintf(stderr, "cache: io_uring submit failed (%s); reading the rest with pread\n",
                             std::strerror(-r));
            } else {
                inflight += static_cast<unsigned>(r);
            }
        }
        if (inflight == 0) {
            if (!broken && prepared == 0 && !pending.empty()) broken = true;  // no SQE to be had: never expected
            if (broken) break;
            continue;
        }
        io_uring_cqe* cqe = nullptr;
        const int w = io_uring_wait_cqe(&ring.ring, &cqe);
        if (w == -EINTR) continue;
        if (w < 0) {
            broken = true;  // cannot reap: fall back (only reached if the ring itself is unusable)
            break;
        }
        const size_t idx = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        const int res = cqe->res;
        io_uring_cqe_seen(&ring.ring, cqe);
        --inflight;
        Piece& p = pieces[idx];
        if (res == -EINTR || res == -EAGAIN) {
            pending.push_front(idx);
        } else if (res < 0) {
            fail(p, -res);
            piece_over(p.read);
        } else if (res == 0) {
            fail(p, 0);
            piece_over(p.read);
        } else {
            p.done += static_cast<uint64_t>(res);
            if (p.done < p.len)
                pending.push_front(idx);  // short read: the remainder next
            else
                piece_over(p.read);
        }
    }
    if (broken) {
        // The kernel may still write into dst if SQEs were left in flight: there is no safe way on.
        MM_CHECK(inflight == 0);
        // Pieces never submitted (or submitted but cut short) finish with pread.
        for (Piece& p : pieces) {
            if (failed[p.read] || p.done == p.len) continue;
            while (p.done < p.len) {
                const ssize_t n = ::pread(p.fd, p.dst + p.done, p.len - p.done, static_cast<off_t>(p.begin + p.done));
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) {
                    fail(p, n == 0 ? 0 : errno);
                    break;
                }
                p.done += static_cast<uint64_t>(n);
            }
        }
    }
    for (size_t i = 0; i < reads.size(); ++i) {
        if (failed[i]) {
            errors_++;
        } else {
            reads_++;
            bytes_ += layouts_[reads[i].layer].data_bytes();
        }
        if (done && !told[i]) done(i);  // finished by the pread fallback
    }
    return !broken;
#else
    (void)ring;
    (void)reads;
    (void)out;
    (void)done;
    return false;
#endif
}

}  // namespace moemesh
