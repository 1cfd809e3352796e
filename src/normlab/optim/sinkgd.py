"""SinkGD and multi-normalized gradient descent (MNGD).

Meyer Scetbon, Chao Ma, Wenbo Gong, Edward Meeds, "Gradient Multi-Normalization for Stateless and Scalable
LLM Training", 2025 (NeurIPS 2025 as "Gradient Multi-Normalization for Efficient LLM Training"),
arXiv:2502.06742. Official code: none published (``microsoft/msr_optim`` was announced); nothing here could
be checked against it.

MNGD normalises the gradient with respect to several norms at once by applying their normalization maps
P_1..P_K in turn, L times (:func:`multi_normalize`), then takes an SGD step; nothing is kept between steps.
SWAN is the instance K = 2, L = 1 with GradNorm and GradWhitening
(``multi_normalize(G, [grad_norm, grad_whitening], 1)``). SinkGD is the cheap instance: for a weight matrix
W of shape (m, n) as ``nn.Linear`` stores it (m = out_features rows, n = in_features columns) with gradient
G, the "square-root Sinkhorn" (:func:`sr_sinkhorn`) alternates a row and a column l2 normalization::

    X <- G;  repeat L times:  X <- sqrt(n) Q(X)^-1 X   (every row to l2 norm sqrt(n); Q = diag of row norms)
                              X <- sqrt(m) X R(X)^-1   (every column to l2 norm sqrt(m); R = diag of column norms)
    W <- W (1 - eta wd) - eta X,   eta = lr * matrix_lr_scale

With A = X * X (elementwise) the two steps are Sinkhorn scalings of A to row sums n and column sums m, so
X = D1 G D2 with positive diagonal D1, D2; for a G without zero rows or columns it converges to the scaling
with all row norms sqrt(n) and column norms sqrt(m): entries of RMS 1, like an Adam or sign update. After L
iterations the column norms are exact (the last step) and the row norms approximate. Each norm is clamped
below at ``eps`` (max(norm, eps), not norm + eps, so that small gradients stay scale invariant): a zero row
or column stays zero and an all-zero gradient gives a zero update. :func:`sr_sinkhorn` iterates on the
diagonal scalings D1, D2 (two matrix-vector products with A per iteration) and forms X once: O(m n) work and
one m x n float32 workspace per step (SWAN's whitening needs m x m matrices and O(m^2 n) work).

Routing is SWAN's (:func:`normlab.optim.split_matrix_params`): groups flagged ``use_sinkgd=True`` (the
default) get the update above and keep no state; ``use_sinkgd=False`` groups get AdamW (torch's own
functional Adam, decoupled decay) at the group's ``lr`` in the same optimizer and ``state_dict``;
:func:`sinkgd_param_groups` builds the two groups. A 1-D tensor in a SinkGD group raises ``ValueError``;
a ``DTensor`` (an FSDP2 shard) raises ``TypeError`` rather than normalise a shard. A 1 x n (or m x 1) matrix
is well defined, if unusual: its fixed point is sign(G), i.e. sign descent (the routing sends such Linears
to Adam).

Defaults: num_iters (L) 5 and matrix_lr_scale 0.05 are what the public re-implementations of the paper's
LLaMA recipe use (not verified against official code); L = 1 is cheaper and slightly worse in the paper's
ablation. The scale is a large-model setting: on a small model tune it (the claim check uses 1 to 10).
eps 1e-8, no weight decay (the paper has none), fallback Adam betas (0.9, 0.999) and eps 1e-8.

Deviations, honestly: (1) The math runs in float32 for float16/bfloat16 parameters (float64 for float64
ones): squares of 4096 entries overflow float16. (2) Optional decoupled weight decay, scaled by the matrix
lr. (3) ``naubull2/sinkgd-pytorch`` normalises rows and columns to norm 1 (no sqrt(n), sqrt(m)), an update
of entry RMS 1/sqrt(m) instead of 1; normlab follows the paper's sqrt(n) / sqrt(m) form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ._common import MatrixOptimizer, check_positive, split_matrix_params

__all__ = ["SinkGD", "column_normalize", "multi_normalize", "row_normalize", "sinkgd", "sinkgd_param_groups",
           "sr_sinkhorn"]


def multi_normalize(x: torch.Tensor, projections: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                    num_iters: int) -> torch.Tensor:
    """MNGD's alternating scheme: apply each normalization map of ``projections`` in turn, ``num_iters`` times."""
    for _ in range(num_iters):
        for project in projections:
            x = project(x)
    return x


def row_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Every row of ``x`` (m, n) scaled to l2 norm sqrt(n) (row norms clamped below at ``eps``)."""
    return x * (math.sqrt(x.shape[-1]) / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps))


def column_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Every column of ``x`` (m, n) scaled to l2 norm sqrt(m) (column norms clamped below at ``eps``)."""
    return x * (math.sqrt(x.shape[-2]) / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(eps))


def sr_sinkhorn(x: torch.Tensor, num_iters: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """SinkGD's square-root Sinkhorn of a 2-D ``x``: :func:`row_normalize` then :func:`column_normalize`,
    ``num_iters`` times, i.e. ``multi_normalize(x, [row_normalize, column_normalize], num_iters)``.

    Computed on the diagonal scalings of ``X = D1 G D2``: with ``A = G * G`` the row norms of ``X`` are
    ``d1 * sqrt(A d2^2)`` and its column norms ``d2 * sqrt(A^T d1^2)``, so each half-step is one
    matrix-vector product with ``A`` and the m x n result is formed once, in ``A``'s buffer (one m x n
    workspace). Same clamps as the two maps; a zero row or column keeps scale 0. Equal to the alternating
    maps up to rounding (1e-14 in float64) and about 4x faster on CPU."""
    if x.dim() != 2:
        raise ValueError(f"sr_sinkhorn expects a 2-D matrix, got shape {tuple(x.shape)}")
    m, n = x.shape
    a = x.square()
    d1, d2 = x.new_ones(m), x.new_ones(n)
    for _ in range(num_iters):
        norms = d1 * torch.mv(a, d2.square()).sqrt()
        d1 = torch.where(norms > 0, d1 * (math.sqrt(n) / norms.clamp_min(eps)), 0.0)
        norms = d2 * torch.mv(a.mT, d1.square()).sqrt()
        d2 = torch.where(norms > 0, d2 * (math.sqrt(m) / norms.clamp_min(eps)), 0.0)
    return torch.mul(x, d1[:, None], out=a).mul_(d2)


def sinkgd(params: list[torch.Tensor], grads: list[torch.Tensor], *, lr: float, weight_decay: float,
           num_iters: int, eps: float) -> None:
    """Functional SinkGD step on weight matrices: ``p <- p (1 - lr wd) - lr sr_sinkhorn(g)``, in place, the
    normalization in float32 at least. ``lr`` is the matrix lr (the optimizer passes ``lr * matrix_lr_scale``)."""
    for p, g in zip(params, grads):
        d = sr_sinkhorn(g.to(torch.promote_types(g.dtype, torch.float32)), num_iters, eps)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.add_(d, alpha=-lr)


class SinkGD(MatrixOptimizer):
    """SinkGD: stateless SGD on the square-root-Sinkhorn-normalized gradient of weight matrices, AdamW on
    every other group.

    Args:
        params: tensors or param groups. A group option ``use_sinkgd`` (default ``True``) selects the
            update; build the paper's routing with :func:`sinkgd_param_groups`.
        lr: learning rate of the Adam-fallback groups; SinkGD groups step with ``lr * matrix_lr_scale``.
        matrix_lr_scale: multiplier of ``lr`` for the SinkGD groups (alpha).
        num_iters: SR-Sinkhorn iterations (L), an int >= 1.
        eps: lower clamp of every row and column norm.
        weight_decay: decoupled decay ``p <- p (1 - lr' wd)`` with the group's step lr ``lr'``.
        betas, adam_eps: AdamW's ``betas`` and ``eps`` for the fallback groups.
        foreach: passed to torch's Adam for the fallback groups (the SinkGD update is per matrix).
    """

    name, flag, helper = "SinkGD", "use_sinkgd", "sinkgd_param_groups"
    matrix_rule = "2-D weight matrices"

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 matrix_lr_scale: float = 0.05, num_iters: int = 5, eps: float = 1e-8, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, *,
                 foreach: bool | None = None) -> None:
        defaults = {"lr": lr, "matrix_lr_scale": matrix_lr_scale, "num_iters": num_iters, "eps": eps,
                    "weight_decay": weight_decay, "betas": tuple(betas), "adam_eps": adam_eps,
                    "use_sinkgd": True, "foreach": foreach}
        self._validate(defaults)
        super().__init__(params, defaults)

    def _check_options(self, options: dict) -> None:
        check_positive("matrix_lr_scale", options["matrix_lr_scale"])
        iters = options["num_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"Invalid num_iters: {iters} (an int >= 1)")
        check_positive("eps", options["eps"])

    def _is_matrix(self, p: torch.Tensor) -> bool:
        return p.dim() == 2

    def _matrix_step(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> None:
        sinkgd(params, grads, lr=group["lr"] * group["matrix_lr_scale"], weight_decay=group["weight_decay"],
               num_iters=group["num_iters"], eps=group["eps"])


def sinkgd_param_groups(model: nn.Module, lr: float, exclude: Sequence[str] | None = None, *,
                        weight_decay: float = 0.0) -> list[dict]:
    """The paper's routing as two param groups for :class:`SinkGD` (the same split as
    :func:`normlab.optim.swan_param_groups`, from :func:`normlab.optim.split_matrix_params`):
    ``use_sinkgd=True`` for the weight of every ``nn.Linear`` with both dimensions > 1 except the head (the
    last Linear registered, or the modules named in ``exclude``), ``use_sinkgd=False`` (Adam) for the rest.
    ``weight_decay`` goes to the SinkGD group only."""
    matrix, fallback = split_matrix_params(model, exclude)
    return [{"params": matrix, "use_sinkgd": True, "lr": lr, "weight_decay": weight_decay},
            {"params": fallback, "use_sinkgd": False, "lr": lr, "weight_decay": 0.0}]
