"""Editing in the diffusion core: negative conditioning in guidance, image-to-image's start, RePaint inpainting."""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import Cond, RecordingNet, exact_gaussian_denoiser

from unclip.diffusion import (
    GaussianDiffusion,
    Inpainting,
    classifier_free_guidance,
    noised_start,
    repaint_schedule,
    respaced_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_repaint,
)

# -- negative conditioning --------------------------------------------------------------------------------------


def test_a_negative_is_the_unconditional_branch_of_one_doubled_forward():
    net = RecordingNet()
    x, t = torch.randn(3, 4), torch.tensor([0, 5, 9])
    cond, bias = Cond(torch.randn(3, 4)), torch.randn(3, 4)
    negative = dict(cond=Cond(torch.randn(3, 4)), bias=torch.randn(3, 4))
    base = x * (1 + t.float().unsqueeze(1))
    conditional = base + cond.embed + 10 * bias
    steered_from = base + negative["cond"].embed + 10 * negative["bias"]

    out = classifier_free_guidance(net, 3.0, negative=negative, cond=cond, bias=bias)(x, t)
    assert len(net.calls) == 1 and net.calls[0]["batch"] == 6
    assert net.calls[0]["drop"].tolist() == [False] * 6  # the negative is a conditioning, not the null
    assert torch.equal(net.calls[0]["embed"], torch.cat([cond.embed, negative["cond"].embed]))
    assert torch.allclose(out, steered_from + 3.0 * (conditional - steered_from), atol=1e-5)
    only_negative = classifier_free_guidance(net, 0.0, negative=negative, cond=cond, bias=bias)(x, t)
    assert torch.allclose(only_negative, steered_from) and net.calls[-1]["drop"].tolist() == [False] * 3


def test_a_negative_of_another_structure_is_a_clear_error():
    net = RecordingNet()
    cond, bias = Cond(torch.randn(3, 4)), torch.randn(3, 4)
    with pytest.raises(ValueError, match="negative has keys"):
        classifier_free_guidance(net, 3.0, negative=dict(cond=cond), cond=cond, bias=bias)
    with pytest.raises(ValueError, match=r"conditioning.bias: the negative has shape \[3, 5\]"):
        classifier_free_guidance(net, 3.0, negative=dict(cond=cond, bias=torch.randn(3, 5)), cond=cond, bias=bias)
    with pytest.raises(ValueError, match="conditioning.cond.label"):
        classifier_free_guidance(net, 3.0, negative=dict(cond=Cond(cond.embed, "other"), bias=bias), cond=cond, bias=bias)


# -- image-to-image ---------------------------------------------------------------------------------------------


def test_noised_start_runs_the_last_strength_share_of_the_steps():
    diffusion = GaussianDiffusion(100, objective="v")
    model_fn = exact_gaussian_denoiser(diffusion, torch.tensor([0.2, 0.1], dtype=torch.float64), 0.5)
    image = torch.full((4, 2), 0.7)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    timesteps = respaced_timesteps(100, 20).tolist()

    x, skip = noised_start(diffusion, image, noise, 20, 0.25)
    assert skip == 15
    torch.testing.assert_close(x, diffusion.q_sample(image, torch.full((4,), timesteps[15]), noise))
    seen = []
    sample_ddim(model_fn, diffusion, x, steps=20, skip=skip, callback=lambda i, t, *_: seen.append((i, t)))
    assert seen == [(i, timesteps[i]) for i in range(15, 20)]  # 5 model calls, from step 15 on

    x, skip = noised_start(diffusion, image, noise, 20, 1.0)  # strength 1: plain sampling from the same noise
    assert skip == 0 and torch.equal(x, noise)
    x, skip = noised_start(diffusion, image, noise, 20, 0.0)  # strength 0: nothing to do
    assert skip == 20 and torch.equal(sample_ddpm(model_fn, diffusion, x, steps=20, skip=skip), image)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            noised_start(diffusion, image, noise, 20, bad)
    with pytest.raises(ValueError, match=r"skip must be an int in \[0, steps=20\], got 21"):
        sample_ddim(model_fn, diffusion, image, steps=20, skip=21)


def test_low_strength_stays_near_the_image_and_full_strength_forgets_it():
    """With the exact denoiser for data N(mu, 0.1^2), image-to-image from a point 1.58 away keeps most of the way
    at strength 0.05, less at 0.2, and lands on the data at strength 1."""
    diffusion = GaussianDiffusion(1000, objective="v")
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64)
    model_fn = exact_gaussian_denoiser(diffusion, mu, 0.1)
    image = torch.full((500, 2), -1.0)
    generator = torch.Generator().manual_seed(1)
    distances = {}
    for strength in (0.05, 0.2, 1.0):
        x, skip = noised_start(diffusion, image, torch.randn(500, 2, generator=generator), 50, strength)
        out = sample_ddim(model_fn, diffusion, x, steps=50, skip=skip)
        distances[strength] = (out.mean(0) - mu.float()).norm().item()
    assert distances[0.05] > 1.2 > distances[0.2] > distances[1.0] and distances[1.0] < 0.05, distances


# -- RePaint ----------------------------------------------------------------------------------------------------


def test_repaint_schedule_visits_every_step_and_jumps_back_as_asked():
    assert repaint_schedule(4, 0, 1) == [0, 1, 2, 3]
    assert repaint_schedule(4, 1, 1) == [0, 1, 0, 1, 2, 1, 2, 3]
    assert repaint_schedule(6, 2, 2) == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 3, 2, 3, 4, 5]
    order = repaint_schedule(50, 3, 1)
    assert order[-1] == 49 and all(abs(a - b) == 1 for a, b in zip(order, order[1:]))
    assert sum(b > a for a, b in zip(order, order[1:])) == 49 + 3 * 48  # steps down: 3 extra at steps 1..48


def correlated_denoiser(diffusion: GaussianDiffusion, cov: torch.Tensor):
    """The exact model output for zero-mean Gaussian data of covariance ``cov`` [D, D]."""
    alphas_cumprod = diffusion.alphas_cumprod.tolist()
    eye = torch.eye(len(cov), dtype=torch.float64)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod[int(t[0])]
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = x.double() @ (a * cov @ torch.linalg.inv(abar * cov + (1 - abar) * eye)).T  # E[x0 | x_t]
        eps = (x.double() - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[diffusion.objective].float()

    return model_fn


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_repaint_keeps_the_known_part_exactly_and_resampling_approaches_the_true_conditional(objective):
    """Data (a, b) with correlation 0.99; keep a = 1.5 and fill b. The true conditional is N(1.485, 0.141^2).
    Plain replacement (jumps=0) stops well short of it; RePaint's jumps move the fill to it."""
    diffusion = GaussianDiffusion(1000, objective=objective)
    model_fn = correlated_denoiser(diffusion, torch.tensor([[1.0, 0.99], [0.99, 1.0]], dtype=torch.float64))
    n = 2000
    known = torch.stack([torch.full((n,), 1.5), torch.zeros(n)], 1)
    keep = torch.tensor([[1.0, 0.0]])
    fills = {}
    for jumps in (0, 9):
        generator = torch.Generator().manual_seed(0)
        out = sample_repaint(model_fn, diffusion, torch.randn(n, 2, generator=generator),
                             Inpainting(known, keep, jumps=jumps), steps=25, eta=1.0, generator=generator)
        assert torch.equal(out[:, 0], known[:, 0])
        fills[jumps] = out[:, 1]
    assert abs(fills[0].mean() - 1.485) > 0.2
    assert abs(fills[9].mean() - 1.485) < 0.05 and abs(fills[9].std() - 0.141) < 0.03


def test_repaint_makes_one_model_call_per_step_down_and_follows_the_generator():
    diffusion = GaussianDiffusion(100, objective="v")
    model_fn = exact_gaussian_denoiser(diffusion, torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64), 0.5)
    known, keep = torch.zeros(4, 3), torch.tensor([[1.0, 0.0, 1.0]])
    calls = []

    def run(seed, jumps=2, callback=None):
        generator = torch.Generator().manual_seed(seed)
        return sample_repaint(model_fn, diffusion, torch.randn(4, 3, generator=generator),
                              Inpainting(known, keep, jumps=jumps), steps=10, generator=generator, callback=callback)

    run(0, callback=lambda i, t, *_: calls.append(i))
    assert calls == list(range(9 + 2 * 8 + 1))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    with pytest.raises(ValueError, match="jumps must be an int >= 0, got -1"):
        Inpainting(known, keep, jumps=-1)
    with pytest.raises(ValueError, match=r"keep \[4, 2\] does not broadcast to known \[4, 3\]"):
        Inpainting(known, torch.ones(4, 2))
