"""The quality benchmark's statistics: Student-t intervals and tests on per-seed differences, Holm.

Methods are compared seed by seed (every method sees the same data order and head for a
seed), so a difference between two methods is the mean of their per-seed differences, with
a 95% t-interval and a two-sided paired t-test.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from scipy import stats as scipy_stats


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t.

    Args:
        x: the point.
        df: degrees of freedom.

    Returns:
        The cumulative probability.
    """
    return float(scipy_stats.t.cdf(x, df))


def t_quantile(p: float, df: int) -> float:
    """The Student-t quantile.

    Args:
        p: the probability, in (0, 1).
        df: degrees of freedom.

    Returns:
        The x with P(T <= x) = p.
    """
    return float(scipy_stats.t.ppf(p, df))


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment: the family-wise error stays at the level each adjusted p is
    compared with (0.05), however many comparisons the family has.

    Args:
        p_values: {name: p}.

    Returns:
        {name: adjusted p}, in increasing order of p.
    """
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value).

    Args:
        values: at least one number.

    Returns:
        (mean, std).
    """
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_difference(a: dict, b: dict, higher_is_better: bool) -> Optional[dict]:
    """Per-seed a - b over the seeds both have: mean, 95% t-interval, p, and whether a wins or loses.

    Args:
        a: {seed: metric} of one method.
        b: {seed: metric} of the other.
        higher_is_better: the metric's direction, for the verdict.

    Returns:
        {"mean", "ci95": [low, high], "seeds", "p" (two-sided paired t-test), "verdict": "win" |
        "loss" | "tie" (the interval excludes 0 on a's good or bad side, or it does not)}; None
        when fewer than two seeds are shared.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    df = len(diffs) - 1
    half = t_quantile(0.975, df) * std / math.sqrt(len(diffs))
    better = mean - half > 0 if higher_is_better else mean + half < 0
    worse = mean + half < 0 if higher_is_better else mean - half > 0
    # identical per-seed results (std 0) give p = 1, differing constant ones p = 0
    p = (1.0 if mean == 0 else 0.0) if std == 0 else 2 * (1 - t_cdf(abs(mean) / (std / math.sqrt(len(diffs))), df))
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": len(seeds), "p": min(1.0, max(0.0, p)),
            "verdict": "win" if better else "loss" if worse else "tie"}


def seed_results(method: dict, seeds=None) -> dict:
    """One method's test metric per seed.

    Args:
        method: a method's entry of a summary (report.summarize), with "test_by_seed".
        seeds: keep only these seeds; None keeps all.

    Returns:
        {seed: test metric}.
    """
    return {int(s): v for s, v in method["test_by_seed"].items() if seeds is None or int(s) in seeds}
