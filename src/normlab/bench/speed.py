"""``normlab speed``: interleaved speed micro-benchmarks against torch's own layers, attention and optimizers.

Every row times one job against the torch baseline of the same job, measured in the same rounds:
each round times the baseline, the candidate eager, the candidate under ``torch.compile`` and a copy
(``clone()``) of the same input with ``torch.utils.benchmark.Timer`` at 2 threads, so that load from
other processes hits all of them alike. A row reports medians over rounds of

- ``ratio_eager`` / ``ratio_compiled``: candidate time / baseline eager time of the same round;
- ``copy_x_eager`` / ``copy_x_compiled``: candidate time / copy time of the same round (the copy is
  the memory-bandwidth floor: no layer can read its input and write its output faster);
- ``state_bytes`` (optimizer rows): the bytes of every tensor in ``optimizer.state`` after one step.

Layer rows time forward + backward (``torch.autograd.grad`` of the output with a fixed random
cotangent, with respect to the input and every parameter (unused ones, e.g. AdaB2N's task weights on its
first task, get no gradient), in ``train()`` mode) at a token shape
(8 x 256 x 768, float32) against ``torch.nn.LayerNorm`` and at a conv shape (16 x 64 x 32 x 32)
against ``torch.nn.BatchNorm2d``. The baseline is always torch's eager layer; the compiled column
compiles the candidate once (inductor), warms it up, then times it. Optimizer rows time
``optimizer.step()`` (``step(closure)`` for zeroth-order ones) on a ~10M-parameter MLP (fixed random
gradients) against ``torch.optim.AdamW(foreach=True)``; their copy is a ``clone()`` of every parameter
and their compiled column compiles ``step``. Attention rows time forward + backward (``torch.autograd.grad`` with respect to
q, k and v) of an attention function on ``(B, heads, N, d) = (1, 4, N, 32)`` float32 inputs at
N = 512, 2048 and 8192 against ``torch.nn.functional.scaled_dot_product_attention`` at the same shape
(causal rows against its ``is_causal=True``); their copy is a ``clone()`` of q. A case whose setup, eager
run, compile or timing fails becomes a row with ``error`` set; the other rows still run.

Hessian rows time one Hessian-vector product against one forward+backward of the same loss and count the
HVPs power iteration and Lanczos need for the top eigenvalue (see :class:`HessianCase`).

Adding a row is one line in ``LAYER_CASES``, ``ATTENTION_CASES``, ``OPTIMIZER_CASES`` or ``HESSIAN_CASES``;
:func:`setup_layer`, :func:`setup_attention` and :func:`setup_optimizer` are the one setup function per
case that speed and memory runs share (Liger-Kernel's benchmark layout). Timings never decide anything
else in normlab: they are reported.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from ..attention import linear_attention, nala_attention
from ..layers import (AdaB2N, AlphaBatchNorm, BatchChannelNorm2d, CRMSNorm, EvoNormB0, EvoNormS0, LayerNorm,
                      LearnableRegionNorm2d, PowerNorm, RegionNorm2d, RMSNorm, TDLayerNorm, TDRMSNorm, UnifiedNorm,
                      end_task, set_task_counts)
from ..optim import SGDP, SWAN, AdamP, DiffGrad, SinkGD, ZOAdam, optimizer_state_bytes
from .experiment import intra_op_threads

NUM_THREADS = 2

#: full-mode and quick-mode input shapes by name; the feature dim is the last dim for "token" and
#: dim 1 for "conv".
SHAPES = {
    "token": {"full": (8, 256, 768), "quick": (2, 8, 32)},
    "conv": {"full": (16, 64, 32, 32), "quick": (2, 4, 8, 8)},
}
FEATURE_DIM = {"token": -1, "conv": 1}
#: attention rows: (batch, heads, head dim) by mode; the sequence length is the case's (full) or
#: ``ATTENTION_QUICK_LEN`` (quick).
ATTENTION_DIMS = {"full": (1, 4, 32), "quick": (1, 2, 8)}
ATTENTION_QUICK_LEN = 16
#: the ~10M-parameter MLP of the optimizer rows: Linear(1280, 4096) -> GELU -> Linear(4096, 1280).
MLP_WIDTHS = {"full": (1280, 4096, 1280), "quick": (16, 32, 16)}
#: (rounds, seconds per measurement) by mode.
BUDGET = {"full": (7, 0.2), "quick": (2, 0.005)}


@dataclass(frozen=True)
class LayerCase:
    """A layer row: ``make_module(num_features)`` built on the ``shape`` input ("token" or "conv"),
    timed fwd+bwd against the eager layer of ``baseline`` (a key of ``LAYER_BASELINES``).
    ``width_offset`` changes the feature dim of the input (CRMSNorm takes the compressed width d-1);
    ``train=False`` times the module in ``eval()`` mode (batch-statistics layers use running statistics)."""

    name: str
    make_module: Callable[[int], nn.Module]
    shape: str
    baseline: str = "layernorm"
    width_offset: int = 0
    train: bool = True
    note: str = ""


@dataclass(frozen=True)
class OptimizerCase:
    """An optimizer row: ``make_optimizer(params)`` stepped on the MLP, timed against AdamW(foreach).
    ``make_closure(params)``, for optimizers that evaluate the loss themselves (zeroth-order ones), builds the
    closure the row passes to every ``step``."""

    name: str
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    baseline: str = "adamw"
    note: str = ""
    make_closure: Callable[[list[nn.Parameter]], Callable[[], torch.Tensor]] | None = None


@dataclass(frozen=True)
class AttentionCase:
    """An attention row: ``fn(q, k, v, causal=causal)`` at sequence length ``seq_len`` (full mode), timed
    fwd+bwd against ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)``."""

    name: str
    fn: Callable[..., torch.Tensor]
    seq_len: int
    causal: bool = False
    note: str = ""


@dataclass(frozen=True)
class HessianCase:
    """A Hessian row: the cross-entropy loss of an MLP ``64 -> hidden -> GELU -> 10`` on a batch of digits.
    ``ratio_eager`` is the time of one Hessian-vector product (:class:`normlab.analysis.HessianOperator`)
    as a multiple of one forward+backward of the same loss; ``hvps`` counts the HVPs that power iteration
    and Lanczos need to bring the top eigenvalue within 1e-3 (relative) of a converged reference."""

    name: str
    hidden: int = 128
    note: str = ""


class _TimeConditioned(nn.Module):
    """A time-conditioned norm (``forward(x, tau)``) fed one tau per sample, ``linspace(-1, 1, B)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, tau=torch.linspace(-1, 1, x.shape[0], device=x.device))


class _Masked(nn.Module):
    """Region Norm (``forward(x, mask)``) fed a hole covering rows H/4..H/2 and columns W/4..3W/4 of every
    sample (1/8 of the positions)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=x.device)
        mask[:, :, h // 4:h // 2, w // 4:3 * w // 4] = True
        return self.norm(x, mask)


class _TwoTasks(nn.Module):
    """AdaB2N on its second task, fed a batch that alternates the two task ids (task-wise weighting on)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.norm = AdaB2N(num_features, num_tasks=2)
        end_task(self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        set_task_counts(self.norm, torch.arange(x.shape[0], device=x.device) % 2)
        return self.norm(x)


def _matrix_groups(params: list[nn.Parameter], flag: str) -> list[dict]:
    """The MLP's two weights on the matrix update, its biases on the built-in Adam fallback."""
    return [{"params": [p for p in params if p.dim() == 2]},
            {"params": [p for p in params if p.dim() != 2], flag: False}]


def _peer(package: str, name: str, **kwargs) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A peer package's optimizer (imported when the row runs: the packages are dev extras)."""
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        module = __import__(package, fromlist=[name])
        return getattr(module, name)(params, **kwargs)
    return make


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


LAYER_BASELINES = {
    "layernorm": LayerCase("torch nn.LayerNorm", nn.LayerNorm, "token"),
    "batchnorm2d": LayerCase("torch nn.BatchNorm2d", nn.BatchNorm2d, "conv", baseline="batchnorm2d"),
}

OPTIMIZER_BASELINES = {
    "adamw": OptimizerCase("torch AdamW(foreach)",
                           lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)),
}

LAYER_CASES: list[LayerCase] = [
    LAYER_BASELINES["layernorm"],
    LayerCase("normlab LayerNorm", LayerNorm, "token"),
    LayerCase("normlab RMSNorm", RMSNorm, "token"),
    LayerCase("normlab CRMSNorm", CRMSNorm, "token", width_offset=-1,
              note="input width d-1 (767 at full size): the compressed d-vector, d = LayerNorm's width"),
    LayerCase("torch nn.RMSNorm", nn.RMSNorm, "token", note="shown beside"),
    LayerCase("normlab PowerNorm", PowerNorm, "token", note="defaults (group_num=1), train mode in warm-up"),
    LayerCase("normlab PowerNorm(group_num=None)", partial(PowerNorm, group_num=None), "token"),
    LayerCase("normlab PowerNorm eval", PowerNorm, "token", train=False, note="running statistic"),
    LayerCase("normlab UnifiedNorm", UnifiedNorm, "token",
              note="train mode; its step runs eagerly under torch.compile (graph break)"),
    LayerCase("normlab UnifiedNorm eval", UnifiedNorm, "token", train=False, note="running statistic"),
    LayerCase("normlab TDLayerNorm", lambda c: _TimeConditioned(TDLayerNorm(c)), "token", note="one tau per sample"),
    LayerCase("normlab TDRMSNorm", lambda c: _TimeConditioned(TDRMSNorm(c)), "token", note="one tau per sample"),
    LAYER_BASELINES["batchnorm2d"],
    LayerCase("normlab EvoNormB0", EvoNormB0, "conv", baseline="batchnorm2d"),
    LayerCase("normlab EvoNormB0 eval", EvoNormB0, "conv", baseline="batchnorm2d", train=False,
              note="running variance; instance std still computed"),
    LayerCase("normlab EvoNormS0", EvoNormS0, "conv", baseline="batchnorm2d", note="32 groups"),
    LayerCase("normlab BatchChannelNorm2d", lambda c: BatchChannelNorm2d(c, num_groups=math.gcd(c, 32)), "conv",
              baseline="batchnorm2d", note="estimated statistics (r = 0.01), 32 groups"),
    LayerCase("normlab AlphaBatchNorm", AlphaBatchNorm, "conv", baseline="batchnorm2d", note="train mode = BatchNorm"),
    LayerCase("normlab AlphaBatchNorm eval", AlphaBatchNorm, "conv", baseline="batchnorm2d", train=False,
              note="alpha = 0.9 mix of running and test-batch statistics"),
    LayerCase("normlab RegionNorm2d", lambda c: _Masked(RegionNorm2d(c)), "conv", baseline="batchnorm2d",
              note="RN-B, one rectangular hole per sample"),
    LayerCase("normlab LearnableRegionNorm2d", LearnableRegionNorm2d, "conv", baseline="batchnorm2d",
              note="RN-L, kernel 7"),
    LayerCase("normlab AdaB2N", partial(AdaB2N, num_tasks=2), "conv", baseline="batchnorm2d",
              note="first task: plain batch statistics"),
    LayerCase("normlab AdaB2N two tasks", _TwoTasks, "conv", baseline="batchnorm2d",
              note="task-wise weighted statistics"),
]

HESSIAN_CASES: list[HessianCase] = [
    HessianCase("normlab HVP and top eigenvalue (MLP 64-128-10, 500 digits)"),
]

ATTENTION_CASES: list[AttentionCase] = [
    *(AttentionCase(f"normlab nala_attention N={n}", nala_attention, n) for n in (512, 2048, 8192)),
    AttentionCase("normlab nala_attention causal N=2048", nala_attention, 2048, causal=True,
                  note="vs SDPA is_causal=True; chunk-wise prefix sums"),
    AttentionCase("normlab linear_attention elu+1 N=2048", linear_attention, 2048, note="shown beside"),
]

OPTIMIZER_CASES: list[OptimizerCase] = [
    OPTIMIZER_BASELINES["adamw"],
    OptimizerCase("torch SGD(momentum, foreach)",
                  lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True)),
    OptimizerCase("normlab AdamP", lambda params: AdamP(params, lr=1e-3, weight_decay=0.01),
                  note="per-tensor path (torch's CPU default)"),
    OptimizerCase("normlab AdamP(foreach)", lambda params: AdamP(params, lr=1e-3, weight_decay=0.01, foreach=True)),
    OptimizerCase("adamp AdamP (official)", _peer("adamp", "AdamP", lr=1e-3, weight_decay=0.01), note="peer"),
    OptimizerCase("pytorch-optimizer AdamP", _peer("pytorch_optimizer", "AdamP", lr=1e-3, weight_decay=0.01),
                  note="peer"),
    OptimizerCase("normlab SGDP", lambda params: SGDP(params, lr=1e-2, momentum=0.9, weight_decay=1e-4)),
    OptimizerCase("normlab DiffGrad", lambda params: DiffGrad(params, lr=1e-3, weight_decay=0.01,
                                                              decoupled_weight_decay=True),
                  note="decoupled wd like the AdamW baseline; per-tensor loop (torch's CPU default)"),
    OptimizerCase("normlab DiffGrad(foreach)", lambda params: DiffGrad(params, lr=1e-3, weight_decay=0.01,
                                                                       decoupled_weight_decay=True, foreach=True)),
    OptimizerCase("pytorch-optimizer DiffGrad", _peer("pytorch_optimizer", "DiffGrad", lr=1e-3, weight_decay=0.01),
                  note="peer (decoupled wd by default)"),
    OptimizerCase("normlab SWAN", lambda params: SWAN(_matrix_groups(params, "use_swan"), lr=1e-3),
                  note="both weights whitened (Newton-Schulz k=10); biases on Adam"),
    OptimizerCase("normlab SinkGD", lambda params: SinkGD(_matrix_groups(params, "use_sinkgd"), lr=1e-3),
                  note="both weights SR-Sinkhorn L=5; biases on Adam"),
    OptimizerCase("normlab ZOAdam", lambda params: ZOAdam(params, lr=1e-3),
                  make_closure=lambda params: lambda: params[-1].sum(),
                  note="2 probes; the closure is the sum of one bias, so this is the optimizer's own cost on top of "
                       "its 3 forward passes"),
]


Case = LayerCase | AttentionCase | OptimizerCase


def all_cases() -> list[Case]:
    """The registered rows: layers, attention, optimizers, Hessian."""
    return [*LAYER_CASES, *ATTENTION_CASES, *OPTIMIZER_CASES, *HESSIAN_CASES]


def _mode(quick: bool) -> str:
    return "quick" if quick else "full"


def input_shape(case: LayerCase, quick: bool) -> tuple[int, ...]:
    """The input shape of a layer case in this mode (``width_offset`` applied to the feature dim)."""
    shape = list(SHAPES[case.shape][_mode(quick)])
    shape[FEATURE_DIM[case.shape]] += case.width_offset
    return tuple(shape)


def setup_layer(case: LayerCase, quick: bool, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(module, x, dy)``: the module in the case's mode, an input that requires grad and a cotangent."""
    shape = input_shape(case, quick)
    gen = torch.Generator().manual_seed(seed)
    module = case.make_module(shape[FEATURE_DIM[case.shape]]).train(case.train)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    dy = torch.randn(shape, generator=gen)
    return module, x, dy


def attention_shape(case: AttentionCase, quick: bool) -> tuple[int, int, int, int]:
    """``(batch, heads, N, head_dim)`` of an attention case in this mode."""
    batch, heads, dim = ATTENTION_DIMS[_mode(quick)]
    return batch, heads, ATTENTION_QUICK_LEN if quick else case.seq_len, dim


def setup_attention(case: AttentionCase, quick: bool, seed: int = 0
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``((q, k, v), dy)``: inputs that require grad and a cotangent of the output's shape."""
    shape = attention_shape(case, quick)
    gen = torch.Generator().manual_seed(seed)
    qkv = tuple(torch.randn(shape, generator=gen).requires_grad_(True) for _ in range(3))
    return qkv, torch.randn(shape, generator=gen)


def mlp(quick: bool, seed: int = 0) -> nn.Sequential:
    """The optimizer rows' model (~10.5M parameters in full mode)."""
    torch.manual_seed(seed)
    d_in, hidden, d_out = MLP_WIDTHS[_mode(quick)]
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def setup_optimizer(case: OptimizerCase, quick: bool, seed: int = 0) -> tuple[torch.optim.Optimizer, list]:
    """``(optimizer, params)`` over a fresh MLP whose parameters hold fixed random gradients."""
    params = list(mlp(quick, seed).parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return case.make_optimizer(params), params


def _fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    return lambda: torch.autograd.grad(module(x), inputs, dy, allow_unused=True)


def _attention_fwd_bwd(fn: Callable[..., torch.Tensor], qkv: tuple[torch.Tensor, ...], dy: torch.Tensor,
                       causal: bool) -> Callable[[], object]:
    return lambda: torch.autograd.grad(fn(*qkv, causal=causal), qkv, dy)


def _timer(fn: Callable[[], object]) -> Timer:
    return Timer("fn()", globals={"fn": fn}, num_threads=NUM_THREADS)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float) -> dict[str, list[float]]:
    """Seconds per call of each function, one measurement per round, the functions alternating within
    each round (so that a burst of load hits them alike). Each measurement is the median of
    ``Timer.blocked_autorange`` at ``NUM_THREADS`` threads."""
    timers = {name: _timer(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return times


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _compile(make_fn: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """Compile once, warm up (the first calls compile forward and backward), return the callable."""
    torch._dynamo.reset()
    fn = make_fn()
    for _ in range(3):
        fn()
    return fn


def _name(backend: str | Callable) -> str:
    return backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))


def _error(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _row(kind: str, name: str, baseline: str, shape, note: str) -> dict:
    return {"kind": kind, "name": name, "baseline": baseline, "shape": list(shape), "dtype": "float32",
            "threads": NUM_THREADS, "note": note, "baseline_ms": None, "eager_ms": None, "compiled_ms": None,
            "copy_ms": None, "ratio_eager": None, "ratio_compiled": None, "copy_x_eager": None,
            "copy_x_compiled": None, "state_bytes": None, "rounds": 0, "load_avg": load_avg(), "error": None}


def load_avg() -> float | None:
    """The 1-minute load average when the row started (None where the OS has none): timings at
    ``NUM_THREADS`` threads mean little once other processes keep the cores busy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _fill(row: dict, times: dict[str, list[float]]) -> None:
    base, copy = times["baseline"], times["copy"]
    row["rounds"] = len(base)
    row["baseline_ms"] = statistics.median(base) * 1e3
    row["copy_ms"] = statistics.median(copy) * 1e3
    for mode in ("eager", "compiled"):
        if mode in times:
            row[f"{mode}_ms"] = statistics.median(times[mode]) * 1e3
            row[f"ratio_{mode}"] = _median_ratio(times[mode], base)
            row[f"copy_x_{mode}"] = _median_ratio(times[mode], copy)


def _time_row(row: dict, fns: dict, is_baseline: bool, rounds: int, min_run_time: float) -> None:
    try:
        times = interleaved(fns, rounds, min_run_time)
    except Exception as exc:  # noqa: BLE001 -- a case that fails while timed is an error row too
        row["error"] = _error(exc)
        return
    if is_baseline:
        times["eager"] = times["baseline"]
    _fill(row, times)


def time_layer(case: LayerCase, quick: bool, backend: str | Callable = "inductor") -> dict:
    """One layer row: fwd+bwd of ``case`` eager and compiled against its torch baseline, eager."""
    base_case = LAYER_BASELINES[case.baseline]
    row = _row("layer", case.name, base_case.name, input_shape(case, quick), case.note)
    rounds, min_run_time = BUDGET[_mode(quick)]
    try:
        base_module, base_x, base_dy = setup_layer(base_case, quick)
        module, x, dy = setup_layer(case, quick)
        fns = {"baseline": _fwd_bwd(base_module, base_x, base_dy), "copy": lambda: x.detach().clone()}
        if case is not base_case:
            fns["eager"] = _fwd_bwd(module, x, dy)
            fns["eager"]()
    except Exception as exc:  # noqa: BLE001 -- a broken case is reported as an error row
        row["error"] = _error(exc)
        return row
    try:
        fns["compiled"] = _compile(lambda: _fwd_bwd(torch.compile(module, backend=backend), x, dy))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"compile ({_name(backend)}): {_error(exc)}"
    _time_row(row, fns, case is base_case, rounds, min_run_time)
    return row


def time_attention(case: AttentionCase, quick: bool, backend: str | Callable = "inductor") -> dict:
    """One attention row: fwd+bwd of ``case.fn`` eager and compiled against SDPA eager, same shape."""
    baseline = "torch SDPA" + (" is_causal" if case.causal else "")
    row = _row("attention", case.name, baseline, attention_shape(case, quick), case.note)
    rounds, min_run_time = BUDGET[_mode(quick)]
    try:
        qkv, dy = setup_attention(case, quick)
        fns = {"baseline": _attention_fwd_bwd(_sdpa, qkv, dy, case.causal), "copy": lambda: qkv[0].detach().clone(),
               "eager": _attention_fwd_bwd(case.fn, qkv, dy, case.causal)}
        fns["eager"]()
    except Exception as exc:  # noqa: BLE001 -- a broken case is reported as an error row
        row["error"] = _error(exc)
        return row
    try:
        fns["compiled"] = _compile(lambda: _attention_fwd_bwd(torch.compile(case.fn, backend=backend), qkv, dy,
                                                              case.causal))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"compile ({_name(backend)}): {_error(exc)}"
    _time_row(row, fns, False, rounds, min_run_time)
    return row


def optimizer_step(case: OptimizerCase, opt: torch.optim.Optimizer, params: list[nn.Parameter]
                   ) -> Callable[[], object]:
    """The zero-argument step a row times: ``opt.step``, or ``opt.step(closure)`` for a closure case."""
    return opt.step if case.make_closure is None else partial(opt.step, case.make_closure(params))


def time_optimizer(case: OptimizerCase, quick: bool, backend: str | Callable = "inductor") -> dict:
    """One optimizer row: ``step()`` of ``case`` against AdamW(foreach=True), with its state bytes.
    The compiled column compiles ``step`` (torch.optim supports this)."""
    base_case = OPTIMIZER_BASELINES[case.baseline]
    row = _row("optimizer", case.name, base_case.name, [sum(p.numel() for p in mlp(quick).parameters())],
               case.note)
    rounds, min_run_time = BUDGET[_mode(quick)]
    try:
        base_opt, _ = setup_optimizer(base_case, quick)
        opt, params = setup_optimizer(case, quick)
        step = optimizer_step(case, opt, params)
        step()
        row["state_bytes"] = optimizer_state_bytes(opt)
        fns = {"baseline": base_opt.step, "copy": lambda: [p.detach().clone() for p in params]}
        if case is not base_case:
            fns["eager"] = step
    except Exception as exc:  # noqa: BLE001
        row["error"] = _error(exc)
        return row
    try:
        compiled_step = optimizer_step(case, *setup_optimizer(case, quick))
        fns["compiled"] = _compile(lambda: torch.compile(compiled_step, backend=backend))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"compile ({_name(backend)}): {_error(exc)}"
    _time_row(row, fns, case is base_case, rounds, min_run_time)
    return row


def setup_hessian(case: HessianCase, quick: bool, seed: int = 0):
    """``(operator, loss_and_grad, params)``: the Hessian operator of the case's loss, a function computing
    one forward+backward of it, and the parameters."""
    from ..analysis.hessian import HessianOperator
    from .tasks import digits

    torch.manual_seed(seed)
    hidden, n = (8, 64) if quick else (case.hidden, 500)
    model = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))
    x, y = digits("train", test_fraction=0.3, seed=0)
    batch = (x[:n].flatten(1), y[:n])
    params = list(model.parameters())
    op = HessianOperator(model, F.cross_entropy, batch)
    return op, lambda: torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), params), params


def time_hessian(case: HessianCase, quick: bool, backend: str | Callable = "inductor") -> dict:
    """One Hessian row (``backend`` is unused: HVPs are timed eager)."""
    from ..analysis.hessian import hvps_to_accuracy

    row = _row("hessian", case.name, "forward+backward of the loss", (), case.note)
    row["hvps"] = None
    rounds, min_run_time = BUDGET[_mode(quick)]
    try:
        op, fwd_bwd, params = setup_hessian(case, quick)
        row["shape"] = [op.numel]
        v = [torch.randn_like(p) for p in params]
        fns = {"baseline": fwd_bwd, "eager": lambda: op.hvp(v), "copy": lambda: [p.detach().clone() for p in params]}
        gen = torch.Generator().manual_seed(0)
        row["hvps"] = {method: hvps_to_accuracy(op, method, 1e-3, generator=gen) for method in ("power", "lanczos")}
    except Exception as exc:  # noqa: BLE001 -- a broken case is reported as an error row
        row["error"] = _error(exc)
        return row
    _time_row(row, fns, False, rounds, min_run_time)
    return row


def run_speed(quick: bool, cases: Sequence[Case | str] | None = None, *,
              backend: str | Callable = "inductor", progress: bool = False) -> list[dict]:
    """Time ``cases`` (default: every registered row; a string selects rows by name) and return one
    JSON-serialisable dict per row. ``quick`` uses tiny shapes and few rounds (for tests);
    ``backend`` is the ``torch.compile`` backend of the compiled column."""
    registry = all_cases()
    if cases is None:
        selected = registry
    else:
        by_name = {case.name: case for case in registry}
        selected = []
        for case in cases:
            if isinstance(case, str) and case not in by_name:
                raise KeyError(f"unknown speed case {case!r}; valid: {sorted(by_name)}")
            selected.append(by_name[case] if isinstance(case, str) else case)
    with intra_op_threads(NUM_THREADS):  # inductor bakes the thread count in at compile time
        iterator = selected
        if progress:
            from tqdm import tqdm
            iterator = tqdm(selected, desc="normlab speed", unit="row")
        rows = []
        for case in iterator:
            timer = (time_layer if isinstance(case, LayerCase) else
                     time_attention if isinstance(case, AttentionCase) else
                     time_hessian if isinstance(case, HessianCase) else time_optimizer)
            rows.append(timer(case, quick, backend))
        return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """The rows as a text table: ratios to the eager torch baseline and multiples of a copy."""
    header = ("row", "shape", "vs", "eager", "compiled", "eager/copy", "comp/copy", "ms eager", "ms base",
              "state MiB")
    lines = []
    for r in rows:
        state = None if r["state_bytes"] is None else r["state_bytes"] / 2**20
        shape = ("x".join(map(str, r["shape"])) if r["kind"] not in ("optimizer", "hessian") else
                 f"{r['shape'][0] / 1e6:.2f}M params" if r["shape"] else "-")
        lines.append((r["name"], shape, r["baseline"], _fmt(r["ratio_eager"], ".2f") + "x",
                      _fmt(r["ratio_compiled"], ".2f") + "x", _fmt(r["copy_x_eager"], ".1f"),
                      _fmt(r["copy_x_compiled"], ".1f"), _fmt(r["eager_ms"], ".3f"), _fmt(r["baseline_ms"], ".3f"),
                      _fmt(state, ".1f")))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    threads = rows[0]["threads"] if rows else NUM_THREADS
    out.append("")
    out.append(f"float32, {threads} threads, torch {torch.__version__}; eager/compiled = time / torch baseline eager "
               "(medians of per-round ratios, lower is faster); x/copy = time / clone() of the same input.")
    loads = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
    if loads:
        out.append(f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores while timing "
                   "(other processes preempting the timed threads inflate every ratio toward counts of "
                   "parallel regions).")
    for r in rows:
        if r["note"]:
            out.append(f"{r['name']}: {r['note']}")
        if r.get("hvps"):
            out.append(f"{r['name']}: HVPs to the top eigenvalue within 1e-3: "
                       + ", ".join(f"{method} {count}" for method, count in r["hvps"].items()))
        if r["error"]:
            out.append(f"{r['name']}: ERROR {r['error']}")
    return "\n".join(out)
