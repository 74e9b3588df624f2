"""Client for OpenAI-compatible ``/v1/completions`` endpoints, built to survive a flaky server.

HTTP goes through the official ``openai`` SDK (connection pooling, timeouts, TLS, its error types); its own
retries are off, because rcsd's policy below also retries malformed bodies, counts failures across a whole
stage and stops every queued request at once when there are too many.

Prompts are sent as token ids (the server must accept ``prompt`` as a list of integers, as vLLM
and ``rcsd serve`` do) and ``return_token_ids`` asks for the completion's ids; a server that does
not return them gets its text re-tokenised locally (noted in the Sample's ``backend`` field as
``openai-retokenised``). The API key is read from an environment variable and never printed.

``topk_logprobs`` scores given tokens with vLLM's ``prompt_logprobs`` parameter (``vllm serve --max-logprobs K``,
``rcsd serve``): the server's top-k (ids, log-probs) at every position of prompt + continuation, one request
per pair with ``max_tokens`` 1. It is how a teacher on a server serves ``score --teacher-logprobs`` and
``train --teacher-base-url``.

Faults, and what each costs (docs/scaling.md, "Serving and judges", has the tested table):

- connection refused/reset, timeouts, truncated or non-JSON bodies, 408/409/429/5xx: retried up to
  ``max_retries`` times with exponential backoff and jitter; a ``Retry-After`` header (seconds or
  an HTTP date) is honoured, capped at ``MAX_RETRY_AFTER_S``;
- any other 4xx: the request is wrong, so it is not retried;
- a request that still fails is returned as a ``Generation`` with ``finish_reason="error"`` and
  its one-line reason; up to ``max_failures`` of them are allowed per backend, one more stops the
  run at once (queued requests are cancelled, backoff sleeps cut short) with one ``RcsdError`` line.
  Finished completions have already gone to ``on_done``, so a rerun resumes from them.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import openai

from rcsd_cli.configs.groups import BackendConfig, GenerationConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.generation import Generation, item_seed
from rcsd_cli.models import load_tokenizer
from rcsd_cli.ui import warn

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}  # as the OpenAI and vLLM clients retry
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
T = TypeVar("T")


class RequestFailed(Exception):
    """A request that failed for good; the message is one line."""


class _Aborted(Exception):
    """The run is stopping (too many failures): give up without counting another failure."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_choice(body: bytes) -> dict:
    """The first choice of a completions reply; ValueError names what is wrong with a malformed one."""
    try:
        reply = json.loads(body)
    except ValueError:
        raise ValueError(f"malformed reply (not JSON: {body[:40]!r})") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("malformed reply (no choices)")
    choice = choices[0]
    ids = choice.get("token_ids")
    if not isinstance(choice.get("text", ""), str) or (
            ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids))):
        raise ValueError("malformed reply (text or token_ids of the wrong type)")
    return choice


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    message = body.get("message", body) if isinstance(body, dict) else (body or exc.response.text)
    return " ".join(str(message).split())[:200]


def _network_reason(exc: openai.APIConnectionError) -> str:
    cause = exc.__cause__ or exc
    if isinstance(exc, openai.APITimeoutError):
        return "TimeoutError"
    text = str(cause).strip()
    return type(cause).__name__ + (f" ({text[:80]})" if text and type(cause).__name__ not in text else "")


class OpenAIBackend:
    def __init__(self, cfg: BackendConfig, model_name: str, trust_remote_code: bool = False):
        if not cfg.base_url:
            raise RcsdError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.name = "openai"
        self.served_model = cfg.served_model or model_name
        self.tokenizer = load_tokenizer(cfg.tokenizer or model_name, trust_remote_code)
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.url = cfg.base_url.rstrip("/") + "/completions"
        # retries are rcsd's own (see the module doc); without a key the SDK still sends a placeholder one
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=api_key or "none", max_retries=0,
                                    timeout=cfg.timeout_s)
        self.failed = 0  # requests that failed for good, over this backend's life
        self._stop = threading.Event()
        self._count = threading.Lock()

    def _post(self, payload: dict, read: Callable[[dict], Any] = lambda choice: choice) -> Any:
        """POST with retries; ``read`` of the reply's first choice (its ValueError: a malformed reply, retried),
        or RequestFailed."""
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            if self._stop.is_set():
                raise _Aborted
            wait = None
            try:
                reply = self.client.completions.with_raw_response.create(**payload)
                return read(parse_choice(reply.content))
            except openai.APIStatusError as exc:
                detail = _status_detail(exc)
                if exc.status_code not in RETRYABLE:
                    raise RequestFailed(f"HTTP {exc.status_code}: {detail} (not retried)") from None
                last = f"HTTP {exc.status_code}: {detail}"
                wait = retry_after_seconds(exc.response.headers.get("retry-after"))
            except ValueError as exc:  # a body that is not a completions reply (truncated, HTML, ...)
                last = str(exc)
            except openai.APIConnectionError as exc:  # refused, reset, cut short, timed out
                last = _network_reason(exc)
            if attempt + 1 < attempts:
                delay = min(self.cfg.backoff_s * 2 ** attempt, MAX_BACKOFF_S) * (1 + 0.25 * random.random())
                if wait is not None:
                    delay = max(delay, min(wait, MAX_RETRY_AFTER_S))
                if self._stop.wait(delay):
                    raise _Aborted
        raise RequestFailed(f"{last} (after {attempts} attempts)")

    def _one(self, prompt: list[int], cfg: GenerationConfig, seed: int) -> Generation:
        extra: dict = {"return_token_ids": True, "skip_special_tokens": True}
        if cfg.top_k:
            extra["top_k"] = cfg.top_k
        payload = {"model": self.served_model, "prompt": prompt, "max_tokens": cfg.max_new_tokens,
                   "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed, "extra_body": extra}
        choice = self._post(payload)
        text = choice.get("text", "")
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        ids = choice.get("token_ids")
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if finish == "stop" and self.tokenizer.eos_token_id is not None:
                ids = ids + [self.tokenizer.eos_token_id]
            self.name = "openai-retokenised"
        return Generation(list(ids), text, finish)

    def _counted(self, request: Callable[..., T], *args) -> T:
        """``request(*args)``, counting a failure in the worker itself so the next queued request already sees the
        stop."""
        try:
            return request(*args)
        except RequestFailed:
            with self._count:
                self.failed += 1
                if self.failed > self.cfg.max_failures:
                    self._stop.set()
            raise

    def generate(self, prompts, cfg, seed, on_done=None, seeds=None):
        """One completion per prompt; failed ones come back as ``finish_reason="error"`` (see module doc)."""
        seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
        results: list[Generation | None] = [None] * len(prompts)
        first, failed_here, answered = "", 0, 0
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self._counted, self._one, p, cfg, seeds[i] % 2**31): i
                       for i, p in enumerate(prompts)}
            for fut in as_completed(futures):
                i = futures[fut]
                if fut.cancelled():
                    continue
                try:
                    results[i] = fut.result()
                except _Aborted:
                    continue
                except RequestFailed as exc:
                    results[i] = Generation([], "", "error", error=str(exc))
                    failed_here += 1
                    first = first or str(exc)
                    if self._stop.is_set():
                        for other in futures:
                            other.cancel()
                    continue
                answered += 1
                if on_done:
                    on_done([i], [results[i]])
        if self._stop.is_set():
            raise RcsdError(f"{self.url}: {self.failed} request(s) failed after retries, more than --max-failures "
                            f"{self.cfg.max_failures} (first: {first}); {answered} answered in this call are kept, "
                            "rerun the same command to resume")
        if failed_here:
            warn(f"{failed_here} of {len(prompts)} requests to {self.url} failed after retries (first: {first}); "
                 "recorded as errors (--max-failures)")
        return results

    def topk_logprobs(self, prompts: list[list[int]], continuations: list[list[int]],
                      k: int) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """The server's top-k (ids, log-probs at temperature 1) at every continuation position, most likely first;
        one request per pair, ``concurrency`` at once. A request that fails after its retries stops the call with
        one ``RcsdError`` line: a continuation without its teacher cannot be used."""
        def one(prompt: list[int], continuation: list[int]):
            payload = {"model": self.served_model, "prompt": prompt + continuation, "max_tokens": 1,
                       "temperature": 0.0, "extra_body": {"prompt_logprobs": k}}
            return self._post(payload, lambda choice: prompt_topk(choice, len(prompt), len(continuation), k))

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = [pool.submit(one, p, c) for p, c in zip(prompts, continuations, strict=True)]
            try:
                rows = [f.result() for f in futures]
            except RequestFailed as exc:
                self._stop.set()  # the queued requests give up at once
                raise RcsdError(f"{self.url}: prompt log-probs (model {self.served_model!r}): {exc}") from None
            except _Aborted:  # another call on this backend failed first and stopped it
                raise RcsdError(f"{self.url}: prompt log-probs stopped: an earlier request failed") from None
        return [ids for ids, _ in rows], [lps for _, lps in rows]


def prompt_topk(choice: dict, start: int, length: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The top-k (ids, log-probs) of ``prompt_logprobs`` positions ``start .. start+length-1`` of a choice;
    ValueError for a malformed entry (retried), RequestFailed for a reply without enough of them (a server that
    does not take the parameter, or gives fewer entries: asking again would not help).

    vLLM's format: one entry per prompt token (the first None), a dict {token id: {logprob, rank, ...}} of the top
    entries plus the prompt's own token where it ranks lower; ranks pick the k (ties in log-prob included).
    """
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < start + length:  # a whole reply without them: not retried
        raise RequestFailed(f"the reply has {len(entries) if isinstance(entries, list) else 'no'} prompt_logprobs "
                            f"positions, expected {start + length}: the server must take vLLM's prompt_logprobs "
                            "parameter (vllm serve, rcsd serve) (not retried)")
    ids, lps = [], []
    for pos in range(start, start + length):
        at = entries[pos]
        if not isinstance(at, dict):
            raise ValueError(f"malformed reply (prompt_logprobs[{pos}] is not an object)")
        try:  # (rank, -log-prob, id): a server without ranks is ordered by log-prob alone
            ranked = sorted((v.get("rank") or 0, -float(v["logprob"]), int(t)) for t, v in at.items())
        except (TypeError, ValueError, KeyError, AttributeError):
            raise ValueError(f"malformed reply (prompt_logprobs[{pos}] entries)") from None
        if len(ranked) < k:
            raise RequestFailed(f"prompt_logprobs[{pos}] has {len(ranked)} entries, fewer than the {k} asked "
                                "(not retried)")
        ids.append([t for _, _, t in ranked[:k]])
        lps.append([-neg for _, neg, _ in ranked[:k]])
    return ids, lps
