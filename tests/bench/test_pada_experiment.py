import math

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import pada as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    assert exp.VARIANCE.id == "pada.variance" and exp.VARIANCE.slug == "pada"
    assert exp.VARIANCE.grids["full"].arms == ("pada_reweight",)
    assert exp.ACCURACY.grids["full"].arms == ("uniform", "pada")
    assert exp.REPORT.grids["full"].arms == ("uniform", "pada_reweight")
    for e in (exp.VARIANCE, exp.ACCURACY, exp.REPORT):
        assert e.grids["full"].seeds == (0, 1, 2, 3, 4) and e.grids["full"].lrs == (0.05,)
        assert e.grids["quick"].seeds == (0,)
        assert e.shared_key("pada", 0.05, 1, "full") == exp.VARIANCE.shared_key("pada", 0.05, 1, "full")
    assert exp.EPOCHS["full"] == 10 and exp.EPOCHS["quick"] == 6 and exp.BATCH == 32 and exp.MOMENTUM == 0.9
    assert list(exp.diagnostic_epochs(10)) == [4, 5, 6, 7, 8, 9]
    assert exp.PATH_SAMPLER.grids["full"].seeds == (0,)


def test_digits_split_and_standardisation():
    x, y, xt, yt = exp.digits_data(0)
    assert x.shape == (1437, 64) and xt.shape == (360, 64) and len(y) == 1437 and len(yt) == 360
    assert x.mean(0).abs().max() < 1e-5
    std = x.std(0, unbiased=False)
    assert bool((((std - 1).abs() < 1e-4) | (std == 0)).all())
    assert not torch.equal(exp.digits_data(1)[1], y)


def test_batch_variance_equals_enumeration():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    p = torch.rand(9, generator=gen, dtype=torch.float64)
    p = p / p.sum()
    mean = g.mean(0)
    single = float((p * ((g / (9 * p[:, None]) - mean) ** 2).sum(1)).sum())
    got = exp.batch_variance(g.norm(dim=1), float(mean.square().sum()), p, batch=4)
    assert got == pytest.approx(single / 4, rel=1e-12)


@pytest.fixture(scope="module")
def smoke():
    with intra_op_threads(1):
        return {arm: exp.run(arm, 0.05, 0, "smoke") for arm in exp.ARMS}


def test_smoke_runs(smoke):
    epochs = exp.EPOCHS["smoke"]
    for arm, rec in smoke.items():
        assert [s for s, _ in rec["curves"]["test_acc"]] == list(range(1, epochs + 1))
        assert 0 <= rec["metrics"]["test_acc"] <= 100 and math.isfinite(rec["metrics"]["train_loss"])
    m = smoke["pada_reweight"]["metrics"]
    assert {"fresh_ratio", "optimal_ratio", "lagged_ratio", "optimal_le_fresh"} <= set(m)
    assert 0 < m["optimal_ratio"] <= m["fresh_ratio"] and m["optimal_le_fresh"] == 1.0
    assert [e for e, _ in smoke["pada_reweight"]["curves"]["variance_ratio_fresh"]] == list(
        exp.diagnostic_epochs(epochs))
    # the same seed starts from the same epoch-0 permutation, so uniform and pada agree after epoch 1
    assert smoke["uniform"]["curves"]["test_acc"][0] == smoke["pada"]["curves"]["test_acc"][0]
    assert smoke["pada"]["curves"]["test_acc"] != smoke["uniform"]["curves"]["test_acc"] or \
        smoke["pada"]["metrics"]["train_loss"] != smoke["uniform"]["metrics"]["train_loss"]


def test_smoke_path_sampler():
    with intra_op_threads(1):
        rec = exp.run_path("pada_path", 0.05, 0, "smoke")
    m = rec["metrics"]
    assert m["deterministic"] == 1.0
    assert m["q_identity"] == pytest.approx(m["q_identity_expected"], abs=1e-12)
    assert m["q_linear"] + m["q_mlp"] + m["q_identity"] == pytest.approx(1.0, abs=1e-12)
    status, summary = exp.verdict_path([{"arm": "pada_path", "lr": 0.05, "seed": 0, "mode": "smoke",
                                         "metrics": m}])
    assert status == "report" and "deterministic: yes" in summary


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("adam", 0.05, 0, "smoke")
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run_path("uniform", 0.05, 0, "smoke")


def records(arm, values, mode="full"):
    return [{"experiment": "pada", "arm": arm, "lr": 0.05, "seed": seed, "mode": mode, "metrics": m}
            for seed, m in enumerate(values)]


def variance_records(fresh, optimal_le=None, mode="full"):
    optimal_le = optimal_le or [1.0] * len(fresh)
    return records("pada_reweight", [{"fresh_ratio": f, "optimal_ratio": f / 2, "lagged_ratio": 1.5,
                                      "optimal_le_fresh": o, "test_acc": 95.0} for f, o in zip(fresh, optimal_le)],
                   mode)


def test_variance_verdict():
    assert exp.verdict_variance(variance_records([0.1, 0.2, 0.14, 0.3, 0.05]))[0] == "pass"
    status, summary = exp.verdict_variance(variance_records([0.1, 0.2, 0.55, 0.3, 0.05]))
    assert status == "fail" and "every seed: no" in summary
    status, summary = exp.verdict_variance(variance_records([0.1, 0.2], [1.0, 0.0]))
    assert status == "fail" and "every seed and epoch: no" in summary
    status, summary = exp.verdict_variance(variance_records([0.1], mode="quick"))
    assert status == "pass" and "indicative" in summary
    assert exp.verdict_variance(variance_records([0.9], mode="quick"))[0] == "fail"
    assert exp.verdict_variance(variance_records([0.1], mode="smoke"))[0] == "report"


def accuracy_records(uniform, other, arm="pada", mode="full"):
    return records("uniform", [{"test_acc": v} for v in uniform], mode) + \
        records(arm, [{"test_acc": v, "lagged_ratio": 2.5} for v in other], mode)


def test_accuracy_verdict():
    status, summary = exp.verdict_accuracy(accuracy_records([96.4, 97.2, 97.2, 97.5, 98.3],
                                                            [96.1, 97.2, 96.9, 96.1, 98.1]))
    assert status == "pass" and "mean -0.44" in summary and "worst -1.40" in summary
    assert exp.verdict_accuracy(accuracy_records([97.0, 97.0], [94.0, 96.0]))[0] == "fail"
    assert exp.verdict_accuracy(accuracy_records([97.0], [math.nan]))[0] == "fail"
    assert exp.verdict_accuracy(accuracy_records([97.0], [97.5], mode="quick"))[0] == "report"


def test_report_verdict_flags_lagged_ratio():
    status, summary = exp.verdict_report(accuracy_records([97.0, 98.0], [93.0, 98.0], arm="pada_reweight"))
    assert status == "report" and "2 of 2 seed(s) above 2.0" in summary and "mean -2.00" in summary


def test_path_verdict_fails_on_each_property():
    good = {"q_linear": 0.3, "q_mlp": 0.6, "q_identity": 0.1, "q_identity_expected": 0.1,
            "max_dev_from_uniform": 0.27, "deterministic": 1.0}
    rec = lambda **kw: [{"arm": "pada_path", "lr": 0.05, "seed": 0, "mode": "full",  # noqa: E731
                         "metrics": {**good, **kw}}]
    assert exp.verdict_path(rec())[0] == "pass"
    assert exp.verdict_path(rec(deterministic=0.0))[0] == "fail"
    assert exp.verdict_path(rec(q_identity=0.1 + 1e-9))[0] == "fail"
    assert exp.verdict_path(rec(max_dev_from_uniform=0.0))[0] == "fail"


def test_missing_arm_is_an_error():
    status, summary = judge(exp.ACCURACY, records("uniform", [{"test_acc": 97.0}]))
    assert status == "error" and "pada" in summary
