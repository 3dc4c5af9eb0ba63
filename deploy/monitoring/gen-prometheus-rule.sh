#!/usr/bin/env bash
# Writes prometheus-rule.yaml (a PrometheusRule for the Prometheus Operator)
# from rules.yaml: the same groups, indented under `spec:`.
#
#   bash deploy/monitoring/gen-prometheus-rule.sh          # rewrite the file
#   bash deploy/monitoring/gen-prometheus-rule.sh --stdout # print it
set -euo pipefail
cd "$(dirname "$0")"

render() {
  cat <<'HEAD'
# Generated from rules.yaml by gen-prometheus-rule.sh: edit rules.yaml, then
# rerun the script. The `release` label is what a kube-prometheus-stack
# Prometheus selects rules by (`ruleSelector`); change it to match yours.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: claw-gateway
  labels:
    app.kubernetes.io/name: claw-gateway
    app.kubernetes.io/component: monitoring
    release: kube-prometheus-stack
spec:
HEAD
  # rules.yaml from its `groups:` line on (its comment header stays there),
  # two spaces deeper.
  sed -n '/^groups:/,$p' rules.yaml | sed 's/^\(.\)/  \1/'
}

if [ "${1:-}" = "--stdout" ]; then
  render
else
  render >prometheus-rule.yaml
fi
