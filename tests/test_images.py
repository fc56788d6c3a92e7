"""Image conversions in one place: one 16-bit rule for files read by the data sets and images given to the
pipeline, tensors <-> PIL, and the public devices of the pipeline and its CLIP."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from stages import micro_stages

from unclip.data.cleaning import load_image
from unclip.images import from_pil, to_pil, to_rgb, to_tensor
from unclip.pipelines import UnCLIPPipeline


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


def test_the_pipeline_and_its_clip_say_where_they_run():
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler])
    assert clip.device == pipe.device == torch.device("cpu")
    with pipe.autocast():
        assert torch.is_autocast_enabled("cpu")
