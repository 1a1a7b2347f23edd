// moemesh-coordinator: owns the sequences (attention, norms, router, sampling) and sends each MoE
// layer's rows to the workers named in the cluster file. Same options as `moemesh run --cluster`.
#include <cstdio>

#include "tools/run_command.h"

int main(int argc, char** argv) {
    CLI::App app{
        "moemesh-coordinator: run a model whose routed experts live on the workers of a cluster file.\n"
        "Connects to every worker (handshake: protocol version, model fingerprint, shard), waits for their\n"
        "shards to load, then generates. Example:\n"
        "  moemesh-coordinator --cluster cluster.yaml --prompt \"Hello\" -n 64"};
    auto o = std::make_shared<moemesh::RunOptions>();
    moemesh::add_run_options(&app, o, /*cluster_required=*/true);
    CLI11_PARSE(app, argc, argv);
    moemesh::Status st = moemesh::run_generation(*o);
    if (!st.ok()) {
        std::fprintf(stderr, "error: %s\n", st.message().c_str());
        return 1;
    }
    return 0;
}
