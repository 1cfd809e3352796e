"""Pure tensor functions shared by layers and conversions (``F.rms_norm``-style signatures).

Statistics are computed in float32 for float16/bfloat16 input and the result is cast back to the
input dtype; float64 stays float64.

Speed (``normlab speed``, CPU). ``rms_norm`` and ``crms_norm`` have hand-written backwards with as few
full-size passes and allocations as ATen allows: ``rms_norm`` reuses ATen's fused LayerNorm backward
(mean 0) plus one matrix-vector product and one in-place add; ``crms_norm`` uses one buffer, two
matrix-vector products and in-place updates. Measured fwd+bwd at 8 x 256 x 768 float32 on this
project's shared 2-core machine (thread CPU time at 1 thread, as ratios to torch's eager
``layer_norm``; 2-thread wall times were dominated by other processes): eager ``rms_norm`` 1.4-1.5x
(torch's own ``F.rms_norm`` 5.7-6.4x), eager ``crms_norm`` 1.2-1.9x (its plain autograd formula
3.8-7x). Eager mode cannot reach LayerNorm without a C++ extension: LayerNorm is one fused ATen kernel
each way, and RMSNorm in ATen ops needs about two more memory passes each way (the ``mean(x^2)``
reduction and the weight multiply forward, the ``mean(g)`` correction backward). The recommended mode
for speed is therefore ``torch.compile`` (inductor), which fuses each function into one forward and
one backward kernel (measured 0.9-1.3x ``layer_norm``, parity within this machine's noise, the same
as a compiled ``torch.nn.RMSNorm``): ``rms_norm`` traces through its autograd.Function, ``crms_norm``
switches to its plain formula while compiling, whose derived backward inductor fuses better than the
eager backward's matrix-vector products.
"""

from __future__ import annotations

import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are taken in: float32 for half types, the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _in_compute_dtype(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """Input and affine parameters in :func:`compute_dtype`; ``eps=None`` -> the input dtype's epsilon."""
    dtype = compute_dtype(x.dtype)
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    return (x.to(dtype), None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype),
            eps)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _affine_(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y * weight + bias`` in place on the freshly allocated ``y`` (no extra full-size allocation)."""
    if weight is not None:
        y = y.mul_(weight)
    if bias is not None:
        y = y.add_(bias)
    return y


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, ndim: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)`` with ``r = (mean(x^2) + eps)^(-1/2)`` over the last ``ndim`` dims, ``y = x * r * w + b``."""
    dims = tuple(range(x.dim() - ndim, x.dim()))
    size = math.prod(x.shape[x.dim() - ndim:])
    rstd = torch.linalg.vector_norm(x, dim=dims, keepdim=True).square_().div_(size).add_(eps).rsqrt_()
    return _affine_(torch.mul(x, rstd), weight, bias), rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last ``ndim`` dims with a hand-written backward.

    forward:  r = (mean(x^2) + eps)^(-1/2),  xhat = x * r,  y = xhat * w (+ b)
    backward: dx = r * (g - xhat * mean(g * xhat)),  g = dy * w;  dw = sum(dy * xhat),  db = sum(dy)
    The backward reuses ATen's fused LayerNorm backward with mean 0 and rstd r, which computes
    r * (g - mean(g) - xhat * mean(g * xhat)) and dw in one kernel; adding back r * mean(g) (one
    matrix-vector product and one in-place broadcast add) gives RMSNorm's. Under ``torch.compile``
    inductor fuses all of it into one kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ndim: int, eps: float):
        y, rstd = _rms_norm_forward(x, weight, bias, ndim, eps)
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
        flat_g = grad_y.view(rows, size)
        if grad_x is not None:
            sum_g = torch.mv(flat_g, weight.reshape(-1)) if weight is not None else flat_g.sum(-1)
            grad_x = grad_x.add_(sum_g.view(rstd.shape).mul_(rstd).div_(size))
        grad_b = flat_g.sum(0).view(shape) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def rms_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight + bias`` over the trailing ``normalized_shape`` dims.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.functional.rms_norm``.
    """
    xc, w, b, eps = _in_compute_dtype(x, weight, bias, eps)
    if not _needs_grad(xc, w, b):  # inference: skip the autograd.Function's per-call overhead
        return _rms_norm_forward(xc, w, b, len(normalized_shape), eps)[0].to(x.dtype)
    return _RMSNormFunction.apply(xc, w, b, len(normalized_shape), eps).to(x.dtype)


def _crms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, r, s)``: ``s = sum(x)``, ``r = ((sum(x^2) + s^2) / d + eps)^(-1/2)``, ``y = x * r * w + b``."""
    d = x.shape[-1] + 1
    s = x.sum(-1, keepdim=True)
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().addcmul_(s, s).div_(d).add_(eps).rsqrt_()
    return _affine_(torch.mul(x, rstd), weight, bias), rstd, s


class _CRMSNormFunction(torch.autograd.Function):
    """Compressed RMSNorm over the last dim (width n = d-1) with a hand-written backward.

    forward:  s = sum(x),  r = ((sum(x^2) + s^2) / d + eps)^(-1/2),  y = x * r * w (+ b)
    backward: with g = dy * w and c = sum(g * x) (one matrix-vector product over dy * x):
              dx = r * g - (r^3 * c / d) * (x + s),  dw = sum_rows(dy * x * r) (a second one),
              db = sum_rows(dy)
    (from dx = r * (g - (xhat + s r) * sum(g xhat) / d) with xhat = x r). One full-size buffer holds
    dy * x and then, in place, dx. (Reusing ATen's LayerNorm backward as ``rms_norm`` does is possible,
    with rstd r / sqrt(d/n) and weight sqrt(d/n) w, the missing s-term being the row sum of its dx, but
    that row sum cancels to ~6e-6 relative error in float32 for no measurable gain.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        x = x.contiguous()
        y, rstd, s = _crms_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, rstd, s, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, s, weight = ctx.saved_tensors
        n = x.shape[-1]
        rows, d = rstd.numel(), n + 1
        buf = torch.mul(grad_y, x, out=torch.empty_like(x, memory_format=torch.contiguous_format))
        flat = buf.view(rows, n)
        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = rstd.view(rows) @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(rows, n).sum(0)
        if ctx.needs_input_grad[0]:
            c = torch.mv(flat, weight) if weight is not None else flat.sum(-1)
            k = c.view(rstd.shape).mul_(rstd.pow(3)).div_(-d)
            grad_x = torch.mul(grad_y, weight, out=buf) if weight is not None else buf.copy_(grad_y)
            grad_x = grad_x.mul_(rstd).addcmul_(x, k).add_(k * s)
        return grad_x, grad_w, grad_b, None


def _crms_norm_formula(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    d = x.shape[-1] + 1
    mean_square = (x.square().sum(-1, keepdim=True) + x.sum(-1, keepdim=True).square()) / d
    y = x * torch.rsqrt(mean_square + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def crms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    """Compressed RMSNorm (Jiang et al., 2023) of the first ``d-1`` coordinates of a zero-mean d-vector.

    ``y = x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * weight + bias`` with ``d = x.shape[-1] + 1``:
    ``-sum(x)`` is the dropped d-th coordinate, so ``crms_norm(x[..., :-1]) == rms_norm(x)[..., :-1]``
    for zero-mean ``x``. The sums are taken in float32 for half input (the ``sum(x)^2`` term cancels).
    Eager mode runs a hand-written backward; under ``torch.compile`` the plain formula, whose derived
    backward inductor fuses into one kernel.
    """
    xc, w, b, eps = _in_compute_dtype(x, weight, bias, eps)
    if torch.compiler.is_compiling():
        return _crms_norm_formula(xc, w, b, eps).to(x.dtype)
    if not _needs_grad(xc, w, b):  # inference: skip the autograd.Function's per-call overhead
        return _crms_norm_forward(xc, w, b, eps)[0].to(x.dtype)
    return _CRMSNormFunction.apply(xc, w, b, eps).to(x.dtype)


class _ChannelMoments(torch.autograd.Function):
    """Biased variance and mean per channel (dim 1) over every other axis of ``x``, from ATen's fused
    BatchNorm statistics kernel (several times faster on CPU than ``torch.var_mean`` over ``(0, 2, 3)``);
    backward ``dL/dx = (dL/dmean + 2 (x - mean) dL/dvar) / n``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = mean.view(shape), var.view(shape)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        return (x - mean).mul_(grad_var * (2.0 / n)).add_(grad_mean / n)


def batch_var_mean(x: torch.Tensor, dim: tuple[int, ...], *, process_group=None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Biased variance and mean of ``x`` over the axes ``dim`` (kept as size-1 axes), and the number of
    values each statistic is taken over, for the whole batch across the ranks of ``process_group``.

    In :func:`compute_dtype`. Without a multi-rank group: per-channel statistics of a channel-first input
    (``dim = (0, 2, ...)``, BatchNorm's) come from ATen's fused BatchNorm statistics kernel, any other
    ``dim`` from ``torch.var_mean(x, dim, correction=0)``. With a multi-rank group it is two
    differentiable all-reduces (:func:`normlab.distributed.all_reduce_sum`): the sum and count give the
    global mean, then the sum of squared deviations from it gives the global variance, the same two-pass
    formula one process holding the whole batch computes (no ``E[x^2] - E[x]^2`` cancellation). The count
    is the global count in both cases. Every batch-statistics layer of normlab takes its moments here.
    """
    from .distributed import all_reduce_sum, is_distributed

    x = x.to(compute_dtype(x.dtype))
    count = math.prod([x.shape[d] for d in dim])
    if not is_distributed(process_group):
        if x.dim() >= 2 and tuple(dim) == (0, *range(2, x.dim())) and count > 0:
            var, mean = _ChannelMoments.apply(x)
        else:
            var, mean = torch.var_mean(x, dim=dim, correction=0, keepdim=True)
        return var, mean, count
    total, n = all_reduce_sum(x.sum(dim, keepdim=True), x.new_full((1,), count), process_group=process_group)
    mean = total / n
    (sq,) = all_reduce_sum((x - mean).square().sum(dim, keepdim=True), process_group=process_group)
    return sq / n, mean, int(n.item())


REGION_STATS = ("batch", "instance")


def _region_mask(mask: torch.Tensor, x: torch.Tensor, layer: str) -> torch.Tensor:
    """``mask`` (bool, integer or float, ``(B, 1, H', W')`` or ``(B, H', W')``, 1 = region "1", the hole)
    as a detached ``(B, 1, H, W)`` bool tensor at the size of ``x`` (nearest resizing, as the official
    ``RN_B``). ``ValueError`` for a wrong shape or non-binary values (the value check is skipped while
    ``torch.compile`` traces)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{layer}: mask must be a torch.Tensor, got {type(mask).__name__}")
    b, _, h, w = x.shape
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[0] != b or mask.shape[1] != 1:
        raise ValueError(f"{layer} expected mask of shape ({b}, 1, H, W) or ({b}, H, W) for input of shape "
                         f"{tuple(x.shape)} (resized to {h}x{w} with nearest), got {tuple(mask.shape)}")
    mask = mask.detach().to(x.device)
    if mask.dtype != torch.bool:
        if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{layer}: mask must be binary (0/1 or bool, 1 = hole), got values in "
                             f"[{float(mask.min())}, {float(mask.max())}] other than 0 and 1")
        mask = mask != 0
    if tuple(mask.shape[-2:]) != (h, w):
        mask = torch.nn.functional.interpolate(mask.to(torch.uint8), size=(h, w), mode="nearest").bool()
    return mask


def _region_select(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values[1]`` where ``mask`` and ``values[0]`` elsewhere: ``values`` ``(2, Bs, C)`` (per region, sample
    or 1, channel), ``mask`` ``(B, 1, H, W)`` bool -> ``(B, C, H, W)``."""
    return torch.where(mask, values[1][..., None, None], values[0][..., None, None])


def _region_moments(x: torch.Tensor, mask: torch.Tensor, eps: float, stats: str, process_group, layer: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, rstd)``: ``d = x - mu_R`` at every position (``mu_R`` of the position's region, full size, in
    :func:`compute_dtype`) and ``rstd = (var_R + eps * n / n_R)^(-1/2)`` of shape ``(2, Bs, C)`` (region 0,
    region 1; ``Bs`` = 1 for ``stats="batch"``, B for ``"instance"``), with ``n_R`` the region's count
    (clamped to 1) and ``n`` the positions per statistic. Both regions' statistics are one ``einsum`` per
    pass; with ``stats="batch"`` the sums and counts are global (two all-reduces: sums and counts, then
    squared deviations, as :func:`batch_var_mean`)."""
    from ._validation import check_values_per_channel
    from .distributed import all_reduce_sum, is_distributed

    xc = x.to(compute_dtype(x.dtype))
    m = mask.to(xc.dtype)
    regions = torch.cat([1.0 - m, m], dim=1)  # (B, 2, H, W): region 0 (m = 0), region 1 (m = 1)
    batch = stats == "batch"
    pattern = "brhw,bchw->rc" if batch else "brhw,bchw->rbc"
    sums = torch.einsum(pattern, regions, xc)
    counts = regions.sum((0, 2, 3))[:, None] if batch else regions.sum((2, 3)).T  # (2, Bs)
    if batch:
        sums = sums[:, None]
    distributed = batch and is_distributed(process_group)
    if distributed:
        sums, counts = all_reduce_sum(sums, counts, process_group=process_group)
    if not torch.compiler.is_compiling():
        per_statistic = x.shape[2] * x.shape[3] * (x.shape[0] if batch else 1)
        check_values_per_channel(int(counts.sum().item()) if distributed else per_statistic, layer,
                                 tuple(x.shape), when="for its statistics (in training and eval)")
    total = counts.sum(0)  # positions per statistic (B*H*W over all ranks, or H*W)
    n = counts.clamp(min=1.0)
    d = xc - _region_select(mask, sums / n[..., None])
    squares = torch.einsum(pattern, regions, d * d)
    if batch:
        squares = squares[:, None]
    if distributed:
        (squares,) = all_reduce_sum(squares, process_group=process_group)
    var = squares / n[..., None]
    eps_eff = (eps * total / n)[..., None]
    # An empty region selects no position; its 1 keeps rsqrt (and its gradient) finite when eps = 0.
    return d, torch.where(counts[..., None] > 0, var + eps_eff, 1.0).rsqrt()


def region_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5, stats: str = "batch",
                process_group=None) -> torch.Tensor:
    """Region normalization (Yu et al., AAAI 2020; :mod:`normlab.layers.region`) without affine.

    ``x`` ``(B, C, H, W)``; ``mask`` bool or 0/1 ``(B, 1, H', W')`` / ``(B, H', W')``, 1 = region "1" (the
    hole in an inpainting net), resized to ``(H, W)`` with nearest. Each region R in {m, 1 - m} is
    standardized per channel with its own mean and biased variance,
    ``out = sum_R R * (x - mu_R) / sqrt(var_R + eps * n / n_R)``, taken over batch and space
    (``stats="batch"``, the official code, global over the ranks of ``process_group`` when
    ``torch.distributed`` is initialized) or over space per sample (``stats="instance"``, the paper's
    equations). ``n_R`` is the region's count (an empty region contributes nothing), ``n`` the positions
    per statistic (B*H*W or H*W): the effective eps of the official BatchNorm fill trick. The mask gets
    no gradient. With an all-zero or all-one mask this is ``F.batch_norm`` (training) or
    ``F.instance_norm``. Statistics in float32 for half input, the output in the input dtype.
    """
    from ._validation import check_eps, check_float_tensor

    if stats not in REGION_STATS:
        raise ValueError(f"stats must be one of {REGION_STATS}, got {stats!r}")
    check_eps(eps)
    if not torch.compiler.is_compiling():
        check_float_tensor(x)
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"region_norm expected a non-empty 4D (N, C, H, W) input, got shape {tuple(x.shape)}")
    mask = _region_mask(mask, x, "region_norm")
    d, rstd = _region_moments(x, mask, float(eps), stats, process_group, "region_norm")
    return (d * _region_select(mask, rstd)).to(x.dtype)
