"""Peak training memory and step time without and with activation checkpointing (trainer.activation_checkpointing).

    python bench/checkpointing.py                    # every model at its CPU batch, bf16 autocast
    python bench/checkpointing.py --suite gpu        # the batches of a GPU run (where the memory matters)
    python bench/checkpointing.py --models decoder upsampler --batch 32
    python bench/checkpointing.py --quick            # tiny models and counts: checks that it runs

The models, at the sizes of the configs that train them:

- ``decoder``: the 64-px decoder (conf/decoder/unet_64.yaml): UNet of 64 base channels, mult 1-2-4, 2 blocks a
  level, attention at 16 and 8 px and the middle, the caption transformer (width 256, 2 layers, 77 tokens);
- ``upsampler``: the 64 -> 256 upsampler of conf/upsampler/unet_64_256.yaml as it trains, on random 64-px crops of
  256-px images (convolutions only: 16 base channels, mult 1-2-4-4, 1 block a level);
- ``prior``: the prior of bench/prior.py (width 512, depth 6, 77 caption tokens of width 512);
- ``dalle``: the DALL-E transformer of conf/dalle (width 256, depth 4, 24 text + 256 image tokens).

How it measures: every (model, off/on) runs in a fresh process (``--worker MODEL:off`` / ``MODEL:on``), built from
the same seed. A step is the Trainer's: the loss under autocast, backward, gradient clipping, AdamW
(``common.train_step``). One step at batch 1 first loads the kernels and allocates AdamW's state; then the peak
memory of one step at the measured batch (``common.PeakMemory``): on CUDA ``torch.cuda.max_memory_allocated``
(what tensors hold, not the allocator's cache) and its growth over what was allocated before the step (model,
AdamW state, batch); on the CPU the process's peak RSS (``ru_maxrss``: the only exact peak the CPU has, hence one
process per measurement) and its growth over the peak before the step, which misses the part of the step's peak
that stays under that earlier peak (the batch-1 step's, small). The growth is what checkpointing acts on: the
activations kept for the backward, the gradients and the temporaries. Then ``--warmup`` untimed and ``--steps``
timed steps: the median step time and the slowdown (on / off; one run on a busy machine is noisy: take numbers on
an idle one). Prints a table per model and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from unclip.activation_checkpointing import enable_activation_checkpointing
from unclip.autoregressive import TextImageTransformer
from unclip.config import build
from unclip.decoder import Decoder
from unclip.embedding import TextCondition
from unclip.prior import DiffusionPrior
from unclip.training.config import TrainerConfig
from unclip.training.optim import make_optimizer

UPSAMPLER_256 = Path(__file__).resolve().parents[1] / "conf" / "upsampler" / "unet_64_256.yaml"
MODELS = ("decoder", "upsampler", "prior", "dalle")
BATCHES = {None: {"decoder": 16, "upsampler": 32, "prior": 256, "dalle": 32},
           "gpu": {"decoder": 128, "upsampler": 256, "prior": 2048, "dalle": 256}}
END = 49407  # CLIP's end-of-text id


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--batch", type=int, default=None, help="training batch of every model (default: its own, see "
                                                             f"the suite: CPU {BATCHES[None]}, gpu {BATCHES['gpu']})")
    p.add_argument("--suite", choices=common.SUITES, default=None, help="gpu: the GPU batches")
    p.add_argument("--precision", choices=common.PRECISIONS, default="bf16", help="autocast bf16, or fp32")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, batch 2 and counts: check that it runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: MODEL:off or MODEL:on, measured in this process
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = common.parse_device(p, args.device)
    args.peak = None  # common.print_json's
    return args


def batch_of(args, model: str) -> int:
    return args.batch or (2 if args.quick else BATCHES[args.suite][model])


# -- the models: (model, loss, make_batch(i, size)) ---------------------------------------------------------
def _generator(args, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed * 1_000_003 + i + 1)


def _images(g: torch.Generator, size: int, pixels: int) -> torch.Tensor:
    """Smooth random images in [-1, 1]."""
    coarse = torch.randn(size, 3, 8, 8, generator=g)
    return torch.tanh(F.interpolate(coarse, size=pixels, mode="bilinear", align_corners=False))


def decoder(args):
    quick = args.quick
    unet = dict(base_channels=32 if quick else 64, channel_mult=[1, 2] if quick else [1, 2, 4],
                num_res_blocks=1 if quick else 2, attention_resolutions=[8] if quick else [16, 8],
                head_channels=16 if quick else 64)
    pixels, text_length, embed_dim = (16, 8, 32) if quick else (64, 77, 512)
    model = Decoder(image_size=pixels, image_embed_dim=embed_dim, text_length=text_length, unet=unet,
                    num_image_tokens=4, caption="transformer", caption_width=32 if quick else 256,
                    caption_layers=1 if quick else 2, caption_heads=2 if quick else 4)

    def make_batch(i: int, size: int) -> dict:
        g = _generator(args, i)
        embed = F.normalize(torch.randn(size, embed_dim, generator=g), dim=-1)
        tokens = torch.randint(1, 49408, (size, text_length), generator=g)
        text = TextCondition(embed=embed, tokens=tokens, mask=torch.ones(size, text_length, dtype=torch.bool),
                             token_embeds=torch.zeros(size, text_length, 1))  # unused by the caption transformer
        return {"images": _images(g, size, pixels).to(args.device), "image_embed": embed.to(args.device),
                "text": text.to(args.device)}

    return model, lambda model, batch: model.training_loss(**batch), make_batch


def upsampler(args):
    config = OmegaConf.to_container(OmegaConf.load(UPSAMPLER_256))
    if args.quick:
        config.update(low_res_size=8, image_size=32, train_crop=16, unet={**config["unet"], "channel_mult": [1, 2]})
    model = build(config)
    pixels = model.image_size

    def make_batch(i: int, size: int) -> dict:
        return {"images": _images(_generator(args, i), size, pixels).to(args.device)}

    return model, lambda model, batch: model.training_loss(batch["images"]), make_batch


def prior(args):
    width, depth, heads, embed_dim, text_length = (32, 2, 2, 32, 8) if args.quick else (512, 6, 8, 512, 77)
    model = DiffusionPrior(embed_dim=embed_dim, token_dim=embed_dim, text_length=text_length,
                           net=dict(width=width, depth=depth, heads=heads))
    model.fit_normalisation(F.normalize(torch.randn(256, embed_dim, generator=_generator(args, -10)), dim=-1))

    def make_batch(i: int, size: int) -> dict:
        g = _generator(args, i)
        batch = {"image_embed": F.normalize(torch.randn(size, embed_dim, generator=g), dim=-1),
                 "text_embed": F.normalize(torch.randn(size, embed_dim, generator=g), dim=-1),
                 "token_embeds": torch.randn(size, text_length, embed_dim, generator=g),
                 "mask": torch.ones(size, text_length, dtype=torch.bool)}
        return {k: v.to(args.device) for k, v in batch.items()}

    return model, lambda model, batch: model.training_loss(batch), make_batch


def dalle(args):
    width, depth, heads, image_length = (32, 2, 2, 16) if args.quick else (256, 4, 4, 256)
    text_length, words = 24, 40
    model = TextImageTransformer(text_vocab=[49406, END, *range(100, 100 + words)], text_length=text_length,
                                 image_vocab_size=512, image_length=image_length, width=width, depth=depth, heads=heads)

    def make_batch(i: int, size: int) -> dict:
        g = _generator(args, i)
        caption = torch.randint(100, 100 + words, (size, 12), generator=g)
        text = torch.cat([torch.full((size, 1), 49406), caption, torch.full((size, 1), END)], dim=1)
        image = torch.randint(0, 512, (size, image_length), generator=g)
        return {"text": text.to(args.device), "image": image.to(args.device)}

    return model, lambda model, batch: model.training_loss(batch["text"], batch["image"]), make_batch


BUILDERS = {"decoder": decoder, "upsampler": upsampler, "prior": prior, "dalle": dalle}


# -- a worker: one model, checkpointing off or on ---------------------------------------------------------
def training_step(model, loss_fn, args):
    """The Trainer's step (as ``common.train_step``: the loss under autocast, backward, clipping, AdamW), and its
    optimizer: ``(step(batch) -> (loss, seconds), optimizer)``."""
    config = TrainerConfig()
    optimizer = make_optimizer(model, config)
    model.train()

    def step(batch: dict) -> tuple[torch.Tensor, float]:
        start = common.now(args.device)
        with common.autocast(args.device, args.precision):
            loss = loss_fn(model, batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), common.now(args.device) - start

    return step, optimizer


def tensor_tracker(model, optimizer):
    """On the CPU: torch's ``MemTracker`` (torch.distributed._tools, where this torch has it), which follows every
    tensor's storage, so its peak is that of the bytes tensors hold (the parameters, gradients, AdamW state,
    activations and temporaries: the CPU's counterpart of CUDA's ``max_memory_allocated``); else None."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a torch without distributed, or one that moved the tool
        return None
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    return tracker


def measure(args, name: str, checkpointing: bool) -> dict:
    torch.manual_seed(args.seed)
    model, loss_fn, make_batch = BUILDERS[name](args)
    model.to(args.device)
    layers = enable_activation_checkpointing(model) if checkpointing else 0
    step, optimizer = training_step(model, loss_fn, args)
    step(make_batch(-1, 1))  # kernels loaded, AdamW's state allocated
    gc.collect()
    batch = batch_of(args, name)
    measured = make_batch(0, batch)
    tracker = tensor_tracker(model, optimizer) if args.device.type == "cpu" else None
    memory = common.PeakMemory(args.device)
    with tracker or contextlib.nullcontext():
        loss, _ = step(measured)
    result = {"memory": memory.result(), "first_loss": loss.item(), "checkpointed_layers": layers,
              "parameters": sum(p.numel() for p in model.parameters())}
    if tracker is not None:
        peak = tracker.get_tracker_snapshot("peak")
        result["memory"]["tensor_peak_mb"] = sum(device["Total"] for device in peak.values()) / 2**20
    del measured, tracker
    seconds = []
    for i in range(args.warmup + args.steps):
        _, took = step(make_batch(i + 1, batch))
        if i >= args.warmup:
            seconds.append(took)
        print(f"  {name} {'on' if checkpointing else 'off'} step {i + 1}/{args.warmup + args.steps}: {took:.3f} s",
              file=sys.stderr, flush=True)
    result["step_s"] = statistics.median(seconds)
    return result


def report(args, name: str, results: dict) -> dict:
    off, on = results[f"{name}:off"], results[f"{name}:on"]
    batch = batch_of(args, name)
    print(f"\n{name}: {off['parameters'] / 1e6:.1f}M parameters, batch {batch}, {args.precision}; "
          f"{on['checkpointed_layers']} checkpointed layers")

    ratios = {}

    def row(label: str, key: str, memory: bool = True) -> tuple[str, dict, None]:
        a, b = (r["memory"].get(key) if memory else r[key] for r in (off, on))
        ratios[key] = b / a if a and b is not None else None
        return label, {"off": a, "on": b, "on/off": ratios[key]}, None

    rows = [row("peak allocated (MB)", "peak_mb"), row("  growth in one training step (MB)", "growth_mb")]
    if args.device.type == "cpu":
        rows = [row("peak tensor memory (MemTracker, MB)", "tensor_peak_mb"),
                row("peak process RSS (MB)", "peak_mb"), row("  RSS growth in one training step (MB)", "growth_mb")]
    rows.append(row("train step, median (s)", "step_s", memory=False))
    common.table(rows, ["off", "on", "on/off"], fmt="{:.3f}")
    return {"model": name, "batch": batch, "off": off, "on": on, "slowdown": ratios.pop("step_s"),
            "memory_ratios": ratios}


def main() -> None:
    args = arguments()
    if args.worker:
        name, state = args.worker.split(":")
        print(json.dumps(measure(args, name, state == "on")))  # the parent reads this last line
        return
    workers = [f"{name}:{state}" for name in args.models for state in ("off", "on")]
    results = common.run_workers(__file__, args, workers)
    device = str(args.device) + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    print(f"\n{device}, threads {torch.get_num_threads()}, torch {torch.__version__}; the peak of one training step, "
          f"then the median of {args.steps} timed steps after {args.warmup} warm-up")
    if args.quick:
        print("quick run: the models and counts are too small for any number below to mean anything")
    runs = [report(args, name, results) for name in args.models]
    common.print_json("checkpointing", args, runs=runs)


if __name__ == "__main__":
    main()
