"""Train the GLIDE-style decoder on CLIP image embeddings: `python train/decoder.py experiment=shapes`.

Fine-tune one into an inpainting decoder: `python train/decoder.py experiment=shapes decoder=inpaint
init_from=outputs/decoder/shapes hydra.run.dir=outputs/decoder/shapes-inpaint`."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import load_stage
from unclip.config import build
from unclip.data.collate import collate_dicts, first_items
from unclip.decoder.inpainting import decoder_to_fine_tune, evaluation_inpainting
from unclip.eval.decoder import evaluate_decoder
from unclip.images import save_grid, to_pil
from unclip.jobs import fit_and_finish
from unclip.training import Trainer, TrainerConfig


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="area")


class DecoderLoss:
    """Embeds the batch's images and captions with the frozen CLIP, then the decoder's diffusion loss."""

    def __init__(self, clip):
        self.clip = clip

    def __call__(self, decoder, batch):
        with torch.no_grad():
            image_embed = self.clip.encode_image(batch["image"])
            text = self.clip.encode_text(batch["caption"]) if decoder.caption_encoder is not None else None
        images = downsample(batch["image"], decoder.image_size)
        return decoder.training_loss(images, image_embed, text, metas=batch.get("meta"))


@hydra.main(version_base=None, config_path="../conf", config_name="train_decoder")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    set_seed(config["trainer"]["seed"])
    clip_stage = load_stage(config["clip_checkpoint"], stage="clip")
    clip = clip_stage.model.eval().requires_grad_(False)
    space = clip.space
    data = build(config["data"])
    decoder = build(
        config["decoder"], image_embed_dim=space.dim, text_length=space.text_length, token_dim=space.token_dim
    )
    if config.get("init_from"):  # fine-tune: the checkpoint's architecture and weights (+ inpainting channels)
        decoder = decoder_to_fine_tune(config["init_from"], inpaint=config["decoder"].get("inpaint", False),
                                       mask_mix=config["decoder"].get("mask_mix"), space=space)
    elif getattr(decoder, "standardise_embed", False):
        sample = first_items(data["train"], config.get("normalisation_items", 4096))["image"]
        with torch.no_grad():
            decoder.fit_normalisation(torch.cat([clip.encode_image(sample[i:i + 256]) for i in range(0, len(sample), 256)]))
    evaluation = config["evaluation"]
    eval_sets = {}
    for split, n in (("val", evaluation["val_items"]), ("heldout", evaluation["heldout_items"])):
        if split not in data or n == 0:  # e.g. emoji: val holds the held-out names
            continue
        batch = first_items(data[split], n)
        eval_sets[split] = batch

    def preview(model, out_dir: Path, step: int) -> None:
        batch = eval_sets["val"]
        images = batch["image"][:8].to(clip._mean.device)
        samples = model.sample(
            clip.encode_image(images), clip.encode_text(batch["caption"][:8]),
            steps=evaluation["steps"], guidance_scale=evaluation["guidance_scales"][-1],
            generator=torch.Generator(device=images.device).manual_seed(0),
            inpaint=evaluation_inpainting(model, images, batch["meta"][:8]),
        )
        originals = to_pil(downsample(images, model.image_size))
        save_grid(originals + to_pil(samples), out_dir / f"decoder-{step:08d}.png", columns=8)

    def evaluate(model) -> dict:
        metrics = {}
        for split, batch in eval_sets.items():
            images = batch["image"].to(clip._mean.device)
            result, _ = evaluate_decoder(
                model, clip, images, batch["caption"], batch["meta"],
                guidance_scales=evaluation["guidance_scales"], steps=evaluation["steps"], suffix=f"_{split}",
            )
            metrics.update(result)
        return metrics

    trainer = Trainer(
        decoder,
        DecoderLoss(clip),
        data["train"],
        TrainerConfig.from_dict(config["trainer"]),
        run_dir,
        stage="decoder",
        space_fn=lambda _: space,
        collate_fn=collate_dicts,
        evaluate_fn=evaluate,
        preview_fn=preview,
        extra_config={"job": config},
    )
    clip.to(trainer.accelerator.device)
    fit_and_finish(trainer, run_dir, start)


if __name__ == "__main__":
    main()
