"""Packing: several examples share one row of ``max_length`` tokens, and nothing else changes.

A packed row concatenates its examples; ``position_ids`` restart at 0 for each one, and there is no
2-D attention mask. transformers reads packed sequences from such position ids: flash-attention
runs them as variable-length sequences (padding-free), SDPA and eager get an exact block-diagonal
causal mask. Attention never crosses examples, and the first token of each example gets no label
(it would be predicted from the previous example), so the loss is the one of the examples unpacked.

Examples are placed first-fit decreasing: longest first, each into the fullest row it still fits.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from .formats import IGNORE


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row (first-fit decreasing by length, best fit by room left);
    every example appears exactly once; an example longer than ``capacity`` raises ValueError."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, row), sorted: the fullest row that fits is the first with enough space
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than the packed row length {capacity}")
        slot = bisect.bisect_left(room, (size, -1))
        if slot < len(room):
            left, row = room.pop(slot)
            rows[row].append(index)
            bisect.insort(room, (left - size, row))
        else:
            rows.append([index])
            bisect.insort(room, (capacity - size, len(rows) - 1))
    return rows


class PackedExamples:
    """Rows of packed examples over a tokenized split (anything indexable with ``lengths``)."""

    def __init__(self, examples, capacity: int):
        self.examples, self.capacity = examples, capacity
        self.rows = pack_lengths(examples.lengths, capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"pack": [self.examples[i] for i in self.rows[index]]}

    def useful_fraction(self) -> float:
        """Tokens that are examples (not padding) in the packed rows."""
        return sum(self.examples.lengths) / (len(self.rows) * self.capacity)


def collate_packed(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and labels of packed rows, right-padded to the longest row (the
    padding is one more sequence of its own, with no labels)."""
    flat = []
    for row in rows:
        ids, positions, labels = [], [], []
        for example in row["pack"]:
            n = len(example["input_ids"])
            ids += list(example["input_ids"])
            positions += range(n)
            labels += [IGNORE] + list(example["labels"][1:])
        flat.append((ids, positions, labels))
    width = max(len(ids) for ids, _, _ in flat)
    batch = {"input_ids": [], "position_ids": [], "labels": []}
    for ids, positions, labels in flat:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["position_ids"].append(positions + list(range(pad)))
        batch["labels"].append(labels + [IGNORE] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}
