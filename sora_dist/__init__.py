"""sora_dist: Sparse Low-rank Adaptation (SoRA) for fine-tuning LLMs, from one GPU to many."""

from .inject import SoRAConfig, inject_sora, sora_modules, trainable_summary
from .io import load_sora, save_sora
from .layer import SoRALinear
from .merge import MergeReport, merge_sora
from .optim import SoRAOptimizer, sora_param_groups
from .prune import prune_sora
from .schedule import LambdaSchedule
from .sparsity import SparsityReport, sparsity_report

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
