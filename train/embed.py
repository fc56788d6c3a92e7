"""Encode a data set with a trained CLIP into embedding shards: `python train/embed.py clip_checkpoint=...`."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import collate_dicts
from unclip.data.embeddings import write_embedding_shards
from unclip.jobs import finish


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
        dataset = data[split]
        if length is not None:
            dataset = torch.utils.data.Subset(dataset, range(min(int(length), len(dataset))))
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config["bf16"])
        with autocast:
            paths = write_embedding_shards(
                run_dir / split, encoder, dataset, collate_fn=collate_dicts,
                shard_size=config["shard_size"], batch_size=config["batch_size"], desc=f"embed {split}",
            )
        metrics[f"items_{split}"] = len(dataset)
        metrics[f"shards_{split}"] = len(paths)
    metrics["minutes"] = (time.time() - start) / 60
    finish(run_dir, metrics)


if __name__ == "__main__":
    main()
