import math

import pytest
import torch

from normlab.bench.experiment import all_experiments
from normlab.bench.experiments import nalaformer as exp
from normlab.bench.runner import judge, run_experiments


def test_registered_with_the_sheet_protocol():
    registry = all_experiments()
    assert registry["nalaformer.norm_awareness"] is exp.NORM_AWARENESS
    assert registry["nalaformer.recall"] is exp.RECALL and registry["nalaformer.scaling"] is exp.SCALING
    assert exp.QUERY_NORMS == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0) and (exp.N_QUERIES, exp.N_KEYS, exp.HEAD_DIM) == \
        (64, 256, 16)
    assert exp.RECALL.grids["full"].lrs == (3e-3,) and exp.RECALL_SIZES["full"] == {"steps": 3000, "test": 2000}
    assert (exp.N_PAIRS, exp.D_MODEL, exp.N_LAYERS, exp.N_HEADS, exp.BATCH) == (4, 64, 2, 4, 64)
    full = exp.SCALING_SIZES["full"]
    assert full["lengths"][0] == 512 and full["lengths"][-1] == 8192 and full["long"] == 65536
    for size in exp.SCALING_SIZES.values():  # the growth ratio t(4N)/t(N) needs both lengths
        assert size["lengths"][-1] // 4 in size["lengths"]


def records(exp_id, arm_metrics, mode="full"):
    return [{"experiment": exp_id, "arm": arm, "lr": None, "seed": seed, "mode": mode, "metrics": metrics}
            for arm, per_seed in arm_metrics.items() for seed, metrics in enumerate(per_seed)]


# ---- norm awareness ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def norm_records():
    return [{"experiment": exp.NORM_AWARENESS.id, "arm": arm, "lr": None, "seed": 0, "mode": "quick",
             **exp.run_norm_awareness(arm, None, 0, "quick")} for arm in exp.NORM_ARMS]


def test_implied_attention_rows_sum_to_one_and_softmax_is_torchs():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 16, generator=gen, dtype=torch.float64), torch.randn(9, 16, generator=gen,
                                                                                 dtype=torch.float64)
    for arm in exp.NORM_ARMS:
        a = exp.implied_attention(arm, q, k)
        assert a.shape == (5, 9) and (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(exp.implied_attention("softmax", q, k), torch.softmax(q @ k.T, -1))
    uniform = torch.full((3, 8), 1 / 8, dtype=torch.float64)
    assert exp.mean_row_entropy(uniform) == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match="unknown arm"):
        exp.implied_attention("cosformer", q, k)


def test_norm_awareness_runs_reproduce_the_sheet_table(norm_records):
    by_arm = {r["arm"]: r for r in norm_records}
    curve = by_arm["nala"]["curves"]["entropy_vs_query_norm"]
    assert [a for a, _ in curve] == list(exp.QUERY_NORMS)
    # the sheet's measured table (one draw): NaLa 4.887 -> 4.499, softmax 5.513 -> 0.755, relu constant 5.315
    nala = by_arm["nala"]["metrics"]
    assert nala["entropy_a0.25"] == pytest.approx(4.887, abs=0.1) and nala["entropy_a8"] == pytest.approx(4.499,
                                                                                                           abs=0.1)
    assert by_arm["softmax"]["metrics"]["entropy_a8"] == pytest.approx(0.755, abs=0.2)
    assert by_arm["relu_linear"]["metrics"]["entropy_a1"] == pytest.approx(5.315, abs=0.05)
    status, summary = exp.verdict_norm_awareness(norm_records)
    assert status == "pass" and summary.startswith("indicative") and "yes" in summary


def test_norm_awareness_verdict_fails_when_nala_is_not_monotone_or_relu_varies(norm_records):
    def modified(arm, **changes):
        recs = [dict(r, mode="full", metrics=dict(r["metrics"])) for r in norm_records]
        next(r for r in recs if r["arm"] == arm)["metrics"].update(changes)
        return recs

    assert exp.verdict_norm_awareness(modified("nala"))[0] == "pass"
    assert exp.verdict_norm_awareness(modified("nala", **{"entropy_a8": 4.7}))[0] == "fail"  # up after a=4
    assert exp.verdict_norm_awareness(modified("nala", entropy_drop=0.2))[0] == "fail"
    assert exp.verdict_norm_awareness(modified("relu_linear", entropy_range=1e-9))[0] == "fail"
    smoke = [dict(r, mode="smoke") for r in norm_records]
    assert exp.verdict_norm_awareness(smoke)[0] == "report"
    assert judge(exp.NORM_AWARENESS, norm_records[:2])[0] == "error"  # arms missing


# ---- recall -----------------------------------------------------------------------------------------------

def test_recall_batches_are_well_formed():
    x, y = exp.recall_batch(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 2 * exp.N_PAIRS + 1) and y.shape == (256,)
    keys, values, query = x[:, 0:-1:2], x[:, 1:-1:2], x[:, -1]
    assert (keys < 16).all() and (values >= 16).all() and (values < 32).all()
    assert all(len(set(row.tolist())) == exp.N_PAIRS for row in keys)  # distinct keys
    assert all(len(set(row.tolist())) == exp.N_PAIRS for row in values)
    position = (keys == query[:, None]).float().argmax(-1)
    assert ((keys == query[:, None]).sum(-1) == 1).all()
    assert torch.equal(values[torch.arange(256), position] - 16, y)


def test_recall_arms_start_from_the_same_weights_and_differ_only_in_the_kernel():
    models = {arm: exp.recall_model(arm, 3) for arm in exp.RECALL_ARMS}
    states = [m.state_dict() for m in models.values()]
    for name in states[0]:
        assert all(torch.equal(states[0][name], s[name]) for s in states[1:])
    x, _ = exp.recall_batch(4, torch.Generator().manual_seed(1))
    outs = {arm: m(x) for arm, m in models.items()}
    assert not torch.allclose(outs["softmax"], outs["nala"])
    with pytest.raises(ValueError, match="unknown arm"):
        exp.KernelAttention(8, 2, "relu")


def test_recall_smoke_runs_and_report_verdict():
    recs = [{"experiment": exp.RECALL.id, "arm": arm, "lr": exp.LR, "seed": 0, "mode": "smoke",
             **exp.run_recall(arm, exp.LR, 0, "smoke")} for arm in exp.RECALL_ARMS]
    for rec in recs:
        m = rec["metrics"]
        assert 0 <= m["test_acc"] <= 1 and math.isfinite(m["final_loss"])
        assert abs(rec["curves"]["train_loss"][0][1] - math.log(16)) < 0.5  # starts near a uniform guess
    status, summary = exp.verdict_recall(recs)
    assert status == "report" and summary.startswith("smoke") and "ln 16" in summary


def test_recall_verdict_shows_the_sheet_criteria():
    metrics = {"softmax": [{"test_acc": 0.33, "final_loss": 1.9}], "nala": [{"test_acc": 0.34, "final_loss": 1.8}],
               "elu_linear": [{"test_acc": 0.33, "final_loss": 1.9}]}
    status, summary = exp.verdict_recall(records(exp.RECALL.id, metrics))
    assert status == "report" and "ln 16 = 2.77: yes" in summary and "within 3 points of elu+1: yes" in summary
    metrics["nala"] = [{"test_acc": 0.25, "final_loss": 2.9}]
    summary = exp.verdict_recall(records(exp.RECALL.id, metrics))[1]
    assert "2.77: no" in summary and "elu+1: no" in summary


# ---- scaling ----------------------------------------------------------------------------------------------

def test_peak_memory_sees_an_n_by_n_tensor():
    n = 1024
    q, k, v = exp.attention_inputs(n, 0)
    scores_mib = exp.HEADS * n * n * 4 / 2**20  # one (4, N, N) float32 score matrix
    with torch.no_grad():
        quadratic = exp.peak_mib(lambda: torch.softmax(q @ k.transpose(-2, -1), -1) @ v)
        linear = exp.peak_mib(lambda: exp.nala_attention(q, k, v))
    assert quadratic >= scores_mib
    assert 0 < linear < scores_mib


def test_scaling_smoke_through_the_runner(tmp_path):
    exp.measure_scaling.cache_clear()
    (entry,) = run_experiments([exp.SCALING], "smoke", tmp_path, progress=False)
    assert entry["status"] == "report", entry
    assert "NaLa at N=512" in entry["summary"] and "output finite: yes" in entry["summary"]
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(exp.SCALING_ARMS)
    recs = [exp.measure_scaling(0, "smoke")[arm] for arm in exp.SCALING_ARMS]
    lengths = exp.SCALING_SIZES["smoke"]["lengths"]
    for rec in recs:
        assert [n for n, _ in rec["curves"]["forward_ms"]] == list(lengths)
        assert all(ms > 0 for _, ms in rec["curves"]["forward_ms"])
        assert all(mib > 0 for _, mib in rec["curves"]["train_peak_mib"])
        assert rec["metrics"]["ratio_4n"] > 0
    assert "long_seconds" in recs[-1]["metrics"]
    with pytest.raises(ValueError, match="unknown arm"):
        exp.run_scaling("flash", None, 0, "smoke")
