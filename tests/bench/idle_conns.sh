#!/usr/bin/env bash
# Issue 17 item 3: memory and file descriptors of the proxy and the control
# plane under BENCH_CONNS (5,000) client connections that send nothing, and
# what happens beyond --max-connections. For each case a fresh process; the
# connections are held BENCH_HOLD s (below the 10 s header-read timeout,
# which closes them), then /healthz (and /readyz) are probed while they are
# still held. Prints one table row per case, medians over BENCH_REPS runs.
#
#   cargo build --release -p claw-control-plane -p claw-data-plane -p clawctl
#   tests/bench/idle_conns.sh
#   BENCH_CONNS=5000 BENCH_HOLD=3 BENCH_REPS=3 tests/bench/idle_conns.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CONNS="${BENCH_CONNS:-5000}"
HOLD="${BENCH_HOLD:-3}"
REPS="${BENCH_REPS:-3}"
# The client holds CONNS (and CONNS + 1000) sockets; the servers started
# from here inherit the raised limit.
ulimit -n "$(ulimit -Hn)"
log_limit=$(ulimit -n)
CP_ARGS=()
. tests/bench/lib.sh
log "open files limit $log_limit; $CONNS connections, held $HOLD s, $REPS runs"
start_gateway

# row LABEL N ADDR WATCH-NAME WATCH-PID PROBE-URL… — REPS runs of N idle
# connections to ADDR; one table row.
row() {
  local label=$1 n=$2 addr=$3 wname=$4 wpid=$5; shift 5
  local probes=() u
  for u in "$@"; do probes+=(--probe "$u"); done
  : >"$WORK/rows.json"
  for _ in $(seq 1 "$REPS"); do
    python3 tests/bench/idle_conns.py --addr "$addr" --n "$n" --hold "$HOLD" \
      --watch "$wname=$wpid" "${probes[@]}" >>"$WORK/rows.json"
    sleep 2   # the client closed its sockets: let the server see it
  done
  python3 - "$WORK/rows.json" "$label" "$wname" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
label, w = sys.argv[2], sys.argv[3]
med = lambda xs: statistics.median(xs)
rss0 = med([r["before"][w]["VmRSS"] for r in rows])
rss = med([r["held"][w]["VmRSS"] for r in rows])
hwm = med([r["held"][w]["VmHWM"] for r in rows])
fds = med([r["held"][w]["fds"] for r in rows])
still = med([r["still_open"] for r in rows])
closed = med([r["closed_by_server"] for r in rows])
probes = "; ".join(
    f'{p["status"]} in {med([r["probes"][i]["ms"] for r in rows]):.0f} ms'
    for i, p in enumerate(rows[-1]["probes"]))
print(f"| {label} | {rows[0]['n']} | {rss0:.1f} MB | {rss:.1f} MB (+{rss - rss0:.1f}) | {hwm:.1f} MB "
      f"| {fds:.0f} | {still:.0f} open, {closed:.0f} closed by the server | {probes} |")
PY
}

printf '| Case | connections | RSS before | RSS held (Δ) | VmHWM | fds held | after %s s | probes while held |\n' "$HOLD"
printf '|---|---|---|---|---|---|---|---|\n'
start_proxy dp-default
row "proxy, --max-connections 10000 (default)" "$CONNS" "$DP_ADDR" proxy "$DP_PID" \
  "http://$DP_ADDR/healthz" "http://$DP_ADDR/readyz"
stop "$DP_PID"
start_proxy dp-capped --max-connections "$CONNS"
row "proxy, --max-connections $CONNS" "$((CONNS + 1000))" "$DP_ADDR" proxy "$DP_PID" \
  "http://$DP_ADDR/healthz" "http://$DP_ADDR/readyz"
stop "$DP_PID"
row "control plane HTTP, --max-connections 10000 (default)" "$CONNS" "$CP_HTTP" cp "$CP_PID" \
  "http://$CP_HTTP/healthz"
row "control plane gRPC, --max-connections 10000 (default)" "$CONNS" "${CLAW_SERVER#http://}" cp "$CP_PID" \
  "http://$CP_HTTP/healthz"
# A second control plane with the cap at CONNS: beyond it on each listener.
start cp-capped "$BIN/claw-control-plane" --data-dir "$WORK/cp2-data" --grpc-addr 127.0.0.1:0 \
  --http-addr 127.0.0.1:0 --max-connections "$CONNS"
CP2_PID=$PID
CP2_GRPC="$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$LISTEN")"
CP2_HTTP="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$LISTEN")"
row "control plane HTTP, --max-connections $CONNS" "$((CONNS + 1000))" "$CP2_HTTP" cp "$CP2_PID" \
  "http://$CP2_HTTP/healthz"
row "control plane gRPC, --max-connections $CONNS" "$((CONNS + 1000))" "$CP2_GRPC" cp "$CP2_PID" \
  "http://$CP2_HTTP/healthz"
