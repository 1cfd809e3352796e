"""TrAct: a closed-form update of the first layer's pre-activations, as a custom backward for the first
``nn.Linear`` / ``nn.Conv2d`` of a model, consumed by any ``torch.optim`` optimizer.

Paper: Felix Petersen, Christian Borgelt, Stefano Ermon, "TrAct: Making First-layer Pre-Activations
Trainable", NeurIPS 2024, arXiv:2410.23970; official code: Felix-Petersen/tract (``src/tract.py``,
``TrActLinearFunction``, ``TrActConv2DFunction``, ``TrAct``), on PyPI as ``torch_tract``.

The gradient reaching a first-layer weight is proportional to the pixel values, so bright, high-contrast
inputs dominate what the first layer learns. TrAct takes the gradient step on the layer's *outputs* instead
and picks the weights whose outputs best match that proposal in ridge-regularised least squares. Folded
into the weight gradient (the official code's form, so that the user's optimizer and lr schedule apply):
for a Linear layer with input rows ``x`` ``(b, n)`` (all leading dims flattened), weight ``W`` ``(m, n)``
and upstream gradient ``G = dL/dz`` ``(b, m)``::

    grad_W = G^T x (x^T x / b + lambda I_n)^{-1}                       (b >= n: an n x n system)
           = G^T (x x^T / b + lambda I_b)^{-1} x                        (b <  n: the b x b system, Woodbury)

For ``nn.Conv2d`` (dilation 1, one group) the rows are the ``F.unfold`` patches ``a`` ``(N, C_in k_h k_w)``,
``N = B H_out W_out`` (batch-major, then spatial), with ``G`` flattened in the same row order, and
``grad_W`` is reshaped to the weight's shape. The forward pass, ``grad_input`` and ``grad_bias`` are the
ordinary ones; only the weight gradient changes. With plain gradient descent ``W <- W - eta grad_W`` is
the paper's least-squares fit of ``W`` to the output proposal ``z - eta G``; momentum, Adam moments and
weight decay inside the optimizer act on the TrAct gradient. ``lambda`` is relative to the per-row mean
second moment ``x^T x / b``, so it does not depend on the batch size: ``lambda -> inf`` gives the ordinary
gradient divided by ``lambda``, ``lambda -> 0`` whitens the inputs fully. No state, no running statistics,
no difference between ``train()`` and ``eval()``.

Defaults: ``lambda_=0.1``, the paper's value for CIFAR, ImageNet ResNets and ViTs (on inputs of roughly
unit per-pixel variance). Keep the lr tuned for the baseline.

Use: ``convert_first_layer(model, "conv1")`` swaps one named layer in place (returns ``["conv1"]``);
:func:`tract` returns a TrAct copy of a layer that shares its Parameters; :class:`TrActLinear` and
:class:`TrActConv2d` are drop-in layers; :func:`tract_linear` and :func:`tract_conv2d` are the functional
forms. A converted model's ``state_dict`` has the same keys and shapes as the unconverted one.

Deviations from the official code, and why:
- The linear systems are solved with ``torch.linalg.solve`` on the symmetric positive definite matrix,
  not by an explicit inverse; the code's ``inv_type="cholesky_inverse"`` option is not offered (as
  written it passes the matrix, not its Cholesky factor, to ``torch.cholesky_inverse``, which is wrong).
- The Woodbury branch solves ``(x x^T / b + lambda I) s = x`` directly; the code's
  ``(I - A (A / lambda + I)^{-1} / lambda) / lambda`` is the same matrix.
- Unsupported convolutions raise ``NotImplementedError`` (dilation != 1, groups != 1, ``padding_mode``
  other than ``"zeros"``, ``padding="same"`` with an even kernel, Conv1d/Conv3d); the code silently drops
  dilation, groups and padding mode. A subclass of Linear/Conv2d with its own forward raises ``TypeError``.
- float16/bfloat16: the Gram matrix and the solve run in float32 and the gradient is cast back.

Notes: gradient accumulation over micro-batches is not the same as one large batch (each micro-batch
has its own second-moment matrix). Gradient clipping and anything else reading ``.grad`` see the TrAct
gradient. Inputs that require grad (adversarial training, input saliency) get the ordinary ``grad_input``.
The system is ``min(N, n)`` square per step; apply TrAct to a first layer (n = C_in k_h k_w, e.g. 768 for
a 16 x 16 RGB patch embedding), not to wide deep layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import compute_dtype

__all__ = ["TrActConv2d", "TrActLinear", "convert_first_layer", "tract", "tract_conv2d", "tract_linear"]


def _check_lambda(lambda_: float) -> float:
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_) \
            or lambda_ <= 0:
        raise ValueError(f"lambda_ must be a finite number > 0, got {lambda_!r}")
    return float(lambda_)


def _solve_primal(a: torch.Tensor, g: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``g^T a (a^T a / N + lambda I_n)^{-1}``, ``(m, n)``: the n x n system."""
    n = a.shape[1]
    gram = a.T @ a / a.shape[0] + lambda_ * torch.eye(n, dtype=a.dtype, device=a.device)
    return torch.linalg.solve(gram, a.T @ g).T


def _solve_dual(a: torch.Tensor, g: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``g^T (a a^T / N + lambda I_N)^{-1} a``, ``(m, n)``: the N x N system (push-through identity)."""
    rows = a.shape[0]
    gram = a @ a.T / max(rows, 1) + lambda_ * torch.eye(rows, dtype=a.dtype, device=a.device)
    return g.T @ torch.linalg.solve(gram, a)


def _weight_grad(a: torch.Tensor, g: torch.Tensor, lambda_: float, dtype: torch.dtype) -> torch.Tensor:
    """The TrAct weight gradient for input rows ``a`` ``(N, n)`` and output gradients ``g`` ``(N, m)``,
    through the smaller of the two systems, computed in float32 for half types and returned in ``dtype``."""
    work = compute_dtype(a.dtype)
    a, g = a.to(work), g.to(work)
    solve = _solve_dual if a.shape[0] < a.shape[1] else _solve_primal
    return solve(a, g, lambda_).to(dtype)


class _TrActLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lambda_):
        ctx.save_for_backward(x, weight)
        ctx.lambda_ = lambda_
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(x, grad_out, ctx.lambda_, weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _TrActConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, lambda_):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.lambda_ = stride, padding, lambda_
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            patches = F.unfold(x, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
            grad_w = _weight_grad(a, g, ctx.lambda_, weight.dtype).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def tract_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 lambda_: float = 0.1) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is TrAct's (module docstring); ``x`` may have any
    leading dims (they are flattened into rows for the second-moment matrix)."""
    lambda_ = _check_lambda(lambda_)
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"expected input with last dim {weight.shape[-1]} (in_features), got shape "
                         f"{tuple(x.shape)}")
    out = _TrActLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, lambda_)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return pair


def _resolve_padding(padding: int | tuple[int, int] | str, kernel_size: tuple[int, int]) -> tuple[int, int]:
    """``padding`` as a symmetric pair: ``"valid"`` is 0, ``"same"`` is ``(k - 1) // 2`` for odd kernels."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if any(k % 2 == 0 for k in kernel_size):
            raise NotImplementedError(f"TrAct: padding='same' with the even kernel {tuple(kernel_size)} pads "
                                      f"asymmetrically, which is not supported; pad the input explicitly")
        return tuple((k - 1) // 2 for k in kernel_size)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair(padding, "padding")


def tract_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 lambda_: float = 0.1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group) whose weight gradient is
    TrAct's over the unfolded input patches (module docstring). ``x`` is ``(B, C_in, H, W)``."""
    lambda_ = _check_lambda(lambda_)
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected input (B, {weight.shape[1]}, H, W) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    stride = _pair(stride, "stride")
    if 0 in stride:
        raise ValueError(f"stride must be positive, got {stride}")
    padding = _resolve_padding(padding, tuple(weight.shape[2:]))
    return _TrActConv2dFn.apply(x, weight, bias, stride, padding, lambda_)


class TrActLinear(nn.Linear):
    """``nn.Linear`` with TrAct's weight gradient (module docstring); same parameters and state_dict keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lambda_: float = 0.1,
                 device=None, dtype=None) -> None:
        self.lambda_ = _check_lambda(lambda_)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.lambda_}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tract_linear(x, self.weight, self.bias, self.lambda_)


class TrActConv2d(nn.Conv2d):
    """``nn.Conv2d`` (dilation 1, one group, zero padding) with TrAct's weight gradient (module docstring);
    same parameters and state_dict keys. ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` (odd
    kernels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0, bias: bool = True,
                 lambda_: float = 0.1, device=None, dtype=None) -> None:
        self.lambda_ = _check_lambda(lambda_)
        _resolve_padding(padding, _pair(kernel_size, "kernel_size"))
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias, device=device,
                         dtype=dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.lambda_}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tract_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.lambda_)


_SUPPORTED = (nn.Linear, nn.Conv2d, TrActLinear, TrActConv2d)


def _check_layer(module: nn.Module, where: str = "") -> None:
    """The errors :func:`tract` raises for ``module``, before anything is built."""
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        raise NotImplementedError(f"TrAct supports nn.Linear and nn.Conv2d, not {type(module).__name__}{where}")
    if type(module) not in _SUPPORTED:
        raise TypeError(f"TrAct converts nn.Linear or nn.Conv2d exactly (not a subclass with its own forward "
                        f"or a parametrized layer), got {type(module).__name__}{where}")
    if isinstance(module, nn.Conv2d):
        unsupported = [f"{name}={value!r}" for name, value, ok in (
            ("dilation", module.dilation, module.dilation == (1, 1)),
            ("groups", module.groups, module.groups == 1),
            ("padding_mode", module.padding_mode, module.padding_mode == "zeros"),
        ) if not ok]
        if unsupported:
            raise NotImplementedError(f"TrAct does not support Conv2d with {', '.join(unsupported)}{where}")
        _resolve_padding(module.padding, module.kernel_size)


def tract(module: nn.Linear | nn.Conv2d, lambda_: float = 0.1) -> TrActLinear | TrActConv2d:
    """A :class:`TrActLinear` / :class:`TrActConv2d` that shares ``module``'s weight and bias Parameters
    (same state_dict keys, same forward) and its train/eval mode; ``module`` itself is not changed."""
    lambda_ = _check_lambda(lambda_)
    _check_layer(module)
    has_bias = module.bias is not None
    kw = {"device": "meta", "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        new = TrActLinear(module.in_features, module.out_features, has_bias, lambda_, **kw)
    else:
        new = TrActConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, has_bias, lambda_, **kw)
    new.weight = module.weight
    new.bias = module.bias
    return new.train(module.training)


def convert_first_layer(model: nn.Module, name: str, lambda_: float = 0.1) -> list[str]:
    """Replace the submodule ``name`` of ``model`` (e.g. ``"conv1"``, ``"patch_embed.proj"``) by its TrAct
    version (:func:`tract`, sharing the Parameters), in place; returns ``[name]``. Raises, leaving the model
    untouched, for an unknown name or a layer TrAct cannot convert exactly."""
    lambda_ = _check_lambda(lambda_)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be the qualified name of a submodule, got {name!r}")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no submodule {name!r}") from None
    _check_layer(layer, f" ({name})")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, tract(layer, lambda_))
    return [name]
