"""Activation checkpointing: less training memory for more compute (``trainer.activation_checkpointing``).

A layer that supports it mixes in :class:`Checkpointed` and runs its body through :meth:`Checkpointed.checkpointed`.
With its flag on, while it is training and autograd records, the body runs under ``torch.utils.checkpoint``
(non-reentrant): its inner activations are freed after the forward and recomputed in the backward (with the same
random draws: the RNG state is restored), so only each layer's inputs stay in memory. Gradients are the same as
without it; a step costs about one more forward. Sampling and evaluation (``no_grad``, eval mode) never checkpoint.

The flag is a plain attribute, neither a parameter nor a constructor argument: a saved model is the same with it or
without, and a loaded one starts with it off. The models import this module, so it lives in the core (the models
stand on the core alone, tests/test_layering.py); the Trainer calls :func:`enable_activation_checkpointing`.

open_clip models (CLIP training) have their own switch, ``set_grad_checkpointing``, which is turned on too.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

SUPPORTED = (
    "the diffusion UNet (Decoder, Upsampler) and the decoder's CaptionEncoder",
    "the diffusion prior's PriorTransformer (DiffusionPrior)",
    "the DALL-E transformer (TextImageTransformer)",
    "open_clip models (OpenClipEncoder)",
)


class Checkpointed:
    """Mixin for an ``nn.Module`` whose forward may recompute its activations in the backward pass."""

    activation_checkpointing: bool = False  # set per instance by enable_activation_checkpointing

    def checkpointed(self, function: Callable, *args):
        """``function(*args)``, under ``torch.utils.checkpoint`` when this layer's flag is on, it is training
        and gradients are recorded; any other time (sampling, evaluation, ``no_grad``) a plain call."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)


def _has_open_clip_switch(module: nn.Module) -> bool:
    return callable(getattr(module, "set_grad_checkpointing", None))


def _outermost(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules of ``model`` (itself included) for which ``wanted`` holds and no enclosing module's does."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(outer == "" or name.startswith(f"{outer}.") for outer, _ in found)
        if not inside and wanted(module):
            found.append((name, module))
    return [module for _, module in found]


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that support activation checkpointing (an open_clip model counts as one). A model
    with none is an error naming it and what supports it: a stage asked to checkpoint never trains without it."""
    layers = [module for module in model.modules() if isinstance(module, Checkpointed)]
    layers += _outermost(model, _has_open_clip_switch)
    if not layers:
        raise ValueError(
            f"trainer.activation_checkpointing=true, but this stage's model, {type(model).__name__}, has no layers "
            f"that can recompute their activations; it is supported by {'; '.join(SUPPORTED)}. Set "
            "trainer.activation_checkpointing=false for this stage")
    return layers


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Turn activation checkpointing on in every layer of ``model`` that supports it (see
    :func:`checkpointable_layers`, whose error a model without any raises); returns how many layers."""
    layers = checkpointable_layers(model)
    for layer in layers:
        if isinstance(layer, Checkpointed):
            layer.activation_checkpointing = True
        else:
            layer.set_grad_checkpointing(True)
    return len(layers)
