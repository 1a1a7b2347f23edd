#include "coordinator/data_plane.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include "worker/data_plane.h"

#ifdef MOEMESH_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef MOEMESH_HAVE_NCCL
#include "coordinator/nccl_loader.h"
#endif

namespace moemesh {

using Clock = std::chrono::steady_clock;

Status LinkDataPlane::check_rows(int64_t n_rows) const {
    if (n_rows < 0 || n_rows > max_rows_)
        return MM_ERROR("data plane %s: a call of %lld rows, the plane holds %lld", kind(),
                        static_cast<long long>(n_rows), static_cast<long long>(max_rows_));
    return Status();
}

namespace {

// ---- shm: a POSIX shared-memory object created here, mapped by the worker at the handshake ----
class ShmLink final : public LinkDataPlane {
public:
    static StatusOr<std::unique_ptr<LinkDataPlane>> create(int64_t max_rows, int64_t hidden, const std::string& worker) {
        static std::atomic<uint64_t> counter{0};
        const uint64_t bytes = data_plane_region_bytes(max_rows, hidden);
        std::unique_ptr<ShmLink> p(new ShmLink(max_rows, hidden));
        p->name_ = str_printf("/moemesh-%d-%s-%llu", static_cast<int>(getpid()), worker.substr(0, 64).c_str(),
                              static_cast<unsigned long long>(counter++));
        const int fd = shm_open(p->name_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0) return MM_ERROR("data plane shm: cannot create %s: %s", p->name_.c_str(), std::strerror(errno));
        p->linked_ = true;
        if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
            const int e = errno;
            close(fd);
            return MM_ERROR("data plane shm: cannot size %s to %llu bytes: %s", p->name_.c_str(),
                            static_cast<unsigned long long>(bytes), std::strerror(e));
        }
        void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (base == MAP_FAILED)
            return MM_ERROR("data plane shm: cannot map %s: %s", p->name_.c_str(), std::strerror(errno));
        p->base_ = static_cast<float*>(base);
        p->bytes_ = bytes;
        p->offer_.set_kind(v1::DATA_PLANE_SHM);
        p->offer_.set_max_rows(static_cast<uint32_t>(max_rows));
        p->offer_.set_hidden(static_cast<uint32_t>(hidden));
        p->offer_.set_shm_name(p->name_);
        p->offer_.set_region_bytes(bytes);
        return std::unique_ptr<LinkDataPlane>(std::move(p));
    }
    ~ShmLink() override {
        if (base_) munmap(base_, bytes_);
        if (linked_) shm_unlink(name_.c_str());
    }
    const char* kind() const override { return "shm"; }
    Status joined(Clock::time_point) override {
        if (linked_ && shm_unlink(name_.c_str()) != 0)
            return MM_ERROR("data plane shm: cannot unlink %s: %s", name_.c_str(), std::strerror(errno));
        linked_ = false;
        return Status();
    }
    Status put(const float* x, int64_t n_rows, bool on_device) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        if (on_device) return MM_ERROR("data plane shm: device pointers are not supported");
        std::memcpy(base_, x, sizeof(float) * static_cast<size_t>(n_rows * hidden_));
        return Status();
    }
    Status get(float* out, int64_t n_rows, bool on_device, Clock::time_point) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        if (on_device) return MM_ERROR("data plane shm: device pointers are not supported");
        std::memcpy(out, base_ + max_rows_ * hidden_, sizeof(float) * static_cast<size_t>(n_rows * hidden_));
        return Status();
    }

private:
    ShmLink(int64_t rows, int64_t hidden) : LinkDataPlane(rows, hidden) {}
    std::string name_;
    bool linked_ = false;
    float* base_ = nullptr;
    uint64_t bytes_ = 0;
};

#ifdef MOEMESH_HAVE_CUDA
#define DP_CUDA(expr, what)                                                                            \
    do {                                                                                               \
        cudaError_t e_ = (expr);                                                                       \
        if (e_ != cudaSuccess) return MM_ERROR("data plane %s: %s: %s", kind(), what, cudaGetErrorString(e_)); \
    } while (0)

// Waits for the stream until the deadline, without blocking in the driver (a dead peer must
// not hang the coordinator). poll_error: nccl's asynchronous error, or "" while fine.
template <typename F>
Status wait_stream(cudaStream_t s, Clock::time_point deadline, const char* what, F&& poll_error) {
    for (;;) {
        const cudaError_t e = cudaStreamQuery(s);
        if (e == cudaSuccess) return Status();
        if (e != cudaErrorNotReady) return MM_ERROR("%s: %s", what, cudaGetErrorString(e));
        const std::string err = poll_error();
        if (!err.empty()) return MM_ERROR("%s: %s", what, err.c_str());
        if (Clock::now() > deadline) return MM_ERROR("%s: not done by the deadline (is the worker alive?)", what);
        std::this_thread::yield();
    }
}

// ---- cuda-ipc: a device region here, opened by the worker through its IPC handle ----
class CudaIpcLink final : public LinkDataPlane {
public:
    static StatusOr<std::unique_ptr<LinkDataPlane>> create(int64_t max_rows, int64_t hidden, int device, int wdevice) {
        std::unique_ptr<CudaIpcLink> p(new CudaIpcLink(max_rows, hidden, device));
        MM_RETURN_IF_ERROR(p->init(wdevice));
        return std::unique_ptr<LinkDataPlane>(std::move(p));
    }
    ~CudaIpcLink() override {
        cudaSetDevice(device_);
        if (stream_) cudaStreamDestroy(stream_);
        if (base_) cudaFree(base_);
    }
    const char* kind() const override { return "cuda-ipc"; }
    bool takes_device_pointers() const override { return true; }
    Status put(const float* x, int64_t n_rows, bool on_device) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMemcpyAsync(base_, x, sizeof(float) * static_cast<size_t>(n_rows * hidden_),
                                on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, stream_),
                "copying the activations");
        // In place before the call is written: the call is the worker's signal.
        DP_CUDA(cudaStreamSynchronize(stream_), "copying the activations");
        return Status();
    }
    Status get(float* out, int64_t n_rows, bool on_device, Clock::time_point) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMemcpyAsync(out, base_ + max_rows_ * hidden_, sizeof(float) * static_cast<size_t>(n_rows * hidden_),
                                on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost, stream_),
                "copying the partial sums");
        DP_CUDA(cudaStreamSynchronize(stream_), "copying the partial sums");
        return Status();
    }

private:
    CudaIpcLink(int64_t rows, int64_t hidden, int device) : LinkDataPlane(rows, hidden), device_(device) {}
    Status init(int wdevice) {
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        const uint64_t bytes = data_plane_region_bytes(max_rows_, hidden_);
        DP_CUDA(cudaMalloc(reinterpret_cast<void**>(&base_), bytes), "allocating the region");
        DP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        cudaIpcMemHandle_t h;
        DP_CUDA(cudaIpcGetMemHandle(&h, base_), "cudaIpcGetMemHandle");
        offer_.set_kind(v1::DATA_PLANE_CUDA_IPC);
        offer_.set_max_rows(static_cast<uint32_t>(max_rows_));
        offer_.set_hidden(static_cast<uint32_t>(hidden_));
        offer_.set_region_bytes(bytes);
        offer_.set_cuda_ipc_handle(&h, sizeof(h));
        offer_.set_coordinator_device(device_);
        offer_.set_worker_device(wdevice);
        return Status();
    }
    int device_;
    float* base_ = nullptr;
    cudaStream_t stream_ = nullptr;
};
#endif  // MOEMESH_HAVE_CUDA

#if defined(MOEMESH_HAVE_CUDA) && defined(MOEMESH_HAVE_NCCL)
// ---- nccl: rank 0 of a 2-rank communicator with this one worker ----
// One communicator per pair (not one over the whole cluster): a dying worker breaks only its own
// communicator, which is aborted and rebuilt at the reconnect while the others keep serving.
class NcclLink final : public LinkDataPlane {
public:
    static StatusOr<std::unique_ptr<LinkDataPlane>> create(int64_t max_rows, int64_t hidden, int device, int wdevice) {
        std::string why;
        const NcclApi* nccl = nccl_api(&why);
        if (!nccl) return MM_ERROR("transport nccl: %s", why.c_str());
        std::unique_ptr<NcclLink> p(new NcclLink(max_rows, hidden, device, nccl));
        MM_RETURN_IF_ERROR(p->init(wdevice));
        return std::unique_ptr<LinkDataPlane>(std::move(p));
    }
    ~NcclLink() override {
        cudaSetDevice(device_);
        if (comm_) nccl_->CommAbort(comm_);
        if (stream_) cudaStreamDestroy(stream_);
        if (buf_) cudaFree(buf_);
    }
    const char* kind() const override { return "nccl"; }
    bool takes_device_pointers() const override { return true; }
    Status joined(Clock::time_point deadline) override {
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
        cfg.blocking = 0;  // bounded by the deadline below instead of hanging on a dead worker
        ncclResult_t r = nccl_->CommInitRankConfig(&comm_, 2, id_, 0, &cfg);
        if (r != ncclSuccess && r != ncclInProgress) return MM_ERROR("data plane nccl: ncclCommInitRank: %s", nccl_->GetErrorString(r));
        MM_RETURN_IF_ERROR(settle(deadline, "joining the communicator"));
        // NCCL connects a direction lazily, at the first ncclSend on one side and ncclRecv on the
        // other, and each side's call waits for the other's. Per call, the worker sends its partial
        // sums before it answers, and this side posts its receive only after the answer: without
        // the connection made here the worker's first send would wait for a receive that never
        // comes (seen on an H200, NCCL 2.28). One float each way now, while the worker does the same
        // (worker/data_plane.cpp: receive, then send).
        MM_RETURN_IF_ERROR(check(nccl_->Send(buf_, 1, ncclFloat32, 1, comm_, stream_), "ncclSend (connecting)"));
        MM_RETURN_IF_ERROR(settle(deadline, "connecting to the worker"));
        MM_RETURN_IF_ERROR(check(nccl_->Recv(buf_ + max_rows_ * hidden_, 1, ncclFloat32, 1, comm_, stream_),
                                 "ncclRecv (connecting)"));
        MM_RETURN_IF_ERROR(settle(deadline, "connecting from the worker"));
        return wait_stream(stream_, deadline, "data plane nccl: connecting", [this] { return async_error(); });
    }
    Status put(const float* x, int64_t n_rows, bool on_device) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        const float* src = x;
        if (!on_device) {
            DP_CUDA(cudaMemcpyAsync(buf_, x, sizeof(float) * static_cast<size_t>(n_rows * hidden_),
                                    cudaMemcpyHostToDevice, stream_),
                    "staging the activations");
            src = buf_;
        }
        // Enqueued, not waited for: it completes when the worker posts its receive.
        MM_RETURN_IF_ERROR(check(nccl_->Send(src, static_cast<size_t>(n_rows * hidden_), ncclFloat32, 1, comm_, stream_),
                                 "ncclSend"));
        return settle(Clock::now() + std::chrono::seconds(30), "sending the activations");
    }
    Status get(float* out, int64_t n_rows, bool on_device, Clock::time_point deadline) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        float* dst = on_device ? out : buf_ + max_rows_ * hidden_;
        const size_t n = static_cast<size_t>(n_rows * hidden_);
        MM_RETURN_IF_ERROR(check(nccl_->Recv(dst, n, ncclFloat32, 1, comm_, stream_), "ncclRecv"));
        MM_RETURN_IF_ERROR(settle(deadline, "receiving the partial sums"));
        if (!on_device)
            DP_CUDA(cudaMemcpyAsync(out, dst, sizeof(float) * n, cudaMemcpyDeviceToHost, stream_), "copying the partial sums");
        return wait_stream(stream_, deadline, "data plane nccl: receiving the partial sums",
                           [this] { return async_error(); });
    }

private:
    NcclLink(int64_t rows, int64_t hidden, int device, const NcclApi* nccl)
        : LinkDataPlane(rows, hidden), nccl_(nccl), device_(device) {}
    // The communicator's asynchronous error, "" while fine.
    std::string async_error() {
        ncclResult_t s = ncclSuccess;
        nccl_->CommGetAsyncError(comm_, &s);
        return s == ncclSuccess || s == ncclInProgress ? "" : nccl_->GetErrorString(s);
    }
    // A nonblocking communicator's call may return ncclInProgress: the operation reaches the stream
    // only once the communicator says ncclSuccess, and no other call may come before that.
    Status settle(Clock::time_point deadline, const char* what) {
        for (;;) {
            ncclResult_t state = ncclSuccess;
            nccl_->CommGetAsyncError(comm_, &state);
            if (state == ncclSuccess) return Status();
            if (state != ncclInProgress) return MM_ERROR("data plane nccl: %s: %s", what, nccl_->GetErrorString(state));
            if (Clock::now() > deadline)
                return MM_ERROR("data plane nccl: %s: not done by the deadline (is the worker alive?)", what);
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }
    Status check(ncclResult_t r, const char* what) {
        if (r == ncclSuccess || r == ncclInProgress) return Status();
        return MM_ERROR("data plane nccl: %s: %s", what, nccl_->GetErrorString(r));
    }
    Status init(int wdevice) {
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMalloc(reinterpret_cast<void**>(&buf_), data_plane_region_bytes(max_rows_, hidden_)),
                "allocating the staging buffers");
        DP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        if (ncclResult_t r = nccl_->GetUniqueId(&id_); r != ncclSuccess)
            return MM_ERROR("data plane nccl: ncclGetUniqueId: %s", nccl_->GetErrorString(r));
        offer_.set_kind(v1::DATA_PLANE_NCCL);
        offer_.set_max_rows(static_cast<uint32_t>(max_rows_));
        offer_.set_hidden(static_cast<uint32_t>(hidden_));
        offer_.set_nccl_unique_id(&id_, sizeof(id_));
        offer_.set_coordinator_device(device_);
        offer_.set_worker_device(wdevice);
        return Status();
    }
    const NcclApi* nccl_;
    int device_;
    float* buf_ = nullptr;  // host-staged calls: x [max_rows, hidden], then partial [max_rows, hidden]
    cudaStream_t stream_ = nullptr;
    ncclUniqueId id_{};
    ncclComm_t comm_ = nullptr;
};
#endif

}  // namespace

std::string LinkDataPlane::unavailable(Transport t) {
    switch (t) {
        case Transport::kShm: return "";
        case Transport::kCudaIpc:
#ifdef MOEMESH_HAVE_CUDA
            return "";
#else
            return "transport cuda-ipc needs the CUDA build (-DMOEMESH_CUDA=ON)";
#endif
        case Transport::kNccl:
#if defined(MOEMESH_HAVE_CUDA) && defined(MOEMESH_HAVE_NCCL)
        {
            // Built with nccl.h; the library itself is loaded now (NcclLink::create asks again).
            std::string why;
            return nccl_api(&why) ? "" : "transport nccl: " + why;
        }
#else
            return "transport nccl needs a CUDA build that found libnccl (-DMOEMESH_CUDA=ON, NCCL installed)";
#endif
        default: return str_printf("transport %s has no out-of-band data plane", transport_name(t));
    }
}

StatusOr<std::unique_ptr<LinkDataPlane>> LinkDataPlane::create(Transport t, int64_t max_rows, int64_t hidden,
                                                               int coordinator_device, int worker_device,
                                                               const std::string& worker_name) {
    if (std::string why = unavailable(t); !why.empty()) return Status::error(why);
    if (max_rows < 1 || max_rows > kMaxDataPlaneRows)
        return MM_ERROR("data plane: max_rows %lld outside 1-%lld", static_cast<long long>(max_rows),
                        static_cast<long long>(kMaxDataPlaneRows));
    switch (t) {
        case Transport::kShm: return ShmLink::create(max_rows, hidden, worker_name);
#ifdef MOEMESH_HAVE_CUDA
        case Transport::kCudaIpc: return CudaIpcLink::create(max_rows, hidden, coordinator_device, worker_device);
#endif
#if defined(MOEMESH_HAVE_CUDA) && defined(MOEMESH_HAVE_NCCL)
        case Transport::kNccl: return NcclLink::create(max_rows, hidden, coordinator_device, worker_device);
#endif
        default: break;
    }
    (void)coordinator_device;
    (void)worker_device;
    return MM_ERROR("transport %s has no out-of-band data plane", transport_name(t));
}

}  // namespace moemesh
