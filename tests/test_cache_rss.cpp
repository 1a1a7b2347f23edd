// Budgets are hard limits in measured memory too (issue 7): `moemesh run --device-budget B` on a
// model whose routed experts are 4x B peaks (VmHWM) below
//     the non-expert bytes of the file (the part of the mmapped GGUF the forward pass pages in)
//   + B
//   + kProcessOverhead (binary and shared libraries, heap: tokenizer, KV cache, activations;
//     thread stacks; the bandwidth probe's one-expert buffer),
// the mapped GGUF itself never has its expert tensors paged in (the cache reads them with
// pread/io_uring into its own buffers), and the same run with a budget that holds every expert
// peaks above that bound (so the test fails if the budget were ignored).
//
// The child is the real binary in `--stdin --json` mode: after its first answer the test reads
// /proc/<pid>/status and /proc/<pid>/smaps, then closes stdin and the child exits.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/gguf.h"
#include "common/model_config.h"
#include "tests/test_util.h"
#include "worker/expert_executor.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using namespace moemesh::testing;

constexpr uint64_t kMiB = 1ull << 20;
// What a `moemesh run` process holds besides the model's non-expert weights and the expert cache
// (measured 14 MiB on Debian 12 x86-64 for this model: 12 MiB of binary and shared libraries, 2 MiB
// of heap; see docs/cache.md).
constexpr uint64_t kProcessOverhead = 32 * kMiB;
// Touching a page of a file mapping maps up to 64 KiB around it when those pages are in the page
// cache (the kernel's fault-around), so an expert tensor next to a touched non-expert tensor can
// show up to this much of its first or last bytes in the mapping's Rss without being read.
constexpr uint64_t kFaultAround = 64 * 1024;

std::string dir() {
    static const std::string d = temp_dir("cache_rss");
    return d;
}

// 4 layers, 32 experts top-4 of width 1024 over hidden 256, Q8_0: 128 experts of 816 KiB = 102 MiB
// of routed experts; about 2 MiB of everything else.
std::string model_path() {
    static const std::string p = [] {
        const std::string path = dir() + "/rss.gguf";
        std::string out;
        const std::string cmd = moemesh_bin() + " make-model --out " + path +
                                " --layers 4 --hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --experts 32 --top-k 4"
                                " --expert-ff 1024 --vocab 2000 --type q8_0 --seed 3";
        EXPECT_EQ(run_capture(cmd, &out, dir() + "/make.err"), 0) << read_file(dir() + "/make.err");
        return path;
    }();
    return p;
}

struct Measure {
    bool ok = false;
    std::string error;
    uint64_t hwm = 0, rss_anon = 0, rss_file = 0;  // bytes
    uint64_t gguf_rss = 0;                          // resident pages of the model file's mapping
    std::string answer, log;
};

uint64_t status_kib(const std::string& status, const std::string& key) {
    const size_t at = status.find(key + ":");
    if (at == std::string::npos) return 0;
    return std::stoull(status.substr(at + key.size() + 1)) * 1024;
}

// Starts `moemesh run --stdin --json <flags>`, sends one request, waits for its answer, measures.
Measure run_and_measure(const std::string& model, const std::string& flags) {
    Measure m;
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0) {
        m.error = "pipe failed";
        return m;
    }
    const std::string err_path = dir() + "/child.err";
    const std::string cmd = "exec " + moemesh_bin() + " run --model " + model +
                            " --stdin --json -n 8 --threads 2 --ignore-eos " + flags + " 2>" + err_path;
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);
        close(out[0]);
        execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    std::string req;
    for (int t = 1; t <= 32; ++t) req += std::to_string(t * 37) + (t < 32 ? "," : "\n");
    const bool sent = write(in[1], req.data(), req.size()) == static_cast<ssize_t>(req.size());
    char buf[4096];
    while (sent && m.answer.find('\n') == std::string::npos) {
        const ssize_t n = read(out[0], buf, sizeof buf);
        if (n <= 0) break;
        m.answer.append(buf, static_cast<size_t>(n));
    }
    if (m.answer.find('\n') != std::string::npos && m.answer.find("\"greedy\"") != std::string::npos) {
        const std::string proc = "/proc/" + std::to_string(pid);
        const std::string status = read_file(proc + "/status");
        m.hwm = status_kib(status, "VmHWM");
        m.rss_anon = status_kib(status, "RssAnon");
        m.rss_file = status_kib(status, "RssFile");
        // smaps: a mapping's header line ends with its path; its Rss line follows.
        std::ifstream smaps(proc + "/smaps");
        std::string line;
        bool in_model = false;
        const std::string canon = fs::canonical(model).string();
        while (std::getline(smaps, line)) {
            if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') < 16) {
                in_model = line.size() >= canon.size() && line.compare(line.size() - canon.size(), canon.size(), canon) == 0;
            } else if (in_model && line.rfind("Rss:", 0) == 0) {
                m.gguf_rss += std::stoull(line.substr(4)) * 1024;
            }
        }
        m.ok = m.hwm > 0;
    }
    close(in[1]);  // end of requests: the child exits
    int st = 0;
    waitpid(pid, &st, 0);
    close(out[0]);
    m.log = read_file(err_path);
    if (!m.ok) m.error = "no answer from the child (exit status " + std::to_string(st) + "): " + m.log;
    return m;
}

TEST(CacheRss, MeasuredPeakStaysWithinNonExpertBytesPlusBudgetPlusOverhead) {
    const std::string model = model_path();
    auto f = GgufFile::open(model);
    ASSERT_TRUE(f.ok()) << f.status().message();
    auto c = load_model_config(*f.value());
    ASSERT_TRUE(c.ok());
    // Routed-expert bytes (every *_exps tensor) and the rest of the file.
    uint64_t experts = 0;
    for (int l = 0; l < c.value().n_layer; ++l) {
        auto w = layer_expert_weights(*f.value(), c.value(), l);
        ASSERT_TRUE(w.ok()) << w.status().message();
        for (const Weight* m : {&w.value().gate, &w.value().up, &w.value().down})
            experts += m->matrix_bytes * static_cast<uint64_t>(c.value().n_expert);
    }
    const uint64_t file_bytes = fs::file_size(model);
    const uint64_t non_expert = file_bytes - experts;
    const uint64_t budget = experts / 4;
    ASSERT_GE(experts, 4 * budget);
    const uint64_t bound = non_expert + budget + kProcessOverhead;

    Measure b = run_and_measure(model, "--device-budget " + std::to_string(budget));
    ASSERT_TRUE(b.ok) << b.error;
    std::printf("budget %.1f MiB of %.1f MiB experts, non-expert %.1f MiB: VmHWM %.1f MiB (anon %.1f, file %.1f, "
                "model mapping %.1f), bound %.1f MiB\n",
                budget / double(kMiB), experts / double(kMiB), non_expert / double(kMiB), b.hwm / double(kMiB),
                b.rss_anon / double(kMiB), b.rss_file / double(kMiB), b.gguf_rss / double(kMiB), bound / double(kMiB));
    // The cache evicted (the budget was binding) and counted no byte above it.
    EXPECT_NE(b.log.find("evictions"), std::string::npos) << b.log;
    EXPECT_EQ(b.log.find(" 0 evictions"), std::string::npos) << b.log;
    // The mapping holds no more than the non-expert part, plus fault-around at both ends of each
    // expert tensor: the expert tensors themselves are never paged in through it.
    const uint64_t fault_around = 2 * kFaultAround * 3 * static_cast<uint64_t>(c.value().n_layer);
    EXPECT_LE(b.gguf_rss, non_expert + fault_around);
    EXPECT_LT(b.gguf_rss, non_expert + experts / 8);
    EXPECT_LE(b.hwm, bound);

    // Every expert cached (a budget that holds them all): the same process peaks above the bound,
    // so the check above would catch a cache that ignored its budget.
    Measure all = run_and_measure(model, "--device-budget " + std::to_string(2 * experts));
    ASSERT_TRUE(all.ok) << all.error;
    std::printf("budget %.1f MiB (everything): VmHWM %.1f MiB (anon %.1f), model mapping %.1f MiB\n",
                2 * experts / double(kMiB), all.hwm / double(kMiB), all.rss_anon / double(kMiB),
                all.gguf_rss / double(kMiB));
    EXPECT_GT(all.hwm, bound);
    EXPECT_EQ(all.answer, b.answer);  // and the tokens do not depend on the budget
}

}  // namespace
}  // namespace moemesh
