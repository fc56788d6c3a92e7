"""How noisy and how costly the distribution metrics are: FID, KID, precision/recall of a saved pipeline on `shapes`'
balanced prompt set, over sampling seeds and sample counts, with the seconds each part costs.

    python bench/metrics.py outputs/demo/pipeline                          # counts 128 256 512, seeds 0 1 2
    python bench/metrics.py outputs/demo/pipeline --counts 256 --seeds 0 1 2 --settings rerank=1
    python bench/metrics.py outputs/demo/pipeline --quick                  # tiny counts: checks that it runs

The prompts are the balanced set's scenes (val, held-out and pair in the demo's proportions 5 : 2 : 2, drawn once);
the seeds vary only the sampling. Each seed generates the largest count once and every smaller count measures the
first images of each split (nested sets, as FID-against-n curves are drawn), so ``gen s`` of a smaller count is its
share of that one generation (seconds per image times the count). Real images are the renders of the same scenes; the floor compares them with the
renders of another draw of the set, the ceilings with the mean image and with noise. Prints a row per (count, seed),
then FID's mean and std over the seeds per count, then one JSON line. Features: the pipeline's CLIP (``--features``
and ``--inception-weights`` as in conf/metrics/default.yaml).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from unclip.eval.distribution import calibration, feature_space, image_set_metrics
from unclip.eval.pipeline import generate_for
from unclip.eval.prompt_set import balanced_scenes
from unclip.images import from_pil
from unclip.pipelines import load_pipeline


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", help="a saved pipeline directory (e.g. outputs/demo/pipeline)")
    p.add_argument("--counts", type=int, nargs="+", default=[128, 256, 512], help="images per measurement")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--settings", nargs="*", default=[], help="generation settings, e.g. rerank=1 decoder_steps=16")
    p.add_argument("--features", default="clip")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.counts, args.seeds = [12], [0, 1]
    if min(args.counts) < 9:
        p.error(f"--counts must be >= 9 (the set's three splits), got {min(args.counts)}")
    try:
        args.settings = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.settings)}
    except ValueError as err:
        p.error(f"--settings takes name=value pairs (JSON values), got {args.settings}: {err}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def split_counts(count: int) -> dict[str, int]:
    """``count`` scenes as val : held-out : pair = 5 : 2 : 2 (the demo's 120 / 48 / 48)."""
    pair = heldout = 2 * count // 9
    return {"val": count - pair - heldout, "heldout": heldout, "pair": pair}


def scenes(count: int, seed: int, largest: int | None = None) -> list:
    """``count`` balanced scenes: the first of each split of the set drawn for ``largest`` (default ``count``)."""
    drawn = balanced_scenes(split_counts(largest or count), seed=seed)
    return [scene for split, n in split_counts(count).items() for scene in drawn[split][:n]]


def rows_of(count: int, largest: int) -> list[int]:
    """Where ``scenes(count, s, largest)`` lie in ``scenes(largest, s)``."""
    starts = dict(zip(split_counts(largest), [0, *itertools.accumulate(split_counts(largest).values())]))
    return [starts[split] + i for split, n in split_counts(count).items() for i in range(n)]


def measure(pipe, features, counts: list[int], seed: int, settings: dict) -> list[dict]:
    """One row per count: the seed generates the largest count's images once, smaller counts use their first ones."""
    largest, size = max(counts), pipe.image_size
    prompts = scenes(largest, 0)
    started = time.perf_counter()
    images = generate_for(pipe, [scene.caption for scene in prompts], seed=seed, **settings)
    per_image = (time.perf_counter() - started) / largest
    real_all = from_pil([scene.render(size) for scene in prompts])
    rows = []
    for count in counts:
        index = torch.tensor(rows_of(count, largest))
        generated, real = images[index], real_all[index]
        started = time.perf_counter()
        with pipe.autocast():
            row = image_set_metrics(features, generated, real, seed=seed)
            if seed == 0:
                others = from_pil([scene.render(size) for scene in scenes(count, 1, largest)])
                row.update(calibration(features, real, others, seed=seed))
        rows.append({**row, "count": count, "seed": seed, "generate_s": per_image * count,
                     "metrics_s": time.perf_counter() - started})
    return rows


def main() -> None:
    args = arguments()
    pipe = load_pipeline(args.pipeline)
    features = feature_space(args.features, clip=pipe.clip, inception_weights=args.inception_weights,
                             device=pipe.device)
    space, rows = features.name, []
    print(f"pipeline {args.pipeline} ({pipe.image_size} px), features {space}, settings {args.settings or 'saved'}")
    print(f"{'n':>5} {'seed':>4} {'FID':>8} {'KID':>9} {'prec':>6} {'recall':>6} {'floor':>7} {'ceil mean':>9} "
          f"{'ceil noise':>10} {'gen s':>7} {'metric s':>8}")
    for seed in args.seeds:
        for row in measure(pipe, features, args.counts, seed, args.settings):
            rows.append(row)
            print(f"{row[f'n_fid_{space}']:>5} {seed:>4} {row[f'fid_{space}']:>8.4f} {row[f'kid_{space}_mean']:>9.5f} "
                  f"{row[f'precision_{space}']:>6.2f} {row[f'recall_{space}']:>6.2f} "
                  f"{row.get(f'fid_{space}_floor', float('nan')):>7.4f} "
                  f"{row.get(f'fid_{space}_ceiling_mean', float('nan')):>9.4f} "
                  f"{row.get(f'fid_{space}_ceiling_noise', float('nan')):>10.4f} {row['generate_s']:>7.1f} "
                  f"{row['metrics_s']:>8.2f}", flush=True)
    summary = {}
    for count in args.counts:
        fids = [row[f"fid_{space}"] for row in rows if row["count"] == count]
        summary[count] = {"fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0}
        print(f"n {count}: FID {summary[count]['fid_mean']:.4f} ± {summary[count]['fid_std']:.4f} over seeds "
              f"{args.seeds}")
    print(json.dumps({"features": space, "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
