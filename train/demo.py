"""The main job: train CLIP -> embeddings -> prior -> decoder -> upsampler on `shapes`, then sample and judge.

`python train/demo.py` (README's first command runs it through `make demo`); `experiment=emoji` does the
same on the emoji data set (conf/experiment/demo/emoji.yaml). Each stage runs as its own job
(train/<stage>.py) in `<out>/<stage>/`; a stage that already finished is skipped, an interrupted one
resumes. The trained pipeline lands in `<out>/pipeline/`, the grid, images and metrics.json in `<out>/`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _job import hydra_job
from hydra.core.hydra_config import HydraConfig

from unclip.config import build
from unclip.data.collate import first_items
from unclip.eval.pipeline import evaluate_captions, evaluate_edits, evaluate_on_shapes, shapes_prompt_sets
from unclip.images import save_grid
from unclip.jobs import Job, finish
from unclip.pipeline import UnCLIPPipeline

TRAIN = Path(__file__).resolve().parent


def run_stage(name: str, script: str, out: Path, overrides: list[str], force: bool) -> dict:
    run_dir = out / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not force:
        print(f"[demo] {name}: done already ({metrics_file}); force=true re-runs it", flush=True)
        return json.loads(metrics_file.read_text())
    resume = [] if script == "embed" else ["trainer.overwrite=true"] if force else ["trainer.resume=true"]
    cmd = [sys.executable, str(TRAIN / f"{script}.py"), f"hydra.run.dir={run_dir}", *resume, *overrides]
    print(f"[demo] {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    print(f"[demo] {name}: {(time.time() - started) / 60:.1f} min", flush=True)
    return json.loads(metrics_file.read_text())


@hydra_job("demo")
def main(job: Job) -> None:
    start, config = job.started, job.config
    if config["preset"] not in config["presets"]:
        raise ValueError(f"preset must be one of {sorted(config['presets'])}, got {config['preset']!r}")
    preset = config["presets"][config["preset"]]
    if config["evaluation"] not in ("shapes", "captions"):
        raise ValueError(f"evaluation must be 'shapes' or 'captions', got {config['evaluation']!r}")
    out = Path(config["out"])
    force = config["force"]
    experiment = HydraConfig.get().runtime.choices["experiment"]
    common = [f"experiment={experiment}", *config["stage_overrides"]]
    stages = {}
    stages["clip"] = run_stage("clip", "clip", out, [*common, *preset["clip"]], force)
    stages["embed"] = run_stage("embed", "embed", out, [*common, f"clip_checkpoint={out / 'clip'}", *preset["embed"]], force)
    prior_common = [f"experiment={experiment}", f"embeddings={out / 'embed'}"]
    stages["prior"] = run_stage("prior", "prior", out, [*prior_common, *preset["prior"]], force)
    stages["prior_passthrough"] = run_stage("prior_passthrough", "prior", out, [*prior_common, "prior=passthrough",
                                            *[o for o in preset["prior"] if o.startswith("eval_items")]], force)
    stages["decoder"] = run_stage("decoder", "decoder", out, [*common, f"clip_checkpoint={out / 'clip'}", *preset["decoder"]], force)
    stages["upsampler"] = run_stage("upsampler", "upsampler", out, [*common, *preset["upsampler"]], force)

    print("[demo] composing the pipeline", flush=True)
    pipe = UnCLIPPipeline.from_pretrained(
        clip=out / "clip", prior=out / "prior", decoder=out / "decoder", upsamplers=[out / "upsampler"]
    )
    pipe.save_pretrained(out / "pipeline")
    passthrough = UnCLIPPipeline.from_pretrained(
        clip=out / "clip", prior=out / "prior_passthrough", decoder=out / "decoder", upsamplers=[out / "upsampler"]
    )
    counts = preset["eval_items"]
    caption_sets = {}
    if config["evaluation"] == "captions":  # real images of the data set's own captions, per split
        data = build(config["data"])
        for split, n in counts.items():
            if split not in data:  # counts of the shapes preset merged in (heldout, pair, edits)
                continue
            batch = first_items(data[split], n)
            caption_sets[split] = (batch["caption"], batch["image"])
    prompts, n = config["prompts"], config["images_per_prompt"]
    if prompts is None:  # a few of every evaluated split's captions
        prompts = [c for captions, _ in caption_sets.values() for c in captions[: config["prompts_per_split"]]]
    images = pipe.generate(prompts, n, seed=config["seed"])
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(image_dir / f"{i // n:02d}-{i % n}.png")
    save_grid(images, out / "grid.png", columns=n)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2))

    metrics = {"preset": config["preset"], "experiment": experiment}
    if config["evaluation"] == "captions":
        print("[demo] scoring text-to-image samples with CLIP against shuffled pairs", flush=True)
        for split, (captions, references) in caption_sets.items():
            metrics.update(evaluate_captions(pipe, captions, references, seed=config["seed"], prefix=f"{split}_"))
            metrics.update(evaluate_captions(passthrough, captions, references, seed=config["seed"],
                                             prefix=f"passthrough_{split}_"))
    elif config["evaluation"] == "shapes":
        print("[demo] judging text-to-image samples, variations, interpolations and text diffs", flush=True)
        sets = shapes_prompt_sets(counts)
        metrics.update(evaluate_on_shapes(pipe, sets, seed=config["seed"]))
        metrics.update(evaluate_on_shapes(passthrough, sets, seed=config["seed"], prefix="passthrough_"))
        edit_sources = sets["val"]
        k = counts["edits"]
        metrics.update(evaluate_edits(pipe, edit_sources["images"][:k], edit_sources["metas"][:k], seed=config["seed"]))
    for stage, stage_metrics in stages.items():
        for key, value in stage_metrics.items():
            if isinstance(value, (int, float)):
                metrics[f"{stage}/{key}"] = value
    metrics["minutes"] = (time.time() - start) / 60
    metrics["pipeline"] = str(out / "pipeline")
    metrics["grid"] = str(out / "grid.png")
    finish(out, metrics)


if __name__ == "__main__":
    main()
