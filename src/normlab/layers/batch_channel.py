"""Batch-Channel Normalization (BCN): a batch-wise standardization followed by a channel-wise (group) one.

Paper: Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", 2019, arXiv:1903.10520; official code: joe-siyuan-qiao/Batch-Channel-Normalization
(``README.md``: ``BCNorm``, ``EstBN``; ``imagenet/models/layers.py``: ``GN`` = BN then group
standardization). Meant to be used after convolutions with Weight Standardization
(:mod:`normlab.reparam.weight_standardization`); normlab follows the official code, and where it differs
from the paper this is said below.

Input ``(B, C, H, W)``, C = ``num_features``, G = ``num_groups`` dividing C.

1. Batch stage, per channel c, parameters ``weight``, ``bias`` (C,) (init 1, 0), buffers ``running_mean``,
   ``running_var`` (C,) (init 0, 1):

   - ``estimate=True`` (the micro-batch version, the official ``EstBN``): in training, *without gradient*,
     with ``mu_old`` the estimate before this step and r = ``momentum``::

         m = mean_{b,h,w} x[:, c]
         v = mean_{b,h,w} (x[:, c] - mu_old)^2    center_var_on="estimate" (the code: = s2 + (m - mu_old)^2)
         v = mean_{b,h,w} (x[:, c] - m)^2         center_var_on="batch"    (the paper: the biased batch variance s2)
         running_mean <- (1 - r) * running_mean + r * m
         running_var  <- (1 - r) * running_var  + r * v

     (``m`` and ``v`` are both computed before either buffer changes), then, in train *and* eval::

         y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

     with the *updated* estimates. The statistics are constants to autograd, so the backward pass has no
     batch coupling; the training forward is still coupled to the batch by r times its statistics (the
     estimates are updated before they are used). Eval: the same formula, no update. A batch of one sample,
     even one value per channel, is fine.
   - ``estimate=False``: ordinary batch normalization, as ``nn.BatchNorm2d``: batch mean and biased batch
     variance (differentiated) in training, ``running_mean``/``running_var`` (the running variance updated
     with the unbiased batch variance) and ``num_batches_tracked`` updated with ``momentum``, running
     statistics in eval. Training with one value per channel (B*H*W == 1) raises ``ValueError``.

2. Channel stage, per sample and group (group g = the contiguous channels g*C/G ... (g+1)*C/G - 1, as in
   GroupNorm): standardize with the group's mean and biased variance, eps inside the sqrt (= GroupNorm
   without affine), then a *per-group* affine with ``group_weight``, ``group_bias`` (G,) (init 1, 0):
   ``group_weight[g]`` multiplies all C/G channels of group g. No buffers; identical in train and eval.

Defaults: ``num_groups=32`` (the official value), ``eps=1e-5`` (both stages, the official value),
``estimate=True``, ``center_var_on="estimate"`` (the official EstBN), ``momentum=0.01``: the estimate rate r
for ``estimate=True``, BatchNorm's momentum for ``estimate=False`` (the official standard-BN variant uses
``nn.BatchNorm2d``'s 0.1: pass ``momentum=0.1`` to match it).

Deviations and notes:
- The official EstBN registers its rate ``estbn_moving_speed`` as a buffer initialised to 0 that the training
  script must set; with r = 0 the estimates never move (the batch stage is then ``weight * x / sqrt(1 + eps) +
  bias``). Here r is the explicit ``momentum`` argument (default 0.01, as one public re-implementation), and
  training with ``momentum == 0`` warns.
- The paper updates the estimates from the batch mean and variance; the official EstBN centres the variance
  on the previous estimate. The default follows the code; ``center_var_on="batch"`` gives the paper's form
  (it applies to ``estimate=True`` only; ``estimate=False`` is plain BatchNorm).
- ``batchnorm_state`` = weight, bias, running_mean, running_var: a BatchNorm's affine parameters and running
  statistics initialise the batch stage when :func:`normlab.convert.replace_batchnorm` swaps one in (for
  ``estimate=True`` the running statistics become the initial estimates).
- float16/bfloat16 input: statistics and arithmetic in float32, output in the input dtype; float64 stays
  float64.
- Distributed (``process_group``, default WORLD, used when ``torch.distributed`` is initialized): the batch
  stage's statistics (BatchNorm's for ``estimate=False``, ``m`` and ``v`` for ``estimate=True``) are those of
  the global batch (:func:`normlab.functional.batch_var_mean`); the channel stage is per sample.
- ``torch.compile``: runs in the graph (buffer updates included); input checks and the momentum warning are
  skipped while compiling.

Speed (CPU, eager): on one process the estimate=True training statistics are one no-grad ATen pass
(``batch_norm_update_stats``; ``var_mean`` over dims (0, 2, 3) is several times slower) and ``estimate=False``
training is ATen's fused batch norm; distributed, both take :func:`normlab.functional.batch_var_mean`. The
estimate=True batch stage is ATen's eval-mode batch norm (one fused pass each way); the channel stage is ATen's
``group_norm`` with the per-group affine expanded to per-channel weights (fused, its gradient summed back
per group by autograd). Measured fwd+bwd at 16 x 64 x 32 x 32 float32, one thread (thread CPU time, this
project's loaded 2-core machine): about 1.9x ``nn.BatchNorm2d`` for the default, 1.7x for ``estimate=False``
(a batch norm followed by a group norm: two normalizations' worth of passes).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import functional as NF
from .._validation import check_channel_input, check_eps, check_values_per_channel
from ..distributed import is_distributed

__all__ = ["BatchChannelNorm2d"]

CENTER_VAR_ON = ("estimate", "batch")
_DIMS = (0, 2, 3)


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class BatchChannelNorm2d(nn.Module):
    """Batch-Channel Normalization: ``BatchChannelNorm2d(num_features, num_groups=32, eps=1e-5, momentum=0.01,
    estimate=True, center_var_on="estimate", process_group=None, device=None, dtype=None)`` for
    ``(B, C, H, W)`` input. Parameters ``weight``, ``bias`` (C) of the batch stage and ``group_weight``,
    ``group_bias`` (G) of the channel stage; buffers ``running_mean``, ``running_var`` (C) (the estimates
    for ``estimate=True``; BatchNorm's running statistics plus ``num_batches_tracked`` for
    ``estimate=False``)."""

    batchnorm_state = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, momentum: float = 0.01,
                 estimate: bool = True, center_var_on: str = "estimate",
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _positive_int("num_features", num_features)
        _positive_int("num_groups", num_groups)
        if num_features % num_groups:
            raise ValueError(f"num_features must be divisible by num_groups, got num_features={num_features}, "
                             f"num_groups={num_groups}")
        check_eps(eps)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if not isinstance(estimate, bool):
            raise TypeError(f"estimate must be a bool, got {type(estimate).__name__}")
        if center_var_on not in CENTER_VAR_ON:
            raise ValueError(f"center_var_on must be one of {CENTER_VAR_ON}, got {center_var_on!r}")
        self.num_features, self.num_groups = num_features, num_groups
        self.eps, self.momentum = float(eps), float(momentum)
        self.estimate, self.center_var_on, self.process_group = estimate, center_var_on, process_group
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.group_weight = nn.Parameter(torch.empty(num_groups, **factory))
        self.group_bias = nn.Parameter(torch.empty(num_groups, **factory))
        self.register_buffer("running_mean", torch.empty(num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        if not estimate:
            self.register_buffer("num_batches_tracked", torch.empty((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        if not self.estimate:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.group_weight)
        nn.init.zeros_(self.group_bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"estimate={self.estimate}, center_var_on={self.center_var_on!r}")

    def _warn_frozen(self) -> None:
        if self.momentum == 0.0 and not torch.compiler.is_compiling():
            what = "estimates" if self.estimate else "running statistics"
            warnings.warn(f"BatchChannelNorm2d: momentum=0 in training: the {what} never change "
                          f"(they stay at running_mean=0, running_var=1 unless loaded)", stacklevel=3)

    def _estimate_step(self, x: torch.Tensor) -> None:
        """One training update of the estimates from the batch (no gradient)."""
        with torch.no_grad():
            var, mean, _ = NF.batch_var_mean(x, _DIMS, process_group=self.process_group)
            mean, var = mean.view(-1), var.view(-1)
            old = self.running_mean.to(mean.dtype)
            if self.center_var_on == "estimate":
                var = var + (mean - old).square()
            r = self.momentum
            self.running_mean.copy_(torch.lerp(old, mean, r))
            self.running_var.copy_(torch.lerp(self.running_var.to(var.dtype), var, r))

    def _local_batch_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``estimate=False`` training on one process: ATen's fused batch norm (the same statistics and
        running-statistics update as the distributed path, one kernel each way)."""
        check_values_per_channel(x.numel() // x.shape[1], type(self).__name__, x.shape)
        mean, var = self.running_mean, self.running_var
        if mean.dtype != x.dtype:
            mean, var = mean.to(x.dtype), var.to(x.dtype)
        y = F.batch_norm(x, mean, var, weight, bias, True, self.momentum, self.eps)
        if mean is not self.running_mean:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        self.num_batches_tracked.add_(1)
        return y

    def _batch_stage(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.training and not self.estimate:
            if not is_distributed(self.process_group):
                return self._local_batch_norm(x, weight, bias)
            var, mean, count = NF.batch_var_mean(x, _DIMS, process_group=self.process_group)
            check_values_per_channel(count, type(self).__name__, x.shape)
            with torch.no_grad():
                r = self.momentum
                unbiased = var.view(-1) * (count / (count - 1))
                self.running_mean.copy_(torch.lerp(self.running_mean.to(dtype), mean.view(-1), r))
                self.running_var.copy_(torch.lerp(self.running_var.to(dtype), unbiased, r))
                self.num_batches_tracked.add_(1)
            scale = torch.rsqrt(var + self.eps) * weight.view(1, -1, 1, 1)
            return (x - mean) * scale + bias.view(1, -1, 1, 1)
        if self.training:
            self._estimate_step(x)
        # copies: autograd saves them, and a later training step updates the buffers in place
        mean = self.running_mean.to(dtype, copy=True)
        var = self.running_var.to(dtype, copy=True)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, type(self).__name__, ndims=(4,))
        if self.training:
            self._warn_frozen()
        dtype = NF.compute_dtype(x.dtype)
        xc = x.to(dtype)
        y = self._batch_stage(xc, self.weight.to(dtype), self.bias.to(dtype))
        per_group = self.num_features // self.num_groups
        group_weight = self.group_weight.to(dtype).repeat_interleave(per_group)
        group_bias = self.group_bias.to(dtype).repeat_interleave(per_group)
        return F.group_norm(y, self.num_groups, group_weight, group_bias, self.eps).to(x.dtype)
