"""Claim check of the filter-design survey (Hirani & Abdulla 2024, arXiv:2410.21644): the choice of
initialisation decides whether the signal survives depth in a plain ReLU conv net.

Task (the sheet's section b): a plain 10-layer conv net, each layer ``Conv2d(3x3, 16 channels, padding 1)`` +
ReLU, no normalisation, then global average pooling and ``Linear(16, 10)``, on scikit-learn's 8x8 digits in
[0, 1] (:func:`normlab.bench.tasks.digits`, train split). Arms, each initialising every conv and linear weight
with biases 0 through :mod:`normlab.analysis.filters`, from ``torch.Generator().manual_seed(seed)``:
``gaussian`` (N(0, 0.01^2)), ``xavier_normal``, ``he_normal`` (fan_in, ReLU), ``orthogonal_sqrt2`` (gain
sqrt(2)) and ``lsuv`` (calibrated on 256 train images). Per seed, a seeded permutation of the train split
gives the 256 measured images and the next 256 as LSUV's calibration batch (held out from the measurement).

``filter_design.spread`` (gate): std of the ReLU output of layer 1 and layer 10 (all elements) at init on
the 256 images (:func:`normlab.analysis.filters.signal_propagation`), seeds {0, 1}. Pass iff for every seed
std10/std1 > 0.1 for He, orthogonal(sqrt 2) and LSUV, < 1e-6 for N(0, 0.01^2) and < 0.05 for Xavier (its
linear-activation assumption breaks under ReLU). Per-layer log10 std of activations and of weight gradients
(cross-entropy on the measured batch) are recorded as curves (x = layer). Layer-10 values of a 16-channel net
scatter widely between seeds (over 30 seeds: He std10 0.04-0.51, median 0.19; Xavier's ratio crossed 0.05
on 1 of 30); the sheet's ranges are two seeds of that spread.

``filter_design.training`` (report-only, as the sheet says: too seed-noisy to gate): 300 SGD steps (lr 0.01,
momentum 0.9, batch 64, cross-entropy; the sheet gives no optimiser settings, these were fixed beforehand and
are the same for every arm) from each init, test accuracy on the test split, seeds {0, 1}.

Modes: the spread check runs in seconds, so quick runs the full protocol (status ``report``, the rule's
outcome quoted as indicative); smoke uses 64 images and one seed. Training: quick 100 steps on seed 0,
smoke 3 steps.
"""

from __future__ import annotations

import math
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.filters import apply_init, lsuv_, signal_propagation
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register
from ..tasks import digits

DEPTH, WIDTH, N_CLASSES = 10, 16, 10
ARMS = ("gaussian", "xavier_normal", "he_normal", "orthogonal_sqrt2", "lsuv")
LABELS = {"gaussian": "N(0, 0.01^2)", "xavier_normal": "Xavier normal", "he_normal": "He normal",
          "orthogonal_sqrt2": "orthogonal(sqrt 2)", "lsuv": "LSUV"}
RULES = {"gaussian": ("<", 1e-6), "xavier_normal": ("<", 0.05), "he_normal": (">", 0.1),
         "orthogonal_sqrt2": (">", 0.1), "lsuv": (">", 0.1)}
N_IMAGES = {"full": 256, "quick": 256, "smoke": 64}
TRAIN_STEPS = {"full": 300, "quick": 100, "smoke": 3}
LR, MOMENTUM, BATCH = 0.01, 0.9, 64


def plain_convnet() -> nn.Sequential:
    """10 x (Conv2d 3x3, 16 channels, padding 1 -> ReLU) -> global average pool -> Linear(16, 10)."""
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Conv2d(1 if i == 0 else WIDTH, WIDTH, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, N_CLASSES))


def batches(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The measured images and labels and the disjoint LSUV calibration images (``n`` each) of a seed."""
    x, y = digits("train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]], y[perm[:n]], x[perm[n:2 * n]]


def initialise(arm: str, seed: int, calibration: torch.Tensor) -> nn.Sequential:
    """The plain conv net initialised by ``arm`` from a generator seeded with ``seed``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    torch.manual_seed(seed)  # only the construction's default init, which every arm overwrites
    model = plain_convnet()
    gen = torch.Generator().manual_seed(seed)
    if arm == "lsuv":
        lsuv_(model, calibration, generator=gen)
    elif arm == "orthogonal_sqrt2":
        apply_init(model, "orthogonal", gain=math.sqrt(2), generator=gen)
    else:
        apply_init(model, arm, generator=gen)
    return model


def run_spread(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    x, y, calibration = batches(seed, N_IMAGES[mode])
    model = initialise(arm, seed, calibration)
    stats = signal_propagation(model, x, y)
    act = [std for _, _, std in stats.activations]
    grads = [g for name, g in stats.grad_std.items() if name != f"{len(model) - 1}.weight"]
    if len(act) != DEPTH or len(grads) != DEPTH:
        raise RuntimeError(f"expected {DEPTH} ReLU outputs and conv gradients, got {len(act)} and {len(grads)}")
    ratio = act[-1] / act[0]
    return {"metrics": {"std_1": act[0], "std_10": act[-1], "ratio": ratio, "log10_ratio": math.log10(ratio),
                        "grad_std_1": grads[0], "grad_std_10": grads[-1]},
            "curves": {"log10_act_std": [[i + 1, math.log10(s)] for i, s in enumerate(act)],
                       "log10_grad_std": [[i + 1, math.log10(g)] for i, g in enumerate(grads)]}}


def run_training(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    x, y = digits("train")
    x_test, y_test = digits("test")
    _, _, calibration = batches(seed, N_IMAGES[mode])
    model = initialise(arm, seed, calibration)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    data_gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(TRAIN_STEPS[mode]):
        idx = torch.randint(0, len(x), (BATCH,), generator=data_gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    tail = losses[-max(1, len(losses) // 15):]
    return {"metrics": {"test_acc": acc, "final_train_loss": fmean(tail)},
            "curves": {"train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}


def _holds(value: float, rule: tuple[str, float]) -> bool:
    op, bound = rule
    return value < bound if op == "<" else value > bound


def _per_seed(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def verdict_spread(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    ratios, std1, std10 = (records_by_arm(records, m) for m in ("ratio", "std_1", "std_10"))
    parts, ok = [], True
    for arm in ARMS:
        rule = RULES[arm]
        vals = ratios[(arm, None)]
        arm_ok = all(math.isfinite(v) and _holds(v, rule) for v in vals)
        ok &= arm_ok
        parts.append(f"{LABELS[arm]}: std1 [{_per_seed(std1[(arm, None)])}], std10 [{_per_seed(std10[(arm, None)])}]"
                     f", std10/std1 [{_per_seed(vals)}] (need {rule[0]} {rule[1]:g} every seed: "
                     f"{'yes' if arm_ok else 'no'})")
    text = "; ".join(parts)
    if mode == "full":
        return ("pass" if ok else "fail"), text
    label = "indicative (quick: the full protocol" if mode == "quick" else "smoke (64 images"
    return "report", f"{label}; rule would {'pass' if ok else 'fail'}): {text}"


def verdict_training(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    acc = records_by_arm(records, "test_acc")
    loss = records_by_arm(records, "final_train_loss")
    parts = []
    for arm in ARMS:
        (key,) = [k for k in acc if k[0] == arm]
        parts.append(f"{LABELS[arm]}: test acc {fmean(acc[key]):.3f} [{_per_seed(acc[key])}], final train loss "
                     f"[{_per_seed(loss[key])}]")
    prefix = {"full": "report-only (chance = 0.1)", "quick": "indicative (quick: 100 steps)",
              "smoke": "smoke"}[mode]
    return "report", f"{prefix}: " + "; ".join(parts)


SPREAD = register(Experiment(
    id="filter_design.spread",
    claim="In a plain 10-layer ReLU conv net the initialisation decides whether the signal survives depth: He, "
          "orthogonal(sqrt 2) and LSUV keep the activation std at layer 10 within 10x of layer 1, Xavier "
          "shrinks it over 20x and N(0, 0.01^2) by over a million times.",
    baseline="the same net and images under each initialisation (no training)",
    metric="std10/std1: std of the ReLU output of conv layer 10 over that of layer 1, at init, on 256 digits",
    primary_metric="log10_ratio",
    pass_rule="pass iff for every seed (0, 1) std10/std1 > 0.1 for He normal, orthogonal(sqrt 2) and LSUV, "
              "< 0.05 for Xavier normal and < 1e-6 for N(0, 0.01^2)",
    grids={
        "full": Grid(ARMS, (None,), (0, 1), 1200.0),
        "quick": Grid(ARMS, (None,), (0, 1), 30.0),
        "smoke": Grid(ARMS, (None,), (0,), 10.0),
    },
    run=run_spread,
    verdict=verdict_spread,
))

TRAINING = register(Experiment(
    id="filter_design.training",
    claim="Report-only: test accuracy after 300 SGD steps of the same plain 10-layer net from each initialisation "
          "(the sheet found it too seed-noisy to gate).",
    baseline="the same net, data, optimiser and steps under each initialisation",
    metric="test accuracy on the digits test split after 300 SGD steps (lr 0.01, momentum 0.9, batch 64)",
    primary_metric="test_acc",
    pass_rule="report-only (no gate)",
    grids={
        "full": Grid(ARMS, (LR,), (0, 1), 1200.0),
        "quick": Grid(ARMS, (LR,), (0,), 30.0),
        "smoke": Grid(ARMS, (LR,), (0,), 10.0),
    },
    run=run_training,
    verdict=verdict_training,
))
