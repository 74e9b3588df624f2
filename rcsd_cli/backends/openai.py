"""Client for OpenAI-compatible ``/v1/completions`` endpoints.

Prompts are sent as token ids (the server must accept ``prompt`` as a list of integers, as vLLM
and ``rcsd serve`` do) and ``return_token_ids`` asks for the completion's ids; a server that does
not return them gets its text re-tokenised locally (noted in the Sample's ``backend`` field as
``openai-retokenised``). Requests run with bounded concurrency; 429, 5xx, connection errors and
timeouts are retried with exponential backoff; the API key is read from an environment variable
and never printed.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from rcsd_cli.errors import RcsdError
from rcsd_cli.generation import Generation
from rcsd_cli.schemas import BackendConfig, GenerationConfig

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class OpenAIBackend:
    def __init__(self, cfg: BackendConfig, model_name: str, trust_remote_code: bool = False):
        from rcsd_cli.models import load_tokenizer

        if not cfg.base_url:
            raise RcsdError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.name = "openai"
        self.served_model = cfg.served_model or model_name
        self.tokenizer = load_tokenizer(cfg.tokenizer or model_name, trust_remote_code)
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def _post(self, payload: dict) -> dict:
        url = self.cfg.base_url.rstrip("/") + "/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRYABLE:
                    body = exc.read().decode(errors="replace")[:200]
                    raise RcsdError(f"{url}: HTTP {exc.code}: {body}") from exc
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = type(getattr(exc, "reason", exc)).__name__
            if attempt < self.cfg.max_retries:
                time.sleep(min(self.cfg.backoff_s * 2 ** attempt, 30.0) * (1 + 0.25 * random.random()))
        raise RcsdError(f"{url}: request failed after {self.cfg.max_retries + 1} attempts ({last}); "
                        "finished rows are kept, rerun the same command to resume")

    def _one(self, prompt: list[int], cfg: GenerationConfig, seed: int) -> Generation:
        payload = {"model": self.served_model, "prompt": prompt, "max_tokens": cfg.max_new_tokens,
                   "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed, "return_token_ids": True,
                   "skip_special_tokens": True}
        if cfg.top_k:
            payload["top_k"] = cfg.top_k
        choice = self._post(payload)["choices"][0]
        text = choice.get("text", "")
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        ids = choice.get("token_ids")
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if finish == "stop" and self.tokenizer.eos_token_id is not None:
                ids = ids + [self.tokenizer.eos_token_id]
            self.name = "openai-retokenised"
        return Generation(list(ids), text, finish)

    def generate(self, prompts, cfg, seed, on_done=None, seeds=None):
        from rcsd_cli.generation import item_seed

        seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
        results: list[Generation | None] = [None] * len(prompts)
        failure: RcsdError | None = None
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self._one, p, cfg, seeds[i] % 2**31): i for i, p in enumerate(prompts)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except RcsdError as exc:
                    failure = failure or exc
                    continue
                if on_done:
                    on_done([i], [results[i]])
        if failure:
            raise failure
        return results
