"""SinkGD and multi-normalization (optim/sinkgd.py) against independent formulas: a hand loop of the two
SR-Sinkhorn steps, plain multiplicative Sinkhorn on G * G, the fixed point's row and column norms,
invariances, SWAN as an instance of multi_normalize, and the optimizer's routing,
edge cases and errors."""

import math

import pytest
import torch
from torch import nn

from normlab.bench.tasks import GPT
from normlab.optim.sinkgd import (SinkGD, column_normalize, multi_normalize, row_normalize, sinkgd_param_groups,
                                  sr_sinkhorn)
from normlab.optim.swan import grad_norm, grad_whitening, grad_whitening_svd, swan_direction, swan_param_groups
from test_swan import correlated

SHAPES = [(64, 128), (32, 512), (128, 128)]


def hand_loop(g, num_iters):
    """X <- sqrt(n) Q(X)^-1 X, then X <- sqrt(m) X R(X)^-1, as diagonal matrices, num_iters times."""
    m, n = g.shape
    x = g
    for _ in range(num_iters):
        x = torch.diag(math.sqrt(n) / torch.linalg.vector_norm(x, dim=1)) @ x
        x = x @ torch.diag(math.sqrt(m) / torch.linalg.vector_norm(x, dim=0))
    return x


def plain_sinkhorn(a, row_sum, col_sum, num_iters):
    """Multiplicative Sinkhorn scaling of a nonnegative matrix: diag(r) A diag(c), rows first."""
    r, c = torch.ones(a.shape[0], dtype=a.dtype), torch.ones(a.shape[1], dtype=a.dtype)
    for _ in range(num_iters):
        r = row_sum / (a @ c)
        c = col_sum / (a.T @ r)
    return r[:, None] * a * c[None, :]


def row_norms(x):
    return torch.linalg.vector_norm(x, dim=1)


def col_norms(x):
    return torch.linalg.vector_norm(x, dim=0)


@pytest.mark.parametrize("num_iters", [1, 2, 5])
def test_sr_sinkhorn_is_the_hand_loop(num_iters):
    # sr_sinkhorn iterates on the diagonal scalings, the hand loop on the matrix: equal up to rounding.
    g = correlated(48, 80)
    torch.testing.assert_close(sr_sinkhorn(g, num_iters), hand_loop(g, num_iters), rtol=1e-13, atol=0)
    g32 = g.float()
    torch.testing.assert_close(sr_sinkhorn(g32, num_iters), hand_loop(g32, num_iters), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_point_row_and_column_norms(shape):
    m, n = shape
    g = correlated(*shape)
    x = sr_sinkhorn(g, 5)
    torch.testing.assert_close(col_norms(x), torch.full((n,), math.sqrt(m), dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(row_norms(x), torch.full((m,), math.sqrt(n), dtype=torch.float64), rtol=1e-5, atol=0)
    x = sr_sinkhorn(g, 50)
    torch.testing.assert_close(col_norms(x), torch.full((n,), math.sqrt(m), dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(row_norms(x), torch.full((m,), math.sqrt(n), dtype=torch.float64), rtol=1e-12, atol=0)
    assert abs(x.square().mean().sqrt().item() - 1) < 1e-12  # entries of RMS 1


@pytest.mark.parametrize("num_iters", [1, 5, 20])
def test_squared_output_is_plain_sinkhorn_of_the_squared_gradient(num_iters):
    g = correlated(40, 70)
    m, n = g.shape
    x = sr_sinkhorn(g, num_iters)
    torch.testing.assert_close(x * x, plain_sinkhorn(g * g, n, m, num_iters), rtol=1e-10, atol=0)
    ratio = x / g  # X = D1 G D2: the entrywise ratio is the rank-1 matrix d1 d2^T, all positive
    sv = torch.linalg.svdvals(ratio)
    assert (ratio > 0).all() and sv[1] / sv[0] < 1e-12


def test_invariances_and_signs():
    g = correlated(30, 60)
    x = sr_sinkhorn(g, 50)
    a = torch.rand(30, 1, dtype=torch.float64) * 10 + 0.1
    b = torch.rand(1, 60, dtype=torch.float64) * 10 + 0.1
    for transformed in (3e-5 * g, 4e4 * g, a * g, g * b, a * g * b):
        torch.testing.assert_close(sr_sinkhorn(transformed, 50), x, rtol=0, atol=1e-10)
    assert torch.equal(torch.sign(x), torch.sign(g))


def test_multi_normalize_with_row_and_column_maps_is_sr_sinkhorn():
    g = correlated(24, 36)
    assert torch.equal(multi_normalize(g, [row_normalize, column_normalize], 3), hand_loop(g, 3))
    torch.testing.assert_close(sr_sinkhorn(g, 3), multi_normalize(g, [row_normalize, column_normalize], 3),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(row_norms(row_normalize(g)), torch.full((24,), 6.0, dtype=torch.float64))
    torch.testing.assert_close(col_norms(column_normalize(g)), torch.full((36,), math.sqrt(24), dtype=torch.float64))
    assert torch.equal(multi_normalize(g, [row_normalize], 0), g)


def test_swan_is_an_instance_of_multi_normalize():
    g = correlated(32, 512)
    x = multi_normalize(g, [grad_norm, grad_whitening_svd], 1)
    x = x * math.sqrt(x.numel()) / torch.linalg.matrix_norm(x)
    torch.testing.assert_close(x, swan_direction(g, whitening="svd"), rtol=0, atol=1e-8)
    y = multi_normalize(g, [grad_norm, lambda t: grad_whitening(t, steps=30)], 1)
    torch.testing.assert_close(y * math.sqrt(y.numel()) / torch.linalg.matrix_norm(y), x, rtol=0, atol=1e-8)


def test_zero_rows_and_columns_stay_zero_and_finite():
    g = correlated(20, 30)
    g[4] = 0.0
    g[:, 7] = 0.0
    x = sr_sinkhorn(g, 5)
    assert torch.isfinite(x).all()
    assert torch.equal(x[4], torch.zeros(30, dtype=torch.float64))
    assert torch.equal(x[:, 7], torch.zeros(20, dtype=torch.float64))
    nonzero = torch.ones(30, dtype=torch.bool)
    nonzero[7] = False
    torch.testing.assert_close(col_norms(x)[nonzero], torch.full((29,), math.sqrt(20), dtype=torch.float64))
    torch.testing.assert_close(x, multi_normalize(g, [row_normalize, column_normalize], 5), rtol=1e-13, atol=0)
    assert torch.equal(sr_sinkhorn(torch.zeros(5, 6), 5), torch.zeros(5, 6))
    tiny = g.clone()
    tiny[4] = 1e-10  # a row whose norm stays below eps for a while: grows by sqrt(n) / eps, then normalised
    torch.testing.assert_close(sr_sinkhorn(tiny, 5), multi_normalize(tiny, [row_normalize, column_normalize], 5),
                               rtol=1e-12, atol=0)


def test_eps_is_a_clamp_so_small_gradients_stay_scale_invariant():
    g = correlated(10, 16)
    small = 1e-7 * g  # norms about 1e-6: norm + eps would be off by 1 %, max(norm, eps) is exact
    assert row_norms(small).min() > 1e-8 and col_norms(small).min() > 1e-8
    torch.testing.assert_close(sr_sinkhorn(small, 5), sr_sinkhorn(g, 5), rtol=1e-12, atol=0)


def test_a_single_row_is_sign_descent():
    g = correlated(1, 9)
    torch.testing.assert_close(sr_sinkhorn(g, 5), torch.sign(g), rtol=1e-15, atol=0)


def test_low_precision_gradients_are_normalised_in_float32():
    w = nn.Parameter(torch.zeros(8, 12, dtype=torch.bfloat16))
    w.grad = correlated(8, 12, dtype=torch.float32).bfloat16()
    expected = (-0.1 * 0.5 * sr_sinkhorn(w.grad.float(), 5)).bfloat16()
    SinkGD([w], lr=0.1, matrix_lr_scale=0.5).step()
    assert torch.equal(w.detach(), expected)
    big = nn.Parameter(torch.zeros(4, 4096, dtype=torch.float16))
    big.grad = torch.full((4, 4096), 60.0, dtype=torch.float16)  # squares sum past float16's 65504
    SinkGD([big], lr=1.0, matrix_lr_scale=1.0).step()
    assert torch.equal(big.detach(), torch.full((4, 4096), -1.0, dtype=torch.float16))


# --- the optimizer --------------------------------------------------------------------------------------

def test_step_equals_the_hand_formula_in_float64():
    w = nn.Parameter(torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    before = w.detach().clone()
    w.grad = correlated(16, 24)
    SinkGD([w], lr=0.3, matrix_lr_scale=0.2, num_iters=4, weight_decay=0.5).step()
    eta = 0.3 * 0.2
    expected = before * (1 - eta * 0.5) - eta * hand_loop(w.grad, 4)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-14)


def _split(model, groups):
    return [[id(p) for p in group["params"]] for group in groups]


def test_same_routing_as_swan():
    model = GPT()
    assert _split(model, sinkgd_param_groups(model, 1e-3)) == _split(model, swan_param_groups(model, 1e-3))
    tied = GPT()
    tied.head.weight = tied.tok_emb.weight
    exclude = ["blocks.0.mlp.fc1", "head"]
    assert (_split(tied, sinkgd_param_groups(tied, 1e-3, exclude))
            == _split(tied, swan_param_groups(tied, 1e-3, exclude)))
    assert len(sinkgd_param_groups(tied, 1e-3, exclude)[0]["params"]) == 11
    groups = sinkgd_param_groups(model, 2e-3, weight_decay=0.1)
    assert [(g["use_sinkgd"], g["lr"], g["weight_decay"]) for g in groups] == [(True, 2e-3, 0.1), (False, 2e-3, 0.0)]


def test_vectors_in_a_sinkgd_group_raise_naming_the_tensor():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"SinkGD requires 2-D weight matrices; route 0.bias \(shape \(3,\)\) to "
                                         r"the Adam fallback \(use_sinkgd=False\).*sinkgd_param_groups"):
        SinkGD(model.named_parameters())
    SinkGD([nn.Parameter(torch.zeros(1, 5))])  # a 1 x n matrix is allowed: sign descent


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "Invalid lr: -1.0"), ({"matrix_lr_scale": -0.05}, "Invalid matrix_lr_scale: -0.05"),
    ({"num_iters": 0}, "Invalid num_iters: 0"), ({"num_iters": 2.0}, "Invalid num_iters: 2.0"),
    ({"num_iters": True}, "Invalid num_iters: True"), ({"eps": 0.0}, "Invalid eps: 0.0"),
    ({"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
    ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
    ({"adam_eps": 0.0}, "Invalid adam_eps: 0.0"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SinkGD([nn.Parameter(torch.zeros(3, 4))], **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SinkGD([{"params": [nn.Parameter(torch.zeros(3, 4))], **kwargs}])
