"""Put SoRA branches into a model: choose target modules, wrap them, freeze the rest."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from ..backends.bnb import disable_cpu_repack, is_quantized
from ..backends.fsdp2 import WRAPPER_PREFIXES
from ..backends.linear import declared_features, is_linear_like
from ..backends.zero import full_numel
from .config import ALL_LINEAR, SoRAConfig
from .layer import SoRALinear


def output_head_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _name_matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, config: SoRAConfig) -> list[str]:
    """Names of the modules that get a SoRA branch; fails with the candidates when none match."""
    keep = set(config.modules_to_save)
    candidates = [
        name
        for name, module in model.named_modules()
        if is_linear_like(module) and not _under_any(name, keep)
    ]
    if config.target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [name for name in candidates if name not in heads]
    else:
        chosen = [name for name in candidates if _name_matches(name, config.target_modules)]
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(
            f"sora.target_modules: {config.target_modules!r} matched no Linear module of "
            f"{type(model).__name__}. Candidate names: {', '.join(suffixes) or '(none)'}; "
            f"or use {ALL_LINEAR!r}."
        )
    return chosen


def _under_any(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) or f".{p}." in name for p in prefixes)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sora_modules(model: nn.Module) -> Iterator[tuple[str, SoRALinear]]:
    """(name, module) of every SoRA module; names as in the unwrapped model, so that an adapter saved
    under activation-checkpointing or compile wrappers applies to the plain base model."""
    for name, module in model.named_modules():
        if isinstance(module, SoRALinear):
            for wrapper in WRAPPER_PREFIXES:
                name = name.replace(wrapper, "")
            yield name, module


def inject_sora(model: nn.Module, config: SoRAConfig, verbose: bool = True) -> nn.Module:
    """Wrap the target modules of ``model`` with ``SoRALinear`` in place and freeze the rest.

    Parameters of ``config.modules_to_save`` stay trainable. Returns the same model, with
    ``model.sora_config`` set.
    """
    if any(True for _ in sora_modules(model)):
        raise ValueError("this model already has SoRA modules; inject_sora must run once per model")
    targets = select_targets(model, config)
    missing = [m for m in config.modules_to_save if not any(_under_any(n, {m}) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"sora.modules_to_save: {missing} names no module of {type(model).__name__}")
    for name in targets:
        widths = declared_features(model.get_submodule(name))
        if config.r > min(widths):
            raise ValueError(
                f"sora.r: {config.r} is more than layer {name} ({widths[0]} -> {widths[1]} features) can use: "
                f"its rank is at most {min(widths)}; choose r <= {min(widths)}"
            )
    model.requires_grad_(False)
    dtype = getattr(torch, config.adapter_dtype)
    for name in targets:
        base = model.get_submodule(name)
        replace_module(model, name, SoRALinear(base, config.r, config.alpha, config.dropout, config.gate_init, dtype))
    for name, module in model.named_modules():
        if config.modules_to_save and _under_any(name, set(config.modules_to_save)):
            module.requires_grad_(True)
    disable_cpu_repack(model)
    model.sora_config = config
    if verbose:
        print(trainable_summary(model))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as its logical size."""
    trainable = total = 0
    quantized = {id(m.weight): m.in_features * m.out_features for m in model.modules() if is_quantized(m)}
    for param in model.parameters():
        n = quantized.get(id(param), full_numel(param))
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
