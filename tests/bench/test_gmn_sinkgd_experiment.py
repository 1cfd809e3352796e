import math

import pytest

from normlab.bench.experiments import gmn_sinkgd as exp
from normlab.bench.experiments import swan
from normlab.bench.runner import judge
from normlab.optim.sinkgd import SinkGD


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "gmn_sinkgd" and e.slug == "gmn_sinkgd" and e.primary_metric == "val_loss"
    full = e.grids["full"]
    assert full.arms == ("adamw", "sinkgd") and full.lrs == (3e-3, 1e-2, 3e-2) and full.seeds == (0, 1)
    assert e.grids["quick"].lrs == (1e-2,) and e.grids["quick"].seeds == (0,)
    assert e.shared_key is swan.shared_key


def test_sinkgd_arm_is_the_sheet_configuration():
    from normlab.bench.tasks import GPT

    for lr, scale in ((3e-3, 1.0), (1e-2, 10 / 3), (3e-2, 10.0)):
        opt = exp.sinkgd_optimizer(GPT(), lr)
        assert isinstance(opt, SinkGD)
        matrix, fallback = opt.param_groups
        assert matrix["use_sinkgd"] and not fallback["use_sinkgd"] and len(matrix["params"]) == 12
        assert matrix["lr"] == fallback["lr"] == 3e-3 and matrix["num_iters"] == 5
        assert matrix["matrix_lr_scale"] == pytest.approx(scale) and matrix["lr"] * matrix["matrix_lr_scale"] == \
            pytest.approx(lr)
        assert matrix["weight_decay"] == fallback["weight_decay"] == 0.0


def test_smoke_run():
    rec = exp.run("sinkgd", 1e-2, 0, "smoke")
    assert rec["metrics"]["state_bytes"] == swan.STATE_BYTES["matrix"]
    assert math.isfinite(rec["metrics"]["val_loss"]) and [s for s, _ in rec["curves"]["val_loss"]] == [3, 6]
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("swan", 1e-2, 0, "smoke")


def records(values, mode="full", state=None):
    state = state or {}
    out = []
    for (arm, lr), per_seed in values.items():
        for seed, curve in enumerate(per_seed):
            default = swan.STATE_BYTES["adamw" if arm == "adamw" else "matrix"]
            out.append({"experiment": "gmn_sinkgd", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                        "metrics": {"val_loss": curve[-1][1], "state_bytes": state.get(arm, default)},
                        "curves": {"val_loss": [list(p) for p in curve]}})
    return out


def curve(*losses):
    return [((i + 1) * 75, v) for i, v in enumerate(losses)]


ADAMW = {("adamw", 1e-2): [curve(2.5, 2.2, 2.1, 2.05), curve(2.5, 2.2, 2.1, 2.15)],  # mean final 2.1
         ("adamw", 3e-2): [curve(2.6, 2.4, 2.3, 2.2)] * 2}


def test_verdict_pass_when_the_curve_reaches_adamw_within_the_run():
    recs = records({**ADAMW, ("sinkgd", 1e-2): [curve(2.5, 2.3, 2.12, 2.08), curve(2.5, 2.3, 2.12, 2.1)],
                    ("sinkgd", 3e-3): [curve(2.6, 2.4, 2.3, 2.2)] * 2})
    status, summary = exp.verdict(recs)
    assert status == "pass", summary
    assert "SinkGD best lr 0.01: final val loss 2.090" in summary and "step 300 (1.00 T)" in summary
    assert "gap 0.010" in summary


def test_verdict_fails_when_sinkgd_never_reaches_adamw():
    recs = records({**ADAMW, ("sinkgd", 1e-2): [curve(2.5, 2.3, 2.2, 2.11)] * 2})
    status, summary = exp.verdict(recs)
    assert status == "fail" and "within T: no" in summary and "never" in summary


def test_verdict_fails_on_state_bytes_or_nan():
    good = {**ADAMW, ("sinkgd", 1e-2): [curve(2.2, 2.0, 1.9, 1.9)] * 2}
    assert exp.verdict(records(good))[0] == "pass"
    status, summary = exp.verdict(records(good, state={"adamw": 600_116}))
    assert status == "fail" and "state bytes exact: no" in summary
    nan = {**ADAMW, ("sinkgd", 1e-2): [curve(math.nan, math.nan, math.nan, math.nan)] * 2}
    assert exp.verdict(records(nan))[0] == "fail"


def test_verdict_quick_and_smoke():
    base = {("adamw", 1e-2): [curve(2.6, 2.5, 2.45, 2.4)]}
    assert exp.verdict(records({**base, ("sinkgd", 1e-2): [curve(2.5, 2.4, 2.4, 2.4)]}, "quick"))[0] == "pass"
    status, summary = exp.verdict(records({**base, ("sinkgd", 1e-2): [curve(2.5, 2.4, 2.4, 2.41)]}, "quick"))
    assert status == "fail" and "indicative" in summary
    assert exp.verdict(records({**base, ("sinkgd", 1e-2): [curve(9.0)]}, "smoke"))[0] == "report"


def test_verdict_errors_on_a_missing_arm():
    status, summary = judge(exp.EXPERIMENT, records(ADAMW))
    assert status == "error" and "sinkgd" in summary
