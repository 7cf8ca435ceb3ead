"""Put SoRA branches into a model: choose target modules, wrap them, freeze the rest."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import torch
from torch import nn

from .layer import GATE_INITS, SoRALinear
from .quant import disable_cpu_repack, is_4bit, is_8bit

ALL_LINEAR = "all-linear"


@dataclasses.dataclass
class SoRAConfig:
    """SoRA hyperparameters and where the branches go.

    target_modules: ``"all-linear"`` (every Linear except the output head), a regex matched
    against full module names, or a list of names matched against the end of module names
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
    modules_to_save: names of modules that stay trainable as a whole (e.g. a classifier head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    gate_init: str = "normal"
    modules_to_save: list[str] = dataclasses.field(default_factory=list)
    adapter_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SoRAConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"SoRAConfig.gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        if not isinstance(getattr(torch, self.adapter_dtype, None), torch.dtype):
            raise ValueError(f"SoRAConfig.adapter_dtype must name a torch dtype, got {self.adapter_dtype!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and the bitsandbytes layers (which subclass it), not already wrapped."""
    return isinstance(module, nn.Linear) or is_4bit(module) or is_8bit(module)


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
            f"target_modules={config.target_modules!r} matched no Linear module of "
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
    for name, module in model.named_modules():
        if isinstance(module, SoRALinear):
            yield name, module


def inject_sora(model: nn.Module, config: SoRAConfig, verbose: bool = True) -> nn.Module:
    """Wrap the target modules of ``model`` with ``SoRALinear`` in place and freeze the rest.

    Parameters of ``config.modules_to_save`` stay trainable. Returns the same model, with
    ``model.sora_config`` set.
    """
    if any(True for _ in sora_modules(model)):
        raise ValueError("this model already has SoRA modules; inject_sora must run once per model")
    targets = select_targets(model, config)
    model.requires_grad_(False)
    dtype = getattr(torch, config.adapter_dtype)
    for name in targets:
        base = model.get_submodule(name)
        replace_module(model, name, SoRALinear(base, config.r, config.alpha, config.dropout, config.gate_init, dtype))
    for name, module in model.named_modules():
        if config.modules_to_save and _under_any(name, set(config.modules_to_save)):
            module.requires_grad_(True)
    missing = [m for m in config.modules_to_save if not any(_under_any(n, {m}) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"modules_to_save names no module of {type(model).__name__}: {missing}")
    disable_cpu_repack(model)
    model.sora_config = config
    if verbose:
        print(trainable_summary(model))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as its logical size."""
    trainable = total = 0
    quantized = {id(m.weight): m.in_features * m.out_features for m in model.modules() if is_4bit(m) or is_8bit(m)}
    for param in model.parameters():
        n = quantized.get(id(param), param.ds_numel if hasattr(param, "ds_numel") else param.numel())
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
