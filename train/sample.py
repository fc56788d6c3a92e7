"""Generate or edit images: `python train/sample.py pipeline.path=outputs/demo/pipeline prompts='[a red circle]'`.

Modes (``mode=``): generate (text -> images), variations (image=...), img2img (image=..., strength=...), inpaint
(image=..., mask=...: white = paint, black = keep; prompts=[] removes what is masked) and mix
(mix='[[red.png,0.5],[a blue square,0.5]]': image files or texts with weights). ``negative_prompt=`` steers every
mode but mix away from a text. ``unconditional=16`` draws 16 images without any prompt instead
(``pipe.unconditional``: every stage from its learned null caption; prompts are not read); with ``rerank=4
captions_file=<one caption a line>`` each is the best of 4 by that caption bank (e.g. the training captions), and
with ``prior_candidates=4`` (unCLIP) its image embedding the best of 4 prior samples by it. Writes each image as PNG, a grid (one row per prompt; unconditional: 8 a row), and samples.jsonl (mode,
prompt, inputs, seed and settings per image).

The run directory is this run's alone while it runs (a second run into it is refused, naming this one's process
id) and must be empty, unless ``overwrite=true``: then the earlier run's samples (the files its samples.jsonl
lists, the grid, metrics.json) are replaced and nothing else there is touched.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from _job import hydra_job
from PIL import Image

from unclip.files import replace_link, write_atomic
from unclip.images import make_grid
from unclip.jobs import Job
from unclip.pipeline_inputs import check_count
from unclip.pipelines import Pipeline, pipeline_from_config
from unclip.run_lock import LOCK_FILE

MODES = ("generate", "variations", "img2img", "inpaint", "mix")


def _open(path, what: str) -> Image.Image:
    if not path:
        raise ValueError(f"this mode needs {what}=<an image file>")
    return Image.open(path)


def _mix_items(config: dict) -> list:
    """``[[item, weight], ...]``: an item naming an existing file is an image, anything else a text."""
    if not config["mix"]:
        raise ValueError("mode=mix needs mix='[[image file or text, weight], ...]'")
    return [(Image.open(item) if Path(str(item)).is_file() else str(item), float(weight)) for item, weight in config["mix"]]


def read_prompts(config: dict) -> list[str]:
    """``prompts`` and the lines of ``prompts_file``."""
    prompts = list(config["prompts"] or [])
    if config["prompts_file"]:
        prompts += read_lines(config["prompts_file"], "prompts_file", "prompt")
    return prompts


def read_lines(path, key: str, what: str) -> list[str]:
    """The non-blank lines of the text file ``path`` (the setting ``key``), stripped."""
    file = Path(path)
    if not file.exists() or file.is_dir():  # a named pipe is fine
        raise FileNotFoundError(f"{key}={file} does not exist; give a text file with one {what} a line")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_request(config: dict, prompts: list[str]) -> None:
    """What the mode needs, checked before the pipeline is loaded: its input files and prompts, a count."""
    mode = config["mode"]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if config.get("unconditional"):
        check_count("unconditional", config.get("unconditional"))
        if mode != "generate" or config["negative_prompt"] is not None:
            raise ValueError(f"unconditional={config['unconditional']} draws images without any prompt: it takes "
                             f"neither mode={mode} nor negative_prompt={config['negative_prompt']!r}; leave them at "
                             "their defaults")
        prior_candidates = config.get("prior_candidates")
        for key in ("rerank", "prior_candidates"):
            if config.get(key) is not None:
                check_count(key, config[key])
        if config["rerank"] not in (None, 1) or prior_candidates not in (None, 1):
            if not config.get("captions_file"):
                raise ValueError(f"unconditional={config['unconditional']} has no prompt to re-rank by, so "
                                 f"rerank={config['rerank']}, prior_candidates={prior_candidates} need captions_file=<a "
                                 "caption bank, one caption a line: e.g. the training captions>")
            read_lines(config["captions_file"], "captions_file", "caption")
        return
    check_count("num_images_per_prompt", config["num_images_per_prompt"])
    needs = {"variations": ["image"], "img2img": ["image"], "inpaint": ["image", "mask"]}.get(mode, [])
    for key in needs:
        if not config[key]:
            raise ValueError(f"mode={mode} needs {key}=<an image file>")
        if not Path(config[key]).is_file():
            raise FileNotFoundError(f"{key}={config[key]} does not exist; give an image file")
    if mode in ("generate", "img2img") and not prompts:
        raise ValueError(f"mode={mode} needs prompts: prompts='[a red circle]' or prompts_file=<one prompt a line>")


def sample(pipe: Pipeline, config: dict, prompts: list[str]) -> tuple[list, list[dict]]:
    """The images of ``config['mode']`` and, per image, what made it (prompt or None)."""
    mode, n = config["mode"], config["num_images_per_prompt"]
    common = {"seed": config["seed"]}
    count = config.get("unconditional")
    if count:
        pipe.require("unconditional", f"unconditional={count}")
        rerank, prior_candidates = config["rerank"] or 1, config.get("prior_candidates") or 1
        bank = {"rerank": rerank, "captions": read_lines(config["captions_file"], "captions_file", "caption"),
                **({"prior_candidates": prior_candidates} if prior_candidates > 1 else {})} \
            if rerank > 1 or prior_candidates > 1 else {}
        return pipe.unconditional(count, **bank, **common), [{"prompt": None}] * count
    pipe.require(mode, f"mode={mode}")
    negative = {"negative_prompt": config["negative_prompt"]}
    if mode == "mix":
        return pipe.mix(_mix_items(config), n, **common), [{"prompt": None}] * n
    if mode == "variations":
        images = pipe.variations(_open(config["image"], "image"), n, strength=config["strength"], **negative, **common)
        return images, [{"prompt": None}] * n
    if mode == "generate":
        rerank = {} if config["rerank"] is None else {"rerank": config["rerank"]}  # null: the pipeline's own
        images = pipe.generate(prompts, n, **rerank, **negative, **common)
    elif mode == "img2img":
        image = _open(config["image"], "image")
        images = [i for p in prompts for i in pipe.img2img(image, p, config["strength"], n=n, **negative, **common)]
    else:
        image, mask = _open(config["image"], "image"), _open(config["mask"], "mask")
        prompts = prompts or [None]
        images = [i for p in prompts for i in pipe.inpaint(image, mask, p, n=n, jumps=config["jumps"], **negative,
                                                             **common)]
    return images, [{"prompt": p} for p in prompts for _ in range(n)]


HYDRAS_OWN = (".hydra", LOCK_FILE)  # and its job log, <job>.log: written before this job starts


def earlier_output(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that Hydra and the lock did not put there."""
    return sorted(p.name for p in run_dir.iterdir() if p.name not in HYDRAS_OWN and p.suffix != ".log")


def refuse_earlier_output(run_dir: Path, overwrite: bool) -> None:
    earlier = earlier_output(run_dir)
    if earlier and not overwrite:
        raise FileExistsError(
            f"{run_dir} is not empty (it holds {', '.join(earlier[:5])}); add overwrite=true to replace the earlier "
            "samples there (only the files its samples.jsonl lists are removed), or choose another directory with "
            "name=... or hydra.run.dir=..."
        )


def remove_earlier_samples(run_dir: Path) -> None:
    """Remove what an earlier sample run wrote into ``run_dir``: the files its samples.jsonl lists, the grid,
    metrics.json and samples.jsonl; nothing else."""
    listing = run_dir / "samples.jsonl"
    listed = []
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8").splitlines():
            try:
                listed.append(json.loads(line)["file"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
    for name in [*listed, "grid.png", "metrics.json", "samples.jsonl"]:
        path = (run_dir / name).resolve()
        if path.is_relative_to(run_dir.resolve()) and path.is_file():
            path.unlink()
    if (run_dir / "images").is_dir() and not any((run_dir / "images").iterdir()):
        (run_dir / "images").rmdir()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_samples(run_dir: Path, pipe: Pipeline, images: list, made_by: list[dict], config: dict) -> Path:
    """The images, samples.jsonl and grid.png, each written by rename (a symlink planted there is replaced, never
    written through); returns the grid's path."""
    n = min(8, config.get("unconditional") or 0) or config["num_images_per_prompt"]  # the grid's images per row
    inputs = {key: config[key] for key in ("mode", "image", "mask", "strength", "negative_prompt", "mix", "jumps")}
    if config.get("unconditional"):
        inputs["mode"] = "unconditional"
    image_dir = run_dir / "images"
    replace_link(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, record) in enumerate(zip(images, made_by)):
        name = f"{i:04d}.png"
        write_atomic(image_dir / name, _png(image))
        rerank = (config["rerank"] or 1) if config.get("unconditional") else config["rerank"] or pipe.settings.rerank
        record = {"file": f"images/{name}", **record, "seed": config["seed"], "index_in_prompt": i % n,
                  "rerank": rerank, **inputs, "settings": vars(pipe.settings)}
        lines.append(json.dumps(record) + "\n")
    write_atomic(run_dir / "samples.jsonl", "".join(lines))
    return write_atomic(run_dir / "grid.png", _png(make_grid(images, n)))


@hydra_job("train_sample")
def main(job: Job) -> None:
    config, run_dir = job.config, job.run_dir
    # The job holds run_dir from before Hydra writes there until it ends (train/_job.py, unclip.run_lock).
    refuse_earlier_output(run_dir, config["overwrite"])
    prompts = read_prompts(config)
    check_request(config, prompts)
    pipe = pipeline_from_config(config["pipeline"])
    images, made_by = sample(pipe, config, prompts)
    remove_earlier_samples(run_dir)  # only now: a failed run leaves the earlier samples as they were
    grid = write_samples(run_dir, pipe, images, made_by, config)
    job.finish({"images": len(images), "grid": str(grid)})


if __name__ == "__main__":
    main()
