"""The GLIDE / ADM-style diffusion UNet used by the decoder and the upsamplers.

ADM design (Dhariwal & Nichol 2021): residual blocks with GroupNorm(32), SiLU and scale-shift norm driven
by the time embedding; strided-conv downsampling and nearest+conv upsampling; self-attention at chosen
spatial resolutions and in the middle; the output convolution of every residual branch and the final
convolution start at zero, so a fresh model predicts exactly zero.

What the UNet is conditioned on is given to it as parts (``unclip.decoder.conditioning``): the decoder's CLIP
image embedding and caption, the upsamplers' low-resolution image, the inpainting decoder's known pixels and
mask. Parts add to the time embedding, yield context tokens (every attention layer projects them to extra
keys/values, GLIDE's ``encoder_kv``, so its spatial queries attend to ``spatial tokens + context tokens``), or
concatenate channels to the input. The body below knows none of them by name.

One departure from ADM, ``upsample_width="next"`` (the default): the up path's upsampling convolution
already outputs the finer level's width (ADM's keeps the coarse width, ``"same"``, and leaves the narrowing
to the next residual block, whose first convolution then reads coarse + skip channels). At the benchmark
configuration (64 px, 64 channels, mult 1-2-4) that is 11% fewer training FLOPs (410 -> 364 GFLOP a step of
8) and 7% more samples/s, since the convolutions already run at the CPU's bf16 matmul rate.

Classifier-free guidance is learned null conditioning inside the parts (``drop_image_embed``,
``drop_context``); a guided step is one forward on a doubled batch with flags ``[False] * B + [True] * B``.

With activation checkpointing on (``trainer.activation_checkpointing``, ``unclip.activation_checkpointing``) every
level with a ResBlock and the middle block recompute their activations in the backward while training.

The model works in either memory layout (attention uses ``[B, H*W, C]`` views, free in
``torch.channels_last``). Measured on a 2-core AVX512-BF16 CPU under bf16 autocast, plain NCHW trained
faster than channels_last (GroupNorm's backward is slow in channels_last there), so NCHW is the default.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unclip.activation_checkpointing import Checkpointed
from unclip.decoder.conditioning import Condition, Conditioning, check_shape, combine
from unclip.diffusion.timesteps import timestep_embedding

GROUPS = 32  # GroupNorm groups everywhere, as ADM
UPSAMPLE_WIDTHS = ("next", "same")
DEFAULT_UPSAMPLE_WIDTH = "next"  # see the module docstring


def sampling_layout(x: Tensor) -> Tensor:
    """The memory layout a UNet samples fastest in: channels_last on the CPU, where oneDNN's convolutions then
    skip a reorder per call (guided 64-px sampling measured 1.17x faster); elsewhere ``x`` unchanged. The
    layout follows the input through every layer. Training keeps NCHW (see the module docstring)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.ndim == 4 else x


def with_resolved_upsample_width(unet: dict | None) -> dict:
    """A stage's UNet settings with ``upsample_width`` filled in: stages save this, so a later change of the
    default cannot rebuild a saved model differently."""
    return {"upsample_width": DEFAULT_UPSAMPLE_WIDTH, **(unet or {})}


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN with scale-shift from the embedding, SiLU, dropout, zero-init conv; plus skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, use_scale_shift_norm: bool,
                 groups: int = GROUPS):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # Takes SiLU(emb), computed once per forward by the UNet.
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb_out = self.emb_proj(emb_act)[:, :, None, None]  # [B, 2C or C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + emb_out)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial tokens plus the context tokens (GLIDE's ``encoder_kv``)."""

    def __init__(self, channels: int, head_channels: int, context_width: int | None, groups: int = GROUPS):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} must be divisible by heads {self.heads}")
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_width, 2 * channels) if context_width else None
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x [B, C, H, W]; context [B, Tc, context_width]; key_mask [B, H*W + Tc] bool (True = visible) or None."""
        b, c, height, width = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # a view in channels_last
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if context is not None and self.context_kv is not None:
            ck, cv = rearrange(self.context_kv(context), "b t (two h d) -> two b h t d", two=2, h=self.heads)
            k = torch.cat([k, ck.to(k.dtype)], dim=2)
            v = torch.cat([v, cv.to(v.dtype)], dim=2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N + Tc]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution from ``channels`` to ``out_channels``."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(Checkpointed, nn.Module):
    """One UNet step: a ResBlock and/or attention and/or a resampler (any of them may be absent). With activation
    checkpointing (``unclip.activation_checkpointing``) a step with a ResBlock recomputes its activations in the
    backward; a lone resampler does not (its input is kept as a skip connection anyway)."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: Tensor, emb_act: Tensor, context: Tensor | None, key_mask: Tensor | None) -> Tensor:
        if self.res is None:
            return self._forward(x, emb_act, context, key_mask)
        return self.checkpointed(self._forward, x, emb_act, context, key_mask)

    def _forward(self, x: Tensor, emb_act: Tensor, context: Tensor | None, key_mask: Tensor | None) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb_act)
        if self.attn is not None:
            x = self.attn(x, context, key_mask)
        if self.resample is not None:
            x = self.resample(x)
        return x


class Middle(Checkpointed, nn.ModuleList):
    """The middle block: ResBlock, attention, ResBlock (a ModuleList, so its weights keep their names
    ``middle.0`` to ``middle.2``), checkpointed as one; without attention (``middle_attention=False``) two ResBlocks."""

    def __init__(self, res1: ResBlock, attn: AttentionBlock | None, res2: ResBlock):
        super().__init__([res1, res2] if attn is None else [res1, attn, res2])

    def forward(self, x: Tensor, emb_act: Tensor, context: Tensor | None, key_mask: Tensor | None) -> Tensor:
        return self.checkpointed(self._forward, x, emb_act, context, key_mask)

    def _forward(self, x: Tensor, emb_act: Tensor, context: Tensor | None, key_mask: Tensor | None) -> Tensor:
        x = self[0](x, emb_act)
        if len(self) == 3:  # with attention (a convolutional UNet's has none: middle_attention=false)
            x = self[1](x, context, key_mask)
        return self[-1](x, emb_act)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_body(*, image_size: int, in_channels: int, out_channels: int, base_channels: int,
                channel_mult: tuple[int, ...], num_res_blocks: int, attention_resolutions: tuple[int, ...],
                head_channels: int, dropout: float, upsample_width: str, norm_groups: int = GROUPS) -> None:
    """The UNet body's settings (a ``unet:`` dict's), each error naming the setting."""
    for name, value in [("image_size", image_size), ("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                        ("head_channels", head_channels), ("norm_groups", norm_groups)]:
        _check_positive(name, value)
    if not channel_mult or not all(isinstance(m, int) and m > 0 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
    if base_channels % norm_groups:
        raise ValueError(f"base_channels={base_channels} must be a multiple of {norm_groups} (GroupNorm groups, "
                         f"norm_groups)")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={factor} "
            f"for channel_mult={channel_mult}")
    if not all(isinstance(r, int) and r > 0 for r in attention_resolutions):
        raise ValueError(f"attention_resolutions must be positive ints, got {attention_resolutions!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if upsample_width not in UPSAMPLE_WIDTHS:
        raise ValueError(f"upsample_width must be one of {UPSAMPLE_WIDTHS}, got {upsample_width!r}")


class UNet(nn.Module):
    """The ADM UNet body; what it is conditioned on comes from the ``conditions`` it is given (see
    ``unclip.decoder.conditioning``): ``forward(x, t, **inputs)`` hands each part the inputs it reads."""

    def __init__(
        self,
        *,
        conditions: dict[str, Condition] | None = None,
        image_size: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        head_channels: int = 64,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        upsample_width: str = DEFAULT_UPSAMPLE_WIDTH,
        middle_attention: bool = True,
        norm_groups: int = GROUPS,
    ):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        _check_body(image_size=image_size, in_channels=in_channels, out_channels=out_channels,
                    base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                    attention_resolutions=attention_resolutions, head_channels=head_channels, dropout=dropout,
                    upsample_width=upsample_width, norm_groups=norm_groups)
        self.conditions = nn.ModuleDict(conditions or {})
        widths = {part.context_width for part in self.conditions.values() if part.context_width}
        if len(widths) > 1:
            raise ValueError(f"the conditioning parts yield context tokens of different widths {sorted(widths)}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.emb_dim = embedding_width(base_channels)
        self.context_width = widths.pop() if widths else None  # what every attention layer's context_kv reads
        self._register_load_state_dict_pre_hook(_rename_old_conditioning_weights, with_module=True)

        self.size_multiple = 2 ** (len(channel_mult) - 1)  # what the down path's halvings need of a side
        self.time_embed = _mlp(base_channels, self.emb_dim)

        def attention(channels: int, resolution: int) -> AttentionBlock | None:
            if resolution not in attention_resolutions:
                return None
            return AttentionBlock(channels, head_channels, self.context_width, norm_groups)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, self.emb_dim, dropout, use_scale_shift_norm, norm_groups)

        extra = sum(part.extra_channels for part in self.conditions.values())
        self.input_conv = nn.Conv2d(in_channels + extra, base_channels, 3, padding=1)
        skip_channels = self._build_down(channel_mult, num_res_blocks, res, attention)
        ch = skip_channels[-1]
        # Without middle attention (and no attention_resolutions) the UNet is convolutional: it takes any square size
        # that is a multiple of size_multiple, e.g. an upsampler trained on crops and sampled on whole images.
        first = res(ch, ch)  # built in this order, so that a seed builds the weights it always built
        attn = AttentionBlock(ch, head_channels, self.context_width, norm_groups) if middle_attention else None
        self.middle = Middle(first, attn, res(ch, ch))
        ch = self._build_up(channel_mult, num_res_blocks, res, attention, skip_channels, upsample_width)
        self.output = nn.Sequential(nn.GroupNorm(norm_groups, ch), nn.SiLU(),
                                    _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))
        # No attention anywhere: the UNet takes any square image whose side is a multiple of size_multiple (fixed
        # once built, so forward reads it instead of walking the levels).
        self.convolutional = not middle_attention and all(level.attn is None for level in [*self.down, *self.up])

    def _build_down(self, channel_mult: tuple[int, ...], num_res_blocks: int, res, attention) -> list[int]:
        """The down path (ADM's input_blocks): every step's output is a skip connection for the up path, whose
        channels this returns (the input convolution's first). Attention resolutions that do not occur (e.g. 8 at
        64 px with 3 levels) are ignored, as in ADM."""
        self.down = nn.ModuleList()
        skip_channels = [self.base_channels]
        ch, resolution = self.base_channels, self.image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = self.base_channels * mult
                self.down.append(Level(res(ch, out), attention(out, resolution)))
                ch = out
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Level(None, None, Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        return skip_channels

    def _build_up(self, channel_mult: tuple[int, ...], num_res_blocks: int, res, attention, skip_channels: list[int],
                  upsample_width: str) -> int:
        """The up path, taking every skip connection back (last first); returns its output channels."""
        self.up = nn.ModuleList()
        ch, resolution = skip_channels[-1], self.image_size // 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = self.base_channels * mult
                ch_in, ch, upsample = ch, out, None
                if level > 0 and i == num_res_blocks:
                    ch = self.base_channels * channel_mult[level - 1] if upsample_width == "next" else out
                    upsample = Upsample(out, ch)
                self.up.append(Level(res(ch_in + skip_channels.pop(), out), attention(out, resolution), upsample))
            if level > 0:
                resolution *= 2
        assert not skip_channels
        return ch

    def check_input_size(self, size: int, name: str = "x") -> None:
        """A convolutional UNet's check: an error naming ``size`` unless it can take ``size`` x ``size`` images (a
        UNet that attends takes only ``image_size``, which its input's shape check says)."""
        if size < 1 or size % self.size_multiple:
            raise ValueError(f"{name} is {size}x{size}: a side must be a positive multiple of {self.size_multiple} "
                             f"(2 ** (len(channel_mult) - 1))")

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _conditioning(self, batch: int, size: int, device, inputs: dict) -> Conditioning:
        read = {name for part in self.conditions.values() for name in part.inputs}
        for name, value in inputs.items():
            if value is not None and name not in read:
                hint = _MISSING_PART.get(name, "no conditioning part reads it")
                raise ValueError(f"{name} given but this UNet was built without it ({hint}); its conditioning reads "
                                 f"{sorted(read) or 'nothing'}")
        parts = [part(batch, size, device, **{name: inputs.get(name) for name in part.inputs})
                 for part in self.conditions.values()]
        return combine(parts, batch, device)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, **inputs) -> Tensor:
        """x [B, in_channels, S, S] noisy image; t [B] (or scalar) timesteps, int or float; ``inputs`` for the
        conditioning parts (e.g. ``image_embed``, ``context``, ``drop_context``, ``low_res``, ``aug_level``)."""
        batch, size = x.shape[0], x.shape[-1] if self.convolutional else self.image_size
        if x.ndim == 4 and self.convolutional:
            self.check_input_size(size)
        check_shape("x", x, (None, self.in_channels, size, size))
        device = x.device
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        check_shape("t", t, (batch,))
        cond = self._conditioning(batch, size, device, inputs)

        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        if cond.emb is not None:
            emb = emb + cond.emb
        if cond.channels is not None:
            x = torch.cat([x, cond.channels.to(x.dtype)], dim=1)
        ctx, ctx_visible = cond.tokens, cond.visible  # [B, Tc, context_width] or None; [B, Tc] bool or None
        key_masks: dict[int, Tensor] = {}  # per spatial token count: [B, N + Tc]

        def key_mask_for(h: Tensor) -> Tensor | None:
            if ctx_visible is None:
                return None
            n = h.shape[-2] * h.shape[-1]
            if n not in key_masks:
                spatial = torch.ones(batch, n, dtype=torch.bool, device=device)
                key_masks[n] = torch.cat([spatial, ctx_visible], dim=1)
            return key_masks[n]

        emb_act = F.silu(emb)
        h = self.input_conv(x)
        if cond.features is not None:
            h = h + cond.features.to(h.dtype)
        skips = [h]
        for block in self.down:
            h = block(h, emb_act, ctx, key_mask_for(h) if block.attn is not None else None)
            skips.append(h)
        h = self.middle(h, emb_act, ctx, key_mask_for(h))
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb_act, ctx, key_mask_for(h) if block.attn is not None else None)
        return self.output(h)


def embedding_width(base_channels: int) -> int:
    """The width of a UNet's time embedding (what conditioning parts add to): 4 x base_channels, as ADM."""
    return 4 * base_channels


# Which setting a stage needs for an input its UNet was built without (for the error message).
_LOW_RES = "an Upsampler (conf/upsampler) reads it, a Decoder does not"
_EMBED = "a Decoder (conf/decoder) reads it, an Upsampler does not"
_CAPTION = "a Decoder with caption: transformer or clip_tokens reads it, not one with caption: none nor an Upsampler"
_INPAINT = "a Decoder with inpaint: true (conf/decoder/inpaint.yaml) reads it"
_MISSING_PART = {"low_res": _LOW_RES, "aug_level": _LOW_RES, "image_embed": _EMBED, "drop_image_embed": _EMBED,
                 "context": _CAPTION, "context_mask": _CAPTION, "pooled_context": _CAPTION, "drop_context": _CAPTION,
                 "masked_image": _INPAINT, "mask": _INPAINT}

# Checkpoints written before the conditioning was composed kept these weights on the UNet itself.
_OLD_NAMES = {
    "null_image_embed": "conditions.image.null_embed", "image_to_time.": "conditions.image.to_time.",
    "image_to_tokens.": "conditions.image.to_tokens.", "image_token_norm.": "conditions.image.token_norm.",
    "null_pooled_context": "conditions.caption.null_pooled", "pooled_to_time.": "conditions.caption.pooled_to_time.",
    "aug_embed.": "conditions.low_res.aug_embed.",
}


def _rename_old_conditioning_weights(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_NAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break
