"""Classifier-free guidance (Ho & Salimans 2021) as one batched forward.

A guided network takes ``model(x, t, drop_cond, **cond)`` where ``drop_cond`` is a BoolTensor [B] that is
True where the conditioning should be replaced by the network's learned null conditioning. Then

    fn = classifier_free_guidance(net, scale, text=text_cond, image_embed=image_embed)
    x0 = sample_ddim(fn, diffusion, x_T)

runs ``net`` once per step on the doubled batch [x, x] with drop_cond = [False] * B + [True] * B and the
conditioning repeated the same way, and returns ``uncond + scale * (cond - uncond)``. Guidance is applied
to the raw output; for every objective (eps, x0, v) that is the same as guiding the predicted x0, since
each is an affine function of the output at a fixed x_t and t.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from einops import rearrange


def _doubled(value: Any) -> Any:
    """``value`` repeated along the batch: [c, c]. Tensors, None, dataclasses, dicts, lists and tuples of
    them are handled; anything else (ints, strings, ...) is not batched and is passed through."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: _doubled(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {key: _doubled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_doubled(item) for item in value)
    return value


def classifier_free_guidance(
    model: Callable[..., torch.Tensor], scale: float, /, **cond: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``model_fn(x, t)`` for the samplers that guides ``model(x, t, drop_cond, **cond)`` by ``scale``.

    ``scale == 1`` is the plain conditional model and ``scale == 0`` the unconditional one (each one
    forward of batch B); any other scale runs one forward of batch 2B. The output is float32.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")

    # The drop flags of a batch size are made once and passed at every step: a model may key a cache on them
    # (the prior's prefix cache), and a CUDA graph replays without making tensors.
    flags: dict = {}

    def drop_flags(batch: int, device: torch.device, pattern: str) -> torch.Tensor:
        key = (batch, device, pattern)
        if key not in flags:
            if pattern == "halves":  # [2B]: False * B, then True * B
                flags[key] = torch.arange(2 * batch, device=device) >= batch
            else:
                flags[key] = torch.full((batch,), pattern == "all", dtype=torch.bool, device=device)
        return flags[key]

    def single(x: torch.Tensor, t: torch.Tensor, drop: bool) -> torch.Tensor:
        drop_cond = drop_flags(x.shape[0], x.device, "all" if drop else "none")
        return model(x, t, drop_cond, **cond).float()

    if scale == 1:
        return lambda x, t: single(x, t, drop=False)
    if scale == 0:
        return lambda x, t: single(x, t, drop=True)

    doubled_cond = _doubled(cond)  # repeated once, reused at every step

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        drop_cond = drop_flags(batch, x.device, "halves")
        out = model(torch.cat([x, x]), torch.cat([t, t]), drop_cond, **doubled_cond)
        if out.shape[0] != 2 * batch:
            raise ValueError(f"the model returned batch {out.shape[0]} for a doubled batch of {2 * batch}")
        cond_out, uncond_out = rearrange(out.float(), "(two b) ... -> two b ...", two=2)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided
