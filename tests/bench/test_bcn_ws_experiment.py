import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.bench.experiments import bcn_ws as exp
from normlab.bench.runner import judge, load_records, run_experiments
from normlab.layers.batch_channel import BatchChannelNorm2d
from normlab.layers.evonorm import EvoNormB0, EvoNormS0
from normlab.reparam.weight_standardization import WeightStandardization


def test_registered_with_the_sheet_protocol():
    ids = {e.id for e in (exp.SMALL_BATCH, exp.REPORT)}
    assert ids == {"bcn_ws.small_batch", "bcn_ws.report"}
    for e in (exp.SMALL_BATCH, exp.REPORT):
        assert e.slug == "bcn_ws" and e.primary_metric == "test_acc" and e.shared_key is exp.shared_key
        full = e.grids["full"]
        assert full.lrs == (1e-3, 3e-3) and full.seeds == (0, 1, 2)
        assert len(full.arms) == 12 and len(full.points()) == 72
        assert set(full.arms) == {f"{n}@{b}" for n in ("bn_relu", "gn_relu", "s0", "b0", "gn_ws", "bcn_ws")
                                  for b in (4, 64)}
        assert len(e.grids["quick"].seeds) == len(e.grids["quick"].lrs) == 1
    assert set(exp.SMALL_BATCH.grids["quick"].arms) == set(exp.GATE_ARMS)
    assert set(exp.REPORT.grids["quick"].arms) == set(exp.REPORT_ARMS)


def test_split_and_step_counts():
    x_train, y_train, x_test, y_test = exp.data()
    assert x_train.shape == (1257, 1, 8, 8) and x_test.shape == (540, 1, 8, 8)
    assert 0 <= x_train.min() and x_train.max() <= 1 and len(y_train) == 1257 and len(y_test) == 540
    assert exp.total_steps("full", 4) == 628 and exp.total_steps("full", 64) == 190
    assert exp.total_steps("smoke", 4) <= 5 and exp.total_steps("smoke", 64) <= 5


def test_arms_build_the_sheet_models():
    kinds = {"bn_relu": nn.BatchNorm2d, "gn_relu": nn.GroupNorm, "s0": EvoNormS0, "b0": EvoNormB0,
             "gn_ws": nn.GroupNorm, "bcn_ws": BatchChannelNorm2d}
    raw = {}
    for norm, kind in kinds.items():
        torch.manual_seed(3)
        model = exp.build_model(norm)
        norms = [m for m in model.modules() if isinstance(m, kind)]
        assert len(norms) == 3
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        ws = norm.endswith("_ws")
        assert [parametrize.is_parametrized(c, "weight") for c in convs] == [ws] * 3
        assert not parametrize.is_parametrized(model.head)
        if ws:
            assert all(isinstance(c.parametrizations.weight[0], WeightStandardization) for c in convs)
            assert all(c.parametrizations.weight[0].eps == 1e-5 and not c.parametrizations.weight[0].unbiased
                       for c in convs)
        raw[norm] = [c.parametrizations.weight.original if ws else c.weight for c in convs]
        if kind is nn.GroupNorm:
            assert all(m.num_groups == 8 for m in norms)
    for norm in raw:  # the same default init in every arm of a seed
        assert all(torch.equal(a, b) for a, b in zip(raw[norm], raw["bn_relu"]))
    torch.manual_seed(3)
    s0 = [m for m in exp.build_model("s0").modules() if isinstance(m, EvoNormS0)]
    bcn = [m for m in exp.build_model("bcn_ws").modules() if isinstance(m, BatchChannelNorm2d)]
    assert all(m.groups == 8 for m in s0)
    assert all(m.num_groups == 8 and m.momentum == 0.01 and m.estimate for m in bcn)


def test_unknown_arm_raises():
    for arm in ("bn_relu", "bn_relu@8", "ln@4"):
        with pytest.raises(ValueError, match="unknown arm"):
            exp.run(arm, 1e-3, 0, "smoke")


def test_smoke_run_is_deterministic_and_shuffles_by_seed(monkeypatch):
    seen = []
    original = exp.F.cross_entropy

    def recording(logits, target):
        seen.append(target.clone())
        return original(logits, target)

    monkeypatch.setattr(exp.F, "cross_entropy", recording)
    first = exp.run("gn_ws@4", 3e-3, 0, "smoke")
    batches0 = list(seen)
    again = exp.run("gn_ws@4", 3e-3, 0, "smoke")
    assert again == first
    seen.clear()
    exp.run("bcn_ws@4", 3e-3, 1, "smoke")
    steps = exp.total_steps("smoke", 4)
    assert len(batches0) == steps and all(len(b) == 4 for b in batches0)
    assert any(not torch.equal(a, b) for a, b in zip(batches0, seen))
    assert set(first) == {"metrics", "curves"} and set(first["metrics"]) == {"test_acc", "train_loss"}
    assert 0 <= first["metrics"]["test_acc"] <= 1 and math.isfinite(first["metrics"]["train_loss"])
    assert first["curves"]["test_acc"][-1] == [steps, first["metrics"]["test_acc"]]
    assert first["curves"]["train_loss"][-1][0] == steps


def records(values, mode="full"):
    """``values``: {(arm, lr): [test accuracy per seed]}."""
    return [{"experiment": "bcn_ws", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"test_acc": acc, "train_loss": 0.1}}
            for (arm, lr), per_seed in values.items() for seed, acc in enumerate(per_seed)]


# the sheet's measured best-lr accuracies where it gives them per seed, others near its means
SHEET = {
    ("gn_relu@4", 1e-3): [0.941, 0.959, 0.793],
    ("gn_relu@4", 3e-3): [0.30, 0.95, 0.99],           # best seed 2, worse mean: not chosen
    ("gn_ws@4", 3e-3): [0.995, 0.979, 0.991],           # +5.4, +2.0, +19.8
    ("gn_ws@4", 1e-3): [0.98, 0.97, 0.97],
    ("bcn_ws@4", 1e-3): [0.999, 0.975, 0.989],          # +0.4, -0.4, -0.2
    ("bcn_ws@4", 3e-3): [0.9, 0.9, 0.9],
    ("bn_relu@4", 1e-3): [0.99, 0.975, 0.98],
    ("bn_relu@64", 3e-3): [0.998, 0.996, 0.997],
    ("gn_relu@64", 3e-3): [0.993, 0.983, 0.988],
    ("gn_ws@64", 1e-3): [0.995, 0.994, 0.996],
    ("bcn_ws@64", 3e-3): [0.997, 0.995, 0.996],
}


def test_gate_passes_on_the_sheet_numbers():
    status, summary = exp.verdict_small_batch(records(SHEET))
    assert status == "pass", summary
    assert "GN+WS - GN: +9.1 points (per seed +5.4, +2.0, +19.8" in summary
    assert "in 3 of 3 seeds (need 2: yes)" in summary
    assert "BCN+WS - GN+WS mean -0.1 points" in summary
    assert "GN+WS - BN -0.2, BCN+WS - BN -0.1 points" in summary
    assert "GN+ReLU@4 0.898 ± 0.091 (lr 0.001, 3 seed(s))" in summary


def test_gate_needs_two_of_three_seeds_not_the_mean():
    values = dict(SHEET)
    values[("gn_ws@4", 1e-3)] = [0.5, 0.5, 0.5]
    values[("gn_ws@4", 3e-3)] = [0.945, 0.962, 0.993]  # +0.4, +0.3, +20.0: mean +6.9, one seed >= +0.5
    status, summary = exp.verdict_small_batch(records(values))
    assert status == "fail" and "in 1 of 3 seeds (need 2: no)" in summary
    values[("gn_ws@4", 3e-3)] = [0.945, 0.966, 0.993]  # +0.4, +0.7, +20.0
    status, summary = exp.verdict_small_batch(records(values))
    assert status == "pass" and "in 2 of 3 seeds (need 2: yes)" in summary


@pytest.mark.parametrize("arm, accs, text", [
    (("bcn_ws@4", 1e-3), [0.98, 0.965, 0.975], "(need >= -1: no)"),                 # BCN+WS 1.5 below GN+WS
    (("bcn_ws@64", 3e-3), [0.98, 0.98, 0.98], "BCN+WS - BN -1.7 points (need each >= -1.5: no)"),
    (("gn_ws@64", 1e-3), [0.97, 0.99, 0.98], "GN+WS - BN -1.7"),
])
def test_gate_fails_each_condition(arm, accs, text):
    values = dict(SHEET)
    values[arm] = accs
    status, summary = exp.verdict_small_batch(records(values))
    assert status == "fail" and text in summary


def test_quick_and_smoke_are_report_only():
    quick = records({(arm, 3e-3): [0.9] for arm in exp.GATE_ARMS}, "quick")
    status, summary = exp.verdict_small_batch(quick)
    assert status == "report" and summary.startswith("indicative") and "1 seed(s)" in summary
    assert exp.verdict_small_batch(records(SHEET, "smoke"))[0] == "report"


def test_report_check_is_report_only_with_the_bn_comparisons():
    status, summary = exp.verdict_report(records(SHEET))
    assert status == "report" and summary.startswith("report-only")
    assert "batch 64: GN - BN: -0.9 points (per seed -0.5, -1.3, -0.9" in summary
    for label in ("GN+ReLU - BN", "GN+WS - BN", "BCN+WS - BN"):
        assert f"batch 4: {label}" in summary


def test_missing_arm_or_mixed_modes_are_errors():
    status, summary = judge(exp.SMALL_BATCH, records({k: v for k, v in SHEET.items() if k[0] != "bcn_ws@64"}))
    assert status == "error" and "bcn_ws@64" in summary
    mixed = records(SHEET) + records({("gn_ws@4", 3e-3): [0.9]}, "quick")
    assert judge(exp.REPORT, mixed)[0] == "error"


def test_smoke_through_the_runner_shares_runs(tmp_path):
    calls = []

    def counting(arm, lr, seed, mode):
        calls.append(arm)
        return exp.run(arm, lr, seed, mode)

    checks = [dataclasses.replace(e, run=counting) for e in (exp.SMALL_BATCH, exp.REPORT)]
    verdicts = run_experiments(checks, "smoke", tmp_path, progress=False)
    assert [v["status"] for v in verdicts] == ["report", "report"]
    assert sorted(calls) == sorted(set(exp.GATE_ARMS) | set(exp.REPORT_ARMS))  # each shared run once
    recs = load_records(tmp_path)
    by_key = {}
    for r in recs:
        by_key.setdefault(r["shared_key"], []).append(r["metrics"])
    assert len(recs) == len(exp.GATE_ARMS) + len(exp.REPORT_ARMS)
    assert all(all(m == ms[0] for m in ms) for ms in by_key.values())
