"""Claim check of Region Normalization (Yu et al. 2020): in an inpainting network, normalizing the hole and
the valid pixels separately (RN) beats full-spatial normalization, at toy scale.

The sheet's protocol (region_norm.md, Verification (b)): scikit-learn's digits (pixels / 16, native 8x8),
stratified 70/30 split with random_state 0 (1257 train, 540 test images). One axis-aligned rectangular hole
per image, both sides >= 3 px and area 16-25 px (25-39 % of the image): the (height, width) pair is drawn
uniformly from the 12 allowed pairs, the position uniformly. Training batches (32, an epoch-wise
permutation) and their holes are drawn at every step from one generator seeded by the run seed, so every
arm of a seed sees the same images and holes; the test holes are drawn once from their own fixed
generator. The network sees ``x * (1 - m) + m`` (holes filled with 1.0) and no mask channel: as in the
official generator, the mask reaches the network only through RN-B.

Net (32 channels): conv 3x3 (1 -> 32, 8x8), conv 4x4 stride 2 (-> 4x4), conv 4x4 stride 2 (-> 2x2),
ConvTranspose 4x4 stride 2 twice (-> 4x4 -> 8x8), each followed by a norm slot and ReLU; then conv 3x3
(32 -> 1) and ``(tanh + 1) / 2``. Arms: ``bn`` (BatchNorm2d, running statistics, eval mode at test) in
all five slots, ``in`` (InstanceNorm2d, affine) in all five, ``rn``: RN-B (:class:`RegionNorm2d`,
stats="batch", the paper's masked bias) in the three encoder slots and RN-L
(:class:`LearnableRegionNorm2d`, threshold 0.8, kernel 7) in the two decoder slots. Training: L1 on the
full image, Adam (default betas), batch 32, 800 steps, lr in {1e-3, 3e-3, 1e-2}, seeds {0, 1, 2}.

Outcome ``hole_l1``: the mean absolute error over the hole pixels of the 540 test images, evaluated in
batches of 32 in a fixed order (RN and IN use the batch's own statistics, BN its running statistics).
Diagnostics, never gated: ``hole_l1_300`` (the same after 300 steps), ``valid_l1`` (the valid pixels),
``train_l1_last`` (mean training loss over the last 50 steps) and, for RN, ``rnl_mask_fraction`` (the share
of positions RN-L's learned mask marks, over the test evaluation).

Pass (full; best lr per arm = lowest mean over seeds, a NaN run makes that lr's mean infinite):
(i) RN <= 0.98 x IN and (ii) RN <= 1.04 x BN (no worse than BN beyond noise; a win over BN is not claimed).
Quick (indicative): seed 0, lr 3e-3, 300 steps; pass iff RN <= 0.97 x IN and RN <= BN.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.region import LearnableRegionNorm2d, RegionNorm2d
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register
from ..tasks import digits

ARMS = ("bn", "in", "rn")
LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
QUICK_LR = 3e-3
WIDTH, BATCH, SIZE, EVAL_BATCH = 32, 32, 8, 32
STEPS = {"full": 800, "quick": 300, "smoke": 5}
TEST_IMAGES = {"full": 540, "quick": 540, "smoke": 64}  # smoke evaluates on the first 64 only
EARLY_STEP = 300  # the diagnostic hole_l1_300
TEST_HOLE_SEED = 20191124
# (height, width) of the allowed holes: both sides >= 3 px, area 16-25 px
HOLE_SHAPES = tuple((h, w) for h in range(3, SIZE + 1) for w in range(3, SIZE + 1) if 16 <= h * w <= 25)
IN_RATIO, BN_RATIO = 0.98, 1.04  # full: RN <= 0.98 IN, RN <= 1.04 BN
QUICK_IN_RATIO, QUICK_BN_RATIO = 0.97, 1.0


def rectangle_holes(n: int, generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """``(n, 1, size, size)`` float masks (1 = hole), one rectangle each: a (height, width) pair drawn
    uniformly from :data:`HOLE_SHAPES`, the top-left corner uniformly among the positions that fit."""
    shapes = torch.tensor(HOLE_SHAPES)[torch.randint(len(HOLE_SHAPES), (n,), generator=generator)]
    h, w = shapes[:, 0], shapes[:, 1]
    top = (torch.rand(n, generator=generator) * (size - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (size - w + 1)).long()
    grid = torch.arange(size)
    rows = (grid[None] >= top[:, None]) & (grid[None] < (top + h)[:, None])
    cols = (grid[None] >= left[:, None]) & (grid[None] < (left + w)[:, None])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


def corrupt(images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """The network input: holes filled with 1.0."""
    return images * (1 - holes) + holes


class InpaintNet(nn.Module):
    """Encoder-decoder of the check: five conv layers, each followed by a norm slot and ReLU, then a 3x3
    conv to one channel and ``(tanh + 1) / 2``. ``forward(x, mask)`` passes the mask to RN-B slots only."""

    def __init__(self, arm: str) -> None:
        super().__init__()
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
        c = WIDTH
        self.convs = nn.ModuleList([
            nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 4, stride=2, padding=1),
            nn.Conv2d(c, c, 4, stride=2, padding=1), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)])
        if arm == "bn":
            norms = [nn.BatchNorm2d(c) for _ in range(5)]
        elif arm == "in":
            norms = [nn.InstanceNorm2d(c, affine=True) for _ in range(5)]
        else:
            norms = [RegionNorm2d(c) for _ in range(3)] + [LearnableRegionNorm2d(c) for _ in range(2)]
        self.norms = nn.ModuleList(norms)
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = F.relu(norm(h, mask) if isinstance(norm, RegionNorm2d) else norm(h))
        return (torch.tanh(self.out(h)) + 1) / 2


@torch.no_grad()
def evaluate(model: InpaintNet, images: torch.Tensor, holes: torch.Tensor) -> dict[str, float]:
    """Eval-mode L1 over the hole and the valid pixels of the test set (batches of 32, fixed order), and
    the share of positions RN-L's masks mark."""
    model.eval()
    hole_err = valid_err = 0.0
    marked, positions = 0.0, 0
    rnl = [m for m in model.norms if isinstance(m, LearnableRegionNorm2d)]
    for start in range(0, len(images), EVAL_BATCH):
        x, m = images[start:start + EVAL_BATCH], holes[start:start + EVAL_BATCH]
        err = (model(corrupt(x, m), m) - x).abs()
        hole_err += (err * m).sum().item()
        valid_err += (err * (1 - m)).sum().item()
        for layer in rnl:
            marked += layer.last_mask.sum().item()
            positions += layer.last_mask.numel()
    model.train()
    n_hole = holes.sum().item()
    out = {"hole_l1": hole_err / n_hole, "valid_l1": valid_err / (holes.numel() - n_hole)}
    if rnl:
        out["rnl_mask_fraction"] = marked / positions
    return out


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images, test images and the test holes (drawn once from their own generator)."""
    x_train, _ = digits("train", test_fraction=0.3, seed=0)
    x_test, _ = digits("test", test_fraction=0.3, seed=0)
    return x_train, x_test, rectangle_holes(len(x_test), torch.Generator().manual_seed(TEST_HOLE_SEED))


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    steps = STEPS[mode]
    x_train, x_test, test_holes = _data()
    x_test, test_holes = x_test[:TEST_IMAGES[mode]], test_holes[:TEST_IMAGES[mode]]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = InpaintNet(arm)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.randperm(len(x_train), generator=gen)
    cursor, losses, metrics = 0, [], {}
    for step in range(1, steps + 1):
        if cursor + BATCH > len(order):
            order, cursor = torch.randperm(len(x_train), generator=gen), 0
        x = x_train[order[cursor:cursor + BATCH]]
        cursor += BATCH
        m = rectangle_holes(BATCH, gen)
        loss = F.l1_loss(model(corrupt(x, m), m), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == EARLY_STEP:
            metrics["hole_l1_300"] = evaluate(model, x_test, test_holes)["hole_l1"]
    metrics.update(evaluate(model, x_test, test_holes))
    tail = losses[-50:]
    metrics["train_l1_last"] = sum(tail) / len(tail)
    return {"metrics": metrics, "curves": {"train_l1": [[i + 1, v] for i, v in enumerate(losses)]}}


def _mean(values: list[float]) -> float:
    """Seed mean; a NaN run makes it infinite (the sheet's rule)."""
    mean = fmean(values)
    return mean if math.isfinite(mean) else math.inf


def _std(values: list[float]) -> float:
    """Population std over seeds (NaN when a run is not finite)."""
    mean = fmean(values)
    return math.sqrt(fmean([(v - mean) ** 2 for v in values])) if math.isfinite(mean) else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.inf


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    table = records_by_arm(records, "hole_l1")
    best = {arm: best_lr(records, arm, "hole_l1") for arm in ARMS}
    score = {arm: _mean(vals) for arm, (_, vals) in best.items()}
    rows = []
    for arm in ARMS:
        cells = [f"{lr:g}: {fmean(vals):.4f} +/- {_std(vals):.4f}"
                 for (a, lr), vals in sorted(table.items(), key=lambda kv: kv[0][1]) if a == arm]
        rows.append(f"{arm.upper()} best lr {best[arm][0]:g} ({', '.join(cells)})")
    per_seed = {}
    for base in ("in", "bn"):
        ratios = [_ratio(r, b) for r, b in zip(best["rn"][1], best[base][1])]
        per_seed[base] = f"{min(ratios):.3f}-{max(ratios):.3f}"
    fractions = [r["metrics"]["rnl_mask_fraction"] for r in records
                 if r["arm"] == "rn" and r["lr"] == best["rn"][0] and "rnl_mask_fraction" in r["metrics"]]
    early = {arm: [r["metrics"]["hole_l1_300"] for r in records if r["arm"] == arm and r["lr"] == best[arm][0]
                   and "hole_l1_300" in r["metrics"]] for arm in ARMS}
    early_text = ", ".join(f"{arm.upper()} {fmean(v):.4f}" for arm, v in early.items() if v)
    rn_in, rn_bn = _ratio(score["rn"], score["in"]), _ratio(score["rn"], score["bn"])
    seeds = min(len(vals) for _, vals in best.values())
    numbers = (f"test hole L1 (mean +/- std over {seeds} seed(s)): {'; '.join(rows)}. RN/IN {rn_in:.3f} (per seed "
               f"{per_seed['in']}), RN/BN {rn_bn:.3f} (per seed {per_seed['bn']}). Diagnostics (report only): "
               f"RN-L mask fraction {fmean(fractions) if fractions else math.nan:.4f}"
               + (f"; hole L1 after {EARLY_STEP} steps at the best lr: {early_text}" if early_text else ""))
    if mode == "smoke":
        return "report", f"smoke: {numbers}"
    in_ratio, bn_ratio = (IN_RATIO, BN_RATIO) if mode == "full" else (QUICK_IN_RATIO, QUICK_BN_RATIO)
    beats_in, holds_bn = rn_in <= in_ratio, rn_bn <= bn_ratio
    status = "pass" if beats_in and holds_bn else "fail"
    label = "" if mode == "full" else f"indicative (quick: seed 0, lr {QUICK_LR:g}, {STEPS['quick']} steps): "
    return status, (f"{label}(i) RN <= {in_ratio:g} x IN: {'yes' if beats_in else 'no'}; (ii) RN <= {bn_ratio:g} "
                    f"x BN: {'yes' if holds_bn else 'no'}. {numbers}")


EXPERIMENT = register(Experiment(
    id="region_norm",
    claim="In an inpainting network, region normalization (separate statistics for the hole and the valid "
          "pixels: RN-B with the mask in the encoder, RN-L with a learned mask in the decoder) beats "
          "full-spatial normalization.",
    baseline="the same network with InstanceNorm2d (affine) or BatchNorm2d in all five norm slots",
    metric="mean absolute error over the hole pixels of the 540 test digits (8x8, one 16-25 px rectangular "
           "hole each, filled with 1.0), after 800 steps of full-image L1 training",
    primary_metric="hole_l1",
    pass_rule="best lr per arm by the mean over seeds {0, 1, 2} (lr in {1e-3, 3e-3, 1e-2}; a NaN run makes its "
              "lr's mean infinite); pass iff RN <= 0.98 x IN and RN <= 1.04 x BN (no worse than BN beyond noise; "
              "no win over BN is claimed). Quick (indicative): seed 0, lr 3e-3, 300 steps, RN <= 0.97 x IN and "
              "RN <= BN",
    grids={
        "full": Grid(ARMS, LRS, SEEDS, 1200.0),
        "quick": Grid(ARMS, (QUICK_LR,), (0,), 60.0),
        "smoke": Grid(ARMS, (QUICK_LR,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
))
