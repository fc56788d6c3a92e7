"""Bad values a user hands the pipeline, and damaged files it loads: each is refused before any work, with an error
naming the value (and the file), or a documented behaviour (large requests run in chunks; NaN weights warn)."""

import json
import re
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from stages import save_micro_pipeline

from unclip.checkpoint import MANIFEST, load_stage, write_manifest
from unclip.pipelines import UnCLIPPipeline
from unclip.weights import CheckpointError

FAST = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2)
RED = Image.new("RGB", (32, 32), "red")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_micro_pipeline(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def pipe(stages):
    return UnCLIPPipeline.from_pretrained(**stages, device="cpu")


@pytest.mark.parametrize("call,error,message", [
    (lambda p: p.generate(None), TypeError, "prompts must be a string or a list of strings, got None"),
    (lambda p: p.generate(5), TypeError, "prompts must be a string or a list of strings, got 5"),
    (lambda p: p.generate("a", negative_prompt=5), TypeError,
     "negative_prompt must be a string or a list of strings, got 5"),
    (lambda p: p.variations(RED, negative_prompt=""), ValueError,
     "every prompt must be a non-empty string, got '' (negative_prompt)"),
    (lambda p: p.generate("a", 1.5), ValueError, "num_images_per_prompt must be a whole number >= 1, got 1.5"),
    (lambda p: p.generate("a", 0), ValueError, "num_images_per_prompt must be a whole number >= 1, got 0"),
    (lambda p: p.generate("a", rerank=0), ValueError, "rerank must be a whole number >= 1, got 0"),
    (lambda p: p.generate("a", seed=2**64), ValueError,
     "seed must be a whole number from -2**63 to 2**64 - 1, got 18446744073709551616"),
    (lambda p: p.generate("a", seed=1.0), ValueError, "seed must be a whole number from -2**63 to 2**64 - 1, got 1.0"),
    (lambda p: p.generate("a", output="bogus"), ValueError, "output must be one of ('pil', 'tensor'), got 'bogus'"),
    (lambda p: p.text_diff(RED, "a", "b", amounts=()), ValueError,
     "amounts must be a non-empty list of numbers in [0, 1], got []"),
    (lambda p: p.text_diff(RED, "a", "b", amounts=(0.5, 5)), ValueError,
     "every amount must be a number in [0, 1] (0: the image, 1: the text difference), got 5 in [0.5, 5]"),
    (lambda p: p.text_diff(RED, "a", "b", amounts=(float("nan"),)), ValueError, "every amount must be a number in"),
    (lambda p: p.variations(Image.new("RGB", (0, 0))), ValueError,
     "an input image is 0x0 pixels; give an image with pixels"),
    (lambda p: p.img2img(Image.new("RGB", (0, 5)), "a"), ValueError, "an input image is 0x5 pixels"),
    (lambda p: p.variations(torch.full((1, 3, 32, 32), float("nan"))), ValueError,
     "the image tensor holds NaN or infinite values (3072 of 3072); give finite values"),
    (lambda p: p.decode(torch.full((1, 32), float("nan"))), ValueError, "image_embeds holds NaN or infinite values"),
    (lambda p: p.inpaint(RED, torch.full((32, 32), float("nan")), "a"), ValueError, "the mask holds NaN"),
    (lambda p: p.generate("a", negative_image_embed=torch.zeros(32)), ValueError,
     "negative_image_embed has an all-zero row, which has no direction"),
    (lambda p: p.variations(RED, 1.5), ValueError, "n must be a whole number >= 1, got 1.5"),
    (lambda p: p.mix([("a", 1.0)], 2.0), ValueError, "n must be a whole number >= 1, got 2.0"),
    (lambda p: p.interpolate(RED, RED, 2.5), ValueError, "steps must be a whole number >= 1, got 2.5"),
    (lambda p: p.img2img(RED, "a", 0.5, n=0), ValueError, "n must be a whole number >= 1, got 0"),
])
def test_bad_values_are_refused_before_any_work_naming_the_value(pipe, call, error, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the decoder ran for a bad request")

    monkeypatch.setattr(pipe.decoder, "sample", no_work)
    with pytest.raises(error, match=re.escape(message)):
        call(pipe)


def test_ten_thousand_images_run_in_chunks_and_the_first_chunk_is_a_smaller_requests_images(pipe, monkeypatch):
    small = pipe.generate("a red circle", 3, seed=5, output="tensor", max_batch=3, **FAST)
    batches = []
    sample = pipe.decoder.sample

    def counting(image_embed, *args, **kwargs):
        batches.append(len(image_embed))
        return sample(image_embed, *args, **kwargs)

    monkeypatch.setattr(pipe.decoder, "sample", counting)
    images = pipe.generate(["a red circle", "a blue square"], 4, seed=5, output="tensor", max_batch=3, **FAST)
    assert batches == [3, 3, 2] and images.shape == (8, 3, 32, 32)
    torch.testing.assert_close(images[:3], small, rtol=0, atol=0)
    batches.clear()
    ranked = pipe.generate("a red circle", 2, seed=5, rerank=2, max_batch=3, **FAST)
    assert batches == [2, 2] and len(ranked) == 2  # a chunk holds whole candidate groups

    monkeypatch.setattr(pipe.decoder, "sample", lambda image_embed, *a, **k: batches.append(len(image_embed)) or
                        torch.zeros(len(image_embed), 3, 16, 16))
    monkeypatch.setattr(pipe, "upsamplers", [])
    batches.clear()
    assert len(pipe.generate("a red circle", 10_000, **FAST)) == 10_000
    assert max(batches) == 64 and sum(batches) == 10_000  # settings.max_batch, 64 by default


MASK = Image.new("L", (32, 32))
MASK.paste(255, (8, 8, 24, 24))


@pytest.mark.parametrize("call", [
    lambda p: p.variations(RED, 10_000),
    lambda p: p.variations(RED, 10_000, strength=0.5, negative_prompt="a blue square"),
    lambda p: p.img2img(RED, "a red circle", 0.5, n=10_000),
    lambda p: p.inpaint(RED, MASK, "a blue square", n=10_000),
    lambda p: p.inpaint(RED, MASK, n=10_000),  # removal: the fill follows the image's surroundings
    lambda p: p.mix([(RED, 0.5), ("a blue square", 0.5)], 10_000),
    lambda p: p.decode(torch.nn.functional.normalize(torch.randn(10_000, 32), dim=-1)),
    lambda p: p.interpolate(RED, Image.new("RGB", (32, 32), "blue"), 10_000),
    lambda p: p.text_diff(RED, "a red circle", "a blue circle", amounts=[i / 9_999 for i in range(10_000)]),
], ids=["variations", "variations-strength-negative", "img2img", "inpaint", "inpaint-remove", "mix", "decode",
        "interpolate", "text_diff"])
def test_ten_thousand_images_from_every_method_are_made_in_chunks_of_max_batch(pipe, monkeypatch, call):
    made = {"prior": [], "decoder": [], "upsampler": []}

    def prior(text, *args, **kwargs):
        made["prior"].append(len(text))
        return torch.nn.functional.normalize(torch.randn(len(text), 32), dim=-1)

    def stage(name, size):
        def sample(batch, *args, **kwargs):
            made[name].append(len(batch))
            return torch.zeros(len(batch), 3, size, size)
        return sample

    monkeypatch.setattr(pipe.prior, "sample", prior)
    monkeypatch.setattr(pipe.decoder, "sample", stage("decoder", pipe.decoder.image_size))
    for upsampler in pipe.upsamplers:
        monkeypatch.setattr(upsampler, "sample", stage("upsampler", upsampler.image_size))
    images = call(pipe)
    assert len(images) == 10_000
    assert max(made["decoder"]) == 64 and sum(made["decoder"]) == 10_000, made["decoder"][:5]
    assert max(made["upsampler"]) == 64 and sum(made["upsampler"]) == 10_000 * len(pipe.upsamplers)
    assert max(made["prior"], default=0) <= 64


@pytest.mark.parametrize("text,message", [
    ("{", r"pipeline.json is damaged, not JSON \(.*\); save the pipeline again"),
    ("{}", r"pipeline.json is not a pipeline file: expected an object with 'stages' .*, got \{\}"),
    ("[]", r"pipeline.json is not a pipeline file: expected an object with 'stages'"),
    ('{"stages": {"clip": "clip", "prior": "prior", "decoder": "decoder"}, "stagez": 1}',
     r"pipeline.json is not a pipeline file: .*stagez"),
    ('{"stages": {"clip": "clip", "prior": "prior", "decoder": "decoder"}, "settings": {"decoder_stepz": 3}}',
     r"pipeline.json has unknown settings \['decoder_stepz'\]; known: "),
])
def test_a_damaged_pipeline_file_is_an_error_naming_it(pipe, tmp_path, text, message):
    saved = pipe.save_pretrained(tmp_path / "pipeline")
    (saved / "pipeline.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"{saved}/{message}"):
        UnCLIPPipeline.from_pretrained(saved, device="cpu")


def test_nan_weights_load_with_a_warning_naming_the_file_and_tensor(stages, tmp_path):
    import shutil

    decoder = tmp_path / "decoder"
    shutil.copytree(stages["decoder"], decoder)
    state = load_file(decoder / "model.safetensors")
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, decoder / "model.safetensors")
    write_manifest(decoder)  # as a run that trained into NaN saved it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        UnCLIPPipeline.from_pretrained(**{**stages, "decoder": decoder}, device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(f"{decoder / 'model.safetensors'} holds NaN or infinite values in 1 tensor(s) ({name})" in m
               for m in messages), messages
    assert json.loads((decoder / "config.json").read_text())["stage"] == "decoder"


def _damage(path):
    """One byte of a tensor changed: the file is still valid safetensors of the same size."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_weights_file_in_a_saved_pipeline_or_stage_is_named_not_loaded(pipe, stages, tmp_path):
    saved = pipe.save_pretrained(tmp_path / "pipeline")
    weights = saved / "decoder" / "model.safetensors"
    _damage(weights)
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot load {saved / 'decoder'}, it is damaged: {weights} is changed since it was written (its sha256 differs). Use "
            f"an intact copy instead: an earlier checkpoint of its run (write its name into the run's "
            f"checkpoints/latest), or save the pipeline again from its stages")):
        UnCLIPPipeline.from_pretrained(saved, device="cpu")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is 100 bytes where")):
        load_stage(saved / "decoder")
    (saved / "decoder" / MANIFEST).unlink()  # as saved before manifests existed: loaded as it is
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {weights} is damaged or not safetensors")):
        load_stage(saved / "decoder")
    _damage(stages["prior"] / "model.safetensors")  # a source stage damaged after it was loaded: not copied
    try:
        with pytest.raises(CheckpointError, match=re.escape(f"cannot copy {stages['prior']} into a saved pipeline, it is damaged: "
                                                            f"{stages['prior'] / 'model.safetensors'} is changed")):
            pipe.save_pretrained(tmp_path / "copy")
    finally:
        _damage(stages["prior"] / "model.safetensors")  # undone: the byte flipped back
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("text", ["{", '{"files": []}', "[]"])
def test_a_damaged_manifest_names_itself_and_the_way_out_and_deleting_it_loads_the_stage(pipe, tmp_path, text):
    saved = pipe.save_pretrained(tmp_path / "pipeline")
    manifest = saved / "decoder" / MANIFEST
    manifest.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(f"{manifest} is damaged (") + r".*" + re.escape(
            f"so the checkpoint cannot be verified; delete {manifest} to load its files unverified (as from a "
            "checkpoint saved before manifests existed), or use an earlier checkpoint")):
        UnCLIPPipeline.from_pretrained(saved, device="cpu")
    manifest.unlink()
    assert UnCLIPPipeline.from_pretrained(saved, device="cpu").sources["decoder"] == saved / "decoder"
