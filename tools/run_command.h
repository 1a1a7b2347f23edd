// Generation as `moemesh run` and `moemesh-coordinator` do it: one process owning the sequence,
// experts in-process or on the workers of a cluster file.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "common/status.h"
#include "coordinator/sampler.h"

namespace moemesh {

struct RunOptions {
    std::string model;
    std::string cluster;  // placement YAML: experts on its workers
    int timeout_ms = 0;   // 0: the cluster file's value
    std::string prompt;
    std::string tokens;  // "1,2,3"
    bool stdin_requests = false;  // one request per stdin line
    bool chat = false;
    std::string system;              // --chat: a system message
    bool no_think = false;           // --chat: enable_thinking = false
    std::string chat_template_file;  // --chat / --serve: a Jinja template instead of the model's
    bool interactive = false;        // --chat: a conversation on stdin / stdout (tools/chat_command.h)
    bool verbose_prompt = false;     // --chat: print each rendered prompt on stderr
    int n_predict = 64;
    int top_n = 0;
    bool json = false;
    int threads = 0;
    int64_t ctx = 4096;
    int64_t batch = 512;
    std::string kv_type = "f16";
    std::string device = "cpu";  // cpu | cuda | cuda:N: where the forward pass runs (ModelOptions::device)
    bool ignore_eos = false;
    bool no_prefault = false;  // leave the model file's pages to the first request
    SamplerParams sp;
    // Offload mode (one process, experts served from a budgeted cache over the model file).
    std::string device_budget;  // "8GiB": enables it
    std::string host_budget;    // optional host tier below the device tier; "auto" with a CUDA device
    std::string cache_policy = "lru";
    std::string prefetch = "none";
    std::string profile;        // expert profile for --cache-policy static
    std::string storage = "auto";  // how the file is read: auto | pread | io_uring
    std::string serve;             // HOST:PORT: an OpenAI-compatible HTTP server (tools/http_server.h)
    int parallel = 4;              // --serve: requests generated together (continuous batching)
    std::string grammar_file;      // GBNF: every generated text matches it (common/grammar.h)
    std::string json_schema;       // a JSON schema (or @FILE): the reply is JSON that matches it
};

void add_run_options(CLI::App* c, const std::shared_ptr<RunOptions>& o, bool cluster_required);
Status run_generation(const RunOptions& o);

class GgufFile;
// `--host-budget auto`: the bytes of the file's routed experts (tensors named *_exps.*), or half of
// `available` (MemAvailable) if that is less; 0 (no host tier) below 256 MiB or when `available` is
// unknown (0). *note: what was chosen and why, for the start-up line.
uint64_t auto_host_budget(const GgufFile& f, uint64_t available, std::string* note);

}  // namespace moemesh
