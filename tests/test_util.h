// Helpers for tests that run real processes: our CLI and the llama.cpp reference harness.
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

namespace moemesh::testing {

inline std::string source_dir() { return MOEMESH_SOURCE_DIR; }
inline std::string moemesh_bin() {
    const char* b = std::getenv("MOEMESH_BIN");
    return b ? b : std::string(MOEMESH_BINARY_DIR) + "/moemesh";
}
inline std::string ref_dir() { return source_dir() + "/tests/ref"; }

// Runs `cmd` through the shell; returns its exit status and stdout (stderr goes to `err_file`
// when given, else is inherited).
inline int run_capture(const std::string& cmd, std::string* out, const std::string& err_file = "") {
    std::string full = cmd + (err_file.empty() ? "" : " 2>" + err_file);
    FILE* p = popen(full.c_str(), "r");
    if (!p) return -1;
    std::array<char, 65536> buf;
    size_t n;
    out->clear();
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out->append(buf.data(), n);
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

inline std::string read_file(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return "";
    std::string s;
    std::array<char, 65536> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) s.append(buf.data(), n);
    std::fclose(f);
    return s;
}

// Why the llama.cpp reference cannot run here, or "" if it can.
inline std::string reference_unavailable() {
    std::string out;
    if (run_capture("command -v node", &out) != 0) return "node is not on PATH (scripts/setup.sh installs it)";
    if (!std::filesystem::exists(ref_dir() + "/node_modules/node-llama-cpp"))
        return "tests/ref/node_modules/node-llama-cpp is missing (scripts/setup.sh runs npm install)";
    return "";
}

// A directory of this process's own (ctest runs test cases as parallel processes), removed at
// exit unless MOEMESH_KEEP_TMP is set.
inline std::string temp_dir(const std::string& name) {
    struct Cleanup {
        std::vector<std::string> dirs;
        ~Cleanup() {
            if (std::getenv("MOEMESH_KEEP_TMP")) return;
            std::error_code ec;
            for (const auto& d : dirs) std::filesystem::remove_all(d, ec);
        }
    };
    static Cleanup cleanup;
    std::string d = ::testing::TempDir() + "/moemesh_" + name + "_" + std::to_string(getpid());
    std::filesystem::create_directories(d);
    cleanup.dirs.push_back(d);
    return d;
}

}  // namespace moemesh::testing
