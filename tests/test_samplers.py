"""DPM-Solver++ (2M, 2S), the timestep spacings and ``sample(name, ...)``: tested as the DDPM / DDIM samplers are
(tests/test_diffusion.py), with exact denoisers of Gaussian and Gaussian-mixture data."""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import MIXTURE_MEANS, MIXTURE_STD, MIXTURE_WEIGHTS, assert_matches_mixture, exact_gaussian_denoiser

from unclip.diffusion import (
    SAMPLERS,
    SPACINGS,
    GaussianDiffusion,
    check_sampler,
    noised_start,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2s,
    timesteps_for,
)
from unclip.diffusion.sampling import log_snr

DPMPP = ["dpmpp_2m", "dpmpp_2s"]


def exact_mixture_denoiser(diffusion: GaussianDiffusion):
    """The Bayes-optimal v for data from the 2-D mixture of test_diffusion (isotropic components of std 0.1)."""
    alphas_cumprod = diffusion.alphas_cumprod.tolist()
    means, log_weights, var = MIXTURE_MEANS.double(), MIXTURE_WEIGHTS.double().log(), MIXTURE_STD**2

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod[int(t[0])]
        a, sigma, x = math.sqrt(abar), math.sqrt(1 - abar), x.double()
        spread = abar * var + 1 - abar  # x_t | component k ~ N(a mu_k, spread I)
        offset = x[:, None, :] - a * means[None]  # [B, K, 2]
        responsibility = (log_weights - offset.pow(2).sum(-1) / (2 * spread)).softmax(dim=1)  # [B, K]
        x0 = (responsibility[..., None] * (means[None] + a * var / spread * offset)).sum(1)
        eps = (x - a * x0) / sigma
        return (a * eps - sigma * x0).float()

    return model_fn


@pytest.fixture(scope="module")
def gaussian():
    """1000-step v-prediction diffusion, the exact denoiser of N(mu, 0.3^2) and 4000 starting points."""
    diffusion = GaussianDiffusion(1000, objective="v")
    model_fn = exact_gaussian_denoiser(diffusion, torch.tensor([0.5, -1.0], dtype=torch.float64), 0.3)
    return diffusion, model_fn, torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm(dim=1).mean().item()


# -- spacings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_visits_distinct_descending_training_steps_from_the_noisiest_to_zero(spacing):
    diffusion = GaussianDiffusion(1000, objective="v")
    for steps in (2, 3, 5, 8, 10, 15, 25, 50, 100, 500, 999, 1000):
        t = timesteps_for(diffusion, steps, spacing)
        assert t.dtype == torch.long and len(t) == steps, (spacing, steps)
        assert t[0] == 999 and t[-1] == 0 and bool((t[:-1] > t[1:]).all()), (spacing, steps, t.tolist())
    assert timesteps_for(diffusion, 1, spacing).tolist() == [999]  # one step starts from the noise end, as today
    assert torch.equal(timesteps_for(diffusion, 1000, spacing), torch.arange(999, -1, -1))


def test_spacings_are_what_they_say_on_the_cosine_schedule():
    """uniform is today's strided respacing; logsnr is evenly spaced in lambda (up to the rounding to training
    steps) and so visits low noise (lambda > 2, t < ~60) more than uniform does. On this schedule the last training
    step alone spans lambda -9.9 to -6.5, so logsnr and karras (whose rho = 7 ramp from sigma ~2e4 crowds the high
    sigmas) both spend several steps at t >= 990, karras most of all."""
    diffusion = GaussianDiffusion(1000, objective="v")
    lam = log_snr(diffusion)
    assert timesteps_for(diffusion, 5, "uniform").tolist() == [999, 749, 500, 250, 0]
    for steps in (10, 25, 50):
        uniform, logsnr, karras = (timesteps_for(diffusion, steps, s) for s in SPACINGS)
        assert (lam[logsnr] > 2).sum() > (lam[uniform] > 2).sum(), steps
        assert (karras >= 990).sum() >= (logsnr >= 990).sum() > (uniform >= 990).sum() == 1, steps
    gaps = lam[timesteps_for(diffusion, 25, "logsnr")].diff()[10:]  # past the crowded noisy end
    assert gaps.max() / gaps.min() < 2.5 and torch.allclose(gaps.mean(), (lam[0] - lam[-1]) / 24, rtol=0.25)


def test_ddim_follows_the_exact_marginals_at_every_spacing():
    """The spacing changes which steps are visited, not what the sampler computes: for point-mass data every step
    of DDIM lands on the true marginal at its own timestep."""
    diffusion = GaussianDiffusion(1000, objective="v")
    mu = torch.tensor([0.5, -1.0])
    x_T = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))
    for spacing in ("logsnr", "karras"):
        visited = []
        out = sample_ddim(exact_gaussian_denoiser(diffusion, mu.double(), 0.0), diffusion, x_T, steps=10,
                          spacing=spacing, callback=lambda i, t, x_t, x0: visited.append((t, x_t)))
        assert [t for t, _ in visited] == timesteps_for(diffusion, 10, spacing).tolist()
        assert torch.allclose(out, mu.expand_as(out), atol=1e-4)
        for t, x_t in visited[1:]:
            abar = diffusion.alphas_cumprod[t].item()
            assert torch.allclose(x_t.mean(0), math.sqrt(abar) * mu, atol=5 * math.sqrt((1 - abar) / 4000)), t
            assert torch.allclose(x_t.std(0), torch.full((2,), math.sqrt(1 - abar)), rtol=0.06), t


# -- DPM-Solver++ --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DPMPP)
def test_dpmpp_makes_one_model_call_per_step_at_the_spacings_timesteps(gaussian, name):
    diffusion, model_fn, x_T = gaussian
    for spacing in SPACINGS:
        seen = []
        sample(name, lambda x, t: seen.append(t.clone()) or model_fn(x, t), diffusion, x_T[:8], 7, spacing=spacing)
        assert [int(t[0]) for t in seen] == timesteps_for(diffusion, 7, spacing).tolist()
        assert all(t.dtype == torch.long and t.shape == (8,) for t in seen)


def test_first_order_dpmpp_is_ddim_with_eta_zero(gaussian):
    """DPM-Solver++'s first-order update is DDIM (eta = 0) in other coordinates: at 2 steps both solvers are first
    order throughout, and 2M's first step (which has no history) lands where DDIM's does."""
    diffusion, model_fn, x_T = gaussian
    ddim2 = sample_ddim(model_fn, diffusion, x_T, steps=2)
    for name in DPMPP:
        torch.testing.assert_close(sample(name, model_fn, diffusion, x_T, 2), ddim2, atol=1e-5, rtol=1e-5)
    inputs, outputs = {}, {}
    for name in ("ddim", "dpmpp_2m", "dpmpp_2s"):  # 10 steps: 9 intervals, so 2S's first step is first order too
        seen = inputs.setdefault(name, [])
        outputs[name] = sample(name, model_fn, diffusion, x_T, 10, callback=lambda i, t, x, x0: seen.append(x))
    for name in DPMPP:
        torch.testing.assert_close(inputs[name][1], inputs["ddim"][1], atol=1e-5, rtol=1e-5)
        assert distance(outputs[name], outputs["ddim"]) > 0.01  # then second order: another path


@pytest.mark.parametrize("name", DPMPP)
def test_dpmpp_recovers_gaussian_data_with_the_exact_denoiser(gaussian, name):
    diffusion, model_fn, x_T = gaussian
    samples = sample(name, model_fn, diffusion, x_T, 25)
    assert samples.dtype == torch.float32 and samples.shape == x_T.shape
    assert torch.allclose(samples.mean(0), torch.tensor([0.5, -1.0]), atol=0.025)  # 5 standard errors: 5 * 0.3 / 63
    assert torch.allclose(samples.std(0), torch.full((2,), 0.3), rtol=0.05)


@pytest.mark.parametrize("name,steps", [("dpmpp_2m", 10), ("dpmpp_2m", 15), ("dpmpp_2s", 15)])
def test_dpmpp_recovers_the_mixture_with_its_exact_denoiser_in_few_steps(name, steps):
    diffusion = GaussianDiffusion(1000, objective="v")
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    assert_matches_mixture(sample(name, exact_mixture_denoiser(diffusion), diffusion, x_T, steps))


def test_dpmpp_2m_approaches_the_ode_faster_than_ddim(gaussian):
    """Both solve the same ODE: against DDIM-1000 from the same x_T, DPM-Solver++(2M)'s distance shrinks as the steps
    grow, and at few steps it is closer than DDIM with as many (measured: 0.057 against 0.083 at 10, 0.0043 against
    0.033 at 25)."""
    diffusion, model_fn, x_T = gaussian
    reference = sample_ddim(model_fn, diffusion, x_T, steps=1000)
    dpm = [distance(sample("dpmpp_2m", model_fn, diffusion, x_T, n), reference) for n in (5, 10, 25, 50)]
    ddim = [distance(sample("ddim", model_fn, diffusion, x_T, n), reference) for n in (5, 10, 25, 50)]
    assert dpm == sorted(dpm, reverse=True) and dpm[-1] < 0.005, dpm
    assert all(d < c for d, c in zip(dpm, ddim)), (dpm, ddim)
    assert dpm[2] < ddim[2] / 4, (dpm, ddim)
    two_s = distance(sample("dpmpp_2s", model_fn, diffusion, x_T, 50), reference)
    assert two_s < ddim[3] / 4, (two_s, ddim)


def test_dpmpp_2m_on_the_mixture_is_closer_to_the_ode_than_ddim_at_few_steps():
    diffusion = GaussianDiffusion(1000, objective="v")
    model_fn, x_T = exact_mixture_denoiser(diffusion), torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    reference = sample_ddim(model_fn, diffusion, x_T, steps=1000)
    for steps in (8, 15):
        dpm = distance(sample_dpmpp_2m(model_fn, diffusion, x_T, steps), reference)
        ddim = distance(sample_ddim(model_fn, diffusion, x_T, steps), reference)
        assert dpm < ddim, (steps, dpm, ddim)


def test_dpmpp_is_deterministic_and_clamps_x0_where_the_diffusion_does(gaussian):
    diffusion, model_fn, x_T = gaussian
    for name in DPMPP:
        a = sample(name, model_fn, diffusion, x_T, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, sample(name, model_fn, diffusion, x_T, 8, generator=torch.Generator().manual_seed(2)))
    clamped = GaussianDiffusion(100, objective="x0", clip_denoised=(-1.0, 1.0))
    seen = []
    for name in DPMPP:
        out = sample(name, lambda x, t: 5 * x, clamped, 3 * x_T[:32], 10, callback=lambda i, t, x, x0: seen.append(x0))
        assert out.abs().max() <= 1.0
    assert max(x0.abs().max() for x0 in seen) == 1.0


@pytest.mark.parametrize("name", DPMPP)
def test_dpmpp_starts_at_the_skip_th_step_for_image_to_image(gaussian, name):
    """img2img: ``noised_start`` at the sampler's spacing, then ``steps - skip`` calls from the skip-th step, whose
    first step is first order (as DDIM's); point-mass data comes back exactly."""
    diffusion, _, x_T = gaussian
    mu = torch.tensor([0.5, -1.0])
    model_fn = exact_gaussian_denoiser(diffusion, mu.double(), 0.0)
    for spacing in SPACINGS:
        x, skip = noised_start(diffusion, mu.expand(4000, 2), x_T, 12, 0.5, spacing)
        assert skip == 6
        seen = []
        out = sample(name, model_fn, diffusion, x, 12, spacing=spacing, skip=skip,
                     callback=lambda i, t, x_t, x0: seen.append((i, t, x_t)))
        assert [(i, t) for i, t, _ in seen] == list(enumerate(timesteps_for(diffusion, 12, spacing).tolist()))[6:]
        assert torch.allclose(out, mu.expand_as(out), atol=1e-4)
        ddim = []
        sample_ddim(model_fn, diffusion, x, 12, spacing=spacing, skip=skip,
                    callback=lambda i, t, x_t, x0: ddim.append(x_t))
        torch.testing.assert_close(seen[1][2], ddim[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(sample(name, model_fn, diffusion, x_T, 12, skip=12), x_T)  # everything skipped


def test_guided_model_plugs_into_dpmpp():
    """Guidance comes through model_fn unchanged: a guided v-model samples with DPM-Solver++ as with DDIM."""
    from unclip.diffusion import classifier_free_guidance

    diffusion = GaussianDiffusion(100, objective="v")

    def net(x, t, drop_cond, *, embed):
        return x * 0 + torch.where(drop_cond[:, None], 0.0, embed)

    model_fn = classifier_free_guidance(net, 3.0, embed=torch.ones(4, 2))
    null = classifier_free_guidance(net, 1.0, embed=torch.ones(4, 2))
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    guided, plain = (sample("dpmpp_2m", fn, diffusion, x_T, 6) for fn in (model_fn, null))
    assert guided.shape == (4, 2) and not torch.allclose(guided, plain)


# -- by name, and bad input ----------------------------------------------------------------------------------------


def test_sample_by_name_is_the_named_sampler(gaussian):
    diffusion, model_fn, x_T = gaussian
    x_T = x_T[:64]
    assert SAMPLERS == ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2s") and SPACINGS == ("uniform", "logsnr", "karras")
    assert torch.equal(sample("ddim", model_fn, diffusion, x_T, 9, eta=0.5, generator=torch.Generator().manual_seed(3)),
                       sample_ddim(model_fn, diffusion, x_T, 9, eta=0.5, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(sample("dpmpp_2s", model_fn, diffusion, x_T, 9, spacing="karras"),
                       sample_dpmpp_2s(model_fn, diffusion, x_T, 9, spacing="karras"))
    assert torch.equal(sample("dpmpp_2m", model_fn, diffusion, x_T, 9), sample_dpmpp_2m(model_fn, diffusion, x_T, 9))


def test_bad_sampler_spacing_steps_and_eta_are_errors_naming_them(gaussian, capsys):
    diffusion, model_fn, x_T = gaussian
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; expected one of \['ddim', 'ddpm', 'dpmpp_2m', "
                                         r"'dpmpp_2s'\]"):
        sample("euler", model_fn, diffusion, x_T, 10)
    with pytest.raises(ValueError, match=r"unknown timestep spacing 'cosine'; expected one of \['uniform', 'logsnr', "
                                         r"'karras'\]"):
        sample("ddim", model_fn, diffusion, x_T, 10, spacing="cosine")
    for name in DPMPP:
        with pytest.raises(ValueError, match=rf"{name} is a second-order solver and needs steps >= 2, got steps=1"):
            sample(name, model_fn, diffusion, x_T, 1)
        with pytest.raises(ValueError, match=rf"sampler '{name}' is a deterministic ODE solver and takes no eta, got "
                                             r"eta=1.0: pass eta=0 or use sampler 'ddim'"):
            sample(name, model_fn, diffusion, x_T, 10, eta=1.0)
        with pytest.raises(ValueError, match=rf"decoder_sampler '{name}' cannot inpaint: inpainting uses RePaint, "
                                             r"which steps with DDIM; use one of \['ddim', 'ddpm'\]"):
            check_sampler(name, 10, inpainting=True, setting="decoder_sampler")
    with pytest.raises(ValueError, match=r"\[1, 1000\].*1001"):
        sample("dpmpp_2m", model_fn, diffusion, x_T, 1001)
    with pytest.raises(ValueError, match=r"skip must be an int in \[0, steps=10\], got 11"):
        sample("dpmpp_2m", model_fn, diffusion, x_T, 10, skip=11)
    sample("dpmpp_2s", model_fn, diffusion, x_T[:2], 4, progress=True)
    assert "dpmpp_2s" in capsys.readouterr().err  # the tqdm bar


# -- the stages and the pipeline -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from stages import save_lively_pipeline

    from unclip.pipelines import UnCLIPPipeline

    stages = save_lively_pipeline(tmp_path_factory.mktemp("stages"))
    return UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                          upsamplers=stages["upsamplers"], device="cpu")


FAST = dict(prior_steps=3, decoder_steps=4, upsampler_steps=3)
DPM = dict(prior_sampler="dpmpp_2s", prior_spacing="logsnr", decoder_sampler="dpmpp_2m", decoder_spacing="karras",
           upsampler_sampler="dpmpp_2m", upsampler_spacing="logsnr")


def test_every_stage_samples_with_the_settings_sampler_and_spacing(pipe, monkeypatch):
    import unclip.diffusion.samplers as samplers

    calls, run = [], samplers.sample
    monkeypatch.setattr(samplers, "sample",
                        lambda name, *a, **kw: calls.append((name, kw["spacing"])) or run(name, *a, **kw))
    for module in ("unclip.prior.diffusion_prior", "unclip.decoder.decoder", "unclip.decoder.upsampler"):
        monkeypatch.setattr(f"{module}.sample", samplers.sample)
    images = pipe.generate(["a red circle"], 2, seed=0, output="tensor", **FAST, **DPM)
    assert images.shape == (2, 3, 32, 32)
    assert calls == [("dpmpp_2s", "logsnr"), ("dpmpp_2m", "karras"), ("dpmpp_2m", "logsnr")]
    assert torch.equal(images, pipe.generate(["a red circle"], 2, seed=0, output="tensor", **FAST, **DPM))
    calls.clear()
    ddim = pipe.generate(["a red circle"], 2, seed=0, output="tensor", **FAST)
    assert calls == [("ddim", "uniform")] * 3 and not torch.allclose(ddim, images, atol=1e-3)
    variations = pipe.variations(torch.zeros(1, 3, 32, 32), 2, output="tensor", **FAST, **DPM)  # eta: the sampler's
    assert variations.shape == (2, 3, 32, 32) and not torch.allclose(variations[0], variations[1], atol=1e-3)
    calls.clear()
    edited = pipe.img2img(torch.zeros(1, 3, 32, 32), "a red circle", strength=0.5, output="tensor", **FAST, **DPM)
    assert edited.shape == (1, 3, 32, 32) and ("dpmpp_2m", "karras") in calls  # the decoder from its skip-th step


def test_sampler_settings_round_trip_through_pipeline_json_and_old_files_load_as_ddim(pipe, tmp_path):
    import json

    from unclip.pipelines import UnCLIPPipeline

    pipe.settings = type(pipe.settings)(**{**vars(pipe.settings), **DPM, "upsampler_sampler": ["dpmpp_2s"]})
    try:
        saved = pipe.save_pretrained(tmp_path / "pipeline")
    finally:
        pipe.settings = type(pipe.settings)()
    again = UnCLIPPipeline.from_pretrained(saved, device="cpu")
    assert {key: getattr(again.settings, key) for key in DPM} == {**DPM, "upsampler_sampler": ["dpmpp_2s"]}
    manifest = json.loads((saved / "pipeline.json").read_text())
    for key in DPM:  # a pipeline saved before the samplers existed
        del manifest["settings"][key]
    (saved / "pipeline.json").write_text(json.dumps(manifest))
    old = UnCLIPPipeline.from_pretrained(saved, device="cpu").settings
    assert (old.prior_sampler, old.decoder_sampler, old.upsampler_sampler) == ("ddim",) * 3
    assert (old.prior_spacing, old.decoder_spacing, old.upsampler_spacing) == ("uniform",) * 3


@pytest.mark.parametrize("settings,message", [
    (dict(decoder_sampler="euler"), r"decoder_sampler must be one of \['ddim', 'ddpm', 'dpmpp_2m', 'dpmpp_2s'\], "
                                    r"got 'euler'"),
    (dict(upsampler_sampler=["ddim", "heun"]), r"upsampler_sampler must be one of \[.*\], got \['ddim', 'heun'\]"),
    (dict(prior_spacing="cosine"), r"prior_spacing must be one of \['uniform', 'logsnr', 'karras'\], got 'cosine'"),
    (dict(prior_sampler=["ddim"]), r"prior_sampler takes one name, got \['ddim'\]"),
    (dict(decoder_sampler="dpmpp_2m", decoder_steps=1), r"decoder_sampler='dpmpp_2m' is a second-order solver and "
                                                        r"needs decoder_steps >= 2, got 1; give more steps or "
                                                        r"decoder_sampler='ddim'"),
    (dict(upsampler_sampler=["ddim", "dpmpp_2s"], upsampler_steps=[1, 1]), r"upsampler_sampler='dpmpp_2s' .* needs "
                                                                           r"upsampler_steps >= 2, got 1"),
    (dict(decoder_sampler="dpmpp_2s", decoder_eta=0.5), r"decoder_sampler='dpmpp_2s' is a deterministic ODE solver "
                                                        r"and takes no eta, got decoder_eta=0.5"),
])
def test_bad_sampler_settings_are_errors_naming_the_setting(pipe, settings, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(["a red circle"], seed=0, **{**FAST, **settings})


def test_inpainting_asks_for_a_sampler_that_can(pipe):
    image, mask = torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2m' cannot inpaint here \(this decoder does not inpaint by "
                                         r"itself\): RePaint steps with DDIM; use one of \['ddim', 'ddpm'\] \(in a "
                                         r"pipeline: decoder_sampler=...\)"):
        pipe.inpaint(image, mask, "a red circle", eta=0.0, decoder_sampler="dpmpp_2m", **FAST)
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2s' cannot inpaint: RePaint steps with DDIM; use one of "
                                         r"\['ddim', 'ddpm'\] \(in a pipeline: upsampler_sampler=...\)"):
        pipe.inpaint(image, mask, "a red circle", eta=0.0, upsampler_sampler="dpmpp_2s", **FAST)
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2m' is a deterministic ODE solver and takes no eta, got "
                                         r"eta=1.0"):
        pipe.variations(image, eta=1.0, decoder_sampler="dpmpp_2m", **FAST)  # eta given: DDIM's, refused


def test_an_inpainting_decoder_inpaints_with_dpmpp_and_keeps_the_known_part():
    """Its network sees the known image and the mask, so it needs no RePaint: DPM-Solver++ samples as usual and the
    known region is pasted in; RePaint's resampling jumps still need DDIM."""
    from stages import enliven, micro_stages

    from unclip.decoder.inpainting import inpainting_decoder_from
    from unclip.diffusion import Inpainting

    decoder = inpainting_decoder_from(enliven(micro_stages()[2], 1)).eval()
    embed = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    known = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    keep = torch.ones(2, 1, 16, 16)
    keep[:, :, 4:12, 4:12] = 0
    out = decoder.sample(embed, steps=5, sampler="dpmpp_2m", spacing="logsnr", inpaint=Inpainting(known, keep),
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out * keep, known * keep)
    assert (out - known)[..., 4:12, 4:12].abs().mean() > 0.05
    blank = Inpainting(torch.zeros(2, 3, 16, 16), torch.zeros(2, 1, 16, 16))  # what a pipeline asks for in generate
    assert decoder.sample(embed, steps=5, sampler="dpmpp_2m", inpaint=blank).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2m' cannot inpaint here \(jumps=1 > 0\)"):
        decoder.sample(embed, steps=5, sampler="dpmpp_2m", inpaint=Inpainting(known, keep, jumps=1))


def test_the_command_line_sets_each_stages_sampler():
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from unclip.pipelines import GenerationSettings

    overrides = ["pipeline.settings.decoder_sampler=dpmpp_2m", "pipeline.settings.decoder_spacing=logsnr",
                 "pipeline.settings.upsampler_sampler=[ddim,dpmpp_2s]"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train_sample", overrides=overrides)
        demo = compose(config_name="demo", overrides=["generation.prior_sampler=dpmpp_2m"])
    settings = GenerationSettings(**OmegaConf.to_container(cfg.pipeline.settings, resolve=True))
    settings.check()
    assert (settings.decoder_sampler, settings.decoder_spacing, settings.upsampler_sampler) == (
        "dpmpp_2m", "logsnr", ["ddim", "dpmpp_2s"])
    assert demo.generation.prior_sampler == "dpmpp_2m" and demo.generation.decoder_sampler == "ddim"


def test_a_saved_pipeline_keeps_its_settings_but_those_the_command_line_gives(tmp_path):
    from _job import keep_only_given_settings_of_a_saved_pipeline
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from stages import save_micro_pipeline

    from unclip.pipelines import GenerationSettings, UnCLIPPipeline, pipeline_from_config

    saved = UnCLIPPipeline.from_pretrained(**save_micro_pipeline(tmp_path), device="cpu")
    saved.settings.prior_steps, saved.settings.decoder_steps, saved.settings.decoder_sampler = 7, 9, "dpmpp_2m"
    path = saved.save_pretrained(tmp_path / "pipeline")
    overrides = [f"pipeline.path={path}", "pipeline.settings.decoder_steps=5"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train_evaluate", overrides=overrides)
        stages = compose(config_name="train_evaluate", overrides=["pipeline.settings.decoder_steps=5"])
    keep_only_given_settings_of_a_saved_pipeline(cfg, overrides)
    keep_only_given_settings_of_a_saved_pipeline(stages, ["pipeline.settings.decoder_steps=5"])
    pipe = pipeline_from_config(OmegaConf.to_container(cfg.pipeline, resolve=True), device="cpu")
    # the saved prior steps and sampler, not the defaults the config composed; the decoder steps given
    assert (pipe.settings.prior_steps, pipe.settings.decoder_sampler, pipe.settings.decoder_steps) == (7, "dpmpp_2m", 5)
    assert OmegaConf.to_container(stages.pipeline.settings)["prior_steps"] == GenerationSettings().prior_steps
