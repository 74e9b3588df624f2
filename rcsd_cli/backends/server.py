"""The HTTP server behind ``rcsd serve``: OpenAI-compatible, on FastAPI and uvicorn, strict about what it accepts.

Endpoints: ``/v1/completions`` (a prompt as text or token ids, or a batch of them), ``/v1/chat/completions``,
``/v1/models``, ``/health`` (the process answers) and ``/ready`` (the decoding worker runs and the queue has
room). A completion may ask for ``n`` choices, ``stop`` sequences, ``logprobs`` (the chosen token's and the top
entries at every generated token), ``echo`` (with ``logprobs``: the prompt's log-probs too, what lm-eval's
``local-completions`` scores with), vLLM's ``prompt_logprobs``, ``return_token_ids`` and ``stream`` (server-sent
events). Log-probs are at temperature 1, from one forward pass over prompt and completion.

Every request is validated before it reaches the model (types, ranges, token ids inside the vocabulary, prompt
plus ``max_tokens`` inside the context) and refused with a 400 whose message is one line naming the field, as
vLLM and OpenAI answer. Requests are decoded together: one worker owns the model and takes every request waiting
into its next batch (``Batcher``); at most ``max_queue`` may be running or waiting, the next gets a 503 with
``Retry-After`` instead of stalling. A request that fails anyway gets a 500 with one line; the console shows one
line too (the traceback only with ``RCSD_DEBUG=1``). With ``--api-key-env NAME`` a request needs
``Authorization: Bearer`` and the value of that variable (never printed). The fault tests' hook:
``RCSD_SERVE_EXIT_AFTER=N`` makes the process die abruptly after its N-th answer (not an option: no user wants it).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import queue
import socket
import sys
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from rcsd_cli.backends.serve_replies import build_reply, stream_events
from rcsd_cli.backends.serve_requests import BadRequest, Parsed, RequestChecker, first_line
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.serve import ServeConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.generation import generate, item_seed
from rcsd_cli.models import load_model

MAX_BODY_BYTES = 32 * 2**20
EXIT_AFTER_ENV = "RCSD_SERVE_EXIT_AFTER"  # fault tests: die abruptly after N answers


class ServerState:
    """The loaded model, the limits every request is checked against, and the worker that decodes."""

    def __init__(self, model, tokenizer, cfg: ServeConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.name = cfg.served_name or cfg.model
        self.requests = RequestChecker(tokenizer, cfg, model.get_input_embeddings().num_embeddings,
                                       getattr(model.config, "max_position_embeddings", None))
        self.batcher = Batcher(model, tokenizer, cfg.batch_rows)
        self.slots = threading.BoundedSemaphore(cfg.max_queue)
        self.exit_after = int(os.environ.get(EXIT_AFTER_ENV) or 0)
        self.served = 0
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not self.api_key:
            raise RcsdError(f"--api-key-env {cfg.api_key_env}: that environment variable is unset or empty")


    async def answer(self, parsed: Parsed) -> dict:
        """Decode every prompt's ``n`` choices and build the OpenAI-shaped reply; both run on the batcher's
        worker (log-probs are a forward pass of the model it owns), the event loop only waits."""
        req = parsed.req
        futures = [self.batcher.submit(ids, self.requests.generation_config(len(ids), req), req.seed or 0, req.n)
                   for ids in parsed.prompts]
        per_prompt = [await asyncio.wrap_future(f) for f in futures]
        reply = await asyncio.wrap_future(self.batcher.call(build_reply, self, parsed, per_prompt))
        self.served += 1
        return reply


@dataclass
class _Job:
    prompt: list[int]
    cfg: GenerationConfig
    seed: int
    n: int
    future: Future


@dataclass
class _Call:
    fn: Any
    args: tuple
    future: Future


class Batcher:
    """One worker thread owns the model: it takes every request waiting, groups those with the same sampling
    settings, and decodes each group in one continuously batched ``generate`` call of up to ``rows`` rows
    (one token limit per request). Completion i of a prompt draws from ``item_seed(seed, i)``, as it would
    alone, so an answer does not depend on what it was batched with."""

    def __init__(self, model, tokenizer, rows: int):
        self.model, self.tokenizer, self.rows = model, tokenizer, rows
        self._waiting: queue.Queue[_Job | _Call] = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True, name="rcsd-serve-batcher")
        self.worker.start()

    def submit(self, prompt: list[int], cfg: GenerationConfig, seed: int, n: int) -> Future:
        """``n`` completions of ``prompt``, decoded with whatever else is waiting."""
        job = _Job(prompt, cfg, seed, n, Future())
        self._waiting.put(job)
        return job.future

    def call(self, fn, *args) -> Future:
        """``fn(*args)`` on the worker, after the decoding waiting before it (work that runs the model)."""
        call = _Call(fn, args, Future())
        self._waiting.put(call)
        return call.future

    def _work(self) -> None:
        while True:
            waiting = [self._waiting.get()]
            while not self._waiting.empty():
                waiting.append(self._waiting.get_nowait())
            groups: dict[str, list[_Job]] = {}
            for job in waiting:
                if isinstance(job, _Job):
                    groups.setdefault(job.cfg.model_dump_json(exclude={"max_new_tokens", "batch_size"}),
                                      []).append(job)
            for group in groups.values():
                self._run(group)
            for call in waiting:
                if isinstance(call, _Call):
                    try:
                        call.future.set_result(call.fn(*call.args))
                    except Exception as exc:
                        call.future.set_exception(exc)

    def _run(self, jobs: list[_Job]) -> None:
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        seeds = [item_seed(job.seed, i) for job in jobs for i in range(job.n)]
        limits = [job.cfg.max_new_tokens for job in jobs for _ in range(job.n)]
        cfg = jobs[0].cfg.model_copy(update={"max_new_tokens": max(limits), "batch_size": self.rows})
        try:
            gens = generate(self.model, self.tokenizer, prompts, cfg, 0, seeds=seeds, limits=limits)
        except Exception as exc:  # every request of the group gets the failure
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            job.future.set_result(gens[start:start + job.n])
            start += job.n


# ----------------------------------------------------------------------------- the app


def _debug() -> bool:
    return bool(os.environ.get("RCSD_DEBUG"))


def log_failure(what: str, exc: BaseException) -> None:
    """One line on the console; the traceback only with RCSD_DEBUG=1."""
    print(f"rcsd serve: {what}: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


def error(code: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(code, "internal_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, code,
                        headers=headers)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``'s model."""
    app = FastAPI(title="rcsd serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error(exc.status_code, f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                     else str(exc.detail))

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if not state.batcher.worker.is_alive():
            return error(503, "the decoding worker has stopped")
        return JSONResponse({"status": "ready", "model": state.name})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.name, "object": "model", "owned_by": "rcsd"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(state, request, chat=True)

    return app


def refused_at_the_door(state: ServerState, request: Request) -> Response | None:
    """A wrong key or an unusable body length, answered before the body is read."""
    if state.api_key is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)")
    length = request.headers.get("content-length") or "0"
    if not length.isdigit():
        return error(400, f"bad Content-Length {length[:20]!r}")
    if int(length) > MAX_BODY_BYTES:
        return error(413, f"body of {length} bytes is over {MAX_BODY_BYTES}")
    return None


async def handle(state: ServerState, request: Request, chat: bool) -> Response:
    """One completion or chat request: checked, queued (or refused when the queue is full), answered."""
    refused = refused_at_the_door(state, request)
    if refused is not None:
        return refused
    try:
        parsed = state.requests.parse(await request.body(), chat)
    except BadRequest as exc:
        return error(exc.status, str(exc), exc.param)
    if not state.slots.acquire(blocking=False):
        return error(503, f"server busy: {state.cfg.max_queue} requests running or waiting (--max-queue); "
                     "retry later", headers={"Retry-After": "1"})
    try:
        reply = await state.answer(parsed)
    except Exception as exc:  # a bug or the machine, not the request: say so in one line
        log_failure(f"500 on {request.url.path}", exc)
        return error(500, f"internal error: {type(exc).__name__}: {first_line(exc)}")
    finally:
        state.slots.release()
    due = state.exit_after and state.served >= state.exit_after
    exit_hook = BackgroundTask(_exit, state.served) if due else None
    if parsed.req.stream:
        return StreamingResponse(stream_events(reply, parsed), media_type="text/event-stream", background=exit_hook)
    return JSONResponse(reply, background=exit_hook)


def _exit(served: int) -> None:
    print(f"rcsd serve: exiting after {served} requests ({EXIT_AFTER_ENV})", file=sys.stderr, flush=True)
    os._exit(3)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one): the address is known, and connections wait in its backlog, before
    the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                                         lifespan="off"))


def serve(cfg: ServeConfig, trust_remote_code: bool = False) -> None:
    loaded = load_model(cfg.model, trust_remote_code)
    state = ServerState(loaded.model, loaded.tokenizer, cfg)
    sock = bound_socket(cfg.host, cfg.port)
    print(f"rcsd serve: listening on http://{cfg.host}:{sock.getsockname()[1]}/v1 (model {state.name})",
          file=sys.stderr, flush=True)
    try:
        uvicorn_server(create_app(state)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
