"""The decoder and upsampler stages' editing: the inpainting decoder, its training masks, RePaint in the stages,
negatives and image-to-image."""

from __future__ import annotations

import pytest
import torch
from stages import enliven, micro_stages

from unclip.data.shapes import ShapesDataset
from unclip.decoder.inpainting import (
    DEFAULT_MASK_MIX,
    inpainting_decoder_from,
    object_box,
    random_keep_masks,
)
from unclip.diffusion import Inpainting
from unclip.masks import keep_at


@pytest.fixture(scope="module")
def lively():
    clip, _, decoder, upsampler = micro_stages()
    return clip, enliven(decoder, 1).eval(), enliven(upsampler, 2).eval()


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_an_inpainting_decoder_starts_as_exactly_the_decoder_it_comes_from(lively):
    clip, decoder, _ = lively
    inpainter = inpainting_decoder_from(decoder).eval()
    assert inpainter.inpaints and inpainter.config["inpaint"] and inpainter.unet.input_conv.weight.shape[1] == 7
    torch.manual_seed(0)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 20, 45])
    embed = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    context, mask, pooled = decoder._caption_context(clip.encode_text(["a red circle", "a blue square", "a dot"]))
    inputs = dict(image_embed=embed, context=context, context_mask=mask, pooled_context=pooled)
    with torch.no_grad():
        plain = decoder.unet(x, t, **inputs)
        for masked_image, keep in ((torch.randn(3, 3, 16, 16), (torch.rand(3, 1, 16, 16) > 0.5).float()),
                                   (torch.zeros(3, 3, 16, 16), torch.zeros(3, 1, 16, 16))):
            torch.testing.assert_close(inpainter.unet(x, t, masked_image=masked_image, mask=keep, **inputs), plain,
                                       atol=1e-6, rtol=0)
    assert plain.abs().mean() > 1e-3  # the enlivened decoder's output is not trivially zero
    # and it trains: the new channels get gradients
    loss = inpainter.training_loss(x.clamp(-1, 1), embed, metas=[{}] * 3)["loss"]
    loss.backward()
    assert inpainter.unet.input_conv.weight.grad[:, 3:].abs().sum() > 0


def test_an_inpainting_decoder_needs_a_mask_and_a_plain_one_takes_none(lively):
    _, decoder, _ = lively
    inpainter = inpainting_decoder_from(decoder)
    embed = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    with pytest.raises(ValueError, match=r"this is an inpainting decoder: it needs the known image and a keep mask"):
        inpainter.sample(embed, steps=2)
    with pytest.raises(ValueError, match=r"this decoder does not inpaint"):
        decoder.training_loss(torch.zeros(2, 3, 16, 16), embed, keep=torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"inpaint needs known \[B, 3, S, S\] = \[2, 3, 16, 16\]"):
        decoder.sample(embed, steps=2, inpaint=Inpainting(torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8)))
    config = {key: value for key, value in decoder.config.items() if key != "_target_"}
    with pytest.raises(ValueError, match="unknown mask kinds"):
        type(decoder)(**config, inpaint=True, mask_mix={"square": 1.0})


@pytest.mark.parametrize("inpainting_decoder", [False, True], ids=["repaint", "inpainting-decoder"])
def test_decoder_inpainting_keeps_the_known_part_and_follows_the_seed(lively, inpainting_decoder):
    _, decoder, _ = lively
    decoder = inpainting_decoder_from(decoder).eval() if inpainting_decoder else decoder
    embed = torch.nn.functional.normalize(torch.randn(2, 32, generator=_generator(1)), dim=-1)
    known = torch.rand(2, 3, 16, 16, generator=_generator(2)) * 2 - 1
    keep = torch.ones(2, 1, 16, 16)
    keep[:, :, 4:12, 4:12] = 0
    inpaint = Inpainting(known, keep, jumps=1)

    def run(seed):
        return decoder.sample(embed, steps=4, inpaint=inpaint, eta=1.0, generator=_generator(seed))

    out = run(0)
    assert torch.equal(out * keep, known * keep)
    assert (out - known)[:, :, 4:12, 4:12].abs().mean() > 0.05  # filled, not copied
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))


def test_upsampler_inpainting_keeps_the_known_image_at_its_size(lively):
    _, _, upsampler = lively
    known = torch.rand(2, 3, 32, 32, generator=_generator(3)) * 2 - 1
    keep = keep_at(torch.tensor([1.0, 0.0]).repeat_interleave(8)[None, None, :, None].expand(2, 1, 16, 16), 32)
    low = torch.rand(2, 3, 16, 16, generator=_generator(4)) * 2 - 1
    out = upsampler.sample(low, steps=3, generator=_generator(0), inpaint=Inpainting(known, keep))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out * keep, known * keep, atol=1e-5, rtol=0)
    assert not torch.allclose(out * (1 - keep), known * (1 - keep))


def test_negatives_and_init_images_steer_the_decoder(lively):
    clip, decoder, _ = lively
    embed = torch.nn.functional.normalize(torch.randn(2, 32, generator=_generator(1)), dim=-1)
    negative = torch.nn.functional.normalize(torch.randn(2, 32, generator=_generator(2)), dim=-1)
    text = clip.encode_text(["a red circle", "a blue square"])

    def run(**kwargs):
        return decoder.sample(embed, steps=4, guidance_scale=3.0, generator=_generator(0), **kwargs)

    plain = run(text=text)
    steered = run(text=text, negative_embed=negative)
    assert not torch.allclose(plain, steered) and torch.equal(steered, run(text=text, negative_embed=negative))
    both = run(text=text, negative_embed=negative, negative_text=clip.encode_text(["red", "red"]))
    assert not torch.allclose(both, steered)
    assert run(negative_text=clip.encode_text(["red", "red"])).shape == (2, 3, 16, 16)  # no caption, a negative one
    with pytest.raises(ValueError, match=r"3 negative image embeddings for 2"):
        run(negative_embed=torch.randn(3, 32))
    image = torch.rand(2, 3, 16, 16, generator=_generator(5)) * 2 - 1
    assert torch.equal(run(init_image=image, strength=0.0), image)
    assert torch.equal(run(init_image=image, strength=1.0), run())  # strength 1: plain sampling, same draws
    near, far = ((run(init_image=image, strength=s) - image).abs().mean() for s in (0.2, 1.0))
    assert near < far


def test_random_masks_cover_boxes_blobs_objects_and_everything():
    data = ShapesDataset(split="val", length=16, image_size=32)
    items = [data[i] for i in range(16)]
    metas = [item["meta"] for item in items]
    only_objects = random_keep_masks(16, 32, metas, mix={"object": 1.0}, seed=0)
    assert only_objects.shape == (16, 1, 32, 32) and set(only_objects.unique().tolist()) <= {0.0, 1.0}
    for item, keep in zip(items, only_objects):  # the whole object lies in the fill: no ink is kept
        ink = (item["image"] < 0.9).any(0)
        assert not (ink & (keep[0] == 1)).any()
        x0, y0, x1, y1 = object_box(item["meta"]["objects"][0])
        assert (1 - keep).mean() <= (x1 - x0) * (y1 - y0) + 0.05
    assert torch.equal(random_keep_masks(4, 16, mix={"everything": 1.0}, seed=0), torch.zeros(4, 1, 16, 16))
    mixed = random_keep_masks(64, 32, metas * 4, seed=1)
    fill_share = (1 - mixed).mean((1, 2, 3))
    assert ((fill_share > 0) & (fill_share < 1)).float().mean() > 0.6  # mostly partial masks ...
    assert (fill_share == 1).any()  # ... and some whole-image ones (DEFAULT_MASK_MIX["everything"])
    assert torch.equal(mixed, random_keep_masks(64, 32, metas * 4, seed=1))
    assert DEFAULT_MASK_MIX["object"] > 0 and random_keep_masks(2, 16, None, mix={"object": 1.0}, seed=0).min() == 0
    with pytest.raises(ValueError, match="positive sum"):
        random_keep_masks(2, 16, mix={"box": 0.0})


def test_object_masks_take_the_box_the_data_set_writes_and_say_when_there_is_none():
    meta = ShapesDataset(split="val", length=1, image_size=32)[0]["meta"]["objects"][0]
    assert meta["box"][2] - meta["box"][0] == pytest.approx({"small": 0.25, "large": 0.5}[meta["size"]])  # its side
    assert object_box({"box": [0.25, 0.25, 0.5, 0.75]}) == pytest.approx((0.19, 0.19, 0.56, 0.81))
    with pytest.raises(ValueError, match=r"needs its 'box' \[x0, y0, x1, y1\].*got the keys \['centre', 'size'\]"
                                         r".*'object' weight to 0"):
        random_keep_masks(1, 16, [{"objects": [{"centre": [0.5, 0.5], "size": "small"}]}], mix={"object": 1.0})


def test_keep_masks_shrink_to_cover_every_partly_filled_pixel_and_grow_by_repeating():
    keep = torch.ones(1, 1, 8, 8)
    keep[0, 0, 3, 5] = 0  # one filled pixel
    small = keep_at(keep, 4)
    assert small[0, 0, 1, 2] == 0 and small.sum() == 15
    assert torch.equal(keep_at(small, 8)[0, 0, 2:4, 4:6], torch.zeros(2, 2))
    assert keep_at(keep, 8) is keep
