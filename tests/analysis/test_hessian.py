import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normlab.analysis.hessian import (HessianOperator, exact_hessian, hessian_criteria, hvps_to_accuracy,
                                      lanczos_steps, spectral_density)
from normlab.bench.experiment import intra_op_threads
from normlab.bench.tasks import digits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def batch():
    x, y = digits("train")
    return x.reshape(len(x), -1)[:500].double(), y[:500]


def mlp(act, bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [act(), nn.Linear(8, 10)]
    return nn.Sequential(*layers).double()


def train(model, x, y, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def reference_hessian(model, x, y):
    """Dense Hessian by torch.autograd.functional on the flat parameter vector (eval mode, all params)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    frozen = copy.deepcopy(model).eval()

    def loss(v):
        params = {n: c.reshape(s) for n, c, s in zip(names, v.split(sizes), shapes)}
        return F.cross_entropy(functional_call(frozen, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat), loss, flat


@pytest.fixture(scope="module")
def trained(batch):
    """MLP 64-8-GELU-10 after 300 Adam steps (P = 610), with its exact Hessian."""
    x, y = batch
    model = train(mlp(nn.GELU), x, y, 300)
    h, loss, flat = reference_hessian(model, x, y)
    return model, h, loss, flat


def top_by_magnitude(h, k):
    ev = torch.linalg.eigvalsh(h)
    return ev[ev.abs().argsort(descending=True)[:k]]


# ---- exactness --------------------------------------------------------------------------------------------
def test_hvp_matches_exact_hessian(batch, trained):
    x, y = batch
    model, h, _, _ = trained
    op = HessianOperator(model, F.cross_entropy, (x, y))
    assert op.numel == 610 and op.params == list(model.parameters())
    assert (h - h.T).abs().max() < 1e-14 * h.abs().max()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.numel, generator=g, dtype=torch.float64)
        hv = op.matvec(v)
        assert (hv - h @ v).norm() / (h @ v).norm() < 1e-10
    vs = op.unflatten(v)
    assert [t.shape for t in op.hvp(vs)] == [p.shape for p in model.parameters()]
    assert torch.equal(op.flatten(op.hvp(vs)), op.matvec(v))
    assert torch.allclose(exact_hessian(model, F.cross_entropy, (x, y)), h, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_eigenpairs_match_exact(batch, trained, method):
    x, y = batch
    model, h, _, _ = trained
    exact = top_by_magnitude(h, 3)
    vals, vecs = HessianOperator(model, F.cross_entropy, (x, y)).top_eigen(
        3, max_iter=300, tol=1e-6, method=method, generator=torch.Generator().manual_seed(0))
    assert vals.shape == (3,) and vals.dtype == torch.float64
    assert ((vals - exact).abs() / exact.abs()).max() < 1e-4
    for lam, vec in zip(vals, vecs):
        u = torch.cat([t.reshape(-1) for t in vec])
        assert abs(float(u.norm()) - 1) < 1e-10
        assert (h @ u - lam * u).norm() < 1e-2 * lam.abs()
    if method == "lanczos":
        flat = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vecs])
        assert torch.allclose(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-8)


def test_finite_difference_curvature_along_top_eigenvector(batch, trained):
    x, y = batch
    model, _, loss, flat = trained
    vals, vecs = HessianOperator(model, F.cross_entropy, (x, y)).top_eigen(1, tol=1e-6, max_iter=300)
    u = torch.cat([t.reshape(-1) for t in vecs[0]])
    h = 1e-3
    fd = (loss(flat + h * u) - 2 * loss(flat) + loss(flat - h * u)) / h ** 2
    assert abs(float(fd) - float(vals[0])) < 1e-4 * float(vals[0])


def test_negative_eigenvalues_are_found_by_magnitude_with_their_sign():
    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64))

        def forward(self, x):
            return self.theta

    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-3.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    op = HessianOperator(Point(), lambda out, y: 0.5 * out @ a @ out, (torch.zeros(1), torch.zeros(1)))
    for method in ("power", "lanczos"):
        vals, _ = op.top_eigen(2, max_iter=500, tol=1e-8, method=method)
        assert torch.allclose(vals, torch.tensor([-3.0, 2.0], dtype=torch.float64), atol=1e-5)
    assert op.trace(n_samples=200) == pytest.approx(0.5, abs=1.5)
    nodes, weights = op.esd(n_iter=3)
    assert nodes.shape == (1, 3)


# ---- pyhessian peer ----------------------------------------------------------------------------------------
def test_pyhessian_peer_top_eigenvalue_and_trace(batch, trained):
    pyhessian = pytest.importorskip("pyhessian")
    x, y = batch
    model, h, _, _ = trained
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # pyhessian draws its random vectors in the default dtype
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            peer = pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            peer_vals, _ = peer.eigenvalues(maxIter=300, tol=1e-6, top_n=2)
            peer_trace = float(np.mean(peer.trace(maxIter=100, tol=1e-12)))
    finally:
        torch.set_default_dtype(default)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    ours, _ = op.top_eigen(2, max_iter=300, tol=1e-6)
    assert np.allclose(ours.numpy(), peer_vals, rtol=1e-5, atol=0)
    exact_trace = float(torch.trace(h))
    ours_trace = op.trace(n_samples=100, generator=torch.Generator().manual_seed(0))
    for estimate in (ours_trace, peer_trace):
        assert abs(estimate - exact_trace) < 0.25 * exact_trace
    assert abs(ours_trace - peer_trace) < 0.25 * exact_trace


# ---- Hutchinson --------------------------------------------------------------------------------------------
def test_hutchinson_trace_within_error_and_early_stop(batch, trained):
    x, y = batch
    model, h, _, _ = trained
    op = HessianOperator(model, F.cross_entropy, (x, y))
    exact = float(torch.trace(h))
    for seed in range(3):
        assert abs(op.trace(100, generator=torch.Generator().manual_seed(seed)) - exact) < 0.25 * exact
    calls = []
    original = op.matvec
    op.matvec = lambda v: calls.append(1) or original(v)
    op.trace(100, tol=0.05, generator=torch.Generator().manual_seed(0))
    assert 2 <= len(calls) < 100


# ---- Lanczos and SLQ ---------------------------------------------------------------------------------------
def test_lanczos_basis_stays_orthonormal(batch, trained):
    x, y = batch
    model, h, _, _ = trained
    op = HessianOperator(model, F.cross_entropy, (x, y))
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    *_, last = lanczos_steps(op.matvec, v, 80, lambda: None)
    q = last.basis
    assert q.shape == (80, op.numel)
    assert (q @ q.T - torch.eye(80, dtype=torch.float64)).abs().max() < 1e-10
    t = q @ h @ q.T  # the Lanczos tridiagonal matrix, recomputed from the basis
    theta, _ = last.ritz()
    assert torch.allclose(torch.linalg.eigvalsh(t), theta, atol=1e-8)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("steps", [0, 300])
def test_slq_extremes_weights_and_re_match_exact(batch, bn, steps):
    x, y = batch
    model = train(mlp(nn.ReLU, bn=bn), x, y, steps)
    model.train()
    h = exact_hessian(model, F.cross_entropy, (x, y))
    ev = torch.linalg.eigvalsh(h)
    nodes, weights = HessianOperator(model, F.cross_entropy, (x, y)).esd(
        n_iter=80, n_runs=2, generator=torch.Generator().manual_seed(0))
    assert nodes.shape == weights.shape == (2, 80) and nodes.dtype == torch.float64
    assert torch.allclose(weights.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert (weights >= 0).all()
    assert torch.allclose(nodes.max(1).values, ev[-1].expand(2), atol=1e-4, rtol=0)
    assert torch.allclose(nodes.min(1).values, ev[0].expand(2), atol=1e-4, rtol=0)
    re_exact = abs(float(ev[0] / ev[-1]))
    re_slq, _ = hessian_criteria(nodes, weights)
    assert abs(re_slq - re_exact) < 1e-4


def test_too_many_lanczos_steps_are_capped_and_stay_exact():
    """The sheet's pitfall: m close to P on a rank-deficient Hessian. Linear regression Hessian
    (2/N) X^T X ⊗ I has 4 distinct eigenvalues in P = 20 entries: Lanczos breaks down after 4 steps and
    must restart; asking for 100 steps caps at P - 1 = 19 with a warning."""
    torch.manual_seed(0)
    model = nn.Linear(3, 5).double()  # P = 20
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randn(40, 5, dtype=torch.float64)
    op = HessianOperator(model, F.mse_loss, (x, y))
    ev = torch.linalg.eigvalsh(exact_hessian(model, F.mse_loss, (x, y)))
    with pytest.warns(UserWarning, match="capped at numel - 1 = 19"):
        nodes, weights = op.esd(n_iter=100, n_runs=3, generator=torch.Generator().manual_seed(0))
    assert nodes.shape == (3, 19)
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    # every node that carries weight is a true eigenvalue; the quadrature has no spurious mass
    carried = nodes[weights > 1e-12]
    assert (carried[:, None] - ev[None]).abs().min(dim=1).values.max() < 1e-8
    re_exact = abs(float(ev[0] / ev[-1]))
    assert hessian_criteria(nodes, weights)[0] == pytest.approx(re_exact, abs=1e-8)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    *_, last = lanczos_steps(op.matvec, v, 19, lambda: torch.randn(op.numel, dtype=torch.float64))
    q = last.basis
    assert (q @ q.T - torch.eye(19, dtype=torch.float64)).abs().max() < 1e-10
    assert 0.0 in last.beta  # the breakdown restarted with beta = 0


# ---- density and criteria ----------------------------------------------------------------------------------
def test_spectral_density_integrates_to_one_and_peaks_at_nodes():
    nodes = torch.tensor([[-1.0, 0.5, 2.0], [-1.0, 0.5, 2.0]])
    weights = torch.tensor([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]])
    grid, density = spectral_density(nodes, weights, num_bins=5001)
    assert grid.shape == density.shape == (5001,)
    assert float(density.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-12)
    assert grid[0] == pytest.approx(-1.001) and grid[-1] == pytest.approx(2.001)
    assert float(grid[density.argmax()]) == pytest.approx(0.5, abs=2e-3)
    # formula written out: sigma^2 = 1e-5 * range, one run
    g2, d2 = spectral_density(nodes[0], weights[0], num_bins=1001)
    s2 = 1e-5 * 3.002
    raw = sum(w * math.exp(-(float(g2[500]) - n) ** 2 / (2 * s2)) / math.sqrt(2 * math.pi * s2)
              for n, w in zip(nodes[0].tolist(), weights[0].tolist()))
    dense = [sum(w * math.exp(-(float(g) - n) ** 2 / (2 * s2)) / math.sqrt(2 * math.pi * s2)
                 for n, w in zip(nodes[0].tolist(), weights[0].tolist())) for g in g2]
    assert float(d2[500]) == pytest.approx(raw / (sum(dense) * float(g2[1] - g2[0])), rel=1e-9)


def test_hessian_criteria_formula():
    nodes = torch.tensor([[-1.0, 2.0, 3.0], [-0.5, 1.0, 4.0]])
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    re, khn = hessian_criteria(nodes, weights)
    assert re == pytest.approx((1 / 3 + 0.5 / 4) / 2)
    k1 = math.sqrt(0.2) / (math.sqrt(0.6) + math.sqrt(1.5))
    k2 = math.sqrt(0.05) / (math.sqrt(0.6) + math.sqrt(1.2))
    assert khn == pytest.approx((k1 + k2) / 2)
    assert hessian_criteria(nodes[0], weights[0], n=1.0)[1] == pytest.approx(0.2 / 2.1)
    with pytest.warns(RuntimeWarning, match="no positive"):
        assert hessian_criteria([-1.0, -2.0], [0.5, 0.5])[1] == math.inf
    for bad in (0, -0.5):
        with pytest.raises(ValueError, match="n must be a positive"):
            hessian_criteria(nodes, weights, n=bad)
    with pytest.raises(ValueError, match="same shape"):
        hessian_criteria(nodes, weights[:, :2])


# ---- loaders, determinism, restore -------------------------------------------------------------------------
def test_loader_accumulates_weighted_by_batch_size(batch, trained):
    x, y = batch
    model, h, _, _ = trained
    loader = [(x[:100], y[:100]), (x[100:350], y[100:350]), (x[350:], y[350:])]
    op = HessianOperator(model, F.cross_entropy, loader)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (op.matvec(v) - h @ v).norm() / (h @ v).norm() < 1e-10
    assert torch.allclose(exact_hessian(model, F.cross_entropy, loader), h, rtol=0, atol=1e-13)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    assert (HessianOperator(model, F.cross_entropy, dl).matvec(v) - h @ v).norm() / (h @ v).norm() < 1e-10


def test_seeded_results_are_deterministic_and_leave_the_global_rng_alone(batch, trained):
    x, y = batch
    model = trained[0]
    op = HessianOperator(model, F.cross_entropy, (x, y))
    state = torch.get_rng_state()

    def everything(seed):
        g = torch.Generator().manual_seed(seed)
        vals, vecs = op.top_eigen(2, generator=g)
        lvals, _ = op.top_eigen(2, method="lanczos", generator=g)
        return vals, vecs[0][0], lvals, torch.tensor(op.trace(20, generator=g)), *op.esd(20, 2, generator=g)

    a, b, c = everything(5), everything(5), everything(6)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[-2], c[-2]) and not torch.equal(a[3], c[3])
    assert all(torch.equal(s, t) for s, t in zip(op.esd(10), op.esd(10)))  # generator=None: seed 0
    assert torch.equal(torch.get_rng_state(), state)


def test_model_state_is_restored_exactly(batch):
    x, y = batch
    model = train(mlp(nn.GELU, bn=True), x, y, 20)
    model[0].bias.requires_grad_(False)
    model.train()
    model[1].eval()  # a mixed train/eval state must come back as it was
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]

    op = HessianOperator(model, F.cross_entropy, (x, y))
    assert op.numel == sum(p.numel() for p in model.parameters()) - 8
    op.top_eigen(2, max_iter=20)
    op.top_eigen(1, max_iter=20, method="lanczos")
    op.trace(5)
    op.esd(10)
    h = exact_hessian(model, F.cross_entropy, (x, y))
    hvps_to_accuracy(op, "lanczos")

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    # the Hessian is taken in eval mode (BatchNorm running statistics), over requires_grad params only
    frozen = copy.deepcopy(model).eval()
    ref = torch.autograd.functional.hessian(
        lambda w1, g1, b1, w2, b2: F.cross_entropy(functional_call(frozen, {
            "0.weight": w1, "1.weight": g1, "1.bias": b1, "3.weight": w2, "3.bias": b2}, (x,)), y),
        tuple(p.detach() for p in op.params))
    flat_ref = torch.cat([torch.cat([blk.reshape(op.params[i].numel(), -1) for blk in row], dim=1)
                          for i, row in enumerate(ref)])
    assert torch.allclose(h, flat_ref, rtol=0, atol=1e-12)


def test_operator_is_the_hessian_at_construction(batch, trained):
    x, y = batch
    model = copy.deepcopy(trained[0])
    op = HessianOperator(model, F.cross_entropy, (x, y))
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = op.matvec(v)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert torch.equal(op.matvec(v), before)


# ---- speed helper ------------------------------------------------------------------------------------------
def test_hvps_to_accuracy_counts_and_lanczos_wins(batch, trained):
    x, y = batch
    op = HessianOperator(trained[0], F.cross_entropy, (x, y))
    power = hvps_to_accuracy(op, "power", generator=torch.Generator().manual_seed(0))
    lanczos = hvps_to_accuracy(op, "lanczos", generator=torch.Generator().manual_seed(0))
    assert 1 <= lanczos <= power
    with pytest.raises(RuntimeError, match="did not reach"):
        hvps_to_accuracy(op, "power", max_hvps=power - 1, generator=torch.Generator().manual_seed(0))
    assert hvps_to_accuracy(op, "power", max_hvps=power, generator=torch.Generator().manual_seed(0)) == power
    with pytest.raises(ValueError, match="unknown method"):
        hvps_to_accuracy(op, "arnoldi")


# ---- errors ------------------------------------------------------------------------------------------------
def test_errors(batch, trained):
    x, y = batch
    model = trained[0]
    op = HessianOperator(model, F.cross_entropy, (x, y))
    with pytest.raises(TypeError, match="nn.Module"):
        HessianOperator(lambda t: t, F.cross_entropy, (x, y))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        HessianOperator(model, "ce", (x, y))
    with pytest.raises(TypeError, match="iterator"):
        HessianOperator(model, F.cross_entropy, iter([(x, y)]))
    with pytest.raises(TypeError, match="one batch"):
        HessianOperator(model, F.cross_entropy, x)
    with pytest.raises(TypeError, match="pair"):
        HessianOperator(model, F.cross_entropy, [x, y, x]).matvec(torch.zeros(op.numel, dtype=torch.float64))
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(model, F.cross_entropy, []).matvec(torch.zeros(op.numel, dtype=torch.float64))
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        HessianOperator(frozen, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"expected a flat tensor of shape \(610,\)"):
        op.matvec(torch.zeros(609))
    with pytest.raises(ValueError, match="expected a list of 4 tensors"):
        op.hvp([torch.zeros(3)])
    with pytest.raises(ValueError, match=r"vector 1 \(0.bias\): expected shape \(8,\)"):
        op.hvp([torch.zeros(8, 64), torch.zeros(9), torch.zeros(10, 8), torch.zeros(10)])
    with pytest.raises(ValueError, match="unknown method"):
        op.top_eigen(method="arnoldi")
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        op.top_eigen(k=611)
    with pytest.raises(ValueError, match="max_iter >= k"):
        op.top_eigen(k=3, max_iter=2, method="lanczos")
    with pytest.raises(ValueError, match="tol must be a positive"):
        op.top_eigen(tol=0)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        op.trace(0)
    with pytest.raises(ValueError, match="n_iter must be a positive int"):
        op.esd(n_iter=0)
    with pytest.raises(TypeError, match="generator"):
        op.trace(2, generator=0)
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y)).trace(1)


def test_models_that_break_double_backward_raise(batch):
    x, y = batch

    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10).double()

        def forward(self, t):
            with torch.no_grad():
                return self.lin(t)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10).double()

        def forward(self, t):
            out = self.lin(t)
            return out.detach() + out - out.detach()  # first-order correct, not twice differentiable
    with pytest.raises(RuntimeError, match="does not depend on the parameters"):
        HessianOperator(NoGrad(), F.cross_entropy, (x, y)).trace(1)

    class Kinked(nn.Module):
        """A custom autograd function without double backward."""
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10).double()

        def forward(self, t):
            return _Once.apply(self.lin(t))

    with pytest.raises(RuntimeError, match="does not reach the parameters"):
        HessianOperator(Kinked(), F.cross_entropy, (x, y)).trace(1)
    # a detach that keeps the value and first derivative is still a valid (here linear-model) Hessian
    assert math.isfinite(HessianOperator(Detached(), F.cross_entropy, (x, y)).trace(1))


class _Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t * 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g * 2


def test_float32_top_eigenvalue_within_the_general_rule(batch, trained):
    x, y = batch
    model, h, _, _ = trained
    exact = top_by_magnitude(h, 1)
    op = HessianOperator(copy.deepcopy(model).float(), F.cross_entropy, (x.float(), y))
    for method in ("power", "lanczos"):
        vals, vecs = op.top_eigen(1, method=method)
        assert vals.dtype == vecs[0][0].dtype == torch.float32
        assert abs(float(vals[0]) - float(exact[0])) < 1e-3 * abs(float(exact[0]))


def test_linear_loss_and_unused_parameters_have_zero_hessian_rows():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1, bias=False).double()
            self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, t):
            return self.lin(t)

    data = (torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    linear = HessianOperator(Net(), lambda out, t: out.mean(), data)
    assert torch.equal(linear.matvec(torch.ones(5, dtype=torch.float64)), torch.zeros(5, dtype=torch.float64))
    net = Net()
    op = HessianOperator(net, F.mse_loss, data)
    hv = op.matvec(torch.ones(5, dtype=torch.float64))
    assert op.params[0] is net.unused  # own parameters come before the submodules'
    assert torch.equal(hv[:2], torch.zeros(2, dtype=torch.float64)) and hv[2:].abs().sum() > 0
    assert torch.allclose(exact_hessian(net, F.mse_loss, data) @ torch.ones(5, dtype=torch.float64), hv)
