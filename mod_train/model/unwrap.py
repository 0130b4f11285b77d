"""The megatron model inside the wrappers training puts around it."""

from __future__ import annotations

import torch

__all__ = ["MultipleChunksError", "unwrap_model"]


class MultipleChunksError(ValueError):
    """A container holds several model chunks (virtual pipeline) where one model was expected."""


def unwrap_model(model):
    """The GPTModel inside a DeepSpeed engine, a ``ModelChunks`` / list of one chunk, a chunk view,
    or megatron's own wrappers: follow ``.module`` until the object with a ``decoder``.

    Raises :class:`MultipleChunksError` when a container on the way holds more than one chunk.
    """
    while True:
        if isinstance(model, (list, tuple, torch.nn.ModuleList)):
            if len(model) != 1:
                raise MultipleChunksError(
                    f"exactly one model chunk is needed (no virtual pipeline), got {len(model)}")
            model = model[0]
        elif hasattr(model, "module") and not hasattr(model, "decoder"):
            model = model.module
        else:
            return model
