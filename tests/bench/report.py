#!/usr/bin/env python3
"""Turns the JSON lines of tests/bench/proxy_bench.sh into the Markdown
section of BENCHMARKS.md (medians over repetitions), or splices such a
section into BENCHMARKS.md between its markers.

  report.py RESULTS.jsonl --command CMD --cpu CPU ... > section.md
  report.py --splice BENCHMARKS.md section.md
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

BEGIN = "<!-- proxy-bench:begin (written by tests/bench/proxy_bench.sh) -->"
END = "<!-- proxy-bench:end -->"
NAMES = {
    "direct": "mock upstream, direct",
    "claw": "**claw-data-plane**",
    "claw-before": "claw-data-plane, earlier binary",
    "nginx": "nginx (reverse proxy)",
    "litellm": "LiteLLM proxy",
    "direct-messages": "mock upstream, direct — Anthropic `/v1/messages`",
    "claw-messages": "**claw-data-plane — Anthropic `/v1/messages` passthrough**",
    "claw-translated": "**claw-data-plane — `/v1/messages` translated to an openai backend**",
}


def splice(doc: Path, section: Path) -> None:
    body = section.read_text().rstrip() + "\n"
    block = f"{BEGIN}\n{body}{END}\n"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    doc.write_text(text)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_us(us):
    if us is None:
        return "n/a"
    return f"{us / 1000:.2f} ms" if abs(us) >= 1000 else f"{us:.0f} µs"


def fmt_cpu(us):
    return "n/a" if us is None else f"{us:.1f} µs"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?")
    ap.add_argument("section", nargs="?")
    ap.add_argument("--splice")
    ap.add_argument("--command", default="")
    ap.add_argument("--cpu", default="")
    ap.add_argument("--nproc", default="")
    ap.add_argument("--load-before", default="")
    ap.add_argument("--load-after", default="")
    ap.add_argument("--duration", default="")
    ap.add_argument("--reps", default="")
    ap.add_argument("--litellm-workers", default="")
    ap.add_argument("--versions", default="")
    a = ap.parse_args()
    if a.splice:
        splice(Path(a.splice), Path(a.results))
        return 0

    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["target"]), []).append(r)

    def rep_of(kind, target, rep):
        for r in by.get((kind, target), []):
            if r["rep"] == rep:
                return r
        return None

    order = ["direct", "claw", "claw-before", "nginx", "litellm", "direct-messages", "claw-messages", "claw-translated"]
    targets = [t for t in order if ("c1", t) in by]
    reps = sorted({r["rep"] for r in by.get(("c1", "direct"), [])})

    def baseline(target):
        # The translated row's upstream work is a chat completion.
        return "direct-messages" if target.endswith("-messages") else "direct"

    def added(target, pct):
        diffs = []
        for rep in reps:
            x, d = rep_of("c1", target, rep), rep_of("c1", baseline(target), rep)
            if x and d:
                diffs.append(x[pct] - d[pct])
        return med(diffs)

    summary = {}
    for t in targets:
        summary[t] = {
            "p50": med([r["p50_us"] for r in by[("c1", t)]]),
            "p99": med([r["p99_us"] for r in by[("c1", t)]]),
            "added_p50": None if t.startswith("direct") else added(t, "p50_us"),
            "added_p99": None if t.startswith("direct") else added(t, "p99_us"),
            "rps": med([r["rps"] for r in by.get(("c64", t), [])]),
            "p99_64": med([r["p99_us"] for r in by.get(("c64", t), [])]),
            "errors": sum(r.get("errors", 0) for k in ("c1", "c64") for r in by.get((k, t), [])),
            "cpu1": med([r.get("cpu_us_per_req") for r in by[("c1", t)]]),
            "cpu64": med([r.get("cpu_us_per_req") for r in by.get(("c64", t), [])]),
        }

    out = []
    w = out.append
    w("## Proxy overhead (issue 3)")
    w("")
    w(f"Reproduce: `{a.command}` (installs nginx-light and `litellm[proxy]` if missing, builds `--release`).")
    w("")
    w(
        f"Machine: {a.nproc} cores, {a.cpu}; everything (load generator, mock upstream, proxies) on loopback "
        f"on the same machine in the same run. Load average {a.load_before} before the runs, "
        f"{a.load_after} after (the machine is shared with other engineers' builds: quote ratios, "
        "not absolute numbers). Versions: " + a.versions + "."
    )
    w("")
    w(
        f"Load generator: `claw-bench` (tests/src/bin/claw-bench.rs), closed loop over keep-alive HTTP/1.1 "
        f"connections, non-streaming `POST /v1/chat/completions` with a ~150-byte JSON body and a bearer "
        f"key; {a.duration} per measurement after a 1 s warm-up; each figure is the median of {a.reps} "
        "repetitions, targets interleaved within each repetition. Added latency = through X minus direct, "
        f"per repetition. nginx: `worker_processes auto`, upstream `keepalive 128`, `keepalive_requests 1000000`, `proxy_buffering off`. "
        f"LiteLLM: `litellm --num_workers {a.litellm_workers}` (its production mode is several uvicorn workers; "
        "one per core here), `model_list` with `api_base` pointing at the same mock, master key, no database; "
        "paused with SIGSTOP while the other targets are measured (its idle workers' background loops "
        "otherwise show in their c=1 tails). "
        "Our proxy: one `claw-data-plane` built with the `production` profile the image ships (fat LTO), one single-threaded tokio runtime per core (connections spread least-loaded, each thread with its own pool of upstream connections), fed by `claw-control-plane` (to which it reports usage summed per bucket once a second, the default `--report-interval`)."
    )
    w("")
    w("| target | p50 @ c=1 | p99 @ c=1 | added p50 | added p99 | RPS @ c=64 | p99 @ c=64 | CPU/req @ c=1 | CPU/req @ c=64 | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        s = summary[t]
        w(
            f"| {NAMES[t]} | {fmt_us(s['p50'])} | {fmt_us(s['p99'])} | "
            f"{'—' if s['added_p50'] is None else fmt_us(s['added_p50'])} | "
            f"{'—' if s['added_p99'] is None else fmt_us(s['added_p99'])} | "
            f"{s['rps']:,.0f} | {fmt_us(s['p99_64'])} | {fmt_cpu(s['cpu1'])} | {fmt_cpu(s['cpu64'])} | {s['errors']} |"
        )
    w("")
    if "claw-messages" in summary:
        w(
            "Messages rows (issue 12): the same loop with `POST /v1/messages` (`x-api-key`, "
            "`anthropic-version`), direct to the mock and through our proxy to an `api: anthropic` backend "
            "on the same mock; the proxy forwards the body bytes with only `model` replaced. "
            "Added latency is against the direct Messages row."
        )
        w("")
    if "claw-translated" in summary:
        w(
            "Translated row (issue 13): the same Messages loop through our proxy to an `api: openai` "
            "backend on the same mock: each request is translated to a chat completion and the answer "
            "back to a Message (re-encoded, deterministically). Added latency is against the direct "
            "chat row, the upstream's own work."
        )
        w("")
    w(
        "CPU/req: user + system CPU time of the target's own process(es) over the measuring window ÷ "
        "requests answered in it (`claw-bench --cpu-pid`; nginx: master and workers; direct: the mock "
        "upstream itself). The steadiest figure here: it moves by a few percent between runs."
    )
    w("")
    cb, ca = summary.get("claw-before"), summary.get("claw")
    if cb and ca and cb["cpu64"] and ca["cpu64"]:
        w(
            f"This binary vs the earlier one, same run, same upstream: CPU/req at c=1 "
            f"{fmt_cpu(ca['cpu1'])} vs {fmt_cpu(cb['cpu1'])} ({(ca['cpu1'] / cb['cpu1'] - 1) * 100:+.1f} %), "
            f"at c=64 {fmt_cpu(ca['cpu64'])} vs {fmt_cpu(cb['cpu64'])} ({(ca['cpu64'] / cb['cpu64'] - 1) * 100:+.1f} %)."
        )
        w("")

    ttft = {t: by.get(("ttft", t)) for t in ("direct", "claw")}
    if all(ttft.values()):
        d50 = med([r["p50_us"] for r in ttft["direct"]])
        d99 = med([r["p99_us"] for r in ttft["direct"]])
        c50 = med([r["p50_us"] for r in ttft["claw"]])
        c99 = med([r["p99_us"] for r in ttft["claw"]])
        w("Time to first token (first SSE byte of a streamed chat completion, sequential, 500 per repetition):")
        w("")
        w("| | p50 | p99 |")
        w("|---|---:|---:|")
        w(f"| direct | {fmt_us(d50)} | {fmt_us(d99)} |")
        w(f"| through claw-data-plane | {fmt_us(c50)} | {fmt_us(c99)} |")
        w(f"| difference | {fmt_us(c50 - d50)} | {fmt_us(c99 - d99)} |")
        w("")
        summary["ttft_delta_p50"] = c50 - d50
    st = by.get(("streams", "claw"))
    if st:
        s = st[0]
        w(
            f"Concurrent SSE streams through claw-data-plane: **{s['peak_open']:,} open at once** "
            f"({s['streams']:,} opened at ~{s['streams'] / max(s['ramp_s'], 1e-9):,.0f}/s, each 20 chunks "
            f"500 ms apart); {s['completed']:,} ended with `[DONE]`, {s['failed']:,} failed; proxy peak RSS "
            f"{s.get('proxy_peak_rss_mb', 'n/a')} MB."
        )
        w("")

    c, n, l = summary.get("claw"), summary.get("nginx"), summary.get("litellm")
    w("Targets:")
    w("")
    if c and n:
        ratio = c["added_p99"] / n["added_p99"] if n["added_p99"] and n["added_p99"] > 0 else float("nan")
        w(
            f"- added p99 ≤ 1.5× nginx's: {fmt_us(c['added_p99'])} vs {fmt_us(n['added_p99'])} → "
            f"{ratio:.2f}× — {'met' if ratio <= 1.5 else 'NOT met'}"
        )
        r = c["rps"] / n["rps"]
        w(f"- RPS ≥ 0.8× nginx: {c['rps']:,.0f} vs {n['rps']:,.0f} → {r:.2f}× — {'met' if r >= 0.8 else 'NOT met'}")
    if c and l:
        r = c["rps"] / l["rps"] if l["rps"] else float("inf")
        w(f"- RPS ≥ 20× LiteLLM: {c['rps']:,.0f} vs {l['rps']:,.0f} → {r:.1f}× — {'met' if r >= 20 else 'NOT met'}")
    if st:
        w(f"- ≥ 5,000 concurrent streams: {st[0]['peak_open']:,} — {'met' if st[0]['peak_open'] >= 5000 and st[0]['failed'] == 0 else 'NOT met'}")
    if "ttft_delta_p50" in summary:
        dlt = summary["ttft_delta_p50"]
        w(f"- TTFT within ~1 ms of direct: +{fmt_us(dlt)} at p50 — {'met' if dlt <= 1000 else 'NOT met'}")
    tr, pt = summary.get("claw-translated"), summary.get("claw-messages")
    if tr and pt:
        r = tr["rps"] / pt["rps"] if pt["rps"] else float("nan")
        w(f"- translated RPS ≥ 80 % of the Messages passthrough's: {tr['rps']:,.0f} vs {pt['rps']:,.0f} → {r * 100:.0f} % — {'met' if r >= 0.8 else 'NOT met'}")
        if tr["added_p50"] is not None and pt["added_p50"] is not None:
            d = tr["added_p50"] - pt["added_p50"]
            w(f"- translated added p50 < 100 µs over the passthrough's: {d:+.0f} µs — {'met' if d < 100 else 'NOT met'}")
        if tr["cpu1"] and pt["cpu1"]:
            w(f"- CPU/req translated vs passthrough at c=1: {fmt_cpu(tr['cpu1'])} vs {fmt_cpu(pt['cpu1'])}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
