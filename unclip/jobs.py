"""What every job in train/ does around its own work: a run directory, a seed, the trainer, metrics.json.

A job in train/ is a page that says only what is particular to it::

    @hydra_job("train_prior")               # train/_job.py: Hydra's run directory and config -> a Job
    def main(job: Job) -> None:
        data = ...
        job.train(model, loss_fn, data, stage="prior", space_fn=..., evaluate_fn=...)

The library never reads Hydra: a ``Job`` is made from a plain config and a run directory (``start_job``),
so tests and other launchers make one the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed


def plain(value: Any) -> Any:
    """Metrics to JSON-friendly values (tensors and numpy scalars to floats)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def finish(run_dir: str | Path, metrics: dict, *, is_main: bool = True) -> dict:
    """Write ``run_dir/metrics.json`` and print it as one JSON line (main process only)."""
    metrics = plain(metrics)
    if is_main:
        path = Path(run_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(json.dumps(metrics, sort_keys=True), flush=True)
    return metrics


def fit_and_finish(trainer, run_dir: str | Path, started: float) -> dict:
    """Train, then write and print the job's metrics: the final evaluation, step, checkpoint and minutes."""
    result = trainer.fit()
    metrics = {
        **result.metrics,
        "step": result.step,
        "checkpoint": str(result.checkpoint),
        "minutes": (time.time() - started) / 60,
    }
    return finish(run_dir, metrics, is_main=trainer.is_main)


@dataclass
class Job:
    """One run of a job: its run directory, its config as plain data, and when it started."""

    run_dir: Path
    config: dict
    started: float = field(default_factory=time.time)

    @property
    def minutes(self) -> float:
        return (time.time() - self.started) / 60

    def trainer(self, model, loss_fn, dataset, *, stage: str, space_fn, **hooks):
        """A Trainer with this job's ``trainer`` settings, saving the job's config in every checkpoint.
        ``hooks``: Trainer's keyword arguments (collate_fn, evaluate_fn, preview_fn, after_step_fn)."""
        from unclip.training import Trainer, TrainerConfig

        return Trainer(model, loss_fn, dataset, TrainerConfig.from_dict(self.config["trainer"]), self.run_dir,
                       stage=stage, space_fn=space_fn, extra_config={"job": self.config}, **hooks)

    def train(self, model, loss_fn, dataset, *, stage: str, space_fn, **hooks) -> dict:
        """Train a stage (see ``trainer``), then write and print metrics.json; returns the metrics."""
        return self.fit(self.trainer(model, loss_fn, dataset, stage=stage, space_fn=space_fn, **hooks))

    def fit(self, trainer) -> dict:
        """Train with a trainer made by ``trainer`` (e.g. after moving a frozen encoder to its device)."""
        return fit_and_finish(trainer, self.run_dir, self.started)

    def require_data(self, *keys: str, image_size: int | None = None, setting: str = "") -> None:
        """Refuse a data config this job cannot use: it must give ``keys`` (splits, ``evaluator``) and, when
        ``image_size`` is given (``setting`` names it), images at least that large."""
        data = self.config.get("data") or {}
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(f"this job needs data.{' and data.'.join(missing)}, which the data config does not "
                             f"give (it gives {sorted(data)}); add them to the data config or choose other data")
        if image_size is not None and data.get("image_size", image_size) < image_size:
            raise ValueError(
                f"{setting}={image_size} but data.image_size={data['image_size']}: the stage would learn from "
                f"upscaled images; set {setting} to at most {data['image_size']} or use larger images"
            )

    def finish(self, metrics: dict) -> dict:
        """Write and print metrics.json for a job that trains nothing, with its minutes."""
        return finish(self.run_dir, {**metrics, "minutes": self.minutes})


def start_job(config: dict, run_dir: str | Path) -> Job:
    """A Job for a plain config; a training job (one with ``trainer`` settings) is seeded first, so that the
    same seed builds the same initial weights."""
    job = Job(run_dir=Path(run_dir), config=config)
    if "trainer" in config:
        set_seed(config["trainer"]["seed"])
    return job
