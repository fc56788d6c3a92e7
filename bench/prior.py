"""Speed and memory of the diffusion prior, in bf16 autocast and fp32, against DALLE2-pytorch 1.15.6.

    python bench/prior.py                       # width 512, depth 6, 8 heads, batch 32, 77-token captions
    python bench/prior.py --caption-tokens 20   # shorter captions (trailing padding is trimmed)
    python bench/prior.py --quick               # tiny counts: checks that it runs, numbers mean nothing

Measures training samples/s (``model.training_loss`` + backward + AdamW, as the Trainer), its peak memory, the
loss after the same steps on the same synthetic text -> image mapping from the same init in each precision,
and the latency of sampling one caption (2 candidates) without and with guidance. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import json
import math

import common
import torch
import torch.nn.functional as F

from unclip.embedding import TextCondition
from unclip.prior import DiffusionPrior

REFERENCE = {"train_samples_per_s": 13.0, "train_step_s": 2.46, "train_peak_mb": 2.1 * 1024,
             "sample_s": 4.6, "sample_guided_s": 9.2}  # DALLE2-pytorch 1.15.6, fp32, this machine type
MODEL_FLAGS = ("width", "depth", "heads", "embed_dim", "token_dim", "text_length", "batch")


def arguments():
    p = common.parser(__doc__.splitlines()[0], steps=20, warmup=3)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=512, help="CLIP joint embedding width")
    p.add_argument("--token-dim", type=int, default=512, help="width of the CLIP text encoder's token states")
    p.add_argument("--text-length", type=int, default=77)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--caption-tokens", type=int, default=None,
                   help="real tokens in every caption, the rest padding (default: all text-length tokens)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the guided sampling")
    args = common.parse(p)
    args.caption_tokens = args.text_length if args.caption_tokens is None else args.caption_tokens
    if not 1 <= args.caption_tokens <= args.text_length:
        p.error(f"--caption-tokens must be in [1, {args.text_length}], got {args.caption_tokens}")
    # the reference's settings: the default sizes with every caption 77 real tokens
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


def worker(args) -> None:
    """Measure one precision (``args.worker``) in this process; print its numbers as one JSON line."""
    precision, device = args.worker, args.device
    torch.manual_seed(args.seed)  # the same init (and the same timesteps and noise) in every precision
    model = DiffusionPrior(embed_dim=args.embed_dim, token_dim=args.token_dim, text_length=args.text_length,
                           width=args.width, depth=args.depth, heads=args.heads).to(device)
    make_batch = synthetic_batches(args)
    model.fit_normalisation(make_batch(-1, 1024)["image_embed"])
    result = common.train(model, lambda m, b: m.training_loss(b), make_batch, args, precision)

    model.eval()
    one = make_batch(-2, 1)  # ONE caption
    text = TextCondition(embed=one["text_embed"], tokens=torch.zeros(1, args.text_length, dtype=torch.long,
                         device=device), token_embeds=one["token_embeds"], mask=one["mask"])
    for key, scale in (("sample_s", 1.0), ("sample_guided_s", args.guidance)):
        def sample(steps: int, scale=scale):
            with common.autocast(device, precision):
                return model.sample(text, steps=steps, guidance_scale=scale, num_candidates=2)
        result[key] = common.latency(sample, args)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if "profile" in result:
        print(f"top ops of one {precision} training step:\n{result.pop('profile')}")
    print(json.dumps(result))


def report(args, results: dict) -> None:
    ps = list(results)
    any_result = next(iter(results.values()))
    print(f"\nprior: width {args.width}, depth {args.depth}, {args.heads} heads, embed {args.embed_dim}, token states "
          f"{args.text_length} x {args.token_dim}, {any_result['parameters'] / 1e6:.1f}M parameters; batch "
          f"{args.batch}, {args.caption_tokens} real caption tokens")
    print(common.setting(args))
    if args.quick:
        print("quick run: the counts are too small for any number below to mean anything")
    def col(f):
        return {p: f(results[p]) for p in ps}

    summary = {p: common.loss_summary(results[p]["losses"]) for p in ps}
    steps = args.warmup + args.steps
    common.table([
        ("train samples/s", col(lambda r: args.batch / r["step_s"]), REFERENCE["train_samples_per_s"]),
        ("train step, median (s)", col(lambda r: r["step_s"]), REFERENCE["train_step_s"]),
        ("  forward (s)", col(lambda r: r["forward_s"]), None),
        ("  backward (s)", col(lambda r: r["backward_s"]), None),
        ("  grad clip + AdamW" + (" + EMA" if args.ema else "") + " (s)", col(lambda r: r["optimizer_s"]), None),
        (f"peak memory ({'allocated' if args.device.type == 'cuda' else 'process RSS'}, MB)",
         col(lambda r: r["memory"]["peak_mb"]), REFERENCE["train_peak_mb"]),
        ("  growth while training (MB)", col(lambda r: r["memory"]["growth_mb"]), None),
        ("loss at step 1", {p: summary[p]["first"] for p in ps}, None),
        *([(f"loss at step {steps}", {p: summary[p]["last"] for p in ps}, None)] if steps > 1 else []),
        (f"loss, mean of the last {summary[ps[0]]['tail_steps']} steps", {p: summary[p]["tail_mean"] for p in ps}, None),
        (f"sample 1 caption x 2 cand., {args.sample_steps} DDIM (s)", col(lambda r: r["sample_s"]), REFERENCE["sample_s"]),
        (f"  with guidance {args.guidance:g} (s)", col(lambda r: r["sample_guided_s"]), REFERENCE["sample_guided_s"]),
    ], ps, fmt="{:.3f}")
    default = results.get("bf16")
    goals = [
        common.goal("bf16 training samples/s (2x the reference)", default and args.batch / default["step_s"],
                    2 * REFERENCE["train_samples_per_s"], at_least=True, comparable=args.comparable),
        common.goal("bf16 sampling with guidance, s (1/4 of the reference)", default and default["sample_guided_s"],
                    REFERENCE["sample_guided_s"] / 4, at_least=False,
                    comparable=args.comparable and args.sample_steps == 64),
    ]
    common.print_json("prior", args, results=results, loss=summary,
                      reference=REFERENCE, goals=goals)


def main() -> None:
    args = arguments()
    if args.worker:
        worker(args)
    else:
        report(args, common.run_workers(__file__, args))


if __name__ == "__main__":
    main()
