"""Claim checks of PA&DA (Lu et al., CVPR 2023): gradient-norm importance sampling lowers the variance of
the stochastic gradient (the paper's mechanism; its supernet-ranking gains need NAS-Bench-201 ground truth
and are not reproduced here).

Data task (the spec sheet's protocol): MLP 64-128-10 (ReLU) on scikit-learn's digits, stratified 1,437 /
360 split by seed, inputs standardised with training statistics (zero-variance pixels keep scale 1), batch
32, SGD lr 0.05 momentum 0.9, no clipping, no schedule, E = 10 epochs. Arms, same initialisation and same
data generator per seed:

- ``uniform``: a fresh random permutation every epoch;
- ``pada``: :class:`~normlab.training.pada.GradNormImportanceSampler` with the official behaviour (plain
  mean loss, ``reweight=False``), fed the logit proxy ``||softmax - onehot||`` of every training step;
- ``pada_reweight``: the same with the loss of example ``i`` multiplied by ``1/(N p_i)`` (``reweight=True``),
  plus the variance diagnostic: at the start of epochs ``max(2, E-6) .. E-1`` (4..9 at E = 10), at the
  current parameters, exact per-sample gradients (``torch.func``) give the exact variance of the batch-32
  reweighted estimator ``(1/32)(sum_i ||g_i||^2 / (N^2 p_i) - ||g_mean||^2)`` under (i) the sampler's own
  (one-epoch-stale) ``p`` (``lagged``), (ii) the same mix built from fresh proxies (``fresh``, diagnostic
  only), (iii) ``p ∝ ||g_i||`` (``optimal``); each divided by the uniform variance and averaged over epochs.

Checks: ``pada.variance`` (gate: fresh ratio < 0.5 in every seed, optimal <= fresh in every seed and
epoch), ``pada.accuracy`` (gate: mean paired test-accuracy gap pada - uniform >= -1.5 points),
``pada.report`` (report-only: the lagged ratio, flagged above 2, and the reweighted arm's accuracy), and
``pada.path_sampler`` (gate: :class:`~normlab.training.pada.GradNormCategorical` on a toy supernet of 4
edges x {linear, 2-layer MLP, identity} on ``make_classification``: after training the distribution is
non-uniform, the parameter-free op holds exactly ``(1 - tau)/K``, and a rerun with the same seed is
identical). Quick mode (the sheet's): seed 0, 6 epochs, the variance gates (indicative); the other checks
run the same 6-epoch runs report-only. Smoke: 3 epochs (path sampler 2), report.
"""

from __future__ import annotations

import math
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...training.pada import GradNormCategorical, GradNormImportanceSampler, per_sample_grad_norm
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register
from ..tasks import digits

ARMS = ("uniform", "pada", "pada_reweight")
EPOCHS = {"full": 10, "quick": 6, "smoke": 3}
SEEDS = {"full": (0, 1, 2, 3, 4), "quick": (0,), "smoke": (0,)}
LR, MOMENTUM, BATCH, TEST_SIZE = 0.05, 0.9, 32, 360
FRESH_MAX = 0.5      # fresh-proxy variance ratio gate, every seed
GAP_MIN = -1.5       # mean paired accuracy gap (points), pada - uniform
LAGGED_FLAG = 2.0    # report-only flag on the stale-score variance ratio


def diagnostic_epochs(epochs: int) -> range:
    """Epochs (0-based) at whose start the variance diagnostic runs: 4..9 at E = 10 (the sheet)."""
    return range(max(2, epochs - 6), epochs)


def digits_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened digits, stratified 1,437 / 360 split by ``seed``, standardised with training statistics."""
    x_train, y_train = digits("train", test_fraction=TEST_SIZE / 1797, seed=seed)
    x_test, y_test = digits("test", test_fraction=TEST_SIZE / 1797, seed=seed)
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def batch_variance(norms: torch.Tensor, mean_sq: float, probs: torch.Tensor, batch: int = BATCH) -> float:
    """Exact variance (trace) of the batch mean of ``g_i / (N p_i)``, ``i ~ p`` i.i.d.:
    ``(1/batch)(sum_i ||g_i||^2 / (N^2 p_i) - ||g_mean||^2)``."""
    n = norms.numel()
    return float(((norms.square() / (n * n * probs)).sum() - mean_sq) / batch)


def variance_ratios(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lagged: torch.Tensor, tau: float
                    ) -> dict[str, float]:
    """Variance ratios (to uniform sampling) of the lagged, fresh-proxy and optimal distributions."""
    norms = per_sample_grad_norm(model, F.cross_entropy, x, y, kind="exact").double()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    mean_sq = float(sum(g.double().square().sum() for g in grads))
    with torch.no_grad():
        proxy = per_sample_grad_norm(model(x), y).double()
    n = norms.numel()
    fresh = tau * proxy / proxy.sum() + (1 - tau) / n
    uniform = batch_variance(norms, mean_sq, torch.full_like(norms, 1.0 / n))
    return {"lagged": batch_variance(norms, mean_sq, lagged) / uniform,
            "fresh": batch_variance(norms, mean_sq, fresh) / uniform,
            "optimal": batch_variance(norms, mean_sq, norms / norms.sum()) / uniform}


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    epochs = EPOCHS[mode]
    x, y, x_test, y_test = digits_data(seed)
    n = len(y)
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(seed)
    sampler = None if arm == "uniform" else GradNormImportanceSampler(n, epochs, generator=gen)
    ratios: dict[str, list[list[float]]] = {"lagged": [], "fresh": [], "optimal": []}
    train_loss, test_acc = [], []
    for epoch in range(epochs):
        if sampler is None:
            order = torch.randperm(n, generator=gen)
        else:
            sampler.set_epoch(epoch)
            order = sampler.indices
        if arm == "pada_reweight" and epoch in diagnostic_epochs(epochs):
            tau = (epoch - 1) / epochs
            for name, value in variance_ratios(model, x, y, sampler.probabilities, tau).items():
                ratios[name].append([epoch, value])
        losses = []
        for idx in order.split(BATCH):
            logits = model(x[idx])
            per_sample = F.cross_entropy(logits, y[idx], reduction="none")
            if arm == "pada_reweight":
                loss = (per_sample * sampler.importance_weights(idx).to(per_sample.dtype)).mean()
            else:
                loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sampler is not None:
                sampler.update(idx, per_sample_grad_norm(logits.detach(), y[idx]))
            losses.append(loss.item())
        train_loss.append([epoch + 1, fmean(losses)])
        with torch.no_grad():
            test_acc.append([epoch + 1, 100.0 * (model(x_test).argmax(1) == y_test).double().mean().item()])
    metrics = {"test_acc": test_acc[-1][1], "train_loss": train_loss[-1][1]}
    curves = {"train_loss": train_loss, "test_acc": test_acc}
    if arm == "pada_reweight":
        for name, series in ratios.items():
            metrics[f"{name}_ratio"] = fmean(v for _, v in series)
            curves[f"variance_ratio_{name}"] = series
        metrics["optimal_le_fresh"] = float(all(o <= f for (_, o), (_, f) in zip(ratios["optimal"], ratios["fresh"])))
    return {"metrics": metrics, "curves": curves}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """The three digits checks read the same runs."""
    return f"pada-digits/{arm}/lr={lr!r}/seed={seed}/{mode}"


def _label(mode: str) -> str:
    return {"quick": "indicative (quick: seed 0, 6 epochs)", "smoke": "smoke"}.get(mode, "")


def verdict_variance(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("pada_reweight",))
    per = {k: records_by_arm(records, k)[("pada_reweight", LR)]
           for k in ("fresh_ratio", "optimal_ratio", "lagged_ratio", "optimal_le_fresh")}
    fmt = lambda vals: " / ".join(f"{v:.3f}" for v in vals)  # noqa: E731
    fresh_ok = all(v < FRESH_MAX for v in per["fresh_ratio"])
    order_ok = all(v == 1.0 for v in per["optimal_le_fresh"])
    summary = (f"variance ratio to uniform (seeds in order): fresh {fmt(per['fresh_ratio'])} (need < {FRESH_MAX} "
               f"in every seed: {'yes' if fresh_ok else 'no'}); optimal {fmt(per['optimal_ratio'])} "
               f"(optimal <= fresh in every seed and epoch: {'yes' if order_ok else 'no'}); lagged (report) "
               f"{fmt(per['lagged_ratio'])}")
    if mode == "smoke":
        return "report", f"smoke: {summary}"
    status = "pass" if fresh_ok and order_ok else "fail"
    return status, (f"{_label(mode)}: " if mode == "quick" else "") + summary


def _paired(records: list[Record], arm: str) -> tuple[list[float], list[float], list[float]]:
    acc = records_by_arm(records, "test_acc")
    base, other = acc[("uniform", LR)], acc[(arm, LR)]
    if len(base) != len(other):
        raise ValueError(f"unpaired seeds: uniform has {len(base)}, {arm} has {len(other)}")
    return base, other, [o - b for o, b in zip(other, base)]


def verdict_accuracy(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("uniform", "pada"))
    base, other, gaps = _paired(records, "pada")
    mean_gap = fmean(gaps)
    ok = math.isfinite(mean_gap) and mean_gap >= GAP_MIN
    summary = (f"test accuracy %: uniform {' / '.join(f'{v:.1f}' for v in base)}; pada (reweight=False) "
               f"{' / '.join(f'{v:.1f}' for v in other)}; paired gap mean {mean_gap:+.2f}, worst {min(gaps):+.2f} "
               f"(need mean >= {GAP_MIN}: {'yes' if ok else 'no'})")
    if mode != "full":
        return "report", f"{_label(mode)}: {summary}"
    return ("pass" if ok else "fail"), summary


def verdict_report(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("uniform", "pada_reweight"))
    reweighted = [rec for rec in records if rec["arm"] == "pada_reweight"]
    lagged = records_by_arm(reweighted, "lagged_ratio")[("pada_reweight", LR)]
    base, other, gaps = _paired(records, "pada_reweight")
    flagged = sum(v > LAGGED_FLAG for v in lagged)
    summary = (f"lagged (official, one-epoch-stale) variance ratio {' / '.join(f'{v:.2f}' for v in lagged)}: "
               f"{flagged} of {len(lagged)} seed(s) above {LAGGED_FLAG} (stale scores can raise the variance); "
               f"reweight=True test accuracy % {' / '.join(f'{v:.1f}' for v in other)} vs uniform "
               f"{' / '.join(f'{v:.1f}' for v in base)}, paired gap mean {fmean(gaps):+.2f}, worst {min(gaps):+.2f}")
    return "report", (f"{_label(mode)}: " if mode != "full" else "") + summary


# --- path sampler on a toy supernet -----------------------------------------------------------------------
EDGES, WIDTH, PATH_EPOCHS, PATH_SAMPLES, CLIP = 4, 16, 10, 1000, 5.0
OPS = ("linear", "mlp", "identity")


class ToySupernet(nn.Module):
    """Stem Linear(16, 16) -> ReLU -> 4 edges, each one of {Linear, Linear-ReLU-Linear, identity} chosen
    per step -> Linear(16, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.edges = nn.ModuleList(nn.ModuleList([
            nn.Linear(WIDTH, WIDTH),
            nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.ReLU(), nn.Linear(2 * WIDTH, WIDTH)),
            nn.Identity()]) for _ in range(EDGES))
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor, arch: list[int]) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for ops, k in zip(self.edges, arch):
            h = ops[k](h)
        return self.head(h)


def train_toy_supernet(seed: int, epochs: int) -> tuple[torch.Tensor, list[float]]:
    """Train the toy supernet with the path sampler (the official step: clip 5, SGD, per-edge op-gradient
    norms ``sum ||p.grad||``); returns the distribution after the last epoch and the loss curve."""
    from sklearn.datasets import make_classification

    xs, ys = make_classification(n_samples=PATH_SAMPLES, n_features=16, n_informative=8, random_state=seed)
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)
    torch.manual_seed(seed)
    model = ToySupernet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(seed)
    paths = GradNormCategorical(len(OPS), epochs)
    losses = []
    for epoch in range(epochs):
        paths.set_epoch(epoch)
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            arch = paths.sample(EDGES, generator=gen)
            loss = F.cross_entropy(model(x[idx], arch.tolist()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            norms = torch.stack([sum((p.grad.norm() for p in ops[k].parameters()), torch.tensor(0.0))
                                 for ops, k in zip(model.edges, arch.tolist())])
            paths.update(arch, norms)
            losses.append(loss.item())
    paths.set_epoch(epochs)
    return paths.probabilities, losses


def run_path(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm != "pada_path":
        raise ValueError(f"unknown arm {arm!r}; valid: ['pada_path']")
    epochs = 2 if mode == "smoke" else PATH_EPOCHS
    q, losses = train_toy_supernet(seed, epochs)
    q2, losses2 = train_toy_supernet(seed, epochs)
    k = len(OPS)
    expected = (1 - (epochs - 1) / epochs) / k
    metrics = {f"q_{name}": float(v) for name, v in zip(OPS, q)}
    metrics.update(q_identity_expected=expected,
                   max_dev_from_uniform=float((q - 1 / k).abs().max()),
                   deterministic=float(torch.equal(q, q2) and losses == losses2))
    return {"metrics": metrics, "curves": {"train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}


def verdict_path(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("pada_path",))
    parts, ok = [], True
    for rec in sorted(records, key=lambda r: r["seed"]):
        m = rec["metrics"]
        nonuniform = m["max_dev_from_uniform"] > 1e-3
        identity = abs(m["q_identity"] - m["q_identity_expected"]) <= 1e-12 and m["q_identity"] < 1 / len(OPS)
        determ = m["deterministic"] == 1.0
        ok = ok and nonuniform and identity and determ
        parts.append(f"seed {rec['seed']}: q = " + ", ".join(f"{o} {m[f'q_{o}']:.4f}" for o in OPS)
                     + f"; non-uniform (max |q - 1/K| {m['max_dev_from_uniform']:.3f} > 1e-3): "
                     f"{'yes' if nonuniform else 'no'}; identity = (1 - tau)/K = {m['q_identity_expected']:.4f}: "
                     f"{'yes' if identity else 'no'}; deterministic: {'yes' if determ else 'no'}")
    summary = "; ".join(parts)
    if mode != "full":
        return "report", f"{'smoke' if mode == 'smoke' else 'indicative (quick, same protocol)'}: {summary}"
    return ("pass" if ok else "fail"), summary


CLAIM = ("Sampling training examples with probability proportional to their gradient norms (PA&DA) lowers "
         "the variance of the stochastic gradient")

VARIANCE = register(Experiment(
    id="pada.variance",
    claim=CLAIM + "; with fresh scores the batch-gradient variance falls well below uniform sampling's.",
    baseline="uniform sampling of the same examples at the same parameters (exact variance, paired)",
    metric="exact batch-32 variance of the reweighted gradient estimator, divided by uniform sampling's, "
           "averaged over the diagnostic epochs (4..9 of 10)",
    primary_metric="fresh_ratio",
    pass_rule=f"fresh-proxy ratio < {FRESH_MAX} in every seed (0-4) and optimal (p ∝ ||g_i||) <= fresh in every "
              "seed and epoch; quick: seed 0, 6 epochs, same rule (indicative); the lagged ratio is reported",
    grids={mode: Grid(("pada_reweight",), (LR,), SEEDS[mode], {"full": 600.0, "quick": 30.0, "smoke": 30.0}[mode])
           for mode in EPOCHS},
    run=run, verdict=verdict_variance, shared_key=shared_key,
))

ACCURACY = register(Experiment(
    id="pada.accuracy",
    claim="PA&DA's data sampler (official behaviour, no loss correction) trains as well as uniform shuffling.",
    baseline="uniform shuffling, same initialisation and data generator per seed",
    metric="test accuracy (%) after 10 epochs",
    primary_metric="test_acc",
    pass_rule=f"mean paired gap (pada - uniform, seeds 0-4) >= {GAP_MIN} points; quick and smoke report only",
    grids={mode: Grid(("uniform", "pada"), (LR,), SEEDS[mode], {"full": 600.0, "quick": 30.0, "smoke": 30.0}[mode])
           for mode in EPOCHS},
    run=run, verdict=verdict_accuracy, shared_key=shared_key,
))

REPORT = register(Experiment(
    id="pada.report",
    claim="Report only: the official one-epoch-stale scores' variance ratio, and the accuracy with the "
          "importance-weight loss correction (reweight=True).",
    baseline="uniform sampling",
    metric="lagged variance ratio (flag > 2) and test accuracy (%) of the reweighted arm",
    primary_metric="test_acc",
    pass_rule="report-only (the sheet: stale scores can raise the variance on this fast-fitting task, and the "
              "reweighted arm's 4-5-point seed spread swamps any 1-point rule)",
    grids={mode: Grid(("uniform", "pada_reweight"), (LR,), SEEDS[mode],
                      {"full": 600.0, "quick": 30.0, "smoke": 30.0}[mode]) for mode in EPOCHS},
    run=run, verdict=verdict_report, shared_key=shared_key,
))

PATH_SAMPLER = register(Experiment(
    id="pada.path_sampler",
    claim="PA&DA's path sampler concentrates on the operations with large gradient norms; parameter-free "
          "operations keep only the uniform share (1 - tau)/K, as in the official code.",
    baseline="the uniform path distribution",
    metric="the path distribution after training (4 edges x {linear, MLP, identity}, 10 epochs)",
    primary_metric="q_identity",
    pass_rule="one seed: distribution non-uniform, identity probability = (1 - tau)/K to 1e-12, and a rerun "
              "with the same seed identical; quick (same protocol) and smoke report only",
    grids={"full": Grid(("pada_path",), (LR,), (0,), 300.0), "quick": Grid(("pada_path",), (LR,), (0,), 30.0),
           "smoke": Grid(("pada_path",), (LR,), (0,), 30.0)},
    run=run_path, verdict=verdict_path,
))
