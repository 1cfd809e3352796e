import math

import pytest
import torch

from normlab.bench.experiment import all_experiments
from normlab.bench.experiments import adamp as exp
from normlab.bench.runner import judge
from normlab.bench.tasks import digits
from normlab.optim.adamp import SGDP, AdamP, is_scale_invariant


def test_registered_with_the_sheet_protocol():
    registry = all_experiments()
    a, s = registry["adamp"], registry["adamp.sgdp"]
    assert a is exp.EXPERIMENT and s is exp.SGDP_EXPERIMENT and a.slug == s.slug == "adamp"
    assert a.grids["full"].arms == ("adam", "adamp") and a.grids["full"].lrs == (3e-3, 1e-2)
    assert s.grids["full"].arms == ("sgd", "sgdp") and s.grids["full"].lrs == (0.1, 0.3)
    for e in (a, s):
        assert e.grids["full"].seeds == (0, 1, 2) and e.primary_metric == "w2_norm_ratio"
        assert e.grids["quick"].lrs == e.grids["full"].lrs and e.grids["quick"].seeds == (0,)
        assert e.grids["smoke"].arms == e.grids["full"].arms
    assert exp.STEPS["full"] == exp.STEPS["quick"] == 400 and exp.BATCH == 64 and exp.WIDTH == 128


def test_data_model_and_optimizers_are_the_sheets():
    x_train, y_train = digits("train", test_fraction=exp.TEST_FRACTION)
    x_test, _ = digits("test", test_fraction=exp.TEST_FRACTION)
    assert len(y_train) == 1400 and len(x_test) == 397
    torch.manual_seed(0)
    model = exp.make_model()
    assert model[4].weight.shape == (128, 128) and model[4].bias is None
    assert is_scale_invariant(model, "4.weight", x_train[:64]) and is_scale_invariant(model, "1.weight", x_train[:64])
    assert not is_scale_invariant(model, "7.weight", x_train[:64])  # the head is not
    params = list(model.parameters())
    assert isinstance(exp.make_optimizer("sgd", params, 0.1), torch.optim.SGD)
    sgdp = exp.make_optimizer("sgdp", params, 0.1)
    assert isinstance(sgdp, SGDP) and sgdp.defaults["momentum"] == 0.9 == exp.make_optimizer(
        "sgd", params, 0.1).defaults["momentum"]
    assert isinstance(exp.make_optimizer("adamp", params, 1e-3), AdamP)
    assert type(exp.make_optimizer("adam", params, 1e-3)) is torch.optim.Adam
    with pytest.raises(ValueError, match="unknown arm"):
        exp.make_optimizer("lamb", params, 0.1)


def test_batches_reshuffle_per_epoch_and_depend_on_the_seed():
    b = exp.batches(1400, 50, seed=0)
    assert len(b) == 50 and all(len(i) == exp.BATCH for i in b)
    per_epoch = 1400 // exp.BATCH
    first_epoch = torch.cat(b[:per_epoch])
    assert len(first_epoch.unique()) == len(first_epoch)  # no repeats within an epoch
    assert not torch.equal(b[0], b[per_epoch])
    assert all(torch.equal(x, y) for x, y in zip(b, exp.batches(1400, 50, seed=0)))
    assert not torch.equal(b[0], exp.batches(1400, 1, seed=1)[0])


@pytest.fixture(scope="module")
def smoke_runs():
    """Every arm, seed 0, smoke mode, with the initial weights each optimizer received."""
    initial = {}
    original = exp.make_optimizer

    def recording(arm, params, lr):
        params = list(params)
        initial[arm] = [p.detach().clone() for p in params]
        return original(arm, params, lr)

    exp.make_optimizer = recording
    try:
        results = {(arm, lr): exp.run(arm, lr, 0, "smoke")
                   for eid, arms in exp.PAIRS.items() for arm in arms for lr in exp.LRS[eid][:1]}
    finally:
        exp.make_optimizer = original
    return results, initial


def test_smoke_run_record_structure(smoke_runs):
    results, _ = smoke_runs
    steps = exp.STEPS["smoke"]
    for rec in results.values():
        assert set(rec) == {"metrics", "curves"}
        assert set(rec["metrics"]) == {"w2_norm_ratio", "w1_norm_ratio", "test_acc", "train_loss"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in rec["metrics"].values())
        assert 0.0 <= rec["metrics"]["test_acc"] <= 100.0
        curve = rec["curves"]["w2_norm_ratio"]
        assert curve[0] == [0, 1.0] and curve[-1] == [steps, rec["metrics"]["w2_norm_ratio"]]
        assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, steps + 1))
        assert rec["curves"]["train_loss"][0][1] == pytest.approx(math.log(10), abs=0.5)


def test_arms_start_from_the_same_weights(smoke_runs):
    _, initial = smoke_runs
    for arm in ("sgdp", "adam", "adamp"):
        assert all(torch.equal(a, b) for a, b in zip(initial["sgd"], initial[arm]))


def records(values, experiment="adamp", mode="full"):
    """``values``: {(arm, lr): [(w2_norm_ratio, test_acc) per seed]}."""
    return [{"experiment": experiment, "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"w2_norm_ratio": ratio, "test_acc": acc, "w1_norm_ratio": ratio, "train_loss": 0.1}}
            for (arm, lr), per_seed in values.items() for seed, (ratio, acc) in enumerate(per_seed)]


PASSING = {
    ("adam", 3e-3): [(1.2, 98.0), (1.25, 98.2)],
    ("adam", 1e-2): [(2.5, 99.0), (2.6, 95.0)],  # best single seed, worse mean (97.0)
    ("adamp", 3e-3): [(1.02, 97.6), (1.0, 97.6)],
    ("adamp", 1e-2): [(1.25, 96.0), (1.3, 96.0)],
}


def test_verdict_pass_picks_best_lr_by_seed_mean():
    status, summary = exp.verdict_adamp(records(PASSING))
    assert status == "pass", summary
    assert "adam 98.10% (lr 0.003, 2 seed(s))" in summary and "adamp 97.60% (lr 0.003" in summary
    assert "lr 0.01: ||W2_T||/||W2_0|| adam 2.550 vs adamp 1.275 (growth fraction 0.18, ok)" in summary


def test_verdict_fails_when_growth_is_not_halved_at_one_lr():
    values = dict(PASSING)
    values[("adamp", 3e-3)] = [(1.15, 97.6), (1.15, 97.6)]  # 0.15 of 0.225: below Adam, but not halved
    status, summary = exp.verdict_adamp(records(values))
    assert status == "fail" and "growth fraction 0.67, NOT ok" in summary and "accuracy within 1 pt: yes" in summary


def test_verdict_fails_when_the_projected_arm_grows_more():
    values = {("sgd", 0.1): [(1.01, 97.0)], ("sgd", 0.3): [(1.3, 97.0)],
              ("sgdp", 0.1): [(1.02, 97.0)], ("sgdp", 0.3): [(1.1, 97.0)]}
    status, summary = exp.verdict_sgdp(records(values, "adamp.sgdp"))
    assert status == "fail" and "lr 0.1: ||W2_T||/||W2_0|| sgd 1.010 vs sgdp 1.020" in summary


def test_verdict_fails_on_an_accuracy_gap_over_one_point():
    values = dict(PASSING)
    values[("adamp", 3e-3)] = [(1.02, 96.9), (1.0, 97.0)]
    values[("adamp", 1e-2)] = [(1.25, 96.0), (1.3, 96.0)]
    status, summary = exp.verdict_adamp(records(values))
    assert status == "fail" and "norm growth" in summary and "accuracy within 1 pt: no" in summary


def test_verdict_quick_and_smoke_report_only():
    status, summary = exp.verdict_adamp(records(PASSING, mode="quick"))
    assert status == "report" and summary.startswith("indicative") and "growth fraction" in summary
    assert exp.verdict_adamp(records(PASSING, mode="smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    only_base = records({("adam", 3e-3): [(1.2, 98.0)]})
    status, summary = judge(exp.EXPERIMENT, only_base)
    assert status == "error" and "adamp" in summary
    mixed = only_base + records({("adamp", 3e-3): [(1.0, 98.0)]}, mode="quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict_adamp(mixed)
