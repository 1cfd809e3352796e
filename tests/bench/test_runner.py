"""The runner and report: records, resume, interruption, budgets, errors, shared runs, rebuilt reports."""

import dataclasses
import json
import math

import pytest
import torch

from normlab.bench import experiment as experiment_module
from normlab.bench.experiment import Experiment, Grid, best_lr, records_by_arm
from normlab.bench.report import build_report
from normlab.bench.runner import load_records, run_experiments


def mean_verdict(records):
    means = {arm: sum(v) / len(v) for (arm, _), v in records_by_arm(records, "loss").items()}
    status = "pass" if means["method"] < means["baseline"] else "fail"
    return status, f"method {means['method']:.3f} vs baseline {means['baseline']:.3f}"


def make_experiment(exp_id="toy", calls=None, budget=60.0, run=None, shared_key=None, **kw):
    calls = [] if calls is None else calls

    def default_run(arm, lr, seed, mode):
        calls.append((arm, lr, seed))
        loss = (0.5 if arm == "method" else 1.0) + 0.01 * seed + lr
        return {"metrics": {"loss": loss}, "curves": {"train_loss": [[0, 2.0], [1, loss]]}}

    grid = Grid(arms=("baseline", "method"), lrs=(0.1, 0.01), seeds=(0, 1), budget_s=budget)
    extra = {"shared_key": shared_key} if shared_key else {}
    return Experiment(id=exp_id, claim="method has lower loss", baseline="baseline arm", metric="loss of the toy",
                      primary_metric="loss", pass_rule="mean loss lower", grids={"full": grid, "quick": grid, "smoke": grid},
                      run=run or default_run, verdict=kw.get("verdict", mean_verdict), **extra)


def test_records_one_line_per_run_and_verdicts(tmp_path):
    calls = []
    exp = make_experiment(calls=calls)
    verdicts = run_experiments([exp], "full", tmp_path, progress=False)
    records = load_records(tmp_path)
    assert len(records) == len(calls) == 8
    assert {(r["arm"], r["lr"], r["seed"]) for r in records} == set(calls)
    assert all(r["mode"] == "full" and r["torch"] and r["git_sha"] and r["seconds"] >= 0 for r in records)
    assert verdicts[0]["status"] == "pass" and verdicts[0]["runs"] == 8
    on_disk = json.loads((tmp_path / "verdicts.json").read_text())
    assert on_disk[0]["experiment"] == "toy" and on_disk[0]["status"] == "pass"


def test_resume_skips_finished_runs_and_rerun_starts_afresh(tmp_path):
    run_experiments([make_experiment()], "full", tmp_path, progress=False)
    calls = []
    run_experiments([make_experiment(calls=calls)], "full", tmp_path, resume=True, progress=False)
    assert calls == []
    run_experiments([make_experiment(calls=calls)], "full", tmp_path, progress=False)
    assert len(calls) == 8 and len(load_records(tmp_path)) == 8


def test_interrupted_run_keeps_finished_lines_then_resumes(tmp_path):
    calls = []

    def flaky(arm, lr, seed, mode):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((arm, lr, seed))
        return {"metrics": {"loss": 1.0 if arm == "baseline" else 0.5}}

    with pytest.raises(KeyboardInterrupt):
        run_experiments([make_experiment(run=flaky)], "full", tmp_path, progress=False)
    assert len(load_records(tmp_path)) == 3
    later = []
    run_experiments([make_experiment(calls=later)], "full", tmp_path, resume=True, progress=False)
    assert len(later) == 5 and not set(later) & set(calls)
    assert len(load_records(tmp_path)) == 8


def test_budget_exceeded_gives_timeout_and_keeps_runs(tmp_path):
    verdicts = run_experiments([make_experiment(budget=0.0)], "full", tmp_path, progress=False)
    assert verdicts[0]["status"] == "timeout"
    assert len(load_records(tmp_path)) == 1


def test_failing_run_gives_error(tmp_path):
    def broken(arm, lr, seed, mode):
        raise RuntimeError("diverged badly")

    verdicts = run_experiments([make_experiment(run=broken)], "full", tmp_path, progress=False)
    assert verdicts[0]["status"] == "error" and "diverged badly" in verdicts[0]["summary"]


def test_seeds_override(tmp_path):
    calls = []
    run_experiments([make_experiment(calls=calls)], "quick", tmp_path, n_seeds=3, progress=False)
    assert sorted({s for _, _, s in calls}) == [0, 1, 2]
    with pytest.raises(ValueError, match="--seeds"):
        run_experiments([make_experiment()], "quick", tmp_path, n_seeds=0, progress=False)


def test_shared_runs_are_computed_once(tmp_path):
    calls = []

    def key(arm, lr, seed, mode):
        return f"baseline/{lr}/{seed}/{mode}" if arm == "baseline" else None

    a = make_experiment("toy.a", calls=calls, shared_key=key)
    b = make_experiment("toy.b", calls=calls, shared_key=key)
    run_experiments([a, b], "full", tmp_path, progress=False)
    assert sum(1 for arm, _, _ in calls if arm == "baseline") == 4
    assert len(load_records(tmp_path)) == 16


def test_unwritable_out_fails_before_any_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    calls = []
    with pytest.raises(OSError, match="not writable"):
        run_experiments([make_experiment(calls=calls)], "full", blocker / "out", progress=False)
    assert calls == []


def test_non_finite_metrics_round_trip(tmp_path):
    def nan_run(arm, lr, seed, mode):
        return {"metrics": {"loss": math.nan if arm == "method" else 1.0}}

    def verdict(records):
        values = records_by_arm(records, "loss")
        assert any(math.isnan(v) for vals in values.values() for v in vals)
        lr, _ = best_lr(records, "method", "loss")
        return "fail", f"method diverged at every lr (best {lr})"

    verdicts = run_experiments([make_experiment(run=nan_run, verdict=verdict)], "full", tmp_path, progress=False)
    assert verdicts[0]["status"] == "fail"


def test_best_lr_picks_lowest_seed_mean():
    records = [{"arm": "a", "lr": lr, "seed": s, "metrics": {"m": v}}
               for lr, s, v in [(0.1, 0, 3.0), (0.1, 1, 1.0), (0.01, 0, 2.1), (0.01, 1, 2.1), (1.0, 0, math.nan)]]
    assert best_lr(records, "a", "m") == (0.1, [3.0, 1.0])
    assert best_lr(records, "a", "m", lower_is_better=False)[0] == 0.01
    with pytest.raises(ValueError, match="no records"):
        best_lr(records, "b", "m")


def test_report_rebuilds_from_records(tmp_path, monkeypatch):
    exp = make_experiment("toy")
    monkeypatch.setitem(experiment_module._REGISTRY, "toy", exp)
    run_experiments([exp], "quick", tmp_path, progress=False)
    (tmp_path / "verdicts.json").unlink()
    verdicts = build_report(tmp_path)
    assert verdicts[0]["status"] == "pass"
    report = (tmp_path / "report.md").read_text()
    assert "## toy — pass (indicative: quick mode)" in report
    assert "| method | 0.1 | 2 |" in report and "**Pass rule.** mean loss lower" in report
    assert (tmp_path / "plots" / "toy.loss.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "toy.train_loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "verdicts.json").read_text())[0]["status"] == "pass"


def test_report_keeps_runner_timeout(tmp_path, monkeypatch):
    exp = make_experiment("toy", budget=0.0)
    monkeypatch.setitem(experiment_module._REGISTRY, "toy", exp)
    run_experiments([exp], "full", tmp_path, progress=False)
    verdicts = build_report(tmp_path)
    assert verdicts[0]["status"] == "timeout"


def test_report_on_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        build_report(tmp_path)


def test_experiment_needs_every_mode():
    grid = Grid(("a",), (None,), (0,), 1.0)
    with pytest.raises(ValueError, match="modes"):
        Experiment(id="x", claim="", baseline="", metric="m", primary_metric="m", pass_rule="", grids={"full": grid},
                   run=lambda *a: {}, verdict=lambda r: ("pass", ""))


def test_torn_last_line_from_a_kill_is_dropped_on_resume(tmp_path):
    run_experiments([make_experiment()], "full", tmp_path, progress=False)
    lines = (tmp_path / "records.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "records.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    calls = []
    run_experiments([make_experiment(calls=calls)], "full", tmp_path, resume=True, progress=False)
    assert len(calls) == 5
    assert len(load_records(tmp_path)) == 8


@pytest.mark.parametrize("threads", [1, 2])
def test_each_run_gets_the_experiments_thread_count_and_the_caller_keeps_its_own(tmp_path, threads):
    seen = []

    def run(arm, lr, seed, mode):
        seen.append(torch.get_num_threads())
        return {"metrics": {"loss": 1.0 if arm == "baseline" else 0.5}}

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        exp = dataclasses.replace(make_experiment(run=run), threads=threads)
        run_experiments([exp], "full", tmp_path, progress=False)
        assert seen == [threads] * 8 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_report_shows_an_experiments_own_figures(tmp_path, monkeypatch):
    def figures(records, plots):
        assert {rec["arm"] for rec in records} == {"baseline", "method"}
        (plots / "toy.map.png").write_bytes(b"png")
        return ["toy.map.png"]

    exp = dataclasses.replace(make_experiment("toy"), figures=figures)
    monkeypatch.setitem(experiment_module._REGISTRY, "toy", exp)
    run_experiments([exp], "quick", tmp_path, progress=False)
    build_report(tmp_path)
    assert "![toy.map.png](plots/toy.map.png)" in (tmp_path / "report.md").read_text()
