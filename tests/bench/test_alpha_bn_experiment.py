import math

import pytest
import torch

from normlab.bench.experiments import alpha_bn as exp
from normlab.bench.runner import judge
from normlab.layers.alpha_bn import AlphaBatchNorm


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "alpha_bn" and e.slug == "alpha_bn"
    full = e.grids["full"]
    assert full.seeds == (0, 1, 2) and full.lrs == (None,)
    assert set(full.arms) == {"source", "tent_0"} | {f"alpha_bn_{a:g}" for a in (0, 0.3, 0.5, 0.7, 0.9)} \
        | {f"core_{a:g}" for a in (0, 0.3, 0.5, 0.7, 0.9, 1)}
    assert e.grids["quick"].arms == e.grids["smoke"].arms == full.arms
    assert exp.BATCH_SIZES == (8, 32, 128) and exp.EPOCHS["full"] == 30
    # alpha-BN (source = alpha 1) and Core are tuned over the same grid
    assert sorted([1.0, *exp.ALPHA_ARMS.values()]) == sorted(exp.CORE_ARMS.values()) == list(exp.ALPHAS)
    assert exp.arm_alpha("source") == 1.0 and exp.arm_alpha("tent_0") == 0.0 and exp.arm_alpha("core_0.7") == 0.7
    with pytest.raises(ValueError, match="unknown arm"):
        exp.arm_alpha("core_0.4")


def test_model_split_and_shift():
    model = exp.make_mlp()
    assert [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [128, 128]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    images = torch.rand(4000, 1, 8, 8)
    shifted = exp.shift(images, torch.Generator().manual_seed(0))
    residual = shifted - (0.5 * images + 0.3)
    assert abs(residual.mean().item()) < 0.01 and abs(residual.std().item() - 0.15) < 0.01


def test_batches_never_leave_a_single_image():
    assert [s.stop - s.start for s in exp.batches(540, 128)] == [128] * 4 + [28]
    assert [s.stop - s.start for s in exp.batches(17, 8)] == [8, 9]
    assert sum(s.stop - s.start for s in exp.batches(540, 8)) == 540


@pytest.fixture(scope="module")
def smoke_runs():
    exp._source_model.cache_clear()
    return {arm: exp.run(arm, None, 0, "smoke") for arm in ("source", "alpha_bn_0.5", "core_0.5", "core_1")}


def test_smoke_run_record_structure(smoke_runs):
    for arm, rec in smoke_runs.items():
        assert set(rec) == {"metrics", "curves"}
        expected = {"acc_bs8", "acc_bs32", "acc_bs128"} | ({"acc_clean"} if arm == "source" else set())
        assert set(rec["metrics"]) == expected
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in rec["metrics"].values())
        curve = rec["curves"]["online_acc_bs8"]
        assert [s for s, _ in curve] == list(range(1, exp.SMOKE_TEST_IMAGES // 8 + 1))
        assert curve[-1][1] == pytest.approx(rec["metrics"]["acc_bs8"])
    # alpha 1 does not depend on the batch size; Core at alpha 1 starts from the source model's predictions
    src = smoke_runs["source"]["metrics"]
    assert src["acc_bs8"] == src["acc_bs32"] == src["acc_bs128"]
    assert smoke_runs["core_1"]["curves"]["online_acc_bs128"][0][1] == pytest.approx(src["acc_bs128"])


def test_alpha_bn_arm_matches_the_converted_model():
    """The arm's number is what an AlphaBatchNorm model computes batch by batch on the cached stream."""
    state, _, x, y, _ = exp._source_model(0, "smoke")
    model = exp.make_mlp()
    model.load_state_dict(state)
    for i in (2, 5):
        model[i] = AlphaBatchNorm.from_batchnorm(model[i], 0.5)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[s]).argmax(-1) == y[s]).sum()) for s in exp.batches(len(y), 32))
    assert exp.run("alpha_bn_0.5", None, 0, "smoke")["metrics"]["acc_bs32"] == correct / len(y)


def records(means, mode="full", seeds=(0, 1, 2)):
    """``means``: {arm: {bs: acc}} (every seed gets the same value); missing arms get 0.5."""
    out = []
    for arm in exp.ARMS:
        values = means.get(arm, {})
        metrics = {f"acc_bs{bs}": values.get(bs, 0.5) for bs in exp.BATCH_SIZES}
        if arm == "source":
            metrics["acc_clean"] = 0.98
        out += [{"experiment": "alpha_bn", "arm": arm, "lr": None, "seed": s, "mode": mode, "metrics": metrics}
                for s in seeds]
    return out


def passing():
    """The sheet's measured table."""
    return {
        "source": {8: 0.528, 32: 0.528, 128: 0.528},
        "alpha_bn_0": {8: 0.682, 32: 0.769, 128: 0.796},
        "alpha_bn_0.3": {8: 0.69, 32: 0.76, 128: 0.78},
        "alpha_bn_0.5": {8: 0.697, 32: 0.740, 128: 0.751},
        "alpha_bn_0.9": {8: 0.570, 32: 0.585, 128: 0.587},
        "core_0": {8: 0.682, 32: 0.770, 128: 0.798},
        "core_0.5": {8: 0.695, 32: 0.741, 128: 0.75},
        "core_0.9": {8: 0.603, 32: 0.595, 128: 0.588},
        "tent_0": {8: 0.682, 32: 0.770, 128: 0.797},
    }


def test_verdict_passes_on_the_sheets_numbers():
    status, summary = exp.verdict(records(passing()))
    assert status == "pass", summary
    assert "alpha 0 +24.1, alpha 0.5 +21.2 points (need >= 10: yes)" in summary
    assert "bs8 best mixed alpha 0.5: 0.697 vs alpha 0 0.682" in summary
    assert "bs8 Core 0.695 (alpha 0.5) vs alpha-BN 0.697 (alpha 0.5)" in summary
    assert "bs128 Core 0.798 (alpha 0) vs alpha-BN 0.796 (alpha 0)" in summary and "(3 seed(s))" in summary


def test_verdict_uses_seed_means():
    recs = records(passing())
    for rec in recs:  # alpha 0.5 at bs 8: seeds 0.75, 0.75, 0.591 -> mean 0.697; one seed alone would differ
        if rec["arm"] == "alpha_bn_0.5":
            rec["metrics"] = {**rec["metrics"], "acc_bs8": [0.75, 0.75, 0.591][rec["seed"]]}
    assert "bs8 best mixed alpha 0.5: 0.697" in exp.verdict(recs)[1]


@pytest.mark.parametrize("change,needle", [
    ({"alpha_bn_0.5": {8: 0.697, 32: 0.62, 128: 0.751}}, "(need >= 10: no)"),               # (i)
    ({"alpha_bn_0.3": {8: 0.6}, "alpha_bn_0.5": {8: 0.68, 32: 0.74, 128: 0.75}}, "(need >= and >: no)"),  # (ii)
    ({"core_0": {8: 0.682, 32: 0.76, 128: 0.798}, "core_0.5": {32: 0.7}}, "bs32 Core 0.760"),  # (iii)
])
def test_verdict_fails_each_criterion(change, needle):
    means = passing()
    means.update(change)
    status, summary = exp.verdict(records(means))
    assert status == "fail" and needle in summary, summary


def test_core_may_lose_half_a_point_but_not_more():
    means = passing()
    means["core_0"] = {8: 0.682, 32: 0.7641, 128: 0.798}  # 0.49 points under alpha-BN's best at bs 32
    assert exp.verdict(records(means))[0] == "pass"
    means["core_0"] = {8: 0.682, 32: 0.7635, 128: 0.798}
    assert exp.verdict(records(means))[0] == "fail"


def test_verdict_quick_and_smoke_report_only_and_errors():
    status, summary = exp.verdict(records(passing(), "quick", (0,)))
    assert status == "report" and "indicative" in summary and "(1 seed(s))" in summary
    assert exp.verdict(records(passing(), "smoke", (0,)))[0] == "report"
    partial = [r for r in records(passing()) if r["arm"] != "core_0.3"]
    status, summary = judge(exp.EXPERIMENT, partial)
    assert status == "error" and "core_0.3" in summary
    assert judge(exp.EXPERIMENT, [])[0] == "error"


def test_smoke_through_judge(smoke_runs):
    """Every arm in smoke mode, judged: a report with finite numbers."""
    recs = [{"experiment": "alpha_bn", "arm": arm, "lr": None, "seed": 0, "mode": "smoke",
             "metrics": (smoke_runs[arm] if arm in smoke_runs else exp.run(arm, None, 0, "smoke"))["metrics"]}
            for arm in exp.ARMS]
    status, summary = judge(exp.EXPERIMENT, recs)
    assert status == "report" and summary.startswith("smoke") and "nan" not in summary
    assert all(math.isfinite(v) for r in recs for v in r["metrics"].values())
