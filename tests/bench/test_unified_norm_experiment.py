import copy
import math

import pytest
import torch
from torch import nn

from normlab.bench.experiments import unified_norm as exp
from normlab.bench.runner import judge
from normlab.convert.fuse import ChannelAffine, FoldedNorm, fuse_norms
from normlab.layers.unified import UnifiedNorm


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "unified_norm" and e.slug == "unified_norm"
    full = e.grids["full"]
    assert full.arms == ("ln", "un", "plain") and full.lrs == (1e-3,) and full.seeds == (0, 1, 2)
    assert e.grids["quick"].arms == ("ln", "un") and e.grids["quick"].seeds == (0,)
    assert exp.EPOCHS["full"] == 30 and exp.EPOCHS["quick"] == 12 and exp.STEPS_PER_EPOCH == 20 and exp.BATCH == 64
    un = exp.norm_layer("un", "full")(8)
    assert un.window_size == (4, 4) and un.warmup_iters == 200 and un.compensation_start == 400
    assert not un.outlier_filtration
    quick = exp.norm_layer("un", "quick")(8)
    assert quick.warmup_iters == 60 and quick.compensation_start == 120
    plain = exp.norm_layer("plain", "full")(8)
    assert plain.window_size == (1, 1) and plain.warmup_iters > 10 ** 6
    assert exp.norm_layer("ln", "full") is nn.LayerNorm
    with pytest.raises(ValueError, match="unknown arm"):
        exp.norm_layer("bn", "full")
    inference = exp.INFERENCE
    assert inference.id == "unified_norm.inference" and inference.slug == "unified_norm"
    assert set(inference.grids["full"].arms) == {"b64_t16", "b8_t128", "b1_t16"}
    assert exp.TIMING["full"][:3] == (256, 6, 4)


def test_split_is_the_sheets_stratified_70_30():
    x_train, y_train, x_test, y_test = exp.split()
    assert x_train.shape == (1257, 16, 4) and x_test.shape == (540, 16, 4)
    counts_train = torch.bincount(y_train, minlength=10).float()
    counts_test = torch.bincount(y_test, minlength=10).float()
    assert ((counts_test / (counts_train + counts_test) - 0.3).abs() < 0.01).all()  # stratified per class
    assert 0 <= x_train.min() and x_train.max() <= 1


def test_patches_by_hand():
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    tokens = exp.patches(img)
    assert tokens.shape == (1, 16, 4)
    assert tokens[0, 0].tolist() == [0, 1, 8, 9]  # top-left 2x2 patch
    assert tokens[0, 1].tolist() == [2, 3, 10, 11]  # its right neighbour
    assert tokens[0, 4].tolist() == [16, 17, 24, 25]  # the first patch of the second patch row
    assert sorted(tokens.flatten().tolist()) == list(range(64))


def test_patch_transformer_fuses_into_its_readers():
    torch.manual_seed(0)
    model = exp.PatchTransformer(exp.norm_layer("un", "full"), d_model=16, n_layers=2, n_heads=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, UnifiedNorm):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    model.eval()
    fused = copy.deepcopy(model)
    changed = fuse_norms(fused)
    assert changed == ["blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.norm2", "blocks.0.mlp.fc1",
                       "blocks.1.norm1", "blocks.1.attn.qkv", "blocks.1.norm2", "blocks.1.mlp.fc1", "norm"]
    assert isinstance(fused.blocks[0].norm1, FoldedNorm) and isinstance(fused.norm, ChannelAffine)  # before pooling
    x = torch.rand(5, 16, 4)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def smoke_runs():
    return {arm: exp.run(arm, 1e-3, 0, "smoke") for arm in exp.ARMS}


def test_smoke_runs_record_structure(smoke_runs):
    for arm, rec in smoke_runs.items():
        m = rec["metrics"]
        assert 0 <= m["acc"] <= 100 and m["finite"] == 1.0
        assert [e for e, _ in rec["curves"]["test_acc"]] == [1]
        assert len(rec["curves"]["train_loss"]) == exp.SMOKE_STEPS
        assert abs(rec["curves"]["train_loss"][0][1] - math.log(10)) < 1.0  # starts near a uniform guess
        if arm in exp.UN_ARMS:
            assert m["fused_same_predictions"] == 1.0 and m["fused_max_logit_diff"] <= 1e-4
            assert m["skips"] == 0.0  # filtration is off in both UN arms
        else:
            assert "fused_max_logit_diff" not in m
    assert smoke_runs["ln"]["metrics"]["acc"] == exp.run("ln", 1e-3, 0, "smoke")["metrics"]["acc"]  # deterministic
    assert torch.get_num_threads() >= 1


def records(acc, mode="full", fused=None, finite=None):
    """``acc``: {arm: [accuracy per seed]}; UN arms get fused metrics (``fused``: {(arm, seed): (same, diff)})."""
    out = []
    for arm, values in acc.items():
        for seed, a in enumerate(values):
            m = {"acc": a, "finite": (finite or {}).get((arm, seed), 1.0)}
            if arm in exp.UN_ARMS:
                same, diff = (fused or {}).get((arm, seed), (1.0, 5e-6))
                m.update(fused_same_predictions=same, fused_max_logit_diff=diff, skips=0.0)
            out.append({"experiment": "unified_norm", "arm": arm, "lr": 1e-3, "seed": seed, "mode": mode,
                        "metrics": m})
    return out


SHEET = {"ln": [94.0, 95.5, 95.2], "un": [98.3, 97.4, 98.0], "plain": [97.0, 98.0, 97.5]}


def test_verdict_pass_on_the_sheets_numbers():
    status, summary = exp.verdict(records(SHEET))
    assert status == "pass"
    assert "UN 97.9 % vs LN 94.9 %" in summary and "identical on every seed: yes" in summary
    assert "[plain: report only]" in summary


def test_verdict_plain_is_report_only():
    assert exp.verdict(records({**SHEET, "plain": [10.0, 10.0, 10.0]}))[0] == "pass"


@pytest.mark.parametrize("change,reason", [
    ({"un": [95.0, 95.5, 96.0]}, "need UN >= LN - 1: no"),  # above the floor, 1.3 points below LN
    ({"ln": [90.0, 90.0, 90.0], "un": [94.0, 95.5, 95.0]}, "UN >= 95 %: no"),
])
def test_verdict_fails_on_accuracy(change, reason):
    acc = {**SHEET, **change}
    if "ln" not in change:
        acc["ln"] = [96.0, 97.0, 97.5]
    status, summary = exp.verdict(records(acc))
    assert status == "fail" and reason in summary


def test_verdict_fails_when_fusion_changes_a_prediction_or_logits():
    assert exp.verdict(records(SHEET, fused={("un", 1): (0.0, 3e-5)}))[0] == "fail"
    status, summary = exp.verdict(records(SHEET, fused={("un", 2): (1.0, 2e-4)}))
    assert status == "fail" and "2.0e-04" in summary
    assert exp.verdict(records(SHEET, fused={("plain", 0): (0.0, 1.0)}))[0] == "pass"  # plain: report only


def test_verdict_fails_on_nan():
    assert exp.verdict(records(SHEET, finite={("ln", 0): 0.0}))[0] == "fail"


def test_verdict_quick_is_indicative():
    status, summary = exp.verdict(records({"ln": [90.0], "un": [88.0]}, "quick"))
    assert status == "pass" and "indicative" in summary
    assert exp.verdict(records({"ln": [90.0], "un": [86.5]}, "quick"))[0] == "fail"
    assert exp.verdict(records({"ln": [90.0], "un": [95.0]}, "quick", fused={("un", 0): (0.0, 1e-3)}))[0] == "fail"
    assert exp.verdict(records(SHEET, "smoke"))[0] == "report"


def test_verdict_errors_on_missing_arm():
    status, summary = judge(exp.EXPERIMENT, records({"ln": [95.0, 95.0, 95.0]}))
    assert status == "error" and "un" in summary


def test_inference_smoke_run_and_report_only_verdict():
    rec = exp.run_inference("b1_t16", None, 0, "smoke")
    m = rec["metrics"]
    assert m["ratio_fused"] > 0 and m["ratio_unfused"] > 0 and m["ms_ln"] > 0 and m["fused_max_logit_diff"] < 1e-5
    recs = [{"experiment": "unified_norm.inference", "arm": "b1_t16", "lr": None, "seed": 0, "mode": "smoke",
             "metrics": m}]
    status, summary = exp.verdict_inference(recs)
    assert status == "report" and "fused/LN" in summary
    slow = [{**recs[0], "metrics": {**m, "ratio_fused": 3.0}}]
    assert exp.verdict_inference(slow)[0] == "report"  # a slower fused model is reported, never a fail


def test_inference_models_share_weights_and_fuse_exactly():
    ln, un, fused = exp.timing_models(0, "smoke", 16)
    assert torch.equal(ln.blocks[0].attn.qkv.weight, un.blocks[0].attn.qkv.weight)
    assert not any(isinstance(m, UnifiedNorm) for m in fused.modules())
    assert not torch.equal(un.blocks[0].norm1.running_var, torch.ones_like(un.blocks[0].norm1.running_var))
