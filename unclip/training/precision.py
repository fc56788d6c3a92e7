"""``trainer.mixed_precision=auto``: the training precision chosen per device; an explicit value overrides it.

bf16 autocast does the arithmetic faster but launches more kernels (the casts), so it pays only where a step is
bound by arithmetic, not by launches. Measured: on the 2-core AVX512-BF16 CPU bf16 trained 2-2.6x faster than
fp32; on one H200 (issue 16) bf16 was *slower* at small steps (prior batch 32, 0.26 TFLOP a step: 21 vs 13 ms;
decoder batch 8, 0.36 TFLOP: 47 vs 29 ms) and 3.9x faster at a large one (prior batch 512, 4.1 TFLOP). The
fp32 prior step turns arithmetic-bound near 0.5 TFLOP (13 ms of launches at its ~37 TFLOP/s fp32 rate), and
bf16 overtakes fp32 once fp32's arithmetic outlasts bf16's ~21 ms of launches, near 0.8 TFLOP. The rule:

- CPU: bf16 where oneDNN computes bf16 natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), else fp32.
- CUDA: bf16 (where the GPU has it) when one training step does at least ``BF16_MIN_STEP_TFLOP``, else fp32.
  Choosing fp32 too long costs more than choosing bf16 too early (bf16's gain grows to ~4x with the step, its
  loss stays under ~1.6x), so the threshold sits at the low end of the measured crossover.
- Any other device: fp32.

Sampling (``sampling_dtype``: the pipelines' autocast, ``train/embed.py``'s ``bf16=auto``) takes bf16 by the same
native-bf16 check, on the CPU and on CUDA, whatever the step's size.

The step's FLOPs are counted (``unclip.flops.count_flops``, forward and backward) on the CPU on the first
``COUNT_ITEMS`` items of the data set and scaled to the batch, before the run's processes connect: every process
and every resumption counts the same number and so chooses the same precision. The count also gives the log
line's MFU (``StepCost``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from unclip.flops import count_flops, device_peak

BF16_MIN_STEP_TFLOP = 1.0  # CUDA: bf16 from this many TFLOP per training step of one process
COUNT_ITEMS = 2  # data items the FLOPs are counted on (then scaled to the batch)


@dataclass(frozen=True)
class PrecisionChoice:
    mixed_precision: str  # what accelerate gets: no | bf16 | fp16
    step_flops: float | None  # one training step of one process, where counted
    reason: str  # why, for the log


def training_device_type() -> str:
    """The device type accelerate will train on, known before it starts: cuda, mps or cpu."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def device_has_bf16(device_type: str, bf16_supported: bool | None = None) -> bool:
    """Whether ``device_type`` computes bf16 natively (``bf16_supported``, where given, answers instead): the CPU by
    oneDNN's check, CUDA by the GPU's; no other device."""
    if bf16_supported is not None:
        return bf16_supported
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return device_type == "cuda" and torch.cuda.is_bf16_supported()


def choose_mixed_precision(device_type: str, step_flops: Callable[[], float | None],
                           bf16_supported: bool | None = None) -> tuple[str, str]:
    """``(precision, reason)`` by the rule above; ``step_flops()`` is called only where the rule needs it."""
    if device_type == "cpu":
        if device_has_bf16("cpu", bf16_supported):
            return "bf16", "the CPU computes bf16 natively"
        return "no", "the CPU has no native bf16"
    if device_type != "cuda":
        return "no", f"no measured rule for {device_type}"
    if not device_has_bf16("cuda", bf16_supported):
        return "no", "the GPU has no bf16"
    flops = step_flops()
    if flops is None:
        return "bf16", "the step's FLOPs could not be counted"
    verdict = ">=" if flops >= BF16_MIN_STEP_TFLOP * 1e12 else "<"
    precision = "bf16" if verdict == ">=" else "no"
    return precision, f"a training step does {flops / 1e12:.3g} TFLOP {verdict} {BF16_MIN_STEP_TFLOP:g}"


def first_items(dataset, collate_fn: Callable, count: int, seed: int) -> Any:
    """The first ``count`` items of a map-style data set, or of a streaming source's stream, collated."""
    if hasattr(dataset, "stream"):
        stream = iter(dataset.stream(0, 1, seed))
        items = [next(stream) for _ in range(count)]
    else:
        items = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = collate_fn(items)
    if isinstance(batch, dict):
        batch.pop("issues", None)
    return batch, len(items)


def training_step_flops(model: nn.Module, loss_fn: Callable, batch: Any, items: int, batch_size: int) -> float:
    """FLOPs of one training step (forward and backward) at ``batch_size``, counted on a batch of ``items``."""
    _, flops = count_flops(lambda: loss_fn(model, batch)["loss"].backward())
    model.zero_grad(set_to_none=True)
    return flops * batch_size / items


def resolve_precision(config, model: nn.Module, loss_fn: Callable, dataset, collate_fn: Callable) -> PrecisionChoice:
    """``config.mixed_precision``, with ``auto`` decided by the rule; the step's FLOPs counted where the rule or
    the log's MFU (CUDA) needs them. Call before the run's processes connect (before the Accelerator)."""
    device_type = training_device_type()
    counted: list[float | None] = []

    def step_flops() -> float | None:
        if not counted:
            try:
                batch, items = first_items(dataset, collate_fn, min(COUNT_ITEMS, config.batch_size), config.seed)
                counted.append(training_step_flops(model, loss_fn, batch, items, config.batch_size))
            except Exception:  # a loss that cannot run here (e.g. on tensors of another device): no count
                counted.append(None)
        return counted[0]

    if config.mixed_precision == "auto":
        precision, reason = choose_mixed_precision(device_type, step_flops)
        reason = f"trainer.mixed_precision=auto: {precision} on {device_type}, since {reason}"
    else:
        precision, reason = config.mixed_precision, f"trainer.mixed_precision={config.mixed_precision}"
    return PrecisionChoice(precision, step_flops() if device_type == "cuda" else None, reason)


@dataclass(frozen=True)
class StepCost:
    """What one process's training step costs, for the model FLOPs utilisation on the log line."""

    flops_per_sample: float | None
    peak_tflops: float | None

    @classmethod
    def of(cls, step_flops: float | None, mixed_precision: str, batch_size: int, device: torch.device) -> "StepCost":
        peak = device_peak(device)
        flops = None if step_flops is None else step_flops / batch_size
        return cls(flops, None if peak is None else peak.tflops(mixed_precision))

    def log(self, samples_per_s: float, num_processes: int) -> dict:
        """``{"mfu": fraction of the peak}`` for a throughput of all processes, or ``{}`` where unknown."""
        if self.flops_per_sample is None or self.peak_tflops is None:
            return {}
        return {"mfu": samples_per_s * self.flops_per_sample / (num_processes * self.peak_tflops * 1e12)}


def sampling_dtype(device_type: str, wanted: torch.dtype | None, bf16_supported: bool | None = None
                   ) -> torch.dtype | None:
    """The autocast dtype a pipeline samples in on ``device_type`` when it asks for ``wanted`` (None: float32).

    bf16 only where the device computes it natively: a CPU without native bf16 (no AVX512-BF16 or AMX, e.g. an AVX2
    AMD EPYC) emulates it, and the demo's quick pipeline sampled 6.8x slower in bf16 than in float32 there (20.2 s
    against 2.9 s for 4 prompts, re-ranked 4 each); a CPU with native bf16 keeps bf16, as before. Other devices
    than the CPU and CUDA: float32."""
    if wanted is None or device_type not in ("cpu", "cuda"):
        return None
    if wanted == torch.bfloat16 and not device_has_bf16(device_type, bf16_supported):
        return None
    return wanted
