// Helpers for end-to-end cluster tests: child processes (fork/exec, own process group, killed when
// the test process dies), pipes with poll() timeouts so that a hang fails a test instead of hanging
// it, log files polled for a line, tiny TCP peers that are not moemesh workers.
#pragma once
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace moemesh::testing {

using SteadyClock = std::chrono::steady_clock;

inline double seconds_since(SteadyClock::time_point t) {
    return std::chrono::duration<double>(SteadyClock::now() - t).count();
}

// One child process. stderr goes to a file (read it with read_file); stdin/stdout are pipes when
// asked for. The destructor SIGKILLs the whole process group and reaps it.
class Child {
public:
    Child() = default;
    Child(const Child&) = delete;
    Child& operator=(const Child&) = delete;
    ~Child() { kill_now(); }

    // Starts argv[0] (a path) with the given arguments. Returns false (and sets error()) on failure.
    bool start(const std::vector<std::string>& argv, const std::string& stderr_path, bool pipes = false) {
        kill_now();
        err_path_ = stderr_path;
        buf_.clear();
        int in[2] = {-1, -1}, out[2] = {-1, -1};
        if (pipes && (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0)) return false;
        const pid_t parent = getpid();
        pid_t pid = fork();
        if (pid < 0) return false;
        if (pid == 0) {
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(127);
            int fd = open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) dup2(fd, 2);
            if (pipes) {
                dup2(in[0], 0);
                dup2(out[1], 1);
            } else {
                int nul = open("/dev/null", O_RDWR);
                dup2(nul, 0);
                dup2(nul, 1);
            }
            std::vector<char*> args;
            for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
            args.push_back(nullptr);
            execv(args[0], args.data());
            std::fprintf(stderr, "execv %s: %s\n", args[0], std::strerror(errno));
            _exit(127);
        }
        setpgid(pid, pid);
        pid_ = pid;
        if (pipes) {
            close(in[0]);
            close(out[1]);
            in_ = in[1];
            out_ = out[0];
            signal(SIGPIPE, SIG_IGN);
        }
        return true;
    }

    pid_t pid() const { return pid_; }
    bool running() const { return pid_ > 0; }
    std::string stderr_text() const { return read_file(err_path_); }

    void signal_it(int sig) {
        if (pid_ > 0) ::kill(pid_, sig);
    }

    // SIGKILLs the process group and reaps the child.
    void kill_now() {
        if (pid_ > 0) {
            ::kill(-pid_, SIGCONT);
            ::kill(-pid_, SIGKILL);
            ::kill(pid_, SIGKILL);
            int st;
            waitpid(pid_, &st, 0);
            pid_ = -1;
        }
        close_pipes();
    }

    // Waits for the child to exit; returns its exit code (or 128+signal), or nullopt on timeout.
    std::optional<int> wait_exit(double timeout_s) {
        const auto t0 = SteadyClock::now();
        while (pid_ > 0) {
            int st;
            pid_t r = waitpid(pid_, &st, WNOHANG);
            if (r == pid_) {
                pid_ = -1;
                close_pipes();
                return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            }
            if (seconds_since(t0) > timeout_s) return std::nullopt;
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        return std::nullopt;
    }

    bool write_line(const std::string& line) {
        std::string s = line + "\n";
        return ::write(in_, s.data(), s.size()) == static_cast<ssize_t>(s.size());
    }
    void close_stdin() {
        if (in_ >= 0) close(in_);
        in_ = -1;
    }

    // One line of stdout (without '\n'), or nullopt on timeout or EOF.
    std::optional<std::string> read_line(double timeout_s) {
        const auto t0 = SteadyClock::now();
        for (;;) {
            size_t nl = buf_.find('\n');
            if (nl != std::string::npos) {
                std::string line = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                return line;
            }
            const double left = timeout_s - seconds_since(t0);
            if (left <= 0 || out_ < 0) return std::nullopt;
            pollfd p{out_, POLLIN, 0};
            int r = poll(&p, 1, static_cast<int>(left * 1000) + 1);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return std::nullopt;
            char tmp[65536];
            ssize_t n = ::read(out_, tmp, sizeof(tmp));
            if (n <= 0) return std::nullopt;
            buf_.append(tmp, static_cast<size_t>(n));
        }
    }

private:
    void close_pipes() {
        if (in_ >= 0) close(in_);
        if (out_ >= 0) close(out_);
        in_ = out_ = -1;
    }
    pid_t pid_ = -1;
    int in_ = -1, out_ = -1;
    std::string err_path_, buf_;
};

// Polls a log file until it contains `needle`; returns its text then, or nullopt after timeout_s.
inline std::optional<std::string> wait_for_log(const std::string& path, const std::string& needle, double timeout_s) {
    const auto t0 = SteadyClock::now();
    for (;;) {
        std::string s = read_file(path);
        if (s.find(needle) != std::string::npos) return s;
        if (seconds_since(t0) > timeout_s) return std::nullopt;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

// A TCP listener on 127.0.0.1 (any free port) that is not a moemesh worker: each connection gets
// `reply` (may be empty) and is closed at once.
class FakePeer {
public:
    explicit FakePeer(std::string reply) : reply_(std::move(reply)) {
        fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = 0;
        bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
        listen(fd_, 64);
        socklen_t len = sizeof(a);
        getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
        port_ = ntohs(a.sin_port);
        thread_ = std::thread([this] {
            while (!stop_) {
                pollfd p{fd_, POLLIN, 0};
                if (poll(&p, 1, 50) <= 0) continue;
                int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
                if (c < 0) continue;
                ++accepted_;
                if (!reply_.empty()) (void)!::send(c, reply_.data(), reply_.size(), MSG_NOSIGNAL);
                close(c);
            }
        });
    }
    ~FakePeer() {
        stop_ = true;
        thread_.join();
        close(fd_);
    }
    int port() const { return port_; }
    int accepted() const { return accepted_; }

private:
    std::string reply_;
    int fd_ = -1, port_ = 0;
    std::atomic<bool> stop_{false};
    std::atomic<int> accepted_{0};
    std::thread thread_;
};

// Sends raw bytes to host:port (TCP) or a unix socket path, reads whatever comes back for a moment.
inline bool send_raw_tcp(int port, const std::string& bytes) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        close(fd);
        return false;
    }
    (void)!::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    pollfd p{fd, POLLIN, 0};
    char tmp[4096];
    for (int i = 0; i < 5 && poll(&p, 1, 100) > 0; ++i)
        if (::read(fd, tmp, sizeof(tmp)) <= 0) break;
    close(fd);
    return true;
}

}  // namespace moemesh::testing
