import pytest

from normlab.bench.experiments import adaptive_guidance as exp
from normlab.bench.runner import judge

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_with_the_sheet_protocol():
    x0, eps = exp.X0, exp.EPS
    assert (x0.id, eps.id) == ("adaptive_guidance.x0", "adaptive_guidance.eps") and x0.slug == eps.slug
    assert x0.grids["full"].seeds == (0, 1, 2) and x0.grids["full"].arms == ("sweep",)
    assert x0.shared_key("sweep", None, 1, "full") == eps.shared_key("sweep", None, 1, "full")
    assert exp.GRID_X0 == (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
    assert exp.GRID_EPS == (0.96, 0.97, 0.975, 0.98, 0.99)
    assert exp.SCALE == 3.0 and exp.SIZES["full"] == (2500, 100)
    assert [exp.matched_truncation(r, 100) for r in (0.5, 0.796, 0.859, 1.0)] == [0, 59, 72, 100]
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("cfg", None, 0, "smoke")


@pytest.fixture(scope="module")
def smoke_record():
    rec = exp.run("sweep", None, 0, "smoke")
    return {"arm": "sweep", "lr": None, "seed": 0, "mode": "smoke", **rec}


def test_smoke_run_records_every_point(smoke_record, tmp_path):
    m = smoke_record["metrics"]
    assert m["cfg_nfe_ratio"] == 1.0 and m["cond_nfe_ratio"] == 0.5 and m["cfg_nfe_exact"] == 1.0
    for space, grid in exp.SPACES.items():
        for g in grid:
            assert 0.5 <= m[exp.key(space, g, "nfe_ratio")] <= 1.0
            assert m[exp.key(space, g, "nfe_exact")] == 1.0 == m[exp.key(space, g, "trunc_nfe_exact")]
            assert m[exp.key(space, g, "trunc_k")] == exp.matched_truncation(m[exp.key(space, g, "nfe_ratio")], 100)
    assert len(smoke_record["curves"]["cosine_eps"]) == 100 == len(smoke_record["curves"]["cosine_x0"])
    assert m["cos_x0_last"] == pytest.approx(smoke_record["curves"]["cosine_x0"][-1][1])
    for experiment in (exp.X0, exp.EPS):
        status, summary = judge(experiment, [smoke_record])
        assert status == "report" and summary.startswith("smoke")
    assert exp.figures([smoke_record], tmp_path) == ["adaptive_guidance.frontier.png"]
    assert (tmp_path / "adaptive_guidance.frontier.png").stat().st_size > 0


def fake(seed, *, x0=(0.59, 0.69, 0.796, 0.859, 0.905, 0.956), acc=(0.961, 0.986, 0.997, 1.0, 1.0, 1.0),
         rmse_gap=0.0, eps_ratio=(0.58, 0.75, 0.87, 0.96, 1.0), eps_acc=(0.93, 0.96, 0.98, 0.99, 1.0),
         trunc_eps_acc=(0.96, 0.995, 0.999, 1.0, 1.0), cos_eps=(0.96, 0.75), exact=1.0, mode="full"):
    m = {"cfg_acc": 1.0, "cfg_nfe_ratio": 1.0, "cond_acc": 0.915, "cond_rmse": 0.5, "cond_nfe_ratio": 0.5,
         "cfg_nfe_exact": 1.0, "cos_eps_first": cos_eps[0], "cos_eps_last": cos_eps[1], "cos_x0_first": 0.84,
         "cos_x0_last": 1.0}
    for i, g in enumerate(exp.GRID_X0):
        rmse = 0.4 - 0.07 * i
        m.update({exp.key("x0", g, "nfe_ratio"): x0[i], exp.key("x0", g, "acc"): acc[i],
                  exp.key("x0", g, "rmse"): rmse + rmse_gap, exp.key("x0", g, "trunc_rmse"): rmse,
                  exp.key("x0", g, "trunc_acc"): acc[i], exp.key("x0", g, "nfe_exact"): exact,
                  exp.key("x0", g, "trunc_nfe_exact"): 1.0, exp.key("x0", g, "trunc_k"): 10.0})
    for i, g in enumerate(exp.GRID_EPS):
        m.update({exp.key("eps", g, "nfe_ratio"): eps_ratio[i], exp.key("eps", g, "acc"): eps_acc[i],
                  exp.key("eps", g, "trunc_acc"): trunc_eps_acc[i], exp.key("eps", g, "rmse"): 0.1,
                  exp.key("eps", g, "trunc_rmse"): 0.1, exp.key("eps", g, "trunc_k"): 10.0,
                  exp.key("eps", g, "nfe_exact"): 1.0, exp.key("eps", g, "trunc_nfe_exact"): 1.0})
    return {"arm": "sweep", "lr": None, "seed": seed, "mode": mode, "metrics": m, "curves": {}}


def test_x0_verdict_passes_the_sheet_numbers_and_fails_each_rule():
    status, summary = exp.x0_verdict([fake(s) for s in range(3)])
    assert status == "pass" and "0.95, 0.98" in summary and "(yes" in summary
    assert exp.x0_verdict([fake(0), fake(1, exact=0.0), fake(2)])[0] == "fail"  # rule (1)
    low = dict(acc=(0.9, 0.95, 0.96, 0.99, 1.0, 1.0))  # 0.99 reaches acc but NFE 0.859 > 0.85
    status, summary = exp.x0_verdict([fake(s, **low) for s in range(3)])
    assert status == "fail" and "none (no" in summary  # rule (2)
    assert exp.x0_verdict([fake(s, rmse_gap=0.031) for s in range(3)])[0] == "fail"  # rule (3)
    assert exp.x0_verdict([fake(s, rmse_gap=0.029) for s in range(3)])[0] == "pass"
    status, summary = exp.x0_verdict([fake(0, mode="quick")])
    assert status == "report" and summary.startswith("indicative (quick")


def test_eps_verdict_reports_an_unmet_premise_and_gates_a_met_one():
    status, summary = exp.eps_verdict([fake(s) for s in range(3)])
    assert status == "report" and "premise not met" in summary and "0.960 -> 0.750" in summary
    met = [fake(s, cos_eps=(0.8, 0.99)) for s in range(3)]
    assert exp.eps_verdict(met)[0] == "fail"  # AG trails truncation by 0.03-0.035
    close = dict(cos_eps=(0.8, 0.99), trunc_eps_acc=(0.95, 0.975, 0.99, 1.0, 0.5))  # 0.99 (ratio 1) excluded
    status, summary = exp.eps_verdict([fake(s, **close) for s in range(3)])
    assert status == "pass" and "0.99:" not in summary.split("matched NFE")[-1]
    assert exp.eps_verdict([fake(0, mode="quick", cos_eps=(0.8, 0.99))])[0] == "report"
    with pytest.raises(ValueError, match="no records"):
        exp.eps_verdict([])
