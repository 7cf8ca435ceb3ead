"""bitsandbytes 4-bit and 8-bit base layers: recognise them, dequantize them, make new ones.

Everything bitsandbytes-specific lives here so that the SoRA math stays the same for every base.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _loaded_bnb():
    """bitsandbytes if something already imported it: no quantized layer can exist otherwise."""
    return sys.modules.get("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module: nn.Module) -> bool:
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


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


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The fp32 (out_features, in_features) weight of a 4-bit or 8-bit layer (already gathered)."""
    weight = base.weight
    if is_4bit(base):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this 4-bit layer was repacked for CPU inference and cannot be dequantized; "
                "call sora_dist.backends.bnb.disable_cpu_repack(model) before the first eval forward"
            )
        return _loaded_bnb().functional.dequantize_4bit(weight.data, state).float()
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
    return _loaded_bnb().functional.int8_vectorwise_dequant(weight.data, scales).float()


def make_linear4bit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Quantize a dense weight (out x in) into a bitsandbytes ``Linear4bit`` (nf4 or fp4)."""
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


def quantization_error(weight: torch.Tensor, quant_type: str) -> tuple[float, float]:
    """(max abs, relative Frobenius) error of one 4-bit quantize/dequantize round trip."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float(), quant_type=quant_type, compress_statistics=True)
    diff = bnbf.dequantize_4bit(packed, state).float() - weight.float()
    return float(diff.abs().max()), float(diff.norm() / weight.float().norm().clamp_min(1e-30))
