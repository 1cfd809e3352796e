"""Weight Standardization (WS): each output row of a convolution's weight standardized to zero mean and unit
variance before use, as a ``torch.nn.utils.parametrize`` parametrization.

Paper: Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", 2019, arXiv:1903.10520; official code: joe-siyuan-qiao/WeightStandardization (``README.md``,
PyTorch and TensorFlow snippets) and joe-siyuan-qiao/Batch-Channel-Normalization
(``imagenet/models/layers.py`` ``Conv2d``, ``DeepLabV3/deeplab.py``). timm's ``StdConv2d`` is the same
reparametrization with eps 1e-6.

For a weight ``W`` of shape ``(O, I, *kernel)`` (``I`` = in_channels / groups, so a grouped or depthwise conv
standardizes each stored row, not a group of rows) or an ``nn.Linear`` weight ``(O, I)``, per output row o
over its ``n = I * prod(kernel)`` fan-in entries::

    mu_o  = mean(W[o])
    var_o = mean((W[o] - mu_o)^2)                       (unbiased=True: divide by n - 1)
    W_hat[o] = (W[o] - mu_o) / sqrt(var_o + eps)        (eps_outside_sqrt=True: / (sqrt(var_o) + eps))

The layer then uses ``W_hat``; gradients flow through ``mu_o`` and ``var_o`` (ordinary autograd). No gain
parameter (unlike Weight Normalization); a bias is left as it is. The raw weight stays the parameter the
optimizer sees (``parametrizations.weight.original`` in the state_dict), and
``torch.nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)`` bakes
``W_hat`` into a plain layer.

Defaults: the paper's form, biased variance with eps = 1e-5 inside the square root. The official code has
variants, selected by the options: ``imagenet/models/layers.py`` uses the unbiased variance with eps 1e-5
inside (``unbiased=True``); the WS README's PyTorch code and ``DeepLabV3/deeplab.py`` divide by ``std + 1e-5``
with the unbiased std (``unbiased=True, eps_outside_sqrt=True``); the README's TensorFlow code by the biased
``std + 1e-5`` (``eps_outside_sqrt=True``); timm's ``StdConv2d`` is the default form with ``eps=1e-6``. The
choice matters more than "O(eps)" suggests: a default-initialised PyTorch conv has ``var_o ~ 1/(3n)``, so eps
inside the sqrt changes ``W_hat`` by a relative ``eps / (2 var_o)``, about 1e-4 to 1e-3 for n = 8 to 36.

Properties: ``W_hat(a W + b) = W_hat(W)`` for a > 0 and b constant per row (up to eps), so the layer's
output does not depend on the raw weight's per-row scale and shift; the gradient with respect to each raw
row sums to zero.

Notes:
- Only standardize layers followed by a normalization (GroupNorm, :class:`normlab.layers.batch_channel.
  BatchChannelNorm2d`, BatchNorm): WS fixes the weight scale, which a plain activation after the layer
  cannot undo (the README's note).
- A fan-in of one (e.g. a 1x1 conv with one input channel per group) raises ``ValueError("weight
  standardization needs fan-in > 1")``: each row would standardize to 0 (or NaN with the unbiased variance).
  A depthwise 3x3 conv (n = 9) is allowed, if noisy.
- A row with zero variance (a zero-initialised layer) standardizes to 0; with eps inside the sqrt its
  gradient is the centred upstream gradient times ``1/sqrt(eps)``, with eps outside it is 1/eps times it.
- float16/bfloat16 weights: moments and arithmetic in float32, ``W_hat`` in the weight's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import functional as NF
from .._validation import check_eps
from ._common import parametrized_tensor

__all__ = ["WeightStandardization", "add_weight_standardization", "weight_standardization"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fan_in_error(shape: tuple[int, ...], where: str = "") -> ValueError:
    return ValueError(f"weight standardization needs fan-in > 1{where}: a weight of shape {shape} has "
                      f"fan-in {math.prod(shape[1:])} per output row")


class WeightStandardization(nn.Module):
    """The parametrization: ``forward(W)`` returns ``W_hat``, each row ``W[o]`` (all dims but the first)
    standardized: ``(W[o] - mean) / sqrt(var + eps)`` (``eps_outside_sqrt=True``: ``/ (std + eps)``),
    with the biased variance (``unbiased=True``: divided by n - 1). Register it with
    :func:`weight_standardization`."""

    def __init__(self, eps: float = 1e-5, unbiased: bool = False, eps_outside_sqrt: bool = False) -> None:
        super().__init__()
        check_eps(eps)
        for name, value in (("unbiased", unbiased), ("eps_outside_sqrt", eps_outside_sqrt)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.eps, self.unbiased, self.eps_outside_sqrt = float(eps), unbiased, eps_outside_sqrt

    def extra_repr(self) -> str:
        return f"eps={self.eps}, unbiased={self.unbiased}, eps_outside_sqrt={self.eps_outside_sqrt}"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() < 2:
            raise ValueError(f"weight standardization needs a weight with at least 2 dims (out, fan-in...), "
                             f"got shape {tuple(weight.shape)}")
        if math.prod(weight.shape[1:]) <= 1:
            raise _fan_in_error(tuple(weight.shape))
        rows = weight.to(NF.compute_dtype(weight.dtype)).reshape(weight.shape[0], -1)
        var, mean = torch.var_mean(rows, dim=1, correction=int(self.unbiased), keepdim=True)
        if self.eps_outside_sqrt:
            # sqrt has an infinite derivative at 0: a zero row (var = 0) takes the std path with a constant
            positive = var > 0
            std = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)
            scale = 1.0 / (std + self.eps)
        else:
            scale = torch.rsqrt(var + self.eps)
        return ((rows - mean) * scale).view(weight.shape).to(weight.dtype)


def _has_ws(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, WeightStandardization) for p in module.parametrizations[name])


def _check_module(module: nn.Module, name: str, where: str = "") -> None:
    """The errors :func:`weight_standardization` raises, before anything changes."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"weight standardization standardizes output rows (dim 0); a transposed conv{where} "
                        f"stores its input channels in dim 0: not supported")
    param = parametrized_tensor(module, name, where)
    if param.dim() < 2:
        raise ValueError(f"weight standardization needs a weight with at least 2 dims (out, fan-in...), "
                         f"got {name!r} of shape {tuple(param.shape)}{where}")
    if math.prod(param.shape[1:]) <= 1:
        raise _fan_in_error(tuple(param.shape), where)
    if _has_ws(module, name):
        raise ValueError(f"{type(module).__name__}{where}: {name!r} already has weight standardization")


def weight_standardization(module: nn.Module, name: str = "weight", eps: float = 1e-5, unbiased: bool = False,
                           eps_outside_sqrt: bool = False) -> nn.Module:
    """Register :class:`WeightStandardization` on ``module.<name>`` (``torch.nn.utils.parametrize``) and return
    the module: a Conv1d/2d/3d (grouped and depthwise too) or ``nn.Linear``, or any module whose parameter's
    dim 0 indexes the outputs. ``ValueError`` for a fan-in of 1, a weight that already has it, or a lazy
    (uninitialized) weight; ``TypeError`` for a transposed conv."""
    parametrization = WeightStandardization(eps, unbiased, eps_outside_sqrt)
    _check_module(module, name)
    parametrize.register_parametrization(module, name, parametrization)
    return module


def add_weight_standardization(model: nn.Module, *, eps: float = 1e-5, unbiased: bool = False,
                               eps_outside_sqrt: bool = False) -> list[str]:
    """Weight Standardization on every ``nn.Conv1d/2d/3d`` of ``model`` that does not have it yet, in place;
    returns the qualified names of the convs changed. Checks every conv first and raises (the model
    untouched) if one cannot be standardized (fan-in 1, lazy weight)."""
    WeightStandardization(eps, unbiased, eps_outside_sqrt)  # validates the options before any change
    todo = []
    for qualname, module in model.named_modules():
        if isinstance(module, _CONVS) and not _has_ws(module, "weight"):
            _check_module(module, "weight", f" ({qualname or 'the model'})")
            todo.append((qualname, module))
    for _, module in todo:
        parametrize.register_parametrization(module, "weight", WeightStandardization(eps, unbiased,
                                                                                     eps_outside_sqrt))
    return [qualname for qualname, _ in todo]
