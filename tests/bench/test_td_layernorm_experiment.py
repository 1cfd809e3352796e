import math

import pytest
import torch

from normlab.bench.experiments import td_layernorm as exp
from normlab.bench.runner import judge
from normlab.bench.tasks import DDPMSchedule

WIDTH = exp.WIDTH
TEMB = exp.FREQS * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH  # Linear(32, 128), Linear(128, 128)
EXPECTED_COND = {"none": 0, "ln": TEMB, "tdln": exp.BLOCKS * 8 * WIDTH,
                 "adaln": TEMB + exp.BLOCKS * (WIDTH * 2 * WIDTH + 2 * WIDTH)}


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "td_layernorm" and e.slug == "td_layernorm" and e.primary_metric == "eps_mse"
    full = e.grids["full"]
    assert full.arms == ("none", "ln", "tdln", "adaln") and full.lrs == (2e-3,) and full.seeds == (0, 1, 2)
    assert full.budget_s == 1200.0 and e.grids["quick"].budget_s == 30.0
    assert exp.STEPS["full"] == 1500 and exp.BATCH == 256 and exp.NUM_STEPS == 200 and exp.EVAL_SIZE["full"] == 10_000
    assert e.grids["quick"].arms == e.grids["smoke"].arms == full.arms


@pytest.fixture(scope="module")
def smoke_runs():
    return {arm: exp.run(arm, 2e-3, 0, "smoke") for arm in exp.ARMS}


def test_smoke_run_of_each_arm(smoke_runs):
    for arm, rec in smoke_runs.items():
        assert set(rec) == {"metrics", "curves"}
        assert set(rec["metrics"]) == {"eps_mse", "cond_params", "params"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in rec["metrics"].values())
        assert 0.2 < rec["metrics"]["eps_mse"] < 3  # eps has unit variance: an untrained net is near 1
        curve = rec["curves"]["train_loss"]
        assert [s for s, _ in curve] == list(range(1, exp.STEPS["smoke"] + 1))
        assert rec["metrics"]["cond_params"] == EXPECTED_COND[arm]


def test_tdln_arm_starts_as_the_no_time_arm(smoke_runs):
    """TD-LN equals LayerNorm at init and draws no random numbers, so with the same seed and batches the
    two arms take the same first step; the held-out set is shared by all runs."""
    assert smoke_runs["tdln"]["curves"]["train_loss"][0][1] == pytest.approx(
        smoke_runs["none"]["curves"]["train_loss"][0][1], abs=1e-6)
    schedule = DDPMSchedule(exp.NUM_STEPS)
    torch.manual_seed(3)
    none = exp.Denoiser("none", schedule)
    torch.manual_seed(3)
    tdln = exp.Denoiser("tdln", schedule)
    x, n = torch.randn(64, 2), schedule.sample_steps(64)
    torch.testing.assert_close(tdln(x, n), none(x, n), atol=1e-6, rtol=0)
    _, held_out = exp._data(256)
    assert all(torch.equal(a, b) for a, b in zip(held_out, exp._data(256)[1]))


def test_time_conditioning_changes_the_output_only_in_conditioned_arms():
    schedule = DDPMSchedule(exp.NUM_STEPS)
    x = torch.randn(8, 2)
    early, late = torch.full((8,), 5), torch.full((8,), 180)
    for arm in exp.ARMS:
        model = exp.Denoiser(arm, schedule)
        with torch.no_grad():
            for p in model.parameters():  # move every zero-/one-initialised conditioning weight off init
                p.add_(0.05 * torch.randn_like(p))
        gap = (model(x, early) - model(x, late)).abs().max().item()
        assert (gap == 0) == (arm == "none")


def test_timestep_embedding_formula():
    emb = exp.timestep_embedding(torch.tensor([0, 7]), dim=4, max_period=100.0)
    f = torch.tensor([1.0, 0.1])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * f), torch.sin(7 * f)]))
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.Denoiser("film", DDPMSchedule(10))


def records(values, mode="full", params=None, lr=2e-3):
    """``values``: {arm: [eps_mse per seed]}."""
    params = {**EXPECTED_COND, **(params or {})}
    return [{"experiment": "td_layernorm", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"eps_mse": v, "cond_params": float(params[arm]), "params": 1.0}}
            for arm, per_seed in values.items() for seed, v in enumerate(per_seed)]


GOOD = {"none": [0.73, 0.72, 0.72], "ln": [0.59, 0.59, 0.58], "tdln": [0.60, 0.61, 0.59],
        "adaln": [0.59, 0.60, 0.59]}


def test_verdict_pass():
    status, summary = exp.verdict(records(GOOD))
    assert status == "pass", summary
    assert "TD-LN eps-MSE 0.6000" in summary and "need <=: yes" in summary and "need < 10%: yes" in summary
    assert "adaln: lr 0.002, eps-MSE 0.5933, 152832 time-conditioning params (3 seed(s))" in summary


def test_verdict_fails_when_tdln_is_worse_than_1_05_adaln():
    values = {**GOOD, "tdln": [0.64, 0.63, 0.62]}  # mean 0.63 > 1.05 * 0.5933 = 0.623, still <= 0.7233 - 0.08
    status, summary = exp.verdict(records(values))
    assert status == "fail" and "1.05 x adaLN 0.6230 (need <=: no)" in summary


def test_verdict_fails_when_tdln_does_not_beat_no_time_by_the_margin():
    values = {**GOOD, "none": [0.66, 0.66, 0.66]}  # 0.60 > 0.66 - 0.08
    status, summary = exp.verdict(records(values))
    assert status == "fail" and "none - 0.08 = 0.5800 (need <=: no)" in summary and "(need <=: yes)" in summary


def test_verdict_fails_when_tdln_is_not_cheap():
    status, summary = exp.verdict(records(GOOD, params={"tdln": 15_284}))  # 10.0% of 152832
    assert status == "fail" and "need < 10%: no" in summary


def test_verdict_diverged_tdln_fails():
    assert exp.verdict(records({**GOOD, "tdln": [math.nan, 0.6, 0.6]}))[0] == "fail"


def test_verdict_uses_the_best_lr_per_arm_if_several_were_run():
    recs = records(GOOD) + records({"tdln": [0.9, 0.9, 0.9], "adaln": [0.5, 0.5, 0.5]}, lr=1e-3)
    status, summary = exp.verdict(recs)  # adaLN at 1e-3 (0.5) makes 1.05 x adaLN = 0.525 < 0.60
    assert status == "fail" and "adaln: lr 0.001" in summary and "tdln: lr 0.002" in summary


def test_verdict_quick_and_smoke_report_only():
    status, summary = exp.verdict(records({k: v[:1] for k, v in GOOD.items()}, "quick"))
    assert status == "report" and "indicative" in summary and "tdln: lr 0.002, eps-MSE 0.6000" in summary
    assert exp.verdict(records(GOOD, "smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records({k: v for k, v in GOOD.items() if k != "adaln"}))
    assert status == "error" and "adaln" in summary
    mixed = records({k: v for k, v in GOOD.items() if k != "none"}) + records({"none": [0.7]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)
