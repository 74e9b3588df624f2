"""``rcsd diagnose`` on a tiny model: the zero point is exactly zero, rows and summary are consistent."""

from __future__ import annotations

import pytest

from rcsd_cli.configs.groups import LossConfig
from rcsd_cli.data.artifacts import read_artifact
from tests.conftest import MC_ROWS, write_jsonl


def test_diagnose_rows_summary_and_zero_point(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    p = run_cli("diagnose", tmp_path / "r.parquet", "--model", tiny_model, "--limit", "4", "--max-new-tokens", "6",
                "--conditions", "rubric,shuffled,none,contrast", "--teacher-contrast", "shuffled",
                "--contrast-weight", "0.5", "-o", tmp_path / "d.parquet", check=True)
    assert "verdict: the rubric teacher is" in p.stdout and "contrast" in p.stdout
    rows, meta = read_artifact(tmp_path / "d.parquet", "diagnose")
    n = min(4, len(MC_ROWS))
    assert len(rows) == 4 * n and {r.condition for r in rows} == {"rubric", "shuffled", "none", "contrast"}
    contrast = [r for r in rows if r.condition == "contrast"]
    assert all(r.gold_logprob_teacher is not None and r.teacher_completion for r in contrast)
    assert meta["summary"]["contrast"]["gold_logprob_gain"]["n"] == n
    none = [r for r in rows if r.condition == "none"]
    # no privileged context: the teacher sees the student's prompt, so nothing differs on the rollout
    assert all(r.mean_loss == pytest.approx(0.0, abs=1e-7) and r.top1_agreement == 1.0 for r in none)
    assert all(r.gold_logprob_teacher == pytest.approx(r.gold_logprob_student, abs=1e-5) for r in none)
    rubric = [r for r in rows if r.condition == "rubric"]
    assert all(r.tokens > 0 and r.mean_loss >= 0 and 0 <= r.clip_share <= 1 for r in rubric)
    assert any(r.mean_loss > 0 for r in rubric)  # a different prompt gives a different distribution
    s = meta["summary"]
    gains = [r.gold_logprob_teacher - r.gold_logprob_student for r in rubric]
    assert s["rubric"]["gold_logprob_gain"]["mean"] == pytest.approx(sum(gains) / n)
    assert s["none"]["mean_loss"] == pytest.approx(0.0, abs=1e-7)
    # the student side is shared: the same rollout under every condition
    by_id = {}
    for r in rows:
        by_id.setdefault(r.id, set()).add(r.student_completion)
    assert all(len(v) == 1 for v in by_id.values())


def test_verdict_needs_an_interval_above_zero():
    from rcsd_cli.stages.diagnose import verdict

    def cond(lo, hi):
        none = {"mean": None, "ci": [None, None], "n": 0}
        return {"accuracy_gain": none, "score_gain": none,
                "gold_logprob_gain": {"mean": (lo + hi) / 2, "ci": [lo, hi], "n": 8}}

    assert "measurably better" in verdict({"rubric": cond(0.1, 0.5)})
    assert "not measurably better" in verdict({"rubric": cond(-0.1, 0.5)})
    assert "measurably worse" in verdict({"rubric": cond(-0.5, -0.1)})


def test_explain_writes_self_contained_html(run_cli, tiny_model, tmp_path):
    import re

    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", tiny_model,
            "--max-new-tokens", "5", check=True)
    p = run_cli("explain", tmp_path / "s.parquet", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / "c.html",
                "--limit", "2", "--show", check=True)
    page = (tmp_path / "c.html").read_text()
    samples, _ = read_artifact(tmp_path / "s.parquet", "samples")
    assert page.count("<span") == sum(len(s.completion_token_ids) for s in samples[:2])
    assert "<script" not in page and "http" not in page  # opens offline, runs nothing
    losses = [float(x) for x in re.findall(r'title="loss ([0-9.]+)', page)]
    assert len(losses) == page.count("<span") and all(x >= 0 for x in losses)
    assert "Correct final answer" in page and samples[0].id in page
    assert samples[0].id in p.stdout  # --show prints the shaded text


@pytest.mark.parametrize("loss", [
    LossConfig(),  # the authors': top-20 forward KL, T 1.2, clip 0.05
    LossConfig(kind="jsd", beta=0.5, clip=0.01),
    LossConfig(kind="sampled_rkl"),
    LossConfig(top_k=5, tail_bucket=True, beta=0.3, clip=None),
], ids=["topk_kl", "jsd", "sampled_rkl", "tail"])
def test_diagnose_and_explain_measure_the_loss_train_applies(tiny_model, loss):
    """Per token, the loss diagnose/explain report (``continuation_logits`` + ``token_loss``) is the train step's."""
    import torch

    from rcsd_cli.modeling.batching import aligned_hidden
    from rcsd_cli.modeling.logprobs import continuation_logits
    from rcsd_cli.models import load_model
    from rcsd_cli.train.losses import token_loss
    from rcsd_cli.train.methods import distill
    from rcsd_cli.train.step import StepContext
    from tests.train.test_trainer import config

    lm = load_model(str(tiny_model), device=torch.device("cpu"))
    model, tok = lm.model, lm.tokenizer
    s_prompts, t_prompts = [[1, 5, 6], [1, 9, 9, 9, 9]], [[1, 2, 3, 5, 6, 7, 8], [1, 9]]
    completions = [[11, 12, 13, 14, 15], [21, 22, 23]]
    ctx = StepContext(model, tok, lambda side: aligned_hidden(model, side), model.get_output_embeddings(),
                      config(tiny_model, loss=loss, chunk_size=2), 0)  # teacher = the same weights, as diagnose
    train = distill.backward(ctx, s_prompts, t_prompts, completions).read(torch.device("cpu"))
    s_logits = continuation_logits(model, s_prompts, completions, tok.pad_token_id)
    t_logits = continuation_logits(model, t_prompts, completions, tok.pad_token_id)
    measured = sum(token_loss(s, t, torch.tensor(c), loss).loss.sum().item()
                   for s, t, c in zip(s_logits, t_logits, completions, strict=True))
    assert abs(train.loss_sum) > 1e-7
    assert measured == pytest.approx(train.loss_sum, rel=1e-4, abs=1e-10)


@pytest.mark.parametrize(("args", "message"), [
    (["--conditions", "rubric,contrast"], "the contrast condition needs --teacher-contrast"),
    (["--conditions", "rubric", "--teacher-contrast", "generic"], "--teacher-contrast has no effect without"),
    (["--conditions", "rubric", "--contrast-weight", "2"], "--contrast-weight has no effect without"),
])
def test_diagnose_refuses_a_contrast_it_would_not_measure(args, message):
    from pydantic import ValidationError

    from rcsd_cli.configs.diagnose import DiagnoseConfig
    from rcsd_cli.data.options import fold_flat_options

    flat = {"rubrics": "r.parquet"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        flat[flag[2:].replace("-", "_")] = value
    with pytest.raises(ValidationError, match=message):
        DiagnoseConfig(**fold_flat_options(DiagnoseConfig, flat))
