"""A compact text vocabulary: the few ids of a big tokenizer (CLIP's BPE, 49,408 ids) that a corpus uses.

A softmax over the whole BPE vocabulary at every text position would cost more than the rest of a small
transformer on a CPU, and a captioned data set uses a small fraction of it (`shapes`: 38 ids). The
vocabulary keeps the ids seen in the training captions (the most frequent ``max_size`` of them, if given),
sorted, and maps a tokenizer's rows to compact ids:

* ``UNK`` (0): an id the training captions never used;
* ``PAD`` (1): a position after the caption's end token (the model gives each such position its own
  learned embedding: the paper's padding per text position);
* ``2 + i``: the ``i``-th kept source id.

The source ids are plain data (a list of ints in the model's config), so a checkpoint is self-contained.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Sequence

import torch
from torch import nn

UNK = 0
PAD = 1
NUM_SPECIAL = 2


def caption_lengths(rows: torch.Tensor, end_id: int) -> torch.Tensor:
    """Tokens up to and including the end token per row [B] (the whole row when it has no end token)."""
    is_end = rows == end_id
    first_end = is_end.int().argmax(dim=1)
    return torch.where(is_end.any(dim=1), first_end + 1, torch.full_like(first_end, rows.shape[1]))


class TextVocabulary(nn.Module):
    """Source-tokenizer ids [B, L] -> compact ids [B, length] (see the module's docstring)."""

    def __init__(self, source_ids: Sequence[int], end_id: int):
        super().__init__()
        ids = sorted({int(i) for i in source_ids})
        if len(ids) != len(source_ids):
            raise ValueError(f"source_ids must be distinct, got {len(source_ids)} ids of which {len(ids)} differ")
        if not ids:
            raise ValueError("a text vocabulary needs at least one source id")
        if end_id not in ids:
            raise ValueError(f"the end token id {end_id} must be one of the source ids")
        self.end_id = int(end_id)
        self.register_buffer("source_ids", torch.tensor(ids, dtype=torch.long), persistent=False)

    @classmethod
    def from_token_rows(cls, rows: torch.Tensor, end_id: int, max_size: int | None = None) -> "TextVocabulary":
        """The ids used by tokenized captions [N, L] (up to each row's end token), the ``max_size`` most
        frequent of them if given (the end token is always kept)."""
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"expected tokenized captions [N, L] with N > 0, got shape {tuple(rows.shape)}")
        lengths = caption_lengths(rows, end_id)
        counts = Counter(int(i) for row, n in zip(rows.tolist(), lengths.tolist()) for i in row[:n])
        counts[end_id] = max(counts.values()) + 1
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"max_size must be >= 1, got {max_size}")
            counts = Counter(dict(counts.most_common(max_size)))
        return cls(sorted(counts), end_id)

    def compact_id(self, source_id: int) -> int:
        """The compact id of a kept source id (a KeyError for one this vocabulary does not keep)."""
        index = int(torch.searchsorted(self.source_ids, torch.tensor(source_id, device=self.source_ids.device)))
        if index >= self.source_ids.numel() or int(self.source_ids[index]) != source_id:
            raise KeyError(f"the source id {source_id} is not in this vocabulary")
        return index + NUM_SPECIAL

    def decode(self, compact: torch.Tensor) -> torch.Tensor:
        """Compact ids [B, S] -> source ids [B, S]; the special ids (unknown, padding) become 0, which a tokenizer's
        ``decode`` (after cutting each row at its end token) never reads."""
        kept = compact >= NUM_SPECIAL
        index = (compact - NUM_SPECIAL).clamp(min=0, max=self.source_ids.numel() - 1)
        return torch.where(kept, self.source_ids.to(compact.device)[index], torch.zeros_like(compact))

    def __len__(self) -> int:
        return NUM_SPECIAL + self.source_ids.numel()

    def encode(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """Source ids [B, L] -> compact ids [B, length].

        A caption that does not fit (with its end token) is cut to ``length`` tokens ending in the end
        token, with a warning, as the CLIP stage's tokenizer does.
        """
        if rows.ndim != 2 or rows.dtype.is_floating_point:
            raise ValueError(f"text tokens must be integer ids [B, L], got {rows.dtype} of shape {tuple(rows.shape)}")
        rows = rows.to(self.source_ids.device)
        lengths = caption_lengths(rows, self.end_id)
        too_long = lengths > length
        if too_long.any():
            warnings.warn(
                f"{int(too_long.sum())} caption(s) of up to {int(lengths.max())} tokens are longer than the "
                f"{length}-token text length of this model and were truncated",
                stacklevel=3,
            )
            rows = rows.clone()
            rows[too_long, length - 1] = self.end_id
            lengths = lengths.clamp(max=length)
        rows = rows[:, :length].contiguous()
        if rows.shape[1] < length:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], length - rows.shape[1])], dim=1)
        index = torch.searchsorted(self.source_ids, rows).clamp(max=self.source_ids.numel() - 1)
        known = self.source_ids[index] == rows
        compact = torch.where(known, index + NUM_SPECIAL, torch.full_like(rows, UNK))
        padding = torch.arange(length, device=rows.device)[None, :] >= lengths[:, None]
        return compact.masked_fill(padding, PAD)
