"""Sparsity report: live ranks per module and the parameter count of the pruned adapter."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..backends.fsdp2 import whole
from ..backends.zero import gathered
from .inject import sora_modules


@dataclasses.dataclass
class ModuleSparsity:
    name: str
    in_features: int
    out_features: int
    r_max: int
    live_rank: int

    @property
    def zero_gates(self) -> int:
        return self.r_max - self.live_rank

    @property
    def params(self) -> int:
        """Parameters of this module's pruned adapter: |K| · (d_in + d_out)."""
        return self.live_rank * (self.in_features + self.out_features)

    @property
    def dense_params(self) -> int:
        """Parameters of a LoRA of rank r_max on the same module."""
        return self.r_max * (self.in_features + self.out_features)


@dataclasses.dataclass
class SparsityReport:
    modules: list[ModuleSparsity]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.modules)

    @property
    def live_rank(self) -> int:
        return sum(m.live_rank for m in self.modules)

    @property
    def r_max_total(self) -> int:
        return sum(m.r_max for m in self.modules)

    def to_dict(self) -> dict:
        return {
            "modules": [dict(dataclasses.asdict(m), zero_gates=m.zero_gates, params=m.params) for m in self.modules],
            "total_params": self.params,
            "dense_lora_params": self.dense_params,
            "live_rank": self.live_rank,
            "r_max_total": self.r_max_total,
            "kept_fraction": self.params / max(self.dense_params, 1),
        }

    def table(self) -> str:
        width = max([len("module")] + [len(m.name) for m in self.modules])
        lines = [f"{'module':<{width}}  {'rank':>9}  {'zero':>5}  {'params':>11}"]
        for m in self.modules:
            lines.append(f"{m.name:<{width}}  {m.live_rank:>4}/{m.r_max:<4}  {m.zero_gates:>5}  {m.params:>11,}")
        kept = 100 * self.params / max(self.dense_params, 1)
        lines.append(
            f"total: {self.live_rank}/{self.r_max_total} live ranks, {self.params:,} adapter parameters "
            f"vs {self.dense_params:,} for dense LoRA of the same r_max ({kept:.1f}% kept)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def sparsity_report(model: nn.Module, r_max: int | None = None) -> SparsityReport:
    """Count live (non-zero) gates of every SoRA module.

    ``r_max`` defaults to ``model.sora_config.r`` (or each module's current rank); after pruning,
    pass nothing and the report still compares with the configured r_max.
    """
    config = getattr(model, "sora_config", None)
    r_max = r_max if r_max is not None else (config.r if config is not None else None)
    found, counts = [], []
    for name, module in sora_modules(model):
        with gathered([module.gate]):
            counts.append((whole(module.gate.detach()) != 0).sum())
            found.append((name, module, module.rank))
    lives = torch.stack([c.to(counts[0].device) for c in counts]).tolist() if counts else []  # one host sync
    return SparsityReport([ModuleSparsity(name, m.in_features, m.out_features, r_max or rank, int(live))
                           for (name, m, rank), live in zip(found, lives)])  # fmt: skip
