"""Gaussian diffusion: the forward process, its posterior, the three objectives and the training loss.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022):

    abar_t = prod_{s <= t} (1 - beta_s)              (``alphas_cumprod``)
    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (``q_sample``)
    v      = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (the "v" objective)
    snr_t  = abar_t / (1 - abar_t)

Timesteps ``t`` are LongTensors [B] in [0, num_steps); ``x`` is any float tensor [B, ...] (prior vectors
[B, D], decoder images [B, C, H, W]). The schedule is kept as float64 tensors; every method computes in
float32 on the input's device, whatever the input's dtype and whatever autocast is active.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .schedules import make_betas

OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")
MIN_SNR_GAMMA = 5.0


class GaussianDiffusion:
    """The maths of one diffusion process; holds no learnable state.

    Args:
        num_steps: number of training timesteps T.
        schedule: name of the noise schedule (see ``schedules.make_betas``).
        objective: what the network predicts: ``"eps"`` (the noise), ``"x0"`` (the clean input) or
            ``"v"`` (velocity, ``sqrt(abar) eps - sqrt(1 - abar) x0``). Note: the cosine schedule ends
            at snr ~1e-9, where x0 recovered from an eps prediction amplifies its error by 1/sqrt(snr);
            with few sampling steps use ``clip_denoised`` (images) or the v / x0 objectives (vectors).
        loss_weighting: ``"none"`` (plain MSE on the objective) or ``"min_snr"`` (Hang et al. 2023,
            min-SNR-gamma with gamma = 5: every objective is weighted so that its loss equals
            ``min(snr, 5) * |x0_pred - x0|^2``).
        min_snr_floor: with ``"min_snr"``, the least weight a step's x0 error keeps, ``max(min(snr, 5), floor)``
            (0: plain min-SNR). Min-SNR gives the high-noise steps, where an image's layout is decided, almost no
            weight (for v, ``snr / (snr + 1)`` as snr goes to 0); a floor of 1 gives them plain v-MSE's.
        clip_denoised: ``(low, high)`` to clamp predicted x0 to while sampling (e.g. ``(-1, 1)`` for
            images), or None (the prior's embeddings are unbounded).
        betas: explicit betas [T] instead of ``schedule`` (``num_steps`` must then match or be None).
    """

    def __init__(
        self,
        num_steps: int | None = 1000,
        schedule: str = "cosine",
        objective: str = "eps",
        loss_weighting: str = "none",
        clip_denoised: tuple[float, float] | None = None,
        betas: torch.Tensor | None = None,
        min_snr_floor: float = 0.0,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown diffusion objective {objective!r}; expected one of {list(OBJECTIVES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {list(LOSS_WEIGHTINGS)}")
        if isinstance(min_snr_floor, bool) or not isinstance(min_snr_floor, (int, float)) or not (
                0 <= min_snr_floor <= MIN_SNR_GAMMA):
            raise ValueError(f"min_snr_floor must be a number in [0, {MIN_SNR_GAMMA:g}] (min-SNR's cap), "
                             f"got {min_snr_floor!r}")
        if min_snr_floor and loss_weighting != "min_snr":
            raise ValueError(f"min_snr_floor={min_snr_floor!r} floors the min_snr weighting, but loss_weighting is "
                             f"{loss_weighting!r}: set loss_weighting='min_snr' or min_snr_floor=0")
        if min_snr_floor and objective == "eps":
            raise ValueError(f"min_snr_floor={min_snr_floor!r} with objective='eps' would weight the noisiest steps' "
                             f"noise error by floor / snr (~1e9 at the end of a cosine schedule): use objective 'v' "
                             f"or 'x0', or min_snr_floor=0")
        if clip_denoised is not None:
            if len(clip_denoised) != 2 or not float(clip_denoised[0]) < float(clip_denoised[1]):
                raise ValueError(f"clip_denoised must be (low, high) with low < high or None, got {clip_denoised!r}")
            clip_denoised = (float(clip_denoised[0]), float(clip_denoised[1]))
        if betas is None:
            betas = make_betas(schedule, num_steps)
        else:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
            if betas.ndim != 1 or len(betas) == 0:
                raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
            if num_steps is not None and num_steps != len(betas):
                raise ValueError(f"num_steps={num_steps} but {len(betas)} betas were given")
            schedule = "custom"
        if not bool(((betas > 0) & (betas < 1)).all()):
            low, high = betas.min().item(), betas.max().item()
            raise ValueError(f"every beta must be in (0, 1); got betas with min {low}, max {high}")

        self.num_steps, self.schedule, self.objective = len(betas), schedule, objective
        self.loss_weighting, self.clip_denoised = loss_weighting, clip_denoised
        self.min_snr_floor = float(min_snr_floor)

        # The schedule, float64 [T]. Index t is the step that produces x_t.
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1 - self.alphas_cumprod  # kept in float64: 1 - abar_0 is ~1e-5
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.log_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.log()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # The variance is 0 at t = 0; its log there borrows t = 1's value (as improved-diffusion does).
        first = self.posterior_variance[1:2] if self.num_steps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)

        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_steps={self.num_steps}, schedule={self.schedule!r}, "
            f"objective={self.objective!r}, loss_weighting={self.loss_weighting!r}, "
            + (f"min_snr_floor={self.min_snr_floor!r}, " if self.min_snr_floor else "")
            + f"clip_denoised={self.clip_denoised!r})"
        )

    def respace(self, timesteps: torch.Tensor) -> "GaussianDiffusion":
        """The process that visits only ``timesteps`` (improved-diffusion's respacing).

        Its betas are recomputed from ``alphas_cumprod`` at the kept steps, so its index i has the same
        ``alphas_cumprod`` as this process's step ``sorted(timesteps)[i]``.
        """
        kept = torch.as_tensor(timesteps, dtype=torch.long).cpu().unique(sorted=True)
        if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= self.num_steps:
            raise ValueError(f"timesteps to keep must be a non-empty subset of [0, {self.num_steps}), got {timesteps}")
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(
            num_steps=None,
            objective=self.objective,
            loss_weighting=self.loss_weighting,
            clip_denoised=self.clip_denoised,
            betas=1 - abar / abar_prev,
            min_snr_floor=self.min_snr_floor,
        )

    # -- helpers ----------------------------------------------------------------------------------------

    def _gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` at timesteps ``t``, float32, shaped [B, 1, ...] to broadcast against ``x``."""
        key = (name, t.device)
        if key not in self._device_cache:
            # cast on the CPU first: some accelerators have no float64
            self._device_cache[key] = getattr(self, name).to(dtype=torch.float32).to(t.device)
        values = self._device_cache[key].index_select(0, t)  # [B]; cheaper on CPU than advanced indexing
        return values.reshape(values.shape + (1,) * (x.ndim - 1))

    def check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Raise unless ``t`` is a LongTensor [B] in [0, num_steps) on ``x``'s device with B = len(x)."""
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"timesteps t must be an integer (long) tensor, got {getattr(t, 'dtype', type(t))}")
        if x.ndim < 1 or t.shape != (x.shape[0],):
            batch = x.shape[0] if x.ndim else "?"
            raise ValueError(f"timesteps t must have shape [B] = [{batch}], got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"timesteps are on {t.device} but x is on {x.device}")
        # Reading the values back is a host sync, which a CUDA graph cannot capture; a captured sampling step
        # was checked at its eager warm-up and its later timesteps come from ``respaced_timesteps``.
        capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
        if t.numel() and not capturing and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(
                f"timesteps must be in [0, {self.num_steps}), got values in [{int(t.min())}, {int(t.max())}]"
            )
        return t.long()

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{a_name} has shape {list(a.shape)} but {b_name} has shape {list(b.shape)}")

    # -- forward process ---------------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x0) as (mean, variance, log_variance); variance and log_variance are [B, 1, ...]."""
        t = self.check_timesteps(t, x0)
        mean = self._gather("sqrt_alphas_cumprod", t, x0) * x0.float()
        variance = self._gather("one_minus_alphas_cumprod", t, x0)
        return mean, variance, self._gather("log_one_minus_alphas_cumprod", t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) with the given standard normal ``noise``."""
        t = self.check_timesteps(t, x0)
        self._check_same_shape(noise, x0, "noise", "x0")
        return self._gather("sqrt_alphas_cumprod", t, x0) * x0.float() + self._gather(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * noise.float()

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x0) as (mean, variance, log_variance_clipped); at t = 0 the mean is x0."""
        t = self.check_timesteps(t, x_t)
        self._check_same_shape(x0, x_t, "x0", "x_t")
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0.float() + self._gather(
            "posterior_mean_coef2", t, x_t
        ) * x_t.float()
        variance = self._gather("posterior_variance", t, x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # -- objectives ---------------------------------------------------------------------------------------

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise), in this objective."""
        t = self.check_timesteps(t, x0)
        self._check_same_shape(noise, x0, "noise", "x0")
        if self.objective == "eps":
            return noise.float()
        if self.objective == "x0":
            return x0.float()
        return self._gather("sqrt_alphas_cumprod", t, x0) * noise.float() - self._gather(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * x0.float()

    def _model_output(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """A network output and its x_t checked (shapes, timesteps) and in float32: (model_out, x_t, t)."""
        t = self.check_timesteps(t, x_t)
        self._check_same_shape(model_out, x_t, "model output", "x_t")
        return model_out.float(), x_t.float(), t

    def predict_x0(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by a network output (in this objective) at x_t. Not clipped."""
        model_out, x_t, t = self._model_output(model_out, x_t, t)
        if self.objective == "x0":
            return model_out
        if self.objective == "eps":
            return self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._gather(
                "sqrt_recipm1_alphas_cumprod", t, x_t
            ) * model_out
        return self._gather("sqrt_alphas_cumprod", t, x_t) * x_t - self._gather(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        ) * model_out

    def predict_eps(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by a network output (in this objective) at x_t."""
        model_out, x_t, t = self._model_output(model_out, x_t, t)
        if self.objective == "eps":
            return model_out
        if self.objective == "x0":
            return self.eps_from_x0(model_out, x_t, t)
        return self._gather("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._gather(
            "sqrt_alphas_cumprod", t, x_t
        ) * model_out

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` at step t: (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1)."""
        t = self.check_timesteps(t, x_t)
        self._check_same_shape(x0, x_t, "x0", "x_t")
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t.float() - x0.float()) / self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # -- training -------------------------------------------------------------------------------------------

    def sample_timesteps(
        self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform training timesteps, LongTensor [batch] in [0, num_steps)."""
        return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] applied to the objective's MSE."""
        t = self.check_timesteps(t, t)
        if self.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self._gather("snr", t, t)
        clipped = snr.clamp(min=self.min_snr_floor, max=MIN_SNR_GAMMA)
        # Each weight turns the objective's squared error into max(min(snr, gamma), floor) * |x0_pred - x0|^2:
        # |eps err|^2 = snr |x0 err|^2 and |v err|^2 = (snr + 1) |x0 err|^2.
        if self.objective == "eps":
            return clipped / snr
        if self.objective == "v":
            return clipped / (snr + 1)
        return clipped

    def training_loss(
        self,
        model_fn: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Per-sample loss [B]: the weighted MSE between ``model_fn(x_t, t, **model_kwargs)`` and the target,
        averaged over every non-batch dimension. ``t`` and ``noise`` are drawn (with ``generator``) if None."""
        if x0.ndim < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be a non-empty batch [B, ...], got shape {list(x0.shape)}")
        x0 = x0.float()
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.q_sample(x0, t, noise)
        model_out = model_fn(x_t, t, **model_kwargs)
        if model_out.shape != x0.shape:
            raise ValueError(f"model output has shape {list(model_out.shape)}, expected x0's {list(x0.shape)}")
        target = self.target(x0, noise, t)
        mse = F.mse_loss(model_out.float(), target, reduction="none")
        mse = mse.reshape(mse.shape[0], -1).mean(dim=1)  # [B]
        return mse * self.loss_weight(t)
