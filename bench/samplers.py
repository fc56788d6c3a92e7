"""Steps against fidelity for every sampler and timestep spacing, stage by stage, on a saved pipeline (issue 27).

    python bench/samplers.py                                    # outputs/demo/pipeline, the full table
    python bench/samplers.py outputs/demo/pipeline --stages decoder --samplers ddim dpmpp_2m --steps 8 10 25
    python bench/samplers.py PIPELINE --items 16 --spacings uniform logsnr
    python bench/samplers.py PIPELINE --quick                   # tiny counts: checks that it runs

For each sampler x spacing x steps:

- ``decoder``: the true CLIP image embeddings of the balanced prompt set's scenes (val, held-out, pair; ``--items``
  each) decoded without a caption (``pipe.decode``, the upsamplers at the pipeline's settings), judged: the share
  all right per split, as the demo's ``fidelity_variations``;
- ``prior``: text -> image on the same scenes (``pipe.generate``, the pipeline's re-ranking unless ``--rerank``)
  with the decoder fixed at DDIM (``--fixed-decoder-steps``, default 25, uniform, eta 0): the demo's ``fidelity``;
- ``upsampler_<i>``: true renders at its input size super-resolved (``unclip.eval.upsampler.super_resolution``,
  ``--items`` val scenes): PSNR against the true render, and its gain over bicubic.

Each row has the seconds per image of the stage measured (its ``sample`` calls alone) under the pipeline's
autocast. The same seed everywhere, so rows differ by the sampler, the spacing and the steps alone. Prints the
table, then one JSON line. The network evaluations per image are ``steps`` for every sampler (twice that with
guidance, batched as one call).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unclip.diffusion import SAMPLERS, SPACINGS, check_sampler
from unclip.eval.prompt_set import balanced_scenes, text_to_image_fidelity, variations_fidelity
from unclip.eval.upsampler import super_resolution
from unclip.pipelines import load_pipeline

STAGES = ("decoder", "prior", "upsampler")
SPLITS = ("val", "heldout", "pair")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", nargs="?", default="outputs/demo/pipeline", help="a saved pipeline directory")
    p.add_argument("--items", type=int, default=24, help="scenes per split (the upsampler: val scenes)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 15, 25, 50])
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "dpmpp_2s"], choices=SAMPLERS)
    p.add_argument("--spacings", nargs="+", default=list(SPACINGS), choices=SPACINGS)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--rerank", type=int, default=None, help="the prior rows' re-ranking (default: the pipeline's)")
    p.add_argument("--fixed-decoder-steps", type=int, default=25, help="the prior rows' decoder: DDIM, this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.items, args.steps, args.spacings = 2, [4], ["uniform", "karras"]
        args.rerank, args.fixed_decoder_steps = 1, 3
    if not (Path(args.pipeline) / "pipeline.json").is_file():
        p.error(f"{args.pipeline} is not a saved pipeline (no pipeline.json): train one (make demo) or name one")
    if args.items < 1 or min(args.steps) < 1 or args.fixed_decoder_steps < 1 or (args.rerank or 1) < 1:
        p.error(f"--items, --steps, --rerank and --fixed-decoder-steps must be >= 1, got {args.items}, {args.steps}, "
                f"{args.rerank} and {args.fixed_decoder_steps}")
    for sampler in args.samplers:
        try:
            check_sampler(sampler, min(args.steps))
        except ValueError as err:
            p.error(f"--steps {min(args.steps)} with --samplers {sampler}: {err}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


class StageTimer:
    """Seconds spent in ``module.sample`` and the images it made, while installed."""

    def __init__(self, module) -> None:
        self.module, self.seconds, self.images = module, 0.0, 0

    def __enter__(self):
        original = self.module.sample

        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.images += len(out)
            return out

        self.module.sample = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.module.sample  # the class's method again

    @property
    def per_image(self) -> float:
        return self.seconds / max(self.images, 1)


def _all_right(report: dict, prefix: str) -> dict:
    return {split: report[f"{prefix}{split}/all"] for split in SPLITS if f"{prefix}{split}/all" in report}


def decoder_row(pipe, scenes, sampler: str, spacing: str, steps: int, args) -> dict:
    settings = dict(decoder_sampler=sampler, decoder_spacing=spacing, decoder_steps=steps, decoder_eta=0.0)
    with StageTimer(pipe.decoder) as timer:
        report = variations_fidelity(pipe, scenes, seed=args.seed, prefix="", **settings)
    return {**_all_right(report, ""), "val_colour": report.get("val/colour"), "val_shape": report.get("val/shape"),
            "seconds_per_image": timer.per_image}


def prior_row(pipe, scenes, sampler: str, spacing: str, steps: int, args) -> dict:
    settings = dict(prior_sampler=sampler, prior_spacing=spacing, prior_steps=steps, decoder_sampler="ddim",
                    decoder_spacing="uniform", decoder_steps=args.fixed_decoder_steps, decoder_eta=0.0)
    if args.rerank is not None:
        settings["rerank"] = args.rerank
    with StageTimer(pipe.prior) as timer:
        report = text_to_image_fidelity(pipe, scenes, seed=args.seed, prefix="", **settings)
    return {**_all_right(report, ""), "seconds_per_image": timer.per_image}


def upsampler_rows(pipe, sampler: str, spacing: str, args) -> list[dict]:
    rows = []
    for index, upsampler in enumerate(pipe.upsamplers):
        result = super_resolution(upsampler, count=args.items, steps=args.steps, seed=args.seed,
                                  autocast=pipe.autocast(), sampler=sampler, spacing=spacing)
        for steps in args.steps:
            row = result["rows"][f"steps={steps}"]
            rows.append({"stage": f"upsampler_{index}", "sampler": sampler, "spacing": spacing, "steps": steps,
                         "psnr": row["psnr"], "psnr_gain_db": row["psnr_gain_db"],
                         "seconds_per_image": row["seconds_per_image"]})
    return rows


def measure(pipe, args) -> list[dict]:
    scenes = balanced_scenes({split: args.items for split in SPLITS}, seed=args.seed)
    rows = []
    for stage in args.stages:
        for sampler in args.samplers:
            for spacing in args.spacings:
                if stage == "upsampler":
                    new = upsampler_rows(pipe, sampler, spacing, args)
                else:
                    row_of = decoder_row if stage == "decoder" else prior_row
                    new = [{"stage": stage, "sampler": sampler, "spacing": spacing, "steps": steps,
                            **row_of(pipe, scenes, sampler, spacing, steps, args)} for steps in args.steps]
                for row in new:
                    print(format_row(row), flush=True)
                rows += new
    return rows


COLUMNS = ("val", "heldout", "pair", "psnr", "psnr_gain_db", "seconds_per_image")


def format_row(row: dict) -> str:
    cells = []
    for key in COLUMNS:
        value = row.get(key)
        cells.append("-" if value is None else f"{value:.0%}" if key in SPLITS else f"{value:.3f}")
    return f"{row['stage']:<12}{row['sampler']:<10}{row['spacing']:<9}{row['steps']:>6} " + " ".join(
        f"{cell:>13}" for cell in cells)


def main() -> None:
    args = arguments()
    pipe = load_pipeline(args.pipeline)
    if "upsampler" in args.stages and not pipe.upsamplers:
        print("(the pipeline has no upsampler: no upsampler rows)")
    print(f"pipeline {args.pipeline} ({pipe.image_size} px) on {pipe.device}, {args.items} scenes per split, "
          f"seed {args.seed}; decoder rows: true embeddings decoded; prior rows: text -> image, decoder DDIM-"
          f"{args.fixed_decoder_steps}; all right per split")
    print(f"{'stage':<12}{'sampler':<10}{'spacing':<9}{'steps':>6} " + " ".join(f"{c:>13}" for c in COLUMNS))
    rows = measure(pipe, args)
    config = {key: value for key, value in vars(args).items()}
    print(json.dumps({"benchmark": "samplers", "device": str(pipe.device), "config": config, "rows": rows}))


if __name__ == "__main__":
    main()
