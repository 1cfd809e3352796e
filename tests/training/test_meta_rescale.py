import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normlab.bench.experiment import intra_op_threads
from normlab.training.meta_rescale import STORM, LossRescaler, lookahead_meta_loss, rescaler_features


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on shared cores (up to 20x slower)."""
    with intra_op_threads(1):
        yield


def mlp(seed=0, dropout=0.0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def data(n=40, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


# -- features ----------------------------------------------------------------------------------------

def test_features_match_hand_formulas_and_carry_no_grad():
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    f = rescaler_features(z, y)
    assert f.shape == (7, 5) and not f.requires_grad and f.dtype == torch.float64
    p = torch.exp(z.detach()) / torch.exp(z.detach()).sum(1, keepdim=True)
    rows = torch.arange(7)
    torch.testing.assert_close(f[:, 0], -torch.log(p[rows, y]))
    torch.testing.assert_close(f[:, 1], p[rows, y])
    torch.testing.assert_close(f[:, 2], p.max(1).values)
    torch.testing.assert_close(f[:, 3], -(p * torch.log(p)).sum(1))
    torch.testing.assert_close(f[:, 4], (p.argmax(1) == y).double())


def test_features_with_several_passes_are_means_and_stds():
    z = torch.randn(3, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    f = rescaler_features(z, y)
    assert f.shape == (6, 7)
    single = torch.stack([rescaler_features(z[g], y) for g in range(3)])
    torch.testing.assert_close(f[:, :5], single.mean(0))
    torch.testing.assert_close(f[:, 5], single[:, :, 0].std(0, unbiased=False))
    torch.testing.assert_close(f[:, 6], single[:, :, 1].std(0, unbiased=False))


def test_features_half_input_in_float32_and_entropy_clamped():
    z = torch.tensor([[100.0, -100.0, 0.0]], dtype=torch.float16).repeat(2, 1)
    f = rescaler_features(z, torch.tensor([0, 1]))
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert f[0, 3] >= 0


def test_features_reject_bad_labels_naming_the_index():
    with pytest.raises(ValueError, match="label 7 at index 2 is outside"):
        rescaler_features(torch.randn(4, 5), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="label -1 at index 0"):
        rescaler_features(torch.randn(4, 5), torch.tensor([-1, 1, 3, 2]))
    with pytest.raises(TypeError, match="int64"):
        rescaler_features(torch.randn(4, 5), torch.tensor([0.0, 1, 3, 2]))
    with pytest.raises(ValueError, match="shape"):
        rescaler_features(torch.randn(4), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        rescaler_features(torch.randn(4, 5), torch.tensor([0, 1]))


# -- rescaler ----------------------------------------------------------------------------------------

def test_rescaler_starts_uniform_and_has_the_sheet_shape():
    r = LossRescaler()
    assert (r.fc1.in_features, r.fc1.out_features, r.fc2.out_features) == (5, 32, 1)
    u = r(torch.randn(9, 5))
    assert u.shape == (9,) and torch.equal(u, torch.full((9,), 0.5))
    r2 = LossRescaler(7, hidden=8, init_uniform=False)
    u2 = r2(torch.randn(9, 7))
    assert ((u2 > 0) & (u2 < 1)).all() and not torch.allclose(u2, u2[0].expand(9))
    with pytest.raises(ValueError, match=r"features must have shape \(b, 5\)"):
        r(torch.randn(3, 4))
    with pytest.raises(ValueError, match="hidden"):
        LossRescaler(5, hidden=0)


# -- equivalence with plain cross-entropy ------------------------------------------------------------

@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_frozen_uniform_rescaler_step_equals_plain_ce_step(opt_name):
    x, y = data()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[opt_name]
    ref, model = mlp(), mlp()
    ref_opt, opt = make(ref.parameters()), make(model.parameters())
    storm = STORM(model, opt)
    for _ in range(2):
        out = storm.step(x, y)  # dataset=None: no meta step, the zero-init rescaler stays at u = 0.5
        assert torch.equal(out["weights"], torch.ones(len(y)))
        assert out["meta_loss"] is None
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_warmup_steps_are_plain_ce_and_skip_the_meta_step():
    x, y = data()
    ref, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=2)
    r0 = copy.deepcopy(storm.rescaler.state_dict())
    for _ in range(2):
        out = storm.step(x, y, (x, y))
        assert out["meta_loss"] is None
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert all(torch.equal(v, storm.rescaler.state_dict()[k]) for k, v in r0.items())
    out = storm.step(x, y, (x, y))
    assert out["meta_loss"] is not None
    assert not torch.equal(r0["fc2.weight"], storm.rescaler.fc2.weight)


# -- the look-ahead meta objective ----------------------------------------------------------------

def _linear_problem():
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    xv, yv = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    with torch.no_grad():
        f, fv = rescaler_features(model(x), y), rescaler_features(model(xv), yv)
    torch.manual_seed(4)
    rescaler = LossRescaler(5, hidden=6, init_uniform=False).double()
    return model, rescaler, x, y, f, xv, yv, fv


def _hand_meta_loss(model, w_params, x, y, f, xv, yv, fv, lr):
    """Independent reference: linear softmax model, closed-form CE gradient (p - onehot) x^T."""
    def u(feats):
        w1, b1, w2, b2 = w_params
        return torch.sigmoid(torch.relu(feats @ w1.T + b1) @ w2.T + b2).squeeze(-1)
    W, c = model.weight.detach(), model.bias.detach()
    uw = u(f)
    wh = uw / uw.sum()
    p = torch.softmax(x @ W.T + c, 1)
    r = (p - F.one_hot(y, 3).double()) * wh[:, None]
    W2, c2 = W - lr * r.T @ x, c - lr * r.sum(0)
    uv = u(fv)
    lv = -torch.log_softmax(xv @ W2.T + c2, 1)[torch.arange(len(yv)), yv]
    return (uv / uv.sum() * lv).sum()


def test_meta_loss_matches_the_hand_formula():
    model, rescaler, x, y, f, xv, yv, fv = _linear_problem()
    got = lookahead_meta_loss(model, rescaler, x, y, f, xv, yv, fv, 0.5)
    want = _hand_meta_loss(model, list(rescaler.parameters()), x, y, f, xv, yv, fv, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_meta_gradient_matches_central_finite_differences_and_gradcheck():
    model, rescaler, x, y, f, xv, yv, fv = _linear_problem()
    names = [n for n, _ in rescaler.named_parameters()]
    omega = [p.detach().clone().requires_grad_() for p in rescaler.parameters()]

    def meta(*ws):
        rescale = lambda feats: functional_call(rescaler, dict(zip(names, ws)), (feats,))  # noqa: E731
        return lookahead_meta_loss(model, rescale, x, y, f, xv, yv, fv, 0.5)

    grads = torch.autograd.grad(meta(*omega), omega)
    flat = torch.cat([g.flatten() for g in grads])
    h, fd = 1e-6, []
    for k, w in enumerate(omega):
        for i in range(w.numel()):
            plus = [v.detach().clone() for v in omega]
            minus = [v.detach().clone() for v in omega]
            plus[k].view(-1)[i] += h
            minus[k].view(-1)[i] -= h
            fd.append((meta(*plus) - meta(*minus)) / (2 * h))
    fd = torch.stack(fd)
    assert flat.abs().max() > 1e-4  # a real gradient, not all zeros
    assert ((flat - fd).norm() / fd.norm()) < 1e-5
    assert torch.autograd.gradcheck(meta, tuple(omega))
    # the meta path through theta' matters: dropping it (lookahead lr -> 0) changes the gradient
    only_outer = torch.autograd.grad(
        lookahead_meta_loss(model, rescaler, x, y, f, xv, yv, fv, 1e-12), list(rescaler.parameters()))
    assert not torch.allclose(torch.cat([g.flatten() for g in only_outer]), flat, atol=1e-6)


def test_meta_loss_leaves_the_model_untouched():
    model = mlp(bn=True)
    x, y = data()
    before = copy.deepcopy(model.state_dict())
    f = rescaler_features(model(x).detach(), y)
    model.load_state_dict(before)
    lookahead_meta_loss(model, LossRescaler(), x, y, f, x, y, f, 0.1).backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- the STORM loop -----------------------------------------------------------------------------------

def _run(seed=0, steps=4, **kw):
    x, y = data(64, seed=1)
    model = mlp(dropout=0.2 if kw.get("forward_passes", 1) > 1 else 0.0)
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                  generator=torch.Generator().manual_seed(seed), **kw)
    outs = [storm.step(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16], (x, y)) for i in range(steps)]
    return storm, outs


@pytest.mark.parametrize("passes", [1, 3])
def test_same_generator_gives_identical_weights(passes):
    _, a = _run(0, forward_passes=passes, rescaler_lr=0.05)
    _, b = _run(0, forward_passes=passes, rescaler_lr=0.05)
    _, c = _run(1, forward_passes=passes, rescaler_lr=0.05)
    assert all(torch.equal(p["weights"], q["weights"]) for p, q in zip(a, b))
    assert not torch.equal(a[-1]["weights"], torch.ones(16))
    assert not all(torch.equal(p["weights"], q["weights"]) for p, q in zip(a, c))
    for out in a:
        torch.testing.assert_close(out["weights"].mean(), torch.tensor(1.0))


def test_global_rng_untouched_by_storm_sampling():
    torch.manual_seed(0)
    x, y = data(64, seed=1)
    model = mlp()
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1), forward_passes=2,
                  generator=torch.Generator().manual_seed(0))
    model.eval()  # no dropout in the inner forward: any global RNG use would be STORM's own
    state = torch.get_rng_state()
    storm.step(x[:16], y[:16], (x, y))
    storm.weights(x, y)
    assert torch.equal(state, torch.get_rng_state())


def test_batchnorm_statistics_updated_only_by_the_inner_forward():
    x, y = data(64, seed=1)
    model, ref = mlp(bn=True), mlp(bn=True)
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    storm.step(x[:16], y[:16], (x, y))
    ref(x[:16])  # one train-mode forward of the batch
    bn, bn_ref = model[1], ref[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_pool_sampler_callable_and_meta_every():
    x, y = data(64, seed=1)
    calls = []

    def sampler(k, generator):
        calls.append(k)
        idx = torch.randint(0, 64, (k,), generator=generator)
        return x[idx], y[idx]

    model = mlp()
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_every=2, pool_factor=3)
    metas = [storm.step(x[:16], y[:16], sampler)["meta_loss"] for _ in range(4)]
    assert calls == [48, 48]
    assert [m is not None for m in metas] == [True, False, True, False]


def test_state_dict_resumes_exactly():
    x, y = data(64, seed=1)
    storm, _ = _run(0, steps=2, rescaler_lr=0.05)
    saved = copy.deepcopy(storm.state_dict())
    cont = [storm.step(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16], (x, y))["weights"] for i in range(2)]
    model = mlp()
    other = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rescaler_lr=0.05)
    other.load_state_dict(saved)
    assert other.steps == 2
    again = [other.step(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16], (x, y))["weights"] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(cont, again))
    for a, b in zip(storm.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"model": saved["model"]})


class Peaked(nn.Module):
    """A rescaler that puts (almost) all weight on the first example of the batch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features):
        u = torch.full((len(features),), 1e-6)
        u[0] = 1.0
        return u * self.scale


def test_effective_sample_size_warning_on_collapse():
    x, y = data(64, seed=1)
    model = mlp()
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1), rescaler=Peaked())
    with pytest.warns(UserWarning, match="effective sample size"):
        out = storm.step(x[:32], y[:32])
    assert out["ess"] < 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        STORM(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1)).step(x[:32], y[:32])


def test_errors():
    x, y = data(64, seed=1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    storm = STORM(model, opt)
    with pytest.raises(ValueError, match="at least 2"):
        storm.step(x[:1], y[:1])
    with pytest.raises(ValueError, match="fewer than the batch size 16"):
        storm.step(x[:16], y[:16], (x[:10], y[:10]))
    with pytest.raises(ValueError, match="label 9 at index 3"):
        bad = y[:16].clone()
        bad[3] = 9
        storm.step(x[:16], bad)
    with pytest.raises(TypeError, match="dataset must be"):
        storm.step(x[:16], y[:16], x)
    with pytest.raises(ValueError, match="differ in length"):
        storm.step(x[:16], y[:16], (x, y[:30]))
    with pytest.raises(ValueError, match="differ in batch size"):
        storm.step(x[:16], y[:8])
    with pytest.raises(ValueError, match="one loss per example"):
        STORM(model, opt, loss_fn=lambda z, t, reduction: F.cross_entropy(z, t)).step(x[:16], y[:16])
    with pytest.raises(ValueError, match="Invalid rescaler_lr: 0"):
        STORM(model, opt, rescaler_lr=0)
    with pytest.raises(ValueError, match="Invalid lookahead_lr: -1"):
        STORM(model, opt, lookahead_lr=-1)
    for kw in ({"meta_every": 0}, {"pool_factor": 0}, {"warmup_steps": -1}, {"forward_passes": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            STORM(model, opt, **kw)
    with pytest.raises(ValueError, match="takes 5 features"):
        STORM(model, opt, forward_passes=3, rescaler=LossRescaler(5))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        STORM(model, "sgd")
    with pytest.raises(TypeError, match="torch.Generator"):
        STORM(model, opt, generator=0)


def test_clean_examples_get_more_weight_on_an_imbalanced_noisy_task():
    """Not a gate (sheet pitfall): 3 Gaussian classes at 70/20/10 %, 30 % symmetric noise. The rescaler
    must not treat the minority class as noise: its clean examples keep more weight than flipped ones."""
    g = torch.Generator().manual_seed(0)
    counts = (420, 120, 60)
    y_true = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    x = centers[y_true] + 0.6 * torch.randn(len(y_true), 2, generator=g)
    y = y_true.clone()
    noisy = torch.rand(len(y), generator=g) < 0.3
    y[noisy] = torch.randint(0, 3, (int(noisy.sum()),), generator=g)
    flipped = y != y_true
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    storm = STORM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rescaler_lr=1e-2,
                  warmup_steps=40, generator=torch.Generator().manual_seed(0))
    for epoch in range(12):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 50):
            storm.step(x[perm[i:i + 50]], y[perm[i:i + 50]], (x, y))
    w = storm.weights(x, y)
    minority_clean = (y_true == 2) & ~flipped
    assert w[~flipped].mean() > 2 * w[flipped].mean()
    assert w[minority_clean].mean() > 2 * w[flipped].mean()
