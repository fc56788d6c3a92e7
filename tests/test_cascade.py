"""A three-stage cascade as DALL-E 2's: decoder (16 px) -> upsampler (32 px) -> a crop-trained convolutional upsampler
(64 px), tiny real stages. Everything that takes or makes an image goes through every stage, and sizes that do not
connect are an error before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from stages import enliven, save_lively_pipeline

from unclip.checkpoint import save_stage
from unclip.decoder import Upsampler
from unclip.decoder.unet import UNet
from unclip.pipelines import UnCLIPPipeline, load_pipeline

CONV_UNET = {"base_channels": 16, "norm_groups": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [], "middle_attention": False}
FAST = dict(prior_steps=2, decoder_steps=2, upsampler_steps=[2, 2])


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    stages = save_lively_pipeline(root)
    torch.manual_seed(0)
    last = enliven(Upsampler(low_res_size=32, image_size=64, unet=CONV_UNET, num_steps=50, train_crop=16,
                             degradation="blur"), seed=7)
    stages["upsamplers"] = [*stages["upsamplers"], save_stage(root / "upsampler_64", last, stage="upsampler", space=None)]
    return stages


@pytest.fixture(scope="module")
def pipe(stages):
    return UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                          upsamplers=stages["upsamplers"], device="cpu")


@pytest.fixture()
def seen(pipe, monkeypatch):
    """What each upsampler is asked: (stage index, input side, steps, inpainting's known side or None)."""
    calls = []
    for index, upsampler in enumerate(pipe.upsamplers):
        def sample(low_res, *args, _index=index, _sample=upsampler.sample, **kwargs):
            known = kwargs.get("inpaint")
            calls.append((_index, low_res.shape[-1], kwargs["steps"], None if known is None else known.known.shape[-1]))
            return _sample(low_res, *args, **kwargs)
        monkeypatch.setattr(upsampler, "sample", sample)
    return calls


def _scene(size=64):
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 2, 0, size - 1, size - 1), fill=255)
    return image, mask


def test_generate_runs_every_stage_with_its_own_steps(pipe, seen):
    images = pipe.generate(["a red circle"], 2, seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=[3, 2])
    assert [image.size for image in images] == [(64, 64)] * 2
    assert seen == [(0, 16, 3, None), (1, 32, 2, None)]


@pytest.mark.parametrize("operation", ["variations", "img2img", "interpolate", "mix", "decode"])
def test_every_image_operation_goes_through_the_whole_cascade(pipe, seen, operation):
    image, _ = _scene()
    calls = {
        "variations": lambda: pipe.variations(image, 2, seed=0, **FAST),
        "img2img": lambda: pipe.img2img(image, "a blue square", strength=0.5, seed=0, **FAST),
        "interpolate": lambda: pipe.interpolate(image, _scene(40)[0], steps=2, seed=0, **FAST),
        "mix": lambda: pipe.mix([(image, 1.0), ("a blue square", 1.0)], seed=0, **FAST),
        "decode": lambda: pipe.decode(torch.nn.functional.normalize(torch.randn(2, pipe.clip.space.dim), dim=-1),
                                      seed=0, **FAST),
    }
    images = calls[operation]()
    assert {image.size for image in images} == {(64, 64)}
    assert {call[:2] for call in seen} == {(0, 16), (1, 32)}


def test_inpaint_keeps_the_known_region_exactly_at_the_last_size_through_every_stage(pipe, seen):
    image, mask = _scene()
    out = pipe.inpaint(image, mask, "a blue square", n=1, seed=0, jumps=1, **FAST)
    assert out[0].size == (64, 64)
    assert seen == [(0, 16, 2, 32), (1, 32, 2, 64)]  # each stage inpaints at its own size
    known = np.asarray(mask)[:, :, None] < 128
    diff = np.abs(np.asarray(out[0], dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert diff[np.broadcast_to(known, diff.shape)].max() == 0
    assert diff[np.broadcast_to(~known, diff.shape)].mean() > 5  # the hole was painted


def test_a_saved_cascade_loads_with_its_stages_and_per_upsampler_settings(pipe, tmp_path):
    pipe.settings.upsampler_steps = [4, 3]
    try:
        loaded = load_pipeline(pipe.save_pretrained(tmp_path / "pipe"))
    finally:
        pipe.settings.upsampler_steps = 25
    assert [(u.low_res_size, u.image_size) for u in loaded.upsamplers] == [(16, 32), (32, 64)]
    assert loaded.settings.upsampler_steps == [4, 3] and loaded.upsamplers[1].train_crop == 16
    assert loaded.upsamplers[1].degradation == "blur"


def test_sizes_that_do_not_connect_are_an_error_naming_every_stage(stages):
    with pytest.raises(ValueError) as error:
        UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                       upsamplers=stages["upsamplers"][1:], device="cpu")
    assert ("upsampler 0 takes 32-px images but the stage before it makes 16-px ones (decoder -> 16 px; upsampler 0: "
            "32 -> 64 px)") in str(error.value)
    with pytest.raises(ValueError, match=r"upsampler 1 takes 16-px images .*upsampler 0: 16 -> 32 px; upsampler 1: "
                                         r"16 -> 32 px"):
        UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                       upsamplers=[stages["upsamplers"][0]] * 2, device="cpu")


def test_per_upsampler_settings_must_match_the_cascade(pipe):
    with pytest.raises(ValueError, match=r"upsampler_steps=\[2\] has 1 entries but the pipeline has 2 upsamplers"):
        pipe.generate(["a red circle"], seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=[2])
    images = pipe.generate(["a red circle"], seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=[2, 1, 5])
    assert images[0].size == (64, 64)  # entries past the last upsampler are for longer cascades
    with pytest.raises(ValueError, match=r"upsampler_aug_level must be a number >= 0, got \[0.05, -1\]"):
        pipe.generate(["a red circle"], seed=0, upsampler_aug_level=[0.05, -1])
    with pytest.raises(ValueError, match=r"decoder_steps takes one number, got \[2, 2\]"):
        pipe.generate(["a red circle"], seed=0, decoder_steps=[2, 2])


def test_a_convolutional_unet_takes_any_multiple_of_its_downsampling_an_attending_one_only_its_size():
    conv = UNet(image_size=64, in_channels=3, **CONV_UNET)
    assert conv.convolutional and conv(torch.randn(1, 3, 16, 16), torch.tensor([10])).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"x is 15x15: a side must be a positive multiple of 2"):
        conv(torch.randn(1, 3, 15, 15), torch.tensor([10]))
    attending = UNet(image_size=32, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[])
    assert not attending.convolutional  # middle attention
    with pytest.raises(ValueError, match=r"x has shape \[1, 3, 16, 16\], expected \[\*, 3, 32, 32\]"):
        attending(torch.randn(1, 3, 16, 16), torch.tensor([10]))


def test_crop_training_takes_the_same_place_of_the_target_and_the_condition():
    torch.manual_seed(0)
    up = Upsampler(low_res_size=32, image_size=64, unet=CONV_UNET, num_steps=50, train_crop=16)
    grid = torch.arange(64.0).view(1, 1, 1, 64).expand(3, 3, 64, 64)
    target, shifted = up._crops(grid, grid + 1000)
    assert target.shape == (3, 3, 16, 16) and torch.equal(shifted, target + 1000)
    assert len({int(row[0, 0, 0]) for row in target}) > 1  # each row its own place
    loss = up.training_loss(torch.rand(3, 3, 64, 64) * 2 - 1)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in up.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("settings, message", [
    (dict(train_crop=128), r"train_crop must be an int in \(0, image_size=64\] or null, got 128"),
    (dict(train_crop=15), r"train_crop=15 must be a multiple of the UNet's downsampling, 2"),
    (dict(train_crop=16, unet={**CONV_UNET, "middle_attention": True}), r"train_crop=16 needs a convolutional UNet"),
    (dict(degradation="jpeg"), r"degradation.*'jpeg'"),
])
def test_bad_crop_or_degradation_is_an_error_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        Upsampler(**{"low_res_size": 32, "image_size": 64, "unet": CONV_UNET, "num_steps": 50, **settings})

