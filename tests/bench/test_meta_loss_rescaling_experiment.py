import math

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import meta_loss_rescaling as exp
from normlab.bench.runner import judge


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with intra_op_threads(1):
        yield


def test_registered_with_the_sheet_protocol():
    assert exp.NOISY.id == "meta_loss_rescaling.noisy" and exp.CLEAN.id == "meta_loss_rescaling.clean"
    for e in (exp.NOISY, exp.CLEAN):
        assert e.slug == "meta_loss_rescaling" and e.primary_metric == "test_acc"
        full = e.grids["full"]
        assert full.arms == ("ce", "storm") and full.lrs == (0.03, 0.1) and full.seeds == (0, 1, 2)
        assert e.grids["quick"].arms == e.grids["smoke"].arms == ("ce", "storm")
    assert exp.EPOCHS["full"] == 60 and exp.WARMUP_EPOCHS["full"] == 3 and exp.BATCH == 64
    assert (exp.NOISY_MARGIN, exp.RATIO_MIN, exp.CLEAN_TOLERANCE) == (0.03, 3.0, 0.015)


def test_split_is_the_sheets_70_30():
    x_train, y_train, x_test, y_test = exp._split()
    assert x_train.shape == (1257, 64) and x_test.shape == (540, 64)
    assert 0 <= float(x_train.min()) and float(x_train.max()) <= 1
    # stratified: every class keeps its share within one example
    for k in range(10):
        share = (y_train == k).sum() / 1257
        assert abs(float(share - (y_test == k).sum() / 540)) < 3 / 540


def test_noisy_labels_symmetric_and_seeded():
    y = torch.arange(10).repeat(100)
    noisy, noised = exp.noisy_labels(y, 0.4, torch.Generator().manual_seed(0))
    again, _ = exp.noisy_labels(y, 0.4, torch.Generator().manual_seed(0))
    other, _ = exp.noisy_labels(y, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    assert int(noised.sum()) == 400 and torch.equal(noisy[~noised], y[~noised])
    flipped = float((noisy != y).float().mean())
    assert 0.32 < flipped < 0.40  # about 9/10 of the replaced labels change
    hist = torch.bincount(noisy[noised], minlength=10).float()
    assert hist.min() > 20  # uniform over classes
    clean, none = exp.noisy_labels(y, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(clean, y) and not none.any()


def test_weight_ratio():
    w = torch.tensor([2.0, 4.0, 1.0, 0.5])
    flipped = torch.tensor([False, False, True, True])
    assert exp.weight_ratio(w, flipped) == pytest.approx(3.0 / 0.75)
    assert math.isnan(exp.weight_ratio(w, torch.zeros(4, dtype=torch.bool)))


@pytest.fixture(scope="module")
def smoke_runs():
    return {arm: exp.NOISY.run(arm, 0.1, 0, "smoke") for arm in exp.ARMS}


def test_smoke_run_records(smoke_runs):
    epochs = exp.EPOCHS["smoke"]
    for arm, rec in smoke_runs.items():
        assert set(rec) == {"metrics", "curves"}
        assert [s for s, _ in rec["curves"]["test_acc"]] == list(range(1, epochs + 1))
        assert rec["metrics"]["test_acc"] == rec["curves"]["test_acc"][-1][1]
        assert 0 <= rec["metrics"]["test_acc"] <= 1
        assert 0.3 < rec["metrics"]["train_noise"] < 0.42
    storm = smoke_runs["storm"]
    assert math.isfinite(storm["metrics"]["weight_ratio"]) and math.isfinite(storm["metrics"]["weight_ratio_noised"])
    assert "weight_ratio" not in smoke_runs["ce"]["metrics"]


def test_arms_share_init_noise_and_batches(smoke_runs):
    # the warm-up epoch of STORM is plain cross-entropy: same init, noise and batch order give the same model
    assert smoke_runs["storm"]["curves"]["test_acc"][0][1] == smoke_runs["ce"]["curves"]["test_acc"][0][1]
    assert smoke_runs["storm"]["metrics"]["train_noise"] == smoke_runs["ce"]["metrics"]["train_noise"]


def test_clean_run_has_no_ratio():
    rec = exp.CLEAN.run("storm", 0.1, 0, "smoke")
    assert rec["metrics"]["train_noise"] == 0.0 and "weight_ratio" not in rec["metrics"]


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.train("mae", 0.1, 0, 0.4, "smoke")


def records(values, mode="full", experiment="meta_loss_rescaling.noisy"):
    """``values``: {(arm, lr): [acc or (acc, ratio) per seed]}."""
    out = []
    for (arm, lr), per_seed in values.items():
        for seed, v in enumerate(per_seed):
            acc, ratio = v if isinstance(v, tuple) else (v, None)
            metrics = {"test_acc": acc}
            if ratio is not None:
                metrics.update(weight_ratio=ratio, weight_ratio_noised=ratio / 4)
            out.append({"experiment": experiment, "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                        "metrics": metrics})
    return out


def noisy_values(storm_acc=0.95, ratio=8.0):
    return {("ce", 0.03): [0.89, 0.87, 0.90], ("ce", 0.1): [0.72, 0.74, 0.71],
            ("storm", 0.03): [(0.90, 20.0)] * 3, ("storm", 0.1): [(storm_acc, ratio)] * 3}


def test_noisy_verdict_pass_uses_best_lr_per_arm():
    status, summary = exp.verdict_noisy(records(noisy_values()))
    assert status == "pass", summary
    assert "ce best lr 0.03 acc 0.887" in summary and "storm best lr 0.1 acc 0.950" in summary
    assert "ratio 8.00" in summary  # the ratio at STORM's best lr, not the other lr's 20


def test_noisy_verdict_fails_on_small_gain_or_low_ratio():
    status, summary = exp.verdict_noisy(records(noisy_values(storm_acc=0.91)))
    assert status == "fail" and "+2.3 points" in summary
    assert exp.verdict_noisy(records(noisy_values(ratio=2.5)))[0] == "fail"
    assert exp.verdict_noisy(records(noisy_values(ratio=math.nan)))[0] == "fail"


def test_clean_verdict_tolerance_and_best_lr_rule():
    values = {("ce", 0.03): [0.972, 0.980, 0.980], ("ce", 0.1): [0.976, 0.980, 0.976],
              ("storm", 0.03): [0.957, 0.957, 0.961], ("storm", 0.1): [0.978, 0.980, 0.980]}
    status, summary = exp.verdict_clean(records(values, experiment="meta_loss_rescaling.clean"))
    assert status == "pass" and "+0.2 points" in summary and "storm lr 0.03: 0.957/0.957/0.961" in summary
    values[("storm", 0.1)] = [0.955, 0.96, 0.96]
    assert exp.verdict_clean(records(values, experiment="meta_loss_rescaling.clean"))[0] == "fail"


def test_quick_and_smoke_are_report_only():
    quick = {("ce", 0.1): [0.7], ("storm", 0.1): [(0.96, 30.0)]}
    status, summary = exp.verdict_noisy(records(quick, "quick"))
    assert status == "report" and "indicative" in summary
    assert exp.verdict_clean(records({("ce", 0.1): [0.97], ("storm", 0.1): [0.5]}, "smoke"))[0] == "report"


def test_missing_arm_or_mixed_modes_error():
    status, summary = judge(exp.NOISY, records({("ce", 0.1): [0.7]}))
    assert status == "error" and "storm" in summary
    mixed = records({("ce", 0.1): [0.7]}) + records({("storm", 0.1): [(0.9, 5.0)]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict_noisy(mixed)
