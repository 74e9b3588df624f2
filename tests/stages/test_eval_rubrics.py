"""``rcsd eval-rubrics``: the authors' rubric-quality protocol (judge prompt, reply reading, win rates)."""

import json

import pytest

from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.rows import Criterion
from rcsd_cli.evaluation.rubric_quality import parse_quality_reply, win_counts
from tests.backends.test_faults import FakeServer
from tests.conftest import ROOT, write_jsonl

GOLDEN = ROOT / "tests" / "golden"
ICE_GT = [Criterion(id="a", title="Density comparison", weight=7,
                    description="Essential Criteria: States that ice is less dense than liquid water."),
          Criterion(id="b", title="Denser ice", weight=-1, description="Pitfall Criteria: Claims ice is denser "
                    "than water.")]
ICE_GEN = [Criterion(id="c", title="Mentions hydrogen bonds", weight=5,
                     description="Attributes the open lattice to hydrogen bonding.")]


def test_judge_prompt_is_the_authors_text():
    """GOLDEN: their JUDGE_SYSTEM_PROMPT and build_user_prompt(...) (run_rubric_quality_eval_hf.py, 90a35b6)."""
    from rcsd_cli.rubrics.prompts import RUBRIC_QUALITY_SYSTEM, rubric_quality_message

    assert RUBRIC_QUALITY_SYSTEM == (GOLDEN / "authors_rubric_quality_system.txt").read_text(encoding="utf-8")
    message = rubric_quality_message(
        "Why does ice float on liquid water?",
        "Ice is less dense than liquid water because hydrogen bonds hold its molecules in an open lattice.",
        {"GT": ICE_GT, "generated": ICE_GEN})
    assert message == (GOLDEN / "authors_rubric_quality_user.txt").read_text(encoding="utf-8")


def scores(**overall):
    return {name: {"relevance": v, "correctness": v, "completeness": v, "specificity": v, "non_redundancy": v,
                   "usefulness": v} for name, v in overall.items()}


def test_replies_are_read_as_the_authors_read_them():
    reply = "```json\n" + json.dumps({"scores": {"reference": scores(x=4)["x"] | {"usefulness": 9},
                                                 "Generated": scores(x=2)["x"]}, "brief_reason": "r"}) + "\n```"
    got, best, reason = parse_quality_reply(reply, ["GT", "generated"])
    assert got["GT"]["usefulness"] == 5.0  # clamped to [1, 5]
    assert got["GT"]["overall"] == pytest.approx((4 * 5 + 5) / 6)  # recomputed, not the judge's
    assert got["generated"]["overall"] == 2.0 and best == "GT" and reason == "r"  # best: highest overall
    with pytest.raises(ValueError, match="no scores for rubric 'generated'"):
        parse_quality_reply(json.dumps({"scores": scores(GT=3)}), ["GT", "generated"])
    with pytest.raises(ValueError, match="no numeric specificity"):
        bad = scores(GT=3, generated=3)
        del bad["generated"]["specificity"]
        parse_quality_reply(json.dumps({"scores": bad}), ["GT", "generated"])
    with pytest.raises(ValueError, match="not JSON"):
        parse_quality_reply("I prefer the first one.", ["GT", "generated"])


def test_win_counts_by_hand():
    judged = [{n: d | {"overall": sum(d.values()) / 6} for n, d in scores(GT=g, generated=x).items()}
              for g, x in ((4, 5), (3, 3), (5, 2), (2, 4))]
    assert win_counts(judged, ["GT", "generated"], "overall") == ({"GT": 1, "generated": 2}, 1)


@pytest.mark.slow
def test_eval_rubrics_end_to_end_against_a_scripted_judge(run_cli, tiny_model, tmp_path):
    rows = [{"id": f"q{i}", "question": f"Why is {i} small?", "reference_answer": f"{i} < 10.",
             "rubric": [{"title": "Compares with ten", "description": "Says it is below ten.", "weight": 5}]}
            for i in range(3)]
    gen = [dict(r, rubric=[{"title": "Any reason", "description": "Gives a reason.", "weight": 3}]) for r in rows]
    gen[2]["question"] = "An unrelated question?"  # only q0 and q1 match
    write_jsonl(tmp_path / "ref.jsonl", rows)
    write_jsonl(tmp_path / "gen.jsonl", gen)
    run_cli("gen-rubrics", tmp_path / "gen.jsonl", "-o", tmp_path / "gen.parquet", check=True)
    win = json.dumps({"scores": scores(GT=3, generated=4), "best_rubric": "generated", "brief_reason": "b"})
    server = FakeServer([("reply", "not json"), ("reply", win), ("reply", win)])
    try:
        p = run_cli("eval-rubrics", tmp_path / "gen.parquet", "--reference", tmp_path / "ref.jsonl", "--judge-model",
                    tiny_model, "--backend", "openai", "--base-url", server.url, "--concurrency", "1", "-o",
                    tmp_path / "q.parquet", check=True)
    finally:
        server.httpd.shutdown()
    assert server.requests == 3  # q0 unusable then asked again, q1 once
    out, meta = read_artifact(tmp_path / "q.parquet", "rubric-quality")
    assert [r.id for r in out] == ["q0", "q1"] and all(r.scores and r.error is None for r in out)
    overall = meta["summary"]["metrics"]["overall"]
    assert overall["generated"]["win_rate"] == 1.0 and overall["GT"]["mean"] == 3.0 and overall["ties"] == 0
    assert overall["generated"]["win_rate_ci"][0] == pytest.approx(0.342, abs=1e-3)  # Wilson, 2 of 2
    assert "generated win rate" in p.stdout

    p = run_cli("eval-rubrics", tmp_path / "gen.parquet", "--reference", tmp_path / "gen.parquet", "--name", "GT",
                "--judge-model", tiny_model, "-o", tmp_path / "x.parquet")
    assert p.returncode == 2 and "GT is the reference rubric's name" in p.stderr
