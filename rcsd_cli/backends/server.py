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
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.serve import ServeConfig
from rcsd_cli.errors import RcsdError, describe_validation_error
from rcsd_cli.modeling.generation import Generation, generate, item_seed
from rcsd_cli.modeling.logprobs import TokenLogprobs, token_logprobs
from rcsd_cli.models import load_model

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 32 * 2**20
EXIT_AFTER_ENV = "RCSD_SERVE_EXIT_AFTER"  # fault tests: die abruptly after N answers


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are ignored (as vLLM does), known ones checked strictly."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: off (vLLM spells it -1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    return_token_ids: bool = False
    skip_special_tokens: bool = True

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class CompletionRequest(_Request):
    prompt: Any = Field(description="A string, a list of token ids, or a batch of either.")
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's: the top entries at every prompt token


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` with one line naming the field ``param``."""

    def __init__(self, param: str | None, message: str, status: int = 400, *, line: str | None = None):
        super().__init__(line or (f"field '{param}': {message}" if param else message))
        self.param, self.status = param, status


@dataclass
class Parsed:
    """A validated request: its prompts' token ids and what it asked for."""

    prompts: list[list[int]]
    req: CompletionRequest | ChatRequest
    chat: bool

    @property
    def top(self) -> int | None:
        """Top entries per generated token, when log-probs were asked for."""
        if isinstance(self.req, ChatRequest):
            return (self.req.top_logprobs or 0) if self.req.logprobs else None
        return self.req.logprobs


class ServerState:
    """The loaded model, the limits every request is checked against, and the worker that decodes."""

    def __init__(self, model, tokenizer, cfg: ServeConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.name = cfg.served_name or cfg.model
        self.vocab = model.get_input_embeddings().num_embeddings
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.batcher = Batcher(model, tokenizer, cfg.batch_rows)
        self.slots = threading.BoundedSemaphore(cfg.max_queue)
        self.exit_after = int(os.environ.get(EXIT_AFTER_ENV) or 0)
        self.served = 0
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not self.api_key:
            raise RcsdError(f"--api-key-env {cfg.api_key_env}: that environment variable is unset or empty")

    def parse(self, body: bytes, chat: bool) -> Parsed:
        """Validate a request body, or raise BadRequest."""
        try:
            raw = json.loads(body or b"{}")
        except ValueError:
            raise BadRequest(None, "body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise BadRequest(None, "body must be a JSON object")
        try:
            req = (ChatRequest if chat else CompletionRequest).model_validate(raw)
        except ValidationError as exc:
            param = ".".join(map(str, exc.errors()[0]["loc"])) or None
            raise BadRequest(param, "", line=describe_validation_error(exc)) from None
        if req.n > self.cfg.max_n:
            raise BadRequest("n", f"at most {self.cfg.max_n} completions per request (--max-n), got {req.n}")
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            asked = getattr(req, name, None)
            if isinstance(asked, int) and not isinstance(asked, bool) and asked > self.cfg.max_logprobs:
                raise BadRequest(name, f"at most {self.cfg.max_logprobs} (--max-logprobs), got {asked}")
        if isinstance(req, ChatRequest):
            prompts = [self._chat_prompt(req)]
        else:
            prompts = self._completion_prompts(req.prompt)
        for i, ids in enumerate(prompts):
            self._check_lengths(len(ids), req, "prompt" if len(prompts) == 1 else f"prompt.{i}")
        return Parsed(prompts, req, chat)

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                           add_generation_prompt=True)
        except Exception as exc:  # the model's own template rejects the conversation
            raise BadRequest("messages", f"the chat template refused them: {first_line(exc, 120)}") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def _completion_prompts(self, prompt) -> list[list[int]]:
        """A prompt is a string or a list of token ids; a batch is a non-empty list of either."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [self._one_prompt(p, f"prompt.{i}") for i, p in enumerate(prompt)]
        return [self._one_prompt(prompt, "prompt")]

    def _one_prompt(self, prompt, field: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest(field, "empty prompt")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest(field, "must be a non-empty string or a non-empty list of token ids")
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise BadRequest(f"{field}.{i}", f"token ids must be integers, got {type(t).__name__}")
            if not 0 <= t < self.vocab:
                raise BadRequest(f"{field}.{i}", f"token id {t} is outside the vocabulary (0..{self.vocab - 1})")
        return prompt

    def _check_lengths(self, prompt_len: int, req: _Request, field: str) -> None:
        limit = self.cfg.max_tokens_limit
        asked = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
        if limit is not None and asked > limit:
            raise BadRequest("max_tokens", f"at most {limit} (--max-tokens-limit), got {asked}")
        if self.context is None:
            return
        if prompt_len >= self.context:
            raise BadRequest(field, f"{prompt_len} tokens; this model's context is {self.context} tokens")
        if req.max_tokens is not None and prompt_len + asked > self.context:
            raise BadRequest("max_tokens", f"this model's context is {self.context} tokens: the prompt has "
                             f"{prompt_len} and max_tokens asks for {asked}")

    def generation_config(self, prompt_len: int, req: _Request) -> GenerationConfig:
        room = self.context - prompt_len if self.context else DEFAULT_MAX_TOKENS  # default max_tokens: what fits
        return GenerationConfig(max_new_tokens=req.max_tokens or min(DEFAULT_MAX_TOKENS, room),
                                temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k))

    async def answer(self, parsed: Parsed) -> dict:
        """Decode every prompt's ``n`` choices and build the OpenAI-shaped reply; both run on the batcher's
        worker (log-probs are a forward pass of the model it owns), the event loop only waits."""
        req = parsed.req
        futures = [self.batcher.submit(ids, self.generation_config(len(ids), req), req.seed or 0, req.n)
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


# ----------------------------------------------------------------------------- replies


def apply_stop(gen: Generation, stops: list[str], tokenizer) -> Generation:
    """``gen`` cut before the first stop sequence in its text (finish_reason "stop"); its token ids cut to the
    shortest prefix whose text reaches that sequence's end, as an engine that stops there would have."""
    found = [(gen.text.find(s), s) for s in stops if s in gen.text]
    if not found:
        return gen
    at, stop = min(found)
    end = at + len(stop)
    ids = gen.token_ids
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= end:
            ids = ids[:k]
            break
    return Generation(ids, gen.text[:at], "stop")


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, ids: list[int], lp: list[float | None], tops: list[list[tuple[int, float]] | None],
                        offset: int = 0) -> dict:
    """The completions API's ``logprobs`` object over ``ids`` (tokens, their log-probs, top entries, offsets)."""
    tokens = [_piece(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lp, "text_offset": offsets,
            "top_logprobs": [None if top is None else {_piece(tokenizer, i): v for i, v in top} for top in tops]}


def _scored(state: ServerState, prompt: list[int], completion: list[int], k: int) -> TokenLogprobs:
    """Log-probs of every token after the first: the prompt's rest, then the completion."""
    (out,) = token_logprobs(state.model, [prompt[:1]], [prompt[1:] + completion], k, state.tokenizer.pad_token_id)
    return out


def _choice(state: ServerState, parsed: Parsed, index: int, prompt: list[int], gen: Generation) -> dict:
    req, tok = parsed.req, state.tokenizer
    top = parsed.top
    echo = isinstance(req, CompletionRequest) and req.echo
    prompt_k = req.prompt_logprobs if isinstance(req, CompletionRequest) else None
    scored = None
    if top is not None or prompt_k is not None:
        scored = _scored(state, prompt, gen.token_ids, max(top or 0, prompt_k or 0))
    choice: dict[str, Any] = {"index": index, "finish_reason": gen.finish_reason}
    n_prompt = len(prompt) - 1  # scored positions that are prompt tokens
    if parsed.chat:
        choice["message"] = {"role": "assistant", "content": gen.text}
        if scored is not None and top is not None:
            choice["logprobs"] = {"content": [
                {"token": _piece(tok, t), "logprob": lp, "bytes": list(_piece(tok, t).encode()),
                 "top_logprobs": [{"token": _piece(tok, i), "logprob": v, "bytes": list(_piece(tok, i).encode())}
                                  for i, v in zip(ids[:top], vals[:top], strict=True)]}
                for t, lp, ids, vals in zip(gen.token_ids, scored.logprob[n_prompt:], scored.top_ids[n_prompt:],
                                            scored.top[n_prompt:], strict=True)]}
        else:
            choice["logprobs"] = None
        return choice
    prompt_text = tok.decode(prompt, skip_special_tokens=True) if echo else ""
    choice["text"] = prompt_text + gen.text
    choice["logprobs"] = None
    if scored is not None and top is not None:
        pairs = [list(zip(i[:top], v[:top], strict=True)) for i, v in zip(scored.top_ids, scored.top, strict=True)]
        if echo:
            ids = prompt + gen.token_ids
            lps: list[float | None] = [None, *scored.logprob]
            tops: list[Any] = [None, *pairs]
        else:
            ids, lps, tops = gen.token_ids, list(scored.logprob[n_prompt:]), pairs[n_prompt:]
        choice["logprobs"] = completion_logprobs(tok, ids, lps, tops)
    if scored is not None and prompt_k is not None:
        choice["prompt_logprobs"] = [None] + [
            {str(t): {"logprob": lp, "rank": rank, "decoded_token": _piece(tok, t)},
             **{str(i): {"logprob": v, "rank": r + 1, "decoded_token": _piece(tok, i)}
                for r, (i, v) in enumerate(zip(ids_[:prompt_k], vals[:prompt_k], strict=True))}}
            for t, lp, rank, ids_, vals in zip(prompt[1:], scored.logprob, scored.rank, scored.top_ids, scored.top,
                                               strict=False)]
    if req.return_token_ids:
        choice["token_ids"] = gen.token_ids
        choice["prompt_token_ids"] = prompt
    return choice


def build_reply(state: ServerState, parsed: Parsed, per_prompt: list[list[Generation]]) -> dict:
    """The OpenAI-shaped reply: choice ``p * n + i`` is prompt p's completion i."""
    stops = parsed.req.stops()
    choices = []
    for p, (prompt, gens) in enumerate(zip(parsed.prompts, per_prompt, strict=True)):
        for i, gen in enumerate(gens):
            gen = apply_stop(gen, stops, state.tokenizer) if stops else gen
            choices.append(_choice(state, parsed, p * parsed.req.n + i, prompt, gen))
    completion_tokens = sum(len(g.token_ids) for gens in per_prompt for g in gens)
    prompt_tokens = sum(len(p) for p in parsed.prompts)
    return {"id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion" if parsed.chat else "text_completion", "created": int(time.time()),
            "model": state.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def stream_events(reply: dict, parsed: Parsed):
    """The reply as server-sent events: a chunk per choice (chat: the role first), its end, then ``[DONE]``.
    A batch decodes on the device without a host look per token, so each choice's text comes whole."""
    chat = parsed.chat
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": reply["id"], "object": kind, "created": reply["created"], "model": reply["model"]}

    def event(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    for c in reply["choices"]:
        if chat:
            yield event([{"index": c["index"], "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            yield event([{"index": c["index"], "delta": {"content": c["message"]["content"]},
                          "logprobs": c.get("logprobs"), "finish_reason": None}])
            yield event([{"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}])
        else:
            yield event([{**c, "finish_reason": None}])
            yield event([{"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}])
    if (parsed.req.stream_options or {}).get("include_usage"):
        yield event([], usage=reply["usage"])
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the app


def _debug() -> bool:
    return bool(os.environ.get("RCSD_DEBUG"))


def first_line(exc: BaseException, width: int = 160) -> str:
    return (str(exc).splitlines() or [""])[0][:width]


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
        parsed = state.parse(await request.body(), chat)
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
