"""``rcsd serve``: a small OpenAI-compatible server around the Hugging Face backend.

Serves ``/v1/completions`` (prompt as text or token ids, ``return_token_ids`` supported),
``/v1/chat/completions`` (the model's chat template), ``/v1/models`` and ``/health``, so any
stage's ``--backend openai`` — or another tool — can use a model loaded once, e.g. as a shared
judge. Requests are served one at a time (generation holds a lock): it is meant for judges,
tests and small fleets, not as a replacement for vLLM's server.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Optional

import typer

from rcsd_cli.commands import common as c
from rcsd_cli.generation import generate_batch
from rcsd_cli.schemas import GenerationConfig


class _State:
    def __init__(self, model, tokenizer, name: str, exit_after: int | None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()
        self.served = 0
        self.exit_after = exit_after


def _gen_config(body: dict) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=int(body.get("max_tokens") or 256),
                            temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                            top_k=max(0, int(body.get("top_k") or 0)), batch_size=16)


def make_handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: no request lines on stderr
            pass

        def _send(self, code: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def do_GET(self):
            if self.path.rstrip("/") in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": state.name, "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                cfg = _gen_config(body)
            except (ValueError, TypeError) as exc:
                return self._send(400, {"error": {"message": f"bad request: {exc}"}})
            tok = state.tokenizer
            if self.path.rstrip("/") == "/v1/completions":
                prompt = body.get("prompt")
                if isinstance(prompt, str):
                    ids = tok(prompt, add_special_tokens=True)["input_ids"]
                elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                    ids = prompt
                else:
                    return self._send(400, {"error": {"message": "prompt must be a string or a list of token ids"}})
                chat = False
            elif self.path.rstrip("/") == "/v1/chat/completions":
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    return self._send(400, {"error": {"message": "messages must be a non-empty list"}})
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                chat = True
            else:
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            n = max(1, int(body.get("n") or 1))
            seed = int(body.get("seed") or 0)
            with state.lock:
                gens = generate_batch(state.model, tok, [ids] * n, cfg, seed)
                state.served += 1
                served = state.served
            choices = []
            for i, g in enumerate(gens):
                choice = {"index": i, "finish_reason": g.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": g.text}
                else:
                    choice.update(text=g.text, logprobs=None)
                    if body.get("return_token_ids"):
                        choice["token_ids"] = g.token_ids
                choices.append(choice)
            usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(g.token_ids) for g in gens)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._send(200, {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else
                             "text_completion", "created": int(time.time()), "model": state.name, "choices": choices,
                             "usage": usage})
            if state.exit_after and served >= state.exit_after:
                print(f"rcsd serve: exiting after {served} requests (--exit-after)", file=sys.stderr, flush=True)
                os._exit(3)

    return Handler


def command(
    model: c.Model = c.DEFAULT,
    host: Annotated[str, typer.Option("--host", help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, help="0 picks a free port.")] = 8000,
    served_name: Annotated[Optional[str], typer.Option("--served-name", help="Model name clients use.")] = None,
    exit_after: Annotated[Optional[int], typer.Option("--exit-after", min=1, help="Die abruptly after N requests "
                                                      "(for failure testing).")] = None,
    trust_remote_code: c.TrustRemoteCode = False,
):
    """Serve a model over an OpenAI-compatible HTTP API (completions with token ids, chat, models)."""
    from rcsd_cli.models import load_model

    loaded = load_model(model, trust_remote_code)
    state = _State(loaded.model, loaded.tokenizer, served_name or model, exit_after)
    server = ThreadingHTTPServer((host, port), make_handler(state))
    print(f"rcsd serve: listening on http://{host}:{server.server_address[1]}/v1 (model {state.name})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
