"""Batching dict items: tensors stacked, everything else gathered into lists."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch


def collate_dicts(items: Sequence[dict]) -> dict:
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def is_streaming(source) -> bool:
    """A streaming source (``stream(rank, world_size, seed)``, e.g. webdataset shards) rather than a map-style
    data set (``len`` and ``[i]``)."""
    return hasattr(source, "stream")


def first_items(dataset, n: int) -> dict:
    """The first ``n`` items (fewer if the data set is smaller) of a map-style data set or a streaming
    source, collated: the fixed evaluation and preview batches of the jobs."""
    if is_streaming(dataset):  # webdataset shards: the first n good items of one pass
        items = list(itertools.islice(iter(dataset), n))
    else:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
    if not items:
        shards = getattr(dataset, "shards", None)
        named = f" (shards {', '.join(map(str, shards[:3]))}{', ...' if len(shards) > 3 else ''})" if shards else ""
        raise ValueError(f"no items to evaluate on in {dataset!r}{named}: it is empty, or none of its items could be "
                         "read (corrupt images, missing or empty captions); give it readable images with captions")
    return collate_dicts(items)
