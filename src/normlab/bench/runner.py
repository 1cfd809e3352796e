"""Runs experiments x arms x lrs x seeds into ``DIR/records.jsonl`` (one flushed line per finished run).

An interrupted run (Ctrl-C, kill) loses no finished run; ``resume=True`` skips the runs already in the
file. Without ``resume`` the experiments being run start afresh (their old lines are dropped; other
experiments' lines stay). ``DIR/verdicts.json`` is rewritten after each experiment.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .experiment import MODES, Experiment, Record, intra_op_threads

RECORDS = "records.jsonl"
VERDICTS = "verdicts.json"


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it is writable before any work starts (``OSError`` naming it otherwise)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output folder {str(path)!r} is not writable: {exc.strerror or exc}") from exc
    return path


def git_sha() -> str:
    """The commit of the normlab checkout, or ``"unknown"`` outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    """One line describing where the numbers come from."""
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def load_records(out: Path) -> list[Record]:
    """All records in ``out/records.jsonl`` (a torn last line from a kill is ignored)."""
    path = Path(out) / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_verdicts(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / VERDICTS
    return json.loads(path.read_text()) if path.exists() else []


def write_verdicts(out: Path, verdicts: Sequence[dict[str, Any]]) -> None:
    """Merge ``verdicts`` into ``out/verdicts.json`` by (experiment, mode), atomically."""
    merged = {(v["experiment"], v["mode"]): v for v in load_verdicts(out)}
    merged.update({(v["experiment"], v["mode"]): v for v in verdicts})
    tmp = Path(out) / (VERDICTS + ".tmp")
    tmp.write_text(json.dumps(sorted(merged.values(), key=lambda v: (v["experiment"], v["mode"])), indent=2))
    tmp.replace(Path(out) / VERDICTS)


def run_key(record: Record) -> tuple:
    return record["experiment"], record["arm"], record["lr"], record["seed"], record["mode"]


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def decode_metrics(record: Record) -> Record:
    """Undo :func:`_finite` for the metrics of a record read back from disk."""
    metrics = {k: float(v) if isinstance(v, str) else v for k, v in record["metrics"].items()}
    return {**record, "metrics": metrics}


def verdict_entry(experiment: Experiment, mode: str, status: str, summary: str, runs: int, expected: int
                  ) -> dict[str, Any]:
    return {"experiment": experiment.id, "slug": experiment.slug, "mode": mode, "status": status,
            "summary": summary, "runs": runs, "expected_runs": expected,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine()}


def judge(experiment: Experiment, records: Sequence[Record]) -> tuple[str, str]:
    """``experiment.verdict`` on its records; an exception in the verdict becomes status ``error``."""
    if not records:
        return "error", "no finished runs"
    try:
        return experiment.verdict([decode_metrics(r) for r in records])
    except Exception as exc:  # a broken verdict must not take the whole report down
        return "error", f"verdict raised {type(exc).__name__}: {exc}"


def run_experiments(experiments: Sequence[Experiment], mode: str, out: str | os.PathLike, *,
                    n_seeds: int | None = None, resume: bool = False, progress: bool = True
                    ) -> list[dict[str, Any]]:
    """Run every grid point of ``mode`` for each experiment; return their verdict entries."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {MODES}")
    if n_seeds is not None and n_seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {n_seeds}")
    out = prepare_out_dir(out)
    existing = load_records(out)
    ids = {e.id for e in experiments}
    if not resume:
        existing = [r for r in existing if r["experiment"] not in ids]
    # Rewritten whole: drops the other runs of a fresh start and the torn last line a kill can leave.
    tmp = out / (RECORDS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in existing))
    tmp.replace(out / RECORDS)
    done = {run_key(r) for r in existing}
    shared = {r["shared_key"]: r for r in existing if r.get("shared_key")}
    plans = []
    for exp in experiments:
        grid = exp.grids[mode]
        seeds = None if n_seeds is None else tuple(range(n_seeds))
        plans.append((exp, grid, grid.points(seeds)))
    total = sum(len(points) for _, _, points in plans)
    sha, version = git_sha(), torch.__version__
    verdicts = []
    with open(out / RECORDS, "a") as sink, tqdm(total=total, disable=not progress, unit="run") as bar:
        for exp, grid, points in plans:
            started, status_override, error, ran = time.perf_counter(), None, "", False
            for arm, lr, seed in points:
                bar.set_description(f"{exp.id} {arm} lr={lr} seed={seed}")
                key = (exp.id, arm, lr, seed, mode)
                if key in done:
                    bar.update()
                    continue
                if ran and time.perf_counter() - started > grid.budget_s:
                    status_override = "timeout"
                    bar.update(len(points) - points.index((arm, lr, seed)))
                    break
                skey = exp.shared_key(arm, lr, seed, mode)
                t0 = time.perf_counter()
                if skey is not None and skey in shared:
                    result = {"metrics": shared[skey]["metrics"], "curves": shared[skey]["curves"]}
                else:
                    torch.manual_seed(seed)
                    try:
                        with intra_op_threads(exp.threads):
                            result = exp.run(arm, lr, seed, mode)
                    except Exception:
                        status_override, error = "error", traceback.format_exc(limit=3).strip().splitlines()[-1]
                        bar.update(len(points) - points.index((arm, lr, seed)))
                        break
                record = {"experiment": exp.id, "slug": exp.slug, "arm": arm, "lr": lr, "seed": seed,
                          "mode": mode, "metrics": _finite(result["metrics"]),
                          "curves": _finite(result.get("curves", {})),
                          "seconds": round(time.perf_counter() - t0, 3), "torch": version, "git_sha": sha,
                          "shared_key": skey}
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                existing.append(record)
                done.add(key)
                ran = True
                if skey is not None:
                    shared[skey] = record
                bar.update()
            mine = [r for r in existing if r["experiment"] == exp.id and r["mode"] == mode]
            status, summary = judge(exp, mine)
            if status_override == "timeout":
                status, summary = "timeout", (f"budget {grid.budget_s:.0f} s spent after {len(mine)} of "
                                              f"{len(points)} runs; partial: {summary}")
            elif status_override == "error":
                status, summary = "error", f"run failed: {error}"
            entry = verdict_entry(exp, mode, status, summary, len(mine), len(points))
            verdicts.append(entry)
            write_verdicts(out, [entry])
    return verdicts
