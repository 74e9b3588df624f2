"""Load on ``rcsd serve``: N requests from T client threads; every one must be answered or refused.

Starts ``rcsd serve`` (loopback, a free port, ``--max-queue Q``), sends completions requests from
T threads at once and counts the outcomes: 200 (answered), 503 (refused: queue full), anything
else, and dropped (no HTTP answer at all: reset, timeout). Prints p50/p95 latency of the answered
and refused requests, and whether the server's console shows a traceback. Exit code 1 if any
request was dropped, got another status, or the console has a traceback.

    python benchmarks/load_serve.py --requests 200 --threads 8 --max-queue 4
    python benchmarks/load_serve.py --model /path/to/model --json    # last line: the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(model: str, max_queue: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rcsd_cli", "serve", "--model", model, "--port", "0",
                             "--max-queue", str(max_queue)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("rcsd serve did not start")


def one(url: str, i: int, max_tokens: int) -> tuple[str, float]:
    body = json.dumps({"prompt": f"Question {i}: what is {i} + {i}?", "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            json.loads(resp.read())
            outcome = "ok"
    except urllib.error.HTTPError as exc:
        exc.read()
        outcome = "busy" if exc.code == 503 else "other"
    except (OSError, ValueError):
        outcome = "dropped"
    return outcome, time.perf_counter() - t0


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model to serve (default: the embedded one).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    args = ap.parse_args()

    proc, url = start(args.model, args.max_queue)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            results = list(pool.map(lambda i: one(url, i, args.max_tokens), range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        proc.kill()
        console = proc.stderr.read()
        proc.wait()
    counts = {k: sum(o == k for o, _ in results) for k in ("ok", "busy", "other", "dropped")}
    ok = [s for o, s in results if o == "ok"]
    busy = [s for o, s in results if o == "busy"]
    figures = {**counts, "requests": args.requests, "threads": args.threads, "max_queue": args.max_queue,
               "max_tokens": args.max_tokens, "wall_s": round(wall, 2),
               "p50_s": quantile(ok, 0.5), "p95_s": quantile(ok, 0.95),
               "busy_p50_s": quantile(busy, 0.5), "traceback": "Traceback" in console}
    print(f"{args.requests} requests from {args.threads} threads, --max-queue {args.max_queue}, "
          f"max_tokens {args.max_tokens}, {wall:.1f} s")
    print("| answered (200) | refused (503) | other status | dropped | p50 answered | p95 answered | p50 refused |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def s(x):
        return "n/a" if x is None else f"{x:.3f} s"

    print(f"| {counts['ok']} | {counts['busy']} | {counts['other']} | {counts['dropped']} | {s(figures['p50_s'])} "
          f"| {s(figures['p95_s'])} | {s(figures['busy_p50_s'])} |")
    if args.json:
        print(json.dumps(figures))
    bad = counts["other"] or counts["dropped"] or figures["traceback"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
