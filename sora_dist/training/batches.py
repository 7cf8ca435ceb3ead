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

    With ``lengths`` (length-grouped batching) each epoch's shuffled stream is cut into windows of
    ``GROUP_WINDOW`` global batches and each window is sorted by length, longest first: micro-batches
    hold examples of similar length (less padding) and the order is still fixed by the seed.
    """

    GROUP_WINDOW = 32

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int, collate_fn=stack_collate,
                 lengths=None):  # fmt: skip
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.dataset, self.micro_batch_size, self.grad_accum = dataset, micro_batch_size, grad_accum
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths))
        self._order: dict[int, torch.Tensor] = {}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.lengths is None:
            return order
        window = self.examples_per_step() * self.GROUP_WINDOW
        pieces = [chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)] for chunk in order.split(window)]
        return torch.cat(pieces)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._order:
            self._order = {epoch: self._epoch_order(epoch)}
        return int(self._order[epoch][offset])

    def examples_per_step(self) -> int:
        return self.grad_accum * self.world_size * self.micro_batch_size

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.micro_batch_size
        return self.collate_fn([self.dataset[self._index(p)] for p in range(start, start + self.micro_batch_size)])
