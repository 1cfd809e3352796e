"""Layer-normalised LSTM: ``LayerNormLSTMCell`` and the multi-layer, sequence-level ``LayerNormLSTM``.

Paper: Ba, Kiros, Hinton, "Layer Normalization", 2016, arXiv:1607.06450, section 3.1 and the LSTM
equations of the supplementary material. No official PyTorch code (the original was Theano).

With the gates in **torch's order (i, f, g, o)**, one step is::

    gates = LN(W_hh h_{t-1}; alpha_h) + LN(W_ih x_t; alpha_x) + b        # two 4H vectors, normalised separately
    i, f, g, o = gates.chunk(4)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t; alpha_c, beta_c))                      # LN over the H units

``LN(a; alpha)`` is ``(a - mean(a)) / sqrt(var(a) + eps) * alpha``: biased variance, eps inside the sqrt
(``F.layer_norm``). By default each of the two 4H pre-activation vectors is normalised over all 4H units,
as in the paper; ``per_gate=True`` normalises each gate's H units on their own (what several
re-implementations do; a different model, so it is shown in ``repr``). The statistics are per sample and
per step, so ``train()`` and ``eval()`` compute the same thing and padded sequences need nothing special.

Defaults: ``eps=1e-5`` (torch's LayerNorm); gains ``gain_init=1.0`` and biases 0 (the paper);
``W_ih``/``W_hh`` uniform in ``(-1/sqrt(H), 1/sqrt(H))`` like ``torch.nn.LSTM``.

Deviations:
- The paper writes a bias ``beta`` on each of the two 4H LNs as well as ``b``; the sum of the three is one
  bias, so the two 4H LNs here have a gain only and ``b`` (one 4H vector, torch has two) carries the shift.
- The paper orders the gates (f, i, o, g); torch's (i, f, g, o) is used so that weights line up with
  ``torch.nn.LSTM`` (``weight_ih``/``weight_hh`` have the same shapes and chunk layout).
- Biases start at 0, not uniform like torch's LSTM (the paper's initialisation).
- ``bias=False`` drops every additive parameter: ``b`` and ``beta_c``.
- No inter-layer dropout and no projections (``proj_size``); float16/bfloat16 are not special-cased:
  everything runs in the parameters' dtype (float32 or float64).
- ``eps=0`` is accepted but gives NaN whenever a normalised vector is constant, e.g. ``W_hh h_0`` for the
  default all-zero initial state.

Speed: ``LayerNormLSTM`` computes ``LN(W_ih x_t) + b`` for every step in one call before the time loop
(LN is per sample and per step, so this is exact); only the recurrent part loops over time.
``PackedSequence`` input runs on the padded batch with a length mask, so ``h_n``/``c_n`` are the states at
each sequence's last valid step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._validation import check_eps, check_input

State = tuple[torch.Tensor, torch.Tensor]


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class LayerNormLSTMCell(nn.Module):
    """One LN-LSTM step: ``LayerNormLSTMCell(input_size, hidden_size, bias=True, eps=1e-5, per_gate=False,
    gain_init=1.0, device=None, dtype=None)``.

    ``forward(input, hx=None) -> (h_1, c_1)`` like ``torch.nn.LSTMCell``: ``input`` is ``(B, input_size)``
    or unbatched ``(input_size,)``; ``hx = (h_0, c_0)``, each ``(B, hidden_size)`` (or ``(hidden_size,)``),
    zeros when omitted. Parameters: ``weight_ih (4H, input_size)``, ``weight_hh (4H, H)``, ``bias (4H)``,
    the LN gains ``gain_ih (4H)``, ``gain_hh (4H)``, ``gain_c (H)`` and the cell-LN bias ``bias_c (H)``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5,
                 per_gate: bool = False, gain_init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        check_eps(eps)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.eps, self.per_gate, self.gain_init = eps, per_gate, gain_init
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(gates, **factory)) if bias else None
        self.gain_ih = nn.Parameter(torch.empty(gates, **factory))
        self.gain_hh = nn.Parameter(torch.empty(gates, **factory))
        self.gain_c = nn.Parameter(torch.empty(hidden_size, **factory))
        self.bias_c = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)
        for gain in (self.gain_ih, self.gain_hh, self.gain_c):
            nn.init.constant_(gain, self.gain_init)
        for bias in (self.bias, self.bias_c):
            if bias is not None:
                nn.init.zeros_(bias)

    def _gate_norm(self, a: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """LN of a 4H pre-activation (gain only): over all 4H units, or per gate."""
        if self.per_gate:
            h = self.hidden_size
            return F.layer_norm(a.unflatten(-1, (4, h)), (h,), None, None, self.eps).flatten(-2) * gain
        return F.layer_norm(a, (4 * self.hidden_size,), gain, None, self.eps)

    def input_part(self, x: torch.Tensor) -> torch.Tensor:
        """``LN(W_ih x; alpha_x) + b`` for any leading shape (all time steps at once in ``LayerNormLSTM``)."""
        out = self._gate_norm(F.linear(x, self.weight_ih), self.gain_ih)
        return out if self.bias is None else out + self.bias

    def recurrent_step(self, x_part: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> State:
        """The rest of a step, given ``x_part = input_part(x_t)``."""
        gates = x_part + self._gate_norm(F.linear(h, self.weight_hh), self.gain_hh)
        act = torch.sigmoid(gates)
        i, f, _, o = act.chunk(4, dim=-1)
        g = torch.tanh(gates[..., 2 * self.hidden_size:3 * self.hidden_size])
        c = f * c + i * g
        h = o * torch.tanh(F.layer_norm(c, (self.hidden_size,), self.gain_c, self.bias_c, self.eps))
        return h, c

    def forward(self, input: torch.Tensor, hx: State | None = None) -> State:
        check_input(input, (self.input_size,))
        if input.dim() not in (1, 2):
            raise ValueError(f"expected input of shape (batch, {self.input_size}) or ({self.input_size},), "
                             f"got {tuple(input.shape)}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        state_shape = (x.shape[0], self.hidden_size)
        if hx is None:
            h = c = x.new_zeros(state_shape)
        else:
            h, c = (_check_state(t, name, state_shape if batched else (self.hidden_size,))
                    for t, name in zip(hx, ("h_0", "c_0")))
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = self.recurrent_step(self.input_part(x), h, c)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias is not None}, eps={self.eps}, "
                f"per_gate={self.per_gate}")


def _check_state(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not torch.compiler.is_compiling() and tuple(t.shape) != shape:
        raise ValueError(f"expected {name} of shape {shape}, got {tuple(t.shape)}")
    return t


class LayerNormLSTM(nn.Module):
    """Multi-layer LN-LSTM over sequences: ``LayerNormLSTM(input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, eps=1e-5, per_gate=False, gain_init=1.0, device=None, dtype=None)``.

    ``forward(input, hx=None) -> (output, (h_n, c_n))`` exactly like ``torch.nn.LSTM``: ``input`` is
    ``(T, B, input_size)`` (``(B, T, input_size)`` with ``batch_first``), unbatched ``(T, input_size)``,
    or a ``PackedSequence`` (then ``output`` is one too); ``hx = (h_0, c_0)`` each
    ``(num_layers, B, hidden_size)`` (``(num_layers, hidden_size)`` unbatched), zeros when omitted.
    Layer ``l`` is ``cells[l]``, a :class:`LayerNormLSTMCell`.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, eps: float = 1e-5, per_gate: bool = False, gain_init: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        check_eps(eps)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.per_gate = batch_first, per_gate
        self.cells = nn.ModuleList(
            LayerNormLSTMCell(input_size if layer == 0 else hidden_size, hidden_size, bias=bias, eps=eps,
                              per_gate=per_gate, gain_init=gain_init, device=device, dtype=dtype)
            for layer in range(num_layers))

    def reset_parameters(self) -> None:
        for cell in self.cells:
            cell.reset_parameters()

    def forward(self, input: torch.Tensor | PackedSequence, hx: State | None = None
                ) -> tuple[torch.Tensor | PackedSequence, State]:
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            batched = True
            check_input(x, (self.input_size,))
        else:
            check_input(input, (self.input_size,))
            if input.dim() not in (2, 3):
                expected = "(batch, seq_len" if self.batch_first else "(seq_len, batch"
                raise ValueError(f"expected input of shape {expected}, {self.input_size}) or "
                                 f"(seq_len, {self.input_size}), got {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
            if not batched:
                x = x.unsqueeze(1)
        steps, batch = x.shape[0], x.shape[1]
        state_shape = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(state_shape)
        else:
            expected = state_shape if batched else (self.num_layers, self.hidden_size)
            h0, c0 = (_check_state(t, name, expected) for t, name in zip(hx, ("h_0", "c_0")))
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        mask = None
        if lengths is not None:
            mask = (torch.arange(steps)[:, None] < lengths[None, :]).to(x.device).unsqueeze(-1)  # (T, B, 1)

        layer_in, h_n, c_n = x, [], []
        for layer, cell in enumerate(self.cells):
            x_part = cell.input_part(layer_in)  # (T, B, 4H): every step at once
            h, c = h0[layer], c0[layer]
            outputs = []
            for t in range(steps):
                h_new, c_new = cell.recurrent_step(x_part[t], h, c)
                if mask is None:
                    h, c = h_new, c_new
                else:  # finished sequences keep their last valid state
                    h, c = torch.where(mask[t], h_new, h), torch.where(mask[t], c_new, c)
                outputs.append(h)
            layer_in = torch.stack(outputs)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if packed:
            sorted_idx = input.sorted_indices
            out = layer_in if sorted_idx is None else layer_in.index_select(1, sorted_idx)
            lens = lengths if sorted_idx is None else lengths[sorted_idx.cpu()]
            repacked = pack_padded_sequence(out, lens, enforce_sorted=True)
            return PackedSequence(repacked.data, repacked.batch_sizes, sorted_idx, input.unsorted_indices), \
                (h_n, c_n)
        if not batched:
            return layer_in.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        output = layer_in.transpose(0, 1) if self.batch_first else layer_in
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        cell = self.cells[0]
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={cell.bias is not None}, batch_first={self.batch_first}, eps={cell.eps}, "
                f"per_gate={self.per_gate}")
