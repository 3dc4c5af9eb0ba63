#!/usr/bin/env python3
"""Opens N TCP connections to ADDR that send nothing (the issue-17 item-3
attack), holds them, and reports: the RSS (VmRSS, VmHWM) and open fds of
the watched processes before and while they are held, whether PROBE (an
http URL, e.g. /healthz) answers while they are held, and how many of the
connections the server has closed after HOLD seconds. One JSON line on
stdout. Used by tests/bench/idle_conns.sh."""
import argparse, json, os, select, socket, time, urllib.request


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def probe(url):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception as e:  # refused, reset, timeout
        code = type(e).__name__
    return {"status": code, "ms": round((time.monotonic() - t) * 1000, 1)}


def closed_count(socks):
    """Connections the server has ended: EOF or a reset, or an HTTP/1
    answer (408/503 before it closes). An HTTP/2 server's opening SETTINGS
    frame on a connection still open does not count."""
    n = 0
    for s in socks:
        s.setblocking(False)
        data, ended = b"", False
        while True:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            data += chunk
        n += 1 if ended or data.startswith(b"HTTP/") else 0
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--hold", type=float, default=3.0)
    ap.add_argument("--watch", action="append", default=[], help="NAME=PID")
    ap.add_argument("--probe", action="append", default=[], help="http URL answered while held")
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    watch = dict(w.split("=", 1) for w in a.watch)
    before = {k: mem(p) for k, p in watch.items()}
    socks, failed = [], 0
    t0 = time.monotonic()
    for _ in range(a.n):
        s = socket.socket()
        try:
            s.connect((host, int(port)))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    opened = time.monotonic() - t0
    time.sleep(a.hold)
    held = {k: mem(p) for k, p in watch.items()}
    probes = [probe(u) for u in a.probe]
    closed = closed_count(socks)
    print(json.dumps({
        "n": a.n, "connect_failed": failed, "open_s": round(opened, 2), "hold_s": a.hold,
        "closed_by_server": closed, "still_open": len(socks) - closed,
        "before": before, "held": held, "probes": probes,
    }))
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
