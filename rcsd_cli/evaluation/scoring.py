"""Rubric scoring: machine checks in code, other criteria by an LLM judge, never guessed.

Score (HealthBench convention): the sum of the weights of the criteria that were met
(pitfalls, with negative weight, subtract when met) divided by the sum of positive weights,
clipped to [0, 1]. Criteria that could not be judged are left out of both sums and counted
in ``n_unjudged``; when no positive criterion was judged the score is None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.data.rows import Check, Criterion, CriterionVerdict, Problem, Score
from rcsd_cli.evaluation.answers import answers_match, extract_answer
from rcsd_cli.rubrics.prompts import chat_prompt_ids, judge_message

JUDGE_REPLY = GenerationConfig(temperature=0.0, max_new_tokens=192)  # how a judge answers (greedy, short JSON)


def check_met(check: Check, completion: str, choices: list[str] | None) -> tuple[bool, str]:
    """Evaluate one machine check; returns (met, explanation)."""
    if check.kind == "answer_equals":
        pred = extract_answer(completion, choices)
        met = answers_match(pred, check.value, choices)
        return met, f"extracted answer {pred!r} vs {check.value!r}"
    if check.kind == "regex":
        met = re.search(check.value, completion, re.IGNORECASE | re.MULTILINE) is not None
        return met, f"pattern {'found' if met else 'not found'}"
    words = len(completion.split())
    return words <= int(check.value), f"{words} words (limit {check.value})"


def rubric_score(verdicts: list[CriterionVerdict]) -> tuple[float | None, float, float]:
    """(score, points met, positive points) over judged criteria."""
    judged = [v for v in verdicts if v.met is not None]
    possible = sum(v.weight for v in judged if v.weight > 0)
    met = sum(v.weight for v in judged if v.met)
    if possible <= 0:
        return None, met, possible
    return min(1.0, max(0.0, met / possible)), met, possible


def parse_judge_reply(text: str) -> tuple[bool, str] | None:
    """``(criteria_met, explanation)`` from the first JSON object in a reply, or None if malformed."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("criteria_met"), bool):
            return obj["criteria_met"], str(obj.get("explanation", ""))[:500]
        start = text.find("{", start + 1)
    return None


@dataclass
class JudgeRequest:
    key: tuple[str, str]  # (sample id, criterion id)
    problem: Problem
    completion: str
    criterion: Criterion


def score_completion(sample_id: str, problem: Problem, rubric: list[Criterion], completion: str,
                     judged: dict[str, tuple[bool | None, str]] | None = None) -> Score:
    """Combine check results and judge verdicts (by criterion id) into a Score row.

    A verdict ``(None, reason)`` is a criterion the judge was asked about but could not decide
    (malformed replies, a failed request): unjudged, with the reason, never counted as unmet."""
    judged = judged or {}
    verdicts = []
    for c in rubric:
        if c.check is not None:
            met, why = check_met(c.check, completion, problem.choices)
            verdicts.append(CriterionVerdict(criterion_id=c.id, weight=c.weight, met=met, method="check",
                                             explanation=why))
        elif c.id in judged and judged[c.id][0] is not None:
            verdict, why = judged[c.id]
            verdicts.append(CriterionVerdict(criterion_id=c.id, weight=c.weight, met=verdict, method="judge",
                                             explanation=why))
        else:
            verdicts.append(CriterionVerdict(criterion_id=c.id, weight=c.weight, met=None, method="unjudged",
                                             explanation=judged[c.id][1] if c.id in judged else "no judge"))
    score, points_met, possible = rubric_score(verdicts)
    pred = extract_answer(completion, problem.choices)
    correct = answers_match(pred, problem.answer, problem.choices) if problem.answer is not None else None
    return Score(sample_id=sample_id, problem_id=problem.id, verdicts=verdicts, score=score, points_met=points_met,
                 points_possible=possible, n_unjudged=sum(v.met is None for v in verdicts),
                 extracted_answer=pred, correct=correct)


def score_with_judge(judge, items: list[tuple[str, Problem, list[Criterion], str]], gen_cfg, retries: int,
                     seed: int, on_done=None, runner=None) -> list[Score]:
    """Score (sample id, problem, rubric, completion) tuples: checks in code, the other criteria by ``judge``
    (any backend; None leaves them unjudged)."""
    requests = [JudgeRequest((sid, cr.id), prob, text, cr) for sid, prob, rubric, text in items
                for cr in rubric if cr.check is None]
    verdicts = run_judge(judge, requests, gen_cfg, retries, seed, on_done, runner) if requests and judge else {}
    per_sample: dict[str, dict] = {}
    for (sid, cid), v in verdicts.items():
        per_sample.setdefault(sid, {})[cid] = v
    return [score_completion(sid, prob, rubric, text, per_sample.get(sid)) for sid, prob, rubric, text in items]


def run_judge(backend, requests: list[JudgeRequest], gen_cfg, retries: int, seed: int,
              on_done=None, runner=None) -> dict[tuple[str, str], tuple[bool | None, str]]:
    """Ask the judge (any backend) about each request: ``key -> (met, explanation)``.

    A malformed reply is asked again (``retries`` times, another seed each time), then left
    unjudged: ``(None, reason)``. A request that failed for good (the client already retried it)
    is unjudged at once with its reason. ``runner`` (a ``ResumableGenerator``) keeps finished
    replies across interruptions.
    """
    tokenizer = backend.tokenizer
    attempts = retries + 1
    results: dict[tuple[str, str], tuple[bool | None, str]] = {
        r.key: (None, f"judge output malformed ({attempts} attempts)") for r in requests}
    pending = list(requests)
    for attempt in range(retries + 1):
        if not pending:
            break
        prompts = [chat_prompt_ids(tokenizer, judge_message(r.problem, r.completion, r.criterion)) for r in pending]
        if runner is not None:
            keys = [f"{r.key[0]}|{r.key[1]}|{attempt}" for r in pending]
            outs = runner.generate(keys, prompts, gen_cfg, seed + 7919 * attempt)
        else:
            outs = backend.generate(prompts, gen_cfg, seed + 7919 * attempt)
        still = []
        for r, out in zip(pending, outs, strict=True):
            if out.error:
                results[r.key] = (None, f"judge request failed: {out.error}")
                continue
            parsed = parse_judge_reply(out.text)
            if parsed is None:
                still.append(r)
            else:
                results[r.key] = parsed
        if on_done:
            on_done(len(pending) - len(still))
        pending = still
    return results
