"""Feed rcsd the kinds of bad input real users have, and print what happens to each.

    python examples/reliability.py            # prints one table; exit 1 if any case misbehaves

Per case: the exit code (2 expected), the one-line message, whether a traceback leaked, and whether any
output was left behind. Cases differ from the test suite's on purpose (other files, other breakages).
A full disk is simulated with a 64 KiB tmpfs when this process may mount one (root in a container);
otherwise that case is reported as skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def rcsd(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rcsd_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def cases(d: Path):
    good = write(d / "good.jsonl", "".join(json.dumps({"id": f"g{i}", "question": f"{i}+{i}?", "answer": str(2 * i)})
                                           + "\n" for i in range(3)))
    yield "malformed JSON line", ["gen-rubrics", write(d / "a.jsonl", '{"question": "q"}\n{"question": \n'),
                                  "--generator", "reference"]
    yield "missing question field", ["gen-rubrics", write(d / "b.jsonl", '{"prompt_id": "x", "answer": "1"}\n'),
                                     "--generator", "reference"]
    yield "binary file", ["gen-rubrics", write(d / "c.csv", bytes(range(256)) * 4), "--generator", "reference"]
    yield "empty CSV", ["gen-rubrics", write(d / "e.csv", ""), "--generator", "reference"]
    yield "duplicate ids in CSV", ["gen-rubrics", write(d / "f.csv", "id,question\nx,one?\nx,two?\n"),
                                   "--generator", "reference"]
    yield "huge field", ["gen-rubrics", write(d / "g.jsonl", json.dumps({"question": "y" * 100_000}) + "\n"),
                         "--generator", "reference"]
    yield "rubric weight not a number", ["gen-rubrics", write(d / "h.jsonl", json.dumps(
        {"question": "q", "rubric": [{"title": "t", "weight": "heavy"}]}) + "\n")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), d / "foreign.parquet")
    yield "foreign Parquet as samples", ["score", d / "foreign.parquet", "--rubrics", d / "foreign.parquet"]
    yield "unknown model", ["sample", good, "--model", d / "no-such-model"]
    yield "unknown hub model id offline", ["sample", good, "--model", "nobody/none-such-model-xyz"]
    yield "config file with a typo", ["train", "--rubrics", good, "--config",
                                      write(d / "bad.yaml", "stpes: 10\n"), "--dry-run"]
    yield "ignored option combination", ["train", "--rubrics", good, "--loss", "sampled_rkl", "--beta", "0.3",
                                         "--dry-run"]
    # /proc refuses new files even to root (a chmod'ed folder would not stop root)
    yield "output folder not writable", ["gen-rubrics", good, "--generator", "reference", "-o", "/proc/r.parquet"]
    yield "output folder missing", ["gen-rubrics", good, "--generator", "reference", "-o", d / "nope" / "r.parquet"]
    user = d / "project"
    user.mkdir()
    write(user / "thesis.tex", "keep me")
    rubrics = d / "rubrics.parquet"
    rcsd("gen-rubrics", good, "--generator", "reference", "-o", rubrics, cwd=d)
    yield "train --overwrite on a user folder", ["train", "--rubrics", rubrics, "-o", user, "--overwrite"]
    tiny = d / "tmpfs"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    if mounted:
        noise = [os.urandom(1000).hex() for _ in range(200)]  # incompressible: 400 KB of Parquet
        big = write(d / "big.jsonl", "".join(json.dumps({"id": f"b{i}", "question": q, "answer": "1"}) + "\n"
                                             for i, q in enumerate(noise)))
        yield "full disk (64 KiB tmpfs)", ["gen-rubrics", big, "--generator", "reference", "-o", tiny / "r.parquet"]
    else:
        yield "full disk (64 KiB tmpfs)", None


def main() -> int:
    rows, bad = [], 0
    root = Path(tempfile.mkdtemp(prefix="rcsd-reliability-"))
    env_out = root / "out"
    env_out.mkdir()
    try:
        for name, args in cases(root):
            if args is None:
                rows.append((name, "-", "skipped: cannot mount a tmpfs here", "-", "-"))
                continue
            if "-o" not in args:
                args = [*args, "-o", env_out / "out.parquet"]
            before = {p for p in root.rglob("*")} if os.access(root, os.R_OK) else set()
            p = rcsd(*args, cwd=root)
            after = {p for p in root.rglob("*")}
            left = sorted(str(x.relative_to(root)) for x in after - before)
            lines = p.stderr.strip().splitlines()
            message = lines[-1] if lines else ""
            traceback = "Traceback" in p.stderr
            ok = p.returncode == 2 and len(lines) == 1 and not traceback and not left
            bad += not ok
            rows.append((name, str(p.returncode), message[:110], "yes" if traceback else "no",
                         ", ".join(left) or "nothing"))
    finally:
        subprocess.run(["umount", str(root / "tmpfs")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    print("| case | exit | message | traceback | left behind |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    print(f"\n{len(rows) - bad} of {len(rows)} cases behaved (exit 2, one line, no traceback, nothing left behind)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
