"""Options shared by several subcommands, so every stage spells them the same way."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from rcsd_cli.models import DEFAULT_MODEL
from rcsd_cli.schemas import GenerationConfig

Output = Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")]
Model = Annotated[str, typer.Option("--model", help="HF model id, local folder, or the embedded default.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use at most N problems.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffles).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="0 = no top-k filtering.")]
BatchSize = Annotated[int, typer.Option("--gen-batch-size", min=1, help="Prompts per generation batch.")]
Thinking = Annotated[Optional[bool], typer.Option("--thinking/--no-thinking", help="enable_thinking for chat "
                                                  "templates that have it (default: the template's own).")]

BackendKind = Annotated[str, typer.Option("--backend", help="hf (default), vllm or openai.",
                                          rich_help_panel="Backend")]
BaseUrl = Annotated[Optional[str], typer.Option("--base-url", help="openai: server URL, e.g. "
                                                "http://127.0.0.1:8000/v1", rich_help_panel="Backend")]
ServedModel = Annotated[Optional[str], typer.Option("--served-model", help="openai: model name on the server.",
                                                    rich_help_panel="Backend")]
ApiKeyEnv = Annotated[str, typer.Option("--api-key-env", help="Environment variable with the API key.",
                                        rich_help_panel="Backend")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="openai: requests in flight.",
                                          rich_help_panel="Backend")]
MaxRetries = Annotated[int, typer.Option("--max-retries", min=0, help="openai: retries per request.",
                                         rich_help_panel="Backend")]
Timeout = Annotated[float, typer.Option("--request-timeout", help="openai: seconds per request.",
                                        rich_help_panel="Backend")]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", min=1, help="vllm: GPUs per engine.",
                                             rich_help_panel="Backend")]
MemoryShare = Annotated[Optional[float], typer.Option("--memory-utilization", min=0.01, max=1.0,
                                                      help="vllm: share of GPU (or CPU) memory to reserve.",
                                                      rich_help_panel="Backend")]

DEFAULT = DEFAULT_MODEL


# The "Backend" panel: (parameter, annotated type, default). Commands get them via ``with_backend_options``.
_BACKEND_FLAGS = (
    ("backend_kind", BackendKind, "hf"), ("base_url", BaseUrl, None), ("served_model", ServedModel, None),
    ("api_key_env", ApiKeyEnv, "OPENAI_API_KEY"), ("concurrency", Concurrency, 8), ("max_retries", MaxRetries, 5),
    ("request_timeout", Timeout, 300.0), ("tensor_parallel_size", TensorParallel, 1),
    ("memory_utilization", MemoryShare, None),
)


def backend_config(backend_kind: str = "hf", base_url: str | None = None, served_model: str | None = None,
                   api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, max_retries: int = 5,
                   request_timeout: float = 300.0, tensor_parallel_size: int = 1,
                   memory_utilization: float | None = None):
    from rcsd_cli.schemas import BackendConfig

    check_choice("--backend", backend_kind, ("hf", "vllm", "openai"))
    return BackendConfig(kind=backend_kind, base_url=base_url, served_model=served_model, api_key_env=api_key_env,
                         concurrency=concurrency, max_retries=max_retries, timeout_s=request_timeout,
                         tensor_parallel_size=tensor_parallel_size, memory_utilization=memory_utilization)


def with_backend_options(command):
    """Give a Typer command the backend flags; it receives them as one ``backend: BackendConfig``.

    Typer reads a command's options from its signature, so the wrapper's signature is the
    command's minus ``backend``, plus one parameter per flag (placed before ``overwrite``).
    """
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "backend"]
    at = next((i for i, p in enumerate(kept) if p.name == "overwrite"), len(kept))
    flags = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
             for name, kind, default in _BACKEND_FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        chosen = {name: kwargs.pop(name) for name, _, _ in _BACKEND_FLAGS}
        return command(**kwargs, backend=backend_config(**chosen))

    wrapper.__signature__ = signature.replace(parameters=kept[:at] + flags + kept[at:])
    return wrapper


def gen_config(max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int,
               thinking: bool | None = None) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            batch_size=batch_size, enable_thinking=thinking)


def example(text: str) -> str:
    """Help epilog with a usage example (rich markup keeps the line breaks)."""
    return f"[bold]Example[/bold]\n\n  {text}"


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    from rcsd_cli.errors import RcsdError

    if value not in allowed:
        raise RcsdError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
