"""Train a CLIP contrastively and evaluate it: `python train/clip.py experiment=shapes`."""

from __future__ import annotations

from _job import hydra_job

from unclip.clip import ContrastiveLoss, clamp_logit_scale
from unclip.config import build
from unclip.jobs import Job


@hydra_job("train_clip")
def main(job: Job) -> None:
    job.require_data("train", "evaluator")
    encoder = build(job.config["clip"])
    data = build(job.config["data"])
    job.train(encoder, ContrastiveLoss(), data["train"], stage="clip", space_fn=lambda model: model.compute_space(),
              evaluate_fn=data["evaluator"].clip_metrics, after_step_fn=clamp_logit_scale)


if __name__ == "__main__":
    main()
