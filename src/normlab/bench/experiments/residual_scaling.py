"""Claim check of residual-branch scaling (Dherin & Munn 2025, "On residual network depth", arXiv:2510.03470):
with ``alpha = 1`` the output signal of a residual tower explodes with depth (the path count grows as 2^n), and
scaling every branch by ``1/sqrt(n)`` or ``1/n`` keeps it bounded.

``residual_scaling.signal`` (gate, no training; the sheet's section b): towers of n random ReLU MLP branches
``f_i(h) = W2 relu(W1 h)`` (:func:`normlab.analysis.signal.random_relu_branch`: ``W1 ~ N(0, 2/d)``,
``W2 ~ N(0, 1/d)``, no biases), d = 256, 512 Gaussian inputs, depths n in {4, 16, 64, 256}, seed 0, through
:func:`normlab.analysis.signal.residual_signal_growth` (float64, log space). Arms: ``alpha_1`` (rule "none"),
``alpha_1_sqrt_n`` ("1/sqrt(n)") and ``alpha_1_n`` ("1/n"). Metric: ``log10`` of the sample mean of
``||h_n|| / ||h_0||`` at init. Pass iff alpha = 1 has ratio > 50 at n = 16 and > 1e6 at n = 64, alpha =
1/sqrt(n) stays in [1.2, 2.5] and alpha = 1/n in [0.9, 1.3] at every depth. The log-ratio per block of the
alpha = 1 arm (the sheet: about 0.35, E||h||^2 doubling per block) is reported. Quick: the sheet's prototype
size (d = 128, 128 inputs), status ``report`` with the rule's outcome; smoke: d = 16, 16 inputs, n in {4, 16}.

``residual_scaling.training`` (gate; the sheet's optional training check): scikit-learn digits (train split,
flattened to 64 features), ``Linear(64, 64)`` -> 32 residual branches of the same random ReLU MLP (width 64,
no normalisation) wrapped by :func:`normlab.layers.residual.scale_residual_branches` -> ``Linear(64, 10)``;
Adam lr 1e-3, 300 steps, seeds {0, 1, 2}. Arms: ``alpha_1`` (rule "none"), ``alpha_1_n`` ("1/n") and
``skipinit`` (learnable alpha from 0). Metric: cross-entropy on the whole train split after training
(``final_loss``; NaN when a step's loss went non-finite, which stops the run). Pass iff on every seed alpha = 1
diverges or ends with a loss over 2x that of alpha = 1/n, and alpha = 1/n and SkipInit train stably (every loss
finite and the final loss below the first step's). Test accuracy is reported, not gated (the sheet: 1/n may
end below normalised nets; no parity is asserted). Choices where the sheet is silent, fixed before any run:
batch 128 drawn with replacement from a seeded generator (the same batches for every arm of a seed), stem and
head ``N(0, 1/fan_in)`` with zero biases, all weights from ``torch.Generator().manual_seed(seed)``. Quick:
seed 0, 150 steps (status ``report``); smoke: 5 steps.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.signal import random_relu_branch, residual_signal_growth
from ...layers.residual import scale_residual_branches
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register
from ..tasks import digits

ARMS = ("alpha_1", "alpha_1_sqrt_n", "alpha_1_n")
RULE = {"alpha_1": "none", "alpha_1_sqrt_n": "1/sqrt(n)", "alpha_1_n": "1/n", "skipinit": "skipinit"}
LABELS = {"alpha_1": "alpha = 1", "alpha_1_sqrt_n": "alpha = 1/sqrt(n)", "alpha_1_n": "alpha = 1/n",
          "skipinit": "SkipInit"}
DEPTHS = {"full": (4, 16, 64, 256), "quick": (4, 16, 64, 256), "smoke": (4, 16)}
WIDTH = {"full": 256, "quick": 128, "smoke": 16}
SAMPLES = {"full": 512, "quick": 128, "smoke": 16}
EXPLODE = {16: 50.0, 64: 1e6}  # alpha = 1: ratio above these at these depths
BANDS = {"alpha_1_sqrt_n": (1.2, 2.5), "alpha_1_n": (0.9, 1.3)}

TRAIN_ARMS = ("alpha_1", "alpha_1_n", "skipinit")
N_BLOCKS, TRAIN_WIDTH, BATCH, LR = 32, 64, 128, 1e-3
STEPS = {"full": 300, "quick": 150, "smoke": 5}
LOSS_FACTOR = 2.0


def run_signal(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    growth = residual_signal_growth(random_relu_branch, DEPTHS[mode], RULE[arm], WIDTH[mode], SAMPLES[mode], seed)
    metrics = {f"log10_ratio_{n}": v for n, v in growth.items()}
    return {"metrics": metrics, "curves": {"log10_ratio": [[n, v] for n, v in growth.items()]}}


def _fmt_ratio(log10: float) -> str:
    return f"{10 ** log10:.3g}" if log10 < 300 else f"1e{log10:.0f}"


def signal_rule(records: list[Record]) -> tuple[bool, str]:
    """The sheet's rule on the signal records of one seed each: (holds, summary)."""
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in records[0]["metrics"] if k.startswith("log10_ratio_"))
    by_arm = {arm: {n: records_by_arm(records, f"log10_ratio_{n}")[(arm, None)] for n in depths} for arm in ARMS}
    parts, ok = [], True
    explode = by_arm["alpha_1"]
    for n, bound in EXPLODE.items():
        if n in explode:
            holds = all(math.isfinite(v) and v > math.log10(bound) for v in explode[n])
            ok &= holds
            parts.append(f"alpha = 1 at n = {n}: ratio {', '.join(_fmt_ratio(v) for v in explode[n])} "
                         f"(need > {bound:g}: {'yes' if holds else 'no'})")
    slope = [v * math.log(10) / depths[-1] for v in explode[depths[-1]]]
    parts.append(f"alpha = 1 log-ratio per block at n = {depths[-1]}: {', '.join(f'{s:.3f}' for s in slope)} "
                 "(sheet ~0.35)")
    for arm, (lo, hi) in BANDS.items():
        vals = {n: by_arm[arm][n] for n in depths}
        holds = all(math.isfinite(v) and math.log10(lo) <= v <= math.log10(hi) for vs in vals.values() for v in vs)
        ok &= holds
        listed = " / ".join(",".join(f"{10 ** v:.3f}" for v in vals[n]) for n in depths)
        parts.append(f"{LABELS[arm]}: ratio at n = {'/'.join(map(str, depths))}: {listed} "
                     f"(need in [{lo}, {hi}] at every n: {'yes' if holds else 'no'})")
    listed = " / ".join(",".join(_fmt_ratio(v) for v in explode[n]) for n in depths)
    parts.append(f"alpha = 1: ratio at n = {'/'.join(map(str, depths))}: {listed}")
    return ok, "; ".join(parts)


def verdict_signal(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    ok, text = signal_rule(records)
    if mode == "full":
        return ("pass" if ok else "fail"), text
    label = ("indicative (quick: the prototype's d = 128, 128 inputs" if mode == "quick"
             else "smoke (d = 16, 16 inputs, n <= 16")
    return "report", f"{label}; rule would {'pass' if ok else 'fail'}): {text}"


class ResidualMLP(nn.Module):
    """``Linear(64, 64)`` -> ``N_BLOCKS`` scaled random ReLU MLP branches -> ``Linear(64, 10)``, no norms."""

    def __init__(self, arm: str, generator: torch.Generator) -> None:
        super().__init__()
        if arm not in TRAIN_ARMS:
            raise ValueError(f"unknown arm {arm!r}; valid: {list(TRAIN_ARMS)}")
        self.stem = nn.Linear(64, TRAIN_WIDTH)
        branches = [random_relu_branch(TRAIN_WIDTH, generator) for _ in range(N_BLOCKS)]
        self.tower = nn.Sequential(*scale_residual_branches(branches, RULE[arm]))
        self.head = nn.Linear(TRAIN_WIDTH, 10)
        with torch.no_grad():
            for layer in (self.stem, self.head):
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features), generator=generator)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(self.stem(x.flatten(1))))


def run_training(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    x, y = digits("train")
    x_test, y_test = digits("test")
    model = ResidualMLP(arm, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen = torch.Generator().manual_seed(seed + 1000)
    losses = []
    for _ in range(STEPS[mode]):
        idx = torch.randint(0, len(x), (BATCH,), generator=data_gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            break
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
        acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    diverged = len(losses) < STEPS[mode] or not math.isfinite(final)
    if diverged:
        final, acc = math.nan, math.nan
    return {"metrics": {"final_loss": final, "first_loss": losses[0] if losses else math.nan, "test_acc": acc,
                        "diverged": float(diverged)},
            "curves": {"train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}


def training_rule(records: list[Record]) -> tuple[bool, str]:
    final = records_by_arm(records, "final_loss")
    first = records_by_arm(records, "first_loss")
    acc = records_by_arm(records, "test_acc")
    seeds = sorted({rec["seed"] for rec in records})
    key = {arm: next(k for k in final if k[0] == arm) for arm in TRAIN_ARMS}
    ok, per_seed = True, []
    for i, seed in enumerate(seeds):
        one, inv_n = final[key["alpha_1"]][i], final[key["alpha_1_n"]][i]
        exploded = not math.isfinite(one) or (math.isfinite(inv_n) and one > LOSS_FACTOR * inv_n)
        stable = {arm: math.isfinite(final[key[arm]][i]) and final[key[arm]][i] < first[key[arm]][i]
                  for arm in ("alpha_1_n", "skipinit")}
        seed_ok = exploded and all(stable.values())
        ok &= seed_ok
        per_seed.append(f"seed {seed}: alpha = 1 diverged or > {LOSS_FACTOR:g}x alpha = 1/n: "
                        f"{'yes' if exploded else 'no'}, 1/n stable: {'yes' if stable['alpha_1_n'] else 'no'}, "
                        f"SkipInit stable: {'yes' if stable['skipinit'] else 'no'}")
    numbers = "; ".join(
        f"{LABELS[arm]}: final train loss [{', '.join(f'{v:.3g}' for v in final[key[arm]])}] (first step "
        f"[{', '.join(f'{v:.3g}' for v in first[key[arm]])}]), test acc "
        f"[{', '.join(f'{v:.3f}' for v in acc[key[arm]])}]" for arm in TRAIN_ARMS)
    return ok, "; ".join(per_seed) + ". " + numbers


def verdict_training(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, TRAIN_ARMS)
    ok, text = training_rule(records)
    if mode == "full":
        return ("pass" if ok else "fail"), text
    label = "indicative (quick: seed 0, 150 steps" if mode == "quick" else "smoke (5 steps"
    return "report", f"{label}; rule would {'pass' if ok else 'fail'}): {text}"


SIGNAL = register(Experiment(
    id="residual_scaling.signal",
    claim="Path explosion and its cure: at init the output/input norm ratio of a tower of random ReLU residual "
          "branches grows exponentially with depth for alpha = 1, and stays bounded when every branch is scaled "
          "by 1/sqrt(n) or 1/n.",
    baseline="the same towers and inputs with unscaled branches (alpha = 1)",
    metric="log10 of the mean ||h_n|| / ||h_0|| over 512 Gaussian inputs at init, d = 256, n in {4, 16, 64, 256} "
           "(float64, log space)",
    primary_metric="log10_ratio_64",
    pass_rule="pass iff alpha = 1 ratio > 50 at n = 16 and > 1e6 at n = 64, alpha = 1/sqrt(n) ratio in [1.2, 2.5] "
              "and alpha = 1/n ratio in [0.9, 1.3] at every n (seed 0)",
    grids={
        "full": Grid(ARMS, (None,), (0,), 1200.0),
        "quick": Grid(ARMS, (None,), (0,), 30.0),
        "smoke": Grid(ARMS, (None,), (0,), 10.0),
    },
    run=run_signal,
    verdict=verdict_signal,
))

TRAINING = register(Experiment(
    id="residual_scaling.training",
    claim="Without normalisation a 32-block residual MLP with unscaled branches (alpha = 1) diverges or ends far "
          "worse than with branches scaled by 1/n; 1/n and SkipInit train stably.",
    baseline="the same 32-block residual MLP, data, optimiser and steps with alpha = 1",
    metric="cross-entropy on the digits train split after 300 Adam steps (lr 1e-3, batch 128); NaN = diverged",
    primary_metric="final_loss",
    pass_rule="pass iff on every seed (0, 1, 2) alpha = 1 diverges or its final loss > 2x that of alpha = 1/n, "
              "and alpha = 1/n and SkipInit train stably (finite, final loss below the first step's)",
    grids={
        "full": Grid(TRAIN_ARMS, (LR,), (0, 1, 2), 1200.0),
        "quick": Grid(TRAIN_ARMS, (LR,), (0,), 30.0),
        "smoke": Grid(TRAIN_ARMS, (LR,), (0,), 10.0),
    },
    run=run_training,
    verdict=verdict_training,
))
