"""Encode a data set with a trained CLIP into embedding shards: `python train/embed.py clip_checkpoint=...`.

A re-run into the same directory replaces the shards of every split named in ``splits`` (a split the data set
lacks loses its old shards too): the prior never trains on old shards mixed with new ones. The old shards are
deleted (with the old metrics.json) once the CLIP and the data are loaded, before the first new one is written, so
a run killed midway leaves fewer splits and no metrics.json, never stale shards; there is nothing to resume: run it
again (the demo does, finding no metrics.json).

``filter`` drops the training pairs with the lowest CLIP score (image-text cosine under this CLIP), LAION's remedy for
web captions that say nothing of their image (docs/data.md#garbage-captions); val and held-out are kept whole."""

from __future__ import annotations

import itertools

import torch
from _job import hydra_job

from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import collate_dicts, is_streaming
from unclip.data.embeddings import (
    EmbeddingShards,
    check_filter,
    filter_embedding_shards,
    remove_embedding_shards,
    write_embedding_shards,
)
from unclip.jobs import Job
from unclip.training.precision import sampling_dtype


class FirstItems(torch.utils.data.IterableDataset):
    """One pass over a streaming source (all of it, or its first ``length`` items)."""

    def __init__(self, source, length: int | None):
        self.source, self.length = source, length

    def __iter__(self):
        return itertools.islice(iter(self.source), self.length)


def first(dataset, length: int | None):
    """The first ``length`` items of a split (None: all); a streaming source is read once, in its order."""
    if is_streaming(dataset):
        return FirstItems(dataset, length)
    return dataset if length is None else torch.utils.data.Subset(dataset, range(min(int(length), len(dataset))))


@hydra_job("train_embed")
def main(job: Job) -> None:
    config = job.config
    screen = config["filter"]
    check_filter(screen["min_clip_score"], screen["drop_fraction"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = config["bf16"]
    if bf16 not in (True, False, "auto"):
        raise ValueError(f"bf16 must be true, false or auto, got {bf16!r}")
    if bf16 == "auto":  # where the device computes bf16 natively (an emulated bf16 CPU encodes several times slower)
        bf16 = sampling_dtype(device, torch.bfloat16) is not None
    encoder = load_stage(config["clip_checkpoint"], stage="clip").model.to(device).eval()
    data = build(config["data"])
    metrics = {"space": encoder.space.fingerprint}
    # all splits at once: a run stopped midway must not leave other splits' old shards, nor the old metrics.json
    # (the demo would take the stage as done)
    old = remove_embedding_shards(*(job.run_dir / split for split in config["splits"]))
    (job.run_dir / "metrics.json").unlink(missing_ok=True)
    for folder in old:
        print(f"embed: removed the old shards of {folder} (this run replaces them)", flush=True)
    for split, length in config["splits"].items():
        if split not in data:
            print(f"embed: this data set has no split {split!r}; skipped", flush=True)
            continue
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            paths = write_embedding_shards(
                job.run_dir / split, encoder, first(data[split], length), collate_fn=collate_dicts,
                shard_size=config["shard_size"], batch_size=config["batch_size"], desc=f"embed {split}",
            )
        if split == "train" and paths and (screen["min_clip_score"] is not None or screen["drop_fraction"]):
            report = filter_embedding_shards(job.run_dir / split, min_clip_score=screen["min_clip_score"],
                                             drop_fraction=screen["drop_fraction"], shard_size=config["shard_size"])
            print(f"embed: the CLIP-score filter {report}", flush=True)
            metrics.update(report)
            paths = sorted((job.run_dir / split).glob("*.safetensors"))
        shards = EmbeddingShards(job.run_dir / split) if paths else None
        metrics[f"items_{split}"] = len(shards) if shards else 0
        if shards and any(isinstance(meta, dict) and "caption_noised" in meta for meta in shards.metas):
            metrics[f"noised_{split}"] = sum(bool(meta.get("caption_noised")) for meta in shards.metas)  # garbage kept
        metrics[f"shards_{split}"] = len(paths)
    job.finish(metrics)


if __name__ == "__main__":
    main()
