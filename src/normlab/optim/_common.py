"""What every normlab optimizer shares: hyperparameter validation, gradient collection, the routing
rule of the matrix-wise optimizers (SWAN, SinkGD) and their Adam fallback, and state accounting.

Validation follows ``torch.optim``: each hyperparameter is checked up front and a bad one raises
``ValueError("Invalid lr: -1")``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim.adam import adam as _torch_adam

__all__ = [
    "adam_fallback_step", "check_betas", "check_nonnegative", "check_positive", "grads_of",
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
    if type(p).__name__ == "DTensor":
        raise TypeError(f"{optimizer} needs whole weight matrices, got a DTensor shard of shape "
                        f"{tuple(p.shape)} (FSDP2); route this parameter to the Adam fallback or gather it")


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
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    matrix, fallback = [], []
    for p in model.parameters():
        (matrix if id(p) in candidates and owners[id(p)] == 1 else fallback).append(p)
    return matrix, fallback


def adam_fallback_step(params: list[torch.Tensor], state: dict, group: dict, *, lr: float,
                       betas: tuple[float, float], eps: float, weight_decay: float, decoupled: bool,
                       foreach: bool | None) -> None:
    """One ``torch.optim.Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``) step on the
    fallback parameters of a matrix-wise optimizer, through torch's own functional Adam, so that it is
    bit-identical to the built-in. State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``)."""
    del group
    with_grad, grads = grads_of(params, "Adam fallback")
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in with_grad:
        st = state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    if not with_grad:
        return
    _torch_adam(with_grad, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, amsgrad=False,
                beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
                decoupled_weight_decay=decoupled)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (numel x element size), the memory benchmark's measure."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
