"""Super-resolution by a trained upsampler on `shapes`: PSNR against the true render and the judge, per sampling steps.

    python bench/upsampler.py outputs/demo/upsampler_256                 # 64 val scenes, 15 steps
    python bench/upsampler.py outputs/demo/upsampler_256 --steps 5 10 15 25 --count 128
    python bench/upsampler.py DIR --quick                                # tiny counts: checks that it runs

True renders at the stage's input size (e.g. 64 px) are upsampled (bf16 autocast on the CPU, as the pipeline samples)
and compared with true renders at its output size (256 px): PSNR and its gain over bicubic upsampling of the same
input, and the judge's accuracies (``unclip.eval.judge``, after its own resampling) beside those of the input, of
bicubic and of the truth; seconds per image at each step count. Prints the table, then one JSON line. Issue 25's
goal: the 64 -> 256 stage >= 2 dB above bicubic on >= 64 val scenes, judged as right as its input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import torch

from unclip.checkpoint import load_stage
from unclip.eval.upsampler import format_rows, super_resolution

GOAL_DB = 2.0  # issue 25: PSNR gain over bicubic of the 64 -> 256 stage


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="outputs/demo/upsampler_256",
                   help="an upsampler stage's run directory or checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--count", type=int, default=64, help="val scenes")
    p.add_argument("--steps", type=int, nargs="+", default=[15], help="sampling step counts, one row each")
    p.add_argument("--aug-level", type=float, default=0.05, help="the conditioning's noise level, as the pipeline's")
    p.add_argument("--split", default="val", choices=["val", "heldout"])
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.count, args.steps = 2, [2]
    if not Path(args.checkpoint).exists():
        p.error(f"no upsampler at {args.checkpoint}: train one (python train/demo.py data.image_size=256) or name one")
    if args.count < 1 or min(args.steps) < 1:
        p.error(f"--count and --steps must be >= 1, got {args.count} and {args.steps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = common.parse_device(p, args.device)
    return args


def main() -> None:
    args = arguments()
    upsampler = load_stage(args.checkpoint, stage="upsampler").model.to(args.device).eval()
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16)
    result = super_resolution(upsampler, count=args.count, steps=args.steps, aug_level=args.aug_level,
                              split=args.split, autocast=autocast)
    print(f"{result['sizes'][0]} -> {result['sizes'][1]} px on {args.count} {args.split} scenes of shapes")
    print(format_rows(result))
    best = max(row.get("psnr_gain_db", float("-inf")) for name, row in result["rows"].items() if name.startswith("steps"))
    comparable = not args.quick and args.count >= 64 and result["sizes"] == [64, 256]
    goal = common.goal("PSNR gain over bicubic, dB", best, GOAL_DB, at_least=True, comparable=comparable)
    config = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "upsampler", "device": str(args.device), "config": config, **result,
                      "goals": [goal]}))


if __name__ == "__main__":
    main()
