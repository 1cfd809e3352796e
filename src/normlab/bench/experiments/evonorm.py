"""Claim check of EvoNorm (Liu et al. 2020): the batch-independent EvoNorm-S0 trains a CNN as well as
GroupNorm + ReLU, which it replaces.

The experiment is the one shared with the bcn_ws sheet (evonorm.md and bcn_ws.md, section "b. Claim
check"): the 72 runs (6 norms x batch {4, 64} x lr {1e-3, 3e-3} x seeds {0, 1, 2}, digits CNN, Adam) are
defined in :mod:`normlab.bench.experiments.bcn_ws`, run once and cached through ``Experiment.shared_key``;
these checks read the same records. See that module for the task, the arms (``<norm>@<batch>``) and the
quick and smoke modes.

``evonorm.s0_vs_gn`` (gate) passes iff at batch 64 the mean test accuracy of EvoNorm-S0 is at least that of
GN + ReLU minus 1.5 points, each arm at its best lr by seed mean (measured +0.3, margin about 3 standard
errors of the paired gap). ``evonorm.report`` (report-only, margins inside the seed spread): S0 vs GN at
batch 4 (GN is unstable there) and EvoNorm-B0 vs BN + ReLU at batch 64 and 4. "S0 beats BN at small batch"
is not a usable criterion here: BN did not degrade at batch 4 on this data. Batch independence of S0 is
checked exactly in the layer's tests, not statistically.
"""

from __future__ import annotations

from ..experiment import Record, records_mode
from .bcn_ws import best, describe_arm, describe_gap, mean, mode_label, paired_gaps, parse_arm, register_check

S0_TOLERANCE = 1.5  # points: S0 >= GN - 1.5 at batch 64

GATE_ARMS = ("s0@64", "gn_relu@64")
REPORT_ARMS = ("s0@4", "gn_relu@4", "b0@64", "bn_relu@64", "b0@4", "bn_relu@4")


def verdict_s0_vs_gn(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, GATE_ARMS)
    gap = 100 * (mean(list(best(records, "s0", 64)[1].values()))
                 - mean(list(best(records, "gn_relu", 64)[1].values())))
    ok = gap >= -S0_TOLERANCE
    arms = "; ".join(describe_arm(records, *parse_arm(arm)) for arm in GATE_ARMS)
    text = (f"batch 64: mean S0 - GN {gap:+.1f} points (need >= -{S0_TOLERANCE:g}: {'yes' if ok else 'no'}); "
            f"{describe_gap('paired S0 - GN', paired_gaps(records, 's0', 'gn_relu', 64))}. "
            f"Best-lr test accuracy: {arms}")
    if mode != "full":
        return "report", f"{mode_label(mode)}: {text}"
    return ("pass" if ok else "fail"), text


def verdict_report(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, REPORT_ARMS)
    parts = [describe_gap("batch 4: S0 - GN", paired_gaps(records, "s0", "gn_relu", 4)),
             describe_gap("batch 64: B0 - BN", paired_gaps(records, "b0", "bn_relu", 64)),
             describe_gap("batch 4: B0 - BN", paired_gaps(records, "b0", "bn_relu", 4))]
    arms = "; ".join(describe_arm(records, *parse_arm(arm)) for arm in REPORT_ARMS)
    text = f"{'; '.join(parts)} (tolerance 1.5 points, not gated). Best-lr test accuracy: {arms}"
    return "report", (f"{mode_label(mode)}: {text}" if mode != "full" else f"report-only: {text}")


S0_VS_GN = register_check(
    "evonorm.s0_vs_gn",
    "EvoNorm-S0, a batch-independent normalization-activation layer, trains a small CNN as well as the "
    "GroupNorm + ReLU pair it replaces (batch 64).",
    "GN(8 groups) + ReLU at batch 64 (same CNN, data, optimiser, lr grid and seeds)",
    "pass iff at batch 64 mean S0 >= mean GN+ReLU - 1.5 points",
    GATE_ARMS, verdict_s0_vs_gn)

REPORT = register_check(
    "evonorm.report",
    "Report only: EvoNorm-S0 against GN + ReLU at batch 4, and EvoNorm-B0 against BN + ReLU at batch 64 "
    "and batch 4.",
    "GN+ReLU (for S0) and BN+ReLU (for B0) at the same batch size",
    "report-only (the margins to a 1.5-point tolerance are inside the seed spread)",
    REPORT_ARMS, verdict_report)
