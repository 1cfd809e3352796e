import math

import pytest
import torch

from normlab.bench.experiments import tract as exp
from normlab.bench.runner import judge
from normlab.training.tract import TrActConv2d, TrActLinear


def test_registered_with_the_sheet_protocol():
    assert exp.SGD.id == "tract.sgd" and exp.ADAM.id == "tract.adam" and exp.CONV.id == "tract.conv"
    assert {e.slug for e in (exp.SGD, exp.ADAM, exp.CONV)} == {"tract"}
    for e, lrs in ((exp.SGD, (0.03, 0.1, 0.3, 1.0)), (exp.ADAM, (3e-3, 1e-2, 3e-2, 1e-1)),
                   (exp.CONV, (3e-3, 1e-2, 3e-2, 1e-1))):
        full = e.grids["full"]
        assert full.arms == ("baseline", "tract") and full.lrs == lrs and full.seeds == (0, 1, 2, 3, 4)
        assert e.grids["quick"].seeds == (0,) and len(e.grids["quick"].lrs) == 1
    assert exp.ADAM.grids["quick"].lrs == (1e-2,)
    assert exp.STEPS == {"full": 300, "quick": 150, "smoke": 10}
    assert exp.LAMBDA == 0.1 and exp.BATCH == 64 and exp.EVAL_EVERY == 5 and exp.NEVER == 600
    assert exp.SGD.grids["full"].points().__len__() + exp.ADAM.grids["full"].points().__len__() == 80


def test_data_split_sizes_and_scale():
    x_tr, y_tr, x_te, y_te = exp.load_data()
    assert x_tr.shape == (1257, 64) and x_te.shape == (540, 64)
    assert x_tr.min() >= 0 and x_tr.max() == 1
    per_class = torch.bincount(torch.cat([y_tr, y_te]))
    assert ((torch.bincount(y_te) - 0.3 * per_class).abs() <= 1).all()  # stratified


def test_models_and_unknown_names():
    assert [m.__class__.__name__ for m in exp.make_model("mlp")] == ["Linear", "ReLU", "Linear"]
    conv = exp.make_model("conv")
    assert conv(torch.zeros(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        exp.make_model("vit")
    with pytest.raises(ValueError, match="unknown arm"):
        exp.train("lion", 1e-2, 0, "smoke", optimizer="adam", model_kind="mlp")


def test_batches_reshuffle_every_epoch_and_cover_the_data():
    order = exp.batches(130, torch.Generator().manual_seed(0))
    epoch1 = [next(order) for _ in range(3)]
    epoch2 = [next(order) for _ in range(3)]
    assert [len(b) for b in epoch1] == [64, 64, 2]
    assert sorted(torch.cat(epoch1).tolist()) == list(range(130)) == sorted(torch.cat(epoch2).tolist())
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))


def test_steps_to():
    curve = [[5, 0.5], [10, 0.95], [15, 0.97]]
    assert exp.steps_to(curve, 0.95) == 10 and exp.steps_to(curve, 0.97) == 15 and exp.steps_to(curve, 0.99) == 600


@pytest.fixture(scope="module")
def smoke_runs():
    """Both arms of the MLP (SGD) with every model the runs built, and one conv run."""
    built = []
    original = exp.make_model

    def recording(kind):
        model = original(kind)
        built.append(model)
        return model

    exp.make_model = recording
    try:
        runs = {arm: exp.SGD.run(arm, 0.3, 0, "smoke") for arm in exp.ARMS}
        runs["conv"] = exp.CONV.run("tract", 1e-2, 0, "smoke")
    finally:
        exp.make_model = original
    return runs, built


def test_smoke_run_record_structure_and_conversion(smoke_runs):
    runs, built = smoke_runs
    for rec in runs.values():
        assert set(rec["metrics"]) == {"steps_to_95", "steps_to_97", "final_test_acc", "final_train_ce", "diverged"}
        assert [s for s, _ in rec["curves"]["test_acc"]] == [5, 10]
        assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, 11))
        assert rec["metrics"]["final_test_acc"] == rec["curves"]["test_acc"][-1][1]
        assert all(math.isfinite(v) for v in rec["metrics"].values())
    baseline, tract_mlp, conv = built
    assert type(baseline[0]) is torch.nn.Linear and isinstance(tract_mlp[0], TrActLinear)
    assert isinstance(conv[1], TrActConv2d) and conv[1].lambda_ == 0.1


def test_same_init_and_batches_per_seed_differ_only_by_tract():
    """With lr 0 nothing moves: both arms then give identical curves (same init, same batch order)."""
    a = exp.train("baseline", 0.0, 3, "smoke", optimizer="adam", model_kind="mlp")
    b = exp.train("tract", 0.0, 3, "smoke", optimizer="adam", model_kind="mlp")
    c = exp.train("tract", 0.0, 4, "smoke", optimizer="adam", model_kind="mlp")
    assert a["curves"] == b["curves"] and a["curves"] != c["curves"]


def test_divergence_counts_as_never():
    rec = exp.train("baseline", math.inf, 0, "smoke", optimizer="sgd", model_kind="mlp")
    assert rec["metrics"]["diverged"] == 1.0
    assert rec["metrics"]["steps_to_95"] == rec["metrics"]["steps_to_97"] == 600
    assert math.isnan(rec["metrics"]["final_test_acc"])


def records(values, mode="full", exp_id="tract.adam"):
    """``values``: {(arm, lr): [(steps_to_95, final_acc) per seed]}; steps_to_97 = steps_to_95 + 10."""
    return [{"experiment": exp_id, "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"steps_to_95": s, "steps_to_97": s + 10, "final_test_acc": acc,
                         "final_train_ce": 0.1, "diverged": 0.0}}
            for (arm, lr), per_seed in values.items() for seed, (s, acc) in enumerate(per_seed)]


def test_verdict_pass_best_against_best():
    recs = records({
        ("baseline", 0.01): [(40, 0.97), (80, 0.97)],   # best single seed, mean 60
        ("baseline", 0.03): [(50, 0.975), (50, 0.97)],  # best mean 50
        ("tract", 0.01): [(20, 0.97), (40, 0.96)],      # mean 30
        ("tract", 0.03): [(600, math.nan), (600, math.nan)],  # diverged
    })
    status, summary = exp.ADAM.verdict(recs)
    assert status == "pass"
    assert "TrAct 30.0 (lr 0.01) vs baseline 50.0 (lr 0.03), ratio 0.60" in summary
    assert "per seed 0.40-0.80" in summary and "final test accuracy TrAct 0.965" in summary


def test_verdict_fails_when_too_slow_or_harmful():
    slow = records({("baseline", 0.1): [(50, 0.97)] * 2, ("tract", 0.1): [(40, 0.97)] * 2})
    status, summary = exp.SGD.verdict(slow)
    assert status == "fail" and "ratio 0.80 (need <= 0.7: no)" in summary
    harmful = records({("baseline", 0.1): [(50, 0.97)] * 2, ("tract", 0.1): [(20, 0.955)] * 2})
    status, summary = exp.SGD.verdict(harmful)
    assert status == "fail" and "need >= baseline - 0.01: no" in summary


def test_quick_rule_adam_gates_sgd_and_conv_report():
    fast = {("baseline", 0.01): [(55, 0.97)], ("tract", 0.01): [(25, 0.97)]}
    slow = {("baseline", 0.01): [(50, 0.97)], ("tract", 0.01): [(40, 0.97)]}
    assert exp.ADAM.verdict(records(fast, "quick"))[0] == "pass"
    status, summary = exp.ADAM.verdict(records(slow, "quick"))
    assert status == "fail" and "indicative" in summary
    assert exp.SGD.verdict(records(fast, "quick"))[0] == "report"
    assert exp.ADAM.verdict(records(fast, "smoke"))[0] == "report"
    status, summary = exp.CONV.verdict(records(fast, "full"))
    assert status == "report" and "report-only" in summary


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.ADAM, records({("baseline", 0.01): [(50, 0.97)]}))
    assert status == "error" and "tract" in summary
    mixed = records({("baseline", 0.01): [(50, 0.97)]}) + records({("tract", 0.01): [(20, 0.97)]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.ADAM.verdict(mixed)
