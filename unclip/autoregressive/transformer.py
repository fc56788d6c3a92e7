"""A decoder-only (GPT) transformer over embedded token sequences, with a key/value cache for sampling.

nanoGPT's shape: learned positions, pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final
LayerNorm. It takes embeddings and returns hidden states: what the tokens are, and what is predicted from
the states, is the caller's business (:mod:`unclip.autoregressive.text_image_transformer`).

With a :class:`KVCache`, a call appends its positions' keys and values to the cache and attends to all
cached positions, so sampling feeds one new token per step instead of the whole sequence again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unclip.activation_checkpointing import Checkpointed


class KVCache:
    """Keys and values of the positions seen so far, per layer: [B, heads, max_length, head_dim] each."""

    def __init__(self, depth: int, max_length: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth
        self.max_length = max_length
        self.length = 0  # positions stored (the same in every layer once a forward call has finished)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values [B, H, S, Dh]; return all of this layer's so far."""
        if self.keys[layer] is None:  # allocated at the first call, in the dtype the layer computes in
            batch, heads, _, head_dim = keys.shape
            self.keys[layer] = keys.new_empty(batch, heads, self.max_length, head_dim)
            self.values[layer] = values.new_empty(batch, heads, self.max_length, head_dim)
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        past = k.shape[2] - q.shape[2]  # positions before the first query
        mask = None
        if past > 0 and q.shape[2] > 1:  # several new queries after cached ones: causal, shifted by `past`
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0 and q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(rearrange(attended, "b h s d -> b s (h d)"))


class Block(Checkpointed, nn.Module):
    """Pre-LN block. Without a cache (training) it may checkpoint (``unclip.activation_checkpointing``); with one
    it never does (recomputing would append the positions to the cache twice)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_attention = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        if cache is not None:
            return self._forward(x, cache, layer)
        return self.checkpointed(self._forward, x, None, layer)

    def _forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm_attention(x), cache, layer))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class CausalTransformer(nn.Module):
    """Embeddings [B, S, W] -> hidden states [B, S, W]; position ``i`` sees positions ``<= i`` only."""

    def __init__(self, *, width: int, depth: int, heads: int, max_length: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.width, self.depth, self.heads, self.max_length = width, depth, heads, max_length
        self.positions = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02), output projections of residual branches scaled by 1 / sqrt(2 * depth)."""
        nn.init.normal_(self.positions, std=0.02)
        for name, param in self.blocks.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.ndim == 2:
                residual_out = name.endswith(("proj.weight", "mlp.2.weight"))
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.depth) if residual_out else 0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.depth, self.max_length)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``x`` holds positions ``cache.length ...`` (``0 ...`` without a cache); the cache grows by them."""
        start = 0 if cache is None else cache.length
        end = start + x.shape[1]
        if end > self.max_length:
            raise ValueError(f"sequence of {end} positions is longer than this transformer's {self.max_length}")
        x = x + self.positions[start:end].to(x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length = end
        return self.norm(x)
