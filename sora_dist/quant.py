"""Quantized and partitioned base layers: recognise them, read their weight, make new ones.

Everything bitsandbytes-specific lives here so that the SoRA math in ``layer.py`` stays the same
for every kind of base.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn


def _bnb():
    """bitsandbytes if something already imported it: no quantized layer can exist otherwise."""
    return sys.modules.get("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def disable_cpu_repack(model: nn.Module) -> int:
    """Keep 4-bit layers on CPU trainable; returns how many layers were changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit weight for inference the first
    time it sees an eval-mode forward whose input does not require grad; afterwards the layer has
    no backward and gradients silently stop there. Only CPU layers are touched: GPU users never
    pay for this.
    """
    changed = 0
    for module in model.modules():
        if is_4bit(module) and module.weight.device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextlib.contextmanager
def gathered(params: list[torch.Tensor]):
    """Full tensors for ZeRO-3 partitioned parameters (read-only); a no-op for ordinary ones."""
    partitioned = [p for p in params if is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense fp32 tensor of shape (out_features, in_features).

    A float64 weight stays float64 (rounding it to fp32 would make a float64 merge inexact).
    """
    weight = base.weight
    with gathered([weight]):
        if is_4bit(base):
            state = weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    "this 4-bit layer was repacked for CPU inference and cannot be dequantized; "
                    "call sora_dist.quant.disable_cpu_repack(model) before the first eval forward"
                )
            return _bnb().functional.dequantize_4bit(weight.data, state).float()
        if is_8bit(base):
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
            return _bnb().functional.int8_vectorwise_dequant(weight.data, scales).float()
        return weight.data.to(torch.promote_types(weight.dtype, torch.float32), copy=True)


def dense_bias(base: nn.Module) -> torch.Tensor | None:
    if base.bias is None:
        return None
    with gathered([base.bias]):
        return base.bias.data.float().clone()


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A dense ``nn.Linear`` holding ``weight`` (out x in) and ``bias`` in ``dtype``."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def make_linear4bit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Quantize a dense weight into a bitsandbytes ``Linear4bit`` (nf4 or fp4)."""
    import bitsandbytes as bnb

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu", compute_dtype),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        quant_storage=quant_storage,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype), requires_grad=False)
    layer = layer.to(weight.device)
    if weight.device.type == "cpu":
        disable_cpu_repack(layer)
    return layer
