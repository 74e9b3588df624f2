"""Trainer on a tiny random Llama with a real tokenizer: alignment, accumulation, resume."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.rows import Problem, Rubric
from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.models import load_model
from rcsd_cli.rubrics.rubric_gen import reference_rubric
from rcsd_cli.train.methods import distill
from rcsd_cli.train.step import StepContext
from rcsd_cli.train.trainer import batch_order, train
from tests.conftest import assert_resumed


def rubric_rows():
    rows = []
    for i in range(5):
        p = Problem(id=f"q{i}", question=f"What is {i} + {i}?", choices=[str(2 * i), str(2 * i + 1), "7"],
                    answer="A", reference_answer=f"{i} + {i} = {2 * i}")
        rows.append(Rubric(**p.model_dump(), rubric=reference_rubric(p), rubric_origin="reference"))
    return rows


def config(model, **kw):
    base = dict(rubrics="r.parquet", model=str(model), steps=4, batch_size=3, micro_batch_size=3, lr=1e-3,
                generation=GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=20, batch_size=8))
    return TrainConfig(**(base | kw))


CPU = torch.device("cpu")  # exactness checks of the maths run in fp32 on CPU, whatever the machine has


def test_aligned_hidden_matches_unpadded_forward(tiny_model):
    lm = load_model(str(tiny_model), device=CPU)
    model = lm.model
    s_prompts = [[1, 5, 6, 7], [1, 9]]
    t_prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3]]
    completions = [[11, 12, 13], [21, 22, 23, 24, 25]]
    pb = build_pair_batch(s_prompts, t_prompts, completions, pad_id=0)
    head = model.get_output_embeddings()
    for side, prompts in ((pb.student, s_prompts), (pb.teacher, t_prompts)):
        logits = head(aligned_hidden(model, side))
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            full = model(torch.tensor([p + c])).logits[0]
            expected = full[len(p) - 1: len(p) - 1 + len(c)]
            assert torch.allclose(logits[i, : len(c)], expected, atol=1e-5)
    assert pb.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_gradient_does_not_depend_on_micro_batching(tiny_model, reduction):
    lm = load_model(str(tiny_model), device=CPU)
    teacher = load_model(str(tiny_model), device=CPU).model
    torch.manual_seed(1)
    with torch.no_grad():  # make the teacher differ so the loss is non-zero
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s_prompts = [[1, 5, 6], [1, 9, 9, 9, 9], [1, 4]]
    t_prompts = [[1, 2, 3, 5, 6], [1, 9], [1, 4, 4, 4]]
    completions = [[11, 12, 13, 14], [21], [31, 32, 33, 34, 35, 36]]
    grads = []
    for micro in (3, 2, 1):
        lm.model.zero_grad()
        ctx = StepContext(lm.model, lm.tokenizer, lambda side: aligned_hidden(teacher, side),
                          teacher.get_output_embeddings(), config(tiny_model, micro_batch_size=micro, chunk_size=2,
                                                                  clip=None, loss_reduction=reduction), 0)
        res = distill.backward(ctx, s_prompts, t_prompts, completions).read(torch.device("cpu"))
        grads.append((res.objective, [p.grad.clone() for p in lm.model.parameters()]))
        per_token = res.loss_sum / res.tokens
        # sequence: the mean of per-sequence means; token: the mean over all 11 tokens
        assert (res.objective == pytest.approx(per_token, rel=1e-6)) == (reduction == "token")
    assert grads[0][0] > 0
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        for a, b in zip(g, grads[0][1], strict=True):
            assert torch.allclose(a, b, atol=1e-7)


def test_batch_order_cycles_through_epochs():
    seen = [i for step in range(4) for i in batch_order(5, 3, step, seed=0)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    assert batch_order(5, 3, 2, seed=0) == batch_order(5, 3, 2, seed=0)


def test_train_writes_model_metrics_and_resumes_exactly(tiny_model, tmp_path, capsys):
    rows = rubric_rows()
    full = tmp_path / "full"
    full.mkdir()
    metrics = train(config(tiny_model, save_every=2), rows, full)
    assert [m.step for m in metrics] == [1, 2, 3, 4]
    assert all(m.completion_tokens > 0 and m.kl >= 0 and 0 <= m.top1_agreement <= 1 for m in metrics)
    for m in metrics:  # where the step's time went: the phases are timed, disjoint, inside the step
        phases = [m.rollout_seconds, m.teacher_seconds, m.student_seconds, m.optimizer_seconds]
        assert all(p > 0 for p in phases) and m.push_seconds == 0 and m.analysis_seconds == 0
        assert sum(phases) <= m.seconds
        assert m.peak_rss_gib > 0.05 and set(m.phase_peak_rss_gib) == {"rollout", "teacher", "student", "optimizer"}
    saved, meta = read_artifact(full / "metrics.parquet", "metrics")
    assert saved == metrics and meta["config"]["steps"] == 4
    assert (full / "checkpoint-2" / "optimizer.pt").is_file()
    final = load_file(full / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    # A run killed after step 2 leaves checkpoint-2; resuming must land on the same weights.
    assert_resumes_exactly(config(tiny_model, save_every=2), rows, full, tmp_path / "resumed", 2, capsys)


def assert_resumes_exactly(cfg, rows, full, resumed, step, capsys):
    """Resume ``full``'s checkpoint-``step`` in a fresh folder: a resume, not a restart, ending bit for bit on
    ``full``'s weights (``assert_resumed``)."""
    assert cfg.lr_schedule != "constant"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    capsys.readouterr()
    train(cfg, rows, resumed, resume=True)
    assert_resumed(capsys.readouterr().err, resumed, full, step)


def test_sampling_depends_only_on_item_seeds(tiny_model):
    """Same samples whatever the batch size; global RNG untouched; greedy equals transformers' generate."""
    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling.generation import generate

    lm = load_model(str(tiny_model), device=CPU)
    prompts = [[1, 5, 6], [1, 9, 9, 9, 9], [1, 4], [1, 7, 8, 9]]
    sampled = GenerationConfig(max_new_tokens=7, temperature=1.2, top_p=0.9, top_k=30)
    state = torch.random.get_rng_state()
    runs = [generate(lm.model, lm.tokenizer, prompts, sampled.model_copy(update={"batch_size": b}), seed=3)
            for b in (4, 3, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]] == [g.token_ids for g in runs[2]]
    other = generate(lm.model, lm.tokenizer, prompts, sampled, seed=4)
    assert [g.token_ids for g in other] != [g.token_ids for g in runs[0]]
    greedy = generate(lm.model, lm.tokenizer, prompts, GenerationConfig(max_new_tokens=6, temperature=0), seed=0)
    for p, g in zip(prompts, greedy, strict=True):
        ref = lm.model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert g.token_ids == ref[0, len(p):].tolist()  # every token, the same length


def test_top_k_top_p_filter_by_hand():
    from rcsd_cli.modeling.generation import _filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(_filter(logits, top_k=0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter(logits, top_k=0, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_gradient_checkpointing_keeps_the_gradient(tiny_model):
    from rcsd_cli.train.student import enable_gradient_checkpointing

    teacher = load_model(str(tiny_model), device=CPU).model
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
    s_prompts, t_prompts = [[1, 5, 6], [1, 9, 9]], [[1, 2, 3, 5, 6], [1, 9]]
    completions = [[11, 12, 13, 14], [21, 22]]
    grads = []
    for checkpointing in (False, True):
        lm = load_model(str(tiny_model), device=CPU)
        lm.model.train()
        if checkpointing:
            enable_gradient_checkpointing(lm.model)
        ctx = StepContext(lm.model, lm.tokenizer, lambda side: aligned_hidden(teacher, side),
                          teacher.get_output_embeddings(), config(tiny_model, clip=None, chunk_size=2), 0)
        distill.backward(ctx, s_prompts, t_prompts, completions)
        grads.append([p.grad.clone() for p in lm.model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-7)
