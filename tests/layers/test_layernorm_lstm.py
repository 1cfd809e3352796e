import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from normlab import LayerNormLSTM, LayerNormLSTMCell


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (gains and biases too), so that no term hides behind a 1 or a 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if "gain" in name else 0.0))
    return module


def hand_step(x, h, c, p, hidden, eps, per_gate):
    """One LN-LSTM step written out from the sheet, gate order (i, f, g, o)."""
    def ln4(a, gain):
        if per_gate:
            parts = [F.layer_norm(a[:, k * hidden:(k + 1) * hidden], (hidden,), eps=eps) for k in range(4)]
            return torch.cat(parts, dim=1) * gain
        mu = a.mean(1, keepdim=True)
        var = ((a - mu) ** 2).mean(1, keepdim=True)
        return (a - mu) / torch.sqrt(var + eps) * gain

    gates = ln4(h @ p["weight_hh"].T, p["gain_hh"]) + ln4(x @ p["weight_ih"].T, p["gain_ih"]) + p["bias"]
    i, f, g, o = (gates[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(F.layer_norm(c1, (hidden,), p["gain_c"], p["bias_c"], eps))
    return h1, c1


def make_cell(per_gate=False, dtype=torch.float64, seed=0, input_size=5, hidden=3):
    return randomize(LayerNormLSTMCell(input_size, hidden, per_gate=per_gate, dtype=dtype), seed)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("per_gate", [False, True])
def test_cell_equals_hand_written_step(per_gate):
    cell = make_cell(per_gate)
    x, h, c = rand(4, 5, seed=1), rand(4, 3, seed=2), rand(4, 3, seed=3)
    h1, c1 = cell(x, (h, c))
    ref_h, ref_c = hand_step(x, h, c, dict(cell.named_parameters()), 3, cell.eps, per_gate)
    torch.testing.assert_close(h1, ref_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(c1, ref_c, rtol=0, atol=1e-12)


def test_per_gate_differs_from_whole_vector():
    whole, per_gate = make_cell(False), make_cell(True)
    x, h, c = rand(4, 5, seed=1), rand(4, 3, seed=2), rand(4, 3, seed=3)
    assert not torch.allclose(whole(x, (h, c))[0], per_gate(x, (h, c))[0], atol=1e-3)
    assert "per_gate=True" in repr(per_gate) and "per_gate=False" in repr(whole)


def test_standardised_preactivations_give_torch_lstm_cell_state():
    """Sheet check: at init, with W_ih x already standardised and h_0 = 0, LN is the identity on the
    gates, so c_1 is torch.nn.LSTMCell's c_1 (this also pins the gate order to torch's)."""
    hidden = 4
    cell = LayerNormLSTMCell(4 * hidden, hidden, eps=1e-12, dtype=torch.float64)
    ref = torch.nn.LSTMCell(4 * hidden, hidden, dtype=torch.float64)
    b = rand(4 * hidden, seed=5)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.eye(4 * hidden))
        cell.bias.copy_(b)
        ref.weight_ih.copy_(torch.eye(4 * hidden))
        ref.weight_hh.copy_(cell.weight_hh)
        ref.bias_ih.copy_(b)
        ref.bias_hh.zero_()
    x = rand(3, 4 * hidden, seed=6)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, correction=0, keepdim=True)
    c0 = rand(3, hidden, seed=7)
    h0 = torch.zeros(3, hidden, dtype=torch.float64)
    h1, c1 = cell(x, (h0, c0))
    ref_h, ref_c = ref(x, (h0, c0))
    torch.testing.assert_close(c1, ref_c, rtol=0, atol=1e-10)
    o = torch.sigmoid(x[:, 3 * hidden:] + b[3 * hidden:])
    torch.testing.assert_close(h1, o * torch.tanh(F.layer_norm(c1, (hidden,), eps=1e-12)), rtol=0, atol=1e-10)
    assert not torch.allclose(h1, ref_h)  # the LN on c_t is really there


@pytest.mark.parametrize("per_gate", [False, True])
def test_gradcheck_cell(per_gate):
    cell = make_cell(per_gate, hidden=3, input_size=4)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x, h, c = (rand(2, n, seed=s).requires_grad_() for n, s in ((4, 1), (3, 2), (3, 3)))

    def fn(x, h, c, *ps):
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, (h, c)))

    assert torch.autograd.gradcheck(fn, (x, h, c, *params), fast_mode=True)


def test_sequence_equals_looping_the_cells():
    torch.manual_seed(0)
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2, dtype=torch.float64))
    x = rand(7, 4, 5, seed=1)
    h0, c0 = rand(2, 4, 3, seed=2), rand(2, 4, 3, seed=3)
    out, (h_n, c_n) = lstm(x, (h0, c0))
    layer_in = x
    for layer, cell in enumerate(lstm.cells):
        h, c = h0[layer], c0[layer]
        steps = []
        for t in range(x.shape[0]):
            h, c = cell(layer_in[t], (h, c))
            steps.append(h)
        layer_in = torch.stack(steps)
        torch.testing.assert_close(h_n[layer], h, rtol=0, atol=1e-12)
        torch.testing.assert_close(c_n[layer], c, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, layer_in, rtol=0, atol=1e-12)
    assert out.shape == (7, 4, 3) and h_n.shape == c_n.shape == (2, 4, 3)


def test_batch_first_agrees():
    torch.manual_seed(0)
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2))
    lstm_bf = LayerNormLSTM(5, 3, num_layers=2, batch_first=True)
    lstm_bf.load_state_dict(lstm.state_dict())
    x = rand(6, 4, 5, dtype=torch.float32)
    out, (h, c) = lstm(x)
    out_bf, (h_bf, c_bf) = lstm_bf(x.transpose(0, 1))
    assert out_bf.shape == (4, 6, 3)
    torch.testing.assert_close(out_bf.transpose(0, 1), out)
    torch.testing.assert_close(h_bf, h)
    torch.testing.assert_close(c_bf, c)


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_agrees_with_each_sequence_alone(enforce_sorted):
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2, dtype=torch.float64))
    lengths = torch.tensor([6, 4, 4, 2]) if enforce_sorted else torch.tensor([4, 6, 2, 5])
    x = rand(6, 4, 5, seed=1)
    h0, c0 = rand(2, 4, 3, seed=2), rand(2, 4, 3, seed=3)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    out, (h_n, c_n) = lstm(packed, (h0, c0))
    assert isinstance(out, type(packed))
    torch.testing.assert_close(out.batch_sizes, packed.batch_sizes)
    padded, out_lengths = pad_packed_sequence(out)
    torch.testing.assert_close(out_lengths, lengths)
    for b, n in enumerate(lengths.tolist()):
        ref_out, (ref_h, ref_c) = lstm(x[:n, b:b + 1], (h0[:, b:b + 1], c0[:, b:b + 1]))
        torch.testing.assert_close(padded[:n, b:b + 1], ref_out, rtol=0, atol=1e-12)
        assert torch.all(padded[n:, b] == 0)
        torch.testing.assert_close(h_n[:, b:b + 1], ref_h, rtol=0, atol=1e-12)
        torch.testing.assert_close(c_n[:, b:b + 1], ref_c, rtol=0, atol=1e-12)


def test_unbatched_input_equals_batch_of_one():
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2, dtype=torch.float64))
    x, h0, c0 = rand(6, 5, seed=1), rand(2, 3, seed=2), rand(2, 3, seed=3)
    out, (h, c) = lstm(x, (h0, c0))
    ref_out, (ref_h, ref_c) = lstm(x[:, None], (h0[:, None], c0[:, None]))
    assert out.shape == (6, 3) and h.shape == (2, 3)
    torch.testing.assert_close(out, ref_out[:, 0])
    torch.testing.assert_close(h, ref_h[:, 0])
    torch.testing.assert_close(c, ref_c[:, 0])
    cell = make_cell()
    h1, c1 = cell(x[0], (h0[0], c0[0]))
    ref_h1, ref_c1 = cell(x[:1], (h0[:1], c0[:1]))
    torch.testing.assert_close(h1, ref_h1[0])
    torch.testing.assert_close(c1, ref_c1[0])


def test_default_state_is_zero():
    lstm = randomize(LayerNormLSTM(5, 3))
    x = rand(4, 2, 5, dtype=torch.float32)
    zeros = torch.zeros(1, 2, 3)
    torch.testing.assert_close(lstm(x)[0], lstm(x, (zeros, zeros))[0], rtol=0, atol=0)


def test_batch_independence_and_train_eval():
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2, dtype=torch.float64))
    x = rand(6, 4, 5, seed=1)
    out = lstm(x)[0]
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], out, rtol=0, atol=0)
    lstm.train()
    other = x.clone()
    other[:, 1:] = rand(6, 3, 5, seed=9) * 10
    torch.testing.assert_close(lstm(other)[0][:, 0], out[:, 0], rtol=0, atol=1e-14)
    torch.testing.assert_close(lstm(x[:, :1])[0][:, 0], out[:, 0], rtol=0, atol=1e-14)


def test_state_dict_round_trip():
    lstm = randomize(LayerNormLSTM(5, 3, num_layers=2, per_gate=True))
    copy = LayerNormLSTM(5, 3, num_layers=2, per_gate=True)
    copy.load_state_dict(lstm.state_dict())
    x = rand(4, 2, 5, dtype=torch.float32)
    torch.testing.assert_close(copy(x)[0], lstm(x)[0], rtol=0, atol=0)
    assert {"cells.0.weight_ih", "cells.0.gain_hh", "cells.1.bias_c"} <= set(lstm.state_dict())


def test_reset_parameters_and_bias_flag():
    cell = LayerNormLSTMCell(5, 16, gain_init=0.5)
    bound = 16 ** -0.5
    assert cell.weight_ih.abs().max() <= bound and cell.weight_hh.abs().max() <= bound
    assert cell.weight_hh.abs().max() > bound / 2
    for gain in (cell.gain_ih, cell.gain_hh, cell.gain_c):
        assert torch.all(gain == 0.5)
    assert torch.all(cell.bias == 0) and torch.all(cell.bias_c == 0)
    assert cell.gain_ih.shape == (64,) and cell.gain_c.shape == (16,)
    no_bias = LayerNormLSTM(5, 16, bias=False)
    assert all("bias" not in name for name, _ in no_bias.named_parameters())
    assert no_bias(torch.randn(3, 2, 5))[0].shape == (3, 2, 16)


def test_gradients_reach_every_parameter():
    lstm = LayerNormLSTM(5, 3, num_layers=2)
    lstm(torch.randn(4, 2, 5))[0].square().sum().backward()
    for name, p in lstm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_input_raises():
    lstm = LayerNormLSTM(5, 3, num_layers=2)
    with pytest.raises(ValueError, match=r"trailing shape \(5,\), got \(4, 2, 6\)"):
        lstm(torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match=r"got \(1, 4, 2, 5\)"):
        lstm(torch.randn(1, 4, 2, 5))
    with pytest.raises(ValueError, match=r"h_0 of shape \(2, 2, 3\), got \(1, 2, 3\)"):
        lstm(torch.randn(4, 2, 5), (torch.zeros(1, 2, 3), torch.zeros(2, 2, 3)))
    with pytest.raises(ValueError, match=r"c_0 of shape \(2, 2, 3\), got \(2, 2, 4\)"):
        lstm(torch.randn(4, 2, 5), (torch.zeros(2, 2, 3), torch.zeros(2, 2, 4)))
    cell = LayerNormLSTMCell(5, 3)
    with pytest.raises(ValueError, match=r"trailing shape \(5,\), got \(2, 4\)"):
        cell(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"got \(3, 2, 5\)"):
        cell(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"h_0 of shape \(2, 3\), got \(3, 3\)"):
        cell(torch.randn(2, 5), (torch.zeros(3, 3), torch.zeros(2, 3)))
    with pytest.raises(TypeError, match="floating"):
        cell(torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
    ({"input_size": -1}, "input_size must be a positive int"),
    ({"num_layers": 0}, "num_layers must be an int >= 1, got 0"),
    ({"eps": -1e-5}, "eps must be non-negative"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    args = {"input_size": 5, "hidden_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        LayerNormLSTM(**args)
    if "num_layers" not in kwargs:
        with pytest.raises(ValueError, match=match):
            LayerNormLSTMCell(**args)


def test_float64_stays_float64():
    lstm = LayerNormLSTM(5, 3, dtype=torch.float64)
    out, (h, c) = lstm(torch.randn(4, 2, 5, dtype=torch.float64))
    assert out.dtype == h.dtype == c.dtype == torch.float64


@pytest.mark.parametrize("per_gate", [False, True])
def test_compile_aot_eager(per_gate):
    cell = make_cell(per_gate, dtype=torch.float32)
    x, h, c = (rand(2, n, seed=s, dtype=torch.float32) for n, s in ((5, 1), (3, 2), (3, 3)))
    compiled = torch.compile(cell, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, (h, c)), cell(x, (h, c))):
        torch.testing.assert_close(got, want)
    lstm = randomize(LayerNormLSTM(5, 3, per_gate=per_gate))
    seq = torch.randn(4, 2, 5)
    torch.testing.assert_close(torch.compile(lstm, backend="aot_eager")(seq)[0], lstm(seq)[0])
