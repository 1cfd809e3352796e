"""Claim check of SWAN (Ma et al. 2024): stateless SWAN reaches Adam's loss with fewer tokens, with the
optimizer state of the Adam fallback only.

Task (swan.md, shared with gmn_sinkgd.md): next-byte prediction on the first 60 ``.py`` files (sorted) of
the standard library (``char_corpus(60, "bytes")``: first 90 % train, last 10 % validation) with
:class:`normlab.bench.tasks.GPT` (2 Pre-LN blocks, d_model 128, 4 heads, context 64, separate bias-free
q/k/v/o, GELU MLP 512, untied head; 468,224 parameters, the same initialisation in every arm of a seed).
Batch 16 x 64 tokens drawn with a generator seeded by the run seed (every arm sees the same batches), 300
steps, linear warm-up over 30 steps then cosine decay to 10 % of the peak lr, no weight decay, Adam betas
(0.9, 0.999). Validation: a fixed set of 8 x 16 windows of 64 tokens (its own generator) every 25 steps.

Arms, equal tuning (lr in {3e-3, 1e-2, 3e-2}, seeds {0, 1}): ``adamw`` = torch AdamW on every parameter at
lr; ``swan`` = :class:`normlab.optim.SWAN` (k = 10, beta = 0.5, rescale on) with matrix lr = lr on the
routing of :func:`normlab.optim.swan_param_groups` and the fallback Adam at 3e-3. The ``adamw`` runs are
shared with the ``gmn_sinkgd`` check through ``Experiment.shared_key``. The best lr per arm has the lowest
seed-mean final validation loss.

Pass (all three): (i) every run's optimizer state is exactly the sheet's 8 x 75,008 bytes of Adam moments
for SWAN (8 x 468,224 for AdamW), plus torch's 4-byte ``step`` counter per Adam-handled tensor (13 and 25:
``optimizer_state_bytes`` counts every state tensor, the sheet's numbers count the moments only);
(ii) SWAN's best-lr mean validation curve first reaches AdamW's best-lr mean final loss at an evaluation
step <= 0.5 T (150), the paper's 2x fewer tokens; (iii) SWAN's best mean final loss <= AdamW's - 0.2 nats.
A NaN loss never reaches the target. Quick (indicative): seed 0, 100 steps (10 warm-up), lr 1e-2 in both
arms; pass iff SWAN's step-100 validation loss <= AdamW's - 0.1. Smoke: 6 steps, report only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ...optim import optimizer_state_bytes
from ...optim.swan import SWAN, swan_param_groups
from ..experiment import Experiment, Grid, Record, best_lr, records_mode, register
from ..tasks import GPT, char_batch, char_corpus

VOCAB, BATCH, SEQ_LEN, N_FILES = 256, 16, 64, 60
VAL_BATCHES, VAL_SEED = 8, 12345
FALLBACK_LR = 3e-3  # the Adam fallback of the matrix-wise arms
LRS = (3e-3, 1e-2, 3e-2)
#: steps, warm-up steps, evaluation interval per mode
SCHEDULE = {"full": (300, 30, 25), "quick": (100, 10, 25), "smoke": (6, 2, 3)}
N_PARAMS, N_TENSORS = 468_224, 25  # the GPT's parameters and parameter tensors
N_FALLBACK, N_FALLBACK_TENSORS = 75_008, 13  # what the routing rule leaves on Adam
#: exact optimizer state bytes: Adam moments (8 bytes per parameter) + a 4-byte step counter per tensor
STATE_BYTES = {"adamw": 8 * N_PARAMS + 4 * N_TENSORS, "matrix": 8 * N_FALLBACK + 4 * N_FALLBACK_TENSORS}
ARMS = ("adamw", "swan")
SPEEDUP_FRACTION, MARGIN = 0.5, 0.2  # full rule: crossing <= 0.5 T and a 0.2-nat lead
QUICK_MARGIN = 0.1


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak lr for update ``step`` (0-based): linear warm-up over ``warmup`` updates,
    then cosine decay to 10 % at the last update."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@lru_cache(maxsize=1)
def validation_windows() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The fixed validation set: 8 batches of 16 windows of 64 tokens from the validation split."""
    ids = char_corpus(N_FILES, "bytes", "val")
    gen = torch.Generator().manual_seed(VAL_SEED)
    return tuple(char_batch(ids, BATCH, SEQ_LEN, gen) for _ in range(VAL_BATCHES))


@torch.no_grad()
def evaluate(model: nn.Module) -> float:
    """Mean next-byte cross-entropy (nats) over the fixed validation windows."""
    losses = [F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)) for x, y in validation_windows()]
    return torch.stack(losses).mean().item()


def adamw_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


def swan_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return SWAN(swan_param_groups(model, FALLBACK_LR), matrix_lr_scale=lr / FALLBACK_LR, ns_steps=10,
                ns_beta=0.5, rescale=True)


def train_lm(make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float, seed: int,
             mode: str) -> dict:
    """One training run of the shared task; metrics ``val_loss`` (final) and ``state_bytes``,
    curves ``val_loss`` (every evaluation) and ``train_loss`` (every step)."""
    steps, warmup, every = SCHEDULE[mode]
    ids = char_corpus(N_FILES, "bytes", "train")
    torch.manual_seed(seed)
    model = GPT(VOCAB, 128, 2, 4, SEQ_LEN)
    opt = make_optimizer(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for step in range(1, steps + 1):
        x, y = char_batch(ids, BATCH, SEQ_LEN, gen)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train.append([step, loss.item()])
        if step % every == 0:
            val.append([step, evaluate(model)])
    return {"metrics": {"val_loss": val[-1][1], "state_bytes": optimizer_state_bytes(opt)},
            "curves": {"val_loss": val, "train_loss": train}}


def shared_key(arm: str, lr: float | None, seed: int, mode: str) -> str | None:
    """The AdamW runs are the same runs in the swan and gmn_sinkgd checks."""
    return f"stdlib-bytes-gpt/adamw/lr={lr!r}/seed={seed}/{mode}" if arm == "adamw" else None


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    makers = {"adamw": adamw_optimizer, "swan": swan_optimizer}
    if arm not in makers:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(makers)}")
    return train_lm(makers[arm], lr, seed, mode)


def mean_curve(records: Sequence[Record], arm: str, lr: float | None, name: str = "val_loss"
               ) -> list[tuple[int, float]]:
    """The seed mean of the ``name`` curves of ``(arm, lr)``, step by step."""
    curves = [r["curves"][name] for r in records if r["arm"] == arm and r["lr"] == lr]
    return [(int(points[0][0]), sum(float(p[1]) for p in points) / len(points)) for points in zip(*curves)]


def first_crossing(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step at which ``curve`` is <= ``target`` (NaN never is), or None."""
    return next((step for step, value in curve if value <= target), None)


def state_bytes_check(records: Sequence[Record], matrix_arm: str) -> tuple[bool, str]:
    """Every run's state bytes equal to the exact expectation of its arm."""
    expected = {"adamw": STATE_BYTES["adamw"], matrix_arm: STATE_BYTES["matrix"]}
    wrong = sorted({(r["arm"], int(r["metrics"]["state_bytes"])) for r in records
                    if r["metrics"]["state_bytes"] != expected[r["arm"]]})
    text = (f"state bytes {matrix_arm} {STATE_BYTES['matrix']:,} vs AdamW {STATE_BYTES['adamw']:,} "
            f"(ratio {STATE_BYTES['matrix'] / STATE_BYTES['adamw']:.3f})")
    return not wrong, text if not wrong else f"{text} expected, got {wrong}"


def compare(records: Sequence[Record], matrix_arm: str) -> dict:
    """Best lr per arm, final losses, ``matrix_arm``'s first crossing of AdamW's best final loss, gap."""
    (lr_a, finals_a), (lr_m, finals_m) = (best_lr(records, arm, "val_loss") for arm in ("adamw", matrix_arm))
    final_a, final_m = sum(finals_a) / len(finals_a), sum(finals_m) / len(finals_m)
    curve = mean_curve(records, matrix_arm, lr_m)
    steps = curve[-1][0] if curve else 0
    crossing = first_crossing(curve, final_a) if math.isfinite(final_a) else None
    gap = final_a - final_m if math.isfinite(final_m) else -math.inf
    return {"lr_adamw": lr_a, "lr_matrix": lr_m, "final_adamw": final_a, "final_matrix": final_m,
            "crossing": crossing, "steps": steps, "gap": gap, "seeds": len(finals_m)}


def describe(c: dict, label: str) -> str:
    crossing = "never" if c["crossing"] is None else f"step {c['crossing']} ({c['crossing'] / c['steps']:.2f} T)"
    return (f"{label} best lr {c['lr_matrix']:g}: final val loss {c['final_matrix']:.3f}; AdamW best lr "
            f"{c['lr_adamw']:g}: {c['final_adamw']:.3f} (gap {c['gap']:.3f} nats, {c['seeds']} seed(s)); "
            f"{label} first reaches AdamW's final loss at {crossing}")


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    c = compare(records, "swan")
    state_ok, state_text = state_bytes_check(records, "swan")
    numbers = f"{describe(c, 'SWAN')}; {state_text}"
    if mode == "smoke":
        return "report", f"smoke: {numbers}"
    if mode == "quick":
        ok = c["gap"] >= QUICK_MARGIN
        return ("pass" if ok else "fail"), (f"indicative (quick: seed 0, {c['steps']} steps, lr 1e-2): SWAN "
                                            f"{'<=' if ok else '>'} AdamW - {QUICK_MARGIN}. {numbers}")
    fast = c["crossing"] is not None and c["crossing"] <= SPEEDUP_FRACTION * c["steps"]
    lead = c["gap"] >= MARGIN
    status = "pass" if state_ok and fast and lead else "fail"
    return status, (f"(i) state bytes exact: {'yes' if state_ok else 'no'}; (ii) crossing <= "
                    f"{SPEEDUP_FRACTION:g} T: {'yes' if fast else 'no'}; (iii) gap >= {MARGIN}: "
                    f"{'yes' if lead else 'no'}. {numbers}")


EXPERIMENT = register(Experiment(
    id="swan",
    claim="SWAN, with no optimizer state for the weight matrices, reaches Adam's loss with at least 2x fewer "
          "tokens on a small GPT language model.",
    baseline="torch AdamW on every parameter, same data, model, schedule, lr grid and seeds",
    metric="validation next-byte cross-entropy (nats) of a 2-block GPT on stdlib sources; optimizer state bytes",
    primary_metric="val_loss",
    pass_rule="best lr per arm by seed-mean final val loss (lr in {3e-3, 1e-2, 3e-2}, seeds {0, 1}); pass iff "
              "state bytes are exactly Adam moments on the 75,008 fallback parameters (+ step counters), SWAN's "
              "mean val curve reaches AdamW's final loss by step 150 (0.5 T) and ends >= 0.2 nats below it",
    grids={
        "full": Grid(ARMS, LRS, (0, 1), 1200.0),
        "quick": Grid(ARMS, (1e-2,), (0,), 30.0),
        "smoke": Grid(ARMS, (1e-2,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
    shared_key=shared_key,
))
