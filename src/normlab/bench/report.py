"""``report.md`` and ``plots/*.png`` rebuilt from ``records.jsonl``, with the verdicts recomputed.

Per experiment: the claim, the baseline, every metric per (arm, lr) as mean +- std over seeds, the
pass rule and the verdict (quick-mode verdicts are marked indicative), a bar plot of the primary metric
and, where runs recorded curves, the curves per arm with the seed spread (min-max band).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .experiment import Experiment, Record, all_experiments
from .runner import (decode_metrics, judge, load_records, load_verdicts, machine, prepare_out_dir,
                     verdict_entry, write_verdicts)

RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "full"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def metric_table(records: Sequence[Record]) -> str:
    """Markdown table: one row per (arm, lr), one column per metric, ``mean +- std (n)``."""
    groups: dict[tuple[str, Any], list[Record]] = {}
    for rec in records:
        groups.setdefault((rec["arm"], rec["lr"]), []).append(rec)
    names = sorted({k for rec in records for k in rec["metrics"]})
    lines = ["| arm | lr | seeds | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for (arm, lr), recs in groups.items():
        cells = []
        for name in names:
            values = [r["metrics"][name] for r in recs if name in r["metrics"]]
            if values:
                mean, std = mean_std(values)
                cells.append(f"{_fmt(mean)} ± {_fmt(std)}")
            else:
                cells.append("")
        lines.append(f"| {arm} | {lr if lr is not None else '-'} | {len(recs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_experiment(exp: Experiment, records: Sequence[Record], plots: Path) -> list[str]:
    """Write the experiment's PNGs into ``plots``; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(f"{rec['arm']}" + (f" lr={rec['lr']:g}" if rec["lr"] is not None else ""), []).append(rec)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, means, errs = [], [], []
    for label, recs in groups.items():
        values = [r["metrics"][exp.primary_metric] for r in recs if exp.primary_metric in r["metrics"]]
        if values:
            mean, std = mean_std(values)
            labels.append(label), means.append(mean), errs.append(std)
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(exp.primary_metric)
    ax.set_title(f"{exp.id}: {exp.primary_metric} (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    name = f"{exp.id}.{_safe(exp.primary_metric)}.png"
    fig.savefig(plots / name, dpi=100)
    plt.close(fig)
    names.append(name)

    curve_names = sorted({c for rec in records for c in rec.get("curves", {})})
    for curve in curve_names:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, recs in groups.items():
            series = [dict((float(s), float(v)) for s, v in r["curves"][curve]) for r in recs if curve in r["curves"]]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            rows = [[s[step] for step in steps] for s in series]
            mean = [sum(col) / len(col) for col in zip(*rows)]
            line, = ax.plot(steps, mean, label=label)
            if len(rows) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(curve)
        ax.set_title(f"{exp.id}: {curve} (mean, band = seed min-max)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{exp.id}.{_safe(curve)}.png"
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)
        names.append(name)
    if exp.figures is not None:
        names += exp.figures(list(records), plots)
    return names


def image_grid(columns: Sequence[tuple[str, Any]], path: Path, cell: float = 1.6) -> None:
    """One PNG of titled columns of ``(N, 1, H, W)`` images in [0, 1], one row per image: the first column in
    gray (the input), the others with the ``jet`` map (saliency maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(columns[0][1])
    fig, axes = plt.subplots(rows, len(columns), figsize=(cell * len(columns), cell * rows), squeeze=False)
    for col, (title, images) in enumerate(columns):
        axes[0, col].set_title(title, fontsize=7)
        for row in range(rows):
            axes[row, col].imshow(images[row, 0].numpy(), cmap="gray" if col == 0 else "jet", vmin=0, vmax=1)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def build_report(out: str | Path) -> list[dict[str, Any]]:
    """Recompute verdicts from ``out/records.jsonl``; rewrite ``verdicts.json``, ``report.md``, ``plots/``.

    A ``timeout`` or ``error`` recorded by the runner is kept (records alone cannot show it), with the
    recomputed summary of the finished runs.
    """
    out = prepare_out_dir(out)
    records = [decode_metrics(r) for r in load_records(out)]
    if not records:
        raise FileNotFoundError(f"no finished runs in {out / 'records.jsonl'}")
    registry = all_experiments()
    previous = {(v["experiment"], v["mode"]): v for v in load_verdicts(out)}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    groups: dict[tuple[str, str], list[Record]] = {}
    for rec in records:
        groups.setdefault((rec["experiment"], rec["mode"]), []).append(rec)
    verdicts, sections = [], []
    for (exp_id, mode), recs in sorted(groups.items()):
        exp = registry.get(exp_id)
        if exp is None:
            sections.append(f"## {exp_id} ({mode})\n\nNo experiment of this id is registered any more.\n")
            continue
        status, summary = judge(exp, recs)
        old = previous.get((exp_id, mode))
        if old and old["status"] in ("timeout", "error"):
            status, summary = old["status"], f"{old['summary']} | recomputed from finished runs: {summary}"
        expected = old["expected_runs"] if old else len(recs)
        entry = verdict_entry(exp, mode, status, summary, len(recs), expected)
        if old:
            entry["date"] = old["date"]
        verdicts.append(entry)
        images = plot_experiment(exp, recs, plots)
        label = f"{status} (indicative: {mode} mode)" if mode == "quick" else f"{status} ({mode} mode)"
        sections.append("\n".join([
            f"## {exp_id} — {label}", "",
            f"**Claim.** {exp.claim}", "",
            f"**Baseline.** {exp.baseline}", "",
            f"**Metric.** {exp.metric} (primary: `{exp.primary_metric}`)", "",
            metric_table(recs), "",
            f"**Pass rule.** {exp.pass_rule}", "",
            f"**Verdict.** {status}: {summary}", "",
            *[f"![{name}](plots/{name})" for name in images], ""]))
    write_verdicts(out, verdicts)
    seconds = sum(r.get("seconds", 0) for r in records)
    shas = sorted({r.get("git_sha", "?") for r in records})
    header = ["# normlab claim checks", "",
              f"Machine: {machine()}. Commit(s): {', '.join(shas)}. Runs: {len(records)}, "
              f"{seconds:.0f} s of training/eval.", "",
              "| experiment | mode | status | summary |", "|---|---|---|---|",
              *[f"| {v['experiment']} | {v['mode']} | {v['status']} | {_cell(v['summary'])} |" for v in verdicts], ""]
    (out / "report.md").write_text("\n".join(header + sections))
    return verdicts


def committed_verdicts(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """The committed full-mode verdicts (``benchmarks/results/full/verdicts.json``) by experiment id."""
    path = results_dir / "verdicts.json"
    if not path.exists():
        return {}
    return {v["experiment"]: v for v in json.loads(path.read_text()) if v["mode"] == "full"}
