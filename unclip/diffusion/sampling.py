"""Samplers as plain functions of a model function.

``model_fn(x_t, t) -> model output`` in the diffusion's objective, where ``t`` is the original training
timestep as a LongTensor [B]. Both samplers make exactly ``steps - skip`` model calls, draw all their noise
from ``generator`` (on x_T's device) and return the final x0 as float32. Wrap a conditional network with
``functools.partial`` / a lambda, or with ``classifier_free_guidance`` for guided sampling.

Which training timesteps ``steps`` sampling steps visit is the ``spacing`` (``timesteps_for``): ``"uniform"`` in t
(``respaced_timesteps``, the default), ``"logsnr"`` (uniform in log-SNR) or ``"karras"`` (Karras et al. 2022).

Image-to-image (SDEdit): ``x, skip = noised_start(diffusion, image, noise, steps, strength)`` noises an image
to the step ``strength`` of the way to pure noise, and ``sample_ddim(..., x, steps, skip=skip)`` denoises it
from there. Inpainting is ``repaint.sample_repaint``. DPM-Solver++ is in ``dpm_solver``; ``samplers.sample``
picks any of them by name.

``cuda_graphs`` (``"auto"``, ``"on"``, ``"off"``; see ``unclip.diffusion.graphs``) captures a step's model call
and prediction in a CUDA graph on CUDA tensors: ``"auto"`` does so there (from 4 steps) and nowhere else.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .gaussian import GaussianDiffusion
from .graphs import maybe_graphed

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, t, x_t, pred_x0): step index (0 first), training timestep, the step's input, its predicted x0
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def respaced_timesteps(num_train_steps: int, num_sample_steps: int) -> torch.Tensor:
    """``num_sample_steps`` training timesteps, evenly strided and descending, LongTensor [num_sample_steps].

    The first is the noisiest step (num_train_steps - 1) and the last is t = 0, e.g.
    ``respaced_timesteps(1000, 4) == [999, 666, 333, 0]``. With a single step only the noisiest step is
    kept: denoising pure noise in one step must start from the noise end.
    """
    for name, value in (("num_train_steps", num_train_steps), ("num_sample_steps", num_sample_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_train_steps < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
    if not 1 <= num_sample_steps <= num_train_steps:
        raise ValueError(
            f"sampling steps must be in [1, {num_train_steps}] (the training steps), got {num_sample_steps}"
        )
    if num_sample_steps == 1:
        return torch.tensor([num_train_steps - 1], dtype=torch.long)
    last, gaps = num_train_steps - 1, num_sample_steps - 1
    # round(i * last / gaps) in integer arithmetic; the stride is >= 1 so the steps are distinct
    ascending = [(i * last + gaps // 2) // gaps for i in range(num_sample_steps)]
    return torch.tensor(ascending[::-1], dtype=torch.long)


SPACINGS = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022's rho: sigma^(1/rho) is uniform, so steps crowd towards low noise


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {list(SPACINGS)}")
    return spacing


def log_snr(diffusion: GaussianDiffusion) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = log(abar_t / (1 - abar_t)) / 2 at every training step, float64 [T]
    (decreasing in t)."""
    return 0.5 * (diffusion.alphas_cumprod.log() - diffusion.one_minus_alphas_cumprod.log())


def timesteps_for(diffusion: GaussianDiffusion, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """The ``steps`` training timesteps that sampling visits, distinct and descending from num_steps - 1 to 0,
    LongTensor [steps].

    ``"uniform"``: evenly strided in t (``respaced_timesteps``). ``"logsnr"``: evenly spaced in lambda (log-SNR / 2)
    between the two ends. ``"karras"``: sigma = sqrt((1 - abar) / abar) spaced as Karras et al. 2022 (rho = 7:
    sigma^(1/7) uniform between the ends). Both are mapped to the training step of nearest lambda; where several
    land on one step, the repeats move to the nearest free steps (so the low-noise end of a long run is strided by
    1). Fewer than 3 steps are the ends alone, whatever the spacing."""
    timesteps = respaced_timesteps(diffusion.num_steps, steps)  # checks steps
    if check_spacing(spacing) == "uniform" or steps < 3:
        return timesteps
    lam = log_snr(diffusion)
    if spacing == "logsnr":
        targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
    else:
        rho, ramp = KARRAS_RHO, torch.linspace(0, 1, steps, dtype=torch.float64)
        sigma_max, sigma_min = (-lam[-1]).exp() ** (1 / rho), (-lam[0]).exp() ** (1 / rho)
        targets = -torch.log((sigma_max + ramp * (sigma_min - sigma_max)) ** rho)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    return torch.tensor(_distinct_descending(nearest, diffusion.num_steps), dtype=torch.long)


def _distinct_descending(timesteps: list[int], num_steps: int) -> list[int]:
    """``timesteps`` (descending, maybe repeating) made strictly descending from num_steps - 1 to 0, each repeat
    moved to the nearest free step: up from the clean end, then down from the noisy end."""
    out = list(timesteps)
    out[-1] = 0
    for i in range(len(out) - 2, -1, -1):
        out[i] = max(out[i], out[i + 1] + 1)
    out[0] = num_steps - 1
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1] - 1)
    return out


def _check_inputs(x_T: torch.Tensor, generator: torch.Generator | None, skip: int = 0, steps: int | None = None) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
        raise TypeError(f"x_T must be a float tensor [B, ...], got {type(x_T).__name__} {getattr(x_T, 'shape', '')}")
    if generator is not None and generator.device.type != x_T.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but x_T is on {x_T.device}; create it on x_T's device"
        )
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0 or (steps is not None and skip > steps):
        raise ValueError(f"skip must be an int in [0, steps={steps}], got {skip!r}")


def strength_skip(steps: int, strength: float) -> int:
    """How many of ``steps`` sampling steps image-to-image skips at ``strength`` (1: none, pure noise; 0: all)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 ignores it), got {strength!r}")
    return steps - round(strength * steps)


def noised_start(
    diffusion: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor, steps: int, strength: float,
    spacing: str = "uniform",
) -> tuple[torch.Tensor, int]:
    """Image-to-image's start: ``x0`` noised with ``noise`` to the sampling step ``strength`` of the way to pure
    noise (of ``steps`` steps at ``spacing``: the sampler's), and the number of steps to ``skip`` there.
    ``strength == 1`` starts from ``noise`` itself (plain sampling, the same draws); ``strength == 0`` returns ``x0``
    with every step skipped (nothing to do)."""
    skip = strength_skip(steps, strength)
    if skip == 0:
        return noise.float(), 0
    if skip == steps:
        return x0.float(), skip
    t = timesteps_for(diffusion, steps, spacing)[skip].item()
    t_batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    return diffusion.q_sample(x0, t_batch, noise), skip


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def denoise(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor):
    """(x0, eps) predicted at x_t; x0 clamped to ``diffusion.clip_denoised`` and eps made consistent with it."""
    model_out = model_fn(x, t)
    if not isinstance(model_out, torch.Tensor):
        raise TypeError(f"model_fn must return a tensor, got {type(model_out).__name__}")
    x0 = diffusion.predict_x0(model_out, x, t)
    if diffusion.clip_denoised is None:
        return x0, diffusion.predict_eps(model_out, x, t)
    x0 = x0.clamp(*diffusion.clip_denoised)
    return x0, diffusion.eps_from_x0(x0, x, t)


def _denoiser(model_fn: ModelFn, diffusion: GaussianDiffusion, cuda_graphs, device: torch.device, steps: int):
    """``denoise(x_t, t) -> (x0, eps)``, captured in a CUDA graph where ``cuda_graphs`` says so."""
    return maybe_graphed(lambda x, t: denoise(model_fn, diffusion, x, t), cuda_graphs, device, steps)


def progress_bar(steps: list, desc: str, progress: bool):
    """``steps`` behind a progress bar when asked (tqdm is loaded only then: importing a model does not load it)."""
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc)


def _run_steps(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor, timesteps: list[int], step,
               desc: str, progress: bool, callback: Callback | None, skip: int, cuda_graphs) -> torch.Tensor:
    """Both samplers' loop: from the ``skip``-th of ``timesteps`` down, predict (x0, eps) at x_t, tell
    ``callback``, and return the last step's x0 or go on to ``step(i, t, x_t, x0, eps)`` (x at the next step)."""
    batch, device = x_T.shape[0], x_T.device
    denoise = _denoiser(model_fn, diffusion, cuda_graphs, device, len(timesteps))
    x = x_T.float()
    for i, t in enumerate(progress_bar(timesteps[skip:], desc, progress), start=skip):
        x0, eps = denoise(x, torch.full((batch,), t, dtype=torch.long, device=device))
        if callback is not None:
            callback(i, t, x, x0)
        if i == len(timesteps) - 1:
            return x0
        x = step(i, t, x, x0, eps)
    return x  # skip == steps: nothing left to do


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    skip: int = 0,
    cuda_graphs: str | bool | None = "auto",
    spacing: str = "uniform",
) -> torch.Tensor:
    """Ancestral sampling: x_{s} ~ q(x_s | x_t, x0 = predicted x0) from x_T (standard normal) down to x0.

    ``steps`` (default: every training step) uses the respaced process, whose betas come from
    ``alphas_cumprod`` at the kept steps; the variance is the posterior's ("fixed small"). No noise is
    added at the final step, which returns the predicted x0. ``skip > 0`` starts at the ``skip``-th step:
    x_T is then x at that step (image-to-image, see ``noised_start``).
    """
    steps = diffusion.num_steps if steps is None else steps
    _check_inputs(x_T, generator, skip, steps)
    timesteps = timesteps_for(diffusion, steps, spacing)
    spaced = diffusion.respace(timesteps)  # its index j has the alphas_cumprod of the j-th smallest kept step

    def step(i, t, x, x0, eps):
        index = torch.full((x.shape[0],), len(timesteps) - 1 - i, dtype=torch.long, device=x.device)
        mean, _, log_variance = spaced.q_posterior(x0, x, index)
        return mean + (0.5 * log_variance).exp() * noise_like(x, generator)

    return _run_steps(model_fn, diffusion, x_T, timesteps.tolist(), step, "ddpm", progress, callback, skip, cuda_graphs)


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    skip: int = 0,
    cuda_graphs: str | bool | None = "auto",
    eta: float = 0.0,
    spacing: str = "uniform",
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``steps`` timesteps at ``spacing`` (``timesteps_for``; default evenly strided).

    ``eta = 0`` is deterministic given x_T; ``eta = 1`` has the ancestral sampler's variance. The last
    step returns the predicted x0. ``skip > 0`` starts at the ``skip``-th step: x_T is then x at that step
    (image-to-image, see ``noised_start``).
    """
    _check_inputs(x_T, generator, skip, steps)
    check_eta(eta)
    timesteps = timesteps_for(diffusion, steps, spacing).tolist()
    alphas_cumprod = diffusion.alphas_cumprod.tolist()  # python floats (float64)

    def step(i, t, x, x0, eps):
        return ddim_step(x0, eps, alphas_cumprod[t], alphas_cumprod[timesteps[i + 1]], eta, generator)

    return _run_steps(model_fn, diffusion, x_T, timesteps, step, "ddim", progress, callback, skip, cuda_graphs)


def check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar: float, abar_prev: float, eta: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """One DDIM step from the step with ``alphas_cumprod`` abar to the one with abar_prev, given the predicted
    x0 and eps (``eta`` scales the fresh noise: 0 deterministic, 1 ancestral)."""
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * noise_like(x0, generator)
    return x
