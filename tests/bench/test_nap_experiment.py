import math

import pytest
import torch

from normlab.bench.experiments import nap as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    gate, report = exp.EXPERIMENT, exp.ACCURACY_EXPERIMENT
    assert gate.id == "nap" and report.id == "nap.accuracy" and gate.slug == report.slug == "nap"
    full = gate.grids["full"]
    assert full.arms == ("ln", "nap") and full.lrs == (1e-3,) and full.seeds == (0, 1, 2)
    assert exp.TASKS["full"] == 12 and exp.STEPS["full"] == 250 and exp.BATCH == 64 and exp.N_IMAGES == 512
    assert gate.grids["quick"].seeds == (0,) and exp.TASKS["quick"] == 12
    assert gate.shared_key("ln", 1e-3, 0, "full") == report.shared_key("ln", 1e-3, 0, "full")
    x = exp.images()
    assert x.shape == (512, 64) and x.min() >= 0 and x.max() <= 1


def test_model_is_the_add_nap_mlp():
    model = exp.build_model(0)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    assert model[0].bias is None and model[3].bias is None and model[6].bias is not None
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 128)
    assert torch.equal(model[0].weight, reference.weight)  # PyTorch default init after manual_seed(seed)


@pytest.fixture(scope="module")
def smoke_runs():
    return {arm: exp.run(arm, 1e-3, 0, "smoke") for arm in exp.ARMS}


def test_smoke_run_records(smoke_runs):
    tasks = exp.TASKS["smoke"]
    for arm, rec in smoke_runs.items():
        m = rec["metrics"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
        assert [t for t, _ in rec["curves"]["task_acc"]] == list(range(1, tasks + 1))
        accs = [a for _, a in rec["curves"]["task_acc"]]
        assert m["first3_acc"] == pytest.approx(sum(accs[:3]) / 3)
        assert m["last3_acc"] == pytest.approx(sum(accs[-3:]) / 3)
        assert m["drop"] == pytest.approx(m["first3_acc"] - m["last3_acc"])
        assert m["hidden_detected_invariant"] == 1.0
        assert 6.0 < m["init_norm_mean"] < 7.0  # ||W0||_F of a default-init 64->128 / 128->128 Linear is ~6.5
    assert smoke_runs["nap"]["metrics"]["norm_deviation_max"] < 1e-5
    assert smoke_runs["ln"]["metrics"]["norm_deviation_max"] > 1e-4  # even 20 steps move the unprojected norms


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("bn", 1e-3, 0, "smoke")


def records(per_seed, mode="full"):
    """per_seed: {arm: [(growth_min, deviation_max, first3, last3) per seed]}."""
    out = []
    for arm, rows in per_seed.items():
        for seed, (growth, dev, first, last) in enumerate(rows):
            out.append({"experiment": "nap", "arm": arm, "lr": 1e-3, "seed": seed, "mode": mode, "metrics": {
                "norm_growth_min": growth, "norm_growth_max": growth + 0.1, "norm_deviation_max": dev,
                "init_norm_mean": 6.5, "final_norm_mean": 6.5 * growth, "first3_acc": first, "last3_acc": last,
                "drop": first - last, "hidden_detected_invariant": 1.0}})
    return out


GOOD = {"ln": [(1.7, 0.7, 0.76, 0.66)] * 3, "nap": [(1.0, 3e-7, 0.76, 0.67)] * 3}


def test_verdict_pass():
    status, summary = exp.verdict(records(GOOD))
    assert status == "pass" and "(3/3)" in summary and "1.70-1.80x" in summary


def test_verdict_fails_when_one_ln_seed_does_not_grow_enough():
    bad = {"ln": [(1.7, 0.7, 0.76, 0.66), (1.35, 0.35, 0.76, 0.66), (1.7, 0.7, 0.76, 0.66)], "nap": GOOD["nap"]}
    status, summary = exp.verdict(records(bad))
    assert status == "fail" and "every seed: no (2/3)" in summary


def test_verdict_fails_when_nap_norms_drift():
    bad = {"ln": GOOD["ln"], "nap": [(1.0, 3e-7, 0.76, 0.67)] * 2 + [(1.0, 2e-5, 0.76, 0.67)]}
    status, summary = exp.verdict(records(bad))
    assert status == "fail" and "NaP within 1e-05 in every seed: no (2/3)" in summary


def test_verdict_quick_and_smoke_report():
    assert exp.verdict(records(GOOD, "quick"))[0] == "report"
    assert "indicative" in exp.verdict(records(GOOD, "quick"))[1]
    assert exp.verdict(records(GOOD, "smoke"))[0] == "report"


def test_accuracy_verdict_is_report_only_with_paired_gaps():
    recs = records({"ln": [(1.7, 0.7, 0.76, 0.66), (1.7, 0.7, 0.75, 0.60)],
                    "nap": [(1.0, 0.0, 0.76, 0.70), (1.0, 0.0, 0.75, 0.58)]})
    status, summary = exp.verdict_accuracy(recs)
    assert status == "report"
    assert "+0.040, -0.020" in summary and "mean +0.010 +- 0.030" in summary and "gap >= 0.03: no" in summary
    assert "NaP drops less in 1/2" in summary


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records({"ln": GOOD["ln"]}))
    assert status == "error" and "nap" in summary
    mixed = records({"ln": GOOD["ln"]}) + records({"nap": GOOD["nap"]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)
