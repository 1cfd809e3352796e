"""Loss landscapes: filter normalisation, grid values against closed forms, Hessian axes, restore, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normlab.analysis.landscape import (evaluate_points, grid_coordinates, hessian_directions, loss_line,
                                        loss_surface, normalize_direction, plot_line, plot_surface,
                                        random_directions)

DT = torch.float64


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10)).to(DT)


def mlp(act: type[nn.Module] = nn.GELU, hidden: int = 6) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, hidden), act(), nn.Linear(hidden, 3)).to(DT)


def batch(n: int = 64, shape: tuple[int, ...] = (10,), classes: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters() if p.requires_grad]


def flat(direction) -> torch.Tensor:
    return torch.cat([d.reshape(-1) for d in direction])


# ---- directions -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [1, 2])
def test_filter_normalization_matches_every_filter_norm(order):
    model = conv_model()
    with torch.no_grad():
        model[0].bias[1] = 0.0  # a zero entry must not break anything
    (d,) = random_directions(model, 1, "filter", order=order, generator=torch.Generator().manual_seed(0))
    for p, di in zip(trainable(model), d):
        assert di.shape == p.shape and di.dtype == p.dtype
        if p.dim() >= 2:
            want = p.flatten(1).norm(p=order, dim=1)
            got = di.flatten(1).norm(p=order, dim=1)
            assert len(got) == p.shape[0]
        else:
            want, got = p.norm(p=order), di.norm(p=order)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_ignore_1d_zeroes_biases_and_norm_parameters():
    model = conv_model()
    (d,) = random_directions(model, 1, "filter", ignore_1d=True, generator=torch.Generator().manual_seed(0))
    for p, di in zip(trainable(model), d):
        if p.dim() == 1:
            assert torch.count_nonzero(di) == 0
        else:
            assert torch.count_nonzero(di) == di.numel()


def test_layer_model_weight_and_none_modes():
    model = conv_model()
    seed = 5
    (raw,) = random_directions(model, 1, None, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    for p, di in zip(trainable(model), raw):  # None: plain N(0, 1) draws in parameter order
        assert torch.equal(di, torch.randn(p.shape, generator=g, dtype=DT))
    (weight,) = random_directions(model, 1, "weight", generator=torch.Generator().manual_seed(seed))
    for p, r, w in zip(trainable(model), raw, weight):
        assert torch.equal(w, r * p)
    (layer,) = random_directions(model, 1, "layer", generator=torch.Generator().manual_seed(seed))
    for p, r, w in zip(trainable(model), raw, layer):
        torch.testing.assert_close(w.norm(), p.norm(), rtol=1e-6, atol=0)
        if p.norm() > 0:  # BatchNorm's bias starts at 0, and so does its direction
            torch.testing.assert_close(w / w.norm(), r / r.norm())  # a rescale, not a new draw
    (whole,) = random_directions(model, 1, "model", generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(flat(whole).norm(), flat(trainable(model)).norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(flat(whole) / flat(whole).norm(), flat(raw) / flat(raw).norm())


def test_normalize_direction_of_a_given_direction():
    model = mlp()
    d = [torch.ones_like(p) for p in trainable(model)]
    out = normalize_direction(d, model, "filter")
    w1 = model[0].weight.detach()
    torch.testing.assert_close(out[0], w1.norm(dim=1, keepdim=True) / 10 ** 0.5 * torch.ones_like(w1))
    assert normalize_direction(d, model, None) is not d and torch.equal(flat(normalize_direction(d, model, None)),
                                                                        flat(d))


def test_random_directions_deterministic_and_global_rng_untouched():
    model = conv_model()
    state = torch.random.get_rng_state()
    a = random_directions(model, 2, generator=torch.Generator().manual_seed(3))
    b = random_directions(model, 2, generator=torch.Generator().manual_seed(3))
    c = random_directions(model, 2, generator=torch.Generator().manual_seed(4))
    default = random_directions(model, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(flat(x), flat(y)) for x, y in zip(a, b))
    assert not torch.equal(flat(a[0]), flat(c[0]))
    assert not torch.equal(flat(a[0]), flat(a[1]))
    assert torch.equal(flat(default[0]), flat(random_directions(model, 1)[0]))


def test_frozen_parameters_are_excluded():
    model = mlp()
    model[0].bias.requires_grad_(False)
    (d,) = random_directions(model, 1, generator=torch.Generator().manual_seed(0))
    assert [t.shape for t in d] == [p.shape for p in trainable(model)] and len(d) == 3


# ---- values -----------------------------------------------------------------------------------------------

def test_quadratic_loss_surface_matches_closed_form():
    """Least squares is exactly quadratic: L(w + a d1 + b d2) = L + a g.d1 + b g.d2 + (a d1 + b d2)^T A (..)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g, dtype=DT), torch.randn(50, 1, generator=g, dtype=DT)
    model = nn.Linear(4, 1).to(DT)
    loss_fn = nn.MSELoss()
    d1 = [torch.randn(p.shape, generator=g, dtype=DT) for p in trainable(model)]
    d2 = [torch.randn(p.shape, generator=g, dtype=DT) for p in trainable(model)]
    gx, gy, losses = loss_surface(model, loss_fn, (x, y), axes=(d1, d2), normalization=None, dist=2.0, steps=9)
    xa = torch.cat([x, torch.ones(50, 1, dtype=DT)], dim=1)  # augmented design: w = (weight, bias)
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    u, v = flat(d1), flat(d2)
    r = xa @ w - y[:, 0]
    a_mat, grad = xa.T @ xa / 50, 2 * xa.T @ r / 50
    coords = torch.linspace(-1.0, 1.0, 9, dtype=DT)
    torch.testing.assert_close(gx[:, 0], coords), torch.testing.assert_close(gy[0], coords)
    step = gx[..., None] * u + gy[..., None] * v  # [9, 9, P]
    want = (r @ r) / 50 + step @ grad + torch.einsum("ijp,pq,ijq->ij", step, a_mat, step)
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12)


def test_loss_line_matches_closed_form_and_loader_weighting():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, 2, generator=g, dtype=DT)
    model = nn.Linear(3, 2, bias=False).to(DT)
    d = [torch.randn(2, 3, generator=g, dtype=DT)]
    loader = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    alphas, losses = loss_line(model, nn.MSELoss(), loader, d, dist=3.0, steps=7)
    torch.testing.assert_close(alphas, torch.linspace(-1.5, 1.5, 7, dtype=DT))
    w = model.weight.detach()
    want = torch.stack([((x @ (w + a * d[0]).T - y) ** 2).mean() for a in alphas])
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-14)


def test_grid_coordinates_centre_is_exactly_zero():
    for steps in (3, 41, 101):
        c = grid_coordinates(1.7, steps)
        assert c[(steps - 1) // 2].item() == 0.0
        torch.testing.assert_close(c, torch.linspace(-0.85, 0.85, steps, dtype=DT))


@pytest.mark.parametrize("chunk_size", [1, None])
def test_centre_value_and_everything_restored(chunk_size):
    model = conv_model()
    model.train()
    model[3].eval()  # a per-module flag that model.train(...) would overwrite; BatchNorm stays in train mode
    model[4].bias.requires_grad_(False)
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
            grads[name] = p.grad
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = batch(40, (1, 8, 8), 10)
    gx, gy, losses = loss_surface(model, nn.CrossEntropyLoss(), data, steps=5, dist=0.4,
                                  generator=torch.Generator().manual_seed(0), chunk_size=chunk_size)
    assert losses.shape == gx.shape == gy.shape == (5, 5)
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    for k, v in model.state_dict().items():  # parameters and BN buffers bit-identical
        assert torch.equal(v, params[k]), k
    for name, p in model.named_parameters():
        assert (p.grad is grads.get(name)) and p.requires_grad == (name != "4.bias")
    model.eval()
    with torch.no_grad():
        centre = nn.CrossEntropyLoss()(model(data[0]), data[1])
    if chunk_size == 1:
        assert losses[2, 2].item() == centre.item()  # plain functional_call: bit-exact
    else:  # vmap's batched matmuls round differently (1 ulp measured)
        torch.testing.assert_close(losses[2, 2], centre, rtol=1e-13, atol=0)


def test_vmap_chunks_equal_plain_loop():
    model = mlp(nn.ReLU)
    data = batch()
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    coords = torch.randn(23, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    ref = evaluate_points(model, nn.CrossEntropyLoss(), data, d, coords, chunk_size=1)
    for chunk in (None, 5, 64):
        got = evaluate_points(model, nn.CrossEntropyLoss(), data, d, coords, chunk_size=chunk)
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    params = dict(model.named_parameters())
    moved = {k: params[k].detach() + coords[3, 0] * d[0][i] + coords[3, 1] * d[1][i] for i, k in enumerate(params)}
    with torch.no_grad():
        assert ref[3].item() == nn.CrossEntropyLoss()(functional_call(model, moved, (data[0],)), data[1]).item()


def test_surface_deterministic_with_generator():
    model, data = mlp(), batch()
    a = loss_surface(model, nn.CrossEntropyLoss(), data, steps=5, generator=torch.Generator().manual_seed(7))
    b = loss_surface(model, nn.CrossEntropyLoss(), data, steps=5, generator=torch.Generator().manual_seed(7))
    c = loss_surface(model, nn.CrossEntropyLoss(), data, steps=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[2], b[2]) and not torch.equal(a[2], c[2])


# ---- Hessian axes -----------------------------------------------------------------------------------------

def exact_hessian_eigh(model: nn.Module, loss_fn, data) -> tuple[torch.Tensor, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for p in trainable(model)]
    sizes = [p.numel() for p in params]

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        parts = theta.split(sizes)
        moved = {n: t.reshape(p.shape) for n, t, p in zip(names, parts, params)}
        return loss_fn(functional_call(model, moved, (data[0],)), data[1])

    h = torch.autograd.functional.hessian(loss_of, flat(params))
    return torch.linalg.eigh(h)


def test_hessian_axes_curvature_equals_eigenvalues():
    model, data, loss_fn = mlp(), batch(), nn.CrossEntropyLoss()
    model.eval()
    evals, evecs = exact_hessian_eigh(model, loss_fn, data)
    order = evals.abs().argsort(descending=True)
    top = evals[order[:2]]
    values, dirs = hessian_directions(model, loss_fn, data, 2, max_iter=1000, tol=1e-10,
                                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, top, rtol=1e-4, atol=0)
    for k in range(2):
        assert abs(flat(dirs[k]) @ evecs[:, order[k]]) > 1 - 1e-4
        torch.testing.assert_close(flat(dirs[k]).norm(), torch.tensor(1.0, dtype=DT))
    h = 1e-3
    _, _, losses = loss_surface(model, loss_fn, data, axes=tuple(dirs), normalization=None, dist=2 * h, steps=3)
    curv_1 = (losses[2, 1] - 2 * losses[1, 1] + losses[0, 1]) / h ** 2
    curv_2 = (losses[1, 2] - 2 * losses[1, 1] + losses[1, 0]) / h ** 2
    mixed = (losses[2, 2] - losses[2, 0] - losses[0, 2] + losses[0, 0]) / (4 * h ** 2)
    torch.testing.assert_close(torch.stack([curv_1, curv_2]), top, rtol=1e-4, atol=0)
    assert abs(mixed) < 1e-4 * abs(top[0])


def test_hessian_axes_option_uses_hessian_directions():
    model, data, loss_fn = mlp(), batch(), nn.CrossEntropyLoss()
    _, dirs = hessian_directions(model, loss_fn, data, 2, generator=torch.Generator().manual_seed(3))
    want = loss_surface(model, loss_fn, data, axes=tuple(dirs), normalization="filter", steps=5)
    got = loss_surface(model, loss_fn, data, axes="hessian", normalization="filter", steps=5,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(got[2], want[2])


# ---- plots ------------------------------------------------------------------------------------------------

def test_plots_write_png_files(tmp_path):
    model, data = mlp(), batch()
    gx, gy, losses = loss_surface(model, nn.CrossEntropyLoss(), data, steps=7,
                                  generator=torch.Generator().manual_seed(0))
    paths = [plot_surface(gx, gy, losses, tmp_path / f"{kind}.png", kind=kind, title=kind)
             for kind in ("contour", "surface", "both")]
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    alphas, line = loss_line(model, nn.CrossEntropyLoss(), data, d[0], steps=7)
    _, line2 = loss_line(model, nn.CrossEntropyLoss(), data, d[1], steps=7)
    paths.append(plot_line(alphas, line, tmp_path / "line.png"))
    paths.append(plot_line(alphas, [line, line2], tmp_path / "lines.png", labels=["d1", "d2"]))
    sizes = []
    for path in paths:
        raw = path.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
        sizes.append(len(raw))
    assert sizes[2] > sizes[0]  # 'both' draws both panels


# ---- errors -----------------------------------------------------------------------------------------------

def test_errors():
    model, data, loss_fn = mlp(), batch(), nn.CrossEntropyLoss()
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(0))[0]
    with pytest.raises(ValueError, match="unknown normalization 'batch'"):
        random_directions(model, 1, "batch")
    with pytest.raises(ValueError, match="unknown normalization"):
        loss_surface(model, loss_fn, data, normalization="Filter")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        normalize_direction(d, model, "filter", order=3)
    with pytest.raises(ValueError, match="n must be a positive int"):
        random_directions(model, 0)
    for steps in (1, 0, 4.0, True):
        with pytest.raises(ValueError, match="steps must be an int >= 2"):
            loss_surface(model, loss_fn, data, steps=steps)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        loss_line(model, loss_fn, data, d, steps=1)
    for dist in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="dist must be a positive finite number"):
            loss_line(model, loss_fn, data, d, dist=dist)
    with pytest.raises(ValueError, match="has 3 tensors, the model has 4"):
        loss_line(model, loss_fn, data, d[:3])
    with pytest.raises(ValueError, match=r"entry for '2.weight' has shape \(6, 3\), expected \(3, 6\)"):
        loss_line(model, loss_fn, data, d[:2] + [d[2].T] + d[3:])
    with pytest.raises(TypeError, match="must be a list of tensors"):
        loss_line(model, loss_fn, data, flat(d))
    with pytest.raises(ValueError, match=r"axes\[1\] entry for '0.bias' has shape"):
        loss_surface(model, loss_fn, data, axes=(d, [d[0], d[1][:2], d[2], d[3]]))
    with pytest.raises(ValueError, match="unknown axes 'adam'"):
        loss_surface(model, loss_fn, data, axes="adam")
    with pytest.raises(ValueError, match="axes must be 'random', 'hessian' or a pair"):
        loss_surface(model, loss_fn, data, axes=(d,))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        loss_line(model, loss_fn, data, d, chunk_size=0)
    with pytest.raises(ValueError, match=r"coords must be a tensor of shape \(points, 1\)"):
        evaluate_points(model, loss_fn, data, [d], torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got shape \(64,\)"):
        loss_line(model, nn.CrossEntropyLoss(reduction="none"), data, d, steps=3)
    with pytest.raises(TypeError, match="data must be"):
        loss_line(model, loss_fn, 3.0, d)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_directions(model, 1, generator=0)
    with pytest.raises(TypeError, match="model must be"):
        random_directions(lambda x: x, 1)
    gx, gy, losses = loss_surface(model, loss_fn, data, steps=3)
    with pytest.raises(ValueError, match="unknown kind 'heatmap'"):
        plot_surface(gx, gy, losses, "/nonexistent/x.png", kind="heatmap")
    with pytest.raises(ValueError, match="2-D of one shape"):
        plot_surface(gx, gy, losses[:2], "/nonexistent/x.png")
    with pytest.raises(ValueError, match="got 1 labels for 2 lines"):
        plot_line(torch.zeros(3), torch.zeros(2, 3), "/nonexistent/x.png", labels=["a"])
