"""Metrics of saliency maps, one implementation for every method: deletion/insertion and class sensitivity.

Deletion / insertion (Petsiuk, Das, Saenko, "RISE", BMVC 2018; the protocol of CF-CAM's official
``metrics/auc.py``, jerryp-hfut/CF-CAM): rank the pixels by the saliency map, highest first. *Deletion*
starts from the image and sets the top-ranked pixels (all channels) to ``baseline``; *insertion* starts from
the all-``baseline`` image and puts the top-ranked pixels back. After step ``k = 0..steps`` the first
``k * (HW // steps)`` pixels of the ranking are changed (all ``HW`` at ``k = steps``); the curve is the
softmax probability of the target class (default: the class predicted on the unchanged image) and the
score is its trapezoid area over the fraction axis ``linspace(0, 1, steps + 1)`` (``np.trapz`` as in the
official code). ``steps=None`` means one pixel per step (``steps = HW``, ``HW + 1`` points). Lower deletion
AUC and higher insertion AUC are better. Ties in the map are broken by pixel index (row-major, lower index
first: a stable descending sort); the official code's ``np.argsort(...)[::-1]`` breaks them the other way.
All images and all steps are batched (the model sees ``2 N (steps + 1)`` perturbed images, built and run in
chunks that bound the memory); there is no Python loop over pixels. The model runs in eval mode (its flags
restored) without gradients.

Class sensitivity (Rebuffi et al., "There and Back Again: Revisiting Backpropagation Saliency Methods",
CVPR 2020, arXiv 2004.02866, Sec. 5): per image, the Pearson correlation between the map for the
highest-logit class and the map for the lowest-logit class. Lower is better (a class-sensitive method gives
different maps for different classes); report the mean over images. An image where either map is constant
has no correlation: its entry is NaN (use ``torch.nanmean``), as the sheet asks to flag such images.

A *saliency function* here is any callable ``fn(x, target) -> maps (N, 1, H, W)`` with the model bound in it,
e.g. ``GradCAM(model, layer)`` or ``NormGrad(model)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._model_state import eval_mode
from ._capture import at_least_float32, check_images, select_target

SaliencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CHUNK_ELEMENTS = 1 << 24  # images per forward chunk x pixels x channels (64 MiB of float32)


def _ranking(saliency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel (0 = most salient) per image, ``(N, H*W)``; ties by pixel index."""
    n, _, h, w = x.shape
    if saliency.dim() == 3:
        saliency = saliency[:, None]
    if saliency.shape != (n, 1, h, w):
        raise ValueError(f"saliency must have shape ({n}, 1, {h}, {w}) (or ({n}, {h}, {w})) to match the "
                         f"input, got {tuple(saliency.shape)}")
    order = torch.sort(saliency.detach().flatten(1).float(), dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))


def deletion_insertion_curves(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor,
                              target: int | torch.Tensor | None = None, steps: int | None = None,
                              baseline: float | torch.Tensor = 0.0
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fractions (steps+1,), deletion probs (N, steps+1), insertion probs (N, steps+1), changed pixels
    (steps+1,))`` of the protocol in the module docstring; ``baseline`` is a number or a tensor that
    broadcasts to ``x``."""
    check_images(x)
    n, _, h, w = x.shape
    hw = h * w
    steps = hw if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= hw:
        raise ValueError(f"steps must be an int in 1..{hw} (the pixel count) or None, got {steps!r}")
    rank = _ranking(saliency, x)
    x = x.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    counts = torch.arange(steps + 1, device=x.device) * (hw // steps)
    counts[-1] = hw
    # Row j of the flattened (image, step) grid is image j // (steps + 1) after step j % (steps + 1).
    rows = n * (steps + 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))
    probs = torch.empty(2, rows, dtype=at_least_float32(x).dtype, device=x.device)
    with eval_mode(model), torch.no_grad():
        target = select_target(model(x), target)
        for start in range(0, rows, chunk):
            j = torch.arange(start, min(rows, start + chunk), device=x.device)
            img, step = j // (steps + 1), j % (steps + 1)
            changed = (rank[img] < counts[step, None]).view(-1, 1, h, w)
            for which, (off, on) in enumerate(((x, base), (base, x))):  # deletion, insertion
                logits = model(torch.where(changed, on[img], off[img]))
                probs[which, start:start + len(j)] = F.softmax(at_least_float32(logits), dim=1).gather(
                    1, target[img, None])[:, 0]
    probs = probs.view(2, n, steps + 1)
    fractions = torch.linspace(0, 1, steps + 1, dtype=probs.dtype, device=x.device)
    return fractions, probs[0], probs[1], counts


def deletion_insertion(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor,
                       target: int | torch.Tensor | None = None, steps: int | None = None,
                       baseline: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deletion AUC (N,), insertion AUC (N,))`` of ``saliency`` (N, 1, H, W) on ``x`` (N, C, H, W)."""
    fractions, deletion, insertion, _ = deletion_insertion_curves(model, x, saliency, target, steps, baseline)
    return torch.trapezoid(deletion, fractions, dim=1), torch.trapezoid(insertion, fractions, dim=1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of ``(N, ...)`` tensors (float64), NaN where a row is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    corr = (a * b).sum(dim=1) / torch.where(ok, na * nb, torch.ones_like(na))
    return torch.where(ok, corr.clamp(-1, 1), torch.full_like(corr, float("nan")))


def class_sensitivity(saliency_fn: SaliencyFn, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per image, Pearson(map of the max-logit class, map of the min-logit class), ``(N,)`` float64; NaN
    where either map is constant. ``saliency_fn(x, target)`` must explain ``model``."""
    check_images(x)
    with eval_mode(model), torch.no_grad():
        logits = model(x.detach())
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"class_sensitivity needs logits (N, classes) with at least 2 classes, got "
                         f"{tuple(logits.shape)}")
    top, bottom = logits.argmax(dim=1), logits.argmin(dim=1)
    return pearson(saliency_fn(x, top), saliency_fn(x, bottom))
