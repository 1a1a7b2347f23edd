#!/usr/bin/env bash
# Where a GPU decode step's time goes, op by op (MOEMESH_CUDA_PROFILE=1: each op timed between CUDA
# events, graphs off; see coordinator/cuda_backend.cpp): the table moemesh prints at exit, for the
# resident model and, with --budget, for offload through the VRAM expert cache (its MoE then shows as
# host wall time per call).
#
#   bash bench/profile_cuda_decode.sh [--moemesh BIN] [--dir DIR] [--model F] [--layers 48] [--type q4_k]
#                                     [--gen 32] [--budget 8GiB] [--device cuda:0]
#
# The model: --model, else bench_cuda_decode.sh's file in --dir (q30b-L<layers>-<type>-fast-skew8.gguf),
# else a 4-layer file of that shape made here with make-model --fast-weights (seconds) and removed after.
set -euo pipefail
MOEMESH=${MOEMESH:-build-cuda/moemesh}
DIR=${TMPDIR:-/tmp}/moemesh-bench-cuda
MODEL=""
LAYERS=48
TYPE=q4_k
GEN=32
BUDGET=""
DEVICE=cuda:0
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "profile_cuda_decode.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
MADE=""
if [ -z "$MODEL" ]; then
  MODEL="$DIR/q30b-L$LAYERS-$TYPE-fast-skew8.gguf"
  if [ ! -f "$MODEL" ]; then
    MODEL="$DIR/q30b-L4-$TYPE-fast-profile.gguf"
    "$MOEMESH" make-model --arch qwen3moe --out "$MODEL" --layers 4 --hidden 2048 --heads 32 --kv-heads 4 \
      --head-dim 128 --experts 128 --top-k 8 --expert-ff 768 --vocab 151936 --type "$TYPE" --seed 1 \
      --fast-weights --threads "$(nproc)" --router-skew 8 >"$DIR/profile-make.log" 2>&1 ||
      { tail -n 5 "$DIR/profile-make.log" >&2; exit 1; }
    MADE=$MODEL
  fi
fi
trap '[ -n "$MADE" ] && rm -f "$MADE"' EXIT
# Token ids below 1000, so that any model (a small test file too) takes them.
PROMPT=$(seq 1 16 | awk '{printf "%s%d", (NR>1?",":""), ($1*7919)%997}')
profile() {  # title, extra flags
  echo
  echo "### $1: $(basename "$MODEL"), 16-token prompt + $GEN decoded tokens"
  local log="$DIR/profile-$(echo "$1" | tr -c 'a-z0-9' '_').log"
  if ! MOEMESH_CUDA_PROFILE=1 "$MOEMESH" run --model "$MODEL" --device "$DEVICE" --tokens "$PROMPT" -n "$GEN" \
      --greedy --ignore-eos $2 >/dev/null 2>"$log"; then
    echo "failed: $(tail -n 3 "$log")"
    return 0
  fi
  grep -E "decode:|prompt:" "$log" | head -2
  sed -n '/op profile/,/^| all |/p' "$log"
}
profile "resident" ""
[ -n "$BUDGET" ] && profile "offload, device budget $BUDGET, lfu" "--device-budget $BUDGET --cache-policy lfu"
exit 0
