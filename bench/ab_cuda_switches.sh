#!/usr/bin/env bash
# A/B runs of the CUDA backend's environment switches (docs/cuda.md, "Environment switches") on one
# model file, in one process each, alternating the values so that drift hits all alike:
# MOEMESH_CUDA_QX 1/norms/0, MOEMESH_CUDA_ATTN_V threads/warps, MOEMESH_CUDA_ATTN_MERGE fused/kernel,
# MOEMESH_CUDA_ROUTER fused/split, MOEMESH_CUDA_O_NORM fused/split, MOEMESH_CUDA_DOWN_COMBINE
# fused/split, MOEMESH_HOST_LOGITS 0/1 (greedy and top-k sampling),
# MOEMESH_CUDA_GRAPH_SEGMENT 128/0/64, MOEMESH_CUDA_GRAPHS 1/0, MOEMESH_CUDA_PDL 1/0 (decode), and
# with --prompt MOEMESH_CUDA_PROMPT_PAIRS 512/0 (16- and 64-token
# prompts). Prints a table of prompt and decode tokens/s per run, then the decode-graph summaries
# (host recording vs waiting for the GPU per step) of the graph runs.
#
#   bash bench/ab_cuda_switches.sh --moemesh build/moemesh --model FILE.gguf [--reps 2] [--gen 64] [--prompt]
#                                  [--device cuda:0]
set -uo pipefail
MOEMESH=""
MODEL=""
REPS=2
GEN=64
DEVICE=cuda:0
PROMPT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --prompt) PROMPT=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "ab_cuda_switches.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$MOEMESH" ] || { echo "ab_cuda_switches.sh: --moemesh: no executable at '$MOEMESH'" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "ab_cuda_switches.sh: --model: no file at '$MODEL' (bench_cuda_decode.sh --keep-types q4_k makes one)" >&2; exit 2; }
tokens() { seq 1 "$1" | awk '{printf "%s%d", (NR>1?",":""), ($1*7919)%151936}'; }
GRAPH_LOG=$(mktemp)
trap 'rm -f "$GRAPH_LOG"' EXIT
# run VAR VALUE PROMPT_TOKENS [sample]: one table row (greedy, or with `sample` the default top-k
# sampling, seeded)
run() {
  local line err pick=(--greedy)
  [ "${4:-}" = sample ] && pick=(--seed 1)
  err=$(env "$1=$2" "$MOEMESH" run --model "$MODEL" --device "$DEVICE" --tokens "$(tokens "$3")" -n "$GEN" "${pick[@]}" \
    --ignore-eos --ctx 512 2>&1 >/dev/null)
  line=$(echo "$err" | grep 'decode:' | tail -n 1)
  echo "$err" | grep 'decode graph:' | sed "s/^/$1=$2: /" >>"$GRAPH_LOG"
  local what=$2; [ "${4:-}" = sample ] && what="$2 (top-k sampling)"
  if [ -z "$line" ]; then echo "| $1 | $what | $3 | failed | failed |"; return; fi
  local p d
  p=$(echo "$line" | sed -n 's/^prompt: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  d=$(echo "$line" | sed -n 's/.*decode: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  echo "| $1 | $what | $3 | $p | $d |"
}
echo "| variable | value | prompt tokens | prompt t/s | decode t/s ($GEN tokens) |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$REPS"); do
  for v in 1 norms 0; do run MOEMESH_CUDA_QX "$v" 16; done
  for v in threads warps; do run MOEMESH_CUDA_ATTN_V "$v" 16; done
  for v in fused kernel; do run MOEMESH_CUDA_ATTN_MERGE "$v" 16; done
  for v in fused split; do run MOEMESH_CUDA_ROUTER "$v" 16; done
  for v in fused split; do run MOEMESH_CUDA_O_NORM "$v" 16; done
  for v in fused split; do run MOEMESH_CUDA_DOWN_COMBINE "$v" 16; done
  for v in 0 1; do run MOEMESH_HOST_LOGITS "$v" 16; done
  for v in 0 1; do run MOEMESH_HOST_LOGITS "$v" 16 sample; done
  for v in 128 0 64; do run MOEMESH_CUDA_GRAPH_SEGMENT "$v" 16; done
  for v in 1 0; do run MOEMESH_CUDA_GRAPHS "$v" 16; done
  for v in 1 0; do run MOEMESH_CUDA_PDL "$v" 16; done
  if [ "$PROMPT" = 1 ]; then for n in 16 64; do for v in 512 0; do run MOEMESH_CUDA_PROMPT_PAIRS "$v" "$n"; done; done; fi
done
echo
cat "$GRAPH_LOG"
