"""The claim-check contract and its registry.

An :class:`Experiment` re-checks one headline claim of one paper. The runner calls
``run(arm, lr, seed, mode)`` once per grid point of the mode and records what it returns
(``{"metrics": {name: float}, "curves": {name: [[step, value], ...]}}``); ``verdict(records)`` is a
pure function of all records of the experiment that applies the spec sheet's pass rule and returns
``(status, summary)`` with status one of :data:`STATUSES`.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("full", "quick", "smoke")
STATUSES = ("pass", "fail", "report", "error", "timeout")

Record = dict[str, Any]
RunResult = dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """What one mode runs: every arm x lr x seed, within ``budget_s`` seconds (else ``timeout``)."""

    arms: tuple[str, ...]
    lrs: tuple[float | None, ...]
    seeds: tuple[int, ...]
    budget_s: float

    def points(self, seeds: Sequence[int] | None = None) -> list[tuple[str, float | None, int]]:
        """Grid points seed-major, so that an early stop still leaves every arm with equal seeds."""
        return [(arm, lr, seed) for seed in (self.seeds if seeds is None else seeds)
                for arm in self.arms for lr in self.lrs]


@dataclass(frozen=True)
class Experiment:
    """One claim check. ``id`` is ``<slug>`` or ``<slug>.<check>``; ``metric`` describes the outcome
    measure in words, ``primary_metric`` is its key in the records' metrics (plotted per arm).
    ``threads`` is the intra-op thread count the runner gives each run: one by default, because the
    sheets calibrated their checks as single-thread runs of small models, and on two shared cores a
    second thread mostly adds contention (runs were up to 10x slower under load). ``figures(records,
    plots_dir)``, when given, draws the experiment's own images (saliency maps, loss landscapes) into
    ``plots_dir`` and returns their file names; the report shows them after the standard plots."""

    id: str
    claim: str
    baseline: str
    metric: str
    primary_metric: str
    pass_rule: str
    grids: dict[str, Grid]
    run: Callable[[str, float | None, int, str], RunResult]
    verdict: Callable[[list[Record]], tuple[str, str]]
    shared_key: Callable[[str, float | None, int, str], str | None] = field(default=lambda *a: None)
    threads: int = 1
    figures: Callable[[list[Record], Any], list[str]] | None = None

    @property
    def slug(self) -> str:
        return self.id.split(".", 1)[0]

    def __post_init__(self) -> None:
        if set(self.grids) != set(MODES):
            raise ValueError(f"{self.id}: grids must cover the modes {MODES}, got {sorted(self.grids)}")


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block and restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add an experiment to the registry (ids are unique)."""
    if experiment.id in _REGISTRY:
        raise ValueError(f"experiment {experiment.id!r} is registered twice")
    _REGISTRY[experiment.id] = experiment
    return experiment


def all_experiments() -> dict[str, Experiment]:
    """Every registered experiment, importing ``normlab.bench.experiments.*`` on first use."""
    from . import experiments

    for info in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"{experiments.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def select(ids: Sequence[str]) -> list[Experiment]:
    """Experiments named by id or by slug (all when ``ids`` is empty); ``KeyError`` listing valid ones."""
    registry = all_experiments()
    if not ids:
        return list(registry.values())
    chosen: dict[str, Experiment] = {}
    for name in ids:
        matches = [e for e in registry.values() if e.id == name or e.slug == name]
        if not matches:
            raise KeyError(f"unknown experiment or slug {name!r}; valid: {', '.join(registry)}")
        chosen.update((e.id, e) for e in matches)
    return list(chosen.values())


def records_by_arm(records: Sequence[Record], metric: str) -> dict[tuple[str, float | None], list[float]]:
    """``{(arm, lr): [metric per seed, in seed order]}``: the grouping every verdict starts from."""
    groups: dict[tuple[str, float | None], list[tuple[int, float]]] = {}
    for rec in records:
        groups.setdefault((rec["arm"], rec["lr"]), []).append((rec["seed"], rec["metrics"][metric]))
    return {key: [v for _, v in sorted(vals)] for key, vals in groups.items()}


def records_mode(records: Sequence[Record], arms: Sequence[str]) -> str:
    """The one mode of ``records``; ``ValueError`` when there are none, modes are mixed or an arm has
    no record (a timed-out or failed grid), which the runner reports as status ``error``."""
    if not records:
        raise ValueError("no records")
    modes = {rec["mode"] for rec in records}
    if len(modes) != 1:
        raise ValueError(f"records mix modes {sorted(modes)}")
    missing = [arm for arm in arms if not any(rec["arm"] == arm for rec in records)]
    if missing:
        raise ValueError(f"no records for arm(s) {', '.join(missing)} (timed out or failed)")
    return modes.pop()


def best_lr(records: Sequence[Record], arm: str, metric: str, *, lower_is_better: bool = True
            ) -> tuple[float | None, list[float]]:
    """The arm's best lr by seed mean of ``metric`` (non-finite means rank last), with its per-seed values."""
    candidates = {lr: vals for (a, lr), vals in records_by_arm(records, metric).items() if a == arm}
    if not candidates:
        raise ValueError(f"no records for arm {arm!r}")

    def score(item):
        mean = sum(item[1]) / len(item[1])
        if not math.isfinite(mean):
            return math.inf
        return mean if lower_is_better else -mean

    return min(candidates.items(), key=score)
