"""Prompt texts and their token ids.

Student and teacher see the same question under the model's own chat template; the teacher's
user turn additionally holds the rubric (and by default the reference answer). Both prompts
end with the assistant header, so one list of completion ids can follow either of them:
the teacher input is ``teacher_prompt_ids + completion_ids`` and nothing is ever decoded and
re-encoded.
"""

from __future__ import annotations

from rcsd_cli.inputs import LETTERS
from rcsd_cli.schemas import Criterion, Problem


def format_question(problem: Problem) -> str:
    text = problem.question.strip()
    if problem.choices:
        text += "\n\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(problem.choices))
    return text


def answer_instruction(problem: Problem) -> str:
    if problem.choices:
        return 'Think briefly, then finish with a line of the form "Answer: <letter>".'
    return 'Think briefly, then finish with a line of the form "Answer: <final answer>".'


def format_rubric(rubric: list[Criterion]) -> str:
    lines = []
    for c in rubric:
        w = int(c.weight) if float(c.weight).is_integer() else c.weight
        desc = f": {c.description}" if c.description and c.description != c.title else ""
        lines.append(f"- [{w:+}] {c.title}{desc}")
    return "\n".join(lines)


def student_message(problem: Problem) -> str:
    return f"{format_question(problem)}\n\n{answer_instruction(problem)}"


def teacher_message(problem: Problem, rubric: list[Criterion] | None, include_reference: bool,
                    analysis: str | None = None) -> str:
    """The privileged teacher context: question, rubric and/or reference, then the same instruction."""
    parts = [format_question(problem)]
    if rubric:
        parts.append("A strong answer is graded with this rubric (points in brackets; negative points are "
                     "pitfalls to avoid):\n" + format_rubric(rubric))
    if include_reference and problem.reference_answer:
        parts.append(f"Reference answer:\n{problem.reference_answer.strip()}")
    if analysis:
        parts.append(f"Analysis of the rubric:\n{analysis.strip()}")
    parts.append(answer_instruction(problem))
    return "\n\n".join(parts)


def rubric_analysis_message(problem: Problem, rubric: list[Criterion]) -> str:
    """Reason-first teacher: ask for an analysis of what the rubric rewards before answering."""
    return (teacher_message(problem, rubric, True).rsplit("\n\n", 1)[0] + "\n\nDo not answer yet. In at most "
            "80 words, analyse what this rubric rewards and which pitfalls a strong answer must avoid.")


def rubric_designer_message(problem: Problem) -> str:
    ref = problem.reference_answer or problem.answer or "(none given)"
    return (
        "You write grading rubrics. For the question below, write a rubric as a JSON array of 3 to 25 "
        'criteria, each {"title": "2-5 words", "description": "at most 40 words", "weight": integer}. '
        "Essential criteria weigh 7 to 10, important ones 3 to 6, and include at least one pitfall with "
        "weight -1 (a mistake a weak answer makes). Reply with the JSON array only.\n\n"
        f"Question:\n{format_question(problem)}\n\nReference answer:\n{ref}"
    )


def judge_message(problem: Problem, completion: str, criterion: Criterion) -> str:
    """HealthBench-style grader prompt for one criterion; the reply must be JSON."""
    return (
        "Your job is to look at a conversation and a rubric item, and score the last turn (the response) on "
        "how well it follows the rubric item.\n\n"
        f"# Conversation\nuser: {format_question(problem)}\n\nassistant: {completion}\n\n"
        f"# Rubric item\n[{criterion.weight:+g}] {criterion.title}: {criterion.description}\n\n"
        "# Instructions\nReturn a JSON object with the fields \"explanation\" (a short string) and "
        "\"criteria_met\" (true or false). For a rubric item with negative points, criteria_met is true when "
        "the response shows the undesirable behaviour. Reply with the JSON object only."
    )


def chat_prompt_ids(tokenizer, user_text: str, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{user_text}\n\nResponse:", add_special_tokens=True)["input_ids"]


def student_prompt_ids(tokenizer, problem: Problem, enable_thinking: bool | None = None) -> list[int]:
    return chat_prompt_ids(tokenizer, student_message(problem), enable_thinking)


def teacher_prompt_ids(tokenizer, problem: Problem, rubric: list[Criterion] | None, include_reference: bool,
                       enable_thinking: bool | None = None, analysis: str | None = None) -> list[int]:
    """Rendered with the same ``enable_thinking`` as the student so the first completion token lines up."""
    return chat_prompt_ids(tokenizer, teacher_message(problem, rubric, include_reference, analysis), enable_thinking)
