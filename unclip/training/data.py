"""A deterministic, resumable, process-sharded stream of batches over a map-style dataset.

The stream is an endless sequence of item indices: epoch ``e`` is a permutation of the data set drawn
from ``seed + e``. Micro-batch ``g`` of a run with per-process batch ``b`` on ``P`` processes covers stream
positions ``[g*b*P, (g+1)*b*P)``, and process ``r`` takes the ``r``-th slice of ``b``. So

* two processes with batch ``b`` see exactly the items one process with batch ``2b`` sees;
* resuming at micro-batch ``g`` continues the stream exactly where it stopped.

``start_position`` shifts every micro-batch by that many stream positions: a run resumed with another
number of processes or batch size starts at the position the checkpoint had reached.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StreamBatchSampler(Sampler[list[int]]):
    def __init__(
        self, length: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0,
        start_position: int = 0,
    ):
        if length < 1:
            raise ValueError(f"the data set is empty (length {length}); nothing to train on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_batch, self.start_position = start_batch, start_position
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _item(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=generator)
        return int(self._perm[offset])

    def batch_indices(self, batch: int) -> list[int]:
        start = self.start_position + (batch * self.world_size + self.rank) * self.batch_size
        return [self._item(p) for p in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while True:
            yield self.batch_indices(batch)
            batch += 1


def stream_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    collate_fn: Callable | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_batch: int = 0,
    start_position: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """An endless DataLoader over ``dataset`` following :class:`StreamBatchSampler`."""
    sampler = StreamBatchSampler(
        len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed, start_batch=start_batch,
        start_position=start_position,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        # Its own generator, so that creating the loader never draws from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
