"""Single-process parts of sharded training: launcher config mapping and checkpoint state formats."""

import pytest
import torch

from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling import sharding

FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD", "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture
def clean_env(monkeypatch):
    for name in FSDP_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, expected", [
    ({}, "replicate"),
    ({"ACCELERATE_USE_FSDP": "true"}, "full-shard"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "true"},
     "full-shard"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "shard-grad-op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "shard-grad-op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "replicate"),
    ({"ACCELERATE_USE_FSDP": "false"}, "replicate"),
])
def test_accelerate_fsdp_env_maps_to_sharding(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert sharding.from_launcher_env(None)[0] == expected


def test_explicit_sharding_wins_over_launcher(clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding.from_launcher_env("replicate") == ("replicate", None)


def test_deepspeed_launch_fails_with_the_equivalent_flags(clean_env):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RcsdError, match="--sharding full-shard"):
        sharding.from_launcher_env(None)


def _tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_full_state_dict_stores_tied_head_once(tiny_model):
    model = _tiny(tiny_model)
    state = sharding.full_state_dict(model)
    assert "lm_head.weight" not in state  # tied to the embedding, as save_pretrained writes it
    assert set(state) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()
                                                                     if n in model.state_dict()}
    assert torch.equal(state["model.embed_tokens.weight"], model.get_input_embeddings().weight)


def test_optimizer_state_round_trips_by_parameter_name(tiny_model):
    model = _tiny(tiny_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    saved = sharding.optimizer_state(model, optimizer)
    assert "model.norm.weight" in saved["state"]  # keyed by name, not by position
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sharding.load_optimizer_state(model, fresh, saved)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
        assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])
