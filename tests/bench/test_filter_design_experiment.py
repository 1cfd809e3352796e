import math

import pytest
import torch
from torch import nn

from normlab.analysis.filters import orthogonality_error, receptive_field
from normlab.bench.experiments import filter_design as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    spread, training = exp.SPREAD, exp.TRAINING
    assert (spread.id, training.id) == ("filter_design.spread", "filter_design.training")
    assert spread.slug == training.slug == "filter_design"
    arms = ("gaussian", "xavier_normal", "he_normal", "orthogonal_sqrt2", "lsuv")
    for e in (spread, training):
        assert e.grids["full"].arms == e.grids["quick"].arms == e.grids["smoke"].arms == arms
        assert e.grids["full"].seeds == (0, 1)
    assert exp.N_IMAGES["full"] == 256 and exp.TRAIN_STEPS["full"] == 300
    assert exp.RULES == {"gaussian": ("<", 1e-6), "xavier_normal": ("<", 0.05), "he_normal": (">", 0.1),
                         "orthogonal_sqrt2": (">", 0.1), "lsuv": (">", 0.1)}


def test_plain_convnet_shape():
    model = exp.plain_convnet()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and sum(isinstance(m, nn.ReLU) for m in model) == 10
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == 16 for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert receptive_field(model, (1, 1, 8, 8))[-1].rf == (21, 21)


def test_batches_are_disjoint_and_seeded():
    x, y, calib = exp.batches(0, 64)
    assert x.shape == calib.shape == (64, 1, 8, 8) and y.shape == (64,)
    flat, cflat = x.flatten(1), calib.flatten(1)
    assert not (flat[:, None] == cflat[None]).all(-1).any()
    x2, _, _ = exp.batches(0, 64)
    assert torch.equal(x, x2) and not torch.equal(x, exp.batches(1, 64)[0])


def test_initialise_arms():
    _, _, calib = exp.batches(0, 64)
    models = {arm: exp.initialise(arm, 0, calib) for arm in exp.ARMS}
    for model in models.values():
        assert all(torch.count_nonzero(m.bias) == 0 for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    weights = torch.cat([m.weight.flatten() for m in models["gaussian"] if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)
    conv = models["orthogonal_sqrt2"][2]
    assert orthogonality_error(conv.weight) < 1e-5
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.full((16,), math.sqrt(2)))
    he = models["he_normal"][4].weight
    assert he.std().item() == pytest.approx(math.sqrt(2 / 144), rel=0.15)
    with torch.no_grad():
        out = models["lsuv"][0](calib)
    assert abs(out.var().item() - 1) < 0.05
    assert torch.equal(exp.initialise("he_normal", 0, calib)[0].weight, models["he_normal"][0].weight)
    with pytest.raises(ValueError, match="unknown arm"):
        exp.initialise("kaiming", 0, calib)


@pytest.fixture(scope="module")
def spread_runs():
    return {arm: exp.run_spread(arm, None, 0, "smoke") for arm in exp.ARMS}


def test_spread_smoke_records(spread_runs):
    for rec in spread_runs.values():
        m = rec["metrics"]
        assert set(m) == {"std_1", "std_10", "ratio", "log10_ratio", "grad_std_1", "grad_std_10"}
        assert all(math.isfinite(v) for v in m.values())
        assert m["ratio"] == pytest.approx(m["std_10"] / m["std_1"])
        curve = rec["curves"]["log10_act_std"]
        assert [s for s, _ in curve] == list(range(1, 11))
        assert 10 ** curve[0][1] == pytest.approx(m["std_1"]) and 10 ** curve[-1][1] == pytest.approx(m["std_10"])
        assert len(rec["curves"]["log10_grad_std"]) == 10


def test_spread_metric_against_a_manual_forward(spread_runs):
    x, _, calib = exp.batches(0, exp.N_IMAGES["smoke"])
    model = exp.initialise("he_normal", 0, calib)
    with torch.no_grad():
        h1 = model[:2](x)
        h10 = model[:20](x)
    assert spread_runs["he_normal"]["metrics"]["std_1"] == pytest.approx(h1.std().item(), rel=1e-6)
    assert spread_runs["he_normal"]["metrics"]["std_10"] == pytest.approx(h10.std().item(), rel=1e-6)


def test_training_smoke_record():
    rec = exp.run_training("he_normal", exp.LR, 0, "smoke")
    assert set(rec["metrics"]) == {"test_acc", "final_train_loss"}
    assert 0 <= rec["metrics"]["test_acc"] <= 1
    curve = rec["curves"]["train_loss"]
    assert [s for s, _ in curve] == [1, 2, 3] and abs(curve[0][1] - math.log(10)) < 0.5
    assert rec == exp.run_training("he_normal", exp.LR, 0, "smoke")


def spread_records(ratios, mode="full"):
    """``ratios``: {arm: [ratio per seed]} -> records with std_1 = 1."""
    return [{"experiment": "filter_design.spread", "arm": arm, "lr": None, "seed": seed, "mode": mode,
             "metrics": {"ratio": r, "std_1": 1.0, "std_10": r}}
            for arm, per_seed in ratios.items() for seed, r in enumerate(per_seed)]


GOOD = {"gaussian": [4e-11, 5e-11], "xavier_normal": [0.008, 0.009], "he_normal": [0.18, 0.2],
        "orthogonal_sqrt2": [0.3, 0.23], "lsuv": [0.83, 1.1]}


def test_spread_verdict_pass():
    status, summary = exp.verdict_spread(spread_records(GOOD))
    assert status == "pass"
    assert "He normal" in summary and "std10/std1 [0.18, 0.2] (need > 0.1 every seed: yes)" in summary


@pytest.mark.parametrize("arm,bad", [("he_normal", 0.09), ("xavier_normal", 0.06), ("gaussian", 2e-6),
                                     ("lsuv", math.nan)])
def test_spread_verdict_fails_when_one_seed_breaks_the_rule(arm, bad):
    ratios = {a: list(v) for a, v in GOOD.items()}
    ratios[arm][1] = bad
    status, summary = exp.verdict_spread(spread_records(ratios))
    assert status == "fail" and summary.count("every seed: no") == 1


def test_spread_verdict_quick_and_smoke_report_only():
    status, summary = exp.verdict_spread(spread_records(GOOD, "quick"))
    assert status == "report" and "indicative" in summary and "rule would pass" in summary
    bad = dict(GOOD, he_normal=[0.05, 0.05])
    status, summary = exp.verdict_spread(spread_records(bad, "smoke"))
    assert status == "report" and "rule would fail" in summary


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    partial = {a: v for a, v in GOOD.items() if a != "lsuv"}
    status, summary = judge(exp.SPREAD, spread_records(partial))
    assert status == "error" and "lsuv" in summary
    mixed = spread_records(partial) + spread_records({"lsuv": [1.0]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict_spread(mixed)


def test_training_verdict_reports():
    recs = [{"experiment": "filter_design.training", "arm": arm, "lr": exp.LR, "seed": seed, "mode": "full",
             "metrics": {"test_acc": 0.1 + 0.1 * i + 0.05 * seed, "final_train_loss": 2.0}}
            for i, arm in enumerate(exp.ARMS) for seed in (0, 1)]
    status, summary = exp.verdict_training(recs)
    assert status == "report" and "report-only" in summary and "LSUV: test acc 0.525 [0.5, 0.55]" in summary
