"""Claim check of TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024): training the first layer's
pre-activations reaches a target accuracy in fewer steps than the plain optimizer.

Task (the spec sheet's): scikit-learn's digits, pixels / 16 in [0, 1] (not standardised, so the first layer
sees unequal input scales), flattened to 64 features; stratified 70/30 split (random_state 0): 1,257 train
and 540 test samples. Model: ``Linear(64, 128) - ReLU - Linear(128, 10)``, default init. Batch 64,
reshuffled every epoch by a generator seeded per run; 300 steps at a constant lr, no weight decay. Arms:
``tract`` (the first Linear converted by :func:`normlab.training.tract.convert_first_layer`, lambda 0.1)
and ``baseline`` (the same model), with the same init and batch order per seed. Test accuracy every 5
steps; metric: steps to 95 % test accuracy (600 when it is never reached or the loss turns NaN). Also
recorded: steps to 97 %, final test accuracy and full-train-set cross-entropy at the last step.

Checks:
- ``tract.sgd`` (gate): SGD with momentum 0.9, lr in {0.03, 0.1, 0.3, 1.0}, seeds 0-4;
- ``tract.adam`` (gate): Adam, lr in {3e-3, 1e-2, 3e-2, 1e-1}, seeds 0-4.
  Pass rule (each): best lr per arm by the seed mean of steps to 95 %; (1) TrAct's best <= 0.7 x the
  baseline's best; (2) no harm: TrAct's best-over-grid mean final test accuracy >= the baseline's - 0.01.
  Quick (the sheet's quick protocol, indicative): Adam at lr 1e-2, seed 0, 150 steps, pass iff TrAct's
  steps to 95 % <= 0.7 x the baseline's. The sheet gives no SGD quick rule: SGD quick runs the same
  shape (lr 0.3, seed 0, 150 steps) with status ``report``.
- ``tract.conv`` (report-only, the sheet did not measure it): a ``Conv2d(1, 32, 3) - ReLU - Flatten -
  Linear(1152, 10)`` model on the 8 x 8 images with TrAct on the conv, Adam on the Adam grid, seeds 0-4.
Smoke: 10 steps, one lr, seed 0, status ``report``.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from statistics import fmean, stdev

import torch
import torch.nn.functional as F
from torch import nn

from ...training.tract import convert_first_layer
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register
from ..tasks import digits

ARMS = ("baseline", "tract")
LAMBDA = 0.1
BATCH = 64
EVAL_EVERY = 5
STEPS = {"full": 300, "quick": 150, "smoke": 10}
NEVER = 600  # steps counted for a run that never reaches the target or diverges
TARGETS = (0.95, 0.97)
RATIO = 0.7
HARM = 0.01  # accuracy points (as a fraction) TrAct's best final accuracy may lose
SEEDS = (0, 1, 2, 3, 4)
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
ADAM_LRS = (3e-3, 1e-2, 3e-2, 1e-1)


@lru_cache(maxsize=1)
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened digits in [0, 1]: (x_train (1257, 64), y_train, x_test (540, 64), y_test); cached, never
    modified by the runs."""
    x_tr, y_tr = digits("train", test_fraction=0.3, seed=0)
    x_te, y_te = digits("test", test_fraction=0.3, seed=0)
    return x_tr.flatten(1), y_tr, x_te.flatten(1), y_te


def make_model(kind: str) -> nn.Sequential:
    """``"mlp"``: Linear(64, 128)-ReLU-Linear(128, 10) on flat pixels; ``"conv"``: Conv2d(1, 32, 3)-ReLU-
    Flatten-Linear(1152, 10) on (N, 1, 8, 8) images. Initialised from the global RNG (seeded by the caller)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if kind == "conv":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(32 * 6 * 6, 10))
    raise ValueError(f"unknown model {kind!r}; valid: ['mlp', 'conv']")


FIRST_LAYER = {"mlp": "0", "conv": "1"}
OPTIMIZERS = {"sgd": partial(torch.optim.SGD, momentum=0.9), "adam": torch.optim.Adam}


def batches(n: int, generator: torch.Generator):
    """Index batches of size ``BATCH`` forever, reshuffled every epoch (the last one of an epoch may be short)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(BATCH)


def steps_to(curve: list[list[float]], target: float) -> int:
    """First evaluated step whose test accuracy is >= target, else :data:`NEVER`."""
    return next((int(step) for step, acc in curve if acc >= target), NEVER)


def train(arm: str, lr: float, seed: int, mode: str, *, optimizer: str, model_kind: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    x_tr, y_tr, x_te, y_te = load_data()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_model(model_kind)
    if arm == "tract":
        convert_first_layer(model, FIRST_LAYER[model_kind], LAMBDA)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    order = batches(len(y_tr), torch.Generator().manual_seed(seed))
    losses, accs, diverged = [], [], False
    for step in range(1, STEPS[mode] + 1):
        idx = next(order)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append([step, loss.item()])
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                accs.append([step, (model(x_te).argmax(1) == y_te).float().mean().item()])
    with torch.no_grad():
        train_ce = F.cross_entropy(model(x_tr), y_tr).item()
    diverged = diverged or not math.isfinite(train_ce)
    metrics = {f"steps_to_{round(100 * t)}": float(NEVER if diverged else steps_to(accs, t)) for t in TARGETS}
    metrics["final_test_acc"] = math.nan if diverged else accs[-1][1]
    metrics["final_train_ce"] = math.nan if diverged else train_ce
    metrics["diverged"] = float(diverged)
    return {"metrics": metrics, "curves": {"test_acc": accs, "train_loss": losses}}


def _per_lr_table(records: list[Record]) -> str:
    """Mean ± sample std of steps to 95 % per arm and lr."""
    steps = records_by_arm(records, "steps_to_95")
    parts = []
    for arm in ARMS:
        cells = [f"{lr:g}: {fmean(v):.0f}±{stdev(v) if len(v) > 1 else 0.0:.0f}"
                 for (a, lr), v in sorted(steps.items(), key=lambda kv: kv[0][1]) if a == arm]
        parts.append(f"{arm} steps to 95% by lr {{{', '.join(cells)}}}")
    return "; ".join(parts)


def _best(records: list[Record], arm: str) -> dict:
    lr, steps95 = best_lr(records, arm, "steps_to_95")
    _, steps97 = best_lr(records, arm, "steps_to_97")
    acc_lr, accs = best_lr(records, arm, "final_test_acc", lower_is_better=False)
    return {"lr": lr, "steps95": fmean(steps95), "per_seed95": steps95, "steps97": fmean(steps97),
            "acc_lr": acc_lr, "acc": fmean(accs)}


def summarize(records: list[Record]) -> tuple[dict, dict, str]:
    """Best-lr numbers of both arms and a one-paragraph summary (ratios, per-seed ratios, accuracies)."""
    base, tr = _best(records, "baseline"), _best(records, "tract")
    ratio95 = tr["steps95"] / base["steps95"]
    per_seed = [t / b for t, b in zip(tr["per_seed95"], base["per_seed95"])]
    text = (f"best-vs-best steps to 95%: TrAct {tr['steps95']:.1f} (lr {tr['lr']:g}) vs baseline "
            f"{base['steps95']:.1f} (lr {base['lr']:g}), ratio {ratio95:.2f} (per seed "
            f"{min(per_seed):.2f}-{max(per_seed):.2f}); at 97%: {tr['steps97']:.1f} vs {base['steps97']:.1f} "
            f"(ratio {tr['steps97'] / base['steps97']:.2f}); best-over-grid mean final test accuracy TrAct "
            f"{tr['acc']:.3f} (lr {tr['acc_lr']:g}) vs baseline {base['acc']:.3f} (lr {base['acc_lr']:g}). "
            f"{_per_lr_table(records)}")
    return base, tr, text


def gate_verdict(records: list[Record], *, quick_rule: bool) -> tuple[str, str]:
    """The sheet's pass rule in full mode; its quick rule (steps ratio only, indicative) in quick mode when
    ``quick_rule``; status ``report`` otherwise."""
    mode = records_mode(records, ARMS)
    base, tr, text = summarize(records)
    ratio = tr["steps95"] / base["steps95"]
    speed_ok = ratio <= RATIO
    if mode == "quick" and quick_rule:
        status = "pass" if speed_ok else "fail"
        return status, (f"indicative (quick: one lr, seed 0, {STEPS['quick']} steps): TrAct steps to 95% "
                        f"{tr['steps95']:.0f} vs baseline {base['steps95']:.0f}, ratio {ratio:.2f} "
                        f"(need <= {RATIO}: {'yes' if speed_ok else 'no'}). {text}")
    if mode != "full":
        label = f"indicative (quick: one lr, seed 0, {STEPS['quick']} steps)" if mode == "quick" else "smoke"
        return "report", f"{label}: {text}"
    harm_ok = tr["acc"] >= base["acc"] - HARM
    status = "pass" if speed_ok and harm_ok else "fail"
    return status, (f"(1) speed ratio {ratio:.2f} (need <= {RATIO}: {'yes' if speed_ok else 'no'}); (2) final "
                    f"accuracy {tr['acc']:.3f} vs {base['acc']:.3f} (need >= baseline - {HARM}: "
                    f"{'yes' if harm_ok else 'no'}). {text}")


def report_verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    return "report", f"report-only ({mode}; not measured in the sheet): {summarize(records)[2]}"


def _grids(lrs: tuple[float, ...], quick_lr: float) -> dict[str, Grid]:
    return {"full": Grid(ARMS, lrs, SEEDS, 1200.0), "quick": Grid(ARMS, (quick_lr,), (0,), 30.0),
            "smoke": Grid(ARMS, (quick_lr,), (0,), 10.0)}


CLAIM = ("TrAct (a closed-form ridge update of the first layer's pre-activations) reaches 95% test accuracy in "
         "at most 0.7x the steps of the plain optimizer, best lr against best lr, without losing final accuracy.")
METRIC = "steps to 95% test accuracy (evaluated every 5 steps; 600 if never reached or diverged)"
PASS_RULE = ("best lr per arm by the seed mean of steps to 95% (seeds 0-4); pass iff TrAct's best <= 0.7 x the "
             "baseline's best and TrAct's best-over-grid mean final test accuracy >= the baseline's - 0.01. "
             "Quick: {quick}")

SGD = register(Experiment(
    id="tract.sgd",
    claim=CLAIM + " (SGD with momentum 0.9)",
    baseline="the same MLP, init and batch order, plain SGD with momentum 0.9 on the same lr grid",
    metric=METRIC,
    primary_metric="steps_to_95",
    pass_rule=PASS_RULE.format(quick="lr 0.3, seed 0, 150 steps, report only (the sheet gives no SGD quick rule)"),
    grids=_grids(SGD_LRS, 0.3),
    run=partial(train, optimizer="sgd", model_kind="mlp"),
    verdict=partial(gate_verdict, quick_rule=False),
))

ADAM = register(Experiment(
    id="tract.adam",
    claim=CLAIM + " (Adam)",
    baseline="the same MLP, init and batch order, plain Adam on the same lr grid",
    metric=METRIC,
    primary_metric="steps_to_95",
    pass_rule=PASS_RULE.format(quick="Adam lr 1e-2, seed 0, 150 steps; pass iff TrAct's steps to 95% <= 0.7 x "
                                     "the baseline's (indicative)"),
    grids=_grids(ADAM_LRS, 1e-2),
    run=partial(train, optimizer="adam", model_kind="mlp"),
    verdict=partial(gate_verdict, quick_rule=True),
))

CONV = register(Experiment(
    id="tract.conv",
    claim="Report only: TrAct on a Conv2d(1, 32, 3) first layer of a small CNN on the 8x8 digits (Adam), steps "
          "to 95% test accuracy vs the plain model.",
    baseline="the same CNN, init and batch order, plain Adam on the same lr grid",
    metric=METRIC,
    primary_metric="steps_to_95",
    pass_rule="report only (the sheet did not measure the conv variant); same numbers as the gates",
    grids=_grids(ADAM_LRS, 1e-2),
    run=partial(train, optimizer="adam", model_kind="conv"),
    verdict=report_verdict,
))
