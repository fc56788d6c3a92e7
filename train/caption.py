"""Judge a DALL-E pipeline's captioner on `shapes`: `python train/caption.py pipeline.path=outputs/demo-dalle/pipeline
pipeline.captioner=outputs/dalle/captioner` (or the stages: pipeline.clip=... pipeline.dvae=... pipeline.transformer=...).

Each split's scenes (val singles, held-out compositions, pair scenes, count scenes; the seeds of the shapes
evaluator's prompt sets, rendered at the pipeline's size) are captioned once per image at every ``rerank`` k (1:
the first caption drawn; k: the CLIP's favourite of k), parsed and judged against the scenes' metadata
(unclip.eval.captioning). Prints the table and writes it (captions.md), every caption (captions.jsonl) and
metrics.json (``<split>/k<k>/<kind>/<check>``).
"""

from __future__ import annotations

import json

import torch
from _job import hydra_job

from unclip.data.shapes import ShapesDataset
from unclip.eval.captioning import caption_scores, caption_table, unparseable
from unclip.jobs import Job
from unclip.pipeline_inputs import check_count
from unclip.pipelines import pipeline_from_config

# split -> the shapes items it captions (the shapes evaluator's prompt sets' seeds: val and heldout 1, pairs 2)
SPLITS = {"val": {"split": "val", "seed": 1}, "heldout": {"split": "heldout", "seed": 1},
          "pair": {"split": "val", "seed": 2, "pair_fraction": 1.0},
          "count": {"split": "val", "seed": 3, "count_fraction": 1.0}}


def scenes(split: str, n: int, image_size: int) -> dict:
    """The first ``n`` items of a split: images [n, 3, S, S], captions, metas."""
    if split not in SPLITS:
        raise ValueError(f"items may name the splits {list(SPLITS)}, not {split!r}")
    data = ShapesDataset(length=check_count(f"items.{split}", n), image_size=image_size, **SPLITS[split])
    items = [data[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "meta": [it["meta"] for it in items]}


@hydra_job("train_caption")
def main(job: Job) -> None:
    config = job.config
    ranks = [check_count("rerank", k) for k in config["rerank"]]
    pipe = pipeline_from_config(config["pipeline"])
    scores, metrics, lines = {}, {"generator": pipe.generator}, []
    for split, n in config["items"].items():
        batch = scenes(split, n, pipe.image_size)
        for k in ranks:
            captions = pipe.caption(batch["image"], seed=config["seed"], rerank=k, **config["sampling"])
            column = f"{split} k={k}"
            scores[column] = caption_scores(captions, batch["meta"])
            metrics.update({f"{split}/k{k}/{key}": value for key, value in scores[column].items()})
            lines += [json.dumps({"split": split, "rerank": k, "caption": text, "true": true})
                      for text, true in zip(captions, batch["caption"])]
            odd = unparseable(captions)
            if odd:
                print(f"{column}: {len(odd)} unparseable, e.g. {odd[:3]}")
    table = caption_table(scores)
    print(table)
    (job.run_dir / "captions.md").write_text(table + "\n")
    (job.run_dir / "captions.jsonl").write_text("\n".join(lines) + "\n")
    job.finish(metrics)


if __name__ == "__main__":
    main()
