"""SoRA's settings: the ``sora`` section of a run, and the vocabularies of the gate update."""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from ..options import option

ALL_LINEAR = "all-linear"
GATE_INITS = ("normal", "ones")
GATE_UPDATES = ("prox_adam", "prox_sgd")
THRESHOLDS = ("lr_scaled", "fixed")


@dataclasses.dataclass
class SoRAConfig:
    """SoRA hyperparameters and where the branches go (docs/method.md, "The module").

    target_modules: ``"all-linear"`` (every Linear-like layer except the output head), a regex
    matched against full module names, or a list of names matched against the end of module names
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
    modules_to_save: names of modules that stay trainable as a whole (e.g. a classifier head).
    """

    r: int = option(8, "r_max: rank of each SoRA branch before sparsification")
    alpha: float = option(16.0, "scale s = alpha / r_max (fixed; pruning does not change it)")
    dropout: float = option(0.0, "dropout on the branch input")
    target_modules: str | list[str] = option(
        ALL_LINEAR, '"all-linear" (Linear and Conv1D layers except the output head), a regex on full names, or a list of name suffixes'
    )
    gate_init: str = option("normal", "normal (N(0,1), as the released code) | ones")
    modules_to_save: list[str] = option(
        help="modules trained in full, e.g. [score] for a classifier head (default for classification: the head)", factory=list
    )
    adapter_dtype: str = option("float32", "dtype of the adapter parameters (float32 recommended)")

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"SoRAConfig.r: must be a positive integer, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"SoRAConfig.alpha: must be a finite number > 0 (the branch scale is alpha / r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SoRAConfig.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"SoRAConfig.gate_init: must be one of {GATE_INITS}, got {self.gate_init!r}")
        if not isinstance(getattr(torch, self.adapter_dtype, None), torch.dtype) or not getattr(torch, self.adapter_dtype).is_floating_point:
            raise ValueError(f"SoRAConfig.adapter_dtype: must name a floating-point torch dtype, got {self.adapter_dtype!r}")
        if not self.target_modules:
            raise ValueError("SoRAConfig.target_modules: empty: name the layers to adapt (a list of names or a regex)")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"SoRAConfig.target_modules: {self.target_modules!r} is not a valid regular expression ({err})") from None
        self.modules_to_save = list(self.modules_to_save)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
