# Shared helpers of the benchmark scripts (sourced, not run): start the
# release binaries (a control plane, a mock upstream, proxies) in $WORK,
# read a process's memory and CPU from /proc.
# Expects: set -euo pipefail, $ROOT (the repository root).
BIN="${BIN:-$ROOT/target/release}"
MOCK_BIN="${MOCK_BIN:-$BIN/claw-mock-upstream}"
[ -x "$MOCK_BIN" ] || MOCK_BIN="$ROOT/target/debug/claw-mock-upstream"
WORK="$(mktemp -d /tmp/claw-bench17-XXXXXX)"
pids=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] && echo "logs in $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup INT TERM EXIT
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# start NAME CMD… — runs CMD in the background until it prints its
# `listening …` line; sets LISTEN to that line and PID to its pid.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PID=$!
  pids+=("$PID")
  for _ in $(seq 1 600); do
    if grep -qs '^listening' "$WORK/$name.out"; then LISTEN="$(head -n1 "$WORK/$name.out")"; return 0; fi
    kill -0 "$PID" 2>/dev/null || { log "$name died:"; tail -n 20 "$WORK/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  log "$name did not start"; exit 1
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
wait_http() { # URL
  for _ in $(seq 1 600); do
    curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null | grep -q '^[23]' && return 0
    sleep 0.2
  done
  log "$1 never answered"; exit 1
}
# Peak and current resident set of PID, in MB (VmHWM, VmRSS).
hwm_mb() { awk '/^VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
# User + system CPU seconds PID has used.
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; }
# Open file descriptors of PID.
fds() { ls "/proc/$1/fd" | wc -l; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# A control plane with one backend on a mock upstream and one client key:
# sets CLAW_SERVER, CP_PID, CP_HTTP, MOCK_ADDR, CLAW_KEY.
start_gateway() {
  start mock "$MOCK_BIN" --addr 127.0.0.1:0 --no-record --name bench
  MOCK_ADDR="${LISTEN#*http=}"
  export CLAW_MASTER_KEY; CLAW_MASTER_KEY="$("$BIN/claw-control-plane" keygen)"
  export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$("$BIN/claw-control-plane" token)"
  export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$("$BIN/claw-control-plane" token)"
  start control-plane "$BIN/claw-control-plane" --data-dir "$WORK/cp-data" --grpc-addr 127.0.0.1:0 \
    --http-addr 127.0.0.1:0 "${CP_ARGS[@]}"
  CP_PID=$PID
  CP_GRPC="$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$LISTEN")"
  CP_HTTP="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$LISTEN")"
  export CLAW_SERVER="http://$CP_GRPC"
  export BENCH_UPSTREAM_KEY=sk-bench-upstream
  "$BIN/clawctl" backend add bench --url "http://$MOCK_ADDR/v1" --api-key-env BENCH_UPSTREAM_KEY \
    --rpm 1000000000 --model bench=mock-model >/dev/null
  CLAW_KEY="$("$BIN/clawctl" key add bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"
}

# start_proxy NAME ARGS… — a proxy with ARGS; sets DP_ADDR and DP_PID once
# it is ready (has a snapshot).
start_proxy() {
  local name=$1; shift
  start "$name" "$BIN/claw-data-plane" --addr 127.0.0.1:0 --control-plane "$CLAW_SERVER" \
    --node-id "$name" "$@"
  DP_ADDR="${LISTEN#*http=}"
  DP_PID=$PID
  wait_http "http://$DP_ADDR/readyz"
}

# Small chat requests until one is answered 200 (a fresh proxy may answer
# 429 until its first rate share arrives from the control plane).
warm_up() { # PROXY_ADDR
  local code
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $CLAW_KEY" \
      -H 'content-type: application/json' \
      -d '{"model":"bench","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}' \
      "http://$1/v1/chat/completions" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.2
  done
  log "proxy $1 never answered 200 (last $code)"; exit 1
}
