"""Final-answer extraction and comparison.

Order of evidence: the last ``Answer: X`` line, then the last ``\\boxed{X}``, then
fallbacks — for multiple choice "the answer is (B)"-style phrases, a trailing lone letter or
exactly one choice text quoted; for open answers the last number in the text.
"""

from __future__ import annotations

import re

from rcsd_cli.data.inputs import LETTERS

_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:：]\s*\**\s*(.+)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\(?\**([A-Z])\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _letter(fragment: str, n_choices: int) -> str | None:
    m = re.match(r"\s*[\(\[\*]*\s*([A-Za-z])\s*(?:[\)\]\.:\*,]|$|\s)", fragment)
    if m and m.group(1).upper() in LETTERS[:n_choices]:
        return m.group(1).upper()
    return None


def _choice_by_text(fragment: str, choices: list[str]) -> str | None:
    frag = normalise(fragment)
    hits = [i for i, c in enumerate(choices) if normalise(c) and normalise(c) == frag]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def extract_answer(text: str, choices: list[str] | None = None) -> str | None:
    """The model's final answer: a letter for multiple choice, else the answer text."""
    return extract_with_rule(text, choices)[0]


RULES = ("answer_line", "boxed", "answer_is", "leading_letter", "trailing_letter", "choice_text", "last_number")
STRICT_RULE = {"answer-line": "answer_line", "paper": "boxed"}  # what each prompt style asks the model to write


def extract_with_rule(text: str, choices: list[str] | None = None) -> tuple[str | None, str | None]:
    """(answer, the rule that found it): the format the prompt asked for, or one of rcsd's fallbacks."""
    candidates = [(m.group(1).strip(), "answer_line") for m in _ANSWER_LINE.finditer(text)]
    candidates += [(b, "boxed") for b in boxed_contents(text)[-1:]]
    n = len(choices) if choices else 0
    for cand, rule in reversed(candidates):
        if not choices:
            return cand.strip().strip("*").rstrip(".").strip(), rule
        found = _letter(cand, n) or _choice_by_text(cand, choices)
        if found:
            return found, rule
    if choices:
        m = list(_ANSWER_IS.finditer(text))
        if m and m[-1].group(1).upper() in LETTERS[:n]:
            return m[-1].group(1).upper(), "answer_is"
        leading = {m.group(1) for m in re.finditer(r"(?m)^\s*\(?([A-Z])[\):\.]\s", text)}
        if len(leading) == 1 and next(iter(leading)) in LETTERS[:n]:
            return next(iter(leading)), "leading_letter"  # "B) ..." as the reply; several: the choices were listed
        tail = re.search(r"(?:^|\s|\()([A-Z])\)?\.?\s*$", text.strip())
        if tail and tail.group(1) in LETTERS[:n]:
            return tail.group(1), "trailing_letter"
        quoted = [LETTERS[i] for i, c in enumerate(choices) if len(c) > 3 and c.lower() in text.lower()]
        return (quoted[0], "choice_text") if len(quoted) == 1 else (None, None)
    nums = _NUMBER.findall(text)
    return (nums[-1].replace(",", ""), "last_number") if nums else (None, None)


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` (and ``\\fbox``), braces matched to any depth."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


def normalise(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("$", "").replace("\\!", "").strip().lower()
    return re.sub(r"[\s\.\,;:!\*]+$", "", re.sub(r"\s+", " ", text))


def _as_number(text: str) -> float | None:
    t = normalise(text).replace(",", "")
    try:
        if re.fullmatch(r"-?\d+/\d+", t):
            a, b = t.split("/")
            return int(a) / int(b)
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, gold: str | None, choices: list[str] | None = None) -> bool:
    """Letters compare exactly; numbers numerically (relative 1e-6); text after normalisation."""
    if predicted is None or gold is None:
        return False
    if choices:
        return predicted.strip().upper() == gold.strip().upper()
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    if normalise(predicted) == normalise(gold):
        return True
    return _math_equal(predicted, gold)


def _strip_units(text: str) -> str:
    """``3 g/cm^3`` -> ``3``: a leading number followed by words (units), when the gold is a bare number."""
    m = re.fullmatch(r"\s*\$?(-?\d[\d,]*(?:\.\d+)?)\$?\s*(?:\\,|\\ )?\s*(?:\\(?:text|mathrm)\{)?[A-Za-z°%µ][^=]*",
                     text)
    return m.group(1) if m else text


def _math_equal(predicted: str, gold: str) -> bool:
    """Open answers through ``math-verify`` (fractions, roots, LaTeX, sets, intervals); False when it cannot tell."""
    try:
        from math_verify import parse, verify
    except ImportError:  # optional at import time; installed with rcsd
        return False
    if _as_number(gold) is not None:
        predicted = _strip_units(predicted)
    try:
        g = parse(f"${gold}$") or parse(gold)
        p = parse(f"${predicted}$") or parse(predicted)
        return bool(g and p and verify(g, p))
    except Exception:  # noqa: BLE001 - math-verify raises on unparseable input; that is "no match"
        return False


# --- ``eval --grader authors``: the rule of the authors' eval/evaluate_math.py (github carriegu0818/RCSD,
# commit 137bd93), which produced the paper's math numbers: only the last ``\boxed{...}`` counts, and it is
# compared with math-verify (no fallback parsing), or as plain text when math-verify raises.


def authors_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}``, found as their script finds it: from the last ``\\boxed``, to the brace that
    closes the first one opened; None when nothing closes or the command is not followed by ``{``
    (``\\boxed {5}``, ``\\boxed 5``)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            boxed = text[start: i + 1]
            return boxed[len("\\boxed{"):-1].strip() if boxed.startswith("\\boxed{") else None
    return None


def authors_match(predicted: str | None, gold: str) -> bool:
    """math-verify on ``$...$``-wrapped answers without fallback parsing; if it raises, equal text after
    removing spaces and ``$`` and lower-casing."""
    if predicted is None:
        return False
    pred = predicted if "$" in predicted else f"${predicted}$"
    ref = gold if "$" in gold else f"${gold}$"
    try:
        from math_verify import parse, verify

        return bool(verify(parse(ref, fallback_mode="no_fallback"), parse(pred, fallback_mode="no_fallback"),
                           timeout_seconds=5))
    except Exception:  # noqa: BLE001 - their script falls back to comparing text on any failure

        def flat(s: str) -> str:
            return s.replace("$", "").replace(" ", "").lower().strip()

        return flat(pred) == flat(ref)


# --- ``eval --grader simple-evals``: OpenAI simple-evals' multiple-choice rule (gpqa_eval.py): the first match of
# its ANSWER_PATTERN_MULTICHOICE anywhere in the reply, compared with the gold letter as written.
SIMPLE_EVALS_MC = re.compile(r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?")


def simple_evals_letter(text: str) -> str | None:
    m = SIMPLE_EVALS_MC.search(text)
    return m.group(1) if m else None


def grade_texts(grader: str, texts: list[str], problem) -> tuple[list, list, list]:
    """Predictions, the rule that found each, and correctness (None without a gold answer), by ``--grader``."""
    if grader == "simple-evals":
        if not problem.choices:
            raise ValueError("--grader simple-evals grades multiple-choice answers only (its math grader is an "
                             f"LLM equality check); {problem.id} has an open answer")
        preds = [simple_evals_letter(t) for t in texts]
        return preds, ["answer_line" if pr else None for pr in preds], [
            pr == problem.answer if problem.answer is not None else None for pr in preds]
    if grader == "authors":
        preds = [authors_boxed(t) for t in texts]
        rules = ["boxed" if pr is not None else None for pr in preds]
        return preds, rules, [authors_match(pr, problem.answer) if problem.answer is not None else None
                              for pr in preds]
    found = [extract_with_rule(t, problem.choices) for t in texts]
    preds, rules = [a for a, _ in found], [r for _, r in found]
    return preds, rules, [answers_match(pr, problem.answer, problem.choices) if problem.answer is not None else None
                          for pr in preds]
