"""Speed and memory of the decoder, in bf16 autocast and fp32, against DALLE2-pytorch 1.15.6.

    python bench/decoder.py             # 64 px, 64 base channels, mult (1, 2, 4), 2 blocks, batch 8, no caption
    python bench/decoder.py --caption   # with the decoder's caption transformer (conf/decoder/unet_64.yaml)
    python bench/decoder.py --profile   # plus torch.profiler's top ops of one training step
    python bench/decoder.py --quick     # tiny counts: checks that it runs, numbers mean nothing
    python bench/decoder.py --reference DIR   # also DALLE2-pytorch 1.15.6 from DIR, measured here and now

Measures training samples/s (``Decoder.training_loss`` + backward + AdamW, as the Trainer), split into forward,
backward and optimizer, its peak memory, and the latency of sampling one 64-px image without and with
guidance. Prints a table, then one JSON line.

The reference numbers in the table are the issue's (DALLE2-pytorch 1.15.6, fp32, "this machine type").
Machines of that type differ by tens of percent from session to session, so ``--reference DIR`` also
measures the reference itself, in the same run, the same training loop (``common.train``: the Trainer's
AdamW, clipping, median of the timed steps) and the same sampling latency, and judges the goals against it
too; and then, in one more process, alternates bf16 steps of ours with the reference's fp32 steps
(``common.paired``), whose median per-round ratio is the comparison least moved by the machine's drift.

Its ``Unet`` at the benchmark configuration: ``dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
self_attn=(False, False, True)`` (attention at 16 px and the middle), ``image_embed_dim=512``, image-embedding
conditioning only; its ``Decoder`` with its defaults (1000 steps, learned variance) and ``sample_timesteps``
set to the DDIM steps. DIR holds the package and what it imports, without replacing our torch::

    pip install --target DIR --no-deps dalle2-pytorch==1.15.6 kornia kornia_rs resize-right \
        rotary-embedding-torch x-clip coca-pytorch clip-anytorch vector-quantize-pytorch pytorch-warmup \
        embedding-reader torchmetrics lightning-utilities beartype einx frozendict loguru torch-einops-utils
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from unclip.decoder import Decoder
from unclip.embedding import TextCondition

REFERENCE = {"train_samples_per_s": 3.9, "train_samples_per_s_caption": 3.6, "train_step_s": 2.03,
             "train_peak_mb": 2.3 * 1024, "sample_s": 7.5, "sample_guided_s": 15.0}  # fp32, this machine type
MODEL_FLAGS = ("image_size", "base_channels", "channel_mult", "res_blocks", "attention", "embed_dim", "batch")


def arguments():
    p = common.parser(__doc__.splitlines()[0], steps=10, warmup=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--res-blocks", type=int, default=2, help="residual blocks per level")
    p.add_argument("--attention", type=int, nargs="+", default=[16, 8], help="attention resolutions (pixels)")
    p.add_argument("--embed-dim", type=int, default=512, help="CLIP image embedding width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--caption", action="store_true", help="add the caption transformer (width 256, 2 layers)")
    p.add_argument("--text-length", type=int, default=77)
    p.add_argument("--caption-tokens", type=int, default=None, help="real tokens per caption (default: all)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the guided sampling")
    p.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help="also measure DALLE2-pytorch 1.15.6, installed in DIR (see the module docstring)")
    args = common.parse(p)
    if args.reference is not None and not (args.reference / "dalle2_pytorch").is_dir():
        p.error(f"--reference {args.reference}: no dalle2_pytorch package there; install it with the command in "
                "this script's docstring")
    if args.reference is not None and args.caption:
        p.error("--reference measures the image-embedding-only configuration; drop --caption")
    args.caption_tokens = args.text_length if args.caption_tokens is None else args.caption_tokens
    if not 1 <= args.caption_tokens <= args.text_length:
        p.error(f"--caption-tokens must be in [1, {args.text_length}], got {args.caption_tokens}")
    args.comparable = not args.quick and all(getattr(args, k) == p.get_default(k) for k in MODEL_FLAGS)
    return args


def build(args) -> Decoder:
    """The benchmark decoder; the same sizes as conf/decoder/unet_64.yaml."""
    unet = dict(base_channels=args.base_channels, channel_mult=args.channel_mult, num_res_blocks=args.res_blocks,
                attention_resolutions=args.attention, head_channels=64, dropout=0.0, num_image_tokens=4)
    return Decoder(image_size=args.image_size, image_embed_dim=args.embed_dim, text_length=args.text_length,
                   unet=unet, caption="transformer" if args.caption else "none", caption_width=256,
                   caption_layers=2, caption_heads=4)


def synthetic_batches(args):
    """``make_batch(i, size)``: step i's batch, the same in every process for the same seed.

    Smooth random images in [-1, 1], unit-norm image embeddings and, with ``--caption``, captions of
    ``caption_tokens`` random token ids.
    """
    def make_batch(i: int, size: int = args.batch) -> dict:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + i + 1)
        coarse = torch.randn(size, 3, 8, 8, generator=g)
        images = torch.tanh(F.interpolate(coarse, size=args.image_size, mode="bilinear", align_corners=False))
        image_embed = F.normalize(torch.randn(size, args.embed_dim, generator=g), dim=-1)
        text = None
        if args.caption:
            mask = (torch.arange(args.text_length) < args.caption_tokens).expand(size, -1).clone()
            tokens = torch.randint(1, 49408, (size, args.text_length), generator=g) * mask
            text = TextCondition(embed=image_embed, tokens=tokens, mask=mask,
                                 token_embeds=torch.zeros(size, args.text_length, 1))  # unused by the transformer
            text = text.to(args.device)
        return {"images": images.to(args.device), "image_embed": image_embed.to(args.device), "text": text}

    return make_batch


def build_reference(args):
    """DALLE2-pytorch 1.15.6's Decoder at the benchmark configuration, from ``args.reference``; and its loss."""
    sys.path.insert(0, str(args.reference))
    import dalle2_pytorch

    if dalle2_pytorch.__version__ != "1.15.6":
        print(f"warning: {args.reference} holds dalle2_pytorch {dalle2_pytorch.__version__}, not 1.15.6",
              file=sys.stderr)
    unet = dalle2_pytorch.Unet(dim=args.base_channels, dim_mults=tuple(args.channel_mult),
                               num_resnet_blocks=args.res_blocks, image_embed_dim=args.embed_dim,
                               self_attn=tuple(args.image_size // 2**i in args.attention
                                               for i in range(len(args.channel_mult))),
                               cond_on_image_embeds=True, cond_on_text_encodings=False)
    model = dalle2_pytorch.Decoder(unet=unet, image_size=args.image_size, timesteps=1000).to(args.device)
    # It takes images in [0, 1] (auto_normalize_img) and returns the loss.
    def loss(m, b):
        return {"loss": m((b["images"] + 1) / 2, image_embed=b["image_embed"])}

    return model, loss


def reference_worker(args) -> None:
    """Measure DALLE2-pytorch 1.15.6 from ``args.reference`` in fp32, as ``worker`` measures ours."""
    torch.manual_seed(args.seed)
    model, loss = build_reference(args)
    make_batch = synthetic_batches(args)
    result = common.train(model, loss, make_batch, args, "fp32")
    one = make_batch(-1, 1)
    for key, scale in (("sample_s", 1.0), ("sample_guided_s", args.guidance)):
        def sample(steps: int, scale=scale):
            model.sample_timesteps = (steps,)
            return model.sample(image_embed=one["image_embed"], cond_scale=scale)
        result[key] = common.latency(sample, args)
    result["parameters"] = sum(p.numel() for p in model.unets.parameters())
    result.pop("profile", None)
    print(json.dumps(result))


def paired_worker(args) -> None:
    """Alternate bf16 training steps of ours with fp32 steps of the reference, in one process."""
    torch.manual_seed(args.seed)
    ours = build(args).to(args.device)
    reference, reference_loss = build_reference(args)
    steps = {"bf16": common.train_step(ours, lambda m, b: m.training_loss(**b), args, "bf16"),
             common.HERE: common.train_step(reference, reference_loss, args, "fp32")}
    print(json.dumps(common.paired(steps, synthetic_batches(args), args)))


def worker(args) -> None:
    """Measure one precision (``args.worker``) in this process; print its numbers as one JSON line."""
    if args.worker == common.HERE:
        return reference_worker(args)
    if args.worker == common.PAIRED:
        return paired_worker(args)
    precision, device = args.worker, args.device
    torch.manual_seed(args.seed)  # the same init (and the same timesteps and noise) in every precision
    model = build(args).to(device)
    make_batch = synthetic_batches(args)
    result = common.train(model, lambda m, b: m.training_loss(**b), make_batch, args, precision)

    model.eval()
    one = make_batch(-1, 1)  # ONE image
    for key, scale in (("sample_s", 1.0), ("sample_guided_s", args.guidance)):
        def sample(steps: int, scale=scale):
            with common.autocast(device, precision):
                return model.sample(one["image_embed"], one["text"], steps=steps, guidance_scale=scale)
        result[key] = common.latency(sample, args)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if "profile" in result:
        print(f"top ops of one {precision} training step:\n{result.pop('profile')}")
    print(json.dumps(result))


def report(args, results: dict) -> None:
    pair = results.pop(common.PAIRED, None)
    ps = list(results)
    ours = [p for p in ps if p != common.HERE]
    any_result = results[ours[0]] if ours else results[ps[0]]
    levels = [args.image_size // 2**i for i in range(len(args.channel_mult))]
    attention = [r for r in args.attention if r in levels]  # resolutions the UNet never reaches are ignored (ADM)
    print(f"\ndecoder: {args.image_size} px, {args.base_channels} base channels, mult {tuple(args.channel_mult)}, "
          f"{args.res_blocks} blocks a level, attention at {attention} px and the middle ({levels[-1]} px), "
          f"{'caption transformer' if args.caption else 'no caption'}, {any_result['parameters'] / 1e6:.1f}M "
          f"parameters; batch {args.batch}")
    print(common.setting(args))
    if args.quick:
        print("quick run: the counts are too small for any number below to mean anything")
    reference_speed = REFERENCE["train_samples_per_s_caption" if args.caption else "train_samples_per_s"]
    def col(f):
        return {p: f(results[p]) for p in ps}

    def share(r, phase):
        return 100 * r[phase] / r["step_s"]

    common.table([
        ("train samples/s", col(lambda r: args.batch / r["step_s"]), reference_speed),
        ("train step, median (s)", col(lambda r: r["step_s"]), None if args.caption else REFERENCE["train_step_s"]),
        ("  forward (s)", col(lambda r: r["forward_s"]), None),
        ("  backward (s)", col(lambda r: r["backward_s"]), None),
        ("  grad clip + AdamW" + (" + EMA" if args.ema else "") + " (s)", col(lambda r: r["optimizer_s"]), None),
        ("  forward / backward / optimizer (%)",
         col(lambda r: "/".join(f"{share(r, k):.0f}" for k in ("forward_s", "backward_s", "optimizer_s"))), None),
        (f"peak memory ({'allocated' if args.device.type == 'cuda' else 'process RSS'}, MB)",
         col(lambda r: r["memory"]["peak_mb"]), REFERENCE["train_peak_mb"]),
        ("  growth while training (MB)", col(lambda r: r["memory"]["growth_mb"]), None),
        (f"loss, mean of the last {common.loss_summary(any_result['losses'])['tail_steps']} steps",
         {p: common.loss_summary(results[p]["losses"])["tail_mean"] for p in ours}, None),  # not the ref's loss
        (f"sample 1 image, {args.sample_steps} DDIM (s)", col(lambda r: r["sample_s"]), REFERENCE["sample_s"]),
        (f"  with guidance {args.guidance:g} (s)", col(lambda r: r["sample_guided_s"]), REFERENCE["sample_guided_s"]),
    ], ps, fmt="{:.3f}")
    default = results.get("bf16")
    goals = [
        common.goal("bf16 training samples/s (2x the reference)", default and args.batch / default["step_s"],
                    2 * reference_speed, at_least=True, comparable=args.comparable),
        common.goal("bf16 sampling with guidance, s (1/2 of the reference)", default and default["sample_guided_s"],
                    REFERENCE["sample_guided_s"] / 2, at_least=False,
                    comparable=args.comparable and args.sample_steps == 64),
    ]
    here = results.get(common.HERE)
    if here:
        print(f"{common.HERE}: {common.REFERENCE} (fp32) measured in this run "
              f"({here['parameters'] / 1e6:.1f}M parameters)")
        goals += [
            common.goal(f"bf16 training samples/s (2x {common.HERE})", default and args.batch / default["step_s"],
                        2 * args.batch / here["step_s"], at_least=True, comparable=not args.quick),
            common.goal(f"bf16 sampling with guidance, s (1/2 of {common.HERE})",
                        default and default["sample_guided_s"], here["sample_guided_s"] / 2, at_least=False,
                        comparable=not args.quick),
        ]
    if pair:
        ratio = pair[f"{common.HERE}/bf16"]
        print(f"{common.PAIRED}: bf16 and {common.HERE} steps alternated in one process over {args.steps} rounds: "
              f"median step {pair['bf16_step_s']:.3f} s vs {pair[common.HERE + '_step_s']:.3f} s")
        goals.append(common.goal(f"bf16 training speed / {common.HERE}'s, median of the paired rounds", ratio, 2.0,
                                 at_least=True, comparable=not args.quick))
    common.print_json("decoder", args, results=results, paired=pair,
                      loss={p: common.loss_summary(results[p]["losses"]) for p in ours},
                      reference=REFERENCE, goals=goals)


def main() -> None:
    args = arguments()
    if args.worker:
        worker(args)
    else:
        extra = [common.HERE, common.PAIRED] if args.reference else []
        report(args, common.run_workers(__file__, args, args.precisions + extra))


if __name__ == "__main__":
    main()
