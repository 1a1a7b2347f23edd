#!/usr/bin/env bash
# Runs on the GPU machine, in the repository root, after scripts/gpu_pack.sh packed .cudarun/ here:
# every GPU test (full gtest output in $OUT/<test>.txt, a summary in $OUT/log), compute-sanitizer
# memcheck on the op tests, and the benches while time is left. Stays within --budget seconds
# (default 420) so one device call can run it with room to spare; sections that no longer fit are
# listed as skipped.
#
#   bash scripts/gpu_check.sh [--budget S]
#                             [--only "ops model experts transport memcheck gemv prompt decode ab profile offload ncu"]
#                             [--decode-types "q8_0 q4_k"]
#
# decode and offload run the 48-layer Qwen3-30B-A3B shape (issues 6, 7: files made on the device with
# make-model --fast-weights, Q8_0 ~32 GB then Q4_K ~17 GB, the Q4_K one kept for offload and profile).
# On an H200 (session 13) everything took 230 s: `bash scripts/gpu_check.sh --budget 550` in one call
# of timeout_s 590 (each section is capped, so a hanging test cannot eat the rest).
# prompt: bench_cuda_gemv's prompt tables alone (cuBLAS vs our kernels per shape and row count, f16 and tf32;
# prompt attention through cuBLAS vs the split kernel).
# profile: MOEMESH_CUDA_PROFILE's op table of a decode step (resident, and offload at 8 GiB) on the
# kept Q4_K file (bench/profile_cuda_decode.sh). ncu: per-kernel GPU time of decode steps on a 4-layer
# model (bench/ncu_decode.sh).
set -uo pipefail
BUDGET=420
ONLY="ops model experts transport memcheck gemv prompt decode ab profile offload ncu"
DECODE_TYPES="q8_0 q4_k"
while [ $# -gt 0 ]; do
  case "$1" in
    --decode-types) DECODE_TYPES=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$ROOT/.cudarun"
if [ -f "$RUN/pack.tar.gz" ]; then
  RUN=${TMPDIR:-/tmp}/moemesh-cudarun
  rm -rf "$RUN" && mkdir -p "$RUN" && tar -C "$RUN" -xzf "$ROOT/.cudarun/pack.tar.gz"
fi
B="$RUN/bin"
[ -x "$B/moemesh" ] || { echo "gpu_check.sh: $B/moemesh missing: run scripts/gpu_pack.sh first and carry .cudarun" >&2; exit 2; }
export LD_LIBRARY_PATH="$RUN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export MOEMESH_BIN="$B/moemesh"
OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
D=${TMPDIR:-/tmp}/gpu-check; mkdir -p "$D"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { [[ " $ONLY " == *" $1 "* ]]; }
# section NAME NEED_S MAX_S CMD...: runs CMD when at least NEED_S is left, with a timeout of what is
# left or MAX_S, whichever is less (one hanging test must not eat the sections after it).
section() {
  local name=$1 need=$2 max=$3; shift 3
  want "$name" || return 0
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "=== $name: skipped ($l s left, needs $need)"; return 0; fi
  echo "=== $name (+$(( $(date +%s) - T0 )) s, $l s left)"
  local t=$(( l - 3 )); [ "$t" -gt "$max" ] && t=$max
  timeout -k 5 "$t" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[==========\]|ERROR SUMMARY|Failure|^\| |copy|tok/s|error|no CUDA device" "$OUT/$name.txt" | head -60
  echo "--- $name rc $rc"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  ldconfig -p | grep -m1 'libnccl.so.2 ' || echo "no libnccl.so.2 on the loader's path (transport nccl will be refused)"
  { ldconfig -p | grep -m1 'libcublas.so.13 ' || ls /usr/local/cuda/lib64/libcublas.so.13; } 2>/dev/null ||
    echo "no libcublas.so.13 found (prompt products will take the tiled kernel)"
  section ops 20 90 "$B/test_cuda_ops"
  section model 60 150 "$B/test_cuda_model"
  section experts 40 150 "$B/test_cuda_experts"
  section transport 40 150 "$B/test_cuda_transport"
  section gemv 30 60 "$B/bench_cuda_gemv" 20
  section prompt 20 60 "$B/bench_cuda_gemv" 20 prompt
  # decode: ~25 s per type on an H200 once its file is made (Q4_K 8 s, Q8_0 24 s to make) plus the GEMV table.
  n_types=$(echo $DECODE_TYPES | wc -w)
  section decode $(( 30 + 40 * n_types )) 400 bash "$ROOT/bench/bench_cuda_decode.sh" --moemesh "$B/moemesh" --gemv "$B/bench_cuda_gemv" \
      --layers 48 --types "$DECODE_TYPES" --keep-types q4_k --graphs 1 --dir "$D" --gen 64 --reps 2
  # ab: the environment switches A/B on the kept Q4_K file (bench/ab_cuda_switches.sh: with a
  # baseline build in the pack first this code against it, then NEW on/off, then one switch after
  # the other in whole pairs until the section's 200 s are spent)
  if [ -f "$D/q30b-L48-q4_k-fast-skew8.gguf" ]; then
    base=(); [ -x "$B/moemesh-base" ] && base=(--baseline "$B/moemesh-base")  # gpu_pack.sh --baseline REV
    section ab 60 200 bash "$ROOT/bench/ab_cuda_switches.sh" --moemesh "$B/moemesh" --model "$D/q30b-L48-q4_k-fast-skew8.gguf" \
        "${base[@]}"
  elif want ab; then
    echo "=== ab: skipped (no $D/q30b-L48-q4_k-fast-skew8.gguf: the decode section with q4_k makes it)"
  fi
  section profile 60 150 bash "$ROOT/bench/profile_cuda_decode.sh" --moemesh "$B/moemesh" --dir "$D" --budget 8GiB
  if [ -f "$ROOT/bench/bench_cuda_offload.sh" ]; then
    section offload 150 400 bash "$ROOT/bench/bench_cuda_offload.sh" --moemesh "$B/moemesh" --dir "$D" --gen 32
  fi
  section ncu 30 120 bash "$ROOT/bench/ncu_decode.sh" --moemesh "$B/moemesh" --out "$D"
  section memcheck 40 180 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 9 "$B/test_cuda_ops"
  echo "=== done (+$(( $(date +%s) - T0 )) s)"
} 2>&1 | tee "$OUT/log"
