import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.bench.experiment import all_experiments
from normlab.bench.experiments import diffgrad as exp
from normlab.bench.runner import judge
from normlab.optim.diffgrad import DiffGrad


def test_registered_with_the_sheet_protocol():
    registry = all_experiments()
    e, w = registry["diffgrad"], registry["diffgrad.well"]
    assert e is exp.EXPERIMENT and w is exp.WELL_EXPERIMENT and e.slug == w.slug == "diffgrad"
    full = e.grids["full"]
    assert full.arms == ("adam", "diffgrad") and full.lrs == (3e-3, 1e-2, 3e-2) and full.seeds == (0, 1, 2)
    assert e.grids["quick"].lrs == (1e-2,) and e.grids["quick"].seeds == (0,)
    assert exp.STEPS["full"] == exp.STEPS["quick"] == 600
    assert w.grids["full"].lrs == (0.1,) and exp.WELL_STEPS["full"] == 300
    assert exp._well_window(300) == (201, 300)


def test_digits_split_is_the_sheets():
    x_train, y_train = exp._flat_digits("train")
    x_test, y_test = exp._flat_digits("test")
    assert x_train.shape == (1257, 64) and x_test.shape == (540, 64)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    all_labels = torch.cat([y_train, y_test])
    # stratified: each class's share of the test set is its share of the data, to one example
    assert (torch.bincount(y_test) - 0.3 * torch.bincount(all_labels)).abs().max() <= 1


def test_mean_friction_is_exactly_half_for_a_by_reference_previous_grad():
    """The check's statistic tells v2 from the original bug: with previous_grad aliasing the live grad
    (the original by-reference code under in-place zeroing) it is exactly 0.5; with a copy it is not."""
    p = nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.randn(4, 3)
    opt = DiffGrad([p])
    assert exp.mean_friction(opt) > 0.5  # before the first step: previous_grad = 0
    opt.step()
    p.grad.mul_(0.5)
    assert exp.mean_friction(opt) > 0.5
    opt.state[p]["previous_grad"] = p.grad
    assert exp.mean_friction(opt) == 0.5


@pytest.fixture(scope="module")
def smoke_runs():
    """Both arms, seeds 0 and 1, smoke mode, with the initial weights and every batch each run used."""
    seen = {}
    original_ce = exp.F.cross_entropy
    original_opt = exp._optimizer

    def recording_ce(logits, target):
        seen[current]["targets"].append(target.clone())
        return original_ce(logits, target)

    def recording_opt(arm, params, lr, betas):
        params = list(params)
        seen[current]["init"] = [p.detach().clone() for p in params]
        return original_opt(arm, params, lr, betas)

    results = {}
    exp.F.cross_entropy, exp._optimizer = recording_ce, recording_opt
    try:
        for key in (("adam", 0), ("diffgrad", 0), ("diffgrad", 1)):
            current = key
            seen[key] = {"targets": []}
            results[key] = exp.run(key[0], 1e-2, key[1], "smoke")
    finally:
        exp.F.cross_entropy, exp._optimizer = original_ce, original_opt
    return results, seen


def test_smoke_run_records(smoke_runs):
    results, _ = smoke_runs
    steps = exp.STEPS["smoke"]
    for (arm, _), rec in results.items():
        assert set(rec) == {"metrics", "curves"}
        assert 0.0 <= rec["metrics"]["test_acc"] <= 100.0
        curve = rec["curves"]["train_loss"]
        assert [s for s, _ in curve] == list(range(1, steps + 1))
        assert abs(curve[0][1] - math.log(10)) < 0.3  # starts near a uniform guess
        assert curve[-1][1] < curve[0][1]
        assert rec["metrics"]["final_train_loss"] == curve[-1][1]
        if arm == "diffgrad":
            frictions = [v for _, v in rec["curves"]["friction"]]
            assert len(frictions) == steps and all(0.5 < v < 1.0 for v in frictions)
            assert rec["metrics"]["mean_friction"] == pytest.approx(sum(frictions) / steps)
        else:
            assert "mean_friction" not in rec["metrics"]


def test_arms_share_init_and_batches_per_seed(smoke_runs):
    _, seen = smoke_runs
    a, d, d1 = seen[("adam", 0)], seen[("diffgrad", 0)], seen[("diffgrad", 1)]
    assert len(a["targets"]) == exp.STEPS["smoke"]
    assert all(torch.equal(x, y) for x, y in zip(a["init"], d["init"]))
    assert all(torch.equal(x, y) for x, y in zip(a["targets"], d["targets"]))
    assert not torch.equal(a["init"][0], d1["init"][0])
    assert not torch.equal(a["targets"][0], d1["targets"][0])
    assert [len(t) for t in a["targets"]] == [exp.BATCH] * 19 + [1257 - 19 * exp.BATCH]  # one epoch


def test_batches_are_per_epoch_reshuffles():
    """20 batches per epoch (19 of 64 and one of 41): the 1257 training indices once each."""
    gen = torch.Generator().manual_seed(0)
    epoch = list(torch.randperm(1257, generator=gen).split(exp.BATCH))
    assert len(epoch) == 20 and len(epoch[-1]) == 41
    assert exp.STEPS["full"] == 30 * len(epoch)


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp._optimizer("sgd", [nn.Parameter(torch.zeros(1))], 0.1, exp.BETAS)


def test_well_minimum_is_the_global_one():
    x_star = exp.well_minimum()
    assert abs(4 * x_star ** 3 - 4 * x_star + exp.WELL_TILT) < 1e-12
    grid = np.linspace(-3, 3, 60001)
    assert x_star == pytest.approx(grid[np.argmin((grid ** 2 - 1) ** 2 + exp.WELL_TILT * grid)], abs=1e-4)
    assert x_star == pytest.approx(-1.03558, abs=1e-5)


def test_well_smoke_runs():
    for arm in exp.ARMS:
        rec = exp.run_well(arm, exp.WELL_LR, 0, "smoke")
        curve = rec["curves"]["distance_to_min"]
        assert len(curve) == exp.WELL_STEPS["smoke"]
        lo, hi = exp._well_window(exp.WELL_STEPS["smoke"])
        assert rec["metrics"]["amplitude"] == max(v for t, v in curve if lo <= t <= hi)
        assert curve[-1][1] < abs(exp.WELL_X0 - exp.well_minimum())
    assert exp.verdict_well([_well_record(arm, 0.01, "smoke") for arm in exp.ARMS])[0] == "report"


# --- verdicts on hand-made records -------------------------------------------------------------------

def records(values, mode="full"):
    """``values``: {(arm, lr): [test_acc or (test_acc, mean_friction) per seed]}."""
    out = []
    for (arm, lr), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            acc, xi = value if isinstance(value, tuple) else (value, None)
            metrics = {"test_acc": acc, "final_train_loss": 0.01}
            if xi is not None:
                metrics["mean_friction"] = xi
            out.append({"experiment": "diffgrad", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                        "metrics": metrics})
    return out


def full_grid(dg_best=97.9, xi=0.5003, adam_best=97.9):
    return records({
        ("adam", 3e-3): [97.7, 97.8, 97.7],
        ("adam", 1e-2): [adam_best + 0.3, adam_best - 0.3, adam_best],  # best mean, not best single seed
        ("adam", 3e-2): [98.9, 96.0, 96.0],
        ("diffgrad", 3e-3): [(97.0, 0.5002)] * 3,
        ("diffgrad", 1e-2): [(dg_best, 0.5004)] * 3,
        ("diffgrad", 3e-2): [(dg_best + 0.1, xi), (dg_best, xi), (dg_best - 0.05, xi)],
    })


def test_verdict_pass_picks_best_lr_by_seed_mean():
    status, summary = exp.verdict(full_grid())
    assert status == "pass"
    assert "Adam: best lr 0.01, test acc 97.90 %" in summary
    assert "diffGrad: best lr 0.03, test acc 97.92 %" in summary and "mean friction 0.50030" in summary


def test_verdict_fails_when_diffgrad_trails_adam():
    status, summary = exp.verdict(full_grid(dg_best=97.3))
    assert status == "fail" and "(i) diffGrad >= Adam - 0.5 pt (gap +0.58): no" in summary
    assert exp.verdict(full_grid(dg_best=97.45))[0] == "pass"  # within 0.5 pt


def test_verdict_fails_below_the_accuracy_floor():
    low = records({("adam", 1e-2): [96.9, 96.9], ("diffgrad", 1e-2): [(96.8, 0.5004), (96.8, 0.5004)]})
    status, summary = exp.verdict(low)
    assert status == "fail" and "(ii) both >= 97 %: no" in summary
    assert "(i) diffGrad >= Adam - 0.5 pt (gap +0.10): yes" in summary


@pytest.mark.parametrize("xi", [0.5, 0.50009, 0.52])
def test_verdict_fails_on_a_constant_or_implausible_friction(xi):
    status, summary = exp.verdict(full_grid(xi=xi))
    assert status == "fail" and "(iii) mean friction in [0.5001, 0.51]: no" in summary


def test_verdict_quick_rule():
    quick = {("adam", 1e-2): [97.78], ("diffgrad", 1e-2): [(96.9, 0.50044)]}
    status, summary = exp.verdict(records(quick, "quick"))
    assert status == "pass" and "indicative" in summary
    quick[("diffgrad", 1e-2)] = [(96.7, 0.50044)]
    assert exp.verdict(records(quick, "quick"))[0] == "fail"
    quick[("diffgrad", 1e-2)] = [(98.0, 0.5)]
    status, summary = exp.verdict(records(quick, "quick"))
    assert status == "fail" and "mean friction >= 0.5001: no" in summary


def test_verdict_smoke_reports():
    smoke = {("adam", 1e-2): [50.0], ("diffgrad", 1e-2): [(10.0, 0.5)]}
    assert exp.verdict(records(smoke, "smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records({("adam", 1e-2): [97.0]}))
    assert status == "error" and "diffgrad" in summary
    mixed = records({("adam", 1e-2): [97.0]}) + records({("diffgrad", 1e-2): [(97.0, 0.5003)]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)


def _well_record(arm, amplitude, mode="full"):
    return {"experiment": "diffgrad.well", "arm": arm, "lr": exp.WELL_LR, "seed": 0, "mode": mode,
            "metrics": {"amplitude": amplitude, "final_x": -1.0357}}


def test_well_verdict():
    status, summary = exp.verdict_well([_well_record("adam", 0.0055), _well_record("diffgrad", 0.0042)])
    assert status == "pass" and "Adam 0.0055, diffGrad 0.0042" in summary and "201<=t<=300" in summary
    assert exp.verdict_well([_well_record("adam", 0.004), _well_record("diffgrad", 0.004)])[0] == "fail"
    quick = [_well_record("adam", 0.0055, "quick"), _well_record("diffgrad", 0.0062, "quick")]
    assert exp.verdict_well(quick)[0] == "fail"
    assert judge(exp.WELL_EXPERIMENT, [_well_record("adam", 0.0055)])[0] == "error"
