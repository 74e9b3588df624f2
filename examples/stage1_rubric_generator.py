"""Stage I: train a rubric generator, then measure it before and after.

1. Reference rubrics for a training split and a held-out split of a bundled benchmark
   (``gen-rubrics --generator reference``: they satisfy the published rubric format).
2. ``rcsd train --task rubric-generator``: the student writes a rubric from the question and
   reference answer; the teacher additionally sees the reference rubric.
3. ``rcsd gen-rubrics --generator llm`` with the base and the trained model on the held-out
   questions (no retries), reporting the valid-rubric rate, how often the output holds a JSON
   array at all, the word-set Jaccard similarity between the raw output and the reference
   rubric's text (defined for invalid outputs too), and for valid rubrics the Jaccard of their
   criterion text and whether the gold choice's text is mentioned.

    python examples/stage1_rubric_generator.py --out stage1
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from rcsd_cli.configs.gen_rubrics import GenRubricsConfig
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.stats import mean_interval, wilson_interval
from rcsd_cli.stages.gen_rubrics import run_gen_rubrics
from rcsd_cli.stages.train import run_train
from rcsd_cli.ui import quiet_libraries


def words(rubric) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", " ".join(f"{c.title} {c.description}" for c in rubric).lower()))


def measure(model: str, held_out: Path, out: Path, args) -> dict:
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.95, top_k=20, batch_size=16)
    t0 = time.perf_counter()
    if not args.report_only:
        try:
            run_gen_rubrics(GenRubricsConfig(data=str(held_out), generator="llm", regenerate=True, retries=0,
                                             model=model, generation=gen), out, overwrite=True)
        except RcsdError:  # no valid rubric at all: every output is in the rejected file
            pass
    return {"model": model, **evaluate(held_out, out), "seconds": time.perf_counter() - t0}


def evaluate(held_out: Path, out: Path) -> dict:
    """Validity and closeness of generated rubrics; raw-text closeness also covers invalid outputs."""
    refs = read_artifact(held_out, "rubrics")[0]
    generated = {r.id: r for r in read_artifact(out, "rubrics")[0]} if out.exists() else {}
    rejected_path = out.with_name(out.name.removesuffix(".parquet") + ".rejected.parquet")
    raw = {r.problem_id: r.raw_output for r in read_artifact(rejected_path, "rejected-rubrics")[0]} \
        if rejected_path.exists() else {}
    jacc, gold_mentioned, same_count, raw_jacc, has_array = [], [], [], [], []
    for ref in refs:
        ref_words = words(ref.rubric)
        if ref.id in generated:
            text = " ".join(f"{c.title} {c.description}" for c in generated[ref.id].rubric)
            g = words(generated[ref.id].rubric)
            jacc.append(len(g & ref_words) / max(1, len(g | ref_words)))
            gold = ref.choices["ABCDEFGH".index(ref.answer)].lower() if ref.choices and ref.answer else ""
            gold_mentioned.append(float(bool(gold) and gold in text.lower()))
            same_count.append(float(len(generated[ref.id].rubric) == len(ref.rubric)))
            has_array.append(1.0)
        else:
            text = raw.get(ref.id, "")
            has_array.append(float("[" in text and "]" in text))
        out_words = set(re.findall(r"[a-z0-9]+", text.lower()))
        raw_jacc.append(len(out_words & ref_words) / max(1, len(out_words | ref_words)))
    lo, hi = wilson_interval(len(generated), len(refs))
    mean = lambda v: mean_interval(v)[0] if v else None  # noqa: E731
    return {"valid": len(generated), "total": len(refs), "valid_rate": len(generated) / len(refs),
            "valid_rate_ci": [lo, hi], "jaccard": mean(jacc), "gold_mentioned": mean(gold_mentioned),
            "same_count": mean(same_count), "raw_jaccard": mean(raw_jacc), "json_array_rate": mean(has_array)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("stage1"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bench", default="arc-easy")
    p.add_argument("--train-items", type=int, default=64)
    p.add_argument("--eval-items", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="Recompute the table from files already in --out.")
    args = p.parse_args()
    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    train_r, held_out = args.out / "train_rubrics.parquet", args.out / "heldout_rubrics.parquet"
    if not args.report_only:
        run_gen_rubrics(GenRubricsConfig(data=args.bench, generator="reference", limit=args.train_items,
                                         seed=args.seed), train_r, overwrite=True)
        run_gen_rubrics(GenRubricsConfig(data=args.bench, generator="reference", limit=args.eval_items,
                                         offset=args.train_items, seed=args.seed), held_out, overwrite=True)
    before = measure(args.model, held_out, args.out / "generated_before.parquet", args)
    cfg = TrainConfig(rubrics=str(train_r), model=args.model, task="rubric-generator", steps=args.steps,
                      batch_size=args.batch_size, micro_batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      generation=GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.2, top_p=0.95,
                                                  top_k=20, batch_size=16))
    t0 = time.perf_counter()
    if not args.report_only:
        run_train(cfg, args.out / "model", overwrite=True)
    train_seconds = time.perf_counter() - t0
    after = measure(str(args.out / "model"), held_out, args.out / "generated_after.parquet", args)
    rows = [("base", before), (f"after {args.steps} stage-I steps", after)]
    lines = ["| generator | valid rubrics [95% CI] | has a JSON array | word Jaccard of raw output vs reference "
             "| word Jaccard (valid only) | gold answer mentioned (valid only) |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in rows:
        lines.append(f"| {name} | {r['valid']}/{r['total']} = {r['valid_rate']:.3f} [{r['valid_rate_ci'][0]:.3f}, "
                     f"{r['valid_rate_ci'][1]:.3f}] | {fmt(r['json_array_rate'])} | {fmt(r['raw_jaccard'])} | "
                     f"{fmt(r['jaccard'])} | {fmt(r['gold_mentioned'])} |")
    text = "\n".join(lines)
    (args.out / "results.json").write_text(json.dumps({"before": before, "after": after,
                                                       "train_seconds": train_seconds}, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
