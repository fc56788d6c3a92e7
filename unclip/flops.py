"""FLOP accounting and the devices' peak rates: how close a step runs to the hardware (MFU).

``count_flops(fn)`` runs ``fn()`` under ``torch.utils.flop_counter.FlopCounterMode`` and returns its result
with the FLOPs of its matrix products, convolutions and attention (forward and, if ``fn`` runs it, backward;
element-wise work is not counted, as in every MFU convention). ``mfu(flops, seconds, peak)`` is the fraction of
a peak rate that ``flops`` done in ``seconds`` reach, nanoGPT's ``estimate_mfu`` with a counted numerator.

Peaks are datasheet dense rates (no sparsity), in TFLOP/s, by precision: ``bf16`` (also fp16), ``tf32`` (fp32
matrix products on tensor cores, what PyTorch uses when ``torch.get_float32_matmul_precision()`` is not
``"highest"``) and ``fp32``. ``device_peak(device)`` finds the table's entry from the GPU's name; the CPU and
unknown GPUs have none (give one with ``parse_peak``: a number, or a key of ``PEAKS``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from unclip.attention_kernels import math_attention


@dataclass(frozen=True)
class Peak:
    """A device's dense peak rates in TFLOP/s."""

    name: str
    bf16: float
    tf32: float
    fp32: float

    def tflops(self, precision: str) -> float:
        """The peak for a training or sampling precision: ``bf16``/``fp16`` or ``fp32``/``no`` (TF32 where
        PyTorch's float32 matrix products may use it)."""
        if precision in ("bf16", "fp16"):
            return self.bf16
        if precision in ("fp32", "no"):
            return self.fp32 if torch.get_float32_matmul_precision() == "highest" else self.tf32
        raise ValueError(f"precision must be one of bf16, fp16, fp32, no; got {precision!r}")


PEAKS = {  # NVIDIA datasheets, dense
    "h100-sxm": Peak("NVIDIA H100 SXM", bf16=989.4, tf32=494.7, fp32=66.9),
    "h100-pcie": Peak("NVIDIA H100 PCIe", bf16=756.5, tf32=378.0, fp32=51.2),
    "h100-nvl": Peak("NVIDIA H100 NVL", bf16=835.5, tf32=417.8, fp32=59.8),
    "h200": Peak("NVIDIA H200", bf16=989.4, tf32=494.7, fp32=66.9),
    "a100": Peak("NVIDIA A100", bf16=312.0, tf32=156.0, fp32=19.5),
}


def peak_for_name(gpu_name: str) -> Peak | None:
    """The table's entry for a GPU name as ``torch.cuda.get_device_name`` spells it, e.g. ``"NVIDIA H100 80GB
    HBM3"`` (an SXM card), ``"NVIDIA H100 PCIe"``, ``"NVIDIA H200"``, ``"NVIDIA A100-SXM4-80GB"``; else None."""
    name = gpu_name.lower()
    if re.search(r"\bh200\b", name):
        return PEAKS["h200"]
    if re.search(r"\bh100\b", name):
        return PEAKS["h100-pcie" if "pcie" in name else "h100-nvl" if "nvl" in name else "h100-sxm"]
    if re.search(r"\ba100\b", name):
        return PEAKS["a100"]
    return None


def device_peak(device: torch.device | str) -> Peak | None:
    """The peak of a CUDA device from the table; None for the CPU and for GPUs the table does not know."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def parse_peak(value: str) -> Peak:
    """A peak given by hand: a number of TFLOP/s (used for every precision) or a key of ``PEAKS``."""
    text = str(value).strip().lower()
    if text in PEAKS:
        return PEAKS[text]
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is None or not number > 0 or number == float("inf"):
        raise ValueError(f"unknown peak {value!r}: give a positive number of TFLOP/s (e.g. 989) or one of "
                         f"{', '.join(PEAKS)}")
    return Peak(f"{number:g} TFLOP/s (given)", bf16=number, tf32=number, fp32=number)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), FLOPs)``: the FLOPs of the matrix products, convolutions and attention that ``fn`` runs.

    ``fn`` runs with PyTorch's math attention kernel: the counter has no formula for some fused kernels (the CPU's
    flash attention), and the math kernel's products count the full attention on every device and precision."""
    from torch.utils.flop_counter import FlopCounterMode  # here: importing it imports triton (0.1 s a job start)

    with math_attention(), FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """The model FLOPs utilisation: ``flops / seconds`` as a fraction of ``peak_tflops`` (None if no peak)."""
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
