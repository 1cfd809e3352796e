"""Claim checks of ZOODiP (zeroth-order Adam with Subspace Gradient): a token of a frozen int8 model can be
trained with forward passes only, the history-subspace denoiser helps (not reproduced at this scale, hence a
no-harm gate) and the step needs no activation memory.

Task (the spec sheet's scaled setup): a frozen 3-layer ReLU MLP ``[x (32) ; v (256)] -> 128 -> 128 -> 1``
(He-normal weights, the first layer's token columns scaled by ``1/sqrt(32)``, no biases) whose weights are
int8 fake-quantised per output row (:func:`fake_quant_int8`, ``torch.round``) once, at construction, as
quanto's weight-only ``qint8`` does. The target is ``f(x, v*) + N(0, 0.3^2)`` with fresh ``x ~ N(0, I)`` and
noise each step (batch 16), and a fixed test set of 1,024 noisy pairs; ``v*`` is a Gaussian direction scaled
(bisection) so that the noise-free gap ``mean (f(x, 0) - f(x, v*))^2`` on the test inputs is 1.5, i.e. an
initial test MSE near 1.6 (the sheet asks >= 1, more than 10x the 0.09 noise floor). Training starts at
``v0 = 0``; model, ``v*``, data and probe generator all follow the seed. Arms, same data stream per seed:

- ``zo_adam``: :class:`~normlab.optim.zo_subspace.ZOAdam` (n = 2 probes, mu = 1e-3, eps = 1e-3);
- ``zo_subspace``: the same with :class:`~normlab.optim.zo_subspace.SubspaceDenoiser` (tau = 64, nu = 1e-3);
- ``fo_adam``: ``torch.optim.Adam`` (torch defaults) with backprop through the same dequantised model. The
  rounding acts on the frozen weights only, so the token's gradient path is exact and no straight-through
  estimator is needed (a straight-through copy would compute the same gradient).

Full mode: lrs {3e-3, 1e-2, 3e-2}, seeds 0-2, 1,500 steps. Quick: the same with seed 0 only. Smoke: seed 0, lr
1e-2, 70 steps (one refresh). ``zo_subspace.training`` (gate: plain ZOAdam's best-lr mean final test MSE
<= 0.5 x the mean initial MSE, with the initial MSE >= 1 in every seed; report: the ratio to first-order
Adam) and ``zo_subspace.subspace`` (no-harm gate: subspace <= 1.10 x plain, each at its best lr; report any
improvement, never gated on) share the runs. ``zo_subspace.memory`` (exact gates, one seed, same protocol in
every mode): after tau + 1 = 65 steps (so the denoiser has a basis) one more step is measured; ZOAdam's
activation bytes are 0, ``p.grad is None`` after the step, and ``torch.is_grad_enabled()`` is false in every
closure call of the run. Step memory (report) = activation bytes (distinct storages autograd packs for
backward, via ``saved_tensors_hooks``, excluding the model's buffers and the input batch) + state bytes
(gradient buffers, optimizer state, denoiser history and basis, and one probe vector ``z`` for ZO).
"""

from __future__ import annotations

import math
from statistics import fmean

import torch
from torch import nn

from ...optim._common import optimizer_state_bytes
from ...optim.zo_subspace import SubspaceDenoiser, ZOAdam
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register

D_X, D_TOKEN, HIDDEN = 32, 256, 128
BATCH, N_TEST, NOISE = 16, 1024, 0.3
N_PROBES, MU, TAU, NU = 2, 1e-3, 64, 1e-3
GAP = 1.5                       # noise-free initial test MSE v* is scaled to
ARMS = ("zo_adam", "zo_subspace", "fo_adam")
LRS = {"full": (3e-3, 1e-2, 3e-2), "quick": (3e-3, 1e-2, 3e-2), "smoke": (1e-2,)}
SEEDS = {"full": (0, 1, 2), "quick": (0,), "smoke": (0,)}
STEPS = {"full": 1500, "quick": 1500, "smoke": 70}
TRAIN_RATIO_MAX = 0.5           # plain ZO final / initial test MSE
INITIAL_MIN = 1.0               # the sheet's scale rule
SUBSPACE_RATIO_MAX = 1.10       # no-harm gate, subspace / plain at their best lrs
MEMORY_LR, MEMORY_STEPS = 1e-2, TAU + 1


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-row symmetric int8 fake quantisation: ``round(w / s) * s`` with ``s = max|w_row| / 127``
    (rows of zeros stay zero)."""
    scale = w.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-127, 127) * scale


class QuantMLP(nn.Module):
    """The frozen int8 MLP ``[x ; v] -> 128 -> 128 -> 1`` (weights are buffers on the int8 grid)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        w1 = torch.randn(HIDDEN, D_X + D_TOKEN, generator=generator) * math.sqrt(2 / (D_X + D_TOKEN))
        w1[:, D_X:] /= math.sqrt(D_X)
        w2 = torch.randn(HIDDEN, HIDDEN, generator=generator) * math.sqrt(2 / HIDDEN)
        w3 = torch.randn(1, HIDDEN, generator=generator) * math.sqrt(1 / HIDDEN)
        q1 = fake_quant_int8(w1)
        self.register_buffer("w1x", q1[:, :D_X].contiguous())
        self.register_buffer("w1v", q1[:, D_X:].contiguous())
        self.register_buffer("w2", fake_quant_int8(w2))
        self.register_buffer("w3", fake_quant_int8(w3))

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w1x.T + token @ self.w1v.T)
        h = torch.relu(h @ self.w2.T)
        return (h @ self.w3.T).squeeze(1)


def make_task(seed: int) -> tuple[QuantMLP, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """``(model, v*, test inputs, noisy test targets, training-data generator)`` of one seed."""
    gen = torch.Generator().manual_seed(seed)
    model = QuantMLP(gen)
    direction = torch.randn(D_TOKEN, generator=gen)
    x_test = torch.randn(N_TEST, D_X, generator=gen)
    with torch.no_grad():
        base = model(x_test, torch.zeros(D_TOKEN))
        gap = lambda c: float((model(x_test, c * direction) - base).square().mean())  # noqa: E731
        lo, hi = 0.0, 1.0
        while gap(hi) < GAP:
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gap(mid) < GAP else (lo, mid)
        v_star = hi * direction
        y_test = model(x_test, v_star) + NOISE * torch.randn(N_TEST, generator=gen)
    return model, v_star, x_test, y_test, torch.Generator().manual_seed(10_000 + seed)


def _batch(model: QuantMLP, v_star: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, D_X, generator=gen)
    with torch.no_grad():
        return x, model(x, v_star) + NOISE * torch.randn(BATCH, generator=gen)


def _optimizer(arm: str, token: torch.Tensor, lr: float, seed: int):
    if arm == "fo_adam":
        return torch.optim.Adam([token], lr=lr)
    subspace = SubspaceDenoiser(history=TAU, nu=NU) if arm == "zo_subspace" else None
    return ZOAdam([token], lr=lr, n_probes=N_PROBES, mu=MU, subspace=subspace,
                  generator=torch.Generator().manual_seed(20_000 + seed))


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")


def _train_step(arm: str, opt, model: QuantMLP, token: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                grad_modes: list[bool]) -> float:
    if arm == "fo_adam":
        loss = (model(x, token) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        return (model(x, token) - y).square().mean()

    return float(opt.step(closure))


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    _check_arm(arm)
    steps = STEPS[mode]
    model, v_star, x_test, y_test, gen = make_task(seed)
    token = torch.zeros(D_TOKEN, requires_grad=arm == "fo_adam")
    opt = _optimizer(arm, token, lr, seed)
    test_mse = lambda: float((model(x_test, token.detach()) - y_test).square().mean())  # noqa: E731
    every = max(1, steps // 15)
    with torch.no_grad():
        initial = test_mse()
    curve, train_loss, removed, grad_modes = [[0, initial]], [], [], []
    window = []
    for k in range(1, steps + 1):
        x, y = _batch(model, v_star, gen)
        window.append(_train_step(arm, opt, model, token, x, y, grad_modes))
        if k % every == 0 or k == steps:
            with torch.no_grad():
                curve.append([k, test_mse()])
            train_loss.append([k, fmean(window)])
            window = []
        if arm == "zo_subspace" and k % TAU == 0:
            removed.append([k, opt.denoisers[0].removed_dim])
    metrics = {"final_mse": curve[-1][1], "initial_mse": initial, "v_star_norm": float(v_star.norm())}
    curves = {"test_mse": curve, "train_loss": train_loss}
    if removed:
        metrics["removed_dim"] = float(removed[-1][1])
        curves["removed_dim"] = removed
    return {"metrics": metrics, "curves": curves}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str:
    """The training and subspace checks read the same runs."""
    return f"zo_subspace-mlp/{arm}/lr={lr!r}/seed={seed}/{mode}"


# --- memory -----------------------------------------------------------------------------------------------


def _activation_bytes(excluded: set[int]):
    """A ``saved_tensors_hooks`` context and the dict it fills with ``{storage pointer: bytes}``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def run_memory(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    _check_arm(arm)
    model, v_star, _, _, gen = make_task(seed)
    token = torch.zeros(D_TOKEN, requires_grad=arm == "fo_adam")
    opt = _optimizer(arm, token, lr, seed)
    grad_modes: list[bool] = []
    for _ in range(MEMORY_STEPS):
        x, y = _batch(model, v_star, gen)
        _train_step(arm, opt, model, token, x, y, grad_modes)
    x, y = _batch(model, v_star, gen)
    excluded = {b.untyped_storage().data_ptr() for b in model.buffers()} | {x.untyped_storage().data_ptr(),
                                                                            y.untyped_storage().data_ptr()}
    hooks, saved = _activation_bytes(excluded)
    with hooks:
        _train_step(arm, opt, model, token, x, y, grad_modes)
    activation = sum(saved.values())
    state = optimizer_state_bytes(opt)
    grad = 0 if token.grad is None else token.grad.numel() * token.grad.element_size()
    denoiser = removed = probe = 0
    if arm != "fo_adam":
        probe = token.numel() * token.element_size()
        den = opt.denoisers[0]
        if den is not None:
            denoiser = den.buffer.numel() * den.buffer.element_size()
            if den.basis is not None:
                denoiser += den.basis.numel() * den.basis.element_size()
            removed = den.removed_dim
    metrics = {"activation_bytes": float(activation), "state_bytes": float(state + grad + denoiser + probe),
               "optimizer_state_bytes": float(state), "grad_bytes": float(grad), "denoiser_bytes": float(denoiser),
               "probe_bytes": float(probe), "step_bytes": float(activation + state + grad + denoiser + probe),
               "grad_is_none": float(token.grad is None), "removed_dim": float(removed),
               "closure_calls": float(len(grad_modes)), "closure_no_grad": float(not any(grad_modes))}
    return {"metrics": metrics, "curves": {}}


# --- verdicts ---------------------------------------------------------------------------------------------


def _label(mode: str) -> str:
    return {"quick": "indicative (quick: seed 0 only)", "smoke": "smoke"}.get(mode, "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def _initial(records: list[Record]) -> list[float]:
    per_seed = {}
    for rec in records:
        per_seed[rec["seed"]] = rec["metrics"]["initial_mse"]
    return [per_seed[s] for s in sorted(per_seed)]


def verdict_training(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("zo_adam", "fo_adam"))
    initial = _initial(records)
    zo_lr, zo = best_lr(records, "zo_adam", "final_mse")
    fo_lr, fo = best_lr(records, "fo_adam", "final_mse")
    init_mean, zo_mean, fo_mean = fmean(initial), fmean(zo), fmean(fo)
    ratio = zo_mean / init_mean
    scale_ok = all(v >= INITIAL_MIN for v in initial)
    ok = math.isfinite(ratio) and ratio <= TRAIN_RATIO_MAX and scale_ok
    by_lr = records_by_arm(records, "final_mse")
    sweep = "; ".join(f"{arm} lr {lr:g}: {fmean(v):.4f}" for (arm, lr), v in sorted(by_lr.items(), key=str))
    summary = (f"initial test MSE {_fmt(initial)} (need >= {INITIAL_MIN} in every seed: {_yes(scale_ok)}); "
               f"plain ZOAdam best lr {zo_lr:g}: final {_fmt(zo)} (mean {zo_mean:.4f}, {init_mean / zo_mean:.1f}x "
               f"lower; final/initial {ratio:.3f}, need <= {TRAIN_RATIO_MAX}: {_yes(ratio <= TRAIN_RATIO_MAX)}); "
               f"report: first-order Adam best lr {fo_lr:g}: {_fmt(fo)} (mean {fo_mean:.4f}), ZO/FO ratio "
               f"{zo_mean / fo_mean:.2f}; sweep means: {sweep}")
    if mode != "full":
        return "report", f"{_label(mode)}: {summary}"
    return ("pass" if ok else "fail"), summary


def verdict_subspace(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ("zo_adam", "zo_subspace"))
    zo_lr, zo = best_lr(records, "zo_adam", "final_mse")
    sub_lr, sub = best_lr(records, "zo_subspace", "final_mse")
    ratio = fmean(sub) / fmean(zo)
    ok = math.isfinite(ratio) and ratio <= SUBSPACE_RATIO_MAX
    per_seed = [s / z for s, z in zip(sub, zo)]
    subspace_records = [rec for rec in records if rec["arm"] == "zo_subspace"]
    removed = records_by_arm(subspace_records, "removed_dim")[("zo_subspace", sub_lr)]
    summary = (f"final test MSE at best lrs: subspace (lr {sub_lr:g}) {_fmt(sub)} (mean {fmean(sub):.4f}) vs plain "
               f"(lr {zo_lr:g}) {_fmt(zo)} (mean {fmean(zo):.4f}); ratio {ratio:.3f} (need <= {SUBSPACE_RATIO_MAX}: "
               f"{_yes(ok)}); per-seed ratios {' / '.join(f'{r:.3f}' for r in per_seed)}; report: "
               f"improvement (ratio < 1): {_yes(ratio < 1)}; directions removed at the last refresh "
               f"{' / '.join(f'{r:.0f}' for r in removed)} of {D_TOKEN}")
    if mode != "full":
        return "report", f"{_label(mode)}: {summary}"
    return ("pass" if ok else "fail"), summary


def verdict_memory(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    m = {rec["arm"]: rec["metrics"] for rec in records}
    zo_arms = ("zo_adam", "zo_subspace")
    act = all(m[a]["activation_bytes"] == 0 for a in zo_arms)
    grad = all(m[a]["grad_is_none"] == 1.0 for a in zo_arms)
    nograd = all(m[a]["closure_no_grad"] == 1.0 and m[a]["closure_calls"] > 0 for a in zo_arms)
    kb = lambda v: f"{v / 1000:.1f} KB"  # noqa: E731
    totals = "; ".join(f"{a} {kb(m[a]['step_bytes'])} (activations {kb(m[a]['activation_bytes'])}, state "
                       f"{kb(m[a]['state_bytes'])}" + (f", denoiser {kb(m[a]['denoiser_bytes'])} with r = "
                                                     f"{m[a]['removed_dim']:.0f}" if a == "zo_subspace" else "") + ")"
                       for a in ARMS)
    summary = (f"ZO activation bytes 0: {_yes(act)}; p.grad is None after step: {_yes(grad)}; "
               f"grad disabled in every closure call: {_yes(nograd)}; report, step memory: {totals}")
    if mode != "full":
        return "report", f"{'smoke' if mode == 'smoke' else 'indicative (quick: same protocol)'}: {summary}"
    return ("pass" if act and grad and nograd else "fail"), summary


def _grids(arms: tuple[str, ...]) -> dict[str, Grid]:
    return {mode: Grid(arms, LRS[mode], SEEDS[mode], {"full": 1200.0, "quick": 60.0, "smoke": 60.0}[mode])
            for mode in STEPS}


TASK = ("frozen int8 fake-quantised 3-layer ReLU MLP, token v (256-d) trained from 0 to fit f(x, v*) + noise 0.3, "
        "batch 16, n = 2 probes, mu = 1e-3")

TRAINING = register(Experiment(
    id="zo_subspace.training",
    claim="Zeroth-order Adam (forward passes only) trains a token of a frozen int8 model: " + TASK + ".",
    baseline="the initial test MSE (v = 0); report: first-order Adam through the same model, same lr sweep and steps",
    metric="test MSE after 1,500 steps (1,024 noisy test pairs)",
    primary_metric="final_mse",
    pass_rule=f"plain ZOAdam at its best lr (seed mean, lrs 3e-3/1e-2/3e-2, seeds 0-2): final <= {TRAIN_RATIO_MAX} x "
              f"mean initial MSE, initial >= {INITIAL_MIN} in every seed; ZO/first-order ratio report-only; quick "
              "and smoke report only",
    grids=_grids(("zo_adam", "fo_adam")),
    run=run, verdict=verdict_training, shared_key=shared_key,
))

SUBSPACE = register(Experiment(
    id="zo_subspace.subspace",
    claim="Subspace Gradient (removing the minor principal directions of the token history from the ZO estimate) "
          "does not harm ZO training, and may help: " + TASK + ", tau = 64, nu = 1e-3.",
    baseline="plain ZOAdam (no denoiser), same probes and data",
    metric="test MSE after 1,500 steps, each arm at its best lr",
    primary_metric="final_mse",
    pass_rule=f"no harm: subspace mean <= {SUBSPACE_RATIO_MAX} x plain mean, each at its best lr (seeds 0-2); an "
              "improvement is reported, never gated on (the sheet found none at this scale); quick and smoke "
              "report only",
    grids=_grids(("zo_adam", "zo_subspace")),
    run=run, verdict=verdict_subspace, shared_key=shared_key,
))

MEMORY = register(Experiment(
    id="zo_subspace.memory",
    claim="A ZOAdam step stores no activations for backward and leaves no gradient buffers.",
    baseline="first-order Adam with backprop through the same model",
    metric="step memory = activation bytes saved for backward + state bytes (gradients, optimizer state, denoiser "
           "history and basis, one probe z), measured on step 66",
    primary_metric="step_bytes",
    pass_rule="exact, seed 0: ZOAdam (with and without denoiser) activation bytes = 0, p.grad is None after step, "
              "torch.is_grad_enabled() false in every closure call; the three totals are report-only; quick and "
              "smoke (same protocol) report only",
    grids={mode: Grid(ARMS, (MEMORY_LR,), (0,), 60.0) for mode in STEPS},
    run=run_memory, verdict=verdict_memory,
))
