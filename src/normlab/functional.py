"""Pure tensor functions shared by layers and conversions (``F.rms_norm``-style signatures).

Statistics are computed in float32 for float16/bfloat16 input and the result is cast back to the
input dtype; float64 stays float64.
"""

from __future__ import annotations

import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are taken in: float32 for half types, the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last ``ndim`` dims with a hand-written backward.

    forward:  r = (mean(x^2) + eps)^(-1/2),  xhat = x * r,  y = xhat * w (+ b)
    backward: dx = r * (g - xhat * mean(g * xhat)),  g = dy * w;  dw = sum(dy * xhat),  db = sum(dy)
    The backward reuses ATen's fused LayerNorm backward with mean 0 and rstd r, which computes
    r * (g - mean(g) - xhat * mean(g * xhat)); adding back r * mean(g) (one GEMV) gives RMSNorm's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ndim: int, eps: float):
        dims = tuple(range(x.dim() - ndim, x.dim()))
        size = math.prod(x.shape[x.dim() - ndim:])
        rstd = torch.linalg.vector_norm(x, dim=dims, keepdim=True).square_().div_(size).add_(eps).rsqrt_()
        y = x * rstd
        if weight is not None:
            y = y.mul_(weight)
        if bias is not None:
            y = y.add_(bias)
        ctx.save_for_backward(x, rstd, weight)
        ctx.ndim, ctx.has_bias = ndim, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        shape = list(x.shape[x.dim() - ctx.ndim:])
        rows, size = rstd.numel(), math.prod(shape)
        grad_y = grad_y.contiguous()
        need_w = weight is not None and ctx.needs_input_grad[1]
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, shape, torch.zeros_like(rstd), rstd, weight, None,
            [ctx.needs_input_grad[0], need_w, False])
        if grad_x is not None:
            flat_g = grad_y.reshape(rows, size)
            mean_g = flat_g @ weight.reshape(-1) if weight is not None else flat_g.sum(-1)
            grad_x = grad_x.add_(mean_g.reshape(rstd.shape).mul_(rstd).div_(size))
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(rows, size).sum(0).reshape(shape)
        return grad_x, grad_w, grad_b, None, None


def rms_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight + bias`` over the trailing ``normalized_shape`` dims.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.functional.rms_norm``.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return _RMSNormFunction.apply(xc, w, b, len(normalized_shape), float(eps)).to(x.dtype)


def crms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    """Compressed RMSNorm (Jiang et al., 2023) of the first ``d-1`` coordinates of a zero-mean d-vector.

    ``y = x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * weight + bias`` with ``d = x.shape[-1] + 1``:
    ``-sum(x)`` is the dropped d-th coordinate, so ``crms_norm(x[..., :-1]) == rms_norm(x)[..., :-1]``
    for zero-mean ``x``. The sums are taken in float32 for half input (the ``sum(x)^2`` term cancels).
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xc = x.to(compute_dtype(x.dtype))
    d = xc.shape[-1] + 1
    mean_square = (xc.square().sum(-1, keepdim=True) + xc.sum(-1, keepdim=True).square()) / d
    y = xc * torch.rsqrt(mean_square + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
