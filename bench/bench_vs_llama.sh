#!/usr/bin/env bash
# moemesh vs llama.cpp prompt/decode tokens/s on synthetic qwen3moe (~1 B) or Qwen3-Next-shaped models.
#   bash bench/bench_vs_llama.sh [--arch qwen3moe|qwen3next] [--threads N] [--reps R] [--keep-models DIR] [--types q8_0,q4_k] [--help]
# See bench/README.md. The work is done by bench_vs_llama.py (python3, standard library only).
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/bench_vs_llama.py" "$@"
