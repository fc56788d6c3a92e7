"""Speed and memory of the diffusion prior, in bf16 autocast and fp32, against DALLE2-pytorch 1.15.6.

    python bench/prior.py                       # width 512, depth 6, 8 heads, batch 32, 77-token captions
    python bench/prior.py --caption-tokens 20   # shorter captions (trailing padding is trimmed)
    python bench/prior.py --batch 32 512        # a report per batch size
    python bench/prior.py --quick               # tiny counts: checks that it runs, numbers mean nothing
    python bench/prior.py --reference DIR       # also DALLE2-pytorch 1.15.6 from DIR, measured here and now
    python bench/prior.py --suite gpu --reference DIR   # issue 16's GPU sizes: batch 32 and 512

Measures training samples/s (``model.training_loss`` + backward + AdamW, as the Trainer), its FLOPs (counted)
and MFU, its peak memory, the loss after the same steps on the same synthetic text -> image mapping from the same
init in each precision, and the latency of sampling one caption (2 candidates) without and with guidance (on
CUDA also without CUDA graphs). Prints a table per batch size, then one JSON line.

``--reference DIR`` also measures DALLE2-pytorch 1.15.6 in the same run, the same training loop
(``common.train``: the Trainer's AdamW, clipping, median of the timed steps) and the same precisions, and then, in
one more process, alternates training steps of ours (at the default precision) with the reference's
(``common.paired``), whose median per-round ratio is the comparison least moved by the machine's drift. Its
prior at the benchmark configuration: ``DiffusionPriorNetwork(dim=width, depth, heads, dim_head=width / heads,
num_timesteps=1000, max_text_len=text_length)`` (otherwise its defaults: rotary embeddings, causal attention
with a relative position bias) in a ``DiffusionPrior`` that conditions on the text embedding and the caption's
token states (padding zeroed, as its mask expects) with ``cond_drop_prob=0.2`` like ours; trained through
``forward(text_embed=, image_embed=, text_encodings=)``, sampled in fp32 with its DDIM ``p_sample_loop`` (2
candidates of one caption). Its network works at the embedding width, so ``--reference`` needs ``--width ==
--embed-dim == --token-dim``. DIR holds the package and what it imports, without replacing our torch::

    pip install --target DIR --no-deps dalle2-pytorch==1.15.6 beartype==0.23.1 clip-anytorch==2.6.0 \\
        CoCa-pytorch==0.1.0 einx==0.4.3 embedding-reader==1.8.1 frozendict==2.5.1 kornia==0.9.0 kornia_rs==0.2.0 \\
        loguru==0.7.3 pytorch-warmup==0.2.0 resize-right==0.0.2 rotary-embedding-torch==0.9.1 \\
        torch-einops-utils==0.2.0 vector-quantize-pytorch==1.32.0 x-clip==0.14.4
"""

from __future__ import annotations

import math

import common
import torch
import torch.nn.functional as F

from unclip.embedding import TextCondition
from unclip.prior import DiffusionPrior

REFERENCE = {"train_samples_per_s": 13.0, "train_step_s": 2.46, "train_peak_mb": 2.1 * 1024,
             "sample_s": 4.6, "sample_guided_s": 9.2}  # DALLE2-pytorch 1.15.6, fp32, the 2-core CPU machine type
MODEL_FLAGS = ("width", "depth", "heads", "embed_dim", "token_dim", "text_length")
DEFAULT_BATCH = 32
SUITE_BATCHES = {"gpu": [32, 512]}
GPU_MFU_BATCH, GPU_MFU, GPU_SPEEDUP = 512, 0.40, 4.0  # issue 16: at batch 512, >= 40% MFU and >= 4x the reference


def arguments():
    p = common.parser(__doc__.splitlines()[0], steps=20, warmup=3, batch=DEFAULT_BATCH)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=512, help="CLIP joint embedding width")
    p.add_argument("--token-dim", type=int, default=512, help="width of the CLIP text encoder's token states")
    p.add_argument("--text-length", type=int, default=77)
    p.add_argument("--caption-tokens", type=int, default=None,
                   help="real tokens in every caption, the rest padding (default: all text-length tokens)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the guided sampling")
    args = common.parse(p, SUITE_BATCHES)
    args.caption_tokens = args.text_length if args.caption_tokens is None else args.caption_tokens
    if not 1 <= args.caption_tokens <= args.text_length:
        p.error(f"--caption-tokens must be in [1, {args.text_length}], got {args.caption_tokens}")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    if args.reference is not None and not args.width == args.embed_dim == args.token_dim:
        p.error(f"--reference: {common.REFERENCE}'s prior works at the embedding width, so --width, --embed-dim and "
                f"--token-dim must be equal (got {args.width}, {args.embed_dim}, {args.token_dim})")
    # the CPU reference numbers: the default sizes with every caption 77 real tokens
    args.comparable = (not args.quick and args.caption_tokens == args.text_length
                       and all(getattr(args, k) == p.get_default(k) for k in MODEL_FLAGS))
    return args


def synthetic_batches(args):
    """``make_batch(i, size)``: step i's batch, the same in every process for the same seed.

    Unit-norm text embeddings, unit-variance token states (like a final LayerNorm's output) with
    ``caption_tokens`` real tokens, and image embeddings from a fixed random linear map of the text embedding.
    """
    d = args.embed_dim
    mapping = torch.randn(d, d, generator=torch.Generator().manual_seed(args.seed)) / math.sqrt(d)

    def make_batch(i: int, size: int = args.batch) -> dict:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + i + 1)
        text_embed = F.normalize(torch.randn(size, d, generator=g), dim=-1)
        token_embeds = torch.randn(size, args.text_length, args.token_dim, generator=g)
        mask = (torch.arange(args.text_length) < args.caption_tokens).expand(size, -1).clone()
        batch = {"image_embed": F.normalize(text_embed @ mapping, dim=-1), "text_embed": text_embed,
                 "token_embeds": token_embeds, "mask": mask}
        return {k: v.to(args.device) for k, v in batch.items()}

    return make_batch


def build(args) -> DiffusionPrior:
    torch.manual_seed(args.seed)  # the same init (and the same timesteps and noise) in every precision
    model = DiffusionPrior(embed_dim=args.embed_dim, token_dim=args.token_dim, text_length=args.text_length,
                           net=dict(width=args.width, depth=args.depth, heads=args.heads)).to(args.device)
    model.fit_normalisation(synthetic_batches(args)(-1, 1024)["image_embed"])
    return model


def our_loss(model, batch):
    return model.training_loss(batch)


def build_reference(args):
    """DALLE2-pytorch 1.15.6's DiffusionPrior at the benchmark configuration, from ``args.reference``; its loss."""
    dalle2_pytorch = common.reference_package(args)
    net = dalle2_pytorch.DiffusionPriorNetwork(dim=args.width, depth=args.depth, heads=args.heads,
                                               dim_head=args.width // args.heads, num_timesteps=1000,
                                               max_text_len=args.text_length)
    model = dalle2_pytorch.DiffusionPrior(net=net, image_embed_dim=args.embed_dim, timesteps=1000,
                                          cond_drop_prob=0.2, condition_on_text_encodings=True).to(args.device)

    def loss(m, b):  # its forward scales image_embed in place: give it a copy; padding must be zeros for its mask
        encodings = b["token_embeds"] * b["mask"][..., None]
        return {"loss": m(text_embed=b["text_embed"], image_embed=b["image_embed"].clone(), text_encodings=encodings)}

    return model, loss


def one_caption(args) -> dict:
    return synthetic_batches(args)(-2, 1)  # ONE caption


def our_worker(args, precision: str) -> dict:
    model = build(args)

    def sampler():
        model.eval()
        one = one_caption(args)
        text = TextCondition(embed=one["text_embed"], token_embeds=one["token_embeds"], mask=one["mask"],
                             tokens=torch.zeros(1, args.text_length, dtype=torch.long, device=args.device))

        def sample(steps: int, scale: float, graphs: str):
            with common.autocast(args.device, precision):
                return model.sample(text, steps=steps, guidance_scale=scale, num_candidates=2, cuda_graphs=graphs)

        return sample

    return common.measure(model, our_loss, synthetic_batches(args), args, precision,
                          None if args.no_sampling else sampler, counted=model)


def reference_worker(args, precision: str) -> dict:
    """DALLE2-pytorch 1.15.6 in ``precision``, as ``our_worker`` measures ours; sampling in fp32 only."""
    torch.manual_seed(args.seed)
    model, loss = build_reference(args)

    def sampler():
        model.eval()
        one = one_caption(args)
        cond = {"text_embed": one["text_embed"].repeat(2, 1),
                "text_encodings": (one["token_embeds"] * one["mask"][..., None]).repeat(2, 1, 1)}
        return lambda steps, scale, graphs: model.p_sample_loop((2, args.embed_dim), text_cond=cond, cond_scale=scale,
                                                                timesteps=steps)

    sampled = not args.no_sampling and precision == "fp32"
    return common.measure(model, loss, synthetic_batches(args), args, precision, sampler if sampled else None,
                          counted=model.net)


def report(args, batch: int, results: dict) -> dict:
    """Print the table and goals of one batch size; return its part of the JSON."""
    pair, columns, ours, parameters = common.report_columns(results)
    print(f"\nprior: width {args.width}, depth {args.depth}, {args.heads} heads, embed {args.embed_dim}, token states "
          f"{args.text_length} x {args.token_dim}, {parameters / 1e6:.1f}M parameters; batch {batch}, "
          f"{args.caption_tokens} real caption tokens")
    common.print_setting(args)
    comparable = args.comparable and batch == DEFAULT_BATCH
    summary = {c: common.loss_summary(results[c]["losses"]) for c in ours}
    steps = args.warmup + args.steps
    rows = [
        *common.training_rows(results, columns, args, batch, REFERENCE, REFERENCE["train_samples_per_s"],
                              REFERENCE["train_step_s"]),
        ("loss at step 1", {c: summary[c]["first"] for c in ours}, None),
        *([(f"loss at step {steps}", {c: summary[c]["last"] for c in ours}, None)] if steps > 1 else []),
        (f"loss, mean of the last {summary[ours[0]]['tail_steps'] if ours else 0} steps",
         {c: summary[c]["tail_mean"] for c in ours}, None),
    ]
    rows += common.sampling_rows(results, columns, "1 caption x 2 cand.", args, REFERENCE)
    common.table(rows, columns, fmt="{:.3f}", last=f"{common.REFERENCE} (fp32, the issue's CPU numbers)")
    default, goals = common.default_goals(results, args, batch)
    chosen = results.get(default) if default else None
    bf16_speed = batch / results["bf16"]["step_s"] if "bf16" in results else None
    goals.append(common.goal("bf16 training samples/s (2x the reference, CPU)", bf16_speed,
                             2 * REFERENCE["train_samples_per_s"], at_least=True,
                             comparable=comparable and args.device.type == "cpu"))
    if "sample_guided_s" in results.get("bf16", {}):  # the pipeline samples in bf16
        goals.append(common.goal("bf16 sampling with guidance, s (1/4 of the reference, CPU)",
                                 results["bf16"]["sample_guided_s"], REFERENCE["sample_guided_s"] / 4, at_least=False,
                                 comparable=comparable and args.device.type == "cpu" and args.sample_steps == 64))
    on_gpu_size = args.device.type == "cuda" and batch == GPU_MFU_BATCH and not args.quick
    if chosen and args.peak is not None:
        goals.append(common.goal(f"batch {batch}: {default} training MFU", common.mfu(
            chosen["train_flops"], chosen["step_s"], args.peak.tflops(default)), GPU_MFU, at_least=True,
            comparable=on_gpu_size))
    if args.device.type == "cuda":
        goals += common.reference_goals(results, pair, args, batch, default, GPU_SPEEDUP, when=on_gpu_size)
    else:
        goals += common.reference_goals(results, pair, args, batch, default, 2.0, when=comparable)
    return {"batch": batch, "default_precision": default, "results": results, "paired": pair, "loss": summary,
            "goals": goals}


def main() -> None:
    common.main("prior", __file__, arguments(), report, REFERENCE, ours=our_worker, reference=reference_worker,
                build=build, loss=our_loss, build_reference=build_reference, batches=synthetic_batches)


if __name__ == "__main__":
    main()
