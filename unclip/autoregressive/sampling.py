"""Drawing the next token from logits: temperature, top-k, top-p (nucleus), classifier-free guidance."""

from __future__ import annotations

import torch


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """Raise a ValueError naming the bad setting and the allowed range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (for the most likely token use top_k=1)")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an int in [1, {vocab_size}] (the vocabulary size) or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits [B, V] with every token outside the top ``top_k`` and outside the nucleus ``top_p`` (the
    smallest set of most likely tokens whose probability reaches ``top_p``) set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p  # the most likely token always stays (before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits; at ``scale`` 1 exactly the conditional logits."""
    return conditional + (scale - 1.0) * (conditional - unconditional)


def draw(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits [B, V] -> [B]."""
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
