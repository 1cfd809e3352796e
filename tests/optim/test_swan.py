"""SWAN (optim/swan.py) against independent formulas: GradNorm statistics in numpy, GradWhitening against
U V^T from an SVD, the optimizer step against a hand-written float64 step, plus the sheet's invariances,
routing numbers, edge cases and errors."""


import numpy as np
import pytest
import torch
from torch import nn

from normlab.bench.tasks import GPT
from normlab.optim.swan import SWAN, grad_norm, grad_whitening, grad_whitening_svd, swan_direction, swan_param_groups


def correlated(m, n, seed=0, dtype=torch.float64):
    """A random gradient-like matrix: low-rank structure plus noise, rows and columns of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 8, generator=g, dtype=dtype) @ torch.randn(8, n, generator=g, dtype=dtype)
    noise = 0.3 * torch.randn(m, n, generator=g, dtype=dtype)
    return (low + noise) * (1 + torch.rand(m, 1, generator=g, dtype=dtype)) + 0.5


def polar(x):
    """U V^T of a full-rank-side matrix, from numpy's SVD."""
    u, _, vt = np.linalg.svd(x.numpy(), full_matrices=False)
    return torch.from_numpy(u @ vt)


def standardised_rows(g, eps=1e-8):
    """GradNorm written out in numpy: (G - row mean) / (row population std + eps)."""
    a = g.numpy()
    return torch.from_numpy((a - a.mean(axis=1, keepdims=True)) / (a.std(axis=1, keepdims=True) + eps))


def oracle_direction(g, eps=1e-8):
    """SWAN's direction from numpy: standardise rows, U V^T of the retained singular directions (rank cut at
    1e-10 sigma_max: centring leaves one exact zero when m >= n), rescale to sqrt(m n)."""
    a = standardised_rows(g, eps).numpy()
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    keep = s > 1e-10 * s[0]
    d = u[:, keep] @ vt[keep]
    return torch.from_numpy(d * np.sqrt(a.size) / np.linalg.norm(d))


# --- GradNorm -------------------------------------------------------------------------------------------

def test_grad_norm_row_statistics():
    g = correlated(64, 96, dtype=torch.float32)
    out = grad_norm(g)
    assert out.dtype == torch.float32
    assert out.mean(dim=1).abs().max() < 1e-6
    torch.testing.assert_close(out.var(dim=1, correction=0), torch.ones(64), rtol=0, atol=1e-5)
    assert abs(torch.linalg.matrix_norm(out).item() / (64 * 96) ** 0.5 - 1) < 1e-5


def test_grad_norm_matches_the_formula_and_pins_the_axis():
    g = correlated(12, 20)
    torch.testing.assert_close(grad_norm(g), standardised_rows(g), rtol=1e-12, atol=1e-12)
    row_shift = torch.randn(12, 1, dtype=torch.float64) * 5
    col_shift = torch.randn(1, 20, dtype=torch.float64) * 5
    torch.testing.assert_close(grad_norm(g + row_shift), grad_norm(g), rtol=1e-10, atol=1e-10)
    assert (grad_norm(g + col_shift) - grad_norm(g)).abs().max() > 0.1  # columns are not standardised


def test_grad_norm_constant_row_becomes_zero():
    g = correlated(6, 10)
    g[2] = 3.0
    out = grad_norm(g)
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros(10, dtype=torch.float64))


# --- GradWhitening --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 512), (64, 128)])
def test_newton_schulz_whitening_is_the_polar_factor(shape):
    g = correlated(*shape)
    out = grad_whitening(g, steps=30, beta=0.5)
    torch.testing.assert_close(out, polar(g), rtol=0, atol=1e-8)
    torch.testing.assert_close(out @ out.T, torch.eye(shape[0], dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(grad_whitening(g.T.contiguous(), steps=30), out.T, rtol=0, atol=1e-8)


def test_svd_whitening_is_the_polar_factor_and_drops_null_directions():
    g = correlated(48, 80)
    torch.testing.assert_close(grad_whitening_svd(g), polar(g), rtol=0, atol=1e-10)
    low_rank = g[:, :5] @ torch.randn(5, 80, dtype=torch.float64)  # rank 5
    out = grad_whitening_svd(low_rank)
    assert torch.linalg.matrix_rank(out) == 5
    torch.testing.assert_close(torch.linalg.svdvals(out)[:5], torch.ones(5, dtype=torch.float64))
    assert torch.equal(grad_whitening_svd(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_whitening_is_left_orthogonally_equivariant():
    g = correlated(40, 100)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    torch.testing.assert_close(grad_whitening(q @ g, steps=30), q @ grad_whitening(g, steps=30), rtol=0, atol=1e-9)


def test_newton_schulz_beta_outside_the_stable_range_does_not_whiten():
    g = correlated(32, 512)
    error = (grad_whitening(g, steps=30, beta=0.8) - polar(g)).abs().max()
    assert error > 0.05  # why SWAN refuses beta outside (1/3, 2/3)


# --- the SWAN direction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 512), (64, 128), (128, 32)])
def test_direction_matches_the_numpy_oracle(shape):
    g = correlated(*shape)
    torch.testing.assert_close(swan_direction(g, ns_steps=30), oracle_direction(g), rtol=0, atol=1e-8)
    torch.testing.assert_close(swan_direction(g, whitening="svd"), oracle_direction(g), rtol=0, atol=1e-10)


def test_direction_without_whitening_is_rescaled_grad_norm():
    g = correlated(16, 24)
    expected = standardised_rows(g)
    expected = expected * (16 * 24) ** 0.5 / torch.linalg.matrix_norm(expected)
    torch.testing.assert_close(swan_direction(g, whitening="none"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(swan_direction(g, whitening="none", rescale=False), standardised_rows(g))


def test_rescale_gives_rms_one_and_no_rescale_gives_the_polar_factor():
    g = correlated(32, 512)
    d = swan_direction(g, ns_steps=30)
    assert abs(d.square().mean().sqrt().item() - 1) < 1e-12
    torch.testing.assert_close(swan_direction(g, ns_steps=30, rescale=False), polar(standardised_rows(g)),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("whitening", ["newton_schulz", "svd", "none"])
def test_direction_invariances(whitening):
    g = correlated(24, 64)
    d = swan_direction(g, whitening=whitening, ns_steps=30, eps=0.0)
    for c in (1e-4, 3.0, 1e5):
        torch.testing.assert_close(swan_direction(c * g, whitening=whitening, ns_steps=30, eps=0.0), d,
                                   rtol=0, atol=1e-10)
    shifted = g + 7 * torch.randn(24, 1, dtype=torch.float64)
    torch.testing.assert_close(swan_direction(shifted, whitening=whitening, ns_steps=30, eps=0.0), d,
                               rtol=0, atol=1e-9)
    default_eps = swan_direction(1e-2 * g, whitening=whitening, ns_steps=30)
    torch.testing.assert_close(default_eps, d, rtol=0, atol=1e-5)  # eps 1e-8 matters only for tiny rows


def test_square_and_tall_layers_converge_to_the_pseudo_inverse_without_blowing_up():
    # Row centring leaves the column Gram of a square or tall G~ singular along 1: the iteration must not
    # amplify it (float32 at 40 steps diverged to NaN before the null direction was deflated).
    for shape in ((128, 128), (200, 40)):
        g32 = correlated(*shape, dtype=torch.float32)
        for steps in (10, 40):
            d = swan_direction(g32, ns_steps=steps)
            assert torch.isfinite(d).all()
            assert d.mean(dim=1).abs().max() < 1e-4  # the direction 1 that row centring removed stays out
        g64 = correlated(*shape)
        torch.testing.assert_close(swan_direction(g64, ns_steps=60), oracle_direction(g64), rtol=0, atol=1e-8)


def test_centered_whitening_deflates_only_the_known_null_direction():
    g = grad_norm(correlated(90, 30))  # rows sum to 0: rank 29, the column Gram is singular along 1
    out = grad_whitening(g, steps=40, centered=True)
    u, s, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    pinv_polar = torch.from_numpy(u[:, :29] @ vt[:29])
    torch.testing.assert_close(out, pinv_polar, rtol=0, atol=1e-9)
    wide = correlated(20, 64)  # m < n: nothing to deflate, the same result either way
    assert torch.equal(grad_whitening(wide, centered=True), grad_whitening(wide))


def test_zero_and_constant_gradients():
    assert torch.equal(swan_direction(torch.zeros(5, 7)), torch.zeros(5, 7))
    g = correlated(8, 16, dtype=torch.float32)
    g[3] = -2.0
    d = swan_direction(g)
    assert torch.isfinite(d).all() and d[3].abs().max() < 1e-5


def test_low_precision_gradients_are_whitened_in_float32():
    g = correlated(16, 48, dtype=torch.float32)
    d = swan_direction(g.bfloat16())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, swan_direction(g.bfloat16().float()), rtol=0, atol=0)
    assert swan_direction(correlated(4, 6)).dtype == torch.float64


# --- the optimizer --------------------------------------------------------------------------------------

def test_step_equals_a_hand_written_float64_step():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 40, dtype=torch.float64))
    before = w.detach().clone()
    w.grad = correlated(24, 40)
    opt = SWAN([w], lr=0.2, matrix_lr_scale=0.5, ns_steps=30, weight_decay=0.1)
    opt.step()
    eta = 0.2 * 0.5
    torch.testing.assert_close(w.detach(), before * (1 - eta * 0.1) - eta * oracle_direction(w.grad),
                               rtol=0, atol=1e-9)


def test_bfloat16_weights_step_with_a_float32_direction():
    w = nn.Parameter(torch.randn(8, 12).bfloat16())
    w.grad = correlated(8, 12, dtype=torch.float32).bfloat16()
    expected = (w.detach().float() - 0.1 * swan_direction(w.grad.float())).bfloat16()
    SWAN([w], lr=0.1).step()
    assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), expected)


def test_lr_scheduler_scales_the_matrix_lr():
    w = nn.Parameter(torch.zeros(4, 6))
    opt = SWAN([w], lr=1.0, matrix_lr_scale=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    w.grad = correlated(4, 6, dtype=torch.float32)
    opt.step()
    torch.testing.assert_close(w.detach(), -0.05 * swan_direction(w.grad))


def test_param_groups_routing_and_weight_decay():
    model = GPT()
    groups = swan_param_groups(model, lr=2e-3, weight_decay=0.1)
    assert [g["use_swan"] for g in groups] == [True, False]
    assert [g["lr"] for g in groups] == [2e-3, 2e-3] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for p in groups[0]["params"]) == 393_216
    excluded = swan_param_groups(model, lr=1e-3, exclude=["blocks.1.mlp.fc2"])
    assert any(p is model.blocks[1].mlp.fc2.weight for p in excluded[1]["params"])
    assert any(p is model.head.weight for p in excluded[0]["params"])
    with pytest.raises(ValueError, match="exclude names no module"):
        swan_param_groups(model, lr=1e-3, exclude=["nope"])


def test_vectors_in_a_swan_group_raise_naming_the_tensor():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"SWAN requires 2-D weight matrices.*route 0.bias \(shape \(3,\)\) to "
                                         r"the Adam fallback.*swan_param_groups"):
        SWAN(model.named_parameters())
    with pytest.raises(ValueError, match=r"route params\[1\] of param group 0 \(shape \(3,\)\)"):
        SWAN(model.parameters())
    with pytest.raises(ValueError, match=r"shape \(5, 1\)"):
        SWAN([nn.Parameter(torch.zeros(5, 1))])
    opt = SWAN([model[0].weight])
    with pytest.raises(ValueError, match="0.bias|params\\[0\\] of param group 1"):
        opt.add_param_group({"params": [model[0].bias]})
    assert len(opt.param_groups) == 1  # the refused group is not left behind
    opt.add_param_group({"params": [model[0].bias], "use_swan": False})


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "Invalid lr: -1.0"), ({"lr": 0.0}, "Invalid lr: 0.0"),
    ({"matrix_lr_scale": 0.0}, "Invalid matrix_lr_scale: 0.0"), ({"ns_steps": 0}, "Invalid ns_steps: 0"),
    ({"ns_steps": 2.5}, "Invalid ns_steps: 2.5"), ({"ns_beta": 0.8}, "Invalid ns_beta: 0.8"),
    ({"ns_beta": 1 / 3}, "Invalid ns_beta"), ({"eps": 0.0}, "Invalid eps: 0.0"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
    ({"adam_eps": -1e-8}, "Invalid adam_eps"), ({"whitening": "zca"}, "Invalid whitening: 'zca'"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SWAN([nn.Parameter(torch.zeros(3, 4))], **kwargs)


def test_invalid_group_options_are_refused_too():
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        SWAN(swan_param_groups(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), lr=-1.0))
    with pytest.raises(ValueError, match="Invalid ns_steps: 0"):
        SWAN([{"params": [nn.Parameter(torch.zeros(3, 4))], "ns_steps": 0}])
