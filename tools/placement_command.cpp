// `moemesh placement check cluster.yaml [--model FILE.gguf]`: loads the cluster file, opens the model,
// validates the placement against it and prints who serves what, without starting anything.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/placement.h"

namespace moemesh {

namespace {

struct PlacementCheckOptions {
    std::string cluster;
    std::string model;  // overrides the file's `model:`
};

Status placement_check(const PlacementCheckOptions& o) {
    MM_ASSIGN_OR_RETURN(ClusterConfig cfg, load_cluster_config(o.cluster));
    std::string model = o.model.empty() ? cfg.model_path : o.model;
    if (model.empty()) return MM_ERROR("%s: no 'model' in the file and no --model given", o.cluster.c_str());
    cfg.model_path = model;
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::open(model));
    MM_ASSIGN_OR_RETURN(ModelConfig mc, load_model_config(*file));
    MM_ASSIGN_OR_RETURN(OwnershipMap map, resolve_placement(cfg, mc, file.get()));
    std::fputs(placement_summary(cfg, map).c_str(), stdout);
    std::puts("OK");
    return Status();
}

}  // namespace

void register_placement_command(CLI::App& app) {
    CLI::App* cmd = app.add_subcommand("placement", "Cluster placement files (which worker serves which experts)");
    cmd->require_subcommand(1);
    auto opts = std::make_shared<PlacementCheckOptions>();
    CLI::App* check = cmd->add_subcommand("check", "Validate a cluster YAML against its model and print the shards");
    check->add_option("cluster", opts->cluster, "Cluster YAML file")->required();
    check->add_option("--model,-m", opts->model, "Model GGUF (overrides the file's 'model')");
    check->callback([opts] {
        Status st = placement_check(*opts);
        if (!st.ok()) {
            std::fprintf(stderr, "%s\n", st.message().c_str());
            std::exit(1);
        }
    });
}

}  // namespace moemesh
