import math

import pytest
import torch
from torch.nn.utils import parametrize

from normlab.bench.experiments import weight_compander as exp
from normlab.bench.runner import judge
from normlab.reparam.compander import WeightCompander


def test_registered_with_the_sheet_protocol():
    gate, controls = exp.NO_HARM, exp.CONTROLS
    assert gate.id == "weight_compander.no_harm" and controls.id == "weight_compander.controls"
    assert gate.slug == controls.slug == "weight_compander"
    assert gate.grids["full"].arms == ("baseline", "wc")
    assert controls.grids["full"].arms == ("baseline", "wc", "lr_matched", "learnable")
    for e in (gate, controls):
        assert e.grids["full"].seeds == (0, 1, 2, 3, 4) and e.grids["full"].lrs == (0.05,)
        assert e.shared_key("wc", 0.05, 0, "full") == gate.shared_key("wc", 0.05, 0, "full")
    assert exp.EPOCHS["full"] == 60 and exp.BATCH == 32 and exp.TEST_FRACTION == 0.7 and exp.LAM == 1e-4
    assert (exp.A, exp.B, exp.LEARN_A, exp.LEARN_B) == (1.0, 0.6, 0.5, 1.0)
    assert exp.LR_MATCHED == pytest.approx(0.139, abs=5e-4)


def test_arms_build_the_sheet_models():
    torch.manual_seed(0)
    base, opt = exp.make("baseline")
    assert [tuple(m.weight.shape) for m in base if hasattr(m, "weight")] == [(256, 64), (256, 256), (10, 256)]
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["momentum"] == 0.9
    assert exp.make("lr_matched")[1].param_groups[0]["lr"] == pytest.approx(0.05 / 0.36)
    torch.manual_seed(0)
    wc, opt = exp.make("wc")
    for m in (wc[0], wc[2], wc[4]):
        comp = m.parametrizations.weight[0]
        assert isinstance(comp, WeightCompander) and not comp.learnable and (comp.a, comp.b) == (1.0, 0.6)
    assert torch.allclose(wc[0].weight, base[0].weight, atol=1e-6)  # same init, same function at step 0
    groups = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert groups == {"compander_v_fixed": 0.0, "other": 1e-4}
    learn, opt = exp.make("learnable")
    groups = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert groups == {"compander_v": 1e-4, "compander_ab": 0.0, "other": 1e-4}
    assert all(parametrize.is_parametrized(learn[i], "weight") for i in (0, 2, 4))
    with pytest.raises(ValueError, match="unknown arm"):
        exp.make("adam")


@pytest.fixture(scope="module")
def smoke_runs():
    return {arm: exp.run(arm, 0.05, 0, "smoke") for arm in exp.ARMS}


def test_smoke_run_record_structure(smoke_runs):
    for arm, rec in smoke_runs.items():
        assert set(rec) == {"metrics", "curves"}
        m = rec["metrics"]
        assert 0 <= m["test_acc"] <= 100 and 0 <= m["near_zero"] <= 100
        assert m["test_acc"] == rec["curves"]["test_acc_by_epoch"][-1][1]
        assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, exp.EPOCHS["smoke"] + 1))
        assert all(math.isfinite(v) for v in m.values())
        assert ("bound_ratio" in m) == (arm in ("wc", "learnable"))
        assert ("a_0" in m and "b_4" in m) == (arm == "learnable")
    assert 0 < smoke_runs["wc"]["metrics"]["bound_ratio"] < 1
    assert smoke_runs["learnable"]["metrics"]["a_0"] != exp.LEARN_A  # a and b are trained


def records(values, mode="full", ratio=0.4, extra=None):
    """``values``: {arm: [test_acc per seed]}."""
    out = []
    for arm, accs in values.items():
        for seed, acc in enumerate(accs):
            metrics = {"test_acc": acc, "near_zero": 4.0}
            if arm in ("wc", "learnable"):
                metrics["bound_ratio"] = ratio
            if arm == "learnable":
                metrics.update({f"{k}_{n}": 1.0 for k in "ab" for n in exp.LAYERS})
            out.append({"experiment": "x", "arm": arm, "lr": 0.05, "seed": seed, "mode": mode, "metrics": metrics})
    return out


def test_gate_pass_and_fail():
    status, summary = exp.no_harm_verdict(records({"baseline": [96.0, 96.2], "wc": [95.9, 96.1]}))
    assert status == "pass" and "gap -0.10" in summary
    status, summary = exp.no_harm_verdict(records({"baseline": [96.0, 96.2], "wc": [95.6, 95.8]}))
    assert status == "fail" and "need >= -0.3: no" in summary
    status, summary = exp.no_harm_verdict(records({"baseline": [96.0], "wc": [97.0]}, ratio=1.0))
    assert status == "fail" and "need < 1: no" in summary
    assert exp.no_harm_verdict(records({"baseline": [96.0], "wc": [math.nan]}))[0] == "fail"


def test_quick_and_smoke_only_report():
    values = {"baseline": [96.0], "wc": [90.0]}
    status, summary = exp.no_harm_verdict(records(values, "quick"))
    assert status == "report" and "indicative" in summary
    assert exp.no_harm_verdict(records(values, "smoke"))[0] == "report"


def test_controls_report_the_gaps():
    recs = records({"baseline": [96.0, 96.0], "wc": [97.0, 96.6], "lr_matched": [97.0, 97.0],
                    "learnable": [96.0, 96.5]})
    status, summary = exp.controls_verdict(recs)
    assert status == "report"
    assert "WC - baseline +0.80 points (WC above in 2 of 2 seeds)" in summary
    assert "WC - lr-matched -0.20 points" in summary and "layer 4: a +1.00" in summary


def test_missing_arm_or_mixed_modes_is_an_error():
    status, summary = judge(exp.NO_HARM, records({"baseline": [96.0]}))
    assert status == "error" and "wc" in summary
    assert judge(exp.CONTROLS, records({"baseline": [96.0], "wc": [96.0]}))[0] == "error"
    mixed = records({"baseline": [96.0]}) + records({"wc": [96.0]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.no_harm_verdict(mixed)
