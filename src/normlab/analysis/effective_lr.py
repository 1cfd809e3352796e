"""Effective learning rates of scale-invariant parameters, and a numerical test of scale invariance.

Source: Lyle et al., "Normalization and effective learning rates in reinforcement learning", NeurIPS 2024,
arXiv:2407.01800 (the ELR diagnostic behind NaP, :mod:`normlab.reparam.nap`); the SGD identity below is the
classic one for scale-invariant weights (van Laarhoven 2017; Hoffer et al. 2018).

A parameter ``W`` is scale invariant when the loss satisfies ``L(cW) = L(W)`` for all ``c > 0`` (a weight
followed by a normalization without a bias in between). Then its gradient is orthogonal to ``W`` and scales
as ``1/||W||``, and a step of size ``lr`` moves its direction ``u = W / ||W||`` as a step of size::

    ELR_sgd  = lr / ||W||^2           (SGD; with momentum the same up to the momentum factor)
    ELR_adam = lr / ||W||             (Adam-like: the update's size ignores the gradient's scale)

and under plain SGD ``||W_{t+1}||^2 = ||W_t||^2 + lr^2 ||g_t||^2`` exactly: the norm only grows, so the ELR
decays although ``lr`` does not.

- :func:`scale_invariant_parameters` finds the invariant tensors numerically, for any model: for each
  parameter, the loss on a given batch with that parameter multiplied by each of ``scales`` (default 0.5 and
  2) must equal the unscaled loss within ``rtol`` (relative) and must change when the parameter is set to 0
  (which excludes unused parameters). Parameters that are all zero cannot be tested and are excluded. The
  model is evaluated with ``torch.func.functional_call`` in its current train/eval mode, on copies of its
  buffers (BatchNorm's running statistics are not updated) and with the same dropout masks for every
  evaluation (drawn inside a forked RNG: the global RNG state is left as it was); parameters, ``.grad`` and
  ``requires_grad`` are not touched. One test per parameter: ``len(scales) + 2`` forward passes.
  Only single tensors are tested: a jointly invariant group (a norm's (g, beta) before ReLU and another
  norm) is not found.
- :func:`effective_lr`: ``lr / ||W||^p`` (p = 2 for ``"sgd"``, 1 for ``"adam"``) for named parameters.
- :class:`EffectiveLRLogger`: the callback. Built with a model, its optimizer (any ``torch.optim.Optimizer``)
  and a batch, it detects the invariant parameters once and registers step hooks on the optimizer; after
  every ``optimizer.step()`` it appends to :attr:`history` a dict with the step number and, per invariant
  parameter, the ELR from its param group's current lr (``"elr"``), its norm (``"norm"``) and the angle its
  direction actually moved, ``||u_{t+1} - u_t||`` (``"angular_step"``: a measurement that needs no
  assumption about the optimizer). ``kind="auto"`` takes p from the optimizer's class (SGD: 2; Adam, AdamW,
  Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta: 1; a wrapper's ``.optimizer`` is looked through) and raises
  for another class: pass ``kind``. Invariance is a property of the current values: at PyTorch's default init a
  LayerNorm gain before a ReLU and another norm is found invariant because its beta is 0.
  :meth:`EffectiveLRLogger.remove` removes the hooks.

Norms are computed in float32 for float16/bfloat16 parameters (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["EffectiveLRLogger", "effective_lr", "scale_invariant_parameters"]

_POWERS = {"sgd": 2, "adam": 1}
_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
              torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta)


def _norm(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _power(kind: str) -> int:
    if kind not in _POWERS:
        raise ValueError(f"optimizer kind must be one of {sorted(_POWERS)}, got {kind!r}")
    return _POWERS[kind]


def scale_invariant_parameters(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any,
                               target: Any, *, scales: Sequence[float] = (0.5, 2.0), rtol: float = 1e-4,
                               params: Iterable[str] | None = None) -> list[str]:
    """Qualified names of the parameters (among ``params``, default all) whose scaling by every ``c`` in
    ``scales`` leaves ``loss_fn(model(inputs), target)`` unchanged within ``rtol`` (relative) and whose zeroing
    changes it. ``inputs``: a tensor or a tuple of positional arguments. Nothing of the model changes."""
    scales = tuple(scales)
    if not scales or any(not isinstance(c, (int, float)) or c <= 0 or c == 1 for c in scales):
        raise ValueError(f"scales must be positive numbers other than 1, got {scales!r}")
    if not isinstance(rtol, (int, float)) or rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol!r}")
    named = dict(model.named_parameters())
    names = list(named) if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"not parameters of the model: {unknown}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    buffers = dict(model.named_buffers())

    def loss_with(replaced: dict[str, torch.Tensor]) -> float:
        state = {**{n: p.detach() for n, p in named.items()}, **replaced,
                 **{n: b.clone() for n, b in buffers.items()}}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            value = loss_fn(functional_call(model, state, args), target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {value!r:.80}")
        return value.item()

    with torch.no_grad():
        base = loss_with({})
        found = []
        for name in names:
            p = named[name].detach()
            if _norm(p).item() == 0:
                continue
            tol = rtol * max(abs(base), 1e-12)
            if abs(loss_with({name: torch.zeros_like(p)}) - base) <= tol:
                continue
            if all(abs(loss_with({name: p * c}) - base) <= tol for c in scales):
                found.append(name)
    return found


def effective_lr(model: nn.Module, lr: float, optimizer: str = "sgd", params: Iterable[str] | None = None
                 ) -> dict[str, float]:
    """``{name: lr / ||W||^p}`` with p = 2 for ``optimizer="sgd"`` and 1 for ``"adam"``, for ``params``
    (qualified names; default every parameter with dim >= 2). Meaningful for scale-invariant parameters."""
    power = _power(optimizer)
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"Invalid lr: {lr}")
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.dim() >= 2] if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"not parameters of the model: {unknown}")
    return {n: lr / _norm(named[n]).item() ** power for n in names}


class EffectiveLRLogger:
    """Logs the ELR of every scale-invariant parameter of ``model`` after every ``optimizer.step()``.

    The invariant parameters are detected once, here, with :func:`scale_invariant_parameters` on
    ``loss_fn(model(inputs), target)`` (``scales``, ``rtol`` as there), or given as ``params`` (names).
    ``kind``: ``"sgd"``, ``"adam"`` or ``"auto"`` (from the optimizer's class). Each step appends
    ``{"step": t, "elr": {name: lr / ||W||^p}, "norm": {name: ||W||}, "angular_step": {name: ||u_t+1 - u_t||}}``
    to :attr:`history` (lr from the parameter's param group at that step)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, inputs: Any = None, target: Any = None,
                 *, kind: str = "auto", params: Iterable[str] | None = None, scales: Sequence[float] = (0.5, 2.0),
                 rtol: float = 1e-4) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if kind == "auto":
            base = optimizer
            while isinstance(getattr(base, "optimizer", None), torch.optim.Optimizer):  # wrappers (NaPOptimizer)
                base = base.optimizer
            if isinstance(base, torch.optim.SGD):
                kind = "sgd"
            elif isinstance(base, _ADAM_LIKE):
                kind = "adam"
            else:
                raise ValueError(f"kind='auto' does not know {type(base).__name__}; pass kind='sgd' (update "
                                 f"proportional to the gradient) or kind='adam' (update size independent of its scale)")
        self.power = _power(kind)
        named = dict(model.named_parameters())
        if params is not None:
            self.names = list(params)
            unknown = [n for n in self.names if n not in named]
            if unknown:
                raise ValueError(f"not parameters of the model: {unknown}")
        elif loss_fn is None:
            raise ValueError("pass loss_fn, inputs and target (to detect the scale-invariant parameters) or params")
        else:
            self.names = scale_invariant_parameters(model, loss_fn, inputs, target, scales=scales, rtol=rtol)
        self._params = {n: named[n] for n in self.names}
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self._params.items() if id(p) not in group_of]
        if missing:
            raise ValueError(f"parameters not in the optimizer: {missing}")
        self._groups = {n: group_of[id(p)] for n, p in self._params.items()}
        self.history: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _direction(self, p: torch.Tensor) -> torch.Tensor:
        p = p.detach()
        flat = p.reshape(-1).to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        return flat / _norm(p)

    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = {n: self._direction(p) for n, p in self._params.items()}

    def _post(self, optimizer, args, kwargs) -> None:
        norms = {n: _norm(p).item() for n, p in self._params.items()}
        self.history.append({
            "step": len(self.history) + 1,
            "elr": {n: float(self._groups[n]["lr"]) / norms[n] ** self.power for n in self.names},
            "norm": norms,
            "angular_step": {n: torch.linalg.vector_norm(self._direction(p) - self._before[n]).item()
                             for n, p in self._params.items()},
        })

    def remove(self) -> None:
        """Remove the optimizer hooks (logging stops; :attr:`history` stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
