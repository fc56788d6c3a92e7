"""Train the GLIDE-style decoder on CLIP image embeddings: `python train/decoder.py experiment=shapes`.

Fine-tune one into an inpainting decoder: `python train/decoder.py experiment=shapes decoder=inpaint
init_from=outputs/decoder/shapes hydra.run.dir=outputs/decoder/shapes-inpaint`."""

from __future__ import annotations

from pathlib import Path

import torch
from _job import hydra_job

from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import first_items
from unclip.decoder.inpainting import decoder_to_fine_tune, evaluation_inpainting
from unclip.images import resize, save_grid, to_pil
from unclip.jobs import Job


class DecoderLoss:
    """Embeds the batch's images and captions with the frozen CLIP, then the decoder's diffusion loss."""

    def __init__(self, clip):
        self.clip = clip

    def __call__(self, decoder, batch):
        with torch.no_grad():
            image_embed = self.clip.encode_image(batch["image"])
            text = self.clip.encode_text(batch["caption"]) if decoder.caption_encoder is not None else None
        images = resize(batch["image"], decoder.image_size)
        return decoder.training_loss(images, image_embed, text, metas=batch.get("meta"))


@hydra_job("train_decoder")
def main(job: Job) -> None:
    config, evaluation = job.config, job.config["evaluation"]
    job.require_data("train", "val", "evaluator", image_size=config["decoder"]["image_size"], setting="decoder.image_size")
    clip = load_stage(config["clip_checkpoint"], stage="clip").model.eval().requires_grad_(False)
    space = clip.space
    data = build(config["data"])
    decoder = build(config["decoder"], image_embed_dim=space.dim, text_length=space.text_length,
                    token_dim=space.token_dim)
    if config.get("init_from"):  # fine-tune: the checkpoint's architecture and weights (+ inpainting channels)
        decoder = decoder_to_fine_tune(config["init_from"], inpaint=config["decoder"].get("inpaint", False),
                                       mask_mix=config["decoder"].get("mask_mix"), space=space)
    elif getattr(decoder, "standardise_embed", False):  # per-dimension statistics of the training embeddings
        sample = first_items(data["train"], config.get("normalisation_items", 4096))["image"].to(clip.device)
        with torch.no_grad():
            decoder.fit_normalisation(torch.cat([clip.encode_image(sample[i:i + 256]) for i in range(0, len(sample), 256)]))
    items = {"val": evaluation["val_items"], "heldout": evaluation["heldout_items"]}  # of the evaluator's splits
    previewed = first_items(data["val"], 8)

    def preview(model, out_dir: Path, step: int) -> None:
        images = previewed["image"].to(clip.device)
        samples = model.sample(
            clip.encode_image(images), clip.encode_text(previewed["caption"]),
            steps=evaluation["steps"], guidance_scale=evaluation["guidance_scales"][-1],
            sampler=evaluation["sampler"], spacing=evaluation["spacing"],
            generator=torch.Generator(device=images.device).manual_seed(0),
            inpaint=evaluation_inpainting(model, images, previewed.get("meta")),
        )
        originals = to_pil(resize(images, model.image_size))
        save_grid(originals + to_pil(samples), out_dir / f"decoder-{step:08d}.png", columns=8)

    def evaluate(model) -> dict:
        return data["evaluator"].decoder_metrics(model, clip, items, guidance_scales=evaluation["guidance_scales"],
                                                 steps=evaluation["steps"], sampler=evaluation["sampler"],
                                                 spacing=evaluation["spacing"])

    trainer = job.trainer(decoder, DecoderLoss(clip), data["train"], stage="decoder", space_fn=lambda _: space,
                          evaluate_fn=evaluate, preview_fn=preview)
    clip.to(trainer.accelerator.device)
    job.fit(trainer)


if __name__ == "__main__":
    main()
