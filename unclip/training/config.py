"""The training loop's settings, one dataclass shared by every stage."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # auto: see unclip.training.precision
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    mixed_precision: str = "auto"  # bf16 where it is faster (unclip.training.precision)
    activation_checkpointing: bool = False  # recompute activations in the backward: less memory, slower steps
    ema_beta: float = 0.999
    ema_update_after_step: int = 100
    ema_update_every: int = 1
    eval_every: int = 0  # 0: only at the end
    preview_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    resume: bool = False  # continue from the run directory's latest checkpoint
    overwrite: bool = False  # discard the run directory's checkpoints and log and start over
    allow_inexact_resume: bool = False  # resume even if the checkpoint's random-state files are missing or damaged
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops
    progress: bool = True
    log_with: str | None = None  # also log to an accelerate tracker, e.g. tensorboard (events in <run>/tensorboard/)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        self._check_counts()
        self._check_optimiser()
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"trainer.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"trainer.ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ValueError(f"trainer.log_with must be one of {TRACKERS} or null, got {self.log_with!r}")
        if self.resume and self.overwrite:
            raise ValueError("trainer.resume and trainer.overwrite are both set; choose one")

    def _check_counts(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "max_bad_steps",
                    "ema_update_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "preview_every", "checkpoint_every", "warmup_steps", "num_workers",
                     "ema_update_after_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's generators take 0 .. 2**32 - 1
            raise ValueError(f"trainer.seed must be in [0, 2**32), got {self.seed}")

    def _check_optimiser(self) -> None:
        """Values that would train wrong without a word: a negative or non-finite rate, decay or clip."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"trainer.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1] (the cosine decay ends at lr * min_lr_ratio), "
                             f"got {self.min_lr_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"trainer.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"trainer.betas must be two numbers in [0, 1) (AdamW's beta1 and beta2), e.g. "
                             f"[0.9, 0.98], got {list(betas) if isinstance(betas, tuple) else betas}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"trainer.grad_clip must be a finite number > 0 (the largest gradient norm), or 0 or "
                             f"null for no clipping, got {self.grad_clip}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown trainer settings {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        return asdict(self)
