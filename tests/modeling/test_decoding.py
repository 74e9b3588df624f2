"""The static, compiled decoding loop gives the plain loop's tokens: greedy, seeded sampling, stop
tokens inside a check window, left-padded prompts of different lengths, LoRA students."""

import pytest
import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.modeling.generation import generate, generate_batch, use_compiled_decoding
from rcsd_cli.models import load_model
from tests.conftest import shared

CPU = torch.device("cpu")
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 300, 2000]]


def both(model, tok, cfg, seeds=(11, 12, 13)):
    plain = generate_batch(model, tok, PROMPTS, cfg.model_copy(update={"compile_decoding": False}), list(seeds))
    static = generate_batch(model, tok, PROMPTS, cfg.model_copy(update={"compile_decoding": True}), list(seeds))
    return plain, static


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return shared("tiny", load_model(str(tiny_model), device=CPU))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_compiled_loop_equals_the_plain_loop(tiny, temperature):
    cfg = GenerationConfig(max_new_tokens=40, temperature=temperature, top_k=20, top_p=0.95)
    plain, static = both(tiny.model, tiny.tokenizer, cfg)
    assert [g.token_ids for g in static] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in static] == [g.finish_reason for g in plain]
    assert all(len(g.token_ids) == 40 for g in plain)  # a random model never stops: full length


def test_stop_tokens_end_rows_at_the_same_place(tiny_model):
    """Rows stop at different steps, none on a check boundary: same completions, same finish reasons.
    The stop token is changed on a model and tokenizer of this test's own, never on the shared ``tiny``."""
    own = load_model(str(tiny_model), device=CPU)
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.0)
    free = generate_batch(own.model, own.tokenizer, PROMPTS, cfg.model_copy(update={"compile_decoding": False}), 0)
    stop_id = free[0].token_ids[4]  # row 0 stops at its 5th token (others when, or if, they emit it)
    own.model.generation_config.eos_token_id = stop_id
    own.tokenizer.eos_token_id = stop_id
    plain, static = both(own.model, own.tokenizer, cfg)
    assert plain[0].finish_reason == "stop" and len(plain[0].token_ids) <= 5
    assert [(g.token_ids, g.finish_reason) for g in static] == [(g.token_ids, g.finish_reason) for g in plain]


def test_lora_student_decodes_the_same(tiny_model):
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(tiny_model), device=CPU)
    student = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero adapters, so the LoRA path matters
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=20)
    plain, static = both(student, lm.tokenizer, cfg)
    assert [g.token_ids for g in static] == [g.token_ids for g in plain]


def test_compiled_decoding_default_follows_the_device():
    assert use_compiled_decoding(GenerationConfig(), torch.device("cuda"))
    assert not use_compiled_decoding(GenerationConfig(), CPU)
    assert use_compiled_decoding(GenerationConfig(compile_decoding=True), CPU)


@pytest.mark.parametrize("choice", ["bf16-mixed", "bf16"])
def test_static_loop_in_bf16_semantics(tiny_model, choice):
    """Under bf16 autocast over fp32 weights (rotary keys fp32, values bf16) and with bf16 weights."""
    from rcsd_cli.modeling import precision

    lm = load_model(str(tiny_model), device=CPU, dtype=precision.param_dtype(choice))
    with precision.compute(choice, "cpu"):
        plain, static = both(lm.model, lm.tokenizer, GenerationConfig(max_new_tokens=24, temperature=0.0))
    assert [g.token_ids for g in static] == [g.token_ids for g in plain]


def test_contrastive_decoding_takes_the_contrast_argmax_at_every_step(tiny):
    """``controls``: each step's token is the argmax of (1+w) z_prompt - w z_control, recomputed here
    without a KV cache from the full prefixes; a control equal to its prompt changes nothing."""
    model, tok = tiny.model, tiny.tokenizer
    controls = [[1, 7, 7], [1, 3000, 12, 9, 9, 9, 9], [1, 8]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, compile_decoding=False)
    out = generate_batch(model, tok, PROMPTS, cfg, 0, controls=controls, contrast_weight=1.5)
    plain = generate_batch(model, tok, PROMPTS, cfg, 0)
    assert [g.token_ids for g in out] != [g.token_ids for g in plain]  # the control moved some token
    with torch.no_grad():
        for prompt, control, g in zip(PROMPTS, controls, out, strict=True):
            for t, token in enumerate(g.token_ids):
                z = model(torch.tensor([prompt + g.token_ids[:t]])).logits[0, -1]
                zc = model(torch.tensor([control + g.token_ids[:t]])).logits[0, -1]
                assert token == int((2.5 * z - 1.5 * zc).argmax())
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=20, compile_decoding=False)
    same = generate_batch(model, tok, PROMPTS, sampled, [4, 5, 6], controls=PROMPTS, contrast_weight=0.7)
    assert [g.token_ids for g in same] == [g.token_ids for g in generate_batch(model, tok, PROMPTS, sampled, [4, 5, 6])]


def test_inputs_go_to_the_compute_device_not_the_parameters_device(tiny_model):
    """``--offload full``: a sharded root's parameters live on the host while it computes on the GPU. Here a
    root whose first parameter reports the meta device: inputs must follow ``compute_device``."""
    from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
    from rcsd_cli.modeling.sharding import FinalHidden, compute_device

    lm = load_model(str(tiny_model), device=CPU)
    root = FinalHidden(lm.model)
    root.register_parameter("offloaded", torch.nn.Parameter(torch.empty(1, device="meta")))
    root.compute_device = CPU
    assert next(root.parameters()).device.type == "meta" and compute_device(root) == CPU
    for compiled in (False, True):
        cfg = GenerationConfig(max_new_tokens=3, temperature=0.0, compile_decoding=compiled)
        assert [len(g.token_ids) for g in generate_batch(root, lm.tokenizer, PROMPTS, cfg, 0)] == [3, 3, 3]
    pb = build_pair_batch(PROMPTS, PROMPTS, [[5, 6]] * 3, lm.tokenizer.pad_token_id)
    assert aligned_hidden(root, pb.student).shape == (3, 2, 32)


def test_compiled_decoding_compiles_once_per_bucket_and_keeps_one_cache(tiny):
    """After one batch per prompt bucket, batches of other widths and a short last batch reuse the graphs; the
    model keeps one static cache, the latest shape's (R4: one per bucket, never freed, was 11-15 GB each at 8B
    and 4,096 new tokens while the memory plan counted one)."""
    from rcsd_cli.modeling.generation import prompt_bucket

    assert [prompt_bucket(w) for w in (1, 64, 65, 96, 97, 480, 512, 544, 2048)] == \
        [64, 64, 96, 96, 128, 512, 512, 768, 2048]
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.0, compile_decoding=True, batch_size=3)
    warm = {64: [[1, 5, 6]] * 3, 96: [[1] + [7] * 70] * 3}
    for prompts in warm.values():
        generate_batch(tiny.model, tiny.tokenizer, prompts, cfg, 0)
    assert list(tiny.model._rcsd_static_caches) == [(3, 96 + 4, None)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompts in (PROMPTS, [[1] + [8] * 80] * 3, [[1] + [9] * 50, [1, 2], [3], [1, 4, 4]]):  # 4: 3 + 1 rows
            out = generate(tiny.model, tiny.tokenizer, prompts, cfg, 0)
            assert [len(g.token_ids) for g in out] == [4] * len(prompts)
            assert len(tiny.model._rcsd_static_caches) == 1


@pytest.mark.parametrize("compiled", [False, True])
def test_no_host_tensor_per_token_and_one_position_of_prefill_logits(tiny, monkeypatch, compiled):
    """The decode loop creates no host tensors per token (each ``torch.tensor`` is a blocking copy to the
    device), and prefill keeps the last position's logits only ([rows, 1, V], not [rows, width, V])."""
    from rcsd_cli.modeling import generation

    monkeypatch.setattr(generation, "_compiled_step", lambda model: model)  # count the loop, eagerly
    made, shapes = [], []
    real_tensor, real_forward = torch.tensor, tiny.model.forward

    def counting(*args, **kwargs):
        made.append(1)
        return real_tensor(*args, **kwargs)

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(tiny.model, "forward", forward)
    counts = []
    for new in (4, 12):
        made.clear(), shapes.clear()
        cfg = GenerationConfig(max_new_tokens=new, temperature=1.0, ignore_eos=True, compile_decoding=compiled)
        generation.generate_batch(tiny.model, tiny.tokenizer, PROMPTS, cfg, 0)  # allocates this shape's cache
        made.clear(), shapes.clear()
        monkeypatch.setattr(torch, "tensor", counting)
        out = generation.generate_batch(tiny.model, tiny.tokenizer, PROMPTS, cfg, 0)
        monkeypatch.setattr(torch, "tensor", real_tensor)
        assert [len(g.token_ids) for g in out] == [new] * 3
        counts.append(len(made))
        assert shapes[0][1] == 1 and len(shapes) == new
    assert counts[0] == counts[1]


def test_compiled_decoding_under_autocast_casts_no_weight_per_token(tiny_model, monkeypatch):
    """R6: under bf16-mixed, autocast casts each fp32 master weight to bf16 inside the compiled decode step, at
    every token. Counted in the graph the compiler receives: no cast of a weight-shaped input, after the fix;
    the tokens are autocast's, and the static cache holds bf16 keys and values (R4: fp32 keys were twice the
    size), while the model keeps its fp32 weights."""
    from torch._dynamo.backends.common import aot_autograd

    from rcsd_cli.modeling import precision

    lm = load_model(str(tiny_model), device=CPU)
    weight_shapes = {tuple(m.weight.shape) for m in lm.model.modules() if isinstance(m, torch.nn.Linear)}
    casts = []

    def counting(gm, example_inputs):
        inputs = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
        for n in gm.graph.nodes:
            if n.op == "call_function" and ("to_copy" in str(n.target) or "convert_element_type" in str(n.target)):
                src = inputs.get(getattr(n.args[0], "name", None))
                if src is not None and tuple(src.shape) in weight_shapes and src.dtype == torch.float32:
                    casts.append(tuple(src.shape))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=aot_autograd(fw_compiler=counting),
                                                                         dynamic=False))
    torch._dynamo.reset()
    with precision.compute("bf16-mixed", "cpu"):
        plain, static = both(lm.model, lm.tokenizer, GenerationConfig(max_new_tokens=6, temperature=0.0))
    torch._dynamo.reset()
    assert [g.token_ids for g in static] == [g.token_ids for g in plain]
    assert casts == []
    (cache,) = lm.model._rcsd_static_caches.values()
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} == \
        {torch.bfloat16}
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
