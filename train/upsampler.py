"""Train an upsampler (low-res image -> high-res image): `python train/upsampler.py experiment=shapes`."""

from __future__ import annotations

from pathlib import Path

import torch
from _job import hydra_job

from unclip.config import build
from unclip.data.collate import first_items
from unclip.eval.decoder import psnr
from unclip.images import resize, save_grid, to_pil
from unclip.jobs import Job


def upsampler_loss(model, batch):
    return model.training_loss(resize(batch["image"], model.image_size))


@hydra_job("train_upsampler")
def main(job: Job) -> None:
    job.require_data("train", "val", image_size=job.config["upsampler"]["image_size"], setting="upsampler.image_size")
    data = build(job.config["data"])
    model = build(job.config["upsampler"])
    evaluation = job.config["evaluation"]
    for key in ("steps", "aug_level", "sampler", "spacing"):
        if isinstance(evaluation[key], (list, tuple)):
            raise ValueError(f"evaluation.{key}={list(evaluation[key])} is a list (generation.upsampler_{key} gives one "
                             f"per upsampler of a cascade): give this stage's, e.g. evaluation.{key}="
                             f"{evaluation[key][-1]}")
    val = first_items(data["val"], evaluation["val_items"])
    truth = resize(val["image"], model.image_size)
    low_res = resize(truth, model.low_res_size)

    def upsample(m, images):
        generator = torch.Generator(device=next(m.parameters()).device).manual_seed(0)
        return torch.cat([
            m.sample(images[i : i + 64], steps=evaluation["steps"], aug_level=evaluation["aug_level"],
                     sampler=evaluation["sampler"], spacing=evaluation["spacing"], generator=generator).cpu()
            for i in range(0, len(images), 64)
        ])

    def evaluate(m) -> dict:
        samples = upsample(m, low_res)
        return {"psnr_val": psnr(samples, truth), "psnr_bicubic_val": psnr(resize(low_res, m.image_size), truth)}

    def preview(m, out_dir: Path, step: int) -> None:
        samples = upsample(m, low_res[:8])
        row = to_pil(resize(low_res[:8], m.image_size)) + to_pil(samples) + to_pil(truth[:8])
        save_grid(row, out_dir / f"upsampler-{step:08d}.png", columns=8)

    job.train(model, upsampler_loss, data["train"], stage="upsampler", space_fn=lambda _: None, evaluate_fn=evaluate,
              preview_fn=preview)


if __name__ == "__main__":
    main()
