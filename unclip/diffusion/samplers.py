"""Every sampler by name: ``sample("dpmpp_2m", model_fn, diffusion, x_T, steps, spacing="karras")``.

- ``ddpm``: ancestral sampling (``sampling.sample_ddpm``; stochastic by nature, ``eta`` is not used);
- ``ddim``: DDIM with ``eta`` (0: deterministic);
- ``dpmpp_2m``, ``dpmpp_2s``: DPM-Solver++ (``dpm_solver``), deterministic ODE solvers of second order: they take
  no ``eta`` (anything but 0 is an error) and need ``steps >= 2``.

All take ``spacing`` (``sampling.SPACINGS``), image-to-image's ``skip``, the CUDA-graph switch and a callback, and
make ``steps - skip`` model calls. Inpainting (RePaint) steps with DDIM: only ``INPAINTING_SAMPLERS`` can do it.
"""

from __future__ import annotations

import torch

from .dpm_solver import check_solver_steps, sample_dpmpp_2m, sample_dpmpp_2s
from .gaussian import GaussianDiffusion
from .sampling import Callback, ModelFn, check_eta, check_spacing, sample_ddim, sample_ddpm

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2s")
ODE_SOLVERS = ("dpmpp_2m", "dpmpp_2s")  # deterministic: no eta
INPAINTING_SAMPLERS = ("ddim", "ddpm")  # RePaint's steps are DDIM's (eta: 1 is the ancestral sampler)


def check_sampler(name: str, steps: int | None = None, eta: float = 0.0, spacing: str = "uniform",
                  inpainting: bool = False, setting: str = "sampler") -> str:
    """``name`` if it can sample ``steps`` steps with ``eta`` at ``spacing`` (and inpaint, if asked); a clear
    ``ValueError`` naming ``setting`` (the name the caller knows it by) otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown {setting} {name!r}; expected one of {list(SAMPLERS)}")
    check_spacing(spacing)
    check_eta(eta)
    if name in ODE_SOLVERS:
        check_solver_steps(name, steps)
        if eta != 0:
            raise ValueError(f"{setting} {name!r} is a deterministic ODE solver and takes no eta, got eta={eta!r}: "
                             f"pass eta=0 or use {setting} 'ddim' (eta > 0 adds fresh noise every step)")
    if inpainting and name not in INPAINTING_SAMPLERS:
        raise ValueError(f"{setting} {name!r} cannot inpaint: inpainting uses RePaint, which steps with DDIM; use one "
                         f"of {list(INPAINTING_SAMPLERS)}")
    return name


@torch.no_grad()
def sample(
    name: str,
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    steps: int,
    *,
    spacing: str = "uniform",
    eta: float = 0.0,
    skip: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    cuda_graphs: str | bool | None = "auto",
) -> torch.Tensor:
    """x0 [B, ...] (float32) sampled from x_T with the sampler ``name`` (``SAMPLERS``) in ``steps`` steps."""
    check_sampler(name, steps, eta, spacing)
    run = dict(generator=generator, progress=progress, callback=callback, skip=skip, cuda_graphs=cuda_graphs,
               spacing=spacing)
    if name == "ddpm":
        return sample_ddpm(model_fn, diffusion, x_T, steps, **run)
    if name == "ddim":
        return sample_ddim(model_fn, diffusion, x_T, steps, eta=eta, **run)
    solver = sample_dpmpp_2m if name == "dpmpp_2m" else sample_dpmpp_2s
    return solver(model_fn, diffusion, x_T, steps, **run)
