import copy
import math

import adamp as official
import pytest
import pytorch_optimizer
import torch
import torch.nn.functional as F
from torch import nn

from normlab.optim import adamp as mod
from normlab.optim.adamp import SGDP, AdamP, effective_step_size, is_scale_invariant, project_radial


class Net(nn.Module):
    """Scale-invariant conv weights (BatchNorm), a scale-invariant Linear (LayerNorm over the whole layer
    only), a plain head and biases: every branch of the projection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.lin = nn.Linear(8 * 16, 32, bias=False)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(F.relu(self.ln(self.lin(x))))


def _batches(steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(steps)]


def _train(make, dtype, steps, seed=0):
    torch.manual_seed(seed)
    model = Net().to(dtype)
    opt = make(model.parameters())
    for x, y in _batches(steps, dtype, seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


@pytest.fixture
def fired(monkeypatch):
    """Record ``(shape, view)`` of every scale-invariance test the optimizers run."""
    seen = []
    original = mod._radial_view

    def recording(w, g, dot, delta, eps):
        view = original(w, g, dot, delta, eps)
        seen.append((tuple(w.shape), int(view)))
        return view

    monkeypatch.setattr(mod, "_radial_view", recording)
    return seen


_REFERENCES = {}


def _reference(cls, dtype, steps, **kw):
    """The official optimizer's trajectory, computed once per configuration."""
    key = (cls.__name__, dtype, steps, tuple(sorted(kw.items())))
    if key not in _REFERENCES:
        lr = 1e-2 if cls is official.AdamP else 0.1
        _REFERENCES[key] = _train(lambda p: cls(p, lr=lr, **kw), dtype, steps)[0]
    return _REFERENCES[key]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- the official adamp package, step by step ------------------------------------------------------------

# every configuration on one of the two paths, alternating (foreach == loop is tested bit for bit below)
ADAMP_CASES = [(dict(), False), (dict(nesterov=True), True), (dict(weight_decay=1e-2), True),
               (dict(nesterov=True, weight_decay=1e-2), False)]
SGDP_CASES = [(dict(momentum=0.9), False), (dict(momentum=0.9), True), (dict(momentum=0.9, nesterov=True), True),
              (dict(momentum=0.9, dampening=0.1), False), (dict(momentum=0.9, weight_decay=1e-3), True),
              (dict(momentum=0.9, nesterov=True, weight_decay=1e-3), False)]


@pytest.mark.parametrize("kw, foreach", ADAMP_CASES)
def test_adamp_equals_official_float64_100_steps(kw, foreach, fired):
    ours, _ = _train(lambda p: AdamP(p, lr=1e-2, foreach=foreach, **kw), torch.float64, 100)
    views = {(shape, view) for shape, view in fired}
    assert _max_diff(ours, _reference(official.AdamP, torch.float64, 100, **kw)) < 1e-10
    # the model exercises both views: conv weights behind BatchNorm per channel, the LayerNorm'd Linear per layer
    assert ((8, 3, 3, 3), mod._CHANNEL) in views and ((32, 128), mod._LAYER) in views


@pytest.mark.parametrize("kw, foreach", ADAMP_CASES)
def test_adamp_equals_official_float32_20_steps(kw, foreach):
    ours, _ = _train(lambda p: AdamP(p, lr=1e-2, foreach=foreach, **kw), torch.float32, 20)
    assert _max_diff(ours, _reference(official.AdamP, torch.float32, 20, **kw)) < 1e-6


@pytest.mark.parametrize("kw, foreach", SGDP_CASES)
def test_sgdp_equals_official_float64_100_steps(kw, foreach, fired):
    ours, _ = _train(lambda p: SGDP(p, lr=0.1, foreach=foreach, **kw), torch.float64, 100)
    views = {(shape, view) for shape, view in fired}
    assert _max_diff(ours, _reference(official.SGDP, torch.float64, 100, **kw)) < 1e-10
    assert ((8, 3, 3, 3), mod._CHANNEL) in views and ((32, 128), mod._LAYER) in views


@pytest.mark.parametrize("kw, foreach", SGDP_CASES)
def test_sgdp_equals_official_float32_20_steps(kw, foreach):
    ours, _ = _train(lambda p: SGDP(p, lr=0.1, foreach=foreach, **kw), torch.float32, 20)
    assert _max_diff(ours, _reference(official.SGDP, torch.float32, 20, **kw)) < 1e-6


def test_unprojected_sgdp_buffer_would_be_caught():
    """The reference test can fail: projecting a copy of the buffer (the paper's pseudo-code, and
    pytorch-optimizer's SGDP) moves the parameters far from the official code."""
    ref = _reference(official.SGDP, torch.float32, 20, momentum=0.9)
    copy_projected, _ = _train(lambda p: pytorch_optimizer.SGDP(p, lr=0.1, momentum=0.9), torch.float32, 20)
    assert _max_diff(copy_projected, ref) > 1e-2
    nesterov_po, _ = _train(lambda p: pytorch_optimizer.SGDP(p, lr=0.1, momentum=0.9, nesterov=True),
                            torch.float32, 20)
    # with Nesterov the update is a new tensor in both, and they agree
    assert _max_diff(nesterov_po, _reference(official.SGDP, torch.float32, 20, momentum=0.9, nesterov=True)) < 1e-6


def test_pytorch_optimizer_adamp_adds_eps_before_the_bias_correction():
    """Documented difference: pytorch-optimizer's first AdamP step is ``lr g / (|g| + eps / sqrt(1 - beta2))``,
    the official one ``lr g / (|g| + eps)`` (delta = 0: no projection), so entries with small |g| differ."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 288, generator=gen, dtype=torch.float64)
    g = torch.randn(64, 288, generator=gen, dtype=torch.float64) * torch.logspace(-7, 0, 288, dtype=torch.float64)
    lr, eps, beta2 = 1e-2, 1e-8, 0.999
    steps = {}
    for name, cls in (("official", official.AdamP), ("ours", AdamP), ("po", pytorch_optimizer.AdamP)):
        p = nn.Parameter(w0.clone())
        p.grad = g.clone()
        cls([p], lr=lr, eps=eps, delta=0.0).step()
        steps[name] = p.detach() - w0
    torch.testing.assert_close(steps["official"], -lr * g / (g.abs() + eps), rtol=1e-10, atol=0)
    torch.testing.assert_close(steps["ours"], steps["official"], rtol=1e-10, atol=0)
    torch.testing.assert_close(steps["po"], -lr * g / (g.abs() + eps / math.sqrt(1 - beta2)), rtol=1e-10, atol=0)
    assert (steps["po"] - steps["official"]).abs().max() > 0.5 * lr  # where |g| ~ eps the steps differ by ~lr


# --- delta = 0: the test never fires, AdamP is AdamW and SGDP is SGD ----------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_delta_zero_adamp_is_adamw(weight_decay, foreach):
    ours, _ = _train(lambda p: AdamP(p, lr=1e-2, weight_decay=weight_decay, delta=0.0, foreach=foreach),
                     torch.float32, 20)
    ref, _ = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=weight_decay), torch.float32, 20)
    assert _max_diff(ours, ref) < 1e-6


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_delta_zero_sgdp_is_sgd(nesterov, foreach):
    ours, _ = _train(lambda p: SGDP(p, lr=0.1, momentum=0.9, nesterov=nesterov, delta=0.0, foreach=foreach),
                     torch.float32, 20)
    ref, _ = _train(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=nesterov), torch.float32, 20)
    assert _max_diff(ours, ref) < 1e-6


# --- the geometry of the projection ----------------------------------------------------------------------

def _lockstep(model_fn, make, steps, dtype=torch.float64, seed=0):
    """Train ``model_fn()`` and yield (before, after, grad, optimizer state before) per step, per parameter."""
    torch.manual_seed(seed)
    model = model_fn().to(dtype)
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 32, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        states = {n: copy.deepcopy(opt.state[p]) for n, p in model.named_parameters()}
        opt.step()
        yield before, {n: p.detach().clone() for n, p in model.named_parameters()}, grads, states


def _ln_model():
    return nn.Sequential(nn.Linear(32, 64, bias=False), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("foreach", [False, True])
def test_layernorm_linear_update_is_orthogonal_to_the_whole_weight(foreach, fired):
    """W (64x32) followed by LayerNorm is invariant only to scaling the whole W: the layer view fires, the
    update is orthogonal to W as a whole and the norm grows only by ||delta||^2."""
    n_row_cos = []
    for before, after, _, _ in _lockstep(_ln_model, lambda p: AdamP(p, lr=1e-2, foreach=foreach), 20):
        w, delta = before["0.weight"], after["0.weight"] - before["0.weight"]
        assert abs((w * delta).sum()) < 1e-6 * w.norm() * delta.norm()
        assert after["0.weight"].norm().item() ** 2 == pytest.approx(w.norm().item() ** 2 + delta.norm().item() ** 2,
                                                                     rel=1e-5)
        n_row_cos.append(F.cosine_similarity(w, delta, dim=1).abs().max().item())
    assert ((64, 32), mod._LAYER) in fired and ((64, 32), mod._CHANNEL) not in fired
    assert max(n_row_cos) > 1e-2  # per-row orthogonality does not hold for the layer view


def _bn_model():
    return nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4, 10))


@pytest.mark.parametrize("opt_fn", [lambda p: AdamP(p, lr=1e-2), lambda p: SGDP(p, lr=0.1, momentum=0.9)])
def test_batchnorm_conv_update_is_orthogonal_per_channel(opt_fn, fired):
    for before, after, _, _ in _lockstep(_bn_model, opt_fn, 20):
        w, delta = before["1.weight"].flatten(1), (after["1.weight"] - before["1.weight"]).flatten(1)
        cos = (w * delta).sum(1) / (w.norm(dim=1) * delta.norm(dim=1))
        assert cos.abs().max() < 1e-7
    assert all(view == mod._CHANNEL for shape, view in fired if shape == (6, 2, 3, 3))


def _adamw_reference(p, g, state, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """AdamW written out: the parameter after one step from ``state`` (empty = zeros)."""
    m = state.get("exp_avg", torch.zeros_like(p))
    v = state.get("exp_avg_sq", torch.zeros_like(p))
    t = state["step"].item() + 1 if state else 1
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2 ** t) + eps
    return p * (1 - lr * weight_decay) - lr / (1 - beta1 ** t) * m / denom


@pytest.mark.parametrize("seed", range(3))
def test_unprojected_head_steps_are_adamw_steps(seed, fired):
    """The head is not scale invariant; on steps where neither view fires, its step is AdamW's."""
    unprojected = 0
    for before, after, grads, states in _lockstep(_ln_model, lambda p: AdamP(p, lr=1e-2, weight_decay=1e-2),
                                                  20, seed=seed):
        head_views = [view for shape, view in fired if shape == (10, 64)]
        if head_views[-1] == mod._NONE:
            unprojected += 1
            expected = _adamw_reference(before["3.weight"], grads["3.weight"], states["3.weight"], lr=1e-2,
                                        weight_decay=1e-2)
            torch.testing.assert_close(after["3.weight"], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(after["3.bias"], _adamw_reference(before["3.bias"], grads["3.bias"],
                                                                     states["3.bias"], lr=1e-2, weight_decay=1e-2),
                                   rtol=1e-12, atol=1e-14)
    assert unprojected >= 15


def test_heavy_ball_norm_growth_identity_and_its_removal():
    """Paper, Sec. 2: on f(w) = h(w / ||w||), heavy-ball momentum grows the norm by
    eta^2 ||p_t||^2 + 2 eta^2 sum_{k<t} beta^{t-k} ||p_k||^2 per step; SGDP's projection leaves eta^2 ||u_t||^2."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    eta, beta = 0.5, 0.9

    def loss(w):
        return ((w / w.norm() - target / target.norm()) ** 2).sum() + (w / w.norm())[0].sum() ** 3

    for delta in (0.0, 0.1):
        w = nn.Parameter(w0.clone())
        opt = SGDP([w], lr=eta, momentum=beta, delta=delta)
        history = []
        for t in range(30):
            w.grad = None
            loss(w).backward()
            norm_sq = w.detach().norm() ** 2
            opt.step()
            p_t = opt.state[w]["momentum"]
            history.append(p_t.norm() ** 2)
            growth = w.detach().norm() ** 2 - norm_sq
            if delta == 0.0:
                expected = eta ** 2 * history[t] + 2 * eta ** 2 * sum(beta ** (t - k) * history[k] for k in range(t))
                assert growth.item() == pytest.approx(expected.item(), rel=1e-8)
            else:  # the layer view fires (the gradient is orthogonal to w as a whole) and u = Pi(p_t) is stored;
                # exact up to the eps added to ||w|| in the projection
                assert growth.item() == pytest.approx(eta ** 2 * history[t].item(), rel=1e-6)
        if delta == 0.0:
            heavy_ball_growth = w.detach().norm() / w0.norm()
        else:
            assert w.detach().norm() / w0.norm() < heavy_ball_growth


# --- state: what is stored, foreach == loop ---------------------------------------------------------------

def test_sgdp_stores_the_projected_buffer_without_nesterov_only(fired):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    g1 = torch.randn(6, 5, generator=gen, dtype=torch.float64)  # not scale invariant: no projection
    g2 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for nesterov in (False, True):
        w = nn.Parameter(w0.clone())
        opt = SGDP([w], lr=0.1, momentum=0.9, nesterov=nesterov)
        w.grad = g1.clone()
        opt.step()
        w_mid = w.detach().clone()
        buf1 = opt.state[w]["momentum"].clone()
        torch.testing.assert_close(buf1, g1, rtol=0, atol=0)
        # per-row orthogonal to w: the channel view fires
        w.grad = g2 - (g2 * w_mid).sum(1, keepdim=True) * w_mid / (w_mid * w_mid).sum(1, keepdim=True)
        g = w.grad.clone()
        opt.step()
        raw = 0.9 * buf1 + g
        update = (w_mid - w.detach()) / 0.1
        if nesterov:
            torch.testing.assert_close(opt.state[w]["momentum"], raw, rtol=1e-14, atol=0)
            expected, projected = project_radial(w_mid, g, g + 0.9 * raw)
        else:
            expected, projected = project_radial(w_mid, g, raw)
            torch.testing.assert_close(opt.state[w]["momentum"], expected, rtol=1e-12, atol=1e-15)
            assert (expected - raw).abs().max() > 0.1
        assert projected
        torch.testing.assert_close(update, expected, rtol=1e-9, atol=1e-12)
    assert [view for _, view in fired] == [mod._NONE, mod._CHANNEL, mod._CHANNEL] * 2  # step, step, project_radial


def test_adamp_moments_are_plain_moving_averages(fired):
    model = _ln_model().double()
    opt = AdamP(model.parameters(), lr=1e-2)
    m = v = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(8, 32, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = model[0].weight.grad
        m = 0.1 * g if m is None else 0.9 * m + 0.1 * g
        v = 0.001 * g * g if v is None else 0.999 * v + 0.001 * g * g
        opt.step()
    state = opt.state[model[0].weight]
    assert state["step"].item() == 5
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=0)
    assert ((64, 32), mod._LAYER) in fired


def _mixed_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 3, 3, 3), (64, 32), (10, 64), (10,), (5, 0), (4, 4), (1, 7)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    params[5].data.zero_()  # a zero weight: |cos| = 0 -> the test fires, the projection is a no-op
    return params


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    # the conv weight's gradient is orthogonal per output channel: the channel view fires
    w = params[0].detach().flatten(1)
    g = grads[0].flatten(1)
    grads[0] = (g - (g * w).sum(1, keepdim=True) * w / (w * w).sum(1, keepdim=True)).view_as(params[0])
    grads[-1] = None if step % 3 == 1 else grads[-1]  # a parameter without a gradient on some steps
    return grads


@pytest.mark.parametrize("make", [
    lambda ps, fe: AdamP([{"params": ps[:4]}, {"params": ps[4:], "lr": 3e-2, "weight_decay": 0.0}], lr=1e-2,
                         weight_decay=1e-2, foreach=fe),
    lambda ps, fe: AdamP(ps, lr=1e-2, weight_decay=1e-2, nesterov=True, foreach=fe),
    lambda ps, fe: SGDP([{"params": ps[:4]}, {"params": ps[4:], "lr": 0.3}], lr=0.1, momentum=0.9,
                        weight_decay=1e-3, foreach=fe),
    lambda ps, fe: SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=fe),
    lambda ps, fe: SGDP(ps, lr=0.1, momentum=0.5, dampening=0.2, foreach=fe),
], ids=["adamp-groups", "adamp-nesterov", "sgdp-groups", "sgdp-nesterov", "sgdp-dampening"])
def test_foreach_equals_single_tensor_loop_float64(make, fired):
    runs = []
    for foreach in (False, True):
        params = _mixed_params()
        opt = make(params, foreach)
        for step in range(10):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        runs.append((params, opt))
    (loop_params, loop_opt), (fe_params, fe_opt) = runs
    for a, b in zip(loop_params, fe_params):
        assert torch.equal(a, b)
        assert loop_opt.state[a].keys() == fe_opt.state[b].keys() != set()
        for key in loop_opt.state[a]:
            assert torch.equal(loop_opt.state[a][key], fe_opt.state[b][key]), key
    assert not torch.isnan(loop_params[5]).any()
    views = {view for shape, view in fired if shape == (8, 3, 3, 3)}
    assert views == {mod._CHANNEL} and ((4, 4), mod._CHANNEL) in fired


# --- the helpers --------------------------------------------------------------------------------------------

def _official_projection(w, g, u, delta=0.1, wd_ratio=0.1, eps=1e-8):
    out, wd = official.AdamP([nn.Parameter(w.clone())])._projection(w.clone(), g, u.clone(), delta, wd_ratio, eps)
    return out, wd == wd_ratio


def _cases():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, 3, generator=gen, dtype=torch.float64)
    u = torch.randn(16, 4, 3, generator=gen, dtype=torch.float64)
    g_rand = torch.randn(16, 4, 3, generator=gen, dtype=torch.float64)
    w2 = w.flatten(1)
    g_row = g_rand.flatten(1) - (g_rand.flatten(1) * w2).sum(1, keepdim=True) * w2 / (w2 * w2).sum(1, keepdim=True)
    g_layer = g_rand - (g_rand * w).sum() * w / (w * w).sum()
    return {"channel": (w, g_row.view_as(w), u, mod._CHANNEL), "layer": (w, g_layer, u, mod._LAYER),
            "none": (w, g_rand, u, mod._NONE), "parallel": (w, 2 * w, u, mod._NONE)}


@pytest.mark.parametrize("case", ["channel", "layer", "none", "parallel"])
def test_project_radial_matches_the_official_projection(case):
    w, g, u, expected_view = _cases()[case]
    u_before = u.clone()
    out, projected = project_radial(w, g, u)
    ref, ref_projected = _official_projection(w, g, u)
    assert projected == ref_projected == (expected_view != mod._NONE)
    assert int(mod._radial_view(w, g, None, 0.1, 1e-8)) == expected_view
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(u, u_before)  # the input update is not modified
    # orthogonal up to the eps added to the norm (w_hat = w / (||w|| + eps)): a relative residual ~eps/||w||
    row_cos = F.cosine_similarity(out.flatten(1), w.flatten(1), dim=1).abs()
    if expected_view == mod._CHANNEL:
        assert row_cos.max() < 1e-7
    if expected_view == mod._LAYER:
        assert F.cosine_similarity(out.flatten(), w.flatten(), dim=0).abs() < 1e-7 and row_cos.max() > 1e-2


def test_project_radial_threshold_is_delta_over_sqrt_row_length():
    """A row with |cos| just above delta/sqrt(D) fails the channel test, just below passes it."""
    d, delta = 64, 0.1
    w = torch.zeros(2, d, dtype=torch.float64)
    w[:, 0] = 1.0
    for factor, expected in ((0.999, True), (1.001, False)):
        cos = factor * delta / math.sqrt(d)
        g = torch.zeros(2, d, dtype=torch.float64)
        g[:, 0], g[:, 1] = cos, math.sqrt(1 - cos ** 2)
        assert (int(mod._radial_view(w, g, None, delta, 1e-8)) == mod._CHANNEL) is expected


def test_vectors_empty_and_zero_tensors():
    g = torch.randn(7, dtype=torch.float64)
    out, projected = project_radial(torch.randn(7, dtype=torch.float64), g, g)
    assert not projected and torch.equal(out, g)
    empty = torch.zeros(5, 0)
    out, projected = project_radial(empty, empty, empty)
    assert not projected and out.shape == (5, 0)
    u = torch.randn(4, 4, dtype=torch.float64)
    out, projected = project_radial(torch.zeros(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), u)
    assert projected and torch.equal(out, u)  # |cos| = 0 fires; the projection onto a zero vector is a no-op
    w = torch.randn(4, 4, dtype=torch.float64)
    out, projected = project_radial(w, torch.zeros(4, 4, dtype=torch.float64), u)  # zero gradient fires too
    assert projected and F.cosine_similarity(out, w, dim=1).abs().max() < 1e-7


def test_effective_step_size():
    w = torch.full((3, 4), 0.5)
    assert effective_step_size(w, 0.1).item() == pytest.approx(0.1 / 3.0)
    assert effective_step_size(w.bfloat16(), 0.1).dtype == torch.float32


def test_is_scale_invariant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(32, 5)
    running = model[1].running_mean.clone()
    assert is_scale_invariant(model, "0.weight", x)
    assert not is_scale_invariant(model, "3.weight", x)
    assert not is_scale_invariant(model.eval(), "0.weight", x)  # running statistics: not invariant
    assert torch.equal(model[1].running_mean, running) and model[1].num_batches_tracked.item() == 0
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        is_scale_invariant(model, "nope", x)


# --- dtypes and layouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls, kw", [(AdamP, dict(lr=1e-2, weight_decay=1e-2)),
                                     (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_steps_in_float32(dtype, cls, kw, foreach):
    """A half-precision step is the float32 step of the upcast tensors, rounded once."""
    params = _mixed_params(torch.float32)[:4]
    grads = [g.float() for g in _grads(params, 0)[:4]]
    low = [nn.Parameter(p.detach().to(dtype)) for p in params]
    high = [nn.Parameter(p.detach().to(dtype).float()) for p in params]
    for ps in (low, high):
        for p, g in zip(ps, grads):
            p.grad = g.to(dtype).to(p.dtype)
    opt_low, opt_high = cls(low, foreach=foreach, **kw), cls(high, foreach=foreach, **kw)
    opt_low.step()
    opt_high.step()
    for a, b in zip(low, high):
        assert a.dtype == dtype and torch.equal(a, b.detach().to(dtype))
        for key, value in opt_low.state[a].items():
            if key != "step":
                assert value.dtype == dtype and torch.equal(value, opt_high.state[b][key].to(dtype))


def test_channels_last_weight_steps_like_a_contiguous_one():
    conv = _mixed_params(torch.float64)[0]
    runs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = nn.Parameter(conv.detach().clone().to(memory_format=fmt))
        opt = SGDP([p], lr=0.1, momentum=0.9)
        for step in range(3):
            p.grad = _grads([conv] + _mixed_params()[1:], step)[0].to(memory_format=fmt)
            opt.step()
        runs.append(p.detach())
    assert runs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-14, atol=1e-15)


# --- validation -----------------------------------------------------------------------------------------------

def _param():
    return [nn.Parameter(torch.zeros(2, 2))]


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "Invalid lr: -1"), (dict(eps=-1e-8), "Invalid eps"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"), (dict(delta=-0.1), "Invalid delta"),
    (dict(wd_ratio=1.5), "Invalid wd_ratio"), (dict(wd_ratio=-0.1), "Invalid wd_ratio"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"), (dict(betas=(0.9, -0.1)), "index 1"),
])
def test_adamp_rejects_invalid_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamP(_param(), **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "Invalid lr: -1"), (dict(momentum=1.0), "Invalid momentum value: 1.0"),
    (dict(momentum=-0.1), "Invalid momentum"), (dict(dampening=-0.1), "Invalid dampening"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"), (dict(wd_ratio=2.0), "Invalid wd_ratio"),
    (dict(delta=float("nan")), "Invalid delta"), (dict(eps=-1.0), "Invalid eps"),
])
def test_sgdp_rejects_invalid_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SGDP(_param(), **{"lr": 0.1, **kw})


def test_sgdp_requires_lr_and_groups_are_validated():
    with pytest.raises(TypeError):
        SGDP(_param())
    opt = AdamP(_param())
    with pytest.raises(ValueError, match="Invalid wd_ratio"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "wd_ratio": 3.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="Invalid momentum"):
        SGDP([{"params": _param()}, {"params": _param(), "momentum": 1.0}], lr=0.1)


def test_defaults_follow_the_official_code():
    assert AdamP(_param()).defaults == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                                           wd_ratio=0.1, nesterov=False, foreach=None)
    assert SGDP(_param(), lr=0.1).defaults == dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                                   nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1, foreach=None)
