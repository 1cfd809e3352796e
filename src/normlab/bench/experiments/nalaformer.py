"""Claim checks of NaLaFormer (Meng et al. 2025, arXiv:2506.21137): norm-aware linear attention.

- ``nalaformer.norm_awareness`` (the paper's core claim, exact and cheap): attention gets sharper as the
  query norm grows under NaLa, as under softmax, while plain linear attention cannot see the norm. Unit-norm
  random queries (64, d=16) scaled by a in {0.25, 0.5, 1, 2, 4, 8} against random keys (N=256), float64; the
  metric is the mean row entropy of the implied attention ``A = row-normalised phi(q) phi(k)^T`` (softmax:
  ``softmax(q k^T)``, no 1/sqrt(d), as the sheet measured). Arms: ``nala``, ``relu_linear``, ``elu_linear``,
  ``softmax``; a seed draws the queries and keys. Pass iff, on every seed, NaLa's entropy strictly decreases
  in a with ``H(0.25) - H(8) > 0.3`` and relu linear attention's entropy varies by at most 1e-12. Quick mode
  runs the same protocol (it takes milliseconds), so its verdict applies the same rule, labelled indicative.
- ``nalaformer.recall`` (report only; the sheet: "do not gate on it"): associative recall with a 2-layer
  pre-LN causal transformer (d=64, 4 heads; normlab's ``TinyTransformer`` with the attention kernel swapped,
  everything else identical), keys and values from 16 + 16 tokens, 4 distinct (key, value) pairs then a query
  key, predict its value (16 classes; 0.25 = picking any in-context value) at the last position; AdamW 3e-3,
  3000 steps of batch 64 (fresh sequences each step, the same for every arm of a seed), test accuracy on
  2000 fresh sequences; training runs on one thread (a second one only adds synchronisation at this size
  and stalls when other processes load the cores). The summary shows the sheet's smoke criteria: NaLa's final training loss below
  ln 16 and its accuracy within 3 points of elu+1 linear attention.
- ``nalaformer.scaling`` (report only: timings never decide): forward time and peak memory against the
  sequence length N = 512 ... 8192 (B=1, 4 heads, d=32, float32, 2 threads) for NaLa, elu+1 linear
  attention and softmax (``F.scaled_dot_product_attention``), plus NaLa alone at N = 65,536. Times are
  interleaved medians (``normlab.bench.speed.interleaved``: the three arms alternate within each round), so
  one run measures all arms and the other arms' runs read its cached result. Peak memory is what the
  torch profiler (``profile_memory=True``) records: the peak, over the call, of the bytes the CPU allocator
  holds above what it held at the start, i.e. every tensor and workspace the call allocates, including the
  output, excluding the inputs. It is measured for the forward without grad and for forward+backward.
  Note that torch's CPU SDPA is a flash-attention kernel: it never forms the N x N score matrix either, so
  its memory is linear too; its time is quadratic.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import linear_attention, nala_attention, nala_feature_maps
from ..experiment import Experiment, Grid, Record, intra_op_threads, records_mode, register
from ..speed import NUM_THREADS, interleaved, load_avg
from ..tasks import TinyTransformer

# ---- nalaformer.norm_awareness ----------------------------------------------------------------------------

NORM_ARMS = ("nala", "relu_linear", "elu_linear", "softmax")
QUERY_NORMS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
N_QUERIES, N_KEYS, HEAD_DIM = 64, 256, 16
MIN_DROP, INVARIANCE_TOL = 0.3, 1e-12


def implied_attention(arm: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``(queries, keys)`` attention matrix of ``arm``, rows summing to 1."""
    if arm == "softmax":
        return torch.softmax(q @ k.T, dim=-1)
    if arm == "nala":
        phi_q, phi_k = nala_feature_maps(q, k)
    elif arm == "relu_linear":
        phi_q, phi_k = F.relu(q), F.relu(k)
    elif arm == "elu_linear":
        phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    else:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(NORM_ARMS)}")
    scores = phi_q @ phi_k.T
    return scores / scores.sum(-1, keepdim=True)


def mean_row_entropy(attention: torch.Tensor) -> float:
    return (-torch.xlogy(attention, attention).sum(-1)).mean().item()


def run_norm_awareness(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N_QUERIES, HEAD_DIM, generator=gen, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    k = torch.randn(N_KEYS, HEAD_DIM, generator=gen, dtype=torch.float64)
    entropies = [mean_row_entropy(implied_attention(arm, a * q, k)) for a in QUERY_NORMS]
    metrics = {f"entropy_a{a:g}": h for a, h in zip(QUERY_NORMS, entropies)}
    metrics["entropy_drop"] = entropies[0] - entropies[-1]
    metrics["entropy_range"] = max(entropies) - min(entropies)
    return {"metrics": metrics, "curves": {"entropy_vs_query_norm": [[a, h] for a, h in zip(QUERY_NORMS, entropies)]}}


def verdict_norm_awareness(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, NORM_ARMS)
    by_arm = {arm: sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"]) for arm in NORM_ARMS}
    nala_ok = relu_ok = True
    for rec in by_arm["nala"]:
        h = [rec["metrics"][f"entropy_a{a:g}"] for a in QUERY_NORMS]
        nala_ok &= all(x > y for x, y in zip(h, h[1:])) and rec["metrics"]["entropy_drop"] > MIN_DROP
    for rec in by_arm["relu_linear"]:
        relu_ok &= rec["metrics"]["entropy_range"] <= INVARIANCE_TOL
    table = "; ".join(
        f"{arm}: H = " + ", ".join(f"{statistics.mean(r['metrics'][f'entropy_a{a:g}'] for r in recs):.3f}"
                                   for a in QUERY_NORMS)
        for arm, recs in by_arm.items())
    drops = [r["metrics"]["entropy_drop"] for r in by_arm["nala"]]
    relu_range = max(r["metrics"]["entropy_range"] for r in by_arm["relu_linear"])
    summary = (f"NaLa entropy strictly decreasing in ||q|| with H(0.25) - H(8) > {MIN_DROP} on every seed: "
               f"{'yes' if nala_ok else 'no'} (drop {min(drops):.3f}-{max(drops):.3f} over {len(drops)} seed(s)); "
               f"relu linear invariant to {INVARIANCE_TOL:g}: {'yes' if relu_ok else 'no'} (range {relu_range:.1e}). "
               f"Mean entropy at ||q|| = {', '.join(f'{a:g}' for a in QUERY_NORMS)} -> {table}")
    if mode == "smoke":
        return "report", f"smoke: {summary}"
    if mode == "quick":
        summary = f"indicative (quick: the full protocol, one seed): {summary}"
    return ("pass" if nala_ok and relu_ok else "fail"), summary


NORM_AWARENESS = register(Experiment(
    id="nalaformer.norm_awareness",
    claim="NaLa restores the query norm's control of attention sharpness that linear attention loses: the "
          "larger ||q||, the lower the entropy of NaLa's attention, while relu linear attention is invariant.",
    baseline="relu and elu+1 linear attention (norm-blind) and softmax attention (norm-aware), same q and k",
    metric="mean row entropy (nats) of the implied attention of 64 unit queries scaled by ||q|| = 0.25..8 over "
           "256 random keys (d=16, float64)",
    primary_metric="entropy_drop",
    pass_rule="pass iff on every seed NaLa's entropy strictly decreases over ||q|| in {0.25, 0.5, 1, 2, 4, 8} "
              "with H(0.25) - H(8) > 0.3, and relu linear attention's entropy range is <= 1e-12",
    grids={
        "full": Grid(NORM_ARMS, (None,), (0, 1, 2), 1200.0),
        "quick": Grid(NORM_ARMS, (None,), (0,), 30.0),
        "smoke": Grid(NORM_ARMS, (None,), (0,), 10.0),
    },
    run=run_norm_awareness,
    verdict=verdict_norm_awareness,
))

# ---- nalaformer.recall ------------------------------------------------------------------------------------

RECALL_ARMS = ("softmax", "nala", "elu_linear")
N_KEY_TOKENS = N_VALUE_TOKENS = 16
N_PAIRS, D_MODEL, N_LAYERS, N_HEADS, BATCH, LR = 4, 64, 2, 4, 64, 3e-3
RECALL_SIZES = {"full": {"steps": 3000, "test": 2000}, "quick": {"steps": 200, "test": 500},
                "smoke": {"steps": 5, "test": 64}}
LOG_EVERY = 25
TEST_SEED = 1_000_003  # + seed: a test stream the training stream (Generator(seed)) never shares
NALA_MARGIN = 0.03  # the sheet's smoke criterion: NaLa within 3 points of elu+1


class KernelAttention(nn.Module):
    """``TinyTransformer``'s attention (``qkv`` -> heads -> causal attention -> ``proj``) with the kernel of
    ``arm``: softmax (SDPA), NaLa or elu+1 linear attention. The same parameters for every arm."""

    def __init__(self, d_model: int, n_heads: int, arm: str) -> None:
        super().__init__()
        if arm not in RECALL_ARMS:
            raise ValueError(f"unknown arm {arm!r}; valid: {list(RECALL_ARMS)}")
        self.n_heads, self.arm = n_heads, arm
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if self.arm == "softmax":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.arm == "nala":
            out = nala_attention(q, k, v, causal=True)
        else:
            out = linear_attention(q, k, v, causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


def recall_model(arm: str, seed: int) -> TinyTransformer:
    """The seed's 2-layer pre-LN model with ``arm``'s attention and torch's default initialisation (with
    the GPT-style N(0, 0.02) every arm stays at chance, 0.24, after 3000 steps); every arm of a seed
    starts from the same weights (same parameter names and shapes, re-initialised after the swap)."""
    model = TinyTransformer(N_KEY_TOKENS + N_VALUE_TOKENS, D_MODEL, N_LAYERS, N_HEADS, max_len=2 * N_PAIRS + 1,
                            causal=True, n_outputs=N_VALUE_TOKENS, init="torch")
    for block in model.blocks:
        block.attn = KernelAttention(D_MODEL, N_HEADS, arm)
    torch.manual_seed(seed)
    model.reset_parameters()
    return model


def recall_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, target)``: ``k1 v1 ... k4 v4 q`` with distinct keys (ids 0-15) and distinct values (ids
    16-31), ``q`` one of the keys; the target is its value's index 0-15."""
    keys = torch.rand(batch, N_KEY_TOKENS, generator=generator).argsort(-1)[:, :N_PAIRS]
    values = torch.rand(batch, N_VALUE_TOKENS, generator=generator).argsort(-1)[:, :N_PAIRS]
    which = torch.randint(0, N_PAIRS, (batch,), generator=generator)
    rows = torch.arange(batch)
    pairs = torch.stack((keys, values + N_KEY_TOKENS), -1).flatten(1)
    return torch.cat((pairs, keys[rows, which, None]), 1), values[rows, which]


def run_recall(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    return _train_recall(arm, lr, seed, RECALL_SIZES[mode])


def _train_recall(arm: str, lr: float, seed: int, size: dict[str, int]) -> dict:
    model = recall_model(arm, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(size["steps"]):
        x, y = recall_batch(BATCH, gen)
        loss = F.cross_entropy(model(x)[:, -1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x, y = recall_batch(size["test"], torch.Generator().manual_seed(TEST_SEED + seed))
    with torch.no_grad():
        test_acc = (model(x)[:, -1].argmax(-1) == y).float().mean().item()
    tail = losses[-max(1, len(losses) // 20):]
    curve = [[min(i + LOG_EVERY, len(losses)), statistics.mean(losses[i:i + LOG_EVERY])]
             for i in range(0, len(losses), LOG_EVERY)]
    return {"metrics": {"test_acc": test_acc, "final_loss": statistics.mean(tail)}, "curves": {"train_loss": curve}}


def verdict_recall(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, RECALL_ARMS)
    mean = {arm: {m: statistics.mean(r["metrics"][m] for r in records if r["arm"] == arm)
                  for m in ("test_acc", "final_loss")} for arm in RECALL_ARMS}
    trains = mean["nala"]["final_loss"] < math.log(N_VALUE_TOKENS)
    close = mean["nala"]["test_acc"] >= mean["elu_linear"]["test_acc"] - NALA_MARGIN
    seeds = len({r["seed"] for r in records})
    numbers = "; ".join(f"{arm}: test acc {m['test_acc']:.3f}, final loss {m['final_loss']:.3f}"
                        for arm, m in mean.items())
    label = {"full": "report only (the sheet: the task does not separate the mechanisms at this budget)",
             "quick": "indicative (quick: fewer steps)", "smoke": "smoke"}[mode]
    return "report", (f"{label}: {numbers} ({seeds} seed(s); 0.25 = any in-context value). Sheet criteria: NaLa "
                      f"final loss < ln 16 = {math.log(N_VALUE_TOKENS):.2f}: {'yes' if trains else 'no'}; NaLa "
                      f"within {100 * NALA_MARGIN:.0f} points of elu+1: {'yes' if close else 'no'}")


RECALL = register(Experiment(
    id="nalaformer.recall",
    claim="NaLa attention trains a small transformer on associative recall as well as softmax and elu+1 linear "
          "attention (the sheet keeps it as a smoke test: at CPU budget the task does not separate them).",
    baseline="the same 2-layer pre-LN transformer with softmax (SDPA) or elu+1 linear attention",
    metric="test accuracy on 2000 fresh 4-pair recall sequences after 3000 AdamW steps (and the final training "
           "loss)",
    primary_metric="test_acc",
    pass_rule="report only; the summary shows the sheet's smoke criteria (NaLa final loss < ln 16, NaLa within "
              "3 points of elu+1)",
    grids={
        "full": Grid(RECALL_ARMS, (LR,), (0, 1), 1200.0),
        "quick": Grid(RECALL_ARMS, (LR,), (0,), 30.0),
        "smoke": Grid(RECALL_ARMS, (LR,), (0,), 10.0),
    },
    run=run_recall,
    verdict=verdict_recall,
))

# ---- nalaformer.scaling -----------------------------------------------------------------------------------

SCALING_ARMS = ("softmax", "elu_linear", "nala")
HEADS, SCALING_DIM = 4, 32
SCALING_SIZES = {
    "full": {"lengths": (512, 1024, 2048, 4096, 8192), "rounds": 5, "min_run_time": 0.2, "long": 65536},
    "quick": {"lengths": (512, 1024, 2048), "rounds": 3, "min_run_time": 0.05, "long": 16384},
    "smoke": {"lengths": (32, 128), "rounds": 1, "min_run_time": 0.001, "long": 512},
}  # each mode's lengths include longest / 4: the growth ratio t(4N)/t(N) is taken between them
ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": F.scaled_dot_product_attention,
    "elu_linear": linear_attention,
    "nala": nala_attention,
}


def attention_inputs(n: int, seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, SCALING_DIM, generator=gen).requires_grad_(requires_grad)
                 for _ in range(3))


def peak_mib(fn: Callable[[], object]) -> float:
    """The peak, over one call of ``fn``, of the CPU allocator's bytes above its level at the start (MiB),
    from the torch profiler's memory events (allocations and frees in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / 2**20


def _train_pass(arm: str, n: int, seed: int) -> Callable[[], object]:
    q, k, v = attention_inputs(n, seed, requires_grad=True)
    return lambda: ATTENTION[arm](q, k, v).sum().backward()


@functools.lru_cache(maxsize=4)
def measure_scaling(seed: int, mode: str) -> dict[str, dict]:
    """Every arm's record, measured together: per N, the arms' forward times interleaved round by round."""
    size = SCALING_SIZES[mode]
    with intra_op_threads(NUM_THREADS):  # timed at 2 threads, whatever the caller's setting
        results = {arm: {"metrics": {}, "curves": {"forward_ms": [], "forward_peak_mib": [], "train_peak_mib": []}}
                   for arm in SCALING_ARMS}
        for n in size["lengths"]:
            q, k, v = attention_inputs(n, seed)
            fns = {arm: functools.partial(ATTENTION[arm], q, k, v) for arm in SCALING_ARMS}
            with torch.no_grad():
                times = interleaved(fns, size["rounds"], size["min_run_time"])
                forward_peak = {arm: peak_mib(fn) for arm, fn in fns.items()}
            for arm in SCALING_ARMS:
                ms = statistics.median(times[arm]) * 1e3
                train_peak = peak_mib(_train_pass(arm, n, seed))
                res = results[arm]
                res["metrics"].update({f"ms_N{n}": ms, f"forward_peak_mib_N{n}": forward_peak[arm],
                                       f"train_peak_mib_N{n}": train_peak})
                res["curves"]["forward_ms"].append([n, ms])
                res["curves"]["forward_peak_mib"].append([n, forward_peak[arm]])
                res["curves"]["train_peak_mib"].append([n, train_peak])
        longest = size["lengths"][-1]
        short = longest // 4
        load = load_avg()
        for arm, res in results.items():
            m = res["metrics"]
            if load is not None:
                m["load_avg"] = load
            m["ms_largest"] = m[f"ms_N{longest}"]
            m["ratio_4n"] = m[f"ms_N{longest}"] / m[f"ms_N{short}"]
        q, k, v = attention_inputs(size["long"], seed)
        with torch.no_grad():
            start = time.perf_counter()
            out = nala_attention(q, k, v)
            seconds = time.perf_counter() - start
            peak = peak_mib(lambda: nala_attention(q, k, v))
        nala = results["nala"]["metrics"]
        nala.update({"long_n": float(size["long"]), "long_seconds": seconds, "long_peak_mib": peak,
                     "long_finite": float(torch.isfinite(out).all())})
        return results


def run_scaling(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    if arm not in SCALING_ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {list(SCALING_ARMS)}")
    return measure_scaling(seed, mode)[arm]


def verdict_scaling(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, SCALING_ARMS)
    m = {arm: next(r["metrics"] for r in records if r["arm"] == arm) for arm in SCALING_ARMS}
    lengths = SCALING_SIZES[mode]["lengths"]
    longest = lengths[-1]
    short = longest // 4
    nala, soft = m["nala"], m["softmax"]
    times = "; ".join(f"{arm}: " + ", ".join(f"{m[arm][f'ms_N{n}']:.1f}" for n in lengths) + " ms" for arm in m)
    memory = "; ".join(f"{arm}: {m[arm][f'forward_peak_mib_N{longest}']:.1f} MiB forward, "
                       f"{m[arm][f'train_peak_mib_N{longest}']:.1f} MiB forward+backward" for arm in m)
    checks = (f"NaLa t(N={longest})/t(N={short}) = {nala['ratio_4n']:.1f} (sheet: < 8: "
              f"{'yes' if nala['ratio_4n'] < 8 else 'no'}), softmax {soft['ratio_4n']:.1f} (sheet: > 10: "
              f"{'yes' if soft['ratio_4n'] > 10 else 'no'}), NaLa faster than softmax at N={longest}: "
              f"{'yes' if nala['ms_largest'] < soft['ms_largest'] else 'no'} "
              f"(x{soft['ms_largest'] / nala['ms_largest']:.1f})")
    long_run = (f"NaLa at N={nala['long_n']:.0f}: {nala['long_seconds']:.2f} s, peak {nala['long_peak_mib']:.0f} "
                f"MiB, output finite: {'yes' if nala['long_finite'] else 'no'}")
    label = {"full": "report only (timings never decide)", "quick": "indicative (quick: N up to 2048)",
             "smoke": "smoke"}[mode]
    if "load_avg" in nala:
        label += f"; 1-min load average {nala['load_avg']:.1f} while timing at {NUM_THREADS} threads"
    return "report", (f"{label}: forward ms at N = {', '.join(map(str, lengths))} -> {times}. {checks}. Peak "
                      f"memory at N={longest}: {memory}. {long_run}")


SCALING = register(Experiment(
    id="nalaformer.scaling",
    claim="NaLa attention is linear in the sequence length: its time grows ~4x per 4x tokens where softmax "
          "grows ~16x, it overtakes softmax at long sequences, and it runs at N = 65,536 without an N x N tensor.",
    baseline="softmax attention (F.scaled_dot_product_attention) and elu+1 linear attention, same q, k, v",
    metric="forward time (ms, interleaved medians at 2 threads) and profiler peak memory (MiB) per N, "
           "B=1, 4 heads, d=32, float32",
    primary_metric="ms_largest",
    pass_rule="report only (timings never decide a verdict); the summary evaluates the sheet's numbers: NaLa "
              "t(4N)/t(N) < 8, softmax > 10, NaLa faster than softmax at N=8192, NaLa finishes N=65,536",
    grids={
        "full": Grid(SCALING_ARMS, (None,), (0,), 1200.0),
        "quick": Grid(SCALING_ARMS, (None,), (0,), 30.0),
        "smoke": Grid(SCALING_ARMS, (None,), (0,), 10.0),
    },
    run=run_scaling,
    verdict=verdict_scaling,
))
