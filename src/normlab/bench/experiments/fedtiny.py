"""Claim check of FedTiny (Huang et al., ICDCS 2023): adaptive BN selection plus progressive pruning gives a
more accurate tiny model than magnitude pruning at the same density across non-IID clients, for a small
increase in traffic.

Protocol (the sheet's "Verification b", scaled): scikit-learn digits as 1x8x8 images in [0, 1]; per seed a
seeded permutation puts 25 % in a shared test set and splits the rest over 10 clients by Dirichlet(0.5) per
label (redrawn until every client has >= 10 examples). Model: conv3x3 1->16 (no bias, padding 1) -> BN ->
ReLU -> maxpool 2 -> conv3x3 16->32 (no bias) -> BN -> ReLU -> maxpool 2 -> linear 128->10; prunable = the
three weights (6,032), density 0.05 (302 kept). Full participation, 40 rounds, 1 local epoch, batch 32
(a trailing batch of 1 is dropped), plain SGD lr 0.05. FedTiny: C = 10 candidates from the random init,
B_bn = 10, alpha = 0.3, ΔR = 5, R_end = 30. Every arm of a seed starts from the same init, split and
client batch order. Arms:

- ``fedtiny``: (i) adaptive BN selection + progressive pruning;
- ``magnitude``: (ii) the ERK candidate c = 0 (magnitude pruning at init), default BN stats, fixed mask;
- ``random_candidate``: (iii) a uniformly drawn candidate (``randint(10)`` from a generator seeded
  ``10_000 + seed``) + progressive pruning, default BN stats;
- ``dense``: (iv) dense FedAvg;
- ``spearman`` (report only, full mode): for each of the 10 candidates, its pooled loss with re-estimated
  BN statistics (module 1) and with the stale statistics of the fresh init, and its test accuracy after 10
  fixed-mask FedAvg rounds; Spearman rho(-L_c, accuracy) for both losses.

Ids: ``fedtiny`` (gate, fixed in advance, seeds 0-4: (1) mean (i) - mean (ii) >= 3.0 points and (i) > (ii)
in >= 4 of 5 seeds; (2) bytes(i) <= 0.15 bytes(iv) and bytes(i) <= 1.5 bytes(ii); (3) (iv) >= 95 %; (4) the
selected candidate's aggregated loss is the minimum in every seed) and ``fedtiny.report`` (report-only:
(i) vs (iii) per seed, and the Spearman diagnostic). Quick: seed 0, arms (i) and (ii) (the report adds
(iii), no Spearman), the same protocol, status report (indicative). Smoke: 4 rounds, 3 candidates, ΔR = 2,
Spearman after 2 rounds, report.
"""

from __future__ import annotations

from statistics import fmean, stdev

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from ...training.fedtiny import FedTiny, adaptive_bn_selection, apply_masks, candidate_masks
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register

ARMS = ("fedtiny", "magnitude", "random_candidate", "dense", "spearman")
GATE_ARMS = ("fedtiny", "magnitude", "dense")
REPORT_ARMS = ("fedtiny", "random_candidate")
SPEARMAN_ROUNDS = {"full": 10, "quick": 10, "smoke": 2}
DENSITY, NUM_CLIENTS, DIRICHLET, MIN_CLIENT, TEST_FRACTION = 0.05, 10, 0.5, 10, 0.25
LR, BATCH = 0.05, 32
PROTOCOL = {"full": {"rounds": 40, "num_candidates": 10, "delta_rounds": 5},
            "quick": {"rounds": 40, "num_candidates": 10, "delta_rounds": 5},
            "smoke": {"rounds": 4, "num_candidates": 3, "delta_rounds": 2}}
SEEDS = {"full": (0, 1, 2, 3, 4), "quick": (0,), "smoke": (0,)}
GAP_MIN, WINS_MIN = 3.0, 4          # (1): points, seeds out of 5
DENSE_RATIO_MAX, MAGNITUDE_RATIO_MAX, DENSE_ACC_MIN = 0.15, 1.5, 95.0


def federated_digits(seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """10 non-IID clients (Dirichlet(0.5) per label, each >= 10 examples) and the shared 25 % test set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = round(TEST_FRACTION * len(y))
    test, train = perm[:n_test], perm[n_test:]
    labels = data.target[train]
    while True:
        parts: list[list[int]] = [[] for _ in range(NUM_CLIENTS)]
        for c in range(10):
            idx = train[labels == c]
            cuts = (np.cumsum(rng.dirichlet(np.full(NUM_CLIENTS, DIRICHLET))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_CLIENT:
            break
    clients = [(x[torch.tensor(p)], y[torch.tensor(p)]) for p in parts]
    return clients, (x[torch.tensor(test)], y[torch.tensor(test)])


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128, 10))


def random_candidate(seed: int, num_candidates: int) -> int:
    return int(torch.randint(num_candidates, (1,), generator=torch.Generator().manual_seed(10_000 + seed)))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (scipy's, average ranks for ties); NaN when one side is constant."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _accuracy(x_test: torch.Tensor, y_test: torch.Tensor):
    def accuracy(m: nn.Module) -> float:
        return 100.0 * (m(x_test).argmax(1) == y_test).double().mean().item()
    return accuracy


def run_spearman(seed: int, mode: str) -> dict:
    """The sheet's diagnostic: does a candidate's loss predict its accuracy after a few fixed-mask rounds?
    rho(-L_c, accuracy) with re-estimated (module 1) and with stale (initial default) BN statistics."""
    cfg = PROTOCOL[mode]
    clients, (x_test, y_test) = federated_digits(seed)
    torch.manual_seed(seed)
    model = digits_cnn()
    cands = candidate_masks(model, DENSITY, cfg["num_candidates"], torch.Generator().manual_seed(seed))
    _, reestimated, _ = adaptive_bn_selection(model, cands, clients, batch_size=BATCH)
    sizes = [len(y) for _, y in clients]
    stale, accs = [], []
    for c, mask in enumerate(cands):
        masked = digits_cnn()
        masked.load_state_dict(model.state_dict())
        apply_masks(masked, mask)
        masked.eval()
        with torch.no_grad():
            losses = [float(F.cross_entropy(masked(x), y)) for x, y in clients]
        stale.append(sum(n * v for n, v in zip(sizes, losses)) / sum(sizes))
        sim = FedTiny(masked, clients, DENSITY, num_candidates=cfg["num_candidates"], selection=c,
                      progressive=False, lr=LR, batch_size=BATCH, seed=seed)
        accs.append(sim.run(SPEARMAN_ROUNDS[mode], eval_fn=_accuracy(x_test, y_test))["test_acc"][-1][1])
    neg_re = [-float(v) for v in reestimated]
    metrics = {"rho_reestimated": spearman(neg_re, accs), "rho_stale": spearman([-v for v in stale], accs),
               "loss_reestimated_min": -max(neg_re), "loss_reestimated_max": -min(neg_re),
               "loss_stale_min": min(stale), "loss_stale_max": max(stale)}
    curves = {"candidate_acc_fixed_mask": [[c, a] for c, a in enumerate(accs)],
              "candidate_loss_reestimated": [[c, -v] for c, v in enumerate(neg_re)],
              "candidate_loss_stale": [[c, v] for c, v in enumerate(stale)]}
    return {"metrics": metrics, "curves": curves}


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    if arm == "spearman":
        return run_spearman(seed, mode)
    cfg = PROTOCOL[mode]
    clients, (x_test, y_test) = federated_digits(seed)
    torch.manual_seed(seed)
    model = digits_cnn()
    kw = {"fedtiny": {}, "magnitude": {"selection": 0, "progressive": False},
          "random_candidate": {"selection": random_candidate(seed, cfg["num_candidates"])}, "dense": {}}[arm]
    sim = FedTiny(model, clients, 1.0 if arm == "dense" else DENSITY, num_candidates=cfg["num_candidates"],
                  delta_rounds=cfg["delta_rounds"], lr=LR, batch_size=BATCH, seed=seed, **kw)
    history = sim.run(cfg["rounds"], eval_fn=_accuracy(x_test, y_test))
    metrics = {"test_acc": history["test_acc"][-1][1], "bytes": float(sim.bytes_sent),
               "bytes_mb": sim.bytes_sent / 1e6, "mask_changes": float(len(history["mask_changes"])),
               "selected": float(-1 if sim.selected is None else sim.selected)}
    curves = {"test_acc": history["test_acc"],
              "bytes_mb": [[t, b / 1e6] for t, b in history["bytes"]]}
    if arm == "fedtiny":
        losses = history["candidate_losses"]
        metrics.update(selected_loss=losses[sim.selected], min_candidate_loss=min(losses),
                       max_candidate_loss=max(losses),
                       selected_is_min=float(losses[sim.selected] == min(losses)))
        curves["candidate_loss"] = [[c, v] for c, v in enumerate(losses)]
    return {"metrics": metrics, "curves": curves}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """Both checks read the same runs."""
    return f"fedtiny/{arm}/seed={seed}/{mode}"


def _per_arm(records: list[Record], metric: str) -> dict[str, list[float]]:
    return {arm: vals for (arm, _), vals in records_by_arm(records, metric).items()}


def _fmt(vals: list[float]) -> str:
    spread = f" ± {stdev(vals):.1f}" if len(vals) > 1 else ""
    return f"{fmean(vals):.1f}{spread} % ({' / '.join(f'{v:.1f}' for v in vals)})"


def _label(mode: str) -> str:
    return {"quick": "indicative (quick: seed 0, 40 rounds, not a gate)", "smoke": "smoke"}[mode]


def verdict(records: list[Record]) -> tuple[str, str]:
    full = {r["mode"] for r in records} == {"full"}
    mode = records_mode(records, GATE_ARMS if full else ("fedtiny", "magnitude"))
    acc, mb = _per_arm(records, "test_acc"), _per_arm(records, "bytes_mb")
    selected_min = [r["metrics"]["selected_is_min"] for r in records if r["arm"] == "fedtiny"]
    gaps = [a - b for a, b in zip(acc["fedtiny"], acc["magnitude"])]
    wins = sum(g > 0 for g in gaps)
    ratio_mag = fmean(mb["fedtiny"]) / fmean(mb["magnitude"])
    parts = [f"(i) FedTiny {_fmt(acc['fedtiny'])}, {fmean(mb['fedtiny']):.2f} MB",
             f"(ii) magnitude {_fmt(acc['magnitude'])}, {fmean(mb['magnitude']):.2f} MB",
             f"(1) (i) - (ii) per seed {', '.join(f'{g:+.1f}' for g in gaps)}: mean {fmean(gaps):+.1f} "
             f"(need >= {GAP_MIN}), wins {wins}/{len(gaps)}" + (f" (need >= {WINS_MIN})" if full else "")]
    ok1 = fmean(gaps) >= GAP_MIN and wins >= WINS_MIN
    if full:
        parts[-1] += f": {'yes' if ok1 else 'no'}"
    ok4 = all(v == 1.0 for v in selected_min)
    if mode != "full":
        parts += [f"bytes (i)/(ii) {ratio_mag:.2f}",
                  f"(4) selected candidate's loss is the minimum: {'yes' if ok4 else 'no'}"]
        return "report", f"{_label(mode)}: " + "; ".join(parts)
    ratio_dense = fmean(mb["fedtiny"]) / fmean(mb["dense"])
    ok2 = ratio_dense <= DENSE_RATIO_MAX and ratio_mag <= MAGNITUDE_RATIO_MAX
    ok3 = fmean(acc["dense"]) >= DENSE_ACC_MIN
    parts = parts[:2] + [f"(iv) dense {_fmt(acc['dense'])}, {fmean(mb['dense']):.2f} MB"] + parts[2:] + [
        f"(2) bytes (i)/(iv) {ratio_dense:.3f} (need <= {DENSE_RATIO_MAX}), (i)/(ii) {ratio_mag:.2f} "
        f"(need <= {MAGNITUDE_RATIO_MAX}): {'yes' if ok2 else 'no'}",
        f"(3) dense mean {fmean(acc['dense']):.1f} % (need >= {DENSE_ACC_MIN}): {'yes' if ok3 else 'no'}",
        f"(4) selected candidate's aggregated loss is the minimum in {sum(v == 1.0 for v in selected_min)}/"
        f"{len(selected_min)} seeds: {'yes' if ok4 else 'no'}"]
    return ("pass" if ok1 and ok2 and ok3 and ok4 else "fail"), "; ".join(parts)


def verdict_report(records: list[Record]) -> tuple[str, str]:
    full = {r["mode"] for r in records} == {"full"}
    mode = records_mode(records, (*REPORT_ARMS, "spearman") if full else REPORT_ARMS)
    main = [r for r in records if r["arm"] in REPORT_ARMS]
    acc, mb = _per_arm(main, "test_acc"), _per_arm(main, "bytes_mb")
    picks = [int(r["metrics"]["selected"]) for r in sorted(main, key=lambda r: r["seed"])
             if r["arm"] == "random_candidate"]
    gaps = [a - b for a, b in zip(acc["fedtiny"], acc["random_candidate"])]
    summary = (f"(i) FedTiny {_fmt(acc['fedtiny'])}, {fmean(mb['fedtiny']):.2f} MB; (iii) random candidate "
               f"{_fmt(acc['random_candidate'])} (candidates {picks}), {fmean(mb['random_candidate']):.2f} MB; "
               f"(i) - (iii) per seed {', '.join(f'{g:+.1f}' for g in gaps)}, mean {fmean(gaps):+.1f}, "
               f"range {min(gaps):+.1f} … {max(gaps):+.1f}")
    sp = sorted((r for r in records if r["arm"] == "spearman"), key=lambda r: r["seed"])
    if sp:
        re_rho = [r["metrics"]["rho_reestimated"] for r in sp]
        st_rho = [r["metrics"]["rho_stale"] for r in sp]
        better = sum(a > b for a, b in zip(re_rho, st_rho))
        m = [r["metrics"] for r in sp]
        lo_re, hi_re = min(x["loss_reestimated_min"] for x in m), max(x["loss_reestimated_max"] for x in m)
        lo_st, hi_st = min(x["loss_stale_min"] for x in m), max(x["loss_stale_max"] for x in m)
        summary += (f"; Spearman rho(-L_c, accuracy after {SPEARMAN_ROUNDS[mode]} fixed-mask rounds): re-estimated BN "
                    f"{' / '.join(f'{v:+.2f}' for v in re_rho)} (mean {np.nanmean(re_rho):+.2f}), stale BN "
                    f"{' / '.join(f'{v:+.2f}' for v in st_rho)} (mean {np.nanmean(st_rho):+.2f}), re-estimated "
                    f"higher in {better}/{len(sp)} seeds; candidate losses re-estimated {lo_re:.3f}–{hi_re:.3f}, "
                    f"stale {lo_st:.3f}–{hi_st:.3f}")
    elif not full:
        summary += "; Spearman diagnostic: full mode only"
    return "report", (f"{_label(mode)}: " if mode != "full" else "") + summary


CLAIM = ("FedTiny (adaptive BN selection of a coarse-pruned candidate + progressive prune-and-grow) reaches a "
         "higher accuracy than magnitude pruning at the same 5 % density across 10 non-IID clients, at a "
         "small traffic cost")
METRIC = "test accuracy (%) after 40 FedAvg rounds; bytes sent (MB, both directions, all clients)"


def _grids(arms_quick: tuple[str, ...], arms_full: tuple[str, ...]) -> dict[str, Grid]:
    return {"full": Grid(arms_full, (LR,), SEEDS["full"], 1200.0),
            "quick": Grid(arms_quick, (LR,), SEEDS["quick"], 60.0),
            "smoke": Grid(arms_quick, (LR,), SEEDS["smoke"], 60.0)}


GATE = register(Experiment(
    id="fedtiny",
    claim=CLAIM + ".",
    baseline="magnitude pruning at init (ERK allocation, default BN stats, fixed mask), same init, split, batches",
    metric=METRIC,
    primary_metric="test_acc",
    pass_rule=(f"seeds 0-4: (1) mean (i) - mean (ii) >= {GAP_MIN} points and (i) > (ii) in >= {WINS_MIN} of 5; "
               f"(2) bytes(i) <= {DENSE_RATIO_MAX} bytes(dense) and <= {MAGNITUDE_RATIO_MAX} bytes(ii); "
               f"(3) dense >= {DENSE_ACC_MIN} %; (4) the selected candidate's aggregated loss is the minimum; "
               "quick (seed 0, (i) and (ii)) and smoke report only"),
    grids=_grids(("fedtiny", "magnitude"), GATE_ARMS),
    run=run, verdict=verdict, shared_key=shared_key,
))

REPORT = register(Experiment(
    id="fedtiny.report",
    claim="Report only: FedTiny vs a uniformly drawn candidate with the same progressive pruning (is the "
          "adaptive BN choice better than chance?).",
    baseline="a uniformly drawn candidate + progressive pruning, default BN stats",
    metric=METRIC,
    primary_metric="test_acc",
    pass_rule="report-only (the sheet: a random draw is sometimes the better mask, −10.5 … +42.3 points)",
    grids={"full": Grid((*REPORT_ARMS, "spearman"), (LR,), SEEDS["full"], 1200.0),
           "quick": Grid(REPORT_ARMS, (LR,), SEEDS["quick"], 60.0),
           "smoke": Grid((*REPORT_ARMS, "spearman"), (LR,), SEEDS["smoke"], 60.0)},
    run=run, verdict=verdict_report, shared_key=shared_key,
))
