#include "worker/data_plane.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#ifdef MOEMESH_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef MOEMESH_HAVE_NCCL
#include "coordinator/nccl_loader.h"
#endif

namespace moemesh {

const char* data_plane_kind_name(int kind) {
    switch (kind) {
        case v1::DATA_PLANE_SHM: return "shm";
        case v1::DATA_PLANE_CUDA_IPC: return "cuda-ipc";
        case v1::DATA_PLANE_NCCL: return "nccl";
        default: return "none";
    }
}

std::string check_data_plane_offer(const v1::DataPlaneOffer& o, int64_t hidden) {
    const char* k = data_plane_kind_name(o.kind());
    if (o.kind() != v1::DATA_PLANE_SHM && o.kind() != v1::DATA_PLANE_CUDA_IPC && o.kind() != v1::DATA_PLANE_NCCL)
        return str_printf("data plane: unknown kind %d (this worker knows shm = 1, cuda-ipc = 2, nccl = 3)",
                          static_cast<int>(o.kind()));
    if (o.hidden() != hidden)
        return str_printf("data plane %s: hidden %u != the model's %lld", k, o.hidden(), static_cast<long long>(hidden));
    if (o.max_rows() == 0 || o.max_rows() > kMaxDataPlaneRows)
        return str_printf("data plane %s: max_rows %u is outside 1-%lld", k, o.max_rows(),
                          static_cast<long long>(kMaxDataPlaneRows));
    const uint64_t want = data_plane_region_bytes(o.max_rows(), hidden);
    if (want > kMaxDataPlaneBytes)
        return str_printf("data plane %s: max_rows %u × hidden %lld needs a %llu-byte region, more than this worker's "
                          "limit of %llu bytes (lower coordinator.data_plane_rows)",
                          k, o.max_rows(), static_cast<long long>(hidden), static_cast<unsigned long long>(want),
                          static_cast<unsigned long long>(kMaxDataPlaneBytes));
    if (o.kind() == v1::DATA_PLANE_SHM || o.kind() == v1::DATA_PLANE_CUDA_IPC) {
        if (o.region_bytes() != want)
            return str_printf("data plane %s: region_bytes %llu != 2 × max_rows %u × hidden %lld × 4 = %llu", k,
                              static_cast<unsigned long long>(o.region_bytes()), o.max_rows(),
                              static_cast<long long>(hidden), static_cast<unsigned long long>(want));
    }
    if (o.kind() == v1::DATA_PLANE_SHM) {
        // A name as shm_open wants it: one leading slash, nothing else that looks like a path.
        const std::string& n = o.shm_name();
        if (n.size() < 2 || n.size() > 200 || n[0] != '/' || n.find('/', 1) != std::string::npos)
            return "data plane shm: bad shared-memory name \"" + n.substr(0, 64) + "\" (expected /name)";
    }
    if (o.kind() == v1::DATA_PLANE_CUDA_IPC && o.cuda_ipc_handle().size() != 64)
        return str_printf("data plane cuda-ipc: the IPC handle is %zu bytes, expected 64", o.cuda_ipc_handle().size());
    if (o.kind() == v1::DATA_PLANE_NCCL && o.nccl_unique_id().size() != 128)
        return str_printf("data plane nccl: the unique id is %zu bytes, expected 128", o.nccl_unique_id().size());
    if ((o.kind() == v1::DATA_PLANE_CUDA_IPC || o.kind() == v1::DATA_PLANE_NCCL) && o.worker_device() < 0)
        return str_printf("data plane %s: worker_device %d is not a CUDA device index", k, o.worker_device());
    return "";
}

Status WorkerDataPlane::check_rows(int64_t n_rows) const {
    if (!broken_.empty()) return MM_ERROR("data plane %s is broken: %s", kind(), broken_.c_str());
    if (n_rows < 0 || n_rows > max_rows_)
        return MM_ERROR("out-of-band call of %lld rows, the data plane holds %lld", static_cast<long long>(n_rows),
                        static_cast<long long>(max_rows_));
    return Status();
}

std::string WorkerDataPlane::in_place_on(int compute_device) const {
    if (device() < 0) return str_printf("the %s buffers are host memory", kind());
    if (compute_device < 0) return "this worker computes on the CPU";
    const int b = buffer_device();
    if (b < 0) return str_printf("the driver did not say which device holds the %s buffers", kind());
    if (b != compute_device || device() != compute_device)
        return str_printf("the %s buffers are on cuda:%d (opened on cuda:%d, the YAML's worker device), this worker "
                          "computes on cuda:%d",
                          kind(), b, device(), compute_device);
    return "";
}

StatusOr<const float*> WorkerDataPlane::device_activations(int64_t) {
    return MM_ERROR("data plane %s: its buffers cannot be used in place by a GPU compute", kind());
}

Status WorkerDataPlane::publish_device(int64_t) {
    return MM_ERROR("data plane %s: its buffers cannot be used in place by a GPU compute", kind());
}

namespace {

// ---- shm: the coordinator's shared-memory object, mapped here ----
class ShmPlane final : public WorkerDataPlane {
public:
    static StatusOr<std::unique_ptr<WorkerDataPlane>> open(const v1::DataPlaneOffer& o, int64_t hidden) {
        const int fd = shm_open(o.shm_name().c_str(), O_RDWR, 0);
        if (fd < 0)
            return MM_ERROR("data plane shm: cannot open shared memory %s: %s (is the coordinator on this host, and "
                            "/dev/shm shared between the two?)",
                            o.shm_name().c_str(), std::strerror(errno));
        struct stat st{};
        if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != o.region_bytes()) {
            const long long size = static_cast<long long>(st.st_size);
            close(fd);
            return MM_ERROR("data plane shm: %s is %lld bytes, the offer says %llu", o.shm_name().c_str(), size,
                            static_cast<unsigned long long>(o.region_bytes()));
        }
        void* p = mmap(nullptr, o.region_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED)
            return MM_ERROR("data plane shm: cannot map %s (%llu bytes): %s", o.shm_name().c_str(),
                            static_cast<unsigned long long>(o.region_bytes()), std::strerror(errno));
        return std::unique_ptr<WorkerDataPlane>(new ShmPlane(o.max_rows(), hidden, p, o.region_bytes()));
    }
    ~ShmPlane() override { munmap(base_, bytes_); }
    const char* kind() const override { return "shm"; }
    StatusOr<const float*> activations(int64_t n_rows, std::vector<float>*) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        return static_cast<const float*>(base_);
    }
    float* partial_buffer(int64_t, std::vector<float>*) override {
        return static_cast<float*>(base_) + max_rows_ * hidden_;
    }
    Status publish(int64_t n_rows, const float* partial) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        float* dst = static_cast<float*>(base_) + max_rows_ * hidden_;
        if (partial != dst) std::memcpy(dst, partial, sizeof(float) * static_cast<size_t>(n_rows * hidden_));
        return Status();
    }

private:
    ShmPlane(int64_t rows, int64_t hidden, void* base, uint64_t bytes)
        : WorkerDataPlane(rows, hidden), base_(base), bytes_(bytes) {}
    void* base_;
    uint64_t bytes_;
};

#ifdef MOEMESH_HAVE_CUDA
#define DP_CUDA(expr, what)                                                                            \
    do {                                                                                               \
        cudaError_t e_ = (expr);                                                                       \
        if (e_ != cudaSuccess) return MM_ERROR("data plane %s: %s: %s", kind(), what, cudaGetErrorString(e_)); \
    } while (0)

// ---- cuda-ipc: the coordinator's device region, opened through its IPC handle ----
// In place (a worker on the region's device) or staged through host memory (a CPU worker, or
// another device); the coordinator's side is device to device either way.
class CudaIpcPlane final : public WorkerDataPlane {
public:
    static StatusOr<std::unique_ptr<WorkerDataPlane>> open(const v1::DataPlaneOffer& o, int64_t hidden) {
        std::unique_ptr<CudaIpcPlane> p(new CudaIpcPlane(o.max_rows(), hidden, o.worker_device()));
        MM_RETURN_IF_ERROR(p->init(o));
        return std::unique_ptr<WorkerDataPlane>(std::move(p));
    }
    ~CudaIpcPlane() override {
        if (base_) {
            cudaSetDevice(device_);
            if (stream_) cudaStreamDestroy(stream_);
            cudaIpcCloseMemHandle(base_);
        }
    }
    const char* kind() const override { return "cuda-ipc"; }
    int device() const override { return device_; }
    StatusOr<const float*> activations(int64_t n_rows, std::vector<float>* scratch) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        scratch->resize(static_cast<size_t>(n_rows * hidden_));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMemcpyAsync(scratch->data(), base_, sizeof(float) * scratch->size(), cudaMemcpyDeviceToHost, stream_),
                "copying the activations");
        DP_CUDA(cudaStreamSynchronize(stream_), "copying the activations");
        return static_cast<const float*>(scratch->data());
    }
    float* partial_buffer(int64_t n_rows, std::vector<float>* scratch) override {
        scratch->resize(static_cast<size_t>(n_rows * hidden_));
        return scratch->data();
    }
    Status publish(int64_t n_rows, const float* partial) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMemcpyAsync(static_cast<float*>(base_) + max_rows_ * hidden_, partial,
                                sizeof(float) * static_cast<size_t>(n_rows * hidden_), cudaMemcpyHostToDevice, stream_),
                "copying the partial sums");
        // Complete before the result is written: the result is the coordinator's signal.
        DP_CUDA(cudaStreamSynchronize(stream_), "copying the partial sums");
        return Status();
    }
    int buffer_device() const override { return buffer_device_; }
    StatusOr<const float*> device_activations(int64_t n_rows) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        // Complete already: the coordinator synchronizes its copy into the region before it writes the call.
        return static_cast<const float*>(base_);
    }
    float* device_partial() override { return static_cast<float*>(base_) + max_rows_ * hidden_; }
    void* stream() const override { return stream_; }
    Status publish_device(int64_t n_rows) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        // The partial sums were computed on stream_: complete before the result (the signal) is written.
        DP_CUDA(cudaStreamSynchronize(stream_), "computing the partial sums");
        return Status();
    }

private:
    CudaIpcPlane(int64_t rows, int64_t hidden, int device) : WorkerDataPlane(rows, hidden), device_(device) {}
    Status init(const v1::DataPlaneOffer& o) {
        int n = 0;
        DP_CUDA(cudaGetDeviceCount(&n), "no CUDA device");
        if (device_ >= n)
            return MM_ERROR("data plane cuda-ipc: worker device cuda:%d does not exist (%d devices)", device_, n);
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        cudaIpcMemHandle_t h;
        std::memcpy(&h, o.cuda_ipc_handle().data(), sizeof(h));
        DP_CUDA(cudaIpcOpenMemHandle(&base_, h, cudaIpcMemLazyEnablePeerAccess),
                "cannot open the coordinator's IPC handle (another host, or a GPU without peer access?)");
        DP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        // Where the region lives, in this process's device numbering (the offer's coordinator_device
        // is the coordinator's, which differs under other CUDA_VISIBLE_DEVICES). Unknown: staged.
        cudaPointerAttributes attr{};
        if (cudaPointerGetAttributes(&attr, base_) == cudaSuccess && attr.type == cudaMemoryTypeDevice)
            buffer_device_ = attr.device;
        else
            (void)cudaGetLastError();
        return Status();
    }
    int device_;
    int buffer_device_ = -1;
    void* base_ = nullptr;
    cudaStream_t stream_ = nullptr;
};
#endif  // MOEMESH_HAVE_CUDA

#if defined(MOEMESH_HAVE_CUDA) && defined(MOEMESH_HAVE_NCCL)
// ---- nccl: rank 1 of the pair's 2-rank communicator; x received, partial sent, per call ----
class NcclPlane final : public WorkerDataPlane {
public:
    static StatusOr<std::unique_ptr<WorkerDataPlane>> open(const v1::DataPlaneOffer& o, int64_t hidden) {
        std::string why;
        const NcclApi* nccl = nccl_api(&why);
        if (!nccl) return MM_ERROR("data plane nccl: %s", why.c_str());
        std::unique_ptr<NcclPlane> p(new NcclPlane(o.max_rows(), hidden, o.worker_device(), nccl));
        MM_RETURN_IF_ERROR(p->init(o));
        return std::unique_ptr<WorkerDataPlane>(std::move(p));
    }
    ~NcclPlane() override {
        if (joiner_.joinable()) joiner_.join();
        cudaSetDevice(device_);
        if (comm_) nccl_->CommAbort(comm_);  // abort, not destroy: the coordinator may be gone
        if (d_buf_) cudaFree(d_buf_);
        if (stream_) cudaStreamDestroy(stream_);
    }
    const char* kind() const override { return "nccl"; }
    int device() const override { return device_; }
    StatusOr<const float*> activations(int64_t n_rows, std::vector<float>* scratch) override {
        MM_RETURN_IF_ERROR(receive(n_rows));
        scratch->resize(static_cast<size_t>(n_rows * hidden_));
        DP_CUDA(cudaMemcpyAsync(scratch->data(), d_buf_, sizeof(float) * scratch->size(), cudaMemcpyDeviceToHost,
                                stream_),
                "copying the activations");
        DP_CUDA(cudaStreamSynchronize(stream_), "receiving the activations");
        return static_cast<const float*>(scratch->data());
    }
    float* partial_buffer(int64_t n_rows, std::vector<float>* scratch) override {
        scratch->resize(static_cast<size_t>(n_rows * hidden_));
        return scratch->data();
    }
    Status publish(int64_t n_rows, const float* partial) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMemcpyAsync(device_partial(), partial, sizeof(float) * static_cast<size_t>(n_rows * hidden_),
                                cudaMemcpyHostToDevice, stream_),
                "copying the partial sums");
        return send(n_rows);
    }
    int buffer_device() const override { return device_; }
    // In place: nothing waits on the host; the receive, the compute (on stream()) and the send are
    // ordered on stream_, and so is the next call's receive behind this call's send.
    StatusOr<const float*> device_activations(int64_t n_rows) override {
        MM_RETURN_IF_ERROR(receive(n_rows));
        return static_cast<const float*>(d_buf_);
    }
    float* device_partial() override { return d_buf_ + max_rows_ * hidden_; }
    void* stream() const override { return stream_; }
    Status publish_device(int64_t n_rows) override {
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        return send(n_rows);
    }

private:
    NcclPlane(int64_t rows, int64_t hidden, int device, const NcclApi* nccl)
        : WorkerDataPlane(rows, hidden), nccl_(nccl), device_(device) {}
    Status fail(const std::string& why) {
        broken_ = why;
        return MM_ERROR("data plane nccl: %s", why.c_str());
    }
    // x [n_rows, hidden] into d_buf_, queued on stream_.
    Status receive(int64_t n_rows) {
        MM_RETURN_IF_ERROR(joined());
        MM_RETURN_IF_ERROR(check_rows(n_rows));
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        if (ncclResult_t r = nccl_->Recv(d_buf_, static_cast<size_t>(n_rows * hidden_), ncclFloat32, 0, comm_, stream_);
            r != ncclSuccess)
            return fail(std::string("ncclRecv: ") + nccl_->GetErrorString(r));
        return Status();
    }
    // The partial sums [n_rows, hidden] from device_partial(), queued on stream_ behind whatever wrote them.
    // The send completes when the coordinator posts its receive, after it read the result; the next
    // call's receive is ordered behind it on the same stream.
    Status send(int64_t n_rows) {
        if (ncclResult_t r = nccl_->Send(device_partial(), static_cast<size_t>(n_rows * hidden_), ncclFloat32, 0, comm_,
                                         stream_);
            r != ncclSuccess)
            return fail(std::string("ncclSend: ") + nccl_->GetErrorString(r));
        return Status();
    }
    Status init(const v1::DataPlaneOffer& o) {
        int n = 0;
        DP_CUDA(cudaGetDeviceCount(&n), "no CUDA device");
        if (device_ >= n) return MM_ERROR("data plane nccl: worker device cuda:%d does not exist (%d devices)", device_, n);
        DP_CUDA(cudaSetDevice(device_), "cudaSetDevice");
        DP_CUDA(cudaMalloc(&d_buf_, data_plane_region_bytes(max_rows_, hidden_)), "allocating the receive buffers");
        DP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        std::memcpy(&id_, o.nccl_unique_id().data(), sizeof(id_));
        // ncclCommInitRank blocks until rank 0 joins, and the coordinator joins only after it has
        // our handshake answer: join in the background.
        // Then one float each way, which makes NCCL connect both directions now (it connects at the
        // first send on one side and receive on the other; the coordinator does the same in its
        // NcclLink::joined): the first call's send of the partial sums must not wait for a receive
        // that the coordinator posts only after our answer.
        joiner_ = std::thread([this] {
            cudaSetDevice(device_);
            init_result_ = nccl_->CommInitRank(&comm_, 2, id_, 1);
            if (init_result_ == ncclSuccess) init_result_ = nccl_->Recv(d_buf_, 1, ncclFloat32, 0, comm_, stream_);
            if (init_result_ == ncclSuccess)
                init_result_ = nccl_->Send(d_buf_ + max_rows_ * hidden_, 1, ncclFloat32, 0, comm_, stream_);
            if (init_result_ == ncclSuccess && cudaStreamSynchronize(stream_) != cudaSuccess) {
                (void)cudaGetLastError();
                init_result_ = ncclUnhandledCudaError;
            }
        });
        return Status();
    }
    Status joined() {
        if (joiner_.joinable()) {
            joiner_.join();
            if (init_result_ != ncclSuccess)
                return fail(std::string("joining the coordinator's communicator: ") + nccl_->GetErrorString(init_result_));
        }
        return Status();
    }
    const NcclApi* nccl_;
    int device_;
    float* d_buf_ = nullptr;  // x [max_rows, hidden], then partial [max_rows, hidden]
    cudaStream_t stream_ = nullptr;
    ncclUniqueId id_{};
    ncclComm_t comm_ = nullptr;
    ncclResult_t init_result_ = ncclSuccess;
    std::thread joiner_;
};
#endif

}  // namespace

StatusOr<std::unique_ptr<WorkerDataPlane>> WorkerDataPlane::open(const v1::DataPlaneOffer& offer, int64_t hidden) {
    const std::string why = check_data_plane_offer(offer, hidden);
    if (!why.empty()) return Status::error(why);
    switch (offer.kind()) {
        case v1::DATA_PLANE_SHM: return ShmPlane::open(offer, hidden);
        case v1::DATA_PLANE_CUDA_IPC:
#ifdef MOEMESH_HAVE_CUDA
            return CudaIpcPlane::open(offer, hidden);
#else
            return MM_ERROR("data plane cuda-ipc: this worker was built without CUDA (-DMOEMESH_CUDA=ON)");
#endif
        case v1::DATA_PLANE_NCCL:
#if defined(MOEMESH_HAVE_CUDA) && defined(MOEMESH_HAVE_NCCL)
            return NcclPlane::open(offer, hidden);
#else
            return MM_ERROR("data plane nccl: this worker was built without NCCL (CUDA build with libnccl found)");
#endif
        default: return MM_ERROR("data plane: unknown kind %d", static_cast<int>(offer.kind()));
    }
}

std::shared_ptr<WorkerDataPlane> answer_data_plane_offer(const v1::DataPlaneOffer& offer, int64_t hidden,
                                                         v1::DataPlaneAnswer* answer) {
    StatusOr<std::unique_ptr<WorkerDataPlane>> p = WorkerDataPlane::open(offer, hidden);
    if (!p.ok()) {
        answer->set_accepted(false);
        answer->set_reason(p.status().message());
        answer->set_worker_device(-1);
        return nullptr;
    }
    answer->set_accepted(true);
    answer->set_worker_device(p.value()->device());
    return std::shared_ptr<WorkerDataPlane>(std::move(p).value());
}

}  // namespace moemesh
