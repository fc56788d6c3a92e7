"""Evaluate a whole pipeline with its data set's evaluator (`shapes`: text-to-image accuracy on val, held-out
compositions, pairs and count scenes with GenEval's categories beside the published rows, variations, interpolation
and text diffs, judged from the pixels; captioned data: CLIP agreement). `python train/evaluate.py pipeline.path=outputs/demo/pipeline [data=...]`."""

from __future__ import annotations

from _job import hydra_job

from unclip.config import build
from unclip.jobs import Job
from unclip.pipelines import pipeline_from_config


@hydra_job("train_evaluate")
def main(job: Job) -> None:
    job.require_data("evaluator")
    pipe = pipeline_from_config(job.config["pipeline"])
    evaluator = build(job.config["data"]["evaluator"], pipeline_items=job.config["eval_items"])
    # the edits (variations, interpolation, text diffs) where the pipeline supports them (unCLIP's)
    metrics = {"generator": pipe.generator, **evaluator.pipeline_metrics(pipe, seed=job.config["seed"])}
    summary = evaluator.summary(metrics)
    if summary:
        (job.run_dir / "fidelity.txt").write_text(summary + "\n")
        print(summary)
    job.finish(metrics)


if __name__ == "__main__":
    main()
