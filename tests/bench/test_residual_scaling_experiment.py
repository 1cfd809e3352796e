import math

import pytest
import torch

from normlab.bench.experiments import residual_scaling as exp
from normlab.bench.runner import judge


def test_registered_with_the_sheet_protocol():
    sig, tr = exp.SIGNAL, exp.TRAINING
    assert sig.id == "residual_scaling.signal" and tr.id == "residual_scaling.training"
    assert sig.slug == tr.slug == "residual_scaling"
    assert sig.grids["full"].arms == ("alpha_1", "alpha_1_sqrt_n", "alpha_1_n") and sig.grids["full"].seeds == (0,)
    assert exp.DEPTHS["full"] == (4, 16, 64, 256) and exp.WIDTH["full"] == 256 and exp.SAMPLES["full"] == 512
    assert exp.WIDTH["quick"] == exp.SAMPLES["quick"] == 128  # the sheet's prototype size
    assert tr.grids["full"].arms == ("alpha_1", "alpha_1_n", "skipinit")
    assert tr.grids["full"].lrs == (1e-3,) and tr.grids["full"].seeds == (0, 1, 2)
    assert exp.STEPS["full"] == 300 and exp.N_BLOCKS == 32 and exp.TRAIN_WIDTH == 64
    assert exp.RULE == {"alpha_1": "none", "alpha_1_sqrt_n": "1/sqrt(n)", "alpha_1_n": "1/n", "skipinit": "skipinit"}


def test_signal_smoke_run():
    rec = exp.run_signal("alpha_1", None, 0, "smoke")
    assert set(rec["metrics"]) == {"log10_ratio_4", "log10_ratio_16"}
    assert [n for n, _ in rec["curves"]["log10_ratio"]] == [4, 16]
    assert rec["metrics"]["log10_ratio_16"] > rec["metrics"]["log10_ratio_4"] > 0
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run_signal("alpha_2", None, 0, "smoke")


def test_training_model_uses_the_rule_and_arms_share_data():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    one, inv_n, skip = (exp.ResidualMLP(arm, gen()) for arm in exp.TRAIN_ARMS)
    assert [b.alpha.item() for b in inv_n.tower] == [1 / 32] * 32
    assert all(b.alpha.item() == 1.0 and not b.learnable for b in one.tower)
    assert all(b.alpha.item() == 0.0 and b.learnable for b in skip.tower)
    assert torch.equal(one.tower[5].block[0].weight, inv_n.tower[5].block[0].weight)  # same weights per seed
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(skip(x), skip.head(skip.stem(x.flatten(1))))  # SkipInit: identity tower at init
    with pytest.raises(ValueError, match="unknown arm"):
        exp.ResidualMLP("fixup", gen())


def test_training_smoke_run_record_structure():
    rec = exp.run_training("alpha_1_n", 1e-3, 0, "smoke")
    assert set(rec["metrics"]) == {"final_loss", "first_loss", "test_acc", "diverged"}
    assert rec["metrics"]["diverged"] == 0.0 and math.isfinite(rec["metrics"]["final_loss"])
    curve = rec["curves"]["train_loss"]
    assert [s for s, _ in curve] == list(range(1, exp.STEPS["smoke"] + 1))
    assert rec["metrics"]["first_loss"] == curve[0][1]
    again = exp.run_training("alpha_1_n", 1e-3, 0, "smoke")
    assert again["metrics"] == rec["metrics"]


def signal_records(ratios, mode="full"):
    """``ratios``: {arm: [ratio at n = 4, 16, 64, 256]}."""
    return [{"experiment": "residual_scaling.signal", "arm": arm, "lr": None, "seed": 0, "mode": mode,
             "metrics": {f"log10_ratio_{n}": math.log10(r) for n, r in zip((4, 16, 64, 256), vals)}}
            for arm, vals in ratios.items()]


SHEET = {"alpha_1": [3.8, 299, 5.0e9, 1e38], "alpha_1_sqrt_n": [1.61, 1.61, 1.69, 1.71],
         "alpha_1_n": [1.12, 1.03, 1.01, 1.00]}


def test_signal_verdict_passes_on_the_sheet_numbers():
    status, summary = exp.verdict_signal(signal_records(SHEET))
    assert status == "pass"
    assert "alpha = 1 at n = 64: ratio 5e+09 (need > 1e+06: yes)" in summary
    assert "alpha = 1/n: ratio at n = 4/16/64/256: 1.120 / 1.030 / 1.010 / 1.000" in summary


@pytest.mark.parametrize("arm,index,value,needle", [
    ("alpha_1", 1, 40.0, "n = 16: ratio 40 (need > 50: no)"),
    ("alpha_1", 2, 1e5, "need > 1e+06: no"),
    ("alpha_1_sqrt_n", 3, 2.6, "alpha = 1/sqrt(n)"),
    ("alpha_1_n", 0, 1.35, "need in [0.9, 1.3] at every n: no"),
    ("alpha_1_n", 3, 0.85, "need in [0.9, 1.3] at every n: no"),
])
def test_signal_verdict_fails_when_one_condition_breaks(arm, index, value, needle):
    ratios = {k: list(v) for k, v in SHEET.items()}
    ratios[arm][index] = value
    status, summary = exp.verdict_signal(signal_records(ratios))
    assert status == "fail" and needle in summary


def test_signal_verdict_quick_smoke_report_and_errors():
    status, summary = exp.verdict_signal(signal_records(SHEET, "quick"))
    assert status == "report" and "rule would pass" in summary and "indicative" in summary
    assert exp.verdict_signal(signal_records(SHEET, "smoke"))[0] == "report"
    status, summary = judge(exp.SIGNAL, signal_records({"alpha_1": SHEET["alpha_1"]}))
    assert status == "error" and "alpha_1_sqrt_n" in summary


def training_records(values, mode="full"):
    """``values``: {arm: [(first_loss, final_loss) per seed]}."""
    return [{"experiment": "residual_scaling.training", "arm": arm, "lr": 1e-3, "seed": seed, "mode": mode,
             "metrics": {"first_loss": first, "final_loss": final, "test_acc": 0.5,
                         "diverged": float(not math.isfinite(final))}}
            for arm, per_seed in values.items() for seed, (first, final) in enumerate(per_seed)]


GOOD = {"alpha_1": [(1e4, math.nan), (1e4, 3.0), (1e4, math.nan)],
        "alpha_1_n": [(2.4, 0.2), (2.4, 0.3), (2.4, 0.25)],
        "skipinit": [(2.3, 0.1), (2.3, 0.1), (2.3, 0.2)]}


def test_training_verdict_pass_with_divergence_or_twice_the_loss():
    status, summary = exp.verdict_training(training_records(GOOD))
    assert status == "pass" and "seed 1: alpha = 1 diverged or > 2x alpha = 1/n: yes" in summary


@pytest.mark.parametrize("arm,seed,pair,needle", [
    ("alpha_1", 1, (1e4, 0.5), "seed 1: alpha = 1 diverged or > 2x alpha = 1/n: no"),
    ("alpha_1_n", 2, (2.4, math.nan), "1/n stable: no"),
    ("skipinit", 0, (2.3, 2.5), "SkipInit stable: no"),
])
def test_training_verdict_fails(arm, seed, pair, needle):
    values = {k: list(v) for k, v in GOOD.items()}
    values[arm][seed] = pair
    status, summary = exp.verdict_training(training_records(values))
    assert status == "fail" and needle in summary


def test_training_verdict_quick_is_report():
    one_seed = {k: v[:1] for k, v in GOOD.items()}
    status, summary = exp.verdict_training(training_records(one_seed, "quick"))
    assert status == "report" and "rule would pass" in summary
