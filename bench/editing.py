"""Issue 14's acceptance numbers for a trained pipeline's image editing, on ``shapes`` val scenes, judged from pixels.

    python bench/editing.py PIPELINE_DIR [--inpainting-decoder RUN_DIR] [--scenes 64] [--out DIR]
    python bench/editing.py PIPELINE_DIR --quick      # 4 scenes, 2 steps a stage: checks that it runs

Measures (a val scene's first object masked: its box plus unclip.decoder.inpainting's margin):
* replace: the prompt names another colour and shape at the object's size and place; success = the judge finds that
  colour+shape centred in the mask's box. With the inpainting decoder (if given) and RePaint at each --repaint-jumps;
* outside: the max abs difference to the input outside the mask (1/255, over every inpainted image);
* seam: mean |neighbour difference| (1/255) across the mask's border in the output, and in the input;
* remove: no prompt; success = no object centred in the mask's box;
* img2img: strength -> share keeping the source's position, share with the prompt's colour+shape;
* mix: a red circle image and "a blue square" at text weights 0 / 0.5 / 1 -> shares judged red circle, blue square;
* negative: "a circle" without and with the negative prompt "red" -> share of red circles.
Prints a table, writes <out>/metrics.json and example grids (<out>/*.png, 8 columns: inputs, masks, outputs), and
ends with one JSON line. --parts picks the measures (e.g. the inpainting decoder's alone once it is trained).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image

from unclip.data.shapes import (
    DEFAULT_HELDOUT,
    POSITION_PHRASES,
    POSITIONS,
    ShapeObject,
    ShapesDataset,
    allowed_combos,
    render,
)
from unclip.decoder.inpainting import object_box, object_mask
from unclip.eval.judge import judge
from unclip.images import save_grid, to_pil
from unclip.pipelines import DEFAULT_JUMPS, UnCLIPPipeline

PARTS = ("replace", "remove", "img2img", "mix", "negative")
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
SHOWN = 8  # examples a grid row


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", help="a saved pipeline directory")
    p.add_argument("--inpainting-decoder", default=None, help="an inpainting decoder's checkpoint or run directory")
    p.add_argument("--repaint-jumps", type=int, nargs="*", default=[0, DEFAULT_JUMPS],
                   help="RePaint with the pipeline's own decoder at each of these jumps (none: skip RePaint)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--scenes", type=int, default=64, help="val scenes (and images per mix / negative setting)")
    p.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    p.add_argument("--decoder-steps", type=int, default=None, help="default: the pipeline's setting")
    p.add_argument("--upsampler-steps", type=int, default=None, help="default: the pipeline's setting")
    p.add_argument("--prior-steps", type=int, default=None, help="default: the pipeline's setting")
    p.add_argument("--out", default="editing", help="where metrics.json and the grids go")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="4 scenes, 2 steps a stage: check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.scenes, args.decoder_steps, args.upsampler_steps, args.prior_steps = 4, 2, 2, 2
    for name in ("scenes", "batch", "decoder_steps", "upsampler_steps", "prior_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(j < 0 for j in args.repaint_jumps):
        p.error(f"--repaint-jumps must be >= 0, got {args.repaint_jumps}")
    if not (Path(args.pipeline) / "pipeline.json").is_file():
        p.error(f"{args.pipeline} is not a saved pipeline (no pipeline.json); give a pipeline directory")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = common.parse_device(p, args.device)
    return args


def val_scenes(count: int, size: int) -> list[tuple[Image.Image, dict]]:
    """(image, its first object's metadata) for ``count`` val scenes at ``size`` px."""
    data = ShapesDataset(split="val", length=count, image_size=size, seed=14)
    return [(to_pil(item["image"][None])[0], item["meta"]["objects"][0]) for item in (data[i] for i in range(count))]


def other_object(obj: dict, index: int) -> tuple[str, str]:
    """A training colour-shape pair with another colour and another shape than ``obj``'s (fixed by ``index``)."""
    combos = [(c, s) for c, s in allowed_combos("train", DEFAULT_HELDOUT) if c != obj["colour"] and s != obj["shape"]]
    return random.Random(index).choice(combos)


def fill_mask(obj: dict, size: int) -> Image.Image:
    return Image.fromarray((object_mask(size, obj).numpy() * 255).astype(np.uint8), "L")


def centred_in(objects, box, colour: str | None = None, shape: str | None = None) -> bool:
    return any(box[0] <= o.centre[0] <= box[2] and box[1] <= o.centre[1] <= box[3]
               and colour in (None, o.colour) and shape in (None, o.shape) for o in objects)


def first_is(image: Image.Image, colour: str | None, shape: str | None) -> bool:
    objects = judge(image).objects
    return bool(objects) and colour in (None, objects[0].colour) and shape in (None, objects[0].shape)


def seam_stats(source: Image.Image, output: Image.Image, mask: Image.Image) -> tuple[float, float]:
    """Mean |difference| of neighbouring pixels (1/255, over channels) across the mask's border: output, input."""
    src, out = (np.asarray(i, dtype=np.float32) for i in (source, output))
    fill = np.asarray(mask) > 127
    seam, src_seam = [], []
    for axis in (0, 1):
        a, b = [slice(None)] * 2, [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        across = fill[tuple(a)] != fill[tuple(b)]
        seam.append(np.abs(out[tuple(a)] - out[tuple(b)]).mean(-1)[across])
        src_seam.append(np.abs(src[tuple(a)] - src[tuple(b)]).mean(-1)[across])
    return float(np.concatenate(seam).mean()), float(np.concatenate(src_seam).mean())


def batched(call, count: int, batch: int) -> list[Image.Image]:
    """``call(chunk, seed)`` over slices of ``count`` items, ``batch`` at a time; the chunk's start is its seed."""
    return [image for start in range(0, count, batch) for image in call(slice(start, start + batch), start)]


def replace_and_remove(variants: dict, items, args, grids: dict) -> dict:
    size = variants[next(iter(variants))][0].image_size
    images = [image for image, _ in items]
    masks = [fill_mask(obj, size) for _, obj in items]
    boxes = [object_box(obj) for _, obj in items]
    targets = [other_object(obj, i) for i, (_, obj) in enumerate(items)]
    prompts = [f"a {obj['size']} {c} {s} {POSITION_PHRASES[obj['position']][0]}"
               for (c, s), (_, obj) in zip(targets, items)]
    metrics: dict = {}
    for name, (pipe, jumps) in variants.items():
        for part, prompt_list in (("replace", prompts), ("remove", None)):
            if part not in args.parts:
                continue
            started = time.time()
            outputs = batched(lambda c, seed: pipe.inpaint(images[c], masks[c], None if prompt_list is None else
                                                           prompt_list[c], jumps=jumps, seed=seed),
                              len(items), args.batch)
            judged = [judge(o).objects for o in outputs]
            if part == "replace":
                hits = [centred_in(j, box, c, s) for j, box, (c, s) in zip(judged, boxes, targets)]
            else:
                hits = [not centred_in(j, box) for j, box in zip(judged, boxes)]
            metrics[f"{part}_success[{name}]"] = float(np.mean(hits))
            metrics[f"{part}_seconds[{name}]"] = time.time() - started
            outside = [np.abs(np.asarray(o, np.int16) - np.asarray(i, np.int16)).max(-1)[np.asarray(m) <= 127].max()
                       for o, i, m in zip(outputs, images, masks)]
            seams = np.asarray([seam_stats(i, o, m) for o, i, m in zip(outputs, images, masks)]).mean(0)
            metrics[f"{part}_outside_max_abs_diff_255[{name}]"] = float(max(outside))
            metrics[f"{part}_seam_255[{name}]"], metrics[f"{part}_input_seam_255[{name}]"] = map(float, seams)
            rows = images[:SHOWN] + [m.convert("RGB") for m in masks[:SHOWN]] + outputs[:SHOWN]
            grids[f"{part}_{name}"] = rows
    return metrics


def img2img_table(pipe, items, args, grids: dict) -> dict:
    images = [image for image, _ in items]
    targets = [other_object(obj, i) for i, (_, obj) in enumerate(items)]
    prompts = [f"a {c} {s}" for c, s in targets]
    metrics, rows = {}, list(images[:SHOWN])
    for strength in STRENGTHS:
        outputs = batched(lambda c, seed: pipe.img2img(images[c], prompts[c], strength, seed=seed), len(items),
                          args.batch)
        judged = [judge(o).objects for o in outputs]
        metrics[f"img2img_keeps_position[{strength:g}]"] = float(np.mean(
            [bool(j) and j[0].position == obj["position"] for j, (_, obj) in zip(judged, items)]))
        metrics[f"img2img_follows_prompt[{strength:g}]"] = float(np.mean(
            [bool(j) and (j[0].colour, j[0].shape) == t for j, t in zip(judged, targets)]))
        rows += outputs[:SHOWN]
    grids["img2img"] = rows
    return metrics


def mix_shares(pipe, args, grids: dict) -> dict:
    red_circle = render([ShapeObject("red", "circle", "large", "centre", POSITIONS["centre"])], pipe.image_size)
    metrics, rows = {}, []
    for weight in (0.0, 0.5, 1.0):
        items = [(red_circle, 1 - weight), ("a blue square", weight)]
        outputs = batched(lambda c, seed: pipe.mix(items, len(range(args.scenes)[c]), seed=seed, eta=1.0),
                          args.scenes, args.batch)
        for name, (colour, shape) in (("red_circle", ("red", "circle")), ("blue_square", ("blue", "square"))):
            metrics[f"mix_{name}[text weight {weight:g}]"] = float(np.mean([first_is(o, colour, shape)
                                                                           for o in outputs]))
        rows += outputs[:SHOWN]
    grids["mix"] = [red_circle] * SHOWN + rows  # a row of the source image, then a row per weight
    return metrics


def negative_shares(pipe, args, grids: dict) -> dict:
    metrics, rows = {}, []
    for label, negative in (("without", None), ("with", "red")):
        outputs = batched(lambda c, seed: pipe.generate("a circle", len(range(args.scenes)[c]), seed=seed,
                                                        negative_prompt=negative), args.scenes, args.batch)
        metrics[f"negative_red_circles[{label} 'red']"] = float(np.mean([first_is(o, "red", "circle")
                                                                         for o in outputs]))
        metrics[f"negative_circles[{label} 'red']"] = float(np.mean([first_is(o, None, "circle") for o in outputs]))
        rows += outputs[:SHOWN]
    grids["negative_red"] = rows
    return metrics


def main() -> None:
    args = arguments()
    started = time.time()
    steps = {k: v for k, v in (("prior_steps", args.prior_steps), ("decoder_steps", args.decoder_steps),
                               ("upsampler_steps", args.upsampler_steps)) if v is not None}
    pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device)
    pipe.settings = pipe._settings(steps)
    variants = {}
    if args.inpainting_decoder:
        inpainter = UnCLIPPipeline.from_pretrained(args.pipeline, decoder=args.inpainting_decoder, device=args.device)
        inpainter.settings = pipe.settings
        variants["inpainting decoder"] = (inpainter, 0)
    variants.update({f"repaint j={j}": (pipe, j) for j in args.repaint_jumps})
    items = val_scenes(args.scenes, pipe.image_size)
    grids: dict = {}
    metrics: dict = {}
    if variants and {"replace", "remove"} & set(args.parts):
        metrics.update(replace_and_remove(variants, items, args, grids))
    if "img2img" in args.parts:
        metrics.update(img2img_table(pipe, items, args, grids))
    if "mix" in args.parts:
        metrics.update(mix_shares(pipe, args, grids))
    if "negative" in args.parts:
        metrics.update(negative_shares(pipe, args, grids))
    metrics["minutes"] = (time.time() - started) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, images in grids.items():
        save_grid(images, out / f"{name.replace(' ', '_').replace('=', '')}.png", columns=SHOWN)
    config = {**{k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
              "settings": vars(pipe.settings)}
    (out / "metrics.json").write_text(json.dumps({"config": config, "metrics": metrics}, indent=1))
    for key, value in metrics.items():
        print(f"{key:55s} {value:8.3f}")
    print(json.dumps({"benchmark": "editing", "config": config, "metrics": metrics}, default=str))


if __name__ == "__main__":
    main()
