"""UnifiedNorm against a straight-line numpy transcription of the sheet's 9 + 7 steps (unified_norm.md),
the batch quadratic-mean norm's autograd when smoothing is off, the eval formula, and 2 gloo ranks."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch

from gloo import run_gloo
from normlab.layers.unified import UnifiedNorm


class Oracle:
    """The sheet's algorithm, one numpy statement per step (float64)."""

    def __init__(self, c, window=(2, 2), warmup=3, filtration=False, eps=1e-5, momentum=0.9, comp_start=4,
                 clamp=(0.2, 5.0)):
        self.mf, self.mb = window
        self.warmup, self.filtration, self.eps, self.mom = warmup, filtration, eps, momentum
        self.comp_start, self.clamp = comp_start, clamp
        self.running_var, self.ema_gz = np.ones(c), np.zeros(c)
        self.buffer_x2, self.buffer_gz = np.zeros((self.mf, c)), np.zeros((self.mb, c))
        self.k = self.skips = 0

    def step(self, x, gy, w, b, pad=None):
        c = x.shape[-1]
        rows, grows = x.reshape(-1, c), gy.reshape(-1, c)
        real = rows if pad is None else rows[~pad.reshape(-1)]
        # forward
        self.k += 1
        k = self.k
        x2 = (real ** 2).mean(0)
        filtering = self.filtration and k >= self.warmup
        s2 = np.var(np.sqrt(self.buffer_x2), ddof=1) if filtering else None
        self.buffer_x2[k % self.mf] = x2
        skip = self.mf == 1
        if filtering:
            am = self.buffer_x2.mean(0)
            with np.errstate(divide="ignore"):  # a window still holding zeros: GM 0, as the code
                gm = np.exp(np.log(self.buffer_x2).mean(0))
            if np.any(am - gm > self.mf * s2):
                self.buffer_x2[k % self.mf] = self.running_var
                skip = True
                self.skips += 1
        if k <= self.mf or k < self.warmup or skip:
            var = x2
        else:
            var = np.exp(np.log(self.buffer_x2).mean(0))
        r = np.sqrt(var + self.eps) / np.sqrt(self.running_var + self.eps)
        r = np.ones(c) if k <= max(self.comp_start, self.warmup) or skip else np.clip(r, *self.clamp)
        z = rows / np.sqrt(var + self.eps)
        y = w * z + b
        self.running_var = self.mom * self.running_var + (1 - self.mom) * var
        # backward
        g = grows * w * r
        gz = (g * z).mean(0)
        self.buffer_gz[k % self.mb] = self.ema_gz if skip else gz
        mean_gz = gz if k <= self.mb or k < self.warmup or skip else self.buffer_gz.mean(0)
        self.ema_gz = self.mom * self.ema_gz + (1 - self.mom) * mean_gz
        ghat = g - mean_gz * z if skip else g - self.ema_gz * z
        dx = ghat / np.sqrt(var + self.eps)
        dw = (grows * r * z).sum(0)
        db = grows.sum(0)
        return {"y": y.reshape(x.shape), "dx": dx.reshape(x.shape), "dw": dw, "db": db, "var": var, "r": r,
                "skip": skip}


def _np(t):
    return t.detach().numpy()


def _close(actual, expected, tol=1e-12):
    np.testing.assert_allclose(_np(actual) if isinstance(actual, torch.Tensor) else actual, expected, rtol=tol,
                               atol=tol)


def _inputs(steps, shape, scaled_step=None, scale=100.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs, gys = [], []
    for k in range(1, steps + 1):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + 0.3 * torch.rand(shape[-1], generator=gen,
                                                                                            dtype=torch.float64))
        xs.append(x * scale if k == scaled_step else x)
        gys.append(torch.randn(shape, generator=gen, dtype=torch.float64))
    return xs, gys


def _randomize(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(layer.weight.shape, generator=gen, dtype=layer.weight.dtype))
        layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=layer.bias.dtype))
    return layer


def _run_against_oracle(layer, oracle, xs, gys, pads=None):
    """Train both; compare every output, gradient and buffer at every step. Returns the oracle records."""
    records = []
    for i, (x, gy) in enumerate(zip(xs, gys)):
        pad = None if pads is None else pads[i]
        w, b = _np(layer.weight).copy(), _np(layer.bias).copy()
        expected = oracle.step(_np(x), _np(gy), w, b, None if pad is None else pad.numpy())
        layer.weight.grad = layer.bias.grad = None
        xg = x.clone().requires_grad_()
        y = layer(xg, pad_mask=pad)
        y.backward(gy)
        _close(y, expected["y"])
        _close(xg.grad, expected["dx"])
        _close(layer.weight.grad, expected["dw"])
        _close(layer.bias.grad, expected["db"])
        _close(layer.last_var, expected["var"])
        _close(layer.running_var, oracle.running_var)
        _close(layer.ema_gz, oracle.ema_gz)
        _close(layer.buffer_x2, oracle.buffer_x2)
        _close(layer.buffer_gz, oracle.buffer_gz)
        assert layer.iters.item() == oracle.k and layer.skip_counter.item() == oracle.skips
        records.append(expected)
    return records


def test_hand_traced_state_machine_smoothing_and_compensation():
    """C=3, window 2, warmup 3, compensation_start 4, momentum 0.9, no filtration, a 100x batch at k=6."""
    layer = _randomize(UnifiedNorm(3, window_size=2, warmup_iters=3, compensation_start=4, dtype=torch.float64))
    oracle = Oracle(3, window=(2, 2), warmup=3, comp_start=4)
    xs, gys = _inputs(8, (2, 5, 3), scaled_step=6)
    records = _run_against_oracle(layer, oracle, xs, gys)
    # the steps the trace is meant to cover really happened: geometric-mean smoothing from k=3 ...
    x2 = [(_np(x) ** 2).reshape(-1, 3).mean(0) for x in xs]
    assert all(np.allclose(rec["var"], x2[i]) for i, rec in enumerate(records[:2]))
    assert all(not np.allclose(rec["var"], x2[i]) for i, rec in enumerate(records[2:], start=2))
    # ... compensation from k=5, and the 100x batch hits the clamp
    assert all(np.all(rec["r"] == 1) for rec in records[:4])
    assert all(np.any(np.abs(rec["r"] - 1) > 1e-3) for rec in records[4:])
    assert np.any(records[5]["r"] == 5.0)


def test_weight_gradient_carries_the_ratio():
    layer = _randomize(UnifiedNorm(3, window_size=2, warmup_iters=3, compensation_start=4, dtype=torch.float64))
    xs, gys = _inputs(6, (2, 5, 3), scaled_step=6, scale=3.0)
    for x, gy in zip(xs[:-1], gys[:-1]):
        layer(x).backward(gy)
    var_before = layer.running_var.clone()
    layer.weight.grad = None
    layer(xs[-1]).backward(gys[-1])
    var = layer.last_var
    z = xs[-1] / torch.sqrt(var + layer.eps)
    r = (torch.sqrt(var + layer.eps) / torch.sqrt(var_before + layer.eps)).clamp(0.2, 5.0)
    assert (r - 1).abs().max() > 0.1
    torch.testing.assert_close(layer.weight.grad, (gys[-1] * r * z).sum((0, 1)), rtol=1e-12, atol=1e-12)
    assert (layer.weight.grad - (gys[-1] * z).sum((0, 1))).abs().max() > 1e-3


def test_outlier_filtration_follows_the_code_and_skips_the_outlier():
    """With 3 channels the code's threshold M * var(sqrt(buffer)) is tiny: the filter fires on most
    iterations from warm-up on (the sheet's calibration saw it fire on all); the 100x batch is skipped and
    divided by its own statistic."""
    layer = _randomize(UnifiedNorm(3, window_size=2, warmup_iters=3, outlier_filtration=True,
                                   compensation_start=4, dtype=torch.float64))
    oracle = Oracle(3, window=(2, 2), warmup=3, filtration=True, comp_start=4)
    xs, gys = _inputs(8, (2, 5, 3), scaled_step=6)
    records, counts = [], []
    for k in range(8):  # one step at a time, to see the counter move on the outlier step
        records += _run_against_oracle(layer, oracle, xs[k:k + 1], gys[k:k + 1])
        counts.append(layer.skip_counter.item())
    assert counts[:2] == [0, 0] and counts[5] == counts[4] + 1  # never before warm-up; the 100x batch skips
    assert counts[-1] >= 4  # of the 6 iterations from warm-up on: not rare with C=3
    x2 = (_np(xs[5]) ** 2).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(records[5]["var"], x2, rtol=1e-12)


def test_filtration_with_many_channels_skips_only_the_outlier():
    layer = _randomize(UnifiedNorm(64, window_size=4, warmup_iters=5, outlier_filtration=True,
                                   compensation_start=6, dtype=torch.float64))
    oracle = Oracle(64, window=(4, 4), warmup=5, filtration=True, comp_start=6)
    gen = torch.Generator().manual_seed(3)
    spread = torch.exp(torch.randn(64, generator=gen, dtype=torch.float64))  # channels of different scales
    xs = [torch.randn(4, 32, 64, generator=gen, dtype=torch.float64) * spread for _ in range(12)]
    xs[8] = xs[8] * 30
    gys = [torch.randn(4, 32, 64, generator=gen, dtype=torch.float64) for _ in range(12)]
    records = _run_against_oracle(layer, oracle, xs, gys)
    skipped = [k for k, rec in enumerate(records, start=1) if rec["skip"]]
    assert 9 in skipped and len(skipped) < 8  # the 30x batch (k=9) is skipped, smoothing runs on most steps
    assert sum(not rec["skip"] and k > 5 for k, rec in enumerate(records, start=1)) >= 2


def test_window_pair_and_padding_against_the_oracle():
    layer = _randomize(UnifiedNorm(5, window_size=(3, 2), warmup_iters=2, outlier_filtration=True,
                                   compensation_start=3, dtype=torch.float64))
    oracle = Oracle(5, window=(3, 2), warmup=2, filtration=True, comp_start=3)
    xs, gys = _inputs(7, (3, 6, 5), scaled_step=5, scale=10.0, seed=4)
    gen = torch.Generator().manual_seed(5)
    pads = [torch.rand(3, 6, generator=gen) < 0.3 for _ in xs]
    _run_against_oracle(layer, oracle, xs, gys, pads)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_window_one_is_the_batch_quadratic_mean_norm_with_its_exact_gradient(eps):
    """``window_size=1`` skips every iteration: forward and backward are those of
    ``x / sqrt(mean_tokens(x^2) + eps) * w + b`` at every iteration, warm-up or not."""
    layer = _randomize(UnifiedNorm(4, window_size=1, warmup_iters=2, compensation_start=2, eps=eps,
                                   dtype=torch.float64))
    ref_w = layer.weight.detach().clone().requires_grad_()
    ref_b = layer.bias.detach().clone().requires_grad_()
    xs, gys = _inputs(5, (3, 7, 4), scaled_step=4, scale=20.0)
    for x, gy in zip(xs, gys):
        layer.weight.grad = layer.bias.grad = None
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(xa)
        y.backward(gy)
        ref = xb / torch.sqrt(xb.pow(2).mean((0, 1)) + eps) * ref_w + ref_b
        dx, dw, db = torch.autograd.grad(ref, (xb, ref_w, ref_b), gy)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, dw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-12, atol=1e-12)
    assert layer.skip_counter.item() == 0  # window 1 skips smoothing without counting filter skips


def test_gradcheck_window_one():
    layer = _randomize(UnifiedNorm(4, window_size=1, dtype=torch.float64))
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


def test_eval_is_the_running_affine_and_batch_independent():
    layer = _randomize(UnifiedNorm(8))
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
    layer.eval()
    x = torch.randn(4, 6, 8) * 3
    expected = layer.weight * x / torch.sqrt(layer.running_var + layer.eps) + layer.bias
    with torch.no_grad():
        y_nograd = layer(x)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    torch.testing.assert_close(y_nograd, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    gy = torch.randn_like(y)
    y.backward(gy)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(xg.grad, gy * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, (gy * x / torch.sqrt(layer.running_var + layer.eps)).sum((0, 1)),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, gy.sum((0, 1)), rtol=1e-5, atol=1e-4)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 6, 8) * 100
    torch.testing.assert_close(layer(x2)[0], y_nograd[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x[0]), y_nograd[0], rtol=0, atol=1e-6)  # (N, C) input
    scale2, shift = layer.inference_affine()
    torch.testing.assert_close(scale2, scale.detach(), rtol=0, atol=1e-7)
    assert torch.equal(shift, layer.bias.detach()) and not scale2.requires_grad
    before = copy.deepcopy(layer.state_dict())
    layer(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())  # eval leaves state alone


def test_padding_does_not_change_the_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = pad[2, :2] = True
    x_junk = x.masked_fill(pad[..., None], 1e6)
    padded = UnifiedNorm(5, warmup_iters=0, dtype=torch.float64)
    plain = UnifiedNorm(5, warmup_iters=0, dtype=torch.float64)
    y = padded(x_junk, pad_mask=pad)
    y_real = plain(x[~pad][None])  # only the real tokens, as one sequence
    torch.testing.assert_close(y[~pad], y_real[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded.running_var, plain.running_var, rtol=1e-12, atol=0)
    torch.testing.assert_close(padded.last_var, x[~pad].pow(2).mean(0), rtol=1e-12, atol=0)


def test_two_dim_input_and_batch_size_one():
    x = torch.randn(16, 4, dtype=torch.float64)
    a, b = UnifiedNorm(4, dtype=torch.float64), UnifiedNorm(4, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(a(x, pad_mask=torch.zeros(16, dtype=torch.bool)), b(x[None])[0], rtol=0, atol=0)
    assert torch.equal(a.running_var, b.running_var)


def test_no_real_tokens_raises_and_few_tokens_warn():
    layer = UnifiedNorm(4)
    with pytest.raises(ValueError, match="no non-padded tokens"):
        layer(torch.randn(2, 3, 4), pad_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.warns(UserWarning, match="noisy"):
        layer(torch.randn(1, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(1, 8, 4))
        layer.eval()(torch.randn(1, 1, 4))


def test_all_zero_channel_stays_finite_after_smoothing_starts():
    layer = UnifiedNorm(3, window_size=2, warmup_iters=0, outlier_filtration=True)
    for _ in range(5):
        x = torch.randn(2, 8, 3)
        x[..., 1] = 0  # a dead channel: its geometric mean is exactly 0 (log 0 = -inf), never NaN
        x.requires_grad_()
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all() and torch.isfinite(layer.ema_gz).all()


def test_state_dict_round_trip_resumes_bit_exactly():
    kw = {"window_size": 3, "warmup_iters": 2, "compensation_start": 3, "outlier_filtration": True}
    a = _randomize(UnifiedNorm(6, **kw))
    xs, gys = _inputs(10, (2, 8, 6), scaled_step=7, scale=10.0)
    xs, gys = [x.float() for x in xs], [g.float() for g in gys]
    for x, gy in zip(xs[:4], gys[:4]):
        a(x).backward(gy)
    assert set(a.state_dict()) == {"weight", "bias", "running_var", "ema_gz", "iters", "buffer_x2", "buffer_gz",
                                   "skip_counter"}
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = UnifiedNorm(6, **kw)
    b.load_state_dict(torch.load(blob))
    for x, gy in zip(xs[4:], gys[4:]):
        a.weight.grad = b.weight.grad = None
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(gy), yb.backward(gy)
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(a.weight.grad, b.weight.grad)
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name
    assert a.iters.item() == 10 and a.skip_counter.item() > 0


def test_reset_and_repr():
    layer = _randomize(UnifiedNorm(4, window_size=(3, 2)))
    layer(torch.randn(2, 8, 4)).sum().backward()
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert layer.iters.item() == 0 and torch.equal(layer.running_var, torch.ones(4))
    assert layer.buffer_x2.shape == (3, 4) and layer.buffer_gz.shape == (2, 4) and not layer.buffer_x2.any()
    text = repr(layer)
    assert "window_size=(3, 2)" in text and "warmup_iters=4000" in text and "compensation_start=1000" in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_float32_statistics(dtype):
    layer = _randomize(UnifiedNorm(32, window_size=2, warmup_iters=1, compensation_start=1))
    twin = copy.deepcopy(layer)
    for step in range(4):
        x = (torch.randn(4, 8, 32) * 3).to(dtype).requires_grad_()
        y = layer(x)
        assert y.dtype == dtype
        ref = twin(x.detach().float())
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
        y.float().sum().backward()
        assert x.grad.dtype == dtype and layer.weight.grad.dtype == torch.float32
    assert layer.running_var.dtype == layer.buffer_x2.dtype == layer.ema_gz.dtype == torch.float32
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-6, atol=0)  # stats from the same values


def test_float64_stays_float64():
    layer = UnifiedNorm(4, dtype=torch.float64)
    assert layer(torch.randn(2, 8, 4, dtype=torch.float64)).dtype == torch.float64
    assert layer.running_var.dtype == torch.float64


def test_bad_input_and_hyperparameters():
    layer = UnifiedNorm(8)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, N, 8\) or \(N, 8\), got \(2, 3, 7\)"):
        layer(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"got \(2, 3, 4, 8\)"):
        layer(torch.randn(2, 3, 4, 8))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected pad_mask of shape \(2, 3\)"):
        layer(torch.randn(2, 3, 8), pad_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="pad_mask must be a bool"):
        layer(torch.randn(2, 3, 8), pad_mask=torch.zeros(2, 3))
    bad = [({"num_features": 0}, "num_features"), ({"window_size": 0}, "window_size"),
           ({"window_size": (2, 0)}, "window_size"), ({"window_size": (1, 2, 3)}, "window_size"),
           ({"warmup_iters": -1}, "warmup_iters"), ({"compensation_start": 1.5}, "compensation_start"),
           ({"eps": -1e-5}, "eps must be non-negative"), ({"momentum": 1.5}, "momentum"),
           ({"ratio_clamp": (5.0, 0.2)}, "ratio_clamp"), ({"ratio_clamp": (0.0, 5.0)}, "ratio_clamp")]
    for kw, match in bad:
        args = {"num_features": 8, **kw}
        with pytest.raises(ValueError, match=match):
            UnifiedNorm(**args)
    with pytest.raises(TypeError, match="outlier_filtration"):
        UnifiedNorm(8, outlier_filtration="yes")


def test_repeated_backward_of_one_forward_advances_the_state_once():
    layer = _randomize(UnifiedNorm(4, window_size=2, warmup_iters=1, compensation_start=1))
    twin = copy.deepcopy(layer)
    xs, gys = _inputs(4, (2, 8, 4), seed=2)
    for x, gy in zip(xs[:3], gys[:3]):
        layer(x.float()).backward(gy.float())
        twin(x.float()).backward(gy.float())
    x = xs[3].float().requires_grad_()
    y = layer(x)
    first = torch.autograd.grad(y, x, gys[3].float(), retain_graph=True)[0]
    state = copy.deepcopy(layer.state_dict())
    again = torch.autograd.grad(y, x, gys[3].float(), retain_graph=True)[0]
    other = torch.autograd.grad(y, x, -2 * gys[3].float())[0]
    assert torch.equal(first, again)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    xt = xs[3].float().requires_grad_()
    twin(xt).backward(-2 * gys[3].float())  # what a single backward with -2 dy computes from the same state
    torch.testing.assert_close(other, xt.grad, rtol=0, atol=0)


def test_torch_compile_aot_eager_same_outputs():
    kw = {"window_size": 2, "warmup_iters": 2, "compensation_start": 3, "outlier_filtration": True}
    eager = _randomize(UnifiedNorm(8, **kw))
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    xs, gys = _inputs(6, (2, 8, 8), scaled_step=5, scale=5.0)
    for x, gy in zip(xs, gys):
        x, gy = x.float(), gy.float()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        ya.backward(gy), yb.backward(gy)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    for name, buf in eager.state_dict().items():
        assert torch.equal(buf, twin.state_dict()[name]), name
    eager.eval(), twin.eval()
    x = torch.randn(3, 5, 8, requires_grad=True)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 2 gloo ranks with half a batch each == 1 process with the whole batch

DIST_KW = {"window_size": 2, "warmup_iters": 3, "compensation_start": 4, "outlier_filtration": False}
DIST_STEPS, DIST_SHAPE = 7, (4, 6, 5)


def _dist_data():
    xs, gys = _inputs(DIST_STEPS, DIST_SHAPE, scaled_step=5, scale=4.0, seed=11)
    gen = torch.Generator().manual_seed(12)
    pads = [torch.rand(DIST_SHAPE[:2], generator=gen) < 0.25 for _ in xs]
    pads[0][:] = False
    return xs, gys, pads


def _train(layer, xs, gys, pads):
    out = []
    for x, gy, pad in zip(xs, gys, pads):
        layer.weight.grad = layer.bias.grad = None
        x = x.clone().requires_grad_()
        y = layer(x, pad_mask=pad)
        y.backward(gy)
        out.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(), "db": layer.bias.grad.clone(),
                    "var": layer.last_var.clone()})
    return out, {k: v.clone() for k, v in layer.state_dict().items()}


def _rank_train(rank, world):
    xs, gys, pads = _dist_data()
    half = DIST_SHAPE[0] // world
    part = slice(rank * half, (rank + 1) * half)
    layer = _randomize(UnifiedNorm(DIST_SHAPE[-1], **DIST_KW, dtype=torch.float64))
    return _train(layer, [x[part] for x in xs], [g[part] for g in gys], [p[part] for p in pads])


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch():
    xs, gys, pads = _dist_data()
    single, single_state = _train(_randomize(UnifiedNorm(DIST_SHAPE[-1], **DIST_KW, dtype=torch.float64)), xs, gys,
                                  pads)
    ranks = run_gloo(_rank_train, 2)
    for k, ref in enumerate(single):
        torch.testing.assert_close(torch.cat([r[0][k]["y"] for r in ranks]), ref["y"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([r[0][k]["dx"] for r in ranks]), ref["dx"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sum(r[0][k]["dw"] for r in ranks), ref["dw"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sum(r[0][k]["db"] for r in ranks), ref["db"], rtol=1e-12, atol=1e-12)
        for r in ranks:
            torch.testing.assert_close(r[0][k]["var"], ref["var"], rtol=1e-12, atol=0)
    for r in ranks:
        for name, buf in single_state.items():
            torch.testing.assert_close(r[1][name], buf, rtol=1e-12, atol=1e-12, msg=name)
    # the check spans the warm-up boundary with smoothing active: the statistic is no longer the batch's
    x2 = xs[-1].masked_fill(pads[-1][..., None], 0).pow(2).sum((0, 1)) / (~pads[-1]).sum()
    assert (single[-1]["var"] - x2).abs().max() > 1e-3
