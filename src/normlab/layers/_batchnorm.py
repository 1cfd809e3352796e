"""BatchNorm's parameters and buffers, for the layers that hold exactly what a BatchNorm holds (alpha-BN,
AdaB2N), under torch's names so that a BatchNorm's ``state_dict`` maps onto them."""

from __future__ import annotations

import torch
from torch import nn


def register_batchnorm_state(module: nn.Module, num_features: int, affine: bool, device=None, dtype=None) -> None:
    """Parameters ``weight`` and ``bias`` (``(C,)``; None without ``affine``) and buffers ``running_mean``,
    ``running_var`` (``(C,)``) and ``num_batches_tracked`` on ``module``, uninitialised (the layer's
    ``reset_parameters`` sets them)."""
    factory = {"device": device, "dtype": dtype}
    if affine:
        module.weight = nn.Parameter(torch.empty(num_features, **factory))
        module.bias = nn.Parameter(torch.empty(num_features, **factory))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
    module.register_buffer("running_mean", torch.empty(num_features, **factory))
    module.register_buffer("running_var", torch.empty(num_features, **factory))
    module.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

