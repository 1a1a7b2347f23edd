#!/usr/bin/env bash
# Decode tokens/s of one model: single process vs 2 local workers over Unix sockets (gRPC messages),
# over shared memory (transport shm: gRPC carries only metadata) and over TCP (127.0.0.1), plus the coordinator's mean per-layer round trip to each worker.
# Usage: bash bench/bench_cluster.sh [MODEL.gguf] [--reps N] [--threads T] [-n TOKENS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEMESH_BUILD_DIR:-$ROOT/build}"
MODEL=""; REPS=3; THREADS=$(nproc); N=64
while (($#)); do
  case "$1" in
    --reps) REPS="$2"; shift 2;; --threads) THREADS="$2"; shift 2;; -n) N="$2"; shift 2;;
    -h|--help) sed -n '2,4p' "$0"; exit 0;;
    *) MODEL="$1"; shift;;
  esac
done
if [ -z "$MODEL" ]; then
  MODEL="$BUILD/bench-models/cluster-q8_0.gguf"
  [ -f "$MODEL" ] || "$BUILD/moemesh" make-model --out "$MODEL" --layers 8 --hidden 1024 --heads 8 --kv-heads 2 \
    --head-dim 128 --experts 32 --top-k 4 --expert-ff 512 --vocab 8192 --type q8_0 --seed 1 >/dev/null 2>&1
fi
E=$("$BUILD/moemesh" inspect "$MODEL" | sed -n 's/.*experts \([0-9]*\) top.*/\1/p')
H=$((E / 2))
RUN="$(mktemp -d /tmp/moemesh-bench-XXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN"' EXIT
TOKS=$(python3 -c "import random; random.seed(3); print(','.join(str(random.randrange(1000)) for _ in range(32)))")

write_yaml() {  # $1 file, $2 addr0, $3 addr1, $4 transport
  cat > "$1" <<Y
model: $MODEL
workers:
  - {name: w0, address: "$2", transport: $4, experts: "0-$((H - 1))", threads: $THREADS}
  - {name: w1, address: "$3", transport: $4, experts: "$H-$((E - 1))", threads: $THREADS}
Y
}
start_workers() {  # addr0 addr1
  "$BUILD/moemesh-worker" --model "$MODEL" --listen "$1" --name w0 --threads "$THREADS" 2>"$RUN/w0.log" &
  "$BUILD/moemesh-worker" --model "$MODEL" --listen "$2" --name w1 --threads "$THREADS" 2>"$RUN/w1.log" &
  for _ in $(seq 100); do grep -q listening "$RUN/w0.log" 2>/dev/null && grep -q listening "$RUN/w1.log" 2>/dev/null && return; sleep 0.1; done
  echo "workers did not start"; cat "$RUN"/w*.log; exit 1
}
decode_tps() { sed -n 's/.*decode: .*(\([0-9.]*\) tokens\/s).*/\1/p' "$1" | tail -1; }
rtt() { sed -n 's/^workers: //p' "$1" | tail -1 | sed 's/ calls, /c /g'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A RES RTT
for mode in single unix shm tcp; do
  if [ "$mode" = unix ]; then write_yaml "$RUN/c.yaml" "unix:$RUN/w0.sock" "unix:$RUN/w1.sock" unix; start_workers "unix:$RUN/w0.sock" "unix:$RUN/w1.sock"; fi
  # shm: the same workers; activations and partial sums in shared memory, gRPC carries metadata only.
  if [ "$mode" = shm ]; then write_yaml "$RUN/c.yaml" "unix:$RUN/w0.sock" "unix:$RUN/w1.sock" shm; fi
  if [ "$mode" = tcp ]; then
    kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
    P0=$((20000 + RANDOM % 20000)); P1=$((P0 + 1))
    write_yaml "$RUN/c.yaml" "127.0.0.1:$P0" "127.0.0.1:$P1" tcp; start_workers "127.0.0.1:$P0" "127.0.0.1:$P1"
  fi
  vals=()
  for r in $(seq "$REPS"); do
    if [ "$mode" = single ]; then
      "$BUILD/moemesh" run --model "$MODEL" --tokens "$TOKS" -n "$N" --greedy --ignore-eos --threads "$THREADS" >/dev/null 2>"$RUN/out"
    else
      "$BUILD/moemesh" run --cluster "$RUN/c.yaml" --tokens "$TOKS" -n "$N" --greedy --ignore-eos --threads "$THREADS" >/dev/null 2>"$RUN/out"
      RTT[$mode]="$(rtt "$RUN/out")"
    fi
    vals+=("$(decode_tps "$RUN/out")")
  done
  RES[$mode]=$(printf '%s\n' "${vals[@]}" | median)
done
printf '\n| setup | decode tok/s (median of %s) | vs single | per-layer round trip |\n|---|---|---|---|\n' "$REPS"
for mode in single unix shm tcp; do
  ratio=$(awk -v a="${RES[$mode]}" -v b="${RES[single]}" 'BEGIN {printf "%.2fx", a / b}')
  printf '| %s | %s | %s | %s |\n' "$mode" "${RES[$mode]}" "$ratio" "${RTT[$mode]:--}"
done
echo "model: $MODEL, threads $THREADS per process, $N tokens after a 32-token prompt"
