"""EvoNorm-B0 / EvoNorm-S0 against the sheet's formulas written out here in float64 (evonorm.md)."""

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normlab.layers.evonorm import EvoNormB0, EvoNormS0

F64 = torch.float64


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name in ("weight", "v") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def data(*shape, seed=0, scale=1.5, shift=0.3, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=F64) + shift).to(dtype)


def per_channel(t, x):
    return t.detach().view(1, -1, *([1] * (x.dim() - 2)))


def b0_reference(x, weight, bias, v, eps, running_var=None):
    """The sheet's B0 formula: batch variance (or running_var) and instance std, both biased."""
    spatial = tuple(range(2, x.dim()))
    n = x.shape[0] * x[0, 0].numel()
    if running_var is None:
        mean_b = x.sum((0, *spatial), keepdim=True) / n
        s2 = ((x - mean_b) ** 2).sum((0, *spatial), keepdim=True) / n
    else:
        s2 = per_channel(running_var, x)
    m = x[0, 0].numel()
    mean_i = x.sum(spatial, keepdim=True) / m
    s_i = torch.sqrt(((x - mean_i) ** 2).sum(spatial, keepdim=True) / m + eps)
    left = torch.sqrt(s2 + eps)
    right = per_channel(v, x) * x + s_i
    return x / torch.where(left > right, left, right) * per_channel(weight, x) + per_channel(bias, x)


def group_std(x, groups, eps):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.sum(-1, keepdim=True) / xg.shape[-1]
    var = ((xg - mean) ** 2).sum(-1, keepdim=True) / xg.shape[-1]
    return torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)


def s0_reference(x, weight, bias, v, groups, eps):
    gate = 1 / (1 + torch.exp(-per_channel(v, x) * x))
    return x * gate / group_std(x, groups, eps) * per_channel(weight, x) + per_channel(bias, x)


# ------------------------------------------------------------------------------------------- references

@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
@pytest.mark.parametrize("training", [True, False])
def test_without_nonlinearity_is_the_affine_map_exactly(cls, training):
    layer = randomize(cls(8, nonlinearity=False, dtype=F64)).train(training)
    assert layer.v is None and set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = data(3, 8, 4, 4)
    assert torch.equal(layer(x), x * per_channel(layer.weight, x) + per_channel(layer.bias, x))
    if cls is EvoNormB0:  # no statistics: the running variance keeps its initial 1
        assert torch.equal(layer.running_var, torch.ones(8, dtype=F64)) and int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (4, 6, 7)])
def test_b0_training_forward_and_running_var(shape):
    layer = randomize(EvoNormB0(6, dtype=F64))
    x = data(*shape)
    y = layer(x)
    torch.testing.assert_close(y, b0_reference(x, layer.weight, layer.bias, layer.v, 1e-5), atol=1e-10, rtol=0)
    spatial = tuple(range(2, x.dim()))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var((0, *spatial), unbiased=False),
                               atol=1e-14, rtol=0)
    # Both branches of the max are taken somewhere: the check is not one-sided.
    left = torch.sqrt(x.var((0, *spatial), unbiased=False, keepdim=True) + 1e-5)
    right = per_channel(layer.v, x) * x + torch.sqrt(x.var(spatial, unbiased=False, keepdim=True) + 1e-5)
    assert (left > right).any() and (left < right).any()


def test_b0_running_var_unbiased_like_timm():
    layer = EvoNormB0(6, unbiased_running_var=True, dtype=F64)
    x = data(2, 6, 3, 4)
    y = layer(x)
    n = 2 * 3 * 4
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var((0, 2, 3), unbiased=False) * n / (n - 1),
                               atol=1e-14, rtol=0)
    biased = EvoNormB0(6, dtype=F64)
    assert torch.equal(biased(x), y)  # the forward uses the biased variance either way
    assert not torch.allclose(biased.running_var, layer.running_var, atol=1e-4, rtol=0)


def test_b0_running_var_ema_over_steps_and_cumulative_average():
    ema, cumulative = EvoNormB0(4, momentum=0.3, dtype=F64), EvoNormB0(4, momentum=None, dtype=F64)
    expected_ema, variances = torch.ones(4, dtype=F64), []
    for step in range(4):
        x = data(3, 4, 5, 5, seed=step, scale=1 + step)
        ema(x), cumulative(x)
        var = x.var((0, 2, 3), unbiased=False)
        variances.append(var)
        expected_ema = 0.7 * expected_ema + 0.3 * var
    torch.testing.assert_close(ema.running_var, expected_ema, atol=1e-13, rtol=0)
    torch.testing.assert_close(cumulative.running_var, torch.stack(variances).mean(0), atol=1e-13, rtol=0)
    assert int(ema.num_batches_tracked) == 4 and int(cumulative.num_batches_tracked) == 4


def test_b0_eval_uses_running_var_is_batch_independent_and_leaves_buffers():
    layer = randomize(EvoNormB0(6, dtype=F64))
    for step in range(3):
        layer(data(4, 6, 5, 5, seed=step, scale=2 + step))
    layer.eval()
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = data(5, 6, 5, 5, seed=9)
    y = layer(x)
    expected = b0_reference(x, layer.weight, layer.bias, layer.v, 1e-5, running_var=layer.running_var)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)
    for i in range(len(x)):
        assert torch.equal(layer(x[i:i + 1]), y[i:i + 1])
    for k, v in layer.named_buffers():
        assert torch.equal(v, before[k]), k
    # The running variance matters: it differs from the batch variance and gives another output.
    assert not torch.allclose(y, layer.train()(x), atol=1e-3)


def test_b0_gradient_flows_through_both_statistics():
    """Detaching the batch variance or the instance std changes the gradient: neither is a constant."""
    layer = randomize(EvoNormB0(4, dtype=F64))
    x = data(3, 4, 3, 3, seed=2).requires_grad_()
    gy = data(3, 4, 3, 3, seed=3)
    (grad,) = torch.autograd.grad(layer(x), x, gy)

    def variant(detach_batch, detach_instance):
        xb = x.detach() if detach_batch else x
        xi = x.detach() if detach_instance else x
        s2 = xb.var((0, 2, 3), unbiased=False, keepdim=True)
        s_i = torch.sqrt(xi.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
        y = x / torch.maximum(torch.sqrt(s2 + 1e-5), per_channel(layer.v, x) * x + s_i)
        return torch.autograd.grad(y * per_channel(layer.weight, x), x, gy)[0]

    torch.testing.assert_close(grad, variant(False, False), atol=1e-12, rtol=0)
    assert not torch.allclose(grad, variant(True, False), atol=1e-6)
    assert not torch.allclose(grad, variant(False, True), atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("shape", [(3, 8, 3, 3), (3, 8, 9)])
def test_s0_forward_matches_the_formula(groups, shape):
    layer = randomize(EvoNormS0(8, groups=groups, dtype=F64))
    x = data(*shape)
    expected = s0_reference(x, layer.weight, layer.bias, layer.v, groups, 1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.eval()(x), expected, atol=1e-12, rtol=0)


def test_s0_group_std_is_biased_layer_std_or_instance_std():
    """groups=1: the denominator is sqrt(var over (C,H,W), biased); groups=C: the biased instance std.
    torch's default unbiased var would be ~3e-2 off at C*H*W = 72."""
    x = data(4, 8, 3, 3, seed=5)
    gate = x * torch.sigmoid(x)  # v = 1, gamma = 1, beta = 0
    one = EvoNormS0(8, groups=1, dtype=F64)
    biased = torch.sqrt(x.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(one(x), gate / biased, atol=1e-12, rtol=0)
    unbiased = torch.sqrt(x.var((1, 2, 3), keepdim=True) + 1e-5)
    assert (one(x) - gate / unbiased).abs().max() > 1e-2
    inst = EvoNormS0(8, groups=8, dtype=F64)
    torch.testing.assert_close(inst(x), gate / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_s0_samples_are_independent(training):
    layer = randomize(EvoNormS0(8, groups=4)).train(training)
    a, b = data(3, 8, 4, 4, seed=1, dtype=torch.float32), data(5, 8, 4, 4, seed=2, scale=10, dtype=torch.float32)
    torch.testing.assert_close(layer(torch.cat([a, b]))[:3], layer(a), atol=1e-6, rtol=0)


def test_s0_large_v_approaches_relu():
    layer = randomize(EvoNormS0(8, groups=2, dtype=F64))
    with torch.no_grad():
        layer.v.fill_(1e4)
    x = data(3, 8, 4, 4, seed=4)
    expected = torch.relu(x) / group_std(x, 2, 1e-5) * per_channel(layer.weight, x) + per_channel(layer.bias, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-3, rtol=0)


def test_s0_input_scale_is_undone_by_v():
    """The gate sees v*x: S0_v(a*x) == S0_{a*v}(x) up to eps effects (eps=1e-12 here); S0_{v/a}(x)
    is not (it differs by O(1))."""
    a = 3.0
    layer = randomize(EvoNormS0(8, groups=2, eps=1e-12, dtype=F64))
    x = data(3, 8, 4, 4, seed=6)
    scaled_input = layer(a * x)
    params = dict(layer.named_parameters())
    scaled_v = functional_call(layer, {**params, "v": params["v"] * a}, (x,))
    torch.testing.assert_close(scaled_input, scaled_v, atol=1e-10, rtol=0)
    wrong = functional_call(layer, {**params, "v": params["v"] / a}, (x,))
    assert (wrong - scaled_input).abs().max() > 0.1


@pytest.mark.parametrize("channels, expected", [(24, 24), (48, 24), (40, 20), (20, 20), (64, 32), (7, 7)])
def test_s0_group_fallback_decrements_until_it_divides(channels, expected):
    layer = randomize(EvoNormS0(channels, dtype=F64))
    assert layer.groups == expected
    x = data(2, channels, 3, 3, seed=channels)
    ref = s0_reference(x, layer.weight, layer.bias, layer.v, expected, 1e-5)
    torch.testing.assert_close(layer(x), ref, atol=1e-15, rtol=0)


def test_s0_group_size():
    layer = EvoNormS0(24, groups=5, group_size=4)  # group_size takes precedence
    assert layer.groups == 6
    with pytest.raises(ValueError, match=r"group_size must divide num_features, got num_features=24, group_size=5"):
        EvoNormS0(24, group_size=5)


# --------------------------------------------------------------------------------------------- gradcheck

def _untied(shape, seed, layer):
    """Input whose max(left, right) has no near-ties (B0): entries moved off the switching point."""
    x = data(*shape, seed=seed)
    with torch.no_grad():
        for _ in range(20):
            spatial = tuple(range(2, x.dim()))
            left = torch.sqrt(x.var((0, *spatial), unbiased=False, keepdim=True) + layer.eps)
            right = per_channel(layer.v, x) * x + torch.sqrt(x.var(spatial, unbiased=False, keepdim=True) + layer.eps)
            close = (left - right).abs() < 0.05
            if not close.any():
                return x
            x = torch.where(close, x + 0.2, x)
    raise AssertionError("could not untie the input")


@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(cls, training):
    layer = randomize(cls(4, **({"groups": 2} if cls is EvoNormS0 else {}), dtype=F64)).train(training)
    if cls is EvoNormB0 and not training:
        layer.running_var.fill_(1.7)
    x = (_untied((3, 4, 3, 3), 1, layer) if cls is EvoNormB0 else data(3, 4, 3, 3, seed=1)).requires_grad_()
    params = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}
    state = {k: b.clone() for k, b in layer.named_buffers()}
    names = list(params)

    def fn(x, *ps):
        return functional_call(layer, {**dict(zip(names, ps)), **{k: b.clone() for k, b in state.items()}}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


# ------------------------------------------------------------------------------------------ state, dtype

def test_state_dict_round_trip_resumes_bit_exactly():
    layer = randomize(EvoNormB0(6, momentum=None))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    xs = [data(4, 6, 5, 5, seed=s, dtype=torch.float32) for s in range(6)]

    def step(m, o, x):
        o.zero_grad()
        y = m(x)
        y.square().mean().backward()
        o.step()
        return y.detach()

    for x in xs[:3]:
        step(layer, opt, x)
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()))
    assert set(saved["model"]) == {"weight", "bias", "v", "running_var", "num_batches_tracked"}
    fresh = EvoNormB0(6, momentum=None)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    for x in xs[3:]:
        assert torch.equal(step(layer, opt, x), step(fresh, fresh_opt, x))
    for (k, a), b in zip(layer.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    s0 = randomize(EvoNormS0(8, groups=4))
    assert set(s0.state_dict()) == {"weight", "bias", "v"}
    twin = EvoNormS0(8, groups=4)
    twin.load_state_dict(s0.state_dict())
    x = xs[0][:, :1].expand(4, 8, 5, 5)
    assert torch.equal(twin(x), s0(x))


def test_reset_init_zero_and_repr():
    layer = randomize(EvoNormB0(4, init_zero=True))
    layer(data(3, 4, 3, 3, dtype=torch.float32))
    layer.reset_running_stats()
    assert torch.equal(layer.running_var, torch.ones(4)) and int(layer.num_batches_tracked) == 0
    assert layer.num_batches_tracked.dtype == torch.long and layer.num_batches_tracked.shape == ()
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.zeros(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert torch.equal(layer.v, torch.ones(4))
    s0 = randomize(EvoNormS0(4))
    s0.reset_parameters()
    assert torch.equal(s0.weight, torch.ones(4)) and torch.equal(s0.v, torch.ones(4))
    assert torch.equal(s0.bias, torch.zeros(4))
    assert torch.equal(EvoNormS0(4, init_zero=True).weight, torch.zeros(4))
    for part in ("4, eps=1e-05", "momentum=0.1", "nonlinearity=True", "init_zero=True", "unbiased_running_var=False"):
        assert part in repr(layer)
    assert "4, groups=4, eps=1e-05, nonlinearity=True, init_zero=False" in repr(s0)
    assert EvoNormB0.batchnorm_state == ("weight", "bias", "running_var")
    assert EvoNormS0.batchnorm_state == ("weight", "bias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
def test_half_input_is_computed_in_float32(cls, dtype):
    """The half run equals the float32 run on the same values, rounded; buffers in float32 match."""
    kw = {"groups": 4} if cls is EvoNormS0 else {}
    half, full = randomize(cls(8, **kw)), randomize(cls(8, **kw))
    for seed in range(2):
        x = data(4, 8, 5, 5, seed=seed, dtype=dtype)
        gy = data(4, 8, 5, 5, seed=10 + seed, dtype=dtype)
        xh, xf = x.clone().requires_grad_(), x.float().requires_grad_()
        yh, yf = half(xh), full(xf)
        assert yh.dtype == dtype and torch.equal(yh, yf.to(dtype))
        yh.backward(gy)
        yf.backward(gy.float())
        assert xh.grad.dtype == dtype and torch.equal(xh.grad, xf.grad.to(dtype))
        assert torch.equal(half.weight.grad, full.weight.grad)
        for (name, a), b in zip(half.named_buffers(), full.buffers()):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert half.eval()(x).dtype == dtype


@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
def test_float64_stays_float64_and_half_module(cls):
    layer = cls(4, dtype=F64)
    x = data(2, 4, 3, 3)
    assert layer(x).dtype == F64 and layer.eval()(x).dtype == F64
    half = cls(4).to(torch.bfloat16)  # half parameters: still computed in float32, output in bf16
    y = half(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# -------------------------------------------------------------------------------------------- errors

def test_b0_one_value_per_channel():
    layer = EvoNormB0(4)
    with pytest.raises(ValueError, match=r"EvoNormB0 needs more than one value per channel in training, got "
                                         r"input of shape \(1, 4, 1, 1\)"):
        layer(torch.randn(1, 4, 1, 1))
    assert torch.equal(layer.running_var, torch.ones(4)) and int(layer.num_batches_tracked) == 0
    layer(torch.randn(2, 4, 1, 1))  # two values per channel are enough
    layer(torch.randn(1, 4, 2, 1))
    y = layer.eval()(torch.randn(1, 4, 1, 1))
    assert y.shape == (1, 4, 1, 1) and torch.isfinite(y).all()
    s0 = EvoNormS0(4)  # batch-independent: batch size 1 is fine in training
    assert torch.isfinite(s0(torch.randn(1, 4, 1, 1))).all()


@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
@pytest.mark.parametrize("training", [True, False])
def test_bad_input(cls, training):
    layer = cls(4).train(training)
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name} expected a non-empty batch, got input of shape \(0, 4, 3, 3\)"):
        layer(torch.randn(0, 4, 3, 3))
    with pytest.raises(ValueError, match=rf"{name} expected 4 channels in dim 1, got 5"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=rf"{name} expected 3D \(N, C, L\) or 4D \(N, C, H, W\) input, got 2D"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="got 5D"):
        layer(torch.randn(2, 4, 2, 2, 2))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.long))
    if cls is EvoNormB0:
        assert torch.equal(layer.running_var, torch.ones(4)) and int(layer.num_batches_tracked) == 0


def test_bad_hyperparameters():
    bad = [(EvoNormB0, {"num_features": 0}, ValueError, "num_features must be a positive int"),
           (EvoNormS0, {"num_features": 2.0}, ValueError, "num_features must be a positive int"),
           (EvoNormB0, {"eps": -1.0}, ValueError, "eps must be non-negative"),
           (EvoNormS0, {"eps": float("nan")}, ValueError, "eps must be non-negative"),
           (EvoNormB0, {"momentum": 1.5}, ValueError, r"momentum must be None or in \[0, 1\], got 1.5"),
           (EvoNormB0, {"nonlinearity": 1}, TypeError, "nonlinearity must be a bool"),
           (EvoNormS0, {"init_zero": None}, TypeError, "init_zero must be a bool"),
           (EvoNormB0, {"unbiased_running_var": "yes"}, TypeError, "unbiased_running_var must be a bool"),
           (EvoNormS0, {"groups": 0}, ValueError, "groups must be a positive int"),
           (EvoNormS0, {"group_size": 0}, ValueError, "group_size must be a positive int or None"),
           ]
    for cls, kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            cls(**{"num_features": 8, **kw})


# ------------------------------------------------------------------------------------------- compile

@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
def test_compiles_aot_eager_same_outputs_grads_and_buffers(cls):
    torch._dynamo.reset()
    kw = {"groups": 4} if cls is EvoNormS0 else {}
    eager, twin = randomize(cls(8, **kw)), randomize(cls(8, **kw))
    compiled = torch.compile(twin, backend="aot_eager")
    for seed in range(3):
        x = data(4, 8, 5, 5, seed=seed, scale=1 + seed, dtype=torch.float32)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(twin.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
        for (name, a), b in zip(twin.named_buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        eager.zero_grad(), twin.zero_grad()
    eager.eval(), twin.eval()
    x = data(3, 8, 5, 5, seed=7, dtype=torch.float32)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)


def test_stands_in_for_bn_relu_in_a_small_cnn():
    """One training step of a CNN with EvoNorm slots: finite loss and gradients for every parameter."""
    torch.manual_seed(0)
    for make in (lambda c: EvoNormB0(c), lambda c: EvoNormS0(c, groups=8)):
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), make(16), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(16, 3))
        loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
