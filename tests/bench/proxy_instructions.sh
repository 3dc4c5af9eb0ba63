#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable for the
# same binary and inputs whatever else the machine is doing, so it can tell
# a 2 % change that CPU-time figures on a shared machine cannot.
#
#   bash tests/bench/proxy_instructions.sh [PROXY_BIN...]   # default: target/production/claw-data-plane
#   BENCH_REQUESTS=3000 bash tests/bench/proxy_instructions.sh target/production/claw-data-plane /tmp/old/claw-data-plane
#   BENCH_JOURNAL=1 bash tests/bench/proxy_instructions.sh   # each proxy with a --usage-journal of its own
#
# For each binary: a fresh control plane and mock upstream, the proxy under
# `valgrind --tool=callgrind`, a warm-up, counters zeroed, BENCH_REQUESTS
# sequential non-streaming chat completions (claw-bench http, c=1), a dump;
# instructions per request = the dump's total ÷ the requests the proxy's
# /metrics counted in between. Prints one line per binary and leaves the
# callgrind files (for callgrind_annotate) in the printed work directory.
# Callgrind counts user-space instructions only: time in the kernel (system
# calls, page faults) is not in the figure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
REQUESTS="${BENCH_REQUESTS:-2000}"
log() { printf '[instr %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }

cargo build --release -q -p claw-tests --bins -p claw-control-plane -p clawctl
BIN="$ROOT/target/release"
if [ "$#" = 0 ]; then
  cargo build --profile production -q -p claw-data-plane
  set -- "$ROOT/target/production/claw-data-plane"
fi

WORK="$(mktemp -d /tmp/claw-instr-XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { # NAME CMD... : waits for its `listening` line, sets LISTEN
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    if grep -q '^listening' "$WORK/$name.out"; then LISTEN="$(head -n1 "$WORK/$name.out")"; return 0; fi
    kill -0 "${pids[-1]}" 2>/dev/null || { log "$name died:"; tail -n 20 "$WORK/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  log "$name did not start"; exit 1
}
served() { # PROXY_ADDR -> requests the proxy counted
  curl -s "http://$1/metrics" | awk '/^claw_dp_requests_total/ {s += $NF} END {printf "%d\n", s}'
}

start mock "$BIN/claw-mock-upstream" --addr 127.0.0.1:0 --no-record --name bench
MOCK_ADDR="${LISTEN#*http=}"
export CLAW_MASTER_KEY; CLAW_MASTER_KEY="$("$BIN/claw-control-plane" keygen)"
export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$("$BIN/claw-control-plane" token)"
export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$("$BIN/claw-control-plane" token)"
start control-plane "$BIN/claw-control-plane" --data-dir "$WORK/cp-data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0
export CLAW_SERVER="http://$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$LISTEN")"
export BENCH_UPSTREAM_KEY=sk-bench-upstream
"$BIN/clawctl" backend add bench --url "http://$MOCK_ADDR/v1" --api-key-env BENCH_UPSTREAM_KEY \
  --rpm 1000000000 --model bench=mock-model >/dev/null
KEY="$("$BIN/clawctl" key add bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"

i=0
for dp in "$@"; do
  i=$((i + 1))
  out="$WORK/callgrind.$i"
  extra=()
  [ "${BENCH_JOURNAL:-0}" = 1 ] && extra=(--usage-journal "$WORK/usage.$i.journal")
  start "proxy-$i" valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$dp" \
    --addr 127.0.0.1:0 --control-plane "$CLAW_SERVER" --node-id "instr-$i" --serve-threads 1 "${extra[@]}"
  addr="${LISTEN#*http=}"
  vpid="${pids[-1]}"
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v1/chat/completions" -H "Authorization: Bearer $KEY" \
      -H 'Content-Type: application/json' -d '{"model":"bench","messages":[{"role":"user","content":"hi"}]}' || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  # Warm-up: connections, pools, the first report batches.
  "$BIN/claw-bench" http --url "http://$addr/v1/chat/completions" --key "$KEY" --concurrency 1 --duration 3s --warmup 0s >/dev/null
  before="$(served "$addr")"
  callgrind_control -z "$vpid" >/dev/null
  n=0
  while [ "$n" -lt "$REQUESTS" ]; do
    "$BIN/claw-bench" http --url "http://$addr/v1/chat/completions" --key "$KEY" --concurrency 1 --duration 2s --warmup 0s >/dev/null
    n=$(( $(served "$addr") - before ))
  done
  callgrind_control -d "$vpid" >/dev/null
  after="$(served "$addr")"
  sleep 1
  total=$(for f in "$out".*; do callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; done | sort -n | tail -n 1)
  reqs=$(( after - before ))
  printf '%s\t%d requests\t%s instructions\t%.1f k instructions/request\n' "$dp" "$reqs" "$total" "$(python3 -c "print($total / $reqs / 1000)")"
  kill "$vpid" 2>/dev/null || true
done
log "callgrind files in $WORK"
