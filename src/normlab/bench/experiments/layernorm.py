"""Claim check of Layer Normalization (Ba, Kiros, Hinton 2016): LN speeds up the training of an LSTM.

Character-level language model on the first 60 ``.py`` files of the standard library (``char_corpus``,
ASCII clipped to 128 symbols, one-hot input), one-layer LSTM with H=128 and a linear head, T=50, B=32,
Adam, gradient-norm clipping at 1.0, 200 steps. Arms: ``lstm`` (``torch.nn.LSTM``) and ``ln_lstm``
(:class:`normlab.LayerNormLSTM`, the paper's equations). Both arms of a seed see the same batches.
Metrics: the mean training loss over steps 90-110 (``loss_100``) and 180-200 (``loss_200``); the quick
and smoke modes run fewer steps and take the same metrics over the same fractions of the run.
"""

from __future__ import annotations

import math
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.layernorm_lstm import LayerNormLSTM
from ..experiment import Experiment, Grid, Record, best_lr, records_by_arm, records_mode, register
from ..tasks import char_batch, char_corpus

VOCAB, HIDDEN, SEQ_LEN, BATCH, CLIP = 128, 128, 50, 32, 1.0
ARMS = ("lstm", "ln_lstm")
STEPS = {"full": 200, "quick": 150, "smoke": 6}
MARGIN = 0.2  # nats: LN-LSTM loss@200 must beat the LSTM's by this much


def _window(steps: int, lo: float, hi: float) -> tuple[int, int]:
    """Steps ``[lo * steps, hi * steps]`` (1-based, inclusive): 90-110 and 180-200 at 200 steps."""
    return max(1, round(lo * steps)), max(1, round(hi * steps))


class CharLM(nn.Module):
    """One-hot characters -> one-layer (LN-)LSTM -> linear head over the vocabulary."""

    def __init__(self, arm: str) -> None:
        super().__init__()
        if arm == "lstm":
            self.rnn = nn.LSTM(VOCAB, HIDDEN, batch_first=True)
        elif arm == "ln_lstm":
            self.rnn = LayerNormLSTM(VOCAB, HIDDEN, batch_first=True)
        else:
            raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(F.one_hot(idx, VOCAB).float())
        return self.head(out)


def run(arm: str, lr: float | None, seed: int, mode: str) -> dict:
    steps = STEPS[mode]
    ids = char_corpus(60, "ascii128", "train")
    data_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CharLM(arm)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = char_batch(ids, BATCH, SEQ_LEN, data_gen)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    metrics = {}
    for name, (lo, hi) in (("loss_100", _window(steps, 0.45, 0.55)), ("loss_200", _window(steps, 0.9, 1.0))):
        window = losses[lo - 1:hi]
        metrics[name] = sum(window) / len(window)
    return {"metrics": metrics, "curves": {"train_loss": [[i + 1, v] for i, v in enumerate(losses)]}}



def verdict(records: list[Record]) -> tuple[str, str]:
    mode = records_mode(records, ARMS)
    best = {}
    for arm in ARMS:
        lr, vals200 = best_lr(records, arm, "loss_200")
        vals100 = records_by_arm(records, "loss_100")[(arm, lr)]
        best[arm] = (lr, fmean(vals200), fmean(vals100), len(vals200))
    numbers = "; ".join(f"{arm}: best lr {lr:g}, loss@200 {l200:.3f}, loss@100 {l100:.3f} ({n} seed(s))"
                        for arm, (lr, l200, l100, n) in best.items())
    if mode != "full":
        label = "indicative (quick: fewer steps, metrics at the same fractions of the run)" if mode == "quick" \
            else "smoke"
        return "report", f"{label}: {numbers}"
    _, lstm200, _, _ = best["lstm"]
    _, ln200, ln100, _ = best["ln_lstm"]
    gap_ok = ln200 <= lstm200 - MARGIN
    speed_ok = ln100 <= lstm200
    status = "pass" if gap_ok and speed_ok and math.isfinite(ln200) else "fail"
    return status, (f"LN-LSTM loss@200 {ln200:.3f} vs LSTM {lstm200:.3f}: gap {lstm200 - ln200:.3f} "
                    f"(need >= {MARGIN}: {'yes' if gap_ok else 'no'}); LN-LSTM loss@100 {ln100:.3f} vs LSTM "
                    f"loss@200 {lstm200:.3f} (need <=: {'yes' if speed_ok else 'no'}). {numbers}")


EXPERIMENT = register(Experiment(
    id="layernorm",
    claim="Layer normalization speeds up the training of recurrent networks: an LN-LSTM reaches a lower "
          "training loss than a plain LSTM, and in half the steps reaches the plain LSTM's final loss.",
    baseline="torch.nn.LSTM with the same size, data, optimiser and lr grid",
    metric="character-level LM training loss (nats): mean over steps 90-110 (loss@100) and 180-200 (loss@200)",
    primary_metric="loss_200",
    pass_rule="best lr per arm by the seed mean of loss@200 (lr in {1e-3, 3e-3, 1e-2}, seeds {0, 1}); pass iff "
              "LN-LSTM loss@200 <= LSTM loss@200 - 0.2 and LN-LSTM loss@100 <= LSTM loss@200",
    grids={
        "full": Grid(ARMS, (1e-3, 3e-3, 1e-2), (0, 1), 1200.0),
        "quick": Grid(ARMS, (3e-3,), (0,), 30.0),
        "smoke": Grid(ARMS, (3e-3,), (0,), 10.0),
    },
    run=run,
    verdict=verdict,
))
