"""FLOP accounting and MFU (unclip.flops): counts against hand counts, the peak table, the arithmetic."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unclip.flops import PEAKS, count_flops, mfu, parse_peak, peak_for_name
from unclip.training.precision import StepCost


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def mlp_step_flops(batch: int) -> int:
    """By hand: 2*B*in*out a matrix product. Forward: both layers. Backward: the second layer's input gradient
    and both weight gradients (the data needs no gradient, so the first layer's input gradient is never made)."""
    first, second = 2 * batch * 8 * 16, 2 * batch * 16 * 4
    return (first + second) + (second + second + first)


def test_a_training_step_counts_the_products_of_forward_and_backward():
    model, x = mlp(), torch.randn(5, 8)
    loss, flops = count_flops(lambda: model(x).square().mean())
    assert flops == 2 * 5 * 8 * 16 + 2 * 5 * 16 * 4  # forward only
    _, flops = count_flops(lambda: model(x).square().mean().backward())
    assert flops == mlp_step_flops(5) == 4480
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_counted_on_the_cpu_in_every_precision(dtype):
    q, k, v = (torch.randn(2, 3, 10, 16, dtype=dtype) for _ in range(3))
    out, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert flops == 2 * (2 * 2 * 3 * 10 * 10 * 16)  # q k^T and attention @ v, the full square
    assert out.shape == q.shape


def test_mfu_is_the_achieved_rate_over_the_peak():
    assert mfu(2e12, 0.5, 8.0) == pytest.approx(0.5)  # 4 TFLOP/s of 8
    assert mfu(2e12, 0.5, None) is None
    # the log line's MFU: samples/s of all processes x FLOPs a sample over every process's peak
    cost = StepCost(flops_per_sample=mlp_step_flops(5) / 5, peak_tflops=1e-6)  # a peak of 1 MFLOP/s
    assert cost.log(samples_per_s=100.0, num_processes=2) == {"mfu": pytest.approx(100 * 896 / (2 * 1e6))}
    assert StepCost(flops_per_sample=None, peak_tflops=989.0).log(100.0, 1) == {}
    assert StepCost(flops_per_sample=1e9, peak_tflops=None).log(100.0, 1) == {}


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA H20", None), ("NVIDIA GeForce RTX 4090", None), ("Tesla T4", None),
])
def test_the_peak_table_knows_the_gpus_by_their_names(name, key):
    assert peak_for_name(name) == (PEAKS[key] if key else None)


def test_fp32_uses_the_tf32_peak_only_where_pytorch_lets_matrix_products_use_tf32():
    peak, before = PEAKS["h100-sxm"], torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert (peak.tflops("fp32"), peak.tflops("no"), peak.tflops("bf16")) == (66.9, 66.9, 989.4)
        torch.set_float32_matmul_precision("high")
        assert peak.tflops("fp32") == 494.7
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp8'"):
        peak.tflops("fp8")


def test_a_peak_is_given_as_a_number_or_a_known_name():
    assert parse_peak("989").bf16 == parse_peak("989").fp32 == 989.0
    assert parse_peak(" H200 ") is PEAKS["h200"]
    for bad in ("fast", "0", "-5", "inf", "nan"):
        with pytest.raises(ValueError, match=f"unknown peak '{bad}': give a positive number of TFLOP/s .* h100-sxm"):
            parse_peak(bad)
