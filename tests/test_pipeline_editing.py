"""UnCLIPPipeline's editing calls (inpaint, img2img, variations' strength, mix, negatives) on tiny real stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from stages import save_lively_pipeline

from unclip.checkpoint import load_stage, save_stage
from unclip.decoder.inpainting import inpainting_decoder_from
from unclip.pipelines import UnCLIPPipeline

FAST = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_lively_pipeline(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def pipe(stages):
    return UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                          upsamplers=stages["upsamplers"], device="cpu")


@pytest.fixture(scope="module")
def scene():
    """A 32-px red circle on white and a mask (white = paint) over its right half."""
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=(220, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((16, 4, 27, 27), fill=255)
    return image, mask


def _arrays(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _outside(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask)[None, :, :, None] < 128


def test_inpaint_keeps_the_image_outside_the_mask_exactly_and_follows_the_seed(pipe, scene):
    image, mask = scene
    out = pipe.inpaint(image, mask, "a blue square", n=2, seed=0, jumps=1, **FAST)
    assert len(out) == 2 and all(o.size == (32, 32) for o in out)
    diff = np.abs(_arrays(out) - _arrays([image, image]))
    assert diff[np.broadcast_to(_outside(mask), diff.shape)].max() <= 2  # <= 2/255 (it is 0)
    assert diff[np.broadcast_to(~_outside(mask), diff.shape)].mean() > 5  # the hole was painted
    again = pipe.inpaint(image, mask, "a blue square", n=2, seed=0, jumps=1, **FAST)
    other = pipe.inpaint(image, mask, "a blue square", n=2, seed=1, jumps=1, **FAST)
    assert np.array_equal(_arrays(out), _arrays(again)) and not np.array_equal(_arrays(out), _arrays(other))
    assert not np.array_equal(_arrays(out)[0], _arrays(out)[1])  # n results differ


def test_inpaint_conditions_on_a_prompt_an_embedding_or_the_surroundings(pipe, scene):
    image, mask = scene
    embed = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    results = [pipe.inpaint(image, mask, seed=0, jumps=0, **kwargs, **FAST)[0]
               for kwargs in ({"prompt": "a blue square"}, {"image_embed": embed}, {})]
    arrays = _arrays(results)
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])


def test_inpaint_takes_batches_masks_of_other_sizes_and_images_of_other_modes(pipe, scene):
    image, mask = scene
    big_mask = mask.resize((64, 64), Image.NEAREST)  # another size: resized to the image's
    out = pipe.inpaint([image, image.convert("P")], big_mask, ["a blue square", "a green circle"], seed=0, jumps=0,
                       **FAST)
    assert len(out) == 2
    diff = np.abs(_arrays(out) - _arrays([image, image.convert("P").convert("RGB")]))
    assert diff[np.broadcast_to(_outside(mask), diff.shape)].max() <= 2
    tensor_mask = torch.from_numpy(np.asarray(mask) > 127).float()  # [H, W], 1 = paint
    via_tensor = pipe.inpaint(image, tensor_mask, "a blue square", seed=0, jumps=0, **FAST)
    via_big_mask = pipe.inpaint(image, big_mask, "a blue square", seed=0, jumps=0, **FAST)
    assert np.array_equal(_arrays(via_tensor), _arrays(via_big_mask))


def test_inpaint_with_nothing_or_everything_to_paint(pipe, scene):
    image, _ = scene
    black, white = Image.new("L", (32, 32), 0), Image.new("L", (32, 32), 255)
    kept = pipe.inpaint(image, black, "a blue square", n=2, seed=0, **FAST)
    assert np.array_equal(_arrays(kept), _arrays([image, image]))
    generated = pipe.inpaint(image, white, "a blue square", n=2, seed=3, **FAST)
    assert np.array_equal(_arrays(generated), _arrays(pipe.generate("a blue square", 2, seed=3, **FAST)))


def test_inpaint_bad_input_is_a_clear_error(pipe, scene):
    image, mask = scene
    with pytest.raises(ValueError, match=r"single-channel image .* got mode RGB; convert it with mask.convert\('L'\)"):
        pipe.inpaint(image, mask.convert("RGB"), "a blue square", **FAST)
    with pytest.raises(ValueError, match=r"single channel .* got \[3, 32, 32\]"):
        pipe.inpaint(image, torch.ones(3, 32, 32), "a blue square", **FAST)
    with pytest.raises(TypeError, match="mask must be a PIL image"):
        pipe.inpaint(image, None, "a blue square", **FAST)
    with pytest.raises(ValueError, match="2 masks for 1 images"):
        pipe.inpaint(image, [mask, mask], "a blue square", **FAST)
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        pipe.inpaint(image, mask, ["a", "b"], **FAST)
    with pytest.raises(ValueError, match="jumps must be an int >= 0"):
        pipe.inpaint(image, mask, "a blue square", jumps=-1, **FAST)
    with pytest.raises(ValueError, match=r"image tensors must be float \[B, 3, H, W\]"):
        pipe.inpaint(torch.zeros(1, 1, 32, 32), mask, "a blue square", **FAST)


def test_a_pipeline_with_an_inpainting_decoder_inpaints_with_it_and_still_generates(stages, pipe, scene, tmp_path):
    image, mask = scene
    decoder = load_stage(stages["decoder"], stage="decoder")
    inpainter = save_stage(tmp_path / "inpainter", inpainting_decoder_from(decoder.model), stage="decoder",
                           space=decoder.space)
    with_inpainter = UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=inpainter,
                                                    upsamplers=stages["upsamplers"], device="cpu")
    assert with_inpainter.decoder.inpaints
    out = with_inpainter.inpaint(image, mask, "a blue square", seed=0, **FAST)
    diff = np.abs(_arrays(out) - _arrays([image]))
    assert diff[np.broadcast_to(_outside(mask), diff.shape)].max() <= 2
    # zero-initialised: with no jumps, the images of RePaint with the plain decoder (to bf16 rounding)
    tensors = [p.inpaint(image, mask, "a blue square", seed=0, jumps=0, output="tensor", **FAST)
               for p in (with_inpainter, pipe)]
    assert (tensors[0] - tensors[1]).abs().mean() < 0.01
    assert len(with_inpainter.generate("a red circle", seed=0, **FAST)) == 1  # fills everything
    with pytest.raises(ValueError, match="img2img and strength < 1 need a plain decoder"):
        with_inpainter.img2img(image, "a blue square", 0.5, **FAST)


def test_img2img_strength_moves_from_the_image_to_the_prompt(pipe, scene):
    image, _ = scene
    assert np.array_equal(_arrays(pipe.img2img(image, "a blue square", 0.0, n=2, **FAST)), _arrays([image, image]))
    distance = {}
    for strength in (0.35, 1.0):
        out = pipe.img2img(image, "a blue square", strength, seed=0, decoder_steps=6, upsampler_steps=2, prior_steps=3)
        distance[strength] = np.abs(_arrays(out)[0] - _arrays([image])[0]).mean()
    assert distance[0.35] < distance[1.0]
    a = pipe.img2img([image, image], "a blue square", 0.5, seed=2, **FAST)
    assert len(a) == 2 and np.array_equal(_arrays(a), _arrays(pipe.img2img([image, image], "a blue square", 0.5,
                                                                            seed=2, **FAST)))
    for bad in (-0.1, 1.01, "half"):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            pipe.img2img(image, "a blue square", bad, **FAST)


def test_variations_take_a_strength(pipe, scene):
    image, _ = scene
    full = pipe.variations(image, n=2, seed=0, **FAST)
    assert np.array_equal(_arrays(full), _arrays(pipe.variations(image, n=2, seed=0, strength=1.0, **FAST)))
    near = pipe.variations(image, n=2, seed=0, strength=0.3, **FAST)
    assert len(near) == 2 and not np.array_equal(_arrays(near), _arrays(full))
    assert np.array_equal(_arrays(near), _arrays(pipe.variations(image, n=2, seed=0, strength=0.3, **FAST)))
    with pytest.raises(ValueError, match="strength must be"):
        pipe.variations(image, strength=2.0, **FAST)


def test_mix_weights_embeddings_and_refuses_a_zero_sum(pipe, scene):
    image, _ = scene
    alone = pipe.mix([(image, 1.0), ("a blue square", 0.0)], seed=0, **FAST)
    with pipe.autocast():  # as mix encodes it
        embed = pipe.clip.encode_image(pipe._images_in(image)).float()
    torch.testing.assert_close(pipe.mix([(image, 2.0)], seed=0, output="tensor", **FAST),
                               pipe.decode(embed, seed=0, output="tensor", **FAST), atol=1e-4, rtol=0)
    half = pipe.mix([(image, 0.5), ("a blue square", 0.5)], seed=0, **FAST)
    text_only = pipe.mix([(image, 0.0), ("a blue square", 1.0)], seed=0, **FAST)
    assert len({_arrays(x).tobytes() for x in (alone, half, text_only)}) == 3
    assert np.array_equal(_arrays(half), _arrays(pipe.mix([(image, 0.5), ("a blue square", 0.5)], seed=0, **FAST)))
    with pytest.raises(ValueError, match=r"weights sum to zero \(\[1.0, -1.0\]\)"):
        pipe.mix([(image, 1.0), ("a blue square", -1.0)], **FAST)
    with pytest.raises(ValueError, match=r"non-empty list of \(image_or_text, weight\) pairs"):
        pipe.mix([image], **FAST)
    with pytest.raises(ValueError, match="every weight must be a finite number"):
        pipe.mix([(image, float("nan"))], **FAST)


def test_negative_prompts_and_embeddings_change_the_images_reproducibly(pipe, scene):
    image, _ = scene
    plain = pipe.generate("a circle", 2, seed=0, **FAST)
    negative = pipe.generate("a circle", 2, seed=0, negative_prompt="red", **FAST)
    assert not np.array_equal(_arrays(plain), _arrays(negative))
    assert np.array_equal(_arrays(negative), _arrays(pipe.generate("a circle", 2, seed=0, negative_prompt="red",
                                                                   **FAST)))
    guided_prior = pipe.generate("a circle", 2, seed=0, negative_prompt="red", prior_guidance=2.0, **FAST)
    assert not np.array_equal(_arrays(guided_prior), _arrays(negative))
    embed = torch.nn.functional.normalize(torch.randn(32), dim=0)
    for call in (lambda **k: pipe.variations(image, n=2, seed=0, **k, **FAST),
                 lambda **k: pipe.img2img(image, "a blue square", 0.6, seed=0, **k, **FAST),
                 lambda **k: pipe.inpaint(image, scene[1], "a blue square", seed=0, jumps=0, **k, **FAST)):
        assert not np.array_equal(_arrays(call()), _arrays(call(negative_image_embed=embed)))
        assert not np.array_equal(_arrays(call()), _arrays(call(negative_prompt="red")))
    with pytest.raises(ValueError, match=r"negative_image_embed must be a tensor \[D\], \[1, D\] or \[N, D\] with D = 32"):
        pipe.generate("a circle", negative_image_embed=torch.randn(31), **FAST)
