"""Claim check of Time-Dependent LayerNorm (Liu et al. 2024, DiMR): TD-LN injects the diffusion time as
well as adaLN does, at a fraction of adaLN's parameters.

Toy DDPM on the 2-D swiss roll (``swiss_roll(20000, noise=0.3, seed=0)``, (x, z) / 5), 200 linear-beta
steps (1e-4 -> 0.02, :class:`DDPMSchedule`), epsilon prediction with MSE. Denoiser: ``Linear(2, 128)``,
4 residual blocks ``h += FF(Norm(h, time))`` with FF ``128 -> 256 -> 128`` (GELU), then
``LayerNorm + Linear(128, 2)``. Adam, lr 2e-3 for every arm, batch 256, 1500 steps. The arms differ only
in how time enters:

- ``none``: LayerNorm blocks, no time input at all (the floor);
- ``ln``: LayerNorm blocks, a sinusoidal time embedding MLP (32 frequencies of the step n, DiT's
  ``timestep_embedding``, then ``Linear(32, 128), SiLU, Linear(128, 128)``) added to the input;
- ``tdln``: :class:`TDLayerNorm` in the 4 block norms with ``tau = 2n/200 - 1``, no time embedding;
- ``adaln``: :class:`AdaLayerNorm` (zero-init ``Linear(SiLU(temb))`` -> shift, scale) in the 4 block norms
  on the same time embedding MLP.

Metric: epsilon-MSE on a held-out set of 10k fresh ``(x0, n, eps)`` (x0 from ``swiss_roll(10000,
seed=1)``; the same set for every run). ``cond_params`` counts the parameters that exist only to
condition on time: the embedding MLP (``ln``), embedding + adaLN Linears (``adaln``), and every parameter
of the TD-LN layers (``tdln``; 8C per norm, including the ``p0``/``p1`` that replace LayerNorm's own gain
and shift, so the count is an upper bound). Arms of one seed share initialisation seed, training batches
and held-out set. Quick and smoke modes run fewer steps of the same experiment and only report. Runs use
one intra-op thread: at this size a second thread gains little, and on a loaded 2-core machine it made
each run about 10x slower.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.td_layernorm import AdaLayerNorm, TDLayerNorm
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register
from ..tasks import DDPMSchedule, swiss_roll

WIDTH, FF_WIDTH, BLOCKS, FREQS, BATCH, NUM_STEPS = 128, 256, 4, 32, 256, 200
ARMS = ("none", "ln", "tdln", "adaln")
STEPS = {"full": 1500, "quick": 200, "smoke": 3}
EVAL_SIZE = {"full": 10_000, "quick": 10_000, "smoke": 256}
EVAL_SEED = 12_345
RATIO, MARGIN, PARAM_FRACTION = 1.05, 0.08, 0.10


def timestep_embedding(n: torch.Tensor, dim: int = FREQS, max_period: float = 10_000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding of (integer) steps: ``[cos(n f_k), sin(n f_k)]`` with ``f_k =
    max_period^(-k / (dim/2))``, k = 0..dim/2-1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = n.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Denoiser(nn.Module):
    """The residual MLP epsilon-predictor; ``arm`` picks how the step ``n`` conditions it."""

    def __init__(self, arm: str, schedule: DDPMSchedule) -> None:
        super().__init__()
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
        self.arm, self.schedule = arm, schedule
        self.inp = nn.Linear(2, WIDTH)
        self.temb = nn.Sequential(nn.Linear(FREQS, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH)) \
            if arm in ("ln", "adaln") else None
        norm = {"none": lambda: nn.LayerNorm(WIDTH), "ln": lambda: nn.LayerNorm(WIDTH),
                "tdln": lambda: TDLayerNorm(WIDTH), "adaln": lambda: AdaLayerNorm(WIDTH, WIDTH)}[arm]
        self.norms = nn.ModuleList(norm() for _ in range(BLOCKS))
        self.ffs = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, FF_WIDTH), nn.GELU(), nn.Linear(FF_WIDTH, WIDTH))
                                 for _ in range(BLOCKS))
        self.out_norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, 2)

    def conditioning_parameters(self) -> int:
        """Parameters that exist only to condition on time (see the module docstring)."""
        modules = {"none": [], "ln": [self.temb], "tdln": list(self.norms), "adaln": [self.temb, *self.norms]}
        return sum(p.numel() for m in modules[self.arm] for p in m.parameters())

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        cond = self.temb(timestep_embedding(n)) if self.temb is not None else None
        if self.arm == "ln":
            h = h + cond
        extra = {"tdln": (self.schedule.time_input(n),), "adaln": (cond,)}.get(self.arm, ())
        for norm, ff in zip(self.norms, self.ffs):
            h = h + ff(norm(h, *extra))
        return self.out(self.out_norm(h))


@lru_cache(maxsize=2)
def _data(eval_size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Training points and the held-out ``(x0, n, eps)`` set shared by every run."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    x0 = swiss_roll(eval_size, noise=0.3, seed=1)
    n = DDPMSchedule(NUM_STEPS).sample_steps(eval_size, gen)
    return swiss_roll(20_000, noise=0.3, seed=0), (x0, n, torch.randn(x0.shape, generator=gen))


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    schedule = DDPMSchedule(NUM_STEPS)
    train, (x0_eval, n_eval, eps_eval) = _data(EVAL_SIZE[mode])
    data_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Denoiser(arm, schedule)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(STEPS[mode]):
        x0 = train[torch.randint(0, len(train), (BATCH,), generator=data_gen)]
        n = schedule.sample_steps(BATCH, data_gen)
        eps = torch.randn(x0.shape, generator=data_gen)
        loss = F.mse_loss(model(schedule.q_sample(x0, n, eps), n), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        eps_mse = F.mse_loss(model(schedule.q_sample(x0_eval, n_eval, eps_eval), n_eval), eps_eval).item()
    return {"metrics": {"eps_mse": eps_mse, "cond_params": float(model.conditioning_parameters()),
                        "params": float(sum(p.numel() for p in model.parameters()))},
            "curves": {"train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}



def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    best = {}
    for arm in ARMS:
        lr, vals = best_lr(records, arm, "eps_mse")
        params = records_by_arm(records, "cond_params")[(arm, lr)]
        best[arm] = (lr, fmean(vals), max(params), len(vals))
    numbers = "; ".join(f"{arm}: lr {lr:g}, eps-MSE {mse:.4f}, {int(p)} time-conditioning params ({k} seed(s))"
                        for arm, (lr, mse, p, k) in best.items())
    if mode != "full":
        label = "indicative (quick: fewer steps)" if mode == "quick" else "smoke"
        return "report", f"{label}: {numbers}"
    td, ada, none = best["tdln"][1], best["adaln"][1], best["none"][1]
    td_params, ada_params = best["tdln"][2], best["adaln"][2]
    vs_ada = td <= RATIO * ada
    vs_none = td <= none - MARGIN
    cheap = td_params < PARAM_FRACTION * ada_params
    status = "pass" if vs_ada and vs_none and cheap else "fail"
    return status, (f"TD-LN eps-MSE {td:.4f} vs {RATIO:g} x adaLN {RATIO * ada:.4f} (need <=: "
                    f"{'yes' if vs_ada else 'no'}) and vs none - {MARGIN:g} = {none - MARGIN:.4f} (need <=: "
                    f"{'yes' if vs_none else 'no'}); TD-LN conditioning params {int(td_params)} = "
                    f"{td_params / ada_params:.1%} of adaLN's {int(ada_params)} (need < {PARAM_FRACTION:.0%}: "
                    f"{'yes' if cheap else 'no'}). {numbers}")


EXPERIMENT = register(Experiment(
    id="td_layernorm",
    claim="Time-dependent LayerNorm conditions a diffusion denoiser on time as well as adaLN does, with a "
          "small fraction of adaLN's time-conditioning parameters.",
    baseline="adaLN (zero-init Linear(SiLU(time embedding)) -> shift, scale in every block norm); floor: no time "
             "input; also shown: a time embedding added to the input",
    metric="held-out epsilon-prediction MSE of a toy DDPM on the 2-D swiss roll (10k fresh (x0, n, eps)), and "
           "the time-conditioning parameter count",
    primary_metric="eps_mse",
    pass_rule="lr 2e-3 for every arm, seeds {0, 1, 2}; pass iff mean TD-LN eps-MSE <= 1.05 x adaLN's and "
              "<= (none) - 0.08, and TD-LN's time-conditioning parameters < 10% of adaLN's",
    grids={
        "full": Grid(ARMS, (2e-3,), (0, 1, 2), 1200.0),
        "quick": Grid(ARMS, (2e-3,), (0,), 30.0),
        "smoke": Grid(ARMS, (2e-3,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
))
