"""Weight Standardization against the official snippets and timm's StdConv2d transcribed here, and the checks
of bcn_ws.md."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab.reparam.weight_standardization import (WeightStandardization, add_weight_standardization,
                                                    weight_standardization)

D = torch.float64


def hand_ws(w, eps=1e-5):
    """The paper's form: biased variance, eps inside the sqrt, per output row."""
    rows = w.reshape(w.shape[0], -1)
    mu = rows.mean(1, keepdim=True)
    var = ((rows - mu) ** 2).mean(1, keepdim=True)
    return ((rows - mu) / torch.sqrt(var + eps)).view_as(w)


def official_readme_pytorch(weight):
    """WeightStandardization README / DeepLabV3 ``Conv2d.forward``: unbiased std, eps outside."""
    weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    weight = weight - weight_mean
    std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
    return weight / std.expand_as(weight)


def official_imagenet_layers(weight):
    """Batch-Channel-Normalization ``imagenet/models/layers.py`` ``Conv2d.forward``: unbiased var, eps inside."""
    weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    weight = weight - weight_mean
    std = torch.sqrt(torch.var(weight.view(weight.size(0), -1), dim=1) + 1e-5).view(-1, 1, 1, 1)
    return weight / std.expand_as(weight)


def timm_std_conv2d(weight, eps=1e-6):
    """timm ``StdConv2d.forward``'s weight: batch norm of the (1, O, n) view."""
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=eps).reshape_as(weight)


def conv(seed=0, *args, **kw):
    torch.manual_seed(seed)
    args = args or (8, 6, 3)
    return nn.Conv2d(*args, dtype=D, **kw)


def test_rows_have_mean_zero_and_variance_var_over_var_plus_eps():
    w = conv().weight.detach()
    what = WeightStandardization()(w).reshape(6, -1)
    rows = w.reshape(6, -1)
    var = rows.var(1, correction=0)
    assert what.mean(1).abs().max() < 1e-12
    torch.testing.assert_close(what.var(1, correction=0), var / (var + 1e-5), atol=1e-12, rtol=0)
    assert (var / (var + 1e-5) - 1).abs().max() > 1e-4  # eps matters at default init (var ~ 1/(3n))


@pytest.mark.parametrize("kw, reference", [
    ({}, hand_ws),
    ({"eps": 1e-6}, timm_std_conv2d),
    ({"unbiased": True}, official_imagenet_layers),
    ({"unbiased": True, "eps_outside_sqrt": True}, official_readme_pytorch),
])
@pytest.mark.parametrize("shape", [(8, 6, 3), (4, 6, 1), (8, 8, 3, 1, 1, 1, 2), (8, 8, 3, 1, 1, 1, 8)],
                         ids=["plain", "1x1", "grouped", "depthwise"])
def test_variants_match_official_code_and_timm(kw, reference, shape):
    m = weight_standardization(conv(0, *shape), **kw)
    raw = m.parametrizations.weight.original.detach()
    x = torch.randn(2, shape[0], 5, 5, dtype=D)
    x.requires_grad_()
    raw_ref = raw.clone().requires_grad_()
    w_ref = reference(raw_ref)
    torch.testing.assert_close(m.weight, w_ref, atol=1e-14, rtol=0)
    y = m(x)
    y_ref = F.conv2d(x, w_ref, m.bias, padding=m.padding, groups=m.groups)
    torch.testing.assert_close(y, y_ref, atol=1e-13, rtol=0)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.parametrizations.weight.original), gy)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, raw_ref), gy)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-11, rtol=1e-12)


def test_variants_differ_from_each_other():
    w = conv().weight.detach()
    forms = [WeightStandardization(**kw)(w) for kw in
             ({}, {"unbiased": True}, {"eps_outside_sqrt": True}, {"eps": 1e-6})]
    for i in range(len(forms)):
        for j in range(i + 1, len(forms)):
            assert (forms[i] - forms[j]).abs().max() > 1e-5, (i, j)


def test_remove_parametrizations_bakes_what_and_state_dict_keeps_raw_weight():
    m = weight_standardization(conv())
    sd = m.state_dict()
    assert "parametrizations.weight.original" in sd and "weight" not in sd
    assert any(p is m.parametrizations.weight.original for p in m.parameters())
    x = torch.randn(2, 8, 5, 5, dtype=D)
    y = m(x)
    torch.testing.assert_close(y, F.conv2d(x, hand_ws(sd["parametrizations.weight.original"]), m.bias), atol=1e-13,
                               rtol=0)
    fresh = weight_standardization(conv(seed=5))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    assert type(m) is nn.Conv2d and not parametrize.is_parametrized(m)
    assert torch.equal(m(x), y)


def test_invariance_to_row_scale_and_shift():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, 3, 3, generator=gen, dtype=D)
    shift = torch.randn(6, 1, 1, 1, generator=gen, dtype=D)
    ws = WeightStandardization(eps=1e-12)
    torch.testing.assert_close(ws(3.7 * w + 0.5), ws(w), atol=1e-10, rtol=0)
    torch.testing.assert_close(ws(3.7 * w + shift), ws(w), atol=1e-10, rtol=0)
    # at eps=1e-5 on a default-initialised conv the gap is the predicted |W_hat| eps / (2 var) (1 - 1/a^2)
    w = conv().weight.detach()
    ws = WeightStandardization()
    what = ws(w)
    var = w.reshape(6, -1).var(1, correction=0).view(-1, 1, 1, 1)
    predicted = what * 1e-5 / (2 * var) * (1 - 1 / 3.7 ** 2)
    gap = ws(3.7 * w + 0.5) - what
    torch.testing.assert_close(gap, predicted, atol=0, rtol=2e-2)
    assert gap.abs().max() > 1e-4


@pytest.mark.parametrize("init", ["normal", "default"])
def test_gradient_identities(init):
    """Per raw row: the gradient sums to 0, and <dL/dW[o], W[o] - mu_o> = eps/(var_o+eps) <dL/dWhat[o], What[o]>."""
    torch.manual_seed(2)
    m = weight_standardization(nn.Conv2d(8, 6, 3, dtype=D))
    if init == "normal":
        with torch.no_grad():
            m.parametrizations.weight.original.normal_()
    raw = m.parametrizations.weight.original
    with parametrize.cached():  # one W_hat, used by the conv
        what = m.weight
        y = m(torch.randn(3, 8, 6, 6, dtype=D))
    loss = (y * torch.randn_like(y)).sum() + y.square().mean()
    g_what, g_raw = torch.autograd.grad(loss, (what, raw))
    rows, g_rows = raw.detach().reshape(6, -1), g_raw.reshape(6, -1)
    scale = g_rows.abs().sum(1)
    assert (g_rows.sum(1).abs() / scale).max() < 1e-13
    var = rows.var(1, correction=0)
    lhs = (g_rows * (rows - rows.mean(1, keepdim=True))).sum(1)
    rhs = 1e-5 / (var + 1e-5) * (g_what.reshape(6, -1) * what.detach().reshape(6, -1)).sum(1)
    terms = (g_rows * (rows - rows.mean(1, keepdim=True))).abs().sum(1)  # lhs cancels: rounding ~1e-16 * terms
    assert ((lhs - rhs).abs() <= 1e-10 * rhs.abs() + 1e-13 * terms).all(), (lhs - rhs) / rhs
    assert lhs.abs().max() > 1e-6  # not orthogonal at eps=1e-5
    ws12 = WeightStandardization(eps=1e-12)
    raw12 = raw.detach().clone().requires_grad_()
    w12 = ws12(raw12)
    (g12,) = torch.autograd.grad((w12 * torch.randn_like(w12)).sum(), raw12)
    inner = (g12.reshape(6, -1) * (rows - rows.mean(1, keepdim=True))).sum(1)
    assert inner.abs().max() <= 1e-8


@pytest.mark.parametrize("kw", [{}, {"unbiased": True}, {"eps_outside_sqrt": True}])
def test_gradcheck(kw):
    w = torch.randn(2, 8, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(WeightStandardization(**kw), (w,))


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Conv1d(4, 6, 3, dtype=D), torch.randn(2, 4, 7, dtype=D)),
    (lambda: nn.Conv3d(4, 6, 2, groups=2, dtype=D), torch.randn(2, 4, 3, 3, 3, dtype=D)),
    (lambda: nn.Linear(5, 3, dtype=D), torch.randn(2, 5, dtype=D)),
    (lambda: nn.Conv2d(4, 4, 3, groups=4, dtype=D), torch.randn(2, 4, 5, 5, dtype=D)),
], ids=["conv1d", "conv3d-grouped", "linear", "depthwise"])
def test_other_layers_standardize_each_stored_row(make, x):
    m = make()
    raw = m.weight.detach().clone()
    y = weight_standardization(m)(x)
    ref = torch.func.functional_call(make(), {"weight": hand_ws(raw), "bias": m.bias}, (x,))
    torch.testing.assert_close(y, ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(1, 4, 1), lambda: nn.Conv2d(4, 4, 1, groups=4),
                                  lambda: nn.Linear(1, 3)], ids=["1x1-one-input", "depthwise-1x1", "linear-1"])
def test_fan_in_one_raises(make):
    m = make()
    with pytest.raises(ValueError, match="weight standardization needs fan-in > 1"):
        weight_standardization(m)
    assert not parametrize.is_parametrized(m)
    with pytest.raises(ValueError, match="weight standardization needs fan-in > 1"):
        WeightStandardization(unbiased=True)(m.weight)


def test_other_errors():
    with pytest.raises(TypeError, match="transposed"):
        weight_standardization(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(ValueError, match="not initialized"):
        weight_standardization(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match="no tensor named 'kernel'"):
        weight_standardization(nn.Conv2d(4, 4, 3), "kernel")
    with pytest.raises(ValueError, match="at least 2 dims"):
        weight_standardization(nn.Conv2d(4, 4, 3), "bias")
    with pytest.raises(ValueError, match="eps"):
        WeightStandardization(eps=-1.0)
    with pytest.raises(TypeError, match="unbiased"):
        WeightStandardization(unbiased=1)
    m = weight_standardization(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="already has weight standardization"):
        weight_standardization(m)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Sequential(nn.Conv1d(8, 8, 3), nn.Conv3d(8, 4, 1)), nn.Linear(4, 2))


def test_add_weight_standardization_changes_every_conv_once():
    model = make_model()
    weight_standardization(model[3][0])
    names = add_weight_standardization(model, eps=1e-6)
    assert names == ["0", "3.1"]
    assert [type(p) for p in model[0].parametrizations.weight] == [WeightStandardization]
    assert model[0].parametrizations.weight[0].eps == 1e-6
    assert not parametrize.is_parametrized(model[4])  # Linear is not a conv
    assert add_weight_standardization(model) == []
    whole = add_weight_standardization(nn.Conv2d(2, 2, 3))
    assert whole == [""]


def test_add_weight_standardization_leaves_model_untouched_on_error():
    model = make_model()
    model.append(nn.Conv2d(4, 4, 1, groups=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"fan-in > 1 \(5\)"):
        add_weight_standardization(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert before.keys() == model.state_dict().keys()


def test_output_does_not_depend_on_raw_weight_scale():
    """The sheet's weaker property: a WS conv at init gives the same outputs with the raw weight x100, up to
    the eps effect, relative to the output scale ~2e-3 at eps=1e-5 (eps / (2 var_o), var_o ~ 1/(3n), n = 72)
    and ~2e-10 at eps=1e-12; without WS the outputs scale by 100."""
    x = torch.randn(4, 8, 6, 6, dtype=D)
    for eps, low, high in ((1e-5, 1e-4, 5e-3), (1e-12, 0.0, 1e-9)):
        a, b = weight_standardization(conv(), eps=eps), weight_standardization(conv(), eps=eps)
        with torch.no_grad():
            b.parametrizations.weight.original.mul_(100.0)
        ya = a(x)
        rel = ((ya - b(x)).abs().max() / ya.abs().max()).item()
        assert low < rel < high, (eps, rel)
    plain, scaled = conv(), conv()
    with torch.no_grad():
        scaled.weight.mul_(100.0)
    assert (plain(x) - scaled(x)).abs().max() > 1.0


def test_zero_row_standardizes_to_zero_with_finite_gradients():
    for kw in ({}, {"eps_outside_sqrt": True}, {"unbiased": True, "eps_outside_sqrt": True}):
        w = torch.randn(3, 4, 3, 3, dtype=D)
        w[1] = 0.5
        w.requires_grad_()
        what = WeightStandardization(**kw)(w)
        assert torch.equal(what[1], torch.zeros_like(what[1]))
        (g,) = torch.autograd.grad((what * torch.randn_like(what)).sum(), w)
        assert torch.isfinite(g).all(), kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_moments_in_float32(dtype):
    m = weight_standardization(nn.Conv2d(8, 6, 3, dtype=dtype))
    raw = m.parametrizations.weight.original
    assert m.weight.dtype == dtype
    expected = hand_ws(raw.detach().float()).to(dtype)
    assert torch.equal(m.weight, expected)


def test_optimizer_updates_raw_weight():
    m = weight_standardization(conv())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    raw_before = m.parametrizations.weight.original.detach().clone()
    m(torch.randn(2, 8, 5, 5, dtype=D)).square().sum().backward()
    opt.step()
    raw = m.parametrizations.weight.original.detach()
    assert not torch.equal(raw, raw_before)
    torch.testing.assert_close(m.weight, hand_ws(raw), atol=1e-13, rtol=0)


def test_state_dict_round_trip_through_bytes():
    m = weight_standardization(conv(), eps=1e-6)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = weight_standardization(conv(seed=3), eps=1e-6)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(1, 8, 4, 4, dtype=D)
    assert torch.equal(other(x), m(x))


def test_torch_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = weight_standardization(nn.Conv2d(4, 6, 3))
    comp_module = weight_standardization(nn.Conv2d(4, 6, 3))
    comp_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp_module, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5)
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(comp_module.parametrizations.weight.original.grad,
                               eager.parametrizations.weight.original.grad, atol=1e-5, rtol=1e-5)


def test_repr():
    assert "eps=1e-05, unbiased=False, eps_outside_sqrt=False" in repr(WeightStandardization())
