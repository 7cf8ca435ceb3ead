"""Budget mode: choose λ during training so that the live adapter lands on a target size.

Users think in budgets ("about rank 2 per module", "50k adapter parameters by step 300"), not in
λ. :class:`BudgetController` has the interface of :class:`~sora_dist.schedule.LambdaSchedule`
that ``train.train`` uses (``apply``, ``step``, ``value``, ``state_dict``/``load_state_dict``) and
can be passed as ``train(..., lambdas=controller)``.

Design (see SORA.md, "Scale of λ"): with ``prox_adam`` and ``lr_scaled`` τ a gate moves by at most
about η per step and needs Σ η·λ ≈ |g| of shrinkage before it dies, so pruning reacts to λ with a
long, unknown delay. The controller therefore does not compute λ from a model of the dynamics; it
follows a planned trajectory and corrects multiplicatively:

* the reference count falls from the count at step 0 (``N0``) to ``target`` by ``by_step``,
  cubically by default (fast first, slow at the end: AdaLoRA's budget schedule) or linearly, and
  holds ``target`` afterwards;
* after each optimizer step the live count ``n`` is measured (every rank calls ``measure``, so a
  ZeRO-3 gather inside it is collective-safe) and λ is updated:

  - ``n > reference``: behind plan, λ ← min(λ_max, max(λ, λ_max/100) · ``up``) (ramps from 1% to
    100% of λ_max in about a dozen steps);
  - ``target < n <= reference``: ahead of plan, λ ← λ · ``ease`` (slow down, keep going);
  - ``n <= target``: reached, λ ← λ · ``down`` (stop pruning);
  - once λ has reached ``hold · λ_max`` it never goes below it again.

λ is never set to 0 when the target is reached, and not even far below 1: with prox_adam the
gradient of a dead gate (which depends on A and B, not on the gate) usually keeps its sign, so its
bias-corrected Adam step tends to η and it revives as soon as τ = ηλ < η, i.e. λ < 1. Measured on
a tiny Llama, a controller that halved λ at the target (or set 0) swung between 0.5x and 2x the
target as whole groups of ranks died and revived; holding λ at >= 0.7 · λ_max (1.4 for λ_max = 2)
keeps the dead ranks dead while the slow ``down``/``ease`` factors stop the shrinkage of the live
ones. A rank that does revive pushes the count above the target and λ rises again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .optim import gate_groups

TRAJECTORIES = ("cubic", "linear")


class BudgetController:
    """λ controller that drives ``measure()`` (live ranks or adapter parameters) to ``target`` by ``by_step``.

    ``measure()`` returns the current live count in the unit of ``target`` (for example
    ``sparsity_report(model).params``); it is called once before the first step and once per
    optimizer step, on every rank.
    """

    def __init__(
        self,
        target: float,
        by_step: int,
        measure: Callable[[], float] | None,
        lambda_max: float = 1.0,
        trajectory: str = "cubic",
        up: float = 1.25,
        ease: float = 0.95,
        down: float = 0.9,
        hold: float = 0.7,
    ):
        if target < 0:
            raise ValueError(f"budget target must be >= 0, got {target}")
        if by_step < 1:
            raise ValueError(f"budget by_step must be >= 1, got {by_step}")
        if not lambda_max > 0:
            raise ValueError(f"budget lambda_max must be > 0, got {lambda_max}")
        if trajectory not in TRAJECTORIES:
            raise ValueError(f"budget trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
        if not (up > 1 and 0 < ease <= 1 and 0 < down < 1 and 0 <= hold < 1):
            raise ValueError(f"budget factors need up > 1, 0 < ease <= 1, 0 < down < 1, 0 <= hold < 1; got {up}, {ease}, {down}, {hold}")
        self.target, self.by_step, self.measure = float(target), int(by_step), measure
        self.lambda_max, self.trajectory = float(lambda_max), trajectory
        self.up, self.ease, self.down, self.hold = float(up), float(ease), float(down), float(hold)
        self.step_count = 0
        self.lam = 0.0
        self.start_count: float | None = None
        self.last_count: float | None = None
        self.history: list[tuple[int, float, float]] = []  # (step, live count after it, λ for the next step)

    # -- the plan -----------------------------------------------------------------------------
    def reference(self, step: int) -> float:
        """Planned live count after ``step`` optimizer steps."""
        if self.start_count is None or step >= self.by_step:
            return self.target
        start = max(self.start_count, self.target)
        left = 1.0 - step / self.by_step
        shape = left**3 if self.trajectory == "cubic" else left
        return self.target + (start - self.target) * shape

    # -- the LambdaSchedule interface -----------------------------------------------------------
    def value(self, step: int | None = None) -> float:
        return self.lam

    def apply(self, optimizer) -> float:
        if self.start_count is None:
            self.start_count = float(self._measure())
            self.last_count = self.start_count
        for group in gate_groups(optimizer):
            group["prox_lambda"] = self.lam
        return self.lam

    def step(self, optimizer) -> float:
        """One optimizer step happened: measure the live count and set the next λ."""
        self.step_count += 1
        self.update(float(self._measure()))
        return self.apply(optimizer)

    def update(self, count: float) -> float:
        """The control law (no measuring): the λ for the next step given the live count now."""
        if self.start_count is None:
            self.start_count = count
        self.last_count = count
        # Once λ has reached the hold level, it never falls below it: below it every dead gate
        # whose gradient keeps one sign revives (its Adam step tends to η, see the module doc).
        floor = self.lambda_max * self.hold if self.lam >= self.lambda_max * self.hold else 0.0
        if count <= self.target:
            self.lam = max(self.lam * self.down, floor)
        elif count > self.reference(self.step_count):
            self.lam = min(self.lambda_max, max(self.lam, self.lambda_max / 100) * self.up)
        else:
            self.lam = max(self.lam * self.ease, floor)
        self.history.append((self.step_count, count, self.lam))
        return self.lam

    def _measure(self) -> float:
        if self.measure is None:
            raise RuntimeError("BudgetController needs measure=: a callable returning the live count")
        return self.measure()

    def state_dict(self) -> dict:
        return {
            "budget": True,
            "target": self.target,
            "by_step": self.by_step,
            "lambda_max": self.lambda_max,
            "trajectory": self.trajectory,
            "factors": [self.up, self.ease, self.down, self.hold],
            "step_count": self.step_count,
            "lambda": self.lam,
            "start_count": self.start_count,
            "last_count": self.last_count,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state.get("budget"):
            raise ValueError(
                "this checkpoint was written by a run with a fixed lambda schedule, not by budget mode: "
                "resume it without sparsity_budget, or start a fresh output_dir"
            )
        measure = self.measure
        self.__init__(state["target"], state["by_step"], measure, state["lambda_max"], state["trajectory"], *state["factors"])
        self.step_count = int(state["step_count"])
        self.lam = float(state["lambda"])
        self.start_count = state["start_count"]
        self.last_count = state["last_count"]


def plot_budget(metrics_path: str | Path, out_path: str | Path, controller: BudgetController | None = None, unit: str = "adapter_params") -> Path | None:
    """``budget.png``: λ and the live count against the step, from ``metrics.jsonl`` (train records).

    ``unit`` is the metrics key of the live count (``adapter_params`` or ``live_ranks``); with a
    ``controller`` its planned trajectory and target are drawn too. Returns None without records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train" and "lambda" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(steps, [r[unit] for r in records], marker=".", label=f"live {unit}")
    if controller is not None:
        grid = list(range(0, max(max(steps), controller.by_step) + 1))
        top.plot(grid, [controller.reference(s) for s in grid], "--", color="gray", label="planned")
        top.axhline(controller.target, color="red", lw=0.8, label="target")
        top.axvline(controller.by_step, color="red", lw=0.8, ls=":")
    top.set_ylabel(unit)
    top.legend()
    bottom.plot(steps, [r["lambda"] for r in records], marker=".", color="tab:orange")
    bottom.set_ylabel("λ")
    bottom.set_xlabel("optimizer step")
    fig.suptitle("budget mode: live size and λ")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def budget_target(sparsity_report, target_rank: float | None, target_params: int | None) -> tuple[float, str]:
    """(target count, metrics key) for a budget in average rank per module or in parameters."""
    if target_params is not None:
        return float(target_params), "adapter_params"
    return float(target_rank) * len(sparsity_report.modules), "live_ranks"

