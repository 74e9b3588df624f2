"""What ``rcsd serve`` accepts: the request models of its two endpoints, and the checks every request passes before
the model sees it (types, ranges, token ids inside the vocabulary, prompt plus ``max_tokens`` inside the context),
each refusal one line naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.serve import ServeConfig
from rcsd_cli.errors import describe_validation_error

DEFAULT_MAX_TOKENS = 256


def first_line(exc: BaseException, width: int = 160) -> str:
    return (str(exc).splitlines() or [""])[0][:width]


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



class RequestChecker:
    """The limits every request is checked against: the server's options, the vocabulary and the context."""

    def __init__(self, tokenizer, cfg: ServeConfig, vocab: int, context: int | None):
        self.tokenizer, self.cfg, self.vocab, self.context = tokenizer, cfg, vocab, context

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
