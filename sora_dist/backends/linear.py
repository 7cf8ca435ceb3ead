"""Dense base layers: ``nn.Linear`` (weight out x in) and transformers' ``Conv1D`` (GPT-2 family,
weight stored transposed, in x out); and, for every kind of base (quantized and ZeRO-3 partitioned
too), its declared shape, its weight as a dense out x in tensor, and a fresh dense layer."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .bnb import dequantized_weight, is_4bit, is_8bit, is_quantized
from .zero import gathered


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (if transformers is loaded: no such layer exists otherwise)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """A base a SoRA branch can wrap: nn.Linear, the bitsandbytes layers (which subclass it), Conv1D."""
    return isinstance(module, nn.Linear) or is_quantized(module) or is_conv1d(module)


def declared_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) as the module declares them, never from the local weight.

    A ZeRO-3 partitioned weight has shape [0] and a 4-bit weight is packed, so the declared
    attributes are the reliable source (Conv1D declares ``nx``/``nf``).
    """
    if is_conv1d(base):
        return int(base.nx), int(base.nf)
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError as err:
        raise TypeError(
            f"cannot wrap {type(base).__name__}: SoRA needs a Linear-like module that declares "
            "in_features and out_features (or a transformers Conv1D)"
        ) from err


def base_kind(base: nn.Module) -> str:
    return "4bit" if is_4bit(base) else "8bit" if is_8bit(base) else "conv1d" if is_conv1d(base) else "dense"


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense fp32 tensor of shape (out_features, in_features).

    A float64 weight stays float64 (rounding it to fp32 would make a float64 merge inexact).
    """
    weight = base.weight
    with gathered([weight]):
        if is_quantized(base):
            return dequantized_weight(base)
        dense = weight.data.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
        return dense.t().contiguous() if is_conv1d(base) else dense


def dense_bias(base: nn.Module) -> torch.Tensor | None:
    if base.bias is None:
        return None
    with gathered([base.bias]):
        return base.bias.data.float().clone()


def store_weight_(base: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out x in) weight into a dense base in its own layout and dtype."""
    stored = weight.t() if is_conv1d(base) else weight
    base.weight.data.copy_(stored.to(base.weight.dtype))


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen dense ``nn.Linear`` holding ``weight`` (out x in) and ``bias`` in ``dtype``."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer
