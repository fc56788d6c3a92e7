"""The command-line jobs end to end on tiny stages: they run, write their files and print metrics.json last."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image
from stages import save_micro_pipeline


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sample_job_writes_images_grid_and_jsonl(tmp_path):
    stages = save_micro_pipeline(tmp_path / "stages")
    out = tmp_path / "run"
    stdout = _run(
        "train/sample.py", f"hydra.run.dir={out}", f"pipeline.clip={stages['clip']}", f"pipeline.prior={stages['prior']}",
        f"pipeline.decoder={stages['decoder']}", f"pipeline.upsamplers=[{stages['upsamplers'][0]}]",
        "prompts=[a red circle,a blue square]", "num_images_per_prompt=2", "seed=7",
        "pipeline.settings.prior_steps=2", "pipeline.settings.decoder_steps=2", "pipeline.settings.upsampler_steps=2",
    )
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics == json.loads((out / "metrics.json").read_text()) and metrics["images"] == 4
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert all(r["seed"] == 7 and r["settings"]["decoder_steps"] == 2 for r in records)
    assert Image.open(out / records[0]["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > 64


def test_decoder_job_fine_tunes_a_decoder_into_an_inpainting_one(tmp_path):
    from unclip.checkpoint import load_stage

    stages = save_micro_pipeline(tmp_path / "stages")
    out = tmp_path / "inpaint"
    stdout = _run(
        "train/decoder.py", f"hydra.run.dir={out}", f"clip_checkpoint={stages['clip']}", "decoder=inpaint",
        f"init_from={stages['decoder']}", "data.image_size=32", "trainer.max_steps=2", "trainer.batch_size=4",
        "trainer.preview_every=2", "trainer.progress=false", "evaluation.val_items=4", "evaluation.heldout_items=2",
        "evaluation.steps=2", "evaluation.guidance_scales=[3.0]",
    )
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert "colour_shape_acc_g3_val" in metrics
    tuned = load_stage(out, stage="decoder").model
    assert tuned.inpaints and tuned.image_size == 16  # the micro decoder's architecture, not unet_32's
    assert tuned.config["mask_mix"]["object"] == 0.3
    assert list((out / "previews").glob("*.png"))


def test_sample_job_edits_images_in_every_mode(tmp_path):
    import importlib.util

    from PIL import ImageDraw

    from unclip.pipelines import UnCLIPPipeline

    stages = save_micro_pipeline(tmp_path / "stages")
    scene, mask = tmp_path / "scene.png", tmp_path / "mask.png"
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=(220, 40, 40))
    image.save(scene)
    Image.new("L", (32, 32), 0).save(mask)  # all black: nothing to paint, the scene comes back
    out = tmp_path / "inpaint"
    _run("train/sample.py", f"hydra.run.dir={out}", "mode=inpaint", f"image={scene}", f"mask={mask}",
         "prompts=[a blue square]", "negative_prompt=red", "num_images_per_prompt=2",
         f"pipeline.clip={stages['clip']}", f"pipeline.prior={stages['prior']}", f"pipeline.decoder={stages['decoder']}",
         f"pipeline.upsamplers=[{stages['upsamplers'][0]}]", "pipeline.settings.decoder_steps=2")
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["prompt"], r["negative_prompt"], r["mask"]) for r in records] == [
        ("inpaint", "a blue square", "red", str(mask))] * 2
    assert Image.open(out / records[0]["file"]).tobytes() == image.tobytes()

    spec = importlib.util.spec_from_file_location("sample_job", ROOT / "train" / "sample.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    pipe = UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=stages["prior"], decoder=stages["decoder"],
                                          upsamplers=stages["upsamplers"], device="cpu")
    pipe.settings = pipe._settings(dict(prior_steps=2, decoder_steps=2, upsampler_steps=2))
    config = dict(mode="img2img", num_images_per_prompt=2, seed=0, rerank=1, image=str(scene), mask=None,
                  strength=0.5, negative_prompt=None, jumps=None, mix=[[str(scene), 0.5], ["a blue square", 0.5]])
    images, made_by = job.sample(pipe, config, ["a blue square", "a green circle"])
    assert len(images) == 4 and [r["prompt"] for r in made_by] == ["a blue square"] * 2 + ["a green circle"] * 2
    images, made_by = job.sample(pipe, {**config, "mode": "mix"}, [])
    assert len(images) == 2 and made_by == [{"prompt": None}] * 2
    images, _ = job.sample(pipe, {**config, "mode": "variations", "negative_prompt": "red"}, [])
    assert len(images) == 2


@pytest.mark.parametrize("overrides,message", [
    (["mode=bogus"], "ValueError: mode must be one of ('generate', 'variations', 'img2img', 'inpaint', 'mix'), got "
                     "mode='bogus'"),
    (["num_images_per_prompt=0"], "ValueError: num_images_per_prompt must be a whole number >= 1, got 0"),
    (["prompts_file=/no/such/prompts.txt"], "FileNotFoundError: prompts_file=/no/such/prompts.txt does not exist; "
                                            "give a text file with one prompt a line"),
    (["mode=inpaint", "image=/no/such/scene.png"], "FileNotFoundError: image=/no/such/scene.png does not exist; "
                                                   "give an image file"),
    (["mode=img2img", "image={red}", "prompts=[]"], "ValueError: mode=img2img needs prompts: prompts='[a red circle]' "
                                                    "or prompts_file=<one prompt a line>"),
    ([], "CheckpointError: pipeline /no/such/pipeline does not exist; give a directory saved by "
         "UnCLIPPipeline.save_pretrained (train/demo.py saves outputs/demo/pipeline), or the stages' checkpoints"),
])
def test_a_sample_request_that_cannot_work_is_refused_before_the_pipeline_loads_naming_the_setting(tmp_path, overrides,
                                                                                                    message):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    overrides = [o.format(red=tmp_path / "red.png") for o in overrides]
    proc = subprocess.run([sys.executable, "train/sample.py", f"hydra.run.dir={tmp_path / 'out'}",
                           "pipeline.path=/no/such/pipeline", *overrides], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
