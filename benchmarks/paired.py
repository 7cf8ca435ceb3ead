"""Paired differences between two arms of a benchmark, with 95% intervals.

Every arm is run with the same seeds on the same test examples, so arm B is compared with arm A
seed by seed and example by example. Per seed we have, for every test example i, a value x_i
(1/0 for a right/wrong answer, the log-likelihood of the correct label, a chat's mean token
cross-entropy) and optionally a weight w_i (a chat's token count, so that the seed's metric is
the token-weighted mean). The seed's metric is sum(w x) / sum(w); the paired difference of a
seed is metric_B - metric_A on the same examples.

Two sources of noise separate two arms' measured difference from the one a user would see: the
training runs (seeds), and the test examples (a finite sample of the task). The test set is the
same for every seed, so the spread of the per-seed differences shows only the first. Reported:

``t``          mean ± t(df) x se, with se^2 = se_seeds^2 + se_examples^2: se_seeds the standard
               error of the mean of the per-seed differences, se_examples the standard error over
               test examples of each example's seed-averaged difference (a ratio estimator when the
               metric is token-weighted), df from Welch-Satterthwaite (S - 1 for the seeds' part,
               n - 1 for the examples'). Both parts count the examples' own run-to-run noise, once
               more than needed, so the interval errs wide. It is the one a difference is called
               significant by.
``bootstrap``  a paired bootstrap over seeds and test examples: each replicate draws S seeds with
               replacement and one set of n test examples with replacement (the same examples for
               every seed and both arms) and averages the seeds' differences. With few seeds it
               understates the spread between seeds; it is shown next to the t interval, not used
               to decide.

The Student t quantile is computed here (numerical integration of the density and bisection)
because the benchmarks do not depend on scipy.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def upper_cdf(x: float) -> float:  # P(0 <= T <= x), trapezoid on a fine grid in float64
        grid = torch.linspace(0.0, x, 20001, dtype=torch.float64)
        density = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(grid**2 / df))
        return float(torch.trapezoid(density, grid))

    lo, hi = 0.0, 1.0
    while upper_cdf(hi) < p - 0.5:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_cdf(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def seed_metric(values: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    values = values.double()
    if weights is None:
        return float(values.mean())
    weights = weights.double()
    return float((values * weights).sum() / weights.sum())


def paired(
    a: Mapping[int, torch.Tensor],
    b: Mapping[int, torch.Tensor],
    weights: Mapping[int, torch.Tensor] | None = None,
    scale: float = 1.0,
    replicates: int = 2000,
    seed: int = 0,
) -> dict:
    """B - A over the seeds both arms have, times ``scale`` (100 for points of accuracy).

    ``a[s]`` and ``b[s]`` hold the per-example values of seed ``s`` in the same example order;
    ``weights[s]`` (optional) the per-example weights (they must be the same for both arms: the
    same test examples, the same tokens). Returns the per-seed differences, their mean, the
    standard errors (``se_seeds``, ``se_examples`` and their combination ``se``), the t interval,
    the bootstrap bounds, and ``significant`` (the t interval excludes 0). With one seed there is
    no spread between seeds to measure: the interval is the examples' normal interval.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired: the two arms have no seed in common")
    n = {len(a[s]) for s in seeds} | {len(b[s]) for s in seeds}
    if len(n) != 1:
        raise ValueError(f"paired: per-example values differ in length between seeds or arms: {sorted(n)}")
    w = {s: (weights[s].double() if weights is not None else torch.ones(len(a[s]), dtype=torch.float64)) for s in seeds}
    per_seed = [scale * (seed_metric(b[s], w[s]) - seed_metric(a[s], w[s])) for s in seeds]
    mean = sum(per_seed) / len(per_seed)
    diff = torch.stack([b[s].double() - a[s].double() for s in seeds])
    weight = torch.stack([w[s] for s in seeds])
    # Each example's difference averaged over the seeds (its weight: the seeds' mean weight).
    se_examples = scale * example_se((diff * weight).sum(0) / weight.sum(0), weight.mean(0))
    out = {"seeds": seeds, "per_seed": per_seed, "mean": mean, "n_examples": n.pop(), "se_examples": se_examples}
    n_examples = out["n_examples"]
    se_seeds = math.sqrt(sum((d - mean) ** 2 for d in per_seed) / (len(seeds) - 1) / len(seeds)) if len(seeds) > 1 else 0.0
    se = math.sqrt(se_seeds**2 + se_examples**2)
    out.update(se_seeds=se_seeds if len(seeds) > 1 else None, se=se, df=degrees_of_freedom(se_seeds, len(seeds), se_examples, n_examples))
    quantile = t_quantile(0.5 + LEVEL / 2, max(1, round(out["df"])))
    out.update(t_low=mean - quantile * se, t_high=mean + quantile * se)
    out["significant"] = bool(out["t_low"] > 0 or out["t_high"] < 0)
    out["boot_low"], out["boot_high"] = bootstrap(diff, weight, scale, replicates, seed)
    return out


def degrees_of_freedom(se_seeds: float, seeds: int, se_examples: float, examples: int) -> float:
    """Welch-Satterthwaite: the degrees of freedom of a sum of two variance estimates, one from
    ``seeds`` - 1, the other from ``examples`` - 1 degrees of freedom (capped at 10^6)."""
    parts = (se_seeds**4 / (seeds - 1) if seeds > 1 else 0.0) + (se_examples**4 / (examples - 1) if examples > 1 else 0.0)
    total = (se_seeds**2 + se_examples**2) ** 2
    return min(1e6, total / parts) if parts > 0 else 1e6


def example_se(diff: torch.Tensor, weights: torch.Tensor) -> float:
    """Standard error of a weighted mean of ``diff`` over its examples (ratio estimator)."""
    n = len(diff)
    mean = (diff * weights).sum() / weights.sum()
    residual = weights * (diff - mean) / weights.mean()
    return float(residual.std() / math.sqrt(n)) if n > 1 else float("nan")


def bootstrap(diff: torch.Tensor, weights: torch.Tensor, scale: float, replicates: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of each seed's weighted mean difference,
    resampling seeds and (shared) test examples. ``diff`` and ``weights`` are [seeds, examples]."""
    generator = torch.Generator().manual_seed(seed)
    seeds, n = diff.shape
    weighted = diff * weights
    draws = []
    for start in range(0, replicates, 100):
        count = min(100, replicates - start)
        rows = torch.randint(seeds, (count, seeds), generator=generator)
        cols = torch.randint(n, (count, n), generator=generator)
        num = weighted[rows[:, :, None], cols[:, None, :]].sum(-1)
        den = weights[rows[:, :, None], cols[:, None, :]].sum(-1)
        draws.append(scale * (num / den).mean(-1))
    draws = torch.cat(draws).sort().values
    low = draws[int(math.floor((1 - LEVEL) / 2 * (replicates - 1)))]
    high = draws[int(math.ceil((1 + LEVEL) / 2 * (replicates - 1)))]
    return float(low), float(high)


def describe(result: dict, digits: int = 2) -> str:
    """``+0.41 [-0.30, +1.12] *``: the mean difference and its t interval, marked * when significant."""
    mark = " *" if result["significant"] else ""
    return f"{result['mean']:+.{digits}f} [{result['t_low']:+.{digits}f}, {result['t_high']:+.{digits}f}]{mark}"
