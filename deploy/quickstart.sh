#!/usr/bin/env bash
# Claw Gateway quickstart: builds the binaries and starts, on loopback, the
# control plane (sled under ./.quickstart), one mock OpenAI upstream
# registered as a backend with a demo model, and one proxy. Prints a client
# key and a ready-to-paste curl. Ctrl-C stops everything.
#
#   bash deploy/quickstart.sh            # ports: proxy 8080, gRPC 50051
#   CLAW_QS_PROFILE=debug bash deploy/quickstart.sh   # faster build
#   CARGO_TARGET_DIR=/path bash deploy/quickstart.sh   # binaries built and run from there
#
# The first release build compiles the whole workspace: about 5-8 minutes on
# 2 cores. Later runs rebuild only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${CLAW_QS_PROFILE:-release}"
STATE="${CLAW_QS_DIR:-.quickstart}"
DP_ADDR="${CLAW_DP_ADDR:-127.0.0.1:8080}"
GRPC_ADDR="${CLAW_CP_GRPC_ADDR:-127.0.0.1:50051}"
HTTP_ADDR="${CLAW_CP_HTTP_ADDR:-127.0.0.1:9091}"

# Where cargo puts the binaries: CARGO_TARGET_DIR (or build.target-dir in a
# cargo config) when set, else ./target. cargo metadata knows every source.
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null)" \
  || TARGET_DIR=""
[ -n "$TARGET_DIR" ] || TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if [ "$PROFILE" = release ]; then
  echo "building ($PROFILE, into $TARGET_DIR)… the first release build of the workspace takes" >&2
  echo "about 5-8 minutes on 2 cores (CLAW_QS_PROFILE=debug is quicker); later runs take seconds." >&2
  cargo build --release --workspace --bins >&2
else
  echo "building ($PROFILE, into $TARGET_DIR)… the first build takes a few minutes; later runs take seconds." >&2
  cargo build --workspace --bins >&2
fi
BIN="$TARGET_DIR/$PROFILE"

mkdir -p "$STATE" && chmod 700 "$STATE"
# Secrets are generated once and kept (0600) so a restart reuses the data dir.
[ -s "$STATE/master.key" ] || (umask 077; "$BIN/claw-control-plane" keygen > "$STATE/master.key")
[ -s "$STATE/admin.token" ] || (umask 077; "$BIN/claw-control-plane" token > "$STATE/admin.token")
[ -s "$STATE/proxy.token" ] || (umask 077; "$BIN/claw-control-plane" token > "$STATE/proxy.token")
export CLAW_MASTER_KEY_FILE="$STATE/master.key"
export CLAW_ADMIN_TOKEN; CLAW_ADMIN_TOKEN="$(cat "$STATE/admin.token")"
export CLAW_PROXY_TOKEN; CLAW_PROXY_TOKEN="$(cat "$STATE/proxy.token")"
export CLAW_SERVER="http://$GRPC_ADDR"

pids=()
cleanup() { trap - INT TERM EXIT; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo "stopped." >&2; }
trap cleanup INT TERM EXIT

# start NAME CMD… — runs CMD with logs in $STATE/NAME.log and waits for its
# "listening …" line, which it leaves in $LISTEN. Never call it in a
# subshell (`$(start …)`): the pid would not reach `pids` and Ctrl-C would
# leave the process running.
start() {
  local name=$1; shift
  local out="$STATE/$name.out"
  : > "$out"
  "$@" > "$out" 2> "$STATE/$name.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q '^listening' "$out"; then LISTEN="$(head -n1 "$out")"; return 0; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then echo "$name failed to start; see $STATE/$name.log:" >&2; tail -n 20 "$STATE/$name.log" >&2; exit 1; fi
    sleep 0.1
  done
  echo "$name did not start in 30 s; see $STATE/$name.log" >&2; exit 1
}

start control-plane "$BIN/claw-control-plane" --data-dir "$STATE/data" --grpc-addr "$GRPC_ADDR" --http-addr "$HTTP_ADDR"
start mock-upstream "$BIN/claw-mock-upstream" --addr 127.0.0.1:0 --api-key mock-provider-key --name demo-upstream --chunk-delay 20ms
MOCK_ADDR="${LISTEN#*http=}"

export DEMO_PROVIDER_KEY=mock-provider-key
CTL="$BIN/clawctl"
if ! "$CTL" backend get demo >/dev/null 2>&1; then
  "$CTL" backend add demo --url "http://$MOCK_ADDR/v1" --api-key-env DEMO_PROVIDER_KEY \
    --rpm 6000 --model demo-model=mock-native-1,in=0.000001,out=0.000002 >/dev/null
else
  "$CTL" backend update demo --url "http://$MOCK_ADDR/v1" >/dev/null
fi
if [ -s "$STATE/client.key" ]; then
  CLIENT_KEY="$(cat "$STATE/client.key")"
else
  CLIENT_KEY="$("$CTL" key add demo-client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"
  (umask 077; printf '%s\n' "$CLIENT_KEY" > "$STATE/client.key")
fi

start proxy "$BIN/claw-data-plane" --addr "$DP_ADDR" --control-plane "$CLAW_SERVER" --node-id quickstart-proxy
for _ in $(seq 1 100); do curl -fs "http://$DP_ADDR/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
# Self-check: one real completion through the proxy (its rate share arrives
# from the control plane just after the snapshot, so allow a few seconds).
answered=""
for _ in $(seq 1 100); do
  if curl -fs "http://$DP_ADDR/v1/chat/completions" -H "Authorization: Bearer $CLIENT_KEY" \
      -H 'Content-Type: application/json' \
      -d '{"model":"demo-model","messages":[{"role":"user","content":"ping"}]}' >/dev/null 2>&1; then
    answered=1; break
  fi
  sleep 0.1
done
[ -n "$answered" ] || echo "warning: the proxy did not answer a test completion yet; see $STATE/proxy.log" >&2

cat <<MSG

Claw Gateway is up.
  proxy (OpenAI API)   http://$DP_ADDR/v1
  control plane gRPC   $CLAW_SERVER        metrics http://$HTTP_ADDR/metrics
  mock upstream        http://$MOCK_ADDR/v1 (backend "demo", model "demo-model")
  logs and state       $STATE/

Try it:
  curl -s http://$DP_ADDR/v1/chat/completions \\
    -H "Authorization: Bearer $CLIENT_KEY" -H 'Content-Type: application/json' \\
    -d '{"model":"demo-model","messages":[{"role":"user","content":"Hello!"}]}'

Operate it (in another shell):
  export CLAW_SERVER=$CLAW_SERVER CLAW_ADMIN_TOKEN=\$(cat $STATE/admin.token)
  $CTL backend list
  $CTL proxies

Ctrl-C stops everything.
MSG
wait
