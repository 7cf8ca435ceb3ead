"""Budget mode: the live adapter follows a planned size down to a target, and lands on it.

Users think in budgets ("about rank 2 per module", "50k adapter parameters by step 300"), not in
λ. :class:`BudgetController` is a :class:`~sora_dist.sparsity.controller.LambdaController`, like
:class:`~sora_dist.sparsity.schedule.LambdaSchedule`, and is passed as
``train(..., lambdas=controller)``. docs/method.md, "Budget mode", gives the reasoning.

How it chooses λ. A feedback law on λ cannot land on a target with ``prox_adam``: pruning lags λ
by the Σ η·λ ≈ |g| a gate needs before it dies, and once λ is high enough to prune, the gates
already on their way keep dying (docs/method.md, "Scale of λ"). Instead the controller tells the
optimizer, before each step, how many ranks the plan keeps after it (``prox_keep`` in the gate
group). After the gradient step has produced the pre-threshold gates z, the optimizer uses the
smallest τ whose soft-threshold leaves that many non-zero (the (keep+1)-th largest |z|), capped at
the τ of ``lambda_max`` (:func:`sora_dist.core.optim.keep_threshold`). So:

* the proximal step is still S_τ, with τ = η_t·λ_t and λ_t ≤ ``lambda_max`` chosen per step; the
  logged λ is that λ_t;
* the live count follows the plan exactly while the cap allows, and never falls below it: the
  ranks that die are the smallest |z|, every survivor is shrunk by the same small τ;
* a dead rank whose gradient step would revive it past a live one swaps places with it, and the
  count stays on the target after ``by_step``;
* where the cap binds (a gate lr too small to shrink the gates in time) the count lags the plan;
  :func:`gate_lr_for_budget` gives a gate lr that can keep up, and the recipe uses it by default.

The plan falls from the count at step 0 to ``target`` by ``by_step``, cubically by default (fast
first, slow at the end: AdaLoRA's budget schedule) or linearly, and holds ``target`` afterwards.
In ``adapter_params`` units the plan is turned into ranks with the parameters per live rank of
the moment, so it lands within about one rank's parameters of the target.

Under DeepSpeed ZeRO-1/2/3 the optimizer holds shards of the gate group; the threshold then needs
every shard's |z|: two small collectives per step (see :func:`sora_dist.core.optim.keep_threshold`).
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from ..backends.fsdp2 import whole
from ..backends.zero import gathered
from ..core.inject import sora_modules
from ..core.optim import last_lambda, set_lambda
from ..core.report import sparsity_report
from .config import UNITS, check_budget


class BudgetController:
    """Drives the live size of ``model``'s SoRA adapter (``unit``: live ranks or non-zero adapter
    parameters) to ``target`` by optimizer step ``by_step``, choosing λ ≤ ``lambda_max`` each step.

    ``model`` is the bare module (not a DDP/DeepSpeed wrapper around it); every rank measures it
    after each step (under ZeRO-3 the gate gather inside is collective).
    """

    def __init__(self, model: nn.Module, target: float, by_step: int, unit: str = "live_ranks", lambda_max: float = 2.0, trajectory: str = "cubic"):  # fmt: skip
        check_budget(target, by_step, lambda_max, trajectory)
        if unit not in UNITS:
            raise ValueError(f"budget unit must be one of {UNITS}, got {unit!r}")
        self.model, self.target, self.by_step, self.unit = model, float(target), int(by_step), unit
        self.lambda_max, self.trajectory = float(lambda_max), trajectory
        self.step_count = 0
        self.lam = 0.0
        self.start_count: float | None = None
        self.last_count: float | None = None
        self.params_per_rank: float | None = None
        self.history: list[tuple[int, float, float]] = []  # (step, live count after it, λ it used)

    # -- the plan -----------------------------------------------------------------------------
    def reference(self, step: int) -> float:
        """Planned live count after ``step`` optimizer steps."""
        if self.start_count is None or step >= self.by_step:
            return self.target
        start = max(self.start_count, self.target)
        left = 1.0 - step / self.by_step
        shape = left**3 if self.trajectory == "cubic" else left
        return self.target + (start - self.target) * shape

    def keep(self, step: int) -> int:
        """Ranks the plan keeps alive after ``step`` optimizer steps."""
        planned = self.reference(step)
        if self.unit == "adapter_params":
            planned /= self.params_per_rank or 1.0
        return max(0, math.floor(planned + 1e-6))

    # -- the LambdaController interface ---------------------------------------------------------
    def value(self, step: int | None = None) -> float:
        return self.lam

    def apply(self, optimizer) -> float:
        """Before a step: the cap λ_max and the number of ranks to keep after it."""
        if self.start_count is None:
            self._measure()
            self.start_count = self.last_count
        set_lambda(optimizer, self.lambda_max, keep=self.keep(self.step_count + 1))
        return self.lam

    def step(self, optimizer) -> float:
        """After a step: record the λ it used and the live count it left."""
        self.step_count += 1
        self.lam = last_lambda(optimizer)
        self._measure()
        self.history.append((self.step_count, self.last_count, self.lam))
        return self.apply(optimizer)

    def _measure(self) -> None:
        report = sparsity_report(self.model)
        self.last_count = float(report.params if self.unit == "adapter_params" else report.live_rank)
        if report.live_rank:
            self.params_per_rank = report.params / report.live_rank

    def state_dict(self) -> dict:
        return {
            "budget": True,
            "target": self.target,
            "by_step": self.by_step,
            "unit": self.unit,
            "lambda_max": self.lambda_max,
            "trajectory": self.trajectory,
            "step_count": self.step_count,
            "lambda": self.lam,
            "start_count": self.start_count,
            "last_count": self.last_count,
            "params_per_rank": self.params_per_rank,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state.get("budget"):
            raise ValueError(
                "this checkpoint was written by a run with a fixed lambda schedule, not by budget mode: "
                "resume it without sparsity_budget, or start a fresh output_dir"
            )
        self.__init__(self.model, state["target"], state["by_step"], state["unit"], state["lambda_max"], state["trajectory"])
        self.step_count = int(state["step_count"])
        self.lam = float(state["lambda"])
        self.start_count, self.last_count = state["start_count"], state["last_count"]
        self.params_per_rank = state["params_per_rank"]

    def summary(self) -> dict:
        return {"target": self.target, "unit": self.unit, "by_step": self.by_step, "reached": self.last_count}


def gate_lr_for_budget(model: nn.Module, lr_factors: Sequence[float], by_step: int, lambda_max: float, margin: float = 2.0) -> float:
    """A peak gate learning rate with which budget mode (prox_adam, lr_scaled τ) can reach its target.

    An Adam step moves a gate by up to about η against the threshold, so at λ ≤ λ_max the net
    shrinkage of a gate whose gradient keeps pushing it outwards is at most (λ_max − 1)·η per step;
    a gate of magnitude |g| cannot be pruned before Σ_{t < by_step} η_t (λ_max − 1) ≥ |g|
    (docs/method.md, "Scale of λ"). A short run's adapter learning rate is usually far too small for that. This
    returns the gate lr for which that sum is ``margin`` times the mean |g| of the model's gates
    now; ``lr_factors[t]`` is the learning-rate multiplier of step t (warm-up and decay).
    """
    if lambda_max <= 1:
        raise ValueError(f"budget mode with prox_adam needs lambda_max > 1 (an Adam step moves a gate by about the lr, only τ > lr shrinks it); got {lambda_max}")  # fmt: skip
    total = sum(lr_factors[:by_step])
    if total <= 0:
        raise ValueError(f"the learning-rate schedule is 0 over the first {by_step} steps: no gate can shrink")
    magnitude = count = 0.0
    for _, module in sora_modules(model):
        with gathered([module.gate]):
            magnitude += float(whole(module.gate.detach()).abs().sum())
            count += module.gate.numel()
    if not count:
        raise ValueError("the model has no SoRA modules; call inject_sora first")
    return margin * (magnitude / count) / ((lambda_max - 1) * total)


def budget_target(sparsity_report, target_rank: float | None, target_params: int | None) -> tuple[float, str]:
    """(target count, metrics key) for a budget in average rank per module or in parameters."""
    if target_params is not None:
        return float(target_params), "adapter_params"
    return float(target_rank) * len(sparsity_report.modules), "live_ranks"

