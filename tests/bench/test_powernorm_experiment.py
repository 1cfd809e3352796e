import math

import pytest
import torch
from torch import nn

from normlab.bench.experiment import all_experiments
from normlab.bench.experiments import powernorm as exp
from normlab.bench.runner import judge
from normlab.bench.tasks import TinyTransformer
from normlab.layers.powernorm import PowerNorm


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "powernorm" and all_experiments()["powernorm"] is e
    assert e.primary_metric == "val_loss"
    full, quick = e.grids["full"], e.grids["quick"]
    assert full.arms == ("ln", "pn", "bn") and full.lrs == (1e-3,) and full.seeds == (0, 1)
    assert quick.arms == full.arms and quick.lrs == (1e-3,) and quick.seeds == (0,)
    assert exp.SIZES["full"] == {"batch": 32, "steps": 400, "warmup": 200, "eval_batches": 16}
    assert exp.SIZES["quick"] == {"batch": 16, "steps": 120, "warmup": 60, "eval_batches": 16}
    assert (exp.D_MODEL, exp.LAYERS, exp.HEADS, exp.SEQ_LEN, exp.EVAL_BATCH) == (128, 2, 4, 64, 32)


def test_models_follow_the_sheet_and_share_the_initialisation():
    models = {arm: exp.build_model(arm, 3, "full") for arm in exp.ARMS}
    pn = models["pn"]
    assert isinstance(pn, TinyTransformer) and pn.norm_f is None  # post-norm: no final norm
    assert all(b.placement == "post" for b in pn.blocks)
    slots = [m for m in pn.modules() if isinstance(m, PowerNorm)]
    assert len(slots) == 4 and all(m.group_num == 4 and m.warmup_iters == 200 for m in slots)
    assert slots[0].alpha_fwd == slots[0].alpha_bkw == 0.9 and slots[0].backward_scale == "batch"
    bns = [m for m in models["bn"].modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 4 and all(m.momentum == 0.1 for m in bns)
    assert sum(isinstance(m, nn.LayerNorm) for m in models["ln"].modules()) == 4
    shared = {k: v for k, v in pn.state_dict().items() if "norm" not in k}
    for arm in ("ln", "bn"):
        other = models[arm].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in shared.items())
    assert exp.build_model("pn", 3, "quick").blocks[0].norm1.warmup_iters == 60
    with pytest.raises(ValueError, match="unknown arm"):
        exp.build_model("rms", 0, "smoke")


def test_corpus_is_every_top_level_stdlib_file():
    import sysconfig
    from pathlib import Path
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert exp.n_stdlib_files() == len(files) > 100


def test_token_batchnorm_is_batchnorm_over_all_tokens():
    torch.manual_seed(0)
    tbn, bn = exp.TokenBatchNorm(6), nn.BatchNorm1d(6)
    x = torch.randn(3, 5, 6) * 2 + 1
    torch.testing.assert_close(tbn(x), bn(x.reshape(15, 6)).view(3, 5, 6))
    torch.testing.assert_close(tbn.bn.running_var, bn.running_var)


def test_relative_deviation_formulas():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 8) * 3
    pn = PowerNorm(8, group_num=2)
    pn.running_phi.fill_(0.5)
    xg = x.reshape(16, 2, 4)
    u = (xg / torch.sqrt(xg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(16, 8)
    expected = ((u.pow(2).mean(0) - 0.5).abs() / 0.5).mean().item()
    assert exp._relative_deviation(pn, x) == pytest.approx(expected, rel=1e-5)
    tbn = exp.TokenBatchNorm(8)
    tbn.bn.running_var.fill_(2.0)
    var = x.reshape(16, 8).var(0, unbiased=True)
    assert exp._relative_deviation(tbn, x) == pytest.approx(((var - 2).abs() / 2).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def smoke_runs():
    """Every arm, seed 0, smoke mode, with the training batches each run drew."""
    seen, results = {}, {}
    original = exp.char_batch

    def recording(ids, batch_size, seq_len, generator):
        x, y = original(ids, batch_size, seq_len, generator)
        seen[current].append((batch_size, x.clone(), y.clone()))
        return x, y

    exp.char_batch = recording
    try:
        for current in exp.ARMS:
            seen[current] = []
            results[current] = exp.run(current, 1e-3, 0, "smoke")
    finally:
        exp.char_batch = original
    return results, seen


def test_smoke_run_of_each_arm(smoke_runs):
    results, _ = smoke_runs
    steps = exp.SIZES["smoke"]["steps"]
    for arm, rec in results.items():
        keys = {"val_loss", "train_loss_last"} | ({"stat_fluct", "stat_fluct_2nd_half"} if arm != "ln" else set())
        assert set(rec["metrics"]) == keys
        assert all(isinstance(v, float) and math.isfinite(v) for v in rec["metrics"].values())
        curve = rec["curves"]["train_loss"]
        assert [s for s, _ in curve] == list(range(1, steps + 1))
        assert abs(curve[0][1] - math.log(exp.VOCAB)) < 1.0  # starts near a uniform guess
        assert rec["metrics"]["val_loss"] < math.log(exp.VOCAB) + 1.0


def test_arms_see_identical_training_batches(smoke_runs):
    _, seen = smoke_runs
    train = {arm: [b for b in batches if b[0] == exp.SIZES["smoke"]["batch"]] for arm, batches in seen.items()}
    assert len(train["ln"]) == exp.SIZES["smoke"]["steps"]
    for arm in ("pn", "bn"):
        for (_, xa, ya), (_, xb, yb) in zip(train["ln"], train[arm]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    held_out = [b for b in seen["ln"] if b[0] == exp.EVAL_BATCH]
    assert len(held_out) == exp.SIZES["smoke"]["eval_batches"]
    assert torch.equal(held_out[0][1][:, 1:], held_out[0][2][:, :-1])  # targets are the next characters


def records(losses, mode="full"):
    """``losses``: {arm: [val_loss per seed]}."""
    return [{"experiment": "powernorm", "arm": arm, "lr": 1e-3, "seed": seed, "mode": mode,
             "metrics": {"val_loss": v, "train_loss_last": v, **({"stat_fluct": 0.06, "stat_fluct_2nd_half": 0.05}
                                                                 if arm != "ln" else {})}}
            for arm, per_seed in losses.items() for seed, v in enumerate(per_seed)]


def test_verdict_pass_uses_seed_means():
    # PN - LN = +0.015 on the mean although seed 1 alone is +0.05; BN - PN = +0.09
    status, summary = exp.verdict(records({"ln": [2.17, 2.16], "pn": [2.15, 2.21], "bn": [2.27, 2.27]}))
    assert status == "pass", summary
    assert "held-out loss LN 2.165, PN 2.180, BN 2.270 (2 seed(s))" in summary
    assert "PN 0.060 (2nd half 0.050)" in summary


@pytest.mark.parametrize("losses,failing", [
    ({"ln": [2.10, 2.10], "pn": [2.14, 2.14], "bn": [2.30, 2.30]}, "PN <= LN + 0.03: no"),
    ({"ln": [2.16, 2.16], "pn": [2.16, 2.16], "bn": [2.19, 2.19]}, "PN <= BN - 0.04: no"),
    ({"ln": [2.16, 2.16], "pn": [2.16, math.nan], "bn": [2.30, 2.30]}, "all finite: no"),
    ({"ln": [math.inf, 2.16], "pn": [2.16, 2.16], "bn": [2.30, 2.30]}, "all finite: no"),
])
def test_verdict_fails_on_each_condition(losses, failing):
    status, summary = exp.verdict(records(losses))
    assert status == "fail" and failing in summary


def test_verdict_quick_uses_the_indicative_rule_and_smoke_reports():
    quick = {"ln": [2.44], "pn": [2.48], "bn": [2.66]}  # +0.04 passes the quick +0.05, not the full +0.03
    status, summary = exp.verdict(records(quick, "quick"))
    assert status == "pass" and summary.startswith("indicative")
    assert exp.verdict(records(quick))[0] == "fail"
    status, summary = exp.verdict(records({"ln": [2.44], "pn": [2.44], "bn": [2.50]}, "quick"))
    assert status == "fail" and "PN <= BN - 0.1: no" in summary
    status, summary = exp.verdict(records(quick, "smoke"))
    assert status == "report" and summary.startswith("smoke:")


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records({"ln": [2.1], "pn": [2.1]}))
    assert status == "error" and "bn" in summary
    mixed = records({"ln": [2.1], "pn": [2.1]}) + records({"bn": [2.3]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)
