"""``rcsd demo``: the whole pipeline on a small ARC-Easy split, on a laptop CPU.

gen-rubrics (reference rubrics) -> sample -> score -> eval (before) -> train (RCSD) ->
eval (after). Train and eval items come from one seeded shuffle at disjoint offsets. Every
artifact stays in one folder; the before/after table is printed and saved as summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from rcsd_cli.commands import common as c
from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.configs.gen_rubrics import GenRubricsConfig
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.sample import SampleConfig
from rcsd_cli.configs.score import ScoreConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import clear_own_folder
from rcsd_cli.errors import RcsdError
from rcsd_cli.models import resolve_model
from rcsd_cli.ui import info, results

DEMO_FILES = {"rubrics.parquet", "rubrics.rejected.parquet", "samples.parquet", "scores.parquet",
              "eval_before.parquet", "eval_after.parquet", "model", "summary.json"}


def run_demo(out: Path, *, bench: str = "arc-easy", model: str = c.DEFAULT, train_items: int = 80,
             eval_items: int = 100, steps: int = 10, batch_size: int = 8, lr: float = 5e-6, max_new_tokens: int = 128,
             seed: int = 0, prompt_style: str = "answer-line", overwrite: bool = False) -> dict:
    # the stages (torch, transformers) load when a demo runs, not when `rcsd --help` starts
    from rcsd_cli.stages.eval import run_eval, summary_table
    from rcsd_cli.stages.gen_rubrics import run_gen_rubrics
    from rcsd_cli.stages.sample import run_sample
    from rcsd_cli.stages.score import run_score
    from rcsd_cli.stages.train import run_train
    from rcsd_cli.train.monitor import health_line

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RcsdError(f"{out}: demo folder is not empty; pass --overwrite to replace it")
        clear_own_folder(out, lambda p: p.name in DEMO_FILES or p.name.endswith((".partial.jsonl", ".tmp")),
                         lambda p: p.name in DEMO_FILES, "a demo")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings = {}

    def stage(name):
        info(f"[bold cyan]== {name}[/bold cyan]")
        timings[name] = time.perf_counter()

    stage("model")
    resolve_model(model)  # converts the embedded default once
    stage("gen-rubrics")
    rubrics = out / "rubrics.parquet"
    run_gen_rubrics(GenRubricsConfig(data=bench, generator="reference", limit=train_items, seed=seed), rubrics)
    sampling = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.95, top_k=20, batch_size=16)
    stage("sample")
    run_sample(SampleConfig(rubrics=str(rubrics), model=model, seed=seed, prompt_style=prompt_style,
                            generation=sampling), out / "samples.parquet")
    stage("score")
    run_score(ScoreConfig(samples=str(out / "samples.parquet"), rubrics=str(rubrics)), out / "scores.parquet")
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=16)

    def evaluate(name: str, model_path: str) -> dict:
        cfg = EvalConfig(bench=bench, model=model_path, limit=eval_items, offset=train_items, seed=seed,
                         prompt_style=prompt_style, generation=greedy)
        return run_eval(cfg, out / name, show=False)

    stage("eval before")
    before = evaluate("eval_before.parquet", model)
    stage("train")
    cfg = TrainConfig(rubrics=str(rubrics), model=model, steps=steps, batch_size=batch_size,
                      micro_batch_size=batch_size, lr=lr, seed=seed, prompt_style=prompt_style,
                      generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.2, top_p=0.95,
                                                  top_k=20, batch_size=16))
    metrics = run_train(cfg, out / "model")
    stage("eval after")
    after = evaluate("eval_after.parquet", str(out / "model"))
    total = time.perf_counter() - t_start
    marks = list(timings.items()) + [("end", t_start + total)]
    stage_seconds = {name: round(marks[i + 1][1] - t, 1) for i, (name, t) in enumerate(marks[:-1])}
    summary = {"bench": bench, "prompt_style": prompt_style, "train_items": train_items, "eval_items": eval_items,
               "steps": steps, "batch_size": batch_size, "lr": lr, "before": before, "after": after,
               "train_loss_first_last": [metrics[0].loss, metrics[-1].loss],
               "train_kl_first_last": [metrics[0].kl, metrics[-1].kl],
               "health": health_line(metrics),
               "stage_seconds": stage_seconds, "total_seconds": round(total, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    results.print(summary_table({"base": before, "after RCSD": after},
                                f"{bench}: {eval_items} held-out items, greedy, before vs after {steps} RCSD steps"))
    info(f"all artifacts in {out}/ ; total {total:.0f} s")
    results.print(summary["health"], soft_wrap=True)
    return summary


def command(
    output: c.Output = Path("rcsd-demo"),
    bench: Annotated[str, typer.Option("--bench", help="Bundled benchmark to split into train and eval.")] = "arc-easy",
    train_items: Annotated[int, typer.Option("--train-items", min=1)] = 80,
    eval_items: Annotated[int, typer.Option("--eval-items", min=1)] = 100,
    steps: Annotated[int, typer.Option("--steps", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    lr: Annotated[float, typer.Option("--lr")] = 5e-6,
    max_new_tokens: c.MaxNewTokens = 128,
    model: c.Model = c.DEFAULT,
    seed: c.Seed = 0,
    prompt_style: Annotated[Literal["answer-line", "paper"], typer.Option(
        "--prompt-style", help="answer-line (default here: the 135M model rarely writes \\boxed{}) or paper.")]
    = "answer-line",
    overwrite: c.Overwrite = False,
):
    """Run gen-rubrics -> sample -> score -> train -> eval on a small science split and print before/after."""
    run_demo(output, bench=bench, model=model, train_items=train_items, eval_items=eval_items, steps=steps,
             batch_size=batch_size, lr=lr, max_new_tokens=max_new_tokens, seed=seed, prompt_style=prompt_style,
             overwrite=overwrite)
