"""What a training run records as it goes: ``log.jsonl`` and the log window's averages."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unclip.files import append_line, replace_link, write_atomic


@dataclass
class StepOutcome:
    """One optimiser step: whether it was applied (finite loss and gradients), its last micro-batch's scalar
    outputs (``loss`` and whatever else the loss function returned) and the gradient norm before clipping."""

    finite: bool
    logs: dict
    grad_norm: torch.Tensor | None = None


class LogWindow:
    """The steps since the last log record: their mean loss (over the applied steps) and throughput."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.restart()

    def restart(self) -> None:
        self.restart_clock()
        self.steps, self.loss_sum, self.loss_count = 0, 0.0, 0

    def restart_clock(self) -> None:
        """Time spent outside training steps (checkpoints, evaluation) does not count against throughput."""
        self.start = time.perf_counter()

    def add(self, outcome: StepOutcome) -> None:
        self.steps += 1
        if outcome.finite:
            self.loss_sum += outcome.logs.get("loss", math.nan)
            self.loss_count += 1

    def record(self, step: int, lr: float, last: StepOutcome) -> dict:
        """The log record of the window ending at ``step`` (``last``: that step's outcome); starts a new one.
        A window whose every step was skipped (non-finite) has no loss: ``loss`` is null, not 0.0; a window with
        skipped steps says how many (``non_finite_steps``)."""
        elapsed = time.perf_counter() - self.start
        record = {
            "step": step,
            "lr": lr,
            "samples_per_s": self.steps * self.samples_per_step / max(elapsed, 1e-9),
            **(last.logs if last.finite else {}),
            "loss": self.loss_sum / self.loss_count if self.loss_count else None,
        }
        if self.loss_count < self.steps:
            record["non_finite_steps"] = self.steps - self.loss_count
        if last.grad_norm is not None:
            record["grad_norm"] = float(last.grad_norm)
        self.restart()
        return record


class RunLog:
    """``log.jsonl`` of a run directory, one JSON record a line (the main process writes, the others not), and
    the accelerator's trackers (``trainer.log_with``: e.g. TensorBoard) with every record's scalars."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, accelerator=None):
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator  # with trackers, or None

    def keep_until(self, step: int) -> None:
        """Keep only the records up to ``step`` (where the run starts): later ones were written before a crash or
        by an earlier run and will be written again, so that no step is in the log twice."""
        if not self.enabled:
            return
        replace_link(self.path)  # a symlink planted there is replaced by the run's own log, never written through
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a directory, where the run writes its log: move it away, or "
                                    "choose another run directory with hydra.run.dir=...")
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record, default=float) + "\n")
        if self.accelerator is not None:
            self.accelerator.log(tracked_scalars(record), step=record["step"])


def _step_of(line: str) -> float:
    """A log line's step; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def tracked_scalars(record: dict) -> dict[str, float]:
    """A log record's numbers for a tracker: ``loss``, ``lr``, ..., ``eval/<metric>``, ``data_issues/<reason>``."""
    scalars = {}
    for key, value in record.items():
        if isinstance(value, dict):
            scalars.update({f"{key}/{k}": v for k, v in tracked_scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            scalars[key] = float(value)
    return scalars
