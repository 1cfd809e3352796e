"""Claim check of Pre-RMSNorm / Pre-CRMSNorm (Jiang et al. 2023): the conversions of a Pre-LN transformer
compute the same function, and the converted models are 1-10% faster.

Per seed, the sheet's timing model: normlab's ``TinyTransformer`` (d=256, 6 layers, 8 heads, B=16, T=128,
vocab 128, float32), its weights perturbed so that the residual stream is far from zero-mean (LN gain
1+0.1N and bias 0.1N, branch biases 0.3+0.1N, token-embedding offset +0.05 = about twice its std). Arms: ``pre_ln`` (the model itself),
``pre_rms`` (:func:`normlab.convert.to_rmsnorm`) and ``pre_crms`` (``compressed=True``). The ``pre_ln`` arm
records how hard the check is (the logit scale, and the stream's |mean|/std at the first norm). A converted arm
measures the max |logit difference| to the Pre-LN model in float32 and on float64 copies, and times its
forward+backward and its no-grad forward interleaved with the Pre-LN model in the same run (20 warm +
50 timed iterations, median), recording the time ratios. Quick and smoke modes shrink the model and the
iterations. Seeds are model-init seeds (two in full mode: a converted arm's run takes about 2 minutes on 2
quiet cores, mostly timing). Pass rule: every converted arm, every seed, fp64 diff <= 1e-9 and fp32 diff <= 1e-5; the
time ratios are reported, never decide (2 shared cores make them noisy).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ...convert import to_rmsnorm
from ..experiment import Experiment, Grid, Record, records_mode, register
from ..tasks import TinyTransformer

ARMS = ("pre_ln", "pre_rms", "pre_crms")
CONVERTED = ("pre_rms", "pre_crms")
VOCAB = 128
# d_model, layers, heads, batch, seq_len, warm-up and timed iterations
SIZES = {
    "full": {"d": 256, "layers": 6, "heads": 8, "batch": 16, "seq": 128, "warm": 20, "timed": 50},
    "quick": {"d": 64, "layers": 2, "heads": 4, "batch": 8, "seq": 32, "warm": 3, "timed": 12},
    "smoke": {"d": 16, "layers": 1, "heads": 2, "batch": 2, "seq": 8, "warm": 1, "timed": 2},
}
TOL_FP64, TOL_FP32 = 1e-9, 1e-5


def build_model(seed: int, mode: str) -> TinyTransformer:
    """The seed's Pre-LN model, float32, eval mode, with a residual stream far from zero-mean."""
    size = SIZES[mode]
    torch.manual_seed(seed)
    model = TinyTransformer(VOCAB, size["d"], size["layers"], size["heads"], max_len=size["seq"])
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 + 0.1 * noise)
            elif name == "tok_emb.weight":
                p.add_(0.05)  # stream |mean| about 2x its std
    return model.eval()


def _converted(model: nn.Module, arm: str) -> nn.Module:
    twin = copy.deepcopy(model)
    to_rmsnorm(twin, compressed=arm == "pre_crms")
    return twin


def _interleaved_medians(fns: list[Callable[[], None]], warm: int, timed: int) -> list[float]:
    """Median seconds of each callable, run in alternating order so that load hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warm + timed):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for j in order:
            start = time.perf_counter()
            fns[j]()
            elapsed = time.perf_counter() - start
            if i >= warm:
                times[j].append(elapsed)
    return [statistics.median(t) for t in times]


def _train_step(model: nn.Module, idx: torch.Tensor) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(idx).float().square().mean().backward()
    return step


def _infer(model: nn.Module, idx: torch.Tensor) -> Callable[[], None]:
    def forward():
        with torch.no_grad():
            model(idx)
    return forward


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
    size = SIZES[mode]
    model = build_model(seed, mode)
    idx = torch.randint(0, VOCAB, (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(seed))
    if arm == "pre_ln":  # the baseline is timed inside each converted arm's run; here: how hard the check is
        stream = []
        hook = model.blocks[0].norm1.register_forward_pre_hook(lambda mod, args: stream.append(args[0].detach()))
        with torch.no_grad():
            logits = model(idx)
        hook.remove()
        x = stream[0]
        return {"metrics": {"logit_abs_max": logits.abs().max().item(),
                            "stream_mean_to_std": (x.mean(-1).abs() / x.std(-1)).mean().item()}, "curves": {}}
    converted = _converted(model, arm)
    with torch.enable_grad():
        diff32 = (model(idx) - converted(idx)).abs().max().item()
    model64 = copy.deepcopy(model).double()
    diff64 = (model64(idx) - _converted(model64, arm)(idx)).abs().max().item()
    del model64
    base_train, arm_train = _interleaved_medians([_train_step(model, idx), _train_step(converted, idx)],
                                                 size["warm"], size["timed"])
    base_infer, arm_infer = _interleaved_medians([_infer(model, idx), _infer(converted, idx)],
                                                 size["warm"], size["timed"])
    return {"metrics": {"max_diff_fp64": diff64, "max_diff_fp32": diff32,
                        "train_ms": 1e3 * arm_train, "infer_ms": 1e3 * arm_infer,
                        "train_ratio": arm_train / base_train, "infer_ratio": arm_infer / base_infer},
            "curves": {}}


def _ok(rec: Record) -> bool:
    m = rec["metrics"]
    return (math.isfinite(m["max_diff_fp64"]) and math.isfinite(m["max_diff_fp32"])
            and m["max_diff_fp64"] <= TOL_FP64 and m["max_diff_fp32"] <= TOL_FP32)


def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, CONVERTED)
    parts, passed = [], True
    for arm in CONVERTED:
        recs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        ok = all(_ok(r) for r in recs)
        passed &= ok
        worst64 = max(r["metrics"]["max_diff_fp64"] for r in recs)
        worst32 = max(r["metrics"]["max_diff_fp32"] for r in recs)
        train = statistics.median(r["metrics"]["train_ratio"] for r in recs)
        infer = statistics.median(r["metrics"]["infer_ratio"] for r in recs)
        parts.append(f"{arm}: max |logit diff| fp64 {worst64:.1e} (<= {TOL_FP64:g}), fp32 {worst32:.1e} "
                     f"(<= {TOL_FP32:g}) over {len(recs)} seed(s): {'equal' if ok else 'NOT equal'}; time vs "
                     f"pre_ln (report only, paper: 1-10% faster): fwd+bwd x{train:.3f}, inference x{infer:.3f}")
    summary = "; ".join(parts)
    base = [r["metrics"] for r in records if r["arm"] == "pre_ln"]
    if base:
        summary += (f" (Pre-LN logits up to {max(m['logit_abs_max'] for m in base):.2f}, stream |mean|/std "
                    f"{min(m['stream_mean_to_std'] for m in base):.2f} at the first norm)")
    if mode == "smoke":
        return "report", f"smoke: {summary}"
    status = "pass" if passed else "fail"
    if mode == "quick":
        summary = f"indicative (quick: smaller model, fewer timing iterations): {summary}"
    return status, summary


EXPERIMENT = register(Experiment(
    id="pre_rmsnorm",
    claim="Pre-LN transformers convert exactly into Pre-RMSNorm and Pre-CRMSNorm transformers (same outputs), "
          "which are 1-10% faster.",
    baseline="the Pre-LN TinyTransformer the conversions start from (d=256, 6 layers, B=16, T=128, float32)",
    metric="max |logit difference| to Pre-LN in float64 and float32; forward+backward and inference time as a "
           "ratio to Pre-LN, interleaved medians in the same run",
    primary_metric="max_diff_fp32",
    pass_rule="pass iff every converted arm on every seed has fp64 diff <= 1e-9 and fp32 diff <= 1e-5; the time "
              "ratios are reported only",
    grids={
        "full": Grid(ARMS, (None,), (0, 1), 1200.0),
        "quick": Grid(ARMS, (None,), (0,), 30.0),
        "smoke": Grid(ARMS, (None,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
))
