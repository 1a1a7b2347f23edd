#!/usr/bin/env bash
# A/B runs of the CUDA backend's environment switches (docs/cuda.md, "Environment switches") on one
# model file, in one process each, each switch's values alternating --reps times before the next
# switch (so that a run cut short by a time limit has whole pairs), most wanted first: with
# --baseline BIN first BASE this/baseline (this --moemesh against another build, e.g. gpu_pack.sh
# --baseline's moemesh-base: every change between them, those without a switch too), then
# NEW on/off (every decode change of sessions 16-21 not yet measured, at once: off = PREFETCH=0,
# PDL_TRIGGER=exit, ATTN_MERGE=kernel, ROUTER=split, O_NORM=split, DOWN_COMBINE=split,
# DOWN_NORM=split, QKV_ROPE=split, ATTN_MIN_SPLITS=1, HOST_LOGITS=1, EXPERT_PREFETCH=0,
# ATTN_GQA=0), then MOEMESH_CUDA_ATTN_GQA 1/0 (decode after 16- and 4096-token prompts: the
# grouped-query attention kernel matters as the context grows), then
# MOEMESH_CUDA_BLAS 1/0 (prompt products through cuBLAS or the tiled kernel; 64- and 256-token
# prompts), MOEMESH_CUDA_BLAS_MIN_ROWS 33/8 (16 tokens: dense products of 8-32 rows),
# _BLAS_GROUPED_MIN_ROWS 33/1 (256 and 2048 tokens: the grouped MoE's experts of few rows by GEMV
# launches or through cuBLAS), MOEMESH_CUDA_BLAS_GROUPED 1/0, _BLAS_TYPE f16/tf32 and _ATTN_BLAS 1/0
# (256 tokens; _ATTN_BLAS again at 2048 tokens, where attention's share grows), _BLAS_CHUNK_MIB 64/16
# (2048 tokens: a batch of dequantized experts small enough to stay in L2 for its GEMM?),
# MOEMESH_CUDA_LOAD_KERNELS 1/0 and CUDA_MODULE_LOADING LAZY/EAGER (64 tokens: the first prompt's
# speed; with the process's seconds and the load line in the start-up log below the table), then MOEMESH_CUDA_PREFETCH 1/0, _EXPERT_PREFETCH
# 1/0/early, _PDL_TRIGGER early/exit, _ATTN_MIN_SPLITS
# 8/1, _QKV_ROPE fused/split, _DOWN_NORM fused/split, _DOWN_COMBINE fused/split, _O_NORM
# fused/split, _ROUTER fused/split, _ATTN_MERGE fused/kernel, MOEMESH_HOST_LOGITS 0/1 (greedy and
# top-k sampling), _ATTN_V threads/warps, _QX 1/norms/0, _GRAPHS 1/0, _PDL 1/0, _GRAPH_SEGMENT
# 128/0/64 (decode), and with --prompt MOEMESH_CUDA_PROMPT_PAIRS 512/0 (16- and 64-token prompts).
# Prints a table of prompt and decode tokens/s per run as it goes, then the decode-graph summaries
# (host recording vs waiting for the GPU per step) of the graph runs.
#
#   bash bench/ab_cuda_switches.sh --moemesh build/moemesh --model FILE.gguf [--reps 2] [--gen 64] [--prompt]
#                                  [--device cuda:0] [--baseline OTHER_MOEMESH]
set -uo pipefail
MOEMESH=""
MODEL=""
REPS=2
GEN=64
DEVICE=cuda:0
PROMPT=0
BASELINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --prompt) PROMPT=1; shift ;;
    --baseline) BASELINE=$2; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "ab_cuda_switches.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$MOEMESH" ] || { echo "ab_cuda_switches.sh: --moemesh: no executable at '$MOEMESH'" >&2; exit 2; }
[ -z "$BASELINE" ] || [ -x "$BASELINE" ] ||
  { echo "ab_cuda_switches.sh: --baseline: no executable at '$BASELINE'" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "ab_cuda_switches.sh: --model: no file at '$MODEL' (bench_cuda_decode.sh --keep-types q4_k makes one)" >&2; exit 2; }
tokens() { seq 1 "$1" | awk '{printf "%s%d", (NR>1?",":""), ($1*7919)%151936}'; }
GRAPH_LOG=$(mktemp)
LOAD_LOG=$(mktemp)
trap 'rm -f "$GRAPH_LOG" "$LOAD_LOG"' EXIT
# The environment of `run NEW off`: every decode change of sessions 16 to 21 not yet measured on a GPU, off.
NEW_OFF=(MOEMESH_CUDA_PREFETCH=0 MOEMESH_CUDA_PDL_TRIGGER=exit MOEMESH_CUDA_ATTN_MERGE=kernel MOEMESH_CUDA_ROUTER=split
         MOEMESH_CUDA_O_NORM=split MOEMESH_CUDA_DOWN_COMBINE=split MOEMESH_CUDA_DOWN_NORM=split
         MOEMESH_CUDA_QKV_ROPE=split MOEMESH_CUDA_ATTN_MIN_SPLITS=1 MOEMESH_HOST_LOGITS=1
         MOEMESH_CUDA_EXPERT_PREFETCH=0 MOEMESH_CUDA_ATTN_GQA=0)
# run VAR VALUE PROMPT_TOKENS [sample]: one table row (greedy, or with `sample` the default top-k
# sampling, seeded)
run() {
  local line err pick=(--greedy) envs=("$1=$2") bin=$MOEMESH
  [ "${4:-}" = sample ] && pick=(--seed 1)
  if [ "$1" = NEW ]; then envs=(); [ "$2" = off ] && envs=("${NEW_OFF[@]}"); fi
  if [ "$1" = BASE ]; then envs=(); [ "$2" = baseline ] && bin=$BASELINE; fi
  local t0; t0=$(date +%s.%N)
  err=$(env "${envs[@]}" "$bin" run --model "$MODEL" --device "$DEVICE" --tokens "$(tokens "$3")" -n "$GEN" \
    "${pick[@]}" --ignore-eos --ctx "$(( $3 + GEN + 64 > 512 ? $3 + GEN + 64 : 512 ))" 2>&1 >/dev/null)
  line=$(echo "$err" | grep 'decode:' | tail -n 1)
  echo "$err" | grep 'decode graph:' | sed "s/^/$1=$2: /" >>"$GRAPH_LOG"
  case "$1" in CUDA_MODULE_LOADING|MOEMESH_CUDA_LOAD_KERNELS|MOEMESH_CUDA_BLAS)
    echo "$1=$2 ($3 tokens): process $(echo "$t0 $(date +%s.%N)" | awk '{printf "%.2f", $2 - $1}') s;" \
      "$(echo "$err" | grep -m1 'GiB free')" >>"$LOAD_LOG" ;;
  esac
  local what=$2; [ "${4:-}" = sample ] && what="$2 (top-k sampling)"
  if [ -z "$line" ]; then echo "| $1 | $what | $3 | failed | failed |"; return; fi
  local p d
  p=$(echo "$line" | sed -n 's/^prompt: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  d=$(echo "$line" | sed -n 's/.*decode: [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p')
  echo "| $1 | $what | $3 | $p | $d |"
}
# ab VAR PROMPT_TOKENS [sample] -- VALUES...: the values alternating, --reps rounds
ab() {
  local var=$1 n=$2 how=""; shift 2
  [ "$1" = sample ] && { how=sample; shift; }
  shift  # --
  for _ in $(seq 1 "$REPS"); do for v in "$@"; do run "$var" "$v" "$n" $how; done; done
}
echo "| variable | value | prompt tokens | prompt t/s | decode t/s ($GEN tokens) |"
echo "|---|---|---|---|---|"
[ -n "$BASELINE" ] && ab BASE 16 -- this baseline
ab NEW 16 -- on off
ab MOEMESH_CUDA_ATTN_GQA 16 -- 1 0
ab MOEMESH_CUDA_ATTN_GQA 4096 -- 1 0
ab MOEMESH_CUDA_BLAS 256 -- 1 0
ab MOEMESH_CUDA_BLAS 64 -- 1 0
ab MOEMESH_CUDA_BLAS_MIN_ROWS 16 -- 33 8
ab MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS 256 -- 33 1
ab MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS 2048 -- 33 1
ab MOEMESH_CUDA_BLAS_GROUPED 256 -- 1 0
ab MOEMESH_CUDA_BLAS_TYPE 256 -- f16 tf32
ab MOEMESH_CUDA_ATTN_BLAS 256 -- 1 0
ab MOEMESH_CUDA_ATTN_BLAS 2048 -- 1 0
ab MOEMESH_CUDA_BLAS_CHUNK_MIB 2048 -- 64 16
ab MOEMESH_CUDA_LOAD_KERNELS 64 -- 1 0
ab CUDA_MODULE_LOADING 64 -- LAZY EAGER
ab MOEMESH_CUDA_PREFETCH 16 -- 1 0
ab MOEMESH_CUDA_EXPERT_PREFETCH 16 -- 1 0 early
ab MOEMESH_CUDA_PDL_TRIGGER 16 -- early exit
ab MOEMESH_CUDA_ATTN_MIN_SPLITS 16 -- 8 1
ab MOEMESH_CUDA_QKV_ROPE 16 -- fused split
ab MOEMESH_CUDA_DOWN_NORM 16 -- fused split
ab MOEMESH_CUDA_DOWN_COMBINE 16 -- fused split
ab MOEMESH_CUDA_O_NORM 16 -- fused split
ab MOEMESH_CUDA_ROUTER 16 -- fused split
ab MOEMESH_CUDA_ATTN_MERGE 16 -- fused kernel
ab MOEMESH_HOST_LOGITS 16 -- 0 1
ab MOEMESH_HOST_LOGITS 16 sample -- 0 1
ab MOEMESH_CUDA_ATTN_V 16 -- threads warps
ab MOEMESH_CUDA_QX 16 -- 1 norms 0
ab MOEMESH_CUDA_GRAPHS 16 -- 1 0
ab MOEMESH_CUDA_PDL 16 -- 1 0
ab MOEMESH_CUDA_GRAPH_SEGMENT 16 -- 128 0 64
if [ "$PROMPT" = 1 ]; then for n in 16 64; do ab MOEMESH_CUDA_PROMPT_PAIRS "$n" -- 512 0; done; fi
echo
cat "$GRAPH_LOG"
echo
echo "start-up (seconds of the whole process; its load line):"
cat "$LOAD_LOG"
