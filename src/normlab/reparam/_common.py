"""Checks shared by the weight reparameterizations, before any parametrization is registered."""

from __future__ import annotations

import torch
from torch import nn


def parametrized_tensor(module: nn.Module, name: str, where: str = "") -> torch.Tensor:
    """``module``'s tensor ``name``, which a parametrization is about to replace; ``ValueError`` when there is
    no such tensor or it is a lazy module's uninitialized parameter. ``where`` names the module in a model."""
    param = getattr(module, name, None)
    if not isinstance(param, torch.Tensor):
        raise ValueError(f"{type(module).__name__}{where} has no tensor named {name!r}")
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(module).__name__}{where}: {name!r} is not initialized yet (lazy module); run a "
                         f"forward first")
    return param
