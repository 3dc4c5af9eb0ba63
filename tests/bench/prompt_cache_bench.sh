#!/usr/bin/env bash
# Prompt-cache benchmark for issue 12: 50 agents × 3 `api: anthropic`
# backends × 20 requests over 2 proxies, with affinity (each agent sends
# `x-claw-agent-id`) and without (no affinity key: least-loaded). Each
# backend is its own mock provider account with its own simulated prompt
# cache (tests/src/mock/cache.rs: a prefix is read only on the account that
# saw it). Prints the share of cacheable prefix tokens read from cache
# (ceiling: every request after an agent's first, 19/20 = 95 %) and the cost
# at the configured prices, computed from the answers' usage and as the
# control plane's `clawctl stats total` reports it.
#
#   bash tests/bench/prompt_cache_bench.sh
#   BENCH_AGENTS=5 BENCH_REQUESTS=4 bash tests/bench/prompt_cache_bench.sh   # smoke run
#   BENCH_PROFILE=debug ...      # use target/debug (no release build)
#   BENCH_WRITE=1 ...            # also rewrite the prompt-cache section of BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

AGENTS="${BENCH_AGENTS:-50}"
REQUESTS="${BENCH_REQUESTS:-20}"
BACKENDS="${BENCH_BACKENDS:-3}"
SYSTEM_WORDS="${BENCH_SYSTEM_WORDS:-400}"
PROFILE="${BENCH_PROFILE:-release}"
WRITE="${BENCH_WRITE:-0}"
# USD per token: in, out, cache_read, cache_write (Claude Sonnet list prices).
P_IN=0.000003 P_OUT=0.000015 P_READ=0.0000003 P_WRITE=0.00000375

log() { printf '[cache-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$PROFILE" = release ]; then
  log "building (release)"
  cargo build --release -q -p claw-tests --bins -p claw-control-plane -p claw-data-plane -p clawctl
fi
BIN="$ROOT/target/$PROFILE"

WORK="$(mktemp -d /tmp/claw-cache-bench-XXXXXX)"
pids=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  log "logs in $WORK"
}
trap cleanup INT TERM EXIT

start() { # NAME CMD… — until its `listening …` line; sets LISTEN
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
wait_http() {
  for _ in $(seq 1 600); do
    curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null | grep -q '^[23]' && return 0
    sleep 0.2
  done
  log "$1 never answered"; exit 1
}

export CLAW_MASTER_KEY; CLAW_MASTER_KEY="$("$BIN/claw-control-plane" keygen)"
export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$("$BIN/claw-control-plane" token)"
export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$("$BIN/claw-control-plane" token)"
start control-plane "$BIN/claw-control-plane" --data-dir "$WORK/cp-data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0
export CLAW_SERVER="http://$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$LISTEN")"
export BENCH_UPSTREAM_KEY=sk-bench-upstream

MOCKS=()
for i in $(seq 1 "$BACKENDS"); do
  start "mock-$i" "$BIN/claw-mock-upstream" --addr 127.0.0.1:0 --no-record --name "acct-$i" \
    --completion-tokens 8 --cache-min-tokens 1 --api-key "$BENCH_UPSTREAM_KEY"
  MOCKS+=("${LISTEN#*http=}")
  "$BIN/clawctl" backend add "acct-$i" --api anthropic --url "http://${MOCKS[-1]}/v1" \
    --api-key-env BENCH_UPSTREAM_KEY --rpm 1000000000 \
    --model "claude=mock-model,in=$P_IN,out=$P_OUT,cache_read=$P_READ,cache_write=$P_WRITE" >/dev/null
done
CLAW_KEY="$("$BIN/clawctl" key add bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"
PROXIES=()
for i in 1 2; do
  start "proxy-$i" "$BIN/claw-data-plane" --addr 127.0.0.1:0 --control-plane "$CLAW_SERVER" --node-id "cache-bench-$i"
  PROXIES+=("http://${LISTEN#*http=}")
  wait_http "${PROXIES[-1]}/readyz"
done
log "control plane $CLAW_SERVER, mocks ${MOCKS[*]}, proxies ${PROXIES[*]}"

stats_cost() {
  "$BIN/clawctl" stats total -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(float(d.get("cost") or 0))'
}

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
for mode in affinity none; do
  # Every account starts cold: no cached prefixes from the other mode.
  for m in "${MOCKS[@]}"; do curl -s -X POST "http://$m/_mock/reset" >/dev/null; done
  before="$(stats_cost)"
  out="$(python3 "$ROOT/tests/bench/prompt_cache_bench.py" --proxy "${PROXIES[0]}" --proxy "${PROXIES[1]}" \
    --key "$CLAW_KEY" --model claude --agents "$AGENTS" --requests "$REQUESTS" --mode "$mode" \
    --system-words "$SYSTEM_WORDS" --prices "$P_IN,$P_OUT,$P_READ,$P_WRITE")"
  # Usage reaches the control plane in batches (every second by default).
  want="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["cost"])' "$out")"
  gw=0
  for _ in $(seq 1 40); do
    gw="$(python3 -c 'import sys; print(float(sys.argv[1]) - float(sys.argv[2]))' "$(stats_cost)" "$before")"
    python3 -c 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - float(sys.argv[2])) <= 1e-9 * max(1, float(sys.argv[2])) else 1)' "$gw" "$want" && break
    sleep 0.5
  done
  out="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["gateway_cost"]=float(sys.argv[2]); print(json.dumps(d))' "$out" "$gw")"
  echo "$out" >>"$RESULTS"
  log "$mode: $out"
done

REPORT="$WORK/report.md"
python3 - "$RESULTS" "$AGENTS" "$BACKENDS" "$REQUESTS" "$SYSTEM_WORDS" "$(nproc)" >"$REPORT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
agents, backends, requests, words, nproc = sys.argv[2:7]
print("<!-- prompt-cache-bench:begin (written by tests/bench/prompt_cache_bench.sh) -->")
print("## Prompt-cache benchmark (issue 12)")
print()
print(f"Reproduce: `bash tests/bench/prompt_cache_bench.sh`. {agents} agents × {backends} `api: anthropic` backends "
      f"× {requests} Messages requests each, alternating over 2 proxies, 16 agents at a time; each agent's "
      f"{words}-word system prompt is a `cache_control` breakpoint (its cacheable prefix). Each backend is its own "
      "mock provider account with its own simulated prompt cache (a prefix is read only on the account that "
      f"cached it). With affinity every agent sends `x-claw-agent-id`; without, no affinity key (least-loaded). "
      f"Ceiling: every request after an agent's first reads its prefix, {int(requests) - 1}/{requests}. "
      f"Prices per token: in 3e-6, out 1.5e-5, cache read 3e-7, cache write 3.75e-6. Machine: {nproc} cores.")
print()
print("| mode | requests | cacheable prefix tokens | read from cache | share read | cache writes | cost (from usage) | cost (`stats total`) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {'with affinity' if r['mode'] == 'affinity' else 'without affinity'} | {r['requests']} | {r['cacheable']:,} | "
          f"{r['read']:,} | {r['read_share'] * 100:.1f} % | {r['write']:,} | ${r['cost']:.4f} | ${r['gateway_cost']:.4f} |")
aff = next((r for r in rows if r["mode"] == "affinity"), None)
none = next((r for r in rows if r["mode"] == "none"), None)
print()
if aff:
    print(f"- Target ≥ 95 % read with affinity (ceiling {aff['ceiling'] * 100:.1f} %): "
          f"{aff['read_share'] * 100:.1f} % — {'met' if aff['read_share'] >= 0.95 - 1e-12 else 'NOT met'}")
if aff and none and none["cost"]:
    print(f"- Affinity cost {aff['cost'] / none['cost'] * 100:.1f} % of the cost without it.")
print("<!-- prompt-cache-bench:end -->")
PY
cat "$REPORT"
if [ "$WRITE" = 1 ]; then
  python3 - "$ROOT/BENCHMARKS.md" "$REPORT" <<'PY'
import sys
doc, section = open(sys.argv[1]).read(), open(sys.argv[2]).read().strip() + "\n"
b, e = "<!-- prompt-cache-bench:begin", "<!-- prompt-cache-bench:end -->"
if b in doc and e in doc:
    doc = doc[: doc.index(b)] + section + doc[doc.index(e) + len(e) + 1 :]
else:
    doc = doc.rstrip("\n") + "\n\n" + section
open(sys.argv[1], "w").write(doc)
PY
  log "wrote the prompt-cache section of BENCHMARKS.md"
fi
