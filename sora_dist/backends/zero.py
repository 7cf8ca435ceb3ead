"""DeepSpeed ZeRO-3 partitioned parameters: recognise them, gather them, know their real size."""

from __future__ import annotations

import contextlib

import torch


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_numel(tensor: torch.Tensor) -> int:
    """Elements of the whole tensor: a ZeRO-3 partitioned one holds few (or 0) locally, ``ds_numel`` is its size."""
    return int(getattr(tensor, "ds_numel", None) or tensor.numel())


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
