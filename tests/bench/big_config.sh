#!/usr/bin/env bash
# Big configurations (issue 17 item 5): snapshot size, apply time and time
# until proxies ACK for 100k client keys and 25k backends. A benchmark: not
# run by the tests. Usage (from the repository root):
#   cargo build --release -p claw-control-plane -p claw-data-plane -p clawctl
#   tests/bench/big_config.sh [KEYS] [BACKENDS]      # default 100000 25000
set -euo pipefail
KEYS=${1:-100000}
BACKENDS=${2:-25000}
BIN=${BIN:-target/release}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# 1. Snapshot size at the issue's scale, raw and gzip (what the stream sends).
# The bytes do not depend on the build profile: the (cheaper) debug test
# build writes them.
CLAW_SNAPSHOT_OUT="$WORK/snapshot.bin" cargo test -q -p claw-control-plane --lib \
  -- size_tests::write_the_issue_scale_snapshot --ignored >/dev/null
raw=$(stat -c %s "$WORK/snapshot.bin")
gz=$(gzip -6 -c "$WORK/snapshot.bin" | wc -c)
echo "snapshot (synthetic 100k keys + 25k backends): raw ${raw} B, gzip ${gz} B"

# 2. A control plane and two proxies, then one apply with everything.
export CLAW_ADMIN_TOKEN=bench-admin-token-0123456789 CLAW_PROXY_TOKEN=bench-proxy-token-0123456789
export BENCH_KEY=sk-bench-0123456789abcdef
CLAW_MASTER_KEY=$("$BIN/claw-control-plane" keygen)
export CLAW_MASTER_KEY
"$BIN/claw-control-plane" --data-dir "$WORK/cp" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  >"$WORK/cp.out" 2>"$WORK/cp.log" &
for _ in $(seq 1 600); do grep -qs '^listening' "$WORK/cp.out" && break; sleep 0.1; done
CP_GRPC=$(sed -E 's/.*grpc=([^ ]+).*/\1/' <"$WORK/cp.out")
for i in 0 1; do
  "$BIN/claw-data-plane" --control-plane "http://$CP_GRPC" --node-id "bench-$i" \
    --proxy-token "$CLAW_PROXY_TOKEN" --addr 127.0.0.1:0 >"$WORK/dp$i.log" 2>&1 &
done
ctl() { "$BIN/clawctl" --server "http://$CP_GRPC" --token "$CLAW_ADMIN_TOKEN" --timeout 600s "$@"; }
{
  echo "backends:"
  for ((i = 0; i < BACKENDS; i++)); do
    echo "  - {name: b$i, base_url: 'https://llm-$i.example.com/v1', api_key_env: BENCH_KEY, models: [{canonical: gpt-4o, native: gpt-4o}]}"
  done
  echo "client_keys:"
  for ((i = 0; i < KEYS; i++)); do echo "  - {name: k$i, models: [gpt-4o]}"; done
} >"$WORK/big.yaml"
start=$(date +%s.%N)
ctl apply -f "$WORK/big.yaml" >"$WORK/apply.out"
applied=$(date +%s.%N)
want=$(ctl snapshot -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["config_version"])')
until ctl proxies -o json | python3 -c "import json,sys; l=json.load(sys.stdin); sys.exit(0 if len(l)==2 and all(p['acked_version']>=$want for p in l) else 1)"; do
  sleep 0.2
done
acked=$(date +%s.%N)
secrets=$(grep -c 'secret:' "$WORK/apply.out")
echo "apply of $KEYS keys + $BACKENDS backends: $(echo "$applied - $start" | bc) s, secrets printed: $secrets"
echo "until both proxies ACK version $want: $(echo "$acked - $applied" | bc) s after the apply"
start=$(date +%s.%N); n=$(ctl key list -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "key list ($n keys, paged): $(echo "$(date +%s.%N) - $start" | bc) s"
