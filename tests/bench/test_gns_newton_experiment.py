import math

import numpy as np
import pytest
import torch

from normlab.bench.experiments import gns_newton as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    assert exp.LOGISTIC.id == "gns_newton.logistic" and exp.SOFTMAX.id == "gns_newton.softmax"
    assert exp.LOGISTIC.slug == exp.SOFTMAX.slug == "gns_newton"
    for mode in ("full", "quick", "smoke"):
        assert exp.LOGISTIC.grids[mode].arms == ("exact", "boehning", "diag", "gd_ls")
        assert exp.SOFTMAX.grids[mode].arms == ("exact", "gauss_newton", "gd_ls")
        assert exp.LOGISTIC.grids[mode].lrs == exp.SOFTMAX.grids[mode].lrs == (None,)
    assert exp.LOGISTIC_CAPS["full"] == (2000, 200) and exp.SOFTMAX_CAPS["full"] == (30, 100, 300, 2000)
    assert (exp.LOGISTIC_TOL, exp.SOFTMAX_TOL, exp.SOFTMAX_L2) == (1e-8, 1e-6, 1e-3)


def test_logistic_data_is_the_sheets():
    X, y = exp.logistic_data()
    assert X.shape == (2000, 51) and X.dtype == torch.float64 and torch.equal(X[:, -1], torch.ones(2000, dtype=X.dtype))
    np.testing.assert_allclose(X[:, :50].std(0, correction=0).numpy(), np.logspace(-2, 1, 50), rtol=1e-12)
    assert set(y.tolist()) == {0.0, 1.0}
    assert torch.linalg.matrix_rank(X).item() == 49  # n_redundant=2: every Hessian is singular


def test_gradient_method_line_search_by_hand():
    """f = 2x^2 from 1, L0 = 1: L = 1 and 2 fail the test, L = 4 lands on 0 and is halved to 2."""

    def f(x):
        return float(2 * x @ x)

    def grad(x):
        return 4 * x

    values = exp.gradient_method_ls(f, grad, torch.ones(1, dtype=torch.float64), 2)
    assert values == [2.0, 0.0, 0.0]
    assert exp.gradient_method_ls(f, grad, torch.ones(1, dtype=torch.float64), 5, f_star=0.0, tol=1e-8) == [2.0, 0.0]


def test_fit_helpers():
    gaps = [10.0 * 0.5**k for k in range(21)]
    slope, r2 = exp.loglinear_fit(gaps)
    assert slope == pytest.approx(math.log10(0.5)) and r2 == pytest.approx(1.0)
    assert exp.first_below([3.0, 2.0, 1.0 + 1e-9], 1.0, 1e-8) == 2
    assert exp.first_below([3.0, 2.0], 1.0, 1e-8) is None


def test_softmax_exact_hessian_matches_autograd_products():
    gen = torch.Generator().manual_seed(0)
    W = 0.1 * torch.randn(10, 65, generator=gen, dtype=torch.float64)
    V = torch.randn(10, 65, generator=gen, dtype=torch.float64)
    _, hvp = torch.autograd.functional.hvp(exp.softmax_loss, W, V)
    H = exp.softmax_exact_hessian(W.reshape(-1))
    torch.testing.assert_close(H @ V.reshape(-1), hvp.reshape(-1), rtol=1e-10, atol=1e-12)
    gn = exp.softmax_gauss_newton(W.reshape(-1))
    assert float(torch.linalg.eigvalsh(gn - H).min()) > -1e-12  # GN drops a PSD rank-one part


@pytest.fixture(scope="module")
def smoke_logistic():
    return {arm: exp.run_logistic(arm, None, 0, "smoke") for arm in exp.LOGISTIC_ARMS}


def test_logistic_smoke_runs(smoke_logistic):
    for arm, rec in smoke_logistic.items():
        m = rec["metrics"]
        assert {"iters", "final_gap", "slope", "r2", "f_star"} <= set(m)
        assert ("solves" in m) == (arm != "gd_ls")
        gap = rec["curves"]["gap"]
        assert gap[0][0] == 0 and len(gap) <= exp.LOGISTIC_CAPS["smoke"][0] + 1 and gap[-1][1] == m["final_gap"]
        assert all(b[1] <= a[1] + 1e-15 for a, b in zip(gap, gap[1:]))  # monotone descent on this problem
    recs = [{"experiment": exp.LOGISTIC.id, "arm": arm, "lr": None, "seed": 0, "mode": "smoke",
             "metrics": rec["metrics"]} for arm, rec in smoke_logistic.items()]
    assert exp.verdict_logistic(recs)[0] == "report"
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run_logistic("bfgs", None, 0, "smoke")


def test_softmax_smoke_runs():
    recs = []
    for arm in exp.SOFTMAX_ARMS:
        rec = exp.run_softmax(arm, None, 0, "smoke")
        assert {"iters", "final_gap", "cap", "f_star"} <= set(rec["metrics"])
        assert len(rec["curves"]["gap"]) <= rec["metrics"]["cap"] + 1
        recs.append({"experiment": exp.SOFTMAX.id, "arm": arm, "lr": None, "seed": 0, "mode": "smoke",
                     "metrics": rec["metrics"]})
    status, summary = exp.verdict_softmax(recs)
    assert status == "report" and summary.startswith("smoke")


def logistic_records(mode="full", **over):
    m = {"exact": {"iters": 12.0, "solves": 16.0, "final_gap": 6e-13, "slope": -1.5, "r2": 0.8},
         "boehning": {"iters": 232.0, "solves": 472.0, "final_gap": 9.6e-9, "slope": -0.031, "r2": 0.999},
         "diag": {"iters": 528.0, "solves": 1064.0, "final_gap": 9.7e-9, "slope": -0.012, "r2": 0.999},
         "gd_ls": {"iters": math.inf, "final_gap": 0.08, "slope": -6e-5, "r2": 0.998}}
    for key, value in over.items():
        arm, name = key.split("__")
        m[arm][name] = value
    return [{"experiment": exp.LOGISTIC.id, "arm": arm, "lr": None, "seed": 0, "mode": mode, "metrics": v}
            for arm, v in m.items()]


def test_logistic_verdict_pass_and_each_failure():
    status, summary = exp.verdict_logistic(logistic_records())
    assert status == "pass" and "exact 12 <= 25: yes" in summary and "gd_ls: tolerance not reached" in summary
    for over, text in [({"exact__iters": 26.0}, "exact 26 <= 25: no"),
                       ({"boehning__iters": math.inf}, "Boehning not reached <= 500: no"),
                       ({"boehning__slope": 0.001}, "(need < 0 and > 0.9: no)"),
                       ({"boehning__r2": 0.85}, "(need < 0 and > 0.9: no)"),
                       ({"gd_ls__final_gap": 5e-5}, "(need > 0.0001: no)")]:
        status, summary = exp.verdict_logistic(logistic_records(**over))
        assert status == "fail" and text in summary, over


def test_logistic_verdict_quick_and_smoke_report():
    status, summary = exp.verdict_logistic(logistic_records("quick"))
    assert status == "report" and "full rule would say pass" in summary
    status, summary = exp.verdict_logistic(logistic_records("quick", exact__iters=40.0))
    assert status == "report" and "full rule would say fail" in summary
    assert exp.verdict_logistic(logistic_records("smoke"))[0] == "report"
    missing = [r for r in logistic_records() if r["arm"] != "diag"]
    status, summary = judge(exp.LOGISTIC, missing)
    assert status == "error" and "diag" in summary


def test_softmax_verdict_is_report_only_with_ratios():
    def recs(gn_iters, gd_iters):
        m = {"exact": {"iters": 9.0, "solves": 10.0, "final_gap": 2e-8, "cap": 100.0},
             "gauss_newton": {"iters": gn_iters, "solves": 600.0, "final_gap": 9e-3, "cap": 300.0},
             "gd_ls": {"iters": gd_iters, "final_gap": 9e-7, "cap": 2000.0}}
        return [{"experiment": exp.SOFTMAX.id, "arm": a, "lr": None, "seed": 0, "mode": "full", "metrics": v}
                for a, v in m.items()]

    status, summary = exp.verdict_softmax(recs(math.inf, 176.0))
    assert status == "report" and "GN/exact > 33.33" in summary and "GN/GD > 1.70" in summary
    status, summary = exp.verdict_softmax(recs(18.0, 180.0))
    assert status == "report" and "GN/exact 2.00" in summary and "GN/GD 0.10" in summary
    status, summary = exp.verdict_softmax(recs(18.0, math.inf))
    assert "GN/GD < 0.01" in summary
