#!/usr/bin/env sh
# Fleet-loop benchmarks (issue 4), real processes on loopback, release build.
# The benchmarks are #[ignore]d tests in tests/tests/fleet.rs; each prints
# `RESULT …` lines, collected in target/fleet_bench.log.
#
#   tests/bench/fleet_bench.sh                 # everything (~12 min)
#   tests/bench/fleet_bench.sh cooldown config # only some: cooldown config rate
#
# knobs: CLAW_BENCH_TRIALS (100: cooldown trials and config writes),
#        CLAW_BENCH_RPM (60), CLAW_BENCH_SECS (120) for the rate runs, which
#        are 2 and 4 proxies × even (4 greedy clients per proxy) and skew
#        (80 % of the traffic to one proxy, open loop at twice the limit).
set -eu
cd "$(dirname "$0")/../.."
what="${*:-cooldown config rate}"
log=target/fleet_bench.log
cargo build --release --workspace --bins
: >"$log"
status=0
# run TEST [VAR=VALUE...]: one benchmark; a missed target shows in the exit status.
run() {
    name=$1
    shift
    out=$(env "$@" cargo test --release -q -p claw-tests --test integration -- \
        --ignored --nocapture --test-threads 1 --exact "$name" 2>&1) || status=1
    printf '%s\n' "$out" >>"$log"
    printf '%s\n' "$out" | grep -oE 'RESULT.*|panicked at.*|p99 .* target .*|only .* used|requests reached .*' || true
}
for w in $what; do
    case "$w" in
    cooldown) run fleet::bench_cooldown_propagation ;;
    config) run fleet::bench_config_propagation ;;
    rate)
        for p in 2 4; do
            for load in even skew; do
                run fleet::bench_rate_limit CLAW_BENCH_PROXIES=$p CLAW_BENCH_LOAD=$load
            done
        done
        ;;
    *)
        echo "unknown benchmark: $w (cooldown, config, rate)" >&2
        exit 2
        ;;
    esac
done
echo "--- results (full output: $log)"
grep -o 'RESULT.*' "$log" || true
exit $status
