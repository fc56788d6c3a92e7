"""Batching dict items: tensors stacked, everything else gathered into lists."""

from __future__ import annotations

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
