import math

import pytest
import torch

from normlab.bench.experiments import adab2n as exp
from normlab.bench.experiment import intra_op_threads
from normlab.bench.runner import judge
from normlab.layers.adab2n import AdaB2N

ADA = [a for a in exp.ARMS if a != "bn"]


def test_registered_with_the_sheet_protocol():
    assert exp.BALANCE.id == "adab2n.balance" and exp.NO_HARM.id == "adab2n.no_harm"
    assert exp.BALANCE.slug == exp.NO_HARM.slug == "adab2n"
    full = exp.BALANCE.grids["full"]
    assert full == exp.NO_HARM.grids["full"]
    assert full.lrs == (0.02, 0.05) and full.seeds == (0, 1, 2, 3, 4)
    assert set(exp.ADA_ARMS.values()) == {(k, lam) for k in (0.1, 0.4, 1.0) for lam in (0.1, 1.0)}
    assert full.arms[0] == "bn" and len(full.points()) == 70
    assert (exp.BUFFER_SIZE, exp.CURRENT, exp.REPLAY, exp.ADA_T0, exp.NUM_TASKS) == (200, 10, 10, 1, 5)
    for mode in ("quick", "smoke"):
        assert {"bn", "adab2n_k0.1_l1", "adab2n_k1_l1"} == set(exp.BALANCE.grids[mode].arms)
    assert exp.BALANCE.shared_key("bn", 0.02, 3, "full") == exp.NO_HARM.shared_key("bn", 0.02, 3, "full")
    assert exp.BALANCE.shared_key("bn", 0.02, 3, "full") != exp.BALANCE.shared_key("bn", 0.05, 3, "full")


def test_stream_split_and_tasks():
    x_train, y_train, x_test, y_test = exp._data()
    assert len(y_train) == 1257 and len(y_test) == 540
    orders = exp.task_orders(y_train, torch.Generator().manual_seed(0))
    assert sum(len(o) for o in orders) == 1257
    assert sorted(torch.cat(orders).tolist()) == list(range(1257))  # every image once
    for task, order in enumerate(orders):
        assert set((y_train[order] // 2).tolist()) == {task}
    other = exp.task_orders(y_train, torch.Generator().manual_seed(1))
    assert not torch.equal(orders[0], other[0]) and torch.equal(orders[0].sort().values, other[0].sort().values)


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    gen = torch.Generator().manual_seed(0)
    res = exp.Reservoir(50, gen)
    stream = torch.arange(1000)
    for start in range(0, 1000, 10):
        res.add(stream[start:start + 10, None].float(), stream[start:start + 10])
    assert len(res) == 50 and res.seen == 1000
    kept = res.y.tolist()
    assert len(set(kept)) == 50 and torch.equal(res.x[:, 0].long(), res.y)
    assert 300 < sum(kept) / 50 < 700  # drawn from the whole stream, not its start or end
    x, y = res.sample(10)
    assert len(set(y.tolist())) == 10 and set(y.tolist()) <= set(kept)  # without replacement
    small = exp.Reservoir(50, gen)
    small.add(stream[:4, None].float(), stream[:4])
    assert small.sample(10)[1].sort().values.tolist() == [0, 1, 2, 3]


def test_build_model_converts_every_batchnorm():
    torch.manual_seed(0)
    bn_model = exp.build_model("bn")
    torch.manual_seed(0)
    ada_model = exp.build_model("adab2n_k0.4_l1")
    norms = [m for m in ada_model.modules() if isinstance(m, AdaB2N)]
    assert len(norms) == 3 and all(m.kappa == 0.4 and m.num_tasks == 5 for m in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ada_model.modules())
    ada_params = dict(ada_model.named_parameters())
    for name, p in bn_model.named_parameters():
        assert torch.equal(p, ada_params[name]), name  # the same init in both arms
    with pytest.raises(ValueError, match="unknown arm"):
        exp.build_model("gn")


def test_balance_distance_is_zero_for_the_all_data_mean():
    torch.manual_seed(0)
    model = exp.build_model("bn")
    x = exp._data()[0]
    with torch.no_grad():
        model.features[1][0].running_mean.copy_(model.features[0](x).mean((0, 2, 3)))
    assert exp.balance_distance(model, x) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.features[1][0].running_mean.add_(torch.tensor([0.3, 0.4] + [0.0] * 30))
    assert exp.balance_distance(model, x) == pytest.approx(0.5, abs=1e-5)


@pytest.fixture(scope="module")
def smoke_records():
    records = []
    for arm in exp.BALANCE.grids["smoke"].arms:
        torch.manual_seed(0)
        with intra_op_threads(1):  # as the runner runs them (2 threads on 2 busy cores are up to 8x slower)
            result = exp.run(arm, 0.02, 0, "smoke")
        records.append({"experiment": "adab2n.balance", "arm": arm, "lr": 0.02, "seed": 0, "mode": "smoke",
                        "metrics": result["metrics"], "curves": result["curves"]})
    return records


def test_smoke_runs_and_verdicts(smoke_records):
    for rec in smoke_records:
        metrics = rec["metrics"]
        assert set(metrics) == {"avg_acc", "balance_distance"} | {f"acc_task{j}" for j in range(5)}
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics["avg_acc"] == pytest.approx(sum(metrics[f"acc_task{j}"] for j in range(5)) / 5)
        assert len(rec["curves"]["train_loss"]) == 5 * exp.SMOKE_PER_TASK // exp.CURRENT
        assert [s for s, _ in rec["curves"]["avg_acc_seen_tasks"]] == [1, 2, 3, 4, 5]
    for experiment in (exp.BALANCE, exp.NO_HARM):
        status, summary = judge(experiment, smoke_records)
        assert status == "report" and summary.startswith("smoke"), summary


def test_arms_of_a_seed_share_stream_and_init(monkeypatch):
    """Both arms see the same batches (recorded at the model's input) and start from the same weights."""
    seen = {}
    original = exp.build_model

    def recording(arm):
        model = original(arm)
        seen[arm] = {"init": [p.detach().clone() for p in model.parameters()][:2], "batches": []}
        model.register_forward_pre_hook(lambda m, args: seen[arm]["batches"].append(args[0].clone())
                                        if m.training else None)
        return model

    monkeypatch.setattr(exp, "build_model", recording)
    monkeypatch.setattr(exp, "SMOKE_PER_TASK", 12)
    for arm in ("bn", "adab2n_k0.1_l0.1"):
        torch.manual_seed(0)
        with intra_op_threads(1):
            exp.run(arm, 0.02, 0, "smoke")
    a, b = seen["bn"], seen["adab2n_k0.1_l0.1"]
    assert all(torch.equal(p, q) for p, q in zip(a["init"], b["init"]))
    assert len(a["batches"]) == len(b["batches"]) == 10  # 12 per task: a step of 10 and one of 2
    assert all(torch.equal(p, q) for p, q in zip(a["batches"], b["batches"]))
    assert [len(x) for x in a["batches"][:3]] == [10, 2 + 10, 10 + 10]  # replay from the second step on


def records(values, mode="full"):
    """``values``: {(arm, lr): [(avg_acc, balance_distance) per seed]}; arms missing get low accuracy."""
    out = []
    for (arm, lr), per_seed in values.items():
        for seed, (acc, dist) in enumerate(per_seed):
            out.append({"experiment": "adab2n.balance", "arm": arm, "lr": lr, "seed": seed, "mode": mode,
                        "metrics": {"avg_acc": acc, "balance_distance": dist}})
    return out


def full_grid(best_arm, best_lr, long_dist, ema_dist, bn_acc=(0.84,) * 5, best_acc=(0.85,) * 5):
    values = {}
    for arm in exp.ARMS:
        for lr in exp.LRS:
            values[(arm, lr)] = [(0.7, 0.05)] * 5
    values[("bn", 0.02)] = [(a, 0.01) for a in bn_acc]
    _, lambd = exp.ADA_ARMS[best_arm]
    values[(best_arm, best_lr)] = [(a, 0.02) for a in best_acc]
    long_arm, ema_arm = exp.arm_name(0.1, lambd), exp.arm_name(1.0, lambd)
    for arm, dists in ((long_arm, long_dist), (ema_arm, ema_dist)):
        accs = best_acc if arm == best_arm else [0.75] * 5
        values[(arm, best_lr)] = [(a, d) for a, d in zip(accs, dists)]
    return records(values)


def test_balance_passes_with_4_of_5_seeds_at_the_best_configuration():
    recs = full_grid("adab2n_k0.4_l0.1", 0.05, [0.01, 0.01, 0.01, 0.01, 0.03], [0.02] * 5)
    status, summary = exp.balance_verdict(recs)
    assert status == "pass", summary
    assert "best AdaB2N config adab2n_k0.4_l0.1 at lr 0.05" in summary and "4 of 5" in summary


def test_balance_fails_with_3_of_5_or_the_sheet_outcome():
    recs = full_grid("adab2n_k1_l1", 0.02, [0.01, 0.01, 0.01, 0.03, 0.03], [0.02] * 5)
    status, summary = exp.balance_verdict(recs)
    assert status == "fail" and "3 of 5" in summary
    sheet = full_grid("adab2n_k0.1_l1", 0.02, [0.032] * 5, [0.014] * 5)  # larger in 5 of 5
    status, summary = exp.balance_verdict(sheet)
    assert status == "fail" and "0 of 5" in summary and "lambd 1" in summary


def test_balance_uses_the_lambda_and_lr_of_the_best_configuration():
    recs = full_grid("adab2n_k1_l0.1", 0.05, [0.01] * 5, [0.02] * 5)
    # at lambda 1 / lr 0.02 kappa=0.1 loses everywhere: must not be read
    for rec in recs:
        if rec["lr"] == 0.02 and rec["arm"] == "adab2n_k0.1_l1":
            rec["metrics"]["balance_distance"] = 1.0
    assert exp.balance_verdict(recs)[0] == "pass"


def test_no_harm_reports_paired_gap_and_standard_error():
    recs = full_grid("adab2n_k0.4_l1", 0.02, [0.01] * 5, [0.02] * 5, bn_acc=[0.84, 0.85, 0.86, 0.83, 0.84],
                     best_acc=[0.842, 0.845, 0.823, 0.847, 0.842])
    status, summary = exp.no_harm_verdict(recs)
    gaps = [0.2, -0.5, -3.7, 1.7, 0.2]
    se = (sum((g - sum(gaps) / 5) ** 2 for g in gaps) / 4) ** 0.5 / 5 ** 0.5
    assert status == "report"
    assert "gap -0.4 points" in summary and "+0.2, -0.5, -3.7, +1.7, +0.2" in summary
    assert f"standard error {se:.1f}" in summary and "best BN lr 0.02" in summary


def test_quick_is_report_only_and_missing_arms_error():
    values = {("bn", 0.02): [(0.85, 0.01)] * 3, ("adab2n_k0.1_l1", 0.02): [(0.84, 0.01)] * 3,
              ("adab2n_k1_l1", 0.02): [(0.83, 0.02)] * 3}
    status, summary = exp.balance_verdict(records(values, "quick"))
    assert status == "report" and "indicative" in summary and "3 of 3" in summary
    assert exp.no_harm_verdict(records(values, "quick"))[0] == "report"
    del values[("adab2n_k1_l1", 0.02)]
    status, summary = judge(exp.BALANCE, records(values, "quick"))
    assert status == "error" and "adab2n_k1_l1" in summary
    assert judge(exp.NO_HARM, [])[0] == "error"
