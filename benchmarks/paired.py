"""Paired differences between two arms of a benchmark, with 95% intervals.

Every arm is run with the same seeds on the same test examples, so arm B is compared with arm A
seed by seed and example by example. Per seed we have, for every test example i, a value x_i
(1/0 for a right/wrong answer, the log-likelihood of the correct label, a chat's mean token
cross-entropy) and optionally a weight w_i (a chat's token count, so that the seed's metric is
the token-weighted mean). The seed's metric is sum(w x) / sum(w); the paired difference of a
seed is metric_B - metric_A on the same examples.

Two intervals are reported:

``t``          a t interval over the per-seed differences (S - 1 degrees of freedom): it counts
               the spread between training runs (seeds) and, inside each seed's difference, the
               test sample's own noise. It is the one a difference is called significant by.
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
    same test examples, the same tokens). Returns the per-seed differences, their mean, the t
    interval's standard error and bounds, the bootstrap bounds, and ``significant`` (the t
    interval excludes 0). With one seed the t interval is undefined and only the bootstrap over
    examples is given.
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
    out = {"seeds": seeds, "per_seed": per_seed, "mean": mean, "n_examples": n.pop()}
    if len(seeds) > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in per_seed) / (len(seeds) - 1))
        se = sd / math.sqrt(len(seeds))
        half = t_quantile(0.5 + LEVEL / 2, len(seeds) - 1) * se
        out.update(se=se, t_low=mean - half, t_high=mean + half, significant=bool(mean - half > 0 or mean + half < 0))
    else:
        out.update(se=None, t_low=None, t_high=None, significant=None)
    out["boot_low"], out["boot_high"] = bootstrap(
        torch.stack([b[s].double() - a[s].double() for s in seeds]), torch.stack([w[s] for s in seeds]), scale, replicates, seed
    )
    # The test sample's share of the noise: the standard error of one seed's difference over its
    # examples (the spread a larger test set would shrink), averaged over seeds.
    out["se_examples"] = sum(scale * example_se(b[s].double() - a[s].double(), w[s]) for s in seeds) / len(seeds)
    return out


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
    """``+0.41 [-0.30, +1.12] (se 0.25)``: the mean difference, the t interval (the bootstrap
    interval with one seed), marked * when significant."""
    if result["t_low"] is None:
        return f"{result['mean']:+.{digits}f} [boot {result['boot_low']:+.{digits}f}, {result['boot_high']:+.{digits}f}]"
    mark = " *" if result["significant"] else ""
    return f"{result['mean']:+.{digits}f} [{result['t_low']:+.{digits}f}, {result['t_high']:+.{digits}f}]{mark}"
