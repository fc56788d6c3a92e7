"""The diffusion core: schedules, closed forms, objectives, samplers and classifier-free guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    cosine_betas,
    linear_betas,
    make_betas,
    respaced_timesteps,
    sample_ddim,
    sample_ddpm,
)

OBJECTIVES = ["eps", "x0", "v"]


def exact_gaussian_denoiser(diffusion: GaussianDiffusion, mu: torch.Tensor, std: float):
    """The Bayes-optimal model output when the data is N(mu, std^2 I), in the diffusion's objective."""
    alphas_cumprod = diffusion.alphas_cumprod.tolist()

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert (t == t[0]).all(), "the samplers step the whole batch together"
        abar = alphas_cumprod[int(t[0])]
        x = x.double()
        a, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        residual = (x - a * mu) / (abar * std**2 + 1 - abar)
        eps = sigma * residual  # E[eps | x_t]
        x0 = mu + a * std**2 * residual  # E[x0 | x_t]
        out = {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[diffusion.objective]
        return out.float()

    return model_fn


# -- schedules -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 10, 1000])
def test_cosine_alphas_cumprod_monotone_in_unit_interval(num_steps):
    betas = cosine_betas(num_steps)
    assert betas.dtype == torch.float64 and betas.shape == (num_steps,)
    assert ((betas > 0) & (betas <= 0.999)).all()
    abar = GaussianDiffusion(num_steps).alphas_cumprod
    assert ((abar > 0) & (abar <= 1)).all()
    assert (abar[1:] < abar[:-1]).all()


def test_cosine_matches_nichol_dhariwal_closed_form():
    s, num_steps = 0.008, 1000
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = GaussianDiffusion(num_steps, schedule="cosine").alphas_cumprod
    for t in (0, 100, 500, 900, 990):  # before the max_beta clip takes over at the very end
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(num_steps)[-1].item() == pytest.approx(0.999)


def test_linear_betas_scale_with_num_steps():
    assert linear_betas(1000)[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert linear_betas(250)[[0, -1]].tolist() == pytest.approx([4e-4, 0.08])
    assert linear_betas(5, start=0.1, end=0.5).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="start"):
        linear_betas(10, start=0.5, end=0.1)


def test_make_betas_errors_name_the_bad_schedule_and_the_known_ones():
    assert torch.equal(make_betas("linear", 100), linear_betas(100))
    with pytest.raises(ValueError, match=r"'quadratic'.*cosine.*linear"):
        make_betas("quadratic", 100)
    with pytest.raises(ValueError, match="num_steps"):
        make_betas("cosine", 0)


def test_diffusion_config_is_validated():
    with pytest.raises(ValueError, match="'epsilon'.*eps.*x0.*v"):
        GaussianDiffusion(10, objective="epsilon")
    with pytest.raises(ValueError, match="'snr'.*none.*min_snr"):
        GaussianDiffusion(10, loss_weighting="snr")
    with pytest.raises(ValueError, match="clip_denoised"):
        GaussianDiffusion(10, clip_denoised=(1.0, -1.0))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(None, betas=torch.tensor([0.1, 1.5]))
    for floor in (-0.5, 6.0, True, "1"):
        with pytest.raises(ValueError, match=rf"min_snr_floor must be a number in \[0, 5\].*got {floor!r}"):
            GaussianDiffusion(10, objective="v", loss_weighting="min_snr", min_snr_floor=floor)
    with pytest.raises(ValueError, match="min_snr_floor=0.5 floors the min_snr weighting, but loss_weighting is 'none'"):
        GaussianDiffusion(10, objective="v", min_snr_floor=0.5)
    with pytest.raises(ValueError, match="min_snr_floor=1.0 with objective='eps'.*use objective 'v' or 'x0'"):
        GaussianDiffusion(10, objective="eps", loss_weighting="min_snr", min_snr_floor=1.0)


# -- closed forms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_value", [0, 250, 700, 999])
def test_q_sample_moments_match_closed_form(t_value):
    diffusion = GaussianDiffusion(1000)
    n = 20000
    generator = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.0, -0.5, 0.25]).expand(n, 3)
    t = torch.full((n,), t_value, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn(n, 3, generator=generator))
    abar = diffusion.alphas_cumprod[t_value].item()
    expected_mean = math.sqrt(abar) * x0[0]
    # tolerances: 5 standard errors of the empirical mean and variance
    assert torch.allclose(x_t.mean(0), expected_mean, atol=5 * math.sqrt((1 - abar) / n))
    assert torch.allclose(x_t.var(0), torch.full((3,), 1 - abar), rtol=5 * math.sqrt(2 / n))
    mean, variance, log_variance = diffusion.q_mean_variance(x0[:2], t[:2])
    assert torch.allclose(mean, math.sqrt(abar) * x0[:2])
    assert variance.shape == (2, 1) and torch.allclose(variance, torch.tensor(1 - abar))
    assert torch.allclose(log_variance, variance.log())


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_matches_bayes_on_the_gaussian_product(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): multiply the two Gaussians in float64."""
    diffusion = GaussianDiffusion(1000, schedule=schedule)
    betas = diffusion.betas
    t = torch.tensor([1, 2, 10, 300, 650, 999])
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(len(t), 4, 2, generator=generator)  # any shape [B, ...]
    x_t = torch.randn(len(t), 4, 2, generator=generator)
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        abar_prev = torch.prod(1 - betas[:step])  # the t-1 marginal: N(sqrt(abar_prev) x0, 1 - abar_prev)
        beta = betas[step]  # the transition: x_t ~ N(sqrt(1 - beta) x_{t-1}, beta)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        weighted = abar_prev.sqrt() * x0[i].double() / (1 - abar_prev) + (1 - beta).sqrt() * x_t[i].double() / beta
        expected_mean = weighted / precision
        assert torch.allclose(mean[i].double(), expected_mean, rtol=1e-4, atol=1e-5)
        assert variance[i].item() == pytest.approx((1 / precision).item(), rel=1e-4)
        assert log_variance[i].item() == pytest.approx(math.log(1 / precision.item()), rel=1e-4, abs=1e-4)
    # at t = 0 the posterior is the point x0
    zero = torch.zeros(2, dtype=torch.long)
    mean0, variance0, _ = diffusion.q_posterior(x0[:2], x_t[:2], zero)
    assert torch.allclose(mean0, x0[:2], atol=1e-6) and (variance0 == 0).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_and_predictions_round_trip(objective):
    diffusion = GaussianDiffusion(1000, objective=objective)
    t = torch.tensor([0, 1, 100, 500, 900, 990, 998, 999])
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(len(t), 3, 8, 8, generator=generator)
    noise = torch.randn(len(t), 3, 8, 8, generator=generator)
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.target(x0, noise, t)
    abar = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    expected = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[objective]
    assert torch.allclose(target, expected, atol=1e-5)
    # float32 cancellation: recovering x0 from eps is amplified by 1/sqrt(abar) (1e4 at t = 999) and
    # eps from x0 by 1/sqrt(1 - abar) (~1e2 at t = 0); away from the ends the round trip is exact to 1e-5
    x0_atol = 1e-5 if objective != "eps" else 1e-5 / abar.sqrt()
    eps_atol = 1e-5 if objective != "x0" else 1e-5 / (1 - abar).sqrt()
    assert ((diffusion.predict_x0(target, x_t, t) - x0).abs() <= x0_atol).all()
    assert ((diffusion.predict_eps(target, x_t, t) - noise).abs() <= eps_atol).all()


def test_timesteps_are_validated():
    diffusion = GaussianDiffusion(100)
    x = torch.zeros(3, 2)
    with pytest.raises(TypeError, match="integer"):
        diffusion.q_sample(x, torch.zeros(3), x)
    with pytest.raises(ValueError, match=r"shape \[B\] = \[3\]"):
        diffusion.q_sample(x, torch.zeros(2, dtype=torch.long), x)
    with pytest.raises(ValueError, match=r"\[0, 100\).*\[0, 100\]"):
        diffusion.q_sample(x, torch.tensor([0, 5, 100]), x)
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.q_sample(x, torch.zeros(3, dtype=torch.long), torch.zeros(3, 3))


# -- training loss -------------------------------------------------------------------------------------------


def test_training_loss_is_per_sample_mse_of_the_objective_and_forwards_kwargs():
    diffusion = GaussianDiffusion(100, objective="v")
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 2, 5, generator=generator), torch.randn(4, 2, 5, generator=generator)
    t = torch.tensor([0, 10, 50, 99])
    seen = {}
    net = nn.Linear(5, 5)

    def model_fn(x_t, t, *, scale):
        seen.update(x_t=x_t, t=t, scale=scale)
        return net(x_t)

    loss = diffusion.training_loss(model_fn, x0, t=t, noise=noise, scale=2.0)
    assert seen["scale"] == 2.0 and torch.equal(seen["t"], t)
    assert torch.allclose(seen["x_t"], diffusion.q_sample(x0, t, noise))
    expected = ((net(seen["x_t"]) - diffusion.target(x0, noise, t)) ** 2).mean(dim=(1, 2))
    assert loss.shape == (4,) and torch.allclose(loss, expected)
    loss.mean().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_training_loss_draws_t_and_noise_from_the_generator():
    diffusion = GaussianDiffusion(100)
    net = nn.Linear(3, 3)
    x0 = torch.randn(16, 3)
    a = diffusion.training_loss(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(7))
    b = diffusion.training_loss(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(7))
    c = diffusion.training_loss(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = diffusion.sample_timesteps(10000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 99


@pytest.mark.parametrize("objective,floor", [*((objective, 0.0) for objective in OBJECTIVES), ("v", 0.5), ("x0", 1.0)])
def test_min_snr_weighting_is_min_snr_times_x0_error_for_every_objective(objective, floor):
    """Min-SNR-5 (Hang et al. 2023): whatever the parameterisation, loss = min(snr, 5) * |x0_pred - x0|^2; with a
    floor (the quick demo's decoder), max(min(snr, 5), floor) * |x0_pred - x0|^2: the high-noise steps keep weight."""
    diffusion = GaussianDiffusion(1000, objective=objective, loss_weighting="min_snr", min_snr_floor=floor)
    t = torch.tensor([20, 100, 300, 600, 950])
    generator = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    x0_error = 0.1 * torch.randn(5, 6, generator=generator)
    abar = diffusion.alphas_cumprod[t].unsqueeze(1)  # float64

    def model_fn(x_t, t):  # a model whose x0 prediction is off by x0_error, expressed in the objective
        x0_pred = x0 + x0_error
        eps_pred = (x_t - abar.sqrt() * x0_pred) / (1 - abar).sqrt()
        out = {"eps": eps_pred, "x0": x0_pred, "v": abar.sqrt() * eps_pred - (1 - abar).sqrt() * x0_pred}[objective]
        return out.float()

    loss = diffusion.training_loss(model_fn, x0, t=t, noise=noise)
    snr = (abar / (1 - abar)).squeeze(1)
    expected = snr.clamp(min=floor, max=5) * (x0_error.double() ** 2).mean(1)
    assert torch.allclose(loss.double(), expected, rtol=1e-3)
    if floor:  # t = 950 (snr ~0.006) is floored; t = 20 and 100 (snr > 5) are capped, as without a floor
        plain = GaussianDiffusion(1000, objective=objective, loss_weighting="min_snr").loss_weight(t)
        floored = diffusion.loss_weight(t)
        assert floored[-1] > 10 * plain[-1] and torch.equal(floored[:2], plain[:2])
        assert diffusion.respace(torch.arange(0, 1000, 10)).min_snr_floor == floor


def test_works_under_bfloat16_autocast_and_returns_float32():
    diffusion = GaussianDiffusion(50, objective="v")
    net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 4))
    x0 = torch.randn(8, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x0.float()).dtype == torch.bfloat16  # autocast is really active
        loss = diffusion.training_loss(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(0))
        x_t = diffusion.q_sample(x0, torch.zeros(8, dtype=torch.long), torch.randn(8, 4).bfloat16())
        sample = sample_ddim(lambda x, t: net(x), diffusion, torch.randn(8, 4), steps=5)
    assert loss.dtype == x_t.dtype == sample.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(sample).all()


# -- respacing and samplers ------------------------------------------------------------------------------


def test_respaced_timesteps_properties():
    assert respaced_timesteps(1000, 4).tolist() == [999, 666, 333, 0]
    assert torch.equal(respaced_timesteps(10, 10), torch.arange(9, -1, -1))
    assert respaced_timesteps(1000, 1).tolist() == [999]
    for num_train in (2, 7, 100, 1000):
        candidates = {2, 3, num_train // 3 + 1, num_train - 1, num_train}
        for num_sample in sorted(k for k in candidates if 2 <= k <= num_train):
            steps = respaced_timesteps(num_train, num_sample)
            assert steps.dtype == torch.long and len(steps) == num_sample
            assert steps[0] == num_train - 1 and steps[-1] == 0
            assert (steps[:-1] > steps[1:]).all()  # strictly descending
            gaps = steps[:-1] - steps[1:]
            assert gaps.max() - gaps.min() <= 1  # evenly strided
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"\[1, 1000\].*" + str(bad)):
            respaced_timesteps(1000, bad)


def test_respaced_process_keeps_alphas_cumprod_at_the_kept_steps():
    diffusion = GaussianDiffusion(1000, objective="v", clip_denoised=(-1, 1))
    kept = respaced_timesteps(1000, 25)
    spaced = diffusion.respace(kept)
    assert spaced.num_steps == 25 and spaced.objective == "v" and spaced.clip_denoised == (-1.0, 1.0)
    assert torch.allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept.flip(0)], rtol=1e-12)
    assert torch.allclose(diffusion.respace(torch.arange(1000)).betas, diffusion.betas, rtol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_make_one_model_call_per_step_with_training_timesteps(sampler):
    diffusion = GaussianDiffusion(200)
    calls, callbacks = [], []

    def model_fn(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    sample = {"ddpm": sample_ddpm, "ddim": sample_ddim}[sampler]
    sample(model_fn, diffusion, torch.randn(3, 2), steps=64, callback=lambda *args: callbacks.append(args))
    expected = respaced_timesteps(200, 64).tolist()
    assert len(calls) == 64
    assert [c.tolist() for c in calls] == [[t] * 3 for t in expected]
    assert all(c.dtype == torch.long for c in calls)
    assert [(i, t) for i, t, _, _ in callbacks] == list(enumerate(expected))
    calls.clear()
    if sampler == "ddpm":  # default: every training step
        sample_ddpm(model_fn, diffusion, torch.randn(3, 2))
        assert len(calls) == 200


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param(lambda fn, d, x, g, cb: sample_ddpm(fn, d, x, steps=40, generator=g, callback=cb), id="ddpm-40"),
        pytest.param(lambda fn, d, x, g, cb: sample_ddim(fn, d, x, steps=25, generator=g, callback=cb), id="ddim-25"),
        pytest.param(
            lambda fn, d, x, g, cb: sample_ddim(fn, d, x, steps=25, eta=1.0, generator=g, callback=cb),
            id="ddim-25-eta1",
        ),
    ],
)
def test_strided_samplers_follow_the_exact_marginals_for_point_mass_data(objective, sampler):
    """For data that is one point mu, every step of a correct sampler (with the exact denoiser) lands on
    the true marginal q(x_t) = N(sqrt(abar_t) mu, 1 - abar_t), however the steps are strided; a wrong
    respaced variance or DDIM sigma would show here."""
    diffusion = GaussianDiffusion(1000, objective=objective)
    mu = torch.tensor([0.5, -1.0])
    generator = torch.Generator().manual_seed(5)
    x_T = torch.randn(4000, 2, generator=generator)
    visited = []
    samples = sampler(
        exact_gaussian_denoiser(diffusion, mu.double(), 0.0), diffusion, x_T, generator,
        lambda i, t, x_t, x0: visited.append((t, x_t)),
    )  # fmt: skip
    assert torch.allclose(samples, mu.expand_as(samples), atol=1e-4)
    for t, x_t in visited[1:]:  # the first step's input is x_T itself
        abar = diffusion.alphas_cumprod[t].item()
        # tolerances: 5 standard errors of the mean (sigma / sqrt(4000)) and of the std (~1.1 %)
        assert torch.allclose(x_t.mean(0), math.sqrt(abar) * mu, atol=5 * math.sqrt((1 - abar) / 4000)), t
        assert torch.allclose(x_t.std(0), torch.full((2,), math.sqrt(1 - abar)), rtol=0.06), t


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
def test_samplers_recover_gaussian_data_with_the_exact_denoiser(objective, sampler):
    """With the Bayes-optimal denoiser for N(mu, 0.3^2) and every training step, samples have mean mu and
    std 0.3 (to within the samplers' small discretisation bias: ~2 % at 200 steps)."""
    diffusion = GaussianDiffusion(200, objective=objective)
    mu, std = torch.tensor([0.5, -1.0]), 0.3
    generator = torch.Generator().manual_seed(5)
    x_T = torch.randn(10000, 2, generator=generator)
    model_fn = exact_gaussian_denoiser(diffusion, mu.double(), std)
    samples = sampler(model_fn, diffusion, x_T, steps=200, generator=generator)
    assert samples.dtype == torch.float32 and samples.shape == x_T.shape
    assert torch.allclose(samples.mean(0), mu, atol=0.015)  # 5 standard errors: 5 * 0.3 / sqrt(10000)
    assert torch.allclose(samples.std(0), torch.full((2,), std), rtol=0.05)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_with_eta_one_is_the_respaced_ancestral_sampler(objective):
    """DDIM's eta = 1 step is q(x_s | x_t, x0) of the respaced process: with the same noise it matches DDPM."""
    diffusion = GaussianDiffusion(1000, objective=objective)
    model_fn = exact_gaussian_denoiser(diffusion, torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    ddpm = sample_ddpm(model_fn, diffusion, x_T, steps=30, generator=torch.Generator().manual_seed(9))
    ddim = sample_ddim(model_fn, diffusion, x_T, steps=30, eta=1.0, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_ddim_eta0_is_deterministic_and_ddpm_follows_the_generator():
    diffusion = GaussianDiffusion(100, objective="v")
    model_fn = exact_gaussian_denoiser(diffusion, torch.tensor([0.2, 0.1], dtype=torch.float64), 0.5)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def ddim(seed, eta):
        return sample_ddim(model_fn, diffusion, x_T, steps=20, eta=eta, generator=torch.Generator().manual_seed(seed))

    def ddpm(seed):
        return sample_ddpm(model_fn, diffusion, x_T, steps=30, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(ddim(1, eta=0.0), ddim(2, eta=0.0))  # no noise drawn: the generator does not matter
    assert torch.equal(ddim(1, eta=1.0), ddim(1, eta=1.0)) and not torch.allclose(ddim(1, eta=1.0), ddim(2, eta=1.0))
    assert torch.equal(ddpm(3), ddpm(3))
    assert not torch.allclose(ddpm(3), ddpm(4))


def test_predicted_x0_is_clamped_to_clip_denoised():
    diffusion = GaussianDiffusion(100, objective="x0", clip_denoised=(-1.0, 1.0))
    seen = []
    x_T = 3 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_ddpm, sample_ddim):
        out = sampler(lambda x, t: 5 * x, diffusion, x_T, steps=10, callback=lambda i, t, x, x0: seen.append(x0))
        assert out.abs().max() <= 1.0
    assert all(x0.abs().max() <= 1.0 for x0 in seen) and max(x0.abs().max() for x0 in seen) == 1.0


def test_sampler_arguments_are_validated(capsys):
    diffusion = GaussianDiffusion(10)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[1, 10\].*50"):
        sample_ddim(zero, diffusion, torch.randn(2, 2))  # default 50 steps > 10 training steps
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(zero, diffusion, torch.randn(2, 2), steps=5, eta=-1.0)
    with pytest.raises(ValueError, match="model output has shape"):
        sample_ddpm(lambda x, t: x[:, :1], diffusion, torch.randn(2, 2))
    sample_ddim(zero, diffusion, torch.randn(2, 2), steps=5, progress=True)
    assert "ddim" in capsys.readouterr().err  # the tqdm bar


# -- end to end: a trained denoiser -------------------------------------------------------------------------

MIXTURE_MEANS = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 1.0]])
MIXTURE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MIXTURE_STD = 0.1
MEAN_TOLERANCE = 0.15  # distance between a component's sample mean and its true mean
WEIGHT_TOLERANCE = 0.07  # |fraction of samples nearest a component - its weight|


def sample_mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    component = torch.multinomial(MIXTURE_WEIGHTS, n, replacement=True, generator=generator)
    return MIXTURE_MEANS[component] + MIXTURE_STD * torch.randn(n, 2, generator=generator)


class TimeMLP(nn.Module):
    """A tiny denoiser: an MLP on [x, sin/cos features of t / T]."""

    def __init__(self, num_steps: int, width: int = 64, num_freqs: int = 8) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs) * math.pi)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * num_freqs, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = (t.float() / self.num_steps).unsqueeze(1) * self.freqs  # [B, F]
        return self.net(torch.cat([x, phase.sin(), phase.cos()], dim=1))


@pytest.fixture(scope="module")
def trained_mixture_denoiser():
    """A v-prediction MLP trained for ~1000 Adam steps (a few seconds of CPU)."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(250, schedule="cosine", objective="v")
    net = TimeMLP(diffusion.num_steps)
    steps = 1000
    optimizer = torch.optim.Adam(net.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = diffusion.training_loss(net, sample_mixture(256, generator), generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return diffusion, net.eval()


def assert_matches_mixture(samples: torch.Tensor) -> None:
    nearest = torch.cdist(samples, MIXTURE_MEANS).argmin(dim=1)
    for k in range(len(MIXTURE_MEANS)):
        members = samples[nearest == k]
        weight = len(members) / len(samples)
        assert abs(weight - MIXTURE_WEIGHTS[k].item()) <= WEIGHT_TOLERANCE, (k, weight)
        error = (members.mean(0) - MIXTURE_MEANS[k]).norm().item()
        assert error <= MEAN_TOLERANCE, (k, error)
        assert members.std(0).max() < 2.5 * MIXTURE_STD  # concentrated around the mean, not smeared


@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param(lambda fn, d, x, g: sample_ddpm(fn, d, x, generator=g), id="ddpm-all-250"),
        pytest.param(lambda fn, d, x, g: sample_ddpm(fn, d, x, steps=50, generator=g), id="ddpm-50"),
        pytest.param(lambda fn, d, x, g: sample_ddim(fn, d, x, steps=50, generator=g), id="ddim-50"),
    ],
)
def test_trained_denoiser_samples_recover_the_mixture(trained_mixture_denoiser, sampler):
    diffusion, net = trained_mixture_denoiser
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn(2000, 2, generator=generator)
    assert_matches_mixture(sampler(net, diffusion, x_T, generator))


# -- classifier-free guidance --------------------------------------------------------------------------------


@dataclass
class Cond:
    embed: torch.Tensor
    label: str = "text"


class RecordingNet(nn.Module):
    """out = x * (1 + t) + (0 if dropped else embed + 10 * bias): conditional and null outputs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, x, t, drop_cond, *, cond: Cond, bias: torch.Tensor, tag: str = ""):
        self.calls.append(dict(batch=x.shape[0], drop=drop_cond.clone(), embed=cond.embed.clone(), tag=tag))
        assert cond.embed.shape[0] == bias.shape[0] == t.shape[0] == x.shape[0]
        conditioning = cond.embed + 10 * bias
        return x * (1 + t.float().unsqueeze(1)) + torch.where(drop_cond.unsqueeze(1), 0.0, conditioning)


def test_guidance_runs_one_doubled_forward_and_mixes_outputs():
    net = RecordingNet()
    x, t = torch.randn(3, 4), torch.tensor([0, 5, 9])
    cond, bias = Cond(torch.randn(3, 4)), torch.randn(3, 4)
    conditional = x * (1 + t.float().unsqueeze(1)) + cond.embed + 10 * bias
    unconditional = x * (1 + t.float().unsqueeze(1))

    out = classifier_free_guidance(net, 3.0, cond=cond, bias=bias, tag="hi")(x, t)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call["batch"] == 6 and call["tag"] == "hi"
    assert call["drop"].dtype == torch.bool and call["drop"].tolist() == [False] * 3 + [True] * 3
    assert torch.equal(call["embed"], torch.cat([cond.embed, cond.embed]))
    assert torch.allclose(out, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    net = RecordingNet()
    x, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    cond, bias = Cond(torch.randn(3, 4)), torch.randn(3, 4)
    out = classifier_free_guidance(net, 1.0, cond=cond, bias=bias)(x, t)
    assert [c["batch"] for c in net.calls] == [3] and net.calls[0]["drop"].tolist() == [False] * 3
    assert torch.allclose(out, x * (1 + t.float().unsqueeze(1)) + cond.embed + 10 * bias)
    out = classifier_free_guidance(net, 0, cond=cond, bias=bias)(x, t)
    assert net.calls[1]["batch"] == 3 and net.calls[1]["drop"].tolist() == [True] * 3
    assert torch.allclose(out, x * (1 + t.float().unsqueeze(1)))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="guidance scale"):
            classifier_free_guidance(net, bad, cond=cond, bias=bias)


def test_guided_model_plugs_into_the_samplers():
    diffusion = GaussianDiffusion(50)
    net = RecordingNet()
    cond, bias = Cond(torch.zeros(2, 3)), torch.zeros(2, 3)
    fn = classifier_free_guidance(lambda x, t, drop, **c: 0.01 * net(x, t, drop, **c), 4.0, cond=cond, bias=bias)
    out = sample_ddim(fn, diffusion, torch.randn(2, 3), steps=7)
    assert out.shape == (2, 3) and len(net.calls) == 7 and all(c["batch"] == 4 for c in net.calls)
