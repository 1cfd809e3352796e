"""SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training.

Chao Ma, Wenbo Gong, Meyer Scetbon, Edward Meeds, 2024 (ICML 2025), arXiv:2412.13148. Official code:
announced as ``microsoft/msr_optim``, not published; nothing here could be checked against it.

For a weight matrix W of shape (m, n) as ``nn.Linear`` stores it (m = out_features rows, n = in_features
columns) with gradient G, one step keeps no state at all::

    GradNorm       G~[r, j] = (G[r, j] - mu_r) / (s_r + eps)      mu_r, s_r: mean and population std of row r
    GradWhitening  D = (G~ G~^T)^(-1/2) G~ = U V^T                 (G~ = U S V^T, thin SVD)
    rescale        D <- sqrt(m n) D / ||D||_F                      (RMS 1 per entry)
    step           W <- W (1 - eta wd) - eta D,                    eta = lr * matrix_lr_scale

GradWhitening runs on the side with the smaller Gram matrix (G~^T when m >= n, transposed back) with the
coupled Newton-Schulz iteration for the inverse square root on X = G~ / (||G~||_F + eps)::

    Y = X X^T, Z = I;  repeat ns_steps times:  T = beta (3 I - Z Y);  Y <- Y T;  Z <- T Z;   D = Z X

With beta = 1/2 (the classical iteration) Z -> (X X^T)^(-1/2) quadratically. An eigenvalue u = lambda z^2
follows u <- beta^2 (3 - u)^2 u, whose fixed point is stable only for 1/3 < beta < 2/3, so other values are
refused (beta = 0.8, seen in re-implementations, oscillates and never reaches U V^T).
``whitening="svd"`` computes U V^T exactly; ``"none"`` is the GradNorm-only ablation.

Routing: the paper whitens the Linear weights of the transformer blocks and trains the embedding, the LM
head and the norms with Adam. Groups flagged ``use_swan=True`` (the default) get the update above and keep
no state; groups with ``use_swan=False`` get AdamW (torch's own functional Adam, decoupled decay) at the
group's ``lr``, in the same optimizer and ``state_dict``. :func:`swan_param_groups` builds the two groups
with the rule shared with SinkGD (:func:`normlab.optim.split_matrix_params`: the weight of every
``nn.Linear`` with both dimensions > 1 except the head, i.e. the last Linear registered, or ``exclude=``).
A 1-D tensor, or a matrix with a dimension of 1 (GradNorm over one entry is undefined), in a SWAN group
raises ``ValueError``; a ``DTensor`` (an FSDP2 shard) raises ``TypeError`` rather than whiten a shard.
Under DistributedDataParallel every rank whitens the same all-reduced gradient, so ranks stay identical.

Defaults (from the spec sheet): ns_steps 10, ns_beta 0.5, rescale on, eps 1e-8, matrix_lr_scale 1.0
(re-implementations use 0.05-0.25 at LLaMA scale: tune it), no weight decay (the paper's benchmark uses
none), fallback Adam betas (0.9, 0.999) and eps 1e-8. Third-party code also uses (beta, k) = (0.5, 6).

Deviations, honestly: (1) The paper defines GradNorm on an abstract m x n matrix and does not say which axis
of an ``nn.Linear`` weight it means; re-implementations differ. normlab standardises each row of the
(out, in) weight over its inputs: a per-row constant is removed, a per-column one is not. (2) The math runs
in float32 for float16/bfloat16 parameters (float64 for float64 ones); the paper keeps bf16 weights and
whitens in fp32. (3) Weight decay is decoupled and scaled by the matrix lr; the paper has none. (4) An
all-zero gradient gives a zero update (no 0/0): the weight only decays. (5) Pseudo-inverse on singular
Grams: a row-centred G~ has G~ 1 = 0, so for m >= n the column Gram is singular along 1. Plain Newton-Schulz
amplifies the rounding noise along it (1.5x per step, 2.25x where rounding makes the eigenvalue negative:
float32 square layers reached NaN by k = 40); normlab adds 1 1^T / n to that Gram, which makes the direction
a fixed point and changes nothing else (see :func:`grad_whitening`, ``centered=True``). The SVD mode drops
singular values below max(m, n) * machine-eps * sigma_max (``torch.linalg.pinv``'s rank tolerance); the
sheet's eps * sigma_max = 1e-8 sigma_max lies below float32 rounding and kept that noise direction at
full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._common import MatrixOptimizer, check_positive, split_matrix_params

__all__ = ["SWAN", "WHITENINGS", "grad_norm", "grad_whitening", "grad_whitening_svd", "swan", "swan_direction",
           "swan_param_groups"]

WHITENINGS = ("newton_schulz", "svd", "none")


def grad_norm(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """GradNorm: each row of ``grad`` (m, n) minus its mean, divided by its population std plus ``eps``.

    Rows get mean 0 and variance 1, so the result has Frobenius norm sqrt(m n); a constant row becomes 0."""
    std, mean = torch.std_mean(grad, dim=-1, correction=0, keepdim=True)
    return (grad - mean) / (std + eps)


def grad_whitening(grad: torch.Tensor, steps: int = 10, beta: float = 0.5, eps: float = 1e-8, *,
                   centered: bool = False) -> torch.Tensor:
    """GradWhitening by coupled Newton-Schulz: ``(G G^T)^{-1/2} G`` (= ``U V^T``) of a 2-D ``grad``,
    computed on the Gram matrix of the shorter side (the columns' when square), in ``grad``'s dtype.

    ``centered=True`` declares rows that sum to zero (``G 1 = 0``, as after :func:`grad_norm`). When the
    Gram is the column side (m >= n) its null direction is then known, ``1 / sqrt(n)``; adding ``1 1^T / n``
    to it makes that eigenvalue 1, a fixed point of the iteration, so the result is the pseudo-inverse
    ``U V^T`` over the other directions. Without it the iteration grows along that direction by 1.5 per step
    (by 2.25 where rounding makes its eigenvalue negative), amplifying the rounding noise and, for many
    steps in float32, diverging."""
    if grad.dim() != 2:
        raise ValueError(f"grad_whitening expects a 2-D matrix, got shape {tuple(grad.shape)}")
    transposed = grad.shape[0] >= grad.shape[1]
    x = grad.mT if transposed else grad
    x = x / (torch.linalg.matrix_norm(x) + eps)  # Gram spectrum in [0, 1]
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    y, z = x @ x.mT, eye
    if centered and transposed:
        y = y + 1.0 / x.shape[0]
    for _ in range(steps):
        t = torch.addmm(eye, z, y, beta=3.0 * beta, alpha=-beta)  # T = beta (3 I - Z Y)
        y, z = y @ t, t @ z
    out = z @ x
    return out.mT if transposed else out


def grad_whitening_svd(grad: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """GradWhitening computed exactly: ``U V^T`` from the thin SVD of a 2-D ``grad``. Singular directions
    with ``sigma <= rtol * sigma_max`` are dropped (a pseudo-inverse square root; a zero matrix stays zero);
    ``rtol`` defaults to ``max(m, n) * finfo(dtype).eps``, the rank tolerance of ``torch.linalg.pinv``."""
    if grad.dim() != 2:
        raise ValueError(f"grad_whitening_svd expects a 2-D matrix, got shape {tuple(grad.shape)}")
    if rtol is None:
        rtol = max(grad.shape) * torch.finfo(grad.dtype).eps
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    keep = (s > rtol * s[:1]).to(grad.dtype)
    return (u * keep) @ vh


def swan_direction(grad: torch.Tensor, *, whitening: str = "newton_schulz", ns_steps: int = 10,
                   ns_beta: float = 0.5, rescale: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """The SWAN update direction of one gradient matrix: GradNorm, GradWhitening, rescale to
    ``||.||_F = sqrt(m n)``. Computed in float32 at least (float64 stays float64)."""
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    d = grad_norm(g, eps)
    if whitening == "newton_schulz":
        d = grad_whitening(d, ns_steps, ns_beta, eps, centered=True)
    elif whitening == "svd":
        d = grad_whitening_svd(d)
    elif whitening != "none":
        raise ValueError(f"Invalid whitening: {whitening!r}; valid: {list(WHITENINGS)}")
    if rescale:
        d = d * (math.sqrt(d.numel()) / torch.linalg.matrix_norm(d).clamp_min(eps))
    return d


def swan(params: list[torch.Tensor], grads: list[torch.Tensor], *, lr: float, weight_decay: float,
         whitening: str, ns_steps: int, ns_beta: float, rescale: bool, eps: float) -> None:
    """Functional SWAN step on weight matrices: ``p <- p (1 - lr wd) - lr swan_direction(g)``, in place.
    ``lr`` is the matrix lr (the optimizer passes ``lr * matrix_lr_scale``)."""
    for p, g in zip(params, grads):
        d = swan_direction(g, whitening=whitening, ns_steps=ns_steps, ns_beta=ns_beta, rescale=rescale, eps=eps)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.add_(d, alpha=-lr)


class SWAN(MatrixOptimizer):
    """SWAN: stateless GradNorm + GradWhitening SGD on weight matrices, AdamW on every other group.

    Args:
        params: tensors or param groups. A group option ``use_swan`` (default ``True``) selects the
            update; build the paper's routing with :func:`swan_param_groups`.
        lr: learning rate of the Adam-fallback groups; SWAN groups step with ``lr * matrix_lr_scale``.
        matrix_lr_scale: multiplier of ``lr`` for the SWAN groups.
        ns_steps: Newton-Schulz iterations (k).
        ns_beta: Newton-Schulz coefficient, in (1/3, 2/3) (the iteration diverges from U V^T outside).
        rescale: rescale the update to ``||.||_F = sqrt(m n)`` (RMS 1 per entry).
        eps: added to each row std and to ``||G~||_F``; lower clamp of ``||D||_F`` in the rescale.
        weight_decay: decoupled decay ``p <- p (1 - lr' wd)`` with the group's step lr ``lr'``.
        betas, adam_eps: AdamW's ``betas`` and ``eps`` for the fallback groups.
        whitening: ``"newton_schulz"`` (default), ``"svd"`` (exact ``U V^T``) or ``"none"`` (GradNorm only).
        foreach: passed to torch's Adam for the fallback groups (the SWAN update is per matrix).
    """

    name, flag, helper = "SWAN", "use_swan", "swan_param_groups"
    matrix_rule = "2-D weight matrices with both dimensions > 1"

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 matrix_lr_scale: float = 1.0, ns_steps: int = 10, ns_beta: float = 0.5, rescale: bool = True,
                 eps: float = 1e-8, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, whitening: str = "newton_schulz", *, foreach: bool | None = None) -> None:
        defaults = {"lr": lr, "matrix_lr_scale": matrix_lr_scale, "ns_steps": ns_steps, "ns_beta": ns_beta,
                    "rescale": rescale, "eps": eps, "weight_decay": weight_decay, "betas": tuple(betas),
                    "adam_eps": adam_eps, "whitening": whitening, "use_swan": True, "foreach": foreach}
        self._validate(defaults)
        super().__init__(params, defaults)

    def _check_options(self, options: dict) -> None:
        check_positive("matrix_lr_scale", options["matrix_lr_scale"])
        steps = options["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Invalid ns_steps: {steps} (an int >= 1)")
        if not 1 / 3 < options["ns_beta"] < 2 / 3:
            raise ValueError(f"Invalid ns_beta: {options['ns_beta']} (Newton-Schulz converges to U V^T only for "
                             "1/3 < beta < 2/3; 0.5 is the classical iteration)")
        check_positive("eps", options["eps"])
        if options["whitening"] not in WHITENINGS:
            raise ValueError(f"Invalid whitening: {options['whitening']!r}; valid: {list(WHITENINGS)}")

    def _is_matrix(self, p: torch.Tensor) -> bool:
        return p.dim() == 2 and min(p.shape) > 1

    def _matrix_step(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> None:
        swan(params, grads, lr=group["lr"] * group["matrix_lr_scale"], weight_decay=group["weight_decay"],
             whitening=group["whitening"], ns_steps=group["ns_steps"], ns_beta=group["ns_beta"],
             rescale=group["rescale"], eps=group["eps"])


def swan_param_groups(model: nn.Module, lr: float, exclude: Sequence[str] | None = None, *,
                      weight_decay: float = 0.0) -> list[dict]:
    """The paper's routing as two param groups for :class:`SWAN`: ``use_swan=True`` for the weight of every
    ``nn.Linear`` with both dimensions > 1 except the head (the last Linear registered, or the modules named
    in ``exclude``, which replaces that default), ``use_swan=False`` (Adam) for everything else; see
    :func:`normlab.optim.split_matrix_params`. ``weight_decay`` goes to the SWAN group only."""
    matrix, fallback = split_matrix_params(model, exclude)
    return [{"params": matrix, "use_swan": True, "lr": lr, "weight_decay": weight_decay},
            {"params": fallback, "use_swan": False, "lr": lr, "weight_decay": 0.0}]
