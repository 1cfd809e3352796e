"""Unified Normalization (UN).

Paper: Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu, "Unified Normalization for Accelerating and Stabilizing
Transformers", ACM MM 2022, arXiv:2208.01313; official code: hikvision-research/Unified-Normalization
(``UN1d`` + ``UN2dFunction`` in ``image_classification/models/unified_normalization/``).

A batch-statistics replacement for LayerNorm in transformers: at inference it is the fixed per-channel
affine map ``y = weight * x / sqrt(running_var + eps) + bias`` (:meth:`UnifiedNorm.inference_affine`),
which :func:`normlab.convert.fuse.fuse_norms` folds into the Linear layers that read it. Input ``(B, N, C)``
or ``(N, C)``; statistics per channel over every non-padded token (``pad_mask`` of shape ``x.shape[:-1]``,
True = padding); no mean subtraction anywhere. Training iteration ``k`` (``iters``, counted per forward),
as the official code:

- forward statistic ``x2 = mean_tokens(x^2)``; ``s2`` = the unbiased variance of ``sqrt(buffer_x2)`` over
  all of its ``M_f * C`` entries, taken before ``buffer_x2[k % M_f] = x2``. *Adaptive outlier filtration*
  (``outlier_filtration=True`` and ``k >= warmup_iters``): with the per-channel arithmetic and geometric
  means ``AM``, ``GM`` of the window, if any channel has ``AM - GM > M_f * s2`` the iteration is skipped
  (``buffer_x2[k % M_f] = running_var``, ``skip_counter += 1``). The forward divides by ``var = GM`` of
  the window (*fluctuation smoothing*), or by ``var = x2`` while ``k <= M_f`` or ``k < warmup_iters``, on
  a skipped iteration, and always when ``M_f == 1``.
- gradient compensation ``r = sqrt(var + eps) / sqrt(running_var + eps)`` clamped to ``ratio_clamp``;
  ``r = 1`` while ``k <= max(compensation_start, warmup_iters)`` or skipped. Then
  ``running_var = momentum * running_var + (1 - momentum) * var`` (momentum weighs the OLD value).
- ``y = weight * z + bias``, ``z = x / sqrt(var + eps)``.
- backward (hand-written): ``g = dy * weight * r``, ``gz = mean(g * z)`` over all ``B * N`` positions
  (padding included, as the code); ``buffer_gz[k % M_b] = ema_gz`` if skipped else ``gz``;
  ``mean_gz = gz`` while ``k <= M_b``, ``k < warmup_iters`` or skipped, else the window mean of
  ``buffer_gz``; ``ema_gz = momentum * ema_gz + (1 - momentum) * mean_gz``;
  ``dx = (g - c * z) / sqrt(var + eps)`` with ``c = mean_gz`` if skipped, else the new ``ema_gz``;
  ``dweight = sum(dy * r * z)``, ``dbias = sum(dy)``. With ``window_size=1`` every iteration is skipped and
  this is the exact gradient of the batch quadratic-mean norm ``x / sqrt(mean_tokens(x^2) + eps)``.

Defaults (the paper's and the code's): ``window_size=4`` (an int, or ``(M_f, M_b)``),
``warmup_iters=4000``, ``outlier_filtration=False`` (the code suggests True for vision, False for NLP;
its T2T-ViT runs use True), ``eps=1e-5``, ``momentum=0.9``; ``compensation_start=1000`` and
``ratio_clamp=(0.2, 5.0)`` are hard-coded in the code and exposed here. With few channels or near-constant
statistics the threshold ``M_f * s2`` is tiny and the filter fires on most iterations after warm-up: that
is the code's behaviour, kept (``skip_counter`` counts it).

State lives in buffers with the code's names and shapes (``running_var``, ``ema_gz``, ``iters``,
``buffer_x2``, ``buffer_gz``, ``skip_counter``), so a ``state_dict`` round trip resumes the smoothing
bit-exactly and the code's checkpoints load; ``last_var`` (not saved) is the statistic the last training
forward divided by. Statistics and buffers are float32 for float16/bfloat16 input (output in the input
dtype). With ``torch.distributed`` initialized, the forward's sum of squares and token count and the
backward's sum of ``g * z`` and position count are summed over ``process_group`` (one packed all-reduce
each, :func:`normlab.distributed.all_reduce_sum`), so N ranks with 1/N of the batch compute what one
process computes on the whole batch (parameter gradients stay per rank, for DDP to sum).

Speed: the forward is one ATen statistics pass plus one ``addcmul``; the backward is ATen's fused
BatchNorm backward (``dy * w * r * rstd``, ``sum(dy * z)``, ``sum(dy)`` in one pass) plus one in-place
``addcmul_`` for UN's correction. Eval mode with grad is ATen's eval BatchNorm (mean 0), without grad one
``addcmul``. Measured at 8 x 256 x 768 float32 (thread CPU time, 1 thread, interleaved with
``nn.LayerNorm``, on this project's loaded 2-core machine): train fwd+bwd 1.45-1.85x LayerNorm (about 4
memory passes against LayerNorm's 2-3, plus ~0.35 ms of per-step Python for the state machine), eval
fwd+bwd 0.95-1.0x, eval no-grad forward 0.6-1.0x. Each training step allocates only the output and dx:
any tensor the graph keeps alive changes where glibc places them, and a layout that makes it return freed
pages to the OS costs ~1500 page faults (~3 ms) per step, so the backward keeps one small snapshot tensor.
The training step runs eagerly under ``torch.compile`` (see below), so compiling does not speed it up.

Deviations from the code, none changing a value: statistics of a padded batch are masked sums rather than
a gather of the real tokens; a batch with no real token raises ``ValueError`` (the code returns NaN) and
fewer than 8 tokens warn; the sheet's suggestion to clamp the window before the log is not needed: a
window holding a 0 has geometric mean exactly 0 (``exp(-inf)``), never NaN, as in the code. A repeated
backward of one graph (``retain_graph=True``, ``gradcheck``) computes the same function of its ``dy`` as
the first and advances ``ema_gz`` / ``buffer_gz`` once (the code would advance them again). Unsupported, as
in the code: two forwards before their backwards (activation checkpointing, one norm called at two sites):
each forward advances the state machine. Under ``torch.compile`` the eval path compiles; the training step
(Python branches on the iteration counter and the outlier test, buffer updates in the backward) runs
eagerly behind a graph break.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum
from ..functional import _needs_grad, compute_dtype
from .._validation import check_eps, check_float_tensor

__all__ = ["UnifiedNorm"]

#: Below this many (non-padded) tokens per step the batch statistic is noisy enough to warn.
MIN_TOKENS = 8


class _State:
    """What one training forward hands to its backward: the module (for its buffers and settings), the
    iteration, whether it was skipped, and the backward state (``ema_gz``, ``buffer_gz``) as the first
    backward found it, so that a repeated backward of the same graph computes the same function of its
    ``dy`` and advances the state only once."""

    __slots__ = ("module", "k", "skip", "before")

    def __init__(self, module: UnifiedNorm, k: int, skip: bool) -> None:
        self.module, self.k, self.skip, self.before = module, k, skip, None


class _UnifiedNormFunction(torch.autograd.Function):
    """``y = x * (weight * rstd) + bias`` on ``(rows, C)``, ``rstd = (var + eps)^(-1/2)``; the backward
    applies UN's smoothed correction and advances ``buffer_gz`` / ``ema_gz`` (module docstring).

    The backward reuses ATen's BatchNorm backward in eval mode (mean 0, variance ``var``, weight
    ``weight * r``), which computes ``dy * weight * r * rstd``, ``sum(dy * z)`` and ``sum(dy)`` in one
    fused pass; UN's correction ``- c * rstd^2 * x`` is one in-place ``addcmul_`` on top.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, state: _State):
        eps = state.module.eps
        ctx.save_for_backward(x, weight, var, r)
        ctx.state = state
        return torch.addcmul(bias, x, weight * (var + eps).rsqrt())

    @staticmethod
    def backward(ctx, grad_y):
        state: _State = ctx.state
        m, k, skip = state.module, state.k, state.skip
        x, weight, var, r = ctx.saved_tensors
        wr = weight * r
        dx, sum_dy_z, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(), x, wr, torch.zeros_like(var), var, None, None, False, m.eps,
            [ctx.needs_input_grad[0], True, ctx.needs_input_grad[2]])
        sum_gz, count = all_reduce_sum(wr * sum_dy_z, x.new_full((1,), x.shape[0]), process_group=m.process_group)
        with torch.no_grad():
            first = state.before is None
            if first:  # one small tensor: (ema_gz, buffer_gz) as this first backward found them
                state.before = torch.cat([m.ema_gz[None], m.buffer_gz])
            ema_gz, buffer_gz = state.before[0], state.before[1:].clone()
            gz = (sum_gz / count).to(buffer_gz.dtype)
            window = buffer_gz.shape[0]
            buffer_gz[k % window] = ema_gz if skip else gz
            mean_gz = gz if k <= window or k < m.warmup_iters or skip else buffer_gz.mean(0)
            ema_gz = m.momentum * ema_gz + (1 - m.momentum) * mean_gz
            if first:
                m.buffer_gz.copy_(buffer_gz)
                m.ema_gz.copy_(ema_gz)
            coef = mean_gz if skip else ema_gz
            if dx is not None:
                dx = dx.addcmul_(x, coef.to(x.dtype) / (var + m.eps), value=-1)
        return (dx, r * sum_dy_z if ctx.needs_input_grad[1] else None, sum_dy, None, None, None)


def _sum_of_squares(rows: torch.Tensor) -> torch.Tensor:
    """``sum_rows(x^2)`` per channel of ``(rows, C)``, as ``rows * (var + mean^2)`` from ATen's one-pass
    BatchNorm statistics (faster on CPU than ``x.square().sum(0)``, which writes a full-size temporary)."""
    mean, var = torch.batch_norm_update_stats(rows, None, None, 0.0)
    return torch.addcmul(var, mean, mean).mul_(rows.shape[0])


def _window_sizes(window_size) -> tuple[int, int]:
    sizes = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
    if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"window_size must be a positive int or a pair of positive ints, got {window_size!r}")
    return sizes


def _check_count(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class UnifiedNorm(nn.Module):
    """Unified Normalization over the last dim of ``(B, N, C)`` or ``(N, C)`` input:
    ``UnifiedNorm(num_features, window_size=4, warmup_iters=4000, outlier_filtration=False, eps=1e-5,
    momentum=0.9, compensation_start=1000, ratio_clamp=(0.2, 5.0), process_group=None, device=None,
    dtype=None)``; ``forward(x, pad_mask=None)`` with ``pad_mask`` of shape ``x.shape[:-1]``, True = padding.
    """

    def __init__(self, num_features: int, window_size: int | tuple[int, int] = 4, warmup_iters: int = 4000,
                 outlier_filtration: bool = False, eps: float = 1e-5, momentum: float = 0.9,
                 compensation_start: int = 1000, ratio_clamp: tuple[float, float] = (0.2, 5.0),
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_count("num_features", num_features, 1)
        fp_window, bp_window = _window_sizes(window_size)
        _check_count("warmup_iters", warmup_iters)
        _check_count("compensation_start", compensation_start)
        check_eps(eps)
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        lo, hi = ratio_clamp
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi < math.inf):
            raise ValueError(f"ratio_clamp must be (low, high) with 0 < low <= high < inf, got {ratio_clamp!r}")
        if not isinstance(outlier_filtration, bool):
            raise TypeError(f"outlier_filtration must be a bool, got {type(outlier_filtration).__name__}")
        self.num_features = num_features
        self.window_size = (fp_window, bp_window)
        self.warmup_iters, self.compensation_start = warmup_iters, compensation_start
        self.outlier_filtration = outlier_filtration
        self.eps, self.momentum = float(eps), float(momentum)
        self.ratio_clamp = (float(lo), float(hi))
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        stats = {"device": device, "dtype": compute_dtype(dtype or torch.get_default_dtype())}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_features, **stats))
        self.register_buffer("ema_gz", torch.empty(num_features, **stats))
        self.register_buffer("iters", torch.empty(1, dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.empty(fp_window, num_features, **stats))
        self.register_buffer("buffer_gz", torch.empty(bp_window, num_features, **stats))
        self.register_buffer("skip_counter", torch.empty(1, dtype=torch.long, device=device))
        self.register_buffer("last_var", torch.empty(num_features, **stats), persistent=False)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forget every statistic: ``running_var`` 1, the windows, ``ema_gz``, ``iters``, ``skip_counter`` 0."""
        self.running_var.fill_(1)
        self.last_var.fill_(1)
        for buf in (self.ema_gz, self.iters, self.buffer_x2, self.buffer_gz, self.skip_counter):
            buf.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window_size={self.window_size}, warmup_iters={self.warmup_iters}, "
                f"outlier_filtration={self.outlier_filtration}, eps={self.eps}, momentum={self.momentum}, "
                f"compensation_start={self.compensation_start}, ratio_clamp={self.ratio_clamp}")

    @torch.no_grad()
    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift) = (weight / sqrt(running_var + eps), bias)``: the eval-mode map ``x * scale + shift``."""
        return (self.weight / (self.running_var.to(self.weight.dtype) + self.eps).sqrt(), self.bias.detach().clone())

    def _check(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
        if torch.compiler.is_compiling():
            return
        check_float_tensor(x)
        c = self.num_features
        if x.dim() not in (2, 3) or x.shape[-1] != c:
            raise ValueError(f"UnifiedNorm: expected input of shape (B, N, {c}) or (N, {c}), got {tuple(x.shape)}")
        if pad_mask is not None:
            if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
                raise TypeError("UnifiedNorm: pad_mask must be a bool tensor (True = padding)")
            if pad_mask.shape != x.shape[:-1]:
                raise ValueError(f"UnifiedNorm: expected pad_mask of shape {tuple(x.shape[:-1])} (the input's "
                                 f"shape without channels), got {tuple(pad_mask.shape)}")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, pad_mask)
        dtype = compute_dtype(x.dtype)
        rows = x.reshape(-1, self.num_features).to(dtype)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        if self.training:
            y = self._train_forward(rows, weight, bias, pad_mask)
        else:
            var = self.running_var.to(dtype)
            if _needs_grad(rows, weight, bias):  # ATen's eval BatchNorm: dx, dweight, dbias in one fused pass
                y = F.batch_norm(rows, torch.zeros_like(var), var, weight, bias, False, 0.0, self.eps)
            else:
                y = torch.addcmul(bias, rows, weight * (var + self.eps).rsqrt())
        return y.view(x.shape).to(x.dtype)

    @torch.compiler.disable
    def _train_forward(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Advance the forward state machine by one iteration and normalise ``rows`` (``(B*N, C)``)."""
        fp_window = self.buffer_x2.shape[0]
        with torch.no_grad():
            k = int(self.iters.add_(1).item())
            real = rows if pad_mask is None else rows.masked_fill(pad_mask.reshape(-1, 1), 0)
            count = rows.new_full((1,), rows.shape[0]) if pad_mask is None else \
                (~pad_mask).sum().reshape(1).to(rows.dtype)
            sum_x2, count = all_reduce_sum(_sum_of_squares(real), count, process_group=self.process_group)
            n = count.item()
            if n == 0:
                raise ValueError("UnifiedNorm: batch has no non-padded tokens")
            if n < MIN_TOKENS:
                warnings.warn(f"UnifiedNorm: batch statistics over {n:g} token(s) are noisy (fewer than "
                              f"{MIN_TOKENS})", stacklevel=3)
            x2 = (sum_x2 / count).to(self.buffer_x2.dtype)
            buffer, slot = self.buffer_x2, k % fp_window
            filtering = self.outlier_filtration and k >= self.warmup_iters
            spread = buffer.sqrt().var() if filtering else None  # before inserting x2, as the code
            buffer[slot] = x2
            skip = fp_window == 1
            smoothing = k > fp_window and k >= self.warmup_iters
            gm = buffer.log().mean(0).exp() if filtering or smoothing else None
            if filtering and bool((buffer.mean(0) - gm > fp_window * spread).any()):
                buffer[slot] = self.running_var
                skip = True
                self.skip_counter.add_(1)
            var = gm if smoothing and not skip else x2
            if k <= max(self.compensation_start, self.warmup_iters) or skip:
                r = torch.ones_like(var)
            else:
                r = ((var + self.eps).sqrt() / (self.running_var + self.eps).sqrt()).clamp_(*self.ratio_clamp)
            self.running_var.copy_(self.momentum * self.running_var + (1 - self.momentum) * var)
            self.last_var.copy_(var)
        dtype = rows.dtype
        return _UnifiedNormFunction.apply(rows, weight, bias, var.to(dtype), r.to(dtype), _State(self, k, skip))
