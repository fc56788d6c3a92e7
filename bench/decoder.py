"""Speed and memory of the decoder, in bf16 autocast and fp32, against DALLE2-pytorch 1.15.6.

    python bench/decoder.py             # 64 px, 64 base channels, mult (1, 2, 4), 2 blocks, batch 8, no caption
    python bench/decoder.py --caption   # with the decoder's caption transformer (conf/decoder/unet_64.yaml)
    python bench/decoder.py --profile   # plus torch.profiler's top ops of one training step
    python bench/decoder.py --quick     # tiny counts: checks that it runs, numbers mean nothing
    python bench/decoder.py --reference DIR   # also DALLE2-pytorch 1.15.6 from DIR, measured here and now
    python bench/decoder.py --suite gpu --reference DIR   # issue 16's GPU sizes: batch 8 and 64

Measures training samples/s (``Decoder.training_loss`` + backward + AdamW, as the Trainer), split into forward,
backward and optimizer, its FLOPs (counted) and MFU, its peak memory, and the latency of sampling one 64-px image
without and with guidance (on CUDA also without CUDA graphs). Prints a table per batch size, then one JSON line.

The reference numbers in the table are the issue's (DALLE2-pytorch 1.15.6, fp32, "this machine type").
Machines of that type differ by tens of percent from session to session, so ``--reference DIR`` also
measures the reference itself, in the same run, the same training loop (``common.train``: the Trainer's
AdamW, clipping, median of the timed steps) and the same sampling latency, and judges the goals against it
too, in each precision (its sampling in fp32); and then, in one more process, alternates steps of ours at the
default precision with the reference's (``common.paired``), whose median per-round ratio is the comparison least
moved by the machine's drift.

Its ``Unet`` at the benchmark configuration: ``dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
self_attn=(False, False, True)`` (attention at 16 px and the middle), ``image_embed_dim=512``, image-embedding
conditioning only; its ``Decoder`` with its defaults (1000 steps, learned variance) and ``sample_timesteps``
set to the DDIM steps. DIR holds the package and what it imports, without replacing our torch::

    pip install --target DIR --no-deps dalle2-pytorch==1.15.6 beartype==0.23.1 clip-anytorch==2.6.0 \
        CoCa-pytorch==0.1.0 einx==0.4.3 embedding-reader==1.8.1 frozendict==2.5.1 kornia==0.9.0 kornia_rs==0.2.0 \
        loguru==0.7.3 pytorch-warmup==0.2.0 resize-right==0.0.2 rotary-embedding-torch==0.9.1 \
        torch-einops-utils==0.2.0 vector-quantize-pytorch==1.32.0 x-clip==0.14.4
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from unclip.decoder import Decoder
from unclip.embedding import TextCondition

REFERENCE = {"train_samples_per_s": 3.9, "train_samples_per_s_caption": 3.6, "train_step_s": 2.03,
             "train_peak_mb": 2.3 * 1024, "sample_s": 7.5, "sample_guided_s": 15.0}  # fp32, this machine type
MODEL_FLAGS = ("image_size", "base_channels", "channel_mult", "res_blocks", "attention", "embed_dim")
DEFAULT_BATCH = 8
SUITE_BATCHES = {"gpu": [8, 64]}
GPU_SPEEDUP = 2.5  # issue 16: at batch 8 and 64 on a GPU, >= 2.5x the reference in the paired rounds


def arguments():
    p = common.parser(__doc__.splitlines()[0], steps=10, warmup=2, batch=DEFAULT_BATCH)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--res-blocks", type=int, default=2, help="residual blocks per level")
    p.add_argument("--attention", type=int, nargs="+", default=[16, 8], help="attention resolutions (pixels)")
    p.add_argument("--embed-dim", type=int, default=512, help="CLIP image embedding width")
    p.add_argument("--caption", action="store_true", help="add the caption transformer (width 256, 2 layers)")
    p.add_argument("--text-length", type=int, default=77)
    p.add_argument("--caption-tokens", type=int, default=None, help="real tokens per caption (default: all)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the guided sampling")
    args = common.parse(p, SUITE_BATCHES)
    if args.reference is not None and args.caption:
        p.error("--reference measures the image-embedding-only configuration; drop --caption")
    args.caption_tokens = args.text_length if args.caption_tokens is None else args.caption_tokens
    if not 1 <= args.caption_tokens <= args.text_length:
        p.error(f"--caption-tokens must be in [1, {args.text_length}], got {args.caption_tokens}")
    args.comparable = not args.quick and all(getattr(args, k) == p.get_default(k) for k in MODEL_FLAGS)
    return args


def build(args) -> Decoder:
    """The benchmark decoder; the same sizes as conf/decoder/unet_64.yaml."""
    torch.manual_seed(args.seed)  # the same init (and the same timesteps and noise) in every precision
    unet = dict(base_channels=args.base_channels, channel_mult=args.channel_mult, num_res_blocks=args.res_blocks,
                attention_resolutions=args.attention, head_channels=64, dropout=0.0)
    return Decoder(image_size=args.image_size, image_embed_dim=args.embed_dim, text_length=args.text_length,
                   unet=unet, num_image_tokens=4, caption="transformer" if args.caption else "none", caption_width=256,
                   caption_layers=2, caption_heads=4).to(args.device)


def our_loss(model, batch):
    return model.training_loss(**batch)


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
    dalle2_pytorch = common.reference_package(args)
    unet = dalle2_pytorch.Unet(dim=args.base_channels, dim_mults=tuple(args.channel_mult),
                               num_resnet_blocks=args.res_blocks, image_embed_dim=args.embed_dim,
                               self_attn=tuple(args.image_size // 2**i in args.attention
                                               for i in range(len(args.channel_mult))),
                               cond_on_image_embeds=True, cond_on_text_encodings=False)
    model = dalle2_pytorch.Decoder(unet=unet, image_size=args.image_size, timesteps=1000).to(args.device)

    def loss(m, b):  # it takes images in [0, 1] (auto_normalize_img) and returns the loss
        return {"loss": m((b["images"] + 1) / 2, image_embed=b["image_embed"])}

    return model, loss


def our_worker(args, precision: str) -> dict:
    model = build(args)

    def sampler():
        model.eval()
        one = synthetic_batches(args)(-1, 1)  # ONE image
        return lambda steps, scale, graphs: _sample_ours(model, one, steps, scale, graphs, args.device, precision)

    return common.measure(model, our_loss, synthetic_batches(args), args, precision,
                          None if args.no_sampling else sampler, counted=model)


def _sample_ours(model, one: dict, steps: int, scale: float, graphs: str, device, precision: str):
    with common.autocast(device, precision):
        return model.sample(one["image_embed"], one["text"], steps=steps, guidance_scale=scale, cuda_graphs=graphs)


def reference_worker(args, precision: str) -> dict:
    """DALLE2-pytorch 1.15.6 in ``precision``, as ``our_worker`` measures ours; sampling in fp32 only."""
    torch.manual_seed(args.seed)
    model, loss = build_reference(args)
    one = synthetic_batches(args)(-1, 1)

    def sample(steps: int, scale: float, graphs: str):
        model.sample_timesteps = (steps,)
        return model.sample(image_embed=one["image_embed"], cond_scale=scale)

    sampled = not args.no_sampling and precision == "fp32"
    return common.measure(model, loss, synthetic_batches(args), args, precision, (lambda: sample) if sampled else None,
                          counted=model.unets)


def report(args, batch: int, results: dict) -> dict:
    """Print the table and goals of one batch size; return its part of the JSON."""
    pair, columns, ours, parameters = common.report_columns(results)
    levels = [args.image_size // 2**i for i in range(len(args.channel_mult))]
    attention = [r for r in args.attention if r in levels]  # resolutions the UNet never reaches are ignored (ADM)
    print(f"\ndecoder: {args.image_size} px, {args.base_channels} base channels, mult {tuple(args.channel_mult)}, "
          f"{args.res_blocks} blocks a level, attention at {attention} px and the middle ({levels[-1]} px), "
          f"{'caption transformer' if args.caption else 'no caption'}, {parameters / 1e6:.1f}M parameters; "
          f"batch {batch}")
    common.print_setting(args)
    comparable = args.comparable and batch == DEFAULT_BATCH
    reference_speed = REFERENCE["train_samples_per_s_caption" if args.caption else "train_samples_per_s"]
    rows = [
        *common.training_rows(results, columns, args, batch, REFERENCE, reference_speed,
                              None if args.caption else REFERENCE["train_step_s"]),
        (f"loss, mean of the last {common.loss_summary(results[ours[0]]['losses'])['tail_steps'] if ours else 0} steps",
         {c: common.loss_summary(results[c]["losses"])["tail_mean"] for c in ours}, None),  # not the ref's loss
    ]
    rows += common.sampling_rows(results, columns, "1 image", args, REFERENCE)
    common.table(rows, columns, fmt="{:.3f}", last=f"{common.REFERENCE} (fp32, the issue's CPU numbers)")
    default, goals = common.default_goals(results, args, batch)
    on_cpu = comparable and args.device.type == "cpu"
    bf16 = results.get("bf16", {})
    goals.append(common.goal("bf16 training samples/s (2x the reference, CPU)",
                             batch / bf16["step_s"] if bf16 else None, 2 * reference_speed, at_least=True,
                             comparable=on_cpu))
    if "sample_guided_s" in bf16:  # the pipeline samples in bf16
        goals.append(common.goal("bf16 sampling with guidance, s (1/2 of the reference, CPU)", bf16["sample_guided_s"],
                                 REFERENCE["sample_guided_s"] / 2, at_least=False,
                                 comparable=on_cpu and args.sample_steps == 64))
        here = results.get(common.REF + "fp32", {})
        if "sample_guided_s" in here:
            goals.append(common.goal(f"bf16 sampling with guidance, s (1/2 of {common.REF}fp32)",
                                     bf16["sample_guided_s"], here["sample_guided_s"] / 2, at_least=False,
                                     comparable=not args.quick))
    if args.device.type == "cuda":
        on_gpu_size = batch in SUITE_BATCHES["gpu"] and not args.quick and not args.caption
        goals += common.reference_goals(results, pair, args, batch, default, GPU_SPEEDUP, when=on_gpu_size)
    else:
        goals += common.reference_goals(results, pair, args, batch, default, 2.0, when=not args.quick)
    return {"batch": batch, "default_precision": default, "results": results, "paired": pair,
            "loss": {c: common.loss_summary(results[c]["losses"]) for c in ours}, "goals": goals}


def main() -> None:
    common.main("decoder", __file__, arguments(), report, REFERENCE, ours=our_worker, reference=reference_worker,
                build=build, loss=our_loss, build_reference=build_reference, batches=synthetic_batches)


if __name__ == "__main__":
    main()
