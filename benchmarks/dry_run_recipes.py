"""Every recipe's `rcsd train --dry-run` at full shape, as one Markdown page: a table and each run's output.

The 8B recipes are planned for their own target (their `processes` and `device_memory`), at their length limits;
the CPU recipes for this machine, with the demo's ARC-Easy rubrics as input. Offline: rcsd ships the configs of
the models the recipes name.
Usage: python benchmarks/dry_run_recipes.py [--out benchmarks/results/dry_run_recipes_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rcsd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rcsd_cli", *map(str, args)], capture_output=True, text=True)


def sections(stdout: str) -> dict[str, str]:
    """The dry run's ``===== name =====`` sections."""
    parts = re.split(r"^===== (.+) =====$", stdout, flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def row(recipe: Path, shown: dict[str, str], seconds: float, error: str) -> str:
    step = shown.get("simulated step", "")

    def find(pattern: str) -> str:
        found = re.search(pattern, step, flags=re.M)
        return found.group(1) if found else "-"

    categories = ", ".join(f"{name} {gib}" for name, gib in re.findall(r"^(weights|teacher|optimizer|gradients|"
                                                                        r"activations|temporaries)\s+([\d.]+) GiB",
                                                                        step, flags=re.M))
    engines = "; ".join(f"{role}: {length} tokens, {kv} GiB KV" for role, length, kv in re.findall(
        r"^vllm (\w+) engine: max_model_len ([\d,]+),.*?leaves ([\d.]+) GiB of KV", shown.get("vllm engines", ""),
        flags=re.M)) or "-"
    verdict = "yes" if "fits: yes" in step else f"no: {error}" if error else "no"
    flops = find(r"^FLOPs: (.+)$").replace(" for forward, backward and loss (FlopCounterMode)", "")
    return (f"| `{recipe.stem}` | {find(r'^rank 0 of (.+?);')} | {find(r'^peak +([0-9.]+) GiB')} ({categories}) "
            f"| {find(r'^phases: (.+)$')} | {engines} | {verdict} | {flops.replace(', rollouts not included', '')} "
            f"| {seconds:.0f} s |")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*: (.+)$", cpuinfo.read_text(), flags=re.M) if cpuinfo.exists() else None
    return found.group(1) if found else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dry_run_recipes_cpu.md")
    args = parser.parse_args()
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rubrics = Path(tmp) / "arc-easy.parquet"
        rcsd("gen-rubrics", "arc-easy", "--limit", "80", "--generator", "reference", "-o", rubrics).check_returncode()
        for recipe in sorted((ROOT / "examples" / "recipes").glob("*.yaml")):
            gpu = re.search(r"^device_memory:", recipe.read_text(), flags=re.M)
            start = time.perf_counter()
            proc = rcsd("train", "--config", recipe, *([] if gpu else ["--rubrics", rubrics]), "--dry-run")
            seconds = time.perf_counter() - start
            shown = sections(proc.stdout)
            error = proc.stderr.strip().splitlines()[-1] if proc.returncode else ""
            rows.append(row(recipe, shown, seconds, error))
            raw.append(f"## `{recipe.stem}` (exit {proc.returncode}, {seconds:.0f} s)\n\n```\n"
                       f"===== lengths =====\n{shown.get('lengths', '')}\n\n===== memory =====\n"
                       f"{shown.get('memory', '')}\n\n===== vllm engines =====\n{shown.get('vllm engines', '-')}"
                       f"\n\n===== simulated step =====\n{shown.get('simulated step', '')}"
                       f"{chr(10) + error if error else ''}\n```\n")
            print(rows[-1], flush=True)
    header = ("| recipe | rank 0's share of the step | peak per rank, GiB (measured) | phases per device (plan "
              "+ measured) | vLLM engines: max_model_len, KV left (planned) | fits | FLOPs per rank | dry run |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
    args.out.write_text(f"# Every recipe's dry run at full shape\n\n`python benchmarks/dry_run_recipes.py` on "
                        f"{cpu_name()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}; nothing else "
                        f"running.\n\n{header}\n" + "\n".join(rows)
                        + "\n\n" + "\n".join(raw))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
