"""Claim checks of CF-CAM (He, Pan, Yao 2025, arXiv:2504.00060): faithfulness vs Grad-CAM, and the sheet's
caveat that the official algorithm is nearly class-insensitive.

Setup (the sheet's (b)): :func:`normlab.bench.tasks.train_saliency_cnn` -- the seed permutes the 1,797
digits, the first 1,400 train a conv(1->16)-ReLU-conv(16->32)-ReLU-GAP-Linear CNN (Adam 3e-3, batch 64, 15
epochs); the maps are taken at ``relu2`` (8x8, the input's size) for exactly the first 100 held-out images
(every mode but smoke). CF-CAM runs with the official settings (temperature 1), Grad-CAM is
:class:`normlab.explain.gradcam.GradCAM` at the same layer, "random" is a uniform random map from a
generator seeded with the seed.

- ``cf_cam.faithfulness`` (gate): deletion and insertion AUC per image (one pixel per step, 65 points,
  removed pixels set to 0 = the digits' background, target = the predicted class, softmax probability, ties
  by pixel index; :func:`normlab.explain.metrics.deletion_insertion_curves`), mean over the 100 images.
  Pass iff in every seed CF-CAM's deletion AUC < Grad-CAM's and < random's, and CF-CAM's insertion AUC >
  Grad-CAM's + 0.05.
- ``cf_cam.class_sensitivity`` (gate, the sheet's (c)): mean over images of Pearson(map of the max-logit
  class, map of the min-logit class). The gate CONFIRMS THE CAVEAT: pass iff CF-CAM's correlation at
  temperature 1 is > 0.95 in every seed, i.e. CF-CAM's map hardly depends on the class (the softmax over raw
  gradient means of ~1e-2 is nearly uniform); Grad-CAM's value is shown beside it.
- ``cf_cam.robustness`` (report-only, the paper's noise claim): the RAW gradient at ``relu2`` is perturbed
  with N(0, (0.5 max|G|)^2) per image (a seeded generator; the same draw for both arms) before the
  weights are formed; mean Pearson(clean map, noisy map).

Quick mode is the sheet's quick protocol (seed 0, the same 100 images), judged by the same rule
(indicative); smoke trains one epoch and scores 2 images (status ``report``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from statistics import fmean

import torch

from ...explain._capture import LayerCapture, upsample
from ...explain.cf_cam import CFCAM
from ...explain.gradcam import GradCAM, gradcam_raw, scale_cam
from ...explain.metrics import class_sensitivity, deletion_insertion_curves, pearson
from ..report import image_grid
from ..experiment import Experiment, Grid, Record, records_mode, register
from ..tasks import train_saliency_cnn

LAYER = "relu2"
SEEDS = (0, 1, 2)
EPOCHS = {"full": 15, "quick": 15, "smoke": 1}
IMAGES = {"full": 100, "quick": 100, "smoke": 2}
FAITH_ARMS = ("grad_cam", "cf_cam", "random")
MAP_ARMS = ("grad_cam", "cf_cam")
INSERTION_MARGIN = 0.05  # CF-CAM insertion AUC must beat Grad-CAM's by this much
MIN_CF_CORRELATION = 0.95  # the caveat: CF-CAM's class correlation stays above this
NOISE_SCALE = 0.5  # gradient noise std = NOISE_SCALE * max|G| per image


@lru_cache(maxsize=3)
def _setup(seed: int, mode: str) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """The trained CNN of ``seed``, the first ``IMAGES[mode]`` held-out images and the held-out accuracy."""
    model, splits = train_saliency_cnn(seed, epochs=EPOCHS[mode])
    x, y = splits["heldout"]
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    return model, x[:IMAGES[mode]], acc


def _explainer(arm: str, model: torch.nn.Module):
    if arm == "grad_cam":
        return GradCAM(model, LAYER)
    if arm == "cf_cam":
        return CFCAM(model, LAYER)
    raise ValueError(f"unknown arm {arm!r}; valid: {list(FAITH_ARMS)}")


def run_faithfulness(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    model, x, acc = _setup(seed, mode)
    if arm == "random":
        maps = torch.rand(x.shape[0], 1, *x.shape[-2:], generator=torch.Generator().manual_seed(seed))
    else:
        maps = _explainer(arm, model)(x)
    fractions, deletion, insertion, counts = deletion_insertion_curves(model, x, maps)
    return {"metrics": {"deletion_auc": torch.trapezoid(deletion, fractions, dim=1).mean().item(),
                        "insertion_auc": torch.trapezoid(insertion, fractions, dim=1).mean().item(),
                        "heldout_acc": acc},
            "curves": {name: [[int(c), v] for c, v in zip(counts, probs.mean(dim=0).tolist())]
                       for name, probs in (("deletion_prob", deletion), ("insertion_prob", insertion))}}


def run_class_sensitivity(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    model, x, acc = _setup(seed, mode)
    corr = class_sensitivity(_explainer(arm, model), model, x)
    defined = corr[~corr.isnan()]
    return {"metrics": {"class_corr": torch.nanmean(corr).item(),
                        "class_corr_min": defined.min().item() if len(defined) else math.nan,
                        "undefined": float(corr.isnan().sum()), "heldout_acc": acc}, "curves": {}}


def maps_from(arm: str, model: torch.nn.Module, activation: torch.Tensor, gradient: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    """The arm's maps from a captured ``relu2`` output and its (possibly perturbed) gradient."""
    if arm == "grad_cam":
        return upsample(scale_cam(gradcam_raw(activation, gradient)), size)
    if arm == "cf_cam":
        return CFCAM(model, LAYER).compute(activation, gradient, size)[0]
    raise ValueError(f"unknown arm {arm!r}; valid: {list(MAP_ARMS)}")


def run_robustness(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    model, x, acc = _setup(seed, mode)
    with LayerCapture(model, LAYER) as cap:
        _, _, (act,), (grad,) = cap.run(x)
    scale = NOISE_SCALE * grad.abs().amax(dim=(1, 2, 3), keepdim=True)
    noisy = grad + scale * torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed), dtype=grad.dtype)
    size = tuple(x.shape[-2:])
    corr = pearson(maps_from(arm, model, act, grad, size), maps_from(arm, model, act, noisy, size))
    return {"metrics": {"noise_corr": torch.nanmean(corr).item(), "undefined": float(corr.isnan().sum()),
                        "heldout_acc": acc}, "curves": {}}


def _per_seed(records: Sequence[Record], arm: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in records if r["arm"] == arm}


def _label(mode: str) -> str:
    return {"quick": "indicative (quick: seed 0 only)", "smoke": "smoke"}.get(mode, mode)


def _judge(mode: str, seeds: list[int], ok: list[bool], summary: str) -> tuple[str, str]:
    if mode == "smoke":
        return "report", f"smoke: {summary}"
    expected = SEEDS if mode == "full" else SEEDS[:1]
    passed = tuple(seeds) == expected and all(ok)
    return ("pass" if passed else "fail"), (summary if mode == "full" else f"{_label(mode)}: {summary}")


def verdict_faithfulness(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, FAITH_ARMS)
    dele = {arm: _per_seed(records, arm, "deletion_auc") for arm in FAITH_ARMS}
    ins = {arm: _per_seed(records, arm, "insertion_auc") for arm in FAITH_ARMS}
    seeds = sorted(set.intersection(*(set(d) for d in dele.values())))
    if not seeds:
        raise ValueError("no seed has all three arms")
    ok, parts = [], []
    for s in seeds:
        cf_del, gc_del, rnd_del = dele["cf_cam"][s], dele["grad_cam"][s], dele["random"][s]
        cf_ins, gc_ins, rnd_ins = ins["cf_cam"][s], ins["grad_cam"][s], ins["random"][s]
        checks = (cf_del < gc_del, cf_del < rnd_del, cf_ins > gc_ins + INSERTION_MARGIN)
        ok.append(all(checks))
        parts.append(
            f"seed {s}: deletion CF-CAM {cf_del:.3f} / Grad-CAM {gc_del:.3f} / random {rnd_del:.3f}, insertion "
            f"CF-CAM {cf_ins:.3f} / Grad-CAM {gc_ins:.3f} / random {rnd_ins:.3f}; paired CF-CAM - Grad-CAM: "
            f"deletion {cf_del - gc_del:+.3f}, insertion {cf_ins - gc_ins:+.3f} "
            f"({'ok' if checks[0] and checks[1] else 'deletion fails'}, "
            f"{'ok' if checks[2] else f'insertion gain < {INSERTION_MARGIN}'})")
    summary = (f"CF-CAM deletion < Grad-CAM's and random's and insertion > Grad-CAM's + {INSERTION_MARGIN} in "
               f"{sum(ok)} of {len(seeds)} seed(s): " + "; ".join(parts))
    return _judge(mode, seeds, ok, summary)


def verdict_class_sensitivity(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, MAP_ARMS)
    cf = _per_seed(records, "cf_cam", "class_corr")
    cf_min = _per_seed(records, "cf_cam", "class_corr_min")
    gc = _per_seed(records, "grad_cam", "class_corr")
    seeds = sorted(set(cf) & set(gc))
    if not seeds:
        raise ValueError("no seed has both arms")
    ok = [math.isfinite(cf[s]) and cf[s] > MIN_CF_CORRELATION for s in seeds]
    parts = "; ".join(f"seed {s}: CF-CAM {cf[s]:.4f} (lowest image {cf_min[s]:.4f}) vs Grad-CAM {gc[s]:.3f}"
                      for s in seeds)
    summary = (f"class correlation (max- vs min-logit class map, mean over images; 1 = class-blind): "
               f"CF-CAM (T=1) > {MIN_CF_CORRELATION} in {sum(ok)} of {len(seeds)} seed(s), i.e. CF-CAM "
               f"{'is' if all(ok) else 'is not'} nearly class-insensitive, Grad-CAM beside: {parts}")
    return _judge(mode, seeds, ok, summary)


def verdict_robustness(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, MAP_ARMS)
    corr = {arm: _per_seed(records, arm, "noise_corr") for arm in MAP_ARMS}
    seeds = sorted(set(corr["cf_cam"]) & set(corr["grad_cam"]))
    parts = "; ".join(f"seed {s}: CF-CAM {corr['cf_cam'][s]:.4f}, Grad-CAM {corr['grad_cam'][s]:.4f}"
                      for s in seeds)
    means = ", ".join(f"{arm} {fmean(corr[arm].values()):.4f}" for arm in MAP_ARMS)
    return "report", (f"{_label(mode)}: Pearson(clean map, map with gradient noise N(0, ({NOISE_SCALE} max|G|)^2)), "
                      f"mean over seeds: {means}; {parts}. CF-CAM's stability comes from its near-uniform "
                      f"softmax ignoring the gradient (see cf_cam.class_sensitivity)")


def figures(records: Sequence[Record], plots: Path) -> list[str]:
    """``cf_cam.maps.png`` in ``plots``: for the first 6 images of the lowest seed in ``records``, the digit
    and the Grad-CAM and CF-CAM maps for the max- and the min-logit class (CF-CAM's two maps look alike)."""
    mode = records[0]["mode"]
    model, x, _ = _setup(min(r["seed"] for r in records), mode)
    x = x[:6]
    with torch.no_grad():
        logits = model(x)
    top, bottom = logits.argmax(dim=1), logits.argmin(dim=1)
    columns = [("digit", x)]
    for arm, title in (("grad_cam", "Grad-CAM"), ("cf_cam", "CF-CAM")):
        explain = _explainer(arm, model)
        columns += [(f"{title}\nmax-logit class", explain(x, top)), (f"{title}\nmin-logit class", explain(x, bottom))]
    name = "cf_cam.maps.png"
    image_grid(columns, Path(plots) / name)
    return [name]


FAITHFULNESS = register(Experiment(
    id="cf_cam.faithfulness",
    claim="CF-CAM's maps are more faithful than Grad-CAM's: deleting its top pixels first lowers the predicted "
          "class's probability faster, and inserting them first raises it faster.",
    baseline="Grad-CAM at the same layer and a random pixel order (seeded)",
    metric="deletion and insertion AUC (one pixel per step, removed pixels set to 0, softmax of the predicted "
           "class), mean over the first 100 held-out digits",
    primary_metric="insertion_auc",
    pass_rule=f"in every seed (0-2): CF-CAM deletion AUC < Grad-CAM's and < random's, and CF-CAM insertion AUC "
              f"> Grad-CAM's + {INSERTION_MARGIN}",
    grids={
        "full": Grid(FAITH_ARMS, (None,), SEEDS, 1200.0),
        "quick": Grid(FAITH_ARMS, (None,), SEEDS[:1], 30.0),
        "smoke": Grid(FAITH_ARMS, (None,), SEEDS[:1], 30.0),
    },
    run=run_faithfulness,
    verdict=verdict_faithfulness,
))

CLASS_SENSITIVITY = register(Experiment(
    id="cf_cam.class_sensitivity",
    claim="Caveat (the sheet's c, not a paper claim): the official CF-CAM is nearly class-insensitive -- its "
          "softmax over raw gradient means is almost uniform, so the maps for the max- and the min-logit class "
          "correlate > 0.95; pass = the caveat holds.",
    baseline="Grad-CAM at the same layer, shown beside (not gated)",
    metric="class correlation: Pearson of the maps for the max- and the min-logit class, mean over the first 100 "
           "held-out digits (1 = the same map for every class)",
    primary_metric="class_corr",
    pass_rule=f"in every seed (0-2): CF-CAM (temperature 1) class correlation > {MIN_CF_CORRELATION}",
    grids={
        "full": Grid(MAP_ARMS, (None,), SEEDS, 1200.0),
        "quick": Grid(MAP_ARMS, (None,), SEEDS[:1], 30.0),
        "smoke": Grid(MAP_ARMS, (None,), SEEDS[:1], 30.0),
    },
    run=run_class_sensitivity,
    verdict=verdict_class_sensitivity,
    figures=figures,
))

ROBUSTNESS = register(Experiment(
    id="cf_cam.robustness",
    claim="CF-CAM's maps are robust to gradient noise (report-only: the official code's noise path never "
          "changes the map, so the paper's numbers cannot be re-checked as such).",
    baseline="Grad-CAM at the same layer under the same noise draw",
    metric=f"Pearson(clean map, map from the raw gradient + N(0, ({NOISE_SCALE} max|G|)^2)), mean over the first "
           "100 held-out digits",
    primary_metric="noise_corr",
    pass_rule="report-only (the sheet)",
    grids={
        "full": Grid(MAP_ARMS, (None,), SEEDS, 1200.0),
        "quick": Grid(MAP_ARMS, (None,), SEEDS[:1], 30.0),
        "smoke": Grid(MAP_ARMS, (None,), SEEDS[:1], 30.0),
    },
    run=run_robustness,
    verdict=verdict_robustness,
))
