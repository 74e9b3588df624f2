"""Interval maths against values computed by hand (t quantiles from a table: 3.182 for 3, 4.303 for 2 degrees)."""

import math

import pytest

from rcsd_cli.evaluation.stats import mean_interval, paired_interval, t_critical, wilson_interval


def test_t_quantiles_match_the_table():
    assert t_critical(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_critical(3) == pytest.approx(3.182446, abs=1e-6)
    assert t_critical(63) == pytest.approx(1.998341, abs=1e-6)
    assert t_critical(10**6) == pytest.approx(1.959964, abs=1e-5)


def test_mean_interval_is_a_t_interval():
    # mean 2.5, sd sqrt(5/3) = 1.290994, se 0.645497, half 3.182446 * 0.645497 = 2.054260
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert (mean, lo, hi) == pytest.approx((2.5, 0.445740, 4.554260), abs=1e-5)
    assert mean_interval([7.0]) == (7.0, 7.0, 7.0)
    assert all(math.isnan(v) for v in mean_interval([]))


def test_three_seeds_get_more_than_twice_the_normal_width():
    values = [0.1, -0.2, 0.05]
    mean, lo, hi = mean_interval(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert (hi - lo) / 2 == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    assert (hi - lo) / 2 > 2.19 * 1.959964 * sd / math.sqrt(3)


def test_paired_interval_is_the_interval_of_the_differences():
    # differences 1, 2, 2: mean 5/3, sd sqrt(1/3), se 1/3, half 4.302653 / 3 = 1.434218
    assert paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 1.0]) == pytest.approx((5 / 3, 0.232449, 3.100884), abs=1e-5)
    with pytest.raises(ValueError, match="differ in number"):
        paired_interval([1.0], [1.0, 2.0])


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre 0.992073 / 1.384146 = 0.716741, half 0.313616 / 1.384146 = 0.226577
    assert wilson_interval(8, 10) == pytest.approx((0.490164, 0.943318), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / (20 + 3.841459), abs=1e-6)  # z^2 / (n + z^2)


def eval_item(i, correct, rubric=None, tokens=(5,)):
    from rcsd_cli.data.rows import EvalItem

    graded = [c for c in correct if c is not None]
    return EvalItem(id=f"q{i}", bench="t", question="?", choices=None, gold=None if not graded else "1",
                    completions=["x"] * len(correct), completion_tokens=list(tokens) * len(correct),
                    predictions=["1"] * len(correct), correct=correct,
                    accuracy=sum(graded) / len(graded) if graded else None,
                    rubric_scores=[rubric] * len(correct), rubric_score=rubric)


def test_eval_summary_by_hand():
    """avg@4 per item [1, 0.25, 0] (an ungraded item left out): accuracy 5/12 with a t interval over the 3
    items (sd 0.520416, t(2) 4.302653); pass@k with Chen et al.'s estimator; rubric mean 0.5 over 3 scores."""
    from rcsd_cli.stages.eval import summarise

    items = [eval_item(0, [True] * 4, 0.5), eval_item(1, [True, False, False, False], 0.2, tokens=(3,)),
             eval_item(2, [False] * 4), eval_item(3, [None] * 4, 0.8)]
    s = summarise(items, 4, 1.0)
    assert (s["items"], s["graded_items"], s["n"]) == (4, 3, 4)
    assert s["accuracy"] == pytest.approx(5 / 12)
    assert s["accuracy_ci"] == pytest.approx([-0.876120, 1.709453], abs=1e-5)
    # pass@2: 1, 1 - C(3,2)/C(4,2) = 0.5, 0; pass@4: 1, 1, 0
    assert s["pass_at"] == pytest.approx({"1": 5 / 12, "2": 0.5, "4": 2 / 3})
    assert s["rubric_score"] == pytest.approx(0.5)
    assert s["rubric_score_ci"] == pytest.approx([-0.245241, 1.245241], abs=1e-5)
    assert s["mean_completion_tokens"] == pytest.approx((4 * 5 + 4 * 3 + 4 * 5 + 4 * 5) / 16)


def test_one_sample_per_item_gets_a_wilson_interval():
    # 2 of 3: centre (p + z^2/2n) / (1 + z^2/n) = 0.573086, half 0.365421
    from rcsd_cli.stages.eval import summarise

    s = summarise([eval_item(0, [True]), eval_item(1, [False]), eval_item(2, [True])], 1, 1.0)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["accuracy_ci"] == pytest.approx([0.207660, 0.938508], abs=1e-5)
    assert s["pass_at"] == pytest.approx({"1": 2 / 3})
