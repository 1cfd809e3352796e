"""GNS-Newton: hand-derived steps, the quadratic check, parity with a NumPy/SciPy transcription of the official
``grad_norm_smooth`` / ``grad_norm_smooth_gradient_method``, the Hessian helpers against autograd, the
failed-factorisation rule, and the torch.optim contract (closure, validation, sparse, state_dict resume)."""

import io
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification

from normlab.optim.gns_newton import (
    GradNormalizedGD, GradRegNewton, boehning_logistic, diag_hessian, gauss_newton_logsumexp,
    gauss_newton_softmax, grad_normalized_gd, grad_reg_newton,
)

F64 = torch.float64
EPS = 1e-8


# ------------------------------------------------------------------------------------------------ problems
def logistic_numpy():
    """The claim check's data: ill-conditioned standardised features plus a bias column, labels {0, 1}."""
    X, y = make_classification(n_samples=2000, n_features=50, n_informative=20, flip_y=0.1, random_state=0)
    X = (X - X.mean(0)) / X.std(0) * np.logspace(-2, 1, 50)
    return np.hstack([X, np.ones((2000, 1))]), y.astype(np.float64)


def logistic_torch(X, y):
    n = X.shape[0]

    def f(w):
        z = X @ w
        return float((F.softplus(z) - y * z).mean())

    def grad(w):
        return X.mT @ (torch.sigmoid(X @ w) - y) / n

    def hess(w):
        p = torch.sigmoid(X @ w)
        return (X.mT * (p * (1 - p))) @ X / n

    return f, grad, hess


@pytest.fixture(scope="module")
def logistic():
    Xn, yn = logistic_numpy()
    X, y = torch.tensor(Xn), torch.tensor(yn)
    return Xn, yn, X, y, logistic_torch(X, y)


@pytest.fixture(scope="module")
def logistic_f_star(logistic):
    """The best f of 30 iterations of the transcribed reference with the exact Hessian."""
    Xn, yn = logistic[:2]
    fn, gradn, hessn = numpy_logistic(Xn, yn)
    return min(reference_grad_norm_smooth(fn, gradn, hessn, np.zeros(51), 30)[2])


def small_logistic(seed=0, n=40, d=4):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = (torch.rand(n, generator=gen) < 0.5).to(F64)
    return X, y


def quadratic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(40, 20, generator=gen, dtype=F64)
    Q = A.mT @ A / 40 + 0.1 * torch.eye(20, dtype=F64)
    b = torch.randn(20, generator=gen, dtype=F64)
    return Q, b


# ------------------------------------------------------------------------------- reference transcription
def reference_grad_norm_smooth(f, grad, hess, x0, n_iters, gamma0=1.0, eps=EPS, gamma_min=1e-9):
    """``grad_norm_smooth`` of epfml/grad-norm-smooth (B = I, warnings off, so 41 trials per search),
    transcribed in NumPy/SciPy. Stops at its first LinAlgError (the two failure rules differ from there)."""
    x = x0.copy()
    f_x, g = f(x), grad(x)
    g_norm = g.dot(g) ** 0.5
    gamma = gamma0
    xs, gammas, fs = [x.copy()], [gamma], [f_x]
    for _ in range(n_iters):
        H = hess(x)
        for _ in range(41):
            lam = g_norm / (gamma + eps)
            try:
                dx = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H + lam * np.eye(len(x)), lower=False), -g)
            except np.linalg.LinAlgError:
                return xs, gammas, fs
            f_new, g_new = f(x + dx), grad(x + dx)
            g_new_sq = g_new.dot(g_new)
            if f_x - f_new >= g_new_sq / (8 * lam):
                gamma = max(gamma * 2.0, gamma_min)
                break
            gamma *= 0.5
        x = x + dx
        f_x, g, g_norm = f_new, g_new, g_new_sq ** 0.5
        xs.append(x.copy())
        gammas.append(gamma)
        fs.append(f_x)
    return xs, gammas, fs


def reference_gradient_method(f, grad, x0, n_iters, gamma0=1.0, eps=EPS, gamma_min=1e-9):
    """``grad_norm_smooth_gradient_method`` (no preconditioner): 40 trials, x+ = x - g/lam."""
    x = x0.copy()
    f_x, g = f(x), grad(x)
    g_norm = g.dot(g) ** 0.5
    gamma = gamma0
    xs, gammas = [x.copy()], [gamma]
    for _ in range(n_iters):
        for _ in range(40):
            lam = g_norm / (gamma + eps)
            T = x - g / lam
            f_new, g_new = f(T), grad(T)
            g_new_sq = g_new.dot(g_new)
            if f_x - f_new >= g_new_sq / (8 * lam):
                gamma = max(gamma * 2.0, gamma_min)
                break
            gamma *= 0.5
        x, f_x, g, g_norm = T, f_new, g_new, g_new_sq ** 0.5
        xs.append(x.copy())
        gammas.append(gamma)
    return xs, gammas


def numpy_logistic(X, y):
    n = X.shape[0]

    def f(w):
        z = X @ w
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    def grad(w):
        return X.T @ (1 / (1 + np.exp(-(X @ w))) - y) / n

    def hess(w):
        p = 1 / (1 + np.exp(-(X @ w)))
        return (X.T * (p * (1 - p))) @ X / n

    return f, grad, hess


# -------------------------------------------------------------------------------------- hand-derived steps
def make_param_problem(X, y, hessian, **kw):
    w = torch.zeros(X.shape[1], dtype=F64, requires_grad=True)
    opt = GradRegNewton([w], hessian=hessian, **kw)
    create_graph = hessian == "exact"

    def closure():
        opt.zero_grad()
        z = X @ w
        loss = (F.softplus(z) - y * z).mean()
        loss.backward(create_graph=create_graph)
        return loss

    return w, opt, closure


@pytest.mark.parametrize("hessian", ["exact", "callable"])
def test_fixed_radius_step_is_the_regularised_newton_step(hessian):
    X, y = small_logistic()
    f, grad, hess = logistic_torch(X, y)
    w, opt, closure = make_param_problem(X, y, "exact" if hessian == "exact" else hess, gamma0=0.3,
                                         adaptive=False)
    with torch.no_grad():
        w.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64))
    for _ in range(3):
        x = w.detach().clone()
        g = grad(x)
        lam = float(g.norm()) / (0.3 + EPS)
        expected = x - torch.linalg.solve(hess(x) + lam * torch.eye(4, dtype=F64), g)
        loss = opt.step(closure)
        assert float(loss.detach()) == pytest.approx(f(x), rel=1e-14)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-10)
        assert opt.state[w]["gamma"] == 0.3  # never adapted


def test_metric_step_uses_the_dual_norm():
    X, y = small_logistic(1)
    f, grad, hess = logistic_torch(X, y)
    gen = torch.Generator().manual_seed(5)
    M = torch.randn(4, 4, generator=gen, dtype=F64)
    B = M @ M.mT + torch.eye(4, dtype=F64)
    w, opt, closure = make_param_problem(X, y, hess, metric=B, adaptive=False, gamma0=2.0)
    g = grad(torch.zeros(4, dtype=F64))
    lam = math.sqrt(float(g @ torch.linalg.solve(B, g))) / (2.0 + EPS)
    opt.step(closure)
    torch.testing.assert_close(w.detach(), -torch.linalg.solve(hess(torch.zeros(4, dtype=F64)) + lam * B, g),
                               rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*exhausted its trials:RuntimeWarning")
def test_quadratic_converges_with_accepted_steps():
    """f = x'Qx/2 - b'x, exact Hessian: ||x - Q^-1 b||_inf < 1e-10 in < 20 iterations; every accepted step
    satisfies f(x) - f(x+) >= ||g+||^2/(8 lam) with the lam it used; lam -> 0."""
    Q, b = quadratic()
    x_star = torch.linalg.solve(Q, b)
    x, hist = grad_reg_newton(lambda x: float(0.5 * x @ Q @ x - b @ x), lambda x: Q @ x - b, lambda x: Q,
                              torch.zeros(20, dtype=F64), 19, grad_tol=1e-13)
    assert float((x - x_star).abs().max()) < 1e-10
    K = len(hist["accepted"])
    assert K < 20
    first_trial = [k for k in range(K) if hist["n_evals"][k + 1] - hist["n_evals"][k] == 1]
    assert first_trial == list(range(len(first_trial))) and hist["grad_norm"][len(first_trial)] < 1e-10
    lams = []
    for k in range(K):
        if not hist["accepted"][k]:
            continue  # a search that ran out of trials: the test failed, by definition
        gamma_used = hist["gamma"][k + 1] / 2
        lam = hist["grad_norm"][k] / (gamma_used + EPS)
        lams.append(lam)
        assert hist["func"][k] - hist["func"][k + 1] >= hist["grad_norm"][k + 1] ** 2 / (8 * lam)
    assert len(lams) >= K - 1 and lams[-1] < 1e-6 * lams[0]


def test_failed_factorisation_halves_gamma_without_evaluating():
    """H = -5I on f = |x|^2/2 from (3, 4): trial 0 (lam = 5/(1+eps) < 5) fails, trial 1 (lam ~ 10) works."""
    calls = []

    def f(x):
        calls.append("f")
        return float(0.5 * x @ x)

    x0 = torch.tensor([3.0, 4.0], dtype=F64)
    x, hist = grad_reg_newton(f, lambda x: x.clone(), lambda x: -5.0 * torch.eye(2, dtype=F64), x0, 1)
    lam = 5.0 / (0.5 + EPS)
    torch.testing.assert_close(x, x0 - x0 / (lam - 5.0), rtol=1e-14, atol=0)
    assert hist["n_solves"] == [0, 1] and hist["n_evals"] == [1, 2] and len(calls) == 2
    assert hist["gamma"] == [1.0, 1.0]  # halved by the failure, doubled by the success
    assert hist["accepted"] == [True]


def test_no_factorisation_leaves_the_point_and_warns_once():
    x0 = torch.tensor([3.0, 4.0], dtype=F64)
    w = x0.clone().requires_grad_(True)
    opt = GradRegNewton([w], hessian=lambda x: -1e6 * torch.eye(2, dtype=F64), max_search=3)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="no trial of the radius search factorised"):
        opt.step(closure)
    assert torch.equal(w.detach(), x0)
    assert opt.state[w]["gamma"] == 1 / 8 and opt.state[w]["n_stuck"] == 1 and opt.state[w]["n_solves"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # reported once
    assert opt.state[w]["n_stuck"] == 2 and opt.state[w]["gamma"] == 1 / 64


def test_exhausted_search_takes_the_last_trial():
    """One trial with a huge radius: the step overshoots, the test fails, the step is taken anyway."""
    Q, b = quadratic(1)
    x0 = torch.zeros(20, dtype=F64)
    with pytest.warns(RuntimeWarning, match="exhausted its trials"):
        x, hist = grad_normalized_gd(lambda x: float(0.5 * x @ Q @ x - b @ x), lambda x: Q @ x - b, x0, 1,
                                     gamma0=1e3, max_search=1)
    torch.testing.assert_close(x, x0 + (1e3 + EPS) * b / b.norm(), rtol=1e-14, atol=0)
    assert hist["accepted"] == [False] and hist["gamma"] == [1e3, 500.0]
    assert hist["func"][1] > hist["func"][0]


def test_zero_gradient_stops_without_a_search():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = GradRegNewton([w], hessian=lambda x: torch.eye(3, dtype=F64))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 0.0
    assert len(calls) == 1 and torch.equal(w.detach(), torch.zeros(3, dtype=F64))
    assert opt.state[w]["step"] == 1 and opt.state[w]["n_solves"] == 0


def test_normalized_gd_step_is_gamma_plus_eps_along_the_normalised_gradient():
    X, y = small_logistic(2)
    f, grad, _ = logistic_torch(X, y)
    w = torch.tensor([0.3, -0.2, 0.1, 0.7], dtype=F64, requires_grad=True)
    opt = GradNormalizedGD([w], gamma0=0.05, adaptive=False)

    def closure():
        opt.zero_grad()
        z = X @ w
        loss = (F.softplus(z) - y * z).mean()
        loss.backward()
        return loss

    x = w.detach().clone()
    g = grad(x)
    opt.step(closure)
    step = w.detach() - x
    expected = -(0.05 + EPS) * g / g.norm()
    torch.testing.assert_close(step, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(step, -(0.05 / (1 + EPS / 0.05)) * g / g.norm(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------- reference parity
@pytest.mark.filterwarnings("ignore:.*exhausted its trials:RuntimeWarning")
@pytest.mark.parametrize("which", ["boehning", "diag", "exact"])
def test_parity_with_the_reference_transcription(logistic, logistic_f_star, which):
    Xn, yn, X, y, (f, grad, hess) = logistic
    fn, gradn, hessn = numpy_logistic(Xn, yn)
    hessians_np = {"exact": hessn, "boehning": lambda w, H=Xn.T @ Xn / (4 * len(yn)): H,
                   "diag": lambda w: np.diag(np.diag(hessn(w)))}
    hessians = {"exact": hess, "boehning": boehning_logistic(X), "diag": diag_hessian(hess)}
    f_star = logistic_f_star
    xs, gammas, fs = reference_grad_norm_smooth(fn, gradn, hessians_np[which], np.zeros(51), 20)
    iterates = []  # x_k, as the Hessian callable receives it
    _, hist = grad_reg_newton(f, grad, lambda x: iterates.append(x) or hessians[which](x),
                              torch.zeros(51, dtype=F64), 20, max_search=41)
    compared = 0
    for k in range(min(len(xs), len(iterates))):
        if fs[k] - f_star <= 1e-12:
            break  # at rounding level the acceptance test compares noise
        np.testing.assert_allclose(iterates[k].numpy(), xs[k], rtol=0, atol=1e-9)
        assert hist["gamma"][k] == pytest.approx(gammas[k], rel=1e-9)
        compared += 1
    assert compared >= (12 if which == "exact" else 20)


def test_gradient_method_parity_with_the_reference_transcription(logistic):
    Xn, yn, X, y, (f, grad, _) = logistic
    fn, gradn, _ = numpy_logistic(Xn, yn)
    xs, gammas = reference_gradient_method(fn, gradn, np.zeros(51), 30)
    x, hist = grad_normalized_gd(f, grad, torch.zeros(51, dtype=F64), 30)
    assert hist["gamma"] == pytest.approx(gammas, rel=1e-12)
    np.testing.assert_allclose(x.numpy(), xs[-1], rtol=0, atol=1e-9)


def test_optimizer_follows_the_functional_driver(logistic):
    _, _, X, y, (f, grad, hess) = logistic
    _, hist = grad_reg_newton(f, grad, boehning_logistic(X), torch.zeros(51, dtype=F64), 15)
    w, opt, closure = make_param_problem(X, y, boehning_logistic(X))
    losses = [float(opt.step(closure)) for _ in range(15)]
    np.testing.assert_allclose(losses, hist["func"][:15], rtol=1e-12)
    assert opt.state[w]["gamma"] == hist["gamma"][15] and opt.state[w]["n_solves"] == hist["n_solves"][15]
    assert opt.state[w]["step"] == 15 and opt.state[w]["n_evals"] == 15 + hist["n_evals"][15] - 1


# ---------------------------------------------------------------------------------------------- Hessians
def test_exact_hessian_needs_create_graph():
    X, y = small_logistic(3)
    w, opt, _ = make_param_problem(X, y, "exact")

    def closure():
        opt.zero_grad()
        z = X @ w
        loss = (F.softplus(z) - y * z).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step(closure)


def test_exact_hessian_over_several_parameters_with_an_unused_one():
    """nn.Linear weight + bias + a parameter the loss ignores: the step is the closed-form Newton step on
    (weight, bias) and zero on the unused entries."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(30, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (30,), generator=gen).to(F64)
    lin = torch.nn.Linear(3, 1).double()
    unused = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = GradRegNewton([lin.weight, lin.bias, unused], hessian="exact", adaptive=False)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lin(X).squeeze(1), y)
        loss.backward(create_graph=True)
        return loss

    _, grad, hess = logistic_torch(torch.cat([X, torch.ones(30, 1, dtype=F64)], 1), y)
    w0 = torch.cat([lin.weight.detach()[0], lin.bias.detach()])
    g = grad(w0)
    expected = w0 - torch.linalg.solve(hess(w0) + float(g.norm()) / (1 + EPS) * torch.eye(4, dtype=F64), g)
    opt.step(closure)
    torch.testing.assert_close(torch.cat([lin.weight.detach()[0], lin.bias.detach()]), expected, rtol=0,
                               atol=1e-13)
    assert torch.equal(unused.detach(), torch.ones(2, dtype=F64))


def test_gauss_newton_softmax_plus_rank_one_terms_is_the_exact_hessian():
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(25, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (25,), generator=gen)
    w = 0.5 * torch.randn(12, generator=gen, dtype=F64)
    exact = torch.func.hessian(lambda v: F.cross_entropy(X @ v.reshape(3, 4).mT, y))(w)
    P = torch.softmax(X @ w.reshape(3, 4).mT, dim=1)
    V = (P[:, :, None] * X[:, None, :]).reshape(25, 12)
    gn = gauss_newton_softmax(X, 3)(w)
    torch.testing.assert_close(gn - V.mT @ V / 25, exact, rtol=0, atol=1e-13)
    assert torch.count_nonzero(gn[:4, 4:]) == 0  # block-diagonal over classes


def test_gauss_newton_logsumexp_plus_rank_one_term_is_the_exact_hessian():
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(8, 5, generator=gen, dtype=F64)
    b = torch.randn(8, generator=gen, dtype=F64)
    x = torch.randn(5, generator=gen, dtype=F64)
    mu = 0.7
    exact = torch.func.hessian(lambda v: mu * torch.logsumexp((A @ v - b) / mu, 0))(x)
    pi = torch.softmax((A @ x - b) / mu, 0)
    torch.testing.assert_close(gauss_newton_logsumexp(A, b, mu)(x) - torch.outer(A.mT @ pi, A.mT @ pi) / mu, exact,
                               rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="Invalid mu"):
        gauss_newton_logsumexp(A, b, 0.0)


def test_boehning_bound_dominates_the_logistic_hessian_and_diag_keeps_the_diagonal():
    X, y = small_logistic(8, d=5)
    _, _, hess = logistic_torch(X, y)
    w = torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=F64)
    bound = boehning_logistic(X)(w)
    torch.testing.assert_close(bound, X.mT @ X / (4 * 40), rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(bound - hess(w)).min()) > -1e-14
    D = diag_hessian(hess)(w)
    assert torch.equal(torch.diagonal(D), torch.diagonal(hess(w))) and torch.count_nonzero(D - torch.diag(
        torch.diagonal(D))) == 0


# --------------------------------------------------------------------------------------- optimizer contract
def _run(opt_factory, steps, state=None):
    X, y = small_logistic(10, d=4)
    w = torch.nn.Parameter(torch.tensor([0.2, 0.1, -0.3, 0.4], dtype=F64))
    opt = opt_factory([w])
    if state is not None:
        w.data.copy_(state[0])
        opt.load_state_dict(state[1])

    def closure():
        opt.zero_grad()
        z = X @ w
        loss = (F.softplus(z) - y * z).mean() + 0.01 * (w * w).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return w, opt


@pytest.mark.filterwarnings("ignore:.*exhausted its trials:RuntimeWarning")
@pytest.mark.parametrize("factory", [
    lambda p: GradRegNewton(p, hessian=boehning_logistic(small_logistic(10, d=4)[0])),
    lambda p: GradNormalizedGD(p, gamma0=0.5),
], ids=["GradRegNewton", "GradNormalizedGD"])
def test_state_dict_resume_is_bit_exact(factory):
    straight, opt_straight = _run(factory, 10)
    half, opt_half = _run(factory, 5)
    buf = io.BytesIO()
    torch.save((half.detach().clone(), opt_half.state_dict()), buf)
    buf.seek(0)
    resumed, opt_resumed = _run(factory, 5, torch.load(buf))
    assert torch.equal(resumed.detach(), straight.detach())
    assert opt_resumed.state[resumed] == opt_straight.state[straight]
    assert set(opt_straight.state[straight]) == {"gamma", "step", "n_solves", "n_evals", "n_exhausted", "n_stuck"}


def test_step_needs_a_closure_and_rejects_sparse_gradients():
    emb = torch.nn.Embedding(5, 2, sparse=True).double()
    for opt in (GradRegNewton(emb.parameters(), hessian=lambda x: torch.eye(10, dtype=F64)),
                GradNormalizedGD(emb.parameters())):
        with pytest.raises(RuntimeError, match="needs a closure"):
            opt.step()

        def closure(opt=opt):
            opt.zero_grad()
            loss = emb(torch.tensor([1, 3])).sum()
            loss.backward()
            return loss

        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step(closure)
        def no_backward(opt=opt):
            opt.zero_grad()
            return emb(torch.tensor([1])).sum()

        with pytest.raises(RuntimeError, match="must call loss.backward"):
            opt.step(no_backward)


def test_invalid_hyperparameters_raise():
    p = [torch.nn.Parameter(torch.zeros(3, dtype=F64))]
    for kw, msg in [({"gamma0": 0.0}, "Invalid gamma0: 0.0"), ({"gamma0": -1}, "Invalid gamma0: -1"),
                    ({"eps": -1e-8}, "Invalid eps"), ({"gamma_min": -1.0}, "Invalid gamma_min"),
                    ({"max_search": 0}, "Invalid max_search: 0"), ({"max_search": 2.5}, "Invalid max_search"),
                    ({"adaptive": "yes"}, "Invalid adaptive")]:
        with pytest.raises(ValueError, match=msg):
            GradRegNewton(p, **kw)
        with pytest.raises(ValueError, match=msg):
            GradNormalizedGD(p, **kw)
    with pytest.raises(ValueError, match="Invalid gamma0: -2"):
        GradNormalizedGD([{"params": p, "gamma0": -2.0}])
    with pytest.raises(ValueError, match="Invalid hessian: 'bfgs'"):
        GradRegNewton(p, hessian="bfgs")
    with pytest.raises(ValueError, match="single parameter group, got 2"):
        GradRegNewton([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1, dtype=F64))]}])
    with pytest.raises(ValueError, match="one dtype"):
        GradRegNewton([p[0], torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="d_max=2"):
        GradRegNewton(p, d_max=2)
    with pytest.raises(ValueError, match=r"metric must be a \(3, 3\) matrix"):
        GradRegNewton(p, metric=torch.eye(2))
    with pytest.raises(ValueError, match="positive definite"):
        GradRegNewton(p, metric=-torch.eye(3))
    with pytest.raises(ValueError, match="metric is not symmetric"):
        GradRegNewton(p, metric=torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="Invalid n_iters"):
        grad_normalized_gd(lambda x: 0.0, lambda x: x, torch.zeros(2), -1)


@pytest.mark.parametrize("bad,msg", [(torch.eye(2), r"the Hessian must be a \(3, 3\) matrix"),
                                     (torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                                      "not symmetric"),
                                     (torch.full((3, 3), math.nan), "NaN")])
def test_invalid_hessian_output_raises(bad, msg):
    w = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = GradRegNewton([w], hessian=lambda x: bad)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=msg):
        opt.step(closure)


@pytest.mark.filterwarnings("ignore:.*exhausted its trials:RuntimeWarning")
def test_float32_parameters_train():
    X, y = small_logistic(11, d=4)
    X32, y32 = X.float(), y.float()
    w = torch.nn.Parameter(torch.zeros(4))
    opt = GradRegNewton([w], hessian="exact")

    def closure():
        opt.zero_grad()
        z = X32 @ w
        loss = (F.softplus(z) - y32 * z).mean()
        loss.backward(create_graph=True)
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(6):
        last = float(opt.step(closure).detach())
    assert w.dtype == torch.float32 and last < first
    f, grad, hess = logistic_torch(X, y)
    _, hist = grad_reg_newton(f, grad, hess, torch.zeros(4, dtype=F64), 30, grad_tol=1e-12)
    assert last == pytest.approx(min(hist["func"]), rel=1e-5)
