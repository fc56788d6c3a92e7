"""The discrete VAE's training schedules (DALL-E, appendix A.2), as pure functions of the update step.

The Gumbel-softmax temperature falls from ``start`` to ``end`` and the KL weight rises from 0 to its
maximum, both along a half cosine; after ``steps`` they stay at their final value. Being functions of the
step alone, they continue exactly after a resume as long as the step does.
"""

from __future__ import annotations

import math


def _cosine_progress(step: int, steps: int) -> float:
    """0 at step 0, 1 at ``steps`` and after, along a half cosine (flat at both ends)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if steps <= 0:
        return 1.0
    progress = min(1.0, step / steps)
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def gumbel_temperature(step: int, *, start: float = 1.0, end: float = 1 / 16, steps: int = 10_000) -> float:
    """The relaxation's temperature at ``step``: ``start`` -> ``end`` over ``steps`` (the paper: 1 -> 1/16)."""
    return start + (end - start) * _cosine_progress(step, steps)


def kl_weight(step: int, *, maximum: float, steps: int = 1_000) -> float:
    """The weight of the KL term at ``step``: 0 -> ``maximum`` over ``steps`` (the paper ramps it up)."""
    return maximum * _cosine_progress(step, steps)
