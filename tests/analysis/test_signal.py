import itertools
import math

import pytest
import torch
from torch import nn

from normlab.analysis.signal import (expansion_terms, log_norm_growth, path_order_profile, random_relu_branch,
                                     residual_signal_growth)
from normlab.layers.residual import ScaledResidual


def linear_blocks(n, width=8, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(n):
        layer = nn.Linear(width, width, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(scale * torch.randn(width, width, generator=gen, dtype=torch.float64) / math.sqrt(width))
        blocks.append(layer)
    return blocks


def subset_sum(blocks, alpha, x):
    """sum over all ordered subsets i_1 < ... < i_k of alpha^k A_{i_k} ... A_{i_1} x, written out."""
    total = torch.zeros_like(x)
    for k in range(len(blocks) + 1):
        for subset in itertools.combinations(range(len(blocks)), k):
            term = x
            for i in subset:
                term = term @ blocks[i].weight.T
            total = total + alpha ** k * term
    return total


@pytest.mark.parametrize("n", [6, 10])
def test_tower_equals_explicit_subset_sum(n):
    blocks = linear_blocks(n)
    alpha = 0.7
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tower = nn.Sequential(*(ScaledResidual(b, alpha, dtype=torch.float64) for b in blocks))
    with torch.no_grad():
        out = tower(x)
    ref = subset_sum(blocks, alpha, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    terms = expansion_terms(blocks, alpha, x, n)
    torch.testing.assert_close(terms.sum(0), ref, rtol=0, atol=1e-12)
    order2 = sum(alpha ** 2 * x @ blocks[i].weight.T @ blocks[j].weight.T
                 for i, j in itertools.combinations(range(n), 2))
    torch.testing.assert_close(terms[2], order2, rtol=0, atol=1e-12)


def test_order_k_truncation_bound():
    n = 12
    blocks = linear_blocks(n, seed=2, scale=1.5)
    a = max(torch.linalg.matrix_norm(b.weight, ord=2).item() for b in blocks)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = x
    for b in blocks:
        out = out + b(out) / n
    out = out.detach()
    terms = expansion_terms(blocks, 1 / n, x, 4)
    xnorm = torch.linalg.vector_norm(x, dim=1)
    for K in range(5):
        residual = torch.linalg.vector_norm(out - terms[:K + 1].sum(0), dim=1)
        bound = sum(a ** k / math.factorial(k) for k in range(K + 1, 60)) * xnorm
        assert (residual <= bound).all()
        if K > 0:
            assert (residual > 0).all()


def test_nonlinear_terms_use_jacobians_at_the_input():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double() for _ in range(3)]
    x = torch.randn(2, 5, dtype=torch.float64)
    alpha = 0.5
    terms = expansion_terms(blocks, alpha, x, 3)
    jac = [torch.func.vmap(torch.func.jacrev(b))(x) for b in blocks]  # (N, d, d) per block
    f = [b(x).detach() for b in blocks]
    order1 = alpha * sum(f)
    order2 = alpha ** 2 * sum(torch.einsum("nij,nj->ni", jac[j], f[i]) for i, j in itertools.combinations(range(3), 2))
    order3 = alpha ** 3 * torch.einsum("nij,nj->ni", jac[2], torch.einsum("nij,nj->ni", jac[1], f[0]))
    torch.testing.assert_close(terms[0], x)
    torch.testing.assert_close(terms[1], order1)
    torch.testing.assert_close(terms[2], order2)
    torch.testing.assert_close(terms[3], order3)
    prof = path_order_profile(blocks, alpha, x, 3)
    assert prof.shape == (4, 2)
    torch.testing.assert_close(prof[2], torch.linalg.vector_norm(order2, dim=1))


def naive_growth(rule_alpha, n, width, n_samples, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, width, generator=gen, dtype=torch.float64)
    ws = []
    for _ in range(n):
        w1 = torch.randn(width, width, generator=gen) * math.sqrt(2 / width)
        w2 = torch.randn(width, width, generator=gen) * math.sqrt(1 / width)
        ws.append((w1.double(), w2.double()))
    h = x
    for w1, w2 in ws:
        h = h + rule_alpha * torch.relu(h @ w1.T) @ w2.T
    return math.log10((h.norm(dim=1) / x.norm(dim=1)).mean().item())


def test_signal_growth_matches_a_direct_forward():
    got = residual_signal_growth(depths=(2, 8), rule="1/sqrt(n)", width=16, n_samples=32, seed=5)
    assert set(got) == {2, 8}
    for n in (2, 8):
        assert got[n] == pytest.approx(naive_growth(1 / math.sqrt(n), n, 16, 32, 5), rel=1e-9, abs=1e-12)
    none = residual_signal_growth(depths=(8,), rule="none", width=16, n_samples=32, seed=5)
    assert none[8] == pytest.approx(naive_growth(1.0, 8, 16, 32, 5), rel=1e-9)
    assert residual_signal_growth(depths=(8,), rule="1/n", width=16, n_samples=32, seed=5) == \
        residual_signal_growth(depths=(8,), rule="1/n", width=16, n_samples=32, seed=5)


def test_log_space_reaches_depths_where_float32_overflows():
    width, n = 32, 300
    gen = torch.Generator().manual_seed(0)
    blocks = [random_relu_branch(width, gen) for _ in range(n)]
    x32 = torch.randn(8, width, generator=torch.Generator().manual_seed(1))
    with pytest.raises(OverflowError, match="overflowed torch.float32"):
        log_norm_growth(blocks, 1.0, x32)
    logs = log_norm_growth([b.double() for b in blocks], 1.0, x32.double())
    assert logs.shape == (n, 8) and torch.isfinite(logs).all()
    per_block = logs[-1].mean().item() / n
    assert 0.25 < per_block < 0.45  # ~ln(2)/2 per block: E||h||^2 doubles


def test_user_blocks_restored_and_errors():
    block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    block.train()
    x = torch.randn(3, 4)
    a = log_norm_growth([block], 0.5, x)
    assert block.training and block[1].training
    assert torch.equal(a, log_norm_growth([block], 0.5, x))  # eval mode: dropout off, deterministic
    with pytest.raises(ValueError, match="at least one"):
        log_norm_growth([], 1.0, x)
    with pytest.raises(ValueError, match="batch dim"):
        log_norm_growth([block], 1.0, torch.randn(4))
    with pytest.raises(ValueError, match="alpha must be a finite"):
        expansion_terms([block], math.inf, x, 2)
    with pytest.raises(ValueError, match="max_order"):
        path_order_profile([block], 1.0, x, -1)
    with pytest.raises(ValueError, match=r"maps \(3, 4\) to \(3, 2\)"):
        log_norm_growth([nn.Linear(4, 2)], 1.0, x)
    with pytest.raises(ValueError, match="depths"):
        residual_signal_growth(depths=(0,))
    with pytest.raises(ValueError, match="width"):
        residual_signal_growth(width=0)
    with pytest.raises(ValueError, match="unknown rule"):
        residual_signal_growth(rule="1/n2", depths=(2,), width=4, n_samples=2)
    assert expansion_terms([block], 1.0, x, 0).shape == (1, 3, 4)
