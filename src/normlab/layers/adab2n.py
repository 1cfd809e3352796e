"""AdaB²N: BatchNorm for replay-based continual learning, with task-balanced statistics.

Paper: Lyu, Wang, Zhang, Feng, Xie, Zhu, Lin, "Overcoming Recency Bias of Normalization Statistics in
Continual Learning: Balance and Adaptation", NeurIPS 2023, arXiv:2310.08855; official code: lvyilin/AdaB2N
(``models/utils/adab2n.py``: ``AdaB2N(BatchNorm2d)`` with ``get_eta``, ``training_forward``,
``set_counts``, ``end_task``; training loops ``models/er_ace_ada.py``, ``models/derpp_ada.py``). normlab
follows the official code; where it departs from it this is said below.

A drop-in replacement for a BatchNorm in a replay-based continual-learning model. Input ``(B, C, *)``:
``(B, C, H, W)`` as in the paper, also ``(B, C)``, ``(B, C, L)`` and ``(B, C, D, H, W)`` (spatial means
over whatever trailing dims there are). The training loop tells the layers which task each sample of the
mixed (current + replay) batch comes from before each training forward, with
:func:`set_task_counts(model, task_ids) <set_task_counts>`, ends each task with :func:`end_task(model)
<end_task>` and adds ``lambd * adab2n_loss(model)`` to its objective. State: parameters ``weight``,
``bias`` (affine, init 1 and 0) and ``task_weight`` (``num_tasks``, init ``init_weight``); buffers
``running_mean`` (0), ``running_var`` (1), ``num_batches_tracked`` (0), ``cur_tasks`` (number of finished
tasks, t) and ``last_eta`` (the momentum recursion's state; -1 = not started).

Training forward, with ``n_j`` the number of samples of task j in the (global) batch, ``j(i)`` sample i's
task, and ``xbar_i = mean_spatial x[i]`` (C):

    if t > 0 and counts were set:                        (Bayesian task-wise weighting)
        pi = (exp(task_weight[:t+1]) + n) / sum(exp(task_weight[:t+1]) + n)     # (t+1,)
        w_i = pi[j(i)] / n_{j(i)}
        mean = sum_i w_i xbar_i,   var = sum_i w_i mean_spatial (x[i] - mean)^2     # biased, weighted
    else:
        mean, var = biased batch mean and variance over (B, *spatial)
    y = (x - mean) / sqrt(var + eps) * weight + bias
    eta = get_eta()  (after num_batches_tracked += 1)
    running_mean += eta * (mean - running_mean);  running_var = (1 - eta) * running_var + eta * var
    loss = MSE(mean, running_mean) + MSE(var, running_var)   (updated buffers as constant targets)
         = (1 - eta)^2 * [MSE(mean, rm_0) + MSE(var, rv_0)]   (rm_0, rv_0 the buffers before the step)

Gradients reach ``task_weight`` through ``mean`` and ``var`` (from the task loss and from ``loss``).
Modified momentum, ``m = momentum``, ``kappa`` in [0, 1]: ``kappa = 1`` gives ``eta = m`` (BatchNorm's EMA);
``kappa = 0`` gives ``eta = 1 / num_batches_tracked`` (the cumulative average over all batches); otherwise
``eta_1 = m^kappa`` and ``eta_k = eta_{k-1} / (eta_{k-1} + (1 - m)^kappa)``, i.e. with ``a = (1 - m)^kappa``
``1/eta_k = 1 + a + ... + a^(k-2) + a^(k-1)/eta_1``, decaying from ``m^kappa`` to ``1 - a`` (kappa = 0.1,
m = 0.1: from 0.79 to 0.0105, a long memory that balances the statistics over all tasks).
Eval forward: ``F.batch_norm`` with the running statistics.

Defaults: ``kappa=1.0`` (plain EMA; the paper searches {0.1, 0.4, 0.7, 1.0}), ``momentum=0.1`` and
``eps=1e-5`` (BatchNorm's; :meth:`AdaB2N.from_batchnorm` takes the replaced layer's), ``init_weight=0.0``
(prior concentration exp(0) = 1 per task, the official default). The regulariser weight ``lambd`` and the
first task ``ada_t0`` at which it is added belong to the training loop (official grids: lambd in {0.01,
0.1, 1, 10}, ada_t0 in {0, 1}; the official loops add it only when replay samples are in the batch).

Behaviour kept from the official code:
- The running variance is the EMA of the *biased* batch variance (no n/(n-1) factor, unlike
  ``nn.BatchNorm2d``), and the weighted statistics are not renormalised: when a task up to t is absent
  from the batch (or all samples come from one task), ``sum_i w_i = sum of the present tasks' pi < 1``, so
  ``mean`` and ``var`` shrink by that factor.
- ``from_batchnorm`` copies the whole BatchNorm state, ``num_batches_tracked`` (which kappa = 0 divides
  by) and the unbiased ``running_var`` included; the kappa in (0, 1) recursion starts afresh at
  ``m^kappa`` on the first training step after construction.
- A training forward without counts (or with t = 0) uses the plain batch statistics.

Deviations from the official code:
- ``last_eta`` is a buffer (the official code keeps it in a Python attribute that ``state_dict`` loses, so a
  resumed run restarted the recursion at ``m^kappa``); a ``state_dict`` round trip resumes bit-exactly.
  Created in float64 (the official value is a Python float); ``module.to(dtype)`` casts it like any
  floating-point buffer. Its shape is (1,), not a 0-dim tensor: under ``torch.compile`` torch 2.13 drops
  in-place updates of 0-dim float64 buffers (measured with aot_eager: the buffer kept its old value).
- The regulariser's targets are detached copies of the updated buffers (the official code keeps a
  reference to the buffer, so a second training forward before ``backward()`` bumps its version and
  autograd raises).
- ``pi`` is computed as ``softmax(logaddexp(task_weight, log n))``, the same value without the overflow of
  ``exp(task_weight)`` for large weights.
- Counts are consumed by the next training forward (the official ones stay set): a forward with a batch
  size or task count other than the counts' raises ``ValueError`` instead of reusing stale counts, and
  :func:`end_task` clears pending counts. Task ids outside ``[0, cur_tasks]`` raise ``ValueError``
  (an index error in the official code).
- BatchNorm ``momentum=None`` (its cumulative average) is accepted as ``kappa=0``, which computes the same
  average; ``momentum=None`` with another kappa raises (the official code asserts a numeric momentum).
- Inputs of 2, 3 and 5 dims (the official layer takes 4-D only).
- float16/bfloat16 input: statistics in float32, output in the input dtype; float64 stays float64.

Distributed (``process_group``, default WORLD, used when ``torch.distributed`` is initialized):
:func:`set_task_counts` all-reduces the per-task counts ``n`` so ``pi`` and ``w_i`` are those of the global
batch; the layer then all-reduces ``sum_i w_i xbar_i`` and, in a second pass, ``sum_i w_i mean_spatial (x[i]
- mean)^2`` (with the value count) through :func:`normlab.distributed.all_reduce_sum`, and the plain
statistics through :func:`normlab.functional.batch_var_mean`, so every rank normalizes with the global
batch's statistics.

``torch.compile``: the forward traces as tensor code (the momentum recursion is a ``torch.where`` on
``last_eta``; kappa branches are on Python floats, the task count comes from the counts' shape); value
checks run only in eager mode.

Speed (CPU, one thread, forward + backward at 16 x 64 x 32 x 32 float32 against ``nn.BatchNorm2d``, on the
shared 2-core machine): about 2.0x with the plain batch statistics (the first task, or no counts) and 4.9x
with the task weighting (the two-pass weighted statistics, the normalization and the regulariser in plain
autograd ops); eval mode is ``F.batch_norm``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as NF
from ._batchnorm import register_batchnorm_state
from .._validation import check_channel_input, check_eps, check_values_per_channel
from ..distributed import all_reduce_sum, is_distributed

__all__ = ["AdaB2N", "adab2n_loss", "end_task", "set_task_counts"]

NDIMS = (2, 3, 4, 5)
UNSET_ETA = -1.0


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class AdaB2N(nn.Module):
    """AdaB²N: ``AdaB2N(num_features, num_tasks, kappa=1.0, momentum=0.1, eps=1e-5, init_weight=0.0,
    affine=True, process_group=None, device=None, dtype=None)`` for ``(B, C, *)`` input.

    Set the batch's task ids with :func:`set_task_counts` before each training forward, call
    :func:`end_task` after each task, add ``lambd * adab2n_loss(model)`` to the objective (see the module
    docstring). ``loss`` holds the regulariser of the last training forward (None before the first).
    """

    #: the entries that mean the same as a BatchNorm's same-named ones (the official code copies the whole
    #: BatchNorm state_dict; its running_var is unbiased, AdaB²N's updates are biased).
    batchnorm_state = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features: int, num_tasks: int, kappa: float = 1.0, momentum: float | None = 0.1,
                 eps: float = 1e-5, init_weight: float = 0.0, affine: bool = True,
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("num_tasks", num_tasks)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_unit("kappa", kappa)
        if momentum is None:
            if kappa != 0:
                raise ValueError(f"momentum=None (a cumulative average) needs kappa=0, got kappa={kappa!r}")
        else:
            _check_unit("momentum", momentum)
        check_eps(eps)
        if isinstance(init_weight, bool) or not isinstance(init_weight, (int, float)) or not math.isfinite(init_weight):
            raise ValueError(f"init_weight must be a finite number, got {init_weight!r}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine must be a bool, got {type(affine).__name__}")
        self.num_features, self.num_tasks = num_features, num_tasks
        self.kappa = float(kappa)
        self.momentum = None if momentum is None else float(momentum)
        self.eps, self.init_weight, self.affine = float(eps), float(init_weight), affine
        self.process_group = process_group
        register_batchnorm_state(self, num_features, affine, device, dtype)
        self.task_weight = nn.Parameter(torch.empty(num_tasks, device=device, dtype=dtype))
        self.register_buffer("cur_tasks", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("last_eta", torch.empty(1, dtype=torch.float64, device=device))
        self.loss: torch.Tensor | None = None
        self._counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, num_tasks: int, kappa: float = 1.0, init_weight: float = 0.0
                       ) -> AdaB2N:
        """An AdaB2N holding ``bn``'s eps, momentum, affine parameters, running statistics and
        ``num_batches_tracked``, on its device and dtype and in its train/eval mode. ``bn`` must track
        running statistics; ``momentum=None`` (a cumulative average) needs ``kappa=0``."""
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"from_batchnorm expects a torch BatchNorm, got {type(bn).__name__}")
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"AdaB2N.from_batchnorm needs a BatchNorm with running statistics "
                             f"(track_running_stats=True), got {bn!r}")
        if bn.momentum is None and kappa != 0:
            raise ValueError(f"AdaB2N.from_batchnorm: the BatchNorm has momentum=None (a cumulative average), "
                             f"which is AdaB2N's kappa=0; got kappa={kappa!r}")
        module = cls(bn.num_features, num_tasks, kappa=kappa, momentum=bn.momentum, eps=bn.eps,
                     init_weight=init_weight, affine=bn.affine, process_group=getattr(bn, "process_group", None),
                     device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            if bn.affine:
                module.weight.copy_(bn.weight)
                module.bias.copy_(bn.bias)
            module.running_mean.copy_(bn.running_mean)
            module.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                module.num_batches_tracked.copy_(bn.num_batches_tracked)
        return module.train(bn.training)

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1, ``num_batches_tracked`` 0, momentum recursion not started."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.last_eta.fill_(UNSET_ETA)

    def reset_parameters(self) -> None:
        """Running statistics, ``weight`` 1, ``bias`` 0, ``task_weight`` ``init_weight`` (``cur_tasks``,
        the training loop's task progress, is left alone)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        nn.init.constant_(self.task_weight, self.init_weight)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_tasks={self.num_tasks}, kappa={self.kappa}, momentum={self.momentum}, "
                f"eps={self.eps}, init_weight={self.init_weight}, affine={self.affine}")

    def set_counts(self, task_of_sample: torch.Tensor, count_of_sample: torch.Tensor, task_counts: torch.Tensor
                   ) -> None:
        """The next training forward's counts (the official ``set_counts``): ``task_of_sample`` (B,) task
        ids, ``count_of_sample`` (B,) the (global) batch's number of samples of each sample's task,
        ``task_counts`` (t+1,) samples per task id. :func:`set_task_counts` computes all three."""
        tensors = {"task_of_sample": task_of_sample, "count_of_sample": count_of_sample, "task_counts": task_counts}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if task_of_sample.dtype != torch.long:
            raise TypeError(f"task_of_sample must be an int64 tensor, got {task_of_sample.dtype}")
        if count_of_sample.shape != task_of_sample.shape:
            raise ValueError(f"count_of_sample has shape {tuple(count_of_sample.shape)}, task_of_sample "
                             f"{tuple(task_of_sample.shape)}: one count per sample")
        if not 1 <= task_counts.shape[0] <= self.num_tasks:
            raise ValueError(f"task_counts has {task_counts.shape[0]} entries; AdaB2N(num_tasks={self.num_tasks}) "
                             f"takes 1 to {self.num_tasks}")
        if not torch.compiler.is_compiling() and task_of_sample.numel():
            lo, hi = int(task_of_sample.min()), int(task_of_sample.max())
            if lo < 0 or hi >= task_counts.shape[0]:
                raise ValueError(f"task ids must be in [0, {task_counts.shape[0] - 1}], got ids in [{lo}, {hi}]")
            if int(count_of_sample.min()) < 1:
                raise ValueError("count_of_sample must be >= 1 for every sample")
        self._counts = (task_of_sample, count_of_sample, task_counts)

    def end_task(self) -> None:
        """``cur_tasks += 1`` (the training loop calls it after each task); pending counts are dropped."""
        if int(self.cur_tasks) >= self.num_tasks:
            raise ValueError(f"AdaB2N: all num_tasks={self.num_tasks} tasks have already ended")
        self.cur_tasks.add_(1)
        self._counts = None

    def _eta(self) -> torch.Tensor:
        """The modified momentum of this step (float64 scalar), after ``num_batches_tracked += 1``."""
        if self.kappa == 0.0:
            return self.num_batches_tracked.to(torch.float64).reciprocal()
        if self.kappa == 1.0:
            return torch.full((), self.momentum, dtype=torch.float64, device=self.last_eta.device)
        last = self.last_eta.to(torch.float64)
        eta = torch.where(last < 0, self.momentum ** self.kappa, last / (last + (1.0 - self.momentum) ** self.kappa))
        self.last_eta.copy_(eta)
        return eta

    def _stat_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, self.num_features) + (1,) * (x.dim() - 2)

    def _weighted_stats(self, x: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """The task-weighted mean and biased variance (C,) of ``x`` (compute dtype) and the value count."""
        task_of_sample, count_of_sample, task_counts = counts
        n = task_counts.to(x.device, x.dtype)
        log_conc = torch.logaddexp(self.task_weight[: n.shape[0]].to(x.dtype), n.log())
        pi = torch.softmax(log_conc, 0)
        w = pi[task_of_sample.to(x.device)] / count_of_sample.to(x.device, x.dtype)
        spatial = tuple(range(2, x.dim()))
        xbar = x.mean(spatial) if spatial else x
        count: int | torch.Tensor = x.numel() // self.num_features
        distributed = is_distributed(self.process_group)
        if distributed:
            mean, count = all_reduce_sum(w @ xbar, x.new_full((1,), count), process_group=self.process_group)
        else:
            mean = w @ xbar
        sq = (x - mean.view(self._stat_shape(x))).square()
        sq = sq.mean(spatial) if spatial else sq
        var = w @ sq
        if distributed:
            (var,) = all_reduce_sum(var, process_group=self.process_group)
        return var, mean, count

    def _take_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The pending counts, consumed; ``ValueError`` when they do not fit this batch or task count."""
        counts, self._counts = self._counts, None
        if counts is None:
            return None
        if counts[0].shape[0] != x.shape[0]:
            raise ValueError(f"AdaB2N: the task counts were set for a batch of {counts[0].shape[0]} samples, got "
                             f"input of shape {tuple(x.shape)}; call set_task_counts before each training forward")
        if not torch.compiler.is_compiling() and counts[2].shape[0] != int(self.cur_tasks) + 1:
            raise ValueError(f"AdaB2N: the task counts cover {counts[2].shape[0]} task(s), but cur_tasks = "
                             f"{int(self.cur_tasks)} (expected {int(self.cur_tasks) + 1}); call set_task_counts "
                             f"after end_task")
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channel_input(x, self.num_features, "AdaB2N", ndims=NDIMS)
        dtype = NF.compute_dtype(x.dtype)
        xc = x.to(dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not self.training:
            return F.batch_norm(xc, self.running_mean.to(dtype), self.running_var.to(dtype), weight, bias, False,
                                0.0, self.eps).to(x.dtype)
        counts = self._take_counts(x)
        if counts is not None and counts[2].shape[0] > 1:
            var, mean, count = self._weighted_stats(xc, counts)
        else:
            var, mean, count = NF.batch_var_mean(xc, (0,) + tuple(range(2, x.dim())), process_group=self.process_group)
            var, mean = var.view(-1), mean.view(-1)
        if not torch.compiler.is_compiling():
            check_values_per_channel(int(count), "AdaB2N", x.shape)
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        shape = self._stat_shape(x)
        y = xc * scale.view(shape) + shift.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            eta = self._eta().to(self.running_mean.dtype)
            self.running_mean.add_(eta * (mean.detach().to(self.running_mean.dtype) - self.running_mean))
            self.running_var.mul_(1 - eta).add_(eta * var.detach().to(self.running_var.dtype))
        self.loss = (F.mse_loss(mean, self.running_mean.to(dtype, copy=True))
                     + F.mse_loss(var, self.running_var.to(dtype, copy=True)))
        return y.to(x.dtype)


def _modules(model: nn.Module) -> list[AdaB2N]:
    modules = [m for m in model.modules() if isinstance(m, AdaB2N)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no AdaB2N module")
    return modules


def set_task_counts(model: nn.Module, task_ids: torch.Tensor) -> None:
    """Hand the next training forward's task counts to every AdaB2N module of ``model``.

    ``task_ids`` (B,): each sample's task id in ``[0, cur_tasks]`` (e.g. ``labels // classes_per_task``,
    as the official loops compute them). Computes, with ``torch.unique``, the per-task counts ``n`` (t+1,)
    and each sample's count ``n[task_ids]``; when ``torch.distributed`` is initialized ``n`` is summed over
    the modules' process group first, so the weights are those of the global batch. Call it before each
    training forward (the counts are consumed by one forward)."""
    modules = _modules(model)
    if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1:
        raise ValueError(f"task_ids must be a 1-D tensor, got "
                         f"{tuple(task_ids.shape) if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__}")
    if task_ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    tasks = {int(m.cur_tasks) for m in modules}
    if len(tasks) != 1:
        raise ValueError(f"the AdaB2N modules disagree on cur_tasks: {sorted(tasks)}")
    t = tasks.pop()
    if t >= min(m.num_tasks for m in modules):
        raise ValueError(f"all {t} tasks have ended (num_tasks={min(m.num_tasks for m in modules)})")
    groups = {id(m.process_group): m.process_group for m in modules}
    if len(groups) != 1:
        raise ValueError("the AdaB2N modules use different process groups; set_task_counts needs one")
    (group,) = groups.values()
    task_ids = task_ids.to(modules[0].running_mean.device, torch.long)  # where the collective and the layers run
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) > t):
        raise ValueError(f"task ids must be in [0, cur_tasks={t}], got ids in "
                         f"[{int(task_ids.min())}, {int(task_ids.max())}]")
    ids, inverse, counts = torch.unique(task_ids, return_inverse=True, return_counts=True)
    task_counts = task_ids.new_zeros(t + 1)
    task_counts[ids] = counts
    if is_distributed(group):
        (task_counts,) = all_reduce_sum(task_counts, process_group=group)
    task_of_sample = ids[inverse]
    count_of_sample = task_counts[task_of_sample]
    for m in modules:
        device = m.running_mean.device
        m.set_counts(task_of_sample.to(device), count_of_sample.to(device), task_counts.to(device))


def end_task(model: nn.Module) -> None:
    """``cur_tasks += 1`` on every AdaB2N module of ``model``; call it after training on each task."""
    modules = _modules(model)
    done = [m.num_tasks for m in modules if int(m.cur_tasks) >= m.num_tasks]
    if done:
        raise ValueError(f"all num_tasks={done[0]} tasks have already ended")
    for m in modules:
        m.end_task()


def adab2n_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the AdaB2N modules' regularisers from their last training forward (a scalar that
    carries gradient to the batch statistics); ``ValueError`` when a module has not run in training."""
    modules = _modules(model)
    missing = [name for name, m in model.named_modules() if isinstance(m, AdaB2N) and m.loss is None]
    if missing:
        raise ValueError(f"no training forward yet in AdaB2N module(s) {', '.join(repr(n) for n in missing)}")
    return torch.stack([m.loss for m in modules]).sum()
