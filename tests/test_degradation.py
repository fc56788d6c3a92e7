"""The upsamplers' training corruptions of their low-resolution input (unclip.decoder.degradation)."""

import pytest
import torch

from unclip.data.shapes import ShapesDataset
from unclip.decoder.degradation import DEGRADATIONS, check_degradation, degrade


def scenes(n: int = 8, size: int = 32) -> torch.Tensor:
    data = ShapesDataset(split="val", length=n, image_size=size)
    return torch.stack([data[i]["image"] for i in range(n)])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(colours: torch.Tensor, size: int) -> torch.Tensor:
    return colours.view(-1, 3, 1, 1).expand(-1, 3, size, size).contiguous()


def checkerboard(n: int, size: int) -> torch.Tensor:
    rows = torch.arange(size)
    board = ((rows.view(-1, 1) + rows.view(1, -1)) % 2).float() * 1.6 - 0.8
    return board.expand(n, 3, size, size).contiguous()


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Per image: the mean square of the differences between neighbouring pixels."""
    across = (images[..., 1:] - images[..., :-1]).square().flatten(1).mean(1)
    down = (images[..., 1:, :] - images[..., :-1, :]).square().flatten(1).mean(1)
    return across + down


def test_none_gives_the_images_back_unchanged():
    images = scenes()
    assert torch.equal(degrade(images, "none", seeded()), images)


def test_blur_keeps_a_flat_image_flat_to_the_edge():
    colours = torch.tensor([[0.5, -0.3, 0.1], [-0.9, 0.9, 0.0]]).repeat(8, 1)
    out = degrade(flat(colours, 16), "blur", seeded())
    assert torch.allclose(out, flat(colours, 16), atol=1e-6)


def test_blur_takes_the_high_frequencies_out_of_a_checkerboard():
    board = checkerboard(16, 32)
    out = degrade(board, "blur", seeded())
    before, after = high_frequency_energy(board), high_frequency_energy(out)
    assert (after <= before + 1e-6).all()
    assert after.mean() < 0.8 * before.mean()
    # the images that were blurred (about half) lost at least half of it: sigma >= 0.4 px damps the finest pattern
    blurred = after < before - 1e-6
    assert blurred.sum() >= 4 and (after[blurred] < 0.5 * before[blurred]).all()


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_each_image_of_a_batch_gets_its_own_draw(kind):
    copies = scenes(1).expand(8, -1, -1, -1).contiguous()
    out = degrade(copies, kind, seeded())
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) >= 4, f"8 copies of one scene gave {len(distinct)} different {kind} corruptions"


@pytest.mark.parametrize("size", [16, 32, 64])
def test_bsr_changes_every_image_and_stays_in_range(size):
    images = scenes(8, size)
    out = degrade(images, "bsr", seeded())
    assert out.min() >= -1 and out.max() <= 1
    assert ((out - images).abs().flatten(1).amax(1) > 0.02).all()


def test_bsr_keeps_the_mean_colour_of_a_flat_image():
    """Blur and resizing keep a flat image flat; the noise is zero-mean (its mean over >= 256 pixels is under a
    level of 255); JPEG moves a flat colour by up to about 3 levels (8-bit YCbCr rounding, DC quantisation at
    quality >= 70). So 0.04 on the [-1, 1] scale: 5 levels of 255."""
    colours = torch.rand(32, 3, generator=seeded(1)) * 1.6 - 0.8
    for size in (16, 64):
        out = degrade(flat(colours, size), "bsr", seeded(2))
        assert (out.mean(dim=(2, 3)) - colours).abs().max() < 0.04
        assert (out != flat(colours, size)).any()


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_a_seeded_generator_repeats_the_corruption_and_another_seed_does_not(kind):
    images = scenes()
    first = degrade(images, kind, seeded(3))
    assert torch.equal(first, degrade(images, kind, seeded(3)))
    assert not torch.equal(first, degrade(images, kind, seeded(4)))


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_draws_come_from_the_generator_only(kind):
    images = scenes()
    torch.manual_seed(0)
    first = degrade(images, kind, seeded(3))
    torch.manual_seed(1)
    assert torch.equal(first, degrade(images, kind, seeded(3)))


@pytest.mark.parametrize("kind", DEGRADATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_shape_and_device_are_kept_and_the_input_is_not_touched(kind, dtype):
    images = scenes(4, 16).to(dtype)
    kept = images.clone()
    out = degrade(images, kind, seeded())
    assert out.dtype == dtype and out.shape == images.shape and out.device == images.device
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(images, kept)


def test_an_unknown_degradation_names_itself_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown degradation 'jpeg': upsampler.degradation must be one of "
                                         r"none, blur, bsr"):
        check_degradation("jpeg")
    with pytest.raises(ValueError, match="unknown degradation 'Blur'"):
        degrade(scenes(1), "Blur")
    assert check_degradation("bsr") == "bsr"
