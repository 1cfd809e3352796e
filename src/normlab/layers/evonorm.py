"""EvoNorm-B0 and EvoNorm-S0: fused normalization-activation layers found by evolutionary search.

Paper: Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020,
arXiv:2004.02967; official code (TF1): tensorflow/tpu, ``models/official/resnet/resnet_model.py``
(``evonorm``, ``_batch_std``, ``_instance_std``, ``_group_std``). Peer implementation: timm
``timm/layers/evo_norm.py`` (``EvoNorm2dB0``, ``EvoNorm2dS0``). normlab follows the official code, which
produced the paper's numbers; the differences from timm are listed below.

Each layer replaces a normalization *and* the activation after it (B0: ``BatchNorm -> ReLU``, S0:
``GroupNorm -> ReLU``). Neither subtracts a mean. Input ``(N, C, H, W)`` or ``(N, C, L)`` (L is the
spatial axis); ``gamma`` = ``weight``, ``beta`` = ``bias`` and ``v`` have shape ``(C,)``, broadcast over
the other axes. All variances are biased (divided by the count) and ``eps`` is added inside the sqrt.

EvoNorm-B0 (batch statistics)::

    s_i   = sqrt(Var_{H,W}(x[n, c]) + eps)             per sample and channel, train and eval
    left  = sqrt(Var_{N,H,W}(x[:, c]) + eps)           training (the batch variance s2_b)
    left  = sqrt(running_var + eps)                    eval
    y     = x / max(left, v * x + s_i) * gamma + beta

Gradients flow through both variances (in eager a hand-written backward, checked by gradcheck; under
``torch.compile`` the plain formula, which inductor fuses). Training then updates ``running_var <- (1 -
momentum) * running_var + momentum * s2_b`` (detached; ``momentum=None``: the cumulative average over
``num_batches_tracked`` training steps, as ``nn.BatchNorm2d``). There is no running mean. In eval the
output of a sample depends on that sample alone. ``left >= sqrt(eps) > 0``, so the division is safe.

EvoNorm-S0 (batch-independent, identical in train and eval)::

    s_g   = sqrt(Var_{C/G,H,W}(x[n, g]) + eps)        per sample and group of C/G channels
    y     = x * sigmoid(v * x) / s_g * gamma + beta

``nonlinearity=False`` (both): ``y = x * gamma + beta`` with no ``v`` parameter (``v`` is None), no
statistics and, for B0, no ``running_var`` update (it stays at its initial 1, as in timm; TF never
creates it). The official ResNet uses it for the last norm of each residual branch (with
``init_zero=True``: gamma starts at 0) and for the projection shortcut.

Defaults (the official code): ``eps=1e-5``; ``momentum=0.1`` (TF's ``MOVING_AVERAGE_DECAY = 0.9``;
``momentum`` follows torch's convention, the weight of the new value); ``groups=32``; init ``gamma = 1``
(0 with ``init_zero``), ``beta = 0``, ``v = 1``, ``running_var = 1``.

Groups (S0): as in the official code, ``groups`` is decremented until it divides C (C < 32 gives
``groups = C``, a per-channel instance std; C = 48 gives 24). ``group_size``, when given, takes
precedence (``groups = C / group_size``, as in timm) and must divide C. The resolved count is
``self.groups``.

Deviations and notes:
- ``running_var`` update: biased batch variance (the official code). timm multiplies it by n/(n-1),
  n = N*H*W; ``unbiased_running_var=True`` reproduces timm (the forward still uses the biased
  variance). With the same eps, training outputs agree with timm to rounding; eval outputs differ only
  by that factor.
- eps: 1e-5 for both layers (the official code); timm's B0 defaults to 1e-3.
- Precision: float16/bfloat16 input is computed in float32 (statistics and the expression) and the
  output cast back; float32 and float64 are computed in their own dtype (timm always takes the
  statistics in float32, also for float64 input).
- Training B0 with one value per channel (N*H*W == 1, global count when distributed) raises
  ``ValueError`` as ``nn.BatchNorm2d`` does (the batch variance would be 0); eval accepts it. An empty
  batch raises ``ValueError`` in both layers and modes before any buffer is touched.
- Distributed: B0's batch variance is taken over the global batch of ``process_group`` (default WORLD)
  when ``torch.distributed`` is initialized (:func:`normlab.functional.batch_var_mean`: two
  differentiable all-reduces), so every rank uses and stores the same statistic; ``s_i`` stays per
  sample and eval needs no communication. S0 needs none.
- ``num_batches_tracked`` counts B0's training steps (as in ``nn.BatchNorm2d``); it sets the
  cumulative-average rate when ``momentum=None``.
- B0's ``max(left, right)`` takes ``right`` at an exact tie and the gradient goes there (``torch.maximum``
  would split it); ties have measure zero.

Speed: B0's eager backward is written by hand (about half the full-size passes of autograd through the
formula) but still takes many more passes than ``nn.BatchNorm2d``'s fused kernels, whose 1.5x goal eager
code cannot reach (``normlab speed`` has the numbers); ``torch.compile`` fuses both layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as NF
from .._validation import check_channel_input, check_eps, check_values_per_channel

__all__ = ["EvoNormB0", "EvoNormS0"]

NDIMS = (3, 4)


def _check_num_features(num_features: int) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel ``(C,)`` tensor shaped ``(1, C, 1, ...)`` to broadcast against ``x``, in ``x``'s dtype."""
    return t.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x * _channel(weight, x) + _channel(bias, x)


def _resolve_groups(num_features: int, groups: int, group_size: int | None) -> int:
    """The S0 group count: ``num_features // group_size`` when ``group_size`` is given (it must divide
    ``num_features``), else ``groups`` decremented until it divides ``num_features`` (the official rule)."""
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if num_features % group_size:
            raise ValueError(f"group_size must divide num_features, got num_features={num_features}, "
                             f"group_size={group_size}")
        return num_features // group_size
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = min(groups, num_features)
    while num_features % groups:
        groups -= 1
    return groups


def _b0_formula(x: torch.Tensor, batch_var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                v: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(sqrt(batch_var + eps), v x + s_i) * weight + bias`` in plain autograd ops (what
    ``torch.compile`` traces: inductor fuses it into few kernels)."""
    spatial = tuple(range(2, x.dim()))
    s_i = torch.sqrt(torch.var(x, dim=spatial, correction=0, keepdim=True) + eps)
    return x / torch.clamp(v * x + s_i, min=torch.sqrt(batch_var + eps)) * weight + bias


class _EvoNormB0Function(torch.autograd.Function):
    """EvoNorm-B0's expression with a hand-written backward (eager): about half the full-size passes of
    autograd through :func:`_b0_formula`. ``batch_var`` comes in as an input, so its gradient flows on
    through whatever produced it (:func:`normlab.functional.batch_var_mean`, all-reduces included).

    With ``r = v x + s_i``, ``l = sqrt(batch_var + eps)``, ``d = max(l, r)`` (``r`` where ``r >= l``) and
    ``y = weight x / d + bias``: ``dL/dd = -g weight x / d^2`` goes to ``r`` or to ``l``; ``r`` passes it to
    ``x`` (times ``v``), to ``v`` (times ``x``) and to ``s_i`` (summed over space), and ``s_i`` to ``x``
    through the instance variance, ``d var_i / dx = 2 (x - mean_i) / (H W)``."""

    @staticmethod
    def forward(ctx, x, batch_var, weight, bias, v, eps):
        spatial = tuple(range(2, x.dim()))
        centred = x - x.mean(spatial, keepdim=True)
        s_i = centred.square().mean(spatial, keepdim=True).add_(eps).sqrt_()
        left = (batch_var + eps).sqrt()
        right = torch.addcmul(s_i, v, x)
        use_right = right >= left
        den = torch.where(use_right, right, left)
        xhat = x / den
        ctx.save_for_backward(x, xhat, den, use_right, s_i, centred, left, weight, v)
        return torch.addcmul(bias, xhat, weight)

    @staticmethod
    def backward(ctx, grad):
        x, xhat, den, use_right, s_i, centred, left, weight, v = ctx.saved_tensors
        spatial = tuple(range(2, x.dim()))
        channel = (0, *spatial)
        scaled = grad * xhat                                        # g x / d
        grad_weight = scaled.sum(channel, keepdim=True)
        grad_bias = grad.sum(channel, keepdim=True)
        grad_den = scaled.mul_(weight).div_(den).neg_()             # -g weight x / d^2
        grad_right = torch.where(use_right, grad_den, 0.0)
        grad_batch_var = (grad_den.sum(channel, keepdim=True) - grad_right.sum(channel, keepdim=True)) / (2 * left)
        grad_v = (grad_right * x).sum(channel, keepdim=True)
        grad_inst_var = grad_right.sum(spatial, keepdim=True) / (2 * s_i)
        grad_x = (grad * weight).div_(den).addcmul_(grad_right, v)
        grad_x.addcmul_(centred, grad_inst_var, value=2.0 / x[0, 0].numel())
        return grad_x, grad_batch_var, grad_weight, grad_bias, grad_v, None


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (batch variance, instance std, max): ``EvoNormB0(num_features, eps=1e-5, momentum=0.1,
    nonlinearity=True, init_zero=False, unbiased_running_var=False, process_group=None, device=None,
    dtype=None)`` for ``(N, C, H, W)`` or ``(N, C, L)`` input. Parameters ``weight``, ``bias``, ``v``
    (None without the nonlinearity); buffers ``running_var`` (C) and ``num_batches_tracked``."""

    batchnorm_state = ("weight", "bias", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 nonlinearity: bool = True, init_zero: bool = False, unbiased_running_var: bool = False,
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_num_features(num_features)
        check_eps(eps)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        _check_bool("nonlinearity", nonlinearity)
        _check_bool("init_zero", init_zero)
        _check_bool("unbiased_running_var", unbiased_running_var)
        self.num_features, self.eps = num_features, float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.nonlinearity, self.init_zero, self.unbiased_running_var = nonlinearity, init_zero, unbiased_running_var
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.v = nn.Parameter(torch.empty(num_features, **factory)) if nonlinearity else None
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.constant_(self.weight, 0.0 if self.init_zero else 1.0)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, nonlinearity={self.nonlinearity}, "
                f"init_zero={self.init_zero}, unbiased_running_var={self.unbiased_running_var}")

    @torch.no_grad()
    def _update_running_var(self, batch_var: torch.Tensor, count: int) -> None:
        """``running_var <- (1 - f) * running_var + f * s2_b`` (times n/(n-1) when unbiased), f =
        ``momentum`` or 1 / ``num_batches_tracked``."""
        self.num_batches_tracked.add_(1)
        new = batch_var.reshape(-1)
        if self.unbiased_running_var:
            new = new * (count / max(count - 1, 1))
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.to(new.dtype)
        else:
            factor = torch.tensor(self.momentum, dtype=new.dtype, device=new.device)
        running = self.running_var.to(new.dtype)
        self.running_var.copy_(running + factor * (new - running))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, "EvoNormB0", ndims=NDIMS)
        xc = x.to(NF.compute_dtype(x.dtype))
        if not self.nonlinearity:
            return _affine(xc, self.weight, self.bias).to(x.dtype)
        spatial = tuple(range(2, x.dim()))
        if self.training:
            batch_var, _, count = NF.batch_var_mean(xc, (0, *spatial), process_group=self.process_group)
            check_values_per_channel(count, "EvoNormB0", x.shape)
            self._update_running_var(batch_var.detach(), count)
        else:
            batch_var = _channel(self.running_var, xc)
        weight, bias, v = (_channel(t, xc) for t in (self.weight, self.bias, self.v))
        if torch.compiler.is_compiling():
            return _b0_formula(xc, batch_var, weight, bias, v, self.eps).to(x.dtype)
        return _EvoNormB0Function.apply(xc, batch_var, weight, bias, v, self.eps).to(x.dtype)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (SiLU-like gate over a group std): ``EvoNormS0(num_features, groups=32, group_size=None,
    eps=1e-5, nonlinearity=True, init_zero=False, device=None, dtype=None)`` for ``(N, C, H, W)`` or
    ``(N, C, L)`` input. Parameters ``weight``, ``bias``, ``v`` (None without the nonlinearity); no
    buffers; the same in train and eval. ``self.groups`` is the resolved group count."""

    batchnorm_state = ("weight", "bias")

    def __init__(self, num_features: int, groups: int = 32, group_size: int | None = None, eps: float = 1e-5,
                 nonlinearity: bool = True, init_zero: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        _check_num_features(num_features)
        check_eps(eps)
        _check_bool("nonlinearity", nonlinearity)
        _check_bool("init_zero", init_zero)
        self.num_features, self.eps = num_features, float(eps)
        self.groups = _resolve_groups(num_features, groups, group_size)
        self.nonlinearity, self.init_zero = nonlinearity, init_zero
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.v = nn.Parameter(torch.empty(num_features, **factory)) if nonlinearity else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.init_zero else 1.0)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, nonlinearity={self.nonlinearity}, "
                f"init_zero={self.init_zero}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, "EvoNormS0", ndims=NDIMS)
        xc = x.to(NF.compute_dtype(x.dtype))
        if not self.nonlinearity:
            return _affine(xc, self.weight, self.bias).to(x.dtype)
        n, c = xc.shape[:2]
        group_var = torch.var(xc.reshape(n, self.groups, -1), dim=-1, correction=0, keepdim=True)
        group_std = torch.sqrt(group_var + self.eps).expand(n, self.groups, c // self.groups)
        scale = _channel(self.weight, xc) / group_std.reshape(n, c, *([1] * (xc.dim() - 2)))  # gamma / s_g
        gated = xc * torch.sigmoid(_channel(self.v, xc) * xc)
        return torch.addcmul(_channel(self.bias, xc), gated, scale).to(x.dtype)
