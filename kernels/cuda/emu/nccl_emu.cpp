// NCCL point-to-point for the CUDA emulator (see nccl_emu.h).
#include "kernels/cuda/emu/nccl_emu.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/emu/cuda_emu.h"

struct ncclComm {
    int fd = -1;
    int rank = 0;
    bool blocking = true;
    std::atomic<int> state{ncclInProgress};  // ncclInProgress → ncclSuccess, or an error
    std::atomic<bool> aborted{false};
    std::thread joiner;                      // nonblocking init
    // Lazy connection, as NCCL's: a direction is connected once the sender has called ncclSend and
    // the receiver ncclRecv, each on its host thread. A rank's first call of each kind announces
    // itself on the control socket ('S' / 'R') and then waits for the peer's matching first call:
    // blocking communicators inside the call, nonblocking ones in the background (ncclInProgress
    // meanwhile, and the operation reaches its stream once connected).
    int ctl = -1;
    bool sent_s = false, sent_r = false;     // this rank announced its first send / receive
    bool peer_s = false, peer_r = false;     // the peer's announcements (under mu)
    bool send_connected = false, recv_connected = false;
    std::thread control;                     // reads the peer's announcements
    std::thread connector;                   // a nonblocking communicator's pending connection
    // Sends are handed to this thread in order, so that a send never blocks its stream.
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::vector<char>> out;
    bool stop = false;
    std::thread sender;
};

namespace mm_emu::nccl {
namespace {

constexpr char kMagic[] = "mmemunccl";
constexpr int kTimeoutMs = 60000;

std::mutex g_mu;
std::map<std::string, int> g_listeners;  // by socket name: ids this process made (rank 0's side)

std::string socket_name(const ncclUniqueId& id) {
    if (std::memcmp(id.internal, kMagic, sizeof kMagic) != 0) return "";
    return std::string(id.internal + sizeof kMagic, strnlen(id.internal + sizeof kMagic, 64));
}
sockaddr_un address(const std::string& name, socklen_t* len) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    a.sun_path[0] = '\0';  // abstract namespace: nothing on disk
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return a;
}

ncclResult_t join(ncclComm* c, const std::string& name) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
    if (c->rank == 0) {
        int lfd = -1;
        {
            std::lock_guard<std::mutex> lk(g_mu);
            auto it = g_listeners.find(name);
            if (it != g_listeners.end()) {
                lfd = it->second;
                g_listeners.erase(it);
            }
        }
        if (lfd < 0) {
            std::fprintf(stderr, "[nccl-emu] rank 0 needs an id from ncclGetUniqueId in this process\n");
            return ncclInvalidArgument;
        }
        for (;;) {
            pollfd p{lfd, POLLIN, 0};
            if (poll(&p, 1, 20) == 1) break;
            if (c->aborted.load() || std::chrono::steady_clock::now() > deadline) {
                close(lfd);
                if (!c->aborted.load())
                    std::fprintf(stderr, "[nccl-emu] rank 1 did not connect within %d ms\n", kTimeoutMs);
                return ncclRemoteError;
            }
        }
        c->fd = accept(lfd, nullptr, nullptr);
        c->ctl = c->fd >= 0 ? accept(lfd, nullptr, nullptr) : -1;
        close(lfd);
        if (c->ctl < 0 && c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
    } else {
        socklen_t len = 0;
        const sockaddr_un a = address(name, &len);
        for (;;) {
            const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (connect(fd, reinterpret_cast<const sockaddr*>(&a), len) == 0) {
                c->fd = fd;
                break;
            }
            close(fd);
            if (c->aborted.load() || std::chrono::steady_clock::now() > deadline) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        if (c->fd >= 0) {  // the control socket: the listener's backlog already holds the data one
            const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (connect(fd, reinterpret_cast<const sockaddr*>(&a), len) == 0) {
                c->ctl = fd;
            } else {
                close(fd);
                close(c->fd);
                c->fd = -1;
            }
        }
    }
    if (c->fd < 0) {
        std::fprintf(stderr, "[nccl-emu] rank %d could not join: %s\n", c->rank, std::strerror(errno));
        return ncclSystemError;
    }
    c->control = std::thread([c] {
        for (;;) {
            char b = 0;
            const ssize_t n = ::recv(c->ctl, &b, 1, 0);
            if (n <= 0) return;  // closed: the data socket reports the broken peer
            {
                std::lock_guard<std::mutex> lk(c->mu);
                (b == 'S' ? c->peer_s : c->peer_r) = true;
            }
            c->cv.notify_all();
        }
    });
    c->sender = std::thread([c] {
        for (;;) {
            std::vector<char> msg;
            {
                std::unique_lock<std::mutex> lk(c->mu);
                c->cv.wait(lk, [c] { return c->stop || !c->out.empty(); });
                if (c->out.empty()) return;
                msg = std::move(c->out.front());
                c->out.pop_front();
            }
            for (size_t done = 0; done < msg.size();) {
                const ssize_t n = ::send(c->fd, msg.data() + done, msg.size() - done, MSG_NOSIGNAL);
                if (n <= 0) {
                    c->state.store(ncclRemoteError);
                    return;
                }
                done += static_cast<size_t>(n);
            }
        }
    });
    return ncclSuccess;
}

size_t type_size(ncclDataType_t t) {
    switch (t) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}

// This rank's first send (send = true) or receive: announce it, then wait up to the timeout for the
// peer's first call of the other kind.
ncclResult_t connect_direction(ncclComm* c, bool send) {
    {
        std::lock_guard<std::mutex> lk(c->mu);
        if (send ? c->send_connected : c->recv_connected) return ncclSuccess;
    }
    bool& announced = send ? c->sent_s : c->sent_r;
    if (!announced) {
        announced = true;
        const char b = send ? 'S' : 'R';
        if (::send(c->ctl, &b, 1, MSG_NOSIGNAL) != 1) return ncclRemoteError;
    }
    std::unique_lock<std::mutex> lk(c->mu);
    const bool ok = c->cv.wait_for(lk, std::chrono::milliseconds(kTimeoutMs), [c, send] {
        return c->aborted.load() || (send ? c->peer_r : c->peer_s);
    });
    if (!ok || c->aborted.load()) {
        if (!c->aborted.load())
            std::fprintf(stderr, "[nccl-emu] rank %d: the peer did not call ncclRecv/ncclSend to connect within %d ms\n",
                         c->rank, kTimeoutMs);
        return ncclRemoteError;
    }
    (send ? c->send_connected : c->recv_connected) = true;
    return ncclSuccess;
}

// Runs `op` (which puts the operation on its stream) once the direction is connected: at once when
// it is, inside the call on a blocking communicator, else in the background with ncclInProgress.
ncclResult_t when_connected(ncclComm* c, bool send, std::function<void()> op) {
    bool connected;
    {
        std::lock_guard<std::mutex> lk(c->mu);
        connected = send ? c->send_connected : c->recv_connected;
    }
    if (connected) {
        op();
        return ncclSuccess;
    }
    if (c->blocking) {
        const ncclResult_t r = connect_direction(c, send);
        if (r != ncclSuccess) {
            c->state.store(r);
            return r;
        }
        op();
        return ncclSuccess;
    }
    if (c->connector.joinable()) c->connector.join();  // the caller waited for ncclSuccess before this call
    c->state.store(ncclInProgress);
    c->connector = std::thread([c, send, op = std::move(op)] {
        const ncclResult_t r = connect_direction(c, send);
        if (r == ncclSuccess) op();
        c->state.store(r);
    });
    return ncclInProgress;
}

ncclResult_t check(ncclComm* c, int peer, ncclDataType_t type) {
    if (c == nullptr || peer != 1 - c->rank || type_size(type) == 0) return ncclInvalidArgument;
    const int st = c->state.load();
    return st == ncclSuccess ? ncclSuccess : static_cast<ncclResult_t>(st);
}

}  // namespace

const char* GetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error (NCCL emulator: see the [nccl-emu] message)";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

ncclResult_t GetUniqueId(ncclUniqueId* id) {
    std::random_device rd;
    char name[64];
    std::snprintf(name, sizeof name, "moemesh-nccl-emu-%d-%08x%08x", static_cast<int>(getpid()), rd(), rd());
    socklen_t len = 0;
    const sockaddr_un a = address(name, &len);
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, reinterpret_cast<const sockaddr*>(&a), len) != 0 || listen(fd, 2) != 0) {
        std::fprintf(stderr, "[nccl-emu] ncclGetUniqueId: cannot listen: %s\n", std::strerror(errno));
        if (fd >= 0) close(fd);
        return ncclSystemError;
    }
    {
        std::lock_guard<std::mutex> lk(g_mu);
        g_listeners[name] = fd;
    }
    std::memset(id, 0, sizeof *id);
    std::memcpy(id->internal, kMagic, sizeof kMagic);
    std::memcpy(id->internal + sizeof kMagic, name, std::strlen(name));
    return ncclSuccess;
}

ncclResult_t CommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config) {
    *comm = nullptr;
    const std::string name = socket_name(id);
    if (nranks != 2 || (rank != 0 && rank != 1) || name.empty()) {
        std::fprintf(stderr, "[nccl-emu] only 2-rank communicators from this emulator's ids (nranks %d, rank %d)\n",
                     nranks, rank);
        return ncclInvalidArgument;
    }
    auto* c = new ncclComm;
    c->rank = rank;
    c->blocking = config == nullptr || config->blocking != 0;
    *comm = c;
    if (config != nullptr && config->blocking == 0) {
        c->joiner = std::thread([c, name] { c->state.store(join(c, name)); });
        return ncclInProgress;
    }
    const ncclResult_t r = join(c, name);
    c->state.store(r);
    return r;
}

ncclResult_t CommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    return CommInitRankConfig(comm, nranks, id, rank, nullptr);
}

ncclResult_t CommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
    if (comm == nullptr) return ncclInvalidArgument;
    *state = static_cast<ncclResult_t>(comm->state.load());
    return ncclSuccess;
}

ncclResult_t CommAbort(ncclComm_t comm) {
    if (comm == nullptr) return ncclSuccess;
    comm->aborted.store(true);  // a joiner or connector still waiting for its peer gives up
    if (comm->joiner.joinable()) comm->joiner.join();
    if (comm->fd >= 0) shutdown(comm->fd, SHUT_RDWR);
    if (comm->ctl >= 0) shutdown(comm->ctl, SHUT_RDWR);
    {
        std::lock_guard<std::mutex> lk(comm->mu);
        comm->stop = true;
    }
    comm->cv.notify_all();
    if (comm->connector.joinable()) comm->connector.join();
    if (comm->sender.joinable()) comm->sender.join();
    if (comm->control.joinable()) comm->control.join();
    if (comm->fd >= 0) close(comm->fd);
    if (comm->ctl >= 0) close(comm->ctl);
    delete comm;
    return ncclSuccess;
}

ncclResult_t Send(const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t s) {
    if (const ncclResult_t r = check(comm, peer, type); r != ncclSuccess) return r;
    const size_t bytes = count * type_size(type);
    return when_connected(comm, true, [comm, buf, bytes, s] {
        submit(s, "nccl send", [comm, buf, bytes] {
            std::vector<char> msg(static_cast<const char*>(buf), static_cast<const char*>(buf) + bytes);
            {
                std::lock_guard<std::mutex> lk(comm->mu);
                comm->out.push_back(std::move(msg));
            }
            comm->cv.notify_all();
        });
        run_stream(s);  // a GPU's stream progresses by itself; here the send is what makes it
    });
}

ncclResult_t Recv(void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t s) {
    if (const ncclResult_t r = check(comm, peer, type); r != ncclSuccess) return r;
    const size_t bytes = count * type_size(type);
    return when_connected(comm, false, [comm, buf, bytes, s] { submit(s, "nccl recv", [comm, buf, bytes] {
        for (size_t done = 0; done < bytes && comm->state.load() == ncclSuccess;) {
            pollfd p{comm->fd, POLLIN, 0};
            const int ready = poll(&p, 1, kTimeoutMs);
            const ssize_t n = ready == 1 ? ::recv(comm->fd, static_cast<char*>(buf) + done, bytes - done, 0) : -1;
            if (n <= 0) {
                std::fprintf(stderr, "[nccl-emu] rank %d: receive of %zu bytes failed after %zu (%s)\n", comm->rank,
                             bytes, done, ready == 1 ? "peer closed" : "timeout");
                comm->state.store(ncclRemoteError);
                return;
            }
            done += static_cast<size_t>(n);
        }
    }); });
}

}  // namespace mm_emu::nccl
