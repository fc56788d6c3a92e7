"""Inpainting with any trained diffusion model: RePaint (Lugmayr et al. 2022) as a sampler of ``model_fn(x_t, t)``.

At every step the known region of x_t is replaced by the known image noised to that step (so the model only
ever fills the unknown region, seeing the known one at the right noise level), and the step is taken with
DDIM (``eta``). Replacement alone leaves seams: the model's fill at step t never saw the noise the known region
got. RePaint *resamples*: after stepping down it jumps back up ``jump_length`` steps with the forward process
q(x_t | x_s) and steps down again, ``jumps`` times at every ``jump_length``-th step, so the fill and the known
region are denoised together a few more times. ``jumps = 0`` is plain replacement (one model call a step);
``jumps = J`` costs about (1 + J) model calls a step.

The known region is pasted into the final x0 as well: outside the fill the output is ``known`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .gaussian import GaussianDiffusion
from .sampling import (
    Callback,
    ModelFn,
    check_eta,
    ddim_step,
    denoise,
    noise_like,
    progress_bar,
    timesteps_for,
)


@dataclass
class Inpainting:
    """What to keep: ``known`` [B, ...] where ``keep`` (broadcastable to it, 1 = keep, 0 = fill) is 1.

    ``jumps``: RePaint's resampling passes at every ``jump_length``-th step (0: plain replacement). Stages take
    ``known`` as images in [-1, 1] at their own resolution and ``keep`` as [B, 1, S, S]."""

    known: torch.Tensor
    keep: torch.Tensor
    jumps: int = 0
    jump_length: int = 1

    def __post_init__(self) -> None:
        for name in ("jumps", "jump_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "jump_length" else 0):
                bound = 1 if name == "jump_length" else 0
                raise ValueError(f"{name} must be an int >= {bound}, got {value!r}")
        if not isinstance(self.known, torch.Tensor) or not isinstance(self.keep, torch.Tensor):
            raise TypeError("known and keep must be tensors")
        try:
            torch.broadcast_shapes(self.keep.shape, self.known.shape)
        except RuntimeError:
            raise ValueError(f"keep {list(self.keep.shape)} does not broadcast to known {list(self.known.shape)}") from None

    def paste(self, x: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """``known`` (default: the clean known image) where keep is 1, ``x`` elsewhere."""
        keep = self.keep.to(device=x.device, dtype=torch.float32)
        known = self.known if known is None else known
        return keep * known.to(x.device).float() + (1 - keep) * x.float()


def repaint_schedule(steps: int, jumps: int, jump_length: int) -> list[int]:
    """The order in which RePaint visits the sampling steps 0 (noisiest) .. steps - 1 (cleanest): down one step at
    a time; at every ``jump_length``-th step, back up ``jump_length`` steps and down again, ``jumps`` times.
    E.g. ``repaint_schedule(4, 1, 1) == [0, 1, 0, 1, 2, 1, 2, 3]``."""
    left = {i: jumps for i in range(jump_length, steps - 1, jump_length)}
    order, i = [0], 0
    while i < steps - 1:
        i += 1
        order.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            order += list(range(i - 1, i - jump_length - 1, -1))
            i -= jump_length
    return order


@torch.no_grad()
def sample_repaint(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    inpainting: Inpainting,
    steps: int = 50,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    spacing: str = "uniform",
) -> torch.Tensor:
    """Fill where ``inpainting.keep`` is 0, keep ``inpainting.known`` elsewhere; DDIM steps with ``eta`` (RePaint's
    own sampler is the ancestral one, ``eta = 1``). Returns x0 (float32) equal to ``known`` where keep is 1.

    Noise (the known region's at every step, the jumps' and DDIM's) is drawn from ``generator``; ``callback``
    gets the model calls' count (0 first) as its step index. ``spacing``: which timesteps (``timesteps_for``)."""
    if inpainting.known.shape != x_T.shape:
        raise ValueError(f"the known image has shape {list(inpainting.known.shape)}, x_T {list(x_T.shape)}")
    check_eta(eta)
    timesteps = timesteps_for(diffusion, steps, spacing).tolist()
    alphas_cumprod = diffusion.alphas_cumprod.tolist()
    order = repaint_schedule(steps, inpainting.jumps, inpainting.jump_length)
    known = inpainting.known.to(x_T.device).float()
    batch, x, calls = x_T.shape[0], x_T.float(), 0
    for i, following in progress_bar(list(zip(order, order[1:] + [None])), "repaint", progress):
        t = timesteps[i]
        if following is not None and following < i:  # a jump back up: x_{t_following} ~ q(. | x_t)
            x = _renoise(x, alphas_cumprod[t], alphas_cumprod[timesteps[following]], generator)
            continue
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        x = inpainting.paste(x, diffusion.q_sample(known, t_batch, noise_like(known, generator)))
        x0, eps = denoise(model_fn, diffusion, x, t_batch)
        if callback is not None:
            callback(calls, t, x, x0)
        calls += 1
        if following is None:
            return inpainting.paste(x0)
        x = ddim_step(x0, eps, alphas_cumprod[t], alphas_cumprod[timesteps[following]], eta, generator)
    raise AssertionError("unreachable: the last step returns")


def _renoise(x: torch.Tensor, abar_from: float, abar_to: float, generator: torch.Generator | None) -> torch.Tensor:
    """The forward process from a cleaner step to a noisier one: x_to = sqrt(a) x_from + sqrt(1 - a) noise,
    a = abar_to / abar_from."""
    ratio = abar_to / abar_from
    return math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise_like(x, generator)
