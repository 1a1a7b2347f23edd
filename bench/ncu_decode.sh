#!/usr/bin/env bash
# Per-kernel GPU time of decode steps under Nsight Compute (the op profile's event timing puts a
# ~4 µs floor under every op; ncu measures the kernels themselves). Makes a 4-layer model of the
# Qwen3-30B-A3B shape (or takes --model), decodes with CUDA graphs off, and profiles --count kernels
# after skipping --skip (the load and the prompt). Prints one row per kernel: calls, mean µs, share
# of the GPU time, registers, grid, block, warps active. ncu runs at base clocks: compare shares,
# not absolute times with the decode bench.
#
#   bash bench/ncu_decode.sh --moemesh build-cuda/moemesh [--model F.gguf] [--type q4_k] [--skip 700]
#                            [--count 200] [--out DIR]
#
# Session 13 on an H200 (4-layer Q4_K): gemv_kernel<Q4_K> 34%, lm_head 19%, rmsnorm 14.5%,
# moe_combine 7.8% (before its grid fix), softmax/top-k 4.5% (docs/cuda.md, "Session 13").
set -euo pipefail
MOEMESH=""; MODEL=""; TYPE=q4_k; SKIP=700; COUNT=200; OUTD=${OUT:-/tmp/ncu-decode}
while [ $# -gt 0 ]; do
  case "$1" in
    --moemesh) MOEMESH=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --out) OUTD=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "ncu_decode.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$MOEMESH" ] || { echo "ncu_decode.sh: --moemesh BINARY (a CUDA build) is required" >&2; exit 2; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
[ -n "$NCU" ] || { echo "ncu_decode.sh: no ncu (Nsight Compute) on this machine" >&2; exit 2; }
mkdir -p "$OUTD"
if [ -z "$MODEL" ]; then
  MODEL=$OUTD/ncu-L4-$TYPE.gguf
  [ -f "$MODEL" ] || "$MOEMESH" make-model --arch qwen3moe --out "$MODEL" --layers 4 --hidden 2048 --heads 32 \
    --kv-heads 4 --head-dim 128 --experts 128 --top-k 8 --expert-ff 768 --vocab 151936 --type "$TYPE" --seed 1 \
    --router-skew 8 --fast-weights --threads "$(nproc)" >/dev/null
fi
CSV=$OUTD/ncu-decode.csv
MOEMESH_CUDA_GRAPHS=0 "$NCU" --csv --metrics gpu__time_duration.sum,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active \
  --launch-skip "$SKIP" --launch-count "$COUNT" "$MOEMESH" run --model "$MODEL" --device cuda:0 --tokens 1,2,3,4 \
  -n 48 --greedy --ignore-eos >"$CSV" 2>"$OUTD/ncu-decode.err" || { tail -n 5 "$OUTD/ncu-decode.err" >&2; exit 1; }
python3 - "$CSV" <<'PY'
import csv, re, sys
# ncu interleaves the program's own output (e.g. the decode-graph summary) with its CSV rows
lines = [l for l in open(sys.argv[1], errors="replace").read().splitlines() if l.startswith('"')]
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
kern = {}
for r in csv.DictReader(lines[start:]):
    if not r.get("ID") or not r.get("Kernel Name") or not r.get("Metric Name"):
        continue
    d = kern.setdefault(r["ID"], {"name": re.sub(r"\(.*", "", r["Kernel Name"])})
    d[r["Metric Name"]] = (r["Metric Value"] or "").replace(",", "")
by = {}
for d in kern.values():
    by.setdefault(d["name"], []).append(d)
num = lambda d, k: float(d.get(k, "0") or 0)
total = sum(num(d, "gpu__time_duration.sum") for d in kern.values())
print(f"{len(kern)} kernels, {total / 1e3:.1f} us of GPU time (ncu clocks)")
print("| kernel | calls | mean us | share | regs | grid | block | warps active % |")
print("|---|---|---|---|---|---|---|---|")
for name, ds in sorted(by.items(), key=lambda kv: -sum(num(d, "gpu__time_duration.sum") for d in kv[1])):
    t = [num(d, "gpu__time_duration.sum") for d in ds]
    d = ds[0]
    print(f"| {name[:70]} | {len(ds)} | {sum(t) / len(t) / 1e3:.2f} | {100 * sum(t) / total:.1f}% | "
          f"{d.get('launch__registers_per_thread', '-')} | {d.get('launch__grid_size', '-')} | "
          f"{d.get('launch__block_size', '-')} | {d.get('sm__warps_active.avg.pct_of_peak_sustained_active', '-')} |")
PY
