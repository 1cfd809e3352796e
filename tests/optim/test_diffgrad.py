import copy
import functools

import numpy as np
import pytest
import torch
from pytorch_optimizer import DiffGrad as PODiffGrad
from pytorch_optimizer.base.optimizer import BaseOptimizer
from torch import nn

from normlab.optim.diffgrad import DiffGrad, diffgrad, friction

LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "previous_grad")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_step(theta, g, m, v, g_prev, t, *, lr=LR, b1=B1, b2=B2, eps=EPS, wd=0.0, decoupled=False):
    """diffGrad_v2 written out in numpy float64: returns (theta, m, v, g_prev) after step t (1-based)."""
    if wd and decoupled:
        theta = theta * (1 - lr * wd)
    elif wd:
        g = g + wd * theta
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    xi = sigmoid(np.abs(g_prev - g))
    theta = theta - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m * xi / (np.sqrt(v) + eps)
    return theta, m, v, g.copy()


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


# --- the update rule, derived by hand ----------------------------------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
def test_first_step_from_zero_state(foreach):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    p = nn.Parameter(theta0.clone())
    opt = DiffGrad([p], lr=LR, foreach=foreach)
    step_with(opt, [p], [g])
    # t = 1: m = (1-b1) g, v = (1-b2) g^2, xi = sigmoid(|g|)
    expected = -LR * np.sqrt(1 - B2) / (1 - B1) * (1 - B1) * g.numpy() * sigmoid(np.abs(g.numpy())) / (
        np.sqrt(1 - B2) * np.abs(g.numpy()) + EPS)
    np.testing.assert_allclose((p.detach() - theta0).numpy(), expected, rtol=1e-7, atol=0)
    state = opt.state[p]
    assert state["step"].item() == 1 and state["step"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"], (1 - B1) * g, rtol=1e-15, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - B2) * g * g, rtol=1e-15, atol=0)
    assert torch.equal(state["previous_grad"], g)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_two_steps_match_the_written_out_rule(foreach, wd, decoupled):
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    p = nn.Parameter(theta.clone())
    opt = DiffGrad([p], lr=LR, weight_decay=wd, decoupled_weight_decay=decoupled, foreach=foreach)
    ref = (theta.numpy(), np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 3)))
    for t, g in enumerate(grads, start=1):
        step_with(opt, [p], [g])
        ref = reference_step(*ref[:1], g.numpy(), *ref[1:], t, wd=wd, decoupled=decoupled)
        np.testing.assert_allclose(p.detach().numpy(), ref[0], rtol=1e-13, atol=1e-15)
        for key, value in zip(("exp_avg", "exp_avg_sq", "previous_grad"), ref[1:]):
            np.testing.assert_allclose(opt.state[p][key].numpy(), value, rtol=1e-13, atol=1e-17)
    # the reference stores the L2-augmented gradient (coupled) or the raw one (decoupled); say it directly
    assert torch.equal(opt.state[p]["previous_grad"], grads[-1]) == (decoupled or wd == 0)


def test_constant_gradient_gives_half_of_adam_from_step_two():
    """xi = sigmoid(0) = 0.5 exactly once the gradient stops changing: half an Adam step (same eps placement)."""
    c = torch.tensor([0.3, -2.0, 1e-3, 5.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = DiffGrad([p], lr=LR)
    m = v = np.zeros(4)
    for t in range(1, 8):
        before = p.detach().clone()
        step_with(opt, [p], [c])
        m = B1 * m + (1 - B1) * c.numpy()
        v = B2 * v + (1 - B2) * c.numpy() ** 2
        adam = -LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
        xi = sigmoid(np.abs(c.numpy())) if t == 1 else 0.5
        np.testing.assert_allclose((p.detach() - before).numpy(), xi * adam, rtol=1e-7, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_step_is_adam_step_scaled_by_friction(foreach):
    """Given identical gradient histories, diffGrad's step is xi * Adam's (same m, v, eps placement), so
    |step| <= |Adam step| elementwise; xi comes from the gradients alone."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) * 10 ** (k % 3 - 1) for k in range(12)]
    p = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = DiffGrad([p], lr=LR, foreach=foreach)
    m = v = torch.zeros(6, 5, dtype=torch.float64)
    previous = torch.zeros(6, 5, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        before = p.detach().clone()
        step_with(opt, [p], [g])
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        adam = -LR * (1 - B2 ** t) ** 0.5 / (1 - B1 ** t) * m / (v.sqrt() + EPS)
        step = p.detach() - before
        xi = friction(g, previous)
        torch.testing.assert_close(step, xi * adam, rtol=1e-12, atol=1e-18)
        assert torch.all(step.abs() <= adam.abs())
        previous = g


def test_friction_helper():
    g = torch.tensor([0.0, 1.0, -3.0, 2.0, 1e-3], dtype=torch.float64)
    prev = torch.tensor([0.0, -1.0, -3.0, 1.0, 0.0], dtype=torch.float64)
    xi = friction(g, prev)
    expected = 1 / (1 + np.exp(-np.abs(prev.numpy() - g.numpy())))
    np.testing.assert_allclose(xi.numpy(), expected, rtol=1e-15)
    assert xi[0] == 0.5 and xi[2] == 0.5  # equal gradients: exactly half
    assert torch.all((xi >= 0.5) & (xi < 1))
    assert torch.equal(friction(g, prev), friction(prev, g))


# --- the official bug and state handling -------------------------------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
def test_previous_grad_is_stored_by_value_when_grads_are_zeroed_in_place(foreach):
    """Regression for the original diffGrad.py, which kept ``previous_grad = grad`` by reference: with
    ``zero_grad(set_to_none=False)`` the stored tensor is the live gradient and xi is always 0.5."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4).double()
    opt = DiffGrad(model.parameters(), lr=LR, foreach=foreach)
    x = torch.randn(16, 8, dtype=torch.float64)
    for k in range(3):
        opt.zero_grad(set_to_none=False)
        (model(x) ** 2).sum().mul(k + 1).backward()
        if k:
            xi = torch.cat([friction(p.grad, opt.state[p]["previous_grad"]).flatten() for p in model.parameters()])
            assert (xi - 0.5).abs().max() > 1e-3
        opt.step()
        for p in model.parameters():
            assert opt.state[p]["previous_grad"].data_ptr() != p.grad.data_ptr()
            assert torch.equal(opt.state[p]["previous_grad"], p.grad)
    opt.zero_grad(set_to_none=False)
    assert all(opt.state[p]["previous_grad"].abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("foreach", [False, True])
def test_params_without_grad_are_skipped_and_keep_their_state(foreach):
    gen = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    opt = DiffGrad([a, b], lr=LR, foreach=foreach)
    step_with(opt, [a, b], [torch.randn(3, 3, generator=gen, dtype=torch.float64),
                            torch.randn(3, generator=gen, dtype=torch.float64)])
    frozen = {k: v.clone() for k, v in opt.state[b].items()}
    b_before = b.detach().clone()
    step_with(opt, [a, b], [torch.randn(3, 3, generator=gen, dtype=torch.float64), None])
    assert opt.state[a]["step"].item() == 2
    assert torch.equal(b.detach(), b_before)
    for key, value in frozen.items():
        assert torch.equal(opt.state[b][key], value), key
    # b's next step uses its own t = 2 and the previous gradient it kept
    g_b = torch.randn(3, generator=gen, dtype=torch.float64)
    ref = reference_step(b_before.numpy(), g_b.numpy(), frozen["exp_avg"].numpy(), frozen["exp_avg_sq"].numpy(),
                         frozen["previous_grad"].numpy(), 2)
    step_with(opt, [a, b], [torch.randn(3, 3, generator=gen, dtype=torch.float64), g_b])
    np.testing.assert_allclose(b.detach().numpy(), ref[0], rtol=1e-13)


def test_the_callers_grad_is_not_modified():
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    g = torch.full((4,), 0.5, dtype=torch.float64)
    p.grad = g.clone()
    DiffGrad([p], weight_decay=0.1).step()
    assert torch.equal(p.grad, g)


def _mixed_params(dtype=torch.float64, seed=4):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (), (3, 2, 3, 3), (1, 11)]
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def test_foreach_equals_single_tensor_bitwise_float64():
    """Same operations on both paths: every parameter and every state tensor bitwise equal, over param
    groups with coupled and decoupled decay and a parameter that skips steps (so steps differ)."""
    runs = []
    for foreach in (False, True):
        params = _mixed_params()
        opt = DiffGrad([{"params": params[:3], "weight_decay": 0.05},
                        {"params": params[3:], "weight_decay": 0.02, "decoupled_weight_decay": True, "lr": 3e-2}],
                       lr=LR, betas=(0.8, 0.99), eps=1e-6, foreach=foreach)
        gen = torch.Generator().manual_seed(5)
        for k in range(15):
            grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            if k % 3 == 1:
                grads[2] = None
            step_with(opt, params, grads)
        runs.append((params, opt))
    (p_loop, o_loop), (p_fe, o_fe) = runs
    for a, b in zip(p_loop, p_fe):
        assert torch.equal(a, b)
        for key in STATE_KEYS:
            assert torch.equal(o_loop.state[a][key], o_fe.state[b][key]), key
    assert o_fe.state[p_fe[2]]["step"].item() == 10 and o_fe.state[p_fe[0]]["step"].item() == 15


def test_functional_form_is_what_the_optimizer_runs():
    params = _mixed_params()
    clones = [p.detach().clone() for p in params]
    opt = DiffGrad(params, lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    step_with(opt, params, grads)
    state = [[torch.zeros_like(c) for c in clones] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in clones]
    diffgrad(clones, grads, *state, steps, lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=0.01,
             decoupled_weight_decay=False)
    for p, c in zip(params, clones):
        assert torch.equal(p.detach(), c)


# --- the peer package -------------------------------------------------------------------------------

def _mlp_pair(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    return model, copy.deepcopy(model)


def _train_pair(make_ours, make_theirs, steps=30, check_state=True):
    """Full-batch float64 training of two copies of MLP 10-32-3; returns the max |param difference| seen."""
    ours, theirs = _mlp_pair()
    opt_a, opt_b = make_ours(ours.parameters()), make_theirs(theirs.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    worst = 0.0
    for _ in range(steps):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            worst = max(worst, (a - b).abs().max().item())
            if check_state:
                for key in ("exp_avg", "exp_avg_sq", "previous_grad"):
                    torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=1e-10, atol=1e-14)
    return worst


@pytest.fixture
def po_without_sqrt_eps(monkeypatch):
    """pytorch-optimizer's denominator is sqrt(v + 1e-15) + eps; set its 1e-15 to 0 to get v2's sqrt(v) + eps."""
    for name in ("apply_ams_bound", "apply_ams_bound_foreach"):
        monkeypatch.setattr(PODiffGrad, name, staticmethod(
            functools.partial(getattr(BaseOptimizer, name), exp_avg_sq_eps=0.0)))


@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_pytorch_optimizer_step_by_step(po_without_sqrt_eps, wd, foreach):
    worst = _train_pair(lambda ps: DiffGrad(ps, lr=LR, weight_decay=wd, foreach=foreach),
                        lambda ps: PODiffGrad(ps, lr=LR, weight_decay=wd, weight_decouple=False, foreach=foreach))
    assert worst < 1e-12


def test_pytorch_optimizer_differs_by_its_sqrt_eps():
    """Documented difference: pytorch-optimizer adds 1e-15 inside the square root (measured ~1e-6 here)."""
    worst = _train_pair(lambda ps: DiffGrad(ps, lr=LR), lambda ps: PODiffGrad(ps, lr=LR, weight_decouple=False),
                        check_state=False)
    assert 1e-12 < worst < 1e-5


def test_pytorch_optimizer_defaults_to_decoupled_decay(po_without_sqrt_eps):
    """Documented difference: pytorch-optimizer's default ``weight_decouple=True`` is normlab's
    ``decoupled_weight_decay=True``, not the official coupled L2 that normlab defaults to."""
    same = _train_pair(lambda ps: DiffGrad(ps, lr=LR, weight_decay=0.1, decoupled_weight_decay=True),
                       lambda ps: PODiffGrad(ps, lr=LR, weight_decay=0.1))
    assert same < 1e-12
    different = _train_pair(lambda ps: DiffGrad(ps, lr=LR, weight_decay=0.1),
                            lambda ps: PODiffGrad(ps, lr=LR, weight_decay=0.1), check_state=False)
    assert different > 1e-4


def test_pytorch_optimizer_writes_coupled_decay_into_grad():
    """Documented difference: the official code and pytorch-optimizer add wd * theta into ``p.grad``."""
    p, q = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(3, dtype=torch.float64))
    for param in (p, q):
        param.grad = torch.full((3,), 0.5, dtype=torch.float64)
    PODiffGrad([p], weight_decay=0.1, weight_decouple=False).step()
    DiffGrad([q], weight_decay=0.1).step()
    assert torch.allclose(p.grad, torch.full((3,), 0.6, dtype=torch.float64))
    assert torch.equal(q.grad, torch.full((3,), 0.5, dtype=torch.float64))


# --- dtypes, state_dict, errors ---------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(foreach, dtype):
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(6, 4, generator=gen).to(dtype)
    g1 = torch.randn(6, 4, generator=gen)
    g2 = g1 + 1e-3 * torch.randn(6, 4, generator=gen)  # a change bf16 cannot resolve
    p = nn.Parameter(theta.clone())
    ref = nn.Parameter(theta.float())
    opt = DiffGrad([p], lr=LR, weight_decay=0.01, foreach=foreach)
    opt_ref = DiffGrad([ref], lr=LR, weight_decay=0.01, foreach=foreach)
    for g in (g1, g2):
        step_with(opt, [p], [g.to(dtype)])
        step_with(opt_ref, [ref], [g.to(dtype).float()])
        assert p.dtype == dtype
        assert torch.equal(p.detach(), ref.detach().to(dtype))  # float32 math, rounded into the parameter
        ref.data.copy_(p.detach().float())
        for key in ("exp_avg", "exp_avg_sq", "previous_grad"):
            assert opt.state[p][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], opt_ref.state[ref][key])
    assert opt.state[p]["exp_avg_sq"].min() > 0


def test_low_precision_state_survives_load_state_dict_bitwise():
    def make():
        torch.manual_seed(0)
        return nn.Linear(6, 3).to(torch.bfloat16)

    def train(model, opt, steps, gen):
        for _ in range(steps):
            step_with(opt, list(model.parameters()),
                      [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in model.parameters()])

    straight = make()
    opt = DiffGrad(straight.parameters(), lr=LR)
    train(straight, opt, 10, torch.Generator().manual_seed(8))
    resumed = make()
    opt_a = DiffGrad(resumed.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(8)
    train(resumed, opt_a, 5, gen)
    saved = copy.deepcopy(opt_a.state_dict())
    opt_b = DiffGrad(resumed.parameters(), lr=LR)
    opt_b.load_state_dict(saved)
    for p in resumed.parameters():
        assert all(opt_b.state[p][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "previous_grad"))
    train(resumed, opt_b, 5, gen)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        for key in STATE_KEYS:
            assert torch.equal(opt.state[a][key], opt_b.state[b][key])


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1e-3}, "Invalid lr: -0.001"),
    ({"eps": -1.0}, "Invalid eps: -1.0"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"betas": (0.9,)}, "Invalid betas"),
    ({"lr": float("nan")}, "Invalid lr: nan"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DiffGrad([nn.Parameter(torch.zeros(2))], **kwargs)


def test_added_param_group_is_checked_and_dropped_on_error():
    opt = DiffGrad([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="Invalid lr: -1.0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": -1.0})
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "betas": (0.9, 1.5)})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="DiffGrad does not support sparse gradients"):
        DiffGrad(emb.parameters()).step()


def test_compiled_step_matches_eager():
    """``torch.compile`` traces ``step`` (``_init_group`` follows torch.optim's list-filling convention)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(9))
    eager, compiled = make(), make()
    opt_e = DiffGrad(eager.parameters(), lr=LR, weight_decay=0.01)
    opt_c = DiffGrad(compiled.parameters(), lr=LR, weight_decay=0.01)
    compiled_step = torch.compile(opt_c.step, backend="aot_eager")
    for _ in range(3):
        for model, step in ((eager, opt_e.step), (compiled, compiled_step)):
            model.zero_grad()
            model(x).square().mean().backward()
            step()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt_e.state[a]["previous_grad"], opt_c.state[b]["previous_grad"])
