"""Generation backends: the same prompt token ids in, the same completions out.

- ``hf`` (default): transformers in this process, batched with left padding.
- ``vllm``: vLLM's offline ``LLM`` engine (optional extra ``rcsd[vllm]``).
- ``openai``: any OpenAI-compatible ``/v1/completions`` endpoint (``rcsd serve``, vLLM's server, ...),
  with bounded concurrency, retries with backoff and timeouts.

Every backend returns ``Generation`` objects carrying completion token ids, so the artifacts a
stage writes have the same schema whichever backend produced them.
"""

from __future__ import annotations

from rcsd_cli.backends.base import Backend, ScoringBackend
from rcsd_cli.backends.hf import HFBackend
from rcsd_cli.configs.groups import BackendConfig

__all__ = ["Backend", "ScoringBackend", "open_backend"]


def open_backend(cfg: BackendConfig, model_name: str, trust_remote_code: bool = False) -> Backend:
    """The engine ``cfg`` names, loaded for ``model_name``."""
    if cfg.kind == "hf":
        return HFBackend(model_name, trust_remote_code, cfg.attn_implementation)
    if cfg.kind == "openai":
        # only the backend asked for is imported (vllm is an optional extra)
        from rcsd_cli.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg, model_name, trust_remote_code)
    # only the backend asked for is imported (vllm is an optional extra)
    from rcsd_cli.backends.vllm import VLLMBackend

    return VLLMBackend(cfg, model_name, trust_remote_code)
