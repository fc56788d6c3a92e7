"""Training-step time of the demo's CLIP with each CPU attention kernel: the math one (what the Trainer uses for a CLIP
on the CPU, ``unclip.attention_kernels``) against the kernel SDPA picks itself (flash).

    python bench/clip_training.py              # conf/clip/tiny_vit.yaml, 64 items + 64 twins at 64 px, as the demo
    python bench/clip_training.py --steps 30   # more alternated rounds
    python bench/clip_training.py --quick      # tiny counts: checks that it runs, numbers mean nothing

Both kernels train the same model in one process, alternating a step of each (the same batch, the Trainer's AdamW,
clipping, bf16 autocast where the CPU computes bf16 natively, as ``trainer.mixed_precision=auto`` does), so the
machine's drift moves both alike; prints each kernel's median step, forward and backward, the median per-round
ratio, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from itertools import product
from pathlib import Path

import common
import torch
from omegaconf import OmegaConf

from unclip.attention_kernels import training_attention
from unclip.clip import ContrastiveLoss
from unclip.config import build
from unclip.data.shapes import COLOURS, SHAPES
from unclip.training.precision import cpu_has_native_bf16

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "clip" / "tiny_vit.yaml"
KERNELS = ("math", "sdpa")  # math: unclip.attention_kernels on the CPU; sdpa: SDPA's own choice (flash)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="images a step (the demo: 64 items and their 64 twins)")
    p.add_argument("--steps", type=int, default=12, help="timed rounds (a step of each kernel)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 where the CPU computes it natively, as trainer.mixed_precision=auto")
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.quick:
        args.batch, args.steps, args.warmup = 8, 2, 1
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    args.device, args.ema = torch.device("cpu"), True
    return args


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(OmegaConf.to_container(OmegaConf.load(CONFIG)))
    captions = [f"a small {c} {s} at the {p}" for c, s, p in product(COLOURS, SHAPES, ("top", "bottom", "left"))]
    batch = {"image": torch.rand(args.batch, 3, 64, 64),
             "caption": [captions[i % len(captions)] for i in range(args.batch)]}
    step = common.train_step(model, ContrastiveLoss(), args, args.precision)
    kernels = {"math": lambda: training_attention(model, args.device),  # the Trainer's choice for a CLIP
               "sdpa": nullcontext}
    times = {k: [] for k in KERNELS}
    for i in range(args.warmup + args.steps):
        for kernel in KERNELS:
            with kernels[kernel]():
                _, seconds = step(batch)
            if i >= args.warmup:
                times[kernel].append(seconds)
        print(f"  round {i + 1}/{args.warmup + args.steps}: " + ", ".join(
            f"{k} {sum(times[k][-1]) if times[k] else float('nan'):.3f} s" for k in KERNELS), flush=True)
    result = {"batch": args.batch, "precision": args.precision, "threads": torch.get_num_threads()}
    print(f"\nCLIP training step ({CONFIG.name}, batch {args.batch}, {args.precision}, "
          f"{torch.get_num_threads()} threads), median of {args.steps}:")
    print(f"{'kernel':<8}{'step s':>9}{'forward s':>11}{'backward s':>12}")
    for kernel in KERNELS:
        phases = [statistics.median(column) for column in zip(*times[kernel])]
        step_s = statistics.median(sum(s) for s in times[kernel])
        result[kernel] = {"step_s": step_s, "forward_s": phases[0], "backward_s": phases[1]}
        print(f"{kernel:<8}{step_s:>9.3f}{phases[0]:>11.3f}{phases[1]:>12.3f}")
    ratio = statistics.median(sum(a) / sum(b) for a, b in zip(times["math"], times["sdpa"]))
    result["math_over_sdpa"] = ratio
    print(f"math / sdpa step time, median per round: {ratio:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
