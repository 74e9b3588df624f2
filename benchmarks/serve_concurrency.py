"""Eight requests to ``rcsd serve`` one after another against the same eight sent at once, through the official
``openai`` SDK: the server batches what waits, so the concurrent eight should take a fraction of the time.

Alternates sequential and concurrent rounds (A B A B ...) against one server process and prints the median of
each and their ratio, as a markdown table.
Usage: python benchmarks/serve_concurrency.py [--model M] [--rounds 3] [--max-tokens 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Question {i}: name a gas that plants take in, and say why in one sentence." for i in range(8)]


def start(model: str) -> tuple[subprocess.Popen, str]:
    """``rcsd serve`` on ``model`` at a free port: (process, base URL)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rcsd_cli", "serve", "--model", model, "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("rcsd serve did not start")


def one(client: openai.OpenAI, i: int, max_tokens: int) -> int:
    reply = client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=max_tokens, seed=i, temperature=1.0)
    return reply.usage.completion_tokens


def sequential(client: openai.OpenAI, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = sum(one(client, i, max_tokens) for i in range(len(PROMPTS)))
    return time.perf_counter() - t0, tokens


def concurrent(client: openai.OpenAI, max_tokens: int) -> tuple[float, int]:
    counts: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: counts.__setitem__(i, one(client, i, max_tokens)))
               for i in range(len(PROMPTS))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    proc, url = start(args.model)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        one(client, 0, 4)  # warm-up: first forward passes, tokenizer caches
        seq, conc = [], []
        for _ in range(args.rounds):
            seq.append(sequential(client, args.max_tokens))
            conc.append(concurrent(client, args.max_tokens))
    finally:
        proc.kill()
    s, c = statistics.median(t for t, _ in seq), statistics.median(t for t, _ in conc)
    lines = [f"rcsd serve, {args.model}, {len(PROMPTS)} completions requests of max_tokens {args.max_tokens} "
             f"(sampled, seeds 0-7), {args.rounds} rounds alternating", "",
             "| requests | median wall | completion tokens | each round (s) |", "| --- | --- | --- | --- |",
             f"| 8 one after another | {s:.2f} s | {seq[0][1]} | {', '.join(f'{t:.2f}' for t, _ in seq)} |",
             f"| 8 at once | {c:.2f} s | {conc[0][1]} | {', '.join(f'{t:.2f}' for t, _ in conc)} |", "",
             f"at once / one after another: {c / s:.2f}x the time ({s / c:.2f}x faster)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
