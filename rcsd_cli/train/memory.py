"""Plan before you launch: peak memory per device of ``rcsd train``, from the config alone.

``rcsd train --dry-run`` prints this next to the prompts, the way ``accelerate estimate-memory``
sizes weights, but for the whole training state. The model is built on the meta device from
its ``config.json`` (no weights read), so parameter counts are exact, LoRA included. The terms:

- weights in the precision's dtype, and the gradients and AdamW moments of what trains (all of
  it, or the LoRA adapters); divided by the number of processes under FSDP sharding;
- the frozen (or EMA) teacher copy: bf16 under ``bf16-mixed``; none with LoRA (the base with
  adapters disabled) or ``--teacher live``;
- activations of one student micro-batch kept for backward: per decoder layer and token about
  ``10 h + 4 i`` values (norms, q/k/v, attention output, residuals, the MLP's gate, up, product
  and activation), or only each layer's input with ``--gradient-checkpointing`` plus one layer
  recomputed; the teacher's final hidden states; one loss chunk of logits (student, teacher,
  softmax and gradient: 4 x micro-batch x chunk x vocabulary in fp32);
- the rollout's KV cache (``--gen-batch-size`` rows, prompt + completion);
- with ``--rollout-backend vllm`` on a GPU, the engines' share of the device; on CPU their
  weight copy and KV cache;
- the process itself: on CPU the Python/torch/transformers baseline measured in this process,
  on CUDA a nominal 0.5 GiB for the context and kernels.

It is an estimate: allocator fragmentation and transient copies are not modelled. The tests
hold it within 25% of the measured peak RSS on CPU for two configurations.
"""

from __future__ import annotations

import torch

from rcsd_cli.data.schemas import TrainConfig
from rcsd_cli.modeling import precision
from rcsd_cli.train.phases import current_rss_gib

GIB = 2**30
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _meta_model(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _lora_parameters(model, cfg: TrainConfig) -> int:
    from rcsd_cli.train.trainer import lora_targets

    targets = lora_targets(cfg.lora.targets)
    head = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            count += cfg.lora.rank * (module.in_features + module.out_features)
    return count


def estimate(cfg: TrainConfig, model_config, *, student_tokens: int, teacher_tokens: int, world: int = 1,
             device_type: str = "cpu", device_gib: float | None = None) -> dict[str, float]:
    """GiB per device for each term above, and their sum under ``total``.

    ``student_tokens``/``teacher_tokens``: one sequence's prompt + completion length on each side.
    """
    choice = precision.resolve(cfg.precision, device_type)
    model = _meta_model(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = _lora_parameters(model, cfg) if cfg.lora.rank else n_params
    w_bytes = _BYTES[precision.base_dtype(choice, bool(cfg.lora.rank))]
    train_bytes = 4 if cfg.lora.rank else w_bytes  # peft keeps adapters in fp32
    shard = world if cfg.distributed.sharding in ("full-shard", "shard-grad-op") and world > 1 else 1
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    h, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * h)
    heads = text.num_attention_heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * (getattr(text, "head_dim", None) or h // heads)
    vocab = text.vocab_size
    act_bytes = 4 if choice == "fp32" else 2
    micro = min(cfg.micro_batch_size, cfg.batch_size)

    plan = {"weights": n_params * w_bytes / shard,
            "gradients": n_train * train_bytes / shard,
            "adamw_moments": 2 * n_train * train_bytes / shard}
    teacher = 0.0
    if not cfg.lora.rank and cfg.teacher.kind != "live":  # the trainer keeps a copy of the initial weights
        dtype = precision.frozen_dtype(choice) if cfg.teacher.kind == "frozen" else precision.param_dtype(choice)
        teacher = n_params * _BYTES[dtype] / shard
    plan["teacher_copy"] = teacher
    per_layer_token = (10 * h + 4 * inter) * act_bytes
    tokens = micro * student_tokens
    if cfg.gradient_checkpointing:
        plan["activations"] = tokens * (layers * h * act_bytes + per_layer_token)
    else:
        plan["activations"] = tokens * layers * per_layer_token
    plan["activations"] += micro * teacher_tokens * h * act_bytes  # teacher hidden states kept for the loss
    plan["loss_chunk_logits"] = 4 * micro * min(cfg.chunk_size, cfg.generation.max_new_tokens) * vocab * 4
    rows = cfg.generation.batch_size * (cfg.grpo.group_size if cfg.method == "grpo" else 1)
    plan["rollout_kv_cache"] = min(rows, cfg.batch_size) * student_tokens * layers * 2 * kv_dim * act_bytes
    if cfg.rollout.backend == "vllm":
        if device_type == "cuda" and device_gib:
            plan["vllm_engines"] = cfg.rollout.memory_share * device_gib * GIB
        else:
            engine_bytes = _BYTES[precision.frozen_dtype(choice)]  # engines get the run's compute dtype
            plan["vllm_engines"] = n_params * engine_bytes + (cfg.rollout.vllm.kv_cache_gib or 1.0) * GIB
    plan["runtime"] = 0.5 * GIB if device_type == "cuda" else current_rss_gib() * GIB
    if cfg.distributed.offload == "full" and shard > 1 and device_type == "cuda":  # the state lives in host memory
        for key in ("weights", "gradients", "adamw_moments", "teacher_copy"):
            plan[f"host_{key}"] = plan.pop(key)
        plan["gathered_layers"] = 2 * n_params / layers * 2  # two bf16/fp32 layers in flight, roughly
    out = {k: v / GIB for k, v in plan.items()}
    out["total"] = sum(v for k, v in out.items() if not k.startswith("host_"))
    return out


def format_plan(plan: dict[str, float]) -> str:
    """One line per device term, largest first, then the total; host-offloaded terms after it."""
    rows = sorted(((k, v) for k, v in plan.items() if k != "total"), key=lambda kv: -kv[1])
    width = max(len(k) for k, _ in rows)
    device = [f"{k:<{width}}  {v:8.2f} GiB" for k, v in rows if v > 0 and not k.startswith("host_")]
    host = [f"{k:<{width}}  {v:8.2f} GiB (host memory, per process)" for k, v in rows if k.startswith("host_")]
    return "\n".join(device + [f"{'total':<{width}}  {plan['total']:8.2f} GiB per device"] + host)
