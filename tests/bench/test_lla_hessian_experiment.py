import math

import pytest
import torch
from torch import nn

from normlab.bench.experiment import all_experiments, intra_op_threads
from normlab.bench.experiments import lla_hessian as exp
from normlab.bench.runner import judge

IDS = ("lla_hessian.axes", "lla_hessian.criteria", "lla_hessian.report", "lla_hessian.slq")


def test_registered_with_the_sheet_protocol():
    registry = all_experiments()
    assert all(i in registry for i in IDS)
    for i in IDS:
        e = registry[i]
        assert e.slug == "lla_hessian" and e.grids["full"].arms == ("mlp", "mlp_bn")
        assert e.grids["quick"].seeds == e.grids["smoke"].seeds == (0,)
        assert e.shared_key("mlp", 0.1, 1, "full") == exp.shared_key("mlp", 0.1, 1, "full")
    for i in ("lla_hessian.axes", "lla_hessian.criteria", "lla_hessian.slq"):
        assert registry[i].grids["full"].seeds == (0, 1)
    assert registry["lla_hessian.report"].grids["full"].seeds == (0, 1, 2)
    assert exp.CHECKPOINTS["full"] == (0, 50, 1500) and exp.HESSIAN_BATCH["full"] == 500
    assert exp.SLQ_STEPS["full"] == 80 and exp.SLQ_RUNS == 3 and exp.N_RANDOM == 10 and exp.FD_H == 1e-3
    assert (exp.LR, exp.MOMENTUM, exp.BATCH, exp.TEST_FRACTION) == (0.1, 0.9, 64, 0.3)


def test_models_and_data():
    plain, bn = exp.make_model("mlp"), exp.make_model("mlp_bn")
    assert sum(p.numel() for p in plain.parameters()) == 610
    assert isinstance(bn[1], nn.BatchNorm1d) and isinstance(bn[2], nn.ReLU)
    assert next(plain.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown arm"):
        exp.make_model("mlp_ln")
    x_tr, y_tr, x_te, y_te = exp.load_data()
    assert x_tr.shape[1] == 64 and x_tr.dtype == torch.float64 and x_tr.max() <= 1
    assert len(y_te) == math.ceil(0.3 * 1797) and len(y_tr) + len(y_te) == 1797
    gen = torch.Generator().manual_seed(0)
    order = exp.batch_order(100, gen)
    first = torch.cat([next(order) for _ in range(1)])
    assert len(first) == 64 and len(set(first.tolist())) == 64


def test_fd_curvature_of_a_quadratic_is_exact():
    """Finite differences of the helper against a hand-derived curvature: a linear model's logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    d = exp.unit_random(8, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(d.norm(dim=1), torch.ones(2, dtype=torch.float64))
    from normlab.analysis.hessian import exact_hessian
    h = exact_hessian(model, torch.nn.functional.cross_entropy, (x, y))
    fd = exp.fd_curvature(model, x, y, d)
    assert torch.allclose(fd, torch.einsum("ip,pq,iq->i", d, h, d), rtol=1e-5)


@pytest.fixture(scope="module")
def smoke_runs():
    with intra_op_threads(1):
        return {arm: exp.run(arm, 0.1, 0, "smoke") for arm in exp.ARMS}


def test_smoke_run_record_structure(smoke_runs):
    for rec in smoke_runs.values():
        metrics = rec["metrics"]
        for name in ("exact_kh05", "exact_re", "slq_kh05", "slq_re", "fd_ratio", "test_acc", "lambda1"):
            assert all(f"{name}_{lab}" in metrics for lab in exp.LABELS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics["slq_worst_factor"] >= 1
        for lab in exp.LABELS:  # SLQ recovers the extreme eigenvalues, hence re, even with m = 10
            assert metrics[f"slq_re_{lab}"] == pytest.approx(metrics[f"exact_re_{lab}"], rel=0.2)
            assert metrics[f"lambda1_{lab}"] == pytest.approx(metrics[f"exact_lmax_{lab}"], rel=1e-2)
        assert [s for s, _ in rec["curves"]["exact_kh05"]] == list(exp.CHECKPOINTS["smoke"])
        assert set(rec["curves"]) == set(exp.CURVES)
    assert smoke_runs["mlp"]["metrics"]["exact_kh05_init"] != smoke_runs["mlp_bn"]["metrics"]["exact_kh05_init"]


def test_run_is_deterministic_per_seed():
    with intra_op_threads(1):
        a = exp.run("mlp", 0.1, 3, "smoke")["metrics"]
        b = exp.run("mlp", 0.1, 3, "smoke")["metrics"]
    assert a == b


def metrics(kh=(0.56, 0.15, 0.094), re=(0.26, 0.047, 0.012), ratio=(1.5, 1.1, 0.9), fd=(-80.0, 104.0, 187.0)):
    m = {}
    for i, lab in enumerate(exp.LABELS):
        m.update({f"exact_kh05_{lab}": kh[i], f"exact_re_{lab}": re[i], f"kh05_ratio_{lab}": ratio[i],
                  f"slq_kh05_{lab}": kh[i] * ratio[i], f"slq1_kh05_{lab}": kh[i], f"slq_re_{lab}": re[i],
                  f"fd_ratio_{lab}": fd[i], f"expected_ratio_{lab}": 150.0, f"test_acc_{lab}": 0.5})
    m["slq_worst_factor"] = max(max(r, 1 / r) for r in ratio)
    m["fd_ratio_trained_min"] = min(fd[1:])
    return m


def records(overrides=None, mode="full", experiment="lla_hessian.criteria", seeds=(0, 1)):
    overrides = overrides or {}
    return [{"experiment": experiment, "arm": arm, "lr": 0.1, "seed": seed, "mode": mode,
             "metrics": metrics(**overrides.get((arm, seed), {}))} for arm in exp.ARMS for seed in seeds]


def test_verdicts_pass_on_the_sheets_numbers():
    recs = records()
    for verdict in (exp.verdict_criteria, exp.verdict_slq, exp.verdict_axes):
        status, summary = verdict(recs)
        assert status == "pass" and "4/4 runs hold" in summary
    assert exp.verdict_report(records(seeds=(0, 1, 2)))[0] == "report"


def test_criteria_fails_when_not_strictly_decreasing():
    status, summary = exp.verdict_criteria(records({("mlp_bn", 1): {"kh": (0.6, 0.1, 0.1)}}))
    assert status == "fail" and "3/4" in summary and "mlp_bn seed 1" in summary and "FAILS" in summary
    assert exp.verdict_criteria(records({("mlp", 0): {"re": (0.2, 0.3, 0.01)}}))[0] == "fail"
    assert exp.verdict_criteria(records({("mlp", 0): {"kh": (0.5, math.nan, 0.01)}}))[0] == "fail"


def test_slq_fails_beyond_a_factor_two_either_way():
    assert exp.verdict_slq(records({("mlp", 1): {"ratio": (2.2, 1.0, 1.0)}}))[0] == "fail"
    assert exp.verdict_slq(records({("mlp", 1): {"ratio": (1.0, 0.45, 1.0)}}))[0] == "fail"
    assert exp.verdict_slq(records({("mlp", 1): {"ratio": (1.99, 0.51, 1.0)}}))[0] == "pass"


def test_axes_gate_ignores_init_and_needs_fifty():
    assert exp.verdict_axes(records({("mlp", 0): {"fd": (-8000.0, 50.0, 60.0)}}))[0] == "pass"
    status, summary = exp.verdict_axes(records({("mlp_bn", 0): {"fd": (300.0, 49.0, 250.0)}}))
    assert status == "fail" and "3/4" in summary


def test_gate_uses_seeds_0_and_1_only_and_needs_both():
    recs = records(seeds=(0, 1, 2), overrides={("mlp", 2): {"kh": (0.1, 0.2, 0.3)}})
    assert exp.verdict_criteria(recs)[0] == "pass"
    with pytest.raises(ValueError, match="mlp seed 1"):
        exp.verdict_criteria([r for r in records() if not (r["arm"] == "mlp" and r["seed"] == 1)])


def test_quick_and_smoke_report_only_and_bad_records_error():
    bad = {("mlp", 0): {"kh": (0.1, 0.2, 0.3)}}
    status, summary = exp.verdict_criteria(records(bad, mode="quick", seeds=(0,)))
    assert status == "report" and "indicative" in summary and "FAILS" in summary
    assert exp.verdict_slq(records(mode="smoke", seeds=(0,)))[0] == "report"
    registry = all_experiments()
    status, summary = judge(registry["lla_hessian.criteria"], [r for r in records() if r["arm"] == "mlp"])
    assert status == "error" and "mlp_bn" in summary
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict_axes(records(seeds=(0,)) + records(mode="quick", seeds=(1,)))
