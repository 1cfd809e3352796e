import math

import pytest
import torch

from normlab.bench.experiments import gmn_sinkgd
from normlab.bench.experiments import swan as exp
from normlab.bench.runner import judge, load_records, run_experiments
from normlab.bench.tasks import GPT, char_corpus


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "swan" and e.slug == "swan" and e.primary_metric == "val_loss"
    full = e.grids["full"]
    assert full.arms == ("adamw", "swan") and full.lrs == (3e-3, 1e-2, 3e-2) and full.seeds == (0, 1)
    assert e.grids["quick"].lrs == e.grids["smoke"].lrs == (1e-2,) and e.grids["quick"].seeds == (0,)
    assert exp.SCHEDULE == {"full": (300, 30, 25), "quick": (100, 10, 25), "smoke": (6, 2, 3)}
    assert (exp.BATCH, exp.SEQ_LEN, exp.VOCAB, exp.FALLBACK_LR) == (16, 64, 256, 3e-3)


def test_adamw_runs_are_shared_with_the_sinkgd_check():
    for mode in ("full", "quick", "smoke"):
        ours, theirs = exp.EXPERIMENT.grids[mode], gmn_sinkgd.EXPERIMENT.grids[mode]
        assert ours.lrs == theirs.lrs and ours.seeds == theirs.seeds
        for lr in ours.lrs:
            for seed in ours.seeds:
                key = exp.EXPERIMENT.shared_key("adamw", lr, seed, mode)
                assert key is not None and key == gmn_sinkgd.EXPERIMENT.shared_key("adamw", lr, seed, mode)
                assert exp.EXPERIMENT.shared_key("swan", lr, seed, mode) is None
                assert gmn_sinkgd.EXPERIMENT.shared_key("sinkgd", lr, seed, mode) is None
    keys = {exp.shared_key("adamw", lr, seed, mode) for lr in exp.LRS for seed in (0, 1) for mode in ("full", "quick")}
    assert len(keys) == 12


def test_the_sheet_model_and_data():
    model = GPT()
    assert sum(p.numel() for p in model.parameters()) == exp.N_PARAMS == 468_224
    assert len(list(model.parameters())) == exp.N_TENSORS
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 13 and linears[-1] == "head"
    assert all(getattr(model.get_submodule(name), "bias") is None for name in linears)
    assert model(torch.zeros(2, 64, dtype=torch.long)).shape == (2, 64, 256)
    with pytest.raises(ValueError, match="seq_len <= 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    torch.manual_seed(3)
    a = GPT()
    torch.manual_seed(3)
    b = GPT()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ids = char_corpus(60, "bytes", "all")
    assert 1.6e6 < len(ids) < 1.8e6 and ids.max() > 127  # raw bytes, about 1.7 MB


def test_validation_windows_are_fixed_and_from_the_validation_split():
    windows = exp.validation_windows()
    assert len(windows) == 8 and all(x.shape == y.shape == (16, 64) for x, y in windows)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in windows)
    exp.validation_windows.cache_clear()
    again = exp.validation_windows()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, again))
    val = bytes(char_corpus(60, "bytes", "val").tolist())
    assert bytes(windows[0][0][0].tolist()) in val


def test_lr_schedule():
    f = [exp.lr_factor(s, 300, 30) for s in range(300)]
    assert f[0] == pytest.approx(1 / 30) and f[29] == f[30] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[30:], f[31:]))
    assert f[165] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 135 / 269)))


@pytest.fixture(scope="module")
def smoke_runs():
    """Both arms (seed 0) and SWAN seed 1 in smoke mode, with every batch each run drew."""
    seen, results = {}, {}
    original = exp.char_batch

    def recording(ids, batch_size, seq_len, generator):
        x, y = original(ids, batch_size, seq_len, generator)
        if batch_size == exp.BATCH and generator.initial_seed() in (0, 1):
            seen[current].append(x.clone())
        return x, y

    exp.char_batch = recording
    try:
        for current in (("adamw", 0), ("swan", 0), ("swan", 1)):
            seen[current] = []
            results[current] = exp.run(current[0], 1e-2, current[1], "smoke")
    finally:
        exp.char_batch = original
    return results, seen


def test_smoke_run_record_structure(smoke_runs):
    results, _ = smoke_runs
    for (arm, _), rec in results.items():
        assert set(rec) == {"metrics", "curves"}
        assert rec["metrics"]["state_bytes"] == exp.STATE_BYTES["adamw" if arm == "adamw" else "matrix"]
        assert [s for s, _ in rec["curves"]["val_loss"]] == [3, 6]
        assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, 7))
        assert rec["metrics"]["val_loss"] == rec["curves"]["val_loss"][-1][1]
        assert math.isfinite(rec["metrics"]["val_loss"])
        assert abs(rec["curves"]["train_loss"][0][1] - math.log(256)) < 1.0  # starts near a uniform guess


def test_arms_see_identical_batches_per_seed(smoke_runs):
    _, seen = smoke_runs
    assert len(seen[("adamw", 0)]) == 6
    assert all(torch.equal(a, b) for a, b in zip(seen[("adamw", 0)], seen[("swan", 0)]))
    assert not torch.equal(seen[("swan", 0)][0], seen[("swan", 1)][0])


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run("sgd", 1e-2, 0, "smoke")


def test_runner_trains_the_shared_adamw_arm_once(tmp_path):
    run_experiments([exp.EXPERIMENT, gmn_sinkgd.EXPERIMENT], "smoke", tmp_path, progress=False)
    records = load_records(tmp_path)
    adamw = [r for r in records if r["arm"] == "adamw"]
    assert [r["experiment"] for r in adamw] == ["swan", "gmn_sinkgd"]
    assert adamw[0]["metrics"] == adamw[1]["metrics"] and adamw[0]["curves"] == adamw[1]["curves"]
    assert adamw[1]["seconds"] < adamw[0]["seconds"] / 10  # reused, not retrained
    assert len(records) == 4


def records(values, mode="full", state=None):
    """``values``: {(arm, lr): [val curve per seed]} with curves as [(step, loss), ...]."""
    state = state or {}
    out = []
    for (arm, lr), per_seed in values.items():
        for seed, curve in enumerate(per_seed):
            default = exp.STATE_BYTES["adamw" if arm == "adamw" else "matrix"]
            out.append({"experiment": "swan", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                        "metrics": {"val_loss": curve[-1][1], "state_bytes": state.get(arm, default)},
                        "curves": {"val_loss": [list(p) for p in curve]}})
    return out


def curve(*losses, every=25):
    return [((i + 1) * every, v) for i, v in enumerate(losses)]


ADAMW_BEST = {("adamw", 1e-2): [curve(2.6, 2.3, 2.1, 2.0), curve(2.6, 2.3, 2.1, 2.2)]}  # mean final 2.1
ADAMW_WORSE = {("adamw", 3e-3): [curve(2.7, 2.5, 2.2, 1.9), curve(2.7, 2.5, 2.4, 2.5)]}  # best seed, mean 2.2


def test_verdict_pass_uses_best_lr_by_seed_mean_and_the_mean_curve():
    recs = records({**ADAMW_BEST, **ADAMW_WORSE,
                    ("swan", 1e-2): [curve(2.3, 2.12, 1.9, 1.8), curve(2.3, 2.06, 1.9, 1.8)],  # mean 2.09 at 50
                    ("swan", 3e-2): [curve(2.0, 1.95, 1.95, 1.95), curve(2.0, 1.95, 1.95, 1.95)]})
    status, summary = exp.verdict(recs)
    assert status == "pass", summary
    assert "SWAN best lr 0.01: final val loss 1.800" in summary and "AdamW best lr 0.01: 2.100" in summary
    assert "step 50 (0.50 T)" in summary and "gap 0.300" in summary


def test_verdict_fails_when_the_crossing_is_late():
    recs = records({**ADAMW_BEST, ("swan", 1e-2): [curve(2.4, 2.3, 2.0, 1.85)] * 2})  # crosses at 75 of 100
    status, summary = exp.verdict(recs)
    assert status == "fail" and "crossing <= 0.5 T: no" in summary and "gap >= 0.2: yes" in summary


def test_verdict_fails_when_the_lead_is_small():
    recs = records({**ADAMW_BEST, ("swan", 1e-2): [curve(2.3, 2.05, 1.95, 1.95)] * 2})
    status, summary = exp.verdict(recs)
    assert status == "fail" and "crossing <= 0.5 T: yes" in summary and "gap >= 0.2: no" in summary


def test_verdict_fails_on_state_bytes():
    good = {**ADAMW_BEST, ("swan", 1e-2): [curve(2.0, 1.9, 1.8, 1.7)] * 2}
    assert exp.verdict(records(good))[0] == "pass"
    moments_on_matrices = exp.STATE_BYTES["matrix"] + 8 * 393_216
    status, summary = exp.verdict(records(good, state={"swan": moments_on_matrices}))
    assert status == "fail" and "state bytes exact: no" in summary
    assert f"got [('swan', {moments_on_matrices})]" in summary


def test_verdict_nan_never_reaches_the_target():
    recs = records({**ADAMW_BEST, ("swan", 1e-2): [curve(math.nan, math.nan, math.nan, math.nan)] * 2})
    status, summary = exp.verdict(recs)
    assert status == "fail" and "never" in summary


def test_verdict_quick_and_smoke():
    ahead = records({("adamw", 1e-2): [curve(2.6, 2.5, 2.45, 2.4)], ("swan", 1e-2): [curve(2.3, 2.2, 2.1, 2.2)]},
                    "quick")
    status, summary = exp.verdict(ahead)
    assert status == "pass" and summary.startswith("indicative (quick")
    close = records({("adamw", 1e-2): [curve(2.6, 2.5, 2.45, 2.4)], ("swan", 1e-2): [curve(2.3, 2.2, 2.1, 2.35)]},
                    "quick")
    assert exp.verdict(close)[0] == "fail"
    assert exp.verdict(records({("adamw", 1e-2): [curve(5.0)], ("swan", 1e-2): [curve(5.1)]}, "smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    status, summary = judge(exp.EXPERIMENT, records(ADAMW_BEST))
    assert status == "error" and "swan" in summary
    mixed = records(ADAMW_BEST) + records({("swan", 1e-2): [curve(2.0)]}, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict(mixed)
