#!/usr/bin/env bash
# Checks the shipped monitoring without a Prometheus server (for CI:
# `bash deploy/monitoring/check.sh`). Needs promtool (Debian: the prometheus
# package) and python3.
#
# 1. `promtool check rules` on rules.yaml and `promtool test rules` on
#    rules_test.yaml (every alert fires in one case and stays quiet in another).
# 2. prometheus-rule.yaml is what gen-prometheus-rule.sh makes of rules.yaml
#    (the same groups), and, when PyYAML is importable, its spec.groups parse
#    equal to rules.yaml's groups.
# 3. grafana-dashboard.json is valid JSON, its datasource is ${DS_PROMETHEUS}
#    everywhere, and every metric name an alert expression or a dashboard
#    query uses is a metric name our binaries define (a string literal in
#    control-plane/src or data-plane/src; _bucket/_sum/_count of a histogram).
#    tests/tests/monitoring.rs checks the same names against the /metrics of
#    running binaries.
# 4. Every dashboard query parses as PromQL (promtool check rules on them as
#    recording rules, Grafana variables replaced).
# Exits non-zero with one line per problem.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd ../.. && pwd)"
status=0
fail() { echo "deploy/monitoring/check.sh: FAIL: $*" >&2; status=1; }

command -v promtool >/dev/null 2>&1 || { fail "promtool is not on PATH (Debian: apt-get install prometheus)"; exit 1; }

echo "== promtool check rules"
promtool check rules rules.yaml || fail "promtool check rules rules.yaml (above)"
echo "== promtool test rules"
promtool test rules rules_test.yaml || fail "promtool test rules rules_test.yaml (above)"

echo "== prometheus-rule.yaml = rules.yaml's groups"
if ! diff -u prometheus-rule.yaml <(bash gen-prometheus-rule.sh --stdout); then
  fail "prometheus-rule.yaml is not generated from rules.yaml: run bash deploy/monitoring/gen-prometheus-rule.sh"
fi
if python3 -c 'import yaml' >/dev/null 2>&1; then
  python3 - <<'PY' || fail "prometheus-rule.yaml's spec.groups differ from rules.yaml's groups"
import sys, yaml
plain = yaml.safe_load(open("rules.yaml"))["groups"]
crd = yaml.safe_load(open("prometheus-rule.yaml"))
ok = crd.get("kind") == "PrometheusRule" and crd.get("spec", {}).get("groups") == plain
sys.exit(0 if ok else 1)
PY
fi

echo "== dashboard JSON and metric names"
python3 - "$ROOT" <<'PY' || status=1
import json, os, re, sys
root = sys.argv[1]
problems = []

def names_in(expr):
    """Metric names in a PromQL expression: selectors' label matchers and
    by/without/on/ignoring label lists removed, then claw_/gen_ai_ words."""
    prev = None
    while prev != expr:
        prev = expr
        expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"\b(?:claw|gen_ai)_[a-z0-9_]+", expr))

# Alert expressions: rules.yaml without its comments (annotations lose their
# {{ templates }} with the braces; their prose names no metric).
rules = "\n".join(l for l in open("rules.yaml") if not l.lstrip().startswith("#"))
used = {n: "rules.yaml" for n in names_in(rules)}

try:
    dash = json.load(open("grafana-dashboard.json"))
except (OSError, ValueError) as e:
    print(f"deploy/monitoring/check.sh: FAIL: grafana-dashboard.json: {e}", file=sys.stderr)
    sys.exit(1)

def walk(v):
    if isinstance(v, dict):
        yield v
        for x in v.values():
            yield from walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from walk(x)

for d in walk(dash):
    ds = d.get("datasource")
    if isinstance(ds, dict) and ds.get("uid") != "${DS_PROMETHEUS}":
        problems.append(f"grafana-dashboard.json: a datasource is not ${{DS_PROMETHEUS}}: {ds}")
    if isinstance(ds, str) and ds != "${DS_PROMETHEUS}":
        problems.append(f"grafana-dashboard.json: a datasource is not ${{DS_PROMETHEUS}}: {ds}")
    for key in ("expr", "definition"):
        if isinstance(d.get(key), str):
            for n in names_in(d[key]):
                used.setdefault(n, "grafana-dashboard.json")
if not any(i.get("name") == "DS_PROMETHEUS" for i in dash.get("__inputs", [])):
    problems.append("grafana-dashboard.json: no DS_PROMETHEUS input")

defined = set()
for sub in ("control-plane/src", "data-plane/src"):
    for dirpath, _, files in os.walk(os.path.join(root, sub)):
        for f in files:
            if f.endswith(".rs"):
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                defined |= set(re.findall(r'"((?:claw|gen_ai)_[a-z0-9_]+)"', text))
for n, where in sorted(used.items()):
    base = re.sub(r"_(bucket|sum|count)$", "", n)
    if n not in defined and base not in defined:
        problems.append(f"{where}: {n} is not a metric our binaries define")
for p in problems:
    print(f"deploy/monitoring/check.sh: FAIL: {p}", file=sys.stderr)
print(f"{len(used)} metric names used, all defined" if not problems else "")
sys.exit(1 if problems else 0)
PY

echo "== dashboard queries parse as PromQL (promtool check rules on them as recording rules)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/dashboard-queries.yaml" <<'PY' || status=1
import json, sys
# Grafana's variables replaced by values PromQL accepts.
subs = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$model": ".*", "$backend": ".*"}
dash = json.load(open("grafana-dashboard.json"))
exprs = []
def walk(v):
    if isinstance(v, dict):
        if isinstance(v.get("expr"), str):
            exprs.append(v["expr"])
        for x in v.values():
            walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(dash)
with open(sys.argv[1], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k in sorted(subs, key=len, reverse=True):
            e = e.replace(k, subs[k])
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
print(f"{len(exprs)} dashboard queries")
PY
promtool check rules "$tmp/dashboard-queries.yaml" || fail "a dashboard query is not valid PromQL (above)"
exit $status
