"""Train DALL-E's discrete VAE (images <-> grids of codebook tokens): `python train/dvae.py experiment=shapes`."""

from __future__ import annotations

from pathlib import Path

import torch
from _job import hydra_job

from unclip.config import build
from unclip.data.collate import first_items
from unclip.images import resize, save_grid, to_pil
from unclip.jobs import Job


def dvae_loss(model, batch):
    """Reconstruction + KL at the point of the schedules the model's ``schedule_step`` has reached (images resized
    to the model's size, as ``decoder.image_size`` does for the decoder)."""
    return model.training_loss(resize(batch["image"], model.image_size), gumbel=batch.get("gumbel"))


def advance_schedule(model) -> None:
    """After every optimizer update: one step further along the temperature and KL-weight schedules."""
    model.advance_schedule()


def round_trip(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images -> tokens -> images at the model's size, on the model's device, returned on the CPU."""
    device, images = next(model.parameters()).device, resize(images, model.image_size)
    return torch.cat([model.decode(model.encode(images[i:i + batch_size].to(device))).cpu()
                      for i in range(0, len(images), batch_size)])


@hydra_job("train_dvae")
def main(job: Job) -> None:
    config = job.config
    job.require_data("train", "val", "evaluator", image_size=config["dvae"]["image_size"], setting="dvae.image_size")
    data = build(config["data"])
    model = build(config["dvae"])
    items = dict(config["evaluation"])
    previewed = first_items(data["val"], 8)["image"]

    def evaluate(m) -> dict:
        codes = m.encode(resize(data["evaluator"].items("val", items["val"])["image"], m.image_size).to(
            next(m.parameters()).device))
        return {**data["evaluator"].reconstruction_metrics(lambda images: round_trip(m, images), items, m.image_size),
                "codes_used_val": float(codes.unique().numel())}

    def preview(m, out_dir: Path, step: int) -> None:  # originals above their reconstructions
        originals = resize(previewed, m.image_size)
        save_grid(to_pil(originals) + to_pil(round_trip(m, previewed)), out_dir / f"dvae-{step:08d}.png", columns=8)

    job.train(model, dvae_loss, data["train"], stage="dvae", space_fn=lambda _: None, evaluate_fn=evaluate,
              preview_fn=preview, after_step_fn=advance_schedule)


if __name__ == "__main__":
    main()
