"""Judge a pipeline on `shapes`: text-to-image accuracy (val, held-out compositions, pairs), variations,
interpolation and text diffs. `python train/evaluate.py pipeline.path=outputs/demo/pipeline`."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.eval.pipeline import evaluate_edits, evaluate_on_shapes, shapes_prompt_sets
from unclip.jobs import finish
from unclip.pipeline import UnCLIPPipeline


@hydra.main(version_base=None, config_path="../conf", config_name="train_evaluate")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    pipe = UnCLIPPipeline.from_config(config["pipeline"])
    counts = config["eval_items"]
    sets = shapes_prompt_sets(counts)
    metrics = evaluate_on_shapes(pipe, sets, seed=config["seed"])
    if counts.get("edits", 0) and "val" in sets:
        k = counts["edits"]
        metrics.update(evaluate_edits(pipe, sets["val"]["images"][:k], sets["val"]["metas"][:k], seed=config["seed"]))
    metrics["minutes"] = (time.time() - start) / 60
    finish(run_dir, metrics)


if __name__ == "__main__":
    main()
