"""Confidence intervals for accuracies and mean scores."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile: 4.30 for 2 degrees of freedom, 2.00 for 63, 1.96 in the limit."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean with its Student-t interval (sample standard deviation, n - 1 degrees of freedom): with 3 seeds the
    normal approximation's 1.96 standard errors would claim less than half the width the data support."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1, level) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired observations (same item or seed), with its t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number ({len(a)} vs {len(b)})")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], level)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with ``correct`` right (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n = {n})")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)
