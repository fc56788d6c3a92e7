"""A deterministic, resumable, process-sharded stream of batches over a map-style dataset, and the
trainer's position in its data (``DataStream``, also for streaming sources).

The stream is an endless sequence of item indices: epoch ``e`` is a permutation of the data set drawn
from ``seed + e``. Micro-batch ``g`` of a run with per-process batch ``b`` on ``P`` processes covers stream
positions ``[g*b*P, (g+1)*b*P)``, and process ``r`` takes the ``r``-th slice of ``b``. So

* two processes with batch ``b`` see exactly the items one process with batch ``2b`` sees;
* resuming at micro-batch ``g`` continues the stream exactly where it stopped.

``start_position`` shifts every micro-batch by that many stream positions: a run resumed with another
number of processes or batch size starts at the position the checkpoint had reached.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unclip.data.collate import is_streaming


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


class DataStream:
    """Where training stands in its data, for a map-style data set or a streaming source alike.

    ``batches()`` gives this process's batches endlessly: a map-style data set is read in the seeded stream
    above, which resumes at the exact item; a streaming source (``stream(rank, world_size, seed)``, webdataset
    shards) splits itself across processes, and a resumed run draws a fresh order from it. ``position``
    counts the items all processes consumed; ``advance`` moves it after every optimiser step. Items may carry
    ``"issues"`` (counts of bad or repaired data met while producing them): they are taken out of every batch
    and summed per epoch and for the run, and ``on_epoch_end(epoch, issues)`` hears of every finished epoch.
    """

    def __init__(self, dataset, *, batch_size: int, collate_fn: Callable, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, on_epoch_end: Callable[[int, dict], None] | None = None):
        self.dataset, self.streaming = dataset, is_streaming(dataset)
        self.batch_size, self.collate_fn, self.num_workers = batch_size, collate_fn, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.on_epoch_end = on_epoch_end
        self.position = 0  # data items consumed by all processes together
        self.epoch = 0
        self.issues: Counter = Counter()  # this process's bad / repaired data items, whole run
        self.epoch_issues: Counter = Counter()  # the same, current epoch

    @property
    def index_issues(self) -> dict:
        """Files the data set left out while indexing (e.g. images without a caption file)."""
        return dict(getattr(self.dataset, "index_issues", None) or {})

    def state(self) -> dict:
        return {"stream_position": self.position, "epoch": self.epoch, "data_issues": dict(self.issues)}

    def load_state(self, state: dict, *, default_position: int) -> None:
        """Continue from a checkpoint's ``state()`` (older checkpoints lack it: ``default_position``)."""
        self.position = state.get("stream_position", default_position)
        self.epoch = state.get("epoch", 0)
        self.issues = Counter(state.get("data_issues", {}))

    def batches(self) -> Iterator:
        for batch in self._streamed() if self.streaming else self._map_style():
            yield self._take_issues(batch)

    def advance(self, items: int) -> None:
        """``items`` more were consumed by all processes; a map-style epoch ends every ``len(dataset)`` items."""
        self.position += items
        if not self.streaming:
            while self.epoch < self.position // len(self.dataset):
                self._end_epoch()

    def _map_style(self) -> Iterator:
        yield from stream_loader(
            self.dataset, self.batch_size, collate_fn=self.collate_fn, rank=self.rank, world_size=self.world_size,
            seed=self.seed, start_position=self.position, num_workers=self.num_workers,
        )

    def _streamed(self) -> Iterator:
        while True:
            # A resumed run cannot seek inside a stream: it draws a new order (seeded by the position).
            seed = self.seed + self.epoch * 1_000_003 + self.position
            loader = DataLoader(self.dataset.stream(self.rank, self.world_size, seed), batch_size=self.batch_size,
                                collate_fn=self.collate_fn, num_workers=self.num_workers, drop_last=True)
            produced = 0
            for batch in loader:
                produced += 1
                yield batch
            if produced == 0:
                raise ValueError(
                    f"the data source {self.dataset!r} gave process {self.rank} no full batch of "
                    f"{self.batch_size} items in a whole epoch; check its shards or lower trainer.batch_size"
                )
            self._end_epoch()

    def _take_issues(self, batch):
        if isinstance(batch, dict) and "issues" in batch:
            for counts in batch.pop("issues"):
                self.epoch_issues.update(counts)
                self.issues.update(counts)
        return batch

    def _end_epoch(self) -> None:
        self.epoch += 1
        if self.on_epoch_end is not None:
            self.on_epoch_end(self.epoch, dict(self.epoch_issues))
        self.epoch_issues = Counter()
