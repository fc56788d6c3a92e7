"""Evaluate a whole pipeline with its data set's evaluator (`shapes`: text-to-image accuracy on val, held-out
compositions, pairs and count scenes with GenEval's categories beside the published rows, variations, interpolation
and text diffs, judged from the pixels; captioned data: CLIP agreement).
`python train/evaluate.py pipeline.path=outputs/demo/pipeline [data=...]`.

``unconditional=256`` also judges 256 samples drawn without a prompt against the training data (``shapes``:
unclip.eval.unconditional; give the data the pipeline was trained on, data=shapes_pairs for the demo's);
``conditional=false`` skips the prompted evaluation; ``unconditional_rerank=4`` makes each sample the best of 4 by a
caption bank of ``unconditional_captions`` training captions (``pipe.unconditional(rerank=, captions=)``), and
``unconditional_prior_candidates=4`` (unCLIP) each candidate's image embedding the best of 4 prior samples by it."""

from __future__ import annotations

from _job import hydra_job

from unclip.config import build
from unclip.jobs import Job
from unclip.pipeline_inputs import check_count
from unclip.pipelines import pipeline_from_config


@hydra_job("train_evaluate")
def main(job: Job) -> None:
    job.require_data("evaluator")
    pipe = pipeline_from_config(job.config["pipeline"])
    evaluator = build(job.config["data"]["evaluator"], pipeline_items=job.config["eval_items"])
    config, metrics = job.config, {"generator": pipe.generator}
    if config["conditional"]:  # the edits (variations, interpolation, text diffs) where the pipeline supports them
        metrics.update(evaluator.pipeline_metrics(pipe, seed=config["seed"]))
    if config["unconditional"]:
        n = check_count("unconditional", config["unconditional"])
        reference = check_count("unconditional_reference", config["unconditional_reference"])
        rerank = check_count("unconditional_rerank", config["unconditional_rerank"])
        prior_candidates = check_count("unconditional_prior_candidates", config["unconditional_prior_candidates"])
        captions = check_count("unconditional_captions", config["unconditional_captions"])
        metrics.update(evaluator.unconditional_metrics(pipe, n, seed=config["seed"], reference=reference,
                                                       rerank=rerank, prior_candidates=prior_candidates,
                                                       captions=captions))
    summary = evaluator.summary(metrics)
    if summary:
        (job.run_dir / "fidelity.txt").write_text(summary + "\n")
        print(summary)
    job.finish(metrics)


if __name__ == "__main__":
    main()
