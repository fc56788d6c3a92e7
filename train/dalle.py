"""Train DALL-E's transformer on (caption tokens, dVAE tokens of the image): `python train/dalle.py experiment=shapes`
(after train/clip.py and train/dvae.py: `clip_checkpoint=` and `dvae_checkpoint=` name their runs).

The CLIP stage gives the caption's tokens (its tokenizer; the transformer keeps the ids the training captions use)
and re-ranks samples in the pipeline; the frozen dVAE gives the image's tokens. They are encoded on the fly, in
the loss, rather than precomputed like the prior's embeddings: a dVAE encoding costs about a quarter of the
transformer's training step, and on the fly any data source (and `shapes`' unlimited items) trains the stage
without a separate step whose shards would have to match the dVAE.

`dalle=captioner` trains the same transformer image-first (conf/dalle/captioner.yaml): a captioner. Its evaluation
and previews then caption val images and judge the captions (unclip.eval.captioning) instead of drawing images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _job import hydra_job

from unclip.autoregressive import TextVocabulary
from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import first_items
from unclip.eval.captioning import caption_scores
from unclip.files import write_atomic
from unclip.images import resize, save_grid, to_pil
from unclip.jobs import Job
from unclip.pipelines.dalle import DalleSettings, end_token_id


def image_tokens(dvae, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, S, S] -> the frozen dVAE's tokens [B, g * g] (images resized to its size)."""
    return dvae.encode(resize(images, dvae.image_size)).flatten(1)


class DalleLoss:
    """Tokenizes the batch's captions with the CLIP stage and its images with the frozen dVAE, then the
    transformer's loss (text 1/8, image 7/8)."""

    def __init__(self, clip, dvae):
        self.clip, self.dvae = clip, dvae

    def __call__(self, model, batch):
        with torch.no_grad():
            text = self.clip.tokenize(batch["caption"]).to(batch["image"].device)
            tokens = image_tokens(self.dvae, batch["image"])
        return model.training_loss(text, tokens, drop=batch.get("drop"))


def build_transformer(config: dict, clip, dvae, captions: list[str]):
    """The transformer for this CLIP's tokenizer (the ids ``captions`` use) and this dVAE's grid and codebook."""
    end_id = end_token_id(clip)
    vocabulary = TextVocabulary.from_token_rows(clip.tokenize(captions), end_id)
    return build(config, text_vocab=vocabulary.source_ids.tolist(), text_end_id=end_id,
                 image_vocab_size=dvae.codebook_size, image_length=dvae.grid_size**2)


@hydra_job("train_dalle")
def main(job: Job) -> None:
    config, evaluation = job.config, job.config["evaluation"]
    job.require_data("train", "val", "evaluator")
    clip = load_stage(config["clip_checkpoint"], stage="clip").model.eval().requires_grad_(False)
    dvae = load_stage(config["dvae_checkpoint"], stage="dvae").model.eval().requires_grad_(False)
    job.require_data(image_size=dvae.image_size, setting=f"the dVAE's image_size ({config['dvae_checkpoint']})")
    data = build(config["data"])
    captions = first_items(data["train"], config["vocabulary_items"])["caption"]
    model = build_transformer(config["dalle"], clip, dvae, captions)
    val = data["evaluator"].items("val", evaluation["val_items"])
    settings = DalleSettings(**config["dalle_generation"])  # the pipeline's generation settings
    sampling = settings.sampling()
    captioner = model.order == "image_first"

    def sample_images(m, prompts: list[str]) -> torch.Tensor:
        generator = torch.Generator(device=next(m.parameters()).device).manual_seed(0)
        tokens = m.sample(clip.tokenize(prompts).to(generator.device), generator=generator, **sampling)
        return dvae.decode(tokens.view(-1, dvae.grid_size, dvae.grid_size).to(dvae.codebook.weight.device)).cpu()

    def sample_captions(m, images: torch.Tensor) -> list[str]:
        generator = torch.Generator(device=next(m.parameters()).device).manual_seed(0)
        tokens = image_tokens(dvae, images.to(clip.device)).to(generator.device)
        return clip.decode(m.sample_captions(tokens, generator=generator, **settings.caption_sampling()))

    def evaluate(m) -> dict:
        text = clip.tokenize(val["caption"])
        tokens = image_tokens(dvae, val["image"].to(clip.device))
        losses = m.training_loss(text.to(tokens.device), tokens, drop=torch.zeros(len(tokens), dtype=torch.bool))
        metrics = {"val_image_loss": losses["image_loss"], "val_text_loss": losses["text_loss"]}
        if evaluation["sample_items"] and captioner:  # captions of val images, parsed and judged (shapes)
            batch = data["evaluator"].items("val", evaluation["sample_items"])
            metrics.update(caption_scores(sample_captions(m, batch["image"]), batch["meta"], prefix="caption/"))
        elif evaluation["sample_items"]:  # judged like decoded images (shapes: colour and shape from the pixels)
            batch = data["evaluator"].items("val", evaluation["sample_items"])
            metrics.update(data["evaluator"].score_decoded(sample_images(m, batch["caption"]), batch, clip))
        return metrics

    def preview(m, out_dir: Path, step: int) -> None:  # the first val images above samples for their captions
        if captioner:  # the first val images, and their sampled captions beside them (dalle-<step>.txt)
            save_grid(to_pil(val["image"][:8]), out_dir / f"dalle-{step:08d}.png", columns=8)
            lines = [f"{i}: {text}   (true: {true})" for i, (text, true)
                     in enumerate(zip(sample_captions(m, val["image"][:8]), val["caption"][:8]))]
            write_atomic(out_dir / f"dalle-{step:08d}.txt", "\n".join(lines) + "\n")
            return
        samples = sample_images(m, val["caption"][:8])
        save_grid(to_pil(val["image"][:8]) + to_pil(samples), out_dir / f"dalle-{step:08d}.png", columns=8)

    trainer = job.trainer(model, DalleLoss(clip, dvae), data["train"], stage="dalle", space_fn=lambda _: None,
                          evaluate_fn=evaluate, preview_fn=preview)
    clip.to(trainer.accelerator.device), dvae.to(trainer.accelerator.device)
    job.fit(trainer)


if __name__ == "__main__":
    main()
