"""DallePipeline: UnCLIPPipeline's calling convention over CLIP -> transformer -> dVAE tokens -> image."""

import json
import re

import pytest
import torch
from dalle_stages import TINY_DVAE, dalle_stages, save_dalle_stages, tiny_transformer
from PIL import Image

from unclip.checkpoint import save_stage
from unclip.dvae import DiscreteVAE
from unclip.pipelines import DallePipeline, UnCLIPPipeline, best_of
from unclip.weights import CheckpointError

PROMPTS = ["a red circle", "a small blue square on the left"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_dalle_stages(tmp_path_factory.mktemp("dalle_stages"))


@pytest.fixture(scope="module")
def pipe(stages):
    return DallePipeline.from_pretrained(**stages, device="cpu")


def test_generate_gives_seeded_pil_images_per_prompt_in_order(pipe):
    images = pipe.generate(PROMPTS, 3, seed=0)
    assert len(images) == 6 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    again = pipe.generate(PROMPTS, 3, seed=0, output="tensor")
    other = pipe.generate(PROMPTS, 3, seed=1, output="tensor")
    assert again.shape == (6, 3, 16, 16) and again.min() >= -1 and again.max() <= 1
    assert torch.equal(pipe.generate(PROMPTS, 3, seed=0, output="tensor"), again)
    assert not torch.equal(again, other)
    chunked = pipe.generate(PROMPTS, 3, seed=0, output="tensor", max_batch=3)  # in chunks of 3 images
    assert chunked.shape == again.shape  # the first chunk's images are those of a request for only them:
    assert torch.equal(chunked[:3], pipe.generate(PROMPTS[0], 3, seed=0, output="tensor"))


def test_rerank_keeps_the_candidate_the_clip_prefers(pipe):
    k = 3
    chosen = pipe.generate(PROMPTS, 2, seed=0, rerank=k, output="tensor")
    candidates = pipe.generate(PROMPTS, 2 * k, seed=0, output="tensor")  # the same draws, un-ranked
    embeds = pipe.clip.encode_text(PROMPTS).embed.repeat_interleave(2 * k, 0)
    assert chosen.shape == (4, 3, 16, 16)
    torch.testing.assert_close(chosen, best_of(pipe.clip, candidates, embeds, k), atol=0, rtol=0)
    plain = pipe.generate(PROMPTS, 2, seed=0, output="tensor")
    pipe.settings.rerank = k  # the pipeline's own setting (the DALL-E demo saves rerank=4) does the same
    try:
        assert torch.equal(pipe.generate(PROMPTS, 2, seed=0, output="tensor"), chosen)
        assert torch.equal(pipe.generate(PROMPTS, 2, seed=0, rerank=1, output="tensor"), plain)  # the call wins
    finally:
        pipe.settings.rerank = 1


def test_complete_keeps_the_top_rows_of_the_images_tokens(pipe, monkeypatch):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    own = pipe.dvae.encode(image)
    drawn = []
    sample = pipe.transformer.sample
    monkeypatch.setattr(pipe.transformer, "sample", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    rows, g = 2, TINY_DVAE["grid_size"]
    completed = pipe.complete(image, "a green triangle", rows=rows, n=2, seed=0)
    assert len(completed) == 2 and completed[0].size == (16, 16) and len(drawn) == 1
    assert torch.equal(drawn[0][:, : rows * g], own[:, :rows].flatten(1).repeat(2, 1))
    assert len(pipe.complete(Image.new("RGB", (40, 40), "white"), "a red circle", rows=1)) == 1  # PIL, resized


def test_save_and_load_round_trip_and_refuse_what_they_cannot_use(pipe, tmp_path):
    saved = pipe.save_pretrained(tmp_path / "pipe")
    manifest = json.loads((saved / "pipeline.json").read_text())
    assert manifest["generator"] == "dalle" and set(manifest["stages"]) == {"clip", "dvae", "transformer"}
    loaded = DallePipeline.from_pretrained(saved, device="cpu")
    assert torch.equal(loaded.generate(PROMPTS, seed=0, output="tensor"), pipe.generate(PROMPTS, seed=0, output="tensor"))
    assert pipe.save_pretrained(saved) == saved  # a saved pipeline is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and not a saved pipeline"):
        pipe.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="is a saved 'dalle' pipeline.*DallePipeline.from_pretrained"):
        UnCLIPPipeline.from_pretrained(saved)


@pytest.mark.parametrize("dvae", [{"codebook_size": 64}, {"grid_size": 8, "channels": [16]}])
def test_a_transformer_refuses_a_dvae_of_another_codebook_or_grid(stages, tmp_path, dvae):
    other = save_stage(tmp_path / "dvae", DiscreteVAE(**{**TINY_DVAE, **dvae}), stage="dvae", space=None)
    g, k = dvae.get("grid_size", 4), dvae.get("codebook_size", 32)
    with pytest.raises(ValueError, match=rf"models 16 image tokens from a codebook of 32, but the dVAE \({other}\) "
                                         rf"has a {g}x{g} grid \({g * g} tokens\) from a codebook of {k}"):
        DallePipeline.from_pretrained(clip=stages["clip"], dvae=other, transformer=stages["transformer"])


@pytest.mark.parametrize("call,message", [
    (lambda p: p.generate(PROMPTS, top_k=0), r"top_k must be an int in \[1, 32\]"),
    (lambda p: p.generate(PROMPTS, top_k=33), r"top_k must be an int in \[1, 32\].* got 33"),
    (lambda p: p.generate(PROMPTS, temperature=0.0), "temperature must be > 0, got 0.0"),
    (lambda p: p.generate(PROMPTS, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda p: p.generate(PROMPTS, 0), "num_images_per_prompt must be a whole number >= 1, got 0"),
    (lambda p: p.generate(PROMPTS, rerank=0), "rerank must be a whole number >= 1, got 0"),
    (lambda p: p.generate(PROMPTS, rerank=2.5), "rerank must be a whole number >= 1, got 2.5"),
    (lambda p: p.generate(PROMPTS, negative_prompt="red"), "takes no negative_prompt"),
    (lambda p: p.generate(PROMPTS, stepz=3), r"unknown generation settings \['stepz'\]"),
    (lambda p: p.complete(torch.zeros(1, 3, 16, 16), "a red circle", rows=4), "rows must be a whole number from 1 to 3"),
    (lambda p: p.complete(torch.zeros(1, 3, 16, 16), "a red circle", rows=0), "rows must be a whole number from 1 to 3"),
])
def test_bad_input_is_an_error_naming_the_value(pipe, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(pipe)


def test_a_caption_longer_than_the_text_length_is_truncated_with_a_warning(stages):
    clip, dvae, _ = dalle_stages()
    transformer = tiny_transformer(clip, dvae, text_length=6)
    pipe = DallePipeline(clip, dvae, transformer)
    with pytest.warns(UserWarning, match="longer than the 6-token text length of this model and were truncated"):
        images = pipe.generate("a small red circle to the left of a large blue square", seed=0)
    assert len(images) == 1


def test_a_caller_asks_what_the_pipeline_can_do_and_the_refusal_names_it(pipe):
    import importlib.util

    from conftest import ROOT

    assert pipe.supports("generate", "complete") and not pipe.supports("inpaint")
    assert UnCLIPPipeline.supports("inpaint", "mix", "variations") and not UnCLIPPipeline.supports("complete")
    spec = importlib.util.spec_from_file_location("sample_job", ROOT / "train" / "sample.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    config = dict(mode="inpaint", num_images_per_prompt=1, seed=0, rerank=None, image=None, mask=None, strength=0.5,
                  negative_prompt=None, jumps=None, mix=None)
    with pytest.raises(ValueError, match=r"mode=inpaint needs a pipeline that can inpaint; DallePipeline \(dalle\) "
                                         r"can: complete, generate"):
        job.sample(pipe, config, ["a red circle"])


def test_load_pipeline_opens_a_saved_pipeline_of_either_kind_by_its_pipeline_json(pipe, tmp_path):
    from unclip.pipelines import GENERATORS, load_pipeline

    loaded = load_pipeline(pipe.save_pretrained(tmp_path / "pipe"), device="cpu")
    assert type(loaded) is DallePipeline is GENERATORS["dalle"]
    assert torch.equal(loaded.generate(PROMPTS, seed=0, output="tensor"), pipe.generate(PROMPTS, seed=0, output="tensor"))


def test_rerank_above_max_batch_ranks_the_candidates_in_parts_keeping_the_best(pipe, monkeypatch):
    k, batch = 7, 3  # 7 candidates an image, 3 drawn at a time
    candidates = pipe.generate(PROMPTS[0], k, seed=0, output="tensor", max_batch=batch)  # the same draws, un-ranked
    drawn = []
    sample = pipe.transformer.sample
    monkeypatch.setattr(pipe.transformer, "sample", lambda tokens, **kw: drawn.append(len(tokens)) or sample(tokens, **kw))
    chosen = pipe.generate(PROMPTS, seed=0, rerank=k, output="tensor", max_batch=batch)
    assert drawn == [3, 3, 1] * 2 and chosen.shape == (2, 3, 16, 16)  # never more than max_batch at once
    embeds = pipe.clip.encode_text(PROMPTS[:1]).embed.repeat_interleave(k, 0)
    torch.testing.assert_close(chosen[:1], best_of(pipe.clip, candidates, embeds, k), atol=0, rtol=0)


def test_complete_makes_many_completions_in_chunks_of_max_batch(pipe, monkeypatch):
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = pipe.complete(image, "a green triangle", rows=2, n=2, seed=0, output="tensor", max_batch=4)
    drawn = []
    sample = pipe.transformer.sample
    monkeypatch.setattr(pipe.transformer, "sample", lambda tokens, **kw: drawn.append(len(tokens)) or sample(tokens, **kw))
    completed = pipe.complete(image, "a green triangle", rows=2, n=5, seed=0, output="tensor", max_batch=4)
    assert drawn == [4, 4, 2] and completed.shape == (10, 3, 16, 16)
    torch.testing.assert_close(completed[:2], first[:2], atol=0, rtol=0)  # the first chunk: a smaller request's


@pytest.mark.parametrize("call,message", [
    (lambda p: p.generate(PROMPTS, temperature="hot"), "the DALL-E setting temperature must be a number, got 'hot' (str)"),
    (lambda p: p.generate(PROMPTS, top_k=2.5), "the DALL-E setting top_k must be a whole number or None, got 2.5"),
    (lambda p: p.generate(PROMPTS, top_k=True), "the DALL-E setting top_k must be a whole number or None, got True"),
    (lambda p: p.generate(PROMPTS, top_p="0.9"), "the DALL-E setting top_p must be a number or None, got '0.9'"),
    (lambda p: p.generate(PROMPTS, guidance_scale=[3]), "the DALL-E setting guidance_scale must be a number or None"),
    (lambda p: p.generate(PROMPTS, temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
    (lambda p: p.generate(["a red circle", "\x00\x01"]), "the prompt '\\x00\\x01' (prompts) has no words the CLIP's "
                                                          "tokenizer keeps"),
    (lambda p: p.generate("<end_of_text>"), "the prompt '<end_of_text>' (prompts) has no words"),
    (lambda p: p.complete(torch.zeros(1, 3, 16, 16), "\x07", rows=1), "the prompt '\\x07' (prompt) has no words"),
])
def test_settings_of_the_wrong_type_and_empty_prompts_are_refused_naming_them(pipe, call, message, monkeypatch):
    monkeypatch.setattr(pipe.transformer, "sample", lambda *a, **k: pytest.fail("sampled for a bad request"))
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        call(pipe)


def test_the_dalle_pipeline_imports_nothing_from_the_unclip_one():
    """Both stand on unclip.pipelines.base; neither module reaches into the other."""
    import ast

    from conftest import ROOT

    for module, other in (("dalle", "unclip"), ("unclip", "dalle")):
        tree = ast.parse((ROOT / "unclip" / "pipelines" / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name.startswith(f"unclip.pipelines.{other}")
                    or name == "unclip.pipelines"}, module
