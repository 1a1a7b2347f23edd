// libFuzzer target: the cluster YAML loader, validation and the summary on arbitrary text.
// Built with -DMOEMESH_FUZZ=ON (clang). Seeds: deploy/examples/*.yaml, tests/data/placement/*.yaml.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/placement.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string text(reinterpret_cast<const char*>(data), size);
    auto cfg = moemesh::parse_cluster_config(text, "fuzz.yaml", "/base");
    if (!cfg.ok()) return 0;
    for (auto [layers, experts] : {std::pair{48, 128}, std::pair{2, 8}}) {
        moemesh::ModelConfig m;
        m.n_layer = layers;
        m.n_expert = experts;
        auto map = moemesh::resolve_placement(cfg.value(), m, nullptr);
        if (map.ok()) (void)moemesh::placement_summary(cfg.value(), map.value());
    }
    return 0;
}
