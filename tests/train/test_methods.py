"""Every training method, teacher kind and the offline round run end to end on a tiny model."""

import math

import pytest
import torch
from safetensors.torch import load_file

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.models import load_model
from rcsd_cli.rubrics.prompts import reference_target, rubric_json
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.trainer import lr_factor, train
from tests.conftest import MC_ROWS, write_jsonl
from tests.train.test_trainer import rubric_rows


def cfg(model, **kw):
    base = dict(rubrics="r.parquet", model=str(model), steps=2, batch_size=2, micro_batch_size=2, lr=1e-3,
                generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=20, batch_size=8))
    return TrainConfig(**(base | kw))


# the answering model's rollouts: sampled among its three live tokens
ANSWERING = GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=3, batch_size=8)


def changed(out, model_dir):
    if (out / "adapter_config.json").is_file():  # LoRA: the adapter moved away from its zero-initialised B
        adapter = load_file(out / "adapter_model.safetensors")
        return any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    final, initial = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    return any(not torch.equal(final[k], initial[k]) for k in initial)


@pytest.mark.parametrize("kw", [
    {"method": "grpo", "group_size": 3, "kl_coef": 0.1},
    {"method": "grpo", "group_size": 2, "reward": "correct"},
    {"method": "sft"},
    {"method": "opsd"},
    {"method": "rcsd", "teacher": "ema", "ema_decay": 0.5},
    {"method": "rcsd", "teacher": "live", "loss": "jsd", "beta": 0.5},
    {"method": "rcsd", "tail_bucket": True, "loss_reduction": "token", "lr_schedule": "constant"},
    {"method": "rcsd", "loss": "sampled_rkl", "skip_first_tokens": 1},
    {"method": "rcsd", "lora_rank": 4, "lr_schedule": "cosine", "warmup_steps": 1},
    {"method": "rcsd", "task": "rubric-generator"},
])
def test_method_trains_and_saves(tiny_model, answering_model, tmp_path, kw):
    if kw["method"] == "grpo":
        # the real rubric and correctness rewards: the answering model's rollouts differ in their answer
        tiny_model = answering_model
        kw = kw | {"generation": ANSWERING}
    metrics = train(cfg(tiny_model, **kw), rubric_rows(), tmp_path)
    assert len(metrics) == 2 and all(m.method == kw["method"] for m in metrics)
    assert all(m.loss == m.loss and m.grad_norm >= 0 for m in metrics)
    if kw["method"] == "grpo":
        assert 0 < metrics[0].reward < 1 and metrics[0].grad_norm > 0  # non-zero advantages drove the update
        assert metrics[0].rollout_tokens <= 2 * kw["group_size"] * 6
        assert (metrics[0].kl is not None) == ("kl_coef" in kw)
    if kw["method"] == "sft":
        assert metrics[-1].rollout_tokens == 0 and metrics[0].kl is None
    if kw["method"] in ("rcsd", "opsd"):
        assert metrics[0].kl >= 0 and 0 <= metrics[0].top1_agreement <= 1
        vocab = math.log(load_model(str(tiny_model)).model.config.vocab_size)
        # health: a random model spreads its mass widely and never stops within 6 tokens
        assert all(0 < m.student_entropy <= vocab and 0 < m.teacher_entropy <= vocab for m in metrics)
        assert all(0 <= m.clip_share <= 1 for m in metrics)
    if kw["method"] != "sft":
        assert all(0 < m.distinct_2 <= 1 and m.truncated_share == 1.0 for m in metrics)
    else:  # the entropy of the student on the reference tokens it is taught; no rollouts
        assert metrics[0].distinct_2 is None and metrics[0].student_entropy > 0
    assert changed(tmp_path, tiny_model)
    # LoRA: the folder holds the PEFT adapter and no full weights; otherwise a plain HF model
    assert bool(list(tmp_path.glob("adapter_*"))) == ("lora_rank" in kw)


@pytest.mark.parametrize("reward", ["correct", "rubric"])
def test_grpo_raises_the_real_reward(answering_model, tmp_path, reward):
    """GRPO driven by the real reward (no stand-in): the answering model picks A, B, C or nothing at random;
    the gold is A, so a few updates at a high lr raise the mean reward."""
    metrics = train(cfg(answering_model, method="grpo", reward=reward, group_size=4, steps=3, batch_size=5,
                        micro_batch_size=5, lr=1e-2, generation=ANSWERING), rubric_rows(), tmp_path)
    first, last = metrics[0], metrics[-1]
    assert 0 < first.reward < 1 and first.grad_norm > 0
    assert first.reward < last.reward <= 1


def test_sft_lowers_reference_loss(tiny_model, tmp_path):
    metrics = train(cfg(tiny_model, method="sft", steps=6, batch_size=5, lr=3e-3), rubric_rows(), tmp_path)
    assert metrics[-1].loss < metrics[0].loss


def test_rollout_budget_stops_training(tiny_model, tmp_path):
    metrics = train(cfg(tiny_model, steps=50, max_rollout_tokens=10), rubric_rows(), tmp_path)
    assert metrics[-1].rollout_tokens >= 10 and len(metrics) < 50
    assert all(m.rollout_tokens < 10 for m in metrics[:-1])


def test_lr_schedules():
    c = cfg("m", steps=10, warmup_steps=2, lr_schedule="linear")
    assert [lr_factor(s, c) for s in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    c = cfg("m", steps=10, warmup_steps=0, lr_schedule="cosine")
    assert lr_factor(5, c) == pytest.approx(0.5)
    assert lr_factor(3, cfg("m", lr_schedule="constant")) == 1.0
    assert lr_factor(5, cfg("m", steps=10)) == pytest.approx(0.5)  # the default: linear decay, as the authors


def test_prompts_and_targets(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = rubric_rows()[1]
    rcsd = tok.decode(PromptView.for_train(cfg(tiny_model)).teacher_ids(tok, row))
    assert "Correct final answer" in rcsd and "Reference Answer:" in rcsd
    opsd = tok.decode(PromptView.for_train(cfg(tiny_model, method="opsd")).teacher_ids(tok, row))
    assert "Correct final answer" not in opsd and "Reference Answer:" in opsd
    only_rubric = tok.decode(PromptView.for_train(cfg(tiny_model, teacher_context="rubric")).teacher_ids(tok, row))
    assert "Reference Answer" not in only_rubric and "Rubric (JSON array)" in only_rubric
    stage1 = tok.decode(PromptView.for_train(cfg(tiny_model, task="rubric-generator")).teacher_ids(tok, row))
    assert rubric_json(row.rubric) in stage1
    target = tok.decode(reference_target(tok, row, style="paper"))
    assert target.endswith("\\boxed{A}.<|im_end|>")
    target = tok.decode(reference_target(tok, row, style="answer-line"))
    assert target.endswith("Answer: A<|im_end|>")


def test_offline_round_through_the_cli(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", tiny_model,
            "--max-new-tokens", "5", check=True)
    run_cli("score", tmp_path / "s.parquet", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / "sc.parquet",
            "--teacher-logprobs", "--teacher-top-k", "4", check=True)
    scores, meta = read_artifact(tmp_path / "sc.parquet", "scores")
    samples, _ = read_artifact(tmp_path / "s.parquet", "samples")
    assert meta["config"]["teacher"]["model"] == str(tiny_model)
    for s, sc in zip(samples, scores, strict=True):
        assert len(sc.teacher_topk_ids) == len(s.completion_token_ids) and len(sc.teacher_topk_ids[0]) == 4
        assert sc.teacher_topk_logprobs[0] == sorted(sc.teacher_topk_logprobs[0], reverse=True)
    # what was stored is what the online teacher of a training run sees: its prompt (train's PromptView.teacher_ids),
    # then the completion, read one position before each completion token
    lm = load_model(str(tiny_model), device=torch.device("cpu"))
    rows = {r.id: r for r in read_artifact(tmp_path / "r.parquet", "rubrics")[0]}
    for s, sc in zip(samples, scores, strict=True):
        prompt = PromptView.for_train(cfg(tiny_model)).teacher_ids(lm.tokenizer, rows[s.problem_id])
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + s.completion_token_ids])).logits[0].float()
        start = len(prompt) - 1
        top = logits[start: start + len(s.completion_token_ids)].log_softmax(-1).topk(4, dim=-1)
        assert sc.teacher_topk_ids == top.indices.tolist()
        assert torch.allclose(torch.tensor(sc.teacher_topk_logprobs), top.values, atol=1e-4)
    run_cli("train", "--samples", tmp_path / "s.parquet", "--scores", tmp_path / "sc.parquet", "-o",
            tmp_path / "m", "--model", tiny_model, "--steps", "2", "--batch-size", "3", "--lr", "1e-3",
            "--loss-top-k", "4", check=True)
    metrics = read_artifact(tmp_path / "m" / "metrics.parquet", "metrics")[0]
    assert len(metrics) == 2 and metrics[0].rollout_tokens == 0
    assert metrics[0].kl is not None and metrics[0].kl >= 0  # the unclipped top-k KL, as an online run reports it
    p = run_cli("train", "--samples", tmp_path / "s.parquet", "--scores", tmp_path / "sc.parquet", "-o",
                tmp_path / "m3", "--model", tiny_model)  # --loss-top-k 20 from 4 stored entries: refused
    assert p.returncode != 0 and "4 teacher log-probs stored per token, fewer than --loss-top-k 20" in p.stderr
    p = run_cli("train", "--samples", tmp_path / "s.parquet", "--scores", tmp_path / "sc.parquet", "-o",
                tmp_path / "m4", "--model", tiny_model, "--loss", "jsd")
    assert p.returncode == 2 and "needs --loss topk_kl" in p.stderr
    p = run_cli("train", "--samples", tmp_path / "s.parquet", "--scores", tmp_path / "s.parquet", "-o",
                tmp_path / "m2", "--model", tiny_model)
    assert p.returncode == 2 and "holds samples rows, expected a scores file" in p.stderr


QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
              "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.mark.parametrize("thinking,suffix", [(False, "<think>\n\n</think>\n\n"), (None, "assistant\n")])
def test_thinking_templates_render_both_sides_alike(tiny_model, thinking, suffix):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = QWEN3_LIKE
    c = cfg(tiny_model, generation=GenerationConfig(max_new_tokens=4, enable_thinking=thinking))
    row = rubric_rows()[0]
    view = PromptView.for_train(c)
    s, t = tok.decode(view.student_ids(tok, row)), tok.decode(view.teacher_ids(tok, row))
    assert s.endswith("<|im_start|>assistant\n" + suffix.removeprefix("assistant\n"))
    assert t.endswith("<|im_start|>assistant\n" + suffix.removeprefix("assistant\n"))


def test_reason_first_teacher_samples_an_analysis_each_step(tiny_model, tmp_path, monkeypatch):
    from rcsd_cli.train.methods import distill

    built = []
    original = distill.reason_first_teacher_prompts

    def spy(ctx, rows):
        out = original(ctx, rows)
        built.append(out)
        return out

    monkeypatch.setattr(distill, "reason_first_teacher_prompts", spy)
    metrics = train(cfg(tiny_model, teacher_context="reason-first", analysis_max_new_tokens=5), rubric_rows(),
                    tmp_path)
    assert len(metrics) == 2 and len(built) == 2 and all(len(p) == 2 for p in built)


def test_plot_draws_curves_from_metrics(run_cli, tiny_model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name, method in (("a", "rcsd"), ("b", "sft")):
        train(cfg(tiny_model, method=method, steps=3), rubric_rows(), tmp_path / name)
    out = tmp_path / "curves.png"
    run_cli("plot", tmp_path / "a" / "metrics.parquet", tmp_path / "b" / "metrics.parquet", "-o", out, check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    p = run_cli("plot", tmp_path / "a" / "metrics.parquet", "-o", out)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_report_to_tensorboard_writes_event_files(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(cfg(tiny_model, report_to="tensorboard"), rubric_rows(), tmp_path)
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([m.loss for m in metrics], rel=1e-6)
    assert "train/kl" in events.Tags()["scalars"]


@pytest.mark.slow
def test_contrastive_teacher_controls_and_a_run(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from rcsd_cli.rubrics.ablations import control_rows
    from rcsd_cli.rubrics.prompts import teacher_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = rubric_rows()
    for kind in ("shuffled", "reference", "generic"):
        c = cfg(tiny_model, teacher_contrast=kind)
        controls = control_rows(rows, kind, c.seed)
        view = PromptView.for_train(c)
        text = tok.decode(view.control_ids(tok, controls[rows[0].id]))
        if kind == "shuffled":
            partner = controls[rows[0].id]
            assert partner.rubric != rows[0].rubric and rubric_json(partner.rubric) in text
            assert partner.question == rows[0].question  # the item's own question and reference
        if kind == "reference":
            assert view.control_ids(tok, controls[rows[0].id]) == teacher_prompt(
                tok, rows[0], method="opsd", style=c.prompt_style) and "Rubric" not in text
        if kind == "generic":
            assert "Check correctness and consistency" in text
    metrics = train(cfg(tiny_model, teacher_contrast="shuffled", contrast_weight=0.5), rows, tmp_path)
    assert len(metrics) == 2 and all(m.kl >= 0 and m.teacher_seconds > 0 for m in metrics)
    with pytest.raises(ValueError, match="--contrast-weight has no effect without --teacher-contrast"):
        cfg(tiny_model, contrast_weight=2.0)
    with pytest.raises(ValueError, match="not available with --teacher-context reason-first"):
        cfg(tiny_model, teacher_contrast="generic", teacher_context="reason-first")
