// moemesh-worker: serves the routed experts of one shard of a model to a coordinator over gRPC.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "worker/worker_service.h"

int main(int argc, char** argv) {
    moemesh::WorkerOptions o;
    CLI::App app{
        "moemesh-worker: holds a shard of a Mixture-of-Experts model's routed experts and computes them for a\n"
        "moemesh coordinator (gRPC service moemesh.v1.ExpertWorker).\n"
        "The shard is assigned by the coordinator at handshake; only its bytes are read from the model file.\n"
        "Stops cleanly on SIGINT/SIGTERM or the Shutdown call.\n\n"
        "Examples:\n"
        "  moemesh-worker --model m.gguf --listen unix:/run/moemesh/w1.sock --name w1\n"
        "  moemesh-worker --model m.gguf --listen 0.0.0.0:7701 --name gpu1 \\\n"
        "      --tls-cert w.pem --tls-key w.key --tls-ca ca.pem\n"
        "  moemesh-worker --model m.gguf --listen unix:/run/moemesh/g0.sock --name g0 --device cuda:0 \\\n"
        "      --device-budget 6GiB --host-budget 24GiB --cache-policy lfu\n\n"
        "Cache precedence: a coordinator whose placement gives this worker a `cache:` entry sends it in the\n"
        "handshake, and that config is used; the --device-budget/--host-budget/--cache-policy/--prefetch/\n"
        "--profile flags apply only to handshakes without one. With neither, the whole shard is loaded\n"
        "(into RAM on cpu, into VRAM on cuda:N)."};
    app.set_version_flag("--version", "moemesh-worker 0.1.0");
    app.add_option("--model,-m", o.model_path, "GGUF model file (the same file as the coordinator's)")
        ->required()
        ->check(CLI::ExistingFile);
    app.add_option("--listen,-l", o.listen,
                   "unix:/path/to/socket, or host:port (empty host: 127.0.0.1; port 0: any free port)")
        ->required();
    app.add_option("--name,-n", o.name, "Worker name, as in the placement file; checked at handshake")->required();
    app.add_option("--threads,-t", o.threads, "Compute threads (0: all hardware threads)")->capture_default_str();
    auto* cert = app.add_option("--tls-cert", o.tls_cert, "Serve TLS with this PEM certificate (chain)")
                     ->check(CLI::ExistingFile);
    auto* key = app.add_option("--tls-key", o.tls_key, "PEM private key of --tls-cert")->check(CLI::ExistingFile);
    cert->needs(key);
    key->needs(cert);
    app.add_option("--tls-ca", o.tls_ca, "PEM CA: require client certificates and verify them against it")
        ->check(CLI::ExistingFile)
        ->needs(cert);
    app.add_option("--device,-d", o.device,
                   "Where the experts are computed: cpu, or cuda:N (shard in VRAM, or a VRAM cache with a budget; "
                   "needs a CUDA build and device)")
        ->capture_default_str();
    std::string device_budget, host_budget, policy, prefetch, profile, storage;
    app.add_option("--device-budget", device_budget,
                   "Cache: serve the shard from a device tier of at most this size (e.g. 6GiB; VRAM on cuda:N, a RAM "
                   "pool on cpu) when the handshake has no cache config; auto (cuda:N): the VRAM free when the "
                   "coordinator connects, less 512 MiB of scratch");
    app.add_option("--host-budget", host_budget,
                   "Cache: a host RAM tier of this size (pinned on cuda:N) below the device tier (alone on cpu: one "
                   "RAM tier; alone on cuda:N: device tier = the shard's size within 90% of free VRAM)");
    app.add_option("--cache-policy", policy, "Cache: lru (default), lfu, or static (hot set from --profile)");
    app.add_option("--prefetch", prefetch, "Cache: none (default) or next-layer");
    app.add_option("--profile", profile, "Cache: expert profile (moemesh profile) for --cache-policy static")
        ->check(CLI::ExistingFile);
    app.add_option("--storage", storage,
                   "Cache: how missing experts are read from the model file: auto (default: io_uring when this build "
                   "and kernel allow it, else pread), pread, or io_uring");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 1;  // --help/--version: 0; bad flags: the message, then 1
    }

    auto cache = moemesh::worker_cache_from_flags(device_budget, host_budget, policy, prefetch, profile, storage,
                                                  o.device.rfind("cuda", 0) == 0);
    if (!cache.ok()) {
        std::fprintf(stderr, "moemesh-worker: error: %s\n", cache.status().message().c_str());
        return 1;
    }
    o.cache = std::move(cache).value();
    moemesh::Status st = moemesh::run_worker_server(o);
    if (!st.ok()) {
        std::fprintf(stderr, "moemesh-worker: error: %s\n", st.message().c_str());
        return 1;
    }
    return 0;
}
