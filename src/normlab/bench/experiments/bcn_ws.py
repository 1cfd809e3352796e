"""Claim check of Weight Standardization + Batch-Channel Normalization (Qiao et al. 2019): GN+WS and
BCN+WS train a CNN well at micro-batch size, where GroupNorm alone struggles, and lose nothing at a
normal batch size.

One experiment shared with the evonorm sheet (bcn_ws.md and evonorm.md, section "b. Claim check"): the
72 runs below are run once and cached through ``Experiment.shared_key``; the four checks
(``bcn_ws.small_batch``, ``bcn_ws.report`` here, ``evonorm.s0_vs_gn`` and ``evonorm.report`` in
:mod:`normlab.bench.experiments.evonorm`) read the same records.

Task: scikit-learn digits (pixels / 16, ``(N, 1, 8, 8)``) with the sheets' fixed stratified split
(``digits(split, test_fraction=0.3, seed=0)``: 1,257 train / 540 test); :class:`normlab.bench.tasks.DigitsCNN`
(three bias-free 3x3 convs 32-64-64 with a norm+activation slot after each, max-pool, global average pool,
linear head; PyTorch default init after ``torch.manual_seed(seed)``). Training: Adam (default betas),
cross-entropy, every epoch a permutation drawn from a generator seeded with the run seed, the last partial
batch dropped; batch 4 for 2 epochs (628 steps), batch 64 for 10 epochs (190 steps). Metric: eval-mode
test accuracy on all 540 test images after training.

An arm is ``<norm>@<batch size>``, norms: ``bn_relu`` (BatchNorm2d + ReLU), ``gn_relu`` (GroupNorm(8) +
ReLU), ``s0`` (EvoNorm-S0, 8 groups), ``b0`` (EvoNorm-B0), ``gn_ws`` (GroupNorm(8) + ReLU, WS convs),
``bcn_ws`` (BatchChannelNorm2d(estimate, r = 0.01, 8 groups) + ReLU, WS convs); WS is
:func:`normlab.reparam.weight_standardization.add_weight_standardization` (biased variance, eps 1e-5
inside the sqrt) on every conv, each of which is followed by a norm. Grid: lr in {1e-3, 3e-3} for every
arm, seeds {0, 1, 2}: 12 arms x 2 lrs x 3 seeds = 72 runs. The best lr per arm (norm and batch size) has
the highest seed-mean accuracy; gaps are paired by seed at each arm's best lr.

``bcn_ws.small_batch`` passes iff all three hold: (1) batch 4: acc(GN+WS) >= acc(GN) + 0.5 points in at
least 2 of the 3 seeds; (2) batch 4: mean acc(BCN+WS) >= mean acc(GN+WS) - 1 point; (3) batch 64: mean
acc(GN+WS) and mean acc(BCN+WS) each >= mean acc(BN) - 1.5 points. ``bcn_ws.report`` (report-only): GN vs
BN at batch 64 and the batch-4 comparisons with BN.

Quick mode (the sheets give no quick protocol): the same runs shrunk to seed 0, lr 3e-3, batch 4 for
1 epoch and batch 64 for 4 epochs, each check running only the arms it compares; status ``report``
(indicative). Smoke: a few steps per run, ``report``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.batch_channel import BatchChannelNorm2d
from ...layers.evonorm import EvoNormB0, EvoNormS0
from ...reparam.weight_standardization import add_weight_standardization
from ..experiment import Experiment, Grid, Record, best_lr, records_mode, register
from ..tasks import DigitsCNN, bn_relu, digits

NORMS = ("bn_relu", "gn_relu", "s0", "b0", "gn_ws", "bcn_ws")
LABELS = {"bn_relu": "BN+ReLU", "gn_relu": "GN+ReLU", "s0": "EvoNorm-S0", "b0": "EvoNorm-B0",
          "gn_ws": "GN+WS", "bcn_ws": "BCN+WS"}
BATCH_SIZES = (4, 64)
ARMS = tuple(f"{norm}@{batch}" for batch in BATCH_SIZES for norm in NORMS)
LRS = (1e-3, 3e-3)
SEEDS = (0, 1, 2)
GROUPS, WS_EPS, BCN_MOMENTUM = 8, 1e-5, 0.01
TEST_FRACTION, SPLIT_SEED = 0.3, 0
#: per mode and batch size: (epochs, step limit per run or None)
SCHEDULE = {"full": {4: (2, None), 64: (10, None)},
            "quick": {4: (1, None), 64: (4, None)},
            "smoke": {4: (1, 3), 64: (1, 2)}}
QUICK_LR = 3e-3
FULL_BUDGET_S, QUICK_BUDGET_S, SMOKE_BUDGET_S = 1200.0, 30.0, 20.0
CURVE_POINTS = 20  # train-loss curve: about this many window means per run

# bcn_ws.small_batch thresholds (accuracy points, i.e. percent)
WS_GAIN, WS_SEEDS_NEEDED = 0.5, 2   # (1) GN+WS >= GN + 0.5 in >= 2 of 3 seeds at batch 4
BCN_TOLERANCE = 1.0                 # (2) BCN+WS >= GN+WS - 1 at batch 4
BN_TOLERANCE = 1.5                  # (3) GN+WS, BCN+WS >= BN - 1.5 at batch 64


def arm_name(norm: str, batch: int) -> str:
    return f"{norm}@{batch}"


def parse_arm(arm: str) -> tuple[str, int]:
    """``"s0@64"`` -> ``("s0", 64)``; ``ValueError`` listing the valid arms otherwise."""
    norm, _, batch = arm.partition("@")
    if norm not in NORMS or batch not in {str(b) for b in BATCH_SIZES}:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    return norm, int(batch)


def gn_relu(channels: int) -> nn.Module:
    return nn.Sequential(nn.GroupNorm(GROUPS, channels), nn.ReLU())


def s0(channels: int) -> nn.Module:
    return EvoNormS0(channels, groups=GROUPS)


def b0(channels: int) -> nn.Module:
    return EvoNormB0(channels)


def bcn_relu(channels: int) -> nn.Module:
    return nn.Sequential(BatchChannelNorm2d(channels, num_groups=GROUPS, momentum=BCN_MOMENTUM, estimate=True),
                         nn.ReLU())


#: norm -> (the N slot of DigitsCNN, whether its convs are weight-standardized)
NORM_SLOTS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "bn_relu": (bn_relu, False), "gn_relu": (gn_relu, False), "s0": (s0, False), "b0": (b0, False),
    "gn_ws": (gn_relu, True), "bcn_ws": (bcn_relu, True)}


def build_model(norm: str) -> DigitsCNN:
    """The arm's CNN, built from the current RNG state (the caller seeds it)."""
    slot, ws = NORM_SLOTS[norm]
    model = DigitsCNN(slot)
    if ws:
        add_weight_standardization(model, eps=WS_EPS)
    return model


@lru_cache(maxsize=1)
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sheets' fixed split: train images, train labels, test images, test labels."""
    return (*digits("train", test_fraction=TEST_FRACTION, seed=SPLIT_SEED),
            *digits("test", test_fraction=TEST_FRACTION, seed=SPLIT_SEED))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode accuracy on ``(x, y)`` in one batch; the model is left in train mode."""
    model.eval()
    acc = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return acc


def total_steps(mode: str, batch: int) -> int:
    """Optimizer steps of a run: full epochs without the last partial batch (628 at batch 4, 190 at 64)."""
    epochs, limit = SCHEDULE[mode][batch]
    steps = epochs * (len(data()[1]) // batch)
    return steps if limit is None else min(limit, steps)


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    """One training run; metrics ``test_acc`` (final, eval mode) and ``train_loss`` (last window mean),
    curves ``test_acc`` (every epoch and at the end) and ``train_loss`` (window means)."""
    norm, batch = parse_arm(arm)
    epochs = SCHEDULE[mode][batch][0]
    total = total_steps(mode, batch)
    x_train, y_train, x_test, y_test = data()
    per_epoch = len(y_train) // batch
    every = max(1, total // CURVE_POINTS)
    torch.manual_seed(seed)
    model = build_model(norm)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    window, train_curve, acc_curve, step = [], [], [], 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(min(per_epoch, total - step)):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window.append(loss.item())
            if step % every == 0 or step == total:
                train_curve.append([step, sum(window) / len(window)])
                window = []
        acc_curve.append([step, accuracy(model, x_test, y_test)])
        if step == total:
            break
    return {"metrics": {"test_acc": acc_curve[-1][1], "train_loss": train_curve[-1][1]},
            "curves": {"test_acc": acc_curve, "train_loss": train_curve}}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str | None:
    """Every run is the same run in the bcn_ws and evonorm checks."""
    return f"digits-cnn-small-batch/{arm}/lr={lr!r}/seed={seed}/{mode}"


# ---- verdict helpers (shared with evonorm.py) ----

def best(records: Sequence[Record], norm: str, batch: int) -> tuple[float | None, dict[int, float]]:
    """The arm's best lr by seed-mean test accuracy and its accuracy per seed there."""
    arm = arm_name(norm, batch)
    lr, _ = best_lr(records, arm, "test_acc", lower_is_better=False)
    return lr, {r["seed"]: r["metrics"]["test_acc"] for r in records if r["arm"] == arm and r["lr"] == lr}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def describe_arm(records: Sequence[Record], norm: str, batch: int) -> str:
    """``"GN+WS@4 0.988 ± 0.008 (lr 3e-3, 3 seeds)"``: the sheets' table cell."""
    lr, accs = best(records, norm, batch)
    values = list(accs.values())
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{LABELS[norm]}@{batch} {mean(values):.3f} ± {sd:.3f} (lr {lr:g}, {len(values)} seed(s))"


def paired_gaps(records: Sequence[Record], norm_a: str, norm_b: str, batch: int) -> list[float]:
    """acc(a) - acc(b) in points, per seed common to both arms' best lr, in seed order."""
    _, a = best(records, norm_a, batch)
    _, b = best(records, norm_b, batch)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{norm_a}@{batch} and {norm_b}@{batch} share no seed")
    return [100 * (a[s] - b[s]) for s in common]


def describe_gap(label: str, gaps: Sequence[float]) -> str:
    """``"S0 - GN @64: +0.3 points (per seed -0.7, +0.6, +1.1; sd 0.9)"``."""
    sd = f"; sd {statistics.stdev(gaps):.1f}" if len(gaps) > 1 else ""
    return f"{label}: {mean(gaps):+.1f} points (per seed {', '.join(f'{g:+.1f}' for g in gaps)}{sd})"


def mode_label(mode: str) -> str:
    if mode == "quick":
        return ("indicative (quick: seed 0, lr 3e-3, batch 4 for 1 epoch, batch 64 for 4 epochs; "
                "report only)")
    return "smoke (a few steps; report only)"


# ---- bcn_ws.small_batch (gate) ----

GATE_ARMS = ("gn_relu@4", "gn_ws@4", "bcn_ws@4", "bn_relu@64", "gn_ws@64", "bcn_ws@64")


def verdict_small_batch(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, GATE_ARMS)
    ws_gaps = paired_gaps(records, "gn_ws", "gn_relu", 4)
    needed = math.ceil(WS_SEEDS_NEEDED * len(ws_gaps) / 3)
    won = sum(g >= WS_GAIN for g in ws_gaps)
    bcn_gap = 100 * (mean(list(best(records, "bcn_ws", 4)[1].values()))
                     - mean(list(best(records, "gn_ws", 4)[1].values())))
    bn64 = mean(list(best(records, "bn_relu", 64)[1].values()))
    gaps64 = {norm: 100 * (mean(list(best(records, norm, 64)[1].values())) - bn64) for norm in ("gn_ws", "bcn_ws")}
    ok1 = won >= needed
    ok2 = bcn_gap >= -BCN_TOLERANCE
    ok3 = all(g >= -BN_TOLERANCE for g in gaps64.values())
    arms = "; ".join(describe_arm(records, *parse_arm(arm)) for arm in GATE_ARMS)
    text = (f"(1) batch 4: {describe_gap('GN+WS - GN', ws_gaps)}, >= +{WS_GAIN} in {won} of {len(ws_gaps)} "
            f"seeds (need {needed}: {'yes' if ok1 else 'no'}); (2) batch 4: BCN+WS - GN+WS mean {bcn_gap:+.1f} "
            f"points (need >= -{BCN_TOLERANCE:g}: {'yes' if ok2 else 'no'}); (3) batch 64: GN+WS - BN "
            f"{gaps64['gn_ws']:+.1f}, BCN+WS - BN {gaps64['bcn_ws']:+.1f} points (need each >= "
            f"-{BN_TOLERANCE:g}: {'yes' if ok3 else 'no'}). Best-lr test accuracy: {arms}")
    if mode != "full":
        return "report", f"{mode_label(mode)}: {text}"
    return ("pass" if ok1 and ok2 and ok3 else "fail"), text


# ---- bcn_ws.report (report-only) ----

REPORT_ARMS = ("bn_relu@4", "gn_relu@4", "gn_ws@4", "bcn_ws@4", "bn_relu@64", "gn_relu@64")


def verdict_report(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, REPORT_ARMS)
    parts = [describe_gap("batch 64: GN - BN", paired_gaps(records, "gn_relu", "bn_relu", 64))]
    parts += [describe_gap(f"batch 4: {LABELS[norm]} - BN", paired_gaps(records, norm, "bn_relu", 4))
              for norm in ("gn_relu", "gn_ws", "bcn_ws")]
    arms = "; ".join(describe_arm(records, *parse_arm(arm)) for arm in REPORT_ARMS)
    text = f"{'; '.join(parts)}. Best-lr test accuracy: {arms}"
    return "report", (f"{mode_label(mode)}: {text}" if mode != "full" else f"report-only: {text}")


def grids(quick_arms: tuple[str, ...]) -> dict[str, Grid]:
    """Full: the shared 72-run grid; quick: the check's own arms at one lr and seed; smoke: likewise."""
    return {"full": Grid(ARMS, LRS, SEEDS, FULL_BUDGET_S),
            "quick": Grid(quick_arms, (QUICK_LR,), (0,), QUICK_BUDGET_S),
            "smoke": Grid(quick_arms, (QUICK_LR,), (0,), SMOKE_BUDGET_S)}


METRIC = "eval-mode test accuracy of a small CNN on the 540 digits test images after training"
PROTOCOL = ("best lr per arm (norm, batch size) by seed-mean accuracy, lr in {1e-3, 3e-3}, seeds {0, 1, 2}, "
            "batch 4 for 2 epochs and batch 64 for 10 epochs; gaps paired by seed")

def register_check(id: str, claim: str, baseline: str, pass_rule: str, quick_arms: tuple[str, ...],
                   verdict) -> Experiment:
    """Register one check over the shared runs (this module's and the evonorm checks): the common metric,
    protocol, grids, run and shared key; ``pass_rule`` follows the protocol."""
    return register(Experiment(id=id, claim=claim, baseline=baseline, metric=METRIC, primary_metric="test_acc",
                               pass_rule=f"{PROTOCOL}; {pass_rule}", grids=grids(quick_arms), run=run,
                               verdict=verdict, shared_key=shared_key))


SMALL_BATCH = register_check(
    "bcn_ws.small_batch",
    "Weight Standardization makes GroupNorm train well at micro-batch size (batch 4), BCN+WS matches "
    "GN+WS there, and both lose nothing against BatchNorm at a normal batch size (64).",
    "GN+ReLU at batch 4; BN+ReLU at batch 64 (same CNN, data, optimiser, lr grid and seeds)",
    "pass iff (1) batch 4: GN+WS >= GN + 0.5 points in at least 2 of 3 seeds, "
    "(2) batch 4: mean BCN+WS >= mean GN+WS - 1 point, (3) batch 64: mean GN+WS and mean BCN+WS "
    "each >= mean BN - 1.5 points",
    GATE_ARMS, verdict_small_batch)

REPORT = register_check(
    "bcn_ws.report",
    "Report only: GroupNorm against BatchNorm at batch 64, and GN, GN+WS, BCN+WS against BatchNorm at "
    "batch 4 (BN did not degrade at batch 4 on this data, so 'beats BN' is not testable here).",
    "BN+ReLU at the same batch size",
    "report-only (the margins are not well outside the seed spread)",
    REPORT_ARMS, verdict_report)
