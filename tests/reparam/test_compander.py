import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.reparam.compander import (CompanderAdam, WeightCompander, add_weight_compander, compander_param_groups,
                                       compander_weight_decay, remove_weight_compander, weight_compander)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def psi(v, a, b):
    return a * torch.atan(v / b)


def dpsi(v, a, b):
    return a * b / (b ** 2 + v ** 2)


class Net(nn.Module):
    """Conv, BatchNorm, embedding, two Linears: a model no one tuned for the compander."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 4, dtype=dtype)
        self.conv = nn.Conv2d(1, 3, 3, padding=1, dtype=dtype)
        self.bn = nn.BatchNorm2d(3, dtype=dtype)
        self.fc = nn.Linear(3 * 4 * 4 + 4, 6, dtype=dtype)
        self.head = nn.Linear(6, 3, dtype=dtype)
        self.eval()  # BatchNorm on its running statistics: forward passes change no buffer

    def forward(self, x, idx):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.fc(torch.cat([h, self.emb(idx)], 1))))


def inputs(dtype=torch.float32):
    g = gen(1)
    return torch.randn(4, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 5, (4,), generator=g)


# ---- the function ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [(0.7, 0.8), (1.0, 0.6), (0.5, 1.0)])
def test_formula_odd_increasing_bounded(a, b):
    v = torch.randn(1000, generator=gen(), dtype=torch.float64) * 3
    comp = WeightCompander(a, b)
    w = comp(v)
    assert torch.equal(w, psi(v, a, b))
    assert torch.equal(comp(-v), -w)
    s = torch.linspace(-50, 50, 10001, dtype=torch.float64)
    assert (comp(s).diff() > 0).all()
    big = torch.tensor([-1e6, -1e3, 1e3, 1e6], dtype=torch.float64)
    assert (comp(big).abs() < a * math.pi / 2).all()
    assert (comp(big.float()).abs() <= a * math.pi / 2).all()
    assert comp(torch.zeros(3)).eq(0).all()


def test_derivatives_match_the_formulas_and_gradcheck():
    a0, b0 = 0.9, 0.7
    comp = WeightCompander(a0, b0, learnable=True, dtype=torch.float64)
    v = (torch.randn(50, generator=gen(), dtype=torch.float64) * 2).requires_grad_()
    w = comp(v)
    gv, ga, gb = torch.autograd.grad(w.sum(), (v, comp.a, comp.b))
    assert torch.allclose(gv, dpsi(v.detach(), a0, b0), atol=1e-12, rtol=0)
    assert torch.allclose(ga, torch.atan(v.detach() / b0).sum(), atol=1e-12, rtol=0)
    assert torch.allclose(gb, (-a0 * v.detach() / (b0 ** 2 + v.detach() ** 2)).sum(), atol=1e-12, rtol=0)
    # elementwise: d/da and d/db per entry via the Jacobian
    jac_a = torch.autograd.functional.jacobian(lambda a: a * torch.atan(v.detach() / comp.b.detach()), comp.a.detach())
    assert torch.allclose(jac_a, torch.atan(v.detach() / b0), atol=1e-12, rtol=0)
    assert torch.allclose(comp.derivative(v.detach()), dpsi(v.detach(), a0, b0), atol=1e-12, rtol=0)

    def f(v, a, b):
        c = WeightCompander(0.5, 1.0, learnable=True, dtype=torch.float64)
        return torch.func.functional_call(c, {"a": a, "b": b}, (v,))

    assert torch.autograd.gradcheck(f, (v[:8].detach().requires_grad_(), torch.tensor(a0, dtype=torch.float64,
                                    requires_grad=True), torch.tensor(b0, dtype=torch.float64, requires_grad=True)))


def test_slope_at_zero_and_decay_of_the_gradient_factor():
    comp = WeightCompander(1.0, 0.6)
    d = comp.derivative(torch.linspace(0, 20, 201, dtype=torch.float64))
    assert d[0].item() == pytest.approx(1.0 / 0.6, abs=1e-12)
    ratio = d / d[0]
    assert torch.allclose(ratio, 0.36 / (0.36 + torch.linspace(0, 20, 201, dtype=torch.float64) ** 2), atol=1e-12)
    assert (ratio.diff() < 0).all()


@pytest.mark.parametrize("fn,forward,inverse", [("arctan", torch.atan, torch.tan), ("arsinh", torch.asinh, torch.sinh),
                                                ("erf", torch.erf, torch.erfinv)])
def test_inverse_and_alternative_functions(fn, forward, inverse):
    a, b = 0.8, 0.6
    comp = WeightCompander(a, b, fn=fn)
    bound = {"arctan": a * math.pi / 2, "arsinh": math.inf, "erf": a}[fn]
    assert comp.bound() == pytest.approx(bound)
    w = (torch.rand(500, generator=gen(), dtype=torch.float64) * 2 - 1) * min(bound, 3.0) * 0.95
    v = comp.right_inverse(w)
    assert torch.allclose(v, b * inverse(w / a), atol=1e-12, rtol=0)
    assert torch.allclose(comp(v), w, atol=1e-12, rtol=0)
    assert torch.equal(comp(v), a * forward(v / b))
    vv = v.clone().requires_grad_()
    (g,) = torch.autograd.grad(comp(vv).sum(), vv)
    assert torch.allclose(comp.derivative(v), g, atol=1e-12, rtol=1e-10)


def test_right_inverse_rejects_weights_at_the_bound():
    comp = WeightCompander(0.5, 1.0)
    with pytest.raises(ValueError, match="max\\|w\\|"):
        comp.right_inverse(torch.tensor([0.1, 0.5 * math.pi / 2]))
    assert comp.right_inverse(torch.empty(0, 3)).shape == (0, 3)


def test_low_precision_computes_in_float32():
    comp = WeightCompander(0.7, 0.8)
    v = torch.randn(100, generator=gen())
    for dtype in (torch.float16, torch.bfloat16):
        w = comp(v.to(dtype))
        assert w.dtype == dtype
        assert torch.equal(w, psi(v.to(dtype).float(), 0.7, 0.8).to(dtype))


def test_constructor_errors():
    with pytest.raises(ValueError, match="a must be"):
        WeightCompander(a=0.0)
    with pytest.raises(ValueError, match="b must be"):
        WeightCompander(b=-1.0)
    with pytest.raises(TypeError, match="a must be a float"):
        WeightCompander(a="1")
    with pytest.raises(ValueError, match="unknown fn 'tanh'"):
        WeightCompander(fn="tanh")
    with pytest.raises(ValueError, match="b_min"):
        WeightCompander(b_min=0.1)
    with pytest.raises(TypeError, match="learnable"):
        WeightCompander(learnable="layer")


def test_b_min_clamps_a_learnable_b():
    comp = WeightCompander(1.0, 1.0, learnable=True, b_min=0.5, dtype=torch.float64)
    with torch.no_grad():
        comp.b.fill_(1e-4)
    v = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert torch.allclose(comp(v), torch.atan(v / 0.5), atol=1e-15)


# ---- registration ------------------------------------------------------------------------------------------

def test_chain_rule_against_an_unreparameterised_copy():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    weight_compander(layer, a=1.0, b=0.6)
    x = torch.randn(8, 6, generator=gen(), dtype=torch.float64)
    assert torch.allclose(layer.weight, plain.weight, atol=1e-12, rtol=0)
    v = layer.parametrizations.weight.original
    (gv,) = torch.autograd.grad(layer(x).pow(2).sum(), v)
    (gw,) = torch.autograd.grad(plain(x).pow(2).sum(), plain.weight)
    assert torch.allclose(gv, dpsi(v.detach(), 1.0, 0.6) * gw, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_add_keeps_outputs_and_scope(dtype, tol):
    model = Net(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, idx = inputs(dtype)
    ref = model(x, idx)
    names = add_weight_compander(model)
    assert names == ["conv", "fc", "head"]
    assert (model(x, idx) - ref).abs().max().item() <= tol
    for name in ("conv", "fc", "head"):
        assert parametrize.is_parametrized(getattr(model, name), "weight")
        assert not parametrize.is_parametrized(getattr(model, name), "bias")
    assert not parametrize.is_parametrized(model.emb) and not parametrize.is_parametrized(model.bn)
    sd = model.state_dict()
    assert "conv.parametrizations.weight.original" in sd and "conv.weight" not in sd
    for key in ("emb.weight", "bn.weight", "bn.bias", "conv.bias", "fc.bias", "bn.running_mean"):
        assert torch.equal(sd[key], before[key])
    v = sd["fc.parametrizations.weight.original"]
    assert torch.allclose(v, 0.8 * torch.tan(before["fc.weight"] / 0.7), atol=tol, rtol=0)
    # state_dict round trip into a fresh reparameterised model
    other = Net(dtype)
    add_weight_compander(other)
    other.load_state_dict(sd)
    assert torch.equal(other(x, idx), model(x, idx))


def test_add_is_idempotent_and_respects_types():
    model = Net()
    assert add_weight_compander(model, types=(nn.Conv2d,)) == ["conv"]
    assert add_weight_compander(model) == ["fc", "head"]
    assert add_weight_compander(model) == []
    with pytest.raises(ValueError, match="already has"):
        weight_compander(model.fc)


def test_bound_violation_names_the_layer_and_leaves_the_model_untouched():
    model = Net()
    with torch.no_grad():
        model.head.weight[0, 0] = 2.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(head\): max\|weight\| = 2"):
        add_weight_compander(model, a=1.0, b=0.6)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    add_weight_compander(model, a=1.5)  # 2 < 1.5 pi / 2
    with pytest.raises(ValueError, match="no tensor named"):
        weight_compander(nn.ReLU())
    with pytest.raises(ValueError, match="lazy"):
        weight_compander(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="learnable must be"):
        add_weight_compander(Net(), learnable="global")
    with pytest.raises(ValueError, match="a must be"):
        add_weight_compander(Net(), a=-1.0)


def test_empty_weight_is_a_no_op():
    with pytest.warns(UserWarning, match="zero-element"):
        layer = nn.Linear(0, 3)
    weight_compander(layer)
    assert layer(torch.randn(2, 0)).shape == (2, 3)


def test_remove_bakes_and_keeps_outputs():
    model = Net(torch.float64)
    x, idx = inputs(torch.float64)
    add_weight_compander(model, learnable="layer")
    with torch.no_grad():
        model.fc.parametrizations.weight.original.mul_(3.0)  # a non-trivial v
        model.fc.parametrizations.weight[0].a.fill_(-1.2)
    ref = model(x, idx)
    expected = model.fc.weight.detach().clone()
    assert remove_weight_compander(model) == ["conv.weight", "fc.weight", "head.weight"]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model.fc) is nn.Linear and torch.equal(model.fc.weight, expected)
    assert torch.allclose(model(x, idx), ref, atol=1e-12, rtol=0)


def test_learnable_layer_and_network_modes():
    model = Net()
    add_weight_compander(model, learnable="layer")
    comps = [getattr(model, n).parametrizations.weight[0] for n in ("conv", "fc", "head")]
    assert len({id(c) for c in comps}) == 3
    assert all(c.learnable and c.a.item() == 0.5 and c.b.item() == 1.0 for c in comps)
    x, idx = inputs()
    grads = torch.autograd.grad(model(x, idx).pow(2).sum(), [p for c in comps for p in (c.a, c.b)])
    assert all(g.abs() > 0 for g in grads)

    net = Net()
    add_weight_compander(net, learnable="network", a=0.9, b=0.7)
    comps = [getattr(net, n).parametrizations.weight[0] for n in ("conv", "fc", "head")]
    assert comps[0] is comps[1] is comps[2]
    named = dict(net.named_parameters())
    assert sum(p is comps[0].a for p in named.values()) == 1  # deduplicated for optimizers
    (ga,) = torch.autograd.grad(net(x, idx).pow(2).sum(), comps[0].a)
    assert ga.abs() > 0


# ---- weight decay and param groups --------------------------------------------------------------------------

def test_compander_weight_decay_adds_lam_psi_dpsi_to_grad_v():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    add_weight_compander(model, a=1.0, b=0.6)
    x = torch.randn(6, 5, generator=gen(), dtype=torch.float64)
    vs = [model[i].parametrizations.weight.original for i in (0, 2)]
    lam = 3e-2
    g0 = torch.autograd.grad(model(x).sum(), vs)
    g1 = torch.autograd.grad(model(x).sum() + compander_weight_decay(model, lam), vs)
    for v, a, b in zip(vs, g0, g1):
        assert torch.allclose(b - a, lam * psi(v.detach(), 1.0, 0.6) * dpsi(v.detach(), 1.0, 0.6), atol=1e-12)
    pen = compander_weight_decay(model, lam)
    assert pen.item() == pytest.approx(lam / 2 * sum(psi(v.detach(), 1.0, 0.6).pow(2).sum().item() for v in vs))
    with pytest.raises(ValueError, match="no fixed"):
        compander_weight_decay(nn.Linear(2, 2), lam)
    with pytest.raises(ValueError, match="Invalid lam"):
        compander_weight_decay(model, -1.0)


def test_param_groups_follow_the_paper_decay_rules():
    model = Net()
    add_weight_compander(model, learnable="layer")
    groups = {g["name"]: g for g in compander_param_groups(model, 1e-4)}
    assert set(groups) == {"compander_v", "compander_ab", "other"}
    assert groups["compander_v"]["weight_decay"] == 1e-4 and groups["other"]["weight_decay"] == 1e-4
    assert groups["compander_ab"]["weight_decay"] == 0.0
    assert len(groups["compander_v"]["params"]) == 3 and len(groups["compander_ab"]["params"]) == 6
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD(list(groups.values()), lr=0.1)  # a valid param-group list

    fixed = Net()
    add_weight_compander(fixed)
    groups = {g["name"]: g for g in compander_param_groups(fixed, 1e-4)}
    assert set(groups) == {"compander_v_fixed", "other"} and groups["compander_v_fixed"]["weight_decay"] == 0.0

    shared = Net()
    add_weight_compander(shared, learnable="network")
    groups = {g["name"]: g for g in compander_param_groups(shared, 1e-4)}
    assert len(groups["compander_ab"]["params"]) == 2


# ---- CompanderAdam -----------------------------------------------------------------------------------------

def hand_adam(g, m, s, t, lr, b1, b2, eps):
    m = b1 * m + (1 - b1) * g
    s = b2 * s + (1 - b2) * g * g
    update = -lr * (m / (1 - b1 ** t)) / ((s / (1 - b2 ** t)).sqrt() + eps)
    return update, m, s


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_compander_adam_steps_match_a_hand_written_adam(wd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    add_weight_compander(model, a=1.0, b=0.6)
    x = torch.randn(6, 5, generator=gen(), dtype=torch.float64)
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    params = [t for i in (0, 2) for t in (model[i].parametrizations.weight.original, model[i].bias)]
    opt = CompanderAdam(params, model, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    raw = {id(model[i].parametrizations.weight.original) for i in (0, 2)}
    ref = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    ss = [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        # the effective weight's gradient from an unreparameterised copy with the same effective weights
        plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        with torch.no_grad():
            plain[0].weight.copy_(psi(ref[0], 1.0, 0.6)), plain[0].bias.copy_(ref[1])
            plain[2].weight.copy_(psi(ref[2], 1.0, 0.6)), plain[2].bias.copy_(ref[3])
        g_plain = torch.autograd.grad(plain(x).pow(2).sum(), list(plain.parameters()))
        for i, p in enumerate(params):
            g = g_plain[i] + wd * (psi(ref[i], 1.0, 0.6) if id(p) in raw else ref[i])
            u, ms[i], ss[i] = hand_adam(g, ms[i], ss[i], t, lr, b1, b2, eps)
            ref[i] = ref[i] + (dpsi(ref[i], 1.0, 0.6) * u if id(p) in raw else u)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        for p, r in zip(params, ref):
            assert torch.allclose(p, r, atol=1e-12, rtol=1e-10)


def test_compander_adam_state_dict_resumes_bit_exactly_and_errors():
    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
        add_weight_compander(model, learnable="layer")
        return model, CompanderAdam(compander_param_groups(model, 0.0), model, lr=1e-2)

    x = torch.randn(6, 5, generator=gen())

    def step(model, opt):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()

    m1, o1 = setup()
    for _ in range(3):
        step(m1, o1)
    m2, o2 = setup()
    for _ in range(2):
        step(m2, o2)
    m3, o3 = setup()
    m3.load_state_dict(m2.state_dict())
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    step(m3, o3)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="Invalid lr"):
        CompanderAdam(m1.parameters(), m1, lr=-1)
    with pytest.raises(ValueError, match="beta"):
        CompanderAdam(m1.parameters(), m1, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="model must be"):
        CompanderAdam(m1.parameters(), None)


def test_plain_adam_cancels_the_factor_but_compander_adam_keeps_it():
    """Why the modified step exists: on the first step plain Adam moves every v by ~lr whatever Psi'(v) is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    add_weight_compander(model, a=1.0, b=0.6)
    x = torch.randn(6, 5, generator=gen(), dtype=torch.float64)
    v = model[0].parametrizations.weight.original
    start = v.detach().clone()
    opt = CompanderAdam([v], model, lr=1e-3)
    model(x).sum().backward()
    opt.step()
    assert torch.allclose((v.detach() - start).abs(), 1e-3 * dpsi(start, 1.0, 0.6), rtol=1e-4)
