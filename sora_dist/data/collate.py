"""Turn a micro-batch of examples into tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from .formats import IGNORE


def stack_collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack equally shaped examples; a causal LM batch without labels predicts its inputs."""
    batch = {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}
    if "labels" not in batch and "input_ids" in batch:
        batch["labels"] = batch["input_ids"]
    return batch


def pad_collate(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100 (the attention mask comes
    from each example's length)."""
    width = max(len(e["input_ids"]) for e in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def pad(seq, value):
        return (seq.tolist() if torch.is_tensor(seq) else list(seq)) + [value] * (width - len(seq))

    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]),
    }
    if not isinstance(examples[0]["labels"], (list, torch.Tensor)):  # one class index (or regression target) per example
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        batch["labels"] = torch.tensor([pad(e["labels"], IGNORE) for e in examples])
    return batch
