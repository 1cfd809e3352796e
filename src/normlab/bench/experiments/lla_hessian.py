"""Claim checks of Loss Landscape Analysis (Gabdullin 2024, arXiv:2412.10146): the LLA Hessian criteria.

The paper proposes ``re`` = |λmin / λmax| and ``KH05`` (negative vs positive spectral mass, computed
from stochastic Lanczos quadrature) as cheap indicators of how close training is to a minimum, and
argues that Hessian-eigenvector axes show the loss rise faster than random ones. Its headline claim
(changes of the criteria across datasets track changes of accuracy on ImageNet-scale models) is not
reproducible at this scale and is not tested; the sheet's scaled-down mechanical checks are.

Protocol (the sheet's): MLP 64-8-ReLU-10, arm ``mlp`` plain and arm ``mlp_bn`` with BatchNorm1d(8)
after the first Linear; scikit-learn digits / 16, stratified 70/30 split (``random_state=0``), float64;
SGD lr 0.1, momentum 0.9, batch 64 (reshuffled every epoch; the seed sets the init and the batch
order). At checkpoints after 0, 50 and 1,500 steps (``init``, ``early``, ``final``), on the Hessian
batch = the first 500 training samples, model in eval mode (BatchNorm running statistics):
- exact spectrum: ``eigvalsh`` of :func:`~normlab.analysis.hessian.exact_hessian`; its re and KH05 with
  uniform weights 1/P;
- SLQ: :meth:`HessianOperator.esd` with m = 80 steps (full reorthogonalisation), n_v = 3 runs, the
  criteria averaged over runs (``slq_*``); the first run alone is reported as ``slq1_kh05`` (n_v = 1);
- u_1 from :meth:`HessianOperator.top_eigen` (power iteration, LLA's defaults max_iter 100, tol 1e-3);
  finite-difference curvature (L(θ+hd) - 2L(θ) + L(θ-hd)) / h², h = 1e-3, along u_1 and along 10 random
  unit directions (``fd_ratio`` = the first over the mean of the others; expectation λ_1·P / trace).

Gates (seeds 0 and 1, both arms; the sheet measured them to hold on 3 seeds):
- ``lla_hessian.criteria``: exact KH05 and exact re decrease strictly init -> early -> final;
- ``lla_hessian.slq``: SLQ KH05 (n_v = 3) within a factor 2 of the exact KH05 at every checkpoint;
- ``lla_hessian.axes``: ``fd_ratio`` >= 50 at the trained checkpoints (ReLU kinks spoil finite
  differences at init, so init is reported only).
``lla_hessian.report`` (status report, seeds 0-2): test accuracy, the SLQ KH05 trajectory (the sheet: SLQ
cannot resolve the 10-18 % BN drop early -> final), n_v = 1 vs n_v = 3, λ_1·P / trace. All four checks
share their runs. Quick = the full protocol on seed 0 only (indicative, status report); smoke = 2 and 5
SGD steps, a 100-sample Hessian batch and m = 10.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..._model_state import eval_mode
from ...analysis.hessian import HessianOperator, exact_hessian, hessian_criteria, spectral_density
from ...analysis.landscape import loss_surface, plot_surface
from ..experiment import Experiment, Grid, Record, records_mode, register
from ..tasks import digits

ARMS = ("mlp", "mlp_bn")
LR, MOMENTUM, BATCH, TEST_FRACTION = 0.1, 0.9, 64, 0.3
LABELS = ("init", "early", "final")
CHECKPOINTS = {"full": (0, 50, 1500), "quick": (0, 50, 1500), "smoke": (0, 2, 5)}
HESSIAN_BATCH = {"full": 500, "quick": 500, "smoke": 100}
SLQ_STEPS = {"full": 80, "quick": 80, "smoke": 10}
SLQ_RUNS, FD_H, N_RANDOM = 3, 1e-3, 10
SLQ_FACTOR, AXES_FACTOR = 2.0, 50.0
GATE_SEEDS, REPORT_SEEDS = (0, 1), (0, 1, 2)
CURVES = ("test_acc", "exact_kh05", "slq_kh05", "exact_re", "fd_ratio")


def make_model(arm: str) -> nn.Module:
    """MLP 64-8-ReLU-10, with BatchNorm1d(8) after the first Linear for ``mlp_bn`` (float64)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    norm = [nn.BatchNorm1d(8)] if arm == "mlp_bn" else []
    return nn.Sequential(nn.Linear(64, 8), *norm, nn.ReLU(), nn.Linear(8, 10)).double()


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened float64 digits: (x_train, y_train, x_test, y_test), stratified 70/30, random_state 0."""
    x_tr, y_tr = digits("train", test_fraction=TEST_FRACTION, seed=0)
    x_te, y_te = digits("test", test_fraction=TEST_FRACTION, seed=0)
    return x_tr.flatten(1).double(), y_tr, x_te.flatten(1).double(), y_te


def batch_order(n: int, generator: torch.Generator):
    """Endless minibatch indices: a fresh permutation per epoch, full batches of ``BATCH`` only."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - BATCH + 1, BATCH):
            yield perm[i:i + BATCH]


def unit_random(numel: int, n: int, generator: torch.Generator) -> torch.Tensor:
    d = torch.randn(n, numel, generator=generator, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def fd_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor,
                 h: float = FD_H) -> torch.Tensor:
    """(L(θ+hd) - 2L(θ) + L(θ-hd)) / h² per row d of ``directions`` (flat, over trainable params),
    in eval mode, without touching the model."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]

    def loss(shift: torch.Tensor) -> float:
        shifted = {n: p + c.reshape(p.shape) for n, p, c in zip(names, params, shift.split(sizes))}
        with torch.no_grad(), eval_mode(model):
            return float(F.cross_entropy(functional_call(model, shifted, (x,)), y))

    centre = loss(torch.zeros(sum(sizes), dtype=torch.float64))
    return torch.tensor([(loss(h * d) - 2 * centre + loss(-h * d)) / h ** 2 for d in directions],
                        dtype=torch.float64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), eval_mode(model):
        return float((model(x).argmax(1) == y).double().mean())


def measure(model: nn.Module, xh: torch.Tensor, yh: torch.Tensor, m: int, generator: torch.Generator
            ) -> dict[str, float]:
    """Every quantity of one checkpoint (see the module docstring)."""
    ev = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, (xh, yh)))
    p = len(ev)
    exact_re, exact_kh = hessian_criteria(ev, torch.full_like(ev, 1.0 / p))
    op = HessianOperator(model, F.cross_entropy, (xh, yh))
    nodes, weights = op.esd(n_iter=m, n_runs=SLQ_RUNS, generator=generator)
    slq_re, slq_kh = hessian_criteria(nodes, weights)
    _, slq1_kh = hessian_criteria(nodes[:1], weights[:1])
    lam, vecs = op.top_eigen(k=1, generator=generator)
    u1 = op.flatten(vecs[0])
    fd_u1 = float(fd_curvature(model, xh, yh, u1[None])[0])
    fd_random = float(fd_curvature(model, xh, yh, unit_random(p, N_RANDOM, generator)).mean())
    return {"exact_kh05": exact_kh, "exact_re": exact_re, "slq_kh05": slq_kh, "slq_re": slq_re,
            "slq1_kh05": slq1_kh, "kh05_ratio": slq_kh / exact_kh, "lambda1": float(lam[0]),
            "exact_lmax": float(ev[-1]), "fd_ratio": fd_u1 / fd_random,
            "expected_ratio": float(lam[0]) * p / float(ev.sum())}


def checkpoints(arm: str, seed: int, mode: str) -> Iterator[tuple[str, int, nn.Module]]:
    """Train the arm's MLP with the seed's init and batch order, yielding ``(label, step, model)`` at each
    checkpoint of the mode (the same model object, trained further between yields)."""
    x_tr, y_tr, _, _ = load_data()
    torch.manual_seed(seed)
    model = make_model(arm)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    order = batch_order(len(y_tr), torch.Generator().manual_seed(seed))
    step = 0
    for label, checkpoint in zip(LABELS, CHECKPOINTS[mode]):
        model.train()
        while step < checkpoint:
            idx = next(order)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        yield label, step, model


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    x_tr, y_tr, x_te, y_te = load_data()
    xh, yh = x_tr[:HESSIAN_BATCH[mode]], y_tr[:HESSIAN_BATCH[mode]]
    probe = torch.Generator().manual_seed(seed)
    metrics: dict[str, float] = {}
    curves: dict[str, list[list[float]]] = {name: [] for name in CURVES}
    for label, step, model in checkpoints(arm, seed, mode):
        values = measure(model, xh, yh, SLQ_STEPS[mode], probe)
        values["test_acc"] = accuracy(model, x_te, y_te)
        metrics.update({f"{name}_{label}": v for name, v in values.items()})
        for name in CURVES:
            curves[name].append([step, values[name]])
    metrics["slq_worst_factor"] = max(max(r, 1 / r) for r in (metrics[f"kh05_ratio_{lab}"] for lab in LABELS))
    metrics["fd_ratio_trained_min"] = min(metrics["fd_ratio_early"], metrics["fd_ratio_final"])
    return {"metrics": metrics, "curves": curves}


def figures(records: Sequence[Record], plots: Path) -> list[str]:
    """Loss landscapes of the BN arm's final checkpoint (lowest seed in ``records``) on the Hessian batch,
    along two filter-normalized random directions and along the top two Hessian eigenvectors, and the
    eigenvalue density (SLQ) at each checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode, seed = records[0]["mode"], min(r["seed"] for r in records)
    x_tr, y_tr, _, _ = load_data()
    batch = (x_tr[:HESSIAN_BATCH[mode]], y_tr[:HESSIAN_BATCH[mode]])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, step, model in checkpoints("mlp_bn", seed, mode):
        nodes, weights = HessianOperator(model, F.cross_entropy, batch).esd(
            n_iter=SLQ_STEPS[mode], generator=torch.Generator().manual_seed(seed))
        grid, density = spectral_density(nodes, weights, num_bins=400)
        ax.plot(grid, density, label=f"{label} (step {step})")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title(f"lla_hessian: Hessian eigenvalue density, MLP with BN, seed {seed}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    names = ["lla_hessian.esd.png"]
    fig.savefig(plots / names[0], dpi=100)
    plt.close(fig)
    steps = 9 if mode == "smoke" else 25
    for axes, normalization in (("random", "filter"), ("hessian", None)):
        grid_x, grid_y, losses = loss_surface(model, F.cross_entropy, batch, axes=axes, normalization=normalization,
                                              steps=steps, generator=torch.Generator().manual_seed(seed))
        name = f"lla_hessian.landscape_{axes}.png"
        plot_surface(grid_x, grid_y, losses, plots / name, kind="both",
                     title=f"loss along {axes} axes (MLP with BN, step {step}, seed {seed})")
        names.append(name)
    return names


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """All four checks read the same runs."""
    return f"lla_hessian/{arm}/seed={seed}/{mode}"


# ---- verdicts ----------------------------------------------------------------------------------------------
def _per_run(records: Sequence[Record], seeds: Sequence[int] | None = None) -> dict[tuple[str, int], dict]:
    runs = {(r["arm"], r["seed"]): r["metrics"] for r in records}
    return {k: v for k, v in sorted(runs.items()) if seeds is None or k[1] in seeds}


def _trajectory(metrics: dict, name: str) -> str:
    return " -> ".join(f"{metrics[f'{name}_{lab}']:.3g}" for lab in LABELS)


def _ratios(metrics: dict, num: str, den: str) -> str:
    return " -> ".join(f"{metrics[f'{num}_{lab}'] / metrics[f'{den}_{lab}']:.2f}" for lab in LABELS)


def _strictly_decreasing(metrics: dict, name: str) -> bool:
    values = [metrics[f"{name}_{lab}"] for lab in LABELS]
    return all(math.isfinite(v) for v in values) and all(a > b for a, b in zip(values, values[1:]))


def _gate(records: Sequence[Record], check, describe) -> tuple[str, str]:
    """Shared verdict shape: every (arm, gate seed) must pass ``check``; quick/smoke report only."""
    mode = records_mode(records, ARMS)
    seeds = GATE_SEEDS if mode == "full" else None
    runs = _per_run(records, seeds)
    missing = [(a, s) for a in ARMS for s in (seeds or ()) if (a, s) not in runs]
    if missing:
        raise ValueError(f"no records for {', '.join(f'{a} seed {s}' for a, s in missing)}")
    results = {key: check(m) for key, m in runs.items()}
    detail = "; ".join(f"{arm} seed {seed}: {describe(runs[(arm, seed)])} ({'ok' if ok else 'FAILS'})"
                       for (arm, seed), ok in results.items())
    if mode != "full":
        label = "indicative (quick: the full protocol, seed 0 only)" if mode == "quick" else "smoke"
        return "report", f"{label}: {detail}"
    passed = sum(results.values())
    status = "pass" if passed == len(results) else "fail"
    return status, f"{passed}/{len(results)} runs hold. {detail}"


def verdict_criteria(records: Sequence[Record]) -> tuple[str, str]:
    return _gate(records,
                 lambda m: _strictly_decreasing(m, "exact_kh05") and _strictly_decreasing(m, "exact_re"),
                 lambda m: f"KH05 {_trajectory(m, 'exact_kh05')}, re {_trajectory(m, 'exact_re')}")


def verdict_slq(records: Sequence[Record]) -> tuple[str, str]:
    return _gate(records,
                 lambda m: math.isfinite(m["slq_worst_factor"]) and m["slq_worst_factor"] <= SLQ_FACTOR,
                 lambda m: (f"SLQ/exact KH05 {_trajectory(m, 'kh05_ratio')}, worst factor "
                            f"{m['slq_worst_factor']:.2f}"))


def verdict_axes(records: Sequence[Record]) -> tuple[str, str]:
    return _gate(records,
                 lambda m: m["fd_ratio_early"] >= AXES_FACTOR and m["fd_ratio_final"] >= AXES_FACTOR,
                 lambda m: (f"FD curvature u_1 / random {_trajectory(m, 'fd_ratio')} (init not gated), "
                            f"λ1·P/tr {_trajectory(m, 'expected_ratio')}"))


def verdict_report(records: Sequence[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    parts = []
    for (arm, seed), m in _per_run(records).items():
        parts.append(f"{arm} seed {seed}: test acc {_trajectory(m, 'test_acc')}; exact KH05 "
                     f"{_trajectory(m, 'exact_kh05')}; SLQ KH05 n_v=3 {_trajectory(m, 'slq_kh05')} "
                     f"({'decreasing' if _strictly_decreasing(m, 'slq_kh05') else 'not monotone'}); SLQ/exact "
                     f"KH05 n_v=3 {_trajectory(m, 'kh05_ratio')}, n_v=1 {_ratios(m, 'slq1_kh05', 'exact_kh05')}; "
                     f"re SLQ {_trajectory(m, 'slq_re')} vs exact {_trajectory(m, 'exact_re')}; λ1·P/tr "
                     f"{_trajectory(m, 'expected_ratio')}")
    return "report", f"{mode}: " + "; ".join(parts)


def _grids(seeds: tuple[int, ...], budget: float) -> dict[str, Grid]:
    return {"full": Grid(ARMS, (LR,), seeds, budget),
            "quick": Grid(ARMS, (LR,), (0,), 30.0),
            "smoke": Grid(ARMS, (LR,), (0,), 10.0)}


_COMMON = dict(
    baseline="the exact Hessian spectrum (eigvalsh of the dense Hessian) and random directions",
    run=run,
    shared_key=shared_key,
)
_PROTOCOL = ("MLP 64-8-ReLU-10 with/without BN, digits, SGD 0.1 m 0.9 batch 64, checkpoints after 0, 50, "
             "1,500 steps, Hessian of the first 500 training samples in eval mode, float64")

register(Experiment(
    id="lla_hessian.criteria",
    claim="The LLA Hessian criteria KH05 and re fall as training approaches a minimum.",
    metric=f"exact-spectrum KH05 and re at each checkpoint ({_PROTOCOL})",
    primary_metric="exact_kh05_final",
    pass_rule="seeds 0 and 1, both arms: exact KH05 and exact re decrease strictly 0 -> 50 -> 1,500 steps",
    grids=_grids(GATE_SEEDS, 600.0),
    verdict=verdict_criteria,
    **_COMMON,
))

register(Experiment(
    id="lla_hessian.slq",
    claim="Stochastic Lanczos quadrature (m = 80, 3 runs) estimates KH05 well enough to use it.",
    metric="SLQ KH05 / exact KH05 at each checkpoint; worst factor max(r, 1/r)",
    primary_metric="slq_worst_factor",
    pass_rule="seeds 0 and 1, both arms: SLQ KH05 (n_v = 3) within a factor 2 of the exact KH05 at every "
              "checkpoint",
    grids=_grids(GATE_SEEDS, 600.0),
    verdict=verdict_slq,
    **_COMMON,
))

register(Experiment(
    id="lla_hessian.axes",
    claim="The loss rises faster along the top Hessian eigenvector than along random directions.",
    metric="finite-difference curvature (h = 1e-3) along u_1 over its mean along 10 random unit directions",
    primary_metric="fd_ratio_trained_min",
    pass_rule="seeds 0 and 1, both arms: ratio >= 50 at the checkpoints after 50 and 1,500 steps",
    grids=_grids(GATE_SEEDS, 600.0),
    verdict=verdict_axes,
    **_COMMON,
))

register(Experiment(
    id="lla_hessian.report",
    claim="Report only: accuracy and the SLQ criteria along training (the paper's generalisation "
          "correlation is not reproducible at this scale and is not tested).",
    metric="test accuracy, SLQ KH05 (n_v = 3 and 1) and re vs the exact spectrum per checkpoint",
    primary_metric="test_acc_final",
    pass_rule="none: report only",
    grids=_grids(REPORT_SEEDS, 900.0),
    verdict=verdict_report,
    figures=figures,
    **_COMMON,
))
