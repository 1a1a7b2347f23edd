// `moemesh launch cluster.yaml [--prompt ... | --tokens ...]`: starts one moemesh-worker process per
// local worker of a cluster file, waits until each listens, then either runs moemesh-coordinator once
// (generation options pass through) or keeps the workers up until a signal. Stops everything on
// SIGINT/SIGTERM/SIGHUP and restarts a worker that dies while the cluster runs.
//
// Process model (why it looks like this):
//   - One thread, one poll() loop. Signal handlers only write the signal number to a self-pipe, so
//     all the work (reaping, restarting, stopping) happens in the loop, never in a handler.
//   - Every child gets PR_SET_PDEATHSIG(SIGTERM): a launcher killed with SIGKILL takes its children
//     with it. Workers get their own process group, so a terminal's Ctrl-C reaches only the launcher
//     (and the coordinator, which shares the launcher's group) and the launcher stops the workers in
//     order instead of seeing them "crash" and restarting them.
//   - A worker's stdout and stderr go into a pipe that the launcher copies to NAME.log in the run dir
//     and echoes to its own stderr as "[NAME] line". The coordinator inherits stdout and stderr, so
//     with --json the launcher's stdout is exactly the coordinator's JSON object.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "tools/commands.h"
#include "tools/run_command.h"

namespace moemesh {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

constexpr size_t kTailLines = 20;              // lines of a worker's output kept for error messages
constexpr Ms kRestartBackoffMin{500};          // the coordinator retries a down worker once per second
constexpr Ms kRestartBackoffMax{10000};
constexpr Ms kStableUptime{30000};             // a worker up this long resets its backoff
constexpr Ms kProbeAfter{2000};                // connect-probe a worker that has not said "listening"
constexpr Ms kProgressEvery{5000};

struct LaunchOptions {
    std::string cluster;
    bool no_restart = false;
    int stop_timeout_ms = 5000;
    int start_timeout_ms = 120000;
};

// ---- signals ---------------------------------------------------------------------------------

int g_sig_pipe[2] = {-1, -1};

void on_signal(int sig) {
    const int saved = errno;
    const unsigned char b = static_cast<unsigned char>(sig);
    ssize_t n = write(g_sig_pipe[1], &b, 1);  // non-blocking: a full pipe already holds a wake-up
    (void)n;
    errno = saved;
}

Status install_signal_handlers() {
    if (pipe2(g_sig_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return MM_ERROR("pipe2(): %s", std::strerror(errno));
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (int s : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaction(s, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);  // a closed stderr must not kill the launcher (children get SIG_DFL back)
    return Status();
}

// ---- small helpers ---------------------------------------------------------------------------

double secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

void logf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void logf(const char* fmt, ...) {
    std::string line = "launch: ";
    va_list ap;
    va_start(ap, fmt);
    char buf[2048];
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    line += buf;
    line += '\n';
    ssize_t n = write(2, line.data(), line.size());
    (void)n;
}

std::string describe_exit(int st) {
    if (WIFEXITED(st)) return "exited with status " + std::to_string(WEXITSTATUS(st));
    if (WIFSIGNALED(st)) {
        const char* name = sigabbrev_np(WTERMSIG(st));
        return "was killed by signal " + std::to_string(WTERMSIG(st)) + (name ? std::string(" (SIG") + name + ")" : "");
    }
    return "changed state " + std::to_string(st);
}

int exit_code_of(int st) {
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return 1;
}

std::string exe_dir() {
    std::error_code ec;
    fs::path p = fs::read_symlink("/proc/self/exe", ec);
    return ec ? std::string(".") : p.parent_path().string();
}

bool is_local(const Address& a) { return is_local_address(a); }  // one rule, also transport: auto's

// True when something accepts connections on the address right now.
bool accepts_connections(const Address& a) {
    if (a.kind == Address::Kind::kUnix) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return false;
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        std::strncpy(sa.sun_path, a.path.c_str(), sizeof(sa.sun_path) - 1);
        const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
        close(fd);
        return ok;
    }
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (getaddrinfo(a.host.c_str(), std::to_string(a.port).c_str(), &hints, &res) != 0) return false;
    bool ok = false;
    for (addrinfo* r = res; r && !ok; r = r->ai_next) {
        int fd = socket(r->ai_family, r->ai_socktype | SOCK_CLOEXEC, r->ai_protocol);
        if (fd < 0) continue;
        ok = connect(fd, r->ai_addr, r->ai_addrlen) == 0;
        close(fd);
    }
    freeaddrinfo(res);
    return ok;
}

// Before a worker starts on `a`: nothing else may be listening there, and a socket file left by a
// dead worker is removed (it would block the bind).
Status prepare_address(const std::string& worker, const Address& a) {
    if (accepts_connections(a))
        return MM_ERROR("worker '%s': another process is already listening on %s (a cluster still running?)",
                        worker.c_str(), a.str().c_str());
    if (a.kind != Address::Kind::kUnix) return Status();
    struct stat st;
    if (lstat(a.path.c_str(), &st) != 0) {
        std::error_code ec;
        fs::create_directories(fs::path(a.path).parent_path(), ec);
        return Status();
    }
    if (!S_ISSOCK(st.st_mode))
        return MM_ERROR("worker '%s': %s exists and is not a socket; not removing it", worker.c_str(), a.path.c_str());
    if (unlink(a.path.c_str()) != 0)
        return MM_ERROR("worker '%s': cannot remove the stale socket %s: %s", worker.c_str(), a.path.c_str(),
                        std::strerror(errno));
    return Status();
}

// ---- children --------------------------------------------------------------------------------

struct Child {
    std::string name;                // worker name, or "coordinator"
    std::vector<std::string> argv;
    bool is_worker = true;
    std::optional<Address> address;  // workers
    std::string log_path;

    pid_t pid = -1;
    int out_fd = -1;  // read end of the worker's stdout+stderr
    int log_fd = -1;
    std::string partial;            // an unfinished output line
    std::deque<std::string> tail;   // its last lines
    bool ready = false;             // listening
    Clock::time_point started{};
    bool restart_pending = false;
    Clock::time_point restart_at{};
    Ms backoff = kRestartBackoffMin;
    int exit_status = 0;            // of the last exit
    bool exited = false;            // the last run ended (reaped)
};

bool alive(const Child& c) { return c.pid > 0; }

Status spawn(Child& c) {
    std::vector<char*> argv;
    for (std::string& s : c.argv) argv.push_back(s.data());
    argv.push_back(nullptr);
    int out[2] = {-1, -1};
    if (c.is_worker) {
        if (pipe2(out, O_CLOEXEC) != 0) return MM_ERROR("pipe2(): %s", std::strerror(errno));
        if (c.log_fd < 0) {
            c.log_fd = open(c.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (c.log_fd < 0) return MM_ERROR("cannot open %s: %s", c.log_path.c_str(), std::strerror(errno));
        }
    }
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
        if (out[0] >= 0) close(out[0]), close(out[1]);
        return MM_ERROR("fork(): %s", std::strerror(errno));
    }
    if (pid == 0) {
        // Child: only async-signal-safe calls from here to exec.
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(1);  // the launcher died before prctl
        for (int s : {SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGPIPE}) signal(s, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, nullptr);
        if (c.is_worker) {
            setpgid(0, 0);
            int devnull = open("/dev/null", O_RDONLY);
            if (devnull >= 0) dup2(devnull, 0);
            dup2(out[1], 1);
            dup2(out[1], 2);
        }
        execv(argv[0], argv.data());
        const char* msg = "launch: exec failed: ";
        ssize_t n = write(2, msg, std::strlen(msg));
        n = write(2, argv[0], std::strlen(argv[0]));
        n = write(2, "\n", 1);
        (void)n;
        _exit(127);
    }
    if (c.is_worker) {
        close(out[1]);
        fcntl(out[0], F_SETFL, O_NONBLOCK);
        c.out_fd = out[0];
        c.partial.clear();
    }
    c.pid = pid;
    c.ready = false;
    c.exited = false;
    c.started = Clock::now();
    return Status();
}

void handle_line(Child& c, const std::string& line) {
    std::string echoed = "[" + c.name + "] " + line + "\n";
    ssize_t n = write(2, echoed.data(), echoed.size());
    (void)n;
    c.tail.push_back(line);
    if (c.tail.size() > kTailLines) c.tail.pop_front();
    if (line.find(" listening on ") != std::string::npos) c.ready = true;
}

// Copies what the worker wrote to its log and to our stderr; closes the pipe at EOF.
void drain_output(Child& c) {
    if (c.out_fd < 0) return;
    char buf[8192];
    for (;;) {
        ssize_t n = read(c.out_fd, buf, sizeof(buf));
        if (n > 0) {
            if (c.log_fd >= 0) {
                ssize_t w = write(c.log_fd, buf, static_cast<size_t>(n));
                (void)w;
            }
            c.partial.append(buf, static_cast<size_t>(n));
            size_t start = 0, nl;
            while ((nl = c.partial.find('\n', start)) != std::string::npos) {
                handle_line(c, c.partial.substr(start, nl - start));
                start = nl + 1;
            }
            c.partial.erase(0, start);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        // EOF (or an error): the worker closed its output, normally because it exited.
        if (!c.partial.empty()) handle_line(c, c.partial), c.partial.clear();
        close(c.out_fd);
        c.out_fd = -1;
        return;
    }
}

std::string tail_text(const Child& c) {
    std::string s;
    for (const std::string& l : c.tail) s += "  | " + l + "\n";
    return s.empty() ? "  (no output)\n" : s;
}

// ---- the launcher ----------------------------------------------------------------------------

class Launcher {
public:
    Launcher(LaunchOptions o, std::vector<std::string> coordinator_args, bool generate)
        : o_(std::move(o)), coordinator_args_(std::move(coordinator_args)), generate_(generate) {}
    int run(const RunOptions& ro);

private:
    Status plan(const RunOptions& ro);
    Status start_workers();
    // One poll() round: output, signals, exits, restarts. Returns after at most `wait`.
    void step(Ms wait);
    void on_exit(Child& c, int st);
    void stop_all();
    int finish(int code);
    std::vector<Child*> workers();

    LaunchOptions o_;
    std::vector<std::string> coordinator_args_;
    bool generate_;
    ClusterConfig cfg_;
    std::string model_;
    std::string run_dir_;
    std::vector<Child> children_;  // workers, then the coordinator (if any)
    int stop_signal_ = 0;          // first SIGINT/SIGTERM/SIGHUP received
    bool stopping_ = false;
    bool startup_ = true;
    bool coordinator_done_ = false;
    int coordinator_status_ = 0;
    Child* failed_at_startup_ = nullptr;
    bool had_failures_ = false;
};

std::vector<Child*> Launcher::workers() {
    std::vector<Child*> w;
    for (Child& c : children_)
        if (c.is_worker) w.push_back(&c);
    return w;
}

Status Launcher::plan(const RunOptions& ro) {
    MM_ASSIGN_OR_RETURN(cfg_, load_cluster_config(o_.cluster));
    model_ = ro.model.empty() ? cfg_.model_path : ro.model;
    if (model_.empty()) return MM_ERROR("%s: no 'model:' in the file and no --model given", o_.cluster.c_str());
    // Validate the placement against the model now: a bad file should fail before any process starts.
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::open(model_));
    MM_ASSIGN_OR_RETURN(ModelConfig mc, load_model_config(*file));
    MM_ASSIGN_OR_RETURN(OwnershipMap map, resolve_placement(cfg_, mc, file.get()));
    (void)map;

    const std::string dir = exe_dir();
    const std::string worker_bin = dir + "/moemesh-worker";
    const std::string coordinator_bin = dir + "/moemesh-coordinator";
    const char* tmp = std::getenv("TMPDIR");
    run_dir_ = std::string(tmp && *tmp ? tmp : "/tmp") + "/moemesh-launch-" + std::to_string(getpid());

    for (const WorkerConfig& w : cfg_.workers) {
        if (w.transport == Transport::kInproc || !w.address) {
            logf("worker '%s' runs inside the coordinator (transport inproc)", w.name.c_str());
            continue;
        }
        std::string why;
        const Transport t = resolve_transport(cfg_, w, &why);
        if (w.transport == Transport::kAuto)
            logf("worker '%s': transport auto -> %s (%s)", w.name.c_str(), transport_name(t), why.c_str());
        if (!is_local(*w.address)) {
            logf("worker '%s' at %s is remote: expected to be running already (moemesh-worker --model ... "
                 "--listen %s --name %s on that host; see deploy/README.md)",
                 w.name.c_str(), w.address->str().c_str(), w.address->str().c_str(), w.name.c_str());
            continue;
        }
        if (w.tls.enabled()) {
            // `tls:` is the coordinator's side (CA to verify the worker, client certificate): the
            // worker's own certificate is not in the file, so the launcher cannot start it.
            logf("worker '%s' at %s uses TLS: not started here; start it with moemesh-worker --model ... --listen %s "
                 "--name %s --tls-cert ... --tls-key ... (see deploy/tls/README.md)",
                 w.name.c_str(), w.address->str().c_str(), w.address->str().c_str(), w.name.c_str());
            continue;
        }
        if (access(worker_bin.c_str(), X_OK) != 0)
            return MM_ERROR("cannot run %s (%s): the worker binary is looked for next to moemesh", worker_bin.c_str(),
                            std::strerror(errno));
        Child c;
        c.name = w.name;
        c.address = w.address;
        c.log_path = run_dir_ + "/" + w.name + ".log";
        c.argv = {worker_bin, "--model", model_, "--listen", w.address->str(), "--name", w.name};
        if (w.threads > 0) c.argv.insert(c.argv.end(), {"--threads", std::to_string(w.threads)});
        // The YAML's device; its cache: entry travels in the handshake, so no cache flags here.
        if (w.device.kind == Device::Kind::kCuda) c.argv.insert(c.argv.end(), {"--device", w.device.str()});
        children_.push_back(std::move(c));
    }
    if (generate_) {
        if (access(coordinator_bin.c_str(), X_OK) != 0)
            return MM_ERROR("cannot run %s (%s): the coordinator binary is looked for next to moemesh",
                            coordinator_bin.c_str(), std::strerror(errno));
        Child c;
        c.name = "coordinator";
        c.is_worker = false;
        c.argv = {coordinator_bin, "--cluster", o_.cluster};
        c.argv.insert(c.argv.end(), coordinator_args_.begin(), coordinator_args_.end());
        children_.push_back(std::move(c));
    }
    return Status();
}

Status Launcher::start_workers() {
    if (!workers().empty()) {
        std::error_code ec;
        fs::create_directories(run_dir_, ec);
        if (ec) return MM_ERROR("cannot create the run dir %s: %s", run_dir_.c_str(), ec.message().c_str());
    }
    for (Child* w : workers()) MM_RETURN_IF_ERROR(prepare_address(w->name, *w->address));
    for (Child* w : workers()) {
        MM_RETURN_IF_ERROR(spawn(*w));
        logf("started worker '%s' (pid %d) on %s, log %s", w->name.c_str(), static_cast<int>(w->pid),
             w->address->str().c_str(), w->log_path.c_str());
    }
    return Status();
}

void Launcher::on_exit(Child& c, int st) {
    c.pid = -1;
    c.exited = true;
    c.exit_status = st;
    drain_output(c);
    if (!c.is_worker) {
        coordinator_done_ = true;
        coordinator_status_ = st;
        return;
    }
    if (stopping_) return;
    had_failures_ = true;
    if (startup_) {
        if (!failed_at_startup_) failed_at_startup_ = &c;
        return;
    }
    const double up = secs(Clock::now() - c.started);
    if (o_.no_restart) {
        logf("worker '%s' %s after %.1f s; not restarting it (--no-restart)", c.name.c_str(), describe_exit(st).c_str(),
             up);
        return;
    }
    if (Clock::now() - c.started >= kStableUptime) c.backoff = kRestartBackoffMin;
    logf("worker '%s' %s after %.1f s; restarting it in %.1f s (log %s)", c.name.c_str(), describe_exit(st).c_str(),
         up, secs(c.backoff), c.log_path.c_str());
    c.restart_pending = true;
    c.restart_at = Clock::now() + c.backoff;
    c.backoff = std::min(c.backoff * 2, kRestartBackoffMax);
}

void Launcher::step(Ms wait) {
    std::vector<pollfd> fds;
    fds.push_back({g_sig_pipe[0], POLLIN, 0});
    for (Child& c : children_)
        if (c.out_fd >= 0) fds.push_back({c.out_fd, POLLIN, 0});
    // Wake in time for a pending restart.
    if (!stopping_)
        for (const Child& c : children_)
            if (c.restart_pending)
                wait = std::min(wait, std::max(Ms(0), std::chrono::duration_cast<Ms>(c.restart_at - Clock::now())));
    const int n = poll(fds.data(), fds.size(), static_cast<int>(wait.count()));
    if (n > 0 && (fds[0].revents & POLLIN)) {
        unsigned char sigs[64];
        ssize_t k;
        while ((k = read(g_sig_pipe[0], sigs, sizeof(sigs))) > 0)
            for (ssize_t i = 0; i < k; ++i)
                if (sigs[i] != SIGCHLD && stop_signal_ == 0) stop_signal_ = sigs[i];
    }
    for (Child& c : children_) drain_output(c);
    // Reap: SIGCHLD may coalesce, so ask for every child each round.
    for (;;) {
        int st = 0;
        const pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0) break;
        for (Child& c : children_)
            if (c.pid == pid) on_exit(c, st);
    }
    if (stopping_) return;
    for (Child& c : children_) {
        if (!c.restart_pending || Clock::now() < c.restart_at) continue;
        c.restart_pending = false;
        if (c.address && c.address->kind == Address::Kind::kUnix) unlink(c.address->path.c_str());
        Status st = spawn(c);
        if (!st.ok()) {
            logf("worker '%s': restart failed: %s", c.name.c_str(), st.message().c_str());
            c.restart_pending = true;
            c.restart_at = Clock::now() + c.backoff;
        } else {
            logf("restarted worker '%s' (pid %d)", c.name.c_str(), static_cast<int>(c.pid));
        }
    }
    // A worker that does not print its "listening" line (or whose line we missed) is still detected.
    for (Child& c : children_)
        if (c.is_worker && alive(c) && !c.ready && Clock::now() - c.started >= kProbeAfter && c.address &&
            accepts_connections(*c.address))
            c.ready = true;
}

void Launcher::stop_all() {
    stopping_ = true;
    bool any = false;
    for (Child& c : children_)
        if (alive(c)) {
            kill(c.pid, SIGTERM);
            any = true;
        }
    if (!any) return;
    const auto deadline = Clock::now() + Ms(o_.stop_timeout_ms);
    for (;;) {
        bool left = false;
        for (const Child& c : children_) left = left || alive(c);
        if (!left) break;
        const auto now = Clock::now();
        if (now >= deadline) {
            for (Child& c : children_) {
                if (!alive(c)) continue;
                logf("%s '%s' (pid %d) did not stop within %d ms; killing it", c.is_worker ? "worker" : "process",
                     c.name.c_str(), static_cast<int>(c.pid), o_.stop_timeout_ms);
                kill(c.pid, SIGKILL);
                int st = 0;
                while (waitpid(c.pid, &st, 0) < 0 && errno == EINTR) {
                }
                on_exit(c, st);
            }
            break;
        }
        step(std::min(Ms(100), std::chrono::duration_cast<Ms>(deadline - now) + Ms(1)));
    }
    for (Child& c : children_) drain_output(c);
}

int Launcher::finish(int code) {
    stop_all();
    for (Child& c : children_) {
        if (c.log_fd >= 0) close(c.log_fd), c.log_fd = -1;
        if (c.out_fd >= 0) close(c.out_fd), c.out_fd = -1;
    }
    if (!run_dir_.empty() && fs::exists(run_dir_)) {
        if (had_failures_ || (code != 0 && stop_signal_ == 0)) {
            logf("worker logs kept in %s", run_dir_.c_str());
        } else {
            std::error_code ec;
            fs::remove_all(run_dir_, ec);
        }
    }
    return code;
}

int Launcher::run(const RunOptions& ro) {
    Status st = plan(ro);
    if (!st.ok()) {
        std::fprintf(stderr, "error: %s\n", st.message().c_str());
        return 1;
    }
    st = install_signal_handlers();
    if (st.ok()) st = start_workers();
    if (!st.ok()) {
        std::fprintf(stderr, "error: %s\n", st.message().c_str());
        return finish(1);
    }

    // Startup: every spawned worker listening.
    const auto t0 = Clock::now();
    auto next_progress = t0 + kProgressEvery;
    std::vector<Child*> ws = workers();
    std::set<Child*> announced;
    for (;;) {
        for (Child* w : ws)
            if (w->ready && !announced.count(w)) {
                announced.insert(w);
                logf("[%zu/%zu] worker '%s' up on %s (%.1f s)", announced.size(), ws.size(), w->name.c_str(),
                     w->address->str().c_str(), secs(Clock::now() - t0));
            }
        if (stop_signal_ != 0) {
            logf("got %s during startup; stopping", sigabbrev_np(stop_signal_) ? sigabbrev_np(stop_signal_) : "a signal");
            return finish(128 + stop_signal_);
        }
        if (failed_at_startup_) {
            Child& c = *failed_at_startup_;
            std::fprintf(stderr, "error: worker '%s' %s before it was listening on %s; last lines of %s:\n%s",
                         c.name.c_str(), describe_exit(c.exit_status).c_str(), c.address->str().c_str(),
                         c.log_path.c_str(), tail_text(c).c_str());
            return finish(1);
        }
        if (announced.size() == ws.size()) break;
        const auto now = Clock::now();
        if (now - t0 >= Ms(o_.start_timeout_ms)) {
            std::string waiting;
            for (Child* w : ws)
                if (!w->ready) waiting += (waiting.empty() ? "'" : ", '") + w->name + "'";
            std::fprintf(stderr, "error: worker(s) %s not listening after %d ms (--start-timeout-ms)\n",
                         waiting.c_str(), o_.start_timeout_ms);
            had_failures_ = true;
            return finish(1);
        }
        if (now >= next_progress) {
            std::string waiting;
            for (Child* w : ws)
                if (!w->ready) waiting += (waiting.empty() ? "" : ", ") + w->name;
            logf("waiting for %zu of %zu workers to listen (%s) %.0f s", ws.size() - announced.size(), ws.size(),
                 waiting.c_str(), secs(now - t0));
            next_progress = now + kProgressEvery;
        }
        step(Ms(100));
    }
    startup_ = false;
    if (!ws.empty()) logf("all %zu local workers listening (%.1f s)", ws.size(), secs(Clock::now() - t0));

    Child* coordinator = nullptr;
    if (generate_) {
        coordinator = &children_.back();
        st = spawn(*coordinator);
        if (!st.ok()) {
            std::fprintf(stderr, "error: cannot start the coordinator: %s\n", st.message().c_str());
            return finish(1);
        }
    } else {
        std::printf("cluster ready: %zu workers; Ctrl-C to stop\n", cfg_.workers.size());
        std::fflush(stdout);
    }

    for (;;) {
        if (stop_signal_ != 0) {
            logf("got SIG%s; stopping %zu process(es)", sigabbrev_np(stop_signal_) ? sigabbrev_np(stop_signal_) : "?",
                 static_cast<size_t>(std::count_if(children_.begin(), children_.end(), alive)));
            return finish(128 + stop_signal_);
        }
        if (coordinator_done_) {
            const int code = exit_code_of(coordinator_status_);
            if (code != 0) logf("the coordinator %s", describe_exit(coordinator_status_).c_str());
            return finish(code);
        }
        if (!generate_ && o_.no_restart && !ws.empty() &&
            std::none_of(ws.begin(), ws.end(), [](const Child* w) { return alive(*w); })) {
            logf("every local worker has exited (--no-restart); stopping");
            return finish(1);
        }
        for (Child* w : ws)
            if (alive(*w) && w->ready && !announced.count(w)) {
                announced.insert(w);
                logf("worker '%s' is listening again", w->name.c_str());
            } else if (!alive(*w) || !w->ready) {
                announced.erase(w);
            }
        step(Ms(1000));
    }
}

}  // namespace

void register_launch_command(CLI::App& app) {
    auto ro = std::make_shared<RunOptions>();
    auto lo = std::make_shared<LaunchOptions>();
    CLI::App* c = app.add_subcommand(
        "launch",
        "Start a local cluster from a placement YAML: one moemesh-worker per local worker (unix: or loopback\n"
        "address; remote ones must already run), wait until all listen, then generate once with\n"
        "moemesh-coordinator (--prompt/--tokens/--stdin: the options of `moemesh run` pass through) or keep\n"
        "the workers up until Ctrl-C/SIGTERM. Workers that die are restarted unless --no-restart.");
    c->footer(
        "Examples:\n"
        "  moemesh launch deploy/examples/local-cpu.yaml --model model.gguf --prompt \"Hello\" -n 32\n"
        "  moemesh launch cluster.yaml --tokens 1,2,3 --top 20 -n 8 --json > out.json\n"
        "  moemesh launch cluster.yaml          # workers stay up until Ctrl-C\n"
        "Worker output goes to $TMPDIR/moemesh-launch-PID/NAME.log and to stderr as \"[NAME] ...\".\n"
        "Exit status: the coordinator's; 1 when the file is bad or a worker cannot start; 130/143 on SIGINT/SIGTERM.");
    add_run_options(c, ro, /*cluster_required=*/false);
    c->remove_option(c->get_option("--cluster"));
    c->get_option("--model")->description("GGUF model file (default: the cluster file's 'model:'); for workers and coordinator");
    auto* pos = c->add_option("cluster", lo->cluster, "Cluster YAML (see deploy/examples)")->required()->check(CLI::ExistingFile);
    auto* nr = c->add_flag("--no-restart", lo->no_restart, "Do not restart a worker that dies while the cluster runs");
    auto* stop = c->add_option("--stop-timeout-ms", lo->stop_timeout_ms,
                               "On stop, wait this long after SIGTERM before SIGKILL")
                     ->capture_default_str()
                     ->check(CLI::Range(0, 3600000));
    auto* start = c->add_option("--start-timeout-ms", lo->start_timeout_ms,
                                "Give up when a worker is not listening after this long")
                      ->capture_default_str()
                      ->check(CLI::Range(1, 86400000));
    const std::set<const CLI::Option*> own = {pos, nr, stop, start};
    c->callback([c, ro, lo, own] {
        // Everything given that is not the launcher's own goes to moemesh-coordinator as written.
        std::vector<std::string> pass;
        for (const CLI::Option* opt : c->get_options()) {
            if (own.count(opt) || opt->count() == 0 || opt == c->get_help_ptr()) continue;
            const std::string name = !opt->get_lnames().empty() ? "--" + opt->get_lnames()[0] : "-" + opt->get_snames()[0];
            if (opt->get_expected_max() == 0) {  // a flag
                if (opt->as<bool>()) pass.push_back(name);
                continue;
            }
            for (const std::string& v : opt->results()) {
                pass.push_back(name);
                pass.push_back(v);
            }
        }
        const bool generate = !ro->prompt.empty() || !ro->tokens.empty() || ro->stdin_requests || !ro->serve.empty() ||
                              ro->interactive;
        if (!generate && !pass.empty() && !(pass.size() == 2 && pass[0] == "--model"))
            logf("generation options are ignored without --prompt, --tokens, --stdin, --serve or --chat --interactive");
        Launcher l(*lo, std::move(pass), generate);
        std::fflush(stdout);
        std::exit(l.run(*ro));
    });
}

}  // namespace moemesh
