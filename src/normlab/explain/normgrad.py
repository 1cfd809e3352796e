"""NormGrad and its extract/aggregate family of backprop saliency maps, with meta-saliency.

Paper: Rebuffi, Fong, Ji, Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency Methods",
CVPR 2020 (arXiv 2004.02866); precursor "NormGrad: Finding the Pixels that Matter for Training"
(arXiv 1910.08823). Official code: ``srebuffi/revisiting_saliency`` (``*_grid_saliency.py``, class
``Extract_Aggregate``) and the authors' TorchRay fork (``ruthcfong/TorchRay``, branch ``normgrad``:
``norm_grad.py``, ``meta_saliency.py``). Re-implemented here; neither is a dependency.

At a chosen layer with output ``x (N, C, h, w)`` and ``g = d logit_t / dx`` (the gradient of the raw target
logit; default target the argmax logit), both detached, a *virtual identity layer* inserted after the layer
has a parameter gradient that is a sum over locations ``u`` of per-location contributions ``e_u``
(phase 1, ``phase1=``):

- ``conv1x1``: virtual 1x1 identity conv, ``e_u = x_u g_u^T`` (C x C);
- ``conv3x3``: virtual 3x3 identity conv, ``e_u = unfold(x)_u g_u^T`` (9C x C; zero padding, channel-major);
- ``conv3x3_depthwise``: ``e_u[c, j] = unfold(x)_u[c, j] g_u[c]`` (C x 9);
- ``scaling``: virtual per-channel scale, ``e_u = x_u * g_u`` (C; "gradient x activation");
- ``bias``: virtual bias, ``e_u = g_u`` (C; the plain gradient).

Phase 2 (``phase2=``) reduces ``e_u`` to one number per location: ``norm`` (Frobenius), ``filter_norm``
(norm of ``max(e_u, 0)``), ``sum``, ``max``. For the outer-product extractors nothing C x C is ever built:
``||a b^T|| = ||a|| ||b||``, ``||max(a b^T, 0)|| = sqrt(||a+||^2 ||b+||^2 + ||a-||^2 ||b-||^2)``,
``sum(a b^T) = sum(a) sum(b)`` and ``max(a b^T)`` is the largest of the four products of the extremes of a
and b. **NormGrad** is ``conv1x1`` + ``norm`` = ``||x_u|| ||g_u||``; :data:`PRESETS` names the others
(``normgrad_selective`` = ``scaling`` + ``filter_norm`` as in TorchRay's ``norm_grad_selective``; the
grid script's ``conv1x1`` + ``filter_norm`` is available through ``phase1``/``phase2``).

Post-processing (official grid script): each layer's map is upsampled bilinearly to the input size
(``align_corners=False``) and min-max normalised per image; a constant map becomes zeros (the official code
divides by zero). Several layers (``layers=[...]``) are combined by the elementwise product of their
normalised maps (official); ``combine="mean"`` (their mean) is our addition. A layer whose map is constant
makes the product zero, which warns. ``upsample=False`` returns the raw map of one layer at its own
resolution (no normalisation). ``layers="auto"`` hooks the output of the last ``nn.Conv2d``; to explain the
tensor a pooling head reads, name the activation module after it. Maps are computed in float32 for
half-precision models. One forward and one ``torch.autograd.grad`` per call, the model in eval mode (its
flags restored), its parameters and ``.grad`` untouched.

Meta-saliency (:func:`meta_saliency`, TorchRay ``meta_saliency``): one plain SGD step (no momentum, no weight
decay) with learning rate ``lr`` on the cross-entropy of the target class (``-CE`` with
``negate_loss=True``) in eval mode, the saliency computed with the updated weights, the weights restored
bit-exactly. Deviation: TorchRay takes one step on the batch-mean loss; we take one step per image (a Python
loop over the batch), so a batch gives the same maps as its images one at a time, as the paper computes
them. ``lr`` is scale-dependent: 1e-4 is TorchRay's default for ImageNet models; the digits CNN of the claim
check needs 0.03-0.1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._model_state import eval_mode
from ._capture import (LayerCapture, LayerSpec, at_least_float32, check_images, normalize_minmax,
                       resolve_layers, select_target, upsample)

PHASE1 = ("conv1x1", "conv3x3", "conv3x3_depthwise", "scaling", "bias")
PHASE2 = ("norm", "filter_norm", "sum", "max")
COMBINE = ("product", "mean")
PRESETS = {
    "normgrad": ("conv1x1", "norm"),
    "normgrad_selective": ("scaling", "filter_norm"),
    "gradient": ("bias", "norm"),
    "gradient_x_activation": ("scaling", "sum"),
}

SaliencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _unfold3x3(x: torch.Tensor) -> torch.Tensor:
    """``F.unfold(x, 3, padding=1)`` as ``(N, 9C, h, w)``, channel-major (``c * 9 + kernel_pos``)."""
    n, c, h, w = x.shape
    return F.unfold(x, 3, padding=1).view(n, 9 * c, h, w)


def _aggregate_outer(a: torch.Tensor, b: torch.Tensor, phase2: str) -> torch.Tensor:
    """``phase2`` of ``e_u = a_u b_u^T`` for ``a (N, P, h, w)``, ``b (N, Q, h, w)``, without building e_u."""
    if phase2 == "norm":
        return a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)
    if phase2 == "filter_norm":
        ap, an, bp, bn = a.clamp_min(0), a.clamp_max(0), b.clamp_min(0), b.clamp_max(0)
        sq = lambda t: t.square().sum(dim=1, keepdim=True)  # noqa: E731
        return (sq(ap) * sq(bp) + sq(an) * sq(bn)).sqrt()
    if phase2 == "sum":
        return a.sum(dim=1, keepdim=True) * b.sum(dim=1, keepdim=True)
    amax, amin = a.amax(dim=1, keepdim=True), a.amin(dim=1, keepdim=True)
    bmax, bmin = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    return torch.maximum(torch.maximum(amax * bmax, amax * bmin), torch.maximum(amin * bmax, amin * bmin))


def _aggregate(e: torch.Tensor, phase2: str) -> torch.Tensor:
    """``phase2`` over dim 1 of explicit contributions ``e (N, K, h, w)``."""
    if phase2 == "norm":
        return e.norm(dim=1, keepdim=True)
    if phase2 == "filter_norm":
        return e.clamp_min(0).norm(dim=1, keepdim=True)
    if phase2 == "sum":
        return e.sum(dim=1, keepdim=True)
    return e.amax(dim=1, keepdim=True)


def extract_aggregate(activation: torch.Tensor, gradient: torch.Tensor, phase1: str = "conv1x1",
                      phase2: str = "norm") -> torch.Tensor:
    """The raw map ``(N, 1, h, w)`` of ``phase1`` + ``phase2`` from a layer's output and its gradient."""
    _check_phases(phase1, phase2)
    if activation.shape != gradient.shape or activation.dim() != 4:
        raise ValueError(f"activation and gradient must be 4-D of one shape, got {tuple(activation.shape)} and "
                         f"{tuple(gradient.shape)}")
    x, g = at_least_float32(activation), at_least_float32(gradient)
    if phase1 == "conv1x1":
        return _aggregate_outer(x, g, phase2)
    if phase1 == "conv3x3":
        return _aggregate_outer(_unfold3x3(x), g, phase2)
    if phase1 == "conv3x3_depthwise":
        n, c, h, w = x.shape
        e = _unfold3x3(x).view(n, c, 9, h, w) * g[:, :, None]
        return _aggregate(e.view(n, 9 * c, h, w), phase2)
    if phase1 == "scaling":
        return _aggregate(x * g, phase2)
    return _aggregate(g, phase2)


def _check_phases(phase1: str, phase2: str) -> None:
    if phase1 not in PHASE1:
        raise ValueError(f"unknown phase1 {phase1!r}; valid: {list(PHASE1)}")
    if phase2 not in PHASE2:
        raise ValueError(f"unknown phase2 {phase2!r}; valid: {list(PHASE2)}")


def _last_conv(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError('layers="auto" needs an nn.Conv2d in the model; name the layer(s) to explain')
    return names[-1]


class NormGrad:
    """NormGrad (and the rest of the extract/aggregate family) of ``model`` at ``layers``.

    ``NormGrad(model, layers="auto", phase1="conv1x1", phase2="norm", upsample=True, combine="product")``;
    ``__call__(x, target=None) -> Tensor (N, 1, H, W)`` (in [0, 1] when ``upsample``). ``layers`` is a module
    name, a module, or a sequence of them (maps combined by ``combine``). See the module docstring.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec] = "auto",
                 phase1: str = "conv1x1", phase2: str = "norm", upsample: bool = True,
                 combine: str = "product") -> None:
        _check_phases(phase1, phase2)
        if combine not in COMBINE:
            raise ValueError(f"unknown combine {combine!r}; valid: {list(COMBINE)}")
        self.model = model
        self.layers = resolve_layers(model, _last_conv(model) if isinstance(layers, str) and layers == "auto"
                                     else layers)
        if not upsample and len(self.layers) > 1:
            raise ValueError(f"combining {len(self.layers)} layers needs upsample=True (maps of one size)")
        self.phase1, self.phase2, self.upsample, self.combine = phase1, phase2, upsample, combine

    @classmethod
    def from_preset(cls, model: nn.Module, preset: str, **kwargs) -> NormGrad:
        """A :data:`PRESETS` entry (e.g. ``"normgrad_selective"``); ``kwargs`` as for the constructor."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {list(PRESETS)}")
        phase1, phase2 = PRESETS[preset]
        return cls(model, phase1=phase1, phase2=phase2, **kwargs)

    def __call__(self, x: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
        with LayerCapture(self.model, [module for _, module in self.layers]) as cap:
            _, _, acts, grads = cap.run(x, target)
        maps = [extract_aggregate(a, g, self.phase1, self.phase2) for a, g in zip(acts, grads)]
        if not self.upsample:
            return maps[0]
        maps = [normalize_minmax(upsample(m, x.shape[-2:])) for m in maps]
        if len(maps) == 1:
            return maps[0]
        if self.combine == "mean":
            return torch.stack(maps).mean(dim=0)
        zero = [name for (name, _), m in zip(self.layers, maps) if (m.flatten(1).amax(dim=1) == 0).any()]
        if zero:
            warnings.warn(f"NormGrad: the map of layer(s) {zero} is constant for some image(s), so the product "
                          "over layers is zero there", RuntimeWarning, stacklevel=2)
        return torch.stack(maps).prod(dim=0)

    def __repr__(self) -> str:
        return (f"NormGrad(layers={[name for name, _ in self.layers]}, phase1={self.phase1!r}, "
                f"phase2={self.phase2!r}, upsample={self.upsample}, combine={self.combine!r})")


def normgrad(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, **kwargs
             ) -> torch.Tensor:
    """``NormGrad(model, **kwargs)(x, target)``."""
    return NormGrad(model, **kwargs)(x, target)


def meta_saliency(saliency_fn: SaliencyFn, model: nn.Module, x: torch.Tensor,
                  target: int | torch.Tensor | None = None, lr: float = 1e-4, negate_loss: bool = False
                  ) -> torch.Tensor:
    """``saliency_fn(x, target)`` computed, per image, after one SGD step of ``model`` on that image's
    cross-entropy for its target (``-CE`` if ``negate_loss``); ``saliency_fn`` must use ``model``. Every
    parameter that requires grad takes the step; all are restored bit-exactly afterwards (also on error),
    as are the train/eval flags; ``.grad`` and ``requires_grad`` are never touched."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"Invalid lr: {lr!r} (expected a number >= 0)")
    check_images(x)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    sign = -1.0 if negate_loss else 1.0
    maps = []
    with eval_mode(model):
        with torch.no_grad():
            target = select_target(model(x), target)
        try:
            for i in range(len(x)):
                xi, ti = x[i:i + 1].detach(), target[i:i + 1]
                with torch.enable_grad():
                    loss = sign * F.cross_entropy(model(xi), ti)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
                maps.append(saliency_fn(xi, ti))
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return torch.cat(maps)
