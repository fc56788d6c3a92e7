"""Which scaled-dot-product-attention kernel runs on the CPU: the math one where PyTorch's CPU flash kernel is slower.

At this project's short sequences (a CLIP's 65 patches or 32 tokens, a prior's 40 tokens) the CPU flash kernel's
backward in bf16 is many times slower than its forward (torch 2.14, 2-core CPU: the demo CLIP's 7 attention
backwards took 354 of a 790-ms training step); the math kernel's backward is plain matrix products. In fp32 the two
kernels train at the same speed. Elsewhere (CUDA) SDPA keeps its own choice.

The Trainer takes the math kernel for the training steps of a model that asks for it (``math_attention_on_cpu``, the
CLIP encoders), around the forward *and* the backward, so that layers recomputed in the backward (activation
checkpointing) run the same kernel; the priors choose it inside their attention. Encoding and sampling (a frozen or
a trained CLIP) keep SDPA's choice: flash, whose forward is the faster.
"""

from __future__ import annotations

import contextlib

import torch

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3: let SDPA choose
    sdpa_kernel = None


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which ``F.scaled_dot_product_attention`` uses its math kernel on every device (an older torch:
    SDPA's own choice)."""
    return sdpa_kernel(SDPBackend.MATH) if sdpa_kernel is not None else contextlib.nullcontext()


def cpu_math_attention(device: torch.device | str, when: bool = True) -> contextlib.AbstractContextManager:
    """The math kernel (:func:`math_attention`) on the CPU and where ``when``; elsewhere SDPA's own choice."""
    return math_attention() if when and torch.device(device).type == "cpu" else contextlib.nullcontext()


def training_attention(model: object, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The Trainer's context around a training step of ``model``: the CPU's math kernel where the model asks for it
    (a true ``math_attention_on_cpu``), else SDPA's own choice."""
    return cpu_math_attention(device, when=bool(getattr(model, "math_attention_on_cpu", False)))
