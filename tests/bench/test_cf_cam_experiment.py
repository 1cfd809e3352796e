import math

import pytest
import torch

from normlab.bench.experiments import cf_cam as exp
from normlab.bench.runner import judge
from normlab.bench.tasks import saliency_digits
from normlab.explain.cf_cam import CFCAM
from normlab.explain.gradcam import GradCAM


def test_registered_with_the_sheet_protocol():
    checks = {e.id: e for e in (exp.FAITHFULNESS, exp.CLASS_SENSITIVITY, exp.ROBUSTNESS)}
    assert set(checks) == {"cf_cam.faithfulness", "cf_cam.class_sensitivity", "cf_cam.robustness"}
    assert all(e.slug == "cf_cam" for e in checks.values())
    assert exp.FAITHFULNESS.grids["full"].arms == ("grad_cam", "cf_cam", "random")
    for e in checks.values():
        assert e.grids["full"].seeds == (0, 1, 2) and e.grids["quick"].seeds == (0,)
        assert e.grids["full"].lrs == (None,)
    assert exp.CLASS_SENSITIVITY.grids["full"].arms == exp.ROBUSTNESS.grids["full"].arms == ("grad_cam", "cf_cam")
    assert exp.LAYER == "relu2" and exp.EPOCHS["full"] == exp.EPOCHS["quick"] == 15
    assert exp.IMAGES["full"] == exp.IMAGES["quick"] == 100
    assert exp.INSERTION_MARGIN == 0.05 and exp.MIN_CF_CORRELATION == 0.95 and exp.NOISE_SCALE == 0.5


@pytest.fixture(scope="module")
def smoke():
    """Every run of the three checks in smoke mode (one epoch, 2 images)."""
    out = {}
    for e in (exp.FAITHFULNESS, exp.CLASS_SENSITIVITY, exp.ROBUSTNESS):
        for arm, lr, seed in e.grids["smoke"].points():
            out[(e.id, arm)] = e.run(arm, lr, seed, "smoke")
    return out


def test_smoke_runs(smoke):
    for (exp_id, arm), rec in smoke.items():
        assert set(rec) == {"metrics", "curves"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in rec["metrics"].values()), (exp_id, arm)
    for arm in exp.FAITH_ARMS:
        rec = smoke[("cf_cam.faithfulness", arm)]
        assert 0 <= rec["metrics"]["deletion_auc"] <= 1 and 0 <= rec["metrics"]["insertion_auc"] <= 1
        for name in ("deletion_prob", "insertion_prob"):
            assert [c for c, _ in rec["curves"][name]] == list(range(65))  # one pixel per step
    assert -1 <= smoke[("cf_cam.class_sensitivity", "grad_cam")]["metrics"]["class_corr"] <= 1
    assert smoke[("cf_cam.robustness", "cf_cam")]["metrics"]["noise_corr"] <= 1 + 1e-12


def test_images_are_the_first_held_out_digits():
    _, x, acc = exp._setup(0, "smoke")
    assert torch.equal(x, saliency_digits(0)["heldout"][0][:exp.IMAGES["smoke"]])
    assert 0 <= acc <= 1


def test_maps_from_a_capture_equal_the_explainers():
    model, x, _ = exp._setup(0, "smoke")
    from normlab.explain._capture import LayerCapture

    with LayerCapture(model, exp.LAYER) as cap:
        _, _, (act,), (grad,) = cap.run(x)
    torch.testing.assert_close(exp.maps_from("grad_cam", model, act, grad, (8, 8)), GradCAM(model, exp.LAYER)(x))
    torch.testing.assert_close(exp.maps_from("cf_cam", model, act, grad, (8, 8)), CFCAM(model, exp.LAYER)(x))
    with pytest.raises(ValueError, match="unknown arm"):
        exp.maps_from("random", model, act, grad, (8, 8))


def test_figures(tmp_path, smoke):
    records = [{"experiment": "cf_cam.faithfulness", "arm": "cf_cam", "lr": None, "seed": 0, "mode": "smoke",
                "metrics": smoke[("cf_cam.faithfulness", "cf_cam")]["metrics"]}]
    names = exp.figures(records, tmp_path)
    assert names == ["cf_cam.maps.png"] and (tmp_path / names[0]).stat().st_size > 1000


def records(exp_id, metric_values, mode="full"):
    """``metric_values``: {arm: [metrics dict per seed]}."""
    return [{"experiment": exp_id, "arm": arm, "lr": None, "seed": seed, "mode": mode, "metrics": metrics}
            for arm, per_seed in metric_values.items() for seed, metrics in enumerate(per_seed)]


def faith(cf, gc, rnd, n=3, mode="full"):
    as_metrics = lambda pair: {"deletion_auc": pair[0], "insertion_auc": pair[1], "heldout_acc": 0.8}  # noqa: E731
    return records("cf_cam.faithfulness", {arm: [as_metrics(pair) for _ in range(n)]
                                           for arm, pair in (("grad_cam", gc), ("cf_cam", cf), ("random", rnd))},
                   mode)


def test_faithfulness_verdict():
    status, summary = exp.verdict_faithfulness(faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20)))
    assert status == "pass" and "3 of 3 seed(s)" in summary and "insertion +0.160" in summary
    # insertion gain below the margin
    status, summary = exp.verdict_faithfulness(faith((0.14, 0.24), (0.21, 0.20), (0.20, 0.20)))
    assert status == "fail" and "insertion gain < 0.05" in summary
    # deletion no better than random
    assert exp.verdict_faithfulness(faith((0.19, 0.36), (0.21, 0.20), (0.18, 0.20)))[0] == "fail"
    # one seed failing fails the check
    recs = faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20))
    recs[3]["metrics"]["deletion_auc"] = 0.25  # cf_cam, seed 0
    status, summary = exp.verdict_faithfulness(recs)
    assert status == "fail" and "2 of 3" in summary
    # a missing seed in full mode fails
    assert exp.verdict_faithfulness(faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20), n=2))[0] == "fail"
    # quick is judged on seed 0 (indicative), smoke is report-only
    status, summary = exp.verdict_faithfulness(faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20), 1, "quick"))
    assert status == "pass" and "indicative" in summary
    assert exp.verdict_faithfulness(faith((0.14, 0.24), (0.21, 0.20), (0.20, 0.20), 1, "quick"))[0] == "fail"
    assert exp.verdict_faithfulness(faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20), 1, "smoke"))[0] == "report"


def sens(cf, gc, n=3, mode="full"):
    m = lambda v: {"class_corr": v, "class_corr_min": v - 0.01, "undefined": 0.0, "heldout_acc": 0.8}  # noqa: E731
    return records("cf_cam.class_sensitivity", {"grad_cam": [m(gc) for _ in range(n)],
                                                "cf_cam": [m(cf) for _ in range(n)]}, mode)


def test_class_sensitivity_verdict():
    status, summary = exp.verdict_class_sensitivity(sens(0.9999, -0.21))
    assert status == "pass" and "is nearly class-insensitive" in summary and "Grad-CAM -0.210" in summary
    status, summary = exp.verdict_class_sensitivity(sens(0.6, -0.21))
    assert status == "fail" and "is not nearly" in summary
    assert exp.verdict_class_sensitivity(sens(math.nan, -0.21))[0] == "fail"
    assert exp.verdict_class_sensitivity(sens(0.99, -0.2, 1, "quick"))[0] == "pass"
    assert exp.verdict_class_sensitivity(sens(0.99, -0.2, 1, "smoke"))[0] == "report"


def test_robustness_is_report_only():
    m = lambda v: {"noise_corr": v, "undefined": 0.0, "heldout_acc": 0.8}  # noqa: E731
    recs = records("cf_cam.robustness", {"grad_cam": [m(0.99)] * 3, "cf_cam": [m(1.0)] * 3})
    status, summary = exp.verdict_robustness(recs)
    assert status == "report" and "cf_cam 1.0000" in summary and "grad_cam 0.9900" in summary


def test_verdict_errors_on_missing_arm_or_mixed_modes():
    recs = [r for r in faith((0.14, 0.36), (0.21, 0.20), (0.20, 0.20)) if r["arm"] != "random"]
    status, summary = judge(exp.FAITHFULNESS, recs)
    assert status == "error" and "random" in summary
    mixed = sens(0.99, -0.2, 1) + sens(0.99, -0.2, 1, "quick")
    with pytest.raises(ValueError, match="mix modes"):
        exp.verdict_class_sensitivity(mixed)
