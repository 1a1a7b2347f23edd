#!/usr/bin/env bash
# Decode tokens/s of the GPU-resident model (`moemesh run --device cuda:0`) on a synthetic model
# shaped like Qwen3-30B-A3B per layer (hidden 2048, 128 experts top-8, expert ff 768, 32/4 heads of
# 128, vocab 151936), against the bandwidth roofline: bytes of weights one decoded token touches
# (every non-expert weight but one token_embd row, plus top-k/E of the expert weights; KV cache not
# counted) ÷ the device's copy bandwidth (bench_cuda_gemv's D2D copy, read + write counted).
#
# The model is generated where this runs: make-model --fast-weights on every core (Q8_0/Q4_K blocks
# written directly; seconds for all 48 layers, the time is printed), kept in --dir while it exists, so
# bench_cuda_offload.sh reuses the Q4_K file. --skew S: make-model --router-skew S (stable popular
# experts, as real routers have; it changes which experts a token picks, not how many, so the bytes
# touched per token and this bench's roofline do not depend on it).
#
#   bench/bench_cuda_decode.sh [--moemesh BIN] [--gemv BIN] [--layers 48] [--types "q4_k q8_0"]
#                              [--gen N] [--reps N] [--dir DIR] [--keep | --keep-types "q4_k"]
#                              [--device cuda:0] [--graphs "0 1"] [--skew 8] [--threads N]
#
# --graphs: one row per MOEMESH_CUDA_GRAPHS value (1: decode steps replayed from a CUDA graph, the
# default; 0: launched op by op), same file, same card, side by side. Files are removed after their
# rows unless --keep (all) or their type is in --keep-types. Disk: ~17 GB (Q4_K), ~32 GB (Q8_0) at 48 layers.
set -euo pipefail

MOEMESH=${MOEMESH:-build-cuda/moemesh}
GEMV=${GEMV:-}
LAYERS=48
TYPES="q4_k q8_0"
SKEW=8
THREADS=$(nproc)
KEEP_TYPES=""
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
    --keep-types) KEEP_TYPES=$2; shift 2 ;;
    --skew) SKEW=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --graphs) GRAPHS=$2; shift 2 ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
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
printf '\n| type | graphs | layers | MB touched/token | prompt t/s | decode t/s | ms/token | achieved GB/s | roofline t/s (%s GB/s) | %% of roofline | make-model s (%s threads) |\n' "$BW" "$THREADS"
printf '|---|---|---|---|---|---|---|---|---|---|---|\n'
for T in $TYPES; do
  # Same name and flags as bench_cuda_offload.sh's model, which reuses the file.
  M="$DIR/q30b-L$LAYERS-$T-fast-skew$SKEW.gguf"
  if [ ! -f "$M" ]; then
    # Bits per weight of the file (every matrix in $T; norms and routers are < 0.1%), and room for it.
    need=$(awk -v L="$LAYERS" -v t="$T" 'BEGIN { b = (t == "q4_k") ? 4.5 : (t == "q8_0") ? 8.5 : (t == "q6_k") ? 6.5625 : 16;
      p = 2 * 2048 * 151936 + L * (2048 * (4096 + 512 + 512) + 4096 * 2048 + 2048 * 128 + 3 * 2048 * 768 * 128);
      printf "%.0f", p * b / 8 / 1e9 * 1.02 + 1 }')
    have=$(df -P -B1G "$DIR" | awk 'NR == 2 { print $4 }')
    if [ "$have" -lt "$need" ]; then
      echo "| $T | - | $LAYERS | skipped: $M needs ~$need GB, $DIR has $have GB free |"
      continue
    fi
    t0=$(date +%s%N)
    "$MOEMESH" make-model --arch qwen3moe --out "$M" --layers "$LAYERS" --hidden 2048 --heads 32 --kv-heads 4 \
      --head-dim 128 --experts 128 --top-k 8 --expert-ff 768 --vocab 151936 --type "$T" --seed 1 \
      --router-skew "$SKEW" --fast-weights --threads "$THREADS" >/dev/null 2>"$DIR/make-$T.log" ||
      { cat "$DIR/make-$T.log" >&2; exit 1; }
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "generated $M ($(du -h "$M" | cut -f1)) in $ms ms: $(grep 'parameters in' "$DIR/make-$T.log" | sed 's/^make-model: //')" >&2
    MADE=$(awk -v ms="$ms" 'BEGIN { printf "%.1f", ms / 1000 }')
  else
    MADE="reused"
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
      MOEMESH_CUDA_GRAPHS=$G "$MOEMESH" run --model "$M" --device "$DEVICE" --tokens "$PROMPT" -n "$GEN" --greedy --ignore-eos \
        --ctx 512 2>"$DIR/run.err" >/dev/null || true
      line=$(grep 'decode:' "$DIR/run.err" | tail -n 1 || true)
      echo "  $T graphs=$G rep $r: ${line:-failed: $(tail -n 1 "$DIR/run.err")}" >&2
      [ -n "$line" ] || continue
      tps=$(echo "$line" | sed -n 's/.*decode: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
      ptps=$(echo "$line" | sed -n 's/^prompt: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
      if [ -z "$best" ] || awk -v a="$tps" -v b="$best" 'BEGIN { exit !(a > b) }'; then best=$tps; prompt_tps=$ptps; fi
    done
    if [ -z "$best" ]; then echo "| $T | $G | $LAYERS | failed: $(tail -n 1 "$DIR/run.err") |"; continue; fi
    awk -v t="$T" -v g="$G" -v L="$LAYERS" -v B="$TOUCHED" -v tps="$best" -v p="$prompt_tps" -v bw="$BW" -v made="$MADE" 'BEGIN {
      roof = bw * 1e9 / B
      printf "| %s | %s | %d | %.1f | %s | %.1f | %.3f | %.0f | %.0f | %.1f%% | %s |\n", t, g, L, B / 1e6, p, tps, 1000 / tps, B * tps / 1e9, roof, 100 * tps / roof, made }'
  done
  [ "$KEEP" = 1 ] || [[ " $KEEP_TYPES " == *" $T "* ]] || rm -f "$M"
done
