"""Claim checks of AdamP / SGDP (Heo et al., ICLR 2021): on scale-invariant weights, removing the radial
component of the update stops momentum from inflating the weight norm (the mechanism), at no cost in
accuracy.

Setup (both checks): scikit-learn digits (pixels / 16, stratified split with random_state 0: 1400 train,
397 held-out), MLP 64 -> 128 -> 128 -> 10 whose two hidden blocks are Linear(bias=False) -> BatchNorm1d ->
ReLU (so both hidden weights are scale invariant per output channel) and whose head is a plain Linear;
PyTorch's default init seeded by the run seed (the arms of a seed start from the same weights),
cross-entropy, batch 64 from a per-epoch reshuffle drawn by a generator seeded by the run seed (the arms of
a seed see the same batches), 400 steps, no weight decay. Metrics: ``w2_norm_ratio`` = ||W2_T|| / ||W2_0||
of the second hidden weight (128x128, Frobenius), also ``w1_norm_ratio`` for the first, the held-out
accuracy in % after the last step (``eval()``: BatchNorm's running statistics), and the mean training loss
of the last 20 steps.

``adamp.sgdp``: ``torch.optim.SGD(momentum=0.9)`` vs ``SGDP(momentum=0.9)`` (defaults delta 0.1,
wd_ratio 0.1), lr in {0.1, 0.3}. ``adamp``: ``torch.optim.Adam`` vs ``AdamP`` (betas (0.9, 0.999),
eps 1e-8), lr in {3e-3, 1e-2}. Same grid for both arms of a check, seeds {0, 1, 2}.

Pass rule (the sheet's, full mode): at every lr, with seed means, the projected arm's norm ratio is below
the baseline's and ``ratio_P - 1 <= 0.5 (ratio_base - 1)``; and the projected arm's best-lr accuracy (by
seed mean) is at most 1 point below the baseline's best-lr accuracy. No accuracy gain is asserted: at this
scale the sheet measured parity (the paper's ImageNet gains are 0.5-1 pt). Quick: seed 0, both lrs, the
same 400 steps, status ``report`` (the sheet gives no quick rule). Smoke: 5 steps, one lr, report.
"""

from __future__ import annotations

from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...optim.adamp import SGDP, AdamP
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register
from ..tasks import digits

WIDTH, BATCH, MOMENTUM = 128, 64, 0.9
TEST_FRACTION = 397 / 1797  # 397 held-out digits, as in the sheet
STEPS = {"full": 400, "quick": 400, "smoke": 5}
LOSS_WINDOW, CURVE_EVERY = 20, 10
GROWTH_FRACTION = 0.5  # the projected arm may keep at most this fraction of the baseline's norm growth
ACC_GAP = 1.0  # accuracy points the projected arm may trail the baseline by
PAIRS = {"adamp.sgdp": ("sgd", "sgdp"), "adamp": ("adam", "adamp")}
LRS = {"adamp.sgdp": (0.1, 0.3), "adamp": (3e-3, 1e-2)}


def make_model() -> nn.Sequential:
    """64 -> 128 -> 128 -> 10 with Linear(bias=False) + BatchNorm1d + ReLU hidden blocks; ``[4]`` is W2."""
    return nn.Sequential(nn.Flatten(),
                         nn.Linear(64, WIDTH, bias=False), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH, bias=False), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, 10))


def make_optimizer(arm: str, params, lr: float) -> torch.optim.Optimizer:
    if arm == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if arm == "sgdp":
        return SGDP(params, lr=lr, momentum=MOMENTUM)
    if arm == "adam":
        return torch.optim.Adam(params, lr=lr)
    if arm == "adamp":
        return AdamP(params, lr=lr)
    raise ValueError(f"unknown arm {arm!r}; valid: {sorted(a for pair in PAIRS.values() for a in pair)}")


def batches(n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches of ``BATCH`` from a per-epoch reshuffle (the last partial batch of an epoch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out[:steps]


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    x_train, y_train = digits("train", test_fraction=TEST_FRACTION)
    x_test, y_test = digits("test", test_fraction=TEST_FRACTION)
    torch.manual_seed(seed)
    model = make_model()
    opt = make_optimizer(arm, model.parameters(), lr)
    w1, w2 = model[1].weight, model[4].weight
    n1, n2 = w1.detach().norm().item(), w2.detach().norm().item()
    losses, ratio_curve = [], [[0, 1.0]]
    for step, idx in enumerate(batches(len(y_train), STEPS[mode], seed), start=1):
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % CURVE_EVERY == 0 or step == STEPS[mode]:
            ratio_curve.append([step, w2.detach().norm().item() / n2])
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    window = losses[-LOSS_WINDOW:]
    return {"metrics": {"w2_norm_ratio": w2.detach().norm().item() / n2,
                        "w1_norm_ratio": w1.detach().norm().item() / n1,
                        "test_acc": acc, "train_loss": sum(window) / len(window)},
            "curves": {"w2_norm_ratio": ratio_curve, "train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}



def _verdict(records: list[Record], experiment_id: str) -> tuple[str, str]:
    base, proj = PAIRS[experiment_id]
    mode = records_mode(records, (base, proj))
    ratios = records_by_arm(records, "w2_norm_ratio")
    lrs = sorted({lr for arm, lr in ratios if arm == proj} & {lr for arm, lr in ratios if arm == base})
    if not lrs:
        raise ValueError(f"no lr with records of both {base} and {proj}")
    growth_ok, lines = True, []
    for lr in lrs:
        r_base, r_proj = fmean(ratios[(base, lr)]), fmean(ratios[(proj, lr)])
        ok = r_proj < r_base and r_proj - 1 <= GROWTH_FRACTION * (r_base - 1)
        growth_ok &= ok
        frac = (r_proj - 1) / (r_base - 1) if r_base != 1 else float("nan")
        lines.append(f"lr {lr:g}: ||W2_T||/||W2_0|| {base} {r_base:.3f} vs {proj} {r_proj:.3f} "
                     f"(growth fraction {frac:.2f}, {'ok' if ok else 'NOT ok'})")
    acc = {}
    for arm in (base, proj):
        lr, vals = best_lr(records, arm, "test_acc", lower_is_better=False)
        acc[arm] = (lr, fmean(vals), len(vals))
    acc_ok = acc[proj][1] >= acc[base][1] - ACC_GAP
    numbers = "; ".join(lines) + "; best-lr held-out accuracy " + ", ".join(
        f"{arm} {a:.2f}% (lr {lr:g}, {n} seed(s))" for arm, (lr, a, n) in acc.items())
    if mode != "full":
        label = "indicative (quick: seed 0 only)" if mode == "quick" else "smoke"
        return "report", f"{label}: {numbers}"
    status = "pass" if growth_ok and acc_ok else "fail"
    return status, (f"norm growth: {proj} below {base} with at most {GROWTH_FRACTION:g} of its growth at every lr: "
                    f"{'yes' if growth_ok else 'no'}; accuracy within {ACC_GAP:g} pt: {'yes' if acc_ok else 'no'}. "
                    f"{numbers}")


def verdict_sgdp(records: list[Record]) -> tuple[str, str]:
    return _verdict(records, "adamp.sgdp")


def verdict_adamp(records: list[Record]) -> tuple[str, str]:
    return _verdict(records, "adamp")


def _grids(experiment_id: str) -> dict[str, Grid]:
    arms, lrs = PAIRS[experiment_id], LRS[experiment_id]
    return {"full": Grid(arms, lrs, (0, 1, 2), 1200.0), "quick": Grid(arms, lrs, (0,), 30.0),
            "smoke": Grid(arms, lrs[:1], (0,), 10.0)}


_COMMON = dict(
    metric="||W2_T|| / ||W2_0|| of the BatchNorm'd 128x128 hidden weight after 400 steps (seed mean per lr), "
           "and held-out accuracy (%) at each arm's best lr",
    primary_metric="w2_norm_ratio",
    pass_rule=f"at every lr: ratio_P < ratio_base and ratio_P - 1 <= {GROWTH_FRACTION:g} (ratio_base - 1) "
              f"(seed means, seeds 0-2); and best-lr accuracy of P >= best-lr accuracy of the baseline - "
              f"{ACC_GAP:g} pt",
    run=run,
)

SGDP_EXPERIMENT = register(Experiment(
    id="adamp.sgdp",
    claim="SGDP removes the radial component of momentum SGD's update on scale-invariant (BatchNorm'd) weights, "
          "so their norm grows far less than under SGD with momentum, with no loss of accuracy.",
    baseline="torch.optim.SGD(momentum=0.9), same lr grid {0.1, 0.3}, data, init and seeds",
    grids=_grids("adamp.sgdp"),
    verdict=verdict_sgdp,
    **_COMMON,
))

EXPERIMENT = register(Experiment(
    id="adamp",
    claim="AdamP removes the radial component of Adam's update on scale-invariant (BatchNorm'd) weights, so their "
          "norm grows far less than under Adam, with no loss of accuracy.",
    baseline="torch.optim.Adam, same lr grid {3e-3, 1e-2}, data, init and seeds",
    grids=_grids("adamp"),
    verdict=verdict_adamp,
    **_COMMON,
))
