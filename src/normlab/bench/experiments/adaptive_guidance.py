"""Claim check of Adaptive Guidance (Castillo et al. 2023): switching classifier-free guidance off per sample
once the conditional and the guided predictions align saves network evaluations (NFE) at CFG-level quality.

Protocol (the sheet's "Verification b"): a class-conditional DDPM on the digits
(:func:`normlab.bench.tasks.train_digits_ddpm`: MLP denoiser, 20 % label dropout, T = 100 linear betas
1e-4..0.05, 2,500 Adam steps) per training seed {0, 1, 2}; DDPM ancestral sampling over all N = 100 steps,
guidance scale s = 3, 1,000 samples (100 per class), one fixed noise seed, so that every policy sees the same
initial and per-step noise. Policies: plain CFG, conditional only, AG at each threshold of the grids
(x0 space {0.9, 0.95, 0.98, 0.99, 0.995, 0.999}, epsilon space {0.96, 0.97, 0.975, 0.98, 0.99}) and, for
each AG point with NFE ratio r, fixed truncation (CFG on the first k steps) at the matched k = round(N (2r - 1)).
Quality: accuracy of a logistic-regression classifier fitted on the real digits, and RMSE to the CFG
samples drawn with the same noise. NFE ratio = NFE / (2 N b). The batch-mean cosine along the trajectory
is measured with AG never firing (threshold inf) in both spaces.

One run per seed (arm ``sweep``) evaluates every policy and records all metrics; two ids share it:

- ``adaptive_guidance.x0`` (gated): (1) the NFE counted by the policy equals the rows the network received
  and N b + the guided sample-steps at every grid point (2 N b for CFG); (2) some threshold reaches NFE
  ratio <= 0.85 with accuracy >= 0.97 (seed means); (3) at every threshold, RMSE(AG) <= RMSE(truncation at
  matched NFE) + 0.03 (seed means).
- ``adaptive_guidance.eps`` (the paper's space): the premise holds iff the batch-mean cosine at the last
  step exceeds that at the first (seed means). If it holds: gate "at every threshold with NFE ratio < 1,
  AG accuracy >= truncation accuracy at matched NFE - 0.02"; if not, status ``report`` ("premise not met").

Quick and smoke modes shrink training, samples and seeds and only report (indicative).
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import torch

from ...training.guidance import AdaptiveGuidance, TruncatedGuidance, ddpm_sample
from ..experiment import Experiment, Grid, Record, records_mode, register
from ..tasks import DIGITS_NULL_LABEL, digits_classifier_predict, train_digits_ddpm

SCALE = 3.0
NOISE_SEED = 0
GRID_X0 = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
GRID_EPS = (0.96, 0.97, 0.975, 0.98, 0.99)
SPACES = {"x0": GRID_X0, "eps": GRID_EPS}
ARMS = ("sweep",)
# mode -> (training steps, samples per class)
SIZES = {"full": (2500, 100), "quick": (800, 20), "smoke": (20, 2)}
NFE_RATIO_MAX, ACC_MIN, RMSE_MARGIN, EPS_ACC_MARGIN = 0.85, 0.97, 0.03, 0.02


class _Counter:
    """Wraps the denoiser (no grad) and counts the rows it receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.rows = model, 0

    def __call__(self, x, t, c):
        self.rows += x.shape[0]
        with torch.no_grad():
            return self.model(x, t, c)


def matched_truncation(ratio: float, num_steps: int) -> int:
    """k = round(N (2 r - 1)): the truncation with the NFE ratio r."""
    return max(0, min(num_steps, round(num_steps * (2 * ratio - 1))))


def key(space: str, threshold: float, what: str) -> str:
    return f"{space}_{threshold:g}_{what}"


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict[str, Any]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    train_steps, per_class = SIZES[mode]
    model, schedule = train_digits_ddpm(seed, train_steps)
    n_steps = schedule.num_steps
    labels = torch.arange(10).repeat_interleave(per_class)
    b = len(labels)

    def sample(policy):
        counter = _Counter(model)
        x, info = ddpm_sample(counter, schedule, policy, labels, DIGITS_NULL_LABEL, (b, 64),
                              torch.Generator().manual_seed(NOISE_SEED))
        exact = info["nfe"] == counter.rows == n_steps * b + sum(info["guided"])
        return x, info, exact

    def accuracy(x):
        return (digits_classifier_predict(x) == labels).double().mean().item()

    cfg, info_cfg, exact_cfg = sample(AdaptiveGuidance(SCALE, math.inf, space="eps"))
    _, info_cfg_x0, exact_cfg_x0 = sample(AdaptiveGuidance(SCALE, math.inf, space="x0"))

    def rmse(x):
        return (x - cfg).pow(2).mean().sqrt().item()

    cond, info_cond, exact_cond = sample(TruncatedGuidance(SCALE, 0))
    metrics = {"cfg_acc": accuracy(cfg), "cfg_nfe_ratio": info_cfg["nfe"] / (2 * n_steps * b),
               "cond_acc": accuracy(cond), "cond_rmse": rmse(cond),
               "cond_nfe_ratio": info_cond["nfe"] / (2 * n_steps * b),
               "cfg_nfe_exact": float(exact_cfg and exact_cfg_x0 and info_cfg["nfe"] == 2 * n_steps * b
                                      and exact_cond)}
    curves = {}
    for space, info in (("eps", info_cfg), ("x0", info_cfg_x0)):
        cos = info["cosine"]
        metrics[f"cos_{space}_first"], metrics[f"cos_{space}_last"] = cos[0], cos[-1]
        curves[f"cosine_{space}"] = [[i, c] for i, c in enumerate(cos)]
    truncations: dict[int, tuple[float, float]] = {}
    for space, grid in SPACES.items():
        for threshold in grid:
            x, info, exact = sample(AdaptiveGuidance(SCALE, threshold, space=space))
            ratio = info["nfe"] / (2 * n_steps * b)
            k = matched_truncation(ratio, n_steps)
            if k not in truncations:
                xt, _, exact_t = sample(TruncatedGuidance(SCALE, k))
                truncations[k] = (accuracy(xt), rmse(xt), float(exact_t))
            acc_t, rmse_t, exact_t = truncations[k]
            metrics.update({key(space, threshold, "nfe_ratio"): ratio, key(space, threshold, "acc"): accuracy(x),
                            key(space, threshold, "rmse"): rmse(x), key(space, threshold, "nfe_exact"): float(exact),
                            key(space, threshold, "trunc_k"): float(k), key(space, threshold, "trunc_acc"): acc_t,
                            key(space, threshold, "trunc_rmse"): rmse_t,
                            key(space, threshold, "trunc_nfe_exact"): exact_t})
    return {"metrics": metrics, "curves": curves}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """Both checks read the same sweep."""
    return f"adaptive_guidance-digits-ddpm/{arm}/seed={seed}/{mode}"


def _mean(records: Sequence[Record], name: str) -> float:
    return fmean(r["metrics"][name] for r in records)


def _label(mode: str, n_seeds: int) -> str:
    steps, per_class = SIZES[mode]
    return {"full": "", "quick": f"indicative (quick: {steps} training steps, {10 * per_class} samples, {n_seeds} "
                                 f"seed(s)): ",
            "smoke": "smoke: "}[mode]


def _table(records: Sequence[Record], space: str) -> str:
    def m(g, what):
        return _mean(records, key(space, g, what))

    return "; ".join(f"{g:g}: NFE {m(g, 'nfe_ratio'):.3f}, acc {m(g, 'acc'):.3f} (trunc k={m(g, 'trunc_k'):.0f} "
                     f"{m(g, 'trunc_acc'):.3f}), RMSE {m(g, 'rmse'):.3f} (trunc {m(g, 'trunc_rmse'):.3f})"
                     for g in SPACES[space])


def _baselines(records: Sequence[Record]) -> str:
    return (f"CFG acc {_mean(records, 'cfg_acc'):.3f} at NFE 1.0, conditional only {_mean(records, 'cond_acc'):.3f}"
            f" at {_mean(records, 'cond_nfe_ratio'):.2f}")


def x0_verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    exact = all(r["metrics"]["cfg_nfe_exact"] == 1.0 and all(
        r["metrics"][key("x0", g, w)] == 1.0 for g in GRID_X0 for w in ("nfe_exact", "trunc_nfe_exact"))
        for r in records)
    hits = [g for g in GRID_X0 if _mean(records, key("x0", g, "nfe_ratio")) <= NFE_RATIO_MAX
            and _mean(records, key("x0", g, "acc")) >= ACC_MIN]
    gaps = {g: _mean(records, key("x0", g, "rmse")) - _mean(records, key("x0", g, "trunc_rmse")) for g in GRID_X0}
    rmse_ok = all(gap <= RMSE_MARGIN for gap in gaps.values())
    seeds = sorted(r["seed"] for r in records)
    ordered = sorted(records, key=lambda r: r["seed"])
    per_seed = "; ".join(f"{g:g} per seed " + ", ".join(
        f"{r['metrics'][key('x0', g, 'nfe_ratio')]:.3f}:{r['metrics'][key('x0', g, 'acc')]:.3f}" for r in ordered)
        for g in hits)
    summary = (f"x0 space, seeds {seeds}, means. {_baselines(records)}. AG: {_table(records, 'x0')}. (1) NFE "
               f"accounting exact at every point: {'yes' if exact else 'no'}. (2) threshold(s) with NFE ratio <= "
               f"{NFE_RATIO_MAX} and acc >= {ACC_MIN}: {', '.join(f'{g:g}' for g in hits) or 'none'} "
               f"({'yes' if hits else 'no'}{'; NFE:acc ' + per_seed if per_seed else ''}). (3) RMSE(AG) - "
               f"RMSE(trunc) from {min(gaps.values()):+.3f} to {max(gaps.values()):+.3f} (need <= +{RMSE_MARGIN} "
               f"everywhere: {'yes' if rmse_ok else 'no'}).")
    if mode != "full":
        return "report", _label(mode, len(seeds)) + summary
    return ("pass" if exact and hits and rmse_ok else "fail"), summary


def eps_verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    seeds = sorted(r["seed"] for r in records)
    first, last = _mean(records, "cos_eps_first"), _mean(records, "cos_eps_last")
    first_x0, last_x0 = _mean(records, "cos_x0_first"), _mean(records, "cos_x0_last")
    premise = last > first
    per_seed = ", ".join(f"{r['metrics']['cos_eps_last']:.3f}" for r in sorted(records, key=lambda r: r["seed"]))
    trend = (f"batch-mean cosine (AG never firing), eps space {first:.3f} -> {last:.3f} (last step per seed: "
             f"{per_seed}), x0 space {first_x0:.3f} -> {last_x0:.3f}")
    gaps = {g: _mean(records, key("eps", g, "acc")) - _mean(records, key("eps", g, "trunc_acc")) for g in GRID_EPS
            if _mean(records, key("eps", g, "nfe_ratio")) < 1}
    gap_text = ("AG - truncation accuracy at matched NFE (points with NFE ratio < 1): "
                + (", ".join(f"{g:g}: {d:+.3f}" for g, d in gaps.items()) or "none"))
    gate_ok = all(d >= -EPS_ACC_MARGIN for d in gaps.values())
    table = f"{_baselines(records)}. AG: {_table(records, 'eps')}"
    if not premise:
        return "report", (f"{_label(mode, len(seeds))}premise not met: {trend} (the cosine falls). {table}. "
                          f"{gap_text}.")
    summary = (f"premise met: {trend}. {table}. {gap_text} (need >= -{EPS_ACC_MARGIN} everywhere: "
               f"{'yes' if gate_ok else 'no'}).")
    if mode != "full":
        return "report", _label(mode, len(seeds)) + summary
    return ("pass" if gate_ok else "fail"), summary


def figures(records: Sequence[Record], plots: Path) -> list[str]:
    """``adaptive_guidance.frontier.png``: accuracy and RMSE vs NFE ratio for AG and matched truncation in both
    spaces, and the batch-mean cosine along the trajectory in both spaces (means over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for space, grid, color in (("x0", GRID_X0, "tab:blue"), ("eps", GRID_EPS, "tab:red")):
        ratios = [_mean(records, key(space, g, "nfe_ratio")) for g in grid]
        for ax, what in ((axes[0], "acc"), (axes[1], "rmse")):
            ax.plot(ratios, [_mean(records, key(space, g, what)) for g in grid], "o-", color=color,
                    label=f"AG, {space} space")
            ax.plot(ratios, [_mean(records, key(space, g, f"trunc_{what}")) for g in grid], "s--", color=color,
                    alpha=0.6, label=f"truncation at matched NFE ({space})")
        curves = [r["curves"][f"cosine_{space}"] for r in records]
        steps = [s for s, _ in curves[0]]
        axes[2].plot(steps, [fmean(c[i][1] for c in curves) for i in range(len(steps))], color=color,
                     label=f"{space} space")
    for ax, what in ((axes[0], "cfg_acc"), (axes[1], None)):
        if what:
            ax.plot([1.0], [_mean(records, what)], "k*", markersize=10, label="CFG")
            ax.plot([_mean(records, "cond_nfe_ratio")], [_mean(records, "cond_acc")], "kx", markersize=9,
                    label="conditional only")
    axes[0].set(xlabel="NFE ratio", ylabel="classifier accuracy", title="accuracy vs NFE")
    axes[1].set(xlabel="NFE ratio", ylabel="RMSE to CFG samples", title="RMSE vs NFE")
    axes[2].set(xlabel="sampling step (0 = noisiest)", ylabel="batch-mean cos(eps_c, eps_cfg)",
                title="cosine along the trajectory (AG never firing)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "adaptive_guidance.frontier.png"
    fig.savefig(Path(plots) / name, dpi=100)
    plt.close(fig)
    return [name]


GRIDS = {
    "full": Grid(ARMS, (None,), (0, 1, 2), 1200.0),
    "quick": Grid(ARMS, (None,), (0,), 60.0),
    "smoke": Grid(ARMS, (None,), (0,), 30.0),
}
TASK = ("class-conditional DDPM on the digits (MLP denoiser, T = 100), DDPM ancestral sampling over 100 steps, "
        "s = 3, 1,000 samples (100 per class), fixed noise; quality = logistic-regression accuracy and RMSE to "
        "the CFG samples; NFE ratio = NFE / (2 N b)")

X0 = register(Experiment(
    id="adaptive_guidance.x0",
    claim="Adaptive Guidance (stop CFG per sample once cos(x0_hat(eps_c), x0_hat(eps_cfg)) > threshold) saves "
          "network evaluations at CFG-level quality and is no worse than fixed truncation at the same NFE.",
    baseline="plain CFG (2 N b evaluations), conditional-only sampling, and fixed truncation (CFG on the first k "
             "steps) at the matched NFE k = round(N (2 r - 1))",
    metric=f"NFE ratio, classifier accuracy and RMSE to CFG per threshold; {TASK}",
    primary_metric=key("x0", 0.98, "acc"),
    pass_rule="training seeds 0-2, x0-space thresholds {0.9, 0.95, 0.98, 0.99, 0.995, 0.999}: pass iff (1) NFE "
              "accounting is exact everywhere, (2) some threshold reaches NFE ratio <= 0.85 with accuracy >= 0.97 "
              "(seed means) and (3) at every threshold RMSE(AG) <= RMSE(truncation at matched NFE) + 0.03",
    grids=GRIDS,
    run=run,
    verdict=x0_verdict,
    shared_key=shared_key,
    figures=figures,
))

EPS = register(Experiment(
    id="adaptive_guidance.eps",
    claim="In the paper's epsilon space the conditional and the guided predictions align along the trajectory, so "
          "Adaptive Guidance matches fixed truncation's accuracy at the same NFE.",
    baseline="fixed truncation (CFG on the first k steps) at the matched NFE",
    metric=f"batch-mean cosine trend, NFE ratio and classifier accuracy per threshold; {TASK}",
    primary_metric=key("eps", 0.97, "acc"),
    pass_rule="premise: the batch-mean cosine at the last step exceeds that at the first (AG never firing, seed "
              "means). If met, pass iff at every epsilon-space threshold {0.96, 0.97, 0.975, 0.98, 0.99} with NFE "
              "ratio < 1, AG accuracy >= truncation accuracy at matched NFE - 0.02; if not, report 'premise not met'",
    grids=GRIDS,
    run=run,
    verdict=eps_verdict,
    shared_key=shared_key,
))
