"""Latency of text -> image: one caption to one guided 64-px image through UnCLIPPipeline.generate.

    python bench/generate.py            # 1 caption, prior 64 DDIM steps (guidance 2), decoder 64 (guidance 3)
    python bench/generate.py --quick    # tiny counts: checks that it runs, numbers mean nothing

The stages have the benchmark sizes, at random weights (the time does not depend on them): open_clip's ViT-B-32
(its text tower encodes the caption), the prior of bench/prior.py (width 512, depth 6, 8 heads, 2 candidates), the
decoder of conf/decoder/unet_64.yaml (64 px, with its caption transformer), no upsampler. Times the median of
``--runs`` calls of ``generate`` (bf16 autocast, as the pipeline samples) after one untimed call; on CUDA with
and without CUDA graphs. Prints a line per setting, then one JSON line. Issue 16's goal, on a GPU: <= 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import statistics

import common
import torch

from unclip.clip import OpenClipEncoder
from unclip.decoder import Decoder
from unclip.pipelines import UnCLIPPipeline
from unclip.prior import DiffusionPrior

GOAL_S = 0.25  # issue 16: a guided text -> 64-px image at batch 1 on an H100-class GPU


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--prompts", type=int, default=1, help="captions per call (one image each)")
    p.add_argument("--prior-steps", type=int, default=64)
    p.add_argument("--prior-guidance", type=float, default=2.0)
    p.add_argument("--decoder-steps", type=int, default=64)
    p.add_argument("--decoder-guidance", type=float, default=3.0)
    p.add_argument("--runs", type=int, default=5, help="timed calls (median)")
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.prior_steps, args.decoder_steps, args.runs = 4, 4, 1
    for name in ("prompts", "prior_steps", "decoder_steps", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.device = common.parse_device(p, args.device)
    return args


def pipeline(device: torch.device) -> UnCLIPPipeline:
    torch.manual_seed(0)
    clip = OpenClipEncoder(model_name="ViT-B-32", name="bench")
    space = clip.space
    prior = DiffusionPrior(embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length,
                           net=dict(width=512, depth=6, heads=8))
    unet = dict(base_channels=64, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                head_channels=64, dropout=0.0)
    decoder = Decoder(image_size=64, image_embed_dim=space.dim, text_length=space.text_length, unet=unet,
                      caption="transformer", caption_width=256, caption_layers=2, caption_heads=4)
    return UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder).to(device)


def latency(pipe: UnCLIPPipeline, prompts: list[str], args, cuda_graphs: str) -> float:
    settings = dict(prior_steps=args.prior_steps, prior_guidance=args.prior_guidance,
                    decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, cuda_graphs=cuda_graphs)
    pipe.generate(prompts, seed=0, output="tensor", **settings)  # untimed: lazy initialisation, cuDNN's choices
    seconds = []
    for run in range(args.runs):
        start = common.now(args.device)
        images = pipe.generate(prompts, seed=run, output="tensor", **settings)
        seconds.append(common.now(args.device) - start)
    assert images.shape == (len(prompts), 3, 64, 64)
    return statistics.median(seconds)


def main() -> None:
    args = arguments()
    pipe = pipeline(args.device)
    prompts = [f"a red circle number {i}" for i in range(args.prompts)]
    modes = ["auto", "off"] if args.device.type == "cuda" else ["auto"]
    results = {}
    for mode in modes:
        results[mode] = latency(pipe, prompts, args, mode)
        graphs = "with CUDA graphs" if mode == "auto" and args.device.type == "cuda" else "without CUDA graphs"
        print(f"text -> 64 px, {len(prompts)} caption(s), prior {args.prior_steps} + decoder {args.decoder_steps} "
              f"guided DDIM steps, {graphs}: {results[mode]:.3f} s (median of {args.runs})")
    value = results["auto"]
    comparable = args.device.type == "cuda" and not args.quick and args.prompts == 1 and (
        args.prior_steps, args.decoder_steps) == (64, 64)
    goal = common.goal("guided text -> 64-px image at batch 1, s", value, GOAL_S, at_least=False, comparable=comparable)
    device = str(args.device) + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    config = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "generate", "device": device, "torch": torch.__version__, "config": config,
                      "seconds": results, "goals": [goal]}))


if __name__ == "__main__":
    main()
