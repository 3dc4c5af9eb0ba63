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

CP_ARGS=()
BENCH_KEEP="${BENCH_KEEP:-1}"
. tests/bench/lib.sh
start_gateway
start_proxy plain
PLAIN_ADDR=$DP_ADDR; PLAIN_PID=$DP_PID
start_proxy journal --usage-journal "$WORK/usage.journal"
JOURNAL_ADDR=$DP_ADDR; JOURNAL_PID=$DP_PID
warm_up "$PLAIN_ADDR"
warm_up "$JOURNAL_ADDR"
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
