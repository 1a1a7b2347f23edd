#!/usr/bin/env bash
# moemesh vs llama.cpp prompt/decode tokens/s on ~1B-parameter synthetic qwen3moe models (Q8_0, Q4_K).
#   bash bench/bench_vs_llama.sh [--threads N] [--reps R] [--keep-models DIR] [--types q8_0,q4_k] [--help]
# See bench/README.md. The work is done by bench_vs_llama.py (python3, standard library only).
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/bench_vs_llama.py" "$@"
