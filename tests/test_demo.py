"""`python train/demo.py data=folder data.root=DIR` trains every stage on DIR, as a new user would run it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

STAGES = ("clip", "embed", "prior", "prior_passthrough", "decoder", "upsampler")
TINY = ["preset=quick", "with_upsampler=true", "steps.clip=2", "steps.prior=2", "steps.decoder=2", "steps.upsampler=2",
        "images_per_prompt=1", "generation.prior_steps=2", "generation.decoder_steps=2", "generation.upsampler_steps=2",
        # test-sized stages: the micro CLIP, a one-layer prior, small batches and evaluations (the same plumbing)
        "presets.quick.clip=['clip=micro_vit','trainer.batch_size=8','trainer.eval_every=0','trainer.checkpoint_every=0']",
        "presets.quick.prior=['prior.net.width=32','prior.net.depth=1','prior.net.heads=2','trainer.batch_size=8','eval_items=8']",
        "presets.quick.decoder=['trainer.batch_size=4','trainer.preview_every=0','evaluation.val_items=4',"
        "'evaluation.heldout_items=2','evaluation.guidance_scales=[3.0]']",
        "presets.quick.upsampler=['trainer.batch_size=4','trainer.preview_every=0','evaluation.val_items=4']"]


def _run(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def captioned_folder(root, n=24):
    """40-px images of coloured blobs, captioned with repeated templates ("a red blob")."""
    root.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    lines = []
    for i in range(n):
        name = list(colours)[i % 3]
        image = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(image).ellipse((8 + i % 5, 8, 30, 30 + i % 4), fill=colours[name])
        image.save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file": f"{i:02d}.png", "caption": f"a {name} blob"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_demo_trains_every_stage_on_a_folder_and_samples_its_captions(tmp_path):
    folder, out = captioned_folder(tmp_path / "blobs"), tmp_path / "demo"
    _run("train/demo.py", "data=folder", f"data.root={folder}", "data.val_fraction=0.3", f"out={out}", *TINY)
    for stage in STAGES:  # each stage's resolved config names the folder
        config = OmegaConf.load(out / stage / ".hydra" / "config.yaml")
        assert config.data.root == str(folder) and config.data.train._target_.endswith("ImageFolderDataset"), stage
    sizes = OmegaConf.load(out / "decoder" / ".hydra" / "config.yaml").decoder.image_size, OmegaConf.load(
        out / "upsampler" / ".hydra" / "config.yaml").upsampler.image_size
    assert sizes == (32, 64)  # the decoder's 32 px, upsampled to the data's 64
    captions = {json.loads(line)["caption"] for line in (folder / "captions.jsonl").read_text().splitlines()}
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts and set(prompts) <= captions and len(prompts) == len(set(prompts))
    assert Image.open(out / "grid.png").size[1] == 66 * len(prompts) + 2  # one 64-px row (2-px gaps) per caption
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_clip_score", "val_shuffled_clip_score", "passthrough_val_clip_score", "clip/image_to_text_R@1_val",
            "prior/retrieval_caption_val"} <= set(metrics)
    assert "colour_acc" not in " ".join(metrics)  # nothing judged as `shapes`
    # distribution metrics in CLIP space beside the CLIP scores, with their calibration rows, and as the decoder's
    assert {"distribution/val/fid_clip", "distribution/val/kid_clip_mean", "distribution/val/precision_clip",
            "distribution/val/fid_clip_floor", "distribution/val/fid_clip_ceiling_mean"} <= set(metrics)
    assert any(key.startswith("decoder/fid_clip_g") for key in metrics)
    report = (out / "report.html").read_text()  # the demo's page: its stages, curves, grid and metrics
    assert all(part in report for part in ("distribution metrics", "decoder: training curves", "samples", "fid_clip"))
    assert "composing the pipeline" in (out / "demo.log").read_text()
    # The demo's generation settings (conf/generation/reranked.yaml, the preset's own, then the command line's) reach
    # its stages' evaluations and are saved with its pipeline, so the pipeline samples as the demo measured it.
    settings = json.loads((out / "pipeline" / "pipeline.json").read_text())["settings"]
    assert settings["rerank"] == 4 and settings["decoder_steps"] == 2 and settings["prior_guidance"] == 3.0  # quick's
    for stage in ("prior", "decoder", "upsampler"):
        generation = OmegaConf.load(out / stage / ".hydra" / "config.yaml").generation
        keys = ("rerank", "prior_steps", "decoder_steps", "prior_guidance")
        assert {key: generation[key] for key in keys} == {key: settings[key] for key in keys}, stage

    # Again, at 128 px: a cascade. Every stage above is skipped (a 128-px demo's earlier stages are the 64-px demo's
    # jobs) and a second upsampler, 64 -> 128 px, trains; the pipeline goes through both, and is judged also without
    # the last one. `minutes` still counts every stage's training.
    proc = _run("train/demo.py", "data=folder", f"data.root={folder}", "data.val_fraction=0.3", f"out={out}", *TINY,
                "data.image_size=128", "generation.upsampler_steps=[2,1]", "generation.prior_guidance=2.0",
                "presets.quick.upsampler_hr=['trainer.batch_size=4','trainer.preview_every=0','evaluation.val_items=2']")
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    log = (out / "demo.log").read_text()
    assert all(f"{stage}: done already" in log for stage in STAGES) and "upsampler_128: done already" not in log
    cascade = OmegaConf.load(out / "upsampler_128" / ".hydra" / "config.yaml")
    assert (cascade.upsampler.low_res_size, cascade.upsampler.image_size, cascade.data.image_size) == (64, 128, 128)
    assert cascade.evaluation.steps == 1 and cascade.upsampler.train_crop == 64
    settings = json.loads((out / "pipeline" / "pipeline.json").read_text())
    assert len(settings["stages"]["upsamplers"]) == 2 and settings["settings"]["upsampler_steps"] == [2, 1]
    assert settings["settings"]["prior_guidance"] == 2.0  # the command line's, over the quick preset's 3.0
    assert Image.open(out / "grid.png").size[1] == 130 * len(prompts) + 2  # 128-px rows now
    assert {"val_clip_score", "at_64px/val_clip_score", "upsampler_128/psnr_val"} <= set(again)
    assert again["minutes"] >= sum(metrics[f"{stage}/minutes"] for stage in STAGES) + again["upsampler_128/minutes"]


def test_a_presets_generation_settings_yield_to_the_command_line_and_must_be_generation_settings():
    from demo import preset_generation

    config = {"preset": "quick", "generation": {"prior_guidance": 1.0, "rerank": 4}}
    preset = {"generation": {"prior_guidance": 3.0, "rerank": 8}}
    assert preset_generation(config, preset, ["generation=reranked"]) == {"prior_guidance": 3.0, "rerank": 8}
    assert preset_generation(config, preset, ["generation.rerank=2"]) == {"prior_guidance": 3.0}
    assert preset_generation(config, {}, []) == {}
    with pytest.raises(ValueError, match=r"presets.quick.generation: \['prior_guidence'\] name no generation setting; "
                                         r"expected some of \['prior_guidance', 'rerank'\]"):
        preset_generation(config, {"generation": {"prior_guidence": 3.0}}, [])


def test_a_data_choice_a_stage_cannot_use_is_an_error(tmp_path):
    proc = _run("train/decoder.py", f"hydra.run.dir={tmp_path}", "data.image_size=16", check=False)
    assert proc.returncode != 0
    assert "decoder.image_size=32 but data.image_size=16: the stage would learn from upscaled images" in proc.stderr
    proc = _run("train/clip.py", f"hydra.run.dir={tmp_path}", "~data.evaluator", check=False)
    assert proc.returncode != 0 and "this job needs data.evaluator" in proc.stderr


def test_image_sizes_follow_the_data():
    from demo import image_sizes

    def sizes(data_size, upsampler=True, preset="full"):
        presets = {"full": {"with_upsampler": True}, "quick": {"with_upsampler": False}}
        return image_sizes({"data": {"image_size": data_size}, "decoder_size": 32, "cascade_size": 64,
                            "with_upsampler": upsampler, "preset": preset, "presets": presets})

    assert sizes(64) == (32, [64])  # the demo's shapes: 32-px decoder, upsampled to 64
    assert sizes(256) == (32, [64, 256])  # DALL-E 2's cascade: to 64 px, then a second upsampler to 256
    assert sizes(128) == (32, [64, 128]) and sizes(48) == (32, [48])
    assert sizes(32) == (32, [])  # nothing to upsample
    assert sizes(16) == (16, [])  # the decoder never makes images larger than the data's
    assert sizes(64, upsampler=False) == (32, []) and sizes(256, upsampler=False) == (32, [])
    assert sizes(64, upsampler=None) == (32, [64]) and sizes(64, upsampler=None, preset="quick") == (32, [])
    assert sizes(64, upsampler=True, preset="quick") == (32, [64])  # the user's choice wins


def test_preset_auto_picks_the_gpu_preset_only_where_cuda_is(monkeypatch):
    import torch
    from demo import resolve_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_preset("auto") == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_preset("auto") == "gpu"
    assert resolve_preset("quick") == "quick"  # a named preset is kept, GPU or not


def test_the_demo_says_when_a_cpu_without_native_bf16_will_train_slower(monkeypatch):
    import demo
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: False)
    note = demo.precision_note("quick")
    assert "no native bf16" in note and "float32" in note and "on-a-cpu-without-native-bf16" in note
    assert demo.precision_note("gpu") is None  # meant for a GPU: the CPU's bf16 is not the point
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    assert demo.precision_note("full") is None and demo.precision_note("quick") is None
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.precision_note("full") is None  # stages train on the GPU


@pytest.mark.parametrize("preset", ["full", "quick", "gpu"])
def test_every_presets_decoder_and_cascade_upsampler_build(preset):
    import _job  # noqa: F401  (registers the structured configs)
    from hydra import compose, initialize_config_dir

    from unclip.config import build

    presets = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "demo.yaml"))["presets"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):  # every stage composes: the test below
        cascade = compose(config_name="train_upsampler", overrides=[
            "experiment=shapes", "upsampler=unet_64_256", "data.image_size=256", *presets[preset]["upsampler_hr"]])
        decoder = compose(config_name="train_decoder", overrides=["experiment=shapes", *presets[preset]["decoder"]])
    model = build(OmegaConf.to_container(decoder.decoder, resolve=True), image_embed_dim=8, text_length=4, token_dim=8)
    assert model.config["unet"]["base_channels"] == decoder.decoder.unet.base_channels
    upsampler = build(OmegaConf.to_container(cascade.upsampler, resolve=True))
    assert (upsampler.low_res_size, upsampler.image_size, upsampler.train_crop) == (64, 256, 64)
    assert upsampler.unet.convolutional and cascade.trainer.max_steps >= 1


# The demo's stages and the jobs their preset overrides go to (train/demo.py: unclip_stages, upsampler_stages,
# dalle_stages); the cascade's second upsampler also takes upsampler=unet_64_256 first.
PRESET_STAGE_JOBS = {"presets": {"clip": "train_clip", "embed": "train_embed", "prior": "train_prior",
                                 "decoder": "train_decoder", "upsampler": "train_upsampler",
                                 "upsampler_hr": "train_upsampler"},
                     "dalle_presets": {"dvae": "train_dvae", "dalle": "train_dalle"}}


@pytest.mark.parametrize("table,data", [(table, "data=shapes_pairs") for table in sorted(PRESET_STAGE_JOBS)]
                         + [("presets", "data=folder")])
def test_every_demo_preset_override_is_a_setting_of_its_stage_job(table, data):
    """A preset's override that names no setting of its job (a typo, a key missing from the stage's YAML) would stop
    `make demo` at that stage, minutes in; here it fails at once. The unCLIP presets also run on a user's own images
    (`data=folder`), whose data config lacks the shapes-only keys."""
    import _job  # noqa: F401  (registers the structured configs)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        demo = OmegaConf.to_container(compose(config_name="demo"), resolve=True)
        for preset, stages in demo[table].items():
            for stage, job in PRESET_STAGE_JOBS[table].items():
                first = ["upsampler=unet_64_256"] if stage == "upsampler_hr" else []
                data_choice = [data, "data.root=/a/folder"] if data == "data=folder" else [data]
                overrides = ["experiment=shapes", *data_choice, *first, *stages[stage]]
                try:
                    cfg = compose(config_name=job, overrides=overrides)
                except Exception as error:  # hydra's: the override names no key of the job's config
                    pytest.fail(f"{table}.{preset}.{stage} does not compose with {job}: {error}")
                OmegaConf.to_container(cfg, resolve=True)
                assert "trainer" not in cfg or cfg.trainer.max_steps >= 1
                if (preset, stage, data) == ("quick", "clip", "data=shapes_pairs"):  # a quick CLIP of 32-px singles
                    assert (cfg.clip.model_cfg.vision_cfg.image_size, cfg.data.train_pair_fraction) == (32, 0)
                if (preset, stage) == ("quick", "decoder"):  # the quick decoder's settings arrive
                    decoder = cfg.decoder
                    assert (decoder.loss_weighting, decoder.min_snr_floor, decoder.spatial_embed_grid,
                            decoder.standardise_embed, cfg.trainer.lr) == ("min_snr", 0.5, 8, True, 1.0e-3)
                if stage == "decoder":  # the shapes experiment's decoder reads its embedding on a grid, standardised
                    assert (cfg.decoder.spatial_embed_grid, cfg.decoder.standardise_embed) == (8, True)
                if (preset, stage) == ("quick", "prior"):  # 1,000 steps: cosine to the true embedding 0.89-0.91, not 0.82
                    assert cfg.trainer.max_steps == 1000


def test_a_pipeline_without_upsamplers_keeps_a_per_upsampler_setting_as_its_first_entry():
    """`make demo-quick` (no upsampler) with the demo's upsampler_steps: [16, 35] saved [] and refused to compose."""
    from demo import pipeline_settings

    from unclip.pipelines import GenerationSettings

    generation = {"upsampler_steps": [16, 35], "upsampler_sampler": ["ddim", "dpmpp_2m"], "upsampler_aug_level": 0.05,
                  "decoder_steps": 10}
    assert pipeline_settings(generation, 0) == {**generation, "upsampler_steps": [16],
                                                "upsampler_sampler": ["ddim"]}
    assert pipeline_settings(generation, 1)["upsampler_steps"] == [16]
    assert pipeline_settings(generation, 2)["upsampler_steps"] == [16, 35]
    GenerationSettings(**pipeline_settings(generation, 0)).check()  # what composing a quick demo's pipeline checks
