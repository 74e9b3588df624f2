"""The backend interface and the factory that picks one from a ``BackendConfig``."""

from __future__ import annotations

from typing import Callable, Protocol

from rcsd_cli.configs.groups import BackendConfig, GenerationConfig
from rcsd_cli.modeling.generation import Generation, generate
from rcsd_cli.modeling.logprobs import continuation_sums, teacher_topk
from rcsd_cli.models import load_model

OnDone = Callable[[list[int], list[Generation]], None]  # (prompt indices, their generations)


class Backend(Protocol):
    name: str
    tokenizer: object

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig, seed: int,
                 on_done: OnDone | None = None, seeds: list[int] | None = None) -> list[Generation]:
        """One completion per prompt; ``on_done`` sees finished ones as they complete (for resumability).

        ``seeds``: one per prompt (``generation.item_seed`` of the item), so a sample does not depend
        on batching or on what was generated before; default ``item_seed(seed, i)``."""

    # Backends that run the model themselves (hf, vllm) also score given tokens:
    # topk_logprobs(prompts, continuations, k) -> (ids, log-probs), the top-k at every continuation
    # position; and those that batch whole continuations (hf) continuation_logprobs(pairs, batch_size,
    # on_done) -> the summed log-probability of each (context ids, continuation ids) pair (loglik eval).
    # Stages ask ``hasattr(backend, ...)``, never which kind a backend is.


class HFBackend:
    name = "hf"

    def __init__(self, model_name: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        loaded = load_model(model_name, trust_remote_code, attn_implementation=attn_implementation)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def generate(self, prompts, cfg, seed, on_done=None, seeds=None):
        return generate(self.model, self.tokenizer, prompts, cfg, seed, on_done=on_done, seeds=seeds)

    def topk_logprobs(self, prompts, continuations, k):
        return teacher_topk(self.model, self.tokenizer, prompts, continuations, k)

    def continuation_logprobs(self, pairs, batch_size: int, on_done=None):
        return continuation_sums(self.model, pairs, self.tokenizer.pad_token_id, batch_size, on_done)


def open_backend(cfg: BackendConfig, model_name: str, trust_remote_code: bool = False) -> Backend:
    if cfg.kind == "hf":
        return HFBackend(model_name, trust_remote_code, cfg.attn_implementation)
    if cfg.kind == "openai":
        # only the backend asked for is imported (vllm is an optional extra)
        from rcsd_cli.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg, model_name, trust_remote_code)
    # only the backend asked for is imported (vllm is an optional extra)
    from rcsd_cli.backends.vllm import VLLMBackend

    return VLLMBackend(cfg, model_name, trust_remote_code)
