"""The GPU path's defects made visible on CPU: vLLM engines in one process, a teacher that reshards, a resume
that stays on the host, a weight push gathered in the engine's dtype (2 gloo processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.options import build_config, read_config_file
from tests.conftest import ROOT
from tests.train.test_distributed import dist_env
from tests.train.test_distributed import rubrics as rubrics  # a fixture

RECIPES = ROOT / "examples" / "recipes"


class RecordingEngine:
    """Stands in for ``VLLMBackend``: records what each engine was asked to be and to do."""

    made: list = []

    def __init__(self, cfg, model, trust_remote_code=False, *, dtype="auto", in_process=False, role="",
                 engine_args=None):
        self.role, self.sleep_mode, self.asleep, self.calls = role, cfg.vllm.sleep, set(), []
        self.engine_args = engine_args or {}
        RecordingEngine.made.append(self)

    def generate(self, prompts, cfg, seed, seeds=None, adapter=True):
        self.calls.append(("generate", tuple(sorted(self.asleep)), adapter))
        return []

    def use_adapter(self, folder):
        self.calls.append(("adapter", tuple(sorted(self.asleep)), sorted(p.name for p in Path(folder).iterdir())))

    def sleep(self, keep_weights):
        if self.sleep_mode:
            self.asleep = {"kv_cache"} if keep_weights else {"weights", "kv_cache"}
            self.calls.append(("sleep", keep_weights))

    def wake(self, tags=("weights", "kv_cache")):
        woke = [t for t in tags if t in self.asleep]
        self.asleep -= set(woke)
        if woke:
            self.calls.append(("wake", tuple(woke)))

    def load_weights(self, weights):
        self.calls.append(("load", tuple(sorted(self.asleep)), {v.dtype for _, v in weights}))

    def close(self):
        self.calls.append(("close",))


@pytest.mark.parametrize("recipe", ["paper-stage2-qwen3-8b", "paper-opsd-qwen3-8b"])
def test_at_most_one_engine_per_process_sleeps_and_wakes_in_order(monkeypatch, tiny_model, recipe):
    """vLLM allows sleep mode for one engine per process (its allocator's sleep unmaps every allocation)."""
    from rcsd_cli.backends import vllm
    from rcsd_cli.train.rollout_engines import build_rollouts

    values = read_config_file(RECIPES / f"{recipe}.yaml", TrainConfig)  # as full fine-tuning: two engines
    cfg = build_config(TrainConfig, {**values, "model": str(tiny_model), "precision": "bf16-mixed", "lora_rank": 0})
    assert cfg.teacher.context == "reason-first"
    monkeypatch.setattr(vllm, "VLLMBackend", RecordingEngine)
    monkeypatch.setattr(vllm, "vllm_available", lambda: True)
    RecordingEngine.made = []
    student = torch.nn.Linear(2, 2)
    rollouts = build_rollouts(cfg, student, None, None, None, trust_remote_code=False)
    roles = [e.role for e in RecordingEngine.made]
    assert len(roles) == len(rollouts.engines) >= 1
    assert sum(e.sleep_mode for e in RecordingEngine.made) <= 1, roles
    student_engine = RecordingEngine.made[0]
    # a step: rollouts, sleep while training, the push (weights woken and loaded before the KV cache)
    rollouts.student([[1]], cfg.generation, [0])
    rollouts.after_update()
    rollouts.student([[1]], cfg.generation, [0])
    calls = [c[:2] for c in student_engine.calls]
    assert calls == [("generate", ()), ("sleep", False), ("wake", ("weights",)), ("load", ("kv_cache",)),
                     ("wake", ("kv_cache",)), ("generate", ()), ("sleep", False)]
    loads = [c for c in student_engine.calls if c[0] == "load"]
    assert loads[0][2] == {torch.bfloat16}  # pushed in the engine's dtype


@pytest.mark.parametrize("recipe", ["paper-stage2-qwen3-8b", "paper-opsd-qwen3-8b"])
def test_a_lora_run_keeps_one_engine_and_pushes_only_the_adapter(monkeypatch, tiny_model, recipe):
    """R10: the flagship (LoRA, frozen reason-first teacher) reloaded all base weights after a level-2 sleep every
    step and kept a second engine resident for the teacher. Now one engine with LoRA enabled: the student's
    rollouts carry its adapter, the teacher's analyses the base alone, a push writes the adapter files only,
    and sleeping keeps the base weights (level 1)."""
    from peft import LoraConfig, get_peft_model

    from rcsd_cli.backends import vllm
    from rcsd_cli.models import load_model
    from rcsd_cli.train.rollout_engines import build_rollouts

    values = read_config_file(RECIPES / f"{recipe}.yaml", TrainConfig)
    cfg = build_config(TrainConfig, {**values, "model": str(tiny_model), "precision": "bf16-mixed"})
    assert cfg.lora.rank == 16 and cfg.teacher.kind == "frozen" and cfg.teacher.context == "reason-first"
    monkeypatch.setattr(vllm, "VLLMBackend", RecordingEngine)
    monkeypatch.setattr(vllm, "vllm_available", lambda: True)
    RecordingEngine.made = []
    student = get_peft_model(load_model(str(tiny_model)).model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    rollouts = build_rollouts(cfg, student, None, None, None, trust_remote_code=False)
    assert [e.role for e in RecordingEngine.made] == ["student engine"] and len(rollouts.engines) == 1
    engine = RecordingEngine.made[0]
    assert engine.engine_args == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    rollouts.teacher([[1]], cfg.generation, [0])  # the step: the analysis, the rollout, training, the push
    rollouts.student([[1]], cfg.generation, [0])
    rollouts.after_update()
    rollouts.student([[1]], cfg.generation, [0])
    folder = rollouts.engines[0].folder
    rollouts.close()
    assert not folder.exists()  # the process's adapter folder goes with the engine
    files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert engine.calls == [("generate", (), False), ("sleep", True), ("wake", ("kv_cache",)),
                            ("generate", (), True), ("sleep", True), ("adapter", ("kv_cache",), files),
                            ("wake", ("kv_cache",)), ("generate", (), True), ("sleep", True), ("close",)]


@pytest.mark.parametrize("offload", ["none", "full"])
def test_sharded_teacher_reshards_resume_stays_on_the_host_and_push_gathers_bf16(tiny_model, tmp_path, rubrics,
                                                                                  offload):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name("sharded_worker.py")), str(tiny_model), str(rubrics), str(out),
                           offload], capture_output=True, text=True, env=dist_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2
        assert rep["teacher_sharded_after_step"] and rep["student_sharded_after_step"]
        assert rep["gathered_dtypes"] == ["torch.bfloat16"] and rep["pushed_dtypes"] == ["torch.bfloat16"]
        assert rep["pushed_embedding_matches"]
        assert rep["load_map_locations"] == ["cpu"]
        assert rep["optimizer_restored"]
    assert reports[0]["optimizer_entries_read"][0] > 0 and reports[1]["optimizer_entries_read"] == [0]


def test_phase_timing_waits_for_the_gpu_once_per_step(monkeypatch):
    """R7: the clock synchronised before and after every phase (two host stalls per phase, eight phases a
    step). With CUDA events it records, and waits once when the step's figures are taken."""
    from rcsd_cli.train import phases

    waits, events = [], []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None
            events.append(self)

        def record(self):
            self.at = len(events)  # a stand-in clock: milliseconds = events made so far

        def elapsed_time(self, end):
            return float(end.at - self.at)

    for name, value in {"is_available": lambda: True, "synchronize": lambda: waits.append(1), "Event": Event,
                        "reset_peak_memory_stats": lambda: None, "max_memory_allocated": lambda: 2**30}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    clock = phases.PhaseClock()
    for phase in ("rollout", "teacher", "student", "student", "optimizer", "push"):
        with clock(phase):
            pass
    assert waits == []  # nothing waited inside the step
    taken = clock.take()
    assert waits == [1] and taken["peak_gpu_gib"] == 1.0
    assert taken["student_seconds"] == 0.002 and taken["rollout_seconds"] == 0.001  # two phases of 1 ms


@pytest.mark.slow  # about 40 s on 2 cores
def test_the_gpu_quick_check_runs_on_cpu_at_tiny_scale(tmp_path):
    """``benchmarks/gpu_check.py --quick`` is what a lent GPU runs, once: it must run through here first. A short
    last batch is padded to the others' rows (no new graph: R2's "batch of 5" row compiled again)."""
    root = ROOT
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--quick", "--allow-cpu",
                           "--scale", "tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_quick.json").read_text())
    runs = {(r["loop"], r["batch"]): r for r in report["decoding"]["runs"]}
    assert runs[("compiled", "warm-up 512")]["new_graphs"] >= 1
    assert runs[("compiled", "512 + batch of 5")]["new_graphs"] == 0 and runs[("compiled", "512")]["new_graphs"] == 0
    assert report["loss_precision"]["same_loss_twice"] is True
    assert all(r.get("optimizer_restored") for r in report["sharded"].values())
