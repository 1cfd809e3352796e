import math

import pytest

from normlab.bench.experiment import all_experiments
from normlab.bench.experiments import pre_rmsnorm as exp


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "pre_rmsnorm" and all_experiments()["pre_rmsnorm"] is e
    assert e.grids["full"].arms == ("pre_ln", "pre_rms", "pre_crms") and e.grids["full"].lrs == (None,)
    full = exp.SIZES["full"]
    assert (full["d"], full["layers"], full["batch"], full["seq"], full["warm"], full["timed"]) == \
        (256, 6, 16, 128, 20, 50)


@pytest.fixture(scope="module")
def smoke_records():
    return [{"experiment": "pre_rmsnorm", "arm": arm, "lr": None, "seed": 0, "mode": "smoke",
             **exp.run(arm, None, 0, "smoke")} for arm in exp.ARMS]


def test_smoke_runs(smoke_records):
    base, *converted = smoke_records
    assert set(base["metrics"]) == {"logit_abs_max", "stream_mean_to_std"}
    assert base["metrics"]["stream_mean_to_std"] > 0.1  # the stream is far from zero-mean
    for rec in converted:
        m = rec["metrics"]
        assert set(m) == {"max_diff_fp64", "max_diff_fp32", "train_ms", "infer_ms", "train_ratio", "infer_ratio"}
        assert all(math.isfinite(v) and v >= 0 for v in m.values())
        assert m["max_diff_fp64"] <= 1e-9 and m["max_diff_fp32"] <= 1e-5
    status, summary = exp.verdict(smoke_records)
    assert status == "report" and summary.startswith("smoke:")


def test_unknown_arm():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("post_ln", None, 0, "smoke")


def _rec(arm, seed, d64=1e-15, d32=1e-6, ratio=0.97, mode="full"):
    metrics = {"logit_abs_max": 3.0, "stream_mean_to_std": 1.0}
    if arm != "pre_ln":
        metrics = {"train_ms": 10.0, "infer_ms": 4.0, "max_diff_fp64": d64, "max_diff_fp32": d32,
                   "train_ratio": ratio, "infer_ratio": ratio}
    return {"arm": arm, "lr": None, "seed": seed, "mode": mode, "metrics": metrics}


def _records(**over):
    return [_rec(arm, seed, **over) for seed in (0, 1, 2) for arm in exp.ARMS]


def test_verdict_pass_and_timing_is_report_only():
    status, summary = exp.verdict(_records())
    assert status == "pass" and "x0.970" in summary and "report only" in summary
    assert "stream |mean|/std 1.00" in summary
    status, _ = exp.verdict(_records(ratio=1.5))  # slower never decides
    assert status == "pass"


@pytest.mark.parametrize("bad", [{"d64": 1e-8}, {"d32": 2e-5}, {"d64": float("nan")}])
def test_verdict_fails_on_any_seed_over_tolerance(bad):
    recs = _records()
    recs[4]["metrics"] |= {{"d64": "max_diff_fp64", "d32": "max_diff_fp32"}[k]: v for k, v in bad.items()}
    status, summary = exp.verdict(recs)
    assert status == "fail" and "NOT equal" in summary


def test_verdict_quick_is_indicative_and_missing_arm_is_error():
    status, summary = exp.verdict(_records(mode="quick"))
    assert status == "pass" and summary.startswith("indicative")
    with pytest.raises(ValueError, match="pre_crms"):
        exp.verdict([r for r in _records() if r["arm"] != "pre_crms"])
    with pytest.raises(ValueError, match="no records"):
        exp.verdict([])
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(_records() + [_rec("pre_rms", 5, mode="quick")])
