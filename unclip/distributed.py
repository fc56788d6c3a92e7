"""Statistics of the whole data-parallel batch inside a loss, so that a loss that is not a plain mean over items
(a mean over some of them, a function of the batch's mean) trains the same weights on N processes as on one.

In the core, not in ``unclip.training``: the models' losses (the dVAE's, the transformer's) use them, and a model
must not load the training loop. Every process must call these at the same point (they communicate); without a process group they are the
local values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(local_mean: torch.Tensor) -> torch.Tensor:
    """A per-process batch mean -> the mean over the whole batch (equal batches per process), with gradients."""
    world = world_size()
    return local_mean if world == 1 else torch.distributed.nn.functional.all_reduce(local_mean) / world


def global_sum(local: torch.Tensor) -> torch.Tensor:
    """A per-process count or sum -> its sum over the processes, without gradients."""
    if world_size() == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return total
