"""Prompt texts and their token ids, in two styles.

``paper`` reproduces the user messages of the authors' public RCSD code verbatim (their prompt
texts are part of the method, like a benchmark's prompt): the student sees ``Question: ...`` and
a ``\\boxed{}`` instruction; the teacher additionally sees ``Reference Answer:`` and the rubric
as one-line JSON (``Rubric (JSON array):``). Their reason-first teacher first writes an analysis
as its own assistant turn of a separate prompt; a raw transition text (no chat header) then
leads into the student's rollout. ``answer-line`` is rcsd's own shorter style, ending in an
``Answer: X`` line, which small models follow more often.

Every prompt ends with the assistant header, so one list of completion ids can follow either
side: the teacher input is ``teacher_ids + completion_ids`` and nothing is decoded and re-encoded.
"""

from __future__ import annotations

import json

from rcsd_cli.data.inputs import LETTERS
from rcsd_cli.data.rows import Criterion, Problem

# --- the authors' texts (github carriegu0818/RCSD, data_collator_reward.py), verbatim
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PAPER_ANALYSIS_ASK = (
    "\n\nThe reference answer and rubric above are guidelines for the questions but may not be perfect. "
    "Briefly explain the key requirements, constraints, and reasoning expectations implied by them. "
    "Do NOT solve the question yet. Do NOT use <think> tags.\n"
)
PAPER_ANALYSIS_ASK_REFERENCE = (
    "\n\nThe reference material above is a guideline for the question but may not be perfect. "
    "Briefly explain the key requirements, constraints, and reasoning expectations implied by it. "
    "Do NOT solve the question yet. Do NOT use <think> tags.\n"
)


def _paper_transition(label: str) -> str:
    return (
        f"\n\n{label} provided only as private guidance to help you understand "
        "the correct reasoning path. Do NOT mention, cite, or refer to the reference solution, rubric, "
        "answer key, ground truth, or any external guidance in your response. Do NOT write phrases such as "
        "'given the solution', 'from the reference', 'according to the rubric', 'we know the answer is', "
        "or anything implying that you have seen the answer in advance. "
        "Instead, produce a natural, self-contained solution as if you are solving the problem independently "
        "from the original problem statement. Use your own reasoning process, derive the result step by step, "
        "and only present the final answer after the reasoning supports it. "
        "Think step by step, explore different approaches if useful, and don't be afraid to backtrack "
        "or reconsider if something doesn't work out. Put the final answer within \\boxed{}.\n"
    )


PAPER_TRANSITION = "\n" + _paper_transition("The reference and rubric above is")
PAPER_TRANSITION_REFERENCE = "\n" + _paper_transition("The reference above is")


def format_question(problem: Problem) -> str:
    text = problem.question.strip()
    if problem.choices:
        text += "\n\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(problem.choices))
    return text


def reference_text(problem: Problem) -> str | None:
    """The reference answer shown to the teacher: the worked reference, else the gold answer."""
    ref = (problem.reference_answer or problem.answer or "").strip()
    return ref or None


def rubric_json(rubric: list[Criterion]) -> str:
    """The rubric as the authors pass it: ``json.dumps`` of [{title, description, weight}], one line."""
    return json.dumps([{"title": c.title, "description": c.description,
                        "weight": int(c.weight) if float(c.weight).is_integer() else c.weight} for c in rubric],
                      ensure_ascii=False)


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


def student_message(problem: Problem, style: str = "paper") -> str:
    if style == "paper":
        return f"Question: {format_question(problem)}\n\n{PAPER_INSTRUCTION}"
    return f"{format_question(problem)}\n\n{answer_instruction(problem)}"


def _paper_context(problem: Problem, rubric: list[Criterion] | None, include_reference: bool) -> str:
    text = f"Question: {format_question(problem)}\n\n"
    ref = reference_text(problem) if include_reference else None
    if ref:
        text += f"Reference Answer:\n{ref}\n\n"
    if rubric:
        text += f"Rubric (JSON array):\n{rubric_json(rubric)}\n"
    return text


def teacher_message(problem: Problem, rubric: list[Criterion] | None, include_reference: bool,
                    style: str = "paper") -> str:
    """The privileged teacher context: question, reference and/or rubric, then the same instruction.

    paper: rubric + reference is the authors' text; reference only (OPSD) is their
    ``teacher_solution_rubric=False`` text; rubric only (no reference) is rcsd's variant of theirs.
    """
    if style == "paper":
        text = _paper_context(problem, rubric, include_reference)
        has_ref = include_reference and reference_text(problem)
        if rubric:
            guide = "the rubric and reference answer" if has_ref else "the rubric"
            return f"{text}\nUse {guide} as guidance.\n{PAPER_INSTRUCTION}"
        return f"{text}Use the reference material above as guidance.\n{PAPER_INSTRUCTION}"
    parts = [format_question(problem)]
    if rubric:
        parts.append("A strong answer is graded with this rubric (points in brackets; negative points are "
                     "pitfalls to avoid):\n" + format_rubric(rubric))
    if include_reference and problem.reference_answer:
        parts.append(f"Reference answer:\n{problem.reference_answer.strip()}")
    parts.append(answer_instruction(problem))
    return "\n\n".join(parts)


def analysis_message(problem: Problem, rubric: list[Criterion] | None, style: str = "paper") -> str:
    """Reason-first: ask the teacher to analyse the reference (and rubric) before any answer."""
    if style == "paper":
        return _paper_context(problem, rubric, True) + (PAPER_ANALYSIS_ASK if rubric else PAPER_ANALYSIS_ASK_REFERENCE)
    return (teacher_message(problem, rubric, True, style).rsplit("\n\n", 1)[0] + "\n\nDo not answer yet. Briefly "
            "explain what a strong answer must do and which pitfalls it must avoid.")


def transition_text(problem: Problem, rubric: list[Criterion] | None, style: str = "paper") -> str:
    """Reason-first: raw text (no chat header) between the teacher's analysis and the rollout."""
    if style == "paper":
        return PAPER_TRANSITION if rubric else PAPER_TRANSITION_REFERENCE
    return f"\n\nNow answer the question yourself, without mentioning the guidance. {answer_instruction(problem)}\n"


# --- the authors' rubric designer (RubricPromptBuilder in rcsd_train_reward.py, github carriegu0818/RCSD), verbatim
PAPER_DESIGNER_ROLE = (
    "# Role You are a top-tier Rubric Designer. Your sole task is to design JSON-formatted evaluation rubrics "
    "based on both the [Question] and the [Reference Answer] provided by the user.\n"
    "# Core Task\n"
    "1. Analyze [Question]: Understand every explicit and implicit requirement in the [Question].\n"
    "2. Leverage [Reference Answer]: Use the [Reference Answer] to capture nuanced expectations, desirable "
    "reasoning patterns, and formatting details that high-quality responses should exhibit. Treat it as "
    "authoritative context, not content to be copied.\n"
    "3. Create Rubrics: Following the [Evaluation Criteria Format] and [Design Rules] below, develop 3 to 25 "
    "evaluation criteria that ensure candidate answers respond to the [Question] and match the quality "
    "demonstrated in the [Reference Answer].\n"
    "4. Output Format: Must strictly follow the [Output Requirements] with no additional text.\n"
)
PAPER_DESIGNER_FORMAT = (
    "# [Evaluation Criteria Format]\n"
    "- Each criterion must contain the following fields:\n"
    "1. `title`: (String) A 2-5 word core summary.\n"
    "2. `description`: (String) A clear description of no more than 40 words or 5 sentences.\n"
    "3. `weight`: (Integer) A score between -1 and 10.\n"
    "\n"
    "Example output format (match this style exactly)\n"
    "[\n"
    "{\"description\": \"Essential Criteria: The response must explicitly incorporate the 3% efficiency factor "
    "to determine the actual power output in visible photons from the 100-W bulb.\", \"title\": \"Efficiency "
    "Factor\", \"weight\": 5},\n"
    "{\"description\": \"Important Criteria: The response should correctly calculate the energy of a single "
    "photon using the formula E = hc/λ, with λ approximately equal to 5000 angstrom, ensuring proper usage of "
    "physical constants.\", \"title\": \"Photon Energy Calculation\", \"weight\": 5}\n"
    "]\n"
    "Output Requirements (strict)\n"
    "* Output ONLY valid JSON.\n"
    "* Output must be a JSON array of criterion objects (no wrapper keys).\n"
    "* No markdown, no commentary, no code fences, no extra text.\n"
    "* Do not include anything besides the array.\n"
    "* Do not copy sentences from the Reference Answer; write fresh evaluative criteria.\n"
    "Design Rules\n"
    "* Prefer testable, concrete criteria over vague ones.\n"
    "* Use higher weights (7–10) for essential requirements.\n"
    "* Use mid weights (3–6) for strong-but-nonessential improvements.\n"
    "* Use at least one negative criterion (weight -1) for major violations (e.g., ignoring constraints, wrong "
    "format, hallucinating, contradicting the reference).\n"
    "* Avoid redundancy: each criterion should measure a distinct aspect.\n"
    "Now generate the rubric criteria for the provided Question and Reference Answer."
)


# Their stage-I collator (data_collator_rubric.py, commit d1e07f0), which trained the rubric writer, has the
# same designer text with "5000 Å" where the later builder, used to generate rubrics, writes "5000 angstrom".
PAPER_DESIGNER_FORMAT_STAGE1 = PAPER_DESIGNER_FORMAT.replace("5000 angstrom", "5000 Å")
PAPER_STAGE1_RUBRIC = "\n\nGround Truth Rubric (JSON array):\n"
PAPER_STAGE1_ASK = "Use the ground-truth rubric as the authoritative target and output the rubric JSON array only."

DesignerStyle = str  # "paper" (the authors' designer) or "short" (rcsd's one-paragraph designer)


def rubric_designer_message(problem: Problem, style: DesignerStyle = "short", *, stage_one: bool = False) -> str:
    """The request to write a rubric for ``problem``: the authors' designer (``paper``; ``stage_one``: the text
    their stage-I run trained on) or rcsd's ``short`` one."""
    ref = problem.reference_answer or problem.answer or "(none given)"
    if style == "paper":
        rules = PAPER_DESIGNER_FORMAT_STAGE1 if stage_one else PAPER_DESIGNER_FORMAT
        return f"{PAPER_DESIGNER_ROLE}# [Question]\n{format_question(problem)}\n# [Reference Answer]\n{ref}\n{rules}"
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


# --- the authors' rubric-quality judge (rubric/run_rubric_quality_eval_hf.py, commit 90a35b6), verbatim
RUBRIC_QUALITY_SYSTEM = (
    "You are an expert evaluator of grading rubrics for scientific and mathematical reasoning questions.\n"
    "\n"
    "Your task is to evaluate the quality of several rubrics for the same question. The rubrics include one "
    "GT/reference rubric and one or more generated rubrics.\n"
    "\n"
    "You must judge each rubric independently. Do not assume the reference rubric is always better. A generated "
    "rubric can be better if it is more complete, specific, or useful.\n"
    "\n"
    "Inputs:\n"
    "- question: The original question.\n"
    "- reference_answer: The ideal answer or gold solution.\n"
    "- rubrics: A dictionary of rubric_name -> rubric content.\n"
    "\n"
    "Evaluate each rubric on the following six dimensions using a 1-5 scale:\n"
    "\n"
    "1. Relevance: Does the rubric directly match the question and expected answer?\n"
    "1 = mostly irrelevant; 3 = partially relevant; 5 = highly relevant.\n"
    "\n"
    "2. Correctness: Are the rubric criteria factually and logically correct?\n"
    "1 = contains serious errors; 3 = mostly correct with issues; 5 = fully correct.\n"
    "\n"
    "3. Completeness: Does the rubric cover the main concepts, calculations, reasoning steps, and final-answer "
    "requirements needed to judge a response?\n"
    "1 = misses most key requirements; 3 = covers some key requirements; 5 = covers nearly all key "
    "requirements.\n"
    "\n"
    "4. Specificity: Is the rubric specific to this exact question rather than generic?\n"
    "1 = generic and reusable for many unrelated questions; 3 = partially question-specific; 5 = highly "
    "instance-specific.\n"
    "\n"
    "5. Non-redundancy: Does the rubric avoid repetitive, overlapping, or bloated criteria?\n"
    "1 = highly redundant; 3 = some redundancy; 5 = concise and non-overlapping.\n"
    "\n"
    "6. Usefulness: Would this rubric help a judge accurately evaluate model responses to this question?\n"
    "1 = not useful; 3 = moderately useful; 5 = very useful.\n"
    "\n"
    "Important instructions:\n"
    "- Score every rubric independently.\n"
    "- Do not omit any rubric that appears in the input.\n"
    "- If a rubric is weak, empty, redundant, incomplete, or irrelevant, still score it from 1 to 5.\n"
    "- Penalize rubrics that are verbose but redundant.\n"
    "- Penalize rubrics that mention correct general concepts but miss the actual grading target.\n"
    "- Reward rubrics that clearly identify the correct answer, necessary reasoning, key pitfalls, and "
    "important domain-specific checks.\n"
    "- Use the full 1-5 range.\n"
    "- Output valid JSON only. Do not include markdown or explanation outside JSON.\n"
    "\n"
    "Return exactly this JSON format:\n"
    "{\n"
    "  \"scores\": {\n"
    "    \"RUBRIC_NAME_1\": {\n"
    "      \"relevance\": <1-5>,\n"
    "      \"correctness\": <1-5>,\n"
    "      \"completeness\": <1-5>,\n"
    "      \"specificity\": <1-5>,\n"
    "      \"non_redundancy\": <1-5>,\n"
    "      \"usefulness\": <1-5>,\n"
    "      \"overall\": <average of the six scores>\n"
    "    },\n"
    "    \"RUBRIC_NAME_2\": {\n"
    "      \"relevance\": <1-5>,\n"
    "      \"correctness\": <1-5>,\n"
    "      \"completeness\": <1-5>,\n"
    "      \"specificity\": <1-5>,\n"
    "      \"non_redundancy\": <1-5>,\n"
    "      \"usefulness\": <1-5>,\n"
    "      \"overall\": <average of the six scores>\n"
    "    }\n"
    "  },\n"
    "  \"best_rubric\": \"<one rubric name or tie>\",\n"
    "  \"brief_reason\": \"<one concise sentence>\"\n"
    "}\n"
)


def rubric_quality_text(rubric: list[Criterion], max_chars: int = 12000) -> str:
    """A rubric as their judge reads it: ``i. title (weight=w): description`` lines, cut at 12,000 characters."""
    text = "\n".join(f"{i}. {c.title} (weight={int(c.weight) if float(c.weight).is_integer() else c.weight}): "
                     f"{c.description}" for i, c in enumerate(rubric, 1))
    return text[:max_chars] + "\n...[TRUNCATED]" if len(text) > max_chars else text


def rubric_quality_message(question: str, reference: str | None, rubrics: dict[str, list[Criterion]]) -> str:
    """Their user message: the rubric names to score, the question, reference answer and every rubric."""
    names = "\n".join(f"- {name}" for name in rubrics)
    block = "\n\n".join(f"[{name}]\n{rubric_quality_text(r)}" for name, r in rubrics.items())
    return f"""Evaluate the following rubrics for the same question.

You must return scores for exactly these rubric names:
{names}

Do not omit any rubric. If a rubric is weak, empty, redundant, incomplete, or irrelevant, still score it from 1 to 5.

[Question]
{question}

[Reference Answer]
{reference or ""}

[Rubrics]
{block}
"""


def chat_prompt_ids(tokenizer, user_text: str, enable_thinking: bool | None = None,
                    system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat (after an optional system message) ending with the assistant header."""
    if getattr(tokenizer, "chat_template", None):
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                    "content": user_text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = f"{system}\n\n" if system else ""
    return tokenizer(f"{prefix}{user_text}\n\nResponse:", add_special_tokens=True)["input_ids"]


def text_ids(tok, text: str) -> list[int]:
    """Token ids of raw text (no chat markers, no BOS), e.g. the reason-first transition."""
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- token ids per role
# Every stage builds its prompts here, from the few settings a prompt depends on: train, sample,
# eval, score, diagnose and explain cannot drift apart.


def teacher_rubric(row, method: str = "rcsd", context: str = "rubric+reference", ablation: str | None = None):
    """What the teacher's prompt holds besides the question: (rubric or None, include the reference?)."""
    if method == "opsd" or ablation == "none":
        return None, True
    return row.rubric, context != "rubric"


def student_prompt(tok, row: Problem, *, style: str = "paper", thinking: bool | None = None,
                   task: str = "reasoner") -> list[int]:
    """The student's prompt: the question (reasoner) or the rubric-design request (stage I)."""
    message = stage_one_message(row, style) if task == "rubric-generator" else student_message(row, style)
    return chat_prompt_ids(tok, message, thinking)


def stage_one_message(row: Problem, style: str) -> str:
    """Stage I's student request: the authors' stage-I designer (``paper``) or rcsd's short one."""
    return rubric_designer_message(row, "paper" if style == "paper" else "short", stage_one=True)


def stage_one_teacher_message(row, style: str) -> str:
    """Stage I's teacher: the same request plus the reference rubric (the authors' wording under ``paper``)."""
    if style == "paper":
        return f"{stage_one_message(row, style)}{PAPER_STAGE1_RUBRIC}{rubric_json(row.rubric)}\n{PAPER_STAGE1_ASK}"
    return (stage_one_message(row, style) + "\n\nAn expert wrote this rubric for the question; use it as your "
            f"guide:\n{rubric_json(row.rubric)}")


def teacher_prompt(tok, row, *, style: str = "paper", thinking: bool | None = None, method: str = "rcsd",
                   context: str = "rubric+reference", ablation: str | None = None, task: str = "reasoner") -> list[int]:
    """The teacher's privileged prompt (reason-first adds an analysis turn: ``analysis_prompt``)."""
    if task == "rubric-generator":
        return chat_prompt_ids(tok, stage_one_teacher_message(row, style), thinking)
    rubric, with_reference = teacher_rubric(row, method, context, ablation)
    return chat_prompt_ids(tok, teacher_message(row, rubric, with_reference, style), thinking)


def analysis_prompt(tok, row, *, style: str = "paper", thinking: bool | None = None, method: str = "rcsd",
                    context: str = "reason-first", ablation: str | None = None) -> list[int]:
    """Reason-first: the analysis request, its own user turn, rendered with the teacher's thinking mode."""
    rubric, _ = teacher_rubric(row, method, context, ablation)
    return chat_prompt_ids(tok, analysis_message(row, rubric, style), thinking)


def transition_ids(tok, row, *, style: str = "paper", thinking: bool | None = None, method: str = "rcsd",
                   context: str = "reason-first", ablation: str | None = None) -> list[int]:
    """Reason-first: the text between the teacher's analysis and the student's rollout."""
    rubric, _ = teacher_rubric(row, method, context, ablation)
    return text_ids(tok, transition_text(row, rubric, style))


def reference_target(tok, row, *, style: str = "paper", task: str = "reasoner") -> list[int]:
    """SFT target ids: the reference answer (ending in the answer line the prompt asks for), then EOS."""
    if task == "rubric-generator":
        text = rubric_json(row.rubric)
    else:
        text = (row.reference_answer or row.answer or "").strip()
        if row.answer and style == "paper" and "\\boxed" not in text:
            text += f"\n\nThe final answer is \\boxed{{{row.answer}}}."
        elif row.answer and style != "paper" and "answer:" not in text.lower():
            text += f"\nAnswer: {row.answer}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
