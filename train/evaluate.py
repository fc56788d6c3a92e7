"""Judge a pipeline on `shapes`: text-to-image accuracy (val, held-out compositions, pairs), variations,
interpolation and text diffs. `python train/evaluate.py pipeline.path=outputs/demo/pipeline`."""

from __future__ import annotations

from _job import hydra_job

from unclip.eval.pipeline import evaluate_edits, evaluate_on_shapes, shapes_prompt_sets
from unclip.jobs import Job
from unclip.pipeline import UnCLIPPipeline


@hydra_job("train_evaluate")
def main(job: Job) -> None:
    config = job.config
    pipe = UnCLIPPipeline.from_config(config["pipeline"])
    counts = config["eval_items"]
    sets = shapes_prompt_sets(counts)
    metrics = evaluate_on_shapes(pipe, sets, seed=config["seed"])
    if counts.get("edits", 0) and "val" in sets:
        k = counts["edits"]
        metrics.update(evaluate_edits(pipe, sets["val"]["images"][:k], sets["val"]["metas"][:k], seed=config["seed"]))
    job.finish(metrics)


if __name__ == "__main__":
    main()
