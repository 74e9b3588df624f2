"""The HTTP server behind ``rcsd serve``: OpenAI-compatible, and strict about what it accepts.

Every request is validated before it reaches the model (types, ranges, token ids inside the
vocabulary, prompt plus ``max_tokens`` inside the context) and refused with a 400 whose message is
one line naming the field, as vLLM and OpenAI answer. Requests are
decoded together: one worker owns the model and takes every request waiting into its next batch
(``Batcher``); at most ``max_queue`` may be running or waiting, the next gets a 503 with
``Retry-After`` instead of stalling. A request that fails anyway gets a 500 with one line; the
console shows one line too (the traceback only with ``RCSD_DEBUG=1``). Nothing drops a connection
without an answer except a client that stops sending (read timeout) or the fault tests' hook:
``RCSD_SERVE_EXIT_AFTER=N`` makes the process die abruptly after N requests (not an option: no user wants it).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.serve import ServeConfig
from rcsd_cli.errors import describe_validation_error
from rcsd_cli.modeling.generation import Generation, generate, item_seed
from rcsd_cli.models import load_model

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 32 * 2**20
READ_TIMEOUT_S = 60  # a client that stops sending its body is dropped after this
EXIT_AFTER_ENV = "RCSD_SERVE_EXIT_AFTER"  # fault tests: die abruptly after N requests


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
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    # Features rcsd serve does not have: accepted only at their "off" value, refused otherwise.
    stream: bool = False
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None
    echo: bool = False


class CompletionRequest(_Request):
    prompt: Any = Field(description="A string or a list of token ids (one prompt per request).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` with one line naming the field ``param``."""

    def __init__(self, param: str | None, message: str, status: int = 400, *, line: str | None = None):
        super().__init__(line or (f"field '{param}': {message}" if param else message))
        self.param, self.status = param, status


def _unsupported(req: _Request) -> None:
    for field, off in (("stream", False), ("echo", False)):
        if getattr(req, field) != off:
            raise BadRequest(field, "not supported by rcsd serve")
    if req.stop:
        raise BadRequest("stop", "stop sequences are not supported by rcsd serve")
    if req.logprobs not in (None, False, 0):
        raise BadRequest("logprobs", "not supported by rcsd serve")


class ServerState:
    """The loaded model and the limits every request is checked against."""

    def __init__(self, model, tokenizer, cfg: ServeConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.name = cfg.served_name or cfg.model
        self.vocab = model.get_input_embeddings().num_embeddings
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.batcher = Batcher(model, tokenizer, cfg.batch_rows)
        self.slots = threading.BoundedSemaphore(cfg.max_queue)
        self.count_lock = threading.Lock()
        self.exit_after = int(os.environ.get(EXIT_AFTER_ENV) or 0)
        self.served = 0

    def prompt_ids(self, path: str, body: bytes) -> tuple[list[int], _Request, bool]:
        """Validate a request body: (prompt token ids, request, is chat) or BadRequest."""
        try:
            raw = json.loads(body or b"{}")
        except ValueError:
            raise BadRequest(None, "body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise BadRequest(None, "body must be a JSON object")
        chat = path == "/v1/chat/completions"
        try:
            req = (ChatRequest if chat else CompletionRequest).model_validate(raw)
        except ValidationError as exc:
            param = ".".join(map(str, exc.errors()[0]["loc"])) or None
            raise BadRequest(param, "", line=describe_validation_error(exc)) from None
        _unsupported(req)
        if req.n > self.cfg.max_n:
            raise BadRequest("n", f"at most {self.cfg.max_n} completions per request (--max-n), got {req.n}")
        tok = self.tokenizer
        if isinstance(req, ChatRequest):
            try:
                text = tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                               add_generation_prompt=True)
            except Exception as exc:  # the model's own template rejects the conversation
                raise BadRequest("messages", f"the chat template refused them: {first_line(exc, 120)}") from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self._completion_prompt(req.prompt)
        self._check_lengths(len(ids), req)
        return ids, req, chat

    def _completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("prompt", "empty prompt")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt", "must be a non-empty string or a non-empty list of token ids")
        if all(isinstance(p, (str, list)) for p in prompt):
            raise BadRequest("prompt", "batched prompts are not supported; send one prompt per request")
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise BadRequest(f"prompt.{i}", f"token ids must be integers, got {type(t).__name__}")
            if not 0 <= t < self.vocab:
                raise BadRequest(f"prompt.{i}", f"token id {t} is outside the vocabulary (0..{self.vocab - 1})")
        return prompt

    def _check_lengths(self, prompt_len: int, req: _Request) -> None:
        limit = self.cfg.max_tokens_limit
        asked = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
        if limit is not None and asked > limit:
            raise BadRequest("max_tokens", f"at most {limit} (--max-tokens-limit), got {asked}")
        if self.context is None:
            return
        if prompt_len >= self.context:
            raise BadRequest("prompt", f"{prompt_len} tokens; this model's context is {self.context} tokens")
        if req.max_tokens is not None and prompt_len + asked > self.context:
            raise BadRequest("max_tokens", f"this model's context is {self.context} tokens: the prompt has "
                             f"{prompt_len} and max_tokens asks for {asked}")

    def generation_config(self, prompt_len: int, req: _Request) -> GenerationConfig:
        room = self.context - prompt_len if self.context else DEFAULT_MAX_TOKENS  # default max_tokens: what fits
        return GenerationConfig(max_new_tokens=req.max_tokens or min(DEFAULT_MAX_TOKENS, room),
                                temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k))


@dataclass
class _Job:
    prompt: list[int]
    cfg: GenerationConfig
    seed: int
    n: int
    done: threading.Event = dataclass_field(default_factory=threading.Event)
    result: list[Generation] | None = None
    error: BaseException | None = None


class Batcher:
    """One worker thread owns the model: it takes every request waiting, groups those with the same sampling
    settings, and decodes each group in one continuously batched ``generate`` call of up to ``rows`` rows
    (one token limit per request). Completion i of a request draws from ``item_seed(seed, i)``, as it would
    alone, so a request's answer does not depend on what it was batched with."""

    def __init__(self, model, tokenizer, rows: int):
        self.model, self.tokenizer, self.rows = model, tokenizer, rows
        self._waiting: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="rcsd-serve-batcher").start()

    def submit(self, prompt: list[int], cfg: GenerationConfig, seed: int, n: int) -> list[Generation]:
        job = _Job(prompt, cfg, seed, n)
        self._waiting.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None  # the worker sets a result or an error before ``done``
        return job.result

    def _work(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            while not self._waiting.empty():
                jobs.append(self._waiting.get_nowait())
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.cfg.model_dump_json(exclude={"max_new_tokens", "batch_size"}), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        seeds = [item_seed(job.seed, i) for job in jobs for i in range(job.n)]
        limits = [job.cfg.max_new_tokens for job in jobs for _ in range(job.n)]
        cfg = jobs[0].cfg.model_copy(update={"max_new_tokens": max(limits), "batch_size": self.rows})
        try:
            gens = generate(self.model, self.tokenizer, prompts, cfg, 0, seeds=seeds, limits=limits)
        except Exception as exc:  # every request of the group gets the failure
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        start = 0
        for job in jobs:
            job.result, start = gens[start:start + job.n], start + job.n
            job.done.set()


def _debug() -> bool:
    return bool(os.environ.get("RCSD_DEBUG"))


def first_line(exc: BaseException, width: int = 160) -> str:
    return (str(exc).splitlines() or [""])[0][:width]


def log_failure(what: str, exc: BaseException) -> None:
    """One line on the console; the traceback only with RCSD_DEBUG=1."""
    print(f"rcsd serve: {what}: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)


def completion_payload(name: str, ids: list[int], req: _Request, chat: bool, gens) -> dict:
    """The OpenAI-shaped reply to one completion (or chat) request."""
    choices = []
    for i, g in enumerate(gens):
        choice = {"index": i, "finish_reason": g.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": g.text}
        else:
            choice.update(text=g.text, logprobs=None)
            if req.return_token_ids:
                choice["token_ids"] = g.token_ids
        choices.append(choice)
    usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(g.token_ids) for g in gens)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": choices, "usage": usage}


def read_body(headers, rfile) -> bytes:
    """A request's body, refused when its length is missing, malformed or over ``MAX_BODY_BYTES``."""
    length = headers.get("Content-Length") or "0"
    if not length.isdigit():
        raise BadRequest(None, f"bad Content-Length {length[:20]!r}")
    if int(length) > MAX_BODY_BYTES:
        raise BadRequest(None, f"body of {length} bytes is over {MAX_BODY_BYTES}", status=413)
    return rfile.read(int(length))


def make_handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT_S  # a stalled body read ends the connection instead of holding a thread

        def log_message(self, *args):  # quiet: no request lines on stderr
            pass

        def _send(self, code: int, payload: dict, headers: dict | None = None):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _error(self, code: int, message: str, param: str | None = None, headers: dict | None = None):
            kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                    503: "service_unavailable"}.get(code, "internal_error")
            self._send(code, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers)

        def do_GET(self):
            path = self.path.rstrip("/")
            if path in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            if path == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": state.name, "object": "model"}]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            path = self.path.rstrip("/")
            try:
                body = read_body(self.headers, self.rfile)
                if path not in ("/v1/completions", "/v1/chat/completions"):
                    return self._error(404, f"no route {self.path}")
                ids, req, chat = state.prompt_ids(path, body)
            except BadRequest as exc:
                return self._error(exc.status, str(exc), exc.param)
            if not state.slots.acquire(blocking=False):
                return self._error(503, f"server busy: {state.cfg.max_queue} requests running or waiting "
                                   "(--max-queue); retry later", headers={"Retry-After": "1"})
            try:
                payload, served = self._generate(ids, req, chat)
            except Exception as exc:  # a bug or the machine, not the request: say so in one line
                log_failure(f"500 on {path}", exc)
                return self._error(500, f"internal error: {type(exc).__name__}: {first_line(exc)}")
            finally:
                state.slots.release()
            self._send(200, payload)
            if state.exit_after and served >= state.exit_after:
                print(f"rcsd serve: exiting after {served} requests ({EXIT_AFTER_ENV})", file=sys.stderr, flush=True)
                os._exit(3)

        def _generate(self, ids: list[int], req: _Request, chat: bool) -> tuple[dict, int]:
            cfg = state.generation_config(len(ids), req)
            gens = state.batcher.submit(ids, cfg, req.seed or 0, req.n)
            with state.count_lock:
                state.served += 1
                served = state.served
            return completion_payload(state.name, ids, req, chat, gens), served

    return Handler


class Server(ThreadingHTTPServer):
    """Errors outside a handler (a client that hung up mid-reply) are one console line, not a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        log_failure(f"connection from {client_address[0]}:{client_address[1]}", sys.exc_info()[1])


def serve(cfg: ServeConfig, trust_remote_code: bool = False) -> None:
    loaded = load_model(cfg.model, trust_remote_code)
    state = ServerState(loaded.model, loaded.tokenizer, cfg)
    server = Server((cfg.host, cfg.port), make_handler(state))
    print(f"rcsd serve: listening on http://{cfg.host}:{server.server_address[1]}/v1 (model {state.name})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
