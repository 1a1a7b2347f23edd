#!/bin/bash
# Multi-host on one machine: a coordinator and two workers in three network namespaces joined by
# veth pairs, traffic over TCP between their own addresses.
#
#   tests/netns_cluster.sh BINARY_DIR MODEL.gguf WORK_DIR TOKENS N_PREDICT TOP
#
#   namespace mmc-ID (coordinator) 10.77.1.1/24 ──veth── 10.77.1.2/24 mmw1-ID (worker w1, :7701)
#                                  10.77.2.1/24 ──veth── 10.77.2.2/24 mmw2-ID (worker w2, :7702)
#
# Prints the coordinator's JSON (`moemesh run --cluster ... --json`) on stdout; the caller compares
# it with the single-process run. Exit 77: network namespaces are not permitted here (not root, no
# CAP_NET_ADMIN, sandbox): skip. Any other non-zero exit: failure, with the reason on stderr.
# Everything it creates (namespaces, veths, processes) is removed on exit (trap), also on failure.
set -u
BIN=$1 MODEL=$2 WORK=$3 TOKENS=$4 NPRED=$5 TOP=$6
ID=$$
NS_C=mmc-$ID NS_1=mmw1-$ID NS_2=mmw2-$ID
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    for ns in "$NS_C" "$NS_1" "$NS_2"; do ip netns del "$ns" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if ! command -v ip >/dev/null; then echo "skip: iproute2 (ip) is not installed" >&2; exit 77; fi
if ! ip netns add "$NS_C" 2>"$WORK/netns.err"; then
    echo "skip: 'ip netns add' is not permitted here ($(cat "$WORK/netns.err")); needs root/CAP_NET_ADMIN" >&2
    exit 77
fi
set -e
ip netns add "$NS_1"
ip netns add "$NS_2"
for ns in "$NS_C" "$NS_1" "$NS_2"; do ip -n "$ns" link set lo up; done
# veth names are limited to 15 bytes: create them inside the namespaces directly.
ip -n "$NS_C" link add c1 type veth peer name w1 netns "$NS_1"
ip -n "$NS_C" link add c2 type veth peer name w2 netns "$NS_2"
ip -n "$NS_C" addr add 10.77.1.1/24 dev c1
ip -n "$NS_C" addr add 10.77.2.1/24 dev c2
ip -n "$NS_1" addr add 10.77.1.2/24 dev w1
ip -n "$NS_2" addr add 10.77.2.2/24 dev w2
ip -n "$NS_C" link set c1 up
ip -n "$NS_C" link set c2 up
ip -n "$NS_1" link set w1 up
ip -n "$NS_2" link set w2 up
set +e

ip netns exec "$NS_1" "$BIN/moemesh-worker" --model "$MODEL" --listen 10.77.1.2:7701 --name w1 --threads 1 \
    2>"$WORK/w1.err" &
PIDS+=($!)
ip netns exec "$NS_2" "$BIN/moemesh-worker" --model "$MODEL" --listen 10.77.2.2:7702 --name w2 --threads 1 \
    2>"$WORK/w2.err" &
PIDS+=($!)
for w in w1 w2; do
    for _ in $(seq 100); do grep -q "listening on" "$WORK/$w.err" && break; sleep 0.1; done
    if ! grep -q "listening on" "$WORK/$w.err"; then
        echo "worker $w did not start: $(cat "$WORK/$w.err")" >&2
        exit 1
    fi
done
# The workers listen only on their namespace's veth address: the coordinator's traffic really
# crosses the veth pairs, over TCP.
cat >"$WORK/cluster.yaml" <<EOF
model: $MODEL
coordinator: {timeout_ms: 5000}
workers:
  - name: w1
    address: 10.77.1.2:7701
    transport: tcp
    experts: "0-9"
  - name: w2
    address: 10.77.2.2:7702
    transport: tcp
    experts: "10-15"
    replicas: {"0-1": "0-3"}
EOF
timeout 60 ip netns exec "$NS_C" "$BIN/moemesh" run --cluster "$WORK/cluster.yaml" --tokens "$TOKENS" \
    --top "$TOP" --json -n "$NPRED" --kv-type f32 --threads 1 2>"$WORK/coordinator.err"
rc=$?
if [ $rc -ne 0 ]; then
    echo "coordinator failed (exit $rc): $(cat "$WORK/coordinator.err")" >&2
    exit 1
fi
# Both workers must have served calls over their veth.
for w in w1 w2; do
    if ! grep -q "$w: [1-9][0-9]* calls" "$WORK/coordinator.err"; then
        echo "worker $w served no calls: $(cat "$WORK/coordinator.err")" >&2
        exit 1
    fi
done
exit 0
