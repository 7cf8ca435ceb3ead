"""The learning-rate schedule: one factor per optimizer step, shared by every param group."""

from __future__ import annotations

import math

import torch

from ..core.optim import scale_learning_rates
from .config import TrainConfig


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every group's base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up that never starts at 0, then constant, linear or cosine decay towards 0.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    if config.lr_decay == "linear":
        return 1.0 - progress
    if config.lr_decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> None:
    """Each group (gates included) at the schedule's factor of step ``step`` times its own peak lr."""
    scale_learning_rates(optimizer, lr_factor(step, config))
