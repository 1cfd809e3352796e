"""Core: online test-time adaptation of the BatchNorm affine parameters on top of alpha-BN.

Paper: Fuming You, Jingjing Li, Zhou Zhao, "Test-time Batch Statistics Calibration for Covariate Shift",
2021, arXiv:2110.04065 (alpha-BN and Core). No official code was found.

**The loss here is a reconstruction, not the paper's verified formula.** The paper's text and code could
not be retrieved while this was written; what is known is that Core optimizes a loss on the pairwise class
correlations of the batch predictions, rewarding within-class and penalizing between-class correlation.
normlab's reconstruction (the spec sheet's, used in its prototype), for softmax outputs ``P`` ``(B, K)``:

    S = P^T P                                   (K, K) class-correlation matrix
    normalize="row":  S_ij <- S_ij / sum_j S_ij,   L = (1/K) sum_{i != j} S_ij = (1/K)(sum(S) - tr(S))
    normalize="none": L = (1/(K B)) sum_{i != j} S_ij

With ``"row"``, L is 0 for confident predictions that give distinct samples distinct classes and
``(K - 1)/K`` for uniform predictions. No numerical parity with the paper is claimed.

Loop (:class:`Core`), one incoming test batch at a time: the model (every BatchNorm converted to
:class:`~normlab.layers.alpha_bn.AlphaBatchNorm` with ``alpha``, in eval mode) predicts, the prediction is
returned, then ``steps_per_batch`` optimizer steps on the loss update only the BatchNorm affine
parameters (everything else frozen); parameters and optimizer state carry over to the next batch.

Defaults (the spec sheet): ``alpha=0.9``, Adam with lr 1e-3, one step per batch, ``normalize="row"``.
The loss is pluggable (``loss=``: any function of the probabilities ``(B, K)``, e.g. the entropy for
Tent, Wang et al. 2021, or ``functools.partial(pairwise_class_correlation_loss, normalize="none")``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..convert.swap import to_alpha_bn
from ..layers.alpha_bn import AlphaBatchNorm

__all__ = ["Core", "pairwise_class_correlation_loss"]

NORMALIZE = ("row", "none")


def pairwise_class_correlation_loss(probs: torch.Tensor, normalize: str = "row") -> torch.Tensor:
    """Between-class correlation of the predictions ``probs`` ``(B, K)`` (rows summing to 1), the
    reconstructed Core loss (see the module docstring): ``(1/K) sum_{i != j} S_ij`` of the row-normalized
    ``S = probs^T probs`` (``normalize="row"``), or ``sum_{i != j} S_ij / (K B)`` (``"none"``). A class that
    no sample predicts (a zero row of ``S``) contributes 0. In float32 for half input."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor, got {getattr(probs, 'dtype', type(probs).__name__)}")
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (B, K) with B, K > 0, got {tuple(probs.shape)}")
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    batch, classes = probs.shape
    s = probs.T @ probs
    if normalize == "row":
        s = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return (s.sum() - s.diagonal().sum()) / classes
    return (s.sum() - s.diagonal().sum()) / (classes * batch)


class Core:
    """Online test-time adaptation: ``Core(model, alpha=0.9, optimizer_factory=lambda p:
    torch.optim.Adam(p, 1e-3), steps_per_batch=1, inplace=False, *, loss=pairwise_class_correlation_loss)``.

    ``core(x)`` returns the logits of ``x`` (detached), computed before adapting, then takes
    ``steps_per_batch`` optimizer steps on ``loss(softmax(logits))``. ``core.model`` is the adapted model:
    with ``inplace=False`` a deep copy of ``model`` (the caller's model is never modified), with
    ``inplace=True`` ``model`` itself. Either way it has every BatchNorm converted by
    :func:`normlab.convert.to_alpha_bn` (existing ``AlphaBatchNorm`` layers get ``alpha``), only the
    ``AlphaBatchNorm`` affine parameters trainable (``requires_grad``), and stays in eval mode.
    ``reset()`` restores those parameters and the optimizer state to how they were at construction.
    ``ValueError`` for a model without BatchNorm affine parameters."""

    def __init__(self, model: nn.Module, alpha: float = 0.9,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] =
                 lambda p: torch.optim.Adam(p, 1e-3),
                 steps_per_batch: int = 1, inplace: bool = False, *,
                 loss: Callable[[torch.Tensor], torch.Tensor] = pairwise_class_correlation_loss) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(steps_per_batch, bool) or not isinstance(steps_per_batch, int) or steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be a positive int, got {steps_per_batch!r}")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        if not inplace:
            model = copy.deepcopy(model)
        to_alpha_bn(model, alpha)
        params = list(self._affine_parameters(model.modules()))
        if not params:
            raise ValueError("Core needs a model with BatchNorm layers that have affine parameters; found none")
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.model = model.eval()
        self.alpha, self.steps_per_batch, self.loss = float(alpha), steps_per_batch, loss
        self.optimizer = optimizer_factory(params)
        self._params = params
        self._initial_params = [p.detach().clone() for p in params]
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict())

    @staticmethod
    def _affine_parameters(modules: Iterable[nn.Module]) -> Iterable[nn.Parameter]:
        for module in modules:
            if isinstance(module, AlphaBatchNorm) and module.affine:
                yield module.weight
                yield module.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ``x`` (logits, detached), then adapt on it (with gradients on, also inside
        ``torch.no_grad()``)."""
        self.model.eval()
        prediction = None
        with torch.enable_grad():
            for _ in range(self.steps_per_batch):
                logits = self.model(x)
                if prediction is None:
                    prediction = logits.detach()
                loss = self.loss(logits.float().softmax(-1))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return prediction

    def reset(self) -> None:
        """Restore the initial affine parameters and optimizer state."""
        with torch.no_grad():
            for p, p0 in zip(self._params, self._initial_params):
                p.copy_(p0)
        self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer))
