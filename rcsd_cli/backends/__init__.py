"""Generation backends: the same prompt token ids in, the same completions out.

- ``hf`` (default): transformers in this process, batched with left padding.
- ``vllm``: vLLM's offline ``LLM`` engine (optional extra ``rcsd[vllm]``).
- ``openai``: any OpenAI-compatible ``/v1/completions`` endpoint (``rcsd serve``, vLLM's server, ...),
  with bounded concurrency, retries with backoff and timeouts.

Every backend returns ``Generation`` objects carrying completion token ids, so the artifacts a
stage writes have the same schema whichever backend produced them.
"""

from __future__ import annotations

from rcsd_cli.backends.base import Backend, open_backend

__all__ = ["Backend", "open_backend"]
