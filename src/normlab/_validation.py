"""Input and hyperparameter checks shared by every module: one wording for one mistake."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_eps(eps: float | None, *, allow_none: bool = False) -> None:
    """``ValueError`` unless eps is a finite non-negative number (or None where the layer allows it)."""
    if eps is None and allow_none:
        return
    if eps is None or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")


def as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of positive ints (an int means the last dim)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(not isinstance(n, int) or n <= 0 for n in shape):
        raise ValueError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
    return shape


def check_float_tensor(x: torch.Tensor, name: str = "input") -> None:
    """``TypeError`` unless ``x`` is a floating-point tensor (float16/bfloat16/float32/float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def check_input(x: torch.Tensor, trailing: tuple[int, ...], *, name: str = "input") -> None:
    """``ValueError`` naming expected and actual shape when ``x`` does not end in ``trailing``;
    ``TypeError`` for a non-floating dtype. Skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    check_float_tensor(x, name)
    if tuple(x.shape[x.dim() - len(trailing):]) != trailing or x.dim() < len(trailing):
        raise ValueError(f"expected {name} with trailing shape {trailing}, got {tuple(x.shape)}")


def check_channel_input(x: torch.Tensor, num_features: int, layer: str, *, ndims: tuple[int, ...] = (4,)) -> None:
    """The input checks of a channel-first norm (``(N, C, *)``, C = ``num_features``): ``TypeError`` for a
    non-floating dtype, ``ValueError`` for a rank not in ``ndims``, a channel count other than
    ``num_features`` or an empty batch, each naming the input shape. Skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    check_float_tensor(x)
    shape = tuple(x.shape)
    if x.dim() not in ndims:
        layouts = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
        wanted = " or ".join(f"{d}D {layouts[d]}" for d in ndims)
        raise ValueError(f"{layer} expected {wanted} input, got {x.dim()}D input of shape {shape}")
    if shape[1] != num_features:
        raise ValueError(f"{layer} expected {num_features} channels in dim 1, got {shape[1]} "
                         f"(input of shape {shape})")
    if shape[0] == 0:
        raise ValueError(f"{layer} expected a non-empty batch, got input of shape {shape}")


def check_values_per_channel(count: int, layer: str, shape: tuple[int, ...], when: str = "in training") -> None:
    """``ValueError`` when batch statistics would be taken over a single value per channel (their variance
    is 0 and the output meaningless), as ``nn.BatchNorm2d`` raises. ``count`` is the global count; ``when``
    says when the layer takes statistics from its input."""
    if count <= 1 and not torch.compiler.is_compiling():
        raise ValueError(f"{layer} needs more than one value per channel {when}, got input of shape "
                         f"{tuple(shape)}")
