"""Claim checks of NormGrad (Rebuffi, Fong, Ji, Vedaldi, CVPR 2020): meta-saliency makes NormGrad class-sensitive,
and NormGrad's top pixels matter to the prediction.

Setup (the sheet's (b)): :func:`normlab.bench.tasks.train_saliency_cnn` -- the seed permutes the 1,797
digits, the first 1,400 train a conv(1->16)-ReLU-conv(16->32)-ReLU-GAP-Linear CNN (Adam 3e-3, batch 64,
15 epochs), the next 100 are validation, the next 100 test. Maps are taken at ``relu2``, the tensor the
pooling reads (8x8, the input's size). NormGrad there is class-INsensitive by construction: the gradient is
``w_c / 64`` at every location, so plain NormGrad gives the same map for every class (correlation 1; a unit
test checks this analytically).

- ``normgrad.meta`` (gate): class sensitivity = mean over images of Pearson(map of the max-logit class, map of
  the min-logit class), on the validation and the test images, for plain maps (``lr`` 0) and meta-saliency
  with lr in {0.01, 0.03, 0.1, 0.3, 1}. Per seed, the lr with the lowest validation correlation is picked
  and the reduction ``test corr(plain) - test corr(tuned lr)`` measured. Pass: mean reduction over seeds 0-2
  >= 0.2. Grad-CAM at the same layer is run on the same grid and shown beside, not gated (the sheet found
  meta-saliency hurts it).
- ``normgrad.deletion`` (gate): zeroing the top 20% of pixels (13 of 64) by plain NormGrad lowers the softmax
  probability of the predicted class more than zeroing 13 random pixels (a random map from a seeded
  generator), mean over the 100 test images, in every seed. Grad-CAM's drop and the deletion/insertion AUCs
  (one pixel per step) are reported beside.

Quick mode runs seed 0 only (the sheet has no quick protocol): status ``report``. Smoke trains one epoch and
scores 2 images per split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from statistics import fmean

import torch

from ...explain.gradcam import GradCAM
from ...explain.metrics import class_sensitivity, deletion_insertion_curves
from ...explain.normgrad import NormGrad, meta_saliency
from ..report import image_grid
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register
from ..tasks import train_saliency_cnn

LAYER = "relu2"
META_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
LRS = (0.0,) + META_LRS  # lr 0 = the plain map (no meta step)
META_ARMS = ("normgrad", "gradcam")
DELETION_ARMS = ("normgrad", "random", "gradcam")
SEEDS = (0, 1, 2)
EPOCHS = {"full": 15, "quick": 15, "smoke": 1}
IMAGES = {"full": 100, "quick": 100, "smoke": 2}
TOP_FRACTION = 0.2
MIN_REDUCTION = 0.2


@lru_cache(maxsize=3)
def _setup(seed: int, mode: str):
    """The trained CNN of ``seed`` and its validation/test images (first ``IMAGES[mode]`` of each)."""
    model, splits = train_saliency_cnn(seed, epochs=EPOCHS[mode])
    n = IMAGES[mode]
    x_test, y_test = splits["test"]
    with torch.no_grad():
        acc = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return model, splits["val"][0][:n], x_test[:n], acc


def _method(arm: str, model):
    if arm == "normgrad":
        return NormGrad(model, LAYER)
    if arm == "gradcam":
        return GradCAM(model, LAYER)
    raise ValueError(f"unknown arm {arm!r}; valid: {sorted(set(META_ARMS + DELETION_ARMS))}")


def _sensitivity(fn, model, x: torch.Tensor, lr: float) -> tuple[float, int]:
    """Mean class sensitivity over the images with a defined correlation, and the number without one."""
    saliency = fn if lr == 0 else (lambda xs, target: meta_saliency(fn, model, xs, target, lr=lr))
    corr = class_sensitivity(saliency, model, x)
    return torch.nanmean(corr).item(), int(corr.isnan().sum())


def run_meta(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    model, x_val, x_test, acc = _setup(seed, mode)
    fn = _method(arm, model)
    val, val_nan = _sensitivity(fn, model, x_val, lr)
    test, test_nan = _sensitivity(fn, model, x_test, lr)
    return {"metrics": {"val_corr": val, "test_corr": test, "undefined": float(val_nan + test_nan),
                        "test_acc": acc}, "curves": {}}


def run_deletion(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    model, _, x, acc = _setup(seed, mode)
    if arm == "random":
        maps = torch.rand(x.shape[0], 1, *x.shape[-2:], generator=torch.Generator().manual_seed(seed))
    else:
        maps = _method(arm, model)(x)
    fractions, deletion, insertion, counts = deletion_insertion_curves(model, x, maps)
    k = round(TOP_FRACTION * x.shape[-2] * x.shape[-1])
    drop = (deletion[:, 0] - deletion[:, k]).mean().item()
    return {"metrics": {"drop_top20": drop,
                        "deletion_auc": torch.trapezoid(deletion, fractions, dim=1).mean().item(),
                        "insertion_auc": torch.trapezoid(insertion, fractions, dim=1).mean().item(),
                        "test_acc": acc},
            "curves": {"deletion_prob": [[int(c), v] for c, v in zip(counts, deletion.mean(dim=0).tolist())]}}


def _by_seed(records: list[Record], arm: str, lr, metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in records if r["arm"] == arm and r["lr"] == lr}


def _label(mode: str) -> str:
    return "indicative (quick: seed 0 only)" if mode == "quick" else mode


def verdict_meta(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, META_ARMS)
    lrs = sorted({r["lr"] for r in records if r["arm"] == "normgrad" and r["lr"]})
    plain_test = _by_seed(records, "normgrad", 0.0, "test_corr")
    val = {lr: _by_seed(records, "normgrad", lr, "val_corr") for lr in lrs}
    test = {lr: _by_seed(records, "normgrad", lr, "test_corr") for lr in lrs}
    seeds = sorted(s for s in plain_test if all(s in val[lr] and s in test[lr] for lr in lrs))
    if not lrs or not seeds:
        raise ValueError("no seed has both the plain NormGrad map (lr 0) and every meta lr")
    parts, reductions = [], []
    for s in seeds:
        scored = {lr: val[lr][s] if math.isfinite(val[lr][s]) else math.inf for lr in lrs}
        tuned = min(lrs, key=lambda lr: scored[lr])
        reductions.append(plain_test[s] - test[tuned][s])
        parts.append(f"seed {s}: tuned lr {tuned:g} (val corr {val[tuned][s]:.3f}), test corr plain "
                     f"{plain_test[s]:.3f} -> {test[tuned][s]:.3f}, reduction {reductions[-1]:.3f}")
    mean_red = fmean(reductions)
    gradcam = records_by_arm(records, "test_corr")
    beside = ", ".join(f"lr {lr:g}: {fmean(vals):.3f}" for (arm, lr), vals in sorted(gradcam.items())
                       if arm == "gradcam")
    summary = (f"mean test reduction of NormGrad's class sensitivity {mean_red:.3f} (need >= {MIN_REDUCTION}) "
               f"over {len(seeds)} seed(s); " + "; ".join(parts) +
               f". Grad-CAM beside (test corr, seed mean; lr 0 = plain): {beside}")
    if mode != "full":
        return "report", f"{_label(mode)}: {summary}"
    ok = len(seeds) == len(SEEDS) and lrs == list(META_LRS) and math.isfinite(mean_red) and \
        mean_red >= MIN_REDUCTION
    return ("pass" if ok else "fail"), summary


def verdict_deletion(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, DELETION_ARMS)
    ng = _by_seed(records, "normgrad", None, "drop_top20")
    rnd = _by_seed(records, "random", None, "drop_top20")
    gc = _by_seed(records, "gradcam", None, "drop_top20")
    seeds = sorted(set(ng) & set(rnd))
    if not seeds:
        raise ValueError("no seed has both the normgrad and the random arm")
    wins = [ng[s] > rnd[s] for s in seeds]
    parts = "; ".join(f"seed {s}: NormGrad {ng[s]:.3f} vs random {rnd[s]:.3f}"
                      + (f" (Grad-CAM {gc[s]:.3f})" if s in gc else "") for s in seeds)
    summary = (f"drop of the predicted class's softmax after zeroing the top {TOP_FRACTION:.0%} pixels, "
               f"NormGrad > random in {sum(wins)} of {len(seeds)} seed(s): {parts}")
    if mode != "full":
        return "report", f"{_label(mode)}: {summary}"
    return ("pass" if len(seeds) == len(SEEDS) and all(wins) else "fail"), summary


def _tuned_lr(records: Sequence[Record], seed: int) -> float:
    """The meta lr with the lowest validation correlation of NormGrad in ``seed`` (0.1 if none recorded)."""
    val = {r["lr"]: r["metrics"]["val_corr"] for r in records
           if r["arm"] == "normgrad" and r["seed"] == seed and r["lr"] and math.isfinite(r["metrics"]["val_corr"])}
    return min(val, key=val.get) if val else 0.1


def figures(records: Sequence[Record], plots: Path) -> list[str]:
    """``normgrad.maps.png`` in ``plots``: for the first 6 test images of the lowest seed in ``records``, the
    digit and the maps for the max- and the min-logit class of plain NormGrad (identical by construction),
    meta-saliency NormGrad at that seed's tuned lr, and Grad-CAM."""
    seed = min(r["seed"] for r in records)
    lr = _tuned_lr(records, seed)
    model, _, x, _ = _setup(seed, records[0]["mode"])
    x = x[:6]
    with torch.no_grad():
        logits = model(x)
    ng, gc = _method("normgrad", model), _method("gradcam", model)
    explainers = (("NormGrad", ng), (f"meta NormGrad\nlr {lr:g}",
                                     lambda xs, t: meta_saliency(ng, model, xs, t, lr=lr)), ("Grad-CAM", gc))
    columns = [("digit", x)]
    for title, explain in explainers:
        columns += [(f"{title}\nmax-logit class", explain(x, logits.argmax(dim=1))),
                    (f"{title}\nmin-logit class", explain(x, logits.argmin(dim=1)))]
    name = "normgrad.maps.png"
    image_grid(columns, Path(plots) / name)
    return [name]


META = register(Experiment(
    id="normgrad.meta",
    claim="Meta-saliency (one SGD step on the image's loss before computing the map) makes NormGrad "
          "class-sensitive: at the layer a GAP+linear head reads, where plain NormGrad's maps for any two "
          "classes correlate perfectly, it lowers that correlation by at least 0.2.",
    baseline="plain NormGrad at the same layer (correlation 1 by construction); Grad-CAM shown beside",
    metric="class sensitivity: mean Pearson correlation of the maps for the max- and the min-logit class "
           "(lower = more class-sensitive), on 100 validation and 100 test digits",
    primary_metric="test_corr",
    pass_rule="per seed, the meta lr in {0.01, 0.03, 0.1, 0.3, 1} with the lowest validation correlation; "
              "pass iff the mean over seeds 0-2 of test corr(plain) - test corr(tuned) >= 0.2",
    grids={
        "full": Grid(META_ARMS, LRS, SEEDS, 1200.0),
        "quick": Grid(META_ARMS, LRS, (0,), 30.0),
        "smoke": Grid(META_ARMS, (0.0, 0.1), (0,), 30.0),
    },
    run=run_meta,
    verdict=verdict_meta,
    figures=figures,
))

DELETION = register(Experiment(
    id="normgrad.deletion",
    claim="NormGrad finds pixels that matter: zeroing its top 20% pixels lowers the predicted class's "
          "probability more than zeroing as many random pixels.",
    baseline="a random pixel order (seeded); Grad-CAM shown beside",
    metric="mean drop of the predicted class's softmax probability after zeroing the top 13 of 64 pixels, "
           "over 100 test digits; deletion/insertion AUCs (one pixel per step) beside",
    primary_metric="drop_top20",
    pass_rule="pass iff NormGrad's mean drop > the random order's in each of seeds 0-2",
    grids={
        "full": Grid(DELETION_ARMS, (None,), SEEDS, 1200.0),
        "quick": Grid(DELETION_ARMS, (None,), (0,), 30.0),
        "smoke": Grid(DELETION_ARMS, (None,), (0,), 30.0),
    },
    run=run_deletion,
    verdict=verdict_deletion,
))
