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
    """The module with only its live ranks: itself when every rank is live, the bare base when
    none is, else a new SoRALinear around the same base holding A[K], B[:, K], g[K] and the same
    scale. A new module rather than new tensors in the old one: nothing a backend attached to the
    old module (DeepSpeed ZeRO-3 keeps per-module state between engines) carries over."""
    keep = live_ranks(module)
    if keep.numel() == 0:
        return module.base
    if keep.numel() == module.rank:
        return module
    dropout = module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0
    pruned = SoRALinear(module.base, keep.numel(), alpha=0.0, dropout=dropout, adapter_dtype=module.lora_A.dtype, scale=module.scale)
    pruned.train(module.training)
    for name, dim in (("lora_A", 0), ("lora_B", 1), ("gate", 0)):
        old, new = getattr(module, name), getattr(pruned, name)
        new.copy_(old.index_select(dim, keep.to(old.device)))
        new.requires_grad_(old.requires_grad)
    return pruned


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
