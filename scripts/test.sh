#!/usr/bin/env bash
# Sets up and runs every test: unit tests, parity with llama.cpp (node-llama-cpp), bad-input
# tests, and a bounded libFuzzer run over the GGUF parser.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEMESH_BUILD_DIR:-$ROOT/build}"
"$ROOT/scripts/setup.sh"
cd "$BUILD"
ctest --output-on-failure -j"$(nproc)" --timeout 900

# libFuzzer over the GGUF, placement and HTTP request parsers, the chat-template interpreter, the
# reply parser and the grammar engine / JSON schema converter, bounded time (clang; separate build dir).
FUZZ_BUILD="$ROOT/build-fuzz"
CC=clang CXX=clang++ cmake -S "$ROOT" -B "$FUZZ_BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEMESH_FUZZ=ON \
  -DMOEMESH_TESTS=OFF -DMOEMESH_CUDA=OFF >/dev/null
cmake --build "$FUZZ_BUILD" -j"$(nproc)" --target fuzz_gguf fuzz_placement fuzz_http fuzz_jinja \
  fuzz_chat_reply fuzz_grammar >/dev/null
for target in gguf placement http jinja chat_reply grammar; do
  seeds="$ROOT/tests/data/gguf_seeds"; [ "$target" = placement ] && seeds="$ROOT/tests/data/placement"
  [ "$target" = http ] && seeds="$ROOT/tests/data/http"
  [ "$target" = jinja ] && seeds="$ROOT/tests/data/chat_templates"
  [ "$target" = chat_reply ] && seeds="$ROOT/tests/data/chat_reply"
  [ "$target" = grammar ] && seeds="$ROOT/tests/data/grammar"
  mkdir -p "$FUZZ_BUILD/corpus_$target"
  echo "[test] fuzzing the $target parser for ${MOEMESH_FUZZ_SECONDS:-30} s"
  "$FUZZ_BUILD/fuzz_$target" -max_total_time="${MOEMESH_FUZZ_SECONDS:-30}" -rss_limit_mb=2048 -max_len=65536 \
    "$FUZZ_BUILD/corpus_$target" "$seeds" 2>&1 | tail -2
done
echo "[test] all tests passed"
