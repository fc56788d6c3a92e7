"""Bad values a user hands the pipeline, and damaged files it loads: each is refused before any work, with an error
naming the value (and the file), or a documented behaviour (large requests run in chunks; NaN weights warn)."""

import json
import re
import warnings

import numpy as np
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


BLACK, WHITE = Image.new("L", (32, 32), 0), Image.new("L", (32, 32), 255)  # keep everything / paint everything
NAN_MASK = Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F")


@pytest.mark.parametrize("call,error,message", [
    # img2img at strength 0 and inpaint with an all-black or all-white mask return early: every argument first
    (lambda p: p.img2img(RED, "a", 0.0, seed=1.5), ValueError, "seed must be a whole number from -2**63"),
    (lambda p: p.img2img(RED, "a", 0.0, output="bogus"), ValueError, "output must be one of ('pil', 'tensor')"),
    (lambda p: p.img2img(RED, "a", 0.0, decoder_steps=0), ValueError, "decoder_steps must be an int >= 1, got 0"),
    (lambda p: p.img2img(RED, "a", 0.0, negative_prompt="\x00"), ValueError,
     "the prompt '\\x00' (negative_prompt) has no words the CLIP's tokenizer keeps"),
    (lambda p: p.img2img(RED, "a", 0.0, negative_image_embed=torch.zeros(32)), ValueError,
     "negative_image_embed has an all-zero row"),
    (lambda p: p.img2img(RED, "\x01", 0.0), ValueError, "the prompt '\\x01' (prompt) has no words"),
    (lambda p: p.inpaint(RED, BLACK, "a", seed=1.5), ValueError, "seed must be a whole number from -2**63"),
    (lambda p: p.inpaint(RED, BLACK, "a", jumps=-1), ValueError, "jumps must be an int >= 0, got -1"),
    (lambda p: p.inpaint(RED, BLACK, jump_length=0), ValueError, "jump_length must be an int >= 1, got 0"),
    (lambda p: p.inpaint(RED, BLACK, eta=-1), ValueError, "eta must be a finite number >= 0, got -1"),
    (lambda p: p.inpaint(RED, BLACK, "a", decoder_stepz=3), TypeError, "unknown generation settings ['decoder_stepz']"),
    (lambda p: p.inpaint(RED, BLACK, image_embed=torch.zeros(32)), ValueError, "image_embed has an all-zero row"),
    (lambda p: p.inpaint(RED, BLACK, "a", negative_prompt=" "), ValueError, "every prompt must be a non-empty string"),
    (lambda p: p.inpaint(RED, WHITE, "a", jumps=-1), ValueError, "jumps must be an int >= 0, got -1"),
    (lambda p: p.inpaint(RED, WHITE, "a", output="bogus"), ValueError, "output must be one of ('pil', 'tensor')"),
    # masks that say nothing are not "keep everything"
    (lambda p: p.inpaint(RED, Image.new("L", (0, 0)), "a"), ValueError, "the mask is 0x0 pixels, which says nothing"),
    (lambda p: p.inpaint(RED, torch.zeros(0, 0), "a"), ValueError, "the mask tensor is empty ([0, 0])"),
    (lambda p: p.inpaint(RED, NAN_MASK, "a"), ValueError, "the mask (mode F) holds NaN or infinite values (1024 of"),
    # weights whose weighted sum overflows would decode a black image
    (lambda p: p.mix([("a red circle", 1e38), (RED, 1e38)], **FAST), ValueError,
     "the weighted sum of the embeddings overflows (weights [1e+38, 1e+38]); give smaller weights"),
    # prompts that tokenize to nothing would be the unconditional caption
    (lambda p: p.generate(["a red circle", "\x00"]), ValueError, "the prompt '\\x00' (prompts) has no words"),
    (lambda p: p.generate("<end_of_text>"), ValueError, "the prompt '<end_of_text>' (prompts) has no words"),
    (lambda p: p.text_diff(RED, "a red circle", "\x02"), ValueError, "the prompt '\\x02' (from_text, to_text)"),
    (lambda p: p.mix([("\x03", 1.0)]), ValueError, "the prompt '\\x03' (mix) has no words"),
])
def test_every_argument_is_checked_before_any_early_return_or_work(pipe, call, error, message, monkeypatch):
    monkeypatch.setattr(pipe.decoder, "sample", lambda *a, **k: pytest.fail("the decoder ran for a bad request"))
    with pytest.raises(error, match=re.escape(message)):
        call(pipe)


def test_ten_thousand_prompts_are_encoded_in_chunks_and_rerank_above_max_batch_ranks_in_parts(pipe, monkeypatch):
    encoded, decoded, upsampled = [], [], []
    encode_text = pipe.clip.encode_text
    monkeypatch.setattr(pipe.clip, "encode_text", lambda texts: encoded.append(len(texts)) or encode_text(texts))
    monkeypatch.setattr(pipe.prior, "sample", lambda text, *a, **k: torch.nn.functional.normalize(
        torch.randn(len(text), 32), dim=-1))
    monkeypatch.setattr(pipe.decoder, "sample", lambda embed, *a, **k: decoded.append(len(embed)) or
                        torch.rand(len(embed), 3, 16, 16) * 2 - 1)
    monkeypatch.setattr(pipe.upsamplers[0], "sample", lambda images, *a, **k: upsampled.append(len(images)) or
                        torch.zeros(len(images), 3, 32, 32))
    prompts = [f"a red circle {i}" for i in range(10_000)]
    assert len(pipe.generate(prompts, **FAST)) == 10_000
    assert max(encoded) == 64 and sum(decoded) == 10_000  # settings.max_batch prompts at a time, not 10,000
    encoded.clear(), decoded.clear(), upsampled.clear()
    images = pipe.generate("a red circle", 2, rerank=5, max_batch=2, output="tensor", **FAST)
    assert images.shape == (2, 3, 32, 32)
    assert decoded == [2, 2, 1] * 2 and upsampled == [1, 1]  # 5 candidates, 2 at a time; only the best upsampled
