"""One accelerate-based training loop for every stage.

A stage supplies a model (an ``nn.Module`` with a ``.config`` that rebuilds it), a loss function
``loss_fn(model, batch) -> {"loss": tensor, ...}``, a map-style dataset, and optionally evaluation and
preview functions. The loop handles the device, data-parallel processes, mixed precision, gradient
accumulation, AdamW with warm-up and cosine decay, EMA (ema-pytorch), a progress bar, periodic
evaluation and previews, non-finite losses, and atomic checkpoints that resume exactly.

``fit`` is a short loop over named pieces: ``_optimisation_step`` (accumulation, the non-finite vote, the
fp16 scaler, clipping, EMA), the log window (``unclip.training.tracking``), the periodic hooks (checkpoint,
evaluation, preview) and the data stream's position and epoch (``unclip.training.data.DataStream``: a
map-style dataset read in a deterministic stream that resumes exactly, or a streaming source with
``stream(rank, world_size, seed)``). Items may carry ``"issues"`` (counts of bad or repaired data); the
trainer prints them at the end of every epoch and reports them in the final metrics as ``data_issues``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from ema_pytorch import EMA
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm

from unclip.activation_checkpointing import checkpointable_layers, enable_activation_checkpointing
from unclip.attention_kernels import training_attention
from unclip.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    checkpoint_name,
    commit_directory,
    manifest_problems,
    read_latest,
    save_stage_files,
    write_latest,
    write_manifest,
)
from unclip.data.collate import collate_dicts
from unclip.embedding import EmbeddingSpace
from unclip.run_lock import run_directory
from unclip.training.config import TrainerConfig
from unclip.training.curves import plot_runs
from unclip.training.data import DataStream
from unclip.training.optim import lr_at, make_optimizer
from unclip.training.precision import StepCost, resolve_precision
from unclip.training.tracking import LogWindow, RunLog, StepOutcome
from unclip.weights import CheckpointError

LossFn = Callable[[nn.Module, Any], dict]
CURVES = "curves.png"  # in the run directory: the loss and evaluation curves, drawn at the end of training
RANDOM_STATES = re.compile(r"trainer/random_states_\d+\.pkl")  # accelerate's per-process generator states


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN or infinite values: nothing trained from here on is worth saving or scoring."""


class _LossModule(nn.Module):
    """Runs the loss inside ``forward`` so DDP's gradient hooks and accelerate's autocast apply."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


@dataclass
class TrainResult:
    step: int
    metrics: dict
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset,
        config: TrainerConfig,
        run_dir: str | Path,
        *,
        stage: str,
        space_fn: Callable[[nn.Module], EmbeddingSpace | None],
        collate_fn: Callable | None = None,
        evaluate_fn: Callable[[nn.Module], dict] | None = None,
        preview_fn: Callable[[nn.Module, Path, int], None] | None = None,
        after_step_fn: Callable[[nn.Module], None] | None = None,
        extra_config: dict | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.space_fn = space_fn
        self.evaluate_fn = evaluate_fn
        self.preview_fn = preview_fn
        self.after_step_fn = after_step_fn
        self.extra_config = extra_config or {}
        self.dataset = dataset
        self.collate_fn = collate_fn or collate_dicts
        if config.activation_checkpointing:
            checkpointable_layers(model)  # a model without any: the error before anything is counted or built
        # Before the Accelerator: `auto` counts the step's FLOPs on the CPU before the processes connect.
        precision = resolve_precision(config, model, loss_fn, dataset, self.collate_fn)
        # cpu= where no GPU is: `accelerate launch --multi_gpu --num_processes N` then joins N processes over gloo;
        # without it accelerate (1.x) leaves each process alone (DistributedType.NO), every one a "main" process.
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=precision.mixed_precision, gradient_accumulation_steps=config.grad_accum,
            log_with=config.log_with, project_dir=self.run_dir / "tensorboard" if config.log_with else None,
        )
        if accelerator is None and config.mixed_precision == "auto":
            self.accelerator.print(precision.reason)
        self.step_cost = StepCost.of(precision.step_flops, self.accelerator.mixed_precision, config.batch_size,
                                     self.accelerator.device)
        set_seed(config.seed)
        self.model = model
        self.ema = EMA(
            model,
            beta=config.ema_beta,
            update_after_step=config.ema_update_after_step,
            update_every=config.ema_update_every,
            # Buffers are copied, not averaged: averaging breaks constant ones such as a causal mask's -inf.
            param_or_buffer_names_no_ema={name for name, _ in model.named_buffers()},
            use_foreach=True,  # one lerp over all parameters, not one kernel per parameter
        )
        self.ema.to(self.accelerator.device)
        if config.activation_checkpointing:  # after the FLOP count (the MFU's are the model's) and the EMA copy
            enable_activation_checkpointing(model)
        optimizer = make_optimizer(model, config)
        self.wrapped, self.optimizer = self.accelerator.prepare(_LossModule(model, loss_fn), optimizer)
        acc = self.accelerator
        self.data = DataStream(
            dataset, batch_size=config.batch_size, collate_fn=self.collate_fn, rank=acc.process_index,
            world_size=acc.num_processes, seed=config.seed, num_workers=config.num_workers,
            on_epoch_end=self._report_epoch,
        )
        self.samples_per_step = config.batch_size * config.grad_accum * acc.num_processes
        self.log = RunLog(self.run_dir, enabled=self.is_main, accelerator=self.accelerator if config.log_with else None)
        self.step = 0
        self.bad_steps = 0
        self._start_step = 0
        self.last_checkpoint: Path | None = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def latest_checkpoint(self) -> Path | None:
        return read_latest(self.checkpoint_root, needs=TRAINER_STATE)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (resuming or starting over as the config says), then checkpoint, preview and
        evaluate; the final metrics add the run's ``data_issues``. The main process owns the run directory
        meanwhile (``unclip.run_lock``): a second run into it is refused, naming this one's process id."""
        with run_directory(self.run_dir, f"training {self.stage}", main=self.is_main):
            return self._fit()

    def _fit(self) -> TrainResult:
        self._start()
        bar = self._progress_bar()
        batches = self.data.batches()
        window, history = LogWindow(self.samples_per_step), []
        self.wrapped.train()
        while self.step < self.config.max_steps:
            outcome = self._optimisation_step(batches)
            self.step += 1
            self.data.advance(self.samples_per_step)
            bar.update(1)
            window.add(outcome)
            if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
                history.append(self._log_window(window, outcome, bar))
            if self.step < self.config.max_steps and self._run_periodic_hooks():
                window.restart_clock()
        bar.close()
        return self._finish(history)

    def _start(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._prepare_run_dir()
        self._start_step = self.step  # after a resume: where this run's steps begin
        if self.config.log_with:
            hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                               for k, v in self.config.to_dict().items()}
            self.accelerator.init_trackers(self.stage, config=hyperparameters)
        if self.data.index_issues:
            summary = ", ".join(f"{reason} {n}" for reason, n in sorted(self.data.index_issues.items()))
            self.accelerator.print(f"data set index: files left out: {summary}")

    def _progress_bar(self) -> tqdm:
        return tqdm(total=self.config.max_steps, initial=self.step, desc=f"train {self.stage}",
                    disable=not (self.config.progress and self.is_main), dynamic_ncols=True)

    def _log_window(self, window: LogWindow, last: StepOutcome, bar: tqdm) -> dict:
        record = window.record(self.step, lr_at(self.step - 1, self.config), last)
        record.update(self.step_cost.log(record["samples_per_s"], self.accelerator.num_processes))
        self.log.write(record)
        loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
        bar.set_postfix(loss=loss, samples_s=f"{record['samples_per_s']:.1f}")
        return record

    def _run_periodic_hooks(self) -> bool:
        """Checkpoint, evaluate and preview where due (the last step's come from ``_finish``); True if any ran."""
        cfg, ran = self.config, False
        for every, hook in ((cfg.checkpoint_every, self.save_checkpoint), (cfg.eval_every, self._evaluate),
                            (cfg.preview_every, self._preview)):
            if every and self.step % every == 0:
                hook()
                ran = True
        return ran

    def _finish(self, history: list[dict]) -> TrainResult:
        self._check_finite_weights()  # also after resuming at the last step: a failed run is not scored
        self._check_not_diverged()
        if self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_name(self.step):
            self.save_checkpoint()
        self._preview()
        metrics = self._evaluate()
        issues = self._all_data_issues()
        if issues:
            metrics = {**metrics, "data_issues": issues}
        if self.config.log_with:
            self.accelerator.end_training()
        if self.is_main:
            plot_runs([self.run_dir], self.run_dir / CURVES)  # a new file renamed into place
        return TrainResult(step=self.step, metrics=metrics, checkpoint=self.last_checkpoint, history=history)

    # -- one optimisation step --------------------------------------------------------------
    def _optimisation_step(self, batches) -> StepOutcome:
        """``grad_accum`` micro-batches, then the update, or a skip if any process saw a non-finite value."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        finite, logs = self._accumulate(batches)
        grad_norm = None
        if finite and self.config.grad_clip:
            grad_norm = self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
            finite = bool(torch.isfinite(grad_norm).item())
        if finite:
            self._apply_update()
        else:
            self._skip_update(clipped=grad_norm is not None)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(finite=finite, logs=logs, grad_norm=grad_norm)

    def _accumulate(self, batches) -> tuple[bool, dict]:
        """Forward and backward over the micro-batches; (every loss finite in every process, last scalars)."""
        acc, finite, logs = self.accelerator, True, {}
        for _ in range(self.config.grad_accum):
            batch = to_device(next(batches), acc.device)
            with acc.accumulate(self.wrapped), training_attention(self.model, acc.device):
                out = self.wrapped(batch)
                finite = self._finite_everywhere(out["loss"]) and finite  # every process votes every time
                if finite:
                    acc.backward(out["loss"])
                logs = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        return finite, logs

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        acc = self.accelerator
        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=acc.device)
        return acc.reduce(flag, reduction="sum").item() >= acc.num_processes

    def _apply_update(self) -> None:
        self.optimizer.step()
        if self.after_step_fn is not None:
            self.after_step_fn(self.model)
        self.ema.update()
        self.bad_steps = 0

    def _skip_update(self, *, clipped: bool) -> None:
        if clipped and self.accelerator.scaler is not None:
            # fp16: clipping unscaled the gradients; the GradScaler's step skips the update, lowers the scale
            # and resets, without which the next step's unscale_ raises.
            self.optimizer.step()
        self.bad_steps += 1
        self.log.write({"step": self.step, "skipped": "non-finite loss or gradient", "bad_steps": self.bad_steps})
        if self.bad_steps >= self.config.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient at step {self.step}; "
                f"stopping. Last good checkpoint: {self.last_checkpoint or 'none yet'} (resume with "
                "trainer.resume=true, e.g. with a lower trainer.lr)"
            )

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save the run's state atomically as ``checkpoints/step-N`` and point ``latest`` at it; weights that are
        not finite are refused (NonFiniteWeightsError), so they never replace or prune a good checkpoint."""
        self._check_finite_weights()
        acc = self.accelerator
        name = checkpoint_name(self.step)
        final = self.checkpoint_root / name
        tmp = self.checkpoint_root / f".tmp-{name}"
        acc.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            ema_model = self.ema.ema_model
            save_stage_files(
                tmp,
                self.model,
                stage=self.stage,
                space=self.space_fn(ema_model),
                ema_model=ema_model,
                extra={"step": self.step, "trainer": self.config.to_dict(), **self.extra_config},
            )
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "trainer"))  # optimizer, model, per-process RNG states
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(self._trainer_state(), indent=2))
            write_manifest(tmp)
            commit_directory(tmp, final)
            write_latest(self.checkpoint_root, name)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _check_not_diverged(self) -> None:
        """A run whose every step after its first was skipped (non-finite) ended diverged, though it stopped
        short of ``max_bad_steps``: its weights (finite, but e.g. huge after one step at a huge rate) make no
        model worth evaluating or saving over the last good checkpoint."""
        trained = self.step - self._start_step
        if trained and self.bad_steps and self.bad_steps >= min(self.config.max_bad_steps, max(trained - 1, 1)):
            raise NonFiniteLossError(
                f"training {self.stage} diverged: the last {self.bad_steps} of the {trained} steps of this run had a "
                f"non-finite loss or gradient, so nothing was saved or evaluated. Last good checkpoint: "
                f"{self.last_checkpoint or 'none'}. Lower trainer.lr (or set trainer.grad_clip) and start over with "
                "trainer.overwrite=true, or resume from that checkpoint with trainer.resume=true"
            )

    def _check_finite_weights(self) -> None:
        """Every process holds the same weights, so every one comes to the same verdict (no collective)."""
        models = {"weights": self.model, "EMA weights": self.ema.ema_model}
        bad = {what: [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
               for what, model in models.items()}
        bad = {what: names for what, names in bad.items() if names}
        if bad:
            found = "; ".join(f"{what}: {len(names)} tensor(s) ({', '.join(names[:3])})" for what, names in bad.items())
            raise NonFiniteWeightsError(
                f"training {self.stage} failed at step {self.step}: the model's weights hold NaN or infinite values "
                f"({found}), so nothing was saved or evaluated. Last good checkpoint: "
                f"{self.last_checkpoint or 'none'}. Lower trainer.lr (or set trainer.grad_clip) and start over "
                "with trainer.overwrite=true, or resume from that checkpoint with trainer.resume=true"
            )

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "ema_step": int(self.ema.step.item()),
            "ema_initted": bool(self.ema.initted.item()),
            "num_processes": self.accelerator.num_processes,
            **self.data.state(),
        }

    def _prune_checkpoints(self) -> None:
        # Only checkpoints up to the current one: a newer one is an orphan of a run killed before it moved
        # `latest` (replaced when this run gets there); counting it could prune the one `latest` names.
        current = checkpoint_name(self.step)
        kept = sorted(p for p in self.checkpoint_root.glob("step-*") if p.is_dir() and p.name <= current)
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _verify_checkpoint(self, path: Path) -> None:
        """Refuse a checkpoint whose files differ from its manifest (damaged random states only unless
        ``trainer.allow_inexact_resume``); one written before manifests resumes unverified, with a warning."""
        latest = self.checkpoint_root / LATEST
        try:
            problems = manifest_problems(path)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume from {path}: {err}; write an earlier checkpoint's name into {latest}, "
                                  "or start over with trainer.overwrite=true") from err
        if problems is None:
            self.accelerator.print(f"warning: {path} has no {MANIFEST} (written by an older version), so its files "
                                   "cannot be verified; resuming from them as they are")
            own = f"trainer/random_states_{self.accelerator.process_index}.pkl"
            problems = {} if (path / own).is_file() else {own: "missing"}
        damaged = [f"{path / name} is {problem}" for name, problem in problems.items() if not RANDOM_STATES.match(name)]
        if damaged:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(damaged)}. Write an earlier checkpoint's "
                                  f"name into {latest}, or start over with trainer.overwrite=true")
        random_states = "; ".join(f"{path / name} is {problem}" for name, problem in problems.items())
        if random_states and not self.config.allow_inexact_resume:
            raise CheckpointError(
                f"cannot resume exactly from {path}: {random_states}. Without the random generators' state the run "
                "would go on, but not as an uninterrupted run would; add trainer.allow_inexact_resume=true to accept "
                f"that, write an earlier checkpoint's name into {latest}, or start over with trainer.overwrite=true"
            )
        if random_states:
            self.accelerator.print(f"warning: resuming inexactly (trainer.allow_inexact_resume=true): {random_states}; "
                                   "the random generators do not continue as they were")

    def load_checkpoint(self, path: Path) -> None:
        self._verify_checkpoint(path)
        try:
            state = json.loads((path / TRAINER_STATE).read_text())
            if state["num_processes"] != self.accelerator.num_processes:
                self.accelerator.print(
                    f"note: {path} was written by {state['num_processes']} process(es), resuming with "
                    f"{self.accelerator.num_processes}; the data stream continues at the same global position"
                )
            self.accelerator.load_state(str(path / "trainer"))
            load_model(self.ema.ema_model, str(path / "ema.safetensors"), device=str(self.accelerator.device))
        except Exception as err:  # json, torch.load, safetensors and accelerate raise many kinds
            raise CheckpointError(
                f"cannot resume from {path}, it is damaged ({type(err).__name__}: {err}); write an earlier "
                f"checkpoint's name into {self.checkpoint_root / LATEST}, or start over with trainer.overwrite=true"
            ) from err
        self.ema.step.fill_(state["ema_step"])
        self.ema.initted.fill_(state["ema_initted"])
        self.step = state["step"]
        self.bad_steps = state["bad_steps"]
        # Older checkpoints lack the stream's state: assume this batch size and grad_accum.
        samples_per_step = self.config.batch_size * self.config.grad_accum * state["num_processes"]
        self.data.load_state(state, default_position=self.step * samples_per_step)
        self.last_checkpoint = path

    def _prepare_run_dir(self) -> None:
        """Resume, start over (``overwrite``) or start in a run directory without checkpoints; the checkpoint
        directory is tried for writing before any step is trained; log.jsonl keeps the records up to the start."""
        if self.config.overwrite:
            self._discard_earlier_run()
        existing = self._existing_checkpoint()
        if self.config.resume:
            if existing is None:
                self.accelerator.print(f"trainer.resume: no checkpoint in {self.checkpoint_root}, starting fresh")
            else:
                self.load_checkpoint(existing)
                self.accelerator.print(f"resumed from {existing} at step {self.step}")
        elif existing is not None:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints of an earlier run ({existing.name}); add "
                "trainer.resume=true to continue it, trainer.overwrite=true to start over, or choose "
                "another directory with hydra.run.dir=..."
            )
        if self.is_main:
            _check_writable(self.checkpoint_root)
            for stale in self.checkpoint_root.glob(".tmp-*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            self.log.keep_until(self.step)  # records of steps after the start (before a crash) are trained again
        self.accelerator.wait_for_everyone()

    def _existing_checkpoint(self) -> Path | None:
        if not self.checkpoint_root.exists():
            return None
        try:
            return self.latest_checkpoint()
        except CheckpointError as err:  # a `latest` naming a checkpoint that is gone or incomplete
            raise CheckpointError(f"{err}; write the name of a complete checkpoint into it, or start over with "
                                  "trainer.overwrite=true") from err

    def _discard_earlier_run(self) -> None:
        """``trainer.overwrite``: the earlier run's checkpoints (whatever ``latest`` says), log, curves, previews
        and TensorBoard events go."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            for name in (CHECKPOINTS, "previews", "tensorboard"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for name in (self.log.path.name, CURVES):
                (self.run_dir / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    # -- evaluation -------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        model = self.ema.ema_model if self.ema.initted.item() else self.model
        return model

    def _run_on_eval_model(self, fn):
        """``fn(model)`` on the EMA (or raw) model in eval mode, without gradients, under autocast."""
        model = self.eval_model()
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            result = fn(model)
        model.train(was_training)
        return result

    def _evaluate(self) -> dict:
        metrics: dict = {}
        if self.evaluate_fn is not None and self.is_main:
            metrics = self._run_on_eval_model(self.evaluate_fn)
            self.log.write({"step": self.step, "eval": metrics})
            self.accelerator.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in _scalars(metrics)))
        self.accelerator.wait_for_everyone()
        return metrics

    def _preview(self) -> None:
        if self.preview_fn is not None and self.is_main:
            self._run_on_eval_model(lambda model: self.preview_fn(model, self.run_dir / "previews", self.step))
        self.accelerator.wait_for_everyone()

    # -- data issues ------------------------------------------------------------------------
    def _report_epoch(self, epoch: int, issues: dict) -> None:
        """Print and log the bad or repaired data items of the epoch that just ended (if any)."""
        if not issues:
            return
        summary = ", ".join(f"{reason} {n}" for reason, n in sorted(issues.items()))
        acc = self.accelerator
        where = f" (process {acc.process_index})" if acc.num_processes > 1 else ""
        if acc.num_processes > 1 or self.is_main:
            tqdm.write(f"epoch {epoch} data issues{where}: {summary}")
        self.log.write({"step": self.step, "epoch": epoch, "data_issues": issues})

    def _all_data_issues(self) -> dict:
        """The data issues of every process, summed (every process must call this), plus those the data set
        found while indexing its files (``index_issues``, e.g. images without a caption file)."""
        totals: Counter = Counter(self.data.index_issues)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            for counts in gather_object([dict(self.data.issues)]):
                totals.update(counts)
        else:
            totals.update(self.data.issues)
        return dict(sorted(totals.items()))


def _check_writable(directory: Path) -> None:
    """Create ``directory`` and write a file into it, so that a run that could not save its checkpoints stops
    before training rather than after."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write checkpoints to {directory} ({err.strerror or err}); the steps trained "
                              "would be lost: make it a writable directory, or choose another run directory with "
                              "hydra.run.dir=...") from err


def _scalars(metrics: dict):
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value
