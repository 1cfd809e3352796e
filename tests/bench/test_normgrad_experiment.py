import math

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import normgrad as exp
from normlab.bench.runner import judge
from normlab.bench.tasks import SaliencyCNN, saliency_digits, train_saliency_cnn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As the runner does: tiny models train far faster on one thread than on two shared cores."""
    with intra_op_threads(1):
        yield


def test_registered_with_the_sheet_protocol():
    meta, dele = exp.META, exp.DELETION
    assert (meta.id, dele.id) == ("normgrad.meta", "normgrad.deletion") and meta.slug == dele.slug == "normgrad"
    full = meta.grids["full"]
    assert full.arms == ("normgrad", "gradcam") and full.seeds == (0, 1, 2)
    assert full.lrs == (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    assert dele.grids["full"].arms == ("normgrad", "random", "gradcam") and dele.grids["full"].seeds == (0, 1, 2)
    assert meta.grids["quick"].seeds == dele.grids["quick"].seeds == (0,)
    assert exp.EPOCHS["full"] == exp.EPOCHS["quick"] == 15 and exp.IMAGES["full"] == exp.IMAGES["quick"] == 100
    assert exp.LAYER == "relu2" and exp.MIN_REDUCTION == 0.2
    assert round(exp.TOP_FRACTION * 64) == 13


def test_saliency_digits_splits():
    a, b = saliency_digits(0), saliency_digits(1)
    assert {k: len(v[0]) for k, v in a.items()} == {"train": 1400, "val": 100, "test": 100, "heldout": 397}
    assert torch.equal(a["heldout"][0][:100], a["val"][0]) and torch.equal(a["heldout"][0][100:200], a["test"][0])
    assert a["train"][0].shape[1:] == (1, 8, 8) and a["train"][0].max() <= 1
    assert torch.equal(saliency_digits(0)["test"][0], a["test"][0]) and not torch.equal(a["test"][0], b["test"][0])
    everything = torch.cat([a["train"][0], a["heldout"][0]]).flatten(1)
    assert everything.unique(dim=0).shape[0] == torch.cat([b["train"][0], b["heldout"][0]]).flatten(1) \
        .unique(dim=0).shape[0]  # a permutation of the same images


def test_train_saliency_cnn_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    m1, splits = train_saliency_cnn(3, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    m2, _ = train_saliency_cnn(3, epochs=1)
    assert isinstance(m1, SaliencyCNN) and not m1.training
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert all(p.grad is None for p in m1.parameters())
    assert set(dict(m1.named_modules())) >= {"relu1", "relu2"}


@pytest.fixture(scope="module")
def smoke():
    return ({arm: exp.run_meta(arm, lr, 0, "smoke") for arm in exp.META_ARMS for lr in (0.0, 0.1)},
            {arm: exp.run_deletion(arm, None, 0, "smoke") for arm in exp.DELETION_ARMS})


def test_smoke_runs(smoke):
    meta, dele = smoke
    for rec in meta.values():
        assert set(rec["metrics"]) == {"val_corr", "test_corr", "undefined", "test_acc"}
        assert all(isinstance(v, float) for v in rec["metrics"].values())
    for rec in dele.values():
        assert set(rec["metrics"]) == {"drop_top20", "deletion_auc", "insertion_auc", "test_acc"}
        curve = rec["curves"]["deletion_prob"]
        assert [c for c, _ in curve] == list(range(65)) and all(0 <= v <= 1 for _, v in curve)
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run_meta("cfcam", 0.0, 0, "smoke")


def test_plain_normgrad_at_relu2_is_class_insensitive_in_the_smoke_model():
    model, x_val, _, _ = exp._setup(0, "smoke")
    corr, undefined = exp._sensitivity(exp._method("normgrad", model), model, x_val, 0.0)
    assert undefined == 0 and corr == pytest.approx(1.0, abs=1e-5)


def meta_records(values, mode="full", gradcam=True):
    """``values``: {lr: [(val_corr, test_corr) per seed]} of the normgrad arm."""
    recs = []
    for lr, per_seed in values.items():
        for seed, (val, test) in enumerate(per_seed):
            for arm in ("normgrad",) + (("gradcam",) if gradcam else ()):
                recs.append({"experiment": "normgrad.meta", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                             "metrics": {"val_corr": val, "test_corr": test if arm == "normgrad" else -0.3}})
    return recs


def sheet_like(reductions=(0.26, 0.29, 0.26)):
    values = {0.0: [(1.0, 1.0)] * 3}
    for lr in exp.META_LRS:
        values[lr] = [(0.9, 0.9)] * 3
    values[0.1] = [(0.72, 1 - r) for r in reductions]
    return values


def test_meta_verdict_pass():
    status, summary = exp.verdict_meta(meta_records(sheet_like()))
    assert status == "pass", summary
    assert "mean test reduction of NormGrad's class sensitivity 0.270" in summary
    assert "seed 1: tuned lr 0.1" in summary and "Grad-CAM beside" in summary


def test_meta_verdict_fails_below_the_margin():
    status, summary = exp.verdict_meta(meta_records(sheet_like((0.15, 0.2, 0.2))))
    assert status == "fail" and "0.183" in summary


def test_meta_verdict_tunes_on_validation_not_test():
    values = sheet_like((0.05, 0.05, 0.05))
    values[1.0] = [(0.95, 0.5)] * 3  # best on test, but validation says otherwise
    status, summary = exp.verdict_meta(meta_records(values))
    assert status == "fail" and "tuned lr 1" not in summary and "tuned lr 0.1" in summary


def test_meta_verdict_nan_validation_ranks_last_and_missing_seed_fails():
    values = sheet_like()
    values[0.01] = [(math.nan, 0.0)] * 3
    assert exp.verdict_meta(meta_records(values))[0] == "pass"
    values = {lr: per_seed[:2] for lr, per_seed in sheet_like().items()}
    assert exp.verdict_meta(meta_records(values))[0] == "fail"


def test_meta_verdict_quick_and_smoke_report_and_errors():
    quick = {lr: per_seed[:1] for lr, per_seed in sheet_like().items()}
    status, summary = exp.verdict_meta(meta_records(quick, "quick"))
    assert status == "report" and "indicative" in summary
    smoke = {0.0: [(1.0, 1.0)], 0.1: [(0.99, 0.99)]}
    assert exp.verdict_meta(meta_records(smoke, "smoke"))[0] == "report"
    assert judge(exp.META, meta_records(sheet_like(), gradcam=False))[0] == "error"
    assert judge(exp.META, [r for r in meta_records(sheet_like()) if r["lr"] != 0.0])[0] == "error"


def deletion_records(drops, mode="full"):
    """``drops``: {arm: [drop per seed]}."""
    return [{"experiment": "normgrad.deletion", "arm": arm, "lr": None, "seed": seed, "mode": mode,
             "metrics": {"drop_top20": d}} for arm, per_seed in drops.items() for seed, d in enumerate(per_seed)]


def test_deletion_verdict():
    drops = {"normgrad": [0.33, 0.23, 0.36], "random": [0.22, 0.19, 0.18], "gradcam": [0.2, 0.2, 0.2]}
    status, summary = exp.verdict_deletion(deletion_records(drops))
    assert status == "pass" and "3 of 3" in summary and "seed 1: NormGrad 0.230 vs random 0.190" in summary
    drops["random"][2] = 0.37
    assert exp.verdict_deletion(deletion_records(drops))[0] == "fail"
    drops["normgrad"][2] = math.nan
    drops["random"][2] = 0.1
    assert exp.verdict_deletion(deletion_records(drops))[0] == "fail"
    short = {arm: v[:1] for arm, v in drops.items()}
    assert exp.verdict_deletion(deletion_records(short))[0] == "fail"
    assert exp.verdict_deletion(deletion_records(short, "quick"))[0] == "report"
    assert judge(exp.DELETION, deletion_records({"normgrad": [0.3], "gradcam": [0.2]}))[0] == "error"


def test_figures_draws_the_maps(tmp_path):
    recs = meta_records({0.0: [(1.0, 1.0)], 0.1: [(0.7, 0.7)], 0.3: [(0.8, 0.8)]}, "smoke")
    assert exp._tuned_lr(recs, 0) == 0.1
    assert exp.figures(recs, tmp_path) == ["normgrad.maps.png"]
    assert (tmp_path / "normgrad.maps.png").stat().st_size > 1000
