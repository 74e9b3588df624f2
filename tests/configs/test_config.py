"""Options defined once: config files, precedence, refusals, recipes, and the rendered prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcsd_cli.commands.common import typer_parameters
from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.configs.sample import SampleConfig
from rcsd_cli.configs.schemas import CONFIG_MODELS
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.options import build_config, option_specs, with_options
from rcsd_cli.errors import RcsdError
from tests.conftest import ROOT, write_jsonl

RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))


@pytest.fixture
def rubrics(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
         "reference_answer": f"{i} + {i} = {2 * i}"} for i in range(1, 5)])
    out = tmp_path / "r.parquet"
    run_cli("gen-rubrics", data, "-o", out, "--generator", "reference", check=True)
    return out


def dry_run_config(proc) -> dict:
    """The resolved config ``train --dry-run`` prints before the prompts."""
    return json.loads(proc.stdout.split("\n\n===== ")[0])


@pytest.mark.parametrize("name", sorted(CONFIG_MODELS))
def test_command_line_defaults_are_the_config_defaults(name):
    model = CONFIG_MODELS[name]
    specs = {s.name: s for s in option_specs(model)}
    for param in typer_parameters(model):
        spec = specs[param.name]
        if not spec.argument:
            assert param.default == spec.default, param.name
    required = {n: "x" for n, f in model.model_fields.items() if f.is_required()}
    assert build_config(model, required) == model.model_validate(required)
    if required:  # train takes --rubrics or --samples: checked when it runs
        with pytest.raises(RcsdError, match="is required"):
            build_config(model, {})


def test_sample_defaults_agree_between_cli_and_library():
    cfg = build_config(SampleConfig, {"rubrics": "r.parquet"})
    assert (cfg.generation.top_p, cfg.generation.top_k, cfg.prompt_style) == (0.95, 20, "paper")


def test_config_file_then_flags(run_cli, tmp_path, rubrics, tiny_model):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model}\nlr: 2.0e-5\nsteps: 7\nloss_top_k: 5\nstudent_thinking: false\n"
                   "generation:\n  temperature: 0.9\n")
    p = run_cli("train", "--config", cfg, "--rubrics", rubrics, "--steps", "3", "--dry-run", check=True)
    shown = dry_run_config(p)
    assert (shown["lr"], shown["steps"], shown["loss"]["top_k"]) == (2e-5, 3, 5)  # the flag wins over the file
    assert shown["generation"]["temperature"] == 0.9 and shown["generation"]["enable_thinking"] is False
    assert "===== student_prompt =====" in p.stdout and "===== teacher_prompt =====" in p.stdout
    assert not (ROOT / "rcsd-model").exists() and not list(tmp_path.glob("rcsd-model*"))


@pytest.mark.parametrize("content, message", [
    ("lr: 1e-5\nwarmup: 3\n", "unknown key 'warmup'"),
    ("steps: many\n", "--steps: Input should be a valid integer"),
    ("generation:\n  temprature: 1\n", "unknown key 'generation.temprature'"),
    ("[1, 2]\n", "expected a mapping"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_config_files_fail_in_one_line(run_cli, tmp_path, rubrics, content, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    p = run_cli("train", "--config", cfg, "--rubrics", rubrics, "--dry-run")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in p.stderr


def test_missing_config_file(run_cli, tmp_path):
    p = run_cli("sample", "r.parquet", "--config", tmp_path / "nope.json")
    assert p.returncode == 2 and "nope.json: config file not found" in p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--loss", "sampled_rkl", "--beta", "0.5"], "--beta has no effect with --loss sampled_rkl"),
    (["--loss", "sampled_rkl", "--clip", "0.1"], "--clip has no effect with --loss sampled_rkl"),
    (["--group-size", "8"], "--group-size has no effect with --method rcsd"),
    (["--analysis-max-new-tokens", "64"], "--analysis-max-new-tokens has no effect without --teacher-context"),
    (["--lora-alpha", "8"], "--lora-alpha has no effect without --lora-rank"),
    (["--samples", "s.parquet", "--scores", "s.parquet", "--teacher", "live"], "--teacher has no effect on an "
     "offline round"),
])
def test_options_the_run_would_ignore_are_refused(run_cli, rubrics, flags, message):
    p = run_cli("train", "--rubrics", rubrics, "--dry-run", *flags)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_clip_can_be_switched_off():
    cfg = build_config(TrainConfig, {"clip": None, "rubrics": "r"})
    assert cfg.loss.clip is None


def test_saved_run_config_reproduces_the_run(run_cli, tmp_path, rubrics, tiny_model):
    args = ["--model", tiny_model, "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--seed", "3"]
    run_cli("train", "--rubrics", rubrics, "-o", tmp_path / "a", *args, check=True)
    saved = tmp_path / "a" / "rcsd_train_config.json"
    p = run_cli("train", "--config", saved, "--dry-run", check=True)
    assert dry_run_config(p) == json.loads(saved.read_text())
    run_cli("train", "--config", saved, "-o", tmp_path / "b", check=True)
    from rcsd_cli.data.artifacts import read_artifact

    a, _ = read_artifact(tmp_path / "a" / "metrics.parquet", "metrics")
    b, _ = read_artifact(tmp_path / "b" / "metrics.parquet", "metrics")
    assert [m.loss for m in a] == [m.loss for m in b]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_one_step_on_a_tiny_model(run_cli, tmp_path, rubrics, tiny_model, recipe):
    import yaml

    from rcsd_cli.data.options import read_config_file

    values = read_config_file(recipe, TrainConfig)
    raw = yaml.safe_load(recipe.read_text())  # what the recipe says, read without rcsd's loader
    assert set(raw) == set(values)
    if values.get("rollout_backend") == "vllm":  # the tiny model's heads are too small for vLLM: HF rollouts here
        values = {k: v for k, v in values.items() if k != "rollout_backend" and not k.startswith("vllm_")}
        recipe = tmp_path / recipe.name
        recipe.write_text(json.dumps(values))
    small = {"steps": 1, "batch_size": 2, "micro_batch_size": 1, "max_new_tokens": 4, "gen_batch_size": 2}
    if values.get("teacher_context") == "reason-first":
        small["analysis_max_new_tokens"] = 4
    flags = [x for k, v in small.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    p = run_cli("train", "--config", recipe, "--model", tiny_model, "--rubrics", rubrics, "-o", tmp_path / "out",
                *flags)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "out"
    # the run used the recipe: every value it sets (loss, clip, reduction, schedule, teacher, ...) reached the
    # written config and the metrics' provenance, except what the command line overrode
    written = json.loads((out / "rcsd_train_config.json").read_text())
    paths = {s.name: s.path for s in option_specs(TrainConfig)}
    expected = {k: raw[k] for k in values} | small | {"model": str(tiny_model), "rubrics": str(rubrics)}
    for name, value in expected.items():
        got = written
        for key in paths[name]:
            got = got[key]
        assert got == value, (recipe.name, name, got, value)
    _, meta = read_artifact(out / "metrics.parquet", "metrics")
    assert meta["config"] == written
    if values.get("lora_rank"):
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == set(values["lora_targets"].split(","))
        assert (adapter["r"], adapter["lora_alpha"]) == (values["lora_rank"], values["lora_alpha"])
        assert adapter["base_model_name_or_path"] == str(tiny_model)
        assert not (out / "model.safetensors").exists()


def test_lora_adapter_loads_with_peft_and_merges_on_request(run_cli, tmp_path, rubrics, tiny_model):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    run_cli("train", "--rubrics", rubrics, "--model", tiny_model, "-o", out, "--steps", "1", "--batch-size", "2",
            "--max-new-tokens", "4", "--lora-rank", "4", "--lora-dropout", "0.1", "--merge-lora", "--lr", "1e-2",
            check=True)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.peft_config["default"].lora_dropout == 0.1
    assert (out / "merged" / "model.safetensors").is_file()
    # rcsd's own stages take the adapter folder as a model
    p = run_cli("eval", "--bench", "rubric", "--data", rubrics, "--model", out, "--max-new-tokens", "4",
                "-o", tmp_path / "e.parquet")
    assert p.returncode == 0, p.stderr[-2000:]


# ----------------------------------------------------------------------------- golden prompts

QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _authors_turn(template: str, message: str, thinking: bool) -> str:
    """The chat text the authors' collator renders, written out by hand for each template."""
    head = SMOL_SYSTEM if template == "smollm2" else ""
    think = "<think>\n\n</think>\n\n" if template == "qwen3" and not thinking else ""
    return f"{head}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n{think}"


@pytest.mark.parametrize("template", ["qwen3", "smollm2"])
@pytest.mark.parametrize("thinking", [True, False])
def test_paper_prompts_match_the_authors_token_for_token(tokenizer_dir, template, thinking):
    from transformers import AutoTokenizer

    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.data.rows import Criterion, Rubric
    from rcsd_cli.rubrics.prompts import text_ids, transition_text
    from rcsd_cli.rubrics.views import PromptView

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template == "qwen3":
        tok.chat_template = QWEN3_STYLE_TEMPLATE
    row = Rubric(id="q", question="Why is the sky blue?", reference_answer="Rayleigh scattering — λ⁻⁴.",
                 rubric=[Criterion(id="a", title="Names scattering", description="Says Rayleigh.", weight=8),
                         Criterion(id="b", title="Claims reflection", description="Ocean reflection.", weight=-1)],
                 rubric_origin="imported")
    cfg = TrainConfig(rubrics="r", generation=GenerationConfig(enable_thinking=thinking))
    rubric = ('[{"title": "Names scattering", "description": "Says Rayleigh.", "weight": 8}, '
              '{"title": "Claims reflection", "description": "Ocean reflection.", "weight": -1}]')
    q, ref = "Why is the sky blue?", "Rayleigh scattering — λ⁻⁴."
    student = f"Question: {q}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    teacher = (f"Question: {q}\n\nReference Answer:\n{ref}\n\nRubric (JSON array):\n{rubric}\n\n"
               "Use the rubric and reference answer as guidance.\n"
               "Please reason step by step, and put your final answer within \\boxed{}.")
    analysis = (f"Question: {q}\n\nReference Answer:\n{ref}\n\nRubric (JSON array):\n{rubric}\n"
                "\n\nThe reference answer and rubric above are guidelines for the questions but may not be perfect. "
                "Briefly explain the key requirements, constraints, and reasoning expectations implied by them. "
                "Do NOT solve the question yet. Do NOT use <think> tags.\n")
    transition = ("\n\n\nThe reference and rubric above is provided only as private guidance to help you understand "
                  "the correct reasoning path. Do NOT mention, cite, or refer to the reference solution, rubric, "
                  "answer key, ground truth, or any external guidance in your response. Do NOT write phrases such "
                  "as 'given the solution', 'from the reference', 'according to the rubric', 'we know the answer "
                  "is', or anything implying that you have seen the answer in advance. Instead, produce a natural, "
                  "self-contained solution as if you are solving the problem independently from the original "
                  "problem statement. Use your own reasoning process, derive the result step by step, and only "
                  "present the final answer after the reasoning supports it. Think step by step, explore different "
                  "approaches if useful, and don't be afraid to backtrack or reconsider if something doesn't work "
                  "out. Put the final answer within \\boxed{}.\n")

    def ids(message):
        return tok(_authors_turn(template, message, thinking), add_special_tokens=False)["input_ids"]

    view = PromptView.for_train(cfg)
    assert view.student_ids(tok, row) == ids(student)
    assert view.teacher_ids(tok, row) == ids(teacher)
    reason_first = with_options(cfg, teacher_context="reason-first")
    assert PromptView.for_train(reason_first).analysis_ids(tok, row) == ids(analysis)
    assert text_ids(tok, transition_text(row, row.rubric, "paper")) == tok(transition)["input_ids"]


def test_reason_first_teacher_input_is_prompt_analysis_transition(tiny_model, monkeypatch):
    """Teacher ids = [analysis prompt ‖ sampled analysis ‖ transition]; the analysis is sampled as configured."""
    from transformers import AutoTokenizer

    from rcsd_cli.data.rows import Criterion, Rubric
    from rcsd_cli.modeling.generation import Generation
    from rcsd_cli.rubrics.prompts import analysis_prompt, text_ids, transition_text
    from rcsd_cli.train.methods import distill
    from rcsd_cli.train.step import StepContext

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = Rubric(id="q", question="2+2?", answer="4", rubric=[Criterion(id="a", title="Says four", weight=5)],
                 rubric_origin="imported")
    cfg = TrainConfig(rubrics="r", teacher_context="reason-first", analysis_temperature=0.7, analysis_top_k=5,
                      analysis_max_new_tokens=9)
    seen = {}

    def teacher_generate(prompts, gen_cfg, seed):
        seen["cfg"] = gen_cfg
        return [Generation([11, 12, 2], "x", "stop") for _ in prompts]

    ctx = StepContext(None, tok, None, None, cfg, 0, teacher_generate)
    (ids,) = distill.reason_first_teacher_prompts(ctx, [row])
    ask = analysis_prompt(tok, row, style="paper", context="reason-first")
    assert ids == ask + [11, 12, 2] + text_ids(tok, transition_text(row, row.rubric, "paper"))
    g = seen["cfg"]
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (0.7, 0.95, 5, 9)


def test_reduction_weights_by_hand():
    from rcsd_cli.train.step import StepContext, reduction_weights

    counts = [2, 6, 0]
    seq = StepContext(None, None, None, None, TrainConfig(rubrics="r"), 0)
    tok = StepContext(None, None, None, None, TrainConfig(rubrics="r", loss_reduction="token"), 0)
    assert reduction_weights(seq, counts) == pytest.approx([1 / (2 * 2), 1 / (6 * 2), 0.0])
    assert reduction_weights(tok, counts) == pytest.approx([1 / 8, 1 / 8, 1 / 8])
    # per-token losses 1.0 on the short sequence and 3.0 on the long one: the two reductions differ
    per_seq_sums = [2 * 1.0, 6 * 3.0, 0.0]
    def loss(ctx):
        return sum(w * s for w, s in zip(reduction_weights(ctx, counts), per_seq_sums, strict=True))

    assert loss(seq) == pytest.approx((1 + 3) / 2) and loss(tok) == pytest.approx(20 / 8)


def test_recipes_are_valid_configs():
    from rcsd_cli.data.options import read_config_file

    assert len(RECIPES) >= 5
    for recipe in RECIPES:
        build_config(TrainConfig, {**read_config_file(recipe, TrainConfig), "rubrics": "r"}, str(recipe))


def test_json_config_for_sample(run_cli, tmp_path, rubrics, tiny_model):
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"model": str(tiny_model), "n": 2, "max_new_tokens": 3, "prompt_style": "answer-line"}))
    run_cli("sample", rubrics, "--config", cfg, "-o", tmp_path / "s.parquet", "--limit", "2", check=True)
    from rcsd_cli.data.artifacts import read_artifact

    rows, meta = read_artifact(tmp_path / "s.parquet", "samples")
    assert len(rows) == 4 and all(len(r.completion_token_ids) <= 3 for r in rows)
    assert meta["config"]["prompt_style"] == "answer-line" and Path(meta["config"]["model"]) == tiny_model


def test_rubric_ablations_change_only_the_rubric():
    from rcsd_cli.data.rows import Criterion, Rubric
    from rcsd_cli.rubrics.ablations import GENERIC_RUBRIC, ablate

    rows = [Rubric(id=f"q{i}", question=f"Q{i}?", answer="1", rubric_origin="imported",
                   rubric=[Criterion(id=f"c{i}{j}", title=f"T{i}{j}", weight=j + 1) for j in range(4)])
            for i in range(5)]
    shuffled = ablate(rows, "shuffled", 0)
    assert all(s.rubric != r.rubric and s.question == r.question for s, r in zip(shuffled, rows, strict=True))
    assert sorted(str(s.rubric) for s in shuffled) == sorted(str(r.rubric) for r in rows)  # a permutation
    assert all(s.rubric == GENERIC_RUBRIC for s in ablate(rows, "generic", 0))
    noisy = ablate(rows, "noisy", 0)
    assert ablate(rows, "noisy", 0) == noisy  # seeded
    for n, r in zip(noisy, rows, strict=True):
        assert sorted(abs(c.weight) for c in n.rubric) == sorted(c.weight for c in r.rubric)
    assert any(c.weight < 0 for n in noisy for c in n.rubric)
    reduced = ablate(rows, "reduced", 0)
    for n, r in zip(reduced, rows, strict=True):  # two of four criteria, kept in their order
        assert len(n.rubric) == 2 and n.rubric == [c for c in r.rubric if c in n.rubric]
    assert ablate(rows, "reduced", 1) != reduced


def test_generic_ablation_is_the_authors_rubric_verbatim():
    """The teacher sees exactly json.dumps(GENERIC_RUBRIC) of rcsd_train_reward.py (github carriegu0818/RCSD)."""
    from rcsd_cli.rubrics.ablations import GENERIC_RUBRIC
    from rcsd_cli.rubrics.prompts import rubric_json

    authors = [
        {"title": "Understand Problem", "description": "Understand the problem: Identify what is being asked and "
         "restate the goal clearly.", "weight": 1},
        {"title": "Identify Information", "description": "Identify relevant information: Extract the important "
         "facts, quantities, constraints, definitions, and assumptions from the problem.", "weight": 1},
        {"title": "Choose Strategy", "description": "Choose an appropriate solution strategy: Select a valid "
         "method, principle, formula, or reasoning approach for solving the problem.", "weight": 1},
        {"title": "Execute Reasoning", "description": "Execute the reasoning carefully: Carry out the solution "
         "step by step, ensuring that each step follows logically from the previous one.", "weight": 1},
        {"title": "Check Correctness", "description": "Check correctness and consistency: Verify calculations, "
         "units, assumptions, edge cases, and whether the answer satisfies the original question.", "weight": 1},
        {"title": "Provide Final Answer", "description": "Provide the final answer clearly: State the final answer "
         "in a concise and unambiguous form.", "weight": 1},
    ]
    assert rubric_json(GENERIC_RUBRIC) == json.dumps(authors, ensure_ascii=False)


def test_no_rubric_ablation_shows_in_the_dry_run(run_cli, rubrics):
    p = run_cli("train", "--rubrics", rubrics, "--dry-run", "--rubric-ablation", "none", check=True)
    teacher = p.stdout.split("===== teacher_prompt =====")[1]
    assert "Reference Answer:" in teacher and "Rubric (JSON array)" not in teacher
    p = run_cli("train", "--rubrics", rubrics, "--dry-run", "--rubric-ablation", "generic", check=True)
    assert "Check correctness and consistency" in p.stdout.split("===== teacher_prompt =====")[1]
    p = run_cli("train", "--rubrics", rubrics, "--dry-run", "--rubric-ablation", "generic", "--method", "opsd")
    assert p.returncode == 2 and "--rubric-ablation has no effect with --method opsd" in p.stderr


def test_config_files_take_the_nested_form_and_the_flat_one(tmp_path):
    from rcsd_cli.data.options import read_config_file

    flat = tmp_path / "flat.yaml"
    flat.write_text("rubrics: r.parquet\nloss: jsd\nbeta: 0.5\nlora_rank: 4\nlora_alpha: 8\nmethod: grpo\n"
                    "group_size: 3\nrollout_backend: vllm\nvllm_sleep: false\nvllm_kv_cache_gib: 2\n"
                    "teacher: live\nteacher_context: reason-first\nanalysis_top_k: 5\nsharding: full-shard\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("rubrics: r.parquet\nloss: {kind: jsd, beta: 0.5}\nlora: {rank: 4, alpha: 8}\nmethod: grpo\n"
                      "grpo: {group_size: 3}\nrollout: {backend: vllm, vllm: {sleep: false, kv_cache_gib: 2}}\n"
                      "teacher: {kind: live, context: reason-first}\nreason_first: {top_k: 5}\n"
                      "distributed: {sharding: full-shard}\n")
    a = build_config(TrainConfig, read_config_file(flat, TrainConfig))
    b = build_config(TrainConfig, read_config_file(nested, TrainConfig))
    assert a == b == TrainConfig(rubrics="r.parquet", loss="jsd", beta=0.5, lora_rank=4, lora_alpha=8,
                                 method="grpo", group_size=3, rollout_backend="vllm", vllm_sleep=False,
                                 vllm_kv_cache_gib=2, teacher="live", teacher_context="reason-first",
                                 analysis_top_k=5, sharding="full-shard")
    assert (a.loss.kind, a.lora.alpha, a.grpo.group_size, a.rollout.vllm.sleep, a.rollout.vllm.kv_cache_gib,
            a.teacher.kind, a.teacher.context, a.reason_first.top_k, a.distributed.sharding) == (
        "jsd", 8, 3, False, 2, "live", "reason-first", 5, "full-shard")
    assert TrainConfig.model_validate(a.model_dump(mode="json")) == a  # what rcsd dumps reads back
    bad = tmp_path / "bad.yaml"
    bad.write_text("rubrics: r.parquet\nrollout: {vllm: {sleeps: false}}\n")
    with pytest.raises(RcsdError, match="unknown key 'rollout.vllm.sleeps'"):
        read_config_file(bad, TrainConfig)


def test_a_group_given_in_part_keeps_the_stage_defaults(tmp_path):
    """``--top-p 0.9`` on train must not reset its sampling temperature 1.2 / top-k 20 to the class defaults."""
    from rcsd_cli.data.options import read_config_file

    train = build_config(TrainConfig, {"rubrics": "r", "top_p": 0.9})
    assert (train.generation.temperature, train.generation.top_k, train.generation.top_p) == (1.2, 20, 0.9)
    evaluation = build_config(EvalConfig, {"bench": "gsm8k", "max_new_tokens": 64})
    assert (evaluation.generation.temperature, evaluation.generation.max_new_tokens) == (0.0, 64)  # still greedy
    file = tmp_path / "c.yaml"
    file.write_text("rubrics: r\ngeneration: {max_new_tokens: 64}\n")
    from_file = build_config(TrainConfig, read_config_file(file, TrainConfig))
    assert (from_file.generation.temperature, from_file.generation.max_new_tokens) == (1.2, 64)
    assert TrainConfig(rubrics="r", generation={"top_k": 5}).generation.temperature == 1.2
    copied = with_options(train, temperature=0.5)  # a copy starts from the config, not the defaults
    assert (copied.generation.temperature, copied.generation.top_p) == (0.5, 0.9)


def test_vllm_settings_are_one_model_for_stages_and_training():
    from rcsd_cli.configs.groups import VllmConfig
    from rcsd_cli.configs.sample import SampleConfig
    from rcsd_cli.configs.train import RolloutConfig

    sample = SampleConfig(rubrics="r", backend="vllm", vllm_enforce_eager=True, vllm_memory_utilization=0.5)
    train = TrainConfig(rubrics="r", rollout_backend="vllm", vllm_enforce_eager=True, vllm_memory_utilization=0.5)
    assert type(sample.backend.vllm) is type(train.rollout.vllm) is VllmConfig
    assert sample.backend.vllm.model_dump(exclude={"sleep"}) == train.rollout.vllm.model_dump(exclude={"sleep"})
    assert RolloutConfig(backend="vllm").memory_share == 0.3 and train.rollout.memory_share == 0.5
    with pytest.raises(ValueError, match="--vllm-enforce-eager has no effect without --backend vllm"):
        SampleConfig(rubrics="r", vllm_enforce_eager=True)
    with pytest.raises(ValueError, match="--vllm-kv-cache-gib has no effect without --rollout-backend vllm"):
        TrainConfig(rubrics="r", vllm_kv_cache_gib=1)


def test_with_options_takes_flat_option_names_and_model_copy_stays_pydantics():
    from pydantic import BaseModel

    cfg = TrainConfig(rubrics="r.parquet")
    copy = with_options(cfg, lora_rank=4, loss="jsd", beta=0.5, steps=3, vllm_enforce_eager=True)
    assert (copy.lora.rank, copy.loss.kind, copy.loss.beta, copy.steps) == (4, "jsd", 0.5, 3)
    assert copy.rollout.vllm.enforce_eager and copy.rollout is not cfg.rollout  # two levels down, copied
    assert (cfg.lora.rank, cfg.loss.kind, cfg.steps, cfg.rollout.vllm.enforce_eager) == (0, "topk_kl", 10, False)
    assert not hasattr(copy, "lora_rank")
    assert TrainConfig.model_copy is BaseModel.model_copy  # not overridden: field names only, as pydantic says


@pytest.mark.slow
def test_max_teacher_prompt_tokens_counts_the_exact_teacher_ids(run_cli, tmp_path, tiny_model):
    """The authors' 2048-token filter: an item stays when its teacher prompt has at most N tokens (N = its exact
    length keeps it, N - 1 drops it); the count is printed by --dry-run and recorded by a run."""
    from rcsd_cli.data.artifacts import read_artifact
    from rcsd_cli.models import load_tokenizer
    from rcsd_cli.rubrics.views import PromptView

    rows = [{"id": f"q{i}", "question": f"What is {i} + {i}" + ", in words" * i + "?", "answer": str(2 * i)}
            for i in range(1, 4)]
    rows.append({"id": "long", "question": "Consider the following. " * 60 + "What is 2 + 2?", "answer": "4"})
    out = tmp_path / "r.parquet"
    run_cli("gen-rubrics", write_jsonl(tmp_path / "d.jsonl", rows), "-o", out, "--generator", "reference", check=True)
    items, _ = read_artifact(out, "rubrics")
    tok = load_tokenizer(str(tiny_model))
    cfg = TrainConfig(rubrics=str(out), model=str(tiny_model))
    view = PromptView.for_train(cfg)
    lengths = {r.id: view.teacher_prompt_length(tok, r) for r in items}
    assert lengths == {r.id: len(view.teacher_ids(tok, r)) for r in items}
    short = max(v for k, v in lengths.items() if k != "long")
    common = ["train", "--rubrics", out, "--model", tiny_model, "--dry-run"]
    p = run_cli(*common, "--max-teacher-prompt-tokens", short, check=True)
    assert f"dropped 1 of 4 items: teacher prompt over {short} tokens" in p.stdout
    p = run_cli(*common, "--max-teacher-prompt-tokens", short - 1, check=True)
    assert f"dropped 2 of 4 items: teacher prompt over {short - 1} tokens" in p.stdout  # q3 goes too
    reason_first = with_options(cfg, teacher_context="reason-first")
    analysis_view = PromptView.for_train(reason_first)  # the analysis prompt is counted
    assert all(analysis_view.teacher_prompt_length(tok, r) != lengths[r.id] for r in items)

    p = run_cli("train", "--rubrics", out, "--model", tiny_model, "-o", tmp_path / "m", "--steps", "1",
                "--batch-size", "2", "--max-new-tokens", "4", "--max-teacher-prompt-tokens", short, check=True)
    _, meta = read_artifact(tmp_path / "m" / "metrics.parquet", "metrics")
    assert meta["teacher_prompt_filter"] == {"max_tokens": short, "dropped": 1, "kept": 3}
    assert "1 of 4 items dropped: teacher prompt over" in (tmp_path / "m" / "README.md").read_text()
    p = run_cli("train", "--rubrics", out, "--model", tiny_model, "--method", "grpo", "--dry-run",
                "--max-teacher-prompt-tokens", "10")
    assert p.returncode == 2 and "--max-teacher-prompt-tokens has no effect" in p.stderr
