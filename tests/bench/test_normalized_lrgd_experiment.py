import pytest
import torch

from normlab.bench.experiments import normalized_lrgd as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "normalized_lrgd" and e.slug == "normalized_lrgd" and e.primary_metric == "iters_n1000"
    for mode in ("full", "quick", "smoke"):
        grid = e.grids[mode]
        assert grid.arms == ("lr_gd", "normalized_lr_gd") and grid.lrs == (0.1, 1.0, 10.0, 100.0)
        assert grid.seeds == (0,)
    assert exp.NS["full"] == exp.NS["quick"] == (10, 100, 1000) and exp.MAX_ITER == 100_000


def test_worst_case_data():
    X, y = exp.worst_case_data(4)
    assert X.dtype == torch.float64 and X.tolist() == [[0.5, -1.0], [-0.5, -1.0], [-0.5, -1.0], [-0.5, -1.0]]
    assert y.tolist() == [1.0, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="n >= 2"):
        exp.worst_case_data(1)


def test_every_run_passes_max_iter_explicitly(monkeypatch):
    calls = []
    original = exp.fit_separator

    def recording(X, y, **kw):
        calls.append((len(y), kw))
        return original(X, y, **kw)

    monkeypatch.setattr(exp, "fit_separator", recording)
    exp.run("lr_gd", 10.0, 0, "smoke")
    assert calls == [(10, {"method": "lr_gd", "lr": 10.0, "max_iter": 100_000})]


@pytest.mark.parametrize("arm", exp.ARMS)
def test_smoke_run_record(arm):
    rec = exp.run(arm, 100.0, 0, "smoke")
    assert set(rec["metrics"]) == {"iters_n10", "converged_n10"}
    assert rec["metrics"]["converged_n10"] == 1.0 and rec["metrics"]["iters_n10"] >= 1
    assert rec["curves"]["iters_vs_n"] == [[10, rec["metrics"]["iters_n10"]]]
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("svm", 1.0, 0, "smoke")


def test_loglog_slope():
    assert exp.loglog_slope([10, 100, 1000], [3.0, 30.0, 300.0]) == pytest.approx(1.0)
    assert exp.loglog_slope([10, 100, 1000], [2.0, 2.0, 2.0]) == pytest.approx(0.0, abs=1e-12)


def records(mode="full", change=None, drop=None):
    """Records carrying the sheet's table; ``change`` = {(arm, lr, n): (iters, converged)} overrides."""
    recs = []
    for arm in exp.ARMS:
        for i, lr in enumerate(exp.LRS):
            if (arm, lr) == drop:
                continue
            metrics = {}
            for n in exp.NS[mode]:
                iters, converged = (change or {}).get((arm, lr, n), (exp.EXPECTED[arm][n][i], True))
                metrics[f"iters_n{n}"] = float(iters)
                metrics[f"converged_n{n}"] = float(converged)
            recs.append({"experiment": "normalized_lrgd", "arm": arm, "lr": lr, "seed": 0, "mode": mode,
                         "metrics": metrics})
    return recs


def test_verdict_passes_on_the_sheet_table():
    status, summary = exp.verdict(records())
    assert status == "pass"
    assert "exact match of the sheet's 24 counts: yes" in summary and "lr_gd n=1000: 73133/7313/729/308" in summary
    assert "Normalized LR+GD max at lr >= 10: 2" in summary
    status, summary = exp.verdict(records("quick"))
    assert status == "pass" and summary.startswith("quick")


def test_verdict_fails_on_one_mismatch_or_one_unconverged_run():
    status, summary = exp.verdict(records(change={("normalized_lr_gd", 1.0, 100): (12, True)}))
    assert status == "fail" and "normalized_lr_gd lr=1 n=100: 12 vs 11" in summary
    status, summary = exp.verdict(records(change={("lr_gd", 0.1, 1000): (100_000, False)}))
    assert status == "fail" and "no (lr_gd lr=0.1 n=1000)" in summary
    status, summary = exp.verdict(records(change={("normalized_lr_gd", 100.0, 1000): (3, True)}))
    assert status == "fail" and "max at lr >= 10: 3 (need <= 2: no)" in summary


def test_verdict_smoke_reports_and_missing_runs_error():
    status, summary = exp.verdict(records("smoke"))
    assert status == "report" and "n = 10 only" in summary
    status, summary = judge(exp.EXPERIMENT, records(drop=("lr_gd", 10.0)))
    assert status == "error" and "lr_gd" in summary
    assert judge(exp.EXPERIMENT, [r for r in records() if r["arm"] == "lr_gd"])[0] == "error"
