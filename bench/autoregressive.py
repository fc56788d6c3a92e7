"""Sampling latency of the DALL-E transformer with and without its key/value cache.

    python bench/autoregressive.py                  # the DALL-E demo's: width 128, depth 4, 24 text + 256 image tokens, batch 8
    python bench/autoregressive.py --image-length 64 --guidance 3
    python bench/autoregressive.py --quick          # tiny counts: checks that it runs, numbers mean nothing

Both paths draw the same tokens for the same seed (the script checks it); the cached one feeds the
transformer one new position per step, the other the whole sequence again. Prints the median seconds of
each and their ratio, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from unclip.autoregressive import TextImageTransformer

END = 49407


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-length", type=int, default=24)
    p.add_argument("--image-length", type=int, default=256, help="image tokens (16x16 dVAE grid: 256)")
    p.add_argument("--image-vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="captions sampled at once")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: off)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.width, args.depth, args.heads, args.image_length, args.runs = 32, 1, 2, 8, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    vocab = [49406, END, *range(100, 140)]  # start, end and 40 word ids
    model = TextImageTransformer(
        text_vocab=vocab, text_length=args.text_length, image_vocab_size=args.image_vocab,
        image_length=args.image_length, width=args.width, depth=args.depth, heads=args.heads,
    ).eval()
    words = torch.randint(100, 140, (args.batch, 8))
    text = torch.cat([torch.full((args.batch, 1), 49406), words, torch.full((args.batch, 1), END)], dim=1)

    def run(use_cache: bool) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        tokens = model.sample(text, guidance_scale=args.guidance, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start, tokens

    seconds, tokens = {}, {}
    for use_cache in (True, False):
        run(use_cache)  # warm-up
        timed = [run(use_cache) for _ in range(args.runs)]
        seconds[use_cache] = statistics.median(t for t, _ in timed)
        tokens[use_cache] = timed[0][1]
    same = torch.equal(tokens[True], tokens[False])
    ratio = seconds[False] / seconds[True]
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {args.text_length} text + {args.image_length} "
          f"image tokens, width {args.width}, depth {args.depth}, guidance {args.guidance}")
    print(f"with the cache    {seconds[True]:8.3f} s ({seconds[True] / args.batch * 1000:.1f} ms per image)")
    print(f"without the cache {seconds[False]:8.3f} s ({seconds[False] / args.batch * 1000:.1f} ms per image)")
    print(f"speed-up {ratio:.2f}x; same tokens: {same}")
    print(json.dumps({"benchmark": "autoregressive_sampling", "config": vars(args), "cached_s": seconds[True],
                      "uncached_s": seconds[False], "speedup": ratio, "same_tokens": same}))
    if not same:
        raise SystemExit("the cached and uncached samplers drew different tokens")


if __name__ == "__main__":
    main()
