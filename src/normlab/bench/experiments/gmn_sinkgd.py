"""Claim check of SinkGD (Scetbon et al. 2025, gradient multi-normalization): stateless SinkGD, with no
optimizer state for the weight matrices, is at least as good as AdamW at equal tuning.

The task, data, model, schedule, seeds and AdamW arm are those of the ``swan`` check (see
:mod:`normlab.bench.experiments.swan`); the AdamW runs are shared with it through ``Experiment.shared_key``.
Arm ``sinkgd``: :class:`normlab.optim.SinkGD` with L = 5 on the routing of
:func:`normlab.optim.sinkgd_param_groups`, the fallback Adam at 3e-3 and matrix lr in {3e-3, 1e-2, 3e-2}
(``lr=3e-3``, ``matrix_lr_scale`` in {1, 10/3, 10}); the paper recipe's scale 0.05 is a large-model
setting, far too small at this size. The best lr per arm has the lowest seed-mean final validation loss.

Pass (both): (i) exact optimizer state bytes as in the swan check (Adam moments of the 75,008 fallback
parameters plus step counters; AdamW: all 468,224); (ii) SinkGD's best-lr mean validation curve reaches
AdamW's best-lr mean final loss within the run (first crossing <= T = 300 steps). The crossing step / T and
the final-loss gap are reported, not gated: the paper's token saving (about 2.5x) did not reproduce at this
scale in the sheet's calibration. Quick (indicative): seed 0, 100 steps, lr 1e-2 in both arms; pass iff
SinkGD's step-100 validation loss <= AdamW's. Smoke: report only.
"""

from __future__ import annotations

import torch
from torch import nn

from ...optim.sinkgd import SinkGD, sinkgd_param_groups
from ..experiment import Experiment, Grid, Record, records_mode, register
from .swan import FALLBACK_LR, LRS, adamw_optimizer, compare, describe, shared_key, state_bytes_check, train_lm

ARMS = ("adamw", "sinkgd")


def sinkgd_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return SinkGD(sinkgd_param_groups(model, FALLBACK_LR), matrix_lr_scale=lr / FALLBACK_LR, num_iters=5)


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    makers = {"adamw": adamw_optimizer, "sinkgd": sinkgd_optimizer}
    if arm not in makers:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(makers)}")
    return train_lm(makers[arm], lr, seed, mode)


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    c = compare(records, "sinkgd")
    state_ok, state_text = state_bytes_check(records, "sinkgd")
    numbers = f"{describe(c, 'SinkGD')}; {state_text}"
    if mode == "smoke":
        return "report", f"smoke: {numbers}"
    if mode == "quick":
        ok = c["gap"] >= 0
        return ("pass" if ok else "fail"), (f"indicative (quick: seed 0, {c['steps']} steps, lr 1e-2): SinkGD "
                                            f"{'<=' if ok else '>'} AdamW. {numbers}")
    reached = c["crossing"] is not None
    status = "pass" if state_ok and reached else "fail"
    return status, (f"(i) state bytes exact: {'yes' if state_ok else 'no'}; (ii) reaches AdamW's final loss "
                    f"within T: {'yes' if reached else 'no'}. {numbers}")


EXPERIMENT = register(Experiment(
    id="gmn_sinkgd",
    claim="SinkGD, with no optimizer state for the weight matrices, trains a small GPT language model at least "
          "as well as AdamW at equal tuning (the paper's token saving is reported, not gated).",
    baseline="torch AdamW on every parameter (the swan check's runs), same data, model, schedule, lr grid, seeds",
    metric="validation next-byte cross-entropy (nats) of a 2-block GPT on stdlib sources; optimizer state bytes",
    primary_metric="val_loss",
    pass_rule="best lr per arm by seed-mean final val loss (matrix lr in {3e-3, 1e-2, 3e-2}, seeds {0, 1}); "
              "pass iff state bytes are exactly Adam moments on the 75,008 fallback parameters (+ step "
              "counters) and SinkGD's mean val curve reaches AdamW's best final loss within the 300 steps",
    grids={
        "full": Grid(ARMS, LRS, (0, 1), 1200.0),
        "quick": Grid(ARMS, (1e-2,), (0,), 30.0),
        "smoke": Grid(ARMS, (1e-2,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
    shared_key=shared_key,
))
