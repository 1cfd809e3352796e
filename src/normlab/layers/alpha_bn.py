"""alpha-BN: test-time BatchNorm with a convex mix of source (running) and test-batch statistics.

Paper: Fuming You, Jingjing Li, Zhou Zhao, "Test-time Batch Statistics Calibration for Covariate Shift",
2021, arXiv:2110.04065. No official code was found; third-party re-implementations (a class ``AlphaBN``
wrapping ``nn.BatchNorm2d``) compute the same mix. The paper's Core loss is in
:mod:`normlab.training.core`.

Eval mode (the method), with ``mu_s, var_s`` the running statistics (the source statistics) and
``mu_t, var_t`` the mean and *biased* variance of the current batch over every axis but 1 (N and the
spatial axes, the estimator BatchNorm normalizes with in training):

    mu  = alpha * mu_s  + (1 - alpha) * mu_t
    var = alpha * var_s + (1 - alpha) * var_t          (variances are mixed, not stds)
    y   = (x - mu) / sqrt(var + eps) * weight + bias

``alpha`` weights the *source* statistics: ``alpha=1`` is eval-mode BatchNorm (the test batch is not
even looked at, so any batch size works), ``alpha=0`` is test-time normalization with the batch
statistics alone ("prediction-time BN"). The running statistics are never changed in eval mode. The
gradient flows through ``mu_t`` and ``var_t`` (as through train-mode BatchNorm), which Core needs.

Train mode is ``nn.BatchNorm`` exactly: batch statistics, ``running_mean``/``running_var`` updated with
``momentum`` (``None``: cumulative average over ``num_batches_tracked``), the running variance with the
unbiased factor ``n / (n - 1)``, ``num_batches_tracked += 1``. A model can be trained with this layer,
and ``AlphaBatchNorm(alpha=1)`` is normlab's CPU-capable SyncBatchNorm.

Input ``(N, C)`` or ``(N, C, *)`` (the shapes of BatchNorm1d/2d/3d), C = ``num_features``.

Defaults: ``alpha=0.9`` (third-party implementations use 0.9-0.95; the best value depends on the shift
and falls as the test batch grows: tune it on a held-out shift), ``eps=1e-5``, ``momentum=0.1`` (torch's).

Notes and deviations:
- Batch statistics need more than one value per channel: in training, and in eval with ``alpha < 1``,
  a batch with one value per channel raises ``ValueError`` (a zero variance would divide by sqrt(eps)).
- Non-i.i.d. test streams (e.g. one class per batch) bias the test-batch statistics; an ``alpha``
  closer to 1 is safer there.
- float16/bfloat16 input: statistics and normalization in float32, output in the input dtype; float64
  stays float64.
- Distributed (``process_group``, default WORLD, used when ``torch.distributed`` is initialized): the
  batch statistics (training, and eval with ``alpha < 1``) are those of the global batch
  (:func:`normlab.functional.batch_var_mean`), the running variance's unbiased factor uses the global
  count, and the backward sums the two per-channel gradient terms of the statistics over the ranks
  (:func:`normlab.distributed.all_reduce_sum`), as ``nn.SyncBatchNorm`` does.
- ``F.batch_norm(..., training=False)`` refuses statistics that require grad, so the mix cannot be passed
  to it as running statistics; eager mode runs ATen's eval-mode batch-norm kernels with the mixed
  statistics, detached, and a hand-written backward that adds the statistics' terms
  ``dx = w s (g - (1 - alpha) / n (sum(g) + s^2 sum(g (x - mu)) (x - mu_t)))`` with ``s = (var + eps)^(-1/2)``
  (for ``alpha = 0`` this is BatchNorm's training backward). Under ``torch.compile`` the plain formula
  runs and autograd derives the same gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from ..functional import batch_var_mean, compute_dtype
from ._batchnorm import register_batchnorm_state
from .._validation import check_channel_input, check_eps, check_values_per_channel
from ..distributed import all_reduce_sum, is_distributed

__all__ = ["AlphaBatchNorm"]

#: The BatchNorm classes :meth:`AlphaBatchNorm.from_batchnorm` converts (exact types: a subclass may
#: override ``forward``, which the conversion would silently drop).
CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NDIMS = (2, 3, 4, 5)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(C,)`` tensor as ``(1, C, 1, ...)`` for broadcasting against an ``ndim``-D input."""
    return t.view((1, -1) + (1,) * (ndim - 2))


class _AlphaBNFunction(torch.autograd.Function):
    """``y = (x - mu) * s * weight + bias`` with ``s = (var + eps)^(-1/2)`` and the (detached) mixed
    statistics ``mu = alpha mu_s + beta mu_t``, ``var = alpha var_s + beta var_t`` (``beta = 1 - alpha``;
    training is ``beta = 1``), whose batch part depends on ``x``.

    forward: ATen's eval-mode batch norm with ``mu`` and ``var`` as its running statistics (one pass).
    backward, with ``n`` the global count per channel: ATen's eval-mode backward gives ``g w s``,
    ``dweight = s sum(g (x - mu))`` and ``dbias = sum(g)``; the statistics add
    ``-w s beta / n (sum(g) + s^2 sum(g (x - mu)) (x - mu_t))``, the two sums over the global batch.
    Single-process training (``beta = 1``) is ATen's training-mode backward in one call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, batch_mean, beta, eps, count, process_group):
        ctx.save_for_backward(x, weight, mean, var, batch_mean)
        ctx.beta, ctx.eps, ctx.count, ctx.process_group = beta, eps, count, process_group
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, var, batch_mean = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.beta == 1.0 and not is_distributed(ctx.process_group):  # BatchNorm's training backward
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_y.contiguous(), x, weight, None, None, mean, (var + ctx.eps).rsqrt(), True, ctx.eps,
                [need_x, need_w, need_b])
            return grad_x, grad_w, grad_b, None, None, None, None, None, None, None
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(), x, weight, mean, var, None, None, False, ctx.eps,
            [need_x, True, True])
        if need_x and ctx.beta > 0.0:
            s = (var + ctx.eps).rsqrt()
            sum_g, sum_gxmu = all_reduce_sum(grad_b, grad_w / s, process_group=ctx.process_group)
            k = s * (ctx.beta / ctx.count)
            if weight is not None:
                k = k * weight
            c = k * s.square() * sum_gxmu
            shift = c * batch_mean - k * sum_g
            grad_x = grad_x.addcmul_(x, _channel_view(c, x.dim()), value=-1.0).add_(_channel_view(shift, x.dim()))
        return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None, None, None)


class AlphaBatchNorm(nn.Module):
    """BatchNorm whose eval mode mixes running and test-batch statistics: ``AlphaBatchNorm(num_features,
    alpha=0.9, eps=1e-5, momentum=0.1, affine=True, process_group=None, device=None, dtype=None)``.

    Input ``(N, C)`` or ``(N, C, *)``. Train mode: ``nn.BatchNorm`` exactly (running statistics updated).
    Eval mode: normalizes with ``alpha * running + (1 - alpha) * batch`` mean and biased variance, and
    never changes a buffer. Buffers ``running_mean``, ``running_var``, ``num_batches_tracked``;
    parameters ``weight``, ``bias`` when ``affine``. ``alpha`` may be changed at any time (checked to lie
    in [0, 1]). :meth:`from_batchnorm` converts a trained ``nn.BatchNorm{1,2,3}d``/``nn.SyncBatchNorm``.
    """

    batchnorm_state: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features: int, alpha: float = 0.9, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, process_group: dist.ProcessGroup | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        check_eps(eps)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine must be a bool, got {type(affine).__name__}")
        self.num_features, self.eps, self.affine = num_features, float(eps), affine
        self.momentum = None if momentum is None else float(momentum)
        self.alpha = alpha
        self.process_group = process_group
        register_batchnorm_state(self, num_features, affine, device, dtype)
        self.reset_parameters()

    @property
    def alpha(self) -> float:
        """Weight of the source (running) statistics in eval mode, in [0, 1]."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(value)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha={self.alpha}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, alpha: float = 0.9) -> AlphaBatchNorm:
        """An ``AlphaBatchNorm`` with ``bn``'s eps, momentum, affine parameters, running statistics,
        ``num_batches_tracked``, device, dtype (and, for ``nn.SyncBatchNorm``, process group).

        ``bn`` must be exactly ``nn.BatchNorm1d/2d/3d`` or ``nn.SyncBatchNorm`` (``TypeError`` otherwise:
        a subclass's own forward would be dropped) and track running statistics (``ValueError``
        otherwise). ``from_batchnorm(bn, 1.0).eval()`` computes what ``bn.eval()`` computes."""
        if type(bn) not in CONVERTIBLE:
            raise TypeError(f"from_batchnorm converts exactly {', '.join(c.__name__ for c in CONVERTIBLE)}, "
                            f"got {type(bn).__module__}.{type(bn).__qualname__}")
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"from_batchnorm needs a BatchNorm with running statistics, got {bn!r} "
                             f"(track_running_stats={bn.track_running_stats})")
        ref = bn.running_mean
        new = cls(bn.num_features, alpha=alpha, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  process_group=getattr(bn, "process_group", None), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in cls.batchnorm_state:
                source = getattr(bn, name)
                if source is not None:
                    getattr(new, name).copy_(source)
                    getattr(new, name).requires_grad_(source.requires_grad)
        return new.train(bn.training)

    def _statistics(self, x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and biased variance ``(C,)`` of the (global) batch and the count per channel."""
        var, mean, count = batch_var_mean(x, dims, process_group=self.process_group)
        return var.reshape(-1), mean.reshape(-1), count

    def _update_running_stats(self, batch_var: torch.Tensor, batch_mean: torch.Tensor, count: int) -> None:
        """torch's BatchNorm update: ``momentum`` (or ``1 / num_batches_tracked`` when None) toward the
        batch mean and the unbiased batch variance."""
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (1.0 / self.num_batches_tracked.to(batch_mean.dtype) if self.momentum is None
                      else self.momentum)
            unbiased = batch_var * (count / max(count - 1, 1))
            for buffer, value in ((self.running_mean, batch_mean), (self.running_var, unbiased)):
                buffer.copy_(buffer * (1 - factor) + value.detach() * factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, type(self).__name__, ndims=NDIMS)
        dtype = compute_dtype(x.dtype)
        xc = x.to(dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        alpha = 0.0 if self.training else self.alpha
        if alpha == 1.0:
            y = torch.batch_norm(xc, weight, bias, self.running_mean.to(dtype), self.running_var.to(dtype),
                                 False, 0.0, self.eps, False)
            return y.to(x.dtype)
        dims = (0,) + tuple(range(2, x.dim()))
        compiling = torch.compiler.is_compiling()
        if compiling:
            batch_var, batch_mean, count = self._statistics(xc, dims)
        else:
            with torch.no_grad():
                batch_var, batch_mean, count = self._statistics(xc, dims)
        if self.training:
            check_values_per_channel(count, type(self).__name__, tuple(x.shape))
            self._update_running_stats(batch_var, batch_mean, count)
            mean, var = batch_mean, batch_var
        else:
            if count <= 1 and not compiling:
                raise ValueError(f"{type(self).__name__} with alpha={self.alpha} < 1 needs more than one value per "
                                 f"channel for its test-batch statistics, got input of shape {tuple(x.shape)}")
            mean = alpha * self.running_mean.to(dtype) + (1.0 - alpha) * batch_mean
            var = alpha * self.running_var.to(dtype) + (1.0 - alpha) * batch_var
        if compiling:
            scale = (var + self.eps).rsqrt()
            if weight is not None:
                scale = scale * weight
            y = (xc - _channel_view(mean, x.dim())) * _channel_view(scale, x.dim())
            if bias is not None:
                y = y + _channel_view(bias, x.dim())
            return y.to(x.dtype)
        y = _AlphaBNFunction.apply(xc, weight, bias, mean, var, batch_mean, 1.0 - alpha, self.eps, count,
                                   self.process_group)
        return y.to(x.dtype)
