"""Which examples each rank trains on at each (optimizer step, micro-batch): resuming is exact."""

from __future__ import annotations

import torch

from ..data.collate import stack_collate


class ShardedBatches:
    """This rank's micro-batches, addressed by (optimizer step, micro-batch): resuming is exact.

    The examples form one stream, reshuffled each epoch from ``seed``. Micro-batch ``m`` of step
    ``s`` is the ``world_size * micro_batch_size`` examples at stream position
    ``(s * grad_accum + m) * world_size * micro_batch_size``; rank r takes the r-th slice. A run on
    one process with ``world_size`` times the micro-batch sees exactly the same examples per step.
    """

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int, collate_fn=stack_collate):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.dataset, self.micro_batch_size, self.grad_accum = dataset, micro_batch_size, grad_accum
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._order: dict[int, torch.Tensor] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._order[epoch][offset])

    def examples_per_step(self) -> int:
        return self.grad_accum * self.world_size * self.micro_batch_size

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.micro_batch_size
        return self.collate_fn([self.dataset[self._index(p)] for p in range(start, start + self.micro_batch_size)])
