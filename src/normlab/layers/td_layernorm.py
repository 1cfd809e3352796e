"""Time-Dependent LayerNorm (TD-LN), TD-RMSNorm, and adaLN as the baseline they are compared with.

Paper: Liu, Zeng, He, Yu, Shen, Chen, "Alleviating Distortion in Image Generation via Multi-Resolution
Diffusion Models and Time-Dependent Layer Normalization", NeurIPS 2024, arXiv:2406.09416, official code
qihao067/DiMR (``libs/core/sigmoid/module.py``: ``TimeDependentParameter``, ``LayerNorm``, ``TDRMSNorm``,
``AdaRMSNorm``; ``libs/core/sigmoid/kernel.py``: ``tdp_torch``). Only the layers are here; the
multi-resolution DiMR network is out of scope.

Time-dependent parameter (TDP), elementwise over a parameter shape S, for a scalar time ``tau``::

    s = sigmoid(tau * (1 + slope_delta) + offset)
    theta(tau) = p1 + s * (p0 - p1)            (= s * p0 + (1 - s) * p1)

Init ``p0 = p1 = init`` (1 for a gain, 0 for a shift), ``slope_delta = offset = 0``: at init
``theta(tau) = init`` for every tau, so each layer equals its plain norm. Following the code, not the
paper's text, slope and offset are per element and the slope is parameterised as ``1 + slope_delta``;
the code excludes ``slope_delta``/``offset`` from weight decay (:func:`no_weight_decay_names`).

- :class:`TDLayerNorm`: ``y = gamma(tau_b) * (x - mean) / sqrt(var + eps) + beta(tau_b)`` per sample b,
  biased variance over the trailing ``normalized_shape``, eps 1e-5 inside the sqrt (DiMR's stage norms).
- :class:`TDRMSNorm` (DiMR's blocks): ``y = gamma(tau_b) * x / (rms + eps) (+ beta(tau_b))``,
  ``rms = ||x||_2 / sqrt(D)``, eps 1e-8 *outside* the sqrt as in the code (``eps_mode="inside"`` gives
  torch's ``x / sqrt(mean(x^2) + eps)``); no shift by default. ``rms`` comes from a vector norm, whose
  backward is 0 at a zero vector, so an all-zero token gets the finite gradient ``gamma / eps`` (as in
  the code) where ``sqrt(mean(x^2))`` would give NaN.
- :class:`AdaLayerNorm` (DiT's adaLN, the baseline): ``shift, scale = Linear(SiLU(cond))``,
  ``y = LN(x) * (1 + scale) + shift``, LN without affine, eps 1e-6, Linear zero-initialised
  (adaLN-Zero) by default. The gates of adaLN-Zero belong to the block, not the norm.

The time input ``tau`` is passed to ``forward`` explicitly, never stored (the code's ``seed_time``
sets it as module state for the whole model). Its scale is a convention: the official training code
feeds ``tau = 2n/N - 1`` for step ``n`` of ``N`` (:func:`tdln_time_from_step`; it names this log-SNR
but it is not one); use ``2t - 1`` for continuous ``t`` in [0, 1]. Raw step indices saturate the
sigmoid, so ``|tau| > 20`` warns. ``tau`` has shape ``()``, ``(1,)`` or ``(B,)`` with B the batch
(dim 0 of ``x``). A scalar tau is the code's constant-time fast path: theta is evaluated once and, in
TD-LN, fused into ``F.layer_norm``. The code also takes that path when all entries of a ``(B,)`` tau are
equal; normlab does not branch on tensor values (a graph break under ``torch.compile``), so pass a
scalar tau to get it. Backward is plain autograd (the code's CUDA kernel is an optimisation
of the same formula; its torch reference ``tdp_torch`` is what is implemented here).

Float16/bfloat16 input: statistics, sigmoid and affine in float32, output in the input dtype; float64
stays float64. No running statistics: ``train()`` and ``eval()`` compute the same thing. Eager tau checks
(shape, the ``|tau| > 20`` warning) read tau's values once per call, a host sync on GPU; they are
skipped under ``torch.compile``.

Speed (eager fwd+bwd, 8 x 256 x 768 float32, 1 thread, this project's loaded 2-core machine, as ratios
to ``nn.LayerNorm``): TD-LN with a scalar tau 1.0x (its affine runs inside ``F.layer_norm``), with a
per-sample tau 2.8x, TD-RMSNorm 4x: the per-sample affine is composed from ATen ops, each one more
full-size pass forward and backward. ``torch.compile`` is the route to fusing them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import compute_dtype
from .._validation import as_shape, check_eps, check_input

TAU_WARN = 20.0


def tdln_time_from_step(n: torch.Tensor | int | float, num_steps: int) -> torch.Tensor | float:
    """The official time input of a discrete diffusion step: ``tau = 2 n / num_steps - 1``, in (-1, 1]
    for ``n`` in 1..num_steps (an int tensor becomes float32)."""
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if isinstance(n, torch.Tensor) and not n.is_floating_point():
        n = n.float()
    return 2 * n / num_steps - 1


def no_weight_decay_names(module: nn.Module) -> list[str]:
    """Qualified names of the ``slope_delta`` and ``offset`` parameters of every
    :class:`TimeDependentParameter` in ``module``: the official code puts them in a no-decay group."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, sub in module.named_modules() if isinstance(sub, TimeDependentParameter)
            for name in ("slope_delta", "offset")]


def _check_tau(tau: torch.Tensor, x: torch.Tensor | None, feature_dims: int) -> None:
    """``TypeError`` for a non-floating tau; ``ValueError`` naming both shapes unless tau is ``()``,
    ``(1,)`` or ``(B,)`` with ``B = x.shape[0]``; a warning when ``|tau| > 20`` (skipped while compiling)."""
    if torch.compiler.is_compiling():
        return
    if not isinstance(tau, torch.Tensor) or not tau.is_floating_point():
        kind = tau.dtype if isinstance(tau, torch.Tensor) else type(tau).__name__
        raise TypeError(f"tau must be a floating-point torch.Tensor (e.g. 2n/N - 1 for step n of N), got {kind}")
    scalar = tau.dim() == 0 or tuple(tau.shape) == (1,)
    if x is not None and not scalar:
        batch = x.shape[0] if x.dim() > feature_dims else None
        if tau.dim() != 1 or batch is None or tau.shape[0] != batch:
            expected = "() or (1,)" if batch is None else f"(), (1,) or ({batch},)"
            raise ValueError(f"tau must have shape {expected} for input of shape {tuple(x.shape)}, "
                             f"got {tuple(tau.shape)}")
    elif x is None and tau.dim() > 1:
        raise ValueError(f"tau must have shape () or (B,), got {tuple(tau.shape)}")
    if tau.numel() and tau.detach().abs().max() > TAU_WARN:
        warnings.warn(f"|tau| > {TAU_WARN:g} saturates the time-dependent sigmoid (its slope starts at 1): "
                      "map diffusion steps to about [-1, 1], e.g. tdln_time_from_step(n, N)", stacklevel=3)


class TimeDependentParameter(nn.Module):
    """A parameter tensor of shape ``shape`` that is a sigmoid mix of two learned tensors driven by time:
    ``TimeDependentParameter(shape, init=1.0, device=None, dtype=None)``; ``forward(tau)`` returns
    ``theta(tau)`` of shape ``tau.shape + shape`` (so ``(B, *shape)`` for tau of shape ``(B,)``),
    computed in float32 for half-precision parameters."""

    def __init__(self, shape: int | Sequence[int], init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.shape = as_shape(shape)
        if not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.init = float(init)
        factory = {"device": device, "dtype": dtype}
        self.p0 = nn.Parameter(torch.empty(self.shape, **factory))
        self.p1 = nn.Parameter(torch.empty(self.shape, **factory))
        self.slope_delta = nn.Parameter(torch.empty(self.shape, **factory))
        self.offset = nn.Parameter(torch.empty(self.shape, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.p0, self.init)
        nn.init.constant_(self.p1, self.init)
        nn.init.zeros_(self.slope_delta)
        nn.init.zeros_(self.offset)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        _check_tau(tau, None, 0)
        return self._evaluate(tau)

    def _evaluate(self, tau: torch.Tensor) -> torch.Tensor:
        """``theta(tau)`` without the input checks (the norms check tau once per call)."""
        dtype = compute_dtype(self.p0.dtype)
        t = tau.to(dtype).reshape(*tau.shape, *(1,) * len(self.shape))
        p0, p1 = self.p0.to(dtype), self.p1.to(dtype)
        s = torch.sigmoid(torch.addcmul(self.offset.to(dtype), t, 1 + self.slope_delta.to(dtype)))
        return torch.addcmul(p1, s, p0 - p1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, init={self.init:g}"


class _TDNorm(nn.Module):
    """The time-dependent gain (init 1) and optional shift (init 0) over ``normalized_shape`` and the
    per-sample affine that TD-LN and TD-RMSNorm share."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float, elementwise_affine: bool, bias: bool,
                 device, dtype) -> None:
        super().__init__()
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = TimeDependentParameter(self.normalized_shape, 1.0, **factory) if elementwise_affine \
            else None
        self.bias = TimeDependentParameter(self.normalized_shape, 0.0, **factory) \
            if elementwise_affine and bias else None

    def reset_parameters(self) -> None:
        for tdp in (self.weight, self.bias):
            if tdp is not None:
                tdp.reset_parameters()

    def _check(self, x: torch.Tensor, tau: torch.Tensor) -> None:
        check_input(x, self.normalized_shape)
        _check_tau(tau, x, len(self.normalized_shape))

    def _affine(self, y: torch.Tensor, tau: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``y * (row_scale * gamma(tau_b)) + beta(tau_b)``, tau of shape () / (1,) / (B,) broadcast over the
        non-feature dims of ``y`` (a scalar tau evaluates theta once). Folding a per-row ``row_scale`` (the
        RMS normaliser) into the gain saves a full-size pass and a saved tensor in autograd."""
        if self.weight is None:
            return y
        t = tau.reshape(()) if tau.numel() == 1 else tau
        lead = (t.shape[0],) + (1,) * (y.dim() - 1 - len(self.normalized_shape)) if t.dim() else ()
        gamma = self.weight._evaluate(t).to(y.dtype).reshape(*lead, *self.normalized_shape)
        if row_scale is not None:
            gamma = row_scale * gamma
        if self.bias is None:
            return y * gamma
        return torch.addcmul(self.bias._evaluate(t).to(y.dtype).reshape(*lead, *self.normalized_shape), y, gamma)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class TDLayerNorm(_TDNorm):
    """Time-dependent LayerNorm: ``TDLayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True,
    bias=True, device=None, dtype=None)``, ``forward(x, tau)`` with ``x`` of shape ``(B, ..., *normalized_shape)``
    and ``tau`` of shape ``()``, ``(1,)`` or ``(B,)``. Equals ``nn.LayerNorm`` at init for every tau."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        self._check(x, tau)
        xc = x.to(compute_dtype(x.dtype))
        if self.weight is not None and tau.numel() == 1:  # constant time: one theta, affine fused in the kernel
            t = tau.reshape(())
            bias = None if self.bias is None else self.bias._evaluate(t).to(xc.dtype)
            y = F.layer_norm(xc, self.normalized_shape, self.weight._evaluate(t).to(xc.dtype), bias, self.eps)
        else:
            y = self._affine(F.layer_norm(xc, self.normalized_shape, eps=self.eps), tau)
        return y.to(x.dtype)


class TDRMSNorm(_TDNorm):
    """Time-dependent RMSNorm (DiMR's ``TDRMSNorm``): ``TDRMSNorm(normalized_shape, eps=1e-8,
    eps_mode="outside", bias=False, device=None, dtype=None)``, ``forward(x, tau)``.
    ``eps_mode="outside"``: ``x / (rms + eps)`` (the code; eps must be > 0), ``"inside"``:
    ``x / sqrt(mean(x^2) + eps)`` (torch's RMSNorm)."""

    EPS_MODES = ("outside", "inside")

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-8, eps_mode: str = "outside",
                 bias: bool = False, device=None, dtype=None) -> None:
        if eps_mode not in self.EPS_MODES:
            raise ValueError(f"eps_mode must be one of {self.EPS_MODES}, got {eps_mode!r}")
        check_eps(eps)
        if eps_mode == "outside" and eps <= 0:
            raise ValueError(f"eps must be positive with eps_mode='outside' (x / (rms + eps) is NaN for an "
                             f"all-zero token otherwise), got {eps!r}")
        self.eps_mode = eps_mode
        super().__init__(normalized_shape, eps, True, bias, device, dtype)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        self._check(x, tau)
        xc = x.to(compute_dtype(x.dtype))
        dims = tuple(range(-len(self.normalized_shape), 0))
        size = math.prod(self.normalized_shape)
        norm = torch.linalg.vector_norm(xc, dim=dims, keepdim=True)
        if self.eps_mode == "outside":
            row_scale = (norm * size ** -0.5 + self.eps).reciprocal()
        else:
            row_scale = torch.rsqrt(norm.square() / size + self.eps)
        return self._affine(xc, tau, row_scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, eps_mode={self.eps_mode!r}, bias={self.bias is not None}"


class AdaLayerNorm(nn.Module):
    """DiT's adaLN: ``AdaLayerNorm(normalized_shape, cond_dim, zero_init=True, eps=1e-6, device=None,
    dtype=None)``, ``forward(x, cond)`` with ``cond`` of shape ``(B, cond_dim)`` (or ``(cond_dim,)``,
    shared): ``shift, scale = Linear(SiLU(cond)).chunk(2)``, ``y = LN(x) * (1 + scale) + shift``.
    ``zero_init=True`` (adaLN-Zero's init) makes it a plain affine-free LayerNorm at init."""

    def __init__(self, normalized_shape: int | Sequence[int], cond_dim: int, zero_init: bool = True,
                 eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        check_eps(eps)
        self.normalized_shape = as_shape(normalized_shape)
        if not isinstance(cond_dim, int) or cond_dim <= 0:
            raise ValueError(f"cond_dim must be a positive int, got {cond_dim!r}")
        self.cond_dim, self.zero_init, self.eps = cond_dim, zero_init, eps
        self.linear = nn.Linear(cond_dim, 2 * math.prod(self.normalized_shape), device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        check_input(x, self.normalized_shape)
        check_input(cond, (self.cond_dim,), name="cond")
        per_sample = cond.dim() > 1
        if not torch.compiler.is_compiling() and per_sample and (
                cond.dim() != 2 or x.dim() <= len(self.normalized_shape) or cond.shape[0] != x.shape[0]):
            raise ValueError(f"cond must have shape ({self.cond_dim},) or (B, {self.cond_dim}) with B = "
                             f"x.shape[0]; got cond {tuple(cond.shape)} for input {tuple(x.shape)}")
        xc = x.to(compute_dtype(x.dtype))
        mod = self.linear(F.silu(cond.to(self.linear.weight.dtype))).to(xc.dtype)
        lead = (mod.shape[0],) + (1,) * (x.dim() - 1 - len(self.normalized_shape)) if per_sample else ()
        shift, scale = (m.reshape(*lead, *self.normalized_shape) for m in mod.chunk(2, dim=-1))
        y = F.layer_norm(xc, self.normalized_shape, eps=self.eps)
        return torch.addcmul(shift, y, 1 + scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, cond_dim={self.cond_dim}, zero_init={self.zero_init}, eps={self.eps}"
