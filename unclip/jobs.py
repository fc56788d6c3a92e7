"""What every job in train/ does around its own work: a run directory, a seed, the trainer, metrics.json.

Every job ends one way, :meth:`Job.finish` (``Job.train`` and ``Job.fit`` end there after training).

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

from unclip.files import write_atomic


def plain(value: Any) -> Any:
    """Metrics to JSON-friendly values (tensors and numpy scalars to floats)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


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
        """Train with a trainer made by ``trainer`` (e.g. after moving a frozen encoder to its device), then
        :meth:`finish` with the final evaluation, step and checkpoint. A run that fails (its weights went NaN,
        its losses stayed non-finite) raises before finishing: no metrics.json claims a result."""
        result = trainer.fit()
        metrics = {**result.metrics, "step": result.step, "checkpoint": str(result.checkpoint)}
        return self.finish(metrics, is_main=trainer.is_main)

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

    def finish(self, metrics: dict, *, is_main: bool = True) -> dict:
        """The one way a job ends: write ``metrics.json`` into its run directory (a new file renamed into place,
        so a symlink there is replaced, never written through) and print it as one JSON line, on the main
        process only; ``minutes`` since the job started unless ``metrics`` gives them. Returns the metrics."""
        metrics = plain({"minutes": self.minutes, **metrics})
        if is_main:
            text = json.dumps(metrics, indent=2, sort_keys=True)
            write_atomic(self.run_dir / "metrics.json", text)
            print(json.dumps(metrics, sort_keys=True), flush=True)
        return metrics


def start_job(config: dict, run_dir: str | Path) -> Job:
    """A Job for a plain config; a training job (one with ``trainer`` settings) has them checked (an error naming
    a bad one, before any data is built) and is seeded first, so that the same seed builds the same initial weights."""
    job = Job(run_dir=Path(run_dir), config=config)
    if "trainer" in config:
        from unclip.training.config import TrainerConfig

        trainer = TrainerConfig.from_dict(config["trainer"])  # its values checked before any data is built
        set_seed(trainer.seed)
    return job
