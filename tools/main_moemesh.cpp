// moemesh: the user CLI. Subcommands live in tools/*_command.cpp.
#include <cstdio>

#include "tools/commands.h"

int main(int argc, char** argv) {
    CLI::App app{
        "moemesh: serve Mixture-of-Experts language models across the GPUs and machines you own.\n"
        "qwen3moe, qwen3next and qwen35moe GGUF files on CPU (CUDA when built with it); experts in-process, from a\nbudgeted cache (--device-budget) or on worker processes (--cluster); an OpenAI-compatible HTTP API (serve)."};
    app.require_subcommand(1);
    app.set_version_flag("--version", "moemesh 0.1.0");
    moemesh::register_run_command(app);
    moemesh::register_tokenize_command(app);
    moemesh::register_inspect_command(app);
    moemesh::register_make_model_command(app);
    moemesh::register_placement_command(app);
    moemesh::register_launch_command(app);
    moemesh::register_profile_command(app);
    CLI11_PARSE(app, argc, argv);
    return 0;
}
