"""train/dvae.py and train/dalle.py: killed with SIGKILL they resume to the same weights, two data-parallel
processes train the weights one process trains with the global batch, and the DALL-E pipeline composes
with the sample and evaluate jobs (`pipeline=dalle`)."""

import json

import pytest
import torch
from accelerate import debug_launcher
from dalle_stages import TINY_DVAE, dalle_stages, save_dalle_stages
from safetensors.torch import load_file
from stages import final_weights, fit_tiny, kill_after_step, on_each_process, run_job
from test_distributed import ATOL, REL, differences

from unclip.data.shapes import ShapesDataset

STEPS = 12  # checkpoints every 4: killed after step 8, resumed for 4
COMMON = ["data.image_size=16", "data.pair_fraction=0.5", "data.val.length=16", "data.heldout.length=8",
          "trainer.batch_size=8", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4", "trainer.warmup_steps=2",
          "trainer.ema_update_after_step=2", "trainer.progress=false", "trainer.preview_every=0"]
DVAE_JOB = ["train/dvae.py", *COMMON, "dvae.image_size=16", "dvae.grid_size=4", "dvae.codebook_size=32",
            "dvae.codebook_dim=8", "dvae.channels=[16,16]", "dvae.kl_weight_max=0.01", "dvae.kl_steps=8",
            f"dvae.temperature_steps={STEPS}", "evaluation.val=8", "evaluation.heldout=8"]


def dalle_job(stages: dict) -> list[str]:
    return ["train/dalle.py", *COMMON, f"clip_checkpoint={stages['clip']}", f"dvae_checkpoint={stages['dvae']}",
            "dalle.width=32", "dalle.depth=1", "dalle.heads=2", "dalle.text_length=16", "vocabulary_items=64",
            "evaluation.val_items=8", "evaluation.sample_items=4"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dvae", "dalle"])
def test_a_job_killed_with_sigkill_resumes_to_the_same_weights(stage, tmp_path):
    cmd = DVAE_JOB if stage == "dvae" else dalle_job(save_dalle_stages(tmp_path / "stages"))
    out = run_job(cmd, tmp_path / "straight")
    metrics = json.loads(out.strip().splitlines()[-1])  # the last line is metrics.json
    expected = {"recon_colour_val", "recon_shape_val", "recon_position_val", "recon_all_val", "psnr_val",
                "codes_used_val"} if stage == "dvae" else {"val_image_loss", "val_text_loss", "colour_shape_acc"}
    assert expected <= set(metrics) and metrics["step"] == STEPS

    kill_after_step(run_job(cmd, tmp_path / "killed", wait=False), tmp_path / "killed", 8, STEPS)
    run_job(cmd, tmp_path / "killed", "trainer.resume=true")
    final = f"checkpoints/step-{STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / final / name), load_file(tmp_path / "killed" / final / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")
    if stage == "dvae":  # the schedules' step is part of the weights, so the resumed run continued them
        assert int(load_file(tmp_path / "killed" / final / "model.safetensors")["schedule_step"]) == STEPS


# -- two processes ------------------------------------------------------------------------------------------
BATCH, PARALLEL_STEPS = 4, 3
ITEMS = 2 * BATCH * PARALLEL_STEPS


class ShapesWithDraws(torch.utils.data.Dataset):
    """Shapes items carrying their own random draws (Gumbel noise, caption dropout), seeded by the index, so that
    the same item gets the same draws whichever process sees it."""

    def __init__(self):
        self.shapes = ShapesDataset("train", length=ITEMS, image_size=16, pair_fraction=0.5)

    def __len__(self):
        return ITEMS

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(20_000 + index)
        grid, codes = TINY_DVAE["grid_size"], TINY_DVAE["codebook_size"]
        gumbel = -torch.empty(codes, grid, grid).exponential_(generator=g).log()
        return {**self.shapes[index], "gumbel": gumbel, "drop": torch.rand((), generator=g) < 0.3}


def build_stage(stage: str):
    """(model, loss_fn, after_step_fn) of the job's own loss, initialised from seed 0."""
    from dalle import DalleLoss
    from dvae import advance_schedule, dvae_loss

    clip, dvae, transformer = dalle_stages(seed=0, kl_weight_max=0.01, kl_steps=2, usage_kl_weight=0.1)
    if stage == "dvae":
        return dvae, dvae_loss, advance_schedule
    return transformer, DalleLoss(clip.eval(), dvae.eval()), None


def train(stage: str, run_dir: str, batch_size: int) -> None:
    model, loss_fn, after_step_fn = build_stage(stage)
    fit_tiny(model, loss_fn, ShapesWithDraws(), run_dir, stage=stage, steps=PARALLEL_STEPS, batch_size=batch_size,
             lr=1e-3, after_step_fn=after_step_fn)


@pytest.mark.xdist_group("debug_launcher_port")  # its fixed port: one such test at a time (test_distributed.py)
@pytest.mark.parametrize("stage", ["dvae", "dalle"])
def test_two_processes_train_the_same_weights_as_one_with_the_global_batch(stage, tmp_path):
    train(stage, str(tmp_path / "one"), 2 * BATCH)
    debug_launcher(on_each_process, args=(train, stage, str(tmp_path / "two"), BATCH), num_processes=2)
    model_1, ema_1, _ = final_weights(tmp_path / "one", PARALLEL_STEPS)
    model_2, ema_2, processes = final_weights(tmp_path / "two", PARALLEL_STEPS)
    assert processes == 2
    initial = {k: v for k, v in build_stage(stage)[0].state_dict().items() if k in model_1}
    floats = lambda weights: {k: v for k, v in weights.items() if v.is_floating_point()}  # noqa: E731
    for a, b in ((model_1, model_2), (ema_1, ema_2)):
        largest, relative = differences(floats(a), floats(b), floats(initial))
        assert largest < ATOL and relative < REL, f"weights differ by up to {largest:.2e} ({relative:.2e} of the update)"
    if stage == "dvae":
        assert int(model_1["schedule_step"]) == int(model_2["schedule_step"]) == PARALLEL_STEPS


@pytest.mark.slow
def test_sample_and_evaluate_jobs_take_pipeline_dalle(tmp_path):
    stages = save_dalle_stages(tmp_path / "stages")
    pipeline = ["pipeline=dalle", *(f"pipeline.{name}={path}" for name, path in stages.items())]
    run_job(["train/sample.py", *pipeline, "prompts=[a red circle,a blue square]", "num_images_per_prompt=2", "rerank=2",
          "pipeline.settings.top_k=8"], tmp_path / "sample")
    records = [json.loads(line) for line in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert records[0]["settings"]["top_k"] == 8 and (tmp_path / "sample" / "grid.png").is_file()

    out = run_job(["train/evaluate.py", *pipeline, "data.image_size=16",
                "eval_items={val:4,heldout:2,pair:2,edits:0,fidelity:{val:12,heldout:6,pair:8,count:3}}"],
               tmp_path / "evaluate")
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"val_colour_shape_acc", "fidelity/val/all", "fidelity/pair/all", "fidelity/count/all",
            "geneval/overall"} <= set(metrics)
    summary = (tmp_path / "evaluate" / "fidelity.txt").read_text()
    assert "balanced prompt set, text to image" in summary and "| dalle (shapes, the pixel judge) |" in summary
    assert "| DALL-E 2 (published) | 0.52 |" in summary


# The quick preset with test-sized stages (the micro CLIP, this file's dVAE and transformer, few evaluation items):
# the quick ones' 256-token sequences and full evaluations cost minutes and test the same plumbing.
TINY_DEMO = ["presets.quick.clip=['clip=micro_vit','trainer.eval_every=0','trainer.checkpoint_every=0']",
             "dalle_presets.quick.dvae=['dvae.image_size=16','dvae.grid_size=4','dvae.codebook_size=32','dvae.codebook_dim=8',"
             "'dvae.channels=[16,16]','trainer.preview_every=0','evaluation.val=8','evaluation.heldout=8']",
             "dalle_presets.quick.dalle=['dalle.width=32','dalle.depth=1','dalle.heads=2','vocabulary_items=64',"
             "'trainer.preview_every=0','evaluation.val_items=8','evaluation.sample_items=4']"]


@pytest.mark.slow
def test_the_demo_trains_dalle_end_to_end_and_judges_it(tmp_path):
    out = tmp_path / "demo"
    run_job(["train/demo.py", "generator=dalle", "preset=quick", "steps.clip=2", "steps.dvae=2", "steps.dalle=2",
          "images_per_prompt=1", f"out={out}", *TINY_DEMO], out)
    saved = json.loads((out / "pipeline" / "pipeline.json").read_text())
    assert saved["generator"] == "dalle"
    # conf/demo.yaml's dalle_generation travels with the pipeline: it samples and is judged at them
    assert (saved["settings"]["rerank"], saved["settings"]["guidance_scale"]) == (16, 1.5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generator"] == "dalle"
    assert {"val_colour_shape_acc", "fidelity/val/all", "fidelity/heldout/all", "fidelity/pair/all", "grid/n",
            "dvae/recon_all_val", "dalle/val_image_loss", "clip/zero_shot_top1_val"} <= set(metrics)
    assert not any(key.startswith(("passthrough_", "fidelity_variations/", "prior/")) for key in metrics)
    assert {"fidelity/count/all", "fidelity/count_heldout/count=2", "fidelity/pair_heldout/all",
            "fidelity/pair_mixed/all", "geneval/counting", "geneval/overall"} <= set(metrics)
    summary = (out / "fidelity.txt").read_text()
    assert "balanced prompt set, text to image" in summary and "| dalle (shapes, the pixel judge) |" in summary
    prompts = json.loads((out / "prompts.json").read_text())
    assert (out / "grid.png").is_file() and len(list((out / "images").iterdir())) == len(prompts)
