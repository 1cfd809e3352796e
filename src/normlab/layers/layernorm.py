"""LayerNorm, RMSNorm and Compressed RMSNorm.

Papers:
- Ba, Kiros, Hinton, "Layer Normalization", 2016, arXiv:1607.06450 (no official PyTorch code).
- Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019, code: bzhangGo/rmsnorm.
- Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
  Transformers", NeurIPS 2023, arXiv:2305.14858, code: ZixuanJiang/pre-rmsnorm-transformer.

LayerNorm:  ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the trailing
``normalized_shape`` dims, biased variance (divide by D), eps inside the sqrt, default 1e-5 (the paper
and torch). It is ``torch.nn.LayerNorm`` with normlab's input checks: the same state_dict keys and the
same kernel, so it is bit-identical to torch.

RMSNorm:  ``y = x / sqrt(mean(x^2) + eps) * weight (+ bias)``, eps inside the sqrt as
``torch.nn.RMSNorm`` (``eps=None`` = the input dtype's machine epsilon). The original code puts
``eps=1e-8`` outside the sqrt; normlab follows torch so that ``RMSNorm`` is a drop-in for
``nn.RMSNorm``. ``bias=True`` exists for the Pre-LN -> Pre-RMSNorm conversion, which keeps the LN's
bias on the RMSNorm. Its backward is hand-written on top of ATen's fused LayerNorm backward, because
torch's own CPU ``rms_norm`` is several times slower than its ``layer_norm``. Recommended mode for speed:
``torch.compile`` (inductor fuses RMSNorm and CRMSNorm into one kernel each way); eager mode is within
a small factor of ``nn.LayerNorm`` (``normlab speed`` has the numbers, ``functional.py`` the reasons).

CRMSNorm (Compressed RMSNorm):  for the first ``d-1`` coordinates ``x`` of a zero-mean d-vector,
``y = x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * weight (+ bias)``; equals the first d-1 outputs of
RMSNorm on the full vector. ``num_features`` is the compressed width d-1.

All three compute statistics in float32 for float16/bfloat16 input and return the input dtype;
none has running statistics, so ``train()`` and ``eval()`` compute the same thing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .. import functional as NF
from .._validation import as_shape, check_eps, check_input


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with checked input: ``LayerNorm(normalized_shape, eps=1e-5,
    elementwise_affine=True, bias=True, device=None, dtype=None)``."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        check_eps(eps)
        shape = as_shape(normalized_shape)
        if math.prod(shape) == 1:
            warnings.warn("LayerNorm over a single element always outputs its bias (x - mean(x) = 0)",
                          stacklevel=2)
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.normalized_shape)
        return super().forward(x)


class _AffineNorm(nn.Module):
    """The gain (init 1) and optional bias (init 0) over ``shape`` that RMSNorm and CRMSNorm share."""

    def __init__(self, shape: tuple[int, ...], eps: float | None, elementwise_affine: bool, bias: bool,
                 device, dtype) -> None:
        super().__init__()
        check_eps(eps, allow_none=True)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"


class RMSNorm(_AffineNorm):
    """Root-mean-square norm: ``RMSNorm(normalized_shape, eps=None, elementwise_affine=True, bias=False,
    device=None, dtype=None)``; with the defaults it equals ``torch.nn.RMSNorm``."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, bias: bool = False, device=None, dtype=None) -> None:
        self.normalized_shape = as_shape(normalized_shape)
        super().__init__(self.normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.normalized_shape)
        return NF.rms_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, {super().extra_repr()}"


class CRMSNorm(_AffineNorm):
    """Compressed RMSNorm over the last dim of width ``num_features`` = d-1:
    ``CRMSNorm(num_features, eps=None, elementwise_affine=True, bias=False, device=None, dtype=None)``."""

    def __init__(self, num_features: int, eps: float | None = None, elementwise_affine: bool = True,
                 bias: bool = False, device=None, dtype=None) -> None:
        (self.num_features,) = as_shape(num_features)
        super().__init__((self.num_features,), eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, (self.num_features,))
        return NF.crms_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, {super().extra_repr()}"
