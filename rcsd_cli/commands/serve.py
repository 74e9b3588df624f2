"""``rcsd serve``: a small OpenAI-compatible server around the Hugging Face backend.

Serves ``/v1/completions`` (prompt as text or token ids, ``return_token_ids`` supported),
``/v1/chat/completions`` (the model's chat template), ``/v1/models`` and ``/health``, so any
stage's ``--backend openai`` — or another tool — can use a model loaded once, e.g. as a shared
judge. Requests are validated, bounded, and those waiting are decoded together
(``rcsd_cli/backends/server.py``): it is meant for judges, tests and small fleets, not as a
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
                        "(completions with token ids, chat, models), refusing bad requests with one-line 400s.")
