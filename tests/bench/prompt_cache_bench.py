"""Driver of tests/bench/prompt_cache_bench.sh: agents talking Anthropic
Messages through several proxies, with or without an affinity key.

Each agent has its own system prompt (a `cache_control` breakpoint, the
cacheable prefix) and sends `--requests` sequential turns, alternating over
the proxies; the agents run concurrently. From every answer's usage it sums
the cacheable prefix tokens (the system prompt: what a provider could serve
from its cache on every turn after the agent's first), the cache reads and
writes, uncached input and output, and the cost at the given prices (the
issue's formula). Prints one JSON object.

  python3 prompt_cache_bench.py --proxy URL --proxy URL --key K --model M \
      --agents 50 --requests 20 --mode affinity|none --prices IN,OUT,READ,WRITE
"""

import argparse
import concurrent.futures
import json
import sys
import threading
import urllib.error
import urllib.request


def turn(proxy, key, model, agent, n, system, affinity):
    body = json.dumps(
        {
            "model": model,
            "max_tokens": 8,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": f"agent {agent} turn {n}: what next?"}],
        }
    ).encode()
    headers = {
        "x-api-key": key,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    if affinity:
        headers["x-claw-agent-id"] = f"agent-{agent}"
    req = urllib.request.Request(f"{proxy}/v1/messages", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=60) as res:
        return json.loads(res.read())["usage"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", action="append", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--system-words", type=int, default=400)
    ap.add_argument("--mode", choices=["affinity", "none"], required=True)
    ap.add_argument("--prices", default="0.000003,0.000015,0.0000003,0.00000375")
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    p_in, p_out, p_read, p_write = (float(x) for x in a.prices.split(","))

    totals = dict(requests=0, errors=0, cacheable=0, read=0, write=0, uncached=0, output=0)
    lock = threading.Lock()

    def agent(i):
        system = " ".join(f"a{i}w{j}" for j in range(a.system_words))
        for n in range(a.requests):
            proxy = a.proxy[(i + n) % len(a.proxy)]
            try:
                u = turn(proxy, a.key, a.model, i, n, system, a.mode == "affinity")
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                with lock:
                    totals["errors"] += 1
                print(f"agent {i} turn {n}: {e}", file=sys.stderr)
                continue
            with lock:
                totals["requests"] += 1
                totals["cacheable"] += a.system_words
                totals["read"] += u.get("cache_read_input_tokens") or 0
                totals["write"] += u.get("cache_creation_input_tokens") or 0
                totals["uncached"] += u["input_tokens"]
                totals["output"] += u["output_tokens"]

    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(agent, range(a.agents)))

    t = totals
    t["mode"] = a.mode
    t["read_share"] = t["read"] / t["cacheable"] if t["cacheable"] else 0.0
    t["ceiling"] = (a.requests - 1) / a.requests
    t["cost"] = t["uncached"] * p_in + t["read"] * p_read + t["write"] * p_write + t["output"] * p_out
    print(json.dumps(t))
    return 1 if t["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
