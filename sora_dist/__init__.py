"""sora_dist: Sparse Low-rank Adaptation (SoRA) for fine-tuning LLMs, from one GPU to many."""

from .core import (
    MergeReport,
    SoRAConfig,
    SoRALinear,
    SoRAOptimizer,
    SparsityReport,
    inject_sora,
    merge_sora,
    prune_sora,
    sora_modules,
    sora_param_groups,
    sparsity_report,
    trainable_summary,
)
from .deploy.io import load_sora, save_sora
from .sparsity.schedule import LambdaSchedule

__version__ = "0.1.0"

__all__ = [
    "LambdaSchedule",
    "MergeReport",
    "SoRAConfig",
    "SoRALinear",
    "SoRAOptimizer",
    "SparsityReport",
    "inject_sora",
    "load_sora",
    "merge_sora",
    "prune_sora",
    "save_sora",
    "sora_modules",
    "sora_param_groups",
    "sparsity_report",
    "trainable_summary",
]
