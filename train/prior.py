"""Train a prior on embedding shards: `python train/prior.py experiment=shapes` (the diffusion prior).

`prior=autoregressive` trains DALL-E 2's autoregressive prior (its PCA count and cosine are in the metrics);
`prior=passthrough` trains nothing: it evaluates the text-embedding baseline and saves it as a stage.
"""

from __future__ import annotations

from pathlib import Path

from _job import hydra_job

from unclip.checkpoint import save_run_checkpoint
from unclip.config import build, locate
from unclip.data.embeddings import EmbeddingShards
from unclip.jobs import Job
from unclip.prior import PassthroughPrior

EVAL_SPLITS = ("val", "heldout", "train_names")  # whichever the shards have


def prior_loss(model, batch):
    return model.training_loss(batch)


@hydra_job("train_prior")
def main(job: Job) -> None:
    config, shards = job.config, Path(job.config["embeddings"])
    train = EmbeddingShards(shards / "train")
    space = train.space
    splits = [split for split in EVAL_SPLITS if (shards / split).is_dir()]
    if not splits:
        raise FileNotFoundError(f"{shards} has no val/ or heldout/ embedding shards to evaluate the prior on")
    evals = {split: EmbeddingShards(shards / split, expected_space=space) for split in splits}
    job.require_data("evaluator")
    evaluator = build(config["data"]["evaluator"])  # the data the shards were made from says how to judge

    def evaluate(model):
        return evaluator.prior_metrics(model, evals, max_items=config["eval_items"], **config["sampling"])

    if locate(config["prior"]["_target_"]) is PassthroughPrior:  # a baseline: evaluated and saved, not trained
        model = PassthroughPrior()
        checkpoint = save_run_checkpoint(job.run_dir, model, stage="prior", space=space)
        job.finish({**evaluate(model), "step": 0, "checkpoint": str(checkpoint)})
        return
    model = build(config["prior"], embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length)
    fitted = slice(config["normalisation_items"])
    fit = model.fit_normalisation(train.tensors["image_embed"][fitted], train.tensors["text_embed"][fitted])
    if fit:  # what the prior kept (the autoregressive prior's PCA): in the log and in every evaluation's metrics
        print(f"fitted on {len(train.tensors['image_embed'][fitted])} training embeddings: {fit}")
    job.train(model, prior_loss, train, stage="prior", space_fn=lambda _: space,
              evaluate_fn=lambda model: {**fit, **evaluate(model)})


if __name__ == "__main__":
    main()
