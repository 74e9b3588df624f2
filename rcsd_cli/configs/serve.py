"""``rcsd serve``'s settings.
"""

from __future__ import annotations

from rcsd_cli.configs.groups import MODEL_HELP, ConfigModel
from rcsd_cli.data.options import opt
from rcsd_cli.models import DEFAULT_MODEL


class ServeConfig(ConfigModel):
    """``rcsd serve``: one model behind an OpenAI-compatible HTTP API, refusing what it cannot serve."""

    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    served_name: str | None = opt(None, panel="Model", help="Model name clients use (default --model).")
    host: str = opt("127.0.0.1", panel="Server", help="Interface to bind (loopback by default).")
    port: int = opt(8000, ge=0, le=65535, panel="Server", help="0 picks a free port.")
    max_tokens_limit: int | None = opt(None, ge=1, panel="Server", help="Largest max_tokens a request may ask "
                                       "for (default: the model's context length); above it: 400.")
    max_n: int = opt(64, ge=1, panel="Server", help="Largest n (completions per request); above it: 400.")
    max_queue: int = opt(64, ge=1, panel="Server", help="Requests running or waiting at once; one more gets 503 "
                         "with Retry-After instead of stalling.")
    batch_rows: int = opt(32, ge=1, panel="Server", help="Completions decoded at once: the requests waiting are "
                          "batched together (continuous batching; a finished row takes the next completion).")
    max_logprobs: int = opt(20, ge=0, panel="Server", help="Most top entries a request may ask for per token "
                            "(logprobs, top_logprobs, prompt_logprobs); above it: 400 (vLLM's --max-logprobs).")
    api_key_env: str | None = opt(None, panel="Server", help="Environment variable holding the API key clients "
                                  "must send (Authorization: Bearer KEY); unset: no key. The key is never printed.")

