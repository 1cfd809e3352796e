"""Claim checks of Normalize-and-Project (Lyle et al. 2024): under non-stationarity a normalized network's
weight norms grow, so its effective learning rate decays; NaP holds the norms, and the ELR, fixed.

Task (the sheet's synthetic plasticity test): random-label memorisation on the first 512 images of
scikit-learn's ``load_digits`` (pixels / 16, flattened to 64), 12 tasks; each task draws fresh random labels
and trains 250 Adam steps (lr 1e-3, batch 64 drawn with replacement from the 512); labels and batches come from
a generator seeded by the run seed, so both arms of a seed see the same labels and batches; Adam's state is
kept across tasks. Model: MLP 64-128-128-10 with ReLU, PyTorch's default init after ``torch.manual_seed(seed)``,
then :func:`normlab.reparam.nap.add_nap` (LayerNorm before each ReLU, bias-free hidden Linears). Arms:
``ln`` (that model, no projection) and ``nap`` (the same plus :class:`~normlab.reparam.nap.NaPProjector`,
layer-wise, every LayerNorm's (g, beta) projected). Outcome per task: training accuracy on the task's labels
after its last step (all 512 images); first-3 and last-3 task means. Weight norms of the two hidden Linears
(the tensors the projector selects, found scale invariant numerically by
:func:`normlab.analysis.effective_lr.scale_invariant_parameters` as a cross-check) are recorded at every task end.

``nap`` (gate, the mechanism): pass iff in every seed of {0, 1, 2} LN-only's hidden-weight norms grow >= 1.4x
(each tensor, final / initial: its ELR lr/||W|| falls by as much) and NaP's stay within 1e-5 (relative) of their
initial values at every task end (its ELR is constant).
``nap.accuracy`` (report only, inside the seed noise per the sheet: paired gap +0.014 +- 0.034): NaP last-3 >=
LN-only last-3 + 0.03, and whether NaP's first-3 -> last-3 drop is smaller, per seed.
Quick: the full protocol on seed 0 only (about 6 CPU-s), both checks report-only (indicative). Smoke: 4
tasks of 5 steps, report.
"""

from __future__ import annotations

from statistics import fmean, pstdev

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.effective_lr import effective_lr, scale_invariant_parameters
from ...reparam.nap import NaPProjector, add_nap
from ..experiment import Experiment, Grid, Record, records_mode, register

ARMS = ("ln", "nap")
LR, BATCH, N_IMAGES, CLASSES = 1e-3, 64, 512, 10
TASKS = {"full": 12, "quick": 12, "smoke": 4}
STEPS = {"full": 250, "quick": 250, "smoke": 5}
WINDOW = 3
GROWTH_MIN = 1.4       # LN-only hidden-weight norm growth, every tensor, every seed
HOLD_TOL = 1e-5        # NaP relative deviation from the initial norm
GAP_TARGET = 0.03      # report-only accuracy gap


def images() -> torch.Tensor:
    """The first 512 digits, pixels / 16, flattened ``(512, 64)``."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:N_IMAGES] / 16.0, dtype=torch.float32)


def build_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    add_nap(model)
    return model


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    x = images()
    model = build_model(seed)
    gen = torch.Generator().manual_seed(seed)
    projector = NaPProjector(model) if arm == "nap" else None
    hidden = projector.weight_names if projector else NaPProjector(model).weight_names
    params = dict(model.named_parameters())
    init = {n: params[n].detach().norm().item() for n in hidden}
    labels = torch.randint(0, CLASSES, (N_IMAGES,), generator=gen)
    detected = scale_invariant_parameters(model, F.cross_entropy, x, labels, params=list(params))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    accs, norms, elrs = [], {n: [] for n in hidden}, []
    for task in range(TASKS[mode]):
        if task:
            labels = torch.randint(0, CLASSES, (N_IMAGES,), generator=gen)
        for _ in range(STEPS[mode]):
            idx = torch.randint(0, N_IMAGES, (BATCH,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if projector is not None:
                projector.step()
        with torch.no_grad():
            accs.append((model(x).argmax(1) == labels).double().mean().item())
        for n in hidden:
            norms[n].append(params[n].detach().norm().item())
        elrs.append(min(effective_lr(model, lr, "adam", hidden).values()))
    growth = [norms[n][-1] / init[n] for n in hidden]
    deviation = max(abs(v / init[n] - 1) for n in hidden for v in norms[n])
    k = min(WINDOW, len(accs))
    metrics = {"first3_acc": fmean(accs[:k]), "last3_acc": fmean(accs[-k:]), "final_acc": accs[-1],
               "norm_growth_min": min(growth), "norm_growth_max": max(growth), "norm_deviation_max": deviation,
               "init_norm_mean": fmean(init.values()), "final_norm_mean": fmean(norms[n][-1] for n in hidden),
               "elr_ratio_final": elrs[-1] / (lr / max(init.values())),
               "hidden_detected_invariant": float(all(n in detected for n in hidden))}
    metrics["drop"] = metrics["first3_acc"] - metrics["last3_acc"]
    curves = {"task_acc": [[t + 1, a] for t, a in enumerate(accs)],
              "hidden_norm_mean": [[t + 1, fmean(norms[n][t] for n in hidden)] for t in range(len(accs))],
              "min_elr_adam": [[t + 1, e] for t, e in enumerate(elrs)]}
    return {"metrics": metrics, "curves": curves}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """Both checks read the same runs."""
    return f"nap-random-label-digits/{arm}/lr={lr!r}/seed={seed}/{mode}"


def _per_seed(records: list[Record], arm: str) -> dict[int, dict]:
    return {r["seed"]: r["metrics"] for r in records if r["arm"] == arm}


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    ln, nap = _per_seed(records, "ln"), _per_seed(records, "nap")
    seeds = sorted(set(ln) & set(nap))
    grows = [ln[s]["norm_growth_min"] >= GROWTH_MIN for s in seeds]
    holds = [nap[s]["norm_deviation_max"] <= HOLD_TOL for s in seeds]
    detected = all(m["hidden_detected_invariant"] == 1.0 for m in (*ln.values(), *nap.values()))
    numbers = "; ".join(
        f"seed {s}: LN-only norm growth {ln[s]['norm_growth_min']:.2f}-{ln[s]['norm_growth_max']:.2f}x "
        f"({ln[s]['init_norm_mean']:.2f} -> {ln[s]['final_norm_mean']:.2f}), NaP max rel. deviation "
        f"{nap[s]['norm_deviation_max']:.1e}" for s in seeds)
    checks = (f"LN-only growth >= {GROWTH_MIN}x in every seed: {'yes' if all(grows) else 'no'} "
              f"({sum(grows)}/{len(seeds)}); NaP within {HOLD_TOL:g} in every seed: {'yes' if all(holds) else 'no'} "
              f"({sum(holds)}/{len(seeds)}); hidden weights detected scale invariant numerically: "
              f"{'yes' if detected else 'no'}")
    if mode != "full":
        label = "indicative (quick: seed 0 only)" if mode == "quick" else "smoke"
        return "report", f"{label}: {checks}. {numbers}"
    status = "pass" if seeds and all(grows) and all(holds) else "fail"
    return status, f"{checks}. {numbers}"


def verdict_accuracy(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    ln, nap = _per_seed(records, "ln"), _per_seed(records, "nap")
    seeds = sorted(set(ln) & set(nap))
    gaps = [nap[s]["last3_acc"] - ln[s]["last3_acc"] for s in seeds]
    less = [nap[s]["drop"] < ln[s]["drop"] for s in seeds]
    mean_gap = fmean(gaps)
    spread = pstdev(gaps) if len(gaps) > 1 else 0.0
    first = {a: fmean(m["first3_acc"] for m in d.values()) for a, d in (("ln", ln), ("nap", nap))}
    last = {a: fmean(m["last3_acc"] for m in d.values()) for a, d in (("ln", ln), ("nap", nap))}
    label = {"full": "report only (inside the seed noise per the sheet)", "quick": "indicative (quick: seed 0)",
             "smoke": "smoke"}[mode]
    return "report", (
        f"{label}: first-3 -> last-3 mean train accuracy: LN-only {first['ln']:.3f} -> {last['ln']:.3f}, NaP "
        f"{first['nap']:.3f} -> {last['nap']:.3f}; paired last-3 gap NaP - LN-only per seed "
        f"{', '.join(f'{g:+.3f}' for g in gaps)} (mean {mean_gap:+.3f} +- {spread:.3f}); gap >= {GAP_TARGET}: "
        f"{'yes' if mean_gap >= GAP_TARGET else 'no'}; NaP drops less in {sum(less)}/{len(seeds)} seed(s)")


GRIDS = {"full": Grid(ARMS, (LR,), (0, 1, 2), 1200.0), "quick": Grid(ARMS, (LR,), (0,), 30.0),
         "smoke": Grid(ARMS, (LR,), (0,), 10.0)}

EXPERIMENT = register(Experiment(
    id="nap",
    claim="Under non-stationarity a LayerNorm MLP's hidden-weight norms grow, so its effective learning rate "
          "lr/||W|| decays; Normalize-and-Project holds the norms (and the ELR) at their initial values.",
    baseline="the same LayerNorm MLP (add_nap's LNs, bias-free hidden Linears) without projection",
    metric="per hidden weight, final / initial Frobenius norm (LN-only) and max relative deviation from the "
           "initial norm over task ends (NaP); random-label digits, 12 tasks x 250 Adam steps",
    primary_metric="norm_growth_min",
    pass_rule="seeds {0, 1, 2}, lr 1e-3: pass iff in every seed LN-only's hidden-weight norms grow >= 1.4x "
              "(each tensor) and NaP's stay within 1e-5 (relative) of their initial values. Quick: seed 0, report",
    grids=GRIDS,
    run=run,
    verdict=verdict,
    shared_key=shared_key,
))

ACCURACY_EXPERIMENT = register(Experiment(
    id="nap.accuracy",
    claim="NaP keeps plasticity: on the last tasks it memorises random labels better than LN-only "
          "(NaP last-3 >= LN-only last-3 + 0.03) and its accuracy drops less from the first tasks.",
    baseline="the same LayerNorm MLP without projection, same labels and batches per seed",
    metric="training accuracy on each task's labels after its 250 steps; mean of the last 3 tasks vs the first 3",
    primary_metric="last3_acc",
    pass_rule="report only (the sheet measured +0.014 +- 0.034 over seeds 0-2, inside the seed noise): the paired "
              "last-3 gap per seed and the number of seeds where NaP's drop is smaller",
    grids=GRIDS,
    run=run,
    verdict=verdict_accuracy,
    shared_key=shared_key,
))
