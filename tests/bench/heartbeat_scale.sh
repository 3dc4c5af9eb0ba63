#!/usr/bin/env sh
# Heartbeat scheduler scale benchmark (see control-plane/tests/heartbeat_scale.rs).
# Defaults: 100,000 agents, 60 s staggered intervals, 120 s run, runs answered by a stub.
#   HB_BENCH_AGENTS=100000 HB_BENCH_INTERVAL_S=60 HB_BENCH_SECONDS=120 tests/bench/heartbeat_scale.sh
set -eu
cd "$(dirname "$0")/../.."
exec cargo test --release -p claw-control-plane --test integration heartbeat_scale -- --ignored --nocapture
