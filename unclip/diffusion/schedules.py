"""Noise schedules: the betas of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t).

Every function returns a float64 tensor of ``num_steps`` betas in (0, 1).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alphas_cumprod(t) = f(t) / f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2).

    Each beta is clipped at ``max_beta`` so the last steps do not become singular.
    """
    _check_num_steps(num_steps)
    if not s >= 0:
        raise ValueError(f"cosine schedule offset s must be >= 0, got {s!r}")
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta!r}")
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # [T + 1]
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def linear_betas(num_steps: int, start: float | None = None, end: float | None = None) -> torch.Tensor:
    """DDPM's linear schedule, from 1e-4 to 0.02 at 1000 steps.

    The default endpoints are scaled by 1000 / num_steps (as improved-diffusion does) so that any number
    of steps destroys the signal about equally.
    """
    _check_num_steps(num_steps)
    scale = 1000 / num_steps
    start = scale * 1e-4 if start is None else start
    end = scale * 0.02 if end is None else end
    if not 0 < start <= end < 1:
        raise ValueError(f"linear schedule needs 0 < start <= end < 1, got start={start!r}, end={end!r}")
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def make_betas(name: str, num_steps: int) -> torch.Tensor:
    """The betas of a named schedule (one of ``SCHEDULES``) with its default parameters."""
    if name == "cosine":
        return cosine_betas(num_steps)
    if name == "linear":
        return linear_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {list(SCHEDULES)}")
