#!/usr/bin/env bash
# Backup benchmark for issue 14: a control plane holding N client keys, M
# backends and A agents (created by one `clawctl apply`), then
# `clawctl backup create` (wall time, file size, entries, and how long writes
# were paused: the `writes_paused_ms` of the control plane's log line),
# `claw-control-plane restore` and `claw-control-plane check` on the result.
#
#   bash tests/bench/backup_bench.sh
#   BENCH_KEYS=2000 bash tests/bench/backup_bench.sh     # smaller
#   BENCH_PROFILE=debug ...                              # use target/debug (no release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
KEYS="${BENCH_KEYS:-20000}"
BACKENDS="${BENCH_BACKENDS:-500}"
AGENTS="${BENCH_AGENTS:-2000}"
PROFILE="${BENCH_PROFILE:-release}"

log() { printf '[backup-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
if [ "$PROFILE" = release ]; then
  log "building (release)"
  cargo build --release -q -p claw-control-plane -p clawctl
fi
BIN="$ROOT/target/$PROFILE"
WORK="$(mktemp -d /tmp/claw-backup-bench-XXXXXX)"
CP_PID=""
cleanup() { [ -n "$CP_PID" ] && kill "$CP_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

export CLAW_MASTER_KEY; CLAW_MASTER_KEY="$("$BIN/claw-control-plane" keygen)"
export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$("$BIN/claw-control-plane" token)"
export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$("$BIN/claw-control-plane" token)"
"$BIN/claw-control-plane" --data-dir "$WORK/data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  >"$WORK/cp.out" 2>"$WORK/cp.err" &
CP_PID=$!
for _ in $(seq 100); do grep -q '^listening' "$WORK/cp.out" 2>/dev/null && break; sleep 0.1; done
export CLAW_SERVER="http://$(sed -E 's/.*grpc=([^ ]+).*/\1/' "$WORK/cp.out")"

export BENCH_UPSTREAM_KEY=sk-bench-0123456789abcdef
python3 - "$KEYS" "$BACKENDS" "$AGENTS" >"$WORK/config.yaml" <<'PY'
import sys
keys, backends, agents = map(int, sys.argv[1:])
print("backends:")
for i in range(backends):
    print(f"  - {{name: b{i}, base_url: 'http://127.0.0.1:9/v1', api_key_env: BENCH_UPSTREAM_KEY, rpm: 600,"
          f" models: [{{canonical: m{i % 20}, native: m{i % 20}}}]}}")
print("client_keys:")
for i in range(keys):
    print(f"  - {{name: k{i}, rpm: 60}}")
print("agents:")
for i in range(agents):
    print(f"  - {{id: a{i}, model: m{i % 20}, interval: 24h, enabled: false}}")
PY
log "apply: $BACKENDS backends, $KEYS client keys, $AGENTS agents"
"$BIN/clawctl" --timeout 600s apply -f "$WORK/config.yaml" -o json >/dev/null

t0=$(date +%s.%N)
"$BIN/clawctl" --timeout 600s backup create "$WORK/b.clawbak" -o json >"$WORK/backup.json"
t1=$(date +%s.%N)
paused=$(grep -o 'writes_paused_ms=[0-9]*' "$WORK/cp.err" | tail -1 | cut -d= -f2)
kill "$CP_PID"; wait "$CP_PID" 2>/dev/null || true; CP_PID=""
t2=$(date +%s.%N)
"$BIN/claw-control-plane" restore --from "$WORK/b.clawbak" --data-dir "$WORK/restored" >/dev/null
t3=$(date +%s.%N)
"$BIN/claw-control-plane" check --data-dir "$WORK/restored" >"$WORK/check.out"
t4=$(date +%s.%N)
python3 - "$WORK/backup.json" "$t0" "$t1" "$t2" "$t3" "$t4" "$paused" "$(cat "$WORK/check.out")" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
t0, t1, t2, t3, t4 = map(float, sys.argv[2:7])
print(f"entries: {b.get('entries')}, file: {b.get('bytes', 0) / 1e6:.1f} MB")
print(f"backup create (clawctl, wall): {t1 - t0:.2f} s; writes paused: {sys.argv[7]} ms")
print(f"restore: {t3 - t2:.2f} s; check: {t4 - t3:.2f} s ({sys.argv[8]})")
PY
