"""AdamP and SGDP: momentum optimizers that stop scale-invariant weights from growing.

Paper: Byeongho Heo, Sanghyuk Chun, Seong Joon Oh, Dongyoon Han, Sangdoo Yun, Gyuwan Kim, Youngjung Uh,
Jung-Woo Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
ICLR 2021, arXiv:2006.08217 (2020). Official code: https://github.com/clovaai/AdamP (PyPI ``adamp`` 0.3.0,
files ``adamp/adamp.py`` and ``adamp/sgdp.py``); this module follows that code, which produced the
paper's numbers.

A weight followed by a normalization layer is scale invariant, ``f(c w) = f(w)`` for ``c > 0``: only its
direction matters, a step of size ``lr`` moves the direction by ``lr / ||w||^2`` (the effective step size,
:func:`effective_step_size`), and momentum makes ``||w||`` grow faster than plain gradient descent, which
shrinks that effective step prematurely. AdamP and SGDP detect such weights with a cosine test and remove
the radial component of their update; on every other weight they are AdamW and SGD with momentum.

Update rule of one tensor ``w`` with gradient ``g`` at step ``t``:

.. math::

    \\text{AdamP:}\\quad m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g,\\quad
    v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g^2,\\quad
    u = \\frac{m_t \\;(\\text{or } \\beta_1 m_t + (1-\\beta_1) g \\text{ with nesterov})}
             {\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    \\text{SGDP:}\\quad b_t = \\mu b_{t-1} + (1-\\text{dampening}) g,\\quad
    u = b_t \\;(\\text{or } g + \\mu b_t \\text{ with nesterov})

    \\text{projection (only for } w.\\text{ndim} > 1\\text{), views } V \\in
    [\\text{channel: } (C_{out}, -1),\\ \\text{layer: } (1, -1)] \\text{ in order:}

    \\text{if } \\max_r \\frac{|\\langle g_r, w_r\\rangle|}{\\max(\\|g_r\\|,\\epsilon)\\max(\\|w_r\\|,\\epsilon)}
    < \\frac{\\delta}{\\sqrt{D_V}}:\\quad
    \\hat w_r = \\frac{w_r}{\\|w_r\\| + \\epsilon},\\quad
    u_r \\leftarrow u_r - \\hat w_r \\langle \\hat w_r, u_r\\rangle,
    \\quad \\rho = \\text{wd\\_ratio} \\text{ (first view that passes; else } u \\text{ unchanged}, \\rho = 1)

    \\text{AdamP:}\\quad w \\leftarrow w\\,(1 - \\text{lr}\\,\\lambda\\,\\rho) - \\frac{\\text{lr}}{1-\\beta_1^t} u,
    \\qquad
    \\text{SGDP:}\\quad
    w \\leftarrow w\\,\\Big(1 - \\frac{\\text{lr}\\,\\lambda\\,\\rho}{1-\\mu}\\Big) - \\text{lr}\\, u

``D_V`` is the row length of the view (``numel / C_out`` for channels, ``numel`` for the layer), ``r``
its rows; the test uses the raw gradient, the projection acts on the update. Without Nesterov, SGDP's
update *is* its momentum buffer and the official code projects it in place, so the stored buffer is the
projected one; this module does the same (the paper's pseudo-code keeps it unprojected). AdamP never
alters ``m`` or ``v``.

Defaults are the official code's: AdamP ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0``, SGDP
``lr`` required, ``momentum=0, dampening=0, weight_decay=0, nesterov=False, eps=1e-8``; both
``delta=0.1`` (the paper's threshold) and ``wd_ratio=0.1``. The README of the official code uses
``AdamP(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)`` and
``SGDP(params, lr=0.1, weight_decay=1e-5, momentum=0.9, nesterov=True)``.

Where this module departs from the official code, and why:

- Equal to it up to rounding (float64 over 100 steps in the tests), not bit for bit: AdamP folds the
  bias correction into eps, ``u / sqrt(1 - beta2^t) = m / (sqrt(v) + eps sqrt(1 - beta2^t))``, and
  applies the step as one ``addcdiv`` (one pass over memory less); the cosines come from per-row dot
  products and norms, ``|<g, w>| / (max(||g||, eps) max(||w||, eps))``, which is what
  ``F.cosine_similarity`` computes, and the layer view reuses the channel view's sums (one pass over
  ``g`` and ``w`` for both tests instead of two normalised copies each). AdamP writes ``g * w`` into
  the memory that then holds its denominator, so the test allocates nothing parameter-sized.
- The decision needs the cosines on the host. The ``foreach`` path computes them for every tensor and
  reads all decisions with one device-to-host copy per step (the official code syncs once or twice per
  tensor); the single-tensor path syncs once per tensor. A tensor that is not projected is updated
  without materialising its update. Because of these host reads (and the step-dependent bias correction
  read with ``.item()``, as in torch's non-capturable Adam), ``torch.compile`` runs the functional step
  eagerly (``torch.compiler.disable``) instead of recompiling it every step.
- float16/bfloat16 parameters are stepped in float32 (gradient, state, cosines and projection upcast)
  and written back in their own dtype, state included; with ``D = 1e6`` the threshold ``delta/sqrt(D)``
  is ``1e-4``, below what a half-precision cosine resolves. The official code computes in the
  parameter dtype.
- Non-contiguous parameters (``channels_last``) work; the official code's ``.view`` raises on them.
- The channel view is dim 0, as in the official code, also for ``ConvTranspose`` weights, whose dim 0 is
  ``C_in``: such a weight is tested per input channel.
- Empty parameters are skipped by the projection (the threshold would divide by zero).
- Hyperparameters are validated (the official code checks none); ``momentum=1`` raises because of
  SGDP's ``1 / (1 - momentum)`` weight-decay factor; sparse gradients raise ``RuntimeError``.

``pytorch-optimizer`` 4.1.0 (``pytorch_optimizer.AdamP`` / ``SGDP``) differs from the official code in two
places, which this module does not follow: its AdamP adds eps before the bias correction,
``u = m sqrt(1 - beta2^t) / (sqrt(v) + eps)``, i.e. an effective eps of ``eps / sqrt(1 - beta2^t)`` (31.6x
eps at step 1, 1.26x at step 1000 with ``beta2 = 0.999``): its first step is ``lr g / (|g| + 31.6 eps)``
against ``lr g / (|g| + eps)``, which changes the entries whose ``|g|`` is within a few hundred eps by up to
``lr``. On the test model (conv+BatchNorm, Linear+LayerNorm, head; float64, lr 1e-2) the two AdamPs differ
by 2e-4 after one step, 1.4e-3 after 20 and 0.15 after 100. Its non-Nesterov SGDP projects a copy of the
momentum buffer, so the buffer stays unprojected (the paper's pseudo-code, not the official code): on the
same model (lr 0.1, momentum 0.9) it differs by 0.12 after 20 steps; with Nesterov the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_scalar_dtype

from ._common import CheckedGroups, check_betas, check_nonnegative, grads_of

__all__ = ["AdamP", "SGDP", "adamp", "effective_step_size", "is_scale_invariant", "project_radial", "sgdp"]

Tensor = torch.Tensor
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NONE, _CHANNEL, _LAYER = 0, 1, 2  # which view fired the projection


# --------------------------------------------------------------------------- projection


def _row_dots(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """``<a_r, b_r>`` for the rows of ``a.reshape(rows, -1)``, without an elementwise temporary."""
    return torch.einsum("ij,ij->i", a.reshape(rows, -1), b.reshape(rows, -1))


def _radial_view(w: Tensor, g: Tensor, dot: Tensor | None, delta: float, eps: float) -> Tensor:
    """The view that passes the scale-invariance test as a 0-dim int64 tensor (``_CHANNEL``,
    ``_LAYER`` or ``_NONE``), computed without leaving the device. ``dot``: the per-channel
    ``<g_r, w_r>`` when the caller has them (else computed here). ``w.ndim > 1``, ``w.numel() > 0``."""
    rows = w.shape[0]
    if dot is None:
        dot = _row_dots(g, w, rows)
    g_norm = torch.linalg.vector_norm(g.reshape(rows, -1), dim=1)
    w_norm = torch.linalg.vector_norm(w.reshape(rows, -1), dim=1)
    cos_channel = dot.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
    cos_layer = dot.sum().abs() / (torch.linalg.vector_norm(g_norm).clamp_min(eps)
                                   * torch.linalg.vector_norm(w_norm).clamp_min(eps))
    channel = cos_channel.max() < delta / math.sqrt(w.numel() // rows)
    layer = cos_layer < delta / math.sqrt(w.numel())
    return torch.where(channel, _CHANNEL, torch.where(layer, _LAYER, _NONE))


def _project_(w: Tensor, u: Tensor, view: int, eps: float) -> None:
    """``u <- u - w_hat <w_hat, u>`` per row of the view, ``w_hat = w / (||w_row|| + eps)``, in place."""
    rows = w.shape[0] if view == _CHANNEL else 1
    w2 = w.reshape(rows, -1)
    coef = _row_dots(w2, u, rows) / (torch.linalg.vector_norm(w2, dim=1) + eps).square()
    u.addcmul_(w, coef.view([rows] + [1] * (w.dim() - 1)), value=-1)


def _projectable(p: Tensor) -> bool:
    return p.dim() > 1 and p.numel() > 0


def _product_dots(w: Tensor, gw: Tensor | None) -> Tensor | None:
    """The per-channel dot products from ``gw = g * w`` (``None`` passes through)."""
    return None if gw is None else gw.reshape(w.shape[0], -1).sum(1)


def _view_of(w: Tensor, g: Tensor, delta: float, eps: float, gw: Tensor | None = None) -> int:
    """:func:`_radial_view` of one tensor on the host (``_NONE`` for vectors and empty tensors);
    ``gw = g * w`` when the caller has it."""
    return int(_radial_view(w, g, _product_dots(w, gw), delta, eps)) if _projectable(w) else _NONE


def _views(params: Sequence[Tensor], grads: Sequence[Tensor], delta: float, eps: float,
           products: Sequence[Tensor] | None = None) -> list[int]:
    """:func:`_view_of` of every tensor, with one host sync for all of them."""
    idx = [i for i, p in enumerate(params) if _projectable(p)]
    views = [_NONE] * len(params)
    if idx:
        dots = [_product_dots(params[i], None if products is None else products[i]) for i in idx]
        fired = torch.stack([_radial_view(params[i], grads[i], dot, delta, eps) for i, dot in zip(idx, dots)]).tolist()
        for i, v in zip(idx, fired):
            views[i] = v
    return views


def project_radial(w: Tensor, g: Tensor, u: Tensor, delta: float = 0.1, eps: float = 1e-8
                   ) -> tuple[Tensor, bool]:
    """AdamP's projection of one update: ``(projected update, whether the test fired)``.

    The test compares ``|cos(g, w)|`` per output channel (rows of ``w.reshape(w.shape[0], -1)``), then
    for the whole tensor, against ``delta / sqrt(row length)``; the first view that passes removes the
    radial component of ``u`` per row of that view. ``u`` is not modified (the result is a new tensor);
    vectors (``w.ndim <= 1``) and empty tensors are never projected.
    """
    out = u.clone()
    view = _view_of(w, g, delta, eps)
    if view != _NONE:
        _project_(w, out, view, eps)
    return out, view != _NONE


def effective_step_size(w: Tensor, lr: float) -> Tensor:
    """``lr / ||w||^2`` (Frobenius), the step a scale-invariant weight's direction takes per unit update
    (paper, Sec. 2); a 0-dim float tensor, computed in float32 or wider."""
    w = w.detach()
    return lr / torch.linalg.vector_norm(w.float() if w.dtype in _LOW_PRECISION else w).square()


def is_scale_invariant(model: nn.Module, name: str, *args, scale: float = 2.0, rtol: float = 1e-3, **kwargs
                       ) -> bool:
    """Whether ``model(*args, **kwargs)`` is unchanged when the parameter ``name`` is multiplied by
    ``scale``: the numerical check of ``f(c w) = f(w)``, passed iff
    ``||f(scale w) - f(w)|| <= rtol ||f(w)||`` (Frobenius norms of the output tensor).

    The model runs in its current mode on copies of its parameters and buffers, twice, so that neither
    the model nor its running statistics change. BatchNorm in ``train()`` makes the weight before it
    invariant up to its eps (a relative change of about ``eps / variance``, hence the default
    tolerance); in ``eval()`` (running statistics) it does not.
    """
    named = dict(model.named_parameters())
    if name not in named:
        raise KeyError(f"{type(model).__name__} has no parameter {name!r}; parameters: {list(named)}")
    with torch.no_grad():
        state = {**named, **dict(model.named_buffers())}

        def call(factor: float) -> Tensor:
            tensors = {k: v.detach().clone() for k, v in state.items()}
            tensors[name] = tensors[name] * factor
            return functional_call(model, tensors, args, kwargs)

        base = call(1.0)
        return bool(torch.linalg.vector_norm(call(scale) - base) <= rtol * torch.linalg.vector_norm(base))


# --------------------------------------------------------------------------- shared helpers


def _upcast(*lists: list[Tensor]) -> tuple[list[list[Tensor]], Callable[[], None]]:
    """float32 working copies of float16/bfloat16 tensors (others as they are) and a write-back of all
    but the first list (the gradients)."""
    if not any(t.dtype in _LOW_PRECISION for t in lists[0]):
        return list(lists), lambda: None
    work = [[t.float() if t.dtype in _LOW_PRECISION else t for t in ts] for ts in lists]

    def write_back() -> None:
        for originals, copies in zip(lists[1:], work[1:]):
            for t, c in zip(originals, copies):
                if c is not t:
                    t.copy_(c)

    return work, write_back


def _use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    if foreach is None:
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return foreach


def _check_common(group: dict, optimizer: str) -> None:
    check_nonnegative("lr", group["lr"])
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    check_nonnegative("delta", group["delta"])
    if not 0.0 <= group["wd_ratio"] <= 1.0:
        raise ValueError(f"Invalid wd_ratio: {group['wd_ratio']} ({optimizer} needs 0 <= wd_ratio <= 1)")


# --------------------------------------------------------------------------- AdamP


@torch.compiler.disable  # host-side decisions and step-dependent scalars: compiled graphs would only recompile
def adamp(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          state_steps: list[Tensor], *, foreach: bool | None = None, beta1: float, beta2: float, lr: float,
          weight_decay: float, eps: float, delta: float, wd_ratio: float, nesterov: bool) -> None:
    """Functional AdamP: one step on every tensor, in place (``torch.optim.adamw.adamw``'s shape)."""
    (grads, params, exp_avgs, exp_avg_sqs), write_back = _upcast(grads, params, exp_avgs, exp_avg_sqs)
    step = _multi_tensor_adamp if _use_foreach(foreach, params) else _single_tensor_adamp
    step(params, grads, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1, beta2=beta2, lr=lr,
         weight_decay=weight_decay, eps=eps, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)
    write_back()


def _adam_scalars(step: Tensor, beta1: float, beta2: float, lr: float, eps: float) -> tuple[float, float]:
    """``(step size, eps)`` with the second-moment bias correction folded in (see the module docstring)."""
    t = step.item()
    bc2_sqrt = math.sqrt(1 - beta2 ** t)
    return lr / (1 - beta1 ** t) * bc2_sqrt, eps * bc2_sqrt


def _single_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, beta1, beta2, lr,
                         weight_decay, eps, delta, wd_ratio, nesterov) -> None:
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step += 1
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size, eps_t = _adam_scalars(step, beta1, beta2, lr, eps)
        gw = g.mul(p)  # the cosine test's products, then (same memory) the denominator
        view = _view_of(p, g, delta, eps, gw)
        denom = torch.sqrt(v, out=gw).add_(eps_t)
        num = m.lerp(g, 1 - beta1) if nesterov else m
        if view != _NONE:
            num = num.div(denom) if num is m else num.div_(denom)
            _project_(p, num, view, eps)
        if weight_decay > 0:
            p.mul_(1 - lr * weight_decay * (wd_ratio if view != _NONE else 1.0))
        if view != _NONE:
            p.add_(num.mul_(-step_size))
        else:
            p.addcdiv_(num, denom, value=-step_size)


def _multi_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, beta1, beta2, lr,
                        weight_decay, eps, delta, wd_ratio, nesterov) -> None:
    if not params:
        return
    torch._foreach_add_(state_steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    scalars = [_adam_scalars(step, beta1, beta2, lr, eps) for step in state_steps]
    step_sizes = [-s for s, _ in scalars]
    denoms = torch._foreach_mul(grads, params)  # the cosine test's products, then the denominators
    views = _views(params, grads, delta, eps, denoms)
    for d, v in zip(denoms, exp_avg_sqs):
        torch.sqrt(v, out=d)
    torch._foreach_add_(denoms, [e for _, e in scalars])
    nums = torch._foreach_lerp(exp_avgs, grads, 1 - beta1) if nesterov else exp_avgs
    fired = [i for i, v in enumerate(views) if v != _NONE]
    rest = [i for i, v in enumerate(views) if v == _NONE]
    updates = torch._foreach_div([nums[i] for i in fired], [denoms[i] for i in fired]) if fired else []
    for i, u in zip(fired, updates):
        _project_(params[i], u, views[i], eps)
    if weight_decay > 0:
        torch._foreach_mul_(params, [1 - lr * weight_decay * (wd_ratio if v != _NONE else 1.0) for v in views])
    if fired:
        torch._foreach_mul_(updates, [step_sizes[i] for i in fired])
        torch._foreach_add_([params[i] for i in fired], updates)
    if rest:
        torch._foreach_addcdiv_([params[i] for i in rest], [nums[i] for i in rest], [denoms[i] for i in rest],
                                [step_sizes[i] for i in rest])


class AdamP(CheckedGroups):
    """AdamW that projects the radial component out of the update of scale-invariant weights
    (Heo et al., ICLR 2021); see the module docstring for the rule, defaults and deviations.

    ``weight_decay`` is decoupled (``w <- w (1 - lr weight_decay)``), scaled by ``wd_ratio`` on tensors
    whose update was projected. ``foreach=None`` picks the foreach path where torch.optim would (CUDA).
    State per parameter: ``step`` (a 0-dim tensor, as in torch.optim), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, foreach: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                        nesterov=nesterov, foreach=foreach)
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        _check_common(group, "AdamP")
        check_betas(group["betas"])

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                    steps: list) -> None:
        with_grad, with_grad_grads = grads_of(group["params"], "AdamP")
        grads.extend(with_grad_grads)
        for p in with_grad:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamP step; ``closure`` re-evaluates the model and returns the loss (returned here)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            adamp(params, grads, exp_avgs, exp_avg_sqs, steps, foreach=group["foreach"], beta1=beta1, beta2=beta2,
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], delta=group["delta"],
                  wd_ratio=group["wd_ratio"], nesterov=group["nesterov"])
        return loss


# --------------------------------------------------------------------------- SGDP


@torch.compiler.disable  # the decisions are read on the host every step
def sgdp(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
         foreach: bool | None = None, lr: float, momentum: float, dampening: float, weight_decay: float,
         nesterov: bool, eps: float, delta: float, wd_ratio: float) -> None:
    """Functional SGDP: one step on every tensor, in place (``torch.optim.sgd.sgd``'s shape)."""
    (grads, params, momentum_buffers), write_back = _upcast(grads, params, momentum_buffers)
    step = _multi_tensor_sgdp if _use_foreach(foreach, params) else _single_tensor_sgdp
    step(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
         weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
    write_back()


def _sgdp_decay(lr: float, momentum: float, weight_decay: float, wd_ratio: float, view: int) -> float:
    return 1 - lr * weight_decay * (wd_ratio if view != _NONE else 1.0) / (1 - momentum)


def _single_tensor_sgdp(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                        eps, delta, wd_ratio) -> None:
    for p, g, buf in zip(params, grads, momentum_buffers):
        buf.mul_(momentum).add_(g, alpha=1 - dampening)
        update = g.add(buf, alpha=momentum) if nesterov else buf  # without nesterov: projected in place
        view = _view_of(p, g, delta, eps)
        if view != _NONE:
            _project_(p, update, view, eps)
        if weight_decay > 0:
            p.mul_(_sgdp_decay(lr, momentum, weight_decay, wd_ratio, view))
        p.add_(update, alpha=-lr)


def _multi_tensor_sgdp(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                       eps, delta, wd_ratio) -> None:
    if not params:
        return
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, grads, alpha=1 - dampening)
    updates = torch._foreach_add(grads, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    views = _views(params, grads, delta, eps)
    for p, u, view in zip(params, updates, views):
        if view != _NONE:
            _project_(p, u, view, eps)
    if weight_decay > 0:
        torch._foreach_mul_(params, [_sgdp_decay(lr, momentum, weight_decay, wd_ratio, v) for v in views])
    torch._foreach_add_(params, updates, alpha=-lr)


class SGDP(CheckedGroups):
    """SGD with momentum that projects the radial component out of the update of scale-invariant
    weights (Heo et al., ICLR 2021); see the module docstring for the rule, defaults and deviations.

    The momentum buffer starts at zero (``torch.optim.SGD`` starts it at the first gradient; the two agree
    when ``dampening == 0``). ``weight_decay`` is decoupled and divided by ``1 - momentum``
    (``w <- w (1 - lr weight_decay rho / (1 - momentum))``, ``rho = wd_ratio`` on projected tensors).
    ``foreach=None`` picks the foreach path where torch.optim would (CUDA). State per parameter:
    ``momentum`` (the buffer).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, *, foreach: bool | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, foreach=foreach)
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        _check_common(group, "SGDP")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']} "
                             "(SGDP needs 0 <= momentum < 1: its weight decay divides by 1 - momentum)")
        check_nonnegative("dampening", group["dampening"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One SGDP step; ``closure`` re-evaluates the model and returns the loss (returned here)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = grads_of(group["params"], "SGDP")
            buffers = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum"])
            sgdp(params, grads, buffers, foreach=group["foreach"], lr=group["lr"], momentum=group["momentum"],
                 dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                 eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"])
        return loss
