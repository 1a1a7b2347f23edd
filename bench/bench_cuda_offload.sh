#!/usr/bin/env bash
# Offload decode on one GPU (issue 7): a Qwen3-30B-A3B-shaped model (48 layers, Q4_K, ~17 GB, its
# routed experts ~16 GB) whose experts exceed the device budget (default 8 GiB of VRAM), decoded by
# `moemesh run --device cuda:0 --device-budget B` with each cache policy (lru, lfu, static with a
# profile from `moemesh profile`, static + --prefetch next-layer), and fully resident for reference.
# Per run: decode tokens/s, device-tier hit rate, MB of missed experts moved to the device per token,
# stall ms/token, the PCIe bound ms/token (missed bytes per token ÷ the measured host→device
# bandwidth, bench_cuda_gemv's "H2D pinned") and stall/bound.
#
#   bash bench/bench_cuda_offload.sh [--moemesh BIN] [--gemv BIN] [--dir DIR] [--layers 48] [--type q4_k]
#        [--budget 8GiB | --budget 25%] [--gen 64] [--skew 8] [--threads N] [--device cuda:0 | cpu]
#        [--shape "make-model size flags"] [--bw GB/s] [--quick] [--keep]
#
# The model is bench_cuda_decode.sh's file (same name and flags: make-model --fast-weights, router skew
# 8, seed 1), reused from --dir when there, else made here (seconds) and removed at the end unless --keep.
# Per token = over the prompt's and the generated tokens of a run (the cache's counters cover both).
# --budget P%: that share of the routed experts' bytes. --device cpu: the same runs on the CPU (the
# device tier a bounded RAM pool; the bound then uses the cache's own reference bandwidth unless --bw),
# to test this script without a GPU, e.g. with --shape "--hidden 256 --heads 4 --kv-heads 2 --head-dim 64
# --experts 32 --top-k 4 --expert-ff 256 --vocab 4096" --layers 4 --budget 25%.
# --quick: 16 tokens decoded, a 2-prompt profile of 4 tokens each.
set -euo pipefail
MOEMESH=${MOEMESH:-build-cuda/moemesh}
GEMV=""
DIR=${TMPDIR:-/tmp}/moemesh-bench-cuda
LAYERS=48
TYPE=q4_k
BUDGET=8GiB
GEN=64
SKEW=8
THREADS=$(nproc)
DEVICE=cuda:0
SHAPE=""
BW=""
QUICK=0
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --gemv) GEMV=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --skew) SKEW=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --shape) SHAPE=$2; shift 2 ;;
    --bw) BW=$2; shift 2 ;;
    --quick) QUICK=1; GEN=16; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n 2,24p "$0"; exit 0 ;;
    *) echo "bench_cuda_offload.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$GEMV" ] || GEMV=$(dirname "$MOEMESH")/bench_cuda_gemv
mkdir -p "$DIR"
T_START=$(date +%s)

# ---- the model: bench_cuda_decode.sh's file when the shape is the default ----
QWEN="--hidden 2048 --heads 32 --kv-heads 4 --head-dim 128 --experts 128 --top-k 8 --expert-ff 768 --vocab 151936"
if [ -z "$SHAPE" ]; then
  M="$DIR/q30b-L$LAYERS-$TYPE-fast-skew$SKEW.gguf"
else
  M="$DIR/shape$(echo "$SHAPE" | cksum | cut -d' ' -f1)-L$LAYERS-$TYPE-fast-skew$SKEW.gguf"
fi
MADE=0
if [ -f "$M" ]; then
  echo "model: $M (reused)"
else
  t0=$(date +%s%N)
  # shellcheck disable=SC2086  # the shape is a list of flags
  "$MOEMESH" make-model --arch qwen3moe --out "$M" --layers "$LAYERS" ${SHAPE:-$QWEN} --type "$TYPE" --seed 1 \
    --router-skew "$SKEW" --fast-weights --threads "$THREADS" >/dev/null 2>"$DIR/offload-make.log" ||
    { cat "$DIR/offload-make.log" >&2; exit 1; }
  MADE=1
  echo "model: $M made in $(awk -v ms=$(( ($(date +%s%N) - t0) / 1000000 )) 'BEGIN { printf "%.1f", ms / 1000 }') s" \
       "($(grep 'parameters in' "$DIR/offload-make.log" | sed 's/^make-model: //'))"
fi
cleanup() { if [ "$MADE" = 1 ] && [ "$KEEP" = 0 ]; then rm -f "$M" "${M%.gguf}-profile.json"; fi; }
trap cleanup EXIT

# Bytes of routed experts, from `moemesh inspect`'s tensor table; a P% budget is that share of them.
EXPERTS=$("$MOEMESH" inspect "$M" | awk '$1 ~ /_exps\.weight$/ && $NF ~ /^[0-9]+$/ { b += $NF } END { printf "%.0f", b }')
[ "${EXPERTS:-0}" -gt 0 ] || { echo "no routed experts in $M (moemesh inspect)" >&2; exit 1; }
if [[ "$BUDGET" == *% ]]; then
  BUDGET=$(awk -v e="$EXPERTS" -v p="${BUDGET%\%}" 'BEGIN { printf "%.0f", e * p / 100 }')
fi

# ---- host→device bandwidth for the bound ----
BW_WHAT="H2D pinned, bench_cuda_gemv"
if [ -n "$BW" ]; then
  BW_WHAT="--bw"
elif [[ "$DEVICE" == cuda* ]]; then
  if ! grep -q 'H2D pinned [0-9.]* GB/s' "$DIR/gemv.txt" 2>/dev/null; then "$GEMV" 3 > "$DIR/gemv.txt"; fi
  BW=$(head -n 1 "$DIR/gemv.txt" | sed -n 's/.*H2D pinned \([0-9.]*\) GB\/s.*/\1/p')
  [ -n "$BW" ] || { echo "no H2D bandwidth from $GEMV: $(head -n 1 "$DIR/gemv.txt")" >&2; exit 1; }
else
  BW_WHAT="the cache's reference bandwidth (no GPU)"
fi

# ---- profile for the static policy (on the CPU: moemesh profile has no --device) ----
PROMPTS=$DIR/offload-prompts.txt
cat > "$PROMPTS" <<'P'
The history of the city begins with a small settlement on the river
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Translate to French: the weather is nice today and we are going to the beach
Write a short poem about the sea, the wind and the light of the morning
P
PN=16
if [ "$QUICK" = 1 ]; then sed -i 2q "$PROMPTS"; PN=4; fi
PROFILE=${M%.gguf}-profile.json
t0=$(date +%s)
"$MOEMESH" profile --model "$M" --prompts "$PROMPTS" --out "$PROFILE" -n "$PN" --threads "$THREADS" 2>"$DIR/offload-profile.log" ||
  { tail -n 5 "$DIR/offload-profile.log" >&2; exit 1; }
echo "profile: $(wc -l < "$PROMPTS") prompts, $PN tokens each, $(( $(date +%s) - t0 )) s on the CPU"

# 8 prompt tokens (few: the per-token figures are mostly decode's), ids valid in any vocab of >= 4096.
PROMPT_IDS="17,250,3,99,42,7,1024,4000"
run() {  # name, flags
  local err
  # shellcheck disable=SC2086
  err=$("$MOEMESH" run --model "$M" --device "$DEVICE" --tokens "$PROMPT_IDS" -n "$GEN" --greedy --ignore-eos \
          --ctx 512 --threads "$THREADS" $2 2>&1 >/dev/null) || true
  echo "$err" > "$DIR/offload-run-${1//[^a-z]/_}.log"
  # sed + awk, not python: the GPU machine is bare.
  local dec hit load ref
  dec=$(echo "$err" | sed -nE 's/^prompt: ([0-9]+) tokens.*decode: ([0-9]+) tokens in [0-9.]+ s \(([0-9.]+) tokens\/s\).*/\1 \2 \3/p' | tail -n 1)
  hit=$(echo "$err" | sed -nE 's/^cache: [a-z]+ [^:]*: ([0-9.]+)% hits \(([0-9]+)\/([0-9]+)\), ([0-9.]+) ([A-Za-z]+) in[^|]*, stall ([0-9.]+) s.*/\1 \2 \3 \4 \5 \6/p' | tail -n 1)
  ref=$(echo "$err" | sed -nE 's/^cache: [^|]*\(bound [0-9.]+ s at ([0-9.]+) GB\/s.*/\1/p' | tail -n 1)
  load=$(echo "$err" | sed -nE 's/^loaded .* in ([0-9.]+) s.*/\1/p' | tail -n 1)
  if [ -z "$dec" ]; then
    echo "| $1 | failed: $(echo "$err" | tail -n 1) |"
    return 0
  fi
  awk -v name="$1" -v dec="$dec" -v hit="$hit" -v bw="${BW:-$ref}" -v load="${load:--}" 'BEGIN {
    split(dec, d, " "); tokens = d[1] + d[2]; tps = d[3]
    if (hit == "") { printf "| %s | %.2f | - | - | - | - | - | %s |\n", name, tps, load; exit }
    split(hit, h, " ")
    unit["B"] = 1; unit["KiB"] = 2^10; unit["MiB"] = 2^20; unit["GiB"] = 2^30; unit["TiB"] = 2^40
    missed = h[4] * unit[h[5]]; stall = h[6]
    bound = bw > 0 ? missed / (bw * 1e9) : 0
    ratio = bound > 0 ? sprintf("%.2fx", stall / bound) : "-"
    printf "| %s | %.2f | %s%% (%s/%s) | %.1f | %.1f | %.2f | %s | %s |\n", name, tps, h[1], h[2], h[3],
           missed / tokens / 1e6, 1e3 * stall / tokens, 1e3 * bound / tokens, ratio, load }'
}

echo "device $DEVICE, $TYPE, $LAYERS layers; routed experts $(awk -v b="$EXPERTS" 'BEGIN { printf "%.2f GiB", b / 2^30 }'), device budget $BUDGET; $GEN tokens decoded"
echo "bound = MB of missed experts moved to the device per token / ${BW:-reference} GB/s ($BW_WHAT); per token = prompt + generated tokens"
echo
echo "| run | decode tokens/s | device hit rate | missed MB/token | stall ms/token | PCIe bound ms/token | stall/bound | load s |"
echo "|---|---|---|---|---|---|---|---|"
run "resident (no budget)" ""
run "lru" "--device-budget $BUDGET --cache-policy lru"
run "lfu" "--device-budget $BUDGET --cache-policy lfu"
run "static" "--device-budget $BUDGET --cache-policy static --profile $PROFILE"
run "static + next-layer prefetch" "--device-budget $BUDGET --cache-policy static --profile $PROFILE --prefetch next-layer"
if [ "$DEVICE" != cpu ]; then  # a pinned RAM tier below VRAM (CUDA only): device misses by DMA once read
  run "lru + pinned host (auto)" "--device-budget $BUDGET --cache-policy lru --host-budget auto"
fi
grep -h '^offload:' "$DIR/offload-run-lru.log" || true
echo "offload bench: $(( $(date +%s) - T_START )) s"
