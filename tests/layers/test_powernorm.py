"""PowerNorm against the official MaskPowerNorm's steps transcribed here in numpy (powernorm.md)."""

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from gloo import run_gloo
from normlab.convert.fuse import fold_affine_
from normlab.layers.powernorm import PowerNorm

EPS, GEPS = 1e-5, 1e-5


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen, dtype=module.weight.dtype))
        module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen, dtype=module.bias.dtype))
    return module


def group_scale_np(x, groups):
    """``GroupScaling1D``: each token's group of C/G channels divided by its quadratic mean."""
    if groups is None:
        return x, None
    shape = x.shape
    xg = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    r = 1.0 / np.sqrt((xg * xg).mean(-1, keepdims=True) + GEPS)
    return (xg * r).reshape(shape), (xg, r)


def group_scale_backward_np(du, saved, groups):
    """Hand-derived: u = x r, r = (mean(x^2) + e)^(-1/2)  =>  dx = r du - r^3 x mean(du x) per group."""
    if groups is None:
        return du
    xg, r = saved
    dug = du.reshape(xg.shape)
    return (r * dug - xg * r ** 3 * (dug * xg).mean(-1, keepdims=True)).reshape(du.shape)


def reference_trace(xs, gys, pads, weight, bias, *, warmup, groups, alpha_fwd, alpha_bkw, backward_scale="batch"):
    """``MaskPowerNorm`` + ``PowerFunction`` step by step on (T, B, C) arrays; pads (B, T), True = pad."""
    c = xs[0].shape[-1]
    phi, ema = np.ones(c), np.zeros(c)
    steps = []
    for k, (x, gy, pad) in enumerate(zip(xs, gys, pads), start=1):
        u, saved = group_scale_np(x, groups)
        keep = ~pad.T  # (T, B)
        x2 = (u[keep] ** 2).mean(0)
        stat = x2 if k <= warmup else phi
        z = u / np.sqrt(stat + EPS)
        if k < warmup:
            phi = phi * (k - 1) / k + x2 / k
        phi = alpha_fwd * phi + (1 - alpha_fwd) * x2
        y = weight * z + bias
        g = gy * weight
        gh = g - (1 - alpha_bkw) * ema * z
        ema = ema + (gh * z).reshape(-1, c).mean(0)
        du = gh / np.sqrt((x2 if backward_scale == "batch" else stat) + EPS)
        dx = group_scale_backward_np(du, saved, groups)
        steps.append({"y": y, "dx": dx, "dw": (gy * z).sum((0, 1)), "db": gy.sum((0, 1)), "phi": phi.copy(),
                      "ema": ema.copy()})
    return steps


def trace_data(steps=6, t=5, b=3, c=8, seed=0):
    """(T, B, C) inputs whose scale changes per step (so batch and running statistics differ), cotangents,
    and a pad mask (B, T) with two padded sequences whose pads hold large garbage."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 4:] = True
    xs, gys = [], []
    for i in range(steps):
        x = (0.5 + 0.4 * i) * torch.randn(t, b, c, generator=gen, dtype=torch.float64) + 0.3
        x[pad.T] = 50.0 * torch.randn(int(pad.sum()), c, generator=gen, dtype=torch.float64)
        xs.append(x)
        gys.append(torch.randn(t, b, c, generator=gen, dtype=torch.float64))
    return xs, gys, pad


def run_module(pn, xs, gys, pad, batch_first=False):
    out = []
    for x, gy in zip(xs, gys):
        if batch_first:
            x, gy = x.transpose(0, 1), gy.transpose(0, 1)
        x = x.detach().clone().requires_grad_()
        pn.zero_grad(set_to_none=True)
        y = pn(x, pad)
        y.backward(gy)
        dx = x.grad
        if batch_first:
            y, dx = y.transpose(0, 1), dx.transpose(0, 1)
        out.append({"y": y.detach(), "dx": dx, "dw": pn.weight.grad.clone(), "db": pn.bias.grad.clone(),
                    "phi": pn.running_phi.clone(), "ema": pn.ema_gz.clone(), "iters": int(pn.iters)})
    return out


@pytest.mark.parametrize("backward_scale", ["batch", "running"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_trace_across_warmup_matches_official_steps(backward_scale, batch_first):
    """The sheet's calibrated trace: fp64, C=8, G=2, warm-up 3, 6 iterations, a padded sequence."""
    xs, gys, pad = trace_data()
    kw = {"warmup_iters": 3, "group_num": 2, "alpha_fwd": 0.85, "alpha_bkw": 0.7}  # distinct alphas
    pn = randomize(PowerNorm(8, backward_scale=backward_scale, batch_first=batch_first, dtype=torch.float64, **kw))
    ref = reference_trace([x.numpy() for x in xs], [g.numpy() for g in gys], [pad.numpy()] * len(xs),
                          pn.weight.detach().numpy().copy(), pn.bias.detach().numpy().copy(), warmup=3, groups=2,
                          alpha_fwd=0.85, alpha_bkw=0.7, backward_scale=backward_scale)
    got = run_module(pn, xs, gys, pad, batch_first)
    for step, (r, g) in enumerate(zip(ref, got), start=1):
        assert g["iters"] == step
        for key in ("y", "dx", "dw", "db", "phi", "ema"):
            np.testing.assert_allclose(g[key].numpy(), r[key], atol=1e-12, rtol=0, err_msg=f"step {step}: {key}")
    # The trace is not trivial: the running value moved away from the batch statistic, the scales differ.
    assert np.abs(ref[-1]["phi"] - 1).max() > 0.1 and np.abs(ref[-1]["ema"]).max() > 1e-3


def test_backward_scale_running_differs_after_warmup_only():
    xs, gys, pad = trace_data()
    outs = {}
    for mode in ("batch", "running"):
        pn = randomize(PowerNorm(8, warmup_iters=3, group_num=2, backward_scale=mode, batch_first=False,
                                 dtype=torch.float64))
        outs[mode] = run_module(pn, xs, gys, pad)
    for step in range(6):
        same = torch.equal(outs["batch"][step]["dx"], outs["running"][step]["dx"])
        assert same == (step < 3), step


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_scaling_formula_and_rmsnorm(groups):
    """With eps=0 and running_phi=1 the eval output is the group scaling alone."""
    pn = PowerNorm(16, eps=0.0, group_num=groups).eval()
    x = 3 * torch.randn(4, 5, 16) + 1
    xg = x.view(4, 5, groups, 16 // groups)
    expected = (xg / torch.sqrt(xg.pow(2).mean(-1, keepdim=True) + GEPS)).view(4, 5, 16)
    torch.testing.assert_close(pn(x), expected, atol=1e-6, rtol=0)
    if groups == 1:
        rms = nn.RMSNorm(16, eps=GEPS, elementwise_affine=False)
        torch.testing.assert_close(pn(x), rms(x), atol=1e-6, rtol=0)


def test_warmup_forward_is_the_batch_quadratic_mean():
    pn = randomize(PowerNorm(6, warmup_iters=5, group_num=None, dtype=torch.float64))
    x = 2 * torch.randn(4, 7, 6, dtype=torch.float64) - 0.5
    x2 = x.pow(2).mean((0, 1))
    expected = pn.weight * x / torch.sqrt(x2 + EPS) + pn.bias
    torch.testing.assert_close(pn(x), expected, atol=1e-12, rtol=0)


def test_after_warmup_forward_uses_previous_running_value_and_is_per_sample():
    pn = randomize(PowerNorm(6, warmup_iters=2, group_num=None, dtype=torch.float64))
    for _ in range(3):
        pn(torch.randn(4, 7, 6, dtype=torch.float64))
    phi_prev = pn.running_phi.clone()
    x = 3 * torch.randn(4, 7, 6, dtype=torch.float64)
    y = pn(x)
    torch.testing.assert_close(y, pn.weight * x / torch.sqrt(phi_prev + EPS) + pn.bias, atol=1e-12, rtol=0)
    assert not torch.equal(pn.running_phi, phi_prev)  # still updated after warm-up
    pn.load_state_dict({**pn.state_dict(), "running_phi": phi_prev, "iters": torch.tensor(3)})
    other = x.clone()
    other[1:] = 100 * torch.randn(3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(pn(other)[0], y[0], atol=1e-12, rtol=0)


def test_first_iteration_gradient_and_running_residual():
    """ema_gz = 0 at the first step: dx = g / sqrt(x2 + eps); later dx*sqrt(x2+eps) - g = -(1-a_b) ema_prev z."""
    pn = randomize(PowerNorm(5, warmup_iters=2, group_num=None, alpha_bkw=0.8, dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        x = ((1 + step) * torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
        gy = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
        ema_prev, phi_prev = pn.ema_gz.clone(), pn.running_phi.clone()
        y = pn(x)
        y.backward(gy)
        x2 = x.detach().pow(2).mean((0, 1))
        z = x.detach() / torch.sqrt((x2 if step < 2 else phi_prev) + EPS)
        g = gy * pn.weight.detach()
        residual = x.grad * torch.sqrt(x2 + EPS) - g
        torch.testing.assert_close(residual, -(1 - 0.8) * ema_prev * z, atol=1e-12, rtol=0)
        if step == 0:
            assert torch.equal(ema_prev, torch.zeros(5))
            torch.testing.assert_close(x.grad, g / torch.sqrt(x2 + EPS), atol=1e-12, rtol=0)
        torch.testing.assert_close(pn.ema_gz, ema_prev + ((g - 0.2 * ema_prev * z) * z).mean((0, 1)), atol=1e-12,
                                   rtol=0)


def _fixed_state_fn(pn, state):
    """The layer as a pure function of (x, weight, bias): every call starts from the same buffers."""
    def fn(x, weight, bias):
        buffers = {k: v.clone() for k, v in state.items()}
        return functional_call(pn, {"weight": weight, "bias": bias, **buffers}, (x,))
    return fn


def _state_after(steps, groups=None, alpha_bkw=1.0, backward_scale="running", warmup_iters=2):
    """A layer and its buffers after ``steps`` train steps with backward (so ema_gz != 0)."""
    pn = randomize(PowerNorm(6, warmup_iters=warmup_iters, group_num=groups, alpha_bkw=alpha_bkw,
                             backward_scale=backward_scale, dtype=torch.float64))
    for _ in range(steps):
        pn(torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)).sum().backward()
    return pn, {k: v.clone() for k, v in pn.named_buffers()}


def _gradcheck(pn, state, raise_exception=True):
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = pn.weight.detach().clone().requires_grad_()
    b = pn.bias.detach().clone().requires_grad_()
    return torch.autograd.gradcheck(_fixed_state_fn(pn, state), (x, w, b), raise_exception=raise_exception)


@pytest.mark.parametrize("groups", [None, 1, 2])
def test_gradcheck_where_the_approximate_backward_is_exact(groups):
    """After warm-up with backward_scale="running" the forward divides by a constant (running_phi), so with
    alpha_bkw = 1 (no running-gradient correction) the approximate backward is the true gradient, group
    scaling included. (The correction itself cannot be gradchecked: it does not scale with the incoming
    gradient and each backward changes ema_gz; the trace and residual tests above check it.)"""
    pn, state = _state_after(3, groups)
    assert state["ema_gz"].abs().max() > 1e-3 and int(state["iters"]) > pn.warmup_iters
    assert _gradcheck(pn, state)


@pytest.mark.parametrize("case", ["warmup", "batch_scale", "ema_correction"])
def test_gradcheck_detects_the_approximation(case):
    """Negative controls: during warm-up (the backward ignores the batch statistic's dependence on x),
    after warm-up with the code's backward_scale="batch" (the forward used running_phi), and with the
    running-gradient correction (alpha_bkw < 1, ema_gz != 0) the gradient is not the forward's derivative."""
    if case == "warmup":
        pn, state = _state_after(0, warmup_iters=100)
    elif case == "batch_scale":
        pn, state = _state_after(3, backward_scale="batch")
    else:
        pn, state = _state_after(3, alpha_bkw=0.9)
    assert not _gradcheck(pn, state, raise_exception=False)


@pytest.mark.parametrize("groups", [None, 1, 2])
def test_eval_is_the_closed_form_and_gradchecks(groups):
    pn = randomize(PowerNorm(6, warmup_iters=1, group_num=groups, dtype=torch.float64))
    for _ in range(3):
        pn(torch.randn(4, 5, 6, dtype=torch.float64) * 2)
    pn.eval()
    before = {k: v.clone() for k, v in pn.named_buffers()}
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    u = x if groups is None else group_scale_np(x.detach().numpy(), groups)[0]
    expected = pn.weight.detach() * torch.as_tensor(u) / torch.sqrt(pn.running_phi + EPS) + pn.bias.detach()
    torch.testing.assert_close(pn(x), expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, w, b: functional_call(pn, {"weight": w, "bias": b}, (x,)),
                                    (x, pn.weight.detach().clone().requires_grad_(),
                                     pn.bias.detach().clone().requires_grad_()))
    for k, v in pn.named_buffers():
        assert torch.equal(v, before[k]), k


def test_train_after_warmup_equals_eval_before_the_step():
    pn = randomize(PowerNorm(8, warmup_iters=2, group_num=2))
    for _ in range(2):
        pn(torch.randn(4, 4, 8) * 2)
    x = torch.randn(3, 5, 8)
    y_eval = pn.eval()(x)
    y_train = pn.train()(x)
    torch.testing.assert_close(y_train, y_eval, atol=1e-6, rtol=1e-6)
    assert not torch.equal(pn(x), pn.eval()(x))  # the train step moved running_phi


def test_iters_advance_per_training_forward_and_no_grad_still_updates():
    pn = PowerNorm(4, warmup_iters=10)
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        y = pn(x)
    assert int(pn.iters) == 1 and not torch.equal(pn.running_phi, torch.ones(4))
    twin = PowerNorm(4, warmup_iters=10)
    assert torch.equal(twin(x).detach(), y)
    pn(x), pn(x)
    assert int(pn.iters) == 3
    pn.eval()(x)
    assert int(pn.iters) == 3


@pytest.mark.parametrize("groups", [None, 2])
def test_padding_is_ignored_by_statistics_but_output_is_computed(groups):
    gen = torch.Generator().manual_seed(1)
    pn = randomize(PowerNorm(8, warmup_iters=5, group_num=groups))
    ref = randomize(PowerNorm(8, warmup_iters=5, group_num=groups))
    x = torch.randn(3, 6, 8, generator=gen)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    x[pad] = 1e3 * torch.randn(int(pad.sum()), 8, generator=gen)
    y = pn(x, pad)
    y_real = ref(x[~pad][None])  # only the real tokens, as one sequence
    torch.testing.assert_close(pn.running_phi, ref.running_phi, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y[~pad], y_real[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(y).all() and (y[pad].abs() > 0).all()
    if groups is None:
        unmasked = randomize(PowerNorm(8, warmup_iters=5, group_num=groups))
        unmasked(x)
        assert (unmasked.running_phi / pn.running_phi).min() > 100  # the pads would have dominated


def test_pad_mask_errors_and_all_padded():
    pn = PowerNorm(4)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="no non-padded tokens"):
        pn(x, torch.ones(2, 3, dtype=torch.bool))
    assert int(pn.iters) == 0 and torch.equal(pn.running_phi, torch.ones(4))
    with pytest.raises(ValueError, match=r"expected pad_mask of shape \(2, 3\).*got \(3, 2\)"):
        pn(x, torch.zeros(3, 2, dtype=torch.bool))
    tb = PowerNorm(4, batch_first=False)
    with pytest.raises(ValueError, match=r"expected pad_mask of shape \(3, 2\).*got \(2, 3\)"):
        tb(x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected pad_mask of shape \(2, 1\)"):
        pn(torch.randn(2, 4), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="pad_mask must be a bool tensor"):
        pn(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no non-padded tokens"):
        pn(torch.randn(0, 3, 4))
    pn.eval()(x, torch.zeros(2, 3, dtype=torch.bool))  # eval accepts a mask of the right shape


def test_state_dict_round_trip_resumes_bit_exactly():
    xs, gys, pad = trace_data(steps=6, seed=4)
    xs, gys = [x.float() for x in xs], [g.float() for g in gys]
    kw = {"warmup_iters": 4, "group_num": 2}
    pn = randomize(PowerNorm(8, batch_first=False, **kw))
    run_module(pn, xs[:3], gys[:3], pad)
    buf = io.BytesIO()
    torch.save(pn.state_dict(), buf)
    fresh = PowerNorm(8, batch_first=False, **kw)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert set(fresh.state_dict()) == {"weight", "bias", "running_phi", "ema_gz", "iters"}
    for a, b in zip(run_module(pn, xs[3:], gys[3:], pad), run_module(fresh, xs[3:], gys[3:], pad)):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_reset_and_repr():
    pn = randomize(PowerNorm(4, warmup_iters=1))
    pn(torch.randn(3, 4, 4)).sum().backward()
    pn.reset_running_stats()
    assert torch.equal(pn.running_phi, torch.ones(4)) and torch.equal(pn.ema_gz, torch.zeros(4))
    assert int(pn.iters) == 0 and pn.iters.dtype == torch.long and pn.iters.shape == ()
    assert not torch.equal(pn.weight, torch.ones(4))
    pn.reset_parameters()
    assert torch.equal(pn.weight, torch.ones(4)) and torch.equal(pn.bias, torch.zeros(4))
    text = repr(pn)
    for part in ("4, eps=1e-05", "alpha_fwd=0.9", "alpha_bkw=0.9", "warmup_iters=1", "group_num=1",
                 "group_eps=1e-05", "backward_scale='batch'", "batch_first=True"):
        assert part in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_float32_statistics_same_bits_as_float32(dtype):
    """Statistics are taken in float32 from the half values: the float32 run on the same values gives the
    same buffers, and its output/gradient rounded to the half dtype are the half run's."""
    kw = {"warmup_iters": 1, "group_num": 2}
    half, full = randomize(PowerNorm(8, **kw)), randomize(PowerNorm(8, **kw))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = (3 * torch.randn(4, 5, 8, generator=gen)).to(dtype)
        gy = torch.randn(4, 5, 8, generator=gen).to(dtype)
        xh, xf = x.clone().requires_grad_(), x.float().requires_grad_()
        yh, yf = half(xh), full(xf)
        assert yh.dtype == dtype and half.running_phi.dtype == torch.float32
        assert torch.equal(yh, yf.to(dtype))
        yh.backward(gy)
        yf.backward(gy.float())
        assert xh.grad.dtype == dtype and torch.equal(xh.grad, xf.grad.to(dtype))
        assert torch.equal(half.running_phi, full.running_phi) and torch.equal(half.ema_gz, full.ema_gz)
        assert torch.equal(half.weight.grad, full.weight.grad)
    assert half.eval()(x).dtype == dtype


def test_float64_stays_float64():
    pn = PowerNorm(4, dtype=torch.float64)
    assert pn(torch.randn(2, 4, 4, dtype=torch.float64)).dtype == torch.float64
    assert pn.eval()(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_batch_size_one_and_two_dimensional_input():
    pn = randomize(PowerNorm(6, warmup_iters=3, group_num=None, dtype=torch.float64))
    x = torch.randn(1, 10, 6, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = pn(x)
    x2 = x.detach().pow(2).mean((0, 1))
    torch.testing.assert_close(y, pn.weight * x / torch.sqrt(x2 + EPS) + pn.bias, atol=1e-12, rtol=0)
    y.sum().backward()
    assert x.grad.shape == x.shape
    two_d = randomize(PowerNorm(6, warmup_iters=3, group_num=None, dtype=torch.float64))
    flat = x.detach()[0]  # (B=10, C): ten one-token samples, the same statistics
    torch.testing.assert_close(two_d(flat), y.detach()[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(two_d.running_phi, pn.running_phi, atol=1e-12, rtol=0)
    with pytest.warns(UserWarning, match="fewer than 8 tokens"):
        two_d(torch.randn(1, 6, dtype=torch.float64))


def test_bad_input_and_hyperparameters():
    pn = PowerNorm(8)
    with pytest.raises(ValueError, match=r"expected input with trailing shape \(8,\), got \(2, 3, 7\)"):
        pn(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, T, C\) or \(B, C\) with C=8, got "
                                         r"\(2, 2, 3, 8\)"):
        pn(torch.randn(2, 2, 3, 8))
    with pytest.raises(TypeError, match="floating"):
        pn(torch.ones(2, 8, dtype=torch.long))
    bad = [({"num_features": 0}, "num_features must be a positive int"),
           ({"eps": -1.0}, "eps must be non-negative"),
           ({"group_eps": float("nan")}, "eps must be non-negative"),
           ({"alpha_fwd": 1.5}, r"alpha_fwd must be in \[0, 1\], got 1.5"),
           ({"alpha_bkw": -0.1}, r"alpha_bkw must be in \[0, 1\], got -0.1"),
           ({"warmup_iters": -1}, "warmup_iters must be a non-negative int"),
           ({"warmup_iters": 2.5}, "warmup_iters must be a non-negative int"),
           ({"group_num": 0}, "group_num must be a positive int or None"),
           ({"group_num": 3}, "num_features must be divisible by group_num"),
           ({"backward_scale": "paper"}, "backward_scale must be one of"),
           ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            PowerNorm(**{"num_features": 8, **kw})
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        PowerNorm(8, batch_first=1)


def test_inference_affine_folds_into_the_next_linear():
    gen = torch.Generator().manual_seed(5)
    pn = randomize(PowerNorm(16, warmup_iters=2, group_num=None))
    for _ in range(4):
        pn(torch.randn(4, 8, 16, generator=gen) * 2 + 0.5)
    pn.eval()
    linear = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16, generator=gen)
    expected = linear(pn(x))
    scale, shift = pn.inference_affine()
    torch.testing.assert_close(scale, pn.weight / torch.sqrt(pn.running_phi + pn.eps), atol=1e-7, rtol=1e-6)
    assert torch.equal(shift, pn.bias) and not scale.requires_grad
    with torch.no_grad():
        fold_affine_([linear], scale, shift)
    torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="group_num=None"):
        PowerNorm(16).inference_affine()


def test_compiles_aot_eager_same_outputs_grads_and_buffers():
    torch._dynamo.reset()
    xs, gys, pad = trace_data(steps=4, seed=7)
    xs, gys = [x.float() for x in xs], [g.float() for g in gys]
    kw = {"warmup_iters": 2, "group_num": 2, "batch_first": False}
    eager, twin = randomize(PowerNorm(8, **kw)), randomize(PowerNorm(8, **kw))
    compiled = torch.compile(twin, backend="aot_eager")
    for x, gy in zip(xs, gys):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe, pad), compiled(xc, pad)
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
        ye.backward(gy)
        yc.backward(gy)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
        for name in ("running_phi", "ema_gz", "iters"):
            torch.testing.assert_close(getattr(twin, name), getattr(eager, name), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(twin.weight.grad, eager.weight.grad, atol=1e-5, rtol=1e-5)
        eager.zero_grad(), twin.zero_grad()
    assert int(twin.iters) == 4
    eager.eval(), twin.eval()
    torch.testing.assert_close(compiled(xs[0]), eager(xs[0]), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------- distributed

DIST_KW = {"warmup_iters": 2, "group_num": 2, "alpha_bkw": 0.8, "dtype": torch.float64}


def dist_data(steps=4, b=4, t=5, c=8):
    gen = torch.Generator().manual_seed(11)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 1:] = True
    xs = [(1 + 0.5 * i) * torch.randn(b, t, c, generator=gen, dtype=torch.float64) for i in range(steps)]
    gys = [torch.randn(b, t, c, generator=gen, dtype=torch.float64) for _ in range(steps)]
    weights = randomize(PowerNorm(c, **DIST_KW), seed=3).state_dict()
    return xs, gys, pad, weights


def _steps(pn, xs, gys, pad, rows, scale=1.0):
    """Train steps on ``rows`` of the batch with cotangent ``scale * gy``; what each step produced."""
    out = []
    for x, gy in zip(xs, gys):
        xr = x[rows].clone().requires_grad_()
        pn.zero_grad(set_to_none=True)
        y = pn(xr, pad[rows])
        y.backward(scale * gy[rows])
        out.append({"y": y.detach(), "dx": xr.grad, "dw": pn.weight.grad.clone(), "db": pn.bias.grad.clone(),
                    "phi": pn.running_phi.clone(), "ema": pn.ema_gz.clone(), "iters": pn.iters.clone()})
    return out


def _two_rank_steps(rank, world, xs, gys, pad, weights):
    rows = slice(rank * 2, rank * 2 + 2)
    pn = PowerNorm(8, **DIST_KW)
    pn.load_state_dict(weights)
    plain = _steps(pn, xs, gys, pad, rows)
    # DDP: each rank differentiates the mean over its own positions; DDP averages the parameter grads.
    ddp_pn = PowerNorm(8, **DIST_KW)
    ddp_pn.load_state_dict(weights)
    ddp = nn.parallel.DistributedDataParallel(ddp_pn)
    ddp_out = []
    for x, gy in zip(xs, gys):
        xr = x[rows].clone().requires_grad_()
        ddp.zero_grad(set_to_none=True)
        (ddp(xr, pad_mask=pad[rows]) * gy[rows]).mean().backward()
        ddp_out.append({"dx": xr.grad, "dw": ddp_pn.weight.grad.clone(), "db": ddp_pn.bias.grad.clone(),
                        "ema": ddp_pn.ema_gz.clone(), "phi": ddp_pn.running_phi.clone()})
    return plain, ddp_out


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch():
    xs, gys, pad, weights = dist_data()
    single = PowerNorm(8, **DIST_KW)
    single.load_state_dict(weights)
    whole = _steps(single, xs, gys, pad, slice(None))
    # The single-process equivalent of DDP's loss: the mean over all positions of the global batch.
    single_mean = PowerNorm(8, **DIST_KW)
    single_mean.load_state_dict(weights)
    whole_mean = _steps(single_mean, xs, gys, pad, slice(None), scale=1 / gys[0].numel())
    results = run_gloo(_two_rank_steps, 2, xs, gys, pad, weights)
    tol = {"atol": 1e-12, "rtol": 1e-12}
    for step in range(len(xs)):
        ranks = [plain[step] for plain, _ in results]
        for r, res in enumerate(ranks):
            rows = slice(r * 2, r * 2 + 2)
            torch.testing.assert_close(res["y"], whole[step]["y"][rows], **tol)
            torch.testing.assert_close(res["dx"], whole[step]["dx"][rows], **tol)
            for key in ("phi", "ema", "iters"):
                torch.testing.assert_close(res[key], whole[step][key], **tol)
        for key in ("dw", "db"):  # each rank's parameter gradient is its share: they sum to the whole's
            torch.testing.assert_close(ranks[0][key] + ranks[1][key], whole[step][key], **tol)
        ddps = [ddp[step] for _, ddp in results]
        for r, res in enumerate(ddps):
            rows = slice(r * 2, r * 2 + 2)
            torch.testing.assert_close(res["dw"], whole_mean[step]["dw"], **tol)
            torch.testing.assert_close(res["db"], whole_mean[step]["db"], **tol)
            torch.testing.assert_close(res["dx"], 2 * whole_mean[step]["dx"][rows], **tol)
            torch.testing.assert_close(res["ema"], 2 * whole_mean[step]["ema"], **tol)
            torch.testing.assert_close(res["phi"], whole_mean[step]["phi"], **tol)
    assert not torch.equal(whole[-1]["ema"], torch.zeros(8)) and int(whole[-1]["iters"]) == 4
