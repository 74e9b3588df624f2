"""Multiple-choice scoring by log-likelihood, equal to lm-evaluation-harness's own tasks.

Each bench has the protocol of the lm-eval task users compare with (0.4.13's task YAMLs): the
context text, the continuations (each after a single space) and which of them is gold:

- ``arc-easy``/``arc-challenge`` (``arc_easy``/``arc_challenge``): ``Question: {question}\nAnswer:``,
  the choice texts;
- ``sciq`` (``sciq``): ``{support}\nQuestion: {question}\nAnswer:``, the choice texts;
- ``openbookqa`` (``openbookqa``): the bare question stem, the choice texts;
- ``mmlu-stem`` (``mmlu_<subject>``, group ``mmlu_stem``): the subject's description, then
  ``--num-fewshot`` worked examples from the subject's dev split (the first ones), then the
  question with its choices listed as ``A. ...`` lines and ``Answer:``; the continuations are the
  letters.

Any other multiple-choice data (``gpqa``, ``rubric`` files) uses the ARC template; it has no
published lm-eval protocol to match. ``acc`` takes the best summed log-probability, ``acc_norm``
the best sum per character of the continuation (lm-eval's length normalisation). Context and
continuation are tokenised the way lm-eval does for Hugging Face models: trailing spaces of the
context move to the continuation, the pair is encoded whole and the continuation is what follows
the context's own tokens. The mean log-probability of the gold choice is a continuous metric that
moves before accuracy does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rcsd_cli.data.inputs import LETTERS
from rcsd_cli.data.rows import Problem


def _arc(problem: Problem, shots: list[Problem]) -> str:
    return f"Question: {problem.question}\nAnswer:"


def _sciq(problem: Problem, shots: list[Problem]) -> str:
    return f"{(problem.metadata.get('support') or '').lstrip()}\nQuestion: {problem.question}\nAnswer:"


def _stem(problem: Problem, shots: list[Problem]) -> str:
    return problem.question


def _mmlu_question(problem: Problem) -> str:
    listed = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(problem.choices or []))
    return f"{problem.question.strip()}{listed}\nAnswer:"


def _mmlu(problem: Problem, shots: list[Problem]) -> str:
    subject = str(problem.metadata.get("subject", "")).replace("_", " ")
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    examples = "".join(f"{_mmlu_question(s)} {s.answer}\n\n" for s in shots)
    return description + examples + _mmlu_question(problem)


@dataclass(frozen=True)
class Protocol:
    name: str                                          # the lm-eval task it equals, or "rcsd-generic"
    version: str                                       # that task's metadata version
    context: Callable[[Problem, list[Problem]], str]   # (problem, few-shot examples) -> context text
    letters: bool = False                              # continuations are the letters, not the choice texts

    def continuations(self, problem: Problem) -> list[str]:
        choices = problem.choices or []  # loglik scores multiple-choice items only
        return list(LETTERS[: len(choices)]) if self.letters else list(choices)


PROTOCOLS = {p.name: p for p in (  # by the lm-eval task each equals; benchmarks.BENCHMARKS says which bench uses which
    Protocol("arc_easy", "1.0", _arc),
    Protocol("arc_challenge", "1.0", _arc),
    Protocol("sciq", "1.0", _sciq),
    Protocol("openbookqa", "1.0", _stem),
    Protocol("mmlu_stem", "mmlu 1.0, group 2", _mmlu, letters=True),
)}
GENERIC = Protocol("rcsd-generic", "1", _arc)


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


def choice_requests(tok, problems: list[Problem], protocol: Protocol,
                    shots: Callable[[Problem], list[Problem]] | None = None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for every choice of every problem, in order."""
    pairs = []
    for p in problems:
        context = protocol.context(p, shots(p) if shots else [])
        for cont in protocol.continuations(p):
            ctx, ids = encode_pair(tok, context, " " + cont)
            pairs.append((ctx or [tok.bos_token_id or tok.eos_token_id], ids))
    return pairs


def choice_logprobs(engine, problems: list[Problem], protocol: Protocol, batch_size: int = 16, shots=None,
                    on_done=None) -> list[list[float]]:
    """Per problem, the summed log-probability of each continuation, from a backend that scores tokens."""
    sums = engine.continuation_logprobs(choice_requests(engine.tokenizer, problems, protocol, shots), batch_size,
                                        on_done)
    return per_problem(sums, problems)


def per_problem(sums: list[float], problems: list[Problem]) -> list[list[float]]:
    """Pair sums (in ``choice_requests`` order) regrouped as one list of choice scores per problem."""
    out, k = [], 0
    for p in problems:
        n = len(p.choices or [])
        out.append(sums[k: k + n])
        k += n
    return out


def grade(problem: Problem, scores: list[float], protocol: Protocol = GENERIC) -> dict:
    """acc, acc_norm (per character of each continuation) and the gold choice's log-probability."""
    gold = LETTERS.index(problem.answer) if problem.answer else None
    best = pick(scores)
    best_norm = pick(scores, [len(c) for c in protocol.continuations(problem)])
    return {"prediction": LETTERS[best], "acc": None if gold is None else float(best == gold),
            "acc_norm": None if gold is None else float(best_norm == gold),
            "gold_logprob": None if gold is None else scores[gold]}
