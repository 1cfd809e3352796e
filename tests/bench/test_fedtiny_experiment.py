import math

import pytest
import torch

from normlab.bench.experiment import intra_op_threads
from normlab.bench.experiments import fedtiny as exp
from normlab.bench.runner import judge
from normlab.training.fedtiny import prunable_weights


def test_registered_with_the_sheet_protocol():
    assert exp.GATE.id == "fedtiny" and exp.REPORT.id == "fedtiny.report" and exp.REPORT.slug == "fedtiny"
    assert exp.GATE.grids["full"].arms == ("fedtiny", "magnitude", "dense")
    assert exp.REPORT.grids["full"].arms == ("fedtiny", "random_candidate", "spearman")
    assert exp.REPORT.grids["quick"].arms == ("fedtiny", "random_candidate")
    assert exp.GATE.grids["quick"].arms == ("fedtiny", "magnitude")
    for e in (exp.GATE, exp.REPORT):
        assert e.grids["full"].seeds == (0, 1, 2, 3, 4) and e.grids["quick"].seeds == (0,)
        assert e.grids["full"].lrs == (0.05,) and e.grids["full"].budget_s <= 1200
        assert e.shared_key("fedtiny", 0.05, 2, "full") == exp.GATE.shared_key("fedtiny", 0.05, 2, "full")
    assert exp.PROTOCOL["full"] == {"rounds": 40, "num_candidates": 10, "delta_rounds": 5}
    assert exp.PROTOCOL["quick"] == exp.PROTOCOL["full"]
    assert exp.DENSITY == 0.05 and exp.BATCH == 32 and exp.LR == 0.05


def test_federated_split_and_model():
    clients, (xt, yt) = exp.federated_digits(0)
    assert len(clients) == 10 and min(len(y) for _, y in clients) >= 10
    assert len(yt) == round(0.25 * 1797) and sum(len(y) for _, y in clients) + len(yt) == 1797
    assert xt.shape[1:] == (1, 8, 8) and 0 <= float(xt.min()) and float(xt.max()) <= 1
    # non-IID: the clients' label histograms differ a lot
    hist = torch.stack([torch.bincount(y, minlength=10).double() / len(y) for _, y in clients])
    assert float((hist - hist.mean(0)).abs().max()) > 0.2
    assert not torch.equal(exp.federated_digits(1)[1][1], yt)
    model = exp.digits_cnn()
    assert model(xt[:2]).shape == (2, 10)
    assert sum(w.numel() for w in prunable_weights(model).values()) == 6032


@pytest.fixture(scope="module")
def smoke():
    with intra_op_threads(1):
        return {arm: exp.run(arm, 0.05, 0, "smoke") for arm in exp.ARMS}


def test_smoke_runs(smoke):
    rounds = exp.PROTOCOL["smoke"]["rounds"]
    for arm, rec in smoke.items():
        if arm == "spearman":
            continue
        assert [t for t, _ in rec["curves"]["test_acc"]] == list(range(1, rounds + 1))
        assert 0 <= rec["metrics"]["test_acc"] <= 100 and rec["metrics"]["bytes"] > 0
    m = smoke["fedtiny"]["metrics"]
    assert m["selected_is_min"] == 1.0 and m["selected_loss"] == m["min_candidate_loss"]
    assert m["mask_changes"] == 1.0 and smoke["magnitude"]["metrics"]["mask_changes"] == 0.0
    assert smoke["random_candidate"]["metrics"]["selected"] == exp.random_candidate(0, 3)
    assert smoke["dense"]["metrics"]["bytes"] > 5 * smoke["fedtiny"]["metrics"]["bytes"]
    assert smoke["fedtiny"]["metrics"]["bytes"] > smoke["magnitude"]["metrics"]["bytes"]
    status, summary = exp.verdict([{"arm": a, "lr": 0.05, "seed": 0, "mode": "smoke", "metrics": smoke[a]["metrics"]}
                                   for a in ("fedtiny", "magnitude")])
    assert status == "report" and summary.startswith("smoke")


def test_smoke_spearman(smoke):
    m, curves = smoke["spearman"]["metrics"], smoke["spearman"]["curves"]
    assert len(curves["candidate_acc_fixed_mask"]) == 3
    # stale BN of a fresh init (mean 0, var 1) gives near-chance losses
    assert 2.0 < m["loss_stale_min"] <= m["loss_stale_max"] < 2.6
    assert m["loss_reestimated_min"] == min(v for _, v in curves["candidate_loss_reestimated"])


def test_spearman_by_hand():
    """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) without ties; average ranks with them; NaN for a constant side."""
    assert exp.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert exp.spearman([3.0, 2.0, 1.0], [0.1, 0.2, 0.3]) == pytest.approx(-1.0)
    # ties: ranks (1.5, 1.5, 3) vs (1, 2, 3), then the Pearson correlation of the ranks
    ra, rb = torch.tensor([1.5, 1.5, 3.0]), torch.tensor([1.0, 2.0, 3.0])
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    assert exp.spearman([5.0, 5.0, 7.0], [1.0, 2.0, 3.0]) == pytest.approx(expected)
    assert math.isnan(exp.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_unknown_arm_raises():
    with pytest.raises(ValueError, match="unknown arm 'adam'"):
        exp.run("adam", 0.05, 0, "smoke")


def rec(arm, seed, acc, mb, mode="full", selected_is_min=1.0, selected=3):
    metrics = {"test_acc": acc, "bytes_mb": mb, "selected": float(selected)}
    if arm == "fedtiny":
        metrics["selected_is_min"] = selected_is_min
    return {"experiment": "fedtiny", "arm": arm, "lr": 0.05, "seed": seed, "mode": mode, "metrics": metrics}


def gate_records(fed, mag, dense, fed_mb=1.98, mag_mb=1.62, dense_mb=19.95, sel=None, mode="full"):
    sel = sel or [1.0] * len(fed)
    return ([rec("fedtiny", s, a, fed_mb, mode, sel[s]) for s, a in enumerate(fed)]
            + [rec("magnitude", s, a, mag_mb, mode) for s, a in enumerate(mag)]
            + [rec("dense", s, a, dense_mb, mode) for s, a in enumerate(dense)])


SHEET_FED = [75.0, 70.4, 72.0, 80.2, 80.0]        # the sheet's per-seed gaps +7.6, +5.6, +5.8, +13.6, +20.5
SHEET_MAG = [67.4, 64.8, 66.2, 66.6, 59.5]
DENSE = [98.1, 98.3, 97.9, 98.0, 98.4]


def test_verdict_passes_on_the_sheet_numbers():
    status, summary = exp.verdict(gate_records(SHEET_FED, SHEET_MAG, DENSE))
    assert status == "pass", summary
    assert "mean +10.6" in summary and "wins 5/5" in summary and "(i)/(iv) 0.099" in summary
    assert "(i)/(ii) 1.22" in summary


@pytest.mark.parametrize("change", ["gap", "wins", "dense_bytes", "mag_bytes", "dense_acc", "selection"])
def test_verdict_fails_on_each_rule(change):
    fed, mag, dense = list(SHEET_FED), list(SHEET_MAG), list(DENSE)
    kw = {}
    if change == "gap":
        fed = [m + 2.0 for m in mag]                        # wins 5/5 but mean +2.0
    elif change == "wins":
        fed = [m + d for m, d in zip(mag, [20.0, 20.0, 20.0, -1.0, -1.0])]
    elif change == "dense_bytes":
        kw["dense_mb"] = 10.0
    elif change == "mag_bytes":
        kw["mag_mb"] = 1.2
    elif change == "dense_acc":
        dense = [94.0] * 5
    else:
        kw["sel"] = [1.0, 1.0, 0.0, 1.0, 1.0]
    status, summary = exp.verdict(gate_records(fed, mag, dense, **kw))
    assert status == "fail", summary


def test_quick_verdict_is_indicative():
    records = gate_records([75.1], [67.5], [], mode="quick")
    status, summary = exp.verdict(records)
    assert status == "report" and "indicative" in summary and "+7.6" in summary


def test_report_verdict():
    records = [rec("fedtiny", s, a, 1.98) for s, a in enumerate([75.0, 60.0])] + \
              [rec("random_candidate", s, a, 1.66, selected=s + 4) for s, a in enumerate([70.0, 65.0])]
    spear = [{"experiment": "fedtiny.report", "arm": "spearman", "lr": 0.05, "seed": s, "mode": "full",
              "metrics": {"rho_reestimated": r, "rho_stale": t, "loss_reestimated_min": 2.29,
                          "loss_reestimated_max": 2.46, "loss_stale_min": 2.303, "loss_stale_max": 2.306}}
             for s, (r, t) in enumerate([(0.3, 0.1), (-0.1, 0.2)])]
    status, summary = exp.verdict_report(records + spear)
    assert status == "report" and "+5.0, -5.0" in summary and "candidates [4, 5]" in summary
    assert "re-estimated higher in 1/2 seeds" in summary and "(mean +0.10)" in summary
    status, summary = judge(exp.REPORT, records)
    assert status == "error" and "spearman" in summary


def test_missing_arm_is_an_error():
    status, summary = judge(exp.GATE, gate_records([75.0], [65.0], []))
    assert status == "error" and "dense" in summary
