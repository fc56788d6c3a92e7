"""Train the diffusion prior on embedding shards: `python train/prior.py experiment=shapes`.

`prior=passthrough` trains nothing: it evaluates the text-embedding baseline and saves it as a stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import save_run_checkpoint
from unclip.config import build
from unclip.data.collate import collate_dicts
from unclip.data.embeddings import EmbeddingShards
from unclip.eval.prior import evaluate_prior
from unclip.jobs import finish, fit_and_finish
from unclip.prior import PassthroughPrior
from unclip.training import Trainer, TrainerConfig


def prior_loss(model, batch):
    return model.training_loss(batch)


@hydra.main(version_base=None, config_path="../conf", config_name="train_prior")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    set_seed(config["trainer"]["seed"])
    shards = Path(config["embeddings"])
    train = EmbeddingShards(shards / "train")
    space = train.space
    splits = [split for split in ("val", "heldout", "train_names") if (shards / split).is_dir()]
    if not splits:
        raise FileNotFoundError(f"{shards} has no val/ or heldout/ embedding shards to evaluate the prior on")
    evals = {split: EmbeddingShards(shards / split, expected_space=space) for split in splits}
    sampling = config["sampling"]

    def evaluate(model):
        return evaluate_prior(model, evals, list(evals.values()), max_items=config["eval_items"], **sampling)

    model = build(config["prior"]) if config["prior"]["_target_"].endswith("PassthroughPrior") else build(
        config["prior"], embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length
    )
    if isinstance(model, PassthroughPrior):
        metrics = evaluate(model)
        checkpoint = save_run_checkpoint(run_dir, model, stage="prior", space=space)
        finish(run_dir, {**metrics, "step": 0, "checkpoint": str(checkpoint), "minutes": (time.time() - start) / 60})
        return
    model.fit_normalisation(train.tensors["image_embed"][: config["normalisation_items"]])
    trainer = Trainer(
        model,
        prior_loss,
        train,
        TrainerConfig.from_dict(config["trainer"]),
        run_dir,
        stage="prior",
        space_fn=lambda _: space,
        collate_fn=collate_dicts,
        evaluate_fn=evaluate,
        extra_config={"job": config},
    )
    fit_and_finish(trainer, run_dir, start)


if __name__ == "__main__":
    main()
