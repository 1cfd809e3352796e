"""ZOAdam, SubspaceDenoiser and partial_uniform_timesteps (the zo_subspace sheet's "Verification a")."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from normlab.bench.experiment import intra_op_threads
from normlab.optim.zo_subspace import (
    ZERO_STEPS_WARN, SubspaceDenoiser, ZOAdam, partial_uniform_timesteps, probe_direction, zo_adam_update,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on the shared cores."""
    with intra_op_threads(1):
        yield


def _seeds(generator_seed: int, steps: int, n: int) -> list[list[int]]:
    """The probe seeds ZOAdam draws from a private generator seeded with ``generator_seed``."""
    gen = torch.Generator().manual_seed(generator_seed)
    return [torch.randint(0, 2 ** 62, (n,), generator=gen).tolist() for _ in range(steps)]


def _randn(seed: int, d: int, dtype) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _quadratic(d=32, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=dtype)
    a = a @ a.T / d + torch.eye(d, dtype=dtype)
    b = torch.randn(d, generator=gen, dtype=dtype)
    return a, b


# --------------------------------------------------------------------------- seed trick and restore


def test_seed_trick_regenerates_the_probe_bitwise():
    d, mu = 40, 1e-3
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    v0 = v.clone()
    seen = []

    def closure():
        seen.append(v.clone())
        return (v ** 2).sum()

    opt = ZOAdam([v], lr=0.0, mu=mu, n_probes=3, generator=torch.Generator().manual_seed(7))
    opt.step(closure)
    seeds = _seeds(7, 1, 3)[0]
    base = v0
    for i, seed in enumerate(seeds):
        z = probe_direction(seed, d, torch.float32, "cpu")
        assert torch.equal(z, probe_direction(seed, d, torch.float32, "cpu"))
        assert torch.equal(z, _randn(seed, d, torch.float32))
        assert torch.equal(seen[i + 1], base + z * mu)
        base = seen[i + 1] - z * mu  # restored by subtraction, as the official code does
    assert torch.equal(v, base)
    # the update used the same z: m after one step = (1 - beta1) g_hat with g_hat built from those z
    losses = [float((s ** 2).sum()) for s in seen]
    g_hat = sum((losses[i + 1] - losses[0]) / mu * _randn(s, d, torch.float32).double() for i, s in enumerate(seeds))
    g_hat = g_hat / (3 * math.sqrt((d + 3 - 1) / 3))
    torch.testing.assert_close(opt.state[v]["exp_avg"].double(), 0.1 * g_hat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lr_zero_restores_within_the_rounding_bound(dtype):
    d, mu, n = 64, 1e-3, 2
    v = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=dtype) * 10
    v[:8] = 0.0
    v[8:16] *= 1e-6
    v0 = v.clone()
    opt = ZOAdam([v], lr=0.0, mu=mu, n_probes=n, generator=torch.Generator().manual_seed(2))
    opt.step(lambda: (v ** 2).sum())
    zmax = torch.stack([probe_direction(s, d, dtype, "cpu") for s in _seeds(2, 1, n)[0]]).abs().amax(0)
    bound = n * torch.finfo(dtype).eps * (v0.abs() + mu * zmax)
    assert bool(((v - v0).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_use_a_float32_master_and_restore_bitwise(dtype):
    v = (torch.randn(50, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    v0 = v.clone()
    opt = ZOAdam([v], lr=0.0, generator=torch.Generator().manual_seed(0))
    opt.step(lambda: (v.float() ** 2).sum())
    assert torch.equal(v, v0)
    state = opt.state[v]
    assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # and it trains: the float32 master accumulates steps below the parameter's resolution
    opt.param_groups[0]["lr"] = 1e-2
    before = float((v.float() ** 2).sum())
    for _ in range(50):
        opt.step(lambda: (v.float() ** 2).sum())
    assert float((v.float() ** 2).sum()) < before
    assert torch.equal(v, state["master"].to(dtype))


# --------------------------------------------------------------------------- estimator


def test_finite_difference_is_the_directional_derivative_plus_curvature():
    a, b = _quadratic()
    v = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mu = 1e-3
    loss = lambda: 0.5 * v @ a @ v + b @ v  # noqa: E731
    assert 10 < abs(float(loss())) < 100
    grad = a @ v + b
    gen_seed = 11
    opt = ZOAdam([v], lr=0.0, betas=(0.0, 0.999), mu=mu, n_probes=1, norm_scale=False,
                 generator=torch.Generator().manual_seed(gen_seed))
    for seeds in _seeds(gen_seed, 5, 1):
        opt.step(loss)
        z = _randn(seeds[0], 32, torch.float64)
        g_hat = opt.state[v]["exp_avg"]  # beta1 = 0: exactly g_1 z_1
        g1 = float(g_hat @ z / (z @ z))
        expected = float(z @ grad + mu / 2 * z @ a @ z)
        assert abs(g1 - expected) < 1e-10


def test_estimator_is_unbiased_up_to_the_norm_scale():
    # the sheet's protocol: mu = 1e-6, d = 32, 10,000 steps x n = 2 probes, no denoiser, v fixed (lr = 0)
    a, b = _quadratic()
    v = torch.randn(32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grad = a @ v + b
    loss = lambda: 0.5 * v @ a @ v + b @ v  # noqa: E731
    opt = ZOAdam([v], lr=0.0, betas=(0.0, 0.999), mu=1e-6, n_probes=2, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(32, dtype=torch.float64)
    steps = 10_000
    for _ in range(steps):
        opt.step(loss)
        total += opt.state[v]["exp_avg"]
    est = math.sqrt((32 + 2 - 1) / 2) * total / steps
    cosine = float(est @ grad / (est.norm() * grad.norm()))
    ratio = float(est.norm() / grad.norm())
    assert cosine > 0.99 and 0.95 <= ratio <= 1.05, (cosine, ratio)


def test_adam_part_matches_a_hand_written_adam():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(20, generator=gen) * 10 ** float(torch.empty(1).uniform_(-4, 0, generator=gen))
             for _ in range(30)]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-3, 0.1
    x = torch.randn(20, generator=gen)
    m, s = torch.zeros(20), torch.zeros(20)
    xr = x.double().clone()
    mr, sr = torch.zeros(20, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        zo_adam_update(x, g.clone(), m, s, t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
        gd = g.double()
        mr = b1 * mr + (1 - b1) * gd
        sr = b2 * sr + (1 - b2) * gd * gd
        xr = xr * (1 - lr * wd) - lr * (mr / (1 - b1 ** t)) / ((sr / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(x.double(), xr, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- denoiser


def _random_walk(steps, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, d, dtype=dtype)
    return (torch.randn(steps, d, generator=gen, dtype=dtype) * scales).cumsum(0)


def test_denoiser_is_identity_before_refresh_then_an_orthogonal_idempotent_projection():
    den = SubspaceDenoiser(history=16, nu=0.05)
    g = torch.randn(24, generator=torch.Generator().manual_seed(1))
    walk = _random_walk(16, 24)
    for k, row in enumerate(walk):
        assert den(g) is g and den.removed_dim == 0
        den.observe(row)
    assert den.count == 16 and 0 < den.removed_dim <= 15
    out = den(g)
    assert den.basis.shape == (den.removed_dim, 24) and den.basis.dtype == torch.float32
    assert float((den.basis @ out).abs().max()) < 1e-5 * float(g.norm())
    torch.testing.assert_close(den(out), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(den.basis @ den.basis.T, torch.eye(den.removed_dim), rtol=0, atol=1e-5)


def test_keep_top_projects_onto_the_leading_directions():
    den = SubspaceDenoiser(history=16, nu=0.05, mode="keep_top")
    for row in _random_walk(16, 24):
        den.observe(row)
    kept = den.basis.shape[0]
    assert den.removed_dim == 24 - kept and 1 <= kept < 15
    g = torch.randn(24, generator=torch.Generator().manual_seed(2))
    out = den(g)
    torch.testing.assert_close(out, den.basis.T @ (den.basis @ g))
    torch.testing.assert_close(den(out), out, rtol=0, atol=1e-5)


def test_affine_3d_history_keeps_three_and_removes_nothing():
    gen = torch.Generator().manual_seed(0)
    d, tau = 30, 20
    directions = torch.linalg.qr(torch.randn(d, 3, generator=gen, dtype=torch.float64))[0].T
    coef = torch.randn(tau, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64)
    history = 5.0 + coef @ directions
    den = SubspaceDenoiser(history=tau, nu=1e-3, standardize=False)
    for row in history:
        den.observe(row)
    assert den.removed_dim == 0 and den.basis is None
    keep = SubspaceDenoiser(history=tau, nu=1e-3, standardize=False, mode="keep_top")
    for row in history:
        keep.observe(row)
    assert keep.basis.shape[0] == 3 and keep.removed_dim == d - 3


def test_constant_history_removes_nothing_and_nonfinite_history_raises():
    den = SubspaceDenoiser(history=4)
    for _ in range(4):
        den.observe(torch.full((10,), 0.3))
    assert den.removed_dim == 0 and den.basis is None
    bad = SubspaceDenoiser(history=2)
    bad.observe(torch.zeros(5))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        bad.observe(torch.tensor([0.0, float("nan"), 1.0, 2.0, 3.0]))


def test_denoiser_state_dict_round_trip():
    den = SubspaceDenoiser(history=8, nu=0.05)
    walk = _random_walk(12, 10)
    for row in walk[:9]:
        den.observe(row)
    clone = SubspaceDenoiser(history=8, nu=0.05)
    clone.load_state_dict(copy.deepcopy(den.state_dict()))
    for row in walk[9:]:
        den.observe(row)
        clone.observe(row)
    g = torch.randn(10)
    assert torch.equal(den(g), clone(g)) and den.removed_dim == clone.removed_dim
    assert torch.equal(den.buffer, clone.buffer)
    with pytest.raises(ValueError, match="history 8"):
        SubspaceDenoiser(history=4).load_state_dict(den.state_dict())


# --------------------------------------------------------------------------- against the official loop


def _official_loop(loss_fn, v0, seeds, *, lr, tau, nu, n, mu=1e-3):
    """train_zoodip.py's zo_step + ZOAdam.update + the PCA refresh, re-typed (sklearn PCA and StandardScaler
    as in the code, on the history in float64, V cast back to the parameter dtype), with the zero-variance
    components excluded (the sheet's departure)."""
    v = v0.clone()
    m = torch.zeros_like(v)
    s = torch.zeros_like(v)
    d = v.numel()
    dim, eig = d, None
    buffer, idx = [], 0
    out = []
    for it, step_seeds in enumerate(seeds, 1):
        l0 = float(loss_fn(v))
        grads = []
        for seed in step_seeds:
            z = _randn(seed, d, v.dtype)
            v.add_(z * mu)
            l1 = float(loss_fn(v))
            v.sub_(z * mu)
            grads.append((l1 - l0) / mu)
        grad = 0
        for seed, g in zip(step_seeds, grads):
            grad = grad + g * _randn(seed, d, v.dtype)
        grad = grad / (np.sqrt((dim + n - 1) / n) * n)
        if eig is not None:
            grad = grad - grad @ eig.T @ eig
        m = 0.9 * m + (1 - 0.9) * grad
        s = 0.999 * s + (1 - 0.999) * grad ** 2
        v = v - lr * (m / (1 - 0.9 ** it)) / (torch.sqrt(s / (1 - 0.999 ** it)) + 1e-3)
        if len(buffer) < tau:
            buffer.append(v.clone())
        else:
            buffer[idx] = v.clone()
        idx = (idx + 1) % tau
        if it % tau == 0:
            history = StandardScaler().fit_transform(torch.stack(buffer).double().numpy())
            pca = PCA(n_components=tau, svd_solver="full").fit(history)
            cum = np.cumsum(pca.explained_variance_ratio_)
            i = int(np.argmax(cum > 1 - nu))
            rho = int((pca.explained_variance_ratio_ > 1e-12).sum())
            eig = torch.tensor(pca.components_[i + 1: rho]).to(v.dtype) if rho - i - 1 > 0 else None
            dim = d - (0 if eig is None else eig.shape[0])
        out.append((v.clone(), m.clone(), s.clone(), dim))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nu", [1e-3, 0.05, 0.3])
def test_matches_the_official_loop(nu, dtype):
    # float64: 1e-12 after the first refresh (measured <= 4.2e-13: sklearn's and torch's SVD round differently
    # and the loss difference / mu amplifies it); float32: bitwise before the first refresh, and measured bitwise
    # after it too (both sides compute the basis in float64 and round it to float32); bound from the sheet
    d, tau, n, steps, lr = 96, 16, 2, 50, 3e-2
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(48, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    target = torch.randn(48, generator=gen, dtype=torch.float64).to(dtype)
    loss_fn = lambda x: torch.nn.functional.softplus(w @ x - target).square().mean()  # noqa: E731
    v0 = (torch.randn(d, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    ref = _official_loop(loss_fn, v0, _seeds(4, steps, n), lr=lr, tau=tau, nu=nu, n=n)
    v = v0.clone()
    den = SubspaceDenoiser(history=tau, nu=nu)
    opt = ZOAdam([v], lr=lr, n_probes=n, subspace=den, generator=torch.Generator().manual_seed(4))
    removed = 0
    for k, (rv, rm, rs, dim) in enumerate(ref):
        opt.step(lambda: loss_fn(v))
        st = opt.state[v]
        for got, want in ((v, rv), (st["exp_avg"], rm), (st["exp_avg_sq"], rs)):
            assert float((got - want).abs().max()) <= tol, k
            assert k >= tau or torch.equal(got, want)  # same operations: bitwise up to the first refresh
        assert d - den.removed_dim == dim
        removed = max(removed, den.removed_dim)
    assert removed > 0


# --------------------------------------------------------------------------- a model without a gradient path


def _fake_quant(w):
    scale = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / scale) * scale


def test_trains_a_fake_quantised_model_without_autograd():
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 24, generator=gen) / 5, torch.randn(1, 32, generator=gen) / 6
    x = torch.randn(64, 8, generator=gen)
    v_star = torch.randn(16, generator=gen)
    token = torch.zeros(16, requires_grad=False)

    def model(tok):
        inp = torch.cat([x, tok.expand(len(x), -1)], 1)
        return torch.relu(inp @ _fake_quant(w1).T) @ _fake_quant(w2).T

    y = model(v_star)
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        return (model(token) - y).square().mean()

    opt = ZOAdam([token], lr=3e-2, subspace=SubspaceDenoiser(history=32), generator=torch.Generator().manual_seed(0))
    first = float(closure())
    for _ in range(300):
        opt.step(closure)
    assert float(closure()) < 0.2 * first
    assert token.grad is None and not any(grad_modes[1:-1])
    assert opt.denoisers[0].count == 300


# --------------------------------------------------------------------------- PUTS


def test_partial_uniform_timesteps():
    gen = torch.Generator().manual_seed(0)
    t = partial_uniform_timesteps(100_000, generator=gen)
    assert t.dtype == torch.long and t.shape == (100_000,)
    assert int(t.min()) == 500 and int(t.max()) == 899
    counts = torch.bincount(t - 500, minlength=400).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    assert torch.equal(partial_uniform_timesteps(7, 3, 5, generator=torch.Generator().manual_seed(1)),
                       torch.randint(3, 5, (7,), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match=r"Invalid timestep range: \[900, 500\)"):
        partial_uniform_timesteps(4, 900, 500)
    with pytest.raises(ValueError, match="Invalid batch: -1"):
        partial_uniform_timesteps(-1)


# --------------------------------------------------------------------------- state_dict


def _train(opt, v, target, steps):
    for _ in range(steps):
        opt.step(lambda: (v.float() - target).square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_resume_is_bit_exact(dtype):
    target = torch.randn(20, generator=torch.Generator().manual_seed(0))
    make = lambda v, seed: ZOAdam([v], lr=3e-2, subspace=SubspaceDenoiser(history=6, nu=0.05),  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    straight = torch.zeros(20, dtype=dtype)
    _train(make(straight, 1), straight, target, 20)
    resumed = torch.zeros(20, dtype=dtype)
    first = make(resumed, 1)
    _train(first, resumed, target, 9)
    buf = io.BytesIO()
    torch.save({"v": resumed, "opt": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh_v = saved["v"].clone()
    fresh = make(fresh_v, 99)
    fresh.load_state_dict(saved["opt"])
    assert fresh.state[fresh_v]["exp_avg"].dtype == torch.float32
    _train(fresh, fresh_v, target, 11)
    assert torch.equal(straight, fresh_v)
    assert fresh.denoisers[0].removed_dim > 0


def test_compiled_step_matches_eager():
    """``torch.compile(opt.step)`` (graph breaks at the closure's loss) takes the same steps as eager, a
    subspace refresh and a two-tensor group included."""
    target = torch.randn(12, generator=torch.Generator().manual_seed(0))

    def run(compiled: bool) -> list[torch.Tensor]:
        params = [torch.zeros(12), torch.zeros(3, 4)]
        opt = ZOAdam(params, lr=3e-2, subspace=SubspaceDenoiser(history=4, nu=0.05),
                     generator=torch.Generator().manual_seed(5))
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(10):
            step(lambda: (params[0] - target).square().sum() + (params[1] - 1).square().sum())
        assert opt.denoisers[0].removed_dim > 0
        return params

    for eager, compiled in zip(run(False), run(True)):
        assert torch.equal(eager, compiled)


# --------------------------------------------------------------------------- groups, warnings, errors


def test_param_groups_share_probes_and_get_their_own_denoiser():
    a, b = torch.zeros(6), torch.zeros(4, 2)
    opt = ZOAdam([{"params": [a]}, {"params": [b], "lr": 1e-3}], subspace=lambda: SubspaceDenoiser(history=4),
                 generator=torch.Generator().manual_seed(0))
    calls = []
    closure = lambda: calls.append(1) or (a - 1).square().sum() + (b + 1).square().sum()  # noqa: E731
    for _ in range(5):
        opt.step(closure)
    assert len(calls) == 15 and opt.denoisers[0] is not opt.denoisers[1]
    assert opt.denoisers[0].count == opt.denoisers[1].count == 5 and opt.denoisers[1].buffer.shape == (4, 8)
    assert float(a.mean()) > 0 and float(b.mean()) < 0 and float(a.abs().mean()) > float(b.abs().mean())
    with pytest.raises(ValueError, match="one SubspaceDenoiser serves one param group"):
        ZOAdam([{"params": [a]}, {"params": [b]}], subspace=SubspaceDenoiser())
    with pytest.raises(ValueError, match="Invalid n_probes: 3"):
        ZOAdam([{"params": [a]}, {"params": [b], "n_probes": 3}])


def test_warns_when_every_difference_is_zero():
    v = torch.zeros(5)
    opt = ZOAdam([v])
    with pytest.warns(RuntimeWarning, match=f"exactly zero for {ZERO_STEPS_WARN} steps"):
        for _ in range(ZERO_STEPS_WARN):
            opt.step(lambda: torch.round(v.sum()))


def test_errors():
    v = torch.zeros(3)
    with pytest.raises(RuntimeError, match="ZOAdam requires a closure"):
        ZOAdam([v]).step()
    for kwargs, match in [({"n_probes": 0}, "Invalid n_probes: 0"), ({"mu": 0.0}, "Invalid mu: 0.0"),
                          ({"mu": -1e-3}, "Invalid mu: -0.001"), ({"lr": -1.0}, "Invalid lr: -1.0"),
                          ({"eps": -1.0}, "Invalid eps: -1.0"), ({"betas": (1.0, 0.9)}, "Invalid beta parameter")]:
        with pytest.raises(ValueError, match=match):
            ZOAdam([v], **kwargs)
    with pytest.raises(ValueError, match="Invalid history: 1"):
        SubspaceDenoiser(history=1)
    for nu in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"Invalid nu: {nu}"):
            SubspaceDenoiser(nu=nu)
    with pytest.raises(ValueError, match="Invalid mode: 'top'"):
        SubspaceDenoiser(mode="top")
    with pytest.raises(ValueError, match="empty parameter list"):
        ZOAdam([])
    with pytest.raises(ValueError, match="sparse"):
        ZOAdam([torch.zeros(3, 3).to_sparse()])
    with pytest.raises(ValueError, match="one dtype and device per param group"):
        ZOAdam([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    opt = ZOAdam([v])
    opt.step(lambda: v.sum())
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2 \\(unperturbed\\)"):
        opt.step(lambda: v.sum() * float("nan"))
    w = torch.zeros(3)
    bad = ZOAdam([w])
    with pytest.raises(FloatingPointError, match="at step 1 \\(probe 1 of 2\\)"):
        bad.step(lambda: torch.where((w == 0).all(), 0.0, float("inf")))
    assert torch.equal(w, torch.zeros(3))  # the probe was undone before raising
