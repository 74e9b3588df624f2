"""Plan before you launch: peak memory per device of ``rcsd train``, from the config alone.

``rcsd train --dry-run`` prints this next to the prompts, the way ``accelerate estimate-memory``
sizes weights, but for the whole training state. The model is built on the meta device from
its ``config.json`` (no weights read), so parameter counts are exact, LoRA included. The terms:

- weights in the precision's dtype, and the gradients and AdamW moments of what trains (all of
  it, or the LoRA adapters); divided by the number of processes under FSDP sharding;
- the frozen (or EMA) teacher copy: bf16 under ``bf16-mixed``; none with LoRA (the base with
  adapters disabled), ``--teacher live`` or a served teacher (``--teacher-base-url``);
- activations of one student micro-batch kept for backward: per decoder layer and token about
  ``10 h + 4 i`` values (norms, q/k/v, attention output, residuals, the MLP's gate, up, product
  and activation), or only each layer's input with ``--gradient-checkpointing`` plus one layer
  recomputed; under ``bf16-mixed`` over fp32 weights the residual stream and norm outputs (4 h of
  them) stay fp32; the teacher's final hidden states (a served teacher's top-k instead: k ids and
  log-probs per token); one loss chunk of logits (student, teacher, softmax and gradient: 4 x
  micro-batch x chunk x vocabulary in fp32);
- ``bf16-mixed`` without sharding: autocast's bf16 copy of every weight it casts, kept from the
  forward to the end of the autocast region (FSDP2's policy gathers bf16 weights instead); the
  compiled decoding loop holds the same copy while it decodes (cast once per call, not per token);
- the rollout's KV cache: ``--gen-batch-size`` rows (up to the step's prompts; the compiled loop
  pads to that many rows and the prompt to its bucket), keys and values in the dtype decoding
  produces (under ``bf16-mixed`` over fp32 weights the plain loop's rotary keys are fp32; the
  compiled loop's static cache stores both in autocast's bf16);
- the sampling step's logits: one position per row (prefill keeps the last position only), with
  the fp32 copies top-k/top-p filtering makes;
- sharded runs: the root unit (embeddings, head, final norm) gathered from forward to backward
  and its unsharded gradient before the reduce-scatter; with HF rollouts, the gathered rest of the
  model while it generates (generation gathers every unit once); the whole model each process loads
  into host memory before sharding it (on CPU much of it stays resident);
- with ``--rollout-backend vllm`` on a GPU, the engines' share of the device; on CPU their
  weight copy and KV cache;
- the process itself: on CPU the Python/torch/transformers baseline measured in this process,
  on CUDA a nominal 0.5 GiB for the context and kernels.

The run's longest item sizes the sequence terms (``stages.train.memory_plan``), not its first.
It is an estimate: allocator fragmentation and transient copies are not modelled. The tests
hold it within 25% of the measured peak RSS on CPU for three configurations, one of them two sharded
processes generating with a gathered model.
"""

from __future__ import annotations

import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.modeling import precision
from rcsd_cli.modeling.generation import prompt_bucket, use_compiled_decoding
from rcsd_cli.modeling.sharding import _decoder_layers
from rcsd_cli.train.phases import current_rss_gib
from rcsd_cli.train.student import lora_targets

GIB = 2**30
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def text_config(model_config):
    """The language model's part of a config (multimodal configs nest it)."""
    return getattr(model_config, "get_text_config", lambda: model_config)()


def kv_values_per_token(model_config) -> int:
    """Key (or value) entries one token adds to a KV cache over all layers."""
    text = text_config(model_config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim


def meta_model(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _lora_parameters(model, cfg: TrainConfig) -> int:
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
    model = meta_model(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = _lora_parameters(model, cfg) if cfg.lora.rank else n_params
    w_bytes = _BYTES[precision.base_dtype(choice, bool(cfg.lora.rank))]
    train_bytes = 4 if cfg.lora.rank else w_bytes  # peft keeps adapters in fp32
    shard = world if cfg.distributed.sharding in ("full-shard", "shard-grad-op") and world > 1 else 1
    text = text_config(model_config)
    h, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * h)
    vocab = text.vocab_size
    act_bytes = 4 if choice == "fp32" else 2
    micro = min(cfg.micro_batch_size, cfg.batch_size)

    plan = {"weights": n_params * w_bytes / shard,
            "gradients": n_train * train_bytes / shard,
            "adamw_moments": 2 * n_train * train_bytes / shard}
    teacher = 0.0
    # the trainer keeps a copy of the initial weights, unless the teacher is served (--teacher-base-url)
    if not cfg.lora.rank and cfg.teacher.kind != "live" and not cfg.teacher.base_url:
        dtype = precision.frozen_dtype(choice) if cfg.teacher.kind == "frozen" else precision.param_dtype(choice)
        teacher = n_params * _BYTES[dtype] / shard
    plan["teacher_copy"] = teacher
    fp32_stream = choice == "bf16-mixed" and w_bytes == 4  # autocast over fp32 weights: fp32 residuals and norms
    per_layer_token = (10 * h + 4 * inter) * act_bytes + (4 * h * 2 if fp32_stream else 0)
    tokens = micro * student_tokens
    if cfg.gradient_checkpointing:
        plan["activations"] = tokens * (layers * h * (4 if fp32_stream else act_bytes) + per_layer_token)
    else:
        plan["activations"] = tokens * layers * per_layer_token
    if cfg.teacher.base_url:  # a served teacher's top-k (int64 ids, fp32 log-probs) over the completion
        plan["activations"] += micro * cfg.generation.max_new_tokens * cfg.loss.top_k * 12
    else:
        plan["activations"] += micro * teacher_tokens * h * act_bytes  # teacher hidden states kept for the loss
    plan["loss_chunk_logits"] = 4 * micro * min(cfg.chunk_size, cfg.generation.max_new_tokens) * vocab * 4
    plan["autocast_weight_copies"] = n_train * 2 if fp32_stream and shard == 1 and not cfg.lora.rank else 0.0
    new = cfg.generation.max_new_tokens
    step_rows = -(-cfg.batch_size // world) * (cfg.grpo.group_size if cfg.method == "grpo" else 1)
    rows = min(cfg.generation.batch_size, step_rows)
    compiled = use_compiled_decoding(cfg.generation, torch.device(device_type))
    kv_len = prompt_bucket(max(1, student_tokens - new)) + new if compiled else student_tokens
    key_bytes = 4 if fp32_stream and not compiled else act_bytes  # the static cache stores autocast's dtype
    plan["rollout_kv_cache"] = rows * kv_len * kv_values_per_token(model_config) * (key_bytes + act_bytes)
    plan["sampling_logits"] = rows * vocab * (act_bytes + 4 * 4 + 8)  # logits, fp32 copies, sort order (int64)
    gathered_bytes = 2 if choice == "bf16-mixed" else w_bytes  # FSDP2 gathers bf16 under the mixed policy
    if shard > 1:  # the root unit (embeddings, head, final norm) stays gathered from forward to backward, and
        # its gradient exists unsharded until the reduce-scatter

        n_root = n_params - sum(p.numel() for p in _decoder_layers(model).parameters())
        root_train = n_root if not cfg.lora.rank else 0
        plan["gathered_root_unit"] = n_root * gathered_bytes * (1 - 1 / shard) + root_train * train_bytes
        # every process loads the whole model (and copies the teacher) into host memory before sharding it;
        # on CPU the allocator keeps much of that resident, on CUDA it is a transient host term
        loaded = (n_params * w_bytes + plan["teacher_copy"] * shard) * (1 - 1 / shard)
        plan["load_before_sharding" if device_type == "cpu" else "host_load_before_sharding"] = loaded
    if shard > 1 and cfg.rollout.backend == "hf":  # generation gathers every unit
        plan["gathered_for_generation"] = n_params * gathered_bytes * (1 - 1 / shard)
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
