import math

import pytest
import torch

from normlab.bench.experiments import layernorm as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "layernorm" and e.slug == "layernorm"
    full = e.grids["full"]
    assert full.arms == ("lstm", "ln_lstm") and full.lrs == (1e-3, 3e-3, 1e-2) and full.seeds == (0, 1)
    assert exp.STEPS["full"] == 200
    assert e.grids["quick"].arms == e.grids["smoke"].arms == ("lstm", "ln_lstm")


def test_metric_windows():
    assert exp._window(200, 0.45, 0.55) == (90, 110)
    assert exp._window(200, 0.9, 1.0) == (180, 200)
    lo, hi = exp._window(exp.STEPS["smoke"], 0.9, 1.0)
    assert 1 <= lo <= hi == exp.STEPS["smoke"]


@pytest.fixture(scope="module")
def smoke_runs():
    """Both arms, seeds 0 and 1, smoke mode, with every batch each run drew."""
    seen = {}
    original = exp.char_batch

    def recording(ids, batch_size, seq_len, generator):
        x, y = original(ids, batch_size, seq_len, generator)
        seen[current].append((x.clone(), y.clone()))
        return x, y

    results = {}
    exp.char_batch = recording
    try:
        for key in (("lstm", 0), ("ln_lstm", 0), ("ln_lstm", 1)):
            current = key
            seen[key] = []
            results[key] = exp.run(key[0], 3e-3, key[1], "smoke")
    finally:
        exp.char_batch = original
    return results, seen


def test_smoke_run_record_structure(smoke_runs):
    results, _ = smoke_runs
    steps = exp.STEPS["smoke"]
    for rec in results.values():
        assert set(rec) == {"metrics", "curves"}
        assert set(rec["metrics"]) == {"loss_100", "loss_200"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in rec["metrics"].values())
        curve = rec["curves"]["train_loss"]
        assert [s for s, _ in curve] == list(range(1, steps + 1))
        assert all(math.isfinite(v) for _, v in curve)
        assert abs(curve[0][1] - math.log(exp.VOCAB)) < 0.5  # starts near a uniform guess
        lo, hi = exp._window(steps, 0.9, 1.0)
        assert rec["metrics"]["loss_200"] == pytest.approx(sum(v for _, v in curve[lo - 1:hi]) / (hi - lo + 1))


def test_arms_see_identical_data_per_seed(smoke_runs):
    _, seen = smoke_runs
    assert len(seen[("lstm", 0)]) == exp.STEPS["smoke"]
    for (xa, ya), (xb, yb) in zip(seen[("lstm", 0)], seen[("ln_lstm", 0)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the next characters
    assert not torch.equal(seen[("ln_lstm", 0)][0][0], seen[("ln_lstm", 1)][0][0])


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.CharLM("gru")


def records(values, mode="full"):
    """``values``: {(arm, lr): [(loss_100, loss_200) per seed]}."""
    return [{"experiment": "layernorm", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"loss_100": l100, "loss_200": l200}}
            for (arm, lr), per_seed in values.items() for seed, (l100, l200) in enumerate(per_seed)]


def test_verdict_pass_picks_best_lr_by_seed_mean():
    recs = records({
        ("lstm", 1e-3): [(3.0, 2.0), (3.0, 3.0)],   # best single seed, worse mean (2.5)
        ("lstm", 3e-3): [(2.8, 2.45), (2.8, 2.45)],  # best mean
        ("ln_lstm", 1e-3): [(2.3, 2.0), (2.3, 2.0)],
        ("ln_lstm", 3e-3): [(1.9, 1.7), (1.9, 1.68)],
    })
    status, summary = exp.verdict(recs)
    assert status == "pass"
    assert "lstm: best lr 0.003, loss@200 2.450" in summary
    assert "ln_lstm: best lr 0.003, loss@200 1.690, loss@100 1.900" in summary


def test_verdict_fails_when_the_gap_is_too_small():
    recs = records({("lstm", 3e-3): [(2.8, 2.0), (2.8, 2.0)], ("ln_lstm", 3e-3): [(1.7, 1.85), (1.7, 1.85)]})
    status, summary = exp.verdict(recs)
    assert status == "fail" and "need >= 0.2: no" in summary and "need <=: yes" in summary


def test_verdict_fails_when_ln_lstm_is_not_twice_as_fast():
    recs = records({("lstm", 3e-3): [(2.8, 2.5), (2.8, 2.5)], ("ln_lstm", 3e-3): [(2.6, 1.7), (2.6, 1.7)]})
    status, summary = exp.verdict(recs)
    assert status == "fail" and "need >= 0.2: yes" in summary and "need <=: no" in summary


def test_verdict_diverged_ln_lstm_fails():
    recs = records({("lstm", 3e-3): [(2.8, 2.5)], ("ln_lstm", 3e-3): [(math.nan, math.nan)]})
    assert exp.verdict(recs)[0] == "fail"


def test_verdict_quick_and_smoke_report_only():
    values = {("lstm", 3e-3): [(2.8, 2.5)], ("ln_lstm", 3e-3): [(1.9, 1.7)]}
    status, summary = exp.verdict(records(values, "quick"))
    assert status == "report" and "indicative" in summary and "1.700" in summary
    assert exp.verdict(records(values, "smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records({("lstm", 3e-3): [(2.8, 2.5), (2.8, 2.5)]}))
    assert status == "error" and "ln_lstm" in summary
    assert judge(exp.EXPERIMENT, [])[0] == "error"
    mixed = records({("lstm", 3e-3): [(2.8, 2.5)]}) + records({("ln_lstm", 3e-3): [(1.9, 1.7)]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)
