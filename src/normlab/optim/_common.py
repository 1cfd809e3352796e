"""What every normlab optimizer shares: hyperparameter validation, gradient collection, state accounting,
and for the matrix-wise optimizers (SWAN, SinkGD) their routing rule, their Adam fallback and the
:class:`MatrixOptimizer` base that dispatches a param group to one or the other.

Validation follows ``torch.optim``: each hyperparameter is checked up front and a bad one raises
``ValueError("Invalid lr: -1")``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

__all__ = [
    "CheckedGroups", "MatrixOptimizer", "adam_fallback_step", "check_betas", "check_nonnegative", "check_positive", "grads_of",
    "optimizer_state_bytes", "reject_dtensor", "split_matrix_params",
]


def check_nonnegative(name: str, value: float) -> None:
    """``ValueError(f"Invalid {name}: {value}")`` unless ``0 <= value`` (NaN rejected)."""
    if not (isinstance(value, (int, float, torch.Tensor)) and 0.0 <= float(value)):
        raise ValueError(f"Invalid {name}: {value}")


def check_positive(name: str, value: float) -> None:
    """``ValueError(f"Invalid {name}: {value}")`` unless ``0 < value`` (NaN rejected)."""
    if not (isinstance(value, (int, float, torch.Tensor)) and 0.0 < float(value)):
        raise ValueError(f"Invalid {name}: {value}")


def check_betas(betas: Sequence[float]) -> None:
    """Each beta in ``[0, 1)``, as torch.optim.Adam checks them."""
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (need two values)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def reject_dtensor(p: torch.Tensor, optimizer: str) -> None:
    """A matrix-wise update of a ``DTensor`` shard would normalise the shard, not the matrix: refuse."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            raise TypeError(f"{optimizer} needs whole weight matrices, got a DTensor of shape {tuple(p.shape)} "
                            f"(FSDP2 shards); route this parameter to the Adam fallback or gather it")


def grads_of(params: Iterable[torch.Tensor], optimizer: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that have a gradient and their gradients; sparse gradients raise ``RuntimeError``."""
    with_grad, grads = [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{optimizer} does not support sparse gradients")
        with_grad.append(p)
        grads.append(p.grad)
    return with_grad, grads


def split_matrix_params(model: nn.Module, exclude: Sequence[str] | None = None
                        ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(matrix, fallback)``: the routing rule of the matrix-wise optimizers (SWAN, SinkGD).

    A parameter gets the matrix update iff it is the ``weight`` of an ``nn.Linear`` (or subclass) with both
    dimensions > 1 that is not excluded. By default the excluded module is the output head, the last
    ``nn.Linear`` in ``model.named_modules()`` order; ``exclude=[qualified names]`` replaces that default
    and excludes exactly the named modules (a name that matches no module raises ``ValueError``).
    Everything else -- embeddings, the head, norm gains, every bias, conv weights -- goes to the fallback.
    A tensor shared by several modules (a head tied to the embedding) is routed once, to the fallback.
    This is the paper's LLaMA recipe for SWAN (q, k, v, o, gate, up, down whitened; embedding, head and
    norms on Adam).
    """
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if exclude is None:
        excluded = set(linears[-1:])
    else:
        unknown = [name for name in exclude if name not in modules]
        if unknown:
            raise ValueError(f"exclude names no module: {unknown}; Linear modules: {linears}")
        excluded = set(exclude)
    candidates = {id(modules[name].weight) for name in linears
                  if name not in excluded and modules[name].weight.dim() == 2 and min(modules[name].weight.shape) > 1}
    owners: dict[int, set[int]] = {}  # tensor -> the distinct modules that hold it
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    matrix, fallback = [], []
    for p in model.parameters():
        (matrix if id(p) in candidates and len(owners[id(p)]) == 1 else fallback).append(p)
    return matrix, fallback


def adam_fallback_step(params: list[torch.Tensor], state: dict, *, lr: float, betas: tuple[float, float],
                       eps: float, weight_decay: float, decoupled: bool, foreach: bool | None) -> None:
    """One ``torch.optim.Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``) step on the
    fallback parameters of a matrix-wise optimizer, through torch's own functional Adam, so that it is
    bit-identical to the built-in. State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``)."""
    with_grad, grads = grads_of(params, "Adam fallback")
    if not with_grad:
        return
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in with_grad:
        st = state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    _torch_adam(with_grad, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach,
                has_complex=any(torch.is_complex(p) for p in with_grad), decoupled_weight_decay=decoupled,
                amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps,
                maximize=False)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (numel x element size), the memory benchmark's measure.

    Everything counts, also torch's 0-d ``step`` counters (4 bytes per parameter tensor in Adam/AdamW):
    Adam(W) holds ``8 x numel + 4 x (number of tensors)`` bytes for float32 parameters."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


class CheckedGroups(torch.optim.Optimizer):
    """An optimizer whose every param group is checked as it is added, by the constructor or by
    ``add_param_group`` alike (a group may override any default): :meth:`_check_group` raises
    ``ValueError``/``TypeError`` and the failing group is not kept."""

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise


class MatrixOptimizer(CheckedGroups):
    """Base of the matrix-wise optimizers (SWAN, SinkGD): one optimizer, one ``state``, two kinds of group.

    A param group whose option ``flag`` (``"use_swan"``, ``"use_sinkgd"``) is true gets the subclass's
    stateless matrix update, :meth:`_matrix_step`; every other group gets AdamW (Adam with decoupled weight
    decay) through :func:`adam_fallback_step` with the group's ``lr``, ``betas``, ``adam_eps``,
    ``weight_decay`` and ``foreach``. Subclasses check their defaults with :meth:`_validate` before calling
    ``super().__init__``; every group is checked again when it is added (a group may override any option).
    The tensors of a flagged group must pass :meth:`_is_matrix` (``ValueError`` naming the tensor otherwise)
    and must not be ``DTensor`` shards (``TypeError``).
    """

    name: str  # "SWAN"
    flag: str  # the group option, "use_swan"
    matrix_rule: str  # what a flagged tensor must be, for the error message
    helper: str  # the function that builds routed groups from a model, for the error message

    def _validate(self, options: dict) -> None:
        """``ValueError`` for the first invalid hyperparameter of ``options`` (the shared ones first)."""
        check_positive("lr", options["lr"])
        check_nonnegative("weight_decay", options["weight_decay"])
        check_betas(options["betas"])
        check_positive("adam_eps", options["adam_eps"])
        self._check_options(options)

    def _check_options(self, options: dict) -> None:
        raise NotImplementedError

    def _is_matrix(self, p: torch.Tensor) -> bool:
        raise NotImplementedError

    def _matrix_step(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> None:
        raise NotImplementedError

    def _check_group(self, group: dict) -> None:
        self._validate(group)
        if group[self.flag]:
            names = group.get("param_names") or [
                f"params[{i}] of param group {len(self.param_groups) - 1}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                reject_dtensor(p, self.name)
                if not self._is_matrix(p):
                    raise ValueError(f"{self.name} requires {self.matrix_rule}; route {name} (shape "
                                     f"{tuple(p.shape)}) to the Adam fallback ({self.flag}=False), or build "
                                     f"the groups with {self.helper}(model, lr)")

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` re-evaluates the model and returns the loss (returned here)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group[self.flag]:
                params, grads = grads_of(group["params"], self.name)
                self._matrix_step(params, grads, group)
            else:
                adam_fallback_step(group["params"], self.state, lr=group["lr"], betas=group["betas"],
                                   eps=group["adam_eps"], weight_decay=group["weight_decay"], decoupled=True,
                                   foreach=group["foreach"])
        return loss
