r"""diffGrad: Adam whose first moment is damped by a friction coefficient of the gradient change.

Paper: S. R. Dubey, S. Chakraborty, S. K. Roy, S. Mukherjee, S. K. Singh, B. B. Chaudhuri, "diffGrad: An
Optimization Method for Convolutional Neural Networks", IEEE TNNLS 2020 (arXiv:1909.11015, 2019).
Official code: https://github.com/shivram1987/diffGrad, file ``diffGrad_v2.py`` (class ``diffgrad``), the
version this module follows.

Update rule, per parameter tensor :math:`\theta` with gradient :math:`g_t` (everything elementwise; state
starts at zero, :math:`g_0 = 0`)::

    g_t  <- g_t + wd * theta                      (coupled L2, the default; see weight decay below)
    m_t   = beta1 m_{t-1} + (1 - beta1) g_t
    v_t   = beta2 v_{t-1} + (1 - beta2) g_t^2
    xi_t  = sigmoid(|g_{t-1} - g_t|)              in [0.5, 1)   (the "AbsSig" friction coefficient)
    theta <- theta - lr sqrt(1 - beta2^t) / (1 - beta1^t) * xi_t m_t / (sqrt(v_t) + eps)

so at :math:`t = 1`, :math:`\xi_1 = \mathrm{sigmoid}(|g_1|)`. Where the gradient changes fast the step is
Adam's; where it barely changes (a flat region, or near an optimum) it is damped towards half of Adam's.
:math:`\xi` scales :math:`m` for the update only; the stored :math:`m` is Adam's. State per parameter:
``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``previous_grad`` (:math:`g_t`, stored by value).

Defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0`` are the official code's (Adam's);
the paper's CIFAR runs used lr 1e-3 like Adam.

Deviations and choices, stated honestly:

- ``eps`` is added to the *uncorrected* :math:`\sqrt{v_t}`, as in the official code (old PyTorch Adam);
  the paper writes :math:`\hat m / (\sqrt{\hat v} + \epsilon)`, i.e. :math:`\epsilon \sqrt{1-\beta_2^t}`
  in this form. The two differ only where :math:`v` is tiny.
- The original ``diffGrad.py`` (used for the paper's numbers) stored ``previous_grad = grad`` by reference,
  so with in-place gradient zeroing :math:`g_{t-1} - g_t = 0` and :math:`\xi \equiv 0.5` from the second
  step on: the published runs were effectively Adam at half the learning rate. ``diffGrad_v2.py`` fixes
  it with ``grad.clone()``; normlab copies the gradient into its own buffer.
- Weight decay: ``weight_decay`` is the official coupled L2 term added to the gradient before
  everything else, so ``previous_grad`` stores the L2-augmented gradient (v2 behaviour).
  ``decoupled_weight_decay=True`` instead shrinks :math:`\theta \leftarrow \theta (1 - \mathrm{lr}\cdot
  wd)` before the update (AdamW style; pytorch-optimizer's default ``weight_decouple=True``), and
  ``previous_grad`` stores the raw gradient.
- The caller's ``.grad`` is never modified (the official code adds the L2 term into ``p.grad`` in place,
  as does pytorch-optimizer's ``DiffGrad``).
- The first moment is updated with ``lerp_`` (as torch's Adam) rather than ``mul_().add_()``; they agree
  to rounding.
- float16/bfloat16 parameters keep ``exp_avg``, ``exp_avg_sq`` and ``previous_grad`` in float32 (in
  bf16, ``sigmoid`` of the small gradient differences rounds to exactly 0.5 and fp16 ``v`` underflows);
  the update is computed in float32 and rounded into the parameter. ``load_state_dict`` keeps that
  float32 state (torch would cast it to the parameter's dtype).
- Compared with ``pytorch_optimizer.DiffGrad(weight_decouple=False)`` (4.1.0): the same algorithm except
  that its denominator is :math:`\sqrt{v + 10^{-15}} + \epsilon` (over 30 float64 steps of an MLP
  10-32-3 at lr 1e-2 the parameters differ by about 1e-6; with its 1e-15 set to 0 they are bitwise equal).
  Its default ``weight_decouple=True`` is ``decoupled_weight_decay=True`` here.

``foreach=None`` picks the multi-tensor path where torch.optim would (CUDA and other accelerators) and the
per-tensor loop elsewhere; both compute the same floating-point operations.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach, _get_scalar_dtype, _get_value

from ._common import CheckedGroups, check_betas, check_nonnegative, grads_of

__all__ = ["DiffGrad", "diffgrad", "friction"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BUFFERS = ("exp_avg", "exp_avg_sq", "previous_grad")


def friction(grad: Tensor, previous_grad: Tensor) -> Tensor:
    """diffGrad's friction coefficient ``xi = sigmoid(|previous_grad - grad|)``, elementwise, in [0.5, 1)."""
    return torch.sigmoid((grad - previous_grad).abs())


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class DiffGrad(CheckedGroups):
    """diffGrad (the official ``diffGrad_v2.py`` algorithm); see the module docstring for the update rule.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: decay rates of ``exp_avg`` and ``exp_avg_sq`` (default (0.9, 0.999)).
        eps: added to the uncorrected ``sqrt(exp_avg_sq)`` (default 1e-8).
        weight_decay: coupled L2 coefficient added to the gradient (default 0).
        decoupled_weight_decay: apply ``theta <- theta (1 - lr wd)`` instead of the L2 term (default False).
        foreach: multi-tensor path; ``None`` chooses as torch.optim does.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, foreach=foreach)
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        for name in ("lr", "eps", "weight_decay"):
            check_nonnegative(name, group[name])
        check_betas(group["betas"])

    def _init_group(self, group: dict, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], previous_grads: list[Tensor], steps: list[Tensor]) -> None:
        """Fill the lists (torch.optim's convention, which ``torch.compile`` relies on) with the group's
        parameters that have a gradient, their gradients and their state, created on first use."""
        with_grad, group_grads = grads_of(group["params"], "DiffGrad")
        params.extend(with_grad)
        grads.extend(group_grads)
        for p in with_grad:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                for key in _BUFFERS:
                    state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            previous_grads.append(state["previous_grad"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """One diffGrad step; ``closure`` re-evaluates the model and returns the loss, which is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps)
            beta1, beta2 = group["betas"]
            diffgrad(params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps, lr=group["lr"], beta1=beta1,
                     beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     decoupled_weight_decay=group["decoupled_weight_decay"], foreach=group["foreach"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, except that low-precision parameters keep their float32 state."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params):
            if p.dtype in _LOW_PRECISION and index in state_dict["state"]:
                for key in _BUFFERS:
                    self.state[p][key] = state_dict["state"][index][key].to(device=p.device, dtype=torch.float32,
                                                                           copy=True)


def _step_sizes(steps: list[Tensor], lr: float, beta1: float, beta2: float) -> list:
    """``-lr sqrt(1 - beta2^t) / (1 - beta1^t)`` per tensor, with ``t`` its (already incremented) step."""
    values = [_get_value(s) for s in steps]
    return [-(lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)) for t in values]


def _single_tensor_diffgrad(params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps, *, lr, beta1, beta2,
                            eps, weight_decay, decoupled_weight_decay) -> None:
    for param, grad, exp_avg, exp_avg_sq, previous_grad, step_t in zip(
            params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps, strict=True):
        step_t += 1
        theta = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
        g = grad.to(exp_avg.dtype)
        if weight_decay != 0:
            if decoupled_weight_decay:
                theta.mul_(1 - lr * weight_decay)
            else:
                g = g.add(theta, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        # previous_grad becomes xi * m in place (no temporary), then takes the new gradient
        xi_m = previous_grad.sub_(g).abs_().sigmoid_().mul_(exp_avg)
        theta.addcdiv_(xi_m, denom, value=_step_sizes([step_t], lr, beta1, beta2)[0])
        previous_grad.copy_(g)
        if theta is not param:
            param.copy_(theta)


def _multi_tensor_diffgrad(params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps, *, lr, beta1, beta2,
                           eps, weight_decay, decoupled_weight_decay) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, previous_grads,
                                                            steps])
    for (p_list, g_list, m_list, v_list, prev_list, step_list), _ in grouped.values():
        if not torch.compiler.is_compiling() and step_list[0].is_cpu:
            torch._foreach_add_(step_list, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(step_list, 1)
        low_precision = p_list[0].dtype != m_list[0].dtype
        thetas = [p.to(m_list[0].dtype) for p in p_list] if low_precision else p_list
        g_list = [g.to(m_list[0].dtype) for g in g_list]
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(thetas, 1 - lr * weight_decay)
            else:
                g_list = torch._foreach_add(g_list, thetas, alpha=weight_decay)
        torch._foreach_lerp_(m_list, g_list, 1 - beta1)
        torch._foreach_mul_(v_list, beta2)
        torch._foreach_addcmul_(v_list, g_list, g_list, 1 - beta2)
        denom = torch._foreach_sqrt(v_list)
        torch._foreach_add_(denom, eps)
        # previous_grad becomes xi * m in place, then takes the new gradient
        torch._foreach_sub_(prev_list, g_list)
        torch._foreach_abs_(prev_list)
        torch._foreach_sigmoid_(prev_list)
        torch._foreach_mul_(prev_list, m_list)
        step_sizes = _step_sizes(step_list, lr, beta1, beta2)
        if torch.compiler.is_compiling():  # 0-d tensor step sizes: a tensor of scalars is refused while tracing
            torch._foreach_mul_(prev_list, step_sizes)
            torch._foreach_add_(thetas, torch._foreach_div(prev_list, denom))
        else:
            torch._foreach_addcdiv_(thetas, prev_list, denom, step_sizes)
        torch._foreach_copy_(prev_list, g_list)
        if low_precision:
            torch._foreach_copy_(p_list, thetas)


def diffgrad(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             previous_grads: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
             eps: float, weight_decay: float, decoupled_weight_decay: bool, foreach: bool | None = None) -> None:
    """Functional diffGrad: update ``params`` and the state lists in place (``steps`` are scalar tensors,
    incremented here). ``foreach=None`` chooses as torch.optim does."""
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    fn = _multi_tensor_diffgrad if foreach else _single_tensor_diffgrad
    fn(params, grads, exp_avgs, exp_avg_sqs, previous_grads, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
       weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)
