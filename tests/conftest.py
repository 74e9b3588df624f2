"""Shared fixtures: a tiny random Llama with the default model's real tokenizer, and a CLI runner.

The tests run one pytest-xdist worker per core (pyproject's addopts) and each worker, with the CLI
subprocesses it starts, on one thread: the models here are tiny, so torch's thread pool costs more than it
gives, and two multi-threaded workers on two cores would slow each other several-fold. Set
OMP_NUM_THREADS to choose otherwise; ``-n 0`` runs in one process.

The suite passes in any order: pytest-randomly shuffles it on every run (the header prints
``--randomly-seed=N``; pass it to replay an order, ``-p no:randomly`` for file order), and after every test
``unchanged_shared_state`` checks that nothing shared was left changed: the process's environment, working
directory and torch's global settings, and every object a module- or session-scoped fixture registered with
``shared``. A test that needs to change a shared model or tokenizer changes a copy of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; the CLI subprocesses inherit it

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_SHARED: dict[str, tuple[object, object]] = {}  # fixture name -> (object, its fingerprint when registered)


def _fingerprint(obj) -> object:
    """What a test could leave changed on a shared object: a loaded model (``LoadedModel``) and its tokenizer,
    a folder's files, or, for anything else, its repr (a server process's includes its return code)."""
    if isinstance(obj, (tuple, list)):
        return [_fingerprint(x) for x in obj]
    if isinstance(obj, Path):
        files = sorted(f for f in obj.rglob("*") if f.is_file()) if obj.is_dir() else [obj]
        return [(str(f.relative_to(obj) if obj.is_dir() else f), f.stat().st_size, f.stat().st_mtime_ns)
                for f in files if f.exists()]
    model, tok = getattr(obj, "model", None), getattr(obj, "tokenizer", None)
    if model is None:
        return repr(obj)
    import torch

    with torch.no_grad():
        weights = [(n, float(p.double().sum())) for n, p in model.named_parameters()]
    tokens = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side")}
    return {"tokenizer": tokens, "generation config": model.generation_config.to_diff_dict(),
            "training mode": model.training, "weights": weights}


def shared(name: str, obj):
    """Register a module- or session-scoped fixture's object: every later test must leave it as it is now."""
    _SHARED[name] = (obj, _fingerprint(obj))
    return obj


def unshare(name: str) -> None:
    """A generator fixture's teardown: its object may change from now on (a server stops)."""
    _SHARED.pop(name, None)


# pytest's current test; inductor's record of its first compile and the cache directory it picks then
_OWN_ENV = ("PYTEST_", "_TORCHINDUCTOR", "TORCHINDUCTOR_CACHE_DIR")


def _global_state() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_ENV)}
    state = {"environment": env, "working directory": os.getcwd()}
    torch = sys.modules.get("torch")
    if torch is not None:
        state |= {"torch default dtype": torch.get_default_dtype(), "torch grad mode": torch.is_grad_enabled(),
                  "torch threads": torch.get_num_threads(),
                  "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled()}
    return state


@pytest.fixture(autouse=True)
def unchanged_shared_state():
    """Fail the test that leaves shared state changed, naming what changed (order dependence made visible)."""
    before = _global_state()
    yield
    after = _global_state()
    changed = [k for k in before if before[k] != after.get(k)]
    if "environment" in changed:
        env_a, env_b = before["environment"], after["environment"]
        keys = sorted(k for k in env_a.keys() | env_b.keys() if env_a.get(k) != env_b.get(k))
        changed[changed.index("environment")] = f"environment ({', '.join(keys)})"
    changed += [f"fixture {name!r}" for name, (obj, print_) in _SHARED.items() if _fingerprint(obj) != print_]
    assert not changed, f"the test left shared state changed: {'; '.join(changed)}"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from rcsd_cli.models import default_model_dir

    return default_model_dir()


def make_tiny_llama(out: Path, tokenizer_dir: Path, hidden: int = 32, heads: int = 4, layers: int = 2) -> Path:
    """A random Llama (2 layers by default) saved as safetensors with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """~1.6M parameters: fast enough for every stage in a unit test."""
    return shared("tiny_model", make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir))


ANSWER_TOKENS = ((" A", " B"), ("Answer", ":"), (" C", "\n"))


def make_answering_llama(out: Path, tokenizer_dir: Path) -> Path:
    """The tiny Llama with an untied output head that scores only the tokens of ANSWER_TOKENS, each pair
    with opposite rows: sampled with ``top_k=3`` it writes strings such as ``": A CAnswer B"``, whose
    extracted answer (A, B, C or none) varies from rollout to rollout, so the real rubric and correctness
    rewards give a group non-zero advantages."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_tiny_llama(out, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out, tie_word_embeddings=False)
    head = torch.zeros_like(model.lm_head.weight)
    g = torch.Generator().manual_seed(0)
    for a, b in ANSWER_TOKENS:
        (ia,), (ib,) = tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)
        head[ia] = 0.5 * torch.randn(head.shape[1], generator=g)
        head[ib] = -head[ia]
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory, tokenizer_dir) -> Path:
    return shared("answering_model", make_answering_llama(tmp_path_factory.mktemp("answering-llama"), tokenizer_dir))


def weights_gap(a_dir: Path, b_dir: Path, name: str = "model.safetensors") -> float:
    """Largest absolute difference between two runs' saved weights (the same tensor names required)."""
    from safetensors.torch import load_file

    a, b = load_file(a_dir / name), load_file(b_dir / name)
    assert sorted(a) == sorted(b)  # a tied output head is stored once, as in a one-process save
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_resumed(log: str, resumed: Path, uninterrupted: Path, step: int, name: str = "model.safetensors",
                   rel: float = 1e-6, atol: float = 0.0) -> None:
    """A resume, not a restart: the run says so, steps 1..step keep their recorded metrics (timings too: they
    were not run again), the later losses match, and it ends on the uninterrupted run's weights (within
    ``atol``), which under a decaying lr depend on the restored schedule and AdamW moments."""
    from rcsd_cli.data.artifacts import read_artifact

    assert f"checkpoint-{step} (step {step})" in log, log[-2000:]
    before, _ = read_artifact(uninterrupted / "metrics.parquet", "metrics")
    after, _ = read_artifact(resumed / "metrics.parquet", "metrics")
    assert after[:step] == before[:step] and [m.step for m in after] == [m.step for m in before]
    assert [m.loss for m in after] == pytest.approx([m.loss for m in before], rel=rel, abs=1e-7)
    assert weights_gap(uninterrupted, resumed, name) <= atol


@pytest.fixture
def run_cli():
    """Run ``python -m rcsd_cli ARGS`` in a real subprocess."""

    def run(*args, cwd=None, check=False):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "rcsd_cli", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"rcsd {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
        return proc

    return run


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MC_ROWS = [
    {"id": "q1", "question": "Which gas do plants absorb for photosynthesis?",
     "choices": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], "answer": "B"},
    {"id": "q2", "question": "What is the SI unit of force?", "choices": ["Joule", "Watt", "Newton", "Pascal"],
     "answer": "C"},
    {"id": "q3", "question": "What is 12 * 12?", "answer": "144"},
]
