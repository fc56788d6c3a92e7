"""Encode a data set with a trained CLIP into embedding shards: `python train/embed.py clip_checkpoint=...`."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import collate_dicts
from unclip.data.embeddings import EmbeddingShards, write_embedding_shards
from unclip.jobs import finish


class FirstItems(torch.utils.data.IterableDataset):
    """One pass over a streaming source (all of it, or its first ``length`` items)."""

    def __init__(self, source, length: int | None):
        self.source, self.length = source, length

    def __iter__(self):
        return itertools.islice(iter(self.source), self.length)


@hydra.main(version_base=None, config_path="../conf", config_name="train_embed")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = load_stage(config["clip_checkpoint"], stage="clip").model.to(device).eval()
    data = build(config["data"])
    metrics = {"space": encoder.space.fingerprint}
    for split, length in config["splits"].items():
        if split not in data:
            print(f"embed: this data set has no split {split!r}; skipped", flush=True)
            continue
        dataset = data[split]
        if hasattr(dataset, "stream"):  # a streaming source (webdataset shards): one pass, no shuffling needed
            dataset = FirstItems(dataset, length)
        elif length is not None:
            dataset = torch.utils.data.Subset(dataset, range(min(int(length), len(dataset))))
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config["bf16"])
        with autocast:
            paths = write_embedding_shards(
                run_dir / split, encoder, dataset, collate_fn=collate_dicts,
                shard_size=config["shard_size"], batch_size=config["batch_size"], desc=f"embed {split}",
            )
        metrics[f"items_{split}"] = len(EmbeddingShards(run_dir / split)) if paths else 0
        metrics[f"shards_{split}"] = len(paths)
    metrics["minutes"] = (time.time() - start) / 60
    finish(run_dir, metrics)


if __name__ == "__main__":
    main()
