#!/usr/bin/env bash
# A/B runs of the CUDA backend's environment switches (docs/cuda.md, "Environment switches") on one
# model file, in one process each, alternating the two values so that drift hits both alike:
# MOEMESH_CUDA_PDL 1/0 (decode), MOEMESH_CUDA_PROMPT_PAIRS 512/0 (16- and 64-token prompts) and
# MOEMESH_CUDA_GRAPHS 1/0. Prints a table of prompt and decode tokens/s per run.
#
#   bash bench/ab_cuda_switches.sh --moemesh build/moemesh --model FILE.gguf [--reps 2] [--gen 32] [--device cuda:0]
set -uo pipefail
MOEMESH=""
MODEL=""
REPS=2
GEN=32
DEVICE=cuda:0
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "ab_cuda_switches.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$MOEMESH" ] || { echo "ab_cuda_switches.sh: --moemesh: no executable at '$MOEMESH'" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "ab_cuda_switches.sh: --model: no file at '$MODEL' (bench_cuda_decode.sh --keep-types q4_k makes one)" >&2; exit 2; }
tokens() { seq 1 "$1" | awk '{printf "%s%d", (NR>1?",":""), ($1*7919)%151936}'; }
# run VAR VALUE PROMPT_TOKENS: one table row
run() {
  local line
  line=$(env "$1=$2" "$MOEMESH" run --model "$MODEL" --device "$DEVICE" --tokens "$(tokens "$3")" -n "$GEN" --greedy \
    --ignore-eos --ctx 512 2>&1 >/dev/null | grep 'decode:' | tail -n 1)
  if [ -z "$line" ]; then echo "| $1 | $2 | $3 | failed | failed |"; return; fi
  local p d
  p=$(echo "$line" | sed -n 's/^prompt: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  d=$(echo "$line" | sed -n 's/.*decode: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  echo "| $1 | $2 | $3 | $p | $d |"
}
echo "| variable | value | prompt tokens | prompt t/s | decode t/s ($GEN tokens) |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$REPS"); do
  for v in 1 0; do run MOEMESH_CUDA_PDL "$v" 16; done
  for n in 16 64; do for v in 512 0; do run MOEMESH_CUDA_PROMPT_PAIRS "$v" "$n"; done; done
  for v in 1 0; do run MOEMESH_CUDA_GRAPHS "$v" 16; done
done
