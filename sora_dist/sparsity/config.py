"""The YAML sections that choose λ differently from train.lambda_*: ``sparsity_schedule`` (the
staged Algorithm 1, run by :mod:`sora_dist.training.stages`) and ``sparsity_budget`` (budget mode,
:mod:`sora_dist.sparsity.budget`); and the vocabularies of the λ ramps."""

from __future__ import annotations

import dataclasses
import math

from ..options import ConfigError, choice, option

LAMBDA_KINDS = ("constant", "linear", "geometric")
STAGE_KINDS = ("linear", "geometric", "list")
TRAJECTORIES = ("cubic", "linear")
UNITS = ("live_ranks", "adapter_params")


def check_lambda_ramp(kind: str, start: float, end: float | None, steps: int, key: str = "lambda") -> None:
    """A λ ramp that can run: a known kind, finite λ >= 0, > 0 for a geometric ramp, steps for a ramp."""
    choice(f"{key}_kind", kind, LAMBDA_KINDS)
    end = start if end is None else end
    if not (math.isfinite(start) and math.isfinite(end) and start >= 0 and end >= 0):
        raise ConfigError(f"{key}_start: lambda must be >= 0 and finite, got start={start}, end={end}")
    if kind == "geometric" and not (start > 0 and end > 0):
        raise ConfigError(f"{key}_start: a geometric lambda ramp needs start > 0 and end > 0, got start={start}, end={end}")
    if kind != "constant" and steps < 1:
        raise ConfigError(f"{key}_steps: a {kind} lambda ramp needs steps >= 1, got {steps}")


def check_budget(target: float, by_step: int, lambda_max: float, trajectory: str) -> None:
    """Budget-mode values that can run (the target in either unit)."""
    if not target >= 0:
        raise ConfigError(f"target: budget target must be >= 0, got {target}")
    if by_step < 1:
        raise ConfigError(f"by_step: required: the optimizer step by which to reach the target (>= 1), got {by_step}")
    if not 0 < lambda_max <= 10:
        raise ConfigError(f"lambda_max: must be in (0, 10] (prox_adam + lr_scaled: 1.5-3), got {lambda_max}")
    choice("trajectory", trajectory, TRAJECTORIES)


@dataclasses.dataclass
class SparsitySchedule:
    """λ_0 ≤ λ_1 ≤ ... ≤ λ_{K-1}: ``stages`` values spaced linearly or geometrically from ``start``
    to ``end``, or the explicit ``values``. ``steps_per_stage`` None takes ``train.steps``.
    ``compact``: remove the dead ranks physically between stages."""

    kind: str = option(
        "linear",
        "linear | geometric (stages lambdas from start to end) | list (the lambdas in values); "
        "present, this section runs the stages instead of one training run (train.lambda_* are then unused)",
    )
    start: float | None = option(None, "lambda of the first stage (linear | geometric; > 0 for geometric)")
    end: float | None = option(None, "lambda of the last stage (>= start)")
    stages: int | None = option(None, "number of stages K (linear | geometric)")
    values: list[float] | None = option(None, "kind=list: the non-decreasing lambdas, one per stage, e.g. [0.1, 0.3, 1.0]")
    steps_per_stage: int | None = option(
        None, "optimizer steps of each stage, each with its own warm-up/decay of the lr (default: train.steps)"
    )
    train_subset: int = option(128, "memorization is scored on the first N training examples")
    compact: bool = option(
        False,
        "remove the dead ranks (gates exactly 0) physically between stages, so later stages train a smaller "
        "adapter (a removed rank cannot revive); stages.csv gets adapter_params and step_time_s",
    )

    def __post_init__(self):
        choice("kind", self.kind, STAGE_KINDS)
        if self.kind == "list":
            self._check_list()
        else:
            self._check_spacing()
        if self.steps_per_stage is not None and self.steps_per_stage < 1:
            raise ConfigError(f"steps_per_stage: must be >= 1, got {self.steps_per_stage}")
        if self.train_subset < 1:
            raise ConfigError(f"train_subset: must be >= 1 training examples, got {self.train_subset}")

    def _check_list(self) -> None:
        for key in ("start", "end", "stages"):
            if getattr(self, key) is not None:
                raise ConfigError(f"{key}: not used with kind=list (the stages are the entries of values)")
        if not self.values:
            raise ConfigError("values: kind=list needs a non-empty list of lambdas, e.g. [0.1, 0.3, 1.0]")
        if any(not v >= 0 for v in self.values) or list(self.values) != sorted(self.values):
            raise ConfigError(f"values: lambdas must be >= 0 and non-decreasing (lambda rises through the stages), got {self.values}")

    def _check_spacing(self) -> None:
        if self.values is not None:
            raise ConfigError(f"values: only used with kind=list, not kind={self.kind}")
        for key in ("start", "end", "stages"):
            if getattr(self, key) is None:
                raise ConfigError(f"{key}: required with kind={self.kind}")
        if self.kind == "geometric" and not self.start > 0:
            raise ConfigError(f"start: must be > 0 for a geometric spacing, got {self.start}")
        if not self.start >= 0:
            raise ConfigError(f"start: lambda must be >= 0, got {self.start}")
        if not self.end >= self.start:
            raise ConfigError(f"end: must be >= start={self.start} (lambda rises through the stages), got {self.end}")
        if self.stages < 1:
            raise ConfigError(f"stages: must be >= 1, got {self.stages}")

    def lambdas(self) -> list[float]:
        if self.kind == "list":
            return [float(v) for v in self.values]
        if self.stages == 1:
            return [float(self.start)]
        fractions = [k / (self.stages - 1) for k in range(self.stages)]
        if self.kind == "linear":
            return [self.start + (self.end - self.start) * f for f in fractions]
        return [self.start * (self.end / self.start) ** f for f in fractions]


@dataclasses.dataclass
class SparsityBudget:
    """Budget mode: λ is chosen at every step so the live adapter follows a planned size to a target."""

    target_rank: float | None = option(
        None,
        "budget as the average live rank per SoRA module (0..sora.r); present, this section sets lambda during "
        "training (train.lambda_* are then unused); give this or target_params",
    )
    target_params: int | None = option(None, "budget as the number of non-zero adapter parameters (sum of live rank x (d_in + d_out))")
    by_step: int = option(0, "optimizer step by which the live count should reach the target (<= train.steps); held afterwards")
    lambda_max: float = option(
        2.0,
        "largest lambda of any step, i.e. the fastest shrinkage (prox_adam + lr_scaled: > 1, 1.5-3); "
        "without train.gate_lr, the gate lr is chosen so that this lambda can prune in time",
    )
    trajectory: str = option("cubic", "planned decrease from the start count to the target: cubic (fast first, AdaLoRA-style) | linear")

    def __post_init__(self):
        if (self.target_rank is None) == (self.target_params is None):
            raise ConfigError("target_rank: give exactly one of target_rank (average live rank per module) or target_params")
        unit, target = ("target_rank", self.target_rank) if self.target_params is None else ("target_params", self.target_params)
        if not target >= 0:
            raise ConfigError(f"{unit}: must be >= 0, got {target}")
        check_budget(target, self.by_step, self.lambda_max, self.trajectory)
