"""The SoRA module: a frozen base projection plus a gated low-rank branch.

    h = W0 x + b + s * B (g * (A dropout(x)))

A is r x d_in, B is d_out x r, g is the gate vector of length r and s = alpha / r_max.
The base projection is never copied: a dense ``nn.Linear``, a bitsandbytes 4/8-bit layer or a
ZeRO-3 partitioned Linear, or a transformers Conv1D all work, because shapes come from the
declared features (docs/method.md, "The module").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.linear import declared_features
from ..backends.zero import full_numel
from .config import GATE_INITS


class SoRALinear(nn.Module):
    """A base projection with a SoRA branch of rank ``r`` whose gate is sparsified by the optimizer.

    ``scale`` is alpha / r_max, fixed at creation: pruning dead ranks never changes it.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        gate_init: str = "normal",
        adapter_dtype: torch.dtype = torch.float32,
        scale: float | None = None,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"SoRA rank r must be >= 1, got {r}")
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        self.base = base
        self.in_features, self.out_features = declared_features(base)
        self.scale = float(alpha) / r if scale is None else float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=adapter_dtype, device=device))
        self.gate = nn.Parameter(torch.empty(r, dtype=adapter_dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if gate_init == "normal":
            nn.init.normal_(self.gate)
        else:
            nn.init.ones_(self.gate)

    @property
    def rank(self) -> int:
        return full_numel(self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dtype = x.dtype
        down = F.linear(self.dropout(x), self.lora_A.to(dtype))
        # The scale is folded into the gate: one multiply on r features instead of d_out.
        gated = down * (self.gate * self.scale).to(dtype)
        lora_B = self.lora_B.to(dtype)
        if out.dtype == dtype and out.shape[:-1] == gated.shape[:-1] and out.shape[-1] == lora_B.shape[0]:
            # out + gated B^T as one GEMM with beta = 1 (addmm): no separate pass over the output
            # and no output-sized temporary. Same math and same backward as linear + add.
            fused = torch.addmm(out.reshape(-1, out.shape[-1]), gated.reshape(-1, gated.shape[-1]), lora_B.t())
            return fused.view(out.shape)
        return out + F.linear(gated, lora_B).to(out.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B diag(g) A in ``dtype`` (default fp32), shaped like the base weight (d_out x d_in)."""
        B = self.lora_B.detach().to(dtype)
        g = self.gate.detach().to(dtype)
        return (B * (g * self.scale)) @ self.lora_A.detach().to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
