"""Image conversions in one place: one 16-bit rule for files read by the data sets and images given to the
pipeline, tensors <-> PIL, and the public devices of the pipeline and its CLIP."""

import importlib.util
import io

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from stages import micro_stages

from unclip.data.cleaning import load_image
from unclip.images import from_pil, resize, to_pil, to_rgb, to_tensor
from unclip.pipelines import UnCLIPPipeline
from unclip.training import precision


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("level,grey", [(1000, 4), (32768, 128), (65535, 255)])
def test_16_bit_pixels_are_read_as_0_to_65535_by_the_data_sets_and_the_pipeline_alike(level, grey):
    image = Image.fromarray(np.full((20, 20), level, np.uint16))  # a dark, a mid-grey and a white 16-bit image
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [grey] * 3  # a dark image stays dark, not stretched
    from_data, _ = load_image(_png(image), 20)
    given = from_pil(Image.open(io.BytesIO(_png(image))))[0]
    torch.testing.assert_close(given, from_data)
    torch.testing.assert_close(given, torch.full_like(given, grey / 127.5 - 1))


def test_transparency_goes_on_white_and_tensors_round_trip_through_pil():
    assert np.asarray(to_rgb(Image.new("LA", (4, 4), (0, 0))))[0, 0].tolist() == [255, 255, 255]
    array = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    tensor = to_tensor(array)
    assert tensor.shape == (3, 6, 5) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(to_pil(tensor[None])[0]), array)


def test_the_pipeline_and_its_clip_say_where_they_run_and_it_samples_in_bf16_only_where_native(monkeypatch):
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler])
    assert clip.device == pipe.device == torch.device("cpu")
    for native in (True, False):  # a CPU without native bf16 emulates it, several times slower than float32
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        with pipe.autocast():
            assert torch.is_autocast_enabled("cpu") is native
            assert not native or torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_resize_shrinks_by_block_means_and_grows_by_bicubic_kept_in_range():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    halved = resize(images, 4)
    assert halved.shape == (2, 3, 4, 4)
    torch.testing.assert_close(halved, images.unflatten(-1, (4, 2)).unflatten(-3, (4, 2)).mean(dim=(-3, -1)))
    assert resize(images, 8) is images  # already the size: untouched
    edge = torch.full((1, 3, 4, 4), -1.0)
    edge[..., 2:] = 1.0  # a hard black/white edge, where bicubic overshoots
    grown = resize(edge, 8)
    raw = torch.nn.functional.interpolate(edge, size=(8, 8), mode="bicubic", align_corners=False)
    assert raw.max() > 1 and raw.min() < -1
    torch.testing.assert_close(grown, raw.clamp(-1, 1))
    assert grown[..., :2].eq(-1).all() and grown[..., -2:].eq(1).all()


def _job_module(name: str):
    spec = importlib.util.spec_from_file_location(f"train_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_upsampler_is_conditioned_on_the_images_the_decoder_learns_to_make(monkeypatch):
    """A stage learns from what it will be given: the upsampler's low-resolution input in training is the decoder's
    training target for the same images (both 16 px from 32 px), so that it upsamples what the decoder makes."""
    clip, _, decoder, upsampler = micro_stages()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = {}
    monkeypatch.setattr(decoder, "training_loss", lambda target, *args, **kwargs: seen.setdefault("decoder", target))
    import unclip.decoder.upsampler as upsampler_module

    degrade = upsampler_module.degrade  # what the low-resolution input is made of, before its training corruption
    monkeypatch.setattr(upsampler_module, "degrade",
                        lambda low_res, *args, **kwargs: degrade(seen.setdefault("upsampler", low_res), *args, **kwargs))
    _job_module("decoder").DecoderLoss(clip)(decoder, {"image": images, "caption": ["a red circle"] * 2})
    upsampler.training_loss(images)
    assert seen["decoder"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen["upsampler"], seen["decoder"], rtol=0, atol=0)


def test_the_transformer_learns_the_tokens_of_images_resized_as_the_dvae_learnt_them(monkeypatch):
    from dalle_stages import dalle_stages

    dvae = dalle_stages()[1]
    images = torch.rand(2, 3, 2 * dvae.image_size, 2 * dvae.image_size) * 2 - 1
    seen = {}
    monkeypatch.setattr(dvae, "training_loss", lambda given, **kwargs: seen.setdefault("dvae", given))
    _job_module("dvae").dvae_loss(dvae, {"image": images})
    encode = dvae.encode
    monkeypatch.setattr(dvae, "encode", lambda given: encode(seen.setdefault("transformer", given)))
    _job_module("dalle").image_tokens(dvae, images)
    assert seen["dvae"].shape == (2, 3, dvae.image_size, dvae.image_size)
    torch.testing.assert_close(seen["transformer"], seen["dvae"], rtol=0, atol=0)
