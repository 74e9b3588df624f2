"""Peak memory and throughput of the distillation loss step, chunked vs unchunked.

For vocab 49,152 (SmolLM2) and hidden size 576, times forward+backward of the top-20 forward-KL
loss from final hidden states for one sequence at completion lengths 256, 1k and 4k. Each
configuration runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own;
on CUDA the peak allocated memory is reported instead. Medians over --repeats runs.

    python benchmarks/bench_loss_memory.py               # CPU
    python benchmarks/bench_loss_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss
from rcsd_cli.configs.groups import LossConfig
T, chunk, V, H, device, repeats = map(eval, sys.argv[1:7])
torch.manual_seed(0)
head_s = torch.nn.Linear(H, V, bias=False).to(device)
head_t = torch.nn.Linear(H, V, bias=False).to(device).requires_grad_(False)
h_t = torch.randn(1, T, H, device=device)
mask = torch.ones(1, T, device=device)
targets = torch.zeros(1, T, dtype=torch.long, device=device)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
for _ in range(repeats):
    h_s = torch.randn(1, T, H, device=device, requires_grad=True)
    t0 = time.perf_counter()
    loss = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets, LossConfig(),
                                chunk_size=chunk).weighted
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
print(json.dumps({"times": times, "peak_mib": peak}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    V, H = 49_152, 576
    # Large blocks via mmap are returned to the OS when freed, so the resident-set high-water mark
    # tracks live tensors instead of glibc's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print("| completion tokens | mode | peak memory above baseline (MiB) | median seconds | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for T in args.lengths:
        for mode, chunk in (("unchunked", T), (f"chunked ({args.chunk})", args.chunk)):
            out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(chunk), str(V), str(H),
                                  repr(args.device), str(args.repeats)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {T} | {mode} | failed: {out.stderr.strip().splitlines()[-1][:60]} | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            med = statistics.median(r["times"])
            print(f"| {T} | {mode} | {r['peak_mib']:.0f} | {med:.3f} | {T / med:.0f} |")


if __name__ == "__main__":
    main()
