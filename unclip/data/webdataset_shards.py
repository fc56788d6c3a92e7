"""Image/caption items from webdataset tar shards (the LAION / open_clip layout).

A shard is a tar file of samples ``{key}.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) + ``{key}.txt``. Tar
reading is the ``webdataset`` package's; decoding is ours (:mod:`unclip.data.cleaning`), so a bad sample
is skipped and its reason added to the ``issues`` of the next good item of the same worker (the last
good one, for problems at the end of a worker's shards), never dropped silently.

Sharding is explicit: epoch ``e`` orders the shards by ``(seed, e)``, process ``rank`` of ``world_size``
takes every ``world_size``-th shard from ``rank``, and data-loader worker ``w`` of ``W`` every ``W``-th of
those. Samples are then shuffled in a buffer seeded by ``(seed, e, rank, w)``. Ranks with more shards
yield more items: give every process the same number of shards (or use ``resampled=True``) when the
processes must step together.

``caption_noise`` replaces a share of the captions with web-like garbage (:mod:`unclip.data.caption_noise`), drawn
per sample by its shard's file name and key; its ``other`` kind takes the caption of the sample read before it.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from itertools import count, islice
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from unclip.configurable import register
from unclip.data.caption_noise import CaptionNoise
from unclip.data.cleaning import MAX_CAPTION_CHARS, MAX_PIXELS, MIN_SIZE, BadItem, add_issues, clean_caption, load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"


def expand_shards(urls: str | list[str]) -> list[str]:
    """Shard URLs with brace expansion (``"data/{000..099}.tar"``); local paths must exist."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    shards = [url for pattern in urls for url in expand_urls(os.fspath(pattern))]
    if not shards:
        raise ValueError(f"no shard URL in {urls!r}")
    for shard in shards:
        if ":" not in shard.split("/")[0] and not Path(shard).expanduser().is_file():
            raise FileNotFoundError(f"shard {shard!r} does not exist (from urls={urls!r})")
    return shards


@register
class WebDatasetSource(torch.utils.data.IterableDataset):
    """Items {"image", "caption", "meta": {"key", "url"}, "issues"} from tar shards.

    ``stream(rank, world_size, seed)`` gives a process its part; iterating the source itself is the
    stream of rank 0 of 1 (one deterministic epoch, e.g. for evaluation). ``resampled=True`` draws
    shards with replacement, endlessly, and allows fewer shards than processes x workers.
    """

    def __init__(self, urls: str | list[str], image_size: int = 64, shuffle_buffer: int = 1000, seed: int = 0,
                 resampled: bool = False, *, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE,
                 max_caption_chars: int = MAX_CAPTION_CHARS, caption_noise: float = 0.0):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 or 1: no shuffling), got {shuffle_buffer!r}")
        self.shards = expand_shards(urls)
        self.image_size, self.shuffle_buffer, self.seed, self.resampled = image_size, shuffle_buffer, seed, resampled
        self.max_pixels, self.min_size, self.max_caption_chars = max_pixels, min_size, max_caption_chars
        # the training split's only (its config node): a source does not know its split
        self.noise = CaptionNoise(caption_noise, seed, source=f"WebDatasetSource({urls!r})")

    def stream(self, rank: int = 0, world_size: int = 1, seed: int | None = None) -> ShardStream:
        """The items of process ``rank`` of ``world_size``: one epoch per iteration (endless if resampled)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not self.resampled and len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split across {world_size} processes; every process needs "
                f"at least one shard: write more shards or set resampled=True"
            )
        return ShardStream(self, rank, world_size, self.seed if seed is None else seed)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.stream(0, 1, self.seed))

    def take(self, n: int) -> list[dict]:
        """The first ``n`` items of ``iter(self)``; ValueError if the shards hold fewer good ones."""
        items = list(islice(iter(self), n))
        if len(items) < n:
            raise ValueError(f"asked for {n} items, but the shards {self.shards} hold only {len(items)} good ones")
        return items

    def decode(self, sample: dict) -> dict:
        """One webdataset sample (a dict of raw bytes) as an item; raises BadItem."""
        image_key = next((key for key in IMAGE_KEYS if key in sample), None)
        if image_key is None:
            raise BadItem("missing_image", f"sample {sample.get('__key__')!r} has none of {IMAGE_KEYS}")
        caption, caption_issues = clean_caption(sample.get(CAPTION_KEY), max_chars=self.max_caption_chars)
        image, image_issues = load_image(sample[image_key], self.image_size, max_pixels=self.max_pixels,
                                         min_size=self.min_size)
        return {"image": image, "caption": caption, "meta": {"key": sample["__key__"], "url": sample["__url__"]},
                "issues": add_issues(caption_issues, image_issues)}

    def __repr__(self) -> str:
        return (f"WebDatasetSource({len(self.shards)} shards, image_size={self.image_size}, "
                f"shuffle_buffer={self.shuffle_buffer}, seed={self.seed}, resampled={self.resampled})")


class ShardStream(torch.utils.data.IterableDataset):
    """One process's items of a WebDatasetSource; each iteration is the next epoch (see set_epoch)."""

    def __init__(self, source: WebDatasetSource, rank: int, world_size: int, seed: int):
        self.source, self.rank, self.world_size, self.seed = source, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``.

        Iterating the stream itself advances the epoch; a DataLoader's workers iterate copies, so call
        this before each pass over a DataLoader (with ``persistent_workers=False``).
        """
        self.epoch = epoch

    def shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> Iterator[str]:
        """The shards data-loader worker ``worker`` of ``num_workers`` reads in ``epoch``."""
        source = self.source
        if source.resampled:
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            return (rng.choice(source.shards) for _ in count())
        if len(source.shards) < self.world_size * num_workers:
            raise ValueError(
                f"{len(source.shards)} shards cannot be split across {self.world_size} processes x {num_workers} "
                f"data-loader workers; every worker needs at least one shard: write more shards, use fewer "
                f"workers or set resampled=True"
            )
        order = list(source.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)  # the same order in every process
        return iter(order[self.rank :: self.world_size][worker::num_workers])

    def __iter__(self) -> Iterator[dict]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(islice(self.shards(epoch, worker, num_workers), 3))  # for error messages
        pending: Counter[str] = Counter()

        def on_tar_error(err: Exception) -> bool:  # an unreadable shard or tar member: count it, go on
            # (tarfile ends a stream cut inside a member header silently: those samples are not counted)
            pending["bad_shard"] += 1
            return True

        samples = wds.tarfile_samples(({"url": url} for url in self.shards(epoch, worker, num_workers)),
                                      handler=on_tar_error)
        if self.source.shuffle_buffer > 1:  # shuffle the raw bytes: a buffer of decoded images is larger
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            buffer = self.source.shuffle_buffer
            samples = wds.shuffle(buffer, initial=buffer, rng=rng)(samples)
        last_caption = None  # the clean caption of the item before (caption_noise's "other" kind)
        held = None  # one item is held back, so that problems after the last good item still reach one
        for sample in samples:
            try:
                item = self.source.decode(sample)
            except BadItem as bad:
                pending[bad.reason] += 1
                continue
            add_issues(item["issues"], pending)
            pending.clear()
            if self.source.noise:
                caption, key = item["caption"], f"{Path(str(sample['__url__'])).name}/{sample['__key__']}"
                self.source.noise.apply(item, key, lambda rng, last=last_caption: last)
                last_caption = caption
            if held is not None:
                yield held
            held = item
        if held is None:
            raise RuntimeError(
                f"no readable sample in the shards of rank {self.rank} worker {worker} in epoch {epoch} "
                f"(first shards {shards}; problems {dict(pending)}); replace their unreadable samples, or give "
                "other shards"
            )
        add_issues(held["issues"], pending)
        yield held
