// Subcommands of the `moemesh` CLI. Each adds itself to the app; main stays thin.
#pragma once
#include <CLI/CLI.hpp>

namespace moemesh {

void register_run_command(CLI::App& app);
void register_tokenize_command(CLI::App& app);
void register_inspect_command(CLI::App& app);
void register_make_model_command(CLI::App& app);  // tools/make_model.cpp
void register_placement_command(CLI::App& app);   // tools/placement_command.cpp
void register_launch_command(CLI::App& app);      // tools/launch_command.cpp
void register_profile_command(CLI::App& app);     // tools/profile_command.cpp

// Default thread count for commands that compute: all cores.
int default_threads();

}  // namespace moemesh
