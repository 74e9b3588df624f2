"""``--backend hf``: transformers in this process, through rcsd's own decoding loop (continuous batching)."""

from __future__ import annotations

from rcsd_cli.backends.base import OnDone
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.modeling.generation import Generation, generate
from rcsd_cli.modeling.logprobs import continuation_sums, teacher_topk
from rcsd_cli.models import load_model


class HFBackend:
    name = "hf"

    def __init__(self, model_name: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        loaded = load_model(model_name, trust_remote_code, attn_implementation=attn_implementation)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig, seed: int, on_done: OnDone | None = None,
                 seeds: list[int] | None = None) -> list[Generation]:
        return generate(self.model, self.tokenizer, prompts, cfg, seed, on_done=on_done, seeds=seeds)

    def topk_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], k: int):
        return teacher_topk(self.model, self.tokenizer, prompts, continuations, k)

    def continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                              on_done=None) -> list[float]:
        return continuation_sums(self.model, pairs, self.tokenizer.pad_token_id, batch_size, on_done)
