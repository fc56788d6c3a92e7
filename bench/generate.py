"""Latency of text -> image: one caption to one guided 64-px (or 256-px) image through UnCLIPPipeline.generate.

    python bench/generate.py            # 1 caption, prior 64 DDIM steps (guidance 2), decoder 64 (guidance 3)
    python bench/generate.py --size 256 # and the 64 -> 256 upsampler of conf/upsampler/unet_64_256.yaml, 15 steps
    python bench/generate.py --pipeline outputs/demo/pipeline   # a trained pipeline at its saved settings
    python bench/generate.py --pipeline outputs/demo/pipeline --settings decoder_sampler=dpmpp_2m decoder_steps=10
    python bench/generate.py --quick    # tiny counts: checks that it runs, numbers mean nothing

The stages have the benchmark sizes, at random weights (the time does not depend on them): open_clip's ViT-B-32
(its text tower encodes the caption), the prior of bench/prior.py (width 512, depth 6, 8 heads, 2 candidates), the
decoder of conf/decoder/unet_64.yaml (64 px, with its caption transformer), no upsampler (``--size 256``: the 64 -> 256
stage of conf/upsampler/unet_64_256.yaml after it). ``--pipeline DIR`` times a saved pipeline instead, with its own
settings (re-ranking included; the step flags then override them only where given). Times the median of
``--runs`` calls of ``generate`` (at the pipeline's precision: bf16 where the device computes it natively, else
float32) after one untimed call; on CUDA with and without CUDA graphs. Prints a line per setting, then one JSON
line. Issue 16's goal, on a GPU: <= 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common
import torch
from omegaconf import OmegaConf

from unclip.clip import OpenClipEncoder
from unclip.config import build
from unclip.decoder import Decoder
from unclip.pipelines import UnCLIPPipeline, load_pipeline
from unclip.prior import DiffusionPrior

UPSAMPLER_256 = Path(__file__).resolve().parents[1] / "conf" / "upsampler" / "unet_64_256.yaml"
GOAL_S = 0.25  # issue 16: a guided text -> 64-px image at batch 1 on an H100-class GPU


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--prompts", type=int, default=1, help="captions per call (one image each)")
    p.add_argument("--prior-steps", type=int, default=None, help="(default: 64, or a --pipeline's own)")
    p.add_argument("--prior-guidance", type=float, default=None, help="(default: 2, or a --pipeline's own)")
    p.add_argument("--decoder-steps", type=int, default=None, help="(default: 64, or a --pipeline's own)")
    p.add_argument("--decoder-guidance", type=float, default=None, help="(default: 3, or a --pipeline's own)")
    p.add_argument("--size", type=int, choices=[64, 256], default=64, help="256: add the 64 -> 256 upsampler")
    p.add_argument("--upsampler-steps", type=int, default=None, help="(default: 15, or a --pipeline's own)")
    p.add_argument("--pipeline", default=None, help="a saved pipeline's directory, timed at its own settings")
    p.add_argument("--settings", nargs="*", default=[],
                   help="more generation settings (numbers and lists as JSON, else text), e.g. decoder_sampler=dpmpp_2m upsampler_steps=16")
    p.add_argument("--runs", type=int, default=5, help="timed calls (median)")
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    if any("=" not in item for item in args.settings):
        p.error(f"--settings takes name=value pairs, got {args.settings}")
    args.settings = {key: _value(value) for key, value in (item.split("=", 1) for item in args.settings)}
    if args.pipeline is None:
        defaults = dict(prior_steps=64, prior_guidance=2.0, decoder_steps=64, decoder_guidance=3.0, upsampler_steps=15)
        for name, value in defaults.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if args.quick:
        args.prior_steps, args.decoder_steps, args.upsampler_steps, args.runs = 4, 4, 2, 1
    for name in ("prompts", "prior_steps", "decoder_steps", "upsampler_steps", "runs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.device = common.parse_device(p, args.device)
    return args


def _value(text: str):
    """A --settings value: JSON where it parses (10, 0.5, [16, 35]), else the text itself (dpmpp_2m)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def pipeline(device: torch.device, size: int, path: str | None) -> UnCLIPPipeline:
    if path is not None:
        return load_pipeline(path, device=device)
    torch.manual_seed(0)
    clip = OpenClipEncoder(model_name="ViT-B-32", name="bench")
    space = clip.space
    prior = DiffusionPrior(embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length,
                           net=dict(width=512, depth=6, heads=8))
    unet = dict(base_channels=64, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                head_channels=64, dropout=0.0)
    decoder = Decoder(image_size=64, image_embed_dim=space.dim, text_length=space.text_length, unet=unet,
                      caption="transformer", caption_width=256, caption_layers=2, caption_heads=4)
    upsamplers = [build(OmegaConf.to_container(OmegaConf.load(UPSAMPLER_256)))] if size == 256 else []
    return UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=upsamplers).to(device)


def latency(pipe: UnCLIPPipeline, prompts: list[str], args, cuda_graphs: str) -> float:
    settings = dict(prior_steps=args.prior_steps, prior_guidance=args.prior_guidance, decoder_steps=args.decoder_steps,
                    decoder_guidance=args.decoder_guidance, upsampler_steps=args.upsampler_steps, cuda_graphs=cuda_graphs)
    settings = {**{name: value for name, value in settings.items() if value is not None}, **args.settings}
    pipe.generate(prompts, seed=0, output="tensor", **settings)  # untimed: lazy initialisation, cuDNN's choices
    seconds = []
    for run in range(args.runs):
        start = common.now(args.device)
        images = pipe.generate(prompts, seed=run, output="tensor", **settings)
        seconds.append(common.now(args.device) - start)
    assert images.shape == (len(prompts), 3, pipe.image_size, pipe.image_size)
    return statistics.median(seconds)


def main() -> None:
    args = arguments()
    pipe = pipeline(args.device, args.size, args.pipeline)
    prompts = [f"a red circle number {i}" for i in range(args.prompts)]
    modes = ["auto", "off"] if args.device.type == "cuda" else ["auto"]
    results = {}
    for mode in modes:
        results[mode] = latency(pipe, prompts, args, mode)
        graphs = "with CUDA graphs" if mode == "auto" and args.device.type == "cuda" else "without CUDA graphs"
        config = pipe._settings({**{k: v for k, v in vars(args).items() if k in vars(pipe.settings) and v is not None},
                                 **args.settings})
        print(f"text -> {pipe.image_size} px, {len(prompts)} caption(s), prior {config.prior_steps} "
              f"{config.prior_sampler} + decoder {config.decoder_steps} {config.decoder_sampler} guided steps"
              + (f", upsamplers {config.upsampler_steps} {config.upsampler_sampler}" if pipe.upsamplers else "")
              + f", rerank {config.rerank}, {graphs}: {results[mode]:.3f} s (median of {args.runs})")
    value = results["auto"]
    comparable = args.device.type == "cuda" and not args.quick and args.prompts == 1 and pipe.image_size == 64 and (
        args.prior_steps, args.decoder_steps, args.pipeline, args.settings) == (64, 64, None, {})
    goal = common.goal("guided text -> 64-px image at batch 1, s", value, GOAL_S, at_least=False, comparable=comparable)
    device = str(args.device) + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    config = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "generate", "device": device, "torch": torch.__version__, "config": config,
                      "seconds": results, "goals": [goal]}))


if __name__ == "__main__":
    main()
