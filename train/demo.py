"""The main job: train CLIP -> embeddings -> prior -> decoder -> upsampler on one data set, then sample and judge.

`python train/demo.py` (README's first command runs it through `make demo`) trains on `shapes`;
`experiment=emoji` on the emoji data set (conf/experiment/demo/emoji.yaml); `data=folder data.root=DIR` on
your own captioned images. The data choice and every `data.*` setting reach every stage, and the data's
evaluator (`data.evaluator`) judges the result and picks the sample prompts. Each stage runs as its own job
(train/<stage>.py) in `<out>/<stage>/`; a stage that already finished is skipped, an interrupted one
resumes. The trained pipeline lands in `<out>/pipeline/`, the grid, images and metrics.json in `<out>/`.

`generator=dalle` trains DALL-E 1 the same way (CLIP, the discrete VAE, the transformer; `dalle_presets`) into
`outputs/demo-dalle/`, and judges its pipeline with the same evaluator. The generators are those of
``unclip.pipelines.GENERATORS``; each one's recipe here (``RECIPES``) says which stages train it and how they compose,
its class where its outputs go (``demo_dir``) and what its evaluation covers (``supports``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from _job import choice, forwarded_overrides, given_settings, hydra_job

from unclip.config import build
from unclip.images import save_grid
from unclip.jobs import Job
from unclip.pipeline_inputs import check_count
from unclip.pipelines import DallePipeline, GenerationSettings, Pipeline, UnCLIPPipeline, pipeline_class
from unclip.pipelines.unclip import PER_UPSAMPLER
from unclip.report import REPORT_FILE, write_report
from unclip.training.precision import cpu_has_native_bf16

TRAIN = Path(__file__).resolve().parent
log = logging.getLogger("demo")  # to the console and <out>/demo.log


def run_stage(name: str, script: str, out: Path, overrides: list[str], force: bool) -> dict:
    run_dir = out / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not force:
        log.info(f"{name}: done already ({metrics_file}); force=true re-runs it")
        return json.loads(metrics_file.read_text())
    resume = [] if script == "embed" else ["trainer.overwrite=true"] if force else ["trainer.resume=true"]
    cmd = [sys.executable, str(TRAIN / f"{script}.py"), f"hydra.run.dir={run_dir}", *resume, *overrides]
    log.info(f"{name}: {' '.join(cmd[1:])}")
    started = time.time()
    subprocess.run(cmd, check=True)
    log.info(f"{name}: {(time.time() - started) / 60:.1f} min")
    return json.loads(metrics_file.read_text())


def resolve_preset(preset: str) -> str:
    """``auto``: ``gpu`` where CUDA is available, else ``full``; any other name as given."""
    if preset != "auto":
        return preset
    chosen = "gpu" if torch.cuda.is_available() else "full"
    log.info(f"preset=auto: {chosen} ({'CUDA is available' if chosen == 'gpu' else 'no CUDA device'})")
    return chosen


def precision_note(preset: str) -> str | None:
    """What the user should know before a CPU preset starts on a CPU without native bf16 (None where nothing): its
    stages train in float32 there, about 3 times as long as the documented times (measured on those with it)."""
    if preset == "gpu" or torch.cuda.is_available() or cpu_has_native_bf16():
        return None
    return ("this CPU has no native bf16 (AVX512-BF16 or AMX): every stage trains in float32, about 3 times as long as "
            "the documented times (docs/results.md#on-a-cpu-without-native-bf16: the quick demo 22 minutes on a 2-core "
            "AVX2 CPU against 7.5)")


def image_sizes(config: dict) -> tuple[int, list[int]]:
    """(the decoder's size, each upsampler's output size): the decoder works at ``decoder_size`` or the data's size if
    smaller; an upsampler takes it up to the data's size, or to ``cascade_size`` and a second one from there to the
    data's size (DALL-E 2's cascade: conf/upsampler/unet_32_64.yaml, then unet_64_256.yaml)."""
    data_size = config["data"]["image_size"]
    decoder_size = min(config["decoder_size"], data_size)
    wanted = config["with_upsampler"]
    if wanted is None:  # the preset's choice (quick: none, its few steps would only add noise)
        wanted = config["presets"][config["preset"]].get("with_upsampler", True)
    if not wanted or data_size <= decoder_size:
        return decoder_size, []
    middle = config["cascade_size"]
    return decoder_size, [middle, data_size] if decoder_size < middle < data_size else [data_size]


def upsampler_stages(config: dict, preset: dict, decoder_size: int, sizes: list[int]) -> dict:
    """The upsamplers' jobs: ``upsampler`` (decoder_size -> sizes[0]) and, in a cascade, ``upsampler_<size>`` (from
    there, ``upsampler=unet_64_256``). Every stage before the last sees the data at the first upsampler's size (so
    they are the jobs a ``cascade_size``-px demo runs); the last one at the data's."""
    images, generation = _images(config), generation_overrides(config, preset)
    settings, stages, low = GenerationSettings(**config["generation"]), {}, decoder_size
    for index, size in enumerate(sizes):
        name = "upsampler" if index == 0 else f"upsampler_{size}"
        conf = [] if index == 0 else ["upsampler=unet_64_256", *preset.get("upsampler_hr", [])]
        at = [] if index == len(sizes) - 1 else [f"data.image_size={size}"]
        steps = [f"evaluation.{key}={settings.for_upsampler(f'upsampler_{key}', index, len(sizes))}"
                 for key in ("steps", "aug_level", "sampler", "spacing")]
        stages[name] = ("upsampler", [*images, *generation, *at, *conf, f"upsampler.low_res_size={low}",
                                      f"upsampler.image_size={size}", *(preset["upsampler"] if index == 0 else []),
                                      *steps, *_steps(config, name)])
        low = size
    return stages


def preset_generation(config: dict, preset: dict, command_line: list[str]) -> dict:
    """The preset's own sampling settings (its ``generation:``, e.g. the quick preset's prior_guidance) that the command
    line (``command_line``: the run's ``generation.<key>=`` overrides) does not set: there the user's value wins."""
    own = dict(preset.get("generation") or {})
    unknown = sorted(set(own) - set(config["generation"]))
    if unknown:
        raise ValueError(f"presets.{config['preset']}.generation: {unknown} name no generation setting; expected "
                         f"some of {sorted(config['generation'])}")
    given = given_settings(command_line, "generation.")
    return {key: value for key, value in own.items() if key not in given}


def generation_overrides(config: dict, preset: dict) -> list[str]:
    """What the stages' jobs are given so that they evaluate as the demo's pipeline samples: the command line's
    generation choice and settings, then the preset's own."""
    command_line = forwarded_overrides("generation")
    own = preset_generation(config, preset, command_line)
    return [*command_line, *(f"generation.{key}={value}" for key, value in own.items())]


def _steps(config: dict, stage: str) -> list[str]:
    steps = config["steps"].get(stage)
    return [] if steps is None else [f"trainer.max_steps={steps}"]


def _images(config: dict) -> list[str]:
    """What every stage that reads images is given: the experiment and the data choice with its settings."""
    return [*forwarded_overrides("experiment", "data"), *config["stage_overrides"]]


def dalle_stages(config: dict, preset: dict, out: Path) -> dict[str, tuple[str, list[str]]]:
    """DALL-E 1's stages (CLIP, dVAE, transformer): job script and command-line overrides, in the order they run."""
    images, dalle = _images(config), config["dalle_presets"][config["preset"]]
    return {
        "clip": ("clip", [*images, *preset["clip"], *_steps(config, "clip")]),
        "dvae": ("dvae", [*images, *dalle["dvae"], *_steps(config, "dvae")]),
        "dalle": ("dalle", [*images, *forwarded_overrides("dalle_generation"), f"clip_checkpoint={out / 'clip'}",
                            f"dvae_checkpoint={out / 'dvae'}", *dalle["dalle"], *_steps(config, "dalle")]),
    }


def unclip_stages(config: dict, preset: dict, out: Path) -> dict[str, tuple[str, list[str]]]:
    """unCLIP's stages: job script and command-line overrides, in the order they run."""
    decoder_size, sizes = image_sizes(config)
    # A cascade's earlier stages see the data at the first upsampler's size: the same jobs as a demo at that size.
    at = [f"data.image_size={sizes[0]}"] if len(sizes) > 1 else []
    data, generation = [*forwarded_overrides("experiment", "data"), *at], generation_overrides(config, preset)
    images, clip = [*_images(config), *at], f"clip_checkpoint={out / 'clip'}"
    log.info(f"data={choice('data')} at {config['data']['image_size']} px: the decoder makes {decoder_size}-px "
             f"images" + (f", upsampled to {' then '.join(f'{s}' for s in sizes)} px" if sizes else ", no upsampler"))
    stages = {
        "clip": ("clip", [*images, *preset["clip"], *_steps(config, "clip")]),
        "embed": ("embed", [*images, clip, *preset["embed"]]),
        "prior": ("prior", [*data, *generation, f"embeddings={out / 'embed'}", *preset["prior"],
                            *_steps(config, "prior")]),
        "prior_passthrough": ("prior", [*data, *generation, f"embeddings={out / 'embed'}", "prior=passthrough",
                                        *[o for o in preset["prior"] if o.startswith("eval_items")]]),
        "decoder": ("decoder", [*images, *generation, clip, f"decoder.image_size={decoder_size}", *preset["decoder"],
                                *_steps(config, "decoder")]),
    }
    return {**stages, **upsampler_stages(config, preset, decoder_size, sizes)}


def upsampler_names(stages: dict) -> list[str]:
    return [name for name in stages if name == "upsampler" or name.startswith("upsampler_")]


def compose_unclip(out: Path, stages: dict, config: dict, prior: str = "prior", upsamplers: int | None = None
                   ) -> UnCLIPPipeline:
    """The pipeline of the stages in ``out``; ``upsamplers``: only the first this many (a cascade cut short)."""
    names = upsampler_names(stages)[:upsamplers]
    return UnCLIPPipeline.from_config({"clip": out / "clip", "prior": out / prior, "decoder": out / "decoder",
                                       "upsamplers": [out / name for name in names],
                                       "settings": pipeline_settings(config["generation"], len(names))})


def pipeline_settings(generation: dict, upsamplers: int) -> dict:
    """The generation settings a pipeline of ``upsamplers`` upsamplers saves: per-upsampler lists (the 32 -> 64
    stage's, then a cascade's) cut to its upsamplers, and to their first entry where it has none (a 32-px or
    `preset=quick` pipeline: an empty list is no setting)."""
    settings = dict(generation)
    for key in PER_UPSAMPLER:
        if isinstance(settings.get(key), (list, tuple)):
            settings[key] = list(settings[key])[: max(upsamplers, 1)]
    return settings


def compose_dalle(out: Path, stages: dict, config: dict) -> DallePipeline:
    return DallePipeline.from_config({"clip": out / "clip", "dvae": out / "dvae", "transformer": out / "dalle",
                                      "settings": config["dalle_generation"]})


def evaluate_cascade_cut(out: Path, stages: dict, config: dict, evaluator) -> dict:
    """A cascade of two or more upsamplers is judged also without its last one (keys ``at_<size>px/...``), the same
    seeds and prompts: what the last stage keeps of what the pipeline gets right."""
    names = upsampler_names(stages)
    if len(names) < 2:
        return {}
    cut = compose_unclip(out, stages, config, upsamplers=len(names) - 1)
    log.info(f"evaluating the cascade without its last upsampler, at {cut.image_size} px")
    return evaluator.pipeline_metrics(cut, seed=config["seed"], prefix=f"at_{cut.image_size}px/", edits=False)


@dataclass(frozen=True)
class Recipe:
    """How the demo trains a generator: its stages' jobs, in order, and how their outputs compose the pipeline."""

    stages: Callable[[dict, dict, Path], dict[str, tuple[str, list[str]]]]
    compose: Callable[[Path, dict, dict], Pipeline]


RECIPES: dict[type[Pipeline], Recipe] = {UnCLIPPipeline: Recipe(unclip_stages, compose_unclip),
                                         DallePipeline: Recipe(dalle_stages, compose_dalle)}


def recipe_of(generator: str) -> tuple[type[Pipeline], Recipe]:
    """The generator's class (``unclip.pipelines.GENERATORS``) and its recipe, or an error naming the known ones."""
    cls = pipeline_class(generator)
    if cls not in RECIPES:
        raise ValueError(f"the demo has no recipe for generator={generator}; it trains "
                         f"{sorted(c.generator for c in RECIPES)}")
    return cls, RECIPES[cls]


@hydra_job("demo")
def main(job: Job) -> None:
    config, out = job.config, Path(job.config["out"])
    config["preset"] = resolve_preset(config["preset"])
    if config["preset"] not in config["presets"]:
        raise ValueError(f"preset must be one of {sorted(config['presets'])}, got {config['preset']!r}")
    preset = config["presets"][config["preset"]]
    note = precision_note(config["preset"])
    if note:
        log.warning(note)
    config["generation"].update(preset_generation(config, preset, forwarded_overrides("generation")))
    job.require_data("evaluator")
    evaluator = build(config["data"]["evaluator"], pipeline_items=preset["eval_items"])
    generator, recipe = recipe_of(config["generator"])
    plan = recipe.stages(config, preset, out)
    stages = {name: run_stage(name, script, out, overrides, config["force"]) for name, (script, overrides) in plan.items()}

    evaluating = time.time()
    log.info("composing the pipeline")
    pipe = recipe.compose(out, stages, config)
    pipe.save_pretrained(out / "pipeline")
    prompts, n = config["prompts"] or evaluator.sample_prompts(), config["images_per_prompt"]
    images = pipe.generate(prompts, n, seed=config["seed"])
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / "images" / f"{i // n:02d}-{i % n}.png")
    save_grid(images, out / "grid.png", columns=n)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2))

    log.info(f"evaluating the pipeline with {type(evaluator).__name__} (and the passthrough prior's)")
    metrics = {"preset": config["preset"], "experiment": choice("experiment"), "generator": generator.generator}
    metrics.update(evaluator.pipeline_metrics(pipe, seed=config["seed"]))  # with the edits the pipeline supports
    if "prior_passthrough" in stages:
        passthrough = compose_unclip(out, stages, config, prior="prior_passthrough")
        metrics.update(evaluator.pipeline_metrics(passthrough, seed=config["seed"], prefix="passthrough_", edits=False,
                                                  fidelity=False))
    metrics.update(evaluate_cascade_cut(out, stages, config, evaluator))
    if config.get("unconditional"):  # samples without a prompt against the training data (fidelity.txt's last table)
        metrics.update(evaluator.unconditional_metrics(pipe, check_count("unconditional", config["unconditional"]),
                                                       seed=config["seed"]))
    metrics.update(evaluator.prompt_metrics(images, [prompt for prompt in prompts for _ in range(n)]))
    summary = evaluator.summary(metrics)
    for cut in sorted({key.split("/")[0] for key in metrics if key.startswith("at_") and "/" in key}):
        cut_summary = evaluator.summary(metrics, prefix=f"{cut}/")
        summary += f"\n\nwithout the last upsampler ({cut[3:]}):\n{cut_summary}" if cut_summary else ""
    if summary:
        (out / "fidelity.txt").write_text(summary + "\n")
        log.info("\n" + summary)
    for stage, stage_metrics in stages.items():
        metrics.update({f"{stage}/{k}": v for k, v in stage_metrics.items() if isinstance(v, (int, float))})
    # Every stage's minutes (also those of earlier calls, whose stages were skipped now) and this evaluation's.
    metrics["minutes"] = sum(m.get("minutes", 0.0) for m in stages.values()) + (time.time() - evaluating) / 60
    metrics.update(pipeline=str(out / "pipeline"), grid=str(out / "grid.png"), report=str(out / REPORT_FILE))
    job.finish(metrics)  # into the run directory, which is out (conf/demo.yaml: hydra.run.dir: ${out}); printed last
    write_report([out])  # reads metrics.json


if __name__ == "__main__":
    main()
