"""Train a CLIP contrastively and evaluate it: `python train/clip.py experiment=shapes`."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.clip import ContrastiveLoss, clamp_logit_scale
from unclip.config import build
from unclip.data.collate import collate_dicts
from unclip.eval.clip_shapes import ShapesClipEvaluator
from unclip.jobs import fit_and_finish
from unclip.training import Trainer, TrainerConfig


EVAL_SPLITS = ("val", "heldout", "train_names")  # whichever the data set has (emoji: val, train_names)


@hydra.main(version_base=None, config_path="../conf", config_name="train_clip")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    set_seed(config["trainer"]["seed"])  # the same initial weights for the same seed
    encoder = build(config["clip"])
    data = build(config["data"])
    trainer = Trainer(
        encoder,
        ContrastiveLoss(),
        data["train"],
        TrainerConfig.from_dict(config["trainer"]),
        run_dir,
        stage="clip",
        space_fn=lambda model: model.compute_space(),
        collate_fn=collate_dicts,
        evaluate_fn=ShapesClipEvaluator({split: data[split] for split in EVAL_SPLITS if split in data}),
        after_step_fn=clamp_logit_scale,
        extra_config={"job": config},
    )
    fit_and_finish(trainer, run_dir, start)


if __name__ == "__main__":
    main()
