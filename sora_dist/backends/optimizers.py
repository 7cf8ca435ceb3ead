"""The inner optimizers users pick by name (``train.optimizer``): torch's AdamW (foreach or fused)
and SGD, bitsandbytes' 8-bit and paged AdamW, and DeepSpeed's CPU Adam under optimizer offload.

The SoRA optimizer wraps the one chosen here (:class:`~sora_dist.core.optim.SoRAOptimizer`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
BITSANDBYTES = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
ADAM_UNDER_OFFLOAD = ("adamw_torch", "adamw_torch_fused")  # replaced by DeepSpeed's CPU Adam there


def check_optimizer(name: str, offload: bool = False) -> None:
    """Raise ValueError (naming train.optimizer) for a choice that cannot run: unknown, its library
    missing, or a paged/8-bit optimizer together with DeepSpeed's optimizer offload."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name in BITSANDBYTES and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"train.optimizer: {name} needs bitsandbytes (`pip install bitsandbytes`)")
    if name in BITSANDBYTES and offload:
        raise ValueError(
            f"train.optimizer: {name} cannot be combined with DeepSpeed's optimizer offload: offload already keeps the "
            "optimizer state in CPU memory, and bitsandbytes' paged/8-bit states live on the GPU. Use adamw_torch "
            "(DeepSpeed's CPU Adam is then used), or remove offload_optimizer from the DeepSpeed config"
        )


def inner_optimizer(name: str, offload: bool = False) -> tuple[Callable[..., Any], dict]:
    """(optimizer class, its keyword arguments) for ``name``; under DeepSpeed's optimizer offload an
    AdamW choice becomes DeepSpeed's CPU Adam (a C++ Adam over the offloaded fp32 shards)."""
    check_optimizer(name, offload)
    if offload and name in ADAM_UNDER_OFFLOAD:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {"adamw_mode": True}
    if name in BITSANDBYTES:
        import bitsandbytes as bnb

        return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name], {}  # fmt: skip
    import torch

    if name == "sgd":
        return torch.optim.SGD, {}
    return torch.optim.AdamW, {"fused": True} if name == "adamw_torch_fused" else {}
