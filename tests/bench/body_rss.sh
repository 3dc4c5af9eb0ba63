#!/usr/bin/env bash
# Issue 17 item 4: the proxy's peak RSS (VmHWM) while 30 clients each POST a
# 15 MB chat body at once, for several --max-inflight-body-bytes caps (0 =
# unlimited, which is how the proxy behaved before the cap: 895 MB in the
# issue). One fresh proxy per run (VmHWM only grows); the answers' status
# codes are counted (200 served, 503 = no room in the body budget within
# 2 s, with Retry-After). Prints a table of medians over BENCH_REPS runs.
#
#   cargo build --release -p claw-control-plane -p claw-data-plane -p clawctl
#   cargo build --release -p claw-tests --bin claw-mock-upstream   # else the debug mock is used
#   tests/bench/body_rss.sh                    # caps: 0, default (256 MiB), 64 MiB
#   BENCH_REPS=5 BENCH_CLIENTS=30 BENCH_BODY_MB=15 BENCH_CAPS="0 default 67108864" tests/bench/body_rss.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
REPS="${BENCH_REPS:-3}"
CLIENTS="${BENCH_CLIENTS:-30}"
BODY_MB="${BENCH_BODY_MB:-15}"
CAPS="${BENCH_CAPS:-0 default 67108864}"
CP_ARGS=()
. tests/bench/lib.sh
start_gateway

# One chat body of BODY_MB MB (one long user message).
python3 - "$WORK/body.json" "$BODY_MB" <<'PY'
import json, sys
path, mb = sys.argv[1], int(sys.argv[2])
text = ("lorem ipsum dolor sit amet " * (mb * 1024 * 1024 // 27 + 1))[: mb * 1000 * 1000 - 200]
json.dump({"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": text}]},
          open(path, "w"))
PY
log "body $(stat -c %s "$WORK/body.json") bytes, $CLIENTS clients, caps: $CAPS, $REPS runs each"

printf '| --max-inflight-body-bytes | clients × body | peak RSS (VmHWM) median [runs] | idle RSS before | answers (median run) | proxy CPU s |\n'
printf '|---|---|---|---|---|---|\n'
for cap in $CAPS; do
  hwms=(); cpus=()
  for r in $(seq 1 "$REPS"); do
    args=()
    [ "$cap" != default ] && args=(--max-inflight-body-bytes "$cap")
    start_proxy "dp-$cap-$r" "${args[@]}"
    warm_up "$DP_ADDR"
    idle=$(rss_mb "$DP_PID")
    cpu0=$(cpu_s "$DP_PID")
    clients=()
    for i in $(seq 1 "$CLIENTS"); do
      curl -s -o "$WORK/body-$i" -w '%{http_code}\n' --max-time 300 -H "authorization: Bearer $CLAW_KEY" \
        -H 'content-type: application/json' --data-binary @"$WORK/body.json" \
        "http://$DP_ADDR/v1/chat/completions" >"$WORK/status-$i" &
      clients+=($!)
    done
    for j in "${clients[@]}"; do wait "$j" || true; done
    hwm=$(hwm_mb "$DP_PID"); cpu=$(echo "$(cpu_s "$DP_PID") - $cpu0" | bc)
    codes=$(cat "$WORK"/status-* | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')
    log "cap $cap run $r: VmHWM $hwm MB (idle $idle MB), answers: $codes, CPU $cpu s"
    hwms+=("$hwm"); cpus+=("$cpu"); last_codes=$codes; last_idle=$idle
    stop "$DP_PID"
  done
  label=$cap
  [ "$cap" = default ] && label="default (256 MiB)"
  [ "$cap" = 0 ] && label="0 (unlimited = before)"
  [ "$cap" = 67108864 ] && label="64 MiB"
  printf '| %s | %s × %s MB | %s MB [%s] | %s MB | %s| %s |\n' "$label" "$CLIENTS" "$BODY_MB" \
    "$(printf '%s\n' "${hwms[@]}" | median)" "${hwms[*]}" "$last_idle" "$last_codes" \
    "$(printf '%s\n' "${cpus[@]}" | median)"
done
