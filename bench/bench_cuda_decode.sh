#!/usr/bin/env bash
# Decode tokens/s of the GPU-resident model (`moemesh run --device cuda:0`) on a synthetic model
# shaped like Qwen3-30B-A3B per layer (hidden 2048, 128 experts top-8, expert ff 768, 32/4 heads of
# 128, vocab 151936), against the bandwidth roofline: bytes of weights one decoded token touches
# (every non-expert weight but one token_embd row, plus top-k/E of the expert weights; KV cache not
# counted) ÷ the device's copy bandwidth (bench_cuda_gemv's D2D copy, read + write counted).
#
# The model is generated where this runs (make-model, up to 8 threads). Generating all 48 layers
# takes minutes, so the default is --layers 4 (the roofline is computed for the same file; per-layer
# time and the lm_head are reported apart so the 48-layer figure can be estimated).
#
#   bench/bench_cuda_decode.sh [--moemesh BIN] [--gemv BIN] [--layers N] [--types "q4_k q8_0"]
#                              [--gen N] [--reps N] [--dir DIR] [--keep] [--device cuda:0] [--graphs "0 1"]
#
# --graphs: one row per MOEMESH_CUDA_GRAPHS value (1: decode steps replayed from a CUDA graph, the
# default; 0: launched op by op), same file, same card, side by side.
set -euo pipefail

MOEMESH=${MOEMESH:-build-cuda/moemesh}
GEMV=${GEMV:-}
LAYERS=4
TYPES="q4_k q8_0"
GEN=128
REPS=2
DIR=${TMPDIR:-/tmp}/moemesh-bench-cuda
KEEP=0
DEVICE=cuda:0
GRAPHS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --gemv) GEMV=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --types) TYPES=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --device) DEVICE=$2; shift 2 ;;
    --graphs) GRAPHS=$2; shift 2 ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$GEMV" ] || GEMV=$(dirname "$MOEMESH")/bench_cuda_gemv
mkdir -p "$DIR"

# Device copy bandwidth (GB/s, read + write) from bench_cuda_gemv's header line.
"$GEMV" 3 > "$DIR/gemv.txt"
cat "$DIR/gemv.txt" >&2
hdr=$(head -n 1 "$DIR/gemv.txt")
echo "$hdr"
BW=$(echo "$hdr" | sed -n 's/.*D2D copy \([0-9.]*\) GB\/s.*/\1/p')
[ -n "$BW" ] || { echo "no copy bandwidth from $GEMV: $hdr" >&2; exit 1; }

PROMPT=$(seq 1 16 | awk '{printf "%s%d", (NR>1?",":""), ($1*7919)%151936}')
printf '\n| type | graphs | layers | MB touched/token | prompt t/s | decode t/s | ms/token | achieved GB/s | roofline t/s (%s GB/s) | %% of roofline |\n' "$BW"
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for T in $TYPES; do
  M="$DIR/q30b-L$LAYERS-$T.gguf"
  if [ ! -f "$M" ]; then
    t0=$(date +%s%N)
    "$MOEMESH" make-model --arch qwen3moe --out "$M" --layers "$LAYERS" --hidden 2048 --heads 32 --kv-heads 4 \
      --head-dim 128 --experts 128 --top-k 8 --expert-ff 768 --vocab 151936 --type "$T" --seed 1 >/dev/null 2>&1
    echo "made $M in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
  fi
  # Bytes touched per decoded token, from the tensor table of `moemesh inspect`.
  TOUCHED=$("$MOEMESH" inspect "$M" | awk '
    /hyper-parameters:/ { for (i = 1; i <= NF; ++i) { if ($i == "vocab") V = $(i+1) + 0; if ($i == "experts") E = $(i+1) + 0;
                          if ($i ~ /^top-/) { split($i, a, "-"); K = a[2] + 0 } } }
    $1 ~ /\.weight$/ && $NF ~ /^[0-9]+$/ { b = $NF + 0; if ($1 ~ /_exps\./) ex += b; else if ($1 == "token_embd.weight") em += b; else ot += b }
    END { printf "%.0f", ot + em / V + ex * K / E }')
  for G in $GRAPHS; do
    best=""; prompt_tps=""
    for r in $(seq 1 "$REPS"); do
      line=$(MOEMESH_CUDA_GRAPHS=$G "$MOEMESH" run --model "$M" --device "$DEVICE" --tokens "$PROMPT" -n "$GEN" --greedy --ignore-eos --ctx 512 \
               2>&1 >/dev/null | grep 'decode:' | tail -n 1)
      echo "  $T graphs=$G rep $r: $line" >&2
      tps=$(echo "$line" | sed -n 's/.*decode: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
      ptps=$(echo "$line" | sed -n 's/^prompt: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
      if [ -z "$best" ] || awk -v a="$tps" -v b="$best" 'BEGIN { exit !(a > b) }'; then best=$tps; prompt_tps=$ptps; fi
    done
    awk -v t="$T" -v g="$G" -v L="$LAYERS" -v B="$TOUCHED" -v tps="$best" -v p="$prompt_tps" -v bw="$BW" 'BEGIN {
      roof = bw * 1e9 / B
      printf "| %s | %s | %d | %.1f | %s | %.1f | %.3f | %.0f | %.0f | %.1f%% |\n", t, g, L, B / 1e6, p, tps, 1000 / tps, B * tps / 1e9, roof, 100 * tps / roof }'
  done
  [ "$KEEP" = 1 ] || rm -f "$M"
done
