"""Answer extraction, machine checks, score maths and judge-reply parsing."""

import pytest

from rcsd_cli.data.rows import Check, Criterion, CriterionVerdict, Problem
from rcsd_cli.evaluation.answers import answers_match, extract_answer
from rcsd_cli.evaluation.scoring import check_met, parse_judge_reply, rubric_score, score_completion
from rcsd_cli.rubrics.rubric_gen import reference_rubric

CHOICES = ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"]


@pytest.mark.parametrize("text,expected", [
    ("Plants take in CO2.\nAnswer: B", "B"),
    ("Answer: A\nOn reflection...\nAnswer: (C)", "C"),
    ("**Final answer:** b) Carbon dioxide", "B"),
    ("The answer is \\boxed{D}", "D"),
    ("So the answer is (A).", "A"),
    ("They absorb carbon dioxide from air.", "B"),
    ("Answer: Carbon dioxide", "B"),
    ("I am not sure.", None),
    ("C: nitrogen is inert", "C"),
    ("A) Oxygen\nB) Carbon dioxide\nC) Nitrogen\nD) Helium", None),
    ("Answer: E", None),
])
def test_extract_multiple_choice(text, expected):
    assert extract_answer(text, CHOICES) == expected


@pytest.mark.parametrize("text,expected", [
    ("12*12 = 144\nAnswer: 144", "144"),
    ("so we get \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first 3, then 7, total 10", "10"),
])
def test_extract_open(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_numbers_and_text():
    assert answers_match("1,000", "1000")
    assert answers_match("0.5", "1/2")
    assert answers_match("  Paris. ", "paris")
    assert not answers_match("145", "144")
    assert not answers_match(None, "144")
    assert answers_match("b", "B", CHOICES)


def test_checks():
    assert check_met(Check(kind="answer_equals", value="B"), "Answer: B", CHOICES)[0]
    assert not check_met(Check(kind="answer_equals", value="B"), "Answer: C", CHOICES)[0]
    assert check_met(Check(kind="regex", value=r"^answer:"), "text\nANSWER: x", None)[0]
    assert check_met(Check(kind="max_words", value="3"), "one two three", None)[0]
    assert not check_met(Check(kind="max_words", value="2"), "one two three", None)[0]


def v(weight, met):
    return CriterionVerdict(criterion_id=f"c{weight}{met}", weight=weight, met=met,
                            method="unjudged" if met is None else "check")


def test_rubric_score_hand_values():
    # met: 10 and 3 of positives 10+3+2=15, pitfall -1 met -> (13-1)/15 = 0.8
    assert rubric_score([v(10, True), v(3, True), v(2, False), v(-1, True)]) == (pytest.approx(0.8), 12, 15)
    # pitfalls alone can push below zero: clipped to 0
    assert rubric_score([v(2, False), v(-5, True)])[0] == 0.0
    # unjudged criteria leave both sums; no judged positive criterion -> None
    assert rubric_score([v(10, None), v(2, True)]) == (1.0, 2, 2)
    assert rubric_score([v(10, None), v(-1, False)])[0] is None


def test_reference_rubric_scoring_end_to_end():
    p = Problem(id="q", question="Which gas?", choices=CHOICES, answer="B")
    rubric = reference_rubric(p)
    assert [c.weight for c in rubric] == [10, -1, -1, -1, 3, 2]
    good = score_completion("s", p, rubric, "Plants absorb CO2.\nAnswer: B")
    assert good.score == pytest.approx(1.0) and good.correct is True and good.n_unjudged == 0
    bad = score_completion("s", p, rubric, "Answer: A")
    # answer line (3) + concise (2) met, distractor A (-1) met: (5 - 1) / 15
    assert bad.score == pytest.approx(4 / 15) and bad.correct is False


def test_unchecked_criteria_stay_unjudged_without_a_judge():
    p = Problem(id="q", question="Explain", answer=None)
    rubric = [Criterion(id="a", title="Explains the idea", weight=5),
              Criterion(id="b", title="Answer line", weight=1, check=Check(kind="regex", value="answer:"))]
    s = score_completion("s", p, rubric, "Answer: it works")
    assert s.n_unjudged == 1 and s.verdicts[0].met is None and s.score == 1.0 and s.correct is None
    s2 = score_completion("s", p, rubric, "Answer: it works", {"a": (False, "misses the idea")})
    assert s2.score == pytest.approx(1 / 6) and s2.verdicts[0].method == "judge"


def test_parse_judge_reply():
    assert parse_judge_reply('sure {"explanation": "ok", "criteria_met": true}') == (True, "ok")
    assert parse_judge_reply('<think>{"criteria_met": true}</think>{"criteria_met": false}') == (False, "")
    assert parse_judge_reply('{"criteria_met": "yes"}') is None
    assert parse_judge_reply("no json here") is None


# (completion, gold, expected) in the formats of MATH-500, GSM8K, AIME, GPQA-free-form and SciQ answers
OPEN_ANSWERS = [
    ("so the probability is \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "2", False),
    ("Answer: 3 g/cm^3", "3", True),
    ("Answer: 3 g/cm^3", "4", False),
    ("The answer is \\boxed{\\dfrac{3}{4}}.", "\\frac34", True),
    ("\\boxed{0.75}", "\\frac{3}{4}", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\pi}", "\\pi", True),
    ("\\boxed{3\\pi}", "\\pi", False),
    ("#### 72\nAnswer: 72", "72", True),
    ("Answer: 1,000", "1000", True),
    ("Answer: $18", "18", True),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", True),
    ("\\boxed{10^{-3}}", "0.001", True),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("Answer: 045", "45", True),
    ("Answer: mitochondria", "Mitochondria", True),
    ("Answer: 5 m/s", "5", True),
    ("\\boxed{12}", "13", False),
    ("no final answer here", "7", False),
]


@pytest.mark.parametrize("text, gold, expected", OPEN_ANSWERS)
def test_open_answers_table(text, gold, expected):
    assert answers_match(extract_answer(text), gold) is expected


def test_pass_at_k_by_hand():
    from rcsd_cli.evaluation.stats import pass_at_k

    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # = avg@4
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 2, 3) == 1.0


def test_math_benchmarks_load_offline_with_boxed_gold():
    from rcsd_cli.evaluation.benchmarks import benchmark

    math500, gsm8k = benchmark("math500").load(None, 0), benchmark("gsm8k").load(None, 0)
    assert len(math500) == 500 and len(gsm8k) == 1319
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and gsm8k[0].answer == "18"
    assert answers_match(extract_answer("So \\boxed{\\left(3,\\frac{\\pi}{2}\\right)}"), math500[0].answer)


def test_loglik_choice_scores_equal_a_plain_forward(tiny_model):
    """Sorted, batched and padded: every pair's sum equals an unbatched forward, in the problems' order."""
    import torch
    from transformers import AutoModelForCausalLM

    from rcsd_cli.backends.hf import HFBackend
    from rcsd_cli.evaluation.loglik import GENERIC, PROTOCOLS, choice_logprobs, encode_pair, grade

    engine = HFBackend(str(tiny_model))
    tok, model = engine.tokenizer, AutoModelForCausalLM.from_pretrained(tiny_model)
    problems = [Problem(id="a", question="Which is a gas?", choices=["Oxygen", "Iron", "Salt water"], answer="A"),
                Problem(id="b", question="2+2, in a long question with more words?", choices=["4", "five"],
                        answer="B")]
    letters = Problem(id="m", question="Which is a gas?", choices=["Oxygen", "Iron", "Salt", "Wood"], answer="A",
                      metadata={"subject": "chemistry"})
    for protocol, items in ((GENERIC, problems), (PROTOCOLS["mmlu_stem"], [letters, letters])):
        got = choice_logprobs(engine, items, protocol, batch_size=2)  # letters: one forward shared by 4 pairs
        assert [len(g) for g in got] == [len(p.choices) for p in items]
        for p, scores in zip(items, got, strict=True):
            for cont_text, score in zip(protocol.continuations(p), scores, strict=True):
                ctx, cont = encode_pair(tok, protocol.context(p, []), " " + cont_text)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                expected = sum(logp[len(ctx) - 1 + t, cont[t]].item() for t in range(len(cont)))
                assert score == pytest.approx(expected, abs=1e-4)
    g = grade(problems[1], [-1.0, -3.0])  # "five" is longer: -3/4 per char beats -1/1
    assert (g["prediction"], g["acc"], g["acc_norm"], g["gold_logprob"]) == ("A", 0.0, 1.0, -3.0)


def test_loglik_runs_each_context_once_for_all_its_choices(tiny_model, monkeypatch):
    """Two questions with 3 and 2 multi-token choices: one forward of the 2 contexts, then one of the 5
    continuations over the contexts' repeated KV cache, not 5 rows of context + choice."""
    from rcsd_cli.backends.hf import HFBackend
    from rcsd_cli.evaluation.loglik import GENERIC, choice_logprobs

    engine = HFBackend(str(tiny_model))
    body, real = engine.model.model, engine.model.model.forward
    shapes = []

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(body, "forward", recording)
    problems = [Problem(id="a", question="Which is a gas at room temperature?", choices=["Oxygen gas", "Iron bar",
                                                                                        "Salt water"], answer="A"),
                Problem(id="b", question="2+2?", choices=["four apples", "five pears"], answer="A")]
    choice_logprobs(engine, problems, GENERIC, batch_size=4)
    contexts = {GENERIC.context(p, []) for p in problems}
    assert [rows for rows, _ in shapes] == [len(contexts), 5]
    assert shapes[1][1] < shapes[0][1]  # the continuations run only their own tokens


def test_loglik_protocols_are_lm_evals_own_tasks():
    """Contexts and continuations as lm-eval 0.4.13's task YAMLs render them (arc_easy, sciq, openbookqa,
    mmlu_college_physics with its description and first_n dev examples)."""
    from rcsd_cli.errors import RcsdError
    from rcsd_cli.evaluation.benchmarks import BENCHMARKS, benchmark

    PROTOCOLS = {name: b.protocol for name, b in BENCHMARKS.items()}

    arc = Problem(id="a", question="Which is a gas?", choices=["Oxygen", "Iron"], answer="A")
    assert PROTOCOLS["arc-easy"].context(arc, []) == "Question: Which is a gas?\nAnswer:"
    sciq = Problem(id="s", question="What do plants absorb?", choices=["CO2", "O2"], answer="A",
                   metadata={"support": "  Plants absorb carbon dioxide."})
    assert PROTOCOLS["sciq"].context(sciq, []) == ("Plants absorb carbon dioxide.\nQuestion: What do plants "
                                                   "absorb?\nAnswer:")
    assert PROTOCOLS["openbookqa"].context(arc, []) == "Which is a gas?"
    mmlu = Problem(id="m", question=" A lens has power 5 D. Its focal length is ", choices=["20 cm", "5 cm",
                   "2 cm", "50 cm"], answer="A", metadata={"subject": "college_physics"})
    shot = Problem(id="d", question="What is 2 + 2?", choices=["3", "4", "5", "6"], answer="B",
                   metadata={"subject": "college_physics"})
    assert PROTOCOLS["mmlu-stem"].context(mmlu, [shot]) == (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "A lens has power 5 D. Its focal length is\nA. 20 cm\nB. 5 cm\nC. 2 cm\nD. 50 cm\nAnswer:")
    assert PROTOCOLS["mmlu-stem"].continuations(mmlu) == ["A", "B", "C", "D"]
    assert benchmark("gpqa").loglik_protocol().name == "rcsd-generic"
    assert PROTOCOLS["mmlu-stem"].name == "mmlu_stem" and PROTOCOLS["arc-easy"].name == "arc_easy"
    with pytest.raises(RcsdError, match="sciq has no few-shot split"):
        benchmark("sciq").loglik_protocol(5)
    with pytest.raises(RcsdError, match="--bench: unknown benchmark 'nope'; choose from arc-challenge"):
        benchmark("nope")


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tiny_model):
    from transformers import AutoTokenizer

    from rcsd_cli.evaluation.loglik import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


@pytest.mark.parametrize("text, rule", [
    ("Answer: B", "answer_line"), ("so \\boxed{B}", "boxed"), ("I think the answer is (C).", "answer_is"),
    ("B) because plants need it", "leading_letter"), ("It must be C", "trailing_letter"),
    ("plants take in carbon dioxide", "choice_text"), ("no idea", None),
])
def test_extraction_rules_are_reported(text, rule):
    from rcsd_cli.evaluation.answers import extract_with_rule

    assert extract_with_rule(text, ["Oxygen", "Carbon dioxide", "Nitrogen", "Argon"])[1] == rule


@pytest.mark.parametrize("text,gold,rcsd,authors", [
    # the authors' eval/evaluate_math.py counts only the last \boxed{...}; rcsd also reads an Answer: line
    ("So x = 42.\nAnswer: 42", "42", True, False),
    ("\\boxed {5}", "5", True, False),                         # their extractor needs "\boxed{" exactly
    ("First \\boxed{3}, then I recheck: \\boxed{4}", "3", False, False),   # both: the last box
    ("\\boxed{\\frac{1}{2}}", "0.5", True, True),              # math-verify in both
    ("The result is \\boxed{x^2+2x+1}", "(x+1)^2", True, True),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", True, True),           # nested braces
    ("\\boxed{7", "7", True, False),                # never closed: rcsd falls back to the last number
    ("It is 12 apples, so 12.", "12", True, False),            # rcsd's last-number fallback
])
def test_authors_grader_against_rcsd(text, gold, rcsd, authors):
    from rcsd_cli.evaluation.answers import authors_boxed, authors_match

    assert answers_match(extract_answer(text), gold) is rcsd
    assert authors_match(authors_boxed(text), gold) is authors


def test_authors_boxed_finds_what_their_script_finds():
    from rcsd_cli.evaluation.answers import authors_boxed

    assert authors_boxed("a \\boxed{ \\frac{a}{b} } b") == "\\frac{a}{b}"
    assert authors_boxed("\\boxed{1} and \\boxed{2}") == "2"
    assert authors_boxed("no box") is None and authors_boxed("\\boxed 5") is None


def test_eval_grader_authors_is_refused_with_loglik():
    from rcsd_cli.configs.eval import EvalConfig

    assert EvalConfig(bench="gsm8k", grader="authors").grader == "authors"
    with pytest.raises(ValueError, match="--grader has no effect with --scoring loglik"):
        EvalConfig(bench="arc-easy", scoring="loglik", grader="authors")


@pytest.mark.parametrize("text,rcsd,simple_evals", [
    ("Let me think.\nAnswer: B", "B", "B"),
    ("Answer: A\nOn reflection...\nAnswer: (C)", "C", "A"),      # simple-evals takes the first match
    ("The answer is \\boxed{D}", "D", None),                     # no "Answer:" line: nothing for simple-evals
    ("answer: b", "B", "b"),                                       # its letter is case-sensitive when compared
    ("**Final answer:** b) Carbon dioxide", "B", None),
])
def test_simple_evals_grader_against_rcsd(text, rcsd, simple_evals):
    from rcsd_cli.evaluation.answers import grade_texts

    problem = Problem(id="q", question="Which gas?", choices=CHOICES, answer="B")
    assert extract_answer(text, CHOICES) == rcsd
    preds, _, correct = grade_texts("simple-evals", [text], problem)
    assert preds == [simple_evals] and correct == [simple_evals == "B"]
    with pytest.raises(ValueError, match="multiple-choice answers only"):
        grade_texts("simple-evals", [text], Problem(id="m", question="2+2?", answer="4"))
