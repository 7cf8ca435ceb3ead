"""The one interface through which the training loop lets something choose λ."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LambdaController(Protocol):
    """Chooses λ for each optimizer step; the loop calls :meth:`apply` before a step and
    :meth:`step` after it, and checkpoints its state. It talks to the optimizer only through
    :func:`sora_dist.core.optim.set_lambda` and :func:`~sora_dist.core.optim.last_lambda`."""

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Before a step: put the next step's λ (and keep count) into the gate groups; returns λ."""

    def step(self, optimizer: torch.optim.Optimizer) -> float:
        """After a step: advance by one optimizer step and set what the next one uses; returns λ."""

    def value(self, step: int | None = None) -> float:
        """The λ of ``step`` (default: the current one)."""

    def state_dict(self) -> dict:
        """What a checkpoint stores to resume exactly."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
