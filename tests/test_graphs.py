"""The cuda_graphs switch of the samplers, stages and pipeline, on the CPU: its values, the documented fallback
(asked for on the CPU: one warning, the same samples as without), and what a captured step needs from the models
(the prior's sampling reads nothing back from the device). The capture itself is tested in tests/test_cuda.py."""

import warnings

import pytest
import torch
from stages import micro_stages

from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2s,
)
from unclip.diffusion.graphs import MIN_STEPS, check_cuda_graphs, use_cuda_graphs
from unclip.embedding import TextCondition
from unclip.pipelines import GenerationSettings, UnCLIPPipeline

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_the_switch_is_auto_on_or_off():
    assert [check_cuda_graphs(v) for v in ("auto", "ON", "off", None, True, False)] == [
        "auto", "on", "off", "auto", "on", "off"]
    for bad in ("yes", 1, "graphs"):
        with pytest.raises(ValueError, match=r"cuda_graphs must be one of \('auto', 'on', 'off'\) .*got"):
            check_cuda_graphs(bad)


def test_auto_captures_on_cuda_from_a_few_steps_and_never_on_the_cpu():
    assert use_cuda_graphs("auto", CUDA, MIN_STEPS) and not use_cuda_graphs("auto", CUDA, MIN_STEPS - 1)
    assert use_cuda_graphs("on", CUDA, 1) and not use_cuda_graphs("off", CUDA, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto and off stay silent on the CPU
        assert not use_cuda_graphs("auto", CPU, 64) and not use_cuda_graphs("off", CPU, 64)


def model_fn(x, t):
    return 0.1 * x + t.float()[:, None] / 1000


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2s])
def test_graphs_asked_for_on_the_cpu_warn_once_and_sample_the_same(sampler):
    diffusion = GaussianDiffusion(100, "cosine", "eps")
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=8, generator=torch.Generator().manual_seed(1))
    plain = sampler(model_fn, diffusion, x_T, cuda_graphs="off", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(1)
    with pytest.warns(UserWarning, match="cuda_graphs='on' needs a CUDA device, but sampling runs on cpu; sampling "
                                         "without CUDA graphs") as caught:
        asked = sampler(model_fn, diffusion, x_T, cuda_graphs="on", **kwargs)
    assert len(caught) == 1
    torch.testing.assert_close(asked, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        sampler(model_fn, diffusion, x_T, cuda_graphs="sometimes", steps=8)


def test_the_stages_take_the_switch():
    clip, prior, decoder, upsampler = micro_stages()
    text = clip.encode_text(["a red circle"])
    kwargs = dict(steps=3, generator=torch.Generator().manual_seed(0))
    embed = prior.sample(text, guidance_scale=2.0, cuda_graphs="off", **kwargs)
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        again = prior.sample(text, guidance_scale=2.0, cuda_graphs="on", steps=3,
                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, embed, rtol=0, atol=0)
    images = decoder.sample(embed, text, cuda_graphs="off", **kwargs)
    assert upsampler.sample(images, cuda_graphs="off", **kwargs).shape == (1, 3, 32, 32)
    for stage, first in ((prior, text), (decoder, embed), (upsampler, images)):
        with pytest.raises(ValueError, match="cuda_graphs must be one of"):
            stage.sample(first, cuda_graphs="maybe", steps=2)


def test_guided_prior_sampling_gives_what_the_uncached_network_gives():
    """The prior caches each conditioning's prefix by the identity of the tensors guidance passes (never by their
    values, which would be a read-back a graph cannot capture): the conditional and the unconditional half must each
    get their own."""
    _, prior, _, _ = micro_stages()
    prior.eval()
    g = torch.Generator().manual_seed(0)
    d, n = prior.embed_mean.shape[0], prior.net.text_length
    mask = torch.arange(n).expand(2, n) < torch.tensor([[3], [5]])
    text = TextCondition(embed=torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1),
                         tokens=torch.zeros(2, n, dtype=torch.long), mask=mask,
                         token_embeds=torch.randn(2, n, prior.net.token_dim, generator=g))
    x_T = torch.randn(2, d, generator=torch.Generator().manual_seed(1))
    cond = dict(text_embed=text.embed, token_embeds=text.token_embeds, mask=text.mask)
    with torch.no_grad():
        cached = sample_ddim(classifier_free_guidance(prior._cached_net(), 3.0, **cond), prior.diffusion, x_T, steps=5)
        full = sample_ddim(classifier_free_guidance(prior._net, 3.0, **cond), prior.diffusion, x_T, steps=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_the_pipeline_setting_is_checked_and_passed_to_every_stage():
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        GenerationSettings(cuda_graphs="often").check()
    assert GenerationSettings().cuda_graphs == "auto"
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler])
    fast = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2, output="tensor")
    plain = pipe.generate(["a red circle"], seed=0, cuda_graphs="off", **fast)
    with pytest.warns(UserWarning, match="needs a CUDA device") as caught:
        asked = pipe.generate(["a red circle"], seed=0, cuda_graphs="on", **fast)
    assert len(caught) == 3  # prior, decoder, upsampler
    torch.testing.assert_close(asked, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        pipe.generate(["a red circle"], cuda_graphs="often", **fast)
