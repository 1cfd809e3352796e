"""PowerNorm: batch normalization for transformers with a running quadratic mean.

Paper: Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in
Transformers", ICML 2020, arXiv:2003.07845; official code: sIncerass/powernorm
(``fairseq/modules/norms/mask_powernorm.py``: ``MaskPowerNorm``, ``PowerFunction``, ``GroupScaling1D``).
normlab follows the official code; where it differs from the paper this is said below.

Layout: ``(B, T, C)`` (``batch_first=True``, the default), ``(T, B, C)`` (``batch_first=False``, fairseq's
layout) or ``(B, C)`` (one token per sample, T = 1). ``pad_mask`` is ``(B, T)`` (``(B, 1)`` for a 2-D
input) with True = padding, in both layouts, as in the official code. Channel statistics are taken over
the non-padded tokens of the whole batch; padded positions are still normalized and returned.

Step 0, group scaling (train and eval, differentiated exactly): the C channels are split into
``group_num`` groups of C/G contiguous channels and each token's group is divided by its quadratic mean,
``u = x / sqrt(mean_group(x^2) + group_eps)`` (no parameters). The official code applies it before
PowerNorm with ``group_eps = 1e-5`` and G = the number of attention heads; the paper does not mention
it. ``group_num=None`` disables it (with G = 1 it is a per-token RMSNorm without gain).

Training forward, with ``k`` the iteration count after ``iters += 1`` and ``x2 = mean_tokens(u^2)`` (C):

    z = u / sqrt(x2 + eps)                 if k <= warmup_iters   (batch statistic)
    z = u / sqrt(running_phi + eps)        otherwise              (running value before this step)
    running_phi = running_phi * (k-1)/k + x2/k      only if k < warmup_iters (cumulative mean), then
    running_phi = alpha_fwd * running_phi + (1 - alpha_fwd) * x2   always
    y = weight * z + bias

Training backward (approximate, hand-written; ``gy = dL/dy``, ``ema_gz`` read when backward runs):

    g  = gy * weight
    gh = g - (1 - alpha_bkw) * ema_gz * z
    ema_gz += mean_{all B*T positions, pads included}(gh * z)
    dL/du = gh / sqrt(x2 + eps)                     backward_scale="batch"   (the code)
    dL/du = gh * (the forward's scale)              backward_scale="running" (the paper's Algorithm 1)
    dL/dweight = sum(gy * z),  dL/dbias = sum(gy)

then exact autograd through the group scaling. The exact gradient of ``u / sqrt(mean(u^2))`` would be
``(g - mean(g z) z) / sqrt(x2)``; PowerNorm replaces the batch's ``mean(g z)`` by the running
``(1 - alpha_bkw) * ema_gz``. The code divides by the *batch* statistic even after warm-up, when the
forward divided by ``running_phi``; the paper divides by the running statistic. The default follows the
code, which produced the published numbers; ``backward_scale="running"`` divides by the statistic the
forward used (identical during warm-up). When ``running_phi`` drifts from the batch statistic the
default's gradients are inconsistent with its forward.

Eval: ``y = weight * u / sqrt(running_phi + eps) + bias``, a fixed per-channel affine map of ``u``; with
``group_num=None`` it folds into a neighbouring linear layer (:meth:`PowerNorm.inference_affine`).

Defaults (the official class): ``eps=1e-5``, ``alpha_fwd=alpha_bkw=0.9``, ``warmup_iters=10000`` (the
IWSLT14 runs pass ``--warmup-updates 8000``), ``group_num=1`` (the runs pass the number of heads),
``group_eps=1e-5``. ``running_phi`` starts at 1, ``ema_gz`` at 0, ``iters`` at 0; ``weight``/``bias``
are always present (the official ``affine`` flag is unused). ``alpha_fwd`` weights the *old* value,
the opposite of torch BatchNorm's ``momentum``.

Deviations and notes:
- ``iters`` advances once per training-mode forward call: gradient accumulation or several forwards
  per optimizer step shift the warm-up (as in the official code). Each backward updates ``ema_gz``.
- float16/bfloat16 input: statistics, buffers' arithmetic and the backward run in float32, the output
  has the input dtype; float64 stays float64.
- All tokens padded raises ``ValueError("PowerNorm: no non-padded tokens")`` (the code would divide by
  zero); fewer than 8 tokens warns (the batch statistic of so few tokens is very noisy).
- Distributed (``process_group``, default WORLD, used when ``torch.distributed`` is initialized): the
  forward all-reduces ``(sum of u^2 over non-padded tokens, their count)`` and the backward
  ``(sum of gh*z, position count)``, one packed call each (:func:`normlab.distributed.all_reduce_sum`),
  so every rank sees the statistics of the global batch. The backward is linear in the incoming
  gradients (``ema_gz`` included), so under DDP, whose ranks differentiate the mean of their local batch
  (``world_size`` times the gradient of the global mean), ``ema_gz`` holds ``world_size`` times the
  single-process value and the parameter gradients DDP averages equal the single-process ones.
- The official module keeps ``running_phi``/``ema_gz`` of shape (1, C, 1, 1); here they are (C).
- ``torch.compile``: the training step (statistics, buffer updates, the autograd.Function) runs
  eagerly behind a graph break; traced by aot_eager, the Function's gradients after warm-up differed
  from eager (torch 2.13). Eval mode compiles as the plain formula.

Speed (CPU, eager): the channel statistics are one ATen reduction (``batch_norm_update_stats``: mean
and variance, ``x2 = var + mean^2``), and ``y = weight * u / sqrt(stat + eps) + bias`` and its backward
(``dx``, ``dweight``, ``dbias``) are ATen's fused eval-mode batch-norm kernels with running mean 0; the
running-gradient correction adds one in-place pass backward, group scaling a per-token reduction and
two passes each way. Each full-size buffer is allocated once per direction.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as NF
from .._validation import check_eps, check_input
from ..distributed import all_reduce_sum, is_distributed

__all__ = ["PowerNorm"]

BACKWARD_SCALES = ("batch", "running")
MIN_TOKENS = 8


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C)`` as ``(N, G, C/G)``."""
    return t.view(t.shape[0], groups, t.shape[1] // groups)


def _group_scale(x: torch.Tensor, groups: int | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(u, r)``: ``u = x * r`` with ``r = (mean_group(x^2) + eps)^(-1/2)`` of shape ``(N, G, 1)``;
    ``(x, None)`` without group scaling."""
    if groups is None:
        return x, None
    xg = _grouped(x, groups)
    r = torch.linalg.vector_norm(xg, dim=-1, keepdim=True).square_().div_(xg.shape[-1]).add_(eps).rsqrt_()
    return torch.mul(xg, r).view(x.shape), r


def _scale_affine(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, statistic: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``u * weight / sqrt(statistic + eps) + bias`` in one pass: ATen's eval-mode batch norm of the
    ``(N, C)`` tokens with running mean 0 and running variance ``statistic``."""
    return torch.batch_norm(u, weight, bias, torch.zeros_like(statistic), statistic, False, 0.0, eps, False)


class _PowerNormFunction(torch.autograd.Function):
    """Group scaling and PowerNorm over ``(N, C)`` tokens in one autograd node, on ATen's fused batch
    norm kernels (eval mode, running mean 0: the forward ``u * weight / sqrt(stat + eps) + bias`` and its
    backward ``gy * weight / sqrt(stat + eps)``, ``sum(gy * u) / sqrt(stat + eps)``, ``sum(gy)`` are
    one pass each).

    forward:  ``u = x * r`` (group scaling), ``y = weight * u / sqrt(stat + eps) + bias`` with ``stat`` the
    batch or running statistic that ``norm._normalize`` picked (in training it also advanced the running
    buffers); ``bstat`` is the statistic the backward divides by.

    backward, with ``Sgu = sum_tokens(gy * u)``, ``scale = (stat + eps)^(-1/2)``, ``bscale = (bstat +
    eps)^(-1/2)``: ``dweight = scale * Sgu``, ``dbias = sum(gy)``, ``du = gy * weight * bscale`` (the
    kernel); in training also ``sum(gh z) = weight * dweight - c * scale * sum_all(u^2)`` with ``c =
    (1 - alpha_bkw) * ema_gz * scale`` (so ``(1 - alpha_bkw) * ema_gz * z = c * u``), which updates
    ``ema_gz``, and ``du -= u * (c * bscale)``. In eval the gradient is exact. Group scaling's exact
    backward follows in place: ``dx = r * (du - u * mean_group(du * u))``. ``ema_gz`` is read and
    updated when backward runs (not saved), as in the official code.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, norm, keep):
        y, u, r, stat, bstat, sumsq_all = norm._normalize(x, weight, bias, keep, keep_u=True)
        ctx.save_for_backward(u, r, weight, stat, bstat, sumsq_all)
        ctx.norm, ctx.training = norm, norm.training
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, r, weight, stat, bstat, sumsq_all = ctx.saved_tensors
        norm = ctx.norm
        need_x = ctx.needs_input_grad[0]
        grad_u, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(), u, weight, torch.zeros_like(bstat), bstat, None, None, False, norm.eps,
            [need_x, True, ctx.needs_input_grad[2]])
        scale, bscale = norm._scale(stat, stat.dtype), norm._scale(bstat, bstat.dtype)
        if stat is not bstat:  # the kernel's weight gradient is sum(gy * u) * bscale
            grad_w = grad_w.div_(bscale).mul_(scale)
        if ctx.training:
            ema_gz = norm.ema_gz
            correction = (1.0 - norm.alpha_bkw) * ema_gz.to(scale.dtype) * scale  # before this update
            sum_ghz = weight * grad_w - correction * scale * sumsq_all
            sum_ghz, count = all_reduce_sum(sum_ghz, sum_ghz.new_full((1,), grad_y.shape[0]),
                                            process_group=norm.process_group)
            ema_gz.add_((sum_ghz / count).to(ema_gz.dtype))
            if need_x:
                grad_u.addcmul_(u, correction.mul_(bscale), value=-1.0)
        if need_x and r is not None:
            dug, ug = _grouped(grad_u, r.shape[1]), _grouped(u, r.shape[1])
            mean_du_u = torch.einsum("ngc,ngc->ng", dug, ug).unsqueeze(-1).div_(ug.shape[-1])
            dug.addcmul_(ug, mean_du_u, value=-1.0).mul_(r)
        return grad_u, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, None


@torch.compiler.disable
def _power_norm(norm: PowerNorm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                keep: torch.Tensor | None, needs_grad: bool) -> torch.Tensor:
    """Training forward, and eval forward with autograd, outside of ``torch.compile``'s graphs (a graph
    break): traced by aot_eager, the autograd.Function's gradients after warm-up differed from eager
    (torch 2.13), and the running buffers are updated here."""
    if needs_grad:
        return _PowerNormFunction.apply(x, weight, bias, norm, keep)
    return norm._normalize(x, weight, bias, keep, keep_u=False)[0]


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class PowerNorm(nn.Module):
    """PowerNorm over the last dim: ``PowerNorm(num_features, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9,
    warmup_iters=10000, group_num=1, group_eps=1e-5, backward_scale="batch", batch_first=True,
    process_group=None, device=None, dtype=None)``; ``forward(x, pad_mask=None)`` for ``(B, T, C)``
    (``(T, B, C)`` with ``batch_first=False``) or ``(B, C)``, ``pad_mask`` ``(B, T)`` with True = padding.
    Buffers: ``running_phi`` (C), ``ema_gz`` (C), ``iters`` (int64 scalar)."""

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 warmup_iters: int = 10000, group_num: int | None = 1, group_eps: float = 1e-5,
                 backward_scale: str = "batch", batch_first: bool = True,
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        check_eps(eps)
        check_eps(group_eps)
        _check_unit("alpha_fwd", alpha_fwd)
        _check_unit("alpha_bkw", alpha_bkw)
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        if group_num is not None:
            if isinstance(group_num, bool) or not isinstance(group_num, int) or group_num <= 0:
                raise ValueError(f"group_num must be a positive int or None, got {group_num!r}")
            if num_features % group_num:
                raise ValueError(f"num_features must be divisible by group_num, got num_features={num_features}, "
                                 f"group_num={group_num}")
        if backward_scale not in BACKWARD_SCALES:
            raise ValueError(f"backward_scale must be one of {BACKWARD_SCALES}, got {backward_scale!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        self.num_features, self.eps, self.group_eps = num_features, float(eps), float(group_eps)
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        self.warmup_iters, self.group_num = warmup_iters, group_num
        self.backward_scale, self.batch_first, self.process_group = backward_scale, batch_first, process_group
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.register_buffer("running_phi", torch.empty(num_features, **factory))
        self.register_buffer("ema_gz", torch.empty(num_features, **factory))
        self.register_buffer("iters", torch.empty((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.iters.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"warmup_iters={self.warmup_iters}, group_num={self.group_num}, group_eps={self.group_eps}, "
                f"backward_scale={self.backward_scale!r}, batch_first={self.batch_first}")

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift) = (weight / sqrt(running_phi + eps), bias)`` (detached): the eval-mode map
        ``y = x * scale + shift``. ``ValueError`` when group scaling is on, which stays a per-token op."""
        if self.group_num is not None:
            raise ValueError(f"PowerNorm.inference_affine needs group_num=None: group scaling "
                             f"(group_num={self.group_num}) is a per-token op, not a fixed affine map")
        with torch.no_grad():
            return self.weight * self._scale(self.running_phi, self.weight.dtype), self.bias.detach().clone()

    def _scale(self, statistic: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return statistic.to(dtype).add(self.eps).rsqrt_()

    def _flatten(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` as ``(N, C)`` tokens and the keep mask ``(N,)`` (None without pads), in the same order."""
        check_input(x, (self.num_features,))
        if x.dim() not in (2, 3):
            layout = "(B, T, C)" if self.batch_first else "(T, B, C)"
            raise ValueError(f"expected input of shape {layout} or (B, C) with C={self.num_features}, "
                             f"got {tuple(x.shape)}")
        x2d = x.reshape(-1, self.num_features)
        if pad_mask is None:
            return x2d, None
        if x.dim() == 2:
            expected = (x.shape[0], 1)
        else:
            expected = tuple(x.shape[:2]) if self.batch_first else (x.shape[1], x.shape[0])
        if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
            raise TypeError(f"pad_mask must be a bool tensor (True = padding), got "
                            f"{getattr(pad_mask, 'dtype', type(pad_mask).__name__)}")
        if tuple(pad_mask.shape) != expected:
            raise ValueError(f"expected pad_mask of shape {expected} (B, T) for input {tuple(x.shape)}, got "
                             f"{tuple(pad_mask.shape)}")
        if x.dim() == 3 and not self.batch_first:
            pad_mask = pad_mask.transpose(0, 1)
        return x2d, ~pad_mask.reshape(-1)

    def _token_count(self, count: torch.Tensor | int) -> None:
        """``ValueError`` for no tokens, a warning for fewer than 8 (eager only: reads the count)."""
        if torch.compiler.is_compiling():
            return
        n = int(count)
        if n == 0:
            raise ValueError("PowerNorm: no non-padded tokens")
        if n < MIN_TOKENS:
            warnings.warn(f"PowerNorm: batch statistics over fewer than {MIN_TOKENS} tokens are very noisy",
                          stacklevel=2)

    def _advance(self, sumsq: torch.Tensor, count: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of the statistics from the local ``sum(u^2)`` over non-padded tokens and
        their count: all-reduce, check, ``iters += 1``, update ``running_phi``; returns the statistic the
        forward divides by and the one the backward divides by."""
        if is_distributed(self.process_group):
            sumsq, count = all_reduce_sum(sumsq, sumsq.new_full((1,), count) if isinstance(count, int) else count,
                                          process_group=self.process_group)
        self._token_count(count)
        dtype = sumsq.dtype
        x2 = sumsq / count
        self.iters.add_(1)
        k = self.iters.to(dtype)
        phi = self.running_phi.to(dtype)
        stat = torch.where(self.iters <= self.warmup_iters, x2, phi)
        cumulative = torch.where(self.iters < self.warmup_iters, phi * (k - 1) / k + x2 / k, phi)
        self.running_phi.copy_(self.alpha_fwd * cumulative + (1 - self.alpha_fwd) * x2)
        return stat, x2 if self.backward_scale == "batch" else stat

    def _normalize(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor | None,
                   keep_u: bool):
        """``(y, u, r, stat, bstat, sumsq_all)`` for ``(N, C)`` tokens in the compute dtype (see
        :class:`_PowerNormFunction`); in training mode this advances the statistics. ``keep_u=False``
        (no backward) writes ``y`` over ``u``."""
        with torch.no_grad():
            u, r = _group_scale(x, self.group_num, self.group_eps)
            sumsq_all = None
            if not self.training:
                stat = bstat = self.running_phi.to(x.dtype, copy=True)  # saved: not the live buffer
            elif keep is None and x.shape[0] > 0:
                mean, var = torch.batch_norm_update_stats(u, None, None, 0.0)
                sumsq_all = mean.square_().add_(var).mul_(x.shape[0])
                stat, bstat = self._advance(sumsq_all, x.shape[0])
            else:
                squares = u.square()
                sumsq_all = squares.sum(0)
                kept = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)
                stat, bstat = self._advance(kept @ squares, kept.sum().view(1))
                del squares
            if keep_u or r is None:
                y = _scale_affine(u, weight, bias, stat, self.eps)
            else:
                y = torch.addcmul(bias, u, weight * self._scale(stat, x.dtype), out=u)
        return y, u, r, stat, bstat, sumsq_all

    def _eval_formula(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        u = x
        if self.group_num is not None:
            xg = _grouped(x, self.group_num)
            u = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + self.group_eps)).view(x.shape)
        return u * (weight * self._scale(self.running_phi, x.dtype)) + bias

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x2d, keep = self._flatten(x, pad_mask)
        dtype = NF.compute_dtype(x.dtype)
        xc = x2d.to(dtype).contiguous()
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        needs_grad = torch.is_grad_enabled() and (xc.requires_grad or weight.requires_grad or bias.requires_grad)
        if self.training or not torch.compiler.is_compiling():
            y = _power_norm(self, xc, weight, bias, keep, needs_grad)
        else:  # eval under torch.compile: the plain formula, which the compiler differentiates and fuses
            y = self._eval_formula(xc, weight, bias)
        return y.to(x.dtype).view(x.shape)
