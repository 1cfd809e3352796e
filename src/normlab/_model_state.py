"""Temporarily changing a model's state and putting it back: what every diagnostic and saliency method
that looks at a user's model does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BatchNorm on its running statistics, dropout off); every
    module's own ``training`` flag is restored after it, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
