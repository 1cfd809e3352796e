import math

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import zo_subspace as exp


def test_registered_with_the_sheet_protocol():
    assert exp.TRAINING.id == "zo_subspace.training" and exp.TRAINING.slug == "zo_subspace"
    assert exp.TRAINING.grids["full"].arms == ("zo_adam", "fo_adam")
    assert exp.SUBSPACE.grids["full"].arms == ("zo_adam", "zo_subspace")
    assert exp.MEMORY.grids["full"].arms == ("zo_adam", "zo_subspace", "fo_adam")
    for e in (exp.TRAINING, exp.SUBSPACE):
        assert e.grids["full"].lrs == (3e-3, 1e-2, 3e-2) and e.grids["full"].seeds == (0, 1, 2)
        assert e.grids["quick"].seeds == (0,) and e.grids["full"].budget_s <= 1200
        assert e.shared_key("zo_adam", 1e-2, 1, "full") == exp.SUBSPACE.shared_key("zo_adam", 1e-2, 1, "full")
    assert exp.MEMORY.grids["full"].seeds == (0,)
    assert exp.STEPS["full"] == 1500 and exp.BATCH == 16 and exp.N_PROBES == 2 and exp.TAU == 64
    assert exp.NU == 1e-3 and exp.NOISE == 0.3 and exp.D_X == 32 and exp.D_TOKEN == 256


def test_fake_quant_int8_is_per_row_on_the_int8_grid():
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    q = exp.fake_quant_int8(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    steps = q[[0, 1, 3, 4]] / scale[[0, 1, 3, 4]]
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert bool((steps.abs() <= 127 + 1e-4).all()) and bool((q[2] == 0).all())
    assert float((q - w).abs().max()) <= float(scale.max()) / 2 + 1e-7


def test_task_scale_rule():
    with intra_op_threads(1):
        model, v_star, x_test, y_test, _ = exp.make_task(0)
    with torch.no_grad():
        gap = float((model(x_test, v_star) - model(x_test, torch.zeros(exp.D_TOKEN))).square().mean())
        initial = float((model(x_test, torch.zeros(exp.D_TOKEN)) - y_test).square().mean())
    assert gap == pytest.approx(exp.GAP, rel=1e-6) and initial >= 1.0
    assert all(not b.requires_grad for b in model.buffers()) and not list(model.parameters())


@pytest.fixture(scope="module")
def smoke():
    with intra_op_threads(1):
        return {arm: exp.run(arm, 1e-2, 0, "smoke") for arm in exp.ARMS}


def test_smoke_runs(smoke):
    for arm, rec in smoke.items():
        m = rec["metrics"]
        assert math.isfinite(m["final_mse"]) and m["final_mse"] < m["initial_mse"]
        assert rec["curves"]["test_mse"][0] == [0, m["initial_mse"]] and rec["curves"]["test_mse"][-1][0] == 70
    assert smoke["zo_subspace"]["curves"]["removed_dim"][0][0] == 64
    assert 0 < smoke["zo_subspace"]["metrics"]["removed_dim"] < 64
    assert smoke["zo_adam"]["metrics"]["initial_mse"] == smoke["fo_adam"]["metrics"]["initial_mse"]


def test_memory_run_measures_the_sheet_metric():
    with intra_op_threads(1):
        recs = {arm: exp.run_memory(arm, 1e-2, 0, "smoke")["metrics"] for arm in exp.ARMS}
    fo, zo, sub = recs["fo_adam"], recs["zo_adam"], recs["zo_subspace"]
    # first-order: two ReLU outputs (16 x 128 float32) plus the MSE's prediction/difference are saved
    assert fo["activation_bytes"] >= 2 * 16 * 128 * 4 and fo["grad_bytes"] == 256 * 4
    assert zo["activation_bytes"] == 0 == sub["activation_bytes"]
    assert zo["grad_is_none"] == 1.0 == sub["grad_is_none"] and fo["grad_is_none"] == 0.0
    assert zo["closure_no_grad"] == 1.0 and zo["closure_calls"] == 3 * (exp.MEMORY_STEPS + 1)
    assert zo["state_bytes"] == 3 * 256 * 4  # m, s and one z
    assert sub["denoiser_bytes"] == (64 + sub["removed_dim"]) * 256 * 4 and sub["removed_dim"] > 0
    records = [{"arm": a, "lr": 1e-2, "seed": 0, "mode": "full", "metrics": m} for a, m in recs.items()]
    status, summary = exp.verdict_memory(records)
    assert status == "pass" and "ZO activation bytes 0: yes" in summary
    bad = [dict(r, metrics={**r["metrics"], "grad_is_none": 0.0}) if r["arm"] == "zo_adam" else r for r in records]
    assert exp.verdict_memory(bad)[0] == "fail"
    bad = [dict(r, metrics={**r["metrics"], "activation_bytes": 64.0}) if r["arm"] == "zo_subspace" else r
           for r in records]
    assert exp.verdict_memory(bad)[0] == "fail"
    bad = [dict(r, metrics={**r["metrics"], "closure_no_grad": 0.0}) if r["arm"] == "zo_adam" else r for r in records]
    assert exp.verdict_memory(bad)[0] == "fail"
    assert exp.verdict_memory([dict(r, mode="quick") for r in records])[0] == "report"


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm 'sgd'"):
        exp.run("sgd", 1e-2, 0, "smoke")
    with pytest.raises(ValueError, match="unknown arm 'sgd'"):
        exp.run_memory("sgd", 1e-2, 0, "smoke")


def records(values: dict, initial=(1.6, 1.6, 1.6), mode="full", removed=40.0):
    out = []
    for (arm, lr), finals in values.items():
        for seed, final in enumerate(finals):
            metrics = {"final_mse": final, "initial_mse": initial[seed]}
            if arm == "zo_subspace":
                metrics["removed_dim"] = removed
            out.append({"arm": arm, "lr": lr, "seed": seed, "mode": mode, "metrics": metrics})
    return out


def test_training_verdict():
    runs = {("zo_adam", 3e-3): [0.9, 0.8, 0.85], ("zo_adam", 3e-2): [0.10, 0.09, 0.093],
            ("fo_adam", 3e-2): [0.09, 0.09, 0.09]}
    status, summary = exp.verdict_training(records(runs))
    assert status == "pass" and "best lr 0.03" in summary and "need <= 0.5: yes" in summary
    assert "ZO/FO ratio 1.05" in summary
    worse = {("zo_adam", 3e-2): [0.9, 0.8, 0.85], ("fo_adam", 3e-2): [0.09, 0.09, 0.09]}
    assert exp.verdict_training(records(worse))[0] == "fail"
    status, summary = exp.verdict_training(records(runs, initial=(1.6, 0.9, 1.6)))
    assert status == "fail" and "every seed: no" in summary
    nan = {("zo_adam", 3e-2): [math.nan, 0.1, 0.1], ("fo_adam", 3e-2): [0.09, 0.09, 0.09]}
    assert exp.verdict_training(records(nan))[0] == "fail"
    assert exp.verdict_training(records(runs, mode="quick"))[0] == "report"


def test_subspace_verdict():
    plain = {("zo_adam", 1e-2): [0.10, 0.11, 0.10], ("zo_adam", 3e-2): [0.094, 0.095, 0.093]}
    ok = {**plain, ("zo_subspace", 3e-2): [0.095, 0.096, 0.094], ("zo_subspace", 1e-2): [0.2, 0.2, 0.2]}
    status, summary = exp.verdict_subspace(records(ok))
    assert status == "pass" and "ratio 1.011" in summary and "improvement (ratio < 1): no" in summary
    better = {**plain, ("zo_subspace", 3e-2): [0.08, 0.08, 0.08]}
    status, summary = exp.verdict_subspace(records(better))
    assert status == "pass" and "improvement (ratio < 1): yes" in summary
    harm = {**plain, ("zo_subspace", 3e-2): [0.11, 0.105, 0.104]}
    status, summary = exp.verdict_subspace(records(harm))
    assert status == "fail" and "need <= 1.1: no" in summary
    assert exp.verdict_subspace(records(harm, mode="quick"))[0] == "report"


def test_missing_arm_is_an_error():
    with pytest.raises(ValueError, match="no records for arm"):
        exp.verdict_subspace(records({("zo_adam", 1e-2): [0.1]}))
