"""TD-LN, TD-RMSNorm, the time-dependent parameter and adaLN against formulas written out here (td_layernorm.md)."""

import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.bench.tasks import TinyTransformer
from normlab.layers.td_layernorm import (AdaLayerNorm, TDLayerNorm, TDRMSNorm, TimeDependentParameter,
                                         no_weight_decay_names, tdln_time_from_step)

F64 = torch.float64


def randomize(module, seed=0, spread=0.5):
    """Random p0, p1, slope_delta, offset (and any other parameter): theta then really depends on tau."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1.0 + spread * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def tdp_formula(tdp, tau):
    """theta(tau)[b] = p1 + sigmoid(tau_b * (1 + a') + b') * (p0 - p1), written out per sample."""
    rows = []
    for t in tau.reshape(-1):
        s = 1 / (1 + torch.exp(-(t * (1 + tdp.slope_delta) + tdp.offset)))
        rows.append(tdp.p1 + s * (tdp.p0 - tdp.p1))
    return torch.stack(rows)


def ln_formula(x, weight=None, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def per_sample(theta, x):
    """(B, C) parameters broadcast over the token dims of x (B, ..., C)."""
    return theta.reshape(theta.shape[0], *(1,) * (x.dim() - 2), theta.shape[-1])


# --- the time-dependent parameter ---------------------------------------------------------------------------

def test_tdp_matches_formula_and_numpy():
    tdp = randomize(TimeDependentParameter((6,), dtype=F64))
    tau = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0], dtype=F64)
    out = tdp(tau)
    assert out.shape == (5, 6)
    torch.testing.assert_close(out, tdp_formula(tdp, tau), atol=1e-12, rtol=0)
    p0, p1, a, b = (t.detach().numpy() for t in (tdp.p0, tdp.p1, tdp.slope_delta, tdp.offset))
    t = tau.numpy()[:, None]
    s = 1.0 / (1.0 + np.exp(-(t * (1.0 + a) + b)))
    np.testing.assert_allclose(out.detach().numpy(), s * p0 + (1 - s) * p1, atol=1e-12, rtol=0)
    assert tdp(tau[2]).shape == (6,)
    torch.testing.assert_close(tdp(tau[2]), out[2], atol=1e-15, rtol=0)


def test_tdp_multidim_shape():
    tdp = randomize(TimeDependentParameter((2, 3), init=0.0, dtype=F64))
    tau = torch.tensor([0.5, -0.5], dtype=F64)
    out = tdp(tau)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out, tdp_formula(tdp, tau), atol=1e-12, rtol=0)


def test_tdp_init_constant_and_limits():
    tdp = TimeDependentParameter((4,), init=0.7)
    tau = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(tdp(tau), torch.full((11, 4), 0.7), atol=0, rtol=0)
    randomize(tdp)
    with torch.no_grad():
        tdp.slope_delta.uniform_(-0.5, 0.5)  # slope 1 + a' > 0
    with pytest.warns(UserWarning, match="saturates"):
        hi, lo = tdp(torch.tensor([1e4])), tdp(torch.tensor([-1e4]))
    torch.testing.assert_close(hi[0], tdp.p0.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lo[0], tdp.p1.detach(), atol=1e-6, rtol=0)


def test_tdp_hand_gradients_match_autograd():
    tdp = randomize(TimeDependentParameter((7,), dtype=F64), seed=3)
    tau = torch.tensor([-0.9, -0.1, 0.3, 0.8], dtype=F64)
    g = torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(tdp(tau), (tdp.p0, tdp.p1, tdp.slope_delta, tdp.offset), g)
    with torch.no_grad():
        s = torch.sigmoid(tau[:, None] * (1 + tdp.slope_delta) + tdp.offset)
        d = (tdp.p0 - tdp.p1) * g * s * (1 - s)
        expected = ((s * g).sum(0), ((1 - s) * g).sum(0), (d * tau[:, None]).sum(0), d.sum(0))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_tdln_time_from_step():
    n = torch.tensor([0, 250, 500, 1000])
    tau = tdln_time_from_step(n, 1000)
    assert tau.dtype == torch.float32
    torch.testing.assert_close(tau, torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    assert tdln_time_from_step(1, 1000) == pytest.approx(-0.998)
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        tdln_time_from_step(n, 0)


# --- equivalences at init and in the limits ----------------------------------------------------------------

@pytest.mark.parametrize("tau", [torch.tensor(3.0), torch.tensor([0.2]), torch.tensor([-1.0, 0.0, 0.5, 7.0])])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_tdln_at_init_equals_torch_layernorm(tau, dtype, tol):
    x = 3 * torch.randn(4, 5, 16, dtype=dtype) + 1
    ours = TDLayerNorm(16, dtype=dtype)
    torch.testing.assert_close(ours(x, tau.to(dtype)), nn.LayerNorm(16, dtype=dtype)(x), atol=tol, rtol=0)


def test_tdrmsnorm_at_init_equals_formula_eps_outside():
    x = torch.randn(3, 4, 16, dtype=F64) * 1e-7  # small enough for eps to matter, inside vs outside differ
    y = TDRMSNorm(16, dtype=F64)(x, torch.tensor([0.1, -0.5, 0.9], dtype=F64))
    rms = torch.sqrt((x ** 2).mean(-1, keepdim=True))
    torch.testing.assert_close(y, x / (rms + 1e-8), atol=1e-12, rtol=0)
    assert (y - x / torch.sqrt(rms ** 2 + 1e-8)).abs().max() > 1e-3
    inside = TDRMSNorm(16, eps=1e-6, eps_mode="inside", dtype=F64)(x, torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(inside, nn.RMSNorm(16, eps=1e-6, dtype=F64)(x), atol=1e-12, rtol=0)


def test_equal_p0_p1_is_time_independent_layernorm_with_affine():
    ln = randomize(TDLayerNorm(12, dtype=F64))
    gamma, beta = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    with torch.no_grad():
        ln.weight.p0.copy_(gamma), ln.weight.p1.copy_(gamma), ln.bias.p0.copy_(beta), ln.bias.p1.copy_(beta)
    x = torch.randn(3, 2, 12, dtype=F64)
    expected = F.layer_norm(x, (12,), gamma, beta, 1e-5)
    for tau in (torch.tensor([-2.0, 0.0, 5.0], dtype=F64), torch.tensor(0.3, dtype=F64)):
        torch.testing.assert_close(ln(x, tau), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_tdln_with_random_parameters_matches_formula(bias):
    ln = randomize(TDLayerNorm(10, bias=bias, dtype=F64))
    x = 2 * torch.randn(3, 4, 10, dtype=F64) - 1
    tau = torch.tensor([-0.8, 0.1, 0.9], dtype=F64)
    gamma = per_sample(tdp_formula(ln.weight, tau), x)
    beta = per_sample(tdp_formula(ln.bias, tau), x) if bias else None
    torch.testing.assert_close(ln(x, tau), ln_formula(x, gamma, beta), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_tdrmsnorm_with_random_parameters_matches_formula(bias):
    rms = randomize(TDRMSNorm(10, bias=bias, dtype=F64))
    x = torch.randn(3, 2, 5, 10, dtype=F64)
    tau = torch.tensor([-0.8, 0.1, 0.9], dtype=F64)
    gamma = tdp_formula(rms.weight, tau)[:, None, None]
    y = gamma * x / (torch.sqrt((x ** 2).mean(-1, keepdim=True)) + 1e-8)
    if bias:
        y = y + tdp_formula(rms.bias, tau)[:, None, None]
    torch.testing.assert_close(rms(x, tau), y, atol=1e-12, rtol=0)


def test_no_affine_is_plain_layernorm():
    ln = TDLayerNorm(8, elementwise_affine=False)
    assert sum(p.numel() for p in ln.parameters()) == 0
    x = torch.randn(2, 8)
    torch.testing.assert_close(ln(x, torch.tensor([0.1, 0.2])), F.layer_norm(x, (8,)), atol=0, rtol=0)


# --- per-sample time, the constant-time path -----------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", [(TDLayerNorm, {}), (TDRMSNorm, {"bias": True})])
def test_per_sample_rows_depend_only_on_their_tau(cls, kw):
    layer = randomize(cls(8, **kw))
    x = torch.randn(5, 3, 8)
    tau = torch.linspace(-1, 1, 5)
    y = layer(x, tau)
    looped = torch.cat([layer(x[b:b + 1], tau[b:b + 1]) for b in range(5)])
    torch.testing.assert_close(y, looped, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([layer(x[b:b + 1], tau[b]) for b in range(5)]), y, atol=1e-6, rtol=0)
    tau2 = tau.clone()
    tau2[1:] = torch.tensor([3.0, -3.0, 0.0, 2.0])
    y2 = layer(x, tau2)
    torch.testing.assert_close(y2[0], y[0], atol=0, rtol=0)
    assert (y2[1:] - y[1:]).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("cls,kw", [(TDLayerNorm, {}), (TDLayerNorm, {"bias": False}), (TDRMSNorm, {"bias": True})])
def test_constant_tau_fast_path_equals_general_path(cls, kw):
    layer = randomize(cls(8, dtype=F64, **kw))
    x = torch.randn(4, 3, 8, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(4, 3, 8, dtype=F64)
    fast, general = layer(x, torch.tensor(0.37, dtype=F64)), layer(x2, torch.full((4,), 0.37, dtype=F64))
    torch.testing.assert_close(fast, general, atol=1e-12, rtol=0)
    params = list(layer.parameters())
    grads_fast = torch.autograd.grad(fast, [x, *params], g)
    grads_general = torch.autograd.grad(general, [x2, *params], g)
    for a, b in zip(grads_fast, grads_general):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x, torch.tensor([0.37], dtype=F64)), fast, atol=0, rtol=0)


def test_batch_size_one_and_unbatched_with_scalar_tau():
    layer = randomize(TDLayerNorm(6))
    x = torch.randn(1, 4, 6)
    tau = torch.tensor([0.4])
    expected = ln_formula(x, tdp_formula(layer.weight, tau)[:, None], tdp_formula(layer.bias, tau)[:, None])
    torch.testing.assert_close(layer(x, tau), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x[0, 0], tau[0]), expected[0, 0], atol=1e-5, rtol=0)


# --- gradients ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [torch.tensor([-0.7, 0.2, 0.9], dtype=F64), torch.tensor(0.4, dtype=F64)])
@pytest.mark.parametrize("cls,kw", [(TDLayerNorm, {}), (TDRMSNorm, {"bias": True}),
                                    (TDRMSNorm, {"eps": 1e-5, "eps_mode": "inside"})])
def test_gradcheck_wrt_x_tau_and_every_tdp_parameter(tau, cls, kw):
    layer = randomize(cls(5, dtype=F64, **kw))
    x = torch.randn(3, 2, 5, dtype=F64, requires_grad=True)
    tau = tau.clone().requires_grad_()
    params = tuple(layer.parameters())
    assert len(params) == (8 if kw.get("bias", cls is TDLayerNorm) else 4)
    assert torch.autograd.gradcheck(lambda x, t, *p: layer(x, t), (x, tau, *params))


def test_hand_gradients_through_tdln_match_autograd():
    ln = randomize(TDLayerNorm(6, dtype=F64), seed=2)
    x = torch.randn(3, 4, 6, dtype=F64)
    tau = torch.tensor([-0.5, 0.2, 0.8], dtype=F64)
    g = torch.randn(3, 4, 6, dtype=F64)
    got = torch.autograd.grad(ln(x, tau), (ln.weight.p0, ln.weight.p1, ln.weight.slope_delta, ln.weight.offset,
                                            ln.bias.p0), g)
    with torch.no_grad():
        xhat = ln_formula(x)
        g_gamma = (g * xhat).sum(1)  # (B, C): the gradient reaching gamma(tau_b)
        w = ln.weight
        s = torch.sigmoid(tau[:, None] * (1 + w.slope_delta) + w.offset)
        d = (w.p0 - w.p1) * g_gamma * s * (1 - s)
        s_beta = torch.sigmoid(tau[:, None] * (1 + ln.bias.slope_delta) + ln.bias.offset)
        expected = ((s * g_gamma).sum(0), ((1 - s) * g_gamma).sum(0), (d * tau[:, None]).sum(0), d.sum(0),
                    (s_beta * g.sum(1)).sum(0))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_all_zero_token_in_tdrmsnorm_is_finite_with_gradient_gamma_over_eps():
    rms = randomize(TDRMSNorm(8, dtype=F64))
    x = torch.randn(3, 4, 8, dtype=F64)
    x[1, 2] = 0.0
    x.requires_grad_()
    tau = torch.tensor([0.1, -0.6, 0.7], dtype=F64)
    y = rms(x, tau)
    assert torch.equal(y[1, 2], torch.zeros(8, dtype=F64)) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    gamma = tdp_formula(rms.weight, tau)[1].detach()
    torch.testing.assert_close(x.grad[1, 2], gamma / 1e-8, atol=0, rtol=1e-12)
    # the same formula with sqrt(mean(x^2)) instead of a vector norm has a NaN gradient there
    x2 = x.detach().clone().requires_grad_()
    (x2 / (torch.sqrt((x2 ** 2).mean(-1, keepdim=True)) + 1e-8)).sum().backward()
    assert torch.isnan(x2.grad[1, 2]).all()


# --- adaLN --------------------------------------------------------------------------------------------------

def test_adaln_matches_dit_modulate():
    ada = randomize(AdaLayerNorm(8, cond_dim=5, zero_init=False, dtype=F64), spread=0.3)
    x, c = torch.randn(3, 4, 8, dtype=F64), torch.randn(3, 5, dtype=F64)
    mod = F.silu(c) @ ada.linear.weight.T + ada.linear.bias
    shift, scale = mod[:, :8], mod[:, 8:]
    expected = ln_formula(x, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(ada(x, c), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ada(x[:1], c[0]), expected[:1], atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, c, *p: ada(x, c),
                                    (x.requires_grad_(), c.requires_grad_(), *ada.parameters()))


def test_adaln_zero_init_is_affine_free_layernorm():
    ada = AdaLayerNorm(8, cond_dim=4)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ada(x, torch.randn(2, 4)), F.layer_norm(x, (8,), eps=1e-6), atol=0, rtol=0)
    assert not AdaLayerNorm(8, 4, zero_init=False).linear.weight.eq(0).all()


def test_parameter_counts():
    c = 24
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(TDLayerNorm(c)) == 8 * c
    assert count(TDRMSNorm(c)) == 4 * c and count(TDRMSNorm(c, bias=True)) == 8 * c
    assert count(AdaLayerNorm(c, c)) == 2 * c * c + 2 * c
    assert count(TimeDependentParameter((3, 5))) == 60


# --- weight decay groups ------------------------------------------------------------------------------------

def test_no_weight_decay_names_split_the_optimizer_groups():
    model = nn.Sequential(nn.Linear(4, 4), TDLayerNorm(4), nn.ModuleDict({"rms": TDRMSNorm(4)}))
    names = no_weight_decay_names(model)
    assert names == ["1.weight.slope_delta", "1.weight.offset", "1.bias.slope_delta", "1.bias.offset",
                     "2.rms.weight.slope_delta", "2.rms.weight.offset"]
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if n not in names]
    opt = torch.optim.AdamW([{"params": decay}, {"params": [params[n] for n in names], "weight_decay": 0.0}])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    assert no_weight_decay_names(TimeDependentParameter(3)) == ["slope_delta", "offset"]
    assert no_weight_decay_names(nn.LayerNorm(3)) == []


# --- dtypes, state, errors, compile -------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", [(TDLayerNorm, {}), (TDRMSNorm, {"bias": True})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_statistics_in_float32(cls, kw, dtype):
    layer = randomize(cls(64, **kw))
    x = (torch.randn(4, 3, 64) * 3 + 1).to(dtype)
    tau = torch.tensor([-0.5, 0.0, 0.5, 1.0], dtype=dtype)
    y = layer(x, tau)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x.float(), tau.float()), atol=0, rtol=0.01)
    y.float().sum().backward()
    assert layer.weight.p0.grad.dtype == torch.float32
    half = randomize(cls(64, **kw)).to(dtype)
    assert half(x, tau).dtype == dtype and torch.isfinite(half(x, tau).float()).all()


def test_float64_stays_float64_and_adaln_half():
    assert TDLayerNorm(4, dtype=F64)(torch.randn(2, 4, dtype=F64), torch.zeros(2, dtype=F64)).dtype == F64
    ada = randomize(AdaLayerNorm(8, 4, zero_init=False), spread=0.3)
    x, c = torch.randn(2, 3, 8), torch.randn(2, 4)
    y = ada(x.bfloat16(), c)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ada(x.bfloat16().float(), c), atol=0, rtol=0.01)


@pytest.mark.parametrize("cls,kw", [(TDLayerNorm, {}), (TDRMSNorm, {"bias": True})])
def test_state_dict_round_trip_reset_and_repr(cls, kw):
    layer = randomize(cls(8, **kw))
    assert set(layer.state_dict()) == {f"{w}.{p}" for w in ("weight", "bias") for p in
                                       ("p0", "p1", "slope_delta", "offset")}
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = cls(8, **kw)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x, tau = torch.randn(3, 8), torch.tensor([0.1, 0.5, -0.4])
    assert torch.equal(fresh(x, tau), layer(x, tau))
    layer.reset_parameters()
    assert torch.equal(layer.weight.p0, torch.ones(8)) and torch.equal(layer.bias.p1, torch.zeros(8))
    assert torch.equal(layer.weight.slope_delta, torch.zeros(8)) and torch.equal(layer.bias.offset, torch.zeros(8))
    assert "eps=" in repr(layer) and "TimeDependentParameter(shape=(8,)" in repr(layer)


def test_device_and_dtype_arguments():
    layer = TDRMSNorm(4, device="meta", dtype=F64)
    assert all(p.device.type == "meta" and p.dtype == F64 for p in layer.parameters())
    assert AdaLayerNorm(4, 3, device="meta").linear.weight.device.type == "meta"


@pytest.mark.parametrize("cls", [TDLayerNorm, TDRMSNorm])
def test_bad_tau_and_input_errors(cls):
    layer = cls(8)
    x = torch.randn(4, 3, 8)
    with pytest.raises(TypeError, match="tau must be a floating-point torch.Tensor .* got torch.int64$"):
        layer(x, torch.arange(4))
    with pytest.raises(TypeError, match="tau must be a floating-point torch.Tensor .* got float$"):
        layer(x, 0.5)
    with pytest.raises(ValueError, match=r"tau must have shape \(\), \(1,\) or \(4,\) for input of shape "
                                         r"\(4, 3, 8\), got \(3,\)"):
        layer(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"got \(4, 1\)"):
        layer(x, torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"tau must have shape \(\) or \(1,\) for input of shape \(8,\)"):
        layer(x[0, 0], torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected input with trailing shape \(8,\), got \(4, 3, 7\)"):
        layer(torch.randn(4, 3, 7), torch.zeros(4))
    with pytest.raises(ValueError, match="normalized_shape must be positive"):
        cls(0)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="eps must be positive with eps_mode='outside'"):
        TDRMSNorm(8, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        TDRMSNorm(8, eps=-1e-8, eps_mode="inside")
    with pytest.raises(ValueError, match="eps must be non-negative"):
        TDLayerNorm(8, eps=-1.0)
    with pytest.raises(ValueError, match="eps_mode must be one of"):
        TDRMSNorm(8, eps_mode="both")
    TDRMSNorm(8, eps=0.0, eps_mode="inside")  # as torch's RMSNorm, eps = 0 is allowed inside the sqrt
    with pytest.raises(ValueError, match="init must be a finite number"):
        TimeDependentParameter(4, init=math.nan)
    with pytest.raises(ValueError, match="cond_dim must be a positive int"):
        AdaLayerNorm(8, 0)
    ada = AdaLayerNorm(8, 4)
    with pytest.raises(ValueError, match=r"cond must have shape \(4,\) or \(B, 4\).*got cond \(3, 4\) for input "
                                         r"\(2, 8\)"):
        ada(torch.randn(2, 8), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"expected cond with trailing shape \(4,\)"):
        ada(torch.randn(2, 8), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"tau must have shape \(\) or \(B,\)"):
        TimeDependentParameter(4)(torch.zeros(2, 2))


def test_large_tau_warns_and_moderate_tau_does_not():
    layer = TDLayerNorm(4)
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"\|tau\| > 20 saturates"):
        layer(x, torch.tensor([3.0, 500.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, torch.tensor([-20.0, 20.0]))


@pytest.mark.parametrize("cls,kw,tau", [(TDLayerNorm, {}, torch.tensor([-0.5, 0.1, 0.9])),
                                        (TDLayerNorm, {}, torch.tensor(0.3)),
                                        (TDRMSNorm, {"bias": True}, torch.tensor([-0.5, 0.1, 0.9]))])
def test_compiles_aot_eager_with_same_outputs_and_grads(cls, kw, tau):
    torch._dynamo.reset()
    layer = randomize(cls(8, **kw))
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(3, 5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x, tau), compiled(x2, tau=tau)
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-6)
    params = list(layer.parameters())
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y2, [x2, *params], g), torch.autograd.grad(y, [x, *params], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_adaln_compiles_aot_eager():
    torch._dynamo.reset()
    ada = randomize(AdaLayerNorm(8, 4, zero_init=False), spread=0.3)
    x, c = torch.randn(2, 3, 8), torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(ada, backend="aot_eager")(x, c), ada(x, c), atol=1e-6, rtol=1e-6)


def test_tiny_transformer_slots_take_tau_by_keyword_and_init_equals_layernorm():
    torch.manual_seed(0)
    td = TinyTransformer(50, d_model=16, n_layers=2, n_heads=2, max_len=8, norm_layer=TDLayerNorm)
    torch.manual_seed(0)
    plain = TinyTransformer(50, d_model=16, n_layers=2, n_heads=2, max_len=8)
    idx = torch.randint(0, 50, (3, 8))
    tau = torch.tensor([-0.9, 0.0, 0.8])
    torch.testing.assert_close(td(idx, tau=tau), plain(idx), atol=1e-5, rtol=0)
    randomize(td.blocks[0].norm1)
    out = td(idx, tau=tau)
    assert (out[0] - td(idx, tau=torch.tensor([0.5, 0.0, 0.8]))[0]).abs().max() > 1e-4
    assert len(no_weight_decay_names(td)) == 2 * 2 * 5
