#!/usr/bin/env bash
# Usage journal benchmark (issue 18): the proxy's CPU time per request with
# and without `--usage-journal`, same load. One control plane, one mock
# upstream, two proxies (one with the journal, one without) on loopback; the
# closed-loop load generator `claw-bench http` (tests/src/bin/claw-bench.rs)
# measures the target proxy's user + system CPU time (/proc/PID/stat) over
# the measuring window ÷ requests answered in it. The two proxies are
# measured alternately (the order flips every repetition), BENCH_REPS
# times each, in two modes: at a fixed rate (BENCH_RATE requests/s, below
# both proxies' capacity, so both serve the same load) and closed loop (as
# fast as they answer: a slower proxy then serves fewer requests per
# wake-up, which moves its CPU per request by more than its own cost). The
# table shows medians.
#
#   bash tests/bench/journal_bench.sh
#   BENCH_REPS=5 BENCH_DURATION=10s BENCH_RATE=6000 bash tests/bench/journal_bench.sh
#   BENCH_BIN=target/debug bash tests/bench/journal_bench.sh   # a debug build (no cargo build)
#
# The machine may be shared: the medians of alternated runs cancel slow
# drifts, not a neighbour's burst.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

REPS="${BENCH_REPS:-3}"
DURATION="${BENCH_DURATION:-5s}"
WARMUP="${BENCH_WARMUP:-1s}"
CONCURRENCY="${BENCH_CONCURRENCY:-8}"
RATE="${BENCH_RATE:-8000}"

log() { printf '[journal-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -z "${BENCH_BIN:-}" ]; then
  log "building (release)"
  cargo build --release -q -p claw-data-plane -p claw-control-plane -p clawctl -p claw-tests --bins
  BIN="$ROOT/target/release"
else
  BIN="$(cd "$BENCH_BIN" && pwd)"
fi

WORK="$(mktemp -d /tmp/claw-journal-bench-XXXXXX)"
pids=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  log "logs in $WORK"
}
trap cleanup INT TERM EXIT

# start NAME CMD… — runs CMD until it prints its `listening …` line; sets
# LISTEN to that line.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q '^listening' "$WORK/$name.out"; then LISTEN="$(head -n1 "$WORK/$name.out")"; return 0; fi
    kill -0 "${pids[-1]}" 2>/dev/null || { log "$name died:"; tail -n 20 "$WORK/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  log "$name did not start"; exit 1
}

start mock "$BIN/claw-mock-upstream" --addr 127.0.0.1:0 --no-record --name bench
MOCK_ADDR="${LISTEN#*http=}"

export CLAW_MASTER_KEY; CLAW_MASTER_KEY="$("$BIN/claw-control-plane" keygen)"
export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$("$BIN/claw-control-plane" token)"
export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$("$BIN/claw-control-plane" token)"
start control-plane "$BIN/claw-control-plane" --data-dir "$WORK/cp-data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0
CP_GRPC="$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$LISTEN")"
export CLAW_SERVER="http://$CP_GRPC"
export BENCH_UPSTREAM_KEY=sk-bench-upstream
"$BIN/clawctl" backend add bench --url "http://$MOCK_ADDR/v1" --api-key-env BENCH_UPSTREAM_KEY \
  --rpm 1000000000 --model bench=mock-model >/dev/null
CLAW_KEY="$("$BIN/clawctl" key add bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"

start plain "$BIN/claw-data-plane" --addr 127.0.0.1:0 --control-plane "$CLAW_SERVER" --node-id bench-plain
PLAIN_ADDR="${LISTEN#*http=}"; PLAIN_PID="${pids[-1]}"
start journal "$BIN/claw-data-plane" --addr 127.0.0.1:0 --control-plane "$CLAW_SERVER" --node-id bench-journal \
  --usage-journal "$WORK/usage.journal"
JOURNAL_ADDR="${LISTEN#*http=}"; JOURNAL_PID="${pids[-1]}"
for addr in "$PLAIN_ADDR" "$JOURNAL_ADDR"; do
  for _ in $(seq 1 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v1/chat/completions" -H "Authorization: Bearer $CLAW_KEY" \
      -H 'Content-Type: application/json' -d '{"model":"bench","messages":[{"role":"user","content":"hi"}]}')
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { log "proxy $addr never answered 200"; exit 1; }
done
log "mock $MOCK_ADDR, control plane $CP_GRPC, proxies $PLAIN_ADDR (no journal), $JOURNAL_ADDR (journal)"

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
run() { # NAME ADDR PID MODE
  local out rate=0
  [ "$4" = rate ] && rate=$RATE
  out="$("$BIN/claw-bench" http --url "http://$2/v1/chat/completions" --key "$CLAW_KEY" \
    --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" --rate "$rate" --cpu-pid "$3")"
  python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["target"]=sys.argv[1]; d["mode"]=sys.argv[3]; print(json.dumps(d))' "$1" "$out" "$4" >>"$RESULTS"
  log "$1 ($4): $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.0f rps, %.1f us CPU/request" % (d.get("rps", 0), d.get("cpu_us_per_req", 0)))' "$out")"
}
for rep in $(seq 1 "$REPS"); do
  for mode in rate closed; do
    if [ $((rep % 2)) = 1 ]; then
      run plain "$PLAIN_ADDR" "$PLAIN_PID" $mode; run journal "$JOURNAL_ADDR" "$JOURNAL_PID" $mode
    else
      run journal "$JOURNAL_ADDR" "$JOURNAL_PID" $mode; run plain "$PLAIN_ADDR" "$PLAIN_PID" $mode
    fi
  done
done
log "journal file: $(stat -c %s "$WORK/usage.journal") bytes at the end"

python3 - "$RESULTS" "$REPS" "$CONCURRENCY" "$DURATION" "$RATE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
reps, conc, dur, rate = sys.argv[2:6]
def med(mode, target, key):
    return statistics.median(r[key] for r in rows if r["target"] == target and r["mode"] == mode)
print(f"| proxy (c={conc}, {dur} × {reps} each, alternated) | load | requests/s (median) | CPU per request (median) |")
print("|---|---|---|---|")
for mode, load in (("rate", f"fixed {int(rate):,}/s"), ("closed", "closed loop")):
    plain, journal = med(mode, "plain", "cpu_us_per_req"), med(mode, "journal", "cpu_us_per_req")
    print(f"| without the journal | {load} | {med(mode, 'plain', 'rps'):,.0f} | {plain:.1f} µs |")
    print(f"| with `--usage-journal` | {load} | {med(mode, 'journal', 'rps'):,.0f} | {journal:.1f} µs ({(journal / plain - 1) * 100:+.1f} %) |")
print()
for mode in ("rate", "closed"):
    for t in ("plain", "journal"):
        print(f"{mode} {t}: " + ", ".join(f"{r['cpu_us_per_req']:.1f}" for r in rows if r["target"] == t and r["mode"] == mode) + " µs CPU/request")
PY
