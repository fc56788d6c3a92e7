"""Train a CLIP contrastively and evaluate it: `python train/clip.py experiment=shapes`."""

from __future__ import annotations

from _job import hydra_job

from unclip.clip import ContrastiveLoss, clamp_logit_scale
from unclip.config import build
from unclip.eval.clip_shapes import ShapesClipEvaluator
from unclip.jobs import Job

EVAL_SPLITS = ("val", "heldout", "train_names")  # whichever the data set has (emoji: val, train_names)


@hydra_job("train_clip")
def main(job: Job) -> None:
    encoder = build(job.config["clip"])
    data = build(job.config["data"])
    evaluator = ShapesClipEvaluator({split: data[split] for split in EVAL_SPLITS if split in data})
    job.train(encoder, ContrastiveLoss(), data["train"], stage="clip", space_fn=lambda model: model.compute_space(),
              evaluate_fn=evaluator, after_step_fn=clamp_logit_scale)


if __name__ == "__main__":
    main()
