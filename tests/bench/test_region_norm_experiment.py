import math
from collections import Counter

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import region_norm as exp
from normlab.bench.runner import judge
from normlab.layers.region import LearnableRegionNorm2d, RegionNorm2d


def test_registered_with_the_sheet_protocol():
    e = exp.EXPERIMENT
    assert e.id == "region_norm" and e.slug == "region_norm" and e.primary_metric == "hole_l1"
    full, quick = e.grids["full"], e.grids["quick"]
    assert full.arms == ("bn", "in", "rn") and full.lrs == (1e-3, 3e-3, 1e-2) and full.seeds == (0, 1, 2)
    assert len(full.points()) == 27
    assert quick.arms == full.arms and quick.lrs == (3e-3,) and quick.seeds == (0,)
    assert exp.STEPS == {"full": 800, "quick": 300, "smoke": 5}
    assert exp.BATCH == 32 and exp.WIDTH == 32


def test_hole_shapes_and_sampling():
    shapes = set(exp.HOLE_SHAPES)
    assert shapes == {(3, 6), (3, 7), (3, 8), (4, 4), (4, 5), (4, 6), (5, 4), (5, 5), (6, 3), (6, 4), (7, 3),
                      (8, 3)}
    holes = exp.rectangle_holes(4000, torch.Generator().manual_seed(0))
    assert holes.shape == (4000, 1, 8, 8) and set(holes.unique().tolist()) == {0.0, 1.0}
    rows, cols = holes[:, 0].amax(2), holes[:, 0].amax(1)
    seen = Counter(zip(rows.sum(1).long().tolist(), cols.sum(1).long().tolist()))
    assert set(seen) == shapes
    assert min(seen.values()) > 4000 / 12 * 0.75  # about uniform over the pairs
    assert torch.equal(holes[:, 0].sum((1, 2)), rows.sum(1) * cols.sum(1))  # rectangles
    tops = rows.argmax(1)
    assert set(tops[rows.sum(1) == 3].tolist()) == set(range(6))  # every position that fits
    again = exp.rectangle_holes(4000, torch.Generator().manual_seed(0))
    assert torch.equal(holes, again)


def test_network_shapes_and_slots():
    x = torch.rand(3, 1, 8, 8)
    m = exp.rectangle_holes(3, torch.Generator().manual_seed(1))
    for arm, kinds in (("bn", [torch.nn.BatchNorm2d] * 5), ("in", [torch.nn.InstanceNorm2d] * 5),
                       ("rn", [RegionNorm2d] * 3 + [LearnableRegionNorm2d] * 2)):
        net = exp.InpaintNet(arm)
        assert [type(n) for n in net.norms] == kinds
        out = net(exp.corrupt(x, m), m)
        assert out.shape == (3, 1, 8, 8) and ((out >= 0) & (out <= 1)).all()
    rn = exp.InpaintNet("rn")
    assert all(n.stats == "batch" and not n.official_bias for n in rn.norms[:3])
    assert all(n.threshold == 0.8 and n.kernel_size == 7 for n in rn.norms[3:])
    with pytest.raises(ValueError, match="unknown arm"):
        exp.InpaintNet("gn")
    assert torch.equal(exp.corrupt(x, m), torch.where(m.bool(), 1.0, x))


@pytest.fixture(scope="module")
def smoke_runs():
    """Smoke runs of every arm (seed 0) and of RN with seed 1, with each run's training batches recorded."""
    seen = {}
    original = exp.corrupt

    def recording(images, holes):
        if current is not None:
            seen[current].append((images.clone(), holes.clone()))
        return original(images, holes)

    results, current = {}, None
    exp.corrupt = recording
    try:
        with intra_op_threads(1):  # as the runner: one thread per run
            for key in (("bn", 0), ("in", 0), ("rn", 0), ("rn", 1)):
                current = key
                seen[key] = []
                results[key] = exp.run(key[0], 3e-3, key[1], "smoke")
    finally:
        exp.corrupt = original
    return results, seen


def test_smoke_run_records(smoke_runs):
    results, _ = smoke_runs
    for (arm, _), rec in results.items():
        assert set(rec) == {"metrics", "curves"}
        metrics = rec["metrics"]
        expected = {"hole_l1", "valid_l1", "train_l1_last"} | ({"rnl_mask_fraction"} if arm == "rn" else set())
        assert set(metrics) == expected
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert 0 < metrics["hole_l1"] < 1
        curve = rec["curves"]["train_l1"]
        assert [s for s, _ in curve] == list(range(1, exp.STEPS["smoke"] + 1))
        assert metrics["train_l1_last"] == pytest.approx(sum(v for _, v in curve) / len(curve))


def test_arms_see_identical_images_and_holes_per_seed(smoke_runs):
    _, seen = smoke_runs
    first = seen[("bn", 0)][:exp.STEPS["smoke"]]
    assert len(first) == exp.STEPS["smoke"]
    for arm in ("in", "rn"):
        assert len(seen[(arm, 0)]) == len(seen[("bn", 0)]) == exp.STEPS["smoke"] + 2  # + 2 test batches
        for (xa, ma), (xb, mb) in zip(seen[("bn", 0)], seen[(arm, 0)]):
            assert torch.equal(xa, xb) and torch.equal(ma, mb)
    assert not torch.equal(first[0][1], seen[("rn", 1)][0][1])
    assert not torch.equal(first[0][1], first[1][1])  # fresh holes every step


def test_split_sizes():
    assert len(exp.digits("train", test_fraction=0.3, seed=0)[0]) == 1257
    assert len(exp.digits("test", test_fraction=0.3, seed=0)[0]) == 540


def records(values, mode="full"):
    """``values``: {(arm, lr): [hole_l1 per seed]}."""
    return [{"experiment": "region_norm", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
             "metrics": {"hole_l1": v, **({"rnl_mask_fraction": 0.001} if arm == "rn" else {})}}
            for (arm, lr), per_seed in values.items() for seed, v in enumerate(per_seed)]


SHEET = {("bn", 1e-3): [0.1431] * 3, ("bn", 3e-3): [0.1414] * 3, ("bn", 1e-2): [0.1493] * 3,
         ("in", 1e-3): [0.1514] * 3, ("in", 3e-3): [0.1477] * 3, ("in", 1e-2): [0.1461] * 3,
         ("rn", 1e-3): [0.1425] * 3, ("rn", 3e-3): [0.1393] * 3, ("rn", 1e-2): [0.1395] * 3}


def test_verdict_passes_on_the_sheet_numbers_and_picks_best_lr_by_mean():
    values = dict(SHEET)
    values[("in", 3e-3)] = [0.1300, 0.1600, 0.1600]  # best single seed, worse mean
    status, summary = exp.verdict(records(values))
    assert status == "pass", summary
    assert "IN best lr 0.01" in summary and "RN best lr 0.003" in summary and "BN best lr 0.003" in summary
    assert "RN/IN 0.953" in summary and "RN/BN 0.985" in summary


def test_verdict_fails_when_rn_does_not_beat_in():
    values = dict(SHEET)
    values[("in", 1e-2)] = [0.1410] * 3  # RN/IN = 0.988 > 0.98
    status, summary = exp.verdict(records(values))
    assert status == "fail" and "0.98 x IN: no" in summary and "1.04 x BN: yes" in summary


def test_verdict_fails_when_rn_is_worse_than_bn_beyond_noise():
    values = dict(SHEET)
    values[("bn", 3e-3)] = [0.1300] * 3  # RN/BN = 1.072
    status, summary = exp.verdict(records(values))
    assert status == "fail" and "0.98 x IN: yes" in summary and "1.04 x BN: no" in summary


def test_verdict_nan_run_makes_its_lr_infinite():
    values = dict(SHEET)
    values[("rn", 3e-3)] = [0.10, math.nan, 0.10]
    status, summary = exp.verdict(records(values))
    assert "RN best lr 0.01" in summary and status == "pass"
    nan_everywhere = {k: ([math.nan] * 3 if k[0] == "rn" else v) for k, v in SHEET.items()}
    assert exp.verdict(records(nan_everywhere))[0] == "fail"


def test_quick_rule_and_smoke():
    quick = {("bn", 3e-3): [0.1641], ("in", 3e-3): [0.1688], ("rn", 3e-3): [0.1560]}
    status, summary = exp.verdict(records(quick, "quick"))
    assert status == "pass" and "indicative" in summary and "0.97 x IN: yes" in summary
    slower = {**quick, ("bn", 3e-3): [0.1550]}  # RN > BN fails the quick rule (it passes the full one)
    assert exp.verdict(records(slower, "quick"))[0] == "fail"
    assert exp.verdict(records(slower))[0] == "pass"
    assert exp.verdict(records(quick, "smoke"))[0] == "report"


def test_judge_errors_on_missing_arm_and_smoke_through_the_runner(smoke_runs):
    status, summary = judge(exp.EXPERIMENT, records({("bn", 3e-3): [0.15], ("in", 3e-3): [0.16]}))
    assert status == "error" and "rn" in summary
    results, _ = smoke_runs
    recs = [{"experiment": "region_norm", "arm": arm, "lr": 3e-3, "seed": seed, "mode": "smoke", **rec}
            for (arm, seed), rec in results.items() if seed == 0]
    status, summary = judge(exp.EXPERIMENT, recs)
    assert status == "report" and summary.startswith("smoke:") and "RN-L mask fraction" in summary
