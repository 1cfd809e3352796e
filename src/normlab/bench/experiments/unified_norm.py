"""Claim checks of Unified Normalization (Yang et al. 2022, arXiv:2208.01313): UN trains a transformer as
well as LayerNorm, and at inference it folds into the Linear layers, so the fused model is exact and not slower.

``unified_norm``: scikit-learn digits, the stratified 70/30 split (``random_state=0``: 1257 train / 540
test), pixels / 16, each image as 16 tokens of 2x2 patches -> ``Linear(4, 64)`` + learned positions ->
4 pre-norm blocks (normlab's ``tasks.Block``: 4 heads, non-causal, GELU FFN of width 256) -> final
norm -> mean over tokens -> linear head. AdamW (lr 1e-3, weight decay 0.01), batch 64, 20 steps per
epoch (one random permutation per epoch, the last batch holds the remaining 41), 30 epochs, seeds
0-2 (model init and batch order). Arms: ``ln`` (``torch.nn.LayerNorm``), ``un`` (UnifiedNorm, window 4,
``warmup_iters=200``, ``compensation_start=400``, filtration off) and the report-only ``plain`` (window 1
and a warm-up that never ends: the batch quadratic-mean norm with its exact gradient). Outcome: test
accuracy in eval mode. Each UN run also folds its eval model with :func:`normlab.convert.fuse.fuse_norms`
and compares the test logits and predictions with the unfused model. Pass (the sheet's, fixed in
advance): mean UN accuracy >= mean LN accuracy - 1.0 point and >= 95.0 %; on every seed the fused
predictions equal the unfused ones with max |logit difference| <= 1e-4; no NaN. Quick: seed 0, ``ln`` and
``un`` only, 12 epochs, UN ``warmup_iters=60``, ``compensation_start=120``; indicative pass: UN >= LN - 3
points and fused predictions identical.

``unified_norm.inference`` (report only: timings never decide): the same architecture at d=256, 6
layers, 4 heads, random patch inputs at (batch, tokens) = (64, 16), (8, 128) and (1, 16); the LayerNorm
model, the UN model in eval (running variances uniform in [0.5, 2]) and the fused UN model with the same
Linear weights, no grad, one thread as the sheet, called alternately (3 warm-up calls, then 35 rounds;
quick 6), timed in thread CPU time so that other processes on the shared cores do not count. Reported:
the medians of the per-round fused / LN and unfused / LN time ratios (the sheet measured 0.92-0.93 and
1.01-1.03) and whether fused <= 1.05 x LN.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from functools import lru_cache, partial
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...convert.fuse import fuse_norms
from ...layers.unified import UnifiedNorm
from ..experiment import Experiment, Grid, Record, records_by_arm, records_mode, register
from ..tasks import Block, NormFactory, digits

ARMS = ("ln", "un", "plain")
UN_ARMS = ("un", "plain")
LR, WEIGHT_DECAY, BATCH, STEPS_PER_EPOCH = 1e-3, 0.01, 64, 20
EPOCHS = {"full": 30, "quick": 12, "smoke": 1}
SMOKE_STEPS = 3
#: UN's warm-up and compensation start per mode (the sheet's, scaled with the run in quick mode).
UN_SCHEDULE = {"full": (200, 400), "quick": (60, 120), "smoke": (1, 2)}
NEVER = 2 ** 62  # the plain arm's warm-up
MARGIN, FLOOR, QUICK_MARGIN, LOGIT_TOL = 1.0, 95.0, 3.0, 1e-4


def patches(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 8, 8)`` images -> ``(N, 16, 4)``: 2x2 patches in row-major order, pixels row-major inside."""
    n = images.shape[0]
    return images.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 4)


class PatchTransformer(nn.Module):
    """Patch tokens -> ``Linear(4, d)`` + learned positions -> pre-norm blocks -> final norm -> mean over
    tokens -> linear head."""

    def __init__(self, norm_layer: NormFactory, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                 n_tokens: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, norm_layer, "pre", True, False, 4)
                                    for _ in range(n_layers))
        self.norm = norm_layer(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def norm_layer(arm: str, mode: str) -> NormFactory:
    warmup, comp = UN_SCHEDULE[mode]
    if arm == "ln":
        return nn.LayerNorm
    if arm == "un":
        return partial(UnifiedNorm, window_size=4, warmup_iters=warmup, compensation_start=comp)
    if arm == "plain":
        return partial(UnifiedNorm, window_size=1, warmup_iters=NEVER, compensation_start=NEVER)
    raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")


@lru_cache(maxsize=1)
def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sheet's split as patch tokens: train ``(1257, 16, 4)``, test ``(540, 16, 4)``, and labels."""
    x_train, y_train = digits("train", test_fraction=0.3, seed=0)
    x_test, y_test = digits("test", test_fraction=0.3, seed=0)
    return patches(x_train), y_train, patches(x_test), y_test


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == y).float().mean().item()


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    lr = LR if lr is None else lr
    x_train, y_train, x_test, y_test = split()
    torch.manual_seed(seed)
    model = PatchTransformer(norm_layer(arm, mode))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    order = torch.Generator().manual_seed(seed)
    finite, curve, losses, step = True, [], [], 0
    for epoch in range(1, EPOCHS[mode] + 1):
        model.train()
        perm = torch.randperm(len(y_train), generator=order)
        steps = SMOKE_STEPS if mode == "smoke" else STEPS_PER_EPOCH
        for i in range(steps):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            finite = finite and math.isfinite(loss.item())
            losses.append([step, loss.item()])
        curve.append([epoch, _accuracy(_logits(model, x_test), y_test)])
    logits = _logits(model, x_test)
    finite = finite and bool(torch.isfinite(logits).all())
    metrics = {"acc": _accuracy(logits, y_test), "finite": float(finite)}
    if arm in UN_ARMS:
        fused = copy.deepcopy(model).eval()
        fuse_norms(fused)
        fused_logits = _logits(fused, x_test)
        metrics["fused_max_logit_diff"] = (fused_logits - logits).abs().max().item()
        metrics["fused_same_predictions"] = float(torch.equal(fused_logits.argmax(-1), logits.argmax(-1)))
        metrics["skips"] = float(sum(m.skip_counter.item() for m in model.modules() if isinstance(m, UnifiedNorm)))
    return {"metrics": metrics, "curves": {"test_acc": curve, "train_loss": losses}}



def _fused_ok(records: list[Record], arm: str) -> tuple[bool, float]:
    recs = [r for r in records if r["arm"] == arm]
    worst = max(r["metrics"]["fused_max_logit_diff"] for r in recs)
    ok = all(r["metrics"]["fused_same_predictions"] == 1.0 for r in recs) and worst <= LOGIT_TOL
    return ok, worst


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS[:2])
    acc = {arm: vals for (arm, _), vals in records_by_arm(records, "acc").items()}
    finite = all(r["metrics"]["finite"] == 1.0 for r in records)
    fused_ok, worst = _fused_ok(records, "un")
    ln, un = fmean(acc["ln"]), fmean(acc["un"])
    numbers = "; ".join(f"{arm} {fmean(v):.1f} % (seeds: {', '.join(f'{a:.1f}' for a in v)})"
                        for arm, v in acc.items())
    fused = (f"fused UN predictions identical on every seed: {'yes' if fused_ok else 'no'} "
             f"(max |logit diff| {worst:.1e}, need <= {LOGIT_TOL:g})")
    if "plain" in acc:
        numbers += " [plain: report only]"
    if mode == "smoke":
        return "report", f"smoke: {numbers}; {fused}"
    if mode == "quick":
        gap_ok = un >= ln - QUICK_MARGIN
        status = "pass" if gap_ok and fused_ok and finite else "fail"
        return status, (f"indicative (quick: seed 0, 12 epochs): UN {un:.1f} % vs LN {ln:.1f} % (need UN >= LN - "
                        f"{QUICK_MARGIN:g}: {'yes' if gap_ok else 'no'}); {fused}; finite: {finite}. {numbers}")
    gap_ok, floor_ok = un >= ln - MARGIN, un >= FLOOR
    status = "pass" if gap_ok and floor_ok and fused_ok and finite else "fail"
    return status, (f"UN {un:.1f} % vs LN {ln:.1f} % (need UN >= LN - {MARGIN:g}: {'yes' if gap_ok else 'no'}; "
                    f"UN >= {FLOOR:g} %: {'yes' if floor_ok else 'no'}); {fused}; no NaN: {finite}. {numbers}")


EXPERIMENT = register(Experiment(
    id="unified_norm",
    claim="Unified Normalization trains a pre-norm transformer to LayerNorm's accuracy, and its eval model "
          "folds into the Linear layers with identical predictions.",
    baseline="the same digits patch transformer with torch.nn.LayerNorm, same data order, optimiser and lr",
    metric="digits test accuracy (%) in eval mode after 30 epochs; max |logit difference| fused vs unfused UN",
    primary_metric="acc",
    pass_rule="mean UN accuracy >= mean LN accuracy - 1.0 point and >= 95.0 % over seeds 0-2; on every seed the "
              "fused UN model's test predictions equal the unfused model's with max |logit diff| <= 1e-4; no NaN "
              "(the plain batch-statistics arm is report only). Quick (indicative): seed 0, 12 epochs, UN >= LN - 3 "
              "points and identical fused predictions",
    grids={
        "full": Grid(ARMS, (LR,), (0, 1, 2), 1200.0),
        "quick": Grid(ARMS[:2], (LR,), (0,), 60.0),
        "smoke": Grid(ARMS, (LR,), (0,), 30.0),
    },
    run=run,
    verdict=verdict,
))


# ---------------------------------------------------------------------------------------------------------
# unified_norm.inference

SHAPES = {"b64_t16": (64, 16), "b8_t128": (8, 128), "b1_t16": (1, 16)}
#: d_model, layers, heads, timed rounds by mode
TIMING = {"full": (256, 6, 4, 35), "quick": (256, 6, 4, 6), "smoke": (16, 1, 2, 2)}
WARM_CALLS, NOT_SLOWER = 3, 1.05


def timing_models(seed: int, mode: str, n_tokens: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(LN model, UN model in eval, fused UN model)`` with the same Linear weights and positions."""
    d, layers, heads, _ = TIMING[mode]
    torch.manual_seed(seed)
    ln = PatchTransformer(nn.LayerNorm, d, layers, heads, n_tokens)
    torch.manual_seed(seed)
    un = PatchTransformer(UnifiedNorm, d, layers, heads, n_tokens)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in un.modules():
            if isinstance(m, UnifiedNorm):
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    fused = copy.deepcopy(un).eval()
    fuse_norms(fused)
    return ln.eval(), un.eval(), fused


def alternating_cpu_times(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Per-call thread CPU seconds of each model, no grad, the models called alternately in every round
    (so that load and cache state hit them alike; CPU time ignores the time other processes hold the core)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(WARM_CALLS):
            for model in models.values():
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.thread_time()
                model(x)
                times[name].append(time.thread_time() - start)
    return times


def run_inference(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    batch, n_tokens = SHAPES[arm]
    ln, un, fused = timing_models(seed, mode, n_tokens)
    x = torch.rand(batch, n_tokens, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (fused(x) - un(x)).abs().max().item()
    times = alternating_cpu_times({"ln": ln, "un": un, "fused": fused}, x, TIMING[mode][3])

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["ln"]))

    metrics = {"ratio_fused": ratio("fused"), "ratio_unfused": ratio("un"), "fused_max_logit_diff": diff}
    metrics.update({f"ms_{name}": statistics.median(t) * 1e3 for name, t in times.items()})
    return {"metrics": metrics, "curves": {}}


def verdict_inference(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ())
    parts = []
    for rec in sorted(records, key=lambda r: list(SHAPES).index(r["arm"])):
        m = rec["metrics"]
        parts.append(f"{rec['arm']}: fused/LN {m['ratio_fused']:.2f}x "
                     f"(<= {NOT_SLOWER}: {'yes' if m['ratio_fused'] <= NOT_SLOWER else 'no'}), unfused/LN "
                     f"{m['ratio_unfused']:.2f}x, LN {m['ms_ln']:.2f} ms, fused |logit diff| "
                     f"{m['fused_max_logit_diff']:.1e}")
    return "report", (f"{mode}, report only (timings never decide; medians of alternating calls, thread CPU time, "
                       "1 thread): " + "; ".join(parts))


INFERENCE = register(Experiment(
    id="unified_norm.inference",
    claim="A fused UN model (every UN folded into its Linear readers or a fixed affine) infers no slower than "
          "the LayerNorm model.",
    baseline="the same transformer with torch.nn.LayerNorm, eval mode, no grad",
    metric="median per-round thread-CPU-time ratio fused-UN / LN (and unfused UN / LN), models called alternately",
    primary_metric="ratio_fused",
    pass_rule="report only: the sheet asserts fused <= 1.05 x LN, but timings never decide a verdict",
    grids={
        "full": Grid(tuple(SHAPES), (None,), (0,), 1200.0),
        "quick": Grid(tuple(SHAPES), (None,), (0,), 60.0),
        "smoke": Grid(("b1_t16",), (None,), (0,), 30.0),
    },
    run=run_inference,
    verdict=verdict_inference,
))
