"""λ ramps: how the sparsity strength changes over optimizer steps (a LambdaController)."""

from __future__ import annotations

import math

from ..core.optim import set_lambda
from .config import check_lambda_ramp


class LambdaSchedule:
    """λ over optimizer steps: constant, or a linear/geometric ramp from ``start`` to ``end``.

    The ramp takes ``steps`` optimizer steps and then holds ``end``. Call :meth:`step` once per
    optimizer step (not per micro-batch); it writes the new λ into every gate group.
    """

    def __init__(self, kind: str = "constant", start: float = 0.0, end: float | None = None, steps: int = 0):
        check_lambda_ramp(kind, start, end, steps)
        end = start if end is None else end
        self.kind, self.start, self.end, self.steps = kind, float(start), float(end), int(steps)
        self.step_count = 0

    def value(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        if self.kind == "constant":
            return self.start
        frac = min(step, self.steps) / self.steps
        if self.kind == "linear":
            return self.start + frac * (self.end - self.start)
        return math.exp(math.log(self.start) + frac * (math.log(self.end) - math.log(self.start)))

    def apply(self, optimizer) -> float:
        lam = self.value()
        set_lambda(optimizer, lam)
        return lam

    def step(self, optimizer) -> float:
        """Advance one optimizer step and set the new λ on the optimizer's gate groups."""
        self.step_count += 1
        return self.apply(optimizer)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "start": self.start, "end": self.end, "steps": self.steps, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["kind"], state["start"], state["end"], state["steps"])
        self.step_count = int(state["step_count"])
