#!/usr/bin/env bash
# Expert cache benchmark (docs/cache.md): a synthetic qwen3moe model whose routed experts are 4x the
# device budget, decoded with each cache policy (lru, lfu, static, static + next-layer prefetch) and
# without a cache; prints decode tokens/s, device-tier hit rate, stall time per token against the
# bandwidth bound (bytes waited for from the file / reference read bandwidth), bytes read per token.
#
#   bash bench/bench_cache.sh [--moemesh build/moemesh] [--dir build/bench-models] [--threads N] [--gen 64]
#                             [--ratio 4] [--skew 8]
# --skew S: make-model --router-skew S (stable popular experts, as real routers have; 0: the
# uniform random router). The static policy's profile comes from 4 other prompts.
set -euo pipefail
MOEMESH=build/moemesh
DIR=build/bench-models
THREADS=$(nproc)
GEN=64
RATIO=4
SKEW=8
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --ratio) RATIO=$2; shift 2 ;;
    --skew) SKEW=$2; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
MODEL=$DIR/cache-bench-q8_0.gguf
[ "$SKEW" != 0 ] && MODEL=$DIR/cache-bench-q8_0-skew$SKEW.gguf
# 8 layers, hidden 1024, 64 experts top-8 of width 512, Q8_0: 64 x 8 experts of 1.6 MiB = 816 MiB of experts.
if [ ! -f "$MODEL" ]; then
  "$MOEMESH" make-model --arch qwen3moe --out "$MODEL" --layers 8 --hidden 1024 --heads 8 --kv-heads 2 \
    --head-dim 128 --experts 64 --top-k 8 --expert-ff 512 --vocab 8000 --type q8_0 --seed 7 --router-skew "$SKEW" >&2
fi
# Bytes of routed experts: 3 matrices of 512 x 1024 Q8_0 (34 bytes per 32 weights) per expert.
EXPERT=$(( 3 * 512 * 1024 / 32 * 34 ))
TOTAL=$(( EXPERT * 64 * 8 ))
BUDGET=$(( TOTAL / RATIO ))
PROMPTS=$DIR/cache-bench-prompts.txt
cat > "$PROMPTS" <<'P'
The history of the city begins with a small settlement on the river
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Translate to French: the weather is nice today and we are going to the beach
Write a short poem about the sea, the wind and the light of the morning
P
PROFILE=${MODEL%.gguf}-profile.json
"$MOEMESH" profile --model "$MODEL" --prompts "$PROMPTS" --out "$PROFILE" -n 32 --threads "$THREADS" 2>/dev/null
PROMPT="Once upon a time in a land far away there lived a curious engineer who"
# Reference storage bandwidth, measured outside moemesh as a check on the cache's own probe (the
# "reference" in its stats line): a sequential read of the model file (in the page cache after the
# make-model/profile runs above, as during the runs below) in expert-sized blocks.
DD_BW=$(dd if="$MODEL" of=/dev/null bs=1632k 2>&1 | sed -n 's/.*, \([0-9.,]* [GM]B\/s\)$/\1/p')
run() {  # name, flags
  local err
  err=$("$MOEMESH" run --model "$MODEL" --prompt "$PROMPT" -n "$GEN" --greedy --ignore-eos --threads "$THREADS" $2 2>&1 >/dev/null)
  python3 - "$1" "$err" <<'PY'
import re, sys
name, err = sys.argv[1], sys.argv[2]
dec = re.search(r"prompt: (\d+) tokens.*decode: (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", err)
hit = re.search(r"cache: \w+ [^:]*: ([\d.]+)% hits \((\d+)/(\d+)\).*?stall ([\d.]+) s(?: \(bound ([\d.]+) s at ([\d.]+) GB/s)?", err)
sto = re.search(r"storage(?: \((\w+)\))?: (\d+) reads, ([\d.]+) (\w+)", err)
if not dec:
    print(f"| {name} | failed: {err.strip().splitlines()[-1] if err.strip() else '?'} |")
    sys.exit(0)
tokens = int(dec.group(1)) + int(dec.group(2))
tps = float(dec.group(4))
if hit:
    unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[sto.group(4)]
    mib = float(sto.group(3)) * unit / (1 << 20)
    stall = float(hit.group(4))
    bound = float(hit.group(5)) if hit.group(5) else 0.0
    ratio = f"{stall / bound:.2f}x" if bound > 0 else "-"
    print(f"| {name} | {tps:.2f} | {hit.group(1)}% ({hit.group(2)}/{hit.group(3)}) | {1e3 * stall / tokens:.1f} | "
          f"{1e3 * bound / tokens:.1f} | {ratio} | {mib / tokens:.1f} | {hit.group(6) or '-'} |")
else:
    print(f"| {name} | {tps:.2f} | - | - | - | - | - | - |")
PY
}
echo "model: $MODEL (router skew $SKEW), routed experts $((TOTAL >> 20)) MiB, device budget $((BUDGET >> 20)) MiB (1/$RATIO), $THREADS threads, $GEN tokens decoded"
echo "sequential read of the model file (dd, 1632 KiB blocks): $DD_BW"
echo "(per token = over the prompt's and the generated tokens of one run, which the cache stats cover;"
echo " bound = bytes the requests waited for from the file / the cache's probed reference bandwidth)"
echo
echo "| policy | decode tokens/s | device hit rate | stall ms/token | bound ms/token | stall/bound | MiB read/token | reference GB/s |"
echo "|---|---|---|---|---|---|---|---|"
run "no cache (whole file mapped)" ""
run "lru" "--device-budget $BUDGET --cache-policy lru"
run "lfu" "--device-budget $BUDGET --cache-policy lfu"
run "static" "--device-budget $BUDGET --cache-policy static --profile $PROFILE"
run "static + next-layer prefetch" "--device-budget $BUDGET --cache-policy static --profile $PROFILE --prefetch next-layer"
run "lru + next-layer prefetch" "--device-budget $BUDGET --cache-policy lru --prefetch next-layer"
