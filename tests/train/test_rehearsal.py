"""``train --dry-run``'s simulated step (``train/rehearsal.py``) and the real-shape defects it made visible.

The step runs under PyTorch's fake tensors: a host sync anywhere inside it (``.item()``, ``bool(tensor)``) raises,
so every method stepping here is the test that the step never waits for the device."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.options import build_config, read_config_file
from rcsd_cli.models import load_model_config
from rcsd_cli.train.memory import meta_model
from rcsd_cli.train.rehearsal import GIB, rehearse
from tests.conftest import ROOT

LENGTHS = {"student_prompt": 24, "teacher_prompt": 40, "completion": 16}
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))


def cfg_of(model, **options) -> TrainConfig:
    return build_config(TrainConfig, {"model": str(model), "batch_size": 4, "micro_batch_size": 2, "chunk_size": 8,
                                      "max_new_tokens": 16, **options})


@pytest.mark.parametrize(("sharding", "world"), [("replicate", 1), ("full-shard", 2)])
def test_the_step_measures_weights_teacher_and_adamw_state_exactly(tiny_model, sharding, world):
    """fp32 full fine-tuning with a frozen teacher copy: the weights (embeddings tied, as the model has them),
    the copy and AdamW's two moments are n fp32 values each, divided over the processes when sharded, and
    resident after the step (a sharded teacher's root, gathered for the loss, is sharded again)."""
    config = load_model_config(str(tiny_model))
    n = sum(p.numel() for p in meta_model(config).parameters()) / world
    out = rehearse(cfg_of(tiny_model, precision="fp32", sharding=sharding), config, lengths=LENGTHS, world=world)
    assert out["resident"] == pytest.approx({"weights": 4 * n / GIB, "teacher": 4 * n / GIB,
                                            "optimizer": 2 * 4 * n / GIB}, rel=1e-4)
    if sharding == "replicate":  # FSDP's own gradient categories stay empty under fake tensors
        assert out["peak"]["gradients"] == pytest.approx(4 * n / GIB)
    assert out["peak"]["activations"] > 0 and out["flops"] > 0
    assert (out["sequences"], out["micro_batches"]) == (4 // world, 2 // world)  # batch 4, micro-batch 2


@pytest.mark.parametrize("method", ["rcsd", "opsd", "grpo", "sft", "offline"])
@pytest.mark.parametrize("sharding", ["replicate", "full-shard"])
def test_every_method_steps_under_fake_tensors_without_a_host_sync(tiny_model, tmp_path, method, sharding):
    """Full shape semantics at toy size: bf16-mixed, LoRA (the frozen base as teacher) and 4 simulated processes;
    a ``.item()`` or ``if tensor`` inside the step fails here."""
    options = {"precision": "bf16-mixed", "sharding": sharding, "lora_rank": 4, "gradient_checkpointing": True}
    if sharding == "full-shard":  # LoRA cannot shard with vLLM only; sharded full fine-tuning keeps a teacher
        options.pop("lora_rank")
    if method == "offline":
        options.update(samples="s.parquet", scores="c.parquet")
    else:
        # GRPO: micro-batches smaller than a group, as the GRPO recipe has them
        options.update(method=method, **({"group_size": 2, "micro_batch_size": 1} if method == "grpo" else {}))
    config = load_model_config(str(tiny_model))
    out = rehearse(cfg_of(tiny_model, **options), config, lengths=LENGTHS, world=4)
    assert out["flops"] > 0 and out["peak"]["total"] > out["resident"]["weights"] > 0
    assert out["sequences"] == (2 if method == "grpo" else 1)  # ceil(4 / 4) prompts, times the group for GRPO


def test_dry_run_prints_the_simulated_step_and_exits_2_when_it_does_not_fit(run_cli, tiny_model):
    args = ["train", "--model", tiny_model, "--batch-size", "4", "--max-new-tokens", "16", "--dry-run"]
    ok = run_cli(*args, "--processes", "2", "--device-memory", "80", check=True)
    assert "rank 0 of 2: 2 sequences of 2048 prompt + 16 completion tokens" in ok.stdout, ok.stdout
    assert "fits: yes" in ok.stdout and "TFLOP per rank" in ok.stdout and "not simulated:" in ok.stdout
    assert "from the run's limits (no --rubrics)" in ok.stdout
    tight = run_cli(*args, "--device-memory", "0.001")
    assert tight.returncode == 2 and "Traceback" not in tight.stderr
    assert "does not fit: the training step needs" in tight.stderr and "change --" in tight.stderr


def test_a_batch_smaller_than_the_world_is_refused_at_start(run_cli, tiny_model, tmp_path):
    """R5: ``[rank::world]`` would leave processes without items (GRPO hung, the default method died with a
    ZeroDivisionError on the idle rank); now a launch refuses before loading anything, and so does the dry run."""
    from tests.train.test_distributed import dist_env

    dry = run_cli("train", "--model", tiny_model, "--method", "grpo", "--batch-size", "2", "--processes", "4",
                  "--dry-run")
    assert dry.returncode == 2 and "--batch-size 2 is smaller than the 4 processes" in dry.stderr
    rubrics = tmp_path / "r.parquet"
    run_cli("gen-rubrics", _problems(tmp_path), "-o", rubrics, "--generator", "reference", check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rcsd_cli", "train", "--rubrics", str(rubrics), "--model", str(tiny_model),
                           "--batch-size", "1", "--steps", "1", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=dist_env(), timeout=300)
    assert proc.returncode != 0
    assert "--batch-size 1 is smaller than the 2 processes" in proc.stderr, proc.stderr[-2000:]
    ranks = proc.stderr.split("elastic/multiprocessing")[0]  # then the launcher reports its ChildFailedError
    assert "Traceback" not in ranks and not (tmp_path / "out").exists()


def test_sharded_hf_rollouts_decode_with_the_plain_loop(run_cli, tiny_model, tmp_path):
    """R8: the compiled step over FSDP2-sharded layers breaks at every unit's hooks and meets new gathered
    tensors every rollout; asked for, it is refused at start; unset (the CUDA default), the run takes the plain
    loop, as the dry run's plan does."""
    from rcsd_cli.stages.train import decoding_for
    from tests.train.test_distributed import dist_env

    sharded = cfg_of(tiny_model, sharding="full-shard")
    assert decoding_for(sharded, True).generation.compile_decoding is False
    assert decoding_for(sharded, False).generation.compile_decoding is None  # one process without a launcher
    assert decoding_for(cfg_of(tiny_model), True).generation.compile_decoding is None  # replicated
    rubrics = tmp_path / "r.parquet"
    run_cli("gen-rubrics", _problems(tmp_path), "-o", rubrics, "--generator", "reference", check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "rcsd_cli", "train", "--rubrics", str(rubrics), "--model", str(tiny_model),
                           "--sharding", "full-shard", "--compile-decoding", "--steps", "1", "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, env=dist_env(), timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    assert "--compile-decoding is not available with --sharding full-shard" in proc.stderr, proc.stderr[-2000:]


_EXPLAIN_SHARDED = """
import json, sys, torch, torch.distributed as dist
from rcsd_cli.models import load_model
from rcsd_cli.modeling.sharding import gathered, shard
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
lm = load_model(sys.argv[1], device=torch.device("cpu"))
ids = torch.tensor([[1, 2, 3]])
plain = torch._dynamo.explain(lm.model.forward)(input_ids=ids)
root = shard(lm.model, True, "cpu")
addresses = []
for _ in range(2):  # two rollouts
    with gathered(root):
        sharded = torch._dynamo.explain(root.lm.forward)(input_ids=ids)
        addresses.append([p.data_ptr() for p in root.lm.parameters()])
print(json.dumps(dict(plain=plain.graph_break_count, sharded=sharded.graph_break_count,
                      moved=sum(a != b for a, b in zip(*addresses)), params=len(addresses[0]))))
"""


def test_compiled_decoding_over_sharded_layers_breaks_per_layer_and_moves_every_step(tiny_model):
    """R8, measured with ``torch._dynamo.explain`` inside the gathered root (gloo, one process): the unsharded
    model compiles to one graph; gathered FSDP2 units break it twice per decoder layer (their hooks), and the
    gathered parameters sit at new addresses in the next rollout, so CUDA graphs would be recorded again every
    step. Hence the refusal above."""
    import json

    from tests.train.test_distributed import dist_env

    proc = subprocess.run([sys.executable, "-c", _EXPLAIN_SHARDED, str(tiny_model)], capture_output=True, text=True,
                          env=dist_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    layers = 2  # the tiny model's decoder layers
    assert got["plain"] == 0 and got["sharded"] >= 2 * layers
    # most gathered tensors come back at new addresses (the allocator may hand a few the same block again); one
    # moved tensor is enough to make a CUDA graph record again
    assert got["moved"] >= got["params"] // 2


def _problems(folder: Path) -> Path:
    from tests.conftest import write_jsonl

    return write_jsonl(folder / "p.jsonl", [{"id": "q1", "question": "What is 2 + 3?", "answer": "5"}])


def test_flash_attention_refuses_the_static_cache_loop(tiny_model):
    """R11: the compiled loop's mask marks unwritten cache slots present; FlashAttention-2 would attend to them."""
    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.errors import RcsdError
    from rcsd_cli.modeling.generation import generate
    from rcsd_cli.models import load_model

    lm = load_model(str(tiny_model), device=torch.device("cpu"))
    lm.model.config._attn_implementation = "flash_attention_2"  # as loaded with it on a GPU
    with pytest.raises(RcsdError, match="flash_attention_2 cannot decode with the compiled static-cache loop"):
        generate(lm.model, lm.tokenizer, [[1, 2, 3]], GenerationConfig(max_new_tokens=4, compile_decoding=True), 0)


def test_a_lora_resume_loads_the_adapter_where_the_base_is(tiny_model, tmp_path, monkeypatch):
    """R3: without a device, peft loads a saved adapter onto ``infer_device()`` (a bare ``cuda``: GPU 0 on every
    rank). Stubbed to the meta device here, an adapter loaded there has no values."""
    import peft.peft_model
    import peft.utils.save_and_load
    from peft import LoraConfig, get_peft_model

    from rcsd_cli.models import load_model
    from rcsd_cli.train.student import build_models

    saved = get_peft_model(load_model(str(tiny_model), device=torch.device("cpu")).model,
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    saved.save_pretrained(tmp_path / "ckpt")
    for module in (peft.peft_model, peft.utils.save_and_load):
        monkeypatch.setattr(module, "infer_device", lambda: "meta")
    student, _, _ = build_models(cfg_of(tiny_model, lora_rank=4, lora_targets="q_proj,v_proj"), tmp_path / "ckpt",
                                  trust_remote_code=False)
    expected = {k: v for k, v in saved.state_dict().items() if "lora_" in k}
    got = student.state_dict()
    assert {got[k].device.type for k in expected} == {"cpu"}
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.slow  # 8B shapes: up to a minute each on 2 cores
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_dry_run_fits_at_full_shape(run_cli, recipe, tmp_path):
    """Each shipped recipe, at its model's real shape and world (offline: rcsd ships the configs it names). The
    CPU recipes are planned for this machine with the demo's real input (ARC-Easy prompts, not the 2048-token
    stand-in of an 8B run), the GPU ones for their 80 GiB devices at their length limits."""
    values = read_config_file(recipe, TrainConfig)
    inputs = []
    if "device_memory" not in values:
        inputs = ["--rubrics", tmp_path / "r.parquet"]
        run_cli("gen-rubrics", "arc-easy", "--limit", "80", "--generator", "reference", "-o", inputs[1], check=True)
    proc = run_cli("train", "--config", recipe, *inputs, "--dry-run", check=True)
    assert "fits: yes" in proc.stdout, proc.stdout[-3000:]
    world = values.get("processes", 1)
    assert f"rank 0 of {world}:" in proc.stdout
    if values.get("rollout_backend") == "vllm":  # the engines' lengths, as they will start
        new = values["max_new_tokens"]
        assert f"vllm student engine: max_model_len {2048 + new:,}, max_num_batched_tokens" in proc.stdout


# ----------------------------------------------------------------------------- R1: vLLM engines sized as vLLM checks


def test_kv_per_token_and_one_sequence_of_the_flagship_by_hand():
    """Qwen3-8B: 36 layers x 8 KV heads x 128 dims, keys and values in bf16 = 147,456 bytes a token; the
    flagship's 2048 + 4096 tokens are 0.84375 GiB, the model's own 40,960-token limit 5.625 GiB."""
    from rcsd_cli.train.engine_sizing import kv_bytes_per_token

    per_token = kv_bytes_per_token(load_model_config("Qwen/Qwen3-8B"), 2)
    assert per_token == 2 * 36 * 8 * 128 * 2 == 147_456
    assert (6144 * per_token / GIB, 40_960 * per_token / GIB) == (0.84375, 5.625)


def _flagship(**options) -> TrainConfig:
    values = read_config_file(ROOT / "examples" / "recipes" / "paper-stage2-qwen3-8b.yaml", TrainConfig)
    return build_config(TrainConfig, {**values, **options})


def test_the_flagships_engines_get_its_lengths_and_a_share_too_small_is_named():
    """The flagship (LoRA): one engine for rollouts and the frozen base's analyses, 0.6 of 80 GiB, its longest
    sequence 6,144 tokens. As full fine-tuning: two engines (the teacher's keeps the initial weights), 0.3 each:
    15.3 GiB of bf16 weights and the profiling peak still leave KV for several sequences. At 0.4 in all, 16 GiB
    each, nothing is left, and the error names the option."""
    from rcsd_cli.train.engine_sizing import check_engines, engine_sizes
    from rcsd_cli.train.rollout_engines import separate_teacher_engine

    lengths = {"student_prompt": 2048, "teacher_prompt": 2048 + 4096, "completion": 4096}
    config = load_model_config("Qwen/Qwen3-8B")
    n = sum(p.numel() for p in meta_model(config).parameters())

    def sizes(cfg):
        return engine_sizes(cfg, config, lengths, n_params=n, dtype_bytes=2, device_gib=80.0,
                            separate_teacher=separate_teacher_engine(cfg))

    def described(found):
        return [(s.role, s.max_model_len, s.max_num_batched_tokens, s.share) for s in found]

    lora, full = sizes(_flagship()), sizes(_flagship(lora_rank=0))
    assert described(lora) == [("student engine", 6144, 8192, 0.6)]
    assert described(full) == [("student engine", 6144, 8192, 0.3), ("teacher engine", 6144, 8192, 0.3)]
    assert all(s.sequence_gib == 0.84375 and s.kv_gib > 5 * s.sequence_gib for s in lora + full)
    assert check_engines(lora, 80.0) is None and check_engines(full, 80.0) is None
    problem = check_engines(sizes(_flagship(lora_rank=0, vllm_memory_utilization=0.4)), 80.0)
    assert problem.startswith("vllm student engine: its 0.20 of 80.0 GiB leaves")
    assert problem.endswith("raise --vllm-memory-utilization or lower --max-new-tokens")


class _RecordingLLM:
    """vLLM's ``LLM`` as far as starting one goes: records the arguments it was given."""

    started: list[dict] = []

    def __init__(self, **kwargs):
        type(self).started.append(kwargs)


@pytest.fixture
def recording_vllm(monkeypatch):
    import types

    from rcsd_cli.backends import vllm as backend

    module = types.ModuleType("vllm")
    module.LLM = _RecordingLLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(backend, "vllm_available", lambda: True)
    monkeypatch.setattr(_RecordingLLM, "started", [])
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the in-process engine sets it: undone after
    return _RecordingLLM.started


def test_train_starts_its_engines_with_the_runs_lengths_or_refuses_before_loading(tiny_model, recording_vllm):
    """R1: ``max_model_len`` (student prompt + completion) and ``max_num_batched_tokens`` reach vLLM; a KV
    cache that cannot hold one such sequence is refused before any engine loads."""
    from rcsd_cli.errors import RcsdError
    from rcsd_cli.models import load_model
    from rcsd_cli.train.rollout_engines import build_rollouts

    lm = load_model(str(tiny_model), device=torch.device("cpu"))
    lengths = {"student_prompt": 40, "teacher_prompt": 60, "completion": 16}
    cfg = cfg_of(tiny_model, rollout_backend="vllm", vllm_kv_cache_gib=0.25)
    build_rollouts(cfg, lm.model, None, lm.tokenizer, None, trust_remote_code=False, lengths=lengths)
    assert [(s["max_model_len"], s["max_num_batched_tokens"]) for s in recording_vllm] == [(56, 8192)]
    tight = cfg_of(tiny_model, rollout_backend="vllm", vllm_kv_cache_gib=1e-6)
    with pytest.raises(RcsdError, match=r"vllm student engine: --vllm-kv-cache-gib 1e-06 holds no 56-token"):
        build_rollouts(tight, lm.model, None, lm.tokenizer, None, trust_remote_code=False, lengths=lengths)
    assert len(recording_vllm) == 1
