"""The backend interface: what every engine (hf, vllm, openai) offers a stage, and what those that run the
model themselves add. Stages ask ``hasattr(backend, ...)`` for the scoring methods, never which kind a
backend is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.modeling.generation import Generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OnDone = Callable[[list[int], list[Generation]], None]  # (prompt indices, their generations)


class Backend(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig, seed: int,
                 on_done: OnDone | None = None, seeds: list[int] | None = None) -> list[Generation]:
        """One completion per prompt; ``on_done`` sees finished ones as they complete (for resumability).

        ``seeds``: one per prompt (``generation.item_seed`` of the item), so a sample does not depend
        on batching or on what was generated before; default ``item_seed(seed, i)``."""
        ...


class ScoringBackend(Backend, Protocol):
    """A backend that also scores given tokens: hf and vllm run the model themselves, openai asks its server for
    prompt log-probs (vLLM's ``prompt_logprobs``)."""

    def topk_logprobs(self, prompts: list[list[int]], continuations: list[list[int]],
                      k: int) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """The top-k (ids, log-probs) at every continuation position."""
        ...

    # hf also batches whole continuations: continuation_logprobs(pairs, batch_size, on_done) -> the summed
    # log-probability of each (context ids, continuation ids) pair (loglik eval).
