import dataclasses

from normlab.bench.experiments import bcn_ws
from normlab.bench.experiments import evonorm as exp
from normlab.bench.runner import judge, load_records, run_experiments


def test_registered_on_the_shared_runs():
    assert {e.id for e in (exp.S0_VS_GN, exp.REPORT)} == {"evonorm.s0_vs_gn", "evonorm.report"}
    for e in (exp.S0_VS_GN, exp.REPORT):
        assert e.slug == "evonorm" and e.primary_metric == "test_acc"
        assert e.run is bcn_ws.run and e.shared_key is bcn_ws.shared_key
        assert e.grids["full"] == bcn_ws.SMALL_BATCH.grids["full"]  # the same 72 runs as the bcn_ws checks
        assert len(e.grids["full"].points()) == 72
        assert e.grids["quick"].lrs == bcn_ws.SMALL_BATCH.grids["quick"].lrs
    assert set(exp.S0_VS_GN.grids["quick"].arms) == {"s0@64", "gn_relu@64"}
    assert set(exp.REPORT.grids["quick"].arms) == set(exp.REPORT_ARMS)


def records(values, mode="full"):
    """``values``: {(arm, lr): [test accuracy per seed]}."""
    return [{"experiment": "evonorm", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"test_acc": acc, "train_loss": 0.1}}
            for (arm, lr), per_seed in values.items() for seed, acc in enumerate(per_seed)]


SHEET = {  # per-seed values consistent with the sheet's table and gaps
    ("s0@64", 1e-3): [0.986, 0.992, 0.996],
    ("s0@64", 3e-3): [0.999, 0.96, 0.96],          # best single seed, worse mean: not chosen
    ("gn_relu@64", 3e-3): [0.993, 0.986, 0.985],   # S0 - GN per seed -0.7, +0.6, +1.1
    ("gn_relu@64", 1e-3): [0.98, 0.98, 0.98],
    ("s0@4", 1e-3): [0.95, 0.94, 0.983],
    ("gn_relu@4", 1e-3): [0.941, 0.959, 0.793],
    ("b0@64", 3e-3): [0.991, 0.983, 0.991],
    ("bn_relu@64", 3e-3): [0.998, 0.996, 0.997],
    ("b0@4", 1e-3): [0.97, 0.92, 0.977],
    ("bn_relu@4", 1e-3): [0.99, 0.975, 0.98],
}


def test_gate_passes_on_the_sheet_numbers():
    status, summary = exp.verdict_s0_vs_gn(records(SHEET))
    assert status == "pass", summary
    assert "mean S0 - GN +0.3 points (need >= -1.5: yes)" in summary
    assert "per seed -0.7, +0.6, +1.1" in summary
    assert "EvoNorm-S0@64 0.991 ± 0.005 (lr 0.001, 3 seed(s))" in summary


def test_gate_fails_when_s0_is_more_than_the_tolerance_below_gn():
    values = dict(SHEET)
    values[("s0@64", 1e-3)] = [0.972, 0.972, 0.972]  # -1.6 points
    values[("s0@64", 3e-3)] = [0.9, 0.9, 0.9]
    status, summary = exp.verdict_s0_vs_gn(records(values))
    assert status == "fail" and "mean S0 - GN -1.6 points (need >= -1.5: no)" in summary


def test_quick_and_smoke_are_report_only():
    quick = records({(arm, 3e-3): [0.99] for arm in exp.GATE_ARMS}, "quick")
    status, summary = exp.verdict_s0_vs_gn(quick)
    assert status == "report" and summary.startswith("indicative")
    assert exp.verdict_s0_vs_gn(records(SHEET, "smoke"))[0] == "report"


def test_report_check():
    status, summary = exp.verdict_report(records(SHEET))
    assert status == "report" and summary.startswith("report-only")
    assert "batch 4: S0 - GN: +6.0 points" in summary
    assert "batch 64: B0 - BN: -0.9 points (per seed -0.7, -1.3, -0.6" in summary
    assert "batch 4: B0 - BN: -2.6 points" in summary


def test_missing_arm_is_an_error():
    status, summary = judge(exp.REPORT, records({k: v for k, v in SHEET.items() if k[0] != "b0@4"}))
    assert status == "error" and "b0@4" in summary


def test_smoke_shares_runs_with_the_bcn_ws_checks(tmp_path):
    calls = []

    def counting(arm, lr, seed, mode):
        calls.append(arm)
        return bcn_ws.run(arm, lr, seed, mode)

    checks = [dataclasses.replace(e, run=counting) for e in (bcn_ws.REPORT, exp.S0_VS_GN, exp.REPORT)]
    verdicts = run_experiments(checks, "smoke", tmp_path, progress=False)
    assert [v["status"] for v in verdicts] == ["report"] * 3, verdicts
    union = set(bcn_ws.REPORT_ARMS) | set(exp.GATE_ARMS) | set(exp.REPORT_ARMS)
    assert sorted(calls) == sorted(union)
    recs = load_records(tmp_path)
    gn64 = [r["metrics"] for r in recs if r["arm"] == "gn_relu@64"]
    assert len(gn64) == 2 and gn64[0] == gn64[1]  # one run, read by bcn_ws.report and evonorm.s0_vs_gn
