"""The method, ignorant of backends and engines (docs/method.md).

``layer`` SoRALinear · ``config`` SoRAConfig · ``inject`` target selection and freezing ·
``optim`` SoRAOptimizer, the gate step and the gate-group contract · ``prune`` pruning and rank
compaction · ``merge`` folding into the base weights · ``report`` the sparsity report.
"""

from .config import SoRAConfig
from .inject import inject_sora, sora_modules, trainable_summary
from .layer import SoRALinear
from .merge import MergeReport, merge_sora
from .optim import SoRAOptimizer, sora_param_groups
from .prune import prune_sora
from .report import SparsityReport, sparsity_report

__all__ = [
    "MergeReport",
    "SoRAConfig",
    "SoRALinear",
    "SoRAOptimizer",
    "SparsityReport",
    "inject_sora",
    "merge_sora",
    "prune_sora",
    "sora_modules",
    "sora_param_groups",
    "sparsity_report",
    "trainable_summary",
]
