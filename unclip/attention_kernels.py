"""Which scaled-dot-product-attention kernel runs on the CPU: the math one where PyTorch's CPU flash kernel is slower.

At this project's short sequences (a CLIP's 65 patches or 32 tokens, a prior's 40 tokens) the CPU flash kernel's
backward in bf16 is many times slower than its forward (torch 2.14, 2-core CPU: the demo CLIP's 7 attention
backwards took 354 of a 790-ms training step); the math kernel's backward is plain matrix products. In fp32 the two
kernels train at the same speed. Elsewhere (CUDA) SDPA keeps its own choice.
"""

from __future__ import annotations

import contextlib

import torch

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3: let SDPA choose
    sdpa_kernel = None


def cpu_math_attention(device: torch.device | str, when: bool = True) -> contextlib.AbstractContextManager:
    """A context in which ``F.scaled_dot_product_attention`` uses its math kernel, on the CPU and where ``when``;
    elsewhere (another device, ``when`` false, an older torch) SDPA's own choice."""
    if when and sdpa_kernel is not None and torch.device(device).type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
