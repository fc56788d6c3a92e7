"""The decoder's caption encoders: both map caption tokens to (states [B, T, width], pooled [B, width]).

* ``CaptionEncoder``: GLIDE's own small text transformer over the caption token ids, trained with the decoder.
* ``ClipTokenProjection``: the alternative that reuses the CLIP text encoder's per-token states
  (``TextCondition.token_embeds``) through a Linear + LayerNorm.

``pooled`` is the state at the last real token (the last ``True`` of ``mask``), which for CLIP-style
tokenisation is the end-of-text token. A caption whose mask is all ``False`` is treated as if its first
token were real, so nothing divides by an empty softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unclip.activation_checkpointing import Checkpointed
from unclip.configurable import configurable
from unclip.embedding import TextCondition


def _check_tokens(name: str, tokens: Tensor, mask: Tensor, ndim: int) -> None:
    if tokens.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(tokens.shape)}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"mask has shape {list(mask.shape)}, expected {list(tokens.shape[:2])} to match {name}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = real token), got dtype {mask.dtype}")


def _nonempty(mask: Tensor) -> Tensor:
    """The mask with position 0 marked real in rows that have no real token."""
    first = torch.zeros_like(mask)
    first[:, 0] = ~mask.any(dim=1)
    return mask | first


def last_real_token(states: Tensor, mask: Tensor) -> Tensor:
    """states [B, T, W], mask [B, T] -> the state at each row's last True position [B, W]."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)  # [B]
    return states[torch.arange(states.shape[0], device=states.device), last]


class Block(Checkpointed, nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); in training it may recompute its activations
    in the backward (``unclip.activation_checkpointing``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        return self.checkpointed(self._forward, x, attn_mask)

    def _forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        q, k, v = rearrange(self.qkv(self.ln_attn(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn_out(rearrange(out, "b h t d -> b t (h d)"))
        return x + self.mlp(self.ln_mlp(x))


@configurable
class CaptionEncoder(nn.Module):
    """GLIDE's caption transformer: token + position embeddings, pre-LN blocks, padding masked, final LN."""

    def __init__(self, *, vocab_size: int = 49408, context_length: int = 77, width: int = 256, layers: int = 4,
                 heads: int = 4):
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("context_length", context_length), ("width", width),
                            ("layers", layers), ("heads", heads)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.final_ln = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] long, mask [B, T] bool (True = real token) -> (states [B, T, width], pooled [B, width])."""
        _check_tokens("tokens", tokens, mask, 2)
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens has length {tokens.shape[1]}, expected at most context_length="
                             f"{self.context_length}")
        mask = _nonempty(mask)
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        attn_mask = mask[:, None, None, :]  # padding keys hidden: [B, 1, 1, T]
        for block in self.blocks:
            x = block(x, attn_mask)
        states = self.final_ln(x)
        return states, last_real_token(states, mask)

    def encode(self, text: TextCondition) -> tuple[Tensor, Tensor]:
        """A TextCondition's token ids -> (states, pooled)."""
        return self(text.tokens, text.mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@configurable
class ClipTokenProjection(nn.Module):
    """Use the CLIP text encoder's per-token states as the caption context: Linear(token_dim -> width) + LN."""

    def __init__(self, *, token_dim: int, width: int = 256):
        super().__init__()
        for name, value in [("token_dim", token_dim), ("width", width)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.token_dim, self.width = token_dim, width
        self.proj = nn.Linear(token_dim, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, token_embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """token_embeds [B, T, token_dim], mask [B, T] bool -> (states [B, T, width], pooled [B, width])."""
        _check_tokens("token_embeds", token_embeds, mask, 3)
        if token_embeds.shape[-1] != self.token_dim:
            raise ValueError(f"token_embeds has width {token_embeds.shape[-1]}, expected token_dim={self.token_dim}")
        states = self.ln(self.proj(token_embeds))
        return states, last_real_token(states, _nonempty(mask))

    def encode(self, text: TextCondition) -> tuple[Tensor, Tensor]:
        """A TextCondition's per-token CLIP states -> (states, pooled)."""
        return self(text.token_embeds, text.mask)
