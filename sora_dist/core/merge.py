"""Fold SoRA branches into the base weights in memory: W = W0 + s · B diag(g) A."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..backends.bnb import make_linear4bit
from ..backends.dtypes import dtype_name
from ..backends.linear import base_kind, dense_bias, dense_weight, make_linear, store_weight_
from .inject import replace_module, sora_modules
from .layer import SoRALinear


@dataclasses.dataclass
class MergedModule:
    name: str
    base_kind: str
    out_dtype: str
    max_abs_error: float
    rel_error: float


@dataclasses.dataclass
class MergeReport:
    """How far each stored merged weight is from the exact fp32 W0 + ΔW of the trained model
    (float64 for a float64 base).

    For a dense base this is only the rounding of the weight dtype. For a quantized base merged
    to a dense dtype it is the same rounding (the dequantized W0 is exactly what the trained model
    used); requantizing adds the quantization error, which is why it is reported.
    """

    modules: list[MergedModule]

    @property
    def max_abs_error(self) -> float:
        return max((m.max_abs_error for m in self.modules), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def summary(self) -> str:
        kinds = sorted({m.base_kind for m in self.modules})
        return (
            f"merged {len(self.modules)} modules ({', '.join(kinds)}): max |W - (W0 + dW)| = "
            f"{self.max_abs_error:.3g}, max relative (Frobenius) error = {self.max_rel_error:.3g}"
        )


@torch.no_grad()
def merge_module(name: str, module: SoRALinear, dtype: torch.dtype | None = None, quantize: str | None = None):
    """The merged replacement of one SoRA module and its error entry."""
    base = module.base
    kind = base_kind(base)
    exact = dense_weight(base)  # fp32, or float64 for a float64 base
    exact = exact + module.delta_weight(exact.dtype)
    dense = kind in ("dense", "conv1d")
    if dtype is None:
        dtype = base.weight.dtype if dense else (getattr(base, "compute_dtype", None) or torch.bfloat16)
    if dense and quantize is None and base.weight.dtype == dtype:
        store_weight_(base, exact)  # in place, in the base's own layout (Conv1D: transposed)
        merged, stored = base, dense_weight(base)
    elif quantize is None:
        merged = make_linear(exact, dense_bias(base), dtype)
        stored = merged.weight.data
    else:
        merged = make_linear4bit(exact, dense_bias(base), quantize, compute_dtype=dtype)
        stored = dense_weight(merged)
    diff = stored.to(exact.dtype) - exact
    entry = MergedModule(
        name,
        kind,
        dtype_name(dtype) + (f"+{quantize}" if quantize else ""),
        float(diff.abs().max()),
        float(diff.norm() / exact.norm().clamp_min(1e-30)),
    )
    return merged, entry


def merge_sora(model: nn.Module, dtype: torch.dtype | None = None, quantize: str | None = None) -> MergeReport:
    """Replace every SoRA module by a plain layer holding W0 + ΔW; returns the error report.

    Dense bases (Linear, Conv1D) are merged in place (exact up to the weight dtype). Quantized bases are
    dequantized, merged in fp32 and stored as a dense ``nn.Linear`` in ``dtype`` (default: the
    layer's compute dtype), or requantized to ``quantize`` ("nf4"/"fp4") when asked.
    """
    entries = []
    for name, module in list(sora_modules(model)):
        merged, entry = merge_module(name, module, dtype, quantize)
        replace_module(model, name, merged)
        entries.append(entry)
    if hasattr(model, "sora_config"):
        del model.sora_config
    return MergeReport(entries)
