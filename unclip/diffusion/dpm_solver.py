"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"):
second-order solvers of the diffusion ODE in its data-prediction form, on the discrete training timesteps.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t), the exact solution
from t to a less noisy s (h = lambda_s - lambda_t > 0) is

    x_s = (sigma_s / sigma_t) x_t + alpha_s * integral_{lambda_t}^{lambda_s} e^{lambda - lambda_s} x0(lambda) dlambda

and the solvers approximate x0 on the interval: first order takes the x0 predicted at t (this is DDIM with
eta = 0, exactly), second order corrects it with a second prediction:

- ``2M`` (multistep, the paper's Algorithm 2): the previous step's x0, so one model call a step. The first step
  (and the first after an image-to-image ``skip``) is first order; with ``lower_order_final`` (the default; the
  paper's advice for few steps) so is the last step, into t = 0, at every step count: on the cosine schedule that
  step spans a long stretch of lambda (3.1 at t = 20 to 5.0 at t = 0 of 1000), over which 2M's linear
  extrapolation of x0 overshoots. Measured on Gaussian data with the exact denoiser against DDIM-1000: second
  order there makes 15 uniform steps 4x and 25 steps 12x further off (0.10 against 0.023, 0.051 against 0.0043).
- ``2S`` (singlestep, Algorithm 1): a step from t_i to t_{i+2} predicts x0 at the intermediate t_{i+1} too
  (reached with a first-order step), so a step costs two calls; the ratio r = (lambda_{i+1} - lambda_i) / h is
  the grid's (1/2 on the logsnr spacing). The steps end at t = 0; with an odd number of intervals the first one
  (at the noisy end, where x0 barely moves) is a first-order step. Its last step interpolates x0 inside the
  interval rather than extrapolating, so it needs no ``lower_order_final``.

x0 is ``sampling.denoise``'s (clamped to ``diffusion.clip_denoised`` where the diffusion clamps, which is the
paper's thresholding for pixel models). Like DDIM the solvers make exactly ``steps - skip`` model calls, the last
at t = 0, whose x0 they return; they draw no noise. ``steps`` must be at least 2 (the solvers' order), though
fewer than 4 (2M, whose first and last steps are first order) or 3 (2S) take first-order steps only: DDIM's.

Written from the paper over our ``denoise`` and discrete ``alphas_cumprod`` rather than taken from diffusers'
``DPMSolverMultistepScheduler`` (the maintained implementation): diffusers is not a dependency, and would be a
large one for these ~50 lines.
"""

from __future__ import annotations

import math

import torch

from .gaussian import GaussianDiffusion
from .sampling import Callback, ModelFn, _check_inputs, _run_steps, log_snr, timesteps_for

ORDER = 2


def check_solver_steps(name: str, steps: int) -> None:
    if not isinstance(steps, bool) and isinstance(steps, int) and steps < ORDER:
        raise ValueError(f"{name} is a second-order solver and needs steps >= {ORDER}, got steps={steps}; "
                         f"use more steps or sampler 'ddim'")


class _Solver:
    """The schedule as python floats and the first-order (DDIM) update, from which both solvers are built."""

    def __init__(self, diffusion: GaussianDiffusion, timesteps: list[int]) -> None:
        self.timesteps = timesteps
        self.alpha = diffusion.sqrt_alphas_cumprod.tolist()
        self.sigma = diffusion.sqrt_one_minus_alphas_cumprod.tolist()
        self.lam = log_snr(diffusion).tolist()

    def h(self, t: int, s: int) -> float:
        return self.lam[s] - self.lam[t]

    def first_order(self, x: torch.Tensor, x0: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """x at s from x at t with the data prediction ``x0`` held over the step: the paper's eq. (9)."""
        return (self.sigma[s] / self.sigma[t]) * x - (self.alpha[s] * math.expm1(-self.h(t, s))) * x0


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    steps: int = 25,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    skip: int = 0,
    cuda_graphs: str | bool | None = "auto",
    spacing: str = "uniform",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) over ``steps`` timesteps at ``spacing``: one model call a step (see the module docstring).
    ``skip > 0`` starts at the ``skip``-th step (image-to-image), with a first-order step there."""
    check_solver_steps("dpmpp_2m", steps)
    _check_inputs(x_T, generator, skip, steps)
    solver = _Solver(diffusion, timesteps_for(diffusion, steps, spacing).tolist())
    timesteps, last = solver.timesteps, len(solver.timesteps) - 1
    previous: list[torch.Tensor] = []  # the last step's x0

    def step(i, t, x, x0, eps):
        s, data = timesteps[i + 1], x0
        if previous and not (lower_order_final and i + 1 == last):
            r = solver.h(timesteps[i - 1], t) / solver.h(t, s)  # h_{i-1} / h_i
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]  # the paper's D_i
        previous[:] = [x0]
        return solver.first_order(x, data, t, s)

    return _run_steps(model_fn, diffusion, x_T, timesteps, step, "dpmpp_2m", progress, callback, skip, cuda_graphs)


@torch.no_grad()
def sample_dpmpp_2s(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    steps: int = 25,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    skip: int = 0,
    cuda_graphs: str | bool | None = "auto",
    spacing: str = "uniform",
) -> torch.Tensor:
    """DPM-Solver++(2S) over ``steps`` timesteps at ``spacing``: each step from t_i to t_{i+2} calls the model at t_i
    and at the intermediate t_{i+1} (see the module docstring). ``skip > 0`` starts at the ``skip``-th step."""
    check_solver_steps("dpmpp_2s", steps)
    _check_inputs(x_T, generator, skip, steps)
    solver = _Solver(diffusion, timesteps_for(diffusion, steps, spacing).tolist())
    timesteps, last = solver.timesteps, len(solver.timesteps) - 1
    started: list = []  # (j, x_j, x0_j) of the step under way while at its intermediate point

    def step(i, t, x, x0, eps):
        if started:  # at the intermediate point u = t_i of a step from t_j to s = t_{i+1}
            j, x_j, x0_j = started.pop()
            r = solver.h(timesteps[j], t) / solver.h(timesteps[j], timesteps[i + 1])
            data = (1 - 1 / (2 * r)) * x0_j + (1 / (2 * r)) * x0  # the paper's D_i
            return solver.first_order(x_j, data, timesteps[j], timesteps[i + 1])
        if (last - i) % 2 == 0:  # a second-order step to t_{i+2}: first to its intermediate point
            started.append((i, x, x0))
        return solver.first_order(x, x0, t, timesteps[i + 1])

    return _run_steps(model_fn, diffusion, x_T, timesteps, step, "dpmpp_2s", progress, callback, skip, cuda_graphs)
