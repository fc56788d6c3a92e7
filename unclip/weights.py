"""Reading weight files safely: safetensors, or torch.load with weights_only=True. Never plain pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A weights file or checkpoint directory that is missing, damaged or of the wrong kind."""


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (or ``.pt`` / ``.bin`` / ``.pth`` via weights_only torch.load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"weights file {path} is damaged or not safetensors: {err}") from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for damaged or unsafe files
        raise CheckpointError(
            f"cannot load weights file {path} safely (weights_only=True): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, expected a state dict")
    return state
