"""Physically remove dead ranks (gates that are exactly zero): after training, and mid-training.

:func:`prune_sora` drops every dead rank of a trained adapter (docs/method.md, "Prune, fold,
merge"). Rank compaction does the same during training: AdaLoRA only masks pruned ranks, so they
keep costing compute and optimizer memory; here a dead rank i of a SoRA module (g_i == 0) loses its
row of A, its column of B and its gate entry, and a module with no live rank becomes its bare base
layer. The outputs do not change at the moment of compaction (a zero gate contributes nothing).

:func:`compact_model_and_optimizer` also carries the optimizer over: a new
:class:`~sora_dist.core.optim.SoRAOptimizer` whose groups hold the new tensors with the same
hyperparameters, and whose Adam moments (``exp_avg``, ``exp_avg_sq``) are sliced the same way as
the parameters, each keeping its own step count. Training then continues exactly as the
uncompacted model would **as long as its dead gates stay zero** — a zero gate still gets a gradient
and the proximal step can revive it when |its Adam/SGD step| exceeds τ; compaction makes the death
permanent.

Only a plain (single process or DDP, not DeepSpeed) SoRAOptimizer can be carried over: DeepSpeed's
optimizer holds flat shards. The staged run (``sparsity_schedule.compact``) compacts only between
stages, where every stage builds a fresh optimizer (and a fresh DeepSpeed engine) anyway, so it
needs :func:`compact_model` alone. Under ZeRO-3 (adapter tensors partitioned) every rank calls
:func:`compact_model` after the old engine is gone: each module's A, B and gate are gathered, the
live slices become ordinary tensors, and the next engine partitions them again.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends.zero import full_numel, gathered
from .inject import replace_module, sora_modules
from .layer import SoRALinear
from .optim import SoRAOptimizer

ADAPTER_TENSORS = ("lora_A", "lora_B", "gate")


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


def physical_adapter_params(model: nn.Module) -> int:
    """Elements actually stored in the SoRA adapters: numel of lora_A, lora_B and gate, summed.

    Under ZeRO-3 a partitioned tensor holds few local elements; its full size (``ds_numel``) counts.
    """
    total = 0
    for _, module in sora_modules(model):
        for name in ADAPTER_TENSORS:
            total += full_numel(getattr(module, name))
    return total


@torch.no_grad()
def compact_model(model: nn.Module) -> tuple[dict[str, int], dict[int, tuple[nn.Parameter | None, torch.Tensor | None, int]]]:
    """Remove every dead rank of every SoRA module in place (same result as :func:`prune_sora`).

    Returns (removed ranks per module name, only modules that lost some; the parameter map
    ``id(old parameter) -> (new parameter or None when dropped, kept indices or None when
    unchanged, dimension the indices select)``) — the map is what carries an optimizer over.
    """
    removed: dict[str, int] = {}
    mapping: dict[int, tuple[nn.Parameter | None, torch.Tensor | None, int]] = {}
    for name, module in list(sora_modules(model)):
        old = {t: getattr(module, t) for t in ADAPTER_TENSORS}
        with gathered(list(old.values())):  # ZeRO-3: every rank gathers, slices and keeps plain tensors
            keep, rank = live_ranks(module), module.rank
            if keep.numel() == rank:
                continue
            pruned = prune_module(module)
        removed[name] = rank - keep.numel()
        replace_module(model, name, pruned)
        for t, tensor in old.items():
            mapping[id(tensor)] = (None, None, 0) if pruned is module.base else (getattr(pruned, t), keep, 1 if t == "lora_B" else 0)
    return removed, mapping


def _slice_state(state: dict, param: torch.Tensor, keep: torch.Tensor, dim: int) -> dict:
    """``state`` with every tensor shaped like ``param`` sliced to ``keep`` along ``dim``."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            value = value.index_select(dim, keep.to(value.device)).clone()
        out[key] = value
    return out


def carry_optimizer(optimizer: SoRAOptimizer, mapping: dict) -> SoRAOptimizer:
    """A new SoRAOptimizer over the compacted parameters: same groups (a group may end empty, so
    group indices and LR-scheduler bookkeeping stay valid), same hyperparameters, state sliced."""
    if not isinstance(optimizer, SoRAOptimizer):
        raise TypeError(
            f"carrying optimizer state needs a plain SoRAOptimizer, got {type(optimizer).__name__} "
            "(under DeepSpeed/Accelerate compact between runs and build a fresh optimizer)"
        )
    if optimizer.inner is not None and not type(optimizer.inner).__module__.startswith("torch."):
        raise TypeError(
            f"carrying optimizer state is done for torch's optimizers, not {type(optimizer.inner).__name__} "
            "(blockwise-quantized state cannot be sliced by rank): compact between runs instead"
        )
    groups, state = [], {}
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            new, keep, dim = mapping.get(id(param), (param, None, 0))
            if new is None:
                continue
            params.append(new)
            if param in optimizer.state:
                old = optimizer.state[param]
                state[new] = dict(old) if keep is None else _slice_state(old, param, keep, dim)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    defaults = optimizer.defaults
    carried = SoRAOptimizer(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"], weight_decay=defaults["weight_decay"],
                            inner=optimizer.inner_factory, **optimizer.inner_kwargs)  # fmt: skip
    for param, value in state.items():
        carried.state[param] = value
    return carried


def compact_model_and_optimizer(model: nn.Module, optimizer: SoRAOptimizer) -> tuple[SoRAOptimizer, dict[str, int]]:
    """Compact ``model`` in place and return (the new optimizer with the carried state, removed ranks
    per module name). Step the returned optimizer from now on; the old one holds the old tensors.
    An LR scheduler bound to the old optimizer must be rebuilt on the new one."""
    removed, mapping = compact_model(model)
    return carry_optimizer(optimizer, mapping), removed
