"""``rcsd serve``: an OpenAI-compatible server (FastAPI + uvicorn) around rcsd's own decoding.

Serves ``/v1/completions`` (text, token ids or a batch of prompts; ``n``, ``stop``, ``logprobs``, ``echo``,
vLLM's ``prompt_logprobs``, ``stream``), ``/v1/chat/completions``, ``/v1/models``, ``/health`` and ``/ready``, so
any stage's ``--backend openai``, the ``openai`` SDK or lm-eval's ``local-completions`` can use a model loaded once,
e.g. as a shared judge. Requests are validated, bounded, and those waiting are decoded together
(``rcsd_cli/backends/server.py``): it is meant for judges, evaluation, tests and small fleets, not as a
replacement for vLLM's server.
"""

from __future__ import annotations

from rcsd_cli.commands.common import stage_command
from rcsd_cli.configs.serve import ServeConfig


def _serve(cfg: ServeConfig, *, trust_remote_code: bool = False):
    # imported when the server starts: --help never loads torch
    from rcsd_cli.backends.server import serve

    serve(cfg, trust_remote_code)


command = stage_command(ServeConfig, _serve, output=None, doc="Serve a model over an OpenAI-compatible HTTP API "
                        "(completions, chat, log-probs, streaming), refusing bad requests with one-line 400s.")
