"""Classifier-free guidance (Ho & Salimans 2021) as one batched forward.

A guided network takes ``model(x, t, drop_cond, **cond)`` where ``drop_cond`` is a BoolTensor [B] that is
True where the conditioning should be replaced by the network's learned null conditioning. Then

    fn = classifier_free_guidance(net, scale, text=text_cond, image_embed=image_embed)
    x0 = sample_ddim(fn, diffusion, x_T)

runs ``net`` once per step on the doubled batch [x, x] with drop_cond = [False] * B + [True] * B and the
conditioning repeated the same way, and returns ``uncond + scale * (cond - uncond)``. Guidance is applied
to the raw output; for every objective (eps, x0, v) that is the same as guiding the predicted x0, since
each is an affine function of the output at a fixed x_t and t.

Negative conditioning (a negative prompt): ``classifier_free_guidance(net, scale, negative=dict(...), **cond)``
takes the unconditional branch from ``net`` given the ``negative`` conditioning (same keys as ``cond``, not
dropped) instead of the learned null, so that guidance steers away from it: one forward on
[cond rows, negative rows] with ``drop_cond`` all False.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from einops import rearrange


def _joined(first: Any, second: Any, where: str = "conditioning") -> Any:
    """``first`` and ``second`` concatenated along the batch: tensors, None (with None), dataclasses, dicts, lists
    and tuples of them; anything else (ints, strings, ...) is not batched and must be equal in both."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(f"{where}: the negative has shape {list(second.shape)}, the conditioning {list(first.shape)}")
        return torch.cat([first, second.to(first.dtype)])
    if dataclasses.is_dataclass(first) and not isinstance(first, type) and type(first) is type(second):
        return type(first)(**{f.name: _joined(getattr(first, f.name), getattr(second, f.name), f"{where}.{f.name}")
                              for f in dataclasses.fields(first) if f.init})
    if isinstance(first, dict) and isinstance(second, dict):
        if set(first) != set(second):
            raise ValueError(f"{where}: the negative has keys {sorted(second)}, the conditioning {sorted(first)}")
        return {key: _joined(first[key], second[key], f"{where}.{key}") for key in first}
    if isinstance(first, (list, tuple)) and type(first) is type(second) and len(first) == len(second):
        return type(first)(_joined(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(first, second)))
    structured = (torch.Tensor, dict, list, tuple)
    if (isinstance(first, structured) or isinstance(second, structured) or dataclasses.is_dataclass(first)
            or dataclasses.is_dataclass(second) or first != second):
        raise ValueError(f"{where}: the negative ({type(second).__name__}) does not match the conditioning "
                         f"({type(first).__name__}); give both the same structure")
    return first


def classifier_free_guidance(
    model: Callable[..., torch.Tensor], scale: float, /, *, negative: dict | None = None, **cond: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``model_fn(x, t)`` for the samplers that guides ``model(x, t, drop_cond, **cond)`` by ``scale``.

    ``scale == 1`` is the plain conditional model and ``scale == 0`` the unconditional one (each one
    forward of batch B); any other scale runs one forward of batch 2B. The output is float32. With
    ``negative`` (the conditioning to steer away from, same keys as ``cond``) the unconditional branch is
    ``model`` on it, not dropped: ``scale == 0`` is then the negative's model alone.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")
    if negative is not None and not isinstance(negative, dict):
        raise TypeError(f"negative must be a dict of conditioning inputs like the keyword ones, got {type(negative).__name__}")
    other, other_dropped = (cond, True) if negative is None else (negative, False)
    joined = _joined(cond, other) if scale not in (0, 1) else None  # concatenated once, reused at every step

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

    def single(x: torch.Tensor, t: torch.Tensor, drop: bool, inputs: dict) -> torch.Tensor:
        drop_cond = drop_flags(x.shape[0], x.device, "all" if drop else "none")
        return model(x, t, drop_cond, **inputs).float()

    if scale == 1:
        return lambda x, t: single(x, t, False, cond)
    if scale == 0:
        return lambda x, t: single(x, t, other_dropped, other)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # [2B]: False * B, then True * B (dropped to the learned null) or False * B (the negative)
        drop_cond = drop_flags(batch, x.device, "halves") if other_dropped else drop_flags(2 * batch, x.device, "none")
        out = model(torch.cat([x, x]), torch.cat([t, t]), drop_cond, **joined)
        if out.shape[0] != 2 * batch:
            raise ValueError(f"the model returned batch {out.shape[0]} for a doubled batch of {2 * batch}")
        cond_out, uncond_out = rearrange(out.float(), "(two b) ... -> two b ...", two=2)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided
