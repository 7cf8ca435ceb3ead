"""Physically remove dead ranks (gates that are exactly zero)."""

from __future__ import annotations

import torch
from torch import nn

from .inject import replace_module, sora_modules
from .layer import SoRALinear


@torch.no_grad()
def live_ranks(module: SoRALinear) -> torch.Tensor:
    """Indices K = {i : g_i ≠ 0}."""
    return torch.nonzero(module.gate.detach() != 0).flatten()


@torch.no_grad()
def prune_module(module: SoRALinear) -> nn.Module:
    """Shrink A, B and the gate to the live ranks; the bare base when no rank is live."""
    keep = live_ranks(module)
    if keep.numel() == 0:
        return module.base
    if keep.numel() < module.rank:
        for name in ("lora_A", "gate"):
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(old.data[keep].clone(), requires_grad=old.requires_grad))
        old = module.lora_B
        module.lora_B = nn.Parameter(old.data[:, keep].clone(), requires_grad=old.requires_grad)
    return module


def prune_sora(model: nn.Module) -> nn.Module:
    """Remove every zero rank of every SoRA module in place; the outputs do not change.

    The scale s = alpha / r_max stays as it was. A module with no live rank is replaced by its
    bare base layer. Make a new optimizer afterwards: the old one holds the old tensors.
    """
    for name, module in list(sora_modules(model)):
        pruned = prune_module(module)
        if pruned is not module:
            replace_module(model, name, pruned)
    return model
