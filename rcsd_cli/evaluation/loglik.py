"""Multiple-choice scoring by log-likelihood, following lm-evaluation-harness's protocol.

Each choice is a continuation of the context ``Question: {question}\\nAnswer:`` with a leading
space; its score is the sum of its tokens' log-probabilities under the model. ``acc`` takes the
best sum, ``acc_norm`` the best sum divided by the choice's length in characters (lm-eval's
length normalisation). Context and continuation are tokenised the way lm-eval does for Hugging
Face models: trailing spaces of the context move to the continuation, the pair is encoded whole
and the continuation is what follows the context's own tokens. The mean log-probability of the
gold choice is a continuous metric that moves before accuracy does.
"""

from __future__ import annotations

import torch

from rcsd_cli.data.inputs import LETTERS
from rcsd_cli.data.schemas import Problem
from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.modeling.logprobs import chunked_token_logprobs


def context_text(problem: Problem) -> str:
    return f"Question: {problem.question.strip()}\nAnswer:"


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def pick(scores: list[float], lengths: list[int] | None = None) -> int:
    """Index of the best choice: raw sums, or sums per character when ``lengths`` are given."""
    values = scores if lengths is None else [s / max(n, 1) for s, n in zip(scores, lengths, strict=True)]
    return max(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def choice_logprobs(model, tok, problems: list[Problem], batch_size: int = 16, on_done=None) -> list[list[float]]:
    """Per problem, the summed log-probability of each choice as a continuation of its context."""
    pairs = [(i, encode_pair(tok, context_text(p), " " + c)) for i, p in enumerate(problems) for c in p.choices]
    out: list[list[float]] = [[] for _ in problems]
    head = model.get_output_embeddings()
    for j in range(0, len(pairs), batch_size):
        part = pairs[j: j + batch_size]
        ctxs = [ctx or [tok.bos_token_id or tok.eos_token_id] for _, (ctx, _) in part]
        conts = [cont for _, (_, cont) in part]
        pb = build_pair_batch(ctxs, ctxs, conts, tok.pad_token_id)
        hidden = aligned_hidden(model, pb.student)
        logp = chunked_token_logprobs(hidden, head, pb.targets.to(hidden.device))
        sums = (logp * pb.mask.to(hidden.device)).sum(-1).tolist()
        for (i, _), s in zip(part, sums, strict=True):
            out[i].append(s)
        if on_done:  # items whose last choice was in this batch
            on_done(sum(1 for k, (i, _) in enumerate(part, start=j) if k + 1 == len(pairs) or pairs[k + 1][0] != i))
    return out


def grade(problem: Problem, scores: list[float]) -> dict:
    """acc, acc_norm and the gold choice's log-probability for one item."""
    gold = LETTERS.index(problem.answer) if problem.answer else None
    best = pick(scores)
    best_norm = pick(scores, [len(c) for c in problem.choices])
    return {"prediction": LETTERS[best], "acc": None if gold is None else float(best == gold),
            "acc_norm": None if gold is None else float(best_norm == gold),
            "gold_logprob": None if gold is None else scores[gold]}
