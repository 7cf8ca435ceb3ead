"""One vocabulary of dtype names: the YAML's ``float32``/``bfloat16``/``float16`` and the short
``fp32``/``bf16``/``fp16`` of the command line and of mixed precision mean the same dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
LONG_NAMES = ("float32", "bfloat16", "float16")
SHORT_NAMES = ("fp32", "bf16", "fp16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype a name stands for; ``key`` names the setting in the error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{key}: must be one of {list(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (the name transformers writes into config.json)."""
    return str(dtype).removeprefix("torch.")
