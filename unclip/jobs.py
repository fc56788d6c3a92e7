"""What every job in train/ does at its end: write metrics.json and print it as the last line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


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
