"""The OpenAI-shaped replies of ``rcsd serve``: choices (stop sequences applied; log-probs of the generated tokens,
with ``echo`` of the prompt's too, vLLM's ``prompt_logprobs``), usage, and the same reply as server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from rcsd_cli.backends.serve_requests import CompletionRequest, Parsed
from rcsd_cli.modeling.generation import Generation
from rcsd_cli.modeling.logprobs import TokenLogprobs, token_logprobs

if TYPE_CHECKING:
    from rcsd_cli.backends.server import ServerState


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


